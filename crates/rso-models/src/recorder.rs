//! [`Recorder`]: a [`Network`] that delegates to another and records every loss an optimizer
//! asks for, so tests can compare what two candidate paths (or two engines) computed visit by
//! visit.

use crate::{EngineError, Eval, ModelSpec, Network, Params, Reduction, SplitKind};

/// Delegates every call to `net` and records the losses RSO asks for: [`Network::batch_loss`]
/// results (the reference path makes three per visit, in the order W, W+Δ, W−Δ) and
/// [`Network::candidate_losses`] results (one triple per visit).
#[derive(Debug)]
pub struct Recorder<N> {
    /// The network that computes.
    pub net: N,
    /// Every `batch_loss` result, in call order.
    pub batch_losses: Vec<f64>,
    /// Every `candidate_losses` result, in call order.
    pub visits: Vec<[f64; 3]>,
}

impl<N: Network> Recorder<N> {
    /// Wraps `net` with empty records.
    pub fn new(net: N) -> Recorder<N> {
        Recorder {
            net,
            batch_losses: Vec::new(),
            visits: Vec::new(),
        }
    }

    /// The reference path's visits: `batch_losses` grouped in threes.
    pub fn reference_visits(&self) -> Vec<[f64; 3]> {
        self.batch_losses
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect()
    }
}

impl<N: Network> Network for Recorder<N> {
    fn spec(&self) -> &ModelSpec {
        self.net.spec()
    }
    fn backend(&self) -> &'static str {
        self.net.backend()
    }
    fn device(&self) -> String {
        self.net.device()
    }
    fn train_len(&self) -> usize {
        self.net.train_len()
    }
    fn params(&self) -> Params {
        self.net.params()
    }
    fn set_params(&mut self, params: &Params) -> Result<(), EngineError> {
        self.net.set_params(params)
    }
    fn weight(&self, param: usize, index: usize) -> f32 {
        self.net.weight(param, index)
    }
    fn set_weight(&mut self, param: usize, index: usize, value: f32) {
        self.net.set_weight(param, index, value)
    }
    fn logits(&mut self, batch: &[u32]) -> Vec<f32> {
        self.net.logits(batch)
    }
    fn batch_loss(&mut self, batch: &[u32], reduction: Reduction) -> f64 {
        let l = self.net.batch_loss(batch, reduction);
        self.batch_losses.push(l);
        l
    }
    fn candidate_losses(
        &mut self,
        batch: &[u32],
        param: usize,
        index: usize,
        delta: f32,
        reduction: Reduction,
    ) -> [f64; 3] {
        let l = self
            .net
            .candidate_losses(batch, param, index, delta, reduction);
        self.visits.push(l);
        l
    }
    fn begin_sweep(&mut self, param: usize) {
        self.net.begin_sweep(param)
    }
    fn loss_and_grad(&mut self, batch: &[u32], reduction: Reduction) -> (f64, Vec<Vec<f32>>) {
        self.net.loss_and_grad(batch, reduction)
    }
    fn sgd_step(&mut self, batch: &[u32], lr: f32) -> f64 {
        self.net.sgd_step(batch, lr)
    }
    fn calibrate_bn(&mut self, batch: &[u32]) {
        self.net.calibrate_bn(batch)
    }
    fn evaluate(&mut self, split: SplitKind, limit: Option<usize>) -> Eval {
        self.net.evaluate(split, limit)
    }
}
