//! Durations as people write them in flags and config files: one number and one unit, `250ms`,
//! `1s`, `5m`, `1h`. Shared by the proxy's flags and the mesh config.

use std::time::Duration;

/// The longest duration accepted: a year. Longer values are mistakes, and adding them to a clock
/// would overflow.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `250ms`, `1s`, `5m` or `1h` (at most [`MAX`]).
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration \"{s}\": expected e.g. 250ms, 1s, 5m, 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "invalid duration \"{s}\": the unit must be ms, s, m or h"
            ))
        }
    };
    if d > MAX {
        return Err(format!("invalid duration \"{s}\": at most {}", format(MAX)));
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
}
