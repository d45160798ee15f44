//! The protocol of `usage.lua`: one scope's usage, with what upgrade projections need.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{bad_reply, positive, with_window, Call};
use crate::policy::{Limit, Micros, Tier};
use crate::store::{ScopeReport, StoreError, UsageSnapshot};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_window(include_str!("usage.lua")));

/// The arguments of one usage read.
#[derive(Debug)]
pub struct UsageArgs<'a> {
    /// The scope's rolling window (hash).
    pub window: String,
    /// The scope's state hash.
    pub meta: String,
    /// The scope's window as the previous version kept it (sorted set).
    pub legacy_window: String,
    /// The daily HyperLogLogs, from the day after `today` back to 30 days before it.
    pub days: Vec<String>,
    /// The rolling window (us).
    pub window_us: u64,
    /// The tier used when none is persisted.
    pub fallback: &'a Tier,
    /// The caller's day (days since the Unix epoch, UTC).
    pub today: u64,
}

/// The script's reply, decoded.
pub type UsageReply = ScopeReport;

impl Call for UsageArgs<'_> {
    type Reply = UsageReply;

    fn script() -> &'static Script {
        &SCRIPT
    }

    fn key(&self) -> &str {
        &self.window
    }

    fn encode(&self, inv: &mut ScriptInvocation<'static>) {
        inv.key(&self.window).key(&self.meta).key(&self.legacy_window).key(&self.days[..]);
        inv.arg(self.window_us).arg(&self.fallback.name).arg(self.fallback.limit.to_i64()).arg(self.today);
    }

    fn decode(&self, reply: Value) -> Result<ScopeReport, StoreError> {
        type Shape = (String, i64, i64, i64, i64, i64, i64, i64, i64, i64);
        let (name, limit, counted, next, u7, u30, since, elig, flag, now): Shape =
            redis::from_redis_value(reply).map_err(|_| bad_reply("usage"))?;
        Ok(ScopeReport {
            usage: UsageSnapshot {
                tier: Tier { name, limit: Limit::from_i64(limit) },
                counted: positive(counted).unwrap_or(0),
                next_slot_at: positive(next),
            },
            unique_7d: positive(u7).unwrap_or(0),
            unique_30d: positive(u30).unwrap_or(0),
            tier_since: positive(since),
            eligible_since: positive(elig),
            flagged_since: positive(flag),
            now: positive(now).unwrap_or(0),
        })
    }

    fn ran_at(reply: &ScopeReport) -> Option<Micros> {
        Some(reply.now)
    }
}
