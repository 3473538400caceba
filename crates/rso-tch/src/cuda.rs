//! Making libtorch's CUDA support visible at run time.
//!
//! Nothing in a Rust binary references a symbol of `libtorch_cuda.so`, so as-needed linking
//! drops it and libtorch then reports no CUDA device even on a GPU machine (GPU.md). Rather than
//! link it with `--no-as-needed` (link arguments from a library's build script do not reach
//! dependent binaries, and a binary with `libtorch_cuda.so` as a hard dependency would not even
//! start where the CUDA runtime libraries cannot be found), the `cuda` feature loads it with
//! `dlopen(RTLD_NOW | RTLD_GLOBAL)` the first time this crate is used:
//!
//! 1. the `libtorch_cuda.so` beside the `libtorch_cpu.so` this process already mapped (read from
//!    `/proc/self/maps`), or by plain name (`LD_LIBRARY_PATH`, the binary's rpath) when that
//!    directory is unknown;
//! 2. if that fails because the CUDA runtime libraries are not on the loader's path (the pip
//!    wheel keeps them in `site-packages/nvidia/*/lib` and relies on Python to preload them),
//!    those libraries are preloaded from there, in the order `torch/__init__.py` uses, and the
//!    load is retried.
//!
//! 3. after a successful load, TF32 is switched off for cuDNN convolutions, which libtorch
//!    enables by default for f32 (a 10-bit mantissa: ~1e-3 relative error, far outside the
//!    cross-engine tolerances). tch has no binding for it, so [`disable_cudnn_tf32`] calls
//!    `at::Context::setAllowTF32CuDNN(false)` through its exported symbol and reads the precision
//!    back (Python's `torch.backends.cudnn.allow_tf32 = False`); if that is impossible it disables cuDNN altogether (exact, slower native kernels).
//!    cuBLAS matmuls stay at libtorch's default, full f32.
//!
//! libtorch caches its CUDA hooks the first time any code asks for them (a CPU convolution does),
//! so the load must happen before any tensor operation: every public entry point of this crate
//! calls [`ensure_loaded`] first. Code that uses `tch` directly should call
//! [`crate::cuda_available`] before its first tensor operation.

use std::sync::OnceLock;

/// The outcome of the one load attempt: `Err` holds why CUDA support could not be loaded.
static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` once (with the `cuda` feature); the error says why it is missing.
pub(crate) fn ensure_loaded() -> Result<(), String> {
    LOADED.get_or_init(load).clone()
}

#[cfg(not(all(feature = "cuda", target_os = "linux")))]
fn load() -> Result<(), String> {
    if cfg!(feature = "cuda") {
        Err("loading libtorch_cuda at run time is only implemented on Linux".into())
    } else {
        Err("this build of rso-tch was made without its `cuda` feature".into())
    }
}

#[cfg(all(feature = "cuda", target_os = "linux"))]
fn load() -> Result<(), String> {
    use std::path::PathBuf;

    let torch_lib: Option<PathBuf> =
        std::fs::read_to_string("/proc/self/maps")
            .ok()
            .and_then(|maps| {
                maps.lines()
                    .filter_map(|l| l.split_whitespace().nth(5))
                    .find(|p| p.ends_with("/libtorch_cpu.so"))
                    .and_then(|p| PathBuf::from(p).parent().map(PathBuf::from))
            });
    let target = match &torch_lib {
        Some(dir) => dir.join("libtorch_cuda.so"),
        None => PathBuf::from("libtorch_cuda.so"),
    };
    if torch_lib.is_some() && !target.exists() {
        return Err(format!(
            "{} does not exist (a CPU-only libtorch?)",
            target.display()
        ));
    }
    let first = match dlopen(&target) {
        Ok(()) => {
            disable_cudnn_tf32();
            return Ok(());
        }
        Err(e) => e,
    };
    // The pip wheel's layout: site-packages/torch/lib → site-packages/nvidia/*/lib.
    let Some(site) = torch_lib
        .as_ref()
        .and_then(|d| d.parent())
        .and_then(|t| t.parent())
    else {
        return Err(format!("cannot load {}: {first}", target.display()));
    };
    preload_wheel_cuda_libs(&site.join("nvidia"));
    dlopen(&target).map_err(|e| format!("cannot load {}: {e}", target.display()))?;
    disable_cudnn_tf32();
    Ok(())
}

/// Whether TF32 is off for cuDNN convolutions (`None` when the precision could not be read).
#[cfg(all(feature = "cuda", target_os = "linux"))]
static TF32_OFF: OnceLock<bool> = OnceLock::new();

/// How cuDNN convolutions run in f32: `"ieee"` (TF32 off), `"cudnn-disabled"` (the fallback),
/// or `"not-loaded"` when CUDA support is not loaded.
pub(crate) fn conv_precision() -> &'static str {
    #[cfg(all(feature = "cuda", target_os = "linux"))]
    if let Some(&off) = TF32_OFF.get() {
        return if off { "ieee" } else { "cudnn-disabled" };
    }
    "not-loaded"
}

/// Turns TF32 off for cuDNN convolutions: `at::globalContext().setAllowTF32CuDNN(false)`, checked
/// by reading `float32Precision(CUDA, CONV)` back as `NONE` or `IEEE` (not TF32). When a symbol is missing or the
/// check fails, disables cuDNN instead.
#[cfg(all(feature = "cuda", target_os = "linux"))]
fn disable_cudnn_tf32() {
    use std::ffi::{c_void, CString};
    // Itanium C++ ABI: a member function takes `this` first; these enums are `int`-sized
    // (Float32Backend::CUDA = 1, Float32Op::CONV = 1; Float32Precision NONE = 0, IEEE = 1).
    type GlobalContext = unsafe extern "C" fn() -> *mut c_void;
    type SetAllowTf32 = unsafe extern "C" fn(*mut c_void, bool);
    type Float32Precision = unsafe extern "C" fn(*const c_void, i32, i32) -> i32;
    let sym = |name: &str| -> *mut c_void {
        let c = CString::new(name).expect("no NUL in a symbol name");
        // SAFETY: a valid C string; RTLD_DEFAULT searches the global scope.
        unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) }
    };
    let ctx = sym("_ZN2at13globalContextEv");
    let set = sym("_ZN2at7Context17setAllowTF32CuDNNEb");
    let get = sym("_ZNK2at7Context16float32PrecisionENS_14Float32BackendENS_9Float32OpE");
    let off = if ctx.is_null() || set.is_null() || get.is_null() {
        false
    } else {
        // SAFETY: the symbols are libtorch 2.11's exported functions with the signatures above
        // (at/Context.h); the context is libtorch's process-wide singleton.
        unsafe {
            let ctx: GlobalContext = std::mem::transmute::<*mut c_void, GlobalContext>(ctx);
            let set: SetAllowTf32 = std::mem::transmute::<*mut c_void, SetAllowTf32>(set);
            let get: Float32Precision = std::mem::transmute::<*mut c_void, Float32Precision>(get);
            let c = ctx();
            set(c, false);
            // NONE (what the legacy setter leaves, as Python's `cudnn.allow_tf32 = False`
            // does) or IEEE: anything but TF32 or BF16.
            matches!(get(c, 1, 1), 0 | 1)
        }
    };
    if !off {
        tch::Cuda::set_user_enabled_cudnn(false);
    }
    let _ = TF32_OFF.set(off);
}

/// Preloads the CUDA runtime libraries of the `nvidia-*` wheels under `nvidia` (as torch's
/// `_preload_cuda_deps` does); libraries that are absent or fail to load are skipped, and the
/// final load of `libtorch_cuda.so` reports what is still missing.
#[cfg(all(feature = "cuda", target_os = "linux"))]
fn preload_wheel_cuda_libs(nvidia: &std::path::Path) {
    // Order matters (libcublasLt before libcublas), as in torch/__init__.py.
    const STEMS: [&str; 16] = [
        "libcublasLt",
        "libcublas",
        "libcudnn",
        "libnvrtc",
        "libnvrtc-builtins",
        "libcudart",
        "libcupti",
        "libcufft",
        "libcurand",
        "libnvJitLink",
        "libcusparse",
        "libcusparseLt",
        "libcusolver",
        "libnccl",
        "libnvshmem_host",
        "libcufile",
    ];
    let Ok(entries) = std::fs::read_dir(nvidia) else {
        return;
    };
    let mut dirs: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("lib"))
        .filter(|d| d.is_dir())
        .collect();
    dirs.sort();
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for d in &dirs {
        if let Ok(entries) = std::fs::read_dir(d) {
            files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    files.sort();
    for stem in STEMS {
        let prefix = format!("{stem}.so.");
        let found = files.iter().find(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&prefix))
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        });
        if let Some(f) = found {
            let _ = dlopen(f);
        }
    }
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`; the handle is kept for the life of the process.
#[cfg(all(feature = "cuda", target_os = "linux"))]
fn dlopen(path: &std::path::Path) -> Result<(), String> {
    use std::ffi::{CStr, CString};
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated string; dlopen/dlerror have no other preconditions.
    // The handle is deliberately never closed.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if handle.is_null() {
            let err = libc::dlerror();
            if err.is_null() {
                Err("dlopen failed".into())
            } else {
                Err(CStr::from_ptr(err).to_string_lossy().into_owned())
            }
        } else {
            Ok(())
        }
    }
}
