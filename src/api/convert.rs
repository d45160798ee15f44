//! Protobuf ↔ domain conversions, as `From` and `TryFrom` impls: the only code that reads or
//! builds `prost` messages. A request that cannot be converted (an unknown enum value) is an
//! [`Error::InvalidArgument`] naming its field, answered like every other invalid input.

use std::time::{Duration, UNIX_EPOCH};

use crate::error::Error;
use crate::limiter::{AdmitAnswer, AdmitInput, FieldPath, PortfolioUpdate, PortfolioView, Usage};
use crate::pb;
use crate::policy::{self, Category, Decision, Limit, Micros, Quality, SenderStatus};
use crate::store::TemplateKey;

/// Reads an enum field that carries `value`, naming `field` at `at` when it is not one.
fn known<E: TryFrom<i32>>(value: i32, at: FieldPath, field: &str) -> Result<E, Error> {
    E::try_from(value).map_err(|_| at.invalid(field, format!("unknown value {value}")))
}

/// A protobuf timestamp of a store time.
pub fn timestamp(us: Micros) -> prost_types::Timestamp {
    (UNIX_EPOCH + Duration::from_micros(us)).into()
}

/// The longest an Admit may ask to be held for a paced slot.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration { seconds: i64::MAX, nanos: 0 })
}

// Categories and reasons cross the edge as their wire codes (`Category::code`, `Reason::code`),
// which a test in `store::redis::scripts` holds equal to the protobuf numbers.

impl From<Decision> for pb::Decision {
    fn from(d: Decision) -> pb::Decision {
        match d {
            Decision::Admitted => pb::Decision::Admitted,
            Decision::Denied => pb::Decision::Denied,
        }
    }
}

impl From<Quality> for pb::Quality {
    fn from(q: Quality) -> pb::Quality {
        match q {
            Quality::High => pb::Quality::High,
            Quality::Medium => pb::Quality::Medium,
            Quality::Low => pb::Quality::Low,
            Quality::Unknown => pb::Quality::Unknown,
        }
    }
}

/// `None` for UNSPECIFIED: leave the quality as it is.
impl From<pb::Quality> for Option<Quality> {
    fn from(q: pb::Quality) -> Option<Quality> {
        match q {
            pb::Quality::Unspecified => None,
            pb::Quality::High => Some(Quality::High),
            pb::Quality::Medium => Some(Quality::Medium),
            pb::Quality::Low => Some(Quality::Low),
            pb::Quality::Unknown => Some(Quality::Unknown),
        }
    }
}

impl From<SenderStatus> for pb::SenderStatus {
    fn from(s: SenderStatus) -> pb::SenderStatus {
        match s {
            SenderStatus::Connected => pb::SenderStatus::Connected,
            SenderStatus::Pending => pb::SenderStatus::Pending,
            SenderStatus::Offline => pb::SenderStatus::Offline,
            SenderStatus::Flagged => pb::SenderStatus::Flagged,
            SenderStatus::Restricted => pb::SenderStatus::Restricted,
            SenderStatus::Banned => pb::SenderStatus::Banned,
        }
    }
}

/// `None` for UNSPECIFIED: leave the status as it is.
impl From<pb::SenderStatus> for Option<SenderStatus> {
    fn from(s: pb::SenderStatus) -> Option<SenderStatus> {
        match s {
            pb::SenderStatus::Unspecified => None,
            pb::SenderStatus::Connected => Some(SenderStatus::Connected),
            pb::SenderStatus::Pending => Some(SenderStatus::Pending),
            pb::SenderStatus::Offline => Some(SenderStatus::Offline),
            pb::SenderStatus::Flagged => Some(SenderStatus::Flagged),
            pb::SenderStatus::Restricted => Some(SenderStatus::Restricted),
            pb::SenderStatus::Banned => Some(SenderStatus::Banned),
        }
    }
}

impl AdmitInput {
    /// The message of an AdmitRequest found at `at`.
    fn from_pb(r: pb::AdmitRequest, at: FieldPath) -> Result<AdmitInput, Error> {
        Ok(AdmitInput {
            category: Category::from_code(r.category.into())
                .ok_or_else(|| at.invalid("category", format!("unknown value {}", r.category)))?,
            portfolio_id: r.portfolio_id,
            sender_id: r.sender_id,
            recipient: r.recipient,
            template: r.template,
            template_language: r.template_language,
            idempotency_key: r.idempotency_key,
            max_wait: max_wait(r.max_wait, at)?,
        })
    }
}

/// `max_wait`: unset is zero (never wait); negative or beyond [`MAX_WAIT`] is refused.
fn max_wait(d: Option<prost_types::Duration>, at: FieldPath) -> Result<Duration, Error> {
    let Some(d) = d else { return Ok(Duration::ZERO) };
    let wait = Duration::try_from(d).map_err(|_| at.invalid("max_wait", "must not be negative"))?;
    if wait > MAX_WAIT {
        return Err(at.invalid("max_wait", format!("must be at most {}s", MAX_WAIT.as_secs())));
    }
    Ok(wait)
}

impl TryFrom<pb::AdmitRequest> for AdmitInput {
    type Error = Error;

    fn try_from(r: pb::AdmitRequest) -> Result<AdmitInput, Error> {
        AdmitInput::from_pb(r, FieldPath::TOP)
    }
}

impl TryFrom<pb::AdmitBatchRequest> for Vec<AdmitInput> {
    type Error = Error;

    fn try_from(r: pb::AdmitBatchRequest) -> Result<Vec<AdmitInput>, Error> {
        r.requests.into_iter().enumerate().map(|(i, r)| AdmitInput::from_pb(r, FieldPath::batch(i))).collect()
    }
}

impl TryFrom<pb::UpdatePortfolioRequest> for PortfolioUpdate {
    type Error = Error;

    /// Everything but the portfolio id, which the caller takes first.
    fn try_from(r: pb::UpdatePortfolioRequest) -> Result<PortfolioUpdate, Error> {
        let senders = r
            .senders
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let at = FieldPath::item("senders", i);
                let status = known::<pb::SenderStatus>(s.status, at, "status")?;
                let quality = known::<pb::Quality>(s.quality, at, "quality")?;
                Ok((s.sender_id, status.into(), quality.into()))
            })
            .collect::<Result<_, Error>>()?;
        let templates = r
            .templates
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let quality = known::<pb::Quality>(t.quality, FieldPath::item("templates", i), "quality")?;
                Ok((t.name, t.language, (!t.status.is_empty()).then_some(t.status), quality.into()))
            })
            .collect::<Result<_, Error>>()?;
        Ok(PortfolioUpdate {
            tier: (!r.tier.is_empty()).then_some(r.tier),
            quality: known::<pb::Quality>(r.quality, FieldPath::TOP, "quality")?.into(),
            senders,
            templates,
            mode: known::<pb::Mode>(r.mode, FieldPath::TOP, "mode")?.into(),
        })
    }
}

/// `None` for UNSPECIFIED: leave the mode as it is; `Some(None)` for CONFIGURED: follow the
/// configuration again.
impl From<pb::Mode> for Option<Option<policy::Mode>> {
    fn from(m: pb::Mode) -> Option<Option<policy::Mode>> {
        match m {
            pb::Mode::Unspecified => None,
            pb::Mode::Enforce => Some(Some(policy::Mode::Enforce)),
            pb::Mode::Shadow => Some(Some(policy::Mode::Shadow)),
            pb::Mode::Configured => Some(None),
        }
    }
}

impl From<Usage> for pb::Usage {
    fn from(u: Usage) -> pb::Usage {
        let status = u.status();
        let remaining = u.snapshot.remaining();
        let (limit, unlimited) = match u.snapshot.tier.limit {
            Limit::Limited(n) => (n, false),
            Limit::Unlimited => (0, true),
        };
        pb::Usage {
            portfolio_id: u.scope.portfolio,
            unique_recipients: u.snapshot.counted,
            limit,
            unlimited,
            remaining: remaining.unwrap_or(0),
            tier: u.snapshot.tier.name,
            next_slot_at: u.snapshot.next_slot_at.map(timestamp),
            sender_id: u.scope.sender.unwrap_or_default(),
            quality: u.detail.as_ref().map_or(pb::Quality::Unspecified, |d| d.quality.into()).into(),
            status: pb::SenderStatus::from(status).into(),
            unique_recipients_7d: u.detail.as_ref().map_or(0, |d| d.unique_7d),
            unique_recipients_30d: u.detail.as_ref().map_or(0, |d| d.unique_30d),
            upgrade: u.detail.map(|d| pb::UpgradeProjection {
                next_tier: d.projection.next_tier.map(|t| t.name).unwrap_or_default(),
                eligible: d.projection.eligible,
                period_days: d.projection.period_days,
                unique_recipients: d.projection.count,
                threshold: d.projection.threshold,
                blockers: d.projection.blockers,
                applies_after: Some(duration(d.projection.delay)),
            }),
        }
    }
}

impl From<PortfolioView> for pb::Portfolio {
    fn from(v: PortfolioView) -> pb::Portfolio {
        let displays: std::collections::BTreeMap<&String, &String> =
            v.state.aliases.iter().map(|(d, id)| (id, d)).collect();
        let senders = v
            .state
            .senders
            .iter()
            .map(|(id, s)| pb::Sender {
                sender_id: id.clone(),
                status: pb::SenderStatus::from(v.sender_status(id)).into(),
                quality: pb::Quality::from(s.quality).into(),
                blocked: v.blocked_senders.contains(id),
                status_since: s.since.map(timestamp),
                display_phone_number: displays.get(id).map(|d| d.to_string()).unwrap_or_default(),
                throughput_mps: v.throughput_mps.get(id).copied().unwrap_or(policy::DEFAULT_THROUGHPUT_MPS),
                throughput_backoff_until: s.throughput_backoff_until.map(timestamp),
            })
            .collect();
        let templates = v
            .state
            .templates
            .iter()
            .map(|(key, t)| {
                let every_language = v.state.templates.get(&TemplateKey::new(&key.name, "")).and_then(|t| t.event());
                let status = policy::template_status_in_force(t.event(), every_language);
                pb::Template {
                    name: key.name.clone(),
                    status: status.unwrap_or_default().to_owned(),
                    quality: pb::Quality::from(t.quality).into(),
                    active: policy::template_active(status),
                    language: key.language.clone(),
                }
            })
            .collect();
        pb::Portfolio {
            portfolio_id: v.portfolio,
            quality: pb::Quality::from(v.state.quality).into(),
            senders,
            templates,
            alerts: v.state.alerts.into_iter().map(|(key, body)| pb::AccountAlert { key, body }).collect(),
            usage: v.usage.into_iter().map(pb::Usage::from).collect(),
            opted_out_recipients: v.state.opted_out,
            mode: pb::Mode::from(v.mode).into(),
        }
    }
}

impl From<policy::Mode> for pb::Mode {
    fn from(m: policy::Mode) -> pb::Mode {
        match m {
            policy::Mode::Enforce => pb::Mode::Enforce,
            policy::Mode::Shadow => pb::Mode::Shadow,
        }
    }
}

impl From<AdmitAnswer> for pb::AdmitResponse {
    fn from(a: AdmitAnswer) -> pb::AdmitResponse {
        pb::AdmitResponse {
            decision: pb::Decision::from(a.reason.decision()).into(),
            reason: a.reason.code(),
            lease: a.lease.unwrap_or_default(),
            retry_after: a.retry_after.map(duration),
            usage: Some(a.usage.into()),
            waited: (!a.waited.is_zero()).then(|| duration(a.waited)),
            shadow_decision: a.shadow.map_or(0, |r| pb::Decision::from(r.decision()).into()),
            shadow_reason: a.shadow.map_or(0, |r| r.code()),
        }
    }
}
