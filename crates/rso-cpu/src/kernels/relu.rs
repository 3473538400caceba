//! ReLU, `max(x, 0)`.

use crate::simd::simd_dispatch;

simd_dispatch! {
    /// `y = max(x, 0)` elementwise (NaN gives 0).
    pub fn relu_forward(x: &[f32], y: &mut [f32]) => forward_body::<FMA>
}

#[inline(always)]
fn forward_body<const FMA: bool>(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "relu: length mismatch");
    for (y, &x) in y.iter_mut().zip(x) {
        *y = if x > 0.0 { x } else { 0.0 };
    }
}

/// `dx = dy` where `x > 0`, else 0 (the subgradient at 0 is taken as 0).
pub fn relu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
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
    use proptest::prelude::*;

    #[test]
    fn relu_matches_hand_computed_values() {
        let x = [-2.0, -0.0, 0.0, 0.5, 3.0];
        let mut y = [f32::NAN; 5];
        relu_forward(&x, &mut y);
        assert_eq!(y, [0.0, 0.0, 0.0, 0.5, 3.0]);
        let mut dx = [f32::NAN; 5];
        relu_backward(&x, &[1.0, 2.0, 3.0, 4.0, 5.0], &mut dx);
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
            relu_backward(&x, &r, &mut dx);
            let fd = numeric_grad(|x| dot(&r, &tu::relu(x)), &wide(&x), 1e-4);
            assert_close(&dx, &fd, 1e-6, 1e-9, "relu");
        }
    }
}
