//! Key names: every key of a portfolio carries its hash tag (`{portfolio}`), so a script's keys
//! all live on one Cluster slot. The layout is in the [module docs](super).

use crate::policy::ScopeKey;

/// Names the keys of one deployment (one `store.key_prefix`).
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
}

/// A portfolio's own keys.
#[derive(Debug, Clone)]
pub struct PortfolioKeys {
    /// State hash: quality, numbers, templates, alerts, aliases.
    pub state: String,
    /// Opted-out recipient hashes (set).
    pub opted_out: String,
    /// Service windows (sorted set).
    pub service_windows: String,
    /// Recipients Meta's per-user marketing limit capped (sorted set, score = until when).
    pub marketing_capped: String,
}

impl KeySpace {
    /// The key space under `prefix`.
    pub fn new(prefix: &str) -> KeySpace {
        KeySpace { prefix: prefix.to_owned() }
    }

    fn tag(&self, portfolio: &str) -> String {
        format!("{}:{{{}}}", self.prefix, portfolio)
    }

    /// Empty for a portfolio-wide scope, `:n:<sender>` for a per-number one.
    fn sub(scope: &ScopeKey) -> String {
        scope.sender.as_ref().map(|s| format!(":n:{s}")).unwrap_or_default()
    }

    /// The scope's rolling window (hash of buckets and time-log chunks; see `scripts/window.lua`).
    pub fn window(&self, scope: &ScopeKey) -> String {
        format!("{}:w{}", self.tag(&scope.portfolio), Self::sub(scope))
    }

    /// The scope's rolling window as the previous version kept it (sorted set), read until its
    /// contacts have left.
    pub fn legacy_window(&self, scope: &ScopeKey) -> String {
        format!("{}:wz{}", self.tag(&scope.portfolio), Self::sub(scope))
    }

    /// The scope's state hash.
    pub fn meta(&self, scope: &ScopeKey) -> String {
        format!("{}:m{}", self.tag(&scope.portfolio), Self::sub(scope))
    }

    /// The scope's HyperLogLog of recipients reached on `day` (days since the Unix epoch).
    pub fn day(&self, scope: &ScopeKey, day: u64) -> String {
        format!("{}:d{}:{day}", self.tag(&scope.portfolio), Self::sub(scope))
    }

    /// When each recipient of the scope was last confirmed delivered (sorted set, kept for one
    /// window).
    pub fn delivered(&self, scope: &ScopeKey) -> String {
        format!("{}:dv{}", self.tag(&scope.portfolio), Self::sub(scope))
    }

    /// What the scope remembers of an Admit under an idempotency key (its keyed hash): a string
    /// that expires when the contact it names leaves the window.
    pub fn idempotency(&self, scope: &ScopeKey, key: &[u8]) -> String {
        format!("{}:i{}:{}", self.tag(&scope.portfolio), Self::sub(scope), hex::encode(key))
    }

    /// The portfolio's own keys.
    pub fn portfolio(&self, portfolio: &str) -> PortfolioKeys {
        let tag = self.tag(portfolio);
        PortfolioKeys {
            state: format!("{tag}:pf"),
            opted_out: format!("{tag}:opt"),
            service_windows: format!("{tag}:sw"),
            marketing_capped: format!("{tag}:mc"),
        }
    }

    /// A (number, user) pair's rate schedule (string `<tat>:<burst start>`, us), by the keyed hash
    /// of the pair (its service-window hash), so it names no recipient in clear: one key per pair that
    /// expires at its `tat`, when the pair owes nothing any more.
    pub fn pair(&self, portfolio: &str, pair: &[u8]) -> String {
        format!("{}:pr:{}", self.tag(portfolio), hex::encode(pair))
    }

    /// The [shared policy](crate::shared_policy) of the deployment (string).
    pub fn shared_policy(&self) -> String {
        format!("{}:{{policy}}", self.prefix)
    }

    /// A window key no portfolio uses, for health checks, and its legacy window's.
    pub fn ping(&self) -> (String, String) {
        (format!("{}:{{ping}}:w", self.prefix), format!("{}:{{ping}}:wz", self.prefix))
    }
}
