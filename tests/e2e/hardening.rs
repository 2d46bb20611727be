//! Hardening checks against the real binary: limits the proxy sets for itself at start.

use std::process::Command;
use std::time::Duration;

use crate::support::{self, ChildGuard};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_and_a_short_one_is_reported() {
    let proxy = ChildGuard::spawn(
        Command::new("sh").args([
            "-c",
            "ulimit -Sn 256 && ulimit -Hn 1000 && exec \"$0\" proxy --forward 127.0.0.1:0=127.0.0.1:9 --admin 127.0.0.1:0",
            OUTRIDER,
        ]),
        "proxy",
    );
    // Logs go to stderr: wait (bounded) until the proxy says it started.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !proxy.stderr().contains("proxy started") {
        assert!(
            std::time::Instant::now() < deadline,
            "never started: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap();
    assert_eq!(soft, "1000", "{limits}");
    assert!(
        proxy
            .stderr()
            .contains("the open-file limit cannot hold --max-connections per listener"),
        "{}",
        proxy.stderr()
    );
    let _ = support::run(Command::new("kill").arg(proxy.pid().to_string()));
}
