//! Bounded state and hostile input, against a real sidecar:
//! - reads create nothing in Redis;
//! - metric label sets stay bounded under reads and denials of random portfolios;
//! - oversized fields and requests are refused, naming the field without echoing it;
//! - the portfolio allow-list (`server.portfolios = "configured"`);
//! - gRPC health follows the store at once.

mod common;

use std::time::{Duration, Instant};

use common::calls::usage;
use common::redis::RedisServer;
use common::requests::{self, SERVICE, UTILITY};
use common::server::{Sidecar, TestServer};
use common::webhooks::sign;
use tiergate::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const LIMITER: &str = "tiergate.v1.Limiter";

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
    assert!(after.contains(r#"tiergate_denials_total{portfolio="_other",reason="OUTSIDE_SERVICE_WINDOW"}"#), "{after}");
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
    // The only key is the deployment's shared policy, recorded when the sidecar started.
    assert_eq!(redis.cli(&["--scan"]), "tg:{policy}");
}

const ALLOW_LIST: &str = r#"
[server]
portfolios = "configured"

[[portfolios]]
id = "acme"
"#;

#[tokio::test]
async fn an_allow_list_answers_not_found_for_portfolios_neither_configured_nor_stored() {
    let server = TestServer::start(ALLOW_LIST).await;
    let mut c = server.client().await;
    assert_eq!(usage(&mut c, "acme", "").await.portfolio_id, "acme");
    let e = c.get_usage(requests::usage("stranger", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().starts_with("portfolio_id: "), "{e:?}");
    assert_eq!(c.get_portfolio(requests::portfolio("stranger")).await.unwrap_err().code(), Code::NotFound);
    let e = c.admit(UTILITY.to("stranger", "s1", "+15550000001")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c.record_inbound(requests::inbound("stranger", "s1", "+15550000001")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let batch = pb::AdmitBatchRequest {
        requests: vec![UTILITY.to("acme", "s1", "+15550000001"), UTILITY.to("stranger", "s1", "+15550000002")],
    };
    let e = c.admit_batch(batch).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().starts_with("requests[1].portfolio_id: "), "{e:?}");
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 0, "the rejected batch recorded nothing");

    // An operator makes a portfolio known by giving the store state for it.
    c.set_tier(requests::set_tier("newco", "", "TIER_2K")).await.unwrap();
    assert_eq!(usage(&mut c, "newco", "").await.limit, 2_000);
    let ok = c.admit(UTILITY.to("newco", "s1", "+15550000001")).await.unwrap().into_inner();
    assert_eq!(ok.reason(), pb::Reason::NewRecipient);

    // By default, any portfolio is served.
    let open = TestServer::start("").await;
    let mut c = open.client().await;
    assert_eq!(usage(&mut c, "stranger", "").await.unique_recipients, 0);
}

#[tokio::test]
async fn oversized_fields_are_refused_naming_the_field_without_echoing_it() {
    let server = TestServer::start("").await;
    let mut c = server.client().await;
    let huge = "T".repeat(1 << 20);
    let e = c.set_tier(requests::set_tier("acme", "", &huge)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", &e.message()[..e.message().len().min(300)]);
    assert!(e.message().len() < 200, "{} bytes: {}", e.message().len(), &e.message()[..300.min(e.message().len())]);
    assert!(e.message().starts_with("tier: "), "{}", e.message());

    let mut long_recipient = UTILITY.to("acme", "s1", &"1".repeat(1 << 20));
    let e = c.admit(long_recipient.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("recipient: ") && e.message().len() < 200, "{}", e.message());
    long_recipient.recipient = "+1 415 555 0100".into();
    long_recipient.portfolio_id = "p".repeat(1 << 20);
    let e = c.admit(long_recipient).await.unwrap_err();
    assert!(e.message().starts_with("portfolio_id: ") && e.message().len() < 200, "{}", e.message());

    let update = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        templates: vec![pb::TemplateUpdate { name: "t".into(), status: "S".repeat(1 << 16), ..Default::default() }],
        ..Default::default()
    };
    let e = c.update_portfolio(update).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("templates[0].status: ") && e.message().len() < 200, "{}", e.message());
}

#[tokio::test]
async fn requests_over_the_size_limit_are_resource_exhausted() {
    // The default limit (4 MiB).
    let server = TestServer::start("").await;
    let mut c = server.client().await;
    let big = UTILITY.template("x").to("acme", "s1", "+15550000001");
    let big = pb::AdmitRequest { template: "x".repeat(5 << 20), ..big };
    let e = c.admit(big).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("server.max_request_bytes"), "{e:?}");
    // The connection still serves.
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 0);

    // A configured limit, on gRPC and on the webhook endpoint of the admin server.
    let secret = "bounded-app-secret";
    let server = TestServer::start(&format!(
        "[server]\nmax_request_bytes = 65536\n[webhooks]\napp_secret = \"{secret}\"\nverify_token = \"v\"\n"
    ))
    .await;
    let mut c = server.client().await;
    let batch = pb::AdmitBatchRequest {
        requests: (0..600).map(|i| UTILITY.template("t").to(&"p".repeat(120), "s1", &format!("+1555{i:07}"))).collect(),
    };
    assert!(prost::Message::encoded_len(&batch) > 65_536);
    assert_eq!(c.admit_batch(batch).await.unwrap_err().code(), Code::ResourceExhausted);
    let body = format!("{{\"entry\":[],\"pad\":\"{}\"}}", "x".repeat(70_000));
    assert_eq!(post_tolerant(server.admin_addr, secret, &body).await, 413);
    assert_eq!(post_tolerant(server.admin_addr, secret, "{\"entry\":[]}").await, 200);
}

/// POSTs a signed webhook delivery and returns the HTTP status, tolerating a server that answers
/// and closes before reading the whole body.
async fn post_tolerant(admin: std::net::SocketAddr, secret: &str, body: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let head = format!(
        "POST /webhooks/whatsapp HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         X-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n",
        sign(secret, body.as_bytes()),
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await.unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status line: {text:?}"))
}

async fn limiter_health(health: &mut HealthClient<tonic::transport::Channel>) -> ServingStatus {
    health.check(HealthCheckRequest { service: LIMITER.into() }).await.unwrap().into_inner().status()
}

fn redis_config(redis: &RedisServer) -> String {
    format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"300ms\"\nhash_key = \"bounded-test-hash-key\"\n",
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_call_failing_unavailable_turns_health_not_serving_before_it_answers() {
    let mut redis = RedisServer::start();
    let server = TestServer::start(&redis_config(&redis)).await;
    let mut c = server.client().await;
    let mut health = HealthClient::new(server.channel().await);
    assert_eq!(
        c.admit(UTILITY.to("acme", "s1", "+15550000001")).await.unwrap().into_inner().reason(),
        pb::Reason::NewRecipient
    );
    assert_eq!(limiter_health(&mut health).await, ServingStatus::Serving);

    redis.kill();
    let e = c.admit(UTILITY.to("acme", "s1", "+15550000002")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // No wait: the failed call flipped health before it answered.
    assert_eq!(limiter_health(&mut health).await, ServingStatus::NotServing);

    redis.restart();
    let started = Instant::now();
    while limiter_health(&mut health).await != ServingStatus::Serving {
        assert!(started.elapsed() < Duration::from_secs(15), "health did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("SERVING again {:?} after Redis came back", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_a_store_outage_without_any_call() {
    let mut redis = RedisServer::start();
    let server = TestServer::start(&redis_config(&redis)).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health.watch(HealthCheckRequest { service: LIMITER.into() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
    redis.kill();
    let started = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.expect("NOT_SERVING in time");
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    // Reported, not asserted: a loaded machine may be slower than the probe interval promises.
    println!("NOT_SERVING {:?} after Redis was killed", started.elapsed());
}
