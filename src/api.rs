//! The gRPC edge: the only module that sees protobuf types. It converts requests to domain
//! values, calls the [`Limiter`], and converts answers and errors back.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tonic::{Request, Response, Status};

use crate::limiter::{AdmitAnswer, AdmitInput, Error, Limiter, Usage};
use crate::pb;
use crate::policy::{Category, Decision, Limit, Micros, Reason};
use crate::store::StoreError;

/// The `tiergate.v1.Limiter` service.
pub struct LimiterApi {
    limiter: Arc<Limiter>,
}

impl LimiterApi {
    /// A service over `limiter`.
    pub fn new(limiter: Arc<Limiter>) -> LimiterApi {
        LimiterApi { limiter }
    }
}

/// The one place errors become gRPC statuses.
fn status(e: Error) -> Status {
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
    }
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
        let answer = self.limiter.admit(&input).await.map_err(status)?;
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
        let answers = self.limiter.admit_batch(&inputs).await.map_err(status)?;
        Ok(Response::new(pb::AdmitBatchResponse { responses: answers.into_iter().map(admit_response).collect() }))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let released = self.limiter.release(&request.into_inner().lease).await.map_err(status)?;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn record_inbound(
        &self,
        request: Request<pb::RecordInboundRequest>,
    ) -> Result<Response<pb::RecordInboundResponse>, Status> {
        let r = request.into_inner();
        let closes = self.limiter.record_inbound(&r.portfolio_id, &r.sender_id, &r.recipient).await.map_err(status)?;
        Ok(Response::new(pb::RecordInboundResponse { window_closes_at: Some(timestamp(closes)) }))
    }

    async fn get_usage(&self, request: Request<pb::GetUsageRequest>) -> Result<Response<pb::Usage>, Status> {
        let r = request.into_inner();
        let u = self.limiter.usage(&r.portfolio_id, &r.sender_id).await.map_err(status)?;
        Ok(Response::new(usage(u)))
    }

    async fn set_tier(&self, request: Request<pb::SetTierRequest>) -> Result<Response<pb::Usage>, Status> {
        let r = request.into_inner();
        let u = self.limiter.set_tier(&r.portfolio_id, &r.sender_id, &r.tier).await.map_err(status)?;
        Ok(Response::new(usage(u)))
    }
}
