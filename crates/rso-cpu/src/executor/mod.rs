//! [`Executor`]: a [`ModelSpec`] laid out as a [plan] of per-layer steps on the pure-Rust
//! kernels, with its parameters, its resident training, test and validation sets and its
//! workspace; it runs
//! forward ([`forward`]) and backward ([`backward`]) passes. The incremental RSO path's caches
//! live beside it in [`CpuNetwork`](crate::CpuNetwork), not in it.
//!
//! A forward pass is a list of per-layer steps over a list of activation buffers: `acts[0]` is
//! the gathered input batch and `acts[i + 1]` the output of layer `i`, each sized for the
//! largest batch seen so far. [`Executor::forward_from`] runs the steps from any layer on,
//! given its input in `acts`. On one thread, a loss on a batch no larger than before allocates
//! nothing (a test checks it); split over threads it allocates only a few lists of slices.
//!
//! Steps that are big enough split the batch over rayon threads; every reduction over samples is
//! combined in sample order (or in fixed chunks of [`GRAD_CHUNK`] samples), so results are
//! bit-identical for any number of threads.

mod backward;
mod forward;
pub(crate) mod plan;

pub(crate) use forward::layer_forward;
pub(crate) use plan::{Op, Step};

use crate::kernels::loss::correct;
use ndarray::{aview1, ArrayView, ArrayViewMut, Axis, Dimension, Slice, StrideShape};
use plan::{build_plan, check_set};
use rayon::prelude::*;
use rso_data::{Dataset, Split};
use rso_models::{BackendError, Eval, ModelSpec, Params, Reduction, SplitKind};
use std::ops::Range;

/// Samples per evaluation forward pass.
pub(crate) const EVAL_CHUNK: usize = 500;

/// Samples per partial sum of convolution weight gradients; the partials are added in chunk
/// order, so this (not the thread count) fixes the summation order.
pub(crate) const GRAD_CHUNK: usize = 32;

/// Activation bytes per sample chunk of a forward segment: small enough to stay in L2.
const SEGMENT_CHUNK_BYTES: usize = 256 << 10;

/// Smallest step or forward segment (in multiply-add equivalents over the whole batch) worth
/// splitting over threads, about 0.1 ms of one core: below it a rayon dispatch (some 15 µs
/// from outside the pool) and a second core that is busy elsewhere cost more than they save
/// (measured on the 2-core machine: one-conv at B = 32 and 64 ran faster on one thread).
pub(crate) const PAR_MIN_WORK: usize = 4_000_000;

/// Whether BatchNorm uses the batch's statistics or the running ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Batch statistics (training, RSO, `calibrate_bn`).
    Train,
    /// Running statistics (`evaluate`).
    Eval,
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

/// The model's plan, parameters, data and workspace (see the module docs).
#[derive(Debug)]
pub(crate) struct Executor {
    pub(crate) spec: ModelSpec,
    pub(crate) plan: Vec<Step>,
    pub(crate) params: Params,
    /// Running statistics per BatchNorm layer (mean 0, variance 1 until calibrated).
    running: Vec<BnStats>,
    pub(crate) train: Dataset,
    pub(crate) test: Dataset,
    /// Held out of training, evaluated only ([`SplitKind::Validation`]); often empty.
    pub(crate) validation: Dataset,
    pub(crate) ws: Workspace,
    /// Steps with less work than this over the batch run on one thread ([`PAR_MIN_WORK`];
    /// tests lower it to split every step).
    pub(crate) par_min_work: usize,
}

impl Executor {
    /// Lays out `spec` with `params` and the resident `data` (see [`CpuNetwork::new`](crate::CpuNetwork::new)).
    pub(crate) fn new(
        spec: &ModelSpec,
        params: &Params,
        data: Split,
    ) -> Result<Executor, BackendError> {
        params.check_layout(spec, "cpu backend")?;
        let plan = build_plan(spec)?;
        check_set(spec, &data.train, "training")?;
        check_set(spec, &data.test, "test")?;
        // An empty validation set (none held out) may have any header.
        if !data.validation.is_empty() {
            check_set(spec, &data.validation, "validation")?;
        }
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
        Ok(Executor {
            spec: spec.clone(),
            plan,
            params: params.clone(),
            running,
            train: data.train,
            test: data.test,
            validation: data.validation,
            ws,
            par_min_work: PAR_MIN_WORK,
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
            SplitKind::Validation => &self.validation,
        };
        let len = set.image_len();
        self.ws.acts[0][..range.len() * len]
            .copy_from_slice(&set.images[range.start * len..range.end * len]);
        self.ws.labels.clear();
        self.ws.labels.extend_from_slice(&set.labels[range]);
    }

    fn set_of(&self, split: SplitKind) -> &Dataset {
        match split {
            SplitKind::Train => &self.train,
            SplitKind::Test => &self.test,
            SplitKind::Validation => &self.validation,
        }
    }

    /// The logits of `batch` (batch statistics), `[n][classes]`.
    pub(crate) fn logits(&mut self, batch: &[u32]) -> Vec<f32> {
        let n = batch.len();
        self.load_batch(batch);
        self.forward_from(0, n, Mode::Train, false);
        self.ws.acts[self.plan.len()][..n * self.spec.classes].to_vec()
    }

    /// The loss of `batch` (batch statistics).
    pub(crate) fn batch_loss(&mut self, batch: &[u32], reduction: Reduction) -> f64 {
        let n = batch.len();
        self.load_batch(batch);
        self.forward_from(0, n, Mode::Train, false);
        reduction.finish(self.loss_sum(n), n)
    }

    /// Sets every BatchNorm's running statistics to `batch`'s statistics.
    pub(crate) fn calibrate_bn(&mut self, batch: &[u32]) {
        if self.running.is_empty() || batch.is_empty() {
            return;
        }
        self.load_batch(batch);
        self.forward_from(0, batch.len(), Mode::Train, false);
        self.running.clone_from(&self.ws.batch_stats);
    }

    /// Loss and accuracy on the first `limit` samples of a resident set (running statistics).
    pub(crate) fn evaluate(&mut self, split: SplitKind, limit: Option<usize>) -> Eval {
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
            let logits = view((m, classes), &self.ws.acts[self.plan.len()]);
            hits += correct(logits, aview1(&self.ws.labels[..m]));
        }
        let denom = total.max(1) as f64;
        Eval {
            loss: loss / denom,
            accuracy: hits as f64 / denom,
            samples: total,
        }
    }
}

/// Runs `f(samples, out)` over parts of the batch `0..n` that `out` holds along its first axis,
/// where `out` is the part's share of `out` (its axis chunk): one part per rayon thread when
/// `split`, else one part on the calling thread.
fn par_samples<T: Send + Sync, D: Dimension>(
    split: bool,
    mut out: ArrayViewMut<T, D>,
    f: impl Fn(Range<usize>, ArrayViewMut<T, D>) + Sync,
) {
    let n = out.len_of(Axis(0));
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
    out.axis_chunks_iter_mut(Axis(0), per_part)
        .into_par_iter()
        .enumerate()
        .for_each(|(k, o)| {
            let start = k * per_part;
            f(start..start + o.len_of(Axis(0)), o)
        });
}

/// The leading values of a flat buffer as a view of `shape` in standard layout (no copy): the
/// activation and parameter buffers are flat (sized for the largest batch, reused by layers of
/// different shapes), and each kernel call sees them in its layer's shape.
///
/// # Panics
/// If `data` is shorter than `shape`.
#[track_caller]
#[inline(always)]
pub(crate) fn view<T, D: Dimension>(
    shape: impl Into<StrideShape<D>>,
    data: &[T],
) -> ArrayView<'_, T, D> {
    match ArrayView::from_shape(shape, data) {
        Ok(v) => v,
        Err(e) => panic!("a buffer of {} values as a view: {e}", data.len()),
    }
}

/// [`view`] of a mutable buffer.
#[track_caller]
#[inline(always)]
pub(crate) fn view_mut<T, D: Dimension>(
    shape: impl Into<StrideShape<D>>,
    data: &mut [T],
) -> ArrayViewMut<'_, T, D> {
    let len = data.len();
    match ArrayViewMut::from_shape(shape, data) {
        Ok(v) => v,
        Err(e) => panic!("a buffer of {len} values as a view: {e}"),
    }
}

/// Samples `r` (along the first axis) of a batch view.
#[inline(always)]
pub(crate) fn samples<'a, T, D: Dimension>(
    v: &ArrayView<'a, T, D>,
    r: &Range<usize>,
) -> ArrayView<'a, T, D> {
    v.clone().slice_axis_move(Axis(0), Slice::from(r.clone()))
}

/// The first `len` values of `buf`, growing it (with `fill`) if it is shorter.
pub(crate) fn grown<T: Clone>(buf: &mut Vec<T>, len: usize, fill: T) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, fill);
    }
    &mut buf[..len]
}
