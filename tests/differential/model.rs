//! The reference model: what every store must answer, built on `policy` and nothing else.
//!
//! It keeps the same state a store keeps, in the plainest form (ordered maps, linear scans), and
//! is told the time of each call by the store under test, so a store with a real clock (Redis
//! `TIME`) is held to exact answers too. Nothing here is shared with a store's code: a rule that
//! one of them gets wrong shows up as a difference.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tiergate::policy::rate::{self, PairState, RateSnapshot, ThroughputRule};
use tiergate::policy::{
    self, Delivery, Effect, Lease, Limits, Micros, Remembered, ScopeKey, SenderStatus, Snapshot, TemplateEvent, Tier,
};
use tiergate::store::{
    day_of, Admission, AdmitOp, AdmitParams, Change, Member, PortfolioState, Rates, ScopeReport, TemplateKey,
    UsageSnapshot, Windows,
};

/// Days of daily recipient sets a store keeps for the 30-day count.
const DAYS: u64 = 30;

#[derive(Default)]
struct Scope {
    /// Counted recipient → score of its last counted contact.
    contacts: BTreeMap<Member, Micros>,
    last_score: Micros,
    tier: Option<Tier>,
    tier_since: Option<Micros>,
    /// When the tier event applied last happened.
    tier_at: Micros,
    eligible_since: Option<Micros>,
    flagged_since: Option<Micros>,
    /// Day → counted recipients confirmed delivered that day.
    days: BTreeMap<u64, BTreeSet<Member>>,
    /// Recipient → when it was last confirmed delivered.
    delivered: BTreeMap<Member, Micros>,
    /// Idempotency key (hashed) → what it remembers; never dropped here, since whether it still
    /// replays is asked at each use.
    remembered: BTreeMap<Member, Remembered>,
    /// When the scope was last admitted for: its window is kept a window and a second after.
    admitted: Micros,
}

impl Scope {
    fn forget_old(&mut self, now: Micros, windows: &Windows) {
        let start = policy::window_start(now, windows.window);
        self.contacts.retain(|_, score| *score > start);
        self.delivered.retain(|_, at| *at > start);
        let first_day = day_of(now).saturating_sub(DAYS - 1);
        self.days.retain(|day, _| *day >= first_day);
    }

    fn oldest(&self) -> Option<Micros> {
        self.contacts.values().min().copied()
    }

    fn unique_since(&self, first_day: u64) -> u64 {
        let all: BTreeSet<&Member> = self.days.range(first_day..).flat_map(|(_, d)| d).collect();
        all.len() as u64
    }

    fn usage(&self, fallback: &Tier, windows: &Windows) -> UsageSnapshot {
        UsageSnapshot {
            tier: self.tier.clone().unwrap_or_else(|| fallback.clone()),
            counted: self.contacts.len() as u64,
            next_slot_at: self.oldest().map(|o| o + policy::micros(windows.window)),
        }
    }
}

#[derive(Default)]
struct Portfolio {
    /// (sender, recipient) hash → when its service window closes.
    service: BTreeMap<Member, Micros>,
    opted_out: BTreeSet<Member>,
    state: PortfolioState,
    /// Item → time of the last status event applied to it.
    event_at: BTreeMap<String, Micros>,
    /// Number → its throughput schedule (`tat`); never forgotten here: one in the past owes
    /// nothing.
    numbers: BTreeMap<String, Micros>,
    /// (number, user) pair, by its service-window hash → its schedule.
    pairs: BTreeMap<Member, PairState>,
    /// Recipient → until when Meta's per-user marketing limit caps marketing to them.
    capped: BTreeMap<Member, Micros>,
}

impl Portfolio {
    /// The last status event of template `name` in `language` ("" = set for every language).
    fn template_event(&self, name: &str, language: &str) -> Option<TemplateEvent<'_>> {
        let t = self.state.templates.iter().find(|(k, _)| k.name == name && k.language == language)?.1;
        Some(TemplateEvent { status: t.status.as_deref()?, at: t.at.unwrap_or(0) })
    }

    /// Whether a message naming template `name` in `language` (or in none) is blocked.
    fn template_blocked(&self, name: &str, language: Option<&str>) -> bool {
        let every_language = self.template_event(name, "");
        !match language {
            Some(l) => policy::template_language_sendable(self.template_event(name, l), every_language),
            None => {
                let languages: Vec<&str> = self
                    .state
                    .templates
                    .keys()
                    .filter(|k| k.name == name && !k.language.is_empty())
                    .map(|k| k.language.as_str())
                    .collect();
                let own = languages.into_iter().filter_map(|l| self.template_event(name, l));
                policy::template_name_sendable(every_language, own)
            }
        }
    }

    /// The spacing of `sender`'s messages at `now`: its configured level, else the one learnt
    /// from Meta, else the rule's default; twice that while Meta's 130429 backoff lasts.
    fn interval(&self, sender: &str, rule: &ThroughputRule, configured: Option<u32>, now: Micros) -> Micros {
        let number = self.state.senders.get(sender);
        let learnt = number.and_then(|n| n.throughput_mps);
        let backing_off = number.and_then(|n| n.throughput_backoff_until).is_some_and(|until| until > now);
        ThroughputRule::interval(rule.mps(configured, learnt), backing_off)
    }

    /// The rates of `op` at `now`: its number's throughput and its pair's schedule, for each
    /// rule that is on, when it names a sender.
    fn rates(&self, op: &AdmitOp, rates: &Rates, now: Micros) -> RateSnapshot {
        let Some(sender) = &op.sender else { return RateSnapshot::default() };
        let tat = self.numbers.get(sender).copied().unwrap_or(0);
        RateSnapshot {
            throughput: rates
                .throughput
                .map(|rule| (tat, self.interval(sender, &rule, op.throughput_mps, now), rule.burst)),
            pair: rates
                .pair
                .zip(op.service_member.as_ref())
                .map(|(rule, pair)| (self.pairs.get(pair).copied().unwrap_or_default(), rule)),
        }
    }

    fn newer(&mut self, item: String, at: Micros) -> bool {
        let last = self.event_at.entry(item).or_default();
        if at < *last {
            return false;
        }
        *last = at;
        true
    }
}

/// The reference model of one store.
pub struct Model {
    windows: Windows,
    scopes: BTreeMap<ScopeKey, Scope>,
    portfolios: BTreeMap<String, Portfolio>,
}

impl Model {
    /// An empty store with these windows.
    pub fn new(windows: Windows) -> Model {
        Model { windows, scopes: BTreeMap::new(), portfolios: BTreeMap::new() }
    }

    /// What `Store::admit` must answer at `now`.
    ///
    /// A replay takes no rate slot; a decision is the messaging-limit rules' (`policy::decide`),
    /// then the rates' and the mode's (`rate::govern`), whose schedule the number and pair keep.
    pub fn admit(&mut self, now: Micros, scope: &ScopeKey, params: &AdmitParams, ops: &[AdmitOp]) -> Vec<Admission> {
        let windows = self.windows;
        // An empty portfolio reads as none, so admitting may create it.
        let p = self.portfolios.entry(scope.portfolio.clone()).or_default();
        let mode = p.state.mode.unwrap_or(params.mode);
        let s = self.scopes.entry(scope.clone()).or_default();
        s.forget_old(now, &windows);
        s.admitted = now;
        let limit = s.tier.as_ref().unwrap_or(&params.fallback).limit;
        let limits = Limits::new(limit, params.reserve_bp);
        let mut out = Vec::new();
        for op in ops {
            let remembered = op.idempotency_key.as_ref().and_then(|key| s.remembered.get(key));
            if let Some(r) = remembered.filter(|r| r.replays(now, windows.window, s.contacts.contains_key(&r.member))) {
                out.push(Admission {
                    wait: Duration::ZERO,
                    shadow: None,
                    reason: r.reason,
                    lease_score: r.lease_score(),
                    retry_after: None,
                    usage: s.usage(&params.fallback, &windows),
                    now,
                    replay_of: Some(r.member.clone()),
                });
                continue;
            }
            let status = |sender: &String| p.state.senders.get(sender)?.status;
            let language = op.template_language.as_deref();
            let window_open = |m: &Member| p.service.get(m).is_some_and(|c| *c > now);
            let snapshot = Snapshot {
                marketing_capped: p.capped.get(&op.member).is_some_and(|until| *until > now),
                sender_blocked: op.sender_blocked || op.sender.as_ref().and_then(status) == Some(SenderStatus::Banned),
                template_blocked: op.template.as_ref().is_some_and(|name| p.template_blocked(name, language)),
                opted_out: p.opted_out.contains(&op.member),
                service_window_open: op.service_member.as_ref().is_some_and(window_open),
                already_counted: s.contacts.contains_key(&op.member),
                counted: s.contacts.len() as u64,
            };
            let mut scores: Vec<Micros> = s.contacts.values().copied().collect();
            scores.sort_unstable();
            let nth_oldest = |rank: u64| scores.get(usize::try_from(rank).ok()?).copied();
            let outcome = policy::decide(&snapshot, op.category, limits, now, windows.window, nth_oldest);
            let rates = p.rates(op, &params.rates, now);
            let max_wait = policy::micros(op.max_wait);
            let g = rate::govern(mode, &outcome, policy::admitted_as(&snapshot), &rates, now, max_wait);
            if let (Some(sender), Some(tat)) = (&op.sender, g.schedule.throughput_tat) {
                p.numbers.insert(sender.clone(), tat);
            }
            if let (Some(pair), Some(next)) = (&op.service_member, g.schedule.pair) {
                p.pairs.insert(pair.clone(), next);
            }
            let mut lease_score = None;
            let mut written = None;
            if g.effect != Effect::Nothing {
                // Every tier keeps the window, unlimited ones too.
                let score = policy::next_score(now, s.last_score);
                s.last_score = score;
                s.contacts.insert(op.member.clone(), score);
                written = Some(score);
                if g.effect == Effect::Count {
                    lease_score = Some(score);
                }
            }
            // A key remembers the last decision under it that wrote; one that wrote nothing forgets.
            if let Some(key) = &op.idempotency_key {
                match Remembered::of(g.reason, &op.member, written) {
                    Some(r) => s.remembered.insert(key.clone(), r),
                    None => s.remembered.remove(key),
                };
            }
            out.push(Admission {
                wait: Duration::from_micros(g.wait),
                shadow: g.shadow,
                reason: g.reason,
                lease_score,
                retry_after: g.retry_after,
                usage: s.usage(&params.fallback, &windows),
                now,
                replay_of: None,
            });
        }
        out
    }

    /// What `Store::release` must answer at `now`. Contacts leave the window lazily, so a lease
    /// of one that left it may still give it back, until the window is gone altogether: a
    /// window and a second after the scope's last admit (the TTL of Redis's window key).
    pub fn release(&mut self, now: Micros, lease: &Lease) -> bool {
        let Some(s) = self.scopes.get_mut(&lease.scope) else { return false };
        let kept = policy::micros(self.windows.window + Duration::from_secs(1));
        if now.saturating_sub(s.admitted) > kept {
            return false;
        }
        if s.contacts.get(&lease.member) != Some(&lease.score) {
            return false;
        }
        s.contacts.remove(&lease.member);
        true
    }

    /// Applies what `Store::apply` must apply at `now`.
    pub fn apply(&mut self, now: Micros, portfolio: &str, changes: &[Change]) {
        for change in changes {
            let p = self.portfolios.entry(portfolio.to_owned()).or_default();
            match change {
                Change::Traffic { sender, rule, configured_mps, at } => {
                    // Backing off or not as of now, whenever the message was.
                    let interval = p.interval(sender, rule, *configured_mps, now);
                    let tat = p.numbers.entry(sender.clone()).or_default();
                    *tat = rate::throughput_take(*tat, at.unwrap_or(now).min(now), interval);
                }
                Change::ThroughputBackoff { sender, at } => {
                    let until = at.unwrap_or(now).min(now) + policy::micros(rate::THROUGHPUT_BACKOFF);
                    let number = p.state.senders.entry(sender.clone()).or_default();
                    // A late report of an older 130429 cannot shorten a backoff.
                    number.throughput_backoff_until =
                        Some(number.throughput_backoff_until.map_or(until, |u| u.max(until)));
                }
                Change::PairBackoff { pair, rule, at } => {
                    let s = p.pairs.entry(pair.clone()).or_default();
                    *s = rule.penalise(*s, at.unwrap_or(now).min(now));
                }
                Change::MarketingCapped { member, at } => {
                    let until = at.unwrap_or(now).min(now) + policy::micros(rate::MARKETING_CAPPED_FOR);
                    let c = p.capped.entry(member.clone()).or_default();
                    *c = (*c).max(until);
                }
                Change::Mode(mode) => p.state.mode = *mode,
                Change::Tier { scope, tier, at } => {
                    let s = self.scopes.entry(scope.clone()).or_default();
                    let at = at.unwrap_or(now);
                    if at >= s.tier_at {
                        s.tier_at = at;
                        if s.tier.as_ref().map(|t| &t.name) != Some(&tier.name) {
                            s.tier_since = Some(now);
                        }
                        s.tier = Some(tier.clone());
                    }
                }
                Change::Eligible { scope, since } => {
                    self.scopes.entry(scope.clone()).or_default().eligible_since = *since
                }
                Change::Flagged { scope, since } => {
                    self.scopes.entry(scope.clone()).or_default().flagged_since = *since
                }
                Change::Quality(q) => p.state.quality = *q,
                Change::SenderStatus { sender, status, at } => {
                    if p.newer(format!("sender {sender}"), at.unwrap_or(now)) {
                        let s = p.state.senders.entry(sender.clone()).or_default();
                        if s.status != Some(*status) {
                            s.since = Some(now);
                        }
                        s.status = Some(*status);
                    }
                }
                Change::SenderQuality { sender, quality } => {
                    p.state.senders.entry(sender.clone()).or_default().quality = *quality
                }
                Change::TemplateStatus { name, language, status, at } => {
                    // Each (name, language), and the name for every language, skips its older events.
                    let at = at.unwrap_or(now);
                    let t = p.state.templates.entry(TemplateKey::new(name, language)).or_default();
                    if at >= t.at.unwrap_or(0) {
                        t.at = Some(at);
                        t.status = Some(status.clone());
                    }
                }
                Change::TemplateQuality { name, language, quality } => {
                    p.state.templates.entry(TemplateKey::new(name, language)).or_default().quality = *quality
                }
                Change::OptOut { member, opted_out: true } => {
                    p.opted_out.insert(member.clone());
                }
                Change::OptOut { member, opted_out: false } => {
                    p.opted_out.remove(member);
                }
                Change::Alert { key, body } => {
                    p.state.alerts.insert(key.clone(), body.clone());
                }
                Change::Alias { display, id } => {
                    p.state.aliases.insert(display.clone(), id.clone());
                }
                Change::Inbound { service_member, at } => {
                    // A timestamp from the future opens the window from now; a later close stays.
                    let closes = at.unwrap_or(now).min(now) + policy::micros(self.windows.service_window);
                    let c = p.service.entry(service_member.clone()).or_default();
                    *c = (*c).max(closes);
                }
                Change::Throughput { sender, mps } => {
                    p.state.senders.entry(sender.clone()).or_default().throughput_mps = Some(*mps)
                }
                Change::Delivery { scope, member, status, at } => {
                    let s = self.scopes.entry(scope.clone()).or_default();
                    s.forget_old(now, &self.windows);
                    let at = at.unwrap_or(now).min(now);
                    match status {
                        Delivery::Delivered => {
                            let last = s.delivered.entry(member.clone()).or_insert(at);
                            *last = (*last).max(at);
                            // Only a recipient reached outside a service window counts.
                            if s.contacts.contains_key(member) {
                                s.days.entry(day_of(at)).or_default().insert(member.clone());
                            }
                        }
                        Delivery::Failed => {
                            let (contact, delivered) = (s.contacts.get(member), s.delivered.get(member));
                            let window = self.windows.window;
                            if policy::failure_gives_back(contact.copied(), delivered.copied(), at, now, window) {
                                s.contacts.remove(member);
                            }
                        }
                    }
                }
            }
        }
    }

    /// What `Store::usage` must answer at `now`.
    pub fn usage(&mut self, now: Micros, scope: &ScopeKey, fallback: &Tier) -> ScopeReport {
        let windows = self.windows;
        let s = self.scopes.entry(scope.clone()).or_default();
        s.forget_old(now, &windows);
        let today = day_of(now);
        ScopeReport {
            usage: s.usage(fallback, &windows),
            unique_7d: s.unique_since(today.saturating_sub(6)),
            unique_30d: s.unique_since(today.saturating_sub(DAYS - 1)),
            tier_since: s.tier_since,
            eligible_since: s.eligible_since,
            flagged_since: s.flagged_since,
            now,
        }
    }

    /// What `Store::portfolio` must answer.
    pub fn portfolio(&self, portfolio: &str) -> PortfolioState {
        let Some(p) = self.portfolios.get(portfolio) else { return PortfolioState::default() };
        PortfolioState { opted_out: p.opted_out.len() as u64, ..p.state.clone() }
    }
}
