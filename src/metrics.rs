//! Metric names, their descriptions, and the Prometheus recorder. Every metric tiergate exports
//! is named here once.
//!
//! Label values that callers choose (`portfolio`, `sender`) are bounded by [`Labels`]: the first
//! `metrics.max_portfolios` portfolios, and as many numbers, get series of their own; the rest
//! are folded, so a caller reading random portfolios cannot grow a scrape without bound.

use std::collections::HashSet;
use std::sync::{OnceLock, RwLock};
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
/// Metric updates of portfolios or numbers beyond `metrics.max_portfolios`: counted under
/// [`OTHER`], or (gauges) not exported.
pub const PORTFOLIOS_FOLDED: &str = "tiergate_metrics_portfolios_folded_total";

/// The `portfolio` label value that portfolios without one of their own share.
pub const OTHER: &str = "_other";

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
    describe_counter!(
        PORTFOLIOS_FOLDED,
        "Metric updates of portfolios or numbers beyond metrics.max_portfolios, counted under portfolio=\"_other\" \
         or, for gauges, not exported."
    );
}

/// Which portfolios and numbers have label values of their own: the first `max` portfolios seen
/// (configured ones first) and the first `max` (portfolio, number) pairs seen among those. The
/// others are folded: counters count them under `portfolio="_other"`, and their gauges are not
/// exported (a gauge of many scopes at once would be the last one written, not a sum). A
/// portfolio named `_other` is always folded.
pub struct Labels {
    max: usize,
    seen: RwLock<Seen>,
}

#[derive(Default)]
struct Seen {
    portfolios: HashSet<String>,
    senders: HashSet<(String, String)>,
}

impl Labels {
    /// Room for `max` portfolios and `max` numbers, the `configured` portfolios taking theirs first.
    pub fn new(max: usize, configured: impl IntoIterator<Item = String>) -> Labels {
        let labels = Labels { max, seen: RwLock::new(Seen::default()) };
        for portfolio in configured {
            labels.admit(&portfolio, None);
        }
        labels
    }

    /// Whether the portfolio (and number) have labels of their own, giving them theirs while
    /// there is room; a folded update is counted.
    fn admit(&self, portfolio: &str, sender: Option<&str>) -> bool {
        let sender = sender.filter(|s| !s.is_empty());
        let pair = |s: &str| (portfolio.to_owned(), s.to_owned());
        {
            let seen = self.seen.read().unwrap_or_else(|e| e.into_inner());
            if seen.portfolios.contains(portfolio) && sender.is_none_or(|s| seen.senders.contains(&pair(s))) {
                return true;
            }
        }
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        let own = portfolio != OTHER
            && (seen.portfolios.contains(portfolio) || seen.portfolios.len() < self.max)
            && sender.is_none_or(|s| seen.senders.contains(&pair(s)) || seen.senders.len() < self.max);
        if own {
            seen.portfolios.insert(portfolio.to_owned());
            if let Some(s) = sender {
                seen.senders.insert(pair(s));
            }
        } else {
            counter!(PORTFOLIOS_FOLDED).increment(1);
        }
        own
    }

    /// The `portfolio` label value of a counter: the portfolio's own, or [`OTHER`].
    fn portfolio(&self, portfolio: &str) -> String {
        if self.admit(portfolio, None) {
            portfolio.to_owned()
        } else {
            OTHER.to_owned()
        }
    }

    /// The `portfolio` and `sender` labels of a scope's gauges, or `None` when they are folded.
    fn scope(&self, portfolio: &str, sender: Option<&str>) -> Option<[(&'static str, String); 2]> {
        self.admit(portfolio, sender)
            .then(|| [("portfolio", portfolio.to_owned()), ("sender", sender.unwrap_or_default().to_owned())])
    }

    /// The portfolios with label values of their own: at most `max`, configured ones first.
    pub fn portfolios(&self) -> Vec<String> {
        self.seen.read().unwrap_or_else(|e| e.into_inner()).portfolios.iter().cloned().collect()
    }
}

/// Counts one decision, and denials per portfolio.
pub fn decision(labels: &Labels, portfolio: &str, reason: Reason) {
    counter!(DECISIONS, "decision" => reason.decision().as_str(), "reason" => reason.as_str()).increment(1);
    if reason.decision() == Decision::Denied {
        counter!(DENIALS, "portfolio" => labels.portfolio(portfolio), "reason" => reason.as_str()).increment(1);
    }
}

fn scope_labels(labels: &Labels, scope: &ScopeKey) -> Option<[(&'static str, String); 2]> {
    labels.scope(&scope.portfolio, scope.sender.as_deref())
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
pub fn projection(labels: &Labels, scope: &ScopeKey, quality: Quality, unique_7d: u64, p: &Projection) {
    let Some(labels) = scope_labels(labels, scope) else { return };
    gauge!(QUALITY, &labels).set(quality_value(quality));
    gauge!(UNIQUE_7D, &labels).set(unique_7d as f64);
    gauge!(UPGRADE_THRESHOLD, &labels).set(p.threshold as f64);
    gauge!(UPGRADE_ELIGIBLE, &labels).set(if p.eligible { 1.0 } else { 0.0 });
}

/// Publishes the status of each known number of a portfolio.
pub fn portfolio(labels: &Labels, portfolio: &str, state: &PortfolioState) {
    for (sender, s) in &state.senders {
        let Some(labels) = labels.scope(portfolio, Some(sender)) else { continue };
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
pub fn usage(labels: &Labels, scope: &ScopeKey, usage: &UsageSnapshot) {
    let Some(labels) = scope_labels(labels, scope) else { return };
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

/// Messages decided by one admission store call: one scope's messages of an AdmitBatch, or the
/// Admits of one scope coalesced while a call was in flight. Its `_count` is the number of
/// admission calls, its `_sum` the messages they carried.
pub const ADMIT_BATCH_SIZE: &str = "tiergate_admit_batch_size";

/// Records the size of one admission store call.
pub fn admit_call(messages: usize) {
    // Described at first use, beside the metric, rather than among the others in `describe`.
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_histogram!(ADMIT_BATCH_SIZE, "Messages decided by one admission store call.");
    });
    histogram!(ADMIT_BATCH_SIZE).record(messages as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_portfolios_and_numbers_keep_their_labels_and_the_rest_fold() {
        let labels = Labels::new(2, ["configured".to_string()]);
        assert_eq!(labels.portfolio("configured"), "configured");
        assert_eq!(labels.portfolio("first"), "first");
        assert_eq!(labels.portfolio("second"), OTHER, "configured portfolios took their room first");
        assert_eq!(labels.portfolio("first"), "first", "a labelled portfolio keeps its label");
        assert_eq!(labels.portfolio(OTHER), OTHER);
        assert!(labels.scope("first", None).is_some());
        assert!(labels.scope("second", None).is_none(), "gauges of folded portfolios are not exported");
        // Numbers are bounded too, and only within labelled portfolios.
        assert!(labels.scope("first", Some("n1")).is_some());
        assert!(labels.scope("first", Some("n2")).is_some());
        assert!(labels.scope("first", Some("n3")).is_none());
        assert!(labels.scope("first", Some("n1")).is_some());
        assert!(labels.scope("second", Some("n1")).is_none());
        assert_eq!(labels.scope("first", Some("")).unwrap()[1], ("sender", String::new()));
    }
}
