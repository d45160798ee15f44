//! The differential test: random sequences of store calls, run on every backend (memory, a real
//! Redis, a real three-master Redis Cluster) and on the reference model in `model.rs`, which
//! must agree on every answer: decision, reason, lease, `retry_after`, pacing `wait`, `shadow`,
//! usage, `next_slot_at`, projections' counts and the portfolio's state.
//!
//! A failing case shrinks to a minimal sequence, printed with the step where the store and the
//! model part ways. Cases per backend: `PROPTEST_CASES` (defaults below); the generator's seed
//! is fixed so every run of `./scripts/test` tries the same cases, and `DIFFERENTIAL_SEED=random`
//! (or a number) explores new ones in long runs.
//!
//! Redis plays them twice: with the window layout sidecars use, and with tiny buckets and chunks
//! that make a few recipients cross every split, merge, rebase and chunk boundary.
//!
//! Time: the memory store runs on a manual clock that `Wait` steps move by fractions of its 24 h
//! window; the Redis stores take time from Redis `TIME` with a window of a few tens of
//! milliseconds, and `Wait` steps sleep. Either way the model is told the store's own clock for
//! each call (every answer carries it), so answers are compared exactly. The send rates are slow
//! enough (at most 50 messages per second, pairs of seconds) to deny within a handful of calls on
//! either clock; on memory a `Wait` of an eighth or more lets every schedule run out.

#[path = "../common/mod.rs"]
mod common;
mod model;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

use tiergate::hashing::RecipientHasher;
use tiergate::policy::rate::{PairRule, ThroughputRule, THROUGHPUT_BACKOFF};
use tiergate::policy::{
    Category, Decision, Delivery, Lease, Micros, Mode, Quality, Reason, ScopeKey, SenderStatus, Tier,
};
use tiergate::store::memory::MemoryStore;
use tiergate::store::redis::{RedisStore, Topology, WindowLayout};
use tiergate::store::{AdmitOp, AdmitParams, Change, Clock, Rates, Store, SystemClock, Windows};

use common::stores;
use model::Model;

// ---------------------------------------------------------------------------------------------------------
// The world a sequence plays in: a few of everything, so names collide and rules interact.
// ---------------------------------------------------------------------------------------------------------

const PORTFOLIOS: [&str; 2] = ["p0", "p1:eu"];
const SENDERS: [&str; 3] = ["15550001", "15550002", "15550003"];
const RECIPIENTS: [&str; 5] =
    ["14155550100", "14155550101", "4915112345678", "US.13491208655302741918", "447700900123"];
const TEMPLATES: [&str; 3] = ["welcome", "otp:en", "promo"];
/// Template languages; a message or a status may also name none (a status then sets every language).
const LANGUAGES: [&str; 3] = ["en_US", "pt_BR", "es"];
const TEMPLATE_STATUSES: [&str; 6] = ["APPROVED", "PAUSED", "DISABLED", "FLAGGED", "REINSTATED", "PENDING_DELETION"];
const SENDER_STATUSES: [SenderStatus; 5] = [
    SenderStatus::Connected,
    SenderStatus::Banned,
    SenderStatus::Flagged,
    SenderStatus::Offline,
    SenderStatus::Pending,
];
const QUALITIES: [Quality; 4] = [Quality::High, Quality::Medium, Quality::Low, Quality::Unknown];
const CATEGORIES: [Category; 5] =
    [Category::Unspecified, Category::Marketing, Category::Utility, Category::Authentication, Category::Service];
/// Basis points kept from marketing: none, some, almost all (the cap rounds to one), all.
const RESERVES: [u32; 5] = [0, 3_000, 5_000, 9_999, 10_000];
/// How long a message may wait for its rates: not at all (mostly), a few throughput slots, or
/// long enough to pace past a pair's burst. Stores answer the wait without sleeping, so long
/// waits cost no time.
const MAX_WAITS: [Duration; 6] = [
    Duration::ZERO,
    Duration::ZERO,
    Duration::from_millis(3),
    Duration::from_millis(30),
    Duration::from_secs(5),
    Duration::from_secs(60),
];
/// Levels Meta may report for a number: its own (80, 1,000, 20 with the app) and a few slow
/// enough to deny within one Admit.
const LEARNT_MPS: [u32; 5] = [80, 1_000, 20, 2, 10];
/// How long ago Meta's feedback happened: a few ms, or exactly one throughput backoff (which
/// then ends now).
const FEEDBACK_AGO: [Duration; 4] =
    [Duration::from_millis(1), Duration::from_millis(5), Duration::from_millis(20), THROUGHPUT_BACKOFF];

/// Tiers a scope can be given, and fallbacks a call can pass: limits at and near 0, 1 and the
/// cap, and unlimited.
fn tier(i: u8) -> Tier {
    match i % 5 {
        0 => Tier::limited("T1", 1),
        1 => Tier::limited("T2", 2),
        2 => Tier::limited("T3", 3),
        3 => Tier::unlimited("TIER_UNLIMITED"),
        _ => Tier::limited("T0", 0),
    }
}

fn fallback(i: u8) -> Tier {
    match i % 4 {
        0 => Tier::limited("F1", 1),
        1 => Tier::limited("F2", 2),
        2 => Tier::limited("F4", 4),
        _ => Tier::unlimited("FU"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Steps, as generated (indices into the world) and shrunk.
// ---------------------------------------------------------------------------------------------------------

/// A limit scope: a portfolio, or one of its numbers in per-number scope.
#[derive(Debug, Clone, Copy)]
struct Sel {
    portfolio: u8,
    number: Option<u8>,
}

/// One message of an Admit or AdmitBatch.
#[derive(Debug, Clone, Copy)]
struct Msg {
    sender: Option<u8>,
    recipient: u8,
    category: u8,
    template: Option<u8>,
    /// The sender is blocked by configuration.
    blocked: bool,
    /// The template's language (none: the message may be in any).
    language: Option<u8>,
    /// The idempotency key, from a pool small enough that keys repeat, with the same recipient
    /// (a retry) or another (the key wins).
    key: Option<u8>,
    /// How long it may wait for its rates ([`MAX_WAITS`]).
    max_wait: u8,
    /// Its number's configured throughput level.
    mps: Option<u8>,
}

/// The rate rules and mode an Admit call passes.
#[derive(Debug, Clone, Copy)]
struct Rules {
    /// Throughput: default messages per second, and burst in ms; slow, so one Admit is denied.
    throughput: Option<(u8, u8)>,
    /// Pair rate: interval in seconds, and burst.
    pair: Option<(u8, u8)>,
    shadow: bool,
}

const NO_RULES: Rules = Rules { throughput: None, pair: None, shadow: false };

fn throughput_rule((mps, burst_ms): (u8, u8)) -> ThroughputRule {
    ThroughputRule { default_mps: u32::from(mps), burst: Duration::from_millis(u64::from(burst_ms)) }
}

fn pair_rule((interval_s, burst): (u8, u8)) -> PairRule {
    PairRule { interval: Duration::from_secs(u64::from(interval_s)), burst: u32::from(burst) }
}

/// When Meta's feedback happened: now (`None`), or [`FEEDBACK_AGO`] before.
type Ago = Option<u8>;

/// When an event happened, relative to the backend's clock, in eighths of its window.
#[derive(Debug, Clone, Copy)]
enum When {
    Now,
    Ago(u8),
    Ahead(u8),
}

#[derive(Debug, Clone, Copy)]
enum Chg {
    Tier {
        number: Option<u8>,
        tier: u8,
        at: When,
    },
    Eligible {
        number: Option<u8>,
        since: Option<u8>,
    },
    Flagged {
        number: Option<u8>,
        since: Option<u8>,
    },
    Quality(u8),
    SenderStatus {
        sender: u8,
        status: u8,
        at: When,
    },
    SenderQuality {
        sender: u8,
        quality: u8,
    },
    TemplateStatus {
        template: u8,
        language: Option<u8>,
        status: u8,
        at: When,
    },
    TemplateQuality {
        template: u8,
        language: Option<u8>,
        quality: u8,
    },
    OptOut {
        recipient: u8,
        opted_out: bool,
    },
    Alert {
        key: u8,
        body: u8,
    },
    Alias {
        display: u8,
        id: u8,
    },
    Inbound {
        sender: u8,
        recipient: u8,
        at: When,
    },
    Throughput {
        sender: u8,
        level: u8,
    },
    /// A message of the number's outside Admit, at its throughput rule and configured level.
    Traffic {
        sender: u8,
        throughput: (u8, u8),
        mps: Option<u8>,
        at: Ago,
    },
    /// Meta's 130429 for a number.
    ThroughputBackoff {
        sender: u8,
        at: Ago,
    },
    /// Meta's 131056 for a (number, user) pair, at its pair rule.
    PairBackoff {
        sender: u8,
        recipient: u8,
        pair: (u8, u8),
        at: Ago,
    },
    /// Meta's 131049 for a recipient.
    MarketingCapped {
        recipient: u8,
        at: When,
    },
    /// The portfolio's mode: configured, enforce, shadow.
    Mode(u8),
    /// A delivery status of a message to a recipient in a scope of this portfolio.
    Delivery {
        number: Option<u8>,
        recipient: u8,
        failed: bool,
        at: When,
    },
}

#[derive(Debug, Clone)]
enum Step {
    /// Admit (one message) or AdmitBatch (several) in one scope.
    Admit {
        scope: Sel,
        fallback: u8,
        reserve: u8,
        rules: Rules,
        msgs: Vec<Msg>,
    },
    /// Release the n-th lease handed out so far (modulo their number): valid, stale or twice.
    Release {
        lease: u8,
    },
    /// Release a lease nobody was given.
    ReleaseForged {
        scope: Sel,
        recipient: u8,
        score_offset: u8,
    },
    Apply {
        portfolio: u8,
        changes: Vec<Chg>,
    },
    Usage {
        scope: Sel,
        fallback: u8,
    },
    Portfolio {
        portfolio: u8,
    },
    /// Let time pass: eighths of the backend's window.
    Wait {
        eighths: u8,
    },
}

fn sel() -> impl Strategy<Value = Sel> {
    (0..2u8, proptest::option::weighted(0.3, 0..3u8)).prop_map(|(portfolio, number)| Sel { portfolio, number })
}

fn when() -> impl Strategy<Value = When> {
    prop_oneof![4 => Just(When::Now), 1 => (0..12u8).prop_map(When::Ago), 1 => (1..4u8).prop_map(When::Ahead)]
}

fn msg() -> impl Strategy<Value = Msg> {
    (
        proptest::option::weighted(0.7, 0..3u8),
        0..5u8,
        0..5u8,
        proptest::option::weighted(0.4, 0..3u8),
        proptest::bool::weighted(0.05),
        proptest::option::weighted(0.6, 0..3u8),
        proptest::option::weighted(0.3, 0..3u8),
        0..6u8,
        proptest::option::weighted(0.15, 1..=50u8),
    )
        .prop_map(|(sender, recipient, category, template, blocked, language, key, max_wait, mps)| Msg {
            sender,
            recipient,
            category,
            template,
            blocked,
            language,
            key,
            max_wait,
            mps,
        })
}

/// Throughput slow enough (at most 50 messages per second, a burst of at most 50 ms) that one
/// Admit or a few in a row are denied, on Redis too.
fn throughput() -> impl Strategy<Value = (u8, u8)> {
    (1..=50u8, 0..=50u8)
}

/// Pair intervals of seconds and bursts of a few messages.
fn pair() -> impl Strategy<Value = (u8, u8)> {
    (1..=10u8, 1..=3u8)
}

fn rules() -> impl Strategy<Value = Rules> {
    (
        proptest::option::weighted(0.5, throughput()),
        proptest::option::weighted(0.5, pair()),
        proptest::bool::weighted(0.15),
    )
        .prop_map(|(throughput, pair, shadow)| Rules { throughput, pair, shadow })
}

fn ago() -> impl Strategy<Value = Ago> {
    proptest::option::weighted(0.5, 0..4u8)
}

fn chg() -> impl Strategy<Value = Chg> {
    let number = || proptest::option::weighted(0.3, 0..3u8);
    let since = || proptest::option::of(1..4u8);
    let language = || proptest::option::weighted(0.7, 0..3u8);
    prop_oneof![
        3 => (number(), 0..5u8, when()).prop_map(|(number, tier, at)| Chg::Tier { number, tier, at }),
        1 => (number(), since()).prop_map(|(number, since)| Chg::Eligible { number, since }),
        1 => (number(), since()).prop_map(|(number, since)| Chg::Flagged { number, since }),
        1 => (0..4u8).prop_map(Chg::Quality),
        3 => (0..3u8, 0..5u8, when()).prop_map(|(sender, status, at)| Chg::SenderStatus { sender, status, at }),
        1 => (0..3u8, 0..4u8).prop_map(|(sender, quality)| Chg::SenderQuality { sender, quality }),
        3 => (0..3u8, language(), 0..6u8, when())
            .prop_map(|(template, language, status, at)| Chg::TemplateStatus { template, language, status, at }),
        1 => (0..3u8, language(), 0..4u8)
            .prop_map(|(template, language, quality)| Chg::TemplateQuality { template, language, quality }),
        3 => (0..5u8, any::<bool>()).prop_map(|(recipient, opted_out)| Chg::OptOut { recipient, opted_out }),
        1 => (0..2u8, 0..2u8).prop_map(|(key, body)| Chg::Alert { key, body }),
        1 => (0..2u8, 0..3u8).prop_map(|(display, id)| Chg::Alias { display, id }),
        5 => (0..3u8, 0..5u8, when()).prop_map(|(sender, recipient, at)| Chg::Inbound { sender, recipient, at }),
        1 => (0..3u8, 0..5u8).prop_map(|(sender, level)| Chg::Throughput { sender, level }),
        2 => (0..3u8, throughput(), proptest::option::weighted(0.3, 1..=50u8), ago())
            .prop_map(|(sender, throughput, mps, at)| Chg::Traffic { sender, throughput, mps, at }),
        3 => (0..3u8, ago()).prop_map(|(sender, at)| Chg::ThroughputBackoff { sender, at }),
        2 => (0..3u8, 0..5u8, pair(), ago())
            .prop_map(|(sender, recipient, pair, at)| Chg::PairBackoff { sender, recipient, pair, at }),
        3 => (0..5u8, when()).prop_map(|(recipient, at)| Chg::MarketingCapped { recipient, at }),
        1 => (0..3u8).prop_map(Chg::Mode),
        6 => (proptest::option::weighted(0.3, 0..3u8), 0..5u8, any::<bool>(), when())
            .prop_map(|(number, recipient, failed, at)| Chg::Delivery { number, recipient, failed, at }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => (sel(), 0..4u8, prop_oneof![3 => Just(0u8), 1 => 0..5u8], rules(), proptest::collection::vec(msg(), 1..5))
            .prop_map(|(scope, fallback, reserve, rules, msgs)| Step::Admit { scope, fallback, reserve, rules, msgs }),
        3 => any::<u8>().prop_map(|lease| Step::Release { lease }),
        1 => (sel(), 0..5u8, 0..3u8)
            .prop_map(|(scope, recipient, score_offset)| Step::ReleaseForged { scope, recipient, score_offset }),
        5 => (0..2u8, proptest::collection::vec(chg(), 1..4))
            .prop_map(|(portfolio, changes)| Step::Apply { portfolio, changes }),
        2 => (sel(), 0..4u8).prop_map(|(scope, fallback)| Step::Usage { scope, fallback }),
        2 => (0..2u8).prop_map(|portfolio| Step::Portfolio { portfolio }),
        2 => (0..11u8).prop_map(|eighths| Step::Wait { eighths }),
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(step(), 1..40)
}

// ---------------------------------------------------------------------------------------------------------
// Backends.
// ---------------------------------------------------------------------------------------------------------

/// A clock that moves only when told to.
struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.0.load(Ordering::SeqCst)
    }
}

/// 2026-11-22T10:00:00Z: late enough in a day that waits cross midnight.
const START: Micros = 1_795_341_600_000_000;

/// One fresh, empty store of a backend, and how its time moves.
struct Subject {
    store: Arc<dyn Store>,
    windows: Windows,
    clock: Option<Arc<ManualClock>>,
}

impl Subject {
    fn now(&self) -> Micros {
        match &self.clock {
            Some(c) => c.now(),
            None => SystemClock.now(),
        }
    }

    fn eighths(&self, n: u8) -> Duration {
        self.windows.window * u32::from(n) / 8
    }

    async fn wait(&self, n: u8) {
        let d = self.eighths(n);
        match &self.clock {
            Some(c) => {
                c.0.fetch_add(tiergate::policy::micros(d), Ordering::SeqCst);
            }
            None => tokio::time::sleep(d).await,
        }
    }

    fn at(&self, when: When) -> Option<Micros> {
        match when {
            When::Now => None,
            When::Ago(n) => Some(self.now().saturating_sub(tiergate::policy::micros(self.eighths(n)))),
            When::Ahead(n) => Some(self.now() + tiergate::policy::micros(self.eighths(n))),
        }
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn memory() -> Subject {
    let windows = Windows { window: DAY, service_window: DAY + DAY / 4 };
    let clock = Arc::new(ManualClock(AtomicU64::new(START)));
    Subject { store: Arc::new(MemoryStore::with_clock(windows, clock.clone())), windows, clock: Some(clock) }
}

/// Short windows, so sequences see contacts and service windows expire in real time.
const REDIS_WINDOWS: Windows = Windows { window: Duration::from_millis(60), service_window: Duration::from_millis(90) };

/// A store on `topology` under a key prefix of its own, so every case starts empty.
fn redis_subject(topology: Topology) -> Subject {
    redis_subject_with(topology, WindowLayout::default())
}

/// Buckets of about one recipient, chunks of two contacts within 5 ms, and buckets rebased every
/// 130 ms (the least a 60 ms window allows): a handful of recipients then splits and merges
/// buckets, rebases them, and fills, empties and skips chunks, all of which the default layout
/// does only at thousands of recipients or over days.
const TINY: WindowLayout = WindowLayout { load: 1, chunk: 2, chunk_span: 5_000, bucket_span: 130_000 };

fn redis_subject_with(topology: Topology, layout: WindowLayout) -> Subject {
    let opts = stores::redis_options(topology, REDIS_WINDOWS, &stores::unique_prefix("diff"));
    let store = RedisStore::new(opts).and_then(|s| s.with_layout(layout)).expect("valid options");
    Subject { store: Arc::new(store), windows: REDIS_WINDOWS, clock: None }
}

// ---------------------------------------------------------------------------------------------------------
// Running a sequence against a store and the model.
// ---------------------------------------------------------------------------------------------------------

fn hasher() -> RecipientHasher {
    RecipientHasher::new(b"differential-test-hash-key").unwrap()
}

fn scope(s: Sel) -> ScopeKey {
    ScopeKey { portfolio: PORTFOLIOS[usize::from(s.portfolio)].to_owned(), sender: s.number.map(sender) }
}

fn sender(i: u8) -> String {
    SENDERS[usize::from(i) % SENDERS.len()].to_owned()
}

fn recipient(i: u8) -> &'static str {
    RECIPIENTS[usize::from(i) % RECIPIENTS.len()]
}

fn template(i: u8) -> String {
    TEMPLATES[usize::from(i) % TEMPLATES.len()].to_owned()
}

/// A language's code; none is "" (every language) in a change.
fn language(i: Option<u8>) -> String {
    i.map(|i| LANGUAGES[usize::from(i) % LANGUAGES.len()].to_owned()).unwrap_or_default()
}

fn admit_op(h: &RecipientHasher, m: &Msg) -> AdmitOp {
    let r = recipient(m.recipient);
    AdmitOp {
        member: h.recipient(r),
        service_member: m.sender.map(|s| h.service_window(&sender(s), r)),
        category: CATEGORIES[usize::from(m.category) % CATEGORIES.len()],
        template: m.template.map(template),
        sender: m.sender.map(sender),
        sender_blocked: m.blocked,
        // As the limiter asks: a language only with a template.
        template_language: m.template.and(m.language).map(|l| language(Some(l))),
        idempotency_key: m.key.map(|k| h.idempotency_key(&format!("msg-{k}"))),
        max_wait: MAX_WAITS[usize::from(m.max_wait) % MAX_WAITS.len()],
        throughput_mps: m.mps.map(u32::from),
    }
}

fn admit_params(f: u8, reserve: u8, rules: &Rules) -> AdmitParams {
    AdmitParams {
        rates: Rates { throughput: rules.throughput.map(throughput_rule), pair: rules.pair.map(pair_rule) },
        mode: if rules.shadow { Mode::Shadow } else { Mode::Enforce },
        ..AdmitParams::new(fallback(f), RESERVES[usize::from(reserve) % RESERVES.len()])
    }
}

fn change(subject: &Subject, h: &RecipientHasher, portfolio: u8, c: &Chg) -> Change {
    let scope_of = |number: Option<u8>| scope(Sel { portfolio, number });
    let since = |s: Option<u8>| s.map(|k| START + u64::from(k) * 1_000_000);
    let ago = |a: Ago| {
        a.map(|i| {
            subject.now().saturating_sub(tiergate::policy::micros(FEEDBACK_AGO[usize::from(i) % FEEDBACK_AGO.len()]))
        })
    };
    match *c {
        Chg::Tier { number, tier: t, at } => {
            Change::Tier { scope: scope_of(number), tier: tier(t), at: subject.at(at) }
        }
        Chg::Eligible { number, since: s } => Change::Eligible { scope: scope_of(number), since: since(s) },
        Chg::Flagged { number, since: s } => Change::Flagged { scope: scope_of(number), since: since(s) },
        Chg::Quality(q) => Change::Quality(QUALITIES[usize::from(q) % 4]),
        Chg::SenderStatus { sender: s, status, at } => Change::SenderStatus {
            sender: sender(s),
            status: SENDER_STATUSES[usize::from(status) % SENDER_STATUSES.len()],
            at: subject.at(at),
        },
        Chg::SenderQuality { sender: s, quality } => {
            Change::SenderQuality { sender: sender(s), quality: QUALITIES[usize::from(quality) % 4] }
        }
        Chg::TemplateStatus { template: t, language: l, status, at } => Change::TemplateStatus {
            name: template(t),
            language: language(l),
            status: TEMPLATE_STATUSES[usize::from(status) % TEMPLATE_STATUSES.len()].to_owned(),
            at: subject.at(at),
        },
        Chg::TemplateQuality { template: t, language: l, quality } => Change::TemplateQuality {
            name: template(t),
            language: language(l),
            quality: QUALITIES[usize::from(quality) % 4],
        },
        Chg::OptOut { recipient: r, opted_out } => Change::OptOut { member: h.recipient(recipient(r)), opted_out },
        Chg::Alert { key, body } => {
            Change::Alert { key: format!("ALERT_{key}"), body: format!("{{\"alert\":{body}}}") }
        }
        Chg::Alias { display, id } => Change::Alias { display: format!("+1 555 000{display}"), id: format!("id{id}") },
        Chg::Inbound { sender: s, recipient: r, at } => {
            Change::Inbound { service_member: h.service_window(&sender(s), recipient(r)), at: subject.at(at) }
        }
        Chg::Throughput { sender: s, level } => {
            Change::Throughput { sender: sender(s), mps: LEARNT_MPS[usize::from(level) % LEARNT_MPS.len()] }
        }
        Chg::Traffic { sender: s, throughput, mps, at } => Change::Traffic {
            sender: sender(s),
            rule: throughput_rule(throughput),
            configured_mps: mps.map(u32::from),
            at: ago(at),
        },
        Chg::ThroughputBackoff { sender: s, at } => Change::ThroughputBackoff { sender: sender(s), at: ago(at) },
        Chg::PairBackoff { sender: s, recipient: r, pair, at } => {
            Change::PairBackoff { pair: h.service_window(&sender(s), recipient(r)), rule: pair_rule(pair), at: ago(at) }
        }
        Chg::MarketingCapped { recipient: r, at } => {
            Change::MarketingCapped { member: h.recipient(recipient(r)), at: subject.at(at) }
        }
        Chg::Mode(m) => Change::Mode([None, Some(Mode::Enforce), Some(Mode::Shadow)][usize::from(m) % 3]),
        Chg::Delivery { number, recipient: r, failed, at } => Change::Delivery {
            scope: scope_of(number),
            member: h.recipient(recipient(r)),
            status: if failed { Delivery::Failed } else { Delivery::Delivered },
            at: subject.at(at),
        },
    }
}

/// How often each outcome came up, so a run shows (and checks) that it reached every rule.
type Seen = std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>;

fn saw(seen: &Seen, what: &'static str) {
    *seen.lock().unwrap().entry(what).or_default() += 1;
}

/// Plays `steps` on a fresh store and the model; the first disagreement is the error.
async fn play(subject: Subject, steps: &[Step], seen: &Seen) -> Result<(), String> {
    let h = hasher();
    let mut model = Model::new(subject.windows);
    let mut leases: Vec<Lease> = Vec::new();
    let store = &*subject.store;
    for (i, step) in steps.iter().enumerate() {
        let differ = |got: &dyn std::fmt::Debug, want: &dyn std::fmt::Debug| {
            format!("step {i} ({step:?}):\n  store: {got:?}\n  model: {want:?}")
        };
        let failed = |e: tiergate::store::StoreError| format!("step {i} ({step:?}): store call failed: {e}");
        match step {
            Step::Admit { scope: s, fallback: f, reserve, rules, msgs } => {
                let key = scope(*s);
                let params = admit_params(*f, *reserve, rules);
                let ops: Vec<AdmitOp> = msgs.iter().map(|m| admit_op(&h, m)).collect();
                let got = store.admit(&key, &params, &ops).await.map_err(failed)?;
                for a in &got {
                    saw(seen, a.reason.as_str());
                    if a.replay_of.is_some() {
                        saw(seen, "replayed under its key");
                    }
                    if !a.wait.is_zero() {
                        saw(seen, "paced");
                    }
                    match a.shadow {
                        Some(r) if r.decision() == Decision::Denied => saw(seen, "shadow admitted a denial"),
                        Some(_) => saw(seen, "shadow"),
                        None => {}
                    }
                }
                let now = got.first().map_or(0, |a| a.now);
                let want = model.admit(now, &key, &params, &ops);
                if got != want {
                    return Err(differ(&got, &want));
                }
                for (a, op) in got.iter().zip(&ops) {
                    if let Some(score) = a.lease_score {
                        // A replay's lease names the recipient of the Admit it replays.
                        let member = a.replay_of.clone().unwrap_or_else(|| op.member.clone());
                        leases.push(Lease { scope: key.clone(), member, score });
                    }
                }
            }
            Step::Release { lease } => {
                let Some(lease) = leases.get(usize::from(*lease) % leases.len().max(1)) else { continue };
                let got = store.release(lease).await.map_err(failed)?;
                saw(seen, if got { "release given back" } else { "release refused" });
                let want = model.release(subject.now(), lease);
                if got != want {
                    return Err(differ(&got, &want));
                }
            }
            Step::ReleaseForged { scope: s, recipient: r, score_offset } => {
                let last = leases.last().map_or(subject.now(), |l| l.score);
                let lease = Lease {
                    scope: scope(*s),
                    member: h.recipient(recipient(*r)),
                    score: last + u64::from(*score_offset) + 1,
                };
                let got = store.release(&lease).await.map_err(failed)?;
                let want = model.release(subject.now(), &lease);
                if got != want {
                    return Err(differ(&got, &want));
                }
            }
            Step::Apply { portfolio, changes } => {
                let id = PORTFOLIOS[usize::from(*portfolio)];
                let changes: Vec<Change> = changes.iter().map(|c| change(&subject, &h, *portfolio, c)).collect();
                let now = store.apply(id, &changes).await.map_err(failed)?;
                model.apply(now, id, &changes);
            }
            Step::Usage { scope: s, fallback: f } => {
                let key = scope(*s);
                let got = store.usage(&key, &fallback(*f)).await.map_err(failed)?;
                let want = model.usage(got.now, &key, &fallback(*f));
                if got != want {
                    return Err(differ(&got, &want));
                }
            }
            Step::Portfolio { portfolio } => {
                let id = PORTFOLIOS[usize::from(*portfolio)];
                let got = store.portfolio(id).await.map_err(failed)?;
                let want = model.portfolio(id);
                if got != want {
                    return Err(differ(&got, &want));
                }
            }
            Step::Wait { eighths } => subject.wait(*eighths).await,
        }
    }
    Ok(())
}

/// Cases per backend: `PROPTEST_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The generator's seed: fixed, so every run tries the same cases, unless `DIFFERENTIAL_SEED` says
/// `random` or names another.
fn seed() -> RngSeed {
    match std::env::var("DIFFERENTIAL_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(n) => RngSeed::Fixed(n.parse().expect("DIFFERENTIAL_SEED is `random` or a number")),
        Err(_) => RngSeed::Fixed(0x7165_7267_6174_6501),
    }
}

/// Sequences that once made a store and the model disagree, as the generator shrank them, and a
/// few that random cases rarely reach, each with the outcomes it must reach (so it still tests
/// what it names); every backend plays them before the random ones.
fn regressions() -> Vec<(&'static str, Vec<Step>, &'static [&'static str])> {
    let one = |recipient| Msg {
        sender: None,
        recipient,
        category: 0,
        template: None,
        blocked: false,
        language: None,
        key: None,
        max_wait: 0,
        mps: None,
    };
    let keyed = |recipient, key| Msg { key: Some(key), ..one(recipient) };
    let portfolio = Sel { portfolio: 0, number: None };
    let promo = |language| Msg { template: Some(2), language, ..one(0) };
    let status = |language, status| Chg::TemplateStatus { template: 2, language, status, at: When::Now };
    let from = |sender, recipient| Msg { sender: Some(sender), category: 2, ..one(recipient) };
    let paced = |max_wait, m: Msg| Msg { max_wait, ..m };
    let to = |category, recipient| Msg { category, ..one(recipient) };
    let unlimited = 3;
    // An Admit in the whole portfolio, with no reserve, and no rates (`admit`) or these rules.
    let with = |fallback, rules, msgs| Step::Admit { scope: portfolio, fallback, reserve: 0, rules, msgs };
    let admit = |fallback, msgs| with(fallback, NO_RULES, msgs);
    let pair = Rules { pair: Some((6, 3)), ..NO_RULES };
    let ten_per_second = Rules { throughput: Some((10, 0)), ..NO_RULES };
    let shadow = Rules { shadow: true, ..NO_RULES };
    vec![
        (
            // The memory store's sweep forgot a scope with no contact left, and with it the keys
            // that replay once their recipient is counted again.
            "a key replays after its slot was given back and its recipient counted again, however long the scope was idle",
            vec![
                admit(1, vec![keyed(2, 0)]),
                Step::Release { lease: 0 },
                Step::Wait { eighths: 1 },
                admit(1, vec![one(2)]),
                admit(1, vec![keyed(0, 0)]),
            ],
            &[],
        ),
        (
            "an idempotency key replays what it counted, also for another recipient, until the slot is given back",
            vec![
                admit(1, vec![keyed(0, 0), keyed(0, 0)]),
                admit(1, vec![keyed(1, 0), keyed(1, 1)]),
                admit(1, vec![keyed(2, 2)]),
                Step::Release { lease: 0 },
                admit(1, vec![keyed(0, 0), keyed(2, 2)]),
                Step::Wait { eighths: 8 },
                admit(1, vec![keyed(0, 0)]),
            ],
            &[],
        ),
        (
            "a key whose last decision took nothing replays nothing, even once its first recipient is counted again",
            vec![
                admit(0, vec![keyed(0, 0)]),
                Step::Release { lease: 0 },
                admit(0, vec![one(1)]),
                admit(0, vec![keyed(0, 0)]),
                Step::Release { lease: 1 },
                admit(0, vec![one(0)]),
                admit(0, vec![keyed(0, 0)]),
            ],
            &[],
        ),
        (
            // On Redis a tie needs two statuses in one call, which random cases rarely make.
            "a status for every language and one for a language at the same time: the language's own is in force",
            vec![
                Step::Apply { portfolio: 0, changes: vec![status(None, 1), status(Some(0), 0)] },
                admit(2, vec![promo(Some(0)), promo(Some(1))]),
                admit(2, vec![promo(None)]),
                Step::Portfolio { portfolio: 0 },
            ],
            &[],
        ),
        (
            "a message without a language is blocked when one language is, until a newer status for every language",
            vec![
                Step::Apply { portfolio: 0, changes: vec![status(Some(1), 2), status(Some(0), 0)] },
                admit(2, vec![promo(None), promo(Some(0))]),
                Step::Wait { eighths: 1 },
                Step::Apply { portfolio: 0, changes: vec![status(None, 4)] },
                admit(2, vec![promo(None), promo(Some(1))]),
            ],
            &[],
        ),
        (
            // Redis answered `retry_after` = 1 ms (a hot retry loop) where nothing counted would
            // ever leave: a limit or marketing cap of 0 frees nothing for a whole window.
            "a full scope with nothing counted says retry after a window",
            vec![
                Step::Apply { portfolio: 0, changes: vec![Chg::Tier { number: None, tier: 4, at: When::Now }] },
                admit(0, vec![one(0)]),
                Step::Apply { portfolio: 0, changes: vec![Chg::Tier { number: None, tier: 0, at: When::Now }] },
                Step::Admit { scope: portfolio, fallback: 0, reserve: 4, rules: NO_RULES, msgs: vec![one(1)] },
            ],
            &[],
        ),
        (
            // Redis kept contacts that had left the window while the tier was unlimited, so a
            // stale lease still "gave back" a slot.
            "a contact that left the window cannot be released after an unlimited admit",
            vec![
                admit(0, vec![one(0)]),
                Step::Wait { eighths: 8 },
                admit(3, vec![one(0)]),
                Step::Release { lease: 0 },
            ],
            &[],
        ),
        (
            // Above a lowered limit, room comes back when the count drops below it, not when
            // the oldest contact leaves: Redis pointed at the oldest.
            "after a downgrade new recipients wait until the count drops below the new limit",
            vec![
                admit(1, vec![one(0), one(1)]),
                admit(0, vec![one(0)]),
                admit(0, vec![one(2)]),
            ],
            &[],
        ),
        (
            "a burst to one user borrows the intervals it skips: past it, a message waits or is denied PAIR_RATE",
            vec![
                with(unlimited, pair, vec![from(0, 0); 4]),
                with(unlimited, pair, vec![from(1, 0), paced(5, from(0, 0)), from(0, 0)]),
            ],
            &["pair_rate", "paced"],
        ),
        (
            // 100 ms apart: waits of 0, 100 and 200 ms, then 300 ms, too long for 30 ms.
            "paced messages reserve their slots: one that waits less is denied THROUGHPUT_EXCEEDED, taking none",
            vec![with(
                unlimited,
                ten_per_second,
                vec![
                    paced(4, from(0, 0)),
                    paced(4, from(0, 1)),
                    paced(4, from(0, 2)),
                    paced(3, from(0, 3)),
                    paced(4, from(0, 3)),
                ],
            )],
            &["paced", "throughput_exceeded"],
        ),
        (
            "shadow mode admits a message the limit denies and reports it, until the portfolio is set to enforce",
            vec![
                with(0, shadow, vec![one(0), one(1)]),
                Step::Apply { portfolio: 0, changes: vec![Chg::Mode(1)] },
                with(0, shadow, vec![one(2)]),
                Step::Portfolio { portfolio: 0 },
            ],
            &["shadow admitted a denial", "limit_reached"],
        ),
        (
            "a recipient Meta capped gets nothing that may be marketing for a day, but utility goes",
            vec![
                Step::Apply { portfolio: 0, changes: vec![Chg::MarketingCapped { recipient: 0, at: When::Now }] },
                admit(unlimited, vec![to(1, 0), to(2, 0), to(0, 0), to(1, 1)]),
                Step::Wait { eighths: 8 },
                admit(unlimited, vec![to(1, 0)]),
            ],
            &["recipient_marketing_capped"],
        ),
    ]
}

/// Plays the regression sequences, then `cases` random ones, on fresh stores from `make`, and
/// panics with the shrunk sequence that makes a store and the model disagree.
fn differential(name: &str, default_cases: u32, make: impl Fn() -> Subject) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Redis stores spawn their connection tasks on the current runtime.
    let _entered = runtime.enter();
    let case = AtomicU64::new(0);
    for (what, steps, reaches) in regressions() {
        case.fetch_add(1, Ordering::SeqCst);
        let subject = make();
        let seen = Seen::default();
        if let Err(why) = runtime.block_on(play(subject, &steps, &seen)) {
            panic!("{name}: regression \"{what}\" is back: {why}");
        }
        let seen = seen.into_inner().unwrap();
        let missing: Vec<&str> = reaches.iter().copied().filter(|what| !seen.contains_key(what)).collect();
        assert!(missing.is_empty(), "{name}: regression \"{what}\" no longer reaches {missing:?}");
    }
    let config = Config {
        cases: cases(default_cases),
        rng_seed: seed(),
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..Config::default()
    };
    let seen = Seen::default();
    let runner_cases = config.cases;
    let mut runner = TestRunner::new(config);
    let result = runner.run(&steps(), |steps| {
        case.fetch_add(1, Ordering::SeqCst);
        let subject = make();
        runtime.block_on(play(subject, &steps, &seen)).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {
            let seen = seen.into_inner().unwrap();
            eprintln!("{name}: {} cases agreed with the model; outcomes: {seen:?}", case.load(Ordering::SeqCst));
            // A generator that stopped reaching a rule would leave that rule unchecked.
            // Every reason a store gives (STORE_UNAVAILABLE is the limiter's, when a store fails).
            let missing: Vec<&str> = Reason::ALL
                .iter()
                .filter(|r| **r != Reason::StoreUnavailable)
                .map(|r| r.as_str())
                .chain(["release given back", "release refused", "replayed under its key", "paced", "shadow"])
                .chain(["shadow admitted a denial"])
                .filter(|what| !seen.contains_key(what))
                .collect();
            // (Only for runs long enough to reach them: a quick PROPTEST_CASES=5 run may not.)
            if runner_cases >= 100 {
                assert!(missing.is_empty(), "{name}: no case reached {missing:?}; the generator needs new weights");
            }
        }
        Err(TestError::Fail(why, steps)) => {
            let listed: Vec<String> = steps.iter().map(|s| format!("  {s:?}")).collect();
            panic!("{name} disagrees with the model.\nMinimal sequence:\n{}\nat {why}", listed.join("\n"))
        }
        Err(TestError::Abort(why)) => panic!("{name}: the run was aborted: {why}"),
    }
}

#[test]
fn the_memory_store_agrees_with_the_model() {
    differential("memory", 1_000, memory);
}

#[test]
fn redis_agrees_with_the_model() {
    let server = stores::shared_redis();
    differential("redis", 256, || redis_subject(stores::standalone(&server)));
}

#[test]
fn redis_with_tiny_buckets_and_chunks_agrees_with_the_model() {
    let server = stores::shared_redis();
    differential("redis (tiny layout)", 256, || redis_subject_with(stores::standalone(&server), TINY));
}

#[test]
fn redis_cluster_agrees_with_the_model() {
    let cluster = stores::shared_cluster();
    differential("redis cluster", 128, || redis_subject(stores::cluster_of(&cluster)));
}
