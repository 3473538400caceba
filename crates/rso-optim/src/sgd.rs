//! Plain minibatch SGD (the notebook's baseline).

use crate::{forward_equivalents, round_rng, shuffled, OptimError, Optimizer, RoundStats};
use rso_models::Network;

/// SGD settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate (the notebook: 0.01).
    pub lr: f32,
    /// Minibatch size; the last partial batch of an epoch is kept.
    pub batch_size: usize,
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
}

/// Plain descent `w ← w − lr·∇L` on the mean cross-entropy of shuffled minibatches.
#[derive(Clone, Debug)]
pub struct Sgd {
    config: SgdConfig,
}

impl Sgd {
    /// An SGD optimizer; fails on a zero batch size or a non-positive or non-finite rate.
    pub fn new(config: SgdConfig) -> Result<Sgd, OptimError> {
        if config.batch_size == 0 {
            return Err(OptimError::Config("--batch-size must be at least 1".into()));
        }
        crate::forward_only::check_positive("--lr", f64::from(config.lr), false)?;
        Ok(Sgd { config })
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn resolved_settings(&self) -> Vec<(String, String)> {
        vec![
            ("lr".to_string(), self.config.lr.to_string()),
            ("batch_size".into(), self.config.batch_size.to_string()),
            ("seed".into(), self.config.seed.to_string()),
        ]
    }

    fn steps_per_round(&self, net: &dyn Network) -> usize {
        net.train_len().div_ceil(self.config.batch_size)
    }

    fn run_round(
        &mut self,
        net: &mut dyn Network,
        round: usize,
        budget: Option<u64>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<RoundStats, OptimError> {
        let order = shuffled(net.train_len(), &mut round_rng(self.config.seed, round));
        let mut stats = RoundStats::default();
        let mut sum = 0.0;
        for (i, batch) in order.chunks(self.config.batch_size).enumerate() {
            if !stats.fits(forward_equivalents(batch.len()), budget) {
                break;
            }
            let loss = net.sgd_step(batch, self.config.lr);
            stats.forward_equivalents += forward_equivalents(batch.len());
            if !loss.is_finite() {
                return Err(OptimError::Diverged { round, loss });
            }
            sum += loss;
            stats.steps += 1;
            if i % 64 == 0 {
                progress(stats.steps);
            }
        }
        stats.mean_batch_loss = sum / stats.steps.max(1) as f64;
        progress(stats.steps);
        Ok(stats)
    }
}
