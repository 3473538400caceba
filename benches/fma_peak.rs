//! The machine's multiply-add peak, measured: independent FMA chains at each SIMD width the CPU
//! has (scalar, AVX2 256-bit, AVX-512 512-bit), on 1 and on 2 threads, in GMAC/s (one fused
//! multiply-add per lane = one MAC). The virtual machines here hide FMA ports and turbo and may
//! give two hyper-threads of one core, so kernels' GMAC/s are judged against this figure, not
//! against a datasheet (`cargo bench --bench fma_peak`; a plain program, not criterion).

use std::hint::black_box;
use std::time::Instant;

/// Independent accumulator chains per thread: more than latency × FMA ports (4 × 2) so that
/// the chains, not their latency, bound the rate.
const CHAINS: usize = 12;
/// Iterations of the inner loop per timed run.
const ITERS: usize = 20_000_000;

/// One width: its name, lanes per FMA, and the kernel (returns a value that depends on every
/// chain, so nothing is optimised away).
struct Width {
    name: &'static str,
    lanes: usize,
    run: fn(usize) -> f32,
}

/// Scalar multiply then add (not fused: without the `fma` feature `mul_add` is a library
/// call), the portable kernels' arithmetic.
fn scalar(iters: usize) -> f32 {
    let mut acc = [0.0f32; CHAINS];
    let (a, b) = (black_box(0.999_999f32), black_box(1e-7f32));
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = *c * a + b;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "fma")]
    fn scalar_fma_body(iters: usize) -> f32 {
        let mut acc = [0.0f32; CHAINS];
        let (a, b) = (
            std::hint::black_box(0.999_999f32),
            std::hint::black_box(1e-7f32),
        );
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = c.mul_add(a, b);
            }
        }
        acc.iter().sum()
    }

    /// Scalar fused multiply-adds; the caller checked the CPU has FMA.
    pub fn scalar_fma(iters: usize) -> f32 {
        // SAFETY: only listed in `widths()` when the CPU has FMA.
        unsafe { scalar_fma_body(iters) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn avx2_body(iters: usize) -> f32 {
        let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm256_fmadd_ps(*c, a, b);
            }
        }
        let mut lanes = [0.0f32; 8];
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &c| _mm256_add_ps(s, c));
        // SAFETY: `lanes` holds 8 f32, the width of the store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }

    /// The AVX2 + FMA chains; the caller checked the CPU has them.
    pub fn avx2(iters: usize) -> f32 {
        // SAFETY: only listed in `widths()` when the CPU has AVX2 and FMA.
        unsafe { avx2_body(iters) }
    }

    #[target_feature(enable = "avx512f")]
    fn avx512_body(iters: usize) -> f32 {
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm512_fmadd_ps(*c, a, b);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, &c| _mm512_add_ps(s, c));
        _mm512_reduce_add_ps(sum)
    }

    /// The AVX-512 chains; the caller checked the CPU has AVX-512F.
    pub fn avx512(iters: usize) -> f32 {
        // SAFETY: only listed in `widths()` when the CPU has AVX-512F.
        unsafe { avx512_body(iters) }
    }
}

/// The widths this CPU runs.
fn widths() -> Vec<Width> {
    let mut out = vec![Width {
        name: "scalar (mul+add)",
        lanes: 1,
        run: scalar,
    }];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("fma") {
            out.push(Width {
                name: "scalar (fma)",
                lanes: 1,
                run: x86::scalar_fma,
            });
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            out.push(Width {
                name: "avx2 (256-bit)",
                lanes: 8,
                run: x86::avx2,
            });
        }
        if is_x86_feature_detected!("avx512f") {
            out.push(Width {
                name: "avx512 (512-bit)",
                lanes: 16,
                run: x86::avx512,
            });
        }
    }
    out
}

/// GMAC/s of `threads` threads each running `w` for `ITERS` iterations (best of 3).
fn gmacs(w: &Width, threads: usize) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| s.spawn(|| black_box((w.run)(ITERS))))
                .collect();
            for h in handles {
                h.join().expect("FMA thread");
            }
        });
        let macs = (threads * ITERS * CHAINS * w.lanes) as f64;
        best = best.max(macs / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is ignored.
    println!("width,lanes,threads,gmac_per_s");
    for w in widths() {
        let one = gmacs(&w, 1);
        let two = gmacs(&w, 2);
        println!("{},{},1,{one:.1}", w.name, w.lanes);
        println!("{},{},2,{two:.1}", w.name, w.lanes);
        eprintln!(
            "fma_peak: {}: 1 thread {one:.1}, 2 threads {two:.1} GMAC/s ({:.2}× scaling)",
            w.name,
            two / one
        );
    }
}
