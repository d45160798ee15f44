//! Meta webhook deliveries for tests: the fixtures under `tests/fixtures/webhooks`, signed as Meta
//! signs them and posted to a sidecar's admin server.

use std::net::SocketAddr;

use super::server::http;

/// `X-Hub-Signature-256` of a body under a Meta app secret: `sha256=` and the hex HMAC-SHA256.
pub fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
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
