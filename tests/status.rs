//! The status page on the admin port, loaded by a real browser: headless Chromium (Debian's
//! `chromium`, which `./scripts/test` installs) renders it from the real `tiergate` binary on a
//! real Redis, and the test reads the DOM Chromium built. A missing Chromium fails the test.
//!
//! `TIERGATE_UPDATE_SCREENSHOT=1 cargo test --test status` also writes the screenshot kept in
//! `docs/status-page.png`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::calls::Client;
use common::redis::RedisServer;
use common::requests::{self, UTILITY};
use common::server::{http, http_get, Sidecar, TestServer};
use tiergate::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HASH_KEY: (&str, &str) = ("TIERGATE_STORE_HASH_KEY", "test-hash-key-0123456789");

/// The longest one Chromium run may take.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs headless Chromium on `url` with `args` (`--dump-dom`, `--screenshot=…`); returns stdout.
/// Chromium's own outbound connections (updates, sync, QUIC probes) are turned off, since they
/// are refused here and would only slow it down.
fn chromium(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .current_dir(profile.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run chromium ({e}): ./scripts/test installs it (Debian: apt-get install chromium)")
        });
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within {CHROMIUM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "chromium failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The DOM Chromium built from a page of the admin server.
async fn dom(admin: SocketAddr, path: &str) -> String {
    let url = format!("http://{admin}{path}");
    tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &url)).await.unwrap()
}

/// The longest run of ASCII digits in `text`: a phone number is 7 to 15.
fn longest_digit_run(text: &str) -> usize {
    text.split(|c: char| !c.is_ascii_digit()).map(str::len).max().unwrap_or(0)
}

/// The section of one portfolio in a dumped DOM.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start =
        dom.find(&format!("<section class=\"portfolio\" id=\"p-{id}\"")).unwrap_or_else(|| panic!("{id}: {dom}"));
    let end = dom[start..].find("</section>").unwrap();
    &dom[start..start + end]
}

/// Admits `count` new recipients in `portfolio` from `sender`, numbered from `first`, in batches.
async fn admit_many(c: &mut Client, portfolio: &str, sender: &str, first: u64, count: u64) {
    let recipients: Vec<_> = (first..first + count).map(|i| format!("+1555{i:07}")).collect();
    for chunk in recipients.chunks(1_000) {
        let requests = chunk.iter().map(|r| UTILITY.to(portfolio, sender, r)).collect();
        let answers = c.admit_batch(pb::AdmitBatchRequest { requests }).await.unwrap().into_inner().responses;
        assert!(answers.iter().all(|a| a.decision() == pb::Decision::Admitted), "{answers:?}");
    }
}

fn sender(id: &str, status: pb::SenderStatus, quality: pb::Quality) -> pb::SenderUpdate {
    pb::SenderUpdate { sender_id: id.into(), status: status.into(), quality: quality.into() }
}

fn template(name: &str, language: &str, status: &str) -> pb::TemplateUpdate {
    pb::TemplateUpdate { name: name.into(), language: language.into(), status: status.into(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_the_status_page_of_a_sidecar_on_redis() {
    let mut redis = RedisServer::start();
    let config = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\n\n[[portfolios]]\nid = \"acme\"\ntier = \"TIER_2K\"\n\n\
         [[portfolios]]\nid = \"initech\"\n",
        redis.url()
    );
    let sidecar = Sidecar::spawn(&config, &[HASH_KEY]);
    let mut c = sidecar.client().await;

    // acme: 1,700 of its 2,000, a flagged number with low quality and a paused template.
    admit_many(&mut c, "acme", "1001", 0, 1_700).await;
    let update = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        senders: vec![
            sender("1001", pb::SenderStatus::Flagged, pb::Quality::Low),
            sender("1002", pb::SenderStatus::Connected, pb::Quality::High),
        ],
        templates: vec![template("spring_sale", "en_US", "PAUSED"), template("order_update", "en_US", "APPROVED")],
        ..Default::default()
    };
    c.update_portfolio(update).await.unwrap();
    // globex: not configured, at TIER_250 and full, so its number shows RESTRICTED; a disabled
    // template whose name would be markup if it were not escaped.
    c.set_tier(requests::set_tier("globex", "", "TIER_250")).await.unwrap();
    let update = pb::UpdatePortfolioRequest {
        portfolio_id: "globex".into(),
        senders: vec![sender("2001", pb::SenderStatus::Connected, pb::Quality::High)],
        templates: vec![template("<b>promo</b>", "", "DISABLED")],
        ..Default::default()
    };
    c.update_portfolio(update).await.unwrap();
    admit_many(&mut c, "globex", "2001", 10_000, 250).await;
    let full = c.admit(UTILITY.to("globex", "2001", "+15559999999")).await.unwrap().into_inner();
    assert_eq!(full.reason(), pb::Reason::LimitReached);
    // initech: configured, never used.

    let page = dom(sidecar.admin_addr, "/").await;
    assert!(page.contains("<title>tiergate status</title>"), "{page}");
    assert!(page.contains("The redis store answers and shares this sidecar's policy."), "{page}");
    assert!(page.contains("3 tracked by this sidecar"), "{page}");

    let acme = section(&page, "acme");
    assert!(acme.contains("<a href=\"/portfolios/acme\">acme</a>"), "{acme}");
    assert!(acme.contains("<meter min=\"0\" max=\"2000\""), "{acme}");
    assert!(acme.contains("value=\"1700\""), "{acme}");
    assert!(acme.contains("1,700 of 2,000</span> (85%)"), "{acme}");
    assert!(acme.contains("<td>TIER_2K</td><td>TIER_10K</td><td>LOW</td>"), "{acme}");
    assert!(acme.contains("<li>quality is LOW; HIGH is needed</li>"), "{acme}");
    assert!(acme.contains("<li>0 of 1000 unique recipients in the last 7 days</li>"), "{acme}");
    assert!(acme.contains("<th scope=\"row\">1001</th><td class=\"bad\">FLAGGED</td><td>LOW</td>"), "{acme}");
    assert!(acme.contains("<th scope=\"row\">1002</th><td class=\"ok\">CONNECTED</td><td>HIGH</td>"), "{acme}");
    assert!(acme.contains("<caption>Templates that block sends</caption>"), "{acme}");
    assert!(acme.contains("<th scope=\"row\">spring_sale</th><td>en_US</td><td class=\"bad\">PAUSED</td>"), "{acme}");
    assert!(!acme.contains("order_update"), "an approved template does not block: {acme}");

    let globex = section(&page, "globex");
    assert!(globex.contains("250 of 250</span> (100%) <span class=\"bad\">full</span>; a slot frees at "), "{globex}");
    assert!(globex.contains("<td>TIER_250</td><td>TIER_2K</td><td>HIGH</td>"), "{globex}");
    assert!(globex.contains("<li>0 of 2000 unique recipients in the last 30 days</li></ul>"), "{globex}");
    assert!(globex.contains("<th scope=\"row\">2001</th><td class=\"bad\">RESTRICTED</td>"), "{globex}");
    // The name is text in the DOM, not a <b> element.
    assert!(
        globex.contains(
            "<th scope=\"row\">&lt;b&gt;promo&lt;/b&gt;</th><td>every language</td><td class=\"bad\">DISABLED</td>"
        ),
        "{globex}"
    );
    assert!(!page.contains("<b>"), "{page}");

    let initech = section(&page, "initech");
    assert!(initech.contains("0 of 250</span> (0%)"), "{initech}");
    assert!(initech.contains("<p>No numbers known.</p>"), "{initech}");
    assert!(initech.contains("<p>No template blocks sends.</p>"), "{initech}");

    // No recipient, nor anything shaped like a phone number, is on the page.
    assert!(longest_digit_run(&page) < 7, "{page}");
    assert!(!page.contains("<script"), "{page}");

    // One portfolio at its own address; an untracked or malformed one is not found.
    let one = dom(sidecar.admin_addr, "/portfolios/globex").await;
    assert!(one.contains("<title>globex · tiergate status</title>"), "{one}");
    assert!(section(&one, "globex").contains("RESTRICTED"), "{one}");
    assert!(!one.contains("acme"), "{one}");
    let (status, body) = http_get(sidecar.admin_addr, "/portfolios/globex").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("250 of 250"), "{body}");
    for unknown in ["/portfolios/hooli", "/portfolios/%3Cscript%3Ealert(1)%3C%2Fscript%3E", "/portfolios/_other"] {
        let (status, body) = http_get(sidecar.admin_addr, unknown).await;
        assert_eq!(status, 404, "{unknown}: {body}");
        assert!(!body.contains("hooli") && !body.contains("<script"), "the id is not echoed: {body}");
    }
    // Read-only: no other method.
    let (status, _) = http(sidecar.admin_addr, "POST", "/", &[], b"").await;
    assert_eq!(status, 405);

    // A screenshot as a browser shows it: a PNG, kept in docs/ when asked to update it.
    let shots = tempfile::tempdir().unwrap();
    let png = shots.path().join("status-page.png");
    let url = format!("http://{}/", sidecar.admin_addr);
    let args = [format!("--screenshot={}", png.display()), "--window-size=1200,800".to_owned()];
    tokio::task::spawn_blocking(move || chromium(&[&args[0], &args[1]], &url)).await.unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 10_000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} bytes", bytes.len());
    if std::env::var_os("TIERGATE_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png"), &bytes).unwrap();
    }

    // With Redis gone, the page still answers, and says so instead of reading the portfolios.
    redis.kill();
    let (status, body) = http_get(sidecar.admin_addr, "/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<p id=\"store\" class=\"bad\">The redis store does not answer: "), "{body}");
    assert!(section(&body, "acme").contains("Not read: the store is not usable"), "{body}");
    let (status, body) = http_get(sidecar.admin_addr, "/portfolios/acme").await;
    assert_eq!(status, 503, "{body}");
}

/// A GET with headers, answered as the status line and headers, then the body.
async fn get_raw(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn with_a_sender_token_the_page_needs_it_or_the_admin_token() {
    let (sender_token, admin_token) = ("sender-token-0123456789", "admin-token-0123456789");
    let server = TestServer::start(&format!(
        "[server]\nsender_token = \"{sender_token}\"\nadmin_token = \"{admin_token}\"\n\n[[portfolios]]\nid = \"acme\"\n"
    ))
    .await;
    let addr = server.admin_addr;
    for path in ["/", "/portfolios/acme"] {
        let (status, head, body) = get_raw(addr, path, &[]).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        assert!(!body.contains("acme"), "{body}");
        // Never from the query string, where it would be logged.
        let (status, _, _) = get_raw(addr, &format!("{path}?token={sender_token}"), &[]).await;
        assert_eq!(status, 401, "{path}");
        let (status, _, body) = get_raw(addr, path, &[("Authorization", "Bearer not-the-token-0123456")]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(!body.contains("not-the-token"), "the token given is not echoed: {body}");
        for token in [sender_token, admin_token] {
            let (status, head, body) = get_raw(addr, path, &[("Authorization", &format!("Bearer {token}"))]).await;
            assert_eq!(status, 200, "{path}: {body}");
            assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
            assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
            assert!(body.contains("id=\"p-acme\""), "{body}");
        }
    }
    // The other admin endpoints stay open, as before.
    assert_eq!(server.get("/livez").await.0, 200);
    server.stop().await.unwrap();
}
