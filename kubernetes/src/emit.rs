//! A YAML writer for the documents the injector prints: byte for byte what `serde_norway` (a
//! port of libyaml's emitter) writes for the same value, with the injector's own rule on top
//! (strings a YAML 1.1 reader would take for something else are double-quoted), in one pass over
//! the value and without libyaml's per-event machinery, which cost several seconds on 11 MB of
//! pods.
//!
//! It covers what Kubernetes manifests hold: block mappings with string keys, block sequences,
//! `{}`/`[]`, null, booleans, numbers and single-line strings in the plain, single- and
//! double-quoted styles, chosen by libyaml's own rules (`yaml_emitter_analyze_scalar` and
//! `yaml_emitter_select_scalar_style`). For anything else (multi-line strings, which libyaml
//! writes as `|` blocks; tags; keys that are not strings, are longer than 128 bytes, or start
//! with `!`) [`document`] returns `None` and the caller writes that document with
//! `serde_norway`. The tests compare both writers on the corpus and on every awkward string
//! class.

use serde_norway::{Mapping, Value};

use crate::yaml11::is_yaml11_ambiguous;

/// Work counters, for tests that check the writer's cost grows in proportion to its input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Nodes written (mappings, sequences, scalars, keys).
    pub nodes: usize,
    /// Bytes written.
    pub bytes: usize,
}

/// Writes one document (with its final newline) to `out`; `None` (and `out` unchanged) when it
/// holds something this writer leaves to `serde_norway`.
pub fn document(value: &Value, out: &mut String, work: &mut Work) -> Option<()> {
    let start = out.len();
    let mut w = Writer { out, work };
    let done = w.root(value);
    if done.is_none() {
        w.out.truncate(start);
        return None;
    }
    w.out.push('\n');
    w.work.bytes += w.out.len() - start;
    Some(())
}

struct Writer<'a> {
    out: &'a mut String,
    work: &'a mut Work,
}

impl Writer<'_> {
    fn root(&mut self, v: &Value) -> Option<()> {
        match v {
            Value::Mapping(m) if !m.is_empty() => self.mapping(m, 0, true),
            Value::Sequence(s) if !s.is_empty() => self.sequence(s, 0, true),
            other => self.leaf(other, false),
        }
    }

    fn newline(&mut self, indent: usize) {
        self.out.push('\n');
        self.out.extend(std::iter::repeat_n(' ', indent));
    }

    /// A block mapping whose keys sit at column `indent`; the first key goes where the cursor is
    /// when `inline_first` (after `- `, or at the start of the document).
    fn mapping(&mut self, m: &Mapping, indent: usize, inline_first: bool) -> Option<()> {
        self.work.nodes += 1;
        for (i, (k, v)) in m.iter().enumerate() {
            if i > 0 || !inline_first {
                self.newline(indent);
            }
            let Value::String(key) = k else {
                return None;
            };
            if key.starts_with('!') {
                return None;
            }
            self.string(key, true)?;
            self.out.push(':');
            match v {
                Value::Mapping(m) if !m.is_empty() => self.mapping(m, indent + 2, false)?,
                // A sequence in a mapping is not indented (libyaml's "indentless" sequence).
                Value::Sequence(s) if !s.is_empty() => self.sequence(s, indent, false)?,
                other => {
                    self.out.push(' ');
                    self.leaf(other, false)?;
                }
            }
        }
        Some(())
    }

    /// A block sequence whose dashes sit at column `indent`.
    fn sequence(&mut self, s: &[Value], indent: usize, inline_first: bool) -> Option<()> {
        self.work.nodes += 1;
        for (i, item) in s.iter().enumerate() {
            if i > 0 || !inline_first {
                self.newline(indent);
            }
            self.out.push_str("- ");
            match item {
                Value::Mapping(m) if !m.is_empty() => self.mapping(m, indent + 2, true)?,
                Value::Sequence(s) if !s.is_empty() => self.sequence(s, indent + 2, true)?,
                other => self.leaf(other, false)?,
            }
        }
        Some(())
    }

    /// A scalar, or an empty mapping or sequence (libyaml writes those in flow style).
    fn leaf(&mut self, v: &Value, key: bool) -> Option<()> {
        self.work.nodes += 1;
        match v {
            Value::Null => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => {
                use std::fmt::Write as _;
                let _ = write!(self.out, "{n}");
            }
            Value::String(s) => self.string(s, key)?,
            Value::Mapping(m) if m.is_empty() => self.out.push_str("{}"),
            Value::Sequence(s) if s.is_empty() => self.out.push_str("[]"),
            _ => return None,
        }
        Some(())
    }

    fn string(&mut self, s: &str, key: bool) -> Option<()> {
        self.work.nodes += usize::from(key);
        // Line breaks make libyaml write a `|` block (or break a key): left to it.
        if s.contains(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']) {
            return None;
        }
        if is_yaml11_ambiguous(s) {
            // The length libyaml sees includes the NUL the old writer appended to force quotes.
            if key && s.len() + 1 > 128 {
                return None;
            }
            double_quoted(self.out, s);
            return Some(());
        }
        if key && s.len() > 128 {
            return None;
        }
        let a = Analysis::of(s);
        let mut style = if reads_as_non_string(s) {
            Style::Single
        } else {
            Style::Plain
        };
        if style == Style::Plain && (!a.plain_allowed || (s.is_empty() && key)) {
            style = Style::Single;
        }
        if style == Style::Single && !a.single_quoted_allowed {
            style = Style::Double;
        }
        match style {
            Style::Plain => self.out.push_str(s),
            Style::Single => {
                self.out.push('\'');
                for c in s.chars() {
                    if c == '\'' {
                        self.out.push('\'');
                    }
                    self.out.push(c);
                }
                self.out.push('\'');
            }
            Style::Double => double_quoted(self.out, s),
        }
        Some(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    Single,
    Double,
}

/// What libyaml's `yaml_emitter_analyze_scalar` concludes for a single-line string in block
/// context.
struct Analysis {
    plain_allowed: bool,
    single_quoted_allowed: bool,
}

impl Analysis {
    fn of(s: &str) -> Analysis {
        if s.is_empty() {
            return Analysis {
                plain_allowed: true,
                single_quoted_allowed: true,
            };
        }
        let blank = |c: Option<char>| matches!(c, None | Some(' ' | '\t'));
        let mut block_indicators = s.starts_with("---") || s.starts_with("...");
        let mut special = false;
        let mut chars = s.chars().peekable();
        let mut first = true;
        let mut preceded_by_blank = true;
        while let Some(c) = chars.next() {
            let followed_by_blank = blank(chars.peek().copied());
            if first {
                if matches!(
                    c,
                    '#' | ','
                        | '['
                        | ']'
                        | '{'
                        | '}'
                        | '&'
                        | '*'
                        | '!'
                        | '|'
                        | '>'
                        | '\''
                        | '"'
                        | '%'
                        | '@'
                        | '`'
                ) || (matches!(c, '?' | ':' | '-') && followed_by_blank)
                {
                    block_indicators = true;
                }
            } else if (c == ':' && followed_by_blank) || (c == '#' && preceded_by_blank) {
                block_indicators = true;
            }
            if !printable(c) {
                special = true;
            }
            preceded_by_blank = matches!(c, ' ' | '\t');
            first = false;
        }
        let edge_space = s.starts_with(' ') || s.ends_with(' ');
        Analysis {
            plain_allowed: !(edge_space || special || block_indicators),
            single_quoted_allowed: !special,
        }
    }
}

/// libyaml's `IS_PRINTABLE`: what it writes as is (with unicode output on).
fn printable(c: char) -> bool {
    matches!(c, '\n' | ' '..='~' | '\u{A0}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
        && c != '\u{FEFF}'
}

/// libyaml's double-quoted style: escapes for what is not printable, `"` and `\`.
fn double_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if printable(c) && !matches!(c, '"' | '\\' | '\n') {
            out.push(c);
            continue;
        }
        out.push('\\');
        let short = match c {
            '\0' => Some('0'),
            '\u{7}' => Some('a'),
            '\u{8}' => Some('b'),
            '\t' => Some('t'),
            '\n' => Some('n'),
            '\u{B}' => Some('v'),
            '\u{C}' => Some('f'),
            '\r' => Some('r'),
            '\u{1B}' => Some('e'),
            '"' => Some('"'),
            '\\' => Some('\\'),
            '\u{85}' => Some('N'),
            '\u{A0}' => Some('_'),
            '\u{2028}' => Some('L'),
            '\u{2029}' => Some('P'),
            _ => None,
        };
        if let Some(e) = short {
            out.push(e);
            continue;
        }
        let n = u32::from(c);
        let (letter, width) = if n <= 0xFF {
            ('x', 2)
        } else if n <= 0xFFFF {
            ('u', 4)
        } else {
            ('U', 8)
        };
        out.push(letter);
        for k in (0..width).rev() {
            let digit = (n >> (k * 4)) & 0xF;
            out.extend(char::from_digit(digit, 16).map(|d| d.to_ascii_uppercase()));
        }
    }
    out.push('"');
}

/// Whether `serde_norway`'s writer would single-quote `s` because its reader takes the plain
/// form for null, a boolean, an integer or a float (`visit_untagged_scalar`), or for the YAML
/// 1.2 string `0123` that looks like a number.
fn reads_as_non_string(s: &str) -> bool {
    if s.is_empty() || matches!(s, "null" | "Null" | "NULL" | "~") {
        return true;
    }
    if matches!(s, "true" | "True" | "TRUE" | "false" | "False" | "FALSE") {
        return true;
    }
    if digits_but_not_number(s) {
        return true;
    }
    unsigned_int(s) || negative_int(s) || float(s)
}

fn digits_but_not_number(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    s.len() > 1 && s.starts_with('0') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

fn unsigned_int(s: &str) -> bool {
    let unpositive = s.strip_prefix('+').unwrap_or(s);
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(rest) = unpositive.strip_prefix(prefix) {
            if rest.starts_with(['+', '-']) {
                return false;
            }
            if u128::from_str_radix(rest, radix).is_ok() {
                return true;
            }
        }
    }
    if unpositive.starts_with(['+', '-']) {
        return false;
    }
    unpositive.parse::<u128>().is_ok()
}

fn negative_int(s: &str) -> bool {
    for (prefix, radix) in [("-0x", 16), ("-0o", 8), ("-0b", 2)] {
        if let Some(rest) = s.strip_prefix(prefix) {
            if i128::from_str_radix(&format!("-{rest}"), radix).is_ok() {
                return true;
            }
        }
    }
    s.parse::<i128>().is_ok()
}

fn float(s: &str) -> bool {
    let unpositive = match s.strip_prefix('+') {
        Some(u) if u.starts_with(['+', '-']) => return false,
        Some(u) => u,
        None => s,
    };
    matches!(unpositive, ".inf" | ".Inf" | ".INF")
        || matches!(s, "-.inf" | "-.Inf" | "-.INF" | ".nan" | ".NaN" | ".NAN")
        || unpositive.parse::<f64>().is_ok_and(f64::is_finite)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::yaml11::write_with_serde;

    /// Both writers on `v`: equal bytes when ours takes it.
    pub(crate) fn same_as_serde(v: &Value) -> bool {
        let mut out = String::new();
        let ours = document(v, &mut out, &mut Work::default());
        if ours.is_some() {
            assert_eq!(out, write_with_serde(v).unwrap(), "{v:?}");
        }
        ours.is_some()
    }

    const AWKWARD: &[&str] = &[
        "",
        " ",
        "a",
        "-",
        "--",
        "---",
        "---a",
        "...",
        "..x",
        "-a",
        "- a",
        "a -",
        "?",
        "? a",
        "?a",
        ":",
        ": a",
        ":a",
        "a:",
        "a:b",
        "a: b",
        "a :b",
        "#",
        "a#",
        "a #b",
        "a# b",
        "[",
        "a[",
        "]",
        "{",
        "a}",
        ",",
        "a,b",
        "&a",
        "*a",
        "!a",
        "a!",
        "|",
        ">",
        "'",
        "a'b",
        "'a'",
        "\"",
        "a\"b",
        "%",
        "@",
        "`",
        "a`",
        " a",
        "a ",
        "a  b",
        "\t",
        "a\tb",
        "\u{0}",
        "\u{7}",
        "\u{1b}",
        "\u{7f}",
        "\u{80}",
        "\u{9f}",
        "\u{a0}",
        "\u{a0}x",
        "é",
        "日本",
        "🚀",
        "\u{feff}",
        "\u{fffe}",
        "\u{d7ff}",
        "\u{e000}",
        "a\\b",
        "\\",
        "null",
        "Null",
        "NULL",
        "~",
        "true",
        "True",
        "TRUE",
        "false",
        "yes",
        "no",
        "on",
        "off",
        "y",
        "n",
        "0",
        "00",
        "007",
        "-007",
        "+007",
        "08",
        "1",
        "-1",
        "+1",
        "1.5",
        "-1.5",
        ".5",
        "1.",
        "1e3",
        "1E3",
        "-1e-3",
        ".inf",
        "-.inf",
        "+.inf",
        ".nan",
        ".NaN",
        "inf",
        "nan",
        "infinity",
        "0x1F",
        "0x",
        "-0x1F",
        "0o17",
        "0b101",
        "0b2",
        "+-1",
        "++1",
        "1_000",
        "0x_1",
        "12:30:00",
        "1:30.5",
        "2001-12-14",
        "2001-12-14T21:59:43Z",
        "v1",
        "apps/v1",
        "nginx:1.27",
        "http://x:80/",
        "100m",
        "128Mi",
        "1Gi",
        "/path/to",
        "$(POD_NAME)",
        "a=b",
        "key=value,other",
        "C:\\dir",
        "ab'c'",
        "it's",
        "x\u{85}",
        "18446744073709551616",
        "340282366920938463463374607431768211456",
        "-9223372036854775809",
    ];

    #[test]
    fn every_awkward_string_is_written_as_libyaml_writes_it() {
        let mut taken = 0;
        for s in AWKWARD {
            let v = Value::String((*s).to_owned());
            let mut m = Mapping::new();
            m.insert(v.clone(), v.clone());
            m.insert("k".into(), Value::Sequence(vec![v.clone(), Value::Null]));
            let breaks = s.contains(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']);
            for (doc, as_key) in [
                (v.clone(), false),
                (Value::Mapping(m.clone()), true),
                (Value::Sequence(vec![v.clone()]), false),
            ] {
                // Left to serde_norway: line breaks, and keys that may be tags.
                let expected = !(breaks || as_key && s.starts_with('!'));
                assert_eq!(same_as_serde(&doc), expected, "{s:?}");
                taken += usize::from(expected);
            }
        }
        assert!(taken > 3 * AWKWARD.len() - 5, "{taken}");
    }

    #[test]
    fn random_strings_and_shapes_match_libyaml() {
        // A fixed-seed generator: the same strings every run.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let alphabet: Vec<char> =
            " -?:#,[]{}&*!|>'\"%@`\\.~0123456789abeEfnoxyYtT_+\t\u{0}\u{a0}é🚀"
                .chars()
                .collect();
        let mut taken = 0;
        for _ in 0..4000 {
            let len = next(8);
            let s: String = (0..len)
                .map(|_| alphabet[usize::try_from(next(alphabet.len() as u64)).unwrap()])
                .collect();
            let v = Value::String(s);
            let mut inner = Mapping::new();
            inner.insert(
                v.clone(),
                Value::Sequence(vec![v.clone(), Value::Mapping(Mapping::new())]),
            );
            inner.insert("n".into(), Value::Number(1.5.into()));
            let mut m = Mapping::new();
            m.insert("a".into(), Value::Mapping(inner));
            m.insert(
                v.clone(),
                Value::Sequence(vec![Value::Sequence(vec![v.clone(), true.into()])]),
            );
            let s = v.as_str().unwrap_or_default();
            assert_eq!(
                same_as_serde(&Value::Mapping(m)),
                !s.starts_with('!'),
                "{s:?}"
            );
            taken += usize::from(!s.starts_with('!'));
        }
        assert!(taken > 3800, "{taken}");
    }

    #[test]
    fn what_it_leaves_to_serde_is_refused_whole() {
        let mut out = String::from("kept");
        let tagged: Value = serde_norway::from_str("!Ref x").unwrap();
        for v in [
            Value::String("two\nlines".into()),
            tagged,
            serde_norway::from_str("{1: a}").unwrap(),
            serde_norway::from_str("{a: {b: [c, \"d\\ne\"]}}").unwrap(),
            serde_norway::from_str(&format!("{{{}: 1}}", "k".repeat(129))).unwrap(),
            serde_norway::from_str("{'!x': 1}").unwrap(),
        ] {
            assert_eq!(document(&v, &mut out, &mut Work::default()), None, "{v:?}");
            assert_eq!(out, "kept");
        }
        // 128 bytes is still a simple key.
        let ok: Value = serde_norway::from_str(&format!("{{{}: 1}}", "k".repeat(128))).unwrap();
        assert!(same_as_serde(&ok));
    }
}
