//! SPSA with MeZO's Gaussian directions: two-point random-direction gradient estimates.
//!
//! Per step, for each of q directions z drawn over all parameters ([`crate::forward_only::step_rng`],
//! regenerated whenever needed, never stored): the minibatch losses L₊ = L(W + εz) and
//! L₋ = L(W − εz), and g = (L₊ − L₋)/(2ε); then W ← W − lr·(1/q)·Σ g·z. Sources: Spall 1992
//! (±1 directions, `--spsa-dist rademacher`), Malladi et al. 2023, MeZO (Gaussian directions,
//! regenerated from a per-step seed). Cost: 2·q·|batch| forward passes per step.

use crate::forward_only::{
    add_direction, all_finite, batch_settings, check_batch_size, check_positive, check_step,
    round_source, round_steps, skip_visit_draw, step_rng, Direction,
};
use crate::{BatchPolicy, OptimError, Optimizer, RoundStats};
use rso_models::{Network, Reduction};

/// SPSA settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SpsaConfig {
    /// Perturbation size ε (MeZO: 1e-3).
    pub eps: f32,
    /// Learning rate.
    pub lr: f32,
    /// Directions averaged per step, q ≥ 1.
    pub directions: usize,
    /// Distribution of the directions' entries.
    pub dist: Direction,
    /// Minibatch size.
    pub batch_size: usize,
    /// Minibatch source (as RSO's).
    pub batch_policy: BatchPolicy,
    /// Loss reduction over the minibatch.
    pub reduction: Reduction,
    /// Seed of every random draw.
    pub seed: u64,
}

/// Two-point random-direction descent (see the module docs).
#[derive(Clone, Debug)]
pub struct Spsa {
    config: SpsaConfig,
}

impl Spsa {
    /// An SPSA optimizer.
    ///
    /// # Errors
    /// [`OptimError::Config`] on a zero batch size or q, or a non-positive or non-finite ε, or a
    /// negative or non-finite learning rate.
    pub fn new(config: SpsaConfig) -> Result<Spsa, OptimError> {
        check_batch_size(config.batch_size)?;
        if config.directions == 0 {
            return Err(OptimError::Config(
                "--spsa-directions must be at least 1".into(),
            ));
        }
        check_step("--spsa-eps", f64::from(config.eps))?;
        check_positive("--lr", f64::from(config.lr), true)?;
        Ok(Spsa { config })
    }

    /// Forward passes per sample of the batch in one step: 2·q.
    fn cost(&self) -> usize {
        2 * self.config.directions
    }
}

impl Optimizer for Spsa {
    fn name(&self) -> &'static str {
        "spsa"
    }

    fn resolved_settings(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let mut v = vec![
            ("spsa_eps".into(), c.eps.to_string()),
            ("lr".into(), c.lr.to_string()),
            ("spsa_directions".into(), c.directions.to_string()),
            ("spsa_dist".into(), c.dist.name().into()),
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
        round_steps(net.spec().param_count(), self.cost())
    }

    fn run_round(
        &mut self,
        net: &mut dyn Network,
        round: usize,
        budget: Option<u64>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<RoundStats, OptimError> {
        let c = &self.config;
        let steps = self.steps_per_round(net);
        let (mut rng, mut batches) =
            round_source(net, c.seed, round, c.batch_policy, c.batch_size)?;
        let mut stats = RoundStats::default();
        let mut w = net.params();
        let mut probe = w.clone();
        let mut loss_sum = 0.0;
        let q = c.directions;
        let mut g = vec![0f64; q];
        for step in 0..steps {
            let batch = batches.next(&mut rng);
            if !stats.fits((self.cost() * batch.len()) as u64, budget) {
                break;
            }
            stats.forward_equivalents += (self.cost() * batch.len()) as u64;
            skip_visit_draw(&mut rng);
            let mut pair_sum = 0.0;
            for (d, g) in g.iter_mut().enumerate() {
                let mut losses = [0.0; 2];
                for (loss, sign) in losses.iter_mut().zip([1.0f32, -1.0]) {
                    probe.clone_from(&w);
                    add_direction(
                        &mut probe,
                        sign * c.eps,
                        c.dist,
                        step_rng(c.seed, round, step, d),
                    );
                    net.set_params(&probe).expect("layout unchanged");
                    *loss = net.batch_loss(batch, c.reduction);
                }
                if !losses[0].is_finite() && !losses[1].is_finite() {
                    // Neither side of W is finite: W itself has diverged. W stays.
                    net.set_params(&w).expect("layout unchanged");
                    return Err(OptimError::StepDiverged {
                        round,
                        step,
                        loss: losses[0],
                    });
                }
                pair_sum += 0.5 * (losses[0] + losses[1]);
                *g = (losses[0] - losses[1]) / (2.0 * f64::from(c.eps));
            }
            loss_sum += pair_sum / q as f64;
            stats.steps += 1;
            // W − lr·(1/q)·Σ g·z, each z regenerated; a non-finite estimate or result is no step.
            let mut updated = false;
            if g.iter().all(|g| g.is_finite()) {
                probe.clone_from(&w);
                for (d, &g) in g.iter().enumerate() {
                    let scale = (-f64::from(c.lr) * g / q as f64) as f32;
                    if scale != 0.0 {
                        add_direction(&mut probe, scale, c.dist, step_rng(c.seed, round, step, d));
                        updated = true;
                    }
                }
                updated &= all_finite(&probe);
            }
            if updated {
                std::mem::swap(&mut w, &mut probe);
                stats.accepted += 1;
            }
            net.set_params(&w).expect("layout unchanged");
            if stats.steps.is_multiple_of(64) {
                progress(stats.steps);
            }
        }
        stats.mean_batch_loss = loss_sum / stats.steps.max(1) as f64;
        progress(stats.steps);
        Ok(stats)
    }
}
