//! Pure-Rust engine for the rso workspace: f32 NCHW [`kernels`] on `ndarray` views (a direct
//! convolution forward, im2col + `matrixmultiply` for the backward passes) and [`CpuNetwork`],
//! an implementation of [`rso_models::Network`].
//!
//! Results do not depend on the number of rayon threads: work is split over samples only, and
//! every reduction over samples (losses, BatchNorm statistics, gradients) is combined in a fixed
//! order.

// `unsafe` lives in `simd.rs` (dispatch — its macro's one `unsafe` call is written there and
// expands in the kernel modules —, prefetch, intrinsics), in the `sgemm` call of the `gemm`
// wrapper (`kernels/mod.rs`) and, for tests only, in the counting allocator of `testutil.rs`.
#![deny(unsafe_code)]

mod executor;
mod incremental;
pub mod kernels;
mod network;
#[allow(unsafe_code)]
pub mod simd;

pub use network::CpuNetwork;

#[cfg(test)]
mod testutil;
