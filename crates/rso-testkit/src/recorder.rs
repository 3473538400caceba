//! Test aids shared by the engines' candidate-path tests: [`Recorder`], a [`Network`] that
//! delegates to another and records every loss an optimizer asks for, so tests can compare what
//! two candidate paths (or two engines) computed visit by visit; and [`random_visits`], a random
//! sequence of RSO visits with RSO's bookkeeping around them.

use crate::{random_batch_up_to, Tol};
use rso_models::network::reference_candidate_losses;
use rso_models::{BackendError, Eval, ModelSpec, Network, Params, Reduction, SplitKind};

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
    /// Samples passed to `batch_loss`, summed over its calls (one forward pass each).
    pub batch_loss_samples: u64,
    /// Minibatch sizes passed to `candidate_losses`, summed over its calls.
    pub candidate_samples: u64,
    /// Whether every `candidate_losses` result is checked against the reference path
    /// ([`Recorder::checked`]).
    pub check: bool,
}

impl<N: Network> Recorder<N> {
    /// Wraps `net` with empty records.
    pub fn new(net: N) -> Recorder<N> {
        Recorder {
            net,
            batch_losses: Vec::new(),
            visits: Vec::new(),
            batch_loss_samples: 0,
            candidate_samples: 0,
            check: false,
        }
    }

    /// [`Recorder::new`] that also checks every `candidate_losses` result against the
    /// reference path on the same network (after it, so the engine's bookkeeping of the
    /// reference's `set_weight` calls is exercised too).
    ///
    /// # Panics
    /// (In `candidate_losses`) when a loss is not within [`Tol::losses`].
    pub fn checked(net: N) -> Recorder<N> {
        Recorder {
            check: true,
            ..Recorder::new(net)
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
    fn set_params(&mut self, params: &Params) -> Result<(), BackendError> {
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
        self.batch_loss_samples += batch.len() as u64;
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
        if self.check {
            let reference =
                reference_candidate_losses(&mut self.net, batch, param, index, delta, reduction);
            let name = &self.net.spec().params()[param].name;
            Tol::losses(batch.len(), reduction).assert_close(
                &format!("visit {} ({name}[{index}])", self.visits.len()),
                &l,
                &reference,
            );
        }
        self.visits.push(l);
        self.candidate_samples += batch.len() as u64;
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

/// Drives `net` through `steps` random RSO visits with RSO's bookkeeping around them, for tests
/// of candidate paths: stretches of sweeps in RSO's order (`begin_sweep`, consecutive scalars,
/// sometimes the `paper` preset's weight decay before each visit, the argmin accepted with ties
/// keeping W, batches from a small pool so that they recur, now and then a change of another
/// array mid-sweep), lone visits of random scalars on random batches, and `set_params` with a
/// few values moved. `visit(net, batch, param, index, delta)` computes (and checks) the three
/// losses and must leave the weight as it was. Everything random flows from `seed`.
///
/// # Panics
/// If `net` has no training samples or an array of no scalars, or refuses its own parameters
/// in `set_params`; or as `visit` panics.
pub fn random_visits<N: Network + ?Sized>(
    net: &mut N,
    seed: u64,
    steps: usize,
    mut visit: impl FnMut(&mut N, &[u32], usize, usize, f32) -> [f64; 3],
) {
    use rand::Rng;
    let mut rng = crate::rng(seed ^ 0x9e37);
    let n = net.train_len();
    let pool: Vec<Vec<u32>> = (0..3)
        .map(|_| random_batch_up_to(&mut rng, n, 24))
        .collect();
    let lens: Vec<usize> = net.spec().params().iter().map(|p| p.len()).collect();
    let mut done = 0;
    while done < steps {
        match rng.random_range(0..10) {
            0..=6 => {
                let param = rng.random_range(0..lens.len());
                net.begin_sweep(param);
                let start = rng.random_range(0..lens[param]);
                let decay = rng.random_bool(0.3);
                for index in start..(start + rng.random_range(1..=12)).min(lens[param]) {
                    let batch = if rng.random_bool(0.5) {
                        pool[rng.random_range(0..pool.len())].clone()
                    } else {
                        random_batch_up_to(&mut rng, n, 24)
                    };
                    let delta = rng.random_range(-0.5f32..0.5);
                    if rng.random_bool(0.1) {
                        // A change elsewhere mid-sweep (earlier layers feed the caches).
                        let other = rng.random_range(0..lens.len());
                        let at = rng.random_range(0..lens[other]);
                        let v = net.weight(other, at);
                        net.set_weight(other, at, v + rng.random_range(-0.2f32..0.2));
                    }
                    let mut w = net.weight(param, index);
                    if decay {
                        w *= 1.0 - 1e-4;
                        net.set_weight(param, index, w);
                    }
                    let [base, plus, minus] = visit(net, &batch, param, index, delta);
                    // RSO's choice (ties keep W; NaN is never accepted).
                    if plus < base && plus <= minus {
                        net.set_weight(param, index, w + delta);
                    } else if minus < base {
                        net.set_weight(param, index, w - delta);
                    }
                    done += 1;
                }
            }
            7 | 8 => {
                let param = rng.random_range(0..lens.len());
                let index = rng.random_range(0..lens[param]);
                let batch = random_batch_up_to(&mut rng, n, n);
                let delta = rng.random_range(-1.0f32..1.0);
                visit(net, &batch, param, index, delta);
                if rng.random_bool(0.5) {
                    let w = net.weight(param, index);
                    net.set_weight(param, index, w + delta);
                }
                done += 1;
            }
            _ => {
                let mut p = net.params();
                for v in p.values.iter_mut() {
                    for x in v.iter_mut() {
                        if rng.random_bool(0.05) {
                            *x += rng.random_range(-0.1f32..0.1);
                        }
                    }
                }
                net.set_params(&p).expect("the layout is the network's own");
            }
        }
    }
}
