//! [`CpuNetwork`]: a [`ModelSpec`] instantiated on the pure-Rust kernels.
//!
//! A forward pass is a list of per-layer steps over a list of activation buffers: `acts[0]` is
//! the gathered input batch and `acts[i + 1]` the output of layer `i`, each sized for the
//! largest batch seen so far. [`CpuNetwork::forward_from`] runs the steps from any layer on,
//! given its input in `acts`. On one thread, a loss on a batch no larger than before allocates
//! nothing (a test checks it); split over threads it allocates only a few lists of slices.
//!
//! Steps that are big enough split the batch over rayon threads; every reduction over samples is
//! combined in sample order (or in fixed chunks of [`GRAD_CHUNK`] samples), so results are
//! bit-identical for any number of threads.

use crate::kernels::batchnorm::{
    backward_partials, batchnorm_apply, batchnorm_backward_input, combine_moments,
    combine_partials, plane_moments,
};
use crate::kernels::conv::{
    conv3x3_backward_input, conv3x3_backward_params, conv3x3_forward, Conv3x3,
};
use crate::kernels::dense::{dense_backward_input, dense_backward_params, dense_forward};
use crate::kernels::loss::{correct, cross_entropy, cross_entropy_backward};
use crate::kernels::pool::{
    avgpool2_backward, avgpool2_forward, global_avgpool_backward, global_avgpool_forward,
    maxpool2_backward, maxpool2_forward,
};
use crate::kernels::relu::{relu_backward, relu_forward};
use rayon::prelude::*;
use rso_data::{Dataset, Split};
use rso_models::{
    EngineError, Eval, Layer, ModelSpec, Network, ParamError, Params, Reduction, SplitKind,
};
use std::cell::RefCell;
use std::ops::Range;

/// Samples per evaluation forward pass.
const EVAL_CHUNK: usize = 500;

/// Samples per partial sum of convolution weight gradients; the partials are added in chunk
/// order, so this (not the thread count) fixes the summation order.
pub(crate) const GRAD_CHUNK: usize = 32;

/// Activation bytes per sample chunk of a forward segment: small enough to stay in L2.
const SEGMENT_CHUNK_BYTES: usize = 256 << 10;

/// Smallest step or forward segment (in multiply-add equivalents over the whole batch) worth
/// splitting over threads, about 0.1 ms of one core: below it a rayon dispatch (some 15 µs
/// from outside the pool) and a second core that is busy elsewhere cost more than they save
/// (measured on the 2-core machine: one-conv at B = 32 and 64 ran faster on one thread).
const PAR_MIN_WORK: usize = 4_000_000;

/// Whether BatchNorm uses the batch's statistics or the running ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Batch statistics (training, RSO, `calibrate_bn`).
    Train,
    /// Running statistics (`evaluate`).
    Eval,
}

/// One layer, with its shapes resolved and its parameter arrays located.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Conv {
        conv: Conv3x3,
        weight: usize,
        bias: Option<usize>,
    },
    Relu,
    MaxPool {
        c: usize,
        h: usize,
        w: usize,
    },
    AvgPool {
        c: usize,
        h: usize,
        w: usize,
    },
    BatchNorm {
        c: usize,
        hw: usize,
        gamma: usize,
        beta: usize,
        slot: usize,
    },
    GlobalAvgPool {
        c: usize,
        hw: usize,
    },
    Dense {
        d_in: usize,
        d_out: usize,
        weight: usize,
        bias: Option<usize>,
    },
}

/// A layer of the plan: its operation and per-sample sizes.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub(crate) op: Op,
    /// Input values per sample.
    pub(crate) in_len: usize,
    /// Output values per sample.
    pub(crate) out_len: usize,
    /// Rough forward cost per sample, in multiply-add equivalents (for the threading choice).
    pub(crate) work: usize,
}

/// Per-channel statistics of one BatchNorm layer.
#[derive(Clone, Debug)]
pub(crate) struct BnStats {
    pub(crate) mean: Vec<f64>,
    pub(crate) var: Vec<f64>,
}

impl BnStats {
    fn identity(c: usize) -> Self {
        BnStats {
            mean: vec![0.0; c],
            var: vec![1.0; c],
        }
    }
}

/// Scratch state reused across calls.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    /// Training-set indices whose images and labels are in `acts[0]` and `labels`.
    pub(crate) gathered: Option<Vec<u32>>,
    /// Labels of the samples in `acts[0]`.
    pub(crate) labels: Vec<u8>,
    /// `acts[0]`: input batch; `acts[i + 1]`: output of layer `i`.
    pub(crate) acts: Vec<Vec<f32>>,
    /// Statistics of the last training-mode forward, per BatchNorm layer.
    pub(crate) batch_stats: Vec<BnStats>,
    /// BatchNorm per-(sample, channel) partials.
    partials_f64: Vec<(f64, f64)>,
    /// Per-sample losses of the last forward.
    losses: Vec<f64>,
    /// Gradient of the current step's output, and of its input.
    dy: Vec<f32>,
    dx: Vec<f32>,
    /// Parameter gradients, canonical order.
    grads: Vec<Vec<f32>>,
    /// Convolution weight-gradient partials, one per [`GRAD_CHUNK`] samples.
    grad_partials: Vec<f32>,
    /// BatchNorm `(Σdy·x̂, Σdy)` of the current layer.
    bn_dgamma: Vec<f64>,
    bn_dbeta: Vec<f64>,
}

/// A model on the pure-Rust CPU engine, with its training and test sets in memory.
#[derive(Debug)]
pub struct CpuNetwork {
    pub(crate) spec: ModelSpec,
    pub(crate) plan: Vec<Step>,
    pub(crate) params: Params,
    /// Running statistics per BatchNorm layer (mean 0, variance 1 until calibrated).
    running: Vec<BnStats>,
    pub(crate) train: Dataset,
    test: Dataset,
    pub(crate) ws: Workspace,
    /// Steps with less work than this over the batch run on one thread ([`PAR_MIN_WORK`];
    /// tests lower it to split every step).
    pub(crate) par_min_work: usize,
    /// Caches of the incremental RSO path ([`crate::incremental`]).
    pub(crate) inc: crate::incremental::Incremental,
}

impl CpuNetwork {
    /// Instantiates `spec` with `params` and the resident `data`.
    ///
    /// Errors: parameters whose layout differs from `spec.params()`, or a spec whose layer shapes
    /// do not chain ([`EngineError::Params`]); images of another shape than `spec.input`, labels
    /// `>= spec.classes`, or a NaN/infinite pixel ([`EngineError::Data`], naming the set and the
    /// sample).
    pub fn new(spec: &ModelSpec, params: &Params, data: Split) -> Result<CpuNetwork, EngineError> {
        params.check_layout(spec, "cpu engine")?;
        let plan = build_plan(spec)?;
        check_set(spec, &data.train, "training")?;
        check_set(spec, &data.test, "test")?;
        let running: Vec<BnStats> = plan
            .iter()
            .filter_map(|s| match s.op {
                Op::BatchNorm { c, .. } => Some(BnStats::identity(c)),
                _ => None,
            })
            .collect();
        let ws = Workspace {
            acts: vec![Vec::new(); plan.len() + 1],
            batch_stats: running.clone(),
            grads: params.values.iter().map(|v| vec![0.0; v.len()]).collect(),
            ..Workspace::default()
        };
        Ok(CpuNetwork {
            spec: spec.clone(),
            plan,
            params: params.clone(),
            running,
            train: data.train,
            test: data.test,
            ws,
            par_min_work: PAR_MIN_WORK,
            inc: Default::default(),
        })
    }

    /// The first `n` samples of activation buffer `i` (`0`: input, `i + 1`: output of layer `i`).
    #[cfg_attr(not(test), allow(dead_code))] // for tests and the incremental RSO path
    pub(crate) fn activation(&self, i: usize, n: usize) -> &[f32] {
        let len = if i == 0 {
            self.plan[0].in_len
        } else {
            self.plan[i - 1].out_len
        };
        &self.ws.acts[i][..n * len]
    }

    /// Grows every activation buffer to hold `n` samples.
    pub(crate) fn reserve(&mut self, n: usize) {
        let lens = std::iter::once(self.plan[0].in_len).chain(self.plan.iter().map(|s| s.out_len));
        for (buf, len) in self.ws.acts.iter_mut().zip(lens) {
            if buf.len() < n * len {
                buf.resize(n * len, 0.0);
            }
        }
        if self.ws.losses.len() < n {
            self.ws.losses.resize(n, 0.0);
        }
    }

    /// Puts the training samples `batch` into `acts[0]` and their labels into `labels`, unless
    /// they are already there.
    pub(crate) fn load_batch(&mut self, batch: &[u32]) {
        if self.ws.gathered.as_deref() == Some(batch) {
            return;
        }
        self.reserve(batch.len());
        let len = self.plan[0].in_len;
        let input = &mut self.ws.acts[0];
        self.ws.labels.clear();
        for (dst, &i) in input.chunks_exact_mut(len).zip(batch) {
            dst.copy_from_slice(self.train.image(i as usize));
            self.ws.labels.push(self.train.labels[i as usize]);
        }
        let gathered = self.ws.gathered.get_or_insert_with(Vec::new);
        gathered.clear();
        gathered.extend_from_slice(batch);
    }

    /// Puts samples `range` of a resident set into `acts[0]` and `labels`.
    pub(crate) fn load_range(&mut self, split: SplitKind, range: Range<usize>) {
        self.ws.gathered = None;
        self.reserve(range.len());
        let set = match split {
            SplitKind::Train => &self.train,
            SplitKind::Test => &self.test,
        };
        let len = set.image_len();
        self.ws.acts[0][..range.len() * len]
            .copy_from_slice(&set.images[range.start * len..range.end * len]);
        self.ws.labels.clear();
        self.ws.labels.extend_from_slice(&set.labels[range]);
    }

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
        let x = &self.ws.acts[i][..n * c * hw];
        let split = n.saturating_mul(self.plan[i].work) >= self.par_min_work;
        let moments = grown(&mut self.ws.partials_f64, n * c, (0.0, 0.0));
        par_samples(split, n, moments, |r, m| {
            plane_moments(r.len(), c, hw, &x[r.start * c * hw..r.end * c * hw], m)
        });
        let stats = &mut self.ws.batch_stats[slot];
        combine_moments(n, c, hw, moments, &mut stats.mean, &mut stats.var);
    }

    /// Runs the per-sample layers `layers` on `n` samples (see [`CpuNetwork::forward_from`]).
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
        let logits = &self.ws.acts[self.plan.len()][..n * classes];
        let labels = &self.ws.labels[..n];
        let losses = &mut self.ws.losses[..n];
        let split = n.saturating_mul(20 * classes) >= self.par_min_work;
        par_samples(split, n, losses, |r, l| {
            cross_entropy(
                r.len(),
                classes,
                &logits[r.start * classes..r.end * classes],
                &labels[r],
                l,
            )
        });
        losses.iter().sum()
    }

    /// Forward and backward on `batch`; leaves the gradients in `ws.grads`, returns the loss.
    fn compute_grads(&mut self, batch: &[u32], reduction: Reduction) -> f64 {
        let n = batch.len();
        self.load_batch(batch);
        self.forward_from(0, n, Mode::Train, true);
        let sum = self.loss_sum(n);
        let classes = self.spec.classes;
        let scale = match reduction {
            Reduction::Mean => 1.0 / n.max(1) as f64,
            Reduction::Sum => 1.0,
        };
        let logits = &self.ws.acts[self.plan.len()][..n * classes];
        let dy = grown(&mut self.ws.dy, n * classes, 0.0);
        cross_entropy_backward(n, classes, logits, &self.ws.labels, scale, dy);
        for i in (0..self.plan.len()).rev() {
            self.backward_step(i, n);
            std::mem::swap(&mut self.ws.dy, &mut self.ws.dx);
        }
        reduction.finish(sum, n)
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
        let xs = |r: &Range<usize>| &x[r.start * in_len..r.end * in_len];
        let dys = |r: &Range<usize>| &dy[r.start * out_len..r.end * out_len];
        match step.op {
            Op::Conv { conv, weight, bias } => {
                conv_param_grads(
                    &conv,
                    n,
                    x,
                    dy,
                    split,
                    &mut ws.grad_partials,
                    &mut ws.grads,
                    weight,
                    bias,
                );
                if need_dx {
                    let w = &p[weight];
                    par_samples(split, n, dx, |r, dx| {
                        conv3x3_backward_input(&conv, r.len(), dys(&r), w, dx)
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
                dense_backward_params(n, d_in, d_out, x, dy, gw, gb);
                if need_dx {
                    let w = &p[weight];
                    par_samples(split, n, dx, |r, dx| {
                        dense_backward_input(r.len(), d_in, d_out, dys(&r), w, dx)
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
                let partials = grown(&mut ws.partials_f64, n * c, (0.0, 0.0));
                par_samples(split, n, partials, |r, s| {
                    backward_partials(r.len(), c, hw, xs(&r), dys(&r), &stats.mean, &stats.var, s)
                });
                let dgamma = grown(&mut ws.bn_dgamma, c, 0.0);
                let dbeta = grown(&mut ws.bn_dbeta, c, 0.0);
                combine_partials(n, c, partials, dgamma, dbeta);
                for (g, &d) in ws.grads[gamma].iter_mut().zip(dgamma.iter()) {
                    *g = d as f32;
                }
                for (g, &d) in ws.grads[beta].iter_mut().zip(dbeta.iter()) {
                    *g = d as f32;
                }
                if need_dx {
                    let (g, dgamma, dbeta) = (&p[gamma], &*dgamma, &*dbeta);
                    par_samples(split, n, dx, |r, dx| {
                        let (mean, var) = (&stats.mean, &stats.var);
                        batchnorm_backward_input(
                            r.len(),
                            n,
                            c,
                            hw,
                            xs(&r),
                            dys(&r),
                            mean,
                            var,
                            g,
                            dgamma,
                            dbeta,
                            dx,
                        )
                    });
                }
            }
            _ if !need_dx => {}
            Op::Relu => par_samples(split, n, dx, |r, dx| relu_backward(xs(&r), dys(&r), dx)),
            Op::MaxPool { c, h, w } => {
                par_samples(split, n, dx, |r, dx| {
                    maxpool2_backward(r.len() * c, h, w, xs(&r), dys(&r), dx)
                });
            }
            Op::AvgPool { c, h, w } => {
                par_samples(split, n, dx, |r, dx| {
                    avgpool2_backward(r.len() * c, h, w, dys(&r), dx)
                });
            }
            Op::GlobalAvgPool { c, hw } => {
                par_samples(split, n, dx, |r, dx| {
                    global_avgpool_backward(r.len() * c, hw, dys(&r), dx)
                });
            }
        }
    }

    fn set_of(&self, split: SplitKind) -> &Dataset {
        match split {
            SplitKind::Train => &self.train,
            SplitKind::Test => &self.test,
        }
    }
}

impl Network for CpuNetwork {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn backend(&self) -> &'static str {
        "cpu"
    }

    fn device(&self) -> String {
        "cpu".to_string()
    }

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    fn set_params(&mut self, params: &Params) -> Result<(), EngineError> {
        params.check_layout(&self.spec, "cpu engine: set_params")?;
        self.params.values.clone_from(&params.values);
        self.inc.invalidate();
        Ok(())
    }

    fn weight(&self, param: usize, index: usize) -> f32 {
        self.params.values[param][index]
    }

    fn set_weight(&mut self, param: usize, index: usize, value: f32) {
        let old = std::mem::replace(&mut self.params.values[param][index], value);
        crate::incremental::weight_changed(self, param, index, old);
    }

    fn logits(&mut self, batch: &[u32]) -> Vec<f32> {
        let n = batch.len();
        self.load_batch(batch);
        self.forward_from(0, n, Mode::Train, false);
        self.ws.acts[self.plan.len()][..n * self.spec.classes].to_vec()
    }

    fn batch_loss(&mut self, batch: &[u32], reduction: Reduction) -> f64 {
        let n = batch.len();
        self.load_batch(batch);
        self.forward_from(0, n, Mode::Train, false);
        reduction.finish(self.loss_sum(n), n)
    }

    fn loss_and_grad(&mut self, batch: &[u32], reduction: Reduction) -> (f64, Vec<Vec<f32>>) {
        let loss = self.compute_grads(batch, reduction);
        (loss, self.ws.grads.clone())
    }

    fn sgd_step(&mut self, batch: &[u32], lr: f32) -> f64 {
        let loss = self.compute_grads(batch, Reduction::Mean);
        for (v, g) in self.params.values.iter_mut().zip(&self.ws.grads) {
            for (w, d) in v.iter_mut().zip(g) {
                *w -= lr * d;
            }
        }
        self.inc.invalidate();
        loss
    }

    fn candidate_losses(
        &mut self,
        batch: &[u32],
        param: usize,
        index: usize,
        delta: f32,
        reduction: Reduction,
    ) -> [f64; 3] {
        crate::incremental::candidate_losses(self, batch, param, index, delta, reduction)
    }

    fn begin_sweep(&mut self, param: usize) {
        crate::incremental::begin_sweep(self, param);
    }

    fn calibrate_bn(&mut self, batch: &[u32]) {
        if self.running.is_empty() || batch.is_empty() {
            return;
        }
        self.load_batch(batch);
        self.forward_from(0, batch.len(), Mode::Train, false);
        self.running.clone_from(&self.ws.batch_stats);
    }

    fn evaluate(&mut self, split: SplitKind, limit: Option<usize>) -> Eval {
        let len = self.set_of(split).len();
        let total = limit.map_or(len, |l| l.min(len));
        let classes = self.spec.classes;
        let (mut loss, mut hits) = (0.0f64, 0usize);
        for start in (0..total).step_by(EVAL_CHUNK) {
            let m = EVAL_CHUNK.min(total - start);
            self.load_range(split, start..start + m);
            self.forward_from(0, m, Mode::Eval, false);
            self.loss_sum(m);
            for &l in &self.ws.losses[..m] {
                loss += l;
            }
            hits += correct(
                m,
                classes,
                &self.ws.acts[self.plan.len()][..m * classes],
                &self.ws.labels[..m],
            );
        }
        let denom = total.max(1) as f64;
        Eval {
            loss: loss / denom,
            accuracy: hits as f64 / denom,
            samples: total,
        }
    }
}

thread_local! {
    /// Per-thread buffer for the intermediate activations of one chunk of a forward segment.
    static CHUNK_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs the per-sample `steps` on `n` samples, `chunk` samples at a time through all steps:
/// `input` holds the samples' input to the first step, `outputs[k]` receives step `k`'s output
/// when `keep_all` (else only the last step's output is written there, the others live in a
/// per-thread chunk buffer).
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
            for (k, step) in steps.iter().enumerate() {
                let (prev, cur) = outputs.split_at_mut(k);
                let (before, after) = scratch.split_at_mut(offset(k));
                let x = if k == 0 {
                    &input[r.start * step.in_len..r.end * step.in_len]
                } else if keep_all {
                    &prev[k - 1].as_ref()[r.start * step.in_len..r.end * step.in_len]
                } else {
                    &before[offset(k - 1)..][..r.len() * step.in_len]
                };
                let y = if keep_all || k == last {
                    &mut cur[0].as_mut()[r.start * step.out_len..r.end * step.out_len]
                } else {
                    &mut after[..r.len() * step.out_len]
                };
                layer_forward(&step.op, params, stats, r.len(), x, y);
            }
        }
    });
}

/// Forward pass of one layer on `n` samples, `x` → `y`; a BatchNorm layer normalises with
/// `stats` (the batch's or the running statistics).
pub(crate) fn layer_forward(
    op: &Op,
    params: &[Vec<f32>],
    stats: &[BnStats],
    n: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let bias = |b: Option<usize>| b.map(|b| params[b].as_slice());
    match *op {
        Op::Conv {
            conv,
            weight,
            bias: b,
        } => conv3x3_forward(&conv, n, x, &params[weight], bias(b), y),
        Op::Relu => relu_forward(x, y),
        Op::MaxPool { c, h, w } => maxpool2_forward(n * c, h, w, x, y),
        Op::AvgPool { c, h, w } => avgpool2_forward(n * c, h, w, x, y),
        Op::GlobalAvgPool { c, hw } => global_avgpool_forward(n * c, hw, x, y),
        Op::Dense {
            d_in,
            d_out,
            weight,
            bias: b,
        } => dense_forward(n, d_in, d_out, x, &params[weight], bias(b), y),
        Op::BatchNorm {
            c,
            hw,
            gamma,
            beta,
            slot,
        } => {
            let s = &stats[slot];
            batchnorm_apply(
                n,
                c,
                hw,
                x,
                &s.mean,
                &s.var,
                &params[gamma],
                &params[beta],
                y,
            )
        }
    }
}

/// Runs `f(samples, out)` over parts of the batch `0..n`, where `out` is the part's share of
/// `out` (`out.len() / n` values per sample): one part per rayon thread when `split`, else one
/// part on the calling thread.
fn par_samples<T: Send>(
    split: bool,
    n: usize,
    out: &mut [T],
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    if n == 0 {
        return;
    }
    let per_sample = out.len() / n;
    let threads = if split {
        rayon::current_num_threads().min(n)
    } else {
        1
    };
    if threads <= 1 || per_sample == 0 {
        f(0..n, out);
        return;
    }
    let per_part = n.div_ceil(threads);
    out.par_chunks_mut(per_part * per_sample)
        .enumerate()
        .for_each(|(k, o)| {
            let start = k * per_part;
            f(start..start + o.len() / per_sample, o)
        });
}

/// The first `len` values of `buf`, growing it (with `fill`) if it is shorter.
fn grown<T: Clone>(buf: &mut Vec<T>, len: usize, fill: T) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, fill);
    }
    &mut buf[..len]
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

/// Convolution weight and bias gradients over `n` samples: partial sums over chunks of
/// [`GRAD_CHUNK`] samples (in parallel when `split`), added in chunk order.
#[allow(clippy::too_many_arguments)]
fn conv_param_grads(
    conv: &Conv3x3,
    n: usize,
    x: &[f32],
    dy: &[f32],
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
    let chunks = n.div_ceil(GRAD_CHUNK);
    if chunks <= 1 {
        conv3x3_backward_params(conv, n, x, dy, gw, gb);
        return;
    }
    let stride = wlen + blen;
    let partials = grown(partials, chunks * stride, 0.0);
    let (in_len, out_len) = (conv.in_len(), conv.out_len());
    let run = |k: usize, part: &mut [f32]| {
        let r = k * GRAD_CHUNK..((k + 1) * GRAD_CHUNK).min(n);
        let (pw, pb) = part.split_at_mut(wlen);
        let pb = if blen > 0 { Some(pb) } else { None };
        let xs = &x[r.start * in_len..r.end * in_len];
        let dys = &dy[r.start * out_len..r.end * out_len];
        conv3x3_backward_params(conv, r.len(), xs, dys, pw, pb);
    };
    if !split || rayon::current_num_threads() <= 1 {
        partials
            .chunks_mut(stride)
            .enumerate()
            .for_each(|(k, p)| run(k, p));
    } else {
        partials
            .par_chunks_mut(stride)
            .enumerate()
            .for_each(|(k, p)| run(k, p));
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

/// Resolves the layers of `spec` into steps, checking that their shapes chain.
fn build_plan(spec: &ModelSpec) -> Result<Vec<Step>, EngineError> {
    let bad = |reason: String| {
        EngineError::Params(ParamError::Mismatch {
            context: format!("model {}", spec.name),
            reason,
        })
    };
    let [mut c, mut h, mut w] = spec.input;
    let mut plan = Vec::with_capacity(spec.layers.len());
    let (mut param, mut slot) = (0, 0);
    for (i, layer) in spec.layers.iter().enumerate() {
        let in_len = c * h * w;
        let op = match layer {
            Layer::Conv {
                c_in, c_out, bias, ..
            } => {
                if *c_in != c {
                    return Err(bad(format!(
                        "layer {i}: conv expects {c_in} channels, gets {c}"
                    )));
                }
                let conv = Conv3x3 {
                    c_in: c,
                    c_out: *c_out,
                    h,
                    w,
                };
                let op = Op::Conv {
                    conv,
                    weight: param,
                    bias: bias.then_some(param + 1),
                };
                param += 1 + usize::from(*bias);
                c = *c_out;
                op
            }
            Layer::Relu => Op::Relu,
            Layer::MaxPool2 | Layer::AvgPool2 => {
                if h < 2 || w < 2 {
                    return Err(bad(format!("layer {i}: cannot pool a {h}×{w} plane")));
                }
                let op = if matches!(layer, Layer::MaxPool2) {
                    Op::MaxPool { c, h, w }
                } else {
                    Op::AvgPool { c, h, w }
                };
                (h, w) = (h / 2, w / 2);
                op
            }
            Layer::BatchNorm { channels, .. } => {
                if *channels != c {
                    return Err(bad(format!(
                        "layer {i}: batch norm over {channels} channels, gets {c}"
                    )));
                }
                let op = Op::BatchNorm {
                    c,
                    hw: h * w,
                    gamma: param,
                    beta: param + 1,
                    slot,
                };
                param += 2;
                slot += 1;
                op
            }
            Layer::GlobalAvgPool => {
                let op = Op::GlobalAvgPool { c, hw: h * w };
                (h, w) = (1, 1);
                op
            }
            Layer::Dense {
                d_in, d_out, bias, ..
            } => {
                if *d_in != in_len {
                    return Err(bad(format!(
                        "layer {i}: dense expects {d_in} inputs, gets {c}×{h}×{w}"
                    )));
                }
                let op = Op::Dense {
                    d_in: *d_in,
                    d_out: *d_out,
                    weight: param,
                    bias: bias.then_some(param + 1),
                };
                param += 1 + usize::from(*bias);
                (c, h, w) = (*d_out, 1, 1);
                op
            }
        };
        let out_len = c * h * w;
        if out_len == 0 {
            return Err(bad(format!("layer {i}: empty output")));
        }
        let work = match &op {
            Op::Conv { conv, .. } => conv.macs(),
            Op::Dense { d_in, d_out, .. } => d_in * d_out,
            Op::BatchNorm { .. } => 4 * in_len,
            _ => 2 * in_len,
        };
        plan.push(Step {
            op,
            in_len,
            out_len,
            work,
        });
    }
    if plan.is_empty() || c * h * w != spec.classes {
        return Err(bad(format!(
            "the last layer gives {c}×{h}×{w} values, not {} logits",
            spec.classes
        )));
    }
    Ok(plan)
}

/// Checks that a resident set fits the model: image shape, pixel count, finite pixels, labels.
fn check_set(spec: &ModelSpec, set: &Dataset, name: &str) -> Result<(), EngineError> {
    let shape = [set.channels, set.height, set.width];
    if shape != spec.input {
        return Err(EngineError::Data(format!(
            "{name} set: images are {}×{}×{}, model {} expects {}×{}×{}",
            shape[0], shape[1], shape[2], spec.name, spec.input[0], spec.input[1], spec.input[2]
        )));
    }
    if set.images.len() != set.len() * set.image_len() {
        return Err(EngineError::Data(format!(
            "{name} set: {} pixel values for {} images of {} values",
            set.images.len(),
            set.len(),
            set.image_len()
        )));
    }
    if set.len() > u32::MAX as usize + 1 {
        return Err(EngineError::Data(format!(
            "{name} set: {} samples, more than u32 indices address",
            set.len()
        )));
    }
    if let Some((sample, offset)) = set.first_non_finite() {
        let v = set.images[sample * set.image_len() + offset];
        return Err(EngineError::Data(format!(
            "{name} set: sample {sample} has a non-finite pixel ({v} at offset {offset})"
        )));
    }
    if let Some(i) = set
        .labels
        .iter()
        .position(|&l| usize::from(l) >= spec.classes)
    {
        return Err(EngineError::Data(format!(
            "{name} set: sample {i} has label {}, model {} has {} classes",
            set.labels[i], spec.name, spec.classes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
