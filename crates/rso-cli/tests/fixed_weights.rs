//! Bit-for-bit stability of RSO on the pure-Rust backend: a seeded `rso train` of each model
//! must save exactly the weights committed in `tests/fixtures/weights/` (see its README for
//! the commands and the revision that produced them). The kernels are pinned to their AVX2+FMA
//! level (`RSO_SIMD=avx2`), the level they ran at when the files were made; on a CPU without
//! AVX2 and FMA the test says so and checks nothing. A change that alters the arithmetic on
//! purpose regenerates the files and says why.

mod common;

use common::{mnist_dir, rso_command};
use std::path::Path;

/// Arguments after `rso train --optimizer rso` for each fixture file.
const CASES: [(&str, &[&str]); 4] = [
    (
        "one-conv",
        &[
            "--model",
            "one-conv",
            "--rounds",
            "2",
            "--batch-size",
            "16",
            "--train-limit",
            "300",
            "--test-limit",
            "100",
            "--seed",
            "31",
        ],
    ),
    (
        "two-conv",
        &[
            "--model",
            "two-conv",
            "--rounds",
            "1",
            "--batch-size",
            "32",
            "--train-limit",
            "256",
            "--test-limit",
            "64",
            "--seed",
            "32",
        ],
    ),
    (
        "paper-seed",
        &[
            "--model",
            "paper",
            "--rounds",
            "1",
            "--batch-size",
            "8",
            "--train-limit",
            "32",
            "--test-limit",
            "16",
            "--seed",
            "33",
        ],
    ),
    (
        "paper-paper",
        &[
            "--model",
            "paper",
            "--preset",
            "paper",
            "--rounds",
            "1",
            "--batch-size",
            "4",
            "--train-limit",
            "18",
            "--test-limit",
            "16",
            "--seed",
            "34",
        ],
    ),
];

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs one case and returns the saved weights.
fn weights_of(name: &str, args: &[&str], dir: &Path) -> Vec<u8> {
    let out_path = dir.join(format!("{name}.safetensors"));
    let out = rso_command()
        .env("RSO_SIMD", "avx2")
        .args(["train", "--optimizer", "rso", "--data-dir"])
        .arg(mnist_dir())
        .args(args)
        .arg("--save-weights")
        .arg(&out_path)
        .output()
        .expect("run rso");
    assert!(
        out.status.success(),
        "rso train {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&out_path).expect("saved weights")
}

#[test]
fn seeded_rso_rounds_save_the_fixed_weights() {
    if !has_avx2_fma() {
        eprintln!("fixed_weights: skipped (the fixtures were made at the AVX2+FMA level, which this CPU lacks)");
        return;
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights");
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut differ = Vec::new();
    for (name, args) in CASES {
        let got = weights_of(name, args, tmp.path());
        let want = std::fs::read(fixtures.join(format!("{name}.safetensors"))).expect("fixture");
        if got != want {
            let bytes = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            differ.push(format!(
                "{name}: {bytes} bytes differ (lengths {} vs {})",
                got.len(),
                want.len()
            ));
        }
    }
    assert!(differ.is_empty(), "weights changed: {differ:?}");
}
