//! The send rates Meta enforces besides the messaging limit, pure: each number's throughput and
//! each (number, user) pair's rate, and how an Admit is paced, shadowed or denied by them.
//!
//! Both are kept as a *theoretical arrival time* (`tat`, µs): the instant from which the next
//! message goes without borrowing. A store keeps one per number and one per pair, shared by every
//! sidecar, and updates it in the same atomic step as the messaging-limit rules of
//! [`decide`](super::decide), so Admit stays one round trip.
//!
//! - **Throughput** is a GCRA: a number at `mps` messages per second spaces messages
//!   [`ThroughputRule::interval`] apart, and a message may go while the number's `tat` is at most
//!   `burst` ahead of now. Inbound messages take a slot too ([`throughput_take`]).
//! - **Pair rate** is Meta's borrowing rule: one message per `interval` from a number to a user,
//!   and a burst of up to `burst` messages inside one `interval` borrows the intervals it skips,
//!   which are then waited out (after a burst of 20 at 6 s, 2 minutes). See [`PairState`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::{micros, Category, Decision, Effect, Micros, Mode, Outcome, Reason, MIN_RETRY_AFTER};

/// How long a number's throughput stays reduced after Meta reported it exceeded (error 130429).
pub const THROUGHPUT_BACKOFF: Duration = Duration::from_secs(60);

/// While backing off, a number sends at its rate divided by this.
pub const THROUGHPUT_BACKOFF_FACTOR: u64 = 2;

/// How long marketing to a user stays denied after Meta's per-user marketing limit (error 131049).
pub const MARKETING_CAPPED_FOR: Duration = Duration::from_secs(24 * 3600);

/// The throughput rule of every number (`[policy.throughput]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThroughputRule {
    /// Messages per second of a number whose level is neither configured nor learnt.
    pub default_mps: u32,
    /// How far ahead of now a number's schedule may run: a burst of `burst × mps` messages goes
    /// at once after a quiet spell.
    pub burst: Duration,
}

impl ThroughputRule {
    /// The spacing of a number's messages at `mps` (rounded up, so never faster than `mps`), and
    /// [`THROUGHPUT_BACKOFF_FACTOR`] times that while it backs off.
    pub fn interval(mps: u32, backing_off: bool) -> Micros {
        let interval = 1_000_000u64.div_ceil(u64::from(mps.max(1)));
        if backing_off {
            interval * THROUGHPUT_BACKOFF_FACTOR
        } else {
            interval
        }
    }

    /// The level a number sends at: configured for it, else learnt from Meta, else the default.
    pub fn mps(&self, configured: Option<u32>, learnt: Option<u32>) -> u32 {
        configured.or(learnt).unwrap_or(self.default_mps).max(1)
    }
}

/// Every number's throughput level: the rule (`None` while `[policy.throughput]` is off) and the
/// levels configured per number. The one place a number's level in force is worked out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThroughputLevels {
    pub rule: Option<ThroughputRule>,
    /// Phone number id → configured messages per second (`[policy.throughput] numbers`).
    pub numbers: BTreeMap<String, u32>,
}

impl ThroughputLevels {
    /// The level configured for a number, which wins over what Meta reports.
    pub fn configured(&self, number: &str) -> Option<u32> {
        self.numbers.get(number).copied()
    }

    /// A number's level in force: configured, else `learnt` from Meta, else the rule's default
    /// (Meta's default while the rule is off).
    pub fn level(&self, number: &str, learnt: Option<u32>) -> u32 {
        let configured = self.configured(number);
        match self.rule {
            Some(rule) => rule.mps(configured, learnt),
            None => configured.or(learnt).unwrap_or(super::DEFAULT_THROUGHPUT_MPS),
        }
    }
}

/// How long a message at `at` waits for its number's throughput (0: it may go now).
pub fn throughput_wait(tat: Micros, at: Micros, burst: Duration) -> Micros {
    tat.saturating_sub(micros(burst)).saturating_sub(at)
}

/// The number's `tat` once a message (or an inbound message) takes its slot at `at`.
pub fn throughput_take(tat: Micros, at: Micros, interval: Micros) -> Micros {
    tat.max(at).saturating_add(interval)
}

/// The pair rule (`[policy.pair_rate]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairRule {
    /// One message per this, from a number to a user.
    pub interval: Duration,
    /// At most this many messages inside one interval (the first included).
    pub burst: u32,
}

/// A (number, user) pair's schedule. Zero is a pair that has sent nothing lately.
///
/// A message at `at` when `tat <= at` owes nothing: it opens a burst at `at` and moves `tat` one
/// interval on. Inside that burst (`at < burst_start + interval`) more messages go while fewer
/// than `burst` were sent in it, each borrowing one more interval. Otherwise the pair waits until
/// `tat`. A burst starts at its first message: `burst_start <= at` too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PairState {
    pub tat: Micros,
    pub burst_start: Micros,
}

impl PairRule {
    /// How long a message at `at` waits for the pair (0: it may go now).
    pub fn wait(&self, s: PairState, at: Micros) -> Micros {
        let interval = micros(self.interval);
        let in_burst = (s.burst_start..s.burst_start.saturating_add(interval)).contains(&at)
            && s.tat.saturating_add(interval) <= s.burst_start.saturating_add(interval * u64::from(self.burst));
        if s.tat <= at || in_burst {
            0
        } else {
            s.tat - at
        }
    }

    /// The pair's schedule once a message takes its slot at `at`.
    pub fn take(&self, s: PairState, at: Micros) -> PairState {
        let interval = micros(self.interval);
        if s.tat <= at {
            PairState { tat: at.saturating_add(interval), burst_start: at }
        } else {
            PairState { tat: s.tat.saturating_add(interval), ..s }
        }
    }

    /// The pair's schedule after Meta refused a message to it at `at` (error 131056): nothing
    /// more until an interval after `at`, and no burst before (a burst starts at its first message,
    /// so one starting at `tat` closes every earlier one).
    pub fn penalise(&self, s: PairState, at: Micros) -> PairState {
        let tat = s.tat.max(at.saturating_add(micros(self.interval)));
        PairState { tat, burst_start: tat }
    }
}

/// Whether Meta's per-user marketing limit keeps this message from a user capped until `until`.
pub fn marketing_capped(category: Category, until: Option<Micros>, now: Micros) -> bool {
    category.may_be_marketing() && until.is_some_and(|u| u > now)
}

/// A message's rates at the instant of its decision: its number's throughput and its pair's
/// schedule, when each rule applies to it (it names a sender and the rule is on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateSnapshot {
    /// The number's `tat`, its interval and burst.
    pub throughput: Option<(Micros, Micros, Duration)>,
    /// The pair's schedule and rule.
    pub pair: Option<(PairState, PairRule)>,
}

/// What the rates decide for a message the messaging-limit rules admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// `Ok(wait)`: it goes `wait` µs from now (0: at once); `Err(reason, retry_after)`: it waits
    /// longer than the caller will.
    pub verdict: Result<Micros, (Reason, Duration)>,
    /// The number's `tat` and the pair's schedule once the message takes its slots, if it goes.
    pub throughput_tat: Option<Micros>,
    pub pair: Option<PairState>,
}

/// Schedules a message at `now` that may wait up to `max_wait` µs: the pair first (its waits are
/// seconds), then the number's throughput from the instant the pair allows. A message that goes
/// takes both slots at the instant it goes, so paced messages of many sidecars together keep both
/// rates. One that would wait longer is denied PAIR_RATE when the pair alone is too far off,
/// else THROUGHPUT_EXCEEDED, with the whole wait as `retry_after`; it takes nothing.
pub fn schedule(r: &RateSnapshot, now: Micros, max_wait: Micros) -> Schedule {
    let pair_wait = r.pair.map_or(0, |(s, rule)| rule.wait(s, now));
    let throughput_wait = r.throughput.map_or(0, |(tat, _, burst)| throughput_wait(tat, now + pair_wait, burst));
    let wait = pair_wait + throughput_wait;
    if wait > max_wait {
        let retry = |w: Micros| Duration::from_micros(w).max(MIN_RETRY_AFTER);
        let denial = if pair_wait > max_wait {
            (Reason::PairRate, retry(pair_wait))
        } else {
            (Reason::ThroughputExceeded, retry(wait))
        };
        return Schedule { verdict: Err(denial), throughput_tat: None, pair: None };
    }
    take(r, now, wait)
}

/// Takes both slots of a message that goes `wait` µs after `now`, whatever it owes: a message
/// sent anyway (shadow mode) still uses the number and the pair.
pub fn take(r: &RateSnapshot, now: Micros, wait: Micros) -> Schedule {
    let at = now + wait;
    Schedule {
        verdict: Ok(wait),
        throughput_tat: r.throughput.map(|(tat, interval, _)| throughput_take(tat, at, interval)),
        pair: r.pair.map(|(s, rule)| rule.take(s, at)),
    }
}

/// The final answer for a message under a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Governed {
    /// What the caller is told.
    pub reason: Reason,
    /// What the store writes to the messaging-limit window.
    pub effect: Effect,
    /// What enforcing would have answered; set in shadow mode only.
    pub shadow: Option<Reason>,
    pub retry_after: Option<Duration>,
    /// µs to hold the call before answering (pacing); 0 in shadow mode.
    pub wait: Micros,
    /// The rates' new state, when the message takes its slots (it is sent).
    pub schedule: Schedule,
}

/// Combines the messaging-limit decision (`limit`, from [`decide`](super::decide)) with the
/// rates, after it and in this order: the pair rate, then the number's throughput.
///
/// Enforcing, a message the limit rules deny takes no rate slot, and one the rates deny takes no
/// limit slot.
///
/// In shadow mode every rule is evaluated and reported in `shadow`, but the message is admitted:
/// as the limit rules answer with every denial lifted (`admitted_as`, see
/// [`admitted_as`](super::admitted_as)), at once, taking its rate slots at `now`. Nothing that
/// only a denial would change is changed.
pub fn govern(
    mode: Mode,
    limit: &Outcome,
    admitted_as: (Reason, Effect),
    rates: &RateSnapshot,
    now: Micros,
    max_wait: Micros,
) -> Governed {
    let denied_by_limit = limit.reason.decision() == Decision::Denied;
    let enforced = if denied_by_limit {
        Schedule {
            verdict: Err((limit.reason, limit.retry_after.unwrap_or_default())),
            throughput_tat: None,
            pair: None,
        }
    } else {
        schedule(rates, now, max_wait)
    };
    match (mode, enforced.verdict) {
        (Mode::Enforce, Ok(wait)) => Governed {
            reason: limit.reason,
            effect: limit.effect,
            shadow: None,
            retry_after: None,
            wait,
            schedule: enforced,
        },
        (Mode::Enforce, Err((reason, retry))) => Governed {
            reason,
            effect: Effect::Nothing,
            shadow: None,
            retry_after: if denied_by_limit { limit.retry_after } else { Some(retry) },
            wait: 0,
            schedule: enforced,
        },
        (Mode::Shadow, verdict) => {
            let would_be = verdict.map_or_else(|(reason, _)| reason, |_| limit.reason);
            let (reason, effect) = if denied_by_limit { admitted_as } else { (limit.reason, limit.effect) };
            Governed {
                reason,
                effect,
                shadow: Some(would_be),
                retry_after: None,
                wait: 0,
                schedule: take(rates, now, 0),
            }
        }
    }
}

/// What tiergate does about an error code Meta reports on a failed message
/// (`statuses[].errors[].code` of a `messages` webhook). Every failed message gives its
/// messaging-limit slot back whatever its code (see [`Delivery`](super::Delivery)); these say
/// what else a code changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaError {
    /// The number's throughput was exceeded: it backs off ([`THROUGHPUT_BACKOFF`]).
    ThroughputExceeded,
    /// The (number, user) pair was messaged too often: the pair waits an interval.
    PairRate,
    /// Meta's per-user marketing limit: marketing to the user waits [`MARKETING_CAPPED_FOR`].
    MarketingCapped,
    /// The message did not reach the user for a reason of that message or user alone: nothing
    /// more than the slot coming back.
    Undeliverable,
    /// A code tiergate does not act on: only counted.
    Unknown,
}

impl MetaError {
    /// The one table of the codes tiergate knows, with Meta's documented meaning of each. A code
    /// is listed only when its meaning is certain; the others are [`MetaError::Unknown`].
    pub const CODES: [(u32, MetaError); 8] = [
        // "Rate limit hit": the number's Cloud API throughput was reached.
        (130429, MetaError::ThroughputExceeded),
        // "(Business Account, Consumer Account) pair rate limit hit": too many messages from the
        // number to this user in a short time.
        (131056, MetaError::PairRate),
        // "This message was not delivered to maintain healthy ecosystem engagement": Meta's own
        // per-user marketing limit.
        (131049, MetaError::MarketingCapped),
        // "Message undeliverable": the user is not on WhatsApp, has not accepted the terms, or
        // runs an old app.
        (131026, MetaError::Undeliverable),
        // "Re-engagement message": a free-form message more than 24 hours after the user last
        // wrote; it was not sent.
        (131047, MetaError::Undeliverable),
        // "Unsupported message type": this message's type cannot be sent.
        (131051, MetaError::Undeliverable),
        // "Media upload error": the media of this message could not be sent.
        (131053, MetaError::Undeliverable),
        // "Something went wrong": the message failed on Meta's side, for no stated reason.
        (131000, MetaError::Undeliverable),
        // Not listed: 131048 ("Spam rate limit hit", a quality limit of the number tiergate does
        // not model), 131052 (a user's media could not be downloaded: inbound, never a status of
        // a message sent), 131057 (the number is being upgraded: it passes by itself).
    ];

    /// What tiergate does about `code`.
    pub fn from_code(code: u32) -> MetaError {
        MetaError::CODES.iter().find(|(c, _)| *c == code).map_or(MetaError::Unknown, |(_, e)| *e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    fn pair() -> PairRule {
        PairRule { interval: Duration::from_secs(6), burst: 45 }
    }

    #[test]
    fn one_message_per_interval_and_a_burst_borrows_what_it_skips() {
        let rule = pair();
        let mut s = PairState::default();
        let t0 = 1_000 * S;
        for i in 0..20 {
            assert_eq!(rule.wait(s, t0 + i), 0, "message {i} of the burst");
            s = rule.take(s, t0 + i);
        }
        // The burst is over when its interval passes: the 20 borrowed intervals are waited out.
        assert_eq!(rule.wait(s, t0 + 7 * S), 120 * S - 7 * S);
        assert_eq!(rule.wait(s, t0 + 120 * S), 0);
    }

    #[test]
    fn a_burst_stops_at_its_size() {
        let rule = PairRule { interval: Duration::from_secs(6), burst: 3 };
        let mut s = PairState::default();
        for _ in 0..3 {
            assert_eq!(rule.wait(s, 10 * S), 0);
            s = rule.take(s, 10 * S);
        }
        assert_eq!(rule.wait(s, 10 * S), 18 * S);
        // Paced to that instant, the next message opens a new burst there.
        s = rule.take(s, 28 * S);
        assert_eq!(s, PairState { tat: 34 * S, burst_start: 28 * S });
    }

    #[test]
    fn meta_refusing_a_pair_closes_its_burst_for_an_interval() {
        let rule = pair();
        let s = rule.penalise(PairState::default(), 50 * S);
        assert_eq!(rule.wait(s, 50 * S), 6 * S);
        assert_eq!(rule.wait(s, 56 * S), 0);
    }

    #[test]
    fn throughput_spaces_messages_and_lets_a_burst_run_ahead() {
        let interval = ThroughputRule::interval(80, false);
        assert_eq!(interval, 12_500);
        assert_eq!(ThroughputRule::interval(80, true), 25_000);
        assert_eq!(ThroughputRule::interval(3, false), 333_334, "rounded up: never faster");
        let burst = Duration::from_millis(25);
        let mut tat = 0;
        let now = 100 * S;
        let mut sent = 0;
        while throughput_wait(tat, now, burst) == 0 {
            tat = throughput_take(tat, now, interval);
            sent += 1;
        }
        assert_eq!(sent, 3, "now, and two more inside 25 ms");
        assert_eq!(throughput_wait(tat, now, burst), 12_500);
    }

    #[test]
    fn pacing_reserves_the_slot_it_waits_for_and_a_denial_takes_nothing() {
        let rates = RateSnapshot { throughput: Some((S + 30_000, 10_000, Duration::ZERO)), pair: None };
        let paced = schedule(&rates, S, 40_000);
        assert_eq!(paced.verdict, Ok(30_000));
        assert_eq!(paced.throughput_tat, Some(S + 40_000));
        let denied = schedule(&rates, S, 20_000);
        assert_eq!(denied.verdict, Err((Reason::ThroughputExceeded, Duration::from_millis(30))));
        assert_eq!((denied.throughput_tat, denied.pair), (None, None));
    }

    #[test]
    fn the_pair_is_named_when_it_alone_is_too_far_off() {
        let s = pair().penalise(PairState::default(), S);
        let rates = RateSnapshot { throughput: Some((S, 10_000, Duration::ZERO)), pair: Some((s, pair())) };
        assert_eq!(schedule(&rates, S, 1_000).verdict, Err((Reason::PairRate, Duration::from_secs(6))));
        // Paced past the pair, the number's slot is taken at the instant the message goes.
        let paced = schedule(&rates, S, 7 * S);
        assert_eq!(paced.verdict, Ok(6 * S));
        assert_eq!(paced.throughput_tat, Some(7 * S + 10_000));
    }

    #[test]
    fn shadow_admits_reports_and_takes_slots_without_waiting() {
        let rates = RateSnapshot { throughput: Some((S + 30_000, 10_000, Duration::ZERO)), pair: None };
        let counted = Outcome { reason: Reason::AlreadyCounted, effect: Effect::Touch, retry_after: None };
        let as_new = (Reason::NewRecipient, Effect::Count);
        let g = govern(Mode::Shadow, &counted, as_new, &rates, S, 0);
        assert_eq!(
            (g.reason, g.effect, g.shadow, g.wait),
            (Reason::AlreadyCounted, Effect::Touch, Some(Reason::ThroughputExceeded), 0)
        );
        assert_eq!(g.schedule.throughput_tat, Some(S + 40_000));
        let limit = Some(Duration::from_secs(60));
        let full = Outcome { reason: Reason::LimitReached, effect: Effect::Nothing, retry_after: limit };
        let g = govern(Mode::Shadow, &full, as_new, &rates, S, 0);
        assert_eq!(
            (g.reason, g.effect, g.shadow, g.retry_after),
            (Reason::NewRecipient, Effect::Count, Some(Reason::LimitReached), None)
        );
        let g = govern(Mode::Enforce, &full, as_new, &rates, S, u64::MAX);
        assert_eq!(
            (g.reason, g.effect, g.retry_after, g.schedule.throughput_tat),
            (Reason::LimitReached, Effect::Nothing, limit, None)
        );
        let g = govern(Mode::Enforce, &counted, as_new, &rates, S, 0);
        assert_eq!(
            (g.reason, g.effect, g.retry_after),
            (Reason::ThroughputExceeded, Effect::Nothing, Some(Duration::from_millis(30)))
        );
    }

    #[test]
    fn a_numbers_level_is_configured_else_learnt_else_the_default() {
        let rule = ThroughputRule { default_mps: 40, burst: Duration::ZERO };
        let on = ThroughputLevels { rule: Some(rule), numbers: [("n1".to_owned(), 1_000)].into() };
        assert_eq!(on.level("n1", Some(20)), 1_000);
        assert_eq!(on.level("n2", Some(20)), 20);
        assert_eq!(on.level("n2", None), 40);
        let off = ThroughputLevels { rule: None, ..on };
        assert_eq!(off.level("n2", None), crate::policy::DEFAULT_THROUGHPUT_MPS, "Meta's default while off");
    }

    #[test]
    fn marketing_is_capped_and_the_rest_goes() {
        assert!(marketing_capped(Category::Marketing, Some(10), 9));
        assert!(marketing_capped(Category::Unspecified, Some(10), 9));
        assert!(!marketing_capped(Category::Utility, Some(10), 9));
        assert!(!marketing_capped(Category::Marketing, Some(10), 10));
    }

    #[test]
    fn meta_codes_map_to_what_tiergate_does_and_others_are_unknown() {
        assert_eq!(MetaError::from_code(130429), MetaError::ThroughputExceeded);
        assert_eq!(MetaError::from_code(131056), MetaError::PairRate);
        assert_eq!(MetaError::from_code(131049), MetaError::MarketingCapped);
        for code in [131026, 131047, 131051, 131053, 131000] {
            assert_eq!(MetaError::from_code(code), MetaError::Undeliverable, "{code}");
        }
        for code in [0, 1, 131048, 131052, 131057, 999_999, u32::MAX] {
            assert_eq!(MetaError::from_code(code), MetaError::Unknown, "{code}");
        }
        let mut codes: Vec<u32> = MetaError::CODES.iter().map(|(c, _)| *c).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), MetaError::CODES.len(), "each code once");
    }
}
