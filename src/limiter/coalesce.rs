//! Natural batching: concurrent admissions of one scope share store calls.
//!
//! Every admission call (a single Admit, or one scope's messages of an AdmitBatch) goes through
//! [`Coalescer::admit`]. At most one store call per scope is in flight in this sidecar:
//!
//! - **Idle scope**: the caller becomes the scope's *leader* and sends its own messages at once,
//!   from its own task, alone. No timer, no added delay.
//! - **Busy scope** (a call is in flight): the caller queues its messages in the scope's *lane*
//!   and waits for its answer on a oneshot channel.
//! - **Hand-off**: when the in-flight call returns (or its leader is dropped), the queued groups,
//!   in arrival order and up to [`MAX_CALL`] messages, become the next call, sent by a *driver*
//!   task spawned for the scope. The driver answers every caller of a call as soon as that call
//!   returns, then sends the next queued groups, and ends, removing the lane, when none are
//!   queued. So a caller waits for its own call only (and the one in flight when it came), there
//!   is at most one driver task per busy scope, and idle scopes leave nothing in the map.
//!
//! One call decides its messages in order, as if each group had been sent alone after the one
//! before ([`Store::admit`]), so each caller's answer — decision, lease score, `retry_after` and
//! the usage right after its own decision — is what it would get without coalescing.
//! Exactness does not depend on it: the store decides atomically either way.
//!
//! **Cancellation.** A caller that gives up (its gRPC deadline passes, its client disconnects)
//! drops its future and with it the receiving end of its channel. A queued group whose receiver
//! is gone is skipped when the next call is put together, under the lane's lock: it is never
//! sent, so no recipient is counted for a message nobody was told about. A group already taken
//! into a call is in flight, as a call of a dropped caller is without coalescing; the store's own
//! deadline (`store.timeout`) bounds it. A leader dropped mid-call hands off at once, as if its
//! call had returned (each call is atomic, so one still running alongside the next is harmless).
//! The in-flight calls of drivers are not cancelled by their callers going away.
//!
//! **Waiting.** A queued caller waits for the call in flight and then for its own, each bounded by
//! the store (`store.timeout` on Redis); more only when more than [`MAX_CALL`] messages queue for
//! one scope. Its own gRPC deadline bounds the wait as ever.
//!
//! **Errors.** When a call fails, every caller whose messages it carried gets the error (a copy),
//! and handles it as without coalescing (fail open with `store.on_error = "allow"`, per request).
//!
//! Lanes are keyed by scope: the call's parameters (fallback tier, reserve) follow from the
//! scope, and a caller whose parameters differ from the lane's anyway is not queued there but
//! sends its own call.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::metrics;
use crate::policy::ScopeKey;
use crate::store::{Admission, AdmitOp, AdmitParams, Store, StoreError};

/// The most messages a call of queued groups carries: no more than one AdmitBatch may send, so
/// coalescing never makes a script call longer than a caller could. (A larger group would still
/// go out whole, alone.)
pub const MAX_CALL: usize = super::MAX_BATCH;

/// What a store call answers for one group.
type Answer = Result<Vec<Admission>, StoreError>;

/// The scopes with a call in flight.
type Lanes = Arc<Mutex<HashMap<ScopeKey, Lane>>>;

/// Coalesces concurrent admission calls of one scope; see the module documentation.
#[derive(Default)]
pub(super) struct Coalescer {
    lanes: Lanes,
}

/// A scope with a call in flight: the call's parameters and the groups waiting for the next one.
struct Lane {
    params: AdmitParams,
    queue: VecDeque<Waiter>,
}

/// One caller's messages, queued, and where its answer goes.
struct Waiter {
    ops: Vec<AdmitOp>,
    answer: oneshot::Sender<Answer>,
}

/// What a caller does, decided under the lock.
enum Role {
    /// The scope was idle: send at once.
    Lead,
    /// A call is in flight: wait for the answer of a later one.
    Follow(oneshot::Receiver<Answer>),
    /// A call with other parameters is in flight: send alone, outside the lane.
    Alone,
}

impl Coalescer {
    /// Decides `ops` of `scope` in order, atomically, as [`Store::admit`] does, sharing a store
    /// call with the concurrent callers of the scope.
    pub(super) async fn admit(
        &self,
        store: &Arc<dyn Store>,
        scope: &ScopeKey,
        params: &AdmitParams,
        ops: &[AdmitOp],
    ) -> Answer {
        let role = {
            let mut lanes = lock(&self.lanes);
            match lanes.get_mut(scope) {
                None => {
                    lanes.insert(scope.clone(), Lane { params: params.clone(), queue: VecDeque::new() });
                    Role::Lead
                }
                Some(lane) if lane.params == *params => {
                    let (tx, rx) = oneshot::channel();
                    lane.queue.push_back(Waiter { ops: ops.to_vec(), answer: tx });
                    Role::Follow(rx)
                }
                Some(_) => Role::Alone,
            }
        };
        match role {
            Role::Lead => {
                let _lead = Leading { lanes: &self.lanes, store, scope, params };
                call(&**store, scope, params, ops).await
                // `_lead` hands the lane off here, or where this future is dropped.
            }
            Role::Follow(rx) => rx
                .await
                .unwrap_or_else(|_| Err(StoreError::Internal("the call carrying this message was abandoned".into()))),
            Role::Alone => call(&**store, scope, params, ops).await,
        }
    }

    /// How many scopes have a call in flight.
    #[cfg(test)]
    fn busy(&self) -> usize {
        lock(&self.lanes).len()
    }

    /// How many groups wait for the next call of `scope`.
    #[cfg(test)]
    fn queued(&self, scope: &ScopeKey) -> usize {
        lock(&self.lanes).get(scope).map_or(0, |lane| lane.queue.len())
    }
}

/// A leader's call in flight; dropping it (the call returned, or the caller went away) hands the
/// lane off.
struct Leading<'a> {
    lanes: &'a Lanes,
    store: &'a Arc<dyn Store>,
    scope: &'a ScopeKey,
    params: &'a AdmitParams,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        hand_off(self.lanes, self.store, self.scope, self.params);
    }
}

/// A scope's driver task: sends the queued groups, one call at a time, until none are queued.
struct Driver {
    lanes: Lanes,
    store: Arc<dyn Store>,
    scope: ScopeKey,
    params: AdmitParams,
    /// Set once the lane is removed; until then, dropping the driver (a panic) hands off.
    done: bool,
}

impl Driver {
    async fn run(mut self, mut group: Vec<Waiter>) {
        loop {
            answer(&*self.store, &self.scope, &self.params, group).await;
            match take(&self.lanes, &self.scope) {
                Some(next) => group = next,
                None => {
                    self.done = true;
                    return;
                }
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.done {
            hand_off(&self.lanes, &self.store, &self.scope, &self.params);
        }
    }
}

/// After a scope's call: removes the lane when nothing is queued, or spawns a driver for the
/// queued groups.
fn hand_off(lanes: &Lanes, store: &Arc<dyn Store>, scope: &ScopeKey, params: &AdmitParams) {
    let Some(group) = take(lanes, scope) else { return };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            let (lanes, store, scope, params) = (lanes.clone(), store.clone(), scope.clone(), params.clone());
            runtime.spawn(Driver { lanes, store, scope, params, done: false }.run(group));
        }
        Err(_) => {
            // No runtime to send from: every queued caller gets an error as its channel closes.
            lock(lanes).remove(scope);
        }
    }
}

/// The next call's groups: the queued ones in arrival order, skipping those whose caller gave up,
/// up to [`MAX_CALL`] messages (at least one group). With none queued, removes the lane.
fn take(lanes: &Lanes, scope: &ScopeKey) -> Option<Vec<Waiter>> {
    let mut lanes = lock(lanes);
    let lane = lanes.get_mut(scope)?;
    let mut group = Vec::new();
    let mut messages = 0;
    while let Some(next) = lane.queue.front() {
        if next.answer.is_closed() {
            // Its caller gave up before it was sent: it is never sent.
            lane.queue.pop_front();
            continue;
        }
        if !group.is_empty() && messages + next.ops.len() > MAX_CALL {
            break;
        }
        messages += next.ops.len();
        group.extend(lane.queue.pop_front());
    }
    if group.is_empty() {
        lanes.remove(scope);
        return None;
    }
    Some(group)
}

/// Sends the groups as one call and gives each caller its part of the answer.
async fn answer(store: &dyn Store, scope: &ScopeKey, params: &AdmitParams, group: Vec<Waiter>) {
    let mut ops = Vec::with_capacity(group.iter().map(|w| w.ops.len()).sum());
    let mut callers = Vec::with_capacity(group.len());
    for Waiter { ops: mine, answer } in group {
        callers.push((mine.len(), answer));
        ops.extend(mine);
    }
    match call(store, scope, params, &ops).await {
        Ok(admissions) if admissions.len() == ops.len() => {
            let mut admissions = admissions.into_iter();
            for (n, caller) in callers {
                // A caller gone meanwhile is not told; its messages were sent, as without coalescing.
                let _ = caller.send(Ok(admissions.by_ref().take(n).collect()));
            }
        }
        Ok(admissions) => {
            let e = format!("the store answered {} admissions for {} messages", admissions.len(), ops.len());
            for (_, caller) in callers {
                let _ = caller.send(Err(StoreError::Internal(e.clone())));
            }
        }
        Err(e) => {
            for (_, caller) in callers {
                let _ = caller.send(Err(e.clone()));
            }
        }
    }
}

/// One store call, counted by its size.
async fn call(store: &dyn Store, scope: &ScopeKey, params: &AdmitParams, ops: &[AdmitOp]) -> Answer {
    metrics::admit_call(ops.len());
    store.admit(scope, params, ops).await
}

fn lock(lanes: &Lanes) -> MutexGuard<'_, HashMap<ScopeKey, Lane>> {
    lanes.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use tokio::sync::Semaphore;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::policy::{Category, Lease, Micros, Reason, Tier};
    use crate::store::memory::MemoryStore;
    use crate::store::{Change, Member, PortfolioState, ScopeReport, Windows};

    /// A memory store whose admission calls are recorded when sent and then wait for a permit.
    struct Gated {
        inner: MemoryStore,
        sent: Mutex<Vec<Vec<Member>>>,
        gate: Semaphore,
        fail: AtomicBool,
    }

    #[async_trait]
    impl Store for Gated {
        async fn admit(&self, scope: &ScopeKey, params: &AdmitParams, ops: &[AdmitOp]) -> Answer {
            self.sent.lock().unwrap().push(ops.iter().map(|op| op.member.clone()).collect());
            self.gate.acquire().await.unwrap().forget();
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            self.inner.admit(scope, params, ops).await
        }
        async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
            self.inner.release(lease).await
        }
        async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, StoreError> {
            self.inner.apply(portfolio, changes).await
        }
        async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<ScopeReport, StoreError> {
            self.inner.usage(scope, fallback).await
        }
        async fn portfolio(&self, portfolio: &str) -> Result<PortfolioState, StoreError> {
            self.inner.portfolio(portfolio).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn backend(&self) -> &'static str {
            "gated"
        }
        async fn shared_policy(&self, policy: &str, replace: bool) -> Result<String, StoreError> {
            self.inner.shared_policy(policy, replace).await
        }
    }

    struct Fixture {
        coalescer: Arc<Coalescer>,
        gated: Arc<Gated>,
        store: Arc<dyn Store>,
        scope: ScopeKey,
    }

    impl Fixture {
        /// A scope with a limit of 2 on a store that holds every call until [`Fixture::open`].
        fn new() -> Fixture {
            let gated = Arc::new(Gated {
                inner: MemoryStore::new(Windows::default()),
                sent: Mutex::new(Vec::new()),
                gate: Semaphore::new(0),
                fail: AtomicBool::new(false),
            });
            let scope = ScopeKey { portfolio: "acme".into(), sender: None };
            Fixture { coalescer: Arc::default(), store: gated.clone(), gated, scope }
        }

        /// Lets `calls` more store calls answer.
        fn open(&self, calls: usize) {
            self.gated.gate.add_permits(calls);
        }

        /// The members of each call sent so far.
        fn sent(&self) -> Vec<Vec<Member>> {
            self.gated.sent.lock().unwrap().clone()
        }

        /// Starts admitting `recipients` as one group, from a task of its own.
        fn spawn(&self, recipients: &[&str]) -> JoinHandle<Answer> {
            let (coalescer, store, scope) = (self.coalescer.clone(), self.store.clone(), self.scope.clone());
            let ops: Vec<AdmitOp> = recipients.iter().map(|r| op(r)).collect();
            tokio::spawn(async move { coalescer.admit(&store, &scope, &params(), &ops).await })
        }

        /// Starts a leader and waits until its call is sent.
        async fn lead(&self, recipient: &str) -> JoinHandle<Answer> {
            let task = self.spawn(&[recipient]);
            until(|| self.sent().len() == 1).await;
            task
        }

        /// Starts a caller and waits until it is queued (so callers queue in the order started).
        async fn follow(&self, recipients: &[&str]) -> JoinHandle<Answer> {
            let queued = self.coalescer.queued(&self.scope);
            let task = self.spawn(recipients);
            until(|| self.coalescer.queued(&self.scope) == queued + 1).await;
            task
        }
    }

    fn params() -> AdmitParams {
        AdmitParams::new(Tier::limited("T2", 2), 0)
    }

    fn op(recipient: &str) -> AdmitOp {
        AdmitOp { member: recipient.as_bytes().to_vec(), category: Category::Utility, ..AdmitOp::default() }
    }

    fn members(recipients: &[&str]) -> Vec<Member> {
        recipients.iter().map(|r| r.as_bytes().to_vec()).collect()
    }

    /// Lets the other tasks run until `done` holds (for at most a few seconds).
    async fn until(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting");
            tokio::task::yield_now().await;
        }
    }

    /// (reason, counted) of each admission of a caller's answer.
    async fn outcome(task: JoinHandle<Answer>) -> Vec<(Reason, u64)> {
        task.await.unwrap().unwrap().iter().map(|a| (a.reason, a.usage.counted)).collect()
    }

    #[tokio::test]
    async fn an_idle_scope_sends_at_once_and_leaves_nothing_behind() {
        let f = Fixture::new();
        f.open(1);
        let answer = f.coalescer.admit(&f.store, &f.scope, &params(), &[op("a")]).await.unwrap();
        assert_eq!(answer[0].reason, Reason::NewRecipient);
        assert_eq!(f.sent(), vec![members(&["a"])]);
        assert_eq!(f.coalescer.busy(), 0);
    }

    #[tokio::test]
    async fn callers_arriving_during_a_call_go_out_together_in_arrival_order_each_answered_alone() {
        let f = Fixture::new();
        let a = f.lead("a").await;
        let b = f.follow(&["b"]).await;
        let c = f.follow(&["c", "b"]).await;
        let d = f.follow(&["a"]).await;
        assert_eq!(f.sent().len(), 1, "nothing more is sent while a call is in flight");
        f.open(1);
        assert_eq!(outcome(a).await, [(Reason::NewRecipient, 1)]);
        until(|| f.sent().len() == 2).await;
        assert_eq!(f.sent()[1], members(&["b", "c", "b", "a"]), "one call, in arrival order");
        f.open(1);
        // Each caller gets the answers of its own messages, with the usage right after each.
        assert_eq!(outcome(b).await, [(Reason::NewRecipient, 2)]);
        assert_eq!(outcome(c).await, [(Reason::LimitReached, 2), (Reason::AlreadyCounted, 2)]);
        assert_eq!(outcome(d).await, [(Reason::AlreadyCounted, 2)]);
        until(|| f.coalescer.busy() == 0).await;
        assert_eq!(f.sent().len(), 2);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_while_queued_is_never_sent() {
        let f = Fixture::new();
        let a = f.lead("a").await;
        let gone = f.follow(&["gone"]).await;
        let b = f.follow(&["b"]).await;
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        f.open(2);
        assert_eq!(outcome(a).await, [(Reason::NewRecipient, 1)]);
        assert_eq!(outcome(b).await, [(Reason::NewRecipient, 2)]);
        assert_eq!(f.sent(), vec![members(&["a"]), members(&["b"])]);
        until(|| f.coalescer.busy() == 0).await;
    }

    #[tokio::test]
    async fn a_leader_dropped_mid_call_hands_the_queue_off() {
        let f = Fixture::new();
        let a = f.lead("a").await;
        let b = f.follow(&["b"]).await;
        a.abort();
        assert!(a.await.unwrap_err().is_cancelled());
        until(|| f.sent().len() == 2).await;
        f.open(1);
        assert_eq!(outcome(b).await, [(Reason::NewRecipient, 1)], "the abandoned call never answered");
        until(|| f.coalescer.busy() == 0).await;
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_caller_it_carried() {
        let f = Fixture::new();
        let a = f.lead("a").await;
        let b = f.follow(&["b"]).await;
        let c = f.follow(&["c"]).await;
        f.gated.fail.store(true, Ordering::SeqCst);
        f.open(2);
        for task in [a, b, c] {
            assert!(matches!(task.await.unwrap(), Err(StoreError::Unavailable(_))));
        }
        assert_eq!(f.sent().len(), 2);
    }

    #[tokio::test]
    async fn a_call_carries_at_most_max_call_messages_and_a_larger_group_goes_whole() {
        let f = Fixture::new();
        let names: Vec<String> = (0..MAX_CALL + 1).map(|i| format!("r{i}")).collect();
        let big: Vec<&str> = names.iter().map(String::as_str).collect();
        let a = f.lead("a").await;
        let mut singles = Vec::new();
        for name in &big[..MAX_CALL - 1] {
            singles.push(f.follow(&[name]).await);
        }
        let whole = f.follow(&big).await;
        let last = f.follow(&["z"]).await;
        f.open(4);
        for task in singles.into_iter().chain([a, whole, last]) {
            task.await.unwrap().unwrap();
        }
        let sizes: Vec<usize> = f.sent().iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, MAX_CALL - 1, MAX_CALL + 1, 1]);
    }
}
