//! End-to-end tests of the `rso` binary on a small MNIST subset and on bad input.

mod common;

use common::{mnist_dir, rso, rso_command};
use std::path::{Path, PathBuf};

fn small_run(extra: &[&str]) -> Vec<String> {
    let dir = mnist_dir();
    let mut args = vec![
        "train",
        "--model",
        "one-conv",
        "--data-dir",
        dir.to_str().unwrap(),
        "--train-limit",
        "600",
        "--test-limit",
        "300",
    ];
    args.extend_from_slice(extra);
    let out = rso(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rso failed: {stderr}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        .to_string()
}

#[test]
fn rso_round_ends_with_a_result_line_that_learned_something() {
    let lines = small_run(&["--optimizer", "rso", "--rounds", "1", "--batch-size", "32"]);
    let last = lines.last().unwrap();
    assert!(
        last.starts_with(
            "RESULT model=one-conv optimizer=rso backend=cpu device=cpu rounds=1 batch=32 "
        ),
        "{last}"
    );
    let acc: f64 = field(last, "test_acc").parse().unwrap();
    // Chance is 0.1; one RSO round on 600 images already does clearly better.
    assert!(acc > 0.3, "test_acc {acc}");
    let loss: f64 = field(last, "test_loss").parse().unwrap();
    assert!(loss.is_finite() && loss > 0.0);
}

#[test]
fn sgd_epoch_learns() {
    let lines = small_run(&[
        "--optimizer",
        "sgd",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
    ]);
    let last = lines.last().unwrap();
    let acc: f64 = field(last, "test_acc").parse().unwrap();
    assert!(acc > 0.6, "test_acc {acc}");
}

#[test]
fn the_meta_json_names_the_kernels_simd_level() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("portable.csv");
    let dir = mnist_dir();
    let args = [
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "1",
        "--batch-size",
        "8",
        "--train-limit",
        "40",
        "--test-limit",
        "20",
        "--data-dir",
    ];
    let run = rso_command()
        .env("RSO_SIMD", "portable")
        .args(args)
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let meta = common::meta(&out);
    assert_eq!(meta["engine"]["kernels"], "portable", "{meta}");
    assert_eq!(
        meta["engine"]["label"], "backend cpu, device cpu, kernels portable",
        "{meta}"
    );
    assert!(meta["machine"]["simd_class"].is_string(), "{meta}");
    let bad = rso_command()
        .env("RSO_SIMD", "sse9")
        .args(args)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RSO_SIMD=sse9"));
}

#[test]
fn same_seed_same_rows_and_out_is_never_overwritten_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.csv");
    let b = tmp.path().join("b.csv");
    let args = |p: &Path| {
        vec![
            "--optimizer".to_string(),
            "rso".into(),
            "--rounds".into(),
            "2".into(),
            "--batch-size".into(),
            "8".into(),
            "--seed".into(),
            "11".into(),
            "--out".into(),
            p.to_str().unwrap().into(),
        ]
    };
    let run = |p: &Path| {
        let v = args(p);
        small_run(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    run(&a);
    run(&b);
    let rows = common::rows_without_times;
    assert_eq!(rows(&a).len(), 3);
    assert_eq!(rows(&a), rows(&b));
    let meta = common::meta(&a);
    let command: Vec<&str> = meta["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command[1..4], ["train", "--model", "one-conv"], "{meta}");
    assert!(command.ends_with(&["--out", a.to_str().unwrap()]), "{meta}");
    assert_eq!(meta["seed"], 11);
    assert_eq!(meta["settings"]["batch_size"], 8);
    assert_eq!(meta["settings"]["resolved"]["preset"], "seed");
    for key in ["revision", "started", "ended"] {
        assert!(
            meta[key].as_str().is_some_and(|s| !s.is_empty()),
            "{key}: {meta}"
        );
    }

    // A second run onto an existing file is refused and leaves the file as it was.
    let before = std::fs::read(&a).unwrap();
    let dir = mnist_dir();
    let out = rso(&[
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "1",
        "--batch-size",
        "8",
        "--data-dir",
        dir.to_str().unwrap(),
        "--train-limit",
        "50",
        "--out",
        a.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(&a).unwrap(), before);
}

/// The study columns of `path` as numbers (`None` for an empty cell), by name.
fn numbers(path: &Path, name: &str) -> Vec<Option<f64>> {
    common::column(path, name)
        .iter()
        .map(|s| (!s.is_empty()).then(|| s.parse().unwrap()))
        .collect()
}

#[test]
fn rows_count_the_work_asked_for_in_forward_equivalents() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec!["--rounds", "2", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        small_run(&args);
        out
    };
    let int = |v: &[Option<f64>]| -> Vec<u64> { v.iter().map(|x| x.unwrap() as u64).collect() };
    // SGD: every one of the 600 training samples once per epoch, 3 forward-equivalents each.
    let sgd = run("sgd.csv", &["--optimizer", "sgd", "--batch-size", "64"]);
    assert_eq!(int(&numbers(&sgd, "forward_equivalents")), [1800, 1800]);
    assert_eq!(
        int(&numbers(&sgd, "cumulative_forward_equivalents")),
        [1800, 3600]
    );
    assert_eq!(numbers(&sgd, "accept_rate"), [None, None]);
    assert_eq!(numbers(&sgd, "sigma_scale"), [None, None]);
    // RSO, the notebook's random batches, 64 ∤ 600: each visit counts its own batch's size.
    let rso = run("rso.csv", &["--optimizer", "rso", "--batch-size", "64"]);
    let steps = int(&numbers(&rso, "steps"));
    let fe = int(&numbers(&rso, "forward_equivalents"));
    for (f, s) in fe.iter().zip(&steps) {
        assert!(*f < 3 * 64 * s && *f > 3 * 24 * s, "{f} for {s} visits");
    }
    assert_eq!(
        int(&numbers(&rso, "cumulative_forward_equivalents")),
        [fe[0], fe[0] + fe[1]]
    );
    let accepted = numbers(&rso, "accepted");
    for (i, rate) in numbers(&rso, "accept_rate").iter().enumerate() {
        assert_eq!(rate.unwrap(), accepted[i].unwrap() / steps[i] as f64);
    }
    assert_eq!(numbers(&rso, "sigma_scale"), [Some(1.0), Some(1.0)]);
    // The paper's preset: equal sequential batches, σ annealed from 1 towards 0.1 over 2 rounds.
    let paper = run(
        "paper.csv",
        &[
            "--optimizer",
            "rso",
            "--preset",
            "paper",
            "--batch-size",
            "50",
        ],
    );
    let steps = int(&numbers(&paper, "steps"));
    let fe = int(&numbers(&paper, "forward_equivalents"));
    assert_eq!(fe, [150 * steps[0], 150 * steps[1]]);
    assert_eq!(
        numbers(&paper, "sigma_scale"),
        [Some(1.0), Some(0.1 + 0.9 / 2.0)]
    );
    let secs = numbers(&paper, "seconds");
    let cumulative = numbers(&paper, "cumulative_seconds");
    assert_eq!(
        cumulative,
        [secs[0], Some(secs[0].unwrap() + secs[1].unwrap())]
    );
}

#[test]
fn an_argument_with_a_newline_stays_in_the_meta_json_not_the_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mnist\ncopy");
    std::fs::create_dir(&data).unwrap();
    for entry in std::fs::read_dir(mnist_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
    }
    let out = tmp.path().join("out.csv");
    let status = rso_command()
        .args([
            "train",
            "--model",
            "one-conv",
            "--optimizer",
            "sgd",
            "--rounds",
            "1",
        ])
        .args([
            "--batch-size",
            "32",
            "--train-limit",
            "64",
            "--test-limit",
            "32",
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(common::read_csv(&out).1.len(), 1);
    let meta = common::meta(&out);
    let command = meta["command"].as_array().unwrap();
    assert!(
        command.iter().any(|a| a == data.to_str().unwrap()),
        "{meta}"
    );
}

/// Runs rso expecting failure; returns stderr, which must be one line with no panic.
fn fails(args: &[&str]) -> String {
    let out = rso(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn bad_arguments_fail_with_a_reason() {
    let dir = mnist_dir();
    let d = dir.to_str().unwrap();
    let base = [
        "train",
        "--optimizer",
        "rso",
        "--rounds",
        "1",
        "--data-dir",
        d,
        "--train-limit",
        "100",
    ];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        fails(&v)
    };
    let e = with(&["--model", "one-conv", "--batch-size", "0"]);
    assert!(e.contains("--batch-size"), "{e}");
    let e = with(&["--model", "one-conv", "--batch-size", "101"]);
    assert!(e.contains("--batch-size") && e.contains("100"), "{e}");
    let e = with(&["--model", "three-conv", "--batch-size", "8"]);
    assert!(e.contains("three-conv"), "{e}");
    let e = fails(&[
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "1",
        "--batch-size",
        "8",
        "--data-dir",
        "/nonexistent/mnist",
    ]);
    assert!(
        e.contains("/nonexistent/mnist") && e.contains("fetch-mnist"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// A setting of one optimizer given to another is refused, naming the flag and its optimizers;
/// bad values of the forward-only methods' knobs name their flag.
#[test]
fn settings_of_another_optimizer_and_bad_knobs_are_refused() {
    let dir = mnist_dir();
    let d = dir.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut v = vec![
            "train",
            "--model",
            "one-conv",
            "--rounds",
            "1",
            "--batch-size",
            "8",
            "--data-dir",
            d,
            "--train-limit",
            "100",
        ];
        v.extend_from_slice(extra);
        fails(&v)
    };
    for (extra, flag, belongs) in [
        (
            &["--optimizer", "rso", "--es-sigma", "0.1"][..],
            "--es-sigma",
            "es",
        ),
        (&["--optimizer", "es", "--sigma", "0.1"], "--sigma", "rso"),
        (
            &["--optimizer", "sgd", "--cfd-block", "2"],
            "--cfd-block",
            "cfd",
        ),
        (
            &["--optimizer", "cfd", "--spsa-eps", "0.1"],
            "--spsa-eps",
            "spsa",
        ),
        (
            &["--optimizer", "spsa", "--sigma-multiplier", "2"],
            "--sigma-multiplier",
            "rso",
        ),
        (
            &["--optimizer", "sgd", "--weight-decay", "0.1"],
            "--weight-decay",
            "rso",
        ),
    ] {
        let e = run(extra);
        let belongs = format!("setting of --optimizer {belongs};");
        assert!(e.contains(flag) && e.contains(&belongs), "{extra:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    for (extra, flag) in [
        (
            &["--optimizer", "spsa", "--spsa-eps", "0"][..],
            "--spsa-eps",
        ),
        (
            &["--optimizer", "spsa", "--spsa-directions", "0"],
            "--spsa-directions",
        ),
        (&["--optimizer", "es", "--es-sigma=-1"], "--es-sigma"),
        (&["--optimizer", "cfd", "--cfd-block", "0"], "--cfd-block"),
        (&["--optimizer", "cfd", "--cfd-mu", "inf"], "--cfd-mu"),
        (
            &["--optimizer", "rso", "--sigma-multiplier", "0"],
            "--sigma-multiplier",
        ),
        (
            &["--optimizer", "rso", "--max-forward-equivalents", "0"],
            "--max-forward-equivalents",
        ),
        (
            &["--optimizer", "rso", "--max-forward-equivalents", "10"],
            "--max-forward-equivalents",
        ),
    ] {
        let e = run(extra);
        assert!(e.contains(flag), "{extra:?}: {e}");
    }
}

/// With the libtorch backend built in, `--backend tch` trains the same model to the same result
/// as the pure-Rust backend (SGD: a few steps on a subset; the engines agree far below the
/// printed precision, so the accuracies must be within one test sample of each other).
#[cfg(feature = "tch")]
#[test]
fn tch_backend_trains_like_the_cpu_backend() {
    let run = |backend: &str| {
        let lines = small_run(&[
            "--optimizer",
            "sgd",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--lr",
            "0.05",
            "--backend",
            backend,
            "--threads",
            "1",
        ]);
        lines.last().unwrap().clone()
    };
    let (cpu, tch) = (run("cpu"), run("tch"));
    assert!(tch.contains("backend=tch device=cpu"), "{tch}");
    let acc = |l: &str| field(l, "test_acc").parse::<f64>().unwrap();
    assert!(
        (acc(&cpu) - acc(&tch)).abs() <= 1.0 / 300.0 + 1e-9,
        "{cpu}\n{tch}"
    );
    assert!(acc(&tch) > 0.5, "{tch}");
}

/// SPSA, ES and CFD drive the libtorch engine too (through the same `Network` trait): a few
/// hundred steps each (a forward-pass budget) end where the pure-Rust engine's end, up to the
/// engines' rounding (no method here amplifies it over so few steps).
#[cfg(feature = "tch")]
#[test]
fn spsa_es_and_cfd_train_on_the_tch_backend_as_on_the_cpu_backend() {
    for method in [
        &["--optimizer", "spsa", "--lr", "0.001"][..],
        &["--optimizer", "es", "--es-sigma", "0.003"],
        &["--optimizer", "cfd", "--lr", "2", "--cfd-block", "4"],
    ] {
        let run = |backend: &str| {
            let mut args = vec![
                "--rounds",
                "1",
                "--batch-size",
                "16",
                "--max-forward-equivalents",
                "20000",
                "--backend",
                backend,
                "--threads",
                "1",
            ];
            args.extend_from_slice(method);
            small_run(&args).last().unwrap().clone()
        };
        let (cpu, tch) = (run("cpu"), run("tch"));
        assert!(tch.contains("backend=tch device=cpu"), "{tch}");
        let num = |l: &str, k: &str| field(l, k).parse::<f64>().unwrap();
        let (a, b) = (num(&cpu, "test_loss"), num(&tch, "test_loss"));
        assert!((a - b).abs() <= 0.02 * a, "{method:?}\n{cpu}\n{tch}");
        assert!(
            (num(&cpu, "test_acc") - num(&tch, "test_acc")).abs() <= 0.02,
            "{method:?}\n{cpu}\n{tch}"
        );
        // Trained: below the loss of guessing (ln 10 ≈ 2.303); ES needs more than this budget
        // from the initial weights (above it), so only the engines' agreement is checked there.
        if method[1] != "es" {
            assert!(b < 2.25, "{method:?}: {tch}");
        }
    }
}

/// `rso train` on the first `limit` MNIST training images (and 200 test images), one-conv, 2
/// RSO rounds of batch 32, seed 3, with `extra`; writes `<tag>.csv` and `<tag>.safetensors`
/// into `dir` and returns their paths.
fn val_split_run(dir: &Path, tag: &str, limit: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let data = mnist_dir();
    let (csv, weights) = (
        dir.join(format!("{tag}.csv")),
        dir.join(format!("{tag}.safetensors")),
    );
    let mut args = vec![
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "2",
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--data-dir",
        data.to_str().unwrap(),
        "--train-limit",
        limit,
        "--test-limit",
        "200",
        "--out",
        csv.to_str().unwrap(),
        "--save-weights",
        weights.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let stdout = common::rso_ok(&args);
    let result = stdout.lines().last().unwrap();
    assert_eq!(
        result.contains(" val_loss=") && result.contains(" val_acc="),
        !extra.is_empty(),
        "{result}"
    );
    (csv, weights)
}

#[test]
fn a_val_split_holds_out_the_tail_of_the_training_set_and_evaluates_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (val_csv, val_w) = val_split_run(tmp.path(), "val", "600", &["--val-split", "100"]);
    let (plain_csv, plain_w) = val_split_run(tmp.path(), "plain", "500", &[]);

    // The optimizer saw the same 500 images (and BatchNorm calibration, had the model any, the
    // same subset of them): the same weights, byte for byte.
    assert!(
        std::fs::read(&val_w).unwrap() == std::fs::read(&plain_w).unwrap(),
        "a run with --val-split 100 of 600 trained otherwise than one on the first 500"
    );

    // The rows are the same but for the time columns and the validation cells, which only the
    // val-split run fills.
    let (header, val_rows) = common::read_csv(&val_csv);
    assert_eq!(header, common::COLUMNS);
    let (plain_header, plain_rows) = common::read_csv(&plain_csv);
    assert_eq!(plain_header, common::COLUMNS);
    assert_eq!(val_rows.len(), 2);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    for (v, p) in val_rows.iter().zip(&plain_rows) {
        for name in ["val_loss", "val_acc"] {
            assert!(
                p[col(name)].is_empty(),
                "{name} filled without a split: {p:?}"
            );
            assert!(!v[col(name)].is_empty(), "{name} empty with a split: {v:?}");
        }
        for (i, name) in header.iter().enumerate() {
            if !name.starts_with("val_") && !common::TIME_COLUMNS.contains(&name.as_str()) {
                assert_eq!(v[i], p[i], "{name}");
            }
        }
    }

    // The validation cells are the evaluation of the saved weights on training images 500 to
    // 599 (one-conv has no BatchNorm, so evaluation depends on the weights alone).
    let last = &val_rows[1];
    let (val_loss, val_acc): (f64, f64) = (
        last[col("val_loss")].parse().unwrap(),
        last[col("val_acc")].parse().unwrap(),
    );
    let spec = rso_models::ModelKind::OneConv.mnist();
    assert!(!spec.has_batch_norm());
    let params = rso_models::Params::load(&spec, &val_w).unwrap();
    let mut data =
        rso_data::load_mnist(&mnist_dir(), rso_models::Preset::Seed.normalization()).unwrap();
    data.train.truncate(600);
    let held_out = data.train.split_off(500);
    assert_eq!(held_out.len(), 100);
    let mut net = rso_cpu::CpuNetwork::new(
        &spec,
        &params,
        rso_data::Split {
            train: data.train,
            test: data.test,
            validation: held_out,
        },
    )
    .unwrap();
    use rso_models::Network;
    let want = net.evaluate(rso_models::SplitKind::Validation, None);
    assert_eq!(want.samples, 100);
    assert_eq!((val_loss, val_acc), (want.loss, want.accuracy));
    assert!(val_loss.is_finite() && val_loss > 0.0);

    // The provenance records the split and the sizes.
    let meta = common::meta(&val_csv);
    let s = &meta["settings"];
    assert_eq!(s["val_split"], 100, "{meta}");
    assert_eq!(s["train_limit"], 600, "{meta}");
    assert_eq!(s["train_samples"], 500, "{meta}");
    assert_eq!(s["validation_samples"], 100, "{meta}");
    assert_eq!(s["test_samples"], 200, "{meta}");
    let meta = common::meta(&plain_csv);
    let s = &meta["settings"];
    assert!(s["val_split"].is_null(), "{meta}");
    assert_eq!(s["train_samples"], 500, "{meta}");
    assert_eq!(s["validation_samples"], 0, "{meta}");
}

#[test]
fn bad_val_splits_are_refused_naming_the_flag_and_the_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_dir();
    let out = tmp.path().join("out.csv");
    let base = [
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
        "--test-limit",
        "50",
        "--out",
        out.to_str().unwrap(),
    ];
    let fails = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let run = rso(&args);
        let err = String::from_utf8_lossy(&run.stderr).to_string();
        assert_eq!(run.status.code(), Some(2), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains("--val-split"), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
        err
    };
    let e = fails(&["--batch-size", "8", "--val-split", "0"]);
    assert!(e.contains("at least 1"), "{e}");
    // All of the limited training set, or more: checked before any data is read.
    let e = fails(&[
        "--batch-size",
        "8",
        "--train-limit",
        "100",
        "--val-split",
        "100",
    ]);
    assert!(e.contains("100") && e.contains("--train-limit"), "{e}");
    let e = fails(&[
        "--batch-size",
        "8",
        "--train-limit",
        "100",
        "--val-split",
        "250",
    ]);
    assert!(e.contains("250") && e.contains("100"), "{e}");
    // Without --train-limit, against the whole training set once it is read.
    let e = fails(&["--batch-size", "8", "--val-split", "60000"]);
    assert!(e.contains("60000"), "{e}");
    // The batch must fit what is left to train on.
    let e = fails(&[
        "--batch-size",
        "60",
        "--train-limit",
        "100",
        "--val-split",
        "50",
    ]);
    assert!(
        e.contains("--batch-size 60") && e.contains("50 samples"),
        "{e}"
    );
    // Not a count: clap's error (with its usage hint), status 2.
    let mut args = base.to_vec();
    args.extend(["--batch-size", "8", "--val-split=-3"]);
    let run = rso(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("--val-split") && err.contains("-3"), "{err}");
    assert!(!out.exists());
}
