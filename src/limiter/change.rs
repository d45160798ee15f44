//! Changes to a portfolio's persisted state: tiers, opt-outs, number and template statuses and
//! qualities, and service windows. They come from gRPC calls (SetTier, SetOptOut,
//! RecordInbound, UpdatePortfolio) and from Meta's webhook events ([`Event`]); both build their
//! store changes through the same few functions, so a status set by hand and one Meta reports are
//! stored the same way. Every list of changes is applied in one atomic store call.
//!
//! Meta's feedback closes the loop of the send rates: an inbound message takes a slot of its
//! number's throughput, and the error codes of a failed message ([`MetaError`]) back the number's
//! throughput off, make the pair wait, or cap marketing to the user.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::error::Error;
use crate::metrics;
use crate::policy::rate::{MetaError, THROUGHPUT_BACKOFF};
use crate::policy::{self, Delivery, Micros, Quality, ScopeKey, ScopeMode, SenderStatus, Tier, TierValue};
use crate::store::{Change, PortfolioState};

use super::input::{FieldPath, PortfolioId, Recipient, SenderId, TemplateLanguage, TemplateName};
use super::read::{PortfolioView, Usage};
use super::Limiter;

/// The most portfolios remembered as logged for a webhook without a per-number limit.
const MAX_LOGGED_PORTFOLIOS: usize = 10_000;

/// The longest template status event UpdatePortfolio takes (Meta's are words like PAUSED).
const MAX_TEMPLATE_STATUS_LEN: usize = 64;

/// A change to a portfolio asked for through UpdatePortfolio: every field is optional.
#[derive(Debug, Clone, Default)]
pub struct PortfolioUpdate {
    /// A tier name from the ladder.
    pub tier: Option<String>,
    /// The portfolio's own quality.
    pub quality: Option<Quality>,
    /// (sender id, status, quality).
    pub senders: Vec<(String, Option<SenderStatus>, Option<Quality>)>,
    /// (template name, language, status, quality); an empty language sets the status for every
    /// language of the name (see [`policy::template_status_in_force`]).
    pub templates: Vec<(String, String, Option<String>, Option<Quality>)>,
    /// The portfolio's mode: `Some(Some(mode))` sets it for every sidecar sharing the store,
    /// `Some(None)` goes back to the configured one, `None` leaves it.
    pub mode: Option<Option<policy::Mode>>,
}

/// Something Meta reported about a portfolio, with when it happened (the webhook entry's
/// `time`; `None` for now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    /// When Meta says it happened, so a late retry of an older event cannot undo a newer one.
    pub at: Option<Micros>,
    /// What happened.
    pub event: Event,
}

/// One of Meta's webhook changes, parsed into what tiergate follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `phone_number_quality_update`: a number, by the digits of its display number, with its
    /// quality event, the limits the update carries, and the quality rating it carries, if any.
    NumberQuality {
        display: Option<String>,
        event: Option<NumberEvent>,
        limits: ReportedLimits,
        quality: Option<Quality>,
    },
    /// `business_capability_update`: the limits the update carries.
    Capability { limits: ReportedLimits },
    /// `message_template_status_update`: a template's status event (APPROVED, PAUSED, …) in
    /// `message_template_language` (`None`: every language of the name).
    TemplateStatus { name: String, language: Option<TemplateLanguage>, status: String },
    /// `message_template_quality_update`, in one language as for `TemplateStatus`.
    TemplateQuality { name: String, language: Option<TemplateLanguage>, quality: Quality },
    /// `messages`: a number, by its phone number id, the digits of its display number, the
    /// users who wrote to it, and the delivery statuses of its messages.
    Messages { number: SenderId, display: Option<String>, inbound: Vec<Inbound>, statuses: Vec<Status> },
    /// `account_alerts`: an alert by its identity, with its contents.
    Alert { key: String, body: String },
}

/// The limits a webhook carries: the business's (today's rules) and the number's (legacy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportedLimits {
    /// `max_daily_conversations_per_business`.
    pub business: Option<TierValue>,
    /// The number's own limit (`current_limit` or `max_daily_conversation_per_phone`).
    pub number: Option<TierValue>,
}

/// A number's quality event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberEvent {
    /// Quality fell to low.
    Flagged,
    /// Out of the red.
    Unflagged,
    /// The number's throughput changed (`THROUGHPUT_UPGRADE`): messages per second, when known.
    /// It is not a messaging limit and never changes a tier.
    Throughput { mps: Option<u32> },
}

/// A delivery status Meta reported for a message from a number (`sent` is not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The recipient of the message.
    pub recipient: Recipient,
    /// Delivered (or read), or failed.
    pub delivery: Delivery,
    /// When Meta reported it.
    pub at: Option<Micros>,
    /// The error codes of a failed message (`errors[].code`), at most
    /// [`MAX_STATUS_ERRORS`](crate::webhooks::parse::MAX_STATUS_ERRORS); see
    /// [`MetaError`](crate::policy::rate::MetaError).
    pub errors: Vec<u32>,
}

/// A message a user sent to a number, which opens that pair's service window for every form of
/// the user, and takes a slot of the number's throughput.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The user: each form of them the message names (phone number, user id); none when no form
    /// could be read.
    pub from: Vec<Recipient>,
    /// When the user sent it.
    pub at: Option<Micros>,
}

/// What a list of events knows of its portfolio while it is translated: the stored state plus
/// what the events before taught.
struct Known<'a> {
    state: &'a PortfolioState,
    /// Display number → phone number id.
    aliases: BTreeMap<String, String>,
    /// Sender ids: the stored ones, sorted, then those the events taught.
    senders: Vec<String>,
}

impl<'a> Known<'a> {
    fn new(state: &'a PortfolioState) -> Known<'a> {
        let mut senders: Vec<String> = state.senders.keys().chain(state.aliases.values()).cloned().collect();
        senders.sort();
        senders.dedup();
        Known { state, aliases: state.aliases.clone(), senders }
    }
}

impl Limiter {
    /// Persists the tier of a scope for every sidecar sharing the store.
    pub async fn set_tier(&self, portfolio: &str, sender: &str, tier: &str) -> Result<Usage, Error> {
        let (scope, _) = self.parse_scope(portfolio, sender, FieldPath::TOP)?;
        let tier = self.parse_tier(tier)?;
        self.apply(portfolio, &[Change::Tier { scope: scope.clone(), tier: tier.clone(), at: None }]).await?;
        tracing::info!(scope = %scope, tier = %tier.name, "Tier set.");
        let state = self.state(portfolio).await?;
        self.scope_usage(&scope, &state).await
    }

    /// Records whether a recipient opted out of every number of the portfolio.
    pub async fn set_opt_out(&self, portfolio: &str, recipient: &str, opted_out: bool) -> Result<(), Error> {
        let portfolio = PortfolioId::parse(portfolio, FieldPath::TOP)?;
        let recipient = Recipient::parse(recipient, FieldPath::TOP)?;
        let change = Change::OptOut { member: self.hasher.recipient(recipient.as_str()), opted_out };
        self.apply(portfolio.as_str(), &[change]).await?;
        Ok(())
    }

    /// Opens or restarts the (sender, recipient) service window; returns when it closes.
    pub async fn record_inbound(&self, portfolio: &str, sender: &str, recipient: &str) -> Result<Micros, Error> {
        let portfolio = PortfolioId::parse(portfolio, FieldPath::TOP)?;
        let sender = SenderId::parse(sender, FieldPath::TOP)?;
        let recipient = Recipient::parse(recipient, FieldPath::TOP)?;
        let scope = self.scope_of(portfolio.as_str(), sender.as_str());
        self.require_served(&scope, FieldPath::TOP).await?;
        let changes: Vec<Change> =
            std::iter::once(self.inbound(&sender, &recipient, None)).chain(self.traffic(&sender, None)).collect();
        let now = self.apply(portfolio.as_str(), &changes).await?;
        metrics::inbound();
        self.labels.seen(portfolio.as_str());
        Ok(now.saturating_add(policy::micros(self.service_window)))
    }

    /// Applies an UpdatePortfolio request atomically and returns the portfolio after it.
    pub async fn update_portfolio(&self, portfolio: &str, update: &PortfolioUpdate) -> Result<PortfolioView, Error> {
        let id = PortfolioId::parse(portfolio, FieldPath::TOP)?;
        let mut changes = Vec::new();
        if let Some(name) = &update.tier {
            let tier = self.parse_tier(name)?;
            if self.scope_mode == ScopeMode::PhoneNumber && update.senders.is_empty() {
                return Err(FieldPath::TOP.invalid("tier", "in per-number scope, name the senders whose tier this is"));
            }
            let senders = update.senders.iter().map(|(s, ..)| s.as_str());
            changes.extend(self.tier_changes(id.as_str(), senders, &tier, None));
        }
        if let Some(q) = update.quality {
            changes.push(Change::Quality(q));
        }
        for (i, (sender, status, quality)) in update.senders.iter().enumerate() {
            let at = FieldPath::item("senders", i);
            let sender = SenderId::parse(sender, at)?;
            if *status == Some(SenderStatus::Restricted) {
                return Err(at.invalid("status", "RESTRICTED is derived from usage and cannot be set"));
            }
            changes.extend(sender_changes(sender.as_str(), *status, *quality, None));
        }
        for (i, (name, language, status, quality)) in update.templates.iter().enumerate() {
            let at = FieldPath::item("templates", i);
            let name = TemplateName::parse(name, at, "name")?;
            let language = TemplateLanguage::optional(language, at, "language")?;
            if status.as_ref().is_some_and(|s| s.len() > MAX_TEMPLATE_STATUS_LEN || s.contains(char::is_control)) {
                let message = format!("must be a status of at most {MAX_TEMPLATE_STATUS_LEN} bytes (e.g. PAUSED)");
                return Err(at.invalid("status", message));
            }
            changes.extend(template_changes(name.as_str(), language.as_ref(), status.as_deref(), *quality, None));
        }
        if let Some(mode) = update.mode {
            changes.push(Change::Mode(mode));
        }
        if !changes.is_empty() {
            self.apply(id.as_str(), &changes).await?;
        }
        self.view(&id).await
    }

    /// Applies what Meta reported about a portfolio in one atomic store call. Returns how many
    /// store changes each event made: 0 for one that tiergate does not follow.
    pub async fn apply_events(&self, portfolio: &str, events: &[Reported]) -> Result<Vec<usize>, Error> {
        let portfolio = PortfolioId::parse(portfolio, FieldPath::TOP)?;
        let state = self.state(portfolio.as_str()).await?;
        let mut known = Known::new(&state);
        let mut changes = Vec::new();
        let mut made = Vec::with_capacity(events.len());
        for reported in events {
            let before = changes.len();
            self.event_changes(portfolio.as_str(), reported, &mut known, &mut changes);
            made.push(changes.len() - before);
        }
        if !changes.is_empty() {
            let now = self.apply(portfolio.as_str(), &changes).await?;
            self.count_meta_errors(portfolio.as_str(), events, now);
        }
        self.labels.seen(portfolio.as_str());
        Ok(made)
    }

    /// The store changes of one event (none for what tiergate does not follow).
    fn event_changes(&self, portfolio: &str, reported: &Reported, known: &mut Known<'_>, out: &mut Vec<Change>) {
        let at = reported.at;
        match &reported.event {
            Event::NumberQuality { display, event, limits, quality } => {
                let sender = display.as_ref().map(|d| known.aliases.get(d).unwrap_or(d).clone());
                out.extend(self.reported_tier_changes(portfolio, sender.as_deref(), limits, at));
                let Some(sender) = sender else { return };
                if let Some(NumberEvent::Throughput { mps }) = event {
                    out.extend(mps.map(|mps| Change::Throughput { sender, mps }));
                    return;
                }
                // A quality event never lifts a ban, nor flags a banned number.
                if known.state.senders.get(&sender).and_then(|s| s.status) == Some(SenderStatus::Banned) {
                    return;
                }
                match event {
                    Some(NumberEvent::Flagged) => {
                        out.extend(sender_changes(&sender, Some(SenderStatus::Flagged), Some(Quality::Low), at))
                    }
                    // Out of the red says only that quality is no longer low: the rating is the one
                    // the payload carries, else unknown (which holds no upgrade back).
                    Some(NumberEvent::Unflagged) => out.extend(sender_changes(
                        &sender,
                        Some(SenderStatus::Connected),
                        Some(quality.unwrap_or(Quality::Unknown)),
                        at,
                    )),
                    Some(NumberEvent::Throughput { .. }) | None => {}
                }
            }
            Event::Capability { limits } => {
                out.extend(self.reported_tier_changes(portfolio, known.senders.iter().map(String::as_str), limits, at))
            }
            Event::TemplateStatus { name, language, status } => {
                out.extend(template_changes(name, language.as_ref(), Some(status), None, at))
            }
            Event::TemplateQuality { name, language, quality } => {
                out.extend(template_changes(name, language.as_ref(), None, Some(*quality), at))
            }
            Event::Messages { number, display, inbound, statuses } => {
                let id = number.as_str();
                if let Some(display) = display {
                    if known.aliases.get(display).map(String::as_str) != Some(id) {
                        known.aliases.insert(display.clone(), id.to_owned());
                        out.push(Change::Alias { display: display.clone(), id: id.to_owned() });
                    }
                }
                if !known.senders.iter().any(|s| s == id) {
                    known.senders.push(id.to_owned());
                }
                for m in inbound {
                    out.extend(m.from.iter().map(|from| self.inbound(number, from, m.at)));
                    out.extend(self.traffic(number, m.at));
                }
                // A status belongs to the limit scope the message was counted in: the number's
                // own in per-number scope, else the portfolio's.
                let scope = self.scope_of(portfolio, id);
                for s in statuses {
                    out.push(Change::Delivery {
                        scope: scope.clone(),
                        member: self.hasher.recipient(s.recipient.as_str()),
                        status: s.delivery,
                        at: s.at,
                    });
                    out.extend(self.meta_error_changes(number, s));
                }
            }
            Event::Alert { key, body } => out.push(Change::Alert { key: key.clone(), body: body.clone() }),
        }
    }

    /// The tier changes a webhook's limits make. In portfolio scope: the business's limit, else
    /// the number's when only it is sent. In per-number scope: the number's limit for the named
    /// numbers. Meta stops sending a per-number limit in February 2026; a business-wide limit
    /// alone is then the portfolio's, not each number's (together they would reach it many times
    /// over), so it is recorded on the portfolio's own scope, and that is logged once.
    fn reported_tier_changes<'s>(
        &self,
        portfolio: &str,
        senders: impl IntoIterator<Item = &'s str>,
        limits: &ReportedLimits,
        at: Option<Micros>,
    ) -> Vec<Change> {
        let resolve = |t: &Option<TierValue>| t.as_ref().and_then(|t| self.ladder.resolve(t));
        match self.scope_mode {
            ScopeMode::Portfolio => match resolve(&limits.business).or_else(|| resolve(&limits.number)) {
                Some(tier) => self.tier_changes(portfolio, senders, &tier, at),
                None => Vec::new(),
            },
            ScopeMode::PhoneNumber => {
                if let Some(tier) = resolve(&limits.number) {
                    return self.tier_changes(portfolio, senders, &tier, at);
                }
                let Some(tier) = resolve(&limits.business) else { return Vec::new() };
                let mut logged = self.no_number_limit_logged.lock().unwrap_or_else(|e| e.into_inner());
                if logged.len() < MAX_LOGGED_PORTFOLIOS && logged.insert(portfolio.to_owned()) {
                    tracing::warn!(
                        portfolio,
                        tier = %tier.name,
                        "A webhook carries a business-wide limit but no per-number limit; recorded as the \
                         portfolio's, and each number keeps its own."
                    );
                }
                let scope = ScopeKey { portfolio: portfolio.to_owned(), sender: None };
                vec![Change::Tier { scope, tier, at }]
            }
        }
    }

    /// A tier for a portfolio: one change in portfolio scope, where the tier is the business's;
    /// one per named sender in per-number scope.
    fn tier_changes<'s>(
        &self,
        portfolio: &str,
        senders: impl IntoIterator<Item = &'s str>,
        tier: &Tier,
        at: Option<Micros>,
    ) -> Vec<Change> {
        let tier = |scope| Change::Tier { scope, tier: tier.clone(), at };
        match self.scope_mode {
            ScopeMode::Portfolio => vec![tier(self.scope_of(portfolio, ""))],
            ScopeMode::PhoneNumber => senders.into_iter().map(|s| tier(self.scope_of(portfolio, s))).collect(),
        }
    }

    /// The change an inbound message makes: it opens the (sender, recipient) service window.
    fn inbound(&self, sender: &SenderId, from: &Recipient, at: Option<Micros>) -> Change {
        Change::Inbound { service_member: self.hasher.service_window(sender.as_str(), from.as_str()), at }
    }

    /// The slot of the sender's throughput an inbound message takes, as Meta counts it, while
    /// `[policy.throughput]` is on.
    fn traffic(&self, sender: &SenderId, at: Option<Micros>) -> Option<Change> {
        let sender = sender.as_str();
        self.rates.throughput.map(|rule| Change::Traffic {
            sender: sender.to_owned(),
            rule,
            configured_mps: self.throughput.configured(sender),
            at,
        })
    }

    /// What Meta's error codes on a failed message from `sender` change besides the slot coming
    /// back (the status's own [`Change::Delivery`]): the number's throughput backs off, the pair
    /// waits an interval (while `[policy.pair_rate]` is on), or marketing to the user waits a day.
    fn meta_error_changes<'s>(&'s self, sender: &'s SenderId, s: &'s Status) -> impl Iterator<Item = Change> + 's {
        let (number, recipient) = (sender.as_str(), s.recipient.as_str());
        s.errors.iter().filter_map(move |code| match MetaError::from_code(*code) {
            MetaError::ThroughputExceeded => Some(Change::ThroughputBackoff { sender: number.to_owned(), at: s.at }),
            MetaError::PairRate => self.rates.pair.map(|rule| Change::PairBackoff {
                pair: self.hasher.service_window(number, recipient),
                rule,
                at: s.at,
            }),
            MetaError::MarketingCapped => {
                Some(Change::MarketingCapped { member: self.hasher.recipient(recipient), at: s.at })
            }
            MetaError::Undeliverable | MetaError::Unknown => None,
        })
    }

    /// Counts the error codes of the failed messages among `events`, applied at the store's `now`,
    /// and each throughput backoff that starts an episode, which is also logged.
    fn count_meta_errors(&self, portfolio: &str, events: &[Reported], now: Micros) {
        for reported in events {
            let Event::Messages { number, statuses, .. } = &reported.event else { continue };
            for s in statuses {
                for code in &s.errors {
                    metrics::meta_error(*code);
                    let at = crate::store::event_time(s.at, now);
                    if MetaError::from_code(*code) == MetaError::ThroughputExceeded
                        && self.backoff_episodes.start(portfolio, number.as_str(), at)
                    {
                        metrics::throughput_backoff(&self.labels, portfolio, number.as_str());
                        tracing::warn!(
                            portfolio,
                            number = number.as_str(),
                            backoff = %humantime::format_duration(THROUGHPUT_BACKOFF),
                            "Meta reported the number's throughput exceeded (error 130429); every sidecar spaces \
                             its messages further apart for the backoff."
                        );
                    }
                }
            }
        }
    }
}

/// The most numbers [`BackoffEpisodes`] remembers; beyond, every 130429 of another number is
/// counted as an episode of its own until older episodes end.
const MAX_EPISODES: usize = 10_000;

/// The throughput backoff episodes this sidecar counted: (portfolio, number) → when the last one
/// ends. An episode starts with a 130429 for a number that has none in force here, and lasts
/// [`THROUGHPUT_BACKOFF`] from that report; more 130429s inside it are the same episode.
#[derive(Default)]
pub(super) struct BackoffEpisodes(Mutex<HashMap<(String, String), Micros>>);

impl BackoffEpisodes {
    /// Whether a 130429 for `number` reported at `at` starts an episode, which is then remembered.
    fn start(&self, portfolio: &str, number: &str, at: Micros) -> bool {
        let mut episodes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (portfolio.to_owned(), number.to_owned());
        if episodes.get(&key).is_some_and(|ends| *ends > at) {
            return false;
        }
        if episodes.len() >= MAX_EPISODES {
            episodes.retain(|_, ends| *ends > at);
        }
        if episodes.len() < MAX_EPISODES {
            episodes.insert(key, at.saturating_add(policy::micros(THROUGHPUT_BACKOFF)));
        }
        true
    }
}

/// A number's status and quality, each when given.
fn sender_changes(
    sender: &str,
    status: Option<SenderStatus>,
    quality: Option<Quality>,
    at: Option<Micros>,
) -> impl Iterator<Item = Change> {
    let status = status.map(|status| Change::SenderStatus { sender: sender.to_owned(), status, at });
    let quality = quality.map(|quality| Change::SenderQuality { sender: sender.to_owned(), quality });
    status.into_iter().chain(quality)
}

/// A template's status event (stored upper-case, as Meta names them) and quality in one language
/// (`None`: every language), each when given.
fn template_changes(
    name: &str,
    language: Option<&TemplateLanguage>,
    status: Option<&str>,
    quality: Option<Quality>,
    at: Option<Micros>,
) -> impl Iterator<Item = Change> {
    let language = language.map_or("", TemplateLanguage::as_str);
    let status = status.map(|s| Change::TemplateStatus {
        name: name.to_owned(),
        language: language.to_owned(),
        status: s.to_ascii_uppercase(),
        at,
    });
    let quality = quality.map(|quality| Change::TemplateQuality {
        name: name.to_owned(),
        language: language.to_owned(),
        quality,
    });
    status.into_iter().chain(quality)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throughput_backoff_episode_lasts_from_its_first_report_for_the_backoff() {
        let episodes = BackoffEpisodes::default();
        let t0 = 1_000_000_000;
        let backoff = policy::micros(THROUGHPUT_BACKOFF);
        assert!(episodes.start("acme", "n1", t0));
        assert!(!episodes.start("acme", "n1", t0 + 1), "a second report is the same episode");
        assert!(episodes.start("acme", "n2", t0 + 1), "each number has its own");
        assert!(episodes.start("globex", "n1", t0 + 1), "and each portfolio");
        // More reports inside the episode do not lengthen it.
        assert!(!episodes.start("acme", "n1", t0 + backoff - 1));
        assert!(episodes.start("acme", "n1", t0 + backoff));
        assert!(!episodes.start("acme", "n1", t0), "a late retry of the first report is inside the new one");
    }
}
