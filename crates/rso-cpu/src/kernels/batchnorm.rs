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
//!
//! Activations are `[n, c, hw]` views (each `h × w` plane flattened, `hw = h·w`), per-channel
//! statistics and parameters `[c]`, per-(sample, channel) partials `[n, c]`.

use super::{values, values_mut};
use crate::simd::simd_dispatch;
use ndarray::{
    Array2, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, ArrayViewMut3,
};
use rso_models::spec::BN_EPS;

/// Asserts that each per-channel argument (name, length) holds `c` values.
#[track_caller]
fn check_channels(kernel: &str, c: usize, args: &[(&str, usize)]) {
    for &(name, len) in args {
        assert_eq!(len, c, "{kernel}: {name} is not [c]");
    }
}

/// The `f32` affine map `x·scale + shift` that [`batchnorm_apply`] applies to one channel with
/// batch mean `mean`, variance `var` and parameters `gamma`, `beta` (computed in `f64`, then
/// rounded once each).
pub fn bn_affine(mean: f64, var: f64, gamma: f32, beta: f32) -> (f32, f32) {
    let scale = f64::from(gamma) * inv_std(var);
    let shift = f64::from(beta) - mean * scale;
    (scale as f32, shift as f32)
}

/// `1/sqrt(var + ε)` in f64.
fn inv_std(var: f64) -> f64 {
    1.0 / (var + f64::from(BN_EPS)).sqrt()
}

/// Mean and sum of squared deviations of each plane: `moments[i, ch] = (mean, m2)` of sample
/// `i`, channel `ch` (f64, two passes, each over 8 partial sums in a fixed order).
///
/// # Shapes
/// `x: [n, c, hw]`, `moments: [n, c]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn plane_moments(x: ArrayView3<f32>, moments: ArrayViewMut2<(f64, f64)>) {
    const K: &str = "plane_moments";
    let (n, c, hw) = x.dim();
    assert_eq!(moments.dim(), (n, c), "{K}: moments is not [n, c]");
    moments_of(
        n,
        c,
        hw,
        values(x, K, "x"),
        values_mut(moments, K, "moments"),
    );
}

simd_dispatch! {
    fn moments_of(n: usize, c: usize, hw: usize, x: &[f32], moments: &mut [(f64, f64)]) => moments_body::<FMA>
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

/// Combines [`plane_moments`] of planes of `hw` values in sample order into the batch mean and
/// biased variance of each channel. With `n == 0` the statistics are left untouched.
///
/// # Shapes
/// `moments: [n, c]`, `mean`, `var: [c]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn combine_moments(
    hw: usize,
    moments: ArrayView2<(f64, f64)>,
    mean: ArrayViewMut1<f64>,
    var: ArrayViewMut1<f64>,
) {
    const K: &str = "combine_moments";
    let (n, c) = moments.dim();
    check_channels(K, c, &[("mean", mean.len()), ("var", var.len())]);
    let moments = values(moments, K, "moments");
    let (mean, var) = (values_mut(mean, K, "mean"), values_mut(var, K, "var"));
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

/// `y = γ (x − μ)/sqrt(var + ε) + β` with the given per-channel statistics, as
/// `y = x·scale + shift` with `scale`, `shift` computed in f64 and rounded once.
///
/// # Shapes
/// `x`, `y: [n, c, hw]`; `mean`, `var`, `gamma`, `beta: [c]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn batchnorm_apply(
    x: ArrayView3<f32>,
    mean: ArrayView1<f64>,
    var: ArrayView1<f64>,
    gamma: ArrayView1<f32>,
    beta: ArrayView1<f32>,
    y: ArrayViewMut3<f32>,
) {
    const K: &str = "batchnorm_apply";
    let (n, c, hw) = x.dim();
    assert_eq!(y.dim(), x.dim(), "{K}: y and x differ in shape");
    let lens = [("mean", mean.len()), ("var", var.len())];
    check_channels(K, c, &lens);
    check_channels(K, c, &[("gamma", gamma.len()), ("beta", beta.len())]);
    let (x, y) = (values(x, K, "x"), values_mut(y, K, "y"));
    let (mean, var) = (values(mean, K, "mean"), values(var, K, "var"));
    let (gamma, beta) = (values(gamma, K, "gamma"), values(beta, K, "beta"));
    apply(n, c, hw, x, mean, var, gamma, beta, y);
}

simd_dispatch! {
    fn apply(
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
            let (scale, shift) = bn_affine(mean[ch], var[ch], gamma[ch], beta[ch]);
            let off = (i * c + ch) * hw;
            for (y, &x) in y[off..off + hw].iter_mut().zip(&x[off..off + hw]) {
                *y = x * scale + shift;
            }
        }
    }
}

/// Training-mode forward of a whole batch on one thread: batch statistics into `mean`, `var`
/// (biased), output into `y`. Allocates the `n·c` moment partials.
///
/// # Shapes
/// `x`, `y: [n, c, hw]`; `gamma`, `beta`, `mean`, `var: [c]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn batchnorm_train_forward(
    x: ArrayView3<f32>,
    gamma: ArrayView1<f32>,
    beta: ArrayView1<f32>,
    y: ArrayViewMut3<f32>,
    mut mean: ArrayViewMut1<f64>,
    mut var: ArrayViewMut1<f64>,
) {
    let (n, c, hw) = x.dim();
    let mut moments = Array2::from_elem((n, c), (0.0, 0.0));
    plane_moments(x, moments.view_mut());
    combine_moments(hw, moments.view(), mean.view_mut(), var.view_mut());
    batchnorm_apply(x, mean.view(), var.view(), gamma, beta, y);
}

/// Per-(sample, channel) `(Σ dy, Σ dy·x̂)` over each plane, where `x̂ = (x − μ)/sqrt(var + ε)`.
///
/// # Shapes
/// `x`, `dy: [n, c, hw]`; `mean`, `var: [c]`; `partials: [n, c]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn backward_partials(
    x: ArrayView3<f32>,
    dy: ArrayView3<f32>,
    mean: ArrayView1<f64>,
    var: ArrayView1<f64>,
    partials: ArrayViewMut2<(f64, f64)>,
) {
    const K: &str = "backward_partials";
    let (n, c, hw) = x.dim();
    assert_eq!(dy.dim(), x.dim(), "{K}: dy and x differ in shape");
    check_channels(K, c, &[("mean", mean.len()), ("var", var.len())]);
    assert_eq!(partials.dim(), (n, c), "{K}: partials is not [n, c]");
    let (x, dy) = (values(x, K, "x"), values(dy, K, "dy"));
    let (mean, var) = (values(mean, K, "mean"), values(var, K, "var"));
    partials_of(
        n,
        c,
        hw,
        x,
        dy,
        mean,
        var,
        values_mut(partials, K, "partials"),
    );
}

#[allow(clippy::too_many_arguments)]
fn partials_of(
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
///
/// # Shapes
/// `partials: [n, c]`; `dgamma`, `dbeta: [c]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn combine_partials(
    partials: ArrayView2<(f64, f64)>,
    dgamma: ArrayViewMut1<f64>,
    dbeta: ArrayViewMut1<f64>,
) {
    const K: &str = "combine_partials";
    let (n, c) = partials.dim();
    check_channels(K, c, &[("dgamma", dgamma.len()), ("dbeta", dbeta.len())]);
    let partials = values(partials, K, "partials");
    let (dgamma, dbeta) = (
        values_mut(dgamma, K, "dgamma"),
        values_mut(dbeta, K, "dbeta"),
    );
    for ch in 0..c {
        dbeta[ch] = (0..n).map(|i| partials[i * c + ch].0).sum();
        dgamma[ch] = (0..n).map(|i| partials[i * c + ch].1).sum();
    }
}

/// Gradient with respect to the input of training-mode batch norm over a batch of `count`
/// samples (`count` is the whole batch even when `x` holds only a part of it):
/// `dx = γ/σ · (dy − Σdy/M − x̂·Σdy·x̂/M)`, `M = count·hw`. Fully written.
///
/// # Shapes
/// `x`, `dy`, `dx: [n, c, hw]`; `mean`, `var`, `gamma`, `dgamma`, `dbeta: [c]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward_input(
    count: usize,
    x: ArrayView3<f32>,
    dy: ArrayView3<f32>,
    mean: ArrayView1<f64>,
    var: ArrayView1<f64>,
    gamma: ArrayView1<f32>,
    dgamma: ArrayView1<f64>,
    dbeta: ArrayView1<f64>,
    dx: ArrayViewMut3<f32>,
) {
    const K: &str = "batchnorm_backward_input";
    let (n, c, hw) = x.dim();
    assert_eq!(dy.dim(), x.dim(), "{K}: dy and x differ in shape");
    assert_eq!(dx.dim(), x.dim(), "{K}: dx and x differ in shape");
    let lens = [
        ("mean", mean.len()),
        ("var", var.len()),
        ("gamma", gamma.len()),
    ];
    check_channels(K, c, &lens);
    check_channels(K, c, &[("dgamma", dgamma.len()), ("dbeta", dbeta.len())]);
    let (x, dy) = (values(x, K, "x"), values(dy, K, "dy"));
    let (mean, var, gamma) = (
        values(mean, K, "mean"),
        values(var, K, "var"),
        values(gamma, K, "gamma"),
    );
    let (dgamma, dbeta) = (values(dgamma, K, "dgamma"), values(dbeta, K, "dbeta"));
    input_grad(
        n,
        count,
        c,
        hw,
        x,
        dy,
        mean,
        var,
        gamma,
        dgamma,
        dbeta,
        values_mut(dx, K, "dx"),
    );
}

#[allow(clippy::too_many_arguments)]
fn input_grad(
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
    use ndarray::{aview1, aview_mut1, Axis};
    use proptest::prelude::*;

    fn v3<T>(n: usize, c: usize, hw: usize, x: &[T]) -> ArrayView3<'_, T> {
        ArrayView3::from_shape((n, c, hw), x).expect("test shape")
    }

    fn v3m<T>(n: usize, c: usize, hw: usize, x: &mut [T]) -> ArrayViewMut3<'_, T> {
        ArrayViewMut3::from_shape((n, c, hw), x).expect("test shape")
    }

    fn v2m<T>(n: usize, c: usize, x: &mut [T]) -> ArrayViewMut2<'_, T> {
        ArrayViewMut2::from_shape((n, c), x).expect("test shape")
    }

    #[test]
    fn batch_statistics_and_output_match_hand_computed_values() {
        // n = 2, c = 1, hw = 2: values 1, 3 | 5, 7 → mean 4, biased variance 5.
        let x = [1.0, 3.0, 5.0, 7.0];
        let (mut mean, mut var) = ([f64::NAN], [f64::NAN]);
        let mut y = [f32::NAN; 4];
        let (g, b) = (aview1(&[2.0]), aview1(&[1.0]));
        let (mv, vv) = (aview_mut1(&mut mean), aview_mut1(&mut var));
        batchnorm_train_forward(v3(2, 1, 2, &x), g, b, v3m(2, 1, 2, &mut y), mv, vv);
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
        let (m, v, g, b) = (aview1(&mean), aview1(&var), aview1(&gamma), aview1(&beta));
        batchnorm_apply(v3(n, c, hw, &x), m, v, g, b, v3m(n, c, hw, &mut y));
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
        let mut mv = v2m(n, c, &mut moments);
        // Partials of samples 0..2 and 2..5 computed separately, as two threads would.
        let (x0, x1) = v3(n, c, hw, &x).split_at(Axis(0), 2);
        let (m0, m1) = mv.view_mut().split_at(Axis(0), 2);
        plane_moments(x0, m0);
        plane_moments(x1, m1);
        let (mut mean, mut var) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        combine_moments(hw, mv.view(), aview_mut1(&mut mean), aview_mut1(&mut var));
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
            let (xv, rv, gv) = (v3(n, c, hw, &x), v3(n, c, hw, &r), aview1(&gamma));
            let (mv, vv) = (aview_mut1(&mut mean), aview_mut1(&mut var));
            batchnorm_train_forward(xv, gv, aview1(&beta), v3m(n, c, hw, &mut y), mv, vv);
            assert_close(&y, &tu::batchnorm(n, c, hw, &xw, &gw, &bw, None).0, 1e-5, 1e-5, "y");

            let mut partials = vec![(f64::NAN, f64::NAN); n * c];
            let (mv, vv) = (aview1(&mean), aview1(&var));
            backward_partials(xv, rv, mv, vv, v2m(n, c, &mut partials));
            let (mut dgamma, mut dbeta) = (vec![f64::NAN; c], vec![f64::NAN; c]);
            let pv = ArrayView2::from_shape((n, c), &partials).expect("test shape");
            combine_partials(pv, aview_mut1(&mut dgamma), aview_mut1(&mut dbeta));
            let mut dx = vec![f32::NAN; x.len()];
            let (dg, db) = (aview1(&dgamma), aview1(&dbeta));
            batchnorm_backward_input(n, xv, rv, mv, vv, gv, dg, db, v3m(n, c, hw, &mut dx));

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
