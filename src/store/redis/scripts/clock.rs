//! The protocol of `clock.lua`: read the clock of the server a call will run on.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{bad_reply, with_prelude, Call};
use crate::policy::Micros;
use crate::store::StoreError;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("clock.lua")));

/// The arguments of one clock read.
#[derive(Debug)]
pub struct ClockArgs<'a> {
    /// A key of the slot whose server's clock is read.
    pub key: &'a str,
}

impl Call for ClockArgs<'_> {
    /// The server's clock.
    type Reply = Micros;

    fn script() -> &'static Script {
        &SCRIPT
    }

    fn key(&self) -> &str {
        self.key
    }

    fn encode(&self, inv: &mut ScriptInvocation<'static>) {
        inv.key(self.key);
    }

    fn decode(&self, reply: Value) -> Result<Micros, StoreError> {
        redis::from_redis_value(reply).map_err(|_| bad_reply("clock"))
    }

    fn ran_at(reply: &Micros) -> Option<Micros> {
        Some(*reply)
    }
}
