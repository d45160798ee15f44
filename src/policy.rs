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

use serde::Deserialize;

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
    /// Admitted without a check because the store could not answer and `store.on_error = "allow"`.
    StoreUnavailable,
}

impl Reason {
    /// The decision this reason belongs to.
    pub fn decision(self) -> Decision {
        match self {
            Reason::LimitReached => Decision::Denied,
            _ => Decision::Admitted,
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
        }
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
            if tiers[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("tier name {:?} appears twice", t.name));
            }
            if t.limit == Limit::Limited(0) {
                return Err(format!("tier {:?} has limit 0; omit `limit` for unlimited", t.name));
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

/// Normalises a recipient to the form that is hashed: a phone number becomes its 7–15 digits
/// (`+`, spaces, dashes and parentheses allowed around them); a business-scoped user id
/// (`CC.digits`, e.g. `US.13491208655302741918`) keeps its upper-case country code.
///
/// The error message never repeats the input, so it is safe to return to a client or log.
pub fn normalize_recipient(raw: &str) -> Result<String, String> {
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
    if !(7..=15).contains(&digits.len()) {
        return Err(format!("has {} digits; a phone number has 7 to 15", digits.len()));
    }
    Ok(digits)
}

/// What a store knows about one recipient in one scope at the instant of a decision, after
/// contacts older than the rolling window have been dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// The (sender, recipient) customer service window is open.
    pub service_window_open: bool,
    /// The recipient is counted in the rolling window.
    pub already_counted: bool,
    /// Recipients counted in the rolling window.
    pub counted: u64,
    /// Last-contact time of the oldest counted recipient.
    pub oldest: Option<Micros>,
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
    /// For [`Reason::LimitReached`]: how long until the oldest counted recipient leaves the window.
    pub retry_after: Option<Duration>,
}

/// The smallest `retry_after` ever returned: a full window never says "retry now".
pub const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// Decides one business-initiated message.
///
/// 1. An open service window admits it and counts nothing.
/// 2. A recipient already counted is admitted; its last contact moves to now.
/// 3. An unlimited tier, or a window with room, admits and counts the recipient.
/// 4. Otherwise it is denied until the oldest counted recipient leaves the window.
pub fn decide(s: &Snapshot, limit: Limit, now: Micros, window: Duration) -> Outcome {
    let outcome = |reason, effect| Outcome { reason, effect, retry_after: None };
    if s.service_window_open {
        return outcome(Reason::ServiceWindow, Effect::Nothing);
    }
    if s.already_counted {
        return outcome(Reason::AlreadyCounted, Effect::Touch);
    }
    let has_room = match limit {
        Limit::Unlimited => true,
        Limit::Limited(n) => s.counted < n,
    };
    if has_room {
        return outcome(Reason::NewRecipient, Effect::Count);
    }
    Outcome {
        reason: Reason::LimitReached,
        effect: Effect::Nothing,
        retry_after: Some(retry_after(s.oldest, now, window)),
    }
}

/// How long until the oldest counted contact leaves the window; never less than
/// [`MIN_RETRY_AFTER`], since the caller only asks while the window is full.
pub fn retry_after(oldest: Option<Micros>, now: Micros, window: Duration) -> Duration {
    let leaves_at = oldest.unwrap_or(now).saturating_add(micros(window));
    Duration::from_micros(leaves_at.saturating_sub(now)).max(MIN_RETRY_AFTER)
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

/// What a lease names: the contact counted by one Admit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub scope: ScopeKey,
    /// The keyed hash of the recipient (never the number itself).
    pub member: Vec<u8>,
    /// The unique score the Admit gave the contact.
    pub score: Micros,
}

const LEASE_VERSION: &str = "1";

impl Lease {
    /// An opaque, URL-safe token for the client.
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

    fn snap(open: bool, counted_already: bool, counted: u64, oldest: Option<Micros>) -> Snapshot {
        Snapshot { service_window_open: open, already_counted: counted_already, counted, oldest }
    }

    #[test]
    fn open_service_window_admits_without_counting_even_when_full() {
        let o = decide(&snap(true, false, 250, Some(NOW - 1)), Limit::Limited(250), NOW, DAY);
        assert_eq!((o.reason, o.effect), (Reason::ServiceWindow, Effect::Nothing));
        assert_eq!(o.reason.decision(), Decision::Admitted);
    }

    #[test]
    fn counted_recipient_is_free_and_touched_even_when_full() {
        let o = decide(&snap(false, true, 250, Some(NOW - 1)), Limit::Limited(250), NOW, DAY);
        assert_eq!((o.reason, o.effect), (Reason::AlreadyCounted, Effect::Touch));
    }

    #[test]
    fn new_recipient_is_counted_while_there_is_room() {
        let o = decide(&snap(false, false, 249, Some(NOW - 1)), Limit::Limited(250), NOW, DAY);
        assert_eq!((o.reason, o.effect), (Reason::NewRecipient, Effect::Count));
        assert_eq!(o.retry_after, None);
    }

    #[test]
    fn new_recipient_is_denied_at_the_limit_until_the_oldest_leaves() {
        let oldest = NOW - micros(H);
        let o = decide(&snap(false, false, 250, Some(oldest)), Limit::Limited(250), NOW, DAY);
        assert_eq!((o.reason, o.effect), (Reason::LimitReached, Effect::Nothing));
        assert_eq!(o.reason.decision(), Decision::Denied);
        assert_eq!(o.retry_after, Some(DAY - H));
    }

    #[test]
    fn unlimited_tier_always_counts_new_recipients() {
        let o = decide(&snap(false, false, 5_000_000, Some(NOW)), Limit::Unlimited, NOW, DAY);
        assert_eq!((o.reason, o.effect), (Reason::NewRecipient, Effect::Count));
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
    }
}
