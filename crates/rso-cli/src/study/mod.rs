//! `rso study`: a grid of `rso train` settings × seeds, run here (`run`) and aggregated into
//! mean ± sd per setting and round (`collect`).
//!
//! - [`plan`]: the TOML plan and its manifest (ordered runs with stable ids);
//! - [`exec`]: running the manifest's missing runs as child `rso train` processes;
//! - [`collect`]: `summary.csv` and `summary.svg` from the runs' per-round CSVs;
//! - [`slurm`]: the same runs as a Slurm job array.
//!
//! # Layout of a study's directory
//!
//! ```text
//! <study dir>/runs/<id>/rounds.csv        the run's `rso train --out` (and rounds.meta.json)
//! <study dir>/runs/<id>/checkpoint/       its `--checkpoint-dir` (an interrupted run resumes)
//! <study dir>/runs/<id>/log.txt           its stdout and stderr, every attempt appended
//! <study dir>/runs/<id>/status.json       how its last attempt ended ([`Outcome`])
//! <study dir>/summary.csv, summary.svg    `rso study collect` (and summary.meta.json)
//! ```

pub mod collect;
pub mod exec;
pub mod plan;
pub mod slurm;

use crate::args::StudyCommand;
use plan::{Plan, Run};
use serde::{Deserialize, Serialize};

pub use crate::stop::EXIT_STOPPED;

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not started, or started and stopped before its first checkpoint.
    Pending,
    /// Finished: its CSV holds every round.
    Done,
    /// Ended with an error (see its `status.json` and `log.txt`).
    Failed,
    /// Stopped by a signal or interrupted with a checkpoint to resume from.
    Stopped,
}

impl Status {
    /// The name the manifest prints.
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Stopped => "stopped",
        }
    }
}

/// The contents of a run's `status.json`: how its last attempt ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// `done`, `failed` or `stopped`.
    pub status: Status,
    /// The child's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// The error line of a failed run.
    pub error: Option<String>,
    /// When the attempt ended (UTC).
    pub ended: String,
}

/// File names inside a run's directory.
pub const ROUNDS_CSV: &str = "rounds.csv";
/// The run's checkpoint directory.
pub const CHECKPOINT: &str = "checkpoint";
/// The run's log.
pub const LOG: &str = "log.txt";
/// The run's outcome.
pub const STATUS: &str = "status.json";

/// Where `run` stands, from the files in its directory: its `status.json` when it has one
/// (`done` only while its CSV exists), else `stopped` when it has a checkpoint (its process was
/// killed), else `pending`.
pub fn status(plan: &Plan, run: &Run) -> Status {
    let dir = plan.run_dir(run);
    let outcome = std::fs::read(dir.join(STATUS))
        .ok()
        .and_then(|b| serde_json::from_slice::<Outcome>(&b).ok());
    match outcome.map(|o| o.status) {
        Some(Status::Done) if dir.join(ROUNDS_CSV).is_file() => Status::Done,
        Some(s @ (Status::Failed | Status::Stopped)) => s,
        _ if dir
            .join(CHECKPOINT)
            .join(crate::checkpoint::LATEST)
            .is_file() =>
        {
            Status::Stopped
        }
        _ => Status::Pending,
    }
}

/// The manifest as CSV: `index,id,status,arguments` (the arguments of `rso train`, one field).
pub fn manifest_csv(plan: &Plan) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["index", "id", "status", "arguments"])?;
    for run in &plan.runs {
        w.write_record([
            run.index.to_string(),
            run.id.clone(),
            status(plan, run).name().to_string(),
            run.args.join(" "),
        ])?;
    }
    Ok(String::from_utf8(
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?,
    )?)
}

/// Runs a `study` subcommand; returns the process's exit status.
pub fn run(cmd: &StudyCommand) -> anyhow::Result<i32> {
    match cmd {
        StudyCommand::Plan(a) => {
            let plan = Plan::load(&a.plan, a.out_dir.as_deref())?;
            print!("{}", manifest_csv(&plan)?);
            Ok(0)
        }
        StudyCommand::Run(a) => {
            let plan = Plan::load(&a.plan, a.out_dir.as_deref())?;
            exec::forward_signals()?;
            exec::run_pending(&plan, a.jobs)
        }
        StudyCommand::RunOne(a) => {
            let plan = Plan::load(&a.plan, a.out_dir.as_deref())?;
            let run = plan.run(a.index)?;
            if let Some(id) = &a.id {
                anyhow::ensure!(
                    *id == run.id,
                    "{}: manifest row {} is run {}, not {id}: the plan changed since the script \
                     was written; write it again with `rso study slurm`",
                    plan.path.display(),
                    a.index,
                    run.id
                );
            }
            exec::check_data(&plan)?;
            exec::forward_signals()?;
            let threads = exec::threads_or(&plan, exec::cores);
            let outcome = exec::run_one(&plan, run, threads)?;
            println!("run {} ({}): {}", run.index, run.id, outcome.status.name());
            Ok(match outcome.status {
                Status::Done => 0,
                Status::Stopped => EXIT_STOPPED,
                _ => 1,
            })
        }
        StudyCommand::Slurm(a) => {
            let plan = Plan::load(&a.plan, a.out_dir.as_deref())?;
            exec::check_data(&plan)?;
            slurm::write_scripts(&plan, a)?;
            Ok(0)
        }
        StudyCommand::Collect(a) => {
            let plan = Plan::load(&a.plan, a.out_dir.as_deref())?;
            collect::collect(&plan)
        }
    }
}
