//! The protocol of `admit.lua`: decide messages in order within one scope, atomically.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, ScriptInvocation, Value};

use super::{bad_reply, positive, with_window, Call};
use crate::policy::{self, Limit, Micros, Mode, Reason, Tier};
use crate::store::redis::window::WindowLayout;
use crate::store::{Admission, AdmitOp, Member, Rates, StoreError, UsageSnapshot};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_window(include_str!("admit.lua")));

/// The keys an admission touches, KEYS[1..7] of the script, then those of the ops.
#[derive(Debug, Clone)]
pub struct AdmitKeys {
    /// The scope's rolling window (hash).
    pub window: String,
    /// The scope's state hash.
    pub meta: String,
    /// The portfolio's service windows (sorted set).
    pub service_windows: String,
    /// The portfolio's opted-out recipients (set).
    pub opted_out: String,
    /// The portfolio's state hash.
    pub portfolio: String,
    /// The scope's window as the previous version kept it (sorted set).
    pub legacy_window: String,
    /// The portfolio's recipients capped by Meta's per-user marketing limit (sorted set).
    pub marketing_capped: String,
    /// What the scope remembers under each idempotency key of the ops, in the order of the ops
    /// that carry one.
    pub idempotency: Vec<String>,
    /// The schedule of each pair the pair rule applies to ([`pair_of`]), in the order of the ops.
    pub pairs: Vec<String>,
}

/// KEYS before the idempotency keys.
const FIXED_KEYS: usize = 7;

/// The pair (its keyed hash) whose rate an op takes: one with a sender, when the pair rule is on.
pub fn pair_of<'o>(op: &'o AdmitOp, rates: &Rates) -> Option<&'o Member> {
    op.service_member.as_ref().filter(|_| op.sender.is_some() && rates.pair.is_some())
}

/// The arguments of one admission call.
#[derive(Debug)]
pub struct AdmitArgs<'a> {
    /// Which keys.
    pub keys: AdmitKeys,
    /// The rolling window (us).
    pub window_us: u64,
    /// The tier used when none is persisted.
    pub fallback: &'a Tier,
    /// TTL of the scope's state and the portfolio's keys (ms).
    pub state_ttl_ms: u64,
    /// Basis points of the limit kept from marketing to new recipients.
    pub reserve_bp: u32,
    /// The messages, decided in order.
    pub ops: &'a [AdmitOp],
    /// When the script must have started, by the Redis clock (us); later, it writes nothing.
    pub deadline: Micros,
    /// The sizes of the window's buckets and chunks.
    pub layout: WindowLayout,
    /// The send rates besides the messaging limit.
    pub rates: Rates,
    /// The portfolio's configured mode, unless one is persisted.
    pub mode: Mode,
}

/// Fields per message in ARGV and in the reply.
const ARGS_PER_OP: usize = 11;
const REPLIES_PER_OP: usize = 7;

/// The script's answer for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpReply {
    /// Why it was admitted or denied.
    pub reason: Reason,
    /// For a counted recipient on a limited tier: the contact's score, to name in a lease.
    pub lease_score: Option<Micros>,
    /// For a denial by the limit: how long until a slot frees up.
    pub retry_after: Option<Duration>,
    /// Recipients counted after this message.
    pub counted: u64,
    /// When the oldest counted recipient leaves the window.
    pub next_slot_at: Option<Micros>,
    /// For an answer replayed under an idempotency key: the recipient it named.
    pub replay_of: Option<Member>,
    /// Pacing: how long after `now` the message goes.
    pub wait: Duration,
    /// In shadow mode: what enforcing would have answered.
    pub shadow: Option<Reason>,
}

/// The script's reply: the tier in force, the Redis clock, and one answer per message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitReply {
    /// The tier in force (persisted, else the fallback).
    pub tier: Tier,
    /// The Redis clock when the script ran.
    pub now: Micros,
    /// One answer per message, in order.
    pub ops: Vec<OpReply>,
}

impl AdmitReply {
    /// The store's admissions, one per message.
    pub fn into_admissions(self) -> Vec<Admission> {
        let AdmitReply { tier, now, ops } = self;
        ops.into_iter()
            .map(|op| Admission {
                reason: op.reason,
                lease_score: op.lease_score,
                retry_after: op.retry_after,
                usage: UsageSnapshot { tier: tier.clone(), counted: op.counted, next_slot_at: op.next_slot_at },
                now,
                replay_of: op.replay_of,
                wait: op.wait,
                shadow: op.shadow,
            })
            .collect()
    }
}

impl Call for AdmitArgs<'_> {
    type Reply = AdmitReply;

    fn script() -> &'static Script {
        &SCRIPT
    }

    fn key(&self) -> &str {
        &self.keys.window
    }

    fn encode(&self, inv: &mut ScriptInvocation<'static>) {
        let k = &self.keys;
        inv.key(&k.window)
            .key(&k.meta)
            .key(&k.service_windows)
            .key(&k.opted_out)
            .key(&k.portfolio)
            .key(&k.legacy_window)
            .key(&k.marketing_capped)
            .key(&k.idempotency[..])
            .key(&k.pairs[..])
            .arg(self.window_us)
            .arg(&self.fallback.name)
            .arg(self.fallback.limit.to_i64())
            .arg(self.state_ttl_ms)
            .arg(self.reserve_bp)
            .arg(self.deadline)
            .arg(self.layout.load)
            .arg(self.layout.chunk)
            .arg(self.layout.chunk_span)
            .arg(self.layout.bucket_span)
            .arg(self.mode.as_str());
        let on = |on: bool| if on { "1" } else { "0" };
        let throughput = self.rates.throughput;
        inv.arg(on(throughput.is_some()))
            .arg(throughput.map_or(0, |t| t.default_mps))
            .arg(throughput.map_or(0, |t| policy::micros(t.burst)));
        let pair = self.rates.pair;
        inv.arg(on(pair.is_some()))
            .arg(pair.map_or(0, |p| policy::micros(p.interval)))
            .arg(pair.map_or(0, |p| p.burst));
        let mut keys = FIXED_KEYS..;
        // The pair keys follow the idempotency keys.
        let mut pairs = FIXED_KEYS + self.keys.idempotency.len()..;
        for op in self.ops {
            let category = op.category.code().to_string();
            // The ops with a key name KEYS[8..] in order.
            let key = op.idempotency_key.as_ref().and_then(|_| keys.next()).map(|i| (i + 1).to_string());
            let pair = pair_of(op, &self.rates).and_then(|_| pairs.next()).map(|i| (i + 1).to_string());
            let max_wait = policy::micros(op.max_wait).to_string();
            let configured = op.throughput_mps.map(|mps| mps.to_string());
            let args: [&[u8]; ARGS_PER_OP] = [
                &op.member,
                op.service_member.as_deref().unwrap_or(b""),
                category.as_bytes(),
                op.template.as_deref().unwrap_or("").as_bytes(),
                op.sender.as_deref().unwrap_or("").as_bytes(),
                if op.sender_blocked { b"1" } else { b"0" },
                op.template_language.as_deref().unwrap_or("").as_bytes(),
                key.as_deref().unwrap_or("").as_bytes(),
                max_wait.as_bytes(),
                configured.as_deref().unwrap_or("").as_bytes(),
                pair.as_deref().unwrap_or("").as_bytes(),
            ];
            for arg in args {
                inv.arg(arg);
            }
        }
    }

    fn decode(&self, reply: Value) -> Result<AdmitReply, StoreError> {
        let (name, limit, now, flat, replayed): (String, i64, i64, Vec<i64>, Vec<Vec<u8>>) =
            redis::from_redis_value(reply).map_err(|_| bad_reply("admit"))?;
        if flat.len() != self.ops.len() * REPLIES_PER_OP || replayed.len() != self.ops.len() {
            return Err(StoreError::Internal(format!(
                "admit script returned {} values and {} replays for {} ops",
                flat.len(),
                replayed.len(),
                self.ops.len()
            )));
        }
        let ops = flat
            .chunks_exact(REPLIES_PER_OP)
            .zip(replayed)
            .map(|(c, replayed)| {
                let [reason, lease, retry, counted, next_slot, wait, shadow] = c else {
                    unreachable!("chunks of {REPLIES_PER_OP}")
                };
                let reason_of = |code: i64| {
                    // The store never answers STORE_UNAVAILABLE: that is the limiter's, when it cannot ask.
                    Reason::from_code(code)
                        .filter(|r| *r != Reason::StoreUnavailable)
                        .ok_or_else(|| StoreError::Internal(format!("admit script returned reason {code}")))
                };
                Ok(OpReply {
                    reason: reason_of(*reason)?,
                    lease_score: positive(*lease),
                    retry_after: positive(*retry).map(Duration::from_micros),
                    counted: positive(*counted).unwrap_or(0),
                    next_slot_at: positive(*next_slot),
                    replay_of: (!replayed.is_empty()).then_some(replayed),
                    wait: Duration::from_micros(positive(*wait).unwrap_or(0)),
                    shadow: if *shadow == 0 { None } else { Some(reason_of(*shadow)?) },
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(AdmitReply { tier: Tier { name, limit: Limit::from_i64(limit) }, now: positive(now).unwrap_or(0), ops })
    }

    fn ran_at(reply: &AdmitReply) -> Option<Micros> {
        Some(reply.now)
    }
}
