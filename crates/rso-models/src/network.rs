//! The [`Network`] trait: a model instantiated on an engine, with its training, test and
//! validation sets resident on that engine. Optimizers drive any engine through it.
//!
//! Minibatches are slices of indices into the resident training set, so an engine can keep
//! data (and, for incremental RSO, cached activations) where it computes.

use crate::params::{ParamError, Params};
use crate::spec::ModelSpec;

/// How per-sample cross-entropies are combined into a minibatch loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over the batch (preset `seed`, SGD).
    Mean,
    /// Sum over the batch (preset `paper`).
    Sum,
}

impl Reduction {
    /// Combines a sum of per-sample losses over `n` samples.
    pub fn finish(self, sum: f64, n: usize) -> f64 {
        match self {
            Reduction::Mean => sum / n.max(1) as f64,
            Reduction::Sum => sum,
        }
    }
}

/// Which resident set to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitKind {
    /// The training set.
    Train,
    /// The test set.
    Test,
    /// The validation set ([`rso_data::Split::validation`]): samples held out of the training
    /// set (`rso train --val-split`) to choose settings on without looking at the test set.
    /// Never trained on, never used for BatchNorm calibration; empty (evaluating to 0
    /// samples) when the run holds none out.
    Validation,
}

/// Mean cross-entropy and accuracy over a set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Eval {
    /// Mean logit cross-entropy.
    pub loss: f64,
    /// Fraction of samples whose arg-max logit is the label, in `[0, 1]`.
    pub accuracy: f64,
    /// Number of samples evaluated.
    pub samples: usize,
}

/// Why an engine could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Parameters that do not fit the model.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// The requested device cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// Input data the engine cannot train on.
    #[error("data: {0}")]
    Data(String),
}

/// A model on an engine (pure-Rust CPU, libtorch CPU/CUDA) with its data resident.
///
/// Parameter arrays are addressed by their index in [`ModelSpec::params`], scalars by their
/// row-major index within the array.
pub trait Network {
    /// The model this network instantiates.
    fn spec(&self) -> &ModelSpec;

    /// Backend name as the CLI spells it (`cpu`, `tch`).
    fn backend(&self) -> &'static str;

    /// Device description (`cpu`, `cuda:0`, …).
    fn device(&self) -> String;

    /// Number of samples in the resident training set.
    fn train_len(&self) -> usize;

    /// Copies the parameters to the host.
    fn params(&self) -> Params;

    /// Replaces all parameters (layout checked against the spec).
    fn set_params(&mut self, params: &Params) -> Result<(), BackendError>;

    /// One scalar parameter.
    fn weight(&self, param: usize, index: usize) -> f32;

    /// Sets one scalar parameter. Backends with caches (incremental RSO) update them here.
    fn set_weight(&mut self, param: usize, index: usize, value: f32);

    /// Logits `[batch.len(), classes]` of the given training samples; BatchNorm uses the
    /// batch's statistics (training mode).
    fn logits(&mut self, batch: &[u32]) -> Vec<f32>;

    /// Cross-entropy of the given training samples, per-sample terms accumulated in f64;
    /// BatchNorm uses the batch's statistics.
    fn batch_loss(&mut self, batch: &[u32], reduction: Reduction) -> f64;

    /// The losses of `batch` at W, at W + Δe_j and at W − Δe_j for scalar `index` of array
    /// `param`, where the candidate values are `w + delta` and `w - delta` in f32. Leaves the
    /// weight at W. Backends override this with faster exact paths; the default is the
    /// reference path ([`reference_candidate_losses`]).
    fn candidate_losses(
        &mut self,
        batch: &[u32],
        param: usize,
        index: usize,
        delta: f32,
        reduction: Reduction,
    ) -> [f64; 3] {
        reference_candidate_losses(self, batch, param, index, delta, reduction)
    }

    /// Called by RSO before it visits the scalars of array `param` (a sweep), so incremental
    /// engines can cache that layer's input. The default does nothing.
    fn begin_sweep(&mut self, param: usize) {
        let _ = param;
    }

    /// Loss (with `reduction`) and its gradient with respect to every parameter array, in
    /// canonical order; BatchNorm uses the batch's statistics.
    fn loss_and_grad(&mut self, batch: &[u32], reduction: Reduction) -> (f64, Vec<Vec<f32>>);

    /// One plain SGD step `w ← w − lr·∇` on the mean loss of `batch`; returns that loss.
    fn sgd_step(&mut self, batch: &[u32], lr: f32) -> f64 {
        let (loss, grads) = self.loss_and_grad(batch, Reduction::Mean);
        let mut params = self.params();
        for (v, g) in params.values.iter_mut().zip(&grads) {
            for (w, d) in v.iter_mut().zip(g) {
                *w -= lr * d;
            }
        }
        self.set_params(&params).expect("layout unchanged");
        loss
    }

    /// Sets BatchNorm's running statistics from the given training samples (the paper's
    /// evaluation protocol). No-op for models without BatchNorm.
    fn calibrate_bn(&mut self, batch: &[u32]);

    /// Mean loss and accuracy over the first `limit` samples (all when `None`) of a resident
    /// set; BatchNorm uses its running statistics. A set of no samples (an empty validation
    /// set, `limit` 0) gives loss 0, accuracy 0 and 0 samples.
    fn evaluate(&mut self, split: SplitKind, limit: Option<usize>) -> Eval;
}

/// The reference RSO step: three full forward passes (at W, W+Δ, W−Δ). The oracle of every
/// faster path and the baseline of every speed claim; never remove it.
pub fn reference_candidate_losses<N: Network + ?Sized>(
    net: &mut N,
    batch: &[u32],
    param: usize,
    index: usize,
    delta: f32,
    reduction: Reduction,
) -> [f64; 3] {
    let w = net.weight(param, index);
    let base = net.batch_loss(batch, reduction);
    net.set_weight(param, index, w + delta);
    let plus = net.batch_loss(batch, reduction);
    net.set_weight(param, index, w - delta);
    let minus = net.batch_loss(batch, reduction);
    net.set_weight(param, index, w);
    [base, plus, minus]
}
