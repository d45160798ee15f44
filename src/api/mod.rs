//! The gRPC edge (`tiergate.v1.Limiter`): each call converts its request ([`convert`]), asks the
//! [`Limiter`], and converts the answer back; failures become statuses through the one table in
//! [`error`]. No protobuf type goes past this module. Each call first checks the token its
//! [`Role`] needs. [`edge`] refuses oversized requests and counts and times every call.

pub mod convert;
pub mod edge;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::{self, Kind};
use crate::limiter::{AdmitInput, Limiter, PortfolioUpdate};
use crate::pb;

use convert::timestamp;

/// Who may make a call, as the token it carries shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sending and reading: Admit, AdmitBatch, Release, GetUsage, GetPortfolio. Needs
    /// `server.sender_token` or `server.admin_token` when a sender token is set.
    Sender,
    /// Whatever lifts or sets a limit: SetTier, SetOptOut, UpdatePortfolio, and RecordInbound
    /// (an open service window exempts its recipient). Needs `server.admin_token` when set, else
    /// the sender token when that is set.
    Admin,
}

/// The API tokens, and the one rule of which a [`Role`] needs; the gRPC edge and the status page
/// both ask it.
#[derive(Clone, Default)]
pub struct Tokens {
    /// `server.sender_token`.
    pub sender: Option<String>,
    /// `server.admin_token`.
    pub admin: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens { .. }")
    }
}

impl Tokens {
    /// Lets through `given` (the token of an `authorization: Bearer <token>`) when `role`
    /// accepts it, or when no token guards `role`. Refused: [`Kind::Unauthenticated`] without a
    /// token, [`Kind::PermissionDenied`] with another, each with the name of the token needed.
    /// Every accepted token is compared, each in constant time, so the time taken does not tell
    /// which one came close.
    pub fn check(&self, given: Option<&str>, role: Role) -> Result<(), (Kind, &'static str)> {
        let (sender, admin) = (self.sender.as_deref(), self.admin.as_deref());
        let (accepted, needed) = match role {
            Role::Sender if sender.is_none() => return Ok(()),
            Role::Sender => ([sender, admin], "server.sender_token or server.admin_token"),
            Role::Admin if admin.is_some() => ([admin, None], "server.admin_token"),
            // Without an admin token, the sender token guards every call.
            Role::Admin if sender.is_some() => ([sender, None], "server.sender_token"),
            Role::Admin => return Ok(()),
        };
        let checks = accepted.map(|token| token.map(|t| error::check_secret(given, t)));
        if checks.iter().flatten().any(Result::is_ok) {
            return Ok(());
        }
        let kind = if given.is_none() { Kind::Unauthenticated } else { Kind::PermissionDenied };
        Err((kind, needed))
    }
}

/// The token of an `authorization` header value `Bearer <token>`.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    value.and_then(|v| v.strip_prefix("Bearer "))
}

/// The `tiergate.v1.Limiter` service.
pub struct LimiterApi {
    limiter: Arc<Limiter>,
    tokens: Tokens,
}

impl LimiterApi {
    /// A service over `limiter`; each [`Role`] says which calls need which token.
    pub fn new(limiter: Arc<Limiter>, sender_token: Option<String>, admin_token: Option<String>) -> LimiterApi {
        LimiterApi { limiter, tokens: Tokens { sender: sender_token, admin: admin_token } }
    }

    /// Lets the call through when it carries `authorization: Bearer <token>` with a token that
    /// `role` accepts, or when no token guards `role`: UNAUTHENTICATED without a token,
    /// PERMISSION_DENIED with another. The answer names the token needed, never the one given.
    fn authorize<T>(&self, request: &Request<T>, role: Role) -> Result<(), Status> {
        let given = bearer(request.metadata().get("authorization").and_then(|v| v.to_str().ok()));
        self.tokens.check(given, role).map_err(|(kind, needed)| match kind {
            Kind::Unauthenticated => {
                Status::new(kind.grpc(), format!("this call needs authorization: Bearer <{needed}>"))
            }
            _ => Status::new(kind.grpc(), format!("wrong token: this call needs {needed}")),
        })
    }
}

#[tonic::async_trait]
impl pb::limiter_server::Limiter for LimiterApi {
    async fn admit(&self, request: Request<pb::AdmitRequest>) -> Result<Response<pb::AdmitResponse>, Status> {
        self.authorize(&request, Role::Sender)?;
        let deadline = edge::deadline(request.metadata());
        let mut input = AdmitInput::try_from(request.into_inner())?;
        input.max_wait = edge::within(input.max_wait, deadline);
        let answer = self.limiter.admit(&input).await?;
        Ok(Response::new(answer.into()))
    }

    async fn admit_batch(
        &self,
        request: Request<pb::AdmitBatchRequest>,
    ) -> Result<Response<pb::AdmitBatchResponse>, Status> {
        self.authorize(&request, Role::Sender)?;
        let deadline = edge::deadline(request.metadata());
        let mut inputs = Vec::<AdmitInput>::try_from(request.into_inner())?;
        for input in &mut inputs {
            input.max_wait = edge::within(input.max_wait, deadline);
        }
        let answers = self.limiter.admit_batch(&inputs).await?;
        Ok(Response::new(pb::AdmitBatchResponse { responses: answers.into_iter().map(Into::into).collect() }))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.authorize(&request, Role::Sender)?;
        let released = self.limiter.release(&request.into_inner().lease).await?;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn record_inbound(
        &self,
        request: Request<pb::RecordInboundRequest>,
    ) -> Result<Response<pb::RecordInboundResponse>, Status> {
        self.authorize(&request, Role::Admin)?;
        let r = request.into_inner();
        let closes = self.limiter.record_inbound(&r.portfolio_id, &r.sender_id, &r.recipient).await?;
        Ok(Response::new(pb::RecordInboundResponse { window_closes_at: Some(timestamp(closes)) }))
    }

    async fn get_usage(&self, request: Request<pb::GetUsageRequest>) -> Result<Response<pb::Usage>, Status> {
        self.authorize(&request, Role::Sender)?;
        let r = request.into_inner();
        let usage = self.limiter.usage(&r.portfolio_id, &r.sender_id).await?;
        Ok(Response::new(usage.into()))
    }

    async fn set_tier(&self, request: Request<pb::SetTierRequest>) -> Result<Response<pb::Usage>, Status> {
        self.authorize(&request, Role::Admin)?;
        let r = request.into_inner();
        let usage = self.limiter.set_tier(&r.portfolio_id, &r.sender_id, &r.tier).await?;
        Ok(Response::new(usage.into()))
    }

    async fn set_opt_out(
        &self,
        request: Request<pb::SetOptOutRequest>,
    ) -> Result<Response<pb::SetOptOutResponse>, Status> {
        self.authorize(&request, Role::Admin)?;
        let r = request.into_inner();
        self.limiter.set_opt_out(&r.portfolio_id, &r.recipient, r.opted_out).await?;
        Ok(Response::new(pb::SetOptOutResponse { opted_out: r.opted_out }))
    }

    async fn update_portfolio(
        &self,
        request: Request<pb::UpdatePortfolioRequest>,
    ) -> Result<Response<pb::Portfolio>, Status> {
        self.authorize(&request, Role::Admin)?;
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
        self.authorize(&request, Role::Sender)?;
        let view = self.limiter.portfolio(&request.into_inner().portfolio_id).await?;
        Ok(Response::new(view.into()))
    }
}
