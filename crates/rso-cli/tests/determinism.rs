//! Determinism of the pure-Rust backend: the same seed gives the same per-round CSV rows (every
//! column but the wall time) and byte-identical final weights, from run to run and for one or
//! two worker threads (`--threads` for rayon; `MATMUL_NUM_THREADS` is set alike, in case
//! matrixmultiply's own sgemm threads are ever switched on again).
//!
//! The batch sizes are chosen so that the engine really splits work over threads: it does so
//! for steps of at least 400 000 multiply-adds over the batch (`PAR_MIN_WORK` in rso-cpu), and
//! one-conv's convolution costs 28 224 per sample (16 samples are enough), the paper model's
//! convolutions 113 000 to 1.8 million per sample (2 samples are enough for most). Evaluation
//! runs in chunks of up to 500 samples and splits as well.

mod common;

use common::{mnist_dir, rows_without_times, rso_command};
use std::path::Path;

/// Runs `rso --threads N train <args>` with matrixmultiply limited to N threads as well;
/// returns the CSV rows without the seconds column and the final weights.
fn run(args: &[&str], threads: usize, dir: &Path, tag: &str) -> (Vec<String>, Vec<u8>) {
    let csv = dir.join(format!("{tag}.csv"));
    let weights = dir.join(format!("{tag}.safetensors"));
    let data = mnist_dir();
    let threads_s = threads.to_string();
    let mut all = vec![
        "--threads",
        &threads_s,
        "train",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    all.extend([
        "--out",
        csv.to_str().unwrap(),
        "--save-weights",
        weights.to_str().unwrap(),
    ]);
    let out = rso_command()
        .args(&all)
        .env("MATMUL_NUM_THREADS", &threads_s)
        .output()
        .expect("run rso");
    assert!(
        out.status.success(),
        "rso {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (rows_without_times(&csv), std::fs::read(&weights).unwrap())
}

/// Runs `args` with 1 thread, then with 2 threads `runs_with_two` times; all must agree.
fn check(args: &[&str], rounds: usize, runs_with_two: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let (rows, weights) = run(args, 1, tmp.path(), "t1");
    assert_eq!(rows.len(), rounds + 1, "{rows:?}");
    for k in 0..runs_with_two {
        let (rows2, weights2) = run(args, 2, tmp.path(), &format!("t2-{k}"));
        assert_eq!(rows2, rows, "rows differ: 1 thread vs 2 threads (run {k})");
        assert!(
            weights2 == weights,
            "weights differ: 1 thread vs 2 threads (run {k})"
        );
    }
}

#[test]
fn rso_one_conv_is_deterministic_across_runs_and_thread_counts() {
    let args = [
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "2",
        "--batch-size",
        "16",
        "--train-limit",
        "300",
        "--test-limit",
        "100",
        "--seed",
        "21",
    ];
    check(&args, 2, 2);
}

#[test]
fn sgd_one_conv_is_deterministic_across_runs_and_thread_counts() {
    let args = [
        "--model",
        "one-conv",
        "--optimizer",
        "sgd",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--train-limit",
        "640",
        "--test-limit",
        "200",
        "--seed",
        "22",
    ];
    check(&args, 2, 2);
}

#[test]
fn sgd_paper_is_deterministic_across_thread_counts() {
    let args = [
        "--model",
        "paper",
        "--preset",
        "paper",
        "--optimizer",
        "sgd",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--train-limit",
        "64",
        "--test-limit",
        "32",
        "--seed",
        "23",
    ];
    check(&args, 2, 1);
}

#[test]
fn rso_paper_is_deterministic_across_thread_counts() {
    // One round of the paper preset on 10 images, two per minibatch: 12 016 weights visited,
    // BatchNorm with batch statistics, annealing and weight decay all exercised.
    let args = [
        "--model",
        "paper",
        "--preset",
        "paper",
        "--optimizer",
        "rso",
        "--rounds",
        "1",
        "--batch-size",
        "2",
        "--train-limit",
        "10",
        "--test-limit",
        "10",
        "--seed",
        "24",
    ];
    check(&args, 1, 1);
}

#[test]
fn the_other_forward_only_methods_are_deterministic_across_thread_counts() {
    for method in [
        ["--optimizer", "spsa", "--spsa-directions", "2"],
        ["--optimizer", "es", "--es-sigma", "0.02"],
        ["--optimizer", "cfd", "--cfd-block", "4"],
    ] {
        let mut args = vec![
            "--model",
            "one-conv",
            "--rounds",
            "1",
            "--batch-size",
            "16",
            "--train-limit",
            "300",
            "--test-limit",
            "100",
            "--seed",
            "23",
            // A few thousand steps of each (a whole round is 11 835 for SPSA and ES).
            "--max-forward-equivalents",
            "100000",
        ];
        args.extend(method);
        check(&args, 1, 1);
    }
}
