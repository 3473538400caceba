//! `rso reproduce paper` end to end on a tiny MNIST-format data set: the results file with its
//! provenance, and a run checkpointed with `--checkpoint-dir` that `--resume` continues (here:
//! a finished run, which trains nothing and writes the same rows again).

mod common;

use common::{rows_without_times, rso_ok};
use std::path::Path;

/// Writes an IDX image file (`n` images of 28×28) and label file under `dir` with MNIST's names.
fn write_idx(dir: &Path, prefix: &str, n: usize, seed: u32) {
    let mut images = vec![0, 0, 8, 3];
    for d in [n as u32, 28, 28] {
        images.extend_from_slice(&d.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend_from_slice(&(n as u32).to_be_bytes());
    // A small linear congruential generator: deterministic pixels and labels.
    let mut x = seed;
    let mut next = || {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (x >> 24) as u8
    };
    for _ in 0..n * 784 {
        images.push(next());
    }
    for _ in 0..n {
        labels.push(next() % 10);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

#[test]
fn paper_writes_its_csv_and_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_idx(&data, "train", 8, 1);
    write_idx(&data, "t10k", 4, 2);
    let (data, first, again, ck) = (
        data.to_str().unwrap().to_string(),
        tmp.path().join("first"),
        tmp.path().join("again"),
        tmp.path().join("ck"),
    );
    rso_ok(&[
        "reproduce",
        "paper",
        "--rounds",
        "1",
        // A paper round visits all 12 016 weights: small batches keep it under a minute.
        "--batch-size",
        "4",
        "--data-dir",
        &data,
        "--out-dir",
        first.to_str().unwrap(),
        "--checkpoint-dir",
        ck.to_str().unwrap(),
    ]);
    let rows = rows_without_times(&first.join("paper_mnist.csv"));
    assert_eq!(rows.len(), 2, "header and one round: {rows:?}");
    assert!(rows[1].starts_with("1,"), "round 1 first: {rows:?}");
    assert!(ck.join("latest").exists(), "no checkpoint written");

    rso_ok(&[
        "reproduce",
        "paper",
        "--resume",
        ck.to_str().unwrap(),
        "--data-dir",
        &data,
        "--out-dir",
        again.to_str().unwrap(),
    ]);
    assert_eq!(rows_without_times(&again.join("paper_mnist.csv")), rows);

    // A resumed run's settings come from its checkpoint (a usage error from the parser).
    let out = common::rso(&[
        "reproduce",
        "paper",
        "--resume",
        ck.to_str().unwrap(),
        "--rounds",
        "3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--rounds"), "{err}");
}

#[test]
fn comparison_runs_as_a_study_with_seeds_and_reruns_nothing_that_is_done() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_idx(&data, "train", 24, 3);
    write_idx(&data, "t10k", 8, 4);
    let out = tmp.path().join("out");
    let args = [
        "reproduce",
        "comparison",
        "--models",
        "one-conv",
        "--rounds",
        "2",
        "--batch-size",
        "8",
        "--seeds",
        "2",
        "--data-dir",
        data.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ];
    let first = rso_ok(&args);
    assert!(first.contains("4 runs"), "{first}");
    let csv = out.join("comparison.csv");
    let (header, rows) = common::read_csv(&csv);
    assert_eq!(rows.len(), 2 * 2, "rso and sgd, 2 rounds each: {rows:?}");
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    for row in &rows {
        assert_eq!(row[col("n")], "2", "{row:?}");
        assert!(!row[col("test_acc_sd")].is_empty(), "{row:?}");
    }
    assert_eq!(common::meta(&csv)["settings"]["seeds"], 2);
    assert!(out.join("comparison.plan.toml").is_file());
    assert!(out.join("comparison/summary.csv").is_file());
    assert!(std::fs::read_to_string(out.join("comparison.svg"))
        .unwrap()
        .starts_with("<svg"));
    // Everything is done: the second time runs nothing and gives the same means.
    let again = rso_ok(&args);
    assert!(again.contains("0 to run"), "{again}");
    let strip = |rows: Vec<Vec<String>>| -> Vec<Vec<String>> {
        rows.into_iter()
            .map(|mut r| {
                r.remove(col("seconds_mean"));
                r
            })
            .collect()
    };
    assert_eq!(strip(common::read_csv(&csv).1), strip(rows));
}
