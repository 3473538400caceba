//! Helpers shared by the end-to-end tests of the `rso` binary.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The MNIST directory: the fetched copy, else the shared cache beside the checkout.
pub fn mnist_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for dir in [root.join("data/mnist"), root.join("../shared/data/mnist")] {
        if dir.join("train-labels-idx1-ubyte.gz").exists()
            || dir.join("train-labels-idx1-ubyte").exists()
        {
            return dir;
        }
    }
    panic!("MNIST not found: run scripts/fetch-mnist.sh");
}

/// A command running the `rso` binary under test.
pub fn rso_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rso"))
}

/// Runs `rso` with `args` to completion.
pub fn rso(args: &[&str]) -> Output {
    rso_command().args(args).output().expect("run rso")
}

/// Runs `rso` with `args`, which must succeed; returns stdout.
pub fn rso_ok(args: &[&str]) -> String {
    let out = rso(args);
    assert!(
        out.status.success(),
        "rso {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `rso` with `args`, which must fail with a one-line error and no panic; returns stderr.
pub fn rso_fails(args: &[&str]) -> String {
    let out = rso(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "rso {args:?} succeeded; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "rso {args:?} panicked: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "rso {args:?}: not one line: {err}"
    );
    err
}

/// Index of the `seconds` column in a `rso train` CSV, the only one that may differ between
/// runs with the same settings.
pub const SECONDS_COLUMN: usize = 7;

/// The data rows of a `rso train` CSV (header included, provenance comments dropped), without
/// the seconds column.
pub fn rows_without_seconds(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.starts_with("# command: "), "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let mut f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 14, "{l}");
            f.remove(SECONDS_COLUMN);
            f.join(",")
        })
        .collect()
}

/// Every file under `dir` (recursively) with its bytes, sorted by path.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}
