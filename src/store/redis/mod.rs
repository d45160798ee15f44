//! The Redis store: every sidecar on one Redis (standalone, Sentinel or Cluster) shares one set of
//! windows, and every decision is one Lua script call, so it is atomic and one round trip.
//!
//! Key layout, all under the hash tag of the portfolio so a script never crosses Cluster slots
//! (`<p>` = `store.key_prefix`, `<scope>` = empty, or `:n:<sender>` in per-number scope):
//!
//! | key                              | type        | holds                                        | TTL |
//! |----------------------------------|-------------|----------------------------------------------|-----|
//! | `<p>:{portfolio}:w<scope>`       | hash        | the window: recipient hash → last counted contact (µs), in buckets by hash and again in time order ([`WindowLayout`]) | window after its newest score |
//! | `<p>:{portfolio}:wz<scope>`      | sorted set  | the window as the version before kept it, read until its contacts leave | its own |
//! | `<p>:{portfolio}:m<scope>`       | hash        | tier, limit, since, last score, simulation   | `store.state_ttl`, at least window after `seq` |
//! | `<p>:{portfolio}:d<scope>:<day>` | HyperLogLog | counted recipients delivered that UTC day   | 31 days |
//! | `<p>:{portfolio}:dv<scope>`      | sorted set  | recipient hash → last confirmed delivered (µs) | window after its newest score |
//! | `<p>:{portfolio}:sw`             | sorted set  | (sender, recipient) hash → window closes (µs)| its last closing time |
//! | `<p>:{portfolio}:pf`             | hash        | quality, numbers (their throughput level `s:<id>:mps`, backoff `s:<id>:bo` and schedule `s:<id>:tat`), templates, alerts, the mode set by UpdatePortfolio (`mode`) | `store.state_ttl` |
//! | `<p>:{portfolio}:opt`            | set         | opted-out recipient hashes                   | `store.state_ttl` |
//! | `<p>:{portfolio}:i<scope>:<key>` | string      | an idempotency key's remembered Admit        | window after its score |
//! | `<p>:{portfolio}:pr:<pair>`      | string      | a (number, user) pair's rate schedule `<tat>:<burst start>` (µs), by the pair's keyed hash | until its `tat` |
//! | `<p>:{portfolio}:mc`             | sorted set  | recipient hash → no marketing until (µs), after Meta's per-user marketing limit | its last until |
//!
//! TTLs run from the newest score a key holds (plus one second), never from now: scores can be
//! ahead of the Redis clock (see `tg_ttl_until` in the scripts' prelude).
//!
//! [`keys`] names them. The scripts live in [`scripts`], each `.lua` beside the Rust types that
//! encode its KEYS and ARGV and decode its reply; each documents its KEYS and ARGV at its top.
//! [`config`] resolves the topology from the configuration.
//!
//! Every writing script (admit, apply, release) is told the moment its caller gives up, in the
//! Redis clock ([`clock`]), and writes nothing when it starts later: when a stalled Redis resumes,
//! the calls that were answered UNAVAILABLE meanwhile change nothing.

mod clock;
mod config;
mod keys;
mod scripts;
mod window;

pub use config::{redact_url, RedisOptions, Topology, TopologyConfig, TopologyError};
pub use window::WindowLayout;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ErrorKind, IntoConnectionInfo, RedisError, ScriptInvocation, ServerErrorKind};
use tokio::sync::Mutex;

use self::clock::RedisClock;
use self::keys::KeySpace;
use self::scripts::{
    AdmitArgs, AdmitKeys, ApplyArgs, Call, ClockArgs, PortfolioArgs, ReleaseArgs, SharedPolicyArgs, UsageArgs,
};
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
    /// The Redis clock as last seen, which writing scripts' deadlines are given in.
    redis_clock: RedisClock,
    /// How windows are packed.
    layout: WindowLayout,
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

/// The Redis clock a writing script's refusal reports, when it started after its deadline.
fn refused_at(e: &RedisError) -> Option<Micros> {
    if e.code() != Some(scripts::DEADLINE_PASSED) {
        return None;
    }
    e.detail()?.split_whitespace().next()?.parse().ok()
}

/// TCP settings of every connection to Redis: TCP_NODELAY, which redis-rs leaves off. Calls share
/// a multiplexed connection, and with Nagle's algorithm a call written while an earlier one is
/// unacknowledged waits for Redis's delayed ACK.
fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

fn store_error(e: RedisError) -> StoreError {
    if e.code() == Some(scripts::DEADLINE_PASSED) {
        // Redis stalled, or the call waited too long before it ran: nothing was written.
        return StoreError::Unavailable("Redis ran the call after its deadline passed; it wrote nothing".into());
    }
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
        let layout = WindowLayout::default();
        layout.check(opts.windows.window).map_err(StoreError::Internal)?;
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
        let redis_clock = RedisClock::new(matches!(conn, Connection::Cluster { .. }));
        Ok(RedisStore { conn: Arc::new(conn), opts, keys, clock: Arc::new(SystemClock), redis_clock, layout })
    }

    /// The store with windows packed in buckets and chunks of other sizes (tests use tiny ones,
    /// so every split, merge and chunk boundary is crossed with a handful of recipients).
    pub fn with_layout(mut self, layout: WindowLayout) -> Result<RedisStore, StoreError> {
        layout.check(self.opts.windows.window).map_err(StoreError::Internal)?;
        self.layout = layout;
        Ok(self)
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

    /// Runs one script call and decodes its reply, within `store.timeout`.
    async fn call<C: Call>(&self, call: &C) -> Result<C::Reply, StoreError> {
        self.within(Instant::now(), self.exchange(call)).await
    }

    /// Runs one writing script within `store.timeout`, telling it its deadline: `make` builds the
    /// call from that deadline, in the clock of the server that holds `key`.
    async fn write<C: Call>(&self, key: &str, make: impl FnOnce(Micros) -> C) -> Result<C::Reply, StoreError> {
        let started = Instant::now();
        self.within(started, async {
            let deadline = self.deadline(key, started).await?;
            self.exchange(&make(deadline)).await
        })
        .await
    }

    /// The deadline of a writing call that started at `started`, by the clock of `key`'s server:
    /// when the caller gives up, less the margin (see [`clock`]). The first call on a server
    /// reads its clock first.
    async fn deadline(&self, key: &str, started: Instant) -> Result<Micros, StoreError> {
        let timeout = self.opts.timeout;
        let last_start = started + timeout - clock::margin(timeout);
        if let Some(deadline) = self.redis_clock.redis_time(key, last_start) {
            return Ok(deadline);
        }
        self.exchange(&ClockArgs { key }).await?;
        self.redis_clock
            .redis_time(key, last_start)
            .ok_or_else(|| StoreError::Internal("the Redis clock is still unknown after reading it".into()))
    }

    /// Runs `fut` until `started` plus `store.timeout`; past it, the call fails as unavailable.
    async fn within<T>(
        &self,
        started: Instant,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let timeout = self.opts.timeout;
        match tokio::time::timeout_at((started + timeout).into(), fut).await {
            Ok(result) => result,
            Err(_) => {
                if let Connection::Sentinel { conn, .. } = &*self.conn {
                    *conn.lock().await = None;
                }
                Err(StoreError::Unavailable(format!("Redis did not answer within {timeout:?}")))
            }
        }
    }

    /// Sends one script call and decodes its reply, keeping the Redis clock it reports (a refusal
    /// reports it too, so an offset that errs early cannot keep refusing calls).
    async fn exchange<C: Call>(&self, call: &C) -> Result<C::Reply, StoreError> {
        let mut inv = C::script().prepare_invoke();
        call.encode(&mut inv);
        let reply = self.invoke(&inv).await;
        let received = Instant::now();
        let reply = reply.map_err(|e| {
            if let Some(now) = refused_at(&e) {
                self.redis_clock.observe(call.key(), now, received);
            }
            store_error(e)
        })?;
        let reply = call.decode(reply)?;
        if let Some(now) = C::ran_at(&reply) {
            self.redis_clock.observe(call.key(), now, received);
        }
        Ok(reply)
    }

    /// Sends one script invocation on the connection of the topology.
    async fn invoke(&self, inv: &ScriptInvocation<'_>) -> Result<redis::Value, RedisError> {
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
        let window = self.keys.window(scope);
        let reply = self
            .write(&window.clone(), |deadline| AdmitArgs {
                keys: AdmitKeys {
                    window,
                    meta: self.keys.meta(scope),
                    service_windows: pf.service_windows,
                    opted_out: pf.opted_out,
                    portfolio: pf.state,
                    legacy_window: self.keys.legacy_window(scope),
                    marketing_capped: pf.marketing_capped,
                    idempotency: ops
                        .iter()
                        .filter_map(|op| op.idempotency_key.as_ref().map(|key| self.keys.idempotency(scope, key)))
                        .collect(),
                    pairs: ops
                        .iter()
                        .filter_map(|op| scripts::pair_of(op, &params.rates))
                        .map(|pair| self.keys.pair(&scope.portfolio, pair))
                        .collect(),
                },
                window_us: self.window_us(),
                fallback: &params.fallback,
                state_ttl_ms: self.state_ttl_ms(),
                reserve_bp: params.reserve_bp,
                ops,
                deadline,
                layout: self.layout,
                rates: params.rates,
                mode: params.mode,
            })
            .await?;
        Ok(reply.into_admissions())
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        let window = self.keys.window(&lease.scope);
        let released = self
            .write(&window.clone(), |deadline| ReleaseArgs {
                window,
                legacy_window: self.keys.legacy_window(&lease.scope),
                member: &lease.member,
                score: lease.score,
                deadline,
            })
            .await?;
        Ok(released.removed)
    }

    async fn apply(&self, portfolio: &str, changes: &[Change]) -> Result<Micros, StoreError> {
        let keys = self.keys.portfolio(portfolio);
        self.write(&keys.state.clone(), |deadline| ApplyArgs {
            keys: &self.keys,
            portfolio_id: portfolio,
            portfolio: keys,
            state_ttl_ms: self.state_ttl_ms(),
            service_window_us: policy::micros(self.opts.windows.service_window),
            window_us: self.window_us(),
            day_ttl_ms: (DAYS_KEPT + 1) * (DAY_US / 1_000),
            now: self.clock.now(),
            changes,
            deadline,
        })
        .await
    }

    async fn usage(&self, scope: &ScopeKey, fallback: &Tier) -> Result<ScopeReport, StoreError> {
        let today = self.today();
        self.call(&UsageArgs {
            window: self.keys.window(scope),
            meta: self.keys.meta(scope),
            legacy_window: self.keys.legacy_window(scope),
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
        let (window, legacy_window) = self.keys.ping();
        self.write(&window.clone(), |deadline| ReleaseArgs { window, legacy_window, member: b"", score: 0, deadline })
            .await
            .map(drop)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(reply: &[u8]) -> RedisError {
        redis::parse_redis_value(reply).unwrap().extract_error().unwrap_err()
    }

    #[test]
    fn a_refusal_past_the_deadline_is_unavailable_and_tells_the_redis_clock() {
        let e = server_error(b"-TGDEADLINE 1800000000000123 the call reached Redis after its deadline\r\n");
        assert_eq!(refused_at(&e), Some(1_800_000_000_000_123));
        assert!(matches!(store_error(e), StoreError::Unavailable(m) if m.contains("deadline")));
        let other = server_error(b"-ERR 1800000000000123 something else\r\n");
        assert_eq!(refused_at(&other), None);
    }
}
