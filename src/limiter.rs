//! The limiter: validates requests, resolves each one's limit scope and tier, hashes recipients,
//! asks the store, and records metrics. Everything the gRPC edge calls goes through here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{OnError, Settings};
use crate::hashing::RecipientHasher;
use crate::metrics;
use crate::policy::{self, Category, Lease, Micros, Reason, ScopeKey, ScopeMode, Tier};
use crate::store::{AdmitOp, Store, StoreError, UsageSnapshot};

/// The most messages one AdmitBatch call may carry.
pub const MAX_BATCH: usize = 1_000;

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
    on_error: OnError,
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
            on_error: settings.on_error,
        }
    }

    /// The store, for readiness checks.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
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

    fn prepare(&self, prefix: &str, input: &AdmitInput) -> Result<Prepared, Error> {
        let scope = self.scope(prefix, &input.portfolio_id, &input.sender_id)?;
        let recipient =
            policy::normalize_recipient(&input.recipient).map_err(|m| invalid(format!("{prefix}recipient"), m))?;
        let op = AdmitOp {
            member: self.hasher.recipient(&recipient),
            service_member: (!input.sender_id.is_empty())
                .then(|| self.hasher.service_window(&input.sender_id, &recipient)),
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
        let mut groups: Vec<(ScopeKey, Vec<usize>)> = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            match groups.iter_mut().find(|(s, _)| *s == p.scope) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((p.scope.clone(), vec![i])),
            }
        }
        let mut answers: Vec<Option<AdmitAnswer>> = vec![None; prepared.len()];
        let mut granted: Vec<Lease> = Vec::new();
        for (scope, idx) in &groups {
            let fallback = self.fallback(scope);
            let ops: Vec<AdmitOp> = idx.iter().map(|&i| prepared[i].op.clone()).collect();
            let admissions = match self.store.admit(scope, fallback, &ops).await {
                Ok(a) => a,
                Err(e) => {
                    metrics::store_error("admit", &e);
                    if self.on_error == OnError::Allow && e.is_transient() {
                        tracing::warn!(portfolio = %scope.portfolio, error = %e, "Store unavailable; admitting unchecked because store.on_error = \"allow\".");
                        for &i in idx {
                            answers[i] = Some(self.unchecked(scope, fallback));
                        }
                        continue;
                    }
                    self.undo(&granted).await;
                    return Err(e.into());
                }
            };
            for (&i, a) in idx.iter().zip(admissions) {
                let lease = a.lease_score.map(|score| Lease {
                    scope: scope.clone(),
                    member: prepared[i].op.member.clone(),
                    score,
                });
                if let Some(l) = &lease {
                    granted.push(l.clone());
                }
                answers[i] = Some(AdmitAnswer {
                    reason: a.reason,
                    lease: lease.map(|l| l.encode()),
                    retry_after: a.retry_after,
                    usage: Usage { scope: scope.clone(), snapshot: a.usage },
                });
            }
        }
        let answers: Vec<AdmitAnswer> = answers.into_iter().map(|a| a.expect("every request answered")).collect();
        metrics::admit_latency(started.elapsed());
        for a in &answers {
            metrics::decision(a.reason);
        }
        for (scope, idx) in &groups {
            let last = idx.last().and_then(|&i| answers.get(i)).expect("group is not empty");
            metrics::usage(scope, &last.usage.snapshot);
        }
        Ok(answers)
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

    /// Opens or restarts the (sender, recipient) service window; returns when it closes.
    pub async fn record_inbound(&self, portfolio: &str, sender: &str, recipient: &str) -> Result<Micros, Error> {
        policy::validate_id(portfolio).map_err(|m| invalid("portfolio_id", m))?;
        policy::validate_id(sender).map_err(|m| invalid("sender_id", m))?;
        let recipient = policy::normalize_recipient(recipient).map_err(|m| invalid("recipient", m))?;
        let member = self.hasher.service_window(sender, &recipient);
        let closes = self
            .store
            .record_inbound(portfolio, &member)
            .await
            .inspect_err(|e| metrics::store_error("record_inbound", e))?;
        metrics::inbound();
        Ok(closes)
    }

    /// The usage of a scope now.
    pub async fn usage(&self, portfolio: &str, sender: &str) -> Result<Usage, Error> {
        let scope = self.scope("", portfolio, sender)?;
        let snapshot =
            self.store.usage(&scope, self.fallback(&scope)).await.inspect_err(|e| metrics::store_error("usage", e))?;
        metrics::usage(&scope, &snapshot);
        Ok(Usage { scope, snapshot })
    }

    /// Persists the tier of a scope for every sidecar sharing the store.
    pub async fn set_tier(&self, portfolio: &str, sender: &str, tier: &str) -> Result<Usage, Error> {
        let scope = self.scope("", portfolio, sender)?;
        let tier = self
            .ladder
            .get(tier)
            .ok_or_else(|| invalid("tier", format!("unknown tier {tier:?}; the ladder has {}", self.ladder.names())))?;
        let snapshot = self.store.set_tier(&scope, tier).await.inspect_err(|e| metrics::store_error("set_tier", e))?;
        tracing::info!(scope = %scope, tier = %tier.name, "Tier set.");
        metrics::usage(&scope, &snapshot);
        Ok(Usage { scope, snapshot })
    }
}
