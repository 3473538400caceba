//! Logit cross-entropy and accuracy.

use super::{values, values_mut};
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2};

/// Asserts that `labels` has one label per row of `logits: [n, classes]`.
#[track_caller]
fn check_labels(kernel: &str, logits: &ArrayView2<f32>, labels: &ArrayView1<u8>) {
    assert_eq!(labels.len(), logits.nrows(), "{kernel}: labels is not [n]");
}

/// Per-sample cross-entropy `logsumexp(z) − z[label]` of the logits, computed in f64
/// (max-shifted log-sum-exp).
///
/// # Shapes
/// `logits: [n, classes]`, `labels: [n]`, `losses: [n]`.
///
/// # Panics
/// If the shapes do not match, a label is not below `classes`, or a view is not in standard
/// layout.
pub fn cross_entropy(logits: ArrayView2<f32>, labels: ArrayView1<u8>, losses: ArrayViewMut1<f64>) {
    const K: &str = "cross_entropy";
    let (n, classes) = logits.dim();
    check_labels(K, &logits, &labels);
    assert_eq!(losses.len(), n, "{K}: losses is not [n]");
    let (logits, labels) = (values(logits, K, "logits"), values(labels, K, "labels"));
    let losses = values_mut(losses, K, "losses");
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
///
/// # Shapes
/// `values: [n]`.
///
/// # Panics
/// If the view is not in standard layout.
pub fn ordered_sum(values: ArrayView1<f64>) -> f64 {
    super::values(values, "ordered_sum", "values").iter().sum()
}

/// Gradient of `scale · Σᵢ CE(i)` with respect to the logits:
/// `dz[i] = scale · (softmax(z[i]) − onehot(label[i]))`, fully written.
///
/// # Shapes
/// `logits: [n, classes]`, `labels: [n]`, `dlogits: [n, classes]`.
///
/// # Panics
/// If the shapes do not match, a label is not below `classes`, or a view is not in standard
/// layout.
pub fn cross_entropy_backward(
    logits: ArrayView2<f32>,
    labels: ArrayView1<u8>,
    scale: f64,
    dlogits: ArrayViewMut2<f32>,
) {
    const K: &str = "cross_entropy_backward";
    let (n, classes) = logits.dim();
    check_labels(K, &logits, &labels);
    assert_eq!(
        dlogits.dim(),
        (n, classes),
        "{K}: dlogits is not [n, classes]"
    );
    let (logits, labels) = (values(logits, K, "logits"), values(labels, K, "labels"));
    let dlogits = values_mut(dlogits, K, "dlogits");
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
///
/// # Shapes
/// `row: [classes]`.
///
/// # Panics
/// If `row` is empty, or not in standard layout.
pub fn argmax(row: ArrayView1<f32>) -> usize {
    argmax_of(values(row, "argmax", "row"))
}

fn argmax_of(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] || (row[best].is_nan() && !v.is_nan()) {
            best = j;
        }
    }
    best
}

/// Number of samples whose [`argmax`] logit is the label.
///
/// # Shapes
/// `logits: [n, classes]`, `labels: [n]`.
///
/// # Panics
/// If the shapes do not match, `classes` is 0 while `n` is not, or a view is not in standard
/// layout.
pub fn correct(logits: ArrayView2<f32>, labels: ArrayView1<u8>) -> usize {
    const K: &str = "correct";
    let (n, classes) = logits.dim();
    check_labels(K, &logits, &labels);
    let (logits, labels) = (values(logits, K, "logits"), values(labels, K, "labels"));
    (0..n)
        .filter(|&i| argmax_of(&logits[i * classes..][..classes]) == usize::from(labels[i]))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self as tu, assert_close, config, numeric_grad, uniform, wide};
    use ndarray::{aview1, aview_mut1};
    use proptest::prelude::*;

    fn v2(n: usize, classes: usize, z: &[f32]) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((n, classes), z).expect("test shape")
    }

    #[test]
    fn cross_entropy_matches_hand_computed_values() {
        let logits = [0.0, 0.0, 1.0, 2.0, 3.0, 1000.0, 0.0, 1000.0, 0.0];
        let mut l = [f64::NAN; 3];
        cross_entropy(
            v2(1, 2, &logits[..2]),
            aview1(&[1]),
            aview_mut1(&mut l[..1]),
        );
        assert!((l[0] - 2f64.ln()).abs() < 1e-15);
        cross_entropy(
            v2(1, 3, &logits[2..5]),
            aview1(&[2]),
            aview_mut1(&mut l[..1]),
        );
        let want = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0;
        assert!((l[0] - want).abs() < 1e-14);
        // Large logits do not overflow: log-sum-exp is shifted by the maximum.
        cross_entropy(
            v2(2, 2, &logits[5..9]),
            aview1(&[0, 1]),
            aview_mut1(&mut l[..2]),
        );
        assert_eq!(l[0], 0.0);
        assert_eq!(l[1], 1000.0);
        assert_eq!(ordered_sum(aview1(&[1.0, 2.0, 3.5])), 6.5);
    }

    #[test]
    fn cross_entropy_gradient_matches_hand_computed_values() {
        let mut d = [f32::NAN; 4];
        let dv = ArrayViewMut2::from_shape((2, 2), &mut d).expect("test shape");
        cross_entropy_backward(v2(2, 2, &[0.0; 4]), aview1(&[0, 1]), 0.5, dv);
        assert_eq!(d, [-0.25, 0.25, 0.25, -0.25]);
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_index() {
        assert_eq!(argmax(aview1(&[1.0, 3.0, 3.0, 2.0])), 1);
        assert_eq!(argmax(aview1(&[5.0, 5.0])), 0);
        assert_eq!(argmax(aview1(&[f32::NAN, 1.0, 0.0])), 1);
        let logits = [1.0, 1.0, 0.0, 2.0, 3.0, 1.0];
        assert_eq!(correct(v2(3, 2, &logits), aview1(&[0, 1, 1])), 2);
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
            let dv = ArrayViewMut2::from_shape((n, classes), &mut dz).expect("test shape");
            cross_entropy_backward(v2(n, classes, &z), aview1(&labels), scale, dv);
            let loss = |z: &[f64]| scale * tu::cross_entropy(n, classes, z, &labels).iter().sum::<f64>();
            assert_close(&dz, &numeric_grad(loss, &wide(&z), 1e-5), 1e-5, 1e-6, "dz");

            let mut l = vec![f64::NAN; n];
            cross_entropy(v2(n, classes, &z), aview1(&labels), aview_mut1(&mut l));
            assert_close(&l, &tu::cross_entropy(n, classes, &wide(&z), &labels), 1e-12, 1e-12, "loss");
        }
    }
}
