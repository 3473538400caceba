//! Data for the rso workspace: MNIST IDX and CIFAR-10 binary readers, normalisation, and the
//! in-memory [`Dataset`] every engine trains on.
//!
//! Readers check every header against the file's real size before allocating, so a corrupt or
//! hostile file yields a [`DataError`] naming the file, never a panic or a huge allocation.

#![forbid(unsafe_code)]

mod cifar;
mod error;
mod idx;
mod normalize;

pub use cifar::{
    load_cifar10, read_cifar_batch, CifarBatch, CIFAR_IMAGE_BYTES, CIFAR_RECORD_BYTES,
};
pub use error::DataError;
pub use idx::{load_mnist, read_idx, IdxArray};
pub use normalize::Normalization;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, DataError>;

/// Images (NCHW, `f32`, already normalised) and their class labels, held in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// `len * channels * height * width` pixel values, sample-major, then channel, row, column.
    pub images: Vec<f32>,
    /// One class label per sample, each `< classes`.
    pub labels: Vec<u8>,
    /// Channels per image (1 for MNIST, 3 for CIFAR-10).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of classes (10 for both supported datasets).
    pub classes: usize,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the set holds no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image (`channels * height * width`).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of sample `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Keeps only the first `n` samples (no-op when `n >= len`).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.labels.truncate(n);
            self.images.truncate(n * self.image_len());
        }
    }

    /// Gathers the samples at `indices` into a new contiguous set (used for minibatches and
    /// subsets). Panics if an index is out of range: indices come from the program, not users.
    pub fn gather(&self, indices: &[u32]) -> Dataset {
        let n = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i as usize));
            labels.push(self.labels[i as usize]);
        }
        Dataset {
            images,
            labels,
            ..self.header()
        }
    }

    /// The first value that is NaN or infinite, as (sample, offset within the image).
    pub fn first_non_finite(&self) -> Option<(usize, usize)> {
        let n = self.image_len().max(1);
        self.images
            .iter()
            .position(|v| !v.is_finite())
            .map(|p| (p / n, p % n))
    }

    fn header(&self) -> Dataset {
        Dataset {
            images: Vec::new(),
            labels: Vec::new(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            classes: self.classes,
        }
    }
}

/// A training set and a test set of the same image shape.
#[derive(Clone, Debug)]
pub struct Split {
    /// Samples the optimizers train on.
    pub train: Dataset,
    /// Held-out samples for evaluation.
    pub test: Dataset,
}
