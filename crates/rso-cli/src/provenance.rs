//! Provenance of a results file: a `<name>.meta.json` beside every CSV the project writes
//! ([`Meta`]), saying which command made it, from which revision, on which machine and engine,
//! with which settings, and when.

use serde::Serialize;
use std::ffi::OsString;
use std::process::Command;

/// The `format` field of every `.meta.json`.
pub const META_FORMAT: &str = "rso-results-meta";
/// The version of the `.meta.json` layout.
pub const META_VERSION: u32 = 1;

/// Where and how a results file was produced; serialised as its `.meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Meta {
    /// Always [`META_FORMAT`].
    pub format: &'static str,
    /// Always [`META_VERSION`].
    pub version: u32,
    /// The command line as an argv array (arguments that are not UTF-8 converted lossily).
    pub command: Vec<String>,
    /// `git describe --always` of the source tree the program was built from, or `unknown`.
    pub revision: String,
    /// Whether tracked files of that tree differed from the revision at build time (`None`:
    /// unknown).
    pub dirty: Option<bool>,
    /// The machine that computed.
    pub machine: Machine,
    /// The engine that computed.
    pub engine: Engine,
    /// Versions of this program and of the libraries whose arithmetic the results depend on.
    pub versions: Versions,
    /// The seed of every random choice, when one seed made them all.
    pub seed: Option<u64>,
    /// Every setting the results depend on (presets resolved where the command resolves them).
    pub settings: serde_json::Value,
    /// When the command started (UTC, ISO 8601).
    pub started: String,
    /// When this version of the file was written (UTC, ISO 8601).
    pub ended: String,
    /// Anything else a reader must know (a converted file, a resumed run, one seed per row).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The machine a result was computed on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Machine {
    /// CPU model name (`/proc/cpuinfo`), or the architecture where that is unknown.
    pub cpu: String,
    /// Logical cores available to the process.
    pub cores: usize,
    /// Operating system and architecture.
    pub os: String,
    /// The widest SIMD level of the CPU the pure-Rust kernels support (`portable`, `avx2`,
    /// `avx512`): the machine's class.
    pub simd_class: String,
}

/// The engine a result was computed with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Engine {
    /// `cpu` (pure Rust) or `tch` (libtorch).
    pub backend: String,
    /// `cpu`, `cuda:N`.
    pub device: String,
    /// The SIMD level the pure-Rust kernels ran at (`RSO_SIMD` may lower it; results differ in
    /// the last bits between levels); `None` for libtorch.
    pub kernels: Option<String>,
    /// One line naming all of it ([`device_label`]), GPU model included.
    pub label: String,
}

/// Versions of the code that computed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Versions {
    /// The rso crates (one workspace version).
    pub rso: String,
    /// libtorch, when this program was built with it.
    pub libtorch: Option<String>,
}

impl Meta {
    /// The provenance of the running process for results computed by `backend` on `device`,
    /// started at `started`; the command's settings follow in `settings`.
    pub fn current(
        backend: &str,
        device: &str,
        seed: Option<u64>,
        settings: serde_json::Value,
        started: &str,
    ) -> Meta {
        Meta {
            format: META_FORMAT,
            version: META_VERSION,
            command: argv(std::env::args_os()),
            revision: env!("RSO_GIT_REVISION").to_string(),
            dirty: match env!("RSO_GIT_DIRTY") {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            machine: machine(),
            engine: Engine {
                backend: backend.to_string(),
                device: device.to_string(),
                kernels: (backend == "cpu").then(|| rso_cpu::simd::level().name().to_string()),
                label: device_label(backend, device),
            },
            versions: Versions {
                rso: env!("CARGO_PKG_VERSION").to_string(),
                #[cfg(feature = "tch")]
                libtorch: Some(rso_tch::LIBTORCH_VERSION.to_string()),
                #[cfg(not(feature = "tch"))]
                libtorch: None,
            },
            seed,
            settings,
            started: started.to_string(),
            ended: utc_now(),
            notes: Vec::new(),
        }
    }

    /// The revision with `-dirty` appended when the tree was dirty (for one-line captions).
    pub fn revision_label(&self) -> String {
        match self.dirty {
            Some(true) => format!("{}-dirty", self.revision),
            _ => self.revision.clone(),
        }
    }

    /// The command as one shell-quoted line (for captions; the argv array is the record).
    pub fn command_line(&self) -> String {
        self.command
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The JSON text of the `.meta.json` file.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("Meta serialises");
        text.push('\n');
        text
    }
}

/// `args` as strings, lossily where an argument is not UTF-8.
pub fn argv(args: impl IntoIterator<Item = OsString>) -> Vec<String> {
    args.into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// `arg` quoted for a POSIX shell where it needs it; control characters shown escaped (so a
/// caption stays one line).
pub fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        return arg.to_string();
    }
    let body: String = arg
        .chars()
        .map(|c| match c {
            '\'' => "'\\''".to_string(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect();
    format!("'{body}'")
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

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        simd_class: rso_cpu::simd::SimdLevel::detected().name().to_string(),
    }
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
    fn arguments_are_quoted_only_where_a_shell_needs_it_and_stay_on_one_line() {
        assert_eq!(shell_quote("--data-dir"), "--data-dir");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("mnist\ncopy"), "'mnist\\ncopy'");
        assert_eq!(shell_quote(""), "''");
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_arguments_are_kept_lossily() {
        use std::os::unix::ffi::OsStringExt;
        let args = vec![
            OsString::from("rso"),
            OsString::from_vec(b"donn\xe9es".to_vec()),
        ];
        assert_eq!(argv(args), ["rso", "donn\u{fffd}es"]);
    }

    #[test]
    fn utc_formatting_matches_known_instants() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_779_296), "2026-11-27T11:34:56Z");
    }
}
