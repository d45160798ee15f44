//! How the two edges answer failures, from the one table in `tiergate::error`: a store that is
//! down is retryable on both (gRPC UNAVAILABLE, webhook 503, so Meta redelivers), a store failure
//! that retrying cannot fix is not (gRPC INTERNAL, webhook 500), and invalid input names the
//! field where it sits, also inside a batch.

mod common;

use common::redis::RedisServer;
use common::server::TestServer;
use common::webhooks::{fixture, post_webhook};
use tiergate::pb::{self, limiter_client::LimiterClient};
use tonic::transport::Channel;
use tonic::Code;

const SECRET: &str = "meta-app-secret-for-edge-tests";

async fn redis_sidecar(redis: &RedisServer) -> TestServer {
    let config = format!(
        r#"
[store]
backend = "redis"
url = "{}"
timeout = "300ms"
hash_key = "edges-test-hash-key"

[[portfolios]]
id = "acme"
wabas = ["102290129340398"]

[webhooks]
app_secret = "{SECRET}"
verify_token = "verify-me"
"#,
        redis.url()
    );
    TestServer::start(&config).await
}

async fn usage_error(c: &mut LimiterClient<Channel>) -> tonic::Status {
    let r = pb::GetUsageRequest { portfolio_id: "acme".into(), sender_id: String::new() };
    c.get_usage(r).await.expect_err("the store cannot answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_error_retrying_cannot_fix_is_500_and_internal_an_outage_503_and_unavailable() {
    let mut redis = RedisServer::start();
    let server = redis_sidecar(&redis).await;
    let mut c = server.client().await;
    let delivery = fixture("business_capability_update");
    assert_eq!(post_webhook(server.admin_addr, SECRET, &delivery).await.0, 200);

    // The scope's state hash turned into a string: every script touching it fails with
    // WRONGTYPE, which no retry fixes.
    redis.cli(&["DEL", "tg:{acme}:m"]);
    redis.cli(&["SET", "tg:{acme}:m", "not-a-hash"]);
    let (status, body) = post_webhook(server.admin_addr, SECRET, &delivery).await;
    assert_eq!(status, 500, "Meta must not be asked to retry what cannot succeed: {body}");
    assert!(!body.contains("WRONGTYPE"), "store internals stay out of the answer: {body}");
    assert_eq!(usage_error(&mut c).await.code(), Code::Internal);
    let set = pb::SetTierRequest { portfolio_id: "acme".into(), sender_id: String::new(), tier: "TIER_2K".into() };
    assert_eq!(c.set_tier(set).await.unwrap_err().code(), Code::Internal);
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains(r#"tiergate_webhook_deliveries_total{outcome="store_failed"} 1"#), "{metrics}");

    // Redis down: the same calls are worth retrying.
    redis.kill();
    let (status, body) = post_webhook(server.admin_addr, SECRET, &delivery).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(usage_error(&mut c).await.code(), Code::Unavailable);
}

fn req(recipient: &str, category: i32) -> pb::AdmitRequest {
    pb::AdmitRequest {
        portfolio_id: "acme".into(),
        sender_id: "s1".into(),
        recipient: recipient.into(),
        category,
        template: String::new(),
        template_language: String::new(),
        idempotency_key: String::new(),
        max_wait: None,
    }
}

#[tokio::test]
async fn conversion_errors_name_the_field_where_it_sits() {
    let server = TestServer::start("").await;
    let mut c = server.client().await;
    let utility = pb::Category::Utility as i32;
    let requests = vec![req("+15550000001", utility), req("+15550000002", 42)];
    let e = c.admit_batch(pb::AdmitBatchRequest { requests }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "requests[1].category: unknown value 42");

    let requests =
        vec![req("+15550000001", utility), pb::AdmitRequest { template: "\n".into(), ..req("+15550000002", utility) }];
    let e = c.admit_batch(pb::AdmitBatchRequest { requests }).await.unwrap_err();
    assert!(e.message().starts_with("requests[1].template: "), "{}", e.message());

    let update = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        senders: vec![pb::SenderUpdate { sender_id: "n1".into(), status: 0, quality: 99 }],
        ..Default::default()
    };
    let e = c.update_portfolio(update).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::InvalidArgument, "senders[0].quality: unknown value 99"));
}

#[tokio::test]
async fn template_languages_are_short_codes_and_errors_never_echo_them() {
    let server = TestServer::start("").await;
    let mut c = server.client().await;
    let utility = pb::Category::Utility as i32;
    let long = "en_US".repeat(1_000);
    let with = |template: &str, language: &str| pb::AdmitRequest {
        template: template.into(),
        template_language: language.into(),
        ..req("+15550000002", utility)
    };
    for bad in ["en:US", "en,US", "en US", long.as_str()] {
        let requests = vec![req("+15550000001", utility), with("promo", bad)];
        let e = c.admit_batch(pb::AdmitBatchRequest { requests }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("requests[1].template_language: "), "{}", e.message());
        assert!(!e.message().contains(bad) && e.message().len() < 200, "{}", e.message());
    }
    let e = c.admit(with("", "en_US")).await.unwrap_err();
    assert!(e.message().starts_with("template_language: "), "{}", e.message());
    assert_eq!(c.admit(with("promo", "pt_BR")).await.unwrap().into_inner().reason(), pb::Reason::NewRecipient);

    let update = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        templates: vec![pb::TemplateUpdate { name: "promo".into(), language: long.clone(), ..Default::default() }],
        ..Default::default()
    };
    let e = c.update_portfolio(update).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("templates[0].language: "), "{}", e.message());
    assert!(!e.message().contains(&long), "{}", e.message());
}
