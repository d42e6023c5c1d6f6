//! Linear layers' and the output projection's products, and the raw `gemm` calls under
//! them.

use super::*;

/// `x · w (+ bias)` for rows `x` `[m, k]`: `w` `[k, n]`, or `[n, k]` used transposed
/// (`transposed`, the tied embedding's output projection), `bias` `[n]`. One step on the
/// CPU: the bias is the product's starting value, and every output (forward and backward)
/// is written into a fresh buffer of this step's own. burn-flex's product allocates its
/// output as bytes and then copies them into an aligned buffer (a zeroed buffer written
/// twice, for every product of a step); its bias is a separate broadcast addition, and its
/// bias gradient another sum. `None` where the step does not apply (another backend, not
/// f32); the caller then composes burn's operations.
pub fn product<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    transposed: bool,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    let path = path::<B>()?;
    let f32 = |dtype| dtype == DType::F32;
    if !f32(x.dtype()) || !f32(w.dtype()) || bias.is_some_and(|b| !f32(b.dtype())) {
        return None;
    }
    let [m, k] = x.dims();
    let [wr, wc] = w.dims();
    let n = if transposed { wr } else { wc };
    if (if transposed { wc } else { wr }) != k || bias.is_some_and(|b| b.dims()[0] != n) {
        return None;
    }
    let shape = Product {
        m,
        k,
        n,
        transposed,
    };
    Some(match path {
        Path::Forward => {
            let x: FlexTensor = to_concrete(x.clone());
            let w: FlexTensor = to_concrete(w.clone());
            let b = bias.map(|b| to_concrete::<B, FlexTensor, 1>(b.clone()).to_contiguous());
            let y = shape.forward(&x.to_contiguous(), &w.to_contiguous(), b.as_ref());
            from_concrete(y)
        }
        Path::Autodiff { balanced } => {
            let x: AutodiffTensor = to_concrete(x.clone());
            let w: AutodiffTensor = to_concrete(w.clone());
            let b = bias.map(|b| to_concrete::<B, AutodiffTensor, 1>(b.clone()));
            let y = if balanced {
                fused_product::<BalancedCheckpointing>(x, w, b, shape)
            } else {
                fused_product::<NoCheckpointing>(x, w, b, shape)
            };
            from_concrete(y)
        }
    })
}

/// One product's shape: `[m, k] · [k, n]`, the weight stored `[n, k]` when `transposed`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) n: usize,
    pub(crate) transposed: bool,
}

/// A row-major matrix operand: its start and its (row, column) strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub(crate) values: &'a [f32],
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

impl<'a> Operand<'a> {
    /// Panics unless the operand holds every element of a `rows` x `cols` matrix at its
    /// strides: what makes the products below safe to call with any operands.
    pub(crate) fn check(&self, rows: usize, cols: usize) {
        if rows == 0 || cols == 0 {
            return;
        }
        assert!(self.rs >= 0 && self.cs >= 0, "negative strides");
        let last = (rows - 1) * self.rs as usize + (cols - 1) * self.cs as usize;
        assert!(last < self.values.len(), "a product's operand is too short");
    }

    /// Contiguous rows of `width` values.
    pub(crate) fn rows(values: &'a [f32], width: usize) -> Self {
        Self {
            values,
            rs: width as isize,
            cs: 1,
        }
    }

    pub(crate) fn transpose(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst [m, n] (row stride dst_rs) = (dst if accumulate) + lhs [m, k] · rhs [k, n]`. Without
/// `accumulate` the product never reads `dst` (it may be uninitialised).
///
/// The sum over `k` runs in blocks of [`K_BLOCK`] at most, each summed from zero and then
/// added to `dst`, whatever the machine. gemm would size its blocks from the L1 cache it
/// finds (512 on a 32 KiB 8-way L1, 1024 on a 48 KiB 12-way one), and a block boundary is
/// a rounding: machines sharing a store would then disagree on a training's bytes (and a
/// run resumed on another machine would not end as an uninterrupted one). A call with at
/// most 512 values of `k` is one block on every cache, so the products are cut here.
///
/// # Safety
/// The operands hold every element their shape and strides address, `dst` every element
/// of `m` rows of `n` at stride `dst_rs`, and nothing else accesses those meanwhile.
pub(crate) unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    [m, k, n]: [usize; 3],
    lhs: Operand,
    rhs: Operand,
    parallelism: gemm::Parallelism,
) {
    for (i, (start, len)) in k_blocks(k).enumerate() {
        // SAFETY: the caller's promise; block `i` addresses columns `start..start + len` of
        // `lhs` and the same rows of `rhs`, inside the operands the caller vouched for.
        unsafe {
            gemm::gemm(
                m,
                n,
                len,
                dst,
                1,
                dst_rs as isize,
                accumulate || i > 0,
                lhs.values.as_ptr().offset(start as isize * lhs.cs),
                lhs.cs,
                lhs.rs,
                rhs.values.as_ptr().offset(start as isize * rhs.rs),
                rhs.cs,
                rhs.rs,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// The most values of `k` one gemm call sums: gemm never cuts a call of at most this many
/// (its smallest block, whatever the cache).
pub(crate) const K_BLOCK: usize = 512;

/// `(start, len)` of each block of `0..k`: as few blocks as [`K_BLOCK`] allows, of equal
/// length but the last (gemm's own division, so on a cache where gemm chose 512 the bytes
/// are what they were). `k` 0 is one empty block: the product then sets `dst` to 0.
pub(crate) fn k_blocks(k: usize) -> impl Iterator<Item = (usize, usize)> {
    let blocks = k.div_ceil(K_BLOCK).max(1);
    let len = k.div_ceil(blocks);
    (0..blocks).map(move |i| (i * len, len.min(k - (i * len).min(k))))
}

/// How many cores a product of this size gets: small ones are not worth waking the other
/// cores for (burn-flex draws the same line), nor are products of a few rows (decoding),
/// which are bound by reading the weights: waking a second core for those cost more than it
/// saved (measured: twice as slow at batch 1).
pub(crate) fn cores_for(m: usize, k: usize, n: usize) -> gemm::Parallelism {
    if m >= 8 && m * n * k >= 1 << 21 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst [m, n] (row-major) = (dst if accumulate) + lhs [m, k] · rhs [k, n]`.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    accumulate: bool,
    [m, k, n]: [usize; 3],
    lhs: Operand,
    rhs: Operand,
) {
    assert!(dst.len() >= m * n, "product output too small");
    lhs.check(m, k);
    rhs.check(k, n);
    // SAFETY: `dst` holds `m * n` values and is borrowed mutably; the operands were checked
    // to cover their shapes.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            n,
            accumulate,
            [m, k, n],
            lhs,
            rhs,
            cores_for(m, k, n),
        )
    }
}

/// A new product `lhs [m, k] · rhs [k, n]`, without zeroing its buffer first.
pub(crate) fn product_of([m, k, n]: [usize; 3], lhs: Operand, rhs: Operand) -> Vec<f32> {
    lhs.check(m, k);
    rhs.check(k, n);
    // SAFETY: a product that does not accumulate writes each of the m * n values.
    unsafe {
        written(m * n, |dst| {
            gemm_raw(dst.at(0), n, false, [m, k, n], lhs, rhs, cores_for(m, k, n))
        })
    }
}

/// `n` values set by `write` through the pointer it is given, with no zeroing pass first
/// (on the thread that allocates, before any parallel work: measurable on every output).
///
/// # Safety
/// `write` writes all `n` values.
pub(crate) unsafe fn written(n: usize, write: impl FnOnce(Shared)) -> Vec<f32> {
    let mut values = Vec::with_capacity(n);
    write(Shared(values.as_mut_ptr()));
    // SAFETY: the caller's promise: every value was written.
    unsafe { values.set_len(n) };
    values
}

impl Product {
    /// The weight as the `[k, n]` operand.
    fn weight<'a>(&self, w: &'a FlexTensor) -> Operand<'a> {
        let values = &w.storage::<f32>()[..self.k * self.n];
        let stored = Operand {
            values,
            rs: if self.transposed { self.k } else { self.n } as isize,
            cs: 1,
        };
        if self.transposed {
            stored.transpose()
        } else {
            stored
        }
    }

    fn rows<'a>(&self, x: &'a FlexTensor, width: usize) -> Operand<'a> {
        Operand::rows(&x.storage::<f32>()[..self.m * width], width)
    }

    /// `x · w + bias` from contiguous operands.
    fn forward(&self, x: &FlexTensor, w: &FlexTensor, bias: Option<&FlexTensor>) -> FlexTensor {
        let Self { m, k, n, .. } = *self;
        let (xs, ws) = (self.rows(x, k), self.weight(w));
        let y = match bias {
            None => product_of([m, k, n], xs, ws),
            Some(bias) => {
                let bias = &bias.storage::<f32>()[..n];
                let mut y = vec![0f32; m * n];
                y.par_chunks_mut(n)
                    .for_each(|row| row.copy_from_slice(bias));
                gemm_into(&mut y, true, [m, k, n], xs, ws);
                y
            }
        };
        FlexTensor::from_data(TensorData::new(y, [m, n]))
    }
}

#[derive(Clone, Debug)]
pub(crate) struct ProductState {
    pub(crate) x: FlexTensor,
    pub(crate) w: FlexTensor,
    pub(crate) shape: Product,
}

#[derive(Debug)]
pub(crate) struct ProductBackward;

impl Backward<Flex, 3> for ProductBackward {
    type State = ProductState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, w_node, b_node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let ProductState { x, w, shape } = ops.state;
        let Product {
            m,
            k,
            n,
            transposed,
        } = shape;
        let g = Operand {
            values: &dy.storage::<f32>()[..m * n],
            rs: n as isize,
            cs: 1,
        };
        if let Some(node) = b_node {
            // Column sums, each column's rows in order (the same whatever the threads).
            const COLUMNS: usize = 64;
            let mut db = vec![0f32; n];
            db.par_chunks_mut(COLUMNS)
                .enumerate()
                .for_each(|(c, sums)| {
                    for row in g.values.chunks(n) {
                        let row = &row[c * COLUMNS..][..sums.len()];
                        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
                    }
                });
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(db, [n])));
        }
        if let Some(node) = w_node {
            // The stored weight's gradient: `x^T · dy` `[k, n]`, or `dy^T · x` `[n, k]`.
            let xs = shape.rows(&x, k);
            let (dw, stored) = if transposed {
                (product_of([n, m, k], g.transpose(), xs), [n, k])
            } else {
                (product_of([k, m, n], xs.transpose(), g), [k, n])
            };
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, stored)));
        }
        if let Some(node) = x_node {
            let dx = product_of([m, n, k], g, shape.weight(&w).transpose());
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, [m, k])));
        }
    }
}

pub(crate) fn fused_product<C: CheckpointStrategy>(
    x: AutodiffTensor,
    w: AutodiffTensor,
    bias: Option<AutodiffTensor>,
    shape: Product,
) -> AutodiffTensor {
    let xc = x.primitive.to_contiguous();
    let wc = w.primitive.to_contiguous();
    let bc = bias.as_ref().map(|b| b.primitive.to_contiguous());
    let y = shape.forward(&xc, &wc, bc.as_ref());
    // No bias: an untracked zero parent keeps the step's arity fixed (untracked parents
    // have no node, so its gradient is never computed).
    let bias_node = match bias {
        Some(b) => b.node,
        None => {
            let zeros = Tensor::<Autodiff<Flex>, 1>::zeros([shape.n], &Default::default());
            let zeros: AutodiffTensor = zeros.into_primitive().tensor();
            zeros.node
        }
    };
    let prep = ProductBackward
        .prepare::<C>([x.node.clone(), w.node.clone(), bias_node])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => prep.finish(
            ProductState {
                x: xc,
                w: wc,
                shape,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}
