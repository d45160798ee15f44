//! Meta's error feedback closes the loop: the error codes of failed messages, delivered by signed
//! `messages` webhooks to the real `tiergate` binary, change what the next Admit answers; and
//! inbound messages, by webhook or RecordInbound, take the number's throughput as Meta counts it.
//! Each test runs on the memory store and on a real Redis shared through the same scripts.
//!
//! Each sidecar is its own process, so the counters a test reads are that sidecar's alone.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::calls::{admit, inbound, outcome, portfolio, usage, Client};
use common::redis::RedisServer;
use common::requests::{MARKETING, UTILITY};
use common::server::{http_get, Sidecar};
use common::webhooks::{fixture, post_webhook};
use tiergate::pb::{Decision, Reason};

const SECRET: &str = "meta-app-secret-for-tests";
const WABA: &str = "102290129340398";
/// The number the fixtures' statuses and messages are of.
const PHONE_ID: &str = "106540352242922";
/// Another number of the same portfolio.
const OTHER_PHONE_ID: &str = "106540352242999";
/// The user the fixtures' statuses are for and whose messages they carry.
const USER: &str = "16505551234";
const OTHER_USER: &str = "16505559876";

/// Runs each named test on every store.
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $test() { super::$test(super::Backend::Memory).await } )*
        }
        mod redis {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $test() { super::$test(super::Backend::Redis).await } )*
        }
    };
}

on_every_store!(
    meta_capping_marketing_to_a_user_denies_it_from_every_number_and_lets_other_categories_go,
    meta_refusing_a_pair_makes_it_wait_an_interval_and_no_other_pair,
    meta_exceeding_throughput_backs_the_number_off_once_per_episode_at_half_its_rate,
    an_undeliverable_message_gives_its_slot_back,
    an_unknown_code_is_counted_by_code_and_changes_nothing_else,
    inbound_messages_take_the_numbers_throughput,
);

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    Redis,
}

struct Setup {
    sidecar: Sidecar,
    c: Client,
    _redis: Option<RedisServer>,
}

/// A sidecar on `backend` receiving the WABA's webhooks for portfolio `acme`, with `policy`
/// (TOML tables under `[policy]`) after the defaults.
async fn setup(backend: Backend, policy: &str) -> Setup {
    let redis = matches!(backend, Backend::Redis).then(RedisServer::start);
    let store = match &redis {
        Some(r) => format!("backend = \"redis\"\nurl = \"{}\"\n", r.url()),
        None => String::new(),
    };
    let config = format!(
        r#"
[store]
{store}hash_key = "feedback-test-hash-key"

{policy}

[[portfolios]]
id = "acme"
wabas = ["{WABA}"]

[webhooks]
app_secret = "{SECRET}"
verify_token = "verify-me"
"#
    );
    let sidecar = Sidecar::spawn(&config, &[]);
    let c = sidecar.client().await;
    Setup { sidecar, c, _redis: redis }
}

/// Posts a webhook fixture, signed; it must be applied.
async fn deliver(sidecar: &Sidecar, name: &str) {
    let (status, text) = post_webhook(sidecar.admin_addr, SECRET, &fixture(name)).await;
    assert_eq!(status, 200, "{name}: {text}");
}

/// The value of one series in the sidecar's scrape (`None`: not exported).
async fn metric(sidecar: &Sidecar, series: &str) -> Option<f64> {
    let (status, text) = http_get(sidecar.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn retry_after(r: &tiergate::pb::AdmitResponse) -> Duration {
    let d = r.retry_after.expect("a denial says when to retry");
    Duration::new(d.seconds as u64, d.nanos as u32)
}

async fn meta_capping_marketing_to_a_user_denies_it_from_every_number_and_lets_other_categories_go(backend: Backend) {
    let Setup { sidecar, mut c, _redis } = setup(backend, "").await;
    deliver(&sidecar, "messages_failed_marketing_capped").await;
    for number in [OTHER_PHONE_ID, PHONE_ID] {
        let r = admit(&mut c, MARKETING.to("acme", number, USER)).await;
        assert_eq!(outcome(&r), (Decision::Denied, Reason::RecipientMarketingCapped), "from {number}");
    }
    let r = admit(&mut c, UTILITY.to("acme", OTHER_PHONE_ID, USER)).await;
    assert_eq!(outcome(&r), (Decision::Admitted, Reason::NewRecipient));
    let r = admit(&mut c, MARKETING.to("acme", OTHER_PHONE_ID, OTHER_USER)).await;
    assert_eq!(outcome(&r), (Decision::Admitted, Reason::NewRecipient), "other users are not capped");
    assert_eq!(metric(&sidecar, r#"tiergate_meta_errors_total{code="131049"}"#).await, Some(1.0));
    // The recipient is never written down, by the log nor by the scrape.
    assert!(!sidecar.log().contains(USER), "{}", sidecar.log());
    assert!(!http_get(sidecar.admin_addr, "/metrics").await.1.contains(USER));
}

async fn meta_refusing_a_pair_makes_it_wait_an_interval_and_no_other_pair(backend: Backend) {
    let policy = "[policy.pair_rate]\nenabled = true\ninterval = \"6s\"\nburst = 45\n";
    let Setup { sidecar, mut c, _redis } = setup(backend, policy).await;
    deliver(&sidecar, "messages_failed_pair_rate").await;
    let r = admit(&mut c, UTILITY.to("acme", PHONE_ID, USER)).await;
    assert_eq!(outcome(&r), (Decision::Denied, Reason::PairRate));
    // About the interval from the failure, which was just now.
    let wait = retry_after(&r);
    assert!(wait > Duration::from_secs(3) && wait <= Duration::from_secs(6), "{wait:?}");
    let r = admit(&mut c, UTILITY.to("acme", PHONE_ID, OTHER_USER)).await;
    assert_eq!(outcome(&r), (Decision::Admitted, Reason::NewRecipient), "another user on that number");
    let r = admit(&mut c, UTILITY.to("acme", OTHER_PHONE_ID, USER)).await;
    assert_eq!(outcome(&r), (Decision::Admitted, Reason::NewRecipient), "that user from another number");
    assert_eq!(metric(&sidecar, r#"tiergate_meta_errors_total{code="131056"}"#).await, Some(1.0));
}

async fn meta_exceeding_throughput_backs_the_number_off_once_per_episode_at_half_its_rate(backend: Backend) {
    let policy = "[policy.throughput]\nenabled = true\ndefault_mps = 1\nburst = \"0s\"\n";
    let Setup { sidecar, mut c, _redis } = setup(backend, policy).await;
    let backoff = r#"tiergate_throughput_backoffs_total{portfolio="acme",number="106540352242922"}"#;
    assert_eq!(metric(&sidecar, backoff).await, None, "no episode yet");
    assert_eq!(metric(&sidecar, r#"tiergate_meta_errors_total{code="130429"}"#).await, Some(0.0));
    // Two failures in a row are one episode.
    deliver(&sidecar, "messages_failed_throughput").await;
    deliver(&sidecar, "messages_failed_throughput").await;
    assert_eq!(metric(&sidecar, backoff).await, Some(1.0));
    assert_eq!(metric(&sidecar, r#"tiergate_meta_errors_total{code="130429"}"#).await, Some(2.0));
    let log = sidecar.log();
    assert_eq!(log.matches("throughput exceeded (error 130429)").count(), 1, "{log}");
    assert!(!log.contains(USER), "{log}");

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let p = portfolio(&mut c, "acme").await;
    let number = p.senders.iter().find(|s| s.sender_id == PHONE_ID).expect("the number is known");
    let until = number.throughput_backoff_until.expect("the number backs off");
    let left = Duration::from_secs(until.seconds as u64).saturating_sub(now);
    assert!(left > Duration::from_secs(50) && left <= Duration::from_secs(61), "{left:?}");
    let other = p.senders.iter().find(|s| s.sender_id == OTHER_PHONE_ID);
    assert!(other.is_none_or(|s| s.throughput_backoff_until.is_none()), "{p:?}");

    // At 1 message per second, the number backing off spaces its messages 2 s apart; another
    // number 1 s.
    for (number, spacing) in [(PHONE_ID, Duration::from_secs(2)), (OTHER_PHONE_ID, Duration::from_secs(1))] {
        let r = admit(&mut c, UTILITY.to("acme", number, "16505550001")).await;
        assert_eq!(r.decision(), Decision::Admitted, "{number}");
        let r = admit(&mut c, UTILITY.to("acme", number, "16505550002")).await;
        assert_eq!(outcome(&r), (Decision::Denied, Reason::ThroughputExceeded), "{number}");
        let wait = retry_after(&r);
        assert!(wait > spacing / 2 && wait <= spacing, "{number}: {wait:?}");
    }
}

async fn an_undeliverable_message_gives_its_slot_back(backend: Backend) {
    let Setup { sidecar, mut c, _redis } = setup(backend, "").await;
    for user in [USER, OTHER_USER] {
        assert_eq!(admit(&mut c, UTILITY.to("acme", PHONE_ID, user)).await.reason(), Reason::NewRecipient);
    }
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 2);
    deliver(&sidecar, "messages_failed_undeliverable").await;
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 1);
    // The code came as a numeric string and is counted as the code it is.
    assert_eq!(metric(&sidecar, r#"tiergate_meta_errors_total{code="131026"}"#).await, Some(1.0));
    // Marketing and the pair are untouched.
    assert_eq!(admit(&mut c, MARKETING.to("acme", PHONE_ID, USER)).await.decision(), Decision::Admitted);
}

async fn an_unknown_code_is_counted_by_code_and_changes_nothing_else(backend: Backend) {
    let Setup { sidecar, mut c, _redis } = setup(backend, "").await;
    assert_eq!(metric(&sidecar, r#"tiergate_meta_errors_total{code="139999"}"#).await, None);
    let before = portfolio(&mut c, "acme").await;
    deliver(&sidecar, "messages_failed_unknown").await;
    assert_eq!(metric(&sidecar, r#"tiergate_meta_errors_total{code="139999"}"#).await, Some(1.0));
    // Nothing was counted for the recipient, so nothing changed at all.
    let after = portfolio(&mut c, "acme").await;
    assert_eq!(after.senders.iter().filter_map(|s| s.throughput_backoff_until).count(), 0, "{after:?}");
    let counted = |p: &tiergate::pb::Portfolio| p.usage.iter().map(|u| u.unique_recipients).collect::<Vec<_>>();
    assert_eq!((counted(&after), after.opted_out_recipients), (counted(&before), before.opted_out_recipients));
    for request in [MARKETING.to("acme", PHONE_ID, USER), MARKETING.to("acme", PHONE_ID, "16505550001")] {
        let r = admit(&mut c, request).await;
        assert_eq!(outcome(&r), (Decision::Admitted, Reason::NewRecipient));
    }
    assert_eq!(
        metric(&sidecar, r#"tiergate_throughput_backoffs_total{portfolio="acme",number="106540352242922"}"#).await,
        None
    );
}

async fn inbound_messages_take_the_numbers_throughput(backend: Backend) {
    let policy = "[policy.throughput]\nenabled = true\ndefault_mps = 1\nburst = \"0s\"\n";
    let Setup { sidecar, mut c, _redis } = setup(backend, policy).await;
    // Two messages of one user, each naming both of the user's forms: two slots, not four.
    deliver(&sidecar, "messages_inbound_two").await;
    let r = admit(&mut c, UTILITY.to("acme", PHONE_ID, OTHER_USER)).await;
    assert_eq!(outcome(&r), (Decision::Denied, Reason::ThroughputExceeded));
    let wait = retry_after(&r);
    assert!(wait > Duration::from_secs(1) && wait <= Duration::from_secs(2), "{wait:?}");

    // RecordInbound takes one slot of its number.
    let number = "106540352243000";
    inbound(&mut c, "acme", number, USER).await;
    let r = admit(&mut c, UTILITY.to("acme", number, OTHER_USER)).await;
    assert_eq!(outcome(&r), (Decision::Denied, Reason::ThroughputExceeded));
    assert!(retry_after(&r) <= Duration::from_secs(1), "{:?}", retry_after(&r));

    // A number nobody wrote to sends at once.
    let r = admit(&mut c, UTILITY.to("acme", OTHER_PHONE_ID, OTHER_USER)).await;
    assert_eq!(outcome(&r), (Decision::Admitted, Reason::NewRecipient));
}
