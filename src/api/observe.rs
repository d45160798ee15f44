//! Metrics of every Limiter call, `tiergate_grpc_requests_total{method,code}` and
//! `tiergate_grpc_request_duration_seconds{method}`, taken by a service wrapped around the
//! Limiter's, so that calls refused before a handler runs (a request too large, one that does not
//! decode) are counted like the others.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Code;

use crate::metrics;

/// A gRPC service whose calls are counted by method and code, and timed by method.
///
/// The code is the `grpc-status` of the response's headers, where every failure of a unary call
/// is sent, else OK; the time runs until those headers, when a unary call's answer is ready. A
/// call the client gives up on before that is counted as CANCELLED.
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
}

impl<S> Observed<S> {
    /// Wraps `inner`, exporting each Limiter method at 0 calls from now on.
    pub fn new(inner: S) -> Observed<S> {
        metrics::grpc_start();
        Observed { inner }
    }
}

impl<S: NamedService> NamedService for Observed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Observed<S>
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
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let code = tonic::Status::from_header_map(response.headers()).map_or(Code::Ok, |s| s.code());
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
}
