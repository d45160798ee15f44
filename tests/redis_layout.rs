//! The Redis store's window layout on a real redis-server: what a window of many recipients costs
//! in memory, and how a window kept by the previous version (one sorted set) is read on.

mod common;

use std::time::Duration;

use common::ops::{admit, admit_one, limited, now_us, op, portfolio, usage};
use common::redis::RedisServer;
use common::stores::{redis_options, standalone};
use tiergate::policy::{micros, Lease, Reason};
use tiergate::store::redis::{RedisStore, WindowLayout};
use tiergate::store::{Store, Windows};

/// `MEMORY USAGE` (every field sampled) of every key of a portfolio's scopes.
fn scope_bytes(redis: &RedisServer, portfolio: &str) -> u64 {
    let keys = redis.cli(&["--scan", "--pattern", &format!("tg:{{{portfolio}}}*")]);
    keys.lines().map(|k| redis.cli(&["MEMORY", "USAGE", k, "SAMPLES", "0"]).parse::<u64>().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_takes_at_most_24_bytes_per_recipient() {
    let redis = RedisServer::start();
    let store = RedisStore::new(redis_options(standalone(&redis), Windows::default(), "tg")).unwrap();
    for n in [250, 20_000] {
        let (id, tier) = (format!("size-{n}"), limited(n as u64));
        let s = portfolio(&id);
        let ops: Vec<_> = (0..n).map(|i| op(&format!("1666{i:07}"))).collect();
        for batch in ops.chunks(1_000) {
            assert!(admit(&store, &s, &tier, batch).await.iter().all(|a| a.reason == Reason::NewRecipient));
        }
        assert_eq!(usage(&store, &s, &tier).await.counted, n as u64);
        let per_recipient = scope_bytes(&redis, &id) as f64 / n as f64;
        println!("{n} recipients: {per_recipient:.1} bytes each");
        assert!(per_recipient <= 24.0, "{n} recipients take {per_recipient:.1} bytes each");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_split_and_merge_and_the_time_log_pages_through_its_directory() {
    let redis = RedisServer::start();
    // Chunks of one contact, so 700 recipients fill six directory pages of 128 chunks.
    let layout = WindowLayout { load: 4, chunk: 1, ..WindowLayout::default() };
    let opts = redis_options(standalone(&redis), Windows::default(), "tg");
    let store = RedisStore::new(opts).unwrap().with_layout(layout).unwrap();
    let (s, t) = (portfolio("grow"), limited(1_000));
    let day = micros(Windows::default().window);
    let fields = |prefix: char| redis.cli(&["HKEYS", "tg:{grow}:w"]).lines().filter(|f| f.starts_with(prefix)).count();
    let ops: Vec<_> = (0..700).map(|i| op(&format!("1777{i:07}"))).collect();
    let mut leases = Vec::new();
    for batch in ops.chunks(100) {
        for (a, op) in admit(&store, &s, &t, batch).await.into_iter().zip(batch) {
            leases.push(Lease { scope: s.clone(), member: op.member.clone(), score: a.lease_score.unwrap() });
        }
    }
    // 700 recipients in at most 175 buckets of about 4, and 700 chunks in 6 directory pages.
    let buckets = fields('b');
    assert!((120..=175).contains(&buckets), "{buckets} buckets");
    assert_eq!((fields('c'), fields('d')), (700, 6));

    // Every 10th is counted again: its old contact leaves a chunk on any page, its new one is
    // the newest.
    let again: Vec<_> = ops.iter().step_by(10).cloned().collect();
    assert!(admit(&store, &s, &t, &again).await.iter().all(|a| a.reason == Reason::AlreadyCounted));
    assert!(!store.release(&leases[0]).await.unwrap(), "its first lease is stale");
    let u = usage(&store, &s, &t).await;
    assert_eq!((u.counted, u.next_slot_at), (700, Some(leases[1].score + day)));
    // Under a lower limit, a new recipient waits for the contact at rank 700 - limit, found by the
    // directory's counts on whichever page it is.
    let untouched: Vec<u64> = leases.iter().enumerate().filter(|(i, _)| i % 10 != 0).map(|(_, l)| l.score).collect();
    for limit in [695, 100] {
        let denied = admit_one(&store, &s, &limited(limit), op("17778888888")).await;
        let leaving = untouched[700 - limit as usize];
        assert_eq!(denied.reason, Reason::LimitReached);
        assert_eq!(denied.retry_after, Some(Duration::from_micros(leaving + day - denied.now)), "limit {limit}");
    }

    // All but the newest 5 of the others give their slots back: emptied chunks and directory
    // pages leave the head of the log, and the next Admit merges the buckets back.
    for (i, lease) in leases.iter().enumerate().take(695).filter(|(i, _)| i % 10 != 0) {
        assert!(store.release(lease).await.unwrap(), "{i}");
    }
    let more = admit_one(&store, &s, &t, op("17779999999")).await;
    assert_eq!((more.reason, more.usage.counted), (Reason::NewRecipient, 76));
    assert_eq!(more.usage.next_slot_at, Some(leases[695].score + day));
    assert!(fields('b') <= 76, "{} buckets", fields('b'));
    assert_eq!(fields('c'), 76, "the 5 oldest, the 70 counted again and the newest");
    assert_eq!(fields('d'), 2);
    for lease in &leases[695..] {
        assert!(store.release(lease).await.unwrap());
    }
    assert_eq!(usage(&store, &s, &t).await.counted, 71);
}

/// Writes a window as the previous version kept it: a sorted set of recipient hash → last contact.
fn previous_window(conn: &mut redis::Connection, key: &str, contacts: &[(&str, u64)], ttl: Duration) {
    for (recipient, score) in contacts {
        redis::cmd("ZADD").arg(key).arg(*score).arg(op(recipient).member).exec(conn).unwrap();
    }
    redis::cmd("PEXPIRE").arg(key).arg(ttl.as_millis() as u64).exec(conn).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_the_previous_layout_counts_until_its_contacts_leave() {
    let redis = RedisServer::start();
    let window = Duration::from_secs(3);
    let store =
        RedisStore::new(redis_options(standalone(&redis), Windows { window, service_window: window }, "tg")).unwrap();
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let (s, t) = (portfolio("acme"), limited(5));
    // As the previous version left it: three contacts, the oldest 1.5 s ago.
    let now = now_us();
    let (oldest, middle, newest) = (now - 1_500_000, now - 1_000_000, now - 500_000);
    let contacts = [("15550000001", oldest), ("15550000002", middle), ("15550000003", newest)];
    previous_window(&mut conn, "tg:{acme}:w", &contacts, window);
    redis.cli(&["HSET", "tg:{acme}:m", "seq", &newest.to_string()]);

    let u = usage(&store, &s, &t).await;
    assert_eq!((u.counted, u.next_slot_at), (3, Some(oldest + micros(window))));
    // The sorted set moved aside; a sidecar of the previous version now fails instead of
    // counting beside the new window.
    assert_eq!(redis.cli(&["TYPE", "tg:{acme}:w"]), "hash");
    assert_eq!(redis.cli(&["TYPE", "tg:{acme}:wz"]), "zset");
    let previous_write = redis.try_cli(&["ZADD", "tg:{acme}:w", "1", "x"]);
    assert!(format!("{previous_write:?}").contains("WRONGTYPE"), "{previous_write:?}");

    // Its recipients are counted: one counted again moves to the new window.
    assert_eq!(admit_one(&store, &s, &t, op("15550000002")).await.reason, Reason::AlreadyCounted);
    assert_eq!(redis.cli(&["ZCARD", "tg:{acme}:wz"]), "2");
    let more = admit(&store, &s, &t, &[op("15550000004"), op("15550000005"), op("15550000006")]).await;
    let got: Vec<Reason> = more.iter().map(|a| a.reason).collect();
    assert_eq!(got, [Reason::NewRecipient, Reason::NewRecipient, Reason::LimitReached]);
    // The oldest contact is still the previous version's, and frees the next slot.
    let denied = &more[2];
    assert_eq!(denied.usage.next_slot_at, Some(oldest + micros(window)));
    assert_eq!(denied.retry_after, Some(Duration::from_micros(oldest + micros(window) - denied.now)));
    // A lease the previous version handed out still gives its slot back, once.
    let lease = Lease { scope: s.clone(), member: op("15550000001").member, score: oldest };
    assert!(store.release(&lease).await.unwrap());
    assert!(!store.release(&lease).await.unwrap());
    assert_eq!(usage(&store, &s, &t).await.counted, 4);

    // Once its contacts have left the window, the sorted set is gone and the count is the new one.
    tokio::time::sleep(Duration::from_micros(newest + micros(window) - now_us()) + Duration::from_millis(50)).await;
    let u = usage(&store, &s, &t).await;
    assert_eq!(u.counted, 3, "15550000002, 4 and 5, written since");
    assert_eq!(redis.cli(&["EXISTS", "tg:{acme}:wz"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sorted_set_started_beside_an_adopted_one_joins_it() {
    let redis = RedisServer::start();
    let store = RedisStore::new(redis_options(standalone(&redis), Windows::default(), "tg")).unwrap();
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let (s, t) = (portfolio("beta"), limited(5));
    let now = now_us();
    let day = Duration::from_secs(24 * 3600);
    // Adopted earlier, and a sidecar of the previous version started a set of its own since.
    previous_window(&mut conn, "tg:{beta}:wz", &[("15550000001", now - 3), ("15550000002", now - 2)], day);
    previous_window(&mut conn, "tg:{beta}:w", &[("15550000002", now - 1), ("15550000003", now)], day);
    redis.cli(&["HSET", "tg:{beta}:m", "seq", &now.to_string()]);
    let got = admit(&store, &s, &t, &[op("15550000002"), op("15550000004")]).await;
    assert_eq!((got[0].reason, got[1].reason), (Reason::AlreadyCounted, Reason::NewRecipient));
    assert_eq!(got[1].usage.counted, 4);
    assert_eq!(got[1].usage.next_slot_at, Some(now - 3 + micros(day)));
    let pttl: u64 = redis.cli(&["PTTL", "tg:{beta}:wz"]).parse().unwrap();
    assert!(pttl > 23 * 3600 * 1000, "the joined set keeps its contacts' window: {pttl} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_state_lives_under_the_portfolio_tag_and_pair_schedules_expire_on_their_own() {
    use common::ops::{hasher, op_from, params};
    use common::stores::redis_store;
    use tiergate::policy::rate::{PairRule, ThroughputRule};
    use tiergate::store::{AdmitParams, Change, Rates};

    let (store, redis) = redis_store(Windows::default(), "tgrates");
    let rates = Rates {
        throughput: Some(ThroughputRule { default_mps: 80, burst: Duration::ZERO }),
        pair: Some(PairRule { interval: Duration::from_secs(6), burst: 45 }),
    };
    let p = AdmitParams { rates, ..params(&limited(10)) };
    let a = store.admit(&portfolio("acme"), &p, &[op_from("num-1", "5511900000001")]).await.unwrap();
    assert_eq!(a[0].reason, Reason::NewRecipient);
    // One key per pair, named by its keyed hash and kept until its schedule is past.
    let key = format!("tgrates:{{acme}}:pr:{}", hex::encode(hasher().service_window("num-1", "5511900000001")));
    let ttl: u64 = redis.cli(&["PTTL", &key]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 6_000, "{ttl}");
    let tat: u64 = redis.cli(&["HGET", "tgrates:{acme}:pf", "s:num-1:tat"]).parse().unwrap();
    assert_eq!(tat, a[0].now + 12_500, "the number's schedule, one interval at 80 per second on");
    // Capped recipients: one sorted set, kept until the last cap ends.
    let member = hasher().recipient("5511900000002");
    store.apply("acme", &[Change::MarketingCapped { member, at: None }]).await.unwrap();
    let ttl: u64 = redis.cli(&["PTTL", "tgrates:{acme}:mc"]).parse().unwrap();
    assert!(ttl > 23 * 3_600_000 && ttl <= 24 * 3_600_000 + 1_000, "{ttl}");
}
