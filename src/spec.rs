//! Phase one: the pipeline file as written, plus `--set` overrides and `${...}` interpolation,
//! still as a position-carrying tree. Nothing here knows about stage kinds; that is
//! [`crate::pipeline`]'s job.

use std::path::{Path, PathBuf};

use crate::diag::{nearest, suggest, Diagnostic, SourceId, Sources, Span};
use crate::yaml::{self, Key, Node, Value};

/// The keys allowed at the top of a pipeline file.
pub const TOP_LEVEL_KEYS: [&str; 5] = ["name", "storage", "tracking", "params", "stages"];

/// Looks up environment variables; a function so tests need not touch the real environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A set of diagnostics with the sources they point into.
#[derive(Debug)]
pub struct Invalid {
    pub diags: Vec<Diagnostic>,
    pub sources: Sources,
}

impl Invalid {
    pub fn render(&self) -> String {
        crate::diag::render_all(&self.diags, &self.sources)
    }
}

/// A parsed pipeline file with overrides applied and interpolation done.
#[derive(Debug)]
pub struct PipelineSpec {
    pub path: PathBuf,
    /// Relative paths in the file resolve against this directory.
    pub dir: PathBuf,
    pub sources: Sources,
    pub root: Node,
    /// Problems found so far; validation adds its own before reporting them all.
    pub diags: Vec<Diagnostic>,
}

impl PipelineSpec {
    pub fn load(path: &Path, sets: &[String], env: EnvLookup<'_>) -> Result<Self, Invalid> {
        let unreadable = |why: String| Invalid {
            diags: vec![Diagnostic::without_span(format!(
                "cannot read pipeline file {}: {why}",
                path.display()
            ))],
            sources: Sources::default(),
        };
        let bytes = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            // Where: the line and column of the first byte that is not UTF-8.
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let good = std::str::from_utf8(good).unwrap_or_default();
            let line = good.matches('\n').count() + 1;
            let col = good.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            Invalid {
                diags: vec![Diagnostic::without_span(format!(
                    "{}:{line}:{col}: the pipeline file is not UTF-8 text there (save it as UTF-8)",
                    path.display()
                ))],
                sources: Sources::default(),
            }
        })?;
        Self::from_text(path, &text, sets, env)
    }

    pub fn from_text(
        path: &Path,
        text: &str,
        sets: &[String],
        env: EnvLookup<'_>,
    ) -> Result<Self, Invalid> {
        // A byte-order mark (some Windows editors write one) is not part of the first key.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut sources = Sources::default();
        let id = sources.add(path.display().to_string(), text);
        let (mut root, mut diags) = match yaml::parse(text, id) {
            Ok(parsed) => parsed,
            Err(d) => {
                return Err(Invalid {
                    diags: vec![d],
                    sources,
                })
            }
        };
        if !matches!(root.value, Value::Map(_)) {
            diags.push(
                Diagnostic::new(
                    format!(
                        "a pipeline file must be a mapping, found {}",
                        root.type_name()
                    ),
                    root.span,
                )
                .hint("start with `name:` and `stages:`"),
            );
            return Err(Invalid { diags, sources });
        }
        for arg in sets {
            let sid = sources.add("--set", arg.clone());
            if let Some(d) = unused_param(&root, text, arg, sid) {
                diags.push(d);
                continue;
            }
            if let Err(d) = apply_set(&mut root, arg, sid) {
                diags.push(d);
            }
        }
        interpolate_all(&mut root, env, &sources, &mut diags);
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
            .unwrap_or_else(|| PathBuf::from("."));
        // Stages run in other directories, so every path handed to them must be absolute.
        let dir = dir
            .canonicalize()
            .or_else(|_| std::path::absolute(&dir))
            .unwrap_or(dir);
        Ok(PipelineSpec {
            path: path.to_path_buf(),
            dir,
            sources,
            root,
            diags,
        })
    }
}

/// A `--set params.X=…` that names a param the file neither defines nor uses: a typo
/// (`params.sede`) would otherwise be accepted and change nothing.
fn unused_param(root: &Node, text: &str, arg: &str, sid: SourceId) -> Option<Diagnostic> {
    let path = arg.split_once('=')?.0.strip_prefix("params.")?;
    let mut node = root.get("params");
    for seg in path.split('.') {
        // Inside a list (`params.sizes.0`) the index is `apply_set`'s to check: it names
        // the list and its length.
        if let Some(Value::Seq(_)) = node.map(|n| &n.value) {
            return None;
        }
        node = node.and_then(|n| n.get(seg));
    }
    if node.is_some() {
        return None;
    }
    // Used if some `${params.P}` in the file is this path, inside it, or around it.
    let used = text.split("${params.").skip(1).any(|rest| {
        let used = rest.split('}').next().unwrap_or("");
        let within = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}."));
        within(used, path) || within(path, used)
    });
    if used {
        return None;
    }
    // The hint looks beside the first part of the path that does not exist.
    let mut known = root.get("params");
    let mut walked = Vec::new();
    let mut missing = path;
    for seg in path.split('.') {
        match known.and_then(|n| n.get(seg)) {
            Some(n) => {
                known = Some(n);
                walked.push(seg);
            }
            None => {
                missing = seg;
                break;
            }
        }
    }
    let names: Vec<&str> = match known.map(|p| &p.value) {
        Some(Value::Map(entries)) => entries.iter().map(|(k, _)| k.name.as_str()).collect(),
        _ => Vec::new(),
    };
    let near = nearest(missing, names.iter().copied()).map(|n| {
        let mut full = walked.clone();
        full.push(n);
        format!("did you mean `params.{}`?", full.join("."))
    });
    Some(
        Diagnostic::new(
            format!("--set `params.{path}`: the pipeline neither defines nor uses this param"),
            Span {
                source: sid,
                line: 1,
                col: 1,
                len: ("params.".len() + path.len()) as u32,
            },
        )
        .hint_opt(
            near.or_else(|| {
                Some("define it under `params:`, or use it as `${params.NAME}`".into())
            }),
        ),
    )
}

/// Applies one `--set path=value`. The path starts at a top-level key (`params.seed`) or at a
/// stage name (`model.with.lr`, short for `stages.model.with.lr`). Missing mapping keys are
/// created, so a default can be overridden; whether the key is allowed is checked later, like
/// any key in the file, and reported against this argument.
pub fn apply_set(root: &mut Node, arg: &str, sid: SourceId) -> Result<(), Diagnostic> {
    let whole = Span {
        source: sid,
        line: 1,
        col: 1,
        len: arg.chars().count() as u32,
    };
    let Some((path, raw)) = arg.split_once('=') else {
        return Err(
            Diagnostic::new("a --set argument must look like `path=value`", whole)
                .hint("for example `--set model.with.lr=1e-4`"),
        );
    };
    let path_len = path.chars().count() as u32;
    let value_span = Span {
        source: sid,
        line: 1,
        col: path_len + 2,
        len: raw.chars().count().max(1) as u32,
    };
    let value = parse_set_value(raw, value_span)?;
    let mut segs: Vec<(String, Span)> = Vec::new();
    let mut col = 1;
    for part in path.split('.') {
        let len = part.chars().count() as u32;
        segs.push((
            part.to_string(),
            Span {
                source: sid,
                line: 1,
                col,
                len: len.max(1),
            },
        ));
        col += len + 1;
    }
    if segs.iter().any(|(s, _)| s.is_empty()) {
        return Err(
            Diagnostic::new(format!("`{path}` is not a valid path"), whole)
                .hint("write keys separated by dots, for example `model.with.lr`"),
        );
    }
    let mut current: &mut Node = root;
    let mut walked: Vec<String> = Vec::new();
    if !TOP_LEVEL_KEYS.contains(&segs[0].0.as_str()) {
        let stage = &segs[0];
        let stages = current.get("stages");
        let names: Vec<String> = match stages.map(|s| &s.value) {
            Some(Value::Map(entries)) => entries.iter().map(|(k, _)| k.name.clone()).collect(),
            _ => Vec::new(),
        };
        if !names.contains(&stage.0) {
            let mut candidates: Vec<&str> = names.iter().map(String::as_str).collect();
            candidates.extend(TOP_LEVEL_KEYS);
            return Err(Diagnostic::new(
                format!(
                    "--set path `{path}` names no stage and no top-level key `{}`",
                    stage.0
                ),
                stage.1,
            )
            .hint_opt(suggest(&stage.0, &candidates)));
        }
        current = map_entry(current, "stages", stage.1);
        walked.push("stages".into());
    }
    let last = segs.len() - 1;
    for (i, (seg, span)) in segs.iter().enumerate() {
        let here = if walked.is_empty() {
            "the file".to_string()
        } else {
            format!("`{}`", walked.join("."))
        };
        // A mapping left empty in the file (`params:` with nothing under it) is one that
        // `--set` may fill, as the file reads it as an empty mapping.
        if current.value == Value::Null && !walked.is_empty() {
            current.value = Value::Map(Vec::new());
        }
        let type_name = current.type_name();
        if matches!(current.value, Value::Map(_)) {
            if i == last {
                set_entry(current, seg, *span, value);
                return Ok(());
            }
            current = map_entry(current, seg, *span);
        } else if let Value::Seq(items) = &mut current.value {
            let Ok(idx) = seg.parse::<usize>() else {
                return Err(Diagnostic::new(
                    format!("{here} is a list; `{seg}` is not an index"),
                    *span,
                ));
            };
            let n = items.len();
            let Some(item) = items.get_mut(idx) else {
                return Err(Diagnostic::new(
                    format!("index {idx} is out of range: {here} has {n} items"),
                    *span,
                ));
            };
            if i == last {
                *item = value;
                return Ok(());
            }
            current = item;
        } else {
            return Err(Diagnostic::new(
                format!("{here} is {type_name}, so it has no key `{seg}`"),
                *span,
            ));
        }
        walked.push(seg.clone());
    }
    Ok(())
}

fn parse_set_value(raw: &str, span: Span) -> Result<Node, Diagnostic> {
    // A flow value (`[a, b]`, `{x: 1}`) is parsed as YAML; anything else is one scalar, so
    // that `--set name=a: b` keeps its colon.
    let value = if raw.starts_with('[') || raw.starts_with('{') {
        let text_hint = "to pass it as text, quote it: `--set \"path='[...]'\"`";
        let (node, problems) = yaml::parse(raw, span.source).map_err(|d| {
            Diagnostic::new(
                format!("the --set value is not valid YAML: {}", d.message),
                span,
            )
            .hint(text_hint)
        })?;
        // A duplicate key, say: the value would not be what was written.
        if let Some(d) = problems.into_iter().next() {
            return Err(Diagnostic::new(
                format!("the --set value is not valid: {}", d.message),
                span,
            ));
        }
        return Ok(shift(node, span.col - 1));
    } else if let Some(q) = raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        Value::Str(q.to_string())
    } else if let Some(q) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Value::Str(q.to_string())
    } else {
        return Ok(Node::plain(raw, span));
    };
    Ok(Node::new(value, span))
}

fn shift(mut node: Node, by: u32) -> Node {
    node.span.col += by;
    node.value = match node.value {
        Value::Seq(items) => Value::Seq(items.into_iter().map(|n| shift(n, by)).collect()),
        Value::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(mut k, v)| {
                    k.span.col += by;
                    (k, shift(v, by))
                })
                .collect(),
        ),
        other => other,
    };
    node
}

/// The value under `key` in a mapping node, created as an empty mapping when absent.
fn map_entry<'n>(node: &'n mut Node, key: &str, span: Span) -> &'n mut Node {
    let Value::Map(entries) = &mut node.value else {
        unreachable!("map_entry is only called on mappings");
    };
    let pos = match entries.iter().position(|(k, _)| k.name == key) {
        Some(p) => p,
        None => {
            entries.push((
                Key {
                    name: key.to_string(),
                    span,
                },
                Node::new(Value::Map(Vec::new()), span),
            ));
            entries.len() - 1
        }
    };
    &mut entries[pos].1
}

fn set_entry(node: &mut Node, key: &str, span: Span, value: Node) {
    if let Value::Map(entries) = &mut node.value {
        match entries.iter_mut().find(|(k, _)| k.name == key) {
            // The key now points at the argument too: a problem with the value is the
            // argument's, not the file's.
            Some((k, v)) => {
                k.span = span;
                *v = value;
            }
            None => entries.push((
                Key {
                    name: key.to_string(),
                    span,
                },
                value,
            )),
        }
    }
}

/// Resolves `${env.NAME}`, `${env.NAME:-default}` and `${params.name}` everywhere. The
/// `params` block itself may use only `env`. Other `${...}` forms are left alone, since shell
/// commands use them.
fn interpolate_all(
    root: &mut Node,
    env: EnvLookup<'_>,
    sources: &Sources,
    diags: &mut Vec<Diagnostic>,
) {
    let Value::Map(entries) = &mut root.value else {
        return;
    };
    let empty = Node::new(Value::Map(Vec::new()), Span::default());
    // Inside `params` no param is known yet: `None`, none may be used there.
    if let Some((_, params)) = entries.iter_mut().find(|(k, _)| k.name == "params") {
        interpolate(params, env, None, sources, diags);
    }
    let params = entries
        .iter()
        .find(|(k, _)| k.name == "params")
        .map(|(_, v)| v.clone())
        .unwrap_or(empty);
    for (k, v) in entries.iter_mut() {
        // `x-` blocks are the user's own, for anchors: what they hold is interpolated
        // where it is merged (a copy, made as the file was read), not where it is kept.
        if k.name != "params" && !k.name.starts_with("x-") {
            interpolate(v, env, Some(&params), sources, diags);
        }
    }
    // One block merged into several stages is one problem, not one per stage.
    let mut seen = std::collections::HashSet::new();
    diags.retain(|d| seen.insert((d.span, d.message.clone())));
}

/// Where `expr` (an expression as written, `${...}`) stands in the source of `node`: the
/// line of the scalar it is on (a block scalar's lines are the source's), found by its text
/// from the node's first line on; the whole node where it is not found (a folded or
/// quoted string that joined lines, a value from `--set`).
fn expression_span(node: &Node, expr: &str, sources: &Sources) -> Span {
    let span = node.span;
    let Some(text) = sources.text(span.source) else {
        return span;
    };
    let wanted = expr.lines().next().unwrap_or(expr);
    let first = span.line.saturating_sub(1) as usize;
    let lines = node.as_str().map_or(1, |s| s.lines().count().max(1));
    for (n, line) in text.lines().enumerate().skip(first).take(lines + 1) {
        // On the node's first line, only from where the node starts.
        let from = if n == first {
            line.char_indices()
                .nth(span.col.saturating_sub(1) as usize)
                .map_or(line.len(), |(i, _)| i)
        } else {
            0
        };
        if let Some(at) = line[from..].find(wanted) {
            return Span {
                source: span.source,
                line: n as u32 + 1,
                col: line[..from + at].chars().count() as u32 + 1,
                len: wanted.chars().count() as u32,
            };
        }
    }
    span
}

/// `params` is the top-level `params` block, or `None` inside it.
fn interpolate(
    node: &mut Node,
    env: EnvLookup<'_>,
    params: Option<&Node>,
    sources: &Sources,
    diags: &mut Vec<Diagnostic>,
) {
    match &mut node.value {
        Value::Seq(items) => items
            .iter_mut()
            .for_each(|n| interpolate(n, env, params, sources, diags)),
        Value::Map(entries) => entries
            .iter_mut()
            .for_each(|(_, n)| interpolate(n, env, params, sources, diags)),
        Value::Str(s) if s.contains("${env.") || s.contains("${params.") => {
            match expand_located(s, env, params) {
                Ok(Expanded::Whole(v, text)) => {
                    node.value = v;
                    node.text = text;
                }
                Ok(Expanded::Text(t)) => node.value = Value::Str(t),
                Err(first) => {
                    // Each expression at fault, each where it is written (every problem at
                    // once: the value is read on past each one).
                    let s = s.clone();
                    let mut from = 0;
                    let mut failed = Err(first);
                    while let Err(((msg, hint), expr)) = failed {
                        let span = expression_span(node, &expr, sources);
                        diags.push(Diagnostic::new(msg, span).hint_opt(hint));
                        let Some(at) = s[from..].find(&expr) else {
                            break;
                        };
                        from += at + expr.len();
                        failed = expand_located(&s[from..], env, params).map(|_| ());
                    }
                }
            }
        }
        _ => {}
    }
}

enum Expanded {
    /// The string was exactly one expression: keep the value's type (and its text).
    Whole(Value, Option<String>),
    Text(String),
}

type ExpandError = (String, Option<String>);

fn expand(s: &str, env: EnvLookup<'_>, params: Option<&Node>) -> Result<Expanded, ExpandError> {
    expand_located(s, env, params).map_err(|(e, _)| e)
}

/// [`expand`], an error with the expression at fault as written (`${...}`, up to the end
/// of its line where it is not closed).
fn expand_located(
    s: &str,
    env: EnvLookup<'_>,
    params: Option<&Node>,
) -> Result<Expanded, (ExpandError, String)> {
    let mut out = String::new();
    let mut rest = s;
    let mut whole: Option<(Value, Option<String>)> = None;
    while let Some(start) = find_expr(rest) {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = closing_brace(after) else {
            let written = rest[start..].lines().next().unwrap_or("").to_string();
            return Err((
                (
                    format!("unclosed `${{` in `{written}`"),
                    Some("close it with `}`".into()),
                ),
                written,
            ));
        };
        let expr = &after[..end];
        let (value, raw) = resolve(expr, env, params).map_err(|e| (e, format!("${{{expr}}}")))?;
        if start == 0 && end + 3 == rest.len() && out.is_empty() {
            whole = Some((value.clone(), raw.clone()));
        }
        // Inside text a value is its text as written: typing it first would turn a commit
        // `12e4567` into `inf` and a version `3.10` into `3.1`.
        match raw {
            Some(raw) => out.push_str(&raw),
            None => out.push_str(&scalar_text(&value)),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(match whole {
        Some((v, text)) => Expanded::Whole(v, text),
        None => Expanded::Text(out),
    })
}

/// Where the expression that `s` begins (after its `${`) ends: its `}`, past any `${...}`
/// nested in it (a default that is itself an expression: `${env.A:-${env.B:-dev}}`).
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'{' if i > 0 && bytes[i - 1] == b'$' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// How deep defaults may nest: `${env.A:-${env.B:-x}}` is 1 below its top.
const MAX_NESTED_DEFAULTS: usize = 16;

/// The deepest `${` nesting in `s`.
fn nesting(s: &str) -> usize {
    let (mut depth, mut most) = (0usize, 0usize);
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'{' if i > 0 && bytes[i - 1] == b'$' => {
                depth += 1;
                most = most.max(depth);
            }
            b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    most
}

fn find_expr(s: &str) -> Option<usize> {
    match (s.find("${env."), s.find("${params.")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An expression's value, typed as YAML would type it, and its text as written where
/// typing changed it.
fn resolve(
    expr: &str,
    env: EnvLookup<'_>,
    params: Option<&Node>,
) -> Result<(Value, Option<String>), ExpandError> {
    if let Some(var) = expr.strip_prefix("env.") {
        let (name, default) = match var.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (var, None),
        };
        // Letters, digits, `_` (and `.` or `-`, which an environment may hold): anything
        // else is a shell form this does not take (`${X-d}`, `${X:=d}`, `${X:?}`).
        let is_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if name.is_empty() {
            return Err((
                format!("`${{{expr}}}` names no environment variable"),
                Some("write `${env.NAME}`, or `${env.NAME:-default}`".to_string()),
            ));
        }
        if !is_name {
            let stem: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            return Err((
                format!("`{name}` in `${{{expr}}}` is not an environment variable's name"),
                Some(format!(
                    "a default is written `${{env.{stem}:-value}}`; no other shell form is taken"
                )),
            ));
        }
        // The variable first: a default that is itself an expression
        // (`${env.A:-${env.B:-dev}}`) is expanded only when it stands in, as in the shell.
        if let Some(v) = env(name).filter(|v| !v.is_empty() || default.is_none()) {
            return Ok((yaml::plain_scalar(&v), Some(v)));
        }
        let default = match default {
            Some(d) if d.contains("${env.") || d.contains("${params.") => {
                // Each level is a call deeper: a file of thousands would end the process
                // on its stack, not with a diagnostic.
                if nesting(d) > MAX_NESTED_DEFAULTS {
                    return Err((
                        format!(
                            "the default of `${{env.{name}:-...}}` nests defaults more than {MAX_NESTED_DEFAULTS} deep"
                        ),
                        Some("give the innermost default a variable of its own".into()),
                    ));
                }
                match expand(d, env, params)? {
                    Expanded::Whole(v, text) => {
                        let text = text.unwrap_or_else(|| scalar_text(&v));
                        Some(std::borrow::Cow::Owned(text))
                    }
                    Expanded::Text(t) => Some(std::borrow::Cow::Owned(t)),
                }
            }
            Some(d) => Some(std::borrow::Cow::Borrowed(d)),
            None => None,
        };
        let default = default.as_deref();
        return match (
            env(name).filter(|v| !v.is_empty() || default.is_none()),
            default,
        ) {
            (Some(v), _) => Ok((yaml::plain_scalar(&v), Some(v))),
            (None, Some(d)) => Ok((yaml::plain_scalar(d), Some(d.to_string()))),
            (None, None) => Err((
                format!("environment variable `{name}` is not set"),
                Some(match name.split_once('-') {
                    // The shell's `${VERSION-dev}`, most likely.
                    Some((stem, rest)) if !stem.is_empty() && !stem.contains('.') => format!(
                        "a default is written `${{env.{stem}:-{rest}}}`; the shell's `${{X-d}}` is not taken"
                    ),
                    _ => format!("set it, or give a default: `${{env.{name}:-value}}`"),
                }),
            )),
        };
    }
    let path = expr.strip_prefix("params.").unwrap_or(expr);
    let Some(mut node) = params else {
        return Err((
            format!("`${{params.{path}}}` is used inside `params`, where params are not resolved"),
            Some("a value under `params` may use `${env.NAME}`; write the value itself".into()),
        ));
    };
    for seg in path.split('.') {
        match node.get(seg) {
            Some(n) => node = n,
            None => {
                let names: Vec<&str> = match &node.value {
                    Value::Map(e) => e.iter().map(|(k, _)| k.name.as_str()).collect(),
                    _ => Vec::new(),
                };
                let hint = nearest(seg, names.iter().copied())
                    .map(|n| format!("did you mean `${{params.{n}}}`?"))
                    .or_else(|| Some("define it under the top-level `params:`".into()));
                return Err((format!("`params.{path}` is not defined"), hint));
            }
        }
    }
    Ok((node.value.clone(), node.text.clone()))
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Str(s) => s.clone(),
        Value::Seq(_) | Value::Map(_) => {
            serde_json::to_string(&Node::new(v.clone(), Span::default()).to_json())
                .unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load(text: &str, sets: &[&str]) -> PipelineSpec {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        PipelineSpec::from_text(Path::new("p.yaml"), text, &sets, &no_env).unwrap()
    }

    const BASE: &str = "name: t\nparams: {seed: 7, tag: x}\nstages:\n  a:\n    kind: shell\n    with: {run: 'echo ${params.tag}', n: '${params.seed}'}\n";

    #[test]
    fn params_interpolate_with_their_type_when_whole() {
        let s = load(BASE, &[]);
        let with = s
            .root
            .get("stages")
            .unwrap()
            .get("a")
            .unwrap()
            .get("with")
            .unwrap();
        assert_eq!(with.get("run").unwrap().value, Value::Str("echo x".into()));
        assert_eq!(with.get("n").unwrap().value, Value::Int(7));
    }

    #[test]
    fn env_default_and_missing() {
        let env = |n: &str| (n == "HOME_X").then(|| "/h".to_string());
        let text =
            "name: t\nstorage: ${env.HOME_X}/a\ntracking: {mlflow: '${env.NOPE:-}'}\nstages: {}\n";
        let s = PipelineSpec::from_text(Path::new("p.yaml"), text, &[], &env).unwrap();
        assert_eq!(
            s.root.get("storage").unwrap().value,
            Value::Str("/h/a".into())
        );
        assert_eq!(
            s.root.get("tracking").unwrap().get("mlflow").unwrap().value,
            Value::Null
        );
        let s = load("name: ${env.NOPE}\nstages: {}\n", &[]);
        assert_eq!(s.diags[0].message, "environment variable `NOPE` is not set");
        let s = load("name: ${env.}\nstages: {}\n", &[]);
        assert_eq!(
            s.diags[0].message,
            "`${env.}` names no environment variable"
        );
    }

    #[test]
    fn a_default_may_be_an_expression_and_shell_forms_are_named() {
        let env = |n: &str| match n {
            "B" => Some("fromB".to_string()),
            "D" => Some("fromD".to_string()),
            _ => None,
        };
        // (A default that is not needed is not expanded: `${env.NOPE}` is never read.)
        let text = "name: '${env.D:-${env.NOPE}}'\nstorage: 'x/${env.A:-${env.B:-dev}}/y'\ntracking: {experiment: '${env.A:-${env.C:-dev}}'}\nstages: {}\n";
        let s = PipelineSpec::from_text(Path::new("p.yaml"), text, &[], &env).unwrap();
        assert_eq!(
            s.root.get("storage").unwrap().value,
            Value::Str("x/fromB/y".into())
        );
        assert_eq!(
            s.root
                .get("tracking")
                .unwrap()
                .get("experiment")
                .unwrap()
                .value,
            Value::Str("dev".into())
        );
        // A default of name characters reads as a variable's name; unset, it is named.
        let s = load("name: ${env.VERSION-dev}\nstages: {}\n", &[]);
        assert_eq!(
            s.diags[0].hint.as_deref(),
            Some("a default is written `${env.VERSION:-dev}`; the shell's `${X-d}` is not taken")
        );
        let s = load("name: ${env.HOME-/root}\nstages: {}\n", &[]);
        assert_eq!(
            s.diags[0].message,
            "`HOME-/root` in `${env.HOME-/root}` is not an environment variable's name"
        );
        assert_eq!(
            s.diags[0].hint.as_deref(),
            Some("a default is written `${env.HOME:-value}`; no other shell form is taken")
        );
    }

    #[test]
    fn env_inside_text_is_text_as_written() {
        let env = |n: &str| match n {
            "COMMIT" => Some("12e4567".to_string()),
            "VER" => Some("3.10".to_string()),
            _ => None,
        };
        let text = "name: t\nparams: {run: 'c=${env.COMMIT} v=${env.VER} id=${env.ID:-007}', n: '${env.VER}'}\nstages: {}\n";
        let s = PipelineSpec::from_text(Path::new("p.yaml"), text, &[], &env).unwrap();
        let params = s.root.get("params").unwrap();
        assert_eq!(
            params.get("run").unwrap().value,
            Value::Str("c=12e4567 v=3.10 id=007".into())
        );
        // A whole value keeps its type, as documented.
        assert_eq!(params.get("n").unwrap().value, Value::Float(3.1));
        // Through a param, and from the file itself, text is still as written.
        let text = "name: t\nparams: {commit: '${env.COMMIT}', v: 3.10, id: 007}\nstages:\n  a:\n    kind: shell\n    with: {run: 'c=${params.commit} v=${params.v} id=${params.id}'}\n";
        let sets = vec!["params.id=0042".to_string()];
        let s = PipelineSpec::from_text(Path::new("p.yaml"), text, &sets, &env).unwrap();
        let run = s.root.get("stages").unwrap().get("a").unwrap();
        assert_eq!(
            run.get("with").unwrap().get("run").unwrap().value,
            Value::Str("c=12e4567 v=3.10 id=0042".into())
        );
    }

    #[test]
    fn set_reaches_stage_values_and_creates_missing_keys() {
        let s = load(
            BASE,
            &["a.with.run=ls", "a.with.extra=1e-4", "params.seed=9"],
        );
        let with = s
            .root
            .get("stages")
            .unwrap()
            .get("a")
            .unwrap()
            .get("with")
            .unwrap();
        assert_eq!(with.get("run").unwrap().value, Value::Str("ls".into()));
        assert_eq!(with.get("extra").unwrap().value, Value::Float(1e-4));
        // Overrides apply before interpolation, so params set on the command line propagate.
        assert_eq!(with.get("n").unwrap().value, Value::Int(9));
    }

    #[test]
    fn set_fills_a_mapping_left_empty() {
        let env = |_: &str| None;
        let text = "name: t\nparams:\nstages:\n  a:\n    kind: shell\n    with: {run: 'echo ${params.seed}'}\n  b:\n    kind: shell\n    with:\n";
        let sets = vec!["params.seed=1".to_string(), "b.with.run=ls".to_string()];
        let s = PipelineSpec::from_text(Path::new("p.yaml"), text, &sets, &env).unwrap();
        assert!(s.diags.is_empty(), "{:?}", s.diags);
        let stage = |name: &str| s.root.get("stages").unwrap().get(name).unwrap();
        let run = |name: &str| {
            stage(name)
                .get("with")
                .unwrap()
                .get("run")
                .unwrap()
                .value
                .clone()
        };
        assert_eq!(run("a"), Value::Str("echo 1".into()));
        assert_eq!(run("b"), Value::Str("ls".into()));
    }

    #[test]
    fn defaults_nested_too_deep_are_refused_not_a_crash() {
        let env = |_: &str| None;
        let deep = format!("{}x{}", "${env.U:-".repeat(5000), "}".repeat(5000));
        let text = format!("name: t\nparams: {{v: '{deep}'}}\nstages: {{}}\n");
        let s = PipelineSpec::from_text(Path::new("p.yaml"), &text, &[], &env).unwrap();
        assert_eq!(s.diags.len(), 1);
        assert!(
            s.diags[0].message.contains("more than 16 deep") && s.diags[0].message.len() < 200,
            "{}",
            &s.diags[0].message[..200.min(s.diags[0].message.len())]
        );
        let ok = format!("{}x{}", "${env.U:-".repeat(10), "}".repeat(10));
        let text = format!("name: t\nparams: {{v: '{ok}'}}\nstages: {{}}\n");
        let s = PipelineSpec::from_text(Path::new("p.yaml"), &text, &[], &env).unwrap();
        assert!(s.diags.is_empty(), "{:?}", s.diags);
        assert_eq!(
            s.root.get("params").unwrap().get("v").unwrap().value,
            Value::Str("x".into())
        );
    }

    #[test]
    fn a_set_param_the_file_neither_defines_nor_uses_is_an_error() {
        let s = load(BASE, &["params.sede=9"]);
        assert_eq!(s.diags.len(), 1, "{:?}", s.diags);
        assert!(
            s.diags[0].message.contains("`params.sede`"),
            "{:?}",
            s.diags
        );
        assert_eq!(
            s.diags[0].hint.as_deref(),
            Some("did you mean `params.seed`?")
        );
        // A param the file uses but leaves to the command line is fine.
        let text =
            "name: t\nstages:\n  a:\n    kind: shell\n    with: {run: 'echo ${params.who.name}'}\n";
        for set in ["params.who.name=x", "params.who={name: x}"] {
            let sets = vec![set.to_string()];
            let s = PipelineSpec::from_text(Path::new("p.yaml"), text, &sets, &no_env).unwrap();
            assert!(s.diags.is_empty(), "{set}: {:?}", s.diags);
        }
        // An item of a list param is set by its index; one past its end is named as such.
        let text = "name: t\nparams: {sizes: [1, 2]}\nstages:\n  a:\n    kind: shell\n    with: {run: 'true'}\n";
        let sets = vec!["params.sizes.1=5".to_string()];
        let s = PipelineSpec::from_text(Path::new("p.yaml"), text, &sets, &no_env).unwrap();
        assert!(s.diags.is_empty(), "{:?}", s.diags);
        let sizes = s.root.get("params").unwrap().get("sizes").unwrap();
        assert!(matches!(&sizes.value, Value::Seq(v) if v[1].value == Value::Int(5)));
        let sets = vec!["params.sizes.2=5".to_string()];
        let s = PipelineSpec::from_text(Path::new("p.yaml"), text, &sets, &no_env).unwrap();
        assert_eq!(
            s.diags[0].message,
            "index 2 is out of range: `params.sizes` has 2 items"
        );
    }

    #[test]
    fn set_with_a_wrong_path_is_an_error() {
        let s = load(BASE, &["b.with.run=ls"]);
        assert!(
            s.diags[0].message.contains("names no stage"),
            "{:?}",
            s.diags
        );
        let s = load(BASE, &["a.kind.x=1"]);
        assert_eq!(
            s.diags[0].message,
            "`stages.a.kind` is a string, so it has no key `x`"
        );
        let s = load(BASE, &["noequals"]);
        assert!(s.diags[0].message.contains("path=value"));
    }
}
