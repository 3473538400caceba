//! Helpers shared by the integration tests: building IDX/CIFAR bytes and writing files.
#![allow(dead_code)]

use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::Write;
use std::path::{Path, PathBuf};

/// An IDX file of unsigned bytes with the given dimensions and payload (not checked).
pub fn idx_bytes(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    idx_bytes_typed(0x08, dims, payload)
}

/// An IDX file with an arbitrary type byte.
pub fn idx_bytes_typed(ty: u8, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, ty, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(payload);
    b
}

/// `bytes` gzip'd.
pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).expect("gzip into memory");
    e.finish().expect("gzip into memory")
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write test file");
    p
}

/// A CIFAR-10 record: label, then 3072 pixels derived from `seed`.
pub fn cifar_record(label: u8, seed: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend((0..3072u32).map(|j| (j as u8).wrapping_mul(7).wrapping_add(seed)));
    r
}
