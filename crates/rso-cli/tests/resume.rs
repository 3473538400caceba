//! Kill-and-resume: a run killed with SIGKILL in the middle of a round and resumed from its
//! checkpoint ends with the same weights (byte for byte) and the same per-round rows as a run
//! that was never interrupted.

mod common;

use common::{mnist_dir, rows_without_times, rso_command, rso_ok};
use std::path::Path;
use std::time::{Duration, Instant};

const ROUNDS: usize = 4;

/// The settings of the killed runs: one-conv, RSO with the `seed` preset, 4 rounds.
fn settings(data: &str) -> Vec<String> {
    [
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "4",
        "--batch-size",
        "8",
        "--train-limit",
        "300",
        "--test-limit",
        "100",
        "--seed",
        "17",
        // The reference path (three full forwards per weight) stays slow enough, whatever
        // faster paths come, for a kill to land in the middle of a round.
        "--rso-eval",
        "reference",
        "--data-dir",
        data,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The round number `DIR/latest` names, if any.
fn latest_round(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("latest")).ok()?;
    text.trim().strip_prefix("round-")?.parse().ok()
}

/// Spawns `rso args`, waits until the checkpoint in `ck` is past round `after`, lets the next
/// round run for about half of `round_secs`, and kills the process with SIGKILL. Returns the
/// round of the checkpoint it left.
fn kill_during_round(args: &[String], ck: &Path, after: usize, round_secs: f64) -> usize {
    let mut child = rso_command()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn rso");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !matches!(latest_round(ck), Some(r) if r > after) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("rso exited ({status}) before its checkpoint passed round {after}");
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint after round {after} in 300 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_secs_f64(round_secs / 2.0));
    assert!(
        child.try_wait().unwrap().is_none(),
        "rso finished before it could be killed; the test needs longer rounds"
    );
    child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success());
    let left = latest_round(ck).expect("a checkpoint survives the kill");
    eprintln!(
        "killed during round {} (checkpoint {left} intact)",
        left + 1
    );
    assert!(left > after && left < ROUNDS, "killed at checkpoint {left}");
    left
}

#[test]
fn killed_twice_and_resumed_run_equals_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let data = mnist_dir();
    let base = settings(data.to_str().unwrap());

    // The uninterrupted run.
    let mut args = base.clone();
    args.extend([
        "--out".into(),
        t("ref.csv"),
        "--save-weights".into(),
        t("ref.safetensors"),
    ]);
    rso_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let ref_rows = rows_without_times(&tmp.path().join("ref.csv"));
    assert_eq!(ref_rows.len(), ROUNDS + 1);
    // Its per-round time, to aim the kills at the middle of a round.
    let round_secs = {
        let secs: Vec<f64> = common::column(&tmp.path().join("ref.csv"), "seconds")
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        secs.iter().sum::<f64>() / secs.len() as f64
    };

    // The same run with checkpoints, killed during round 2 …
    let ck = tmp.path().join("ck");
    let mut args = base.clone();
    args.extend([
        "--checkpoint-dir".into(),
        t("ck"),
        "--out".into(),
        t("run.csv"),
    ]);
    let left = kill_during_round(&args, &ck, 0, round_secs);

    // … resumed and killed again during a later round …
    let resume = |extra: &[&str]| {
        let mut v = vec![
            "train".to_string(),
            "--resume".into(),
            t("ck"),
            "--out".into(),
            t("run.csv"),
            "--force".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let again = if left + 1 < ROUNDS {
        kill_during_round(&resume(&[]), &ck, left, round_secs)
    } else {
        left
    };
    assert!(again >= left);

    // … and resumed to the end.
    let out = rso_ok(
        &resume(&["--save-weights", &t("resumed.safetensors")])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        out.contains(&format!(
            "resuming {}: {again}/{ROUNDS} rounds done",
            t("ck")
        )),
        "{out}"
    );
    assert!(out.lines().last().unwrap().starts_with("RESULT "), "{out}");

    let reference = std::fs::read(tmp.path().join("ref.safetensors")).unwrap();
    let resumed = std::fs::read(tmp.path().join("resumed.safetensors")).unwrap();
    assert!(
        reference == resumed,
        "resumed weights differ from the uninterrupted run's"
    );
    assert_eq!(rows_without_times(&tmp.path().join("run.csv")), ref_rows);
    let notes = common::meta(&tmp.path().join("run.csv"))["notes"].to_string();
    assert!(notes.contains("resumed after round"), "{notes}");
    // The checkpoint directory holds the final checkpoint only.
    assert_eq!(latest_round(&ck), Some(ROUNDS));
    let mut names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".lock", "latest", "round-000004"]);

    // Resuming a finished run trains nothing and reproduces the final results.
    let out = rso_ok(
        &resume(&["--save-weights", &t("again.safetensors")])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        out.contains(&format!("{ROUNDS}/{ROUNDS} rounds done")),
        "{out}"
    );
    assert!(std::fs::read(tmp.path().join("again.safetensors")).unwrap() == reference);
    assert_eq!(rows_without_times(&tmp.path().join("run.csv")), ref_rows);
}

/// Runs `settings` (a `train` command line of `rounds` rounds, without annealing, so that a
/// shorter run's checkpoint equals the longer run's one) uninterrupted, and again as a 1-round
/// run whose checkpoint is then resumed to `rounds`; compares weights and rows. Rounds that are
/// too short to be killed reliably resume through the same path as the kill test's.
fn resume_at_a_round_boundary(settings: &[&str], rounds: usize) {
    resume_after(settings, 1, rounds);
}

/// [`resume_at_a_round_boundary`] from the checkpoint after round `after` of `rounds`; returns
/// the resumed run's CSV lines without the time columns (header first).
fn resume_after(settings: &[&str], after: usize, rounds: usize) -> Vec<String> {
    assert!(after >= 1 && after < rounds);
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let data = mnist_dir();
    let d = data.to_str().unwrap();
    let rounds_s = rounds.to_string();
    let mut a = vec!["train", "--rounds", &rounds_s, "--data-dir", d];
    a.extend_from_slice(settings);
    let (ref_csv, ref_w) = (t("ref.csv"), t("ref.safetensors"));
    a.extend(["--out", &ref_csv, "--save-weights", &ref_w]);
    rso_ok(&a);
    // The checkpoint after round `after`, as the full run would have left it: its state says
    // `rounds` rounds.
    let ck = t("ck");
    let after_s = after.to_string();
    let mut b = vec!["train", "--rounds", &after_s, "--data-dir", d];
    b.extend_from_slice(settings);
    b.extend(["--checkpoint-dir", &ck]);
    rso_ok(&b);
    let state_path = tmp.path().join(format!("ck/round-{after:06}/state.json"));
    let state = std::fs::read_to_string(&state_path).unwrap();
    let written = format!("\"rounds\": {after},");
    assert!(state.contains(&written), "{state}");
    let claimed = format!("\"rounds\": {rounds},");
    std::fs::write(&state_path, state.replace(&written, &claimed)).unwrap();

    let (res_csv, res_w) = (t("res.csv"), t("res.safetensors"));
    rso_ok(&[
        "train",
        "--resume",
        &ck,
        "--out",
        &res_csv,
        "--save-weights",
        &res_w,
    ]);
    assert!(
        std::fs::read(&ref_w).unwrap() == std::fs::read(&res_w).unwrap(),
        "resumed weights differ from the uninterrupted run's"
    );
    let rows = rows_without_times(Path::new(&res_csv));
    assert_eq!(rows, rows_without_times(Path::new(&ref_csv)));
    rows
}

#[test]
fn a_run_with_a_validation_split_resumes_exactly() {
    // Checkpointed after 2 of 3 rounds: the validation cells of the checkpointed rows come back
    // from the checkpoint bit for bit, and the resumed round holds the same samples out.
    let rows = resume_after(
        &[
            "--model",
            "one-conv",
            "--optimizer",
            "rso",
            "--anneal",
            "none",
            "--batch-size",
            "16",
            "--train-limit",
            "400",
            "--val-split",
            "80",
            "--test-limit",
            "100",
            "--seed",
            "21",
        ],
        2,
        3,
    );
    // Every row has its validation cells (the last two columns).
    assert_eq!(rows.len(), 4);
    assert!(rows[0].ends_with(",val_loss,val_acc"), "{}", rows[0]);
    for row in &rows[1..] {
        let cells: Vec<&str> = row.rsplitn(3, ',').collect();
        assert!(cells[..2].iter().all(|c| c.parse::<f64>().is_ok()), "{row}");
    }
}

#[test]
fn rso_with_the_default_candidate_path_resumes_exactly() {
    // The engine's fast (incremental) candidate path may keep caches; a resumed run rebuilds
    // them from the checkpoint's weights and must still match.
    resume_at_a_round_boundary(
        &[
            "--model",
            "one-conv",
            "--optimizer",
            "rso",
            "--batch-size",
            "8",
            "--train-limit",
            "300",
            "--test-limit",
            "100",
            "--seed",
            "18",
        ],
        3,
    );
}

#[test]
fn sgd_resumes_exactly() {
    resume_at_a_round_boundary(
        &[
            "--model",
            "one-conv",
            "--optimizer",
            "sgd",
            "--batch-size",
            "16",
            "--lr",
            "0.05",
            "--train-limit",
            "400",
            "--test-limit",
            "100",
            "--seed",
            "4",
        ],
        3,
    );
}

/// The forward-only methods other than RSO, on the settings of the SGD test; ES carries its σ
/// and 1/5-rule counts across rounds in the checkpoint.
fn forward_only(method: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--model",
        "one-conv",
        "--batch-size",
        "16",
        "--train-limit",
        "400",
        "--test-limit",
        "100",
        "--seed",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(method.iter().map(|s| s.to_string()));
    v
}

#[test]
fn spsa_es_and_cfd_resume_exactly() {
    for method in [
        &["--optimizer", "spsa", "--lr", "0.001"][..],
        &["--optimizer", "es", "--es-sigma", "0.02"],
        &["--optimizer", "cfd", "--cfd-block", "3", "--lr", "0.5"],
    ] {
        let args = forward_only(method);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        resume_at_a_round_boundary(&args, 2);
    }
}

/// A budget that ends the run in its second round: resumed from round 1, the run stops at the
/// same step as the uninterrupted one; resumed once more, it trains nothing.
#[test]
fn a_forward_pass_budget_ends_a_resumed_run_where_it_ends_the_whole_one() {
    // CFD at batch 16 on one-conv: a round is 3·16·7890 = 378 720 forward-equivalents, a block
    // of 3 coordinates 3·16·3 = 144.
    let budget = ["--max-forward-equivalents", "600000"];
    let mut method = vec!["--optimizer", "cfd", "--cfd-block", "3", "--lr", "0.5"];
    method.extend(budget);
    let args = forward_only(&method);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    resume_at_a_round_boundary(&args, 3);

    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_dir();
    let ck = tmp.path().join("ck");
    let (ck_s, csv) = (
        ck.to_str().unwrap().to_string(),
        tmp.path().join("a.csv").to_str().unwrap().to_string(),
    );
    let mut run = vec![
        "train",
        "--rounds",
        "3",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    run.extend(args.iter().copied());
    run.extend(["--checkpoint-dir", &ck_s, "--out", &csv]);
    rso_ok(&run);
    let cumulative = common::column(Path::new(&csv), "cumulative_forward_equivalents");
    assert_eq!(cumulative.len(), 2, "the budget ends the run in round 2");
    let cumulative: u64 = cumulative[1].parse().unwrap();
    assert!(
        cumulative <= 600_000 && cumulative + 144 > 600_000,
        "{cumulative}"
    );
    let state = std::fs::read_to_string(ck.join("round-000002/state.json")).unwrap();
    assert!(state.contains("\"budget_reached\": true"), "{state}");
    let again = tmp.path().join("b.csv").to_str().unwrap().to_string();
    rso_ok(&["train", "--resume", &ck_s, "--out", &again]);
    assert_eq!(
        rows_without_times(Path::new(&again)),
        rows_without_times(Path::new(&csv))
    );
    assert!(!ck.join("round-000003").exists());

    // A budget of exactly one round (CFD with k = 1 visits every coordinate once, and 16
    // divides the 400 samples): round 2 has nothing left; the run, and its resumed copy, end
    // with one row, and the resumed one still writes its --out.
    let exact = (3 * 16 * 7890).to_string();
    let one = forward_only(&[
        "--optimizer",
        "cfd",
        "--lr",
        "0.5",
        "--max-forward-equivalents",
        &exact,
    ]);
    let ck2 = tmp.path().join("ck2").to_str().unwrap().to_string();
    let first = tmp.path().join("c.csv").to_str().unwrap().to_string();
    let mut run = vec![
        "train",
        "--rounds",
        "3",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    run.extend(one.iter().map(String::as_str));
    run.extend(["--checkpoint-dir", &ck2, "--out", &first]);
    rso_ok(&run);
    let fe = common::column(Path::new(&first), "cumulative_forward_equivalents");
    assert_eq!(fe, [exact]);
    let again = tmp.path().join("d.csv").to_str().unwrap().to_string();
    rso_ok(&["train", "--resume", &ck2, "--out", &again]);
    assert_eq!(
        rows_without_times(Path::new(&again)),
        rows_without_times(Path::new(&first))
    );
}

/// While a run writes checkpoints into a directory, a second run — a `--resume` or a new run
/// with `--force` — is refused with a one-line error and changes nothing there; once the first
/// run is gone (killed), the directory can be resumed.
#[test]
fn a_checkpoint_directory_has_one_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let ck_s = ck.to_str().unwrap().to_string();
    let data = mnist_dir();
    let mut args = settings(data.to_str().unwrap());
    args.extend(["--checkpoint-dir".into(), ck_s.clone()]);
    let mut child = rso_command()
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn rso");
    let deadline = Instant::now() + Duration::from_secs(300);
    while latest_round(&ck).is_none() {
        assert!(child.try_wait().unwrap().is_none(), "rso exited early");
        assert!(Instant::now() < deadline, "no checkpoint in 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = common::rso_fails(&["train", "--resume", &ck_s]);
    assert!(
        err.contains("another rso run is writing checkpoints"),
        "{err}"
    );
    let mut second = args.clone();
    second.push("--force".into());
    let err = common::rso_fails(&second.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("another rso run is writing checkpoints"),
        "{err}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first run ended before the refusals were checked; the test needs longer rounds"
    );
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    // The lock went with the process.
    let out = rso_ok(&["train", "--resume", &ck_s]);
    assert!(out.lines().last().unwrap().starts_with("RESULT "), "{out}");
    assert_eq!(latest_round(&ck), Some(ROUNDS));
}

/// A checkpoint written by the first checkpoint format (version 1, committed in
/// `tests/fixtures/checkpoint-v1`: `rso train --model one-conv --optimizer rso --rounds 3
/// --batch-size 10 --train-limit 3000 --test-limit 100 --seed 17 --checkpoint-dir …` at
/// revision f96be87, killed during round 2) still resumes: the run ends with the weights and
/// rows of an uninterrupted run of today's program, its round-1 row gains the study columns
/// (derivable here: every minibatch held 10 samples), and the checkpoints it writes are of
/// today's version.
#[test]
fn a_version_1_checkpoint_resumes_and_gains_the_study_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-v1");
    let ck = tmp.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    std::fs::copy(fixture.join("latest"), ck.join("latest")).unwrap();
    std::fs::create_dir(ck.join("round-000001")).unwrap();
    for f in ["state.json", "weights.safetensors"] {
        std::fs::copy(
            fixture.join("round-000001").join(f),
            ck.join("round-000001").join(f),
        )
        .unwrap();
    }
    let data = mnist_dir();
    let data = data.to_str().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let (resumed, fresh) = (t("resumed.csv"), t("fresh.csv"));
    rso_ok(&[
        "train",
        "--resume",
        ck.to_str().unwrap(),
        "--data-dir",
        data,
        "--out",
        &resumed,
        "--save-weights",
        &t("resumed.safetensors"),
    ]);
    rso_ok(&[
        "train",
        "--model",
        "one-conv",
        "--optimizer",
        "rso",
        "--rounds",
        "3",
        "--batch-size",
        "10",
        "--train-limit",
        "3000",
        "--test-limit",
        "100",
        "--seed",
        "17",
        "--data-dir",
        data,
        "--out",
        &fresh,
        "--save-weights",
        &t("fresh.safetensors"),
    ]);
    let rows = rows_without_times(Path::new(&resumed));
    assert_eq!(rows.len(), 4);
    assert_eq!(rows, rows_without_times(Path::new(&fresh)));
    assert_eq!(
        std::fs::read(t("resumed.safetensors")).unwrap(),
        std::fs::read(t("fresh.safetensors")).unwrap()
    );
    let fe = common::column(Path::new(&resumed), "forward_equivalents");
    assert_eq!(fe[0], (3 * 10 * 7890).to_string());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("round-000003").join("state.json")).unwrap())
            .unwrap();
    assert_eq!(state["version"], 3);
    // Where the run began stays recorded (version 1's one-line command).
    assert!(state["origin"]["command"]
        .as_str()
        .is_some_and(|c| c.contains("--seed 17")));
    let notes = common::meta(Path::new(&resumed))["notes"].to_string();
    assert!(notes.contains("resumed after round 1"), "{notes}");
}
