//! Input quoted in error messages, cut to a readable length.
//!
//! Every error that quotes a value from a config file, a query string or a flag goes through
//! [`Quoted`]: the value is shown in double quotes with control characters and quotes escaped,
//! and a value longer than [`MAX_QUOTED_CHARS`] characters is cut there and followed by its total
//! length (`"aaaa…" (200000000 bytes)`). A 200 MB value in a config file thus yields a line of
//! about 100 bytes on stderr, not 200 MB.

use std::fmt;

/// How many characters (escapes included) of a value an error message shows before cutting it.
pub const MAX_QUOTED_CHARS: usize = 80;

/// Displays a value quoted and escaped, cut after [`MAX_QUOTED_CHARS`] characters.
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        f.write_str("\"")?;
        // The cut counts what is written: escapes (`\u{0}`) count with their length, so a value
        // of control characters cannot make a message long either.
        let mut written = 0;
        let mut escaped = String::new();
        for c in s.chars() {
            escaped.clear();
            match c {
                '"' => escaped.push_str("\\\""),
                '\\' => escaped.push_str("\\\\"),
                c if c.is_control() => escaped.extend(c.escape_default()),
                c => escaped.push(c),
            }
            let width = escaped.chars().count();
            if written + width > MAX_QUOTED_CHARS {
                return write!(f, "…\" ({} bytes)", s.len());
            }
            written += width;
            f.write_str(&escaped)?;
        }
        f.write_str("\"")
    }
}

/// A key (for a key path) cut after [`MAX_QUOTED_CHARS`] characters, unquoted.
pub(crate) fn short_key(key: &str) -> String {
    match key.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((i, _)) => format!("{}…({} bytes)", &key[..i], key.len()),
        None => key.to_string(),
    }
}

/// Cuts every double-quoted run longer than [`MAX_QUOTED_CHARS`] characters in `message` (an
/// error from a library, e.g. serde's `invalid type: string "…", expected u32`), then the whole
/// message to `max_total` bytes. Backslash escapes inside a quoted run are honoured.
pub(crate) fn shorten_message(message: &str, max_total: usize) -> String {
    let mut out = String::with_capacity(message.len().min(max_total + 64));
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        let body = &rest[open + 1..];
        let mut escaped = false;
        let close = body.char_indices().find_map(|(i, c)| {
            if escaped {
                escaped = false;
                None
            } else if c == '\\' {
                escaped = true;
                None
            } else {
                (c == '"').then_some(i)
            }
        });
        let Some(close) = close else {
            // An unbalanced quote: keep the rest, cut below.
            out.push_str(body);
            rest = "";
            break;
        };
        let inner = &body[..close];
        match inner.char_indices().nth(MAX_QUOTED_CHARS) {
            Some((i, _)) => {
                out.push_str(&inner[..i]);
                out.push_str(&format!("…\" ({} bytes)", inner.len()));
            }
            None => {
                out.push_str(inner);
                out.push('"');
            }
        }
        rest = &body[close + 1..];
    }
    out.push_str(rest);
    if out.len() > max_total {
        let cut = (0..=max_total)
            .rev()
            .find(|i| out.is_char_boundary(*i))
            .unwrap_or(0);
        let total = out.len();
        out.truncate(cut);
        out.push_str(&format!("…({total} bytes)"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole_and_escaped() {
        assert_eq!(Quoted("web").to_string(), "\"web\"");
        assert_eq!(Quoted("a\"b\\c\nd").to_string(), "\"a\\\"b\\\\c\\nd\"");
        let eighty = "x".repeat(80);
        assert_eq!(Quoted(&eighty).to_string(), format!("\"{eighty}\""));
    }

    #[test]
    fn escapes_count_towards_the_cut() {
        // Found by the watch_query fuzz target: 1,000 control characters made a 1 KB message.
        let nuls = "\u{0}".repeat(1000);
        let shown = Quoted(&nuls).to_string();
        assert!(
            shown.len() <= MAX_QUOTED_CHARS + 24,
            "{} bytes",
            shown.len()
        );
        assert!(shown.ends_with("(1000 bytes)"), "{shown}");
    }

    #[test]
    fn long_values_are_cut_with_their_length() {
        let long = "é".repeat(1_000_000);
        let shown = Quoted(&long).to_string();
        assert!(shown.len() < 200, "{} bytes", shown.len());
        assert!(
            shown.starts_with(&format!("\"{}…\"", "é".repeat(80))),
            "{shown}"
        );
        assert!(shown.ends_with("(2000000 bytes)"), "{shown}");
        assert_eq!(short_key(&"k".repeat(81)).len(), 80 + "…(81 bytes)".len());
    }

    #[test]
    fn library_messages_have_their_quoted_runs_cut() {
        let long = "a".repeat(10_000);
        let msg = format!("invalid type: string \"{long}\", expected u32 at \"x\\\"y\"");
        let short = shorten_message(&msg, 400);
        assert!(short.len() < 200, "{short}");
        assert!(short.ends_with(", expected u32 at \"x\\\"y\""), "{short}");
        assert!(short.contains("(10000 bytes)"), "{short}");
        let unquoted = "b".repeat(10_000);
        let short = shorten_message(&unquoted, 400);
        assert!(short.len() < 430 && short.ends_with("…(10000 bytes)"));
        assert_eq!(shorten_message("plain", 400), "plain");
    }
}
