//! Metric names, their descriptions, and the Prometheus recorder. Every metric tiergate exports
//! is named here once.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::policy::{Decision, Limit, Projection, Quality, Reason, ScopeKey, SenderStatus};
use crate::store::{PortfolioState, StoreError, UsageSnapshot};

/// Admission decisions, by `decision` and `reason`.
pub const DECISIONS: &str = "tiergate_decisions_total";
/// Time to answer one Admit or AdmitBatch call, store round trip included.
pub const ADMIT_SECONDS: &str = "tiergate_admit_duration_seconds";
/// Unique recipients counted in the rolling window, by `portfolio` and `sender` (per-number scope).
pub const UNIQUE_RECIPIENTS: &str = "tiergate_unique_recipients";
/// The messaging limit of the scope's tier (+Inf when unlimited).
pub const LIMIT: &str = "tiergate_limit";
/// Failed store calls, by `op` and `kind` (transient or internal).
pub const STORE_ERRORS: &str = "tiergate_store_errors_total";
/// Messages admitted unchecked because the store was down and `store.on_error = "allow"`.
pub const FAIL_OPEN: &str = "tiergate_store_fail_open_total";
/// Release calls, by `released` (true or false).
pub const RELEASES: &str = "tiergate_releases_total";
/// Inbound messages recorded (service windows opened or restarted).
pub const INBOUND: &str = "tiergate_inbound_total";
/// Denials by `portfolio` and `reason` (opted out, template blocked, limit reached, …).
pub const DENIALS: &str = "tiergate_denials_total";
/// Quality rating by `portfolio` (and `sender` for a number): 3 high, 2 medium, 1 low, 0 unknown.
pub const QUALITY: &str = "tiergate_quality";
/// 1 for a number's current `status` (CONNECTED, FLAGGED, RESTRICTED, BANNED, …), by `portfolio`, `sender`.
pub const SENDER_STATUS: &str = "tiergate_sender_status";
/// Unique recipients over the last 7 days, by `portfolio` and `sender` (per-number scope).
pub const UNIQUE_7D: &str = "tiergate_unique_recipients_7d";
/// Unique recipients the next upgrade asks for, over the rule's period.
pub const UPGRADE_THRESHOLD: &str = "tiergate_upgrade_threshold";
/// 1 when the scope meets every condition of its next upgrade.
pub const UPGRADE_ELIGIBLE: &str = "tiergate_upgrade_eligible";
/// Webhook deliveries, by `outcome` (applied, unauthorized, malformed, store_failed).
pub const WEBHOOK_DELIVERIES: &str = "tiergate_webhook_deliveries_total";
/// Webhook changes, by `field` and `outcome` (applied, ignored).
pub const WEBHOOK_CHANGES: &str = "tiergate_webhook_changes_total";

/// Buckets of [`ADMIT_SECONDS`]: from 50 µs (memory store) to 1 s (a struggling Redis).
const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ADMIT_SECONDS.into()), LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder is installed; then ours stays unused but renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(DECISIONS, "Admission decisions by decision and reason.");
    describe_histogram!(ADMIT_SECONDS, Unit::Seconds, "Time to answer one Admit or AdmitBatch call.");
    describe_gauge!(UNIQUE_RECIPIENTS, "Unique recipients counted in the rolling window of a limit scope.");
    describe_gauge!(LIMIT, "Messaging limit of the scope's tier (+Inf when unlimited).");
    describe_counter!(STORE_ERRORS, "Failed store calls by operation and kind.");
    describe_counter!(FAIL_OPEN, "Messages admitted unchecked because the store could not answer.");
    describe_counter!(RELEASES, "Release calls by whether a slot was given back.");
    describe_counter!(INBOUND, "Inbound messages recorded.");
    describe_counter!(DENIALS, "Denials by portfolio and reason.");
    describe_gauge!(QUALITY, "Quality rating: 3 high, 2 medium, 1 low, 0 unknown.");
    describe_gauge!(SENDER_STATUS, "1 for the current status of a number.");
    describe_gauge!(UNIQUE_7D, "Unique recipients over the last 7 days.");
    describe_gauge!(UPGRADE_THRESHOLD, "Unique recipients the next upgrade asks for over its period.");
    describe_gauge!(UPGRADE_ELIGIBLE, "1 when the scope meets every condition of its next upgrade.");
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook deliveries by outcome.");
    describe_counter!(WEBHOOK_CHANGES, "Webhook changes by field and outcome.");
}

/// Counts one decision, and denials per portfolio.
pub fn decision(portfolio: &str, reason: Reason) {
    counter!(DECISIONS, "decision" => reason.decision().as_str(), "reason" => reason.as_str()).increment(1);
    if reason.decision() == Decision::Denied {
        counter!(DENIALS, "portfolio" => portfolio.to_owned(), "reason" => reason.as_str()).increment(1);
    }
}

fn scope_labels(scope: &ScopeKey) -> [(&'static str, String); 2] {
    [("portfolio", scope.portfolio.clone()), ("sender", scope.sender.clone().unwrap_or_default())]
}

fn quality_value(q: Quality) -> f64 {
    match q {
        Quality::High => 3.0,
        Quality::Medium => 2.0,
        Quality::Low => 1.0,
        Quality::Unknown => 0.0,
    }
}

/// Publishes a scope's quality and upgrade projection.
pub fn projection(scope: &ScopeKey, quality: Quality, unique_7d: u64, p: &Projection) {
    let labels = scope_labels(scope);
    gauge!(QUALITY, &labels).set(quality_value(quality));
    gauge!(UNIQUE_7D, &labels).set(unique_7d as f64);
    gauge!(UPGRADE_THRESHOLD, &labels).set(p.threshold as f64);
    gauge!(UPGRADE_ELIGIBLE, &labels).set(if p.eligible { 1.0 } else { 0.0 });
}

/// Publishes the status of each known number of a portfolio.
pub fn portfolio(portfolio: &str, state: &PortfolioState) {
    for (sender, s) in &state.senders {
        let labels = [("portfolio", portfolio.to_owned()), ("sender", sender.clone())];
        gauge!(QUALITY, &labels).set(quality_value(s.quality));
        for status in [
            SenderStatus::Connected,
            SenderStatus::Pending,
            SenderStatus::Offline,
            SenderStatus::Flagged,
            SenderStatus::Banned,
        ] {
            let on = s.status.unwrap_or_default() == status;
            let labels = [
                ("portfolio", portfolio.to_owned()),
                ("sender", sender.clone()),
                ("status", status.as_str().to_owned()),
            ];
            gauge!(SENDER_STATUS, &labels).set(if on { 1.0 } else { 0.0 });
        }
    }
}

/// Counts a webhook delivery.
pub fn webhook_delivery(outcome: &'static str) {
    counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).increment(1);
}

/// Counts one change of a webhook delivery.
pub fn webhook_change(field: &str, outcome: &'static str) {
    counter!(WEBHOOK_CHANGES, "field" => field.to_owned(), "outcome" => outcome).increment(1);
}

/// Records the latency of one Admit or AdmitBatch call.
pub fn admit_latency(elapsed: Duration) {
    histogram!(ADMIT_SECONDS).record(elapsed.as_secs_f64());
}

/// Publishes a scope's usage versus its tier.
pub fn usage(scope: &ScopeKey, usage: &UsageSnapshot) {
    let labels = scope_labels(scope);
    gauge!(UNIQUE_RECIPIENTS, &labels).set(usage.counted as f64);
    let limit = match usage.tier.limit {
        Limit::Limited(n) => n as f64,
        Limit::Unlimited => f64::INFINITY,
    };
    gauge!(LIMIT, &labels).set(limit);
}

/// Counts a failed store call.
pub fn store_error(op: &'static str, e: &StoreError) {
    let kind = match e {
        StoreError::Unavailable(_) => "transient",
        StoreError::Internal(_) => "internal",
        StoreError::Refused(_) => "refused",
    };
    counter!(STORE_ERRORS, "op" => op, "kind" => kind).increment(1);
}

/// Counts a message admitted without a check.
pub fn fail_open() {
    counter!(FAIL_OPEN).increment(1);
}

/// Counts a Release call.
pub fn release(released: bool) {
    counter!(RELEASES, "released" => if released { "true" } else { "false" }).increment(1);
}

/// Counts an inbound message.
pub fn inbound() {
    counter!(INBOUND).increment(1);
}
