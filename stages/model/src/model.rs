//! The encoder-decoder. Pre-norm transformer layers (burn's), learned positions, one token
//! embedding shared by encoder, decoder and the output projection (weight tying: it is what
//! brings the `mini` preset near the specification's 8M parameters).

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{
    TransformerDecoder, TransformerDecoderConfig, TransformerDecoderInput, TransformerEncoder,
    TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

/// Everything needed to rebuild the network; stored beside the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    pub d_ff: usize,
    /// Longest source or target sequence, in tokens.
    pub max_len: usize,
    pub dropout: f64,
}

impl ModelConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Seq2Seq<B> {
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let enc =
            TransformerEncoderConfig::new(self.d_model, self.d_ff, self.n_heads, self.enc_layers)
                .with_dropout(self.dropout)
                .with_norm_first(true);
        let dec =
            TransformerDecoderConfig::new(self.d_model, self.d_ff, self.n_heads, self.dec_layers)
                .with_dropout(self.dropout)
                .with_norm_first(true);
        let model = Seq2Seq {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(init.clone())
                .init(device),
            pos: EmbeddingConfig::new(self.max_len, self.d_model)
                .with_initializer(init)
                .init(device),
            encoder: enc.init(device),
            decoder: dec.init(device),
            enc_norm: LayerNormConfig::new(self.d_model).init(device),
            dec_norm: LayerNormConfig::new(self.d_model).init(device),
        };
        model.map(&mut StableIds(0))
    }

    /// Parameters, counted from the shapes (the tied output projection counted once).
    pub fn parameters(&self) -> usize {
        let d = self.d_model;
        let attn = 4 * (d * d + d);
        let ff = 2 * d * self.d_ff + self.d_ff + d;
        let norm = 2 * d;
        let enc = self.enc_layers * (attn + ff + 2 * norm);
        let dec = self.dec_layers * (2 * attn + ff + 3 * norm);
        self.vocab_size * d + self.max_len * d + enc + dec + 2 * norm
    }
}

/// burn gives each parameter a random id, and saves it with the weights: the same weights
/// would give different bytes, and so different artifact digests, run after run. Numbering
/// parameters in module order makes saved models byte-identical when their weights are.
struct StableIds(u64);

impl StableIds {
    fn next(&mut self) -> ParamId {
        self.0 += 1;
        ParamId::from(self.0)
    }
}

impl<B: Backend> ModuleMapper<B> for StableIds {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(self.next(), tensor, mapper)
    }

    fn map_int<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Int>>,
    ) -> Param<Tensor<B, D, Int>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(self.next(), tensor, mapper)
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Bool>>,
    ) -> Param<Tensor<B, D, Bool>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(self.next(), tensor, mapper)
    }
}

/// Casts every float parameter to a dtype, keeping its id. Under autodiff the cast is a
/// recorded operation: a loss computed with the cast copy sends its gradients back to the
/// original (f32) parameters, which is what mixed-precision training needs.
pub struct CastParams(pub FloatDType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.cast(self.0), mapper)
    }
}

#[derive(Module, Debug)]
pub struct Seq2Seq<B: Backend> {
    pub(crate) embed: Embedding<B>,
    pub(crate) pos: Embedding<B>,
    pub(crate) encoder: TransformerEncoder<B>,
    pub(crate) decoder: TransformerDecoder<B>,
    pub(crate) enc_norm: LayerNorm<B>,
    pub(crate) dec_norm: LayerNorm<B>,
}

impl<B: Backend> Seq2Seq<B> {
    pub fn d_model(&self) -> usize {
        self.embed.weight.dims()[1]
    }

    pub fn n_heads(&self) -> usize {
        self.decoder.n_heads
    }

    /// Longest source or target the position table covers.
    pub fn max_len(&self) -> usize {
        self.pos.weight.dims()[0]
    }

    /// Embeddings of one token per row, all at target position `pos`.
    pub(crate) fn embed_at(&self, tokens: Tensor<B, 2, Int>, pos: usize) -> Tensor<B, 3> {
        let d = self.d_model();
        let device = tokens.device();
        let position =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![pos as i64], [1, 1]), &device);
        self.embed.forward(tokens) * (d as f64).sqrt() + self.pos.forward(position)
    }

    fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let d = self.embed.weight.dims()[1];
        let positions = Tensor::<B, 1, Int>::arange(0..t as i64, &device)
            .reshape([1, t])
            .repeat_dim(0, b);
        self.embed.forward(tokens) * (d as f64).sqrt() + self.pos.forward(positions)
    }

    /// `src_pad` is true at padding.
    pub fn encode(&self, src: Tensor<B, 2, Int>, src_pad: Tensor<B, 2, Bool>) -> Tensor<B, 3> {
        let x = self.embed(src);
        self.enc_norm.forward(
            self.encoder
                .forward(TransformerEncoderInput::new(x).mask_pad(src_pad)),
        )
    }

    /// Logits `[batch, target, vocab]` for every target position.
    pub fn decode(
        &self,
        tgt: Tensor<B, 2, Int>,
        tgt_pad: Tensor<B, 2, Bool>,
        memory: Tensor<B, 3>,
        src_pad: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 3> {
        let [b, t] = tgt.dims();
        let causal = generate_autoregressive_mask::<B>(b, t, &tgt.device());
        let input = TransformerDecoderInput::new(self.embed(tgt), memory)
            .target_mask_pad(tgt_pad)
            .target_mask_attn(causal)
            .memory_mask_pad(src_pad);
        let h = self.dec_norm.forward(self.decoder.forward(input));
        self.project(h)
    }

    /// Hidden states to vocabulary logits through the (tied) embedding matrix.
    pub fn project(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = h.dims();
        let w = self.embed.weight.val();
        let vocab = w.dims()[0];
        h.reshape([b * t, d])
            .matmul(w.transpose())
            .reshape([b, t, vocab])
    }
}

/// Mean token cross-entropy over the non-padding targets, with optional label smoothing.
/// burn's `CrossEntropyLoss` averages over padding too, which makes the loss depend on how
/// much padding a batch has; this does not.
pub fn masked_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    pad: Tensor<B, 2, Bool>,
    real_tokens: usize,
    smoothing: f64,
) -> Tensor<B, 1> {
    let [b, t, _] = logits.dims();
    let logp = burn::tensor::activation::log_softmax(logits, 2);
    let nll = logp
        .clone()
        .gather(2, targets.reshape([b, t, 1]))
        .reshape([b, t])
        .neg();
    let per_token = if smoothing > 0.0 {
        let uniform = logp.mean_dim(2).reshape([b, t]).neg();
        nll * (1.0 - smoothing) + uniform * smoothing
    } else {
        nll
    };
    per_token.mask_fill(pad, 0.0).sum() / (real_tokens.max(1) as f64)
}
