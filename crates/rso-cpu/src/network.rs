//! [`CpuNetwork`]: a [`ModelSpec`] on the pure-Rust kernels — the [`Executor`] (plan,
//! parameters, resident data, workspace; forward and backward passes) and the caches of the
//! incremental RSO path ([`Incremental`]), side by side.

use crate::executor::Executor;
use crate::incremental::Incremental;
use rso_data::Split;
use rso_models::network::reference_candidate_losses;
use rso_models::{BackendError, Eval, ModelSpec, Network, Params, Reduction, SplitKind};

/// A model on the pure-Rust CPU backend, with its training and test sets in memory.
#[derive(Debug)]
pub struct CpuNetwork {
    pub(crate) exec: Executor,
    /// Caches of the incremental RSO path ([`crate::incremental`]).
    pub(crate) inc: Incremental,
}

impl CpuNetwork {
    /// Instantiates `spec` with `params` and the resident `data` (training, test and validation
    /// sets).
    ///
    /// # Errors
    /// Parameters whose layout differs from `spec.params()`, or a spec whose layer shapes do
    /// not chain ([`BackendError::Params`]); images of another shape than `spec.input`, labels
    /// `>= spec.classes`, or a NaN/infinite pixel ([`BackendError::Data`], naming the set and
    /// the sample). An empty validation set is not checked (its header may be anything).
    pub fn new(spec: &ModelSpec, params: &Params, data: Split) -> Result<CpuNetwork, BackendError> {
        Ok(CpuNetwork {
            exec: Executor::new(spec, params, data)?,
            inc: Incremental::default(),
        })
    }
}

impl Network for CpuNetwork {
    fn spec(&self) -> &ModelSpec {
        &self.exec.spec
    }

    fn backend(&self) -> &'static str {
        "cpu"
    }

    fn device(&self) -> String {
        "cpu".to_string()
    }

    fn train_len(&self) -> usize {
        self.exec.train.len()
    }

    fn params(&self) -> Params {
        self.exec.params.clone()
    }

    fn set_params(&mut self, params: &Params) -> Result<(), BackendError> {
        params.check_layout(&self.exec.spec, "cpu backend: set_params")?;
        self.exec.params.values.clone_from(&params.values);
        self.inc.invalidate();
        Ok(())
    }

    fn weight(&self, param: usize, index: usize) -> f32 {
        self.exec.params.values[param][index]
    }

    fn set_weight(&mut self, param: usize, index: usize, value: f32) {
        let old = std::mem::replace(&mut self.exec.params.values[param][index], value);
        self.inc.weight_changed(&self.exec, param, index, old);
    }

    fn logits(&mut self, batch: &[u32]) -> Vec<f32> {
        self.exec.logits(batch)
    }

    fn batch_loss(&mut self, batch: &[u32], reduction: Reduction) -> f64 {
        self.exec.batch_loss(batch, reduction)
    }

    fn loss_and_grad(&mut self, batch: &[u32], reduction: Reduction) -> (f64, Vec<Vec<f32>>) {
        let loss = self.exec.compute_grads(batch, reduction);
        (loss, self.exec.grads().to_vec())
    }

    fn sgd_step(&mut self, batch: &[u32], lr: f32) -> f64 {
        let loss = self.exec.sgd_step(batch, lr);
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
        let visit = crate::incremental::Visit {
            batch,
            param,
            index,
            delta,
            reduction,
        };
        match self.inc.candidate_losses(&mut self.exec, visit) {
            Some(losses) => losses,
            None => reference_candidate_losses(self, batch, param, index, delta, reduction),
        }
    }

    fn begin_sweep(&mut self, param: usize) {
        self.inc.begin_sweep(&self.exec, param);
    }

    fn calibrate_bn(&mut self, batch: &[u32]) {
        self.exec.calibrate_bn(batch);
    }

    fn evaluate(&mut self, split: SplitKind, limit: Option<usize>) -> Eval {
        self.exec.evaluate(split, limit)
    }
}

#[cfg(test)]
mod tests;
