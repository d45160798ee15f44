//! Test harness that runs REAL `redis-server` processes for integration tests.
//!
//! Every process lives in its own [`tempfile::TempDir`] (data dir, `redis.log` written by the server via
//! `--logfile`, and `stdio.log` capturing the process's stdout/stderr). Processes are SIGKILLed and reaped on
//! `Drop`, so nothing is left behind even when a test panics. Every wait is bounded in time and panics with
//! the tail of the relevant logs on timeout. Tests never silently skip: if `redis-server` is missing, they
//! panic telling you to install it.
//!
//! Only `std` + `tempfile` are used; readiness checks speak a minimal RESP `PING` over `std::net::TcpStream`
//! and everything else goes through `redis-cli`.
//!
//! Ports come from [`super::ports`]. A server counts as started only once the process answering on its
//! port reports the pid of the process started here: a `PONG` alone may come from another server that
//! got the port first, while ours is about to exit with "Address already in use".

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::ports::free_port;

/// Sleep between polls of any readiness condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a freshly spawned process gets to answer `PING`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster gets to reach `cluster_state:ok` on every node.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a sentinel failover (or sentinel/replica discovery) may take.
pub const SENTINEL_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for any single `redis-cli` invocation (except `--cluster create`).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for `redis-cli --cluster create`.
const CLUSTER_CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How many times a fresh start is retried on a new port when the chosen port got taken in the meantime.
const PORT_RETRIES: usize = 5;
/// Name of the sentinel-monitored master.
pub const SENTINEL_MASTER_NAME: &str = "mymaster";

const LOG_FILE: &str = "redis.log";
const STDIO_FILE: &str = "stdio.log";
const LOG_TAIL_LINES: usize = 40;

// ---------------------------------------------------------------------------------------------------------
// Free functions
// ---------------------------------------------------------------------------------------------------------

/// Panics with a clear message if `redis-server` (or `redis-cli`) is not on `PATH`.
/// Tests must never silently skip.
pub fn require_redis() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        for bin in ["redis-server", "redis-cli"] {
            match Command::new(bin).arg("--version").stdin(Stdio::null()).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    return Err(format!(
                        "`{bin} --version` failed with {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
                Err(e) => return Err(format!("`{bin}` could not be executed: {e}")),
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!(
            "redis-server/redis-cli are required for these integration tests and are not usable ({e}). \
             Install them, e.g. `apt-get install redis-server` (Debian/Ubuntu), and make sure they are on PATH. \
             These tests never skip silently."
        );
    }
}

/// Sends a RESP `PING` to 127.0.0.1:`port` and returns true iff it answered `+PONG`.
/// Never blocks for more than ~1s.
pub fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(250)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(250)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut buf = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") && buf.len() < 512 {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return false,
        }
    }
    buf.starts_with(b"+PONG")
}

/// Runs `redis-cli -h 127.0.0.1 -p PORT args...` (bounded by [`CLI_TIMEOUT`]) and returns its stdout trimmed.
///
/// `Err` on spawn failure, timeout or non-zero exit. NOTE: like `redis-cli` itself, an error *reply* from
/// the server (e.g. `ERR unknown command`) is NOT an `Err`: it exits 0 and the error text is returned.
pub fn try_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("redis-cli");
    cmd.arg("-h").arg("127.0.0.1").arg("-p").arg(port.to_string()).args(args);
    let out = run_with_timeout(&mut cmd, CLI_TIMEOUT)?;
    if !out.status.success() {
        return Err(format!(
            "`redis-cli -p {port} {}` exited with {}\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Like [`try_cli`] but panics on failure.
pub fn cli(port: u16, args: &[&str]) -> String {
    try_cli(port, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command with stdin closed and stdout/stderr captured, killing it if it exceeds `timeout`.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("failed to spawn {desc}: {e}"))?;
    // Drain both pipes on threads so a chatty child can never block on a full pipe.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(format!(
                    "{desc} timed out after {timeout:?} (killed)\nstdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&stdout).trim(),
                    String::from_utf8_lossy(&stderr).trim()
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for {desc} failed: {e}"));
            }
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output { status, stdout, stderr })
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some` or `timeout` elapses.
fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Last `n` lines of a file (or a note that it could not be read).
fn file_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<could not read {}: {e}>", path.display()),
    }
}

/// Value of `key:value` in an INFO-style reply.
fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':')).map(str::trim)
}

/// The pid of the redis-server (or sentinel) answering on `port`, from `INFO server`.
fn answering_pid(port: u16) -> Option<u32> {
    let info = try_cli(port, &["INFO", "server"]).ok()?;
    info_field(&info, "process_id")?.parse().ok()
}

/// Why a redis-server process could not be started.
enum LaunchError {
    /// Another process has the port: ours could not bind it, or someone else answers on it.
    PortTaken(String),
    /// Anything else; retrying on another port would not help.
    Failed(String),
}

// ---------------------------------------------------------------------------------------------------------
// RedisServer
// ---------------------------------------------------------------------------------------------------------

/// One `redis-server` process (plain server, cluster node or sentinel) running in its own [`TempDir`].
/// SIGKILLed and reaped on `Drop`.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// Full argv after the program name (port, dir, logfile and extra args included); reused by `restart`.
    args: Vec<String>,
    child: Option<Child>,
    // Declared last: the directory is removed only after `Drop::drop` has killed the child.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a plain redis-server on a free port: no persistence, bound to 127.0.0.1, dir = its tempdir.
    /// Waits until it answers `PING` (panics with the log tail after ~10s).
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Same as [`RedisServer::start`] plus extra command-line args (appended last, so they override the
    /// defaults), e.g. `&["--cluster-enabled", "yes"]` or `&["--maxmemory", "10mb"]`.
    pub fn start_with(args: &[&str]) -> RedisServer {
        let extra: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn_fresh("redis-server", |dir, port| {
            let mut argv = server_base_args(dir, port);
            argv.extend(extra.iter().cloned());
            argv
        })
    }

    /// Starts a sentinel (`redis-server <dir>/sentinel.conf --sentinel --port P`) monitoring
    /// `127.0.0.1:master_port` as [`SENTINEL_MASTER_NAME`] with quorum 1.
    pub fn start_sentinel(master_port: u16) -> RedisServer {
        Self::spawn_fresh("sentinel", |dir, port| {
            let conf = dir.join("sentinel.conf");
            let contents = format!(
                "port {port}\n\
                 sentinel monitor {m} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {m} 1000\n\
                 sentinel failover-timeout {m} 5000\n\
                 sentinel parallel-syncs {m} 1\n",
                m = SENTINEL_MASTER_NAME
            );
            std::fs::write(&conf, contents).expect("write sentinel.conf");
            vec![
                conf.display().to_string(),
                "--sentinel".into(),
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--logfile".into(),
                dir.join(LOG_FILE).display().to_string(),
                "--daemonize".into(),
                "no".into(),
            ]
        })
    }

    /// Allocates a tempdir + free port, builds argv with `make_args(dir, port)` and starts the process,
    /// retrying on a new port if the chosen one got taken in the meantime.
    fn spawn_fresh(what: &str, mut make_args: impl FnMut(&Path, u16) -> Vec<String>) -> RedisServer {
        require_redis();
        let mut last_err = String::new();
        for _ in 0..PORT_RETRIES {
            let dir =
                tempfile::Builder::new().prefix("tiergate-redis-").tempdir().expect("create tempdir for redis-server");
            let port = free_port();
            let args = make_args(dir.path(), port);
            let mut server = RedisServer { port, args, child: None, dir };
            match server.launch() {
                Ok(()) => return server,
                Err(LaunchError::PortTaken(e)) => last_err = e,
                Err(LaunchError::Failed(e)) => panic!("failed to start {what}: {e}"),
            }
        }
        panic!("failed to start {what} after {PORT_RETRIES} attempts (ports kept being taken): {last_err}");
    }

    /// Spawns the process with `self.args` and waits until it answers PING and reports its own pid,
    /// so that a server another test started on the same port is never mistaken for ours. On failure
    /// the process is killed and reaped, and the error contains the log tails.
    fn launch(&mut self) -> Result<(), LaunchError> {
        assert!(self.child.is_none(), "launch() while a process is still running");
        let failed = LaunchError::Failed;
        let stdio_path = self.dir.path().join(STDIO_FILE);
        let stdio = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stdio_path)
            .map_err(|e| failed(format!("open {}: {e}", stdio_path.display())))?;
        let stdio_err = stdio.try_clone().map_err(|e| failed(format!("clone stdio log handle: {e}")))?;
        let child = Command::new("redis-server")
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdio))
            .stderr(Stdio::from(stdio_err))
            .spawn()
            .map_err(|e| failed(format!("spawn redis-server {:?}: {e}", self.args)))?;
        let pid = child.id();
        self.child = Some(child);

        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("child just spawned");
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    let e =
                        format!("redis-server on port {} exited early with {status}\n{}", self.port, self.log_tail());
                    return Err(if e.contains("Address already in use") {
                        LaunchError::PortTaken(e)
                    } else {
                        LaunchError::Failed(e)
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    self.kill();
                    return Err(failed(format!("try_wait on redis-server (port {}) failed: {e}", self.port)));
                }
            }
            if ping(self.port) {
                match answering_pid(self.port) {
                    Some(answering) if answering == pid => return Ok(()),
                    Some(answering) => {
                        self.kill();
                        return Err(LaunchError::PortTaken(format!(
                            "port {} is answered by pid {answering}, not by the redis-server started here (pid {pid})",
                            self.port
                        )));
                    }
                    // Gone between PING and INFO: look again.
                    None => {}
                }
            }
            if started.elapsed() >= START_TIMEOUT {
                self.kill();
                return Err(failed(format!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}\n{}",
                    self.port,
                    self.log_tail()
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process's private directory (data, `nodes.conf`, `sentinel.conf`, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The command-line args the process is (re)started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// OS pid of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True if the process has been started and has not exited/been killed.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                // Exited on its own: reap (already done by try_wait) and forget it.
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL + wait. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process (if running) and starts it again on the SAME port with the same args. It is a new
    /// process, so all data (no persistence) and loaded scripts are gone. Waits until PING answers.
    pub fn restart(&mut self) {
        self.kill();
        // The port could (rarely) be taken by another process in the meantime: retry for a bounded time.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(LaunchError::PortTaken(_)) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(200));
                }
                Err(LaunchError::PortTaken(e) | LaunchError::Failed(e)) => {
                    panic!("failed to restart redis-server on port {}: {e}", self.port)
                }
            }
        }
    }

    /// Freezes the process (SIGSTOP) until the returned [`Stall`] is resumed or dropped (SIGCONT):
    /// a stalled server, whose connections stay open and whose socket buffers take commands that it
    /// runs only when it resumes.
    pub fn stall(&self) -> Stall {
        let pid = self.pid().expect("stall() of a server that is not running");
        signal(pid, "STOP");
        Stall { pid: Some(pid) }
    }

    /// Runs `redis-cli -p PORT args...` and returns stdout trimmed; panics on non-zero exit/timeout.
    /// Error replies (`ERR ...`) are returned as text, since redis-cli exits 0 for them.
    pub fn cli(&self, args: &[&str]) -> String {
        try_cli(self.port, args).unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()))
    }

    /// Like [`RedisServer::cli`] but returns `Err` instead of panicking.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        try_cli(self.port, args)
    }

    /// Tail of this process's log files, for panic messages.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        for name in [LOG_FILE, STDIO_FILE] {
            let path = self.dir.path().join(name);
            if path.exists() {
                let tail = file_tail(&path, LOG_TAIL_LINES);
                let _ = write!(s, "--- {} (last {LOG_TAIL_LINES} lines) ---\n{tail}\n", path.display());
            }
        }
        if s.is_empty() {
            s.push_str("<no log output>");
        }
        s
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server frozen by [`RedisServer::stall`]; it runs again when resumed or dropped (so a failing
/// test never leaves it frozen).
#[derive(Debug)]
pub struct Stall {
    pid: Option<u32>,
}

impl Stall {
    /// Lets the server run again (SIGCONT).
    pub fn resume(mut self) {
        if let Some(pid) = self.pid.take() {
            signal(pid, "CONT");
        }
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            signal(pid, "CONT");
        }
    }
}

/// Sends `SIG<name>` to `pid` with `kill`; panics when it cannot.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("kill -{name} {pid}: {e}"));
    assert!(status.success(), "kill -{name} {pid} exited with {status}");
}

fn server_base_args(dir: &Path, port: u16) -> Vec<String> {
    let log: PathBuf = dir.join(LOG_FILE);
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
        "--logfile",
        &log.display().to_string(),
        "--daemonize",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

// ---------------------------------------------------------------------------------------------------------
// RedisCluster
// ---------------------------------------------------------------------------------------------------------

/// A 3-master, 0-replica Redis Cluster on 127.0.0.1.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts 3 cluster-enabled nodes, runs `redis-cli --cluster create ... --cluster-replicas 0
    /// --cluster-yes`, then waits until every node reports `cluster_state:ok` and every node sees the
    /// same map: these 3 nodes, all masters, all connected, each owning the same slots in every view
    /// (panics after ~20s). A client seeded from any node therefore gets the whole map at once.
    ///
    /// Each node gets an explicit `--cluster-port` (another free port), because `port + 10000` overflows
    /// for ports from the upper part of the ephemeral range.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::spawn_fresh("cluster node", |dir, port| {
                    let mut argv = server_base_args(dir, port);
                    argv.extend(
                        [
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            "nodes.conf",
                            "--cluster-node-timeout",
                            "2000",
                            "--cluster-port",
                            &free_port().to_string(),
                        ]
                        .iter()
                        .map(|s| s.to_string()),
                    );
                    argv
                })
            })
            .collect();

        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let dump_logs = |nodes: &[RedisServer]| nodes.iter().map(RedisServer::log_tail).collect::<Vec<_>>().join("\n");
        match run_with_timeout(&mut cmd, CLUSTER_CREATE_TIMEOUT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "`redis-cli --cluster create` failed with {}\nstdout:\n{}\nstderr:\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                dump_logs(&nodes)
            ),
            Err(e) => panic!("`redis-cli --cluster create` failed: {e}\n{}", dump_logs(&nodes)),
        }

        let mut ports: Vec<u16> = nodes.iter().map(RedisServer::port).collect();
        ports.sort_unstable();
        let mut last = String::new();
        let ok = poll_until(CLUSTER_TIMEOUT, || {
            let mut first: Option<Vec<ClusterNode>> = None;
            for n in &nodes {
                let info = n.try_cli(&["CLUSTER", "INFO"]).unwrap_or_else(|e| e);
                let ok = info_field(&info, "cluster_state") == Some("ok")
                    && info_field(&info, "cluster_known_nodes") == Some("3")
                    && info_field(&info, "cluster_slots_ok") == Some("16384");
                if !ok {
                    last = format!("node {}: {info}", n.port);
                    return None;
                }
                let text = n.try_cli(&["CLUSTER", "NODES"]).unwrap_or_else(|e| e);
                let view = cluster_view(&text);
                let healthy = view.iter().map(|v| v.port).eq(ports.iter().copied())
                    && view.iter().all(|v| v.flags == "master" && v.link == "connected" && !v.slots.is_empty());
                if !healthy || first.as_ref().is_some_and(|f| *f != view) {
                    last = format!("node {} sees:\n{text}", n.port);
                    return None;
                }
                first.get_or_insert(view);
            }
            Some(())
        });
        if ok.is_none() {
            panic!(
                "redis cluster did not reach one agreed map of 3 connected masters on all nodes within \
                 {CLUSTER_TIMEOUT:?}\nlast: {last}\n{}",
                dump_logs(&nodes)
            );
        }
        RedisCluster { nodes }
    }

    /// Seed node URL (`nodes[0]`).
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// URLs of all nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// One line of `CLUSTER NODES`, as every node should agree on it.
#[derive(Debug, PartialEq, Eq)]
struct ClusterNode {
    port: u16,
    /// Flags without `myself`, which differs from view to view.
    flags: String,
    link: String,
    slots: Vec<String>,
}

/// The nodes a `CLUSTER NODES` reply lists, sorted by port.
/// Line format: `<id> <ip:port@cport> <flags> <master> <ping-sent> <pong-recv> <epoch> <link> <slot>...`.
fn cluster_view(text: &str) -> Vec<ClusterNode> {
    let mut view: Vec<ClusterNode> = text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = f.get(1)?.split(['@', ',']).next()?;
            let port = addr.rsplit_once(':')?.1.parse().ok()?;
            let flags = f.get(2)?.split(',').filter(|&x| x != "myself").collect::<Vec<_>>().join(",");
            let link = f.get(7)?.to_string();
            let slots = f.iter().skip(8).map(|x| x.to_string()).collect();
            Some(ClusterNode { port, flags, link, slots })
        })
        .collect();
    view.sort_by_key(|n| n.port);
    view
}

// ---------------------------------------------------------------------------------------------------------
// SentinelSetup
// ---------------------------------------------------------------------------------------------------------

/// master + 1 replica + 1 sentinel (quorum 1) monitoring them as `mymaster`.
#[derive(Debug)]
pub struct SentinelSetup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel: RedisServer,
    pub master_name: String,
}

impl SentinelSetup {
    /// Starts master, replica (`--replicaof`), waits for `master_link_status:up`, starts the sentinel and
    /// waits until it reports the master and has discovered the replica (so a failover can be started).
    /// Both data nodes run with `--repl-diskless-sync-delay 0` so full syncs don't wait 5s.
    pub fn start() -> SentinelSetup {
        // The default 5s `repl-diskless-sync-delay` would make every full sync (initial sync, and the old
        // master re-syncing after a failover) wait 5s for more replicas.
        const NO_SYNC_DELAY: [&str; 2] = ["--repl-diskless-sync-delay", "0"];
        let master = RedisServer::start_with(&NO_SYNC_DELAY);
        let master_port = master.port().to_string();
        let replica =
            RedisServer::start_with(&[NO_SYNC_DELAY[0], NO_SYNC_DELAY[1], "--replicaof", "127.0.0.1", &master_port]);
        let mut last = String::new();
        if poll_until(SENTINEL_TIMEOUT, || {
            last = replica.try_cli(&["INFO", "replication"]).unwrap_or_else(|e| e);
            (info_field(&last, "master_link_status") == Some("up")).then_some(())
        })
        .is_none()
        {
            panic!(
                "replica {} did not reach master_link_status:up within {SENTINEL_TIMEOUT:?}\n\
                 INFO replication: {last}\n{}\n{}",
                replica.port(),
                replica.log_tail(),
                master.log_tail()
            );
        }

        let sentinel = RedisServer::start_sentinel(master.port());
        let setup = SentinelSetup { master, replica, sentinel, master_name: SENTINEL_MASTER_NAME.to_string() };

        let mut last = String::new();
        if poll_until(SENTINEL_TIMEOUT, || {
            last = setup.sentinel.try_cli(&["SENTINEL", "get-master-addr-by-name", &setup.master_name]).ok()?;
            (parse_addr_port(&last) == Some(setup.master.port())).then_some(())
        })
        .is_none()
        {
            panic!(
                "sentinel did not report master port {} within {SENTINEL_TIMEOUT:?} (last answer: {last:?})\n{}",
                setup.master.port(),
                setup.sentinel.log_tail()
            );
        }
        setup.wait_replica_known(setup.replica.port(), Instant::now() + SENTINEL_TIMEOUT);
        setup
    }

    /// `redis://127.0.0.1:<sentinel port>`
    pub fn sentinel_url(&self) -> String {
        self.sentinel.url()
    }

    /// Asks the sentinel for the current master's port.
    pub fn master_port(&self) -> u16 {
        let out = self.sentinel.cli(&["SENTINEL", "get-master-addr-by-name", &self.master_name]);
        parse_addr_port(&out).unwrap_or_else(|| panic!("unexpected get-master-addr-by-name answer: {out:?}"))
    }

    /// The `RedisServer` that the sentinel currently reports as master.
    pub fn current_master(&self) -> &RedisServer {
        let p = self.master_port();
        if p == self.master.port() {
            &self.master
        } else {
            &self.replica
        }
    }

    /// `SENTINEL FAILOVER mymaster`, then waits (<= 20s) until the sentinel reports the other node as master
    /// AND that node's `ROLE` says master. Returns the new master's port.
    ///
    /// Extras, so that it can be called repeatedly (failing back and forth) and leaves a clean topology:
    /// * before issuing the failover it waits (own budget, <= 20s) until the sentinel lists the other node
    ///   as a healthy replica (`flags` = `slave`, `master-link-status` = `ok`), otherwise sentinel would
    ///   answer `NOGOODSLAVE`;
    /// * after the promotion it immediately runs `REPLICAOF <new master>` on the old master and waits until
    ///   its replication link is up. Sentinel would do the same on its own, but only after its next 10s
    ///   `INFO` poll; until then BOTH nodes would say `role:master` and accept writes.
    pub fn failover(&self) -> u16 {
        let old = self.master_port();
        let target = if old == self.master.port() { self.replica.port() } else { self.master.port() };
        self.wait_replica_known(target, Instant::now() + SENTINEL_TIMEOUT);

        let deadline = Instant::now() + SENTINEL_TIMEOUT;
        // NOGOODSLAVE / INPROG can happen transiently (e.g. right after a previous failover): retry.
        let mut last = String::new();
        let issued = poll_until(deadline.saturating_duration_since(Instant::now()), || {
            last = self.sentinel.try_cli(&["SENTINEL", "FAILOVER", &self.master_name]).unwrap_or_else(|e| e);
            (last == "OK").then_some(())
        });
        if issued.is_none() {
            panic!(
                "SENTINEL FAILOVER {} was not accepted within {SENTINEL_TIMEOUT:?} (last answer: {last:?})\n{}",
                self.master_name,
                self.sentinel.log_tail()
            );
        }

        let mut state = String::new();
        let done = poll_until(deadline.saturating_duration_since(Instant::now()), || {
            let addr = self.sentinel.try_cli(&["SENTINEL", "get-master-addr-by-name", &self.master_name]).ok()?;
            let role = try_cli(target, &["ROLE"]).unwrap_or_else(|e| e);
            state = format!("sentinel says {addr:?}, ROLE on {target}: {role:?}");
            (parse_addr_port(&addr) == Some(target) && role.lines().next() == Some("master")).then_some(target)
        });
        if done.is_none() {
            panic!(
                "failover {old} -> {target} did not complete within {SENTINEL_TIMEOUT:?}: {state}\n{}",
                self.sentinel.log_tail()
            );
        }

        // Demote the old master right away (see doc comment) and wait until it replicates from the new one.
        let target_s = target.to_string();
        let mut info = String::new();
        let demoted = poll_until(SENTINEL_TIMEOUT, || {
            info = try_cli(old, &["INFO", "replication"]).unwrap_or_else(|e| e);
            let following = info_field(&info, "role") == Some("slave")
                && info_field(&info, "master_port") == Some(target_s.as_str());
            if !following {
                let _ = try_cli(old, &["REPLICAOF", "127.0.0.1", &target_s]);
                return None;
            }
            (info_field(&info, "master_link_status") == Some("up")).then_some(())
        });
        if demoted.is_none() {
            panic!(
                "old master {old} did not start replicating from new master {target} within {SENTINEL_TIMEOUT:?}\n\
                 INFO replication: {info}\n{}",
                self.sentinel.log_tail()
            );
        }
        target
    }

    /// Waits until the sentinel lists 127.0.0.1:`port` as a replica with flags exactly `slave` and
    /// `master-link-status` `ok`, i.e. a valid failover candidate.
    fn wait_replica_known(&self, port: u16, deadline: Instant) {
        let mut last = String::new();
        let found = poll_until(deadline.saturating_duration_since(Instant::now()), || {
            last = self.sentinel.try_cli(&["SENTINEL", "REPLICAS", &self.master_name]).ok()?;
            // redis-cli (non-tty) prints the nested reply flattened, one element per line:
            // name, <ip:port>, ip, <ip>, port, <port>, ..., flags, <flags>, ... per replica.
            let lines: Vec<&str> = last.lines().map(str::trim).collect();
            let port_s = port.to_string();
            let name = format!("127.0.0.1:{port}");
            let starts: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| **l == "name").map(|(i, _)| i).collect();
            starts.iter().enumerate().find_map(|(k, &s)| {
                let end = starts.get(k + 1).copied().unwrap_or(lines.len());
                let entry = &lines[s..end];
                let get = |key: &str| entry.windows(2).find(|w| w[0] == key).map(|w| w[1]);
                (get("name") == Some(name.as_str())
                    && get("port") == Some(port_s.as_str())
                    && get("flags") == Some("slave")
                    && get("master-link-status") == Some("ok"))
                .then_some(())
            })
        });
        if found.is_none() {
            panic!(
                "sentinel did not list 127.0.0.1:{port} as a healthy replica of {} in time\n\
                 last SENTINEL REPLICAS:\n{last}\n{}",
                self.master_name,
                self.sentinel.log_tail()
            );
        }
    }
}

/// Parses redis-cli's raw output of `SENTINEL get-master-addr-by-name` ("ip\nport") into the port.
fn parse_addr_port(out: &str) -> Option<u16> {
    let mut lines = out.lines().map(str::trim);
    let _ip = lines.next()?;
    lines.next()?.parse().ok()
}
