//! The embedded store: everything in this process, behind one mutex. For a laptop, a test, or a
//! single sender process; sidecars that must agree share a Redis store instead.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    day_of, event_time, Admission, AdmitOp, AdmitParams, Change, Member, PortfolioState, ScopeReport, Store,
    StoreError, TemplateKey, TemplateState, UsageSnapshot, Windows, DAYS_KEPT,
};
pub use super::{Clock, SystemClock};
use crate::policy::{
    self, Delivery, Effect, Lease, Limits, Micros, Remembered, ScopeKey, SenderStatus, Snapshot, Tier,
};

#[derive(Default)]
struct ScopeState {
    /// Counted recipients and their last-contact score.
    contacts: HashMap<Member, Micros>,
    /// The same contacts ordered by score, oldest first.
    by_score: BTreeSet<(Micros, Member)>,
    /// The last score handed out, so scores stay unique.
    last_score: Micros,
    tier: Option<Tier>,
    tier_since: Option<Micros>,
    /// When the event behind the tier happened; older tier events are skipped.
    tier_at: Micros,
    eligible_since: Option<Micros>,
    flagged_since: Option<Micros>,
    /// Counted recipients confirmed delivered, by day.
    days: BTreeMap<u64, HashSet<Member>>,
    /// When each recipient was last confirmed delivered (kept for one window).
    delivered: HashMap<Member, Micros>,
    /// What each idempotency key (hashed) remembers, until its contact leaves the window.
    remembered: HashMap<Member, Remembered>,
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
        self.delivered.retain(|_, at| *at > start);
        self.remembered.retain(|_, r| r.score > start);
        let oldest_day = day_of(now).saturating_sub(DAYS_KEPT - 1);
        self.days.retain(|day, _| *day >= oldest_day);
    }

    fn forget(&mut self, member: &Member) {
        if let Some(score) = self.contacts.remove(member) {
            self.by_score.remove(&(score, member.clone()));
        }
    }

    fn usage(&self, fallback: &Tier, windows: &Windows) -> UsageSnapshot {
        UsageSnapshot {
            tier: self.tier.clone().unwrap_or_else(|| fallback.clone()),
            counted: self.contacts.len() as u64,
            next_slot_at: self.by_score.first().map(|(s, _)| s + policy::micros(windows.window)),
        }
    }

    fn unique_since(&self, first_day: u64) -> u64 {
        let mut all: HashSet<&Member> = HashSet::new();
        for (_, members) in self.days.range(first_day..) {
            all.extend(members);
        }
        all.len() as u64
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
struct Portfolio {
    /// Service windows: (sender, recipient) hash → closing time.
    service: HashMap<Member, Micros>,
    opted_out: HashSet<Member>,
    state: PortfolioState,
    /// When the last status event of each number (`s:<id>`) happened (templates keep theirs).
    event_at: HashMap<String, Micros>,
}

impl Portfolio {
    /// Whether an event at `at` is not older than the last one applied to `item`; if so, it
    /// becomes the last.
    fn newer(&mut self, item: String, at: Micros) -> bool {
        let last = self.event_at.entry(item).or_insert(0);
        if at < *last {
            return false;
        }
        *last = at;
        true
    }
}

#[derive(Default)]
struct State {
    scopes: HashMap<ScopeKey, ScopeState>,
    portfolios: HashMap<String, Portfolio>,
    /// The recorded [shared policy](crate::shared_policy).
    shared_policy: Option<String>,
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
        // Every write happens after its decision, so a panic cannot leave a half-applied
        // decision behind: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn sender_banned(p: Option<&Portfolio>, sender: Option<&String>) -> bool {
    let status = sender.and_then(|s| p?.state.senders.get(s)?.status);
    status == Some(SenderStatus::Banned)
}

/// Whether the message's template is blocked in its language, or in any language when it names
/// none ([`policy::template_language_sendable`], [`policy::template_name_sendable`]).
fn template_blocked(p: Option<&Portfolio>, template: Option<&String>, language: Option<&String>) -> bool {
    let (Some(name), Some(p)) = (template, p) else { return false };
    let templates = &p.state.templates;
    let event = |language: &str| templates.get(&TemplateKey::new(name, language)).and_then(TemplateState::event);
    let every_language = event("");
    !match language {
        Some(language) => policy::template_language_sendable(event(language), every_language),
        None => {
            let languages = templates
                .range(TemplateKey::new(name, "")..)
                .take_while(|(k, _)| k.name == *name)
                .filter(|(k, _)| !k.language.is_empty())
                .filter_map(|(_, t)| t.event());
            policy::template_name_sendable(every_language, languages)
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn admit(
        &self,
        scope: &ScopeKey,
        params: &AdmitParams,
        ops: &[AdmitOp],
    ) -> Result<Vec<Admission>, StoreError> {
        let now = self.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        let portfolio = state.portfolios.get(&scope.portfolio);
        let s = state.scopes.entry(scope.clone()).or_default();
        s.expire(now, &self.windows);
        let limit = s.tier.as_ref().unwrap_or(&params.fallback).limit;
        let limits = Limits::new(limit, params.reserve_bp);
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let remembered = op.idempotency_key.as_ref().and_then(|key| s.remembered.get(key));
            let window = self.windows.window;
            if let Some(r) = remembered.filter(|r| r.replays(now, window, s.contacts.contains_key(&r.member))) {
                out.push(Admission {
                    reason: r.reason,
                    lease_score: r.lease_score(),
                    retry_after: None,
                    usage: s.usage(&params.fallback, &self.windows),
                    now,
                    replay_of: Some(r.member.clone()),
                });
                continue;
            }
            let service_window_open =
                op.service_member.as_ref().and_then(|m| portfolio?.service.get(m)).is_some_and(|closes| *closes > now);
            let snapshot = Snapshot {
                sender_blocked: op.sender_blocked || sender_banned(portfolio, op.sender.as_ref()),
                template_blocked: template_blocked(portfolio, op.template.as_ref(), op.template_language.as_ref()),
                opted_out: portfolio.is_some_and(|p| p.opted_out.contains(&op.member)),
                service_window_open,
                already_counted: s.contacts.contains_key(&op.member),
                counted: s.contacts.len() as u64,
            };
            let nth_oldest = |rank| s.by_score.iter().nth(usize::try_from(rank).ok()?).map(|(score, _)| *score);
            let outcome = policy::decide(&snapshot, op.category, limits, now, self.windows.window, nth_oldest);
            let written = (outcome.effect != Effect::Nothing).then(|| s.touch(&op.member, now));
            if let Some(key) = &op.idempotency_key {
                match Remembered::of(outcome.reason, &op.member, written) {
                    Some(r) => s.remembered.insert(key.clone(), r),
                    None => s.remembered.remove(key),
                };
            }
            out.push(Admission {
                reason: outcome.reason,
                lease_score: written.filter(|_| outcome.effect == Effect::Count),
                retry_after: outcome.retry_after,
                usage: s.usage(&params.fallback, &self.windows),
                now,
                replay_of: None,
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
        s.forget(&lease.member);
        Ok(true)
    }

    async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, StoreError> {
        let now = self.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        for change in changes {
            let p = state.portfolios.entry(portfolio.to_owned()).or_default();
            match change {
                Change::Tier { scope, tier, at } => {
                    let s = state.scopes.entry(scope.clone()).or_default();
                    let at = at.unwrap_or(now);
                    if at < s.tier_at {
                        continue;
                    }
                    s.tier_at = at;
                    if s.tier.as_ref().map(|t| &t.name) != Some(&tier.name) {
                        s.tier_since = Some(now);
                    }
                    s.tier = Some(tier.clone());
                }
                Change::Eligible { scope, since } => {
                    state.scopes.entry(scope.clone()).or_default().eligible_since = *since
                }
                Change::Flagged { scope, since } => {
                    state.scopes.entry(scope.clone()).or_default().flagged_since = *since
                }
                Change::Quality(q) => p.state.quality = *q,
                Change::SenderStatus { sender, status, at } => {
                    if !p.newer(format!("s:{sender}"), at.unwrap_or(now)) {
                        continue;
                    }
                    let s = p.state.senders.entry(sender.clone()).or_default();
                    if s.status != Some(*status) {
                        s.since = Some(now);
                    }
                    s.status = Some(*status);
                }
                Change::SenderQuality { sender, quality } => {
                    p.state.senders.entry(sender.clone()).or_default().quality = *quality;
                }
                Change::TemplateStatus { name, language, status, at } => {
                    let t = p.state.templates.entry(TemplateKey::new(name, language)).or_default();
                    let at = at.unwrap_or(now);
                    if at < t.at.unwrap_or(0) {
                        continue;
                    }
                    t.at = Some(at);
                    t.status = Some(status.clone());
                }
                Change::TemplateQuality { name, language, quality } => {
                    p.state.templates.entry(TemplateKey::new(name, language)).or_default().quality = *quality;
                }
                Change::OptOut { member, opted_out } => {
                    if *opted_out {
                        p.opted_out.insert(member.clone());
                    } else {
                        p.opted_out.remove(member);
                    }
                }
                Change::Alert { key, body } => {
                    p.state.alerts.insert(key.clone(), body.clone());
                }
                Change::Alias { display, id } => {
                    p.state.aliases.insert(display.clone(), id.clone());
                }
                Change::Inbound { service_member, at } => {
                    let closes = event_time(*at, now).saturating_add(policy::micros(self.windows.service_window));
                    let entry = p.service.entry(service_member.clone()).or_insert(closes);
                    *entry = (*entry).max(closes);
                    if p.service.len().is_power_of_two() {
                        p.service.retain(|_, c| *c > now);
                    }
                }
                Change::Throughput { sender, mps } => {
                    p.state.senders.entry(sender.clone()).or_default().throughput_mps = Some(*mps);
                }
                Change::Delivery { scope, member, status, at } => {
                    let s = state.scopes.entry(scope.clone()).or_default();
                    s.expire(now, &self.windows);
                    let at = event_time(*at, now);
                    match status {
                        Delivery::Delivered => {
                            let last = s.delivered.entry(member.clone()).or_insert(at);
                            *last = (*last).max(at);
                            if s.contacts.contains_key(member) {
                                s.days.entry(day_of(at)).or_default().insert(member.clone());
                            }
                        }
                        Delivery::Failed => {
                            let contact = s.contacts.get(member).copied();
                            let delivered = s.delivered.get(member).copied();
                            if policy::failure_gives_back(contact, delivered, at, now, self.windows.window) {
                                s.forget(member);
                            }
                        }
                    }
                }
            }
        }
        Ok(now)
    }

    async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<ScopeReport, StoreError> {
        let now = self.clock.now();
        let mut state = self.lock();
        let s = state.scopes.entry(scope.clone()).or_default();
        s.expire(now, &self.windows);
        let today = day_of(now);
        Ok(ScopeReport {
            usage: s.usage(fallback, &self.windows),
            unique_7d: s.unique_since(today.saturating_sub(6)),
            unique_30d: s.unique_since(today.saturating_sub(DAYS_KEPT - 1)),
            tier_since: s.tier_since,
            eligible_since: s.eligible_since,
            flagged_since: s.flagged_since,
            now,
        })
    }

    async fn portfolio(&self, portfolio: &str) -> Result<PortfolioState, StoreError> {
        let state = self.lock();
        let Some(p) = state.portfolios.get(portfolio) else { return Ok(PortfolioState::default()) };
        Ok(PortfolioState { opted_out: p.opted_out.len() as u64, ..p.state.clone() })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn shared_policy(&self, policy: &str, replace: bool) -> Result<String, StoreError> {
        let mut state = self.lock();
        if replace || state.shared_policy.is_none() {
            state.shared_policy = Some(policy.to_owned());
        }
        Ok(state.shared_policy.clone().unwrap_or_default())
    }
}
