//! Candidates of the final dense layer: a weight `(k, j)` moves logit `k` of every sample by
//! `Δ·x_j` (a bias by `Δ`), so a candidate costs O(B) given the logits and the layer's input.
//!
//! Without BatchNorm ([`cached`]) both come from the [store](super::store): the logits of the
//! whole training set (f64, class-major, kept current by [`update`] on every change of the
//! layer, O(N)) and its input transposed (so `x_j` of all samples is one contiguous row).
//! During the sweep of row `k`, `m_i = max_{c≠k} z_ic` and `s_i = Σ_{c≠k} exp(z_ic − m_i)` do
//! not change, so they are computed once per row for every sample ([`Rows`]); a sample's
//! cross-entropy at a candidate is then `m_i − z_i,label + ln(s_i + exp(z_ik − m_i))`: one
//! exponential per sample and candidate, and one logarithm per batch ([`LogProd`]).
//!
//! With BatchNorm ([`per_batch`]) the logits depend on the batch, so one forward pass of the
//! batch gives them and the layer's input, and the candidates are O(B) from there.

use super::store::act_len;
use super::util::{changes, combine, for_chunks, parallel, push_ce, LogProd};
use super::{Incremental, Visit};
use crate::network::{CpuNetwork, Mode, Op};
use rayon::prelude::*;

/// Samples per chunk of a candidate evaluation (fixed: results do not depend on threads).
const CHUNK: usize = 128;

/// Per-sample constants of one logit row `k`: the maximum and the sum of exponentials of the
/// other rows.
#[derive(Debug)]
struct Rows {
    k: usize,
    /// `Store::z_gen` when computed (valid while no row other than `k` has changed).
    gens: Vec<u64>,
    m: Vec<f64>,
    s: Vec<f64>,
}

/// State of the dense path.
#[derive(Debug, Default)]
pub(super) struct DenseState {
    rows: Option<Rows>,
    parts: Vec<[LogProd; 3]>,
}

impl DenseState {
    pub(super) fn forget_rows(&mut self) {
        self.rows = None;
    }
}

/// The layer's shape: `(d_in, d_out, weight, bias)`.
fn shape(net: &CpuNetwork, layer: usize) -> (usize, usize, usize, Option<usize>) {
    match net.plan[layer].op {
        Op::Dense {
            d_in,
            d_out,
            weight,
            bias,
        } => (d_in, d_out, weight, bias),
        _ => unreachable!("layer {layer} is not dense"),
    }
}

/// Which logit row and which input a scalar of the layer moves: `(k, Some(j))` for weight
/// `(k, j)`, `(k, None)` for bias `k`.
fn target(net: &CpuNetwork, layer: usize, param: usize, index: usize) -> (usize, Option<usize>) {
    let (d_in, _, weight, _) = shape(net, layer);
    if param == weight {
        (index / d_in, Some(index % d_in))
    } else {
        (index, None)
    }
}

/// The three losses for a scalar of the final dense layer (plan index `layer`) of a model
/// without BatchNorm, from the all-samples logits.
pub(super) fn cached(
    inc: &mut Incremental,
    net: &mut CpuNetwork,
    layer: usize,
    v: Visit,
) -> [f64; 3] {
    let Visit {
        batch,
        param,
        index,
        delta,
        reduction,
    } = v;
    let layers = net.plan.len();
    let classes = net.spec.classes;
    let n = net.train.len();
    inc.store.ensure(net, &inc.clock, &[layer], true);
    inc.store.ensure_xt(net, &inc.clock, layer);
    let (k, j) = target(net, layer, param, index);
    let [dp, dm] = changes(net.params.values[param][index], delta);
    let z = &inc.store.z.data;
    // Row constants: computed once per row of a weight sweep; a bias visit (one per row)
    // computes them for its batch only.
    let rows = match j {
        Some(_) => {
            let fresh = inc.dense.rows.as_ref().is_some_and(|r| {
                r.k == k
                    && r.gens
                        .iter()
                        .zip(&inc.store.z_gen)
                        .enumerate()
                        .all(|(c, (a, b))| c == k || a == b)
            });
            if !fresh {
                inc.dense.rows = Some(row_constants(z, n, classes, k, &inc.store.z_gen));
            }
            inc.dense.rows.as_ref()
        }
        None => None,
    };
    debug_assert!(inc.store.z.valid(&inc.clock, layers));
    let xt = j.map(|j| &inc.store.xt.data[j * n..(j + 1) * n]);
    let labels = &net.train.labels;
    let chunks = batch.len().div_ceil(CHUNK);
    let parts = super::util::grown(&mut inc.dense.parts, chunks, Default::default());
    for_chunks(
        batch.len(),
        CHUNK,
        parallel(batch.len() * 60),
        parts,
        |r, acc| {
            *acc = Default::default();
            let mut zrow = [0.0f64; 64];
            for &i in &batch[r] {
                let i = i as usize;
                let label = usize::from(labels[i]);
                let zk = z[k * n + i];
                let x = xt.map_or(1.0, |xt| f64::from(xt[i]));
                let (m, s) = match rows {
                    Some(rows) => (rows.m[i], rows.s[i]),
                    None => others(z, n, classes, k, i),
                };
                let zl = z[label * n + i];
                for (v, a) in acc.iter_mut().enumerate() {
                    let zk2 = match v {
                        0 => zk,
                        1 => zk + dp * x,
                        _ => zk + dm * x,
                    };
                    let zlab = if label == k { zk2 } else { zl };
                    let e = s + (zk2 - m).exp();
                    if e.is_finite() && e < 1e300 {
                        a.push(m - zlab, e);
                    } else if classes <= zrow.len() {
                        // Overflow (a logit far above the others) or non-finite logits: the plain
                        // shifted log-sum-exp of this sample.
                        for (c, zc) in zrow[..classes].iter_mut().enumerate() {
                            *zc = if c == k { zk2 } else { z[c * n + i] };
                        }
                        push_ce(a, &zrow[..classes], label);
                    } else {
                        a.push_value(f64::NAN);
                    }
                }
            }
        },
    );
    let sums = combine(&parts[..chunks]);
    sums.map(|s| reduction.finish(s, batch.len()))
}

/// `(max_{c≠k} z_c, Σ_{c≠k} exp(z_c − max))` of sample `i`.
#[inline(always)]
fn others(z: &[f64], n: usize, classes: usize, k: usize, i: usize) -> (f64, f64) {
    let mut m = f64::NEG_INFINITY;
    for c in (0..classes).filter(|&c| c != k) {
        m = m.max(z[c * n + i]);
    }
    let mut s = 0.0;
    for c in (0..classes).filter(|&c| c != k) {
        s += (z[c * n + i] - m).exp();
    }
    (m, s)
}

fn row_constants(z: &[f64], n: usize, classes: usize, k: usize, gens: &[u64]) -> Rows {
    let mut m = vec![0.0; n];
    let mut s = vec![0.0; n];
    const C: usize = 4096;
    let task = |(b, (m, s)): (usize, (&mut [f64], &mut [f64]))| {
        for (t, (m, s)) in m.iter_mut().zip(s.iter_mut()).enumerate() {
            (*m, *s) = others(z, n, classes, k, b * C + t);
        }
    };
    if parallel(n * classes * 20) {
        m.par_chunks_mut(C)
            .zip(s.par_chunks_mut(C))
            .enumerate()
            .for_each(task);
    } else {
        m.chunks_mut(C)
            .zip(s.chunks_mut(C))
            .enumerate()
            .for_each(task);
    }
    Rows {
        k,
        gens: gens.to_vec(),
        m,
        s,
    }
}

/// Keeps the all-samples logits current after scalar `index` of array `param` (of the dense
/// layer at plan index `layer`) changed from `old` to `new`: row `k` moves by `(new − old)·x_j`
/// (or by `new − old` for a bias). The caller checked that the logits and the transposed input
/// are valid.
pub(super) fn update(
    inc: &mut Incremental,
    net: &CpuNetwork,
    layer: usize,
    param: usize,
    index: usize,
    old: f32,
    new: f32,
) {
    let n = net.train.len();
    let (k, j) = target(net, layer, param, index);
    let d = f64::from(new) - f64::from(old);
    let row = &mut inc.store.z.data[k * n..(k + 1) * n];
    const C: usize = 8192;
    match j {
        Some(j) => {
            let x = &inc.store.xt.data[j * n..(j + 1) * n];
            let task = |(row, x): (&mut [f64], &[f32])| {
                for (z, &x) in row.iter_mut().zip(x) {
                    *z += d * f64::from(x);
                }
            };
            if parallel(n * 4) {
                row.par_chunks_mut(C).zip(x.par_chunks(C)).for_each(task);
            } else {
                row.chunks_mut(C).zip(x.chunks(C)).for_each(task);
            }
        }
        None => row.iter_mut().for_each(|z| *z += d),
    }
    inc.store.z.tick = Some(inc.clock.now());
    inc.store.z_gen[k] += 1;
}

/// The three losses for a scalar of the final dense layer (plan index `layer`) of a model with
/// BatchNorm: one forward pass of the batch, then O(B) per candidate.
pub(super) fn per_batch(
    inc: &mut Incremental,
    net: &mut CpuNetwork,
    layer: usize,
    v: Visit,
) -> [f64; 3] {
    let Visit {
        batch,
        param,
        index,
        delta,
        reduction,
    } = v;
    let b = batch.len();
    let classes = net.spec.classes;
    net.load_batch(batch);
    net.forward_from(0, b, Mode::Train, true);
    let (k, j) = target(net, layer, param, index);
    let [dp, dm] = changes(net.params.values[param][index], delta);
    let d_in = act_len(net, layer);
    let x = &net.ws.acts[layer][..b * d_in];
    let logits = &net.ws.acts[net.plan.len()][..b * classes];
    let labels = &net.ws.labels[..b];
    let chunks = b.div_ceil(CHUNK);
    let parts = super::util::grown(&mut inc.dense.parts, chunks, Default::default());
    for_chunks(b, CHUNK, parallel(b * classes * 30), parts, |r, acc| {
        *acc = Default::default();
        let mut zrow = [0.0f64; 64];
        for t in r {
            let label = usize::from(labels[t]);
            let xj = j.map_or(1.0, |j| f64::from(x[t * d_in + j]));
            if classes > zrow.len() {
                acc.iter_mut().for_each(|a| a.push_value(f64::NAN));
                continue;
            }
            for (v, a) in acc.iter_mut().enumerate() {
                for (zc, &l) in zrow.iter_mut().zip(&logits[t * classes..(t + 1) * classes]) {
                    *zc = f64::from(l);
                }
                match v {
                    0 => {}
                    1 => zrow[k] += dp * xj,
                    _ => zrow[k] += dm * xj,
                }
                push_ce(a, &zrow[..classes], label);
            }
        }
    });
    let sums = combine(&parts[..chunks]);
    sums.map(|s| reduction.finish(s, b))
}
