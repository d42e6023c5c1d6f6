//! Diagnostics people can act on: what is wrong, where (file:line:col with the offending text
//! underlined), and a hint. All problems in a pipeline are collected before any is shown.

use std::fmt::Write as _;

/// Where text came from: the pipeline file, or one `--set` argument.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// An index into [`Sources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceId(pub usize);

/// A place in a source. Lines and columns count from 1; `len` is in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub source: SourceId,
    pub line: u32,
    pub col: u32,
    pub len: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Sources(Vec<Source>);

impl Sources {
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> SourceId {
        self.0.push(Source {
            name: name.into(),
            text: text.into(),
        });
        SourceId(self.0.len() - 1)
    }

    pub fn get(&self, id: SourceId) -> &Source {
        &self.0[id.0]
    }

    /// The text of source `id`, if there is one by that id (a default span's has none).
    pub fn text(&self, id: SourceId) -> Option<&str> {
        self.0.get(id.0).map(|s| s.text.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub message: String,
    pub span: Option<Span>,
    /// Shown under the underline.
    pub label: Option<String>,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, span: Span) -> Self {
        Diagnostic {
            message: message.into(),
            span: Some(span),
            label: None,
            hint: None,
        }
    }

    pub fn without_span(message: impl Into<String>) -> Self {
        Diagnostic {
            message: message.into(),
            span: None,
            label: None,
            hint: None,
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn hint_opt(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    /// Renders in the style of rustc: message, `--> file:line:col`, the source line with the
    /// offending text underlined, then the hint.
    pub fn render(&self, sources: &Sources) -> String {
        let mut out = format!("error: {}\n", self.message);
        let mut gutter = 1;
        if let Some(span) = self.span {
            let src = sources.get(span.source);
            let _ = writeln!(out, "  --> {}:{}:{}", src.name, span.line, span.col);
            if let Some(line_text) = src.text.lines().nth(span.line.saturating_sub(1) as usize) {
                let num = span.line.to_string();
                gutter = num.len();
                let pad = " ".repeat(num.len());
                let shown = line_text.replace('\t', " ");
                let _ = writeln!(out, "{pad} |");
                let _ = writeln!(out, "{num} | {shown}");
                // In display columns, not characters: a wide character (CJK, emoji) before
                // the span would otherwise put the caret left of what it marks.
                let columns = |chars: &mut dyn Iterator<Item = char>| -> usize {
                    chars
                        .map(|c| unicode_width::UnicodeWidthChar::width(c).unwrap_or(0))
                        .sum()
                };
                let before = span.col.saturating_sub(1) as usize;
                let indent = " ".repeat(columns(&mut shown.chars().take(before)));
                let width = columns(&mut shown.chars().skip(before).take(span.len as usize)).max(1);
                let label = self
                    .label
                    .as_deref()
                    .map(|l| format!(" {l}"))
                    .unwrap_or_default();
                let _ = writeln!(out, "{pad} | {indent}{}{label}", "^".repeat(width));
            }
        }
        if let Some(hint) = &self.hint {
            let _ = writeln!(out, "{} = hint: {hint}", " ".repeat(gutter));
        }
        out
    }
}

/// Renders every diagnostic followed by a count, as `validate` and `plan` print them.
pub fn render_all(diags: &[Diagnostic], sources: &Sources) -> String {
    let mut out = String::new();
    for d in diags {
        out.push_str(&d.render(sources));
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{} found; the pipeline is invalid",
        counted(diags.len(), "problem")
    );
    out
}

/// `1 run`, `2 runs`: a count and its noun, in the plural unless it is one.
pub fn counted<N: std::fmt::Display + PartialEq + From<u8>>(n: N, noun: &str) -> String {
    let plural = if n == N::from(1) { "" } else { "s" };
    format!("{n} {noun}{plural}")
}

/// The candidate nearest to `word`, if it is near enough to be a plausible typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3) && *d < c.len().max(word.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// "did you mean `x`?" or, when nothing is near, the list of what is allowed.
pub fn suggest(word: &str, candidates: &[&str]) -> Option<String> {
    if let Some(n) = nearest(word, candidates.iter().copied()) {
        Some(format!("did you mean `{n}`?"))
    } else if candidates.is_empty() {
        None
    } else {
        let list: Vec<String> = candidates.iter().map(|c| format!("`{c}`")).collect();
        Some(format!("expected one of {}", list.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos_but_not_strangers() {
        assert_eq!(
            nearest("tokeniser", ["tokenizer", "corpus"]),
            Some("tokenizer")
        );
        assert_eq!(nearest("lrr", ["lr", "steps"]), Some("lr"));
        assert_eq!(nearest("zzzzzz", ["lr", "steps"]), None);
    }

    #[test]
    fn render_points_at_the_value() {
        let mut s = Sources::default();
        let id = s.add("p.yaml", "a: 1\nbb: two\n");
        let d = Diagnostic::new(
            "bad",
            Span {
                source: id,
                line: 2,
                col: 5,
                len: 3,
            },
        )
        .label("here")
        .hint("fix it");
        assert_eq!(
            d.render(&s),
            "error: bad\n  --> p.yaml:2:5\n  |\n2 | bb: two\n  |     ^^^ here\n  = hint: fix it\n"
        );
    }
}
