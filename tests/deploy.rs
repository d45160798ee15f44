//! Checks of `deploy/` with the tools that consume it: the Prometheus rules and their unit tests
//! (promtool), the Grafana dashboard's queries (promtool, against series shaped like tiergate's),
//! the kustomize overlays (`kubectl kustomize`, then `kubernetes-validate --strict`), and what
//! makes those manifests safe by default.
//!
//! `./scripts/test` installs promtool, kubectl and kubernetes-validate when they are missing
//! (kubernetes-validate into a virtualenv under `target/ops-tools`, whose Python also turns YAML
//! into JSON here). A missing tool fails these tests rather than skipping them.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// The admin port the manifests use (the default of `server.admin_listen` too).
const ADMIN_PORT: u64 = 9477;

/// The Kubernetes versions the manifests are validated against: the first with native sidecars,
/// and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];

/// Custom resources kubernetes-validate has no schema for. They are checked here by hand instead
/// (the PodMonitor's selector and port below; the PrometheusRule is the promtool-tested rules file).
const NOT_VALIDATED_KINDS: &[&str] = &["PodMonitor", "PrometheusRule"];

/// Series shaped like tiergate's, for evaluating the dashboard's queries: one per metric (two
/// pods for some), with the labels tiergate exports, as promtool input series.
const SERIES: &[(&str, &str)] = &[
    (r#"tiergate_decisions_total{decision="ADMITTED",reason="NEW_RECIPIENT"}"#, "0+5x30"),
    (r#"tiergate_decisions_total{decision="DENIED",reason="LIMIT_REACHED"}"#, "0+1x30"),
    (r#"tiergate_admit_duration_seconds_bucket{le="0.001"}"#, "0+9x30"),
    (r#"tiergate_admit_duration_seconds_bucket{le="0.01"}"#, "0+10x30"),
    (r#"tiergate_admit_duration_seconds_bucket{le="+Inf"}"#, "0+10x30"),
    (r#"tiergate_admit_duration_seconds_sum"#, "0+0.01x30"),
    (r#"tiergate_admit_duration_seconds_count"#, "0+10x30"),
    (r#"tiergate_unique_recipients{instance="a",portfolio="acme",sender=""}"#, "8000+0x30"),
    (r#"tiergate_unique_recipients{instance="b",portfolio="acme",sender=""}"#, "7000+0x30"),
    (r#"tiergate_limit{instance="a",portfolio="acme",sender=""}"#, "10000+0x30"),
    (r#"tiergate_limit{instance="b",portfolio="acme",sender=""}"#, "10000+0x30"),
    (r#"tiergate_store_errors_total{op="admit",kind="transient"}"#, "0+1x30"),
    (r#"tiergate_store_fail_open_total"#, "0+1x30"),
    (r#"tiergate_releases_total{released="true"}"#, "0+1x30"),
    (r#"tiergate_inbound_total"#, "0+1x30"),
    (r#"tiergate_denials_total{portfolio="acme",reason="LIMIT_REACHED"}"#, "0+1x30"),
    (r#"tiergate_quality{portfolio="acme",sender=""}"#, "3+0x30"),
    (r#"tiergate_sender_status{portfolio="acme",sender="1",status="CONNECTED"}"#, "0+0x30"),
    (r#"tiergate_sender_status{portfolio="acme",sender="1",status="FLAGGED"}"#, "1+0x30"),
    (r#"tiergate_unique_recipients_7d{portfolio="acme",sender=""}"#, "6000+0x30"),
    (r#"tiergate_upgrade_threshold{portfolio="acme",sender=""}"#, "5000+0x30"),
    (r#"tiergate_upgrade_eligible{portfolio="acme",sender=""}"#, "1+0x30"),
    (r#"tiergate_webhook_deliveries_total{outcome="applied"}"#, "0+1x30"),
    (r#"tiergate_webhook_changes_total{field="messages",outcome="applied"}"#, "0+1x30"),
    (r#"tiergate_grpc_requests_total{method="Admit",code="OK"}"#, "0+10x30"),
    (r#"tiergate_grpc_request_duration_seconds_bucket{method="Admit",le="0.001"}"#, "0+9x30"),
    (r#"tiergate_grpc_request_duration_seconds_bucket{method="Admit",le="+Inf"}"#, "0+10x30"),
    (r#"tiergate_grpc_request_duration_seconds_sum{method="Admit"}"#, "0+0.01x30"),
    (r#"tiergate_grpc_request_duration_seconds_count{method="Admit"}"#, "0+10x30"),
    (r#"tiergate_store_policy_mismatch{instance="a"}"#, "0+0x30"),
    (r#"tiergate_webhooks_configured{instance="a"}"#, "1+0x30"),
    (r#"tiergate_webhook_last_received_timestamp_seconds{instance="a"}"#, "0+60x30"),
    (r#"tiergate_metrics_portfolios_folded_total"#, "0+0x30"),
];

/// Metrics with a `portfolio` label: a dashboard query on them must honour `$portfolio`.
const PORTFOLIO_METRICS: &[&str] = &[
    "tiergate_unique_recipients",
    "tiergate_limit",
    "tiergate_denials_total",
    "tiergate_quality",
    "tiergate_sender_status",
    "tiergate_unique_recipients_7d",
    "tiergate_upgrade_threshold",
    "tiergate_upgrade_eligible",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A tool from the virtualenv scripts/test makes, or else from PATH; a missing one fails the test.
fn tool(name: &str) -> PathBuf {
    let local = repo().join("target/ops-tools/bin").join(name);
    if local.is_file() {
        return local;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed; ./scripts/test installs it (promtool: Debian's prometheus, kubectl: \
                 kubernetes-client, kubernetes-validate: PyPI, into target/ops-tools)"
            )
        })
}

/// Runs a command, feeding it `stdin`; returns whether it succeeded and its stdout + stderr.
fn run(cmd: &mut Command, stdin: Option<&str>) -> (bool, String) {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Prints the documents of the YAML on stdin as a JSON list. JSON has no infinity (`.inf` in
/// promtool tests), so those become strings.
const YAML_TO_JSON: &str = r#"
import json, math, sys, yaml

def plain(v):
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v

json.dump([plain(d) for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)
"#;

/// Every document of a YAML stream, as JSON (PyYAML, from kubernetes-validate's virtualenv).
fn yaml_docs(yaml: &str) -> Vec<Value> {
    let (success, out) = run(Command::new(tool("python3")).args(["-c", YAML_TO_JSON]), Some(yaml));
    assert!(success, "YAML that PyYAML does not read: {out}");
    match serde_json::from_str(&out).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("not a list: {other}"),
    }
}

fn yaml_file(path: &str) -> Value {
    let mut docs = yaml_docs(&read(path));
    assert_eq!(docs.len(), 1, "{path}: one document expected");
    docs.remove(0)
}

fn promtool() -> Command {
    Command::new(tool("promtool"))
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

// --- Prometheus rules ---------------------------------------------------------------------------

/// The alerts that must exist, whatever else is added.
const REQUIRED_ALERTS: &[&str] = &[
    "TiergateUsageHigh",
    "TiergateUsageNearLimit",
    "TiergateLimitReached",
    "TiergateStoreErrors",
    "TiergateStoreFailOpen",
    "TiergateStorePolicyMismatch",
    "TiergateWebhookDeliveriesFailing",
    "TiergateWebhooksUnauthorized",
    "TiergateWebhooksSilent",
    "TiergateUpgradeEligible",
    "TiergateUpgradeBlockedByQuality",
];

#[test]
fn alert_rules_pass_promtool_and_each_alert_is_tested_both_ways() {
    let dir = repo().join("deploy/prometheus");
    ok(promtool().args(["check", "rules", "tiergate.rules.yml"]).current_dir(&dir));
    ok(promtool().args(["test", "rules", "tiergate.rules.test.yml"]).current_dir(&dir));

    let rules = yaml_file("deploy/prometheus/tiergate.rules.yml");
    let tests = yaml_file("deploy/prometheus/tiergate.rules.test.yml");
    let readme = read("README.md");
    let all: Vec<&Value> = array(&rules["groups"]).iter().flat_map(|g| array(&g["rules"])).collect();
    let alerts: Vec<&Value> = all.iter().copied().filter(|r| r["alert"].is_string()).collect();
    let names: BTreeSet<&str> = alerts.iter().map(|r| str_of(&r["alert"])).collect();
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "no alert {required}");
    }
    let cases: Vec<&Value> = array(&tests["tests"]).iter().flat_map(|t| array(&t["alert_rule_test"])).collect();
    for rule in &alerts {
        let name = str_of(&rule["alert"]);
        let severity = str_of(&rule["labels"]["severity"]);
        assert!(["critical", "warning", "info"].contains(&severity), "{name}: severity {severity:?}");
        let (summary, description) =
            (str_of(&rule["annotations"]["summary"]), str_of(&rule["annotations"]["description"]));
        assert!(!summary.is_empty() && !description.is_empty(), "{name}: summary and description");
        let anchor = name.to_lowercase();
        let runbook = str_of(&rule["annotations"]["runbook_url"]);
        assert!(runbook.ends_with(&format!("README.md#{anchor}")), "{name}: runbook_url {runbook:?}");
        assert!(readme.contains(&format!("<a id=\"{anchor}\"></a>")), "{name}: no runbook anchor in README.md");

        let mine: Vec<&Value> = cases.iter().copied().filter(|c| str_of(&c["alertname"]) == name).collect();
        let expected: Vec<&Value> = mine.iter().flat_map(|c| array(&c["exp_alerts"])).collect();
        assert!(!expected.is_empty(), "{name}: no test where it fires");
        assert!(mine.iter().any(|c| array(&c["exp_alerts"]).is_empty()), "{name}: no test where it stays quiet");
        if expected.iter().any(|a| a["exp_labels"]["portfolio"].is_string()) {
            for text in [summary, description] {
                assert!(text.contains("$labels.portfolio"), "{name}: {text:?} does not name the portfolio");
            }
        }
    }
    let expr_tests: Vec<&str> =
        array(&tests["tests"]).iter().flat_map(|t| array(&t["promql_expr_test"])).map(|c| str_of(&c["expr"])).collect();
    for record in all.iter().filter_map(|r| r["record"].as_str()) {
        assert!(expr_tests.iter().any(|e| e.contains(record)), "recording rule {record} is not tested");
    }
}

/// The PrometheusRule that holds tiergate.rules.yml: its header, then the file's groups under
/// `spec:` (its leading comment dropped).
fn prometheus_rule_from(rules: &str) -> String {
    let mut out = String::from(
        "# Generated from tiergate.rules.yml, which is the file to edit; then run\n\
         # `UPDATE_DEPLOY=1 cargo test --test deploy` to regenerate this one.\n\
         # The Prometheus Operator's form of those rules. Your Prometheus must select it: add the labels\n\
         # its ruleSelector expects (e.g. `release: kube-prometheus-stack`).\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: tiergate\n  labels:\n    app.kubernetes.io/name: tiergate\n\
         spec:\n",
    );
    let body = rules.lines().skip_while(|l| l.is_empty() || l.starts_with('#'));
    for line in body {
        if !line.is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn prometheus_rule_holds_the_rules_file() {
    let rules = read("deploy/prometheus/tiergate.rules.yml");
    let expected = prometheus_rule_from(&rules);
    let path = repo().join("deploy/prometheus/prometheusrule.yaml");
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    if actual != expected {
        if std::env::var_os("UPDATE_DEPLOY").is_some() {
            std::fs::write(&path, &expected).unwrap();
        } else {
            panic!(
                "deploy/prometheus/prometheusrule.yaml differs from tiergate.rules.yml; regenerate it with \
                 `UPDATE_DEPLOY=1 cargo test --test deploy`"
            );
        }
    }
    // The same rules once parsed, not just the same text.
    let rule = yaml_file("deploy/prometheus/prometheusrule.yaml");
    assert_eq!(rule["spec"], yaml_file("deploy/prometheus/tiergate.rules.yml"));
    assert_eq!(rule["kind"], "PrometheusRule");
}

// --- Metric names -------------------------------------------------------------------------------

/// `tiergate_*` names in `text`, skipping recording rules (`level:metric:operation`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    for token in text.split(|c: char| !is_name(c)) {
        if token.starts_with("tiergate_") && !token.contains(':') {
            names.insert(token.to_string());
        }
    }
    names
}

/// What tiergate exports: the names in src/metrics.rs, with a histogram's series.
fn exported() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    let mut names: BTreeSet<String> = metric_names(&source);
    let histograms: Vec<String> = names.iter().filter(|n| n.ends_with("_duration_seconds")).cloned().collect();
    for h in histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{suffix}"));
        }
    }
    names
}

#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    let exported = exported();
    for name in ["tiergate_unique_recipients", "tiergate_limit", "tiergate_denials_total", "tiergate_upgrade_eligible"]
    {
        assert!(exported.contains(name), "src/metrics.rs no longer names {name}");
    }
    for path in [
        "deploy/prometheus/tiergate.rules.yml",
        "deploy/prometheus/tiergate.rules.test.yml",
        "deploy/grafana/tiergate.json",
    ] {
        let unknown: Vec<String> = metric_names(&read(path)).difference(&exported).cloned().collect();
        assert!(unknown.is_empty(), "{path} uses metrics tiergate does not export: {unknown:?}");
    }
    let synthetic: String = SERIES.iter().map(|(s, _)| *s).collect::<Vec<_>>().join("\n");
    let unknown: Vec<String> = metric_names(&synthetic).difference(&exported).cloned().collect();
    assert!(unknown.is_empty(), "test series of unknown metrics: {unknown:?}");
}

// --- Grafana ------------------------------------------------------------------------------------

/// Every `expr` string anywhere in the dashboard, with the title of the panel it is in.
fn exprs(v: &Value, panel: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            let panel =
                map.get("title").and_then(Value::as_str).filter(|_| map.contains_key("gridPos")).unwrap_or(panel);
            for (k, child) in map {
                match (k.as_str(), child) {
                    ("expr", Value::String(e)) => out.push((panel.to_string(), e.clone())),
                    _ => exprs(child, panel, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| exprs(i, panel, out)),
        _ => {}
    }
}

/// A dashboard query as plain PromQL: Grafana's interval variables become 5m, `$portfolio` the
/// "All" value.
fn substitute(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in [
        ("${__rate_interval}", "5m"),
        ("$__rate_interval", "5m"),
        ("${__interval}", "5m"),
        ("$__interval", "5m"),
        ("${__range}", "5m"),
        ("$__range", "5m"),
        ("${portfolio}", ".*"),
        ("$portfolio", ".*"),
    ] {
        e = e.replace(var, value);
    }
    assert!(!e.contains('$'), "a dashboard variable this test does not know: {expr}");
    e
}

#[test]
fn dashboard_queries_parse_and_return_data() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/tiergate.json")).unwrap();
    let vars = array(&dashboard["templating"]["list"]);
    let portfolio = vars.iter().find(|v| v["name"] == "portfolio").expect("a `portfolio` template variable");
    assert_eq!(portfolio["type"], "query");
    assert_eq!(portfolio["includeAll"], true);
    assert_eq!(portfolio["allValue"], ".*");

    let mut queries = Vec::new();
    exprs(&dashboard["panels"], "", &mut queries);
    assert!(queries.len() >= 15, "only {} queries", queries.len());
    // A query variable's `label_values(<selector>, <label>)`: its selector must parse and match.
    for var in vars.iter().filter(|v| v["type"] == "query") {
        let q = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap_or_default();
        let inner = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')).unwrap_or_else(|| {
            panic!("variable {}: only label_values(<selector>, <label>) is checked here: {q}", var["name"])
        });
        let (selector, _label) = inner.rsplit_once(',').unwrap();
        queries.push((format!("variable {}", var["name"]), selector.trim().to_string()));
    }
    for (panel, expr) in &queries {
        let by_portfolio = PORTFOLIO_METRICS.iter().any(|m| metric_names(expr).contains(*m));
        assert!(
            !by_portfolio || expr.contains(r#"portfolio=~"$portfolio""#) || panel.starts_with("variable"),
            "{panel}: {expr} ignores the portfolio variable"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    // Each query as a recording rule, for `promtool check rules` (a JSON string is a YAML string).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        rules += &format!("      - record: dashboard:query_{i}\n        expr: {}\n", json!(substitute(expr)));
    }
    std::fs::write(dir.path().join("dashboard.rules.yml"), &rules).unwrap();
    ok(promtool().args(["check", "rules", "dashboard.rules.yml"]).current_dir(dir.path()));

    // Each query must return something on series shaped like tiergate's: 1 when it does, else 0.
    let mut tests =
        String::from("rule_files: []\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n");
    for (series, values) in SERIES {
        tests += &format!("      - series: {}\n        values: {}\n", json!(series), json!(values));
    }
    tests += "    promql_expr_test:\n";
    for (_, expr) in &queries {
        let probe = format!("(vector(1) and on() count({})) or vector(0)", substitute(expr));
        tests += &format!(
            "      - expr: {}\n        eval_time: 20m\n        exp_samples:\n          - labels: '{{}}'\n            value: 1\n",
            json!(probe)
        );
    }
    std::fs::write(dir.path().join("dashboard.test.yml"), &tests).unwrap();
    let (success, out) = run(promtool().args(["test", "rules", "dashboard.test.yml"]).current_dir(dir.path()), None);
    assert!(success, "a dashboard query returns nothing on tiergate's series (value 0 below):\n{out}");
}

// --- Kubernetes -----------------------------------------------------------------------------

/// `kubectl kustomize` of a directory of deploy/, as JSON documents.
fn render(dir: &str) -> Vec<Value> {
    let yaml = ok(Command::new(tool("kubectl")).args(["kustomize", dir]).current_dir(repo()));
    yaml_docs(&yaml)
}

/// Validates the documents with kubernetes-validate --strict against every version in
/// [`KUBERNETES_VERSIONS`]; returns whether they passed and its output.
fn kubernetes_validate(docs: &[&Value]) -> (bool, String) {
    let stream: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    // A file, not stdin: it is read once per version.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, stream.join("\n---\n")).unwrap();
    let mut cmd = Command::new(tool("kubernetes-validate"));
    cmd.arg("--strict");
    for v in KUBERNETES_VERSIONS {
        cmd.args(["-k", v]);
    }
    let (success, out) = run(cmd.arg(&file), None);
    let clean = !out.contains("WARN") && !out.contains("ERROR") && !out.contains("FATAL");
    (success && clean, out)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], k: &str, name: &str) -> &'a Value {
    kind(docs, k).into_iter().find(|d| d["metadata"]["name"] == name).unwrap_or_else(|| panic!("no {k} {name}"))
}

/// Whether every `matchLabels` pair is among `labels`.
fn selects(match_labels: &Value, labels: &Value) -> bool {
    let m = match_labels.as_object().expect("matchLabels");
    !m.is_empty() && m.iter().all(|(k, v)| labels[k] == *v)
}

const OVERLAYS: &[&str] = &["deploy/overlays/worker", "deploy/overlays/webhook-receiver"];

#[test]
fn overlays_render_and_pass_strict_validation() {
    // The validator is strict indeed: a misspelt field fails.
    let typo =
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": false});
    let (passed, out) = kubernetes_validate(&[&typo]);
    assert!(!passed, "kubernetes-validate --strict accepted an unknown field:\n{out}");

    for dir in OVERLAYS.iter().copied().chain(["deploy/prometheus"]) {
        let docs = render(dir);
        assert!(!docs.is_empty(), "{dir} renders nothing");
        let (skipped, checked): (Vec<&Value>, Vec<&Value>) =
            docs.iter().partition(|d| NOT_VALIDATED_KINDS.contains(&str_of(&d["kind"])));
        let skipped: Vec<String> =
            skipped.iter().map(|d| format!("{}/{}", str_of(&d["kind"]), str_of(&d["metadata"]["name"]))).collect();
        eprintln!("{dir}: not validated by kubernetes-validate (custom resources without a schema): {skipped:?}");
        if checked.is_empty() {
            continue;
        }
        let (passed, out) = kubernetes_validate(&checked);
        assert!(passed, "{dir} does not validate:\n{out}");
        let passes = out.lines().filter(|l| l.contains(" passed for resource ")).count();
        assert_eq!(passes, checked.len() * KUBERNETES_VERSIONS.len(), "{dir}:\n{out}");
    }
}

/// Checks a workload's pod template: no API token, non-root, read-only, no capabilities, bounded
/// resources, tiergate's admin port only, the configuration from the rendered ConfigMap, and a
/// NetworkPolicy and PodDisruptionBudget that select it. Returns its pod labels.
fn check_workload<'a>(docs: &'a [Value], deployment: &'a Value) -> &'a Value {
    let name = str_of(&deployment["metadata"]["name"]);
    let template = &deployment["spec"]["template"];
    let (pod, labels) = (&template["spec"], &template["metadata"]["labels"]);
    assert_eq!(pod["automountServiceAccountToken"], false, "{name}: mounts an API token");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    assert_eq!(template["metadata"]["annotations"]["prometheus.io/port"], ADMIN_PORT.to_string(), "{name}");

    let containers: Vec<&Value> = array(&pod["containers"]).iter().chain(array(&pod["initContainers"])).collect();
    for c in &containers {
        let what = format!("{name}/{}", str_of(&c["name"]));
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
        for r in ["cpu", "memory"] {
            assert!(c["resources"]["requests"][r].is_string(), "{what}: no {r} request");
        }
        assert!(c["resources"]["limits"]["memory"].is_string(), "{what}: no memory limit");
        for env in array(&c["env"]) {
            let var = str_of(&env["name"]);
            let secret = ["TOKEN", "SECRET", "HASH_KEY", "STORE_URL"].iter().any(|s| var.contains(s));
            assert!(!secret || env["value"].is_null(), "{what}: {var} is written into the manifest");
        }
    }
    let tiergate = containers.iter().find(|c| c["name"] == "tiergate").unwrap_or_else(|| panic!("{name}: no tiergate"));
    assert_eq!(
        tiergate["ports"],
        json!([{"name": "metrics", "containerPort": ADMIN_PORT, "protocol": "TCP"}]),
        "{name}"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(tiergate[probe]["httpGet"]["port"], "metrics", "{name}: {probe}");
    }
    assert_eq!(tiergate["args"], json!(["serve", "--config", "/etc/tiergate/tiergate.toml"]), "{name}");
    let mount =
        array(&tiergate["volumeMounts"]).iter().find(|m| m["mountPath"] == "/etc/tiergate").expect("config mount");
    let volume = array(&pod["volumes"]).iter().find(|v| v["name"] == mount["name"]).expect("config volume");
    let config_map = str_of(&volume["configMap"]["name"]);
    assert!(config_map.starts_with("tiergate-config-"), "{name}: {config_map} is not the generated ConfigMap");
    named(docs, "ConfigMap", config_map);

    let policies: Vec<&Value> = kind(docs, "NetworkPolicy")
        .into_iter()
        .filter(|p| selects(&p["spec"]["podSelector"]["matchLabels"], labels))
        .collect();
    assert_eq!(policies.len(), 1, "{name}: one NetworkPolicy should select its pods");
    let policy = &policies[0]["spec"];
    assert!(array(&policy["policyTypes"]).contains(&json!("Ingress")), "{name}");
    assert!(!array(&policy["ingress"]).is_empty(), "{name}");
    for rule in array(&policy["ingress"]) {
        assert_eq!(rule["ports"], json!([{"protocol": "TCP", "port": ADMIN_PORT}]), "{name}: only the admin port");
        assert!(!array(&rule["from"]).is_empty(), "{name}: a rule that admits everyone");
    }
    let budgets: Vec<&Value> = kind(docs, "PodDisruptionBudget")
        .into_iter()
        .filter(|p| selects(&p["spec"]["selector"]["matchLabels"], labels))
        .collect();
    assert_eq!(budgets.len(), 1, "{name}: one PodDisruptionBudget should select its pods");
    labels
}

/// `tiergate check-config` on the rendered tiergate.toml with exactly these variables.
fn check_config(toml: &str, env: &[(String, String)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiergate.toml");
    std::fs::write(&file, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiergate"));
    cmd.env_clear().envs(env.iter().cloned()).arg("check-config").arg(&file);
    run(&mut cmd, None)
}

fn secret_env(docs: &[Value], name: &str) -> Vec<(String, String)> {
    let data = named(docs, "Secret", name)["stringData"].as_object().cloned().unwrap_or_default();
    data.into_iter().map(|(k, v)| (k, v.as_str().unwrap().to_string())).collect()
}

#[test]
fn overlays_are_safe_by_default() {
    let worker = render("deploy/overlays/worker");
    let receiver = render("deploy/overlays/webhook-receiver");
    let monitoring = render("deploy/prometheus");

    // The worker: tiergate as a native sidecar; nothing of it exposed beyond the NetworkPolicy.
    let sender = named(&worker, "Deployment", "sender");
    let sender_labels = check_workload(&worker, sender);
    let sidecar = array(&sender["spec"]["template"]["spec"]["initContainers"]).iter().find(|c| c["name"] == "tiergate");
    assert_eq!(sidecar.expect("tiergate as an init container")["restartPolicy"], "Always");
    assert!(kind(&worker, "Service").is_empty() && kind(&worker, "Ingress").is_empty());

    // The receiver: reachable only through the Ingress, and only at /webhooks/whatsapp.
    let deployment = named(&receiver, "Deployment", "tiergate-webhooks");
    let receiver_labels = check_workload(&receiver, deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tiergate");
    assert_eq!(named(&receiver, "ServiceAccount", "tiergate")["automountServiceAccountToken"], false);
    let service = named(&receiver, "Service", "tiergate-webhooks");
    assert!(selects(&service["spec"]["selector"], receiver_labels));
    assert_eq!(service["spec"]["type"], "ClusterIP");
    let port = &array(&service["spec"]["ports"])[0];
    assert_eq!(port["targetPort"], "metrics");
    let [ingress] = kind(&receiver, "Ingress")[..] else { panic!("one Ingress") };
    let rules = array(&ingress["spec"]["rules"]);
    let paths: Vec<&Value> = rules.iter().flat_map(|r| array(&r["http"]["paths"])).collect();
    assert_eq!(paths.len(), 1, "only /webhooks/whatsapp is routed");
    assert_eq!(paths[0]["path"], "/webhooks/whatsapp");
    assert_eq!(paths[0]["pathType"], "Exact");
    assert_eq!(paths[0]["backend"]["service"], json!({"name": "tiergate-webhooks", "port": {"name": port["name"]}}));
    assert!(!array(&ingress["spec"]["tls"]).is_empty(), "Meta delivers over HTTPS only");
    // The webhook secrets: required keys of a Secret that ships without values.
    let env = array(&pod["containers"][0]["env"]);
    for key in ["TIERGATE_WEBHOOKS_APP_SECRET", "TIERGATE_WEBHOOKS_VERIFY_TOKEN"] {
        let var = env.iter().find(|e| e["name"] == key).unwrap_or_else(|| panic!("no {key}"));
        let source = &var["valueFrom"]["secretKeyRef"];
        assert_eq!(source, &json!({"name": "tiergate-webhooks", "key": key}), "{key} must be required");
    }
    assert!(secret_env(&receiver, "tiergate-webhooks").is_empty(), "webhook secrets must not ship with values");

    // The PodMonitor scrapes both workloads' admin port.
    let [monitor] = kind(&monitoring, "PodMonitor")[..] else { panic!("one PodMonitor") };
    let selector = &monitor["spec"]["selector"]["matchExpressions"][0];
    assert_eq!((&selector["key"], &selector["operator"]), (&json!("app"), &json!("In")));
    for labels in [sender_labels, receiver_labels] {
        assert!(array(&selector["values"]).contains(&labels["app"]), "the PodMonitor misses app={}", labels["app"]);
    }
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(kind(&monitoring, "PrometheusRule").len(), 1);

    // The configuration both share: gRPC on loopback, the admin port; tiergate refuses to start
    // with any placeholder from the Secrets, and accepts real values.
    let config = kind(&worker, "ConfigMap")[0];
    assert_eq!(config, kind(&receiver, "ConfigMap")[0], "both overlays share one configuration");
    let toml = str_of(&config["data"]["tiergate.toml"]);
    let placeholders: Vec<(String, String)> =
        secret_env(&worker, "tiergate-store").into_iter().chain(secret_env(&worker, "tiergate-tokens")).collect();
    let real = |key: &str| match key {
        "TIERGATE_STORE_URL" => "redis://:pw@redis:6379/0".to_string(),
        _ => format!("{:x<40}", key.to_lowercase()),
    };
    let valid: Vec<(String, String)> = placeholders.iter().map(|(k, _)| (k.clone(), real(k))).collect();
    let (passed, out) = check_config(toml, &valid);
    assert!(passed, "{out}");
    for line in [
        "grpc_listen   127.0.0.1:50051",
        &format!("admin_listen  0.0.0.0:{ADMIN_PORT}"),
        "store         redis",
        "api tokens    sender set, admin set",
    ] {
        assert!(out.contains(line), "check-config does not say {line:?}:\n{out}");
    }
    for (key, placeholder) in placeholders.iter().filter(|(k, _)| k != "TIERGATE_STORE_URL") {
        let env: Vec<(String, String)> =
            valid.iter().map(|(k, v)| (k.clone(), if k == key { placeholder.clone() } else { v.clone() })).collect();
        let (passed, out) = check_config(toml, &env);
        assert!(!passed, "tiergate starts with the placeholder {key}={placeholder:?}:\n{out}");
    }
    let mut with_webhooks = valid.clone();
    with_webhooks.push(("TIERGATE_WEBHOOKS_APP_SECRET".into(), "0123456789abcdef".into()));
    with_webhooks.push(("TIERGATE_WEBHOOKS_VERIFY_TOKEN".into(), "fedcba9876543210".into()));
    let (passed, out) = check_config(toml, &with_webhooks);
    assert!(passed && out.contains("webhooks      on, at /webhooks/whatsapp"), "{out}");
}

// --- The image -----------------------------------------------------------------------------------

/// No docker here, so the Dockerfile is read rather than built: a minimal runtime stage that runs
/// as the non-root user the manifests expect, and a release profile that strips the binary.
#[test]
fn the_image_is_minimal_stripped_and_non_root() {
    let dockerfile = read("deploy/Dockerfile");
    let instructions: Vec<&str> =
        dockerfile.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let last_from = instructions.iter().rposition(|l| l.starts_with("FROM ")).expect("a FROM");
    let runtime = &instructions[last_from..];
    assert!(runtime[0].starts_with("FROM gcr.io/distroless/"), "a distroless runtime stage: {}", runtime[0]);
    assert!(!runtime.iter().any(|l| l.starts_with("RUN ")), "nothing runs in the runtime stage: {runtime:?}");
    let user = runtime.iter().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER in the runtime stage");
    let uid: u32 = user.split(':').next().unwrap().parse().expect("a numeric USER, for runAsNonRoot");
    assert_eq!(uid, 65532, "the uid the manifests run as");
    assert!(runtime.iter().any(|l| l.starts_with("ENTRYPOINT [\"/usr/local/bin/tiergate\"]")), "{runtime:?}");

    let cargo: toml::Table = read("Cargo.toml").parse().unwrap();
    assert_eq!(cargo["profile"]["release"]["strip"].as_bool(), Some(true), "the release binary is stripped");
}
