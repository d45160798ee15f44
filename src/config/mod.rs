//! Configuration: a TOML file, then `TIERGATE_<SECTION>_<KEY>` environment variables (see
//! [`env`]), then flags; validated once at start-up into [`Settings`], with errors that name the
//! offending key. Each component's own keys are resolved beside it (the Redis topology in
//! [`store::redis`](crate::store::redis)).

mod env;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::hashing::{RecipientHasher, MIN_KEY_LEN};
use crate::policy::rate::{PairRule, ThroughputLevels, ThroughputRule};
use crate::policy::{self, Ladder, Limit, Mode, Ruleset, ScopeMode, Tier};
use crate::store::redis::{RedisOptions, Topology, TopologyConfig};
use crate::store::{Rates, Windows};

/// A configuration error, naming the key (or environment variable) at fault.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), message: message.into() }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub policy: PolicyConfig,
    /// Static per-portfolio settings.
    pub portfolios: Vec<PortfolioConfig>,
    pub webhooks: WebhooksConfig,
    pub metrics: MetricsConfig,
}

/// `[webhooks]`: Meta's WhatsApp webhooks on the admin server; without both secrets the
/// endpoint answers 404.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The Meta app secret that signs deliveries (X-Hub-Signature-256).
    pub app_secret: Option<String>,
    /// The token Meta echoes when the subscription is verified.
    pub verify_token: Option<String>,
}

/// Where tiers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierSource {
    /// Only webhooks, SetTier, UpdatePortfolio and the config change tiers.
    #[default]
    Authoritative,
    /// tiergate applies the ruleset's upgrades and downgrades itself (sandboxes, planning).
    Simulate,
}

/// `[policy.reserve]`: shares of the limit kept from a category.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReserveConfig {
    /// Share of the limit (0 to <1) that marketing to new recipients may not use.
    pub marketing: f64,
}

/// `[policy.throughput]`: each phone number's messages per second, shared by every sidecar.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThroughputConfig {
    /// Off by default: a number Meta upgraded to 1,000 before tiergate saw its webhook must not be
    /// held to 80 by surprise.
    pub enabled: bool,
    /// Messages per second of a number neither listed in `numbers` nor upgraded by a webhook.
    pub default_mps: u32,
    /// How far ahead of its rate a number may run after a quiet spell (a burst of `burst × mps`).
    #[serde(with = "humantime_serde")]
    pub burst: Duration,
    /// Phone number id → messages per second, winning over what webhooks report.
    pub numbers: BTreeMap<String, u32>,
}

impl Default for ThroughputConfig {
    fn default() -> Self {
        ThroughputConfig {
            enabled: false,
            default_mps: policy::DEFAULT_THROUGHPUT_MPS,
            burst: Duration::from_millis(100),
            numbers: BTreeMap::new(),
        }
    }
}

/// `[policy.pair_rate]`: how often one number may message one user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairRateConfig {
    pub enabled: bool,
    /// One message per this, from a number to a user (Meta: 6 s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Messages allowed inside one interval, borrowing the intervals they skip (Meta: 45).
    pub burst: u32,
}

impl Default for PairRateConfig {
    fn default() -> Self {
        PairRateConfig { enabled: true, interval: Duration::from_secs(6), burst: 45 }
    }
}

/// `[server]`: where to listen and how to stop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The gRPC API (Limiter, health, reflection).
    pub grpc_listen: SocketAddr,
    /// HTTP: /metrics, /livez, /readyz.
    pub admin_listen: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// When set, SetTier, SetOptOut, UpdatePortfolio and RecordInbound need
    /// `authorization: Bearer <token>`.
    pub admin_token: Option<String>,
    /// When set, every other Limiter call needs `authorization: Bearer <token>` (this token or
    /// `admin_token`); health and reflection stay open.
    pub sender_token: Option<String>,
    /// Which portfolios Admit, AdmitBatch, RecordInbound, GetUsage and GetPortfolio serve.
    pub portfolios: PortfolioAccess,
    /// The largest request accepted: a gRPC message (RESOURCE_EXHAUSTED above it) or a webhook
    /// body (413 above it).
    pub max_request_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_listen: ([127, 0, 0, 1], 50051).into(),
            admin_listen: ([127, 0, 0, 1], 9477).into(),
            shutdown_grace: Duration::from_secs(10),
            admin_token: None,
            sender_token: None,
            portfolios: PortfolioAccess::Any,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// The shortest API token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

impl ServerConfig {
    /// Checks the API tokens: each one that is set can be sent as `Bearer <token>` and is hard to
    /// guess, and the two roles hold different tokens. Errors name the key, never the token.
    fn check_tokens(&self) -> Result<(), ConfigError> {
        for (key, token) in [("server.admin_token", &self.admin_token), ("server.sender_token", &self.sender_token)] {
            let Some(token) = token else { continue };
            // gRPC metadata carries visible ASCII only; a space would end the token early.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(key, "must be visible ASCII without spaces or other whitespace"));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(err(key, format!("must be at least {MIN_TOKEN_LEN} characters")));
            }
        }
        if self.sender_token.is_some() && self.sender_token == self.admin_token {
            return Err(err(
                "server.sender_token",
                "must differ from server.admin_token: every sender holding it could also change portfolios and \
                 open service windows",
            ));
        }
        Ok(())
    }
}

/// `server.portfolios`: whom the sending and reading calls serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortfolioAccess {
    /// Any well-formed portfolio id.
    #[default]
    Any,
    /// Only portfolios listed in `[[portfolios]]` or known to the store (a tier, numbers,
    /// templates, opt-outs… set for them); others are answered NOT_FOUND.
    Configured,
}

/// The default of `server.max_request_bytes`: gRPC's customary 4 MiB, which holds the largest
/// valid request (an AdmitBatch of 1,000 messages with 512-byte templates and 128-character ids
/// is about 1 MiB) and Meta's largest webhook deliveries (up to 3 MB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The smallest `server.max_request_bytes`: room for any single valid Admit.
const MIN_MAX_REQUEST_BYTES: usize = 4 * 1024;

/// `[metrics]`: what `/metrics` exports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// The most portfolios (and the most numbers) with label values of their own; the rest are
    /// folded into `portfolio="_other"` (counters) or not exported (gauges).
    pub max_portfolios: usize,
    /// How often the gauges of the portfolios this sidecar has seen lately are read again from
    /// the store, so they follow contacts leaving the window without anyone calling GetUsage.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { max_portfolios: 1_000, refresh_interval: Duration::from_secs(15) }
    }
}

/// Which store backend holds the windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In this process only.
    #[default]
    Memory,
    /// Shared through Redis (standalone, Sentinel or Cluster).
    Redis,
}

/// What Admit does when the store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Fail the call with UNAVAILABLE, so no message goes out unchecked.
    #[default]
    Deny,
    /// Admit, log a warning and count it.
    Allow,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: Backend,
    /// `redis://`, `rediss://`, or `redis+sentinel://[user:pass@]host:port[,host:port]/master[/db]`.
    pub url: Option<String>,
    /// Treat `url` as a seed node of a Redis Cluster.
    pub cluster: bool,
    /// Sentinel addresses (`host:port` or `redis://host:port`), with `master_name`.
    pub sentinels: Vec<String>,
    pub master_name: Option<String>,
    /// Secret for hashing recipients; at least 16 bytes; the same on every sidecar of a store.
    pub hash_key: Option<String>,
    /// Bound on connecting to and each call into the store.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub on_error: OnError,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// How long persisted state (tiers, statuses, templates, opt-outs) outlives the portfolio's
    /// last activity. Long, because forgetting an opt-out is worse than keeping a few bytes.
    #[serde(with = "humantime_serde")]
    pub state_ttl: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Memory,
            url: None,
            cluster: false,
            sentinels: Vec::new(),
            master_name: None,
            hash_key: None,
            timeout: Duration::from_millis(250),
            on_error: OnError::Deny,
            key_prefix: "tg".into(),
            state_ttl: Duration::from_secs(400 * 24 * 3600),
        }
    }
}

/// A ladder: a preset name or a list of tiers.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a preset name (\"meta-2025\" or \"legacy\") or a list of tiers like [{ name = \"T5\", limit = 5 }]"
)]
pub enum LadderConfig {
    Preset(String),
    Custom(Vec<TierConfig>),
}

/// One tier of a custom ladder; no `limit` means unlimited.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub name: String,
    pub limit: Option<u64>,
}

/// `[policy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub scope: ScopeMode,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub service_window: Duration,
    pub ladder: LadderConfig,
    /// The tier of a scope nobody set; the ladder's first tier when absent.
    pub default_tier: Option<String>,
    pub reserve: ReserveConfig,
    pub tier_source: TierSource,
    /// Legacy ruleset: unique recipients in 7 days, as a multiple of the limit, to move up.
    pub legacy_threshold: f64,
    /// How often a simulating sidecar re-evaluates the scopes it has seen.
    #[serde(with = "humantime_serde")]
    pub simulate_interval: Duration,
    /// `enforce`, or `shadow`: evaluate and report every rule, admit every message.
    pub mode: Mode,
    pub throughput: ThroughputConfig,
    pub pair_rate: PairRateConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let day = Duration::from_secs(24 * 3600);
        PolicyConfig {
            scope: ScopeMode::Portfolio,
            window: day,
            service_window: day,
            ladder: LadderConfig::Preset("meta-2025".into()),
            default_tier: None,
            reserve: ReserveConfig::default(),
            tier_source: TierSource::Authoritative,
            legacy_threshold: 0.5,
            simulate_interval: Duration::from_secs(60),
            mode: Mode::Enforce,
            throughput: ThroughputConfig::default(),
            pair_rate: PairRateConfig::default(),
        }
    }
}

/// `[[portfolios]]`: what is known of one portfolio up front.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortfolioConfig {
    pub id: String,
    /// A static tier (SetTier, UpdatePortfolio and webhooks still win).
    pub tier: Option<String>,
    /// WhatsApp Business Account ids whose webhooks belong to this portfolio.
    #[serde(default)]
    pub wabas: Vec<String>,
    /// Sender ids whose messages are always denied (SENDER_BLOCKED).
    #[serde(default)]
    pub blocked_senders: Vec<String>,
    /// This portfolio's mode, winning over `policy.mode` (UpdatePortfolio wins over both).
    pub mode: Option<Mode>,
}

impl Config {
    /// Reads the file (if any) and applies `TIERGATE_<SECTION>_<KEY>` variables from `env`.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut doc = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| err(p.display().to_string(), e.to_string()))?;
                parse_toml(&text).map_err(|m| err(p.display().to_string(), m))?
            }
            None => toml::Table::new(),
        };
        let origins = env::overlay(&mut doc, env)?;
        Config::from_table(doc, &origins)
    }

    /// Parses TOML text without the environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_table(parse_toml(text).map_err(|m| err("config", m))?, &BTreeMap::new())
    }

    /// Deserializes the merged table; `origins` names the variable behind each key the
    /// environment set, so an error there names the variable to fix.
    fn from_table(doc: toml::Table, origins: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { "config".to_string() } else { key };
            // Serde quotes the offending value; for a secret that would print the secret.
            let message = if SECRET_KEYS.contains(&key.as_str()) {
                "must be a string".to_string()
            } else {
                e.into_inner().message().to_string()
            };
            err(origins.get(&key).cloned().unwrap_or(key), message)
        })
    }
}

/// Keys whose values never appear in an error message.
const SECRET_KEYS: [&str; 6] = [
    "store.hash_key",
    "store.url",
    "webhooks.app_secret",
    "webhooks.verify_token",
    "server.admin_token",
    "server.sender_token",
];

/// Parses TOML, reporting syntax errors by line without quoting the line, which may hold a secret.
fn parse_toml(text: &str) -> Result<toml::Table, String> {
    text.parse::<toml::Table>().map_err(|e| {
        let line = e.span().and_then(|span| text.get(..span.start)).map(|before| before.matches('\n').count() + 1);
        match line {
            Some(line) => format!("TOML syntax error on line {line}: {}", e.message()),
            None => format!("TOML syntax error: {}", e.message()),
        }
    })
}

/// The highest throughput a number may be configured with: far above Meta's 1,000.
const MAX_MPS: u32 = 100_000;

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerConfig,
    pub scope: ScopeMode,
    pub windows: Windows,
    pub ladder: Ladder,
    pub default_tier: Tier,
    /// Static tiers by portfolio id.
    pub portfolio_tiers: BTreeMap<String, Tier>,
    pub store: StoreSettings,
    pub on_error: OnError,
    /// Basis points of the limit kept from marketing to new recipients.
    pub reserve_bp: u32,
    pub tier_source: TierSource,
    pub ruleset: Ruleset,
    pub simulate_interval: Duration,
    /// WABA id → portfolio id.
    pub wabas: BTreeMap<String, String>,
    /// Portfolio id → senders blocked by configuration.
    pub blocked_senders: BTreeMap<String, BTreeSet<String>>,
    /// Set when both webhook secrets are.
    pub webhooks: Option<WebhookSettings>,
    /// Every `[[portfolios]]` id, in the order listed.
    pub portfolios: Vec<String>,
    pub metrics: MetricsConfig,
    /// The rate rules in force (`[policy.throughput]`, `[policy.pair_rate]`).
    pub rates: Rates,
    /// Each number's throughput level (`[policy.throughput]`, on or off, and its `numbers`).
    pub throughput: ThroughputLevels,
    /// `policy.mode`.
    pub mode: Mode,
    /// `[[portfolios]] mode`, by portfolio id.
    pub portfolio_modes: BTreeMap<String, Mode>,
    /// How long persisted state outlives a portfolio's last activity (`store.state_ttl`).
    pub state_ttl: Duration,
}

/// Secrets of the webhook endpoint.
#[derive(Clone)]
pub struct WebhookSettings {
    pub app_secret: String,
    pub verify_token: String,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSettings { .. }")
    }
}

/// The store to build.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// The embedded store; `hasher` is random when no key was configured.
    Memory {
        hasher: RecipientHasher,
        generated_key: bool,
    },
    Redis {
        hasher: RecipientHasher,
        options: RedisOptions,
    },
}

impl StoreSettings {
    /// The recipient hasher for this store.
    pub fn hasher(&self) -> &RecipientHasher {
        match self {
            StoreSettings::Memory { hasher, .. } | StoreSettings::Redis { hasher, .. } => hasher,
        }
    }
}

impl Config {
    /// Checks every key and resolves the ladder, tiers and store.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let p = &self.policy;
        if p.window.is_zero() {
            return Err(err("policy.window", "must be longer than zero"));
        }
        if p.service_window.is_zero() {
            return Err(err("policy.service_window", "must be longer than zero"));
        }
        let ladder = match &p.ladder {
            LadderConfig::Preset(name) => Ladder::preset(name).ok_or_else(|| {
                err(
                    "policy.ladder",
                    format!("unknown preset {name:?}; use one of {:?} or a list of tiers", policy::LADDER_PRESETS),
                )
            })?,
            LadderConfig::Custom(tiers) => Ladder::custom(
                tiers
                    .iter()
                    .map(|t| Tier { name: t.name.clone(), limit: t.limit.map_or(Limit::Unlimited, Limit::Limited) })
                    .collect(),
            )
            .map_err(|m| err("policy.ladder", m))?,
        };
        let tier = |key: &str, name: &str| {
            ladder
                .get(name)
                .cloned()
                .ok_or_else(|| err(key, format!("unknown tier {name:?}; the ladder has {}", ladder.names())))
        };
        let default_tier = match &p.default_tier {
            Some(name) => tier("policy.default_tier", name)?,
            None => ladder.tiers()[0].clone(),
        };
        let mut portfolio_tiers = BTreeMap::new();
        let mut wabas = BTreeMap::new();
        let mut blocked_senders = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let mut portfolio_modes = BTreeMap::new();
        for (i, pf) in self.portfolios.iter().enumerate() {
            if let Some(mode) = pf.mode {
                portfolio_modes.insert(pf.id.clone(), mode);
            }
            let key = format!("portfolios[{i}]");
            policy::validate_id(&pf.id).map_err(|m| err(format!("{key}.id"), m))?;
            if !seen.insert(pf.id.clone()) {
                return Err(err(format!("{key}.id"), format!("portfolio {:?} is listed twice", pf.id)));
            }
            if let Some(name) = &pf.tier {
                portfolio_tiers.insert(pf.id.clone(), tier(&format!("{key}.tier"), name)?);
            }
            for (j, waba) in pf.wabas.iter().enumerate() {
                policy::validate_id(waba).map_err(|m| err(format!("{key}.wabas[{j}]"), m))?;
                if let Some(other) = wabas.insert(waba.clone(), pf.id.clone()) {
                    return Err(err(format!("{key}.wabas[{j}]"), format!("WABA {waba:?} also belongs to {other:?}")));
                }
            }
            for (j, sender) in pf.blocked_senders.iter().enumerate() {
                policy::validate_id(sender).map_err(|m| err(format!("{key}.blocked_senders[{j}]"), m))?;
            }
            if !pf.blocked_senders.is_empty() {
                blocked_senders.insert(pf.id.clone(), pf.blocked_senders.iter().cloned().collect());
            }
        }
        let reserve = p.reserve.marketing;
        if !(0.0..1.0).contains(&reserve) {
            return Err(err("policy.reserve.marketing", format!("must be at least 0 and below 1, got {reserve}")));
        }
        if !(p.legacy_threshold > 0.0 && p.legacy_threshold.is_finite()) {
            return Err(err("policy.legacy_threshold", "must be a positive number"));
        }
        if p.simulate_interval.is_zero() {
            return Err(err("policy.simulate_interval", "must be longer than zero"));
        }
        if self.metrics.refresh_interval.is_zero() {
            return Err(err("metrics.refresh_interval", "must be longer than zero"));
        }
        // Today's ladder is Meta's portfolio-wide one: per number, each number would be given the
        // whole portfolio's limit, and together they would overshoot it.
        if p.scope == ScopeMode::PhoneNumber && ladder == Ladder::meta_2025() {
            return Err(err(
                "policy.scope",
                "\"phone_number\" gives each number its own limit, but policy.ladder \"meta-2025\" holds today's \
                 limits, which are shared by the whole portfolio; use scope = \"portfolio\", or the \"legacy\" \
                 (or a custom) ladder for per-number limits",
            ));
        }
        let reserve_bp = (reserve * 10_000.0).round() as u32;
        let smallest = ladder.tiers().iter().filter(|t| t.limit != Limit::Unlimited).min_by_key(|t| t.limit.to_i64());
        if let Some(t) = smallest.filter(|t| policy::marketing_cap(t.limit, reserve_bp) == Some(0)) {
            return Err(err(
                "policy.reserve.marketing",
                format!(
                    "{reserve} leaves marketing a cap of 0 new recipients on {} (the smallest tier of policy.ladder), \
                     so no campaign could ever start; keep it clearly below 1",
                    t.name
                ),
            ));
        }
        let ruleset = match &p.ladder {
            LadderConfig::Preset(name) if name == "legacy" => Ruleset::Legacy { threshold_ratio: p.legacy_threshold },
            _ => Ruleset::Meta2025,
        };
        let webhooks = match (&self.webhooks.app_secret, &self.webhooks.verify_token) {
            (Some(secret), Some(token)) if !secret.is_empty() && !token.is_empty() => {
                Some(WebhookSettings { app_secret: secret.clone(), verify_token: token.clone() })
            }
            (None, None) => None,
            (Some(_), _) => return Err(err("webhooks.verify_token", "is required with webhooks.app_secret")),
            (_, Some(_)) => return Err(err("webhooks.app_secret", "is required with webhooks.verify_token")),
        };
        self.server.check_tokens()?;
        if self.server.max_request_bytes < MIN_MAX_REQUEST_BYTES {
            return Err(err("server.max_request_bytes", format!("must be at least {MIN_MAX_REQUEST_BYTES}")));
        }
        let s = &self.store;
        if s.timeout.is_zero() {
            return Err(err("store.timeout", "must be longer than zero"));
        }
        if s.key_prefix.is_empty() || s.key_prefix.contains(['{', '}']) {
            return Err(err("store.key_prefix", "must be non-empty and contain no braces"));
        }
        let hasher = match &s.hash_key {
            Some(key) => Some(RecipientHasher::new(key.as_bytes()).map_err(|m| err("store.hash_key", m))?),
            None => None,
        };
        let windows = Windows { window: p.window, service_window: p.service_window };
        let store = match s.backend {
            Backend::Memory => match hasher {
                Some(hasher) => StoreSettings::Memory { hasher, generated_key: false },
                None => StoreSettings::Memory { hasher: RecipientHasher::random(), generated_key: true },
            },
            Backend::Redis => {
                let hasher = hasher.ok_or_else(|| {
                    err(
                        "store.hash_key",
                        format!(
                            "is required with the redis backend (at least {MIN_KEY_LEN} bytes, the same on every \
                             sidecar; set TIERGATE_STORE_HASH_KEY)"
                        ),
                    )
                })?;
                let options = RedisOptions {
                    topology: self.topology()?,
                    windows,
                    timeout: s.timeout,
                    state_ttl: s.state_ttl,
                    key_prefix: s.key_prefix.clone(),
                };
                StoreSettings::Redis { hasher, options }
            }
        };
        let rates = self.rates()?;
        Ok(Settings {
            server: self.server.clone(),
            scope: p.scope,
            windows,
            ladder,
            default_tier,
            portfolio_tiers,
            store,
            on_error: s.on_error,
            reserve_bp,
            tier_source: p.tier_source,
            ruleset,
            simulate_interval: p.simulate_interval,
            wabas,
            blocked_senders,
            webhooks,
            portfolios: self.portfolios.iter().map(|p| p.id.clone()).collect(),
            metrics: self.metrics.clone(),
            state_ttl: s.state_ttl,
            rates,
            throughput: ThroughputLevels { rule: rates.throughput, numbers: p.throughput.numbers.clone() },
            mode: p.mode,
            portfolio_modes,
        })
    }

    /// The rate rules: `[policy.throughput]` (checked whether on or not) and `[policy.pair_rate]`.
    fn rates(&self) -> Result<Rates, ConfigError> {
        let t = &self.policy.throughput;
        let mps = |key: String, mps: u32| {
            if (1..=MAX_MPS).contains(&mps) {
                Ok(())
            } else {
                Err(err(key, format!("must be 1 to {MAX_MPS} messages per second, got {mps}")))
            }
        };
        mps("policy.throughput.default_mps".into(), t.default_mps)?;
        for (id, n) in &t.numbers {
            policy::validate_id(id).map_err(|m| err("policy.throughput.numbers", m))?;
            mps(format!("policy.throughput.numbers.{id}"), *n)?;
        }
        if t.burst > Duration::from_secs(60) {
            return Err(err(
                "policy.throughput.burst",
                format!("must be at most 1m, got {}", humantime::format_duration(t.burst)),
            ));
        }
        let r = &self.policy.pair_rate;
        if r.enabled && !(Duration::from_millis(1)..=Duration::from_secs(24 * 3600)).contains(&r.interval) {
            return Err(err("policy.pair_rate.interval", "must be from 1ms to 24h"));
        }
        if r.enabled && !(1..=10_000).contains(&r.burst) {
            return Err(err("policy.pair_rate.burst", format!("must be 1 to 10000 messages, got {}", r.burst)));
        }
        Ok(Rates {
            throughput: t.enabled.then_some(ThroughputRule { default_mps: t.default_mps, burst: t.burst }),
            pair: r.enabled.then_some(PairRule { interval: r.interval, burst: r.burst }),
        })
    }

    fn topology(&self) -> Result<Topology, ConfigError> {
        let s = &self.store;
        let topology = TopologyConfig {
            url: s.url.as_deref(),
            cluster: s.cluster,
            sentinels: &s.sentinels,
            master_name: s.master_name.as_deref(),
        };
        topology.resolve().map_err(|e| err(format!("store.{}", e.key), e.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_validate_to_the_meta_ladder_on_memory() {
        let s = Config::default().validate().unwrap();
        assert_eq!(s.default_tier, Tier::limited("TIER_250", 250));
        assert!(matches!(s.store, StoreSettings::Memory { generated_key: true, .. }));
        assert_eq!(s.windows, Windows::default());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = Config::from_toml("[store]\nbakend = \"redis\"").unwrap_err();
        assert!(e.to_string().contains("bakend"), "{e}");
        let e = Config::from_toml("[store]\ntimeout = \"soon\"").unwrap_err();
        assert_eq!(e.key, "store.timeout");
        let e = Config::from_toml("[policy]\nscope = \"planet\"").unwrap_err();
        assert_eq!(e.key, "policy.scope");
    }

    #[test]
    fn env_overrides_the_file_and_unknown_env_keys_are_named() {
        let c = Config::load(None, env(&[("TIERGATE_STORE_HASH_KEY", "12345678901234567890"), ("TIERGATE_LOG", "x")]))
            .unwrap();
        assert_eq!(c.store.hash_key.as_deref(), Some("12345678901234567890"));
        let e = Config::load(None, env(&[("TIERGATE_STORE_URLL", "redis://x")])).unwrap_err();
        assert_eq!(e.key, "TIERGATE_STORE_URLL");
        let links =
            [("TIERGATE_STORE_SERVICE_HOST", "10.0.0.1"), ("TIERGATE_STORE_PORT_6379_TCP", "tcp://10.0.0.1:6379")];
        assert!(Config::load(None, env(&links)).is_ok(), "Kubernetes service links are not config");
        let e = Config::load(None, env(&[("TIERGATE_STORE_URLL", "redis://x")])).unwrap_err();
        assert_eq!(e.key, "TIERGATE_STORE_URLL");
        let c =
            Config::load(None, env(&[("TIERGATE_POLICY_WINDOW", "90s"), ("TIERGATE_STORE_CLUSTER", "true")])).unwrap();
        assert_eq!(c.policy.window, Duration::from_secs(90));
        assert!(c.store.cluster);
    }

    #[test]
    fn redis_needs_a_long_enough_hash_key() {
        let e = Config::from_toml("[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"").unwrap().validate();
        assert_eq!(e.unwrap_err().key, "store.hash_key");
        let e = Config::from_toml("[store]\nbackend = \"redis\"\nurl = \"redis://h\"\nhash_key = \"short\"")
            .unwrap()
            .validate();
        assert_eq!(e.unwrap_err().key, "store.hash_key");
    }

    #[test]
    fn ladders_resolve_presets_and_custom_lists() {
        let c = Config::from_toml("[policy]\nladder = \"legacy\"").unwrap().validate().unwrap();
        assert_eq!(c.default_tier.name, "TIER_1K");
        let c =
            Config::from_toml("[policy]\nladder = [{name=\"T5\", limit=5}, {name=\"UNL\"}]\ndefault_tier = \"UNL\"")
                .unwrap()
                .validate()
                .unwrap();
        assert_eq!(c.default_tier, Tier::unlimited("UNL"));
        let e = Config::from_toml("[policy]\ndefault_tier = \"TIER_1K\"").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "policy.default_tier");
        let e = Config::from_toml("[policy]\nladder = \"newest\"").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "policy.ladder");
    }

    #[test]
    fn portfolio_overrides_are_checked() {
        let c = Config::from_toml("[[portfolios]]\nid = \"acme\"\ntier = \"TIER_10K\"").unwrap().validate().unwrap();
        assert_eq!(c.portfolio_tiers["acme"].limit, Limit::Limited(10_000));
        let e = Config::from_toml("[[portfolios]]\nid = \"a b\"\ntier = \"TIER_10K\"").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "portfolios[0].id");
        let e = Config::from_toml("[[portfolios]]\nid = \"a\"\ntier = \"TIER_3\"").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "portfolios[0].tier");
    }

    #[test]
    fn errors_never_quote_secrets() {
        let e = Config::from_toml("[store]\nhash_key = \"super-secret-value\n").unwrap_err();
        assert!(e.to_string().contains("line 2") && !e.to_string().contains("super-secret"), "{e}");
        let e = Config::from_toml("[webhooks]\napp_secret = 123456789012345\n").unwrap_err();
        assert_eq!(e.key, "webhooks.app_secret");
        assert!(!e.to_string().contains("123456789012345"), "{e}");
        let e = Config::from_toml(
            "[store]\nbackend = \"redis\"\nurl = \"redis://:pw-123@h:1\"\nhash_key = \"0123456789abcdef\"\n",
        );
        let settings = e.unwrap().validate().unwrap();
        assert!(!format!("{settings:?}").contains("pw-123"), "{settings:?}");
    }

    #[test]
    fn lifecycle_settings_resolve() {
        let c = Config::from_toml(
            "[policy]\nladder = \"legacy\"\ntier_source = \"simulate\"\n[policy.reserve]\nmarketing = 0.1\n\
             [[portfolios]]\nid = \"acme\"\nwabas = [\"1001\", \"1002\"]\nblocked_senders = [\"555\"]\n\
             [webhooks]\napp_secret = \"s\"\nverify_token = \"t\"\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.reserve_bp, 1_000);
        assert_eq!(c.tier_source, TierSource::Simulate);
        assert_eq!(c.ruleset, Ruleset::Legacy { threshold_ratio: 0.5 });
        assert_eq!(c.wabas["1002"], "acme");
        assert!(c.blocked_senders["acme"].contains("555"));
        assert!(c.webhooks.is_some());
        let e = Config::from_toml("[policy.reserve]\nmarketing = 1.0").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "policy.reserve.marketing");
        let e = Config::from_toml("[webhooks]\napp_secret = \"s\"").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "webhooks.verify_token");
        let two = "[[portfolios]]\nid = \"a\"\nwabas = [\"1\"]\n[[portfolios]]\nid = \"b\"\nwabas = [\"1\"]\n";
        assert_eq!(Config::from_toml(two).unwrap().validate().unwrap_err().key, "portfolios[1].wabas[0]");
    }

    #[test]
    fn redis_topologies_parse() {
        let base = "[store]\nbackend = \"redis\"\nhash_key = \"0123456789abcdef\"\n";
        let topo = |extra: &str| match Config::from_toml(&format!("{base}{extra}")).unwrap().validate() {
            Ok(Settings { store: StoreSettings::Redis { options, .. }, .. }) => Ok(options.topology),
            Ok(_) => panic!("not redis"),
            Err(e) => Err(e),
        };
        assert_eq!(topo("url = \"redis://h:1\"").unwrap(), Topology::Standalone { url: "redis://h:1".into() });
        assert_eq!(
            topo("url = \"redis://h:1\"\ncluster = true").unwrap(),
            Topology::Cluster { nodes: vec!["redis://h:1".into()] }
        );
        assert_eq!(
            topo("url = \"redis+sentinel://:pw@s1:26379,s2:26379/mymaster/2\"").unwrap(),
            Topology::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                master_name: "mymaster".into(),
                master_url: Some("redis://:pw@localhost/2".into()),
            }
        );
        assert_eq!(topo("sentinels = [\"s1:26379\"]").unwrap_err().key, "store.master_name");
        assert_eq!(topo("").unwrap_err().key, "store.url");
        assert_eq!(topo("url = \"http://h\"").unwrap_err().key, "store.url");
    }

    #[test]
    fn bounds_on_callers_resolve() {
        let s = Config::default().validate().unwrap();
        assert_eq!(s.server.portfolios, PortfolioAccess::Any);
        assert_eq!(s.server.max_request_bytes, 4 << 20);
        assert_eq!(s.metrics.max_portfolios, 1_000);
        let s = Config::from_toml(
            "[server]\nportfolios = \"configured\"\nmax_request_bytes = 65536\n[metrics]\nmax_portfolios = 5\n\
             [[portfolios]]\nid = \"b\"\n[[portfolios]]\nid = \"a\"\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!((s.server.portfolios, s.server.max_request_bytes), (PortfolioAccess::Configured, 65_536));
        assert_eq!((s.metrics.max_portfolios, s.portfolios), (5, vec!["b".to_string(), "a".to_string()]));
        let c = Config::load(None, env(&[("TIERGATE_METRICS_MAX_PORTFOLIOS", "7")])).unwrap();
        assert_eq!(c.metrics.max_portfolios, 7);
        assert_eq!(s.metrics.refresh_interval, Duration::from_secs(15));
        let c = Config::load(None, env(&[("TIERGATE_METRICS_REFRESH_INTERVAL", "200ms")])).unwrap();
        assert_eq!(c.metrics.refresh_interval, Duration::from_millis(200));
        let e = Config::from_toml("[metrics]\nrefresh_interval = \"0s\"").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "metrics.refresh_interval");
        let e = Config::from_toml("[server]\nmax_request_bytes = 100").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "server.max_request_bytes");
        assert_eq!(Config::from_toml("[server]\nportfolios = \"some\"").unwrap_err().key, "server.portfolios");
    }

    #[test]
    fn settings_that_cannot_be_meant_are_rejected_naming_the_keys() {
        let e = Config::from_toml("[policy]\nscope = \"phone_number\"").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "policy.scope");
        assert!(e.to_string().contains("policy.ladder") && e.to_string().contains("meta-2025"), "{e}");
        let e = Config::from_toml("[policy]\nscope = \"phone_number\"\nladder = \"meta-2025\"").unwrap().validate();
        assert_eq!(e.unwrap_err().key, "policy.scope");
        assert!(Config::from_toml("[policy]\nscope = \"phone_number\"\nladder = \"legacy\"")
            .unwrap()
            .validate()
            .is_ok());
        let custom = "[policy]\nscope = \"phone_number\"\nladder = [{name=\"T5\", limit=5}]";
        assert!(Config::from_toml(custom).unwrap().validate().is_ok());
        // A reserve so close to 1 that marketing to new recipients could never be sent.
        let e = Config::from_toml("[policy.reserve]\nmarketing = 0.99999").unwrap().validate().unwrap_err();
        assert_eq!(e.key, "policy.reserve.marketing");
        assert!(e.to_string().contains("TIER_250") && e.to_string().contains("policy.ladder"), "{e}");
        assert!(Config::from_toml("[policy.reserve]\nmarketing = 0.99").unwrap().validate().is_ok());
    }

    #[test]
    fn api_tokens_come_from_the_environment_and_are_checked_without_being_quoted() {
        let tokens = |sender: &str, admin: &str| {
            Config::load(None, env(&[("TIERGATE_SERVER_SENDER_TOKEN", sender), ("TIERGATE_SERVER_ADMIN_TOKEN", admin)]))
                .unwrap()
                .validate()
        };
        let s = tokens("sender-token-0123456789", "admin-token-0123456789").unwrap();
        assert_eq!(s.server.sender_token.as_deref(), Some("sender-token-0123456789"));
        assert_eq!(s.server.admin_token.as_deref(), Some("admin-token-0123456789"));
        for (sender, admin, key) in [
            ("", "admin-token-0123456789", "server.sender_token"),
            ("sender token 0123456789", "admin-token-0123456789", "server.sender_token"),
            ("sender-token-0123456789", "admin-token-0123456789\n", "server.admin_token"),
            ("sender-token-0123456789", "short-admin", "server.admin_token"),
            ("sender-token-0123456789", "sender-token-0123456789", "server.sender_token"),
        ] {
            let e = tokens(sender, admin).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(!e.to_string().contains(admin.trim()) && !e.to_string().contains("0123456789"), "{e}");
        }
        let e = Config::from_toml("[server]\nsender_token = 12345678901234567\n").unwrap_err();
        assert_eq!(e.key, "server.sender_token");
        assert!(!e.to_string().contains("12345678901234567"), "{e}");
    }

    #[test]
    fn the_send_governor_is_configured_with_throughput_off_and_pair_rate_on_by_default() {
        let s = Config::default().validate().unwrap();
        assert_eq!(s.rates.throughput, None, "a number Meta upgraded must not be held to 80 by surprise");
        assert_eq!(s.rates.pair, Some(PairRule { interval: Duration::from_secs(6), burst: 45 }));
        assert_eq!((s.mode, s.portfolio_modes.len()), (Mode::Enforce, 0));

        let toml = "[policy]\nmode = \"shadow\"\n\n[policy.throughput]\nenabled = true\ndefault_mps = 80\n\
                    burst = \"0s\"\nnumbers = { \"1001\" = 1000 }\n\n[policy.pair_rate]\ninterval = \"10s\"\n\
                    burst = 3\n\n[[portfolios]]\nid = \"acme\"\nmode = \"enforce\"\n";
        let s = Config::from_toml(toml).unwrap().validate().unwrap();
        assert_eq!(s.rates.throughput, Some(ThroughputRule { default_mps: 80, burst: Duration::ZERO }));
        assert_eq!(s.throughput.numbers, BTreeMap::from([("1001".to_owned(), 1000)]));
        assert_eq!(s.rates.pair, Some(PairRule { interval: Duration::from_secs(10), burst: 3 }));
        assert_eq!(s.mode, Mode::Shadow);
        assert_eq!(s.portfolio_modes, BTreeMap::from([("acme".to_owned(), Mode::Enforce)]));

        let off = Config::from_toml("[policy.pair_rate]\nenabled = false\nburst = 0").unwrap().validate().unwrap();
        assert_eq!(off.rates.pair, None, "a disabled pair rate is not checked further");
        // Numbers are checked while the rule is off too, so turning it on cannot fail later.
        let listed = Config::from_toml("[policy.throughput]\nnumbers = { \"1001\" = 1000 }").unwrap();
        let listed = listed.validate().unwrap();
        assert_eq!((listed.rates.throughput, listed.throughput.numbers.len()), (None, 1));
    }

    #[test]
    fn send_governor_errors_name_their_key() {
        let parse = |toml: &str| Config::from_toml(toml).unwrap_err();
        assert_eq!(parse("[policy]\nmode = \"loud\"").key, "policy.mode");
        assert_eq!(parse("[[portfolios]]\nid = \"acme\"\nmode = \"quiet\"").key, "portfolios[0].mode");
        assert_eq!(parse("[policy.throughput]\nenabled = true\nburst = \"soon\"").key, "policy.throughput.burst");
        assert!(parse("[policy.throughput]\nmps = 80").to_string().contains("mps"));
        assert!(parse("[policy.pair_rate]\nevery = \"6s\"").to_string().contains("every"));

        let validate = |toml: &str| Config::from_toml(toml).unwrap().validate().unwrap_err();
        for (toml, key) in [
            ("[policy.throughput]\ndefault_mps = 0", "policy.throughput.default_mps"),
            ("[policy.throughput]\nenabled = true\ndefault_mps = 100001", "policy.throughput.default_mps"),
            ("[policy.throughput]\nnumbers = { \"1001\" = 0 }", "policy.throughput.numbers.1001"),
            ("[policy.throughput]\nnumbers = { \"1001\" = 100001 }", "policy.throughput.numbers.1001"),
            ("[policy.throughput]\nnumbers = { \"a b\" = 80 }", "policy.throughput.numbers"),
            ("[policy.throughput]\nburst = \"2m\"", "policy.throughput.burst"),
            ("[policy.pair_rate]\nburst = 0", "policy.pair_rate.burst"),
            ("[policy.pair_rate]\nburst = 10001", "policy.pair_rate.burst"),
            ("[policy.pair_rate]\ninterval = \"0s\"", "policy.pair_rate.interval"),
            ("[policy.pair_rate]\ninterval = \"25h\"", "policy.pair_rate.interval"),
        ] {
            assert_eq!(validate(toml).key, key, "{toml}");
        }
        // A number id that is not one is not repeated whole.
        let long = format!("[policy.throughput]\nnumbers = {{ \"{}\" = 80 }}", "9".repeat(300));
        assert!(!validate(&long).to_string().contains(&"9".repeat(300)));
    }
}
