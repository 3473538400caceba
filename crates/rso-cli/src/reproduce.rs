//! `rso reproduce`: regenerate the files in `results/`, each with its provenance.
//!
//! - `seed-table`: the reference notebook's ten configurations (preset `seed`);
//! - `comparison`: RSO against SGD, test accuracy per round, CSV and SVG plot;
//! - `paper`: the paper's preset on its model, test accuracy per round.

use crate::args::{CommonArgs, ComparisonArgs, PaperArgs, ReproduceCommand, SeedTableArgs};
use crate::output::{self, RoundRow};
use crate::provenance::{utc_now, Meta};
use crate::train::{self, ConsoleReporter, TrainOutcome};
use crate::{Cli, Command};
use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use std::path::Path;

/// One row of the notebook's table (DESIGN §8).
#[derive(Clone, Copy, Debug)]
pub struct NotebookRow {
    /// Our model name.
    pub model: &'static str,
    /// Rounds run.
    pub rounds: usize,
    /// Minibatch size.
    pub batch: usize,
    /// The notebook's time for all rounds, seconds.
    pub seconds: f64,
    /// The notebook's test loss, where reported.
    pub test_loss: Option<f64>,
    /// The notebook's test accuracy, where reported.
    pub test_acc: Option<f64>,
}

/// The notebook's ten configurations, cheapest first (so an interrupted table keeps the most
/// rows). "Original" is our `paper` model.
pub const NOTEBOOK: [NotebookRow; 10] = [
    NotebookRow {
        model: "one-conv",
        rounds: 10,
        batch: 32,
        seconds: 212.0,
        test_loss: Some(0.6316686),
        test_acc: Some(0.8075),
    },
    NotebookRow {
        model: "one-conv",
        rounds: 10,
        batch: 64,
        seconds: 345.0,
        test_loss: Some(0.55254054),
        test_acc: Some(0.8353),
    },
    NotebookRow {
        model: "one-conv",
        rounds: 10,
        batch: 256,
        seconds: 1641.0,
        test_loss: Some(0.37202972),
        test_acc: Some(0.8929),
    },
    NotebookRow {
        model: "one-conv",
        rounds: 10,
        batch: 512,
        seconds: 2834.0,
        test_loss: Some(0.29727805),
        test_acc: Some(0.9152),
    },
    NotebookRow {
        model: "one-conv",
        rounds: 10,
        batch: 1024,
        seconds: 5046.0,
        test_loss: Some(0.3011675),
        test_acc: Some(0.9148),
    },
    NotebookRow {
        model: "two-conv",
        rounds: 10,
        batch: 32,
        seconds: 1457.0,
        test_loss: Some(0.5126024),
        test_acc: Some(0.8504),
    },
    NotebookRow {
        model: "two-conv",
        rounds: 10,
        batch: 512,
        seconds: 19186.0,
        test_loss: Some(0.19334497),
        test_acc: Some(0.9397),
    },
    NotebookRow {
        model: "two-conv",
        rounds: 10,
        batch: 1000,
        seconds: 36464.0,
        test_loss: Some(0.12634973),
        test_acc: Some(0.9604),
    },
    NotebookRow {
        model: "paper",
        rounds: 1,
        batch: 256,
        seconds: 5240.0,
        test_loss: None,
        test_acc: None,
    },
    NotebookRow {
        model: "paper",
        rounds: 1,
        batch: 1000,
        seconds: 73042.0,
        test_loss: None,
        test_acc: None,
    },
];

/// The `--quick` subset: indices into [`NOTEBOOK`].
const QUICK: [usize; 3] = [0, 4, 7];

/// A row of `results/seed_table.csv`.
#[derive(Clone, Debug, Serialize)]
pub struct SeedTableRow {
    /// Model.
    pub model: String,
    /// Rounds.
    pub rounds: usize,
    /// Minibatch size.
    pub batch: usize,
    /// Backend.
    pub engine: String,
    /// Device.
    pub device: String,
    /// Our wall time of the training rounds, seconds.
    pub seconds: f64,
    /// Our test loss after the last round.
    pub test_loss: f64,
    /// Our test accuracy after the last round.
    pub test_acc: f64,
    /// The notebook's time, seconds.
    pub notebook_seconds: f64,
    /// The notebook's test loss (empty where it reported none).
    pub notebook_test_loss: Option<f64>,
    /// The notebook's test accuracy (empty where it reported none).
    pub notebook_test_acc: Option<f64>,
    /// `notebook_seconds / seconds`.
    pub speedup: f64,
}

/// Runs `rso train` with these arguments (as typed after `rso train`).
fn train_with(args: &[String]) -> anyhow::Result<TrainOutcome> {
    let argv = ["rso", "train"]
        .iter()
        .map(|s| s.to_string())
        .chain(args.iter().cloned());
    let cli = Cli::try_parse_from(argv).map_err(|e| anyhow::anyhow!("internal arguments: {e}"))?;
    let Command::Train(t) = cli.command else {
        unreachable!("parsed a train command")
    };
    train::run(&t, &mut ConsoleReporter::new())
}

/// Arguments shared by every run of a reproduction.
fn common(e: &CommonArgs) -> Vec<String> {
    let mut v = vec![
        "--backend".into(),
        e.backend.clone(),
        "--device".into(),
        e.device.clone(),
        "--seed".into(),
        e.seed.to_string(),
    ];
    if let Some(d) = &e.data_dir {
        v.push("--data-dir".into());
        v.push(d.display().to_string());
    }
    v
}

/// Runs a `reproduce` subcommand.
pub fn run(cmd: &ReproduceCommand) -> anyhow::Result<()> {
    match cmd {
        ReproduceCommand::SeedTable(a) => seed_table(a),
        ReproduceCommand::Comparison(a) => comparison(a),
        ReproduceCommand::Paper(a) => paper(a),
    }
}

fn seed_table(a: &SeedTableArgs) -> anyhow::Result<()> {
    let picks: Vec<usize> = if a.quick {
        QUICK.to_vec()
    } else {
        (0..NOTEBOOK.len()).collect()
    };
    let stem = if a.quick {
        "seed_table_quick"
    } else {
        "seed_table"
    };
    let csv_path = a.common.out_dir.join(format!("{stem}.csv"));
    let md_path = a.common.out_dir.join(format!("{stem}.md"));
    ensure_dir(&a.common.out_dir)?;
    let started = utc_now();
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for (i, &k) in picks.iter().enumerate() {
        let nb = NOTEBOOK[k];
        println!(
            "== [{}/{}] {} rounds={} batch={}",
            i + 1,
            picks.len(),
            nb.model,
            nb.rounds,
            nb.batch
        );
        let mut args = vec![
            "--model".to_string(),
            nb.model.into(),
            "--optimizer".into(),
            "rso".into(),
            "--preset".into(),
            "seed".into(),
            "--rounds".into(),
            nb.rounds.to_string(),
            "--batch-size".into(),
            nb.batch.to_string(),
        ];
        args.extend(common(&a.common));
        let outcome = train_with(&args)?;
        runs.push(args);
        let last = outcome.rows.last().expect("at least one round");
        rows.push(SeedTableRow {
            model: nb.model.into(),
            rounds: nb.rounds,
            batch: nb.batch,
            engine: last.backend.clone(),
            device: last.device.clone(),
            seconds: outcome.seconds,
            test_loss: last.test_loss,
            test_acc: last.test_acc,
            notebook_seconds: nb.seconds,
            notebook_test_loss: nb.test_loss,
            notebook_test_acc: nb.test_acc,
            speedup: nb.seconds / outcome.seconds.max(1e-9),
        });
        // Rewrite after every configuration so a long table survives an interruption.
        let mut meta = Meta::current(
            &last.backend,
            &last.device,
            Some(a.common.seed),
            serde_json::json!({ "preset": "seed", "optimizer": "rso", "runs": runs }),
            &started,
        );
        meta.notes.push(
            "one run (one seed) per row; every run's `rso train` arguments are in settings.runs"
                .into(),
        );
        output::write_results(&csv_path, &output::csv_text(&rows)?, &meta)?;
        output::write_file(&md_path, &seed_table_markdown(&meta, &rows))?;
    }
    println!("wrote {} and {}", csv_path.display(), md_path.display());
    Ok(())
}

/// The seed table as Markdown, provenance first.
pub fn seed_table_markdown(p: &Meta, rows: &[SeedTableRow]) -> String {
    let opt = |v: Option<f64>, digits: usize| {
        v.map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    let mut s = format!(
        "RSO, preset `seed`, MNIST. Command: `{}`; revision {}; machine: {}, {} cores ({}); {}; \
         finished {}.\n\n",
        p.command_line(),
        p.revision_label(),
        p.machine.cpu,
        p.machine.cores,
        p.machine.simd_class,
        p.engine.label,
        p.ended
    );
    s.push_str("| model | rounds | batch | engine | device | seconds | test loss | test acc | notebook seconds | notebook test loss | notebook test acc | speedup |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.4} | {:.4} | {:.0} | {} | {} | {:.0}× |\n",
            r.model,
            r.rounds,
            r.batch,
            r.engine,
            r.device,
            r.seconds,
            r.test_loss,
            r.test_acc,
            r.notebook_seconds,
            opt(r.notebook_test_loss, 4),
            opt(r.notebook_test_acc, 4),
            r.speedup
        ));
    }
    s
}

/// A row of `results/comparison*.csv`.
#[derive(Clone, Debug, Serialize)]
pub struct CurveRow {
    /// Model.
    pub model: String,
    /// `rso` or `sgd`.
    pub optimizer: String,
    /// Round or epoch, 1-based.
    pub round: usize,
    /// Training seconds of this round.
    pub seconds: f64,
    /// Train loss after the round.
    pub train_loss: f64,
    /// Train accuracy after the round.
    pub train_acc: f64,
    /// Test loss after the round.
    pub test_loss: f64,
    /// Test accuracy after the round.
    pub test_acc: f64,
}

impl From<&RoundRow> for CurveRow {
    fn from(r: &RoundRow) -> Self {
        CurveRow {
            model: r.model.clone(),
            optimizer: r.optimizer.clone(),
            round: r.round,
            seconds: r.seconds,
            train_loss: r.train_loss,
            train_acc: r.train_acc,
            test_loss: r.test_loss,
            test_acc: r.test_acc,
        }
    }
}

fn comparison(a: &ComparisonArgs) -> anyhow::Result<()> {
    ensure_dir(&a.common.out_dir)?;
    for model in &a.models {
        let started = utc_now();
        let mut rows: Vec<CurveRow> = Vec::new();
        let mut runs = Vec::new();
        let mut engine = None;
        for optimizer in ["rso", "sgd"] {
            println!(
                "== {model} {optimizer} batch={} rounds={}",
                a.batch_size, a.rounds
            );
            let mut args = vec![
                "--model".to_string(),
                model.clone(),
                "--optimizer".into(),
                optimizer.into(),
                "--preset".into(),
                "seed".into(),
                "--rounds".into(),
                a.rounds.to_string(),
                "--batch-size".into(),
                a.batch_size.to_string(),
                "--lr".into(),
                a.lr.to_string(),
            ];
            args.extend(common(&a.common));
            let outcome = train_with(&args)?;
            runs.push(args);
            let last = outcome.rows.last().expect("at least one round");
            engine = Some((last.backend.clone(), last.device.clone()));
            rows.extend(outcome.rows.iter().map(CurveRow::from));
        }
        let stem = if model == "one-conv" {
            "comparison".to_string()
        } else {
            format!("comparison_{}", model.replace('-', "_"))
        };
        let (backend, device) = engine.expect("two runs");
        let p = Meta::current(
            &backend,
            &device,
            Some(a.common.seed),
            serde_json::json!({ "model": model, "runs": runs }),
            &started,
        );
        let csv_path = a.common.out_dir.join(format!("{stem}.csv"));
        output::write_results(&csv_path, &output::csv_text(&rows)?, &p)?;
        let svg_path = a.common.out_dir.join(format!("{stem}.svg"));
        let svg = crate::plot::accuracy_svg(
            &format!("Accuracy comparison, {model}, batch {}", a.batch_size),
            &p,
            &rows,
        )?;
        output::write_file(&svg_path, &svg)?;
        println!("wrote {} and {}", csv_path.display(), svg_path.display());
    }
    Ok(())
}

fn paper(a: &PaperArgs) -> anyhow::Result<()> {
    ensure_dir(&a.common.out_dir)?;
    let path = a.common.out_dir.join("paper_mnist.csv");
    let mut args = match &a.resume {
        // The settings come from the checkpoint; only the data directory is ours to give.
        Some(dir) => {
            let mut args = vec!["--resume".to_string(), dir.display().to_string()];
            if let Some(d) = &a.common.data_dir {
                args.push("--data-dir".into());
                args.push(d.display().to_string());
            }
            args
        }
        None => {
            let mut args = vec![
                "--model".to_string(),
                "paper".into(),
                "--optimizer".into(),
                "rso".into(),
                "--preset".into(),
                "paper".into(),
                "--rounds".into(),
                a.rounds.to_string(),
                "--batch-size".into(),
                a.batch_size.to_string(),
            ];
            args.extend(common(&a.common));
            if let Some(dir) = &a.checkpoint_dir {
                args.push("--checkpoint-dir".into());
                args.push(dir.display().to_string());
            }
            args
        }
    };
    args.extend(["--out".into(), path.display().to_string(), "--force".into()]);
    let outcome = train_with(&args)?;
    println!("{}", outcome.result_line());
    println!("wrote {}", path.display());
    Ok(())
}

fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--out-dir {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notebook_rows_match_the_design_table() {
        let total: f64 = NOTEBOOK.iter().map(|r| r.seconds).sum();
        // "The notebook's rows add up to about 40 hours."
        assert!((total / 3600.0 - 40.0).abs() < 2.0, "{}", total / 3600.0);
        assert_eq!(NOTEBOOK.iter().filter(|r| r.test_acc.is_some()).count(), 8);
    }

    #[test]
    fn markdown_has_a_line_per_row_and_the_provenance() {
        let mut p = Meta::current("cpu", "cpu", Some(0), serde_json::json!({}), "t0");
        p.command = vec!["rso".into(), "reproduce".into(), "seed-table".into()];
        p.revision = "abc".into();
        let row = SeedTableRow {
            model: "one-conv".into(),
            rounds: 10,
            batch: 32,
            engine: "cpu".into(),
            device: "cpu".into(),
            seconds: 2.0,
            test_loss: 0.6,
            test_acc: 0.81,
            notebook_seconds: 212.0,
            notebook_test_loss: Some(0.63),
            notebook_test_acc: Some(0.8075),
            speedup: 106.0,
        };
        let md = seed_table_markdown(&p, &[row.clone(), row]);
        assert!(md.contains("rso reproduce seed-table") && md.contains("abc"));
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| one-conv")).count(),
            2
        );
        assert!(md.contains("| 106× |"));
    }
}
