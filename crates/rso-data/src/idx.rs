//! MNIST IDX reader (raw or gzip).
//!
//! An IDX file is a 4-byte magic `00 00 <type> <ndim>`, `ndim` big-endian `u32` dimensions, then
//! the payload. Only the unsigned-byte type (`0x08`) is supported. Every size the header claims
//! is checked against what the file can hold *before* anything of that size is allocated.

use crate::{DataError, Dataset, Normalization, Result, Split};
use flate2::bufread;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
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

/// The largest IDX payload read (2 GiB; EMNIST's largest file holds 0.55 GB): a header that
/// claims more is refused before anything is read.
pub const MAX_IDX_BYTES: u64 = 1 << 31;

/// gzip's magic bytes (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Reads one IDX file of unsigned bytes, gzip'd or not (decided from its first bytes, not its
/// name).
///
/// Errors name the file: wrong magic or data type (saying what the file is instead when it is
/// recognisably something else: empty, HTML, a Git LFS pointer, …), a payload shorter
/// (truncated) or longer (trailing bytes) than the header's dimensions, a header whose size
/// overflows or exceeds [`MAX_IDX_BYTES`].
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
    let mut reader = BufReader::new(file);
    let head = reader.fill_buf().map_err(io_err)?;
    if head.starts_with(&GZIP_MAGIC) {
        let max_out = file_len.saturating_mul(MAX_DEFLATE_RATIO);
        return read_idx_stream(GzMembers::new(reader), path, Source::Gzip { max_out });
    }
    if let Some(kind) = crate::filetype::sniff(&head[..head.len().min(64)]) {
        return Err(DataError::format(
            path,
            format!("not an IDX file: {}", kind.describe()),
        ));
    }
    read_idx_stream(reader, path, Source::Raw { file_len })
}

/// The members of a gzip stream one after the other (RFC 1952 allows several; each with any of
/// the optional header fields, which [`bufread::GzDecoder`] reads), then the end of the file:
/// zero bytes after the last member (padding some tools write) are accepted, anything else is
/// an error.
struct GzMembers<R: BufRead> {
    member: Option<bufread::GzDecoder<R>>,
}

impl<R: BufRead> GzMembers<R> {
    fn new(r: R) -> Self {
        GzMembers {
            member: Some(bufread::GzDecoder::new(r)),
        }
    }
}

impl<R: BufRead> Read for GzMembers<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(member) = self.member.as_mut() {
            let n = member.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // The member ended (trailer checked): another one, padding, or the end.
            let mut r = self.member.take().expect("a member").into_inner();
            let next = r.fill_buf()?;
            if next.starts_with(&GZIP_MAGIC) {
                self.member = Some(bufread::GzDecoder::new(r));
            } else {
                loop {
                    let rest = r.fill_buf()?;
                    if rest.is_empty() {
                        break;
                    }
                    if rest.iter().any(|&b| b != 0) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "bytes after the last gzip member that are neither a member nor \
                             zero padding",
                        ));
                    }
                    let len = rest.len();
                    r.consume(len);
                }
            }
        }
        Ok(0)
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

/// Reads an IDX header (magic, then the dimensions) from `r`; errors name `path`.
fn read_header(r: &mut impl Read, path: &Path) -> Result<Vec<usize>> {
    let fmt = |reason: String| DataError::format(path, reason);
    // `read_exact` that reports a short read as a truncated header rather than a bare EOF.
    let mut read = |buf: &mut [u8], what: &str| -> Result<()> {
        r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                fmt(format!("truncated header: file ends in the {what}"))
            }
            _ => DataError::Io {
                path: path.to_path_buf(),
                error: e,
            },
        })
    };
    let mut magic = [0u8; 4];
    read(&mut magic, "magic number")?;
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
    read(&mut raw_dims, "dimension sizes")?;
    Ok(raw_dims
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect())
}

fn read_idx_stream(mut r: impl Read, path: &Path, src: Source) -> Result<IdxArray> {
    let fmt = |reason: String| DataError::format(path, reason);
    let io_err = |error| DataError::Io {
        path: path.to_path_buf(),
        error,
    };
    let dims = read_header(&mut r, path)?;
    let ndim = dims.len();
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
    // (After the checks against the file, which say more about a lying header.)
    if expected64 > MAX_IDX_BYTES {
        return Err(fmt(format!(
            "header dimensions {shape} = {expected} bytes exceed the {MAX_IDX_BYTES} bytes this \
             reader accepts"
        )));
    }
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

/// The MNIST files' names: training images and labels, test images and labels.
pub const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Loads the four MNIST files from `dir` (as [`mnist_files`] finds them) and normalises them.
///
/// Each may be raw or gzip'd, whatever its name says. Images must be 28×28, labels `< 10`,
/// and each label file must hold one label per image. Pixels are scaled to `[0, 1]`, then
/// `norm` is applied.
pub fn load_mnist(dir: &Path, norm: Normalization) -> Result<Split> {
    let [train_images, train_labels, test_images, test_labels] = mnist_files(dir)?;
    let mut split = Split::new(
        mnist_set(&train_images, &train_labels)?,
        mnist_set(&test_images, &test_labels)?,
    );
    norm.apply(&mut split);
    Ok(split)
}

/// The four MNIST files in `dir`, in [`MNIST_FILES`] order. Each may be spelt as published
/// (`train-images-idx3-ubyte`) or as common archive tools extract it
/// (`train-images.idx3-ubyte`), each with or without `.gz`; the first of those that exists, in
/// that order, is used.
///
/// # Errors
/// [`DataError::Missing`] for `dir` or the first file with none of its spellings.
pub fn mnist_files(dir: &Path) -> Result<[PathBuf; 4]> {
    if !dir.is_dir() {
        return Err(DataError::Missing {
            path: dir.to_path_buf(),
            hint: MNIST_HINT.into(),
        });
    }
    let find = |name: &str| -> Result<PathBuf> {
        let dotted = name.replacen("-idx", ".idx", 1);
        let spellings = [
            name.to_string(),
            format!("{name}.gz"),
            dotted.clone(),
            format!("{dotted}.gz"),
        ];
        spellings
            .iter()
            .map(|s| dir.join(s))
            .find(|p| p.is_file())
            .ok_or_else(|| DataError::Missing {
                path: dir.join(name),
                hint: format!("nor {name}.gz, {dotted} or {dotted}.gz; {MNIST_HINT}"),
            })
    };
    Ok([
        find(MNIST_FILES[0])?,
        find(MNIST_FILES[1])?,
        find(MNIST_FILES[2])?,
        find(MNIST_FILES[3])?,
    ])
}

/// Reads one image file and its label file into a checked [`Dataset`] with pixels in `[0, 1]`.
fn mnist_set(images_path: &Path, labels_path: &Path) -> Result<Dataset> {
    let images = read_idx(images_path)?;
    if images.dims.len() != 3 {
        return Err(DataError::format(
            images_path,
            format!(
                "expected 3 dimensions (images×rows×columns), found {}",
                images.dims.len()
            ),
        ));
    }
    let (count, height, width) = (images.dims[0], images.dims[1], images.dims[2]);
    if (height, width) != (28, 28) {
        return Err(DataError::format(
            images_path,
            format!("expected 28×28 MNIST images, found {height}×{width}"),
        ));
    }
    if count == 0 {
        return Err(DataError::format(images_path, "holds no images"));
    }
    let labels = read_idx(labels_path)?;
    if labels.dims.len() != 1 {
        return Err(DataError::format(
            labels_path,
            format!("expected 1 dimension (labels), found {}", labels.dims.len()),
        ));
    }
    if labels.dims[0] != count {
        return Err(DataError::format(
            labels_path,
            format!(
                "holds {} labels but {} holds {count} images",
                labels.dims[0],
                images_path.display()
            ),
        ));
    }
    check_labels(labels_path, &labels.data, 10)?;
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
