//! Running a study's runs here: each as a child `rso train` process (a crash or a signal stays
//! inside its run), `--jobs` at a time, threads split so that jobs × threads ≤ cores.

use super::plan::{Plan, Run};
use super::{status, Outcome, Status, CHECKPOINT, EXIT_STOPPED, LOG, ROUNDS_CSV, STATUS};
use crate::provenance::utc_now;
use anyhow::{ensure, Context};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Process ids of the running children, for [`forward_signals`].
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Set once a stop signal arrived: no further run starts.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// The command line's global `--threads`, which overrides a plan's `threads`.
static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Makes `threads` (the global `--threads`) the thread count of every run this process starts,
/// over the plan's `threads` and the default split; the first call wins.
pub fn set_threads(threads: usize) {
    let _ = THREADS.set(threads);
}

/// The threads of each run: the global `--threads`, else the plan's, else `default`.
pub fn threads_or(plan: &Plan, default: impl FnOnce() -> usize) -> usize {
    THREADS
        .get()
        .copied()
        .or(plan.threads)
        .unwrap_or_else(default)
}

/// Passes SIGTERM, SIGINT and SIGUSR1 on to the running `rso train` children (which then stop
/// cleanly with status 75, recorded as `stopped`) and starts no further run; this process
/// itself goes on until they have ended and their outcomes are recorded. A Slurm batch script
/// signals only this process (`--signal=B:USR1@…`); a terminal's Ctrl-C reaches the children
/// too, which is harmless.
///
/// # Errors
/// When the handlers cannot be registered.
pub fn forward_signals() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            STOPPING.store(true, Ordering::SeqCst);
            let Ok(signal) = nix::sys::signal::Signal::try_from(sig) else {
                continue;
            };
            eprintln!("study: {signal} received; stopping the running runs (resume later)");
            for &pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
            }
        }
    });
    Ok(())
}

/// Logical cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Writes `<study>/manifest.csv` (the manifest with every run's status now) and its
/// `.meta.json`.
fn write_manifest(plan: &Plan) -> anyhow::Result<()> {
    std::fs::create_dir_all(&plan.dir).with_context(|| format!("{}", plan.dir.display()))?;
    let now = utc_now();
    let meta = crate::provenance::Meta::current(
        "study",
        "-",
        None,
        serde_json::json!({ "plan": plan.path.to_string_lossy() }),
        &now,
    );
    crate::output::write_results(
        &plan.dir.join("manifest.csv"),
        &super::manifest_csv(plan)?,
        &meta,
    )
}

/// Checks that every dataset directory the runs name exists (before starting any run).
pub fn check_data(plan: &Plan) -> anyhow::Result<()> {
    for run in &plan.runs {
        let args = super::plan::parse_train(&run.args)?;
        let dir = crate::train::data_dir(&args);
        ensure!(
            dir.is_dir(),
            "{}: run {} ({}): --data-dir {}: no such directory",
            plan.path.display(),
            run.index,
            run.id,
            dir.display()
        );
    }
    Ok(())
}

/// Runs every run of `plan` that is not done, `jobs` at a time; returns the exit status: 0 when
/// all are done, [`EXIT_STOPPED`] when some were stopped and none failed, else the number that
/// failed (at most 100).
pub fn run_pending(plan: &Plan, jobs: usize) -> anyhow::Result<i32> {
    ensure!(jobs >= 1, "--jobs must be at least 1");
    check_data(plan)?;
    let todo: Vec<&Run> = plan
        .runs
        .iter()
        .filter(|r| status(plan, r) != Status::Done)
        .collect();
    if jobs > cores() {
        eprintln!(
            "warning: --jobs {jobs} on {} cores: the runs share cores (their seconds are not \
             comparable with runs that had a core each)",
            cores()
        );
    }
    let threads = threads_or(plan, || (cores() / jobs.min(todo.len().max(1))).max(1));
    write_manifest(plan)?;
    println!(
        "study {}: {} runs, {} to run, {jobs} at a time, {threads} threads each",
        plan.dir.display(),
        plan.runs.len(),
        todo.len()
    );
    let queue = Mutex::new(todo.into_iter());
    let ended = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let next = queue.lock().expect("queue").next();
                let Some(run) = next else { break };
                if STOPPING.load(Ordering::SeqCst) {
                    break;
                }
                let outcome = run_one(plan, run, threads).unwrap_or_else(|e| Outcome {
                    status: Status::Failed,
                    exit_code: None,
                    signal: None,
                    error: Some(format!("{e:#}")),
                    ended: utc_now(),
                });
                println!(
                    "run {} ({}): {}{}",
                    run.index,
                    run.id,
                    outcome.status.name(),
                    outcome
                        .error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                ended.lock().expect("results").push(outcome.status);
            });
        }
    });
    let ended = ended.into_inner().expect("results");
    let failed = ended.iter().filter(|s| **s == Status::Failed).count();
    let stopped = ended.iter().filter(|s| **s == Status::Stopped).count();
    let done = plan
        .runs
        .iter()
        .filter(|r| status(plan, r) == Status::Done)
        .count();
    write_manifest(plan)?;
    println!(
        "study {}: {done} of {} done, {failed} failed, {stopped} stopped{}",
        plan.dir.display(),
        plan.runs.len(),
        if done < plan.runs.len() {
            " (run the same command again to run the rest; stopped runs resume)"
        } else {
            ""
        }
    );
    Ok(if failed > 0 {
        failed.min(100) as i32
    } else if stopped > 0 {
        EXIT_STOPPED
    } else {
        0
    })
}

/// The `rso` arguments of `run`'s next attempt: a resume when its checkpoint directory holds a
/// checkpoint, else a new run.
fn attempt_args(plan: &Plan, run: &Run, threads: usize) -> Vec<std::ffi::OsString> {
    let dir = plan.run_dir(run);
    let ck = dir.join(CHECKPOINT);
    let mut args: Vec<std::ffi::OsString> = vec!["--threads".into(), threads.to_string().into()];
    args.push("train".into());
    if ck.join(crate::checkpoint::LATEST).is_file() {
        args.extend(["--resume".into(), ck.into_os_string()]);
        // The data may have moved since; the checkpoint checks they are the same.
        if let Some(d) = run.setting.get("data_dir") {
            args.extend(["--data-dir".into(), d.into()]);
        }
    } else {
        args.extend(run.args.iter().map(Into::into));
        args.extend(["--checkpoint-dir".into(), ck.into_os_string()]);
    }
    args.extend([
        "--out".into(),
        dir.join(ROUNDS_CSV).into_os_string(),
        "--force".into(),
    ]);
    args
}

/// Runs (or resumes) `run` as a child process with `threads` threads; records and returns how
/// it ended.
///
/// # Errors
/// When its directory or log cannot be written, or the child cannot be started.
pub fn run_one(plan: &Plan, run: &Run, threads: usize) -> anyhow::Result<Outcome> {
    let dir = plan.run_dir(run);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let status_path = dir.join(STATUS);
    if status_path.exists() {
        std::fs::remove_file(&status_path).with_context(|| format!("{}", status_path.display()))?;
    }
    std::fs::write(dir.join("settings.json"), format!("{}\n", run.canonical))
        .with_context(|| format!("{}", dir.display()))?;
    let args = attempt_args(plan, run, threads);
    let log_path = dir.join(LOG);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}", log_path.display()))?;
    writeln!(
        log,
        "== {} rso {}",
        utc_now(),
        args.iter()
            .map(|a| crate::provenance::shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    let exe = std::env::current_exe().context("locating the rso program")?;
    let mut child = Command::new(exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .spawn()
        .context("starting rso train")?;
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child.id());
    let waited = child.wait();
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != child.id());
    let outcome = outcome_of(waited.context("waiting for rso train")?, &log_path);
    crate::output::write_file(
        &status_path,
        &format!(
            "{}\n",
            serde_json::to_string_pretty(&outcome).context("serialising the outcome")?
        ),
    )?;
    Ok(outcome)
}

/// How a child's exit reads: 0 done, [`EXIT_STOPPED`] or a terminating signal (SIGINT, SIGTERM,
/// SIGKILL, SIGHUP, SIGUSR1: a stop from outside) stopped, anything else failed with the last
/// `error:` line of its log.
fn outcome_of(st: std::process::ExitStatus, log: &Path) -> Outcome {
    #[cfg(unix)]
    let signal = std::os::unix::process::ExitStatusExt::signal(&st);
    #[cfg(not(unix))]
    let signal: Option<i32> = None;
    let code = st.code();
    let status = match (code, signal) {
        (Some(0), _) => Status::Done,
        (Some(EXIT_STOPPED), _) => Status::Stopped,
        (None, Some(1 | 2 | 9 | 10 | 15)) => Status::Stopped,
        _ => Status::Failed,
    };
    let error = (status == Status::Failed).then(|| {
        std::fs::read_to_string(log)
            .ok()
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| l.starts_with("error:"))
                    .map(String::from)
            })
            .unwrap_or_else(|| format!("exit status {st}"))
    });
    Outcome {
        status,
        exit_code: code,
        signal,
        error,
        ended: utc_now(),
    }
}
