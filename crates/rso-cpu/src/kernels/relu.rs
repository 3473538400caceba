//! ReLU, `max(x, 0)`.

use super::{values, values_mut};
use crate::simd::simd_dispatch;
use ndarray::{ArrayView, ArrayViewMut, Dimension};

/// `y = max(x, 0)` elementwise (NaN gives 0).
///
/// # Shapes
/// `x` and `y` of one shape, of any dimensions (elementwise: `[n, c, h, w]`, `[n, d]`, a flat
/// `[len]`, …).
///
/// # Panics
/// If the shapes differ, or a view is not in standard layout.
pub fn relu_forward<D: Dimension>(x: ArrayView<f32, D>, y: ArrayViewMut<f32, D>) {
    const K: &str = "relu_forward";
    assert_eq!(x.shape(), y.shape(), "{K}: x and y differ in shape");
    forward(values(x, K, "x"), values_mut(y, K, "y"));
}

simd_dispatch! {
    fn forward(x: &[f32], y: &mut [f32]) => forward_body::<FMA>
}

#[inline(always)]
fn forward_body<const FMA: bool>(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "relu: length mismatch");
    for (y, &x) in y.iter_mut().zip(x) {
        *y = if x > 0.0 { x } else { 0.0 };
    }
}

/// `dx = dy` where `x > 0`, else 0 (the subgradient at 0 is taken as 0).
///
/// # Shapes
/// `x`, `dy` and `dx` of one shape, of any dimensions.
///
/// # Panics
/// If the shapes differ, or a view is not in standard layout.
pub fn relu_backward<D: Dimension>(
    x: ArrayView<f32, D>,
    dy: ArrayView<f32, D>,
    dx: ArrayViewMut<f32, D>,
) {
    const K: &str = "relu_backward";
    assert_eq!(x.shape(), dy.shape(), "{K}: x and dy differ in shape");
    assert_eq!(x.shape(), dx.shape(), "{K}: x and dx differ in shape");
    backward(
        values(x, K, "x"),
        values(dy, K, "dy"),
        values_mut(dx, K, "dx"),
    );
}

fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(
        x.len() == dy.len() && x.len() == dx.len(),
        "relu: length mismatch"
    );
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        *dx = if x > 0.0 { dy } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self as tu, assert_close, config, dot, numeric_grad, uniform, wide};
    use ndarray::{aview1, aview_mut1};
    use proptest::prelude::*;

    #[test]
    fn relu_matches_hand_computed_values() {
        let x = [-2.0, -0.0, 0.0, 0.5, 3.0];
        let mut y = [f32::NAN; 5];
        relu_forward(aview1(&x), aview_mut1(&mut y));
        assert_eq!(y, [0.0, 0.0, 0.0, 0.5, 3.0]);
        let mut dx = [f32::NAN; 5];
        relu_backward(
            aview1(&x),
            aview1(&[1.0, 2.0, 3.0, 4.0, 5.0]),
            aview_mut1(&mut dx),
        );
        assert_eq!(dx, [0.0, 0.0, 0.0, 4.0, 5.0]);
    }

    proptest! {
        #![proptest_config(config(16))]
        #[test]
        fn gradient_matches_finite_differences_away_from_zero(len in 1usize..64, seed in any::<u64>()) {
            let mut rng = tu::rng(seed);
            let x: Vec<f32> = uniform(&mut rng, len, 1.0)
                .into_iter()
                .map(|v| if v.abs() < 1e-2 { v + 0.1 } else { v })
                .collect();
            let r = uniform(&mut rng, len, 1.0);
            let mut dx = vec![f32::NAN; len];
            relu_backward(aview1(&x), aview1(&r), aview_mut1(&mut dx));
            let fd = numeric_grad(|x| dot(&r, &tu::relu(x)), &wide(&x), 1e-4);
            assert_close(&dx, &fd, 1e-6, 1e-9, "relu");
        }
    }
}
