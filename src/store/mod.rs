//! Storage: one async trait, one implementation per backend, picked at start-up.
//!
//! A store holds the rolling windows, service windows and persisted tiers, and applies the
//! [`policy`](crate::policy) rules atomically: one call decides and writes, so sidecars sharing a
//! store never admit more than the limit between them. Stores see keyed hashes of recipients
//! ([`Member`]), never the numbers.

pub mod memory;
pub mod redis;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use std::collections::BTreeMap;

use crate::policy::rate::{PairRule, ThroughputRule};
use crate::policy::{
    Category, Delivery, Lease, Limit, Micros, Mode, Quality, Reason, ScopeKey, SenderStatus, TemplateEvent, Tier,
};

/// A source of "now" for stores that keep their own time; tests inject a manual one.
pub trait Clock: Send + Sync + 'static {
    /// Microseconds since the Unix epoch.
    fn now(&self) -> Micros;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, crate::policy::micros)
    }
}

/// A keyed hash of a recipient (or of a sender and recipient pair), as stored.
pub type Member = Vec<u8>;

/// The rolling windows a store enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// The rolling window of the messaging limit (24 h in Meta's rules).
    pub window: Duration,
    /// How long a customer service window stays open after an inbound message (24 h).
    pub service_window: Duration,
}

impl Default for Windows {
    fn default() -> Self {
        let day = Duration::from_secs(24 * 3600);
        Windows { window: day, service_window: day }
    }
}

/// One message to decide.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdmitOp {
    /// The recipient's keyed hash.
    pub member: Member,
    /// The keyed hash of (sender, recipient), naming its service window; `None` without a sender.
    pub service_member: Option<Member>,
    pub category: Category,
    /// The template the message uses, if it names one.
    pub template: Option<String>,
    /// The sending number, whose status may block it.
    pub sender: Option<String>,
    /// The sender is blocked by configuration.
    pub sender_blocked: bool,
    /// The template's language (`en_US`), if the message names one; without it, the message is
    /// blocked when any language of the template is.
    pub template_language: Option<String>,
    /// The keyed hash of the caller's idempotency key, if it sent one: a retry under a key that
    /// the scope remembers gets the remembered answer back (see
    /// [`policy::Remembered`](crate::policy::Remembered)).
    pub idempotency_key: Option<Member>,
    /// How long the caller will wait for its number's throughput and its pair's rate (pacing);
    /// zero: not at all.
    pub max_wait: Duration,
    /// The sender's throughput level as configured (`[policy.throughput] numbers`), which wins
    /// over the level learnt from Meta.
    pub throughput_mps: Option<u32>,
}

/// Scope-wide parameters of an admission call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitParams {
    /// The tier when none was persisted.
    pub fallback: Tier,
    /// Basis points of the limit kept from marketing to new recipients.
    pub reserve_bp: u32,
    /// The send rates besides the messaging limit.
    pub rates: Rates,
    /// The mode configured for the portfolio; one set by UpdatePortfolio wins.
    pub mode: Mode,
}

impl AdmitParams {
    /// Parameters enforcing the messaging limit only: no rate rules, enforce mode.
    pub fn new(fallback: Tier, reserve_bp: u32) -> AdmitParams {
        AdmitParams { fallback, reserve_bp, rates: Rates::default(), mode: Mode::Enforce }
    }
}

/// The rules on send rates, each `None` when off. They apply to messages that name a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    pub throughput: Option<ThroughputRule>,
    pub pair: Option<PairRule>,
}

/// One day in microseconds.
pub const DAY_US: Micros = 86_400_000_000;

/// Days of daily unique-recipient counts a store keeps: the longest count (30 days) reads them.
pub const DAYS_KEPT: u64 = 30;

/// Days since the Unix epoch (UTC) of a time; daily unique-recipient counts are keyed by it.
pub fn day_of(t: Micros) -> u64 {
    t / DAY_US
}

/// When a reported event happened, by the store's clock at `now`: `now` when the report gives
/// no time, and never later than `now` (a clock ahead of the store's cannot date it later).
pub fn event_time(at: Option<Micros>, now: Micros) -> Micros {
    at.unwrap_or(now).min(now)
}

/// The state of one limit scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSnapshot {
    /// The tier in force: persisted by `set_tier`, or the fallback passed in.
    pub tier: Tier,
    /// Recipients counted in the rolling window (on every tier, unlimited ones too).
    pub counted: u64,
    /// When the oldest counted recipient leaves the window.
    pub next_slot_at: Option<Micros>,
}

impl UsageSnapshot {
    /// Recipients that can still be added now (`None` when unlimited).
    pub fn remaining(&self) -> Option<u64> {
        match self.tier.limit {
            Limit::Limited(n) => Some(n.saturating_sub(self.counted)),
            Limit::Unlimited => None,
        }
    }
}

/// Everything a store knows about one scope's usage, for GetUsage and upgrade projections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeReport {
    pub usage: UsageSnapshot,
    /// Unique recipients reached outside service windows and confirmed delivered over the last
    /// 7 and 30 days (HyperLogLog estimates on Redis).
    pub unique_7d: u64,
    pub unique_30d: u64,
    /// When the persisted tier last changed.
    pub tier_since: Option<Micros>,
    /// Simulation: when the scope became eligible for an upgrade.
    pub eligible_since: Option<Micros>,
    /// Simulation: since when the scope has been counted as flagged.
    pub flagged_since: Option<Micros>,
    /// The store's clock.
    pub now: Micros,
}

/// What is known of one sending number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SenderState {
    pub status: Option<SenderStatus>,
    pub quality: Quality,
    /// When the status last changed.
    pub since: Option<Micros>,
    /// Messages per second Meta allows the number, when reported (`None`: Meta's default).
    pub throughput_mps: Option<u32>,
    /// Until when the number sends at a reduced rate after Meta reported its throughput exceeded.
    pub throughput_backoff_until: Option<Micros>,
}

/// A template as Meta pauses and rates it: a name in one language, or (`language` empty) the
/// name in every language.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TemplateKey {
    pub name: String,
    /// Meta's language code (`en_US`); empty for what was set for every language of the name.
    pub language: String,
}

impl TemplateKey {
    /// The key of `name` in `language` (empty: every language).
    pub fn new(name: &str, language: &str) -> TemplateKey {
        TemplateKey { name: name.to_owned(), language: language.to_owned() }
    }
}

/// What is known of one template in one language (or in every language).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TemplateState {
    /// Meta's last status event (APPROVED, PAUSED, DISABLED, …).
    pub status: Option<String>,
    pub quality: Quality,
    /// When that status event happened.
    pub at: Option<Micros>,
}

impl TemplateState {
    /// The last status event, as the template rules read it.
    pub fn event(&self) -> Option<TemplateEvent<'_>> {
        self.status.as_deref().map(|status| TemplateEvent { status, at: self.at.unwrap_or(0) })
    }
}

/// Everything persisted about a portfolio besides its windows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortfolioState {
    /// The portfolio's own quality rating, when one was set.
    pub quality: Quality,
    pub senders: BTreeMap<String, SenderState>,
    /// By (name, language); the name-wide entries have an empty language.
    pub templates: BTreeMap<TemplateKey, TemplateState>,
    /// Account alerts by their identity, newest contents.
    pub alerts: BTreeMap<String, String>,
    /// Display phone number → phone number id, learnt from webhooks.
    pub aliases: BTreeMap<String, String>,
    /// Recipients opted out.
    pub opted_out: u64,
    /// The mode set by UpdatePortfolio, winning over the configured one.
    pub mode: Option<Mode>,
}

/// One change to persisted state. A list of them is applied atomically and is idempotent:
/// applying the same list twice leaves the same state (a template status without a time is
/// dated each apply's now, so only that date moves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The scope's tier; its `since` moves to now when the name changes. `at` is when the event
    /// happened (now when `None`): a change older than the last one applied is skipped, so a
    /// late retry of an old webhook cannot undo a newer change.
    Tier {
        scope: ScopeKey,
        tier: Tier,
        at: Option<Micros>,
    },
    /// Simulation bookkeeping of a scope.
    Eligible {
        scope: ScopeKey,
        since: Option<Micros>,
    },
    Flagged {
        scope: ScopeKey,
        since: Option<Micros>,
    },
    Quality(Quality),
    /// A number's status; its `since` moves to now when the status changes. `at` as for `Tier`.
    SenderStatus {
        sender: String,
        status: SenderStatus,
        at: Option<Micros>,
    },
    SenderQuality {
        sender: String,
        quality: Quality,
    },
    /// A template's status event in one language, or in every language when `language` is empty
    /// (see [`policy::template_status_in_force`](crate::policy::template_status_in_force)); `at`
    /// as for `Tier`, per (name, language).
    TemplateStatus {
        name: String,
        language: String,
        status: String,
        at: Option<Micros>,
    },
    /// A template's quality in one language (empty: the name's own rating).
    TemplateQuality {
        name: String,
        language: String,
        quality: Quality,
    },
    OptOut {
        member: Member,
        opted_out: bool,
    },
    Alert {
        key: String,
        body: String,
    },
    Alias {
        display: String,
        id: String,
    },
    /// An inbound message at `at` (now when `None`; never later than now) opens the service
    /// window until `at + service_window`; a later window already open is kept.
    Inbound {
        service_member: Member,
        at: Option<Micros>,
    },
    /// A number's throughput level (messages per second), which is not a messaging limit.
    Throughput {
        sender: String,
        mps: u32,
    },
    /// A message the number received or sent outside tiergate's Admit, at `at` (now when `None`;
    /// never later than now): it takes a slot of the number's throughput, as Meta counts it.
    Traffic {
        sender: String,
        rule: ThroughputRule,
        /// The number's configured level, as [`AdmitOp::throughput_mps`].
        configured_mps: Option<u32>,
        at: Option<Micros>,
    },
    /// Meta reported the number's throughput exceeded (error 130429) at `at`: it sends at a
    /// reduced rate until [`THROUGHPUT_BACKOFF`](crate::policy::rate::THROUGHPUT_BACKOFF) after.
    ThroughputBackoff {
        sender: String,
        at: Option<Micros>,
    },
    /// Meta refused a message to a (number, user) pair for its rate (error 131056) at `at`: the
    /// pair (`pair`, the keyed hash of the service window) waits an interval.
    PairBackoff {
        pair: Member,
        rule: PairRule,
        at: Option<Micros>,
    },
    /// Meta's per-user marketing limit refused marketing to a recipient (error 131049) at `at`:
    /// marketing to them is denied from every number of the portfolio for
    /// [`MARKETING_CAPPED_FOR`](crate::policy::rate::MARKETING_CAPPED_FOR).
    MarketingCapped {
        member: Member,
        at: Option<Micros>,
    },
    /// The portfolio's mode; `None` goes back to the configured one.
    Mode(Option<Mode>),
    /// Meta's delivery status of a message to a recipient of a scope, reported at `at` (now when
    /// `None`; never later than now). See [`policy::Delivery`](crate::policy::Delivery) for what
    /// each status does to the window and to the 7- and 30-day counts.
    Delivery {
        scope: ScopeKey,
        member: Member,
        status: Delivery,
        at: Option<Micros>,
    },
}

/// The store's answer for one [`AdmitOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub reason: Reason,
    /// For a counted recipient on a limited tier: the contact to name in a lease.
    pub lease_score: Option<Micros>,
    pub retry_after: Option<Duration>,
    /// The scope's usage right after this decision.
    pub usage: UsageSnapshot,
    /// The store's clock when it decided (the same for every message of one call).
    pub now: Micros,
    /// Set when the answer was replayed under the op's idempotency key instead of decided: the
    /// recipient the remembered decision named, whom the lease names (it may not be the op's).
    /// Nothing was written for it.
    pub replay_of: Option<Member>,
    /// Pacing: the message took the slots it waits for, and goes this long after `now`.
    pub wait: Duration,
    /// In shadow mode: what enforcing would have answered.
    pub shadow: Option<Reason>,
}

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer in time or the connection is down; worth retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something that makes no sense; not worth retrying.
    #[error("store error: {0}")]
    Internal(String),
    /// This sidecar refuses to use the store until an operator acts: its configuration differs
    /// from the policy shared through the store (see [`shared_policy`](crate::shared_policy)).
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The storage trait every backend implements; the conformance suite in `tests/` checks them.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Decides `ops` in order within one scope, as if sent one after another, atomically. An op
    /// with an idempotency key that the scope remembers and that still replays gets the
    /// remembered answer and writes nothing; otherwise a decision under a key that writes is
    /// remembered until its contact leaves the window, and one that writes nothing forgets the
    /// key ([`policy::Remembered`](crate::policy::Remembered)).
    async fn admit(
        &self,
        scope: &ScopeKey,
        params: &AdmitParams,
        ops: &[AdmitOp],
    ) -> Result<Vec<Admission>, StoreError>;

    /// Undoes the contact a lease names, if it is still the recipient's latest; returns whether it did.
    async fn release(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// Applies `changes` to `portfolio` atomically; returns the store's clock at that moment.
    async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, StoreError>;

    /// The scope's usage now, with what upgrade projections need.
    async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<ScopeReport, StoreError>;

    /// Everything persisted about a portfolio.
    async fn portfolio(&self, portfolio: &str) -> Result<PortfolioState, StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// A short name for logs and metrics.
    fn backend(&self) -> &'static str;

    /// The [shared policy](crate::shared_policy) recorded in the store: records `policy` first
    /// when none is (always, with `replace`), atomically, and returns what is recorded then.
    async fn shared_policy(&self, policy: &str, replace: bool) -> Result<String, StoreError>;
}
