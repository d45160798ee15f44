//! The gRPC edge (`tiergate.v1.Limiter`): each call converts its request ([`convert`]), asks the
//! [`Limiter`], and converts the answer back; failures become statuses through the one table in
//! [`error`]. No protobuf type goes past this module.

pub mod convert;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::{self, Kind};
use crate::limiter::{AdmitInput, Limiter, PortfolioUpdate};
use crate::pb;

use convert::timestamp;

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
        let given = given.and_then(|v| v.strip_prefix("Bearer "));
        error::check_secret(given, token).map_err(|kind| match kind {
            Kind::Unauthenticated => {
                Status::new(kind.grpc(), "this call needs authorization: Bearer <server.admin_token>")
            }
            _ => Status::new(kind.grpc(), "wrong admin token"),
        })
    }
}

#[tonic::async_trait]
impl pb::limiter_server::Limiter for LimiterApi {
    async fn admit(&self, request: Request<pb::AdmitRequest>) -> Result<Response<pb::AdmitResponse>, Status> {
        let input = AdmitInput::try_from(request.into_inner())?;
        let answer = self.limiter.admit(&input).await?;
        Ok(Response::new(answer.into()))
    }

    async fn admit_batch(
        &self,
        request: Request<pb::AdmitBatchRequest>,
    ) -> Result<Response<pb::AdmitBatchResponse>, Status> {
        let inputs = Vec::<AdmitInput>::try_from(request.into_inner())?;
        let answers = self.limiter.admit_batch(&inputs).await?;
        Ok(Response::new(pb::AdmitBatchResponse { responses: answers.into_iter().map(Into::into).collect() }))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let released = self.limiter.release(&request.into_inner().lease).await?;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn record_inbound(
        &self,
        request: Request<pb::RecordInboundRequest>,
    ) -> Result<Response<pb::RecordInboundResponse>, Status> {
        let r = request.into_inner();
        let closes = self.limiter.record_inbound(&r.portfolio_id, &r.sender_id, &r.recipient).await?;
        Ok(Response::new(pb::RecordInboundResponse { window_closes_at: Some(timestamp(closes)) }))
    }

    async fn get_usage(&self, request: Request<pb::GetUsageRequest>) -> Result<Response<pb::Usage>, Status> {
        let r = request.into_inner();
        let usage = self.limiter.usage(&r.portfolio_id, &r.sender_id).await?;
        Ok(Response::new(usage.into()))
    }

    async fn set_tier(&self, request: Request<pb::SetTierRequest>) -> Result<Response<pb::Usage>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let usage = self.limiter.set_tier(&r.portfolio_id, &r.sender_id, &r.tier).await?;
        Ok(Response::new(usage.into()))
    }

    async fn set_opt_out(
        &self,
        request: Request<pb::SetOptOutRequest>,
    ) -> Result<Response<pb::SetOptOutResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        self.limiter.set_opt_out(&r.portfolio_id, &r.recipient, r.opted_out).await?;
        Ok(Response::new(pb::SetOptOutResponse { opted_out: r.opted_out }))
    }

    async fn update_portfolio(
        &self,
        request: Request<pb::UpdatePortfolioRequest>,
    ) -> Result<Response<pb::Portfolio>, Status> {
        self.authorize(&request)?;
        let mut r = request.into_inner();
        let id = std::mem::take(&mut r.portfolio_id);
        let update = PortfolioUpdate::try_from(r)?;
        let view = self.limiter.update_portfolio(&id, &update).await?;
        Ok(Response::new(view.into()))
    }

    async fn get_portfolio(
        &self,
        request: Request<pb::GetPortfolioRequest>,
    ) -> Result<Response<pb::Portfolio>, Status> {
        let view = self.limiter.portfolio(&request.into_inner().portfolio_id).await?;
        Ok(Response::new(view.into()))
    }
}
