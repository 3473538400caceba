//! `rso study` end to end on a small MNIST subset: a 3 × 2 plan run, killed, run again (only
//! what is missing runs, the interrupted run resumes), run a third time (nothing runs), and
//! collected (n = 2 everywhere); and `rso train`'s clean stop on a signal.

mod common;

use common::{mnist_dir, rso_command, rso_ok};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A 3-setting × 2-seed plan in `dir` (the reference path, so that a run lasts seconds).
fn write_plan(dir: &Path) -> PathBuf {
    let plan = dir.join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            "seeds = 2\nseed = 3\n\n[settings]\nmodel = \"one-conv\"\noptimizer = \"rso\"\n\
             rounds = 3\ntrain_limit = 300\ntest_limit = 100\nrso_eval = \"reference\"\n\
             data_dir = {:?}\n\n[[grid]]\nbatch_size = [8, 16, 32]\n",
            mnist_dir().to_str().unwrap()
        ),
    )
    .unwrap();
    plan
}

/// The manifest's (id, status) per row.
fn manifest(plan: &Path) -> Vec<(String, String)> {
    let text = rso_ok(&["study", "plan", plan.to_str().unwrap()]);
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[1].to_string(), r[2].to_string())
        })
        .collect()
}

/// How many attempts a run's log records.
fn attempts(study: &Path, id: &str) -> usize {
    std::fs::read_to_string(study.join("runs").join(id).join("log.txt"))
        .map(|t| t.lines().filter(|l| l.starts_with("== ")).count())
        .unwrap_or(0)
}

#[test]
fn a_study_runs_what_is_missing_resumes_what_was_interrupted_and_collects() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = write_plan(tmp.path());
    let study = tmp.path().join("plan");
    let runs = manifest(&plan);
    assert_eq!(runs.len(), 6);
    assert!(runs.iter().all(|(_, s)| s == "pending"));

    // Run it in its own process group, and kill the group (the parent and its running child,
    // as a terminal's Ctrl-C or a scheduler would) once a run is half-way.
    let mut child = rso_command()
        .args(["study", "run", plan.to_str().unwrap()])
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let half_way = loop {
        assert!(Instant::now() < deadline, "no run got half-way");
        let found = runs.iter().skip(1).find(|(id, _)| {
            let dir = study.join("runs").join(id);
            dir.join("checkpoint/latest").exists() && !dir.join("status.json").exists()
        });
        if let Some((id, _)) = found {
            break id.clone();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let after_kill = manifest(&plan);
    let status_of =
        |m: &[(String, String)], id: &str| m.iter().find(|(i, _)| i == id).unwrap().1.clone();
    assert_eq!(status_of(&after_kill, &runs[0].0), "done");
    assert_eq!(status_of(&after_kill, &half_way), "stopped");
    let done_before: Vec<String> = after_kill
        .iter()
        .filter(|(_, s)| s == "done")
        .map(|(id, _)| id.clone())
        .collect();

    // Again: only what is missing runs; the interrupted run resumes from its checkpoint.
    let out = rso_command()
        .args(["study", "run", plan.to_str().unwrap(), "--jobs", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(manifest(&plan).iter().all(|(_, s)| s == "done"));
    for id in &done_before {
        assert_eq!(attempts(&study, id), 1, "run {id} ran again");
    }
    assert_eq!(attempts(&study, &half_way), 2);
    let log = std::fs::read_to_string(study.join("runs").join(&half_way).join("log.txt")).unwrap();
    assert!(log.contains("resuming"), "{log}");

    // A third time: nothing to run. The global --threads is each run's thread count.
    let out = rso_ok(&["--threads", "7", "study", "run", plan.to_str().unwrap()]);
    assert!(out.contains("6 runs, 0 to run"), "{out}");
    assert!(out.contains("7 threads each"), "{out}");
    assert!(runs.iter().all(|(id, _)| attempts(&study, id) <= 2));

    // collect: 3 settings × 3 rounds, n = 2 everywhere.
    rso_ok(&["study", "collect", plan.to_str().unwrap()]);
    let summary = study.join("summary.csv");
    let (header, rows) = common::read_csv(&summary);
    assert_eq!(rows.len(), 9);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    for row in &rows {
        assert_eq!(row[col("n")], "2", "{row:?}");
        assert_eq!(row[col("runs")], "2", "{row:?}");
        assert!(!row[col("test_acc_sd")].is_empty(), "{row:?}");
    }
    let batches: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r[col("batch_size")].as_str()).collect();
    assert_eq!(batches.into_iter().collect::<Vec<_>>(), ["16", "32", "8"]);
    assert!(common::meta(&summary)["settings"]["runs_done"] == 6);
    assert!(std::fs::read_to_string(study.join("summary.svg"))
        .unwrap()
        .starts_with("<svg"));
}

#[test]
fn a_signal_stops_a_run_with_status_75_and_its_checkpoint_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let data = mnist_dir();
    let child = rso_command()
        .args([
            "train",
            "--model",
            "one-conv",
            "--optimizer",
            "rso",
            "--rounds",
            "4",
        ])
        .args([
            "--batch-size",
            "8",
            "--train-limit",
            "300",
            "--test-limit",
            "100",
        ])
        .args([
            "--rso-eval",
            "reference",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .arg("--checkpoint-dir")
        .arg(&ck)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ck.join("latest").exists() {
        assert!(Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("stopped by SIGTERM") && err.contains("--resume"),
        "{err}"
    );
    let resumed = rso_ok(&["train", "--resume", ck.to_str().unwrap()]);
    assert!(resumed.contains("RESULT "), "{resumed}");
}
