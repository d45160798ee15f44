//! Every TCP connection tiergate accepts or makes has TCP_NODELAY. With Nagle's algorithm on, a
//! small write waits while an earlier one is unacknowledged, that is for the peer's delayed ACK
//! (40 ms on Linux): an AdmitBatch of 100 took 44 ms on either store.
//!
//! The sidecar and its stores run in this process on real sockets, so their sockets are this
//! process's descriptors: each test finds its connections among them by their addresses and asks
//! the kernel for the option.
#![cfg(target_os = "linux")]

mod common;

use std::net::{SocketAddr, TcpStream};

use common::redis::{RedisServer, SentinelSetup};
use common::requests::UTILITY;
use common::server::TestServer;
use common::stores::{cluster_store, redis_options, redis_store};
use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
use tiergate::store::redis::{RedisStore, Topology};
use tiergate::store::{Store, Windows};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One TCP connection of this process: its addresses and whether TCP_NODELAY is on.
#[derive(Debug)]
struct Connection {
    #[expect(dead_code, reason = "shown when an assertion fails")]
    local: SocketAddr,
    peer: SocketAddr,
    nodelay: bool,
}

/// The connected TCP sockets of this process that `pick` chooses by (local, peer) address.
fn connections(pick: impl Fn(SocketAddr, SocketAddr) -> bool) -> Vec<Connection> {
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd_open of this process");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if !std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:")) {
            continue;
        }
        // A duplicate of the descriptor: the same socket, closed again when dropped. (It fails
        // when another thread closed the descriptor meanwhile.)
        let Ok(dup) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else { continue };
        let socket = TcpStream::from(dup);
        let (Ok(local), Ok(peer), Ok(nodelay)) = (socket.local_addr(), socket.peer_addr(), socket.nodelay()) else {
            continue;
        };
        if pick(local, peer) {
            found.push(Connection { local, peer, nodelay });
        }
    }
    found
}

/// Asserts that there are such connections and that each has TCP_NODELAY.
fn assert_nodelay(what: &str, found: &[Connection]) {
    assert!(!found.is_empty(), "no {what} connection found");
    let without: Vec<_> = found.iter().filter(|c| !c.nodelay).collect();
    assert!(without.is_empty(), "{what} connections without TCP_NODELAY: {without:?} (of {found:?})");
}

const CONFIG: &str = "[policy]\nladder = [{ name = \"UNL\" }]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_are_accepted_with_nodelay() {
    let server = TestServer::start(CONFIG).await;
    let mut client = server.client().await;
    client.admit(UTILITY.to("acme", "sender-1", "+15550000001")).await.unwrap();
    assert_nodelay("accepted gRPC", &connections(|local, _| local == server.grpc_addr));
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_accepted_with_nodelay() {
    let server = TestServer::start(CONFIG).await;
    // A keep-alive request, answered before looking, so the server has accepted the connection.
    let mut http = tokio::net::TcpStream::connect(server.admin_addr).await.unwrap();
    http.write_all(b"GET /livez HTTP/1.1\r\nHost: tiergate\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"ok\n") {
        let mut buf = [0; 512];
        let n = http.read(&mut buf).await.unwrap();
        assert!(n > 0, "the admin server closed the connection: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert_nodelay("accepted admin", &connections(|local, _| local == server.admin_addr));
    drop(http);
    server.stop().await.unwrap();
}

/// The connections to any of `ports` on 127.0.0.1, once `store` has answered.
async fn store_connections(store: &RedisStore, ports: &[u16]) -> Vec<Connection> {
    store.ping().await.unwrap();
    connections(|_, peer| peer.ip().is_loopback() && ports.contains(&peer.port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_redis_connections_have_nodelay() {
    let (store, server) = redis_store(Windows::default(), "nodelay");
    assert_nodelay("Redis", &store_connections(&store, &[server.port()]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_redis_connections_have_nodelay() {
    let (store, cluster) = cluster_store(Windows::default(), "nodelay");
    let ports: Vec<u16> = cluster.nodes.iter().map(RedisServer::port).collect();
    assert_nodelay("Redis Cluster", &store_connections(&store, &ports).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_and_master_connections_have_nodelay() {
    let setup = SentinelSetup::start();
    let topology = Topology::Sentinel {
        sentinels: vec![setup.sentinel_url()],
        master_name: setup.master_name.clone(),
        master_url: None,
    };
    let store = RedisStore::new(redis_options(topology, Windows::default(), "nodelay")).unwrap();
    let ports = [setup.master.port(), setup.replica.port(), setup.sentinel.port()];
    let found = store_connections(&store, &ports).await;
    assert!(found.iter().any(|c| c.peer.port() == setup.master_port()), "no connection to the master: {found:?}");
    assert_nodelay("Sentinel and master", &found);
}
