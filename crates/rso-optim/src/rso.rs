//! RSO, random search optimization (Tripathi & Singh 2020, Algorithm 1), with the two presets of
//! DESIGN §2.

use crate::{
    forward_equivalents, round_rng, setup_rng, shuffled, OptimError, Optimizer, RoundStats,
};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use rso_models::network::reference_candidate_losses;
use rso_models::{Layer, ModelSpec, Network, ParamKind, Preset, Reduction};

/// The largest σ (after `--sigma-multiplier`) RSO accepts: Δ is drawn as f32, and at σ ≤
/// f32::MAX / 10 a draw exceeds f32::MAX (10 standard deviations) with probability below 1e-20.
pub const SIGMA_MAX: f64 = f32::MAX as f64 / 10.0;

/// How σ, the standard deviation of the perturbation Δ, is chosen per parameter array.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SigmaRule {
    /// The notebook's: for the d-th layer with parameters, the standard deviation of the
    /// concatenated He samples `N(0, sqrt(2/len(array)))` of every array of layers 1..d.
    SeedCumulative,
    /// The paper's: conv/dense weights (and biases) the He std `sqrt(2/fan_in)` of their layer;
    /// BatchNorm γ and β 0.167.
    PaperAnalytic,
    /// One σ for every array.
    Fixed(f64),
}

/// Where each weight's minibatch comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchPolicy {
    /// The notebook's: each round the training set is shuffled and cut into batches (last
    /// partial batch kept); every weight picks one of them uniformly, with replacement.
    Random,
    /// The paper's: consecutive windows of a shuffled copy of the training set, reshuffled at the
    /// start of each layer's sweep and wrapping around at its end.
    Sequential,
}

/// Which implementation computes the three candidate losses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsoEval {
    /// Three full forward passes per weight ([`reference_candidate_losses`]).
    Reference,
    /// The engine's own [`Network::candidate_losses`] (exact, faster where implemented).
    Incremental,
}

/// Every setting of an RSO run. [`RsoConfig::preset`] fills them as a preset says.
#[derive(Clone, Debug, PartialEq)]
pub struct RsoConfig {
    /// The preset these settings started from (decides the update order).
    pub preset: Preset,
    /// Number of rounds C of the run (annealing needs it).
    pub rounds: usize,
    /// Minibatch size.
    pub batch_size: usize,
    /// σ rule.
    pub sigma: SigmaRule,
    /// A multiplier of every array's σ (1: the rule's σ), for tuning.
    pub sigma_multiplier: f64,
    /// Annealing floor α: σ_c = σ·(α + (1−α)(C−c)/C) for round c; `None` = constant σ.
    pub anneal: Option<f64>,
    /// Multiplicative weight decay applied to a weight before each visit: w ← w·(1 − wd).
    pub weight_decay: f64,
    /// Minibatch source.
    pub batch_policy: BatchPolicy,
    /// Loss reduction over the minibatch.
    pub reduction: Reduction,
    /// Candidate-loss implementation.
    pub eval: RsoEval,
    /// Seed of every random draw.
    pub seed: u64,
}

impl RsoConfig {
    /// The settings of `preset` (DESIGN §2) for a run of `rounds` rounds at `batch_size`.
    pub fn preset(preset: Preset, rounds: usize, batch_size: usize, seed: u64) -> RsoConfig {
        match preset {
            Preset::Seed => RsoConfig {
                preset,
                rounds,
                batch_size,
                sigma: SigmaRule::SeedCumulative,
                sigma_multiplier: 1.0,
                anneal: None,
                weight_decay: 0.0,
                batch_policy: BatchPolicy::Random,
                reduction: Reduction::Mean,
                eval: RsoEval::Incremental,
                seed,
            },
            Preset::Paper => RsoConfig {
                preset,
                rounds,
                batch_size,
                sigma: SigmaRule::PaperAnalytic,
                sigma_multiplier: 1.0,
                anneal: Some(0.1),
                weight_decay: 1e-4,
                batch_policy: BatchPolicy::Sequential,
                reduction: Reduction::Sum,
                eval: RsoEval::Incremental,
                seed,
            },
        }
    }

    /// σ's annealing factor in round `round` (0-based).
    pub fn anneal_factor(&self, round: usize) -> f64 {
        match self.anneal {
            None => 1.0,
            Some(alpha) => {
                let c = self.rounds.max(1) as f64;
                let left = (self.rounds.saturating_sub(round)) as f64;
                alpha + (1.0 - alpha) * left / c
            }
        }
    }
}

/// One parameter array in RSO's visiting order, with its unannealed σ.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepStep {
    /// Index of the array in [`ModelSpec::params`].
    pub param: usize,
    /// σ before annealing.
    pub sigma: f64,
    /// Layer group the array belongs to; the sequential batch policy reshuffles when it changes.
    pub group: usize,
}

/// The outcome of one weight's visit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Keep W (also on every tie).
    Keep,
    /// Accept W + Δ.
    Plus,
    /// Accept W − Δ.
    Minus,
}

/// Algorithm 1's argmin over `[F(W), F(W+Δ), F(W−Δ)]`: a candidate is taken only if its loss is
/// strictly lower than every earlier one in that order, so ties keep W (and prefer +Δ over −Δ),
/// and a NaN loss is never accepted.
pub fn choose(losses: [f64; 3]) -> Choice {
    let mut best = (Choice::Keep, losses[0]);
    for (choice, loss) in [(Choice::Plus, losses[1]), (Choice::Minus, losses[2])] {
        // Comparisons with NaN are false: a NaN candidate never wins, and a NaN at W keeps W
        // (the caller reports that as divergence).
        if loss < best.1 {
            best = (choice, loss);
        }
    }
    best.0
}

/// Random search optimization over any [`Network`].
#[derive(Clone, Debug)]
pub struct Rso {
    config: RsoConfig,
    schedule: Vec<SweepStep>,
    names: Vec<String>,
}

impl Rso {
    /// An RSO optimizer for `spec`; σ samples (preset `seed`) are drawn from the seed.
    pub fn new(spec: &ModelSpec, config: RsoConfig) -> Result<Rso, OptimError> {
        if config.batch_size == 0 {
            return Err(OptimError::Config("--batch-size must be at least 1".into()));
        }
        if let SigmaRule::Fixed(s) = config.sigma {
            if !(s.is_finite() && s > 0.0) {
                return Err(OptimError::Config(format!(
                    "--sigma must be a positive number, got {s}"
                )));
            }
        }
        if !(config.sigma_multiplier.is_finite() && config.sigma_multiplier > 0.0) {
            return Err(OptimError::Config(format!(
                "--sigma-multiplier must be a positive number, got {}",
                config.sigma_multiplier
            )));
        }
        if let Some(a) = config.anneal {
            if !(0.0..=1.0).contains(&a) {
                return Err(OptimError::Config(format!(
                    "--anneal must lie in [0, 1], got {a}"
                )));
            }
        }
        if !(0.0..1.0).contains(&config.weight_decay) {
            return Err(OptimError::Config(format!(
                "--weight-decay must lie in [0, 1), got {}",
                config.weight_decay
            )));
        }
        let schedule = schedule(spec, &config);
        if let Some(s) = schedule
            .iter()
            .find(|s| s.sigma > SIGMA_MAX || s.sigma.is_nan())
        {
            let flag = match config.sigma {
                SigmaRule::Fixed(_) => "--sigma",
                _ => "--sigma-multiplier",
            };
            return Err(OptimError::Config(format!(
                "{flag}: σ = {:.3e} for {} is too large: Δ ~ N(0, σ²) is a f32, whose largest value \
                 is {:.1e}; σ (times --sigma-multiplier) must be at most {SIGMA_MAX:.1e}, so that \
                 a draw overflows with probability below 1e-20",
                s.sigma,
                spec.params()[s.param].name,
                f32::MAX
            )));
        }
        let names = spec.params().into_iter().map(|p| p.name).collect();
        Ok(Rso {
            config,
            schedule,
            names,
        })
    }

    /// The settings.
    pub fn config(&self) -> &RsoConfig {
        &self.config
    }

    /// The visiting order with each array's σ.
    pub fn schedule(&self) -> &[SweepStep] {
        &self.schedule
    }
}

/// The arrays in visiting order with their σ (before annealing).
pub(crate) fn schedule(spec: &ModelSpec, config: &RsoConfig) -> Vec<SweepStep> {
    let params = spec.params();
    // Groups: a layer with parameters, joined (preset `paper`) by the BatchNorm that follows a conv.
    let mut order: Vec<(usize, usize)> = Vec::new(); // (param, group)
    let layers_with_params: Vec<usize> = {
        let mut v: Vec<usize> = params.iter().map(|p| p.layer).collect();
        v.dedup();
        v
    };
    let in_layer = |layer: usize| -> Vec<usize> {
        params
            .iter()
            .enumerate()
            .filter(|(_, p)| p.layer == layer)
            .map(|(i, _)| i)
            .collect()
    };
    match config.preset {
        Preset::Seed => {
            // Layers D down to 1, each layer's arrays in canonical order (weight, then bias).
            for &layer in layers_with_params.iter().rev() {
                for p in in_layer(layer) {
                    order.push((p, layer));
                }
            }
        }
        Preset::Paper => {
            // FC first, then for each conv from the last: its weights, then the following
            // BatchNorm's β, then γ.
            for &layer in layers_with_params.iter().rev() {
                match &spec.layers[layer] {
                    Layer::BatchNorm { .. } => {} // visited with its conv
                    Layer::Conv { .. } => {
                        for p in in_layer(layer) {
                            order.push((p, layer));
                        }
                        let bn = spec.layers[layer + 1..]
                            .iter()
                            .take_while(|l| !matches!(l, Layer::Conv { .. } | Layer::Dense { .. }))
                            .position(|l| matches!(l, Layer::BatchNorm { .. }))
                            .map(|off| layer + 1 + off);
                        if let Some(bn) = bn {
                            let mut arrays = in_layer(bn);
                            arrays.sort_by_key(|&p| params[p].kind != ParamKind::BnBeta);
                            for p in arrays {
                                order.push((p, layer));
                            }
                        }
                    }
                    _ => {
                        for p in in_layer(layer) {
                            order.push((p, layer));
                        }
                    }
                }
            }
            // A BatchNorm not preceded by a conv in its block would be missed above.
            for (i, p) in params.iter().enumerate() {
                if !order.iter().any(|&(q, _)| q == i) {
                    order.push((i, p.layer));
                }
            }
        }
    }
    let sigmas = sigmas(spec, config);
    order
        .into_iter()
        .map(|(param, group)| SweepStep {
            param,
            sigma: sigmas[param] * config.sigma_multiplier,
            group,
        })
        .collect()
}

/// σ of every array, canonical order.
fn sigmas(spec: &ModelSpec, config: &RsoConfig) -> Vec<f64> {
    let params = spec.params();
    match config.sigma {
        SigmaRule::Fixed(s) => vec![s; params.len()],
        SigmaRule::PaperAnalytic => params
            .iter()
            .map(|p| match p.kind {
                ParamKind::BnGamma | ParamKind::BnBeta => 0.167,
                _ => rso_models::init::he_std(p.fan_in),
            })
            .collect(),
        SigmaRule::SeedCumulative => {
            // The notebook draws He samples for every array, layer by layer, and uses the std
            // of everything drawn so far (layers 1..d) as layer d's σ.
            let mut rng = setup_rng(config.seed, 1);
            let (mut n, mut sum, mut sumsq) = (0f64, 0f64, 0f64);
            let mut out = vec![0.0; params.len()];
            let mut i = 0;
            while i < params.len() {
                let layer = params[i].layer;
                let start = i;
                while i < params.len() && params[i].layer == layer {
                    let len = params[i].len();
                    let normal = Normal::new(0.0, (2.0 / len as f64).sqrt()).expect("positive std");
                    for _ in 0..len {
                        let x: f64 = normal.sample(&mut rng);
                        n += 1.0;
                        sum += x;
                        sumsq += x * x;
                    }
                    i += 1;
                }
                let mean = sum / n;
                // Julia's std is the corrected (n − 1) one.
                let var = (sumsq - n * mean * mean) / (n - 1.0).max(1.0);
                for s in &mut out[start..i] {
                    *s = var.max(0.0).sqrt();
                }
            }
            out
        }
    }
}

/// Supplies each visit's minibatch according to the batch policy, as [`Rso::run_round`] draws
/// them (the benches use it to time scaled-down rounds with the same batches).
#[derive(Debug)]
pub struct Batches {
    policy: BatchPolicy,
    batch_size: usize,
    order: Vec<u32>,
    pos: usize,
    window: Vec<u32>,
}

impl Batches {
    /// A shuffle of `n ≥ 1` training samples, cut `batch_size` (at most `n`) at a time.
    pub fn new(policy: BatchPolicy, batch_size: usize, n: usize, rng: &mut impl Rng) -> Batches {
        let order = shuffled(n, rng);
        Batches {
            policy,
            batch_size: batch_size.min(n),
            order,
            pos: 0,
            window: Vec::new(),
        }
    }

    /// At the start of a layer's sweep (a new [`SweepStep::group`]): the sequential policy
    /// starts on a fresh shuffle; the random one draws nothing.
    pub fn start_group(&mut self, rng: &mut impl Rng) {
        use rand::seq::SliceRandom;
        if self.policy == BatchPolicy::Sequential {
            self.order.shuffle(rng);
            self.pos = 0;
        }
    }

    /// The next visit's minibatch (training-set indices).
    pub fn next(&mut self, rng: &mut impl Rng) -> &[u32] {
        let n = self.order.len();
        match self.policy {
            BatchPolicy::Random => {
                let count = n.div_ceil(self.batch_size);
                let k = rng.random_range(0..count);
                let end = ((k + 1) * self.batch_size).min(n);
                &self.order[k * self.batch_size..end]
            }
            BatchPolicy::Sequential => {
                self.window.clear();
                for i in 0..self.batch_size {
                    self.window.push(self.order[(self.pos + i) % n]);
                }
                self.pos = (self.pos + self.batch_size) % n;
                &self.window
            }
        }
    }
}

impl Optimizer for Rso {
    fn name(&self) -> &'static str {
        "rso"
    }

    fn resolved_settings(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let mut v = vec![
            ("preset".to_string(), c.preset.name().to_string()),
            ("rounds".into(), c.rounds.to_string()),
            ("batch_size".into(), c.batch_size.to_string()),
            (
                "sigma_rule".into(),
                match c.sigma {
                    SigmaRule::SeedCumulative => "seed-cumulative".into(),
                    SigmaRule::PaperAnalytic => "paper-analytic".into(),
                    SigmaRule::Fixed(s) => format!("fixed {s}"),
                },
            ),
            ("sigma_multiplier".into(), c.sigma_multiplier.to_string()),
            (
                "anneal".into(),
                c.anneal.map_or_else(|| "none".into(), |a| a.to_string()),
            ),
            ("weight_decay".into(), c.weight_decay.to_string()),
            // As the command line spells them.
            (
                "batch_policy".into(),
                format!("{:?}", c.batch_policy).to_lowercase(),
            ),
            (
                "reduction".into(),
                format!("{:?}", c.reduction).to_lowercase(),
            ),
            ("eval".into(), format!("{:?}", c.eval).to_lowercase()),
            ("seed".into(), c.seed.to_string()),
        ];
        // The visiting order, each array with its σ before annealing.
        for (i, step) in self.schedule.iter().enumerate() {
            v.push((
                format!("visit{:02}.sigma[{}]", i + 1, self.names[step.param]),
                step.sigma.to_string(),
            ));
        }
        v
    }

    fn steps_per_round(&self, net: &dyn Network) -> usize {
        let params = net.spec().params();
        self.schedule.iter().map(|s| params[s.param].len()).sum()
    }

    fn run_round(
        &mut self,
        net: &mut dyn Network,
        round: usize,
        budget: Option<u64>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<RoundStats, OptimError> {
        let cfg = &self.config;
        let n = net.train_len();
        if n == 0 {
            return Err(OptimError::Config("the training set is empty".into()));
        }
        let mut rng = round_rng(cfg.seed, round);
        let mut batches = Batches::new(cfg.batch_policy, cfg.batch_size, n, &mut rng);
        let anneal = cfg.anneal_factor(round);
        let keep = (1.0 - cfg.weight_decay) as f32;
        let lens: Vec<usize> = net.spec().params().iter().map(|p| p.len()).collect();
        let mut stats = RoundStats {
            sigma_scale: Some(anneal),
            ..RoundStats::default()
        };
        let mut loss_sum = 0.0;
        let mut group = usize::MAX;
        'sweeps: for step in &self.schedule {
            if step.group != group {
                group = step.group;
                batches.start_group(&mut rng);
            }
            net.begin_sweep(step.param);
            let normal = Normal::new(0.0, step.sigma * anneal).map_err(|e| {
                OptimError::Config(format!("σ for {}: {e}", self.names[step.param]))
            })?;
            for index in 0..lens[step.param] {
                let batch = batches.next(&mut rng);
                if !stats.fits(forward_equivalents(batch.len()), budget) {
                    break 'sweeps;
                }
                stats.forward_equivalents += forward_equivalents(batch.len());
                let delta = normal.sample(&mut rng) as f32;
                let mut w = net.weight(step.param, index);
                if cfg.weight_decay != 0.0 {
                    w *= keep;
                    net.set_weight(step.param, index, w);
                }
                let losses = match cfg.eval {
                    RsoEval::Reference => reference_candidate_losses(
                        net,
                        batch,
                        step.param,
                        index,
                        delta,
                        cfg.reduction,
                    ),
                    RsoEval::Incremental => {
                        net.candidate_losses(batch, step.param, index, delta, cfg.reduction)
                    }
                };
                // A candidate value that is not finite is never accepted, whatever its loss (a
                // ReLU after an infinite weight can give a finite one).
                let mut losses = losses;
                for (loss, candidate) in losses[1..].iter_mut().zip([w + delta, w - delta]) {
                    if !candidate.is_finite() {
                        *loss = f64::NAN;
                    }
                }
                if !losses[0].is_finite() {
                    return Err(OptimError::NonFiniteLoss {
                        round,
                        param: self.names[step.param].clone(),
                        index,
                        loss: losses[0],
                    });
                }
                loss_sum += losses[0];
                match choose(losses) {
                    Choice::Keep => {}
                    Choice::Plus => {
                        net.set_weight(step.param, index, w + delta);
                        stats.accepted += 1;
                    }
                    Choice::Minus => {
                        net.set_weight(step.param, index, w - delta);
                        stats.accepted += 1;
                    }
                }
                stats.steps += 1;
                if stats.steps.is_multiple_of(256) {
                    progress(stats.steps);
                }
            }
        }
        stats.mean_batch_loss = loss_sum / stats.steps.max(1) as f64;
        progress(stats.steps);
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rso_models::ModelKind;

    #[test]
    fn ties_keep_w_and_nan_is_never_taken() {
        assert_eq!(choose([1.0, 1.0, 1.0]), Choice::Keep);
        assert_eq!(choose([1.0, 0.5, 0.5]), Choice::Plus);
        assert_eq!(choose([1.0, 0.7, 0.5]), Choice::Minus);
        assert_eq!(choose([1.0, f64::NAN, 2.0]), Choice::Keep);
        assert_eq!(choose([1.0, f64::NAN, 0.5]), Choice::Minus);
        assert_eq!(choose([f64::NAN, 0.5, 0.2]), Choice::Keep);
    }

    #[test]
    fn seed_sigmas_match_the_notebook() {
        // DESIGN §2: OneConv conv ≈ 0.316, dense ≈ 0.032.
        let spec = ModelKind::OneConv.mnist();
        let rso = Rso::new(&spec, RsoConfig::preset(Preset::Seed, 1, 32, 3)).unwrap();
        let sigma = |name: &str| {
            let p = spec.params().iter().position(|p| p.name == name).unwrap();
            rso.schedule().iter().find(|s| s.param == p).unwrap().sigma
        };
        assert!(
            (sigma("conv1.weight") - 0.316).abs() < 0.06,
            "{}",
            sigma("conv1.weight")
        );
        assert_eq!(sigma("conv1.weight"), sigma("conv1.bias"));
        assert!(
            (sigma("fc.weight") - 0.032).abs() < 0.003,
            "{}",
            sigma("fc.weight")
        );
    }

    #[test]
    fn paper_order_is_fc_then_conv_beta_gamma_from_the_last_conv() {
        let spec = ModelKind::Paper.mnist();
        let rso = Rso::new(&spec, RsoConfig::preset(Preset::Paper, 50, 5000, 0)).unwrap();
        let params = spec.params();
        let names: Vec<&str> = rso
            .schedule()
            .iter()
            .map(|s| params[s.param].name.as_str())
            .collect();
        assert_eq!(
            &names[..4],
            ["fc.weight", "conv6.weight", "bn6.beta", "bn6.gamma"]
        );
        assert_eq!(names.last(), Some(&"bn1.gamma"));
        assert_eq!(names.len(), params.len());
        let s = &rso.schedule()[2];
        assert_eq!(s.sigma, 0.167);
        assert!((rso.schedule()[0].sigma - (2.0f64 / 16.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn seed_order_is_last_layer_first() {
        let spec = ModelKind::TwoConv.mnist();
        let rso = Rso::new(&spec, RsoConfig::preset(Preset::Seed, 1, 32, 0)).unwrap();
        let params = spec.params();
        let names: Vec<&str> = rso
            .schedule()
            .iter()
            .map(|s| params[s.param].name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "fc.weight",
                "fc.bias",
                "conv2.weight",
                "conv2.bias",
                "conv1.weight",
                "conv1.bias"
            ]
        );
    }

    #[test]
    fn annealing_goes_linearly_from_one_towards_alpha() {
        let cfg = RsoConfig::preset(Preset::Paper, 50, 5000, 0);
        assert_eq!(cfg.anneal_factor(0), 1.0);
        assert!((cfg.anneal_factor(49) - (0.1 + 0.9 / 50.0)).abs() < 1e-12);
        let seed = RsoConfig::preset(Preset::Seed, 10, 32, 0);
        assert_eq!(seed.anneal_factor(5), 1.0);
    }

    #[test]
    fn random_batches_cover_the_shuffled_partition() {
        let mut rng = round_rng(1, 0);
        let mut b = Batches::new(BatchPolicy::Random, 4, 10, &mut rng);
        let mut sizes = std::collections::BTreeSet::new();
        for _ in 0..100 {
            sizes.insert(b.next(&mut rng).len());
        }
        assert_eq!(sizes.into_iter().collect::<Vec<_>>(), vec![2, 4]);
    }

    #[test]
    fn sequential_batches_walk_the_shuffle_and_wrap() {
        let mut rng = round_rng(1, 0);
        let mut b = Batches::new(BatchPolicy::Sequential, 4, 10, &mut rng);
        let order = b.order.clone();
        let first: Vec<u32> = b.next(&mut rng).to_vec();
        assert_eq!(first, order[..4]);
        b.next(&mut rng);
        let third: Vec<u32> = b.next(&mut rng).to_vec();
        assert_eq!(third, [order[8], order[9], order[0], order[1]]);
    }

    #[test]
    fn bad_settings_are_refused() {
        let spec = ModelKind::OneConv.mnist();
        let mut cfg = RsoConfig::preset(Preset::Seed, 1, 0, 0);
        assert!(Rso::new(&spec, cfg.clone()).is_err());
        cfg.batch_size = 8;
        cfg.sigma = SigmaRule::Fixed(-1.0);
        assert!(Rso::new(&spec, cfg.clone()).is_err());
        cfg.sigma = SigmaRule::Fixed(0.1);
        cfg.anneal = Some(2.0);
        assert!(Rso::new(&spec, cfg).is_err());
    }
}
