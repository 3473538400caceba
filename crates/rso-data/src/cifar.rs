//! CIFAR-10 binary-batch reader.
//!
//! A batch file is a sequence of 3073-byte records: one label byte, then 3×32×32 pixel bytes,
//! channel-major (red plane, green plane, blue plane), which is already NCHW.

use crate::idx::check_labels;
use crate::{DataError, Dataset, Normalization, Result, Split};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Pixel bytes per CIFAR-10 image (3 channels × 32 × 32).
pub const CIFAR_IMAGE_BYTES: usize = 3 * 32 * 32;
/// Bytes per record of a CIFAR-10 binary batch: one label byte and the image.
pub const CIFAR_RECORD_BYTES: usize = 1 + CIFAR_IMAGE_BYTES;

/// How to get CIFAR-10 when it is missing.
const CIFAR_HINT: &str = "download the CIFAR-10 binary version and extract cifar-10-batches-bin";

/// The records of one CIFAR-10 binary batch file, still as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CifarBatch {
    /// One label per record, each `< 10`.
    pub labels: Vec<u8>,
    /// `labels.len() * 3072` pixel bytes, record-major, then channel, row, column.
    pub pixels: Vec<u8>,
}

/// Reads one CIFAR-10 binary batch file (e.g. `data_batch_1.bin`).
///
/// The file's length must be a non-zero multiple of 3073 bytes and every label `< 10`; errors
/// name the file.
pub fn read_cifar_batch(path: &Path) -> Result<CifarBatch> {
    let io_err = |error| DataError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing {
            path: path.to_path_buf(),
            hint: CIFAR_HINT.into(),
        },
        _ => io_err(e),
    })?;
    let len = file.metadata().map_err(io_err)?.len();
    let record = CIFAR_RECORD_BYTES as u64;
    if len == 0 || len % record != 0 {
        let mut head = Vec::new();
        (&file).take(64).read_to_end(&mut head).map_err(io_err)?;
        let what = crate::filetype::sniff(&head)
            .map_or_else(String::new, |kind| format!(" ({})", kind.describe()));
        return Err(DataError::format(
            path,
            format!(
                "length {len} is not a non-zero multiple of the {record}-byte record size{what}"
            ),
        ));
    }
    let len = usize::try_from(len)
        .map_err(|_| DataError::format(path, format!("length {len} does not fit in memory")))?;
    let mut bytes = Vec::with_capacity(len);
    // Read at most one byte more than the length checked above, in case the file grows.
    file.take(len as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() != len {
        return Err(DataError::format(
            path,
            format!(
                "changed while being read: expected {len} bytes, read {}",
                bytes.len()
            ),
        ));
    }
    let n = len / CIFAR_RECORD_BYTES;
    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * CIFAR_IMAGE_BYTES);
    for rec in bytes.chunks_exact(CIFAR_RECORD_BYTES) {
        labels.push(rec[0]);
        pixels.extend_from_slice(&rec[1..]);
    }
    check_labels(path, &labels, 10)?;
    Ok(CifarBatch { labels, pixels })
}

/// Loads `data_batch_1.bin`..`data_batch_5.bin` (training set) and `test_batch.bin` (test set)
/// from `dir`, or from `dir/cifar-10-batches-bin/` when `dir` itself holds no batch, scales
/// pixels to `[0, 1]` and applies `norm`.
pub fn load_cifar10(dir: &Path, norm: Normalization) -> Result<Split> {
    let base = resolve_dir(dir)?;
    let train = (1..=5)
        .map(|i| read_cifar_batch(&base.join(format!("data_batch_{i}.bin"))))
        .collect::<Result<Vec<_>>>()?;
    let test = read_cifar_batch(&base.join("test_batch.bin"))?;
    let mut split = Split::new(to_set(&train), to_set(&[test]));
    norm.apply(&mut split);
    Ok(split)
}

/// `dir` when it holds `data_batch_1.bin`, else `dir/cifar-10-batches-bin` when that is a
/// directory, else `dir` (so the missing-file error names the first batch).
fn resolve_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(DataError::Missing {
            path: dir.to_path_buf(),
            hint: CIFAR_HINT.into(),
        });
    }
    let nested = dir.join("cifar-10-batches-bin");
    if !dir.join("data_batch_1.bin").exists() && nested.is_dir() {
        Ok(nested)
    } else {
        Ok(dir.to_path_buf())
    }
}

/// Concatenates batches into one set with pixels scaled to `[0, 1]`.
fn to_set(batches: &[CifarBatch]) -> Dataset {
    let n: usize = batches.iter().map(|b| b.labels.len()).sum();
    let mut images = Vec::with_capacity(n * CIFAR_IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for b in batches {
        images.extend(b.pixels.iter().map(|&p| f32::from(p) / 255.0));
        labels.extend_from_slice(&b.labels);
    }
    Dataset {
        images,
        labels,
        channels: 3,
        height: 32,
        width: 32,
        classes: 10,
    }
}
