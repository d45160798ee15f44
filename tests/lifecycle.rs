//! The WhatsApp lifecycle end to end on a real Redis: opt-outs, templates, senders, free-form
//! messages, the marketing reserve, upgrade projections and simulation through gRPC, and Meta's
//! webhooks through the admin server, signed as Meta signs them.

mod common;

use std::net::SocketAddr;

use common::calls::{inbound, portfolio, reason, usage, Client};
use common::redis::RedisServer;
use common::requests::{AUTHENTICATION, MARKETING, SERVICE, UTILITY};
use common::server::{http, http_get, TestServer};
use common::webhooks::{fixture, post_webhook, statuses};
use tiergate::pb::{self, Decision, Reason};
use tonic::Code;

const SECRET: &str = "meta-app-secret-for-tests";
const TOKEN: &str = "verify-me";
const WABA: &str = "102290129340398";
const PHONE_ID: &str = "106540352242922";
const USER: &str = "16505551234";

struct Setup {
    server: TestServer,
    c: Client,
    _redis: RedisServer,
}

async fn setup(policy: &str) -> Setup {
    let redis = RedisServer::start();
    let config = format!(
        r#"
[store]
backend = "redis"
url = "{}"
hash_key = "lifecycle-test-hash-key"

[policy]
{policy}

[[portfolios]]
id = "acme"
wabas = ["{WABA}"]
blocked_senders = ["blocked-number"]

[webhooks]
app_secret = "{SECRET}"
verify_token = "{TOKEN}"
"#,
        redis.url()
    );
    let server = TestServer::start(&config).await;
    let c = server.client().await;
    Setup { server, c, _redis: redis }
}

async fn deliver(admin: SocketAddr, body: &str) {
    let (status, text) = post_webhook(admin, SECRET, body).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_out_users_get_only_replies_and_no_marketing_on_any_number() {
    let Setup { mut c, _redis, server } = setup("").await;
    let opt =
        |out| pb::SetOptOutRequest { portfolio_id: "acme".into(), recipient: "+1 650 555 1234".into(), opted_out: out };
    assert!(c.set_opt_out(opt(true)).await.unwrap().into_inner().opted_out);
    assert_eq!(reason(&mut c, UTILITY.to("acme", "n1", USER)).await, Reason::OptedOut);
    inbound(&mut c, "acme", "n1", USER).await;
    assert_eq!(reason(&mut c, SERVICE.to("acme", "n1", USER)).await, Reason::ServiceWindow);
    assert_eq!(reason(&mut c, UTILITY.to("acme", "n1", USER)).await, Reason::ServiceWindow);
    assert_eq!(reason(&mut c, MARKETING.to("acme", "n1", USER)).await, Reason::OptedOut);
    assert_eq!(reason(&mut c, UTILITY.to("acme", "n2", USER)).await, Reason::OptedOut, "every number of the business");
    assert_eq!(portfolio(&mut c, "acme").await.opted_out_recipients, 1);
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains("tiergate_denials_total{portfolio=\"acme\",reason=\"OPTED_OUT\"}"), "{metrics}");
    c.set_opt_out(opt(false)).await.unwrap();
    assert_eq!(reason(&mut c, MARKETING.to("acme", "n2", USER)).await, Reason::NewRecipient);
    let e = c
        .set_opt_out(pb::SetOptOutRequest { portfolio_id: "acme".into(), recipient: "nope".into(), opted_out: true })
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("recipient"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_banned_or_configured_blocked_are_denied_and_free_form_needs_a_window() {
    let Setup { mut c, _redis, server: _server } = setup("").await;
    let ban = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        senders: vec![pb::SenderUpdate { sender_id: "n1".into(), status: pb::SenderStatus::Banned.into(), quality: 0 }],
        ..Default::default()
    };
    let p = c.update_portfolio(ban).await.unwrap().into_inner();
    assert_eq!(p.senders[0].status(), pb::SenderStatus::Banned);
    let denied = c.admit(UTILITY.to("acme", "n1", USER)).await.unwrap().into_inner();
    assert_eq!((denied.decision(), denied.reason()), (Decision::Denied, Reason::SenderBlocked));
    assert_eq!(reason(&mut c, UTILITY.to("acme", "blocked-number", USER)).await, Reason::SenderBlocked);
    assert_eq!(reason(&mut c, SERVICE.to("acme", "n2", USER)).await, Reason::OutsideServiceWindow);
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 0, "denials take no slot");
    let restricted = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        senders: vec![pb::SenderUpdate {
            sender_id: "n1".into(),
            status: pb::SenderStatus::Restricted.into(),
            quality: 0,
        }],
        ..Default::default()
    };
    let e = c.update_portfolio(restricted).await.unwrap_err();
    assert!(e.message().starts_with("senders[0].status"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_is_held_back_by_the_reserve_while_otps_use_the_rest() {
    let Setup { mut c, _redis, server: _server } =
        setup("default_tier = \"TIER_250\"\n[policy.reserve]\nmarketing = 0.1").await;
    let batch: Vec<_> = (0..226).map(|i| MARKETING.to("acme", "n1", &format!("+1555{i:07}"))).collect();
    let got = c.admit_batch(pb::AdmitBatchRequest { requests: batch }).await.unwrap().into_inner().responses;
    assert_eq!(got.iter().filter(|r| r.reason() == Reason::NewRecipient).count(), 225);
    assert_eq!(got[225].reason(), Reason::HeadroomReserved);
    assert!(got[225].retry_after.is_some());
    let otps: Vec<_> = (0..26).map(|i| AUTHENTICATION.to("acme", "n1", &format!("+1666{i:07}"))).collect();
    let got = c.admit_batch(pb::AdmitBatchRequest { requests: otps }).await.unwrap().into_inner().responses;
    assert_eq!(got.iter().filter(|r| r.reason() == Reason::NewRecipient).count(), 25);
    assert_eq!(got[25].reason(), Reason::LimitReached);
    let u = usage(&mut c, "acme", "").await;
    assert_eq!((u.unique_recipients, u.status()), (250, pb::SenderStatus::Restricted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_projects_the_next_upgrade_and_says_what_blocks_it() {
    let Setup { mut c, _redis, server } = setup("").await;
    let recipients: Vec<String> = (0..41).map(|i| format!("1555{i:07}")).collect();
    let batch: Vec<_> = recipients.iter().map(|r| UTILITY.to("acme", "n1", r)).collect();
    c.admit_batch(pb::AdmitBatchRequest { requests: batch }).await.unwrap();
    // Only delivered recipients count toward an upgrade: 40 delivered, one still only sent.
    let mut reported: Vec<(&str, &str)> = recipients[..40].iter().map(|r| (r.as_str(), "delivered")).collect();
    reported.push((recipients[40].as_str(), "sent"));
    deliver(server.admin_addr, &statuses(WABA, "n1", &reported)).await;
    let u = usage(&mut c, "acme", "").await;
    assert_eq!((u.unique_recipients_7d, u.unique_recipients_30d), (40, 40));
    let up = u.upgrade.clone().unwrap();
    assert_eq!((up.next_tier.as_str(), up.eligible, up.period_days), ("TIER_2K", false, 30));
    assert_eq!((up.unique_recipients, up.threshold), (40, 2_000));
    assert_eq!(up.blockers, ["40 of 2000 unique recipients in the last 30 days", "quality is UNKNOWN; HIGH is needed"]);
    assert_eq!(u.quality(), pb::Quality::Unknown);
    // Meta asks for high quality across numbers and templates: one medium template is enough
    // to stand in the way.
    let ratings = |template| pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        quality: pb::Quality::High.into(),
        senders: vec![pb::SenderUpdate { sender_id: "n1".into(), status: 0, quality: pb::Quality::High.into() }],
        templates: vec![pb::TemplateUpdate { name: "spring_sale".into(), quality: template, ..Default::default() }],
        tier: String::new(),
        mode: 0,
    };
    c.update_portfolio(ratings(pb::Quality::High.into())).await.unwrap();
    assert_eq!(usage(&mut c, "acme", "").await.quality(), pb::Quality::High);
    c.update_portfolio(ratings(pb::Quality::Medium.into())).await.unwrap();
    let u = usage(&mut c, "acme", "").await;
    assert_eq!(u.quality(), pb::Quality::Medium);
    assert!(u.upgrade.unwrap().blockers.contains(&"quality is MEDIUM; HIGH is needed".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulation_moves_a_scope_up_when_the_rule_is_met() {
    let policy =
        "ladder = [{ name = \"T2\", limit = 2 }, { name = \"T4\", limit = 4 }, { name = \"T8\", limit = 8 }]\n\
                  window = \"1s\"\ntier_source = \"simulate\"";
    let Setup { mut c, _redis, server } = setup(policy).await;
    let high = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        quality: pb::Quality::High.into(),
        ..Default::default()
    };
    c.update_portfolio(high).await.unwrap();
    for round in 0..2 {
        let recipients: Vec<String> = (0..2).map(|i| format!("1555000{round}{i}00")).collect();
        for r in &recipients {
            assert_eq!(reason(&mut c, UTILITY.to("acme", "n1", r)).await, Reason::NewRecipient);
        }
        let delivered: Vec<(&str, &str)> = recipients.iter().map(|r| (r.as_str(), "delivered")).collect();
        deliver(server.admin_addr, &statuses(WABA, "n1", &delivered)).await;
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    // Four unique recipients in 30 days at the first tier: the next tier's limit, quality high.
    let u = usage(&mut c, "acme", "").await;
    assert_eq!((u.tier.as_str(), u.limit), ("T4", 4), "{u:?}");
    let up = u.upgrade.unwrap();
    assert_eq!((up.next_tier.as_str(), up.eligible, up.period_days), ("T8", true, 7));
    assert_eq!(up.applies_after.unwrap().seconds, 6 * 3600, "the next step waits 6 hours");
    assert_eq!(usage(&mut c, "acme", "").await.tier, "T4", "no second upgrade before the delay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_verification_answers_the_challenge_only_with_the_token() {
    let Setup { server, _redis, .. } = setup("").await;
    let ok = format!("/webhooks/whatsapp?hub.mode=subscribe&hub.verify_token={TOKEN}&hub.challenge=1158201444");
    assert_eq!(http_get(server.admin_addr, &ok).await, (200, "1158201444".into()));
    let bad = "/webhooks/whatsapp?hub.mode=subscribe&hub.verify_token=guess&hub.challenge=1158201444";
    assert_eq!(http_get(server.admin_addr, bad).await.0, 403);
    let no_mode = format!("/webhooks/whatsapp?hub.verify_token={TOKEN}&hub.challenge=1");
    assert_eq!(http_get(server.admin_addr, &no_mode).await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_wrongly_signed_or_malformed_deliveries_apply_nothing() {
    let Setup { server, mut c, _redis } = setup("").await;
    let body = fixture("business_capability_update");
    let json = [("Content-Type", "application/json")];
    assert_eq!(http(server.admin_addr, "POST", "/webhooks/whatsapp", &json, body.as_bytes()).await.0, 401);
    assert_eq!(post_webhook(server.admin_addr, "not-the-secret", &body).await.0, 401);
    assert_eq!(usage(&mut c, "acme", "").await.tier, "TIER_250", "nothing applied");
    assert_eq!(post_webhook(server.admin_addr, SECRET, "{\"entry\": [").await.0, 400);
    assert_eq!(post_webhook(server.admin_addr, SECRET, "{\"object\": \"x\"}").await.0, 400);
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains("tiergate_webhook_deliveries_total{outcome=\"unauthorized\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_set_tier_quality_templates_windows_and_alerts() {
    let Setup { server, mut c, _redis } = setup("").await;
    let admin = server.admin_addr;

    deliver(admin, &fixture("business_capability_update")).await;
    let u = usage(&mut c, "acme", "").await;
    assert_eq!((u.tier.as_str(), u.limit), ("TIER_2K", 2_000));

    // An inbound message opens the (phone number id, user) window at its timestamp.
    deliver(admin, &fixture("messages")).await;
    assert_eq!(reason(&mut c, SERVICE.to("acme", PHONE_ID, USER)).await, Reason::ServiceWindow);
    assert_eq!(reason(&mut c, SERVICE.to("acme", "another-number", USER)).await, Reason::OutsideServiceWindow);

    deliver(admin, &fixture("phone_number_quality_update")).await;
    let p = portfolio(&mut c, "acme").await;
    let sender = p.senders.iter().find(|s| s.sender_id == PHONE_ID).expect("the number is known by its id");
    assert_eq!((sender.status(), sender.quality()), (pb::SenderStatus::Flagged, pb::Quality::Low));
    assert_eq!(sender.display_phone_number, "15550783881");
    assert_eq!(p.usage[0].tier, "TIER_10K");

    let paused = fixture("message_template_status_update").replace("{{EVENT}}", "PAUSED");
    deliver(admin, &paused).await;
    assert_eq!(
        reason(&mut c, MARKETING.template("spring_sale").to("acme", PHONE_ID, "+15550000001")).await,
        Reason::TemplateBlocked
    );
    assert_eq!(
        reason(&mut c, MARKETING.template("welcome").to("acme", PHONE_ID, "+15550000001")).await,
        Reason::NewRecipient
    );
    deliver(admin, &fixture("message_template_quality_update")).await;
    let p = portfolio(&mut c, "acme").await;
    let t = &p.templates[0];
    assert_eq!(
        (t.name.as_str(), t.status.as_str(), t.active, t.quality()),
        ("spring_sale", "PAUSED", false, pb::Quality::Medium)
    );
    deliver(admin, &fixture("message_template_status_update").replace("{{EVENT}}", "APPROVED")).await;
    assert_eq!(
        reason(&mut c, MARKETING.template("spring_sale").to("acme", PHONE_ID, "+15550000002")).await,
        Reason::NewRecipient
    );

    deliver(admin, &fixture("account_alerts")).await;
    let p = portfolio(&mut c, "acme").await;
    assert_eq!(p.alerts.len(), 1);
    assert!(p.alerts[0].key.starts_with("INCREASED_CAPABILITIES_ELIGIBILITY_DEFERRED"));
    assert!(p.alerts[0].body.contains("not yet eligible"));

    // Unknown fields and change types are ignored and counted under `other` (a label the
    // payload cannot grow), never an error.
    deliver(admin, &fixture("unknown_field")).await;
    assert_eq!(usage(&mut c, "acme", "").await.tier, "TIER_10K");
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains("tiergate_webhook_changes_total{field=\"other\",outcome=\"ignored\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_applied_twice_leaves_the_same_state() {
    let Setup { server, mut c, _redis } = setup("").await;
    // Recipients the statuses below speak of, so a second `failed` would show in the usage.
    for u in ["16505551001", "16505551002", "16505551003", "16505551004"] {
        assert_eq!(reason(&mut c, UTILITY.to("acme", PHONE_ID, u)).await, Reason::NewRecipient);
    }
    let all = [
        fixture("messages"),
        fixture("phone_number_quality_update"),
        fixture("message_template_status_update").replace("{{EVENT}}", "DISABLED"),
        fixture("account_alerts"),
        fixture("messages_statuses"),
    ];
    for body in &all {
        deliver(server.admin_addr, body).await;
    }
    let once = portfolio(&mut c, "acme").await;
    for body in &all {
        deliver(server.admin_addr, body).await;
    }
    assert_eq!(portfolio(&mut c, "acme").await, once);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_capability_updates_carry_the_limit_too() {
    let Setup { server, mut c, _redis } = setup("").await;
    deliver(server.admin_addr, &fixture("business_capability_update_legacy")).await;
    let u = usage(&mut c, "acme", "").await;
    assert_eq!((u.tier.as_str(), u.limit), ("TIER_10K", 10_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_answers_5xx_and_loses_nothing_on_retry() {
    let Setup { server, mut c, _redis: mut redis } = setup("").await;
    redis.kill();
    let body = fixture("business_capability_update");
    let (status, _) = post_webhook(server.admin_addr, SECRET, &body).await;
    assert_eq!(status, 503, "Meta retries on 5xx");
    redis.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while post_webhook(server.admin_addr, SECRET, &body).await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "the retry was never applied");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(usage(&mut c, "acme", "").await.tier, "TIER_2K");
}

#[tokio::test]
async fn without_secrets_the_webhook_endpoint_is_not_there() {
    let server = TestServer::start("").await;
    assert_eq!(http_get(server.admin_addr, "/webhooks/whatsapp?hub.mode=subscribe").await.0, 404);
    let (status, _) = post_webhook(server.admin_addr, SECRET, "{}").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_ladders_project_with_the_ratio_and_the_48_hour_minimum() {
    let Setup { mut c, _redis, server } = setup("ladder = \"legacy\"\nlegacy_threshold = 0.5").await;
    let set = pb::SetTierRequest { portfolio_id: "acme".into(), sender_id: String::new(), tier: "TIER_1K".into() };
    let u = c.set_tier(set).await.unwrap().into_inner();
    let up = u.upgrade.unwrap();
    assert_eq!((up.next_tier.as_str(), up.period_days, up.threshold), ("TIER_10K", 7, 500));
    assert_eq!(up.applies_after.unwrap().seconds, 24 * 3600);
    assert!(up.blockers.iter().any(|b| b.contains("48 hours minimum")), "{:?}", up.blockers);
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains("tiergate_upgrade_threshold{portfolio=\"acme\",sender=\"\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmapped_waba_is_its_own_portfolio() {
    let Setup { server, mut c, _redis } = setup("").await;
    let body = fixture("business_capability_update").replace(WABA, "777000111");
    deliver(server.admin_addr, &body).await;
    let r = pb::GetUsageRequest { portfolio_id: "777000111".into(), sender_id: String::new() };
    assert_eq!(c.get_usage(r).await.unwrap().into_inner().tier, "TIER_2K");
    assert_eq!(usage(&mut c, "acme", "").await.tier, "TIER_250", "the mapped portfolio is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_retry_of_an_older_event_does_not_undo_a_newer_one() {
    let Setup { server, mut c, _redis } = setup("").await;
    let status = |event: &str, time: u64| {
        fixture("message_template_status_update")
            .replace("{{EVENT}}", event)
            .replace("\"time\": 1763700000", &format!("\"time\": {time}"))
    };
    deliver(server.admin_addr, &status("PAUSED", 1_763_700_000)).await;
    deliver(server.admin_addr, &status("REINSTATED", 1_763_700_600)).await;
    // Meta retries the PAUSED delivery after the REINSTATED one was applied.
    deliver(server.admin_addr, &status("PAUSED", 1_763_700_000)).await;
    assert_eq!(
        reason(&mut c, MARKETING.template("spring_sale").to("acme", PHONE_ID, "+15550000001")).await,
        Reason::NewRecipient
    );
    let capability = |tier: &str, time: u64| {
        fixture("business_capability_update")
            .replace("TIER_2K", tier)
            .replace("\"time\": 1763700000", &format!("\"time\": {time}"))
    };
    deliver(server.admin_addr, &capability("TIER_10K", 1_763_700_600)).await;
    deliver(server.admin_addr, &capability("TIER_2K", 1_763_700_000)).await;
    assert_eq!(usage(&mut c, "acme", "").await.tier, "TIER_10K");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quality_event_does_not_lift_a_ban() {
    let Setup { server, mut c, _redis } = setup("").await;
    deliver(server.admin_addr, &fixture("messages")).await;
    let ban = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        senders: vec![pb::SenderUpdate {
            sender_id: PHONE_ID.into(),
            status: pb::SenderStatus::Banned.into(),
            quality: 0,
        }],
        ..Default::default()
    };
    c.update_portfolio(ban).await.unwrap();
    let unflagged = fixture("phone_number_quality_update")
        .replace("\"FLAGGED\"", "\"UNFLAGGED\"")
        .replace("\"time\": 1763700000", &format!("\"time\": {}", 4_000_000_000u64));
    deliver(server.admin_addr, &unflagged).await;
    let p = portfolio(&mut c, "acme").await;
    let sender = p.senders.iter().find(|s| s.sender_id == PHONE_ID).unwrap();
    assert_eq!(sender.status(), pb::SenderStatus::Banned);
    assert_eq!(reason(&mut c, UTILITY.to("acme", PHONE_ID, USER)).await, Reason::SenderBlocked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throughput_upgrade_records_throughput_and_leaves_the_tier() {
    let Setup { server, mut c, _redis } = setup("").await;
    deliver(server.admin_addr, &fixture("messages")).await;
    deliver(server.admin_addr, &fixture("business_capability_update")).await;
    // THROUGHPUT_UPGRADE's current_limit is the number's throughput level, not a messaging limit.
    deliver(server.admin_addr, &fixture("phone_number_quality_update_throughput")).await;
    let p = portfolio(&mut c, "acme").await;
    assert_eq!((p.usage[0].tier.as_str(), p.usage[0].limit), ("TIER_2K", 2_000), "the tier is untouched");
    let sender = p.senders.iter().find(|s| s.sender_id == PHONE_ID).expect("the number is known by its id");
    assert_eq!(sender.throughput_mps, 1_000);
    assert_eq!((sender.status(), sender.quality()), (pb::SenderStatus::Connected, pb::Quality::Unknown));
    let other = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        senders: vec![pb::SenderUpdate {
            sender_id: "n2".into(),
            status: pb::SenderStatus::Connected.into(),
            quality: 0,
        }],
        ..Default::default()
    };
    let p = c.update_portfolio(other).await.unwrap().into_inner();
    assert_eq!(p.senders.iter().find(|s| s.sender_id == "n2").unwrap().throughput_mps, 80, "Meta's default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_per_number_scope_a_business_wide_limit_goes_to_the_portfolio_not_to_each_number() {
    let Setup { server, mut c, _redis } = setup("scope = \"phone_number\"\nladder = \"legacy\"").await;
    deliver(server.admin_addr, &fixture("messages")).await;
    deliver(server.admin_addr, &fixture("business_capability_update_business_only")).await;
    let u = usage(&mut c, "acme", PHONE_ID).await;
    assert_eq!((u.tier.as_str(), u.limit), ("TIER_1K", 1_000), "the number keeps its own limit");
    let p = portfolio(&mut c, "acme").await;
    let whole = p.usage.iter().find(|u| u.sender_id.is_empty()).expect("the portfolio-wide limit is shown");
    assert_eq!((whole.tier.as_str(), whole.limit), ("TIER_2K", 2_000));
    // A payload that still names the number's limit sets the number's.
    deliver(server.admin_addr, &fixture("business_capability_update_legacy")).await;
    assert_eq!(usage(&mut c, "acme", PHONE_ID).await.tier, "TIER_10K");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unflagged_numbers_take_the_quality_reported_else_unknown_which_does_not_block() {
    let Setup { server, mut c, _redis } = setup("").await;
    let high = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        quality: pb::Quality::High.into(),
        ..Default::default()
    };
    c.update_portfolio(high).await.unwrap();
    deliver(server.admin_addr, &fixture("messages")).await;
    deliver(server.admin_addr, &fixture("phone_number_quality_update")).await;
    let number = |p: &pb::Portfolio| {
        let s = p.senders.iter().find(|s| s.sender_id == PHONE_ID).unwrap();
        (s.status(), s.quality())
    };
    assert_eq!(number(&portfolio(&mut c, "acme").await), (pb::SenderStatus::Flagged, pb::Quality::Low));
    deliver(server.admin_addr, &fixture("phone_number_quality_update_unflagged")).await;
    assert_eq!(number(&portfolio(&mut c, "acme").await), (pb::SenderStatus::Connected, pb::Quality::Unknown));
    let u = usage(&mut c, "acme", "").await;
    assert_eq!(u.quality(), pb::Quality::High, "an unknown rating does not hold the portfolio back");
    assert!(!u.upgrade.unwrap().blockers.iter().any(|b| b.starts_with("quality")));
    deliver(server.admin_addr, &fixture("phone_number_quality_update_unflagged_quality")).await;
    assert_eq!(number(&portfolio(&mut c, "acme").await), (pb::SenderStatus::Connected, pb::Quality::High));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_international_00_prefix_is_the_same_user_as_plus() {
    let Setup { mut c, _redis, server: _server } = setup("").await;
    let opt = pb::SetOptOutRequest { portfolio_id: "acme".into(), recipient: "00447700900123".into(), opted_out: true };
    c.set_opt_out(opt).await.unwrap();
    assert_eq!(reason(&mut c, UTILITY.to("acme", "n1", "+447700900123")).await, Reason::OptedOut);
    assert_eq!(reason(&mut c, UTILITY.to("acme", "n1", "00 44 7700 900123")).await, Reason::OptedOut);
    let opt = pb::SetOptOutRequest { portfolio_id: "acme".into(), recipient: "+4915112345678".into(), opted_out: true };
    c.set_opt_out(opt).await.unwrap();
    assert_eq!(reason(&mut c, UTILITY.to("acme", "n1", "004915112345678")).await, Reason::OptedOut);
    assert_eq!(portfolio(&mut c, "acme").await.opted_out_recipients, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_message_opens_the_window_for_the_number_and_the_user_id() {
    let Setup { server, mut c, _redis } = setup("").await;
    deliver(server.admin_addr, &fixture("messages_user_id")).await;
    assert_eq!(reason(&mut c, SERVICE.to("acme", PHONE_ID, USER)).await, Reason::ServiceWindow);
    assert_eq!(reason(&mut c, SERVICE.to("acme", PHONE_ID, "US.13491208655302741918")).await, Reason::ServiceWindow);
    assert_eq!(
        reason(&mut c, SERVICE.to("acme", "another-number", "US.13491208655302741918")).await,
        Reason::OutsideServiceWindow
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_status_gives_the_slot_back_and_only_delivered_recipients_count() {
    let Setup { mut c, _redis, server } = setup("").await;
    let users = ["16505551001", "16505551002", "16505551003", "16505551004"];
    for u in users {
        assert_eq!(reason(&mut c, UTILITY.to("acme", PHONE_ID, u)).await, Reason::NewRecipient);
    }
    // 1001 delivered (its later failure changes nothing), 1002 read, 1003 failed, 1004 only sent.
    let body = fixture("messages_statuses");
    deliver(server.admin_addr, &body).await;
    let u = usage(&mut c, "acme", "").await;
    assert_eq!((u.unique_recipients, u.unique_recipients_7d), (3, 2), "{u:?}");
    // The same delivery again changes nothing.
    deliver(server.admin_addr, &body).await;
    let u = usage(&mut c, "acme", "").await;
    assert_eq!((u.unique_recipients, u.unique_recipients_7d), (3, 2), "{u:?}");
    // The failed recipient's slot is free again; once counted anew (in a later second than the
    // status's, Meta's timestamps being whole seconds), the old failure cannot take it back.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_eq!(reason(&mut c, UTILITY.to("acme", PHONE_ID, users[2])).await, Reason::NewRecipient);
    deliver(server.admin_addr, &body).await;
    assert_eq!(usage(&mut c, "acme", "").await.unique_recipients, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_pause_and_rate_each_template_language_separately() {
    let Setup { server, mut c, _redis } = setup("").await;
    let admin = server.admin_addr;
    let sale = MARKETING.template("spring_sale");
    let mut n = 0;
    let mut send = async |c: &mut Client, language: &'static str| {
        n += 1;
        reason(c, sale.language(language).to("acme", PHONE_ID, &format!("+1555000{n:04}"))).await
    };
    // One delivery: Meta paused the English template and approved the Portuguese one.
    deliver(admin, &fixture("message_template_status_update_languages")).await;
    assert_eq!(send(&mut c, "en_US").await, Reason::TemplateBlocked);
    assert_eq!(send(&mut c, "pt_BR").await, Reason::NewRecipient);
    assert_eq!(send(&mut c, "").await, Reason::TemplateBlocked, "without a language it may be English");
    deliver(admin, &fixture("message_template_quality_update")).await;
    deliver(admin, &fixture("message_template_quality_update_pt_BR")).await;
    let p = portfolio(&mut c, "acme").await;
    let rows: Vec<_> = p
        .templates
        .iter()
        .map(|t| (t.name.as_str(), t.language.as_str(), t.status.as_str(), t.active, t.quality()))
        .collect();
    assert_eq!(
        rows,
        [
            ("spring_sale", "en_US", "PAUSED", false, pb::Quality::Medium),
            ("spring_sale", "pt_BR", "APPROVED", true, pb::Quality::Low),
        ]
    );

    // Reinstated by hand for every language: newer than Meta's pause, so it covers English.
    let reinstate = pb::UpdatePortfolioRequest {
        portfolio_id: "acme".into(),
        templates: vec![pb::TemplateUpdate {
            name: "spring_sale".into(),
            status: "REINSTATED".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let p = c.update_portfolio(reinstate).await.unwrap().into_inner();
    assert_eq!((p.templates[0].language.as_str(), p.templates[0].status.as_str()), ("", "REINSTATED"));
    assert_eq!((p.templates[1].status.as_str(), p.templates[1].active), ("REINSTATED", true), "English in force");
    assert_eq!(send(&mut c, "en_US").await, Reason::NewRecipient);
    assert_eq!(send(&mut c, "").await, Reason::NewRecipient);

    // A later pause of one language wins over the name-wide status again.
    let later = fixture("message_template_status_update")
        .replace("{{EVENT}}", "DISABLED")
        .replace("\"time\": 1763700000", &format!("\"time\": {}", 4_000_000_000u64));
    deliver(admin, &later).await;
    assert_eq!(send(&mut c, "en_US").await, Reason::TemplateBlocked);
    assert_eq!(send(&mut c, "pt_BR").await, Reason::NewRecipient);
    assert_eq!(send(&mut c, "").await, Reason::TemplateBlocked);
}
