//! The gRPC edge: the only module that sees protobuf types. It converts requests to domain
//! values, calls the [`Limiter`], and converts answers and errors back.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tonic::{Request, Response, Status};

use crate::limiter::{AdmitAnswer, AdmitInput, Error, Limiter, PortfolioUpdate, PortfolioView, Usage};
use crate::pb;
use crate::policy::{self, Category, Decision, Limit, Micros, Quality, Reason, SenderStatus};
use crate::store::StoreError;

/// The `tiergate.v1.Limiter` service.
pub struct LimiterApi {
    limiter: Arc<Limiter>,
    /// Required as `authorization: Bearer <token>` by the calls that change a portfolio.
    admin_token: Option<String>,
}

impl LimiterApi {
    /// A service over `limiter`; with `admin_token`, SetTier, SetOptOut and UpdatePortfolio
    /// need it.
    pub fn new(limiter: Arc<Limiter>, admin_token: Option<String>) -> LimiterApi {
        LimiterApi { limiter, admin_token }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.admin_token else { return Ok(()) };
        let given = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let Some(given) = given.and_then(|v| v.strip_prefix("Bearer ")) else {
            return Err(Status::unauthenticated("this call needs authorization: Bearer <server.admin_token>"));
        };
        let same =
            given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(())
        } else {
            Err(Status::permission_denied("wrong admin token"))
        }
    }
}

/// The one place errors become gRPC statuses.
fn error_status(e: Error) -> Status {
    match e {
        // The caller must fix the request; the message names the field.
        Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        // Redis is down or slow: clients may retry, and no message went out unchecked.
        Error::Store(StoreError::Unavailable(m)) => Status::unavailable(m),
        // A store answer that makes no sense: a bug or a mismatched deployment, not retryable.
        Error::Store(StoreError::Internal(m)) => {
            tracing::error!(error = %m, "Store call failed.");
            Status::internal(m)
        }
    }
}

fn category(value: i32) -> Result<Category, Status> {
    match pb::Category::try_from(value) {
        Ok(pb::Category::Unspecified) => Ok(Category::Unspecified),
        Ok(pb::Category::Marketing) => Ok(Category::Marketing),
        Ok(pb::Category::Utility) => Ok(Category::Utility),
        Ok(pb::Category::Authentication) => Ok(Category::Authentication),
        Ok(pb::Category::Service) => Ok(Category::Service),
        Err(_) => Err(Status::invalid_argument(format!("category: unknown value {value}"))),
    }
}

fn admit_input(r: pb::AdmitRequest) -> Result<AdmitInput, Status> {
    Ok(AdmitInput {
        category: category(r.category)?,
        portfolio_id: r.portfolio_id,
        sender_id: r.sender_id,
        recipient: r.recipient,
        template: r.template,
    })
}

fn reason(r: Reason) -> pb::Reason {
    match r {
        Reason::NewRecipient => pb::Reason::NewRecipient,
        Reason::AlreadyCounted => pb::Reason::AlreadyCounted,
        Reason::ServiceWindow => pb::Reason::ServiceWindow,
        Reason::LimitReached => pb::Reason::LimitReached,
        Reason::StoreUnavailable => pb::Reason::StoreUnavailable,
        Reason::OptedOut => pb::Reason::OptedOut,
        Reason::TemplateBlocked => pb::Reason::TemplateBlocked,
        Reason::HeadroomReserved => pb::Reason::HeadroomReserved,
        Reason::SenderBlocked => pb::Reason::SenderBlocked,
        Reason::OutsideServiceWindow => pb::Reason::OutsideServiceWindow,
    }
}

fn quality(q: Quality) -> pb::Quality {
    match q {
        Quality::High => pb::Quality::High,
        Quality::Medium => pb::Quality::Medium,
        Quality::Low => pb::Quality::Low,
        Quality::Unknown => pb::Quality::Unknown,
    }
}

/// `None` for UNSPECIFIED (leave unchanged).
fn quality_in(field: &str, value: i32) -> Result<Option<Quality>, Status> {
    match pb::Quality::try_from(value) {
        Ok(pb::Quality::Unspecified) => Ok(None),
        Ok(pb::Quality::High) => Ok(Some(Quality::High)),
        Ok(pb::Quality::Medium) => Ok(Some(Quality::Medium)),
        Ok(pb::Quality::Low) => Ok(Some(Quality::Low)),
        Ok(pb::Quality::Unknown) => Ok(Some(Quality::Unknown)),
        Err(_) => Err(Status::invalid_argument(format!("{field}: unknown value {value}"))),
    }
}

fn status(s: SenderStatus) -> pb::SenderStatus {
    match s {
        SenderStatus::Connected => pb::SenderStatus::Connected,
        SenderStatus::Pending => pb::SenderStatus::Pending,
        SenderStatus::Offline => pb::SenderStatus::Offline,
        SenderStatus::Flagged => pb::SenderStatus::Flagged,
        SenderStatus::Restricted => pb::SenderStatus::Restricted,
        SenderStatus::Banned => pb::SenderStatus::Banned,
    }
}

/// `None` for UNSPECIFIED (leave unchanged).
fn status_in(field: &str, value: i32) -> Result<Option<SenderStatus>, Status> {
    match pb::SenderStatus::try_from(value) {
        Ok(pb::SenderStatus::Unspecified) => Ok(None),
        Ok(pb::SenderStatus::Connected) => Ok(Some(SenderStatus::Connected)),
        Ok(pb::SenderStatus::Pending) => Ok(Some(SenderStatus::Pending)),
        Ok(pb::SenderStatus::Offline) => Ok(Some(SenderStatus::Offline)),
        Ok(pb::SenderStatus::Flagged) => Ok(Some(SenderStatus::Flagged)),
        Ok(pb::SenderStatus::Restricted) => Ok(Some(SenderStatus::Restricted)),
        Ok(pb::SenderStatus::Banned) => Ok(Some(SenderStatus::Banned)),
        Err(_) => Err(Status::invalid_argument(format!("{field}: unknown value {value}"))),
    }
}

fn timestamp(us: Micros) -> prost_types::Timestamp {
    let t = UNIX_EPOCH + Duration::from_micros(us);
    t.into()
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration { seconds: i64::MAX, nanos: 0 })
}

fn usage(u: Usage) -> pb::Usage {
    let restricted = u.restricted();
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
        quality: u.detail.as_ref().map_or(pb::Quality::Unspecified, |d| quality(d.quality)).into(),
        status: status(u.detail.as_ref().map_or(SenderStatus::Connected.shown(restricted), |d| d.status)).into(),
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

fn portfolio(v: PortfolioView) -> pb::Portfolio {
    let displays: std::collections::BTreeMap<&String, &String> =
        v.state.aliases.iter().map(|(d, id)| (id, d)).collect();
    let full_scopes: Vec<Option<String>> =
        v.usage.iter().filter(|u| u.restricted()).map(|u| u.scope.sender.clone()).collect();
    let senders = v
        .state
        .senders
        .iter()
        .map(|(id, s)| {
            let full = full_scopes.iter().any(|sender| sender.as_ref().is_none_or(|x| x == id));
            pb::Sender {
                sender_id: id.clone(),
                status: status(s.status.unwrap_or_default().shown(full)).into(),
                quality: quality(s.quality).into(),
                blocked: v.blocked_senders.contains(id),
                status_since: s.since.map(timestamp),
                display_phone_number: displays.get(id).map(|d| d.to_string()).unwrap_or_default(),
            }
        })
        .collect();
    let templates = v
        .state
        .templates
        .iter()
        .map(|(name, t)| pb::Template {
            name: name.clone(),
            status: t.status.clone().unwrap_or_default(),
            quality: quality(t.quality).into(),
            active: policy::template_active(t.status.as_deref()),
        })
        .collect();
    pb::Portfolio {
        portfolio_id: v.portfolio,
        quality: quality(v.state.quality).into(),
        senders,
        templates,
        alerts: v.state.alerts.into_iter().map(|(key, body)| pb::AccountAlert { key, body }).collect(),
        usage: v.usage.into_iter().map(usage).collect(),
        opted_out_recipients: v.state.opted_out,
    }
}

fn portfolio_update(r: pb::UpdatePortfolioRequest) -> Result<(String, PortfolioUpdate), Status> {
    let senders = r
        .senders
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            Ok((
                s.sender_id,
                status_in(&format!("senders[{i}].status"), s.status)?,
                quality_in(&format!("senders[{i}].quality"), s.quality)?,
            ))
        })
        .collect::<Result<_, Status>>()?;
    let templates = r
        .templates
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let status = (!t.status.is_empty()).then_some(t.status);
            Ok((t.name, status, quality_in(&format!("templates[{i}].quality"), t.quality)?))
        })
        .collect::<Result<_, Status>>()?;
    let update = PortfolioUpdate {
        tier: (!r.tier.is_empty()).then_some(r.tier),
        quality: quality_in("quality", r.quality)?,
        senders,
        templates,
    };
    Ok((r.portfolio_id, update))
}

fn admit_response(a: AdmitAnswer) -> pb::AdmitResponse {
    let decision = match a.reason.decision() {
        Decision::Admitted => pb::Decision::Admitted,
        Decision::Denied => pb::Decision::Denied,
    };
    pb::AdmitResponse {
        decision: decision.into(),
        reason: reason(a.reason).into(),
        lease: a.lease.unwrap_or_default(),
        retry_after: a.retry_after.map(duration),
        usage: Some(usage(a.usage)),
    }
}

#[tonic::async_trait]
impl pb::limiter_server::Limiter for LimiterApi {
    async fn admit(&self, request: Request<pb::AdmitRequest>) -> Result<Response<pb::AdmitResponse>, Status> {
        let input = admit_input(request.into_inner())?;
        let answer = self.limiter.admit(&input).await.map_err(error_status)?;
        Ok(Response::new(admit_response(answer)))
    }

    async fn admit_batch(
        &self,
        request: Request<pb::AdmitBatchRequest>,
    ) -> Result<Response<pb::AdmitBatchResponse>, Status> {
        let inputs = request
            .into_inner()
            .requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                admit_input(r).map_err(|s| Status::invalid_argument(format!("requests[{i}].{}", s.message())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let answers = self.limiter.admit_batch(&inputs).await.map_err(error_status)?;
        Ok(Response::new(pb::AdmitBatchResponse { responses: answers.into_iter().map(admit_response).collect() }))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let released = self.limiter.release(&request.into_inner().lease).await.map_err(error_status)?;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn record_inbound(
        &self,
        request: Request<pb::RecordInboundRequest>,
    ) -> Result<Response<pb::RecordInboundResponse>, Status> {
        let r = request.into_inner();
        let closes =
            self.limiter.record_inbound(&r.portfolio_id, &r.sender_id, &r.recipient).await.map_err(error_status)?;
        Ok(Response::new(pb::RecordInboundResponse { window_closes_at: Some(timestamp(closes)) }))
    }

    async fn get_usage(&self, request: Request<pb::GetUsageRequest>) -> Result<Response<pb::Usage>, Status> {
        let r = request.into_inner();
        let u = self.limiter.usage(&r.portfolio_id, &r.sender_id).await.map_err(error_status)?;
        Ok(Response::new(usage(u)))
    }

    async fn set_tier(&self, request: Request<pb::SetTierRequest>) -> Result<Response<pb::Usage>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let u = self.limiter.set_tier(&r.portfolio_id, &r.sender_id, &r.tier).await.map_err(error_status)?;
        Ok(Response::new(usage(u)))
    }

    async fn set_opt_out(
        &self,
        request: Request<pb::SetOptOutRequest>,
    ) -> Result<Response<pb::SetOptOutResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        self.limiter.set_opt_out(&r.portfolio_id, &r.recipient, r.opted_out).await.map_err(error_status)?;
        Ok(Response::new(pb::SetOptOutResponse { opted_out: r.opted_out }))
    }

    async fn update_portfolio(
        &self,
        request: Request<pb::UpdatePortfolioRequest>,
    ) -> Result<Response<pb::Portfolio>, Status> {
        self.authorize(&request)?;
        let (id, update) = portfolio_update(request.into_inner())?;
        let view = self.limiter.update_portfolio(&id, &update).await.map_err(error_status)?;
        Ok(Response::new(portfolio(view)))
    }

    async fn get_portfolio(
        &self,
        request: Request<pb::GetPortfolioRequest>,
    ) -> Result<Response<pb::Portfolio>, Status> {
        let view = self.limiter.portfolio(&request.into_inner().portfolio_id).await.map_err(error_status)?;
        Ok(Response::new(portfolio(view)))
    }
}
