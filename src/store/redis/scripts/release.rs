//! The protocol of `release.lua`: give back the slot one Admit counted.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{bad_reply, Call};
use crate::policy::Micros;
use crate::store::StoreError;

// No prelude: the script shares nothing with Rust but its arguments.
static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("release.lua")));

/// The arguments of one release.
#[derive(Debug)]
pub struct ReleaseArgs<'a> {
    /// The scope's rolling window (sorted set).
    pub window: String,
    /// The recipient's hash.
    pub member: &'a [u8],
    /// The lease's score, which names exactly one Admit.
    pub score: Micros,
}

impl Call for ReleaseArgs<'_> {
    /// Whether the contact was removed.
    type Reply = bool;

    fn script() -> &'static Script {
        &SCRIPT
    }

    fn encode(&self, inv: &mut ScriptInvocation<'static>) {
        inv.key(&self.window).arg(self.member).arg(self.score);
    }

    fn decode(&self, reply: Value) -> Result<bool, StoreError> {
        let removed: i64 = redis::from_redis_value(reply).map_err(|_| bad_reply("release"))?;
        Ok(removed == 1)
    }
}
