//! The scheduled refresh of the per-scope gauges: every `metrics.refresh_interval`, each portfolio
//! this sidecar has seen lately (an Admit, a read, a webhook, an inbound message) is read again
//! from the store and its gauges published, so `tiergate_unique_recipients` follows contacts
//! leaving the window without anyone calling GetUsage. It only reads: nothing is written to the
//! store, not even a simulated tier move, and reads create nothing there.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::error::{Error, Kind};
use crate::metrics;
use crate::policy::{ScopeKey, ScopeMode};

use super::Limiter;

impl Limiter {
    /// How long a portfolio's gauges are refreshed after this sidecar last saw it: one window for
    /// the contacts it made to leave, and one more in which its gauges show that, rather than
    /// stopping at the edge. Then its series are dropped until it is seen again.
    pub fn metrics_idle(&self) -> Duration {
        self.window.saturating_mul(2)
    }

    /// Forgets the portfolios idle for longer than [`Limiter::metrics_idle`], then reads every
    /// other one again and publishes its gauges. Stops at the first transient store failure:
    /// the next refresh tries again.
    pub async fn refresh_metrics(&self) {
        self.labels.forget_idle(self.metrics_idle());
        for (portfolio, senders) in self.labels.active() {
            if let Err(e) = self.refresh(&portfolio, &senders).await {
                tracing::debug!(portfolio, error = %e, "Metrics refresh skipped a portfolio.");
                if e.kind() == Kind::Unavailable {
                    return;
                }
            }
        }
    }

    /// Publishes the gauges of one portfolio's scopes with labels of their own: the portfolio's,
    /// or in per-number scope those of its known numbers and of the `senders` it has gauges for.
    async fn refresh(&self, portfolio: &str, senders: &[String]) -> Result<(), Error> {
        let state = self.state(portfolio).await?;
        let scopes: Vec<ScopeKey> = match self.scope_mode {
            ScopeMode::Portfolio => vec![self.scope_of(portfolio, "")],
            ScopeMode::PhoneNumber => {
                let known = state.senders.keys().chain(senders.iter().filter(|s| !s.is_empty()));
                let ids: BTreeSet<&String> = known.collect();
                ids.into_iter().map(|s| self.scope_of(portfolio, s)).collect()
            }
        };
        for scope in scopes.iter().filter(|s| self.labels.own(s)) {
            let report = self.report(scope).await?;
            let (usage, _) = self.detail(scope, &state, &report, false);
            metrics::refreshed_usage(&self.labels, scope, &usage.snapshot);
            if let Some(d) = &usage.detail {
                metrics::projection(&self.labels, scope, d.quality, d.unique_7d, &d.projection);
            }
        }
        metrics::portfolio(&self.labels, portfolio, &state);
        Ok(())
    }
}
