//! Who may lift a limit: the sender and admin tokens on every Limiter call, RecordInbound among
//! the admin calls because it exempts recipients, and signed leases, so a Release gives back only
//! a slot tiergate itself handed out. Real servers on real sockets, the real binary, real Redis.

mod common;

use base64::Engine as _;
use common::calls::{admit, usage};
use common::redis::RedisServer;
use common::requests::{self, UTILITY};
use common::server::{Sidecar, TestServer};
use tiergate::pb::{self, Decision, Reason};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const SENDER_TOKEN: &str = "sender-token-0123456789";
const ADMIN_TOKEN: &str = "admin-token-0123456789";
/// A token of the right shape that neither role holds.
const WRONG_TOKEN: &str = "wrong-token-0123456789";

/// A ladder whose first tier is full after a handful of recipients.
const SMALL: &str = r#"
[policy]
ladder = [{ name = "T3", limit = 3 }, { name = "T30", limit = 30 }, { name = "UNL" }]
"#;

/// `message` with `authorization: Bearer <token>`, or without the header for `None`.
fn bearer<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Asserts a refusal: its code, that the message names the token it needs, and never echoes any
/// token.
fn assert_refused(result: Result<impl std::fmt::Debug, Status>, code: Code, needs: &str) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needs), "{status:?}");
    for token in [SENDER_TOKEN, ADMIN_TOKEN, WRONG_TOKEN] {
        assert!(!status.message().contains(token), "echoes a token: {status:?}");
    }
}

/// The i-th of a set of distinct phone numbers.
fn number(i: usize) -> String {
    format!("+1555100{i:04}")
}

#[tokio::test]
async fn record_inbound_needs_the_admin_token_so_nobody_else_exempts_recipients() {
    let server = TestServer::start(&format!("[server]\nadmin_token = \"{ADMIN_TOKEN}\"\n{SMALL}")).await;
    let mut c = server.client().await;
    for i in 0..3 {
        assert_eq!(admit(&mut c, UTILITY.to("acme", "s1", &number(i))).await.reason(), Reason::NewRecipient);
    }
    // Anyone who reaches the gRPC port tries to open service windows for new recipients.
    for i in 3..13 {
        let recipient = number(i);
        let inbound = requests::inbound("acme", "s1", &recipient);
        assert_refused(
            c.record_inbound(bearer(inbound.clone(), None)).await,
            Code::Unauthenticated,
            "server.admin_token",
        );
        assert_refused(
            c.record_inbound(bearer(inbound, Some(WRONG_TOKEN))).await,
            Code::PermissionDenied,
            "server.admin_token",
        );
        let r = admit(&mut c, UTILITY.to("acme", "s1", &recipient)).await;
        assert_eq!((r.decision(), r.reason()), (Decision::Denied, Reason::LimitReached), "{recipient}");
    }
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 3);

    // The admin token opens the window, and the message is then sent without being counted.
    let recipient = number(20);
    let opened = c.record_inbound(bearer(requests::inbound("acme", "s1", &recipient), Some(ADMIN_TOKEN))).await;
    assert!(opened.unwrap().into_inner().window_closes_at.is_some());
    let r = admit(&mut c, UTILITY.to("acme", "s1", &recipient)).await;
    assert_eq!((r.decision(), r.reason()), (Decision::Admitted, Reason::ServiceWindow));
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 3);
}

/// A channel to a sidecar's gRPC port, for the health and reflection services.
async fn channel(sidecar: &Sidecar) -> Channel {
    sidecar.client().await; // waits until it accepts connections
    Channel::from_shared(format!("http://{}", sidecar.grpc_addr)).unwrap().connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_sender_token_every_limiter_call_needs_a_token_but_health_and_reflection_do_not() {
    let sidecar = Sidecar::spawn(
        SMALL,
        &[("TIERGATE_SERVER_SENDER_TOKEN", SENDER_TOKEN), ("TIERGATE_SERVER_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    let mut c = sidecar.client().await;
    let send = || UTILITY.to("acme", "s1", "+15550000001");
    let either = "server.sender_token";

    // Without a token, nothing of the Limiter answers.
    assert_refused(c.admit(bearer(send(), None)).await, Code::Unauthenticated, either);
    let batch = || pb::AdmitBatchRequest { requests: vec![send()] };
    assert_refused(c.admit_batch(bearer(batch(), None)).await, Code::Unauthenticated, either);
    let release = || pb::ReleaseRequest { lease: "anything".into() };
    assert_refused(c.release(bearer(release(), None)).await, Code::Unauthenticated, either);
    assert_refused(c.get_usage(bearer(requests::usage("acme", ""), None)).await, Code::Unauthenticated, either);
    assert_refused(c.get_portfolio(bearer(requests::portfolio("acme"), None)).await, Code::Unauthenticated, either);
    let inbound = || requests::inbound("acme", "s1", "+15550000009");
    assert_refused(c.record_inbound(bearer(inbound(), None)).await, Code::Unauthenticated, "server.admin_token");
    let tier = || requests::set_tier("acme", "", "T30");
    assert_refused(c.set_tier(bearer(tier(), None)).await, Code::Unauthenticated, "server.admin_token");
    let opt =
        || pb::SetOptOutRequest { portfolio_id: "acme".into(), recipient: "+15550000002".into(), opted_out: true };
    assert_refused(c.set_opt_out(bearer(opt(), None)).await, Code::Unauthenticated, "server.admin_token");
    let update = || pb::UpdatePortfolioRequest { portfolio_id: "acme".into(), ..Default::default() };
    assert_refused(c.update_portfolio(bearer(update(), None)).await, Code::Unauthenticated, "server.admin_token");

    // A wrong token is refused too, and nothing was counted by any of it.
    assert_refused(c.admit(bearer(send(), Some(WRONG_TOKEN))).await, Code::PermissionDenied, either);
    let answer = c.get_usage(bearer(requests::usage("acme", ""), Some(SENDER_TOKEN))).await.unwrap();
    assert_eq!(answer.into_inner().unique_recipients, 0);

    // The sender token sends, reads and releases.
    let first = c.admit(bearer(send(), Some(SENDER_TOKEN))).await.unwrap().into_inner();
    assert_eq!(first.reason(), Reason::NewRecipient);
    let second = c.admit(bearer(UTILITY.to("acme", "s1", "+15550000003"), Some(ADMIN_TOKEN))).await.unwrap();
    assert_eq!(second.into_inner().reason(), Reason::NewRecipient, "the admin token sends too");
    let answers = c.admit_batch(bearer(batch(), Some(SENDER_TOKEN))).await.unwrap().into_inner();
    assert_eq!(answers.responses[0].reason(), Reason::AlreadyCounted);
    let released = c.release(bearer(pb::ReleaseRequest { lease: first.lease }, Some(SENDER_TOKEN))).await.unwrap();
    assert!(!released.into_inner().released, "the batch messaged the recipient again");
    c.get_portfolio(bearer(requests::portfolio("acme"), Some(SENDER_TOKEN))).await.unwrap();

    // It does not change portfolios or open service windows.
    let admin = "server.admin_token";
    assert_refused(c.record_inbound(bearer(inbound(), Some(SENDER_TOKEN))).await, Code::PermissionDenied, admin);
    assert_refused(c.set_tier(bearer(tier(), Some(SENDER_TOKEN))).await, Code::PermissionDenied, admin);
    assert_refused(c.set_opt_out(bearer(opt(), Some(SENDER_TOKEN))).await, Code::PermissionDenied, admin);
    assert_refused(c.update_portfolio(bearer(update(), Some(SENDER_TOKEN))).await, Code::PermissionDenied, admin);
    let answer = c.get_usage(bearer(requests::usage("acme", ""), Some(ADMIN_TOKEN))).await.unwrap().into_inner();
    assert_eq!((answer.tier.as_str(), answer.unique_recipients), ("T3", 2));

    // The admin token does.
    c.record_inbound(bearer(inbound(), Some(ADMIN_TOKEN))).await.unwrap();
    c.set_opt_out(bearer(opt(), Some(ADMIN_TOKEN))).await.unwrap();
    c.update_portfolio(bearer(update(), Some(ADMIN_TOKEN))).await.unwrap();
    assert_eq!(c.set_tier(bearer(tier(), Some(ADMIN_TOKEN))).await.unwrap().into_inner().tier, "T30");

    // Health and reflection stay open.
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = channel(&sidecar).await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "tiergate.v1.Limiter"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service:?}");
    }
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let mut stream = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    assert!(list.service.iter().any(|s| s.name == "tiergate.v1.Limiter"), "{list:?}");
    let log = sidecar.log();
    for token in [SENDER_TOKEN, ADMIN_TOKEN, WRONG_TOKEN] {
        assert!(!log.contains(token), "a token in the log: {log}");
    }
}

#[test]
fn tokens_that_cannot_work_are_refused_at_start_naming_the_key_but_not_the_token() {
    let cases = [
        (
            [("TIERGATE_SERVER_SENDER_TOKEN", SENDER_TOKEN), ("TIERGATE_SERVER_ADMIN_TOKEN", SENDER_TOKEN)],
            "server.sender_token",
        ),
        (
            [("TIERGATE_SERVER_SENDER_TOKEN", "sender token 0123456789"), ("TIERGATE_SERVER_ADMIN_TOKEN", ADMIN_TOKEN)],
            "server.sender_token",
        ),
        (
            [
                ("TIERGATE_SERVER_SENDER_TOKEN", SENDER_TOKEN),
                ("TIERGATE_SERVER_ADMIN_TOKEN", "admin-token-0123456789\n"),
            ],
            "server.admin_token",
        ),
        ([("TIERGATE_SERVER_SENDER_TOKEN", ""), ("TIERGATE_SERVER_ADMIN_TOKEN", ADMIN_TOKEN)], "server.sender_token"),
    ];
    for (env, key) in cases {
        let mut sidecar = Sidecar::spawn(SMALL, &env);
        let status = sidecar.wait(std::time::Duration::from_secs(20));
        let log = sidecar.log();
        assert!(!status.success(), "{env:?} started: {log}");
        assert!(log.contains(key), "{env:?}: {log}");
        for (_, token) in env.iter().filter(|(_, t)| !t.is_empty()) {
            assert!(!log.contains(token.trim()), "{env:?} echoed: {log}");
        }
    }
}

/// The lease text (what is signed) of a token: the part before the MAC, decoded.
fn lease_text(token: &str) -> String {
    let body = token.split('.').next().unwrap();
    String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap()
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

/// Asserts that Release refuses `lease` as not issued by tiergate, naming the field.
async fn assert_forged(c: &mut common::calls::Client, lease: &str) {
    let status = c.release(pb::ReleaseRequest { lease: lease.to_owned() }).await.expect_err(lease);
    assert_eq!(status.code(), Code::InvalidArgument, "{lease}: {status:?}");
    assert!(status.message().starts_with("lease:"), "{status:?}");
    assert!(!status.message().contains(lease), "echoes the lease: {status:?}");
}

#[tokio::test]
async fn an_altered_or_unsigned_lease_gives_nothing_back() {
    let config = r#"
[store]
hash_key = "test-hash-key-0123456789"
[policy]
ladder = [{ name = "T1", limit = 1 }, { name = "UNL" }]
"#;
    let server = TestServer::start(config).await;
    let mut c = server.client().await;
    let lease = admit(&mut c, UTILITY.to("acme", "s1", "+15550000001")).await.lease;
    assert!(!lease.is_empty());
    let next = || UTILITY.to("acme", "s1", "+15550000002");
    assert_eq!(admit(&mut c, next()).await.reason(), Reason::LimitReached);

    // Every byte changed, one at a time, to another character a token may hold.
    for (i, byte) in lease.bytes().enumerate() {
        let mut altered = lease.clone().into_bytes();
        altered[i] = if byte == b'A' { b'B' } else { b'A' };
        assert_forged(&mut c, &String::from_utf8(altered).unwrap()).await;
    }
    // What the client could write itself: the old unsigned form, the text without its MAC, and a
    // MAC that does not match (another lease's, or the text's under the hash key itself).
    let text = lease_text(&lease);
    let (version, rest) = text.split_once('\n').unwrap();
    assert_ne!(version, "1", "the signed form has its own version");
    let unsigned_v1 = b64(&format!("1\n{rest}"));
    assert_forged(&mut c, &unsigned_v1).await;
    assert_forged(&mut c, &b64(&text)).await;
    assert_forged(&mut c, &format!("{}.", b64(&text))).await;
    let other = admit(&mut c, UTILITY.to("other", "s1", "+15550000001")).await.lease;
    let other_mac = other.split_once('.').map_or("", |(_, mac)| mac);
    assert_forged(&mut c, &format!("{}.{other_mac}", b64(&text))).await;
    use hmac::Mac as _;
    let mut under_hash_key = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"test-hash-key-0123456789").unwrap();
    under_hash_key.update(b64(&text).as_bytes());
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(under_hash_key.finalize().into_bytes());
    assert_forged(&mut c, &format!("{}.{tag}", b64(&text))).await;

    // The slot stays taken until the real lease gives it back.
    assert_eq!(admit(&mut c, next()).await.reason(), Reason::LimitReached);
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 1);
    assert!(c.release(pb::ReleaseRequest { lease }).await.unwrap().into_inner().released);
    assert_eq!(admit(&mut c, next()).await.reason(), Reason::NewRecipient);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_sharing_a_redis_and_hash_key_honour_each_others_leases_and_no_one_else_does() {
    let redis = RedisServer::start();
    let config = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\n[policy]\nladder = [{{ name = \"T1\", limit = 1 }}, {{ name = \"UNL\" }}]\n",
        redis.url()
    );
    let shared = ("TIERGATE_STORE_HASH_KEY", "shared-hash-key-0123456789");
    let a = Sidecar::spawn(&config, &[shared]);
    let b = Sidecar::spawn(&config, &[shared]);
    // Another deployment on the same Redis: its own key prefix and hash key. (One with the same
    // prefix and another key refuses to serve at all: see tests/shared_policy.rs.)
    let other_deployment = config.replace("backend = \"redis\"", "backend = \"redis\"\nkey_prefix = \"other\"");
    let stranger = Sidecar::spawn(&other_deployment, &[("TIERGATE_STORE_HASH_KEY", "other-hash-key-0123456789")]);
    let (mut ca, mut cb, mut cs) = (a.client().await, b.client().await, stranger.client().await);

    let lease = admit(&mut ca, UTILITY.to("acme", "s1", "+15550000001")).await.lease;
    assert!(!lease.is_empty());
    let next = || UTILITY.to("acme", "s1", "+15550000002");
    assert_eq!(admit(&mut cb, next()).await.reason(), Reason::LimitReached);

    // The other deployment did not issue it and may not give the slot back.
    assert_forged(&mut cs, &lease).await;
    assert_eq!(admit(&mut ca, next()).await.reason(), Reason::LimitReached);
    assert_eq!(usage(&mut cb, "acme", "").await.unique_recipients, 1);

    // One sharing the key did, in effect: the lease is released through it, once.
    assert!(cb.release(pb::ReleaseRequest { lease: lease.clone() }).await.unwrap().into_inner().released);
    assert!(!ca.release(pb::ReleaseRequest { lease }).await.unwrap().into_inner().released);
    assert_eq!(usage(&mut ca, "acme", "").await.unique_recipients, 0);
    assert_eq!(admit(&mut ca, next()).await.reason(), Reason::NewRecipient);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_command_sends_the_sender_token_from_the_sidecars_environment() {
    let env = [("TIERGATE_SERVER_SENDER_TOKEN", SENDER_TOKEN), ("TIERGATE_SERVER_ADMIN_TOKEN", ADMIN_TOKEN)];
    let sidecar = Sidecar::spawn(SMALL, &env);
    sidecar.client().await;
    let usage = |token: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"));
        command.args(["usage", "--portfolio", "acme", "--addr", &format!("http://{}", sidecar.grpc_addr)]);
        command.env_remove("TIERGATE_SERVER_SENDER_TOKEN");
        if let Some(token) = token {
            command.env("TIERGATE_SERVER_SENDER_TOKEN", token);
        }
        command.output().unwrap()
    };
    let refused = usage(None);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("server.sender_token"), "{err}");
    let answered = usage(Some(SENDER_TOKEN));
    let text = String::from_utf8_lossy(&answered.stdout);
    assert!(answered.status.success() && text.contains("limit              3"), "{text}");
}
