//! Store-level requests for tests and benches: admission ops, params, scopes and tiers, and
//! [`Store`] calls in one line (each unwraps, so a failed call fails the test where it is made).

use std::sync::LazyLock;

use tiergate::hashing::RecipientHasher;
use tiergate::policy::{Category, Reason, ScopeKey, Tier};
use tiergate::store::{Admission, AdmitOp, AdmitParams, Change, Store, UsageSnapshot};

/// The key every op here hashes recipients under.
pub const HASH_KEY: &[u8] = b"conformance-suite-key";

/// The hasher every op here uses.
pub fn hasher() -> &'static RecipientHasher {
    static HASHER: LazyLock<RecipientHasher> = LazyLock::new(|| RecipientHasher::new(HASH_KEY).unwrap());
    &HASHER
}

/// A utility message to `recipient` (a normalized number), from no particular sender.
pub fn op(recipient: &str) -> AdmitOp {
    AdmitOp { member: hasher().recipient(recipient), category: Category::Utility, ..AdmitOp::default() }
}

/// A utility message from `sender` to `recipient`, which a service window between them admits.
pub fn op_from(sender: &str, recipient: &str) -> AdmitOp {
    let h = hasher();
    AdmitOp {
        member: h.recipient(recipient),
        service_member: Some(h.service_window(sender, recipient)),
        sender: Some(sender.into()),
        ..op(recipient)
    }
}

/// The same op with another category and template.
pub fn with(op: AdmitOp, category: Category, template: Option<&str>) -> AdmitOp {
    AdmitOp { category, template: template.map(str::to_owned), ..op }
}

/// The same op sent with an idempotency key.
pub fn keyed(op: AdmitOp, key: &str) -> AdmitOp {
    AdmitOp { idempotency_key: Some(hasher().idempotency_key(key)), ..op }
}

/// Params with `tier` as the fallback and no marketing reserve.
pub fn params(tier: &Tier) -> AdmitParams {
    AdmitParams::new(tier.clone(), 0)
}

/// The whole-portfolio scope of `id`.
pub fn portfolio(id: &str) -> ScopeKey {
    ScopeKey { portfolio: id.into(), sender: None }
}

/// A tier named `TEST` with a limit of `n`.
pub fn limited(n: u64) -> Tier {
    Tier::limited("TEST", n)
}

/// Now in microseconds since the epoch, by this machine's clock.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// Admits a batch under `tier` as the fallback.
pub async fn admit(store: &dyn Store, scope: &ScopeKey, tier: &Tier, ops: &[AdmitOp]) -> Vec<Admission> {
    store.admit(scope, &params(tier), ops).await.unwrap()
}

/// Admits one op under `tier` as the fallback.
pub async fn admit_one(store: &dyn Store, scope: &ScopeKey, tier: &Tier, op: AdmitOp) -> Admission {
    admit(store, scope, tier, &[op]).await.pop().unwrap()
}

/// Admits [`op`]s to each recipient, one call each; returns the reasons.
pub async fn reasons(store: &dyn Store, scope: &ScopeKey, tier: &Tier, recipients: &[&str]) -> Vec<Reason> {
    let mut out = Vec::new();
    for r in recipients {
        out.push(admit_one(store, scope, tier, op(r)).await.reason);
    }
    out
}

/// The usage of a scope with `tier` as the fallback.
pub async fn usage(store: &dyn Store, scope: &ScopeKey, tier: &Tier) -> UsageSnapshot {
    store.usage(scope, tier).await.unwrap().usage
}

/// Opens a service window now; returns when it closes.
pub async fn inbound(store: &dyn Store, portfolio: &str, sender: &str, recipient: &str) -> u64 {
    let service_member = hasher().service_window(sender, recipient);
    store.apply(portfolio, &[Change::Inbound { service_member, at: None }]).await.unwrap()
}

/// Persists `tier` for a scope; returns its usage afterwards.
pub async fn set_tier(store: &dyn Store, scope: &ScopeKey, tier: &Tier) -> UsageSnapshot {
    store
        .apply(&scope.portfolio, &[Change::Tier { scope: scope.clone(), tier: tier.clone(), at: None }])
        .await
        .unwrap();
    usage(store, scope, tier).await
}
