//! Results files: plain CSV (header on line 1, nothing but CSV after it, so any data tool
//! reads it with no options), each with its provenance in a `<name>.meta.json` beside it
//! ([`crate::provenance::Meta`]); both written atomically.

use crate::provenance::Meta;
use anyhow::Context;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One row of a training run's CSV: a round (RSO) or epoch (SGD) and the evaluation after it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundRow {
    /// Round number, 1-based.
    pub round: usize,
    /// Model name.
    pub model: String,
    /// `rso` or `sgd`.
    pub optimizer: String,
    /// Preset name.
    pub preset: String,
    /// Backend.
    pub backend: String,
    /// Device.
    pub device: String,
    /// Minibatch size.
    pub batch: usize,
    /// Wall time of this round's training, seconds (no evaluation).
    pub seconds: f64,
    /// Weights visited (RSO) or steps taken (SGD).
    pub steps: usize,
    /// Accepted changes (RSO); 0 for SGD.
    pub accepted: usize,
    /// Mean training-set cross-entropy after the round.
    pub train_loss: f64,
    /// Training-set accuracy after the round.
    pub train_acc: f64,
    /// Mean test-set cross-entropy after the round.
    pub test_loss: f64,
    /// Test-set accuracy after the round.
    pub test_acc: f64,
    // The columns a study compares methods on, after the ones above (whose order stays).
    /// RSO: `accepted / steps`. SGD: empty.
    pub accept_rate: Option<f64>,
    /// RSO: the annealing factor σ was scaled by in this round (1 without annealing). SGD:
    /// empty.
    pub sigma_scale: Option<f64>,
    /// Forward passes of one sample the round's training asked for (3·|batch| per RSO visit or
    /// SGD step; evaluation not counted; see [`rso_optim::RoundStats::forward_equivalents`]).
    /// Empty where unknown (rounds of a version-1 checkpoint it cannot be derived for).
    pub forward_equivalents: Option<u64>,
    /// The sum of `forward_equivalents` over rounds 1 to this one; empty once one is unknown.
    pub cumulative_forward_equivalents: Option<u64>,
    /// The sum of `seconds` over rounds 1 to this one.
    pub cumulative_seconds: f64,
    // The validation columns, after the study columns.
    /// Mean validation-set cross-entropy after the round (`--val-split`); empty without a
    /// validation set.
    pub val_loss: Option<f64>,
    /// Validation-set accuracy after the round (`--val-split`); empty without a validation set.
    pub val_acc: Option<f64>,
}

/// Column names of the time columns of a [`RoundRow`] CSV: the only ones that may differ
/// between two runs with the same settings.
pub const TIME_COLUMNS: [&str; 2] = ["seconds", "cumulative_seconds"];

/// Serialises `rows` as CSV, header on line 1.
pub fn csv_text<T: Serialize>(rows: &[T]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    Ok(String::from_utf8(
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?,
    )?)
}

/// The provenance file of the results file `path`: `X.csv` → `X.meta.json`, any other name
/// `N` → `N.meta.json`.
pub fn meta_path(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "csv") {
        path.with_extension("meta.json")
    } else {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".meta.json");
        path.with_file_name(name)
    }
}

/// Checks an output file's destination before any work is done: `path` (and its
/// `.meta.json`) is not a directory, absent or (with `force`) a file to replace, in an existing
/// directory where this process can create files (probed by creating one, so that a read-only
/// file system is found too; the results are written as a new file renamed into place).
///
/// # Errors
/// One line naming `flag`, the path and what is wrong.
pub fn check_writable(path: &Path, force: bool, flag: &str) -> anyhow::Result<()> {
    for p in [path.to_path_buf(), meta_path(path)] {
        anyhow::ensure!(
            !p.is_dir(),
            "{flag} {}: {} is a directory; give a file path",
            path.display(),
            p.display()
        );
        if p.exists() && !force {
            anyhow::bail!(
                "{flag} {}: {} exists; pass --force to replace it",
                path.display(),
                p.display()
            );
        }
        // A device or a pipe is never replaced, even with --force (the results are written to
        // a new file renamed into place, which would put a plain file where /dev/null was).
        anyhow::ensure!(
            !p.exists() || p.is_file(),
            "{flag} {}: {} is not a regular file; give a file path",
            path.display(),
            p.display()
        );
    }
    let dir = parent_dir(path);
    anyhow::ensure!(
        dir.is_dir(),
        "{flag} {}: directory {} does not exist",
        path.display(),
        dir.display()
    );
    probe_dir(&dir).with_context(|| {
        format!(
            "{flag} {}: cannot create files in {}",
            path.display(),
            dir.display()
        )
    })
}

/// The directory a file path is in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates (and removes) a file in `dir`: whether this process can write there.
pub fn probe_dir(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".rso-write-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// `path` with its directory resolved (symbolic links, `..`), to compare destinations; as
/// given, made absolute, when the directory cannot be resolved.
pub fn resolved(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_os_string());
    match (parent_dir(path).canonicalize(), name) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Writes a CSV results file and its `.meta.json`, each atomically (the provenance first, so a
/// reader of a new CSV finds provenance at least as new).
pub fn write_results(path: &Path, csv: &str, meta: &Meta) -> anyhow::Result<()> {
    write_file(&meta_path(path), &meta.to_json())?;
    write_file(path, csv)
}

/// Writes a whole file atomically: readers see the old content or the complete new one.
pub fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    rso_models::params::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
