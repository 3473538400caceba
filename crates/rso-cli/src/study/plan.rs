//! A study plan (TOML) resolved into its manifest: the fixed, ordered list of runs.
//!
//! ```toml
//! seeds = 5              # seeds S … S+4 (S = `seed`, default 0), or a list: [0, 3, 7]
//! out_dir = "batch"      # the study's directory, relative to this file (default: the file's
//!                        # name without .toml, beside it); `rso study … --out-dir` overrides
//! threads = 1            # worker threads of each run (default: cores / --jobs)
//!
//! [settings]             # `rso train` settings shared by every run (snake_case flag names)
//! model = "one-conv"
//! rounds = 10
//! data_dir = "../data/mnist"   # paths relative to this file
//!
//! [[grid]]               # a Cartesian product: every list is one axis
//! optimizer = "rso"
//! batch_size = [32, 256, 1024]
//!
//! [[grid]]               # grids have their own settings; the study is their union
//! optimizer = "sgd"
//! lr = [0.01, 0.1]
//! seeds = 1              # and may have their own seeds (`seeds`, `seed` as at the top)
//! ```
//!
//! Runs are ordered grid by grid, each grid's points in the order of its keys (sorted by name;
//! the last varies fastest), the seeds innermost; a run that an earlier grid already has is not
//! repeated. A run's id is the first 16 hex digits of the SHA-256 of the canonical JSON (sorted
//! keys, presets' defaults filled in) of the settings that decide its results: every `rso
//! train` setting its optimizer reads except paths, threads and outputs, the seed and the
//! number of rounds included, and the SHA-256 of the `init_weights` file's content (not its
//! path). Changing another run's settings does not change its id.

use crate::args::TrainArgs;
use crate::checkpoint::RunConfig;
use crate::{Cli, Command};
use anyhow::{bail, ensure, Context};
use clap::Parser;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The `rso train` options that are not settings of a run: outputs, resumption and the seed
/// (which a plan sets with `seed`/`seeds`).
const NOT_SETTINGS: [&str; 7] = [
    "out",
    "force",
    "save_weights",
    "checkpoint_dir",
    "resume",
    "seed",
    "help",
];

/// The `rso train` settings a plan may set (`snake_case` flag names): every `rso train` option
/// but outputs, resumption and the seed, read off the command-line definition, so a new option
/// is a plan setting at once.
pub fn settings() -> Vec<String> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let train = cli
        .find_subcommand("train")
        .expect("rso has a train subcommand");
    train
        .get_arguments()
        .map(|a| a.get_id().as_str().to_string())
        .filter(|id| !NOT_SETTINGS.contains(&id.as_str()))
        .collect()
}

/// Settings that hold paths: resolved against the plan's directory, left out of run ids.
const PATH_SETTINGS: [&str; 2] = ["data_dir", "init_weights"];

/// `seeds = N` or `seeds = [a, b, …]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Seeds {
    Count(u64),
    List(Vec<u64>),
}

/// The TOML file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    seeds: Option<Seeds>,
    seed: Option<u64>,
    out_dir: Option<PathBuf>,
    threads: Option<usize>,
    #[serde(default)]
    settings: toml::Table,
    #[serde(default)]
    grid: Vec<toml::Table>,
}

/// One run of a study.
#[derive(Clone, Debug)]
pub struct Run {
    /// Row number in the manifest, 1-based (a Slurm array task id).
    pub index: usize,
    /// Stable id ([module doc](self)).
    pub id: String,
    /// The grid it comes from, 1-based.
    pub grid: usize,
    /// Its seed.
    pub seed: u64,
    /// Its settings as `rso train` arguments (seed included; no output flags).
    pub args: Vec<String>,
    /// Its settings other than the seed, key → value as written (paths resolved): what
    /// [`collect`](super::collect) groups runs by.
    pub setting: BTreeMap<String, String>,
    /// The canonical JSON its id hashes.
    pub canonical: String,
}

/// A resolved plan.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The plan file.
    pub path: PathBuf,
    /// The study's directory.
    pub dir: PathBuf,
    /// Threads per run, when the plan fixes them.
    pub threads: Option<usize>,
    /// The manifest's runs, in order.
    pub runs: Vec<Run>,
    /// The setting keys whose value differs between runs (the columns of the summary).
    pub varied: Vec<String>,
}

impl Plan {
    /// Reads and checks the plan at `path`; `out_dir` overrides its directory. Every run's
    /// settings are checked as `rso train` would check them, before anything runs.
    ///
    /// # Errors
    /// One line naming the file, the key and what is wrong: unreadable or malformed TOML, an
    /// unknown key or setting, an empty list, a value `rso train` refuses.
    pub fn load(path: &Path, out_dir: Option<&Path>) -> anyhow::Result<Plan> {
        // A plan is a few kilobytes; a bound keeps a wrong path (a dataset) from being read.
        let bytes = crate::checkpoint::read_limited(path, 1 << 20, "is this a study plan?")
            .context("study plan")?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("study plan {}: not UTF-8 text", path.display()))?;
        let file: PlanFile = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|r| format!("line {}: ", text[..r.start].matches('\n').count() + 1))
                .unwrap_or_default();
            anyhow::anyhow!("{}: {line}{}", path.display(), e.message().trim_end())
        })?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let dir = match (out_dir, &file.out_dir) {
            (Some(d), _) => d.to_path_buf(),
            (None, Some(d)) => base.join(d),
            (None, None) => base.join(path.file_stem().unwrap_or_default()),
        };
        let ctx = |what: String| format!("{}: {what}", path.display());
        if let Some(t) = file.threads {
            ensure!(t >= 1, "{}", ctx("threads: must be at least 1".into()));
        }
        let seeds = seeds(&file).map_err(|e| anyhow::anyhow!(ctx(e)))?;
        let shared = setting_values(&file.settings, &base)
            .map_err(|e| anyhow::anyhow!(ctx(format!("[settings] {e}"))))?;
        let grids = if file.grid.is_empty() {
            vec![toml::Table::new()]
        } else {
            file.grid.clone()
        };
        let mut runs = Vec::new();
        let mut seen = HashSet::new();
        for (g, grid) in grids.iter().enumerate() {
            let mut grid = grid.clone();
            let grid_seeds = grid_seeds(&mut grid, &file)
                .map_err(|e| anyhow::anyhow!(ctx(format!("grid {}: {e}", g + 1))))?;
            let seeds = grid_seeds.as_ref().unwrap_or(&seeds);
            let axes = setting_axes(&grid, &base)
                .map_err(|e| anyhow::anyhow!(ctx(format!("grid {}: {e}", g + 1))))?;
            for point in cartesian(&axes) {
                let mut setting = shared.clone();
                setting.extend(point);
                for &seed in seeds {
                    let run = make_run(g + 1, seed, &setting).map_err(|e| {
                        let at = if file.grid.is_empty() {
                            format!("seed {seed}")
                        } else {
                            format!("grid {}, seed {seed}", g + 1)
                        };
                        anyhow::anyhow!(ctx(format!("{at}: {e:#}")))
                    })?;
                    if seen.insert(run.id.clone()) {
                        runs.push(Run {
                            index: runs.len() + 1,
                            ..run
                        });
                    }
                }
            }
        }
        let varied = varied_keys(&runs);
        Ok(Plan {
            path: path.to_path_buf(),
            dir,
            threads: file.threads,
            runs,
            varied,
        })
    }

    /// The run with manifest row number `index` (1-based).
    ///
    /// # Errors
    /// When there is no such row.
    pub fn run(&self, index: usize) -> anyhow::Result<&Run> {
        self.runs.get(index.wrapping_sub(1)).with_context(|| {
            format!(
                "--index {index}: the manifest of {} has rows 1 to {}",
                self.path.display(),
                self.runs.len()
            )
        })
    }

    /// The directory of run `run`'s files.
    pub fn run_dir(&self, run: &Run) -> PathBuf {
        self.dir.join("runs").join(&run.id)
    }
}

/// A grid's own `seeds`/`seed` (removed from `grid`) resolved as at the top of the plan, the
/// top's standing in for the one the grid leaves out; `None` when it has neither.
fn grid_seeds(grid: &mut toml::Table, file: &PlanFile) -> Result<Option<Vec<u64>>, String> {
    let (count_or_list, start) = (grid.remove("seeds"), grid.remove("seed"));
    if count_or_list.is_none() && start.is_none() {
        return Ok(None);
    }
    let mut own = toml::Table::new();
    match (count_or_list, &file.seeds) {
        (Some(v), _) => {
            own.insert("seeds".into(), v);
        }
        (None, Some(Seeds::Count(n))) => {
            own.insert("seeds".into(), toml::Value::Integer(*n as i64));
        }
        (None, _) => {}
    }
    let list = own.get("seeds").is_some_and(toml::Value::is_array);
    match (start, file.seed) {
        (Some(v), _) => {
            own.insert("seed".into(), v);
        }
        (None, Some(s)) if !list => {
            own.insert("seed".into(), toml::Value::Integer(s as i64));
        }
        _ => {}
    }
    let own: PlanFile = toml::Value::Table(own)
        .try_into()
        .map_err(|e: toml::de::Error| format!("seeds/seed: {}", e.message().trim_end()))?;
    seeds(&own).map(Some)
}

/// The seeds the plan asks for.
fn seeds(file: &PlanFile) -> Result<Vec<u64>, String> {
    let start = file.seed.unwrap_or(0);
    match &file.seeds {
        None => Ok(vec![start]),
        Some(Seeds::Count(0)) => Err("seeds: must be at least 1".into()),
        Some(Seeds::Count(n)) => (0..*n)
            .map(|i| {
                start
                    .checked_add(i)
                    .ok_or("seeds: seed overflows u64".to_string())
            })
            .collect(),
        Some(Seeds::List(list)) => {
            if file.seed.is_some() {
                return Err("seed: give either `seed` with `seeds = N`, or a list of seeds".into());
            }
            if list.is_empty() {
                return Err("seeds: the list is empty".into());
            }
            let unique: HashSet<_> = list.iter().collect();
            if unique.len() != list.len() {
                return Err("seeds: the list repeats a seed".into());
            }
            Ok(list.clone())
        }
    }
}

/// A scalar TOML value as the `rso train` argument text (`key` names it in errors).
fn scalar(key: &str, v: &toml::Value, base: &Path) -> Result<String, String> {
    let text = match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        other => {
            return Err(format!(
                "{key}: {} is not a string or a number",
                other.type_str()
            ))
        }
    };
    if PATH_SETTINGS.contains(&key) {
        // Relative to the plan, absolute in the manifest (runs may start anywhere).
        let p = base.join(&text);
        return Ok(std::path::absolute(&p)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned());
    }
    Ok(text)
}

fn check_key(key: &str) -> Result<(), String> {
    if key == "seed" || key == "seeds" {
        return Err(format!(
            "{key}: seeds are set at the top of the plan or of a [[grid]] (`seed`, `seeds`), \
             not in [settings]"
        ));
    }
    let known = settings();
    if !known.iter().any(|k| k == key) {
        return Err(format!(
            "unknown setting `{key}` (one of: {})",
            known.join(", ")
        ));
    }
    Ok(())
}

/// The `[settings]` table: scalars only.
fn setting_values(table: &toml::Table, base: &Path) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (key, v) in table {
        check_key(key)?;
        if v.is_array() {
            return Err(format!(
                "{key}: lists go in a [[grid]], where each is an axis"
            ));
        }
        out.insert(key.clone(), scalar(key, v, base)?);
    }
    Ok(out)
}

/// A `[[grid]]` table: each key with its values (a scalar is a one-value axis).
fn setting_axes(table: &toml::Table, base: &Path) -> Result<Vec<(String, Vec<String>)>, String> {
    let mut axes = Vec::new();
    for (key, v) in table {
        check_key(key)?;
        let values = match v {
            toml::Value::Array(items) => {
                if items.is_empty() {
                    return Err(format!("{key}: the list is empty"));
                }
                items
                    .iter()
                    .map(|x| scalar(key, x, base))
                    .collect::<Result<Vec<_>, _>>()?
            }
            x => vec![scalar(key, x, base)?],
        };
        axes.push((key.clone(), values));
    }
    Ok(axes)
}

/// Every combination of one value per axis, the last axis varying fastest.
fn cartesian(axes: &[(String, Vec<String>)]) -> Vec<BTreeMap<String, String>> {
    let mut points = vec![BTreeMap::new()];
    for (key, values) in axes {
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.insert(key.clone(), v.clone());
                    q
                })
            })
            .collect();
    }
    points
}

/// The run of `setting` with `seed`: its arguments, checked as `rso train` checks them, and its
/// id.
fn make_run(grid: usize, seed: u64, setting: &BTreeMap<String, String>) -> anyhow::Result<Run> {
    // `--flag=value`, so that a value starting with `-` stays a value.
    let mut args: Vec<String> = setting
        .iter()
        .map(|(key, value)| format!("--{}={value}", key.replace('_', "-")))
        .collect();
    args.push(format!("--seed={seed}"));
    let train = parse_train(&args)?;
    crate::train::check_settings(&train)?;
    let mut config = serde_json::to_value(RunConfig::from_args(&train, Path::new("")))
        .context("serialising the settings")?;
    if let Some(map) = config.as_object_mut() {
        for key in PATH_SETTINGS {
            map.remove(key);
        }
        // Knobs the run's optimizer does not read would make two identical runs differ.
        let unread = crate::args::OPTIMIZER_SETTINGS
            .iter()
            .filter(|(_, readers)| !readers.contains(&train.optimizer));
        for (key, _) in unread {
            map.remove(*key);
        }
        // Initial weights decide the results: their content is part of the id, not their path.
        if let Some(path) = &train.init_weights {
            let bytes = crate::checkpoint::read_limited(
                path,
                64 << 20,
                "larger than any weights file of these models",
            )
            .context("init_weights")?;
            let sum: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            map.insert("init_weights_sha256".into(), sum.into());
        }
    }
    let canonical = serde_json::to_string(&config).context("serialising the settings")?;
    let digest = Sha256::digest(canonical.as_bytes());
    let id: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(Run {
        index: 0,
        id,
        grid,
        seed,
        args,
        setting: setting.clone(),
        canonical,
    })
}

/// `rso train ARGS` parsed as the command line would be.
pub fn parse_train(args: &[String]) -> anyhow::Result<TrainArgs> {
    let argv = ["rso", "train"]
        .into_iter()
        .map(String::from)
        .chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Train(t),
            ..
        }) => Ok(*t),
        Ok(_) => bail!("not a train command"),
        Err(e) => {
            // clap's message on one line, without its usage and help hints.
            let text = e.to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            bail!("{}", lines.join(" ").trim_start_matches("error: "))
        }
    }
}

/// The keys whose value is not the same in every run.
fn varied_keys(runs: &[Run]) -> Vec<String> {
    let mut keys: Vec<String> = runs
        .iter()
        .flat_map(|r| r.setting.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    keys.retain(|k| {
        let first = runs.first().and_then(|r| r.setting.get(k));
        runs.iter().any(|r| r.setting.get(k) != first)
    });
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> anyhow::Result<Plan> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).unwrap();
        Plan::load(&path, None)
    }

    const BASE: &str = "[settings]\nmodel = \"one-conv\"\nrounds = 2\n";

    #[test]
    fn grids_are_cartesian_products_with_seeds_innermost_and_union_without_repeats() {
        let p = plan(&format!(
            "seeds = 2\nseed = 5\n{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = [32, 256, 1024]\n\
             [[grid]]\noptimizer = \"rso\"\nbatch_size = 32\n\
             [[grid]]\noptimizer = \"sgd\"\nlr = [0.01, 0.1]\nbatch_size = 32\n"
        ))
        .unwrap();
        let rows: Vec<(usize, String, u64)> = p
            .runs
            .iter()
            .map(|r| {
                (
                    r.grid,
                    r.setting.get("batch_size").cloned().unwrap(),
                    r.seed,
                )
            })
            .collect();
        // Grid 2 repeats grid 1's batch 32 runs: not run twice.
        assert_eq!(p.runs.len(), 6 + 4);
        assert_eq!(rows[0], (1, "32".into(), 5));
        assert_eq!(rows[1], (1, "32".into(), 6));
        assert_eq!(rows[2], (1, "256".into(), 5));
        assert_eq!(
            p.runs[6].setting.get("lr").map(String::as_str),
            Some("0.01")
        );
        assert_eq!(p.runs[8].setting.get("lr").map(String::as_str), Some("0.1"));
        assert!(p.runs.iter().enumerate().all(|(i, r)| r.index == i + 1));
        assert_eq!(p.varied, ["batch_size", "lr", "optimizer"]);
    }

    #[test]
    fn the_settings_are_the_train_options_but_outputs_and_seed() {
        let s = settings();
        for key in [
            "model",
            "optimizer",
            "batch_size",
            "lr",
            "sigma",
            "data_dir",
            "rso_eval",
            "val_split",
        ] {
            assert!(s.iter().any(|k| k == key), "{key} missing from {s:?}");
        }
        for key in NOT_SETTINGS {
            assert!(!s.iter().any(|k| k == key), "{key} in {s:?}");
        }
        assert_eq!(s.len(), 27, "{s:?}");
    }

    #[test]
    fn knobs_of_another_optimizer_are_refused_but_initial_weights_split_runs() {
        // A plan that spells out an optimizer's defaults makes the same runs as one that does
        // not; a knob of another optimizer is refused, naming it.
        let a = plan(&format!(
            "{BASE}[[grid]]\noptimizer = \"sgd\"\nbatch_size = 8\nlr = 0.01\n\
             [[grid]]\noptimizer = \"rso\"\nbatch_size = 8\nrso_eval = \"incremental\"\n"
        ))
        .unwrap();
        let b = plan(&format!(
            "{BASE}[[grid]]\noptimizer = \"sgd\"\nbatch_size = 8\n\
             [[grid]]\noptimizer = \"rso\"\nbatch_size = 8\n"
        ))
        .unwrap();
        let ids = |p: &Plan| p.runs.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        for (optimizer, knob) in [
            ("rso", "lr = 0.5"),
            ("sgd", "sigma = [0.1, 0.2]"),
            ("sgd", "rso_eval = \"reference\""),
        ] {
            let e = plan(&format!(
                "{BASE}[[grid]]\noptimizer = \"{optimizer}\"\nbatch_size = 8\n{knob}\n"
            ))
            .unwrap_err();
            let flag = format!("--{}", knob.split(' ').next().unwrap().replace('_', "-"));
            assert!(format!("{e:#}").contains(&flag), "{e:#}");
        }
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.st"), dir.path().join("b.st"));
        std::fs::write(&a, b"one").unwrap();
        std::fs::write(&b, b"two").unwrap();
        let p = plan(&format!(
            "{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 8\ninit_weights = [{a:?}, {b:?}]\n\
             [[grid]]\noptimizer = \"rso\"\nbatch_size = 8\n"
        ))
        .unwrap();
        assert_eq!(p.runs.len(), 3, "{:?}", p.runs);
        let missing = plan(&format!(
            "{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 8\ninit_weights = \"/no/such\"\n"
        ));
        assert!(format!("{:#}", missing.unwrap_err()).contains("init_weights"));
    }

    #[test]
    fn a_grid_may_have_its_own_seeds() {
        let p = plan(&format!(
            "seeds = 3\nseed = 10\n{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 8\n\
             [[grid]]\noptimizer = \"sgd\"\nbatch_size = 8\nseeds = 1\n\
             [[grid]]\noptimizer = \"rso\"\nbatch_size = 16\nseeds = [1, 2]\n"
        ))
        .unwrap();
        let seeds: Vec<(usize, u64)> = p.runs.iter().map(|r| (r.grid, r.seed)).collect();
        assert_eq!(seeds, [(1, 10), (1, 11), (1, 12), (2, 10), (3, 1), (3, 2)]);
    }

    #[test]
    fn ids_depend_on_the_results_settings_only() {
        let a = plan(&format!(
            "{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = [32, 64]\n"
        ))
        .unwrap();
        // Another grid added, a default written out, a path and the threads changed: the
        // existing runs keep their ids.
        let b = plan(&format!(
            "threads = 1\n{BASE}preset = \"seed\"\ndata_dir = \"elsewhere\"\n\
             [[grid]]\noptimizer = \"rso\"\nbatch_size = [32, 64]\n[[grid]]\noptimizer = \"sgd\"\nbatch_size = 32\n"
        ))
        .unwrap();
        assert_eq!(a.runs[0].id, b.runs[0].id);
        assert_eq!(a.runs[1].id, b.runs[1].id);
        assert_ne!(a.runs[0].id, a.runs[1].id);
        assert_ne!(b.runs[2].id, b.runs[0].id);
        // A change of rounds or seed changes the id.
        let c = plan(&format!(
            "seed = 1\n{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 32\n"
        ))
        .unwrap();
        assert_ne!(c.runs[0].id, a.runs[0].id);
        let d = plan("[settings]\nmodel = \"one-conv\"\nrounds = 3\n[[grid]]\noptimizer = \"rso\"\nbatch_size = 32\n").unwrap();
        assert_ne!(d.runs[0].id, a.runs[0].id);
        assert_eq!(a.runs[0].id.len(), 16);
    }

    #[test]
    fn a_val_split_is_a_setting_of_its_own_run_and_leaves_other_ids_alone() {
        let a = plan(&format!(
            "{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 32\n"
        ))
        .unwrap();
        let b = plan(&format!(
            "{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 32\nval_split = [0, 5000]\n"
        ));
        // 0 is refused as the command line refuses it.
        let e = format!("{:#}", b.unwrap_err());
        assert!(e.contains("--val-split must be at least 1"), "{e}");
        let b = plan(&format!(
            "{BASE}train_limit = 1000\n[[grid]]\noptimizer = \"rso\"\nbatch_size = 32\nval_split = 1000\n"
        ));
        let e = format!("{:#}", b.unwrap_err());
        assert!(
            e.contains("--val-split 1000") && e.contains("--train-limit 1000"),
            "{e}"
        );
        let b = plan(&format!(
            "{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 32\n\
             [[grid]]\noptimizer = \"rso\"\nbatch_size = 32\nval_split = [100, 5000]\n"
        ))
        .unwrap();
        assert_eq!(b.runs.len(), 3);
        assert_eq!(b.runs[0].id, a.runs[0].id);
        assert!(!b.runs[0].canonical.contains("val_split"));
        assert!(b.runs[1].canonical.contains("\"val_split\":100"));
        assert!(b.runs[1].args.contains(&"--val-split=100".to_string()));
        assert_ne!(b.runs[1].id, b.runs[0].id);
        assert_ne!(b.runs[1].id, b.runs[2].id);
    }

    /// The committed studies under `results/` keep the ids their runs are stored under: the
    /// ids of their plans today are those of their manifests.
    #[test]
    fn the_committed_studies_keep_their_run_ids() {
        let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../results");
        let mut studies = 0;
        for stem in ["seed_table", "comparison", "comparison_two_conv"] {
            let plan_path = results.join(format!("{stem}.plan.toml"));
            let manifest = results.join(stem).join("manifest.csv");
            if !plan_path.is_file() || !manifest.is_file() {
                continue;
            }
            studies += 1;
            let p = Plan::load(&plan_path, Some(&results.join(stem))).unwrap();
            let mut reader = csv::Reader::from_path(&manifest).unwrap();
            let ids: Vec<String> = reader
                .records()
                .map(|r| r.unwrap()[1].to_string())
                .collect();
            let now: Vec<String> = p.runs.iter().map(|r| r.id.clone()).collect();
            assert_eq!(now, ids, "{stem}");
            for id in &ids {
                assert!(
                    results.join(stem).join("runs").join(id).is_dir(),
                    "{stem}: {id}"
                );
            }
        }
        assert!(
            studies > 0,
            "no committed study found under {}",
            results.display()
        );
    }

    #[test]
    fn bad_plans_name_the_file_and_the_key() {
        let cases = [
            ("[settings]\nmodle = \"one-conv\"\n", "modle"),
            ("colour = 1\n", "colour"),
            (
                &format!("{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = []\n"),
                "batch_size: the list is empty",
            ),
            (
                &format!("{BASE}[[grid]]\noptimizer = \"adam\"\nbatch_size = 8\n"),
                "possible values: rso, sgd",
            ),
            (
                &format!("{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 0\n"),
                "--batch-size",
            ),
            (
                &format!("{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 8\nsigma = -1\n"),
                "sigma",
            ),
            (&format!("{BASE}seed = 3\n"), "seeds are set"),
            (
                &format!("{BASE}[[grid]]\noptimizer = \"rso\"\nbatch_size = 8\nseeds = []\n"),
                "seeds: the list is empty",
            ),
            (&format!("seeds = 0\n{BASE}"), "seeds"),
            (
                &format!("{BASE}batch_size = [8, 16]\n"),
                "lists go in a [[grid]]",
            ),
            ("[settings\n", "line 1"),
            (
                "[settings]\nmodel = \"one-conv\"\n[[grid]]\noptimizer = \"rso\"\nbatch_size = 8\n",
                "--rounds",
            ),
            (
                &format!("{BASE}[[grid]]\noptimizer = true\n"),
                "optimizer: boolean",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", plan(text).unwrap_err());
            assert!(err.contains("p.toml"), "{text}: {err}");
            assert!(err.contains(want), "{text}: {err}");
            assert_eq!(err.lines().count(), 1, "{text}: {err}");
        }
    }
}
