//! libtorch engine (work in progress).
