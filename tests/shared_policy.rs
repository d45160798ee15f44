//! Sidecars that disagree cannot corrupt each other: real `tiergate` processes on a real Redis,
//! where the first records the shared policy and one whose configuration differs refuses to
//! serve, says why, and serves again only once the policy is changed on purpose.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::calls::usage;
use common::redis::RedisServer;
use common::requests::{self, UTILITY};
use common::server::{http_get, Sidecar};
use tiergate::pb::Reason;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const HASH_KEY: &str = "shared-policy-key-0123456789";

fn config(redis: &RedisServer, policy: &str, portfolios: &str) -> String {
    format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"300ms\"\n\n[policy]\n\
         ladder = [{{ name = \"T5\", limit = 5 }}, {{ name = \"T50\", limit = 50 }}]\n{policy}\n{portfolios}",
        redis.url()
    )
}

fn spawn(config: &str, hash_key: &str) -> Sidecar {
    Sidecar::spawn(config, &[("TIERGATE_STORE_HASH_KEY", hash_key)])
}

async fn health(sidecar: &Sidecar) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", sidecar.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = HealthCheckRequest { service: "tiergate.v1.Limiter".into() };
    HealthClient::new(channel).check(request).await.unwrap().into_inner().status()
}

/// Asserts that `sidecar` refuses to serve: /readyz, gRPC health and every call say so, and the
/// message names each of `differences`.
async fn assert_refuses(sidecar: &Sidecar, differences: &[&str]) {
    let (status, body) = http_get(sidecar.admin_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    for d in differences {
        assert!(body.contains(d), "/readyz names `{d}`: {body}");
    }
    // gRPC health follows on the sidecar's next health probe.
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(sidecar).await != ServingStatus::NotServing {
        assert!(Instant::now() < deadline, "gRPC health reports NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = sidecar.client().await;
    let e = c.admit(UTILITY.to("acme", "sender-1", "+15550000099")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for d in differences {
        assert!(e.message().contains(d), "the refusal names `{d}`: {}", e.message());
    }
    let e = c.get_usage(requests::usage("acme", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(policy_mismatch(sidecar).await, "1", "the alert's gauge");
}

async fn assert_ready(sidecar: &Sidecar) {
    let (status, body) = http_get(sidecar.admin_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(policy_mismatch(sidecar).await, "0");
}

/// The value of `tiergate_store_policy_mismatch` in the sidecar's scrape.
async fn policy_mismatch(sidecar: &Sidecar) -> String {
    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    let line = metrics.lines().find(|l| l.starts_with("tiergate_store_policy_mismatch "));
    line.and_then(|l| l.split(' ').nth(1)).unwrap_or_else(|| panic!("no policy mismatch gauge:\n{metrics}")).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_another_window_refuses_to_serve_and_cannot_trim_the_shared_window() {
    let redis = RedisServer::start();
    let first = spawn(&config(&redis, "window = \"24h\"", ""), HASH_KEY);
    let mut a = first.client().await;
    for i in 0..3 {
        a.admit(UTILITY.to("acme", "sender-1", &format!("+1555000000{i}"))).await.unwrap();
    }
    assert_ready(&first).await;

    let short = spawn(&config(&redis, "window = \"1h\"", ""), HASH_KEY);
    assert_refuses(&short, &["policy.window: this sidecar 1h, the store 24h"]).await;
    assert!(short.log().contains("policy.window: this sidecar 1h, the store 24h"), "{}", short.log());

    // The first sidecar's contacts are whole and it still serves.
    assert_eq!(usage(&mut a, "acme", "").await.unique_recipients, 3);
    assert_ready(&first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_another_hash_key_refuses_so_an_opt_out_is_never_missed() {
    let redis = RedisServer::start();
    let cfg = config(&redis, "", "");
    let first = spawn(&cfg, HASH_KEY);
    let mut a = first.client().await;
    a.set_opt_out(tiergate::pb::SetOptOutRequest {
        portfolio_id: "acme".into(),
        recipient: "+15550000001".into(),
        opted_out: true,
    })
    .await
    .unwrap();

    let other_key = "another-hash-key-0123456789";
    let other = spawn(&cfg, other_key);
    assert_refuses(&other, &["store.hash_key: this sidecar digest "]).await;
    // Under its own key it would not have seen the opt-out: it sends nothing at all.
    let mut b = other.client().await;
    let e = b.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // The keys themselves appear nowhere.
    let (_, body) = http_get(other.admin_addr, "/readyz").await;
    for secret in [HASH_KEY, other_key] {
        assert!(!body.contains(secret) && !e.message().contains(secret) && !other.log().contains(secret));
    }
    let recorded = redis.cli(&["GET", "tg:{policy}"]);
    assert!(!recorded.contains(HASH_KEY), "{recorded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_portfolio_tiers_that_differ_are_named() {
    let redis = RedisServer::start();
    let acme = |tier: &str| format!("[[portfolios]]\nid = \"acme\"\ntier = \"{tier}\"\n");
    let first = spawn(&config(&redis, "", &acme("T50")), HASH_KEY);
    assert_ready(&first).await;
    let second = spawn(&config(&redis, "", &acme("T5")), HASH_KEY);
    assert_refuses(&second, &["portfolios.acme.tier: this sidecar T5, the store T50"]).await;
    let third = spawn(&config(&redis, "", ""), HASH_KEY);
    assert_refuses(&third, &["portfolios.acme.tier: this sidecar not set, the store T50"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_policy_changes_the_shared_policy_on_purpose() {
    let redis = RedisServer::start();
    let old = config(&redis, "window = \"24h\"", "");
    let new = config(&redis, "window = \"12h\"", "");
    let first = spawn(&old, HASH_KEY);
    let mut a = first.client().await;
    let admitted = a.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap().into_inner();
    assert_eq!(admitted.reason(), Reason::NewRecipient);
    let second = spawn(&new, HASH_KEY);
    assert_refuses(&second, &["policy.window: this sidecar 12h, the store 24h"]).await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.toml");
    std::fs::write(&path, &new).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["store", "set-policy", "--config", path.to_str().unwrap()])
        .env("TIERGATE_STORE_HASH_KEY", HASH_KEY)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("policy.window: 24h -> 12h"), "{printed}");

    // The new policy holds: the second sidecar serves, the first (still on the old one) refuses
    // from its next health probe, and no contact was lost.
    assert_ready(&second).await;
    let mut b = second.client().await;
    assert_eq!(usage(&mut b, "acme", "").await.unique_recipients, 1);
    assert_refuses(&first, &["policy.window: this sidecar 24h, the store 12h"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&second).await != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "gRPC health follows the new policy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
