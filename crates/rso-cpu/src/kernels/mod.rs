//! f32 NCHW kernels, one module per operation.
//!
//! Every kernel is single-threaded, takes `ndarray` views in its operation's dimensions
//! (activations `[n, c, h, w]`, or `[n, c, hw]` where only plane sizes matter, convolution
//! weights `[c_out, c_in, 3, 3]`, dense inputs `[n, d_in]`, …: each function's `# Shapes` says
//! which) and writes into caller-provided output views (each output element is written, never
//! read first). It checks the shapes against each other once per call, takes the views' values
//! as slices and runs its loops on them; the views must therefore be in standard (row-major,
//! contiguous) layout, which every `from_shape` view of a slice and every chunk of one along its
//! first axis is. Neither the checks nor the views copy or allocate. A mismatched shape or
//! another layout makes the kernel panic (each function's `# Panics`): shapes come from the
//! program, not from users.
//!
//! Reductions over samples run in sample order, so a caller that splits a batch into parts
//! along its first axis (`axis_chunks_iter`, `slice_axis`) and combines the parts in order gets
//! results that do not depend on how many threads ran the parts.

use ndarray::{ArrayView, ArrayViewMut, Dimension};

/// `acc + a·b`, fused when `FMA` (only ever true in code compiled with the `fma` feature).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(acc: f32, a: f32, b: f32) -> f32 {
    if FMA {
        a.mul_add(b, acc)
    } else {
        acc + a * b
    }
}

/// The values of a view in standard (row-major, contiguous) layout, without copying; panics
/// naming the kernel and the argument for any other layout.
#[track_caller]
#[inline(always)]
pub(crate) fn values<'a, T, D: Dimension>(
    v: ArrayView<'a, T, D>,
    kernel: &str,
    arg: &str,
) -> &'a [T] {
    match v.to_slice() {
        Some(s) => s,
        None => panic!("{kernel}: `{arg}` is not in standard (row-major, contiguous) layout"),
    }
}

/// [`values`] of a mutable view.
#[track_caller]
#[inline(always)]
pub(crate) fn values_mut<'a, T, D: Dimension>(
    v: ArrayViewMut<'a, T, D>,
    kernel: &str,
    arg: &str,
) -> &'a mut [T] {
    match v.into_slice() {
        Some(s) => s,
        None => panic!("{kernel}: `{arg}` is not in standard (row-major, contiguous) layout"),
    }
}

pub mod batchnorm;
pub mod conv;
pub mod dense;
pub mod loss;
pub mod pool;
pub mod relu;

/// A row-major or strided matrix view for [`gemm`]: data, row stride, column stride.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix (`cols` is the row stride).
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `cols` long.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// Highest element index a strided `rows × cols` matrix touches, plus one (0 when empty).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `C ← A·B + β·C` for `A: m×k`, `B: k×n` and a row-major, contiguous `C: m×n`, through
/// `matrixmultiply::sgemm`. With `beta == 0` `C` is only written. Panics when a view is too
/// short for its shape.
#[allow(unsafe_code)] // the one call into matrixmultiply's raw-pointer API
pub(crate) fn gemm(m: usize, k: usize, n: usize, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    assert!(
        extent(m, k, a.rs, a.cs) <= a.data.len(),
        "gemm: A too short"
    );
    assert!(
        extent(k, n, b.rs, b.cs) <= b.data.len(),
        "gemm: B too short"
    );
    assert!(m * n <= c.len(), "gemm: C too short");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assertions above keep every element sgemm reads or writes inside the slices;
    // C is borrowed mutably, so it aliases neither A nor B, and its rows do not overlap.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `dst.copy_from_slice(src)` for the short rows of image planes (7–28 values here) without a
/// `memcpy` call per row, which profiles showed costing more than the convolution itself:
/// fixed-width 8- and 4-value moves, the last one overlapping.
#[inline(always)]
pub(crate) fn copy_row(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    assert_eq!(n, src.len(), "copy_row: length mismatch");
    if n >= 8 {
        let mut i = 0;
        while i + 8 <= n {
            dst[i..i + 8].copy_from_slice(&src[i..i + 8]);
            i += 8;
        }
        if i < n {
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
    } else if n >= 4 {
        dst[..4].copy_from_slice(&src[..4]);
        dst[n - 4..].copy_from_slice(&src[n - 4..]);
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
    }
}
