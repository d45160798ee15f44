//! The limiter: validates requests, resolves each one's limit scope and tier, hashes recipients,
//! asks the store, and records metrics. Everything the gRPC edge and the webhook receiver do goes
//! through here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{OnError, Settings, TierSource};
use crate::hashing::RecipientHasher;
use crate::metrics;
use crate::policy::{
    self, Category, Lease, Micros, Projection, ProjectionInput, Quality, Reason, Ruleset, ScopeKey, ScopeMode,
    SenderStatus, SimStep, Tier,
};
use crate::store::{AdmitOp, AdmitParams, Change, PortfolioState, ScopeReport, Store, StoreError, UsageSnapshot};

/// The most messages one AdmitBatch call may carry.
pub const MAX_BATCH: usize = 1_000;

/// The most scopes a simulating sidecar keeps re-evaluating.
const MAX_SIMULATED_SCOPES: usize = 10_000;

/// Why a limiter call failed. A denial is a decision, not an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` is the request field at fault.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::InvalidArgument { field: field.into(), message: message.into() }
}

/// One message to admit, as the caller sent it.
#[derive(Debug, Clone, Default)]
pub struct AdmitInput {
    pub portfolio_id: String,
    pub sender_id: String,
    pub recipient: String,
    pub category: Category,
    pub template: String,
}

/// A scope's usage as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub scope: ScopeKey,
    pub snapshot: UsageSnapshot,
    /// Quality and upgrade projection; GetUsage and GetPortfolio fill it, Admit does not.
    pub detail: Option<UsageDetail>,
}

impl Usage {
    /// RESTRICTED: the window is full, so only replies inside service windows may go out.
    pub fn restricted(&self) -> bool {
        self.snapshot.remaining() == Some(0)
    }
}

/// What GetUsage adds to a scope's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDetail {
    /// The lowest known rating among the portfolio's, the scope's numbers' and the templates'.
    pub quality: Quality,
    /// The scope's number status in per-number scope, shown RESTRICTED while full.
    pub status: SenderStatus,
    pub projection: Projection,
    pub unique_7d: u64,
    pub unique_30d: u64,
}

/// The answer to one [`AdmitInput`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitAnswer {
    pub reason: Reason,
    /// Set when a new recipient was counted on a limited tier.
    pub lease: Option<String>,
    pub retry_after: Option<Duration>,
    pub usage: Usage,
}

/// Everything known about a portfolio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortfolioView {
    pub portfolio: String,
    pub state: PortfolioState,
    /// Senders blocked by configuration.
    pub blocked_senders: BTreeSet<String>,
    /// The portfolio's scope, or one per known number in per-number scope.
    pub usage: Vec<Usage>,
}

/// A change to a portfolio asked for through UpdatePortfolio: every field is optional.
#[derive(Debug, Clone, Default)]
pub struct PortfolioUpdate {
    pub tier: Option<String>,
    pub quality: Option<Quality>,
    /// (sender id, status, quality).
    pub senders: Vec<(String, Option<SenderStatus>, Option<Quality>)>,
    /// (template name, status, quality).
    pub templates: Vec<(String, Option<String>, Option<Quality>)>,
}

/// Validated, hashed form of an [`AdmitInput`].
struct Prepared {
    scope: ScopeKey,
    op: AdmitOp,
}

/// The limiter behind the API.
pub struct Limiter {
    store: Arc<dyn Store>,
    hasher: RecipientHasher,
    scope_mode: ScopeMode,
    ladder: policy::Ladder,
    default_tier: Tier,
    portfolio_tiers: BTreeMap<String, Tier>,
    blocked_senders: BTreeMap<String, BTreeSet<String>>,
    on_error: OnError,
    reserve_bp: u32,
    ruleset: Ruleset,
    tier_source: TierSource,
    service_window: Duration,
    /// Scopes a simulating sidecar has seen, to re-evaluate periodically.
    seen: Mutex<HashSet<ScopeKey>>,
}

impl Limiter {
    /// A limiter over `store` with the validated settings.
    pub fn new(settings: &Settings, store: Arc<dyn Store>) -> Limiter {
        Limiter {
            store,
            hasher: settings.store.hasher().clone(),
            scope_mode: settings.scope,
            ladder: settings.ladder.clone(),
            default_tier: settings.default_tier.clone(),
            portfolio_tiers: settings.portfolio_tiers.clone(),
            blocked_senders: settings.blocked_senders.clone(),
            on_error: settings.on_error,
            reserve_bp: settings.reserve_bp,
            ruleset: settings.ruleset,
            tier_source: settings.tier_source,
            service_window: settings.windows.service_window,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// The limit scope mode.
    pub fn scope_mode(&self) -> ScopeMode {
        self.scope_mode
    }

    /// The tier of a scope nobody has set: the portfolio's static tier, else the default.
    fn fallback(&self, scope: &ScopeKey) -> &Tier {
        self.portfolio_tiers.get(&scope.portfolio).unwrap_or(&self.default_tier)
    }

    /// Resolves the limit scope; `prefix` is prepended to field names (for batches).
    fn scope(&self, prefix: &str, portfolio: &str, sender: &str) -> Result<ScopeKey, Error> {
        policy::validate_id(portfolio).map_err(|m| invalid(format!("{prefix}portfolio_id"), m))?;
        if !sender.is_empty() || self.scope_mode == ScopeMode::PhoneNumber {
            policy::validate_id(sender).map_err(|m| {
                let why = if sender.is_empty() {
                    "is required in per-number scope (policy.scope = \"phone_number\")"
                } else {
                    &m
                };
                invalid(format!("{prefix}sender_id"), why)
            })?;
        }
        let sender = (self.scope_mode == ScopeMode::PhoneNumber).then(|| sender.to_owned());
        Ok(ScopeKey { portfolio: portfolio.to_owned(), sender })
    }

    /// The scope a sender of a portfolio sends in.
    pub fn scope_of(&self, portfolio: &str, sender: &str) -> ScopeKey {
        ScopeKey {
            portfolio: portfolio.to_owned(),
            sender: (self.scope_mode == ScopeMode::PhoneNumber).then(|| sender.to_owned()),
        }
    }

    fn recipient(&self, field: &str, raw: &str) -> Result<String, Error> {
        policy::normalize_recipient(raw).map_err(|m| invalid(field, m))
    }

    fn prepare(&self, prefix: &str, input: &AdmitInput) -> Result<Prepared, Error> {
        let scope = self.scope(prefix, &input.portfolio_id, &input.sender_id)?;
        let recipient = self.recipient(&format!("{prefix}recipient"), &input.recipient)?;
        if !input.template.is_empty() && (input.template.len() > 512 || input.template.contains(char::is_control)) {
            return Err(invalid(format!("{prefix}template"), "must be a template name of at most 512 characters"));
        }
        let sender = (!input.sender_id.is_empty()).then(|| input.sender_id.clone());
        let sender_blocked = sender
            .as_ref()
            .is_some_and(|s| self.blocked_senders.get(&input.portfolio_id).is_some_and(|b| b.contains(s)));
        let op = AdmitOp {
            member: self.hasher.recipient(&recipient),
            service_member: sender.as_ref().map(|s| self.hasher.service_window(s, &recipient)),
            category: input.category,
            template: (!input.template.is_empty()).then(|| input.template.clone()),
            sender,
            sender_blocked,
        };
        Ok(Prepared { scope, op })
    }

    /// Decides one message.
    pub async fn admit(&self, input: &AdmitInput) -> Result<AdmitAnswer, Error> {
        let prepared = self.prepare("", input)?;
        let mut answers = self.decide(vec![prepared]).await?;
        Ok(answers.pop().expect("one answer per request"))
    }

    /// Decides up to [`MAX_BATCH`] messages in order, each as if sent after the one before. A
    /// malformed request rejects the whole batch before anything is recorded.
    pub async fn admit_batch(&self, inputs: &[AdmitInput]) -> Result<Vec<AdmitAnswer>, Error> {
        if inputs.len() > MAX_BATCH {
            return Err(invalid(
                "requests",
                format!("carries {} requests; at most {MAX_BATCH} are allowed", inputs.len()),
            ));
        }
        let prepared = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| self.prepare(&format!("requests[{i}]."), input))
            .collect::<Result<Vec<_>, _>>()?;
        self.decide(prepared).await
    }

    /// One store call per scope, in order of first appearance; scopes do not interact, so the
    /// result is the same as deciding every message one after another.
    async fn decide(&self, prepared: Vec<Prepared>) -> Result<Vec<AdmitAnswer>, Error> {
        let started = Instant::now();
        let mut answers: Vec<Option<AdmitAnswer>> = vec![None; prepared.len()];
        // Each scope's messages, in order, with their places in the request.
        let mut groups: Vec<(ScopeKey, Vec<usize>, Vec<AdmitOp>)> = Vec::new();
        let mut group_of: HashMap<ScopeKey, usize> = HashMap::new();
        for (i, Prepared { scope, op }) in prepared.into_iter().enumerate() {
            let g = *group_of.entry(scope.clone()).or_insert_with(|| {
                groups.push((scope, Vec::new(), Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
            groups[g].2.push(op);
        }
        let mut granted: Vec<Lease> = Vec::new();
        for (scope, idx, ops) in &groups {
            let params = AdmitParams { fallback: self.fallback(scope).clone(), reserve_bp: self.reserve_bp };
            let admissions = match self.store.admit(scope, &params, ops).await {
                Ok(a) => a,
                Err(e) => {
                    metrics::store_error("admit", &e);
                    if self.on_error == OnError::Allow && e.is_transient() {
                        tracing::warn!(portfolio = %scope.portfolio, error = %e, "Store unavailable; admitting unchecked because store.on_error = \"allow\".");
                        for &i in idx {
                            answers[i] = Some(self.unchecked(scope, &params.fallback));
                        }
                        continue;
                    }
                    self.undo(&granted).await;
                    return Err(e.into());
                }
            };
            for ((&i, op), a) in idx.iter().zip(ops).zip(admissions) {
                let lease = a.lease_score.map(|score| Lease { scope: scope.clone(), member: op.member.clone(), score });
                if let Some(l) = &lease {
                    granted.push(l.clone());
                }
                answers[i] = Some(AdmitAnswer {
                    reason: a.reason,
                    lease: lease.map(|l| l.encode()),
                    retry_after: a.retry_after,
                    usage: Usage { scope: scope.clone(), snapshot: a.usage, detail: None },
                });
            }
        }
        let answers: Vec<AdmitAnswer> = answers.into_iter().map(|a| a.expect("every request answered")).collect();
        metrics::admit_latency(started.elapsed());
        for a in &answers {
            metrics::decision(&a.usage.scope.portfolio, a.reason);
        }
        for (scope, idx, _) in &groups {
            let last = idx.last().and_then(|&i| answers.get(i)).expect("group is not empty");
            metrics::usage(scope, &last.usage.snapshot);
        }
        self.remember(groups.into_iter().map(|(s, ..)| s));
        Ok(answers)
    }

    fn remember(&self, scopes: impl Iterator<Item = ScopeKey>) {
        if self.tier_source != TierSource::Simulate {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for scope in scopes {
            if seen.len() < MAX_SIMULATED_SCOPES {
                seen.insert(scope);
            }
        }
    }

    fn unchecked(&self, scope: &ScopeKey, fallback: &Tier) -> AdmitAnswer {
        metrics::fail_open();
        AdmitAnswer {
            reason: Reason::StoreUnavailable,
            lease: None,
            retry_after: None,
            usage: Usage {
                scope: scope.clone(),
                snapshot: UsageSnapshot { tier: fallback.clone(), counted: 0, next_slot_at: None },
                detail: None,
            },
        }
    }

    /// Gives back what earlier groups of a failed batch counted, so the batch is not half-applied.
    async fn undo(&self, leases: &[Lease]) {
        for lease in leases {
            if let Err(e) = self.store.release(lease).await {
                tracing::warn!(portfolio = %lease.scope.portfolio, error = %e, "Could not give back a slot of a failed batch; it frees itself when the window passes.");
            }
        }
    }

    /// Gives back the slot a lease names; false when it was already released or touched again.
    pub async fn release(&self, token: &str) -> Result<bool, Error> {
        let lease = Lease::decode(token).map_err(|m| invalid("lease", m))?;
        let released = self.store.release(&lease).await.inspect_err(|e| metrics::store_error("release", e))?;
        metrics::release(released);
        Ok(released)
    }

    /// Applies changes to a portfolio's persisted state; returns the store's clock.
    pub async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, Error> {
        Ok(self.store.apply(portfolio, changes).await.inspect_err(|e| metrics::store_error("apply", e))?)
    }

    /// The service window change of an inbound message from `recipient` to `sender`.
    pub fn inbound_change(&self, sender: &str, recipient: &str, at: Option<Micros>) -> Result<Change, Error> {
        let recipient = self.recipient("recipient", recipient)?;
        Ok(Change::Inbound { service_member: self.hasher.service_window(sender, &recipient), at })
    }

    /// Opens or restarts the (sender, recipient) service window; returns when it closes.
    pub async fn record_inbound(&self, portfolio: &str, sender: &str, recipient: &str) -> Result<Micros, Error> {
        policy::validate_id(portfolio).map_err(|m| invalid("portfolio_id", m))?;
        policy::validate_id(sender).map_err(|m| invalid("sender_id", m))?;
        let change = self.inbound_change(sender, recipient, None)?;
        let now = self.apply(portfolio, &[change]).await?;
        metrics::inbound();
        Ok(now.saturating_add(policy::micros(self.service_window)))
    }

    /// Records whether a recipient opted out of every number of the portfolio.
    pub async fn set_opt_out(&self, portfolio: &str, recipient: &str, opted_out: bool) -> Result<(), Error> {
        policy::validate_id(portfolio).map_err(|m| invalid("portfolio_id", m))?;
        let recipient = self.recipient("recipient", recipient)?;
        let change = Change::OptOut { member: self.hasher.recipient(&recipient), opted_out };
        self.apply(portfolio, &[change]).await?;
        Ok(())
    }

    /// Everything persisted about a portfolio, as stored.
    pub async fn state(&self, portfolio: &str) -> Result<PortfolioState, Error> {
        Ok(self.store.portfolio(portfolio).await.inspect_err(|e| metrics::store_error("portfolio", e))?)
    }

    /// The usage of a scope now, with its quality and upgrade projection.
    pub async fn usage(&self, portfolio: &str, sender: &str) -> Result<Usage, Error> {
        let scope = self.scope("", portfolio, sender)?;
        let state = self.state(portfolio).await?;
        self.scope_usage(&scope, &state).await
    }

    async fn scope_usage(&self, scope: &ScopeKey, state: &PortfolioState) -> Result<Usage, Error> {
        let report = self.report(scope).await?;
        let (usage, step) = self.detail(scope, state, &report);
        let usage = match step {
            Some(changes) => {
                self.apply(&scope.portfolio, &changes).await?;
                let report = self.report(scope).await?;
                self.detail(scope, state, &report).0
            }
            None => usage,
        };
        metrics::usage(scope, &usage.snapshot);
        if let Some(d) = &usage.detail {
            metrics::projection(scope, d.quality, d.unique_7d, &d.projection);
        }
        Ok(usage)
    }

    async fn report(&self, scope: &ScopeKey) -> Result<ScopeReport, Error> {
        Ok(self.store.usage(scope, self.fallback(scope)).await.inspect_err(|e| metrics::store_error("usage", e))?)
    }

    /// The usage with its projection, and in simulation the changes to apply now.
    fn detail(&self, scope: &ScopeKey, state: &PortfolioState, report: &ScopeReport) -> (Usage, Option<Vec<Change>>) {
        let senders: Vec<_> =
            state.senders.iter().filter(|(id, _)| scope.sender.as_ref().is_none_or(|s| s == *id)).collect();
        // Meta asks for high quality "across numbers and templates".
        let quality = Quality::overall(
            std::iter::once(state.quality)
                .chain(senders.iter().map(|(_, s)| s.quality))
                .chain(state.templates.values().map(|t| t.quality)),
        );
        let input = ProjectionInput {
            ladder: &self.ladder,
            ruleset: self.ruleset,
            tier: &report.usage.tier,
            tier_since: report.tier_since,
            quality,
            unique_7d: report.unique_7d,
            unique_30d: report.unique_30d,
            now: report.now,
        };
        let projection = policy::project(&input);
        let mut changes = None;
        if self.tier_source == TierSource::Simulate {
            let flagged: Vec<Micros> = senders
                .iter()
                .filter(|(_, s)| s.status == Some(SenderStatus::Flagged))
                .map(|(_, s)| s.since.unwrap_or(report.now))
                .collect();
            let flagged_since = match (flagged.iter().min(), report.flagged_since) {
                (None, _) => None,
                (Some(first), stored) => Some(stored.unwrap_or(*first).max(*first)),
            };
            let mut list = Vec::new();
            if flagged.is_empty() && report.flagged_since.is_some() {
                list.push(Change::Flagged { scope: scope.clone(), since: None });
            }
            match policy::simulate(&input, &projection, report.eligible_since, flagged_since) {
                SimStep::Nothing => {}
                SimStep::MarkEligible(at) => list.push(Change::Eligible { scope: scope.clone(), since: Some(at) }),
                SimStep::ClearEligible => list.push(Change::Eligible { scope: scope.clone(), since: None }),
                SimStep::Upgrade(tier) => {
                    tracing::info!(scope = %scope, from = %report.usage.tier.name, to = %tier.name, "Simulated upgrade.");
                    list.push(Change::Tier { scope: scope.clone(), tier, at: None });
                    list.push(Change::Eligible { scope: scope.clone(), since: None });
                }
                SimStep::Downgrade(tier) => {
                    tracing::info!(scope = %scope, from = %report.usage.tier.name, to = %tier.name, "Simulated downgrade after 7 days flagged.");
                    list.push(Change::Tier { scope: scope.clone(), tier, at: None });
                    list.push(Change::Flagged { scope: scope.clone(), since: Some(report.now) });
                }
            }
            changes = (!list.is_empty()).then_some(list);
        }
        let stored = scope.sender.as_ref().and_then(|s| state.senders.get(s)?.status).unwrap_or_default();
        let detail = UsageDetail {
            quality,
            status: stored.shown(report.usage.remaining() == Some(0)),
            projection,
            unique_7d: report.unique_7d,
            unique_30d: report.unique_30d,
        };
        (Usage { scope: scope.clone(), snapshot: report.usage.clone(), detail: Some(detail) }, changes)
    }

    /// Re-evaluates every scope this sidecar has admitted for, applying simulated tier moves.
    pub async fn simulate_seen(&self) {
        let scopes: Vec<ScopeKey> = self.seen.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        for scope in scopes {
            let result = async {
                let state = self.state(&scope.portfolio).await?;
                self.scope_usage(&scope, &state).await
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(scope = %scope, error = %e, "Tier simulation skipped a scope.");
            }
        }
    }

    /// Persists the tier of a scope for every sidecar sharing the store.
    pub async fn set_tier(&self, portfolio: &str, sender: &str, tier: &str) -> Result<Usage, Error> {
        let scope = self.scope("", portfolio, sender)?;
        let tier = self.tier("tier", tier)?;
        self.apply(portfolio, &[Change::Tier { scope: scope.clone(), tier: tier.clone(), at: None }]).await?;
        tracing::info!(scope = %scope, tier = %tier.name, "Tier set.");
        let state = self.state(portfolio).await?;
        self.scope_usage(&scope, &state).await
    }

    fn tier(&self, field: &str, name: &str) -> Result<Tier, Error> {
        self.ladder
            .get(name)
            .cloned()
            .ok_or_else(|| invalid(field, format!("unknown tier {name:?}; the ladder has {}", self.ladder.names())))
    }

    /// Applies an UpdatePortfolio request atomically and returns the portfolio after it.
    pub async fn update_portfolio(&self, portfolio: &str, update: &PortfolioUpdate) -> Result<PortfolioView, Error> {
        policy::validate_id(portfolio).map_err(|m| invalid("portfolio_id", m))?;
        let mut changes = Vec::new();
        if let Some(name) = &update.tier {
            let tier = self.tier("tier", name)?;
            match self.scope_mode {
                ScopeMode::Portfolio => {
                    changes.push(Change::Tier { scope: self.scope_of(portfolio, ""), tier, at: None })
                }
                ScopeMode::PhoneNumber if update.senders.is_empty() => {
                    return Err(invalid("tier", "in per-number scope, name the senders whose tier this is"));
                }
                ScopeMode::PhoneNumber => {
                    for (sender, ..) in &update.senders {
                        changes.push(Change::Tier {
                            scope: self.scope_of(portfolio, sender),
                            tier: tier.clone(),
                            at: None,
                        });
                    }
                }
            }
        }
        if let Some(q) = update.quality {
            changes.push(Change::Quality(q));
        }
        for (i, (sender, status, quality)) in update.senders.iter().enumerate() {
            policy::validate_id(sender).map_err(|m| invalid(format!("senders[{i}].sender_id"), m))?;
            if *status == Some(SenderStatus::Restricted) {
                return Err(invalid(
                    format!("senders[{i}].status"),
                    "RESTRICTED is derived from usage and cannot be set",
                ));
            }
            if let Some(status) = status {
                changes.push(Change::SenderStatus { sender: sender.clone(), status: *status, at: None });
            }
            if let Some(quality) = quality {
                changes.push(Change::SenderQuality { sender: sender.clone(), quality: *quality });
            }
        }
        for (i, (name, status, quality)) in update.templates.iter().enumerate() {
            if name.is_empty() || name.len() > 512 || name.contains(char::is_control) {
                return Err(invalid(format!("templates[{i}].name"), "must be a template name of 1 to 512 characters"));
            }
            if let Some(status) = status {
                changes.push(Change::TemplateStatus {
                    name: name.clone(),
                    status: status.to_ascii_uppercase(),
                    at: None,
                });
            }
            if let Some(quality) = quality {
                changes.push(Change::TemplateQuality { name: name.clone(), quality: *quality });
            }
        }
        if !changes.is_empty() {
            self.apply(portfolio, &changes).await?;
        }
        self.portfolio(portfolio).await
    }

    /// Everything known about a portfolio, with the usage of its scope (or of each known number).
    pub async fn portfolio(&self, portfolio: &str) -> Result<PortfolioView, Error> {
        policy::validate_id(portfolio).map_err(|m| invalid("portfolio_id", m))?;
        let state = self.state(portfolio).await?;
        let scopes: Vec<ScopeKey> = match self.scope_mode {
            ScopeMode::Portfolio => vec![self.scope_of(portfolio, "")],
            ScopeMode::PhoneNumber => state.senders.keys().map(|s| self.scope_of(portfolio, s)).collect(),
        };
        let mut usage = Vec::with_capacity(scopes.len());
        for scope in &scopes {
            usage.push(self.scope_usage(scope, &state).await?);
        }
        metrics::portfolio(portfolio, &state);
        Ok(PortfolioView {
            portfolio: portfolio.to_owned(),
            blocked_senders: self.blocked_senders.get(portfolio).cloned().unwrap_or_default(),
            state,
            usage,
        })
    }

    /// A tier as webhooks carry it, resolved against the ladder.
    pub fn resolve_tier(&self, value: &policy::TierValue) -> Option<Tier> {
        self.ladder.resolve(value)
    }
}
