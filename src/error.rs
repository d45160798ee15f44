//! How the service fails, and how each failure is answered at the two edges: the gRPC API
//! ([`api`](crate::api)) and the webhook receiver ([`webhooks`](crate::webhooks)).
//!
//! [`Kind::answer`] is the one table from a failure to its gRPC code and its HTTP status, with the
//! reason beside each row. A denial is a decision, not an error, so it never appears here.

use axum::http::StatusCode;
use tonic::Code;

use crate::store::StoreError;

/// Why a limiter call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` is the request field at fault (`requests[3].recipient`).
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request names something this sidecar does not serve; `field` as for `InvalidArgument`.
    #[error("{field}: {message}")]
    NotFound { field: String, message: String },
}

/// The kinds of failure an edge answers, each with one gRPC code and one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed.
    InvalidArgument,
    /// No credentials, or credentials that cannot be read.
    Unauthenticated,
    /// Credentials that are wrong.
    PermissionDenied,
    /// The store is down or slow.
    Unavailable,
    /// The store answered something that makes no sense.
    Internal,
    /// This sidecar refuses to serve until an operator fixes its configuration.
    FailedPrecondition,
    /// The request names a portfolio this sidecar does not serve (`server.portfolios`).
    NotFound,
    /// The request is larger than `server.max_request_bytes`.
    ResourceExhausted,
}

impl Kind {
    /// The gRPC code and HTTP status of this kind: the one table both edges answer from.
    pub const fn answer(self) -> (Code, StatusCode) {
        match self {
            // The caller must fix the request; the message names the field. Sending it again
            // fails the same way, so nothing here invites a retry.
            Kind::InvalidArgument => (Code::InvalidArgument, StatusCode::BAD_REQUEST),
            // No API token, or no (or an unreadable) Meta signature.
            Kind::Unauthenticated => (Code::Unauthenticated, StatusCode::UNAUTHORIZED),
            // A wrong API token (or one of the wrong role) or webhook verify token.
            Kind::PermissionDenied => (Code::PermissionDenied, StatusCode::FORBIDDEN),
            // Redis is down or slow, and nothing went out unchecked: the same call can succeed
            // later, so clients retry, and Meta redelivers a webhook it got a 503 for.
            Kind::Unavailable => (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            // A store answer that makes no sense (a bug, a mismatched deployment, a key of the
            // wrong type): retrying cannot fix it, so neither answer says "come back later".
            Kind::Internal => (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
            // The sidecar's configuration differs from the policy shared through the store: no
            // retry to this sidecar helps until an operator acts, but another sidecar (or Meta's
            // redelivery, for a webhook) may succeed, so HTTP says "unavailable".
            Kind::FailedPrecondition => (Code::FailedPrecondition, StatusCode::SERVICE_UNAVAILABLE),
            // `server.portfolios = "configured"` and the portfolio is neither configured nor
            // known to the store: the same call fails until an operator adds it.
            Kind::NotFound => (Code::NotFound, StatusCode::NOT_FOUND),
            // A request over `server.max_request_bytes`, refused before it is read: gRPC's code
            // for a message too large (tonic's own answer, OUT_OF_RANGE, is rewritten to it).
            Kind::ResourceExhausted => (Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE),
        }
    }

    /// The gRPC code of this kind.
    pub const fn grpc(self) -> Code {
        self.answer().0
    }

    /// The HTTP status of this kind.
    pub const fn http(self) -> StatusCode {
        self.answer().1
    }
}

impl Error {
    /// The kind of this failure, which decides how the edges answer it.
    pub fn kind(&self) -> Kind {
        match self {
            Error::InvalidArgument { .. } => Kind::InvalidArgument,
            Error::Store(StoreError::Unavailable(_)) => Kind::Unavailable,
            Error::Store(StoreError::Internal(_)) => Kind::Internal,
            Error::Store(StoreError::Refused(_)) => Kind::FailedPrecondition,
            Error::NotFound { .. } => Kind::NotFound,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let kind = e.kind();
        let message = match e {
            // Names the field; the message never repeats a recipient.
            Error::InvalidArgument { .. } => e.to_string(),
            Error::Store(StoreError::Unavailable(m)) => m,
            Error::Store(StoreError::Internal(m)) => {
                tracing::error!(error = %m, "Store call failed.");
                m
            }
            Error::Store(StoreError::Refused(m)) => m,
            Error::NotFound { .. } => e.to_string(),
        };
        tonic::Status::new(kind.grpc(), message)
    }
}

/// How much of an input an error message quotes, in bytes (escaped).
const QUOTED: usize = 32;

/// An input as an error message may quote it: escaped and in quotes like `{:?}`, but only its
/// first 32 or so bytes, then `…(N bytes)`, so a hostile megabyte is never echoed (clients drop
/// a status whose message is too large for their metadata limit).
pub fn quote(input: &str) -> String {
    let mut out = String::from("\"");
    for c in input.chars() {
        let escaped: String = c.escape_debug().collect();
        if out.len() + escaped.len() > QUOTED + 1 {
            return format!("{out}\"…({} bytes)", input.len());
        }
        out.push_str(&escaped);
    }
    out.push('"');
    out
}

/// Compares a secret in constant time, so the time taken does not reveal how much of it was
/// guessed. `None` (nothing given) is [`Kind::Unauthenticated`], a mismatch
/// [`Kind::PermissionDenied`].
pub fn check_secret(given: Option<&str>, expected: &str) -> Result<(), Kind> {
    let given = given.ok_or(Kind::Unauthenticated)?.as_bytes();
    let expected = expected.as_bytes();
    let same = given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same {
        Ok(())
    } else {
        Err(Kind::PermissionDenied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_store_failure_has_one_answer_on_each_edge() {
        let unavailable = Error::Store(StoreError::Unavailable("timed out".into()));
        assert_eq!(unavailable.kind().answer(), (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE));
        let internal = Error::Store(StoreError::Internal("WRONGTYPE".into()));
        assert_eq!(internal.kind().answer(), (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR));
        let invalid = Error::InvalidArgument { field: "recipient".into(), message: "must not be empty".into() };
        assert_eq!(invalid.kind().answer(), (Code::InvalidArgument, StatusCode::BAD_REQUEST));
        assert_eq!(tonic::Status::from(invalid).message(), "recipient: must not be empty");
    }

    #[test]
    fn quotes_are_short_whatever_the_input() {
        assert_eq!(quote("TIER_2K"), "\"TIER_2K\"");
        assert_eq!(quote("a\"b\n"), "\"a\\\"b\\n\"");
        assert_eq!(quote(&"x".repeat(32)), format!("\"{}\"", "x".repeat(32)));
        assert_eq!(quote(&"x".repeat(1 << 20)), format!("\"{}\"…(1048576 bytes)", "x".repeat(32)));
        // Escapes and multi-byte characters count as what they print.
        assert!(quote(&"\u{1}".repeat(1000)).len() < 64, "{}", quote(&"\u{1}".repeat(1000)));
        assert!(quote(&"é".repeat(1000)).starts_with("\"éé"));
    }

    #[test]
    fn unknown_portfolios_and_oversized_requests_have_their_rows() {
        let missing = Error::NotFound { field: "portfolio_id".into(), message: "is not served".into() };
        assert_eq!(missing.kind().answer(), (Code::NotFound, StatusCode::NOT_FOUND));
        assert_eq!(tonic::Status::from(missing).message(), "portfolio_id: is not served");
        assert_eq!(Kind::ResourceExhausted.answer(), (Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE));
    }

    #[test]
    fn secrets_are_missing_wrong_or_right() {
        assert_eq!(check_secret(None, "s3cret"), Err(Kind::Unauthenticated));
        assert_eq!(check_secret(Some("s3cre"), "s3cret"), Err(Kind::PermissionDenied));
        assert_eq!(check_secret(Some("s3creT"), "s3cret"), Err(Kind::PermissionDenied));
        assert_eq!(check_secret(Some("s3cret"), "s3cret"), Ok(()));
    }
}
