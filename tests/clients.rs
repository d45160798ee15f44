//! Clients that just work: the proto passes `buf lint` (with the exceptions `buf.yaml` justifies).
//!
//! `./scripts/test` installs buf (npm, into `target/buf`) when it is missing; a missing tool fails
//! these tests.

use std::path::{Path, PathBuf};
use std::process::Command;

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
