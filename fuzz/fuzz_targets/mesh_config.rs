//! Parses and validates a mesh config (YAML), and checks what must hold for any input: no panic,
//! error lines of bounded length (values are cut), the nesting pre-scan never under-counts what
//! the YAML parser builds, and every workload's view survives a JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrider_control::mesh::Mesh;
use outrider_control::nesting;

/// Depth of collections in a parsed YAML value.
fn depth(v: &serde_norway::Value) -> usize {
    match v {
        serde_norway::Value::Sequence(s) => 1 + s.iter().map(depth).max().unwrap_or(0),
        serde_norway::Value::Mapping(m) => {
            1 + m
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
        serde_norway::Value::Tagged(t) => depth(&t.value),
        _ => 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Mesh::parse(text) {
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in &errors {
                let line = e.to_string();
                assert!(line.len() <= 2048, "error line of {} bytes", line.len());
            }
        }
        Ok(mesh) => {
            for id in mesh.workloads.keys() {
                let view = mesh.view(id, "v-1").expect("a listed workload has a view");
                let json = serde_json::to_string(&view).expect("views serialize");
                let back: outrider_control::api::WatchResponse =
                    serde_json::from_str(&json).expect("views deserialize");
                assert_eq!(back, view);
            }
            let _ = mesh.summary();
        }
    }
    // The pre-scan must count at least the depth the parser builds; when it lets a text through,
    // the parser's own work is bounded by that depth.
    let scanned = nesting::scan(text, usize::MAX);
    if scanned.depth <= nesting::MAX_DEPTH {
        if let Ok(value) = serde_norway::from_str::<serde_norway::Value>(text) {
            let built = depth(&value);
            assert!(
                built <= scanned.depth,
                "pre-scan counted {} levels, the parser built {built}",
                scanned.depth
            );
        }
    }
});
