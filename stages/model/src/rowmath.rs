//! Row arithmetic for the CPU's fused steps, written so that the compiler vectorises it:
//! an exponential of plain arithmetic (the C library's `expf` is a call per value, which no
//! loop around it can vectorise) and sums and maxima over eight running lanes (a single
//! running float sum has to add in order, one value at a time). Every result depends only
//! on the values, never on threads or vector width: the lanes are a fixed order of adds.

/// Values below this have an exponential at or under f32's smallest normal (e^-87.34):
/// taken as 0, so that masked attention scores (biased by -1e4) weigh exactly nothing, as
/// with `expf`.
const EXP_LOW: f32 = -87.3;
/// Above this the exponential overflows f32.
const EXP_HIGH: f32 = 88.7;

/// `e^x` to within 2 units in the last place (Cephes' `expf` polynomial): `x = n ln 2 + r`,
/// `e^x = 2^n e^r`, with `e^r` a degree-7 polynomial on `|r| <= ln 2 / 2`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits (no rounding
    // instruction needed, which baseline x86-64 lacks).
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(EXP_LOW, EXP_HIGH);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n from the exponent bits; n is in [-126, 128], so split the power in two halves
    // to stay inside f32's exponent range at both ends.
    let bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let half = bits >> 1;
    let a = f32::from_bits(((half + 127) as u32) << 23);
    let b = f32::from_bits(((bits - half + 127) as u32) << 23);
    let y = er * a * b;
    if x < EXP_LOW {
        0.0
    } else {
        y
    }
}

/// The sum of `x`, over eight lanes.
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// The sum of the squares of `x`, in f64 over eight lanes (see [`sum_f64_by`]); no square
/// of a finite f32 overflows.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    sum_f64_by(x, |v| {
        let v = f64::from(v);
        v * v
    })
}

/// The sum of `x` in f64 over eight lanes (see [`sum_f64_by`]).
pub fn sum_f64(x: &[f32]) -> f64 {
    sum_f64_by(x, f64::from)
}

/// `f` of each value of `x`, added in f64 over eight lanes, then the lanes and the values
/// past the last eight, in that order: the same bits on every machine (the lanes are this
/// code's, not the vector unit's, and Rust never reorders float sums).
fn sum_f64_by(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&v| f(v)).sum::<f64>()
}

/// The largest value of `x` (negative infinity when empty), over eight lanes.
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = if v > *l { v } else { *l };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// The sum of `x[i] * y[i]`, over eight lanes.
#[inline]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let rest: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(&a, &b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for ((l, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
            *l += a * b;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// `row = softmax(row * scale + add)`, in place.
#[inline]
pub fn softmax(row: &mut [f32], add: &[f32], scale: f32) {
    for (v, &a) in row.iter_mut().zip(add) {
        *v = *v * scale + a;
    }
    let top = max(row);
    for v in row.iter_mut() {
        *v = exp(*v - top);
    }
    let inv = 1.0 / sum(row);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The log of `sum(e^x)`, from the largest value; the exponentials summed over eight lanes
/// as [`sum`] does, without storing them.
#[inline]
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let top = max(x);
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&v| exp(v - top)).sum();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += exp(v - top);
        }
    }
    top + (lanes.iter().sum::<f32>() + rest).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_of_the_c_library() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (ours, libm) = (exp(x), x.exp());
            let ulp = (libm.to_bits() as i64 - ours.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}): {ours} against {libm}");
            worst = worst.max(ulp as f64);
            x += 0.000_731;
        }
        assert_eq!(exp(-1e4), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn lane_sums_and_maxima_match_plain_ones() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 9.0 - 5.0)
            .collect();
        let y: Vec<f32> = x.iter().map(|v| v * 0.5 + 1.0).collect();
        assert!((sum(&x) - x.iter().sum::<f32>()).abs() < 1e-4);
        assert_eq!(max(&x), x.iter().copied().fold(f32::MIN, f32::max));
        let plain: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot(&x, &y) - plain).abs() < 1e-3);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
