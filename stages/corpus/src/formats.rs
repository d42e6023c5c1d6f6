//! Streaming readers for each source format. Each calls back once per raw record, so no
//! format ever holds more than one record (or one Parquet batch) in memory.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use arrow::array::{Array, StringArray};
use orchestrate_stage::StageError;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `%`-separated records, attribution lines (`-- Author`) at the end.
    Fortune,
    /// One record per line.
    Lines,
    /// Records separated by blank lines.
    Paragraphs,
    /// One JSON object per line.
    Jsonl,
    /// An existing Parquet file with a text column.
    Parquet,
}

/// Field (or column) names for JSON Lines and Parquet sources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fields {
    pub text: String,
    pub author: String,
    pub lang: String,
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            text: "text".into(),
            author: "author".into(),
            lang: "lang".into(),
        }
    }
}

pub struct RawRecord {
    pub text: String,
    pub author: Option<String>,
    pub lang: Option<String>,
}

pub enum RawItem {
    Record(RawRecord),
    /// A record whose bytes are not UTF-8, or a JSON line that does not parse.
    Invalid {
        line: usize,
        reason: String,
    },
    /// A record over the byte cap given to [`read`]: dropped as too long without ever being
    /// held whole, so a file with no separator costs the cap in memory, not its size.
    TooLong,
}

type Sink<'a> = &'a mut dyn FnMut(RawItem, u64) -> Result<(), StageError>;

/// Reads `path` in `format`, calling `sink(item, bytes_consumed_so_far)`. A text record (or
/// JSON line) of more than `max_record_bytes` raw bytes comes as [`RawItem::TooLong`].
/// Parquet rows come whole: the reader holds a batch of them in memory anyway.
pub fn read(
    path: &Path,
    format: Format,
    fields: &Fields,
    max_record_bytes: usize,
    sink: Sink<'_>,
) -> Result<(), StageError> {
    let open = || {
        File::open(path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))
    };
    let read = match format {
        Format::Parquet => read_parquet(open()?, path, fields, sink),
        text => read_text_format(
            BufReader::new(open()?),
            text,
            fields,
            max_record_bytes,
            sink,
        ),
    };
    // A read that fails midway (a disk, a network mount) names the file it was reading.
    read.map_err(|e| match e {
        StageError::Io { context, source } if context == READ_FAILED => StageError::Io {
            context: format!("cannot read {}", path.display()),
            source,
        },
        other => other,
    })
}

/// [`read`] for the formats that are text (all but Parquet), from any reader.
fn read_text_format<R: BufRead>(
    mut r: R,
    format: Format,
    fields: &Fields,
    cap: usize,
    sink: Sink<'_>,
) -> Result<(), StageError> {
    // A UTF-8 byte order mark (Windows editors write one) is no text: in a JSON line it
    // made the first record "not JSON", elsewhere it stayed in the first record's text.
    if r.fill_buf().is_ok_and(|b| b.starts_with(b"\xEF\xBB\xBF")) {
        r.consume(3);
    }
    match format {
        Format::Fortune => read_separated(r, is_fortune_separator, Attribution::Split, cap, sink),
        // Only fortunes end in attributions: a paragraph's last `-- ` line is its own
        // (dialogue, a signature), not an author to take out of the text.
        Format::Paragraphs => read_separated(r, is_blank_line, Attribution::Keep, cap, sink),
        Format::Lines => read_lines(r, cap, sink),
        Format::Jsonl => read_jsonl(r, fields, cap, sink),
        Format::Parquet => Err(StageError::Failed("Parquet is not a text format".into())),
    }
}

fn is_blank_line(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// The context of a read error in [`next_line`], which [`read`] replaces with the file's
/// name.
const READ_FAILED: &str = "cannot read source";

/// Whether a record's trailing attribution line (`-- Author`) is taken out as its author.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attribution {
    Split,
    Keep,
}

/// A line of `%` alone ends a fortune. Trailing whitespace is allowed (`% ` ends records in
/// fortunes-ru, invisibly): otherwise two quotes would merge, the first's attribution in the
/// text. A `%` followed by text (`%DCL-MEM-BAD` in `computers`) is text.
fn is_fortune_separator(line: &[u8]) -> bool {
    line.trim_ascii_end() == b"%"
}

/// One line read by [`next_line`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    /// The whole line is in the buffer.
    Whole,
    /// The line, with its line break, was longer than the cap: the buffer holds its first
    /// `cap` bytes.
    Cut,
}

/// Reads the next line into `buf`, without its line break, keeping at most `cap` bytes of
/// it: the rest is read and dropped, so a file without line breaks is never held whole.
/// `None` at the end of the input.
fn next_line<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    consumed: &mut u64,
    cap: usize,
) -> Result<Option<Line>, StageError> {
    buf.clear();
    let mut read_any = false;
    let mut line = Line::Whole;
    loop {
        let chunk = r.fill_buf().map_err(|e| StageError::io(READ_FAILED, e))?;
        if chunk.is_empty() {
            break;
        }
        read_any = true;
        let (take, ends) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = cap.saturating_sub(buf.len());
        if take > room {
            line = Line::Cut;
        }
        buf.extend_from_slice(&chunk[..take.min(room)]);
        r.consume(take);
        *consumed += take as u64;
        if ends {
            break;
        }
    }
    if !read_any {
        return Ok(None);
    }
    while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        buf.pop();
    }
    Ok(Some(line))
}

fn read_separated<R: BufRead>(
    mut r: R,
    is_separator: impl Fn(&[u8]) -> bool,
    attribution: Attribution,
    cap: usize,
    sink: Sink<'_>,
) -> Result<(), StageError> {
    let mut record: Vec<u8> = Vec::new();
    // Whether the record being read went over the cap: its lines are then skipped, not kept.
    let mut too_long = false;
    let mut line = Vec::new();
    let mut consumed = 0u64;
    let mut line_no = 0usize;
    let mut start = 1usize;
    // The first line of the record with a NUL byte, which makes it invalid (see `binary`),
    // whatever its length: a UTF-16 file is one record (its `%` lines are not `%` lines),
    // over the cap when it is a real one, and is called what it is, not `too_long`.
    let mut nul_line: Option<usize> = None;
    loop {
        let read = next_line(&mut r, &mut line, &mut consumed, cap.saturating_add(1))?;
        if read.is_some() {
            line_no += 1;
            if nul_line.is_none() && line.contains(&0) {
                nul_line = Some(line_no);
            }
        }
        if read.is_none() || (read == Some(Line::Whole) && is_separator(&line)) {
            if let Some(at) = nul_line {
                sink(nul_at(at), consumed)?;
            } else if too_long {
                sink(RawItem::TooLong, consumed)?;
            } else if !record.is_empty() {
                emit(
                    std::mem::take(&mut record),
                    start,
                    attribution,
                    consumed,
                    sink,
                )?;
            }
            record.clear();
            too_long = false;
            nul_line = None;
            start = line_no + 1;
            if read.is_none() {
                return Ok(());
            }
        } else if !too_long {
            if record.len() + line.len() + 1 > cap {
                too_long = true;
                record = Vec::new();
            } else {
                record.extend_from_slice(&line);
                record.push(b'\n');
            }
        }
    }
}

fn emit(
    bytes: Vec<u8>,
    line: usize,
    attribution: Attribution,
    consumed: u64,
    sink: Sink<'_>,
) -> Result<(), StageError> {
    match String::from_utf8(bytes) {
        Ok(text) => {
            // Before the author is taken from it: `Honor'\be de Balzac` is Honoré.
            let text = match without_controls(&text) {
                Cow::Borrowed(_) => text,
                Cow::Owned(clean) => clean,
            };
            let (text, author) = match attribution {
                Attribution::Split => split_attribution(&text),
                Attribution::Keep => (text, None),
            };
            sink(
                RawItem::Record(RawRecord {
                    text,
                    author,
                    lang: None,
                }),
                consumed,
            )
        }
        Err(e) => sink(not_utf8(e.as_bytes(), e.utf8_error(), line), consumed),
    }
}

/// A record with a NUL byte: text files have none, and UTF-16 (whose Cyrillic is also valid
/// UTF-8 byte for byte, `а` being `30 04`) or a binary file has them everywhere. Without
/// this, a UTF-16 file would pass as one long record of garbage.
fn binary(bytes: &[u8], line: usize) -> Option<RawItem> {
    let at = bytes.iter().position(|&b| b == 0)?;
    Some(nul_at(line + newlines(&bytes[..at])))
}

fn nul_at(line: usize) -> RawItem {
    RawItem::Invalid {
        line,
        reason: NUL_REASON.into(),
    }
}

/// Why a record with a NUL byte is not text.
const NUL_REASON: &str = "a NUL byte (UTF-16, or not a text file?)";

/// Invalid UTF-8 in a record that starts at `line`: the line and column (in bytes) of the
/// first bad byte.
fn not_utf8(bytes: &[u8], e: std::str::Utf8Error, line: usize) -> RawItem {
    let good = &bytes[..e.valid_up_to()];
    let column = good.len() - good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
    RawItem::Invalid {
        line: line + newlines(good),
        reason: format!(
            "invalid UTF-8 at byte {column} of the line (is the file in another encoding?)"
        ),
    }
}

fn newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

fn read_lines<R: BufRead>(mut r: R, cap: usize, sink: Sink<'_>) -> Result<(), StageError> {
    let mut line = Vec::new();
    let mut consumed = 0;
    let mut n = 0;
    // `cap` bytes of text, and its line break.
    while let Some(read) = next_line(&mut r, &mut line, &mut consumed, cap.saturating_add(1))? {
        n += 1;
        if let Some(item) = binary(&line, n) {
            sink(item, consumed)?;
        } else if read == Line::Cut {
            sink(RawItem::TooLong, consumed)?;
        } else if !is_blank_line(&line) {
            let bytes = std::mem::take(&mut line);
            match String::from_utf8(bytes) {
                Ok(text) => sink(
                    RawItem::Record(RawRecord {
                        text,
                        author: None,
                        lang: None,
                    }),
                    consumed,
                )?,
                Err(e) => sink(not_utf8(e.as_bytes(), e.utf8_error(), n), consumed)?,
            }
        }
    }
    Ok(())
}

fn read_jsonl<R: BufRead>(
    mut r: R,
    fields: &Fields,
    cap: usize,
    sink: Sink<'_>,
) -> Result<(), StageError> {
    let mut line = Vec::new();
    let mut consumed = 0;
    let mut n = 0;
    // `cap` bytes of text, and its line break.
    while let Some(read) = next_line(&mut r, &mut line, &mut consumed, cap.saturating_add(1))? {
        n += 1;
        if read == Line::Cut {
            sink(RawItem::TooLong, consumed)?;
            continue;
        }
        if is_blank_line(&line) {
            continue;
        }
        let item = match serde_json::from_slice::<serde_json::Value>(&line) {
            Err(e) => RawItem::Invalid {
                line: n,
                reason: format!("not JSON: {e}"),
            },
            Ok(v) => match v.get(&fields.text).and_then(|t| t.as_str()) {
                None => RawItem::Invalid {
                    line: n,
                    reason: format!("no string field `{}`", fields.text),
                },
                Some(text) => RawItem::Record(RawRecord {
                    text: text.to_string(),
                    author: v
                        .get(&fields.author)
                        .and_then(|a| a.as_str())
                        .map(str::to_string),
                    lang: v
                        .get(&fields.lang)
                        .and_then(|a| a.as_str())
                        .map(str::to_string),
                }),
            },
        };
        sink(item, consumed)?;
    }
    Ok(())
}

fn read_parquet(
    file: File,
    path: &Path,
    fields: &Fields,
    sink: Sink<'_>,
) -> Result<(), StageError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let bad = |e: &dyn std::fmt::Display| {
        StageError::Failed(format!("cannot read Parquet file {}: {e}", path.display()))
    };
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?;
    let rows = builder.metadata().file_metadata().num_rows().max(1) as u64;
    let reader = builder.with_batch_size(8192).build().map_err(|e| bad(&e))?;
    let mut seen = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        // As text, whatever string type the writer chose: `large_string` (pandas, Hugging
        // Face datasets), `string_view`, a dictionary (a pandas categorical). A column that
        // exists but cannot be text is an error naming it, not a column passed over.
        let column = |name: &str| -> Result<Option<StringArray>, StageError> {
            let Some(c) = batch.column_by_name(name) else {
                return Ok(None);
            };
            use arrow::datatypes::DataType;
            // Strings only: a number or a date would cast to text, and a `text` field
            // pointed at an id column would give a corpus of ids.
            let stringy = |t: &DataType| {
                matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
            };
            let is_text = match c.data_type() {
                DataType::Dictionary(_, values) => stringy(values),
                t => stringy(t),
            };
            let text = is_text
                .then(|| arrow::compute::cast(c, &DataType::Utf8).ok())
                .flatten()
                .and_then(|t| t.as_any().downcast_ref::<StringArray>().cloned());
            match text {
                Some(t) => Ok(Some(t)),
                None => Err(StageError::Failed(format!(
                    "Parquet file {}: column `{name}` is {}, not text",
                    path.display(),
                    c.data_type()
                ))),
            }
        };
        let text = column(&fields.text)?.ok_or_else(|| {
            StageError::Failed(format!(
                "Parquet file {} has no column `{}` (give the text column's name in `fields: {{text: ...}}`)",
                path.display(),
                fields.text
            ))
        })?;
        let author = column(&fields.author)?;
        let lang = column(&fields.lang)?;
        for i in 0..batch.num_rows() {
            seen += 1;
            if text.is_null(i) {
                // Counted with the empty records, as an empty line would be.
                sink(
                    RawItem::Record(RawRecord {
                        text: String::new(),
                        author: None,
                        lang: None,
                    }),
                    total * seen / rows,
                )?;
                continue;
            }
            let get = |a: &Option<StringArray>| {
                a.as_ref()
                    .filter(|a| !a.is_null(i))
                    .map(|a| a.value(i).to_string())
            };
            let rec = RawRecord {
                text: text.value(i).to_string(),
                author: get(&author),
                lang: get(&lang),
            };
            sink(RawItem::Record(rec), total * seen / rows)?;
        }
    }
    Ok(())
}

/// Splits a fortune into its text and the author named by a trailing attribution line
/// (`\t\t-- Mark Twain, "Pudd'nhead Wilson"`). The attribution may wrap onto the lines below,
/// but not past a blank line: a dash line with a paragraph below it is the text's own
/// ("-- No?", blank, "GOOD!"), as is a heading's byline ("\t-- by Homer", blank, summary).
/// One exception: an editor's note set off below an indented attribution by a blank line
/// ("\t\t-- Fred Allen", blank, "[Also attributed to S. Clay Wilson.  Ed.]") stays in the text,
/// after the quote.
pub fn split_attribution(record: &str) -> (String, Option<String>) {
    let lines: Vec<&str> = record.lines().collect();
    let Some(last) = lines.iter().rposition(|l| !is_blank(l)) else {
        return (String::new(), None);
    };
    if let Some((i, rest, indented)) = attribution_line(&lines, last) {
        // An editor's note right below the attribution ("[Also attributed to Johnny
        // Carson.  Ed.]") ends its wrap and stays in the text, as one set off by a blank
        // line does (below).
        // (Not one indented past the dash line: that is the attribution's own wrapped
        // source, "\t\t   [comp.os.linux.announce]".)
        let wrap_end = (i + 1..=last)
            .find(|&k| {
                lines[k].trim_start().starts_with('[') && indent(lines[k]) <= indent(lines[i])
            })
            .unwrap_or(last + 1);
        let author = attribution_author(rest, &lines[i + 1..wrap_end]);
        // A dash line at the margin that names nobody is the text's own last line (a
        // list's "-- $40,000."), kept.
        if author.is_none() && !indented {
            return (record.to_string(), None);
        }
        let mut text = lines[..i].join("\n");
        if wrap_end <= last {
            text.push_str("\n\n");
            text.push_str(&lines[wrap_end..=last].join("\n"));
        }
        return (text, author);
    }
    // An editor's note: a final paragraph in brackets, below a blank line, with text above.
    let note = lines[..last]
        .iter()
        .rposition(|l| is_blank(l))
        .filter(|&b| {
            lines[b + 1].trim_start().starts_with(['[', '('])
                && lines[..b].iter().any(|l| !is_blank(l))
        });
    if let Some(b) = note {
        let end = lines[..b]
            .iter()
            .rposition(|l| !is_blank(l))
            .expect("text above the note");
        // Only an indented dash line: one at the margin, above a bracketed paragraph, is the
        // text's own ("NOTICE:", blank, "-- THE ELEVATORS WILL BE OUT OF ORDER TODAY --",
        // blank, "(The nearest working elevator is in the building across the street.)").
        if let Some((i, rest, true)) = attribution_line(&lines, end) {
            let mut text = lines[..i].join("\n");
            text.push_str("\n\n");
            text.push_str(&lines[b + 1..=last].join("\n"));
            return (text, attribution_author(rest, &lines[i + 1..=end]));
        }
    }
    (record.to_string(), None)
}

/// A line's indentation in columns, tabs to the next multiple of 8.
fn indent(line: &str) -> usize {
    line.chars()
        .take_while(|c| c.is_whitespace())
        .fold(
            0,
            |col, c| if c == '\t' { col / 8 * 8 + 8 } else { col + 1 },
        )
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

/// The attribution line of a fortune whose last line is `lines[end]`: its index, what follows
/// the dash, and whether it is indented. It is the last dash line of the last three, none
/// blank: a fortune may quote a dash line of its own just above its attribution ("-- he hates
/// all creative people equally." then "-- Robert Heinlein"), and a dash line above a blank
/// one starts the text's own paragraph. The first line is never one.
///
/// Further up, to the seventh line from the end, only an indented dash line whose wrap lies
/// deeper than it ("\t\t-- Ford Frick, National League President, reacting to a" above three
/// "\t\t   ..." lines; 7 records in Debian's files): lines at its own depth below it are
/// the text's (a quoted list of "\t\t-- " sources), and so are lines at the margin.
fn attribution_line<'a>(lines: &[&'a str], end: usize) -> Option<(usize, &'a str, bool)> {
    const NEAR: usize = 3;
    const WRAPPED: usize = 7;
    for i in (end.saturating_sub(WRAPPED - 1)..=end).rev() {
        let line = lines[i];
        if is_blank(line) {
            return None;
        }
        let t = line.trim_start();
        let indented = t.len() < line.len();
        // An em dash at the margin opens a line of dialogue ("Он сказал:\n— Я вернусь.").
        let rest = t
            .strip_prefix("--")
            .or_else(|| t.strip_prefix(['—', '―']).filter(|_| indented));
        if let Some(rest) = rest {
            if end - i >= NEAR && !wraps_deeper(lines, i, end) {
                return None;
            }
            // A dash line at the margin right below another is a list's last item
            // ("-- a platitude" under "-- another"), not an attribution.
            let listed = !indented && i > 0 && lines[i - 1].starts_with("--");
            return (i > 0 && !listed).then_some((i, rest, indented));
        }
    }
    None
}

/// Whether every line below the indented dash line `lines[i]`, to `lines[end]`, is indented
/// deeper than it, up to an editor's note (a line opening with `[` no deeper than the dash),
/// which ends the wrap as in [`split_attribution`].
fn wraps_deeper(lines: &[&str], i: usize, end: usize) -> bool {
    let depth = indent(lines[i]);
    depth > 0
        && lines[i + 1..=end]
            .iter()
            .take_while(|l| !(l.trim_start().starts_with('[') && indent(l) <= depth))
            .all(|l| indent(l) > depth)
}

/// The author named by an attribution line's `rest` and the lines it wraps onto; the dash
/// line's own name where the wrapped lines make too long a one ("-- Michael Collins" above
/// "   Former astronaut, and ...").
fn attribution_author(rest: &str, wrapped: &[&str]) -> Option<String> {
    let attribution: Vec<&str> = std::iter::once(rest)
        .chain(wrapped.iter().copied())
        .collect();
    parse_author(&attribution.join(" ")).or_else(|| parse_author(rest).filter(|n| name_like(n)))
}

/// Whether every word is capitalised, an initial, or a particle of a name (`de`, `van`):
/// a dash line's own words as a name only where they look like one ("Michael Collins",
/// not "Branden Robinson in" or "from the IEEE Standard").
fn name_like(name: &str) -> bool {
    const PARTICLES: [&str; 12] = [
        "de", "da", "di", "du", "del", "der", "van", "von", "la", "le", "y", "bin",
    ];
    name.split_whitespace()
        .all(|w| w.chars().next().is_some_and(|c| !c.is_lowercase()) || PARTICLES.contains(&w))
}

/// The name in an attribution: up to the first comma, parenthesis or quote, whitespace
/// collapsed. `--Mark Twain` and `-- Mark Twain` give one name; spellings are not merged.
pub fn parse_author(attribution: &str) -> Option<String> {
    let s = attribution.trim_start_matches(['-', '—', '―', ' ', '\t']);
    let end = s
        .find([',', '(', '"', '«', '[', ';', '“', '/'])
        .unwrap_or(s.len());
    let mut words: Vec<&str> = s[..end].split_whitespace().collect();
    // Cut at a title's quote after small words, those words name nobody: `Oscar Wilde in
    // "…"` is Oscar Wilde; `из писем в "Спид-Инфо"` ("from letters to"), `from "The
    // Hobbit"`, `журнал "Крокодил"` name nobody at all.
    let small = |w: &&str| w.chars().next().is_some_and(char::is_lowercase);
    if s[end..].starts_with(['"', '«', '“']) && words.last().is_some_and(small) {
        while words.last().is_some_and(small) {
            words.pop();
        }
        // Nor does an article left alone: `The concluding paragraph of "Constitutional Law"`.
        let article = matches!(words[..], ["The" | "A" | "An"]);
        if words.is_empty() || article || !name_like(&words.join(" ")) {
            return None;
        }
    }
    let name = words.join(" ");
    let name = name
        .trim_end_matches(['.', ':', ' '])
        .nfc()
        .collect::<String>();
    let letters = name.chars().filter(|c| c.is_alphabetic()).count();
    (letters >= 2 && name.chars().count() <= 60).then_some(name)
}

/// `text` without control characters other than tab and line breaks. A backspace is the
/// overstrike of a teletype (`_\bI` underlines an I, `'\bi` accents it, and the BSD fortune
/// files have dozens): the character after it stands, the one before it goes. Any other
/// control (a bell, an escape, C1 codes) is dropped: a model has nothing to learn from it.
pub(crate) fn without_controls(text: &str) -> Cow<'_, str> {
    let stray = |c: char| c.is_control() && !matches!(c, '\t' | '\n' | '\r');
    if !has_stray_control(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{8}' => {
                let before = out.chars().last().filter(|&b| b != '\n');
                let after = chars.peek().copied();
                match (before, after) {
                    (Some(b), Some(a)) => match (accent(b), accent(a)) {
                        // `'\be`, `'\bi`: an accent struck over a letter is that letter
                        // accented (NFC composes them later: é, í).
                        (Some(mark), None) if a.is_alphabetic() => {
                            out.pop();
                            out.push(a);
                            out.push(mark);
                            chars.next();
                        }
                        // `e\b'`: the same, struck the other way round.
                        (None, Some(mark)) if b.is_alphabetic() => {
                            out.push(mark);
                            chars.next();
                        }
                        // `_\bI` (underline), `I\bI` (bold): the later character stands.
                        _ => {
                            out.pop();
                        }
                    },
                    (Some(_), None) => {
                        out.pop();
                    }
                    (None, _) => {}
                }
            }
            // Vertical tab, form feed, next line: breaks, which whitespace clean-up folds.
            '\u{b}' | '\u{c}' | '\u{85}' => out.push(' '),
            c if stray(c) => {}
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Whether `text` holds a control character other than tab and line breaks, looked for in
/// its bytes: C0 and DEL are single bytes in UTF-8, C1 (U+0080 to U+009F) the pairs C2 80
/// to C2 9F. Every record is looked at twice (as read, and as normalised); decoding its
/// characters for this took a tenth of ingest's time.
fn has_stray_control(text: &str) -> bool {
    let b = text.as_bytes();
    // (C2 also leads `«`, `»` and `é`: looked at closely.)
    let suspect =
        |x: u8| (x < 0x20 && !matches!(x, b'\t' | b'\n' | b'\r')) || x == 0x7F || x == 0xC2;
    any_in_chunks(b, suspect, |i| {
        b[i] != 0xC2 || matches!(b.get(i + 1), Some(0x80..=0x9F))
    })
}

/// Bytes are scanned a chunk at a time: a fold without branches over 64 bytes is vectorised,
/// and only a chunk holding a suspect byte is looked at byte by byte.
const CHUNK: usize = 64;

/// Whether some byte of `b` is `suspect` and `confirm`ed at its index.
fn any_in_chunks(b: &[u8], suspect: impl Fn(u8) -> bool, confirm: impl Fn(usize) -> bool) -> bool {
    b.chunks(CHUNK).enumerate().any(|(k, chunk)| {
        chunk.iter().fold(false, |any, &x| any | suspect(x))
            && chunk
                .iter()
                .enumerate()
                .any(|(j, &x)| suspect(x) && confirm(k * CHUNK + j))
    })
}

/// The combining mark a typewriter accent struck over a letter stands for.
fn accent(c: char) -> Option<char> {
    match c {
        '\'' => Some('\u{301}'),
        '`' => Some('\u{300}'),
        '^' => Some('\u{302}'),
        '"' => Some('\u{308}'),
        '~' => Some('\u{303}'),
        ',' => Some('\u{327}'),
        _ => None,
    }
}

/// An author's name given as a name (a JSON field, a Parquet column): whitespace collapsed,
/// NFC; None without two letters.
pub fn clean_name(name: &str) -> Option<String> {
    let name = without_controls(name);
    let name: String = name.split_whitespace().collect::<Vec<_>>().join(" ");
    let name: String = name.nfc().collect();
    (name.chars().filter(|c| c.is_alphabetic()).count() >= 2).then_some(name)
}

/// Whether `text` is NFC by its bytes alone: every character ASCII, Latin (U+0080 to U+02FF)
/// or a Cyrillic letter (U+0400 to U+047F), each NFC whatever stands beside it (none is a
/// combining mark, none composes with another; see the test). English and Russian text is
/// such, and this spares it the quick check's table lookups per character.
fn plainly_nfc(text: &str) -> bool {
    // In valid UTF-8, with no lead byte of a longer sequence (E0 on) and no D2, every byte
    // below C2 is ASCII or the second byte of a pair led by C2..CB, D0 or D1. (U+0480..U+0482,
    // led by D2, are left to the quick check.) A fold without branches, so vectorised.
    let plain = |x: u8| x < 0xC2 || (0xC2..=0xCB).contains(&x) || x == 0xD0 || x == 0xD1;
    text.as_bytes()
        .chunks(CHUNK)
        .all(|chunk| chunk.iter().fold(true, |all, &x| all & plain(x)))
}

/// NFC, without copying in the common case: ASCII, and most other text, is NFC already, and
/// the quick check is several times cheaper than normalising.
pub fn nfc(text: &str) -> Cow<'_, str> {
    if plainly_nfc(text) || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.nfc().collect())
    }
}

/// NFC; whitespace within a paragraph collapsed to single spaces (fortune files wrap lines at
/// 72 columns); paragraphs kept apart by one newline; control characters resolved or
/// dropped (see [`without_controls`]).
pub fn normalize_text(text: &str) -> String {
    let text = without_controls(text);
    let nfc = nfc(&text);
    let mut out = String::with_capacity(nfc.len());
    if has_wide_space(&nfc) {
        fold_by_chars(&nfc, &mut out);
    } else {
        fold_ascii_spaces(&nfc, &mut out);
    }
    out
}

/// Where `normalize_text` puts the next word: after one space within a paragraph, after a
/// newline where a blank line came before it.
#[derive(Default)]
struct Paragraphs {
    open: bool,
    pending_break: bool,
    line_has_word: bool,
}

impl Paragraphs {
    fn word(&mut self, out: &mut String, word: &str) {
        if self.line_has_word {
            out.push(' ');
        } else {
            if self.open {
                out.push(if self.pending_break { '\n' } else { ' ' });
            }
            self.pending_break = false;
            self.open = true;
            self.line_has_word = true;
        }
        out.push_str(word);
    }

    /// A line ended: one without a word ends the paragraph.
    fn line_end(&mut self) {
        self.pending_break |= !self.line_has_word;
        self.line_has_word = false;
    }
}

/// `normalize_text`'s folding: words joined by one space within a paragraph, paragraphs
/// (apart by a blank line) by one newline, whatever Unicode calls whitespace.
fn fold_by_chars(text: &str, out: &mut String) {
    let mut paragraphs = Paragraphs::default();
    for line in text.lines() {
        for w in line.split_whitespace() {
            paragraphs.word(out, w);
        }
        paragraphs.line_end();
    }
}

/// Whether `text` has whitespace beyond ASCII's (no-break space, the U+2000 spaces, U+3000):
/// the bytes that lead them are looked for a chunk at a time, and each found is decoded.
fn has_wide_space(text: &str) -> bool {
    let lead = |x: u8| x == 0xC2 || x == 0xE1 || x == 0xE2 || x == 0xE3;
    any_in_chunks(text.as_bytes(), lead, |i| {
        text[i..].chars().next().is_some_and(char::is_whitespace)
    })
}

/// `fold_by_chars` for text whose only whitespace is ASCII, by bytes: words are the runs of
/// anything else. The same result (see the test), without decoding every character, which
/// took a tenth of ingest's time.
fn fold_ascii_spaces(text: &str, out: &mut String) {
    let b = text.as_bytes();
    let space = |x: u8| matches!(x, b' ' | b'\t' | b'\r' | 0x0B | 0x0C);
    let mut paragraphs = Paragraphs::default();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => {
                paragraphs.line_end();
                i += 1;
            }
            x if space(x) => i += 1,
            _ => {
                let start = i;
                while i < b.len() && b[i] != b'\n' && !space(b[i]) {
                    i += 1;
                }
                // Whitespace bytes are ASCII: `start` and `i` fall between characters.
                paragraphs.word(out, &text[start..i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_by_bytes_is_folding_by_characters() {
        // Every string of up to 6 pieces from an alphabet of words and whitespace.
        let pieces = [
            "a", "ж", "—", " ", "  ", "\t", "\n", "\r\n", "\r", "\u{b}", "\u{c}", "\n\n", "é",
        ];
        let mut todo = vec![String::new()];
        let mut checked = 0;
        while let Some(s) = todo.pop() {
            assert!(!has_wide_space(&s), "{s:?}");
            let mut fast = String::new();
            fold_ascii_spaces(&s, &mut fast);
            let mut slow = String::new();
            fold_by_chars(&s, &mut slow);
            assert_eq!(fast, slow, "{s:?}");
            checked += 1;
            if s.chars().count() < 6 {
                todo.extend(pieces.iter().map(|p| format!("{s}{p}")));
            }
        }
        assert!(checked > 100_000, "{checked}");
        for wide in [
            "a\u{a0}b",
            "\u{3000}",
            "x\u{2009}y",
            "\u{85}",
            "\u{1680}",
            "\u{2028}",
        ] {
            assert!(has_wide_space(wide), "{wide:?}");
        }
        for narrow in ["«»", "é—“”", "\u{e000}", "中"] {
            assert!(!has_wide_space(narrow), "{narrow:?}");
        }
        // Past a chunk's end too.
        let long = format!("{}\u{a0}", "x".repeat(63));
        assert!(has_wide_space(&long));
        assert_eq!(
            normalize_text(&format!("{} \u{a0} b", "x".repeat(70))),
            format!("{} b", "x".repeat(70))
        );
    }

    #[test]
    fn the_byte_checks_agree_with_the_character_tables() {
        // Each character `plainly_nfc` passes is NFC alone and in any company (quick check
        // Yes, not Maybe: it composes with nothing before it).
        let plain = (0x80..0x300u32)
            .chain(0x400..0x480)
            .filter_map(char::from_u32);
        for c in plain {
            let s = c.to_string();
            assert!(plainly_nfc(&s), "{c:?}");
            assert_eq!(is_nfc_quick(std::iter::once(c)), IsNormalized::Yes, "{c:?}");
        }
        // And no other character passes.
        for c in (0..0x11000u32).filter_map(char::from_u32) {
            let plain = (c as u32) < 0x300 || (0x400..0x480).contains(&(c as u32));
            assert_eq!(plainly_nfc(&format!("a{c}ж")), plain, "{c:?}");
        }
        for s in ["e\u{301}", "\u{483}", "й", "\u{300}", "中", "Ǆ\u{308}"] {
            assert_eq!(
                plainly_nfc(s),
                s.chars()
                    .all(|c| (c as u32) < 0x300 || (0x400..0x480).contains(&(c as u32))),
                "{s:?}"
            );
        }
        assert!(!plainly_nfc("e\u{301}"));
        // The control check by bytes is char::is_control less tab and line breaks.
        for c in (0..0x3000u32).filter_map(char::from_u32) {
            let s = format!("a{c}b");
            let want = c.is_control() && !matches!(c, '\t' | '\n' | '\r');
            assert_eq!(has_stray_control(&s), want, "{c:?}");
        }
    }

    #[test]
    fn attribution_gives_the_author_and_leaves_the_text() {
        let (t, a) =
            split_attribution("A quote\nthat wraps.\n\t\t-- Mark Twain, \"Pudd'nhead Wilson\"\n");
        assert_eq!(t, "A quote\nthat wraps.");
        assert_eq!(a.as_deref(), Some("Mark Twain"));
        let (_, a) =
            split_attribution("Безопасным бывает секс, но не любовь.\n\t\t-- Евгений Кащеев\n");
        assert_eq!(a.as_deref(), Some("Евгений Кащеев"));
        assert_eq!(parse_author("--Mark Twain"), parse_author("-- Mark  Twain"));
        assert_ne!(parse_author("-- M. Twain"), parse_author("-- Mark Twain"));
        // A dash line of the quote's own just above the attribution stays in the text.
        let (t, a) = split_attribution(
            "Heinlein on critics:\n-- he hates all creative people equally.\n\t\t-- Robert Heinlein\n",
        );
        assert_eq!(
            t,
            "Heinlein on critics:\n-- he hates all creative people equally."
        );
        assert_eq!(a.as_deref(), Some("Robert Heinlein"));
        let (t, a) = split_attribution("No author here.\n");
        assert_eq!((t.as_str(), a), ("No author here.\n", None));
        // A dash line at the margin naming nobody is the text's own last line (politics).
        let list = "Rogers listed:\n\"Bad debt, US Government\n-- $40,000.\n";
        let (t, a) = split_attribution(list);
        assert_eq!((t.as_str(), a), (list, None));
        // Words cut short by a title's quote name nobody (ru/f, 39 records).
        let (t, a) = split_attribution("Шутка.\n\t\t-- из писем в \"Спид-Инфо\"\n");
        assert_eq!((t.as_str(), a), ("Шутка.", None));
        assert_eq!(parse_author("-- from \"The Hobbit\""), None);
        assert_eq!(
            parse_author("-- The concluding paragraph of \"Constitutional Law\""),
            None
        );
        assert_eq!(
            parse_author("-- Oscar Wilde in \"The Critic as Artist\"").as_deref(),
            Some("Oscar Wilde")
        );
        assert_eq!(
            parse_author("-- Ф. М. Достоевский «Бесы»").as_deref(),
            Some("Ф. М. Достоевский")
        );
    }

    #[test]
    fn attribution_stops_at_a_blank_line() {
        // A dash line with a paragraph below it is the joke's own, not its attribution.
        let law = "Know how to save 5 drowning lawyers?\n\n-- No?\n\nGOOD!\n";
        assert_eq!(split_attribution(law), (law.to_string(), None));
        let lite =
            "The Odyssey LITE(tm)\n\t-- by Homer\n\n\tAfter working late, a warrior gets lost.\n";
        assert_eq!(split_attribution(lite), (lite.to_string(), None));
        // So is one at the margin above a note in brackets.
        let notice = "NOTICE:\n\n-- THE ELEVATORS WILL BE OUT OF ORDER TODAY --\n\n(The nearest working elevator is across the street.)\n";
        assert_eq!(split_attribution(notice), (notice.to_string(), None));
        // An editor's note below an indented attribution stays in the text, however long.
        let (t, a) = split_attribution(
            "A full belly makes a dull brain.\n\t\t-- Ben Franklin\n\n\t\t[and the local candy\n\t\t machine man.  Ed]\n",
        );
        assert_eq!(
            t,
            "A full belly makes a dull brain.\n\n\t\t[and the local candy\n\t\t machine man.  Ed]"
        );
        assert_eq!(a.as_deref(), Some("Ben Franklin"));
        // A blank line between the text and its attribution is fine.
        let (t, a) = split_attribution("Quote.\n\n\t\t-- Mark Twain\n\n");
        assert_eq!((t.as_str(), a.as_deref()), ("Quote.\n", Some("Mark Twain")));
        // A note right below the attribution ends its wrap and stays in the text.
        let (t, a) = split_attribution(
            "Live in a way that the preacher need not lie at your funeral.\n\t\t-- Will Rogers\n[Also attributed to Johnny Carson.  Ed.]\n",
        );
        assert_eq!(
            t,
            "Live in a way that the preacher need not lie at your funeral.\n\n[Also attributed to Johnny Carson.  Ed.]"
        );
        assert_eq!(a.as_deref(), Some("Will Rogers"));
        // A wrap that makes too long a name leaves the dash line's own.
        let (_, a) = split_attribution(
            "in Apollo 11.\"\n-- Michael Collins\n   Former astronaut and past Director of the National Air and Space Museum\n",
        );
        assert_eq!(a.as_deref(), Some("Michael Collins"));
        // Not a dash line's words that do not look like a name.
        let (_, a) = split_attribution(
            "Quote.\n-- Branden Robinson in\n   a long thread on the debian-devel mailing list about this\n",
        );
        assert_eq!(a, None);
        // A bracketed line indented past the dash line is the attribution's own source.
        let (t, a) =
            split_attribution("Quote.\n\t\t-- Lars Wirzenius\n\t\t   [comp.os.linux.announce]\n");
        assert_eq!(
            (t.as_str(), a.as_deref()),
            ("Quote.", Some("Lars Wirzenius"))
        );
        // An attribution wrapping over more lines than two, each deeper than its dash line.
        let (t, a) = split_attribution(
            "There's no justice in this world.\n\t\t-- Frank Costello, on the prosecution of\n\t\t   \"Lucky\" Luciano by New York district attorney\n\t\t   Thomas Dewey after Luciano had saved Dewey\n\t\t   from assassination by Dutch Schultz\n",
        );
        assert_eq!(
            (t.as_str(), a.as_deref()),
            ("There's no justice in this world.", Some("Frank Costello"))
        );
        // ... and up to an editor's note, which stays in the text.
        let (t, a) = split_attribution(
            "That side was made for you and me.\n\t\t-- Woody Guthrie, \"This Land\"\n\t[If you ever wondered why Arlo was\n\t so anti-establishment, the answer\n\t is in the other verses]\n",
        );
        assert_eq!(
            (t.as_str(), a.as_deref()),
            ("That side was made for you and me.\n\n\t[If you ever wondered why Arlo was\n\t so anti-establishment, the answer\n\t is in the other verses]", Some("Woody Guthrie"))
        );
        // Lines at the dash line's own depth below it are the text's: a list of sources.
        let sources = "Stealing is easier.\n\t\t-- R. Emerson\n\t\t-- Quoted from a fortune cookie program\n\t\t(whose author claims it is)\n\t\t[to which I reply, \"You think it's\n\t\teasy for me?\"  Ed.]\n";
        assert_eq!(split_attribution(sources), (sources.to_string(), None));
        // The last item of a list of dash lines at the margin is the list's, not an author.
        let list = "Platitudes:\n-- Look before you leap.\n-- He who hesitates is lost.\n";
        assert_eq!(split_attribution(list), (list.to_string(), None));
        // An em dash at the margin opens dialogue; indented, it attributes.
        let dialogue = "Он сказал:\n— Я вернусь.\n";
        assert_eq!(split_attribution(dialogue), (dialogue.to_string(), None));
        let (t, a) = split_attribution("Время лечит.\n\t\t— Евгений Кащеев\n");
        assert_eq!(
            (t.as_str(), a.as_deref()),
            ("Время лечит.", Some("Евгений Кащеев"))
        );
    }

    #[test]
    fn percent_with_trailing_whitespace_separates_fortunes() {
        // `% ` and `%  ` as in fortunes-ru's `time` and `love`; `%TEXT` is text.
        let data = "Дети видят мир.\n\t\t-- Н.Векшин\n% \nСекунды без любимого.\n\t\t-- А.М.Кашпировский\n%  \t\nDCL says\n%DCL-MEM-BAD\n%\n";
        let mut got = Vec::new();
        read_separated(
            data.as_bytes(),
            is_fortune_separator,
            Attribution::Split,
            1 << 20,
            &mut |item, _| {
                if let RawItem::Record(r) = item {
                    got.push((r.text.trim().to_string(), r.author));
                }
                Ok(())
            },
        )
        .unwrap();
        let author = |a: &str| Some(a.to_string());
        assert_eq!(
            got,
            [
                ("Дети видят мир.".to_string(), author("Н.Векшин")),
                (
                    "Секунды без любимого.".to_string(),
                    author("А.М.Кашпировский")
                ),
                ("DCL says\n%DCL-MEM-BAD".to_string(), None),
            ]
        );
    }

    #[test]
    fn whitespace_is_cleaned_and_paragraphs_kept() {
        assert_eq!(normalize_text("  a  b\n c\n\n\n d\t e \n"), "a b c\nd e");
    }

    #[test]
    fn text_is_nfc() {
        // "é" as e + combining acute becomes the single code point.
        assert_eq!(normalize_text("cafe\u{301}"), "caf\u{e9}");
        assert!(matches!(nfc("plain ascii"), Cow::Borrowed(_)));
        assert!(matches!(nfc("уже нормализовано"), Cow::Borrowed(_)));
    }

    #[test]
    fn fortune_records_split_on_percent_lines_with_line_numbers() {
        let data = b"one\n  -- Al\n%\ntwo\n%\n\xff\xfe\n%\nthree\n";
        let mut got = Vec::new();
        read_separated(
            &data[..],
            is_fortune_separator,
            Attribution::Split,
            1 << 20,
            &mut |item, _| {
                got.push(match item {
                    RawItem::Record(r) => format!("{}:{:?}", r.text.trim(), r.author),
                    RawItem::Invalid { line, .. } => format!("{line}:invalid"),
                    RawItem::TooLong => "too long".to_string(),
                });
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            got,
            vec!["one:Some(\"Al\")", "two:None", "6:invalid", "three:None"]
        );
    }

    /// What each reader gives for `data` with a cap of `cap` bytes, one string per item.
    fn items(format: Format, data: &[u8], cap: usize) -> Vec<String> {
        let mut got = Vec::new();
        let mut sink = |item: RawItem, _: u64| {
            got.push(match item {
                RawItem::Record(r) => r.text.trim().to_string(),
                RawItem::Invalid { line, .. } => format!("{line}:invalid"),
                RawItem::TooLong => "too long".to_string(),
            });
            Ok(())
        };
        read_text_format(data, format, &Fields::default(), cap, &mut sink).unwrap();
        got
    }

    #[test]
    fn a_byte_order_mark_is_no_text() {
        let jsonl = b"\xEF\xBB\xBF{\"text\": \"first\"}\n{\"text\": \"second\"}\n";
        assert_eq!(
            items(Format::Jsonl, jsonl, 1 << 16),
            vec!["first", "second"]
        );
        let lines = b"\xEF\xBB\xBFfirst\nsecond\n";
        assert_eq!(
            items(Format::Lines, lines, 1 << 16),
            vec!["first", "second"]
        );
        // CRLF separators, as two of fortunes-ru's files have.
        let crlf = b"one\r\n%\r\ntwo\r\n%\r\n";
        assert_eq!(items(Format::Fortune, crlf, 1 << 16), vec!["one", "two"]);
    }

    #[test]
    fn records_over_the_cap_are_dropped_without_being_held() {
        // A long record between short ones, of many lines and of one line with no break.
        let many_lines = format!("a\n%\n{}%\nb\n", "xxxxxxxxx\n".repeat(10));
        assert_eq!(
            items(Format::Fortune, many_lines.as_bytes(), 50),
            vec!["a", "too long", "b"]
        );
        let one_line = format!("a\n%\n{}\n%\nb", "x".repeat(100));
        assert_eq!(
            items(Format::Fortune, one_line.as_bytes(), 50),
            vec!["a", "too long", "b"]
        );
        // Exactly at the cap is kept: 49 bytes and the line break.
        let at_cap = format!("{}\n%\n", "y".repeat(49));
        assert_eq!(
            items(Format::Fortune, at_cap.as_bytes(), 50),
            vec!["y".repeat(49)]
        );
        // A line of exactly the cap is kept, in every format.
        let at_cap = format!("{}\n", "y".repeat(50));
        assert_eq!(
            items(Format::Lines, at_cap.as_bytes(), 50),
            vec!["y".repeat(50)]
        );
        let json_at_cap = format!("{{\"text\": \"{}\"}}\n", "y".repeat(38));
        assert_eq!(json_at_cap.len(), 51);
        assert_eq!(
            items(Format::Jsonl, json_at_cap.as_bytes(), 50),
            vec!["y".repeat(38)]
        );
        // A separator after a cut line still ends the record.
        assert_eq!(
            items(
                Format::Lines,
                format!("a\n{}\nb\n", "x".repeat(100)).as_bytes(),
                50
            ),
            vec!["a", "too long", "b"]
        );
        let jsonl = format!(
            "{{\"text\": \"{}\"}}\n{{\"text\": \"c\"}}\n",
            "x".repeat(100)
        );
        assert_eq!(
            items(Format::Jsonl, jsonl.as_bytes(), 50),
            vec!["too long", "c"]
        );
    }

    /// Every record as the reader gives it: (text, author) or the reason it is invalid.
    fn read_text(format: Format, data: &[u8]) -> Vec<Result<(String, Option<String>), String>> {
        let mut got = Vec::new();
        let mut sink = |item: RawItem, _: u64| {
            got.push(match item {
                RawItem::Record(r) => Ok((r.text, r.author)),
                RawItem::Invalid { line, reason } => Err(format!("{line}: {reason}")),
                RawItem::TooLong => Err("too long".into()),
            });
            Ok(())
        };
        read_text_format(data, format, &Fields::default(), 1 << 16, &mut sink).unwrap();
        got
    }

    #[test]
    fn only_fortunes_lose_their_last_dash_line_to_an_author() {
        let dialogue = "Он сказал:\n-- Я вернусь завтра.\n";
        assert_eq!(
            read_text(Format::Paragraphs, dialogue.as_bytes()),
            vec![Ok((dialogue.to_string(), None))]
        );
        let fortune = "A quote.\n\t\t-- Mark Twain\n%\n";
        assert_eq!(
            read_text(Format::Fortune, fortune.as_bytes()),
            vec![Ok(("A quote.".to_string(), Some("Mark Twain".to_string())))]
        );
    }

    #[test]
    fn bad_bytes_are_placed_at_their_line_and_column() {
        // The record starts at line 3; its bad byte is on its second line, 8 bytes in.
        let data = b"first\n%\nfine line\nsecond \xff line\n%\n";
        assert_eq!(
            read_text(Format::Fortune, data),
            vec![
                Ok(("first\n".to_string(), None)),
                Err(
                    "4: invalid UTF-8 at byte 8 of the line (is the file in another encoding?)"
                        .into()
                )
            ]
        );
        // UTF-16: its Cyrillic is valid UTF-8 byte for byte, its NULs are not text.
        let utf16: Vec<u8> = "а б\n%\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let got = read_text(Format::Fortune, &utf16);
        assert!(
            !got.is_empty()
                && got
                    .iter()
                    .all(|r| r.as_ref().is_err_and(|e| e.contains("NUL"))),
            "{got:?}"
        );
        assert!(read_text(Format::Lines, b"a\0b\n")[0]
            .as_ref()
            .is_err_and(|e| e.starts_with("1: a NUL byte")));
        // A UTF-16 file over the record cap is one record (its `%` lines are not `%`
        // lines): still called what it is, not a record too long.
        let mut big = Vec::new();
        let mut sink = |item: RawItem, _: u64| {
            big.push(matches!(item, RawItem::Invalid { ref reason, .. } if reason == NUL_REASON));
            Ok(())
        };
        let long: Vec<u8> = "слово\n%\n"
            .repeat(100)
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        read_separated(
            &long[..],
            is_fortune_separator,
            Attribution::Split,
            64,
            &mut sink,
        )
        .unwrap();
        assert_eq!(big, vec![true]);
    }

    #[test]
    fn overstrikes_resolve_and_other_controls_go() {
        assert_eq!(
            normalize_text("_\u{8}I said *____\u{8}\u{8}\u{8}\u{8}only*"),
            "I said *only*"
        );
        assert_eq!(normalize_text("m'\u{8}iriel"), "míriel");
        assert_eq!(
            normalize_text("ring\u{7} the \u{1b}bell\u{85}"),
            "ring the bell"
        );
        // A backspace at the start of a line takes nothing from the line before.
        assert_eq!(normalize_text("a\n\n\u{8}b"), "a\nb");
        assert_eq!(normalize_text("plain\ttext"), "plain text");
        // A typewriter accent struck over a letter, either way round, is the letter accented.
        assert_eq!(
            normalize_text("caf'\u{8}e, e\u{8}'t'\u{8}e, gar,\u{8}con"),
            "café, été, garçon"
        );
        // Breaks that are control characters are breaks.
        assert_eq!(normalize_text("a\u{b}b\u{c}c\u{85}d"), "a b c d");
        // The author is taken after the overstrikes resolve.
        assert_eq!(
            read_text(
                Format::Fortune,
                "Quote.\n\t\t-- Honor'\u{8}e de Balzac\n%\n".as_bytes()
            ),
            vec![Ok((
                "Quote.".to_string(),
                Some("Honoré de Balzac".to_string())
            ))]
        );
    }

    #[test]
    fn names_given_as_names_are_kept_whole() {
        assert_eq!(
            clean_name(" Tolstoy,  Leo ").as_deref(),
            Some("Tolstoy, Leo")
        );
        assert_eq!(clean_name("X"), None);
    }

    /// A Parquet file as pyarrow and pandas write them: Snappy, `large_string` text, a
    /// dictionary-encoded (categorical) author, a null text.
    #[test]
    fn parquet_as_other_writers_write_it() {
        use arrow::array::{ArrayRef, DictionaryArray, LargeStringArray};
        use arrow::datatypes::Int32Type;
        use arrow::record_batch::RecordBatch;
        use parquet::arrow::ArrowWriter;
        use parquet::basic::Compression;
        use parquet::file::properties::WriterProperties;
        use std::sync::Arc;

        let dir = std::env::temp_dir().join(format!("orchestrate-parquet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text: ArrayRef = Arc::new(LargeStringArray::from(vec![
            Some("A line from a dataframe."),
            None,
            Some("Another one."),
        ]));
        let author: ArrayRef = Arc::new(
            vec![Some("Tolstoy, Leo"), None, Some("Tolstoy, Leo")]
                .into_iter()
                .collect::<DictionaryArray<Int32Type>>(),
        );
        let batch = RecordBatch::try_from_iter([("text", text), ("author", author)]).unwrap();
        for compression in [
            Compression::SNAPPY,
            Compression::LZ4_RAW,
            Compression::GZIP(Default::default()),
            Compression::BROTLI(Default::default()),
        ] {
            let path = dir.join("frame.parquet");
            let props = WriterProperties::builder()
                .set_compression(compression)
                .build();
            let mut w = ArrowWriter::try_new(
                std::fs::File::create(&path).unwrap(),
                batch.schema(),
                Some(props),
            )
            .unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            let mut got = Vec::new();
            read(
                &path,
                Format::Parquet,
                &Fields::default(),
                1 << 16,
                &mut |item, _| {
                    if let RawItem::Record(r) = item {
                        got.push((r.text, r.author));
                    }
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{compression:?}: {e}"));
            let tolstoy = Some("Tolstoy, Leo".to_string());
            assert_eq!(
                got,
                vec![
                    ("A line from a dataframe.".to_string(), tolstoy.clone()),
                    (String::new(), None),
                    ("Another one.".to_string(), tolstoy),
                ],
                "{compression:?}"
            );
        }
        // A column that is not text is refused, naming it, not cast to text.
        let ids: ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![1, 2]));
        let batch = RecordBatch::try_from_iter([("text", ids)]).unwrap();
        let path = dir.join("ids.parquet");
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None)
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let e = read(
            &path,
            Format::Parquet,
            &Fields::default(),
            1 << 16,
            &mut |_, _| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("column `text` is Int64, not text"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
