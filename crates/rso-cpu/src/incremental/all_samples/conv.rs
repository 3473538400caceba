//! Candidates of a convolution in a model without BatchNorm (`one-conv`, `two-conv`).
//!
//! A scalar of output channel `k` (weight `(k, c, ky, kx)` or bias `k`) changes channel `k` of
//! the layer's output only: by `Δ·shift(x_c)` for a weight, by `Δ` for a bias. The ReLU and
//! pooling after it (the *tail*) act on each channel alone, so the next parameter layer sees one
//! changed input channel:
//! - a dense layer: the logits move by `W_fc[:, block k]·Δo_k` (O(B·classes·|block|));
//! - a convolution: its output moves by `W_next[:, k] ⊛ Δo_k` (one input channel instead of
//!   all), after which the rest of the network (ReLU, pooling, dense) runs on the batch.
//!
//! Everything is relative to a *snapshot*: all-samples arrays from the
//! [store](super::store) — the input of the layer, the input of the next parameter layer
//! (`O`), and either the logits (next layer dense) or the next convolution's output (`P`) —
//! consistent with the layer's weights `W_snap` at some moment. Channels whose weights differ
//! from the snapshot are *dirty*: a visit recomputes, for the batch only, channel `k` and every
//! dirty channel from the cached input (`c_in·9·h·w` multiply-adds per sample and channel) and
//! adds their differences to the snapshot. *Folding* a dirty channel brings the snapshot up to
//! date for the whole training set (the same work for N samples instead of B). RSO visits the
//! `9·c_in` weights of a channel one after the other, so a channel is dirty while it is being
//! visited and stays dirty until folded; a visit folds the other dirty channels when the visits
//! left in the layer times the batch size exceed the training-set size (each later visit would
//! otherwise redo that work on its batch) — with a convolution next, only when the dirty
//! channels' excess also pays for the fold's pass over that convolution's whole output (read
//! and written once per fold, however many channels it folds) — and the end of the layer's
//! sweep folds everything, so the arrays are current for the next layer's sweep without a
//! forward pass of the training set.
//!
//! When the store also keeps the layer's own output (the pre-activation; `two-conv`'s second
//! convolution), folds keep it current, and channel `k`'s pre-activation for a visit is the
//! stored plane plus one convolution of input channels `..ng` with the weight changes since the
//! snapshot (zero where unchanged; `ng` one past the last input channel with a change) and the
//! bias change: RSO visits a channel's taps input channel by input channel, so on average this
//! is half the convolution, and never more (it is used while `ng < c_in`).
//!
//! The base loss goes through exactly the same arithmetic as the candidates (with channel `k`'s
//! pre-activation unchanged), so a candidate that changes nothing for the batch (a zero input
//! plane, or `w ± δ == w` in f32) ties with W exactly, as on the reference path.

use crate::executor::{layer_forward, Executor, Op};
use crate::incremental::util::{
    add_shifted, changes, combine, for_chunks, grown, parallel, push_ce, with_scratch,
    with_scratch_b, LogProd,
};
use crate::incremental::{Clock, Incremental, Visit};
use crate::kernels::conv::{conv3x3_forward, Conv3x3};
use crate::kernels::pool::{avgpool2_forward, maxpool2_forward};
use crate::kernels::relu::relu_forward;
use crate::simd::{prefetch, prefetch_slice};
use rayon::prelude::*;
use std::ops::Range;

/// Samples per chunk of a visit (fixed: results do not depend on the thread count).
const CHUNK: usize = 32;
/// Samples per chunk of a fold.
const FOLD_CHUNK: usize = 64;

/// A channel-local layer between the convolution and the next parameter layer, with the plane
/// shape of its input.
#[derive(Clone, Copy, Debug)]
enum Tail {
    Relu { hw: usize },
    Max { h: usize, w: usize },
    Avg { h: usize, w: usize },
}

impl Tail {
    fn out_hw(self) -> usize {
        match self {
            Tail::Relu { hw } => hw,
            Tail::Max { h, w } | Tail::Avg { h, w } => (h / 2) * (w / 2),
        }
    }

    fn apply(self, planes: usize, x: &[f32], y: &mut [f32]) {
        match self {
            Tail::Relu { hw } => relu_forward(&x[..planes * hw], &mut y[..planes * hw]),
            Tail::Max { h, w } => maxpool2_forward(planes, h, w, x, y),
            Tail::Avg { h, w } => avgpool2_forward(planes, h, w, x, y),
        }
    }
}

/// Runs the tail on `planes` planes of `x` into `out`, using `tmp` in between.
fn run_tail(tail: &[Tail], planes: usize, x: &[f32], tmp: &mut [f32], out: &mut [f32]) {
    let m = tail.len();
    if m == 0 {
        out.copy_from_slice(x);
        return;
    }
    for (q, op) in tail.iter().enumerate() {
        let to_out = (m - 1 - q).is_multiple_of(2);
        match (q == 0, to_out) {
            (true, true) => op.apply(planes, x, out),
            (true, false) => op.apply(planes, x, tmp),
            (false, true) => op.apply(planes, tmp, out),
            (false, false) => op.apply(planes, out, tmp),
        }
    }
}

/// The parameter layer after the convolution.
#[derive(Clone, Copy, Debug)]
enum Next {
    /// The final dense layer (plan index, input length, weight array).
    Dense {
        layer: usize,
        d_in: usize,
        weight: usize,
    },
    /// A convolution (plan index, shape, weight array).
    Conv {
        layer: usize,
        conv: Conv3x3,
        weight: usize,
    },
}

/// The snapshot of one convolution's sweep (see the module docs).
#[derive(Debug)]
pub(crate) struct ConvCache {
    /// Plan index of the convolution.
    pub(crate) layer: usize,
    conv: Conv3x3,
    weight: usize,
    bias: Option<usize>,
    tail: Vec<Tail>,
    /// Plane size after the tail.
    hw_out: usize,
    next: Next,
    /// Clock tick of the snapshot: every other layer must be unchanged since.
    created: u64,
    w_snap: Vec<f32>,
    b_snap: Vec<f32>,
    /// Dirty channels other than the visited one (reused buffer).
    dirty: Vec<usize>,
    /// The next convolution's weights of the dirty channels, `[c_out_next][dirty][9]`, and of
    /// channel `k`, `[c_out_next][9]`.
    w_dirty: Vec<f32>,
    w_k: Vec<f32>,
    parts: Vec<[LogProd; 3]>,
    /// Fold: logit changes `[N][classes]`.
    dz: Vec<f64>,
    /// Whether the store holds this layer's output (valid at the snapshot), which folds then
    /// keep current.
    own_out: bool,
    /// Channel k's changes since the snapshot (reused buffer).
    k_changes: Vec<(usize, f32)>,
    /// Next layer dense: its weights of the dirty channels then of channel `k`, per channel
    /// `[hwo][cp]` in f64 (`cp`: the classes rounded up to a multiple of 4, zero-padded), so
    /// that a sample's logit changes are one vectorised pass over its output plane.
    wt: Vec<f64>,
    /// Channel k's weight changes since the snapshot, `[ng][9]` (reused buffer).
    dw: Vec<f32>,
}

impl ConvCache {
    /// The cache of the convolution at plan index `layer`, or `None` when what follows it is not
    /// a channel-local tail then a convolution or the final dense layer.
    fn new(exec: &Executor, layer: usize, created: u64) -> Option<ConvCache> {
        let Op::Conv { conv, weight, bias } = exec.plan[layer].op else {
            return None;
        };
        let mut tail = Vec::new();
        let (mut h, mut w) = (conv.h, conv.w);
        let mut i = layer + 1;
        let next = loop {
            let op = &exec.plan.get(i)?.op;
            match *op {
                Op::Relu => tail.push(Tail::Relu { hw: h * w }),
                Op::MaxPool { c, h: ph, w: pw } | Op::AvgPool { c, h: ph, w: pw } => {
                    if c != conv.c_out || (ph, pw) != (h, w) {
                        return None;
                    }
                    tail.push(if matches!(op, Op::MaxPool { .. }) {
                        Tail::Max { h, w }
                    } else {
                        Tail::Avg { h, w }
                    });
                    (h, w) = (h / 2, w / 2);
                }
                Op::Dense { d_in, weight, .. } => {
                    if i + 1 != exec.plan.len() || d_in != conv.c_out * h * w {
                        return None;
                    }
                    break Next::Dense {
                        layer: i,
                        d_in,
                        weight,
                    };
                }
                Op::Conv {
                    conv: next, weight, ..
                } => {
                    if next.c_in != conv.c_out || (next.h, next.w) != (h, w) {
                        return None;
                    }
                    break Next::Conv {
                        layer: i,
                        conv: next,
                        weight,
                    };
                }
                _ => return None,
            }
            i += 1;
        };
        let p = &exec.params.values;
        Some(ConvCache {
            layer,
            conv,
            weight,
            bias,
            hw_out: tail.iter().fold(conv.h * conv.w, |_, t| t.out_hw()),
            tail,
            next,
            created,
            w_snap: p[weight].clone(),
            b_snap: bias.map_or_else(Vec::new, |b| p[b].clone()),
            dirty: Vec::with_capacity(conv.c_out),
            w_dirty: Vec::new(),
            w_k: Vec::new(),
            parts: Vec::new(),
            dz: Vec::new(),
            own_out: false,
            k_changes: Vec::new(),
            wt: Vec::new(),
            dw: Vec::new(),
        })
    }

    /// Plan index of the next parameter layer (`O` is activation `next_index`).
    fn next_index(&self) -> usize {
        match self.next {
            Next::Dense { layer, .. } | Next::Conv { layer, .. } => layer,
        }
    }

    /// Whether every layer other than this one is unchanged since the snapshot.
    pub(crate) fn valid(&self, clock: &Clock, layers: usize) -> bool {
        clock.unchanged_since(self.created, 0..self.layer)
            && clock.unchanged_since(self.created, self.layer + 1..layers)
    }

    /// Whether channel `c` differs from the snapshot.
    fn is_dirty(&self, exec: &Executor, c: usize) -> bool {
        let taps = self.conv.taps();
        let w = &exec.params.values[self.weight][c * taps..(c + 1) * taps];
        let bits = |v: &[f32], s: &[f32]| v.iter().zip(s).any(|(a, b)| a.to_bits() != b.to_bits());
        bits(w, &self.w_snap[c * taps..(c + 1) * taps])
            || self
                .bias
                .is_some_and(|b| exec.params.values[b][c].to_bits() != self.b_snap[c].to_bits())
    }

    /// Makes the current weights of channels `chans` the snapshot's.
    fn update_snapshot(&mut self, exec: &Executor, chans: &[usize]) {
        let taps = self.conv.taps();
        for &c in chans {
            let w = &exec.params.values[self.weight][c * taps..(c + 1) * taps];
            self.w_snap[c * taps..(c + 1) * taps].copy_from_slice(w);
            if let Some(b) = self.bias {
                self.b_snap[c] = exec.params.values[b][c];
            }
        }
    }

    /// Collects the next convolution's weights of input channels `chans` as `[c_out][chans][9]`.
    fn gather_next(exec: &Executor, next: Next, chans: &[usize], out: &mut Vec<f32>) {
        let Next::Conv { conv, weight, .. } = next else {
            return;
        };
        let w = &exec.params.values[weight];
        out.clear();
        for o in 0..conv.c_out {
            for &c in chans {
                out.extend_from_slice(&w[(o * conv.c_in + c) * 9..][..9]);
            }
        }
    }
}

/// Channel `c` of the convolution on `n` samples of `x` with the current weights: `[n][h·w]`.
fn conv_channel(exec: &Executor, cache: &ConvCache, c: usize, n: usize, x: &[f32], y: &mut [f32]) {
    let s = Conv3x3 {
        c_out: 1,
        ..cache.conv
    };
    let taps = cache.conv.taps();
    let w = &exec.params.values[cache.weight][c * taps..(c + 1) * taps];
    let b = cache.bias.map(|b| &exec.params.values[b][c..c + 1]);
    conv3x3_forward(&s, n, x, w, b, y);
}

/// The input rows of the convolution for the whole training set.
fn inputs<'a>(exec: &'a Executor, store_in: &'a [f32], layer: usize) -> &'a [f32] {
    if layer == 0 {
        &exec.train.images
    } else {
        store_in
    }
}

/// The three losses for a scalar of the convolution at plan index `layer`, or `None` when the
/// layers after it are not supported (the caller then takes the reference path).
pub(crate) fn visit(
    inc: &mut Incremental,
    exec: &mut Executor,
    layer: usize,
    v: Visit,
) -> Option<[f64; 3]> {
    let layers = exec.plan.len();
    let n_train = exec.train.len();
    // The snapshot logits are read directly: no dense-weight change may be pending, and they
    // must be in sample order.
    inc.store.settle();
    let fresh = inc
        .conv
        .as_ref()
        .is_some_and(|c| c.layer == layer && c.valid(&inc.clock, layers));
    if !fresh {
        let cache = ConvCache::new(exec, layer, 0)?;
        inc.finish_conv(exec);
        let o = cache.next_index();
        let mut want = vec![o];
        if layer > 0 {
            want.push(layer);
        }
        let logits = matches!(cache.next, Next::Dense { .. });
        if !logits {
            want.push(o + 1);
        }
        inc.store.ensure(exec, &inc.clock, &want, logits);
        let own = inc.store.acts.get(layer + 1).is_some_and(|s| {
            s.valid(&inc.clock, layer + 1) && s.data.len() == n_train * exec.plan[layer].out_len
        });
        inc.conv = Some(ConvCache {
            created: inc.clock.now(),
            own_out: own,
            ..cache
        });
    }
    let mut cache = inc.conv.take().expect("conv cache");
    let out = visit_cached(inc, &mut cache, exec, v, n_train);
    inc.conv = Some(cache);
    Some(out)
}

fn visit_cached(
    inc: &mut Incremental,
    cache: &mut ConvCache,
    exec: &mut Executor,
    v: Visit,
    n_train: usize,
) -> [f64; 3] {
    let Visit {
        batch,
        param,
        index,
        delta,
        reduction,
    } = v;
    let conv = cache.conv;
    let taps = conv.taps();
    let (k, tap) = if param == cache.weight {
        (index / taps, Some(index % taps))
    } else {
        (index, None)
    };
    let [dp, dm] = changes(exec.params.values[param][index], delta);
    // Channel k's changes since the snapshot, `(tap, Δ)` (`tap == taps`: the bias). When the
    // store keeps the layer's output at the snapshot and they are fewer than the taps, channel
    // k's pre-activation is that output plus one shifted input plane per change, instead of a
    // convolution over all taps.
    let mut k_changes = std::mem::take(&mut cache.k_changes);
    k_changes.clear();
    {
        let p = &exec.params.values;
        let w = &p[cache.weight][k * taps..(k + 1) * taps];
        for (t, (&a, &b)) in w.iter().zip(&cache.w_snap[k * taps..]).enumerate() {
            if a.to_bits() != b.to_bits() {
                k_changes.push((t, a - b));
            }
        }
        if let Some(b) = cache.bias {
            if p[b][k].to_bits() != cache.b_snap[k].to_bits() {
                k_changes.push((taps, p[b][k] - cache.b_snap[k]));
            }
        }
    }
    // Channel k from the snapshot: its stored pre-activation plus one convolution of the input
    // channels `..ng` with the weight changes (zero where unchanged) and the bias change: at
    // most the work of the convolution itself, usually much less (RSO visits the taps input
    // channel by input channel, so the changes since the snapshot cover the first few).
    let ng = k_changes
        .iter()
        .filter(|&&(tp, _)| tp < taps)
        .map(|&(tp, _)| tp / 9 + 1)
        .max()
        .unwrap_or(0);
    let from_snapshot = cache.own_out && ng < conv.c_in;
    let mut dw = std::mem::take(&mut cache.dw);
    dw.clear();
    dw.resize(ng * 9, 0.0);
    let mut db = None;
    for &(tp, d) in &k_changes {
        if tp < taps {
            dw[tp] = d;
        } else {
            db = Some(d);
        }
    }
    let mut dirty = std::mem::take(&mut cache.dirty);
    dirty.clear();
    dirty.extend((0..conv.c_out).filter(|&c| c != k && cache.is_dirty(exec, c)));
    if !dirty.is_empty() {
        let w_len = exec.params.values[cache.weight].len();
        let b_len = cache.bias.map_or(0, |b| exec.params.values[b].len());
        let remaining = if param == cache.weight {
            w_len - index + b_len
        } else {
            b_len - index
        };
        // Folding costs about N samples' worth of what keeping the channels dirty costs each
        // later visit (B samples): fold when the visits left would cost more. With a
        // convolution next, a fold also reads and writes the next convolution's whole output
        // once, whatever the number of channels folded (about as much again per sample as
        // the channels themselves): fold there when the dirty channels' extra cost pays for
        // that too.
        let rb = remaining.saturating_mul(batch.len());
        let fold_now = match cache.next {
            Next::Dense { .. } => rb >= n_train,
            Next::Conv { .. } => {
                rb >= n_train && dirty.len().saturating_mul(rb - n_train) >= 2 * n_train
            }
        };
        if fold_now {
            fold(inc, cache, exec, &dirty);
            dirty.clear();
        }
    }
    ConvCache::gather_next(exec, cache.next, &dirty, &mut cache.w_dirty);
    ConvCache::gather_next(exec, cache.next, &[k], &mut cache.w_k);

    let (h, w) = (conv.h, conv.w);
    let hw = h * w;
    let in_len = conv.in_len();
    let hwo = cache.hw_out;
    let o_idx = cache.next_index();
    let o_len = conv.c_out * hwo;
    let nd = dirty.len();
    let classes = exec.spec.classes;
    let layers = exec.plan.len();
    let exec: &Executor = exec;
    let store = &inc.store;
    let x_all = inputs(
        exec,
        store.acts.get(cache.layer).map_or(&[][..], |s| &s.data[..]),
        cache.layer,
    );
    let o_all = &store.acts[o_idx].data;
    let labels = &exec.train.labels;
    let params = &exec.params.values;
    let plan = &exec.plan;
    let mut parts = std::mem::take(&mut cache.parts);
    let own_all: &[f32] = if from_snapshot {
        &store.acts[cache.layer + 1].data
    } else {
        &[]
    };
    let cp = classes.div_ceil(4) * 4;
    if let Next::Dense { d_in, weight, .. } = cache.next {
        let wf = &params[weight];
        cache.wt.clear();
        cache.wt.resize((nd + 1) * hwo * cp, 0.0);
        for (q, &c) in dirty.iter().chain([k].iter()).enumerate() {
            let dst = &mut cache.wt[q * hwo * cp..(q + 1) * hwo * cp];
            for cls in 0..classes {
                let row = &wf[cls * d_in + c * hwo..][..hwo];
                for (p, &v) in row.iter().enumerate() {
                    dst[p * cp + cls] = f64::from(v);
                }
            }
        }
    }
    let dw_ref = &dw[..];
    let cache_ref = &*cache;
    let dirty_ref = &dirty;
    // Per-sample work, for the threading choice.
    let next_work = match cache.next {
        Next::Dense { .. } => 3 * classes * hwo * (nd + 1),
        Next::Conv { layer, .. } => {
            3 * plan[layer..].iter().map(|s| s.work).sum::<usize>() / conv.c_out.max(1)
                + plan[layer + 1..].iter().map(|s| s.work).sum::<usize>() * 3
        }
    };
    let work = batch.len() * ((nd + 1) * conv.macs() / conv.c_out + 3 * hw + next_work);
    let chunks = batch.len().div_ceil(CHUNK);
    let parts_s = grown(&mut parts, chunks, Default::default());
    for_chunks(batch.len(), CHUNK, parallel(work), parts_s, |r, acc| {
        *acc = Default::default();
        let idx = &batch[r];
        let nc = idx.len();
        // Scratch: pre | cand | tmp | dO | dK. The samples' inputs are read where they are
        // (one convolution call per sample), not gathered: copying them was a third of the
        // memory traffic of a visit.
        let sizes = [nc * hw, nc * hw, nc * hw, nc * nd * hwo, 3 * nc * hwo];
        let x_of = |t: usize| &x_all[idx[t] as usize * in_len..][..in_len];
        let conv_rows = |c: usize, out: &mut [f32]| {
            if in_len <= 1024 {
                // Small inputs (the images): gathered, so one kernel call covers the chunk.
                with_scratch_b(nc * in_len, |xg| {
                    for (t, dst) in xg.chunks_exact_mut(in_len).enumerate() {
                        dst.copy_from_slice(x_of(t));
                    }
                    conv_channel(exec, cache_ref, c, nc, xg, out);
                });
            } else {
                for (t, y) in out.chunks_exact_mut(hw).enumerate() {
                    if t + 2 < nc {
                        prefetch_slice(x_of(t + 2));
                    }
                    conv_channel(exec, cache_ref, c, 1, x_of(t), y);
                }
            }
        };
        with_scratch(sizes.iter().sum(), |s| {
            let (pre, s) = s.split_at_mut(sizes[0]);
            let (cand, s) = s.split_at_mut(sizes[1]);
            let (tmp, s) = s.split_at_mut(sizes[2]);
            let (d_o, dk) = s.split_at_mut(sizes[3]);
            // Dirty channels: current output minus snapshot, `[t][dirty][hwo]`.
            for (q, &c) in dirty_ref.iter().enumerate() {
                conv_rows(c, pre);
                // The tail's output goes to `cand` (free until channel k).
                run_tail(&cache_ref.tail, nc, pre, tmp, &mut cand[..nc * hwo]);
                for (t, &i) in idx.iter().enumerate() {
                    let snap = &o_all[i as usize * o_len + c * hwo..][..hwo];
                    let dst = &mut d_o[(t * nd + q) * hwo..][..hwo];
                    for ((d, &o), &s) in dst.iter_mut().zip(&cand[t * hwo..]).zip(snap) {
                        *d = o - s;
                    }
                }
            }
            // Channel k at W, W + Δ, W − Δ: `[v][t][hwo]`.
            if from_snapshot {
                let own_len = conv.out_len();
                let s = Conv3x3 {
                    c_in: ng,
                    c_out: 1,
                    ..conv
                };
                // The samples' input channels `..ng` gathered (the rows of a sample two ahead
                // prefetched: random rows of arrays far larger than the caches), then one
                // convolution call for the chunk.
                let gl = ng * hw;
                with_scratch_b(nc * gl + nc * hw, |buf| {
                    let (xg, y) = buf.split_at_mut(nc * gl);
                    for (t, dst) in xg.chunks_exact_mut(gl.max(1)).enumerate().take(nc) {
                        if let Some(&a) = idx.get(t + 2) {
                            let a = a as usize;
                            prefetch_slice(&own_all[a * own_len + k * hw..][..hw]);
                            prefetch_slice(&x_all[a * in_len..][..gl]);
                        }
                        if gl > 0 {
                            dst.copy_from_slice(&x_of(t)[..gl]);
                        }
                    }
                    if ng > 0 {
                        conv3x3_forward(&s, nc, xg, dw_ref, None, y);
                    }
                    for (t, out) in pre.chunks_exact_mut(hw).enumerate() {
                        let i = idx[t] as usize;
                        let own = &own_all[i * own_len + k * hw..][..hw];
                        if ng > 0 {
                            for ((o, &a), &b) in out.iter_mut().zip(own).zip(&y[t * hw..]) {
                                *o = a + b;
                            }
                        } else {
                            out.copy_from_slice(own);
                        }
                        if let Some(d) = db {
                            out.iter_mut().for_each(|o| *o += d);
                        }
                    }
                });
            } else {
                conv_rows(k, pre);
            }
            // The snapshot planes and logits the rest reads (random rows; see above).
            for &i in idx {
                let i = i as usize;
                prefetch_slice(&o_all[i * o_len + k * hwo..][..hwo]);
                if let Next::Dense { .. } = cache_ref.next {
                    for cls in 0..classes {
                        prefetch(&store.z.data[cls * n_train + i]);
                    }
                }
            }
            for v in 0..3 {
                let d = [0.0, dp as f32, dm as f32][v];
                match (v, tap) {
                    (0, _) => cand.copy_from_slice(pre),
                    (_, Some(tap)) => {
                        let (ci, ky, kx) = (tap / 9, (tap % 9) / 3, tap % 3);
                        for t in 0..nc {
                            add_shifted(
                                h,
                                w,
                                &pre[t * hw..],
                                &x_of(t)[ci * hw..],
                                ky,
                                kx,
                                d,
                                &mut cand[t * hw..],
                            );
                        }
                    }
                    (_, None) => {
                        for (c, &p) in cand.iter_mut().zip(pre.iter()) {
                            *c = p + d;
                        }
                    }
                }
                let out = &mut dk[v * nc * hwo..(v + 1) * nc * hwo];
                run_tail(&cache_ref.tail, nc, cand, tmp, out);
                for (t, &i) in idx.iter().enumerate() {
                    let snap = &o_all[i as usize * o_len + k * hwo..][..hwo];
                    for (o, &s) in out[t * hwo..(t + 1) * hwo].iter_mut().zip(snap) {
                        *o -= s;
                    }
                }
            }
            match cache_ref.next {
                Next::Dense { .. } => {
                    let z = &store.z.data;
                    let wt = &cache_ref.wt;
                    let blk = hwo * cp;
                    let mut zb = [0.0f64; 64];
                    let mut zv = [0.0f64; 64];
                    for (t, &i) in idx.iter().enumerate() {
                        let i = i as usize;
                        for (cls, zb) in zb[..classes].iter_mut().enumerate() {
                            *zb = z[cls * n_train + i];
                        }
                        for q in 0..nd {
                            logit_changes(
                                &wt[q * blk..(q + 1) * blk],
                                &d_o[(t * nd + q) * hwo..][..hwo],
                                &mut zb[..cp],
                            );
                        }
                        let label = usize::from(labels[i]);
                        for (v, a) in acc.iter_mut().enumerate() {
                            zv[..cp].copy_from_slice(&zb[..cp]);
                            logit_changes(
                                &wt[nd * blk..(nd + 1) * blk],
                                &dk[(v * nc + t) * hwo..][..hwo],
                                &mut zv[..cp],
                            );
                            push_ce(a, &zv[..classes], label);
                        }
                    }
                }
                Next::Conv {
                    layer: nl,
                    conv: nconv,
                    ..
                } => {
                    let p_all = &store.acts[nl + 1].data;
                    let p_len = nconv.out_len();
                    next_conv_losses(
                        plan, params, cache_ref, nconv, p_all, p_len, nl, idx, nd, d_o, dk, labels,
                        classes, layers, acc,
                    );
                }
            }
        });
    });
    let sums = combine(&parts[..chunks]);
    cache.parts = parts;
    cache.dirty = dirty;
    cache.k_changes = k_changes;
    cache.dw = dw;
    sums.map(|s| reduction.finish(s, batch.len()))
}

/// `z[c] += Σ_p w[p·cp + c]·d[p]` for every class slot `c < cp = z.len()` (a multiple of 4),
/// in f64: two partial sums (even and odd `p`) added at the end (a fixed order; the AVX2 and
/// the plain version round identically).
fn logit_changes(w: &[f64], d: &[f32], z: &mut [f64]) {
    let cp = z.len();
    assert!(
        cp.is_multiple_of(4) && w.len() >= d.len() * cp,
        "logit_changes: shapes"
    );
    if crate::simd::logit_changes_avx2(w, d, z) {
        return;
    }
    for c0 in (0..cp).step_by(4) {
        let mut s = [[0.0f64; 4]; 2];
        for (p, &dv) in d.iter().enumerate() {
            let dv = f64::from(dv);
            for l in 0..4 {
                s[p % 2][l] += w[p * cp + c0 + l] * dv;
            }
        }
        for l in 0..4 {
            z[c0 + l] += s[0][l] + s[1][l];
        }
    }
}

/// `Σ a·b` in f64: four interleaved partial sums, added pairwise (a fixed order).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += f64::from(a[l]) * f64::from(b[l]);
        }
    }
    for (l, (&a, &b)) in ra.iter().zip(rb).enumerate() {
        acc[l] += f64::from(a) * f64::from(b);
    }
    (acc[0] + acc[2]) + (acc[1] + acc[3])
}

/// Next layer a convolution: its output for each variant is `P_snap + ΔP_dirty + ΔP_k`, after
/// which the rest of the network runs on the `3·nc` samples.
#[allow(clippy::too_many_arguments)]
fn next_conv_losses(
    plan: &[crate::executor::Step],
    params: &[Vec<f32>],
    cache: &ConvCache,
    nconv: Conv3x3,
    p_all: &[f32],
    p_len: usize,
    nl: usize,
    idx: &[u32],
    nd: usize,
    d_o: &[f32],
    dk: &[f32],
    labels: &[u8],
    classes: usize,
    layers: usize,
    acc: &mut [LogProd; 3],
) {
    let nc = idx.len();
    let max_len = plan[nl..].iter().map(|s| s.out_len).max().unwrap_or(0);
    // Scratch (this thread's second buffer): dPD | dPK | a | b.
    let sizes = [nc * p_len, nc * p_len, 3 * nc * max_len, 3 * nc * max_len];
    with_scratch_b(sizes.iter().sum(), |s| {
        let (dpd, s) = s.split_at_mut(sizes[0]);
        let (dpk, s) = s.split_at_mut(sizes[1]);
        let (a, b) = s.split_at_mut(sizes[2]);
        if nd > 0 {
            let s = Conv3x3 { c_in: nd, ..nconv };
            conv3x3_forward(
                &s,
                nc,
                &d_o[..nc * nd * nconv.h * nconv.w],
                &cache.w_dirty,
                None,
                dpd,
            );
        }
        let s1 = Conv3x3 { c_in: 1, ..nconv };
        let hwo = nconv.h * nconv.w;
        for v in 0..3 {
            conv3x3_forward(
                &s1,
                nc,
                &dk[v * nc * hwo..(v + 1) * nc * hwo],
                &cache.w_k,
                None,
                dpk,
            );
            for (t, &i) in idx.iter().enumerate() {
                if v == 0 {
                    if let Some(&a) = idx.get(t + 2) {
                        prefetch_slice(&p_all[a as usize * p_len..][..p_len]);
                    }
                }
                let snap = &p_all[i as usize * p_len..][..p_len];
                let dst = &mut a[(v * nc + t) * p_len..][..p_len];
                if nd > 0 {
                    for (((d, &p), &x), &y) in dst
                        .iter_mut()
                        .zip(snap)
                        .zip(&dpd[t * p_len..])
                        .zip(&dpk[t * p_len..])
                    {
                        *d = (p + x) + y;
                    }
                } else {
                    for ((d, &p), &y) in dst.iter_mut().zip(snap).zip(&dpk[t * p_len..]) {
                        *d = p + y;
                    }
                }
            }
        }
        // The rest of the network on 3·nc samples, ping-ponging between `a` and `b`.
        let m = 3 * nc;
        let mut in_a = true;
        for step in &plan[nl + 1..layers] {
            let (src, dst) = if in_a {
                (&a[..m * step.in_len], &mut b[..m * step.out_len])
            } else {
                (&b[..m * step.in_len], &mut a[..m * step.out_len])
            };
            layer_forward(&step.op, params, &[], m, src, dst);
            in_a = !in_a;
        }
        let logits = if in_a {
            &a[..m * classes]
        } else {
            &b[..m * classes]
        };
        let mut z = [0.0f64; 64];
        for (v, acc) in acc.iter_mut().enumerate() {
            for (t, &i) in idx.iter().enumerate() {
                let row = &logits[(v * nc + t) * classes..][..classes];
                for (z, &l) in z.iter_mut().zip(row) {
                    *z = f64::from(l);
                }
                push_ce(acc, &z[..classes], usize::from(labels[i as usize]));
            }
        }
    });
}

/// What every chunk of a fold reads.
struct FoldCtx<'a> {
    exec: &'a Executor,
    cache: &'a ConvCache,
    /// The channels folded.
    chans: &'a [usize],
    /// The convolution's input rows for the whole training set.
    x_all: &'a [f32],
}

/// One chunk of a fold: its samples and their rows of the arrays the fold updates.
struct FoldChunk<'a> {
    samples: Range<usize>,
    /// Rows of `O`, the next parameter layer's input.
    o: &'a mut [f32],
    /// Rows of the layer's own output (pre-activation), when the store keeps it.
    own: Option<&'a mut [f32]>,
    next: NextRows<'a>,
}

/// A fold chunk's rows of what the next parameter layer computes.
enum NextRows<'a> {
    /// Next layer dense: the logit changes, `[nc][classes]`.
    Logits(&'a mut [f64]),
    /// Next layer a convolution: its output `P`, `[nc][p_len]`.
    Conv(&'a mut [f32]),
}

impl FoldCtx<'_> {
    /// New outputs of the folded channels for one chunk into its rows of `O` (and of the own
    /// output), their changes since the snapshot into `d_o` (`[nc][chans][hwo]`).
    fn channel_outputs(
        &self,
        samples: Range<usize>,
        o: &mut [f32],
        mut own: Option<&mut [f32]>,
        d_o: &mut [f32],
    ) {
        let conv = self.cache.conv;
        let (hw, in_len, hwo) = (conv.h * conv.w, conv.in_len(), self.cache.hw_out);
        let (o_len, own_len, nd) = (conv.c_out * hwo, conv.out_len(), self.chans.len());
        let nc = samples.len();
        with_scratch(3 * nc * hw, |s| {
            let (pre, s) = s.split_at_mut(nc * hw);
            let (tmp, out) = s.split_at_mut(nc * hw);
            let xs = &self.x_all[samples.start * in_len..samples.end * in_len];
            for (q, &c) in self.chans.iter().enumerate() {
                conv_channel(self.exec, self.cache, c, nc, xs, pre);
                if let Some(own) = own.as_deref_mut() {
                    for (t, p) in pre.chunks_exact(hw).enumerate() {
                        own[t * own_len + c * hw..][..hw].copy_from_slice(p);
                    }
                }
                run_tail(&self.cache.tail, nc, pre, tmp, &mut out[..nc * hwo]);
                for t in 0..nc {
                    let snap = &mut o[t * o_len + c * hwo..][..hwo];
                    let d = &mut d_o[(t * nd + q) * hwo..][..hwo];
                    for ((d, s), &v) in d.iter_mut().zip(snap.iter_mut()).zip(&out[t * hwo..]) {
                        *d = v - *s;
                        *s = v;
                    }
                }
            }
        });
    }

    /// Folds one chunk: new channel outputs, then their effect on the next layer.
    fn run(&self, chunk: FoldChunk) {
        let FoldChunk {
            samples,
            o,
            own,
            next,
        } = chunk;
        let nc = samples.len();
        let (hwo, nd) = (self.cache.hw_out, self.chans.len());
        match (self.cache.next, next) {
            (Next::Dense { d_in, weight, .. }, NextRows::Logits(dz)) => {
                with_scratch_b(nc * nd * hwo, |d_o| {
                    self.channel_outputs(samples, o, own, d_o);
                    let wf = &self.exec.params.values[weight];
                    let classes = self.exec.spec.classes;
                    for t in 0..nc {
                        for cls in 0..classes {
                            let row = &wf[cls * d_in..(cls + 1) * d_in];
                            dz[t * classes + cls] = self
                                .chans
                                .iter()
                                .enumerate()
                                .map(|(q, &c)| {
                                    dot(
                                        &row[c * hwo..(c + 1) * hwo],
                                        &d_o[(t * nd + q) * hwo..][..hwo],
                                    )
                                })
                                .sum();
                        }
                    }
                });
            }
            (Next::Conv { conv: nconv, .. }, NextRows::Conv(p)) => {
                let p_len = nconv.out_len();
                with_scratch_b(nc * nd * hwo + nc * p_len, |s| {
                    let (d_o, dp) = s.split_at_mut(nc * nd * hwo);
                    self.channel_outputs(samples, o, own, d_o);
                    let s = Conv3x3 { c_in: nd, ..nconv };
                    conv3x3_forward(&s, nc, d_o, &self.cache.w_dirty, None, dp);
                    for (p, &d) in p.iter_mut().zip(dp.iter()) {
                        *p += d;
                    }
                });
            }
            _ => unreachable!("a fold chunk's rows match the next layer"),
        }
    }
}

/// Brings the snapshot of channels `chans` up to date for the whole training set: `O` (and the
/// layer's own output, when kept), then the logits or the next convolution's output `P`.
fn fold(inc: &mut Incremental, cache: &mut ConvCache, exec: &Executor, chans: &[usize]) {
    if chans.is_empty() {
        return;
    }
    let conv = cache.conv;
    let n = exec.train.len();
    let classes = exec.spec.classes;
    ConvCache::gather_next(exec, cache.next, chans, &mut cache.w_dirty);
    // The arrays the fold writes leave the store while the chunks hold their rows; the input
    // (an earlier activation) stays and is read in place.
    let o_idx = cache.next_index();
    let own_idx = (cache.own_out && cache.layer + 1 != o_idx).then_some(cache.layer + 1);
    let p_idx = match cache.next {
        Next::Conv { layer, .. } => Some(layer + 1),
        Next::Dense { .. } => None,
    };
    let acts = &mut inc.store.acts;
    let mut take =
        |i: Option<usize>| i.map_or_else(Vec::new, |i| std::mem::take(&mut acts[i].data));
    let (mut o_all, mut own_all, mut p_all) = (take(Some(o_idx)), take(own_idx), take(p_idx));
    let mut dz = std::mem::take(&mut cache.dz);
    let o_len = conv.c_out * cache.hw_out;
    let nexts: Vec<NextRows> = match cache.next {
        Next::Dense { .. } => grown(&mut dz, n * classes, 0.0)
            .chunks_mut(FOLD_CHUNK * classes)
            .map(NextRows::Logits)
            .collect(),
        Next::Conv { conv: nconv, .. } => p_all[..n * nconv.out_len()]
            .chunks_mut(FOLD_CHUNK * nconv.out_len())
            .map(NextRows::Conv)
            .collect(),
    };
    let mut os = o_all[..n * o_len].chunks_mut(FOLD_CHUNK * o_len);
    let mut owns = own_all.chunks_mut(FOLD_CHUNK * conv.out_len());
    let chunks: Vec<FoldChunk> = nexts
        .into_iter()
        .enumerate()
        .map(|(c, next)| FoldChunk {
            samples: c * FOLD_CHUNK..((c + 1) * FOLD_CHUNK).min(n),
            o: os.next().expect("an O chunk per fold chunk"),
            own: owns.next(),
            next,
        })
        .collect();
    let store_in = inc
        .store
        .acts
        .get(cache.layer)
        .map_or(&[][..], |s| &s.data[..]);
    let ctx = FoldCtx {
        exec,
        cache,
        chans,
        x_all: inputs(exec, store_in, cache.layer),
    };
    if parallel(n * chans.len() * conv.macs() / conv.c_out) {
        chunks.into_par_iter().for_each(|c| ctx.run(c));
    } else {
        chunks.into_iter().for_each(|c| ctx.run(c));
    }
    let acts = &mut inc.store.acts;
    acts[o_idx].data = o_all;
    if let Some(i) = own_idx {
        acts[i].data = own_all;
    }
    match p_idx {
        Some(i) => acts[i].data = p_all,
        None => inc.store.add_logits(&dz[..n * classes], classes),
    }
    cache.dz = dz;
    cache.update_snapshot(exec, chans);
}

/// Ends a convolution's snapshot: folds every dirty channel so that the stored arrays are
/// current again (and stamps them so), or drops it if another layer changed meanwhile.
pub(crate) fn finish(inc: &mut Incremental, mut cache: ConvCache, exec: &Executor) {
    inc.store.settle();
    if !cache.valid(&inc.clock, exec.plan.len()) {
        return;
    }
    let dirty: Vec<usize> = (0..cache.conv.c_out)
        .filter(|&c| cache.is_dirty(exec, c))
        .collect();
    fold(inc, &mut cache, exec, &dirty);
    let now = Some(inc.clock.now());
    let o = cache.next_index();
    inc.store.acts[o].tick = now;
    match cache.next {
        Next::Dense { .. } => inc.store.z.tick = now,
        Next::Conv { layer, .. } => inc.store.acts[layer + 1].tick = now,
    }
    if cache.own_out {
        inc.store.acts[cache.layer + 1].tick = now;
    }
}
