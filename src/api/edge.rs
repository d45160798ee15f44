//! The service wrapped around the Limiter's, which sees every call, those refused before a handler
//! runs (a request too large, one that does not decode) included: it answers a request over
//! `server.max_request_bytes` RESOURCE_EXHAUSTED, and counts and times every call
//! (`tiergate_grpc_requests_total{method,code}`, `tiergate_grpc_request_duration_seconds{method}`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Code;

use crate::error::Kind;
use crate::metrics;

/// A gRPC service whose oversized requests are answered RESOURCE_EXHAUSTED, and whose calls are
/// counted by method and code, and timed by method.
///
/// Oversized: tonic refuses a request over its decoding limit with OUT_OF_RANGE; gRPC specifies
/// RESOURCE_EXHAUSTED. No Limiter call answers OUT_OF_RANGE itself (see [`Kind`]), so each one
/// is that refusal, and is rewritten.
///
/// Counted: the code is the `grpc-status` of the response's headers (after that rewrite), where
/// every failure of a unary call is sent, else OK; the time runs until those headers, when a
/// unary call's answer is ready. A call the client gives up on before that is counted as
/// CANCELLED.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    /// `server.max_request_bytes`, for the refusal's message.
    limit: usize,
}

impl<S> Edge<S> {
    /// Wraps `inner`, whose decoding limit is `limit`, exporting each Limiter method at 0 calls
    /// from now on.
    pub fn new(inner: S, limit: usize) -> Edge<S> {
        metrics::grpc_start();
        Edge { inner, limit }
    }
}

impl<S: NamedService> NamedService for Edge<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Edge<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut call = Call { method: method_of(request.uri().path()), started: Instant::now(), done: false };
        let (answer, limit) = (self.inner.call(request), self.limit);
        Box::pin(async move {
            let mut response = answer.await?;
            let mut code = tonic::Status::from_header_map(response.headers()).map_or(Code::Ok, |s| s.code());
            if code == Code::OutOfRange {
                let message = format!("the request is larger than server.max_request_bytes ({limit} bytes)");
                response = tonic::Status::new(Kind::ResourceExhausted.grpc(), message).into_http();
                code = Kind::ResourceExhausted.grpc();
            }
            call.finish(code);
            Ok(response)
        })
    }
}

/// The `method` label of a request path (`/tiergate.v1.Limiter/Admit`): the method's name, or
/// [`metrics::OTHER_METHOD`] for one the service does not have.
fn method_of(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or_default();
    metrics::GRPC_METHODS.into_iter().find(|m| *m == name).unwrap_or(metrics::OTHER_METHOD)
}

/// One call being answered; counted once, as CANCELLED if dropped before its answer.
struct Call {
    method: &'static str,
    started: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        self.done = true;
        metrics::grpc_call(self.method, code, self.started.elapsed());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Code::Cancelled);
        }
    }
}

/// The time a call has left, from its `grpc-timeout` header (`<digits><H|M|S|m|u|n>`), if it set one.
pub fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A pacing wait shortened so the answer leaves before the call's deadline: the deadline less a
/// tenth of it (at least 5 ms) for the store call and the way back.
pub fn within(max_wait: Duration, deadline: Option<Duration>) -> Duration {
    match deadline {
        Some(left) => max_wait.min(left.saturating_sub((left / 10).max(Duration::from_millis(5)))),
        None => max_wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_named_by_the_last_path_segment_and_unknown_ones_fold() {
        assert_eq!(method_of("/tiergate.v1.Limiter/Admit"), "Admit");
        assert_eq!(method_of("/tiergate.v1.Limiter/GetPortfolio"), "GetPortfolio");
        assert_eq!(method_of("/tiergate.v1.Limiter/Nope"), metrics::OTHER_METHOD);
        assert_eq!(method_of(""), metrics::OTHER_METHOD);
    }

    #[test]
    fn a_pacing_wait_ends_before_the_calls_deadline() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(deadline(&metadata), None);
        metadata.insert("grpc-timeout", "200m".parse().unwrap());
        assert_eq!(deadline(&metadata), Some(Duration::from_millis(200)));
        metadata.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(deadline(&metadata), Some(Duration::from_secs(2)));
        metadata.insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(deadline(&metadata), None, "unreadable: no deadline, as gRPC would read it");
        let five = Duration::from_secs(5);
        assert_eq!(within(five, None), five);
        assert_eq!(within(five, Some(Duration::from_millis(200))), Duration::from_millis(180));
        assert_eq!(within(five, Some(Duration::from_millis(20))), Duration::from_millis(15), "at least 5 ms kept");
        assert_eq!(within(five, Some(Duration::from_millis(3))), Duration::ZERO);
        assert_eq!(within(Duration::from_millis(10), Some(five)), Duration::from_millis(10));
    }
}
