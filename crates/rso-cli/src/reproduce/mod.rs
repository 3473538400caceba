//! `rso reproduce`: regenerate the files in `results/`, each with its provenance.
//!
//! - `seed-table`: the reference notebook's ten configurations (preset `seed`);
//! - `comparison`: RSO against SGD, test accuracy per round, CSV and SVG plot;
//! - `paper`: the paper's preset on its model, test accuracy per round;
//! - `forward-only`: RSO against SPSA, ES and CFD at equal compute ([`forward_only`]).

mod forward_only;

use crate::args::{CommonArgs, ComparisonArgs, PaperArgs, ReproduceCommand, SeedTableArgs};
use crate::output;
use crate::plot::Band;
use crate::provenance::{utc_now, Meta};
use crate::study::plan::Plan;
use crate::study::{self, collect, exec};
use crate::train::{self, ConsoleReporter, TrainOutcome};
use crate::{Cli, Command};
use anyhow::Context;
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

/// A row of `results/seed_table.csv`: one notebook configuration over its seeds.
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
    /// Seeds that finished (n).
    pub seeds: usize,
    /// Mean wall time of the training rounds, seconds.
    pub seconds_mean: f64,
    /// Its sample standard deviation (empty for one seed).
    pub seconds_sd: Option<f64>,
    /// Mean test loss after the last round.
    pub test_loss_mean: f64,
    /// Its sample standard deviation.
    pub test_loss_sd: Option<f64>,
    /// Mean test accuracy after the last round.
    pub test_acc_mean: f64,
    /// Its sample standard deviation.
    pub test_acc_sd: Option<f64>,
    /// Lowest and highest test accuracy over the seeds.
    pub test_acc_min: f64,
    /// See `test_acc_min`.
    pub test_acc_max: f64,
    /// The notebook's time, seconds.
    pub notebook_seconds: f64,
    /// The notebook's test loss (empty where it reported none).
    pub notebook_test_loss: Option<f64>,
    /// The notebook's test accuracy (empty where it reported none).
    pub notebook_test_acc: Option<f64>,
    /// Whether the notebook's accuracy lies within mean ± 2 sd (empty with fewer than two
    /// seeds or no notebook accuracy).
    pub notebook_within_2sd: Option<bool>,
    /// `notebook_seconds / seconds_mean`.
    pub speedup: f64,
}

/// Runs `rso train` with these arguments (as typed after `rso train`).
fn train_with(args: &[String]) -> anyhow::Result<TrainOutcome> {
    let argv = ["rso", "train"]
        .iter()
        .map(|s| s.to_string())
        .chain(args.iter().cloned());
    let cli = Cli::try_parse_recording_from(argv)
        .map_err(|e| anyhow::anyhow!("internal arguments: {e}"))?;
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
        ReproduceCommand::ForwardOnly(a) => forward_only::run(a),
    }
}

/// The head of a reproduction's study plan: its seed, directory and the settings every run
/// shares (engine, data, preset `seed`).
fn plan_head(c: &CommonArgs, study: &str, what: &str) -> anyhow::Result<String> {
    let data = std::path::absolute(c.data_dir.clone().unwrap_or_else(|| "data/mnist".into()))
        .context("--data-dir")?;
    anyhow::ensure!(
        data.to_str().is_some(),
        "--data-dir {}: the study plan this command writes is TOML text, which cannot hold a \
         path that is not UTF-8; give it a UTF-8 name (a symbolic link will do)",
        data.display()
    );
    Ok(format!(
        "# {what}, written by `rso reproduce`; rerun any part with `rso study run` on this file.\n\
         seed = {}\nout_dir = {study:?}\n\n[settings]\npreset = \"seed\"\nbackend = {:?}\n\
         device = {:?}\ndata_dir = {:?}\n",
        c.seed,
        c.backend,
        c.device,
        data.to_string_lossy()
    ))
}

/// Runs the study of `plan_text` (written to `path`) to the end and collects it.
fn run_study(path: &Path, plan_text: &str, jobs: usize) -> anyhow::Result<Plan> {
    run_study_allowing(path, plan_text, jobs, false)
}

/// [`run_study`]; with `failures_ok`, runs that fail (a diverging setting of a tuning grid) do
/// not stop it, stopped ones still do.
fn run_study_allowing(
    path: &Path,
    plan_text: &str,
    jobs: usize,
    failures_ok: bool,
) -> anyhow::Result<Plan> {
    output::write_file(path, plan_text)?;
    let plan = Plan::load(path, None)?;
    println!(
        "{} runs as the study {} (plan {})",
        plan.runs.len(),
        plan.dir.display(),
        path.display()
    );
    let code = exec::run_pending(&plan, jobs)?;
    // With failures allowed, every run must still have ended: done or failed, none stopped or
    // pending (the exit status counts failures first, so it cannot say).
    let ended = plan.runs.iter().all(|r| {
        matches!(
            study::status(&plan, r),
            study::Status::Done | study::Status::Failed
        )
    });
    anyhow::ensure!(
        code == 0 || (failures_ok && ended),
        "the study {} did not finish (exit status {code}); run the command again to run what \
         is missing",
        plan.dir.display()
    );
    collect::collect(&plan)?;
    Ok(plan)
}

/// The rows of the runs of grid `grid`, and the engine that computed them.
fn grid_rows(plan: &Plan, grid: usize) -> anyhow::Result<(Vec<collect::Rows>, (String, String))> {
    let mut rows = Vec::new();
    let mut engine = (String::new(), String::new());
    for run in plan.runs.iter().filter(|r| r.grid == grid) {
        let csv = plan.run_dir(run).join(study::ROUNDS_CSV);
        rows.push(collect::read_rows(&csv)?);
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(output::meta_path(&csv)).context("a run's .meta.json")?,
        )?;
        engine = (
            meta["engine"]["backend"].as_str().unwrap_or("?").into(),
            meta["engine"]["device"].as_str().unwrap_or("?").into(),
        );
    }
    Ok((rows, engine))
}

/// The study plan of the seed table: one grid per notebook row, its own seeds.
fn seed_table_plan(a: &SeedTableArgs, picks: &[usize], study: &str) -> anyhow::Result<String> {
    let mut plan = plan_head(
        &a.common,
        study,
        "The reference notebook's configurations (RSO, preset seed)",
    )?;
    plan.push_str("optimizer = \"rso\"\n");
    for &k in picks {
        let nb = NOTEBOOK[k];
        let seeds = if nb.model == "paper" {
            a.paper_seeds
        } else {
            a.seeds
        };
        anyhow::ensure!(seeds >= 1, "--seeds and --paper-seeds must be at least 1");
        plan.push_str(&format!(
            "\n[[grid]]\nmodel = {:?}\nrounds = {}\nbatch_size = {}\nseeds = {seeds}\n",
            nb.model, nb.rounds, nb.batch
        ));
    }
    Ok(plan)
}

/// The seed table's row for notebook row `nb` from its runs' rows.
fn seed_table_row(nb: &NotebookRow, runs: &[collect::Rows], engine: (&str, &str)) -> SeedTableRow {
    let stat = |m: &str| collect::stats_at(runs, nb.rounds, m);
    let (n, seconds, seconds_sd, _, _) = stat("cumulative_seconds");
    let (_, loss, loss_sd, _, _) = stat("test_loss");
    let (_, acc, acc_sd, acc_min, acc_max) = stat("test_acc");
    SeedTableRow {
        model: nb.model.into(),
        rounds: nb.rounds,
        batch: nb.batch,
        engine: engine.0.into(),
        device: engine.1.into(),
        seeds: n,
        seconds_mean: seconds,
        seconds_sd,
        test_loss_mean: loss,
        test_loss_sd: loss_sd,
        test_acc_mean: acc,
        test_acc_sd: acc_sd,
        test_acc_min: acc_min,
        test_acc_max: acc_max,
        notebook_seconds: nb.seconds,
        notebook_test_loss: nb.test_loss,
        notebook_test_acc: nb.test_acc,
        notebook_within_2sd: nb
            .test_acc
            .zip(acc_sd)
            .map(|(x, sd)| (x - acc).abs() <= 2.0 * sd),
        speedup: nb.seconds / seconds.max(1e-9),
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
    ensure_dir(&a.common.out_dir)?;
    let started = utc_now();
    let plan_path = a.common.out_dir.join(format!("{stem}.plan.toml"));
    let plan = run_study(&plan_path, &seed_table_plan(a, &picks, stem)?, a.jobs)?;
    let mut rows = Vec::new();
    let mut engine = (String::new(), String::new());
    for (g, &k) in picks.iter().enumerate() {
        let (runs, e) = grid_rows(&plan, g + 1)?;
        engine = e;
        rows.push(seed_table_row(&NOTEBOOK[k], &runs, (&engine.0, &engine.1)));
    }
    let mut meta = Meta::current(
        &engine.0,
        &engine.1,
        Some(a.common.seed),
        serde_json::json!({
            "plan": plan_path.to_string_lossy(),
            "study": plan.dir.to_string_lossy(),
            "seeds": a.seeds,
            "paper_seeds": a.paper_seeds,
            "runs": plan.runs.iter().map(|r| serde_json::json!({
                "id": r.id, "arguments": r.args
            })).collect::<Vec<_>>(),
        }),
        &started,
    );
    meta.notes.push(format!(
        "{} seeds per one-conv/two-conv row, {} per paper row; each run's rounds.csv, \
         .meta.json and log are in the study directory; seconds are the training rounds' wall \
         time (evaluation excluded), runs one at a time unless --jobs",
        a.seeds, a.paper_seeds
    ));
    let csv_path = a.common.out_dir.join(format!("{stem}.csv"));
    let md_path = a.common.out_dir.join(format!("{stem}.md"));
    output::write_results(&csv_path, &output::csv_text(&rows)?, &meta)?;
    output::write_file(&md_path, &seed_table_markdown(&meta, &rows))?;
    println!("wrote {} and {}", csv_path.display(), md_path.display());
    Ok(())
}

/// A Markdown table's provenance: "Command: `…`; revision …; machine: …; engine; finished …."
fn provenance_sentence(p: &Meta) -> String {
    format!(
        "Command: `{}`; revision {}; machine: {}, {} cores ({}); {}; finished {}.",
        p.command_line(),
        p.revision_label(),
        p.machine.cpu,
        p.machine.cores,
        p.machine.simd_class,
        p.engine.label,
        p.ended
    )
}

/// The seed table as Markdown, provenance first.
pub fn seed_table_markdown(p: &Meta, rows: &[SeedTableRow]) -> String {
    let opt = |v: Option<f64>, digits: usize| {
        v.map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    let pm = |mean: f64, sd: Option<f64>, digits: usize| match sd {
        Some(sd) => format!("{mean:.digits$} ± {sd:.digits$}"),
        None => format!("{mean:.digits$}"),
    };
    let mut s = format!(
        "RSO, preset `seed`, MNIST, mean ± sd over n seeds. {}\n\n",
        provenance_sentence(p)
    );
    s.push_str("| model | rounds | batch | n | seconds | test loss | test acc | notebook seconds | notebook test loss | notebook test acc | notebook within ±2 sd | speedup |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.0}× |\n",
            r.model,
            r.rounds,
            r.batch,
            r.seeds,
            pm(r.seconds_mean, r.seconds_sd, 1),
            pm(r.test_loss_mean, r.test_loss_sd, 4),
            pm(r.test_acc_mean, r.test_acc_sd, 4),
            r.notebook_seconds,
            opt(r.notebook_test_loss, 4),
            opt(r.notebook_test_acc, 4),
            match r.notebook_within_2sd {
                Some(true) => "yes",
                Some(false) => "no",
                None => "–",
            },
            r.speedup
        ));
    }
    s
}

/// A row of `results/comparison*.csv`: one optimizer's round over the seeds.
#[derive(Clone, Debug, Serialize)]
pub struct CurveRow {
    /// Model.
    pub model: String,
    /// `rso` or `sgd`.
    pub optimizer: String,
    /// Round or epoch, 1-based.
    pub round: usize,
    /// Seeds that have the round.
    pub n: usize,
    /// Mean training seconds of this round.
    pub seconds_mean: f64,
    /// Mean train loss after the round.
    pub train_loss_mean: f64,
    /// Mean train accuracy after the round.
    pub train_acc_mean: f64,
    /// Mean test loss after the round.
    pub test_loss_mean: f64,
    /// Its sample standard deviation (empty for one seed).
    pub test_loss_sd: Option<f64>,
    /// Mean test accuracy after the round.
    pub test_acc_mean: f64,
    /// Its sample standard deviation (empty for one seed).
    pub test_acc_sd: Option<f64>,
    /// Lowest test accuracy over the seeds.
    pub test_acc_min: f64,
    /// Highest test accuracy over the seeds.
    pub test_acc_max: f64,
    /// Mean forward-equivalents up to this round.
    pub cumulative_forward_equivalents_mean: f64,
}

/// The comparison's rows for `optimizer` on `model` from its runs' rows, and its plot band.
fn curve_rows(model: &str, optimizer: &str, runs: &[collect::Rows]) -> (Vec<CurveRow>, Band) {
    let rounds: std::collections::BTreeSet<usize> =
        runs.iter().flat_map(|r| r.keys().copied()).collect();
    let mut rows = Vec::new();
    let mut band = Band {
        label: optimizer.to_uppercase(),
        points: Vec::new(),
    };
    for round in rounds {
        let stat = |m: &str| collect::stats_at(runs, round, m);
        let (n, acc, acc_sd, acc_min, acc_max) = stat("test_acc");
        let (_, loss, loss_sd, _, _) = stat("test_loss");
        let fe = stat("cumulative_forward_equivalents").1;
        rows.push(CurveRow {
            model: model.into(),
            optimizer: optimizer.into(),
            round,
            n,
            seconds_mean: stat("seconds").1,
            train_loss_mean: stat("train_loss").1,
            train_acc_mean: stat("train_acc").1,
            test_loss_mean: loss,
            test_loss_sd: loss_sd,
            test_acc_mean: acc,
            test_acc_sd: acc_sd,
            test_acc_min: acc_min,
            test_acc_max: acc_max,
            cumulative_forward_equivalents_mean: fe,
        });
        band.points
            .push((round as f64, Some(fe), acc, acc_sd.unwrap_or(0.0)));
    }
    (rows, band)
}

fn comparison(a: &ComparisonArgs) -> anyhow::Result<()> {
    ensure_dir(&a.common.out_dir)?;
    anyhow::ensure!(a.seeds >= 1, "--seeds must be at least 1");
    for model in &a.models {
        let started = utc_now();
        let stem = if model == "one-conv" {
            "comparison".to_string()
        } else {
            format!("comparison_{}", model.replace('-', "_"))
        };
        let mut text = plan_head(&a.common, &stem, "RSO against SGD")?;
        text.push_str(&format!(
            "model = {model:?}\nrounds = {}\nbatch_size = {}\n\n[[grid]]\noptimizer = \"rso\"\n\
             seeds = {}\n\n[[grid]]\noptimizer = \"sgd\"\nlr = {}\nseeds = {}\n",
            a.rounds, a.batch_size, a.seeds, a.lr, a.seeds
        ));
        println!("== {model}: RSO and SGD, {} seeds", a.seeds);
        let plan_path = a.common.out_dir.join(format!("{stem}.plan.toml"));
        let plan = run_study(&plan_path, &text, a.jobs)?;
        let (mut rows, mut bands, mut engine) = (Vec::new(), Vec::new(), Default::default());
        for (g, optimizer) in ["rso", "sgd"].into_iter().enumerate() {
            let (runs, e) = grid_rows(&plan, g + 1)?;
            engine = e;
            let (r, band) = curve_rows(model, optimizer, &runs);
            rows.extend(r);
            bands.push(band);
        }
        let (backend, device): (String, String) = engine;
        let mut p = Meta::current(
            &backend,
            &device,
            Some(a.common.seed),
            serde_json::json!({
                "model": model,
                "plan": plan_path.to_string_lossy(),
                "study": plan.dir.to_string_lossy(),
                "seeds": a.seeds,
                "runs": plan.runs.iter().map(|r| serde_json::json!({
                    "id": r.id, "arguments": r.args
                })).collect::<Vec<_>>(),
            }),
            &started,
        );
        p.notes.push(format!(
            "mean (and sd) over {} seeds per optimizer; each run's rounds.csv is in the study \
             directory",
            a.seeds
        ));
        let csv_path = a.common.out_dir.join(format!("{stem}.csv"));
        output::write_results(&csv_path, &output::csv_text(&rows)?, &p)?;
        let svg_path = a.common.out_dir.join(format!("{stem}.svg"));
        let title = format!(
            "RSO vs SGD, {model}, batch {}: test accuracy, mean ± sd over {} seeds",
            a.batch_size, a.seeds
        );
        output::write_file(&svg_path, &crate::plot::band_svg(&title, &p, &bands)?)?;
        println!("wrote {} and {}", csv_path.display(), svg_path.display());
    }
    Ok(())
}

fn paper(a: &PaperArgs) -> anyhow::Result<()> {
    ensure_dir(&a.common.out_dir)?;
    let path = a.common.out_dir.join("paper_mnist.csv");
    let mut args = match &a.resume {
        // The settings come from the checkpoint; the data directory is ours to give, and where
        // the run computes when it is not the default.
        Some(dir) => {
            let mut args = vec!["--resume".to_string(), dir.display().to_string()];
            if let Some(d) = &a.common.data_dir {
                args.push("--data-dir".into());
                args.push(d.display().to_string());
            }
            for (flag, value) in [
                ("--backend", &a.common.backend),
                ("--device", &a.common.device),
            ] {
                if value != "cpu" {
                    args.extend([flag.to_string(), value.clone()]);
                }
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

/// Creates `--out-dir` if needed and checks that files can be created in it, before anything
/// trains.
fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--out-dir {}", dir.display()))?;
    output::probe_dir(dir)
        .with_context(|| format!("--out-dir {}: cannot create files there", dir.display()))
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
        let runs: Vec<collect::Rows> = [(0.80, 2.0), (0.82, 2.2)]
            .into_iter()
            .map(|(acc, secs)| {
                let row = [
                    ("test_acc", acc),
                    ("test_loss", 0.6),
                    ("cumulative_seconds", secs),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                [(10, row)].into_iter().collect()
            })
            .collect();
        let row = seed_table_row(&NOTEBOOK[0], &runs, ("cpu", "cpu"));
        assert_eq!(row.seeds, 2);
        assert!((row.test_acc_mean - 0.81).abs() < 1e-12);
        // sd of {0.80, 0.82} is 0.01414…; the notebook's 0.8075 is within 2 sd.
        assert_eq!(row.notebook_within_2sd, Some(true));
        assert!((row.speedup - 212.0 / 2.1).abs() < 1e-9);
        let md = seed_table_markdown(&p, &[row.clone(), row]);
        assert!(md.contains("rso reproduce seed-table") && md.contains("abc"));
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| one-conv")).count(),
            2
        );
        assert!(
            md.contains("| 2.1 ± 0.1 |") && md.contains("| yes | 101× |"),
            "{md}"
        );
    }
}
