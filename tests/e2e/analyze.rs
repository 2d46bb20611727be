//! `outrider analyze` as a user (or a CI job) runs it: the real binary on files and stdin, its
//! exit codes (0 clean at `--fail-on`, 1 findings, 2 bad input or usage), `-o json`, and
//! `--admin` against a real `outrider proxy` on loopback (admin on port 0, its control plane a
//! held port that closes every connection, so the proxy is up but not ready).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{self, run, ChildGuard, PortHold, TempDir};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kubernetes/tests/analyze")
        .join(path)
}

fn analyze(args: &[&str]) -> Output {
    run(Command::new(OUTRIDER).arg("analyze").args(args))
}

fn analyze_stdin(args: &[&str], input: &str) -> Output {
    let args: Vec<&str> = ["analyze"].iter().chain(args).copied().collect();
    crate::kubernetes::outrider_stdin(&args, input)
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn exit_codes_follow_fail_on() {
    let resources = fixture("manifests/resources.yaml");
    let resources = resources.to_str().unwrap();
    // Errors in it: 1 at the default --fail-on error.
    let out = analyze(&["-f", resources]);
    assert_eq!(code(&out), Some(1), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("error    limit-below-request"), "{report}");
    assert!(
        report.ends_with("2 error(s), 2 warning(s), 3 info(s)\n"),
        "{report}"
    );
    // A workload with nothing but its figures: 0, unless infos fail too.
    let ledger = std::fs::read_to_string(resources).unwrap();
    let ledger = ledger.split("---\n").nth(1).unwrap();
    let out = analyze_stdin(&["-f", "-"], ledger);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stdout));
    let out = analyze_stdin(&["-f", "-", "--fail-on", "warning"], ledger);
    assert_eq!(code(&out), Some(0));
    let out = analyze_stdin(&["-f", "-", "--fail-on", "info"], ledger);
    assert_eq!(code(&out), Some(1));
    // The flag from the environment (OUTRIDER_FAIL_ON), and the flag winning over it.
    let dir = TempDir::new();
    let file = dir.path().join("ledger.yaml");
    std::fs::write(&file, ledger).unwrap();
    let file = file.to_str().unwrap();
    let env = |args: &[&str]| {
        run(Command::new(OUTRIDER)
            .env("OUTRIDER_FAIL_ON", "info")
            .arg("analyze")
            .args(args))
    };
    assert_eq!(code(&env(&["-f", file])), Some(1));
    assert_eq!(code(&env(&["-f", file, "--fail-on", "error"])), Some(0));
    // Warnings only (the seed): 0 by default, 1 with --fail-on warning.
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/payments-api.yaml");
    let seed = seed.to_str().unwrap();
    assert_eq!(code(&analyze(&["-f", seed])), Some(0));
    assert_eq!(
        code(&analyze(&["-f", seed, "--fail-on", "warning"])),
        Some(1)
    );
    // The cluster version turns the native sidecar note into an error.
    let natives = fixture("manifests/native-sidecars.yaml");
    let natives = natives.to_str().unwrap();
    let old = analyze(&[
        "-f",
        natives,
        "--kubernetes-version",
        "v1.28.3",
        "-o",
        "json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&old.stdout).unwrap();
    assert!(json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["check"] == "native-sidecar-version" && f["severity"] == "error"));
}

#[test]
fn json_output_is_one_document_with_every_finding() {
    let input = std::fs::read_to_string(fixture("manifests/job-legacy-sidecar.yaml")).unwrap();
    let out = analyze_stdin(&["-f", "-", "-o", "json"], &input);
    assert_eq!(code(&out), Some(1), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = json["findings"].as_array().unwrap();
    let legacy: Vec<_> = findings
        .iter()
        .filter(|f| f["check"] == "job-legacy-sidecar")
        .collect();
    assert_eq!(legacy.len(), 2, "{json}");
    assert_eq!(legacy[0]["object"], "Job reports/nightly-report");
    assert_eq!(legacy[0]["path"], "spec.template.spec.containers[1]");
    assert_eq!(legacy[0]["document"], "document 1");
    assert!(legacy[0]["fix"]
        .as_str()
        .unwrap()
        .contains("restartPolicy: Always"));
    assert_eq!(json["summary"]["errors"], 2);
    assert_eq!(json["summary"]["warnings"], 1);
}

#[test]
fn status_names_the_blocker_and_the_next_command() {
    let crash = fixture("status/init-crashloop.yaml");
    let out = analyze(&["--status", crash.to_str().unwrap()]);
    assert_eq!(code(&out), Some(1), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains(
            "fix: kubectl logs payments-api-7c9d8b6f5-x2x7k -c migrate -n production --previous"
        ),
        "{report}"
    );
    // JSON from stdin, a pod that only waits: warnings, exit 0.
    let waiting = std::fs::read_to_string(fixture("status/init-running.yaml")).unwrap();
    let out = analyze_stdin(&["--status", "-", "-o", "json"], &waiting);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["findings"][0]["check"], "init-running");
    let running = fixture("status/running.yaml");
    assert_eq!(
        code(&analyze(&["--status", running.to_str().unwrap()])),
        Some(0)
    );
}

#[test]
fn bad_input_and_usage_exit_2_with_a_clear_error() {
    let dir = TempDir::new();
    let cases: [(&[&str], &str, &str); 3] = [
        (&["-f", "-"], "kind: Pod\n---\nspec: [\n", "document 2: not YAML"),
        (
            &["-f", "-"],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, resources: {limits: {memory: 12GB}}}]\n",
            "spec.containers[0].resources.limits.memory",
        ),
        (
            &["--status", "-"],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a}]\n",
            "status: missing: this is a manifest, not a live pod",
        ),
    ];
    for (args, input, message) in cases {
        let out = analyze_stdin(args, input);
        assert_eq!(code(&out), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        let err = text(&out.stderr);
        assert!(err.contains(message), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let missing = dir.path().join("missing.yaml");
    let out = analyze(&["-f", missing.to_str().unwrap()]);
    assert_eq!(code(&out), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read"),
        "{}",
        text(&out.stderr)
    );
    for args in [
        &[][..],
        &["-f", "a.yaml", "--status", "b.yaml"][..],
        &["-f", "-", "-o", "xml"][..],
        &["-f", "-", "--fail-on", "fatal"][..],
        &["-f", "-", "--admin", "http://127.0.0.1:15020"][..],
        &["--status", "-", "--admin", "https://127.0.0.1:15020"][..],
    ] {
        let out = analyze(args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn admin_reads_a_real_proxys_readiness_and_identity() {
    // The control plane is a held port that closes every connection: the proxy runs, its
    // admin answers, /ready says what it waits for.
    let hold = PortHold::new();
    let app = PortHold::new();
    let mut proxy = ChildGuard::spawn(
        Command::new(OUTRIDER)
            .arg("proxy")
            .args([
                "--forward",
                &format!("127.0.0.1:0=127.0.0.1:{}", app.port()),
                "--control",
                &format!("http://127.0.0.1:{}", hold.port()),
                "--workload",
                "production/payments-api",
                "--admin",
                "127.0.0.1:0",
            ])
            .env("OUTRIDER_LOG", "info")
            .env("OUTRIDER_LOG_FORMAT", "json"),
        "proxy",
    );
    let addrs = support::proxy_addrs(&mut proxy, Duration::from_secs(10));
    let url = format!("http://{}", addrs.admin);
    let status = fixture("status/sidecar-not-started.yaml");
    let out = analyze(&[
        "--status",
        status.to_str().unwrap(),
        "--admin",
        &url,
        "-o",
        "json",
    ]);
    assert_eq!(code(&out), Some(1), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = json["findings"].as_array().unwrap();
    let ready = findings
        .iter()
        .find(|f| f["check"] == "proxy-not-ready" && f["document"] == format!("admin {url}/"))
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(ready["severity"], "error");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("503: waiting for the first config from the control plane"),
        "{ready}"
    );
    assert!(ready["why"].as_str().unwrap().starts_with("no view yet"));
    let identity = findings
        .iter()
        .find(|f| f["check"] == "proxy-identity")
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(identity["severity"], "warning");
    assert!(identity["message"]
        .as_str()
        .unwrap()
        .starts_with("the proxy has no identity: "));
    // An admin address that closes every connection is a finding, not a crash.
    let dead = PortHold::new();
    let out = analyze(&[
        "--status",
        status.to_str().unwrap(),
        "--admin",
        &format!("http://127.0.0.1:{}", dead.port()),
    ]);
    assert_eq!(code(&out), Some(1));
    let report = text(&out.stdout);
    assert!(
        report.contains("error    proxy-unreachable  /ready"),
        "{report}"
    );
    drop(proxy);
}
