//! What a YAML 1.1 reader would misread: kubectl reads YAML 1.1, where `yes`, `on` and `N` are
//! booleans, `1_000` a number, `0400` an octal number and `2024-05-01` a timestamp, while the
//! writers follow YAML 1.2 and would leave such strings plain. Both writers, our own (`emit`)
//! and `serde_norway`'s (for what ours leaves), quote them.

use serde_norway::Value;

/// One document written by `serde_norway` (libyaml's emitter), with YAML 1.1-ambiguous strings
/// double-quoted.
pub(crate) fn write_with_serde(doc: &Value) -> Result<String, String> {
    let text = serde_norway::to_string(&mark_ambiguous(doc.clone()))
        .map_err(|e| format!("cannot write YAML: {e}"))?;
    Ok(unmark(&text))
}

/// Whether YAML 1.1 (but not the YAML 1.2 that the writer follows) reads `s` as no string.
pub(crate) fn is_yaml11_ambiguous(s: &str) -> bool {
    const WORDS: [&str; 16] = [
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
        "OFF",
    ];
    if WORDS.contains(&s) {
        return true;
    }
    let t = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit() || b == b'_');
    // Octal `0400` (YAML 1.1 reads it as 256; Go's reader as a number even when it is `08`).
    if t.len() > 1 && t.starts_with('0') && digits(t) {
        return true;
    }
    if is_yaml11_timestamp(s) {
        return true;
    }
    if t.contains('_') {
        let u = t.replace('_', "");
        let radix = |prefix: &str, ok: fn(&u8) -> bool| {
            u.strip_prefix(prefix)
                .is_some_and(|r| !r.is_empty() && r.as_bytes().iter().all(ok))
        };
        let number = u.bytes().any(|b| b.is_ascii_digit())
            && (u.parse::<f64>().is_ok()
                || radix("0b", |b| *b == b'0' || *b == b'1')
                || radix("0x", u8::is_ascii_hexdigit));
        if number {
            return true;
        }
    }
    // Sexagesimal numbers: `190:20:30`, `1:30.5`.
    if let Some((head, rest)) = t.split_once(':') {
        let mut parts: Vec<&str> = rest.split(':').collect();
        let last = parts.pop().unwrap_or_default();
        let (last, frac) = last.split_once('.').unwrap_or((last, "0"));
        parts.push(last);
        return digits(head) && digits(frac) && parts.iter().all(|p| p.len() <= 2 && digits(p));
    }
    false
}

/// Whether YAML 1.1 reads `s` as a timestamp: `2001-12-14`, `2001-12-14T21:59:43.10Z`,
/// `2001-12-14 21:59:43.10 -5` (the `timestamp` type's pattern).
pub(crate) fn is_yaml11_timestamp(s: &str) -> bool {
    fn num(s: &str, min: usize, max: usize) -> Option<&str> {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        (min..=max).contains(&n).then(|| &s[n..])
    }
    fn time(s: &str) -> Option<&str> {
        let s = num(s, 1, 2)?.strip_prefix(':')?;
        let s = num(s, 2, 2)?.strip_prefix(':')?;
        let s = num(s, 2, 2)?;
        Some(match s.strip_prefix('.') {
            Some(f) => num(f, 0, usize::MAX)?,
            None => s,
        })
    }
    fn zone(s: &str) -> bool {
        let s = s.trim_start_matches([' ', '\t']);
        if s.is_empty() || s == "Z" {
            return true;
        }
        let Some(s) = s.strip_prefix(['+', '-']).and_then(|s| num(s, 1, 2)) else {
            return false;
        };
        s.is_empty() || s.strip_prefix(':').and_then(|s| num(s, 2, 2)) == Some("")
    }
    let Some(rest) = num(s, 4, 4).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    // The date alone needs two-digit month and day; with a time, one digit will do.
    let short = num(rest, 1, 2)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| num(r, 1, 2));
    let Some(after) = short else {
        return false;
    };
    if after.is_empty() {
        return s.len() == 10;
    }
    let t = if let Some(t) = after.strip_prefix(['T', 't']) {
        t
    } else if after.starts_with([' ', '\t']) {
        after.trim_start_matches([' ', '\t'])
    } else {
        return false;
    };
    time(t).is_some_and(zone)
}

/// A NUL appended to a string forces the writer to double-quote it (as `..\0"`); [`unmark`]
/// takes the escape out again.
fn mark_ambiguous(value: Value) -> Value {
    match value {
        // A string of its own ending in NUL is marked too, or [`unmark`] would take its NUL.
        Value::String(s) if is_yaml11_ambiguous(&s) || s.ends_with('\0') => {
            Value::String(format!("{s}\0"))
        }
        Value::Sequence(items) => Value::Sequence(items.into_iter().map(mark_ambiguous).collect()),
        Value::Mapping(map) => Value::Mapping(
            map.into_iter()
                .map(|(k, v)| (mark_ambiguous(k), mark_ambiguous(v)))
                .collect(),
        ),
        Value::Tagged(mut t) => {
            t.value = mark_ambiguous(std::mem::take(&mut t.value));
            Value::Tagged(t)
        }
        other => other,
    }
}

/// Removes the `\0` escapes that end double-quoted strings (an escape: an even number of
/// backslashes before its own).
pub(crate) fn unmark(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\\0\"") {
        let before = rest[..at].bytes().rev().take_while(|b| *b == b'\\').count();
        if before % 2 == 0 {
            out.push_str(&rest[..at]);
            out.push('"');
        } else {
            // The backslash is the second half of an escaped `\\`: `0"` is the text's own.
            out.push_str(&rest[..at + 3]);
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
}
