//! Checkpoints of `rso train`, so a long run survives being stopped.
//!
//! # Layout
//!
//! ```text
//! DIR/latest                      one line: the name of the newest complete round directory
//! DIR/round-000003/state.json     the run's settings, progress and per-round rows ([`State`])
//! DIR/round-000003/weights.safetensors   the weights after that round (canonical names)
//! ```
//!
//! # Atomicity
//!
//! A checkpoint is written into `DIR/round-NNNNNN.tmp/` (both files fsynced, then the directory),
//! renamed to `DIR/round-NNNNNN/`, and only then is `DIR/latest` atomically replaced (temporary
//! file, fsync, rename, fsync of `DIR`). Older round directories are deleted last. A reader
//! follows `latest`, so at every instant it finds either the previous complete checkpoint or
//! the new complete one; a process killed anywhere leaves at worst a stray `.tmp` directory or an
//! unreferenced round directory, which the next write removes.
//!
//! # One writer
//!
//! A run holds an advisory lock on `DIR/.lock` ([`lock`]) while it writes checkpoints, so a
//! second run — a new one, or a `--resume` — refuses the directory instead of interleaving its
//! checkpoints with the first's. The operating system releases the lock when the process ends,
//! however it ends, so a killed run never leaves the directory locked.
//!
//! # What a checkpoint holds, and why that is enough
//!
//! Resuming after round `r` reproduces the uninterrupted run exactly because everything the
//! remaining rounds depend on is either stored or recomputed as a pure function of stored values:
//!
//! - the weights (bit-exact f32 in safetensors, with an FNV-1a checksum in `state.json`);
//! - the settings ([`RunConfig`]) and the number of completed rounds;
//! - random numbers: the generator of round `r` is a function of `(seed, r)` alone
//!   ([`rso_optim::round_rng`]), and the set-up draws (σ samples, the BatchNorm calibration
//!   subset) are functions of the seed, so no generator state is stored;
//! - optimizer state: what [`rso_optim::Optimizer::state`] returns (ES's σ and the counts of its
//!   current 1/5-rule window; nothing for RSO, whose schedule derives from the model and
//!   settings, SGD without momentum, SPSA and CFD);
//! - whether `--max-forward-equivalents` ended the run (`budget_reached`), so a resumed run
//!   that is over trains nothing;
//! - BatchNorm running statistics: not stored. Training (every optimizer) uses each minibatch's
//!   statistics, and before every evaluation `rso train` replaces the running statistics by
//!   those of a fixed training subset (chosen from the seed) under the current weights, so they
//!   are a function of the weights and are recomputed on resume;
//! - the data: not stored, but fingerprinted ([`DataFingerprint`]), so resuming on other data is
//!   refused;
//! - the CSV rows of the completed rounds, so the resumed run's `--out` holds every round.
//!
//! Floating-point values in `state.json` are written as strings holding Rust's shortest
//! round-trip decimal form, because JSON number parsing is not guaranteed to be correctly
//! rounded and one unit in the last place of σ or of a loss would break exact resumption.

use crate::args::{
    Backend, BatchPolicyArg, DatasetKind, DirectionArg, OptimizerKind, RsoEvalArg, TrainArgs,
};
use crate::output::RoundRow;
use anyhow::{bail, ensure, Context};
use clap::ValueEnum;
use rso_models::{ModelKind, ModelSpec, Params, Preset};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The `format` field of every `state.json`.
pub const FORMAT: &str = "rso-checkpoint";
/// The version of the layout this program writes. It reads every earlier version too
/// ([`upgrade_rows`] fills what an older one lacks); every change of the layout gets a new one.
///
/// - 1: the first layout;
/// - 2: rows gain `accept_rate`, `sigma_scale`, `forward_equivalents`,
///   `cumulative_forward_equivalents` and `cumulative_seconds`; `origin.command` is an argv
///   array (version 1: one string);
/// - 3: the optimizer's state across rounds (`optimizer_state`, for ES), whether the
///   forward-pass budget ended the run (`budget_reached`), and the settings of the forward-only
///   optimizers and of `--max-forward-equivalents` (absent where not given); versions 1 and 2
///   read as having none.
pub const VERSION: u32 = 3;
/// The oldest version this program reads.
pub const OLDEST_VERSION: u32 = 1;
/// The file naming the newest complete round directory.
pub const LATEST: &str = "latest";
/// The state file of a round directory.
pub const STATE: &str = "state.json";
/// The weights file of a round directory.
pub const WEIGHTS: &str = "weights.safetensors";
/// Largest `state.json` read (it holds a few hundred bytes per round).
const MAX_STATE_BYTES: u64 = 16 << 20;
/// Bytes a weights file may have beyond its tensors' data (the safetensors header).
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// The settings of a run that decide its results (every [`TrainArgs`] field except the
/// output paths), as strings and integers. See the module doc for why floats are strings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// `--model`.
    pub model: String,
    /// `--optimizer`.
    pub optimizer: String,
    /// `--preset`.
    pub preset: String,
    /// `--rounds`: the total of the run, including rounds already done.
    pub rounds: usize,
    /// `--batch-size`.
    pub batch_size: usize,
    /// `--seed`.
    pub seed: u64,
    /// `--dataset`.
    pub dataset: String,
    /// The dataset directory, absolute (a resumed run may name another one with the same data).
    #[serde(with = "path_bytes")]
    pub data_dir: PathBuf,
    /// `--train-limit`.
    pub train_limit: Option<usize>,
    /// `--test-limit`.
    pub test_limit: Option<usize>,
    /// `--val-split`. Absent (not `null`) when not given, so that the settings of a run without
    /// one serialise as before the flag existed: study run ids hash this serialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_split: Option<usize>,
    /// `--lr`.
    pub lr: String,
    /// `--sigma`.
    pub sigma: Option<String>,
    /// `--anneal`: `null` (the preset's), `"none"` or the floor α.
    pub anneal: Option<String>,
    /// `--weight-decay`.
    pub weight_decay: Option<String>,
    /// `--batch-policy`.
    pub batch_policy: Option<String>,
    /// `--rso-eval`.
    pub rso_eval: String,
    /// `--backend`.
    pub backend: String,
    /// `--device`.
    pub device: String,
    /// `--init-weights` of the original run (a record only: a resumed run starts from the
    /// checkpoint's weights).
    #[serde(with = "opt_path_bytes")]
    pub init_weights: Option<PathBuf>,
    // The settings below were added in version 3. Absent when not given (so a run that does not
    // give them serialises, and is identified in a study, exactly as before).
    /// `--sigma-multiplier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_multiplier: Option<String>,
    /// `--spsa-eps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spsa_eps: Option<String>,
    /// `--spsa-directions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spsa_directions: Option<usize>,
    /// `--spsa-dist`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spsa_dist: Option<String>,
    /// `--es-sigma`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub es_sigma: Option<String>,
    /// `--cfd-block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfd_block: Option<usize>,
    /// `--cfd-mu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfd_mu: Option<String>,
    /// `--max-forward-equivalents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_forward_equivalents: Option<u64>,
}

/// Sizes and a checksum of the loaded (normalised, truncated, split) data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFingerprint {
    /// Training samples.
    pub train: usize,
    /// Test samples.
    pub test: usize,
    /// FNV-1a over the shapes, the pixel bit patterns and the labels, 16 hex digits (of the
    /// training and test sets, then of the validation set when it is not empty, so a split
    /// without one keeps the checksum it had before validation sets existed).
    pub checksum: String,
}

impl DataFingerprint {
    /// The fingerprint of `split`.
    pub fn of(split: &rso_data::Split) -> DataFingerprint {
        let mut h = Fnv::new();
        let validation = (!split.validation.is_empty()).then_some(&split.validation);
        for set in [&split.train, &split.test].into_iter().chain(validation) {
            for n in [set.len(), set.channels, set.height, set.width, set.classes] {
                h.write(&(n as u64).to_le_bytes());
            }
            for x in &set.images {
                h.write_u32(x.to_bits());
            }
            h.write(&set.labels);
        }
        DataFingerprint {
            train: split.train.len(),
            test: split.test.len(),
            checksum: format!("{:016x}", h.0),
        }
    }
}

/// One CSV row as stored (floats as exact strings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRow {
    /// Round, 1-based.
    pub round: usize,
    /// Model name.
    pub model: String,
    /// Optimizer name.
    pub optimizer: String,
    /// Preset name.
    pub preset: String,
    /// Backend.
    pub backend: String,
    /// Device.
    pub device: String,
    /// Minibatch size.
    pub batch: usize,
    /// Training seconds of the round.
    pub seconds: String,
    /// Weights visited or steps taken.
    pub steps: usize,
    /// Accepted changes.
    pub accepted: usize,
    /// Training loss after the round.
    pub train_loss: String,
    /// Training accuracy after the round.
    pub train_acc: String,
    /// Test loss after the round.
    pub test_loss: String,
    /// Test accuracy after the round.
    pub test_acc: String,
    /// RSO's accept rate (absent in version 1).
    #[serde(default)]
    pub accept_rate: Option<String>,
    /// σ's annealing factor (absent in version 1).
    #[serde(default)]
    pub sigma_scale: Option<String>,
    /// Forward-equivalents of the round (absent in version 1).
    #[serde(default)]
    pub forward_equivalents: Option<u64>,
    /// Forward-equivalents up to this round (absent in version 1).
    #[serde(default)]
    pub cumulative_forward_equivalents: Option<u64>,
    /// Training seconds up to this round (absent in version 1, present in every later one).
    #[serde(default)]
    pub cumulative_seconds: Option<String>,
    /// Validation loss after the round; absent without a validation set (`--val-split`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<String>,
    /// Validation accuracy after the round; absent without a validation set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_acc: Option<String>,
}

impl SavedRow {
    /// The stored form of `row`.
    pub fn from_row(row: &RoundRow) -> SavedRow {
        SavedRow {
            round: row.round,
            model: row.model.clone(),
            optimizer: row.optimizer.clone(),
            preset: row.preset.clone(),
            backend: row.backend.clone(),
            device: row.device.clone(),
            batch: row.batch,
            seconds: row.seconds.to_string(),
            steps: row.steps,
            accepted: row.accepted,
            train_loss: row.train_loss.to_string(),
            train_acc: row.train_acc.to_string(),
            test_loss: row.test_loss.to_string(),
            test_acc: row.test_acc.to_string(),
            accept_rate: row.accept_rate.map(|x| x.to_string()),
            sigma_scale: row.sigma_scale.map(|x| x.to_string()),
            forward_equivalents: row.forward_equivalents,
            cumulative_forward_equivalents: row.cumulative_forward_equivalents,
            cumulative_seconds: Some(row.cumulative_seconds.to_string()),
            val_loss: row.val_loss.map(|x| x.to_string()),
            val_acc: row.val_acc.map(|x| x.to_string()),
        }
    }

    /// The row back, bit-exact. A version-1 row's `cumulative_seconds` comes back as its own
    /// `seconds`, until [`upgrade_rows`] sums them.
    pub fn to_row(&self) -> anyhow::Result<RoundRow> {
        let opt = |v: &Option<String>, what| v.as_deref().map(|s| float(s, what)).transpose();
        let seconds = float(&self.seconds, "seconds")?;
        Ok(RoundRow {
            round: self.round,
            model: self.model.clone(),
            optimizer: self.optimizer.clone(),
            preset: self.preset.clone(),
            backend: self.backend.clone(),
            device: self.device.clone(),
            batch: self.batch,
            seconds,
            steps: self.steps,
            accepted: self.accepted,
            train_loss: float(&self.train_loss, "train_loss")?,
            train_acc: float(&self.train_acc, "train_acc")?,
            test_loss: float(&self.test_loss, "test_loss")?,
            test_acc: float(&self.test_acc, "test_acc")?,
            accept_rate: opt(&self.accept_rate, "accept_rate")?,
            sigma_scale: opt(&self.sigma_scale, "sigma_scale")?,
            forward_equivalents: self.forward_equivalents,
            cumulative_forward_equivalents: self.cumulative_forward_equivalents,
            cumulative_seconds: opt(&self.cumulative_seconds, "cumulative_seconds")?
                .unwrap_or(seconds),
            val_loss: opt(&self.val_loss, "val_loss")?,
            val_acc: opt(&self.val_acc, "val_acc")?,
        })
    }
}

/// Rows read from a checkpoint of `version`, completed to this version's columns. Version-1
/// rows lack the study columns; they are derived from the run's settings (`args`) and training
/// set size (`train_len`) where that is exact: the accept rate and σ's annealing factor always,
/// the forward-equivalents where every minibatch of the round had the same size (SGD: every
/// sample once per epoch; RSO: the sequential policy, or a batch size dividing the training
/// set); otherwise that cell and the cumulative ones after it stay empty.
pub fn upgrade_rows(
    mut rows: Vec<RoundRow>,
    version: u32,
    args: &TrainArgs,
    train_len: usize,
) -> anyhow::Result<Vec<RoundRow>> {
    if version >= 2 {
        return Ok(rows);
    }
    let rso = match args.optimizer {
        OptimizerKind::Rso => Some(crate::train::rso_config(args)),
        OptimizerKind::Sgd => None,
        other => bail!(
            "optimizer {} in a version-{version} checkpoint (that version knew rso and sgd only)",
            crate::train::optimizer_name(other)
        ),
    };
    let (mut cumulative_fe, mut cumulative_s) = (Some(0u64), 0.0);
    for row in &mut rows {
        let fe = match &rso {
            None => Some(rso_optim::forward_equivalents(train_len)),
            Some(cfg) => {
                let b = cfg.batch_size.min(train_len);
                let equal = cfg.batch_policy == rso_optim::BatchPolicy::Sequential
                    || train_len.is_multiple_of(b.max(1));
                equal.then(|| rso_optim::forward_equivalents(b) * row.steps as u64)
            }
        };
        row.accept_rate = rso
            .as_ref()
            .map(|_| row.accepted as f64 / row.steps.max(1) as f64);
        row.sigma_scale = rso.as_ref().map(|c| c.anneal_factor(row.round - 1));
        row.forward_equivalents = fe;
        cumulative_fe = cumulative_fe.zip(fe).map(|(c, f)| c + f);
        row.cumulative_forward_equivalents = cumulative_fe;
        cumulative_s += row.seconds;
        row.cumulative_seconds = cumulative_s;
    }
    Ok(rows)
}

/// A command line as a checkpoint records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    /// The argv array (version 2 on; non-UTF-8 arguments lossily).
    Argv(Vec<String>),
    /// One line, arguments joined by spaces (version 1).
    Text(String),
}

impl CommandLine {
    /// The command as one line.
    pub fn display(&self) -> String {
        match self {
            CommandLine::Argv(v) => v
                .iter()
                .map(|a| crate::provenance::shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
            CommandLine::Text(t) => t.clone(),
        }
    }
}

/// Where a checkpointed run came from (recorded in resumed results files).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// The command line that started the run.
    pub command: CommandLine,
    /// `git describe` of the program that started it.
    pub revision: String,
    /// When it started (UTC).
    pub date: String,
}

/// The contents of `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] when written; any version from [`OLDEST_VERSION`] when read.
    pub version: u32,
    /// The run's settings.
    pub config: RunConfig,
    /// The data it trains and evaluates on.
    pub data: DataFingerprint,
    /// Rounds (epochs) finished; the weights are those after the last of them.
    pub rounds_completed: usize,
    /// FNV-1a of the weights file's bytes, 16 hex digits.
    pub weights_checksum: String,
    /// One row per completed round.
    pub rows: Vec<SavedRow>,
    /// Where the run came from.
    pub origin: Origin,
    /// The optimizer's state after the last completed round ([`rso_optim::Optimizer::state`];
    /// version 3 on, empty before).
    #[serde(default)]
    pub optimizer_state: std::collections::BTreeMap<String, String>,
    /// The last round stopped at `--max-forward-equivalents`: the run is over (version 3 on).
    #[serde(default)]
    pub budget_reached: bool,
}

/// A checkpoint read back from disk: its round directory and its state.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// `DIR/round-NNNNNN`.
    pub round_dir: PathBuf,
    /// Its `state.json`.
    pub state: State,
}

/// The name of the directory holding the checkpoint after `rounds` rounds.
pub fn round_dir_name(rounds: usize) -> String {
    format!("round-{rounds:06}")
}

/// `round-NNNNNN` → NNNNNN; anything else → `None`.
fn parse_round_dir_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("round-")?;
    if digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

fn float<T: std::str::FromStr>(s: &str, what: &str) -> anyhow::Result<T> {
    s.parse()
        .map_err(|_| anyhow::anyhow!("{what}: '{s}' is not a number"))
}

fn opt_float<T: std::str::FromStr>(s: &Option<String>, what: &str) -> anyhow::Result<Option<T>> {
    s.as_deref().map(|s| float(s, what)).transpose()
}

fn enum_name<E: ValueEnum>(v: &E) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

fn enum_value<E: ValueEnum>(s: &str, what: &str) -> anyhow::Result<E> {
    E::from_str(s, false).map_err(|_| {
        let names: Vec<String> = E::value_variants().iter().map(enum_name).collect();
        anyhow::anyhow!("{what}: '{s}' is not one of {}", names.join(", "))
    })
}

impl RunConfig {
    /// The settings of `args`, with the dataset directory made absolute.
    pub fn from_args(args: &TrainArgs, data_dir: &Path) -> RunConfig {
        RunConfig {
            model: args.model.name().to_string(),
            optimizer: enum_name(&args.optimizer),
            preset: args.preset.name().to_string(),
            rounds: args.rounds,
            batch_size: args.batch_size,
            seed: args.seed,
            dataset: enum_name(&args.dataset),
            data_dir: data_dir.to_path_buf(),
            train_limit: args.train_limit,
            test_limit: args.test_limit,
            val_split: args.val_split,
            lr: crate::train::lr(args).to_string(),
            sigma: args.sigma.map(|s| s.to_string()),
            anneal: args
                .anneal
                .map(|a| a.map_or_else(|| "none".to_string(), |a| a.to_string())),
            weight_decay: args.weight_decay.map(|w| w.to_string()),
            batch_policy: args.batch_policy.as_ref().map(enum_name),
            rso_eval: enum_name(&crate::train::rso_eval(args)),
            backend: enum_name(&args.backend),
            device: args.device.clone(),
            init_weights: args.init_weights.clone(),
            sigma_multiplier: args.sigma_multiplier.map(|s| s.to_string()),
            spsa_eps: args.spsa_eps.map(|s| s.to_string()),
            spsa_directions: args.spsa_directions,
            spsa_dist: args.spsa_dist.as_ref().map(enum_name),
            es_sigma: args.es_sigma.map(|s| s.to_string()),
            cfd_block: args.cfd_block,
            cfd_mu: args.cfd_mu.map(|s| s.to_string()),
            max_forward_equivalents: args.max_forward_equivalents,
        }
    }

    /// The arguments of the checkpointed run, taking from `cli` only what a resumed run may
    /// change: `--out`, `--save-weights`, `--force` and `--data-dir`. The result checkpoints
    /// into `dir` and is not itself a resume.
    pub fn to_args(&self, cli: &TrainArgs, dir: &Path) -> anyhow::Result<TrainArgs> {
        let model: ModelKind = self
            .model
            .parse()
            .map_err(|e: String| anyhow::anyhow!("model: {e}"))?;
        let preset: Preset = self
            .preset
            .parse()
            .map_err(|e: String| anyhow::anyhow!("preset: {e}"))?;
        let anneal = match self.anneal.as_deref() {
            None => None,
            Some("none") => Some(None),
            Some(a) => Some(Some(float::<f64>(a, "anneal")?)),
        };
        let optimizer = enum_value::<OptimizerKind>(&self.optimizer, "optimizer")?;
        Ok(TrainArgs {
            model,
            optimizer,
            rounds: self.rounds,
            batch_size: self.batch_size,
            preset,
            seed: self.seed,
            data_dir: Some(
                cli.data_dir
                    .clone()
                    .unwrap_or_else(|| self.data_dir.clone()),
            ),
            dataset: enum_value::<DatasetKind>(&self.dataset, "dataset")?,
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            val_split: self.val_split,
            // Settings the optimizer does not read stay unset (they would be refused).
            lr: crate::train::reads(optimizer, "lr")
                .then(|| float(&self.lr, "lr"))
                .transpose()?,
            sigma: self
                .sigma
                .as_deref()
                .map(|s| float(s, "sigma"))
                .transpose()?,
            anneal,
            weight_decay: self
                .weight_decay
                .as_deref()
                .map(|s| float(s, "weight_decay"))
                .transpose()?,
            batch_policy: self
                .batch_policy
                .as_deref()
                .map(|s| enum_value::<BatchPolicyArg>(s, "batch_policy"))
                .transpose()?,
            rso_eval: crate::train::reads(optimizer, "rso_eval")
                .then(|| enum_value::<RsoEvalArg>(&self.rso_eval, "rso_eval"))
                .transpose()?,
            sigma_multiplier: opt_float(&self.sigma_multiplier, "sigma_multiplier")?,
            spsa_eps: opt_float(&self.spsa_eps, "spsa_eps")?,
            spsa_directions: self.spsa_directions,
            spsa_dist: self
                .spsa_dist
                .as_deref()
                .map(|s| enum_value::<DirectionArg>(s, "spsa_dist"))
                .transpose()?,
            es_sigma: opt_float(&self.es_sigma, "es_sigma")?,
            cfd_block: self.cfd_block,
            cfd_mu: opt_float(&self.cfd_mu, "cfd_mu")?,
            max_forward_equivalents: self.max_forward_equivalents,
            backend: enum_value::<Backend>(&self.backend, "backend")?,
            device: self.device.clone(),
            out: cli.out.clone(),
            force: cli.force,
            save_weights: cli.save_weights.clone(),
            init_weights: self.init_weights.clone(),
            checkpoint_dir: Some(dir.to_path_buf()),
            resume: None,
            given: Vec::new(),
        })
    }
}

/// A path in JSON: a string when it is UTF-8 (as before this existed, so that study run ids,
/// which hash the settings, do not change), else the array of its bytes (Unix paths are bytes).
mod path_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr<'a> {
        Text(std::borrow::Cow<'a, str>),
        Bytes(Vec<u8>),
    }

    pub(super) fn to_repr(path: &Path) -> impl Serialize + '_ {
        match path.to_str() {
            Some(s) => Repr::Text(s.into()),
            None => Repr::Bytes(path.as_os_str().as_bytes().to_vec()),
        }
    }

    pub(super) fn from_repr<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(match Repr::deserialize(d)? {
            Repr::Text(s) => PathBuf::from(s.into_owned()),
            Repr::Bytes(b) => PathBuf::from(std::ffi::OsString::from_vec(b)),
        })
    }

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        to_repr(path).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        from_repr(d)
    }
}

/// [`path_bytes`] for an optional path (`null` when absent).
mod opt_path_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::path::PathBuf;

    pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        path.as_deref().map(super::path_bytes::to_repr).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(deserialize_with = "super::path_bytes::from_repr")] PathBuf);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u32(&mut self, x: u32) {
        self.write(&x.to_le_bytes());
    }
}

/// FNV-1a of `bytes` as 16 hex digits.
pub fn checksum(bytes: &[u8]) -> String {
    let mut h = Fnv::new();
    h.write(bytes);
    format!("{:016x}", h.0)
}

/// What `DIR` holds that a checkpoint writer owns: `latest`, round directories and leftovers
/// of interrupted writes.
fn owned_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name == LATEST
            || parse_round_dir_name(&name).is_some()
            || name
                .strip_suffix(".tmp")
                .and_then(parse_round_dir_name)
                .is_some()
            || (name.starts_with(".latest.") && name.ends_with(".tmp"));
        if ours {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Checks that a new run may checkpoint into `dir`: it is a directory or does not exist yet,
/// and holds no earlier checkpoint unless `force`. Changes nothing.
pub fn check_new_dir(dir: &Path, force: bool) -> anyhow::Result<()> {
    let flag = "--checkpoint-dir";
    if !dir.exists() {
        if let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure!(
                parent.is_dir(),
                "{flag} {}: directory {} does not exist",
                dir.display(),
                parent.display()
            );
        }
        return Ok(());
    }
    ensure!(dir.is_dir(), "{flag} {}: not a directory", dir.display());
    let owned = owned_entries(dir).with_context(|| format!("{flag} {}", dir.display()))?;
    if !owned.is_empty() && !force {
        bail!(
            "{flag} {}: holds a checkpoint of an earlier run; continue it with --resume {}, or \
             pass --force to replace it",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The lock file of a checkpoint directory (not a checkpoint: never removed, never read).
pub const LOCK: &str = ".lock";

/// Takes the checkpoint directory `dir` (which exists) for this process: an exclusive advisory
/// lock on `dir/.lock`, held until the returned file is dropped or the process ends. `flag`
/// names the option in the error when another run holds it.
pub fn lock(dir: &Path, flag: &str) -> anyhow::Result<std::fs::File> {
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{flag} {}: cannot open {}", dir.display(), path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{flag} {}: another rso run is writing checkpoints there ({} is locked)",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e)
            .with_context(|| format!("{flag} {}: cannot lock {}", dir.display(), path.display())),
    }
}

/// Prepares `dir` for a new run: creates it, takes its [`lock`], and (after [`check_new_dir`]
/// allowed it with `--force`) removes an earlier run's checkpoints, `latest` first. Returns the
/// lock, to be held while the run writes checkpoints.
pub fn prepare_new_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let ctx = || format!("--checkpoint-dir {}", dir.display());
    std::fs::create_dir_all(dir).with_context(ctx)?;
    let held = lock(dir, "--checkpoint-dir")?;
    let latest = dir.join(LATEST);
    if latest.exists() {
        std::fs::remove_file(&latest).with_context(ctx)?;
    }
    for path in owned_entries(dir).with_context(ctx)? {
        remove_any(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(held)
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes the checkpoint after `state.rounds_completed` rounds into `dir` (see the module doc
/// for the protocol), then removes older ones.
pub fn write(dir: &Path, state: &State, params: &Params) -> anyhow::Result<()> {
    let name = round_dir_name(state.rounds_completed);
    let tmp = dir.join(format!("{name}.tmp"));
    let fin = dir.join(&name);
    let ctx = || format!("writing checkpoint {}", fin.display());
    let weights = params.to_safetensors();
    let mut state = state.clone();
    state.weights_checksum = checksum(&weights);
    let json = serde_json::to_string_pretty(&state).context("serialising the state")?;
    (|| -> std::io::Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp)?;
        write_synced(&tmp.join(WEIGHTS), &weights)?;
        write_synced(&tmp.join(STATE), format!("{json}\n").as_bytes())?;
        sync_dir(&tmp)?;
        // A directory of this name is never the one `latest` names (that one holds fewer
        // rounds), so it is a leftover of an interrupted run and may go.
        if fin.exists() {
            std::fs::remove_dir_all(&fin)?;
        }
        std::fs::rename(&tmp, &fin)?;
        sync_dir(dir)?;
        rso_models::params::write_atomic(&dir.join(LATEST), format!("{name}\n").as_bytes())
    })()
    .with_context(ctx)?;
    // The new checkpoint is complete and current; older ones and leftovers may go.
    for path in owned_entries(dir).with_context(ctx)? {
        let keep = path == fin || path.file_name().is_some_and(|n| n == LATEST);
        if !keep {
            // Best effort: a stale directory wastes space but harms nothing.
            let _ = remove_any(&path);
        }
    }
    Ok(())
}

/// Reads at most `limit` bytes of `path`, refusing larger files ("larger than … bytes; `what`").
pub(crate) fn read_limited(path: &Path, limit: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}", path.display()))?;
    ensure!(
        bytes.len() as u64 <= limit,
        "{}: larger than {limit} bytes; {what}",
        path.display()
    );
    Ok(bytes)
}

/// Reads the newest complete checkpoint in `dir`, checking `state.json` thoroughly (format,
/// version, types, consistency). The weights are read by [`Checkpoint::load_params`].
pub fn read_latest(dir: &Path) -> anyhow::Result<Checkpoint> {
    ensure!(
        dir.is_dir(),
        "--resume {}: {}",
        dir.display(),
        if dir.exists() {
            "not a directory (give the --checkpoint-dir of the run)"
        } else {
            "no such directory"
        }
    );
    let latest = dir.join(LATEST);
    ensure!(
        latest.is_file(),
        "{}: missing or not a file (not a checkpoint directory, or no round had finished)",
        latest.display()
    );
    let text = read_limited(&latest, 64, "not a checkpoint file")?;
    let name = String::from_utf8_lossy(&text).trim().to_string();
    let rounds = parse_round_dir_name(&name).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: does not name a round directory (round-NNNNNN), holds {:?}",
            latest.display(),
            name.chars().take(40).collect::<String>()
        )
    })?;
    let round_dir = dir.join(&name);
    let path = round_dir.join(STATE);
    ensure!(
        path.is_file(),
        "{}: no such file (the checkpoint is incomplete)",
        path.display()
    );
    let state = parse_state(&read_limited(
        &path,
        MAX_STATE_BYTES,
        "not a checkpoint file",
    )?)
    .with_context(|| format!("{}: not a valid checkpoint state", path.display()))?;
    ensure!(
        state.rounds_completed == rounds,
        "{}: says {} rounds completed, but {} names round {rounds}",
        path.display(),
        state.rounds_completed,
        latest.display()
    );
    Ok(Checkpoint { round_dir, state })
}

/// Parses and checks the text of a `state.json`.
pub fn parse_state(bytes: &[u8]) -> anyhow::Result<State> {
    // Syntax and the format/version fields first, so a file of another version says so.
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    let format = value.get("format").and_then(|f| f.as_str());
    ensure!(
        format == Some(FORMAT),
        "field \"format\" is not \"{FORMAT}\""
    );
    let version = value.get("version").and_then(|v| v.as_u64());
    ensure!(
        version.is_some_and(|v| (u64::from(OLDEST_VERSION)..=u64::from(VERSION)).contains(&v)),
        "format version {}, this rso reads versions {OLDEST_VERSION} to {VERSION}",
        value
            .get("version")
            .map_or_else(|| "missing".to_string(), |v| v.to_string())
    );
    let state: State = serde_json::from_slice(bytes)?;
    ensure!(state.rounds_completed >= 1, "rounds_completed is 0");
    ensure!(state.config.batch_size >= 1, "batch_size is 0");
    ensure!(
        state.rounds_completed <= state.config.rounds,
        "rounds_completed {} exceeds the run's {} rounds",
        state.rounds_completed,
        state.config.rounds
    );
    ensure!(
        state.rows.len() == state.rounds_completed,
        "{} rows for {} completed rounds",
        state.rows.len(),
        state.rounds_completed
    );
    for (i, row) in state.rows.iter().enumerate() {
        ensure!(row.round == i + 1, "row {} says round {}", i + 1, row.round);
        ensure!(
            state.version < 2 || row.cumulative_seconds.is_some(),
            "row {}: cumulative_seconds missing (version {} rows have it)",
            i + 1,
            state.version
        );
        row.to_row().with_context(|| format!("row {}", i + 1))?;
    }
    ensure!(
        state.weights_checksum.len() == 16
            && state
                .weights_checksum
                .bytes()
                .all(|b| b.is_ascii_hexdigit()),
        "weights_checksum is not 16 hex digits"
    );
    Ok(state)
}

impl Checkpoint {
    /// The weights file.
    pub fn weights_path(&self) -> PathBuf {
        self.round_dir.join(WEIGHTS)
    }

    /// The state file.
    pub fn state_path(&self) -> PathBuf {
        self.round_dir.join(STATE)
    }

    /// Reads the weights for `spec`: size bounded by the model, checksum as recorded, every
    /// canonical tensor present with its shape, nothing else.
    pub fn load_params(&self, spec: &ModelSpec) -> anyhow::Result<Params> {
        let path = self.weights_path();
        let data = 4 * Params::zeros(spec).len() as u64;
        let too_large = format!("too large for the weights of model {}", spec.name);
        let bytes = read_limited(&path, data + MAX_HEADER_BYTES, &too_large)?;
        let params = Params::from_safetensors(spec, &bytes, &path)?;
        let sum = checksum(&bytes);
        ensure!(
            sum == self.state.weights_checksum,
            "{}: checksum {sum} differs from {}'s {} (the file was changed or mixed up)",
            path.display(),
            self.state_path().display(),
            self.state.weights_checksum
        );
        Ok(params)
    }

    /// The CSV rows of the completed rounds.
    pub fn rows(&self) -> anyhow::Result<Vec<RoundRow>> {
        self.state.rows.iter().map(SavedRow::to_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(round: usize, x: f64) -> RoundRow {
        RoundRow {
            round,
            model: "one-conv".into(),
            optimizer: "rso".into(),
            preset: "seed".into(),
            backend: "cpu".into(),
            device: "cpu".into(),
            batch: 8,
            seconds: x * 3.0,
            steps: 7890,
            accepted: 17,
            train_loss: x,
            train_acc: 1.0 / 3.0,
            test_loss: x.sqrt(),
            test_acc: 0.1 + 0.2,
            accept_rate: Some(17.0 / 7890.0),
            sigma_scale: Some(1.0),
            forward_equivalents: Some(3 * 8 * 7890),
            cumulative_forward_equivalents: Some(3 * 8 * 7890 * round as u64),
            cumulative_seconds: x * 3.0 * round as f64,
            val_loss: None,
            val_acc: None,
        }
    }

    fn state(rounds_completed: usize) -> State {
        State {
            format: FORMAT.into(),
            version: VERSION,
            config: RunConfig {
                model: "one-conv".into(),
                optimizer: "rso".into(),
                preset: "seed".into(),
                rounds: 5,
                batch_size: 8,
                seed: 3,
                dataset: "mnist".into(),
                data_dir: "/data".into(),
                train_limit: Some(300),
                test_limit: None,
                val_split: None,
                lr: 0.01f32.to_string(),
                sigma: Some(0.1f64.to_string()),
                anneal: Some("none".into()),
                weight_decay: None,
                batch_policy: Some("random".into()),
                rso_eval: "reference".into(),
                backend: "cpu".into(),
                device: "cpu".into(),
                init_weights: None,
                // Every later setting given, so that the round trips cover them.
                sigma_multiplier: Some("0.5".into()),
                spsa_eps: Some("0.001".into()),
                spsa_directions: Some(2),
                spsa_dist: Some("rademacher".into()),
                es_sigma: Some("0.01".into()),
                cfd_block: Some(3),
                cfd_mu: Some("0.01".into()),
                max_forward_equivalents: Some(123_456),
            },
            data: DataFingerprint {
                train: 300,
                test: 100,
                checksum: "0".repeat(16),
            },
            rounds_completed,
            weights_checksum: "0".repeat(16),
            rows: (1..=rounds_completed)
                .map(|r| SavedRow::from_row(&row(r, 0.7 / r as f64)))
                .collect(),
            optimizer_state: [("sigma".to_string(), "0.25".to_string())].into(),
            budget_reached: false,
            origin: Origin {
                command: CommandLine::Argv(vec!["rso".into(), "train".into()]),
                revision: "x".into(),
                date: "d".into(),
            },
        }
    }

    #[test]
    fn rows_round_trip_bit_exactly_through_json() {
        let mut x = 1e-300f64;
        for _ in 0..2000 {
            x *= std::f64::consts::SQRT_2;
            let r = row(1, x);
            let json = serde_json::to_string(&SavedRow::from_row(&r)).unwrap();
            let back: SavedRow = serde_json::from_str(&json).unwrap();
            let back = back.to_row().unwrap();
            assert_eq!(back.train_loss.to_bits(), r.train_loss.to_bits());
            assert_eq!(back.test_loss.to_bits(), r.test_loss.to_bits());
            assert_eq!(back, r);
        }
    }

    #[test]
    fn validation_cells_round_trip_bit_exactly_and_are_absent_when_empty() {
        let mut x = 1e-300f64;
        for _ in 0..2000 {
            x *= std::f64::consts::SQRT_2;
            let mut r = row(2, x);
            r.val_loss = Some(x.sqrt());
            r.val_acc = Some(1.0 / x);
            let json = serde_json::to_string(&SavedRow::from_row(&r)).unwrap();
            let back: SavedRow = serde_json::from_str(&json).unwrap();
            let back = back.to_row().unwrap();
            assert_eq!(
                back.val_loss.map(f64::to_bits),
                r.val_loss.map(f64::to_bits)
            );
            assert_eq!(back.val_acc.map(f64::to_bits), r.val_acc.map(f64::to_bits));
            assert_eq!(back, r);
        }
        // A row without a validation set stores no validation keys, as before they existed, and
        // such a row (every checkpoint written before them) reads back with empty cells.
        let json = serde_json::to_string(&SavedRow::from_row(&row(1, 0.5))).unwrap();
        assert!(!json.contains("val_"), "{json}");
        let back: SavedRow = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_row().unwrap(), row(1, 0.5));
        let mut bad: serde_json::Value = serde_json::from_str(&json).unwrap();
        bad["val_acc"] = "high".into();
        let bad: SavedRow = serde_json::from_value(bad).unwrap();
        let e = format!("{:#}", bad.to_row().unwrap_err());
        assert!(e.contains("val_acc") && e.contains("high"), "{e}");
    }

    #[test]
    fn a_config_without_the_later_settings_serialises_as_before_them() {
        // The serialisation of a version-2 config as written before --val-split and the
        // forward-only methods' settings existed (study run ids hash it): the same bytes today.
        let cfg = RunConfig {
            sigma_multiplier: None,
            spsa_eps: None,
            spsa_directions: None,
            spsa_dist: None,
            es_sigma: None,
            cfd_block: None,
            cfd_mu: None,
            max_forward_equivalents: None,
            ..state(1).config
        };
        let before = r#"{"model":"one-conv","optimizer":"rso","preset":"seed","rounds":5,"batch_size":8,"seed":3,"dataset":"mnist","data_dir":"/data","train_limit":300,"test_limit":null,"lr":"0.01","sigma":"0.1","anneal":"none","weight_decay":null,"batch_policy":"random","rso_eval":"reference","backend":"cpu","device":"cpu","init_weights":null}"#;
        assert_eq!(serde_json::to_string(&cfg).unwrap(), before);
        assert_eq!(serde_json::from_str::<RunConfig>(before).unwrap(), cfg);
        let mut with = cfg.clone();
        with.val_split = Some(100);
        let json = serde_json::to_string(&with).unwrap();
        assert!(
            json.contains(r#""test_limit":null,"val_split":100,"lr""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<RunConfig>(&json).unwrap(), with);
    }

    #[test]
    fn the_data_fingerprint_tells_a_held_out_tail_from_training_data() {
        let set = |n: usize| rso_data::Dataset {
            images: (0..n).map(|i| i as f32 / 8.0).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            channels: 1,
            height: 1,
            width: 1,
            classes: 10,
        };
        let whole = rso_data::Split::new(set(8), set(3));
        let mut held = whole.clone();
        assert!(held.hold_out_validation(2));
        let (a, b) = (DataFingerprint::of(&whole), DataFingerprint::of(&held));
        assert_eq!((b.train, b.test), (6, 3));
        assert_ne!(a.checksum, b.checksum);
        // Without a validation set the checksum covers the training and test sets only, as it
        // did before validation sets existed (an empty set of any header changes nothing).
        let mut short = whole.clone();
        short.train.truncate(6);
        let mut other_header = short.clone();
        other_header.validation.channels = 3;
        assert_eq!(
            DataFingerprint::of(&short),
            DataFingerprint::of(&other_header)
        );
        assert_ne!(DataFingerprint::of(&short).checksum, b.checksum);
    }

    #[test]
    fn state_round_trips_and_checks_consistency() {
        let s = state(2);
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(parse_state(&json).unwrap(), s);
        let mut bad = s.clone();
        bad.rows.pop();
        let e = parse_state(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("1 rows for 2"), "{e:#}");
        let mut bad = s.clone();
        bad.version = 99;
        let e = parse_state(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("version 99"), "{e:#}");
        let e = parse_state(
            b"{\"format\": \"rso-checkpoint\", \"version\": 1, \"rounds_completed\": \"2\"}",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("invalid type"), "{e:#}");
    }

    #[test]
    fn config_round_trips_through_args() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from([
            "rso",
            "train",
            "--model",
            "paper",
            "--optimizer",
            "rso",
            "--rounds",
            "4",
            "--batch-size",
            "16",
            "--preset",
            "paper",
            "--seed",
            "9",
            "--sigma",
            "0.1",
            "--anneal",
            "none",
            "--weight-decay",
            "0.001",
            "--batch-policy",
            "random",
            "--train-limit",
            "50",
            "--rso-eval",
            "reference",
            "--val-split",
            "7",
        ])
        .unwrap();
        let crate::Command::Train(args) = cli.command else {
            panic!()
        };
        let cfg = RunConfig::from_args(&args, Path::new("/abs/mnist"));
        let json = serde_json::to_string(&cfg).unwrap();
        let cfg2: RunConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(cfg, cfg2);
        let back = cfg2.to_args(&args, Path::new("ck")).unwrap();
        assert_eq!(RunConfig::from_args(&back, Path::new("/abs/mnist")), cfg);
        assert_eq!(back.sigma, Some(0.1));
        assert_eq!(back.anneal, Some(None));
        // RSO does not read the learning rate: it stays unset (given, it would be refused).
        assert_eq!(back.lr, None);
        assert_eq!(back.rso_eval, Some(crate::args::RsoEvalArg::Reference));
        assert_eq!(back.val_split, Some(7));
        assert_eq!(back.checkpoint_dir.as_deref(), Some(Path::new("ck")));
        // SGD's learning rate comes back, RSO's candidate path does not.
        let sgd = RunConfig {
            optimizer: "sgd".into(),
            lr: "0.3".into(),
            sigma: None,
            anneal: None,
            weight_decay: None,
            batch_policy: None,
            // What a new SGD run records (the setting is RSO's and CFD's).
            rso_eval: "incremental".into(),
            ..cfg
        };
        let back = sgd.to_args(&args, Path::new("ck")).unwrap();
        assert_eq!((back.lr, back.rso_eval), (Some(0.3f32), None));
        assert_eq!(RunConfig::from_args(&back, Path::new("/abs/mnist")), sgd);
    }

    #[test]
    fn interrupted_writes_leave_the_previous_checkpoint_current() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let spec = ModelKind::OneConv.mnist();
        let mut params = Params::zeros(&spec);
        params.values[0][0] = 1.5;
        write(dir, &state(1), &params).unwrap();
        let ck = read_latest(dir).unwrap();
        assert_eq!(ck.state.rounds_completed, 1);
        assert_eq!(ck.load_params(&spec).unwrap(), params);

        // A write killed half-way (a partial .tmp) and one killed after its rename but before
        // `latest` moved: readers still get round 1.
        std::fs::create_dir(dir.join("round-000002.tmp")).unwrap();
        std::fs::write(dir.join("round-000002.tmp/weights.safetensors"), b"partial").unwrap();
        std::fs::create_dir(dir.join("round-000003")).unwrap();
        std::fs::write(dir.join(".latest.123.tmp"), b"round-0000").unwrap();
        assert_eq!(read_latest(dir).unwrap().state.rounds_completed, 1);

        // The next write replaces them all.
        params.values[0][0] = 2.5;
        write(dir, &state(2), &params).unwrap();
        let ck = read_latest(dir).unwrap();
        assert_eq!(ck.state.rounds_completed, 2);
        assert_eq!(ck.load_params(&spec).unwrap(), params);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["latest", "round-000002"]);
    }

    #[test]
    fn new_runs_refuse_a_directory_holding_a_checkpoint_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        check_new_dir(&dir, false).unwrap();
        prepare_new_dir(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        check_new_dir(&dir, false).unwrap();
        write(&dir, &state(1), &Params::zeros(&ModelKind::OneConv.mnist())).unwrap();
        let e = check_new_dir(&dir, false).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("--force"), "{e}");
        check_new_dir(&dir, true).unwrap();
        prepare_new_dir(&dir).unwrap();
        assert!(!dir.join(LATEST).exists() && !dir.join("round-000001").exists());
        assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
        let e = check_new_dir(&tmp.path().join("no/such/ck"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn latest_must_name_a_round_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let e = format!("{:#}", read_latest(dir).unwrap_err());
        assert!(e.contains("latest") && e.contains("missing"), "{e}");
        for bad in [
            "../../etc",
            "round-1",
            "round-00000x",
            "",
            "round-000001/../x",
        ] {
            std::fs::write(dir.join(LATEST), bad).unwrap();
            let e = format!("{:#}", read_latest(dir).unwrap_err());
            assert!(e.contains("does not name a round directory"), "{bad}: {e}");
        }
        std::fs::write(dir.join(LATEST), "round-000004\n").unwrap();
        let e = format!("{:#}", read_latest(dir).unwrap_err());
        assert!(e.contains("state.json") && e.contains("incomplete"), "{e}");
    }
}
