//! The command line.

use clap::builder::ArgPredicate;
use clap::{Args, Parser, Subcommand, ValueEnum};
use rso_models::{ModelKind, Preset};
use std::path::PathBuf;

/// Train neural networks with RSO (random search optimization) or SGD.
#[derive(Debug, Parser)]
#[command(name = "rso", version, about)]
pub struct Cli {
    /// Worker threads of the pure-Rust backend (default: all cores; for each run of a study or
    /// reproduction: the plan's `threads`, else cores / --jobs). Results do not depend on it.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train one model with one optimizer, evaluating after every round.
    Train(Box<TrainArgs>),
    /// Regenerate a results file in results/ (with its provenance).
    #[command(subcommand)]
    Reproduce(ReproduceCommand),
    /// A grid of settings × seeds from a TOML plan: run it here, summarise it (mean ± sd).
    #[command(subcommand)]
    Study(StudyCommand),
}

/// `rso study` subcommands.
#[derive(Debug, Subcommand)]
pub enum StudyCommand {
    /// Print the manifest: one CSV row per run (index, id, status, `rso train` arguments).
    Plan(StudyArgs),
    /// Run every run that is not done, N at a time, each as a child `rso train` (an interrupted
    /// run resumes from its checkpoint; failed and stopped runs are tried again). Exit status:
    /// 0 all done, 75 some stopped, else the number that failed.
    Run(StudyRunArgs),
    /// Run (or resume) the run in manifest row INDEX (a Slurm array task). Exit status: 0 done,
    /// 75 stopped, 1 failed.
    RunOne(StudyRunOneArgs),
    /// Write summary.csv (n, mean, sd, min, max per setting and round) and summary.svg; list
    /// missing runs on stderr.
    Collect(StudyArgs),
    /// Write a Slurm job array (one task per run not done, task id = manifest row) and a collect
    /// job into <study dir>/slurm/, and print the sbatch commands.
    Slurm(StudySlurmArgs),
}

/// `rso study slurm` options (each given one becomes an `#SBATCH` line).
#[derive(Clone, Debug, Args)]
pub struct StudySlurmArgs {
    /// The study plan (TOML).
    pub plan: PathBuf,
    /// The study's directory (as for `rso study plan`).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Slurm partition.
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm account.
    #[arg(long)]
    pub account: Option<String>,
    /// Slurm QOS.
    #[arg(long)]
    pub qos: Option<String>,
    /// Memory per task (Slurm syntax: 4G).
    #[arg(long)]
    pub mem: Option<String>,
    /// Time limit per task (Slurm syntax: 2:00:00).
    #[arg(long)]
    pub time: Option<String>,
    /// CPUs per task (each run uses as many threads as it is given).
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// At most K tasks at once (`--array=…%K`).
    #[arg(long, value_name = "K")]
    pub max_parallel: Option<u32>,
}

/// The plan and where its study lives.
#[derive(Clone, Debug, Args)]
pub struct StudyArgs {
    /// The study plan (TOML).
    pub plan: PathBuf,
    /// The study's directory (default: the plan's `out_dir`, else beside the plan, named after
    /// it).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// `rso study run` options.
#[derive(Clone, Debug, Args)]
pub struct StudyRunArgs {
    /// The study plan (TOML).
    pub plan: PathBuf,
    /// The study's directory (as for `rso study plan`).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Runs at a time (threads are split so that jobs × threads ≤ cores).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
}

/// `rso study run-one` options.
#[derive(Clone, Debug, Args)]
pub struct StudyRunOneArgs {
    /// The study plan (TOML).
    pub plan: PathBuf,
    /// The study's directory (as for `rso study plan`).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Manifest row number, 1-based.
    #[arg(long)]
    pub index: usize,
    /// The id the row must have (the Slurm script passes the id it was written for, so that a
    /// plan edited since then cannot send a task to another run).
    #[arg(long)]
    pub id: Option<String>,
}

/// `rso reproduce` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReproduceCommand {
    /// The reference notebook's ten RSO configurations (preset seed) → seed_table.{csv,md}.
    SeedTable(SeedTableArgs),
    /// RSO (preset seed) against SGD, test accuracy per round → comparison*.{csv,svg}.
    Comparison(ComparisonArgs),
    /// The paper's preset on its model, test accuracy per round → paper_mnist.csv.
    Paper(PaperArgs),
    /// RSO against SPSA, ES and CFD at the same forward-pass budget (SGD as the gradient
    /// reference), each tuned on a validation split → forward_only*.{csv,md,svg}.
    ForwardOnly(ForwardOnlyArgs),
}

/// `rso reproduce forward-only` options.
#[derive(Clone, Debug, Args)]
pub struct ForwardOnlyArgs {
    /// Models to compare on.
    #[arg(long, num_args = 1.., default_values_t = ["one-conv".to_string(), "two-conv".to_string()])]
    pub models: Vec<String>,
    /// Minibatch size of every method.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// The budget, in RSO rounds: every forward-only method gets the forward-equivalents of this
    /// many RSO rounds of the model at the batch size (3·batch·parameters each).
    #[arg(long, default_value_t = 3)]
    pub budget_rounds: usize,
    /// Seeds per method of the chosen settings (seeds S…S+N−1, S = --seed).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Training images held out (the last N) to choose each method's setting on.
    #[arg(long, default_value_t = 10000)]
    pub val_split: usize,
    /// Epochs of the SGD reference.
    #[arg(long, default_value_t = 20)]
    pub sgd_epochs: usize,
    /// Learning rate of the SGD reference (untuned).
    #[arg(long, default_value_t = 0.01)]
    pub sgd_lr: f32,
    /// Train on the first N training images only (a quick look; the validation split is taken
    /// from these).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Runs at a time (as `rso study run --jobs`).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Backend, device, data, seed, output directory.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Options every reproduction shares.
#[derive(Clone, Debug, Args)]
pub struct CommonArgs {
    /// Backend: cpu or tch.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Device of the tch engine.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Dataset directory (default data/mnist).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the results files go.
    #[arg(long, default_value = "results")]
    pub out_dir: PathBuf,
}

/// `rso reproduce seed-table` options.
#[derive(Clone, Debug, Args)]
pub struct SeedTableArgs {
    /// Run a three-row subset (a few minutes) into seed_table_quick.{csv,md}.
    #[arg(long)]
    pub quick: bool,
    /// Seeds per one-conv and two-conv row (seeds S…S+N−1, S = --seed).
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// Seeds per paper-model row (each takes minutes to tens of minutes on 2 cores).
    #[arg(long, default_value_t = 1)]
    pub paper_seeds: u64,
    /// Runs at a time (as `rso study run --jobs`).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Backend, device, data, seed, output directory.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `rso reproduce comparison` options.
#[derive(Clone, Debug, Args)]
pub struct ComparisonArgs {
    /// Models to compare on.
    #[arg(long, num_args = 1.., default_values_t = ["one-conv".to_string(), "two-conv".to_string()])]
    pub models: Vec<String>,
    /// Rounds of RSO and epochs of SGD.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Minibatch size of both.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f32,
    /// Seeds per optimizer (seeds S…S+N−1, S = --seed).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Runs at a time (as `rso study run --jobs`).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Backend, device, data, seed, output directory.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `rso reproduce paper` options.
#[derive(Clone, Debug, Args)]
pub struct PaperArgs {
    /// Rounds (the paper: 50).
    #[arg(long, default_value_t = 50)]
    pub rounds: usize,
    /// Minibatch size (the paper: 5000).
    #[arg(long, default_value_t = 5000)]
    pub batch_size: usize,
    /// Checkpoint after every round into DIR (as `rso train --checkpoint-dir`), so a run cut
    /// short (a time limit on a GPU machine) can go on with `--resume DIR`.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue the run checkpointed in DIR (its settings come from the checkpoint; --data-dir
    /// and --out-dir apply, and --backend/--device other than the defaults move the run, as
    /// `rso train --resume` does), rewriting paper_mnist.csv with all rounds so far.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["rounds", "batch_size", "checkpoint_dir"])]
    pub resume: Option<PathBuf>,
    /// Backend, device, data, seed, output directory.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Which optimizer trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerKind {
    /// Random search optimization.
    Rso,
    /// Plain minibatch SGD.
    Sgd,
    /// Two-point random-direction estimates (SPSA; MeZO's Gaussian directions by default).
    Spsa,
    /// A (1+1) evolution strategy with the 1/5 success rule.
    Es,
    /// Coordinate finite differences (randomized block-coordinate descent).
    Cfd,
}

/// Distribution of SPSA's direction entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    /// Standard normal (MeZO).
    Gaussian,
    /// ±1 (classic SPSA).
    Rademacher,
}

/// Which engine computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The pure-Rust backend.
    Cpu,
    /// libtorch through tch (build with `--features tch`).
    Tch,
}

/// Which dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetKind {
    /// MNIST IDX files (raw or .gz).
    Mnist,
    /// CIFAR-10 binary batches.
    Cifar10,
}

/// RSO minibatch source (overrides the preset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BatchPolicyArg {
    /// One of the round's shuffled batches, drawn with replacement for every step (RSO: every
    /// weight).
    Random,
    /// Consecutive windows of a shuffle, reshuffled at each layer's sweep (RSO, cfd) or each
    /// round (spsa, es).
    Sequential,
}

/// RSO candidate-loss implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RsoEvalArg {
    /// Three full forward passes per weight (the oracle).
    Reference,
    /// The engine's fastest exact path.
    Incremental,
}

fn parse_model(s: &str) -> Result<ModelKind, String> {
    s.parse()
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    s.parse()
}

/// A whole number, written plainly or in scientific notation (`18000000`, `1.8e7`).
fn parse_count(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    match s.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(63) => Ok(x as u64),
        _ => Err(format!(
            "'{s}' is not a whole number ≥ 0 (e.g. 18000000 or 1.8e7)"
        )),
    }
}

fn parse_anneal(s: &str) -> Result<Option<f64>, String> {
    if s == "none" {
        return Ok(None);
    }
    match s.parse::<f64>() {
        Ok(a) if (0.0..=1.0).contains(&a) => Ok(Some(a)),
        _ => Err(format!("'{s}' is not 'none' or a number in [0, 1]")),
    }
}

/// The optimizer-specific `rso train` settings (snake_case flag names) and the optimizers that
/// read each. A run refuses a setting given for another optimizer, and a study leaves the
/// settings its run's optimizer does not read out of the run's id.
pub const OPTIMIZER_SETTINGS: [(&str, &[OptimizerKind]); 13] = {
    use OptimizerKind::{Cfd, Es, Rso, Sgd, Spsa};
    [
        ("lr", &[Sgd, Spsa, Cfd]),
        ("sigma", &[Rso]),
        ("sigma_multiplier", &[Rso]),
        ("anneal", &[Rso]),
        ("weight_decay", &[Rso]),
        ("batch_policy", &[Rso, Spsa, Es, Cfd]),
        ("rso_eval", &[Rso, Cfd]),
        ("spsa_eps", &[Spsa]),
        ("spsa_directions", &[Spsa]),
        ("spsa_dist", &[Spsa]),
        ("es_sigma", &[Es]),
        ("cfd_block", &[Cfd]),
        ("cfd_mu", &[Cfd]),
    ]
};

/// `rso train` options.
#[derive(Clone, Debug, Args)]
pub struct TrainArgs {
    /// Model: one-conv, two-conv or paper.
    #[arg(long, value_parser = parse_model, required = false, required_unless_present = "resume",
          default_value_if("resume", ArgPredicate::IsPresent, "one-conv"))]
    pub model: ModelKind,
    /// Optimizer.
    #[arg(
        long,
        value_enum,
        required = false,
        required_unless_present = "resume",
        default_value_if("resume", ArgPredicate::IsPresent, "rso")
    )]
    pub optimizer: OptimizerKind,
    /// Rounds (RSO), epochs (SGD), or for spsa, es and cfd rounds of one RSO round's forward
    /// passes each (3·batch size·parameters).
    #[arg(
        long,
        visible_alias = "epochs",
        required = false,
        required_unless_present = "resume",
        default_value_if("resume", ArgPredicate::IsPresent, "1")
    )]
    pub rounds: usize,
    /// Minibatch size.
    #[arg(
        long,
        required = false,
        required_unless_present = "resume",
        default_value_if("resume", ArgPredicate::IsPresent, "1")
    )]
    pub batch_size: usize,
    /// Preset: seed (the notebook) or paper (the authors' code). Decides initialisation and
    /// input normalisation for SGD too.
    #[arg(long, default_value = "seed", value_parser = parse_preset)]
    pub preset: Preset,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory holding the dataset (default data/mnist, or data/cifar10).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Dataset.
    #[arg(long, value_enum, default_value = "mnist")]
    pub dataset: DatasetKind,
    /// Train on the first N training samples only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test samples only.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Hold out the last N training samples (after --train-limit) as a validation set: never
    /// trained on nor used to calibrate BatchNorm, evaluated after every round (CSV columns
    /// val_loss, val_acc), for choosing settings without looking at the test set.
    #[arg(long, value_name = "N")]
    pub val_split: Option<usize>,
    /// Learning rate of sgd (default 0.01, the notebook's), spsa (default 3e-4) and cfd (default
    /// 2; the last two as tuned on one-conv at batch 256, results/forward_only_tuning.csv).
    #[arg(long)]
    pub lr: Option<f32>,
    /// RSO: one fixed σ for every layer (overrides the preset's rule); at most 3.4e37 (times
    /// the multiplier), since Δ is drawn as f32.
    #[arg(long)]
    pub sigma: Option<f64>,
    /// RSO: a multiplier of every layer's σ (default 1), for tuning (not the CSV's
    /// sigma_scale column, which is the annealing factor).
    #[arg(long)]
    pub sigma_multiplier: Option<f64>,
    /// RSO: annealing floor α in [0, 1], or `none` (overrides the preset).
    #[arg(long, value_parser = parse_anneal)]
    // The inner `Option` is spelled out so clap does not read `Option<Option<_>>` as a flag
    // with an optional value (which panicked on any --anneal: the parser yields Option<f64>).
    pub anneal: Option<std::option::Option<f64>>,
    /// RSO: weight decay factor applied before each visit (overrides the preset).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// RSO, spsa, es and cfd: minibatch source (overrides the preset's).
    #[arg(long, value_enum)]
    pub batch_policy: Option<BatchPolicyArg>,
    /// RSO and cfd: candidate-loss implementation (default incremental).
    #[arg(long, value_enum)]
    pub rso_eval: Option<RsoEvalArg>,
    /// spsa: perturbation size ε of L(W ± εz) (default 1e-3, MeZO's).
    #[arg(long)]
    pub spsa_eps: Option<f32>,
    /// spsa: directions q averaged per step (default 1); a step costs 2·q·batch forward passes.
    #[arg(long)]
    pub spsa_directions: Option<usize>,
    /// spsa: distribution of the direction's entries (default gaussian).
    #[arg(long, value_enum)]
    pub spsa_dist: Option<DirectionArg>,
    /// es: initial mutation strength σ of W + σz (default 0.01), adapted by the 1/5 rule.
    #[arg(long)]
    pub es_sigma: Option<f64>,
    /// cfd: coordinates per block, sharing a minibatch and updated together (default 1).
    #[arg(long)]
    pub cfd_block: Option<usize>,
    /// cfd: finite-difference step μ of L(w ± μ) (default 1e-3).
    #[arg(long)]
    pub cfd_mu: Option<f32>,
    /// Stop the run once its next step would bring the forward-equivalents (the CSV's
    /// cumulative_forward_equivalents) above N, whatever the optimizer; --rounds still bounds it.
    /// N is a whole number, also in scientific notation (1.8e7).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub max_forward_equivalents: Option<u64>,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// Device of the tch engine: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write one CSV row per round to FILE (atomically, after every round).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Allow --out and --save-weights to replace existing files.
    #[arg(long)]
    pub force: bool,
    /// Save the final weights as safetensors (canonical names).
    #[arg(long, value_name = "FILE")]
    pub save_weights: Option<PathBuf>,
    /// Start from these safetensors weights instead of the preset's initialisation.
    #[arg(long, value_name = "FILE")]
    pub init_weights: Option<PathBuf>,
    /// After every round, checkpoint the weights and the run's state into DIR (atomically; the
    /// previous checkpoint stays valid until the new one is complete). See `--resume`.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue the run checkpointed in DIR after its last complete round, writing further
    /// checkpoints there. Its settings come from the checkpoint: a setting given again must have
    /// the checkpoint's value, except --rounds above the run's total (more rounds, for a run
    /// whose σ does not anneal over its total) and --backend/--device (where it computes: the
    /// continuation is exact only on the same backend and device). --out, --save-weights,
    /// --force, --data-dir (same data, checked) and the global --threads apply as usual.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// The settings of [`RESULT_SETTINGS`] given on the command line (filled by
    /// [`Cli::parse_recording`]; `--resume` compares them with the checkpoint's).
    #[arg(skip)]
    pub given: Vec<String>,
}

impl Cli {
    /// [`Parser::parse`] that also records which of `rso train`'s [`RESULT_SETTINGS`] the
    /// command line gave (clap's defaults and `--resume`'s placeholders are not given).
    pub fn parse_recording() -> Cli {
        Cli::try_parse_recording_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// [`Cli::parse_recording`] of `argv` (program name first).
    ///
    /// # Errors
    /// As [`Parser::try_parse_from`].
    pub fn try_parse_recording_from<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::parser::ValueSource;
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().try_get_matches_from(argv)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        if let (Command::Train(args), Some(sub)) =
            (&mut cli.command, matches.subcommand_matches("train"))
        {
            args.given = RESULT_SETTINGS
                .iter()
                .filter(|id| sub.value_source(id) == Some(ValueSource::CommandLine))
                .map(|id| id.to_string())
                .collect();
        }
        Ok(cli)
    }
}

/// The `rso train` options that decide a run's results (and where it checkpoints): a
/// checkpoint fixes them, so `--resume` accepts one only with the checkpoint's value (see
/// `--resume` for the exceptions).
pub const RESULT_SETTINGS: [&str; 28] = [
    "model",
    "optimizer",
    "rounds",
    "batch_size",
    "preset",
    "seed",
    "dataset",
    "train_limit",
    "test_limit",
    "val_split",
    "lr",
    "sigma",
    "anneal",
    "weight_decay",
    "batch_policy",
    "rso_eval",
    "sigma_multiplier",
    "spsa_eps",
    "spsa_directions",
    "spsa_dist",
    "es_sigma",
    "cfd_block",
    "cfd_mu",
    "max_forward_equivalents",
    "backend",
    "device",
    "init_weights",
    "checkpoint_dir",
];
