//! The per-batch memo of the BatchNorm models' paths: activations around the visited layer,
//! kept per recurring batch (see [`ActivationMemo`]).

use super::CHUNK;
use crate::executor::{view, view_mut, Executor, Mode, Op};
use crate::incremental::util::{conv_forward, grown, parallel};
use crate::incremental::Clock;
use crate::kernels::conv::Conv3x3;
use crate::kernels::pool::{avgpool2_forward, maxpool2_forward};
use rayon::prelude::*;
use rso_models::Reduction;
use std::collections::HashMap;

/// Bytes each array of a [`ActivationMemo`] may hold.
const MEMO_BUDGET: usize = 1 << 30;

/// Per-batch copies of activations around the visited layer, for batches that recur: preset
/// `seed` cuts each round's shuffled training set into ⌈N/B⌉ batches and draws one per visit,
/// so during a sweep every batch comes back many times.
/// - The visited layer's *input*: the layers before it do not change during its sweep, so
///   they run once per batch instead of once per visit. A hit copies the input into place and
///   the forward pass starts there (the same arithmetic on the same values).
/// - A convolution's *output* (after the pooling that follows it, if any), with the weights it
///   was computed with: on a hit only the channels whose weights changed since (channel `k`,
///   the one being swept) are recomputed, and the pass starts after the convolution.
///
/// Batches that do not recur (preset `paper`'s sliding windows) stop the memo from storing
/// after a while.
#[derive(Debug, Default)]
pub(crate) struct ActivationMemo {
    /// The visited layer, and the clock tick the entries were made at (valid while no layer
    /// before it changed since; its own changes are tracked per entry).
    act: usize,
    tick: u64,
    active: bool,
    /// Values per sample of the kept input (0: not kept), of the kept output and the index of
    /// that activation (0: not kept), and of the convolution's weights and biases.
    in_len: usize,
    out_act: usize,
    out_len: usize,
    w_len: usize,
    /// Entry by hash of the batch's indices; the entries' indices, one after the other.
    index: HashMap<u64, usize>,
    entries: Vec<Entry>,
    batches: Vec<u32>,
    /// Channels to recompute on a hit (reused buffer).
    chans: Vec<usize>,
    input: Vec<f32>,
    output: Vec<f32>,
    weights: Vec<f32>,
    in_used: usize,
    out_used: usize,
    hits: usize,
    /// Scratch of the channel recomputation.
    tmp: Vec<f32>,
}

/// One memoised batch: where its indices are in `ActivationMemo::batches`, and the offsets of its
/// rows (in values).
#[derive(Debug)]
struct Entry {
    batch: std::ops::Range<usize>,
    input: Option<usize>,
    /// Offsets of its output rows and of its copy of the weights.
    output: Option<(usize, usize)>,
}

/// The visited convolution, for [`forward`]'s output memo.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Visited {
    pub(crate) conv: Conv3x3,
    pub(crate) weight: usize,
    pub(crate) bias: Option<usize>,
    /// The channel being swept (its full-resolution output is always recomputed: the
    /// candidates start from it).
    pub(crate) k: usize,
}

/// Runs layers `..end` on the `n` loaded samples, leaving every activation up to `acts[end]`
/// (BatchNorm with the batch's statistics).
fn forward_prefix(exec: &mut Executor, n: usize, end: usize) {
    let is_bn = |op: &Op| matches!(op, Op::BatchNorm { .. });
    let mut a = 0;
    while a < end {
        if is_bn(&exec.plan[a].op) {
            exec.batch_statistics(a, n);
        }
        let b = (a + 1..end)
            .find(|&i| is_bn(&exec.plan[i].op))
            .unwrap_or(end);
        exec.forward_segment(a..b, n, Mode::Train, true);
        a = b;
    }
}

/// A hash of a batch's indices (a lookup key; entries compare the whole batch).
fn batch_hash(batch: &[u32]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(batch)
}

/// Loads `batch` and runs the forward pass keeping every activation; returns the loss at W.
/// `act` is the visited layer (for a convolution, `visited` describes it): the [`ActivationMemo`]
/// supplies its input and, for a convolution, its output when the batch was seen since the
/// layers before it last changed. Worth it only where those layers are a sizeable part of the
/// pass (the input) or the output fits the budget.
pub(crate) fn forward(
    memo: &mut ActivationMemo,
    clock: &Clock,
    exec: &mut Executor,
    batch: &[u32],
    reduction: Reduction,
    act: usize,
    visited: Option<Visited>,
) -> f64 {
    let n = batch.len();
    exec.load_batch(batch);
    let shape = kept_shape(exec, act, visited);
    if shape == (0, 0, 0, 0) {
        exec.forward_from(0, n, Mode::Train, true);
        return reduction.finish(exec.loss_sum(n), n);
    }
    let same = memo.active
        && memo.act == act
        && (memo.in_len, memo.out_act, memo.out_len, memo.w_len) == shape
        && clock.unchanged_since(memo.tick, 0..act);
    if !same {
        memo.reset(act, clock.now(), shape, exec.train.len(), n);
    }
    let h = batch_hash(batch);
    let hit = memo
        .index
        .get(&h)
        .copied()
        .filter(|&e| memo.batches[memo.entries[e].batch.clone()] == batch[..]);
    match hit {
        Some(e) => memo.replay(exec, e, n, visited),
        None => {
            exec.forward_from(0, n, Mode::Train, true);
            memo.record(exec, batch, h, visited);
        }
    }
    reduction.finish(exec.loss_sum(n), n)
}

/// What the memo keeps for visited layer `act` (see [`ActivationMemo`]): values per sample of
/// its input (0: not kept), the activation index and values per sample of the convolution's
/// output (0: not kept), values of the convolution's weights and biases.
fn kept_shape(
    exec: &Executor,
    act: usize,
    visited: Option<Visited>,
) -> (usize, usize, usize, usize) {
    let n_train = exec.train.len();
    let prefix: usize = exec.plan[..act].iter().map(|s| s.work).sum();
    let total: usize = exec.plan.iter().map(|s| s.work).sum();
    let fits = |len: usize| n_train * len * 4 <= MEMO_BUDGET;
    let in_len = if act > 0 && 4 * prefix >= total && fits(exec.plan[act - 1].out_len) {
        exec.plan[act - 1].out_len
    } else {
        0
    };
    // The output kept: after the convolution and the pooling right after it.
    let Some(v) = visited else {
        return (in_len, 0, 0, 0);
    };
    let mut o = act + 1;
    while matches!(exec.plan[o].op, Op::AvgPool { .. } | Op::MaxPool { .. }) {
        o += 1;
    }
    let len = exec.plan[o - 1].out_len;
    let w_len =
        exec.params.values[v.weight].len() + v.bias.map_or(0, |b| exec.params.values[b].len());
    if fits(len) {
        (in_len, o, len, w_len)
    } else {
        (in_len, 0, 0, 0)
    }
}

impl ActivationMemo {
    /// Starts afresh for layer `act` at clock tick `tick`, keeping the buffers, with room for
    /// every batch (of `n` samples) of a partition of `n_train` samples twice (so that visits
    /// allocate nothing once the memo is set up).
    fn reset(
        &mut self,
        act: usize,
        tick: u64,
        shape: (usize, usize, usize, usize),
        n_train: usize,
        n: usize,
    ) {
        let slots = 2 * n_train.div_ceil(n);
        self.act = act;
        self.tick = tick;
        self.active = true;
        (self.in_len, self.out_act, self.out_len, self.w_len) = shape;
        let (in_len, out_len, w_len) = (self.in_len, self.out_len, self.w_len);
        self.index.clear();
        self.index.reserve(slots);
        self.entries.clear();
        self.entries.reserve(slots);
        self.batches.clear();
        self.batches.reserve(2 * n_train + n);
        self.input.clear();
        self.input.reserve(n_train * in_len + n * in_len);
        self.output.clear();
        self.output.reserve(n_train * out_len + n * out_len);
        self.weights.clear();
        self.weights.reserve(slots * w_len);
        self.chans.reserve(64);
        (self.in_used, self.out_used, self.hits) = (0, 0, 0);
    }

    /// The forward pass of the loaded batch of entry `e` from what the entry keeps: its input
    /// to the visited layer, and its convolution output with the channels whose weights
    /// changed since (and channel `k`) recomputed; the entry is brought up to date.
    fn replay(&mut self, exec: &mut Executor, e: usize, n: usize, visited: Option<Visited>) {
        self.hits += 1;
        let (act, in_len, out_act, out_len) = (self.act, self.in_len, self.out_act, self.out_len);
        let (input, output) = (self.entries[e].input, self.entries[e].output);
        match input {
            Some(off) => {
                exec.ws.acts[act][..n * in_len].copy_from_slice(&self.input[off..off + n * in_len])
            }
            None => forward_prefix(exec, n, act),
        }
        let (Some((off, w_off)), Some(v)) = (output, visited) else {
            exec.forward_from(act, n, Mode::Train, true);
            return;
        };
        let mut chans = std::mem::take(&mut self.chans);
        self.changed_channels(exec, v, w_off, &mut chans);
        exec.ws.acts[out_act][..n * out_len].copy_from_slice(&self.output[off..off + n * out_len]);
        recompute_channels(&mut self.tmp, exec, act, out_act, v, &chans, n);
        exec.forward_from(out_act, n, Mode::Train, true);
        // Keep the entry current, so that the next hit recomputes only what changes until then.
        self.output[off..off + n * out_len].copy_from_slice(&exec.ws.acts[out_act][..n * out_len]);
        copy_weights(exec, v, &mut self.weights[w_off..w_off + self.w_len]);
        self.chans = chans;
    }

    /// Into `chans`: channel `k` and the channels whose weights differ from the entry's copy at
    /// `w_off`.
    fn changed_channels(&self, exec: &Executor, v: Visited, w_off: usize, chans: &mut Vec<usize>) {
        let p = &exec.params.values;
        let taps = v.conv.taps();
        let w = &self.weights[w_off..w_off + self.w_len];
        let wl = p[v.weight].len();
        let differs =
            |a: &[f32], b: &[f32]| a.iter().zip(b).any(|(a, b)| a.to_bits() != b.to_bits());
        chans.clear();
        chans.extend((0..v.conv.c_out).filter(|&c| {
            c == v.k
                || differs(&p[v.weight][c * taps..(c + 1) * taps], &w[c * taps..])
                || v.bias
                    .is_some_and(|b| differs(&p[b][c..c + 1], &w[wl + c..]))
        }));
    }

    /// Stores the loaded batch's activations (just computed) under hash `h`, while within the
    /// room reserved at [`ActivationMemo::reset`] (no reallocation) and unless batches
    /// evidently do not recur.
    fn record(&mut self, exec: &Executor, batch: &[u32], h: u64, visited: Option<Visited>) {
        let n = batch.len();
        let recurs = self.hits > 0 || self.entries.len() < 2 * exec.train.len().div_ceil(n);
        let room = self.batches.len() + n <= self.batches.capacity()
            && self.entries.len() < self.entries.capacity();
        if !recurs || !room || self.index.contains_key(&h) {
            return;
        }
        let (act, in_len, out_act, out_len) = (self.act, self.in_len, self.out_act, self.out_len);
        let input = (in_len > 0 && self.in_used + n * in_len <= self.input.capacity()).then(|| {
            let off = self.in_used;
            grown(&mut self.input, off + n * in_len, 0.0)[off..]
                .copy_from_slice(&exec.ws.acts[act][..n * in_len]);
            self.in_used += n * in_len;
            off
        });
        let output = match visited {
            Some(v) if out_act > 0 && self.out_used + n * out_len <= self.output.capacity() => {
                let off = self.out_used;
                grown(&mut self.output, off + n * out_len, 0.0)[off..]
                    .copy_from_slice(&exec.ws.acts[out_act][..n * out_len]);
                self.out_used += n * out_len;
                let w_off = self.entries.len() * self.w_len;
                let w = grown(&mut self.weights, w_off + self.w_len, 0.0);
                copy_weights(exec, v, &mut w[w_off..]);
                Some((off, w_off))
            }
            _ => None,
        };
        if input.is_some() || output.is_some() {
            self.index.insert(h, self.entries.len());
            let start = self.batches.len();
            self.batches.extend_from_slice(batch);
            self.entries.push(Entry {
                batch: start..start + n,
                input,
                output,
            });
        }
    }
}

/// The visited convolution's weights then biases into `out`.
fn copy_weights(exec: &Executor, v: Visited, out: &mut [f32]) {
    let w = &exec.params.values[v.weight];
    out[..w.len()].copy_from_slice(w);
    if let Some(b) = v.bias {
        out[w.len()..].copy_from_slice(&exec.params.values[b]);
    }
}

/// Recomputes channels `chans` of the convolution at plan index `act` from its input in
/// `acts[act]`: the full-resolution output into `acts[act + 1]`, and through the pooling layers
/// up to `acts[out_act]`.
fn recompute_channels(
    tmp: &mut Vec<f32>,
    exec: &mut Executor,
    act: usize,
    out_act: usize,
    v: Visited,
    chans: &[usize],
    n: usize,
) {
    let conv = v.conv;
    let (hw, taps, c_out) = (conv.h * conv.w, conv.taps(), conv.c_out);
    let one = Conv3x3 { c_out: 1, ..conv };
    let buf = grown(tmp, 2 * n * hw, 0.0);
    let (y, z) = buf.split_at_mut(n * hw);
    for &c in chans {
        let p = &exec.params.values;
        let w = &p[v.weight][c * taps..(c + 1) * taps];
        let b = v.bias.map(|b| &p[b][c..c + 1]);
        let x = &exec.ws.acts[act][..n * conv.in_len()];
        let task = |(t, y): (usize, &mut [f32])| {
            let m = y.len() / hw;
            conv_forward(
                &one,
                m,
                &x[t * CHUNK * conv.in_len()..][..m * conv.in_len()],
                w,
                b,
                y,
            );
        };
        if parallel(n * conv.macs() / c_out) {
            y.par_chunks_mut(CHUNK * hw).enumerate().for_each(task);
        } else {
            y.chunks_mut(CHUNK * hw).enumerate().for_each(task);
        }
        // Write the channel's planes into the full-resolution output, then pool them layer by
        // layer up to the kept activation.
        let mut plane = hw;
        for t in 0..n {
            exec.ws.acts[act + 1][(t * c_out + c) * hw..][..hw].copy_from_slice(&y[t * hw..][..hw]);
        }
        for i in act + 1..out_act {
            let out = match exec.plan[i].op {
                Op::AvgPool { h, w, .. } => {
                    avgpool2_forward(view((n, 1, h, w), y), view_mut((n, 1, h / 2, w / 2), z));
                    (h / 2) * (w / 2)
                }
                Op::MaxPool { h, w, .. } => {
                    maxpool2_forward(view((n, 1, h, w), y), view_mut((n, 1, h / 2, w / 2), z));
                    (h / 2) * (w / 2)
                }
                _ => unreachable!("only pooling between a convolution and its kept output"),
            };
            plane = out;
            for t in 0..n {
                exec.ws.acts[i + 1][(t * c_out + c) * plane..][..plane]
                    .copy_from_slice(&z[t * plane..][..plane]);
            }
            y[..n * plane].copy_from_slice(&z[..n * plane]);
        }
        let _ = plane;
    }
}
