//! The `tiergate` command line: check-config, usage and help.

mod common;

use std::process::Command;

use common::server::Sidecar;
use tiergate::pb;

fn tiergate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tiergate")).args(args).env_remove("TIERGATE_STORE_HASH_KEY").output().unwrap()
}

#[test]
fn check_config_accepts_the_example_and_names_the_bad_key() {
    let out = tiergate(&["check-config", "deploy/tiergate.example.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("acme-prod = TIER_10K"), "{text}");
    assert!(text.contains("throughput    off") && text.contains("pair_rate     1 per 6s"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let on = dir.path().join("on.toml");
    std::fs::write(
        &on,
        "[policy]\nmode = \"shadow\"\n[policy.throughput]\nenabled = true\nnumbers = { \"1001\" = 1000 }\n",
    )
    .unwrap();
    let text = String::from_utf8_lossy(&tiergate(&["check-config", on.to_str().unwrap()]).stdout).into_owned();
    assert!(
        text.contains("mode          shadow")
            && text.contains("throughput    80 msg/s per number unless listed (1 listed)"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[policy]\ndefault_tier = \"TIER_1K\"\n").unwrap();
    let out = tiergate(&["check-config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy.default_tier") && err.contains("TIER_2K"), "{err}");

    std::fs::write(&bad, "[store]\ntimeout = \"soon\"\n").unwrap();
    let out = tiergate(&["check-config", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("timeout"), "{err}");
}

#[tokio::test]
async fn usage_asks_a_running_sidecar() {
    let sidecar = Sidecar::spawn("", &[]);
    let mut c = sidecar.client().await;
    let r = pb::AdmitRequest { portfolio_id: "acme".into(), recipient: "+15550000001".into(), ..Default::default() };
    c.admit(r).await.unwrap();
    let addr = format!("http://{}", sidecar.grpc_addr);
    let out = tiergate(&["usage", "--portfolio", "acme", "--addr", &addr]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("unique_recipients  1") && text.contains("limit              250"), "{text}");
    let out = tiergate(&["usage", "--portfolio", "not valid", "--addr", &addr]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("portfolio_id"));
}

#[test]
fn every_command_explains_itself() {
    for cmd in [&["--help"][..], &["serve", "--help"], &["check-config", "--help"], &["usage", "--help"]] {
        let out = tiergate(cmd);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: tiergate"), "{cmd:?}");
    }
    let out = tiergate(&["serve", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("TIERGATE_<SECTION>_<KEY>"));
}

#[test]
fn check_config_rejects_settings_that_cannot_be_meant_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiergate.toml");
    for (toml, keys) in [
        ("[policy]\nscope = \"phone_number\"\n", ["policy.scope", "policy.ladder"]),
        ("[policy.reserve]\nmarketing = 0.99999\n", ["policy.reserve.marketing", "policy.ladder"]),
    ] {
        std::fs::write(&file, toml).unwrap();
        let out = tiergate(&["check-config", file.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml}");
        assert!(keys.iter().all(|k| err.contains(k)), "{err}");
    }
}
