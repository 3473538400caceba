//! 2×2 stride-2 max and mean pooling, and global mean pooling, over independent planes.
//!
//! A batch `[n, c, h, w]` is `n·c` planes of `h × w`. The 2×2 pools produce `h/2 × w/2`
//! (rounded down; an odd last row or column is dropped and gets zero gradient).

use super::{values, values_mut};
use crate::simd::simd_dispatch;
use ndarray::{ArrayView2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut3, ArrayViewMut4};

/// 2×2 max pooling. Within a window the first maximum in row-major order wins (strict `>`),
/// which is also where [`maxpool2_backward`] routes the gradient.
///
/// # Shapes
/// `x: [n, c, h, w]`, `y: [n, c, h/2, w/2]` (rounded down).
///
/// # Panics
/// If `y`'s shape does not match `x`'s, or a view is not in standard layout.
pub fn maxpool2_forward(x: ArrayView4<f32>, y: ArrayViewMut4<f32>) {
    const K: &str = "maxpool2_forward";
    let (n, c, h, w) = x.dim();
    assert_eq!(
        y.dim(),
        (n, c, h / 2, w / 2),
        "{K}: y is not [n, c, h/2, w/2]"
    );
    max_forward(n * c, h, w, values(x, K, "x"), values_mut(y, K, "y"));
}

simd_dispatch! {
    fn max_forward(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32]) => max_body::<FMA>
}

#[inline(always)]
fn max_body<const FMA: bool>(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    if oh * ow == 0 {
        return;
    }
    for (xp, yp) in x
        .chunks_exact(h * w)
        .zip(y[..planes * oh * ow].chunks_exact_mut(oh * ow))
    {
        for (pair, yrow) in xp.chunks_exact(2 * w).zip(yp.chunks_exact_mut(ow)) {
            let (r0, r1) = (&pair[..2 * ow], &pair[w..w + 2 * ow]);
            for ((out, a), b) in yrow
                .iter_mut()
                .zip(r0.chunks_exact(2))
                .zip(r1.chunks_exact(2))
            {
                let mut m = a[0];
                for v in [a[1], b[0], b[1]] {
                    m = if v > m { v } else { m };
                }
                *out = m;
            }
        }
    }
}

/// Gradient of [`maxpool2_forward`]: each window's `dy` goes to its first maximum in `x`
/// (recomputed), everything else gets 0. `dx` is fully written.
///
/// # Shapes
/// `x: [n, c, h, w]`, `dy: [n, c, h/2, w/2]`, `dx: [n, c, h, w]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn maxpool2_backward(x: ArrayView4<f32>, dy: ArrayView4<f32>, dx: ArrayViewMut4<f32>) {
    const K: &str = "maxpool2_backward";
    let (n, c, h, w) = x.dim();
    assert_eq!(
        dy.dim(),
        (n, c, h / 2, w / 2),
        "{K}: dy is not [n, c, h/2, w/2]"
    );
    assert_eq!(dx.dim(), x.dim(), "{K}: dx and x differ in shape");
    let (x, dy, dx) = (
        values(x, K, "x"),
        values(dy, K, "dy"),
        values_mut(dx, K, "dx"),
    );
    max_backward(n * c, h, w, x, dy, dx);
}

fn max_backward(planes: usize, h: usize, w: usize, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    dx[..planes * h * w].fill(0.0);
    for p in 0..planes {
        let xp = &x[p * h * w..][..h * w];
        let dyp = &dy[p * oh * ow..][..oh * ow];
        let dxp = &mut dx[p * h * w..][..h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let window = [
                    2 * oy * w + 2 * ox,
                    2 * oy * w + 2 * ox + 1,
                    (2 * oy + 1) * w + 2 * ox,
                    (2 * oy + 1) * w + 2 * ox + 1,
                ];
                let mut best = window[0];
                for &k in &window[1..] {
                    if xp[k] > xp[best] {
                        best = k;
                    }
                }
                dxp[best] = dyp[oy * ow + ox];
            }
        }
    }
}

/// 2×2 mean pooling: `((x00 + x01) + (x10 + x11)) / 4`.
///
/// # Shapes
/// `x: [n, c, h, w]`, `y: [n, c, h/2, w/2]` (rounded down).
///
/// # Panics
/// If `y`'s shape does not match `x`'s, or a view is not in standard layout.
pub fn avgpool2_forward(x: ArrayView4<f32>, y: ArrayViewMut4<f32>) {
    const K: &str = "avgpool2_forward";
    let (n, c, h, w) = x.dim();
    assert_eq!(
        y.dim(),
        (n, c, h / 2, w / 2),
        "{K}: y is not [n, c, h/2, w/2]"
    );
    mean_forward(n * c, h, w, values(x, K, "x"), values_mut(y, K, "y"));
}

simd_dispatch! {
    fn mean_forward(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32]) => mean_body::<FMA>
}

#[inline(always)]
fn mean_body<const FMA: bool>(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    if oh * ow == 0 {
        return;
    }
    for (xp, yp) in x
        .chunks_exact(h * w)
        .zip(y[..planes * oh * ow].chunks_exact_mut(oh * ow))
    {
        for (pair, yrow) in xp.chunks_exact(2 * w).zip(yp.chunks_exact_mut(ow)) {
            let (r0, r1) = (&pair[..2 * ow], &pair[w..w + 2 * ow]);
            for ((out, a), b) in yrow
                .iter_mut()
                .zip(r0.chunks_exact(2))
                .zip(r1.chunks_exact(2))
            {
                *out = ((a[0] + a[1]) + (b[0] + b[1])) * 0.25;
            }
        }
    }
}

/// Gradient of [`avgpool2_forward`]: a quarter of each window's `dy` to each of its four inputs.
/// `dx` is fully written.
///
/// # Shapes
/// `dy: [n, c, h/2, w/2]`, `dx: [n, c, h, w]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn avgpool2_backward(dy: ArrayView4<f32>, dx: ArrayViewMut4<f32>) {
    const K: &str = "avgpool2_backward";
    let (n, c, h, w) = dx.dim();
    assert_eq!(
        dy.dim(),
        (n, c, h / 2, w / 2),
        "{K}: dy is not [n, c, h/2, w/2]"
    );
    mean_backward(n * c, h, w, values(dy, K, "dy"), values_mut(dx, K, "dx"));
}

fn mean_backward(planes: usize, h: usize, w: usize, dy: &[f32], dx: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    dx[..planes * h * w].fill(0.0);
    for p in 0..planes {
        let dyp = &dy[p * oh * ow..][..oh * ow];
        let dxp = &mut dx[p * h * w..][..h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let g = dyp[oy * ow + ox] * 0.25;
                for k in [2 * oy * w + 2 * ox, (2 * oy + 1) * w + 2 * ox] {
                    dxp[k] = g;
                    dxp[k + 1] = g;
                }
            }
        }
    }
}

/// Global mean pooling: `y[i, ch]` = mean of the plane `x[i, ch]` (`hw` values, summed in f64).
///
/// # Shapes
/// `x: [n, c, hw]` (planes flattened, `hw = h·w`), `y: [n, c]`.
///
/// # Panics
/// If `y`'s shape does not match `x`'s, or a view is not in standard layout.
pub fn global_avgpool_forward(x: ArrayView3<f32>, y: ArrayViewMut2<f32>) {
    const K: &str = "global_avgpool_forward";
    let (n, c, hw) = x.dim();
    assert_eq!(y.dim(), (n, c), "{K}: y is not [n, c]");
    gap_forward(n * c, hw, values(x, K, "x"), values_mut(y, K, "y"));
}

fn gap_forward(planes: usize, hw: usize, x: &[f32], y: &mut [f32]) {
    for (p, out) in y[..planes].iter_mut().enumerate() {
        let sum: f64 = x[p * hw..][..hw].iter().map(|&v| f64::from(v)).sum();
        *out = (sum / hw.max(1) as f64) as f32;
    }
}

/// Gradient of [`global_avgpool_forward`]: `dy[i, ch] / hw` to every value of the plane
/// `dx[i, ch]`.
///
/// # Shapes
/// `dy: [n, c]`, `dx: [n, c, hw]`.
///
/// # Panics
/// If the shapes do not match, or a view is not in standard layout.
pub fn global_avgpool_backward(dy: ArrayView2<f32>, dx: ArrayViewMut3<f32>) {
    const K: &str = "global_avgpool_backward";
    let (n, c, hw) = dx.dim();
    assert_eq!(dy.dim(), (n, c), "{K}: dy is not [n, c]");
    gap_backward(n * c, hw, values(dy, K, "dy"), values_mut(dx, K, "dx"));
}

fn gap_backward(planes: usize, hw: usize, dy: &[f32], dx: &mut [f32]) {
    let scale = 1.0 / hw.max(1) as f32;
    for (p, &g) in dy[..planes].iter().enumerate() {
        dx[p * hw..][..hw].fill(g * scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self as tu, assert_close, config, dot, numeric_grad, uniform, wide};
    use proptest::prelude::*;

    /// `[planes, 1, h, w]` views of flat planes.
    fn v4(planes: usize, h: usize, w: usize, x: &[f32]) -> ArrayView4<'_, f32> {
        ArrayView4::from_shape((planes, 1, h, w), x).expect("test shape")
    }

    fn v4m(planes: usize, h: usize, w: usize, x: &mut [f32]) -> ArrayViewMut4<'_, f32> {
        ArrayViewMut4::from_shape((planes, 1, h, w), x).expect("test shape")
    }

    fn v3(planes: usize, hw: usize, x: &[f32]) -> ArrayView3<'_, f32> {
        ArrayView3::from_shape((planes, 1, hw), x).expect("test shape")
    }

    fn v3m(planes: usize, hw: usize, x: &mut [f32]) -> ArrayViewMut3<'_, f32> {
        ArrayViewMut3::from_shape((planes, 1, hw), x).expect("test shape")
    }

    fn v2(planes: usize, x: &[f32]) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((planes, 1), x).expect("test shape")
    }

    fn v2m(planes: usize, x: &mut [f32]) -> ArrayViewMut2<'_, f32> {
        ArrayViewMut2::from_shape((planes, 1), x).expect("test shape")
    }

    #[test]
    fn max_pool_takes_the_first_maximum_and_drops_odd_edges() {
        // One 3×5 plane: windows (rows 0–1) × (cols 0–1, 2–3); row 2 and column 4 are dropped.
        #[rustfmt::skip]
        let x = [
            1.0, 3.0,   2.0, 2.0,   9.0,
            3.0, 2.0,   2.0, -1.0,  9.0,
            9.0, 9.0,   9.0, 9.0,   9.0,
        ];
        let mut y = [f32::NAN; 2];
        maxpool2_forward(v4(1, 3, 5, &x), v4m(1, 1, 2, &mut y));
        assert_eq!(y, [3.0, 2.0]);
        let mut dx = [f32::NAN; 15];
        maxpool2_backward(
            v4(1, 3, 5, &x),
            v4(1, 1, 2, &[10.0, 20.0]),
            v4m(1, 3, 5, &mut dx),
        );
        // Ties go to the first maximum in row-major window order: (0,1) and (0,2).
        #[rustfmt::skip]
        let want = [
            0.0, 10.0,  20.0, 0.0,  0.0,
            0.0, 0.0,   0.0, 0.0,   0.0,
            0.0, 0.0,   0.0, 0.0,   0.0,
        ];
        assert_eq!(dx, want);
    }

    #[test]
    fn mean_pools_match_hand_computed_values() {
        // Two 2×2 planes.
        let x = [1.0, 2.0, 3.0, 6.0, -4.0, 0.0, 0.0, 0.0];
        let mut y = [f32::NAN; 2];
        avgpool2_forward(v4(2, 2, 2, &x), v4m(2, 1, 1, &mut y));
        assert_eq!(y, [3.0, -1.0]);
        let mut dx = [f32::NAN; 8];
        avgpool2_backward(v4(2, 1, 1, &[4.0, -8.0]), v4m(2, 2, 2, &mut dx));
        assert_eq!(dx, [1.0, 1.0, 1.0, 1.0, -2.0, -2.0, -2.0, -2.0]);

        let mut g = [f32::NAN; 2];
        global_avgpool_forward(v3(2, 4, &x), v2m(2, &mut g));
        assert_eq!(g, [3.0, -1.0]);
        let mut dx = [f32::NAN; 8];
        global_avgpool_backward(v2(2, &[4.0, -8.0]), v3m(2, 4, &mut dx));
        assert_eq!(dx, [1.0, 1.0, 1.0, 1.0, -2.0, -2.0, -2.0, -2.0]);
    }

    #[test]
    fn pools_match_naive_loops() {
        let mut rng = tu::rng(3);
        let (planes, h, w) = (5, 7, 6);
        let x = tu::integers(&mut rng, planes * h * w, 9);
        for max in [true, false] {
            let mut y = vec![f32::NAN; planes * 3 * 3];
            if max {
                maxpool2_forward(v4(planes, h, w, &x), v4m(planes, 3, 3, &mut y));
            } else {
                avgpool2_forward(v4(planes, h, w, &x), v4m(planes, 3, 3, &mut y));
            }
            assert_eq!(
                wide(&y),
                tu::pool2(planes, h, w, &wide(&x), max),
                "max {max}"
            );
        }
        let mut g = vec![f32::NAN; planes];
        global_avgpool_forward(v3(planes, h * w, &x), v2m(planes, &mut g));
        assert_close(&g, &tu::gap(planes, h * w, &wide(&x)), 1e-6, 0.0, "gap");
    }

    proptest! {
        #![proptest_config(config(24))]
        #[test]
        fn gradients_match_finite_differences(
            planes in 1usize..=4, h in 2usize..=7, w in 2usize..=7, seed in any::<u64>(),
        ) {
            let mut rng = tu::rng(seed);
            let x = uniform(&mut rng, planes * h * w, 1.0);
            let xw = wide(&x);
            let r = uniform(&mut rng, planes * (h / 2) * (w / 2), 1.0);
            // Continuous random values: no ties, and a step of 1e-6 does not change any argmax.
            for max in [true, false] {
                let mut dx = vec![f32::NAN; x.len()];
                if max {
                    let dy = v4(planes, h / 2, w / 2, &r);
                    maxpool2_backward(v4(planes, h, w, &x), dy, v4m(planes, h, w, &mut dx));
                } else {
                    avgpool2_backward(v4(planes, h / 2, w / 2, &r), v4m(planes, h, w, &mut dx));
                }
                let fd = numeric_grad(|x| dot(&r, &tu::pool2(planes, h, w, x, max)), &xw, 1e-6);
                assert_close(&dx, &fd, 1e-4, 1e-5, if max { "max pool" } else { "mean pool" });
            }
            let r = &r[..planes];
            let mut dx = vec![f32::NAN; x.len()];
            global_avgpool_backward(v2(planes, r), v3m(planes, h * w, &mut dx));
            let fd = numeric_grad(|x| dot(r, &tu::gap(planes, h * w, x)), &xw, 1e-4);
            assert_close(&dx, &fd, 1e-4, 1e-6, "global mean pool");
        }
    }
}
