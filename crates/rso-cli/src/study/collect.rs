//! `rso study collect`: per setting and round, n, mean, sd, min and max of every per-round
//! metric over the setting's seeds → `summary.csv` (with `summary.meta.json`) and
//! `summary.svg` (mean with a ±sd band against rounds, and against cumulative
//! forward-equivalents).

use super::plan::{Plan, Run};
use super::{status, Status, ROUNDS_CSV};
use crate::output;
use crate::plot::{self, Band};
use crate::provenance::{utc_now, Meta};
use anyhow::{ensure, Context};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The per-round columns summarised, in the summary's order (the validation ones last, so the
/// earlier columns of a summary keep their places; empty where no run has a validation set).
pub const METRICS: [&str; 11] = [
    "test_acc",
    "test_loss",
    "train_acc",
    "train_loss",
    "seconds",
    "accept_rate",
    "forward_equivalents",
    "cumulative_forward_equivalents",
    "cumulative_seconds",
    "val_acc",
    "val_loss",
];

/// One run's rows: round → metric → value (empty cells left out).
pub type Rows = BTreeMap<usize, BTreeMap<String, f64>>;

/// n, mean, sample sd (n − 1; `None` below 2), min, max of `xs`.
pub fn stats(xs: &[f64]) -> Option<(usize, f64, Option<f64>, f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let sd = (n > 1)
        .then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((n, mean, sd, min, max))
}

/// The values of metric `m` after round `round`, over the runs that have that round.
pub fn values_at(runs: &[Rows], round: usize, m: &str) -> Vec<f64> {
    runs.iter()
        .filter_map(|r| r.get(&round).and_then(|row| row.get(m)).copied())
        .collect()
}

/// [`stats`] of [`values_at`]; n = 0 and NaN where no run has a value.
pub fn stats_at(runs: &[Rows], round: usize, m: &str) -> (usize, f64, Option<f64>, f64, f64) {
    stats(&values_at(runs, round, m)).unwrap_or((0, f64::NAN, None, f64::NAN, f64::NAN))
}

/// Reads a run's `rounds.csv` (the [`METRICS`] columns).
///
/// # Errors
/// When the file cannot be read or holds a cell that is not a number.
pub fn read_rows(path: &Path) -> anyhow::Result<Rows> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("{}", path.display()))?;
    let header = reader.headers()?.clone();
    let mut rows = Rows::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("{}", path.display()))?;
        let mut row = BTreeMap::new();
        let mut round = None;
        for (name, value) in header.iter().zip(record.iter()) {
            if name == "round" {
                round = value.parse::<usize>().ok();
            } else if METRICS.contains(&name) && !value.is_empty() {
                let x: f64 = value
                    .parse()
                    .with_context(|| format!("{}: {name} = {value:?}", path.display()))?;
                row.insert(name.to_string(), x);
            }
        }
        let round = round.with_context(|| format!("{}: a row without a round", path.display()))?;
        rows.insert(round, row);
    }
    Ok(rows)
}

/// A setting's label: its varied keys as `key=value`, or `all`.
fn label(plan: &Plan, run: &Run) -> String {
    let parts: Vec<String> = plan
        .varied
        .iter()
        .filter_map(|k| run.setting.get(k).map(|v| format!("{k}={v}")))
        .collect();
    if parts.is_empty() {
        "all".into()
    } else {
        parts.join(" ")
    }
}

/// What collect found for one setting: its runs' rows (done runs only) and how many runs it has.
struct Setting<'a> {
    first: &'a Run,
    rows: Vec<Rows>,
    runs: usize,
}

/// Writes the summary of `plan`'s done runs; lists missing and failed runs on stderr. Returns
/// the exit status (0).
///
/// # Errors
/// When no run is done, a run's CSV cannot be read, or the summary cannot be written.
pub fn collect(plan: &Plan) -> anyhow::Result<i32> {
    let started = utc_now();
    let mut settings: BTreeMap<String, Setting> = BTreeMap::new();
    let mut origins = BTreeSet::new();
    let mut engine = None;
    for run in &plan.runs {
        let entry = settings.entry(label(plan, run)).or_insert(Setting {
            first: run,
            rows: Vec::new(),
            runs: 0,
        });
        entry.runs += 1;
        let st = status(plan, run);
        if st != Status::Done {
            eprintln!(
                "missing: run {} ({}, seed {}): {}",
                run.index,
                label(plan, run),
                run.seed,
                st.name()
            );
            continue;
        }
        let csv = plan.run_dir(run).join(ROUNDS_CSV);
        entry.rows.push(read_rows(&csv)?);
        if let Ok(text) = std::fs::read(output::meta_path(&csv)) {
            if let Ok(m) = serde_json::from_slice::<serde_json::Value>(&text) {
                origins.insert(format!(
                    "revision {}{} on {}",
                    m["revision"].as_str().unwrap_or("?"),
                    if m["dirty"] == true { "-dirty" } else { "" },
                    m["machine"]["cpu"].as_str().unwrap_or("?")
                ));
                engine.get_or_insert((
                    m["engine"]["backend"].as_str().unwrap_or("?").to_string(),
                    m["engine"]["device"].as_str().unwrap_or("?").to_string(),
                ));
            }
        }
    }
    let done: usize = settings.values().map(|s| s.rows.len()).sum();
    ensure!(
        done > 0,
        "{}: no run is done yet (run `rso study run {}`)",
        plan.dir.display(),
        plan.path.display()
    );
    if origins.len() > 1 {
        eprintln!(
            "warning: the runs come from different revisions or machines; their seconds are not \
             comparable: {}",
            origins.iter().cloned().collect::<Vec<_>>().join("; ")
        );
    }
    let (csv, bands) = summary(plan, &settings)?;
    let (backend, device) = engine.unwrap_or_default();
    let mut meta = Meta::current(
        &backend,
        &device,
        None,
        serde_json::json!({
            "plan": plan.path.to_string_lossy(),
            "runs": plan.runs.len(),
            "runs_done": done,
            "origins": origins,
        }),
        &started,
    );
    meta.notes.push(
        "sd is the sample standard deviation (n − 1), empty where n < 2; `runs` is the number \
         of runs (seeds) the setting has in the plan, `n` how many of them have the round"
            .into(),
    );
    let path = plan.dir.join("summary.csv");
    output::write_results(&path, &csv, &meta)?;
    let title = format!("Study {}", plan.path.display());
    let svg = plot::band_svg(&title, &meta, &bands)?;
    output::write_file(&plan.dir.join("summary.svg"), &svg)?;
    println!(
        "wrote {} and summary.svg ({done} of {} runs)",
        path.display(),
        plan.runs.len()
    );
    Ok(0)
}

/// The summary CSV's text and the plot's bands.
fn summary(
    plan: &Plan,
    settings: &BTreeMap<String, Setting>,
) -> anyhow::Result<(String, Vec<Band>)> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = vec!["setting".into()];
    header.extend(plan.varied.iter().cloned());
    header.extend(["round", "n", "runs"].map(String::from));
    for m in METRICS {
        for s in ["mean", "sd", "min", "max"] {
            header.push(format!("{m}_{s}"));
        }
    }
    w.write_record(&header)?;
    let mut bands = Vec::new();
    for (name, setting) in settings {
        let rounds: BTreeSet<usize> = setting
            .rows
            .iter()
            .flat_map(|r| r.keys().copied())
            .collect();
        let mut band = Band {
            label: name.clone(),
            points: Vec::new(),
        };
        for round in rounds {
            let values = |m: &str| values_at(&setting.rows, round, m);
            let n = setting
                .rows
                .iter()
                .filter(|r| r.contains_key(&round))
                .count();
            let mut record = vec![name.clone()];
            record.extend(
                plan.varied
                    .iter()
                    .map(|k| setting.first.setting.get(k).cloned().unwrap_or_default()),
            );
            record.extend([round.to_string(), n.to_string(), setting.runs.to_string()]);
            for m in METRICS {
                match stats(&values(m)) {
                    Some((_, mean, sd, min, max)) => record.extend([
                        mean.to_string(),
                        sd.map(|s| s.to_string()).unwrap_or_default(),
                        min.to_string(),
                        max.to_string(),
                    ]),
                    None => record.extend(std::iter::repeat_n(String::new(), 4)),
                }
            }
            w.write_record(&record)?;
            if let Some((_, mean, sd, _, _)) = stats(&values("test_acc")) {
                let fe = stats(&values("cumulative_forward_equivalents")).map(|s| s.1);
                band.points
                    .push((round as f64, fe, mean, sd.unwrap_or(0.0)));
            }
        }
        bands.push(band);
    }
    let text = String::from_utf8(w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    Ok((text, bands))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_the_textbook_ones() {
        let (n, mean, sd, min, max) = stats(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!((n, mean, min, max), (8, 5.0, 2.0, 9.0));
        // Sample variance 32/7.
        assert!((sd.unwrap() - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(stats(&[3.0]).unwrap().2, None);
        assert!(stats(&[]).is_none());
    }

    #[test]
    fn validation_metrics_are_read_by_name_and_empty_cells_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let csv = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            read_rows(&path).unwrap()
        };
        // Two runs with a validation set, one without (empty cells), one written before the
        // columns existed.
        let head = "round,test_acc,cumulative_seconds,val_loss,val_acc\n";
        let runs = [
            csv(
                "a.csv",
                &format!("{head}1,0.5,1.0,0.9,0.25\n2,0.6,2.0,0.8,0.75\n"),
            ),
            csv("b.csv", &format!("{head}1,0.7,1.5,0.7,0.5\n")),
            csv("c.csv", &format!("{head}1,0.1,1.0,,\n2,0.2,2.0,,\n")),
            csv("d.csv", "round,test_acc,cumulative_seconds\n1,0.3,1.0\n"),
        ];
        assert!(!runs[2][&1].contains_key("val_acc"));
        let (n, mean, sd, min, max) = stats_at(&runs, 1, "val_acc");
        assert_eq!((n, mean, min, max), (2, 0.375, 0.25, 0.5));
        assert!((sd.unwrap() - 0.03125f64.sqrt()).abs() < 1e-15);
        let (n, mean, sd, ..) = stats_at(&runs, 2, "val_loss");
        assert_eq!((n, mean, sd), (1, 0.8, None));
        assert_eq!(stats_at(&runs, 1, "test_acc").0, 4);
        assert!(stats_at(&runs[2..], 1, "val_acc").1.is_nan());
        assert!(METRICS.contains(&"val_acc") && METRICS.contains(&"val_loss"));
        // A cell that is not a number is an error naming the column.
        let path = dir.path().join("e.csv");
        std::fs::write(&path, format!("{head}1,0.5,1.0,0.9,x\n")).unwrap();
        let e = format!("{:#}", read_rows(&path).unwrap_err());
        assert!(e.contains("val_acc"), "{e}");
    }
}
