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
use crate::kernels::batchnorm::{batchnorm_apply, combine_moments, plane_moments};
use crate::kernels::conv::{conv3x3_forward, Conv3x3};
use crate::kernels::pool::{avgpool2_forward, global_avgpool_forward, maxpool2_forward};
use crate::kernels::relu::relu_forward;
use crate::network::{CpuNetwork, Mode, Op};
use rayon::prelude::*;
use rso_models::Reduction;
use std::collections::HashMap;

/// Samples per task of the one-channel convolution (fixed: results do not depend on threads).
const CHUNK: usize = 16;

/// Bytes of per-batch activations a [`BatchMemo`] may hold.
const MEMO_BUDGET: usize = 1 << 30;

/// Per-batch copies of one activation (the input of the layer being swept), for batches that
/// recur: preset `seed` cuts each round's shuffled training set into ⌈N/B⌉ batches and draws
/// one per visit, so during a sweep every batch comes back many times, and the layers before
/// the swept one (whose parameters do not change during the sweep) need to run once per batch
/// instead of once per visit. A hit copies the stored activation into place and the forward
/// pass starts there: the same arithmetic on the same values, so the losses are bit for bit
/// those of a full forward pass. Batches that do not recur (preset `paper`'s sliding windows)
/// stop the memo from storing after a while.
#[derive(Debug, Default)]
pub(super) struct BatchMemo {
    /// The memoised activation index, its values per sample, and the clock tick the entries
    /// were made at (valid while no layer before `act` changed since).
    act: usize,
    len: usize,
    tick: u64,
    active: bool,
    /// Entry by hash of the batch's indices: `(batch, offset into data)`.
    index: HashMap<u64, usize>,
    entries: Vec<(Vec<u32>, usize)>,
    data: Vec<f32>,
    used: usize,
    hits: usize,
}

impl BatchMemo {
    /// Forgets every entry (keeping the buffers).
    fn reset(&mut self, act: usize, len: usize, tick: u64) {
        self.act = act;
        self.len = len;
        self.tick = tick;
        self.active = true;
        self.index.clear();
        self.entries.clear();
        self.used = 0;
        self.hits = 0;
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
fn next_after(net: &CpuNetwork, first: usize) -> Option<Next> {
    for (i, step) in net.plan.iter().enumerate().skip(first) {
        match step.op {
            Op::Relu
            | Op::MaxPool { .. }
            | Op::AvgPool { .. }
            | Op::BatchNorm { .. }
            | Op::GlobalAvgPool { .. } => {}
            Op::Dense { d_in, weight, .. } => {
                return (i + 1 == net.plan.len()).then_some(Next::Dense { d_in, weight });
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
fn end_of(net: &CpuNetwork, next: Next) -> usize {
    match next {
        Next::Dense { .. } => net.plan.len() - 1,
        Next::Conv { layer, .. } => layer,
    }
}

/// Runs the channel-local layers `ops` on the channel-`k` planes of `n` samples held in `a`
/// (`[n][hw]`), leaving the result in `a` (using `b`). A BatchNorm normalises with these
/// planes' batch statistics and channel `k`'s γ, β — or `gb` for the layer `gb_layer`.
#[allow(clippy::too_many_arguments)]
fn chain(
    net: &CpuNetwork,
    ops: std::ops::Range<usize>,
    k: usize,
    n: usize,
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
    moments: &mut Vec<(f64, f64)>,
    gb: Option<(usize, f32, f32)>,
) {
    for i in ops {
        let step = &net.plan[i];
        let x = &a[..];
        let y = grown(b, a.len(), 0.0);
        match step.op {
            Op::Relu => {
                let hw = plane_len(net, i);
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
                let p = &net.params.values;
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
fn plane_len(net: &CpuNetwork, i: usize) -> usize {
    match net.plan[i].op {
        Op::Relu => {
            // A ReLU's planes are those of the layer before it (or the input's).
            if i == 0 {
                net.spec.input[1] * net.spec.input[2]
            } else {
                plane_out(net, i - 1)
            }
        }
        _ => unreachable!(),
    }
}

/// Values per channel plane of the output of layer `i`.
fn plane_out(net: &CpuNetwork, i: usize) -> usize {
    match net.plan[i].op {
        Op::Conv { conv, .. } => conv.h * conv.w,
        Op::MaxPool { h, w, .. } | Op::AvgPool { h, w, .. } => (h / 2) * (w / 2),
        Op::BatchNorm { hw, .. } => hw,
        Op::GlobalAvgPool { .. } => 1,
        Op::Relu => plane_len(net, i),
        Op::Dense { .. } => 1,
    }
}

/// The three losses for a scalar of the convolution at plan index `layer`.
pub(super) fn conv(
    s: &mut BnScratch,
    clock: &Clock,
    net: &mut CpuNetwork,
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
    let Op::Conv { conv, weight, .. } = net.plan[layer].op else {
        return None;
    };
    let next = next_after(net, layer + 1)?;
    let n = batch.len();
    let base = forward(s, clock, net, batch, reduction, layer);
    let taps = conv.taps();
    let (k, tap) = if param == weight {
        (index / taps, Some(index % taps))
    } else {
        (index, None)
    };
    let [dp, dm] = changes(net.params.values[param][index], delta);
    let hw = conv.h * conv.w;
    // Channel k of the convolution's output at W, W + Δ, W − Δ: `[v][t][hw]`.
    let y = &net.ws.acts[layer + 1];
    let x = &net.ws.acts[layer];
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
        net,
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
    net: &mut CpuNetwork,
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
    } = net.plan[layer].op
    else {
        return None;
    };
    let next = next_after(net, layer + 1)?;
    let n = batch.len();
    // No memo: γ and β sweeps are 16 visits each, too few for batches to recur.
    let base = forward(s, clock, net, batch, reduction, 0);
    let k = index;
    let w = net.params.values[param][index];
    let x = &net.ws.acts[layer];
    // The BatchNorm's input planes of channel k, once per variant; the chain applies each
    // variant's γ, β to its copy.
    let a = grown(&mut s.a, 3 * n * hw, 0.0);
    for v in 0..3 {
        for t in 0..n {
            a[(v * n + t) * hw..][..hw].copy_from_slice(&x[(t * c + k) * hw..][..hw]);
        }
    }
    let p = &net.params.values;
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
        s, net, layer, next, k, n, hw, variants, base, reduction,
    ))
}

/// Loads `batch` and runs the forward pass keeping every activation; returns the loss at W.
/// Activation `act` (the input of the layer being visited) comes from the [`BatchMemo`] when
/// the batch was seen since the layers before it last changed, and when those layers are a
/// sizeable part of the forward pass.
pub(super) fn forward(
    s: &mut BnScratch,
    clock: &Clock,
    net: &mut CpuNetwork,
    batch: &[u32],
    reduction: Reduction,
    act: usize,
) -> f64 {
    let n = batch.len();
    net.load_batch(batch);
    let prefix: usize = net.plan[..act].iter().map(|s| s.work).sum();
    let total: usize = net.plan.iter().map(|s| s.work).sum();
    if act == 0 || 4 * prefix < total {
        net.forward_from(0, n, Mode::Train, true);
        return reduction.finish(net.loss_sum(n), n);
    }
    let len = net.plan[act - 1].out_len;
    let memo = &mut s.memo;
    if !(memo.active && memo.act == act && clock.unchanged_since(memo.tick, 0..act)) {
        memo.reset(act, len, clock.now());
    }
    let h = batch_hash(batch);
    let hit = memo
        .index
        .get(&h)
        .map(|&e| &memo.entries[e])
        .filter(|(b, _)| b[..] == batch[..])
        .map(|&(_, off)| off);
    match hit {
        Some(off) => {
            memo.hits += 1;
            net.ws.acts[act][..n * len].copy_from_slice(&memo.data[off..off + n * len]);
            net.forward_from(act, n, Mode::Train, true);
        }
        None => {
            net.forward_from(0, n, Mode::Train, true);
            // Store while within budget, unless batches evidently do not recur.
            let room = (memo.used + n * len) * 4 <= MEMO_BUDGET;
            let recurs = memo.hits > 0 || memo.entries.len() < 2 * net.train.len().div_ceil(n);
            if room && recurs && !memo.index.contains_key(&h) {
                let off = memo.used;
                grown(&mut memo.data, off + n * len, 0.0)[off..]
                    .copy_from_slice(&net.ws.acts[act][..n * len]);
                memo.used += n * len;
                memo.index.insert(h, memo.entries.len());
                memo.entries.push((batch.to_vec(), off));
            }
        }
    }
    reduction.finish(net.loss_sum(n), n)
}

/// Runs the chain from plan index `first` on the three variants' channel-`k` planes in `s.a`
/// (`[3][n][hw]`; each variant's planes run separately, as a BatchNorm in the chain takes its
/// statistics over one variant's batch), then the next layer; returns the three losses.
#[allow(clippy::too_many_arguments)]
fn finish(
    s: &mut BnScratch,
    net: &mut CpuNetwork,
    first: usize,
    next: Next,
    k: usize,
    n: usize,
    hw: usize,
    variants: [Option<(usize, f32, f32)>; 3],
    base: f64,
    reduction: Reduction,
) -> [f64; 3] {
    let end = end_of(net, next);
    let hwo = chain_out_plane(net, end);
    let mut one = std::mem::take(&mut s.dp);
    let mut outs = std::mem::take(&mut s.delta);
    outs.clear();
    for (v, gb) in variants.into_iter().enumerate() {
        one.clear();
        one.extend_from_slice(&s.a[v * n * hw..(v + 1) * n * hw]);
        chain(
            net,
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
    next_losses(s, net, next, k, n, base, reduction)
}

/// Values per channel plane of the input of layer `end` (the chain's output).
fn chain_out_plane(net: &CpuNetwork, end: usize) -> usize {
    net.plan[end].in_len / channels_in(net, end).max(1)
}

/// Given the chain outputs of the three variants in `s.a` (`[3][n][hwo]`), the losses.
fn next_losses(
    s: &mut BnScratch,
    net: &mut CpuNetwork,
    next: Next,
    k: usize,
    n: usize,
    base: f64,
    reduction: Reduction,
) -> [f64; 3] {
    let end = end_of(net, next);
    let hwo = chain_out_plane(net, end);
    match next {
        Next::Dense { d_in, weight } => {
            let classes = net.spec.classes;
            let wf = &net.params.values[weight];
            let logits = &net.ws.acts[net.plan.len()][..n * classes];
            let labels = &net.ws.labels[..n];
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
            base_p.copy_from_slice(&net.ws.acts[layer + 1][..n * p_len]);
            let w = &net.params.values[weight];
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
                let dst = &mut net.ws.acts[layer + 1][..n * p_len];
                for ((d, &p), &q) in dst.iter_mut().zip(&s.base_p[..n * p_len]).zip(&s.dp[..]) {
                    *d = p + q;
                }
                net.forward_from(layer + 1, n, Mode::Train, false);
                *slot = reduction.finish(net.loss_sum(n), n);
            }
            out
        }
    }
}

/// Channels of the input of layer `i` (its input length over its plane length).
fn channels_in(net: &CpuNetwork, i: usize) -> usize {
    match net.plan[i].op {
        Op::Conv { conv, .. } => conv.c_in,
        Op::Dense { d_in, .. } => {
            // The dense layer's input is the chain's output: channels × plane.
            let prev = i - 1;
            d_in / plane_out(net, prev).max(1)
        }
        _ => unreachable!(),
    }
}
