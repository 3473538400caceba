//! Forward passes of the [`Executor`]: by segments between training-mode BatchNorm layers,
//! each segment in cache-sized chunks of samples over the threads.

use super::{
    grown, par_samples, samples, view, view_mut, BnStats, Executor, Mode, Op, Step,
    SEGMENT_CHUNK_BYTES,
};
use crate::kernels::batchnorm::{batchnorm_apply, bn_affine, combine_moments, plane_moments};
use crate::kernels::conv::{bn_relu_conv3x3_forward, conv3x3_forward};
use crate::kernels::dense::dense_forward;
use crate::kernels::loss::cross_entropy;
use crate::kernels::pool::{avgpool2_forward, global_avgpool_forward, maxpool2_forward};
use crate::kernels::relu::relu_forward;
use ndarray::{aview1, aview_mut1};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

impl Executor {
    /// Runs layers `first..` on `n` samples whose input to layer `first` is in `acts[first]`
    /// (the other buffers before it are not read). In [`Mode::Train`] every BatchNorm layer
    /// from `first` on uses (and records) the batch's statistics.
    ///
    /// The layers run in segments that end where a training-mode BatchNorm needs the whole
    /// batch's statistics; within a segment every layer is per-sample, so the segment runs
    /// through all its layers on a few samples at a time (which stay in cache), and over
    /// threads by parts of the batch. With `keep_all` every layer's output is left in `acts`
    /// (for a backward pass); otherwise only each segment's last output is (the logits, and the
    /// inputs of training-mode BatchNorm layers), which saves the memory traffic of the rest.
    pub(crate) fn forward_from(&mut self, first: usize, n: usize, mode: Mode, keep_all: bool) {
        self.reserve(n);
        let is_batch_norm = |op: &Op| matches!(op, Op::BatchNorm { .. });
        let mut a = first;
        while a < self.plan.len() {
            if mode == Mode::Train && is_batch_norm(&self.plan[a].op) {
                self.batch_statistics(a, n);
            }
            let b = match mode {
                Mode::Train => (a + 1..self.plan.len())
                    .find(|&i| is_batch_norm(&self.plan[i].op))
                    .unwrap_or(self.plan.len()),
                Mode::Eval => self.plan.len(),
            };
            self.forward_segment(a..b, n, mode, keep_all);
            a = b;
        }
    }

    /// Batch mean and biased variance of the input of BatchNorm layer `i` into `batch_stats`.
    pub(crate) fn batch_statistics(&mut self, i: usize, n: usize) {
        let Op::BatchNorm { c, hw, slot, .. } = self.plan[i].op else {
            unreachable!("layer {i} is not a batch norm");
        };
        let x = view((n, c, hw), &self.ws.acts[i]);
        let split = n.saturating_mul(self.plan[i].work) >= self.par_min_work;
        let moments = grown(&mut self.ws.partials_f64, n * c, (0.0, 0.0));
        par_samples(split, view_mut((n, c), moments), |r, m| {
            plane_moments(samples(&x, &r), m)
        });
        let stats = &mut self.ws.batch_stats[slot];
        let (mean, var) = (aview_mut1(&mut stats.mean), aview_mut1(&mut stats.var));
        combine_moments(hw, view((n, c), moments), mean, var);
    }

    /// Runs the per-sample layers `layers` on `n` samples (see [`Executor::forward_from`]).
    pub(crate) fn forward_segment(
        &mut self,
        layers: Range<usize>,
        n: usize,
        mode: Mode,
        keep_all: bool,
    ) {
        if n == 0 || layers.is_empty() {
            return;
        }
        let steps = &self.plan[layers.clone()];
        let params = &self.params.values;
        let stats = match mode {
            Mode::Train => &self.ws.batch_stats,
            Mode::Eval => &self.running,
        };
        let in_len = steps[0].in_len;
        let bytes = 4 * (in_len + steps.iter().map(|s| s.out_len).sum::<usize>());
        let chunk = (SEGMENT_CHUNK_BYTES / bytes).max(1);
        let work = n.saturating_mul(steps.iter().map(|s| s.work).sum());
        let threads = if work >= self.par_min_work {
            rayon::current_num_threads().min(n)
        } else {
            1
        };
        let (inputs, outputs) = self.ws.acts.split_at_mut(layers.start + 1);
        let input = &inputs[layers.start][..n * in_len];
        let outputs = &mut outputs[..layers.len()];
        if threads <= 1 {
            run_chunks(steps, params, stats, n, chunk, input, outputs, keep_all);
            return;
        }
        // Parts of at most one chunk, at least one per thread, so that work stealing can even
        // out threads that run at different speeds. Each part's share of every output buffer:
        let per_part = chunk.min(n.div_ceil(threads));
        let mut parts: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(per_part))
            .map(|_| Vec::with_capacity(steps.len()))
            .collect();
        for (buf, step) in outputs.iter_mut().zip(steps) {
            let pieces = buf[..n * step.out_len].chunks_mut(per_part * step.out_len);
            for (part, piece) in parts.iter_mut().zip(pieces) {
                part.push(piece);
            }
        }
        parts.into_par_iter().enumerate().for_each(|(p, mut outs)| {
            let samples = p * per_part..((p + 1) * per_part).min(n);
            let x = &input[samples.start * in_len..samples.end * in_len];
            run_chunks(
                steps,
                params,
                stats,
                samples.len(),
                chunk,
                x,
                &mut outs,
                keep_all,
            );
        });
    }

    /// Per-sample cross-entropy of the `n` samples in the last layer's output, into `losses`,
    /// and their sum in sample order.
    pub(crate) fn loss_sum(&mut self, n: usize) -> f64 {
        let classes = self.spec.classes;
        let logits = view((n, classes), &self.ws.acts[self.plan.len()]);
        let labels = aview1(&self.ws.labels[..n]);
        let losses = &mut self.ws.losses[..n];
        let split = n.saturating_mul(20 * classes) >= self.par_min_work;
        par_samples(split, aview_mut1(losses), |r, l| {
            cross_entropy(samples(&logits, &r), samples(&labels, &r), l)
        });
        losses.iter().sum()
    }
}

thread_local! {
    /// Per-thread buffer for the intermediate activations of one chunk of a forward segment.
    static CHUNK_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread buffer for a fused BatchNorm's per-channel scales, then shifts.
    static AFFINE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs the per-sample `steps` on `n` samples, `chunk` samples at a time through all steps:
/// `input` holds the samples' input to the first step, `outputs[k]` receives step `k`'s output
/// when `keep_all` (else only the last step's output is written there, the others live in a
/// per-thread chunk buffer, and a BatchNorm, ReLU, convolution run is one fused kernel call
/// whose first two outputs are never written at all).
///
/// Flat slices, not views: the buffers of one chunk have a different shape per step and share
/// one scratch by offsets, and on one thread the full buffers pass through without the list of
/// views that would allocate; [`layer_forward`] gives each kernel call its layer's shape.
#[allow(clippy::too_many_arguments)]
fn run_chunks<B: AsRef<[f32]> + AsMut<[f32]>>(
    steps: &[Step],
    params: &[Vec<f32>],
    stats: &[BnStats],
    n: usize,
    chunk: usize,
    input: &[f32],
    outputs: &mut [B],
    keep_all: bool,
) {
    let last = steps.len() - 1;
    // Where step k's chunk output starts in the scratch (when it goes there).
    let offset = |k: usize| {
        if keep_all {
            0
        } else {
            chunk * steps[..k].iter().map(|s| s.out_len).sum::<usize>()
        }
    };
    CHUNK_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < offset(last) {
            scratch.resize(offset(last), 0.0);
        }
        for start in (0..n).step_by(chunk) {
            let r = start..(start + chunk).min(n);
            let mut k = 0;
            while k < steps.len() {
                // Step `k` alone, or BatchNorm, ReLU, convolution in one kernel when their
                // outputs before the convolution's are not kept (`end` is the last step run).
                let fused = bn_relu_conv(&steps[k..]).filter(|_| !keep_all);
                let end = if fused.is_some() { k + 2 } else { k };
                let (step, out) = (&steps[k], &steps[end]);
                let (prev, cur) = outputs.split_at_mut(end);
                let (before, after) = scratch.split_at_mut(offset(end));
                let x = if k == 0 {
                    &input[r.start * step.in_len..r.end * step.in_len]
                } else if keep_all {
                    &prev[k - 1].as_ref()[r.start * step.in_len..r.end * step.in_len]
                } else {
                    &before[offset(k - 1)..][..r.len() * step.in_len]
                };
                let y = if keep_all || end == last {
                    &mut cur[0].as_mut()[r.start * out.out_len..r.end * out.out_len]
                } else {
                    &mut after[..r.len() * out.out_len]
                };
                match fused {
                    Some((bn, conv)) => fused_forward(bn, conv, params, stats, r.len(), x, y),
                    None => layer_forward(&step.op, params, stats, r.len(), x, y),
                }
                k = end + 1;
            }
        }
    });
}

/// The BatchNorm and convolution of `steps` when they start BatchNorm, ReLU, convolution.
fn bn_relu_conv(steps: &[Step]) -> Option<(&Op, &Op)> {
    match steps {
        [a, b, c, ..]
            if matches!(a.op, Op::BatchNorm { .. })
                && matches!(b.op, Op::Relu)
                && matches!(c.op, Op::Conv { .. }) =>
        {
            Some((&a.op, &c.op))
        }
        _ => None,
    }
}

/// Forward pass of BatchNorm `bn` (with `stats`), ReLU and convolution `conv` on `n` samples
/// in one kernel ([`bn_relu_conv3x3_forward`]: the same values as the three layers one after
/// the other, without their intermediate outputs).
fn fused_forward(
    bn: &Op,
    conv: &Op,
    params: &[Vec<f32>],
    stats: &[BnStats],
    n: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let (
        &Op::BatchNorm {
            c,
            gamma,
            beta,
            slot,
            ..
        },
        &Op::Conv { conv, weight, bias },
    ) = (bn, conv)
    else {
        unreachable!("checked by bn_relu_conv");
    };
    let s = &stats[slot];
    AFFINE.with(|affine| {
        let mut affine = affine.borrow_mut();
        affine.resize(2 * c, 0.0);
        let (scale, shift) = affine.split_at_mut(c);
        for ch in 0..c {
            let (g, b) = (params[gamma][ch], params[beta][ch]);
            (scale[ch], shift[ch]) = bn_affine(s.mean[ch], s.var[ch], g, b);
        }
        let (scale, shift) = (&*scale, &*shift);
        bn_relu_conv3x3_forward(
            &conv,
            view(conv.input_shape(n), x),
            (aview1(scale), aview1(shift)),
            view(conv.weight_shape(), &params[weight]),
            bias.map(|b| aview1(&params[b])),
            view_mut(conv.output_shape(n), y),
        );
    });
}

/// Forward pass of one layer on `n` samples, `x` → `y` (flat, `n` samples of the layer's input
/// and output, seen by the kernel as views of the layer's shape); a BatchNorm layer normalises
/// with `stats` (the batch's or the running statistics).
pub(crate) fn layer_forward(
    op: &Op,
    params: &[Vec<f32>],
    stats: &[BnStats],
    n: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let bias = |b: Option<usize>| b.map(|b| aview1(&params[b]));
    match *op {
        Op::Conv {
            conv,
            weight,
            bias: b,
        } => conv3x3_forward(
            &conv,
            view(conv.input_shape(n), x),
            view(conv.weight_shape(), &params[weight]),
            bias(b),
            view_mut(conv.output_shape(n), y),
        ),
        Op::Relu => relu_forward(aview1(x), aview_mut1(y)),
        Op::MaxPool { c, h, w } => {
            maxpool2_forward(view((n, c, h, w), x), view_mut((n, c, h / 2, w / 2), y))
        }
        Op::AvgPool { c, h, w } => {
            avgpool2_forward(view((n, c, h, w), x), view_mut((n, c, h / 2, w / 2), y))
        }
        Op::GlobalAvgPool { c, hw } => {
            global_avgpool_forward(view((n, c, hw), x), view_mut((n, c), y))
        }
        Op::Dense {
            d_in,
            d_out,
            weight,
            bias: b,
        } => dense_forward(
            view((n, d_in), x),
            view((d_out, d_in), &params[weight]),
            bias(b),
            view_mut((n, d_out), y),
        ),
        Op::BatchNorm {
            c,
            hw,
            gamma,
            beta,
            slot,
        } => {
            let s = &stats[slot];
            batchnorm_apply(
                view((n, c, hw), x),
                aview1(&s.mean),
                aview1(&s.var),
                aview1(&params[gamma]),
                aview1(&params[beta]),
                view_mut((n, c, hw), y),
            )
        }
    }
}
