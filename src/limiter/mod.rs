//! The limiter: the service behind both edges. Each request's whole path lives in one file, the
//! way a command does in mini-redis:
//!
//! - [`input`]: request fields parsed once into checked types that name their field in errors.
//! - `admit`: Admit and AdmitBatch: prepare, group by scope, fail open, undo a failed batch.
//! - `coalesce`: concurrent admissions of one scope share a store call (natural batching).
//! - `release`: leases and Release.
//! - `read`: GetUsage and GetPortfolio, the only place RESTRICTED is worked out.
//! - `change`: tiers, opt-outs, statuses, templates and service windows, from gRPC calls and
//!   from Meta's webhook events alike.
//! - `simulate`: applying the ruleset's tier moves when `policy.tier_source = "simulate"`.
//!
//! This module holds the [`Limiter`] itself and what every path shares: the scope and fallback
//! tier of a request, which portfolios are served (`server.portfolios`), and the store calls with
//! their error metrics and the [`StoreWatch`] told of an outage.

mod admit;
mod change;
mod coalesce;
pub mod input;
mod read;
mod refresh;
mod release;
mod simulate;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{OnError, PortfolioAccess, Settings, TierSource};
use crate::hashing::{LeaseSigner, RecipientHasher};
use crate::metrics;
use crate::policy::rate::ThroughputLevels;
use crate::policy::{Ladder, Micros, Mode, Ruleset, ScopeKey, ScopeMode, Tier};
use crate::store::{Change, PortfolioState, Rates, ScopeReport, Store, StoreError};

pub use crate::error::Error;
pub use admit::{AdmitAnswer, AdmitInput, MAX_BATCH};
pub use change::{Event, Inbound, NumberEvent, PortfolioUpdate, Reported, ReportedLimits, Status};
pub use input::{FieldPath, IdempotencyKey, PortfolioId, Recipient, SenderId, TemplateLanguage, TemplateName};
pub use read::{PortfolioView, Usage, UsageDetail};

/// The limiter behind the API.
pub struct Limiter {
    store: Arc<dyn Store>,
    hasher: RecipientHasher,
    scope_mode: ScopeMode,
    ladder: Ladder,
    default_tier: Tier,
    portfolio_tiers: BTreeMap<String, Tier>,
    blocked_senders: BTreeMap<String, BTreeSet<String>>,
    on_error: OnError,
    reserve_bp: u32,
    ruleset: Ruleset,
    tier_source: TierSource,
    service_window: Duration,
    /// The rolling window of the messaging limit.
    window: Duration,
    /// Scopes a simulating sidecar has seen, to re-evaluate periodically.
    seen: Mutex<HashSet<ScopeKey>>,
    /// Portfolios already logged for a webhook limit that was business-wide only (per-number scope).
    no_number_limit_logged: Mutex<HashSet<String>>,
    /// Signs the leases Admit hands out and checks those Release gets, under the store's key.
    leases: LeaseSigner,
    /// Which portfolios and numbers have metric labels of their own.
    labels: metrics::Labels,
    /// Whether only configured or stored portfolios are served.
    access: PortfolioAccess,
    /// The `[[portfolios]]` ids.
    configured: HashSet<String>,
    /// Portfolios found in the store while `access` is `Configured` (at most [`MAX_KNOWN`]).
    known: Mutex<HashSet<String>>,
    /// Told when a store call fails with a transient error.
    store_watch: Option<Arc<dyn StoreWatch>>,
    /// Shares admission calls among concurrent callers of one scope.
    coalesce: coalesce::Coalescer,
    /// The rate rules (`[policy.throughput]`, `[policy.pair_rate]`).
    rates: Rates,
    /// Each number's configured throughput level.
    throughput: ThroughputLevels,
    /// `policy.mode`, and `[[portfolios]] mode` winning over it.
    mode: Mode,
    portfolio_modes: BTreeMap<String, Mode>,
    /// The throughput backoff episodes (Meta's 130429) this sidecar counted and logged.
    backoff_episodes: change::BackoffEpisodes,
}

/// The most portfolios remembered as found in the store; beyond, each call asks the store again.
const MAX_KNOWN: usize = 10_000;

/// Told, before the failed call answers, when a store call fails with a transient error, so
/// readiness (gRPC health) follows an outage at once rather than at the next probe.
#[async_trait]
pub trait StoreWatch: Send + Sync + 'static {
    /// A store call failed with `error`, which retrying may cure.
    async fn unavailable(&self, error: &StoreError);
}

impl Limiter {
    /// A limiter over `store` with the validated settings.
    pub fn new(settings: &Settings, store: Arc<dyn Store>) -> Limiter {
        let levels = settings.throughput.rule.is_some().then(|| settings.throughput.clone());
        let labels = metrics::Labels::new(settings.metrics.max_portfolios, settings.portfolios.iter().cloned())
            .with_throughput(levels);
        metrics::start(&labels, &settings.portfolios);
        let mode = |p: &String| settings.portfolio_modes.get(p).copied().unwrap_or(settings.mode);
        metrics::shadow_start(
            &labels,
            settings.portfolios.iter().filter(|p| mode(p) == Mode::Shadow).map(String::as_str),
        );
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
            window: settings.windows.window,
            seen: Mutex::new(HashSet::new()),
            no_number_limit_logged: Mutex::new(HashSet::new()),
            leases: settings.store.hasher().lease_signer(),
            labels,
            access: settings.server.portfolios,
            configured: settings.portfolios.iter().cloned().collect(),
            known: Mutex::new(HashSet::new()),
            store_watch: None,
            coalesce: coalesce::Coalescer::default(),
            rates: settings.rates,
            throughput: settings.throughput.clone(),
            mode: settings.mode,
            portfolio_modes: settings.portfolio_modes.clone(),
            backoff_episodes: change::BackoffEpisodes::default(),
        }
    }

    /// The mode configured for a portfolio: its `[[portfolios]] mode`, else `policy.mode`. One set
    /// by UpdatePortfolio, kept in the store, wins over both.
    pub(crate) fn configured_mode(&self, portfolio: &str) -> Mode {
        self.portfolio_modes.get(portfolio).copied().unwrap_or(self.mode)
    }

    /// The same limiter, telling `watch` of every transient store failure.
    pub fn with_store_watch(mut self, watch: Arc<dyn StoreWatch>) -> Limiter {
        self.store_watch = Some(watch);
        self
    }

    /// Which portfolios and numbers have metric labels of their own, with the gauges of those
    /// seen lately.
    pub fn labels(&self) -> &metrics::Labels {
        &self.labels
    }

    /// Counts a failed store call of `op` and, when retrying may cure it, tells the watch.
    async fn store_failed(&self, op: &'static str, e: &StoreError) {
        metrics::store_error(op, e);
        if let (true, Some(watch)) = (e.is_transient(), &self.store_watch) {
            watch.unavailable(e).await;
        }
    }

    /// The scope a sender of a portfolio sends in.
    pub fn scope_of(&self, portfolio: &str, sender: &str) -> ScopeKey {
        ScopeKey {
            portfolio: portfolio.to_owned(),
            sender: (self.scope_mode == ScopeMode::PhoneNumber).then(|| sender.to_owned()),
        }
    }

    /// The tier of a scope nobody has set: the portfolio's static tier, else the default.
    fn fallback(&self, scope: &ScopeKey) -> &Tier {
        self.portfolio_tiers.get(&scope.portfolio).unwrap_or(&self.default_tier)
    }

    /// Applies changes to a portfolio's persisted state; returns the store's clock.
    async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, Error> {
        match self.store.apply(portfolio, changes).await {
            Ok(now) => Ok(now),
            Err(e) => {
                self.store_failed("apply", &e).await;
                Err(e.into())
            }
        }
    }

    /// Everything persisted about a portfolio, as stored.
    async fn state(&self, portfolio: &str) -> Result<PortfolioState, Error> {
        match self.store.portfolio(portfolio).await {
            Ok(state) => Ok(state),
            Err(e) => {
                self.store_failed("portfolio", &e).await;
                Err(e.into())
            }
        }
    }

    /// The store's report on a scope's usage.
    async fn report(&self, scope: &ScopeKey) -> Result<ScopeReport, Error> {
        match self.store.usage(scope, self.fallback(scope)).await {
            Ok(report) => Ok(report),
            Err(e) => {
                self.store_failed("usage", &e).await;
                Err(e.into())
            }
        }
    }

    /// With `server.portfolios = "configured"`, refuses a scope whose portfolio is neither in
    /// `[[portfolios]]` nor known to the store: it has stored state (numbers, templates, quality,
    /// alerts, opt-outs), or a tier was set for the scope or for the whole portfolio. `at` names
    /// the field at fault. A portfolio found in the store is remembered, so it is asked once.
    pub(super) async fn require_served(&self, scope: &ScopeKey, at: FieldPath) -> Result<(), Error> {
        let portfolio = &scope.portfolio;
        if self.access == PortfolioAccess::Any || self.configured.contains(portfolio) {
            return Ok(());
        }
        if self.known.lock().unwrap_or_else(|e| e.into_inner()).contains(portfolio) {
            return Ok(());
        }
        let whole = ScopeKey { portfolio: portfolio.clone(), sender: None };
        let stored = self.state(portfolio).await? != PortfolioState::default()
            || self.report(&whole).await?.tier_since.is_some()
            || (scope.sender.is_some() && self.report(scope).await?.tier_since.is_some());
        if !stored {
            return Err(at.not_found(
                "portfolio_id",
                format!(
                    "portfolio {} is neither in [[portfolios]] nor known to the store (server.portfolios = \"configured\")",
                    crate::error::quote(portfolio)
                ),
            ));
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() < MAX_KNOWN {
            known.insert(portfolio.clone());
        }
        Ok(())
    }
}
