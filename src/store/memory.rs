//! The embedded store: everything in this process, behind one mutex. For a laptop, a test, or a
//! single sender process; sidecars that must agree share a Redis store instead.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::{Admission, AdmitOp, Member, Store, StoreError, UsageSnapshot, Windows};
use crate::policy::{self, Effect, Lease, Limit, Micros, ScopeKey, Snapshot, Tier};

/// A source of "now" for the memory store; tests inject a manual one.
pub trait Clock: Send + Sync + 'static {
    /// Microseconds since the Unix epoch.
    fn now(&self) -> Micros;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, policy::micros)
    }
}

const MICROS_PER_DAY: Micros = 86_400_000_000;

#[derive(Default)]
struct ScopeState {
    /// Counted recipients and their last-contact score.
    contacts: HashMap<Member, Micros>,
    /// The same contacts ordered by score, oldest first.
    by_score: BTreeSet<(Micros, Member)>,
    /// The last score handed out, so scores stay unique.
    last_score: Micros,
    tier: Option<Tier>,
    /// Unlimited tiers count unique recipients per UTC day instead of keeping a window.
    day: Micros,
    day_members: HashSet<Member>,
}

impl ScopeState {
    fn expire(&mut self, now: Micros, windows: &Windows) {
        let start = policy::window_start(now, windows.window);
        while let Some((score, _)) = self.by_score.first() {
            if *score > start {
                break;
            }
            let (_, member) = self.by_score.pop_first().expect("first exists");
            self.contacts.remove(&member);
        }
        let today = now / MICROS_PER_DAY;
        if self.day != today {
            self.day = today;
            self.day_members.clear();
        }
    }

    fn usage(&self, fallback: &Tier, windows: &Windows) -> UsageSnapshot {
        let tier = self.tier.clone().unwrap_or_else(|| fallback.clone());
        match tier.limit {
            Limit::Unlimited => UsageSnapshot { tier, counted: self.day_members.len() as u64, next_slot_at: None },
            Limit::Limited(_) => UsageSnapshot {
                tier,
                counted: self.contacts.len() as u64,
                next_slot_at: self.by_score.first().map(|(s, _)| s + policy::micros(windows.window)),
            },
        }
    }

    fn touch(&mut self, member: &Member, now: Micros) -> Micros {
        let score = policy::next_score(now, self.last_score);
        self.last_score = score;
        if let Some(old) = self.contacts.insert(member.clone(), score) {
            self.by_score.remove(&(old, member.clone()));
        }
        self.by_score.insert((score, member.clone()));
        score
    }
}

#[derive(Default)]
struct State {
    scopes: HashMap<ScopeKey, ScopeState>,
    /// Service windows by portfolio: (sender, recipient) hash → closing time.
    service: HashMap<String, HashMap<Member, Micros>>,
}

/// The embedded in-memory store.
pub struct MemoryStore {
    state: Mutex<State>,
    windows: Windows,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    /// A store on the system clock.
    pub fn new(windows: Windows) -> MemoryStore {
        MemoryStore::with_clock(windows, Arc::new(SystemClock))
    }

    /// A store on the given clock.
    pub fn with_clock(windows: Windows, clock: Arc<dyn Clock>) -> MemoryStore {
        MemoryStore { state: Mutex::new(State::default()), windows, clock }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied decision (every write
        // happens after the decision), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn admit(&self, scope: &ScopeKey, fallback: &Tier, ops: &[AdmitOp]) -> Result<Vec<Admission>, StoreError> {
        let now = self.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        let service = state.service.get(&scope.portfolio);
        let s = state.scopes.entry(scope.clone()).or_default();
        s.expire(now, &self.windows);
        let limit = s.tier.as_ref().unwrap_or(fallback).limit;
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let service_window_open = op
                .service_member
                .as_ref()
                .and_then(|m| service.and_then(|w| w.get(m)))
                .is_some_and(|closes| *closes > now);
            let unlimited = limit == Limit::Unlimited;
            let snapshot = if unlimited {
                Snapshot {
                    service_window_open,
                    already_counted: s.day_members.contains(&op.member),
                    counted: s.day_members.len() as u64,
                    oldest: None,
                }
            } else {
                Snapshot {
                    service_window_open,
                    already_counted: s.contacts.contains_key(&op.member),
                    counted: s.contacts.len() as u64,
                    oldest: s.by_score.first().map(|(score, _)| *score),
                }
            };
            let outcome = policy::decide(&snapshot, limit, now, self.windows.window);
            let lease_score = match (outcome.effect, unlimited) {
                (Effect::Nothing, _) | (Effect::Touch, true) => None,
                (Effect::Count, true) => {
                    s.day_members.insert(op.member.clone());
                    None
                }
                (Effect::Touch, false) => {
                    s.touch(&op.member, now);
                    None
                }
                (Effect::Count, false) => Some(s.touch(&op.member, now)),
            };
            out.push(Admission {
                reason: outcome.reason,
                lease_score,
                retry_after: outcome.retry_after,
                usage: s.usage(fallback, &self.windows),
            });
        }
        Ok(out)
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut state = self.lock();
        let Some(s) = state.scopes.get_mut(&lease.scope) else { return Ok(false) };
        if s.contacts.get(&lease.member) != Some(&lease.score) {
            return Ok(false);
        }
        s.contacts.remove(&lease.member);
        s.by_score.remove(&(lease.score, lease.member.clone()));
        Ok(true)
    }

    async fn record_inbound(&self, portfolio: &str, service_member: &[u8]) -> Result<Micros, StoreError> {
        let now = self.clock.now();
        let closes = now.saturating_add(policy::micros(self.windows.service_window));
        let mut state = self.lock();
        let windows = state.service.entry(portfolio.to_owned()).or_default();
        windows.insert(service_member.to_vec(), closes);
        if windows.len().is_power_of_two() {
            windows.retain(|_, c| *c > now);
        }
        Ok(closes)
    }

    async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<UsageSnapshot, StoreError> {
        let now = self.clock.now();
        let mut state = self.lock();
        let s = state.scopes.entry(scope.clone()).or_default();
        s.expire(now, &self.windows);
        Ok(s.usage(fallback, &self.windows))
    }

    async fn set_tier(&self, scope: &ScopeKey, tier: &Tier) -> Result<UsageSnapshot, StoreError> {
        let now = self.clock.now();
        let mut state = self.lock();
        let s = state.scopes.entry(scope.clone()).or_default();
        s.expire(now, &self.windows);
        s.tier = Some(tier.clone());
        Ok(s.usage(tier, &self.windows))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}
