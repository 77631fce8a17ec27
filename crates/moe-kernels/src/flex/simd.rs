//! Vector helpers of the row kernels: [`vectorized`] runs a loop compiled for the widest
//! vectors the CPU has, and `exp`, `sum_of`, `max_of` and `dot` are written in the
//! branch-free, multi-lane forms the compiler turns into vector code.

/// Runs `work` compiled for the widest vectors the CPU has (AVX-512 or AVX2), else as
/// built. Release builds target baseline x86-64 (SSE2) so the binary runs anywhere; the
/// row kernels' loops (softmax, cross-entropy, SwiGLU, RMSNorm, rotary) would then use
/// four lanes, where AVX2 offers eight and AVX-512 sixteen. `work` and the closures it
/// calls must be `#[inline(always)]`: code only takes on the wider instructions once
/// inlined into the function compiled for them.
#[inline(always)]
pub(super) fn vectorized<R>(work: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            fn avx512<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: the CPU was just found to support AVX-512.
            return unsafe { avx512(work) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: the CPU was just found to support AVX2.
            return unsafe { avx2(work) };
        }
    }
    work()
}

/// `e^x` in a branch-free form the compiler vectorises (a loop of `f32::exp` is a
/// scalar libm call per element, which dominated the softmax and cross-entropy passes):
/// Cephes' `expf`, range reduction to `x = n ln 2 + r` with `|r| <= ln 2 / 2` and a
/// degree-6 polynomial, within 2 ulp. Underflows to 0 below -87.3 and saturates at
/// `e^88` above 88 (the kernels only exponentiate shifted logits and `-x` for sigmoids).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const MIN: f32 = -87.3;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(MIN, 88.0);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n as an integer, read from the rounded sum's low mantissa bits: `n as i32` would be
    // a saturating conversion, and a branch on `x < MIN` a jump, each keeping the loop
    // scalar.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    // All ones, or zero below MIN (NaN keeps its bits).
    let keep = u32::from(x < MIN).wrapping_sub(1);
    f32::from_bits((e_r * two_n).to_bits() & keep)
}

/// Lanes of the reductions below: independent partial results the compiler keeps in
/// vector registers, one with AVX-512 (a single running sum is a serial chain it may not
/// reorder).
pub(super) const LANES: usize = 16;

/// `sum(f(v))` over `values`.
#[inline(always)]
pub(super) fn sum_of(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The largest of `values` (`-inf` when empty).
#[inline(always)]
pub(super) fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// `sum(a * b)` over equal-length slices.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (chunks_a, chunks_b) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in chunks_a.zip(chunks_b) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        // Every 1/1024 from -87 to 88: the whole range softmax and sigmoid use.
        for i in -87 * 1024..=88 * 1024 {
            let x = i as f32 / 1024.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            let ulp = (want as f32).to_bits().abs_diff((got as f32).to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, expected {want} ({ulp} ulp)");
        }
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn vectorized_code_computes_the_same_bits() {
        let x: Vec<f32> = (-2000..2000).map(|i| i as f32 / 16.0).collect();
        let plain: Vec<f32> = x.iter().map(|&v| exp(v)).collect();
        let wide = vectorized(
            #[inline(always)]
            || x.iter().map(|&v| exp(v)).collect::<Vec<f32>>(),
        );
        assert_eq!(plain, wide);
        let sums = vectorized(
            #[inline(always)]
            || (sum_of(&x, exp), max_of(&x), dot(&x, &plain)),
        );
        assert_eq!(sums, (sum_of(&x, exp), max_of(&x), dot(&x, &plain)));
    }

    #[test]
    fn reductions_match_serial_loops() {
        // Lengths around the lane width, with a remainder or without.
        for len in [0, 1, 7, 8, 9, 37] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 1.3).cos()).collect();
            let sum: f32 = a.iter().map(|v| v * 2.0).sum();
            let max = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let serial_dot: f32 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
            assert!((sum_of(&a, |v| v * 2.0) - sum).abs() < 1e-5, "sum of {len}");
            assert_eq!(max_of(&a), max, "max of {len}");
            assert!((dot(&a, &b) - serial_dot).abs() < 1e-5, "dot of {len}");
        }
    }
}
