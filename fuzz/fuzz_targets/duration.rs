//! Parses a duration, and round-trips: `parse(format(d)) == d` for every duration `parse`
//! accepts, and for every whole number of milliseconds up to the cap.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outrider_control::duration::{format, parse, MAX};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match parse(text) {
            Ok(d) => {
                assert!(d <= MAX);
                assert_eq!(parse(&format(d)), Ok(d), "{text:?} -> {}", format(d));
            }
            Err(e) => assert!(e.len() <= 1024, "error of {} bytes", e.len()),
        }
    }
    if data.len() >= 8 {
        let mut n = [0u8; 8];
        n.copy_from_slice(&data[..8]);
        let ms = u64::from_le_bytes(n) % (MAX.as_millis() as u64 + 1);
        let d = Duration::from_millis(ms);
        assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
    }
});
