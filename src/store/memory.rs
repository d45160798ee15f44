//! The embedded store: everything in this process, behind one mutex. For a laptop, a test, or a
//! single sender process; sidecars that must agree share a Redis store instead.
//!
//! Reads create nothing, and what nobody writes to is forgotten when Redis would expire it: a
//! scope's contacts a window and a second after its last admit (the window key's TTL), and
//! persisted state (tiers, statuses, templates, opt-outs) once its portfolio or scope has seen no
//! write for `store.state_ttl`; a scope or portfolio with nothing left goes (see
//! [`MemoryStore::held`]). Until then contacts leave the window lazily, when their scope is next
//! read or written, as on Redis.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    day_of, event_time, Admission, AdmitOp, AdmitParams, Change, Member, PortfolioState, Rates, ScopeReport, Store,
    StoreError, TemplateKey, TemplateState, UsageSnapshot, Windows, DAYS_KEPT,
};
pub use super::{Clock, SystemClock};
use crate::policy::rate::{self, PairState, RateSnapshot, ThroughputRule};
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
    /// At most the oldest time in `delivered` and `remembered`, so an expiry walks them only
    /// when something may have left the window.
    kept_from: Micros,
    /// The last write (an admit, or a change naming the scope): persisted fields outlive it by
    /// the state TTL.
    active: Micros,
    /// The last admit: the contacts outlive it by the window and [`WINDOW_KEPT_EXTRA`].
    admitted: Micros,
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
        self.expire_kept(now, windows);
    }

    /// Drops what no answer reads any more: confirmations older than the window, and daily counts
    /// older than the longest count.
    fn expire_kept(&mut self, now: Micros, windows: &Windows) {
        let start = policy::window_start(now, windows.window);
        if self.kept_from <= start {
            self.delivered.retain(|_, at| *at > start);
            self.remembered.retain(|_, r| r.score > start);
            let delivered = self.delivered.values().copied();
            self.kept_from = delivered.chain(self.remembered.values().map(|r| r.score)).min().unwrap_or(Micros::MAX);
        }
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

    /// Whether anything outlives the window: a tier or simulation state.
    fn persists(&self) -> bool {
        self.tier.is_some()
            || self.tier_since.is_some()
            || self.eligible_since.is_some()
            || self.flagged_since.is_some()
    }

    /// Whether the contacts are gone as Redis's window key is: a window and
    /// [`WINDOW_KEPT_EXTRA`] after the last admit, every contact has left the window.
    fn window_gone(&self, now: Micros, windows: &Windows) -> bool {
        let kept = policy::micros(windows.window + WINDOW_KEPT_EXTRA);
        now.saturating_sub(self.admitted) > kept
    }

    /// Drops the contacts once [`Self::window_gone`], what no answer reads any more (idempotency
    /// keys only once their contact has left the window: a key replays whenever its recipient is
    /// counted again meanwhile, as Redis keeps it), and, after
    /// `state_ttl` without a write, the persisted fields; returns whether nothing is left, so the
    /// scope can be forgotten. A forgotten scope starts its scores again from the clock, so it is
    /// forgotten only once the clock has passed the last score handed out (no later lease can then
    /// name an earlier score).
    fn sweep(&mut self, now: Micros, windows: &Windows, state_ttl: Micros) -> bool {
        if self.window_gone(now, windows) {
            self.contacts.clear();
            self.by_score.clear();
        }
        self.expire_kept(now, windows);
        if now.saturating_sub(self.active) > state_ttl {
            (self.tier, self.tier_since, self.tier_at) = (None, None, 0);
            (self.eligible_since, self.flagged_since) = (None, None);
        }
        self.contacts.is_empty()
            && self.delivered.is_empty()
            && self.remembered.is_empty()
            && self.days.is_empty()
            && !self.persists()
            && now > self.last_score
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
    /// Each number's throughput schedule (`tat`), kept with the persisted state as on Redis: a
    /// late inbound report (`Change::Traffic`) dated before a past `tat` still counts after it.
    numbers: HashMap<String, Micros>,
    /// Each (number, user) pair's schedule, by its service-window hash, kept while ahead of now.
    pairs: HashMap<Member, PairState>,
    /// Recipients Meta's per-user marketing limit capped → until when.
    capped: HashMap<Member, Micros>,
    /// The last write (an admit in any of its scopes, or a change): persisted state outlives it
    /// by the state TTL.
    active: Micros,
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

impl Portfolio {
    /// Closes service windows past and, after `state_ttl` without a write, drops persisted state;
    /// returns whether nothing is left.
    fn sweep(&mut self, now: Micros, state_ttl: Micros) -> bool {
        self.service.retain(|_, closes| *closes > now);
        self.pairs.retain(|_, s| s.tat > now);
        self.capped.retain(|_, until| *until > now);
        if now.saturating_sub(self.active) > state_ttl {
            self.opted_out.clear();
            self.numbers.clear();
            self.state = PortfolioState::default();
            self.event_at.clear();
        }
        self.service.is_empty()
            && self.numbers.is_empty()
            && self.pairs.is_empty()
            && self.capped.is_empty()
            && self.opted_out.is_empty()
            && self.event_at.is_empty()
            && self.state == PortfolioState::default()
    }
}

#[derive(Default)]
struct State {
    scopes: HashMap<ScopeKey, ScopeState>,
    portfolios: HashMap<String, Portfolio>,
    /// The recorded [shared policy](crate::shared_policy).
    shared_policy: Option<String>,
    /// When the next write sweeps every scope and portfolio.
    next_sweep: Micros,
}

/// How long a scope's contacts outlive the window after its last admit: Redis's window key is
/// kept that much longer (`PEXPIRE` of the window and a second, by `admit.lua`).
const WINDOW_KEPT_EXTRA: Duration = Duration::from_secs(1);

/// How often, at most, writes sweep what has expired.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The state TTL of [`MemoryStore::new`]: `store.state_ttl`'s default.
const DEFAULT_STATE_TTL: Duration = Duration::from_secs(400 * 24 * 3600);

/// How many scopes and portfolios a memory store holds state for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub scopes: usize,
    pub portfolios: usize,
}

/// The embedded in-memory store.
pub struct MemoryStore {
    state: Mutex<State>,
    windows: Windows,
    clock: Arc<dyn Clock>,
    /// How long persisted state outlives the last write, in µs (never shorter than the window,
    /// as on Redis).
    state_ttl: Micros,
}

impl MemoryStore {
    /// A store on the system clock.
    pub fn new(windows: Windows) -> MemoryStore {
        MemoryStore::with_clock(windows, Arc::new(SystemClock))
    }

    /// A store on the given clock.
    pub fn with_clock(windows: Windows, clock: Arc<dyn Clock>) -> MemoryStore {
        let state_ttl = policy::micros(DEFAULT_STATE_TTL.max(windows.window));
        MemoryStore { state: Mutex::new(State::default()), windows, clock, state_ttl }
    }

    /// The same store keeping persisted state for `ttl` (`store.state_ttl`) after the last write.
    pub fn with_state_ttl(mut self, ttl: Duration) -> MemoryStore {
        self.state_ttl = policy::micros(ttl.max(self.windows.window));
        self
    }

    /// How many scopes and portfolios the store holds state for now (after a sweep).
    pub fn held(&self) -> Held {
        let mut state = self.lock();
        self.sweep(&mut state, self.clock.now());
        Held { scopes: state.scopes.len(), portfolios: state.portfolios.len() }
    }

    /// Forgets every scope and portfolio with nothing left in force (see [`ScopeState::sweep`]).
    fn sweep(&self, state: &mut State, now: Micros) {
        state.scopes.retain(|_, s| !s.sweep(now, &self.windows, self.state_ttl));
        state.portfolios.retain(|_, p| !p.sweep(now, self.state_ttl));
        state.next_sweep = now.saturating_add(policy::micros(SWEEP_EVERY));
    }

    /// Sweeps when the last sweep is [`SWEEP_EVERY`] old: a write's amortised share of it.
    fn sweep_due(&self, state: &mut State, now: Micros) {
        if now >= state.next_sweep {
            self.sweep(state, now);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every write happens after its decision, so a panic cannot leave a half-applied
        // decision behind: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The scope a change names, created if need be and marked written at `now`.
fn written<'s>(scopes: &'s mut HashMap<ScopeKey, ScopeState>, scope: &ScopeKey, now: Micros) -> &'s mut ScopeState {
    let s = scopes.entry(scope.clone()).or_default();
    s.active = now;
    s
}

/// The portfolio rate state is written to, created if need be and marked written at `now`.
fn written_portfolio<'p>(
    portfolios: &'p mut HashMap<String, Portfolio>,
    portfolio: &str,
    now: Micros,
) -> &'p mut Portfolio {
    let p = portfolios.entry(portfolio.to_owned()).or_default();
    p.active = now;
    p
}

/// The rates of one message: its number's throughput schedule and level, and its pair's.
fn rate_snapshot(p: Option<&Portfolio>, op: &AdmitOp, rates: &Rates, now: Micros) -> RateSnapshot {
    let Some(sender) = &op.sender else { return RateSnapshot::default() };
    let number = p.and_then(|p| p.state.senders.get(sender));
    RateSnapshot {
        throughput: rates.throughput.map(|rule| {
            let mps = rule.mps(op.throughput_mps, number.and_then(|n| n.throughput_mps));
            let backing_off = number.and_then(|n| n.throughput_backoff_until).is_some_and(|until| until > now);
            let tat = p.and_then(|p| p.numbers.get(sender)).copied().unwrap_or(0);
            (tat, ThroughputRule::interval(mps, backing_off), rule.burst)
        }),
        pair: rates
            .pair
            .zip(op.service_member.as_ref())
            .map(|(rule, pair)| (p.and_then(|p| p.pairs.get(pair)).copied().unwrap_or_default(), rule)),
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
        self.sweep_due(state, now);
        if let Some(p) = state.portfolios.get_mut(&scope.portfolio) {
            p.active = now;
        }
        let mode = state.portfolios.get(&scope.portfolio).and_then(|p| p.state.mode).unwrap_or(params.mode);
        let s = state.scopes.entry(scope.clone()).or_default();
        (s.active, s.admitted) = (now, now);
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
                    wait: Duration::ZERO,
                    shadow: None,
                });
                continue;
            }
            let portfolio = state.portfolios.get(&scope.portfolio);
            let service_window_open =
                op.service_member.as_ref().and_then(|m| portfolio?.service.get(m)).is_some_and(|closes| *closes > now);
            let snapshot = Snapshot {
                sender_blocked: op.sender_blocked || sender_banned(portfolio, op.sender.as_ref()),
                template_blocked: template_blocked(portfolio, op.template.as_ref(), op.template_language.as_ref()),
                opted_out: portfolio.is_some_and(|p| p.opted_out.contains(&op.member)),
                marketing_capped: portfolio.and_then(|p| p.capped.get(&op.member)).is_some_and(|until| *until > now),
                service_window_open,
                already_counted: s.contacts.contains_key(&op.member),
                counted: s.contacts.len() as u64,
            };
            let nth_oldest = |rank| s.by_score.iter().nth(usize::try_from(rank).ok()?).map(|(score, _)| *score);
            let outcome = policy::decide(&snapshot, op.category, limits, now, self.windows.window, nth_oldest);
            let rates = rate_snapshot(portfolio, op, &params.rates, now);
            let g =
                rate::govern(mode, &outcome, policy::admitted_as(&snapshot), &rates, now, policy::micros(op.max_wait));
            if let (Some(sender), Some(tat)) = (&op.sender, g.schedule.throughput_tat) {
                written_portfolio(&mut state.portfolios, &scope.portfolio, now).numbers.insert(sender.clone(), tat);
            }
            if let (Some(pair), Some(next)) = (&op.service_member, g.schedule.pair) {
                written_portfolio(&mut state.portfolios, &scope.portfolio, now).pairs.insert(pair.clone(), next);
            }
            let written = (g.effect != Effect::Nothing).then(|| s.touch(&op.member, now));
            if let Some(key) = &op.idempotency_key {
                match Remembered::of(g.reason, &op.member, written) {
                    Some(r) => {
                        s.kept_from = s.kept_from.min(r.score);
                        s.remembered.insert(key.clone(), r)
                    }
                    None => s.remembered.remove(key),
                };
            }
            out.push(Admission {
                reason: g.reason,
                lease_score: written.filter(|_| g.effect == Effect::Count),
                retry_after: g.retry_after,
                usage: s.usage(&params.fallback, &self.windows),
                now,
                replay_of: None,
                wait: Duration::from_micros(g.wait),
                shadow: g.shadow,
            });
        }
        Ok(out)
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let mut state = self.lock();
        let Some(s) = state.scopes.get_mut(&lease.scope) else { return Ok(false) };
        if s.window_gone(now, &self.windows) || s.contacts.get(&lease.member) != Some(&lease.score) {
            return Ok(false);
        }
        s.forget(&lease.member);
        Ok(true)
    }

    async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, StoreError> {
        let now = self.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        self.sweep_due(state, now);
        // The scopes a delivery status already expired in this call: every change of one call
        // shares `now`, so a second expiry finds nothing to drop, only walks the scope again.
        let mut expired: Vec<&ScopeKey> = Vec::new();
        for change in changes {
            let p = state.portfolios.entry(portfolio.to_owned()).or_default();
            p.active = now;
            match change {
                Change::Tier { scope, tier, at } => {
                    let s = written(&mut state.scopes, scope, now);
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
                Change::Eligible { scope, since } => written(&mut state.scopes, scope, now).eligible_since = *since,
                Change::Flagged { scope, since } => written(&mut state.scopes, scope, now).flagged_since = *since,
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
                Change::Traffic { sender, rule, configured_mps, at } => {
                    let number = p.state.senders.get(sender);
                    let mps = rule.mps(*configured_mps, number.and_then(|n| n.throughput_mps));
                    let backing_off = number.and_then(|n| n.throughput_backoff_until).is_some_and(|until| until > now);
                    let tat = p.numbers.entry(sender.clone()).or_insert(0);
                    *tat =
                        rate::throughput_take(*tat, event_time(*at, now), ThroughputRule::interval(mps, backing_off));
                }
                Change::ThroughputBackoff { sender, at } => {
                    let until = event_time(*at, now).saturating_add(policy::micros(rate::THROUGHPUT_BACKOFF));
                    let number = p.state.senders.entry(sender.clone()).or_default();
                    number.throughput_backoff_until = number.throughput_backoff_until.max(Some(until));
                }
                Change::PairBackoff { pair, rule, at } => {
                    let s = p.pairs.entry(pair.clone()).or_default();
                    *s = rule.penalise(*s, event_time(*at, now));
                }
                Change::MarketingCapped { member, at } => {
                    let until = event_time(*at, now).saturating_add(policy::micros(rate::MARKETING_CAPPED_FOR));
                    let capped = p.capped.entry(member.clone()).or_insert(until);
                    *capped = (*capped).max(until);
                }
                Change::Mode(mode) => p.state.mode = *mode,
                Change::Throughput { sender, mps } => {
                    p.state.senders.entry(sender.clone()).or_default().throughput_mps = Some(*mps);
                }
                Change::Delivery { scope, member, status, at } => {
                    let s = written(&mut state.scopes, scope, now);
                    if !expired.contains(&scope) {
                        s.expire(now, &self.windows);
                        expired.push(scope);
                    }
                    let at = event_time(*at, now);
                    match status {
                        Delivery::Delivered => {
                            s.kept_from = s.kept_from.min(at);
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
        // A read creates nothing: a scope never written to reads as an empty one.
        let mut unknown = ScopeState::default();
        let s = state.scopes.get_mut(scope).unwrap_or(&mut unknown);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::hashing::RecipientHasher;
    use crate::policy::{Category, Reason};

    const HOUR: Micros = 3_600_000_000;
    const DAY: Duration = Duration::from_secs(24 * 3600);

    struct ManualClock(AtomicU64);

    impl Clock for ManualClock {
        fn now(&self) -> Micros {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl ManualClock {
        fn advance(&self, us: Micros) {
            self.0.fetch_add(us, Ordering::SeqCst);
        }
    }

    /// A store with a one-day window and a 30-day state TTL on a manual clock.
    fn store() -> (MemoryStore, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock(AtomicU64::new(1_800_000_000_000_000)));
        let store = MemoryStore::with_clock(Windows::default(), clock.clone()).with_state_ttl(30 * DAY);
        (store, clock)
    }

    fn scope(portfolio: &str) -> ScopeKey {
        ScopeKey { portfolio: portfolio.into(), sender: None }
    }

    fn op(recipient: &str) -> AdmitOp {
        let member = RecipientHasher::new(b"memory-store-tests").unwrap().recipient(recipient);
        AdmitOp { member, category: Category::Utility, ..AdmitOp::default() }
    }

    fn params() -> AdmitParams {
        AdmitParams::new(Tier::limited("T2", 2), 0)
    }

    async fn admit(store: &MemoryStore, portfolio: &str, recipient: &str) -> Reason {
        store.admit(&scope(portfolio), &params(), &[op(recipient)]).await.unwrap()[0].reason
    }

    fn held(scopes: usize, portfolios: usize) -> Held {
        Held { scopes, portfolios }
    }

    #[tokio::test]
    async fn reads_create_nothing() {
        let (store, _) = store();
        for i in 0..100 {
            let report = store.usage(&scope(&format!("p{i}")), &Tier::limited("T2", 2)).await.unwrap();
            assert_eq!(report.usage.counted, 0);
            assert_eq!(store.portfolio(&format!("p{i}")).await.unwrap(), PortfolioState::default());
        }
        assert_eq!(store.held(), held(0, 0));
    }

    #[tokio::test]
    async fn a_scope_is_forgotten_once_nothing_is_counted_in_its_window_and_not_before() {
        let (store, clock) = store();
        assert_eq!(admit(&store, "acme", "1111111").await, Reason::NewRecipient);
        clock.advance(23 * HOUR);
        assert_eq!(store.held(), held(1, 0), "a contact in the window keeps its scope");
        assert_eq!(admit(&store, "acme", "2222222").await, Reason::NewRecipient);
        assert_eq!(admit(&store, "acme", "3333333").await, Reason::LimitReached, "exact: the first still counts");
        clock.advance(2 * HOUR);
        assert_eq!(store.held(), held(1, 0), "the second contact is still in the window");
        clock.advance(23 * HOUR);
        assert_eq!(store.held(), held(0, 0), "nothing left in the window");
        // A denied write leaves nothing to keep either.
        let full = AdmitOp { category: Category::Service, ..op("4444444") };
        store.admit(&scope("other"), &params(), &[full]).await.unwrap();
        clock.advance(1);
        assert_eq!(store.held(), held(0, 0));
    }

    #[tokio::test]
    async fn a_lease_gives_back_nothing_once_its_window_is_gone_as_on_redis() {
        let (store, clock) = store();
        let counted = store.admit(&scope("acme"), &params(), &[op("1111111")]).await.unwrap();
        let lease =
            Lease { scope: scope("acme"), member: op("1111111").member, score: counted[0].lease_score.unwrap() };
        clock.advance(24 * HOUR + 500_000);
        assert!(store.release(&lease).await.unwrap(), "left the window, but lazily, as Redis keeps the key a second");
        store.admit(&scope("acme"), &params(), &[op("1111111")]).await.unwrap();
        let again = store.admit(&scope("acme"), &params(), &[op("2222222")]).await.unwrap();
        let lease = Lease { scope: scope("acme"), member: op("2222222").member, score: again[0].lease_score.unwrap() };
        clock.advance(24 * HOUR + 1_000_001);
        assert!(!store.release(&lease).await.unwrap(), "a window and a second after the last admit");
    }

    #[tokio::test]
    async fn persisted_state_is_kept_until_the_state_ttl_passes_without_a_write() {
        let (store, clock) = store();
        let tier = Change::Tier { scope: scope("acme"), tier: Tier::limited("T1", 1), at: None };
        let opt_out = Change::OptOut { member: op("5555555").member, opted_out: true };
        store.apply("acme", &[tier, opt_out]).await.unwrap();
        clock.advance(20 * 24 * HOUR);
        // An Admit is a write: it renews both the scope's and the portfolio's state.
        assert_eq!(admit(&store, "acme", "1111111").await, Reason::NewRecipient);
        assert_eq!(admit(&store, "acme", "2222222").await, Reason::LimitReached, "the persisted tier holds");
        clock.advance(29 * 24 * HOUR);
        assert_eq!(store.held(), held(1, 1));
        assert_eq!(store.portfolio("acme").await.unwrap().opted_out, 1);
        assert_eq!(store.usage(&scope("acme"), &params().fallback).await.unwrap().usage.tier.name, "T1");
        clock.advance(2 * 24 * HOUR);
        assert_eq!(store.held(), held(0, 0), "31 days without a write");
        assert_eq!(store.portfolio("acme").await.unwrap().opted_out, 0);
        assert_eq!(store.usage(&scope("acme"), &params().fallback).await.unwrap().usage.tier.name, "T2");
    }

    #[tokio::test]
    async fn writes_sweep_what_expired_without_a_read() {
        let (store, clock) = store();
        for i in 0..50 {
            admit(&store, &format!("p{i}"), "1111111").await;
        }
        clock.advance(25 * HOUR);
        admit(&store, "acme", "1111111").await;
        let state = store.lock();
        assert_eq!((state.scopes.len(), state.portfolios.len()), (1, 0), "the 50 idle scopes are gone");
    }

    #[tokio::test]
    async fn a_late_inbound_report_counts_after_a_schedule_already_past_as_on_redis() {
        let (store, clock) = store();
        let rule = ThroughputRule { default_mps: 1, burst: Duration::ZERO };
        let params = AdmitParams { rates: Rates { throughput: Some(rule), pair: None }, ..params() };
        let from = |recipient| AdmitOp { sender: Some("n1".into()), ..op(recipient) };
        let sent = store.admit(&scope("acme"), &params, &[from("1111111")]).await.unwrap();
        assert_eq!(sent[0].reason, Reason::NewRecipient);
        let t0 = sent[0].now;
        // Past the number's schedule (t0 + 1 s) and past a sweep, a message received at
        // t0 + 0.5 s is reported: its slot follows the first message's, at t0 + 1 s.
        clock.advance(2 * SWEEP_EVERY.as_micros() as Micros);
        let at = t0 + 500_000;
        let traffic = Change::Traffic { sender: "n1".into(), rule, configured_mps: None, at: Some(at) };
        store.apply("acme", &[traffic]).await.unwrap();
        assert_eq!(store.lock().portfolios["acme"].numbers["n1"], t0 + 2_000_000);
    }
}
