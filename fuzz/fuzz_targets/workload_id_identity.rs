//! Parses the input as a `WorkloadId` and as an `Identity`: no panic, bounded error messages, and
//! for accepted input, `Display` gives the input back, the parts rebuild it, and serde agrees.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrider_control::api::{Identity, WorkloadId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<WorkloadId>() {
        Ok(id) => {
            assert_eq!(id.to_string(), text);
            assert_eq!(format!("{}/{}", id.namespace(), id.name()), text);
            assert_eq!(
                id.to_string().parse::<WorkloadId>().ok().as_ref(),
                Some(&id)
            );
            let json = serde_json::to_string(&id).expect("serializes");
            assert_eq!(serde_json::from_str::<WorkloadId>(&json).ok(), Some(id));
        }
        Err(e) => assert!(e.to_string().len() <= 1024),
    }
    match text.parse::<Identity>() {
        Ok(id) => {
            assert_eq!(id.to_string(), text);
            assert_eq!(
                format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    id.trust_domain(),
                    id.namespace(),
                    id.service_account()
                ),
                text
            );
            assert_eq!(id.to_string().parse::<Identity>().ok().as_ref(), Some(&id));
            let json = serde_json::to_string(&id).expect("serializes");
            assert_eq!(serde_json::from_str::<Identity>(&json).ok(), Some(id));
        }
        Err(e) => assert!(e.to_string().len() <= 1024),
    }
    // JSON strings from arbitrary bytes go through the same validation.
    if let Ok(id) = serde_json::from_str::<WorkloadId>(text) {
        assert!(id.to_string().parse::<WorkloadId>().is_ok());
    }
});
