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
//! `--webhooks` measures the webhook receiver against Admit on one sidecar and store: first Admit
//! as above, then `--clients` HTTP/1.1 keep-alive connections post signed `messages` deliveries
//! of `--statuses` statuses each (60% `delivered`, 30% `read`, 10% `failed`) to the admin
//! server's `/webhooks/whatsapp`, every status naming a recipient admitted in the first phase.
//! Meta sends about three statuses per message, so it prints statuses/s ÷ Admit decisions/s
//! against 3.
//!
//! ```text
//! cargo bench --bench load -- --webhooks [--store memory|redis] [--callers N] [--clients C]
//!     [--statuses S] [--seconds S] [--warmup S] [--label NAME] [--binary PATH]
//! cargo bench --bench load -- --paced [--store memory|redis] [--sidecars K] [--callers N]
//!     [--numbers M] [--mps R] [--max-wait-ms W] [--seconds S] [--warmup S] [--label NAME]
//! ```
//!
//! `--paced` measures the send governor's pacing: `--sidecars` sidecars (more than one only on
//! Redis, all on one redis-server) with `[policy.throughput] enabled = true, default_mps = R`
//! and the pair rate on, and N callers spread over them, each Admit naming the next of M numbers
//! round-robin and a recipient no other message has, with `max_wait = W` ms. An ADMITTED answer
//! counts for its number when it arrives inside the measured seconds; it prints each number's
//! achieved rate and its ratio to R (the target: at most 1.02, and at least 0.98 when the
//! callers keep every number busy), the paced waits and the denials by reason.
//!
//! The last line printed is `RESULT key=value ...`, which `scripts/bench-load` reads.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
use rand::SeedableRng;
use tiergate::pb::limiter_client::LimiterClient;
use tiergate::pb::{self, Reason};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::Channel;

const USAGE: &str = "usage: cargo bench --bench load -- [--store memory|redis | --target HOST:PORT [--token TOKEN]] \
[--callers N] [--connections K] [--batch B] [--portfolios P] [--seconds S] [--warmup S] [--label NAME] \
[--binary PATH]\n       \
cargo bench --bench load -- --ceiling [--callers N] [--pipeline P] [--requests R] [--label NAME]\n       \
cargo bench --bench load -- --webhooks [--store memory|redis] [--callers N] [--clients C] [--statuses S] \
[--seconds S] [--warmup S] [--label NAME] [--binary PATH]\n       \
cargo bench --bench load -- --paced [--store memory|redis] [--sidecars K] [--callers N] [--numbers M] [--mps R] \
[--max-wait-ms W] [--seconds S] [--warmup S] [--label NAME] [--binary PATH]";

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
    webhooks: bool,
    clients: usize,
    statuses: usize,
    paced: bool,
    sidecars: usize,
    numbers: usize,
    mps: u32,
    max_wait_ms: u64,
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
            webhooks: false,
            clients: 8,
            statuses: 100,
            paced: false,
            sidecars: 1,
            numbers: 10,
            mps: 80,
            max_wait_ms: 1000,
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
                "--webhooks" => a.webhooks = true,
                "--clients" => a.clients = number(&flag, value()?)?,
                "--statuses" => a.statuses = number(&flag, value()?)?,
                "--paced" => a.paced = true,
                "--sidecars" => a.sidecars = number(&flag, value()?)?,
                "--numbers" => a.numbers = number(&flag, value()?)?,
                "--mps" => a.mps = number(&flag, value()?)?,
                "--max-wait-ms" => a.max_wait_ms = number(&flag, value()?)?,
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown argument {other}\n{USAGE}")),
            }
        }
        if a.callers == 0 || a.portfolios == 0 || a.pipeline == 0 || a.connections == Some(0) {
            return Err("--callers, --connections, --portfolios and --pipeline are at least 1".into());
        }
        if [a.ceiling, a.webhooks, a.paced].iter().filter(|m| **m).count() > 1 {
            return Err("--ceiling, --webhooks and --paced are separate runs: choose one".into());
        }
        if (a.webhooks || a.paced) && a.target.is_some() {
            return Err("--webhooks and --paced start their own sidecars: --target is for Admit runs".into());
        }
        if a.webhooks && (a.portfolios != 1 || a.clients == 0 || a.statuses == 0) {
            return Err("--webhooks takes one portfolio, and --clients and --statuses of at least 1".into());
        }
        if a.paced && (a.sidecars == 0 || a.numbers == 0 || a.mps == 0) {
            return Err("--sidecars, --numbers and --mps are at least 1".into());
        }
        if a.paced && a.sidecars > 1 && a.store == Backend::Memory {
            return Err("sidecars on memory share nothing: more than one --sidecars needs --store redis".into());
        }
        Ok(a)
    }

    fn connections(&self) -> usize {
        self.connections.unwrap_or(4).min(self.callers)
    }

    fn label(&self) -> String {
        let store = format!("{:?}", self.store).to_lowercase();
        self.label.clone().unwrap_or_else(|| match (self.ceiling, &self.target) {
            (true, _) => format!("ceiling-c{}-P{}", self.callers, self.pipeline),
            _ if self.webhooks => format!("{store}-webhooks-c{}-w{}", self.callers, self.clients),
            _ if self.paced => format!("{store}-paced-s{}-c{}", self.sidecars, self.callers),
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
    if args.webhooks {
        runtime.block_on(webhooks(&args));
    } else if args.paced {
        runtime.block_on(paced(&args));
    } else {
        runtime.block_on(load(&args));
    }
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
        (first..first + n).map(|i| UTILITY.to(&portfolio, SENDER, &format!("+{}", recipient(self.seed, i)))).collect()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    }
}

/// The sending number of the Admit runs.
const SENDER: &str = "bench-sender";

/// The recipient of a run's `i`-th message, as Meta's `recipient_id` writes it (digits, no `+`).
fn recipient(seed: u128, i: u64) -> String {
    format!("1{:010}", (seed + u128::from(i) * STRIDE) % NUMBERS)
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

/// The sidecar's configuration: one unlimited tier, so the limit never decides, and `extra`
/// (more TOML tables) after it.
fn config(redis: Option<&RedisServer>, extra: &str) -> String {
    let store = match redis {
        Some(r) => format!("backend = \"redis\"\nurl = \"{}\"", r.url()),
        None => "backend = \"memory\"".into(),
    };
    format!(
        "[server]\nshutdown_grace = \"1s\"\n\n[store]\n{store}\n\n[policy]\nladder = [{{ name = \"UNLIMITED\" }}]\n{extra}"
    )
}

/// A fresh store for the run (a redis-server of its own, or none for memory) and `count` release
/// sidecars (or `--binary`) on it, each configured with `extra`.
fn start_sidecars(a: &Args, count: usize, extra: &str) -> (Option<RedisServer>, Vec<Sidecar>) {
    let redis = (a.store == Backend::Redis).then(RedisServer::start);
    let binary = a.binary.clone().unwrap_or_else(|| env!("CARGO_BIN_EXE_tiergate").into());
    let config = config(redis.as_ref(), extra);
    let sidecars = (0..count).map(|_| Sidecar::spawn_program(&binary, &config, &[HASH_KEY])).collect();
    (redis, sidecars)
}

/// The store a run started, in words.
fn store_name(a: &Args, redis: Option<&RedisServer>) -> String {
    match (&a.target, redis) {
        (Some(t), _) => format!("the sidecar at {t}"),
        (None, None) => "tiergate on memory".into(),
        (None, Some(r)) => format!("tiergate on {}", redis_version(r)),
    }
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

/// The processes whose CPU time a run reports, by name: this load generator, the sidecars
/// (numbered when there are several) and redis-server.
fn processes(sidecars: &[Sidecar], redis: Option<&RedisServer>) -> Vec<(String, u32)> {
    let mut all = vec![("load generator".to_string(), std::process::id())];
    for (i, s) in sidecars.iter().enumerate() {
        let name = if sidecars.len() == 1 { "sidecar".to_string() } else { format!("sidecar {}", i + 1) };
        all.push((name, s.pid()));
    }
    all.extend(redis.and_then(RedisServer::pid).map(|pid| ("redis-server".to_string(), pid)));
    all
}

/// The CPU time some processes take from an instant on.
struct CpuWatch {
    watched: Vec<(String, u32)>,
    at_from: tokio::task::JoinHandle<Vec<(Duration, Duration)>>,
}

/// One process's CPU time over a measured interval: (name, on a core, waiting for one).
type CpuUsed = (String, Duration, Duration);

impl CpuWatch {
    /// Reads the processes' CPU time at `from`.
    fn from(watched: Vec<(String, u32)>, from: Instant) -> CpuWatch {
        let pids: Vec<u32> = watched.iter().map(|(_, pid)| *pid).collect();
        let at_from = tokio::spawn(async move {
            tokio::time::sleep_until(from.into()).await;
            pids.into_iter().map(cpu).collect::<Vec<_>>()
        });
        CpuWatch { watched, at_from }
    }

    /// What each process took since `from`.
    async fn used(self) -> Vec<CpuUsed> {
        let at_from = self.at_from.await.unwrap();
        self.watched
            .into_iter()
            .zip(at_from)
            .map(|((name, pid), (on, waiting))| {
                let (on_now, waiting_now) = cpu(pid);
                (name, on_now.saturating_sub(on), waiting_now.saturating_sub(waiting))
            })
            .collect()
    }
}

/// `CPU: name 1.2s (+0.3s waiting), 4.5 µs per <unit>; ...`, per one of `count` things done.
fn cpu_line(used: &[CpuUsed], count: u64, unit: &str) -> String {
    let line: Vec<String> = used
        .iter()
        .map(|(name, on, waiting)| {
            format!(
                "{name} {:.1}s (+{:.1}s waiting), {:.1} µs per {unit}",
                on.as_secs_f64(),
                waiting.as_secs_f64(),
                per(*on, count)
            )
        })
        .collect();
    format!("CPU: {}", line.join("; "))
}

/// `name_cpu_ns=...` per one of `count` things done, for a RESULT line.
fn cpu_fields(used: &[CpuUsed], count: u64) -> String {
    used.iter()
        .map(|(name, on, _)| format!("{}_cpu_ns={:.0}", name.replace(['-', ' '], "_"), per(*on, count) * 1000.0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Microseconds of `cpu` per one of `count`.
fn per(cpu: Duration, count: u64) -> f64 {
    cpu.as_nanos() as f64 / 1000.0 / count.max(1) as f64
}

/// Milliseconds, from microseconds.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `p50 ... ms, p90 ..., p99 ..., p99.9 ..., max ...` of a histogram of microseconds.
fn percentiles(h: &Histogram<u64>) -> String {
    let q = |q: f64| ms(h.value_at_quantile(q));
    format!(
        "p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        ms(h.max())
    )
}

/// The gRPC address of the run's sidecar, or of `--target`.
async fn target_addr(a: &Args, sidecar: Option<&Sidecar>) -> SocketAddr {
    match (&a.target, sidecar) {
        (Some(target), _) => tokio::net::lookup_host(target.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot resolve {target}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("{target} resolves to no address")),
        (None, Some(s)) => s.grpc_addr,
        (None, None) => unreachable!("a sidecar is started when there is no target"),
    }
}

/// What the Admit callers of one run saw, and what the processes took meanwhile.
struct Admits {
    tally: Tally,
    plan: Arc<Plan>,
    /// Seconds from the end of the warm-up to the last counted answer.
    elapsed: f64,
    cpu: Vec<CpuUsed>,
}

impl Admits {
    fn decisions_per_s(&self) -> f64 {
        self.tally.decisions as f64 / self.elapsed
    }
}

/// `--callers` closed-loop callers over `--connections` connections to `addr`, for `--warmup`
/// then `--seconds`.
async fn admit_phase(a: &Args, addr: SocketAddr, watched: Vec<(String, u32)>) -> Admits {
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
    let watch = CpuWatch::from(watched, from);
    let mut tally = Tally::new();
    for c in callers {
        tally.add(c.await.unwrap());
    }
    let cpu = watch.used().await;
    let elapsed = tally.last_end.map(|end| end.duration_since(from).as_secs_f64()).unwrap_or(a.seconds);
    Admits { tally, plan, elapsed, cpu }
}

async fn load(a: &Args) {
    let (redis, sidecars) = match &a.target {
        Some(_) => (None, Vec::new()),
        None => start_sidecars(a, 1, ""),
    };
    let sidecar = sidecars.first();
    let addr = target_addr(a, sidecar).await;
    let what = if a.batch == 0 { "Admit".to_string() } else { format!("AdmitBatch of {}", a.batch) };
    println!(
        "{what} on {}: {} callers over {} connections, {} portfolio(s), {}s after {}s of warm-up",
        store_name(a, redis.as_ref()),
        a.callers,
        a.connections(),
        a.portfolios,
        a.seconds,
        a.warmup
    );

    let run = admit_phase(a, addr, processes(&sidecars, redis.as_ref())).await;
    let (rss, peak) = sidecar.map(|s| memory_kb(s.pid())).unwrap_or((0, 0));
    drop(sidecars);
    drop(redis);

    let (tally, elapsed) = (&run.tally, run.elapsed);
    let calls = tally.latency.len();
    let (decisions_s, calls_s) = (run.decisions_per_s(), calls as f64 / elapsed);
    let q = |q: f64| tally.latency.value_at_quantile(q);
    println!(
        "  {decisions_s:.0} decisions/s, {calls_s:.0} calls/s ({} decisions in {calls} calls over {elapsed:.1}s; {} not NEW_RECIPIENT, {} errors)",
        tally.decisions, tally.not_new, tally.errors
    );
    println!("  per call: {}", percentiles(&tally.latency));
    println!("  {}", cpu_line(&run.cpu, tally.decisions, "decision"));
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
        cpu_fields(&run.cpu, tally.decisions)
    );
}

fn sidecar_started(a: &Args) -> bool {
    a.target.is_none()
}

/// The webhook secrets of the `--webhooks` run's sidecar.
const APP_SECRET: &str = "bench-app-secret";
const VERIFY_TOKEN: &str = "bench-verify-token";

/// One keep-alive HTTP/1.1 connection, as Meta's webhook client keeps one to the receiver.
struct HttpConnection {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

impl HttpConnection {
    fn new(addr: SocketAddr) -> HttpConnection {
        HttpConnection { addr, stream: None }
    }

    /// POSTs `body` to `path`: (status, response body). Connects on first use, and again after
    /// an error or a `Connection: close`.
    async fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<(u16, String)> {
        let answer = self.exchange(path, headers, body).await;
        if !matches!(answer, Ok((_, _, true))) {
            self.stream = None;
        }
        answer.map(|(status, body, _)| (status, body))
    }

    /// One request and its response on the open connection: (status, body, whether it stays open).
    async fn exchange(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, String, bool)> {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(BufReader::new(stream));
        }
        let stream = self.stream.as_mut().expect("connected above");
        let mut request = format!("POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n", self.addr, body.len());
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let mut request = request.into_bytes();
        request.extend_from_slice(body);
        stream.get_mut().write_all(&request).await?;

        let mut line = String::new();
        stream.read_line(&mut line).await?;
        let status = line.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| invalid("no status line"))?;
        let (mut length, mut open) = (None, true);
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Err(invalid("connection closed in the response's head"));
            }
            let Some((name, value)) = line.trim_end().split_once(':') else { break };
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("connection") {
                open = !value.trim().eq_ignore_ascii_case("close");
            }
        }
        let mut response = vec![0; length.ok_or_else(|| invalid("no Content-Length"))?];
        stream.read_exact(&mut response).await?;
        Ok((status, String::from_utf8_lossy(&response).into_owned(), open))
    }
}

/// What the webhook clients share: the recipients admitted before, and the measured interval.
struct Deliveries {
    portfolio: String,
    seed: u128,
    /// Messages `0..admitted` of the Admit phase were sent.
    admitted: u64,
    statuses: usize,
    from: Instant,
    until: Instant,
}

impl Deliveries {
    /// A signed `messages` delivery, as Meta sends it, of `statuses` statuses of messages the Admit
    /// phase admitted: 60% `delivered`, 30% `read` and 10% `failed`, timestamped now.
    fn next(&self, rng: &mut impl rand::Rng, serial: u64) -> (String, String) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let mut body = String::with_capacity(400 + self.statuses * 360);
        body.push_str(&format!(
            "{{\"object\":\"whatsapp_business_account\",\"entry\":[{{\"id\":\"{}\",\"changes\":[{{\"value\":\
             {{\"messaging_product\":\"whatsapp\",\"metadata\":{{\"display_phone_number\":\"15550783881\",\
             \"phone_number_id\":\"{SENDER}\"}},\"statuses\":[",
            self.portfolio
        ));
        for k in 0..self.statuses {
            let to = recipient(self.seed, rng.random_range(0..self.admitted));
            let id = format!("wamid.HBgL{serial:012}{k:03}");
            if k > 0 {
                body.push(',');
            }
            let status = match rng.random_range(0..10) {
                0..=5 => "delivered",
                6..=8 => "read",
                _ => "failed",
            };
            body.push_str(&format!(
                "{{\"id\":\"{id}\",\"status\":\"{status}\",\"timestamp\":\"{now}\",\"recipient_id\":\"{to}\""
            ));
            match status {
                "failed" => body.push_str(
                    ",\"errors\":[{\"code\":131026,\"title\":\"Message undeliverable\",\
                     \"message\":\"Message undeliverable\",\"error_data\":{\"details\":\"Message Undeliverable.\"}}]}",
                ),
                _ => body.push_str(&format!(
                    ",\"conversation\":{{\"id\":\"c{serial:012}{k:03}\",\"origin\":{{\"type\":\"utility\"}}}},\
                     \"pricing\":{{\"billable\":true,\"pricing_model\":\"PMP\",\"category\":\"utility\",\"type\":\"regular\"}}}}"
                )),
            }
        }
        body.push_str("]},\"field\":\"messages\"}]}]}");
        let signature = tiergate::webhooks::signature(APP_SECRET.as_bytes(), body.as_bytes());
        (body, signature)
    }
}

/// What one webhook client saw while measuring.
struct DeliveryTally {
    /// Microseconds per delivery answered 200.
    latency: Histogram<u64>,
    statuses: u64,
    /// Store changes the receiver reported making ("applied N changes").
    applied: u64,
    errors: u64,
    first_error: Option<String>,
    last_end: Option<Instant>,
}

impl DeliveryTally {
    fn new() -> DeliveryTally {
        DeliveryTally {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            statuses: 0,
            applied: 0,
            errors: 0,
            first_error: None,
            last_end: None,
        }
    }

    fn add(&mut self, other: DeliveryTally) {
        self.latency.add(&other.latency).unwrap();
        self.statuses += other.statuses;
        self.applied += other.applied;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.last_end = self.last_end.max(other.last_end);
    }
}

/// One closed-loop webhook client on its own connection: the next delivery is posted when the
/// last one is answered. Building and signing a body is not part of its latency.
async fn webhook_client(admin: SocketAddr, plan: Arc<Deliveries>, client: u64) -> DeliveryTally {
    let mut tally = DeliveryTally::new();
    let mut connection = HttpConnection::new(admin);
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random::<u64>() ^ client);
    for serial in (client << 40).. {
        let (body, signature) = plan.next(&mut rng, serial);
        let headers = [("Content-Type", "application/json"), ("X-Hub-Signature-256", signature.as_str())];
        let started = Instant::now();
        if started >= plan.until {
            break;
        }
        let answer = connection.post("/webhooks/whatsapp", &headers, body.as_bytes()).await;
        let took = started.elapsed();
        if started < plan.from {
            continue;
        }
        match answer {
            Ok((200, text)) => {
                tally.latency.saturating_record(took.as_micros().max(1) as u64);
                tally.statuses += plan.statuses as u64;
                let applied = text.strip_prefix("applied ").and_then(|t| t.split(' ').next());
                tally.applied += applied.and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
            Ok((status, text)) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| format!("HTTP {status}: {}", text.trim()));
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        tally.last_end = Some(Instant::now());
    }
    tally
}

/// Admit, then status webhooks, on one sidecar and store; the ratio of their rates.
async fn webhooks(a: &Args) {
    let secrets = format!("\n[webhooks]\napp_secret = \"{APP_SECRET}\"\nverify_token = \"{VERIFY_TOKEN}\"\n");
    let (redis, sidecars) = start_sidecars(a, 1, &secrets);
    let sidecar = &sidecars[0];
    let store = store_name(a, redis.as_ref());
    println!(
        "Admit, then status webhooks, on {store}: Admit from {} callers over {} connections, then signed `messages` \
         deliveries of {} statuses from {} HTTP/1.1 keep-alive clients; each {}s after {}s of warm-up",
        a.callers,
        a.connections(),
        a.statuses,
        a.clients,
        a.seconds,
        a.warmup
    );
    let admits = admit_phase(a, sidecar.grpc_addr, processes(&sidecars, redis.as_ref())).await;
    let admit_s = admits.decisions_per_s();
    let sent = admits.plan.next.load(Ordering::Relaxed);
    assert!(sent > 0, "no Admit was sent, so no status can name an admitted recipient");
    println!(
        "  Admit: {admit_s:.0} decisions/s ({} decisions over {:.1}s; {} not NEW_RECIPIENT, {} errors); per call: {}",
        admits.tally.decisions,
        admits.elapsed,
        admits.tally.not_new,
        admits.tally.errors,
        percentiles(&admits.tally.latency)
    );
    println!("    {}", cpu_line(&admits.cpu, admits.tally.decisions, "decision"));

    let from = Instant::now() + Duration::from_secs_f64(a.warmup);
    let plan = Arc::new(Deliveries {
        portfolio: "bench-0".into(),
        seed: admits.plan.seed,
        admitted: sent,
        statuses: a.statuses,
        from,
        until: from + Duration::from_secs_f64(a.seconds),
    });
    let clients: Vec<_> =
        (0..a.clients as u64).map(|i| tokio::spawn(webhook_client(sidecar.admin_addr, plan.clone(), i))).collect();
    let watch = CpuWatch::from(processes(&sidecars, redis.as_ref()), from);
    let mut tally = DeliveryTally::new();
    for c in clients {
        tally.add(c.await.unwrap());
    }
    let cpu = watch.used().await;
    let (_, peak) = memory_kb(sidecar.pid());
    drop(sidecars);
    drop(redis);

    let elapsed = tally.last_end.map(|end| end.duration_since(from).as_secs_f64()).unwrap_or(a.seconds);
    let deliveries = tally.latency.len();
    let (statuses_s, deliveries_s) = (tally.statuses as f64 / elapsed, deliveries as f64 / elapsed);
    println!(
        "  webhooks: {statuses_s:.0} statuses/s, {deliveries_s:.0} deliveries/s ({} statuses in {deliveries} deliveries \
         over {elapsed:.1}s, {} store changes; {} errors); per delivery: {}",
        tally.statuses,
        tally.applied,
        tally.errors,
        percentiles(&tally.latency)
    );
    println!("    {}", cpu_line(&cpu, tally.statuses, "status"));
    for e in [&admits.tally.first_error, &tally.first_error].into_iter().flatten() {
        println!("  first error: {e}");
    }
    let ratio = if admit_s > 0.0 { statuses_s / admit_s } else { 0.0 };
    let verdict = if ratio >= 3.0 { "PASS" } else { "MISS" };
    println!(
        "  statuses/s ÷ Admit decisions/s: {ratio:.2} (target >= 3): {verdict}; sidecar peak RSS {:.1} MB",
        peak as f64 / 1024.0
    );
    let q = |q: f64| tally.latency.value_at_quantile(q);
    println!(
        "RESULT label={} kind=webhooks store={} callers={} clients={} statuses={} admits_per_s={admit_s:.0} \
         statuses_per_s={statuses_s:.0} deliveries_per_s={deliveries_s:.0} ratio={ratio:.2} verdict={verdict} \
         p50_us={} p90_us={} p99_us={} p999_us={} max_us={} applied={} errors={} admit_errors={} hwm_kb={peak} {}",
        a.label(),
        format!("{:?}", a.store).to_lowercase(),
        a.callers,
        a.clients,
        a.statuses,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        tally.latency.max(),
        tally.applied,
        tally.errors,
        admits.tally.errors,
        cpu_fields(&cpu, tally.statuses)
    );
}

/// What the paced callers share: which number and recipient come next, and the measured interval.
struct Paced {
    numbers: usize,
    max_wait: Duration,
    seed: u128,
    next: AtomicU64,
    from: Instant,
    until: Instant,
}

impl Paced {
    /// The sending number of message `i`: round-robin over the run's numbers.
    fn number(&self, i: u64) -> usize {
        (i % self.numbers as u64) as usize
    }

    fn sender(number: usize) -> String {
        format!("bench-number-{number:02}")
    }
}

/// What one paced caller saw: answers counted by when they arrived, inside the measured interval.
struct PacedTally {
    /// ADMITTED answers per number.
    admitted: Vec<u64>,
    /// Microseconds each ADMITTED answer says it was held (`waited`, 0 when it went at once).
    waited: Histogram<u64>,
    /// Microseconds per call, held time included.
    latency: Histogram<u64>,
    denied: BTreeMap<String, u64>,
    /// ADMITTED answers whose reason is not NEW_RECIPIENT: none unless the run is broken.
    not_new: u64,
    errors: u64,
    first_error: Option<String>,
}

impl PacedTally {
    fn new(numbers: usize) -> PacedTally {
        PacedTally {
            admitted: vec![0; numbers],
            waited: Histogram::new_with_bounds(1, 120_000_000, 3).unwrap(),
            latency: Histogram::new_with_bounds(1, 120_000_000, 3).unwrap(),
            denied: BTreeMap::new(),
            not_new: 0,
            errors: 0,
            first_error: None,
        }
    }

    fn add(&mut self, other: &PacedTally) {
        for (mine, theirs) in self.admitted.iter_mut().zip(&other.admitted) {
            *mine += theirs;
        }
        self.waited.add(&other.waited).unwrap();
        self.latency.add(&other.latency).unwrap();
        for (reason, n) in &other.denied {
            *self.denied.entry(reason.clone()).or_default() += n;
        }
        self.not_new += other.not_new;
        self.errors += other.errors;
        self.first_error = self.first_error.clone().or(other.first_error.clone());
    }
}

/// One closed-loop paced caller: each Admit names the next number and a new recipient, with
/// `max_wait`, and the next starts when it is answered (held or not).
async fn paced_caller(mut client: LimiterClient<Channel>, plan: Arc<Paced>) -> PacedTally {
    let mut tally = PacedTally::new(plan.numbers);
    let max_wait = prost_types::Duration::try_from(plan.max_wait).unwrap();
    loop {
        let started = Instant::now();
        if started >= plan.until {
            return tally;
        }
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        let number = plan.number(i);
        let mut request = UTILITY.to("bench-0", &Paced::sender(number), &format!("+{}", recipient(plan.seed, i)));
        request.max_wait = Some(max_wait);
        let answer = client.admit(request).await;
        let arrived = Instant::now();
        if arrived < plan.from || arrived >= plan.until {
            continue;
        }
        match answer.map(tonic::Response::into_inner) {
            Ok(r) if r.decision() == pb::Decision::Admitted => {
                tally.admitted[number] += 1;
                let waited = r.waited.and_then(|w| Duration::try_from(w).ok()).unwrap_or_default();
                tally.waited.saturating_record(waited.as_micros() as u64);
                tally.latency.saturating_record(arrived.duration_since(started).as_micros().max(1) as u64);
                tally.not_new += u64::from(r.reason() != Reason::NewRecipient);
            }
            Ok(r) => *tally.denied.entry(r.reason().as_str_name().to_string()).or_default() += 1,
            Err(status) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
}

/// `--sidecars` sidecars pacing `--numbers` numbers at `--mps` each, for `--callers` callers.
async fn paced(a: &Args) {
    let governor = format!(
        "\n[policy.throughput]\nenabled = true\ndefault_mps = {}\n\n[policy.pair_rate]\nenabled = true\n",
        a.mps
    );
    let (redis, sidecars) = start_sidecars(a, a.sidecars, &governor);
    println!(
        "Paced Admit on {}: {} sidecar(s), {} callers spread over them, {} numbers at {} messages/s each \
         (pair rate on, every recipient new), max_wait {} ms; {}s after {}s of warm-up",
        store_name(a, redis.as_ref()),
        a.sidecars,
        a.callers,
        a.numbers,
        a.mps,
        a.max_wait_ms,
        a.seconds,
        a.warmup
    );
    // One connection per caller, callers dealt to the sidecars in turn.
    let mut connections = Vec::new();
    for i in 0..a.callers {
        connections.push(client(sidecars[i % sidecars.len()].grpc_addr).await);
    }
    let from = Instant::now() + Duration::from_secs_f64(a.warmup);
    let plan = Arc::new(Paced {
        numbers: a.numbers,
        max_wait: Duration::from_millis(a.max_wait_ms),
        seed: u128::from(rand::random::<u64>()) % NUMBERS,
        next: AtomicU64::new(0),
        from,
        until: from + Duration::from_secs_f64(a.seconds),
    });
    let callers: Vec<_> = connections.into_iter().map(|c| tokio::spawn(paced_caller(c, plan.clone()))).collect();
    let watch = CpuWatch::from(processes(&sidecars, redis.as_ref()), from);
    let mut per_sidecar = vec![0u64; sidecars.len()];
    let mut tally = PacedTally::new(a.numbers);
    for (i, c) in callers.into_iter().enumerate() {
        let t = c.await.unwrap();
        per_sidecar[i % sidecars.len()] += t.admitted.iter().sum::<u64>();
        tally.add(&t);
    }
    let cpu = watch.used().await;
    drop(sidecars);
    drop(redis);

    let admitted: u64 = tally.admitted.iter().sum();
    let rates: Vec<f64> = tally.admitted.iter().map(|n| *n as f64 / a.seconds).collect();
    let ratios: Vec<f64> = rates.iter().map(|r| r / f64::from(a.mps)).collect();
    let (min, max) = ratios.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    println!("  number           admitted  messages/s  ratio to {}", a.mps);
    for (number, (n, (rate, ratio))) in tally.admitted.iter().zip(rates.iter().zip(&ratios)).enumerate() {
        println!("  {:<16} {n:>8}  {rate:>10.1}  {ratio:>8.3}", Paced::sender(number));
    }
    let held = if max <= 1.02 { "PASS" } else { "MISS" };
    let kept = if min >= 0.98 { "PASS" } else { "MISS" };
    println!(
        "  per number: max {max:.3}× (target <= 1.02: {held}), min {min:.3}× (target >= 0.98: {kept}); \
         {admitted} admitted in {}s, {:.0} messages/s in all",
        a.seconds,
        admitted as f64 / a.seconds
    );
    println!("  waited (paced hold, per ADMITTED): {}", percentiles(&tally.waited));
    println!("  per call, held time included: {}", percentiles(&tally.latency));
    let denied: Vec<String> = tally.denied.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
    println!(
        "  denied: {}; {} admitted other than NEW_RECIPIENT; {} errors",
        if denied.is_empty() { "none".to_string() } else { denied.join(", ") },
        tally.not_new,
        tally.errors
    );
    if per_sidecar.len() > 1 {
        let shares: Vec<String> = per_sidecar.iter().enumerate().map(|(i, n)| format!("{}: {n}", i + 1)).collect();
        println!("  admitted through sidecar {}", shares.join(", "));
    }
    println!("  {}", cpu_line(&cpu, admitted, "admitted message"));
    if let Some(e) = &tally.first_error {
        println!("  first error: {e}");
    }
    let wq = |q: f64| tally.waited.value_at_quantile(q);
    println!(
        "RESULT label={} kind=paced store={} sidecars={} callers={} numbers={} mps={} max_wait_ms={} admitted={admitted} \
         min_ratio={min:.3} max_ratio={max:.3} held={held} kept={kept} waited_p50_us={} waited_p90_us={} \
         waited_p99_us={} waited_max_us={} denied={} errors={} {}",
        a.label(),
        format!("{:?}", a.store).to_lowercase(),
        a.sidecars,
        a.callers,
        a.numbers,
        a.mps,
        a.max_wait_ms,
        wq(0.5),
        wq(0.9),
        wq(0.99),
        tally.waited.max(),
        tally.denied.values().sum::<u64>(),
        tally.errors,
        cpu_fields(&cpu, admitted)
    );
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
