//! MNIST IDX reader (raw or gzip). TODO: implemented by the data work item.

use crate::{Normalization, Result, Split};
use std::path::Path;

/// An IDX file's content: its dimensions and its unsigned-byte payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Sizes of each dimension, outermost first.
    pub dims: Vec<usize>,
    /// `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

/// Reads one IDX file of unsigned bytes; `.gz` files are decompressed.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    Err(crate::DataError::format(path, "not implemented yet"))
}

/// Loads the four MNIST files from `dir` (raw or `.gz`) and normalises them.
pub fn load_mnist(dir: &Path, norm: Normalization) -> Result<Split> {
    let _ = norm;
    Err(crate::DataError::format(dir, "not implemented yet"))
}
