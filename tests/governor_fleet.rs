//! The send governor's per-number throughput across a fleet: three real `tiergate` binaries on
//! one real redis-server share each number's GCRA schedule, so together they admit no more than
//! the number's rate, whether callers take denials (`max_wait` 0) or paced slots.
//!
//! The bounds are correctness bounds, not speed targets: the elapsed time is measured from before
//! the first call to after the last answer, so a slow machine only loosens them. The achieved
//! rate itself is printed by `cargo bench --bench load -- --paced` (BENCHMARKS.md).

mod common;

use std::time::{Duration, Instant};

use common::calls::Client;
use common::redis::{require_redis, RedisServer};
use common::requests::UTILITY;
use common::server::Sidecar;
use tiergate::pb::{self, Decision, Reason};

const HASH_KEY: (&str, &str) = ("TIERGATE_STORE_HASH_KEY", "test-hash-key-0123456789");

/// The number's throughput, in messages per second.
const MPS: u32 = 20;
/// The number every Admit sends from.
const NUMBER: &str = "sender-1";
/// Concurrent callers per sidecar.
const CALLERS_PER_SIDECAR: usize = 3;
/// How long callers start new calls.
const RUN: Duration = Duration::from_secs(2);

/// Three sidecars on one fresh redis-server: no burst, so the schedule never runs ahead of
/// `MPS`, and no pair rate (every recipient is new anyway), so only throughput decides.
fn fleet() -> (RedisServer, Vec<Sidecar>) {
    require_redis();
    let redis = RedisServer::start();
    let config = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\n\n[policy]\nladder = [{{ name = \"UNL\" }}]\n\n\
         [policy.throughput]\nenabled = true\ndefault_mps = {MPS}\nburst = \"0s\"\n\n\
         [policy.pair_rate]\nenabled = false\n",
        redis.url()
    );
    let sidecars = (0..3).map(|_| Sidecar::spawn(&config, &[HASH_KEY])).collect();
    (redis, sidecars)
}

/// Every answer of a run, and how long the run took from before the first call to after the last
/// answer.
struct Run {
    answers: Vec<pb::AdmitResponse>,
    elapsed: Duration,
}

impl Run {
    fn admitted(&self) -> Vec<&pb::AdmitResponse> {
        self.answers.iter().filter(|r| r.decision() == Decision::Admitted).collect()
    }

    /// The most admissions `MPS` allows in `span` without burst: one at its start, then one per
    /// interval.
    fn allowed(span: Duration) -> f64 {
        f64::from(MPS) * span.as_secs_f64() + 1.0
    }
}

/// A client of each sidecar.
async fn clients(sidecars: &[Sidecar]) -> Vec<Client> {
    let mut clients = Vec::new();
    for s in sidecars {
        clients.push(s.client().await);
    }
    clients
}

/// [`CALLERS_PER_SIDECAR`] closed-loop callers on each client send Admits from [`NUMBER`], each
/// to a new recipient, with `max_wait`, for [`RUN`].
async fn hammer(clients: &[Client], max_wait: Duration) -> Run {
    let started = Instant::now();
    let callers: Vec<_> = (0..clients.len() * CALLERS_PER_SIDECAR)
        .map(|caller| {
            let mut client = clients[caller % clients.len()].clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0.. {
                    if started.elapsed() >= RUN {
                        break;
                    }
                    let mut request = UTILITY.to("acme", NUMBER, &format!("+1555{caller:02}{i:05}"));
                    request.max_wait = Some(max_wait.try_into().unwrap());
                    answers.push(client.admit(request).await.unwrap().into_inner());
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for c in callers {
        answers.extend(c.await.unwrap());
    }
    Run { answers, elapsed: started.elapsed() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_admit_no_more_than_one_numbers_throughput_between_them() {
    let (_redis, sidecars) = fleet();
    let run = hammer(&clients(&sidecars).await, Duration::ZERO).await;

    let admitted = run.admitted().len();
    let bound = Run::allowed(run.elapsed) + 1.0;
    assert!(admitted > 0, "nothing admitted in {:?}", run.elapsed);
    assert!(
        admitted as f64 <= bound,
        "{admitted} admitted from one number at {MPS} messages/s through 3 sidecars in {:?}: at most {bound:.0} allowed",
        run.elapsed
    );
    for r in &run.answers {
        match r.decision() {
            Decision::Admitted => {
                assert_eq!(r.reason(), Reason::NewRecipient);
                assert!(r.waited.is_none(), "max_wait 0 never holds a call: {r:?}");
            }
            _ => {
                assert_eq!(r.reason(), Reason::ThroughputExceeded, "{r:?}");
                let retry = Duration::try_from(r.retry_after.unwrap()).unwrap();
                assert!(!retry.is_zero() && retry <= Duration::from_secs(1), "retry_after {retry:?}");
            }
        }
    }
    // Nine callers for 2 s send far more than 41 Admits, so the number's rate must have denied some.
    assert!(run.answers.len() > admitted, "{} calls, all admitted", run.answers.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_pace_one_number_on_one_schedule() {
    let (_redis, sidecars) = fleet();
    let max_wait = Duration::from_secs(2);
    let run = hammer(&clients(&sidecars).await, max_wait).await;

    // Nine callers hold at most nine slots 50 ms apart, so no wait comes near max_wait: every
    // Admit is paced, none denied.
    let admitted = run.admitted();
    let denied = run.answers.iter().find(|r| r.decision() != Decision::Admitted);
    assert!(denied.is_none(), "a paced Admit was denied: {denied:?}");
    let waited: Vec<Duration> =
        admitted.iter().map(|r| r.waited.map(|w| Duration::try_from(w).unwrap()).unwrap_or_default()).collect();
    let longest = waited.iter().copied().max().unwrap_or_default();
    assert!(longest <= max_wait, "held {longest:?}, longer than max_wait");
    // The nine first calls arrive together and only one slot is free: the others are held.
    let held = waited.iter().filter(|w| !w.is_zero()).count();
    assert!(held >= 8, "only {held} of {} Admits held", admitted.len());
    // Each admission's slot lies between the first call and its own answer, so all of them fit in
    // the run (plus the longest hold, for slack): one schedule of MPS, not one per sidecar.
    let bound = Run::allowed(run.elapsed + longest);
    assert!(
        admitted.len() as f64 <= bound,
        "{} admitted from one number at {MPS} messages/s through 3 sidecars in {:?} (longest hold {longest:?}): at most {bound:.0} allowed",
        admitted.len(),
        run.elapsed
    );
}
