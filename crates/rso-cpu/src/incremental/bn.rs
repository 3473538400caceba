//! Candidates of a convolution or BatchNorm in a model with BatchNorm on batch statistics
//! (`paper`).
//!
//! Batch statistics mix the samples of a batch, so nothing after the first BatchNorm can be
//! kept across batches: every visit runs one forward pass of its batch (which gives the loss at
//! W and every activation). From there a candidate is *channel-local*: a weight of output
//! channel `k` (or `γ_k`, `β_k`) changes channel `k` of the layer's output only, and the
//! layers up to the next parameter layer — pooling, BatchNorm (channel `k`'s statistics only),
//! ReLU, global average pooling — act on each channel alone (the *chain*). Then:
//! - the next layer is a convolution: its output moves by `W_next[:, k] ⊛ Δo_k` (one input
//!   channel instead of all), and the rest of the network runs from there on the batch (its
//!   BatchNorm statistics change in every channel, so that part is a plain forward pass);
//! - the next layer is the final dense layer: the logits move by `W_fc[:, block k]·Δo_k`.
//!
//! The base goes through the same arithmetic as the candidates (the loss of the forward pass
//! for a next convolution, the same logit update with `Δo_k = 0` for a next dense layer), so a
//! candidate that changes nothing ties with W exactly, as on the reference path.
//!
//! The layers before the visited one do not change during its sweep, so when a batch comes
//! back (preset `seed` draws every visit's batch from the ⌈N/B⌉ batches of the round) its
//! input to the visited layer is taken from a [`BatchMemo`] and the forward pass starts there;
//! this skips most of the pass for the later layers (conv6's input is 96% of the way through).

use super::util::{add_shifted, changes, grown, parallel, push_ce, LogProd};
use super::{Clock, Visit};
use crate::executor::{Executor, Mode, Op};
use crate::kernels::batchnorm::{batchnorm_apply, combine_moments, plane_moments};
use crate::kernels::conv::{conv3x3_forward, Conv3x3};
use crate::kernels::pool::{avgpool2_forward, global_avgpool_forward, maxpool2_forward};
use crate::kernels::relu::relu_forward;
use rayon::prelude::*;
use rso_models::Reduction;
use std::collections::HashMap;

/// Samples per task of the one-channel convolution (fixed: results do not depend on threads).
const CHUNK: usize = 16;

/// Bytes each array of a [`BatchMemo`] may hold.
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
pub(super) struct BatchMemo {
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
}

/// One memoised batch: where its indices are in `BatchMemo::batches`, and the offsets of its
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
pub(super) struct Visited {
    conv: Conv3x3,
    weight: usize,
    bias: Option<usize>,
    /// The channel being swept (its full-resolution output is always recomputed: the
    /// candidates start from it).
    k: usize,
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

/// FNV-1a of a batch's indices.
fn batch_hash(batch: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &i in batch {
        for b in i.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Reused buffers of the path.
#[derive(Debug, Default)]
pub(super) struct BnScratch {
    memo: BatchMemo,
    /// Channel-`k` planes of the three variants, `[3][B][hw]`, and a second buffer.
    a: Vec<f32>,
    b: Vec<f32>,
    moments: Vec<(f64, f64)>,
    /// The next convolution's output at W, `[B][len]`.
    base_p: Vec<f32>,
    /// `Δo_k` of a candidate, `[B][hw]`, and its effect on the next convolution, `[B][len]`.
    delta: Vec<f32>,
    dp: Vec<f32>,
    /// The next convolution's weights of input channel `k`, `[c_out][9]`.
    w_k: Vec<f32>,
}

/// The parameter layer that ends the chain.
#[derive(Clone, Copy, Debug)]
enum Next {
    Dense {
        d_in: usize,
        weight: usize,
    },
    Conv {
        layer: usize,
        conv: Conv3x3,
        weight: usize,
    },
}

/// The plan index of the parameter layer after `first`'s chain, checking that every layer in
/// between is channel-local.
fn next_after(exec: &Executor, first: usize) -> Option<Next> {
    for (i, step) in exec.plan.iter().enumerate().skip(first) {
        match step.op {
            Op::Relu
            | Op::MaxPool { .. }
            | Op::AvgPool { .. }
            | Op::BatchNorm { .. }
            | Op::GlobalAvgPool { .. } => {}
            Op::Dense { d_in, weight, .. } => {
                return (i + 1 == exec.plan.len()).then_some(Next::Dense { d_in, weight });
            }
            Op::Conv { conv, weight, .. } => {
                return Some(Next::Conv {
                    layer: i,
                    conv,
                    weight,
                })
            }
        }
    }
    None
}

/// Index of `next`'s layer (the end of the chain).
fn end_of(exec: &Executor, next: Next) -> usize {
    match next {
        Next::Dense { .. } => exec.plan.len() - 1,
        Next::Conv { layer, .. } => layer,
    }
}

/// Runs the channel-local layers `ops` on the channel-`k` planes of `n` samples held in `a`
/// (`[n][hw]`), leaving the result in `a` (using `b`). A BatchNorm normalises with these
/// planes' batch statistics and channel `k`'s γ, β — or `gb` for the layer `gb_layer`.
#[allow(clippy::too_many_arguments)]
fn chain(
    exec: &Executor,
    ops: std::ops::Range<usize>,
    k: usize,
    n: usize,
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
    moments: &mut Vec<(f64, f64)>,
    gb: Option<(usize, f32, f32)>,
) {
    for i in ops {
        let step = &exec.plan[i];
        let x = &a[..];
        let y = grown(b, a.len(), 0.0);
        match step.op {
            Op::Relu => {
                let hw = plane_len(exec, i);
                relu_forward(&x[..n * hw], &mut y[..n * hw]);
            }
            Op::MaxPool { h, w, .. } => maxpool2_forward(n, h, w, x, y),
            Op::AvgPool { h, w, .. } => avgpool2_forward(n, h, w, x, y),
            Op::GlobalAvgPool { hw, .. } => global_avgpool_forward(n, hw, x, y),
            Op::BatchNorm {
                hw, gamma, beta, ..
            } => {
                let m = grown(moments, n, (0.0, 0.0));
                plane_moments(n, 1, hw, &x[..n * hw], m);
                let (mut mean, mut var) = ([0.0f64], [0.0f64]);
                combine_moments(n, 1, hw, m, &mut mean, &mut var);
                let p = &exec.params.values;
                let (g, bt) = match gb {
                    Some((layer, g, bt)) if layer == i => (g, bt),
                    _ => (p[gamma][k], p[beta][k]),
                };
                batchnorm_apply(n, 1, hw, x, &mean, &var, &[g], &[bt], y);
            }
            _ => unreachable!("checked by next_after"),
        }
        std::mem::swap(a, b);
    }
}

/// Values per channel plane of the input of layer `i`.
fn plane_len(exec: &Executor, i: usize) -> usize {
    match exec.plan[i].op {
        Op::Relu => {
            // A ReLU's planes are those of the layer before it (or the input's).
            if i == 0 {
                exec.spec.input[1] * exec.spec.input[2]
            } else {
                plane_out(exec, i - 1)
            }
        }
        _ => unreachable!(),
    }
}

/// Values per channel plane of the output of layer `i`.
fn plane_out(exec: &Executor, i: usize) -> usize {
    match exec.plan[i].op {
        Op::Conv { conv, .. } => conv.h * conv.w,
        Op::MaxPool { h, w, .. } | Op::AvgPool { h, w, .. } => (h / 2) * (w / 2),
        Op::BatchNorm { hw, .. } => hw,
        Op::GlobalAvgPool { .. } => 1,
        Op::Relu => plane_len(exec, i),
        Op::Dense { .. } => 1,
    }
}

/// The three losses for a scalar of the convolution at plan index `layer`.
pub(super) fn conv(
    s: &mut BnScratch,
    clock: &Clock,
    exec: &mut Executor,
    layer: usize,
    visit: Visit,
) -> Option<[f64; 3]> {
    let Visit {
        batch,
        param,
        index,
        delta,
        reduction,
    } = visit;
    let Op::Conv { conv, weight, bias } = exec.plan[layer].op else {
        return None;
    };
    let next = next_after(exec, layer + 1)?;
    let n = batch.len();
    let taps = conv.taps();
    let (k, tap) = if param == weight {
        (index / taps, Some(index % taps))
    } else {
        (index, None)
    };
    let visited = Visited {
        conv,
        weight,
        bias,
        k,
    };
    let base = forward(s, clock, exec, batch, reduction, layer, Some(visited));
    let [dp, dm] = changes(exec.params.values[param][index], delta);
    let hw = conv.h * conv.w;
    // Channel k of the convolution's output at W, W + Δ, W − Δ: `[v][t][hw]`.
    let y = &exec.ws.acts[layer + 1];
    let x = &exec.ws.acts[layer];
    let a = grown(&mut s.a, 3 * n * hw, 0.0);
    for t in 0..n {
        a[t * hw..(t + 1) * hw].copy_from_slice(&y[(t * conv.c_out + k) * hw..][..hw]);
    }
    let (base_planes, cands) = a.split_at_mut(n * hw);
    for (v, d) in [dp as f32, dm as f32].into_iter().enumerate() {
        let out = &mut cands[v * n * hw..(v + 1) * n * hw];
        for t in 0..n {
            let plane = &base_planes[t * hw..(t + 1) * hw];
            let dst = &mut out[t * hw..(t + 1) * hw];
            match tap {
                Some(tap) => {
                    let (ci, ky, kx) = (tap / 9, (tap % 9) / 3, tap % 3);
                    let src = &x[(t * conv.c_in + ci) * hw..][..hw];
                    add_shifted(conv.h, conv.w, plane, src, ky, kx, d, dst);
                }
                None => {
                    for (o, &p) in dst.iter_mut().zip(plane) {
                        *o = p + d;
                    }
                }
            }
        }
    }
    Some(finish(
        s,
        exec,
        layer + 1,
        next,
        k,
        n,
        hw,
        [None; 3],
        base,
        reduction,
    ))
}

/// The three losses for `γ_k` or `β_k` of the BatchNorm at plan index `layer`.
pub(super) fn norm(
    s: &mut BnScratch,
    clock: &Clock,
    exec: &mut Executor,
    layer: usize,
    visit: Visit,
) -> Option<[f64; 3]> {
    let Visit {
        batch,
        param,
        index,
        delta,
        reduction,
    } = visit;
    let Op::BatchNorm {
        c, hw, gamma, beta, ..
    } = exec.plan[layer].op
    else {
        return None;
    };
    let next = next_after(exec, layer + 1)?;
    let n = batch.len();
    // RSO visits γ and β right after the convolution before them (preset `paper`), whose
    // input the memo then still holds for the batches it has seen.
    let conv = (0..layer)
        .rev()
        .find(|&i| matches!(exec.plan[i].op, Op::Conv { .. }))
        .unwrap_or(0);
    let base = forward(s, clock, exec, batch, reduction, conv, None);
    let k = index;
    let w = exec.params.values[param][index];
    let x = &exec.ws.acts[layer];
    // The BatchNorm's input planes of channel k, once per variant; the chain applies each
    // variant's γ, β to its copy.
    let a = grown(&mut s.a, 3 * n * hw, 0.0);
    for v in 0..3 {
        for t in 0..n {
            a[(v * n + t) * hw..][..hw].copy_from_slice(&x[(t * c + k) * hw..][..hw]);
        }
    }
    let p = &exec.params.values;
    let (g, b) = (p[gamma][k], p[beta][k]);
    let variants = [w, w + delta, w - delta].map(|v| {
        Some(if param == gamma {
            (layer, v, b)
        } else {
            debug_assert_eq!(param, beta);
            (layer, g, v)
        })
    });
    Some(finish(
        s, exec, layer, next, k, n, hw, variants, base, reduction,
    ))
}

/// Loads `batch` and runs the forward pass keeping every activation; returns the loss at W.
/// `act` is the visited layer (for a convolution, `visited` describes it): the [`BatchMemo`]
/// supplies its input and, for a convolution, its output when the batch was seen since the
/// layers before it last changed. Worth it only where those layers are a sizeable part of the
/// pass (the input) or the output fits the budget.
pub(super) fn forward(
    s: &mut BnScratch,
    clock: &Clock,
    exec: &mut Executor,
    batch: &[u32],
    reduction: Reduction,
    act: usize,
    visited: Option<Visited>,
) -> f64 {
    let n = batch.len();
    let n_train = exec.train.len();
    exec.load_batch(batch);
    let prefix: usize = exec.plan[..act].iter().map(|s| s.work).sum();
    let total: usize = exec.plan.iter().map(|s| s.work).sum();
    let fits = |len: usize| n_train * len * 4 <= MEMO_BUDGET;
    let in_len = if act > 0 && 4 * prefix >= total && fits(exec.plan[act - 1].out_len) {
        exec.plan[act - 1].out_len
    } else {
        0
    };
    // The output kept: after the convolution and the pooling right after it.
    let (out_act, out_len, w_len) = match visited {
        Some(v) => {
            let mut o = act + 1;
            while matches!(exec.plan[o].op, Op::AvgPool { .. } | Op::MaxPool { .. }) {
                o += 1;
            }
            let len = exec.plan[o - 1].out_len;
            let w_len = exec.params.values[v.weight].len()
                + v.bias.map_or(0, |b| exec.params.values[b].len());
            if fits(len) {
                (o, len, w_len)
            } else {
                (0, 0, 0)
            }
        }
        None => (0, 0, 0),
    };
    if in_len == 0 && out_act == 0 {
        exec.forward_from(0, n, Mode::Train, true);
        return reduction.finish(exec.loss_sum(n), n);
    }
    let memo = &mut s.memo;
    let same = memo.active
        && memo.act == act
        && (memo.in_len, memo.out_act, memo.out_len, memo.w_len)
            == (in_len, out_act, out_len, w_len)
        && clock.unchanged_since(memo.tick, 0..act);
    if !same {
        // Start afresh, keeping the buffers, with room for every batch of a partition twice
        // (so that visits allocate nothing once the memo is set up).
        let slots = 2 * n_train.div_ceil(n);
        memo.act = act;
        memo.tick = clock.now();
        memo.active = true;
        (memo.in_len, memo.out_act, memo.out_len, memo.w_len) = (in_len, out_act, out_len, w_len);
        memo.index.clear();
        memo.index.reserve(slots);
        memo.entries.clear();
        memo.entries.reserve(slots);
        memo.batches.clear();
        memo.batches.reserve(2 * n_train + n);
        memo.input.clear();
        memo.input.reserve(n_train * in_len + n * in_len);
        memo.output.clear();
        memo.output.reserve(n_train * out_len + n * out_len);
        memo.weights.clear();
        memo.weights.reserve(slots * w_len);
        memo.chans.reserve(64);
        (memo.in_used, memo.out_used, memo.hits) = (0, 0, 0);
    }
    let h = batch_hash(batch);
    let hit = memo
        .index
        .get(&h)
        .copied()
        .filter(|&e| memo.batches[memo.entries[e].batch.clone()] == batch[..]);
    match hit {
        Some(e) => {
            memo.hits += 1;
            let (input, output) = (memo.entries[e].input, memo.entries[e].output);
            // Channels whose weights changed since the entry was made, and channel k.
            let mut chans = std::mem::take(&mut memo.chans);
            chans.clear();
            if let (Some((_, w_off)), Some(v)) = (output, visited) {
                let p = &exec.params.values;
                let taps = v.conv.taps();
                let w = &memo.weights[w_off..w_off + w_len];
                let wl = p[v.weight].len();
                let differs =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).any(|(a, b)| a.to_bits() != b.to_bits());
                chans.extend((0..v.conv.c_out).filter(|&c| {
                    c == v.k
                        || differs(&p[v.weight][c * taps..(c + 1) * taps], &w[c * taps..])
                        || v.bias
                            .is_some_and(|b| differs(&p[b][c..c + 1], &w[wl + c..]))
                }));
            }
            match input {
                Some(off) => exec.ws.acts[act][..n * in_len]
                    .copy_from_slice(&memo.input[off..off + n * in_len]),
                None => forward_prefix(exec, n, act),
            }
            match (output, visited) {
                (Some((off, w_off)), Some(v)) => {
                    exec.ws.acts[out_act][..n * out_len]
                        .copy_from_slice(&memo.output[off..off + n * out_len]);
                    recompute_channels(&mut s.b, exec, act, out_act, v, &chans, n);
                    exec.forward_from(out_act, n, Mode::Train, true);
                    // Keep the entry current, so that the next hit recomputes only what
                    // changes until then.
                    let memo = &mut s.memo;
                    memo.output[off..off + n * out_len]
                        .copy_from_slice(&exec.ws.acts[out_act][..n * out_len]);
                    copy_weights(exec, v, &mut memo.weights[w_off..w_off + w_len]);
                }
                _ => exec.forward_from(act, n, Mode::Train, true),
            }
            s.memo.chans = chans;
        }
        None => {
            exec.forward_from(0, n, Mode::Train, true);
            // Store while within budget, unless batches evidently do not recur.
            let recurs = memo.hits > 0 || memo.entries.len() < 2 * n_train.div_ceil(n);
            let room = memo.batches.len() + n <= memo.batches.capacity()
                && memo.entries.len() < memo.entries.capacity();
            if recurs && room && !memo.index.contains_key(&h) {
                // Within the room reserved when the memo was set up: no reallocation.
                let input = (in_len > 0 && memo.in_used + n * in_len <= memo.input.capacity())
                    .then(|| {
                        let off = memo.in_used;
                        grown(&mut memo.input, off + n * in_len, 0.0)[off..]
                            .copy_from_slice(&exec.ws.acts[act][..n * in_len]);
                        memo.in_used += n * in_len;
                        off
                    });
                let output = match visited {
                    Some(v)
                        if out_act > 0 && memo.out_used + n * out_len <= memo.output.capacity() =>
                    {
                        let off = memo.out_used;
                        grown(&mut memo.output, off + n * out_len, 0.0)[off..]
                            .copy_from_slice(&exec.ws.acts[out_act][..n * out_len]);
                        memo.out_used += n * out_len;
                        let w_off = memo.entries.len() * w_len;
                        let w = grown(&mut memo.weights, w_off + w_len, 0.0);
                        copy_weights(exec, v, &mut w[w_off..]);
                        Some((off, w_off))
                    }
                    _ => None,
                };
                if input.is_some() || output.is_some() {
                    memo.index.insert(h, memo.entries.len());
                    let start = memo.batches.len();
                    memo.batches.extend_from_slice(batch);
                    memo.entries.push(Entry {
                        batch: start..start + n,
                        input,
                        output,
                    });
                }
            }
        }
    }
    reduction.finish(exec.loss_sum(n), n)
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
            conv3x3_forward(
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
                    avgpool2_forward(n, h, w, y, z);
                    (h / 2) * (w / 2)
                }
                Op::MaxPool { h, w, .. } => {
                    maxpool2_forward(n, h, w, y, z);
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

/// Runs the chain from plan index `first` on the three variants' channel-`k` planes in `s.a`
/// (`[3][n][hw]`; each variant's planes run separately, as a BatchNorm in the chain takes its
/// statistics over one variant's batch), then the next layer; returns the three losses.
#[allow(clippy::too_many_arguments)]
fn finish(
    s: &mut BnScratch,
    exec: &mut Executor,
    first: usize,
    next: Next,
    k: usize,
    n: usize,
    hw: usize,
    variants: [Option<(usize, f32, f32)>; 3],
    base: f64,
    reduction: Reduction,
) -> [f64; 3] {
    let end = end_of(exec, next);
    let hwo = chain_out_plane(exec, end);
    let mut one = std::mem::take(&mut s.dp);
    let mut outs = std::mem::take(&mut s.delta);
    outs.clear();
    for (v, gb) in variants.into_iter().enumerate() {
        one.clear();
        one.extend_from_slice(&s.a[v * n * hw..(v + 1) * n * hw]);
        chain(
            exec,
            first..end,
            k,
            n,
            &mut one,
            &mut s.b,
            &mut s.moments,
            gb,
        );
        outs.extend_from_slice(&one[..n * hwo]);
    }
    grown(&mut s.a, 3 * n * hwo, 0.0).copy_from_slice(&outs);
    s.dp = one;
    s.delta = outs;
    next_losses(s, exec, next, k, n, base, reduction)
}

/// Values per channel plane of the input of layer `end` (the chain's output).
fn chain_out_plane(exec: &Executor, end: usize) -> usize {
    exec.plan[end].in_len / channels_in(exec, end).max(1)
}

/// Given the chain outputs of the three variants in `s.a` (`[3][n][hwo]`), the losses.
fn next_losses(
    s: &mut BnScratch,
    exec: &mut Executor,
    next: Next,
    k: usize,
    n: usize,
    base: f64,
    reduction: Reduction,
) -> [f64; 3] {
    let end = end_of(exec, next);
    let hwo = chain_out_plane(exec, end);
    match next {
        Next::Dense { d_in, weight } => {
            let classes = exec.spec.classes;
            let wf = &exec.params.values[weight];
            let logits = &exec.ws.acts[exec.plan.len()][..n * classes];
            let labels = &exec.ws.labels[..n];
            let o = &s.a;
            let mut acc = [LogProd::default(); 3];
            let mut z = [0.0f64; 64];
            for t in 0..n {
                let o0 = &o[t * hwo..(t + 1) * hwo];
                for (v, acc) in acc.iter_mut().enumerate() {
                    let ov = &o[(v * n + t) * hwo..][..hwo];
                    for (cls, z) in z[..classes].iter_mut().enumerate() {
                        let row = &wf[cls * d_in + k * hwo..][..hwo];
                        let dz: f64 = row
                            .iter()
                            .zip(ov.iter().zip(o0))
                            .map(|(&w, (&a, &b))| f64::from(w) * f64::from(a - b))
                            .sum();
                        *z = f64::from(logits[t * classes + cls]) + dz;
                    }
                    push_ce(acc, &z[..classes], usize::from(labels[t]));
                }
            }
            acc.map(|a| reduction.finish(a.value(), n))
        }
        Next::Conv {
            layer,
            conv,
            weight,
        } => {
            let p_len = conv.out_len();
            let hw = conv.h * conv.w;
            debug_assert_eq!(hw, hwo);
            let base_p = grown(&mut s.base_p, n * p_len, 0.0);
            base_p.copy_from_slice(&exec.ws.acts[layer + 1][..n * p_len]);
            let w = &exec.params.values[weight];
            s.w_k.clear();
            for o in 0..conv.c_out {
                s.w_k.extend_from_slice(&w[(o * conv.c_in + k) * 9..][..9]);
            }
            let one = Conv3x3 { c_in: 1, ..conv };
            let mut out = [base, 0.0, 0.0];
            for (v, slot) in out.iter_mut().enumerate().skip(1) {
                let delta = grown(&mut s.delta, n * hw, 0.0);
                for ((d, &a), &b) in delta
                    .iter_mut()
                    .zip(&s.a[v * n * hw..(v + 1) * n * hw])
                    .zip(&s.a[..n * hw])
                {
                    *d = a - b;
                }
                let delta = &s.delta[..n * hw];
                let w_k = &s.w_k;
                let dp = grown(&mut s.dp, n * p_len, 0.0);
                let task = |(c, dp): (usize, &mut [f32])| {
                    let m = dp.len() / p_len;
                    let x = &delta[c * CHUNK * hw..][..m * hw];
                    conv3x3_forward(&one, m, x, w_k, None, dp);
                };
                if parallel(n * one.macs()) {
                    dp.par_chunks_mut(CHUNK * p_len).enumerate().for_each(task);
                } else {
                    dp.chunks_mut(CHUNK * p_len).enumerate().for_each(task);
                }
                let dst = &mut exec.ws.acts[layer + 1][..n * p_len];
                for ((d, &p), &q) in dst.iter_mut().zip(&s.base_p[..n * p_len]).zip(&s.dp[..]) {
                    *d = p + q;
                }
                exec.forward_from(layer + 1, n, Mode::Train, false);
                *slot = reduction.finish(exec.loss_sum(n), n);
            }
            out
        }
    }
}

/// Channels of the input of layer `i` (its input length over its plane length).
fn channels_in(exec: &Executor, i: usize) -> usize {
    match exec.plan[i].op {
        Op::Conv { conv, .. } => conv.c_in,
        Op::Dense { d_in, .. } => {
            // The dense layer's input is the chain's output: channels × plane.
            let prev = i - 1;
            d_in / plane_out(exec, prev).max(1)
        }
        _ => unreachable!(),
    }
}
