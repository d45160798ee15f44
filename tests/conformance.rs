//! The storage conformance suite: every rule a store must keep, written once against the
//! [`Store`] trait and run unchanged against the memory store, a real Redis and a real
//! three-master Redis Cluster.

mod common;

use std::time::Duration;

use tiergate::policy::{Category, Delivery, Lease, Limit, Quality, Reason, ScopeKey, SenderStatus, Tier};
use tiergate::store::{AdmitOp, AdmitParams, Change, TemplateKey, Windows};

use common::ops::{
    admit, admit_one, hasher, inbound, keyed, limited, now_us, op, op_from, portfolio, reasons, set_tier, usage, with,
};
use common::stores::Fixture;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn windows(window: Duration, service_window: Duration) -> Windows {
    Windows { window, service_window }
}

/// Runs each named test against every backend.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(crate::common::stores::memory).await } )* }
        mod redis { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(crate::common::stores::redis).await } )* }
        mod redis_cluster { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(crate::common::stores::redis_cluster).await } )* }
    };
}

conformance!(
    new_recipients_are_counted_until_the_limit_then_denied,
    counted_recipients_stay_free_when_the_window_is_full,
    open_service_window_admits_without_counting,
    service_window_closes_after_its_length,
    contacts_leave_the_rolling_window,
    release_gives_a_slot_back_exactly_once,
    release_after_the_recipient_was_messaged_again_changes_nothing,
    an_old_lease_cannot_release_a_recount_of_the_same_recipient,
    a_batch_is_decided_in_order,
    persisted_tier_overrides_the_fallback,
    unlimited_tiers_count_exactly_with_leases,
    a_scope_moving_down_from_unlimited_keeps_its_window,
    scopes_and_portfolios_are_independent,
    usage_of_an_unknown_scope_is_empty,
    concurrent_admits_never_exceed_the_limit,
    opted_out_recipients_get_only_non_marketing_replies_in_a_window,
    inactive_templates_are_blocked_until_active_again,
    banned_and_configured_blocked_senders_are_denied,
    free_form_messages_outside_a_window_take_no_slot,
    marketing_stops_at_the_reserve_while_utility_uses_the_rest,
    applied_changes_persist_and_applying_twice_changes_nothing,
    inbound_times_never_shorten_a_window_nor_stretch_it_past_now,
    changes_older_than_the_last_applied_are_skipped,
    unique_recipients_over_7_and_30_days_count_delivered_ones,
    a_failed_delivery_gives_back_its_slot_unless_delivered_or_counted_again,
    a_denial_lifts_exactly_when_its_retry_after_has_passed,
    a_numbers_throughput_is_kept_apart_from_its_status_and_tier,
    templates_are_blocked_per_language_and_a_status_without_one_covers_every_language,
    the_first_shared_policy_recorded_stays_until_replaced,
    an_idempotency_key_replays_what_its_admit_counted_in_its_scope,
    an_idempotency_key_is_decided_again_once_its_slot_is_given_back_or_after_a_denial,
    an_idempotency_key_is_kept_for_the_window_of_its_contact,
    thousands_of_recipients_keep_exact_counts_oldest_and_ranks,
);

async fn new_recipients_are_counted_until_the_limit_then_denied<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(3));
    let got = reasons(&*f.store, &p, &t, &["14155550101", "14155550102", "14155550103"]).await;
    assert_eq!(got, [Reason::NewRecipient; 3]);
    let denied = admit_one(&*f.store, &p, &t, op("14155550104")).await;
    assert_eq!(denied.reason, Reason::LimitReached);
    assert_eq!(denied.lease_score, None);
    let retry = denied.retry_after.expect("a denial says when to retry");
    assert!(retry > DAY - Duration::from_secs(60) && retry <= DAY, "{retry:?}");
    assert_eq!(denied.usage.counted, 3);
    assert_eq!(denied.usage.remaining(), Some(0));
    let usage = usage(&*f.store, &p, &t).await;
    assert_eq!(usage.counted, 3);
    assert!(usage.next_slot_at.is_some());
}

async fn counted_recipients_stay_free_when_the_window_is_full<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(2));
    assert_eq!(reasons(&*f.store, &p, &t, &["111111111", "222222222"]).await, [Reason::NewRecipient; 2]);
    let again = admit_one(&*f.store, &p, &t, op("111111111")).await;
    assert_eq!(again.reason, Reason::AlreadyCounted);
    assert_eq!(again.lease_score, None);
    assert_eq!(again.usage.counted, 2);
}

async fn open_service_window_admits_without_counting<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(1));
    let now = inbound(&*f.store, "acme", "sender-a", "5511999990000").await;
    assert!(now.abs_diff(now_us()) < 5_000_000, "the store's clock is now");
    let inside = admit_one(&*f.store, &p, &t, op_from("sender-a", "5511999990000")).await;
    assert_eq!(inside.reason, Reason::ServiceWindow);
    assert_eq!(inside.usage.counted, 0);
    // The window belongs to one (sender, recipient) pair: another number of the business counts.
    let other_sender = admit_one(&*f.store, &p, &t, op_from("sender-b", "5511999990000")).await;
    assert_eq!(other_sender.reason, Reason::NewRecipient);
    // Even with the scope full, replies inside the window are admitted.
    let reply = admit_one(&*f.store, &p, &t, op_from("sender-a", "5511999990000")).await;
    assert_eq!(reply.reason, Reason::ServiceWindow);
    let full = admit_one(&*f.store, &p, &t, op_from("sender-a", "5511999990001")).await;
    assert_eq!(full.reason, Reason::LimitReached);
}

async fn service_window_closes_after_its_length<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(windows(DAY, Duration::from_millis(700)));
    let (p, t) = (portfolio("acme"), limited(10));
    inbound(&*f.store, "acme", "s", "5511999990000").await;
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s", "5511999990000")).await.reason, Reason::ServiceWindow);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s", "5511999990000")).await.reason, Reason::NewRecipient);
}

async fn contacts_leave_the_rolling_window<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(windows(Duration::from_millis(800), DAY));
    let (p, t) = (portfolio("acme"), limited(1));
    assert_eq!(reasons(&*f.store, &p, &t, &["1111111", "2222222"]).await, [Reason::NewRecipient, Reason::LimitReached]);
    let denied = admit_one(&*f.store, &p, &t, op("2222222")).await;
    assert!(denied.retry_after.unwrap() <= Duration::from_millis(800));
    tokio::time::sleep(denied.retry_after.unwrap() + Duration::from_millis(100)).await;
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 0);
    assert_eq!(reasons(&*f.store, &p, &t, &["2222222"]).await, [Reason::NewRecipient]);
}

async fn release_gives_a_slot_back_exactly_once<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(1));
    let a = admit_one(&*f.store, &p, &t, op("1111111")).await;
    let lease = Lease {
        scope: p.clone(),
        member: op("1111111").member,
        score: a.lease_score.expect("new recipients get a lease"),
    };
    assert!(f.store.release(&lease).await.unwrap());
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 0);
    assert!(!f.store.release(&lease).await.unwrap(), "a second release changes nothing");
    assert_eq!(reasons(&*f.store, &p, &t, &["2222222"]).await, [Reason::NewRecipient]);
}

async fn release_after_the_recipient_was_messaged_again_changes_nothing<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(5));
    // One call, so both decisions share one clock reading: the lease must still name the first.
    let got = admit(&*f.store, &p, &t, &[op("1111111"), op("1111111")]).await;
    assert_eq!((got[0].reason, got[1].reason), (Reason::NewRecipient, Reason::AlreadyCounted));
    let lease = Lease { scope: p.clone(), member: op("1111111").member, score: got[0].lease_score.unwrap() };
    assert!(!f.store.release(&lease).await.unwrap());
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 1);
}

async fn an_old_lease_cannot_release_a_recount_of_the_same_recipient<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(5));
    let member = op("1111111").member;
    let first = admit_one(&*f.store, &p, &t, op("1111111")).await.lease_score.unwrap();
    let old = Lease { scope: p.clone(), member: member.clone(), score: first };
    assert!(f.store.release(&old).await.unwrap());
    let second = admit_one(&*f.store, &p, &t, op("1111111")).await;
    assert_eq!(second.reason, Reason::NewRecipient);
    assert_ne!(second.lease_score, Some(first), "every Admit gets its own lease");
    assert!(!f.store.release(&old).await.unwrap());
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 1);
    let new = Lease { scope: p.clone(), member, score: second.lease_score.unwrap() };
    assert!(f.store.release(&new).await.unwrap());
}

async fn a_batch_is_decided_in_order<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(2));
    let got = admit(&*f.store, &p, &t, &[op("1111111"), op("2222222"), op("1111111"), op("3333333")]).await;
    let reasons: Vec<_> = got.iter().map(|a| a.reason).collect();
    assert_eq!(reasons, [Reason::NewRecipient, Reason::NewRecipient, Reason::AlreadyCounted, Reason::LimitReached]);
    let counted: Vec<_> = got.iter().map(|a| a.usage.counted).collect();
    assert_eq!(counted, [1, 2, 2, 2]);
    assert!(got[0].lease_score.unwrap() < got[1].lease_score.unwrap());
}

async fn persisted_tier_overrides_the_fallback<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let p = portfolio("acme");
    let fallback = limited(1);
    let set = set_tier(&*f.store, &p, &Tier::limited("T3", 3)).await;
    assert_eq!(set.tier, Tier::limited("T3", 3));
    let got = reasons(&*f.store, &p, &fallback, &["1111111", "2222222", "3333333", "4444444"]).await;
    assert_eq!(got, [Reason::NewRecipient, Reason::NewRecipient, Reason::NewRecipient, Reason::LimitReached]);
    let u = usage(&*f.store, &p, &fallback).await;
    assert_eq!((u.tier.name.as_str(), u.counted, u.remaining()), ("T3", 3, Some(0)));
    // Another portfolio still runs on the fallback.
    assert_eq!(usage(&*f.store, &portfolio("other"), &fallback).await.tier, fallback);
}

async fn unlimited_tiers_count_exactly_with_leases<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("big"), Tier::unlimited("UNL"));
    let got = admit(&*f.store, &p, &t, &[op("1111111"), op("2222222"), op("3333333"), op("1111111")]).await;
    let reasons: Vec<_> = got.iter().map(|a| a.reason).collect();
    assert_eq!(reasons, [Reason::NewRecipient, Reason::NewRecipient, Reason::NewRecipient, Reason::AlreadyCounted]);
    assert!(got[..3].iter().all(|a| a.lease_score.is_some()), "new recipients get a lease on every tier");
    assert!(got.iter().all(|a| a.retry_after.is_none()));
    let u = usage(&*f.store, &p, &t).await;
    assert_eq!((u.counted, u.tier.limit, u.remaining()), (3, Limit::Unlimited, None));
    assert!(u.next_slot_at.is_some());
    let lease = Lease { scope: p.clone(), member: op("2222222").member, score: got[1].lease_score.unwrap() };
    assert!(f.store.release(&lease).await.unwrap());
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 2);
    // Thousands of distinct recipients are each new, exactly (a HyperLogLog register that did
    // not move is no proof a recipient was seen before).
    let recipients: Vec<String> = (0..2_000).map(|i| format!("4915{i:09}")).collect();
    for chunk in recipients.chunks(500) {
        let ops: Vec<_> = chunk.iter().map(|r| op(r)).collect();
        let got = admit(&*f.store, &p, &t, &ops).await;
        let repeated = got.iter().filter(|a| a.reason != Reason::NewRecipient).count();
        assert_eq!(repeated, 0, "{repeated} of {} distinct recipients were not reported new", ops.len());
    }
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 2_002);
}

async fn a_scope_moving_down_from_unlimited_keeps_its_window<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let p = portfolio("big");
    let recipients = ["1111111", "2222222", "3333333"];
    reasons(&*f.store, &p, &Tier::unlimited("UNL"), &recipients).await;
    // Down to a limit of 3: the three reached under the unlimited tier still fill it.
    let t = limited(3);
    set_tier(&*f.store, &p, &t).await;
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 3);
    assert_eq!(admit_one(&*f.store, &p, &t, op("4444444")).await.reason, Reason::LimitReached);
    assert_eq!(admit_one(&*f.store, &p, &t, op("2222222")).await.reason, Reason::AlreadyCounted);
}

async fn scopes_and_portfolios_are_independent<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let t = limited(1);
    let a = ScopeKey { portfolio: "acme".into(), sender: Some("num-1".into()) };
    let b = ScopeKey { portfolio: "acme".into(), sender: Some("num-2".into()) };
    let c = portfolio("globex");
    assert_eq!(reasons(&*f.store, &a, &t, &["1111111", "2222222"]).await, [Reason::NewRecipient, Reason::LimitReached]);
    assert_eq!(reasons(&*f.store, &b, &t, &["2222222"]).await, [Reason::NewRecipient]);
    assert_eq!(reasons(&*f.store, &c, &t, &["2222222"]).await, [Reason::NewRecipient]);
    set_tier(&*f.store, &a, &limited(5)).await;
    assert_eq!(usage(&*f.store, &b, &t).await.tier, t, "a number's tier is its own");
}

async fn usage_of_an_unknown_scope_is_empty<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let report = f.store.usage(&portfolio("nobody"), &limited(250)).await.unwrap();
    let u = &report.usage;
    assert_eq!((u.counted, u.next_slot_at, u.remaining()), (0, None, Some(250)));
    assert_eq!((report.unique_7d, report.unique_30d, report.tier_since), (0, 0, None));
    assert_eq!(f.store.portfolio("nobody").await.unwrap(), Default::default());
    f.store.ping().await.unwrap();
}

async fn concurrent_admits_never_exceed_the_limit<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(25));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = f.store.clone();
            let (p, t) = (p.clone(), t.clone());
            tokio::spawn(async move { admit_one(&*store, &p, &t, op(&format!("1555{i:07}"))).await.reason })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        if task.await.unwrap() == Reason::NewRecipient {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 25);
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 25);
}

async fn opted_out_recipients_get_only_non_marketing_replies_in_a_window<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(10));
    let member = hasher().recipient("5511999990000");
    f.store.apply("acme", &[Change::OptOut { member: member.clone(), opted_out: true }]).await.unwrap();
    let outside = admit_one(&*f.store, &p, &t, op_from("s1", "5511999990000")).await;
    assert_eq!(outside.reason, Reason::OptedOut);
    assert_eq!(outside.usage.counted, 0);
    inbound(&*f.store, "acme", "s1", "5511999990000").await;
    let reply = admit_one(&*f.store, &p, &t, op_from("s1", "5511999990000")).await;
    assert_eq!(reply.reason, Reason::ServiceWindow);
    let marketing = admit_one(&*f.store, &p, &t, with(op_from("s1", "5511999990000"), Category::Marketing, None)).await;
    assert_eq!(marketing.reason, Reason::OptedOut);
    // Opt-outs are portfolio-wide: another number of the business is refused too.
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s2", "5511999990000")).await.reason, Reason::OptedOut);
    assert_eq!(f.store.portfolio("acme").await.unwrap().opted_out, 1);
    f.store.apply("acme", &[Change::OptOut { member, opted_out: false }]).await.unwrap();
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s2", "5511999990000")).await.reason, Reason::NewRecipient);
}

async fn inactive_templates_are_blocked_until_active_again<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(10));
    let promo = |r: &str| with(op(r), Category::Marketing, Some("spring_promo"));
    assert_eq!(admit_one(&*f.store, &p, &t, promo("1111111")).await.reason, Reason::NewRecipient);
    let pause = Change::TemplateStatus {
        name: "spring_promo".into(),
        language: String::new(),
        status: "PAUSED".into(),
        at: None,
    };
    f.store.apply("acme", &[pause]).await.unwrap();
    let blocked = admit_one(&*f.store, &p, &t, promo("2222222")).await;
    assert_eq!((blocked.reason, blocked.usage.counted), (Reason::TemplateBlocked, 1));
    assert_eq!(admit_one(&*f.store, &p, &t, promo("1111111")).await.reason, Reason::TemplateBlocked);
    let other = with(op("2222222"), Category::Marketing, Some("welcome"));
    assert_eq!(admit_one(&*f.store, &p, &t, other).await.reason, Reason::NewRecipient);
    let reinstate = Change::TemplateStatus {
        name: "spring_promo".into(),
        language: String::new(),
        status: "REINSTATED".into(),
        at: None,
    };
    f.store.apply("acme", &[reinstate]).await.unwrap();
    assert_eq!(admit_one(&*f.store, &p, &t, promo("3333333")).await.reason, Reason::NewRecipient);
}

async fn banned_and_configured_blocked_senders_are_denied<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(10));
    let ban = Change::SenderStatus { sender: "s1".into(), status: SenderStatus::Banned, at: None };
    f.store.apply("acme", &[ban]).await.unwrap();
    inbound(&*f.store, "acme", "s1", "1111111").await;
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s1", "1111111")).await.reason, Reason::SenderBlocked);
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s2", "1111111")).await.reason, Reason::NewRecipient);
    let configured = AdmitOp { sender_blocked: true, ..op_from("s3", "2222222") };
    let denied = admit_one(&*f.store, &p, &t, configured).await;
    assert_eq!((denied.reason, denied.usage.counted), (Reason::SenderBlocked, 1));
    let lift = Change::SenderStatus { sender: "s1".into(), status: SenderStatus::Connected, at: None };
    f.store.apply("acme", &[lift]).await.unwrap();
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s1", "3333333")).await.reason, Reason::NewRecipient);
}

async fn free_form_messages_outside_a_window_take_no_slot<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(10));
    let service = with(op_from("s1", "1111111"), Category::Service, None);
    let denied = admit_one(&*f.store, &p, &t, service.clone()).await;
    assert_eq!((denied.reason, denied.usage.counted), (Reason::OutsideServiceWindow, 0));
    inbound(&*f.store, "acme", "s1", "1111111").await;
    assert_eq!(admit_one(&*f.store, &p, &t, service).await.reason, Reason::ServiceWindow);
}

async fn marketing_stops_at_the_reserve_while_utility_uses_the_rest<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(10));
    let reserve = AdmitParams::new(t.clone(), 2_000);
    let marketing: Vec<_> = (0..9).map(|i| with(op(&format!("155500000{i}")), Category::Marketing, None)).collect();
    let got = f.store.admit(&p, &reserve, &marketing).await.unwrap();
    let reasons: Vec<_> = got.iter().map(|a| a.reason).collect();
    assert_eq!(reasons[..8], [Reason::NewRecipient; 8]);
    assert_eq!(reasons[8], Reason::HeadroomReserved);
    assert!(got[8].retry_after.is_some());
    let otp = [0, 1, 2].map(|i| with(op(&format!("166600000{i}")), Category::Authentication, None));
    let got = f.store.admit(&p, &reserve, &otp).await.unwrap();
    let reasons: Vec<_> = got.iter().map(|a| a.reason).collect();
    assert_eq!(reasons, [Reason::NewRecipient, Reason::NewRecipient, Reason::LimitReached]);
    // A recipient already counted costs nothing, marketing or not.
    let again = with(op("1555000000"), Category::Marketing, None);
    assert_eq!(f.store.admit(&p, &reserve, &[again]).await.unwrap()[0].reason, Reason::AlreadyCounted);
}

async fn applied_changes_persist_and_applying_twice_changes_nothing<F: Fn(Windows) -> Fixture>(make: F) {
    const T: u64 = 1_700_000_000_000_000;
    let f = make(Windows::default());
    let p = portfolio("acme");
    let changes = [
        Change::Tier { scope: p.clone(), tier: limited(7), at: None },
        Change::Quality(Quality::High),
        Change::SenderStatus { sender: "s1".into(), status: SenderStatus::Flagged, at: None },
        Change::SenderQuality { sender: "s1".into(), quality: Quality::Low },
        // Dated like a webhook's event: a status without a time is stamped with each apply's now.
        Change::TemplateStatus {
            name: "promo".into(),
            language: String::new(),
            status: "DISABLED".into(),
            at: Some(T),
        },
        Change::TemplateQuality { name: "promo".into(), language: String::new(), quality: Quality::Medium },
        Change::TemplateStatus { name: "promo".into(), language: "en_US".into(), status: "PAUSED".into(), at: Some(T) },
        Change::Alert { key: "INCREASED_CAPABILITIES_ELIGIBILITY_DEFERRED:1".into(), body: "{\"a\":1}".into() },
        Change::Alias { display: "15550001111".into(), id: "s1".into() },
        Change::OptOut { member: hasher().recipient("1111111"), opted_out: true },
    ];
    f.store.apply("acme", &changes).await.unwrap();
    let first = f.store.portfolio("acme").await.unwrap();
    let report = f.store.usage(&p, &limited(1)).await.unwrap();
    assert_eq!(report.usage.tier, limited(7));
    let since = report.tier_since.expect("the tier change is dated");
    tokio::time::sleep(Duration::from_millis(5)).await;
    f.store.apply("acme", &changes).await.unwrap();
    assert_eq!(f.store.portfolio("acme").await.unwrap(), first);
    assert_eq!(f.store.usage(&p, &limited(1)).await.unwrap().tier_since, Some(since), "same tier, same since");
    assert_eq!(first.quality, Quality::High);
    let s1 = &first.senders["s1"];
    assert_eq!((s1.status, s1.quality), (Some(SenderStatus::Flagged), Quality::Low));
    assert!(s1.since.is_some());
    assert_eq!(first.templates[&TemplateKey::new("promo", "")].status.as_deref(), Some("DISABLED"));
    assert_eq!(first.templates[&TemplateKey::new("promo", "")].quality, Quality::Medium);
    assert_eq!(first.templates[&TemplateKey::new("promo", "en_US")].status.as_deref(), Some("PAUSED"));
    assert_eq!(first.alerts.len(), 1);
    assert_eq!(first.aliases["15550001111"], "s1");
    assert_eq!(first.opted_out, 1);
    let sim =
        [Change::Eligible { scope: p.clone(), since: Some(42) }, Change::Flagged { scope: p.clone(), since: Some(43) }];
    f.store.apply("acme", &sim).await.unwrap();
    let report = f.store.usage(&p, &limited(1)).await.unwrap();
    assert_eq!((report.eligible_since, report.flagged_since), (Some(42), Some(43)));
    let clear = [Change::Eligible { scope: p.clone(), since: None }, Change::Flagged { scope: p.clone(), since: None }];
    f.store.apply("acme", &clear).await.unwrap();
    let report = f.store.usage(&p, &limited(1)).await.unwrap();
    assert_eq!((report.eligible_since, report.flagged_since), (None, None));
}

async fn inbound_times_never_shorten_a_window_nor_stretch_it_past_now<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(windows(DAY, Duration::from_secs(2)));
    let (p, t) = (portfolio("acme"), limited(10));
    let member = hasher().service_window("s1", "1111111");
    let now = now_us();
    // A message from long ago opens nothing.
    let stale = Change::Inbound { service_member: member.clone(), at: Some(now - 10_000_000) };
    f.store.apply("acme", std::slice::from_ref(&stale)).await.unwrap();
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s1", "1111111")).await.reason, Reason::NewRecipient);
    f.store.apply("acme", &[Change::Inbound { service_member: member, at: None }]).await.unwrap();
    f.store.apply("acme", &[stale]).await.unwrap();
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s1", "1111111")).await.reason, Reason::ServiceWindow);
    // A timestamp from a clock far ahead opens the window from now, not from then.
    let ahead = hasher().service_window("s1", "2222222");
    let ahead = Change::Inbound { service_member: ahead, at: Some(now_us() + 3_600_000_000) };
    f.store.apply("acme", &[ahead]).await.unwrap();
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s1", "2222222")).await.reason, Reason::ServiceWindow);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert_eq!(admit_one(&*f.store, &p, &t, op_from("s1", "2222222")).await.reason, Reason::NewRecipient);
}

async fn unique_recipients_over_7_and_30_days_count_delivered_ones<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(10));
    let ops = [op("1111111"), op("2222222"), op("1111111"), op("3333333"), op("5555555")];
    admit(&*f.store, &p, &t, &ops).await;
    inbound(&*f.store, "acme", "s1", "4444444").await;
    admit_one(&*f.store, &p, &t, op_from("s1", "4444444")).await;
    let status = |r, status| Change::Delivery { scope: p.clone(), member: op(r).member, status, at: None };
    let reported = [
        status("1111111", Delivery::Delivered),
        status("2222222", Delivery::Delivered),
        status("3333333", Delivery::Failed),
        // A reply inside a service window: delivered, but never counted.
        status("4444444", Delivery::Delivered),
    ];
    f.store.apply("acme", &reported).await.unwrap();
    // 5555555 is counted but not (yet) delivered.
    let report = f.store.usage(&p, &t).await.unwrap();
    assert_eq!((report.unique_7d, report.unique_30d), (2, 2), "only delivered recipients reached outside a window");
    assert_eq!(report.usage.counted, 3, "the failed one gave its slot back");
}

async fn a_failed_delivery_gives_back_its_slot_unless_delivered_or_counted_again<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(2));
    let status = |r, status, at| Change::Delivery { scope: p.clone(), member: op(r).member, status, at };
    let before = now_us();
    assert_eq!(reasons(&*f.store, &p, &t, &["1111111", "2222222"]).await, [Reason::NewRecipient; 2]);
    assert_eq!(admit_one(&*f.store, &p, &t, op("3333333")).await.reason, Reason::LimitReached);
    // 1111111 was delivered: a later failure (of another message) does not free its slot.
    f.store.apply("acme", &[status("1111111", Delivery::Delivered, None)]).await.unwrap();
    f.store.apply("acme", &[status("1111111", Delivery::Failed, None)]).await.unwrap();
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 2);
    // A failure reported before 2222222's latest Admit is of an older message: nothing back.
    f.store.apply("acme", &[status("2222222", Delivery::Failed, Some(before))]).await.unwrap();
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 2);
    // Its own failure gives the slot back, once: applying it twice changes nothing more.
    let failed = [status("2222222", Delivery::Failed, None)];
    f.store.apply("acme", &failed).await.unwrap();
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 1);
    f.store.apply("acme", &failed).await.unwrap();
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 1);
    assert_eq!(admit_one(&*f.store, &p, &t, op("3333333")).await.reason, Reason::NewRecipient);
}

async fn changes_older_than_the_last_applied_are_skipped<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let p = portfolio("acme");
    let (t1, t2) = (1_700_000_000_000_000, 1_700_000_100_000_000);
    let newer = [
        Change::Tier { scope: p.clone(), tier: limited(20), at: Some(t2) },
        Change::SenderStatus { sender: "s1".into(), status: SenderStatus::Connected, at: Some(t2) },
        Change::TemplateStatus {
            name: "promo".into(),
            language: String::new(),
            status: "APPROVED".into(),
            at: Some(t2),
        },
    ];
    let older = [
        Change::Tier { scope: p.clone(), tier: limited(5), at: Some(t1) },
        Change::SenderStatus { sender: "s1".into(), status: SenderStatus::Flagged, at: Some(t1) },
        Change::TemplateStatus { name: "promo".into(), language: String::new(), status: "PAUSED".into(), at: Some(t1) },
    ];
    f.store.apply("acme", &newer).await.unwrap();
    f.store.apply("acme", &older).await.unwrap();
    assert_eq!(usage(&*f.store, &p, &limited(1)).await.tier, limited(20));
    let state = f.store.portfolio("acme").await.unwrap();
    assert_eq!(state.senders["s1"].status, Some(SenderStatus::Connected));
    assert_eq!(state.templates[&TemplateKey::new("promo", "")].status.as_deref(), Some("APPROVED"));
    // A change without a time is now, so it wins over both.
    let now =
        [Change::TemplateStatus { name: "promo".into(), language: String::new(), status: "DISABLED".into(), at: None }];
    f.store.apply("acme", &now).await.unwrap();
    f.store.apply("acme", &newer[2..]).await.unwrap();
    let state = f.store.portfolio("acme").await.unwrap();
    assert_eq!(state.templates[&TemplateKey::new("promo", "")].status.as_deref(), Some("DISABLED"));
}

async fn a_denial_lifts_exactly_when_its_retry_after_has_passed<F: Fn(Windows) -> Fixture>(make: F) {
    let w = Duration::from_millis(900);
    let f = make(windows(w, w));
    let p = portfolio("acme");
    // A limit of 4 with half kept from marketing: marketing to new recipients stops at 2.
    let params = AdmitParams::new(limited(4), 5_000);
    let utility = |r| with(op(r), Category::Utility, None);
    let marketing = with(op("14155550104"), Category::Marketing, None);
    f.store.admit(&p, &params, &[utility("14155550101")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.store.admit(&p, &params, &[utility("14155550102"), utility("14155550103")]).await.unwrap();
    let denied = f.store.admit(&p, &params, std::slice::from_ref(&marketing)).await.unwrap().remove(0);
    assert_eq!(denied.reason, Reason::HeadroomReserved);
    // Three counted, cap two: room comes back when the second oldest leaves, not the oldest
    // (which leaves 300 ms earlier and still leaves two counted).
    let retry = denied.retry_after.unwrap();
    assert!(retry > w - Duration::from_millis(100), "{retry:?} points at the oldest contact");
    let deadline = denied.now + retry.as_micros() as u64;
    // Just before and just after the deadline, by the store's own clock (the clock each answer
    // carries, so a late wake-up here cannot make the check wrong).
    for at in [retry - Duration::from_millis(15), retry + Duration::from_millis(5)] {
        let wake = denied.now + at.as_micros() as u64;
        tokio::time::sleep(Duration::from_micros(wake.saturating_sub(now_us()))).await;
        let again = f.store.admit(&p, &params, std::slice::from_ref(&marketing)).await.unwrap().remove(0);
        if again.now < deadline {
            assert_eq!(again.reason, Reason::HeadroomReserved, "{}us before retry_after", deadline - again.now);
        } else {
            assert_eq!(again.reason, Reason::NewRecipient, "{}us after retry_after", again.now - deadline);
            return;
        }
    }
    panic!("the store clock never passed retry_after");
}

async fn a_numbers_throughput_is_kept_apart_from_its_status_and_tier<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let p = portfolio("acme");
    let flagged = Change::SenderStatus { sender: "s1".into(), status: SenderStatus::Flagged, at: None };
    f.store.apply("acme", &[flagged]).await.unwrap();
    assert_eq!(f.store.portfolio("acme").await.unwrap().senders["s1"].throughput_mps, None, "not reported yet");
    let upgrade = [Change::Throughput { sender: "s1".into(), mps: 1_000 }];
    f.store.apply("acme", &upgrade).await.unwrap();
    f.store.apply("acme", &upgrade).await.unwrap();
    let state = f.store.portfolio("acme").await.unwrap();
    let s1 = &state.senders["s1"];
    assert_eq!(
        (s1.throughput_mps, s1.status, s1.quality),
        (Some(1_000), Some(SenderStatus::Flagged), Quality::Unknown)
    );
    assert_eq!(usage(&*f.store, &p, &limited(3)).await.tier, limited(3), "a throughput level is not a tier");
    // A number known only by its throughput is listed, with nothing else set.
    f.store.apply("acme", &[Change::Throughput { sender: "s2".into(), mps: 80 }]).await.unwrap();
    let s2 = &f.store.portfolio("acme").await.unwrap().senders["s2"];
    assert_eq!((s2.throughput_mps, s2.status, s2.since), (Some(80), None, None));
}

async fn templates_are_blocked_per_language_and_a_status_without_one_covers_every_language<
    F: Fn(Windows) -> Fixture,
>(
    make: F,
) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(100));
    let status = |name: &str, language: &str, status: &str, at| Change::TemplateStatus {
        name: name.into(),
        language: language.into(),
        status: status.into(),
        at,
    };
    let mut n = 0;
    // A fresh recipient each time, so only the template decides.
    let mut send = async |name: &str, language: Option<&str>| {
        n += 1;
        let op = AdmitOp {
            template_language: language.map(str::to_owned),
            ..with(op(&format!("1415555{n:04}")), Category::Marketing, Some(name))
        };
        admit_one(&*f.store, &p, &t, op).await.reason
    };
    let (t1, t2, t3, t4) = (1_700_000_000_000_000, 1_700_000_100_000_000, 1_700_000_200_000_000, 1_700_000_300_000_000);
    const BLOCKED: Reason = Reason::TemplateBlocked;
    const SENT: Reason = Reason::NewRecipient;

    // Meta pauses one language: the others still go, and a message without a language may be
    // in the paused one.
    f.store.apply("acme", &[status("promo", "en_US", "PAUSED", Some(t2))]).await.unwrap();
    assert_eq!(send("promo", Some("en_US")).await, BLOCKED);
    assert_eq!(send("promo", Some("pt_BR")).await, SENT);
    assert_eq!(send("promo", None).await, BLOCKED);
    // A newer status for every language covers the paused one; an older one is skipped.
    f.store.apply("acme", &[status("promo", "", "REINSTATED", Some(t3))]).await.unwrap();
    f.store.apply("acme", &[status("promo", "", "DISABLED", Some(t1))]).await.unwrap();
    assert_eq!(send("promo", Some("en_US")).await, SENT);
    assert_eq!(send("promo", None).await, SENT);
    // A language's own event older than the name-wide one is kept but not in force.
    f.store.apply("acme", &[status("promo", "pt_BR", "DISABLED", Some(t2))]).await.unwrap();
    assert_eq!(send("promo", Some("pt_BR")).await, SENT);
    f.store.apply("acme", &[status("promo", "pt_BR", "PAUSED", Some(t4))]).await.unwrap();
    assert_eq!(send("promo", Some("pt_BR")).await, BLOCKED);
    assert_eq!(send("promo", Some("en_US")).await, SENT);
    assert_eq!(send("promo", None).await, BLOCKED);
    let state = f.store.portfolio("acme").await.unwrap();
    let promo: Vec<_> = state
        .templates
        .iter()
        .map(|(k, v)| (k.name.as_str(), k.language.as_str(), v.status.as_deref(), v.at))
        .collect();
    assert_eq!(
        promo,
        [
            ("promo", "", Some("REINSTATED"), Some(t3)),
            ("promo", "en_US", Some("PAUSED"), Some(t2)),
            ("promo", "pt_BR", Some("PAUSED"), Some(t4)),
        ]
    );

    // Set together (the same time), the language's own status wins: pause a name but one language.
    let together = [status("welcome", "", "PAUSED", None), status("welcome", "es", "APPROVED", None)];
    f.store.apply("acme", &together).await.unwrap();
    assert_eq!(send("welcome", Some("es")).await, SENT);
    assert_eq!(send("welcome", Some("fr")).await, BLOCKED, "a language never heard of follows the name");
    assert_eq!(send("welcome", None).await, BLOCKED);

    // Names may hold ':'; a language never does, so the two never mix.
    let otp = [
        status("otp:v2", "en", "DISABLED", None),
        Change::TemplateQuality { name: "otp:v2".into(), language: "en".into(), quality: Quality::Low },
    ];
    f.store.apply("acme", &otp).await.unwrap();
    assert_eq!(send("otp:v2", Some("en")).await, BLOCKED);
    assert_eq!(send("otp:v2", Some("fr")).await, SENT);
    assert_eq!(send("otp", Some("en")).await, SENT);
    assert_eq!(send("otp", Some("v2")).await, SENT);
    let state = f.store.portfolio("acme").await.unwrap();
    let otp = &state.templates[&TemplateKey::new("otp:v2", "en")];
    assert_eq!((otp.status.as_deref(), otp.quality), (Some("DISABLED"), Quality::Low));
    assert!(!state.templates.keys().any(|k| k.name == "otp"), "{:?}", state.templates.keys());
}

async fn the_first_shared_policy_recorded_stays_until_replaced<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    assert_eq!(f.store.shared_policy("first", false).await.unwrap(), "first");
    assert_eq!(f.store.shared_policy("second", false).await.unwrap(), "first", "the first recorded holds");
    assert_eq!(f.store.shared_policy("second", true).await.unwrap(), "second", "replacing is on purpose");
    assert_eq!(f.store.shared_policy("third", false).await.unwrap(), "second");
}

async fn an_idempotency_key_replays_what_its_admit_counted_in_its_scope<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(5));
    let first = admit_one(&*f.store, &p, &t, keyed(op("1111111"), "msg-1")).await;
    assert_eq!((first.reason, first.replay_of.as_ref()), (Reason::NewRecipient, None));
    let score = first.lease_score.unwrap();
    // A retry, alone or twice in one batch: the same answer and lease, counted once.
    let retries = admit(&*f.store, &p, &t, &[keyed(op("1111111"), "msg-1"), keyed(op("1111111"), "msg-1")]).await;
    for again in &retries {
        assert_eq!((again.reason, again.lease_score), (Reason::NewRecipient, Some(score)));
        assert_eq!(again.replay_of.as_ref(), Some(&op("1111111").member));
        assert_eq!(again.usage.counted, 1);
    }
    // The key wins: a retry naming another recipient gets the first answer, and counts nobody.
    let other = admit_one(&*f.store, &p, &t, keyed(op("2222222"), "msg-1")).await;
    assert_eq!((other.reason, other.lease_score), (Reason::NewRecipient, Some(score)));
    assert_eq!(other.replay_of, Some(op("1111111").member));
    assert_eq!(usage(&*f.store, &p, &t).await.counted, 1);
    // An ALREADY_COUNTED is remembered too, without a lease, and touches nothing when replayed.
    let touched = admit(&*f.store, &p, &t, &[keyed(op("1111111"), "msg-2"), keyed(op("1111111"), "msg-2")]).await;
    assert_eq!(
        (touched[0].reason, touched[0].lease_score, touched[0].replay_of.is_some()),
        (Reason::AlreadyCounted, None, false)
    );
    assert_eq!(
        (touched[1].reason, touched[1].lease_score, touched[1].replay_of.is_some()),
        (Reason::AlreadyCounted, None, true)
    );
    // Other scopes do not share keys: another portfolio, or a number in per-number scope.
    for scope in [portfolio("globex"), ScopeKey { portfolio: "acme".into(), sender: Some("15550001".into()) }] {
        let there = admit_one(&*f.store, &scope, &t, keyed(op("1111111"), "msg-1")).await;
        assert_eq!((there.reason, there.replay_of), (Reason::NewRecipient, None), "{scope:?}");
        assert_eq!(there.usage.counted, 1);
    }
}

async fn an_idempotency_key_is_decided_again_once_its_slot_is_given_back_or_after_a_denial<
    F: Fn(Windows) -> Fixture,
>(
    make: F,
) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(1));
    let first = admit_one(&*f.store, &p, &t, keyed(op("1111111"), "msg-1")).await;
    let lease = Lease { scope: p.clone(), member: op("1111111").member, score: first.lease_score.unwrap() };
    // The replayed lease is the first one: it releases the slot the first Admit took.
    let replayed = admit_one(&*f.store, &p, &t, keyed(op("1111111"), "msg-1")).await;
    assert_eq!(replayed.lease_score, Some(lease.score));
    assert!(f.store.release(&lease).await.unwrap());
    // The slot was given back, so the message is decided (and counted) again: a new lease.
    let again = admit_one(&*f.store, &p, &t, keyed(op("1111111"), "msg-1")).await;
    assert_eq!((again.reason, again.replay_of.as_ref()), (Reason::NewRecipient, None));
    assert_ne!(again.lease_score, Some(lease.score));
    assert_eq!(again.usage.counted, 1);
    // A denial took nothing: its retry is decided again, and admitted once there is room.
    let denied = admit_one(&*f.store, &p, &t, keyed(op("2222222"), "msg-2")).await;
    assert_eq!(denied.reason, Reason::LimitReached);
    let lease = Lease { scope: p.clone(), member: op("1111111").member, score: again.lease_score.unwrap() };
    assert!(f.store.release(&lease).await.unwrap());
    let retried = admit_one(&*f.store, &p, &t, keyed(op("2222222"), "msg-2")).await;
    assert_eq!((retried.reason, retried.replay_of), (Reason::NewRecipient, None));
}

async fn an_idempotency_key_is_kept_for_the_window_of_its_contact<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(windows(Duration::from_millis(800), DAY));
    let (p, t) = (portfolio("acme"), limited(5));
    let first = admit_one(&*f.store, &p, &t, keyed(op("1111111"), "msg-1")).await;
    assert_eq!(first.reason, Reason::NewRecipient);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Counted again without the key: the recipient outlives the first contact's window.
    assert_eq!(admit_one(&*f.store, &p, &t, op("1111111")).await.reason, Reason::AlreadyCounted);
    let within = admit_one(&*f.store, &p, &t, keyed(op("1111111"), "msg-1")).await;
    assert_eq!((within.reason, within.lease_score), (Reason::NewRecipient, first.lease_score));
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The first contact has left the window, and the key with it: decided again.
    let after = admit_one(&*f.store, &p, &t, keyed(op("1111111"), "msg-1")).await;
    assert_eq!((after.reason, after.lease_score, after.replay_of), (Reason::AlreadyCounted, None, None));
}

async fn thousands_of_recipients_keep_exact_counts_oldest_and_ranks<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(windows(DAY, DAY));
    let (store, s) = (&*f.store, portfolio("thousands"));
    let n = 3_000;
    let tier = limited(n as u64);
    let ops: Vec<AdmitOp> = (0..n).map(|i| op(&format!("1444{i:07}"))).collect();
    let mut scores = Vec::new();
    for batch in ops.chunks(500) {
        for a in admit(store, &s, &tier, batch).await {
            assert_eq!(a.reason, Reason::NewRecipient);
            scores.push(a.lease_score.unwrap());
        }
    }
    // Every 7th gives its slot back, once.
    for i in (0..n).step_by(7) {
        let lease = Lease { scope: s.clone(), member: ops[i].member.clone(), score: scores[i] };
        assert!(store.release(&lease).await.unwrap(), "{i}");
        assert!(!store.release(&lease).await.unwrap(), "{i} twice");
    }
    // Every 5th still counted is counted again: its contact moves to the newest end.
    let again: Vec<AdmitOp> = (0..n).filter(|i| i % 5 == 0 && i % 7 != 0).map(|i| ops[i].clone()).collect();
    let answers = admit(store, &s, &tier, &again).await;
    assert!(answers.iter().all(|a| a.reason == Reason::AlreadyCounted));
    let counted = (0..n).filter(|i| i % 7 != 0).count() as u64;
    // The oldest contacts, in order: neither given back nor counted again.
    let untouched: Vec<u64> = (0..n).filter(|i| i % 5 != 0 && i % 7 != 0).map(|i| scores[i]).collect();
    let day = tiergate::policy::micros(DAY);
    assert_eq!(
        usage(store, &s, &tier).await,
        tiergate::store::UsageSnapshot { tier: tier.clone(), counted, next_slot_at: Some(untouched[0] + day) }
    );
    // Down to 1,000: a new recipient waits until the count drops below it, when the contact at
    // rank counted - 1,000 leaves, not the oldest.
    let lower = limited(1_000);
    set_tier(store, &s, &lower).await;
    let denied = admit_one(store, &s, &lower, op("14449999999")).await;
    assert_eq!(denied.reason, Reason::LimitReached);
    let leaving = untouched[usize::try_from(counted - 1_000).unwrap()];
    assert_eq!(denied.retry_after, Some(Duration::from_micros(leaving + day - denied.now)));
    // An old lease of a recipient counted again releases nothing; its new contact stays counted.
    let i = 5;
    let stale = Lease { scope: s.clone(), member: ops[i].member.clone(), score: scores[i] };
    assert!(!store.release(&stale).await.unwrap());
    assert_eq!(usage(store, &s, &lower).await.counted, counted);
}

/// The send governor: each number's throughput, each (number, user) pair's rate, pacing, shadow
/// mode and Meta's feedback, on every backend. Redis decides on its own clock, so each check
/// either compares answers of one call (one instant) or allows the few milliseconds between calls.
mod governor {
    use super::*;

    use tiergate::policy::rate::{PairRule, ThroughputRule, MARKETING_CAPPED_FOR, THROUGHPUT_BACKOFF};
    use tiergate::policy::{micros, Mode};
    use tiergate::store::{Admission, Rates, Store};

    conformance!(
        throughput_denies_the_next_message_until_its_slot_and_the_denial_takes_no_tier_slot,
        a_limit_denial_takes_no_throughput_slot,
        pacing_reserves_consecutive_slots_and_a_shorter_max_wait_is_denied,
        a_pair_bursts_then_waits_out_what_it_borrowed,
        meta_refusing_a_pair_makes_it_wait_an_interval,
        a_marketing_capped_recipient_gets_no_marketing_from_any_number_for_a_day,
        a_throughput_backoff_doubles_the_spacing_for_a_minute,
        traffic_outside_admit_takes_a_throughput_slot,
        a_configured_level_wins_over_the_learnt_one_which_wins_over_the_default,
        shadow_mode_admits_what_enforcing_would_deny_and_takes_its_slots,
        the_portfolio_mode_wins_over_the_configured_one_until_cleared,
    );

    /// A throughput rule of `mps` messages per second and no burst.
    fn throughput(mps: u32) -> Option<ThroughputRule> {
        Some(ThroughputRule { default_mps: mps, burst: Duration::ZERO })
    }

    /// A pair rule of one message per 6 s and bursts of `burst`.
    fn pair(burst: u32) -> PairRule {
        PairRule { interval: Duration::from_secs(6), burst }
    }

    fn governed(tier: &Tier, rates: Rates, mode: Mode) -> AdmitParams {
        AdmitParams { rates, mode, ..AdmitParams::new(tier.clone(), 0) }
    }

    /// The op waiting up to `max_wait` for its rates.
    fn paced(op: AdmitOp, max_wait: Duration) -> AdmitOp {
        AdmitOp { max_wait, ..op }
    }

    async fn send(store: &dyn Store, params: &AdmitParams, ops: &[AdmitOp]) -> Vec<Admission> {
        store.admit(&portfolio("acme"), params, ops).await.unwrap()
    }

    async fn send_one(store: &dyn Store, params: &AdmitParams, op: AdmitOp) -> Admission {
        send(store, params, &[op]).await.pop().unwrap()
    }

    fn waits(answers: &[Admission]) -> Vec<Duration> {
        answers.iter().map(|a| a.wait).collect()
    }

    /// Whether `d` is at most `full` and at least `full` less a second (the calls between).
    fn about(d: Option<Duration>, full: Duration) -> bool {
        d.is_some_and(|d| d <= full && d + Duration::from_secs(1) > full)
    }

    async fn throughput_denies_the_next_message_until_its_slot_and_the_denial_takes_no_tier_slot<
        F: Fn(Windows) -> Fixture,
    >(
        make: F,
    ) {
        let f = make(Windows::default());
        let t = limited(10);
        let params = governed(&t, Rates { throughput: throughput(1), pair: None }, Mode::Enforce);
        let first = send_one(&*f.store, &params, keyed(op_from("num-1", "5511900000001"), "k1")).await;
        assert_eq!((first.reason, first.wait, first.shadow), (Reason::NewRecipient, Duration::ZERO, None));
        let next = send_one(&*f.store, &params, op_from("num-1", "5511900000002")).await;
        assert_eq!(next.reason, Reason::ThroughputExceeded);
        assert!(
            next.retry_after.is_some_and(|r| r <= Duration::from_secs(1) && r > Duration::from_millis(500)),
            "{next:?}"
        );
        assert_eq!((next.lease_score, next.usage.counted), (None, 1), "the denial took no tier slot");
        assert_eq!(usage(&*f.store, &portfolio("acme"), &t).await.counted, 1);
        // A replay takes no slot: it is answered as first decided.
        let replay = send_one(&*f.store, &params, keyed(op_from("num-1", "5511900000001"), "k1")).await;
        assert_eq!((replay.reason, replay.lease_score), (Reason::NewRecipient, first.lease_score));
        // Another number has its own throughput.
        let other = send_one(&*f.store, &params, op_from("num-2", "5511900000002")).await;
        assert_eq!(other.reason, Reason::NewRecipient);
        // Sending makes no number known to the portfolio.
        assert!(f.store.portfolio("acme").await.unwrap().senders.is_empty());
    }

    async fn a_limit_denial_takes_no_throughput_slot<F: Fn(Windows) -> Fixture>(make: F) {
        let f = make(Windows::default());
        let t = limited(1);
        let params = governed(&t, Rates { throughput: throughput(1), pair: None }, Mode::Enforce);
        // Filled by a message from no number, which no throughput governs.
        assert_eq!(send_one(&*f.store, &params, op("5511900000001")).await.reason, Reason::NewRecipient);
        let full = send_one(&*f.store, &params, op_from("num-1", "5511900000002")).await;
        assert_eq!(full.reason, Reason::LimitReached);
        assert!(full.retry_after.is_some_and(|r| r > DAY - Duration::from_secs(60)), "the limit's retry_after");
        // The number's slot is still free.
        let counted = send_one(&*f.store, &params, op_from("num-1", "5511900000001")).await;
        assert_eq!(counted.reason, Reason::AlreadyCounted);
        let next = send_one(&*f.store, &params, op_from("num-1", "5511900000001")).await;
        assert_eq!(next.reason, Reason::ThroughputExceeded, "that message took it");
    }

    async fn pacing_reserves_consecutive_slots_and_a_shorter_max_wait_is_denied<F: Fn(Windows) -> Fixture>(make: F) {
        let f = make(Windows::default());
        let t = limited(10);
        let params = governed(&t, Rates { throughput: throughput(1), pair: None }, Mode::Enforce);
        let s = Duration::from_secs;
        let mut ops: Vec<AdmitOp> =
            (1..=4).map(|i| paced(op_from("num-1", &format!("551190000000{i}")), s(10))).collect();
        ops.push(paced(op_from("num-1", "5511900000005"), Duration::from_millis(3_500)));
        let answers = send(&*f.store, &params, &ops).await;
        let reasons: Vec<Reason> = answers.iter().map(|a| a.reason).collect();
        assert_eq!(reasons, [[Reason::NewRecipient; 4].as_slice(), &[Reason::ThroughputExceeded]].concat());
        assert_eq!(waits(&answers), [s(0), s(1), s(2), s(3), s(0)]);
        assert_eq!(answers[4].retry_after, Some(s(4)), "the whole wait");
        assert_eq!(answers[4].usage.counted, 4);
        // The next call waits behind the slots reserved.
        let later = send_one(&*f.store, &params, paced(op_from("num-1", "5511900000006"), s(10))).await;
        assert_eq!(later.reason, Reason::NewRecipient);
        assert!(about(Some(later.wait), s(4)), "{later:?}");
    }

    async fn a_pair_bursts_then_waits_out_what_it_borrowed<F: Fn(Windows) -> Fixture>(make: F) {
        let f = make(Windows::default());
        let t = limited(10);
        let params = governed(&t, Rates { throughput: None, pair: Some(pair(3)) }, Mode::Enforce);
        let to_user = op_from("num-1", "5511900000001");
        let answers = send(&*f.store, &params, &vec![to_user.clone(); 4]).await;
        let reasons: Vec<Reason> = answers.iter().map(|a| a.reason).collect();
        assert_eq!(reasons, [Reason::NewRecipient, Reason::AlreadyCounted, Reason::AlreadyCounted, Reason::PairRate]);
        assert_eq!(answers[3].retry_after, Some(Duration::from_secs(18)), "three intervals borrowed");
        let again = send_one(&*f.store, &params, to_user.clone()).await;
        assert_eq!(again.reason, Reason::PairRate);
        assert!(about(again.retry_after, Duration::from_secs(18)), "{again:?}");
        // Paced past it, the message goes when the pair owes nothing.
        let paced_past = send_one(&*f.store, &params, paced(to_user, Duration::from_secs(20))).await;
        assert_eq!(paced_past.reason, Reason::AlreadyCounted);
        assert!(about(Some(paced_past.wait), Duration::from_secs(18)), "{paced_past:?}");
        // The pair is one number and one user.
        for other in [op_from("num-1", "5511900000002"), op_from("num-2", "5511900000001")] {
            assert!(
                send_one(&*f.store, &params, other).await.reason.decision() == tiergate::policy::Decision::Admitted
            );
        }
    }

    async fn meta_refusing_a_pair_makes_it_wait_an_interval<F: Fn(Windows) -> Fixture>(make: F) {
        let f = make(Windows::default());
        let t = limited(10);
        let params = governed(&t, Rates { throughput: None, pair: Some(pair(45)) }, Mode::Enforce);
        let pair_hash = hasher().service_window("num-1", "5511900000001");
        f.store.apply("acme", &[Change::PairBackoff { pair: pair_hash, rule: pair(45), at: None }]).await.unwrap();
        let refused = send_one(&*f.store, &params, op_from("num-1", "5511900000001")).await;
        assert_eq!(refused.reason, Reason::PairRate);
        assert!(about(refused.retry_after, Duration::from_secs(6)), "{refused:?}");
        assert_eq!(refused.usage.counted, 0);
        assert_eq!(send_one(&*f.store, &params, op_from("num-1", "5511900000002")).await.reason, Reason::NewRecipient);
    }

    async fn a_marketing_capped_recipient_gets_no_marketing_from_any_number_for_a_day<F: Fn(Windows) -> Fixture>(
        make: F,
    ) {
        let f = make(Windows::default());
        let t = limited(10);
        let params = governed(&t, Rates::default(), Mode::Enforce);
        let (capped, long_ago) = ("5511900000001", "5511900000002");
        let now = f
            .store
            .apply("acme", &[Change::MarketingCapped { member: hasher().recipient(capped), at: None }])
            .await
            .unwrap();
        // Capped a day and a minute ago: over.
        let at = Some(now - micros(MARKETING_CAPPED_FOR) - 60_000_000);
        f.store.apply("acme", &[Change::MarketingCapped { member: hasher().recipient(long_ago), at }]).await.unwrap();
        for category in [Category::Marketing, Category::Unspecified] {
            for sender in ["num-1", "num-2"] {
                let denied = send_one(&*f.store, &params, with(op_from(sender, capped), category, None)).await;
                assert_eq!(denied.reason, Reason::RecipientMarketingCapped, "{category:?} from {sender}");
                assert_eq!(denied.usage.counted, 0);
            }
            let no_number = send_one(&*f.store, &params, with(op(capped), category, None)).await;
            assert_eq!(no_number.reason, Reason::RecipientMarketingCapped);
        }
        let utility = send_one(&*f.store, &params, op_from("num-1", capped)).await;
        assert_eq!(utility.reason, Reason::NewRecipient);
        let over = send_one(&*f.store, &params, with(op_from("num-1", long_ago), Category::Marketing, None)).await;
        assert_eq!(over.reason, Reason::NewRecipient);
    }

    async fn a_throughput_backoff_doubles_the_spacing_for_a_minute<F: Fn(Windows) -> Fixture>(make: F) {
        let f = make(Windows::default());
        let t = limited(10);
        let params = governed(&t, Rates { throughput: throughput(10), pair: None }, Mode::Enforce);
        let now =
            f.store.apply("acme", &[Change::ThroughputBackoff { sender: "num-1".into(), at: None }]).await.unwrap();
        let state = f.store.portfolio("acme").await.unwrap();
        assert_eq!(state.senders["num-1"].throughput_backoff_until, Some(now + micros(THROUGHPUT_BACKOFF)));
        let burst = |sender: &str| -> Vec<AdmitOp> {
            (1..=3).map(|i| paced(op_from(sender, &format!("551190000000{i}")), Duration::from_secs(10))).collect()
        };
        let ms = Duration::from_millis;
        assert_eq!(waits(&send(&*f.store, &params, &burst("num-1")).await), [ms(0), ms(200), ms(400)]);
        assert_eq!(waits(&send(&*f.store, &params, &burst("num-2")).await), [ms(0), ms(100), ms(200)]);
        // An older report moves nothing back.
        f.store
            .apply("acme", &[Change::ThroughputBackoff { sender: "num-1".into(), at: Some(now - 1) }])
            .await
            .unwrap();
        let state = f.store.portfolio("acme").await.unwrap();
        assert_eq!(state.senders["num-1"].throughput_backoff_until, Some(now + micros(THROUGHPUT_BACKOFF)));
    }

    async fn traffic_outside_admit_takes_a_throughput_slot<F: Fn(Windows) -> Fixture>(make: F) {
        let f = make(Windows::default());
        let t = limited(10);
        let rule = throughput(1);
        let params = governed(&t, Rates { throughput: rule, pair: None }, Mode::Enforce);
        let traffic = Change::Traffic { sender: "num-1".into(), rule: rule.unwrap(), configured_mps: None, at: None };
        f.store.apply("acme", &[traffic]).await.unwrap();
        let denied = send_one(&*f.store, &params, op_from("num-1", "5511900000001")).await;
        assert_eq!(denied.reason, Reason::ThroughputExceeded);
        assert!(about(denied.retry_after, Duration::from_secs(1)), "{denied:?}");
        assert_eq!(send_one(&*f.store, &params, op_from("num-2", "5511900000001")).await.reason, Reason::NewRecipient);
        // Traffic at a configured level of 10 per second takes a tenth of a second.
        let fast = Change::Traffic { sender: "num-3".into(), rule: rule.unwrap(), configured_mps: Some(10), at: None };
        f.store.apply("acme", &[fast]).await.unwrap();
        let op =
            AdmitOp { throughput_mps: Some(10), ..paced(op_from("num-3", "5511900000001"), Duration::from_secs(1)) };
        let after = send_one(&*f.store, &params, op).await;
        assert!(after.wait <= Duration::from_millis(100), "{after:?}");
        assert!(f.store.portfolio("acme").await.unwrap().senders.is_empty(), "traffic names no number");
    }

    async fn a_configured_level_wins_over_the_learnt_one_which_wins_over_the_default<F: Fn(Windows) -> Fixture>(
        make: F,
    ) {
        let f = make(Windows::default());
        let t = limited(10);
        let params = governed(&t, Rates { throughput: throughput(1_000), pair: None }, Mode::Enforce);
        let learnt = ["num-1", "num-2"].map(|sender| Change::Throughput { sender: sender.into(), mps: 1 });
        f.store.apply("acme", &learnt).await.unwrap();
        let two = |sender: &str, configured: Option<u32>| -> Vec<AdmitOp> {
            (1..=2)
                .map(|i| AdmitOp {
                    throughput_mps: configured,
                    ..paced(op_from(sender, &format!("551190000000{i}")), Duration::from_secs(10))
                })
                .collect()
        };
        let ms = Duration::from_millis;
        assert_eq!(waits(&send(&*f.store, &params, &two("num-1", None)).await), [ms(0), ms(1_000)], "learnt");
        assert_eq!(waits(&send(&*f.store, &params, &two("num-2", Some(10))).await), [ms(0), ms(100)], "configured");
        assert_eq!(waits(&send(&*f.store, &params, &two("num-3", None)).await), [ms(0), ms(1)], "default");
    }

    async fn shadow_mode_admits_what_enforcing_would_deny_and_takes_its_slots<F: Fn(Windows) -> Fixture>(make: F) {
        let f = make(Windows::default());
        let t = limited(1);
        let rates = Rates { throughput: throughput(1), pair: None };
        let shadow = governed(&t, rates, Mode::Shadow);
        let first = send_one(&*f.store, &shadow, op_from("num-1", "5511900000001")).await;
        assert_eq!(
            (first.reason, first.shadow, first.wait),
            (Reason::NewRecipient, Some(Reason::NewRecipient), Duration::ZERO)
        );
        // The tier is full and the number's slot taken: the limit is what enforcing would answer.
        let full = send_one(&*f.store, &shadow, op_from("num-1", "5511900000002")).await;
        assert_eq!(
            (full.reason, full.shadow, full.retry_after),
            (Reason::NewRecipient, Some(Reason::LimitReached), None)
        );
        assert!(full.lease_score.is_some(), "counted as admitted");
        assert_eq!(full.usage.counted, 2);
        // A message the limit admits is reported by the rates.
        let again = send_one(&*f.store, &shadow, op_from("num-1", "5511900000001")).await;
        assert_eq!(
            (again.reason, again.shadow, again.wait),
            (Reason::AlreadyCounted, Some(Reason::ThroughputExceeded), Duration::ZERO)
        );
        // Each took a slot at once: enforcing now, the number waits three of them.
        let enforce = governed(&t, rates, Mode::Enforce);
        let denied = send_one(&*f.store, &enforce, op_from("num-1", "5511900000001")).await;
        assert_eq!((denied.reason, denied.shadow), (Reason::ThroughputExceeded, None));
        assert!(about(denied.retry_after, Duration::from_secs(3)), "{denied:?}");
    }

    async fn the_portfolio_mode_wins_over_the_configured_one_until_cleared<F: Fn(Windows) -> Fixture>(make: F) {
        let f = make(Windows::default());
        let t = limited(1);
        let (enforce, shadow) =
            (governed(&t, Rates::default(), Mode::Enforce), governed(&t, Rates::default(), Mode::Shadow));
        f.store.apply("acme", &[Change::Mode(Some(Mode::Shadow))]).await.unwrap();
        assert_eq!(f.store.portfolio("acme").await.unwrap().mode, Some(Mode::Shadow));
        assert_eq!(send_one(&*f.store, &enforce, op("5511900000001")).await.reason, Reason::NewRecipient);
        let over = send_one(&*f.store, &enforce, op("5511900000002")).await;
        assert_eq!((over.reason, over.shadow), (Reason::NewRecipient, Some(Reason::LimitReached)));
        f.store.apply("acme", &[Change::Mode(Some(Mode::Enforce))]).await.unwrap();
        let enforced = send_one(&*f.store, &shadow, op("5511900000003")).await;
        assert_eq!((enforced.reason, enforced.shadow), (Reason::LimitReached, None));
        f.store.apply("acme", &[Change::Mode(None)]).await.unwrap();
        assert_eq!(f.store.portfolio("acme").await.unwrap().mode, None);
        assert_eq!(send_one(&*f.store, &enforce, op("5511900000003")).await.reason, Reason::LimitReached);
        let configured = send_one(&*f.store, &shadow, op("5511900000003")).await;
        assert_eq!((configured.reason, configured.shadow), (Reason::NewRecipient, Some(Reason::LimitReached)));
    }
}
