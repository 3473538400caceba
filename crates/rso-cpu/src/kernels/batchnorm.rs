//! Batch normalisation over `[n, c, h, w]` per channel: `y = γ (x − μ)/sqrt(var + ε) + β`.
//!
//! Training mode takes μ and the biased variance over the batch (`n·h·w` values per channel);
//! evaluation mode takes fixed running statistics. Both go through [`batchnorm_apply`], so
//! evaluating with running statistics equal to a batch's statistics reproduces the training-mode
//! output exactly.
//!
//! Batch reductions are split in two so a caller can run the per-sample half in parallel:
//! per-(sample, channel) partials ([`plane_moments`], [`backward_partials`]), then an in-order
//! combination ([`combine_moments`], [`combine_partials`]). All statistics are f64.

use crate::simd::simd_dispatch;
use rso_models::spec::BN_EPS;

/// `1/sqrt(var + ε)` in f64.
fn inv_std(var: f64) -> f64 {
    1.0 / (var + f64::from(BN_EPS)).sqrt()
}

simd_dispatch! {
    /// Mean and sum of squared deviations of each `hw` plane: `moments[i·c + ch] = (mean, m2)`
    /// of sample `i`, channel `ch` (f64, two passes, each over 8 partial sums in a fixed order).
    pub fn plane_moments(n: usize, c: usize, hw: usize, x: &[f32], moments: &mut [(f64, f64)]) => moments_body::<FMA>
}

#[inline(always)]
fn moments_body<const FMA: bool>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    moments: &mut [(f64, f64)],
) {
    for (p, m) in moments[..n * c].iter_mut().enumerate() {
        let plane = &x[p * hw..][..hw];
        let mean = lane_sum(plane, f64::from) / hw.max(1) as f64;
        let m2 = lane_sum(plane, |v| (f64::from(v) - mean) * (f64::from(v) - mean));
        *m = (mean, m2);
    }
}

/// `Σ f(v)` over `values` in f64, as 8 interleaved partial sums added pairwise (vectorisable,
/// and the same order on every run).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += f(chunk[l]);
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        acc[l] += f(v);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// Combines [`plane_moments`] in sample order into the batch mean and biased variance of each
/// channel. With `n == 0` the statistics are left untouched.
pub fn combine_moments(
    n: usize,
    c: usize,
    hw: usize,
    moments: &[(f64, f64)],
    mean: &mut [f64],
    var: &mut [f64],
) {
    if n == 0 || hw == 0 {
        return;
    }
    for ch in 0..c {
        let mu = (0..n).map(|i| moments[i * c + ch].0).sum::<f64>() / n as f64;
        let m2: f64 = (0..n)
            .map(|i| {
                let (m, s) = moments[i * c + ch];
                s + hw as f64 * (m - mu).powi(2)
            })
            .sum();
        mean[ch] = mu;
        var[ch] = m2 / (n * hw) as f64;
    }
}

simd_dispatch! {
    /// `y = γ (x − μ)/sqrt(var + ε) + β` with the given per-channel statistics, as
    /// `y = x·scale + shift` with `scale`, `shift` computed in f64 and rounded once.
    pub fn batchnorm_apply(
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        mean: &[f64],
        var: &[f64],
        gamma: &[f32],
        beta: &[f32],
        y: &mut [f32],
    ) => apply_body::<FMA>
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply_body<const FMA: bool>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    mean: &[f64],
    var: &[f64],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
) {
    for i in 0..n {
        for ch in 0..c {
            let scale = f64::from(gamma[ch]) * inv_std(var[ch]);
            let shift = f64::from(beta[ch]) - mean[ch] * scale;
            let (scale, shift) = (scale as f32, shift as f32);
            let off = (i * c + ch) * hw;
            for (y, &x) in y[off..off + hw].iter_mut().zip(&x[off..off + hw]) {
                *y = x * scale + shift;
            }
        }
    }
}

/// Training-mode forward of a whole batch on one thread: batch statistics into `mean`, `var`
/// (biased), output into `y`. Allocates the `n·c` moment partials.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_forward(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f64],
    var: &mut [f64],
) {
    let mut moments = vec![(0.0, 0.0); n * c];
    plane_moments(n, c, hw, x, &mut moments);
    combine_moments(n, c, hw, &moments, mean, var);
    batchnorm_apply(n, c, hw, x, mean, var, gamma, beta, y);
}

/// Per-(sample, channel) `(Σ dy, Σ dy·x̂)` over each plane, where `x̂ = (x − μ)/sqrt(var + ε)`.
#[allow(clippy::too_many_arguments)]
pub fn backward_partials(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    dy: &[f32],
    mean: &[f64],
    var: &[f64],
    partials: &mut [(f64, f64)],
) {
    for (p, out) in partials[..n * c].iter_mut().enumerate() {
        let ch = p % c;
        let inv = inv_std(var[ch]);
        let (a, b) = (inv as f32, (-mean[ch] * inv) as f32);
        let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
        for (&x, &g) in x[p * hw..][..hw].iter().zip(&dy[p * hw..][..hw]) {
            let xhat = x * a + b;
            sdy += f64::from(g);
            sdyx += f64::from(g * xhat);
        }
        *out = (sdy, sdyx);
    }
}

/// Sums [`backward_partials`] over samples in order: `dbeta[ch] = Σ dy`, `dgamma[ch] = Σ dy·x̂`
/// (f64, used again by [`batchnorm_backward_input`]).
pub fn combine_partials(
    n: usize,
    c: usize,
    partials: &[(f64, f64)],
    dgamma: &mut [f64],
    dbeta: &mut [f64],
) {
    for ch in 0..c {
        dbeta[ch] = (0..n).map(|i| partials[i * c + ch].0).sum();
        dgamma[ch] = (0..n).map(|i| partials[i * c + ch].1).sum();
    }
}

/// Gradient with respect to the input of training-mode batch norm over a batch of `count`
/// samples (`count` is the whole batch even when `n` covers only a part of it):
/// `dx = γ/σ · (dy − Σdy/M − x̂·Σdy·x̂/M)`, `M = count·hw`. Fully written.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward_input(
    n: usize,
    count: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    dy: &[f32],
    mean: &[f64],
    var: &[f64],
    gamma: &[f32],
    dgamma: &[f64],
    dbeta: &[f64],
    dx: &mut [f32],
) {
    let m = (count * hw).max(1) as f64;
    for i in 0..n {
        for ch in 0..c {
            let inv = inv_std(var[ch]);
            let (a, b) = (inv as f32, (-mean[ch] * inv) as f32);
            let k = (f64::from(gamma[ch]) * inv) as f32;
            let mean_dy = (dbeta[ch] / m) as f32;
            let mean_dyx = (dgamma[ch] / m) as f32;
            let off = (i * c + ch) * hw;
            for ((d, &x), &g) in dx[off..off + hw]
                .iter_mut()
                .zip(&x[off..off + hw])
                .zip(&dy[off..off + hw])
            {
                let xhat = x * a + b;
                *d = k * (g - mean_dy - xhat * mean_dyx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self as tu, assert_close, config, dot, numeric_grad, uniform, wide};
    use proptest::prelude::*;

    #[test]
    fn batch_statistics_and_output_match_hand_computed_values() {
        // n = 2, c = 1, hw = 2: values 1, 3 | 5, 7 → mean 4, biased variance 5.
        let x = [1.0, 3.0, 5.0, 7.0];
        let (mut mean, mut var) = ([f64::NAN], [f64::NAN]);
        let mut y = [f32::NAN; 4];
        batchnorm_train_forward(2, 1, 2, &x, &[2.0], &[1.0], &mut y, &mut mean, &mut var);
        assert_eq!((mean[0], var[0]), (4.0, 5.0));
        let s = 2.0 / (5.0 + f64::from(BN_EPS)).sqrt();
        let want: Vec<f64> = x.iter().map(|&v| (f64::from(v) - 4.0) * s + 1.0).collect();
        assert_close(&y, &want, 1e-6, 1e-6, "y");
    }

    #[test]
    fn running_statistics_mode_matches_naive() {
        let mut rng = tu::rng(5);
        let (n, c, hw) = (3, 4, 5);
        let x = uniform(&mut rng, n * c * hw, 2.0);
        let (gamma, beta) = (uniform(&mut rng, c, 2.0), uniform(&mut rng, c, 1.0));
        let mean = vec![0.5, -0.25, 0.0, 1.0];
        let var = vec![1.0, 0.5, 2.0, 0.0];
        let mut y = vec![f32::NAN; x.len()];
        batchnorm_apply(n, c, hw, &x, &mean, &var, &gamma, &beta, &mut y);
        let (want, _, _) = tu::batchnorm(
            n,
            c,
            hw,
            &wide(&x),
            &wide(&gamma),
            &wide(&beta),
            Some((&mean, &var)),
        );
        assert_close(&y, &want, 1e-5, 1e-4, "y");
    }

    #[test]
    fn combining_partials_of_any_split_matches_the_whole_batch() {
        let mut rng = tu::rng(6);
        let (n, c, hw) = (5, 3, 7);
        let x: Vec<f32> = uniform(&mut rng, n * c * hw, 1.0)
            .iter()
            .map(|v| v + 10.0)
            .collect();
        let mut moments = vec![(f64::NAN, f64::NAN); n * c];
        // Partials of samples 0..2 and 2..5 computed separately, as two threads would.
        plane_moments(2, c, hw, &x[..2 * c * hw], &mut moments[..2 * c]);
        plane_moments(3, c, hw, &x[2 * c * hw..], &mut moments[2 * c..]);
        let (mut mean, mut var) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        combine_moments(n, c, hw, &moments, &mut mean, &mut var);
        let (_, want_mean, want_var) =
            tu::batchnorm(n, c, hw, &wide(&x), &[1.0; 3], &[0.0; 3], None);
        assert_close(&mean, &want_mean, 1e-14, 0.0, "mean");
        assert_close(&var, &want_var, 1e-10, 1e-15, "var");
    }

    proptest! {
        #![proptest_config(config(24))]
        #[test]
        fn gradients_match_finite_differences(
            n in 1usize..=3, c in 1usize..=3, hw in 1usize..=9, seed in any::<u64>(),
        ) {
            prop_assume!(n * hw > 1);
            let mut rng = tu::rng(seed);
            let x = uniform(&mut rng, n * c * hw, 2.0);
            let (gamma, beta) = (uniform(&mut rng, c, 2.0), uniform(&mut rng, c, 1.0));
            let r = uniform(&mut rng, x.len(), 1.0);
            let (xw, gw, bw) = (wide(&x), wide(&gamma), wide(&beta));
            let loss = |x: &[f64], g: &[f64], b: &[f64]| dot(&r, &tu::batchnorm(n, c, hw, x, g, b, None).0);

            let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
            let mut y = vec![f32::NAN; x.len()];
            batchnorm_train_forward(n, c, hw, &x, &gamma, &beta, &mut y, &mut mean, &mut var);
            assert_close(&y, &tu::batchnorm(n, c, hw, &xw, &gw, &bw, None).0, 1e-5, 1e-5, "y");

            let mut partials = vec![(f64::NAN, f64::NAN); n * c];
            backward_partials(n, c, hw, &x, &r, &mean, &var, &mut partials);
            let (mut dgamma, mut dbeta) = (vec![f64::NAN; c], vec![f64::NAN; c]);
            combine_partials(n, c, &partials, &mut dgamma, &mut dbeta);
            let mut dx = vec![f32::NAN; x.len()];
            batchnorm_backward_input(n, n, c, hw, &x, &r, &mean, &var, &gamma, &dgamma, &dbeta, &mut dx);

            // x̂ is scale-free, so dx can be large where the variance is small: compare relative
            // to the largest entry.
            let fd = numeric_grad(|x| loss(x, &gw, &bw), &xw, 1e-5);
            let big = fd.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            assert_close(&dx, &fd, 1e-3, 1e-4 * big, "dx");
            assert_close(&dgamma, &numeric_grad(|g| loss(&xw, g, &bw), &gw, 1e-5), 1e-4, 1e-4, "dgamma");
            assert_close(&dbeta, &numeric_grad(|b| loss(&xw, &gw, b), &bw, 1e-5), 1e-4, 1e-4, "dbeta");
        }
    }
}
