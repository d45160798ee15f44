//! The sidecar end to end on the embedded store: the real server on real sockets, called with the
//! client generated from `proto/tiergate/v1/limiter.proto`.

mod common;

use std::time::{Duration, SystemTime};

use common::calls::{admit, outcome, usage};
use common::requests::{Admit, MARKETING};
use common::server::TestServer;
use tiergate::pb::{self, Decision, Reason};
use tonic::Code;

/// A small ladder so limits are reached with a handful of recipients.
const SMALL: &str = r#"
[policy]
ladder = [{ name = "T3", limit = 3 }, { name = "T30", limit = 30 }, { name = "UNL" }]
"#;

/// What these tests send, unless they say otherwise.
const SALE: Admit = MARKETING.template("spring_sale");

#[tokio::test]
async fn admits_new_recipients_up_to_the_limit_and_then_denies_with_retry_after() {
    let server = TestServer::start(SMALL).await;
    let mut c = server.client().await;
    for (i, n) in ["+1 415 555 0101", "+1 415 555 0102", "+1 415 555 0103"].iter().enumerate() {
        let r = admit(&mut c, SALE.to("acme", "s1", n)).await;
        assert_eq!(outcome(&r), (Decision::Admitted, Reason::NewRecipient));
        assert!(!r.lease.is_empty());
        let u = r.usage.unwrap();
        assert_eq!((u.unique_recipients, u.limit, u.remaining, u.tier.as_str()), (i as u64 + 1, 3, 2 - i as u64, "T3"));
    }
    let denied = admit(&mut c, SALE.to("acme", "s1", "+1 415 555 0104")).await;
    assert_eq!(outcome(&denied), (Decision::Denied, Reason::LimitReached));
    assert!(denied.lease.is_empty());
    let retry = denied.retry_after.unwrap();
    assert!(retry.seconds > 23 * 3600 && retry.seconds <= 24 * 3600, "{retry:?}");
    let u = denied.usage.unwrap();
    assert_eq!((u.unique_recipients, u.remaining), (3, 0));
    let next: SystemTime = u.next_slot_at.unwrap().try_into().unwrap();
    assert!(next > SystemTime::now() + Duration::from_secs(23 * 3600));
    // The same number, written differently, is the same recipient and costs nothing.
    let again = admit(&mut c, SALE.to("acme", "s2", "14155550101")).await;
    assert_eq!(outcome(&again), (Decision::Admitted, Reason::AlreadyCounted));
    assert!(again.lease.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn service_window_admits_replies_without_counting() {
    let server = TestServer::start(SMALL).await;
    let mut c = server.client().await;
    let opened = c
        .record_inbound(pb::RecordInboundRequest {
            portfolio_id: "acme".into(),
            sender_id: "s1".into(),
            recipient: "+49 151 1234 5678".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let closes: SystemTime = opened.window_closes_at.unwrap().try_into().unwrap();
    let in_a_day = SystemTime::now() + Duration::from_secs(24 * 3600);
    assert!(closes <= in_a_day && closes > in_a_day - Duration::from_secs(60));
    let reply = admit(&mut c, SALE.to("acme", "s1", "4915112345678")).await;
    assert_eq!(outcome(&reply), (Decision::Admitted, Reason::ServiceWindow));
    assert_eq!(reply.usage.unwrap().unique_recipients, 0);
    // Another number of the business has no window with this user.
    let other = admit(&mut c, SALE.to("acme", "s2", "4915112345678")).await;
    assert_eq!(outcome(&other), (Decision::Admitted, Reason::NewRecipient));
    let bad = c
        .record_inbound(pb::RecordInboundRequest {
            portfolio_id: "acme".into(),
            sender_id: "".into(),
            recipient: "4915112345678".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("sender_id"), "{}", bad.message());
}

#[tokio::test]
async fn release_gives_the_slot_back_once() {
    let server = TestServer::start(SMALL).await;
    let mut c = server.client().await;
    let first = admit(&mut c, SALE.to("acme", "s1", "+15550000001")).await;
    for n in ["+15550000002", "+15550000003"] {
        admit(&mut c, SALE.to("acme", "s1", n)).await;
    }
    assert_eq!(outcome(&admit(&mut c, SALE.to("acme", "s1", "+15550000004")).await).1, Reason::LimitReached);
    let released = c.release(pb::ReleaseRequest { lease: first.lease.clone() }).await.unwrap().into_inner();
    assert!(released.released);
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 2);
    let twice = c.release(pb::ReleaseRequest { lease: first.lease }).await.unwrap().into_inner();
    assert!(!twice.released);
    assert_eq!(outcome(&admit(&mut c, SALE.to("acme", "s1", "+15550000004")).await).1, Reason::NewRecipient);
    let garbage = c.release(pb::ReleaseRequest { lease: "nonsense".into() }).await.unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);
    assert!(garbage.message().contains("lease"));
}

#[tokio::test]
async fn a_lease_names_its_own_admit_even_within_one_batch() {
    let server = TestServer::start(SMALL).await;
    let mut c = server.client().await;
    let batch = c
        .admit_batch(pb::AdmitBatchRequest {
            requests: vec![SALE.to("acme", "s1", "+15550000001"), SALE.to("acme", "s1", "+15550000001")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.responses[1].reason(), Reason::AlreadyCounted);
    let released =
        c.release(pb::ReleaseRequest { lease: batch.responses[0].lease.clone() }).await.unwrap().into_inner();
    assert!(!released.released, "the recipient was messaged again after the lease");
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 1);
}

#[tokio::test]
async fn invalid_requests_name_the_field_and_record_nothing() {
    let server = TestServer::start(SMALL).await;
    let mut c = server.client().await;
    let cases = [
        (SALE.to("", "s1", "+15550000001"), "portfolio_id"),
        (SALE.to("acme corp", "s1", "+15550000001"), "portfolio_id"),
        (SALE.to(&"a".repeat(129), "s1", "+15550000001"), "portfolio_id"),
        (SALE.to("acme", "s 1", "+15550000001"), "sender_id"),
        (SALE.to("acme", "s1", ""), "recipient"),
        (SALE.to("acme", "s1", "12345"), "recipient"),
        (SALE.to("acme", "s1", "call me maybe"), "recipient"),
        (pb::AdmitRequest { category: 42, ..SALE.to("acme", "s1", "+15550000001") }, "category"),
    ];
    for (r, field) in cases {
        let e = c.admit(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let e = c.admit(SALE.to("acme", "s1", "+1 415 555 0100 x")).await.unwrap_err();
    assert!(!e.message().contains("415"), "the number is not echoed back: {}", e.message());
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 0);
    // The server keeps serving.
    assert_eq!(outcome(&admit(&mut c, SALE.to("acme", "s1", "+15550000001")).await).1, Reason::NewRecipient);
    let e = c.get_usage(pb::GetUsageRequest { portfolio_id: "".into(), sender_id: "".into() }).await.unwrap_err();
    assert!(e.message().starts_with("portfolio_id"));
}

#[tokio::test]
async fn business_scoped_user_ids_are_recipients_too() {
    let server = TestServer::start(SMALL).await;
    let mut c = server.client().await;
    let r = admit(&mut c, SALE.to("acme", "s1", "US.13491208655302741918")).await;
    assert_eq!(outcome(&r).1, Reason::NewRecipient);
    let r = admit(&mut c, SALE.to("acme", "s1", "us.13491208655302741918")).await;
    assert_eq!(outcome(&r).1, Reason::AlreadyCounted);
}

#[tokio::test]
async fn admit_batch_answers_in_order_and_rejects_whole_batches() {
    let server = TestServer::start(SMALL).await;
    let mut c = server.client().await;
    let requests = vec![
        SALE.to("acme", "s1", "+15550000001"),
        SALE.to("globex", "s1", "+15550000001"),
        SALE.to("acme", "s1", "+15550000002"),
        SALE.to("acme", "s1", "+15550000001"),
        SALE.to("acme", "s1", "+15550000003"),
        SALE.to("acme", "s1", "+15550000004"),
    ];
    let got = c.admit_batch(pb::AdmitBatchRequest { requests }).await.unwrap().into_inner().responses;
    let reasons: Vec<_> = got.iter().map(|r| r.reason()).collect();
    use Reason::*;
    assert_eq!(reasons, [NewRecipient, NewRecipient, NewRecipient, AlreadyCounted, NewRecipient, LimitReached]);
    let counted: Vec<_> = got.iter().map(|r| r.usage.as_ref().unwrap().unique_recipients).collect();
    assert_eq!(counted, [1, 1, 2, 2, 3, 3]);
    assert_eq!(got[1].usage.as_ref().unwrap().portfolio_id, "globex");

    let bad = vec![SALE.to("initech", "s1", "+15550000001"), SALE.to("initech", "s1", "oops")];
    let e = c.admit_batch(pb::AdmitBatchRequest { requests: bad }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("requests[1].recipient"), "{}", e.message());
    assert_eq!(usage(&mut c, "initech", "").await.unique_recipients, 0, "nothing of a rejected batch is recorded");

    let too_many = (0..1001).map(|i| SALE.to("initech", "s1", &format!("+1555{i:07}"))).collect();
    let e = c.admit_batch(pb::AdmitBatchRequest { requests: too_many }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("requests"));
    let max = (0..1000).map(|i| SALE.to("initech", "s1", &format!("+1555{i:07}"))).collect();
    let got = c.admit_batch(pb::AdmitBatchRequest { requests: max }).await.unwrap().into_inner().responses;
    assert_eq!(got.len(), 1000);
    assert_eq!(got.iter().filter(|r| r.decision() == Decision::Admitted).count(), 3);
}

#[tokio::test]
async fn set_tier_changes_the_limit_and_beats_the_config() {
    let config = format!("{SMALL}\n[[portfolios]]\nid = \"acme\"\ntier = \"T30\"\n");
    let server = TestServer::start(&config).await;
    let mut c = server.client().await;
    let u = usage(&mut c, "acme", "").await;
    assert_eq!((u.tier.as_str(), u.limit, u.unlimited), ("T30", 30, false));
    assert_eq!(usage(&mut c, "globex", "").await.tier, "T3");
    let set = |tier: &str| pb::SetTierRequest { portfolio_id: "acme".into(), sender_id: "".into(), tier: tier.into() };
    let u = c.set_tier(set("T3")).await.unwrap().into_inner();
    assert_eq!((u.tier.as_str(), u.limit), ("T3", 3));
    for i in 0..4 {
        admit(&mut c, SALE.to("acme", "s1", &format!("+1555000000{i}"))).await;
    }
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 3);
    let u = c.set_tier(set("UNL")).await.unwrap().into_inner();
    assert!(u.unlimited);
    assert_eq!((u.limit, u.remaining), (0, 0));
    let r = admit(&mut c, SALE.to("acme", "s1", "+15550000009")).await;
    assert_eq!(outcome(&r), (Decision::Admitted, Reason::NewRecipient));
    let e = c.set_tier(set("TIER_2K")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("tier") && e.message().contains("T30"), "{}", e.message());
}

#[tokio::test]
async fn per_number_scope_gives_each_number_its_own_limit() {
    let config = format!("{SMALL}scope = \"phone_number\"\n");
    let server = TestServer::start(&config).await;
    let mut c = server.client().await;
    for i in 0..3 {
        admit(&mut c, SALE.to("acme", "n1", &format!("+1555000000{i}"))).await;
    }
    assert_eq!(outcome(&admit(&mut c, SALE.to("acme", "n1", "+15550000009")).await).1, Reason::LimitReached);
    assert_eq!(outcome(&admit(&mut c, SALE.to("acme", "n2", "+15550000009")).await).1, Reason::NewRecipient);
    let u = usage(&mut c, "acme", "n1").await;
    assert_eq!((u.unique_recipients, u.sender_id.as_str()), (3, "n1"));
    let e = c.admit(SALE.to("acme", "", "+15550000009")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("sender_id"));
    let e = c.get_usage(pb::GetUsageRequest { portfolio_id: "acme".into(), sender_id: "".into() }).await.unwrap_err();
    assert!(e.message().starts_with("sender_id"));
}

#[tokio::test]
async fn short_windows_free_slots_as_contacts_age_out() {
    let config = format!("{SMALL}window = \"1s\"\n");
    let server = TestServer::start(&config).await;
    let mut c = server.client().await;
    for i in 0..3 {
        admit(&mut c, SALE.to("acme", "s1", &format!("+1555000000{i}"))).await;
    }
    let denied = admit(&mut c, SALE.to("acme", "s1", "+15550000009")).await;
    assert_eq!(denied.reason(), Reason::LimitReached);
    let retry: Duration = denied.retry_after.unwrap().try_into().unwrap();
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));
    tokio::time::sleep(retry + Duration::from_millis(50)).await;
    assert_eq!(admit(&mut c, SALE.to("acme", "s1", "+15550000009")).await.reason(), Reason::NewRecipient);
}

#[tokio::test]
async fn concurrent_admits_of_distinct_recipients_never_exceed_the_limit() {
    let server = TestServer::start(SMALL).await;
    let c = server.client().await;
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let r = c.admit(SALE.to("acme", "s1", &format!("+1555{i:07}"))).await.unwrap().into_inner();
                r.decision() == Decision::Admitted
            })
        })
        .collect();
    let mut c = c;
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 3);
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 3);
}

#[tokio::test]
async fn health_metrics_and_readiness_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    let server = TestServer::start(SMALL).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "tiergate.v1.Limiter"] {
        let s = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(s.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut c = server.client().await;
    admit(&mut c, SALE.to("metrics-acme", "s1", "+15550000001")).await;
    let (status, body) = server.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains(r#"tiergate_decisions_total{decision="ADMITTED",reason="NEW_RECIPIENT"}"#), "{body}");
    assert!(body.contains("tiergate_admit_duration_seconds_bucket{le=\"0.001\"}"), "{body}");
    assert!(body.contains(r#"tiergate_unique_recipients{portfolio="metrics-acme",sender=""} 1"#), "{body}");
    assert!(body.contains(r#"tiergate_limit{portfolio="metrics-acme",sender=""} 3"#), "{body}");
    assert!(!body.contains("15550000001"), "no recipient in metrics");
    assert_eq!(server.get("/livez").await.0, 200);
    assert_eq!(server.get("/readyz").await.0, 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_stops_accepting() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let server = TestServer::start(SMALL).await;
    let addr = server.grpc_addr;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch =
        health.watch(HealthCheckRequest { service: "tiergate.v1.Limiter".into() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let stopping = tokio::spawn(server.stop());
    let next = watch.message().await.unwrap().expect("a NOT_SERVING update before the stream ends");
    assert_eq!(next.status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);
    drop(watch);
    drop(health);
    stopping.await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer accepting");
}

#[tokio::test]
async fn reflection_lists_the_limiter_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start(SMALL).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tiergate.v1.Limiter"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn with_an_admin_token_only_its_holders_change_portfolios() {
    let token = "admin-token-0123456789";
    let server = TestServer::start(&format!("[server]\nadmin_token = \"{token}\"\n{SMALL}")).await;
    let mut c = server.client().await;
    let set = || pb::SetTierRequest { portfolio_id: "acme".into(), sender_id: "".into(), tier: "T30".into() };
    assert_eq!(c.set_tier(set()).await.unwrap_err().code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(set());
    wrong.metadata_mut().insert("authorization", "Bearer not-the-token".parse().unwrap());
    assert_eq!(c.set_tier(wrong).await.unwrap_err().code(), Code::PermissionDenied);
    let opt = pb::SetOptOutRequest { portfolio_id: "acme".into(), recipient: "+15550000001".into(), opted_out: true };
    assert_eq!(c.set_opt_out(opt).await.unwrap_err().code(), Code::Unauthenticated);
    let update = pb::UpdatePortfolioRequest { portfolio_id: "acme".into(), ..Default::default() };
    assert_eq!(c.update_portfolio(update).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(usage(&mut c, "acme", "").await.tier, "T3", "nothing changed");
    let mut right = tonic::Request::new(set());
    right.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    assert_eq!(c.set_tier(right).await.unwrap().into_inner().tier, "T30");
    // Sending needs no token.
    assert_eq!(admit(&mut c, SALE.to("acme", "s1", "+15550000001")).await.reason(), Reason::NewRecipient);
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_gets_the_same_answer_and_lease() {
    let config = format!("{SMALL}window = \"1s\"\n");
    let server = TestServer::start(&config).await;
    let mut c = server.client().await;
    let first = admit(&mut c, SALE.keyed("acme", "s1", "+15550000001", "wamid.1")).await;
    assert_eq!(outcome(&first), (Decision::Admitted, Reason::NewRecipient));
    let again = admit(&mut c, SALE.keyed("acme", "s1", "+15550000001", "wamid.1")).await;
    assert_eq!((outcome(&again), &again.lease), (outcome(&first), &first.lease), "the same answer and lease");
    assert_eq!(again.usage.unwrap().unique_recipients, 1);
    // Each request of a batch carries its own key.
    let batch = pb::AdmitBatchRequest {
        requests: vec![
            SALE.keyed("acme", "s1", "+15550000001", "wamid.1"),
            SALE.keyed("acme", "s1", "+15550000002", "wamid.2"),
            SALE.keyed("acme", "s1", "+15550000002", "wamid.2"),
        ],
    };
    let got = c.admit_batch(batch).await.unwrap().into_inner().responses;
    assert_eq!(got[0].lease, first.lease);
    assert_eq!((got[1].reason(), &got[2].lease), (Reason::NewRecipient, &got[1].lease));
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 2, "each recipient counted once");
    // The replayed lease releases the slot; the retry after that is counted anew.
    assert!(c.release(pb::ReleaseRequest { lease: again.lease.clone() }).await.unwrap().into_inner().released);
    let recounted = admit(&mut c, SALE.keyed("acme", "s1", "+15550000001", "wamid.1")).await;
    assert_eq!(recounted.reason(), Reason::NewRecipient);
    assert_ne!(recounted.lease, first.lease);
    // The key goes with the window.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let later = admit(&mut c, SALE.keyed("acme", "s1", "+15550000002", "wamid.2")).await;
    assert_eq!(later.reason(), Reason::NewRecipient);
    assert_ne!(later.lease, got[1].lease);
}

#[tokio::test]
async fn idempotency_keys_are_short_printable_and_never_echoed() {
    let server = TestServer::start(SMALL).await;
    let mut c = server.client().await;
    for bad in ["k".repeat(129), "secret\nkey".into(), "clé-secrète".into()] {
        let e = c.admit(SALE.keyed("acme", "s1", "+15550000001", &bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("idempotency_key: "), "{}", e.message());
        assert!(!e.message().contains("kkk") && !e.message().contains("secr"), "{}", e.message());
        let batch = pb::AdmitBatchRequest {
            requests: vec![
                SALE.keyed("acme", "s1", "+15550000001", "fine"),
                SALE.keyed("acme", "s1", "+15550000002", &bad),
            ],
        };
        let e = c.admit_batch(batch).await.unwrap_err();
        assert!(e.message().starts_with("requests[1].idempotency_key: "), "{}", e.message());
    }
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 0);
    let longest = admit(&mut c, SALE.keyed("acme", "s1", "+15550000001", &"k".repeat(128))).await;
    assert_eq!(longest.reason(), Reason::NewRecipient);
}
