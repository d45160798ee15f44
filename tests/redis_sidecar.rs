//! The real `tiergate` binary on real Redis servers started by the tests: shared exactness across
//! processes, outages and recovery, Sentinel failover, Cluster, and start-up checks.

mod common;

use std::time::{Duration, Instant};

use common::calls::{admit_until_ok, usage};
use common::redis::{RedisCluster, RedisServer, SentinelSetup};
use common::requests::{self, UTILITY};
use common::server::{http_get, Sidecar};
use common::webhooks::{fixture, post_webhook};
use tiergate::pb::{self, Decision, Reason};
use tonic::Code;

const HASH_KEY: (&str, &str) = ("TIERGATE_STORE_HASH_KEY", "test-hash-key-0123456789");

fn config(store: &str, extra_policy: &str) -> String {
    format!(
        "[store]\nbackend = \"redis\"\ntimeout = \"300ms\"\n{store}\n\n[policy]\n\
         ladder = [{{ name = \"T50\", limit = 50 }}, {{ name = \"T1K\", limit = 1000 }}, {{ name = \"UNL\" }}]\n{extra_policy}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecar_processes_on_one_redis_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    let cfg = config(&format!("url = \"{}\"", redis.url()), "default_tier = \"T50\"");
    let a = Sidecar::spawn(&cfg, &[HASH_KEY]);
    let b = Sidecar::spawn(&cfg, &[HASH_KEY]);
    let (ca, cb) = (a.client().await, b.client().await);
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
            tokio::spawn(async move {
                let r = c.admit(UTILITY.to("acme", "sender-1", &format!("+1555{i:07}"))).await.unwrap().into_inner();
                (i, r.decision() == Decision::Admitted)
            })
        })
        .collect();
    let mut admitted = Vec::new();
    for t in tasks {
        let (i, ok) = t.await.unwrap();
        if ok {
            admitted.push(i);
        }
    }
    assert_eq!(admitted.len(), 50, "400 concurrent Admits through two sidecars against a limit of 50");
    let (mut ca, mut cb) = (ca, cb);
    assert_eq!(usage(&mut ca, "acme", "").await.unique_recipients, 50);
    assert_eq!(usage(&mut cb, "acme", "").await.unique_recipients, 50);

    // Same hash key: every recipient counted through either sidecar is known to both, even
    // written differently, while the window stays full for anyone new.
    for &i in &admitted {
        let written_differently = format!("+1 555 {:03} {:04}", i / 10_000, i % 10_000);
        for c in [&mut ca, &mut cb] {
            let r = c.admit(UTILITY.to("acme", "sender-1", &written_differently)).await.unwrap().into_inner();
            assert_eq!(r.reason(), Reason::AlreadyCounted, "{written_differently}");
        }
    }
    assert_eq!(
        cb.admit(UTILITY.to("acme", "sender-1", "+15559999999")).await.unwrap().into_inner().reason(),
        Reason::LimitReached
    );

    // A tier set through one sidecar holds for the other.
    ca.set_tier(requests::set_tier("acme", "", "T1K")).await.unwrap();
    assert_eq!(usage(&mut cb, "acme", "").await.limit, 1000);
    let more = cb.admit(UTILITY.to("acme", "sender-1", "+15559999998")).await.unwrap().into_inner();
    assert_eq!(more.reason(), Reason::NewRecipient);

    // Redis holds keyed hashes only: no recipient number appears in any key or member.
    let keys = redis.cli(&["--scan", "--pattern", "tg:*"]);
    assert!(keys.contains("tg:{acme}:w"), "{keys}");
    let members = redis.cli(&["HGETALL", "tg:{acme}:w"]);
    assert!(!members.contains("555") && !keys.contains("555"), "raw numbers stored: {members}");
    let ttl: i64 = redis.cli(&["PTTL", "tg:{acme}:w"]).parse().unwrap();
    assert!(ttl > 0, "every key expires");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_fails_calls_fast_then_recovers_without_a_sidecar_restart() {
    let mut redis = RedisServer::start();
    let cfg = config(&format!("url = \"{}\"", redis.url()), "");
    let sidecar = Sidecar::spawn(&cfg, &[HASH_KEY]);
    let mut c = sidecar.client().await;
    assert_eq!(
        c.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap().into_inner().reason(),
        Reason::NewRecipient
    );
    assert_eq!(http_get(sidecar.admin_addr, "/readyz").await.0, 200);

    redis.kill();
    let started = Instant::now();
    let e = c.admit(UTILITY.to("acme", "sender-1", "+15550000002")).await.unwrap_err();
    println!("Admit failed in {:?} while Redis was down", started.elapsed());
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let (status, body) = http_get(sidecar.admin_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");

    redis.restart(); // A new process: data and loaded scripts are gone.
    let (answer, took) =
        admit_until_ok(&mut c, UTILITY.to("acme", "sender-1", "+15550000002"), Duration::from_secs(15)).await;
    println!("Admission recovered {took:?} after Redis came back");
    assert_eq!(answer.reason(), Reason::NewRecipient);
    assert_eq!(http_get(sidecar.admin_addr, "/readyz").await.0, 200);
    let log = sidecar.log();
    assert!(!log.contains("5550000002"), "no recipient in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_allow_admits_unchecked_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let cfg = config(&format!("url = \"{}\"\non_error = \"allow\"", redis.url()), "");
    let sidecar = Sidecar::spawn(&cfg, &[HASH_KEY]);
    let mut c = sidecar.client().await;
    c.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap();
    redis.kill();
    let r = c.admit(UTILITY.to("acme", "sender-1", "+15550000002")).await.unwrap().into_inner();
    assert_eq!((r.decision(), r.reason()), (Decision::Admitted, Reason::StoreUnavailable));
    assert!(r.lease.is_empty());
    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    assert!(metrics.contains("tiergate_store_fail_open_total 1"), "{metrics}");
    assert!(sidecar.log().contains("store.on_error"), "the fail-open is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_admission_working() {
    let setup = SentinelSetup::start();
    let url = format!("url = \"redis+sentinel://127.0.0.1:{}/{}\"", setup.sentinel.port(), setup.master_name);
    let sidecar = Sidecar::spawn(&config(&url, ""), &[HASH_KEY]);
    let mut c = sidecar.client().await;
    assert_eq!(
        c.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap().into_inner().reason(),
        Reason::NewRecipient
    );
    let old = setup.master_port();
    let new = setup.failover();
    assert_ne!(old, new);
    let (answer, took) =
        admit_until_ok(&mut c, UTILITY.to("acme", "sender-1", "+15550000002"), Duration::from_secs(20)).await;
    println!("Admission worked again {took:?} after the failover to port {new}");
    assert_eq!(answer.decision(), Decision::Admitted);
    // The write went to the new master.
    let keys = common::redis::cli(new, &["--scan", "--pattern", "tg:*"]);
    assert!(keys.contains("tg:{acme}:w"), "{keys}");
    assert_eq!(common::redis::cli(new, &["TYPE", "tg:{acme}:w"]), "hash");
    let counted = usage(&mut c, "acme", "").await.unique_recipients;
    assert!(counted == 2 || counted == 1, "{counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_on_redis_cluster_serves_portfolios_on_every_slot() {
    let cluster = RedisCluster::start();
    let cfg = config(&format!("url = \"{}\"\ncluster = true", cluster.url()), "default_tier = \"T50\"");
    let sidecar = Sidecar::spawn(&cfg, &[HASH_KEY]);
    let mut c = sidecar.client().await;
    let requests: Vec<_> =
        (0..40).map(|i| UTILITY.to(&format!("portfolio-{}", i % 10), "sender-1", &format!("+1555000{i:04}"))).collect();
    let got = c.admit_batch(pb::AdmitBatchRequest { requests }).await.unwrap().into_inner().responses;
    assert!(got.iter().all(|r| r.reason() == Reason::NewRecipient));
    for p in 0..10 {
        assert_eq!(usage(&mut c, &format!("portfolio-{p}"), "").await.unique_recipients, 4);
    }
    // The portfolios really are spread over the masters.
    let holding = cluster.nodes.iter().filter(|n| n.cli(&["DBSIZE"]) != "0").count();
    assert!(holding >= 2, "keys landed on {holding} of 3 masters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_credentials_work_and_never_reach_the_log() {
    let redis = RedisServer::start();
    redis.cli(&["ACL", "SETUSER", "sidecar", "on", ">s3cret-pw", "~tg:*", "+@all"]);
    redis.cli(&["ACL", "SETUSER", "default", "off"]);
    let cfg = config(&format!("url = \"redis://sidecar:s3cret-pw@127.0.0.1:{}\"", redis.port()), "");
    let sidecar = Sidecar::spawn(&cfg, &[HASH_KEY]);
    let mut c = sidecar.client().await;
    assert_eq!(
        c.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap().into_inner().reason(),
        Reason::NewRecipient
    );
    let log = sidecar.log();
    assert!(log.contains(&format!("127.0.0.1:{}", redis.port())), "the store is named: {log}");
    assert!(!log.contains("s3cret-pw"), "{log}");
}

#[test]
fn the_redis_backend_refuses_to_start_without_a_long_enough_hash_key() {
    for env in [&[][..], &[("TIERGATE_STORE_HASH_KEY", "too-short")][..]] {
        let mut sidecar = Sidecar::spawn(&config("url = \"redis://127.0.0.1:1\"", ""), env);
        let status = sidecar.wait(Duration::from_secs(20));
        assert!(!status.success());
        let log = sidecar.log();
        assert!(log.contains("store.hash_key"), "{log}");
    }
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let mut sidecar = Sidecar::spawn("", &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut c = sidecar.client().await;
        c.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap();
    });
    let status = sidecar.terminate();
    assert!(status.success(), "{status:?}");
    let log = sidecar.log();
    assert!(log.contains("SIGTERM") && log.contains("Stopped."), "{log}");
}

#[test]
fn while_a_call_drains_after_sigterm_readyz_answers_503_and_the_call_completes() {
    let redis = RedisServer::start();
    let cfg = format!(
        "[server]\nshutdown_grace = \"30s\"\n\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"20s\"\n",
        redis.url()
    );
    let mut sidecar = Sidecar::spawn(&cfg, &[HASH_KEY]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let in_flight = runtime.block_on(async {
        let mut c = sidecar.client().await;
        c.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap();
        assert_eq!(http_get(sidecar.admin_addr, "/readyz").await.0, 200);
        // With Redis frozen, the next Admit waits for it: a call in flight when SIGTERM comes.
        let stall = redis.stall();
        let call = tokio::spawn(async move { c.admit(UTILITY.to("acme", "sender-1", "+15550000002")).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        (stall, call)
    });
    let (stall, call) = in_flight;
    assert!(!call.is_finished(), "the Admit waits for the frozen Redis");
    std::process::Command::new("kill").arg("-TERM").arg(sidecar.pid().to_string()).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sidecar.log().contains("Shutting down") {
        assert!(Instant::now() < deadline, "SIGTERM not seen: {}", sidecar.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    runtime.block_on(async {
        // The admin server stays up through the drain, saying why it is not ready.
        for _ in 0..3 {
            assert_eq!(http_get(sidecar.admin_addr, "/readyz").await, (503, "shutting down\n".to_string()));
            assert_eq!(http_get(sidecar.admin_addr, "/livez").await.0, 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!call.is_finished());
        stall.resume();
        let answer = call.await.unwrap().expect("the in-flight Admit is answered during the drain").into_inner();
        assert_eq!(answer.reason(), Reason::NewRecipient);
    });
    let status = sidecar.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}: {}", sidecar.log());
    assert!(sidecar.log().contains("Stopped."), "{}", sidecar.log());
    assert!(std::net::TcpStream::connect(sidecar.admin_addr).is_err(), "the admin server stops with the process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_to_one_sidecar_raises_the_limit_on_every_sidecar() {
    let redis = RedisServer::start();
    let store = format!("url = \"{}\"", redis.url());
    let plain = format!(
        "[store]\nbackend = \"redis\"\n{store}\n\n[[portfolios]]\nid = \"acme\"\nwabas = [\"102290129340398\"]\n"
    );
    let receiver_cfg = format!("{plain}\n[webhooks]\napp_secret = \"app-secret\"\nverify_token = \"token\"\n");
    let receiver = Sidecar::spawn(&receiver_cfg, &[HASH_KEY]);
    let worker = Sidecar::spawn(&plain, &[HASH_KEY]);
    let mut c = worker.client().await;
    let batch = |from: usize, n: usize| pb::AdmitBatchRequest {
        requests: (from..from + n).map(|i| UTILITY.to("acme", "sender-1", &format!("+1555{i:07}"))).collect(),
    };
    let got = c.admit_batch(batch(0, 251)).await.unwrap().into_inner().responses;
    assert_eq!(got.iter().filter(|r| r.decision() == Decision::Admitted).count(), 250, "TIER_250 to begin with");
    assert_eq!(got[250].reason(), Reason::LimitReached);

    receiver.client().await; // up and serving
    let body = fixture("business_capability_update");
    let (status, text) = post_webhook(receiver.admin_addr, "app-secret", &body).await;
    assert_eq!(status, 200, "{text}");

    let got = c.admit(UTILITY.to("acme", "sender-1", "+15550000250")).await.unwrap().into_inner();
    assert_eq!(got.reason(), Reason::NewRecipient);
    let u = got.usage.unwrap();
    assert_eq!((u.tier.as_str(), u.limit, u.unique_recipients), ("TIER_2K", 2_000, 251));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_stay_unique_when_the_redis_clock_goes_back() {
    use common::ops::{op, params, portfolio};
    use common::stores::{redis_options, standalone};
    use tiergate::policy::{Lease, Tier};
    use tiergate::store::redis::RedisStore;
    use tiergate::store::{Store, Windows};

    let redis = RedisServer::start();
    let store = RedisStore::new(redis_options(standalone(&redis), Windows::default(), "tg")).unwrap();
    let scope = portfolio("acme");
    let params = params(&Tier::limited("T", 10));
    let op = op("15550000001");
    let member = op.member.clone();
    // As after a failover to a node whose clock is behind: the last score is ahead of TIME.
    let ahead = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() + 60_000_000;
    redis.cli(&["HSET", "tg:{acme}:m", "seq", &ahead.to_string()]);
    let first = store.admit(&scope, &params, std::slice::from_ref(&op)).await.unwrap()[0].lease_score.unwrap();
    let old = Lease { scope: scope.clone(), member: member.clone(), score: first };
    assert!(store.release(&old).await.unwrap());
    let second = store.admit(&scope, &params, &[op]).await.unwrap()[0].lease_score.unwrap();
    assert!(second > first, "{second} after {first}");
    assert!(!store.release(&old).await.unwrap(), "an old lease cannot release a newer Admit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_counts_follow_the_redis_clock_not_a_skewed_sidecar() {
    use common::ops::{op, params, portfolio};
    use common::stores::{redis_options, standalone};
    use std::sync::Arc;
    use tiergate::policy::Delivery;
    use tiergate::policy::Tier;
    use tiergate::store::redis::RedisStore;
    use tiergate::store::{Change, Clock, Store, SystemClock, Windows};

    struct Skewed(i64);
    impl Clock for Skewed {
        fn now(&self) -> u64 {
            SystemClock.now().saturating_add_signed(self.0)
        }
    }
    let redis = RedisServer::start();
    let open = |skew: i64| {
        let opts = redis_options(standalone(&redis), Windows::default(), "tg");
        RedisStore::new(opts).unwrap().with_clock(Arc::new(Skewed(skew)))
    };
    const DAY_US: i64 = 86_400_000_000;
    let (ahead, behind, right) = (open(DAY_US), open(-DAY_US), open(0));
    let scope = portfolio("acme");
    let unlimited = params(&Tier::unlimited("UNL"));
    ahead.admit(&scope, &unlimited, &[op("15550000001")]).await.unwrap();
    let again = behind.admit(&scope, &unlimited, &[op("15550000001")]).await.unwrap();
    assert_eq!(again[0].reason, tiergate::policy::Reason::AlreadyCounted);
    // Each skewed sidecar confirms the delivery: both write to the Redis clock's day.
    for store in [&ahead, &behind] {
        let delivered = Change::Delivery {
            scope: scope.clone(),
            member: op("15550000001").member,
            status: Delivery::Delivered,
            at: None,
        };
        store.apply("acme", &[delivered]).await.unwrap();
    }
    for store in [&ahead, &behind, &right] {
        let report = store.usage(&scope, &unlimited.fallback).await.unwrap();
        assert_eq!((report.usage.counted, report.unique_7d), (1, 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_ahead_of_the_redis_clock_stays_counted_for_its_whole_window() {
    use common::ops::{hasher, inbound, now_us, op, op_from, params, portfolio};
    use common::stores::{redis_options, standalone};
    use tiergate::policy::{Reason, Tier};
    use tiergate::store::redis::RedisStore;
    use tiergate::store::{Store, Windows};

    let redis = RedisServer::start();
    let second = Duration::from_secs(1);
    let opts = redis_options(standalone(&redis), Windows { window: second, service_window: second }, "tg");
    let store = RedisStore::new(opts).unwrap();
    let scope = portfolio("acme");
    let params = params(&Tier::limited("T", 10));
    // As after the Redis clock stepped back 4 s: the scope's last score is ahead of TIME, so the
    // next contact's score is too, and so is a service window opened before the step.
    let ahead = now_us() + 4_000_000;
    redis.cli(&["HSET", "tg:{acme}:m", "seq", &ahead.to_string()]);
    let opened = hasher().service_window("sender-1", "15550000009");
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("ZADD").arg("tg:{acme}:sw").arg(ahead + 1_000_000).arg(&opened).exec(&mut conn).unwrap();
    let counted = store.admit(&scope, &params, &[op("15550000001")]).await.unwrap().remove(0);
    assert_eq!(counted.reason, Reason::NewRecipient);
    let score = counted.lease_score.unwrap();
    assert!(score > ahead, "{score} is ahead of {ahead}");
    inbound(&store, "acme", "sender-2", "15550000002").await;

    let pttl: u64 = redis.cli(&["PTTL", "tg:{acme}:w"]).parse().unwrap();
    let needed = (score + 1_000_000 - now_us()) / 1_000;
    assert!(pttl >= needed, "the window key lives {pttl} ms; its newest contact stays counted {needed} ms");
    let pttl: u64 = redis.cli(&["PTTL", "tg:{acme}:sw"]).parse().unwrap();
    let needed = (ahead + 1_000_000 - now_us()) / 1_000;
    assert!(pttl >= needed, "the service windows live {pttl} ms; the last one closes in {needed} ms");

    // Past `window + 1 s` from now, still inside the window counted from the contact's score.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let again = store.admit(&scope, &params, &[op("15550000001")]).await.unwrap().remove(0);
    assert_eq!(again.reason, Reason::AlreadyCounted, "the recipient is still inside its window");
    let reply = store.admit(&scope, &params, &[op_from("sender-1", "15550000009")]).await.unwrap().remove(0);
    assert_eq!(reply.reason, Reason::ServiceWindow, "the service window is still open");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_that_redis_runs_after_a_stall_spend_nothing_of_the_limit() {
    let redis = RedisServer::start();
    let cfg = config(&format!("url = \"{}\"", redis.url()), "default_tier = \"T50\"");
    let sidecar = Sidecar::spawn(&cfg, &[HASH_KEY]);
    let mut c = sidecar.client().await;
    let first = c.admit(UTILITY.to("acme", "sender-1", "+15550000000")).await.unwrap().into_inner();
    assert_eq!(first.reason(), Reason::NewRecipient);

    // Redis stalls: every Admit times out (store.timeout = 300ms) while its script waits in
    // Redis's socket buffer, to run when Redis resumes.
    let stall = redis.stall();
    let stalled = 40;
    let calls: Vec<_> = (1..=stalled)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.admit(UTILITY.to("acme", "sender-1", &format!("+1555{i:07}"))).await })
        })
        .collect();
    for call in calls {
        let e = call.await.unwrap().expect_err("Redis is stalled");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stall.resume();

    // Once Redis has run what waited for it, none of the Admits its callers were told failed
    // holds a slot.
    let (after, _) =
        admit_until_ok(&mut c, UTILITY.to("acme", "sender-1", "+15559999999"), Duration::from_secs(10)).await;
    assert_eq!(after.reason(), Reason::NewRecipient);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counted = usage(&mut c, "acme", "").await.unique_recipients;
    println!("{} of {stalled} Admits answered UNAVAILABLE during the stall were counted", counted - 2);
    assert_eq!(counted, 2, "only the Admits before and after the stall count");
    for i in 1..=stalled {
        let again = c.admit(UTILITY.to("acme", "sender-1", &format!("+1555{i:07}"))).await.unwrap().into_inner();
        assert_eq!(again.reason(), Reason::NewRecipient, "recipient {i} was not counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_redis_starts_after_its_deadline_is_refused_and_changes_nothing() {
    use common::ops::{hasher, op, params, portfolio};
    use common::stores::{redis_options, standalone};
    use tiergate::policy::{Lease, Reason, Tier};
    use tiergate::store::redis::RedisStore;
    use tiergate::store::{Change, Store, StoreError, Windows};

    let redis = RedisServer::start();
    let timeout = Duration::from_secs(2);
    let opts = redis_options(standalone(&redis), Windows::default(), "tg");
    let store = RedisStore::new(tiergate::store::redis::RedisOptions { timeout, ..opts }).unwrap();
    let (scope, params) = (portfolio("acme"), params(&Tier::limited("T", 10)));
    let counted = store.admit(&scope, &params, &[op("15550000001")]).await.unwrap().remove(0);
    let lease = Lease { scope: scope.clone(), member: op("15550000001").member, score: counted.lease_score.unwrap() };

    // Each call's deadline is a fifth of the timeout before its caller gives up: Redis resumes
    // between the two, so every script starts late and its refusal still reaches the caller.
    let stall = redis.stall();
    let opt_out = [Change::OptOut { member: hasher().recipient("15550000002"), opted_out: true }];
    let new = [op("15550000002")];
    let resume = async {
        tokio::time::sleep(Duration::from_millis(1_800)).await;
        stall.resume();
    };
    let (admitted, released, applied, ()) =
        tokio::join!(store.admit(&scope, &params, &new), store.release(&lease), store.apply("acme", &opt_out), resume,);
    for e in [admitted.map(drop), released.map(drop), applied.map(drop)] {
        match e {
            Err(StoreError::Unavailable(m)) => assert!(m.contains("deadline"), "{m}"),
            other => panic!("a late write must be refused as unavailable: {other:?}"),
        }
    }
    assert_eq!(store.usage(&scope, &params.fallback).await.unwrap().usage.counted, 1, "nothing counted or released");
    assert_eq!(store.portfolio("acme").await.unwrap().opted_out, 0, "nothing applied");
    let again = store.admit(&scope, &params, &[op("15550000002")]).await.unwrap().remove(0);
    assert_eq!(again.reason, Reason::NewRecipient);
    assert!(store.release(&lease).await.unwrap(), "the lease still holds its slot");
}
