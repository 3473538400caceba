//! What the forward-only methods other than RSO ([`crate::Spsa`], [`crate::Es`],
//! [`crate::Cfd`]) share: their round, their minibatches and their per-step random numbers.
//!
//! # A round is one RSO round's forward passes
//! RSO visits every scalar parameter once per round at 3·|batch| forward passes of one sample
//! each, so its round costs 3·B·P forward-equivalents for P parameters at batch size B. The
//! other methods' rounds take the fewest steps that reach it (`round_steps`: at most one step
//! more), so their per-round CSV rows line up with RSO's on the forward-equivalents axis.
//!
//! # The same minibatches as RSO
//! Every step draws from the round's generator ([`crate::round_rng`]) what an RSO visit draws,
//! in the same order: its minibatch ([`crate::Batches::next`]), then one standard normal (RSO
//! scales it by σ into Δ; the other methods do not use it). So with the same seed and the
//! random batch policy, step i of round r of every forward-only method, RSO included, trains on
//! the same minibatch. Their own random numbers (directions, coordinate blocks) come from
//! [`step_rng`], a generator of `(seed, round, step)` alone: regenerated, never stored, as MeZO
//! regenerates its directions from a per-step seed.

use crate::{round_rng, BatchPolicy, Batches, OptimError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rso_models::{Network, Params, Reduction};

/// How a random direction's entries are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Standard normal entries (MeZO, Malladi et al. 2023).
    Gaussian,
    /// ±1 with equal probability (classic SPSA, Spall 1992).
    Rademacher,
}

impl Direction {
    /// The name the command line uses (`gaussian`, `rademacher`).
    pub fn name(self) -> &'static str {
        match self {
            Direction::Gaussian => "gaussian",
            Direction::Rademacher => "rademacher",
        }
    }

    fn draw(self, rng: &mut ChaCha8Rng) -> f32 {
        match self {
            Direction::Gaussian => rng.sample(StandardNormal),
            Direction::Rademacher => {
                if rng.random::<bool>() {
                    1.0
                } else {
                    -1.0
                }
            }
        }
    }
}

/// The generator of step `step` of round `round` (0-based) of a run seeded with `seed`, for
/// draw number `draw` of that step (SPSA's q directions): a function of the four alone,
/// independent of [`crate::round_rng`] and [`crate::setup_rng`].
pub fn step_rng(seed: u64, round: usize, step: usize, draw: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(round as u64).to_le_bytes());
    key[16..24].copy_from_slice(&(step as u64).to_le_bytes());
    key[24..32].copy_from_slice(&(draw as u64).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Draws the rest of an RSO visit's draws after its minibatch (one standard normal), so the next
/// step's minibatch is the one RSO's next visit gets.
pub(crate) fn skip_visit_draw(rng: &mut impl Rng) {
    let _unused: f64 = rng.sample(StandardNormal);
}

/// Steps of `cost` forward passes per sample of the batch that fit in one RSO round of a model
/// with `params` scalars (3 per scalar): ⌈3·params / cost⌉.
pub fn round_steps(params: usize, cost: usize) -> usize {
    (3 * params).div_ceil(cost.max(1))
}

/// `w += scale·z` for the direction z that `rng` draws (canonical array order, each array
/// row-major); the same generator state gives the same z.
pub fn add_direction(w: &mut Params, scale: f32, dist: Direction, mut rng: ChaCha8Rng) {
    for x in w.values.iter_mut().flatten() {
        *x += scale * dist.draw(&mut rng);
    }
}

/// The settings SPSA, ES and CFD share, as their `resolved_settings` list them.
pub(crate) fn batch_settings(
    batch_size: usize,
    policy: BatchPolicy,
    reduction: Reduction,
    seed: u64,
) -> Vec<(String, String)> {
    vec![
        ("batch_size".into(), batch_size.to_string()),
        ("batch_policy".into(), format!("{policy:?}").to_lowercase()),
        ("reduction".into(), format!("{reduction:?}").to_lowercase()),
        ("seed".into(), seed.to_string()),
    ]
}

/// Round `round`'s generator and its minibatch source (started as for a layer's sweep).
///
/// # Errors
/// [`OptimError::Config`] when the training set is empty.
pub(crate) fn round_source(
    net: &dyn Network,
    seed: u64,
    round: usize,
    policy: BatchPolicy,
    batch_size: usize,
) -> Result<(ChaCha8Rng, Batches), OptimError> {
    let n = net.train_len();
    if n == 0 {
        return Err(OptimError::Config("the training set is empty".into()));
    }
    let mut rng = round_rng(seed, round);
    let mut batches = Batches::new(policy, batch_size, n, &mut rng);
    batches.start_group(&mut rng);
    Ok((rng, batches))
}

/// Refuses a zero batch size.
pub(crate) fn check_batch_size(batch_size: usize) -> Result<(), OptimError> {
    if batch_size == 0 {
        return Err(OptimError::Config("--batch-size must be at least 1".into()));
    }
    Ok(())
}

/// Refuses a value of `flag` that is not finite or not positive (with `zero_ok`, negative).
pub(crate) fn check_positive(flag: &str, value: f64, zero_ok: bool) -> Result<(), OptimError> {
    if value == f64::INFINITY {
        // (An f32 flag given a value past the largest f32 arrives here as infinity.)
        return Err(OptimError::Config(format!(
            "{flag} is too large: above the largest f32, {:.1e}",
            f32::MAX
        )));
    }
    let ok = value.is_finite() && (value > 0.0 || (zero_ok && value == 0.0));
    if !ok {
        let what = if zero_ok {
            "a number ≥ 0"
        } else {
            "a positive number"
        };
        return Err(OptimError::Config(format!(
            "{flag} must be {what}, got {value}"
        )));
    }
    Ok(())
}

/// [`check_positive`] for a perturbation's size (σ, ε, μ), which must also be at most
/// [`crate::SIGMA_MAX`]: weights are f32, and a larger step overflows them.
pub(crate) fn check_step(flag: &str, value: f64) -> Result<(), OptimError> {
    if value > crate::SIGMA_MAX && value.is_finite() {
        return Err(OptimError::Config(format!(
            "{flag} is too large: at most {:.1e} (a tenth of the largest f32: weights are f32), got \
             {value:.3e}",
            crate::SIGMA_MAX
        )));
    }
    check_positive(flag, value, false)
}

/// Whether every value is finite (a run never keeps weights it could not save and reload).
pub fn all_finite(params: &Params) -> bool {
    params.values.iter().flatten().all(|x| x.is_finite())
}

/// Parses a saved state value (Rust's shortest round-trip form).
pub(crate) fn parse_state<T: std::str::FromStr>(
    state: &[(String, String)],
    name: &str,
) -> Result<T, crate::OptimError> {
    let (_, value) = state
        .iter()
        .find(|(k, _)| k == name)
        .ok_or_else(|| crate::OptimError::State(format!("{name} missing")))?;
    value
        .parse()
        .map_err(|_| crate::OptimError::State(format!("{name}: '{value}' is not a number")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn step_generators_are_functions_of_their_coordinates() {
        let draw = |s, r, t, d| step_rng(s, r, t, d).random::<u64>();
        assert_eq!(draw(1, 2, 3, 0), draw(1, 2, 3, 0));
        let others = [
            draw(2, 2, 3, 0),
            draw(1, 3, 3, 0),
            draw(1, 2, 4, 0),
            draw(1, 2, 3, 1),
        ];
        assert!(others.iter().all(|&x| x != draw(1, 2, 3, 0)));
    }

    #[test]
    fn a_forward_only_step_leaves_the_round_generator_where_an_rso_visit_does() {
        // RSO's visit: minibatch, then Δ ~ N(0, σ). Ours: minibatch, then one skipped draw.
        let (mut a, mut b) = (round_rng(7, 1), round_rng(7, 1));
        let mut ba = Batches::new(BatchPolicy::Random, 5, 23, &mut a);
        let mut bb = Batches::new(BatchPolicy::Random, 5, 23, &mut b);
        let sigma = Normal::new(0.0, 0.3).unwrap();
        for _ in 0..200 {
            assert_eq!(ba.next(&mut a).to_vec(), bb.next(&mut b).to_vec());
            let _delta: f64 = sigma.sample(&mut a);
            skip_visit_draw(&mut b);
        }
    }

    #[test]
    fn steps_per_round_fill_an_rso_round() {
        assert_eq!(round_steps(10, 3), 10);
        assert_eq!(round_steps(10, 2), 15);
        assert_eq!(round_steps(7, 4), 6);
    }
}
