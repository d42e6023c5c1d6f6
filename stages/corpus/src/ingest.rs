//! The `ingest` stage: raw sources → clean, deduplicated, split Parquet shards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Builder, RecordBatch, StringBuilder};
use orchestrate_stage::{
    canonical_params, ArtifactKind, FileDeps, Inputs, ParamError, ParamProblem, PathSegment,
    StageContext, StageDescriptor, StageError, StageOutput,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::formats::{self, Fields, Format, RawItem};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A file, a directory (its files, not recursing unless `recursive`), or a glob.
    /// Relative paths resolve against the pipeline file's directory.
    pub path: String,
    #[serde(default = "default_format")]
    pub format: Format,
    /// Fixes the language of every record; detected per record when absent.
    #[serde(default)]
    pub lang: Option<String>,
    #[serde(default)]
    pub fields: Fields,
    #[serde(default)]
    pub recursive: bool,
}

fn default_format() -> Format {
    Format::Fortune
}

/// Either fraction may be left out (`split: {val: 0.1}`): the other keeps its default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Split {
    pub val: f64,
    pub test: f64,
}

impl Default for Split {
    fn default() -> Self {
        Split {
            val: 0.02,
            test: 0.02,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestParams {
    pub sources: Vec<Source>,
    #[serde(default)]
    pub split: Split,
    /// Records shorter than this (in characters, after clean-up) are dropped.
    #[serde(default = "default_min_chars")]
    pub min_chars: usize,
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
    /// Keep only these languages; all when empty.
    #[serde(default)]
    pub languages: Vec<String>,
    /// Fail on the first undecodable record instead of skipping and counting it.
    #[serde(default)]
    pub strict: bool,
    #[serde(default = "default_shard_records")]
    pub shard_records: usize,
    #[serde(default = "default_row_group_records")]
    pub row_group_records: usize,
}

/// The raw size past which a record cannot fit `max_chars` after clean-up, in any but
/// pathological text: 4 bytes per UTF-8 character, and as much again for the whitespace and
/// line breaks that clean-up collapses. Such a record is dropped unread (`too_long`).
fn max_record_bytes(max_chars: usize) -> usize {
    max_chars.saturating_mul(8).max(64 << 10)
}

fn default_min_chars() -> usize {
    8
}
fn default_max_chars() -> usize {
    4000
}
fn default_shard_records() -> usize {
    500_000
}
fn default_row_group_records() -> usize {
    50_000
}

pub const DESCRIPTOR: StageDescriptor = StageDescriptor {
    kind: "ingest",
    about: "reads text sources into a clean, deduplicated, split corpus of Parquet shards",
    inputs: Inputs::Typed(&[]),
    output: ArtifactKind::Corpus,
    device_dependent: false,
    names_in_output: false,
    code_hash: env!("STAGE_CODE_HASH"),
    tracked_files: &["stats.json"],
    canonical_params: canonical,
    file_deps,
    empty_part,
    unkeyed: &[],
};

fn canonical(v: serde_json::Value) -> Result<serde_json::Value, ParamError> {
    let mut v = canonical_params::<IngestParams>(v)?;
    // Languages as the corpus names them (`en-US` and `EN` are `en`), in the key too: a
    // source's `lang` and the `languages` kept, as a record's own language field is.
    let code = |l: &mut serde_json::Value| {
        if let Some(text) = l.as_str() {
            *l = serde_json::Value::String(language_code(text.to_string()));
        }
    };
    if let Some(sources) = v["sources"].as_array_mut() {
        for source in sources {
            if let Some(lang) = source.get_mut("lang") {
                code(lang);
            }
        }
    }
    if let Some(languages) = v["languages"].as_array_mut() {
        languages.iter_mut().for_each(code);
    }
    let p: IngestParams = serde_json::from_value(v.clone()).expect("just canonicalised");
    let invalid = |path: &[&str], msg: String| ParamError {
        path: path
            .iter()
            .map(|k| PathSegment::Key(k.to_string()))
            .collect(),
        problem: ParamProblem::Invalid(msg),
    };
    let mut problems = Vec::new();
    if p.sources.is_empty() {
        problems.push(invalid(
            &["sources"],
            "at least one source is needed".into(),
        ));
    }
    // An empty path (`path:` left blank, `${env.CORPUS:-}` unset) names the pipeline's own
    // folder, whose YAML and scripts would become the corpus.
    for (i, s) in p.sources.iter().enumerate() {
        if s.path.trim().is_empty() {
            problems.push(ParamError {
                path: vec![
                    PathSegment::Key("sources".into()),
                    PathSegment::Index(i),
                    PathSegment::Key("path".into()),
                ],
                problem: ParamProblem::Invalid(
                    "the path is empty: name a file, a folder or a glob".into(),
                ),
            });
        }
    }
    for (name, f) in [("val", p.split.val), ("test", p.split.test)] {
        if !(0.0..1.0).contains(&f) {
            problems.push(invalid(
                &["split", name],
                format!("a fraction in [0, 1) is needed, found {f}"),
            ));
        }
    }
    let in_range = |f: f64| (0.0..1.0).contains(&f);
    if in_range(p.split.val) && in_range(p.split.test) && p.split.val + p.split.test >= 1.0 {
        problems.push(invalid(
            &["split"],
            "val + test must leave something to train on".into(),
        ));
    }
    if p.min_chars > p.max_chars {
        problems.push(invalid(
            &["min_chars"],
            format!(
                "min_chars ({}) exceeds max_chars ({})",
                p.min_chars, p.max_chars
            ),
        ));
    }
    for (key, n) in [
        ("shard_records", p.shard_records),
        ("row_group_records", p.row_group_records),
    ] {
        if n == 0 {
            problems.push(invalid(&[key], format!("{key} must be at least 1")));
        }
    }
    orchestrate_stage::param_problems(problems).map(|()| v)
}

/// A split whose fraction is zero holds no record: a consumer that needs it (train's
/// validation, evaluate's test) is refused at validation, pointing here.
fn empty_part(v: &serde_json::Value, part: &str) -> Option<Vec<PathSegment>> {
    let p: IngestParams = serde_json::from_value(v.clone()).ok()?;
    let fraction = match part {
        "val" => p.split.val,
        "test" => p.split.test,
        _ => return None,
    };
    (fraction <= 0.0).then(|| {
        ["split", part]
            .iter()
            .map(|k| PathSegment::Key(k.to_string()))
            .collect()
    })
}

/// The source files, so their contents join the cache key: edit a corpus file, re-ingest.
/// A local source that names no file is an error at its `path`, found by `validate`.
fn file_deps(v: &serde_json::Value, dir: &Path) -> FileDeps {
    let Ok(p) = serde_json::from_value::<IngestParams>(v.clone()) else {
        return Ok(Vec::new());
    };
    let mut deps = Vec::new();
    let mut missing = Vec::new();
    let mut first = HashMap::new();
    for (i, s) in p.sources.iter().enumerate() {
        // Remote sources are named by URL; the orchestrator fingerprints their listing.
        if crate::remote::is_remote(&s.path) {
            deps.push(s.path.clone());
            continue;
        }
        let at_path = |msg: String| ParamError {
            path: vec![
                PathSegment::Key("sources".into()),
                PathSegment::Index(i),
                PathSegment::Key("path".into()),
            ],
            problem: ParamProblem::Invalid(msg),
        };
        let files = match source_files(s, dir) {
            Ok(files) => files,
            Err(msg) => {
                missing.push(at_path(msg));
                continue;
            }
        };
        for f in files {
            match claim(&mut first, &p.sources, i, &f) {
                Ok(true) => deps.push(f.display().to_string()),
                Ok(false) => {}
                Err(msg) => {
                    missing.push(at_path(msg));
                    break;
                }
            }
        }
    }
    if missing.is_empty() {
        Ok(deps)
    } else {
        Err(missing)
    }
}

/// Every input file with the source it came from and its name in the corpus (see
/// [`source_name`]), in a stable order, each file once.
///
/// A file two sources name is read once, by the first, when both read it alike; when they
/// read it differently (another `format`, `lang` or `fields`) it is an error naming both:
/// the second source's reading would otherwise vanish without a word.
pub fn expand(p: &IngestParams, dir: &Path) -> Result<Vec<(PathBuf, usize, String)>, String> {
    let mut out = Vec::new();
    let mut first = HashMap::new();
    for (i, s) in p.sources.iter().enumerate() {
        for f in source_files(s, dir)? {
            if claim(&mut first, &p.sources, i, &f)? {
                let name = source_name(s, dir, &f);
                out.push((f, i, name));
            }
        }
    }
    Ok(out)
}

/// Whether `file`, named by source `i`, is named for the first time (`first` says by which
/// source each file was); an error where an earlier source names it and reads it otherwise.
fn claim(
    first: &mut HashMap<PathBuf, usize>,
    sources: &[Source],
    i: usize,
    file: &Path,
) -> Result<bool, String> {
    let reading = |s: &Source| (s.format, s.lang.clone(), s.fields.clone());
    match first.entry(canonical_path(file)) {
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(i);
            Ok(true)
        }
        std::collections::hash_map::Entry::Occupied(slot) => {
            let earlier = &sources[*slot.get()];
            if reading(earlier) == reading(&sources[i]) {
                return Ok(false);
            }
            Err(format!(
                "{} is named by source {} (`{}`) and source {} (`{}`), which read it differently: name each file in one source",
                file.display(),
                slot.get() + 1,
                earlier.path,
                i + 1,
                sources[i].path
            ))
        }
    }
}

/// A file's name in the `source` column: the source's `path` as the pipeline writes it, then
/// the file's path below it (below a glob's fixed folders). The output is then the same bytes
/// in every checkout of the pipeline, wherever it lies, as its cache key is.
fn source_name(s: &Source, dir: &Path, file: &Path) -> String {
    let fixed = match s.path.find(['*', '?', '[']) {
        Some(glob) => match s.path[..glob].rfind('/') {
            Some(0) => "/",
            Some(slash) => &s.path[..slash],
            None => "",
        },
        None => s.path.as_str(),
    };
    let Ok(below) = file.strip_prefix(dir.join(fixed)) else {
        return file.display().to_string();
    };
    let below: Vec<_> = below
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect();
    let below = below.join("/");
    match (fixed, below.is_empty()) {
        (_, true) => s.path.clone(),
        ("", false) => below,
        (fixed, false) => format!("{}/{below}", fixed.trim_end_matches('/')),
    }
}

fn canonical_path(f: &Path) -> PathBuf {
    f.canonicalize().unwrap_or_else(|_| f.to_path_buf())
}

/// The files one local source names, sorted; none is an error.
fn source_files(s: &Source, dir: &Path) -> Result<Vec<PathBuf>, String> {
    let path = dir.join(&s.path);
    let mut files: Vec<PathBuf> = if s.path.contains(['*', '?', '[']) {
        let pattern = path.display().to_string();
        glob::glob(&pattern)
            .map_err(|e| format!("source `{}` is not a valid glob: {e}", s.path))?
            .flatten()
            .filter(|f| f.is_file())
            .collect()
    } else if path.is_dir() {
        list_dir(&path, s.recursive)?
    } else if path.is_file() {
        vec![path.clone()]
    } else {
        return Err(format!(
            "source `{}` does not exist (looked at {})",
            s.path,
            path.display()
        ));
    };
    // Regular files first, then links: a link to a file the source names itself (Debian's
    // `art.u8 -> art`) is then read once, under the file's own name, whichever sorts first.
    files.sort_by_cached_key(|f| (is_symlink(f), f.clone()));
    // Debian's fortune directories hold `.dat` indexes beside each file: not text.
    if s.format == Format::Fortune {
        files.retain(|f| f.extension().is_none_or(|e| e != "dat"));
    }
    // A source that names nothing is a mistake (a package not installed, a typo), not
    // a smaller corpus: a model trained without it would not say so.
    if files.is_empty() {
        return Err(format!(
            "source `{}` matches no file (looked for {})",
            s.path,
            path.display()
        ));
    }
    Ok(files)
}

/// A folder's files: its regular files and the files its links point to (a file linked
/// into the folder is part of it). Linked folders are not followed, even with `recursive`
/// (a link to a parent would never end); a link to nothing is an error, as a missing file.
fn list_dir(dir: &Path, recursive: bool) -> Result<Vec<PathBuf>, String> {
    let cannot = |e: std::io::Error| format!("cannot list source directory {}: {e}", dir.display());
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(cannot)? {
        let entry = entry.map_err(cannot)?;
        let path = entry.path();
        let ft = entry.file_type().map_err(cannot)?;
        if ft.is_file() {
            out.push(path);
        } else if ft.is_dir() && recursive {
            out.extend(list_dir(&path, true)?);
        } else if ft.is_symlink() {
            match std::fs::metadata(&path) {
                Ok(target) if target.is_file() => out.push(path),
                Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "{} is a link to {}, which cannot be read: {e}",
                        path.display(),
                        std::fs::read_link(&path)
                            .map(|t| t.display().to_string())
                            .unwrap_or_else(|_| "an unknown target".into())
                    ))
                }
            }
        }
    }
    Ok(out)
}

fn is_symlink(f: &Path) -> bool {
    f.symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
}

/// What an ingest reports and stores in its artifact's metadata.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub files: usize,
    pub bytes_read: u64,
    pub records_read: u64,
    pub records: u64,
    pub text_bytes: u64,
    pub shards: usize,
    pub per_language: BTreeMap<String, u64>,
    pub per_split: BTreeMap<String, u64>,
    pub with_author: u64,
    pub distinct_authors: usize,
    pub top_authors: Vec<(String, u64)>,
    pub dropped: BTreeMap<String, u64>,
}

pub fn run(ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
    let mut p: IngestParams = ctx.params()?;
    // Remote sources are downloaded to scratch first, then read like local ones, but named
    // by their objects' URLs: the scratch folder changes with every run.
    let mut remote_names: HashMap<PathBuf, String> = HashMap::new();
    for (i, s) in p.sources.iter_mut().enumerate() {
        if crate::remote::is_remote(&s.path) {
            let dest = ctx.scratch_dir.join(format!("source-{i}"));
            let (objects, passed_over) = crate::remote::download(&s.path, &dest, s.recursive)?;
            ctx.events.log(&format!(
                "downloaded {} objects from {}{}",
                objects.len(),
                s.path,
                match passed_over {
                    0 => String::new(),
                    n => format!(
                        "; passed over {n} in sub-prefixes, as a folder's subfolders without `recursive: true`"
                    ),
                }
            ));
            remote_names.extend(objects);
            s.path = dest.display().to_string();
        }
    }
    let mut files = expand(&p, ctx.pipeline_dir).map_err(StageError::Failed)?;
    for (file, _, name) in &mut files {
        if let Some(url) = remote_names.remove(file) {
            *name = url;
        }
    }
    if files.is_empty() {
        return Err(StageError::Failed("the sources name no files".into()));
    }
    let total: u64 = files
        .iter()
        .map(|(f, _, _)| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let shard_dir = ctx.out_dir.join(crate::SHARD_DIR);
    std::fs::create_dir_all(&shard_dir)
        .map_err(|e| StageError::io("cannot create the shard directory", e))?;
    let mut writer = ShardWriter::new(shard_dir, p.shard_records, p.row_group_records);
    let mut stats = Stats {
        files: files.len(),
        ..Default::default()
    };
    // 128 bits per record keeps 2 million records' dedupe set near 50 MB, collisions aside.
    let mut seen: HashSet<u128, PrehashedKeys> = HashSet::default();
    let mut authors: BTreeMap<String, u64> = BTreeMap::new();
    let mut done_bytes = 0u64;
    let mut loose = String::new();
    let started = std::time::Instant::now();

    let mut file = FileTally::default();
    let to_read: Vec<(&Path, Format, &Fields)> = files
        .iter()
        .map(|(file, si, _)| {
            let source = &p.sources[*si];
            (file.as_path(), source.format, &source.fields)
        })
        .collect();
    read_normalised(&to_read, max_record_bytes(p.max_chars), &mut |fi, read| {
        let (path, si, shown) = &files[fi];
        let source = &p.sources[*si];
        let (item, consumed) = match read {
            FromReader::Record { item, consumed } => (item, consumed),
            FromReader::EndOfFile => {
                done_bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                ctx.events.progress(done_bytes, Some(total), "bytes");
                return file_done(ctx, shown, std::mem::take(&mut file));
            }
        };
        if consumed - file.last_progress > (1 << 20) {
            ctx.events
                .progress(done_bytes + consumed, Some(total), "bytes");
            file.last_progress = consumed;
            ctx.checkpoint()?;
        }
        stats.records_read += 1;
        file.records += 1;
        let raw = match item {
            RawItem::Invalid { line, reason } => {
                if p.strict {
                    return Err(StageError::Failed(format!(
                        "{shown}:{line}: {reason} (strict: true)"
                    )));
                }
                count(&mut stats.dropped, "invalid");
                file.invalid += 1;
                file.first_invalid
                    .get_or_insert(format!("{shown}:{line}: {reason}"));
                return Ok(());
            }
            RawItem::TooLong => {
                count(&mut stats.dropped, "too_long");
                return Ok(());
            }
            RawItem::Record(r) => r,
        };
        let text = raw.text;
        let chars = text.chars().count();
        let drop = if chars == 0 {
            Some("empty")
        } else if chars < p.min_chars {
            Some("too_short")
        } else if chars > p.max_chars {
            Some("too_long")
        } else {
            None
        };
        if let Some(reason) = drop {
            count(&mut stats.dropped, reason);
            return Ok(());
        }
        // Borrowed, not copied: this and what follows runs per record.
        let record_lang = match source.lang {
            Some(_) => None,
            None => raw.lang.map(language_code).filter(|l| !l.is_empty()),
        };
        let (lang, confidence) = match source.lang.as_deref().or(record_lang.as_deref()) {
            Some(l) => (l, 1.0),
            None => crate::lang::detect(&text),
        };
        if !p.languages.is_empty() && !p.languages.iter().any(|l| l == lang) {
            count(&mut stats.dropped, "language");
            return Ok(());
        }
        let hash = blake3::hash(text.as_bytes());
        let bytes = hash.as_bytes();
        let key = u128::from_le_bytes(bytes[..16].try_into().expect("16 bytes"));
        if !seen.insert(key) {
            count(&mut stats.dropped, "duplicate");
            return Ok(());
        }
        let split = split_of(split_hash(&text, &mut loose), &p.split);
        // Fortune authors were parsed from their attribution line already; names from
        // other formats are names already (`Tolstoy, Leo` is not cut at its comma).
        let author = match source.format {
            Format::Fortune => raw.author,
            _ => raw.author.as_deref().and_then(formats::clean_name),
        };
        if let Some(a) = &author {
            count(&mut authors, a);
            stats.with_author += 1;
        }
        stats.records += 1;
        stats.text_bytes += text.len() as u64;
        count(&mut stats.per_language, lang);
        count(&mut stats.per_split, split);
        let hex = hash.to_hex();
        writer
            .push(Row {
                id: &hex[..16],
                text: &text,
                lang,
                confidence,
                author: author.as_deref(),
                source: shown,
                split,
            })
            .map_err(|e| StageError::Failed(format!("cannot write a corpus shard: {e}")))
    })?;
    stats.shards = writer
        .finish()
        .map_err(|e| StageError::Failed(format!("cannot finish a corpus shard: {e}")))?;
    stats.bytes_read = done_bytes;
    if stats.records == 0 {
        return Err(StageError::Failed(format!(
            "ingest produced no records from {} files ({} read; dropped: {})",
            stats.files,
            stats.records_read,
            describe(&stats.dropped)
        )));
    }
    stats.distinct_authors = authors.len();
    let mut top: Vec<(String, u64)> = authors.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(20);
    stats.top_authors = top;

    let secs = started.elapsed().as_secs_f64().max(1e-9);
    ctx.events.metric("records", stats.records as f64, None);
    ctx.events
        .metric("text_mb", stats.text_bytes as f64 / 1e6, None);
    ctx.events.metric(
        "ingest_mb_per_s",
        stats.bytes_read as f64 / 1e6 / secs,
        None,
    );
    for (reason, n) in &stats.dropped {
        ctx.events
            .metric(&format!("dropped_{reason}"), *n as f64, None);
    }
    for (lang, n) in &stats.per_language {
        ctx.events
            .metric(&format!("records_{lang}"), *n as f64, None);
    }
    ctx.events.log(&format!(
        "{} records ({} MB of text) from {} files; dropped: {}",
        stats.records,
        stats.text_bytes / 1_000_000,
        stats.files,
        describe(&stats.dropped)
    ));
    let json = serde_json::to_value(&stats).expect("plain JSON");
    std::fs::write(
        ctx.out_dir.join("stats.json"),
        serde_json::to_vec_pretty(&json).expect("plain JSON"),
    )
    .map_err(|e| StageError::io("cannot write stats.json", e))?;
    let mut out = StageOutput::default();
    if let serde_json::Value::Object(map) = json {
        out.metadata = map;
    }
    Ok(out)
}

/// The dedupe set's keys are blake3 output already: hashing them again (SipHash, the
/// default) would only cost time.
#[derive(Default, Clone, Copy)]
struct PrehashedKeys;

impl std::hash::BuildHasher for PrehashedKeys {
    type Hasher = Prehashed;
    fn build_hasher(&self) -> Prehashed {
        Prehashed(0)
    }
}

struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// A language as a source wrote it (`RU`, `ru-RU`, `en_US`), as the corpus and `languages`
/// name it: lower case, the primary subtag only.
fn language_code(lang: String) -> String {
    let primary = lang.trim().split(['-', '_']).next().unwrap_or_default();
    primary.to_lowercase()
}

fn describe(dropped: &BTreeMap<String, u64>) -> String {
    if dropped.is_empty() {
        return "none".into();
    }
    dropped
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The hash a record's split follows: of its letters and digits, lower-cased, so copies that
/// differ only in case, punctuation or spacing ("Garbage In -- Gospel Out." and "Garbage In,
/// Gospel Out") fall in one split, and no test record has a near-copy in training. A record
/// with no letter or digit at all (some ASCII art) is hashed whole. `buf` is scratch space.
fn split_hash(text: &str, buf: &mut String) -> u64 {
    buf.clear();
    for c in text.chars() {
        if c.is_ascii() {
            if c.is_ascii_alphanumeric() {
                buf.push(c.to_ascii_lowercase());
            }
        } else if let Some(lower) = cyrillic_lower(c) {
            buf.push(lower);
        } else if c.is_alphanumeric() {
            buf.extend(c.to_lowercase());
        }
    }
    let key = if buf.is_empty() { text } else { buf.as_str() };
    let hash = blake3::hash(key.as_bytes());
    u64::from_le_bytes(hash.as_bytes()[16..24].try_into().expect("8 bytes"))
}

/// A Cyrillic letter of U+0400..U+045F lower-cased by arithmetic: Russian records are half
/// the corpus, and the general tables' lookups (alphabetic, then lower case) were a sixth of
/// ingest's time. None for any other character.
fn cyrillic_lower(c: char) -> Option<char> {
    let lower = match c as u32 {
        0x400..=0x40F => c as u32 + 0x50,
        0x410..=0x42F => c as u32 + 0x20,
        0x430..=0x45F => c as u32,
        _ => return None,
    };
    char::from_u32(lower)
}

/// The split follows from the record's hash alone, so adding records never moves another.
fn split_of(h: u64, s: &Split) -> &'static str {
    let u = (h >> 11) as f64 / (1u64 << 53) as f64;
    if u < s.test {
        "test"
    } else if u < s.test + s.val {
        "val"
    } else {
        "train"
    }
}

/// One file's records as they are taken: how many, how many were not text (and the first
/// such one's place and reason), and how far into the file progress was last reported.
#[derive(Default)]
struct FileTally {
    records: u64,
    invalid: u64,
    first_invalid: Option<String>,
    last_progress: u64,
}

/// After a file's last record: a file none of whose records could be read fails the stage,
/// and one partly unreadable is logged.
fn file_done(ctx: &StageContext<'_>, shown: &str, file: FileTally) -> Result<(), StageError> {
    let Some(first) = file.first_invalid else {
        return Ok(());
    };
    let (n, of) = (file.invalid, file.records);
    // Not one record readable: the file is in another encoding (KOI8-R, CP1251, UTF-16),
    // not text, or (JSON Lines) named with the wrong `fields`; skipping it would shrink the
    // corpus without a word.
    let hint = if first.contains("UTF-8") || first.contains("NUL") {
        "convert the file (iconv -f KOI8-R -t UTF-8, say) or leave it out"
    } else {
        "check its format and `fields`, or leave it out"
    };
    if n == of {
        return Err(StageError::Failed(format!(
            "none of the {n} records of {shown} could be read (first: {first}); {hint}"
        )));
    }
    ctx.events.log(&format!(
        "{shown}: {n} of {of} records skipped as unreadable (first: {first})"
    ));
    Ok(())
}

/// What the reading thread hands over: a record and how far into its file it ended, or
/// the end of a file.
enum FromReader {
    Record { item: RawItem, consumed: u64 },
    EndOfFile,
}

/// The records of the files, read on a thread of their own, their text normalised there,
/// and handed to `each` in order with their file's index, each file followed by its `EndOfFile`.
/// Reading, splitting off attributions and normalising are half of the work per record, and
/// ran on the one core the rest (hashing, deduplication, the columns) waited on. The thread
/// reads on across files (the Debian corpus is 141 files of 250 records). An error of
/// `each` stops the reading and is the one returned; a read error ends it after the records
/// before it.
fn read_normalised(
    files: &[(&Path, Format, &Fields)],
    max_record_bytes: usize,
    each: &mut dyn FnMut(usize, FromReader) -> Result<(), StageError>,
) -> Result<(), StageError> {
    const BATCH: usize = 256;
    std::thread::scope(|scope| {
        // A few batches in flight: enough to keep both threads busy, and little memory.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(usize, FromReader)>>(8);
        let reader = scope.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            let send = |batch: &mut Vec<(usize, FromReader)>| {
                let full = std::mem::replace(batch, Vec::with_capacity(BATCH));
                // Err: `each` stopped, and its own error is the one that counts.
                tx.send(full).map_err(|_| StageError::Cancelled)
            };
            for (fi, &(file, format, fields)) in files.iter().enumerate() {
                let read =
                    formats::read(file, format, fields, max_record_bytes, &mut |item, at| {
                        let item = match item {
                            RawItem::Record(mut r) => {
                                r.text = formats::normalize_text(&r.text);
                                RawItem::Record(r)
                            }
                            other => other,
                        };
                        batch.push((fi, FromReader::Record { item, consumed: at }));
                        if batch.len() == BATCH {
                            send(&mut batch)?;
                        }
                        Ok(())
                    });
                if let Err(e) = read {
                    // The records before the error first: one may hold the error that
                    // counts (`strict`), as when `each` took them one by one.
                    let _ = send(&mut batch);
                    return Err(e);
                }
                batch.push((fi, FromReader::EndOfFile));
                send(&mut batch)?;
            }
            Ok(())
        });
        let mut taken = Ok(());
        'batches: for batch in rx.iter() {
            for (fi, read) in batch {
                taken = each(fi, read);
                if taken.is_err() {
                    break 'batches;
                }
            }
        }
        // Stops a reader still sending.
        drop(rx);
        let read = reader.join().unwrap_or_else(|_| {
            Err(StageError::Failed(
                "reading the sources failed (a bug in orchestrate, please report it)".into(),
            ))
        });
        taken.and(read)
    })
}

/// One record's columns, borrowed: the column builders copy them.
struct Row<'a> {
    id: &'a str,
    text: &'a str,
    lang: &'a str,
    confidence: f32,
    author: Option<&'a str>,
    source: &'a str,
    split: &'static str,
}

/// One more of `key`, its key allocated only the first time it is counted.
fn count(counts: &mut BTreeMap<String, u64>, key: &str) {
    match counts.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            counts.insert(key.to_string(), 1);
        }
    }
}

/// Hands rows to a writer thread in slices of `SLICE_ROWS`, which it encodes and compresses
/// while the next are parsed; rolls over to a new row group every `row_group` rows and to a
/// new shard every `shard_records`. At most two slices wait in the channel, so memory stays
/// bounded.
struct ShardWriter {
    shard_records: usize,
    row_group: usize,
    in_shard: usize,
    in_group: usize,
    cols: Columns,
    tx: Option<std::sync::mpsc::SyncSender<Chunk>>,
    thread: Option<std::thread::JoinHandle<WriteResult<usize>>>,
}

enum Chunk {
    Batch(RecordBatch),
    EndShard,
}

#[derive(Default)]
struct Columns {
    id: StringBuilder,
    text: StringBuilder,
    lang: StringBuilder,
    confidence: Float32Builder,
    author: StringBuilder,
    source: StringBuilder,
    split: StringBuilder,
    rows: usize,
}

impl Columns {
    fn append(&mut self, r: &Row<'_>) {
        self.id.append_value(r.id);
        self.text.append_value(r.text);
        self.lang.append_value(r.lang);
        self.confidence.append_value(r.confidence);
        self.author.append_option(r.author);
        self.source.append_value(r.source);
        self.split.append_value(r.split);
        self.rows += 1;
    }

    /// The rows appended so far as one batch, the builders left empty.
    fn take(&mut self) -> WriteResult<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.id.finish()),
            Arc::new(self.text.finish()),
            Arc::new(self.lang.finish()),
            Arc::new(self.confidence.finish()),
            Arc::new(self.author.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.split.finish()),
        ];
        self.rows = 0;
        Ok(RecordBatch::try_new(crate::schema(), columns)?)
    }
}

type WriteResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Rows per slice handed to the writer thread. Sent a whole row group at once (50,000 rows,
/// more than the whole Debian corpus), the writer idled while it was parsed and compressed
/// it all after. A multiple of Parquet's write batch (1,024 rows), so the writer cuts the
/// same mini-batches, and pages, as from one row-group-sized batch: the bytes are unchanged.
const SLICE_ROWS: usize = 8 * WRITE_BATCH_ROWS;
/// Parquet's default, set all the same: `SLICE_ROWS` must stay a multiple of it.
const WRITE_BATCH_ROWS: usize = 1024;

impl ShardWriter {
    fn new(dir: PathBuf, shard_records: usize, row_group: usize) -> Self {
        let row_group = row_group.min(shard_records);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(2);
        let thread = std::thread::spawn(move || write_shards(&dir, row_group, rx));
        ShardWriter {
            shard_records,
            row_group,
            in_shard: 0,
            in_group: 0,
            cols: Columns::default(),
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn push(&mut self, r: Row<'_>) -> WriteResult<()> {
        let c = &mut self.cols;
        c.append(&r);
        self.in_shard += 1;
        self.in_group += 1;
        let group_full = self.in_group >= self.row_group || self.in_shard >= self.shard_records;
        if c.rows >= SLICE_ROWS || group_full {
            self.flush()?;
        }
        if group_full {
            self.in_group = 0;
        }
        if self.in_shard >= self.shard_records {
            self.send(Chunk::EndShard)?;
            self.in_shard = 0;
        }
        Ok(())
    }

    fn send(&mut self, chunk: Chunk) -> WriteResult<()> {
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(chunk).is_ok())
            .unwrap_or(false);
        if sent {
            Ok(())
        } else {
            // The writer thread stopped: its own error says why.
            Err(self
                .join()
                .err()
                .unwrap_or_else(|| "the shard writer stopped".into()))
        }
    }

    fn join(&mut self) -> WriteResult<usize> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the shard writer panicked".into()),
            None => Err("the shard writer already stopped".into()),
        }
    }

    fn flush(&mut self) -> WriteResult<()> {
        if self.cols.rows == 0 {
            return Ok(());
        }
        let batch = self.cols.take()?;
        self.send(Chunk::Batch(batch))
    }

    fn finish(mut self) -> WriteResult<usize> {
        self.flush()?;
        self.join()
    }
}

/// The writer thread: one `ArrowWriter` per shard. Text and ids are unique per row, so
/// dictionary encoding and min/max statistics would cost time and buy nothing there.
fn write_shards(
    dir: &Path,
    row_group: usize,
    rx: std::sync::mpsc::Receiver<Chunk>,
) -> WriteResult<usize> {
    use parquet::file::properties::EnabledStatistics;
    use parquet::schema::types::ColumnPath;
    let mut writer: Option<ArrowWriter<File>> = None;
    let mut shards = 0;
    for chunk in rx {
        match chunk {
            Chunk::Batch(batch) => {
                if writer.is_none() {
                    let path = dir.join(format!("part-{shards:05}.parquet"));
                    // zstd's fastest level: level 3 made the files 8% smaller and the
                    // Debian corpus's ingest 8% slower (its compression was a third of the
                    // writer thread), for a file read a handful of times.
                    let mut props = WriterProperties::builder()
                        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
                        .set_max_row_group_size(row_group)
                        .set_write_batch_size(WRITE_BATCH_ROWS);
                    for col in ["id", "text"] {
                        props = props
                            .set_column_dictionary_enabled(ColumnPath::from(col), false)
                            .set_column_statistics_enabled(
                                ColumnPath::from(col),
                                EnabledStatistics::None,
                            );
                    }
                    writer = Some(ArrowWriter::try_new(
                        File::create(path)?,
                        crate::schema(),
                        Some(props.build()),
                    )?);
                    shards += 1;
                }
                writer.as_mut().expect("just opened").write(&batch)?;
            }
            Chunk::EndShard => {
                if let Some(w) = writer.take() {
                    w.close()?;
                }
            }
        }
    }
    if let Some(w) = writer.take() {
        w.close()?;
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{run_stage, tempdir, write_fortunes};
    use arrow::array::{Array, StringArray};

    fn read_all(out: &Path) -> Vec<RecordBatch> {
        let mut batches = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(out.join("data"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                File::open(f).unwrap(),
            )
            .unwrap()
            .build()
            .unwrap();
            batches.extend(r.map(|b| b.unwrap()));
        }
        batches
    }

    fn col<'a>(b: &'a RecordBatch, name: &str) -> &'a StringArray {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
    }

    #[test]
    fn ingests_cleans_dedupes_and_counts() {
        let d = tempdir("ingest");
        write_fortunes(&d);
        let params = serde_json::json!({"sources": [
            {"path": "en.txt"}, {"path": "ru.txt"}, {"path": "bad.txt", "lang": "en"}
        ]});
        let (r, ev) = run_stage(&DESCRIPTOR, run, params, &d, &[]);
        let out = r.unwrap();
        let m = &out.metadata;
        assert_eq!(m["records"], 7, "{m:?}");
        assert_eq!(m["dropped"]["duplicate"], 1);
        assert_eq!(m["dropped"]["too_short"], 1);
        assert_eq!(m["dropped"]["invalid"], 1);
        assert_eq!(m["per_language"]["ru"], 2);
        // Detection may call a short English quote `other`; the fixed-language file is `en`.
        let en = m["per_language"]["en"].as_u64().unwrap();
        let other = m["per_language"]
            .get("other")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        assert_eq!(en + other, 5, "{m:?}");
        assert!(en >= 4, "{m:?}");
        // `--Steve Martin` and `-- Steve  Martin` are one author.
        assert_eq!(m["top_authors"][0], serde_json::json!(["Steve Martin", 2]));
        assert!(ev.metrics.lock().unwrap().contains_key("ingest_mb_per_s"));
        let batches = read_all(&d.join("out"));
        let texts: Vec<String> = batches
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(|i| col(b, "text").value(i).to_string()))
            .collect();
        assert!(texts.contains(&"A day without sunshine is like, you know, night.".to_string()));
        assert!(
            texts.iter().all(|t| !t.contains("--")),
            "attributions are removed: {texts:?}"
        );
        let lang_detected = batches
            .iter()
            .any(|b| (0..b.num_rows()).any(|i| col(b, "lang").value(i) == "ru"));
        assert!(lang_detected);
        assert!(d.join("out/stats.json").exists());
    }

    /// A file two sources name is read once where they read it alike; where they read it
    /// differently, the second source's reading is not dropped without a word.
    #[test]
    fn a_file_two_sources_read_differently_is_an_error() {
        let d = tempdir("overlap");
        write_fortunes(&d);
        let alike = serde_json::json!({"sources": [{"path": "en.txt"}, {"path": "*.txt"}]});
        let p: IngestParams = serde_json::from_value(alike).unwrap();
        let files = expand(&p, &d).unwrap();
        let names: Vec<&str> = files.iter().map(|(_, _, n)| n.as_str()).collect();
        assert_eq!(names, ["en.txt", "bad.txt", "ru.txt"]);
        let unlike = serde_json::json!({"sources": [
            {"path": "en.txt"}, {"path": "en.txt", "format": "lines", "lang": "ru"}
        ]});
        let p: IngestParams = serde_json::from_value(unlike).unwrap();
        let err = expand(&p, &d).unwrap_err();
        assert!(
            err.ends_with("en.txt is named by source 1 (`en.txt`) and source 2 (`en.txt`), which read it differently: name each file in one source"),
            "{err}"
        );
    }

    #[test]
    fn strict_mode_names_file_and_line() {
        let d = tempdir("strict");
        write_fortunes(&d);
        let params = serde_json::json!({"sources": [{"path": "bad.txt"}], "strict": true});
        let (r, _) = run_stage(&DESCRIPTOR, run, params, &d, &[]);
        let err = r.unwrap_err().to_string();
        assert!(err.contains("bad.txt:3: invalid UTF-8"), "{err}");
    }

    #[test]
    fn empty_result_and_missing_source_are_clear_errors() {
        let d = tempdir("empty");
        write_fortunes(&d);
        let (r, _) = run_stage(
            &DESCRIPTOR,
            run,
            serde_json::json!({"sources": [{"path": "ru.txt"}], "languages": ["en"]}),
            &d,
            &[],
        );
        let err = r.unwrap_err().to_string();
        assert!(
            err.contains("no records") && err.contains("2 language"),
            "{err}"
        );
        let (r, _) = run_stage(
            &DESCRIPTOR,
            run,
            serde_json::json!({"sources": [{"path": "nope/*.txt"}]}),
            &d,
            &[],
        );
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("source `nope/*.txt` matches no file"));
        // One source of two matching nothing (a package not installed) is an error too,
        // not a corpus without it.
        let (r, _) = run_stage(
            &DESCRIPTOR,
            run,
            serde_json::json!({"sources": [{"path": "ru.txt"}, {"path": "missing/*"}]}),
            &d,
            &[],
        );
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("source `missing/*` matches no file"));
        let (r, _) = run_stage(
            &DESCRIPTOR,
            run,
            serde_json::json!({"sources": [{"path": "nope.txt"}]}),
            &d,
            &[],
        );
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("source `nope.txt` does not exist"));
    }

    #[test]
    fn a_file_in_another_encoding_is_an_error_naming_it() {
        let d = tempdir("encoding");
        write_fortunes(&d);
        // KOI8-R: "Привет, мир" and another record, not one of them UTF-8.
        let koi8: &[u8] =
            b"\xf0\xd2\xc9\xd7\xc5\xd4, \xcd\xc9\xd2\n%\n\xe4\xc1 \xc9 \xce\xc5\xd4\n%\n";
        std::fs::write(d.join("koi8.txt"), koi8).unwrap();
        let params = serde_json::json!({"sources": [{"path": "en.txt"}, {"path": "koi8.txt", "lang": "ru"}]});
        let (r, _) = run_stage(&DESCRIPTOR, run, params, &d, &[]);
        let err = r.unwrap_err().to_string();
        assert!(
            err.contains("none of the 2 records of koi8.txt could be read")
                && err.contains("iconv"),
            "{err}"
        );
    }

    #[test]
    fn a_record_s_language_is_its_primary_subtag_in_lower_case() {
        assert_eq!(language_code("RU".into()), "ru");
        assert_eq!(language_code("en-US".into()), "en");
        assert_eq!(language_code(" ru_RU ".into()), "ru");
        // A source's `lang` and the `languages` kept are named so too, in the key as well.
        let v = canonical(serde_json::json!({
            "sources": [{"path": "en.txt", "lang": "en-US"}],
            "languages": ["EN"],
        }))
        .unwrap();
        assert_eq!(v["sources"][0]["lang"], "en");
        assert_eq!(v["languages"][0], "en");
        // A split with one fraction given keeps the other's default.
        let v = canonical(serde_json::json!({
            "sources": [{"path": "en.txt"}],
            "split": {"val": 0.1},
        }))
        .unwrap();
        assert_eq!(v["split"]["test"], 0.02);
    }

    /// Rows sent in slices are written byte for byte as a whole row group sent at once (what
    /// the writer did before slices), row groups and shards cut where they were.
    #[test]
    fn slices_write_the_bytes_a_whole_row_group_does() {
        let (rows, group, shard) = (3 * SLICE_ROWS + 777, SLICE_ROWS + 1500, 2 * SLICE_ROWS + 40);
        // About 400 bytes a record: several 1 MiB pages a row group, so a page cut at
        // another mini-batch boundary would show in the bytes.
        let texts: Vec<String> = (0..rows)
            .map(|i| format!("record {i} says {}", "many words ".repeat(i % 71)))
            .collect();
        let row = |i: usize| Row {
            id: "0123456789abcdef",
            text: &texts[i],
            lang: if i.is_multiple_of(3) { "ru" } else { "en" },
            confidence: 1.0,
            author: i.is_multiple_of(5).then_some("Ann"),
            source: "fortunes",
            split: "train",
        };
        let sliced = tempdir("sliced");
        let mut w = ShardWriter::new(sliced.clone(), shard, group);
        for i in 0..rows {
            w.push(row(i)).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 2);
        // The same rows, each row group (cut by shard ends too) handed over whole.
        let whole = tempdir("whole");
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(rows);
        let (mut cols, mut in_shard) = (Columns::default(), 0);
        for i in 0..rows {
            cols.append(&row(i));
            in_shard += 1;
            if cols.rows == group || in_shard == shard || i + 1 == rows {
                tx.send(Chunk::Batch(cols.take().unwrap())).unwrap();
            }
            if in_shard == shard {
                tx.send(Chunk::EndShard).unwrap();
                in_shard = 0;
            }
        }
        drop(tx);
        assert_eq!(write_shards(&whole, group, rx).unwrap(), 2);
        for part in ["part-00000.parquet", "part-00001.parquet"] {
            let (a, b) = (
                std::fs::read(sliced.join(part)).unwrap(),
                std::fs::read(whole.join(part)).unwrap(),
            );
            assert!(a == b, "{part} differs ({} and {} bytes)", a.len(), b.len());
        }
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let first = File::open(sliced.join("part-00000.parquet")).unwrap();
        let groups: Vec<i64> = SerializedFileReader::new(first)
            .unwrap()
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert_eq!(groups, [group as i64, (shard - group) as i64]);
    }

    #[test]
    fn other_formats_and_shard_rollover() {
        let d = tempdir("formats");
        std::fs::write(d.join("a.jsonl"), "{\"body\": \"First JSON record here.\", \"who\": \"Ann\"}\nnot json\n{\"body\": \"Second JSON record here.\"}\n").unwrap();
        std::fs::write(
            d.join("b.txt"),
            "Line one is a record.\nLine two is a record.\n\n",
        )
        .unwrap();
        std::fs::write(
            d.join("c.txt"),
            "Paragraph one\nwraps here.\n\nParagraph two is here.\n",
        )
        .unwrap();
        let params = serde_json::json!({"shard_records": 2, "row_group_records": 1, "sources": [
            {"path": "a.jsonl", "format": "jsonl", "lang": "en", "fields": {"text": "body", "author": "who", "lang": "l"}},
            {"path": "b.txt", "format": "lines", "lang": "en"},
            {"path": "c.txt", "format": "paragraphs", "lang": "en"},
        ]});
        let (r, _) = run_stage(&DESCRIPTOR, run, params, &d, &[]);
        let m = r.unwrap().metadata;
        assert_eq!(m["records"], 6);
        assert_eq!(m["dropped"]["invalid"], 1);
        assert_eq!(m["shards"], 3);
        let batches = read_all(&d.join("out"));
        let texts: Vec<&str> = batches
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(|i| col(b, "text").value(i)))
            .collect();
        assert!(texts.contains(&"Paragraph one wraps here."), "{texts:?}");
        let authors: Vec<Option<&str>> = batches
            .iter()
            .flat_map(|b| {
                let a = col(b, "author");
                (0..b.num_rows())
                    .map(|i| (!a.is_null(i)).then(|| a.value(i)))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(authors[0], Some("Ann"));
        // Re-ingesting the output Parquet gives the same records.
        let params = serde_json::json!({"sources": [{"path": "previous/data/*.parquet", "format": "parquet"}]});
        let d2 = d.join("again");
        std::fs::create_dir_all(&d2).unwrap();
        std::fs::rename(d.join("out"), d2.join("previous")).unwrap();
        let (r, _) = run_stage(&DESCRIPTOR, run, params, &d2, &[]);
        assert_eq!(r.unwrap().metadata["records"], 6);
    }

    /// A file linked into a source folder is read, under the link's name; a link to a file
    /// the folder holds itself (Debian's `art.u8 -> art`) is read once, under the file's name
    /// even where the link sorts first; a link to nothing is an error naming it.
    #[test]
    fn links_in_a_source_folder_are_followed_once() {
        let d = tempdir("links");
        let folder = d.join("quotes");
        std::fs::create_dir_all(&folder).unwrap();
        write_fortunes(&d);
        std::fs::rename(d.join("en.txt"), folder.join("en")).unwrap();
        std::os::unix::fs::symlink("en", folder.join("a-first")).unwrap();
        std::os::unix::fs::symlink("en", folder.join("en.u8")).unwrap();
        std::os::unix::fs::symlink("../ru.txt", folder.join("ru")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::os::unix::fs::symlink("../sub", folder.join("sub")).unwrap();
        let params = serde_json::json!({"sources": [{"path": "quotes", "recursive": true}]});
        let p: IngestParams = serde_json::from_value(params.clone()).unwrap();
        let files = expand(&p, &d).unwrap();
        let names: Vec<&str> = files.iter().map(|(_, _, n)| n.as_str()).collect();
        assert_eq!(names, ["quotes/en", "quotes/ru"]);
        let deps = file_deps(&params, &d).unwrap();
        assert_eq!(deps.len(), 2, "{deps:?}");
        assert!(deps[1].ends_with("quotes/ru"), "{deps:?}");

        std::os::unix::fs::symlink("gone", folder.join("zz")).unwrap();
        let err = expand(&p, &d).unwrap_err();
        assert!(
            err.contains("quotes/zz is a link to gone, which cannot be read"),
            "{err}"
        );
    }

    #[test]
    fn output_is_byte_identical_across_runs() {
        let d = tempdir("determinism");
        write_fortunes(&d);
        let params = serde_json::json!({"sources": [{"path": "*.txt"}]});
        let (r, _) = run_stage(&DESCRIPTOR, run, params.clone(), &d, &[]);
        r.unwrap();
        let first = std::fs::read(d.join("out/data/part-00000.parquet")).unwrap();
        let (r, _) = run_stage(&DESCRIPTOR, run, params, &d, &[]);
        r.unwrap();
        assert_eq!(
            first,
            std::fs::read(d.join("out/data/part-00000.parquet")).unwrap()
        );
    }

    /// The `source` column of every row, in order.
    fn sources(out: &Path) -> Vec<String> {
        read_all(out)
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(|i| col(b, "source").value(i).to_string()))
            .collect()
    }

    /// Two checkouts in different folders, each reading files beside the pipeline's folder
    /// and a remote prefix (downloaded to each one's scratch), write the same bytes.
    #[test]
    fn output_does_not_depend_on_where_the_files_lie() {
        use object_store::{memory::InMemory, path::Path as ObjPath, ObjectStore, PutPayload};
        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(bucket.put(
                &ObjPath::from("team/quotes/ru/love"),
                PutPayload::from(&b"A remote record, read from S3.\n%\n"[..]),
            ))
            .unwrap();
        crate::remote::TEST_BUCKETS
            .with(|b| b.borrow_mut().insert("corpus".into(), bucket.clone()));
        let params = serde_json::json!({"sources": [
            {"path": "../datasets/one.txt", "format": "lines"},
            {"path": "../datasets/tree", "format": "lines", "recursive": true},
            {"path": "../datasets/*.jsonl", "format": "jsonl"},
            {"path": "s3://corpus/team/quotes/", "recursive": true},
        ]});
        let d = tempdir("checkouts");
        let mut outputs = Vec::new();
        for checkout in ["alice/repo", "bob/work/repo"] {
            let data = d.join(checkout).join("datasets");
            std::fs::create_dir_all(data.join("tree/sub")).unwrap();
            std::fs::write(data.join("one.txt"), "A local record in one file.\n").unwrap();
            std::fs::write(data.join("tree/sub/two.txt"), "A record deep in a tree.\n").unwrap();
            std::fs::write(
                data.join("three.jsonl"),
                "{\"text\": \"A record in JSON.\"}\n",
            )
            .unwrap();
            let pipelines = d.join(checkout).join("pipelines");
            std::fs::create_dir_all(&pipelines).unwrap();
            let (r, _) = run_stage(&DESCRIPTOR, run, params.clone(), &pipelines, &[]);
            r.unwrap();
            let out = pipelines.join("out");
            assert_eq!(
                sources(&out),
                [
                    "../datasets/one.txt",
                    "../datasets/tree/sub/two.txt",
                    "../datasets/three.jsonl",
                    "s3://corpus/team/quotes/ru/love",
                ]
            );
            outputs.push(std::fs::read(out.join("data/part-00000.parquet")).unwrap());
        }
        assert!(outputs[0] == outputs[1], "the two checkouts' shards differ");
        // Absolute paths are kept as written, with the file below them.
        let (r, _) = run_stage(
            &DESCRIPTOR,
            run,
            serde_json::json!({"sources": [
                {"path": d.join("alice/repo/datasets/tree").display().to_string(), "format": "lines", "recursive": true}
            ]}),
            &d,
            &[],
        );
        r.unwrap();
        assert_eq!(
            sources(&d.join("out")),
            [d.join("alice/repo/datasets/tree/sub/two.txt")
                .display()
                .to_string()]
        );
    }

    #[test]
    fn near_duplicates_fall_in_one_split() {
        let d = tempdir("near-duplicates");
        // Pairs that differ in case, punctuation and spacing only: exact deduplication keeps
        // both, and a pair split between train and test would reward memorising.
        let mut lines = String::new();
        for i in 0..300 {
            lines.push_str(&format!("Garbage In -- Gospel Out, rule number {i}.\n"));
            lines.push_str(&format!("garbage in, gospel out: rule  Number {i}\n"));
        }
        std::fs::write(d.join("pairs.txt"), lines).unwrap();
        let params = serde_json::json!({"sources": [{"path": "pairs.txt", "format": "lines", "lang": "en"}],
            "split": {"val": 0.3, "test": 0.3}});
        let (r, _) = run_stage(&DESCRIPTOR, run, params, &d, &[]);
        let m = r.unwrap().metadata;
        assert_eq!(m["records"], 600);
        let batches = read_all(&d.join("out"));
        let splits: Vec<&str> = batches
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(|i| col(b, "split").value(i)))
            .collect();
        for pair in splits.chunks(2) {
            assert_eq!(pair[0], pair[1], "{splits:?}");
        }
        // Every split still gets its share.
        for split in ["train", "val", "test"] {
            assert!(m["per_split"][split].as_u64().unwrap() > 100, "{m:?}");
        }
    }

    #[test]
    fn cyrillic_letters_lower_as_the_tables_do() {
        for c in (0x400..0x460u32).filter_map(char::from_u32) {
            let want: Vec<char> = c.to_lowercase().collect();
            assert_eq!(cyrillic_lower(c).map(|l| vec![l]), Some(want), "{c:?}");
            assert!(c.is_alphanumeric(), "{c:?}");
        }
        assert_eq!(cyrillic_lower('z'), None);
        assert_eq!(cyrillic_lower('\u{460}'), None);
    }

    #[test]
    fn split_is_stable_and_roughly_proportional() {
        let s = Split {
            val: 0.1,
            test: 0.1,
        };
        let mut counts = BTreeMap::new();
        for i in 0..20_000u64 {
            let v = split_hash(&format!("Record number {i}."), &mut String::new());
            *counts.entry(split_of(v, &s)).or_insert(0) += 1;
        }
        assert!((1700..2300).contains(&counts["val"]), "{counts:?}");
        assert!((1700..2300).contains(&counts["test"]), "{counts:?}");
        // Pinned: a change to the key (its letters, its case folding, the hash) would move
        // records between splits, and a model's test records into its training.
        let pinned: Vec<u64> = ["Record number 7.", "Ёжик в Тумане!", "ÉCOLE 42", "--"]
            .iter()
            .map(|t| split_hash(t, &mut String::new()))
            .collect();
        assert_eq!(
            pinned,
            [
                1_585_728_197_194_099_505,
                16_260_733_685_796_691_859,
                5_421_173_294_454_791_804,
                10_792_671_679_760_859_956
            ]
        );
    }

    #[test]
    fn an_empty_source_path_is_refused() {
        for path in ["", "  "] {
            let e = canonical(serde_json::json!({"sources": [{"path": "a.txt"}, {"path": path}]}))
                .unwrap_err();
            assert_eq!(
                e.path,
                vec![
                    PathSegment::Key("sources".into()),
                    PathSegment::Index(1),
                    PathSegment::Key("path".into())
                ],
                "{e}"
            );
        }
    }

    #[test]
    fn bad_params_are_named() {
        let e = canonical(
            serde_json::json!({"sources": [{"path": "x"}], "split": {"val": 0.6, "test": 0.5}}),
        )
        .unwrap_err();
        assert_eq!(e.path, vec![PathSegment::Key("split".into())]);
        let e = canonical(serde_json::json!({"sources": [{"path": "x", "format": "csv"}]}))
            .unwrap_err();
        assert!(
            matches!(e.problem, ParamProblem::Invalid(m) if m.contains("unknown variant `csv`"))
        );
    }
}
