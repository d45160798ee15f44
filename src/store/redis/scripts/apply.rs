//! The protocol of `apply.lua`: apply a list of changes to one portfolio, atomically.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{bad_reply, op, time_arg, with_window, Call};
use crate::policy::{self, Delivery, Micros, Mode};
use crate::store::redis::keys::{KeySpace, PortfolioKeys};
use crate::store::{day_of, Change, StoreError};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_window(include_str!("apply.lua")));

/// The arguments of one apply call.
#[derive(Debug)]
pub struct ApplyArgs<'a> {
    /// Names the state hashes of the scopes that changes touch.
    pub keys: &'a KeySpace,
    /// The portfolio's id, which names its pairs' keys.
    pub portfolio_id: &'a str,
    /// The portfolio's state hash, opted-out set, service windows and marketing-capped
    /// recipients: KEYS[1..4].
    pub portfolio: PortfolioKeys,
    /// TTL of everything touched (ms).
    pub state_ttl_ms: u64,
    /// How long an inbound message keeps the service window open (us).
    pub service_window_us: u64,
    /// The rolling window (us).
    pub window_us: u64,
    /// TTL of a daily HyperLogLog (ms).
    pub day_ttl_ms: u64,
    /// The caller's clock, which names the daily keys a delivery may touch.
    pub now: Micros,
    /// The changes, applied in order.
    pub changes: &'a [Change],
    /// When the script must have started, by the Redis clock (us); later, it writes nothing.
    pub deadline: Micros,
}

impl Call for ApplyArgs<'_> {
    /// The Redis clock when the changes were applied.
    type Reply = Micros;

    fn script() -> &'static Script {
        &SCRIPT
    }

    fn key(&self) -> &str {
        &self.portfolio.state
    }

    fn encode(&self, inv: &mut ScriptInvocation<'static>) {
        // Scope state hashes follow the portfolio's keys, each once; changes name them by index.
        let p = &self.portfolio;
        let mut keys =
            vec![p.state.clone(), p.opted_out.clone(), p.service_windows.clone(), p.marketing_capped.clone()];
        let mut key_index = |key: String| {
            let i = match keys.iter().position(|k| *k == key) {
                Some(i) => i + 1,
                None => {
                    keys.push(key);
                    keys.len()
                }
            };
            i.to_string()
        };
        let fixed = [self.state_ttl_ms, self.service_window_us, self.window_us, self.day_ttl_ms, self.deadline];
        let mut args: Vec<Vec<u8>> = fixed.iter().map(|n| n.to_string().into_bytes()).collect();
        let mut push = |parts: &[&[u8]]| args.extend(parts.iter().map(|p| p.to_vec()));
        for change in self.changes {
            match change {
                Change::Tier { scope, tier, at } => {
                    let limit = tier.limit.to_i64().to_string();
                    push(&[
                        op::TIER.as_bytes(),
                        key_index(self.keys.meta(scope)).as_bytes(),
                        tier.name.as_bytes(),
                        limit.as_bytes(),
                        time_arg(*at).as_bytes(),
                    ]);
                }
                Change::Eligible { scope, since } => push(&[
                    op::ELIGIBLE.as_bytes(),
                    key_index(self.keys.meta(scope)).as_bytes(),
                    time_arg(*since).as_bytes(),
                ]),
                Change::Flagged { scope, since } => push(&[
                    op::FLAGGED.as_bytes(),
                    key_index(self.keys.meta(scope)).as_bytes(),
                    time_arg(*since).as_bytes(),
                ]),
                Change::Quality(q) => push(&[op::QUALITY.as_bytes(), q.as_str().as_bytes()]),
                Change::SenderStatus { sender, status, at } => push(&[
                    op::SENDER_STATUS.as_bytes(),
                    sender.as_bytes(),
                    status.as_str().as_bytes(),
                    time_arg(*at).as_bytes(),
                ]),
                Change::SenderQuality { sender, quality } => {
                    push(&[op::SENDER_QUALITY.as_bytes(), sender.as_bytes(), quality.as_str().as_bytes()])
                }
                // Every language of the name: the ops kept from before languages were.
                Change::TemplateStatus { name, language, status, at } if language.is_empty() => push(&[
                    op::TEMPLATE_STATUS.as_bytes(),
                    name.as_bytes(),
                    status.as_bytes(),
                    time_arg(*at).as_bytes(),
                ]),
                Change::TemplateStatus { name, language, status, at } => push(&[
                    op::TEMPLATE_LANGUAGE_STATUS.as_bytes(),
                    name.as_bytes(),
                    language.as_bytes(),
                    status.as_bytes(),
                    time_arg(*at).as_bytes(),
                ]),
                Change::TemplateQuality { name, language, quality } if language.is_empty() => {
                    push(&[op::TEMPLATE_QUALITY.as_bytes(), name.as_bytes(), quality.as_str().as_bytes()])
                }
                Change::TemplateQuality { name, language, quality } => push(&[
                    op::TEMPLATE_LANGUAGE_QUALITY.as_bytes(),
                    name.as_bytes(),
                    language.as_bytes(),
                    quality.as_str().as_bytes(),
                ]),
                Change::OptOut { member, opted_out } => {
                    push(&[op::OPT_OUT.as_bytes(), member, if *opted_out { b"1" } else { b"0" }])
                }
                Change::Alert { key, body } => push(&[op::ALERT.as_bytes(), key.as_bytes(), body.as_bytes()]),
                Change::Alias { display, id } => push(&[op::ALIAS.as_bytes(), display.as_bytes(), id.as_bytes()]),
                Change::Inbound { service_member, at } => {
                    push(&[op::INBOUND.as_bytes(), service_member, time_arg(*at).as_bytes()])
                }
                Change::Delivery { scope, member, status, at } => {
                    // The script picks, by the Redis clock, the day among the three around the
                    // caller's idea of it.
                    let day = day_of(at.unwrap_or(self.now));
                    let days = [day.saturating_sub(1), day, day + 1].map(|d| key_index(self.keys.day(scope, d)));
                    push(&[
                        op::DELIVERY.as_bytes(),
                        key_index(self.keys.window(scope)).as_bytes(),
                        key_index(self.keys.legacy_window(scope)).as_bytes(),
                        key_index(self.keys.delivered(scope)).as_bytes(),
                        days[0].as_bytes(),
                        days[1].as_bytes(),
                        days[2].as_bytes(),
                        day.to_string().as_bytes(),
                        member,
                        match status {
                            Delivery::Delivered => b"d",
                            Delivery::Failed => b"f",
                        },
                        time_arg(*at).as_bytes(),
                    ]);
                }
                Change::Throughput { sender, mps } => {
                    push(&[op::THROUGHPUT.as_bytes(), sender.as_bytes(), mps.to_string().as_bytes()])
                }
                Change::Traffic { sender, rule, configured_mps, at } => push(&[
                    op::TRAFFIC.as_bytes(),
                    sender.as_bytes(),
                    configured_mps.map(|mps| mps.to_string()).unwrap_or_default().as_bytes(),
                    rule.default_mps.to_string().as_bytes(),
                    time_arg(*at).as_bytes(),
                ]),
                Change::ThroughputBackoff { sender, at } => {
                    push(&[op::THROUGHPUT_BACKOFF.as_bytes(), sender.as_bytes(), time_arg(*at).as_bytes()])
                }
                Change::PairBackoff { pair, rule, at } => push(&[
                    op::PAIR_BACKOFF.as_bytes(),
                    key_index(self.keys.pair(self.portfolio_id, pair)).as_bytes(),
                    policy::micros(rule.interval).to_string().as_bytes(),
                    time_arg(*at).as_bytes(),
                ]),
                Change::MarketingCapped { member, at } => {
                    push(&[op::MARKETING_CAPPED.as_bytes(), member, time_arg(*at).as_bytes()])
                }
                Change::Mode(mode) => push(&[op::MODE.as_bytes(), mode.map_or("", Mode::as_str).as_bytes()]),
            }
        }
        inv.key(&keys[..]).arg(args);
    }

    fn decode(&self, reply: Value) -> Result<Micros, StoreError> {
        redis::from_redis_value(reply).map_err(|_| bad_reply("apply"))
    }

    fn ran_at(reply: &Micros) -> Option<Micros> {
        Some(*reply)
    }
}
