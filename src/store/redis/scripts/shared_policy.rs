//! The protocol of `shared_policy.lua`: record or read the deployment's shared policy.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{bad_reply, Call};
use crate::store::StoreError;

// No prelude: the script shares nothing with Rust but its arguments.
static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("shared_policy.lua")));

/// The arguments of one comparison (or replacement) of the shared policy.
#[derive(Debug)]
pub struct SharedPolicyArgs<'a> {
    /// The deployment's shared-policy key.
    pub key: String,
    /// This sidecar's policy, as text.
    pub policy: &'a str,
    /// Record `policy` even when another is recorded.
    pub replace: bool,
}

impl Call for SharedPolicyArgs<'_> {
    /// The policy recorded after the call.
    type Reply = String;

    fn script() -> &'static Script {
        &SCRIPT
    }

    fn key(&self) -> &str {
        &self.key
    }

    fn encode(&self, inv: &mut ScriptInvocation<'static>) {
        inv.key(&self.key).arg(self.policy).arg(if self.replace { "1" } else { "0" });
    }

    fn decode(&self, reply: Value) -> Result<String, StoreError> {
        redis::from_redis_value(reply).map_err(|_| bad_reply("shared_policy"))
    }
}
