//! Metric names, their descriptions, and the Prometheus recorder. Every metric tiergate exports
//! is named here once.
//!
//! Label values that callers choose (`portfolio`, `sender`) are bounded by [`Labels`]: the first
//! `metrics.max_portfolios` portfolios, and as many numbers, get series of their own; the rest
//! are folded, so a caller reading random portfolios cannot grow a scrape without bound.
//!
//! A scope's gauges (usage, limit, quality, upgrade projection, number statuses) are kept by
//! [`Labels`] rather than by the recorder, for the portfolios this sidecar has seen lately: the
//! limiter refreshes them on a schedule, and a portfolio it forgets stops being exported instead
//! of showing its last values forever. [`render`] writes both.
//!
//! Every counter whose label values are known up front is exported at 0 from start-up
//! ([`start`]), so alerts on `increase()` see the first event.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::formatting::{sanitize_label_value, write_help_line, write_type_line};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::policy::rate::{MetaError, ThroughputLevels};
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
/// Limiter calls, by `method` (`Admit`, …) and `code` (the gRPC code's name: `OK`, `UNAVAILABLE`, …).
pub const GRPC_REQUESTS: &str = "tiergate_grpc_requests_total";
/// Time to answer one Limiter call, by `method`.
pub const GRPC_SECONDS: &str = "tiergate_grpc_request_duration_seconds";
/// 1 while this sidecar refuses to serve because its shared policy differs from the store's.
pub const POLICY_MISMATCH: &str = "tiergate_store_policy_mismatch";
/// 1 when both webhook secrets are set, so this sidecar receives Meta's webhooks.
pub const WEBHOOKS_CONFIGURED: &str = "tiergate_webhooks_configured";
/// Unix time of the last webhook delivery received with a valid signature (0 before the first).
pub const WEBHOOK_LAST_RECEIVED: &str = "tiergate_webhook_last_received_timestamp_seconds";

/// The `portfolio` label value that portfolios without one of their own share.
pub const OTHER: &str = "_other";

/// Buckets of [`ADMIT_SECONDS`]: from 50 µs (memory store) to 1 s (a struggling Redis).
const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// The Limiter's methods, the `method` label values of [`GRPC_REQUESTS`] and [`GRPC_SECONDS`].
pub const GRPC_METHODS: [&str; 9] = [
    "Admit",
    "AdmitBatch",
    "Release",
    "RecordInbound",
    "GetUsage",
    "SetTier",
    "SetOptOut",
    "UpdatePortfolio",
    "GetPortfolio",
];

/// The `method` label of a path that names no Limiter method (answered UNIMPLEMENTED).
pub const OTHER_METHOD: &str = "_other";

/// The codes a Limiter call is exported with at 0 from start-up: OK and every code it answers
/// a failure with (see [`Kind`](crate::error::Kind)).
const GRPC_CODES_AT_START: [tonic::Code; 9] = [
    tonic::Code::Ok,
    tonic::Code::InvalidArgument,
    tonic::Code::Unauthenticated,
    tonic::Code::PermissionDenied,
    tonic::Code::Unavailable,
    tonic::Code::Internal,
    tonic::Code::FailedPrecondition,
    tonic::Code::NotFound,
    tonic::Code::ResourceExhausted,
];

/// The operations of [`STORE_ERRORS`], and its kinds.
const STORE_OPS: [&str; 5] = ["admit", "release", "apply", "usage", "portfolio"];
const STORE_ERROR_KINDS: [&str; 3] = ["transient", "internal", "refused"];

/// The outcomes of [`WEBHOOK_DELIVERIES`].
const WEBHOOK_OUTCOMES: [&str; 4] = ["applied", "unauthorized", "malformed", "store_failed"];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ADMIT_SECONDS.into()), LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .set_buckets_for_metric(Matcher::Full(GRPC_SECONDS.into()), LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .set_buckets_for_metric(Matcher::Full(PACED_SECONDS.into()), PACED_BUCKETS)
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
    describe_counter!(STORE_ERRORS, "Failed store calls by operation and kind.");
    describe_counter!(FAIL_OPEN, "Messages admitted unchecked because the store could not answer.");
    describe_counter!(RELEASES, "Release calls by whether a slot was given back.");
    describe_counter!(INBOUND, "Inbound messages recorded.");
    describe_counter!(DENIALS, "Denials by portfolio and reason.");
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook deliveries by outcome.");
    describe_counter!(WEBHOOK_CHANGES, "Webhook changes by field and outcome.");
    describe_counter!(
        PORTFOLIOS_FOLDED,
        "Metric updates of portfolios or numbers beyond metrics.max_portfolios, counted under portfolio=\"_other\" \
         or, for gauges, not exported."
    );
    describe_counter!(GRPC_REQUESTS, "Limiter calls by method and gRPC code.");
    describe_histogram!(GRPC_SECONDS, Unit::Seconds, "Time to answer one Limiter call, by method.");
    describe_gauge!(
        POLICY_MISMATCH,
        "1 while this sidecar refuses to serve: its shared policy differs from the store's."
    );
    describe_gauge!(WEBHOOKS_CONFIGURED, "1 when the webhook secrets are set.");
    describe_gauge!(
        WEBHOOK_LAST_RECEIVED,
        Unit::Seconds,
        "Unix time of the last webhook delivery received with a valid signature (0 before the first)."
    );
    describe_histogram!(PACED_SECONDS, Unit::Seconds, "How long paced admissions were held for their slot.");
    describe_counter!(SHADOW_DECISIONS, "What shadow mode would have answered, by portfolio, decision and reason.");
    describe_counter!(THROUGHPUT_MESSAGES, "Messages this sidecar admitted per number while policy.throughput is on.");
    describe_counter!(META_ERRORS, "Error codes Meta reported on failed messages, by code.");
    describe_counter!(
        THROUGHPUT_BACKOFFS,
        "Throughput backoff episodes (Meta's error 130429) this sidecar saw, by portfolio and number."
    );
}

/// Exports at 0 every counter whose label values are known at start-up: decisions by reason,
/// store errors by operation and kind, releases, fail-open admits, inbound messages, folded
/// updates, and the denials of the portfolios in `[[portfolios]]` that have labels of their own.
/// Also the Meta error codes tiergate knows ([`MetaError::CODES`]).
pub fn start(labels: &Labels, configured: &[String]) {
    for reason in Reason::ALL {
        counter!(DECISIONS, "decision" => decision_label(reason.decision()), "reason" => reason_label(reason))
            .increment(0);
    }
    for op in STORE_OPS {
        for kind in STORE_ERROR_KINDS {
            counter!(STORE_ERRORS, "op" => op, "kind" => kind).increment(0);
        }
    }
    for released in ["true", "false"] {
        counter!(RELEASES, "released" => released).increment(0);
    }
    counter!(FAIL_OPEN).increment(0);
    counter!(INBOUND).increment(0);
    counter!(PORTFOLIOS_FOLDED).increment(0);
    for portfolio in configured.iter().filter(|p| labels.admit(p, None)) {
        for reason in Reason::ALL.into_iter().filter(|r| r.decision() == Decision::Denied) {
            counter!(DENIALS, "portfolio" => portfolio.clone(), "reason" => reason_label(reason)).increment(0);
        }
    }
    for (code, _) in MetaError::CODES {
        counter!(META_ERRORS, "code" => code.to_string()).increment(0);
    }
}

/// The `decision` label: the API's name (`ADMITTED`, `DENIED`).
fn decision_label(decision: Decision) -> &'static str {
    match decision {
        Decision::Admitted => "ADMITTED",
        Decision::Denied => "DENIED",
    }
}

/// The `reason` label: the API's name (`LIMIT_REACHED`, …), as the alerts and the README use it.
fn reason_label(reason: Reason) -> &'static str {
    match reason {
        Reason::NewRecipient => "NEW_RECIPIENT",
        Reason::AlreadyCounted => "ALREADY_COUNTED",
        Reason::ServiceWindow => "SERVICE_WINDOW",
        Reason::LimitReached => "LIMIT_REACHED",
        Reason::StoreUnavailable => "STORE_UNAVAILABLE",
        Reason::OptedOut => "OPTED_OUT",
        Reason::TemplateBlocked => "TEMPLATE_BLOCKED",
        Reason::HeadroomReserved => "HEADROOM_RESERVED",
        Reason::SenderBlocked => "SENDER_BLOCKED",
        Reason::OutsideServiceWindow => "OUTSIDE_SERVICE_WINDOW",
        Reason::ThroughputExceeded => "THROUGHPUT_EXCEEDED",
        Reason::PairRate => "PAIR_RATE",
        Reason::RecipientMarketingCapped => "RECIPIENT_MARKETING_CAPPED",
    }
}

/// Writes what `/metrics` serves: the recorder's metrics, then the scope gauges `labels` keeps.
pub fn render(recorder: &PrometheusHandle, labels: &Labels) -> String {
    let mut out = recorder.render();
    labels.render(&mut out);
    out
}

/// Which portfolios and numbers have label values of their own: the first `max` portfolios seen
/// (configured ones first) and the first `max` (portfolio, number) pairs seen among those. The
/// others are folded: counters count them under `portfolio="_other"`, and their gauges are not
/// exported (a gauge of many scopes at once would be the last one written, not a sum). A
/// portfolio named `_other` is always folded.
///
/// It also keeps the gauges of the labelled portfolios this sidecar has seen lately ("active"),
/// with when each was last seen, so they can be refreshed on a schedule
/// ([`Labels::active`]) and dropped once idle ([`Labels::forget_idle`]).
pub struct Labels {
    max: usize,
    seen: RwLock<Seen>,
    active: Mutex<BTreeMap<String, Active>>,
    /// `[policy.throughput]` when on: the levels [`THROUGHPUT_MPS`] shows.
    throughput: Option<ThroughputLevels>,
}

#[derive(Default)]
struct Seen {
    portfolios: HashSet<String>,
    /// Numbers with labels of their own, by portfolio, so a lookup borrows the ids it is given.
    senders: HashMap<String, HashSet<String>>,
    /// How many numbers `senders` holds in all.
    sender_count: usize,
}

/// An active portfolio: when this sidecar last saw it, and its gauges by number (`""` for the
/// portfolio's own scope).
struct Active {
    seen: Instant,
    scopes: BTreeMap<String, ScopeGauges>,
}

impl Active {
    /// A portfolio seen now, without gauges yet.
    fn now() -> Active {
        Active { seen: Instant::now(), scopes: BTreeMap::new() }
    }
}

/// The per-scope gauges kept by [`Labels`], in [`SCOPE_GAUGES`] order, and the number's status.
#[derive(Default)]
struct ScopeGauges {
    values: [Option<f64>; SCOPE_GAUGES.len()],
    status: Option<SenderStatus>,
    /// A number's throughput level in force ([`THROUGHPUT_MPS`]).
    throughput_mps: Option<u32>,
}

/// The per-scope gauges with their help text; [`ScopeGauges::values`] follows this order.
const SCOPE_GAUGES: [(&str, &str); 6] = [
    (UNIQUE_RECIPIENTS, "Unique recipients counted in the rolling window of a limit scope."),
    (LIMIT, "Messaging limit of the scope's tier (+Inf when unlimited)."),
    (QUALITY, "Quality rating: 3 high, 2 medium, 1 low, 0 unknown."),
    (UNIQUE_7D, "Unique recipients over the last 7 days."),
    (UPGRADE_THRESHOLD, "Unique recipients the next upgrade asks for over its period."),
    (UPGRADE_ELIGIBLE, "1 when the scope meets every condition of its next upgrade."),
];
const G_UNIQUE: usize = 0;
const G_LIMIT: usize = 1;
const G_QUALITY: usize = 2;
const G_UNIQUE_7D: usize = 3;
const G_THRESHOLD: usize = 4;
const G_ELIGIBLE: usize = 5;

/// The statuses [`SENDER_STATUS`] has a series for, per number.
const STATUSES: [SenderStatus; 5] = [
    SenderStatus::Connected,
    SenderStatus::Pending,
    SenderStatus::Offline,
    SenderStatus::Flagged,
    SenderStatus::Banned,
];

impl Labels {
    /// Room for `max` portfolios and `max` numbers, the `configured` portfolios taking theirs first.
    pub fn new(max: usize, configured: impl IntoIterator<Item = String>) -> Labels {
        let labels =
            Labels { max, seen: RwLock::new(Seen::default()), active: Mutex::new(BTreeMap::new()), throughput: None };
        for portfolio in configured {
            labels.admit(&portfolio, None);
        }
        labels
    }

    /// Whether the portfolio (and number) have labels of their own, giving them theirs while
    /// there is room; a folded update is counted.
    fn admit(&self, portfolio: &str, sender: Option<&str>) -> bool {
        let sender = sender.filter(|s| !s.is_empty());
        let has = |seen: &Seen, s: &str| seen.senders.get(portfolio).is_some_and(|n| n.contains(s));
        {
            let seen = self.seen.read().unwrap_or_else(|e| e.into_inner());
            if seen.portfolios.contains(portfolio) && sender.is_none_or(|s| has(&seen, s)) {
                return true;
            }
        }
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        let own = portfolio != OTHER
            && (seen.portfolios.contains(portfolio) || seen.portfolios.len() < self.max)
            && sender.is_none_or(|s| has(&seen, s) || seen.sender_count < self.max);
        if own {
            seen.portfolios.insert(portfolio.to_owned());
            if let Some(s) = sender {
                if seen.senders.entry(portfolio.to_owned()).or_default().insert(s.to_owned()) {
                    seen.sender_count += 1;
                }
            }
        } else {
            counter!(PORTFOLIOS_FOLDED).increment(1);
        }
        own
    }

    /// Whether a scope has labels of its own (giving it theirs while there is room).
    pub fn own(&self, scope: &ScopeKey) -> bool {
        self.admit(&scope.portfolio, scope.sender.as_deref())
    }

    /// The `portfolio` label value of a counter: the portfolio's own, or [`OTHER`].
    fn portfolio(&self, portfolio: &str) -> String {
        if self.admit(portfolio, None) {
            portfolio.to_owned()
        } else {
            OTHER.to_owned()
        }
    }

    /// Marks a labelled portfolio seen now, so its gauges are refreshed until it is idle.
    pub fn seen(&self, portfolio: &str) {
        if !self.admit(portfolio, None) {
            return;
        }
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active.entry(portfolio.to_owned()).or_insert_with(Active::now).seen = Instant::now();
    }

    /// Updates the gauges of a scope with labels of its own (marking its portfolio seen now when
    /// `seen`); those of a folded scope are not exported.
    fn gauges(&self, portfolio: &str, sender: Option<&str>, seen: bool, update: impl FnOnce(&mut ScopeGauges)) {
        if !self.admit(portfolio, sender) {
            return;
        }
        let sender = sender.unwrap_or_default();
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        // Keys are allocated only for a portfolio or number not there yet, not on every Admit.
        if !active.contains_key(portfolio) {
            active.insert(portfolio.to_owned(), Active::now());
        }
        let entry = active.get_mut(portfolio).expect("inserted above");
        if seen {
            entry.seen = Instant::now();
        }
        if !entry.scopes.contains_key(sender) {
            entry.scopes.insert(sender.to_owned(), ScopeGauges::default());
        }
        update(entry.scopes.get_mut(sender).expect("inserted above"));
    }

    /// The active portfolios, each with the numbers it has gauges for (`""`: the portfolio's own
    /// scope), in order.
    pub fn active(&self) -> Vec<(String, Vec<String>)> {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active.iter().map(|(p, a)| (p.clone(), a.scopes.keys().cloned().collect())).collect()
    }

    /// Forgets the portfolios not seen for longer than `idle`: their gauges are no longer
    /// exported (nor refreshed) until they are seen again. Returns how many were forgotten.
    pub fn forget_idle(&self, idle: Duration) -> usize {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let before = active.len();
        active.retain(|_, a| a.seen.elapsed() <= idle);
        before - active.len()
    }

    /// Appends the gauges of the active portfolios to a scrape, one family per metric.
    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let rows = || active.iter().flat_map(|(p, a)| a.scopes.iter().map(move |(s, g)| (p, s, g)));
        let labels = |p: &str, s: &str| {
            format!("portfolio=\"{}\",sender=\"{}\"", sanitize_label_value(p), sanitize_label_value(s))
        };
        for (i, (name, help)) in SCOPE_GAUGES.iter().enumerate() {
            let mut family = String::new();
            for (p, s, g) in rows() {
                if let Some(v) = g.values[i] {
                    let _ = writeln!(family, "{name}{{{}}} {}", labels(p, s), value_text(v));
                }
            }
            if !family.is_empty() {
                write_help_line(out, name, None, None, help);
                write_type_line(out, name, None, None, "gauge");
                out.push_str(&family);
                out.push('\n');
            }
        }
        let mut family = String::new();
        for (p, s, g) in rows() {
            let Some(current) = g.status else { continue };
            for status in STATUSES {
                let on = if current == status { 1 } else { 0 };
                let _ = writeln!(family, "{SENDER_STATUS}{{{},status=\"{}\"}} {on}", labels(p, s), status.as_str());
            }
        }
        if !family.is_empty() {
            write_help_line(out, SENDER_STATUS, None, None, "1 for the current status of a number.");
            write_type_line(out, SENDER_STATUS, None, None, "gauge");
            out.push_str(&family);
            out.push('\n');
        }
        render_throughput_levels(out, rows());
    }

    /// The portfolios with label values of their own (at most `max`).
    pub fn portfolios(&self) -> Vec<String> {
        self.seen.read().unwrap_or_else(|e| e.into_inner()).portfolios.iter().cloned().collect()
    }
}

/// A gauge's value as the exposition format writes it.
fn value_text(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".to_owned()
    } else {
        v.to_string()
    }
}

/// Counts one decision, and denials per portfolio.
pub fn decision(labels: &Labels, portfolio: &str, reason: Reason) {
    let name = reason_label(reason);
    counter!(DECISIONS, "decision" => decision_label(reason.decision()), "reason" => name).increment(1);
    if reason.decision() == Decision::Denied {
        counter!(DENIALS, "portfolio" => labels.portfolio(portfolio), "reason" => name).increment(1);
    }
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
    labels.gauges(&scope.portfolio, scope.sender.as_deref(), false, |g| {
        g.values[G_QUALITY] = Some(quality_value(quality));
        g.values[G_UNIQUE_7D] = Some(unique_7d as f64);
        g.values[G_THRESHOLD] = Some(p.threshold as f64);
        g.values[G_ELIGIBLE] = Some(if p.eligible { 1.0 } else { 0.0 });
    });
}

/// Publishes the quality and status of each known number of a portfolio.
pub fn portfolio(labels: &Labels, portfolio: &str, state: &PortfolioState) {
    for (sender, s) in &state.senders {
        labels.gauges(portfolio, Some(sender), false, |g| {
            g.values[G_QUALITY] = Some(quality_value(s.quality));
            g.status = Some(s.status.unwrap_or_default());
        });
        throughput_level(labels, portfolio, sender, s.throughput_mps);
    }
}

/// Publishes a scope's usage versus its tier, and marks its portfolio seen (an Admit or a read).
pub fn usage(labels: &Labels, scope: &ScopeKey, usage: &UsageSnapshot) {
    publish_usage(labels, scope, usage, true);
}

/// [`usage`] for the scheduled refresh, which leaves when the portfolio was last seen as it was.
pub fn refreshed_usage(labels: &Labels, scope: &ScopeKey, usage: &UsageSnapshot) {
    publish_usage(labels, scope, usage, false);
}

fn publish_usage(labels: &Labels, scope: &ScopeKey, usage: &UsageSnapshot, seen: bool) {
    let limit = match usage.tier.limit {
        Limit::Limited(n) => n as f64,
        Limit::Unlimited => f64::INFINITY,
    };
    labels.gauges(&scope.portfolio, scope.sender.as_deref(), seen, |g| {
        g.values[G_UNIQUE] = Some(usage.counted as f64);
        g.values[G_LIMIT] = Some(limit);
    });
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

/// Exports whether webhooks are received here, the deliveries by outcome at 0, and (when they
/// are) no delivery received yet.
pub fn webhooks_configured(configured: bool) {
    gauge!(WEBHOOKS_CONFIGURED).set(if configured { 1.0 } else { 0.0 });
    for outcome in WEBHOOK_OUTCOMES {
        counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).increment(0);
    }
    if configured {
        gauge!(WEBHOOK_LAST_RECEIVED).set(0.0);
    }
}

/// Records that a webhook delivery with a valid signature was received now.
pub fn webhook_received() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    gauge!(WEBHOOK_LAST_RECEIVED).set(now.as_secs_f64());
}

/// Exports whether this sidecar refuses to serve because its shared policy differs from the store's.
pub fn policy_mismatch(refusing: bool) {
    gauge!(POLICY_MISMATCH).set(if refusing { 1.0 } else { 0.0 });
}

/// Exports every Limiter method at 0 calls, with OK and each code it answers a failure with.
pub fn grpc_start() {
    for method in GRPC_METHODS {
        for code in GRPC_CODES_AT_START {
            counter!(GRPC_REQUESTS, "method" => method, "code" => code_name(code)).increment(0);
        }
    }
}

/// Counts one Limiter call of `method` (one of [`GRPC_METHODS`] or [`OTHER_METHOD`]) answered
/// with `code` after `elapsed`.
pub fn grpc_call(method: &'static str, code: tonic::Code, elapsed: Duration) {
    counter!(GRPC_REQUESTS, "method" => method, "code" => code_name(code)).increment(1);
    histogram!(GRPC_SECONDS, "method" => method).record(elapsed.as_secs_f64());
}

/// The name gRPC gives a status code (`INVALID_ARGUMENT`), the `code` label.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// The send governor (`[policy.throughput]`, `[policy.pair_rate]`, pacing, shadow mode).

/// How long paced admissions were held for their slot (`AdmitResponse.waited`).
pub const PACED_SECONDS: &str = "tiergate_paced_seconds";
/// What shadow mode would have answered, by `portfolio`, `decision` and `reason`.
pub const SHADOW_DECISIONS: &str = "tiergate_shadow_decisions_total";
/// Messages this sidecar admitted per number, by `portfolio` and `number`, while
/// `[policy.throughput]` is on: summed over sidecars, its rate is the number's throughput in use.
pub const THROUGHPUT_MESSAGES: &str = "tiergate_throughput_messages_total";
/// A number's throughput level in force (messages per second), by `portfolio` and `number`, while
/// `[policy.throughput]` is on: configured, else learnt from Meta, else `default_mps`.
pub const THROUGHPUT_MPS: &str = "tiergate_throughput_mps";

/// Buckets of [`PACED_SECONDS`]: a paced wait is a few ms at a number's throughput, and seconds
/// at a pair's rate.
const PACED_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Labels {
    /// The same labels, exporting the governor's per-number throughput series with `levels`
    /// (`None`: `[policy.throughput]` is off, and those series are not exported).
    pub fn with_throughput(mut self, levels: Option<ThroughputLevels>) -> Labels {
        self.throughput = levels;
        self
    }

    /// Whether a number with labels of its own has no [`THROUGHPUT_MPS`] yet while the
    /// throughput rule is on, so its level should be read and published.
    pub fn throughput_unknown(&self, portfolio: &str, number: &str) -> bool {
        if self.throughput.is_none() || !self.admit(portfolio, Some(number)) {
            return false;
        }
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active.get(portfolio).and_then(|a| a.scopes.get(number)).is_none_or(|g| g.throughput_mps.is_none())
    }
}

/// Exports at 0 what shadow mode would answer in each portfolio configured in shadow mode that
/// has labels of its own, so an alert sees its first would-be denial.
pub fn shadow_start<'a>(labels: &Labels, shadowed: impl IntoIterator<Item = &'a str>) {
    for portfolio in shadowed.into_iter().filter(|p| labels.admit(p, None)) {
        // A shadowed message is decided by the store, so it is never STORE_UNAVAILABLE.
        for reason in Reason::ALL.into_iter().filter(|r| *r != Reason::StoreUnavailable) {
            counter!(SHADOW_DECISIONS, "portfolio" => portfolio.to_owned(),
                "decision" => decision_label(reason.decision()), "reason" => reason_label(reason))
            .increment(0);
        }
    }
}

/// Counts what shadow mode would have answered for a message it admitted.
pub fn shadow_decision(labels: &Labels, portfolio: &str, would_be: Reason) {
    counter!(SHADOW_DECISIONS, "portfolio" => labels.portfolio(portfolio),
        "decision" => decision_label(would_be.decision()), "reason" => reason_label(would_be))
    .increment(1);
}

/// Records how long a paced admission was held.
pub fn paced(waited: Duration) {
    histogram!(PACED_SECONDS).record(waited.as_secs_f64());
}

/// Counts `messages` admitted from a number while the throughput rule is on. A number without
/// labels of its own is counted as `number="_other"` (and its portfolio as its label allows), so
/// sums by portfolio stay right.
pub fn throughput_messages(labels: &Labels, portfolio: &str, number: &str, messages: u64) {
    if labels.throughput.is_none() {
        return;
    }
    let (portfolio, number) = if labels.admit(portfolio, Some(number)) {
        (portfolio.to_owned(), number.to_owned())
    } else {
        (labels.portfolio(portfolio), OTHER.to_owned())
    };
    counter!(THROUGHPUT_MESSAGES, "portfolio" => portfolio, "number" => number).increment(messages);
}

/// Publishes a number's throughput level in force, with what Meta reported for it (`learnt`),
/// while the throughput rule is on; a folded number's is not exported.
pub fn throughput_level(labels: &Labels, portfolio: &str, number: &str, learnt: Option<u32>) {
    let Some(levels) = &labels.throughput else { return };
    let mps = levels.level(number, learnt);
    labels.gauges(portfolio, Some(number), false, |g| g.throughput_mps = Some(mps));
}

/// Appends the [`THROUGHPUT_MPS`] family of the active numbers to a scrape.
fn render_throughput_levels<'a>(
    out: &mut String,
    rows: impl Iterator<Item = (&'a String, &'a String, &'a ScopeGauges)>,
) {
    use std::fmt::Write as _;
    let mut family = String::new();
    for (p, n, g) in rows {
        if let Some(mps) = g.throughput_mps {
            let (p, n) = (sanitize_label_value(p), sanitize_label_value(n));
            let _ = writeln!(family, "{THROUGHPUT_MPS}{{portfolio=\"{p}\",number=\"{n}\"}} {mps}");
        }
    }
    if !family.is_empty() {
        let help = "Throughput level in force of a number (messages per second).";
        write_help_line(out, THROUGHPUT_MPS, None, None, help);
        write_type_line(out, THROUGHPUT_MPS, None, None, "gauge");
        out.push_str(&family);
        out.push('\n');
    }
}

/// Error codes of failed messages Meta reported (`statuses[].errors[].code`), by `code`.
pub const META_ERRORS: &str = "tiergate_meta_errors_total";
/// Throughput backoff episodes (Meta's error 130429), by `portfolio` and `number`.
pub const THROUGHPUT_BACKOFFS: &str = "tiergate_throughput_backoffs_total";

/// The most codes tiergate does not know that get a `code` label of their own; later ones share
/// [`OTHER_META_CODE`].
pub const MAX_UNKNOWN_META_CODES: usize = 32;
/// The `code` label the unknown codes beyond [`MAX_UNKNOWN_META_CODES`] share.
pub const OTHER_META_CODE: &str = "other";

/// Counts one error code Meta reported on a failed message.
pub fn meta_error(code: u32) {
    counter!(META_ERRORS, "code" => meta_code_label(code)).increment(1);
}

/// The `code` label of a Meta error code: its own for a code in [`MetaError::CODES`] and for the
/// first [`MAX_UNKNOWN_META_CODES`] others, so a signed webhook cannot add values without bound.
/// The codes seen are process-wide, as the recorder is.
fn meta_code_label(code: u32) -> String {
    static UNKNOWN: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
    if MetaError::from_code(code) != MetaError::Unknown {
        return code.to_string();
    }
    let mut unknown = UNKNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if unknown.contains(&code) || unknown.len() < MAX_UNKNOWN_META_CODES {
        unknown.insert(code);
        code.to_string()
    } else {
        OTHER_META_CODE.to_owned()
    }
}

/// Counts a throughput backoff episode of a number: under its own labels, else under the
/// portfolio's with `number="_other"`, else under [`OTHER`] for both.
pub fn throughput_backoff(labels: &Labels, portfolio: &str, number: &str) {
    let (portfolio, number) = if !labels.admit(portfolio, None) {
        (OTHER, OTHER)
    } else if labels.admit(portfolio, Some(number)) {
        (portfolio, number)
    } else {
        (portfolio, OTHER)
    };
    counter!(THROUGHPUT_BACKOFFS, "portfolio" => portfolio.to_owned(), "number" => number.to_owned()).increment(1);
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
        assert!(labels.admit("first", None));
        assert!(!labels.admit("second", None), "gauges of folded portfolios are not exported");
        // Numbers are bounded too, and only within labelled portfolios.
        assert!(labels.admit("first", Some("n1")));
        assert!(labels.admit("first", Some("n2")));
        assert!(!labels.admit("first", Some("n3")));
        assert!(labels.admit("first", Some("n1")));
        assert!(!labels.admit("second", Some("n1")));
        assert!(labels.admit("first", Some("")), "the portfolio's own scope");
    }

    fn scope(portfolio: &str, sender: Option<&str>) -> ScopeKey {
        ScopeKey { portfolio: portfolio.to_owned(), sender: sender.map(str::to_owned) }
    }

    fn snapshot(counted: u64, limit: Limit) -> UsageSnapshot {
        let tier = crate::policy::Tier { name: "T".into(), limit };
        UsageSnapshot { tier, counted, next_slot_at: None }
    }

    #[test]
    fn scope_gauges_are_exported_while_their_portfolio_is_active_and_dropped_once_idle() {
        let labels = Labels::new(2, []);
        usage(&labels, &scope("acme", None), &snapshot(3, Limit::Limited(250)));
        usage(&labels, &scope("beta", Some("n\"1")), &snapshot(1, Limit::Unlimited));
        usage(&labels, &scope("folded", None), &snapshot(9, Limit::Limited(1)));
        let mut out = String::new();
        labels.render(&mut out);
        assert!(out.contains("# TYPE tiergate_unique_recipients gauge\n"), "{out}");
        assert!(out.contains("tiergate_unique_recipients{portfolio=\"acme\",sender=\"\"} 3\n"), "{out}");
        assert!(out.contains("tiergate_limit{portfolio=\"acme\",sender=\"\"} 250\n"), "{out}");
        assert!(out.contains("tiergate_limit{portfolio=\"beta\",sender=\"n\\\"1\"} +Inf\n"), "escaped: {out}");
        assert!(!out.contains("folded"), "{out}");
        assert!(!out.contains("tiergate_quality"), "only what was published: {out}");
        assert_eq!(
            labels.active(),
            [("acme".to_string(), vec![String::new()]), ("beta".to_string(), vec!["n\"1".to_string()])]
        );

        // The refresh publishes without marking the portfolio seen, so it is forgotten.
        std::thread::sleep(Duration::from_millis(30));
        labels.seen("beta");
        refreshed_usage(&labels, &scope("acme", None), &snapshot(0, Limit::Limited(250)));
        assert_eq!(labels.forget_idle(Duration::from_millis(20)), 1);
        let mut out = String::new();
        labels.render(&mut out);
        assert!(!out.contains("acme"), "a forgotten portfolio is no longer exported: {out}");
        assert!(out.contains("portfolio=\"beta\""), "{out}");
    }

    #[test]
    fn reason_labels_are_the_api_names() {
        for reason in Reason::ALL {
            assert_eq!(reason_label(reason), reason.as_str().to_ascii_uppercase());
        }
        assert_eq!(decision_label(Decision::Denied), "DENIED");
    }

    #[test]
    fn throughput_levels_are_exported_per_number_only_when_the_rule_is_on_and_numbers_fold() {
        let state = PortfolioState {
            senders: [(
                "n1".to_owned(),
                crate::store::SenderState { throughput_mps: Some(1000), ..Default::default() },
            )]
            .into(),
            ..Default::default()
        };
        let off = Labels::new(2, []);
        portfolio(&off, "acme", &state);
        assert!(!off.throughput_unknown("acme", "n2"), "nothing to read while the rule is off");
        let mut out = String::new();
        off.render(&mut out);
        assert!(!out.contains(THROUGHPUT_MPS), "{out}");

        let rule = crate::policy::rate::ThroughputRule { default_mps: 80, burst: Duration::ZERO };
        let levels = ThroughputLevels { rule: Some(rule), numbers: [("n2".to_owned(), 20)].into() };
        let on = Labels::new(2, []).with_throughput(Some(levels));
        assert!(on.throughput_unknown("acme", "n1"));
        portfolio(&on, "acme", &state);
        assert!(!on.throughput_unknown("acme", "n1"), "published by the read of its portfolio");
        throughput_level(&on, "acme", "n2", Some(1000));
        throughput_level(&on, "acme", "n3", None);
        assert!(!on.throughput_unknown("acme", "n3"), "a folded number is never read");
        let mut out = String::new();
        on.render(&mut out);
        assert!(out.contains("# TYPE tiergate_throughput_mps gauge\n"), "{out}");
        assert!(out.contains("tiergate_throughput_mps{portfolio=\"acme\",number=\"n1\"} 1000\n"), "learnt: {out}");
        assert!(out.contains("tiergate_throughput_mps{portfolio=\"acme\",number=\"n2\"} 20\n"), "configured: {out}");
        assert!(!out.contains("n3"), "beyond metrics.max_portfolios numbers: {out}");
        on.forget_idle(Duration::ZERO);
        let mut out = String::new();
        on.render(&mut out);
        assert!(!out.contains(THROUGHPUT_MPS), "dropped with its idle portfolio: {out}");
    }

    #[test]
    fn meta_codes_tiergate_knows_keep_their_label_and_unknown_ones_are_bounded() {
        assert_eq!(meta_code_label(130429), "130429");
        let labels: Vec<String> =
            (0..MAX_UNKNOWN_META_CODES as u32 + 10).map(|i| meta_code_label(900_000 + i)).collect();
        let own = labels.iter().filter(|l| *l != OTHER_META_CODE).count();
        assert!(own <= MAX_UNKNOWN_META_CODES, "{labels:?}");
        assert_eq!(labels.last().map(String::as_str), Some(OTHER_META_CODE), "{labels:?}");
        assert_eq!(meta_code_label(131049), "131049", "known codes never fold");
        if own > 0 {
            assert_eq!(meta_code_label(900_000), "900000", "an unknown code keeps the label it got");
        }
    }
}
