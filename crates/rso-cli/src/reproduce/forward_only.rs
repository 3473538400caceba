//! `rso reproduce forward-only`: RSO against the other forward-only methods (SPSA, ES, CFD) on
//! the same network, initial weights, data order and number of forward passes, with SGD as the
//! gradient reference on the same axis.
//!
//! Two studies, each a plan in `--out-dir` that `rso study` can rerun:
//! 1. `forward_only_tuning`: every forward-only method, RSO included, with each of the four
//!    values of its knob in [`TUNING`], one seed, trained on all but the last `--val-split`
//!    training images; the value with the highest validation accuracy at the budget is chosen
//!    (the test set is never looked at);
//! 2. `forward_only`: the chosen values × `--seeds` seeds on the whole training set, and SGD.
//!
//! Every forward-only run gets `rounds = --budget-rounds + 1` and
//! `--max-forward-equivalents` = the budget, so each stops within one step of it.

use super::{
    curve_rows, ensure_dir, plan_head, provenance_sentence, run_study, run_study_allowing, CurveRow,
};
use crate::args::ForwardOnlyArgs;
use crate::output;
use crate::plot::Band;
use crate::provenance::{utc_now, Meta};
use crate::study::plan::Plan;
use crate::study::{self, collect};
use anyhow::Context;
use rso_models::ModelKind;
use serde::Serialize;

/// Each forward-only method's tuned knob (a `rso train` setting) and the four values tried: the
/// same number of trials for every method, RSO included (its σ multiplier), spanning about a decade
/// around the value that worked in trial runs (RSO's first grid, 0.25–2, had its best value at
/// its edge on one-conv's validation split, so it was moved up by one step).
pub const TUNING: [(&str, &str, [f64; 4]); 4] = [
    ("rso", "sigma_multiplier", [0.5, 1.0, 2.0, 4.0]),
    ("spsa", "lr", [1e-4, 3e-4, 1e-3, 3e-3]),
    ("es", "es_sigma", [3e-4, 1e-3, 3e-3, 1e-2]),
    ("cfd", "lr", [1.0, 2.0, 4.0, 8.0]),
];

/// The forward-pass budget of `rounds` RSO rounds of `model` (MNIST) at batch size `batch`:
/// 3·batch·parameters per round.
pub fn budget(model: ModelKind, batch: usize, rounds: usize) -> u64 {
    let params = model.spec(1, 28, 10).param_count();
    (rounds * 3 * batch * params) as u64
}

/// A row of `forward_only_tuning.csv`: one tried value of a method's knob.
#[derive(Clone, Debug, Serialize)]
pub struct TuningRow {
    /// Model.
    pub model: String,
    /// Method (`rso`, `spsa`, `es`, `cfd`).
    pub optimizer: String,
    /// The knob (a `rso train` setting).
    pub setting: String,
    /// Its value.
    pub value: String,
    /// Forward-equivalents the run used.
    pub forward_equivalents: f64,
    /// Validation loss at the end.
    pub val_loss: f64,
    /// Validation accuracy at the end: what the choice maximises.
    pub val_acc: f64,
    /// Whether this value was chosen.
    pub chosen: bool,
}

/// A row of `forward_only_summary.csv`: a method at the end of its budget (SGD: of its epochs).
#[derive(Clone, Debug, Serialize)]
pub struct SummaryRow {
    /// Model.
    pub model: String,
    /// Method.
    pub optimizer: String,
    /// The chosen setting as `key=value` (SGD: its learning rate).
    pub setting: String,
    /// The budget in forward-equivalents (SGD: empty).
    pub budget: Option<u64>,
    /// Seeds.
    pub n: usize,
    /// Mean forward-equivalents used.
    pub forward_equivalents_mean: f64,
    /// Mean test accuracy at the end.
    pub test_acc_mean: f64,
    /// Its sample standard deviation (empty for one seed).
    pub test_acc_sd: Option<f64>,
    /// Mean test loss at the end.
    pub test_loss_mean: f64,
    /// Mean training seconds of the whole run.
    pub seconds_mean: f64,
}

/// The settings lines both studies share after the plan head: batch size and data limits.
fn shared_settings(a: &ForwardOnlyArgs) -> String {
    let mut s = format!("batch_size = {}\n", a.batch_size);
    for (key, limit) in [("train_limit", a.train_limit), ("test_limit", a.test_limit)] {
        if let Some(n) = limit {
            s.push_str(&format!("{key} = {n}\n"));
        }
    }
    s
}

/// The grid lines every run of a forward-only method on `model` shares.
fn method_grid(model: &str, optimizer: &str, a: &ForwardOnlyArgs) -> String {
    let kind: ModelKind = model.parse().unwrap_or(ModelKind::OneConv);
    format!(
        "\n[[grid]]\nmodel = {model:?}\noptimizer = {optimizer:?}\nrounds = {}\n\
         max_forward_equivalents = {}\n",
        a.budget_rounds + 1,
        budget(kind, a.batch_size, a.budget_rounds)
    )
}

/// The tuning study's plan: one grid per model and method, its knob's four values as an axis.
fn tuning_plan(a: &ForwardOnlyArgs) -> anyhow::Result<String> {
    let mut plan = plan_head(
        &a.common,
        "forward_only_tuning",
        "Forward-only methods, each knob's four values on a validation split",
    )?;
    plan.push_str(&shared_settings(a));
    plan.push_str(&format!("val_split = {}\n", a.val_split));
    for model in &a.models {
        for (optimizer, key, values) in TUNING {
            plan.push_str(&method_grid(model, optimizer, a));
            let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
            plan.push_str(&format!("{key} = [{}]\nseeds = 1\n", values.join(", ")));
        }
    }
    Ok(plan)
}

/// The index of the highest value, the first of equal ones; a NaN never wins.
fn best(values: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in values.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|b| v > values[b]) {
            best = Some(i);
        }
    }
    best
}

/// The tuning study's rows, the chosen value first marked, per model and method in plan order.
fn tuning_rows(plan: &Plan, a: &ForwardOnlyArgs) -> anyhow::Result<Vec<TuningRow>> {
    let mut rows = Vec::new();
    let mut grid = 0;
    for model in &a.models {
        for (optimizer, key, _) in TUNING {
            grid += 1;
            let first = rows.len();
            for run in plan.runs.iter().filter(|r| r.grid == grid) {
                // A failed run (a setting that diverged) counts as NaN: never chosen.
                let runs = match study::status(plan, run) {
                    study::Status::Done => {
                        vec![collect::read_rows(
                            &plan.run_dir(run).join(study::ROUNDS_CSV),
                        )?]
                    }
                    _ => Vec::new(),
                };
                let last = runs.first().and_then(|r| r.keys().last().copied());
                let at = |m: &str| last.map_or(f64::NAN, |l| collect::stats_at(&runs, l, m).1);
                rows.push(TuningRow {
                    model: model.clone(),
                    optimizer: optimizer.into(),
                    setting: key.into(),
                    value: run.setting.get(key).cloned().unwrap_or_default(),
                    forward_equivalents: at("cumulative_forward_equivalents"),
                    val_loss: at("val_loss"),
                    val_acc: at("val_acc"),
                    chosen: false,
                });
            }
            let accs: Vec<f64> = rows[first..].iter().map(|r| r.val_acc).collect();
            let best =
                best(&accs).with_context(|| format!("{model} {optimizer}: no usable run"))?;
            rows[first + best].chosen = true;
        }
    }
    Ok(rows)
}

/// The final study's plan: the chosen values × `--seeds`, and SGD, per model.
fn final_plan(a: &ForwardOnlyArgs, tuning: &[TuningRow]) -> anyhow::Result<String> {
    let mut plan = plan_head(
        &a.common,
        "forward_only",
        "Forward-only methods at the same budget, the values chosen on validation, and SGD",
    )?;
    plan.push_str(&shared_settings(a));
    for model in &a.models {
        for (optimizer, key, _) in TUNING {
            let chosen = tuning
                .iter()
                .find(|r| &r.model == model && r.optimizer == optimizer && r.chosen)
                .context("a method without a chosen value")?;
            plan.push_str(&method_grid(model, optimizer, a));
            plan.push_str(&format!("{key} = {}\nseeds = {}\n", chosen.value, a.seeds));
        }
        plan.push_str(&format!(
            "\n[[grid]]\nmodel = {model:?}\noptimizer = \"sgd\"\nrounds = {}\nlr = {}\nseeds = {}\n",
            a.sgd_epochs, a.sgd_lr, a.seeds
        ));
    }
    Ok(plan)
}

/// The summary row of one method from its runs' rows.
fn summary_row(
    model: &str,
    optimizer: &str,
    setting: String,
    budget: Option<u64>,
    runs: &[collect::Rows],
) -> SummaryRow {
    let last = runs
        .iter()
        .filter_map(|r| r.keys().last().copied())
        .max()
        .unwrap_or(1);
    let at = |m: &str| collect::stats_at(runs, last, m);
    let (n, acc, acc_sd, _, _) = at("test_acc");
    SummaryRow {
        model: model.into(),
        optimizer: optimizer.into(),
        setting,
        budget,
        n,
        forward_equivalents_mean: at("cumulative_forward_equivalents").1,
        test_acc_mean: acc,
        test_acc_sd: acc_sd,
        test_loss_mean: at("test_loss").1,
        seconds_mean: at("cumulative_seconds").1,
    }
}

/// The Markdown table of accuracy at the budget, provenance first.
fn summary_markdown(p: &Meta, rows: &[SummaryRow]) -> String {
    let mut s = format!(
        "Forward-only methods at the same forward-pass budget (SGD: its epochs), MNIST, test \
         accuracy at the end, mean ± sd over n seeds; each method's setting chosen on a \
         validation split. {}\n\n",
        provenance_sentence(p)
    );
    s.push_str("| model | method | setting | n | budget | forward-equivalents | test acc | test loss | seconds |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3e} | {} | {:.4} | {:.1} |\n",
            r.model,
            r.optimizer,
            r.setting,
            r.n,
            r.budget.map_or_else(|| "–".into(), |b| format!("{b:.3e}")),
            r.forward_equivalents_mean,
            match r.test_acc_sd {
                Some(sd) => format!("{:.4} ± {sd:.4}", r.test_acc_mean),
                None => format!("{:.4}", r.test_acc_mean),
            },
            r.test_loss_mean,
            r.seconds_mean
        ));
    }
    s
}

/// The engine a study's first run was computed on.
fn engine(plan: &Plan) -> (String, String) {
    let read = || -> Option<(String, String)> {
        let run = plan.runs.first()?;
        let csv = plan.run_dir(run).join(study::ROUNDS_CSV);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(output::meta_path(&csv)).ok()?).ok()?;
        Some((
            meta["engine"]["backend"].as_str()?.into(),
            meta["engine"]["device"].as_str()?.into(),
        ))
    };
    read().unwrap_or_else(|| ("?".into(), "?".into()))
}

/// `rso reproduce forward-only`.
pub fn run(a: &ForwardOnlyArgs) -> anyhow::Result<()> {
    ensure_dir(&a.common.out_dir)?;
    anyhow::ensure!(a.seeds >= 1, "--seeds must be at least 1");
    anyhow::ensure!(a.budget_rounds >= 1, "--budget-rounds must be at least 1");
    for model in &a.models {
        let _: ModelKind = model
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--models: {e}"))?;
    }
    let started = utc_now();
    let out = |name: &str| a.common.out_dir.join(name);
    println!(
        "== tuning: 4 values per method, 1 seed, validation split {}",
        a.val_split
    );
    let tuning_path = out("forward_only_tuning.plan.toml");
    let tuning_study = run_study_allowing(&tuning_path, &tuning_plan(a)?, a.jobs, true)?;
    let tuning = tuning_rows(&tuning_study, a)?;
    println!("== the chosen values, {} seeds, and SGD", a.seeds);
    let final_path = out("forward_only.plan.toml");
    let study = run_study(&final_path, &final_plan(a, &tuning)?, a.jobs)?;
    let (backend, device) = engine(&study);
    let meta = results_meta(a, &tuning_study, &study, (&backend, &device), &started);
    let mut curves: Vec<CurveRow> = Vec::new();
    let mut summary = Vec::new();
    let mut grid = 0;
    for model in &a.models {
        let kind: ModelKind = model.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let mut bands: Vec<Band> = Vec::new();
        let methods = TUNING
            .iter()
            .map(|t| (t.0, Some(t.1)))
            .chain([("sgd", None)]);
        for (optimizer, key) in methods {
            grid += 1;
            let runs: Vec<&study::plan::Run> =
                study.runs.iter().filter(|r| r.grid == grid).collect();
            let rows = runs
                .iter()
                .map(|r| collect::read_rows(&study.run_dir(r).join(study::ROUNDS_CSV)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let key = key.unwrap_or("lr");
            let value = runs
                .first()
                .and_then(|r| r.setting.get(key).cloned())
                .unwrap_or_default();
            let setting = format!("{key}={value}");
            let (curve, mut band) = curve_rows(model, optimizer, &rows);
            band.label = format!("{} ({setting})", optimizer.to_uppercase());
            curves.extend(curve);
            bands.push(band);
            let budget = (optimizer != "sgd").then(|| budget(kind, a.batch_size, a.budget_rounds));
            summary.push(summary_row(model, optimizer, setting, budget, &rows));
        }
        let svg = if model == "one-conv" {
            out("forward_only.svg")
        } else {
            out(&format!("forward_only_{}.svg", model.replace('-', "_")))
        };
        let title = format!(
            "Forward-only methods at equal compute, {model}, batch {}: test accuracy, mean ± sd \
             over {} seeds",
            a.batch_size, a.seeds
        );
        output::write_file(&svg, &crate::plot::band_svg(&title, &meta, &bands)?)?;
        println!("wrote {}", svg.display());
    }
    for (name, csv) in [
        ("forward_only.csv", output::csv_text(&curves)?),
        ("forward_only_summary.csv", output::csv_text(&summary)?),
        ("forward_only_tuning.csv", output::csv_text(&tuning)?),
    ] {
        output::write_results(&out(name), &csv, &meta)?;
        println!("wrote {}", out(name).display());
    }
    output::write_file(&out("forward_only.md"), &summary_markdown(&meta, &summary))?;
    println!("wrote {}", out("forward_only.md").display());
    Ok(())
}

/// The provenance of the comparison's files.
fn results_meta(
    a: &ForwardOnlyArgs,
    tuning: &Plan,
    study: &Plan,
    (backend, device): (&str, &str),
    started: &str,
) -> Meta {
    let budgets: serde_json::Map<String, serde_json::Value> = a
        .models
        .iter()
        .filter_map(|m| {
            let kind: ModelKind = m.parse().ok()?;
            Some((
                m.clone(),
                budget(kind, a.batch_size, a.budget_rounds).into(),
            ))
        })
        .collect();
    let mut meta = Meta::current(
        backend,
        device,
        Some(a.common.seed),
        serde_json::json!({
            "models": a.models,
            "batch_size": a.batch_size,
            "budget_rounds": a.budget_rounds,
            "budgets": budgets,
            "val_split": a.val_split,
            "seeds": a.seeds,
            "sgd_epochs": a.sgd_epochs,
            "sgd_lr": a.sgd_lr,
            "tuning": TUNING.iter().map(|(o, k, v)| serde_json::json!({
                "optimizer": o, "setting": k, "values": v
            })).collect::<Vec<_>>(),
            "tuning_plan": tuning.path.to_string_lossy(),
            "plan": study.path.to_string_lossy(),
            "study": study.dir.to_string_lossy(),
        }),
        started,
    );
    meta.notes.push(format!(
        "each forward-only method's setting is the value of its knob with the highest \
         validation accuracy (the last {} training images held out, 1 seed) at the budget; the \
         test set was not used to choose; each run's rounds.csv is in the study directories",
        a.val_split
    ));
    meta
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> ForwardOnlyArgs {
        let mut argv = vec!["rso", "reproduce", "forward-only", "--data-dir", "/d"];
        argv.extend_from_slice(extra);
        match crate::Cli::parse_from(argv).command {
            crate::Command::Reproduce(crate::args::ReproduceCommand::ForwardOnly(a)) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_budget_is_three_forward_passes_per_parameter_per_rso_round() {
        // DESIGN §3: one-conv has 7 890 parameters, two-conv 10 330.
        assert_eq!(budget(ModelKind::OneConv, 256, 3), 3 * 3 * 256 * 7890);
        assert_eq!(budget(ModelKind::TwoConv, 256, 1), 3 * 256 * 10330);
    }

    #[test]
    fn the_best_value_is_the_first_highest_and_never_nan() {
        assert_eq!(best(&[0.5, 0.7, 0.7, 0.1]), Some(1));
        assert_eq!(best(&[f64::NAN, 0.2, f64::NAN, 0.3]), Some(3));
        assert_eq!(best(&[f64::NAN]), None);
        assert_eq!(best(&[]), None);
    }

    #[test]
    fn every_method_gets_four_values_on_the_validation_split_and_the_same_budget() {
        let a = args(&["--models", "one-conv", "two-conv", "--val-split", "500"]);
        let text = tuning_plan(&a).unwrap();
        let plan: toml::Table = text.parse().unwrap();
        assert_eq!(plan["settings"]["val_split"].as_integer(), Some(500));
        let grids = plan["grid"].as_array().unwrap();
        assert_eq!(grids.len(), 2 * TUNING.len());
        for (g, (model, (optimizer, key, values))) in grids.iter().zip(
            ["one-conv", "two-conv"]
                .iter()
                .flat_map(|m| TUNING.iter().map(move |t| (m, t))),
        ) {
            assert_eq!(g["model"].as_str(), Some(*model));
            assert_eq!(g["optimizer"].as_str(), Some(*optimizer));
            let tried: Vec<f64> = g[*key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_float().or(v.as_integer().map(|i| i as f64)).unwrap())
                .collect();
            assert_eq!(tried, values);
            let kind: ModelKind = model.parse().unwrap();
            assert_eq!(
                g["max_forward_equivalents"].as_integer(),
                Some(budget(kind, 256, 3) as i64)
            );
            assert_eq!(g["rounds"].as_integer(), Some(4));
        }
    }

    #[test]
    fn the_final_plan_takes_the_chosen_values_and_adds_sgd() {
        let a = args(&["--models", "one-conv", "--seeds", "2"]);
        let tuning: Vec<TuningRow> = TUNING
            .iter()
            .flat_map(|(o, k, values)| {
                values.iter().enumerate().map(move |(i, v)| TuningRow {
                    model: "one-conv".into(),
                    optimizer: o.to_string(),
                    setting: k.to_string(),
                    value: v.to_string(),
                    forward_equivalents: 0.0,
                    val_loss: 0.0,
                    val_acc: 0.0,
                    chosen: i == 2,
                })
            })
            .collect();
        let plan: toml::Table = final_plan(&a, &tuning).unwrap().parse().unwrap();
        assert!(plan["settings"].get("val_split").is_none());
        let grids = plan["grid"].as_array().unwrap();
        assert_eq!(grids.len(), TUNING.len() + 1);
        for (g, (_, key, values)) in grids.iter().zip(TUNING) {
            assert_eq!(g[key].to_string(), values[2].to_string());
            assert_eq!(g["seeds"].as_integer(), Some(2));
        }
        let sgd = &grids[TUNING.len()];
        assert_eq!(sgd["optimizer"].as_str(), Some("sgd"));
        assert_eq!(sgd["rounds"].as_integer(), Some(20));
    }
}
