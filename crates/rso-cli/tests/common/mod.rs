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

/// The columns of a `rso train` CSV, in order: the first 14, the study columns, then the
/// validation columns.
pub const COLUMNS: [&str; 21] = [
    "round",
    "model",
    "optimizer",
    "preset",
    "backend",
    "device",
    "batch",
    "seconds",
    "steps",
    "accepted",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "accept_rate",
    "sigma_scale",
    "forward_equivalents",
    "cumulative_forward_equivalents",
    "cumulative_seconds",
    "val_loss",
    "val_acc",
];

/// The time columns: the only ones that may differ between runs with the same settings.
pub const TIME_COLUMNS: [&str; 2] = ["seconds", "cumulative_seconds"];

/// A CSV results file as any data tool reads it with no options: the header on line 1, every
/// row as wide as the header. Returns the header and the rows.
pub fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        !text.starts_with('#'),
        "{}: a comment line\n{text}",
        path.display()
    );
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let rows = reader
        .records()
        .map(|r| {
            r.unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .iter()
                .map(String::from)
                .collect()
        })
        .collect();
    (header, rows)
}

/// The values of column `name` of a CSV results file.
pub fn column(path: &Path, name: &str) -> Vec<String> {
    let (header, rows) = read_csv(path);
    let i = header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("{}: no column {name} in {header:?}", path.display()));
    rows.into_iter().map(|mut r| r.swap_remove(i)).collect()
}

/// The lines of a `rso train` CSV (header included) without the time columns; checks the
/// header is [`COLUMNS`].
pub fn rows_without_times(path: &Path) -> Vec<String> {
    let (header, rows) = read_csv(path);
    assert_eq!(header, COLUMNS, "{}", path.display());
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !TIME_COLUMNS.contains(&header[i].as_str()))
        .collect();
    std::iter::once(header)
        .chain(rows)
        .map(|r| {
            keep.iter()
                .map(|&i| r[i].as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// The `.meta.json` beside the results file `path` (`X.csv` → `X.meta.json`), parsed.
pub fn meta(path: &Path) -> serde_json::Value {
    let meta = path.with_extension("meta.json");
    let text = std::fs::read_to_string(&meta).unwrap_or_else(|e| panic!("{}: {e}", meta.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", meta.display()))
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
