//! Row constants of the dense path: during the sweep of logit row `k`, each sample's
//! `m = max_{c≠k} z_c`, `s = Σ_{c≠k} exp(z_c − m)` and label logit do not change, so a
//! candidate's cross-entropy is `m − z_label + ln(s + exp(z_k − m))` (see [`super::dense`]).

use crate::incremental::util::{exp_kernel, parallel, with_scratch64, LogProd};
use crate::simd::simd_dispatch;
use rayon::prelude::*;

/// Per-sample constants of one logit row `k`: `[m, s, z_label, label == k]` with
/// `m = max_{c≠k} z_c`, `s = Σ_{c≠k} exp(z_c − m)`, `z_label` the label's logit when it is not
/// `k` (else 0) and the last entry 1 when the label is `k` (else 0).
#[derive(Debug)]
pub(crate) struct Rows {
    pub(crate) k: usize,
    /// `Store::row_ticks` when computed (valid while no row other than `k` has changed).
    pub(crate) ticks: Vec<u64>,
    pub(crate) c: Vec<[f64; 4]>,
}

simd_dispatch! {
    /// Adds the cross-entropies `m − z_label + ln(s + exp(zk + d·x − m))` of a chunk's samples
    /// (with `z_label = zk + d·x` where `isk` is 1) to `acc`, in four interleaved lanes merged in
    /// lane order. Returns false (leaving `acc` unspecified) if an exponent exceeds 709 or a
    /// value is not finite; the caller then recomputes the chunk.
    pub(crate) fn lanes(
        zk: &[f64],
        x: &[f64],
        m: &[f64],
        s: &[f64],
        zl: &[f64],
        isk: &[f64],
        d: f64,
        acc: &mut LogProd,
    ) -> bool => lanes_body
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lanes_body(
    zk: &[f64],
    x: &[f64],
    m: &[f64],
    s: &[f64],
    zl: &[f64],
    isk: &[f64],
    d: f64,
    acc: &mut LogProd,
) -> bool {
    const L: usize = 4;
    const FRAC: u64 = (1 << 52) - 1;
    let mut lin = [0.0f64; L];
    let mut mant = [1.0f64; L];
    let mut ex = [0i64; L];
    let mut bad = [0u64; L];
    let n = zk.len();
    let full = n / L * L;
    let lane = |v: &[f64], t0: usize| -> [f64; L] { v[t0..t0 + L].try_into().expect("lane") };
    let mut t0 = 0;
    while t0 < full {
        let (zk4, x4, m4, s4, zl4, isk4) = (
            lane(zk, t0),
            lane(x, t0),
            lane(m, t0),
            lane(s, t0),
            lane(zl, t0),
            lane(isk, t0),
        );
        for l in 0..L {
            let z2 = zk4[l] + d * x4[l];
            let arg = z2 - m4[l];
            let a = s4[l] + exp_kernel(arg);
            bad[l] |= u64::from(!(arg <= 709.0 && a < 1e300));
            lin[l] += m4[l] - if isk4[l] != 0.0 { z2 } else { zl4[l] };
            let b = (mant[l] * a).to_bits();
            ex[l] += ((b >> 52) & 0x7ff) as i64 - 1023;
            mant[l] = f64::from_bits((b & FRAC) | (1023 << 52));
        }
        t0 += L;
    }
    for t in full..n {
        let l = t - full;
        let z2 = zk[t] + d * x[t];
        let arg = z2 - m[t];
        let a = s[t] + exp_kernel(arg);
        bad[l] |= u64::from(!(arg <= 709.0 && a < 1e300));
        lin[l] += m[t] - if isk[t] != 0.0 { z2 } else { zl[t] };
        let b = (mant[l] * a).to_bits();
        ex[l] += ((b >> 52) & 0x7ff) as i64 - 1023;
        mant[l] = f64::from_bits((b & FRAC) | (1023 << 52));
    }
    if bad.iter().any(|&b| b != 0) {
        return false;
    }
    for l in 0..L {
        acc.merge(&LogProd::from_parts(lin[l], mant[l], ex[l]));
    }
    true
}

/// The [`Rows`] entry of sample `i` computed on the spot (bias visits, one per row).
#[inline(always)]
pub(crate) fn constants(
    z: &[f64],
    n: usize,
    classes: usize,
    k: usize,
    i: usize,
    label: usize,
) -> [f64; 4] {
    constants_with(z, n, classes, k, i, label, f64::exp)
}

/// The [`Rows`] entry of sample `i` computed on the spot with the arithmetic of
/// [`row_constants`] (the same bits): for weight visits of a row whose constants are not kept
/// (see `dense::prepare`).
#[inline(always)]
pub(crate) fn row_constants_at(
    z: &[f64],
    n: usize,
    classes: usize,
    k: usize,
    i: usize,
    label: usize,
) -> [f64; 4] {
    constants_with(z, n, classes, k, i, label, |a| {
        if a <= 709.0 {
            exp_kernel(a)
        } else {
            f64::NAN
        }
    })
}

/// `[m, s, z_label, label == k]` of sample `i` with `s = Σ_{c≠k} exp(z_c − m)` summed in class
/// order through `exp`.
#[inline(always)]
fn constants_with(
    z: &[f64],
    n: usize,
    classes: usize,
    k: usize,
    i: usize,
    label: usize,
    exp: impl Fn(f64) -> f64,
) -> [f64; 4] {
    let mut m = f64::NEG_INFINITY;
    for c in (0..classes).filter(|&c| c != k) {
        m = m.max(z[c * n + i]);
    }
    let mut s = 0.0;
    for c in (0..classes).filter(|&c| c != k) {
        s += exp(z[c * n + i] - m);
    }
    if label == k {
        [m, s, 0.0, 1.0]
    } else {
        [m, s, z[label * n + i], 0.0]
    }
}

/// [`Rows`] of row `k` for every sample, reusing the buffer of `old`. Class by class over
/// contiguous rows of the logits, so the loops vectorise.
pub(crate) fn row_constants(
    z: &[f64],
    labels: &[u8],
    classes: usize,
    k: usize,
    ticks: &[u64],
    old: &mut Option<Rows>,
) -> Rows {
    let n = labels.len();
    let mut c = old.take().map(|r| r.c).unwrap_or_default();
    c.resize(n, [0.0; 4]);
    const C: usize = 2048;
    let task = |(b, c): (usize, &mut [[f64; 4]])| {
        let i0 = b * C;
        let len = c.len();
        with_scratch64(2 * len, |buf| {
            let (m, s) = buf.split_at_mut(len);
            m.fill(f64::NEG_INFINITY);
            s.fill(0.0);
            for cl in (0..classes).filter(|&cl| cl != k) {
                for (m, &v) in m.iter_mut().zip(&z[cl * n + i0..][..len]) {
                    *m = m.max(v);
                }
            }
            for cl in (0..classes).filter(|&cl| cl != k) {
                exp_sum(&z[cl * n + i0..][..len], m, s);
            }
            for (t, c) in c.iter_mut().enumerate() {
                let label = usize::from(labels[i0 + t]);
                *c = if label == k {
                    [m[t], s[t], 0.0, 1.0]
                } else {
                    [m[t], s[t], z[label * n + i0 + t], 0.0]
                };
            }
        });
    };
    if parallel(n * classes * 20) {
        c.par_chunks_mut(C).enumerate().for_each(task);
    } else {
        c.chunks_mut(C).enumerate().for_each(task);
    }
    Rows {
        k,
        ticks: ticks.to_vec(),
        c,
    }
}

simd_dispatch! {
    /// `s += exp(z − m)` elementwise (NaN where `z − m` is not at most 709, so that the
    /// visit's check takes the exact per-sample path).
    fn exp_sum(z: &[f64], m: &[f64], s: &mut [f64]) => exp_sum_body
}

#[inline(always)]
fn exp_sum_body(z: &[f64], m: &[f64], s: &mut [f64]) {
    for ((s, &z), &m) in s.iter_mut().zip(z).zip(m) {
        let a = z - m;
        *s += if a <= 709.0 { exp_kernel(a) } else { f64::NAN };
    }
}

#[cfg(test)]
mod tests {
    use super::{row_constants, row_constants_at};
    use rand::{Rng, SeedableRng};

    /// A weight visit gives the same losses whether its row's constants were kept or computed
    /// for its batch only, so the two must agree bit for bit, exponents past 709 (NaN) included.
    #[test]
    fn constants_on_the_spot_are_the_kept_rows_bits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, classes) = (4099, 10);
        let mut z: Vec<f64> = (0..n * classes)
            .map(|_| rng.random_range(-30.0..30.0))
            .collect();
        z[3 * n + 5] = 800.0;
        z[4 * n + 5] = -800.0;
        z[2 * n + 17] = f64::NAN;
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..classes as u8)).collect();
        for k in [0, 3, classes - 1] {
            let rows = row_constants(&z, &labels, classes, k, &[0; 10], &mut None);
            for (i, kept) in rows.c.iter().enumerate() {
                let spot = row_constants_at(&z, n, classes, k, i, usize::from(labels[i]));
                assert_eq!(
                    kept.map(f64::to_bits),
                    spot.map(f64::to_bits),
                    "row {k} sample {i}"
                );
            }
        }
    }
}
