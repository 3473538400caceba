//! Test helpers of this crate's unit tests: what they share with the rest of the workspace
//! comes from `rso-testkit` (the tolerance, seeded data, the proptest set-up); here are the
//! pieces only this engine's tests need: finite differences and naive f64 loop implementations
//! of every layer (the oracle of the kernels and of the whole network).

use proptest::test_runner::Config;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rso_models::spec::BN_EPS;
use rso_models::{Layer, ModelSpec};
use rso_testkit::Tol;

pub use rso_testkit::{rng, uniform, wide};

/// The proptest configuration of this crate: `cases` cases from a fixed seed, no persistence.
pub fn config(cases: u32) -> Config {
    rso_testkit::proptest_config(cases, 0x5e_ed)
}

/// Asserts `|actual − expected| ≤ atol + rtol·|expected|` elementwise (NaN fails), naming the
/// first offending element: [`Tol::assert_close`].
#[track_caller]
pub fn assert_close<A: Copy + Into<f64>>(
    actual: &[A],
    expected: &[f64],
    rtol: f64,
    atol: f64,
    what: &str,
) {
    Tol { rtol, atol }.assert_close(what, actual, expected);
}

/// `len` integers in `[-a, a]`, as f32.
pub fn integers(rng: &mut ChaCha8Rng, len: usize, a: i32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-a..=a) as f32).collect()
}

/// `Σ r·y`, the scalar a gradient check differentiates.
pub fn dot(r: &[f32], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(&r, &y)| f64::from(r) * y).sum()
}

/// Central differences of `f` at `x` for every coordinate, step `h`.
pub fn numeric_grad(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + h;
            let up = f(&x);
            x[i] = x0 - h;
            let down = f(&x);
            x[i] = x0;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Naive 3×3 pad-1 convolution of `n` images `[c_in, h, w]`.
#[allow(clippy::too_many_arguments)]
pub fn conv(
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    x: &[f64],
    wt: &[f64],
    b: Option<&[f64]>,
) -> Vec<f64> {
    let mut y = vec![0.0; n * c_out * h * w];
    for i in 0..n {
        for co in 0..c_out {
            for oy in 0..h {
                for ox in 0..w {
                    let mut s = b.map_or(0.0, |b| b[co]);
                    for ci in 0..c_in {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) =
                                    (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((i * c_in + ci) * h + iy as usize) * w + ix as usize];
                                s += wt[((co * c_in + ci) * 3 + ky) * 3 + kx] * xv;
                            }
                        }
                    }
                    y[((i * c_out + co) * h + oy) * w + ox] = s;
                }
            }
        }
    }
    y
}

/// Naive 2×2 pooling of `planes` planes, max (first maximum wins) or mean.
pub fn pool2(planes: usize, h: usize, w: usize, x: &[f64], max: bool) -> Vec<f64> {
    let (oh, ow) = (h / 2, w / 2);
    let mut y = vec![0.0; planes * oh * ow];
    for p in 0..planes {
        for oy in 0..oh {
            for ox in 0..ow {
                let v: Vec<f64> = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|&(dy, dx)| x[(p * h + 2 * oy + dy) * w + 2 * ox + dx])
                    .collect();
                y[(p * oh + oy) * ow + ox] = if max {
                    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                } else {
                    v.iter().sum::<f64>() / 4.0
                };
            }
        }
    }
    y
}

/// Naive global mean pooling.
pub fn gap(planes: usize, hw: usize, x: &[f64]) -> Vec<f64> {
    (0..planes)
        .map(|p| x[p * hw..(p + 1) * hw].iter().sum::<f64>() / hw as f64)
        .collect()
}

/// Naive ReLU.
pub fn relu(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v.max(0.0)).collect()
}

/// Naive batch norm; with `stats = None` uses the batch's mean and biased variance, which it
/// returns.
#[allow(clippy::type_complexity)]
pub fn batchnorm(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    stats: Option<(&[f64], &[f64])>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let m = (n * hw) as f64;
    let at = |i: usize, ch: usize, k: usize| x[(i * c + ch) * hw + k];
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    for ch in 0..c {
        if let Some((mu, v)) = stats {
            (mean[ch], var[ch]) = (mu[ch], v[ch]);
            continue;
        }
        let vals: Vec<f64> = (0..n)
            .flat_map(|i| (0..hw).map(move |k| (i, k)))
            .map(|(i, k)| at(i, ch, k))
            .collect();
        mean[ch] = vals.iter().sum::<f64>() / m;
        var[ch] = vals.iter().map(|v| (v - mean[ch]).powi(2)).sum::<f64>() / m;
    }
    let mut y = vec![0.0; x.len()];
    for i in 0..n {
        for ch in 0..c {
            for k in 0..hw {
                let xhat = (at(i, ch, k) - mean[ch]) / (var[ch] + f64::from(BN_EPS)).sqrt();
                y[(i * c + ch) * hw + k] = gamma[ch] * xhat + beta[ch];
            }
        }
    }
    (y, mean, var)
}

/// Naive dense layer `y = W x + b`.
pub fn dense(
    n: usize,
    d_in: usize,
    d_out: usize,
    x: &[f64],
    wt: &[f64],
    b: Option<&[f64]>,
) -> Vec<f64> {
    let mut y = vec![0.0; n * d_out];
    for i in 0..n {
        for j in 0..d_out {
            y[i * d_out + j] = b.map_or(0.0, |b| b[j])
                + (0..d_in)
                    .map(|k| wt[j * d_in + k] * x[i * d_in + k])
                    .sum::<f64>();
        }
    }
    y
}

/// Naive per-sample cross-entropy.
pub fn cross_entropy(n: usize, classes: usize, z: &[f64], labels: &[u8]) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let row = &z[i * classes..(i + 1) * classes];
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[usize::from(labels[i])]
        })
        .collect()
}

/// Naive forward of a whole model on `n` images; BatchNorm with batch statistics, or with the
/// given running statistics (one `(mean, var)` per BatchNorm layer). Returns the logits.
pub fn forward(
    spec: &ModelSpec,
    params: &[Vec<f64>],
    images: &[f64],
    n: usize,
    running: Option<&[(Vec<f64>, Vec<f64>)]>,
) -> Vec<f64> {
    let [mut c, mut h, mut w] = spec.input;
    let mut x = images.to_vec();
    let (mut p, mut bn) = (0, 0);
    for layer in &spec.layers {
        x = match layer {
            Layer::Conv { c_out, bias, .. } => {
                let b = bias.then(|| params[p + 1].as_slice());
                let y = conv(n, c, *c_out, h, w, &x, &params[p], b);
                p += 1 + usize::from(*bias);
                c = *c_out;
                y
            }
            Layer::Relu => relu(&x),
            Layer::MaxPool2 | Layer::AvgPool2 => {
                let y = pool2(n * c, h, w, &x, matches!(layer, Layer::MaxPool2));
                (h, w) = (h / 2, w / 2);
                y
            }
            Layer::BatchNorm { .. } => {
                let stats = running.map(|r| (r[bn].0.as_slice(), r[bn].1.as_slice()));
                let (y, _, _) = batchnorm(n, c, h * w, &x, &params[p], &params[p + 1], stats);
                p += 2;
                bn += 1;
                y
            }
            Layer::GlobalAvgPool => {
                let y = gap(n * c, h * w, &x);
                (h, w) = (1, 1);
                y
            }
            Layer::Dense {
                d_in, d_out, bias, ..
            } => {
                let b = bias.then(|| params[p + 1].as_slice());
                let y = dense(n, *d_in, *d_out, &x, &params[p], b);
                p += 1 + usize::from(*bias);
                (c, h, w) = (*d_out, 1, 1);
                y
            }
        };
    }
    x
}

/// Counts heap allocations per thread, so tests can check that hot paths allocate nothing.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// The one other `unsafe` of the crate: a test allocator must implement `GlobalAlloc`.
#[allow(unsafe_code)]
// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Heap allocations made so far by the calling thread.
pub fn allocations() -> usize {
    ALLOCATIONS.with(|a| a.get())
}
