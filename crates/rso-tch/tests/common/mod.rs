//! Shared fixtures of the rso-tch tests: the one tolerance helper, per-device instantiation,
//! random data and parameters, and the fixed proptest configuration.
#![allow(dead_code)] // each test file uses a different part

use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rso_data::{Dataset, Split};
use rso_models::{ModelSpec, ParamKind, Params};

/// A tolerance: `actual` is close to `expected` when
///
/// ```text
/// |actual − expected| <= atol + rtol · |expected|
/// ```
///
/// with `expected` from the reference engine (the pure-Rust CPU engine). Any NaN (or an
/// infinity, whose difference is NaN or infinite) never passes.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    /// Relative part, scaled by `|expected|`.
    pub rtol: f64,
    /// Absolute floor, for values near zero.
    pub atol: f64,
}

impl Tol {
    /// Relative tolerance `rtol` with an absolute floor of `rtol · scale`: for a vector whose
    /// largest reference magnitude is `scale`, elements near zero are held to the precision of the
    /// vector's largest element (summation-order rounding is relative to the terms, not to the
    /// result).
    pub fn scaled(rtol: f64, scale: f64) -> Tol {
        Tol {
            rtol,
            atol: rtol * scale,
        }
    }

    /// `|actual − expected| <= atol + rtol · |expected|`; false for any NaN.
    pub fn close(self, actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= self.atol + self.rtol * expected.abs()
    }

    /// Checks two equally long sequences element by element; the error names `what`, the first
    /// failing index and both values.
    pub fn check(self, what: &str, actual: &[f64], expected: &[f64]) -> Result<(), String> {
        if actual.len() != expected.len() {
            return Err(format!(
                "{what}: {} values, expected {}",
                actual.len(),
                expected.len()
            ));
        }
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            if !self.close(a, e) {
                return Err(format!(
                    "{what}[{i}]: {a} vs reference {e} (|diff| {:e} > {:e} + {:e}·|ref|)",
                    (a - e).abs(),
                    self.atol,
                    self.rtol
                ));
            }
        }
        Ok(())
    }
}

/// f32 values widened to f64 for [`Tol::check`].
pub fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Largest magnitude in `v` (at least `floor`).
pub fn max_abs(v: &[f64], floor: f64) -> f64 {
    v.iter().fold(floor, |m, x| m.max(x.abs()))
}

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
/// persistence files, ChaCha with a constant seed (the same cases on every run and machine).
pub fn runner(cases: u32) -> TestRunner {
    single_threaded();
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let seed: [u8; 32] = *b"rso-tch cross-backend fixed seed";
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed))
}

/// A small random data set for `spec`: `n` training and `n_test` test images of the spec's
/// shape, pixels standard normal, labels uniform.
pub fn random_split(spec: &ModelSpec, n: usize, n_test: usize, seed: u64) -> Split {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let [c, h, w] = spec.input;
    let mut set = |n: usize| Dataset {
        images: (0..n * c * h * w)
            .map(|_| Normal::new(0.0f32, 1.0).expect("σ > 0").sample(&mut rng))
            .collect(),
        labels: (0..n)
            .map(|_| rng.random_range(0..spec.classes as u8))
            .collect(),
        channels: c,
        height: h,
        width: w,
        classes: spec.classes,
    };
    let train = set(n);
    let test = set(n_test);
    Split { train, test }
}

/// Random parameters for `spec`: weights N(0, sqrt(2/fan_in)) (He), biases and β N(0, 0.1),
/// γ uniform in [0.5, 1.5).
pub fn random_params(spec: &ModelSpec, seed: u64) -> Params {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = Params::zeros(spec);
    for (s, v) in p.specs.iter().zip(p.values.iter_mut()) {
        let he = (2.0 / s.fan_in as f64).sqrt() as f32;
        for x in v.iter_mut() {
            *x = match s.kind {
                ParamKind::ConvWeight | ParamKind::DenseWeight => {
                    Normal::new(0.0, he).expect("σ > 0").sample(&mut rng)
                }
                ParamKind::ConvBias | ParamKind::DenseBias | ParamKind::BnBeta => {
                    Normal::new(0.0, 0.1f32).expect("σ > 0").sample(&mut rng)
                }
                ParamKind::BnGamma => rng.random_range(0.5..1.5),
            };
        }
    }
    p
}

/// `len` random indices (with repetition) into a training set of `n`.
pub fn random_batch(n: usize, len: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(0..n as u32)).collect()
}
