//! Stopping `rso train` cleanly on SIGTERM, SIGINT or SIGUSR1 (what a terminal's Ctrl-C and
//! Slurm before a pre-emption or time limit send).
//!
//! A signal thread waits for them. On one it takes the lock every results and checkpoint write
//! holds ([`writing`]), so no file is left half-replaced (they are written atomically anyway),
//! prints where the run is and how to resume it, and exits with [`EXIT_STOPPED`] (75,
//! EX_TEMPFAIL). The round that was running is abandoned: the last complete round's checkpoint
//! stays as it is, and `--resume` redoes that round from its start, exactly as after a crash.

use std::path::PathBuf;
use std::sync::Mutex;

/// The exit status of a run stopped by a signal: `rso study` records it as `stopped` (resume
/// later), never as `failed`.
pub const EXIT_STOPPED: i32 = 75;

/// What the stop message says.
struct Progress {
    /// Rounds completed and the run's total.
    rounds: (usize, usize),
    /// The checkpoint directory, when the run has one.
    checkpoint: Option<PathBuf>,
}

static PROGRESS: Mutex<Progress> = Mutex::new(Progress {
    rounds: (0, 0),
    checkpoint: None,
});

/// Starts the signal thread (once per process).
///
/// # Errors
/// When the handlers cannot be registered.
pub fn install() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])?;
    INSTALLED.get_or_init(|| ());
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            // Held until exit: no write starts or is cut short after this point.
            let p = PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
            let name = match sig {
                SIGINT => "SIGINT",
                SIGTERM => "SIGTERM",
                _ => "SIGUSR1",
            };
            let (done, total) = p.rounds;
            let how = match &p.checkpoint {
                Some(dir) if done > 0 => format!(
                    "the checkpoint after round {done} is in {}; continue with the same command \
                     and --resume {} (keep its --out and --save-weights: they are not in the \
                     checkpoint)",
                    dir.display(),
                    dir.display()
                ),
                Some(_) => "no round had finished; start it again".to_string(),
                None => "no --checkpoint-dir: start it again (with --checkpoint-dir to be able \
                         to resume)"
                    .to_string(),
            };
            eprintln!("stopped by {name} after {done} of {total} rounds; {how}");
            std::process::exit(EXIT_STOPPED);
        }
    });
    Ok(())
}

/// Records the run's progress for the stop message.
pub fn set_progress(done: usize, total: usize, checkpoint: Option<PathBuf>) {
    let mut p = PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
    p.rounds = (done, total);
    p.checkpoint = checkpoint;
}

/// Writes the checkpoint after round `done` of `total` with `write` and, when that succeeds,
/// records the progress, as one step a stop cannot split (a stop message naming an older round
/// than the directory holds would send the user to start again).
///
/// # Errors
/// `write`'s.
pub fn checkpoint<E>(
    done: usize,
    total: usize,
    dir: &std::path::Path,
    write: impl FnOnce() -> Result<(), E>,
) -> Result<(), E> {
    let mut p = PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
    write()?;
    p.rounds = (done, total);
    p.checkpoint = Some(dir.to_path_buf());
    Ok(())
}

/// Runs `write` (a results or checkpoint write) so that a stop waits for it to finish.
pub fn writing<T>(write: impl FnOnce() -> T) -> T {
    let _guard = PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
    write()
}
