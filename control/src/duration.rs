//! Durations as people write them in flags and config files: one number and one unit, `250ms`,
//! `1s`, `5m`, `1h`, or a bare number of seconds (`3` is 3 s, as for `sleep` and `timeout`).
//! Shared by the proxy's flags, the mesh config and the watch API's `wait`.

use std::time::Duration;

use crate::quoted::Quoted;

/// The longest duration accepted: a year. Longer values are mistakes, and adding them to a clock
/// would overflow.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `250ms`, `1s`, `5m`, `1h` or `3` (seconds), at most [`MAX`].
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!(
            "invalid duration {}: expected e.g. 250ms, 1s, 5m, 1h (a bare number is seconds)",
            Quoted(s)
        )
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "invalid duration {}: the unit must be ms, s, m or h",
                Quoted(s)
            ))
        }
    };
    if d > MAX {
        return Err(format!(
            "invalid duration {}: at most {}",
            Quoted(s),
            format(MAX)
        ));
    }
    Ok(d)
}

/// Formats a duration the way [`parse`] reads it.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms > 0 && ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert!(parse("5x").unwrap_err().contains("unit"));
        assert!(parse("ms").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("18446744073709551615s")
            .unwrap_err()
            .contains("at most 8760h"));
        assert_eq!(parse("8760h"), Ok(MAX));
        for s in ["250ms", "1s", "5m", "1h", "0s", "1500ms"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }

    #[test]
    fn a_bare_number_is_seconds() {
        assert_eq!(parse("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse("31536000"), Ok(MAX));
        assert!(parse("31536001").unwrap_err().contains("at most 8760h"));
        assert!(parse("3 s").unwrap_err().contains("unit"));
        assert_eq!(format(parse("90").unwrap()), "90s");
    }

    #[test]
    fn errors_cut_long_input() {
        let long = format!("{}x", "9".repeat(100_000));
        let e = parse(&long).unwrap_err();
        assert!(e.len() < 300 && e.contains("(100001 bytes)"), "{e}");
    }
}
