//! Shared fixtures of the rso-tch tests: per-device instantiation, the fixed proptest runner,
//! and these tests' recipe for random data and parameters (seeded shortcuts to the workspace's
//! test kit, `rso-testkit`, which also holds the one tolerance helper, `Tol`).
#![allow(dead_code)] // each test file uses a different part

use proptest::test_runner::TestRunner;
use rso_data::Split;
use rso_models::{ModelSpec, Params};
use rso_testkit::{rng, Pixels, RandomData, Weights};

/// The device a `*_cuda` test runs on, or `None` (skip, with a message) when no CUDA device is
/// usable. With `RSO_REQUIRE_CUDA=1` a missing GPU fails the test instead.
pub fn cuda_or_skip(test: &str) -> Option<&'static str> {
    if rso_tch::cuda_available() {
        return Some("cuda");
    }
    if std::env::var("RSO_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
        panic!("{test}: RSO_REQUIRE_CUDA=1 but no CUDA device is usable");
    }
    eprintln!("{test}: skipped, no CUDA device (set RSO_REQUIRE_CUDA=1 to fail instead)");
    None
}

/// One test body per property, instantiated per device (`*_cpu`, `*_cuda`), as candle does.
/// The body is a `fn(&str)` taking the device name.
#[macro_export]
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body("cpu")
        }

        #[test]
        fn $cuda() {
            if let Some(device) = common::cuda_or_skip(stringify!($cuda)) {
                $body(device)
            }
        }
    };
}

/// Makes libtorch single-threaded: the test harness already runs tests in parallel, and
/// libtorch's spinning OpenMP workers slow down by an order of magnitude on a busy machine.
pub fn single_threaded() {
    rso_tch::set_threads(1);
}

/// A proptest runner with a fixed configuration and seed: `cases` cases, no failure
/// persistence files, ChaCha with a constant seed (the same cases on every run and machine);
/// libtorch single-threaded.
pub fn runner(cases: u32) -> TestRunner {
    single_threaded();
    rso_testkit::proptest_runner(cases, b"rso-tch cross-backend fixed seed")
}

/// A small random data set for `spec`: `n` training and `n_test` test images of the spec's
/// shape, pixels standard normal, labels uniform, from `seed`.
pub fn random_split(spec: &ModelSpec, n: usize, n_test: usize, seed: u64) -> Split {
    RandomData::of(spec)
        .pixels(Pixels::Normal)
        .split(n, n_test, &mut rng(seed))
}

/// [`random_split`] with a validation set of `n_validation` more random images (drawn from
/// their own generator, so the training and test sets are [`random_split`]'s).
pub fn random_split_with_validation(
    spec: &ModelSpec,
    n: usize,
    n_test: usize,
    n_validation: usize,
    seed: u64,
) -> Split {
    let mut split = random_split(spec, n, n_test, seed);
    split.validation = RandomData::of(spec)
        .pixels(Pixels::Normal)
        .set(n_validation, &mut rng(seed ^ 0x7a11_da7e));
    split
}

/// Random parameters for `spec` from `seed`: weights N(0, sqrt(2/fan_in)) (He), biases and β
/// N(0, 0.1), γ uniform in [0.5, 1.5) ([`Weights::Normal`]).
pub fn random_params(spec: &ModelSpec, seed: u64) -> Params {
    rso_testkit::random_params(spec, Weights::Normal, &mut rng(seed))
}

/// `len` random indices (with repetition) into a training set of `n`, from `seed`.
pub fn random_batch(n: usize, len: usize, seed: u64) -> Vec<u32> {
    rso_testkit::random_batch(&mut rng(seed), n, len)
}
