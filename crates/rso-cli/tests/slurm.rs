//! `rso study slurm` on a real Slurm, run (`--ignored`) by `scripts/test.sh` under
//! `scripts/slurm-local.sh`, which starts a one-node cluster and sets `SLURM_CONF` (and skips,
//! or fails with `RSO_REQUIRE_SLURM=1`, where it cannot). A 2-setting × 2-seed plan is submitted as the job array the command
//! wrote, one task is sent SIGUSR1 mid-run (as `--signal=B:USR1@120` would) and must requeue
//! itself and complete by resuming (the test lets it start at once instead of after Slurm's
//! 120 s hold of requeued jobs); the collect job, submitted with `afterany`, must find
//! n = 2 for both settings.

mod common;

use common::{mnist_dir, rso_ok};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn slurm(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until job `job` (all its tasks) has left the queue.
fn wait_for(job: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !slurm("squeue", &["-h", "-j", job]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "job {job} still queued: {}",
            slurm("squeue", &["-j", job])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs a Slurm cluster: scripts/slurm-local.sh cargo test -p rso-cli --test slurm -- --ignored"]
fn a_study_runs_as_a_slurm_job_array_and_a_stopped_task_requeues() {
    assert!(
        std::env::var_os("SLURM_CONF").is_some(),
        "no SLURM_CONF: run under scripts/slurm-local.sh"
    );
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("tiny.toml");
    std::fs::write(
        &plan,
        format!(
            "seeds = 2\n[settings]\nmodel = \"one-conv\"\noptimizer = \"rso\"\nrounds = 3\n\
             train_limit = 600\ntest_limit = 100\nrso_eval = \"reference\"\ndata_dir = {:?}\n\
             [[grid]]\nbatch_size = [8, 16]\n",
            mnist_dir().to_str().unwrap()
        ),
    )
    .unwrap();
    let plan_s = plan.to_str().unwrap();
    let printed = rso_ok(&[
        "study",
        "slurm",
        plan_s,
        "--cpus-per-task",
        "1",
        "--max-parallel",
        "2",
    ]);
    assert!(printed.contains("sbatch"), "{printed}");
    let study = tmp.path().join("tiny");
    let array = study.join("slurm/array.sbatch");
    let script = std::fs::read_to_string(&array).unwrap();
    assert!(script.contains("#SBATCH --array=1-4%2"), "{script}");

    let job = slurm("sbatch", &["--parsable", array.to_str().unwrap()]);
    let job = job.split(';').next().unwrap().to_string();
    let collect = slurm(
        "sbatch",
        &[
            "--parsable",
            &format!("--dependency=afterany:{job}"),
            study.join("slurm/collect.sbatch").to_str().unwrap(),
        ],
    );

    // Task 1, once its first round is checkpointed: the signal Slurm sends before a time limit.
    let first = manifest_id(plan_s, 1);
    let latest = study.join("runs").join(&first).join("checkpoint/latest");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !latest.exists() {
        assert!(Instant::now() < deadline, "task 1 never checkpointed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The task's own job id; scancel may report a transient error (and retry for a minute) even
    // when the signal got through, so the test looks for its effect instead.
    let task = slurm("squeue", &["-h", "-o", "%A", "-j", &format!("{job}_1")]);
    let _ = Command::new("timeout")
        .args(["10", "scancel", "--batch", "--signal=USR1", &task])
        .status();
    let log_path = study.join("runs").join(&first).join("log.txt");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("stopped by SIGUSR1")
    {
        assert!(Instant::now() < deadline, "task 1 did not stop on SIGUSR1");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Slurm holds a requeued batch job for 120 s (BeginTime); let it start now.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = slurm("squeue", &["-h", "-o", "%T", "-j", &task]);
        if state.starts_with("PENDING") {
            slurm(
                "scontrol",
                &["update", &format!("JobId={task}"), "StartTime=now"],
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task 1 was not requeued: {state}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    wait_for(&job, Duration::from_secs(300));
    wait_for(collect.split(';').next().unwrap(), Duration::from_secs(60));

    let log = std::fs::read_to_string(study.join("runs").join(&first).join("log.txt")).unwrap();
    assert_eq!(
        log.lines().filter(|l| l.starts_with("== ")).count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("stopped by SIGUSR1") && log.contains("resuming"),
        "{log}"
    );
    let outs: String = std::fs::read_dir(study.join("slurm"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    assert!(outs.contains("requeueing"), "{outs}");

    let (header, rows) = common::read_csv(&study.join("summary.csv"));
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert_eq!(rows.len(), 2 * 3, "{rows:?}");
    for row in &rows {
        assert_eq!(row[col("n")], "2", "{row:?}");
    }
    assert!(Path::new(&study.join("summary.svg")).exists());
}

/// The id of manifest row `index`.
fn manifest_id(plan: &str, index: usize) -> String {
    let text = rso_ok(&["study", "plan", plan]);
    let line = text.lines().nth(index).unwrap();
    line.split(',').nth(1).unwrap().to_string()
}
