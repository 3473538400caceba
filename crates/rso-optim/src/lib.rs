//! Optimizers for the rso workspace, behind one [`Optimizer`] trait:
//!
//! - [`Rso`]: random search optimization (Tripathi & Singh, Algorithm 1) with the notebook's
//!   (`seed`) and the paper authors' (`paper`) presets, every knob overridable;
//! - [`Sgd`]: plain minibatch gradient descent;
//! - the other forward-only methods, to compare RSO with at equal compute: [`Spsa`] (two-point
//!   random-direction estimates, MeZO-style), [`Es`] (a (1+1) evolution strategy with the 1/5
//!   success rule) and [`Cfd`] (coordinate finite differences, the estimator DeepZero builds
//!   on). Their round is the forward-pass budget of one RSO round of the same model and batch
//!   size ([`forward_only`]).
//!
//! All drive any engine through [`rso_models::Network`]. Every random choice comes from the
//! configured seed, and the generator of round `r` depends only on `(seed, r)`, so a run resumed
//! at a round boundary continues exactly as an uninterrupted one (with the state of
//! [`Optimizer::state`] where an optimizer has any).

#![forbid(unsafe_code)]

mod cfd;
mod es;
pub mod forward_only;
mod rso;
mod sgd;
mod spsa;

pub use cfd::{Cfd, CfdConfig};
pub use es::{Es, EsConfig};
pub use forward_only::Direction;
pub use rso::{
    choose, BatchPolicy, Batches, Choice, Rso, RsoConfig, RsoEval, SigmaRule, SweepStep, SIGMA_MAX,
};
pub use sgd::{Sgd, SgdConfig};
pub use spsa::{Spsa, SpsaConfig};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rso_models::Network;

/// Why an optimizer stopped.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A loss turned NaN or infinite; RSO never accepts such a candidate, and a non-finite loss
    /// at the current weights means training has diverged.
    #[error("round {}: loss at the current weights is {loss} while visiting {param}[{index}]; training diverged (check the data and --sigma/--lr)", round + 1)]
    NonFiniteLoss {
        /// Round (0-based; the message counts from 1, as the CSVs do).
        round: usize,
        /// Parameter array name.
        param: String,
        /// Scalar index in the array.
        index: usize,
        /// The loss value.
        loss: f64,
    },
    /// SGD's minibatch loss turned NaN or infinite.
    #[error("epoch {}: minibatch loss is {loss}; training diverged (try a smaller --lr)", round + 1)]
    Diverged {
        /// Epoch (0-based; the message counts from 1, as the CSVs do).
        round: usize,
        /// The loss value.
        loss: f64,
    },
    /// The minibatch loss at the current weights (SPSA: on both sides of them) turned NaN or
    /// infinite (SPSA, ES, CFD).
    #[error("round {}, step {}: the minibatch loss at the current weights (spsa: at both W ± εz) is {loss}; training diverged (check --lr and the method's step: --spsa-eps, --es-sigma, --cfd-mu)", round + 1, step + 1)]
    StepDiverged {
        /// Round (0-based; the message counts from 1).
        round: usize,
        /// Step within the round (CFD: coordinates visited before it; 0-based, the message
        /// counts from 1).
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// A configuration that cannot run.
    #[error("{0}")]
    Config(String),
    /// Saved optimizer state ([`Optimizer::state`]) that does not fit this optimizer.
    #[error("optimizer state: {0}")]
    State(String),
}

/// What one round (RSO, SPSA, ES, CFD) or epoch (SGD) did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundStats {
    /// Weights visited (RSO), minibatch steps taken (SGD, SPSA, ES) or coordinates visited
    /// (CFD).
    pub steps: usize,
    /// Steps that changed the weights: RSO's accepted visits, SPSA's applied steps, ES's kept
    /// children, CFD's moved coordinates. SGD: 0.
    pub accepted: usize,
    /// Mean of the minibatch losses seen during the round: at W for RSO, ES and CFD (before
    /// the decision or step), the step's loss for SGD, the mean of L(W ± εz) for SPSA.
    pub mean_batch_loss: f64,
    /// The work the algorithm asked for, in forward passes of one sample, counted with the
    /// actual minibatch sizes: 3·|batch| per RSO weight visit (losses at W, W + Δ and W − Δ,
    /// whichever engine path computed them), 3·|batch| per SGD step (a forward pass and a
    /// backward pass of about twice its cost), 2·q·|batch| per SPSA step, 2·|batch| per ES step
    /// and 3·|batch| per CFD coordinate. Evaluation passes are not counted.
    pub forward_equivalents: u64,
    /// RSO: the annealing factor σ was scaled by in this round (1 without annealing).
    /// ES: σ at the end of the round divided by its initial value. Others: `None`.
    pub sigma_scale: Option<f64>,
    /// The round stopped early because its next step would have exceeded the forward-pass
    /// budget passed to [`Optimizer::run_round`]; the run is over.
    pub budget_reached: bool,
}

impl RoundStats {
    /// Whether a step costing `cost` forward-equivalents still fits in `budget` (none: no
    /// limit); when it does not, marks the round as stopped by the budget.
    pub fn fits(&mut self, cost: u64, budget: Option<u64>) -> bool {
        let fits = budget.is_none_or(|b| self.forward_equivalents + cost <= b);
        if !fits {
            self.budget_reached = true;
        }
        fits
    }
}

/// Forward passes of one sample that one RSO weight visit or one SGD step on a minibatch of
/// `batch` samples counts for (see [`RoundStats::forward_equivalents`]).
pub fn forward_equivalents(batch: usize) -> u64 {
    3 * batch as u64
}

/// A training algorithm that improves a network one round (or epoch) at a time.
pub trait Optimizer {
    /// Name as the CLI spells it (`rso`, `sgd`, `spsa`, `es`, `cfd`).
    fn name(&self) -> &'static str;

    /// Every setting the optimizer runs with, presets resolved (σ per array in visiting order
    /// for RSO), as name/value pairs for a run's provenance.
    fn resolved_settings(&self) -> Vec<(String, String)>;

    /// Units of work in one round (weights for RSO, minibatches for SGD, steps or coordinates
    /// for the other forward-only methods), for progress bars.
    fn steps_per_round(&self, net: &dyn Network) -> usize;

    /// Runs round `round` (0-based) on `net`; `progress` is called with the number of units
    /// done so far, now and then. With `budget`, the round takes no step that would bring its
    /// [`RoundStats::forward_equivalents`] above it, and says so in
    /// [`RoundStats::budget_reached`] when it stops early.
    fn run_round(
        &mut self,
        net: &mut dyn Network,
        round: usize,
        budget: Option<u64>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<RoundStats, OptimError>;

    /// The state the optimizer carries from one round to the next, as name/value pairs with
    /// numbers in Rust's shortest round-trip form (a checkpoint stores it). Empty for
    /// optimizers whose rounds depend only on the weights, the settings and the seed (RSO,
    /// SGD, SPSA, CFD).
    fn state(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Restores what [`Optimizer::state`] returned.
    ///
    /// # Errors
    /// [`OptimError::State`] when a name is unknown or missing, or a value does not parse.
    fn restore_state(&mut self, state: &[(String, String)]) -> Result<(), OptimError> {
        match state.first() {
            None => Ok(()),
            Some((name, _)) => Err(OptimError::State(format!(
                "{} keeps no state, found {name}",
                self.name()
            ))),
        }
    }
}

/// The generator for round `round` of a run seeded with `seed`: a function of both alone.
pub fn round_rng(seed: u64, round: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(round as u64 + 1);
    rng
}

/// A generator for set-up draws (σ samples, evaluation subsets) separate from every round's.
pub fn setup_rng(seed: u64, purpose: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX - purpose);
    rng
}

/// `0..n` shuffled with `rng` (Fisher–Yates, as `rand` does it).
pub fn shuffled(n: usize, rng: &mut impl rand::Rng) -> Vec<u32> {
    use rand::seq::SliceRandom;
    let mut v: Vec<u32> = (0..n as u32).collect();
    v.shuffle(rng);
    v
}
