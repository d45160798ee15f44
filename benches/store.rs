//! Store figures: Redis memory per tracked recipient, and admission latency and throughput on
//! each backend. Prints numbers; asserts nothing. Run with `cargo bench --bench store`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ops::{params, portfolio as scope};
use common::redis::{require_redis, RedisServer};
use common::stores::{redis_options, shared_redis, standalone};
use tiergate::policy::{Reason, ScopeKey, Tier};
use tiergate::store::memory::MemoryStore;
use tiergate::store::memory::{Clock, SystemClock};
use tiergate::store::redis::{RedisOptions, RedisStore};
use tiergate::store::{day_of, AdmitOp, Store, Windows};

const RECIPIENTS: usize = 100_000;

/// A utility message to the `i`th recipient.
fn op(i: usize) -> AdmitOp {
    common::ops::op(&format!("1555{i:08}"))
}

/// A store on `server` that waits longer than the tests' stores, for batches of 1,000.
fn redis_store(server: &RedisServer) -> Arc<dyn Store> {
    let options = redis_options(standalone(server), Windows::default(), "tg");
    Arc::new(RedisStore::new(RedisOptions { timeout: Duration::from_secs(5), ..options }).unwrap())
}

/// Admits RECIPIENTS distinct recipients in batches of 1,000; returns how many were reported new.
async fn fill(store: &dyn Store, s: &ScopeKey, tier: &Tier) -> usize {
    let mut new = 0;
    for chunk in (0..RECIPIENTS).collect::<Vec<_>>().chunks(1_000) {
        let ops: Vec<_> = chunk.iter().map(|&i| op(i)).collect();
        let got = store.admit(s, &params(tier), &ops).await.unwrap();
        new += got.iter().filter(|a| a.reason == Reason::NewRecipient).count();
    }
    new
}

/// Sequential single Admits: (calls per second, p50, p99).
async fn latency(store: &dyn Store, s: &ScopeKey, tier: &Tier, n: usize) -> (f64, Duration, Duration) {
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        store.admit(s, &params(tier), &[op(10_000_000 + i)]).await.unwrap();
        samples.push(t.elapsed());
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    samples.sort();
    (rate, samples[n / 2], samples[n * 99 / 100])
}

/// Concurrent single Admits from `tasks` tasks: calls per second.
async fn throughput(store: Arc<dyn Store>, tasks: usize, per_task: usize) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let (s, tier) = (scope("throughput"), Tier::limited("BIG", 10_000_000));
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    require_redis();
    let server = shared_redis();
    println!("{}", server.cli(&["INFO", "server"]).lines().find(|l| l.starts_with("redis_version")).unwrap_or(""));
    let redis = redis_store(&server);

    let limited = Tier::limited("TIER_100K+", 1_000_000);
    let started = Instant::now();
    fill(&*redis, &scope("memory"), &limited).await;
    let fill_time = started.elapsed();
    let bytes: u64 = server.cli(&["MEMORY", "USAGE", "tg:{memory}:w", "SAMPLES", "0"]).parse().unwrap();
    println!(
        "redis window: {RECIPIENTS} recipients in {bytes} bytes = {:.1} bytes per recipient (filled in {fill_time:.2?} with batches of 1000)",
        bytes as f64 / RECIPIENTS as f64
    );
    let unlimited = Tier::unlimited("TIER_UNLIMITED");
    let reported_new = fill(&*redis, &scope("unlimited"), &unlimited).await;
    let today = day_of(SystemClock.now());
    let hll: u64 = server.cli(&["MEMORY", "USAGE", &format!("tg:{{unlimited}}:d:{today}")]).parse().unwrap();
    let counted = redis.usage(&scope("unlimited"), &unlimited).await.unwrap().usage.counted;
    println!("redis unlimited tier: {RECIPIENTS} recipients counted as {counted}; the day's HyperLogLog (7/30-day counts) is {hll} bytes");
    println!(
        "redis unlimited tier: {reported_new} of {RECIPIENTS} distinct recipients reported NEW_RECIPIENT ({:.1}% as ALREADY_COUNTED)",
        100.0 * (RECIPIENTS - reported_new) as f64 / RECIPIENTS as f64
    );

    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new(Windows::default()));
    for (name, store) in [("memory", memory), ("redis", redis)] {
        let (rate, p50, p99) = latency(&*store, &scope("latency"), &limited, 20_000).await;
        println!("{name}: sequential Admit {rate:.0}/s, p50 {p50:.1?}, p99 {p99:.1?}");
        let rate = throughput(store.clone(), 32, 1_000).await;
        println!("{name}: 32 concurrent callers {rate:.0} Admits/s");
    }
}
