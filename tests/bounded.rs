//! Bounded state and hostile input, against a real sidecar:
//! - reads create nothing in Redis;
//! - metric label sets stay bounded under reads and denials of random portfolios;

mod common;

use common::calls::usage;
use common::redis::RedisServer;
use common::requests::{self, SERVICE};
use common::server::{Sidecar, TestServer};
use tiergate::pb;

/// The series a Prometheus scrape holds: lines that are neither comments nor blank.
fn series(metrics: &str) -> Vec<&str> {
    metrics.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
}

/// The resident set size of a process, in KiB, as Linux reports it.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_denials_of_random_portfolios_keep_the_metrics_bounded() {
    let sidecar = Sidecar::spawn("[metrics]\nmax_portfolios = 50\n", &[]);
    let mut c = sidecar.client().await;
    let (_, before) = common::server::http_get(sidecar.admin_addr, "/metrics").await;
    let rss_before = rss_kib(sidecar.pid());
    for i in 0..2_000 {
        let id = format!("random-{i:05}-{:08x}", rand_u32(i));
        usage(&mut c, &id, "").await;
        if i % 10 == 0 {
            // A free-form message outside any service window is denied: a counter per portfolio.
            let denied = c.admit(SERVICE.to(&id, "s1", "+15550000001")).await.unwrap().into_inner();
            assert_eq!(denied.reason(), pb::Reason::OutsideServiceWindow);
        }
    }
    let (status, after) = common::server::http_get(sidecar.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    let (n_before, n_after) = (series(&before).len(), series(&after).len());
    println!(
        "/metrics: {n_before} series ({} bytes) before, {n_after} series ({} bytes) after 2,000 random portfolios; \
         RSS {rss_before} KiB before, {} KiB after",
        before.len(),
        after.len(),
        rss_kib(sidecar.pid())
    );
    // 50 portfolios with their own labels, each a handful of gauges and denial counters, plus
    // the fixed metrics: far below one series per portfolio read.
    assert!(n_after < 600, "{n_after} series:\n{after}");
    let labelled: std::collections::BTreeSet<&str> =
        after.lines().filter_map(|l| l.split("portfolio=\"").nth(1)?.split('"').next()).collect();
    assert!(labelled.len() <= 51, "{} portfolio label values: {labelled:?}", labelled.len());
    assert!(after.contains(r#"tiergate_denials_total{portfolio="_other",reason="outside_service_window"}"#), "{after}");
    assert!(after.contains("tiergate_metrics_portfolios_folded_total"), "{after}");
}

/// A cheap deterministic scramble, so ids differ in more than their counter.
fn rand_u32(i: u32) -> u32 {
    i.wrapping_mul(2_654_435_761).rotate_left(13)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_unknown_portfolios_create_no_redis_keys() {
    let redis = RedisServer::start();
    let config = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\nhash_key = \"bounded-test-hash-key\"\n\n\
         [policy]\nscope = \"phone_number\"\nladder = \"legacy\"\n",
        redis.url()
    );
    let server = TestServer::start(&config).await;
    let mut c = server.client().await;
    for i in 0..50 {
        usage(&mut c, &format!("nobody-{i}"), "n1").await;
        c.get_portfolio(requests::portfolio(&format!("nobody-{i}"))).await.unwrap();
    }
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "keys: {}", redis.cli(&["--scan"]));
}
