//! Meta's WhatsApp webhooks, received on the admin HTTP server at `/webhooks/whatsapp`, so that
//! tiergate follows the business's real tier, quality, template statuses and service windows, and
//! Meta's verdicts on the messages sent (the error codes of failed ones).
//!
//! This edge only verifies, parses and hands over: every delivery is verified (HMAC-SHA256 of
//! the raw body under the app secret) before anything is read; [`parse`] turns Meta's payload
//! into typed [`Event`](crate::limiter::Event)s; each entry belongs to the portfolio its WABA id
//! is mapped to in the configuration (or to a portfolio named after the WABA); and the limiter
//! applies each portfolio's events in one atomic store call. A 200 means every change is applied
//! and visible to every sidecar on the store. Every change is idempotent, so Meta's retries of a
//! delivery leave the same state, but one: the throughput slot an inbound message takes is taken
//! again by a retry of a delivery that was applied (its 200 lost), which only spaces that
//! number's next messages a little further. Failures are answered from the table in
//! [`error`]: 503 when the store is down (Meta retries), 500 when a retry cannot
//! help.

pub mod parse;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::config::WebhookSettings;
use crate::error::{self, Error, Kind};
use crate::limiter::{Limiter, Reported};
use crate::metrics;

/// The path Meta is configured to call.
pub const PATH: &str = "/webhooks/whatsapp";

struct Receiver {
    limiter: Arc<Limiter>,
    settings: WebhookSettings,
    wabas: BTreeMap<String, String>,
    /// WABAs already logged as unmapped, so each is logged once.
    unmapped: Mutex<HashSet<String>>,
}

/// The webhook routes, or none (so the path answers 404) without both secrets; either way
/// exported as `tiergate_webhooks_configured`, with the deliveries at 0. A body over
/// `max_body` bytes (`server.max_request_bytes`) is refused with 413 before it is read.
pub fn router(
    limiter: Arc<Limiter>,
    settings: Option<WebhookSettings>,
    wabas: BTreeMap<String, String>,
    max_body: usize,
) -> Router {
    metrics::webhooks_configured(settings.is_some());
    let Some(settings) = settings else { return Router::new() };
    let receiver = Arc::new(Receiver { limiter, settings, wabas, unmapped: Mutex::new(HashSet::new()) });
    Router::new()
        .route(PATH, get(verify).post(deliver))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(receiver)
}

/// The subscription handshake: echo `hub.challenge` when the token matches.
async fn verify(State(r): State<Arc<Receiver>>, Query(q): Query<BTreeMap<String, String>>) -> (StatusCode, String) {
    let mode = q.get("hub.mode").map(String::as_str);
    // A missing token is a wrong one here: Meta always sends it, so only a guess omits it.
    let token = q.get("hub.verify_token").map(String::as_str).unwrap_or("");
    let checked = error::check_secret(Some(token), &r.settings.verify_token);
    match (mode, q.get("hub.challenge"), checked) {
        (Some("subscribe"), Some(challenge), Ok(())) => {
            tracing::info!("Webhook subscription verified.");
            (StatusCode::OK, challenge.clone())
        }
        _ => {
            tracing::warn!("Webhook verification refused: wrong mode or token.");
            (Kind::PermissionDenied.http(), "verification refused\n".into())
        }
    }
}

/// The `X-Hub-Signature-256` value Meta sends with `body` under an app secret: `sha256=` and the
/// hex HMAC-SHA256 of the raw body.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks `X-Hub-Signature-256: sha256=<hex>` against the raw body, in constant time.
pub fn signature_valid(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.strip_prefix("sha256=")) else { return false };
    let Ok(sig) = hex::decode(hex_sig.trim()) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

async fn deliver(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok());
    if !signature_valid(r.settings.app_secret.as_bytes(), &body, signature) {
        metrics::webhook_delivery("unauthorized");
        tracing::warn!("Webhook delivery refused: missing or wrong X-Hub-Signature-256.");
        return (Kind::Unauthenticated.http(), "bad signature\n".into());
    }
    // Only a signed delivery is Meta's: what the "no webhook for hours" alert waits for.
    metrics::webhook_received();
    let envelope: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            metrics::webhook_delivery("malformed");
            return (Kind::InvalidArgument.http(), format!("malformed JSON: {e}\n"));
        }
    };
    let Some(entries) = envelope.get("entry").and_then(Value::as_array) else {
        metrics::webhook_delivery("malformed");
        return (Kind::InvalidArgument.http(), "no entry array\n".into());
    };
    match r.apply(entries).await {
        Ok(applied) => {
            metrics::webhook_delivery("applied");
            (StatusCode::OK, format!("applied {applied} changes\n"))
        }
        Err(e) => {
            metrics::webhook_delivery("store_failed");
            let kind = e.kind();
            if kind == Kind::Unavailable {
                tracing::warn!(error = %e, "Webhook delivery not applied; Meta will retry it.");
                (kind.http(), "store unavailable; retry\n".into())
            } else {
                tracing::error!(error = %e, "Webhook delivery not applied, and retrying it cannot help.");
                (kind.http(), "delivery not applied\n".into())
            }
        }
    }
}

impl Receiver {
    fn portfolio_of(&self, waba: &str) -> String {
        if let Some(p) = self.wabas.get(waba) {
            return p.clone();
        }
        let mut logged = self.unmapped.lock().unwrap_or_else(|e| e.into_inner());
        if logged.insert(waba.to_owned()) {
            tracing::info!(
                waba,
                "Webhook for a WABA not in [[portfolios]] wabas; applying it to the portfolio named after it."
            );
        }
        waba.to_owned()
    }

    /// Hands every entry's events to the limiter, one atomic store call per portfolio; returns
    /// how many store changes they made.
    async fn apply(&self, entries: &[Value]) -> Result<usize, Error> {
        // Each portfolio's events in delivery order, with the field each came from.
        let mut by_portfolio: BTreeMap<String, (Vec<&str>, Vec<Reported>)> = BTreeMap::new();
        let mut ignored: Vec<&str> = Vec::new();
        for entry in entries {
            let Some(entry) = parse::entry(entry) else {
                metrics::webhook_change("entry", "ignored");
                continue;
            };
            let (fields, events) = by_portfolio.entry(self.portfolio_of(&entry.waba)).or_default();
            for (field, event) in entry.changes {
                match event {
                    Some(event) => {
                        fields.push(field);
                        events.push(Reported { at: entry.at, event });
                    }
                    None => ignored.push(field),
                }
            }
        }
        for field in ignored {
            metrics::webhook_change(field_label(field), "ignored");
        }
        let mut applied = 0;
        for (portfolio, (fields, events)) in by_portfolio {
            let made = self.limiter.apply_events(&portfolio, &events).await?;
            for (field, n) in fields.into_iter().zip(&made) {
                metrics::webhook_change(field_label(field), if *n > 0 { "applied" } else { "ignored" });
            }
            applied += made.iter().sum::<usize>();
        }
        Ok(applied)
    }
}

/// The `field` label of a change: a field tiergate follows, or `other`, so a signed delivery
/// cannot add label values without bound.
fn field_label(field: &str) -> &'static str {
    parse::FIELDS.into_iter().find(|f| *f == field).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_fields_outside_those_followed_share_one_label() {
        assert_eq!(field_label("messages"), "messages");
        assert_eq!(field_label("account_alerts"), "account_alerts");
        assert_eq!(field_label("security"), "other");
        assert_eq!(field_label(""), "other");
        assert_eq!(field_label(&"x".repeat(10_000)), "other");
    }

    #[test]
    fn signatures_are_checked_against_the_raw_body() {
        let body = br#"{"entry":[]}"#;
        let good = signature(b"secret", body);
        // HMAC-SHA256("secret", body), computed independently.
        assert_eq!(good, "sha256=97f0eaf4fb539301c758929abea22432a8fed44f5ce20d65c6af41ff15dfb115");
        assert!(signature_valid(b"secret", body, Some(&good)));
        assert!(!signature_valid(b"other", body, Some(&good)));
        assert!(!signature_valid(b"secret", br#"{"entry": []}"#, Some(&good)));
        assert!(!signature_valid(b"secret", body, None));
        assert!(!signature_valid(b"secret", body, Some("sha1=abc")));
        assert!(!signature_valid(b"secret", body, Some("sha256=zz")));
    }
}
