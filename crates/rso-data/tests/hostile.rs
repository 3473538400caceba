//! Property test: random bytes, random headers and mutated valid files never make the IDX or
//! CIFAR-10 readers panic; every error names the file. Fixed seed, fixed case count.

mod common;

use common::{cifar_record, gz, idx_bytes_typed, write};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rso_data::{read_cifar_batch, read_idx};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One edit of a byte string; positions are taken modulo its length.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, muts: &[Mutation]) {
    for m in muts {
        let n = bytes.len();
        match *m {
            Mutation::Flip(i, x) if n > 0 => bytes[i % n] ^= x,
            Mutation::Insert(i, b) => bytes.insert(i % (n + 1), b),
            Mutation::Delete(i) if n > 0 => {
                bytes.remove(i % n);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
            _ => {}
        }
    }
}

/// A dimension size: mostly small, sometimes huge.
fn dim() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0..6u32, 1 => any::<u32>(), 1 => Just(1 << 31), 1 => Just(u32::MAX)]
}

/// Candidate IDX contents: random bytes, random headers, and mutated valid files.
fn idx_input() -> impl Strategy<Value = Vec<u8>> {
    let random = prop::collection::vec(any::<u8>(), 0..300);
    let header = (
        prop_oneof![3 => Just(0x08u8), 1 => any::<u8>()],
        prop::collection::vec(dim(), 0..5),
        prop::option::of(any::<u8>()),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(ty, dims, ndim, payload)| {
            let mut b = idx_bytes_typed(ty, &dims, &payload);
            if let Some(n) = ndim {
                b[3] = n; // a dimension count that may disagree with the dimensions given
            }
            b
        });
    let valid = (
        prop::collection::vec(1..6u32, 1..4),
        prop::collection::vec(mutation(), 0..6),
    )
        .prop_map(|(dims, muts)| {
            let n: u32 = dims.iter().product();
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut b = idx_bytes_typed(0x08, &dims, &payload);
            mutate(&mut b, &muts);
            b
        });
    prop_oneof![random, header, valid]
}

/// Candidate CIFAR batch contents: random bytes, or 1–2 valid records mutated.
fn cifar_input() -> impl Strategy<Value = Vec<u8>> {
    let random = prop::collection::vec(any::<u8>(), 0..7000);
    let valid = (
        prop::collection::vec((0..12u8, any::<u8>()), 1..3),
        prop::collection::vec(mutation(), 0..4),
    )
        .prop_map(|(recs, muts)| {
            let mut b: Vec<u8> = recs.iter().flat_map(|&(l, s)| cifar_record(l, s)).collect();
            mutate(&mut b, &muts);
            b
        });
    prop_oneof![1 => random, 3 => valid]
}

/// Ok must be internally consistent; Err must name the file.
fn check<T>(
    r: &rso_data::Result<T>,
    path: &Path,
    ok: impl Fn(&T) -> bool,
) -> Result<(), TestCaseError> {
    match r {
        Ok(v) => prop_assert!(ok(v), "{}: inconsistent Ok", path.display()),
        Err(e) => {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            prop_assert!(
                e.to_string().contains(&name),
                "error does not name {name}: {e}"
            );
        }
    }
    Ok(())
}

#[test]
fn hostile_inputs_never_panic_and_errors_name_the_file() {
    let config = Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[0x5a; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let dir = tempfile::tempdir().unwrap();
    let (cases, reads) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let strategy = (
        idx_input(),
        prop::collection::vec(mutation(), 0..4),
        cifar_input(),
    );
    runner
        .run(&strategy, |(idx, gz_muts, cifar)| {
            cases.fetch_add(1, Ordering::Relaxed);
            let idx_ok = |a: &rso_data::IdxArray| a.data.len() == a.dims.iter().product::<usize>();
            let raw = write(dir.path(), "case-idx-ubyte", &idx);
            let r_raw = read_idx(&raw);
            check(&r_raw, &raw, idx_ok)?;
            // The same content gzip'd must read the same.
            let gzd = write(dir.path(), "case-idx-ubyte.gz", &gz(&idx));
            let r_gz = read_idx(&gzd);
            check(&r_gz, &gzd, idx_ok)?;
            match (&r_raw, &r_gz) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "raw {:?} but gzip {:?}", r_raw.is_ok(), r_gz.is_ok()),
            }
            // A damaged gzip stream.
            let mut bad = gz(&idx);
            mutate(&mut bad, &gz_muts);
            let badp = write(dir.path(), "case-bad-idx-ubyte.gz", &bad);
            check(&read_idx(&badp), &badp, idx_ok)?;
            let cp = write(dir.path(), "case_batch.bin", &cifar);
            let r = read_cifar_batch(&cp);
            check(&r, &cp, |b| {
                b.pixels.len() == 3072 * b.labels.len() && b.labels.iter().all(|&l| l < 10)
            })?;
            if let Ok(b) = &r {
                prop_assert_eq!(b.labels.len() * 3073, cifar.len());
            }
            reads.fetch_add(4, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "hostile inputs: {} cases, {} reader calls (read_idx raw/gz/damaged gz, read_cifar_batch)",
        cases.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed)
    );
}
