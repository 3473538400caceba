//! ReLU, `max(x, 0)`.

/// `y = max(x, 0)` elementwise.
pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "relu: length mismatch");
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x.max(0.0);
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
