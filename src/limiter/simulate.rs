//! Simulation (`policy.tier_source = "simulate"`): tiergate applies the ruleset's upgrades and
//! downgrades itself after the stated delays, so a sandbox behaves like production over time.
//! [`policy::simulate`] decides; this file keeps the scopes to re-evaluate and turns a decided
//! step into store changes.

use crate::config::TierSource;
use crate::policy::{self, Micros, Projection, ProjectionInput, ScopeKey, SenderStatus, SimStep};
use crate::store::{Change, SenderState};

use super::Limiter;

/// The most scopes a simulating sidecar keeps re-evaluating.
const MAX_SIMULATED_SCOPES: usize = 10_000;

impl Limiter {
    /// Notes scopes this sidecar admitted for, so [`Limiter::simulate_seen`] re-evaluates them.
    pub(super) fn remember(&self, scopes: impl Iterator<Item = ScopeKey>) {
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

    /// The changes the simulated rules call for now, given the scope's numbers and report.
    pub(super) fn simulation_step(
        &self,
        scope: &ScopeKey,
        senders: &[(&String, &SenderState)],
        report: &crate::store::ScopeReport,
        input: &ProjectionInput<'_>,
        projection: &Projection,
    ) -> Option<Vec<Change>> {
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
        match policy::simulate(input, projection, report.eligible_since, flagged_since) {
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
                // Seed 003: a number not out of the red within 7 days "will still return to a
                // Connected status but with a lower messaging limit". Connected, it is no longer
                // counted as flagged, so it drops once, not once every 7 days.
                let connected =
                    senders.iter().filter(|(_, s)| s.status == Some(SenderStatus::Flagged)).map(|(id, _)| {
                        Change::SenderStatus { sender: (*id).clone(), status: SenderStatus::Connected, at: None }
                    });
                list.extend(connected);
                list.push(Change::Flagged { scope: scope.clone(), since: None });
            }
        }
        (!list.is_empty()).then_some(list)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use crate::config::Config;
    use crate::limiter::{Limiter, PortfolioUpdate};
    use crate::policy::{self, Micros, SenderStatus, FLAGGED_DOWNGRADE_AFTER};
    use crate::store::memory::MemoryStore;
    use crate::store::Clock;

    struct ManualClock(AtomicU64);

    impl Clock for ManualClock {
        fn now(&self) -> Micros {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn after_a_7_day_flagged_downgrade_the_number_is_connected_and_drops_no_further() {
        let settings =
            Config::from_toml("[policy]\nladder = \"legacy\"\ntier_source = \"simulate\"").unwrap().validate().unwrap();
        let clock = Arc::new(ManualClock(AtomicU64::new(1_800_000_000_000_000)));
        let store = Arc::new(MemoryStore::with_clock(settings.windows, clock.clone()));
        let limiter = Limiter::new(&settings, store);
        let week_and_a_minute = policy::micros(FLAGGED_DOWNGRADE_AFTER) + 60_000_000;
        limiter.set_tier("acme", "", "TIER_100K").await.unwrap();
        let flag = PortfolioUpdate {
            senders: vec![("n1".into(), Some(SenderStatus::Flagged), None)],
            ..PortfolioUpdate::default()
        };
        limiter.update_portfolio("acme", &flag).await.unwrap();
        assert_eq!(limiter.usage("acme", "").await.unwrap().snapshot.tier.name, "TIER_100K");

        clock.0.fetch_add(week_and_a_minute, Ordering::SeqCst);
        assert_eq!(limiter.usage("acme", "").await.unwrap().snapshot.tier.name, "TIER_10K");
        let view = limiter.portfolio("acme").await.unwrap();
        assert_eq!(view.state.senders["n1"].status, Some(SenderStatus::Connected), "back to CONNECTED");

        clock.0.fetch_add(week_and_a_minute, Ordering::SeqCst);
        assert_eq!(limiter.usage("acme", "").await.unwrap().snapshot.tier.name, "TIER_10K", "one drop, not one a week");

        // Flagged again by Meta, it can drop again after another 7 days.
        limiter.update_portfolio("acme", &flag).await.unwrap();
        limiter.usage("acme", "").await.unwrap();
        clock.0.fetch_add(week_and_a_minute, Ordering::SeqCst);
        assert_eq!(limiter.usage("acme", "").await.unwrap().snapshot.tier.name, "TIER_1K");
    }
}
