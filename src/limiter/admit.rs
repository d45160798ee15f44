//! Admit and AdmitBatch: each message is checked and hashed, the batch is grouped by scope into
//! one store call per scope, an unchecked message is let through only when the store is down and
//! `store.on_error = "allow"`, and a batch that fails half way gives back what it had counted.
//!
//! Each scope's messages go to the store through the limiter's coalescer (`coalesce`),
//! which lets concurrent calls of one scope share a store call without changing their answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::config::OnError;
use crate::error::Error;
use crate::metrics;
use crate::policy::{Category, Decision, Lease, Reason, ScopeKey, Tier};
use crate::store::{AdmitOp, AdmitParams, PortfolioState, UsageSnapshot};

use super::input::{FieldPath, IdempotencyKey, Recipient, TemplateLanguage, TemplateName};
use super::read::Usage;
use super::Limiter;

/// The most messages one AdmitBatch call may carry.
pub const MAX_BATCH: usize = 1_000;

/// One message to admit, as the caller sent it.
#[derive(Debug, Clone, Default)]
pub struct AdmitInput {
    /// The business portfolio.
    pub portfolio_id: String,
    /// The sending number; required in per-number scope.
    pub sender_id: String,
    /// A phone number or business-scoped user id, as the caller wrote it.
    pub recipient: String,
    /// The message's category.
    pub category: Category,
    /// The template the message uses; empty for none.
    pub template: String,
    /// The template's language (`en_US`); empty when not named, and then the message is blocked
    /// if any language of the template is.
    pub template_language: String,
    /// Makes a retry safe; empty for none (see `AdmitRequest.idempotency_key` and
    /// [`Remembered`](crate::policy::Remembered)).
    pub idempotency_key: String,
    /// How long the caller will be held for a paced slot (zero: never); the edge has already
    /// shortened it to the call's deadline.
    pub max_wait: Duration,
}

/// The answer to one [`AdmitInput`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitAnswer {
    /// Why it was admitted or denied.
    pub reason: Reason,
    /// Set when a new recipient was counted (on every tier, unlimited ones too).
    pub lease: Option<String>,
    /// When the limit is reached: how long until a slot frees.
    pub retry_after: Option<Duration>,
    /// The scope's usage right after the decision.
    pub usage: Usage,
    /// How long the call was held for its paced slot.
    pub waited: Duration,
    /// In shadow mode: what enforcing would have answered.
    pub shadow: Option<Reason>,
}

/// A checked and hashed [`AdmitInput`].
struct Prepared {
    scope: ScopeKey,
    op: AdmitOp,
}

/// One scope's messages of a call, in order, with their places in the request.
struct Group {
    scope: ScopeKey,
    places: Vec<usize>,
    ops: Vec<AdmitOp>,
}

impl Limiter {
    /// Decides one message.
    pub async fn admit(&self, input: &AdmitInput) -> Result<AdmitAnswer, Error> {
        let prepared = self.prepare(input, FieldPath::TOP)?;
        self.require_served(&prepared.scope, FieldPath::TOP).await?;
        let mut answers = self.decide(vec![prepared]).await?;
        Ok(answers.pop().expect("one answer per request"))
    }

    /// Decides up to [`MAX_BATCH`] messages in order, each as if sent after the one before. A
    /// malformed request rejects the whole batch before anything is recorded.
    pub async fn admit_batch(&self, inputs: &[AdmitInput]) -> Result<Vec<AdmitAnswer>, Error> {
        if inputs.len() > MAX_BATCH {
            return Err(FieldPath::TOP
                .invalid("requests", format!("carries {} requests; at most {MAX_BATCH} are allowed", inputs.len())));
        }
        let prepared = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| self.prepare(input, FieldPath::batch(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut checked = HashSet::new();
        for (i, p) in prepared.iter().enumerate() {
            if checked.insert(&p.scope.portfolio) {
                self.require_served(&p.scope, FieldPath::batch(i)).await?;
            }
        }
        self.decide(prepared).await
    }

    fn prepare(&self, input: &AdmitInput, at: FieldPath) -> Result<Prepared, Error> {
        let (scope, sender) = self.parse_scope(&input.portfolio_id, &input.sender_id, at)?;
        let recipient = Recipient::parse(&input.recipient, at)?;
        let template = TemplateName::optional(&input.template, at)?;
        let template_language = TemplateLanguage::optional(&input.template_language, at, "template_language")?;
        if template.is_none() && template_language.is_some() {
            return Err(at.invalid("template_language", "names a language but the message names no template"));
        }
        let idempotency_key = IdempotencyKey::optional(&input.idempotency_key, at)?;
        let sender = sender.map(|s| s.into_string());
        let sender_blocked = sender
            .as_ref()
            .is_some_and(|s| self.blocked_senders.get(&input.portfolio_id).is_some_and(|b| b.contains(s)));
        let op_sender_mps = sender.as_ref().and_then(|s| self.throughput.configured(s));
        let op = AdmitOp {
            member: self.hasher.recipient(recipient.as_str()),
            service_member: sender.as_ref().map(|s| self.hasher.service_window(s, recipient.as_str())),
            category: input.category,
            template: template.map(TemplateName::into_string),
            sender,
            sender_blocked,
            template_language: template_language.map(TemplateLanguage::into_string),
            idempotency_key: idempotency_key.map(|k| self.hasher.idempotency_key(k.as_str())),
            max_wait: input.max_wait,
            throughput_mps: op_sender_mps,
        };
        Ok(Prepared { scope, op })
    }

    /// One store call per scope, in order of first appearance; scopes do not interact, so the
    /// result is the same as deciding every message one after another.
    async fn decide(&self, prepared: Vec<Prepared>) -> Result<Vec<AdmitAnswer>, Error> {
        let started = Instant::now();
        let mut answers: Vec<Option<AdmitAnswer>> = vec![None; prepared.len()];
        let groups = group_by_scope(prepared);
        let mut granted: Vec<Lease> = Vec::new();
        for Group { scope, places, ops } in &groups {
            let params = AdmitParams {
                fallback: self.fallback(scope).clone(),
                reserve_bp: self.reserve_bp,
                rates: self.rates,
                mode: self.configured_mode(&scope.portfolio),
            };
            let admissions = match self.coalesce.admit(&self.store, scope, &params, ops).await {
                Ok(a) => a,
                Err(e) => {
                    self.store_failed("admit", &e).await;
                    if self.on_error == OnError::Allow && e.is_transient() {
                        tracing::warn!(portfolio = %scope.portfolio, error = %e, "Store unavailable; admitting unchecked because store.on_error = \"allow\".");
                        for &i in places {
                            answers[i] = Some(unchecked(scope, &params.fallback));
                        }
                        continue;
                    }
                    self.undo(&granted).await;
                    return Err(e.into());
                }
            };
            for ((&i, op), a) in places.iter().zip(ops).zip(admissions) {
                let lease = a.lease_score.map(|score| {
                    // A replay's lease names the recipient of the Admit it replays.
                    let member = a.replay_of.clone().unwrap_or_else(|| op.member.clone());
                    let lease = Lease { scope: scope.clone(), member, score };
                    let token = self.leases.sign(&lease);
                    // Only what this call counted is given back if the batch fails.
                    if a.replay_of.is_none() {
                        granted.push(lease);
                    }
                    token
                });
                answers[i] = Some(AdmitAnswer {
                    reason: a.reason,
                    lease,
                    retry_after: a.retry_after,
                    usage: Usage { scope: scope.clone(), snapshot: a.usage, detail: None },
                    waited: a.wait,
                    shadow: a.shadow,
                });
            }
        }
        let answers: Vec<AdmitAnswer> = answers.into_iter().map(|a| a.expect("every request answered")).collect();
        // The decision's latency, without the pacing hold (`tiergate_paced_seconds` has that), so
        // the latency alert speaks of the store, not of callers that asked to wait.
        metrics::admit_latency(started.elapsed());
        // Before the hold, which it then overlaps.
        self.throughput_metrics(&groups, &answers).await;
        // Paced messages took slots that many µs after the store's now: the call is held until
        // the last of them. Counting from after the reply errs late, never early.
        if let Some(hold) = answers.iter().map(|a| a.waited).max().filter(|w| !w.is_zero()) {
            tokio::time::sleep(hold).await;
        }
        for a in &answers {
            metrics::decision(&self.labels, &a.usage.scope.portfolio, a.reason);
            if let Some(would_be) = a.shadow {
                metrics::shadow_decision(&self.labels, &a.usage.scope.portfolio, would_be);
            }
            if !a.waited.is_zero() {
                metrics::paced(a.waited);
            }
        }
        for group in &groups {
            let last = group.places.last().and_then(|&i| answers.get(i)).expect("group is not empty");
            metrics::usage(&self.labels, &group.scope, &last.usage.snapshot);
        }
        self.remember(groups.into_iter().map(|g| g.scope));
        Ok(answers)
    }

    /// While the throughput rule is on: counts the messages admitted per number, and publishes
    /// the level in force of a number seen for the first time (or again after its portfolio
    /// went idle), reading what Meta reported of it once. A failed read only leaves the gauge
    /// for the next one.
    async fn throughput_metrics(&self, groups: &[Group], answers: &[AdmitAnswer]) {
        if self.rates.throughput.is_none() {
            return;
        }
        let mut admitted: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for group in groups {
            for (&i, op) in group.places.iter().zip(&group.ops) {
                if let (Some(sender), Decision::Admitted) = (&op.sender, answers[i].reason.decision()) {
                    *admitted.entry((group.scope.portfolio.as_str(), sender.as_str())).or_default() += 1;
                }
            }
        }
        let mut states: BTreeMap<&str, Option<PortfolioState>> = BTreeMap::new();
        for ((portfolio, number), messages) in admitted {
            metrics::throughput_messages(&self.labels, portfolio, number, messages);
            if !self.labels.throughput_unknown(portfolio, number) {
                continue;
            }
            if !states.contains_key(portfolio) {
                let state = self.store.portfolio(portfolio).await;
                if let Err(e) = &state {
                    tracing::debug!(portfolio, error = %e, "Could not read a number's throughput level for metrics.");
                }
                states.insert(portfolio, state.ok());
            }
            if let Some(state) = &states[portfolio] {
                let learnt = state.senders.get(number).and_then(|s| s.throughput_mps);
                metrics::throughput_level(&self.labels, portfolio, number, learnt);
            }
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
}

/// Groups messages by scope, in order of each scope's first message, moving their ops.
fn group_by_scope(prepared: Vec<Prepared>) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: HashMap<ScopeKey, usize> = HashMap::new();
    for (i, Prepared { scope, op }) in prepared.into_iter().enumerate() {
        // The scope is cloned only for a new group, not for every message of a batch.
        let g = match group_of.get(&scope) {
            Some(&g) => g,
            None => {
                group_of.insert(scope.clone(), groups.len());
                groups.push(Group { scope, places: Vec::new(), ops: Vec::new() });
                groups.len() - 1
            }
        };
        groups[g].places.push(i);
        groups[g].ops.push(op);
    }
    groups
}

/// The answer for a message the store could not check, let through by `on_error = "allow"`.
fn unchecked(scope: &ScopeKey, fallback: &Tier) -> AdmitAnswer {
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
        waited: Duration::ZERO,
        shadow: None,
    }
}
