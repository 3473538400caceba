//! Coordinate finite differences: randomized block-coordinate descent on central differences,
//! the estimator DeepZero (Chen et al. 2024) builds on.
//!
//! A round visits every parameter array in RSO's order for the preset ([`crate::Rso::schedule`];
//! so the engines' incremental paths apply, as they do to RSO's sweeps), and each array's
//! scalars in a random order ([`crate::forward_only::step_rng`]) cut into blocks of k. Per
//! block, on one minibatch, for each of its coordinates j: the losses at w_j + μ and w_j − μ
//! ([`Network::candidate_losses`], which also gives the loss at W) and
//! g_j = (L₊ − L₋)/((w_j + μ) − (w_j − μ)) (the f32 candidates' actual distance); then
//! w_j ← w_j − lr·g_j for the whole block at once. Cost: 3·|batch| forward passes per
//! coordinate, as for an RSO visit, so a round is exactly one RSO round's forward passes.

use crate::forward_only::{
    batch_settings, check_batch_size, check_positive, check_step, skip_visit_draw, step_rng,
};
use crate::rso::schedule;
use crate::{
    shuffled, BatchPolicy, Batches, OptimError, Optimizer, RoundStats, RsoConfig, RsoEval,
    SweepStep,
};
use rso_models::network::reference_candidate_losses;
use rso_models::{ModelSpec, Network, Preset, Reduction};

/// The draw of [`step_rng`] that shuffles an array's coordinates (its step coordinate is the
/// array's position in the round).
const SHUFFLE: usize = usize::MAX;

/// CFD settings.
#[derive(Clone, Debug, PartialEq)]
pub struct CfdConfig {
    /// The preset whose RSO visiting order the arrays follow.
    pub preset: Preset,
    /// Coordinates per block (one minibatch, one simultaneous update), k ≥ 1.
    pub block: usize,
    /// Finite-difference step μ.
    pub mu: f32,
    /// Learning rate.
    pub lr: f32,
    /// Minibatch size.
    pub batch_size: usize,
    /// Minibatch source (as RSO's; the sequential policy reshuffles where RSO's does).
    pub batch_policy: BatchPolicy,
    /// Loss reduction over the minibatch.
    pub reduction: Reduction,
    /// Candidate-loss implementation (as RSO's `--rso-eval`).
    pub eval: RsoEval,
    /// Seed of every random draw.
    pub seed: u64,
}

/// Coordinate finite differences (see the module docs).
#[derive(Clone, Debug)]
pub struct Cfd {
    config: CfdConfig,
    schedule: Vec<SweepStep>,
}

impl Cfd {
    /// A CFD optimizer for `spec`.
    ///
    /// # Errors
    /// [`OptimError::Config`] on a zero batch size or block, a non-positive or non-finite μ, or
    /// a negative or non-finite learning rate.
    pub fn new(spec: &ModelSpec, config: CfdConfig) -> Result<Cfd, OptimError> {
        check_batch_size(config.batch_size)?;
        if config.block == 0 {
            return Err(OptimError::Config("--cfd-block must be at least 1".into()));
        }
        check_step("--cfd-mu", f64::from(config.mu))?;
        check_positive("--lr", f64::from(config.lr), true)?;
        let order = RsoConfig::preset(config.preset, 1, config.batch_size, config.seed);
        Ok(Cfd {
            schedule: schedule(spec, &order),
            config,
        })
    }

    /// The block's losses at W and its coordinates' central differences (`None` where not
    /// finite).
    fn differences(
        &self,
        net: &mut dyn Network,
        batch: &[u32],
        param: usize,
        block: &[u32],
        g: &mut Vec<Option<f32>>,
    ) -> f64 {
        let c = &self.config;
        g.clear();
        let mut at_w = 0.0;
        for &j in block {
            let j = j as usize;
            let w = net.weight(param, j);
            let losses = match c.eval {
                RsoEval::Reference => {
                    reference_candidate_losses(net, batch, param, j, c.mu, c.reduction)
                }
                RsoEval::Incremental => net.candidate_losses(batch, param, j, c.mu, c.reduction),
            };
            at_w = losses[0];
            let h = f64::from(w + c.mu) - f64::from(w - c.mu);
            let d = (losses[1] - losses[2]) / h;
            g.push(d.is_finite().then_some(d as f32));
        }
        at_w
    }
}

impl Optimizer for Cfd {
    fn name(&self) -> &'static str {
        "cfd"
    }

    fn resolved_settings(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let mut v = vec![
            ("preset".to_string(), c.preset.name().to_string()),
            ("cfd_block".into(), c.block.to_string()),
            ("cfd_mu".into(), c.mu.to_string()),
            ("lr".into(), c.lr.to_string()),
            ("eval".into(), format!("{:?}", c.eval).to_lowercase()),
        ];
        v.extend(batch_settings(
            c.batch_size,
            c.batch_policy,
            c.reduction,
            c.seed,
        ));
        v
    }

    fn steps_per_round(&self, net: &dyn Network) -> usize {
        net.spec().param_count()
    }

    fn run_round(
        &mut self,
        net: &mut dyn Network,
        round: usize,
        budget: Option<u64>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<RoundStats, OptimError> {
        let c = self.config.clone();
        // The sequential policy's first reshuffle is the first sweep's (as in RSO), not this.
        let mut rng = crate::round_rng(c.seed, round);
        if net.train_len() == 0 {
            return Err(OptimError::Config("the training set is empty".into()));
        }
        let mut batches = Batches::new(c.batch_policy, c.batch_size, net.train_len(), &mut rng);
        let lens: Vec<usize> = net.spec().params().iter().map(|p| p.len()).collect();
        let mut stats = RoundStats::default();
        let (mut loss_sum, mut blocks) = (0.0, 0usize);
        let mut group = usize::MAX;
        let mut g = Vec::with_capacity(c.block);
        'sweeps: for (s, sweep) in self.schedule.iter().enumerate() {
            if sweep.group != group {
                group = sweep.group;
                batches.start_group(&mut rng);
            }
            net.begin_sweep(sweep.param);
            let order = shuffled(lens[sweep.param], &mut step_rng(c.seed, round, s, SHUFFLE));
            for block in order.chunks(c.block) {
                let batch = batches.next(&mut rng);
                let cost = (3 * batch.len() * block.len()) as u64;
                if !stats.fits(cost, budget) {
                    break 'sweeps;
                }
                stats.forward_equivalents += cost;
                skip_visit_draw(&mut rng);
                let at_w = self.differences(net, batch, sweep.param, block, &mut g);
                if !at_w.is_finite() {
                    return Err(OptimError::StepDiverged {
                        round,
                        step: stats.steps,
                        loss: at_w,
                    });
                }
                loss_sum += at_w;
                blocks += 1;
                for (&j, g) in block.iter().zip(&g) {
                    let w = net.weight(sweep.param, j as usize);
                    let new = g.map_or(w, |g| w - c.lr * g);
                    if new.is_finite() && new != w {
                        net.set_weight(sweep.param, j as usize, new);
                        stats.accepted += 1;
                    }
                }
                stats.steps += block.len();
                if blocks.is_multiple_of(64) {
                    progress(stats.steps);
                }
            }
        }
        stats.mean_batch_loss = loss_sum / blocks.max(1) as f64;
        progress(stats.steps);
        Ok(stats)
    }
}
