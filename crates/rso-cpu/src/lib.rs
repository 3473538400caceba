//! Pure-Rust engine (work in progress).
