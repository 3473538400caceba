//! Candidates of a convolution or BatchNorm of a BatchNorm model: channel `k` alone through
//! the chain up to the next parameter layer (see the [module docs](super)).

use super::memo::{forward, Visited};
use super::{PerBatch, CHUNK};
use crate::executor::{view, view_mut, Executor, Mode, Op};
use crate::incremental::util::{
    add_shifted, changes, conv_forward_onto, grown, parallel, push_ce, LogProd,
};
use crate::incremental::{Clock, Next, Visit};
use crate::kernels::batchnorm::{batchnorm_apply, combine_moments, plane_moments};
use crate::kernels::conv::Conv3x3;
use crate::kernels::pool::{avgpool2_forward, global_avgpool_forward, maxpool2_forward};
use crate::kernels::relu::relu_forward;
use ndarray::{aview1, aview_mut1};
use rayon::prelude::*;
use rso_models::Reduction;

/// The plan index of the parameter layer after `first`'s chain, checking that every layer in
/// between is channel-local.
pub(super) fn next_after(exec: &Executor, first: usize) -> Option<Next> {
    for (i, step) in exec.plan.iter().enumerate().skip(first) {
        match step.op {
            Op::Relu
            | Op::MaxPool { .. }
            | Op::AvgPool { .. }
            | Op::BatchNorm { .. }
            | Op::GlobalAvgPool { .. } => {}
            Op::Dense { d_in, weight, .. } => {
                return (i + 1 == exec.plan.len()).then_some(Next::Dense {
                    layer: i,
                    d_in,
                    weight,
                });
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

/// Runs the channel-local layers `ops` on the channel-`k` planes of `n` samples held in `a`
/// (`[n][hw]`), leaving the result in `a` (using `b`). A BatchNorm normalises with these
/// planes' batch statistics and channel `k`'s γ, β — or, with `gb = Some((layer, γ, β))`,
/// that γ, β for that layer.
#[allow(clippy::too_many_arguments)]
pub(super) fn chain(
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
                relu_forward(aview1(&x[..n * hw]), aview_mut1(&mut y[..n * hw]));
            }
            Op::MaxPool { h, w, .. } => {
                maxpool2_forward(view((n, 1, h, w), x), view_mut((n, 1, h / 2, w / 2), y))
            }
            Op::AvgPool { h, w, .. } => {
                avgpool2_forward(view((n, 1, h, w), x), view_mut((n, 1, h / 2, w / 2), y))
            }
            Op::GlobalAvgPool { hw, .. } => {
                global_avgpool_forward(view((n, 1, hw), x), view_mut((n, 1), y))
            }
            Op::BatchNorm {
                hw, gamma, beta, ..
            } => {
                let m = grown(moments, n, (0.0, 0.0));
                let xv = view((n, 1, hw), x);
                plane_moments(xv, view_mut((n, 1), m));
                let (mut mean, mut var) = ([0.0f64], [0.0f64]);
                combine_moments(
                    hw,
                    view((n, 1), m),
                    aview_mut1(&mut mean),
                    aview_mut1(&mut var),
                );
                let p = &exec.params.values;
                let (g, bt) = match gb {
                    Some((layer, g, bt)) if layer == i => (g, bt),
                    _ => (p[gamma][k], p[beta][k]),
                };
                let (mean, var) = (aview1(&mean), aview1(&var));
                let y = view_mut((n, 1, hw), y);
                batchnorm_apply(xv, mean, var, aview1(&[g]), aview1(&[bt]), y);
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
pub(crate) fn conv(
    s: &mut PerBatch,
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
    let base = forward(
        &mut s.memo,
        clock,
        exec,
        batch,
        reduction,
        layer,
        Some(visited),
    );
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
pub(crate) fn norm(
    s: &mut PerBatch,
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
    // RSO visits γ and β next to the convolution before them, so they share its memo: the
    // forward pass is that of a visit of the convolution's channel `k` (which recomputes
    // channel k of its output, the planes the candidates start from).
    let k = index;
    let (conv, visited) = (0..layer).rev().find_map(|i| match exec.plan[i].op {
        Op::Conv { conv, weight, bias } => Some((
            i,
            Visited {
                conv,
                weight,
                bias,
                k,
            },
        )),
        _ => None,
    })?;
    let base = forward(
        &mut s.memo,
        clock,
        exec,
        batch,
        reduction,
        conv,
        Some(visited),
    );
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

/// Runs the chain from plan index `first` on the three variants' channel-`k` planes in `s.a`
/// (`[3][n][hw]`; each variant's planes run separately, as a BatchNorm in the chain takes its
/// statistics over one variant's batch), then the next layer; returns the three losses.
#[allow(clippy::too_many_arguments)]
fn finish(
    s: &mut PerBatch,
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
    let end = next.layer();
    let hwo = chain_out_plane(exec, end);
    let mut one = std::mem::take(&mut s.chained);
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
    s.chained = one;
    s.delta = outs;
    next_losses(s, exec, next, k, n, base, reduction)
}

/// Values per channel plane of the input of layer `end` (the chain's output).
fn chain_out_plane(exec: &Executor, end: usize) -> usize {
    exec.plan[end].in_len / channels_in(exec, end).max(1)
}

/// Given the chain outputs of the three variants in `s.a` (`[3][n][hwo]`), the losses.
fn next_losses(
    s: &mut PerBatch,
    exec: &mut Executor,
    next: Next,
    k: usize,
    n: usize,
    base: f64,
    reduction: Reduction,
) -> [f64; 3] {
    let end = next.layer();
    let hwo = chain_out_plane(exec, end);
    match next {
        Next::Dense { d_in, weight, .. } => {
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
            // W's output of the next convolution goes aside for the candidates' (a swap of
            // buffers of equal length, not a copy) and comes back after them.
            let len = exec.ws.acts[layer + 1].len();
            s.base_p.resize(len, 0.0);
            std::mem::swap(&mut exec.ws.acts[layer + 1], &mut s.base_p);
            input_channel(&exec.params.values[weight], conv, k, &mut s.w_k);
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
                let dst = &mut exec.ws.acts[layer + 1][..n * p_len];
                moved_by_channel(
                    conv,
                    &s.w_k,
                    n,
                    &s.delta[..n * hw],
                    &s.base_p[..n * p_len],
                    dst,
                );
                exec.forward_from(layer + 1, n, Mode::Train, false);
                *slot = reduction.finish(exec.loss_sum(n), n);
            }
            std::mem::swap(&mut exec.ws.acts[layer + 1], &mut s.base_p);
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

/// The weights of input channel `k` of convolution `conv` (weight array `w`), `[c_out][9]`,
/// into `w_k`.
pub(super) fn input_channel(w: &[f32], conv: Conv3x3, k: usize, w_k: &mut Vec<f32>) {
    w_k.clear();
    for o in 0..conv.c_out {
        w_k.extend_from_slice(&w[(o * conv.c_in + k) * 9..][..9]);
    }
}

/// The output of convolution `conv` after a change `delta` (`[n][h·w]`) of one input channel
/// whose weights are `w_k` (`[c_out][9]`): `p = base + w_k ⊛ delta` (`[n][c_out·h·w]`), in
/// chunks of [`CHUNK`] samples (over threads when large; the same values either way).
pub(super) fn moved_by_channel(
    conv: Conv3x3,
    w_k: &[f32],
    n: usize,
    delta: &[f32],
    base: &[f32],
    p: &mut [f32],
) {
    let one = Conv3x3 { c_in: 1, ..conv };
    let (hw, p_len) = (conv.h * conv.w, conv.out_len());
    let task = |(c, p): (usize, &mut [f32])| {
        let m = p.len() / p_len;
        let x = &delta[c * CHUNK * hw..][..m * hw];
        let base = &base[c * CHUNK * p_len..][..m * p_len];
        conv_forward_onto(&one, m, x, w_k, base, p);
    };
    let p = &mut p[..n * p_len];
    if parallel(n * one.macs()) {
        p.par_chunks_mut(CHUNK * p_len).enumerate().for_each(task);
    } else {
        p.chunks_mut(CHUNK * p_len).enumerate().for_each(task);
    }
}
