//! MNIST IDX reader (raw or gzip).
//!
//! An IDX file is a 4-byte magic `00 00 <type> <ndim>`, `ndim` big-endian `u32` dimensions, then
//! the payload. Only the unsigned-byte type (`0x08`) is supported. Every size the header claims
//! is checked against what the file can hold *before* anything of that size is allocated.

use crate::{DataError, Dataset, Normalization, Result, Split};
use flate2::read::MultiGzDecoder;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// An IDX file's content: its dimensions and its unsigned-byte payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Sizes of each dimension, outermost first.
    pub dims: Vec<usize>,
    /// `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

/// The IDX type byte of unsigned 8-bit data, the only type this reader supports.
const UBYTE: u8 = 0x08;

/// Deflate cannot expand data by more than about 1032:1, so a gzip file of `n` bytes cannot
/// decompress to more than `n * MAX_DEFLATE_RATIO` bytes (concatenated members included).
const MAX_DEFLATE_RATIO: u64 = 1032;

/// How to get MNIST when it is missing.
const MNIST_HINT: &str = "run scripts/fetch-mnist.sh";

/// Reads one IDX file of unsigned bytes; a path ending in `.gz` is decompressed.
///
/// Errors name the file: wrong magic or data type, a payload shorter (truncated) or longer
/// (trailing bytes) than the header's dimensions, or a header whose size overflows.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let io_err = |error| DataError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => DataError::Missing {
            path: path.to_path_buf(),
            hint: MNIST_HINT.into(),
        },
        _ => io_err(e),
    })?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let is_gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    if is_gz {
        let max_out = file_len.saturating_mul(MAX_DEFLATE_RATIO);
        read_idx_stream(
            MultiGzDecoder::new(BufReader::new(file)),
            path,
            Source::Gzip { max_out },
        )
    } else {
        read_idx_stream(BufReader::new(file), path, Source::Raw { file_len })
    }
}

/// What is known about the stream's size before reading its payload.
#[derive(Clone, Copy)]
enum Source {
    /// An uncompressed file of this many bytes.
    Raw { file_len: u64 },
    /// A gzip stream that cannot decompress to more than this many bytes.
    Gzip { max_out: u64 },
}

fn read_idx_stream(mut r: impl Read, path: &Path, src: Source) -> Result<IdxArray> {
    let fmt = |reason: String| DataError::format(path, reason);
    let io_err = |error| DataError::Io {
        path: path.to_path_buf(),
        error,
    };
    // `read_exact` that reports a short read as a truncated header rather than a bare EOF.
    let mut read_header = |buf: &mut [u8], what: &str| -> Result<()> {
        r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                fmt(format!("truncated header: file ends in the {what}"))
            }
            _ => io_err(e),
        })
    };

    let mut magic = [0u8; 4];
    read_header(&mut magic, "magic number")?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(fmt(format!(
            "not an IDX file: magic number {:02x} {:02x} {:02x} {:02x} does not start with 00 00",
            magic[0], magic[1], magic[2], magic[3]
        )));
    }
    if magic[2] != UBYTE {
        return Err(fmt(format!(
            "IDX data type 0x{:02x} ({}) is not supported; only unsigned bytes (0x08) are",
            magic[2],
            type_name(magic[2])
        )));
    }
    let ndim = usize::from(magic[3]);
    if ndim == 0 {
        return Err(fmt("IDX header declares 0 dimensions".into()));
    }
    let mut raw_dims = vec![0u8; 4 * ndim];
    read_header(&mut raw_dims, "dimension sizes")?;
    let dims: Vec<usize> = raw_dims
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let shape = dims
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("×");
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            fmt(format!(
                "header dimensions {shape} overflow the addressable size"
            ))
        })?;
    let expected64 = expected as u64;
    let header_len = 4 + 4 * ndim as u64;

    // Refuse a header that claims more than the file can hold, before allocating anything.
    let capacity = match src {
        Source::Raw { file_len } => {
            let payload = file_len.saturating_sub(header_len);
            if payload < expected64 {
                return Err(fmt(format!(
                    "truncated: header claims {shape} = {expected} bytes but the file holds {payload} payload bytes"
                )));
            }
            if payload > expected64 {
                return Err(fmt(format!(
                    "{} trailing bytes after the {shape} = {expected} bytes the header claims",
                    payload - expected64
                )));
            }
            expected
        }
        Source::Gzip { max_out } => {
            if expected64 > max_out {
                return Err(fmt(format!(
                    "truncated: header claims {shape} = {expected} bytes, more than this gzip \
                     file can decompress to (at most {max_out})"
                )));
            }
            // Never trust the header for an allocation: the Vec grows with what really arrives.
            0
        }
    };
    let mut data = Vec::with_capacity(capacity);
    r.take(expected64 + 1)
        .read_to_end(&mut data)
        .map_err(io_err)?;
    match data.len().cmp(&expected) {
        std::cmp::Ordering::Less => Err(fmt(format!(
            "truncated: header claims {shape} = {expected} bytes but the {} holds {}",
            if matches!(src, Source::Gzip { .. }) {
                "decompressed stream"
            } else {
                "file"
            },
            data.len()
        ))),
        std::cmp::Ordering::Greater => Err(fmt(format!(
            "trailing bytes after the {shape} = {expected} bytes the header claims"
        ))),
        std::cmp::Ordering::Equal => Ok(IdxArray { dims, data }),
    }
}

/// The IDX name of a data-type byte, for error messages.
fn type_name(t: u8) -> &'static str {
    match t {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "short",
        0x0C => "int",
        0x0D => "float",
        0x0E => "double",
        _ => "unknown type",
    }
}

/// Loads the four MNIST files from `dir` and normalises them.
///
/// Each of `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
/// `t10k-labels-idx1-ubyte` may be raw or gzip'd (`.gz` suffix); the raw file wins when both
/// exist. Images must be 28×28, labels `< 10`, and each label file must hold one label per image.
/// Pixels are scaled to `[0, 1]`, then `norm` is applied.
pub fn load_mnist(dir: &Path, norm: Normalization) -> Result<Split> {
    if !dir.is_dir() {
        return Err(DataError::Missing {
            path: dir.to_path_buf(),
            hint: MNIST_HINT.into(),
        });
    }
    let mut split = Split::new(
        mnist_set(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        mnist_set(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
    );
    norm.apply(&mut split);
    Ok(split)
}

/// `dir/name` if it exists, else `dir/name.gz` if that exists, else a `Missing` error.
fn find_raw_or_gz(dir: &Path, name: &str) -> Result<PathBuf> {
    let raw = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if raw.is_file() {
        Ok(raw)
    } else if gz.is_file() {
        Ok(gz)
    } else {
        Err(DataError::Missing {
            path: raw,
            hint: format!("nor {name}.gz; {MNIST_HINT}"),
        })
    }
}

/// Reads one image file and its label file into a checked [`Dataset`] with pixels in `[0, 1]`.
fn mnist_set(dir: &Path, images_name: &str, labels_name: &str) -> Result<Dataset> {
    let images_path = find_raw_or_gz(dir, images_name)?;
    let labels_path = find_raw_or_gz(dir, labels_name)?;
    let images = read_idx(&images_path)?;
    if images.dims.len() != 3 {
        return Err(DataError::format(
            &images_path,
            format!(
                "expected 3 dimensions (images×rows×columns), found {}",
                images.dims.len()
            ),
        ));
    }
    let (count, height, width) = (images.dims[0], images.dims[1], images.dims[2]);
    if (height, width) != (28, 28) {
        return Err(DataError::format(
            &images_path,
            format!("expected 28×28 MNIST images, found {height}×{width}"),
        ));
    }
    if count == 0 {
        return Err(DataError::format(&images_path, "holds no images"));
    }
    let labels = read_idx(&labels_path)?;
    if labels.dims.len() != 1 {
        return Err(DataError::format(
            &labels_path,
            format!("expected 1 dimension (labels), found {}", labels.dims.len()),
        ));
    }
    if labels.dims[0] != count {
        return Err(DataError::format(
            &labels_path,
            format!(
                "holds {} labels but {} holds {count} images",
                labels.dims[0],
                images_path.display()
            ),
        ));
    }
    check_labels(&labels_path, &labels.data, 10)?;
    Ok(Dataset {
        images: images.data.iter().map(|&p| f32::from(p) / 255.0).collect(),
        labels: labels.data,
        channels: 1,
        height,
        width,
        classes: 10,
    })
}

/// Errors (naming `path`) on the first label `>= classes`.
pub(crate) fn check_labels(path: &Path, labels: &[u8], classes: usize) -> Result<()> {
    match labels.iter().position(|&l| usize::from(l) >= classes) {
        Some(i) => Err(DataError::format(
            path,
            format!(
                "label {} of sample {i} is out of range (classes 0..{classes})",
                labels[i]
            ),
        )),
        None => Ok(()),
    }
}
