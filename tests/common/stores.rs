//! Stores under test: the memory store, and Redis stores on a real redis-server or a real
//! three-master Redis Cluster, for the conformance suite and any other store-level test or bench.
//!
//! Servers are shared: [`shared_redis`] and [`shared_cluster`] start one when none is running and
//! hand the running one to every caller until the last holder drops it (then it is stopped, so
//! nothing outlives the test binary). Stores on a shared server keep apart by key prefix: the
//! fixtures give each store its own ([`unique_prefix`]). A test that stops, restarts or inspects
//! its server as a whole starts its own with [`RedisServer::start`] instead.

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tiergate::store::memory::MemoryStore;
use tiergate::store::redis::{RedisOptions, RedisStore, Topology};
use tiergate::store::{Store, Windows};

use super::redis::{RedisCluster, RedisServer};

/// How long the fixtures' Redis stores wait for an answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// How long the fixtures' Redis stores keep portfolio state.
pub const STATE_TTL: Duration = Duration::from_secs(35 * 24 * 3600);

/// A store under test and whatever keeps its server alive.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    _server: Option<Arc<dyn Any + Send + Sync>>,
}

/// A memory store.
pub fn memory(w: Windows) -> Fixture {
    Fixture { store: Arc::new(MemoryStore::new(w)), _server: None }
}

/// A Redis store on the shared redis-server, under a key prefix of its own.
pub fn redis(w: Windows) -> Fixture {
    let (store, server) = redis_store(w, &unique_prefix("tgtest"));
    Fixture { store: Arc::new(store), _server: Some(server) }
}

/// A Redis store on the shared three-master cluster, under a key prefix of its own.
pub fn redis_cluster(w: Windows) -> Fixture {
    let (store, cluster) = cluster_store(w, &unique_prefix("tgtest"));
    Fixture { store: Arc::new(store), _server: Some(cluster) }
}

/// A Redis store on the shared redis-server with these windows and key prefix, and the server
/// (keep it while the store is used).
pub fn redis_store(w: Windows, key_prefix: &str) -> (RedisStore, Arc<RedisServer>) {
    let server = shared_redis();
    (RedisStore::new(redis_options(standalone(&server), w, key_prefix)).unwrap(), server)
}

/// A Redis store on the shared three-master cluster with these windows and key prefix, and the
/// cluster (keep it while the store is used).
pub fn cluster_store(w: Windows, key_prefix: &str) -> (RedisStore, Arc<RedisCluster>) {
    let cluster = shared_cluster();
    (RedisStore::new(redis_options(cluster_of(&cluster), w, key_prefix)).unwrap(), cluster)
}

/// The options every test store uses: [`TIMEOUT`], [`STATE_TTL`], these windows and key prefix.
pub fn redis_options(topology: Topology, windows: Windows, key_prefix: &str) -> RedisOptions {
    RedisOptions { topology, windows, timeout: TIMEOUT, state_ttl: STATE_TTL, key_prefix: key_prefix.into() }
}

/// The topology of one redis-server.
pub fn standalone(server: &RedisServer) -> Topology {
    Topology::Standalone { url: server.url() }
}

/// The topology of a cluster, seeded from its first node.
pub fn cluster_of(cluster: &RedisCluster) -> Topology {
    Topology::Cluster { nodes: vec![cluster.url()] }
}

/// `base` and a number no other call in this process got.
pub fn unique_prefix(base: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{base}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The running shared redis-server, started if none is.
pub fn shared_redis() -> Arc<RedisServer> {
    static SHARED: Mutex<Weak<RedisServer>> = Mutex::new(Weak::new());
    shared(&SHARED, RedisServer::start)
}

/// The running shared three-master cluster, started if none is.
pub fn shared_cluster() -> Arc<RedisCluster> {
    static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());
    shared(&SHARED, RedisCluster::start)
}

/// The value `slot` still points to, or a new one from `start` (holding the lock meanwhile, so
/// concurrent callers wait for it instead of starting their own).
fn shared<T>(slot: &Mutex<Weak<T>>, start: impl FnOnce() -> T) -> Arc<T> {
    let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(running) = slot.upgrade() {
        return running;
    }
    let started = Arc::new(start());
    *slot = Arc::downgrade(&started);
    started
}
