//! Clients that just work: the proto passes `buf lint` (with the exceptions `buf.yaml` justifies),
//! and `examples/python`, on stubs generated from the proto by grpcio-tools, sends through the
//! real `tiergate` binary.
//!
//! `./scripts/test` installs buf (npm, into `target/buf`) and grpcio-tools (PyPI, into the
//! virtualenv `target/ops-tools`) when they are missing; a missing tool fails these tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::{http_get, Sidecar};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool scripts/test installs under target/; a missing one fails the test.
fn installed(path: &str) -> PathBuf {
    let tool = repo().join(path);
    assert!(tool.is_file(), "{path} is missing; ./scripts/test installs it");
    tool
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{stdout}{stderr}", out.status);
    stdout.into_owned()
}

#[test]
fn the_proto_passes_buf_lint() {
    ok(Command::new(installed("target/buf/node_modules/.bin/buf")).arg("lint").current_dir(repo()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_admits_sends_releases_on_failure_and_paces_on_retry_after() {
    let python = installed("target/ops-tools/bin/python");
    let stubs = tempfile::tempdir().unwrap();
    let out = format!("--python_out={}", stubs.path().display());
    let grpc_out = format!("--grpc_python_out={}", stubs.path().display());
    ok(Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-Iproto", &out, &grpc_out, "proto/tiergate/v1/limiter.proto"])
        .current_dir(repo()));

    // Two recipients per 2 s: the fourth waits for the first to leave the window.
    let config = "[policy]\nwindow = \"2s\"\nladder = [{ name = \"T2\", limit = 2 }]\n";
    let sidecar = Sidecar::spawn(config, &[]);
    sidecar.client().await;
    let recipients = ["+15550000001", "+15550000002", "+15550000003", "+15550000004"];
    let stdout = ok(Command::new(&python)
        .arg(repo().join("examples/python/sender.py"))
        .args(["--portfolio", "acme", "--sender", "106540352242922", "--fail", "+15550000002"])
        .args(recipients)
        .env("PYTHONPATH", stubs.path())
        // The worker's address as the manifests give it: host:port, no http://.
        .env("TIERGATE_ADDR", sidecar.grpc_addr.to_string()));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert_eq!(
        lines[..3],
        [
            "…0001 admitted (NEW_RECIPIENT), sent",
            "…0002 admitted (NEW_RECIPIENT), send failed, slot released",
            "…0003 admitted (NEW_RECIPIENT), sent"
        ],
        "{stdout}"
    );
    assert!(lines[3].starts_with("…0004 denied (LIMIT_REACHED), retrying in "), "{stdout}");
    assert_eq!(lines[4..], ["…0004 admitted (NEW_RECIPIENT), sent", "sent 3, failed 1, denied 0"], "{stdout}");
    assert!(!stdout.contains("5550000"), "recipients are printed masked: {stdout}");

    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    assert!(metrics.lines().any(|l| l == r#"tiergate_releases_total{released="true"} 1"#), "{metrics}");
    assert!(metrics.lines().any(|l| l == r#"tiergate_grpc_requests_total{method="Admit",code="OK"} 5"#), "{metrics}");
}
