//! Fully connected layer `y = W x + b` on flattened samples, `W: [d_out, d_in]`.

use super::{gemm, Mat};

/// `y[i] = W x[i] + b` for `x: [n, d_in]`, `y: [n, d_out]`.
pub fn dense_forward(
    n: usize,
    d_in: usize,
    d_out: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let beta = match bias {
        Some(b) => {
            for row in y[..n * d_out].chunks_exact_mut(d_out.max(1)) {
                row.copy_from_slice(&b[..d_out]);
            }
            1.0
        }
        None => 0.0,
    };
    gemm(
        n,
        d_in,
        d_out,
        Mat::rows(x, d_in),
        Mat::transposed(weight, d_in),
        beta,
        y,
        d_out,
    );
}

/// Gradient with respect to the input: `dx[i] = Wᵀ dy[i]` (fully written).
pub fn dense_backward_input(
    n: usize,
    d_in: usize,
    d_out: usize,
    dy: &[f32],
    weight: &[f32],
    dx: &mut [f32],
) {
    gemm(
        n,
        d_out,
        d_in,
        Mat::rows(dy, d_out),
        Mat::rows(weight, d_in),
        0.0,
        dx,
        d_in,
    );
}

/// Gradients with respect to weight (`Σᵢ dy[i] x[i]ᵀ`) and bias (`Σᵢ dy[i]`, in f64, sample
/// order), both fully written.
pub fn dense_backward_params(
    n: usize,
    d_in: usize,
    d_out: usize,
    x: &[f32],
    dy: &[f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    gemm(
        d_out,
        n,
        d_in,
        Mat::transposed(dy, d_out),
        Mat::rows(x, d_in),
        0.0,
        dweight,
        d_in,
    );
    if let Some(db) = dbias {
        for (j, d) in db[..d_out].iter_mut().enumerate() {
            *d = (0..n).map(|i| f64::from(dy[i * d_out + j])).sum::<f64>() as f32;
        }
    }
}
