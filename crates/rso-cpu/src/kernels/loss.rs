//! Logit cross-entropy and accuracy.

/// Per-sample cross-entropy `logsumexp(z) − z[label]` of `logits: [n, classes]`, computed in
/// f64 (max-shifted log-sum-exp), written to `losses[..n]`.
pub fn cross_entropy(n: usize, classes: usize, logits: &[f32], labels: &[u8], losses: &mut [f64]) {
    for (i, loss) in losses[..n].iter_mut().enumerate() {
        let z = &logits[i * classes..][..classes];
        *loss = log_sum_exp(z) - f64::from(z[usize::from(labels[i])]);
    }
}

fn log_sum_exp(z: &[f32]) -> f64 {
    let m = z
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let s: f64 = z.iter().map(|&v| (f64::from(v) - m).exp()).sum();
    m + s.ln()
}

/// Sum of `values` in index order (the order every engine path reduces per-sample losses in).
pub fn ordered_sum(values: &[f64]) -> f64 {
    values.iter().sum()
}

/// Gradient of `scale · Σᵢ CE(i)` with respect to the logits:
/// `dz[i] = scale · (softmax(z[i]) − onehot(label[i]))`, fully written.
pub fn cross_entropy_backward(
    n: usize,
    classes: usize,
    logits: &[f32],
    labels: &[u8],
    scale: f64,
    dlogits: &mut [f32],
) {
    for i in 0..n {
        let z = &logits[i * classes..][..classes];
        let dz = &mut dlogits[i * classes..][..classes];
        let lse = log_sum_exp(z);
        let label = usize::from(labels[i]);
        for (j, (d, &v)) in dz.iter_mut().zip(z).enumerate() {
            let p = (f64::from(v) - lse).exp();
            let t = if j == label { 1.0 } else { 0.0 };
            *d = (scale * (p - t)) as f32;
        }
    }
}

/// Index of the largest value; ties go to the lowest index (NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] || (row[best].is_nan() && !v.is_nan()) {
            best = j;
        }
    }
    best
}

/// Number of samples whose [`argmax`] logit is the label.
pub fn correct(n: usize, classes: usize, logits: &[f32], labels: &[u8]) -> usize {
    (0..n)
        .filter(|&i| argmax(&logits[i * classes..][..classes]) == usize::from(labels[i]))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self as tu, assert_close, config, numeric_grad, uniform, wide};
    use proptest::prelude::*;

    #[test]
    fn cross_entropy_matches_hand_computed_values() {
        let logits = [0.0, 0.0, 1.0, 2.0, 3.0, 1000.0, 0.0, 1000.0, 0.0];
        let mut l = [f64::NAN; 3];
        cross_entropy(1, 2, &logits[..2], &[1], &mut l[..1]);
        assert!((l[0] - 2f64.ln()).abs() < 1e-15);
        cross_entropy(1, 3, &logits[2..5], &[2], &mut l[..1]);
        let want = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0;
        assert!((l[0] - want).abs() < 1e-14);
        // Large logits do not overflow: log-sum-exp is shifted by the maximum.
        cross_entropy(2, 2, &logits[5..9], &[0, 1], &mut l[..2]);
        assert_eq!(l[0], 0.0);
        assert_eq!(l[1], 1000.0);
        assert_eq!(ordered_sum(&[1.0, 2.0, 3.5]), 6.5);
    }

    #[test]
    fn cross_entropy_gradient_matches_hand_computed_values() {
        let mut d = [f32::NAN; 4];
        cross_entropy_backward(2, 2, &[0.0, 0.0, 0.0, 0.0], &[0, 1], 0.5, &mut d);
        assert_eq!(d, [-0.25, 0.25, 0.25, -0.25]);
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_index() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0, 5.0]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.0]), 1);
        assert_eq!(
            correct(3, 2, &[1.0, 1.0, 0.0, 2.0, 3.0, 1.0], &[0, 1, 1]),
            2
        );
    }

    proptest! {
        #![proptest_config(config(24))]
        #[test]
        fn gradient_matches_finite_differences(
            n in 1usize..=4, classes in 1usize..=10, scale in 0.1f64..2.0, seed in any::<u64>(),
        ) {
            let mut rng = tu::rng(seed);
            let z = uniform(&mut rng, n * classes, 4.0);
            let labels: Vec<u8> = (0..n).map(|i| ((seed as usize + 7 * i) % classes) as u8).collect();
            let mut dz = vec![f32::NAN; z.len()];
            cross_entropy_backward(n, classes, &z, &labels, scale, &mut dz);
            let loss = |z: &[f64]| scale * tu::cross_entropy(n, classes, z, &labels).iter().sum::<f64>();
            assert_close(&dz, &numeric_grad(loss, &wide(&z), 1e-5), 1e-5, 1e-6, "dz");

            let mut l = vec![f64::NAN; n];
            cross_entropy(n, classes, &z, &labels, &mut l);
            assert_close(&l, &tu::cross_entropy(n, classes, &wide(&z), &labels), 1e-12, 1e-12, "loss");
        }
    }
}
