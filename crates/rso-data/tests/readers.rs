//! Round trips and error cases of the IDX and CIFAR-10 readers on small generated files.

mod common;

use common::{cifar_record, gz, idx_bytes, idx_bytes_typed, write};
use rso_data::{load_cifar10, load_mnist, read_cifar_batch, read_idx, DataError, Normalization};
use std::path::Path;
use std::time::{Duration, Instant};

const IMG: usize = 28 * 28;

/// The error's message, asserting it names `file`.
fn err_naming<T: std::fmt::Debug>(r: rso_data::Result<T>, file: &str) -> String {
    let e = r.expect_err("expected an error");
    let msg = e.to_string();
    assert!(msg.contains(file), "error does not name {file}: {msg}");
    msg
}

fn pixels(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes an MNIST directory: `train` and `test` are (image count, labels); images gz'd when
/// `gzip`.
fn write_mnist(dir: &Path, train_labels: &[u8], test_labels: &[u8], gzip: bool) {
    let sets = [("train", train_labels, 1u8), ("t10k", test_labels, 2u8)];
    for (prefix, labels, seed) in sets {
        let n = labels.len();
        let images = idx_bytes(&[n as u32, 28, 28], &pixels(n * IMG, seed));
        let labels = idx_bytes(&[n as u32], labels);
        let (images, suffix) = if gzip {
            (gz(&images), ".gz")
        } else {
            (images, "")
        };
        write(dir, &format!("{prefix}-images-idx3-ubyte{suffix}"), &images);
        write(dir, &format!("{prefix}-labels-idx1-ubyte"), &labels);
    }
}

#[test]
fn idx_round_trip_raw_and_gz() {
    let dir = tempfile::tempdir().unwrap();
    let payload = pixels(3 * 2 * 5, 9);
    let bytes = idx_bytes(&[3, 2, 5], &payload);
    for (name, content) in [
        ("a-idx3-ubyte", bytes.clone()),
        ("a-idx3-ubyte.gz", gz(&bytes)),
    ] {
        let a = read_idx(&write(dir.path(), name, &content)).unwrap();
        assert_eq!(a.dims, vec![3, 2, 5], "{name}");
        assert_eq!(a.data, payload, "{name}");
    }
    // Zero-sized dimension: an empty payload is exactly right.
    let a = read_idx(&write(dir.path(), "empty", &idx_bytes(&[0, 28, 28], &[]))).unwrap();
    assert_eq!((a.dims, a.data.len()), (vec![0, 28, 28], 0));
}

#[test]
fn mnist_round_trip_with_mixed_raw_and_gz_files() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), &[3, 0, 9], &[7, 1], true);
    let split = load_mnist(dir.path(), Normalization::UnitRange).unwrap();
    for (set, labels, seed) in [
        (&split.train, vec![3, 0, 9], 1u8),
        (&split.test, vec![7, 1], 2),
    ] {
        assert_eq!(set.labels, labels);
        assert_eq!(
            (set.channels, set.height, set.width, set.classes),
            (1, 28, 28, 10)
        );
        let want: Vec<f32> = pixels(labels.len() * IMG, seed)
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect();
        assert_eq!(set.images, want);
    }
}

#[test]
fn mnist_prefers_the_raw_file_over_the_gz_one() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), &[4], &[5], false);
    // A .gz with different labels beside the raw file must be ignored.
    write(
        dir.path(),
        "train-labels-idx1-ubyte.gz",
        &gz(&idx_bytes(&[1], &[8])),
    );
    let split = load_mnist(dir.path(), Normalization::UnitRange).unwrap();
    assert_eq!(split.train.labels, vec![4]);
}

#[test]
fn mnist_center_train_mean_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), &[1, 2, 3, 4], &[5], false);
    let split = load_mnist(dir.path(), Normalization::CenterTrainMean).unwrap();
    let mean: f64 = split
        .train
        .images
        .iter()
        .map(|&v| f64::from(v))
        .sum::<f64>()
        / split.train.images.len() as f64;
    assert!(mean.abs() < 1e-6, "train mean after centring: {mean}");
}

#[test]
fn cifar_round_trip_in_nested_directory() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&nested).unwrap();
    for i in 1..=5u8 {
        let mut b = cifar_record(i, i);
        b.extend(cifar_record(9 - i, 100 + i));
        write(&nested, &format!("data_batch_{i}.bin"), &b);
    }
    write(&nested, "test_batch.bin", &cifar_record(0, 200));
    let split = load_cifar10(dir.path(), Normalization::UnitRange).unwrap();
    assert_eq!(split.train.labels, vec![1, 8, 2, 7, 3, 6, 4, 5, 5, 4]);
    assert_eq!(split.test.labels, vec![0]);
    assert_eq!(
        (split.train.channels, split.train.height, split.train.width),
        (3, 32, 32)
    );
    // Record 3 is the second record of data_batch_2.bin: pixels channel-major, as stored.
    let want: Vec<f32> = cifar_record(7, 102)[1..]
        .iter()
        .map(|&p| p as f32 / 255.0)
        .collect();
    assert_eq!(split.train.image(3), &want[..]);
    // The flat directory works too.
    let split2 = load_cifar10(&nested, Normalization::UnitRange).unwrap();
    assert_eq!(split2.train, split.train);
}

#[test]
fn idx_wrong_magic_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = idx_bytes(&[1], &[0]);
    bad[0] = 0x1f;
    let msg = err_naming(read_idx(&write(dir.path(), "magic-idx", &bad)), "magic-idx");
    assert!(msg.contains("not an IDX file"), "{msg}");

    let float = idx_bytes_typed(0x0D, &[1], &[0, 0, 0, 0]);
    let msg = err_naming(
        read_idx(&write(dir.path(), "float-idx", &float)),
        "float-idx",
    );
    assert!(
        msg.contains("0x0d") && msg.contains("only unsigned bytes"),
        "{msg}"
    );

    let msg = err_naming(
        read_idx(&write(dir.path(), "short-idx", &[0, 0, 8])),
        "short-idx",
    );
    assert!(msg.contains("truncated header"), "{msg}");
    let no_dims = idx_bytes(&[3, 3], &[0; 9])[..6].to_vec();
    let msg = err_naming(
        read_idx(&write(dir.path(), "dims-idx", &no_dims)),
        "dims-idx",
    );
    assert!(msg.contains("truncated header"), "{msg}");
}

#[test]
fn idx_truncated_and_trailing_payload_raw_and_gz() {
    let dir = tempfile::tempdir().unwrap();
    let short = idx_bytes(&[4, 5], &[1; 19]);
    let long = idx_bytes(&[4, 5], &[1; 21]);
    for (name, bytes, want) in [
        ("short.idx", short.clone(), "truncated"),
        ("short.idx.gz", gz(&short), "truncated"),
        ("long.idx", long.clone(), "trailing bytes"),
        ("long.idx.gz", gz(&long), "trailing bytes"),
    ] {
        let msg = err_naming(read_idx(&write(dir.path(), name, &bytes)), name);
        assert!(
            msg.contains(want) && msg.contains("4×5 = 20 bytes"),
            "{msg}"
        );
    }
}

#[test]
fn idx_header_claiming_2_pow_31_images_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let huge = idx_bytes(&[1 << 31, 28, 28], &[0; 84]);
    assert_eq!(huge.len(), 100);
    for (name, bytes) in [("huge-idx3", huge.clone()), ("huge-idx3.gz", gz(&huge))] {
        let t = Instant::now();
        let msg = err_naming(read_idx(&write(dir.path(), name, &bytes)), name);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(
            msg.contains("2147483648×28×28 = 1683627180032 bytes"),
            "{msg}"
        );
    }
    // Dimensions whose product overflows usize.
    let over = idx_bytes(&[u32::MAX, u32::MAX, u32::MAX], &[]);
    let msg = err_naming(read_idx(&write(dir.path(), "over-idx", &over)), "over-idx");
    assert!(msg.contains("overflow"), "{msg}");
}

#[test]
fn idx_corrupt_gzip_stream_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = gz(&idx_bytes(&[64], &pixels(64, 3)));
    let n = bytes.len();
    bytes[n - 6] ^= 0xff; // inside the CRC32 trailer
    err_naming(
        read_idx(&write(dir.path(), "crc.idx.gz", &bytes)),
        "crc.idx.gz",
    );
    err_naming(
        read_idx(&write(dir.path(), "junk.gz", b"not gzip at all")),
        "junk.gz",
    );
}

#[test]
fn mnist_label_errors_name_the_label_file() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), &[1, 10, 2], &[0], false);
    let msg = err_naming(
        load_mnist(dir.path(), Normalization::UnitRange),
        "train-labels-idx1-ubyte",
    );
    assert!(msg.contains("label 10 of sample 1"), "{msg}");

    write_mnist(dir.path(), &[1, 2], &[0], false);
    write(
        dir.path(),
        "t10k-labels-idx1-ubyte",
        &idx_bytes(&[2], &[0, 1]),
    );
    let msg = err_naming(
        load_mnist(dir.path(), Normalization::UnitRange),
        "t10k-labels-idx1-ubyte",
    );
    assert!(
        msg.contains("holds 2 labels") && msg.contains("1 images"),
        "{msg}"
    );
}

#[test]
fn mnist_shape_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), &[1], &[0], false);
    write(
        dir.path(),
        "train-images-idx3-ubyte",
        &idx_bytes(&[1, 784], &[0; 784]),
    );
    let msg = err_naming(
        load_mnist(dir.path(), Normalization::UnitRange),
        "train-images-idx3-ubyte",
    );
    assert!(msg.contains("expected 3 dimensions"), "{msg}");
    write(
        dir.path(),
        "train-images-idx3-ubyte",
        &idx_bytes(&[1, 14, 56], &[0; 784]),
    );
    let msg = err_naming(
        load_mnist(dir.path(), Normalization::UnitRange),
        "train-images-idx3-ubyte",
    );
    assert!(msg.contains("28×28"), "{msg}");
    write(
        dir.path(),
        "train-images-idx3-ubyte",
        &idx_bytes(&[0, 28, 28], &[]),
    );
    err_naming(
        load_mnist(dir.path(), Normalization::UnitRange),
        "train-images-idx3-ubyte",
    );
}

#[test]
fn mnist_missing_directory_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("nowhere");
    let e = load_mnist(&absent, Normalization::UnitRange).unwrap_err();
    assert!(matches!(e, DataError::Missing { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("nowhere") && msg.contains("scripts/fetch-mnist.sh"),
        "{msg}"
    );

    write_mnist(dir.path(), &[1], &[0], false);
    std::fs::remove_file(dir.path().join("t10k-images-idx3-ubyte")).unwrap();
    let e = load_mnist(dir.path(), Normalization::UnitRange).unwrap_err();
    assert!(matches!(e, DataError::Missing { .. }));
    let msg = err_naming::<()>(Err(e), "t10k-images-idx3-ubyte");
    assert!(msg.contains("scripts/fetch-mnist.sh"), "{msg}");

    let msg = err_naming(read_idx(&dir.path().join("gone.gz")), "gone.gz");
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn cifar_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = cifar_record(1, 0);
    b.push(0);
    let msg = err_naming(
        read_cifar_batch(&write(dir.path(), "odd.bin", &b)),
        "odd.bin",
    );
    assert!(msg.contains("3074") && msg.contains("3073"), "{msg}");
    let msg = err_naming(
        read_cifar_batch(&write(dir.path(), "empty.bin", &[])),
        "empty.bin",
    );
    assert!(msg.contains("the file is empty"), "{msg}");
    let msg = err_naming(
        read_cifar_batch(&write(dir.path(), "page.bin", b"<html>Forbidden</html>")),
        "page.bin",
    );
    assert!(msg.contains("HTML page"), "{msg}");

    let mut b = cifar_record(1, 0);
    b.extend(cifar_record(10, 0));
    let msg = err_naming(
        read_cifar_batch(&write(dir.path(), "label.bin", &b)),
        "label.bin",
    );
    assert!(msg.contains("label 10 of sample 1"), "{msg}");

    // A full directory missing its test batch.
    for i in 1..=5 {
        write(
            dir.path(),
            &format!("data_batch_{i}.bin"),
            &cifar_record(0, 0),
        );
    }
    let e = load_cifar10(dir.path(), Normalization::UnitRange).unwrap_err();
    assert!(matches!(e, DataError::Missing { .. }));
    let msg = err_naming::<()>(Err(e), "test_batch.bin");
    assert!(msg.contains("cifar-10-batches-bin"), "{msg}");

    let e = load_cifar10(&dir.path().join("nowhere"), Normalization::UnitRange).unwrap_err();
    assert!(matches!(e, DataError::Missing { .. }), "{e}");
}

#[test]
fn gzip_or_raw_is_decided_by_the_content_not_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let payload = pixels(2 * 3, 4);
    let bytes = idx_bytes(&[2, 3], &payload);
    for (name, content) in [("raw.gz", bytes.clone()), ("gzipped-idx2", gz(&bytes))] {
        let a = read_idx(&write(dir.path(), name, &content)).unwrap();
        assert_eq!(a.data, payload, "{name}");
    }
}

/// A gzip member with the FHCRC flag (a CRC16 of its header), which writers rarely set.
fn gz_member_with_header_crc(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut member = vec![0x1f, 0x8b, 8, 0x02, 0, 0, 0, 0, 0, 255];
    let mut crc = flate2::Crc::new();
    crc.update(&member);
    member.extend_from_slice(&(crc.sum() as u16).to_le_bytes());
    let mut deflate = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    deflate.write_all(bytes).unwrap();
    member.extend(deflate.finish().unwrap());
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    member.extend_from_slice(&crc.sum().to_le_bytes());
    member.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    member
}

#[test]
fn gzip_reads_as_rfc_1952_allows_it() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let payload = pixels(3 * 100, 7);
    let file = idx_bytes(&[3, 100], &payload);
    let (a, rest) = file.split_at(50);
    let (b, c) = rest.split_at(120);
    // Three members: one with FEXTRA, FNAME and FCOMMENT, one with FHCRC, a plain one; then the
    // zero padding some tools write after the last member.
    let mut named = flate2::GzBuilder::new()
        .filename("train-images-idx3-ubyte")
        .comment("part 1")
        .extra(vec![b'r', b's', 2, 0, 1, 2])
        .write(Vec::new(), flate2::Compression::default());
    named.write_all(a).unwrap();
    let mut bytes = named.finish().unwrap();
    bytes.extend(gz_member_with_header_crc(b));
    bytes.extend(gz(c));
    let unpadded = bytes.len();
    bytes.extend(vec![0u8; 1000]);
    let read = read_idx(&write(dir.path(), "members.gz", &bytes)).unwrap();
    assert_eq!((read.dims, read.data), (vec![3, 100], payload.clone()));
    // Anything else after the last member is refused.
    bytes.truncate(unpadded);
    bytes.extend_from_slice(b"\0\0junk");
    let msg = err_naming(read_idx(&write(dir.path(), "junk.gz", &bytes)), "junk.gz");
    assert!(msg.contains("after the last gzip member"), "{msg}");
}

#[test]
fn files_that_are_something_else_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, what) in [
        ("empty-idx", &b""[..], "empty"),
        (
            "page-idx.gz",
            b"<!DOCTYPE html><html><body>Not found",
            "HTML page",
        ),
        (
            "pointer-idx.gz",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9912422\n",
            "Git LFS pointer",
        ),
    ] {
        let msg = err_naming(read_idx(&write(dir.path(), name, bytes)), name);
        assert!(msg.contains(what), "{msg}");
    }
}

#[test]
fn mnist_files_as_archive_tools_name_them_are_found() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), &[1, 2, 3], &[4, 5], true);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        std::fs::rename(&path, dir.path().join(name.replacen("-idx", ".idx", 1))).unwrap();
    }
    let files = rso_data::mnist_files(dir.path()).unwrap();
    let names: Vec<&str> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "train-images.idx3-ubyte.gz",
            "train-labels.idx1-ubyte",
            "t10k-images.idx3-ubyte.gz",
            "t10k-labels.idx1-ubyte"
        ]
    );
    let split = load_mnist(dir.path(), Normalization::UnitRange).unwrap();
    assert_eq!((split.train.len(), split.test.len()), (3, 2));
}

#[test]
fn a_payload_above_the_size_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let n = (rso_data::MAX_IDX_BYTES / 2 + 1) as u32;
    let header = idx_bytes(&[2, n], &[]);
    let path = write(dir.path(), "huge-idx2", &header);
    // A sparse file exactly as long as the header says: nothing else is wrong with it.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(header.len() as u64 + 2 * u64::from(n)).unwrap();
    let t = Instant::now();
    let msg = err_naming(read_idx(&path), "huge-idx2");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(msg.contains("exceed"), "{msg}");
}
