//! gRPC load generator: closed-loop callers send Admit or AdmitBatch to a sidecar over a few
//! HTTP/2 connections, every message to a recipient no other message of the run has, and the
//! per-call latencies go into an HDR histogram. Prints figures; asserts nothing.
//!
//! ```text
//! cargo bench --bench load -- [--store memory|redis | --target HOST:PORT [--token TOKEN]]
//!     [--callers N] [--connections K] [--batch B] [--portfolios P] [--seconds S] [--warmup S]
//!     [--label NAME] [--binary PATH]
//! cargo bench --bench load -- --ceiling [--callers N] [--pipeline P] [--requests R] [--label NAME]
//! ```
//!
//! `--store` (default `memory`) starts the release binary `tiergate serve`, and for `redis` a
//! redis-server on a free port, with one unlimited tier, so every decision is a real
//! NEW_RECIPIENT write, and reports that process's resident memory. `--target` loads a sidecar
//! that is already running instead; `--binary` starts another build of tiergate, to compare two. `--batch 0` (the default) sends Admit; `--batch B` sends
//! AdmitBatch of B messages of one portfolio. Caller `i` uses connection `i mod K` (K defaults to
//! at most 4), and each call takes the next of P portfolios. Calls that start in the warm-up are
//! not counted.
//!
//! `--ceiling` measures Redis alone with redis-benchmark on a redis-server it starts: the admit
//! script's work for one recipient (TIME, trim, ZSCORE, ZCARD, ZADD) as one EVALSHA on one
//! window, with random recipients, from N clients, `--pipeline` commands in flight on each.
//!
//! Each run also prints the CPU time the sidecar, its redis-server and this load generator took
//! in the measured seconds, on a core and waiting for one (from `/proc/<pid>/task/*/schedstat`),
//! and per decision: where the time goes on a machine they share.
//!
//! The last line printed is `RESULT key=value ...`, which `scripts/bench-load` reads.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::requests::UTILITY;
use common::server::{client, Sidecar};
use hdrhistogram::Histogram;
use tiergate::pb::limiter_client::LimiterClient;
use tiergate::pb::{self, Reason};
use tonic::transport::Channel;

const USAGE: &str = "usage: cargo bench --bench load -- [--store memory|redis | --target HOST:PORT [--token TOKEN]] \
[--callers N] [--connections K] [--batch B] [--portfolios P] [--seconds S] [--warmup S] [--label NAME] \
[--binary PATH]\n       \
cargo bench --bench load -- --ceiling [--callers N] [--pipeline P] [--requests R] [--label NAME]";

/// The hash key of the sidecars this starts (any key will do: each run has its own Redis).
const HASH_KEY: (&str, &str) = ("TIERGATE_STORE_HASH_KEY", "bench-hash-key-0123456789");

/// National numbers are 10 digits after `+1`; the n-th message of a run goes to
/// `(seed + n * STRIDE) mod NUMBERS`, which differs for every n below NUMBERS because STRIDE
/// is coprime to 10, and scatters consecutive messages over the whole range.
const NUMBERS: u128 = 10_000_000_000;
const STRIDE: u128 = 7_919_000_003;

/// The rolling window the ceiling's script trims, as the sidecar's default (24 h, in µs).
const WINDOW_US: &str = "86400000000";

/// The admit script's work for one counted recipient, for redis-benchmark: Redis's clock, trim
/// the window, is the recipient counted, how many are, count it.
const CEILING_SCRIPT: &str = "\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - tonumber(ARGV[2])))
local counted = redis.call('ZSCORE', KEYS[1], ARGV[1])
local count = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1])
return {counted and 1 or 0, count}";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Memory,
    Redis,
}

#[derive(Debug)]
struct Args {
    store: Backend,
    target: Option<String>,
    binary: Option<PathBuf>,
    token: Option<String>,
    callers: usize,
    connections: Option<usize>,
    batch: usize,
    portfolios: usize,
    seconds: f64,
    warmup: f64,
    label: Option<String>,
    ceiling: bool,
    pipeline: usize,
    requests: usize,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args {
            store: Backend::Memory,
            target: None,
            binary: None,
            token: None,
            callers: 32,
            connections: None,
            batch: 0,
            portfolios: 1,
            seconds: 10.0,
            warmup: 2.0,
            label: None,
            ceiling: false,
            pipeline: 1,
            requests: 500_000,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
            match flag.as_str() {
                // cargo bench passes it to every bench.
                "--bench" => {}
                "--store" => {
                    a.store = match value()?.as_str() {
                        "memory" => Backend::Memory,
                        "redis" => Backend::Redis,
                        other => return Err(format!("--store is memory or redis, not {other}")),
                    }
                }
                "--target" => a.target = Some(value()?),
                "--token" => a.token = Some(value()?),
                "--binary" => a.binary = Some(value()?.into()),
                "--callers" => a.callers = number(&flag, value()?)?,
                "--connections" => a.connections = Some(number(&flag, value()?)?),
                "--batch" => a.batch = number(&flag, value()?)?,
                "--portfolios" => a.portfolios = number(&flag, value()?)?,
                "--seconds" => a.seconds = number(&flag, value()?)?,
                "--warmup" => a.warmup = number(&flag, value()?)?,
                "--label" => a.label = Some(value()?),
                "--ceiling" => a.ceiling = true,
                "--pipeline" => a.pipeline = number(&flag, value()?)?,
                "--requests" => a.requests = number(&flag, value()?)?,
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown argument {other}\n{USAGE}")),
            }
        }
        if a.callers == 0 || a.portfolios == 0 || a.pipeline == 0 || a.connections == Some(0) {
            return Err("--callers, --connections, --portfolios and --pipeline are at least 1".into());
        }
        Ok(a)
    }

    fn connections(&self) -> usize {
        self.connections.unwrap_or(4).min(self.callers)
    }

    fn label(&self) -> String {
        self.label.clone().unwrap_or_else(|| match (self.ceiling, &self.target) {
            (true, _) => format!("ceiling-c{}-P{}", self.callers, self.pipeline),
            (false, Some(_)) => format!("target-b{}-c{}", self.batch, self.callers),
            (false, None) => format!("{:?}-b{}-c{}", self.store, self.batch, self.callers).to_lowercase(),
        })
    }
}

fn number<T: FromStr>(flag: &str, value: String) -> Result<T, String> {
    value.parse().map_err(|_| format!("{flag} takes a number, not {value:?}"))
}

fn main() {
    let args = Args::parse().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    if args.ceiling {
        ceiling(&args);
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(load(&args));
}

/// What one caller saw while measuring.
struct Tally {
    /// Microseconds per successful call.
    latency: Histogram<u64>,
    decisions: u64,
    /// Decisions other than NEW_RECIPIENT: none unless the run is broken.
    not_new: u64,
    errors: u64,
    first_error: Option<String>,
    /// When the last counted call ended.
    last_end: Option<Instant>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            decisions: 0,
            not_new: 0,
            errors: 0,
            first_error: None,
            last_end: None,
        }
    }

    fn add(&mut self, other: Tally) {
        self.latency.add(&other.latency).unwrap();
        self.decisions += other.decisions;
        self.not_new += other.not_new;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.last_end = self.last_end.max(other.last_end);
    }
}

/// What every caller shares: where the next message goes, and the measured interval.
struct Plan {
    batch: usize,
    portfolios: usize,
    token: Option<String>,
    seed: u128,
    next: AtomicU64,
    from: Instant,
    until: Instant,
}

impl Plan {
    /// The messages of the next call: one portfolio, recipients no other call has.
    fn messages(&self) -> Vec<pb::AdmitRequest> {
        let n = self.batch.max(1) as u64;
        let first = self.next.fetch_add(n, Ordering::Relaxed);
        let portfolio = format!("bench-{}", (first / n) % self.portfolios as u64);
        (first..first + n)
            .map(|i| {
                let number = (self.seed + u128::from(i) * STRIDE) % NUMBERS;
                UTILITY.to(&portfolio, "bench-sender", &format!("+1{number:010}"))
            })
            .collect()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    }
}

/// One closed-loop caller: the next call starts when the last one has answered.
async fn caller(mut client: LimiterClient<Channel>, plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::new();
    loop {
        let started = Instant::now();
        if started >= plan.until {
            return tally;
        }
        let mut messages = plan.messages();
        let answered = if plan.batch == 0 {
            let message = messages.pop().unwrap();
            client.admit(plan.request(message)).await.map(|r| vec![r.into_inner().reason()])
        } else {
            let batch = pb::AdmitBatchRequest { requests: messages };
            client
                .admit_batch(plan.request(batch))
                .await
                .map(|r| r.into_inner().responses.iter().map(|a| a.reason()).collect())
        };
        let took = started.elapsed();
        if started < plan.from {
            continue;
        }
        match answered {
            Ok(reasons) => {
                tally.latency.saturating_record(took.as_micros().max(1) as u64);
                tally.decisions += reasons.len() as u64;
                tally.not_new += reasons.iter().filter(|r| **r != Reason::NewRecipient).count() as u64;
            }
            Err(status) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
        tally.last_end = Some(Instant::now());
    }
}

/// The sidecar's configuration: one unlimited tier, so the limit never decides.
fn config(redis: Option<&RedisServer>) -> String {
    let store = match redis {
        Some(r) => format!("backend = \"redis\"\nurl = \"{}\"", r.url()),
        None => "backend = \"memory\"".into(),
    };
    format!(
        "[server]\nshutdown_grace = \"1s\"\n\n[store]\n{store}\n\n[policy]\nladder = [{{ name = \"UNLIMITED\" }}]\n"
    )
}

/// `VmRSS` and `VmHWM` (peak) of a process, in kB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time of every thread of a process so far: (on a core, waiting for one).
fn cpu(pid: u32) -> (Duration, Duration) {
    let (mut on, mut waiting) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let mut ns = stat.split_whitespace().map(|n| n.parse::<u64>().unwrap_or(0));
        on += ns.next().unwrap_or(0);
        waiting += ns.next().unwrap_or(0);
    }
    (Duration::from_nanos(on), Duration::from_nanos(waiting))
}

/// The processes whose CPU time a run reports, by name.
fn processes(sidecar: Option<&Sidecar>, redis: Option<&RedisServer>) -> Vec<(&'static str, u32)> {
    let mut all = vec![("load generator", std::process::id())];
    all.extend(sidecar.map(|s| ("sidecar", s.pid())));
    all.extend(redis.and_then(RedisServer::pid).map(|pid| ("redis-server", pid)));
    all
}

async fn load(a: &Args) {
    let (redis, sidecar) = match &a.target {
        Some(_) => (None, None),
        None => {
            let redis = (a.store == Backend::Redis).then(RedisServer::start);
            let binary = a.binary.clone().unwrap_or_else(|| env!("CARGO_BIN_EXE_tiergate").into());
            let sidecar = Sidecar::spawn_program(&binary, &config(redis.as_ref()), &[HASH_KEY]);
            (redis, Some(sidecar))
        }
    };
    let addr = match (&a.target, &sidecar) {
        (Some(target), _) => tokio::net::lookup_host(target.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot resolve {target}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("{target} resolves to no address")),
        (None, Some(s)) => s.grpc_addr,
        (None, None) => unreachable!("a sidecar is started when there is no target"),
    };
    let what = if a.batch == 0 { "Admit".to_string() } else { format!("AdmitBatch of {}", a.batch) };
    let store = match (&a.target, a.store) {
        (Some(t), _) => format!("the sidecar at {t}"),
        (None, Backend::Memory) => "tiergate on memory".into(),
        (None, Backend::Redis) => format!("tiergate on {}", redis_version(redis.as_ref().unwrap())),
    };
    println!(
        "{what} on {store}: {} callers over {} connections, {} portfolio(s), {}s after {}s of warm-up",
        a.callers,
        a.connections(),
        a.portfolios,
        a.seconds,
        a.warmup
    );

    let mut connections = Vec::new();
    for _ in 0..a.connections() {
        connections.push(client(addr).await);
    }
    let from = Instant::now() + Duration::from_secs_f64(a.warmup);
    let plan = Arc::new(Plan {
        batch: a.batch,
        portfolios: a.portfolios,
        token: a.token.clone(),
        seed: u128::from(rand::random::<u64>()) % NUMBERS,
        next: AtomicU64::new(0),
        from,
        until: from + Duration::from_secs_f64(a.seconds),
    });
    let callers: Vec<_> = (0..a.callers)
        .map(|i| tokio::spawn(caller(connections[i % connections.len()].clone(), plan.clone())))
        .collect();
    let watched = processes(sidecar.as_ref(), redis.as_ref());
    let pids: Vec<u32> = watched.iter().map(|(_, pid)| *pid).collect();
    let cpu_from = tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        pids.into_iter().map(cpu).collect::<Vec<_>>()
    });
    let mut tally = Tally::new();
    for c in callers {
        tally.add(c.await.unwrap());
    }
    let cpu_used: Vec<_> = watched
        .iter()
        .zip(cpu_from.await.unwrap())
        .map(|((name, pid), (on, waiting))| {
            let (on_now, waiting_now) = cpu(*pid);
            (*name, on_now.saturating_sub(on), waiting_now.saturating_sub(waiting))
        })
        .collect();
    let (rss, peak) = sidecar.as_ref().map(|s| memory_kb(s.pid())).unwrap_or((0, 0));
    drop(sidecar);
    drop(redis);

    let elapsed = tally.last_end.map(|end| end.duration_since(from).as_secs_f64()).unwrap_or(a.seconds);
    let calls = tally.latency.len();
    let (decisions_s, calls_s) = (tally.decisions as f64 / elapsed, calls as f64 / elapsed);
    let q = |q: f64| tally.latency.value_at_quantile(q);
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "  {decisions_s:.0} decisions/s, {calls_s:.0} calls/s ({} decisions in {calls} calls over {elapsed:.1}s; {} not NEW_RECIPIENT, {} errors)",
        tally.decisions, tally.not_new, tally.errors
    );
    println!(
        "  per call: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        ms(q(0.5)),
        ms(q(0.9)),
        ms(q(0.99)),
        ms(q(0.999)),
        ms(tally.latency.max())
    );
    let per_decision = |cpu: Duration| cpu.as_nanos() as f64 / 1000.0 / tally.decisions.max(1) as f64;
    let cpu_line: Vec<String> = cpu_used
        .iter()
        .map(|(name, on, waiting)| {
            format!(
                "{name} {:.1}s (+{:.1}s waiting), {:.1} µs per decision",
                on.as_secs_f64(),
                waiting.as_secs_f64(),
                per_decision(*on)
            )
        })
        .collect();
    println!("  CPU: {}", cpu_line.join("; "));
    if let Some(e) = &tally.first_error {
        println!("  first error: {e}");
    }
    if sidecar_started(a) {
        println!(
            "  sidecar memory: {:.1} MB resident at the end, {:.1} MB at its peak",
            rss as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
    println!(
        "RESULT label={} kind=tiergate store={} batch={} callers={} connections={} portfolios={} decisions_per_s={decisions_s:.0} \
         calls_per_s={calls_s:.0} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} rss_kb={rss} hwm_kb={peak} errors={} not_new={} {}",
        a.label(),
        if a.target.is_some() { "target".into() } else { format!("{:?}", a.store).to_lowercase() },
        a.batch,
        a.callers,
        a.connections(),
        a.portfolios,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        tally.latency.max(),
        tally.errors,
        tally.not_new,
        cpu_used
            .iter()
            .map(|(name, on, _)| format!("{}_cpu_ns={:.0}", name.replace(['-', ' '], "_"), per_decision(*on) * 1000.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn sidecar_started(a: &Args) -> bool {
    a.target.is_none()
}

fn redis_version(server: &RedisServer) -> String {
    let info = server.cli(&["INFO", "server"]);
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("?").trim();
    format!("Redis {version}")
}

/// redis-benchmark of the equivalent one-recipient EVALSHA on a redis-server of its own.
fn ceiling(a: &Args) {
    let redis = RedisServer::start();
    let sha = redis.cli(&["SCRIPT", "LOAD", CEILING_SCRIPT]);
    println!(
        "redis-benchmark of one-recipient EVALSHA (TIME, trim, ZSCORE, ZCARD, ZADD) on {}: {} clients, pipeline {}, {} requests",
        redis_version(&redis),
        a.callers,
        a.pipeline,
        a.requests
    );
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &redis.port().to_string()])
        .args(["-c", &a.callers.to_string(), "-P", &a.pipeline.to_string(), "-n", &a.requests.to_string()])
        // Random recipients: redis-benchmark puts a number below 10^9 for every __rand_int__.
        .args(["-r", "1000000000", "--csv", "EVALSHA", &sha, "1", "tg:{bench}:w", "__rand_int__", WINDOW_US])
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-benchmark (install redis-tools): {e}"));
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "redis-benchmark failed: {csv}{}", String::from_utf8_lossy(&out.stderr));
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let row = csv.lines().find(|l| l.starts_with("\"EVALSHA")).unwrap_or_else(|| panic!("no result in {csv}"));
    let fields: Vec<f64> = row.split("\",\"").skip(1).map(|f| f.trim_matches('"').parse().unwrap_or(0.0)).collect();
    let us = |ms: f64| (ms * 1000.0).round() as u64;
    let (rps, p50, p99, max) = (fields[0], fields[3], fields[5], fields[6]);
    println!("  {rps:.0} decisions/s; per command: p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms");
    let count = redis.cli(&["ZCARD", "tg:{bench}:w"]);
    println!("  {count} distinct recipients counted");
    println!(
        "RESULT label={} kind=ceiling store=redis batch=0 callers={} pipeline={} decisions_per_s={rps:.0} calls_per_s={rps:.0} \
         p50_us={} p99_us={} max_us={}",
        a.label(),
        a.callers,
        a.pipeline,
        us(p50),
        us(p99),
        us(max)
    );
}
