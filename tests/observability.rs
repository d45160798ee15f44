//! What an on-call engineer sees of the real `tiergate` binary: counters exported at 0 from
//! start-up, gRPC calls by method and code, usage gauges that follow the window without anyone
//! reading them, and reflection under both of its names.

mod common;

use std::time::{Duration, Instant};

use common::requests::UTILITY;
use common::server::{http_get, Sidecar};
use tonic::Code;

/// The lines of a scrape that start with `prefix` (a series name with its first labels).
fn lines<'a>(metrics: &'a str, prefix: &str) -> Vec<&'a str> {
    metrics.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_start_at_zero_and_calls_are_counted_by_method_and_code() {
    let sidecar = Sidecar::spawn("", &[]);
    let (status, fresh) = http_get(sidecar.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    for series in [
        r#"tiergate_decisions_total{decision="DENIED",reason="LIMIT_REACHED"} 0"#,
        r#"tiergate_decisions_total{decision="ADMITTED",reason="NEW_RECIPIENT"} 0"#,
        r#"tiergate_store_errors_total{op="admit",kind="transient"} 0"#,
        r#"tiergate_store_errors_total{op="usage",kind="refused"} 0"#,
        r#"tiergate_webhook_deliveries_total{outcome="unauthorized"} 0"#,
        r#"tiergate_releases_total{released="true"} 0"#,
        "tiergate_store_fail_open_total 0",
        "tiergate_inbound_total 0",
        r#"tiergate_grpc_requests_total{method="Admit",code="OK"} 0"#,
        r#"tiergate_grpc_requests_total{method="GetPortfolio",code="UNAVAILABLE"} 0"#,
        "tiergate_store_policy_mismatch 0",
        "tiergate_webhooks_configured 0",
    ] {
        assert!(fresh.lines().any(|l| l == series), "{series} missing from a fresh scrape:\n{fresh}");
    }

    let mut c = sidecar.client().await;
    let invalid = c.admit(UTILITY.to("acme", "s1", "")).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    c.admit(UTILITY.to("acme", "s1", "+15550000001")).await.unwrap();
    let (_, after) = http_get(sidecar.admin_addr, "/metrics").await;
    for series in [
        r#"tiergate_grpc_requests_total{method="Admit",code="INVALID_ARGUMENT"} 1"#,
        r#"tiergate_grpc_requests_total{method="Admit",code="OK"} 1"#,
        r#"tiergate_grpc_request_duration_seconds_count{method="Admit"} 2"#,
        r#"tiergate_grpc_request_duration_seconds_bucket{method="Admit",le="+Inf"} 2"#,
        r#"tiergate_decisions_total{decision="ADMITTED",reason="NEW_RECIPIENT"} 1"#,
    ] {
        assert!(after.lines().any(|l| l == series), "{series} missing after two Admits:\n{after}");
    }
    assert!(after.contains("# TYPE tiergate_grpc_request_duration_seconds histogram"), "{after}");
    assert_eq!(lines(&after, r#"tiergate_grpc_request_duration_seconds_count{method="GetUsage"}"#), Vec::<&str>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_gauges_follow_contacts_out_of_the_window_without_any_read() {
    let config = "[policy]\nwindow = \"2s\"\n\n[metrics]\nrefresh_interval = \"200ms\"\n";
    let sidecar = Sidecar::spawn(config, &[]);
    let mut c = sidecar.client().await;
    for i in 1..=3 {
        c.admit(UTILITY.to("acme", "s1", &format!("+1555000000{i}"))).await.unwrap();
    }
    let usage = r#"tiergate_unique_recipients{portfolio="acme",sender=""}"#;
    let scrape = || async { http_get(sidecar.admin_addr, "/metrics").await.1 };
    assert_eq!(lines(&scrape().await, usage), [format!("{usage} 3")]);

    // No GetUsage, no GetPortfolio: only the scheduled refresh can bring it down.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = scrape().await;
        if lines(&metrics, usage) == [format!("{usage} 0")] {
            assert!(metrics.contains(r#"tiergate_limit{portfolio="acme",sender=""} 250"#), "{metrics}");
            assert!(metrics.contains(r#"tiergate_upgrade_threshold{portfolio="acme",sender=""}"#), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "still not 0 after the window and 20 s of refreshes:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Idle for two windows, the portfolio is forgotten: its series go, rather than stay frozen.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines(&scrape().await, usage).is_empty() {
        assert!(Instant::now() < deadline, "acme's gauges still exported 20 s after its window emptied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_lists_the_limiter_for_older_clients() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let sidecar = Sidecar::spawn("", &[]);
    sidecar.client().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", sidecar.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let symbol = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("tiergate.v1.Limiter".into())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([list, symbol])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tiergate.v1.Limiter"), "{names:?}");
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected the file that defines tiergate.v1.Limiter");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_exports_when_meta_last_delivered() {
    use common::webhooks::{fixture, post_webhook};
    let config = "[webhooks]\napp_secret = \"app-secret\"\nverify_token = \"verify-token\"\n";
    let sidecar = Sidecar::spawn(config, &[]);
    sidecar.client().await;
    let last = || async {
        let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
        assert!(metrics.lines().any(|l| l == "tiergate_webhooks_configured 1"), "{metrics}");
        let line = lines(&metrics, "tiergate_webhook_last_received_timestamp_seconds ");
        assert_eq!(line.len(), 1, "{metrics}");
        line[0].split(' ').nth(1).unwrap().parse::<f64>().unwrap()
    };
    assert_eq!(last().await, 0.0, "nothing received yet");
    let body = fixture("business_capability_update");
    assert_eq!(post_webhook(sidecar.admin_addr, "not-the-app-secret", &body).await.0, 401);
    assert_eq!(last().await, 0.0, "a delivery that is not Meta's does not count");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert_eq!(post_webhook(sidecar.admin_addr, "app-secret", &body).await.0, 200);
    let at = last().await;
    assert!(at >= before.floor() && at < before + 60.0, "{at} vs {before}");
}
