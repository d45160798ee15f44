//! The Redis store: every sidecar on one Redis (standalone, Sentinel or Cluster) shares one set of
//! windows, and every decision is one Lua script call, so it is atomic and one round trip.
//!
//! Key layout, all under the hash tag of the portfolio so a script never crosses Cluster slots
//! (`<p>` = `store.key_prefix`, `<scope>` = empty, or `:n:<sender>` in per-number scope):
//!
//! | key                              | type        | holds                                        | TTL |
//! |----------------------------------|-------------|----------------------------------------------|-----|
//! | `<p>:{portfolio}:w<scope>`       | sorted set  | recipient hash → last counted contact (µs)   | window |
//! | `<p>:{portfolio}:m<scope>`       | hash        | tier, limit, since, last score, simulation   | `store.state_ttl` |
//! | `<p>:{portfolio}:d<scope>:<day>` | HyperLogLog | recipients reached that UTC day             | 31 days |
//! | `<p>:{portfolio}:sw`             | sorted set  | (sender, recipient) hash → window closes (µs)| service window |
//! | `<p>:{portfolio}:pf`             | hash        | quality, numbers, templates, alerts          | `store.state_ttl` |
//! | `<p>:{portfolio}:opt`            | set         | opted-out recipient hashes                   | `store.state_ttl` |
//!
//! The scripts live in `lua/` beside this file; each documents its KEYS and ARGV at its top.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ErrorKind, FromRedisValue, RedisError, Script, ScriptInvocation, ServerErrorKind};
use tokio::sync::Mutex;

use super::{
    day_of, Admission, AdmitOp, AdmitParams, Change, Clock, PortfolioState, ScopeReport, Store, StoreError,
    SystemClock, UsageSnapshot, Windows,
};
use crate::policy::{self, Category, Lease, Limit, Micros, Quality, Reason, ScopeKey, SenderStatus, Tier};

const PRELUDE: &str = include_str!("lua/prelude.lua");

fn with_prelude(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

static ADMIT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("lua/admit.lua")));
static USAGE: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("lua/usage.lua")));
static APPLY: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("lua/apply.lua")));
static PORTFOLIO: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/portfolio.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/release.lua")));

/// Days of daily unique-recipient counts read for projections (and kept, plus one).
const DAYS: u64 = 30;

/// How to reach Redis. Its `Debug` and `Display` never show credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server (`redis://` or `rediss://`), reconnecting on its own.
    Standalone { url: String },
    /// A Redis Cluster, from one or more seed node URLs.
    Cluster { nodes: Vec<String> },
    /// A master found through Sentinel; re-resolved after a failover.
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
        /// Credentials, database and TLS for the master, as a `redis://` URL without host meaning.
        master_url: Option<String>,
    },
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Topology({self})")
    }
}

impl std::fmt::Display for Topology {
    /// Describes the topology for logs, without credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topology::Standalone { url } => f.write_str(&redact_url(url)),
            Topology::Cluster { nodes } => {
                let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
                write!(f, "cluster seeded by {}", nodes.join(","))
            }
            Topology::Sentinel { sentinels, master_name, .. } => {
                let sentinels: Vec<String> = sentinels.iter().map(|s| redact_url(s)).collect();
                write!(f, "master {master_name:?} from sentinels {}", sentinels.join(","))
            }
        }
    }
}

/// Everything the Redis store needs.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub topology: Topology,
    pub windows: Windows,
    /// Bound on connecting and on each call; past it the call fails as unavailable.
    pub timeout: Duration,
    /// How long a scope's tier and state stay after its last activity.
    pub state_ttl: Duration,
    /// Prefix of every key, so several deployments can share one Redis.
    pub key_prefix: String,
}

/// Strips the password (and user) from a Redis URL before it reaches a log line.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_once('/').map_or((rest, String::new()), |(a, p)| (a, format!("/{p}")));
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => format!("{scheme}://{authority}{path}"),
    }
}

enum Connection {
    Standalone(ConnectionManager),
    Cluster { client: redis::cluster::ClusterClient, conn: Mutex<Option<ClusterConnection>> },
    Sentinel { client: Mutex<SentinelClient>, conn: Mutex<Option<MultiplexedConnection>>, timeout: Duration },
}

/// The Redis store.
pub struct RedisStore {
    conn: Arc<Connection>,
    opts: RedisOptions,
    /// Names the daily keys a call may touch; the scripts pick among them by the Redis clock.
    clock: Arc<dyn Clock>,
}

fn transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::BusyLoading)
                | ErrorKind::Server(ServerErrorKind::MasterDown)
                | ErrorKind::Server(ServerErrorKind::ReadOnly)
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::MasterNameNotFoundBySentinel
                | ErrorKind::EmptySentinelList
        )
        // Redis full, a script still running, too few replicas: all pass, so callers may retry.
        || matches!(e.code(), Some("OOM" | "BUSY" | "NOREPLICAS"))
}

fn store_error(e: RedisError) -> StoreError {
    if transient(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Internal(e.to_string())
    }
}

impl RedisStore {
    /// Builds the store. Connections are made lazily and re-made after failures, so a sidecar
    /// starts (and reports not ready) while Redis is down, and recovers without a restart.
    pub fn new(opts: RedisOptions) -> Result<RedisStore, StoreError> {
        let invalid = |e: RedisError| StoreError::Internal(format!("invalid Redis configuration: {e}"));
        let conn = match &opts.topology {
            Topology::Standalone { url } => {
                let client = redis::Client::open(url.as_str()).map_err(invalid)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(opts.timeout))
                    .set_response_timeout(Some(opts.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                Connection::Standalone(ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?)
            }
            Topology::Cluster { nodes } => {
                let client = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(opts.timeout)
                    .response_timeout(opts.timeout)
                    .retries(1)
                    .build()
                    .map_err(invalid)?;
                Connection::Cluster { client, conn: Mutex::new(None) }
            }
            Topology::Sentinel { sentinels, master_name, master_url } => {
                let node = match master_url {
                    Some(url) => {
                        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(invalid)?;
                        SentinelNodeConnectionInfo::default().set_redis_connection_info(info.redis_settings().clone())
                    }
                    None => SentinelNodeConnectionInfo::default(),
                };
                let client = SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    master_name.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(invalid)?;
                Connection::Sentinel { client: Mutex::new(client), conn: Mutex::new(None), timeout: opts.timeout }
            }
        };
        Ok(RedisStore { conn: Arc::new(conn), opts, clock: Arc::new(SystemClock) })
    }

    /// The store with another local clock (which only names candidate daily keys; every
    /// decision still takes its time from Redis).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> RedisStore {
        self.clock = clock;
        self
    }

    fn tag(&self, portfolio: &str) -> String {
        format!("{}:{{{}}}", self.opts.key_prefix, portfolio)
    }

    fn sub(scope: &ScopeKey) -> String {
        scope.sender.as_ref().map(|s| format!(":n:{s}")).unwrap_or_default()
    }

    fn window_key(&self, scope: &ScopeKey) -> String {
        format!("{}:w{}", self.tag(&scope.portfolio), Self::sub(scope))
    }

    fn meta_key(&self, scope: &ScopeKey) -> String {
        format!("{}:m{}", self.tag(&scope.portfolio), Self::sub(scope))
    }

    fn day_key(&self, scope: &ScopeKey, day: u64) -> String {
        format!("{}:d{}:{day}", self.tag(&scope.portfolio), Self::sub(scope))
    }

    fn portfolio_keys(&self, portfolio: &str) -> [String; 3] {
        let tag = self.tag(portfolio);
        [format!("{tag}:pf"), format!("{tag}:opt"), format!("{tag}:sw")]
    }

    fn today(&self) -> u64 {
        day_of(self.clock.now())
    }

    fn window_us(&self) -> u64 {
        policy::micros(self.opts.windows.window)
    }

    fn state_ttl_ms(&self) -> u64 {
        u64::try_from(self.opts.state_ttl.max(self.opts.windows.window).as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs one script invocation within the configured timeout.
    async fn run<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> Result<T, StoreError> {
        let timeout = self.opts.timeout;
        let call = async {
            match &*self.conn {
                Connection::Standalone(m) => inv.invoke_async(&mut m.clone()).await,
                Connection::Cluster { client, conn } => {
                    let mut c = {
                        let mut slot = conn.lock().await;
                        match &*slot {
                            Some(c) => c.clone(),
                            None => {
                                let c = client.get_async_connection().await?;
                                *slot = Some(c.clone());
                                c
                            }
                        }
                    };
                    inv.invoke_async(&mut c).await
                }
                Connection::Sentinel { client, conn, timeout } => {
                    let mut c = sentinel_connection(client, conn, *timeout).await?;
                    let result = inv.invoke_async(&mut c).await;
                    if let Err(e) = &result {
                        if transient(e) {
                            // The master may have moved: ask the sentinels again next time.
                            *conn.lock().await = None;
                        }
                    }
                    result
                }
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result.map_err(store_error),
            Err(_) => {
                if let Connection::Sentinel { conn, .. } = &*self.conn {
                    *conn.lock().await = None;
                }
                Err(StoreError::Unavailable(format!("Redis did not answer within {timeout:?}")))
            }
        }
    }

    fn tier_from(name: String, limit: i64) -> Tier {
        Tier { name, limit: Limit::from_i64(limit) }
    }
}

async fn sentinel_connection(
    client: &Mutex<SentinelClient>,
    conn: &Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
) -> Result<MultiplexedConnection, RedisError> {
    let mut slot = conn.lock().await;
    if let Some(c) = &*slot {
        return Ok(c.clone());
    }
    let master = client.lock().await.async_get_client().await?;
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
    let mut c = master.get_multiplexed_async_connection_with_config(&config).await?;
    // A sentinel may still name the old master for a moment after a failover: insist on a master.
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await?;
    if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
        return Err(RedisError::from((ErrorKind::Server(ServerErrorKind::ReadOnly), "sentinel named a replica")));
    }
    *slot = Some(c.clone());
    Ok(c)
}

fn positive(v: i64) -> Option<u64> {
    u64::try_from(v).ok().filter(|v| *v > 0)
}

/// Parses the portfolio hash (field layout in `lua/apply.lua`).
fn portfolio_state(fields: Vec<(String, String)>, opted_out: u64) -> PortfolioState {
    let mut state = PortfolioState { opted_out, ..PortfolioState::default() };
    for (field, value) in fields {
        if field == "q" {
            state.quality = Quality::parse(&value).unwrap_or_default();
        } else if let Some(rest) = field.strip_prefix("s:") {
            let Some((sender, attr)) = rest.rsplit_once(':') else { continue };
            let s = state.senders.entry(sender.to_owned()).or_default();
            match attr {
                "status" => s.status = SenderStatus::parse(&value),
                "quality" => s.quality = Quality::parse(&value).unwrap_or_default(),
                "since" => s.since = value.parse().ok(),
                _ => {}
            }
        } else if let Some(rest) = field.strip_prefix("t:") {
            let Some((name, attr)) = rest.rsplit_once(':') else { continue };
            let t = state.templates.entry(name.to_owned()).or_default();
            match attr {
                "status" => t.status = Some(value),
                "quality" => t.quality = Quality::parse(&value).unwrap_or_default(),
                _ => {}
            }
        } else if let Some(key) = field.strip_prefix("a:") {
            state.alerts.insert(key.to_owned(), value);
        } else if let Some(display) = field.strip_prefix("n:") {
            state.aliases.insert(display.to_owned(), value);
        }
    }
    state
}

fn reason_from(code: i64) -> Result<Reason, StoreError> {
    match code {
        1 => Ok(Reason::NewRecipient),
        2 => Ok(Reason::AlreadyCounted),
        3 => Ok(Reason::ServiceWindow),
        4 => Ok(Reason::LimitReached),
        5 => Ok(Reason::OptedOut),
        6 => Ok(Reason::TemplateBlocked),
        7 => Ok(Reason::HeadroomReserved),
        8 => Ok(Reason::SenderBlocked),
        9 => Ok(Reason::OutsideServiceWindow),
        other => Err(StoreError::Internal(format!("admit script returned reason {other}"))),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn admit(
        &self,
        scope: &ScopeKey,
        params: &AdmitParams,
        ops: &[AdmitOp],
    ) -> Result<Vec<Admission>, StoreError> {
        let [pf, opt, sw] = self.portfolio_keys(&scope.portfolio);
        let today = self.today();
        let mut inv = ADMIT.prepare_invoke();
        inv.key(self.window_key(scope))
            .key(self.meta_key(scope))
            .key(self.day_key(scope, today))
            .key(sw)
            .key(opt)
            .key(pf)
            .key(self.day_key(scope, today.saturating_sub(1)))
            .key(self.day_key(scope, today + 1))
            .arg(self.window_us())
            .arg(&params.fallback.name)
            .arg(params.fallback.limit.to_i64())
            .arg(self.state_ttl_ms())
            .arg((DAYS + 1) * 86_400_000)
            .arg(params.reserve_bp)
            .arg(today);
        for op in ops {
            let category = match op.category {
                Category::Unspecified => 0,
                Category::Marketing => 1,
                Category::Utility => 2,
                Category::Authentication => 3,
                Category::Service => 4,
            };
            inv.arg(&op.member[..])
                .arg(op.service_member.as_deref().unwrap_or(b""))
                .arg(category)
                .arg(op.template.as_deref().unwrap_or(""))
                .arg(op.sender.as_deref().unwrap_or(""))
                .arg(if op.sender_blocked { "1" } else { "0" });
        }
        let (name, limit, now, flat): (String, i64, i64, Vec<i64>) = self.run(&inv).await?;
        if flat.len() != ops.len() * 5 {
            return Err(StoreError::Internal(format!(
                "admit script returned {} values for {} ops",
                flat.len(),
                ops.len()
            )));
        }
        let tier = Self::tier_from(name, limit);
        flat.chunks_exact(5)
            .map(|c| {
                Ok(Admission {
                    reason: reason_from(c[0])?,
                    lease_score: positive(c[1]),
                    retry_after: positive(c[2]).map(Duration::from_micros),
                    usage: UsageSnapshot {
                        tier: tier.clone(),
                        counted: positive(c[3]).unwrap_or(0),
                        next_slot_at: positive(c[4]),
                    },
                    now: positive(now).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut inv = RELEASE.prepare_invoke();
        inv.key(self.window_key(&lease.scope)).arg(&lease.member[..]).arg(lease.score);
        let removed: i64 = self.run(&inv).await?;
        Ok(removed == 1)
    }

    async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, StoreError> {
        let mut inv = APPLY.prepare_invoke();
        let mut keys: Vec<String> = self.portfolio_keys(portfolio).into();
        let mut key_index = |key: String| match keys.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => {
                keys.push(key);
                keys.len()
            }
        };
        let mut args: Vec<Vec<u8>> = vec![
            self.state_ttl_ms().to_string().into_bytes(),
            policy::micros(self.opts.windows.service_window).to_string().into_bytes(),
        ];
        let mut push = |parts: &[&[u8]]| args.extend(parts.iter().map(|p| p.to_vec()));
        let time = |t: &Option<Micros>| t.map(|t| t.to_string()).unwrap_or_default();
        for change in changes {
            match change {
                Change::Tier { scope, tier, at } => {
                    let i = key_index(self.meta_key(scope)).to_string();
                    let limit = tier.limit.to_i64().to_string();
                    push(&[b"tier", i.as_bytes(), tier.name.as_bytes(), limit.as_bytes(), time(at).as_bytes()]);
                }
                Change::Eligible { scope, since } => {
                    let i = key_index(self.meta_key(scope)).to_string();
                    push(&[b"elig", i.as_bytes(), time(since).as_bytes()]);
                }
                Change::Flagged { scope, since } => {
                    let i = key_index(self.meta_key(scope)).to_string();
                    push(&[b"flag", i.as_bytes(), time(since).as_bytes()]);
                }
                Change::Quality(q) => push(&[b"q", q.as_str().as_bytes()]),
                Change::SenderStatus { sender, status, at } => {
                    push(&[b"sst", sender.as_bytes(), status.as_str().as_bytes(), time(at).as_bytes()])
                }
                Change::SenderQuality { sender, quality } => {
                    push(&[b"sq", sender.as_bytes(), quality.as_str().as_bytes()])
                }
                Change::TemplateStatus { name, status, at } => {
                    push(&[b"tst", name.as_bytes(), status.as_bytes(), time(at).as_bytes()])
                }
                Change::TemplateQuality { name, quality } => {
                    push(&[b"tq", name.as_bytes(), quality.as_str().as_bytes()])
                }
                Change::OptOut { member, opted_out } => push(&[b"opt", member, if *opted_out { b"1" } else { b"0" }]),
                Change::Alert { key, body } => push(&[b"alert", key.as_bytes(), body.as_bytes()]),
                Change::Alias { display, id } => push(&[b"alias", display.as_bytes(), id.as_bytes()]),
                Change::Inbound { service_member, at } => push(&[b"in", service_member, time(at).as_bytes()]),
            }
        }
        inv.key(&keys[..]).arg(args);
        self.run(&inv).await
    }

    async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<ScopeReport, StoreError> {
        let today = self.today();
        let mut inv = USAGE.prepare_invoke();
        inv.key(self.window_key(scope)).key(self.meta_key(scope));
        // One day either side of the caller's, so the script can count from the Redis clock's.
        for day in (today.saturating_sub(DAYS)..=today + 1).rev() {
            inv.key(self.day_key(scope, day));
        }
        inv.arg(self.window_us()).arg(&fallback.name).arg(fallback.limit.to_i64()).arg(today);
        let v: Vec<redis::Value> = self.run(&inv).await?;
        let bad = || StoreError::Internal("usage script returned an unexpected shape".into());
        let [name, rest @ ..] = &v[..] else { return Err(bad()) };
        let name: String = redis::from_redis_value_ref(name).map_err(|_| bad())?;
        let n: Vec<i64> = rest.iter().map(redis::from_redis_value_ref).collect::<Result<_, _>>().map_err(|_| bad())?;
        let [limit, counted, next, u7, u30, since, elig, flag, now] = n[..] else { return Err(bad()) };
        Ok(ScopeReport {
            usage: UsageSnapshot {
                tier: Self::tier_from(name, limit),
                counted: positive(counted).unwrap_or(0),
                next_slot_at: positive(next),
            },
            unique_7d: positive(u7).unwrap_or(0),
            unique_30d: positive(u30).unwrap_or(0),
            tier_since: positive(since),
            eligible_since: positive(elig),
            flagged_since: positive(flag),
            now: positive(now).unwrap_or(0),
        })
    }

    async fn portfolio(&self, portfolio: &str) -> Result<PortfolioState, StoreError> {
        let [pf, opt, _] = self.portfolio_keys(portfolio);
        let mut inv = PORTFOLIO.prepare_invoke();
        inv.key(pf).key(opt);
        let (fields, opted_out): (Vec<(String, String)>, u64) = self.run(&inv).await?;
        Ok(portfolio_state(fields, opted_out))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A script call exercises the same path as a decision (and loads nothing new).
        let mut inv = RELEASE.prepare_invoke();
        inv.key(format!("{}:{{ping}}:w", self.opts.key_prefix)).arg("").arg(0);
        let _: i64 = self.run(&inv).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        match &*self.conn {
            Connection::Standalone(_) => "redis",
            Connection::Cluster { .. } => "redis-cluster",
            Connection::Sentinel { .. } => "redis-sentinel",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("redis://user:s3cret@db:6379/2"), "redis://***@db:6379/2");
        assert_eq!(redact_url("rediss://:pw@db:6380"), "rediss://***@db:6380");
        assert_eq!(redact_url("redis://db:6379"), "redis://db:6379");
        assert!(!redact_url("redis+sentinel://u:pw@s1:26379,s2:26379/mymaster").contains("pw"));
    }
}
