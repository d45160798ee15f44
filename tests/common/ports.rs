//! The one place tests get TCP ports from.
//!
//! Tests in one binary run on parallel threads, and every server they start (redis-server, a
//! cluster node's bus, the sidecar) needs a port. Asking the kernel for a free port and releasing
//! it leaves a window in which another caller can be handed the same one, or bind it first; and a
//! port given back by a stopped server may still be dialled by a client that outlived it. So every
//! port goes through [`listener`], which never hands out the same port twice in a process.
//!
//! Other processes (other test binaries, other checkouts) can still take a port between here and
//! the server's bind; the harnesses therefore check that whoever answers on the port is the server
//! they started, and start again on a new port otherwise.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

/// Every port handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// How many kernel-chosen ports are tried before giving up (each one was free when tried).
const ATTEMPTS: usize = 1_000;

/// A listener on 127.0.0.1, on a port no other caller in this process has been given.
pub fn listener() -> TcpListener {
    for _ in 0..ATTEMPTS {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr of a bound listener").port();
        if HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner).insert(port) {
            return listener;
        }
    }
    panic!("no unused port on 127.0.0.1 after {ATTEMPTS} attempts");
}

/// A port on 127.0.0.1 that is free now and that no other caller in this process has been or will
/// be given, for a server in another process to bind.
pub fn free_port() -> u16 {
    listener().local_addr().expect("local_addr of a bound listener").port()
}
