//! Everything of the engine that needs `unsafe` to be fast (except the `sgemm` call behind the
//! safe [`gemm`](crate::kernels) wrapper): the run-time choice of the SIMD level, the one
//! dispatch macro that compiles a kernel body once per level, cache prefetch hints, and the
//! few routines written in AVX2 intrinsics.
//!
//! The level is chosen once per process: the widest the CPU has, unless `RSO_SIMD` names a
//! lower one (`portable` or `avx2`; a level the CPU lacks, or an unknown value, is not taken:
//! see [`requested_level`]). Kernels compiled for AVX2 + FMA may fuse multiply-adds, so the
//! level can change results in the last bits; on one machine at one level they are fixed.

use std::sync::OnceLock;

/// A SIMD level the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Baseline x86-64 (SSE2) or any other architecture: no fused multiply-adds.
    Portable,
    /// AVX2 and FMA (x86-64).
    Avx2,
}

impl SimdLevel {
    /// The level's name, as `RSO_SIMD` spells it.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
        }
    }

    /// The widest level this CPU supports.
    pub fn detected() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return SimdLevel::Avx2;
        }
        SimdLevel::Portable
    }
}

/// The level `RSO_SIMD` asks for: `Ok(None)` when unset or empty.
///
/// # Errors
/// A value other than `portable` or `avx2`, or a level this CPU does not have, as a message
/// naming the variable (the `rso` program refuses to start with it; the library then ignores
/// the variable).
pub fn requested_level() -> Result<Option<SimdLevel>, String> {
    let Some(value) = std::env::var_os("RSO_SIMD") else {
        return Ok(None);
    };
    let level = match value.to_str() {
        Some("") => return Ok(None),
        Some("portable") => SimdLevel::Portable,
        Some("avx2") => SimdLevel::Avx2,
        _ => {
            return Err(format!(
                "RSO_SIMD={}: expected portable or avx2",
                value.to_string_lossy()
            ))
        }
    };
    if level > SimdLevel::detected() {
        return Err(format!(
            "RSO_SIMD={}: this CPU supports at most {}",
            level.name(),
            SimdLevel::detected().name()
        ));
    }
    Ok(Some(level))
}

/// The level the kernels run at in this process (chosen at the first call).
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        requested_level()
            .ok()
            .flatten()
            .unwrap_or_else(SimdLevel::detected)
    })
}

/// Defines `fn $name(args) -> R` that runs `$body` compiled for AVX2 + FMA when [`level`] is
/// [`SimdLevel::Avx2`], else the portable copy: the same source compiled twice, the wide copy
/// chosen at run time (the workspace builds for baseline x86-64).
///
/// Two forms: `=> body::<FMA>` for a body generic over `const FMA: bool` (whether it may fuse
/// multiply-adds, see [`madd`](crate::kernels)), and `=> body` for one that never fuses (no
/// `mul_add`), whose two copies round identically, so the level changes its speed only.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident::<FMA>) => {
        $crate::simd::simd_dispatch!(@ $(#[$meta])* $vis fn $name($($arg: $ty),*) $(-> $ret)?
            => ($body::<true>, $body::<false>));
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $crate::simd::simd_dispatch!(@ $(#[$meta])* $vis fn $name($($arg: $ty),*) $(-> $ret)?
            => ($body, $body));
    };
    (@ $(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => ($wide:expr, $narrow:expr)) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::level() == $crate::simd::SimdLevel::Avx2 {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    $wide($($arg),*)
                }
                // Written once, here: the expansion lands in the kernel's module.
                #[allow(unsafe_code)]
                // SAFETY: `level()` is `Avx2` only when the CPU has AVX2 and FMA, the features
                // `wide` is compiled for.
                return unsafe { wide($($arg),*) };
            }
            $narrow($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Asks the CPU to bring the cache line of `r` closer (a hint; no effect on results).
#[inline(always)]
pub(crate) fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint that never faults, and `r` is a valid reference anyway.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((r as *const T).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// [`prefetch`] of every cache line of `v`.
#[inline(always)]
pub(crate) fn prefetch_slice(v: &[f32]) {
    for line in v.chunks(16) {
        prefetch(&line[0]);
    }
}

/// `z[t] += Σ_f pending[f]·line_t[f]` (a 16-feature dot product per sample, line `t` at
/// `lines[t·stride..][..16]`), and with `x = Some((x, f))` also `x[t] = line_t[f]`, in AVX2:
/// one 4-lane f64 sum over the four groups of 4 features, then `(a0 + a2) + (a1 + a3)` — the
/// order of the portable `pending_sum` of the dense path, so both give the same values.
/// Returns false (doing nothing) when the level is not AVX2.
///
/// # Panics
/// When `lines` is shorter than `(z.len() − 1)·stride + 16`, or `x` shorter than `z` or
/// `f ≥ 16`.
pub(crate) fn add_pending_avx2(
    pending: &[f64; 16],
    lines: &[f32],
    stride: usize,
    z: &mut [f64],
    x: Option<(&mut [f64], usize)>,
) -> bool {
    let n = z.len();
    assert!(
        n == 0 || lines.len() >= (n - 1) * stride + 16,
        "add_pending: lines too short"
    );
    if let Some((x, f)) = &x {
        assert!(x.len() >= n && *f < 16, "add_pending: x");
    }
    #[cfg(target_arch = "x86_64")]
    if level() == SimdLevel::Avx2 {
        // SAFETY: the CPU has AVX2 (`level`); the lengths are checked above.
        unsafe { add_pending_x86(pending, lines, stride, z, x) };
        return true;
    }
    false
}

/// [`add_pending_avx2`] after its checks.
///
/// # Safety
/// The CPU must have AVX2; `lines` must hold `(z.len() − 1)·stride + 16` values and `x`
/// (when given) `z.len()` values with `f < 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_pending_x86(
    pending: &[f64; 16],
    lines: &[f32],
    stride: usize,
    z: &mut [f64],
    x: Option<(&mut [f64], usize)>,
) {
    use std::arch::x86_64::*;
    let pp = pending.as_ptr();
    // SAFETY: `pending` holds 16 values.
    let p = unsafe {
        [
            _mm256_loadu_pd(pp),
            _mm256_loadu_pd(pp.add(4)),
            _mm256_loadu_pd(pp.add(8)),
            _mm256_loadu_pd(pp.add(12)),
        ]
    };
    let lp = lines.as_ptr();
    let sum = |t: usize| -> f64 {
        // SAFETY: line `t` lies inside `lines` (checked by the caller).
        unsafe {
            let l = lp.add(t * stride);
            let mut acc = _mm256_setzero_pd();
            for (g, p) in p.iter().enumerate() {
                let xv = _mm256_cvtps_pd(_mm_loadu_ps(l.add(4 * g)));
                acc = _mm256_add_pd(acc, _mm256_mul_pd(*p, xv));
            }
            let s = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd::<1>(acc));
            _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
        }
    };
    match x {
        Some((x, f)) => {
            for (t, (z, x)) in z.iter_mut().zip(x.iter_mut()).enumerate() {
                *z += sum(t);
                *x = f64::from(lines[t * stride + f]);
            }
        }
        None => {
            for (t, z) in z.iter_mut().enumerate() {
                *z += sum(t);
            }
        }
    }
}

/// `z[c] += Σ_p w[p·cp + c]·d[p]` for every class slot `c < cp = z.len()` in AVX2 registers:
/// two partial sums (even and odd `p`) added at the end, the order of the portable
/// `logit_changes` of the convolution path, so both give the same values. Returns false (doing
/// nothing) when the level is not AVX2 or `cp` is not 4, 8, 12 or 16.
///
/// # Panics
/// When `w` is shorter than `d.len()·cp`.
pub(crate) fn logit_changes_avx2(w: &[f64], d: &[f32], z: &mut [f64]) -> bool {
    let cp = z.len();
    assert!(w.len() >= d.len() * cp, "logit_changes: shapes");
    #[cfg(target_arch = "x86_64")]
    if level() == SimdLevel::Avx2 {
        // SAFETY: the CPU has AVX2 (`level`); `z.len() == 4·G` and `w` is long enough.
        unsafe {
            match cp {
                4 => logit_changes_x86::<1>(w, d, z),
                8 => logit_changes_x86::<2>(w, d, z),
                12 => logit_changes_x86::<3>(w, d, z),
                16 => logit_changes_x86::<4>(w, d, z),
                _ => return false,
            }
        }
        return true;
    }
    false
}

/// [`logit_changes_avx2`] for `cp = 4·G`.
///
/// # Safety
/// The CPU must have AVX2, `z.len() == 4·G` and `w.len() ≥ d.len()·4·G`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn logit_changes_x86<const G: usize>(w: &[f64], d: &[f32], z: &mut [f64]) {
    use std::arch::x86_64::*;
    let cp = 4 * G;
    let wp = w.as_ptr();
    let mut s0 = [_mm256_setzero_pd(); G];
    let mut s1 = [_mm256_setzero_pd(); G];
    let pairs = d.len() / 2;
    for p2 in 0..pairs {
        let p = 2 * p2;
        let a = _mm256_set1_pd(f64::from(d[p]));
        let b = _mm256_set1_pd(f64::from(d[p + 1]));
        for (g, (s0, s1)) in s0.iter_mut().zip(s1.iter_mut()).enumerate() {
            // SAFETY: in bounds (checked by the caller).
            let wa = unsafe { _mm256_loadu_pd(wp.add(p * cp + 4 * g)) };
            // SAFETY: as above.
            let wb = unsafe { _mm256_loadu_pd(wp.add((p + 1) * cp + 4 * g)) };
            *s0 = _mm256_add_pd(*s0, _mm256_mul_pd(wa, a));
            *s1 = _mm256_add_pd(*s1, _mm256_mul_pd(wb, b));
        }
    }
    if d.len() % 2 == 1 {
        let p = d.len() - 1;
        let a = _mm256_set1_pd(f64::from(d[p]));
        for (g, s0) in s0.iter_mut().enumerate() {
            // SAFETY: in bounds (checked by the caller).
            let wa = unsafe { _mm256_loadu_pd(wp.add(p * cp + 4 * g)) };
            *s0 = _mm256_add_pd(*s0, _mm256_mul_pd(wa, a));
        }
    }
    for (g, (s0, s1)) in s0.iter().zip(&s1).enumerate() {
        let zp = z[4 * g..].as_mut_ptr();
        // SAFETY: `z` holds `4·G` values.
        unsafe {
            let zv = _mm256_loadu_pd(zp);
            _mm256_storeu_pd(zp, _mm256_add_pd(zv, _mm256_add_pd(*s0, *s1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_never_exceeds_the_cpu() {
        assert!(level() <= SimdLevel::detected());
        eprintln!(
            "simd: running at {} (CPU supports {})",
            level().name(),
            SimdLevel::detected().name()
        );
    }
}
