//! Makes binaries that link libtorch find it at run time without `LD_LIBRARY_PATH`.
//!
//! torch-sys reports the libtorch library directory as `DEP_TCH_LIBTORCH_LIB` (its `links` key
//! is `tch`). Link arguments from a library's build script only reach that package's own tests,
//! examples and benches, so this script
//! - adds `-Wl,-rpath,<dir>` for this crate's own test binaries, and
//! - re-exports the directory as `cargo:libtorch_lib`, which a dependent's build script reads as
//!   `DEP_RSO_TCH_LIBTORCH_LIB` to set the same rpath on its binaries.
//!
//! The directory is canonicalised: `.venv/libtorch/lib` is a symlink, and the loader resolves
//! `$ORIGIN` of the libraries found through it from the path as given.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Some(dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its libtorch directory; no rpath set");
        println!("cargo:rustc-env=RSO_LIBTORCH_VERSION=unknown");
        return;
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| std::path::PathBuf::from(&dir));
    // The PyTorch wheel's libtorch (scripts/setup-libtorch.sh) names its version in
    // `torch/version.py`, beside `torch/lib`; results files record it.
    let version_py = dir.join("../version.py");
    if version_py.exists() {
        println!("cargo:rerun-if-changed={}", version_py.display());
    }
    let version = std::fs::read_to_string(&version_py)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RSO_LIBTORCH_VERSION={version}");
    let dir = dir.display();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    println!("cargo:libtorch_lib={dir}");
}
