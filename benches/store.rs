//! Store figures: Redis memory per tracked recipient, in the compact window and in the sorted set
//! the previous version kept (the same recipients and scores, side by side), and Admit latency and
//! throughput on each backend. Prints numbers; asserts nothing. Run with `cargo bench --bench store`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ops::{params, portfolio as scope};
use common::redis::{require_redis, RedisServer};
use common::stores::{redis_options, shared_redis, standalone};
use tiergate::policy::{Reason, ScopeKey, Tier};
use tiergate::store::memory::MemoryStore;
use tiergate::store::redis::{RedisOptions, RedisStore};
use tiergate::store::{AdmitOp, Store, Windows};

/// Recipients per window measured, and whether the tier is unlimited.
const SIZES: [(usize, bool); 5] = [(250, false), (2_000, false), (10_000, false), (100_000, false), (1_000_000, true)];

/// A utility message to the `i`th recipient.
fn op(i: usize) -> AdmitOp {
    common::ops::op(&format!("1555{i:08}"))
}

/// A store on `server` that waits longer than the tests' stores, for batches of 1,000.
fn redis_store(server: &RedisServer) -> Arc<dyn Store> {
    let options = redis_options(standalone(server), Windows::default(), "tg");
    Arc::new(RedisStore::new(RedisOptions { timeout: Duration::from_secs(5), ..options }).unwrap())
}

/// Admits recipients `from..to` in batches of 1,000; returns each counted one's (hash, score).
async fn fill(store: &dyn Store, s: &ScopeKey, tier: &Tier, from: usize, to: usize) -> Vec<(Vec<u8>, u64)> {
    let mut counted = Vec::with_capacity(to - from);
    for chunk in (from..to).collect::<Vec<_>>().chunks(1_000) {
        let ops: Vec<_> = chunk.iter().map(|&i| op(i)).collect();
        let got = store.admit(s, &params(tier), &ops).await.unwrap();
        for (a, op) in got.iter().zip(ops) {
            assert_eq!(a.reason, Reason::NewRecipient);
            counted.push((op.member, a.lease_score.expect("a lease for every new recipient")));
        }
    }
    counted
}

/// `MEMORY USAGE` (every field sampled) of each key.
fn memory_usage(conn: &mut redis::Connection, keys: &[String]) -> u64 {
    keys.iter()
        .map(|k| redis::cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0).query::<u64>(conn).unwrap())
        .sum()
}

/// Every key of a scope's portfolio (all carry its hash tag).
fn scope_keys(conn: &mut redis::Connection, portfolio: &str) -> Vec<String> {
    let pattern = format!("tg:{{{portfolio}}}*");
    let (mut keys, mut cursor) = (Vec::new(), 0u64);
    loop {
        let (next, batch): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1_000).query(conn).unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys
}

/// The previous layout of the same window: one sorted set of these contacts; returns its key.
fn sorted_set(conn: &mut redis::Connection, portfolio: &str, contacts: &[(Vec<u8>, u64)]) -> String {
    let key = format!("before:{{{portfolio}}}:w");
    for batch in contacts.chunks(1_000) {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(&key);
        for (member, score) in batch {
            zadd.arg(*score).arg(&member[..]);
        }
        zadd.exec(conn).unwrap();
    }
    key
}

/// Sequential single Admits of `ops`: (calls per second, p50, p99).
async fn latency(store: &dyn Store, s: &ScopeKey, tier: &Tier, ops: Vec<AdmitOp>) -> (f64, Duration, Duration) {
    let n = ops.len();
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for op in ops {
        let t = Instant::now();
        store.admit(s, &params(tier), &[op]).await.unwrap();
        samples.push(t.elapsed());
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    samples.sort();
    (rate, samples[n / 2], samples[n * 99 / 100])
}

/// Concurrent single Admits of new recipients from `tasks` tasks into scope `s`: calls per second.
async fn throughput(store: Arc<dyn Store>, s: &ScopeKey, tasks: usize, per_task: usize) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move {
                let tier = Tier::limited("BIG", 10_000_000);
                for i in 0..per_task {
                    store.admit(&s, &params(&tier), &[op(20_000_000 + t * per_task + i)]).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    (tasks * per_task) as f64 / started.elapsed().as_secs_f64()
}

fn print_latency(what: &str, (rate, p50, p99): (f64, Duration, Duration)) {
    println!("{what}: {rate:.0}/s, p50 {p50:.1?}, p99 {p99:.1?}");
}

/// Clears Redis' command statistics and notes its CPU time, so [`script_time`] covers what follows.
fn reset_stats(server: &RedisServer) -> f64 {
    server.cli(&["CONFIG", "RESETSTAT"]);
    redis_cpu(server)
}

/// CPU seconds the Redis process has used (user and system).
fn redis_cpu(server: &RedisServer) -> f64 {
    let info = server.cli(&["INFO", "cpu"]);
    let field = |name: &str| -> f64 {
        info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    };
    field("used_cpu_user:") + field("used_cpu_sys:")
}

/// What Redis spent per script call (EVALSHA) since [`reset_stats`] returned `cpu_before`: CPU
/// time, which other processes on the machine do not inflate, and its own wall-clock time.
fn script_time(server: &RedisServer, cpu_before: f64) -> String {
    let cpu = redis_cpu(server) - cpu_before;
    let stats = server.cli(&["INFO", "commandstats"]);
    let line = stats.lines().find(|l| l.starts_with("cmdstat_evalsha:")).unwrap_or("");
    let field = |name: &str| line.split([':', ',']).find_map(|f| f.strip_prefix(name)).unwrap_or("0");
    let calls: f64 = field("calls=").parse().unwrap_or(0.0);
    format!("{:.1} µs Redis CPU, {} µs in the script per call", cpu * 1e6 / calls.max(1.0), field("usec_per_call="))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    require_redis();
    let server = shared_redis();
    println!("{}", server.cli(&["INFO", "server"]).lines().find(|l| l.starts_with("redis_version")).unwrap_or(""));
    let redis = redis_store(&server);
    let mut conn = redis::Client::open(server.url()).unwrap().get_connection().unwrap();

    println!();
    println!("Redis memory per tracked recipient: MEMORY USAGE (SAMPLES 0) of every key of the scope ÷ recipients.");
    println!(
        "Before: the previous layout, one sorted set of the same recipients and scores (plus the scope's state hash)."
    );
    println!("| recipients | tier | before | after | keys after | filled at |");
    println!("|---:|---|---:|---:|---|---:|");
    for (n, unlimited) in SIZES {
        let portfolio = format!("memory-{n}");
        let s = scope(&portfolio);
        let tier = if unlimited { Tier::unlimited("TIER_UNLIMITED") } else { Tier::limited("TIER", n as u64) };
        let started = Instant::now();
        let contacts = fill(&*redis, &s, &tier, 0, n).await;
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let usage = redis.usage(&s, &tier).await.unwrap().usage;
        assert_eq!(usage.counted, n as u64, "every recipient counted, exactly");
        let keys = scope_keys(&mut conn, &portfolio);
        let after = memory_usage(&mut conn, &keys);
        let before_key = sorted_set(&mut conn, &portfolio, &contacts);
        let state = keys.iter().filter(|k| k.ends_with(":m")).cloned().collect::<Vec<_>>();
        let before = memory_usage(&mut conn, std::slice::from_ref(&before_key)) + memory_usage(&mut conn, &state);
        redis::cmd("DEL").arg(&before_key).exec(&mut conn).unwrap();
        let fields: u64 = redis::cmd("HLEN").arg(format!("tg:{{{portfolio}}}:w")).query(&mut conn).unwrap();
        println!(
            "| {n} | {} | {:.1} B | **{:.1} B** | {} ({fields} fields in the window) | {rate:.0}/s in batches of 1,000 |",
            if unlimited { "unlimited" } else { "limited" },
            before as f64 / n as f64,
            after as f64 / n as f64,
            keys.join(", "),
        );
    }
    println!();

    // Admits into the window of 100,000: new recipients, ones counted again, and denials.
    let big = scope("memory-100000");
    let roomy = Tier::limited("ROOMY", 10_000_000);
    let full = Tier::limited("FULL", 120_000);
    let downgraded = Tier::limited("DOWN", 10_000);
    let runs = [
        ("a new recipient into a window of 100,000", &roomy, (30_000_000..30_020_000).map(op).collect::<Vec<_>>()),
        ("a recipient counted again (ALREADY_COUNTED)", &roomy, (0..20_000).map(|i| op(i * 5)).collect()),
        ("LIMIT_REACHED at the limit (the oldest frees room)", &full, (40_000_000..40_005_000).map(op).collect()),
        (
            "LIMIT_REACHED 110,000 over a limit of 10,000 (the contact at rank 110,000, by the directory's counts)",
            &downgraded,
            (40_000_000..40_005_000).map(op).collect(),
        ),
    ];
    for (what, tier, ops) in runs {
        let cpu = reset_stats(&server);
        let measured = latency(&*redis, &big, tier, ops).await;
        print_latency(&format!("redis: Admit of {what}, one caller ({})", script_time(&server, cpu)), measured);
    }
    println!();

    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new(Windows::default()));
    for (name, store) in [("memory", memory), ("redis", redis)] {
        let ops: Vec<_> = (10_000_000..10_020_000).map(op).collect();
        let limited = Tier::limited("TIER_100K+", 1_000_000);
        let cpu = reset_stats(&server);
        let measured = latency(&*store, &scope("latency"), &limited, ops).await;
        let redis_time = if name == "redis" { format!(" ({})", script_time(&server, cpu)) } else { String::new() };
        print_latency(&format!("{name}: sequential Admit{redis_time}"), measured);
        let cpu = reset_stats(&server);
        let rate = throughput(store.clone(), &scope("throughput"), 32, 1_000).await;
        let redis_time = if name == "redis" { format!(" ({})", script_time(&server, cpu)) } else { String::new() };
        println!("{name}: 32 concurrent callers {rate:.0} Admits/s{redis_time}");
    }
}
