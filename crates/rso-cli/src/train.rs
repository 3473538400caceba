//! `rso train`: one model, one optimizer, evaluation after every round.

use crate::args::{Backend, BatchPolicyArg, DatasetKind, OptimizerKind, RsoEvalArg, TrainArgs};
use crate::output::{self, RoundRow};
use crate::provenance::Provenance;
use anyhow::{bail, ensure, Context};
use rso_data::Split;
use rso_models::{init_params, ModelSpec, Network, Params, SplitKind};
use rso_optim::{
    setup_rng, shuffled, BatchPolicy, OptimError, Optimizer, RoundStats, Rso, RsoConfig, RsoEval,
    Sgd, SgdConfig, SigmaRule,
};
use std::io::IsTerminal;
use std::path::PathBuf;
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
    /// The `RESULT …` line scripts read (the last line of `rso train`'s stdout).
    pub fn result_line(&self) -> String {
        let last = self.rows.last().expect("a run has at least one round");
        format!(
            "RESULT model={} optimizer={} backend={} device={} rounds={} batch={} seconds={:.3} test_loss={:.6} test_acc={:.4}",
            last.model,
            last.optimizer,
            last.backend,
            last.device,
            last.round,
            last.batch,
            self.seconds,
            last.test_loss,
            last.test_acc
        )
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
}

/// Prints a progress bar with ETA on a terminal (stderr), plain per-round lines always (stdout).
pub struct ConsoleReporter {
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
}

impl ConsoleReporter {
    /// A reporter that draws bars only when stderr is a terminal.
    pub fn new() -> ConsoleReporter {
        ConsoleReporter { bar: None, terminal: std::io::stderr().is_terminal() }
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
        println!(
            "round {}/{} seconds={:.3} accepted={}/{} train_loss={:.6} train_acc={:.4} test_loss={:.6} test_acc={:.4}",
            row.round,
            rounds,
            row.seconds,
            row.accepted,
            row.steps,
            row.train_loss,
            row.train_acc,
            row.test_loss,
            row.test_acc
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

/// Loads the dataset the arguments name, normalised for the preset and cut to the limits.
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
        DatasetKind::Mnist => rso_data::load_mnist(&dir, norm),
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
    Ok(split)
}

/// Checks the arguments that need no data.
fn check_args(args: &TrainArgs) -> anyhow::Result<()> {
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    if let Some(out) = &args.out {
        output::check_writable(out, args.force, "--out")?;
    }
    if let Some(path) = &args.save_weights {
        output::check_writable(path, args.force, "--save-weights")?;
    }
    if args.backend == Backend::Cpu && args.device != "cpu" {
        bail!("--device {}: the cpu backend runs on the CPU only (use --backend tch)", args.device);
    }
    Ok(())
}

/// The model spec for the loaded data.
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
        None => Ok(init_params(spec, args.preset.init(), &mut setup_rng(args.seed, 0))),
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

/// The optimizer the arguments describe.
pub fn build_optimizer(args: &TrainArgs, spec: &ModelSpec) -> anyhow::Result<Box<dyn Optimizer>> {
    Ok(match args.optimizer {
        OptimizerKind::Sgd => Box::new(Sgd::new(SgdConfig {
            lr: args.lr,
            batch_size: args.batch_size,
            seed: args.seed,
        })?),
        OptimizerKind::Rso => {
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
            if let Some(p) = args.batch_policy {
                cfg.batch_policy = match p {
                    BatchPolicyArg::Random => BatchPolicy::Random,
                    BatchPolicyArg::Sequential => BatchPolicy::Sequential,
                };
            }
            cfg.eval = match args.rso_eval {
                RsoEvalArg::Reference => RsoEval::Reference,
                RsoEvalArg::Incremental => RsoEval::Incremental,
            };
            Box::new(Rso::new(spec, cfg)?)
        }
    })
}

/// Evaluates after a round: BatchNorm calibrated on a fixed training subset first.
fn evaluate(net: &mut dyn Network, calibration: &[u32]) -> (rso_models::Eval, rso_models::Eval) {
    if net.spec().has_batch_norm() {
        net.calibrate_bn(calibration);
    }
    (net.evaluate(SplitKind::Train, None), net.evaluate(SplitKind::Test, None))
}

/// Runs `rso train`.
pub fn run(args: &TrainArgs, reporter: &mut dyn Reporter) -> anyhow::Result<TrainOutcome> {
    check_args(args)?;
    let split = load_data(args)?;
    ensure!(
        args.batch_size <= split.train.len(),
        "--batch-size {} is larger than the training set ({} samples)",
        args.batch_size,
        split.train.len()
    );
    let spec = model_spec(args, &split)?;
    let params = initial_params(args, &spec)
        .with_context(|| "--init-weights".to_string())?;
    let mut net = build_network(args, &spec, &params, split)?;
    let mut optimizer = build_optimizer(args, &spec)?;
    let provenance = Provenance::current(&format!("{} {}", net.backend(), net.device()));
    let calibration: Vec<u32> = {
        let mut order = shuffled(net.train_len(), &mut setup_rng(args.seed, 2));
        order.truncate(BN_CALIBRATION_SAMPLES);
        order
    };

    let mut rows = Vec::with_capacity(args.rounds);
    let mut seconds = 0.0;
    for round in 0..args.rounds {
        let steps = optimizer.steps_per_round(net.as_ref());
        reporter.round_started(round, args.rounds, steps);
        let start = Instant::now();
        let stats: RoundStats = optimizer
            .run_round(net.as_mut(), round, &mut |done| reporter.progress(done))
            .map_err(|e: OptimError| anyhow::anyhow!(e))?;
        let elapsed = start.elapsed().as_secs_f64();
        seconds += elapsed;
        let (train, test) = evaluate(net.as_mut(), &calibration);
        let row = RoundRow {
            round: round + 1,
            model: spec.name.clone(),
            optimizer: optimizer.name().to_string(),
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
        };
        reporter.round_finished(&row, args.rounds);
        rows.push(row);
        if let Some(out) = &args.out {
            output::write_file(out, &output::csv_text(&provenance, &rows)?)
                .with_context(|| format!("--out {}", out.display()))?;
        }
    }
    let params = net.params();
    if let Some(path) = &args.save_weights {
        params.save(path).with_context(|| format!("--save-weights {}", path.display()))?;
    }
    Ok(TrainOutcome { rows, seconds, params })
}
