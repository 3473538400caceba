//! Results files: per-round CSV rows, written atomically with a provenance header.

use crate::provenance::Provenance;
use anyhow::Context;
use serde::Serialize;
use std::path::Path;

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
}

/// Serialises `rows` as CSV (header included) after the provenance comment lines.
pub fn csv_text<T: Serialize>(provenance: &Provenance, rows: &[T]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    let body = String::from_utf8(w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    Ok(format!("{}{}", provenance.comment_lines(), body))
}

/// Refuses to replace an existing file unless `force`.
pub fn check_writable(path: &Path, force: bool, flag: &str) -> anyhow::Result<()> {
    if path.exists() && !force {
        anyhow::bail!(
            "{flag} {}: file exists; pass --force to replace it",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        anyhow::ensure!(
            dir.is_dir(),
            "{flag} {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Writes a whole file atomically: readers see the old content or the complete new one.
pub fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    rso_models::params::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
