//! The policy every sidecar of one store must share, and the guard that refuses to serve when a
//! sidecar's own configuration disagrees with the one recorded in the store.
//!
//! Window lengths, the ladder, the fallback tiers and the recipient hash key come from each
//! sidecar's own configuration, but they shape data every sidecar reads: a sidecar with a 1 h
//! window trims everybody's 24 h contacts, and one with another `hash_key` counts the same user
//! twice and misses opt-outs recorded by the others. So the first sidecar records a fingerprint
//! of these settings in the store ([`SharedPolicy`]); every other one compares its own on start-up,
//! after the store comes back and on each health probe, and while they differ it answers every
//! call with FAILED_PRECONDITION naming each differing key ([`PolicyGuard`]). Changing the shared
//! policy on purpose is `tiergate store set-policy`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{Settings, StoreSettings};
use crate::policy::{Lease, Limit, Micros, ScopeKey, ScopeMode, Tier};
use crate::store::{Admission, AdmitOp, AdmitParams, Change, PortfolioState, ScopeReport, Store, StoreError};

/// The first line of a recorded policy; a store holding another format is not compared.
const HEADER: &str = "tiergate shared policy v1";

/// How a key that one side does not set is shown.
const NOT_SET: &str = "not set";

/// What sidecars sharing a store must agree on, by configuration key. Values are plain text:
/// a digest stands for the hash key, which never leaves the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPolicy {
    entries: BTreeMap<String, String>,
}

impl SharedPolicy {
    /// The shared part of a sidecar's settings.
    pub fn of(settings: &Settings) -> SharedPolicy {
        let mut entries = BTreeMap::new();
        let mut put = |key: &str, value: String| {
            entries.insert(key.to_owned(), value);
        };
        if let StoreSettings::Redis { options, .. } = &settings.store {
            put("store.key_prefix", options.key_prefix.clone());
        }
        put("store.hash_key", format!("digest {}", settings.store.hasher().key_digest()));
        put("policy.window", duration_text(settings.windows.window));
        put("policy.service_window", duration_text(settings.windows.service_window));
        let scope = match settings.scope {
            ScopeMode::Portfolio => "portfolio",
            ScopeMode::PhoneNumber => "phone_number",
        };
        put("policy.scope", scope.to_owned());
        let ladder: Vec<String> = settings.ladder.tiers().iter().map(tier_text).collect();
        put("policy.ladder", ladder.join(", "));
        put("policy.default_tier", settings.default_tier.name.clone());
        for (id, tier) in &settings.portfolio_tiers {
            put(&format!("portfolios.{id}.tier"), tier.name.clone());
        }
        SharedPolicy { entries }
    }

    /// The text recorded in the store: a header, then one `key = value` line per key, sorted.
    pub fn encode(&self) -> String {
        let mut text = String::from(HEADER);
        for (key, value) in &self.entries {
            text.push('\n');
            text.push_str(key);
            text.push_str(" = ");
            text.push_str(value);
        }
        text
    }

    /// Reads a text made by [`encode`](Self::encode).
    pub fn decode(text: &str) -> Result<SharedPolicy, String> {
        let mut lines = text.split('\n');
        if lines.next() != Some(HEADER) {
            return Err(format!(
                "the store records its shared policy in a format this sidecar does not know (it expects \"{HEADER}\")"
            ));
        }
        let mut entries = BTreeMap::new();
        for line in lines {
            let (key, value) = line.split_once(" = ").ok_or("the store's shared policy has a malformed line")?;
            entries.insert(key.to_owned(), value.to_owned());
        }
        Ok(SharedPolicy { entries })
    }

    /// Each key whose value differs from `recorded`'s, in key order.
    pub fn differences(&self, recorded: &SharedPolicy) -> Vec<Difference> {
        let mut keys: Vec<&String> = self.entries.keys().chain(recorded.entries.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|key| {
                let mine = self.entries.get(key).map_or(NOT_SET, String::as_str);
                let recorded = recorded.entries.get(key).map_or(NOT_SET, String::as_str);
                (mine != recorded).then(|| Difference {
                    key: key.clone(),
                    mine: mine.to_owned(),
                    recorded: recorded.to_owned(),
                })
            })
            .collect()
    }
}

/// One key on which a sidecar and the store differ; shown as `key: this sidecar X, the store Y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub key: String,
    /// This sidecar's value, or "not set".
    pub mine: String,
    /// The store's value, or "not set".
    pub recorded: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: this sidecar {}, the store {}", self.key, self.mine, self.recorded)
    }
}

/// A duration the way a configuration writes it: in the largest of h, m, s and ms that divides
/// it (`24h`, `90s`), so equal durations read the same whichever way they were written.
fn duration_text(d: Duration) -> String {
    let ns = d.as_nanos();
    let units =
        [("h", 3_600_000_000_000), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)];
    for (unit, size) in units {
        if ns > 0 && ns.is_multiple_of(size) {
            return format!("{}{unit}", ns / size);
        }
    }
    format!("{ns}ns")
}

fn tier_text(tier: &Tier) -> String {
    match tier.limit {
        Limit::Limited(n) => format!("{}={n}", tier.name),
        Limit::Unlimited => format!("{}=unlimited", tier.name),
    }
}

/// Where a sidecar stands against the store's recorded policy.
#[derive(Debug, Clone)]
enum Verdict {
    /// Not compared since start-up or since the store last failed.
    Unchecked,
    Agreed,
    /// The message every call is refused with.
    Differs(String),
}

/// A store that serves only while this sidecar's [`SharedPolicy`] is the one recorded in it.
///
/// The comparison costs one store call on start-up, after a call finds the store unavailable
/// (it may be another store when it comes back) and on each [`ping`](Store::ping), which the
/// health checks make; decisions in between pay nothing.
pub struct PolicyGuard {
    inner: Arc<dyn Store>,
    mine: SharedPolicy,
    /// `mine` as recorded, encoded once: every health probe sends it.
    encoded: String,
    verdict: Mutex<Verdict>,
}

impl PolicyGuard {
    /// Guards `inner` with this sidecar's policy.
    pub fn new(inner: Arc<dyn Store>, mine: SharedPolicy) -> PolicyGuard {
        crate::metrics::policy_mismatch(false);
        let encoded = mine.encode();
        PolicyGuard { inner, mine, encoded, verdict: Mutex::new(Verdict::Unchecked) }
    }

    /// Records a verdict, exporting whether this sidecar now refuses (`tiergate_store_policy_mismatch`).
    /// Records `verdict`; returns the one it replaces.
    fn set(&self, verdict: Verdict) -> Verdict {
        crate::metrics::policy_mismatch(matches!(verdict, Verdict::Differs(_)));
        std::mem::replace(&mut *self.verdict.lock().unwrap_or_else(|e| e.into_inner()), verdict)
    }

    /// Compares this sidecar's policy with the store's, recording it first when the store has
    /// none, and refuses when they differ.
    pub async fn check(&self) -> Result<(), StoreError> {
        let recorded = self.inner.shared_policy(&self.encoded, false).await.inspect_err(|_| {
            self.set(Verdict::Unchecked);
        })?;
        let verdict = match SharedPolicy::decode(&recorded) {
            Ok(theirs) => {
                let differences = self.mine.differences(&theirs);
                if differences.is_empty() {
                    Verdict::Agreed
                } else {
                    Verdict::Differs(format!(
                        "this sidecar's configuration differs from the policy shared through the store, so it \
                         refuses to serve: {}. Fix this sidecar's configuration, or change the shared policy on \
                         purpose with `tiergate store set-policy`.",
                        differences.iter().map(Difference::to_string).collect::<Vec<_>>().join("; ")
                    ))
                }
            }
            Err(e) => Verdict::Differs(format!("refusing to serve: {e}")),
        };
        // Logged on a change only: the health probes compare every 200 ms.
        match (self.set(verdict.clone()), verdict) {
            (Verdict::Differs(before), Verdict::Differs(message)) if before == message => {
                Err(StoreError::Refused(message))
            }
            (_, Verdict::Differs(message)) => {
                tracing::error!("{message}");
                Err(StoreError::Refused(message))
            }
            (Verdict::Differs(_), _) => {
                tracing::info!("This sidecar's configuration matches the store's shared policy again; serving.");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Lets a call through once the policies agree.
    async fn gate(&self) -> Result<(), StoreError> {
        let verdict = self.verdict.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match verdict {
            Verdict::Agreed => Ok(()),
            Verdict::Differs(message) => Err(StoreError::Refused(message)),
            Verdict::Unchecked => self.check().await,
        }
    }

    /// Passes a call's result on; a store that stopped answering is compared again when it comes
    /// back.
    fn seen<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Unavailable(_)) = &result {
            self.set(Verdict::Unchecked);
        }
        result
    }
}

#[async_trait]
impl Store for PolicyGuard {
    async fn admit(
        &self,
        scope: &ScopeKey,
        params: &AdmitParams,
        ops: &[AdmitOp],
    ) -> Result<Vec<Admission>, StoreError> {
        self.gate().await?;
        self.seen(self.inner.admit(scope, params, ops).await)
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        self.gate().await?;
        self.seen(self.inner.release(lease).await)
    }

    async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, StoreError> {
        self.gate().await?;
        self.seen(self.inner.apply(portfolio, changes).await)
    }

    async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<ScopeReport, StoreError> {
        self.gate().await?;
        self.seen(self.inner.usage(scope, fallback).await)
    }

    async fn portfolio(&self, portfolio: &str) -> Result<PortfolioState, StoreError> {
        self.gate().await?;
        self.seen(self.inner.portfolio(portfolio).await)
    }

    /// Also compares the policies again, so a `set-policy` reaches every sidecar within one
    /// health probe.
    async fn ping(&self) -> Result<(), StoreError> {
        self.seen(self.inner.ping().await)?;
        self.check().await
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn shared_policy(&self, policy: &str, replace: bool) -> Result<String, StoreError> {
        self.inner.shared_policy(policy, replace).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy(toml: &str) -> SharedPolicy {
        SharedPolicy::of(&Config::from_toml(toml).unwrap().validate().unwrap())
    }

    const STORE: &str = "[store]\nhash_key = \"0123456789abcdef-one\"\n";

    #[test]
    fn a_policy_reads_back_as_written() {
        let p = policy(&format!("{STORE}[[portfolios]]\nid = \"acme\"\ntier = \"TIER_10K\"\n"));
        assert_eq!(SharedPolicy::decode(&p.encode()).unwrap(), p);
        assert!(p.encode().contains("portfolios.acme.tier = TIER_10K"), "{}", p.encode());
        assert!(SharedPolicy::decode("something else").is_err());
    }

    #[test]
    fn differences_name_each_key_with_both_values() {
        let store = policy(STORE);
        let mine =
            policy(&format!("{STORE}[policy]\nwindow = \"1h\"\n[[portfolios]]\nid = \"acme\"\ntier = \"TIER_2K\"\n"));
        let differences: Vec<String> = mine.differences(&store).iter().map(Difference::to_string).collect();
        assert_eq!(
            differences,
            [
                "policy.window: this sidecar 1h, the store 24h".to_string(),
                "portfolios.acme.tier: this sidecar TIER_2K, the store not set".to_string(),
            ]
        );
        assert!(store.differences(&store).is_empty());
    }

    #[test]
    fn durations_read_as_configured() {
        assert_eq!(duration_text(Duration::from_secs(86_400)), "24h");
        assert_eq!(duration_text(Duration::from_secs(90)), "90s");
        assert_eq!(duration_text(Duration::from_secs(120)), "2m");
        assert_eq!(duration_text(Duration::from_millis(1_500)), "1500ms");
        assert_eq!(duration_text(Duration::from_micros(60_000_001)), "60000001us");
    }

    #[test]
    fn the_hash_key_is_compared_by_a_digest_that_does_not_reveal_it() {
        let one = policy(STORE);
        let two = policy("[store]\nhash_key = \"0123456789abcdef-two\"\n");
        let differences = two.differences(&one);
        assert_eq!(differences.len(), 1, "{differences:?}");
        assert_eq!(differences[0].key, "store.hash_key");
        assert_ne!(differences[0].mine, differences[0].recorded);
        assert!(!one.encode().contains("0123456789abcdef"), "{}", one.encode());
    }
}
