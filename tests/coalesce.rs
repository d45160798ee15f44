//! Concurrent Admits of one scope on a real Redis, through the real `tiergate` binary: while a
//! store call of a scope is in flight, the Admits that arrive go out together as the next call,
//! each answered as if alone; a caller that gives up while queued is never counted.
//!
//! Each test runs its own sidecar process, so its `/metrics` count only its own calls.

mod common;

use std::time::{Duration, Instant};

use common::calls::{usage, Client};
use common::redis::RedisServer;
use common::requests::UTILITY;
use common::server::{http_get, Sidecar};
use tiergate::pb::{self, Reason};
use tonic::Code;

/// The limit of the tests' scope.
const LIMIT: usize = 40;

/// A sidecar on `redis` whose default tier allows [`LIMIT`] recipients. Its store timeout
/// outlasts the tests' stalls of Redis.
fn sidecar(redis: &RedisServer) -> Sidecar {
    let config = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"5s\"\nhash_key = \"coalesce-test-hash-key\"\n\n\
         [policy]\nladder = [{{ name = \"T{LIMIT}\", limit = {LIMIT} }}]\ndefault_tier = \"T{LIMIT}\"\n",
        redis.url()
    );
    Sidecar::spawn(&config, &[])
}

/// The `i`th recipient.
fn recipient(i: usize) -> String {
    format!("+1555{i:07}")
}

/// (admission store calls, messages they carried) so far, from the sidecar's `/metrics`.
async fn calls(sidecar: &Sidecar) -> (u64, u64) {
    let (status, body) = http_get(sidecar.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| {
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok()).map_or(0, |v| v as u64)
    };
    (value("tiergate_admit_batch_size_count"), value("tiergate_admit_batch_size_sum"))
}

/// Waits until the sidecar has sent `n` admission calls.
async fn until_sent(sidecar: &Sidecar, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls(sidecar).await.0 < n {
        assert!(Instant::now() < deadline, "the sidecar did not send {n} admission calls: {:?}", calls(sidecar).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts an Admit to `to` from a task of its own, with a gRPC deadline when given.
fn spawn_admit(
    c: &Client,
    to: String,
    deadline: Option<Duration>,
) -> tokio::task::JoinHandle<Result<pb::AdmitResponse, tonic::Status>> {
    let mut c = c.clone();
    tokio::spawn(async move {
        let mut request = tonic::Request::new(UTILITY.to("acme", "s1", &to));
        if let Some(d) = deadline {
            request.set_timeout(d);
        }
        c.admit(request).await.map(tonic::Response::into_inner)
    })
}

async fn release(c: &mut Client, lease: &str) -> bool {
    c.release(pb::ReleaseRequest { lease: lease.into() }).await.unwrap().into_inner().released
}

/// With Redis stalled, one Admit is in flight and the others queue behind it; when Redis resumes
/// they all go out as one more call, and each caller gets its own answer: exactly the limit is
/// admitted, in arrival order, and every lease releases its own recipient's contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_queued_behind_a_call_go_out_as_one_call_each_with_its_own_answer() {
    const ADMITS: usize = 100;
    let redis = RedisServer::start();
    let sidecar = sidecar(&redis);
    let clients: Vec<Client> = clients(&sidecar, 4).await;
    let (calls_before, messages_before) = calls(&sidecar).await;

    let stall = redis.stall();
    let first = spawn_admit(&clients[0], recipient(0), None);
    until_sent(&sidecar, calls_before + 1).await;
    let mut queued = Vec::new();
    for i in 1..ADMITS {
        queued.push(spawn_admit(&clients[i % clients.len()], recipient(i), None));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(calls(&sidecar).await.0, calls_before + 1, "nothing more is sent while the call is in flight");
    stall.resume();

    let mut answers = vec![first.await.unwrap().unwrap()];
    for t in queued {
        answers.push(t.await.unwrap().unwrap());
    }
    let (calls_after, messages_after) = calls(&sidecar).await;
    assert_eq!(
        (calls_after - calls_before, messages_after - messages_before),
        (2, ADMITS as u64),
        "{ADMITS} Admits in two store calls"
    );

    // Exactly the limit is admitted, each with the usage right after its own decision (which
    // of the queued ones, the unit tests pin down: the first to arrive).
    assert_eq!(answers[0].reason(), Reason::NewRecipient);
    let mut counted_after = Vec::new();
    for (i, a) in answers.iter().enumerate() {
        let counted = a.usage.as_ref().unwrap().unique_recipients;
        if a.reason() == Reason::NewRecipient {
            assert!(!a.lease.is_empty(), "Admit {i}");
            counted_after.push(counted);
        } else {
            assert_eq!((a.reason(), counted), (Reason::LimitReached, LIMIT as u64), "Admit {i}");
            assert!(a.lease.is_empty() && a.retry_after.is_some(), "Admit {i}");
        }
    }
    counted_after.sort_unstable();
    assert_eq!(counted_after, (1..=LIMIT as u64).collect::<Vec<_>>());
    let mut c = clients[0].clone();
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, LIMIT as u64);

    // Each lease gives back its own recipient: that one (and no other) is new again.
    for (i, a) in answers.iter().enumerate().filter(|(_, a)| !a.lease.is_empty()) {
        assert!(release(&mut c, &a.lease).await, "lease of Admit {i}");
        assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, LIMIT as u64 - 1);
        let again = c.admit(UTILITY.to("acme", "s1", &recipient(i))).await.unwrap().into_inner();
        assert_eq!(again.reason(), Reason::NewRecipient, "the lease of Admit {i} released its recipient");
        assert!(!release(&mut c, &a.lease).await, "a lease releases once");
    }
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, LIMIT as u64);
}

/// Admits whose callers give up (gRPC deadline) while queued behind a stalled call are never
/// sent, so never counted; the callers before and after them are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_given_up_while_queued_are_never_counted() {
    let redis = RedisServer::start();
    let sidecar = sidecar(&redis);
    let mut c = sidecar.client().await;
    let (calls_before, messages_before) = calls(&sidecar).await;

    let stall = redis.stall();
    let first = spawn_admit(&c, recipient(0), None);
    until_sent(&sidecar, calls_before + 1).await;
    let impatient: Vec<_> = (1..=5).map(|i| spawn_admit(&c, recipient(i), Some(Duration::from_millis(200)))).collect();
    for t in impatient {
        let e = t.await.unwrap().unwrap_err();
        assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled), "{e:?}");
    }
    let last = spawn_admit(&c, recipient(6), None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stall.resume();

    assert_eq!(first.await.unwrap().unwrap().reason(), Reason::NewRecipient);
    let last = last.await.unwrap().unwrap();
    assert_eq!((last.reason(), last.usage.unwrap().unique_recipients), (Reason::NewRecipient, 2));
    let (calls_after, messages_after) = calls(&sidecar).await;
    assert_eq!((calls_after - calls_before, messages_after - messages_before), (2, 2), "the five were never sent");
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 2);
    for i in 1..=5 {
        let r = c.admit(UTILITY.to("acme", "s1", &recipient(i))).await.unwrap().into_inner();
        assert_eq!(r.reason(), Reason::NewRecipient, "recipient {i} was not counted before");
    }
}

/// Many concurrent callers, each recipient sent twice: exactly the limit is counted, each
/// recipient once (the second send of a counted one is already counted, wherever it lands), and
/// store calls carry every Admit once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admits_of_one_scope_count_exactly_the_limit() {
    const RECIPIENTS: usize = 128;
    let redis = RedisServer::start();
    let sidecar = sidecar(&redis);
    let clients = clients(&sidecar, 8).await;
    let (calls_before, messages_before) = calls(&sidecar).await;
    let tasks: Vec<_> =
        (0..2 * RECIPIENTS).map(|k| spawn_admit(&clients[k % clients.len()], recipient(k / 2), None)).collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    let mut admitted = 0;
    for pair in answers.chunks(2) {
        match [pair[0].reason(), pair[1].reason()] {
            [Reason::NewRecipient, Reason::AlreadyCounted] | [Reason::AlreadyCounted, Reason::NewRecipient] => {
                admitted += 1
            }
            [Reason::LimitReached, Reason::LimitReached] => {}
            other => panic!("one recipient sent twice was answered {other:?}"),
        }
    }
    assert_eq!(admitted, LIMIT);
    let mut c = clients[0].clone();
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, LIMIT as u64);
    let leases: std::collections::HashSet<&str> =
        answers.iter().map(|a| a.lease.as_str()).filter(|l| !l.is_empty()).collect();
    assert_eq!(leases.len(), LIMIT, "one lease per counted recipient");
    let (calls_after, messages_after) = calls(&sidecar).await;
    assert_eq!(messages_after - messages_before, 2 * RECIPIENTS as u64);
    assert!(calls_after - calls_before <= 2 * RECIPIENTS as u64);
}

/// `n` clients, each on its own connection.
async fn clients(sidecar: &Sidecar, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(sidecar.client().await);
    }
    clients
}
