//! The test kit of the rso workspace: what the tests of both backends (`rso-cpu`, `rso-tch`),
//! the criterion benches and the examples share. A dev-only crate (`publish = false`); it
//! depends on `rso-data` and `rso-models` only, never on an engine, so that `rso-cpu`'s own unit
//! tests can use it.
//!
//! - [`data`]: a seeded generator ([`rng`]), random data sets ([`RandomData`]), parameters
//!   ([`random_params`]), batches ([`random_batch`]) and values ([`uniform`]), and the slim
//!   paper model ([`slim_paper`]).
//! - [`tol`]: the one tolerance helper, [`Tol`], with [`wide`] and [`max_abs`].
//! - [`recorder`]: [`Recorder`] records the losses asked of a network; [`random_visits`] drives
//!   one through random RSO visits.
//! - [`visit`]: the generic check of a network's incremental RSO path against the reference
//!   path, [`check_visit`] and [`exercise`].
//! - [`proptest_config`] and [`proptest_runner`]: fixed-seed proptest set-ups.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod data;
pub mod recorder;
pub mod tol;
pub mod visit;

pub use data::{
    random_batch, random_batch_up_to, random_params, rng, slim_paper, uniform, Labels, Pixels,
    RandomData, Weights,
};
pub use recorder::{random_visits, Recorder};
pub use tol::{max_abs, wide, Tol};
pub use visit::{check_visit, exercise};

use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestRng, TestRunner};

/// A proptest configuration of `cases` cases drawn from the fixed seed `seed` (the same cases
/// on every run and machine), with no failure-persistence files.
pub fn proptest_config(cases: u32, seed: u64) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

/// A proptest runner of `cases` cases whose generator is ChaCha seeded with `seed` (the same
/// cases on every run and machine), with no failure-persistence files; for tests that drive
/// strategies by hand (`runner.run(&strategy, |value| ...)`).
pub fn proptest_runner(cases: u32, seed: &[u8; 32]) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, seed))
}
