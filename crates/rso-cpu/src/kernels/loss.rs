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
