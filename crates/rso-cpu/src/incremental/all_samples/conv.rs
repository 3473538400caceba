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
//! left in the layer times the batch size reach the training-set size (each later visit would
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

use super::conv_visit::{ConvVisit, KChanges};
use super::fold::{fold, fold_now};
use crate::executor::{view, view_mut, Executor, Op};
use crate::incremental::util::{
    changes, combine, conv_forward, for_chunks, grown, parallel, LogProd,
};
use crate::incremental::{Clock, Incremental, Next, Visit};
use crate::kernels::conv::Conv3x3;
use crate::kernels::pool::{avgpool2_forward, maxpool2_forward};
use crate::kernels::relu::relu_forward;
use ndarray::{aview1, aview_mut1};

/// Samples per chunk of a visit (fixed: results do not depend on the thread count).
const CHUNK: usize = 32;

/// A channel-local layer between the convolution and the next parameter layer, with the plane
/// shape of its input.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Tail {
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
            Tail::Relu { hw } => {
                relu_forward(aview1(&x[..planes * hw]), aview_mut1(&mut y[..planes * hw]))
            }
            Tail::Max { h, w } => maxpool2_forward(
                view((planes, 1, h, w), x),
                view_mut((planes, 1, h / 2, w / 2), y),
            ),
            Tail::Avg { h, w } => avgpool2_forward(
                view((planes, 1, h, w), x),
                view_mut((planes, 1, h / 2, w / 2), y),
            ),
        }
    }
}

/// Runs the tail on `planes` planes of `x` into `out`, using `tmp` in between.
pub(crate) fn run_tail(tail: &[Tail], planes: usize, x: &[f32], tmp: &mut [f32], out: &mut [f32]) {
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

/// The snapshot of one convolution's sweep (see the module docs).
#[derive(Debug)]
pub(crate) struct ConvCache {
    /// Plan index of the convolution.
    pub(crate) layer: usize,
    pub(crate) conv: Conv3x3,
    pub(crate) weight: usize,
    pub(crate) bias: Option<usize>,
    pub(crate) tail: Vec<Tail>,
    /// Plane size after the tail.
    pub(crate) hw_out: usize,
    pub(crate) next: Next,
    /// Clock tick of the snapshot: every other layer must be unchanged since.
    pub(crate) created: u64,
    pub(crate) w_snap: Vec<f32>,
    pub(crate) b_snap: Vec<f32>,
    /// Dirty channels other than the visited one (reused buffer).
    pub(crate) dirty: Vec<usize>,
    /// The array whose visits are under way (weights or biases) and the channels folded
    /// during them, which are not folded again before that array's visits end (see
    /// [`fold_candidates`]).
    pub(crate) sweep_param: usize,
    pub(crate) folded: Vec<bool>,
    /// The dirty channels a visit may fold (reused buffer).
    pub(crate) foldable: Vec<usize>,
    /// The next convolution's weights of the dirty channels, `[c_out_next][dirty][9]`, and of
    /// channel `k`, `[c_out_next][9]`.
    pub(crate) w_dirty: Vec<f32>,
    pub(crate) w_k: Vec<f32>,
    pub(crate) parts: Vec<[LogProd; 3]>,
    /// Fold: logit changes `[N][classes]`.
    pub(crate) dz: Vec<f64>,
    /// Whether the store holds this layer's output (valid at the snapshot), which folds then
    /// keep current.
    pub(crate) own_out: bool,
    /// Channel k's changes since the snapshot (reused buffers).
    pub(crate) kc: KChanges,
    /// Next layer dense: its weights of the dirty channels then of channel `k`, per channel
    /// `[hwo][cp]` in f64 (`cp`: the classes rounded up to a multiple of 4, zero-padded), so
    /// that a sample's logit changes are one vectorised pass over its output plane.
    pub(crate) wt: Vec<f64>,
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
            sweep_param: weight,
            folded: vec![false; conv.c_out],
            foldable: Vec::with_capacity(conv.c_out),
            w_dirty: Vec::new(),
            w_k: Vec::new(),
            parts: Vec::new(),
            dz: Vec::new(),
            own_out: false,
            kc: KChanges::default(),
            wt: Vec::new(),
        })
    }

    /// Plan index of the next parameter layer (`O` is activation `next_index`).
    pub(crate) fn next_index(&self) -> usize {
        self.next.layer()
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
    pub(crate) fn update_snapshot(&mut self, exec: &Executor, chans: &[usize]) {
        let taps = self.conv.taps();
        for &c in chans {
            let w = &exec.params.values[self.weight][c * taps..(c + 1) * taps];
            self.w_snap[c * taps..(c + 1) * taps].copy_from_slice(w);
            if let Some(b) = self.bias {
                self.b_snap[c] = exec.params.values[b][c];
            }
        }
    }

    /// The visits left in the layer's sweep after scalar `index` of array `param` (weights,
    /// then biases).
    fn remaining_visits(&self, exec: &Executor, param: usize, index: usize) -> usize {
        let w_len = exec.params.values[self.weight].len();
        let b_len = self.bias.map_or(0, |b| exec.params.values[b].len());
        if param == self.weight {
            w_len - index + b_len
        } else {
            b_len - index
        }
    }

    /// The next layer's weights a visit reads: the next convolution's of the `dirty` channels
    /// and of channel `k` (`w_dirty`, `w_k`), or the dense layer's of the same channels,
    /// transposed and widened (`wt`).
    fn prepare_next(&mut self, exec: &Executor, dirty: &[usize], k: usize) {
        ConvCache::gather_next(exec, self.next, dirty, &mut self.w_dirty);
        ConvCache::gather_next(exec, self.next, &[k], &mut self.w_k);
        let Next::Dense { d_in, weight, .. } = self.next else {
            return;
        };
        let (classes, hwo) = (exec.spec.classes, self.hw_out);
        let cp = classes.div_ceil(4) * 4;
        let wf = &exec.params.values[weight];
        self.wt.clear();
        self.wt.resize((dirty.len() + 1) * hwo * cp, 0.0);
        for (q, &c) in dirty.iter().chain([k].iter()).enumerate() {
            let dst = &mut self.wt[q * hwo * cp..(q + 1) * hwo * cp];
            for cls in 0..classes {
                let row = &wf[cls * d_in + c * hwo..][..hwo];
                for (p, &v) in row.iter().enumerate() {
                    dst[p * cp + cls] = f64::from(v);
                }
            }
        }
    }

    /// Multiply-add equivalents per sample of a visit with `nd` dirty channels (for the
    /// threading choice).
    fn visit_work(&self, exec: &Executor, nd: usize) -> usize {
        let conv = self.conv;
        let plan = &exec.plan;
        let next_work = match self.next {
            Next::Dense { .. } => 3 * exec.spec.classes * self.hw_out * (nd + 1),
            Next::Conv { layer, .. } => {
                3 * plan[layer..].iter().map(|s| s.work).sum::<usize>() / conv.c_out.max(1)
                    + plan[layer + 1..].iter().map(|s| s.work).sum::<usize>() * 3
            }
        };
        (nd + 1) * conv.macs() / conv.c_out + 3 * conv.h * conv.w + next_work
    }

    /// Collects the next convolution's weights of input channels `chans` as `[c_out][chans][9]`.
    pub(crate) fn gather_next(exec: &Executor, next: Next, chans: &[usize], out: &mut Vec<f32>) {
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
pub(crate) fn conv_channel(
    exec: &Executor,
    cache: &ConvCache,
    c: usize,
    n: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let s = Conv3x3 {
        c_out: 1,
        ..cache.conv
    };
    let taps = cache.conv.taps();
    let w = &exec.params.values[cache.weight][c * taps..(c + 1) * taps];
    let b = cache.bias.map(|b| &exec.params.values[b][c..c + 1]);
    conv_forward(&s, n, x, w, b, y);
}

/// The input rows of the convolution for the whole training set.
pub(crate) fn inputs<'a>(exec: &'a Executor, store_in: &'a [f32], layer: usize) -> &'a [f32] {
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

/// The three losses for a scalar of the cached convolution: channel `k`'s changes since the
/// snapshot, the fold decision for the other dirty channels, then [`ConvVisit::chunk`] over
/// fixed chunks of the batch.
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
    // Channel k from the snapshot: its stored pre-activation plus one convolution of the input
    // channels `..ng` with the weight changes (zero where unchanged) and the bias change: at
    // most the work of the convolution itself, usually much less (RSO visits the taps input
    // channel by input channel, so the changes since the snapshot cover the first few).
    let mut kc = std::mem::take(&mut cache.kc);
    KChanges::of(cache, exec, k, &mut kc);
    let from_snapshot = cache.own_out && kc.ng < conv.c_in;
    let mut dirty = std::mem::take(&mut cache.dirty);
    dirty.clear();
    dirty.extend((0..conv.c_out).filter(|&c| c != k && cache.is_dirty(exec, c)));
    if param != cache.sweep_param {
        cache.sweep_param = param;
        cache.folded.fill(false);
    }
    let mut foldable = std::mem::take(&mut cache.foldable);
    fold_candidates(cache, &dirty, &mut foldable);
    if !foldable.is_empty() {
        let next_conv = matches!(cache.next, Next::Conv { .. });
        let remaining = cache.remaining_visits(exec, param, index);
        if fold_now(next_conv, foldable.len(), remaining, batch.len(), n_train) {
            fold(inc, cache, exec, &foldable);
            for &c in &foldable {
                cache.folded[c] = true;
            }
            dirty.retain(|c| !foldable.contains(c));
        }
    }
    cache.foldable = foldable;
    cache.prepare_next(exec, &dirty, k);
    let mut parts = std::mem::take(&mut cache.parts);
    let store = &inc.store;
    let ctx = ConvVisit {
        exec,
        cache,
        store,
        x_all: inputs(
            exec,
            store.acts.get(cache.layer).map_or(&[][..], |s| &s.data[..]),
            cache.layer,
        ),
        own_all: if from_snapshot {
            &store.acts[cache.layer + 1].data
        } else {
            &[]
        },
        dirty: &dirty,
        kc: &kc,
        from_snapshot,
        k,
        tap,
        ds: [0.0, dp as f32, dm as f32],
    };
    let work = batch.len() * cache.visit_work(exec, dirty.len());
    let chunks = batch.len().div_ceil(CHUNK);
    let parts_s = grown(&mut parts, chunks, Default::default());
    for_chunks(batch.len(), CHUNK, parallel(work), parts_s, |r, acc| {
        *acc = Default::default();
        ctx.chunk(&batch[r], acc);
    });
    let sums = combine(&parts[..chunks]);
    cache.parts = parts;
    cache.dirty = dirty;
    cache.kc = kc;
    sums.map(|s| reduction.finish(s, batch.len()))
}

/// The dirty channels a visit may fold: those not yet folded during the current array's
/// visits. The fold rule ([`fold_now`]) assumes RSO's order, in which a channel's scalars are
/// visited one after the other, so a channel folded once is not changed again in that array's
/// visits. In any other order (CFD's shuffled coordinates) a folded channel soon changes again,
/// and folding it each time would cost the whole training set per visit; such a channel
/// stays dirty (recomputed for each visit's batch) until the snapshot ends. RSO's folds, and so
/// its arithmetic, are unchanged.
fn fold_candidates(cache: &ConvCache, dirty: &[usize], out: &mut Vec<usize>) {
    out.clear();
    out.extend(dirty.iter().copied().filter(|&c| !cache.folded[c]));
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
