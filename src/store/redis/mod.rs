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
//! | `<p>:{portfolio}:d<scope>:<day>` | HyperLogLog | counted recipients delivered that UTC day   | 31 days |
//! | `<p>:{portfolio}:dv<scope>`      | sorted set  | recipient hash → last confirmed delivered (µs) | window |
//! | `<p>:{portfolio}:sw`             | sorted set  | (sender, recipient) hash → window closes (µs)| service window |
//! | `<p>:{portfolio}:pf`             | hash        | quality, numbers, templates, alerts          | `store.state_ttl` |
//! | `<p>:{portfolio}:opt`            | set         | opted-out recipient hashes                   | `store.state_ttl` |
//!
//! [`keys`] names them. The scripts live in [`scripts`], each `.lua` beside the Rust types that
//! encode its KEYS and ARGV and decode its reply; each documents its KEYS and ARGV at its top.
//! [`config`] resolves the topology from the configuration.

mod config;
mod keys;
mod scripts;

pub use config::{redact_url, RedisOptions, Topology, TopologyConfig, TopologyError};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ErrorKind, IntoConnectionInfo, RedisError, ScriptInvocation, ServerErrorKind};
use tokio::sync::Mutex;

use self::keys::KeySpace;
use self::scripts::{AdmitArgs, AdmitKeys, ApplyArgs, Call, PortfolioArgs, ReleaseArgs, SharedPolicyArgs, UsageArgs};
use super::{
    day_of, Admission, AdmitOp, AdmitParams, Change, Clock, PortfolioState, ScopeReport, Store, StoreError,
    SystemClock, DAYS_KEPT, DAY_US,
};
use crate::policy::{self, Lease, Micros, ScopeKey, Tier};

enum Connection {
    Standalone(ConnectionManager),
    Cluster { client: redis::cluster::ClusterClient, conn: Mutex<Option<ClusterConnection>> },
    Sentinel { client: Mutex<SentinelClient>, conn: Mutex<Option<MultiplexedConnection>>, timeout: Duration },
}

/// The Redis store.
pub struct RedisStore {
    conn: Arc<Connection>,
    opts: RedisOptions,
    keys: KeySpace,
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

/// TCP settings of every connection to Redis: TCP_NODELAY, which redis-rs leaves off. Calls share
/// a multiplexed connection, and with Nagle's algorithm a call written while an earlier one is
/// unacknowledged waits for Redis's delayed ACK.
fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
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
                let info = url.as_str().into_connection_info().map_err(invalid)?.set_tcp_settings(tcp_settings());
                let client = redis::Client::open(info).map_err(invalid)?;
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
                    .tcp_settings(tcp_settings())
                    .build()
                    .map_err(invalid)?;
                Connection::Cluster { client, conn: Mutex::new(None) }
            }
            Topology::Sentinel { sentinels, master_name, master_url } => {
                let node = SentinelNodeConnectionInfo::default().set_tcp_settings(tcp_settings());
                let node = match master_url {
                    Some(url) => {
                        let info = url.as_str().into_connection_info().map_err(invalid)?;
                        node.set_redis_connection_info(info.redis_settings().clone())
                    }
                    None => node,
                };
                let sentinels = sentinels
                    .iter()
                    .map(|s| Ok(s.as_str().into_connection_info()?.set_tcp_settings(tcp_settings())))
                    .collect::<Result<Vec<_>, RedisError>>()
                    .map_err(invalid)?;
                let client =
                    SentinelClient::build(sentinels, master_name.clone(), Some(node), SentinelServerType::Master)
                        .map_err(invalid)?;
                Connection::Sentinel { client: Mutex::new(client), conn: Mutex::new(None), timeout: opts.timeout }
            }
        };
        let keys = KeySpace::new(&opts.key_prefix);
        Ok(RedisStore { conn: Arc::new(conn), opts, keys, clock: Arc::new(SystemClock) })
    }

    /// The store with another local clock (which only names candidate daily keys; every
    /// decision still takes its time from Redis).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> RedisStore {
        self.clock = clock;
        self
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

    /// Runs one script call and decodes its reply.
    async fn call<C: Call>(&self, call: &C) -> Result<C::Reply, StoreError> {
        let mut inv = C::script().prepare_invoke();
        call.encode(&mut inv);
        call.decode(self.run(&inv).await?)
    }

    /// Runs one script invocation within the configured timeout.
    async fn run(&self, inv: &ScriptInvocation<'_>) -> Result<redis::Value, StoreError> {
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

#[async_trait]
impl Store for RedisStore {
    async fn admit(
        &self,
        scope: &ScopeKey,
        params: &AdmitParams,
        ops: &[AdmitOp],
    ) -> Result<Vec<Admission>, StoreError> {
        let pf = self.keys.portfolio(&scope.portfolio);
        let args = AdmitArgs {
            keys: AdmitKeys {
                window: self.keys.window(scope),
                meta: self.keys.meta(scope),
                service_windows: pf.service_windows,
                opted_out: pf.opted_out,
                portfolio: pf.state,
            },
            window_us: self.window_us(),
            fallback: &params.fallback,
            state_ttl_ms: self.state_ttl_ms(),
            reserve_bp: params.reserve_bp,
            ops,
        };
        Ok(self.call(&args).await?.into_admissions())
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        self.call(&ReleaseArgs { window: self.keys.window(&lease.scope), member: &lease.member, score: lease.score })
            .await
    }

    async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, StoreError> {
        self.call(&ApplyArgs {
            keys: &self.keys,
            portfolio: self.keys.portfolio(portfolio),
            state_ttl_ms: self.state_ttl_ms(),
            service_window_us: policy::micros(self.opts.windows.service_window),
            window_us: self.window_us(),
            day_ttl_ms: (DAYS_KEPT + 1) * (DAY_US / 1_000),
            now: self.clock.now(),
            changes,
        })
        .await
    }

    async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<ScopeReport, StoreError> {
        let today = self.today();
        self.call(&UsageArgs {
            window: self.keys.window(scope),
            meta: self.keys.meta(scope),
            // One day either side of the caller's, so the script can count from the Redis clock's.
            days: (today.saturating_sub(DAYS_KEPT)..=today + 1).rev().map(|day| self.keys.day(scope, day)).collect(),
            window_us: self.window_us(),
            fallback,
            today,
        })
        .await
    }

    async fn portfolio(&self, portfolio: &str) -> Result<PortfolioState, StoreError> {
        let pf = self.keys.portfolio(portfolio);
        self.call(&PortfolioArgs { state: pf.state, opted_out: pf.opted_out }).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A script call exercises the same path as a decision (and loads nothing new).
        self.call(&ReleaseArgs { window: self.keys.ping(), member: b"", score: 0 }).await.map(drop)
    }

    fn backend(&self) -> &'static str {
        match &*self.conn {
            Connection::Standalone(_) => "redis",
            Connection::Cluster { .. } => "redis-cluster",
            Connection::Sentinel { .. } => "redis-sentinel",
        }
    }

    async fn shared_policy(&self, policy: &str, replace: bool) -> Result<String, StoreError> {
        self.call(&SharedPolicyArgs { key: self.keys.shared_policy(), policy, replace }).await
    }
}
