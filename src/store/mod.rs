//! Storage: one async trait, one implementation per backend, picked at start-up.
//!
//! A store holds the rolling windows, service windows and persisted tiers, and applies the
//! [`policy`](crate::policy) rules atomically: one call decides and writes, so sidecars sharing a
//! store never admit more than the limit between them. Stores see keyed hashes of recipients
//! ([`Member`]), never the numbers.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

use crate::policy::{Lease, Limit, Micros, Reason, ScopeKey, Tier};

/// A keyed hash of a recipient (or of a sender and recipient pair), as stored.
pub type Member = Vec<u8>;

/// The rolling windows a store enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// The rolling window of the messaging limit (24 h in Meta's rules).
    pub window: Duration,
    /// How long a customer service window stays open after an inbound message (24 h).
    pub service_window: Duration,
}

impl Default for Windows {
    fn default() -> Self {
        let day = Duration::from_secs(24 * 3600);
        Windows { window: day, service_window: day }
    }
}

/// One message to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitOp {
    /// The recipient's keyed hash.
    pub member: Member,
    /// The keyed hash of (sender, recipient), naming its service window; `None` without a sender.
    pub service_member: Option<Member>,
}

/// The state of one limit scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSnapshot {
    /// The tier in force: persisted by `set_tier`, or the fallback passed in.
    pub tier: Tier,
    /// Recipients counted in the rolling window (for unlimited tiers: estimated, since 00:00 UTC).
    pub counted: u64,
    /// When the oldest counted recipient leaves the window.
    pub next_slot_at: Option<Micros>,
}

impl UsageSnapshot {
    /// Recipients that can still be added now (`None` when unlimited).
    pub fn remaining(&self) -> Option<u64> {
        match self.tier.limit {
            Limit::Limited(n) => Some(n.saturating_sub(self.counted)),
            Limit::Unlimited => None,
        }
    }
}

/// The store's answer for one [`AdmitOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub reason: Reason,
    /// For a counted recipient on a limited tier: the contact to name in a lease.
    pub lease_score: Option<Micros>,
    pub retry_after: Option<Duration>,
    /// The scope's usage right after this decision.
    pub usage: UsageSnapshot,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer in time or the connection is down; worth retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something that makes no sense; not worth retrying.
    #[error("store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The storage trait every backend implements; the conformance suite in `tests/` checks them.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Decides `ops` in order within one scope, as if sent one after another, atomically.
    /// `fallback` is the tier when none was persisted with [`Store::set_tier`].
    async fn admit(&self, scope: &ScopeKey, fallback: &Tier, ops: &[AdmitOp]) -> Result<Vec<Admission>, StoreError>;

    /// Undoes the contact a lease names, if it is still the recipient's latest; returns whether it did.
    async fn release(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// Opens or restarts a service window of `portfolio`; returns when it closes.
    async fn record_inbound(&self, portfolio: &str, service_member: &[u8]) -> Result<Micros, StoreError>;

    /// The scope's usage now.
    async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<UsageSnapshot, StoreError>;

    /// Persists the scope's tier, shared by every sidecar on this store; returns the usage after.
    async fn set_tier(&self, scope: &ScopeKey, tier: &Tier) -> Result<UsageSnapshot, StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// A short name for logs and metrics.
    fn backend(&self) -> &'static str;
}
