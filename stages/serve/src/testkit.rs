//! For the tests beside the code: a tiny untrained Model artifact, and a live server on it.
//! Its tokenizer is a byte-level BPE laid out as `bpe` makes them: the control tokens
//! (ids 0-8), one token per byte (id 9 + the byte), then `Ġi` and `Ġis` (" is").

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::Flex;
use orchestrate_model::artifact::{self, ModelCard};
use orchestrate_model::data::Specials;
use orchestrate_model::model::{Activation, ModelConfig, Seq2Seq};
use orchestrate_model::weights::{self, Scheme};
use orchestrate_model::Tokenizer;
use serde_json::{json, Value};

use crate::ServeOptions;

pub const SPECIALS: [&str; 9] = [
    "<pad>",
    "<bos>",
    "<eos>",
    "<unk>",
    "<lang:ru>",
    "<lang:en>",
    "<lang:other>",
    "<author:other>",
    "<author:twain>",
];

/// The token of one byte.
pub fn byte(b: u8) -> u32 {
    SPECIALS.len() as u32 + b as u32
}

/// The tokens of `text`, a byte each.
pub fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(byte).collect()
}

/// GPT-2's byte-level alphabet: the symbol that stands for `b` in the vocabulary.
fn byte_symbol(b: u8) -> char {
    let printable = |b: u32| matches!(b, 33..=126 | 161..=172 | 174..=255);
    let b = b as u32;
    let code = match printable(b) {
        true => b,
        false => 256 + (0..b).filter(|x| !printable(*x)).count() as u32,
    };
    char::from_u32(code).expect("below U+0200")
}

pub fn tokenizer() -> Tokenizer {
    tokenizer_with(&[])
}

/// [`tokenizer`] with a token for each of `extra`'s byte strings after its own, ids 267
/// onwards (a token may end inside a character, as byte-level ones do).
pub fn tokenizer_with(extra: &[&[u8]]) -> Tokenizer {
    let vocab: serde_json::Map<String, Value> = SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain((0..=255).map(|b| byte_symbol(b).to_string()))
        .chain(["Ġi".to_string(), "Ġis".to_string()])
        .chain(
            extra
                .iter()
                .map(|bytes| bytes.iter().map(|&b| byte_symbol(b)).collect()),
        )
        .enumerate()
        .map(|(id, t)| (t, json!(id)))
        .collect();
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab,
            "merges": ["Ġ i", "Ġi s"]},
    })
    .to_string()
    .parse()
    .expect("a valid tokenizer")
}

/// The Model artifact, written once per test process.
pub fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        const PREFIX: &str = "orchestrate-serve-tests-";
        // A static outlives every test, so nothing removes it at exit: each test process
        // removes those of earlier ones, whose process is gone, instead.
        for entry in std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(PREFIX) {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tok = tokenizer();
        let config = ModelConfig {
            vocab_size: tok.get_vocab_size(true),
            d_model: 16,
            n_heads: 2,
            enc_layers: 1,
            dec_layers: 1,
            d_ff: 32,
            max_len: 64,
            dropout: 0.0,
            activation: Activation::Relu,
        };
        // Seeded: the tests read what it says (one needs some text from a prompt), and an
        // unseeded draw made them pass or fail by chance.
        let model: Seq2Seq<Flex> = config.init_seeded(7, &Default::default());
        weights::save(
            &dir.join(artifact::SAFETENSORS),
            &weights::export(&model),
            Scheme::Fp32,
            64,
        )
        .unwrap();
        tok.save(dir.join(artifact::TOKENIZER), false).unwrap();
        let card = ModelCard {
            preset: json!("test"),
            parameters: config.parameters(),
            config,
            specials: Specials::from_tokenizer(&tok).unwrap(),
            tokenizer_digest: "blake3:test".into(),
            quantization: Scheme::Fp32,
        };
        std::fs::write(dir.join(artifact::CARD), serde_json::to_vec(&card).unwrap()).unwrap();
        dir
    })
}

/// Options for a test server: one decoder, any free loopback port.
pub fn options() -> ServeOptions {
    ServeOptions {
        host: "127.0.0.1".into(),
        port: 0,
        name: "tiny".into(),
        workers: 1,
        ..ServeOptions::default()
    }
}

/// A live server on the test model, until `stop`.
pub struct Server {
    pub base: String,
    http: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Server {
    pub async fn start(opts: ServeOptions) -> Server {
        let (ready, addr) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            let ready = |a| {
                let _ = ready.send(a);
            };
            crate::serve(model_dir(), &opts, ready, shutdown)
                .await
                .map_err(String::from)
        });
        let addr = addr.await.expect("the test server started");
        Server {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            stop,
            task,
        }
    }

    /// Status and body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// A GET's JSON answer, which must be a 200.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.json().await.unwrap()
    }

    /// A JSON answer that must be a 200.
    pub async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// A request that must be refused as OpenAI refuses a bad parameter (400,
    /// `invalid_request_error`), naming `param`.
    pub async fn refused(&self, path: &str, body: Value, param: &str) {
        let (status, text) = self.post(path, body).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (
                status,
                v["error"]["param"].as_str(),
                v["error"]["type"].as_str()
            ),
            (400, Some(param), Some("invalid_request_error")),
            "{text}"
        );
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// The JSON payloads of a server-sent event stream (OpenAI's `[DONE]` left out).
pub fn events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}
