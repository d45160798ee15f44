//! The send governor through the real server: each number's throughput and each pair's rate,
//! pacing (`AdmitRequest.max_wait`, capped by the call's deadline), shadow mode from the
//! configuration and from UpdatePortfolio, and what `/metrics` shows of them.
//!
//! Every test takes the `[store]` section of the sidecar it starts, so the same tests can run on
//! each backend; [`on_every_store!`] lists them once for both.
//!
//! Waits are asserted on the `waited` values the store computes, never on the wall clock. A
//! number sends 10 messages per second here, so a test about something else gives its Admits a
//! second to wait ([`WAITS`]) rather than racing the number's schedule.

mod common;

use std::time::Duration;

use common::calls::{self, Client};
use common::requests::{MARKETING, UTILITY};
use common::server::{http_get, Sidecar, TestServer};
use tiergate::pb::{self, Decision, Reason};
use tonic::Code;

/// One sidecar's configuration for every test, each keeping to its own portfolios and numbers:
/// a limit of 2 for `small` and `shadowed` (`shadowed` configured in shadow mode), 1,000 for the
/// rest; throughput on at 10 messages per second without a burst (number `slow` at 1, `fast` at
/// 1,000); pairs at Meta's 6 s with bursts of 2.
const POLICY: &str = r#"
[policy]
ladder = [{ name = "T2", limit = 2 }, { name = "T1K", limit = 1000 }]
default_tier = "T1K"

[policy.throughput]
enabled = true
default_mps = 10
burst = "0s"
numbers = { "slow" = 1, "fast" = 1000 }

[policy.pair_rate]
burst = 2

[[portfolios]]
id = "small"
tier = "T2"

[[portfolios]]
id = "shadowed"
tier = "T2"
mode = "shadow"
"#;

/// Generates one test per name on each backend, each calling the function of that name with the
/// backend's `[store]` section: the memory store (the default, an empty section), and a real
/// redis-server of its own, started for each test.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("").await
                }
            )*
        }

        mod redis {
            use super::common::redis::RedisServer;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let redis = RedisServer::start();
                    let store = format!(
                        "[store]\nbackend = \"redis\"\nurl = \"{}\"\nhash_key = \"governor-test-hash-key\"\n",
                        redis.url()
                    );
                    super::$name(&store).await
                }
            )*
        }
    };
}

on_every_store!(
    concurrent_admits_of_one_number_are_paced_a_slot_apart,
    a_wait_beyond_max_wait_is_throughput_exceeded_with_retry_after,
    a_call_is_never_held_past_its_deadline,
    admit_batch_paces_each_message_in_order,
    max_wait_out_of_range_is_invalid_naming_the_field,
    a_pair_past_its_burst_is_pair_rate,
    the_messaging_limit_is_never_paced,
    shadow_mode_from_the_configuration_admits_and_reports,
    shadow_mode_from_update_portfolio_and_back_to_the_configuration,
    metrics_show_pacing_throughput_shadow_and_the_new_reasons,
);

/// A sidecar on `store` with [`POLICY`], and a client.
async fn start(store: &str) -> (TestServer, Client) {
    let server = TestServer::start(&format!("{store}\n{POLICY}")).await;
    let client = server.client().await;
    (server, client)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A protobuf duration of `d`.
fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap()
}

/// Long enough for a number's next slot at 10 messages per second, far too short for a pair's.
const WAITS: Duration = Duration::from_secs(1);

/// A utility message from `sender` to `recipient` that may wait `max_wait`.
fn paced(portfolio: &str, sender: &str, recipient: &str, max_wait: Duration) -> pb::AdmitRequest {
    pb::AdmitRequest { max_wait: Some(pb_duration(max_wait)), ..UTILITY.to(portfolio, sender, recipient) }
}

/// The `waited` of an answer (zero when unset).
fn waited(r: &pb::AdmitResponse) -> Duration {
    r.waited.map_or(Duration::ZERO, |d| Duration::try_from(d).unwrap())
}

/// The `retry_after` of an answer, which must be set.
fn retry_after(r: &pb::AdmitResponse) -> Duration {
    Duration::try_from(r.retry_after.expect("retry_after is set")).unwrap()
}

/// The shadow decision and reason of an answer.
fn shadow(r: &pb::AdmitResponse) -> (Decision, Reason) {
    (r.shadow_decision(), r.shadow_reason())
}

/// What an enforced answer carries in its shadow fields: nothing.
const NO_SHADOW: (Decision, Reason) = (Decision::Unspecified, Reason::Unspecified);

/// Sends five Admits from `sender` to five users at once; returns the answers by `waited`.
async fn five_at_once(c: &Client, portfolio: &str, sender: &str, max_wait: Duration) -> Vec<pb::AdmitResponse> {
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..5 {
        let (mut c, r) = (c.clone(), paced(portfolio, sender, &format!("+1555100000{i}"), max_wait));
        calls.spawn(async move { calls::admit(&mut c, r).await });
    }
    let mut answers = calls.join_all().await;
    answers.sort_by_key(waited);
    answers
}

async fn concurrent_admits_of_one_number_are_paced_a_slot_apart(store: &str) {
    let (_server, c) = start(store).await;
    let answers = five_at_once(&c, "pacing", "n-pace", ms(1_000)).await;
    for (k, a) in answers.iter().enumerate() {
        assert_eq!(calls::outcome(a), (Decision::Admitted, Reason::NewRecipient), "{a:?}");
        assert_eq!(shadow(a), NO_SHADOW);
        // At 10 messages per second without a burst, the k-th takes the slot k × 100 ms after the
        // first; it arrived a little after the first, so it waits that much less, never more.
        let slot = ms(100) * k as u32;
        let w = waited(a);
        assert!(w <= slot + ms(1) && w + ms(60) >= slot, "message {k} waited {w:?}, not about {slot:?}");
    }
    assert_eq!(waited(&answers[0]), Duration::ZERO, "the first goes at once");
}

async fn a_wait_beyond_max_wait_is_throughput_exceeded_with_retry_after(store: &str) {
    let (_server, mut c) = start(store).await;
    five_at_once(&c, "pacing", "n-deny", ms(1_000)).await;
    // The five reserved 500 ms of the number's schedule; the last of them was held until its
    // slot, so the sixth's is still about 100 ms off.
    let denied = calls::admit(&mut c, paced("pacing", "n-deny", "+15551000009", ms(10))).await;
    assert_eq!(calls::outcome(&denied), (Decision::Denied, Reason::ThroughputExceeded), "{denied:?}");
    let retry = retry_after(&denied);
    assert!(retry > ms(10) && retry <= ms(500), "retry_after {retry:?}");
    assert_eq!(denied.waited, None, "a denial is not held");
    assert!(denied.lease.is_empty(), "and counts nothing");
    // Another number is not slowed by this one.
    let other = calls::admit(&mut c, paced("pacing", "n-other", "+15551000009", ms(10))).await;
    assert_eq!(calls::outcome(&other), (Decision::Admitted, Reason::NewRecipient));
    assert_eq!(other.waited, None);
}

async fn a_call_is_never_held_past_its_deadline(store: &str) {
    let (_server, mut c) = start(store).await;
    // `slow` sends 1 message per second: after one, the next slot is a second off.
    calls::admit(&mut c, paced("deadline", "slow", "+15552000001", ms(5_000))).await;
    for i in 2..=3 {
        let mut request = tonic::Request::new(paced("deadline", "slow", &format!("+1555200000{i}"), ms(5_000)));
        request.set_timeout(ms(200));
        let answer = c.admit(request).await.expect("answered before the deadline, never DEADLINE_EXCEEDED");
        let answer = answer.into_inner();
        match calls::outcome(&answer) {
            (Decision::Denied, Reason::ThroughputExceeded) => assert!(retry_after(&answer) > ms(180)),
            (Decision::Admitted, _) => assert!(waited(&answer) < ms(200), "{answer:?}"),
            other => panic!("{other:?}"),
        }
    }
}

async fn admit_batch_paces_each_message_in_order(store: &str) {
    let (_server, mut c) = start(store).await;
    let requests: Vec<_> = (0..5).map(|i| paced("batch", "n-batch", &format!("+1555300000{i}"), ms(1_000))).collect();
    let answers = c.admit_batch(pb::AdmitBatchRequest { requests }).await.unwrap().into_inner().responses;
    let waits: Vec<Duration> = answers.iter().map(waited).collect();
    for a in &answers {
        assert_eq!(calls::outcome(a), (Decision::Admitted, Reason::NewRecipient), "{a:?}");
    }
    assert!(waits.windows(2).all(|w| w[0] < w[1]), "in order, each after the one before: {waits:?}");
    // One store call decides them all at one instant: exactly one interval apart.
    assert_eq!(waits[4] - waits[0], ms(400), "{waits:?}");

    // A batch whose last message would wait too long answers it THROUGHPUT_EXCEEDED, the rest paced.
    let mut requests: Vec<_> =
        (5..7).map(|i| paced("batch", "n-batch2", &format!("+1555300000{i}"), ms(150))).collect();
    requests.push(paced("batch", "n-batch2", "+15553000009", ms(150)));
    let answers = c.admit_batch(pb::AdmitBatchRequest { requests }).await.unwrap().into_inner().responses;
    let outcomes: Vec<_> = answers.iter().map(calls::outcome).collect();
    let admitted = (Decision::Admitted, Reason::NewRecipient);
    assert_eq!(outcomes, [admitted, admitted, (Decision::Denied, Reason::ThroughputExceeded)]);
}

async fn max_wait_out_of_range_is_invalid_naming_the_field(store: &str) {
    let (_server, mut c) = start(store).await;
    let with = |max_wait: prost_types::Duration| pb::AdmitRequest {
        max_wait: Some(max_wait),
        ..UTILITY.to("invalid", "n-invalid", "+15554000001")
    };
    let negative = prost_types::Duration { seconds: -1, nanos: 0 };
    let too_long = prost_types::Duration { seconds: 61, nanos: 0 };
    for max_wait in [negative, too_long] {
        let e = c.admit(with(max_wait)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("max_wait"), "{e:?}");
        let batch =
            pb::AdmitBatchRequest { requests: vec![UTILITY.to("invalid", "n", "+15554000001"), with(max_wait)] };
        let e = c.admit_batch(batch).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("requests[1].max_wait"), "names the message: {e:?}");
    }
    let sixty = with(prost_types::Duration { seconds: 60, nanos: 0 });
    assert_eq!(calls::reason(&mut c, sixty).await, Reason::NewRecipient, "60 s is allowed");
}

async fn a_pair_past_its_burst_is_pair_rate(store: &str) {
    let (_server, mut c) = start(store).await;
    let to_user = |sender: &str| paced("pairs", sender, "+15555000001", WAITS);
    assert_eq!(calls::reason(&mut c, to_user("n-pair")).await, Reason::NewRecipient);
    assert_eq!(calls::reason(&mut c, to_user("n-pair")).await, Reason::AlreadyCounted, "a burst of 2");
    let third = calls::admit(&mut c, to_user("n-pair")).await;
    assert_eq!(calls::outcome(&third), (Decision::Denied, Reason::PairRate));
    // The burst borrowed the 6 s interval it skipped: about 12 s after the first, which is more
    // than the second the call would wait.
    let retry = retry_after(&third);
    assert!(retry > Duration::from_secs(6) && retry <= Duration::from_secs(12), "retry_after {retry:?}");
    // The same user from another number, and another user from this one, are other pairs.
    assert_eq!(calls::reason(&mut c, to_user("n-pair-2")).await, Reason::AlreadyCounted);
    assert_eq!(calls::reason(&mut c, paced("pairs", "n-pair", "+15555000002", WAITS)).await, Reason::NewRecipient);
}

async fn the_messaging_limit_is_never_paced(store: &str) {
    let (_server, mut c) = start(store).await;
    for i in 1..=2 {
        let fill = paced("small", "n-small", &format!("+1555600000{i}"), WAITS);
        assert_eq!(calls::reason(&mut c, fill).await, Reason::NewRecipient);
    }
    let started = std::time::Instant::now();
    let full = calls::admit(&mut c, paced("small", "n-small", "+15556000003", Duration::from_secs(60))).await;
    assert_eq!(calls::outcome(&full), (Decision::Denied, Reason::LimitReached));
    assert_eq!(full.waited, None);
    assert_eq!(shadow(&full), NO_SHADOW);
    assert!(started.elapsed() < Duration::from_secs(30), "answered, not held for a slot of the window");
}

async fn shadow_mode_from_the_configuration_admits_and_reports(store: &str) {
    let (_server, mut c) = start(store).await;
    let marketing = |recipient: &str, max_wait: Duration| pb::AdmitRequest {
        max_wait: Some(pb_duration(max_wait)),
        ..MARKETING.to("shadowed", "n-shadow", recipient)
    };
    for i in 1..=2 {
        let a = calls::admit(&mut c, marketing(&format!("+1555700000{i}"), WAITS)).await;
        assert_eq!(calls::outcome(&a), (Decision::Admitted, Reason::NewRecipient));
        assert_eq!(shadow(&a), (Decision::Admitted, Reason::NewRecipient), "shadow mode reports every decision");
    }
    let over = calls::admit(&mut c, marketing("+15557000003", WAITS)).await;
    assert_eq!(calls::outcome(&over), (Decision::Admitted, Reason::NewRecipient), "{over:?}");
    assert_eq!(shadow(&over), (Decision::Denied, Reason::LimitReached));
    assert_eq!(over.retry_after, None);
    // The pair rate is reported, never paced: a shadowed message goes at once. The first user
    // got a message already; a burst is 2.
    calls::admit(&mut c, marketing("+15557000001", WAITS)).await;
    let pair = calls::admit(&mut c, marketing("+15557000001", WAITS)).await;
    assert_eq!(calls::outcome(&pair), (Decision::Admitted, Reason::AlreadyCounted), "{pair:?}");
    assert_eq!(shadow(&pair), (Decision::Denied, Reason::PairRate));
    assert_eq!(pair.waited, None);
    assert_eq!(calls::portfolio(&mut c, "shadowed").await.mode(), pb::Mode::Shadow);
}

async fn shadow_mode_from_update_portfolio_and_back_to_the_configuration(store: &str) {
    let (_server, mut c) = start(store).await;
    let update = |mode: pb::Mode| pb::UpdatePortfolioRequest {
        portfolio_id: "flip".into(),
        tier: "T2".into(),
        mode: mode.into(),
        ..Default::default()
    };
    let to = |i: u32| paced("flip", "n-flip", &format!("+1555800000{i}"), WAITS);
    assert_eq!(c.update_portfolio(update(pb::Mode::Unspecified)).await.unwrap().into_inner().mode(), pb::Mode::Enforce);
    for i in 1..=2 {
        assert_eq!(calls::reason(&mut c, to(i)).await, Reason::NewRecipient);
    }
    let denied = calls::admit(&mut c, to(3)).await;
    assert_eq!((calls::outcome(&denied), shadow(&denied)), ((Decision::Denied, Reason::LimitReached), NO_SHADOW));

    let shadowed = c.update_portfolio(update(pb::Mode::Shadow)).await.unwrap().into_inner();
    assert_eq!(shadowed.mode(), pb::Mode::Shadow);
    let admitted = calls::admit(&mut c, to(3)).await;
    assert_eq!(calls::outcome(&admitted), (Decision::Admitted, Reason::NewRecipient));
    assert_eq!(shadow(&admitted), (Decision::Denied, Reason::LimitReached));
    // UNSPECIFIED leaves the mode as it is.
    let unchanged = pb::UpdatePortfolioRequest {
        portfolio_id: "flip".into(),
        quality: pb::Quality::High.into(),
        ..Default::default()
    };
    assert_eq!(c.update_portfolio(unchanged).await.unwrap().into_inner().mode(), pb::Mode::Shadow);
    assert_eq!(calls::portfolio(&mut c, "flip").await.mode(), pb::Mode::Shadow);

    let configured = c.update_portfolio(update(pb::Mode::Configured)).await.unwrap().into_inner();
    assert_eq!(configured.mode(), pb::Mode::Enforce, "back to policy.mode");
    let denied = calls::admit(&mut c, to(4)).await;
    assert_eq!((calls::outcome(&denied), shadow(&denied)), ((Decision::Denied, Reason::LimitReached), NO_SHADOW));

    // A portfolio configured in shadow mode may be enforced, and goes back to shadow.
    let enforce = pb::UpdatePortfolioRequest {
        portfolio_id: "shadowed".into(),
        mode: pb::Mode::Enforce.into(),
        ..Default::default()
    };
    assert_eq!(c.update_portfolio(enforce).await.unwrap().into_inner().mode(), pb::Mode::Enforce);
    let back = pb::UpdatePortfolioRequest {
        portfolio_id: "shadowed".into(),
        mode: pb::Mode::Configured.into(),
        ..Default::default()
    };
    assert_eq!(c.update_portfolio(back).await.unwrap().into_inner().mode(), pb::Mode::Shadow);
    let unknown = pb::UpdatePortfolioRequest { portfolio_id: "flip".into(), mode: 9, ..Default::default() };
    let e = c.update_portfolio(unknown).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("mode"), "{e:?}");
}

/// In a process of its own: the other tests' sidecars share this one's metrics recorder.
async fn metrics_show_pacing_throughput_shadow_and_the_new_reasons(store: &str) {
    let sidecar = Sidecar::spawn(&format!("{store}\n{POLICY}"), &[]);
    let mut c = sidecar.client().await;
    let (_, fresh) = http_get(sidecar.admin_addr, "/metrics").await;
    for series in [
        r#"tiergate_decisions_total{decision="DENIED",reason="THROUGHPUT_EXCEEDED"}"#,
        r#"tiergate_decisions_total{decision="DENIED",reason="PAIR_RATE"}"#,
        r#"tiergate_decisions_total{decision="DENIED",reason="RECIPIENT_MARKETING_CAPPED"}"#,
        r#"tiergate_shadow_decisions_total{portfolio="shadowed",decision="DENIED",reason="LIMIT_REACHED"} 0"#,
        r#"tiergate_shadow_decisions_total{portfolio="shadowed",decision="DENIED",reason="PAIR_RATE"} 0"#,
    ] {
        assert!(fresh.lines().any(|l| l.starts_with(series)), "{series} missing from a fresh scrape:\n{fresh}");
    }
    assert!(!fresh.contains(r#"tiergate_shadow_decisions_total{portfolio="small""#), "small is enforced:\n{fresh}");

    // Two messages from a number at the default level, one paced; one from `fast`.
    calls::admit(&mut c, paced("metered", "n-metered", "+15559000001", ms(1_000))).await;
    let second = calls::admit(&mut c, paced("metered", "n-metered", "+15559000002", ms(1_000))).await;
    assert!(waited(&second) > Duration::ZERO, "{second:?}");
    calls::admit(&mut c, paced("metered", "fast", "+15559000003", ms(1_000))).await;
    for i in 1..=3 {
        calls::admit(&mut c, paced("shadowed", "n-metrics", &format!("+1555900001{i}"), WAITS)).await;
    }
    let (_, after) = http_get(sidecar.admin_addr, "/metrics").await;
    for series in [
        r#"tiergate_throughput_messages_total{portfolio="metered",number="n-metered"} 2"#,
        r#"tiergate_throughput_messages_total{portfolio="metered",number="fast"} 1"#,
        r#"tiergate_throughput_mps{portfolio="metered",number="n-metered"} 10"#,
        r#"tiergate_throughput_mps{portfolio="metered",number="fast"} 1000"#,
        r#"tiergate_shadow_decisions_total{portfolio="shadowed",decision="DENIED",reason="LIMIT_REACHED"} 1"#,
        r#"tiergate_shadow_decisions_total{portfolio="shadowed",decision="ADMITTED",reason="NEW_RECIPIENT"} 2"#,
    ] {
        assert!(after.lines().any(|l| l == series), "{series} missing:\n{after}");
    }
    assert!(after.contains("# TYPE tiergate_paced_seconds histogram"), "{after}");
    assert!(after.lines().any(|l| l.starts_with(r#"tiergate_paced_seconds_bucket{le="0.001"}"#)), "{after}");
    assert!(after.lines().any(|l| l.starts_with(r#"tiergate_paced_seconds_bucket{le="10"}"#)), "{after}");
    let count = after.lines().find_map(|l| l.strip_prefix("tiergate_paced_seconds_count ")).expect("a count");
    assert!(count.parse::<u64>().unwrap() >= 1, "{after}");
}
