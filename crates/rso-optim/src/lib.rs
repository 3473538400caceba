//! Optimizers (work in progress).
