//! Parses a watch API query string (`workload=..&version=..&wait=..`): no panic, bounded error
//! messages, and accepted values within the API's promises.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outrider_control::server::WatchQuery;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    match WatchQuery::parse(query) {
        Err(e) => assert!(e.len() <= 1024, "error of {} bytes", e.len()),
        Ok(q) => {
            assert!(q.wait <= Duration::from_secs(300));
            if let Some(v) = &q.version {
                assert!(!v.is_empty() && v.len() <= 64);
                assert!(v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            }
            let shown = q.workload.to_string();
            assert_eq!(
                shown.parse::<outrider_control::api::WorkloadId>().ok(),
                Some(q.workload)
            );
        }
    }
});
