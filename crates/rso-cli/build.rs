//! With the `tch` feature, gives the `rso` binary an rpath to libtorch (the directory rso-tch's
//! build script reports), so it runs without `LD_LIBRARY_PATH`. A no-op otherwise.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_RSO_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
