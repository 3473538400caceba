//! Fully connected layer `y = W x + b` on flattened samples, `W: [d_out, d_in]`.

use super::{gemm, madd, values, values_mut, Mat};
use crate::simd::simd_dispatch;
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2};

/// `y[i] = W x[i] + b`: one dot product per output, in a fixed order (16 partial sums, then
/// added pairwise).
///
/// # Shapes
/// `x: [n, d_in]`, `weight: [d_out, d_in]`, `bias: [d_out]`, `y: [n, d_out]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn dense_forward(
    x: ArrayView2<f32>,
    weight: ArrayView2<f32>,
    bias: Option<ArrayView1<f32>>,
    y: ArrayViewMut2<f32>,
) {
    const K: &str = "dense_forward";
    let ((n, d_in), d_out) = (x.dim(), weight.nrows());
    assert_eq!(weight.ncols(), d_in, "{K}: weight is not [d_out, d_in]");
    if let Some(b) = &bias {
        assert_eq!(b.len(), d_out, "{K}: bias is not [d_out]");
    }
    assert_eq!(y.dim(), (n, d_out), "{K}: y is not [n, d_out]");
    let (x, weight) = (values(x, K, "x"), values(weight, K, "weight"));
    let bias = bias.map(|b| values(b, K, "bias"));
    forward(n, d_in, d_out, x, weight, bias, values_mut(y, K, "y"));
}

simd_dispatch! {
    fn forward(
        n: usize,
        d_in: usize,
        d_out: usize,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) => forward_body::<FMA>
}

#[inline(always)]
fn forward_body<const FMA: bool>(
    n: usize,
    d_in: usize,
    d_out: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    // Blocks of 2 samples × 2 outputs share their loads; every output is the same `dot` with
    // the same lane order whatever block it falls in, so blocking does not change results.
    let mut i = 0;
    while i < n {
        let s = if i + 2 <= n { 2 } else { 1 };
        let mut j = 0;
        while j < d_out {
            let o = if j + 2 <= d_out { 2 } else { 1 };
            match (s, o) {
                (2, 2) => dots::<FMA, 2, 2>(i, j, d_in, d_out, x, weight, bias, y),
                (2, _) => dots::<FMA, 2, 1>(i, j, d_in, d_out, x, weight, bias, y),
                (_, 2) => dots::<FMA, 1, 2>(i, j, d_in, d_out, x, weight, bias, y),
                _ => dots::<FMA, 1, 1>(i, j, d_in, d_out, x, weight, bias, y),
            }
            j += o;
        }
        i += s;
    }
}

/// Lanes of partial sums per dot product.
const LANES: usize = 16;

/// `y[i + a][j + b] = bias[j + b] + x[i + a] · W[j + b]` for `a < S`, `b < O`: each dot
/// product in 16 lanes of partial sums, added pairwise.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dots<const FMA: bool, const S: usize, const O: usize>(
    i: usize,
    j: usize,
    d_in: usize,
    d_out: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let xs: [&[f32]; S] = std::array::from_fn(|a| &x[(i + a) * d_in..][..d_in]);
    let ws: [&[f32]; O] = std::array::from_fn(|b| &weight[(j + b) * d_in..][..d_in]);
    let mut acc = [[[0.0f32; LANES]; O]; S];
    let full = d_in / LANES * LANES;
    for k in (0..full).step_by(LANES) {
        let xv: [&[f32; LANES]; S] =
            std::array::from_fn(|a| xs[a][k..k + LANES].try_into().expect("lanes"));
        let wv: [&[f32; LANES]; O] =
            std::array::from_fn(|b| ws[b][k..k + LANES].try_into().expect("lanes"));
        for a in 0..S {
            for b in 0..O {
                for l in 0..LANES {
                    acc[a][b][l] = madd::<FMA>(acc[a][b][l], xv[a][l], wv[b][l]);
                }
            }
        }
    }
    for a in 0..S {
        for b in 0..O {
            let acc = &mut acc[a][b];
            for (l, k) in (full..d_in).enumerate() {
                acc[l] = madd::<FMA>(acc[l], xs[a][k], ws[b][k]);
            }
            let mut width = LANES;
            while width > 1 {
                width /= 2;
                for l in 0..width {
                    acc[l] += acc[l + width];
                }
            }
            y[(i + a) * d_out + j + b] = bias.map_or(0.0, |bias| bias[j + b]) + acc[0];
        }
    }
}

/// Gradient with respect to the input: `dx[i] = Wᵀ dy[i]` (fully written).
///
/// # Shapes
/// `dy: [n, d_out]`, `weight: [d_out, d_in]`, `dx: [n, d_in]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn dense_backward_input(dy: ArrayView2<f32>, weight: ArrayView2<f32>, dx: ArrayViewMut2<f32>) {
    const K: &str = "dense_backward_input";
    let ((n, d_out), d_in) = (dy.dim(), weight.ncols());
    assert_eq!(weight.nrows(), d_out, "{K}: weight is not [d_out, d_in]");
    assert_eq!(dx.dim(), (n, d_in), "{K}: dx is not [n, d_in]");
    let (dy, weight) = (values(dy, K, "dy"), values(weight, K, "weight"));
    let dx = values_mut(dx, K, "dx");
    gemm(
        n,
        d_out,
        d_in,
        Mat::rows(dy, d_out),
        Mat::rows(weight, d_in),
        0.0,
        dx,
    );
}

/// Gradients with respect to weight (`Σᵢ dy[i] x[i]ᵀ`) and bias (`Σᵢ dy[i]`, in f64, sample
/// order), both fully written.
///
/// # Shapes
/// `x: [n, d_in]`, `dy: [n, d_out]`, `dweight: [d_out, d_in]`, `dbias: [d_out]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn dense_backward_params(
    x: ArrayView2<f32>,
    dy: ArrayView2<f32>,
    dweight: ArrayViewMut2<f32>,
    dbias: Option<ArrayViewMut1<f32>>,
) {
    const K: &str = "dense_backward_params";
    let ((n, d_in), d_out) = (x.dim(), dy.ncols());
    assert_eq!(dy.nrows(), n, "{K}: dy is not [n, d_out]");
    assert_eq!(
        dweight.dim(),
        (d_out, d_in),
        "{K}: dweight is not [d_out, d_in]"
    );
    if let Some(db) = &dbias {
        assert_eq!(db.len(), d_out, "{K}: dbias is not [d_out]");
    }
    let (x, dy) = (values(x, K, "x"), values(dy, K, "dy"));
    let dweight = values_mut(dweight, K, "dweight");
    let dbias = dbias.map(|db| values_mut(db, K, "dbias"));
    gemm(
        d_out,
        n,
        d_in,
        Mat::transposed(dy, d_out),
        Mat::rows(x, d_in),
        0.0,
        dweight,
    );
    if let Some(db) = dbias {
        for (j, d) in db[..d_out].iter_mut().enumerate() {
            *d = (0..n).map(|i| f64::from(dy[i * d_out + j])).sum::<f64>() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        self as tu, assert_close, config, dot, integers, numeric_grad, uniform, wide,
    };
    use ndarray::{aview1, aview_mut1};
    use proptest::prelude::*;

    fn v2(rows: usize, cols: usize, x: &[f32]) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((rows, cols), x).expect("test shape")
    }

    fn v2m(rows: usize, cols: usize, x: &mut [f32]) -> ArrayViewMut2<'_, f32> {
        ArrayViewMut2::from_shape((rows, cols), x).expect("test shape")
    }

    #[test]
    fn forward_matches_hand_computed_values() {
        // W = [[1, 2, 3], [-1, 0, 1]], b = [0.5, -0.5]; two samples.
        let w = [1.0, 2.0, 3.0, -1.0, 0.0, 1.0];
        let x = [1.0, 1.0, 1.0, 2.0, 0.0, -1.0];
        let mut y = [f32::NAN; 4];
        let b = [0.5, -0.5];
        dense_forward(
            v2(2, 3, &x),
            v2(2, 3, &w),
            Some(aview1(&b)),
            v2m(2, 2, &mut y),
        );
        assert_eq!(y, [6.5, -0.5, -0.5, -3.5]);
        dense_forward(v2(2, 3, &x), v2(2, 3, &w), None, v2m(2, 2, &mut y));
        assert_eq!(y, [6.0, 0.0, -1.0, -3.0]);
    }

    #[test]
    fn matches_naive_loops_and_is_the_exact_adjoint_on_integers() {
        let mut rng = tu::rng(4);
        let (n, d_in, d_out) = (5, 37, 10);
        let x = integers(&mut rng, n * d_in, 3);
        let w = integers(&mut rng, d_out * d_in, 3);
        let b = integers(&mut rng, d_out, 3);
        let dy = integers(&mut rng, n * d_out, 3);
        let mut y = vec![f32::NAN; n * d_out];
        let (xv, wv) = (v2(n, d_in, &x), v2(d_out, d_in, &w));
        dense_forward(xv, wv, Some(aview1(&b)), v2m(n, d_out, &mut y));
        assert_eq!(
            wide(&y),
            tu::dense(n, d_in, d_out, &wide(&x), &wide(&w), Some(&wide(&b)))
        );

        let mut dx = vec![f32::NAN; n * d_in];
        dense_backward_input(v2(n, d_out, &dy), wv, v2m(n, d_in, &mut dx));
        let (mut dw, mut db) = (vec![f32::NAN; w.len()], vec![f32::NAN; d_out]);
        let (dwv, dbv) = (v2m(d_out, d_in, &mut dw), aview_mut1(&mut db));
        dense_backward_params(xv, v2(n, d_out, &dy), dwv, Some(dbv));
        let y0 = tu::dense(n, d_in, d_out, &wide(&x), &wide(&w), None);
        assert_eq!(dot(&dy, &y0), dot(&dx, &wide(&x)));
        assert_eq!(
            dot(&dy, &wide(&y)),
            dot(&dw, &wide(&w)) + dot(&db, &wide(&b))
        );
    }

    proptest! {
        #![proptest_config(config(24))]
        #[test]
        fn gradients_match_finite_differences(
            n in 1usize..=4, d_in in 1usize..=20, d_out in 1usize..=6, seed in any::<u64>(),
        ) {
            let mut rng = tu::rng(seed);
            let x = uniform(&mut rng, n * d_in, 1.0);
            let w = uniform(&mut rng, d_out * d_in, 1.0);
            let b = uniform(&mut rng, d_out, 1.0);
            let r = uniform(&mut rng, n * d_out, 1.0);
            let (xw, ww, bw) = (wide(&x), wide(&w), wide(&b));
            let loss = |x: &[f64], w: &[f64], b: &[f64]| dot(&r, &tu::dense(n, d_in, d_out, x, w, Some(b)));

            let mut dx = vec![f32::NAN; x.len()];
            let (xv, wv, rv) = (v2(n, d_in, &x), v2(d_out, d_in, &w), v2(n, d_out, &r));
            dense_backward_input(rv, wv, v2m(n, d_in, &mut dx));
            let (mut dw, mut db) = (vec![f32::NAN; w.len()], vec![f32::NAN; d_out]);
            dense_backward_params(xv, rv, v2m(d_out, d_in, &mut dw), Some(aview_mut1(&mut db)));

            assert_close(&dx, &numeric_grad(|x| loss(x, &ww, &bw), &xw, 1e-3), 1e-4, 1e-4, "dx");
            assert_close(&dw, &numeric_grad(|w| loss(&xw, w, &bw), &ww, 1e-3), 1e-4, 1e-4, "dw");
            assert_close(&db, &numeric_grad(|b| loss(&xw, &ww, b), &bw, 1e-3), 1e-4, 1e-4, "db");
        }
    }
}
