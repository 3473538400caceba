//! Everything of the engine that needs `unsafe` to be fast (except the `sgemm` call behind the
//! safe [`gemm`](crate::kernels) wrapper): the run-time choice of the SIMD level, the one
//! dispatch macro that compiles a kernel body once per level, cache prefetch hints, and the
//! few routines written in AVX2 intrinsics.
//!
//! The level is chosen once per process: the widest the CPU has, unless `RSO_SIMD` names
//! another (`portable`, `avx2` or `avx512`; a level the CPU lacks, or an unknown value, is not
//! taken — the `rso` program refuses it, the library ignores it: see [`requested_level`]). Kernels compiled for AVX2 + FMA may fuse multiply-adds, so
//! `portable` can differ from the others in the last bits; `avx2` and `avx512` fuse the same
//! multiply-adds in the same order, so they give the same values. On one machine at one level
//! results are fixed.
//!
//! Kernels written on `Lanes` (the convolution) are compiled three times — portable, AVX2,
//! AVX-512 — by the `=> body(lanes)` form of `simd_dispatch!`; the others twice (portable,
//! AVX2; the AVX-512 level runs their AVX2 copy).

use std::sync::OnceLock;

/// A SIMD level the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Baseline x86-64 (SSE2) or any other architecture: no fused multiply-adds.
    Portable,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// AVX-512F as well as AVX2 and FMA (x86-64).
    Avx512,
}

impl SimdLevel {
    /// The level's name, as `RSO_SIMD` spells it.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// The widest level this CPU supports.
    pub fn detected() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return SimdLevel::Avx512;
            }
            return SimdLevel::Avx2;
        }
        SimdLevel::Portable
    }
}

/// The level `RSO_SIMD` asks for: `Ok(None)` when unset or empty.
///
/// # Errors
/// A value other than `portable`, `avx2` or `avx512`, or a level this CPU does not have, as a message
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
        Some("avx512") => SimdLevel::Avx512,
        _ => {
            return Err(format!(
                "RSO_SIMD={}: expected portable, avx2 or avx512",
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

/// Defines `fn $name(args) -> R` that runs `$body` compiled for the widest level allowed by
/// [`level`]: the same source compiled once per level, the copy chosen at run time (the
/// workspace builds for baseline x86-64).
///
/// Three forms:
/// - `=> body(lanes)` for a body generic over [`Lanes`], taking the level's token first
///   (`fn body<L: Lanes>(lanes: L, args…)`): compiled for AVX-512, AVX2 + FMA and portable;
/// - `=> body::<FMA>` for a body generic over `const FMA: bool` (whether it may fuse
///   multiply-adds, see [`madd`](crate::kernels)): compiled for AVX2 + FMA (used at both wide
///   levels) and portable;
/// - `=> body` for one that never fuses (no `mul_add`), whose two copies round identically,
///   so the level changes its speed only.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident(lanes)) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(lanes) = $crate::simd::Avx512::new() {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    #[allow(clippy::too_many_arguments)]
                    fn wide512(lanes: $crate::simd::Avx512, $($arg: $ty),*) $(-> $ret)? {
                        $body(lanes, $($arg),*)
                    }
                    #[allow(unsafe_code)]
                    // SAFETY: the token exists only when the CPU has AVX-512F, AVX2 and FMA.
                    return unsafe { wide512(lanes, $($arg),*) };
                }
                if let Some(lanes) = $crate::simd::Avx2::new() {
                    #[target_feature(enable = "avx2,fma")]
                    #[allow(clippy::too_many_arguments)]
                    fn wide256(lanes: $crate::simd::Avx2, $($arg: $ty),*) $(-> $ret)? {
                        $body(lanes, $($arg),*)
                    }
                    #[allow(unsafe_code)]
                    // SAFETY: the token exists only when the CPU has AVX2 and FMA.
                    return unsafe { wide256(lanes, $($arg),*) };
                }
            }
            $body($crate::simd::Portable, $($arg),*)
        }
    };
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
            if $crate::simd::level() >= $crate::simd::SimdLevel::Avx2 {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    $wide($($arg),*)
                }
                // Written once, here: the expansion lands in the kernel's module.
                #[allow(unsafe_code)]
                // SAFETY: `level()` is `Avx2` or wider only when the CPU has AVX2 and FMA, the features
                // `wide` is compiled for.
                return unsafe { wide($($arg),*) };
            }
            $narrow($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// `f32` vectors at one SIMD level, for kernels written once for every level (the
/// `=> body(lanes)` form of [`simd_dispatch!`]). A value of the type is a *token*: the wide
/// ones exist only when the CPU has their features (their constructors check [`level`]), so
/// the safe methods below cannot run an instruction the CPU lacks.
///
/// [`Lanes::madd`] fuses at the wide levels and not at the portable one, as
/// [`madd`](crate::kernels) does, so a kernel that adds its products in the same order at every
/// level gives the same values at `avx2` and `avx512`.
pub(crate) trait Lanes: Copy {
    /// A vector of [`Lanes::LANES`] values.
    type V: Copy;
    /// Values per vector.
    const LANES: usize;
    /// Every lane `v`.
    fn splat(self, v: f32) -> Self::V;
    /// The first `LANES` values of `s`.
    ///
    /// # Panics
    /// When `s` is shorter than `LANES`.
    fn load(self, s: &[f32]) -> Self::V;
    /// `v` into the first `LANES` values of `s`.
    ///
    /// # Panics
    /// When `s` is shorter than `LANES`.
    fn store(self, v: Self::V, s: &mut [f32]);
    /// `acc + a·b` per lane (fused at the wide levels).
    fn madd(self, acc: Self::V, a: Self::V, b: Self::V) -> Self::V;
}

/// The portable token: 8 lanes as an array, unfused (the compiler vectorises what it can).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

impl Lanes for Portable {
    type V = [f32; 8];
    const LANES: usize = 8;
    #[inline(always)]
    fn splat(self, v: f32) -> [f32; 8] {
        [v; 8]
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> [f32; 8] {
        s[..8].try_into().expect("8 values")
    }
    #[inline(always)]
    fn store(self, v: [f32; 8], s: &mut [f32]) {
        s[..8].copy_from_slice(&v);
    }
    #[inline(always)]
    fn madd(self, acc: [f32; 8], a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| acc[i] + a[i] * b[i])
    }
}

/// The AVX2 + FMA token (8 lanes); exists only when [`level`] is [`SimdLevel::Avx2`] or wider.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// The token, when the process runs at AVX2 or wider.
    #[inline(always)]
    pub(crate) fn new() -> Option<Avx2> {
        (level() >= SimdLevel::Avx2).then_some(Avx2(()))
    }
}

/// The AVX-512F token (16 lanes); exists only when [`level`] is [`SimdLevel::Avx512`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// The token, when the process runs at AVX-512.
    #[inline(always)]
    pub(crate) fn new() -> Option<Avx512> {
        (level() >= SimdLevel::Avx512).then_some(Avx512(()))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Avx2, Avx512, Lanes};
    use std::arch::x86_64::*;

    // Every `unsafe` below runs an intrinsic of the token's features; a token exists only when
    // the CPU has them (its constructor), and the pointer ones are bounds-checked first.
    impl Lanes for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        fn splat(self, v: f32) -> __m256 {
            // SAFETY: the token proves AVX2 (see above).
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> __m256 {
            let s = &s[..8];
            // SAFETY: the token proves AVX2; `s` holds 8 values (unaligned load).
            unsafe { _mm256_loadu_ps(s.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, v: __m256, s: &mut [f32]) {
            let s = &mut s[..8];
            // SAFETY: the token proves AVX2; `s` holds 8 values (unaligned store).
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn madd(self, acc: __m256, a: __m256, b: __m256) -> __m256 {
            // SAFETY: the token proves FMA.
            unsafe { _mm256_fmadd_ps(a, b, acc) }
        }
    }

    impl Lanes for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        #[inline(always)]
        fn splat(self, v: f32) -> __m512 {
            // SAFETY: the token proves AVX-512F.
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> __m512 {
            let s = &s[..16];
            // SAFETY: the token proves AVX-512F; `s` holds 16 values (unaligned load).
            unsafe { _mm512_loadu_ps(s.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, v: __m512, s: &mut [f32]) {
            let s = &mut s[..16];
            // SAFETY: the token proves AVX-512F; `s` holds 16 values (unaligned store).
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn madd(self, acc: __m512, a: __m512, b: __m512) -> __m512 {
            // SAFETY: the token proves AVX-512F (which has the fused multiply-add).
            unsafe { _mm512_fmadd_ps(a, b, acc) }
        }
    }
}

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
    if level() >= SimdLevel::Avx2 {
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
    if level() >= SimdLevel::Avx2 {
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

/// For tests of kernels written on [`Lanes`]: prints which levels `kernel`'s test ran and
/// which it skipped (the CPU, or `RSO_SIMD`, does not allow them).
///
/// # Panics
/// When `RSO_REQUIRE_AVX512=1` and AVX-512 was skipped (for CI on machines that have it).
#[cfg(test)]
pub(crate) fn report_levels(kernel: &str, ran: &[&str]) {
    let skipped: Vec<&str> = ["portable", "avx2", "avx512"]
        .into_iter()
        .filter(|l| !ran.contains(l))
        .collect();
    eprintln!("{kernel}: checked levels {ran:?}, skipped {skipped:?}");
    let require = std::env::var_os("RSO_REQUIRE_AVX512").is_some_and(|v| v == "1");
    assert!(
        !(require && skipped.contains(&"avx512")),
        "{kernel}: RSO_REQUIRE_AVX512=1 but the AVX-512 path was skipped (CPU supports {}, level {})",
        SimdLevel::detected().name(),
        level().name()
    );
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
