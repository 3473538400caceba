//! Data for the rso workspace: MNIST IDX and CIFAR-10 binary readers, normalisation, and the
//! in-memory [`Dataset`] every engine trains on.
//!
//! Readers check every header against the file's real size before allocating, so a corrupt or
//! hostile file yields a [`DataError`] naming the file, never a panic or a huge allocation.

#![forbid(unsafe_code)]

mod cifar;
mod error;
pub mod filetype;
mod idx;
mod normalize;

pub use cifar::{
    load_cifar10, read_cifar_batch, CifarBatch, CIFAR_IMAGE_BYTES, CIFAR_RECORD_BYTES,
};
pub use error::DataError;
pub use idx::{load_mnist, mnist_files, read_idx, IdxArray, MAX_IDX_BYTES, MNIST_FILES};
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

    /// Removes the samples from `at` on and returns them as a new set of the same image shape
    /// (empty when `at >= len`); this set keeps the first `at`.
    pub fn split_off(&mut self, at: usize) -> Dataset {
        if at >= self.len() {
            return self.header();
        }
        let images = self.images.split_off(at * self.image_len());
        let labels = self.labels.split_off(at);
        Dataset {
            images,
            labels,
            ..self.header()
        }
    }

    /// A set of no samples with this set's image shape and classes.
    pub fn empty_like(&self) -> Dataset {
        self.header()
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

/// A training set, a validation set and a test set of the same image shape.
///
/// The validation set is empty unless [`Split::hold_out_validation`] moved the tail of the
/// training set into it: it is for choosing settings without looking at the test set, and is
/// neither trained on nor used for anything but evaluation.
#[derive(Clone, Debug)]
pub struct Split {
    /// Samples the optimizers train on.
    pub train: Dataset,
    /// Held-out samples for evaluation.
    pub test: Dataset,
    /// Samples held out of the training set for choosing settings (often empty).
    pub validation: Dataset,
}

impl Split {
    /// A split of `train` and `test` with an empty validation set (of `train`'s image shape).
    pub fn new(train: Dataset, test: Dataset) -> Split {
        let validation = train.empty_like();
        Split {
            train,
            test,
            validation,
        }
    }

    /// Moves the last `n` training samples into the (empty) validation set, keeping their order:
    /// applied after a [`Dataset::truncate`] of the training set, it holds out the tail of the
    /// samples kept. Returns false, changing nothing, unless `1 <= n < train.len()` and the
    /// validation set is empty.
    #[must_use]
    pub fn hold_out_validation(&mut self, n: usize) -> bool {
        if n == 0 || n >= self.train.len() || !self.validation.is_empty() {
            return false;
        }
        self.validation = self.train.split_off(self.train.len() - n);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` one-pixel samples whose pixel and label are their index.
    fn set(n: usize) -> Dataset {
        Dataset {
            images: (0..n).map(|i| i as f32).collect(),
            labels: (0..n).map(|i| i as u8).collect(),
            channels: 1,
            height: 1,
            width: 1,
            classes: 10,
        }
    }

    #[test]
    fn a_new_split_has_an_empty_validation_set_of_the_training_shape() {
        let mut train = set(3);
        train.classes = 7;
        let split = Split::new(train, set(2));
        assert!(split.validation.is_empty());
        assert_eq!(split.validation.images.len(), 0);
        assert_eq!(split.validation.classes, 7);
        assert_eq!(split.validation.image_len(), 1);
    }

    #[test]
    fn holding_out_moves_the_training_tail_in_order() {
        let mut split = Split::new(set(10), set(2));
        split.train.truncate(8);
        assert!(split.hold_out_validation(3));
        assert_eq!(split.train.labels, [0, 1, 2, 3, 4]);
        assert_eq!(split.train.images, [0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(split.validation.labels, [5, 6, 7]);
        assert_eq!(split.validation.images, [5.0, 6.0, 7.0]);
        assert_eq!(split.test, set(2));
        // Once only.
        assert!(!split.hold_out_validation(1));
    }

    #[test]
    fn holding_out_none_or_everything_is_refused_unchanged() {
        for n in [0, 4, 5, 100] {
            let mut split = Split::new(set(4), set(2));
            assert!(!split.hold_out_validation(n), "{n}");
            assert_eq!(split.train, set(4));
            assert!(split.validation.is_empty());
        }
    }

    #[test]
    fn split_off_past_the_end_is_empty() {
        let mut s = set(3);
        let tail = s.split_off(3);
        assert!(tail.is_empty() && tail.images.is_empty());
        assert_eq!(s, set(3));
        let tail = s.split_off(1);
        assert_eq!(
            (s.labels.as_slice(), tail.labels.as_slice()),
            (&[0u8][..], &[1u8, 2][..])
        );
    }
}
