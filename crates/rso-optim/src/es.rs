//! A (1+1) evolution strategy with the 1/5 success rule.
//!
//! Per step: the step's minibatch loss of the parent W (re-evaluated every step, since the
//! minibatch changes) and of the child W' = W + σ·z, z standard normal over all parameters
//! ([`crate::forward_only::step_rng`]); W' replaces W only if its loss is strictly lower (and
//! every weight of it is finite). After every [`WINDOW`] steps σ is adapted by Rechenberg's 1/5
//! success rule as Schwefel states it: more than a fifth of them successful → σ / [`FACTOR`],
//! fewer → σ · [`FACTOR`]. Sources: Rechenberg 1973; Schwefel 1981 (c = 0.85). Cost:
//! 2·|batch| forward passes per step. σ and the window's counts live across rounds
//! ([`Optimizer::state`]).

use crate::forward_only::{
    add_direction, all_finite, batch_settings, check_batch_size, check_step, parse_state,
    round_source, round_steps, skip_visit_draw, step_rng, Direction,
};
use crate::{BatchPolicy, OptimError, Optimizer, RoundStats};
use rso_models::{Network, Reduction};

/// Steps between two adaptations of σ.
pub const WINDOW: usize = 10;
/// σ's adaptation factor (Schwefel's 0.85).
pub const FACTOR: f64 = 0.85;

/// ES settings.
#[derive(Clone, Debug, PartialEq)]
pub struct EsConfig {
    /// Initial mutation strength σ.
    pub sigma: f64,
    /// Minibatch size.
    pub batch_size: usize,
    /// Minibatch source (as RSO's).
    pub batch_policy: BatchPolicy,
    /// Loss reduction over the minibatch.
    pub reduction: Reduction,
    /// Seed of every random draw.
    pub seed: u64,
}

/// The (1+1)-ES (see the module docs).
#[derive(Clone, Debug)]
pub struct Es {
    config: EsConfig,
    /// The current mutation strength.
    sigma: f64,
    /// Successes in the current window.
    successes: usize,
    /// Steps in the current window.
    trials: usize,
}

impl Es {
    /// A (1+1)-ES.
    ///
    /// # Errors
    /// [`OptimError::Config`] on a zero batch size or a non-positive or non-finite σ.
    pub fn new(config: EsConfig) -> Result<Es, OptimError> {
        check_batch_size(config.batch_size)?;
        check_step("--es-sigma", config.sigma)?;
        Ok(Es {
            sigma: config.sigma,
            config,
            successes: 0,
            trials: 0,
        })
    }

    /// The current mutation strength.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Counts one step and adapts σ at the end of a window.
    fn record(&mut self, success: bool) {
        self.successes += usize::from(success);
        self.trials += 1;
        if self.trials == WINDOW {
            // 5·successes vs trials: the success rate against 1/5, in integers.
            match (5 * self.successes).cmp(&self.trials) {
                std::cmp::Ordering::Greater => self.sigma /= FACTOR,
                // Never 0: a checkpoint must hold a σ that resumes.
                std::cmp::Ordering::Less => {
                    self.sigma = (self.sigma * FACTOR).max(f64::MIN_POSITIVE)
                }
                std::cmp::Ordering::Equal => {}
            }
            self.successes = 0;
            self.trials = 0;
        }
    }
}

impl Optimizer for Es {
    fn name(&self) -> &'static str {
        "es"
    }

    fn resolved_settings(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let mut v = vec![
            ("es_sigma".into(), c.sigma.to_string()),
            ("es_window".into(), WINDOW.to_string()),
            ("es_factor".into(), FACTOR.to_string()),
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
        round_steps(net.spec().param_count(), 2)
    }

    fn run_round(
        &mut self,
        net: &mut dyn Network,
        round: usize,
        budget: Option<u64>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<RoundStats, OptimError> {
        let c = self.config.clone();
        let steps = self.steps_per_round(net);
        let (mut rng, mut batches) =
            round_source(net, c.seed, round, c.batch_policy, c.batch_size)?;
        let mut stats = RoundStats::default();
        let mut w = net.params();
        let mut child = w.clone();
        let mut loss_sum = 0.0;
        for step in 0..steps {
            let batch = batches.next(&mut rng);
            if !stats.fits(2 * batch.len() as u64, budget) {
                break;
            }
            stats.forward_equivalents += 2 * batch.len() as u64;
            skip_visit_draw(&mut rng);
            let parent = net.batch_loss(batch, c.reduction);
            if !parent.is_finite() {
                return Err(OptimError::StepDiverged {
                    round,
                    step,
                    loss: parent,
                });
            }
            loss_sum += parent;
            child.clone_from(&w);
            let z = step_rng(c.seed, round, step, 0);
            add_direction(&mut child, self.sigma as f32, Direction::Gaussian, z);
            let mut success = false;
            if all_finite(&child) {
                net.set_params(&child).expect("layout unchanged");
                // NaN compares false: a NaN child is never kept.
                success = net.batch_loss(batch, c.reduction) < parent;
            }
            if success {
                std::mem::swap(&mut w, &mut child);
                stats.accepted += 1;
            } else {
                net.set_params(&w).expect("layout unchanged");
            }
            self.record(success);
            stats.steps += 1;
            if stats.steps.is_multiple_of(64) {
                progress(stats.steps);
            }
        }
        stats.mean_batch_loss = loss_sum / stats.steps.max(1) as f64;
        stats.sigma_scale = Some(self.sigma / c.sigma);
        progress(stats.steps);
        Ok(stats)
    }

    fn state(&self) -> Vec<(String, String)> {
        vec![
            ("sigma".into(), self.sigma.to_string()),
            ("successes".into(), self.successes.to_string()),
            ("trials".into(), self.trials.to_string()),
        ]
    }

    fn restore_state(&mut self, state: &[(String, String)]) -> Result<(), OptimError> {
        if let Some((name, _)) = state
            .iter()
            .find(|(k, _)| !["sigma", "successes", "trials"].contains(&k.as_str()))
        {
            return Err(OptimError::State(format!("es keeps no {name}")));
        }
        let sigma: f64 = parse_state(state, "sigma")?;
        let successes: usize = parse_state(state, "successes")?;
        let trials: usize = parse_state(state, "trials")?;
        if !(sigma.is_finite() && sigma > 0.0) || successes > trials || trials >= WINDOW {
            return Err(OptimError::State(format!(
                "sigma {sigma}, successes {successes}, trials {trials} cannot occur"
            )));
        }
        (self.sigma, self.successes, self.trials) = (sigma, successes, trials);
        Ok(())
    }
}
