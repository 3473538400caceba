//! Provenance of a results file: the command that made it, the git revision, the machine and
//! device, and the date.

use std::process::Command;

/// Where and how a result was produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// The command line, as typed.
    pub command: String,
    /// `git describe --always --dirty` of the working tree, or `unknown`.
    pub revision: String,
    /// CPU model and core count of this machine.
    pub machine: String,
    /// Backend and device that computed.
    pub device: String,
    /// UTC date and time, ISO 8601.
    pub date: String,
}

impl Provenance {
    /// Provenance of the running process for results computed on `device`.
    pub fn current(device: &str) -> Provenance {
        let command = std::env::args()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect::<Vec<_>>()
            .join(" ");
        Provenance {
            command,
            revision: git_revision(),
            machine: machine(),
            device: device.to_string(),
            date: utc_now(),
        }
    }

    /// `# key: value` lines for the head of a CSV file.
    pub fn comment_lines(&self) -> String {
        format!(
            "# command: {}\n# revision: {}\n# machine: {}\n# device: {}\n# date: {}\n",
            self.command, self.revision, self.machine, self.device, self.date
        )
    }
}

/// How the provenance names a backend and device: for the pure-Rust backend also the SIMD
/// level its kernels ran at (`backend cpu, device cpu, kernels avx2`), for a CUDA device also
/// the card, as `nvidia-smi` names it when it is there
/// (`backend tch, device cuda:0 (NVIDIA H100 80GB HBM3)`).
pub fn device_label(backend: &str, device: &str) -> String {
    let mut label = format!("backend {backend}, device {device}");
    if backend == "cpu" {
        label.push_str(&format!(", kernels {}", rso_cpu::simd::level().name()));
    }
    if let Some(ordinal) = device.strip_prefix("cuda") {
        let ordinal = ordinal.strip_prefix(':').unwrap_or("0");
        let name = Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader", "-i", ordinal])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|n| !n.is_empty() && !n.contains('\n'));
        if let Some(name) = name {
            label.push_str(&format!(" ({name})"));
        }
    }
    label
}

fn git_revision() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores, {}", std::env::consts::OS)
}

/// Now, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs)
}

/// Formats seconds since the Unix epoch as an ISO 8601 UTC timestamp.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting_matches_known_instants() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_779_296), "2026-11-27T11:34:56Z");
    }
}
