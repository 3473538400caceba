//! `rso study slurm`: a ready `sbatch` script running a study's runs that are not done as a
//! Slurm job array, and a collect job to run after it. Slurm places, retries and throttles; this
//! only writes the scripts.
//!
//! - The array's task ids are **manifest row numbers** (`--array=3,5,9-12%K`), and each task
//!   runs `rso study run-one PLAN --index $SLURM_ARRAY_TASK_ID` with absolute paths.
//! - `--signal=B:USR1@120` asks Slurm to signal the batch shell two minutes before the time
//!   limit; the script passes it on to `rso`, whose run stops cleanly (status 75), and the task
//!   then requeues itself (`scontrol requeue`, allowed by `--requeue`): the requeued task
//!   resumes from the run's checkpoint.
//! - The collect job is submitted with `--dependency=afterany:<array job>`, so it runs even
//!   when some tasks failed and reports what is missing.

use super::plan::Plan;
use super::{status, Status};
use crate::args::StudySlurmArgs;
use crate::provenance::shell_quote;
use anyhow::Context;
use std::fmt::Write as _;
use std::path::Path;

/// `1,2,3,5,7,8` → `1-3,5,7-8`.
pub fn array_ranges(rows: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let start = rows[i];
        let mut end = start;
        while i + 1 < rows.len() && rows[i + 1] == end + 1 {
            i += 1;
            end = rows[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// `#SBATCH` lines for the options given.
fn resource_lines(a: &StudySlurmArgs) -> String {
    let mut s = String::new();
    let opts = [
        ("partition", &a.partition),
        ("account", &a.account),
        ("qos", &a.qos),
        ("mem", &a.mem),
        ("time", &a.time),
    ];
    for (name, value) in opts {
        if let Some(v) = value {
            let _ = writeln!(s, "#SBATCH --{name}={v}");
        }
    }
    if let Some(c) = a.cpus_per_task {
        let _ = writeln!(s, "#SBATCH --cpus-per-task={c}");
    }
    s
}

/// `path` absolute, quoted for the shell.
fn abs(path: &Path) -> anyhow::Result<String> {
    let p = std::path::absolute(path).with_context(|| format!("{}", path.display()))?;
    Ok(shell_quote(&p.to_string_lossy()))
}

/// Writes `<study>/slurm/array.sbatch` and `collect.sbatch` for the runs of `plan` that are not
/// done and prints how to submit them; prints only that nothing is left when all are done.
///
/// # Errors
/// When the scripts cannot be written or the program's path is unknown.
pub fn write_scripts(plan: &Plan, a: &StudySlurmArgs) -> anyhow::Result<()> {
    let pending: Vec<&super::plan::Run> = plan
        .runs
        .iter()
        .filter(|r| status(plan, r) != Status::Done)
        .collect();
    let rows: Vec<usize> = pending.iter().map(|r| r.index).collect();
    let dir = plan.dir.join("slurm");
    if rows.is_empty() {
        // Scripts of an earlier call would submit runs that are done now.
        for name in ["array.sbatch", "collect.sbatch"] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        println!(
            "study {}: every run is done; nothing to submit",
            plan.dir.display()
        );
        return Ok(());
    }
    // Row → id, so a task refuses to run when the plan changed after the script was written.
    let ids: Vec<String> = pending
        .iter()
        .map(|r| format!("[{}]={}", r.index, r.id))
        .collect();
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let exe = std::env::current_exe().context("locating the rso program")?;
    let (rso, plan_path, study) = (abs(&exe)?, abs(&plan.path)?, abs(&plan.dir)?);
    let logs = abs(&dir)?;
    let throttle = a.max_parallel.map(|k| format!("%{k}")).unwrap_or_default();
    let name = plan
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "study".into());
    let array = format!(
        "#!/bin/bash\n\
         #SBATCH --job-name=rso-{name}\n\
         #SBATCH --array={}{throttle}\n\
         #SBATCH --output={logs}/%A_%a.out\n\
         #SBATCH --open-mode=append\n\
         #SBATCH --signal=B:USR1@120\n\
         #SBATCH --requeue\n\
         {}\
         # Written by `rso study slurm` for the runs of the study that were not done.\n\
         # Task id = manifest row (`rso study plan`). USR1 (two minutes before the time limit) is\n\
         # passed on to rso, whose run stops cleanly with status 75; the task then requeues itself\n\
         # and, requeued, resumes from the run's checkpoint.\n\
         set -u\n\
         ids=({})\n\
         {rso} study run-one {plan_path} --out-dir {study} --index \"$SLURM_ARRAY_TASK_ID\" \\\n\
         \x20   --id \"${{ids[$SLURM_ARRAY_TASK_ID]}}\" &\n\
         pid=$!\n\
         trap 'kill -USR1 \"$pid\" 2>/dev/null' USR1 TERM\n\
         # `wait` returns early when a trapped signal arrives: wait until rso has ended.\n\
         while wait \"$pid\"; rc=$?; kill -0 \"$pid\" 2>/dev/null; do :; done\n\
         wait \"$pid\" 2>/dev/null; rc=$?\n\
         if [ \"$rc\" -eq 75 ]; then\n\
         \x20   echo \"rso stopped early; requeueing $SLURM_JOB_ID\"\n\
         \x20   scontrol requeue \"$SLURM_JOB_ID\"\n\
         fi\n\
         exit \"$rc\"\n",
        array_ranges(&rows),
        resource_lines(a),
        ids.join(" "),
    );
    let collect = format!(
        "#!/bin/bash\n\
         #SBATCH --job-name=rso-{name}-collect\n\
         #SBATCH --output={logs}/collect_%j.out\n\
         {}\
         # Runs after the array (afterany: also when tasks failed); lists missing runs.\n\
         {rso} study collect {plan_path} --out-dir {study}\n",
        resource_lines(&StudySlurmArgs {
            cpus_per_task: None,
            max_parallel: None,
            ..a.clone()
        }),
    );
    let (array_path, collect_path) = (dir.join("array.sbatch"), dir.join("collect.sbatch"));
    crate::output::write_file(&array_path, &array)?;
    crate::output::write_file(&collect_path, &collect)?;
    println!(
        "wrote {} ({} runs) and {}; submit with:\n  job=$(sbatch --parsable {})\n  sbatch --dependency=afterany:\"${{job%%;*}}\" {}",
        array_path.display(),
        rows.len(),
        collect_path.display(),
        abs(&array_path)?,
        abs(&collect_path)?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_slurm_ranges() {
        assert_eq!(array_ranges(&[1, 2, 3, 5, 7, 8]), "1-3,5,7-8");
        assert_eq!(array_ranges(&[4]), "4");
        assert_eq!(array_ranges(&[]), "");
        assert_eq!(array_ranges(&[2, 4, 6]), "2,4,6");
    }
}
