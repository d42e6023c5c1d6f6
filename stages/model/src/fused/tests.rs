//! Each fused step against burn's composition: values and gradients.

use super::*;
use burn::tensor::activation;
use burn::tensor::Distribution;

/// burn's composition of multi-head attention's core, the reference for the fused step.
fn reference<B: Backend>(
    [q, k, v]: [Tensor<B, 3>; 3],
    heads: usize,
    root: f32,
    bias: Tensor<B, 4>,
    mask: Option<KeepMask>,
) -> Tensor<B, 3> {
    let [b, t, d] = q.dims();
    let s = k.dims()[1];
    let split = |x: Tensor<B, 3>, len| x.reshape([b, len, heads, d / heads]).swap_dims(1, 2);
    let scores = split(q, t).matmul(split(k, s).swap_dims(2, 3));
    let mut weights = activation::softmax(scores.div_scalar(root) + bias, 3);
    if let Some(mask) = mask {
        let values = TensorData::new(mask.values(b * heads * t * s), [b, heads, t, s]);
        weights = weights * Tensor::from_data(values, &Default::default());
    }
    weights
        .matmul(split(v, s))
        .swap_dims(1, 2)
        .reshape([b, t, d])
}

/// The fused attention core's value and the gradients of q, k and v against burn's
/// operations, for each way the bias broadcasts, with and without dropout, self- and
/// cross-attention lengths.
fn check_attention<A: burn::tensor::backend::AutodiffBackend>(bias_dims: [usize; 4], drop: bool) {
    let device = Default::default();
    A::seed(&device, 7);
    let (b, t, s, heads, dk) = (2, 5, bias_dims[3], 3, 4);
    let d = heads * dk;
    let random = |len| {
        Tensor::<A, 3>::random([b, len, d], Distribution::Normal(0.0, 1.5), &device).require_grad()
    };
    let inputs = [random(t), random(s), random(s)];
    let probe = Tensor::<A, 3>::random([b, t, d], Distribution::Default, &device);
    let bias = Tensor::<A, 4>::random(bias_dims, Distribution::Normal(0.0, 3.0), &device);
    let mask = drop.then(|| KeepMask::new(11, 2.0 / 3.0));
    let root = 2.0;
    let ours = attention(inputs.clone(), heads, root, &bias, || mask)
        .unwrap_or_else(|_| panic!("the fused path applies"));
    let burns = reference(inputs.clone(), heads, root, bias, mask);
    let tol = burn::tensor::Tolerance::absolute(1e-5);
    ours.to_data()
        .assert_approx_eq::<f32>(&burns.to_data(), tol);
    let g_ours = (ours * probe.clone()).sum().backward();
    let g_burn = (burns * probe).sum().backward();
    for x in &inputs {
        x.grad(&g_ours)
            .unwrap()
            .to_data()
            .assert_approx_eq::<f32>(&x.grad(&g_burn).unwrap().to_data(), tol);
    }
}

#[test]
fn fused_attention_matches_burns_value_and_gradients() {
    for bias in [[2, 1, 1, 5], [1, 1, 5, 5], [2, 1, 5, 5], [2, 1, 1, 7]] {
        check_attention::<Autodiff<Flex>>(bias, false);
        check_attention::<Autodiff<Flex>>(bias, true);
        check_attention::<Autodiff<Flex, BalancedCheckpointing>>(bias, true);
    }
}

/// Evaluation (plain flex, no autodiff) takes the forward pass alone.
#[test]
fn fused_attention_forward_matches_burns() {
    let device = Default::default();
    let random = |len| Tensor::<Flex, 3>::random([2, len, 8], Distribution::Default, &device);
    let inputs = [random(3), random(6), random(6)];
    let bias = Tensor::<Flex, 4>::random([2, 1, 1, 6], Distribution::Default, &device);
    let ours = attention(inputs.clone(), 2, 1.5, &bias, || unreachable!("no dropout"))
        .unwrap_or_else(|_| panic!("the fused path applies"));
    let burns = reference(inputs, 2, 1.5, bias, None);
    ours.to_data()
        .assert_approx_eq::<f32>(&burns.to_data(), burn::tensor::Tolerance::absolute(1e-6));
}

/// The fused cross-entropy against log-softmax and gather, value and gradient.
fn check_ce<A: burn::tensor::backend::AutodiffBackend>(smoothing: f64) {
    let device = Default::default();
    A::seed(&device, 3);
    let (b, t, v) = (2, 3, 11);
    let x =
        Tensor::<A, 3>::random([b, t, v], Distribution::Normal(0.0, 3.0), &device).require_grad();
    let targets = Tensor::<A, 2, Int>::from_data(
        TensorData::new(vec![0i64, 4, 10, 7, 7, 1], [b, t]),
        &device,
    );
    let w = Tensor::<A, 2>::random([b, t], Distribution::Default, &device);
    let ours = cross_entropy(&x, &targets, smoothing).expect("the fused path applies");
    let logp = activation::log_softmax(x.clone(), 2);
    let nll = logp
        .clone()
        .gather(2, targets.reshape([b, t, 1]))
        .reshape([b, t])
        .neg();
    let uniform = logp.mean_dim(2).reshape([b, t]).neg();
    let burns = nll * (1.0 - smoothing) + uniform * smoothing;
    let tol = burn::tensor::Tolerance::absolute(1e-5);
    ours.to_data()
        .assert_approx_eq::<f32>(&burns.to_data(), tol);
    let g_ours = (ours * w.clone()).sum().backward();
    let g_burn = (burns * w).sum().backward();
    x.grad(&g_ours)
        .unwrap()
        .to_data()
        .assert_approx_eq::<f32>(&x.grad(&g_burn).unwrap().to_data(), tol);
}

#[test]
fn fused_cross_entropy_matches_burns_value_and_gradient() {
    check_ce::<Autodiff<Flex>>(0.0);
    check_ce::<Autodiff<Flex>>(0.1);
    check_ce::<Autodiff<Flex, BalancedCheckpointing>>(0.1);
}

/// The loss's sum: the values added in f64 over eight lanes, whatever the machine's
/// vectors (the exact bits of that order), and a gradient of the incoming one everywhere.
fn check_loss_sum<A: burn::tensor::backend::AutodiffBackend>() {
    let device = Default::default();
    let values: Vec<f32> = (0..37 * 13)
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    let x = Tensor::<A, 2>::from_data(TensorData::new(values.clone(), [37, 13]), &device)
        .require_grad();
    let ours = loss_sum(&x).expect("the fused path applies");
    let mut lanes = [0f64; 8];
    let whole = values.len() / 8 * 8;
    for (i, &v) in values[..whole].iter().enumerate() {
        lanes[i % 8] += f64::from(v);
    }
    let tail: f64 = values[whole..].iter().map(|&v| f64::from(v)).sum();
    let want = (lanes.iter().sum::<f64>() + tail) as f32;
    assert_eq!(ours.to_data().to_vec::<f32>().unwrap(), [want]);
    let g = (ours * 3.0).backward();
    let dx: Vec<f32> = x.grad(&g).unwrap().to_data().to_vec().unwrap();
    assert!(
        dx.len() == values.len() && dx.iter().all(|&d| d == 3.0),
        "{dx:?}"
    );
}

#[test]
fn the_loss_sums_in_a_fixed_order() {
    check_loss_sum::<Autodiff<Flex>>();
    check_loss_sum::<Autodiff<Flex, BalancedCheckpointing>>();
    let x = Tensor::<Flex, 2>::from_data(
        TensorData::new(vec![1f32, 2.0, 3.5], [1, 3]),
        &Default::default(),
    );
    assert_eq!(
        loss_sum(&x).unwrap().to_data().to_vec::<f32>().unwrap(),
        [6.5]
    );
}

/// The fused layer norm against burn's, value and the three gradients.
fn check_norm<A: burn::tensor::backend::AutodiffBackend>() {
    let device = Default::default();
    A::seed(&device, 5);
    // 150 rows: more than two blocks of the parameter sums, the last one short.
    let norm = burn::nn::LayerNormConfig::new(16).init::<A>(&device);
    let norm = norm.map(&mut RandomiseNorm);
    let x =
        Tensor::<A, 3>::random([3, 50, 16], Distribution::Normal(1.0, 2.0), &device).require_grad();
    let w = Tensor::<A, 3>::random([3, 50, 16], Distribution::Default, &device);
    let ours = layer_norm(&norm, x.clone());
    let burns = norm.forward(x.clone());
    let tol = burn::tensor::Tolerance::absolute(1e-5);
    ours.to_data()
        .assert_approx_eq::<f32>(&burns.to_data(), tol);
    let g_ours = (ours * w.clone()).sum().backward();
    let g_burn = (burns * w).sum().backward();
    let grad = |g: &<A as burn::tensor::backend::AutodiffBackend>::Gradients| {
        [
            x.grad(g).unwrap().into_data(),
            norm.gamma.val().grad(g).unwrap().into_data(),
            norm.beta
                .as_ref()
                .unwrap()
                .val()
                .grad(g)
                .unwrap()
                .into_data(),
        ]
    };
    for (a, b) in grad(&g_ours).iter().zip(grad(&g_burn).iter()) {
        a.assert_approx_eq::<f32>(b, burn::tensor::Tolerance::absolute(1e-4));
    }
}

/// Non-trivial scale and bias, so that their gradients and use are checked.
struct RandomiseNorm;
impl<B: Backend> burn::module::ModuleMapper<B> for RandomiseNorm {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        let (id, t, mapper) = param.consume();
        let t = (t.clone() + Tensor::random(t.shape(), Distribution::Default, &t.device()))
            .detach()
            .require_grad();
        burn::module::Param::from_mapped_value(id, t, mapper)
    }
}

#[test]
fn fused_layer_norm_matches_burns_value_and_gradients() {
    check_norm::<Autodiff<Flex>>();
    check_norm::<Autodiff<Flex, BalancedCheckpointing>>();
}

/// The fused product against burn's matmul (and broadcast bias), value and the three
/// gradients, for a weight used as stored and transposed.
fn check_product<A: burn::tensor::backend::AutodiffBackend>(transposed: bool, biased: bool) {
    let device = Default::default();
    A::seed(&device, 13);
    let (m, k, n) = (37, 19, 23);
    let x = Tensor::<A, 2>::random([m, k], Distribution::Default, &device).require_grad();
    let dims = if transposed { [n, k] } else { [k, n] };
    let w = Tensor::<A, 2>::random(dims, Distribution::Default, &device).require_grad();
    let b = Tensor::<A, 1>::random([n], Distribution::Default, &device).require_grad();
    let probe = Tensor::<A, 2>::random([m, n], Distribution::Default, &device);
    let bias = biased.then(|| b.clone());
    let ours = product(&x, &w, transposed, bias.as_ref()).expect("the fused path applies");
    let weight = if transposed {
        w.clone().transpose()
    } else {
        w.clone()
    };
    let mut burns = x.clone().matmul(weight);
    if biased {
        burns = burns + b.clone().unsqueeze();
    }
    let tol = burn::tensor::Tolerance::absolute(1e-5);
    ours.to_data()
        .assert_approx_eq::<f32>(&burns.to_data(), tol);
    let g_ours = (ours * probe.clone()).sum().backward();
    let g_burn = (burns * probe).sum().backward();
    let data = |t: Option<Tensor<A::InnerBackend, 2>>| t.map(|t| t.into_data());
    for (ours, burns) in [
        (data(x.grad(&g_ours)), data(x.grad(&g_burn))),
        (data(w.grad(&g_ours)), data(w.grad(&g_burn))),
        (
            b.grad(&g_ours).map(|t| t.into_data()),
            b.grad(&g_burn).map(|t| t.into_data()),
        ),
    ] {
        assert_eq!(ours.is_some(), burns.is_some());
        if let (Some(ours), Some(burns)) = (ours, burns) {
            ours.assert_approx_eq::<f32>(&burns, tol);
        }
    }
    assert_eq!(b.grad(&g_ours).is_some(), biased);
}

/// The CPU products' sums run in blocks of at most `K_BLOCK` values of `k` whatever the
/// machine's cache: a product over `k` = 1300 (three blocks of 434, 434 and 432) is, bit for
/// bit, each block's products summed in order from zero and the blocks added to the output
/// in turn, on top of what `accumulate` keeps. A machine on which gemm cut the sums where
/// its cache suggests (1024 on a 48 KiB L1) would fail this.
#[test]
fn cpu_products_sum_k_in_fixed_blocks() {
    assert_eq!(
        k_blocks(1300).collect::<Vec<_>>(),
        [(0, 434), (434, 434), (868, 432)]
    );
    assert_eq!(k_blocks(512).collect::<Vec<_>>(), [(0, 512)]);
    assert_eq!(k_blocks(0).collect::<Vec<_>>(), [(0, 0)]);
    for k in 1..3000 {
        let blocks: Vec<_> = k_blocks(k).collect();
        assert!(
            blocks.iter().all(|&(_, len)| (1..=K_BLOCK).contains(&len)),
            "{k}"
        );
        assert_eq!(blocks.iter().map(|b| b.1).sum::<usize>(), k);
    }
    let (m, k, n) = (37, 1300, 29);
    // Values with many significant bits, so a different order of the sums shows.
    let value = |i: usize| ((i as f32 * 0.618_034).fract() - 0.5) * (1.0 + (i % 7) as f32);
    let lhs: Vec<f32> = (0..m * k).map(value).collect();
    let rhs: Vec<f32> = (0..k * n).map(|i| value(i + 17)).collect();
    let start: Vec<f32> = (0..m * n).map(|i| value(i + 5) * 100.0).collect();
    for accumulate in [false, true] {
        let mut dst = start.clone();
        gemm_into(
            &mut dst,
            accumulate,
            [m, k, n],
            Operand::rows(&lhs, k),
            Operand::rows(&rhs, n),
        );
        for (i, j) in [(0, 0), (5, 17), (36, 28), (20, 3)] {
            let mut out = if accumulate { start[i * n + j] } else { 0.0 };
            for (b, (from, len)) in k_blocks(k).enumerate() {
                let block = (from..from + len)
                    .fold(0f32, |acc, p| lhs[i * k + p].mul_add(rhs[p * n + j], acc));
                out = if b == 0 && !accumulate {
                    block
                } else {
                    out + block
                };
            }
            assert_eq!(
                dst[i * n + j].to_bits(),
                out.to_bits(),
                "({i}, {j}), {accumulate}"
            );
        }
    }
}

#[test]
fn fused_product_matches_burns_value_and_gradients() {
    for (transposed, biased) in [(false, true), (false, false), (true, false)] {
        check_product::<Autodiff<Flex>>(transposed, biased);
        check_product::<Autodiff<Flex, BalancedCheckpointing>>(transposed, biased);
    }
    // Evaluation: the forward pass alone.
    let device = Default::default();
    let x = Tensor::<Flex, 2>::random([5, 3], Distribution::Default, &device);
    let w = Tensor::<Flex, 2>::random([4, 3], Distribution::Default, &device);
    let ours = product(&x, &w, true, None).expect("the fused path applies");
    ours.to_data().assert_approx_eq::<f32>(
        &x.matmul(w.transpose()).to_data(),
        burn::tensor::Tolerance::absolute(1e-5),
    );
}

/// The GPU backends' single steps (`gpu`) against burn's compositions on burn's wgpu
/// backend (lavapipe in CI): the same checks as the CPU's steps, after checking that the
/// steps apply there at all (a silent fallback to burn's composition would pass them).
#[cfg(feature = "wgpu")]
mod on_wgpu {
    use super::*;
    use burn::backend::Wgpu;

    struct Applies;
    impl gpu::Step for Applies {
        type Out = ();
        fn on<I: Backend, C: CheckpointStrategy>(self) {}
    }

    fn applies<A: Backend>() {
        assert!(gpu::on_gpu_autodiff::<A, _>(Applies).is_ok());
    }

    /// Attention's weights against burn's softmax of the scaled, biased scores, value and
    /// gradient, for each way the bias broadcasts.
    fn check_softmax<A: burn::tensor::backend::AutodiffBackend>(bias_dims: [usize; 4]) {
        applies::<A>();
        let device = Default::default();
        A::seed(&device, 9);
        let [b, _, t, s] = [2, 3, 5, bias_dims[3]];
        let scores = Tensor::<A, 4>::random([b, 3, t, s], Distribution::Normal(0.0, 4.0), &device)
            .require_grad();
        let bias = Tensor::<A, 4>::random(bias_dims, Distribution::Normal(0.0, 3.0), &device);
        let probe = Tensor::<A, 4>::random([b, 3, t, s], Distribution::Default, &device);
        let ours = gpu::attention_weights(scores.clone(), 2.0, bias.clone());
        let burns = activation::softmax(scores.clone().div_scalar(2.0) + bias, 3);
        let tol = burn::tensor::Tolerance::absolute(1e-5);
        ours.to_data()
            .assert_approx_eq::<f32>(&burns.to_data(), tol);
        let g_ours = (ours * probe.clone()).sum().backward();
        let g_burn = (burns * probe).sum().backward();
        scores
            .grad(&g_ours)
            .unwrap()
            .to_data()
            .assert_approx_eq::<f32>(&scores.grad(&g_burn).unwrap().to_data(), tol);
    }

    /// Dropout: every value kept and scaled by `1 / keep`, or dropped, about `p` of them
    /// dropped, and the gradient through the same mask. (Not against burn's layer from one
    /// seed: tests running beside this one draw from the same device's generator.)
    fn check_dropout<A: burn::tensor::backend::AutodiffBackend>() {
        applies::<A>();
        let device = Default::default();
        let layer = burn::nn::DropoutConfig::new(0.25).init();
        let x = Tensor::<A, 3>::random([3, 7, 16], Distribution::Uniform(0.5, 1.5), &device)
            .require_grad();
        let probe = Tensor::<A, 3>::random([3, 7, 16], Distribution::Default, &device);
        let ours = gpu::dropout(&layer, x.clone());
        let kept = ours.clone().not_equal_elem(0.0).float().detach();
        let tol = burn::tensor::Tolerance::absolute(1e-6);
        let expected = (x.clone().detach() * kept.clone()).div_scalar(0.75);
        ours.to_data()
            .assert_approx_eq::<f32>(&expected.to_data(), tol);
        let dropped = 336 - kept.clone().sum().into_scalar().elem::<f64>() as i64;
        assert!(
            (40..=130).contains(&dropped),
            "{dropped} of 336 dropped at p = 0.25"
        );
        let grads = (ours * probe.clone()).sum().backward();
        x.grad(&grads)
            .unwrap()
            .to_data()
            .assert_approx_eq::<f32>(&(probe * kept).div_scalar(0.75).inner().to_data(), tol);
    }

    #[test]
    fn gpu_steps_match_burns_value_and_gradients() {
        check_dropout::<Autodiff<Wgpu>>();
        applies::<Autodiff<Wgpu>>();
        check_norm::<Autodiff<Wgpu>>();
        check_norm::<Autodiff<Wgpu, BalancedCheckpointing>>();
        check_ce::<Autodiff<Wgpu>>(0.0);
        check_ce::<Autodiff<Wgpu>>(0.1);
        check_ce::<Autodiff<Wgpu, BalancedCheckpointing>>(0.1);
        for bias in [[2, 1, 1, 5], [1, 1, 5, 5], [2, 1, 5, 5], [2, 1, 1, 7]] {
            check_softmax::<Autodiff<Wgpu>>(bias);
        }
        check_softmax::<Autodiff<Wgpu, BalancedCheckpointing>>([2, 1, 1, 5]);
    }

    /// Inference (no autodiff) and the CPU keep their own paths.
    #[test]
    fn gpu_steps_apply_to_gpu_training_only() {
        assert!(gpu::on_gpu_autodiff::<Wgpu, _>(Applies).is_err());
        assert!(gpu::on_gpu_autodiff::<Autodiff<Flex>, _>(Applies).is_err());
    }
}
