//! GetUsage and GetPortfolio: a scope's usage with its quality and upgrade projection, and
//! everything known about a portfolio. This is the only place RESTRICTED is worked out: Meta
//! shows a number RESTRICTED while its limit is used up, so it is derived from usage, never
//! stored.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::TierSource;
use crate::error::Error;
use crate::metrics;
use crate::policy::{self, Projection, ProjectionInput, Quality, ScopeKey, ScopeMode, SenderStatus};
use crate::store::{Change, PortfolioState, ScopeReport, UsageSnapshot};

use super::input::{FieldPath, PortfolioId};
use super::Limiter;

/// A scope's usage as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The portfolio, or one number of it in per-number scope.
    pub scope: ScopeKey,
    /// Counted recipients against the tier.
    pub snapshot: UsageSnapshot,
    /// Quality and upgrade projection; GetUsage and GetPortfolio fill it, Admit does not.
    pub detail: Option<UsageDetail>,
}

impl Usage {
    /// RESTRICTED: the window is full, so only replies inside service windows may go out.
    pub fn restricted(&self) -> bool {
        self.snapshot.remaining() == Some(0)
    }

    /// The status to show for the scope: its number's, or CONNECTED when Admit knows no more,
    /// either way RESTRICTED while the scope is full.
    pub fn status(&self) -> SenderStatus {
        self.detail.as_ref().map_or(SenderStatus::Connected.shown(self.restricted()), |d| d.status)
    }
}

/// What GetUsage adds to a scope's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDetail {
    /// The lowest known rating among the portfolio's, the scope's numbers' and the templates'.
    pub quality: Quality,
    /// The scope's number status in per-number scope, shown RESTRICTED while full.
    pub status: SenderStatus,
    /// What the next upgrade needs, and how far the scope is.
    pub projection: Projection,
    /// Unique recipients reached outside service windows over the last 7 days.
    pub unique_7d: u64,
    /// Unique recipients reached outside service windows over the last 30 days.
    pub unique_30d: u64,
}

/// Everything known about a portfolio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortfolioView {
    /// The portfolio's id.
    pub portfolio: String,
    /// Everything persisted about it, as stored.
    pub state: PortfolioState,
    /// Senders blocked by configuration.
    pub blocked_senders: BTreeSet<String>,
    /// The portfolio's scope, or one per known number in per-number scope (then the portfolio's
    /// own, when Meta reported a business-wide limit).
    pub usage: Vec<Usage>,
    /// The mode in force: set by UpdatePortfolio, else configured.
    pub mode: crate::policy::Mode,
    /// Each known number's throughput level in force (messages per second): configured, else
    /// learnt from Meta, else the default.
    pub throughput_mps: BTreeMap<String, u32>,
}

impl PortfolioView {
    /// The status to show for a known number: as stored, but RESTRICTED while the scope it
    /// sends in is full.
    pub fn sender_status(&self, sender: &str) -> SenderStatus {
        let full =
            self.usage.iter().filter(|u| u.restricted()).any(|u| u.scope.sender.as_deref().is_none_or(|s| s == sender));
        let stored = self.state.senders.get(sender).and_then(|s| s.status);
        stored.unwrap_or_default().shown(full)
    }
}

impl Limiter {
    /// The usage of a scope now, with its quality and upgrade projection.
    pub async fn usage(&self, portfolio: &str, sender: &str) -> Result<Usage, Error> {
        let (scope, _) = self.parse_scope(portfolio, sender, FieldPath::TOP)?;
        self.require_served(&scope, FieldPath::TOP).await?;
        let state = self.state(portfolio).await?;
        self.scope_usage(&scope, &state).await
    }

    /// Everything known about a portfolio, with the usage of its scope (or of each known number).
    pub async fn portfolio(&self, portfolio: &str) -> Result<PortfolioView, Error> {
        let id = PortfolioId::parse(portfolio, FieldPath::TOP)?;
        self.require_served(&ScopeKey { portfolio: id.as_str().to_owned(), sender: None }, FieldPath::TOP).await?;
        self.view(&id).await
    }

    /// The portfolios this sidecar tracks, sorted: those in `[[portfolios]]` and those with metric
    /// labels of their own (the first `metrics.max_portfolios` seen since it started). The status
    /// page shows these and no others.
    pub fn tracked(&self) -> Vec<String> {
        let mut ids: BTreeSet<String> = self.configured.iter().cloned().collect();
        ids.extend(self.labels.portfolios());
        ids.into_iter().collect()
    }

    /// [`Limiter::portfolio`] of a portfolio already served.
    pub(super) async fn view(&self, portfolio: &PortfolioId) -> Result<PortfolioView, Error> {
        let portfolio = portfolio.as_str();
        let state = self.state(portfolio).await?;
        let scopes: Vec<ScopeKey> = match self.scope_mode {
            ScopeMode::Portfolio => vec![self.scope_of(portfolio, "")],
            ScopeMode::PhoneNumber => state.senders.keys().map(|s| self.scope_of(portfolio, s)).collect(),
        };
        let mut usage = Vec::with_capacity(scopes.len());
        for scope in &scopes {
            usage.push(self.scope_usage(scope, &state).await?);
        }
        if self.scope_mode == ScopeMode::PhoneNumber {
            // A business-wide limit that Meta reported without a per-number one (see
            // `reported_tier_changes`) is shown as the portfolio's own, last.
            let whole = ScopeKey { portfolio: portfolio.to_owned(), sender: None };
            let report = self.report(&whole).await?;
            if report.tier_since.is_some() {
                usage.push(Usage { scope: whole, snapshot: report.usage, detail: None });
            }
        }
        metrics::portfolio(&self.labels, portfolio, &state);
        self.labels.seen(portfolio);
        Ok(PortfolioView {
            portfolio: portfolio.to_owned(),
            blocked_senders: self.blocked_senders.get(portfolio).cloned().unwrap_or_default(),
            mode: state.mode.unwrap_or_else(|| self.configured_mode(portfolio)),
            throughput_mps: state
                .senders
                .iter()
                .map(|(id, s)| (id.clone(), self.throughput.level(id, s.throughput_mps)))
                .collect(),
            state,
            usage,
        })
    }

    /// A scope's usage with its detail. A simulating sidecar applies the tier move the reading
    /// calls for first, so what it answers is the state after that move.
    pub(super) async fn scope_usage(&self, scope: &ScopeKey, state: &PortfolioState) -> Result<Usage, Error> {
        let report = self.report(scope).await?;
        let simulate = self.tier_source == TierSource::Simulate;
        let (usage, step) = self.detail(scope, state, &report, simulate);
        let usage = match step {
            Some(changes) => {
                self.apply(&scope.portfolio, &changes).await?;
                let report = self.report(scope).await?;
                self.detail(scope, state, &report, false).0
            }
            None => usage,
        };
        metrics::usage(&self.labels, scope, &usage.snapshot);
        if let Some(d) = &usage.detail {
            metrics::projection(&self.labels, scope, d.quality, d.unique_7d, &d.projection);
        }
        Ok(usage)
    }

    /// The usage with its projection, and with `simulate` the changes the simulated rules call
    /// for now.
    pub(super) fn detail(
        &self,
        scope: &ScopeKey,
        state: &PortfolioState,
        report: &ScopeReport,
        simulate: bool,
    ) -> (Usage, Option<Vec<Change>>) {
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
        let changes = if simulate { self.simulation_step(scope, &senders, report, &input, &projection) } else { None };
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
}
