//! Starting the real sidecar for tests: in this process through `server::run` on real sockets,
//! or as the real `tiergate` binary in its own process. Both listen on ports from
//! [`super::ports`], and HTTP helpers talk to the admin server.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tiergate::config::Config;
use tiergate::pb::limiter_client::LimiterClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use super::ports;

/// How many times a sidecar process is started on new ports when another process took one first.
const PORT_RETRIES: usize = 5;
/// How long a sidecar process gets to start serving (or to exit).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A sidecar running `server::run` in this process on 127.0.0.1, on ports from [`ports::listener`].
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tiergate::server::RunError>>>,
}

impl TestServer {
    /// Starts a sidecar with this TOML configuration (without the environment).
    pub async fn start(config_toml: &str) -> TestServer {
        let settings = Config::from_toml(config_toml).unwrap().validate().unwrap();
        let grpc = listener();
        let admin = listener();
        let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tiergate::server::run(settings, grpc, admin, async {
            let _ = stopped.await;
        }));
        TestServer { grpc_addr, admin_addr, stop: Some(stop), task: Some(task) }
    }

    /// A client of the Limiter service.
    pub async fn client(&self) -> LimiterClient<Channel> {
        client(self.grpc_addr).await
    }

    /// A channel to the gRPC port, for the health service.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr)).unwrap().connect().await.unwrap()
    }

    /// Triggers the shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), tiergate::server::RunError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }

    /// GET a path of the admin server: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_addr, path).await
    }
}

/// A tokio listener on a port from [`ports::listener`].
fn listener() -> TcpListener {
    let std = ports::listener();
    std.set_nonblocking(true).unwrap();
    TcpListener::from_std(std).unwrap()
}

/// Connects a Limiter client, retrying for a few seconds while the server comes up.
pub async fn client(addr: SocketAddr) -> LimiterClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match LimiterClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("no sidecar at {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, &[], b"").await
}

/// A minimal HTTP/1.1 request: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("an HTTP status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The real `tiergate serve` binary in its own process; killed on drop.
pub struct Sidecar {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts `tiergate serve --config <file>` with `config_toml` and extra environment, and waits
    /// until it serves or exits (a sidecar that refuses its configuration exits, and the test can
    /// read why from [`Sidecar::log`]). Starts again on new ports if another process took one.
    pub fn spawn(config_toml: &str, env: &[(&str, &str)]) -> Sidecar {
        Sidecar::spawn_program(env!("CARGO_BIN_EXE_tiergate").as_ref(), config_toml, env)
    }

    /// [`Sidecar::spawn`] with another build of `tiergate`, e.g. to compare two.
    pub fn spawn_program(program: &Path, config_toml: &str, env: &[(&str, &str)]) -> Sidecar {
        let mut last_log = String::new();
        for _ in 0..PORT_RETRIES {
            let mut sidecar = Sidecar::start(program, config_toml, env);
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if sidecar.serving() {
                    return sidecar;
                }
                if sidecar.child.try_wait().unwrap().is_some() {
                    // Read the log only now: the process is gone, so it has written everything.
                    if !sidecar.serving() && sidecar.log().contains("Address already in use") {
                        last_log = sidecar.log();
                        break;
                    }
                    return sidecar;
                }
                assert!(
                    Instant::now() < deadline,
                    "sidecar neither serving nor exited after {START_TIMEOUT:?}: {}",
                    sidecar.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("sidecar could not listen after {PORT_RETRIES} attempts (ports kept being taken): {last_log}");
    }

    /// Spawns the process on new ports without waiting.
    fn start(program: &Path, config_toml: &str, env: &[(&str, &str)]) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiergate.toml");
        std::fs::File::create(&path).unwrap().write_all(config_toml.as_bytes()).unwrap();
        let grpc_addr: SocketAddr = format!("127.0.0.1:{}", ports::free_port()).parse().unwrap();
        let admin_addr: SocketAddr = format!("127.0.0.1:{}", ports::free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(program)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .arg("--grpc-listen")
            .arg(grpc_addr.to_string())
            .arg("--admin-listen")
            .arg(admin_addr.to_string())
            .envs(env.iter().copied())
            .env("TIERGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Sidecar { grpc_addr, admin_addr, child, _dir: dir }
    }

    /// Whether the process logged that it serves on both of its addresses, i.e. it bound them
    /// itself (so whoever answers on them is this process, not another that took a port first).
    fn serving(&self) -> bool {
        let (grpc, admin) = (self.grpc_addr.to_string(), self.admin_addr.to_string());
        let names = |token: &str, addr: &str| token == addr || token.ends_with(&format!("={addr}"));
        self.log().lines().any(|line| {
            line.split_whitespace().any(|t| names(t, &grpc)) && line.split_whitespace().any(|t| names(t, &admin))
        })
    }

    /// A client, once the sidecar accepts connections.
    pub async fn client(&self) -> LimiterClient<Channel> {
        client(self.grpc_addr).await
    }

    /// The process id, e.g. to read its memory use.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the sidecar wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        self.wait(Duration::from_secs(20))
    }

    /// Waits for the process to exit; panics after `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sidecar still running after {limit:?}: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
