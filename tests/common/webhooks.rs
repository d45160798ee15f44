//! Meta webhook deliveries for tests: the fixtures under `tests/fixtures/webhooks`, signed as Meta
//! signs them and posted to a sidecar's admin server.

use std::net::SocketAddr;

use super::server::http;

/// `X-Hub-Signature-256` of a body under a Meta app secret, as Meta computes it (the signer is
/// checked against an independently computed HMAC in `src/webhooks`'s unit tests).
pub fn sign(secret: &str, body: &[u8]) -> String {
    tiergate::webhooks::signature(secret.as_bytes(), body)
}

/// POSTs a webhook delivery signed with `secret` to the admin server: (status, body).
pub async fn post_webhook(admin: SocketAddr, secret: &str, body: &str) -> (u16, String) {
    let signature = sign(secret, body.as_bytes());
    let headers = [("Content-Type", "application/json"), ("X-Hub-Signature-256", signature.as_str())];
    http(admin, "POST", "/webhooks/whatsapp", &headers, body.as_bytes()).await
}

/// A webhook fixture from `tests/fixtures/webhooks`, with `{{NOW}}` set to the current second.
pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/webhooks/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    std::fs::read_to_string(path).unwrap().replace("{{NOW}}", &now.to_string())
}

/// A Meta `messages` delivery from `phone_number_id` of `waba` carrying one status per
/// (recipient, status), timestamped now.
pub fn statuses(waba: &str, phone_number_id: &str, statuses: &[(&str, &str)]) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().to_string();
    let statuses: Vec<_> = statuses
        .iter()
        .enumerate()
        .map(|(i, (recipient, status))| {
            serde_json::json!({"id": format!("wamid.{i}"), "status": status, "timestamp": now, "recipient_id": recipient})
        })
        .collect();
    let value = serde_json::json!({
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
        "statuses": statuses,
    });
    serde_json::json!({"object": "whatsapp_business_account",
        "entry": [{"id": waba, "changes": [{"field": "messages", "value": value}]}]})
    .to_string()
}
