//! Hostile inputs to `rso train`: damaged or foreign checkpoints, foreign or non-finite initial
//! weights, a loss that overflows, NaN pixels. Each must stop the program with a one-line error
//! naming the file (or flag) at fault, without a panic, and without changing any file.

mod common;

use common::{mnist_dir, rso_fails, rso_ok, snapshot};
use rso_models::{ModelKind, Params};
use std::path::{Path, PathBuf};

/// Copies the files of directory `from` (recursively) into `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// A valid checkpoint of a one-conv SGD run after epoch 1 of 2, in `dir`.
fn make_checkpoint(dir: &Path) {
    let data = mnist_dir();
    rso_ok(&[
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "sgd",
        "--epochs",
        "1",
        "--batch-size",
        "10",
        "--train-limit",
        "100",
        "--test-limit",
        "50",
        "--seed",
        "5",
        "--data-dir",
        data.to_str().unwrap(),
        "--checkpoint-dir",
        dir.to_str().unwrap(),
    ]);
    // Claim a 2-epoch run, so that resuming it would train and write.
    let state = dir.join("round-000001/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"rounds\": 1,"), "{text}");
    std::fs::write(&state, text.replace("\"rounds\": 1,", "\"rounds\": 2,")).unwrap();
}

/// How one hostile variant damages a copy of the checkpoint.
type Damage = Box<dyn Fn(&Path)>;

fn edit_state(f: impl Fn(String) -> String + 'static) -> Damage {
    Box::new(move |ck: &Path| {
        let p = ck.join("round-000001/state.json");
        let text = std::fs::read_to_string(&p).unwrap();
        let new = f(text.clone());
        assert_ne!(new, text, "the edit changed nothing");
        std::fs::write(&p, new).unwrap();
    })
}

fn replace_field(field: &str, value: &str) -> Damage {
    let (field, value) = (field.to_string(), value.to_string());
    edit_state(move |text| {
        let key = format!("\"{field}\": ");
        let start = text.find(&key).unwrap_or_else(|| panic!("no {key}")) + key.len();
        let end = start + text[start..].find([',', '\n']).unwrap();
        format!("{}{value}{}", &text[..start], &text[end..])
    })
}

fn write_file(rel: &'static str, bytes: Vec<u8>) -> Damage {
    Box::new(move |ck: &Path| std::fs::write(ck.join(rel), &bytes).unwrap())
}

fn edit_weights(f: impl Fn(Vec<u8>) -> Vec<u8> + 'static) -> Damage {
    Box::new(move |ck: &Path| {
        let p = ck.join("round-000001/weights.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, f(bytes)).unwrap();
    })
}

fn other_model_weights(kind: ModelKind) -> Damage {
    Box::new(move |ck: &Path| {
        Params::zeros(&kind.mnist())
            .save(&ck.join("round-000001/weights.safetensors"))
            .unwrap()
    })
}

#[test]
fn resume_refuses_hostile_checkpoints_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    make_checkpoint(&good);
    let weights_len = std::fs::read(good.join("round-000001/weights.safetensors"))
        .unwrap()
        .len();

    // (name, damage, text the error must contain)
    let mut cases: Vec<(String, Damage, &str)> = vec![
        (
            "weights of two-conv".into(),
            other_model_weights(ModelKind::TwoConv),
            "weights.safetensors",
        ),
        (
            "weights of paper".into(),
            other_model_weights(ModelKind::Paper),
            "weights.safetensors",
        ),
        (
            "state says two-conv".into(),
            replace_field("model", "\"two-conv\""),
            "weights.safetensors",
        ),
        (
            "state says paper".into(),
            replace_field("model", "\"paper\""),
            "weights.safetensors",
        ),
        (
            "state says three-conv".into(),
            replace_field("model", "\"three-conv\""),
            "state.json",
        ),
        (
            "one flipped weight byte".into(),
            edit_weights(|mut b| {
                let i = b.len() - 5;
                b[i] ^= 0x40;
                b
            }),
            "checksum",
        ),
        (
            "trailing garbage".into(),
            edit_weights(|mut b| {
                b.extend_from_slice(b"xx");
                b
            }),
            "weights.safetensors",
        ),
        (
            "weights not safetensors".into(),
            write_file(
                "round-000001/weights.safetensors",
                b"hello world, not tensors".to_vec(),
            ),
            "weights.safetensors",
        ),
        (
            "weights too large".into(),
            write_file(
                "round-000001/weights.safetensors",
                vec![0; weights_len + (1 << 20) + 1],
            ),
            "weights.safetensors",
        ),
        (
            "weights missing".into(),
            Box::new(|ck: &Path| {
                std::fs::remove_file(ck.join("round-000001/weights.safetensors")).unwrap()
            }),
            "weights.safetensors",
        ),
        (
            "rounds_completed as a string".into(),
            replace_field("rounds_completed", "\"1\""),
            "state.json",
        ),
        (
            "rounds_completed 0".into(),
            replace_field("rounds_completed", "0"),
            "state.json",
        ),
        (
            "rounds_completed 1e30".into(),
            replace_field("rounds_completed", "1e30"),
            "state.json",
        ),
        (
            "rounds_completed beyond rounds".into(),
            replace_field("rounds_completed", "3"),
            "state.json",
        ),
        (
            "seed negative".into(),
            replace_field("seed", "-1"),
            "state.json",
        ),
        (
            "seed a float".into(),
            replace_field("seed", "5.5"),
            "state.json",
        ),
        (
            "batch_size null".into(),
            replace_field("batch_size", "null"),
            "state.json",
        ),
        (
            "batch_size 0".into(),
            replace_field("batch_size", "0"),
            "state.json",
        ),
        (
            "batch_size beyond the data".into(),
            replace_field("batch_size", "1000000"),
            "state.json",
        ),
        (
            "lr a number, not a string".into(),
            replace_field("lr", "0.01"),
            "state.json",
        ),
        (
            "lr not a number".into(),
            replace_field("lr", "\"fast\""),
            "state.json",
        ),
        (
            "lr negative".into(),
            replace_field("lr", "\"-1\""),
            "state.json",
        ),
        (
            "lr NaN".into(),
            replace_field("lr", "\"NaN\""),
            "state.json",
        ),
        (
            "sigma not a number".into(),
            replace_field("sigma", "\"big\""),
            "state.json",
        ),
        (
            "sigma as an array".into(),
            replace_field("sigma", "[1]"),
            "state.json",
        ),
        (
            "optimizer unknown".into(),
            replace_field("optimizer", "\"adam\""),
            "state.json",
        ),
        (
            "backend unknown".into(),
            replace_field("backend", "\"gpu\""),
            "state.json",
        ),
        (
            "train_limit a string".into(),
            replace_field("train_limit", "\"100\""),
            "state.json",
        ),
        (
            "train_limit changed: other data".into(),
            replace_field("train_limit", "99"),
            "differ",
        ),
        (
            "data checksum changed".into(),
            replace_field("checksum", "\"0000000000000000\""),
            "differ",
        ),
        (
            "weights_checksum not hex".into(),
            replace_field("weights_checksum", "\"xyz\""),
            "state.json",
        ),
        (
            "format other".into(),
            replace_field("format", "\"something-else\""),
            "state.json",
        ),
        (
            "version 4 (newer than this program)".into(),
            replace_field("version", "4"),
            "state.json",
        ),
        (
            "optimizer state SGD does not keep".into(),
            replace_field("optimizer_state", "{\"sigma\": \"0.1\"}"),
            "state.json",
        ),
        (
            "optimizer state not a map".into(),
            replace_field("optimizer_state", "[1, 2]"),
            "state.json",
        ),
        (
            "budget_reached not a boolean".into(),
            replace_field("budget_reached", "\"yes\""),
            "state.json",
        ),
        (
            "version 0".into(),
            replace_field("version", "0"),
            "state.json",
        ),
        (
            "a version-2 row without cumulative_seconds".into(),
            edit_state(|t| {
                let s = t.find("\"cumulative_seconds\": ").unwrap();
                let e = s + t[s..].find('\n').unwrap() + 1;
                // The field before it loses its trailing comma with it.
                let before = t[..s].trim_end().trim_end_matches(',').len();
                format!("{}\n{}", &t[..before], &t[e..])
            }),
            "cumulative_seconds",
        ),
        (
            "accept_rate not a number".into(),
            replace_field("accept_rate", "\"most\""),
            "state.json",
        ),
        (
            "rows an object".into(),
            edit_state(|t| t.replacen("\"rows\": [", "\"rows\": {\"a\": 1}, \"old_rows\": [", 1)),
            "state.json",
        ),
        (
            "row round renumbered".into(),
            replace_field("round", "7"),
            "state.json",
        ),
        (
            "row loss not a number".into(),
            replace_field("test_loss", "\"lots\""),
            "state.json",
        ),
        (
            "unknown field".into(),
            edit_state(|t| t.replacen('{', "{\"extra\": 1,", 1)),
            "state.json",
        ),
        (
            "missing field".into(),
            edit_state(|t| {
                let s = t.find("\"seed\": ").unwrap();
                let e = s + t[s..].find('\n').unwrap() + 1;
                format!("{}{}", &t[..s], &t[e..])
            }),
            "state.json",
        ),
        (
            "state empty".into(),
            write_file("round-000001/state.json", Vec::new()),
            "state.json",
        ),
        (
            "state garbage".into(),
            write_file(
                "round-000001/state.json",
                (0..=255u8).cycle().take(3000).collect(),
            ),
            "state.json",
        ),
        (
            "state truncated".into(),
            edit_state(|t| t[..t.len() / 2].to_string()),
            "state.json",
        ),
        (
            "state JSON null".into(),
            write_file("round-000001/state.json", b"null".to_vec()),
            "state.json",
        ),
        (
            "state a JSON array".into(),
            write_file("round-000001/state.json", b"[1, 2, 3]".to_vec()),
            "state.json",
        ),
        (
            "state too large".into(),
            write_file("round-000001/state.json", vec![b' '; (16 << 20) + 1]),
            "state.json",
        ),
        (
            "state missing".into(),
            Box::new(|ck: &Path| std::fs::remove_file(ck.join("round-000001/state.json")).unwrap()),
            "state.json",
        ),
        (
            "latest missing".into(),
            Box::new(|ck: &Path| std::fs::remove_file(ck.join("latest")).unwrap()),
            "latest",
        ),
        (
            "latest empty".into(),
            write_file("latest", Vec::new()),
            "latest",
        ),
        (
            "latest escapes".into(),
            write_file("latest", b"../../../etc/passwd\n".to_vec()),
            "latest",
        ),
        (
            "latest names a missing round".into(),
            write_file("latest", b"round-000007\n".to_vec()),
            "round-000007",
        ),
        (
            "latest and state disagree".into(),
            Box::new(|ck: &Path| {
                std::fs::rename(ck.join("round-000001"), ck.join("round-000002")).unwrap();
                std::fs::write(ck.join("latest"), "round-000002\n").unwrap();
            }),
            "state.json",
        ),
        (
            "latest huge".into(),
            write_file("latest", vec![b'r'; 1 << 20]),
            "latest",
        ),
        (
            "latest a directory".into(),
            Box::new(|ck: &Path| {
                std::fs::remove_file(ck.join("latest")).unwrap();
                std::fs::create_dir(ck.join("latest")).unwrap();
            }),
            "latest",
        ),
    ];
    for cut in [
        0,
        1,
        7,
        8,
        9,
        64,
        weights_len / 2,
        weights_len - 4,
        weights_len - 1,
    ] {
        cases.push((
            format!("weights truncated to {cut} bytes"),
            edit_weights(move |b| b[..cut].to_vec()),
            "weights.safetensors",
        ));
    }

    let data = mnist_dir();
    let run_resume = |ck: &Path, out: &Path, w: &Path| {
        vec![
            "train".to_string(),
            "--resume".into(),
            ck.to_str().unwrap().into(),
            "--data-dir".into(),
            data.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--save-weights".into(),
            w.to_str().unwrap().into(),
            "--force".into(),
        ]
    };
    for (k, (name, damage, expect)) in cases.iter().enumerate() {
        let case = tmp.path().join(format!("case{k}"));
        let ck = case.join("ck");
        copy_dir(&good, &ck);
        damage(&ck);
        // Existing results a run would overwrite (--force): they must survive the refusal.
        std::fs::write(case.join("out.csv"), b"precious results\n").unwrap();
        std::fs::write(case.join("w.safetensors"), b"precious weights\n").unwrap();
        let before = snapshot(&case);
        let args = run_resume(&ck, &case.join("out.csv"), &case.join("w.safetensors"));
        let err = rso_fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            err.contains(expect),
            "{name}: error does not mention {expect:?}: {err}"
        );
        assert!(snapshot(&case) == before, "{name}: files changed");
        eprintln!("{name}: {}", err.trim());
    }
    eprintln!("{} hostile checkpoints refused, none crashed", cases.len());

    // The undamaged checkpoint resumes (so the refusals above are the damage's doing).
    let case = tmp.path().join("ok");
    copy_dir(&good, &case.join("ck"));
    let args = run_resume(
        &case.join("ck"),
        &case.join("out.csv"),
        &case.join("w.safetensors"),
    );
    let out = rso_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("1/2 rounds done"), "{out}");
    assert_eq!(common::rows_without_times(&case.join("out.csv")).len(), 3);

    // No checkpoint directory at all, or a file instead of one.
    let e = rso_fails(&[
        "train",
        "--resume",
        tmp.path().join("nothing").to_str().unwrap(),
    ]);
    assert!(e.contains("nothing"), "{e}");
    let e = rso_fails(&["train", "--resume", case.join("out.csv").to_str().unwrap()]);
    assert!(e.contains("out.csv"), "{e}");
}

#[test]
fn resume_accepts_the_checkpoints_own_settings_and_refuses_others_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    make_checkpoint(&ck);
    let data = mnist_dir();
    let resume = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--resume", ck.to_str().unwrap()]
            .map(String::from)
            .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Different values: refused, the flag and both values named, nothing written.
    let before = snapshot(tmp.path());
    for (flag, value, theirs) in [
        ("--model", "two-conv", "one-conv"),
        ("--optimizer", "rso", "sgd"),
        ("--rounds", "1", "2"),
        ("--batch-size", "8", "10"),
        ("--seed", "0", "5"),
        ("--lr", "0.5", "0.01"),
        ("--train-limit", "5", "100"),
        ("--preset", "paper", "seed"),
        ("--checkpoint-dir", "elsewhere", ""),
    ] {
        let e = rso_fails(&strs(&resume(&[flag, value])));
        assert!(
            e.contains(flag) && e.contains(value) && e.contains(theirs),
            "{e}"
        );
        assert!(
            snapshot(tmp.path()) == before,
            "{flag}: something was written"
        );
    }
    // The same command again with --resume: every value equal, so it goes on.
    let out = tmp.path().join("out.csv");
    rso_ok(&strs(&resume(&[
        "--model",
        "one-conv",
        "--optimizer",
        "sgd",
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--train-limit",
        "100",
        "--test-limit",
        "50",
        "--seed",
        "5",
        "--backend",
        "cpu",
        "--device",
        "cpu",
        "--data-dir",
        data.to_str().unwrap(),
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])));
    assert_eq!(common::read_csv(&out).1.len(), 2);
}

#[test]
fn the_same_command_with_resume_added_works_after_the_run_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let command = train_args(&[
        "--checkpoint-dir",
        &t("ck"),
        "--out",
        &t("run.csv"),
        "--save-weights",
        &t("w.safetensors"),
    ]);
    rso_ok(&strs(&command));
    let mut again = command.clone();
    again.extend(["--resume".to_string(), t("ck")]);
    rso_ok(&strs(&again));
    // Moving it to a device its backend does not have is the flag's error, not the checkpoint's.
    let e = rso_fails(&["train", "--resume", &t("ck"), "--device", "cuda"]);
    assert!(
        e.contains("--device cuda") && !e.contains("state.json"),
        "{e}"
    );
    // A gzip'd weights file says so.
    let gz = tmp.path().join("w.safetensors.gz");
    std::fs::write(
        &gz,
        behind_a_gzip_header(&std::fs::read(t("w.safetensors")).unwrap()),
    )
    .unwrap();
    let e = rso_fails(&strs(&train_args(&[
        "--init-weights",
        gz.to_str().unwrap(),
    ])));
    assert!(e.contains("gzip-compressed"), "{e}");
}

/// `bytes` behind a gzip header (stored, not compressed: enough for a reader to recognise).
fn behind_a_gzip_header(bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    v.extend_from_slice(bytes);
    v
}

#[test]
fn resume_with_more_rounds_goes_on_exactly_unless_sigma_anneals() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut a = train_args(&[]);
        a.extend(extra.iter().map(|s| s.to_string()));
        rso_ok(&strs(&a));
    };
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    // Preset seed (σ does not anneal): 1 round, then 2 more, equals 3 rounds in one go.
    run(&["--checkpoint-dir", &p("ck"), "--out", &p("one.csv")]);
    rso_ok(&strs(&[
        "train".into(),
        "--resume".into(),
        p("ck"),
        "--rounds".into(),
        "3".into(),
        "--save-weights".into(),
        p("extended.safetensors"),
        "--out".into(),
        p("extended.csv"),
    ]));
    let rounds = |a: &mut Vec<String>| {
        let i = a.iter().position(|x| x == "--rounds").unwrap();
        a[i + 1] = "3".into();
    };
    let mut whole = train_args(&["--save-weights", &p("whole.safetensors")]);
    rounds(&mut whole);
    rso_ok(&strs(&whole));
    assert_eq!(
        std::fs::read(p("extended.safetensors")).unwrap(),
        std::fs::read(p("whole.safetensors")).unwrap(),
        "more rounds on resume differ from one uninterrupted run"
    );
    assert_eq!(common::read_csv(Path::new(&p("extended.csv"))).1.len(), 3);
    // Preset paper anneals σ over the run's total: refused, with the reason.
    run(&["--preset", "paper", "--checkpoint-dir", &p("paper")]);
    let e = rso_fails(&["train", "--resume", &p("paper"), "--rounds", "2"]);
    assert!(e.contains("--rounds 2") && e.contains("anneals"), "{e}");
}

#[test]
fn a_new_run_never_replaces_a_checkpoint_or_results_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    make_checkpoint(&ck);
    let data = mnist_dir();
    let before = snapshot(tmp.path());
    let base = [
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "sgd",
        "--epochs",
        "1",
        "--batch-size",
        "10",
        "--train-limit",
        "100",
        "--test-limit",
        "50",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut args = base.to_vec();
    args.extend(["--checkpoint-dir", ck.to_str().unwrap()]);
    let e = rso_fails(&args);
    assert!(
        e.contains("--checkpoint-dir") && e.contains("--resume") && e.contains("--force"),
        "{e}"
    );
    let state = ck.join("round-000001/state.json");
    let mut args = base.to_vec();
    args.extend(["--save-weights", state.to_str().unwrap()]);
    let e = rso_fails(&args);
    assert!(e.contains("--save-weights") && e.contains("--force"), "{e}");
    assert!(snapshot(tmp.path()) == before);
    // With --force the earlier checkpoint is replaced by the new run's.
    let mut args = base.to_vec();
    args.extend([
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--force",
        "--seed",
        "9",
    ]);
    rso_ok(&args);
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        text.contains("\"seed\": 9,") && text.contains("\"rounds\": 1,"),
        "{text}"
    );
}

/// Writes `params` of one-conv with `f` applied to every conv1 weight; returns the path.
fn one_conv_weights(dir: &Path, name: &str, f: impl Fn(usize) -> f32) -> PathBuf {
    let spec = ModelKind::OneConv.mnist();
    let mut p = Params::zeros(&spec);
    let i = p.index_of("conv1.weight").unwrap();
    for (k, w) in p.values[i].iter_mut().enumerate() {
        *w = f(k);
    }
    let path = dir.join(name);
    p.save(&path).unwrap();
    path
}

#[test]
fn foreign_or_non_finite_initial_weights_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_dir();
    let two_conv = tmp.path().join("two-conv.safetensors");
    Params::zeros(&ModelKind::TwoConv.mnist())
        .save(&two_conv)
        .unwrap();
    let truncated = tmp.path().join("truncated.safetensors");
    let bytes = std::fs::read(&two_conv).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let nan = one_conv_weights(tmp.path(), "nan.safetensors", |k| {
        if k == 7 {
            f32::NAN
        } else {
            0.1
        }
    });
    let inf = one_conv_weights(tmp.path(), "inf.safetensors", |k| {
        if k == 3 {
            f32::NEG_INFINITY
        } else {
            0.1
        }
    });
    let cases = [
        (two_conv, "two-conv.safetensors"),
        (truncated, "truncated.safetensors"),
        (nan, "conv1.weight[7] is NaN"),
        (inf, "conv1.weight[3] is -inf"),
    ];
    for (path, expect) in &cases {
        for optimizer in ["rso", "sgd"] {
            let out = tmp.path().join("out.csv");
            let ck = tmp.path().join("ck");
            let e = rso_fails(&[
                "train",
                "--model",
                "one-conv",
                "--optimizer",
                optimizer,
                "--rounds",
                "1",
                "--batch-size",
                "8",
                "--train-limit",
                "50",
                "--test-limit",
                "20",
                "--data-dir",
                data.to_str().unwrap(),
                "--init-weights",
                path.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--checkpoint-dir",
                ck.to_str().unwrap(),
            ]);
            assert!(e.contains(expect), "{e}");
            assert!(
                e.contains(path.file_name().unwrap().to_str().unwrap()),
                "{e}"
            );
            assert!(
                !out.exists() && !ck.exists(),
                "{optimizer} {path:?}: something was written"
            );
        }
    }
}

#[test]
fn a_loss_that_overflows_stops_training_with_a_clear_error() {
    // Finite weights so large that the logits overflow: the loss at W is NaN. RSO must report
    // divergence (it never accepts a NaN candidate, and a NaN at W is an error), SGD too.
    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_dir();
    let huge = one_conv_weights(tmp.path(), "huge.safetensors", |k| {
        if k % 2 == 0 {
            3e38
        } else {
            -3e38
        }
    });
    for (optimizer, expect) in [("rso", "training diverged"), ("sgd", "training diverged")] {
        let out = tmp.path().join(format!("{optimizer}.csv"));
        let ck = tmp.path().join(format!("ck-{optimizer}"));
        let e = rso_fails(&[
            "train",
            "--model",
            "one-conv",
            "--optimizer",
            optimizer,
            "--rounds",
            "1",
            "--batch-size",
            "8",
            "--train-limit",
            "50",
            "--test-limit",
            "20",
            "--data-dir",
            data.to_str().unwrap(),
            "--init-weights",
            huge.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--checkpoint-dir",
            ck.to_str().unwrap(),
        ]);
        assert!(
            e.contains(expect) && (e.contains("NaN") || e.contains("inf")),
            "{e}"
        );
        assert!(!out.exists(), "{optimizer}: results written");
        assert!(
            !ck.join("latest").exists(),
            "{optimizer}: a checkpoint was written"
        );
    }
}

#[test]
fn steps_that_overflow_f32_are_refused_and_a_diverged_round_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_dir();
    let out = tmp.path().join("out.csv");
    let weights = tmp.path().join("w.safetensors");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--model",
            "one-conv",
            "--rounds",
            "1",
            "--batch-size",
            "8",
            "--train-limit",
            "8",
            "--test-limit",
            "10",
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--save-weights",
            weights.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Perturbations whose draws overflow f32 are refused when the run is set up, naming the flag.
    for (extra, flag) in [
        (&["--optimizer", "rso", "--sigma", "1e39"][..], "--sigma"),
        (
            &["--optimizer", "rso", "--sigma-multiplier", "1e39"],
            "--sigma-multiplier",
        ),
        (&["--optimizer", "es", "--es-sigma", "1e39"], "--es-sigma"),
        (&["--optimizer", "spsa", "--spsa-eps", "1e39"], "--spsa-eps"),
        (&["--optimizer", "cfd", "--cfd-mu", "1e38"], "--cfd-mu"),
    ] {
        let args = base(extra);
        let e = rso_fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(e.contains(flag) && e.contains("too large"), "{e}");
        assert!(
            !out.exists() && !weights.exists(),
            "{extra:?}: something was written"
        );
    }
    // An SGD step so large that the logits overflow: the round is an error, and neither NaN
    // results nor weights are written.
    let args = base(&["--optimizer", "sgd", "--lr", "3e38"]);
    let e = rso_fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("training diverged") && e.contains("NaN"), "{e}");
    assert!(
        !out.exists() && !weights.exists(),
        "a diverged round was written"
    );
}

#[test]
fn every_cause_is_printed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_dir(&mnist_dir(), &data);
    // gzip's magic, then a compression method that does not exist.
    let mut bad = vec![0x1f, 0x8b, 0x09, 0, 0, 0, 0, 0, 0, 3];
    bad.extend_from_slice(b"abcdefgh");
    std::fs::write(data.join("train-labels-idx1-ubyte.gz"), bad).unwrap();
    let out = tmp.path().join("out.csv");
    let common = [
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "1",
    ];
    let mut args = common.to_vec();
    args.extend(["--batch-size", "8", "--data-dir", data.to_str().unwrap()]);
    args.extend(["--out", out.to_str().unwrap()]);
    let e = rso_fails(&args);
    assert_eq!(e.matches("invalid gzip header").count(), 1, "{e}");
    let missing = tmp.path().join("none.safetensors");
    let mnist = mnist_dir();
    let mut args = common.to_vec();
    args.extend(["--batch-size", "8", "--data-dir", mnist.to_str().unwrap()]);
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(["--init-weights", missing.to_str().unwrap()]);
    let e = rso_fails(&args);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
}

/// `rso train` of one-conv (RSO, 1 round, a small subset) with `extra`.
fn train_args(extra: &[&str]) -> Vec<String> {
    let data = mnist_dir();
    let mut v: Vec<String> = [
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
        "50",
        "--test-limit",
        "20",
        "--data-dir",
        data.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn outputs_are_checked_before_any_training() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    std::fs::create_dir(tmp.path().join("results")).unwrap();
    std::fs::create_dir(tmp.path().join("ck")).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--out".into(), t("results")], "is a directory"),
        (
            vec!["--out".into(), t("results"), "--force".into()],
            "is a directory",
        ),
        (
            vec!["--save-weights".into(), t("results"), "--force".into()],
            "is a directory",
        ),
        (
            vec![
                "--out".into(),
                t("x.csv"),
                "--save-weights".into(),
                t("x.csv"),
            ],
            "are the same file",
        ),
        (
            vec![
                "--out".into(),
                t("x.csv"),
                "--save-weights".into(),
                t("x.meta.json"),
            ],
            "are the same file",
        ),
        (
            vec![
                "--out".into(),
                t("ck/x.csv"),
                "--checkpoint-dir".into(),
                t("ck"),
            ],
            "inside --checkpoint-dir",
        ),
        (vec!["--out".into(), t("none/x.csv")], "does not exist"),
    ];
    for (extra, expect) in cases {
        let extra: Vec<&str> = strs(&extra);
        let e = rso_fails(&strs(&train_args(&extra)));
        assert!(e.contains(expect), "{extra:?}: {e}");
        // Nothing trained, nothing written.
        assert!(!e.contains("round 1"), "{e}");
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["ck", "results"], "{extra:?}");
        assert_eq!(std::fs::read_dir(tmp.path().join("ck")).unwrap().count(), 0);
    }
}

#[test]
fn outputs_never_replace_inputs_pipes_or_checkpoints_even_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let data = tmp.path().join("data");
    copy_dir(&mnist_dir(), &data);
    let init = one_conv_weights(tmp.path(), "init.safetensors", |k| 0.01 * (k % 5) as f32);
    let pipes = tempfile::tempdir().unwrap(); // (not in `snapshot`'s reach: a pipe blocks a read)
    let fifo = pipes.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let ck = tmp.path().join("ck");
    rso_ok(&strs(&train_args(&["--checkpoint-dir", &t("ck")])));
    let latest = ck.join("latest");
    let cases = [
        (vec!["--out", fifo.to_str().unwrap()], "not a regular file"),
        (vec!["--save-weights", "/dev/null"], "not a regular file"),
        (
            vec![
                "--init-weights",
                init.to_str().unwrap(),
                "--out",
                init.to_str().unwrap(),
            ],
            "is the --init-weights file",
        ),
        (
            vec!["--out", latest.to_str().unwrap()],
            "holds a checkpoint",
        ),
    ];
    let before = snapshot(tmp.path());
    for (extra, expect) in &cases {
        let mut extra = extra.clone();
        extra.push("--force");
        let e = rso_fails(&strs(&train_args(&extra)));
        assert!(e.contains(expect), "{extra:?}: {e}");
        assert!(
            snapshot(tmp.path()) == before,
            "{extra:?}: something changed"
        );
    }
    let labels = data.join("train-labels-idx1-ubyte.gz");
    let mut args = train_args(&["--out", labels.to_str().unwrap(), "--force"]);
    let d = args.iter().position(|a| a == "--data-dir").unwrap();
    args[d + 1] = data.to_str().unwrap().into();
    let e = rso_fails(&strs(&args));
    assert!(e.contains("a file of the dataset"), "{e}");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn weights_whose_destination_fails_after_training_are_kept() {
    // The directory of --save-weights disappears while the run trains: the run fails at the
    // end, and the trained weights go to $TMPDIR, named in the error.
    let tmp = tempfile::tempdir().unwrap();
    let gone = tmp.path().join("gone");
    let rescue = tmp.path().join("tmp");
    std::fs::create_dir_all(&gone).unwrap();
    std::fs::create_dir_all(&rescue).unwrap();
    let out = tmp.path().join("run.csv");
    let weights = gone.join("w.safetensors");
    let mut args = train_args(&[
        "--rso-eval",
        "reference",
        "--out",
        out.to_str().unwrap(),
        "--save-weights",
        weights.to_str().unwrap(),
    ]);
    let rounds = args.iter().position(|a| a == "--rounds").unwrap();
    args[rounds + 1] = "3".into();
    let child = common::rso_command()
        .args(&args)
        .env("TMPDIR", &rescue)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !out.exists() {
        assert!(std::time::Instant::now() < deadline, "no round finished");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::fs::remove_dir_all(&gone).unwrap();
    let done = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&done.stderr);
    assert!(!done.status.success(), "{e}");
    let saved: Vec<_> = std::fs::read_dir(&rescue)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1, "{e}");
    assert!(
        e.contains("--save-weights") && e.contains(saved[0].to_str().unwrap()),
        "{e}"
    );
    // The saved weights are the trained ones, good to start from.
    let again = train_args(&["--init-weights", saved[0].to_str().unwrap()]);
    rso_ok(&strs(&again));
}

#[test]
fn a_resumed_run_may_rewrite_its_own_results_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let out = tmp.path().join("run.csv");
    let other = tmp.path().join("other.csv");
    rso_ok(&strs(&train_args(&[
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])));
    rso_ok(&strs(&train_args(&["--out", other.to_str().unwrap()])));
    // Its own results file: rewritten; another run's: still needs --force.
    rso_ok(&[
        "train",
        "--resume",
        ck.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = rso_fails(&[
        "train",
        "--resume",
        ck.to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
    ]);
    assert!(e.contains("--force"), "{e}");
}

#[test]
fn paths_that_are_not_utf8_work_end_to_end() {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(OsStr::from_bytes(b"donn\xe9es"));
    copy_dir(&mnist_dir(), &dir);
    let init = one_conv_weights(&dir, "init.safetensors", |k| 0.01 * (k % 7) as f32);
    let p = |name: &str| dir.join(name).into_os_string();
    let run = |args: Vec<OsString>| {
        let out = common::rso_command().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    let mut args: Vec<OsString> = strs(&train_args(&[])).iter().map(OsString::from).collect();
    let data = args.iter().position(|a| a == "--data-dir").unwrap();
    args[data + 1] = dir.clone().into_os_string();
    for (flag, path) in [
        ("--out", p("run.csv")),
        ("--save-weights", p("w.safetensors")),
        ("--checkpoint-dir", p("ck")),
        ("--init-weights", init.into_os_string()),
    ] {
        args.push(flag.into());
        args.push(path);
    }
    run(args);
    assert!(dir.join("run.csv").is_file() && dir.join("w.safetensors").is_file());
    // The checkpoint keeps the paths as they are: resuming finds the data again.
    run(vec![
        "train".into(),
        "--resume".into(),
        p("ck"),
        "--out".into(),
        p("run.csv"),
    ]);
}

#[test]
fn nan_or_infinite_pixels_are_refused_by_the_engine() {
    // IDX and CIFAR files hold bytes, so non-finite pixels can only come from code using the
    // library; the engine refuses them with the set and the sample named.
    use clap::Parser;
    let cli = rso_cli::Cli::try_parse_from([
        "rso",
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "1",
        "--batch-size",
        "1",
    ])
    .unwrap();
    let rso_cli::Command::Train(args) = cli.command else {
        unreachable!()
    };
    let set = |n: usize| rso_data::Dataset {
        images: vec![0.5; n * 784],
        labels: vec![3; n],
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    let spec = ModelKind::OneConv.mnist();
    let params = Params::zeros(&spec);
    for (bad, which) in [
        (f32::NAN, "train"),
        (f32::INFINITY, "test"),
        (f32::NEG_INFINITY, "train"),
    ] {
        let mut split = rso_data::Split::new(set(4), set(3));
        let target = if which == "train" {
            &mut split.train
        } else {
            &mut split.test
        };
        target.images[2 * 784 + 100] = bad;
        let err = match rso_cli::train::build_network(&args, &spec, &params, split) {
            Ok(_) => panic!("{bad} pixel accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(which) && err.contains("sample 2"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn the_command_line_definition_is_consistent() {
    use clap::CommandFactory;
    rso_cli::Cli::command().debug_assert();
}
