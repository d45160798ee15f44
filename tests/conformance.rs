//! The storage conformance suite: every rule a store must keep, written once against the
//! [`Store`] trait and run unchanged against the memory store, a real Redis and a real
//! three-master Redis Cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tiergate::hashing::RecipientHasher;
use tiergate::policy::{Lease, Limit, Reason, ScopeKey, Tier};
use tiergate::store::memory::MemoryStore;
use tiergate::store::redis::{RedisOptions, RedisStore, Topology};
use tiergate::store::{AdmitOp, Store, Windows};

use common::redis::{RedisCluster, RedisServer};

/// A store under test and whatever keeps its server alive.
struct Fixture {
    store: Arc<dyn Store>,
    _server: Option<Box<dyn std::any::Any + Send>>,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn windows(window: Duration, service_window: Duration) -> Windows {
    Windows { window, service_window }
}

fn memory(w: Windows) -> Fixture {
    Fixture { store: Arc::new(MemoryStore::new(w)), _server: None }
}

fn redis_options(topology: Topology, w: Windows) -> RedisOptions {
    RedisOptions {
        topology,
        windows: w,
        timeout: Duration::from_secs(2),
        state_ttl: DAY * 35,
        key_prefix: "tgtest".into(),
    }
}

fn redis(w: Windows) -> Fixture {
    let server = RedisServer::start();
    let store = RedisStore::new(redis_options(Topology::Standalone { url: server.url() }, w)).unwrap();
    Fixture { store: Arc::new(store), _server: Some(Box::new(server)) }
}

fn redis_cluster(w: Windows) -> Fixture {
    let cluster = RedisCluster::start();
    let store = RedisStore::new(redis_options(Topology::Cluster { nodes: vec![cluster.url()] }, w)).unwrap();
    Fixture { store: Arc::new(store), _server: Some(Box::new(cluster)) }
}

/// Runs each named test against every backend.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::memory).await } )* }
        mod redis { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::redis).await } )* }
        mod redis_cluster { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::redis_cluster).await } )* }
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
    unlimited_tier_admits_everyone_and_estimates_usage,
    scopes_and_portfolios_are_independent,
    usage_of_an_unknown_scope_is_empty,
    concurrent_admits_never_exceed_the_limit,
);

fn hasher() -> RecipientHasher {
    RecipientHasher::new(b"conformance-suite-key").unwrap()
}

fn op(recipient: &str) -> AdmitOp {
    AdmitOp { member: hasher().recipient(recipient), service_member: None }
}

fn op_from(sender: &str, recipient: &str) -> AdmitOp {
    let h = hasher();
    AdmitOp { member: h.recipient(recipient), service_member: Some(h.service_window(sender, recipient)) }
}

fn portfolio(id: &str) -> ScopeKey {
    ScopeKey { portfolio: id.into(), sender: None }
}

fn limited(n: u64) -> Tier {
    Tier::limited("TEST", n)
}

async fn admit_one(store: &dyn Store, scope: &ScopeKey, tier: &Tier, op: AdmitOp) -> tiergate::store::Admission {
    store.admit(scope, tier, &[op]).await.unwrap().pop().unwrap()
}

async fn reasons(store: &dyn Store, scope: &ScopeKey, tier: &Tier, recipients: &[&str]) -> Vec<Reason> {
    let mut out = Vec::new();
    for r in recipients {
        out.push(admit_one(store, scope, tier, op(r)).await.reason);
    }
    out
}

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
    let usage = f.store.usage(&p, &t).await.unwrap();
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
    let h = hasher();
    let closes = f.store.record_inbound("acme", &h.service_window("sender-a", "5511999990000")).await.unwrap();
    let now = now_us();
    assert!(closes > now + 23 * 3600 * 1_000_000 && closes <= now + 24 * 3600 * 1_000_000 + 5_000_000);
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
    f.store.record_inbound("acme", &hasher().service_window("s", "5511999990000")).await.unwrap();
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
    assert_eq!(f.store.usage(&p, &t).await.unwrap().counted, 0);
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
    assert_eq!(f.store.usage(&p, &t).await.unwrap().counted, 0);
    assert!(!f.store.release(&lease).await.unwrap(), "a second release changes nothing");
    assert_eq!(reasons(&*f.store, &p, &t, &["2222222"]).await, [Reason::NewRecipient]);
}

async fn release_after_the_recipient_was_messaged_again_changes_nothing<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(5));
    // One call, so both decisions share one clock reading: the lease must still name the first.
    let got = f.store.admit(&p, &t, &[op("1111111"), op("1111111")]).await.unwrap();
    assert_eq!((got[0].reason, got[1].reason), (Reason::NewRecipient, Reason::AlreadyCounted));
    let lease = Lease { scope: p.clone(), member: op("1111111").member, score: got[0].lease_score.unwrap() };
    assert!(!f.store.release(&lease).await.unwrap());
    assert_eq!(f.store.usage(&p, &t).await.unwrap().counted, 1);
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
    assert_eq!(f.store.usage(&p, &t).await.unwrap().counted, 1);
    let new = Lease { scope: p.clone(), member, score: second.lease_score.unwrap() };
    assert!(f.store.release(&new).await.unwrap());
}

async fn a_batch_is_decided_in_order<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("acme"), limited(2));
    let got = f.store.admit(&p, &t, &[op("1111111"), op("2222222"), op("1111111"), op("3333333")]).await.unwrap();
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
    let set = f.store.set_tier(&p, &Tier::limited("T3", 3)).await.unwrap();
    assert_eq!(set.tier, Tier::limited("T3", 3));
    let got = reasons(&*f.store, &p, &fallback, &["1111111", "2222222", "3333333", "4444444"]).await;
    assert_eq!(got, [Reason::NewRecipient, Reason::NewRecipient, Reason::NewRecipient, Reason::LimitReached]);
    let usage = f.store.usage(&p, &fallback).await.unwrap();
    assert_eq!((usage.tier.name.as_str(), usage.counted, usage.remaining()), ("T3", 3, Some(0)));
    // Another portfolio still runs on the fallback.
    assert_eq!(f.store.usage(&portfolio("other"), &fallback).await.unwrap().tier, fallback);
}

async fn unlimited_tier_admits_everyone_and_estimates_usage<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let (p, t) = (portfolio("big"), Tier::unlimited("UNL"));
    let got = f.store.admit(&p, &t, &[op("1111111"), op("2222222"), op("3333333"), op("1111111")]).await.unwrap();
    let reasons: Vec<_> = got.iter().map(|a| a.reason).collect();
    assert_eq!(reasons, [Reason::NewRecipient, Reason::NewRecipient, Reason::NewRecipient, Reason::AlreadyCounted]);
    assert!(got.iter().all(|a| a.lease_score.is_none() && a.retry_after.is_none()));
    let usage = f.store.usage(&p, &t).await.unwrap();
    assert_eq!((usage.counted, usage.tier.limit, usage.remaining()), (3, Limit::Unlimited, None));
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
    f.store.set_tier(&a, &limited(5)).await.unwrap();
    assert_eq!(f.store.usage(&b, &t).await.unwrap().tier, t, "a number's tier is its own");
}

async fn usage_of_an_unknown_scope_is_empty<F: Fn(Windows) -> Fixture>(make: F) {
    let f = make(Windows::default());
    let usage = f.store.usage(&portfolio("nobody"), &limited(250)).await.unwrap();
    assert_eq!((usage.counted, usage.next_slot_at, usage.remaining()), (0, None, Some(250)));
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
    assert_eq!(f.store.usage(&p, &t).await.unwrap().counted, 25);
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}
