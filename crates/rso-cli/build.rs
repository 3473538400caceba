//! Build-time facts for the `rso` binary (and the root package's benches, which share this
//! script):
//! - with the `tch` feature, an rpath to libtorch (the directory rso-tch's build script
//!   reports), so it runs without `LD_LIBRARY_PATH`;
//! - the git revision of the source tree it is built from (`RSO_GIT_REVISION`, and
//!   `RSO_GIT_DIRTY` = `true`/`false`/`unknown`: whether tracked files under `crates/`,
//!   `benches/` or the Cargo manifests differed from it), which results files record: the
//!   revision of the code that computed them, wherever the binary later runs (not of the
//!   working directory's repository).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_RSO_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let (revision, dirty) = revision(Path::new(&manifest));
    println!("cargo:rustc-env=RSO_GIT_REVISION={revision}");
    println!("cargo:rustc-env=RSO_GIT_DIRTY={dirty}");
}

/// `git` in `dir`, its trimmed stdout when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The tree's `git describe` and whether tracked files differ from it; asks cargo to run this
/// script again when either may have changed.
fn revision(manifest: &Path) -> (String, String) {
    let (Some(top), Some(git_dir)) = (
        git(manifest, &["rev-parse", "--show-toplevel"]),
        git(manifest, &["rev-parse", "--absolute-git-dir"]),
    ) else {
        return ("unknown".into(), "unknown".into());
    };
    let head_ref = git(manifest, &["symbolic-ref", "-q", "HEAD"]).unwrap_or_default();
    let watched = [
        format!("{git_dir}/HEAD"),
        format!("{git_dir}/index"),
        format!("{git_dir}/packed-refs"),
        format!("{git_dir}/{head_ref}"),
        format!("{top}/crates"),
        format!("{top}/benches"),
        format!("{top}/Cargo.toml"),
        format!("{top}/Cargo.lock"),
    ];
    // A path that does not exist would make cargo run the script on every build.
    for path in watched.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    let revision = git(manifest, &["describe", "--always", "--abbrev=12"])
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".into());
    // Only the files the program is built from count (results or notes being edited do not make
    // the binary dirty); without taking the index lock or refreshing it (which would change a
    // watched file).
    let dirty = match git(
        Path::new(&top),
        &[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "crates",
            "benches",
            "Cargo.toml",
            "Cargo.lock",
        ],
    ) {
        Some(s) => (!s.is_empty()).to_string(),
        None => "unknown".into(),
    };
    (revision, dirty)
}
