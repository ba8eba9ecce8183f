//! `igwctl` as users run it: on the shared Kubernetes examples (the copy in
//! tests/fixtures/k8s-examples, kept equal to /work/shared/k8s-examples when that
//! exists), and on invalid input in a temporary directory.

use inference_gateway::collector::config::CollectorConfig;
use inference_gateway::k8s::render::validate_plugin_config;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_igwctl");
const SHARED: &str = "/work/shared/k8s-examples";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/k8s-examples")
}

/// Every valid example without the two that redefine objects of the same name.
const VALID: [&str; 12] = [
    "alerts.yaml",
    "apigee-extension.yaml",
    "backend-policy-logging.yaml",
    "backend-policy-scopes.yaml",
    "hpa.yaml",
    "httproute-split-50-50.yaml",
    "inferencemodel-v1alpha2.yaml",
    "inferenceobjectives.yaml",
    "inferencepool-v1.yaml",
    "inferencepool-v1alpha2.yaml",
    "metrics-scraping.yaml",
    "model-armor-extension-settings.yaml",
];

fn igwctl(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run igwctl")
}

fn with_files(mut args: Vec<String>, dir: &Path, names: &[&str]) -> Vec<String> {
    for n in names {
        args.push("-f".into());
        args.push(dir.join(n).display().to_string());
    }
    args
}

fn run(args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    igwctl(&refs)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn fixtures_match_the_shared_examples() {
    let Ok(entries) = std::fs::read_dir(SHARED) else {
        eprintln!("{SHARED} not present: skipped");
        return;
    };
    for e in entries {
        let e = e.unwrap();
        let ours = examples().join(e.file_name());
        assert_eq!(
            std::fs::read(e.path()).unwrap(),
            std::fs::read(&ours).unwrap_or_default(),
            "{} differs from {}: copy it again",
            ours.display(),
            e.path().display()
        );
    }
}

#[test]
fn the_examples_directory_is_refused_naming_the_invalid_file() {
    let mut dirs = vec![examples()];
    if Path::new(SHARED).is_dir() {
        dirs.push(PathBuf::from(SHARED));
    }
    for dir in dirs {
        let out = igwctl(&["check", "-f", dir.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("backend-policy-invalid.yaml[0] spec.default.scopes[0].maxInFlightPerEndpoint: the default level sets it (balancingMode IN_FLIGHT): a field set at the default level may not also appear in a scope"),
            "{err}"
        );
        // Two examples define llm-route and two my-model-armor-extension.
        assert!(
            err.contains("HTTPRoute default/llm-route is also defined at"),
            "{err}"
        );
        assert!(err.contains("3 error(s)"), "{err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn render_writes_outputs_that_their_parsers_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let args = with_files(
        vec![
            "render".into(),
            "--out".into(),
            out_dir.display().to_string(),
        ],
        &examples(),
        &VALID,
    );
    let out = run(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for expected in [
        "route default/llm-route (Gateway inference-gateway) spec.rules[0]: vllm-llama3-8b-instruct-preview 50 (50 %), vllm-llama3-8b-instruct-ga 50 (50 %)",
        "not honoured:",
        "ignored:",
        "hpa.yaml[0] autoscaling/v2 HorizontalPodAutoscaler vllm-llama3-8b-instruct",
        "alerts.yaml[0] (no apiVersion/kind: not a Kubernetes object)",
    ] {
        assert!(stdout.contains(expected), "{expected}\n{stdout}");
    }
    let plugin: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("plugin-config.json")).unwrap())
            .unwrap();
    validate_plugin_config(&plugin).unwrap();
    assert_eq!(plugin["backends"].as_array().unwrap().len(), 2);
    let collector = std::fs::read_to_string(out_dir.join("collector.yaml")).unwrap();
    CollectorConfig::parse(&collector, false, |_| Some("0123456789abcdef".into())).unwrap();
    let envoy = std::fs::read_to_string(out_dir.join("envoy.yaml")).unwrap();
    serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&envoy).unwrap();
    let services = std::fs::read_to_string(out_dir.join("services.yaml")).unwrap();
    assert_eq!(services.matches("kind: Service").count(), 2);
    assert!(out_dir.join("report.txt").exists());

    // Same inputs, again: byte for byte the same outputs.
    let again = tmp.path().join("again");
    let args2 = with_files(
        vec!["render".into(), "--out".into(), again.display().to_string()],
        &examples(),
        &VALID,
    );
    assert_eq!(run(&args2).status.code(), Some(0));
    for f in [
        "plugin-config.json",
        "collector.yaml",
        "envoy.yaml",
        "services.yaml",
        "report.txt",
    ] {
        assert_eq!(
            std::fs::read(out_dir.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn render_to_stdout_as_json() {
    let args = with_files(
        vec!["render".into(), "--format".into(), "json".into()],
        &examples(),
        &["inferencepool-v1.yaml", "httproute-ga-100.yaml"],
    );
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["plugin_config"]["default_pool"],
        "vllm-llama3-8b-instruct-ga"
    );
    assert!(v["envoy_bootstrap"]["static_resources"]["listeners"].is_array());
}

#[test]
fn invalid_input_exits_2_naming_file_document_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = std::fs::read_to_string(examples().join("inferencepool-v1.yaml")).unwrap();
    std::fs::write(tmp.path().join("pool.yaml"), &pool).unwrap();
    std::fs::write(
        tmp.path().join("llm-route.yaml"),
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: llm-route}\nspec:\n  rules:\n  - backendRefs:\n\
         \x20   - {group: inference.networking.k8s.io, kind: InferencePool, name: vllm-llama3-8b-instruct-ga, weight: 1}\n\
         \x20   - {group: inference.networking.k8s.io, kind: InferencePool, name: vllm-llama3-8b-instruct-ga, weight: -5}\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("typo.yaml"),
        pool.replace("targetPorts", "targetPort")
            .replace("-ga", "-typo"),
    )
    .unwrap();
    for cmd in ["check", "render", "migrate"] {
        let out = igwctl(&[cmd, "-f", tmp.path().to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("llm-route.yaml[1] spec.rules[0].backendRefs[1].weight: must be ≥ 0"),
            "{err}"
        );
        assert!(
            err.contains("typo.yaml[0] spec.targetPort: unknown field: did you mean targetPorts?"),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "{cmd}");
    }
    let out = igwctl(&[
        "check",
        "-f",
        tmp.path().join("missing.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("missing.yaml: cannot read"));
}

#[test]
fn migrate_then_render() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("mig");
    let args = with_files(
        vec![
            "migrate".into(),
            "--out".into(),
            out_dir.display().to_string(),
        ],
        &examples(),
        &[
            "inferencepool-v1alpha2.yaml",
            "inferencemodel-v1alpha2.yaml",
        ],
    );
    let out = run(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("1) Deploy the v1 resources side by side"),
        "{stdout}"
    );
    assert!(stdout.contains(
        "kubectl delete inferencemodels.inference.networking.x-k8s.io food-review -n default"
    ));
    let split = std::fs::read_to_string(out_dir.join("phase2-httproute-split.yaml")).unwrap();
    assert_eq!(split.matches("weight: 50").count(), 2, "{split}");
    let migrated = out_dir.join("migrated.yaml");
    let out = igwctl(&["check", "-f", migrated.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("model food-review → pool vllm-llama3-8b-instruct-ga, Standard, rewritten to food-review-1 (90), food-review-2 (10)"));
}

#[test]
fn watch_renders_once_per_change() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let args = with_files(
        vec![
            "watch".into(),
            "--out".into(),
            out_dir.display().to_string(),
            "--interval-ms".into(),
            "50".into(),
            "--max-ticks".into(),
            "3".into(),
        ],
        &examples(),
        &["inferencepool-v1.yaml"],
    );
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).matches("rendered into").count(),
        1,
        "{}",
        text(&out.stdout)
    );
    assert!(out_dir.join("envoy.yaml").exists());
}

const KEY_TEAM: &str = "sk-team-a-7f3e9c1d2b";
const KEY_BATCH: &str = "sk-batch-0a9b8c7d6e";

/// An API-key Secret (one key in plaintext, one as its digest), an unrelated
/// Secret, a v1 pool and the objectives, in a temporary directory.
fn keys_dir(tmp: &Path, keys_yaml: &str) -> PathBuf {
    let dir = tmp.join("in");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["inferencepool-v1.yaml", "inferenceobjectives.yaml"] {
        std::fs::copy(examples().join(f), dir.join(f)).unwrap();
    }
    let body: String = keys_yaml.lines().map(|l| format!("    {l}\n")).collect();
    std::fs::write(
        dir.join("api-keys.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: gateway-api-keys\n  labels:\n    inference-gateway.io/api-keys: \"true\"\ntype: Opaque\nstringData:\n  keys.yaml: |\n{body}"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("hf-token.yaml"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: hf-token}\nstringData: {token: hf_not_for_the_gateway}\n",
    )
    .unwrap();
    dir
}

#[test]
fn an_api_key_secret_renders_auth_with_digests_only() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = format!(
        "- id: team-a\n  key: {KEY_TEAM}\n  models: [meta-llama/Llama-3.1-8B-Instruct]\n  requests_per_minute: 120\n  tokens_per_day: 2000000\n- id: batch\n  sha256: {}\n  objective: base-model\n  concurrent_requests: 2\n  tokens_per_minute: 50000\n",
        inference_gateway::auth::digest_hex(KEY_BATCH)
    );
    let dir = keys_dir(tmp.path(), &keys);
    let out_dir = tmp.path().join("out");
    let out = igwctl(&[
        "render",
        "-f",
        dir.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let printed = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{printed}");
    assert!(
        printed.contains("api keys from Secret default/gateway-api-keys: team-a, batch"),
        "{printed}"
    );
    assert!(!printed.contains(KEY_TEAM));
    // The unrelated Secret is listed as ignored, and not read.
    assert!(printed.contains("v1 Secret hf-token"), "{printed}");

    let digest = inference_gateway::auth::digest_hex(KEY_TEAM);
    for f in std::fs::read_dir(&out_dir).unwrap() {
        let f = f.unwrap();
        let t = std::fs::read_to_string(f.path()).unwrap();
        assert!(
            !t.contains(KEY_TEAM),
            "plaintext key in {:?}",
            f.file_name()
        );
        assert!(!t.contains("hf_not_for_the_gateway"), "{:?}", f.file_name());
        let name = f.file_name().into_string().unwrap();
        if name == "plugin-config.json" || name == "gateway-filter.json" {
            assert!(t.contains(&digest), "{name} has no digest");
        }
    }

    let plugin: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("plugin-config.json")).unwrap())
            .unwrap();
    let cfg = validate_plugin_config(&plugin).unwrap();
    let auth = cfg.auth.expect("auth");
    let team = &auth.keys[auth.identify(Some(KEY_TEAM)).unwrap()];
    assert_eq!(team.id, "team-a");
    assert_eq!(team.limits.requests_per_minute, Some(120));
    assert_eq!(team.limits.tokens_per_day, Some(2_000_000));
    assert_eq!(team.limits.concurrent_requests, None);
    assert!(team
        .models
        .as_ref()
        .unwrap()
        .contains("meta-llama/Llama-3.1-8B-Instruct"));
    let batch = &auth.keys[auth.identify(Some(KEY_BATCH)).unwrap()];
    assert_eq!(batch.objective.as_deref(), Some("base-model"));
    assert_eq!(batch.limits.concurrent_requests, Some(2));
    assert_eq!(batch.limits.tokens_per_minute, Some(50_000));
    assert!(batch.models.is_none());

    // check agrees; the picker's configuration has no auth.
    let out = igwctl(&["check", "-f", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(KEY_TEAM));
    assert!(text(&out.stdout).contains(" 2 API keys, "));
    let out = igwctl(&["picker", "-f", dir.to_str().unwrap()]);
    let picker = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !picker.contains(&digest) && !picker.contains("auth"),
        "{picker}"
    );
    assert!(text(&out.stderr).contains("auth (2 API keys) left out"));
}

#[test]
fn a_bad_api_key_entry_names_the_field_not_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = keys_dir(
        tmp.path(),
        &format!("- id: team-a\n  key: {KEY_TEAM}\n  objective: base-modle\n"),
    );
    let out = igwctl(&["check", "-f", dir.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("api-keys.yaml[0] stringData[\"keys.yaml\"][0].objective: no InferenceObjective 'base-modle' among the inputs: did you mean base-model?"),
        "{err}"
    );
    assert!(!err.contains(KEY_TEAM) && !text(&out.stdout).contains(KEY_TEAM));
}
