//! `rso train`: one model, one optimizer, evaluation after every round; optionally a
//! checkpoint after every round (`--checkpoint-dir`) and resumption from one (`--resume`), see
//! [`crate::checkpoint`].

use crate::args::{
    Backend, BatchPolicyArg, DatasetKind, DirectionArg, OptimizerKind, RsoEvalArg, TrainArgs,
    OPTIMIZER_SETTINGS,
};
use crate::checkpoint::{self, DataFingerprint, Origin, RunConfig, SavedRow, State};
use crate::output::{self, RoundRow};
use crate::provenance::{utc_now, Meta};
use anyhow::{bail, ensure, Context};
use rso_data::Split;
use rso_models::{init_params, Eval, ModelSpec, Network, Params, SplitKind};
use rso_optim::{
    setup_rng, shuffled, BatchPolicy, Cfd, CfdConfig, Direction, Es, EsConfig, OptimError,
    Optimizer, RoundStats, Rso, RsoConfig, RsoEval, Sgd, SgdConfig, SigmaRule, Spsa, SpsaConfig,
};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Samples used to set BatchNorm's running statistics before each evaluation (the paper's).
pub const BN_CALIBRATION_SAMPLES: usize = 2000;

/// What a finished run produced.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// One row per round.
    pub rows: Vec<RoundRow>,
    /// Wall time of the training rounds only, seconds.
    pub seconds: f64,
    /// Final parameters.
    pub params: Params,
}

impl TrainOutcome {
    /// The `RESULT …` line scripts read (the last line of `rso train`'s stdout); with a
    /// validation set (`--val-split`) it ends with `val_loss=… val_acc=…`.
    pub fn result_line(&self) -> String {
        let last = self.rows.last().expect("a run has at least one round");
        format!(
            "RESULT model={} optimizer={} backend={} device={} rounds={} batch={} seconds={:.3} test_loss={:.6} test_acc={:.4}{}",
            last.model,
            last.optimizer,
            last.backend,
            last.device,
            last.round,
            last.batch,
            self.seconds,
            last.test_loss,
            last.test_acc,
            validation_fields(last)
        )
    }
}

/// ` val_loss=… val_acc=…` of a row with validation results, else nothing.
fn validation_fields(row: &RoundRow) -> String {
    match (row.val_loss, row.val_acc) {
        (Some(loss), Some(acc)) => format!(" val_loss={loss:.6} val_acc={acc:.4}"),
        _ => String::new(),
    }
}

/// Receives progress while a run goes.
pub trait Reporter {
    /// A round starts; `steps` units of work are ahead.
    fn round_started(&mut self, round: usize, rounds: usize, steps: usize);
    /// `done` units of the current round are done.
    fn progress(&mut self, done: usize);
    /// A round ended and was evaluated.
    fn round_finished(&mut self, row: &RoundRow, rounds: usize);
    /// A run resumes from the checkpoint in `dir` with `completed` of `rounds` rounds done.
    fn resumed(&mut self, dir: &Path, completed: usize, rounds: usize) {
        let _ = (dir, completed, rounds);
    }
    /// `--max-forward-equivalents budget` ended the run after `rounds` rounds (the last one
    /// partial, or ended at the budget) and `spent` forward-equivalents.
    fn budget_reached(&mut self, budget: u64, spent: u64, rounds: usize) {
        let _ = (budget, spent, rounds);
    }
}

/// Prints a progress bar with ETA on a terminal (stderr), plain per-round lines always (stdout).
pub struct ConsoleReporter {
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
}

impl ConsoleReporter {
    /// A reporter that draws bars only when stderr is a terminal.
    pub fn new() -> ConsoleReporter {
        ConsoleReporter {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }
}

impl Default for ConsoleReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for ConsoleReporter {
    fn round_started(&mut self, round: usize, rounds: usize, steps: usize) {
        if self.terminal {
            let bar = indicatif::ProgressBar::new(steps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "round {msg} [{bar:40}] {pos}/{len} {per_sec} ETA {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("{}/{}", round + 1, rounds));
            self.bar = Some(bar);
        }
    }

    fn progress(&mut self, done: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        }
    }

    fn round_finished(&mut self, row: &RoundRow, rounds: usize) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        // A closed stdout (`rso train … | head`) must not abort the run.
        let _ = writeln!(
            std::io::stdout(),
            "round {}/{} seconds={:.3} accepted={}/{} train_loss={:.6} train_acc={:.4} test_loss={:.6} test_acc={:.4}{}",
            row.round,
            rounds,
            row.seconds,
            row.accepted,
            row.steps,
            row.train_loss,
            row.train_acc,
            row.test_loss,
            row.test_acc,
            validation_fields(row)
        );
    }

    fn resumed(&mut self, dir: &Path, completed: usize, rounds: usize) {
        let _ = writeln!(
            std::io::stdout(),
            "resuming {}: {completed}/{rounds} rounds done",
            dir.display()
        );
    }

    fn budget_reached(&mut self, budget: u64, spent: u64, rounds: usize) {
        let _ = writeln!(
            std::io::stdout(),
            "stopped by --max-forward-equivalents {budget} after round {rounds} ({spent} spent; \
             the next step would have gone over)"
        );
    }
}

/// A reporter that says nothing (tests, batch jobs).
pub struct Silent;

impl Reporter for Silent {
    fn round_started(&mut self, _: usize, _: usize, _: usize) {}
    fn progress(&mut self, _: usize) {}
    fn round_finished(&mut self, _: &RoundRow, _: usize) {}
}

/// The dataset directory: `--data-dir`, or the dataset's default.
pub fn data_dir(args: &TrainArgs) -> PathBuf {
    args.data_dir.clone().unwrap_or_else(|| match args.dataset {
        DatasetKind::Mnist => PathBuf::from("data/mnist"),
        DatasetKind::Cifar10 => PathBuf::from("data/cifar10"),
    })
}

/// Loads the dataset the arguments name, normalised for the preset and cut to the limits, with
/// the last `--val-split` training samples (of those `--train-limit` keeps) moved to the
/// validation set.
///
/// # Errors
/// A missing or unreadable dataset; a limit of 0; a `--val-split` of 0 or of at least the
/// (limited) training set's size.
pub fn load_data(args: &TrainArgs) -> anyhow::Result<Split> {
    let dir = data_dir(args);
    if !dir.is_dir() {
        let hint = match args.dataset {
            DatasetKind::Mnist => "run scripts/fetch-mnist.sh, or pass --data-dir",
            DatasetKind::Cifar10 => {
                "download the CIFAR-10 binary version (cifar-10-batches-bin) and pass --data-dir"
            }
        };
        bail!("--data-dir {}: no such directory ({hint})", dir.display());
    }
    let norm = args.preset.normalization();
    let mut split = match args.dataset {
        DatasetKind::Mnist => {
            // Spellings other than the published names (an archive tool's) are said.
            let files = rso_data::mnist_files(&dir)?;
            if files.iter().any(|f| f.to_string_lossy().contains(".idx")) {
                let names: Vec<String> = files
                    .iter()
                    .filter_map(|f| Some(f.file_name()?.to_string_lossy().into_owned()))
                    .collect();
                eprintln!("data: {} in {}", names.join(", "), dir.display());
            }
            rso_data::load_mnist(&dir, norm)
        }
        DatasetKind::Cifar10 => rso_data::load_cifar10(&dir, norm),
    }?;
    if let Some(n) = args.train_limit {
        ensure!(n >= 1, "--train-limit must be at least 1");
        split.train.truncate(n);
    }
    if let Some(n) = args.test_limit {
        ensure!(n >= 1, "--test-limit must be at least 1");
        split.test.truncate(n);
    }
    if let Some(n) = args.val_split {
        let total = split.train.len();
        ensure!(
            split.hold_out_validation(n),
            "--val-split {n} must be at least 1 and less than the training set's {total} \
             samples{}",
            if args.train_limit.is_some() {
                " (after --train-limit)"
            } else {
                ""
            }
        );
    }
    Ok(split)
}

/// Checks the settings that need no data and no files: counts, the backend's device, the
/// optimizer's knobs (as the optimizer itself checks them, on the model for the dataset's
/// nominal image size). `rso study` checks every run of a plan this way before starting any.
pub fn check_settings(args: &TrainArgs) -> anyhow::Result<()> {
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    for (limit, flag) in [
        (args.train_limit, "--train-limit"),
        (args.test_limit, "--test-limit"),
        (args.val_split, "--val-split"),
    ] {
        ensure!(limit != Some(0), "{flag} must be at least 1");
    }
    check_optimizer_settings(args)?;
    ensure!(
        args.max_forward_equivalents != Some(0),
        "--max-forward-equivalents must be at least 1"
    );
    if let (Some(n), Some(limit)) = (args.val_split, args.train_limit) {
        ensure!(
            n < limit,
            "--val-split {n} must be less than --train-limit {limit} (it holds out the last {n} \
             of those {limit} training samples)"
        );
    }
    check_device(args)?;
    let (channels, size) = match args.dataset {
        DatasetKind::Mnist => (1, 28),
        DatasetKind::Cifar10 => (3, 32),
    };
    build_optimizer(args, &args.model.spec(channels, size, 10))?;
    Ok(())
}

/// Refuses a device the backend cannot run on.
fn check_device(args: &TrainArgs) -> anyhow::Result<()> {
    ensure!(
        args.backend != Backend::Cpu || args.device == "cpu",
        "--device {}: the cpu backend runs on the CPU only (use --backend tch)",
        args.device
    );
    Ok(())
}

/// The name the command line gives `kind`.
pub fn optimizer_name(kind: OptimizerKind) -> String {
    use clap::ValueEnum;
    kind.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Whether `optimizer` reads the optimizer setting `name` ([`OPTIMIZER_SETTINGS`]; settings not
/// listed there are read by every optimizer).
pub fn reads(optimizer: OptimizerKind, name: &str) -> bool {
    OPTIMIZER_SETTINGS
        .iter()
        .find(|(n, _)| *n == name)
        .is_none_or(|(_, readers)| readers.contains(&optimizer))
}

/// The learning rate: `--lr`, else the optimizer's default (sgd 0.01, the notebook's; spsa 3e-4
/// and cfd 2, as tuned on one-conv at batch 256; 0.01, unread, for the others, as runs recorded
/// it before the defaults differed).
pub fn lr(args: &TrainArgs) -> f32 {
    args.lr.unwrap_or(match args.optimizer {
        OptimizerKind::Spsa => 3e-4,
        OptimizerKind::Cfd => 2.0,
        OptimizerKind::Sgd | OptimizerKind::Rso | OptimizerKind::Es => 0.01,
    })
}

/// The candidate-loss implementation: `--rso-eval`, else incremental.
pub fn rso_eval(args: &TrainArgs) -> RsoEvalArg {
    args.rso_eval.unwrap_or(RsoEvalArg::Incremental)
}

/// Refuses a setting given for an optimizer other than the run's ([`OPTIMIZER_SETTINGS`]).
fn check_optimizer_settings(args: &TrainArgs) -> anyhow::Result<()> {
    let given = [
        ("lr", args.lr.is_some()),
        ("rso_eval", args.rso_eval.is_some()),
        ("sigma", args.sigma.is_some()),
        ("sigma_multiplier", args.sigma_multiplier.is_some()),
        ("anneal", args.anneal.is_some()),
        ("weight_decay", args.weight_decay.is_some()),
        ("batch_policy", args.batch_policy.is_some()),
        ("spsa_eps", args.spsa_eps.is_some()),
        ("spsa_directions", args.spsa_directions.is_some()),
        ("spsa_dist", args.spsa_dist.is_some()),
        ("es_sigma", args.es_sigma.is_some()),
        ("cfd_block", args.cfd_block.is_some()),
        ("cfd_mu", args.cfd_mu.is_some()),
    ];
    for (name, readers) in OPTIMIZER_SETTINGS {
        let is_given = given.iter().any(|&(n, g)| n == name && g);
        if is_given && !readers.contains(&args.optimizer) {
            let readers: Vec<String> = readers.iter().map(|&k| optimizer_name(k)).collect();
            bail!(
                "--{} is a setting of --optimizer {}; --optimizer {} does not read it",
                name.replace('_', "-"),
                readers.join("|"),
                optimizer_name(args.optimizer)
            );
        }
    }
    Ok(())
}

/// Checks the arguments that need no data.
fn check_args(args: &TrainArgs) -> anyhow::Result<()> {
    check_settings(args)?;
    check_outputs(args, (false, false))
}

/// Checks the output files before any training: each absent, or replaceable with `--force`
/// (`--out`, `--save-weights` also when `own_out`, `own_weights`: a resumed run's own files), in a directory this
/// process can write to ([`output::check_writable`]); no two the same file, and none inside
/// `--checkpoint-dir` (whose files the checkpoints replace).
fn check_outputs(args: &TrainArgs, (own_out, own_weights): (bool, bool)) -> anyhow::Result<()> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    if let Some(out) = &args.out {
        output::check_writable(out, args.force || own_out, "--out")?;
        files.push((format!("--out {}", out.display()), output::resolved(out)));
        let meta = output::meta_path(out);
        files.push((
            format!("--out's provenance {}", meta.display()),
            output::resolved(&meta),
        ));
    }
    if let Some(path) = &args.save_weights {
        output::check_writable(path, args.force || own_weights, "--save-weights")?;
        files.push((
            format!("--save-weights {}", path.display()),
            output::resolved(path),
        ));
    }
    for (i, (a, pa)) in files.iter().enumerate() {
        if let Some((b, _)) = files[i + 1..].iter().find(|(_, pb)| pb == pa) {
            bail!("{a} and {b} are the same file: give each output its own path");
        }
    }
    check_outputs_spare_inputs(args, &files)?;
    if let Some(dir) = &args.checkpoint_dir {
        let managed = dir.canonicalize().unwrap_or_else(|_| output::resolved(dir));
        if let Some((a, _)) = files.iter().find(|(_, p)| p.starts_with(&managed)) {
            bail!(
                "{a} is inside --checkpoint-dir {}, whose files each checkpoint replaces: \
                 write it elsewhere",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The error of a round (0-based) that diverged (`what`): nothing of it is written; the
/// checkpoint in `kept`, if any, holds the rounds before.
fn diverged(round: usize, what: &str, kept: Option<&Path>) -> anyhow::Error {
    let kept = kept.map_or_else(String::new, |d| {
        format!(
            "; the checkpoint in {} holds the rounds before",
            d.display()
        )
    });
    anyhow::anyhow!(
        "round {}: training diverged ({what}); nothing of this round is written{kept}",
        round + 1
    )
}

/// The context of an output that could not be written after training, saying where the
/// trained weights are ([`rescue_weights`]).
fn unwritten(net: &dyn Network, checkpoint: Option<&Path>) -> String {
    format!(
        "an output could not be written ({})",
        rescue_weights(net, checkpoint)
    )
}

/// Refuses an output (`files`: what names it, where it resolves to) that would replace an input
/// of the run, even with `--force`: the `--init-weights` file, a dataset file in `--data-dir`,
/// a file of a checkpoint directory.
fn check_outputs_spare_inputs(args: &TrainArgs, files: &[(String, PathBuf)]) -> anyhow::Result<()> {
    let data = data_dir(args);
    let data = data.canonicalize().unwrap_or(data);
    let init = args.init_weights.as_deref().map(output::resolved);
    for (what, path) in files {
        ensure!(
            init.as_ref() != Some(path),
            "{what} is the --init-weights file: give the output its own path"
        );
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let dataset_file = rso_data::MNIST_FILES
            .iter()
            .flat_map(|f| [f.to_string(), f.replacen("-idx", ".idx", 1)])
            .chain(["data_batch_".into(), "test_batch".into()])
            .any(|stem| name.starts_with(&stem));
        ensure!(
            !(dataset_file && path.starts_with(&data)),
            "{what} is a file of the dataset in --data-dir {}: give the output its own path",
            data.display()
        );
        let dir = output::parent_dir(path);
        ensure!(
            !dir.join(checkpoint::LATEST).is_file(),
            "{what} is inside {}, which holds a checkpoint: give the output a path outside it",
            dir.display()
        );
    }
    Ok(())
}

/// What became of the trained weights when writing an output failed after training: the
/// checkpoint holds them, or they are saved to the temporary directory, else the working
/// directory. A sentence for the error.
fn rescue_weights(net: &dyn Network, checkpoint: Option<&Path>) -> String {
    if let Some(dir) = checkpoint {
        return format!(
            "the trained weights are safe in the checkpoint {} (rso train --resume {} continues \
             or rewrites its outputs)",
            dir.display(),
            dir.display()
        );
    }
    let name = format!("rso-weights-{}.safetensors", std::process::id());
    let params = net.params();
    for dir in [std::env::temp_dir(), PathBuf::from(".")] {
        let path = dir.join(&name);
        if params.save(&path).is_ok() {
            return format!("the trained weights were saved to {}", path.display());
        }
    }
    "the trained weights could not be saved anywhere".into()
}

/// The model spec for the loaded data.
// `usize::is_multiple_of` is newer than the workspace's rust-version (1.80).
#[allow(clippy::manual_is_multiple_of)]
pub fn model_spec(args: &TrainArgs, split: &Split) -> anyhow::Result<ModelSpec> {
    let t = &split.train;
    ensure!(
        t.height == t.width && t.height % 4 == 0,
        "{}: images are {}×{}, the models need square images with a side divisible by 4",
        data_dir(args).display(),
        t.height,
        t.width
    );
    Ok(args.model.spec(t.channels, t.height, t.classes))
}

/// Initial parameters: `--init-weights`, or the preset's initialiser drawn from the seed.
pub fn initial_params(args: &TrainArgs, spec: &ModelSpec) -> anyhow::Result<Params> {
    match &args.init_weights {
        Some(path) => Ok(Params::load(spec, path)?),
        None => Ok(init_params(
            spec,
            args.preset.init(),
            &mut setup_rng(args.seed, 0),
        )),
    }
}

/// Instantiates the network on the engine the arguments name.
pub fn build_network(
    args: &TrainArgs,
    spec: &ModelSpec,
    params: &Params,
    split: Split,
) -> anyhow::Result<Box<dyn Network>> {
    match args.backend {
        Backend::Cpu => Ok(Box::new(rso_cpu::CpuNetwork::new(spec, params, split)?)),
        #[cfg(feature = "tch")]
        Backend::Tch => Ok(Box::new(
            rso_tch::TchNetwork::new(spec, params, &split, &args.device)
                .with_context(|| format!("--device {}", args.device))?,
        )),
        #[cfg(not(feature = "tch"))]
        Backend::Tch => bail!(
            "--backend tch: this rso was built without the libtorch engine; run \
             scripts/setup-libtorch.sh and build with --features tch"
        ),
    }
}

/// The RSO settings the arguments describe: the preset's, with every given knob applied.
pub fn rso_config(args: &TrainArgs) -> RsoConfig {
    let mut cfg = RsoConfig::preset(args.preset, args.rounds, args.batch_size, args.seed);
    if let Some(s) = args.sigma {
        cfg.sigma = SigmaRule::Fixed(s);
    }
    if let Some(a) = args.anneal {
        cfg.anneal = a;
    }
    if let Some(wd) = args.weight_decay {
        cfg.weight_decay = wd;
    }
    if let Some(f) = args.sigma_multiplier {
        cfg.sigma_multiplier = f;
    }
    cfg.batch_policy = batch_policy(args);
    cfg.eval = match rso_eval(args) {
        RsoEvalArg::Reference => RsoEval::Reference,
        RsoEvalArg::Incremental => RsoEval::Incremental,
    };
    cfg
}

/// The batch policy the arguments give, else the preset's.
fn batch_policy(args: &TrainArgs) -> BatchPolicy {
    match args.batch_policy {
        Some(BatchPolicyArg::Random) => BatchPolicy::Random,
        Some(BatchPolicyArg::Sequential) => BatchPolicy::Sequential,
        None => RsoConfig::preset(args.preset, 1, 1, 0).batch_policy,
    }
}

/// The optimizer the arguments describe. The forward-only methods other than RSO take the
/// preset's batch policy and loss reduction (as RSO does), and their knobs' defaults.
pub fn build_optimizer(args: &TrainArgs, spec: &ModelSpec) -> anyhow::Result<Box<dyn Optimizer>> {
    let preset = RsoConfig::preset(args.preset, args.rounds, args.batch_size, args.seed);
    Ok(match args.optimizer {
        OptimizerKind::Sgd => Box::new(Sgd::new(SgdConfig {
            lr: lr(args),
            batch_size: args.batch_size,
            seed: args.seed,
        })?),
        OptimizerKind::Rso => Box::new(Rso::new(spec, rso_config(args))?),
        OptimizerKind::Spsa => Box::new(Spsa::new(SpsaConfig {
            eps: args.spsa_eps.unwrap_or(1e-3),
            lr: lr(args),
            directions: args.spsa_directions.unwrap_or(1),
            dist: match args.spsa_dist {
                Some(DirectionArg::Rademacher) => Direction::Rademacher,
                Some(DirectionArg::Gaussian) | None => Direction::Gaussian,
            },
            batch_size: args.batch_size,
            batch_policy: batch_policy(args),
            reduction: preset.reduction,
            seed: args.seed,
        })?),
        OptimizerKind::Es => Box::new(Es::new(EsConfig {
            sigma: args.es_sigma.unwrap_or(0.01),
            batch_size: args.batch_size,
            batch_policy: batch_policy(args),
            reduction: preset.reduction,
            seed: args.seed,
        })?),
        OptimizerKind::Cfd => Box::new(Cfd::new(
            spec,
            CfdConfig {
                preset: args.preset,
                block: args.cfd_block.unwrap_or(1),
                mu: args.cfd_mu.unwrap_or(1e-3),
                lr: lr(args),
                batch_size: args.batch_size,
                batch_policy: batch_policy(args),
                reduction: preset.reduction,
                eval: rso_config(args).eval,
                seed: args.seed,
            },
        )?),
    })
}

/// Evaluates after a round: BatchNorm calibrated on a fixed training subset first. Returns the
/// training, test and (when the run holds one out) validation evaluations.
fn evaluate(
    net: &mut dyn Network,
    calibration: &[u32],
) -> (rso_models::Eval, rso_models::Eval, Option<rso_models::Eval>) {
    if net.spec().has_batch_norm() {
        net.calibrate_bn(calibration);
    }
    let train = net.evaluate(SplitKind::Train, None);
    let test = net.evaluate(SplitKind::Test, None);
    let validation = net.evaluate(SplitKind::Validation, None);
    (train, test, (validation.samples > 0).then_some(validation))
}

/// The first NaN or infinite parameter: `name[index] is value`.
fn first_non_finite(params: &Params) -> Option<String> {
    params
        .specs
        .iter()
        .zip(&params.values)
        .find_map(|(spec, values)| {
            let (i, x) = values.iter().enumerate().find(|(_, x)| !x.is_finite())?;
            Some(format!("{}[{i}] is {x}", spec.name))
        })
}

/// Refuses parameters with a NaN or infinite value, naming the first one.
fn check_finite(params: &Params) -> anyhow::Result<()> {
    match first_non_finite(params) {
        Some(what) => bail!("{what}; refusing to train from non-finite weights"),
        None => Ok(()),
    }
}

/// Runs `rso train`: a new run, or (`--resume`) the continuation of a checkpointed one.
pub fn run(args: &TrainArgs, reporter: &mut dyn Reporter) -> anyhow::Result<TrainOutcome> {
    match &args.resume {
        None => run_new(args, reporter),
        Some(dir) => resume(dir, args, reporter),
    }
}

/// `path` with any bytes that are not UTF-8 replaced, so it serialises.
fn lossy(path: &Path) -> PathBuf {
    PathBuf::from(path.to_string_lossy().into_owned())
}

/// The `settings` of a run's `.meta.json`: every setting of the arguments (as a checkpoint
/// stores them, the dataset directory absolute where it resolves; `val_split` `null` when not
/// given), the optimizer's resolved settings (preset values, σ per array) and the data's sizes.
fn settings_json(
    args: &TrainArgs,
    optimizer: &dyn Optimizer,
    net: &dyn Network,
    test_len: usize,
) -> serde_json::Value {
    let dir = data_dir(args);
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let mut config = RunConfig::from_args(args, &lossy(&dir));
    config.init_weights = config.init_weights.as_deref().map(lossy);
    let mut value = serde_json::to_value(config).unwrap_or_default();
    let resolved: serde_json::Map<String, serde_json::Value> = optimizer
        .resolved_settings()
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    if let Some(map) = value.as_object_mut() {
        // Only what the optimizer reads (a run's own records say nothing of other methods).
        map.retain(|key, _| reads(args.optimizer, key));
        map.insert("resolved".into(), resolved.into());
        map.entry("val_split").or_insert(serde_json::Value::Null);
        map.insert("train_samples".into(), net.train_len().into());
        map.insert("test_samples".into(), test_len.into());
        // `load_data` held out exactly `--val-split` samples, or none.
        map.insert(
            "validation_samples".into(),
            args.val_split.unwrap_or(0).into(),
        );
    }
    value
}

/// The provenance of a run's `--out` file (its `ended` set at every write).
fn run_meta(
    args: &TrainArgs,
    optimizer: &dyn Optimizer,
    net: &dyn Network,
    test_len: usize,
    started: &str,
) -> Meta {
    Meta::current(
        net.backend(),
        &net.device(),
        Some(args.seed),
        settings_json(args, optimizer, net, test_len),
        started,
    )
}

/// Where a run checkpoints, and the state every checkpoint of it shares.
struct Checkpointing {
    dir: PathBuf,
    base: State,
    /// The directory's lock ([`checkpoint::lock`]), held for the run.
    _lock: std::fs::File,
}

impl Checkpointing {
    /// Checkpoints the run after its last row: rows, optimizer state, whether the budget ended
    /// it, and the weights (as a stop-aware write, see [`crate::stop::checkpoint`]).
    fn save(
        &self,
        rows: &[RoundRow],
        optimizer: &dyn Optimizer,
        net: &dyn Network,
        budget_reached: bool,
        rounds: usize,
    ) -> anyhow::Result<()> {
        let mut state = self.base.clone();
        state.rounds_completed = rows.len();
        state.rows = rows.iter().map(SavedRow::from_row).collect();
        state.optimizer_state = optimizer.state().into_iter().collect();
        state.budget_reached = budget_reached;
        let params = net.params();
        crate::stop::checkpoint(rows.len(), rounds, &self.dir, || {
            checkpoint::write(&self.dir, &state, &params)
        })
    }
}

/// A run ready to train: everything checked, nothing written yet.
struct Session<'a> {
    args: &'a TrainArgs,
    net: Box<dyn Network>,
    optimizer: Box<dyn Optimizer>,
    meta: Meta,
    checkpointing: Option<Checkpointing>,
}

/// Starts a new run.
fn run_new(args: &TrainArgs, reporter: &mut dyn Reporter) -> anyhow::Result<TrainOutcome> {
    let started = utc_now();
    check_args(args)?;
    if let Some(dir) = &args.checkpoint_dir {
        checkpoint::check_new_dir(dir, args.force)?;
    }
    let split = load_data(args)?;
    ensure!(
        args.batch_size <= split.train.len(),
        "--batch-size {} is larger than the training set ({} samples{})",
        args.batch_size,
        split.train.len(),
        match args.val_split {
            Some(n) => format!(" left after --val-split {n}"),
            None => String::new(),
        }
    );
    let spec = model_spec(args, &split)?;
    let params = initial_params(args, &spec).with_context(|| "--init-weights".to_string())?;
    if let Some(path) = &args.init_weights {
        check_finite(&params).with_context(|| format!("--init-weights {}", path.display()))?;
    }
    let fingerprint = args
        .checkpoint_dir
        .as_ref()
        .map(|_| DataFingerprint::of(&split));
    let test_len = split.test.len();
    let net = build_network(args, &spec, &params, split)?;
    let optimizer = build_optimizer(args, &spec)?;
    let meta = run_meta(args, optimizer.as_ref(), net.as_ref(), test_len, &started);
    let checkpointing = match (&args.checkpoint_dir, fingerprint) {
        (Some(dir), Some(data)) => {
            let data_dir = data_dir(args);
            let data_dir = std::fs::canonicalize(&data_dir)
                .with_context(|| format!("--data-dir {}", data_dir.display()))?;
            // Everything is checked: only now touch the directory.
            let lock = checkpoint::prepare_new_dir(dir)?;
            Some(Checkpointing {
                _lock: lock,
                dir: dir.clone(),
                base: State {
                    format: checkpoint::FORMAT.into(),
                    version: checkpoint::VERSION,
                    config: RunConfig::from_args(args, &data_dir),
                    data,
                    rounds_completed: 0,
                    weights_checksum: String::new(),
                    rows: Vec::new(),
                    optimizer_state: Default::default(),
                    budget_reached: false,
                    origin: Origin {
                        command: checkpoint::CommandLine::Argv(meta.command.clone()),
                        revision: meta.revision_label(),
                        date: started.clone(),
                    },
                },
            })
        }
        _ => None,
    };
    let session = Session {
        args,
        net,
        optimizer,
        meta,
        checkpointing,
    };
    train_rounds(session, Vec::new(), reporter)
}

/// Applies the settings given with `--resume` (`cli.given`) to the checkpointed run's `args`:
/// a value equal to the checkpoint's is accepted, a different one refused naming both, except
/// where the run may change: `--backend` and `--device` (where it computes) and `--rounds`
/// above the checkpoint's total (more rounds, unless σ anneals over the total).
///
/// # Errors
/// One line naming the flag, its value here and in the checkpoint `dir`.
fn apply_resume_flags(
    args: &mut TrainArgs,
    cli: &TrainArgs,
    config: &RunConfig,
    dir: &Path,
) -> anyhow::Result<()> {
    let here = serde_json::to_value(RunConfig::from_args(cli, &config.data_dir))?;
    let there = serde_json::to_value(config)?;
    for id in &cli.given {
        let flag = format!("--{}", id.replace('_', "-"));
        match id.as_str() {
            "backend" => args.backend = cli.backend,
            "device" => args.device.clone_from(&cli.device),
            "checkpoint_dir" => {
                let given = cli.checkpoint_dir.as_deref().unwrap_or(Path::new(""));
                ensure!(
                    output::resolved(given) == output::resolved(dir),
                    "{flag} {}: a resumed run checkpoints into its --resume directory {} (leave \
                     the flag out)",
                    given.display(),
                    dir.display()
                );
            }
            "rounds" if cli.rounds > config.rounds => {
                ensure!(
                    !anneals(args),
                    "--rounds {}: this run's σ anneals over its total of {} rounds, so more would \
                     not continue it as it was going; start a new run from its weights instead \
                     (--save-weights, then --init-weights)",
                    cli.rounds,
                    config.rounds
                );
                args.rounds = cli.rounds;
            }
            key => {
                let (a, b) = (&here[key], &there[key]);
                let show = |v: &serde_json::Value| match v {
                    serde_json::Value::Null => "not set".to_string(),
                    serde_json::Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                ensure!(
                    a == b,
                    "{flag}: {} here but {} in the checkpoint {} (a resumed run keeps its \
                     settings; leave the flag out{})",
                    show(a),
                    show(b),
                    dir.display(),
                    if key == "rounds" {
                        ", or give more rounds to go on"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    if cli.given.iter().any(|g| g == "backend" || g == "device") {
        // Where the run moves is the command line's choice: its errors are the flags'.
        check_device(args)?;
    }
    Ok(())
}

/// Whether RSO's σ anneals over the run's total rounds (so the total decides every round).
fn anneals(args: &TrainArgs) -> bool {
    args.optimizer == OptimizerKind::Rso
        && match args.anneal {
            Some(floor) => floor.is_some(),
            None => RsoConfig::preset(args.preset, 1, 1, 0).anneal.is_some(),
        }
}

/// Whether the results file `out` was written by the checkpointed run of `origin`: its
/// provenance has that run's start and command line, or the note a resumption of that run
/// adds. A resumed run may rewrite its own `--out` without `--force`.
fn written_by_run(out: &Path, origin: &Origin) -> bool {
    let Ok(bytes) = checkpoint::read_limited(&output::meta_path(out), 1 << 20, "") else {
        return false;
    };
    let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    let same_start = match &origin.command {
        checkpoint::CommandLine::Argv(argv) => {
            meta["started"].as_str() == Some(origin.date.as_str())
                && meta["command"] == serde_json::json!(argv)
        }
        checkpoint::CommandLine::Text(_) => false,
    };
    let note = resumed_note_prefix(origin);
    same_start
        || meta["notes"].as_array().is_some_and(|n| {
            n.iter()
                .any(|n| n.as_str().is_some_and(|t| t.contains(&note)))
        })
}

/// The part of a resumed run's provenance note that names the run it continues.
fn resumed_note_prefix(origin: &Origin) -> String {
    format!(
        "of the run started at {} by `{}`",
        origin.date,
        origin.command.display()
    )
}

/// Refuses data other than the checkpoint's (`saved`, recorded in `state_path`), naming both.
fn check_same_data(
    split: &Split,
    used_dir: &Path,
    saved: &DataFingerprint,
    state_path: &Path,
) -> anyhow::Result<()> {
    let data = DataFingerprint::of(split);
    ensure!(
        &data == saved,
        "--data-dir {}: these data differ from the checkpoint's ({} training / {} test samples, \
         checksum {}; {} records {} / {}, checksum {})",
        used_dir.display(),
        data.train,
        data.test,
        data.checksum,
        state_path.display(),
        saved.train,
        saved.test,
        saved.checksum
    );
    Ok(())
}

/// Continues the run checkpointed in `dir`. Everything is read and checked before anything is
/// written: a checkpoint of another model, a damaged weights file, a malformed state, other
/// data or an existing `--out` without `--force` stop it with the files as they were.
fn resume(
    dir: &Path,
    cli: &TrainArgs,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<TrainOutcome> {
    let started = utc_now();
    let ck = checkpoint::read_latest(dir)?;
    let state_path = ck.state_path();
    let mut args = ck
        .state
        .config
        .to_args(cli, dir)
        .with_context(|| format!("{}: invalid settings", state_path.display()))?;
    apply_resume_flags(&mut args, cli, &ck.state.config, dir)?;
    let rows = ck
        .rows()
        .with_context(|| format!("{}", state_path.display()))?;
    let rows = checkpoint::upgrade_rows(rows, ck.state.version, &args, ck.state.data.train)
        .with_context(|| format!("{}", state_path.display()))?;
    check_settings(&args).with_context(|| format!("{}: invalid settings", state_path.display()))?;
    let own_out = args
        .out
        .as_deref()
        .is_some_and(|out| written_by_run(out, &ck.state.origin));
    // A finished run resumed again: its --save-weights holds the checkpoint's weights.
    let own_weights = args.save_weights.as_deref().is_some_and(|w| {
        let read = |p: &Path| checkpoint::read_limited(p, 64 << 20, "").ok();
        read(w).is_some_and(|b| Some(b) == read(&ck.weights_path()))
    });
    check_outputs(&args, (own_out, own_weights))?;
    let split = load_data(&args)?;
    let used_dir = data_dir(&args);
    check_same_data(&split, &used_dir, &ck.state.data, &state_path)?;
    ensure!(
        args.batch_size >= 1 && args.batch_size <= split.train.len(),
        "{}: batch size {} does not fit the training set ({} samples)",
        state_path.display(),
        args.batch_size,
        split.train.len()
    );
    let spec = model_spec(&args, &split)?;
    let params = ck.load_params(&spec)?;
    check_finite(&params).with_context(|| format!("{}", ck.weights_path().display()))?;
    let test_len = split.test.len();
    let net = build_network(&args, &spec, &params, split)?;
    let mut optimizer = build_optimizer(&args, &spec)
        .with_context(|| format!("{}: invalid settings", state_path.display()))?;
    let saved: Vec<(String, String)> = ck.state.optimizer_state.clone().into_iter().collect();
    optimizer
        .restore_state(&saved)
        .with_context(|| format!("{}", state_path.display()))?;
    let mut meta = run_meta(&args, optimizer.as_ref(), net.as_ref(), test_len, &started);
    let origin = &ck.state.origin;
    meta.notes.push(format!(
        "resumed after round {} {} (revision {}); rows 1 to {} come from that run's checkpoint",
        ck.state.rounds_completed,
        resumed_note_prefix(origin),
        origin.revision,
        ck.state.rounds_completed
    ));
    let backend = RunConfig::from_args(&args, Path::new("")).backend;
    if (&backend, &args.device) != (&ck.state.config.backend, &ck.state.config.device) {
        meta.notes.push(format!(
            "rounds 1 to {} were computed on backend {}, device {}: the continuation is exact \
             only on the same backend and device",
            ck.state.rounds_completed, ck.state.config.backend, ck.state.config.device
        ));
    }
    let mut base = ck.state.clone();
    base.version = checkpoint::VERSION;
    // Where the run computes, and its total, may have changed (apply_resume_flags).
    base.config.backend = backend;
    base.config.device = args.device.clone();
    base.config.rounds = args.rounds;
    base.config.data_dir = std::fs::canonicalize(&used_dir)
        .with_context(|| format!("--data-dir {}", used_dir.display()))?;
    // Everything is checked: only now take the directory, and make sure the checkpoint read
    // above is still the newest (no other run wrote one in between).
    let lock = checkpoint::lock(dir, "--resume")?;
    ensure!(
        checkpoint::read_latest(dir)?.state.rounds_completed == ck.state.rounds_completed,
        "--resume {}: another run wrote a checkpoint there meanwhile; resume again",
        dir.display()
    );
    reporter.resumed(dir, ck.state.rounds_completed, args.rounds);
    let session = Session {
        args: &args,
        net,
        optimizer,
        meta,
        checkpointing: Some(Checkpointing {
            dir: dir.to_path_buf(),
            base,
            _lock: lock,
        }),
    };
    train_rounds(session, rows, reporter)
}

/// What is left of `--max-forward-equivalents` after `rows` (none: no budget).
fn remaining_budget(args: &TrainArgs, rows: &[RoundRow]) -> Option<u64> {
    let spent = rows
        .last()
        .and_then(|r| r.cumulative_forward_equivalents)
        .unwrap_or(0);
    args.max_forward_equivalents
        .map(|m| m.saturating_sub(spent))
}

/// The CSV row of round `round` (0-based) from the optimizer's statistics, its training seconds,
/// the evaluations after it (training, test, validation) and the previous round's row.
fn round_row(
    args: &TrainArgs,
    net: &dyn Network,
    round: usize,
    stats: &RoundStats,
    elapsed: f64,
    (train, test, validation): (Eval, Eval, Option<Eval>),
    previous: Option<&RoundRow>,
) -> RoundRow {
    RoundRow {
        round: round + 1,
        model: net.spec().name.clone(),
        optimizer: optimizer_name(args.optimizer),
        preset: args.preset.name().to_string(),
        backend: net.backend().to_string(),
        device: net.device(),
        batch: args.batch_size,
        seconds: elapsed,
        steps: stats.steps,
        accepted: stats.accepted,
        train_loss: train.loss,
        train_acc: train.accuracy,
        test_loss: test.loss,
        test_acc: test.accuracy,
        // The share of steps kept: RSO's accepted visits, ES's successful children.
        accept_rate: matches!(args.optimizer, OptimizerKind::Rso | OptimizerKind::Es)
            .then(|| stats.accepted as f64 / stats.steps.max(1) as f64),
        sigma_scale: stats.sigma_scale,
        forward_equivalents: Some(stats.forward_equivalents),
        cumulative_forward_equivalents: match previous {
            None => Some(stats.forward_equivalents),
            Some(p) => p
                .cumulative_forward_equivalents
                .map(|c| c + stats.forward_equivalents),
        },
        cumulative_seconds: previous.map_or(0.0, |p| p.cumulative_seconds) + elapsed,
        val_loss: validation.map(|v| v.loss),
        val_acc: validation.map(|v| v.accuracy),
    }
}

/// Trains from round `rows.len()` to the end, evaluating, writing `--out` and checkpointing
/// after every round; then writes `--save-weights`.
fn train_rounds(
    session: Session<'_>,
    mut rows: Vec<RoundRow>,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<TrainOutcome> {
    let Session {
        args,
        mut net,
        mut optimizer,
        mut meta,
        checkpointing,
    } = session;
    let calibration: Vec<u32> = {
        let mut order = shuffled(net.train_len(), &mut setup_rng(args.seed, 2));
        order.truncate(BN_CALIBRATION_SAMPLES);
        order
    };
    let ck_dir = checkpointing.as_ref().map(|c| c.dir.clone());
    let mut write_out = |rows: &[RoundRow], net: &dyn Network| -> anyhow::Result<()> {
        if let Some(out) = &args.out {
            meta.ended = utc_now();
            let csv = output::csv_text(rows)?;
            crate::stop::writing(|| output::write_results(out, &csv, &meta))
                .with_context(|| format!("--out {}", out.display()))
                .map_err(|e| e.context(unwritten(net, ck_dir.as_deref())))?;
        }
        Ok(())
    };
    crate::stop::set_progress(rows.len(), args.rounds, ck_dir.clone());
    // A run resumed after its budget ended it is as finished as one after its last round.
    let mut finished = checkpointing
        .as_ref()
        .is_some_and(|c| c.base.budget_reached);
    if rows.len() >= args.rounds || finished {
        // A finished run resumed: nothing to train, the results files still get written.
        write_out(&rows, net.as_ref())?;
    }
    for round in rows.len()..args.rounds {
        if finished {
            break;
        }
        let budget = remaining_budget(args, &rows);
        if budget == Some(0) {
            // The budget ran out exactly at the end of the previous round.
            write_out(&rows, net.as_ref())?;
            break;
        }
        reporter.round_started(round, args.rounds, optimizer.steps_per_round(net.as_ref()));
        let start = Instant::now();
        let stats: RoundStats = optimizer
            .run_round(net.as_mut(), round, budget, &mut |done| {
                reporter.progress(done)
            })
            .map_err(|e: OptimError| anyhow::anyhow!(e))?;
        let elapsed = start.elapsed().as_secs_f64();
        // A diverged round (an SGD step can overflow the logits, or a weight) writes nothing:
        // no results of NaN and no weights the program would refuse to read.
        let trained_before = ck_dir.as_deref().filter(|_| !rows.is_empty());
        if let Some(what) = first_non_finite(&net.params()) {
            return Err(diverged(round, &what, trained_before));
        }
        finished = stats.budget_reached;
        if finished && stats.steps == 0 {
            // Less than one step was left of the budget: no empty row.
            write_out(&rows, net.as_ref())?;
            break;
        }
        let evals = evaluate(net.as_mut(), &calibration);
        if !evals.0.loss.is_finite() {
            let what = format!(
                "the training loss is {}; check the step sizes: --lr, --sigma",
                evals.0.loss
            );
            return Err(diverged(round, &what, trained_before));
        }
        let row = round_row(
            args,
            net.as_ref(),
            round,
            &stats,
            elapsed,
            evals,
            rows.last(),
        );
        reporter.round_finished(&row, args.rounds);
        rows.push(row);
        if let Some(ck) = &checkpointing {
            ck.save(
                &rows,
                optimizer.as_ref(),
                net.as_ref(),
                finished,
                args.rounds,
            )?;
        }
        write_out(&rows, net.as_ref())?;
        crate::stop::set_progress(rows.len(), args.rounds, ck_dir.clone());
    }
    finish(args, net.as_ref(), ck_dir.as_deref(), rows, reporter)
}

/// The outcome of a run that trained `rows`, its `--save-weights` written.
fn finish(
    args: &TrainArgs,
    net: &dyn Network,
    checkpoint: Option<&Path>,
    rows: Vec<RoundRow>,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<TrainOutcome> {
    if let (Some(budget), Some(last)) = (args.max_forward_equivalents, rows.last()) {
        // Fewer rounds than asked for: the budget ended it (any other end is an error).
        if rows.len() < args.rounds {
            let spent = last.cumulative_forward_equivalents.unwrap_or(0);
            reporter.budget_reached(budget, spent, rows.len());
        }
    }
    ensure!(
        !rows.is_empty(),
        "--max-forward-equivalents {}: the first step alone costs more (a step costs, in \
         forward passes of one sample: 3·batch for rso and sgd, 2·q·batch for spsa, 2·batch \
         for es, 3·k·batch for cfd)",
        args.max_forward_equivalents.unwrap_or(0)
    );
    let seconds = rows.iter().map(|r| r.seconds).sum();
    let params = net.params();
    if let Some(path) = &args.save_weights {
        if let Err(e) = params.save(path) {
            let e = anyhow::Error::new(e).context("--save-weights");
            return Err(e.context(unwritten(net, checkpoint)));
        }
    }
    Ok(TrainOutcome {
        rows,
        seconds,
        params,
    })
}
