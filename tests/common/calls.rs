//! Limiter calls in one line for tests: each unwraps the answer, so a call that fails fails the
//! test where it is made.

use std::time::{Duration, Instant};

use tiergate::pb::{self, limiter_client::LimiterClient, Decision, Reason};
use tonic::transport::Channel;
use tonic::Code;

use super::requests;

/// A Limiter client.
pub type Client = LimiterClient<Channel>;

/// Admit, unwrapped.
pub async fn admit(c: &mut Client, r: pb::AdmitRequest) -> pb::AdmitResponse {
    c.admit(r).await.unwrap().into_inner()
}

/// The decision and reason of an Admit answer.
pub fn outcome(r: &pb::AdmitResponse) -> (Decision, Reason) {
    (r.decision(), r.reason())
}

/// The reason an Admit was decided with.
pub async fn reason(c: &mut Client, r: pb::AdmitRequest) -> Reason {
    admit(c, r).await.reason()
}

/// GetUsage of a scope (`sender` empty for the whole portfolio), unwrapped.
pub async fn usage(c: &mut Client, portfolio: &str, sender: &str) -> pb::Usage {
    c.get_usage(requests::usage(portfolio, sender)).await.unwrap().into_inner()
}

/// GetPortfolio, unwrapped.
pub async fn portfolio(c: &mut Client, id: &str) -> pb::Portfolio {
    c.get_portfolio(requests::portfolio(id)).await.unwrap().into_inner()
}

/// RecordInbound, unwrapped: opens the service window between `sender` and `recipient`.
pub async fn inbound(c: &mut Client, portfolio: &str, sender: &str, recipient: &str) -> pb::RecordInboundResponse {
    c.record_inbound(requests::inbound(portfolio, sender, recipient)).await.unwrap().into_inner()
}

/// Retries an Admit until it succeeds or `limit` passes; returns the answer and how long it took.
/// Every failure on the way must be UNAVAILABLE (the store is down), never anything else.
pub async fn admit_until_ok(c: &mut Client, r: pb::AdmitRequest, limit: Duration) -> (pb::AdmitResponse, Duration) {
    let started = Instant::now();
    loop {
        match c.admit(r.clone()).await {
            Ok(resp) => return (resp.into_inner(), started.elapsed()),
            Err(s) if started.elapsed() < limit => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("admission did not recover within {limit:?}: {s:?}"),
        }
    }
}
