//! Multi-head attention's core as one step (see the module's documentation).

use super::*;

/// Multi-head attention's core, `context = dropout(softmax(q k^T / root + bias)) v` for
/// every head, as one step on the CPU. `q` `[batch, query, d]`, `k` and `v` `[batch, key,
/// d]` are the projections as the linear layers write them (heads side by side in `d`);
/// `bias` `[batch or 1, 1, query or 1, key]`; `keep` the dropout's mask (None: no dropout),
/// asked for only on the fused path. Each (batch, head) pair is one task: its products read
/// and write the heads in place through strides (burn's composition copies every head
/// split into `[batch, heads, time, dk]` and back, forward and backward), and its scores
/// are softmaxed while they are in cache. Backward, from the saved softmax:
/// `dP = G V^T`, `dZ = y * (dP * mask - sum(dP * mask * y)) / root`, `dQ = dZ K`,
/// `dK = dZ^T Q`, `dV = P^T G`. `Err` gives the inputs back where the step does not apply
/// (another backend, not f32); the caller then composes burn's operations.
#[allow(clippy::type_complexity)]
pub fn attention<B: Backend>(
    [q, k, v]: [Tensor<B, 3>; 3],
    heads: usize,
    root: f32,
    bias: &Tensor<B, 4>,
    keep: impl FnOnce() -> Option<KeepMask>,
) -> Result<Tensor<B, 3>, [Tensor<B, 3>; 3]> {
    let Some(path) = path::<B>() else {
        return Err([q, k, v]);
    };
    let [b, t, d] = q.dims();
    let [kb, s, kd] = k.dims();
    let [bb, one, bt, bs] = bias.dims();
    let fits = b > 0
        && t > 0
        && s > 0
        && heads > 0
        && kb == b
        && kd == d
        && v.dims() == [b, s, d]
        && d % heads == 0
        && (bb == b || bb == 1)
        && one == 1
        && (bt == t || bt == 1)
        && bs == s;
    let f32s = [q.dtype(), k.dtype(), v.dtype(), bias.dtype()]
        .iter()
        .all(|&dtype| dtype == DType::F32);
    if !fits || !f32s {
        return Err([q, k, v]);
    }
    let geometry = Heads {
        batch: b,
        heads,
        query: t,
        key: s,
        dk: d / heads,
        root,
        bias_per_batch: bb > 1,
        bias_per_query: bt > 1,
    };
    Ok(match path {
        Path::Forward => {
            let [q, k, v] = [q, k, v].map(|x| to_concrete::<B, FlexTensor, 3>(x).to_contiguous());
            let bias: FlexTensor = to_concrete(bias.clone());
            let saved = geometry.forward([&q, &k, &v], &bias.to_contiguous(), None);
            from_concrete(saved.context)
        }
        Path::Autodiff { balanced } => {
            let inputs = [q, k, v].map(to_concrete::<B, AutodiffTensor, 3>);
            let bias: AutodiffTensor = to_concrete(bias.clone());
            let bias = bias.primitive.to_contiguous();
            let mask = keep();
            let out = if balanced {
                fused_attention::<BalancedCheckpointing>(inputs, &bias, mask, geometry)
            } else {
                fused_attention::<NoCheckpointing>(inputs, &bias, mask, geometry)
            };
            from_concrete(out)
        }
    })
}

/// The shapes of one attention: `batch * heads` independent products.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) query: usize,
    pub(crate) key: usize,
    pub(crate) dk: usize,
    pub(crate) root: f32,
    /// The bias has a row per batch row / per query position (else one, broadcast).
    pub(crate) bias_per_batch: bool,
    pub(crate) bias_per_query: bool,
}

/// What the forward pass computes and the backward pass needs.
pub(crate) struct Attended {
    pub(crate) context: FlexTensor,
    /// The softmax, `[batch, heads, query, key]`.
    pub(crate) y: Vec<f32>,
    /// The weights applied to `v` (`y` times the dropout mask); None when there is no mask.
    pub(crate) p: Option<Vec<f32>>,
}

impl Heads {
    /// The bias row added to query `ti`'s scores in batch row `bi`.
    fn bias_row(&self, bi: usize, ti: usize) -> usize {
        let batch = if self.bias_per_batch { bi } else { 0 };
        if self.bias_per_query {
            batch * self.query + ti
        } else {
            batch
        }
    }

    fn d(&self) -> usize {
        self.heads * self.dk
    }

    /// Head `hh` of batch row `bi` of a `[batch, len, d]` tensor: `len` rows of `dk`.
    fn head<'a>(&self, x: &'a [f32], len: usize, bi: usize, hh: usize) -> Operand<'a> {
        Operand {
            values: &x[bi * len * self.d() + hh * self.dk..],
            rs: self.d() as isize,
            cs: 1,
        }
    }

    /// `dst`'s head `hh` of batch row `bi` (`len` rows of `dk`, row stride `d`) `= lhs · rhs`.
    ///
    /// # Safety
    /// `dst` is a `[batch, len, d]` buffer, and no other task writes this (bi, hh) head.
    unsafe fn product_into_head(
        &self,
        dst: Shared,
        len: usize,
        (bi, hh): (usize, usize),
        inner: usize,
        lhs: Operand,
        rhs: Operand,
    ) {
        lhs.check(len, inner);
        rhs.check(inner, self.dk);
        let offset = bi * len * self.d() + hh * self.dk;
        let shape = [len, inner, self.dk];
        // SAFETY: the head's elements lie inside the buffer; the caller owns them alone.
        unsafe {
            gemm_raw(
                dst.at(offset),
                self.d(),
                false,
                shape,
                lhs,
                rhs,
                gemm::Parallelism::None,
            );
        }
    }

    fn forward(
        &self,
        [q, k, v]: [&FlexTensor; 3],
        bias: &FlexTensor,
        mask: Option<KeepMask>,
    ) -> Attended {
        let (t, s, d) = (self.query, self.key, self.d());
        let (qs, ks, vs) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
        let bias = bias.storage::<f32>();
        let (slices, area) = (self.batch * self.heads, t * s);
        // Every value of these is written below, once, by the task of its (batch, head).
        let mut y: Vec<f32> = Vec::with_capacity(slices * area);
        let mut p: Option<Vec<f32>> = mask.map(|_| Vec::with_capacity(slices * area));
        let mut context: Vec<f32> = Vec::with_capacity(self.batch * t * d);
        let (ys, ps) = (
            Shared(y.as_mut_ptr()),
            p.as_mut().map(|p| Shared(p.as_mut_ptr())),
        );
        let out = Shared(context.as_mut_ptr());
        (0..slices).into_par_iter().for_each(|slice| {
            let (bi, hh) = (slice / self.heads, slice % self.heads);
            let qh = self.head(qs, t, bi, hh);
            let kh = self.head(ks, s, bi, hh);
            // SAFETY: this task alone touches slice `slice` of `y`, written whole here
            // before it is read.
            let scores = unsafe {
                let at = ys.at(slice * area);
                let shape = [t, self.dk, s];
                gemm_raw(
                    at,
                    s,
                    false,
                    shape,
                    qh,
                    kh.transpose(),
                    gemm::Parallelism::None,
                );
                std::slice::from_raw_parts_mut(at, area)
            };
            for (ti, row) in scores.chunks_mut(s).enumerate() {
                let add = &bias[self.bias_row(bi, ti) * s..][..s];
                rowmath::softmax(row, add, 1.0 / self.root);
            }
            let weights: &[f32] = match (ps, mask) {
                // SAFETY: as for `y`, this task's slice of `p`, written whole first.
                (Some(ps), Some(mask)) => unsafe {
                    let at = ps.at(slice * area);
                    std::ptr::copy_nonoverlapping(scores.as_ptr(), at, area);
                    let dropped = std::slice::from_raw_parts_mut(at, area);
                    mask.apply_from(slice * area, dropped);
                    dropped
                },
                _ => scores,
            };
            let pw = Operand {
                values: weights,
                rs: s as isize,
                cs: 1,
            };
            let vh = self.head(vs, s, bi, hh);
            // SAFETY: this task alone writes head (bi, hh) of the context.
            unsafe { self.product_into_head(out, t, (bi, hh), s, pw, vh) };
        });
        // SAFETY: every slice of `y` and `p`, and every head of the context, was written.
        unsafe {
            y.set_len(slices * area);
            context.set_len(self.batch * t * d);
            if let Some(p) = &mut p {
                p.set_len(slices * area);
            }
        }
        let context = FlexTensor::from_data(TensorData::new(context, [self.batch, t, d]));
        Attended { context, y, p }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct AttentionState {
    pub(crate) q: FlexTensor,
    pub(crate) k: FlexTensor,
    pub(crate) v: FlexTensor,
    pub(crate) y: Arc<Vec<f32>>,
    pub(crate) p: Option<Arc<Vec<f32>>>,
    pub(crate) mask: Option<KeepMask>,
    pub(crate) geometry: Heads,
}

#[derive(Debug)]
pub(crate) struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let h = st.geometry;
        let (t, s, d) = (h.query, h.key, h.d());
        let (qs, ks, vs, gs) = (
            st.q.storage::<f32>(),
            st.k.storage::<f32>(),
            st.v.storage::<f32>(),
            g.storage::<f32>(),
        );
        let p = st.p.as_deref().unwrap_or(&st.y);
        // Every head of these is written below, once, by its task.
        let mut dq: Vec<f32> = Vec::with_capacity(h.batch * t * d);
        let mut dk: Vec<f32> = Vec::with_capacity(h.batch * s * d);
        let mut dv: Vec<f32> = Vec::with_capacity(h.batch * s * d);
        let (dq_out, dk_out, dv_out) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        (0..h.batch * h.heads).into_par_iter().for_each_init(
            || vec![0f32; t * s],
            |dz, slice| {
                let (bi, hh) = (slice / h.heads, slice % h.heads);
                let at = slice * t * s;
                let (y, p) = (&st.y[at..][..t * s], &p[at..][..t * s]);
                let gh = h.head(gs, t, bi, hh);
                let (qh, kh, vh) = (
                    h.head(qs, t, bi, hh),
                    h.head(ks, s, bi, hh),
                    h.head(vs, s, bi, hh),
                );
                // dV = P^T G
                let pt = Operand {
                    values: p,
                    rs: 1,
                    cs: s as isize,
                };
                // SAFETY: each task writes only its own (bi, hh) head of dq, dk and dv.
                unsafe { h.product_into_head(dv_out, s, (bi, hh), t, pt, gh) };
                // dP = G V^T, then the softmax's (and dropout's, and scale's) backward.
                gemm_into(dz, false, [t, h.dk, s], gh, vh.transpose());
                if let Some(mask) = st.mask {
                    mask.apply_from(at, dz);
                }
                let scale = 1.0 / h.root;
                for (g, y) in dz.chunks_mut(s).zip(y.chunks(s)) {
                    let dot = rowmath::dot(g, y);
                    for (g, &y) in g.iter_mut().zip(y) {
                        *g = y * (*g - dot) * scale;
                    }
                }
                let z = Operand {
                    values: dz,
                    rs: s as isize,
                    cs: 1,
                };
                unsafe {
                    h.product_into_head(dq_out, t, (bi, hh), s, z, kh);
                    h.product_into_head(dk_out, s, (bi, hh), t, z.transpose(), qh);
                }
            },
        );
        // SAFETY: the (batch, head) tasks wrote every head of the three.
        unsafe {
            dq.set_len(h.batch * t * d);
            dk.set_len(h.batch * s * d);
            dv.set_len(h.batch * s * d);
        }
        for (node, grad, len) in [(q_node, dq, t), (k_node, dk, s), (v_node, dv, s)] {
            if let Some(node) = node {
                let grad = FlexTensor::from_data(TensorData::new(grad, [h.batch, len, d]));
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

pub(crate) fn fused_attention<C: CheckpointStrategy>(
    [q, k, v]: [AutodiffTensor; 3],
    bias: &FlexTensor,
    mask: Option<KeepMask>,
    geometry: Heads,
) -> AutodiffTensor {
    let (qc, kc, vc) = (
        q.primitive.to_contiguous(),
        k.primitive.to_contiguous(),
        v.primitive.to_contiguous(),
    );
    let Attended { context, y, p } = geometry.forward([&qc, &kc, &vc], bias, mask);
    // Compute-bound: the softmax is kept for the backward pass rather than recomputed, under
    // gradient checkpointing too (it is the state).
    let prep = AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => {
            let state = AttentionState {
                q: qc,
                k: kc,
                v: vc,
                y: Arc::new(y),
                p: p.map(Arc::new),
                mask,
                geometry,
            };
            prep.finish(state, context)
        }
        OpsKind::UnTracked(prep) => prep.finish(context),
    }
}
