//! Pending changes of the final dense layer's weights: accepted changes of one block of 16
//! weights of a logit row, added to the all-samples logits when RSO leaves the block (see
//! [`super::store::Store::pending`]).

use super::store::FB;

/// `Σ_f pending[f]·line[f]` for one sample's line of a block: four interleaved partial sums
/// added pairwise (a fixed order).
#[inline(always)]
pub(crate) fn pending_sum(pending: &[f64; FB], line: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    for (p, x) in pending.chunks_exact(4).zip(line.chunks_exact(4)) {
        for l in 0..4 {
            acc[l] += p[l] * f64::from(x[l]);
        }
    }
    (acc[0] + acc[2]) + (acc[1] + acc[3])
}

/// `z[t] += pending_sum(pending, line t)` for every sample `t` of a chunk, line `t` at
/// `lines[t·stride..][..FB]`; with `x = Some((x, f))` also `x[t] = line t[f]`. The AVX2 version
/// computes [`pending_sum`] in the same order (one 4-lane sum, then `(a0 + a2) + (a1 + a3)`),
/// so both give the same values.
pub(crate) fn add_pending(
    pending: &[f64; FB],
    lines: &[f32],
    stride: usize,
    z: &mut [f64],
    mut x: Option<(&mut [f64], usize)>,
) {
    // Checks the lengths (and panics on bad ones) whatever the level.
    let x_again = x.as_mut().map(|(x, f)| (&mut **x, *f));
    if crate::simd::add_pending_avx2(pending, lines, stride, z, x_again) {
        return;
    }
    match x {
        Some((x, f)) => {
            for (t, (z, x)) in z.iter_mut().zip(x.iter_mut()).enumerate() {
                let line = &lines[t * stride..][..FB];
                *z += pending_sum(pending, line);
                *x = f64::from(line[f]);
            }
        }
        None => {
            for (t, z) in z.iter_mut().enumerate() {
                *z += pending_sum(pending, &lines[t * stride..][..FB]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil as tu;

    /// The dispatched [`add_pending`] (AVX2 where the CPU has it) adds exactly what
    /// [`pending_sum`] gives, so that the logits do not depend on the CPU's features.
    #[test]
    fn add_pending_matches_pending_sum_bit_for_bit() {
        let mut rng = tu::rng(7);
        let pending: [f64; FB] =
            std::array::from_fn(|_| f64::from(tu::uniform(&mut rng, 1, 1.0)[0]) * 1e-3);
        let stride = 3 * FB;
        let n = 37;
        let lines = tu::uniform(&mut rng, (n - 1) * stride + FB, 2.0);
        let z0: Vec<f64> = tu::uniform(&mut rng, n, 5.0)
            .into_iter()
            .map(f64::from)
            .collect();
        let mut z = z0.clone();
        let mut x = vec![0.0; n];
        add_pending(&pending, &lines, stride, &mut z, Some((&mut x, 5)));
        for t in 0..n {
            let line = &lines[t * stride..][..FB];
            let want = z0[t] + pending_sum(&pending, line);
            assert_eq!(z[t].to_bits(), want.to_bits(), "sample {t}");
            assert_eq!(x[t], f64::from(line[5]));
        }
    }
}
