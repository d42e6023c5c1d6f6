//! How fast one decoding step can read `mini`'s weights on this machine, for the cache
//! against recomputing comparison in bench/generate.sh: the decoder's and the vocabulary
//! projection's products at batch 1 (22 MB of f32 per token), as plain vector-matrix
//! products compiled for this CPU, on one core and split over two (a spinning helper
//! thread, no wake-up cost). Run by bench/weight_reads.sh.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

// y[0..n] = x[0..k] * W[k][n], row-major W: axpy per k row, columns [c0, c1).
fn mv(x: &[f32], w: &[f32], n: usize, y: &mut [f32], c0: usize, c1: usize) {
    let y = &mut y[..c1 - c0];
    y.fill(0.0);
    for (kk, &xv) in x.iter().enumerate() {
        let row = &w[kk * n + c0..kk * n + c1];
        for (a, b) in y.iter_mut().zip(row) {
            *a += xv * b;
        }
    }
}

fn main() {
    // Per token: 4 decoder layers of self-attention q, k, v, out and cross-attention q, out
    // (cross k, v are computed once), the feed-forward pair, then the tied projection.
    let shapes: Vec<(usize, usize)> = (0..4)
        .flat_map(|_| {
            vec![
                (256, 256),
                (256, 256),
                (256, 256),
                (256, 256),
                (256, 256),
                (256, 256),
                (256, 1024),
                (1024, 256),
            ]
        })
        .chain(std::iter::once((256, 8000)))
        .collect();
    let ws: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(k, n)| (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect())
        .collect();
    let bytes: usize = shapes.iter().map(|&(k, n)| k * n * 4).sum();
    let x = vec![0.5f32; 1024];
    let mut y = vec![0f32; 8000];
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..50 {
            for (w, &(k, n)) in ws.iter().zip(&shapes) {
                mv(&x[..k], w, n, &mut y, 0, n);
            }
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "1 thread: {:.1} ms per 50 tokens, {:.1} GB/s",
            dt * 1e3,
            bytes as f64 * 50.0 / dt / 1e9
        );
    }
    // Two threads: the helper spins on a generation counter and does the right half of the
    // columns of each product.
    let ws = Arc::new(ws);
    let shapes = Arc::new(shapes);
    let go = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    {
        let (ws, shapes, go, done) = (ws.clone(), shapes.clone(), go.clone(), done.clone());
        std::thread::spawn(move || {
            let x = vec![0.5f32; 1024];
            let mut y = vec![0f32; 8000];
            let mut seen = 0;
            loop {
                let g = go.load(Ordering::Acquire);
                if g == seen {
                    std::hint::spin_loop();
                    continue;
                }
                seen = g;
                let i = (g - 1) % shapes.len();
                let (k, n) = shapes[i];
                mv(&x[..k], &ws[i], n, &mut y, n / 2, n);
                done.store(g, Ordering::Release);
            }
        });
    }
    let mut gen = 0;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..50 {
            for (i, &(k, n)) in shapes.iter().enumerate() {
                gen += 1;
                debug_assert_eq!((gen - 1) % shapes.len(), i);
                go.store(gen, Ordering::Release);
                mv(&x[..k], &ws[i], n, &mut y, 0, n / 2);
                while done.load(Ordering::Acquire) != gen {
                    std::hint::spin_loop();
                }
            }
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "2 threads: {:.1} ms per 50 tokens, {:.1} GB/s",
            dt * 1e3,
            bytes as f64 * 50.0 / dt / 1e9
        );
    }
}
