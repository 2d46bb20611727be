//! The request-header normalisation applied before forwarding (Host, framing, Connection,
//! hop-by-hop fields, the hop marker), on headers split from the input: `name: value` lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let pairs: Vec<(&[u8], &[u8])> = rest
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|b| *b == b':')?;
            let value = &line[colon + 1..];
            let value = value.strip_prefix(b" ").unwrap_or(value);
            Some((&line[..colon], value))
        })
        .collect();
    outrider_proxy::fuzzing::normalize_request_headers(&pairs, flags & 1 == 1);
});
