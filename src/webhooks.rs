//! Meta's WhatsApp webhooks, received on the admin HTTP server at `/webhooks/whatsapp`, so that
//! tiergate follows the business's real tier, quality, template statuses and service windows.
//!
//! Every delivery is verified (HMAC-SHA256 of the raw body under the app secret) before anything
//! is read. Each entry belongs to the portfolio its WABA id is mapped to in the configuration (or
//! to a portfolio named after the WABA). All changes of one portfolio are applied in one atomic
//! store call; a 200 means every change is applied and visible to every sidecar on the store.
//! Every change is idempotent, so Meta's retries of a delivery leave the same state.

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
use crate::limiter::Limiter;
use crate::metrics;
use crate::policy::{self, Micros, Quality, ScopeMode, SenderStatus, TierValue};
use crate::store::Change;

/// The path Meta is configured to call.
pub const PATH: &str = "/webhooks/whatsapp";

/// The largest delivery accepted (Meta batches up to 1,000 changes).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// What a delivery knows of its portfolio while it is translated.
struct Known<'a> {
    state: &'a crate::store::PortfolioState,
    /// Display number → phone number id, including what this delivery taught.
    aliases: &'a mut BTreeMap<String, String>,
    /// Known sender ids, including this delivery's.
    senders: &'a mut Vec<String>,
}

struct Receiver {
    limiter: Arc<Limiter>,
    settings: WebhookSettings,
    wabas: BTreeMap<String, String>,
    /// WABAs already logged as unmapped, so each is logged once.
    unmapped: Mutex<HashSet<String>>,
}

/// The webhook routes, or none (so the path answers 404) without both secrets.
pub fn router(limiter: Arc<Limiter>, settings: Option<WebhookSettings>, wabas: BTreeMap<String, String>) -> Router {
    let Some(settings) = settings else { return Router::new() };
    let receiver = Arc::new(Receiver { limiter, settings, wabas, unmapped: Mutex::new(HashSet::new()) });
    Router::new()
        .route(PATH, get(verify).post(deliver))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(receiver)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The subscription handshake: echo `hub.challenge` when the token matches.
async fn verify(State(r): State<Arc<Receiver>>, Query(q): Query<BTreeMap<String, String>>) -> (StatusCode, String) {
    let mode = q.get("hub.mode").map(String::as_str);
    let token = q.get("hub.verify_token").map(String::as_str).unwrap_or("");
    match (mode, q.get("hub.challenge")) {
        (Some("subscribe"), Some(challenge))
            if constant_time_eq(token.as_bytes(), r.settings.verify_token.as_bytes()) =>
        {
            tracing::info!("Webhook subscription verified.");
            (StatusCode::OK, challenge.clone())
        }
        _ => {
            tracing::warn!("Webhook verification refused: wrong mode or token.");
            (StatusCode::FORBIDDEN, "verification refused\n".into())
        }
    }
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
        return (StatusCode::UNAUTHORIZED, "bad signature\n".into());
    }
    let envelope: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            metrics::webhook_delivery("malformed");
            return (StatusCode::BAD_REQUEST, format!("malformed JSON: {e}\n"));
        }
    };
    let Some(entries) = envelope.get("entry").and_then(Value::as_array) else {
        metrics::webhook_delivery("malformed");
        return (StatusCode::BAD_REQUEST, "no entry array\n".into());
    };
    match r.apply(entries).await {
        Ok(applied) => {
            metrics::webhook_delivery("applied");
            (StatusCode::OK, format!("applied {applied} changes\n"))
        }
        Err(e) => {
            metrics::webhook_delivery("store_failed");
            tracing::warn!(error = %e, "Webhook delivery not applied; Meta will retry it.");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable; retry\n".into())
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn tier_value(v: &Value) -> Option<TierValue> {
    match v {
        Value::Number(n) => n.as_i64().map(TierValue::Limit),
        Value::String(s) => match s.parse::<i64>() {
            Ok(n) => Some(TierValue::Limit(n)),
            Err(_) => Some(TierValue::Name(s.to_ascii_uppercase())),
        },
        _ => None,
    }
}

fn seconds_to_micros(v: &Value) -> Option<Micros> {
    text(v)?.parse::<u64>().ok().map(|s| s.saturating_mul(1_000_000))
}

/// The sender id webhooks about a display phone number mean: the phone number id learnt from
/// `messages` webhooks when known, else the number's digits.
fn sender_for(display: &str, aliases: &BTreeMap<String, String>) -> Option<String> {
    let digits: String = display.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return None;
    }
    Some(aliases.get(&digits).cloned().unwrap_or(digits))
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

    /// Applies every entry, one atomic store call per portfolio; returns how many changes.
    async fn apply(&self, entries: &[Value]) -> Result<usize, crate::limiter::Error> {
        // Each change with the time of its entry (when Meta says it happened).
        let mut by_portfolio: BTreeMap<String, Vec<(&Value, Option<Micros>)>> = BTreeMap::new();
        for entry in entries {
            let Some(waba) = entry.get("id").and_then(text) else {
                metrics::webhook_change("entry", "ignored");
                continue;
            };
            if policy::validate_id(&waba).is_err() {
                metrics::webhook_change("entry", "ignored");
                continue;
            }
            let portfolio = self.portfolio_of(&waba);
            let at = entry.get("time").and_then(seconds_to_micros);
            let changes = entry.get("changes").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
            by_portfolio.entry(portfolio).or_default().extend(changes.iter().map(|c| (c, at)));
        }
        let mut applied = 0;
        for (portfolio, changes) in by_portfolio {
            let state = self.limiter.state(&portfolio).await?;
            let mut aliases = state.aliases.clone();
            let mut senders: Vec<String> = state.senders.keys().chain(state.aliases.values()).cloned().collect();
            senders.sort();
            senders.dedup();
            let mut list = Vec::new();
            for (change, at) in changes {
                let field = change.get("field").and_then(Value::as_str).unwrap_or("");
                let value = change.get("value").unwrap_or(&Value::Null);
                let before = list.len();
                let mut known = Known { state: &state, aliases: &mut aliases, senders: &mut senders };
                self.translate(&portfolio, field, value, at, &mut known, &mut list);
                let outcome = if list.len() > before { "applied" } else { "ignored" };
                metrics::webhook_change(if field.is_empty() { "unknown" } else { field }, outcome);
            }
            if !list.is_empty() {
                self.limiter.apply(&portfolio, &list).await?;
                applied += list.len();
            }
        }
        Ok(applied)
    }

    /// Turns one webhook change, which happened at `at`, into store changes (none for what
    /// tiergate does not follow).
    fn translate(
        &self,
        portfolio: &str,
        field: &str,
        v: &Value,
        at: Option<Micros>,
        known: &mut Known<'_>,
        out: &mut Vec<Change>,
    ) {
        let limiter = &self.limiter;
        let per_number = limiter.scope_mode() == ScopeMode::PhoneNumber;
        // The limit that belongs to the scope: the business's in portfolio scope, the number's
        // (legacy) in per-number scope; the other one when only it is sent.
        let limit_of = |keys: [&str; 2]| {
            let keys = if per_number { [keys[1], keys[0]] } else { keys };
            keys.iter().find_map(|k| v.get(*k).and_then(tier_value)).and_then(|t| limiter.resolve_tier(&t))
        };
        match field {
            "phone_number_quality_update" => {
                let sender = v.get("display_phone_number").and_then(text).and_then(|d| sender_for(&d, known.aliases));
                if let Some(tier) = limit_of(["max_daily_conversations_per_business", "current_limit"]) {
                    match (&sender, per_number) {
                        (_, false) => out.push(Change::Tier { scope: limiter.scope_of(portfolio, ""), tier, at }),
                        (Some(s), true) => out.push(Change::Tier { scope: limiter.scope_of(portfolio, s), tier, at }),
                        (None, true) => {}
                    }
                }
                let Some(sender) = sender else { return };
                let banned = known.state.senders.get(&sender).and_then(|s| s.status) == Some(SenderStatus::Banned);
                match v.get("event").and_then(Value::as_str).unwrap_or("") {
                    "FLAGGED" if !banned => {
                        out.push(Change::SenderStatus { sender: sender.clone(), status: SenderStatus::Flagged, at });
                        out.push(Change::SenderQuality { sender, quality: Quality::Low });
                    }
                    // Out of the red; a ban is not lifted by a quality event.
                    "UNFLAGGED" if !banned => {
                        out.push(Change::SenderStatus { sender: sender.clone(), status: SenderStatus::Connected, at });
                        out.push(Change::SenderQuality { sender, quality: Quality::Medium });
                    }
                    _ => {}
                }
            }
            "business_capability_update" => {
                let Some(tier) = limit_of(["max_daily_conversations_per_business", "max_daily_conversation_per_phone"])
                else {
                    return;
                };
                if per_number {
                    for s in known.senders.iter() {
                        out.push(Change::Tier { scope: limiter.scope_of(portfolio, s), tier: tier.clone(), at });
                    }
                } else {
                    out.push(Change::Tier { scope: limiter.scope_of(portfolio, ""), tier, at });
                }
            }
            "message_template_status_update" => {
                let name = v.get("message_template_name").and_then(text);
                let event = v.get("event").and_then(Value::as_str);
                if let (Some(name), Some(event)) = (name, event) {
                    out.push(Change::TemplateStatus { name, status: event.to_ascii_uppercase(), at });
                }
            }
            "message_template_quality_update" => {
                let name = v.get("message_template_name").and_then(text);
                let quality = v.get("new_quality_score").and_then(Value::as_str).and_then(Quality::parse);
                if let (Some(name), Some(quality)) = (name, quality) {
                    out.push(Change::TemplateQuality { name, quality });
                }
            }
            "messages" => {
                let metadata = v.get("metadata");
                let Some(id) = metadata.and_then(|m| m.get("phone_number_id")).and_then(text) else { return };
                if policy::validate_id(&id).is_err() {
                    return;
                }
                if let Some(display) = metadata.and_then(|m| m.get("display_phone_number")).and_then(text) {
                    let digits: String = display.chars().filter(char::is_ascii_digit).collect();
                    if !digits.is_empty() && known.aliases.get(&digits) != Some(&id) {
                        known.aliases.insert(digits.clone(), id.clone());
                        out.push(Change::Alias { display: digits, id: id.clone() });
                    }
                }
                if !known.senders.contains(&id) {
                    known.senders.push(id.clone());
                }
                for m in v.get("messages").and_then(Value::as_array).into_iter().flatten() {
                    let from = m.get("from").and_then(text).or_else(|| m.get("from_user_id").and_then(text));
                    let at = m.get("timestamp").and_then(seconds_to_micros);
                    if let Some(from) = from {
                        // A sender we cannot parse is skipped, not logged: it may be a number.
                        if let Ok(change) = limiter.inbound_change(&id, &from, at) {
                            out.push(change);
                        }
                    }
                }
            }
            "account_alerts" => {
                let info = v.get("alert_info");
                let kind = info.and_then(|i| i.get("alert_type")).and_then(text).unwrap_or_else(|| "ALERT".into());
                let entity = v.get("entity_id").and_then(text).unwrap_or_default();
                out.push(Change::Alert { key: format!("{kind}:{entity}"), body: v.to_string() });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signatures_are_checked_against_the_raw_body() {
        let body = br#"{"entry":[]}"#;
        let good = sign(b"secret", body);
        assert!(signature_valid(b"secret", body, Some(&good)));
        assert!(!signature_valid(b"other", body, Some(&good)));
        assert!(!signature_valid(b"secret", br#"{"entry": []}"#, Some(&good)));
        assert!(!signature_valid(b"secret", body, None));
        assert!(!signature_valid(b"secret", body, Some("sha1=abc")));
        assert!(!signature_valid(b"secret", body, Some("sha256=zz")));
    }

    #[test]
    fn tiers_come_as_names_or_numbers() {
        assert_eq!(tier_value(&serde_json::json!("TIER_2K")), Some(TierValue::Name("TIER_2K".into())));
        assert_eq!(tier_value(&serde_json::json!(-1)), Some(TierValue::Limit(-1)));
        assert_eq!(tier_value(&serde_json::json!("10000")), Some(TierValue::Limit(10_000)));
        assert_eq!(tier_value(&serde_json::json!(null)), None);
    }

    #[test]
    fn display_numbers_resolve_through_learnt_aliases() {
        let mut aliases = BTreeMap::new();
        assert_eq!(sender_for("+1 555-000-1111", &aliases).as_deref(), Some("15550001111"));
        aliases.insert("15550001111".to_string(), "1069".to_string());
        assert_eq!(sender_for("15550001111", &aliases).as_deref(), Some("1069"));
        assert_eq!(sender_for("", &aliases), None);
    }
}
