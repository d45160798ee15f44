//! The Redis store's Lua scripts and the typed protocol of each.
//!
//! Every script `x.lua` sits beside `x.rs`, which holds its arguments type (encoding KEYS and ARGV
//! in the order the script's header documents) and its reply type (decoding what it returns, and
//! refusing any other shape). What the scripts and Rust must agree on — reason and category codes,
//! which template statuses are active, the BANNED status, hash-field names, `apply` op names, the
//! length of a day — is declared once here and generated into the Lua prelude when the scripts are
//! built, so adding a reason is one [`Reason`] variant plus the Lua that decides it.

mod admit;
mod apply;
mod clock;
mod portfolio;
mod release;
mod shared_policy;
mod usage;

use std::fmt::Write as _;

use redis::{Script, ScriptInvocation, Value};

pub use admit::{pair_of, AdmitArgs, AdmitKeys};
pub use apply::ApplyArgs;
pub use clock::ClockArgs;
pub use portfolio::PortfolioArgs;
pub use release::ReleaseArgs;
pub use shared_policy::SharedPolicyArgs;
pub use usage::UsageArgs;

use crate::hashing::MEMBER_LEN;
use crate::policy::{self, rate, Category, Decision, Micros, Mode, Reason, SenderStatus};
use crate::store::{StoreError, DAY_US};

/// Declares string constants shared with the scripts: each becomes a Rust `pub const` and a Lua
/// `local <MODULE>_<NAME>` in the prelude, with the same value.
macro_rules! shared_strings {
    ($($(#[$doc:meta])* $name:ident = $value:literal;)*) => {
        $(
            $(#[$doc])*
            #[allow(dead_code, reason = "Rust owns every shared name, even those only the Lua uses")]
            pub const $name: &str = $value;
        )*

        /// Every constant above, by name, for the Lua prelude.
        pub const ALL: &[(&str, &str)] = &[$((stringify!($name), $value)),*];
    };
}

/// Field names of the hashes the scripts keep.
///
/// A scope's state hash holds `tier`, `limit`, `since`, `seq`, `elig`, `flag` and `tat`. The
/// portfolio hash holds `q` and fields named `<prefix>:<item>:<attribute>` (sender `s`, template
/// in every language `t`, template in one language `tl` with `<language>:<name>` as its item) or
/// `<prefix>:<item>` (alert `a`, alias `n`, a template's languages `tls`), and `mode`. A language is
/// `[A-Za-z0-9_-]` (checked at the edges), so the first `:` after `tl:` ends it and a name may
/// hold any `:`.
pub mod field {
    shared_strings! {
        /// Scope: the persisted tier's name.
        TIER = "tier";
        /// Scope: the persisted tier's limit (-1 = unlimited).
        LIMIT = "limit";
        /// Scope: when the tier last changed (us); also a sender attribute, when its status did.
        SINCE = "since";
        /// Scope: the last lease score handed out, so scores stay unique within the scope.
        SEQ = "seq";
        /// Scope (simulation): since when it is eligible for an upgrade (us).
        ELIGIBLE = "elig";
        /// Scope (simulation): since when it is counted as flagged (us).
        FLAGGED = "flag";
        /// Scope: when the last applied tier event happened (us), so older events are skipped.
        TIER_AT = "tat";
        /// Portfolio: its quality rating.
        QUALITY = "q";
        /// Portfolio: prefix of a sender's fields, `s:<sender>:<attribute>`.
        SENDER = "s";
        /// Portfolio: prefix of a template's fields, `t:<name>:<attribute>`.
        TEMPLATE = "t";
        /// Portfolio: prefix of an account alert, `a:<key>`.
        ALERT = "a";
        /// Portfolio: prefix of a phone number id by display number, `n:<display>`.
        ALIAS = "n";
        /// Attribute: a sender's or template's status.
        STATUS = "status";
        /// Attribute: a sender's or template's quality.
        ITEM_QUALITY = "quality";
        /// Attribute: when the last applied status event happened (us).
        AT = "at";
        /// Attribute: a sender's throughput level (messages per second).
        THROUGHPUT = "mps";
        /// Portfolio: prefix of a template's fields in one language,
        /// `tl:<language>:<name>:<attribute>`.
        TEMPLATE_LANGUAGE = "tl";
        /// Portfolio: the languages of a template with a status of their own, `tls:<name>`,
        /// comma-separated, so an Admit without a language checks them all without a scan.
        TEMPLATE_LANGUAGES = "tls";
        /// Attribute: a sender's throughput schedule, the `tat` of its GCRA (us); read by Admit
        /// only, so it names no sender in the portfolio's state.
        THROUGHPUT_TAT = "tat";
        /// Attribute: until when a sender's throughput is reduced (us).
        THROUGHPUT_BACKOFF = "bo";
        /// Portfolio: the mode set by UpdatePortfolio (`enforce` or `shadow`; absent: configured).
        MODE = "mode";
    }
}

/// The error code of a writing script's reply when it started after its deadline (an ARGV of
/// each): the caller had given up, so it wrote nothing. `store::redis` answers it as unavailable.
pub const DEADLINE_PASSED: &str = "TGDEADLINE";

/// Op names of the `apply` script's change list.
pub mod op {
    shared_strings! {
        /// `tier <key index> <name> <limit> <at>`.
        TIER = "tier";
        /// `elig <key index> <us or ''>`.
        ELIGIBLE = "elig";
        /// `flag <key index> <us or ''>`.
        FLAGGED = "flag";
        /// `q <quality>`.
        QUALITY = "q";
        /// `sst <sender> <status> <at>`.
        SENDER_STATUS = "sst";
        /// `sq <sender> <quality>`.
        SENDER_QUALITY = "sq";
        /// `tst <template> <status> <at>`.
        TEMPLATE_STATUS = "tst";
        /// `tq <template> <quality>`.
        TEMPLATE_QUALITY = "tq";
        /// `opt <recipient hash> <1 or 0>`.
        OPT_OUT = "opt";
        /// `alert <key> <body>`.
        ALERT = "alert";
        /// `alias <display> <id>`.
        ALIAS = "alias";
        /// `in <service-window hash> <us or ''>`.
        INBOUND = "in";
        /// `tp <sender> <messages per second>`.
        THROUGHPUT = "tp";
        /// `dlv <window> <legacy window> <delivered> <day before> <day> <day after> <day> <recipient>
        /// <d|f> <at>`.
        DELIVERY = "dlv";
        /// `tlst <template> <language> <status> <at>`.
        TEMPLATE_LANGUAGE_STATUS = "tlst";
        /// `tlq <template> <language> <quality>`.
        TEMPLATE_LANGUAGE_QUALITY = "tlq";
        /// `trf <sender> <configured mps or ''> <default mps> <at>`.
        TRAFFIC = "trf";
        /// `tbo <sender> <at>`.
        THROUGHPUT_BACKOFF = "tbo";
        /// `pbo <key index> <interval us> <at>`.
        PAIR_BACKOFF = "pbo";
        /// `mc <recipient hash> <at>`.
        MARKETING_CAPPED = "mc";
        /// `mode <enforce, shadow or ''>`.
        MODE = "mode";
    }
}

/// The Lua constants every script starts with, generated from the Rust ones.
pub fn constants() -> String {
    let mut lua =
        String::from("-- Generated from Rust (store::redis::scripts): the values the scripts share with it.\n");
    let mut line = |name: String, value: String| {
        let _ = writeln!(lua, "local {name} = {value}");
    };
    for r in Reason::ALL {
        line(format!("REASON_{}", r.as_str().to_ascii_uppercase()), r.code().to_string());
    }
    for c in Category::ALL {
        line(format!("CATEGORY_{}", c.as_str().to_ascii_uppercase()), c.code().to_string());
    }
    let marketing = Category::ALL.iter().filter(|c| c.may_be_marketing()).map(|c| format!("[{}] = true", c.code()));
    line("MAY_BE_MARKETING".into(), format!("{{{}}}", marketing.collect::<Vec<_>>().join(", ")));
    let active = policy::ACTIVE_TEMPLATE_STATUSES.iter().map(|s| format!("[{}] = true", lua_string(s)));
    line("ACTIVE_TEMPLATE_STATUSES".into(), format!("{{{}}}", active.collect::<Vec<_>>().join(", ")));
    line("SENDER_STATUS_BANNED".into(), lua_string(SenderStatus::Banned.as_str()));
    line("MIN_RETRY_AFTER".into(), policy::micros(policy::MIN_RETRY_AFTER).to_string());
    let admitted =
        Reason::ALL.iter().filter(|r| r.decision() == Decision::Admitted).map(|r| format!("[{}] = true", r.code()));
    line("ADMITTED".into(), format!("{{{}}}", admitted.collect::<Vec<_>>().join(", ")));
    line("MODE_ENFORCE".into(), lua_string(Mode::Enforce.as_str()));
    line("MODE_SHADOW".into(), lua_string(Mode::Shadow.as_str()));
    line("THROUGHPUT_BACKOFF".into(), policy::micros(rate::THROUGHPUT_BACKOFF).to_string());
    line("THROUGHPUT_BACKOFF_FACTOR".into(), rate::THROUGHPUT_BACKOFF_FACTOR.to_string());
    line("MARKETING_CAPPED_FOR".into(), policy::micros(rate::MARKETING_CAPPED_FOR).to_string());
    // Daily keys are named by `store::day_of`; the scripts find today's by the Redis clock with
    // the same division.
    line("DAY_US".into(), DAY_US.to_string());
    line("DEADLINE_PASSED".into(), lua_string(DEADLINE_PASSED));
    // Window buckets hold recipient hashes at a fixed width.
    line("MEMBER_LEN".into(), MEMBER_LEN.to_string());
    for (name, value) in field::ALL {
        line(format!("FIELD_{name}"), lua_string(value));
    }
    for (name, value) in op::ALL {
        line(format!("OP_{name}"), lua_string(value));
    }
    lua
}

/// A Lua string literal; the values are Rust constants, never input, but quote them properly.
fn lua_string(s: &str) -> String {
    format!("{s:?}")
}

/// A script with the generated constants and the shared functions prepended.
fn with_prelude(body: &str) -> Script {
    Script::new(&format!("{}{}\n{body}", constants(), include_str!("prelude.lua")))
}

/// A script that keeps a rolling window: the prelude, then the window's functions (`window.lua`).
fn with_window(body: &str) -> Script {
    Script::new(&format!("{}{}\n{}\n{body}", constants(), include_str!("prelude.lua"), include_str!("window.lua")))
}

/// One script call: its arguments encode into an invocation, and its reply decodes into `Reply`.
pub trait Call {
    /// What the script's reply decodes to.
    type Reply;

    /// The script, built once.
    fn script() -> &'static Script;

    /// A key of the call: it names the Cluster slot the script runs on, and so the server whose
    /// clock answers.
    fn key(&self) -> &str;

    /// Adds KEYS and ARGV, in the order the script's header documents.
    fn encode(&self, inv: &mut ScriptInvocation<'static>);

    /// Checks and decodes the script's reply.
    fn decode(&self, reply: Value) -> Result<Self::Reply, StoreError>;

    /// The Redis clock when the script ran, when the reply carries it; the store keeps its idea
    /// of that clock from every reply.
    fn ran_at(_reply: &Self::Reply) -> Option<Micros> {
        None
    }
}

/// The error for a reply of the wrong shape; names the script, never echoes the reply.
fn bad_reply(script: &str) -> StoreError {
    StoreError::Internal(format!("{script} script returned an unexpected reply"))
}

/// A positive number, else `None` (the scripts send 0 for "none").
fn positive(v: i64) -> Option<u64> {
    u64::try_from(v).ok().filter(|v| *v > 0)
}

/// An optional time as an argument: empty for "now".
fn time_arg(t: Option<u64>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn reason_codes_are_the_protobuf_numbers() {
        for r in Reason::ALL {
            let p = pb::Reason::try_from(r.code()).unwrap_or_else(|_| panic!("{r:?} has no protobuf value"));
            assert_eq!(p.as_str_name(), r.as_str().to_ascii_uppercase(), "{r:?}");
            assert_eq!(Reason::from_code(r.code().into()), Some(r));
        }
        // Every protobuf reason but UNSPECIFIED has a Rust one.
        assert_eq!(Reason::ALL.len(), (1..100).filter(|c| pb::Reason::try_from(*c).is_ok()).count());
        assert_eq!(Reason::from_code(0), None);
    }

    #[test]
    fn category_codes_are_the_protobuf_numbers() {
        for c in Category::ALL {
            let p = pb::Category::try_from(c.code()).unwrap_or_else(|_| panic!("{c:?} has no protobuf value"));
            let name = p.as_str_name();
            assert_eq!(name.strip_prefix("CATEGORY_").unwrap_or(name), c.as_str().to_ascii_uppercase(), "{c:?}");
            assert_eq!(Category::from_code(c.code().into()), Some(c));
        }
        assert_eq!(Category::ALL.len(), (0..).take_while(|c| pb::Category::try_from(*c).is_ok()).count());
    }

    #[test]
    fn the_prelude_carries_the_rust_values() {
        let lua = constants();
        assert!(lua.contains("local REASON_NEW_RECIPIENT = 1\n"), "{lua}");
        assert!(lua.contains("local REASON_OUTSIDE_SERVICE_WINDOW = 9\n"), "{lua}");
        assert!(lua.contains("local CATEGORY_SERVICE = 4\n"), "{lua}");
        assert!(lua.contains("local MAY_BE_MARKETING = {[0] = true, [1] = true}\n"), "{lua}");
        assert!(lua.contains(r#"local ACTIVE_TEMPLATE_STATUSES = {["APPROVED"] = true, ["REINSTATED"] = true"#));
        assert!(lua.contains("local SENDER_STATUS_BANNED = \"BANNED\"\n"), "{lua}");
        assert!(lua.contains("local MIN_RETRY_AFTER = 1000\n"), "{lua}");
        assert!(lua.contains("local FIELD_TIER_AT = \"tat\"\n"), "{lua}");
        assert!(lua.contains("local OP_INBOUND = \"in\"\n"), "{lua}");
        assert!(lua.contains("local DEADLINE_PASSED = \"TGDEADLINE\"\n"), "{lua}");
        assert!(lua.contains("local MEMBER_LEN = 8\n"), "{lua}");
        assert!(lua.contains("local ADMITTED = {[1] = true, [2] = true, [3] = true, [10] = true}\n"), "{lua}");
        assert!(lua.contains("local MODE_SHADOW = \"shadow\"\n"), "{lua}");
        assert!(lua.contains("local THROUGHPUT_BACKOFF = 60000000\n"), "{lua}");
        assert!(lua.contains("local MARKETING_CAPPED_FOR = 86400000000\n"), "{lua}");
    }
}
