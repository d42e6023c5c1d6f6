//! From corpus records to batches. An example is a record tokenised once; the split point
//! between source (the prompt) and target (its continuation) is drawn per training step, so
//! the model learns to continue from anywhere, and fixed at the middle for evaluation.
//!
//! Batches come from length buckets and are padded (see [`Padding`]), so a whole run sees
//! few distinct tensor shapes (each new shape costs kernel compiles on GPUs).

use std::collections::BTreeMap;
use std::path::Path;

use orchestrate_stage::StageError;
use tokenizers::Tokenizer;

/// Special tokens the model relies on, resolved from the tokenizer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Specials {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub langs: BTreeMap<String, u32>,
    pub authors: BTreeMap<String, u32>,
    pub other_author: u32,
}

impl Specials {
    /// Ids 0-3 for padding, begin, end and the other-author token, and no language or
    /// author tokens: for tests and benchmarks on generated token ids.
    pub fn minimal() -> Specials {
        Specials {
            pad: 0,
            bos: 1,
            eos: 2,
            langs: BTreeMap::new(),
            authors: BTreeMap::new(),
            other_author: 3,
        }
    }

    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Specials, StageError> {
        use orchestrate_corpus::bpe::{
            author_token, lang_token, BOS, EOS, LANGS, OTHER_AUTHOR, PAD,
        };
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                StageError::Failed(format!(
                    "the tokenizer has no `{t}` token: was it made by a `bpe` stage?"
                ))
            })
        };
        let mut langs = BTreeMap::new();
        for l in LANGS {
            langs.insert(l.to_string(), id(&lang_token(l))?);
        }
        let prefix = author_token("");
        let prefix = &prefix[..prefix.len() - 1];
        let authors = tok
            .get_added_tokens_decoder()
            .values()
            .filter_map(|t| {
                let name = t.content.strip_prefix(prefix)?.strip_suffix('>')?;
                (name != "other")
                    .then(|| (name.to_string(), tok.token_to_id(&t.content).unwrap_or(0)))
            })
            .collect();
        Ok(Specials {
            pad: id(PAD)?,
            bos: id(BOS)?,
            eos: id(EOS)?,
            langs,
            authors,
            other_author: id(OTHER_AUTHOR)?,
        })
    }

    pub fn lang(&self, lang: &str) -> u32 {
        self.langs
            .get(lang)
            .or_else(|| self.langs.get("other"))
            .copied()
            .unwrap_or(self.pad)
    }

    /// The token of `author`, or of `other` where it has none of its own.
    pub fn author(&self, author: Option<&str>) -> u32 {
        author
            .and_then(|a| self.author_id(a))
            .unwrap_or(self.other_author)
    }

    /// The token of `author` written as its token is named, or as another spelling of that
    /// name (case, spaces: `mark twain` for `<author:Mark Twain>`, see
    /// [`orchestrate_corpus::bpe::same_author`]); None where the model has none.
    pub fn author_id(&self, author: &str) -> Option<u32> {
        use orchestrate_corpus::bpe::same_author;
        self.authors.get(author).copied().or_else(|| {
            self.authors
                .iter()
                .find(|(name, _)| same_author(name, author))
                .map(|(_, &id)| id)
        })
    }
}

/// A tokenised record with its control tokens.
#[derive(Clone, Debug)]
pub struct Example {
    pub control: [u32; 2],
    pub ids: Vec<u32>,
    /// The record went on past `ids` (cut to fit `max_len`): its target ends without eos,
    /// or the model would learn to stop wherever a long record happened to be cut.
    pub truncated: bool,
}

/// Tokens a record must encode to at least to be an example: one to read, one to predict.
pub const MIN_EXAMPLE_TOKENS: usize = 2;

pub fn load_examples(
    corpus: &Path,
    split: &str,
    tok: &Tokenizer,
    specials: &Specials,
    max_len: usize,
    limit: Option<usize>,
) -> Result<Vec<Example>, StageError> {
    let mut records = orchestrate_corpus::read_split(corpus, split)?;
    if let Some(n) = limit {
        records.truncate(n);
    }
    let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
    // Text is text: a record saying `<eos>` is not an end, as a prompt saying it is not
    // (the server encodes user text the same way).
    let encoded = crate::artifact::text_only(tok)
        .encode_batch(texts, false)
        .map_err(|e| StageError::Failed(format!("tokenizing the {split} split: {e}")))?;
    // Room for the two control tokens and bos/eos around the longest possible halves.
    let keep = max_len.saturating_sub(3).max(2);
    Ok(records
        .iter()
        .zip(encoded)
        .filter(|(_, e)| e.get_ids().len() >= MIN_EXAMPLE_TOKENS)
        .map(|(r, e)| {
            let mut ids = e.get_ids().to_vec();
            let truncated = ids.len() > keep;
            ids.truncate(keep);
            Example {
                control: [specials.lang(&r.lang), specials.author(r.author.as_deref())],
                ids,
                truncated,
            }
        })
        .collect())
}

/// A padded batch, row-major, ready to become tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    pub src: Vec<i64>,
    pub src_pad: Vec<bool>,
    pub tgt_in: Vec<i64>,
    pub tgt_out: Vec<i64>,
    pub tgt_pad: Vec<bool>,
    /// Non-padding target tokens: what the loss averages over.
    pub tokens: usize,
}

/// How far a batch's source and target lengths are padded.
///
/// On the CPU every padded position costs compute, so lengths round up to a multiple of 16
/// (at most 15 wasted positions). On a GPU the cost is the other way round: compute is cheap
/// but every new tensor shape makes CubeCL compile and autotune kernels (seconds per shape,
/// measured: ~6 s per training step that met a new shape on an H100), so lengths round up
/// to a power of two: the real corpus's batches then take about half a dozen shapes instead
/// of a few dozen, at up to twice the padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    Multiple16,
    PowerOfTwo,
}

impl Rounding {
    /// The rounding for where the model runs.
    pub fn for_compute(compute: crate::compute::Compute) -> Rounding {
        match compute {
            crate::compute::Compute::Cpu => Rounding::Multiple16,
            crate::compute::Compute::Cuda(_) => Rounding::PowerOfTwo,
        }
    }

    /// Padding for a model whose position table has `max_len` rows.
    pub fn within(self, max_len: usize) -> Padding {
        Padding {
            rounding: self,
            max_len,
        }
    }
}

/// A [`Rounding`] that never pads past the model's position table: a `max_len` that is not
/// a multiple of 16 (or a power of two on a GPU) would otherwise give the longest batches
/// positions the table does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding {
    pub rounding: Rounding,
    pub max_len: usize,
}

impl Padding {
    /// `n` positions padded: rounded up (never below 16), but not past `max_len` (nor
    /// below `n`: sequences are cut to fit the table before they get here).
    pub fn pad(self, n: usize) -> usize {
        let rounded = match self.rounding {
            Rounding::Multiple16 => round_up(n.max(1), 16),
            Rounding::PowerOfTwo => n.max(16).next_power_of_two(),
        };
        rounded.min(self.max_len).max(n)
    }
}

/// `examples` cut into `n` batches of near-equal rows (data-parallel shards), each split
/// where `split_at(i, len)` says for its `i`-th row of the whole list.
pub fn shards(
    examples: &[&Example],
    n: usize,
    specials: &Specials,
    padding: Padding,
    mut split_at: impl FnMut(usize, usize) -> usize,
) -> Vec<Batch> {
    let n = n.clamp(1, examples.len().max(1));
    let per = examples.len().div_ceil(n);
    examples
        .chunks(per.max(1))
        .enumerate()
        .map(|(c, rows)| make_batch(rows, specials, padding, |i, len| split_at(c * per + i, len)))
        .collect()
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Builds a batch; `split_at(i, len)` picks where example `i` is cut into prompt and target.
pub fn make_batch(
    examples: &[&Example],
    specials: &Specials,
    padding: Padding,
    mut split_at: impl FnMut(usize, usize) -> usize,
) -> Batch {
    let pieces: Vec<(Vec<u32>, Vec<u32>, bool)> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let k = split_at(i, e.ids.len()).clamp(1, e.ids.len() - 1);
            let mut src = e.control.to_vec();
            src.extend_from_slice(&e.ids[..k]);
            (src, e.ids[k..].to_vec(), e.truncated)
        })
        .collect();
    let src_len = padding.pad(pieces.iter().map(|p| p.0.len()).max().unwrap_or(1));
    let tgt_len = padding.pad(pieces.iter().map(|p| p.1.len() + 1).max().unwrap_or(1));
    let rows = examples.len();
    let pad = specials.pad as i64;
    let mut b = Batch {
        rows,
        src_len,
        tgt_len,
        src: vec![pad; rows * src_len],
        src_pad: vec![true; rows * src_len],
        tgt_in: vec![pad; rows * tgt_len],
        tgt_out: vec![pad; rows * tgt_len],
        tgt_pad: vec![true; rows * tgt_len],
        tokens: 0,
    };
    for (r, (src, tgt, truncated)) in pieces.iter().enumerate() {
        for (j, &t) in src.iter().enumerate() {
            b.src[r * src_len + j] = t as i64;
            b.src_pad[r * src_len + j] = false;
        }
        // Input: bos + target; output: target + eos (teacher forcing, shifted by one). A cut
        // record's target has no end to predict: its last token is predicted, not followed.
        let mut input = vec![specials.bos];
        let mut output = tgt.clone();
        if *truncated {
            input.extend_from_slice(&tgt[..tgt.len() - 1]);
        } else {
            input.extend_from_slice(tgt);
            output.push(specials.eos);
        }
        for j in 0..output.len() {
            b.tgt_in[r * tgt_len + j] = input[j] as i64;
            b.tgt_out[r * tgt_len + j] = output[j] as i64;
            b.tgt_pad[r * tgt_len + j] = false;
        }
        b.tokens += output.len();
    }
    b
}

/// SplitMix64: a tiny, well-mixed generator whose whole state is one number, so a training
/// run's randomness is a pure function of (seed, step) and survives a restart exactly.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The batches of one epoch: examples grouped by length (so padding stays small), shuffled
/// within groups, cut into batches, and the batches shuffled; all from `seed` and `epoch`.
pub fn epoch_plan(examples: &[Example], batch: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let key = |i: usize| mix(seed ^ mix(epoch) ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    order.sort_by_key(|&i| (examples[i].ids.len().div_ceil(32), key(i)));
    let mut batches: Vec<Vec<usize>> = order.chunks(batch).map(<[usize]>::to_vec).collect();
    batches.sort_by_key(|b| mix(key(b[0]) ^ 0xA5A5));
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU: Padding = Padding {
        rounding: Rounding::Multiple16,
        max_len: 256,
    };
    const GPU: Padding = Padding {
        rounding: Rounding::PowerOfTwo,
        max_len: 256,
    };

    fn specials() -> Specials {
        Specials {
            other_author: 7,
            ..Specials::minimal()
        }
    }

    #[test]
    fn batch_shifts_targets_and_pads_to_sixteen() {
        let e = Example {
            control: [4, 7],
            ids: vec![10, 11, 12, 13],
            truncated: false,
        };
        let b = make_batch(&[&e], &specials(), CPU, |_, _| 2);
        assert_eq!((b.src_len, b.tgt_len), (16, 16));
        assert_eq!(&b.src[..4], &[4, 7, 10, 11]);
        assert_eq!(&b.tgt_in[..3], &[1, 12, 13]);
        assert_eq!(&b.tgt_out[..3], &[12, 13, 2]);
        assert_eq!(b.tokens, 3);
        assert!(b.tgt_pad[3] && !b.tgt_pad[2]);
    }

    #[test]
    fn a_cut_record_has_no_eos_to_learn() {
        let e = Example {
            control: [4, 7],
            ids: vec![10, 11, 12, 13],
            truncated: true,
        };
        let b = make_batch(&[&e], &specials(), CPU, |_, _| 2);
        assert_eq!(&b.tgt_in[..2], &[1, 12]);
        assert_eq!(&b.tgt_out[..2], &[12, 13]);
        assert_eq!(b.tokens, 2);
        assert!(b.tgt_pad[2] && !b.tgt_pad[1]);
    }

    #[test]
    fn gpu_padding_takes_powers_of_two() {
        let e = Example {
            control: [4, 7],
            ids: (10..50).collect(),
            truncated: false,
        };
        // Source: 2 control tokens + 30 ids; target: 10 ids + eos.
        let cpu = make_batch(&[&e], &specials(), CPU, |_, _| 30);
        let gpu = make_batch(&[&e], &specials(), GPU, |_, _| 30);
        assert_eq!((cpu.src_len, cpu.tgt_len), (32, 16));
        assert_eq!((gpu.src_len, gpu.tgt_len), (32, 16));
        let gpu = make_batch(&[&e], &specials(), GPU, |_, _| 31);
        assert_eq!(gpu.src_len, 64);
        assert_eq!(gpu.tokens, cpu.tokens - 1);
        assert_eq!(
            (1..=256)
                .map(|n| GPU.pad(n))
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            5
        );
        assert_eq!(CPU.pad(0), 16);
    }

    #[test]
    fn padding_stays_within_the_position_table() {
        // The longest example a 250-position model takes: 247 ids (room for the control
        // tokens, bos and eos). Rounded up, its source would need 256 positions.
        let e = Example {
            control: [4, 7],
            ids: (0..247).map(|i| 10 + i % 30).collect(),
            truncated: false,
        };
        for rounding in [Rounding::Multiple16, Rounding::PowerOfTwo] {
            let b = make_batch(&[&e], &specials(), rounding.within(250), |_, _| 240);
            // Source: 2 control tokens + 240 ids; target: 7 ids + eos.
            assert_eq!((b.src_len, b.tgt_len), (250, 16), "{rounding:?}");
        }
        assert_eq!(Rounding::Multiple16.within(250).pad(242), 250);
        assert_eq!(Rounding::PowerOfTwo.within(300).pad(290), 300);
        assert_eq!(Rounding::PowerOfTwo.within(8).pad(6), 8);
        assert_eq!(Rounding::Multiple16.within(256).pad(200), 208);
    }

    #[test]
    fn epoch_plan_is_a_deterministic_permutation() {
        let ex: Vec<Example> = (0..50)
            .map(|i| Example {
                control: [0, 0],
                ids: vec![1; 2 + i % 40],
                truncated: false,
            })
            .collect();
        let a = epoch_plan(&ex, 8, 42, 0);
        assert_eq!(a, epoch_plan(&ex, 8, 42, 0));
        assert_ne!(a, epoch_plan(&ex, 8, 42, 1));
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
    }
}
