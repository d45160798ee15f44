//! The messaging-limit rules, pure: no I/O and no clock reads; every time is passed in.
//!
//! A business may reach at most `limit` unique recipients with business-initiated messages in any
//! rolling window (24 h by Meta's rules). A recipient already counted in the window costs nothing
//! more; a message inside the (sender, recipient) customer service window counts nothing; only
//! delivered messages count, so a failed send gives its slot back through its lease.
//!
//! Stores gather a [`Snapshot`] of one recipient in one limit scope, call [`decide`], and apply
//! the returned [`Effect`] in the same atomic step. The Redis store's Lua scripts carry the same
//! rules; the conformance suite in `tests/` holds both to them.

use std::fmt;
use std::time::Duration;

pub mod rate;

use serde::Deserialize;

use crate::error::quote;

/// Microseconds since the Unix epoch. Every store time is one of these.
pub type Micros = u64;

/// Converts a duration to whole microseconds, saturating.
pub fn micros(d: Duration) -> Micros {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What kind of message the sender is about to send (Meta's pricing categories).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Category {
    #[default]
    Unspecified,
    Marketing,
    Utility,
    Authentication,
    Service,
}

impl Category {
    /// Whether the marketing rules apply: a message without a category may be marketing.
    pub fn may_be_marketing(self) -> bool {
        matches!(self, Category::Marketing | Category::Unspecified)
    }
}

/// The answer to an admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admitted,
    Denied,
}

/// Why a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Admitted and counted: the recipient was not in the rolling window.
    NewRecipient,
    /// Admitted free: the recipient is already counted in the rolling window.
    AlreadyCounted,
    /// Admitted free: the (sender, recipient) customer service window is open.
    ServiceWindow,
    /// Denied: the scope has reached its limit.
    LimitReached,
    /// Denied: the recipient opted out of business-initiated messages from this business.
    OptedOut,
    /// Denied: the named template is not active (paused, disabled, …).
    TemplateBlocked,
    /// Denied: the rest of the limit is kept for non-marketing traffic (`policy.reserve`).
    HeadroomReserved,
    /// Denied: the sender is banned or configured as blocked.
    SenderBlocked,
    /// Denied: a free-form (SERVICE) message needs an open service window.
    OutsideServiceWindow,
    /// Admitted without a check because the store could not answer and `store.on_error = "allow"`.
    StoreUnavailable,
    /// Denied: the sending number's throughput is used up for now (Meta's error 130429).
    ThroughputExceeded,
    /// Denied: this number messaged this user too often lately (Meta's error 131056).
    PairRate,
    /// Denied: Meta's per-user marketing limit refused marketing to this user (error 131049), so
    /// marketing to them waits a day.
    RecipientMarketingCapped,
}

impl Reason {
    /// The decision this reason belongs to.
    pub fn decision(self) -> Decision {
        match self {
            Reason::NewRecipient | Reason::AlreadyCounted | Reason::ServiceWindow | Reason::StoreUnavailable => {
                Decision::Admitted
            }
            Reason::LimitReached
            | Reason::OptedOut
            | Reason::TemplateBlocked
            | Reason::HeadroomReserved
            | Reason::SenderBlocked
            | Reason::OutsideServiceWindow
            | Reason::ThroughputExceeded
            | Reason::PairRate
            | Reason::RecipientMarketingCapped => Decision::Denied,
        }
    }

    /// Stable lower-case name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NewRecipient => "new_recipient",
            Reason::AlreadyCounted => "already_counted",
            Reason::ServiceWindow => "service_window",
            Reason::LimitReached => "limit_reached",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::OptedOut => "opted_out",
            Reason::TemplateBlocked => "template_blocked",
            Reason::HeadroomReserved => "headroom_reserved",
            Reason::SenderBlocked => "sender_blocked",
            Reason::OutsideServiceWindow => "outside_service_window",
            Reason::ThroughputExceeded => "throughput_exceeded",
            Reason::PairRate => "pair_rate",
            Reason::RecipientMarketingCapped => "recipient_marketing_capped",
        }
    }
}

/// Stable wire codes: the `tiergate.v1.Category` and `tiergate.v1.Reason` numbers, which the Redis
/// store's Lua scripts also speak. A unit test in `store::redis` holds them to the protobuf.
impl Category {
    /// Every category, in code order.
    pub const ALL: [Category; 5] =
        [Category::Unspecified, Category::Marketing, Category::Utility, Category::Authentication, Category::Service];

    /// The category's wire code (`tiergate.v1.Category`).
    pub fn code(self) -> i32 {
        match self {
            Category::Unspecified => 0,
            Category::Marketing => 1,
            Category::Utility => 2,
            Category::Authentication => 3,
            Category::Service => 4,
        }
    }

    /// The category with this wire code, if any.
    pub fn from_code(code: i64) -> Option<Category> {
        Category::ALL.into_iter().find(|c| i64::from(c.code()) == code)
    }

    /// Stable lower-case name, as [`Reason::as_str`].
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Unspecified => "unspecified",
            Category::Marketing => "marketing",
            Category::Utility => "utility",
            Category::Authentication => "authentication",
            Category::Service => "service",
        }
    }
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 13] = [
        Reason::NewRecipient,
        Reason::AlreadyCounted,
        Reason::ServiceWindow,
        Reason::LimitReached,
        Reason::OptedOut,
        Reason::TemplateBlocked,
        Reason::HeadroomReserved,
        Reason::SenderBlocked,
        Reason::OutsideServiceWindow,
        Reason::StoreUnavailable,
        Reason::ThroughputExceeded,
        Reason::PairRate,
        Reason::RecipientMarketingCapped,
    ];

    /// The reason's wire code (`tiergate.v1.Reason`).
    pub fn code(self) -> i32 {
        match self {
            Reason::NewRecipient => 1,
            Reason::AlreadyCounted => 2,
            Reason::ServiceWindow => 3,
            Reason::LimitReached => 4,
            Reason::OptedOut => 5,
            Reason::TemplateBlocked => 6,
            Reason::HeadroomReserved => 7,
            Reason::SenderBlocked => 8,
            Reason::OutsideServiceWindow => 9,
            Reason::StoreUnavailable => 10,
            Reason::ThroughputExceeded => 12,
            Reason::PairRate => 13,
            Reason::RecipientMarketingCapped => 14,
        }
    }

    /// The reason with this wire code, if any.
    pub fn from_code(code: i64) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| i64::from(r.code()) == code)
    }
}

impl Decision {
    /// Stable lower-case name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Admitted => "admitted",
            Decision::Denied => "denied",
        }
    }
}

/// How many unique recipients a tier allows in the rolling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Limited(u64),
    Unlimited,
}

impl Limit {
    /// The limit as the stores encode it: `-1` for unlimited.
    pub fn to_i64(self) -> i64 {
        match self {
            Limit::Limited(n) => i64::try_from(n).unwrap_or(i64::MAX),
            Limit::Unlimited => -1,
        }
    }

    /// Decodes [`Limit::to_i64`].
    pub fn from_i64(n: i64) -> Limit {
        u64::try_from(n).map_or(Limit::Unlimited, Limit::Limited)
    }
}

/// A named level of a tier ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    pub limit: Limit,
}

impl Tier {
    /// A tier with a finite limit.
    pub fn limited(name: &str, limit: u64) -> Tier {
        Tier { name: name.to_owned(), limit: Limit::Limited(limit) }
    }

    /// A tier without a limit.
    pub fn unlimited(name: &str) -> Tier {
        Tier { name: name.to_owned(), limit: Limit::Unlimited }
    }
}

/// The ordered tiers a business moves through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ladder {
    tiers: Vec<Tier>,
}

/// Names of the built-in ladders.
pub const LADDER_PRESETS: [&str; 2] = ["meta-2025", "legacy"];

/// The longest tier name, in bytes, of a ladder or a request.
pub const MAX_TIER_NAME_LEN: usize = 128;

impl Ladder {
    /// Meta's portfolio-wide ladder from October 2025: 250 → 2K → 10K → 100K → unlimited.
    pub fn meta_2025() -> Ladder {
        Ladder {
            tiers: vec![
                Tier::limited("TIER_250", 250),
                Tier::limited("TIER_2K", 2_000),
                Tier::limited("TIER_10K", 10_000),
                Tier::limited("TIER_100K", 100_000),
                Tier::unlimited("TIER_UNLIMITED"),
            ],
        }
    }

    /// The older per-number ladder: 1K → 10K → 100K → unlimited.
    pub fn legacy() -> Ladder {
        Ladder {
            tiers: vec![
                Tier::limited("TIER_1K", 1_000),
                Tier::limited("TIER_10K", 10_000),
                Tier::limited("TIER_100K", 100_000),
                Tier::unlimited("TIER_UNLIMITED"),
            ],
        }
    }

    /// A built-in ladder by name.
    pub fn preset(name: &str) -> Option<Ladder> {
        match name {
            "meta-2025" => Some(Ladder::meta_2025()),
            "legacy" => Some(Ladder::legacy()),
            _ => None,
        }
    }

    /// A custom ladder; names must be unique and non-empty, and there must be at least one tier.
    pub fn custom(tiers: Vec<Tier>) -> Result<Ladder, String> {
        if tiers.is_empty() {
            return Err("a ladder needs at least one tier".into());
        }
        for (i, t) in tiers.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(format!("tier #{} has an empty name", i + 1));
            }
            if t.name.len() > MAX_TIER_NAME_LEN {
                return Err(format!(
                    "tier #{} has a name of {} bytes; at most {MAX_TIER_NAME_LEN}",
                    i + 1,
                    t.name.len()
                ));
            }
            if tiers[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("tier name {} appears twice", quote(&t.name)));
            }
            if t.limit == Limit::Limited(0) {
                return Err(format!("tier {} has limit 0; omit `limit` for unlimited", quote(&t.name)));
            }
        }
        Ok(Ladder { tiers })
    }

    /// The tier with this name.
    pub fn get(&self, name: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// The tiers, lowest first.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// All tier names, for error messages.
    pub fn names(&self) -> String {
        self.tiers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// Whom a messaging limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeMode {
    /// Today's rule: one limit shared by every phone number of the business portfolio.
    #[default]
    Portfolio,
    /// The legacy rule: each phone number has its own limit.
    PhoneNumber,
}

/// One limit scope: a portfolio, or one number of it in per-number scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeKey {
    pub portfolio: String,
    /// Set only in per-number scope.
    pub sender: Option<String>,
}

impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sender {
            Some(s) => write!(f, "{}/{}", self.portfolio, s),
            None => f.write_str(&self.portfolio),
        }
    }
}

/// Checks a portfolio or sender id: 1–128 characters of `[A-Za-z0-9_.:-]`.
pub fn validate_id(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 128 {
        return Err(format!("is {} characters long; at most 128 are allowed", value.len()));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || "_.:-".contains(*c))) {
        return Err(format!("contains {c:?}; only A-Z, a-z, 0-9 and _ . : - are allowed"));
    }
    Ok(())
}

/// The longest recipient accepted as written, in bytes: room for any phone number with its
/// spaces, dashes and parentheses, and for a business-scoped user id.
pub const MAX_RECIPIENT_LEN: usize = 128;

/// Normalises a recipient to the form that is hashed: a phone number becomes its 7–15 digits
/// (`+` or the international prefix `00`, spaces, dashes and parentheses allowed around them),
/// so every way of writing one number opts out and counts as one user; a business-scoped user id
/// (`CC.digits`, e.g. `US.13491208655302741918`) keeps its upper-case country code.
///
/// The error message never repeats the input, so it is safe to return to a client or log.
pub fn normalize_recipient(raw: &str) -> Result<String, String> {
    if raw.len() > MAX_RECIPIENT_LEN {
        return Err(format!("is {} bytes long; at most {MAX_RECIPIENT_LEN} are allowed", raw.len()));
    }
    let s = raw.trim();
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if let Some((cc, id)) = s.split_once('.') {
        let cc_ok = cc.len() == 2 && cc.bytes().all(|b| b.is_ascii_alphabetic());
        let id_ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit());
        if cc_ok && id_ok {
            return Ok(format!("{}.{}", cc.to_ascii_uppercase(), id));
        }
        return Err("is neither a phone number nor a business-scoped user id (CC.digits)".into());
    }
    let mut digits = String::with_capacity(15);
    for (i, c) in s.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => {}
            ' ' | '-' | '(' | ')' => {}
            _ => {
                return Err(
                    "is not a phone number: only digits, a leading +, spaces, dashes and parentheses are allowed"
                        .into(),
                )
            }
        }
    }
    // `00` is the international call prefix, written where `+` would be: `00447700900123` is
    // `+447700900123`. No country code starts with 0, so a leading `00` is never the number's.
    let digits = digits.strip_prefix("00").map(str::to_owned).unwrap_or(digits);
    if !(7..=15).contains(&digits.len()) {
        return Err(format!("has {} digits; a phone number has 7 to 15", digits.len()));
    }
    Ok(digits)
}

/// What a store knows about one message at the instant of its decision, after contacts older
/// than the rolling window have been dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The sender is BANNED or configured as blocked.
    pub sender_blocked: bool,
    /// The message names a template whose status is not active.
    pub template_blocked: bool,
    /// The recipient opted out of this business's messages.
    pub opted_out: bool,
    /// Meta's per-user marketing limit refused marketing to the recipient within the last day
    /// ([`rate::MARKETING_CAPPED_FOR`]).
    pub marketing_capped: bool,
    /// The (sender, recipient) customer service window is open.
    pub service_window_open: bool,
    /// The recipient is counted in the rolling window.
    pub already_counted: bool,
    /// Recipients counted in the rolling window.
    pub counted: u64,
}

/// The limit of a scope and the part of it marketing may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub limit: Limit,
    /// Marketing to new recipients stops once this many are counted (see [`marketing_cap`]).
    pub marketing_cap: Option<u64>,
}

impl Limits {
    /// The limits of a tier with `reserve_bp` basis points kept for non-marketing traffic.
    pub fn new(limit: Limit, reserve_bp: u32) -> Limits {
        Limits { limit, marketing_cap: marketing_cap(limit, reserve_bp) }
    }
}

/// Marketing to new recipients is denied once counted recipients reach
/// `limit × (1 − reserve)`, so OTPs and utility messages never starve behind a campaign. The
/// reserve is in basis points (0.1 = 1,000) so the threshold is exact: ⌈limit × (10,000 − bp) /
/// 10,000⌉. `None` when nothing is reserved or the tier is unlimited.
pub fn marketing_cap(limit: Limit, reserve_bp: u32) -> Option<u64> {
    match limit {
        Limit::Limited(n) if reserve_bp > 0 => {
            let keep = u128::from(10_000u32.saturating_sub(reserve_bp));
            Some(u64::try_from((u128::from(n) * keep).div_ceil(10_000)).unwrap_or(u64::MAX))
        }
        _ => None,
    }
}

/// What the store must write for a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Write nothing.
    Nothing,
    /// Move the recipient's last contact to now.
    Touch,
    /// Count the recipient now, and hand out a lease for it.
    Count,
}

/// A decision and what it takes to apply it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub reason: Reason,
    pub effect: Effect,
    /// For [`Reason::LimitReached`] and [`Reason::HeadroomReserved`]: how long until enough
    /// counted recipients have left the window for this message to be admitted.
    pub retry_after: Option<Duration>,
}

/// The smallest `retry_after` ever returned: a full window never says "retry now".
pub const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// Decides one message, in this order:
///
/// 1. A BANNED or blocked sender may send nothing (Meta would refuse it).
/// 2. A template that is not active may not be sent (Meta would refuse it).
/// 3. An opted-out recipient gets nothing outside a service window, and no marketing inside one.
///    (A message without a category may be marketing, so here and at step 7 it counts as one.)
///    Nor does a recipient Meta's per-user marketing limit capped get marketing, for a day.
/// 4. An open service window admits the message and counts nothing.
/// 5. A free-form (SERVICE) message needs that window: without it, Meta would reject the send,
///    so it must not take a slot.
/// 6. A recipient already counted is admitted; its last contact moves to now.
/// 7. Marketing to a new recipient stops at the marketing cap (the reserve is for the rest).
/// 8. An unlimited tier, or a window with room, admits and counts the recipient.
/// 9. Otherwise it is denied until the window has room.
///
/// A denial at step 7 or 9 waits until the count drops below the cap or limit it hit: with
/// `counted` recipients and a threshold of `t`, that is when the contact at rank `counted − t`
/// (0 = the oldest) leaves the window. The count can be above the threshold (after a downgrade,
/// or between the marketing cap and the limit), so it is not always the oldest that frees room.
/// `nth_oldest(k)` gives the last-contact score of the counted recipient at rank `k`; it is asked
/// only for such a denial.
pub fn decide(
    s: &Snapshot,
    category: Category,
    limits: Limits,
    now: Micros,
    window: Duration,
    nth_oldest: impl FnOnce(u64) -> Option<Micros>,
) -> Outcome {
    let outcome = |reason, effect| Outcome { reason, effect, retry_after: None };
    let full = |reason, threshold: u64| {
        let leaving = nth_oldest(s.counted.saturating_sub(threshold));
        Outcome { reason, effect: Effect::Nothing, retry_after: Some(retry_after(leaving, now, window)) }
    };
    if s.sender_blocked {
        return outcome(Reason::SenderBlocked, Effect::Nothing);
    }
    if s.template_blocked {
        return outcome(Reason::TemplateBlocked, Effect::Nothing);
    }
    if s.opted_out && (!s.service_window_open || category.may_be_marketing()) {
        return outcome(Reason::OptedOut, Effect::Nothing);
    }
    if s.marketing_capped && category.may_be_marketing() {
        return outcome(Reason::RecipientMarketingCapped, Effect::Nothing);
    }
    if s.service_window_open {
        return outcome(Reason::ServiceWindow, Effect::Nothing);
    }
    if category == Category::Service {
        return outcome(Reason::OutsideServiceWindow, Effect::Nothing);
    }
    if s.already_counted {
        return outcome(Reason::AlreadyCounted, Effect::Touch);
    }
    if let Some(cap) = limits.marketing_cap.filter(|cap| category.may_be_marketing() && s.counted >= *cap) {
        return full(Reason::HeadroomReserved, cap);
    }
    match limits.limit {
        Limit::Limited(n) if s.counted >= n => full(Reason::LimitReached, n),
        _ => outcome(Reason::NewRecipient, Effect::Count),
    }
}

/// What the messaging-limit rules answer for a message with every denial lifted, as shadow mode
/// admits it ([`rate::govern`]): free in an open service window, else counted.
pub fn admitted_as(s: &Snapshot) -> (Reason, Effect) {
    if s.service_window_open {
        (Reason::ServiceWindow, Effect::Nothing)
    } else if s.already_counted {
        (Reason::AlreadyCounted, Effect::Touch)
    } else {
        (Reason::NewRecipient, Effect::Count)
    }
}

/// Whether a portfolio's decisions are enforced or only reported (`policy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Denials deny.
    #[default]
    Enforce,
    /// Every rule is evaluated and reported, and every message admitted.
    Shadow,
}

impl Mode {
    /// Stable lower-case name, as in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }

    /// The mode with this name, if any.
    pub fn parse(s: &str) -> Option<Mode> {
        [Mode::Enforce, Mode::Shadow].into_iter().find(|m| m.as_str() == s)
    }
}

/// Template statuses that may be sent: approved or reinstated, and FLAGGED, which Meta sends when
/// an active template's quality turns low (it stays sendable until Meta pauses or disables it).
/// A template tiergate has never heard of is assumed active: only Meta's own word (a webhook, or
/// UpdatePortfolio) blocks one.
pub const ACTIVE_TEMPLATE_STATUSES: [&str; 4] = ["APPROVED", "REINSTATED", "ACTIVE", "FLAGGED"];

/// Whether a template with this status (if any is known) may be sent.
pub fn template_active(status: Option<&str>) -> bool {
    status.is_none_or(|s| ACTIVE_TEMPLATE_STATUSES.contains(&s))
}

/// A template's last status event as stored: Meta's status and when the event happened (0 when
/// unknown, as for a status stored before event times were kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateEvent<'a> {
    pub status: &'a str,
    pub at: Micros,
}

/// The status in force for one (name, language) of a template.
///
/// Meta pauses, disables and rates each (name, language) separately, so each keeps its own last
/// event (`own`). A status set without a language (`every_language`: UpdatePortfolio with
/// `language = ""`, or a status stored by name before languages were kept) applies to every
/// language of the name. Both are kept, each skipping events older than its last, and the newer
/// event (by `at`) is in force; on a tie the language's own wins, being the more specific, so one
/// UpdatePortfolio can pause a name but for one language.
pub fn template_status_in_force<'a>(
    own: Option<TemplateEvent<'a>>,
    every_language: Option<TemplateEvent<'a>>,
) -> Option<&'a str> {
    match (own, every_language) {
        (Some(own), Some(every)) if every.at > own.at => Some(every.status),
        (Some(own), _) => Some(own.status),
        (None, every) => every.map(|e| e.status),
    }
}

/// Whether a message using one language of a template may be sent: the status in force for
/// that (name, language) is active (see [`template_status_in_force`]).
pub fn template_language_sendable(own: Option<TemplateEvent<'_>>, every_language: Option<TemplateEvent<'_>>) -> bool {
    template_active(template_status_in_force(own, every_language))
}

/// Whether a message naming a template but no language may be sent. It may be in any language,
/// so it is blocked when any language of the name is: one whose status in force (among
/// `languages`, the own events of the languages heard of) is not active, or the name-wide
/// status, which stands for the languages never heard of separately.
pub fn template_name_sendable<'a>(
    every_language: Option<TemplateEvent<'a>>,
    languages: impl IntoIterator<Item = TemplateEvent<'a>>,
) -> bool {
    template_active(every_language.map(|e| e.status))
        && languages.into_iter().all(|own| template_language_sendable(Some(own), every_language))
}

/// How long until a contact made at `score` leaves the window (a whole window when there is no
/// such contact: nothing counted will free room); never less than [`MIN_RETRY_AFTER`], since the
/// caller only asks while the window is full.
pub fn retry_after(score: Option<Micros>, now: Micros, window: Duration) -> Duration {
    let leaves_at = score.unwrap_or(now).saturating_add(micros(window));
    Duration::from_micros(leaves_at.saturating_sub(now)).max(MIN_RETRY_AFTER)
}

/// What Meta reported of a message (`statuses[].status` of a `messages` webhook); `sent` changes
/// nothing, so it has no variant.
///
/// Only delivered messages count:
/// - `delivered` (or `read`) confirms the recipient. A recipient counted in the window (reached
///   outside a service window) and confirmed enters the day's unique count, so the 7- and 30-day
///   counts behind the upgrade projection hold only recipients Meta delivered to.
/// - `failed` gives the recipient's slot back (see [`failure_gives_back`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Delivery {
    Delivered,
    Failed,
}

/// Whether a `failed` status reported at `failed_at` gives back the slot of a recipient whose
/// last counted contact is `contact` (`None`: not counted) and who was last confirmed delivered
/// at `delivered` (`None`: never), at `now`. It does unless the recipient is not counted, a
/// message to them was delivered inside the current window (the slot is rightly spent), or a
/// later Admit counted them again (its message may still be delivered). Applying the same
/// failure twice gives nothing back the second time: the contact is gone.
pub fn failure_gives_back(
    contact: Option<Micros>,
    delivered: Option<Micros>,
    failed_at: Micros,
    now: Micros,
    window: Duration,
) -> bool {
    let start = window_start(now, window);
    let counted = contact.is_some_and(|c| c > start && c <= failed_at);
    let delivered_in_window = delivered.is_some_and(|d| d > start);
    counted && !delivered_in_window
}

/// The score a store gives a contact made at `now`: strictly greater than every score handed out
/// before in the same scope (`last`), so a lease names exactly one Admit even when two fall in
/// the same microsecond.
pub fn next_score(now: Micros, last: Micros) -> Micros {
    now.max(last.saturating_add(1))
}

/// Counted contacts older than this leave the rolling window at `now`.
pub fn window_start(now: Micros, window: Duration) -> Micros {
    now.saturating_sub(micros(window))
}

/// What an Admit's idempotency key remembers of the last decision made under it in its scope,
/// when that decision wrote to the window ([`Effect::Count`] or [`Effect::Touch`]); a decision
/// under the key that wrote nothing forgets it.
///
/// A retry under the key gets that answer back instead of a new decision while
/// [`Remembered::replays`] says so: the same reason, and for [`Reason::NewRecipient`] the same
/// lease, with nothing written. A retry that names another recipient gets it too: the key wins.
/// Denials and service-window admissions took nothing, so a retry of one is decided again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub reason: Reason,
    /// The recipient that decision named, whom its lease names.
    pub member: Vec<u8>,
    /// The contact it counted or touched; for [`Reason::NewRecipient`], the lease's score.
    pub score: Micros,
}

impl Remembered {
    /// What a key remembers of a decision for `member` that wrote the contact `written` (`None`:
    /// it wrote nothing, and the key forgets what it remembered).
    pub fn of(reason: Reason, member: &[u8], written: Option<Micros>) -> Option<Remembered> {
        written.map(|score| Remembered { reason, member: member.to_vec(), score })
    }

    /// Whether a retry at `now` gets this answer back: while the contact is inside the window and
    /// its recipient is still counted (`counted`). Once Release or a failed delivery gave the
    /// slot back, the retry is decided again, so a message that is then sent is counted.
    pub fn replays(&self, now: Micros, window: Duration, counted: bool) -> bool {
        counted && self.score > window_start(now, window)
    }

    /// The lease score a replay carries: the first Admit's, when it counted a new recipient.
    pub fn lease_score(&self) -> Option<Micros> {
        (self.reason == Reason::NewRecipient).then_some(self.score)
    }
}

/// A quality rating, from user feedback over the last 7 days (Meta: GREEN / YELLOW / RED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Quality {
    #[default]
    Unknown,
    Low,
    Medium,
    High,
}

impl Quality {
    /// Parses `HIGH`/`MEDIUM`/`LOW`/`UNKNOWN` or Meta's `GREEN`/`YELLOW`/`RED` (any case).
    pub fn parse(s: &str) -> Option<Quality> {
        match s.to_ascii_uppercase().as_str() {
            "HIGH" | "GREEN" => Some(Quality::High),
            "MEDIUM" | "YELLOW" => Some(Quality::Medium),
            "LOW" | "RED" => Some(Quality::Low),
            "UNKNOWN" | "NA" => Some(Quality::Unknown),
            _ => None,
        }
    }

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::High => "HIGH",
            Quality::Medium => "MEDIUM",
            Quality::Low => "LOW",
            Quality::Unknown => "UNKNOWN",
        }
    }

    /// The quality of a business: the lowest known rating among its own and its numbers'.
    pub fn overall(ratings: impl IntoIterator<Item = Quality>) -> Quality {
        ratings.into_iter().filter(|q| *q != Quality::Unknown).min().unwrap_or(Quality::Unknown)
    }
}

/// A phone number's status with Meta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SenderStatus {
    #[default]
    Connected,
    Pending,
    Offline,
    /// Quality is low (legacy rules: 7 days flagged drops one tier).
    Flagged,
    /// Derived, never stored: the scope's window is full, so only replies may go out.
    Restricted,
    Banned,
}

impl SenderStatus {
    /// Parses a status name (any case).
    pub fn parse(s: &str) -> Option<SenderStatus> {
        match s.to_ascii_uppercase().as_str() {
            "CONNECTED" => Some(SenderStatus::Connected),
            "PENDING" => Some(SenderStatus::Pending),
            "OFFLINE" => Some(SenderStatus::Offline),
            "FLAGGED" => Some(SenderStatus::Flagged),
            "RESTRICTED" => Some(SenderStatus::Restricted),
            "BANNED" => Some(SenderStatus::Banned),
            _ => None,
        }
    }

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            SenderStatus::Connected => "CONNECTED",
            SenderStatus::Pending => "PENDING",
            SenderStatus::Offline => "OFFLINE",
            SenderStatus::Flagged => "FLAGGED",
            SenderStatus::Restricted => "RESTRICTED",
            SenderStatus::Banned => "BANNED",
        }
    }

    /// The status to show: a sender that may send is RESTRICTED while its scope is full.
    pub fn shown(self, scope_full: bool) -> SenderStatus {
        match self {
            SenderStatus::Connected | SenderStatus::Flagged if scope_full => SenderStatus::Restricted,
            other => other,
        }
    }
}

/// A phone number's throughput (messages per second, in and out) until Meta upgrades it. It is
/// not a messaging limit: Meta's `current_limit` now carries it for some numbers.
pub const DEFAULT_THROUGHPUT_MPS: u32 = 80;

/// A phone number's throughput after Meta's automatic `THROUGHPUT_UPGRADE`.
pub const UPGRADED_THROUGHPUT_MPS: u32 = 1_000;

/// Meta's tier names and limits, for webhooks that name a tier outside the configured ladder.
const META_TIERS: [(&str, Limit); 7] = [
    ("TIER_50", Limit::Limited(50)),
    ("TIER_250", Limit::Limited(250)),
    ("TIER_1K", Limit::Limited(1_000)),
    ("TIER_2K", Limit::Limited(2_000)),
    ("TIER_10K", Limit::Limited(10_000)),
    ("TIER_100K", Limit::Limited(100_000)),
    ("TIER_UNLIMITED", Limit::Unlimited),
];

impl Ladder {
    /// The tier a webhook names, as `TIER_*` or as a limit (`-1` = unlimited): the ladder's tier of
    /// that name or limit, else Meta's. `None` for `TIER_NOT_SET` and what cannot be a tier.
    pub fn resolve(&self, value: &TierValue) -> Option<Tier> {
        let limit = match value {
            TierValue::Name(name) => {
                if let Some(t) = self.get(name) {
                    return Some(t.clone());
                }
                META_TIERS.iter().find(|(n, _)| n == name)?.1
            }
            TierValue::Limit(n) if *n < 0 => Limit::Unlimited,
            TierValue::Limit(0) => return None,
            TierValue::Limit(n) => Limit::Limited(*n as u64),
        };
        if let Some(t) = self.tiers.iter().find(|t| t.limit == limit) {
            return Some(t.clone());
        }
        let name = META_TIERS.iter().find(|(_, l)| *l == limit).map(|(n, _)| n.to_string());
        let name = name.unwrap_or_else(|| format!("LIMIT_{}", limit.to_i64()));
        Some(Tier { name, limit })
    }

    /// The tier above `name`, if any.
    pub fn above(&self, name: &str) -> Option<&Tier> {
        let i = self.tiers.iter().position(|t| t.name == name)?;
        self.tiers.get(i + 1)
    }

    /// The tier below `name`, if any.
    pub fn below(&self, name: &str) -> Option<&Tier> {
        let i = self.tiers.iter().position(|t| t.name == name)?;
        i.checked_sub(1).map(|i| &self.tiers[i])
    }

    /// Whether `name` is the ladder's first tier.
    pub fn is_first(&self, name: &str) -> bool {
        self.tiers.first().is_some_and(|t| t.name == name)
    }
}

/// A tier as a webhook carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierValue {
    Name(String),
    Limit(i64),
}

/// The rules for moving between tiers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ruleset {
    /// Meta from October 2025: from the first tier, the next tier's limit in unique recipients
    /// within 30 days with HIGH quality (then Meta reviews); from there up, half the current
    /// limit within 7 days with HIGH quality, applied within 6 hours. No quality downgrades.
    Meta2025,
    /// Per-number rules: `threshold_ratio` × the limit within 7 days, quality not LOW, at least
    /// 48 hours at the current tier; upgrade after 24 hours. FLAGGED for 7 consecutive days drops
    /// one tier.
    Legacy { threshold_ratio: f64 },
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY_US: Micros = 86_400_000_000;

/// What tiergate knows about a scope when it projects an upgrade.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionInput<'a> {
    pub ladder: &'a Ladder,
    pub ruleset: Ruleset,
    pub tier: &'a Tier,
    /// When the tier was last set, if known.
    pub tier_since: Option<Micros>,
    pub quality: Quality,
    pub unique_7d: u64,
    pub unique_30d: u64,
    pub now: Micros,
}

/// Whether a scope may move up, and what stands in the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    pub next_tier: Option<Tier>,
    pub eligible: bool,
    /// The counting period of the rule (7 or 30 days).
    pub period_days: u32,
    /// Unique recipients over that period.
    pub count: u64,
    /// Unique recipients the rule asks for.
    pub threshold: u64,
    /// Why the scope is not eligible, in words for the business.
    pub blockers: Vec<String>,
    /// How long after becoming eligible the upgrade applies.
    pub delay: Duration,
}

/// Projects the next upgrade of a scope under its ruleset.
pub fn project(p: &ProjectionInput<'_>) -> Projection {
    let next = p.ladder.above(&p.tier.name).cloned();
    let limit = match p.tier.limit {
        Limit::Limited(n) => n,
        Limit::Unlimited => 0,
    };
    let (period_days, count, threshold, min_quality, delay) = match p.ruleset {
        Ruleset::Meta2025 if p.ladder.is_first(&p.tier.name) => {
            let target = match next.as_ref().map(|t| t.limit) {
                Some(Limit::Limited(n)) => n,
                _ => limit.saturating_mul(8),
            };
            (30, p.unique_30d, target, Quality::High, Duration::ZERO)
        }
        Ruleset::Meta2025 => (7, p.unique_7d, limit.div_ceil(2), Quality::High, 6 * HOUR),
        Ruleset::Legacy { threshold_ratio } => {
            (7, p.unique_7d, (limit as f64 * threshold_ratio).ceil() as u64, Quality::Medium, 24 * HOUR)
        }
    };
    let mut blockers = Vec::new();
    if next.is_none() {
        blockers.push(format!("{} is the top of the ladder", p.tier.name));
    }
    if count < threshold {
        blockers.push(format!("{count} of {threshold} unique recipients in the last {period_days} days"));
    }
    if p.quality < min_quality || (min_quality == Quality::High && p.quality != Quality::High) {
        blockers.push(format!("quality is {}; {} is needed", p.quality.as_str(), min_quality.as_str()));
    }
    if let (Ruleset::Legacy { .. }, Some(since)) = (p.ruleset, p.tier_since) {
        let at_tier = p.now.saturating_sub(since);
        if at_tier < 2 * DAY_US {
            let hours = (2 * DAY_US - at_tier).div_ceil(3_600_000_000);
            blockers.push(format!("{hours} more hours at {} are needed (48 hours minimum)", p.tier.name));
        }
    }
    Projection { eligible: blockers.is_empty(), next_tier: next, period_days, count, threshold, blockers, delay }
}

/// What a simulating sidecar does to a scope's tier now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimStep {
    Nothing,
    /// Remember that the scope became eligible at this time.
    MarkEligible(Micros),
    /// The scope is no longer eligible: forget when it became so.
    ClearEligible,
    Upgrade(Tier),
    /// Legacy: flagged for 7 days. The number then returns to CONNECTED at the lower limit, so
    /// the flagged clock stops until Meta flags it again.
    Downgrade(Tier),
}

/// How long a legacy number must stay FLAGGED before it drops a tier.
pub const FLAGGED_DOWNGRADE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// One step of tier simulation (`policy.tier_source = "simulate"`): deterministic given `now`.
pub fn simulate(
    p: &ProjectionInput<'_>,
    projection: &Projection,
    eligible_since: Option<Micros>,
    flagged_since: Option<Micros>,
) -> SimStep {
    if let (Ruleset::Legacy { .. }, Some(since)) = (p.ruleset, flagged_since) {
        if p.now >= since.saturating_add(micros(FLAGGED_DOWNGRADE_AFTER)) {
            if let Some(lower) = p.ladder.below(&p.tier.name) {
                return SimStep::Downgrade(lower.clone());
            }
        }
    }
    match (projection.eligible, &projection.next_tier, eligible_since) {
        (true, Some(next), since) => {
            let since_or_now = since.unwrap_or(p.now);
            if p.now >= since_or_now.saturating_add(micros(projection.delay)) {
                SimStep::Upgrade(next.clone())
            } else if since.is_none() {
                SimStep::MarkEligible(p.now)
            } else {
                SimStep::Nothing
            }
        }
        (false, _, Some(_)) => SimStep::ClearEligible,
        _ => SimStep::Nothing,
    }
}

/// What a lease names: the contact counted by one Admit. Clients get it signed
/// ([`LeaseSigner`](crate::hashing::LeaseSigner)); this is its unsigned text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub scope: ScopeKey,
    /// The keyed hash of the recipient (never the number itself).
    pub member: Vec<u8>,
    /// The unique score the Admit gave the contact.
    pub score: Micros,
}

/// "1" was the unsigned token; "2" is the text a [`LeaseSigner`](crate::hashing::LeaseSigner)
/// signs, so an unsigned "1" is never read as a lease.
const LEASE_VERSION: &str = "2";

impl Lease {
    /// The lease's URL-safe text form (without the `.`), which a signature is appended to.
    pub fn encode(&self) -> String {
        use base64::Engine as _;
        let text = format!(
            "{LEASE_VERSION}\n{}\n{}\n{}\n{}",
            self.scope.portfolio,
            self.scope.sender.as_deref().unwrap_or(""),
            hex::encode(&self.member),
            self.score
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    /// Parses a token made by [`Lease::encode`].
    pub fn decode(token: &str) -> Result<Lease, String> {
        use base64::Engine as _;
        let bad = || "is not a lease issued by tiergate".to_string();
        if token.is_empty() {
            return Err("must not be empty".into());
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let parts: Vec<&str> = text.split('\n').collect();
        let [version, portfolio, sender, member, score] = parts[..] else { return Err(bad()) };
        if version != LEASE_VERSION || validate_id(portfolio).is_err() {
            return Err(bad());
        }
        if !sender.is_empty() && validate_id(sender).is_err() {
            return Err(bad());
        }
        let member = hex::decode(member).map_err(|_| bad())?;
        if member.is_empty() || member.len() > 32 {
            return Err(bad());
        }
        let score = score.parse().map_err(|_| bad())?;
        let sender = (!sender.is_empty()).then(|| sender.to_owned());
        Ok(Lease { scope: ScopeKey { portfolio: portfolio.to_owned(), sender }, member, score })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);
    const NOW: Micros = 1_800_000_000_000_000;

    fn snap(open: bool, counted_already: bool, counted: u64) -> Snapshot {
        Snapshot { service_window_open: open, already_counted: counted_already, counted, ..Snapshot::default() }
    }

    /// Scores of counted contacts, oldest first, one hour apart, the newest an hour ago.
    fn hourly(counted: u64) -> impl Fn(u64) -> Option<Micros> {
        move |rank| (rank < counted).then(|| NOW - micros(H) * (counted - rank))
    }

    #[test]
    fn open_service_window_admits_without_counting_even_when_full() {
        let o =
            decide(&snap(true, false, 250), Category::Utility, Limits::new(Limit::Limited(250), 0), NOW, DAY, |_| {
                Some(NOW - 1)
            });
        assert_eq!((o.reason, o.effect), (Reason::ServiceWindow, Effect::Nothing));
        assert_eq!(o.reason.decision(), Decision::Admitted);
    }

    #[test]
    fn counted_recipient_is_free_and_touched_even_when_full() {
        let o =
            decide(&snap(false, true, 250), Category::Utility, Limits::new(Limit::Limited(250), 0), NOW, DAY, |_| {
                Some(NOW - 1)
            });
        assert_eq!((o.reason, o.effect), (Reason::AlreadyCounted, Effect::Touch));
    }

    #[test]
    fn new_recipient_is_counted_while_there_is_room() {
        let o =
            decide(&snap(false, false, 249), Category::Utility, Limits::new(Limit::Limited(250), 0), NOW, DAY, |_| {
                Some(NOW - 1)
            });
        assert_eq!((o.reason, o.effect), (Reason::NewRecipient, Effect::Count));
        assert_eq!(o.retry_after, None);
    }

    #[test]
    fn new_recipient_is_denied_at_the_limit_until_the_oldest_leaves() {
        let oldest = NOW - micros(H);
        let o =
            decide(&snap(false, false, 250), Category::Utility, Limits::new(Limit::Limited(250), 0), NOW, DAY, |_| {
                Some(oldest)
            });
        assert_eq!((o.reason, o.effect), (Reason::LimitReached, Effect::Nothing));
        assert_eq!(o.reason.decision(), Decision::Denied);
        assert_eq!(o.retry_after, Some(DAY - H));
    }

    #[test]
    fn unlimited_tier_always_counts_new_recipients() {
        let o = decide(
            &snap(false, false, 5_000_000),
            Category::Utility,
            Limits::new(Limit::Unlimited, 0),
            NOW,
            DAY,
            |_| Some(NOW),
        );
        assert_eq!((o.reason, o.effect), (Reason::NewRecipient, Effect::Count));
    }

    fn check(s: Snapshot, category: Category, limits: Limits) -> Reason {
        decide(&s, category, limits, NOW, DAY, hourly(s.counted)).reason
    }

    const L250: Limits = Limits { limit: Limit::Limited(250), marketing_cap: None };

    #[test]
    fn banned_or_blocked_senders_send_nothing_not_even_replies() {
        let s =
            Snapshot { sender_blocked: true, service_window_open: true, already_counted: true, ..Snapshot::default() };
        assert_eq!(check(s, Category::Utility, L250), Reason::SenderBlocked);
        assert_eq!(Reason::SenderBlocked.decision(), Decision::Denied);
    }

    #[test]
    fn inactive_templates_are_blocked_and_active_ones_pass() {
        let s = Snapshot { template_blocked: true, service_window_open: true, ..Snapshot::default() };
        assert_eq!(check(s, Category::Marketing, L250), Reason::TemplateBlocked);
        for status in ["PAUSED", "DISABLED", "REJECTED", "PENDING_DELETION", "IN_APPEAL", "LIMIT_EXCEEDED"] {
            assert!(!template_active(Some(status)), "{status}");
        }
        for status in [None, Some("APPROVED"), Some("REINSTATED"), Some("FLAGGED")] {
            assert!(template_active(status), "{status:?}");
        }
    }

    #[test]
    fn each_language_follows_its_own_status_or_a_newer_one_set_for_every_language() {
        let ev = |status, at| Some(TemplateEvent { status, at });
        assert_eq!(template_status_in_force(None, None), None);
        assert_eq!(template_status_in_force(ev("PAUSED", 5), None), Some("PAUSED"));
        assert_eq!(template_status_in_force(None, ev("PAUSED", 5)), Some("PAUSED"), "a name-wide status covers all");
        assert_eq!(template_status_in_force(ev("APPROVED", 6), ev("PAUSED", 5)), Some("APPROVED"));
        assert_eq!(template_status_in_force(ev("APPROVED", 4), ev("PAUSED", 5)), Some("PAUSED"));
        assert_eq!(template_status_in_force(ev("APPROVED", 5), ev("PAUSED", 5)), Some("APPROVED"), "a tie: own");
        assert!(template_language_sendable(ev("REINSTATED", 9), ev("PAUSED", 5)));
        assert!(!template_language_sendable(None, ev("DISABLED", 0)), "a status stored by name only still blocks");
        assert!(template_language_sendable(None, None), "never heard of");
    }

    #[test]
    fn a_message_without_a_language_is_blocked_when_any_language_is() {
        let ev = |status, at| TemplateEvent { status, at };
        assert!(template_name_sendable(None, []));
        assert!(template_name_sendable(None, [ev("APPROVED", 1), ev("FLAGGED", 2)]));
        assert!(!template_name_sendable(None, [ev("APPROVED", 1), ev("PAUSED", 2)]));
        assert!(!template_name_sendable(Some(ev("PAUSED", 1)), []));
        // The name-wide status stands for the languages never heard of separately.
        assert!(!template_name_sendable(Some(ev("PAUSED", 1)), [ev("APPROVED", 2)]));
        // A newer name-wide reinstatement covers a language paused before it.
        assert!(template_name_sendable(Some(ev("REINSTATED", 3)), [ev("PAUSED", 2)]));
        assert!(!template_name_sendable(Some(ev("REINSTATED", 3)), [ev("PAUSED", 4)]));
    }

    #[test]
    fn opted_out_recipients_get_replies_in_a_window_but_no_marketing_and_nothing_outside() {
        let outside = Snapshot { opted_out: true, ..Snapshot::default() };
        let inside = Snapshot { opted_out: true, service_window_open: true, ..Snapshot::default() };
        assert_eq!(check(outside, Category::Utility, L250), Reason::OptedOut);
        assert_eq!(check(outside, Category::Authentication, L250), Reason::OptedOut);
        assert_eq!(check(inside, Category::Marketing, L250), Reason::OptedOut);
        assert_eq!(check(inside, Category::Utility, L250), Reason::ServiceWindow);
        assert_eq!(check(inside, Category::Service, L250), Reason::ServiceWindow);
        assert_eq!(check(inside, Category::Unspecified, L250), Reason::OptedOut, "may be marketing");
    }

    #[test]
    fn free_form_messages_need_an_open_window_and_take_no_slot() {
        let o = decide(&Snapshot::default(), Category::Service, L250, NOW, DAY, |_| None);
        assert_eq!((o.reason, o.effect), (Reason::OutsideServiceWindow, Effect::Nothing));
        let open = Snapshot { service_window_open: true, ..Snapshot::default() };
        assert_eq!(check(open, Category::Service, L250), Reason::ServiceWindow);
    }

    #[test]
    fn marketing_stops_at_the_reserve_while_otps_use_the_rest() {
        let limits = Limits::new(Limit::Limited(250), 1_000);
        assert_eq!(limits.marketing_cap, Some(225));
        let at_cap = Snapshot { counted: 225, ..Snapshot::default() };
        let o = decide(&at_cap, Category::Marketing, limits, NOW, DAY, |rank| (rank == 0).then_some(NOW - micros(H)));
        assert_eq!((o.reason, o.retry_after), (Reason::HeadroomReserved, Some(DAY - H)));
        assert_eq!(check(Snapshot { counted: 224, ..at_cap }, Category::Marketing, limits), Reason::NewRecipient);
        assert_eq!(check(at_cap, Category::Authentication, limits), Reason::NewRecipient);
        assert_eq!(check(at_cap, Category::Utility, limits), Reason::NewRecipient);
        assert_eq!(check(at_cap, Category::Unspecified, limits), Reason::HeadroomReserved, "may be marketing");
        assert_eq!(check(Snapshot { counted: 250, ..at_cap }, Category::Utility, limits), Reason::LimitReached);
        // Marketing to someone already counted costs nothing, so the reserve does not apply.
        let counted = Snapshot { already_counted: true, ..at_cap };
        assert_eq!(check(counted, Category::Marketing, limits), Reason::AlreadyCounted);
    }

    /// Contacts one minute apart, the oldest 23 hours ago.
    fn minutely(rank: u64) -> Option<Micros> {
        Some(NOW - micros(23 * H) + rank * 60_000_000)
    }

    #[test]
    fn above_the_marketing_cap_marketing_waits_until_the_count_drops_below_it() {
        // 240 counted, cap 225: 16 contacts must leave, so the 16th oldest (rank 15) is the one.
        let limits = Limits::new(Limit::Limited(250), 1_000);
        let s = Snapshot { counted: 240, ..Snapshot::default() };
        let o = decide(&s, Category::Marketing, limits, NOW, DAY, minutely);
        assert_eq!(o.reason, Reason::HeadroomReserved);
        assert_eq!(o.retry_after, Some(H + Duration::from_secs(15 * 60)));
    }

    #[test]
    fn after_a_downgrade_new_recipients_wait_until_the_count_drops_below_the_new_limit() {
        // 300 counted under a limit of 250: the contact at rank 50 must leave.
        let s = Snapshot { counted: 300, ..Snapshot::default() };
        let o = decide(&s, Category::Utility, Limits::new(Limit::Limited(250), 0), NOW, DAY, minutely);
        assert_eq!(o.reason, Reason::LimitReached);
        assert_eq!(o.retry_after, Some(H + Duration::from_secs(50 * 60)));
    }

    #[test]
    fn with_nothing_counted_a_zero_limit_waits_a_whole_window() {
        let s = Snapshot::default();
        let o = decide(&s, Category::Utility, Limits::new(Limit::Limited(0), 0), NOW, DAY, |_| None);
        assert_eq!((o.reason, o.retry_after), (Reason::LimitReached, Some(DAY)));
        let o = decide(&s, Category::Marketing, Limits::new(Limit::Limited(3), 10_000), NOW, DAY, |_| None);
        assert_eq!((o.reason, o.retry_after), (Reason::HeadroomReserved, Some(DAY)));
    }

    #[test]
    fn marketing_cap_is_exact_and_absent_without_reserve() {
        assert_eq!(marketing_cap(Limit::Limited(2_000), 1_000), Some(1_800));
        assert_eq!(marketing_cap(Limit::Limited(5), 1_000), Some(5));
        assert_eq!(marketing_cap(Limit::Limited(250), 0), None);
        assert_eq!(marketing_cap(Limit::Unlimited, 1_000), None);
        let huge = (u128::from(u64::MAX) * 9_999).div_ceil(10_000) as u64;
        assert_eq!(marketing_cap(Limit::Limited(u64::MAX), 1), Some(huge), "no overflow");
    }

    #[test]
    fn qualities_and_statuses_parse_meta_names() {
        assert_eq!(Quality::parse("GREEN"), Some(Quality::High));
        assert_eq!(Quality::parse("yellow"), Some(Quality::Medium));
        assert_eq!(Quality::parse("RED"), Some(Quality::Low));
        assert_eq!(Quality::overall([Quality::High, Quality::Unknown, Quality::Medium]), Quality::Medium);
        assert_eq!(Quality::overall([Quality::Unknown]), Quality::Unknown);
        assert_eq!(SenderStatus::parse("banned"), Some(SenderStatus::Banned));
        assert_eq!(SenderStatus::Connected.shown(true), SenderStatus::Restricted);
        assert_eq!(SenderStatus::Banned.shown(true), SenderStatus::Banned);
    }

    #[test]
    fn webhook_tiers_resolve_by_name_or_limit() {
        let m = Ladder::meta_2025();
        assert_eq!(m.resolve(&TierValue::Name("TIER_2K".into())).unwrap().name, "TIER_2K");
        assert_eq!(m.resolve(&TierValue::Limit(10_000)).unwrap().name, "TIER_10K");
        assert_eq!(m.resolve(&TierValue::Limit(-1)).unwrap(), Tier::unlimited("TIER_UNLIMITED"));
        assert_eq!(m.resolve(&TierValue::Name("TIER_1K".into())).unwrap(), Tier::limited("TIER_1K", 1_000));
        assert_eq!(m.resolve(&TierValue::Limit(1_234)).unwrap(), Tier::limited("LIMIT_1234", 1_234));
        assert_eq!(m.resolve(&TierValue::Name("TIER_NOT_SET".into())), None);
    }

    fn input<'a>(
        ladder: &'a Ladder,
        ruleset: Ruleset,
        tier: &'a Tier,
        q: Quality,
        u7: u64,
        u30: u64,
    ) -> ProjectionInput<'a> {
        ProjectionInput {
            ladder,
            ruleset,
            tier,
            tier_since: None,
            quality: q,
            unique_7d: u7,
            unique_30d: u30,
            now: NOW,
        }
    }

    #[test]
    fn meta_first_tier_needs_2000_in_30_days_with_high_quality() {
        let m = Ladder::meta_2025();
        let t = m.get("TIER_250").unwrap();
        let p = project(&input(&m, Ruleset::Meta2025, t, Quality::High, 10, 1_999));
        assert!(!p.eligible);
        assert_eq!((p.period_days, p.count, p.threshold), (30, 1_999, 2_000));
        assert_eq!(p.blockers, ["1999 of 2000 unique recipients in the last 30 days"]);
        let p = project(&input(&m, Ruleset::Meta2025, t, Quality::Medium, 10, 2_000));
        assert_eq!(p.blockers, ["quality is MEDIUM; HIGH is needed"]);
        let p = project(&input(&m, Ruleset::Meta2025, t, Quality::High, 10, 2_000));
        assert!(p.eligible);
        assert_eq!(p.next_tier.unwrap().name, "TIER_2K");
    }

    #[test]
    fn meta_2k_and_up_need_half_the_limit_in_7_days_applied_within_6_hours() {
        let m = Ladder::meta_2025();
        let t = m.get("TIER_2K").unwrap();
        let p = project(&input(&m, Ruleset::Meta2025, t, Quality::High, 1_000, 0));
        assert!(p.eligible);
        assert_eq!((p.period_days, p.threshold, p.delay), (7, 1_000, 6 * H));
        assert!(!project(&input(&m, Ruleset::Meta2025, t, Quality::High, 999, 0)).eligible);
        let top = m.get("TIER_UNLIMITED").unwrap();
        let p = project(&input(&m, Ruleset::Meta2025, top, Quality::High, 1_000_000, 0));
        assert!(!p.eligible && p.next_tier.is_none());
    }

    #[test]
    fn legacy_uses_the_ratio_quality_not_low_and_48_hours_at_tier() {
        let l = Ladder::legacy();
        let t = l.get("TIER_1K").unwrap();
        let half = Ruleset::Legacy { threshold_ratio: 0.5 };
        let mut i = input(&l, half, t, Quality::Medium, 500, 0);
        assert!(project(&i).eligible);
        i.quality = Quality::Low;
        assert!(!project(&i).eligible);
        i.quality = Quality::Medium;
        i.tier_since = Some(NOW - micros(H) * 47);
        assert_eq!(project(&i).blockers, ["1 more hours at TIER_1K are needed (48 hours minimum)"]);
        let twice = Ruleset::Legacy { threshold_ratio: 2.0 };
        let p = project(&input(&l, twice, t, Quality::High, 1_999, 0));
        assert_eq!((p.threshold, p.eligible, p.delay), (2_000, false, 24 * H));
    }

    #[test]
    fn simulation_upgrades_after_the_delay_and_is_deterministic() {
        let m = Ladder::meta_2025();
        let t = m.get("TIER_2K").unwrap().clone();
        let mut i = input(&m, Ruleset::Meta2025, &t, Quality::High, 1_000, 0);
        let p = project(&i);
        assert_eq!(simulate(&i, &p, None, None), SimStep::MarkEligible(NOW));
        assert_eq!(simulate(&i, &p, Some(NOW), None), SimStep::Nothing);
        i.now = NOW + micros(6 * H);
        assert_eq!(simulate(&i, &p, Some(NOW), None), SimStep::Upgrade(Tier::limited("TIER_10K", 10_000)));
        let not = project(&input(&m, Ruleset::Meta2025, &t, Quality::Low, 1_000, 0));
        assert_eq!(simulate(&i, &not, Some(NOW), None), SimStep::ClearEligible);
        // The first meta tier applies at once (Meta's review is outside tiergate).
        let first = m.get("TIER_250").unwrap().clone();
        let i = input(&m, Ruleset::Meta2025, &first, Quality::High, 0, 2_000);
        assert_eq!(simulate(&i, &project(&i), None, None), SimStep::Upgrade(Tier::limited("TIER_2K", 2_000)));
    }

    #[test]
    fn legacy_simulation_drops_a_tier_after_7_days_flagged() {
        let l = Ladder::legacy();
        let t = l.get("TIER_10K").unwrap().clone();
        let mut i = input(&l, Ruleset::Legacy { threshold_ratio: 0.5 }, &t, Quality::Low, 0, 0);
        let p = project(&i);
        let since = NOW - micros(FLAGGED_DOWNGRADE_AFTER) + 1;
        assert_eq!(simulate(&i, &p, None, Some(since)), SimStep::Nothing);
        i.now = NOW + 1;
        assert_eq!(simulate(&i, &p, None, Some(since)), SimStep::Downgrade(Tier::limited("TIER_1K", 1_000)));
        let bottom = l.get("TIER_1K").unwrap().clone();
        let i = input(&l, Ruleset::Legacy { threshold_ratio: 0.5 }, &bottom, Quality::Low, 0, 0);
        assert_eq!(simulate(&i, &project(&i), None, Some(0)), SimStep::Nothing);
        // Meta 2025 never downgrades for quality.
        let m = Ladder::meta_2025();
        let t = m.get("TIER_10K").unwrap().clone();
        let i = input(&m, Ruleset::Meta2025, &t, Quality::Low, 0, 0);
        assert_eq!(simulate(&i, &project(&i), None, Some(0)), SimStep::Nothing);
    }

    #[test]
    fn retry_after_is_never_zero_or_negative() {
        assert_eq!(retry_after(Some(NOW - micros(DAY)), NOW, DAY), MIN_RETRY_AFTER);
        assert_eq!(retry_after(Some(NOW - micros(DAY) - 5), NOW, DAY), MIN_RETRY_AFTER);
        assert_eq!(retry_after(None, NOW, DAY), DAY);
    }

    #[test]
    fn scores_are_strictly_increasing_within_one_microsecond() {
        let a = next_score(NOW, 0);
        let b = next_score(NOW, a);
        let c = next_score(NOW, b);
        assert_eq!((a, b, c), (NOW, NOW + 1, NOW + 2));
        assert_eq!(next_score(NOW + 10, c), NOW + 10);
    }

    #[test]
    fn window_start_is_now_minus_window() {
        assert_eq!(window_start(NOW, H), NOW - 3_600_000_000);
        assert_eq!(window_start(5, H), 0);
    }

    #[test]
    fn phone_numbers_normalise_to_digits() {
        assert_eq!(normalize_recipient("+1 (415) 555-0100").unwrap(), "14155550100");
        assert_eq!(normalize_recipient("4915112345678").unwrap(), "4915112345678");
        assert_eq!(normalize_recipient(" 1234567 ").unwrap(), "1234567");
    }

    #[test]
    fn business_scoped_user_ids_are_accepted() {
        let id = normalize_recipient("us.13491208655302741918").unwrap();
        assert_eq!(id, "US.13491208655302741918");
    }

    #[test]
    fn malformed_recipients_are_rejected_without_echoing_them() {
        for bad in ["", "123456", "1234567890123456", "+1 555 CALL NOW", "1+2345678", "USA.123", "US.", "US.12a"] {
            let err = normalize_recipient(bad).unwrap_err();
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
    }

    #[test]
    fn ids_allow_only_the_documented_characters() {
        assert!(validate_id("acme-prod_1.eu:2").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a b").is_err());
        assert!(validate_id("{x}").is_err());
        assert!(validate_id(&"a".repeat(128)).is_ok());
        assert!(validate_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn presets_match_meta_ladders() {
        let m = Ladder::meta_2025();
        assert_eq!(m.get("TIER_250").unwrap().limit, Limit::Limited(250));
        assert_eq!(m.get("TIER_2K").unwrap().limit, Limit::Limited(2_000));
        assert_eq!(m.get("TIER_UNLIMITED").unwrap().limit, Limit::Unlimited);
        assert_eq!(m.tiers().len(), 5);
        let l = Ladder::legacy();
        assert_eq!(l.get("TIER_1K").unwrap().limit, Limit::Limited(1_000));
        assert!(l.get("TIER_250").is_none());
    }

    #[test]
    fn custom_ladders_reject_duplicates_and_zero() {
        assert!(Ladder::custom(vec![]).is_err());
        assert!(Ladder::custom(vec![Tier::limited("A", 1), Tier::limited("A", 2)]).is_err());
        assert!(Ladder::custom(vec![Tier::limited("A", 0)]).is_err());
        assert!(Ladder::custom(vec![Tier::limited("T5", 5), Tier::unlimited("UNL")]).is_ok());
        let long = "L".repeat(MAX_TIER_NAME_LEN + 1);
        let e = Ladder::custom(vec![Tier::limited(&long, 5)]).unwrap_err();
        assert!(e.len() < 100, "{e}");
    }

    #[test]
    fn limits_round_trip_through_store_encoding() {
        for l in [Limit::Limited(250), Limit::Limited(0), Limit::Unlimited] {
            assert_eq!(Limit::from_i64(l.to_i64()), l);
        }
    }

    #[test]
    fn leases_round_trip_and_reject_garbage() {
        let lease = Lease {
            scope: ScopeKey { portfolio: "acme:eu".into(), sender: Some("1555".into()) },
            member: vec![1, 2, 3, 250],
            score: NOW + 7,
        };
        assert_eq!(Lease::decode(&lease.encode()).unwrap(), lease);
        let no_sender = Lease { scope: ScopeKey { portfolio: "p".into(), sender: None }, ..lease };
        assert_eq!(Lease::decode(&no_sender.encode()).unwrap(), no_sender);
        assert!(Lease::decode("").is_err());
        assert!(Lease::decode("not a lease").is_err());
        assert!(Lease::decode("MQpwCgp6ego1").is_err());
        // The unsigned version-1 form is no longer a lease.
        use base64::Engine as _;
        let v1 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1\np\n\n0102\n7");
        assert!(Lease::decode(&v1).is_err());
        let v2 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("2\np\n\n0102\n7");
        assert!(Lease::decode(&v2).is_ok());
    }

    #[test]
    fn the_00_international_prefix_is_the_same_as_plus() {
        assert_eq!(normalize_recipient("00447700900123").unwrap(), "447700900123");
        assert_eq!(normalize_recipient("00 44 7700 900123").unwrap(), normalize_recipient("+447700900123").unwrap());
        assert_eq!(normalize_recipient("(00) 1 415 555 0100").unwrap(), "14155550100");
        // The prefix is not a digit of the number: what is left must still be 7 to 15 digits.
        assert!(normalize_recipient("00123456").is_err());
        assert_eq!(normalize_recipient("001234567").unwrap(), "1234567");
        assert_eq!(normalize_recipient("0041234567890123").unwrap(), "41234567890123");
        let padded = format!("+1 415 555 0100{}", " ".repeat(MAX_RECIPIENT_LEN));
        assert_eq!(normalize_recipient(&padded).unwrap_err(), "is 143 bytes long; at most 128 are allowed");
    }
}
