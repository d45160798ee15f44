//! The status page on the admin server, for people: `GET /` shows each portfolio this sidecar
//! tracks (usage against the tier, next tier, quality, numbers and their statuses, the templates
//! that block sends, what stands between it and its next upgrade) and whether the store answers;
//! `GET /portfolios/<id>` shows one.
//!
//! It is read-only (GET only; it reads what GetPortfolio reads) and bounded: it shows only the
//! portfolios of [`Limiter::tracked`], so it cannot be used to look up any id in the store, and
//! the index reads at most [`MAX_LISTED`] of them. With `server.sender_token` set it needs
//! `Authorization: Bearer <token>` with the sender or the admin token, as the read RPCs do (401
//! without one, 403 with another); a token is never taken from the query string, where it would
//! end up in access logs. [`render`] turns what was read into HTML.

pub mod render;

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::{bearer, Role, Tokens};
use crate::error::Kind;
use crate::limiter::Limiter;
use crate::server::HEALTH_PROBE_TIMEOUT;
use crate::store::{Store, StoreError};

use render::{Health, Portfolio};

/// The most portfolios `GET /` reads (the first by id); each further one is at its own page.
pub const MAX_LISTED: usize = 100;

struct StatusPage {
    limiter: Arc<Limiter>,
    store: Arc<dyn Store>,
    /// The page reads, so it needs what the read RPCs need ([`Role::Sender`]).
    tokens: Tokens,
}

/// The routes of the status page, over the limiter and the store it uses (the store only to
/// ping it).
pub fn router(
    limiter: Arc<Limiter>,
    store: Arc<dyn Store>,
    sender_token: Option<String>,
    admin_token: Option<String>,
) -> Router {
    let page = Arc::new(StatusPage { limiter, store, tokens: Tokens { sender: sender_token, admin: admin_token } });
    Router::new().route("/", get(index)).route("/portfolios/{id}", get(portfolio)).with_state(page)
}

async fn index(State(page): State<Arc<StatusPage>>, headers: HeaderMap) -> Response {
    if let Some(refused) = page.refusal(&headers) {
        return refused;
    }
    let health = page.health().await;
    let tracked = page.limiter.tracked();
    let mut portfolios = Vec::with_capacity(tracked.len().min(MAX_LISTED));
    for id in tracked.iter().take(MAX_LISTED) {
        portfolios.push(page.read(id, &health).await);
    }
    html(StatusCode::OK, render::index(SystemTime::now(), &health, &portfolios, tracked.len()))
}

async fn portfolio(State(page): State<Arc<StatusPage>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refused) = page.refusal(&headers) {
        return refused;
    }
    if page.limiter.tracked().binary_search(&id).is_err() {
        let text =
            "This sidecar does not track that portfolio: it is neither in [[portfolios]] nor among those it has \
                    served (at most metrics.max_portfolios).";
        return html(StatusCode::NOT_FOUND, render::message("Unknown portfolio", text));
    }
    let health = page.health().await;
    let shown = page.read(&id, &health).await;
    let status = match &shown {
        Portfolio::Read(_) => StatusCode::OK,
        Portfolio::Unread { .. } => StatusCode::SERVICE_UNAVAILABLE,
    };
    html(status, render::portfolio(SystemTime::now(), &health, &shown))
}

impl StatusPage {
    /// `None` (go on) when no sender token is set, or when the request carries
    /// `Authorization: Bearer <token>` with the sender or the admin token (each compared in
    /// constant time); else the answer to send, which never repeats the token given.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let given = bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
        let (kind, needed) = self.tokens.check(given, Role::Sender).err()?;
        let text = format!("This page needs the header Authorization: Bearer <{needed}>.");
        Some(match kind {
            Kind::Unauthenticated => {
                let mut answer = html(Kind::Unauthenticated.http(), render::message("Token needed", &text));
                answer
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tiergate\""));
                answer
            }
            _ => html(kind.http(), render::message("Wrong token", &text)),
        })
    }

    /// Whether the store answers now, within the health probe's bound.
    async fn health(&self) -> Health {
        let answer = match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, self.store.ping()).await {
            Ok(answer) => answer,
            Err(_) => Err(StoreError::Unavailable(format!("no answer to a ping within {HEALTH_PROBE_TIMEOUT:?}"))),
        };
        Health { backend: self.store.backend(), answer }
    }

    /// Reads a portfolio, unless the store just failed its ping: then every read would wait for
    /// the store's timeout and fail the same way.
    async fn read(&self, id: &str, health: &Health) -> Portfolio {
        if health.answer.is_err() {
            return Portfolio::Unread { id: id.to_owned(), why: "the store is not usable (see above)".into() };
        }
        match self.limiter.portfolio(id).await {
            Ok(view) => Portfolio::Read(view),
            Err(e) => Portfolio::Unread { id: id.to_owned(), why: e.to_string() },
        }
    }
}

/// An HTML answer that is never cached, framed, sniffed as something else, or allowed to run a
/// script or load anything (inline styles only).
fn html(status: StatusCode, body: String) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::CONTENT_SECURITY_POLICY, "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    (status, headers, body).into_response()
}
