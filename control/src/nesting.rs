//! A linear pre-scan of a YAML text that measures how deeply its collections nest, run before the
//! mesh config is parsed.
//!
//! Why: the YAML parser (libyaml, through `serde_norway`) takes time quadratic in the nesting
//! depth of flow collections (100,000 nested `[` in a 200 KB file took 34 s of CPU), and it
//! parses the whole document before serde's recursion limit can apply. The mesh config needs
//! about 8 levels; [`MAX_DEPTH`] allows 64.
//!
//! What is counted: block collections (each indentation level that a sequence entry `- `, a
//! complex key `? ` or a `key:` opens, as libyaml's indentation stack does, plus a sequence at the
//! column of its mapping's keys, which nests without indentation) plus flow collections (`[` and
//! `{`, and the single-pair mapping that `key: value` makes inside `[...]`). Quoted scalars, block scalars (`|`, `>`), plain scalars (multi-line ones too)
//! and comments are skipped by the same rules libyaml's scanner uses, so brackets in values and
//! comments do not count. Where this scan cannot follow the YAML (reserved characters, broken
//! syntax), it errs towards counting more; the parser rejects such text anyway.

/// The deepest nesting accepted: block collections plus flow collections.
pub const MAX_DEPTH: usize = 64;

/// The deepest point of a YAML text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    /// Nesting depth there (block plus flow collections).
    pub depth: usize,
    /// Its line, from 1.
    pub line: usize,
}

/// Scans `yaml` and returns its deepest point, stopping at the first point deeper than `limit`.
pub fn scan(yaml: &str, limit: usize) -> Depth {
    let mut s = Scanner {
        b: yaml.strip_prefix('\u{feff}').unwrap_or(yaml).as_bytes(),
        i: 0,
        col: 0,
        line: 1,
        flow: Vec::new(),
        indents: Vec::new(),
        deepest: Depth { depth: 0, line: 1 },
        limit,
    };
    s.run();
    s.deepest
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// Column in characters.
    col: usize,
    line: usize,
    /// Open flow collections, innermost last.
    flow: Vec<Flow>,
    /// libyaml's block indentation stack.
    indents: Vec<Level>,
    deepest: Depth,
    limit: usize,
}

/// One open flow collection.
#[derive(Debug, Clone, Copy)]
struct Flow {
    /// `[` rather than `{`.
    seq: bool,
    /// A sequence whose current entry is a `key: value` pair: a mapping, one level more.
    pair: bool,
}

/// One block collection on libyaml's indentation stack.
#[derive(Debug, Clone, Copy)]
struct Level {
    /// Its column.
    col: usize,
    /// A sequence (`- `) rather than a mapping.
    seq: bool,
    /// A mapping that holds a sequence at its own column (`key:` then `- item` below it): one
    /// more level in the tree, with no indentation of its own.
    indentless: bool,
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn is_break(b: u8) -> bool {
    b == b'\n' || b == b'\r'
}

impl Scanner<'_> {
    fn peek(&self, k: usize) -> Option<u8> {
        self.b.get(self.i + k).copied()
    }

    /// Whether the byte `k` ahead is blank, a line break or the end.
    fn blankz(&self, k: usize) -> bool {
        self.peek(k).is_none_or(|b| is_blank(b) || is_break(b))
    }

    /// Consumes one byte that is not a line break.
    fn bump(&mut self) {
        if let Some(b) = self.peek(0) {
            // Count characters, not bytes: UTF-8 continuation bytes add no column.
            if b & 0xc0 != 0x80 {
                self.col += 1;
            }
            self.i += 1;
        }
    }

    /// Consumes one line break (`\n`, `\r\n` or `\r`).
    fn newline(&mut self) {
        if self.peek(0) == Some(b'\r') && self.peek(1) == Some(b'\n') {
            self.i += 1;
        }
        self.i += 1;
        self.line += 1;
        self.col = 0;
    }

    fn skip_to_eol(&mut self) {
        while self.peek(0).is_some_and(|b| !is_break(b)) {
            self.i += 1;
        }
    }

    fn flow_depth(&self) -> usize {
        self.flow.iter().map(|f| 1 + usize::from(f.pair)).sum()
    }

    fn note_depth(&mut self) -> bool {
        self.note_depth_plus(0)
    }

    /// Notes the current depth plus `extra` levels (a flow key's, inside the mapping it keys).
    fn note_depth_plus(&mut self, extra: usize) -> bool {
        let block: usize = self
            .indents
            .iter()
            .map(|l| 1 + usize::from(l.indentless))
            .sum();
        let depth = self.flow_depth() + block + extra;
        if depth > self.deepest.depth {
            self.deepest = Depth {
                depth,
                line: self.line,
            };
        }
        depth > self.limit
    }

    /// Marks the current entry of an innermost flow sequence as a pair (after `:` or `?`);
    /// returns whether the limit is passed.
    fn in_flow_sequence_pair(&mut self) -> bool {
        match self.flow.last_mut() {
            Some(f) if f.seq && !f.pair => {
                f.pair = true;
                self.note_depth()
            }
            _ => false,
        }
    }

    /// A block collection at `col`, as libyaml's `roll_indent`; `seq` for a sequence entry.
    fn roll(&mut self, col: usize, seq: bool) -> bool {
        if self.flow.is_empty() {
            match self.indents.last_mut() {
                Some(top) if top.col >= col => {
                    if seq && !top.seq && top.col == col {
                        top.indentless = true;
                    }
                }
                _ => self.indents.push(Level {
                    col,
                    seq,
                    indentless: false,
                }),
            }
        }
        self.note_depth()
    }

    fn at_document_marker(&self) -> bool {
        self.col == 0
            && (self.b[self.i..].starts_with(b"---") || self.b[self.i..].starts_with(b"..."))
            && self.blankz(3)
    }

    fn run(&mut self) {
        // Whether the next token is the first of its line, and where a simple key (the start of
        // a `key:`) may begin on this line (block context only).
        let mut line_start = true;
        let mut key_col: Option<usize> = None;
        // The deepest flow nesting inside the current simple key (`[a]: b`, `{a: b}: c`): once
        // its `:` opens a mapping, that nesting sits inside the mapping.
        let mut key_flow = 0usize;
        while let Some(c) = self.peek(0) {
            if is_blank(c) {
                self.bump();
                continue;
            }
            if is_break(c) {
                self.newline();
                line_start = true;
                key_col = None;
                continue;
            }
            if c == b'#' {
                self.skip_to_eol();
                continue;
            }
            if self.col == 0 && self.b[self.i..].starts_with("\u{feff}".as_bytes()) {
                // libyaml skips a byte-order mark at the start of any line, as one column.
                self.i += 3;
                self.col += 1;
                continue;
            }
            if self.flow.is_empty() && line_start {
                while self.indents.last().is_some_and(|top| top.col > self.col) {
                    self.indents.pop();
                }
                // A key at a mapping's column ends the sequence that sat at that column.
                let entry = (c == b'-' || c == b'?') && self.blankz(1);
                if let Some(top) = self.indents.last_mut().filter(|t| t.col == self.col) {
                    if !entry {
                        top.indentless = false;
                    }
                }
            }
            line_start = false;
            let col = self.col;
            if self.at_document_marker() {
                self.indents.clear();
                key_col = None;
                self.i += 3;
                self.col += 3;
                continue;
            }
            match c {
                b'%' if col == 0 => self.skip_to_eol(),
                b'[' | b'{' => {
                    if self.flow.is_empty() && key_col.is_none() {
                        key_col = Some(col);
                        key_flow = 0;
                    }
                    self.flow.push(Flow {
                        seq: c == b'[',
                        pair: false,
                    });
                    key_flow = key_flow.max(self.flow_depth());
                    self.bump();
                    if self.note_depth() {
                        return;
                    }
                }
                b']' | b'}' => {
                    self.flow.pop();
                    self.bump();
                }
                b',' => {
                    if let Some(f) = self.flow.last_mut() {
                        f.pair = false;
                    }
                    self.bump();
                }
                // libyaml: inside a flow collection `?` is a key indicator whatever follows it;
                // the pair it opens counts, and so does the depth for the block key this flow
                // collection may be.
                b'?' if !self.flow.is_empty() => {
                    self.bump();
                    if self.in_flow_sequence_pair() {
                        return;
                    }
                    key_flow = key_flow.max(self.flow_depth());
                }
                b'-' | b'?' if self.blankz(1) => {
                    self.bump();
                    key_col = None;
                    if c == b'?' && self.in_flow_sequence_pair() {
                        return;
                    }
                    if self.flow.is_empty() && self.roll(col, c == b'-') {
                        return;
                    }
                }
                b':' if !self.flow.is_empty() || self.blankz(1) => {
                    self.bump();
                    if self.in_flow_sequence_pair() {
                        return;
                    }
                    key_flow = key_flow.max(self.flow_depth());
                    // A `:` inside a flow collection belongs to it, not to the block key.
                    if self.flow.is_empty() {
                        if let Some(k) = key_col.take() {
                            if self.roll(k, false) || self.note_depth_plus(key_flow) {
                                return;
                            }
                        }
                        key_flow = 0;
                    }
                }
                b'*' | b'&' => {
                    if self.flow.is_empty() {
                        key_col.get_or_insert(col);
                    }
                    self.bump();
                    while self
                        .peek(0)
                        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    {
                        self.bump();
                    }
                }
                b'!' => {
                    if self.flow.is_empty() {
                        key_col.get_or_insert(col);
                    }
                    while !(self.blankz(0) || (!self.flow.is_empty() && self.peek(0) == Some(b',')))
                    {
                        self.bump();
                    }
                }
                b'|' | b'>' if self.flow.is_empty() => self.block_scalar(),
                b'\'' | b'"' => {
                    if self.flow.is_empty() {
                        key_col.get_or_insert(col);
                    }
                    self.quoted(c);
                }
                // Reserved indicators: libyaml stops with an error here, and so does the parse.
                b'@' | b'`' => return,
                _ => {
                    if self.flow.is_empty() {
                        key_col.get_or_insert(col);
                    }
                    self.plain();
                }
            }
        }
    }

    /// A quoted scalar, possibly over several lines.
    fn quoted(&mut self, quote: u8) {
        self.bump();
        while let Some(b) = self.peek(0) {
            if is_break(b) {
                self.newline();
            } else if quote == b'\'' && b == b'\'' {
                if self.peek(1) == Some(b'\'') {
                    self.bump();
                    self.bump();
                } else {
                    self.bump();
                    return;
                }
            } else if quote == b'"' && b == b'\\' {
                self.bump();
                if self.peek(0).is_some_and(is_break) {
                    self.newline();
                } else {
                    self.bump();
                }
            } else if b == quote {
                self.bump();
                return;
            } else {
                self.bump();
            }
        }
    }

    /// A block scalar (`|` or `>`): its header line, then every line that belongs to it, by
    /// libyaml's rules (indentation at least the scalar's, or empty).
    fn block_scalar(&mut self) {
        self.bump();
        let parent = self.indents.last().map_or(-1, |l| l.col as isize);
        let mut explicit = None;
        while let Some(b) = self.peek(0) {
            match b {
                b'+' | b'-' => self.bump(),
                b'1'..=b'9' => {
                    explicit = Some(isize::from(b - b'0'));
                    self.bump();
                }
                _ => break,
            }
        }
        // The rest of the header line is blanks and a comment, or the text is broken.
        self.skip_to_eol();
        let mut indent: Option<usize> = explicit.map(|n| {
            if parent >= 0 {
                (parent + n) as usize
            } else {
                n as usize
            }
        });
        let mut max_seen = 0usize;
        loop {
            if !self.peek(0).is_some_and(is_break) {
                return;
            }
            // Look at the next line without consuming it unless it belongs to the scalar.
            let start = self.i;
            let (line, col) = (self.line, self.col);
            self.newline();
            let mut spaces = 0usize;
            while self.peek(0) == Some(b' ') && indent.is_none_or(|ind| spaces < ind) {
                self.i += 1;
                spaces += 1;
            }
            self.col = spaces;
            let ends_line = self.peek(0).is_none_or(is_break);
            if ends_line && self.peek(0).is_some() {
                // An empty line: part of the scalar.
                max_seen = max_seen.max(spaces);
                continue;
            }
            if self.peek(0).is_none() {
                return;
            }
            let ind = *indent.get_or_insert_with(|| {
                max_seen
                    .max(spaces)
                    .max(usize::try_from(parent + 1).unwrap_or(0))
                    .max(1)
            });
            if spaces < ind {
                // Not part of the scalar: rewind to the line break, for the main loop.
                self.i = start;
                self.line = line;
                self.col = col;
                return;
            }
            self.skip_to_eol();
        }
    }

    /// A plain scalar, possibly over several lines. It stops before what ends it (an indicator,
    /// a comment, or the line break before a line that is not part of it).
    fn plain(&mut self) {
        let min_indent = self.indents.last().map_or(0, |l| l.col + 1);
        loop {
            if self.at_document_marker() || self.peek(0) == Some(b'#') {
                return;
            }
            while let Some(b) = self.peek(0) {
                if is_blank(b) || is_break(b) {
                    break;
                }
                if b == b':' {
                    let next = self.peek(1);
                    if self.blankz(1)
                        || (!self.flow.is_empty() && next.is_some_and(|n| b",?[]{}".contains(&n)))
                    {
                        return;
                    }
                }
                if !self.flow.is_empty() && b",[]{}".contains(&b) {
                    return;
                }
                self.bump();
            }
            // Blanks, then maybe line breaks.
            while self.peek(0).is_some_and(is_blank) {
                self.bump();
            }
            if !self.peek(0).is_some_and(is_break) {
                if self.peek(0).is_none() {
                    return;
                }
                // More words on this line (a `#` here starts a comment: checked at the top).
                continue;
            }
            // A line break: the scalar goes on if the next non-empty line is indented enough
            // (block context) or always (flow context).
            let start = self.i;
            let (line, col) = (self.line, self.col);
            loop {
                self.newline();
                while self.peek(0).is_some_and(is_blank) {
                    self.bump();
                }
                if !self.peek(0).is_some_and(is_break) {
                    break;
                }
            }
            let goes_on = self.peek(0).is_some()
                && (!self.flow.is_empty() || self.col >= min_indent)
                && !self.at_document_marker()
                && self.peek(0) != Some(b'#');
            if !goes_on {
                self.i = start;
                self.line = line;
                self.col = col;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(yaml: &str) -> usize {
        scan(yaml, usize::MAX).depth
    }

    #[test]
    fn an_explicit_key_inside_a_flow_sequence_is_a_mapping() {
        // Found by the mesh_config fuzz target: `[?J]` is a sequence holding a one-pair mapping
        // (libyaml takes `?` as a key indicator anywhere in flow context).
        assert!(scan("\n[?J]:", usize::MAX).depth >= 3);
    }

    #[test]
    fn block_and_flow_levels_are_counted() {
        assert_eq!(depth(""), 0);
        assert_eq!(depth("a"), 0);
        assert_eq!(depth("a: 1"), 1);
        assert_eq!(depth("a:\n  b:\n    c: 1\n"), 3);
        assert_eq!(depth("- - - x"), 3);
        assert_eq!(depth("- a: [1, {b: [2]}]"), 5);
        assert_eq!(depth("a:\n- 1\n- 2\n"), 2, "an indentless sequence");
        // Found by the mesh_config fuzz target: the parser builds 3 levels here.
        assert_eq!(
            depth("unknown_destinations: refuse\nservices:\n- { name: a:P b, c: d }\n"),
            3
        );
        assert_eq!(depth("a:\n- 1\nb:\n  c: 1\n"), 2, "the sequence ended at b");
        // Found by the fuzz target too: `[a b: c]` is a sequence holding a mapping.
        assert_eq!(depth("[a b: c]"), 2);
        assert_eq!(depth("[a: b, c, d: e]"), 2);
        assert_eq!(depth("[? a : b]"), 2);
        assert_eq!(depth("{a: b, c: d}"), 1);
        // And this: a flow key nests inside the mapping its `:` opens.
        assert_eq!(depth("a: b\nc:\n- {d: e}: f\n"), 4);
        assert_eq!(depth("[[a]]: b\n"), 3);
        // And this: a byte-order mark at a line start is skipped, as one column.
        assert_eq!(depth("a: b\n-c:\n  -\n\u{feff}    d:\n      -e\n"), 3);
        assert_eq!(depth(&format!("x: {}", "[a: ".repeat(40))), 81);
        assert_eq!(depth("? - a\n: b"), 2);
        assert_eq!(
            depth(&format!("a: {}{}", "[".repeat(100), "]".repeat(100))),
            101
        );
        let d = scan(&format!("x: 1\ny: {}", "[".repeat(100_000)), 64);
        assert_eq!(d, Depth { depth: 65, line: 2 });
        let nested: String = (0..70)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert_eq!(depth(&nested), 70);
    }

    #[test]
    fn brackets_in_scalars_and_comments_do_not_count() {
        let b = "[".repeat(100);
        for yaml in [
            format!("a: \"{b}\""),
            format!("a: '{b}'"),
            format!("a: 'it''s {b}'"),
            format!("a: \"\\\" {b}\""),
            format!("a: x{b}"),
            format!("a: it's {b}"),
            format!("a: b # {b}"),
            format!("# {b}\na: 1"),
            format!("a: |\n  {b}\n  'x\nb: 1"),
            format!("a: >-\n  {b}\n\n  {b}\n"),
            format!("a: \"x\n  {b}\""),
            format!("a: plain\n  continued {b}\n"),
            "a: plain\n  'quote in a plain scalar\nb: 1".to_string(),
            format!("- [a, \"{b}\", '{b}']"),
        ] {
            assert!(depth(&yaml) <= 2, "{yaml:?}: {}", depth(&yaml));
        }
    }

    #[test]
    fn a_quote_inside_a_plain_scalar_does_not_hide_what_follows() {
        let b = "[".repeat(100);
        // The `'` is inside the plain scalar "b 'x": it opens no quoted scalar.
        assert!(depth(&format!("a: b 'x\nc: {b}")) > 64);
        assert!(depth(&format!("a: |\n  'x\nc: {b}")) > 64);
        assert!(depth(&format!("- a: |\n  b: {b}")) > 64);
        // And a `#` after a blank in a plain scalar starts a comment, quote or not.
        assert_eq!(depth(&format!("[a 'x # ', {b}")), 1);
    }
}
