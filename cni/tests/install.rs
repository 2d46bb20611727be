//! `outrider cni install` on a config directory of the test's own: golden conflists in and out
//! (calico-like, flannel-like, a single `.conf`), uninstall restoring the original byte for byte,
//! and another CNI rewriting the file while the installer runs. `OUTRIDER_BLESS=1`
//! rewrites the `.out` files (review the diff).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outrider_cni::install::{self, InstallArgs, Installed};

const KUBECONFIG: &str = "/etc/cni/net.d/outrider-cni.kubeconfig";

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "outrider-cni-{tag}-{}-{}",
        std::process::id(),
        fastrand_like()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fastrand_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn entry() -> String {
    install::plugin_entry(Path::new(KUBECONFIG))
}

#[test]
fn golden_conflists_in_and_out_and_uninstall_restores_bytes() {
    for (input, active, expected) in [
        (
            "calico.conflist",
            "10-calico.conflist",
            "calico.conflist.out",
        ),
        (
            "flannel.conflist",
            "10-flannel.conflist",
            "flannel.conflist.out",
        ),
        ("single.conf", "10-mynet.conflist", "single.conf.out"),
    ] {
        let dir = tempdir("golden");
        let original = std::fs::read(golden(input)).unwrap();
        let file_name = if input.ends_with(".conf") {
            "10-mynet.conf"
        } else {
            active
        };
        std::fs::write(dir.join(file_name), &original).unwrap();
        // A later file the runtime does not use is never touched.
        std::fs::write(
            dir.join("99-loopback.conf"),
            b"{\"cniVersion\":\"0.3.1\",\"name\":\"lo\",\"type\":\"loopback\"}",
        )
        .unwrap();
        let mut state = Installed::default();
        let done = install::ensure(&dir, &entry(), &mut state).unwrap();
        assert!(done.is_some(), "{input}");
        let got = std::fs::read_to_string(dir.join(active)).unwrap();
        if std::env::var_os("OUTRIDER_BLESS").is_some() {
            std::fs::write(golden(expected), &got).unwrap();
        }
        let want = std::fs::read_to_string(golden(expected)).unwrap();
        assert_eq!(got, want, "{input}");
        // The result is a valid conflist that keeps every other plugin's JSON value.
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        let o: serde_json::Value = serde_json::from_slice(&original).unwrap();
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.last().unwrap()["type"], "outrider-cni");
        match o.get("plugins") {
            Some(p) => assert_eq!(
                &plugins[..plugins.len() - 1],
                p.as_array().unwrap().as_slice()
            ),
            None => assert_eq!(plugins[0], o),
        }
        // Idempotent: nothing more to do.
        assert_eq!(install::ensure(&dir, &entry(), &mut state).unwrap(), None);
        assert!(install::undo(&mut state).is_empty());
        let back = std::fs::read(dir.join(file_name)).unwrap();
        assert_eq!(
            back, original,
            "{input}: uninstall did not restore the bytes"
        );
        if input.ends_with(".conf") {
            assert!(
                !dir.join(active).exists(),
                "the wrapper conflist was left behind"
            );
        }
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bad_conflists_are_errors_not_edits() {
    for bad in ["{", "[]", "{\"name\":\"x\"}", "{\"plugins\":{}}"] {
        assert!(install::insert(bad, &entry()).is_err(), "{bad}");
    }
    assert!(install::wrap("{\"type\":\"bridge\"}", &entry()).is_err());
}

/// Waits (bounded) until `cond` holds, checking on every tick of the installer's own poll.
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_cni_rewriting_the_file_gets_us_inserted_again_and_uninstall_keeps_theirs() {
    let root = tempdir("watch");
    let (bin, conf, sa) = (root.join("bin"), root.join("net.d"), root.join("sa"));
    for d in [&bin, &conf, &sa] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        sa.join("ca.crt"),
        b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(sa.join("token"), b"token-for-test\n").unwrap();
    let active = conf.join("10-flannel.conflist");
    std::fs::write(&active, std::fs::read(golden("flannel.conflist")).unwrap()).unwrap();
    let args = InstallArgs {
        bin_dir: bin.clone(),
        conf_dir: conf.clone(),
        host_conf_dir: PathBuf::from("/etc/cni/net.d"),
        api_server: Some("https://198.18.0.10:6443".into()),
        service_account_dir: sa.clone(),
        poll_ms: 10,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let installer = tokio::spawn(install::run(args, async move {
        let _ = stop_rx.await;
    }));
    let ours = |p: &Path| std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"outrider-cni\""));
    wait_for("the first insertion", || ours(&active)).await;
    let kc = std::fs::read_to_string(conf.join("outrider-cni.kubeconfig")).unwrap();
    assert!(
        kc.contains("server: https://198.18.0.10:6443") && kc.contains("token: token-for-test")
    );
    assert!(bin.join("outrider-cni").exists());
    // A rotated token reaches the kubeconfig.
    install::write_atomic(&sa.join("token"), b"rotated-token\n", 0o600).unwrap();
    let kc_path = conf.join("outrider-cni.kubeconfig");
    wait_for("the rotated token", || {
        std::fs::read_to_string(&kc_path).is_ok_and(|t| t.contains("token: rotated-token"))
    })
    .await;

    // Another CNI rewrites its config (atomically, as CNI installers do) again and again.
    let mut last = Vec::new();
    for i in 0..20 {
        last = format!(
            "{{\n  \"name\": \"cbr0\",\n  \"cniVersion\": \"0.3.1\",\n  \"plugins\": [\n    {{\"type\": \"flannel\", \"delegate\": {{\"hairpinMode\": true, \"generation\": {i}}}}}\n  ]\n}}\n"
        )
        .into_bytes();
        install::write_atomic(&active, &last, 0o644).unwrap();
        let generation = format!("\"generation\": {i}");
        wait_for("the re-insertion", || {
            std::fs::read_to_string(&active)
                .is_ok_and(|t| t.contains(&generation) && t.contains("\"outrider-cni\""))
        })
        .await;
        let text = std::fs::read_to_string(&active).unwrap();
        assert_eq!(text.matches("\"outrider-cni\"").count(), 1, "{text}");
    }
    stop_tx.send(()).unwrap();
    installer.await.unwrap().unwrap();
    assert_eq!(
        std::fs::read(&active).unwrap(),
        last,
        "uninstall did not give back their file"
    );
    assert!(!bin.join("outrider-cni").exists());
    assert!(!conf.join("outrider-cni.kubeconfig").exists());
    let left: Vec<_> = std::fs::read_dir(&conf)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    std::fs::remove_dir_all(&root).unwrap();
}
