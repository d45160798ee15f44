//! The protocol of `release.lua`: give back the slot one Admit counted.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{bad_reply, with_window, Call};
use crate::policy::Micros;
use crate::store::StoreError;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_window(include_str!("release.lua")));

/// The arguments of one release.
#[derive(Debug)]
pub struct ReleaseArgs<'a> {
    /// The scope's rolling window (hash).
    pub window: String,
    /// The scope's window as the previous version kept it (sorted set).
    pub legacy_window: String,
    /// The recipient's hash.
    pub member: &'a [u8],
    /// The lease's score, which names exactly one Admit.
    pub score: Micros,
    /// When the script must have started, by the Redis clock (us); later, it writes nothing.
    pub deadline: Micros,
}

/// The script's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Whether the contact was removed.
    pub removed: bool,
    /// The Redis clock when the script ran.
    pub now: Micros,
}

impl Call for ReleaseArgs<'_> {
    type Reply = Released;

    fn script() -> &'static Script {
        &SCRIPT
    }

    fn key(&self) -> &str {
        &self.window
    }

    fn encode(&self, inv: &mut ScriptInvocation<'static>) {
        inv.key(&self.window).key(&self.legacy_window).arg(self.member).arg(self.score).arg(self.deadline);
    }

    fn decode(&self, reply: Value) -> Result<Released, StoreError> {
        let (removed, now): (i64, Micros) = redis::from_redis_value(reply).map_err(|_| bad_reply("release"))?;
        Ok(Released { removed: removed == 1, now })
    }

    fn ran_at(reply: &Released) -> Option<Micros> {
        Some(reply.now)
    }
}
