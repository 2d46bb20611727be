//! Protocol detection on arbitrary first bytes: never panics, and always decides once enough
//! bytes and a line end are in (the first byte is the bound, scaled).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&bound, buf)) = data.split_first() else {
        return;
    };
    let _ = outrider_proxy::fuzzing::detect(buf, usize::from(bound) * 64 + 1);
});
