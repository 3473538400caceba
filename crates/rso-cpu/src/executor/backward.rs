//! Backward passes of the [`Executor`] (SGD): parameter gradients into the workspace, every
//! reduction over samples in a fixed order.

use super::{grown, par_samples, samples, view, view_mut, Executor, Mode, Op, GRAD_CHUNK};
use crate::kernels::batchnorm::{backward_partials, batchnorm_backward_input, combine_partials};
use crate::kernels::conv::{conv3x3_backward_input, conv3x3_backward_params, Conv3x3};
use crate::kernels::dense::{dense_backward_input, dense_backward_params};
use crate::kernels::loss::cross_entropy_backward;
use crate::kernels::pool::{avgpool2_backward, global_avgpool_backward, maxpool2_backward};
use crate::kernels::relu::relu_backward;
use ndarray::{aview1, aview_mut1, ArrayView4, Axis};
use rayon::prelude::*;
use rso_models::Reduction;

impl Executor {
    /// Forward and backward on `batch`; leaves the gradients in `ws.grads`, returns the loss.
    pub(crate) fn compute_grads(&mut self, batch: &[u32], reduction: Reduction) -> f64 {
        let n = batch.len();
        self.load_batch(batch);
        self.forward_from(0, n, Mode::Train, true);
        let sum = self.loss_sum(n);
        let classes = self.spec.classes;
        let scale = match reduction {
            Reduction::Mean => 1.0 / n.max(1) as f64,
            Reduction::Sum => 1.0,
        };
        let logits = view((n, classes), &self.ws.acts[self.plan.len()]);
        let labels = aview1(&self.ws.labels[..n]);
        let dy = view_mut((n, classes), grown(&mut self.ws.dy, n * classes, 0.0));
        cross_entropy_backward(logits, labels, scale, dy);
        for i in (0..self.plan.len()).rev() {
            self.backward_step(i, n);
            std::mem::swap(&mut self.ws.dy, &mut self.ws.dx);
        }
        reduction.finish(sum, n)
    }

    /// The gradients left by the last [`Executor::compute_grads`], canonical order.
    pub(crate) fn grads(&self) -> &[Vec<f32>] {
        &self.ws.grads
    }

    /// One SGD step on `batch` (mean loss): `w ← w − lr·∇w`; returns the loss.
    pub(crate) fn sgd_step(&mut self, batch: &[u32], lr: f32) -> f64 {
        let loss = self.compute_grads(batch, Reduction::Mean);
        for (v, g) in self.params.values.iter_mut().zip(&self.ws.grads) {
            for (w, d) in v.iter_mut().zip(g) {
                *w -= lr * d;
            }
        }
        loss
    }

    /// Backward through layer `i`: parameter gradients into `ws.grads`, and (except for the
    /// first layer) the input gradient from `ws.dy` into `ws.dx`.
    fn backward_step(&mut self, i: usize, n: usize) {
        let step = &self.plan[i];
        let (in_len, out_len) = (step.in_len, step.out_len);
        let split = n.saturating_mul(step.work) >= self.par_min_work;
        let ws = &mut self.ws;
        let x = &ws.acts[i][..n * in_len];
        let dy = &ws.dy[..n * out_len];
        let need_dx = i > 0;
        let dx = grown(&mut ws.dx, n * in_len, 0.0);
        let p = &self.params.values;
        match step.op {
            Op::Conv { conv, weight, bias } => {
                let (x, dy) = (view(conv.input_shape(n), x), view(conv.output_shape(n), dy));
                let partials = &mut ws.grad_partials;
                conv_param_grads(&conv, x, dy, split, partials, &mut ws.grads, weight, bias);
                if need_dx {
                    let w = view(conv.weight_shape(), &p[weight]);
                    par_samples(split, view_mut(conv.input_shape(n), dx), |r, dx| {
                        conv3x3_backward_input(&conv, samples(&dy, &r), w, dx)
                    });
                }
            }
            Op::Dense {
                d_in,
                d_out,
                weight,
                bias,
            } => {
                let (gw, gb) = weight_and_bias(&mut ws.grads, weight, bias);
                let (x, dy) = (view((n, d_in), x), view((n, d_out), dy));
                dense_backward_params(x, dy, view_mut((d_out, d_in), gw), gb.map(aview_mut1));
                if need_dx {
                    let w = view((d_out, d_in), &p[weight]);
                    par_samples(split, view_mut((n, d_in), dx), |r, dx| {
                        dense_backward_input(samples(&dy, &r), w, dx)
                    });
                }
            }
            Op::BatchNorm {
                c,
                hw,
                gamma,
                beta,
                slot,
            } => {
                let stats = &ws.batch_stats[slot];
                let (mean, var) = (aview1(&stats.mean), aview1(&stats.var));
                let (x, dy) = (view((n, c, hw), x), view((n, c, hw), dy));
                let partials = grown(&mut ws.partials_f64, n * c, (0.0, 0.0));
                par_samples(split, view_mut((n, c), partials), |r, s| {
                    backward_partials(samples(&x, &r), samples(&dy, &r), mean, var, s)
                });
                let dgamma = grown(&mut ws.bn_dgamma, c, 0.0);
                let dbeta = grown(&mut ws.bn_dbeta, c, 0.0);
                combine_partials(
                    view((n, c), partials),
                    aview_mut1(dgamma),
                    aview_mut1(dbeta),
                );
                for (g, &d) in ws.grads[gamma].iter_mut().zip(dgamma.iter()) {
                    *g = d as f32;
                }
                for (g, &d) in ws.grads[beta].iter_mut().zip(dbeta.iter()) {
                    *g = d as f32;
                }
                if need_dx {
                    let (g, dgamma, dbeta) = (aview1(&p[gamma]), aview1(dgamma), aview1(dbeta));
                    par_samples(split, view_mut((n, c, hw), dx), |r, dx| {
                        let (x, dy) = (samples(&x, &r), samples(&dy, &r));
                        batchnorm_backward_input(n, x, dy, mean, var, g, dgamma, dbeta, dx)
                    });
                }
            }
            Op::Relu | Op::MaxPool { .. } | Op::AvgPool { .. } | Op::GlobalAvgPool { .. } => {
                if need_dx {
                    parameterless_backward(&step.op, split, n, x, dy, dx);
                }
            }
        }
    }
}

/// Input gradient `dx` of a parameterless layer from `dy`, for `n` samples of its input `x`.
fn parameterless_backward(op: &Op, split: bool, n: usize, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    if n == 0 {
        return;
    }
    match *op {
        Op::Relu => {
            let len = x.len() / n;
            let (x, dy) = (view((n, len), x), view((n, len), dy));
            par_samples(split, view_mut((n, len), dx), |r, dx| {
                relu_backward(samples(&x, &r), samples(&dy, &r), dx)
            })
        }
        Op::MaxPool { c, h, w } => {
            let (x, dy) = (view((n, c, h, w), x), view((n, c, h / 2, w / 2), dy));
            par_samples(split, view_mut((n, c, h, w), dx), |r, dx| {
                maxpool2_backward(samples(&x, &r), samples(&dy, &r), dx)
            })
        }
        Op::AvgPool { c, h, w } => {
            let dy = view((n, c, h / 2, w / 2), dy);
            par_samples(split, view_mut((n, c, h, w), dx), |r, dx| {
                avgpool2_backward(samples(&dy, &r), dx)
            })
        }
        Op::GlobalAvgPool { c, hw } => {
            let dy = view((n, c), dy);
            par_samples(split, view_mut((n, c, hw), dx), |r, dx| {
                global_avgpool_backward(samples(&dy, &r), dx)
            })
        }
        _ => unreachable!("a layer with parameters"),
    }
}

/// Mutable gradient arrays of a weight and its optional bias.
fn weight_and_bias(
    grads: &mut [Vec<f32>],
    weight: usize,
    bias: Option<usize>,
) -> (&mut [f32], Option<&mut [f32]>) {
    match bias {
        // Canonical order puts a layer's bias right after its weight.
        Some(b) => {
            debug_assert_eq!(b, weight + 1);
            let (w, rest) = grads[weight..].split_at_mut(1);
            (&mut w[0], Some(&mut rest[0]))
        }
        None => (&mut grads[weight], None),
    }
}

/// Convolution weight and bias gradients over the samples of `x: [n, c_in, h, w]` and
/// `dy: [n, c_out, h, w]`: partial sums over chunks of [`GRAD_CHUNK`] samples (in parallel
/// when `split`), added in chunk order.
#[allow(clippy::too_many_arguments)]
fn conv_param_grads(
    conv: &Conv3x3,
    x: ArrayView4<f32>,
    dy: ArrayView4<f32>,
    split: bool,
    partials: &mut Vec<f32>,
    grads: &mut [Vec<f32>],
    weight: usize,
    bias: Option<usize>,
) {
    let (wlen, blen) = (
        conv.c_out * conv.taps(),
        if bias.is_some() { conv.c_out } else { 0 },
    );
    let (gw, mut gb) = weight_and_bias(grads, weight, bias);
    let chunks = x.len_of(Axis(0)).div_ceil(GRAD_CHUNK);
    if chunks <= 1 {
        let gw = view_mut(conv.weight_shape(), gw);
        conv3x3_backward_params(conv, x, dy, gw, gb.map(aview_mut1));
        return;
    }
    let stride = wlen + blen;
    let partials = grown(partials, chunks * stride, 0.0);
    // One chunk of samples of `x` and `dy`, and its part of `partials`.
    let run = |((xs, dys), part): ((ArrayView4<f32>, ArrayView4<f32>), &mut [f32])| {
        let (pw, pb) = part.split_at_mut(wlen);
        let pb = if blen > 0 { Some(aview_mut1(pb)) } else { None };
        conv3x3_backward_params(conv, xs, dys, view_mut(conv.weight_shape(), pw), pb);
    };
    let xs = x.axis_chunks_iter(Axis(0), GRAD_CHUNK);
    let dys = dy.axis_chunks_iter(Axis(0), GRAD_CHUNK);
    if !split || rayon::current_num_threads() <= 1 {
        xs.zip(dys).zip(partials.chunks_mut(stride)).for_each(run);
    } else {
        xs.into_par_iter()
            .zip(dys.into_par_iter())
            .zip(partials.par_chunks_mut(stride))
            .for_each(run);
    }
    gw.fill(0.0);
    if let Some(gb) = gb.as_deref_mut() {
        gb.fill(0.0);
    }
    for part in partials.chunks(stride) {
        for (g, p) in gw.iter_mut().zip(&part[..wlen]) {
            *g += p;
        }
        if let Some(gb) = gb.as_deref_mut() {
            for (g, p) in gb.iter_mut().zip(&part[wlen..]) {
                *g += p;
            }
        }
    }
}
