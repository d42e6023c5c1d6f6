//! A YAML document as a tree whose every value remembers where it was written.
//!
//! serde-based YAML crates lose positions once a value is deserialized, and stop at the first
//! problem; the pipeline loader needs both positions (for file:line:col diagnostics) and the
//! chance to report every problem at once. So the loader builds this tree from the
//! `yaml-rust2` event stream and does its own typed conversion on top.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::diag::{Diagnostic, SourceId, Span};

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub span: Span,
    /// A scalar's text as written, where typing changed it (`3.10` is the float 3.1,
    /// `007` the integer 7): what `${...}` inside text shows.
    pub text: Option<String>,
}

impl Node {
    /// This value and every value inside it.
    pub fn count(&self) -> usize {
        1 + match &self.value {
            Value::Seq(items) => items.iter().map(Node::count).sum(),
            Value::Map(entries) => entries.iter().map(|(_, n)| n.count()).sum(),
            _ => 0,
        }
    }

    pub fn new(value: Value, span: Span) -> Self {
        Node {
            value,
            span,
            text: None,
        }
    }

    /// A plain scalar typed as YAML types it, keeping its text where typing changed it.
    pub fn plain(text: &str, span: Span) -> Self {
        let value = plain_scalar(text);
        let text = (!matches!(value, Value::Str(_))).then(|| text.to_string());
        Node { value, span, text }
    }

    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value as JSON, for handing a `with:` block to a stage's parameter struct.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            // JSON has no infinity or NaN: as text, so that a number param refuses it by
            // name (`.inf`) rather than as a null, and a text param takes it as written.
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or_else(
                || J::String(self.text.clone().unwrap_or_else(|| f.to_string())),
                J::Number,
            ),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// Types a plain (unquoted) scalar by the YAML 1.2 core schema; quoted scalars stay strings.
pub fn plain_scalar(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | "+.inf" | ".Inf" => return Value::Float(f64::INFINITY),
        "-.inf" | "-.Inf" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" => return Value::Float(f64::NAN),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::Int(i);
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Value::Int(i);
        }
    }
    // Rust also parses "inf" and "nan", which YAML spells differently: require a digit.
    if text.bytes().any(|b| b.is_ascii_digit())
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        if let Ok(f) = text.parse::<f64>() {
            return Value::Float(f);
        }
    }
    Value::Str(text.to_string())
}

/// The most values a pipeline file may hold, aliases expanded: far beyond any real pipeline,
/// far below what a few hundred bytes of nested aliases (a "billion laughs") expand to.
const MAX_VALUES: usize = 200_000;
/// The deepest nesting allowed: values are walked recursively, so thousands of levels would
/// overflow the stack.
const MAX_DEPTH: usize = 64;

/// Parses one YAML document. Duplicate keys are collected as diagnostics (the later value is
/// dropped); a syntax error, or a document too large or too deep, ends parsing with a single
/// diagnostic.
pub fn parse(text: &str, source: SourceId) -> Result<(Node, Vec<Diagnostic>), Diagnostic> {
    let mut builder = Builder {
        source,
        lines: text.lines().collect(),
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        diags: Vec::new(),
        documents: 0,
        values: 0,
        abandoned: None,
    };
    let mut parser = Parser::new_from_str(text);
    // Event by event rather than `Parser::load`, which recurses once per level of nesting
    // and so overflows the stack on a deep enough document before we could refuse it.
    let loaded = loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break Ok(()),
            Ok((ev, mark)) => builder.on_event(ev, mark),
            Err(e) => break Err(e),
        }
        // A second document is reported, and not read: a syntax error in it would otherwise
        // stand alone for the whole file, hiding the first document's problems.
        if builder.abandoned.is_some() || builder.documents > 1 {
            break Ok(());
        }
    };
    if let Some(d) = builder.abandoned {
        return Err(d);
    }
    loaded.map_err(|e| {
        let m = e.marker();
        Diagnostic::new(
            format!("invalid YAML: {}", e.info()),
            Span {
                source,
                line: m.line() as u32,
                col: m.col() as u32 + 1,
                len: 1,
            },
        )
    })?;
    let root = builder.root.unwrap_or(Node::new(
        Value::Null,
        Span {
            source,
            line: 1,
            col: 1,
            len: 0,
        },
    ));
    Ok((root, builder.diags))
}

enum Frame {
    Seq(Vec<Node>, Span, usize),
    /// A mapping's entries, the key waiting for its value, where each key was first given
    /// (an index: a duplicate is found at once, not by a search of the entries, which made a
    /// mapping of 100,000 keys take 40 s), its span and anchor.
    Map(
        Vec<(Key, Node)>,
        Option<Key>,
        HashMap<String, usize>,
        Span,
        usize,
    ),
}

struct Builder<'a> {
    source: SourceId,
    /// The text's lines, for measuring values by line and column.
    lines: Vec<&'a str>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    diags: Vec<Diagnostic>,
    /// Documents begun so far: the second is an error, not silently ignored.
    documents: usize,
    /// Values built so far, each alias counted as the values it copies.
    values: usize,
    /// Why building stopped (too many values, too deep), if it did.
    abandoned: Option<Diagnostic>,
}

impl Builder<'_> {
    fn span(&self, mark: Marker, len: usize) -> Span {
        Span {
            source: self.source,
            line: mark.line() as u32,
            col: mark.col() as u32 + 1,
            len: len as u32,
        }
    }

    /// The scalar's width in the source, for underlining: up to the end of its first line.
    fn scalar_len(&self, mark: Marker, value: &str, style: TScalarStyle) -> usize {
        let quoted = matches!(
            style,
            TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted
        );
        // The marker counts characters, not bytes: find the rest of its line by line and
        // column, so text after Cyrillic, say, is measured right.
        let line = self.lines.get(mark.line().saturating_sub(1));
        let line_rest = line.map_or(0, |l| l.chars().skip(mark.col()).count());
        let want = value.lines().next().unwrap_or("").chars().count() + if quoted { 2 } else { 0 };
        want.clamp(1, line_rest.max(1))
    }

    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq(items, ..)) => items.push(node),
            Some(Frame::Map(entries, pending, first, ..)) => match pending.take() {
                None => {
                    let name = match &node.value {
                        Value::Str(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Null => "null".to_string(),
                        Value::Seq(_) | Value::Map(_) => {
                            self.diags.push(Diagnostic::new(
                                "a mapping key must be a plain value, not a list or mapping",
                                node.span,
                            ));
                            "<invalid>".to_string()
                        }
                    };
                    *pending = Some(Key {
                        name,
                        span: node.span,
                    });
                }
                Some(key) => {
                    if let Some(&at) = first.get(&key.name) {
                        let line = entries[at].0.span.line;
                        self.diags.push(
                            Diagnostic::new(format!("duplicate key `{}`", key.name), key.span)
                                .label("defined again here")
                                .hint(format!(
                                    "`{}` is first defined at line {line}; remove or rename one",
                                    key.name
                                )),
                        );
                    } else {
                        first.insert(key.name.clone(), entries.len());
                        entries.push((key, node));
                    }
                }
            },
        }
    }
}

/// The handle `!!` stands for: YAML's core schema.
const CORE_TAGS: &str = "tag:yaml.org,2002:";

impl Builder<'_> {
    /// A tag this reader does not honour (`!secret`, `!!binary`): refused, naming it, rather
    /// than the value taken as if untagged (`run: !secret CMD` would run the text `CMD`).
    fn unsupported_tag(&mut self, tag: Option<&yaml_rust2::parser::Tag>, span: Span) {
        let Some(tag) = tag else { return };
        let shown = match tag.handle.as_str() {
            CORE_TAGS => format!("!!{}", tag.suffix),
            handle => format!("{handle}{}", tag.suffix),
        };
        self.diags.push(
            Diagnostic::new(format!("unsupported YAML tag `{shown}`"), span).hint(
                "pipeline files hold plain values; only `!!str` (and YAML's other core tags) are read",
            ),
        );
    }

    /// A mapping's entries with its merge key (`<<: *base`, or `<<: [*a, *b]`) replaced by
    /// the entries it brings that the mapping does not give itself (YAML's merge key: the
    /// mapping's own keys win, then the merged mappings' in the order listed).
    fn merged(&mut self, mut entries: Vec<(Key, Node)>) -> Vec<(Key, Node)> {
        let Some(at) = entries.iter().position(|(k, _)| k.name == "<<") else {
            return entries;
        };
        let (key, merge) = entries.remove(at);
        let sources: Vec<Node> = match merge.value {
            Value::Map(_) => vec![merge],
            Value::Seq(items) if items.iter().all(|n| matches!(n.value, Value::Map(_))) => items,
            _ => {
                self.diags.push(
                    Diagnostic::new(
                        "`<<` merges a mapping, or a list of mappings, into this one",
                        key.span,
                    )
                    .hint(
                        "write `<<: *anchor` with an anchor on a mapping (`base: &anchor {...}`)",
                    ),
                );
                return entries;
            }
        };
        let mut given: std::collections::HashSet<String> =
            entries.iter().map(|(k, _)| k.name.clone()).collect();
        for source in sources {
            let Value::Map(brought) = source.value else {
                continue;
            };
            for (k, v) in brought {
                if given.insert(k.name.clone()) {
                    entries.push((k, v));
                }
            }
        }
        entries
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if matches!(ev, Event::DocumentStart) {
            self.documents += 1;
            if self.documents == 2 {
                self.diags.push(
                    Diagnostic::new(
                        "a second YAML document: a pipeline file holds exactly one",
                        self.span(mark, 3),
                    )
                    .hint(
                        "remove the `---` line and what follows, or move it to a file of its own",
                    ),
                );
            }
        }
        if self.documents > 1 || self.abandoned.is_some() {
            return; // reported once; what follows would only add noise
        }
        if matches!(
            ev,
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..)
        ) {
            self.values += 1;
        }
        if let Event::Alias(id) = ev {
            self.values += self.anchors.get(&id).map_or(1, Node::count);
        }
        if self.values > MAX_VALUES {
            self.abandoned = Some(
                Diagnostic::new(
                    format!("the document holds more than {MAX_VALUES} values (aliases expanded)"),
                    self.span(mark, 1),
                )
                .hint("a pipeline file this large is a mistake, or an alias expanding into itself many times over"),
            );
            return;
        }
        if self.stack.len() >= MAX_DEPTH
            && matches!(ev, Event::SequenceStart(..) | Event::MappingStart(..))
        {
            self.abandoned = Some(Diagnostic::new(
                format!("values nest more than {MAX_DEPTH} levels deep"),
                self.span(mark, 1),
            ));
            return;
        }
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let len = self.scalar_len(mark, &text, style);
                let mut span = self.span(mark, len);
                // A value left empty (`kind:` and nothing after) is marked by the parser where
                // the next token begins, the line below or past the file's end: shown at its
                // key's colon instead.
                if text.is_empty() && style == TScalarStyle::Plain && tag.is_none() {
                    if let Some(Frame::Map(_, Some(key), ..)) = self.stack.last() {
                        span = Span {
                            col: key.span.col + key.span.len,
                            len: 1,
                            ..key.span
                        };
                    }
                }
                let as_text = match tag.as_ref().map(|t| (t.handle.as_str(), t.suffix.as_str())) {
                    // `!!str 2` is the text "2", as YAML says.
                    Some((CORE_TAGS, "str")) => true,
                    // The other core scalar tags type a value as it is typed untagged.
                    None | Some((CORE_TAGS, "int" | "float" | "bool" | "null")) => false,
                    Some(_) => {
                        self.unsupported_tag(tag.as_ref(), span);
                        false
                    }
                };
                let node = if style == TScalarStyle::Plain && !as_text {
                    Node::plain(&text, span)
                } else {
                    Node::new(Value::Str(text), span)
                };
                self.push_value(node, anchor);
            }
            Event::SequenceStart(anchor, tag) => {
                let span = self.span(mark, 1);
                if tag
                    .as_ref()
                    .is_some_and(|t| (t.handle.as_str(), t.suffix.as_str()) != (CORE_TAGS, "seq"))
                {
                    self.unsupported_tag(tag.as_ref(), span);
                }
                self.stack.push(Frame::Seq(Vec::new(), span, anchor));
            }
            Event::MappingStart(anchor, tag) => {
                let span = self.span(mark, 1);
                if tag
                    .as_ref()
                    .is_some_and(|t| (t.handle.as_str(), t.suffix.as_str()) != (CORE_TAGS, "map"))
                {
                    self.unsupported_tag(tag.as_ref(), span);
                }
                self.stack
                    .push(Frame::Map(Vec::new(), None, HashMap::new(), span, anchor));
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq(items, span, anchor)) = self.stack.pop() {
                    self.push_value(Node::new(Value::Seq(items), span), anchor);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map(entries, _, _, span, anchor)) = self.stack.pop() {
                    let entries = self.merged(entries);
                    self.push_value(Node::new(Value::Map(entries), span), anchor);
                }
            }
            Event::Alias(id) => {
                // The parser refuses an alias to no anchor at all, so one not stored yet is
                // inside the value its anchor names: a value that would contain itself.
                let node = match self.anchors.get(&id) {
                    Some(node) => node.clone(),
                    None => {
                        let span = self.span(mark, 1);
                        self.diags.push(
                            Diagnostic::new("this alias is inside the value its anchor names", span)
                                .hint("a value cannot contain itself: anchor a value that is complete before the alias"),
                        );
                        Node::new(Value::Null, span)
                    }
                };
                self.push_value(node, 0);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Node {
        let (n, d) = parse(text, SourceId(0)).unwrap();
        assert!(d.is_empty(), "{d:?}");
        n
    }

    #[test]
    fn merge_keys_bring_what_the_mapping_does_not_give() {
        let root = p("base: &b { run: a, retries: 1 }\nx: { <<: *b, retries: 2 }\ny: { <<: [*b, { timeout: 5 }] }\n");
        let x = root.get("x").unwrap();
        assert_eq!(x.get("retries").map(|n| &n.value), Some(&Value::Int(2)));
        assert_eq!(
            x.get("run").map(|n| &n.value),
            Some(&Value::Str("a".into()))
        );
        assert!(x.get("<<").is_none());
        let y = root.get("y").unwrap();
        assert_eq!(y.get("timeout").map(|n| &n.value), Some(&Value::Int(5)));
        let (_, d) = parse("x: { <<: 3 }\n", SourceId(0)).unwrap();
        assert!(d[0].message.contains("`<<` merges a mapping"), "{d:?}");
    }

    #[test]
    fn a_second_document_is_an_error_at_its_start() {
        let (root, d) = parse("a: 1\n---\nb: 2\n", SourceId(0)).unwrap();
        assert_eq!(root.get("a").map(|n| &n.value), Some(&Value::Int(1)));
        assert!(root.get("b").is_none());
        assert_eq!(d.len(), 1, "{d:?}");
        let at = d[0].span.expect("a position");
        assert_eq!((at.line, at.col), (2, 1));
        // One document, with or without its markers, is fine.
        assert_eq!(parse("---\na: 1\n...\n", SourceId(0)).unwrap().1.len(), 0);
    }

    /// A few hundred bytes of nested aliases, and thousands of nested mappings, are each one
    /// clear error: not an abort for memory, nor a stack overflow.
    #[test]
    fn alias_bombs_and_deep_nesting_are_errors() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let e = parse(&bomb, SourceId(0)).unwrap_err();
        assert!(e.message.contains("more than"), "{}", e.message);
        let mut deep = String::new();
        for i in 0..5000 {
            deep.push_str(&format!("{}k:\n", " ".repeat(i)));
        }
        let e = parse(&deep, SourceId(0)).unwrap_err();
        assert!(e.message.contains("levels deep"), "{}", e.message);
        // Real aliases still work.
        let n = p("a: &x {b: 1}\nc: *x\n");
        assert_eq!(n.get("c").unwrap().get("b").unwrap().value, Value::Int(1));
    }

    #[test]
    fn underlines_are_as_wide_as_the_value_after_non_ascii_text() {
        let n = p("name: \"тест пайплайн\"\nkind: shel\nx: [ё, abc]\n");
        assert_eq!(n.get("kind").unwrap().span.len, 4);
        let Value::Seq(items) = &n.get("x").unwrap().value else {
            panic!("a list")
        };
        assert_eq!((items[0].span.len, items[1].span.len), (1, 3));
    }

    #[test]
    fn scalars_are_typed_by_the_core_schema() {
        assert_eq!(plain_scalar("3e-4"), Value::Float(3e-4));
        assert_eq!(plain_scalar("42"), Value::Int(42));
        assert_eq!(plain_scalar("true"), Value::Bool(true));
        assert_eq!(plain_scalar("inf"), Value::Str("inf".into()));
        assert_eq!(plain_scalar("1.2.3"), Value::Str("1.2.3".into()));
        let n = p("a: '42'\nb: 42\n");
        assert_eq!(n.get("a").unwrap().value, Value::Str("42".into()));
        assert_eq!(n.get("b").unwrap().value, Value::Int(42));
    }

    #[test]
    fn positions_are_one_based() {
        let n = p("top:\n  key: value\n");
        let v = n.get("top").unwrap().get("key").unwrap();
        assert_eq!((v.span.line, v.span.col, v.span.len), (2, 8, 5));
        let Value::Map(entries) = &n.get("top").unwrap().value else {
            panic!("`top` is a mapping")
        };
        assert_eq!((entries[0].0.span.line, entries[0].0.span.col), (2, 3));
    }

    #[test]
    fn duplicate_keys_are_reported_not_merged() {
        let (_, d) = parse("a: 1\na: 2\n", SourceId(0)).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].message, "duplicate key `a`");
        assert_eq!(d[0].span.unwrap().line, 2);
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let e = parse("a: [1, 2\nb: 3\n", SourceId(0)).unwrap_err();
        assert!(e.message.starts_with("invalid YAML"));
        assert!(e.span.unwrap().line >= 1);
    }

    #[test]
    fn aliases_copy_the_anchored_value() {
        let n = p("base: &b {x: 1}\nother: *b\n");
        assert_eq!(
            n.get("other").unwrap().get("x").unwrap().value,
            Value::Int(1)
        );
    }

    #[test]
    fn an_alias_inside_its_own_anchor_is_an_error() {
        let (_, d) = parse("a: &x\n  b: *x\n", SourceId(0)).unwrap();
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            d[0].message,
            "this alias is inside the value its anchor names"
        );
        let span = d[0].span.unwrap();
        assert_eq!((span.line, span.col), (2, 6));
    }
}
