//! Pure-Rust engine for the rso workspace: f32 NCHW [`kernels`] (im2col + `matrixmultiply`)
//! and [`CpuNetwork`], an implementation of [`rso_models::Network`].
//!
//! Results do not depend on the number of rayon threads: work is split over samples only, and
//! every reduction over samples (losses, BatchNorm statistics, gradients) is combined in a fixed
//! order.

mod incremental;
pub mod kernels;
mod network;

pub use network::CpuNetwork;

#[cfg(test)]
mod testutil;
