//! The forward-only methods (SPSA, ES, CFD) on the pure-Rust engine: determinism, their
//! invariants, their cost in forward passes, the shared minibatch sequence, budgets and ES's
//! state across rounds.

use rso_cpu::CpuNetwork;
use rso_models::network::reference_candidate_losses;
use rso_models::{
    BackendError, Eval, Init, ModelKind, ModelSpec, Network, Params, Preset, Reduction, SplitKind,
};
use rso_optim::forward_only::{add_direction, step_rng};
use rso_optim::{
    BatchPolicy, Cfd, CfdConfig, Direction, Es, EsConfig, OptimError, Optimizer, Rso, RsoConfig,
    RsoEval, Sgd, SgdConfig, SigmaRule, Spsa, SpsaConfig, SIGMA_MAX,
};
use rso_testkit::{random_params, wide, RandomData, Tol, Weights};

const TRAIN: usize = 40;
const BATCH: usize = 8;

fn spec() -> ModelSpec {
    ModelKind::OneConv.spec(1, 8, 10)
}

fn network(seed: u64) -> CpuNetwork {
    let spec = spec();
    let mut rng = rso_testkit::rng(seed);
    let split = RandomData::of(&spec).split(TRAIN, 8, &mut rng);
    let params = random_params(&spec, Weights::Init(Init::He), &mut rng);
    CpuNetwork::new(&spec, &params, split).expect("network")
}

fn spsa(lr: f32, directions: usize) -> Spsa {
    Spsa::new(SpsaConfig {
        eps: 1e-3,
        lr,
        directions,
        dist: Direction::Gaussian,
        batch_size: BATCH,
        batch_policy: BatchPolicy::Random,
        reduction: Reduction::Mean,
        seed: 5,
    })
    .unwrap()
}

fn es(sigma: f64) -> Es {
    Es::new(EsConfig {
        sigma,
        batch_size: BATCH,
        batch_policy: BatchPolicy::Random,
        reduction: Reduction::Mean,
        seed: 5,
    })
    .unwrap()
}

fn cfd(block: usize, lr: f32, eval: RsoEval) -> Cfd {
    Cfd::new(
        &spec(),
        CfdConfig {
            preset: Preset::Seed,
            block,
            mu: 1e-2,
            lr,
            batch_size: BATCH,
            batch_policy: BatchPolicy::Random,
            reduction: Reduction::Mean,
            eval,
            seed: 5,
        },
    )
    .unwrap()
}

fn rso() -> Rso {
    Rso::new(&spec(), RsoConfig::preset(Preset::Seed, 3, BATCH, 5)).unwrap()
}

fn sgd() -> Sgd {
    Sgd::new(SgdConfig {
        lr: 0.01,
        batch_size: BATCH,
        seed: 5,
    })
    .unwrap()
}

fn round(opt: &mut dyn Optimizer, net: &mut dyn Network, r: usize) -> rso_optim::RoundStats {
    opt.run_round(net, r, None, &mut |_| {}).expect("round")
}

/// What a forward-only step asked of the network.
#[derive(Clone, Debug)]
enum Event {
    SetParams(Params),
    BatchLoss(Vec<u32>, f64),
    Candidates(Vec<u32>),
}

/// Delegates to `net`, logs the calls an optimizer makes, and (with `poison`) answers NaN for
/// every loss at weights other than the initial ones; with `lure`, the loss is Σ (w/10³⁸)² of
/// the weights instead of the network's, and −10³⁰ (better than any) at weights that are not
/// all finite, which it counts.
struct Logged {
    net: CpuNetwork,
    log: Vec<Event>,
    poison: Option<Params>,
    lure: bool,
    lured: usize,
}

impl Logged {
    fn new(net: CpuNetwork) -> Logged {
        Logged {
            net,
            log: Vec::new(),
            poison: None,
            lure: false,
            lured: 0,
        }
    }

    /// Every weight 3.3·10³⁸ (a step of 10³⁷ overflows f32), the luring loss.
    fn luring(mut net: CpuNetwork) -> Logged {
        let mut p = net.params();
        p.values.iter_mut().flatten().for_each(|w| *w = 3.3e38);
        net.set_params(&p).unwrap();
        Logged {
            lure: true,
            ..Logged::new(net)
        }
    }

    fn lure_loss(&mut self) -> f64 {
        let p = self.net.params();
        if p.values.iter().flatten().all(|w| w.is_finite()) {
            p.values
                .iter()
                .flatten()
                .map(|&w| (f64::from(w) / 1e38).powi(2))
                .sum()
        } else {
            self.lured += 1;
            -1e30
        }
    }

    fn poisoned(net: CpuNetwork) -> Logged {
        let initial = net.params();
        Logged {
            poison: Some(initial),
            ..Logged::new(net)
        }
    }

    fn moved(&self) -> bool {
        self.poison
            .as_ref()
            .is_some_and(|p| p.values != self.net.params().values)
    }

    /// The minibatch of every step, for an optimizer that asks `calls` losses (or loss
    /// triples) per step.
    fn batches(&self, calls: usize) -> Vec<Vec<u32>> {
        let asked: Vec<&Vec<u32>> = self
            .log
            .iter()
            .filter_map(|e| match e {
                Event::BatchLoss(b, _) | Event::Candidates(b) => Some(b),
                Event::SetParams(_) => None,
            })
            .collect();
        asked.chunks(calls).map(|c| c[0].clone()).collect()
    }
}

impl Network for Logged {
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
        self.log.push(Event::SetParams(params.clone()));
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
        if self.lure {
            return self.lure_loss();
        }
        let mut l = self.net.batch_loss(batch, reduction);
        if self.moved() {
            l = f64::NAN;
        }
        self.log.push(Event::BatchLoss(batch.to_vec(), l));
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
        self.log.push(Event::Candidates(batch.to_vec()));
        if self.lure {
            return reference_candidate_losses(self, batch, param, index, delta, reduction);
        }
        let mut l = self
            .net
            .candidate_losses(batch, param, index, delta, reduction);
        if self.poison.is_some() {
            l[1] = f64::NAN;
            l[2] = f64::NAN;
        }
        l
    }
    fn begin_sweep(&mut self, param: usize) {
        self.net.begin_sweep(param)
    }
    fn loss_and_grad(&mut self, batch: &[u32], reduction: Reduction) -> (f64, Vec<Vec<f32>>) {
        self.log.push(Event::BatchLoss(batch.to_vec(), 0.0));
        self.net.loss_and_grad(batch, reduction)
    }
    fn calibrate_bn(&mut self, batch: &[u32]) {
        self.net.calibrate_bn(batch)
    }
    fn evaluate(&mut self, split: SplitKind, limit: Option<usize>) -> Eval {
        self.net.evaluate(split, limit)
    }
}

fn methods() -> Vec<(&'static str, Box<dyn Optimizer>)> {
    vec![
        ("spsa", Box::new(spsa(0.05, 2))),
        ("es", Box::new(es(0.05))),
        ("cfd", Box::new(cfd(3, 0.05, RsoEval::Incremental))),
    ]
}

#[test]
fn the_same_seed_gives_the_same_weights_and_training_moves_them() {
    for ((name, mut a), (_, mut b)) in methods().into_iter().zip(methods()) {
        let (mut x, mut y) = (network(1), network(1));
        let start = x.params();
        for r in 0..2 {
            let sa = round(a.as_mut(), &mut x, r);
            let sb = round(b.as_mut(), &mut y, r);
            assert_eq!(sa, sb, "{name} round {r}");
        }
        assert_eq!(x.params().values, y.params().values, "{name}");
        assert_ne!(x.params().values, start.values, "{name} changed nothing");
    }
}

#[test]
fn forward_equivalents_are_counted_as_the_engine_is_asked() {
    let p = spec().param_count();
    for (name, mut opt) in methods() {
        let mut net = rso_testkit::Recorder::new(network(2));
        let stats = round(opt.as_mut(), &mut net, 0);
        // batch_loss: one forward pass per sample; candidate_losses: three.
        let asked = net.batch_loss_samples + 3 * net.candidate_samples;
        assert_eq!(stats.forward_equivalents, asked, "{name}");
        // A round is one RSO round's forward passes, within one step's.
        let rso_round = 3 * (BATCH * p) as u64;
        assert!(
            stats.forward_equivalents <= rso_round + 4 * BATCH as u64
                && stats.forward_equivalents + 9 * BATCH as u64 >= rso_round,
            "{name}: {} vs {rso_round}",
            stats.forward_equivalents
        );
    }
}

#[test]
fn every_method_trains_on_rsos_minibatches() {
    let mut reference = Logged::new(network(3));
    round(&mut rso(), &mut reference, 1);
    let rso_batches = reference.batches(1);
    // Losses asked per step: SPSA 2·q, ES 2 (CFD below).
    for ((name, mut opt), calls) in methods().into_iter().zip([4, 2]) {
        let mut net = Logged::new(network(3));
        round(opt.as_mut(), &mut net, 1);
        let batches = net.batches(calls);
        let n = batches.len().min(rso_batches.len());
        assert!(n > 100, "{name}: {n} steps");
        assert_eq!(batches[..n], rso_batches[..n], "{name}");
    }
    // CFD with k = 1 visits every coordinate once, on the minibatches of RSO's visits (with
    // k > 1, a block takes the minibatch of the visit of the same number).
    let mut net = Logged::new(network(3));
    round(&mut cfd(1, 0.05, RsoEval::Incremental), &mut net, 1);
    assert_eq!(net.batches(1), rso_batches);
}

#[test]
fn es_never_keeps_a_worse_candidate_on_its_minibatch() {
    let mut net = Logged::new(network(4));
    let mut opt = es(0.05);
    let stats = round(&mut opt, &mut net, 0);
    let log = &net.log;
    let (mut kept, mut i) = (0, 0);
    while i < log.len() {
        // parent loss, child weights, child loss, then the parent's weights back unless kept.
        let Event::BatchLoss(ref parent_batch, parent) = log[i] else {
            panic!("step at {i} does not start with the parent's loss")
        };
        let Event::BatchLoss(ref child_batch, child) = log[i + 2] else {
            panic!("no child loss at {}", i + 2)
        };
        assert_eq!(parent_batch, child_batch, "step at {i}: two minibatches");
        let restored = matches!(log.get(i + 3), Some(Event::SetParams(_)));
        assert_eq!(
            restored,
            child >= parent,
            "step at {i}: {child} vs {parent}"
        );
        kept += usize::from(!restored);
        i += if restored { 4 } else { 3 };
    }
    assert_eq!(kept, stats.accepted);
    assert!(kept > 0 && kept < stats.steps, "{kept} of {}", stats.steps);
}

#[test]
fn spsas_direction_regenerated_from_its_seed_is_the_one_used() {
    let mut net = Logged::new(network(5));
    let w = net.params();
    let mut opt = spsa(0.05, 1);
    round(&mut opt, &mut net, 2);
    let Event::SetParams(plus) = &net.log[0] else {
        panic!("first call is not W + εz")
    };
    let Event::BatchLoss(_, l_plus) = net.log[1] else {
        panic!()
    };
    let Event::SetParams(minus) = &net.log[2] else {
        panic!("third call is not W − εz")
    };
    let Event::BatchLoss(_, l_minus) = net.log[3] else {
        panic!()
    };
    let Event::SetParams(next) = &net.log[4] else {
        panic!("fifth call is not the step")
    };
    let with = |scale: f32| {
        let mut p = w.clone();
        add_direction(&mut p, scale, Direction::Gaussian, step_rng(5, 2, 0, 0));
        p.values
    };
    assert_eq!(plus.values, with(1e-3));
    assert_eq!(minus.values, with(-1e-3));
    let g = (l_plus - l_minus) / 2e-3;
    assert_eq!(next.values, with((-f64::from(0.05f32) * g) as f32));
    assert_ne!(next.values, w.values);
}

#[test]
fn a_zero_step_changes_nothing() {
    let zero: Vec<(&str, Box<dyn Optimizer>)> = vec![
        ("spsa", Box::new(spsa(0.0, 2))),
        ("cfd", Box::new(cfd(3, 0.0, RsoEval::Incremental))),
        // σ so small that w + σz rounds back to w: the child's loss ties, W stays.
        ("es", Box::new(es(1e-30))),
    ];
    for (name, mut opt) in zero {
        let mut net = network(6);
        let before = net.params();
        let stats = round(opt.as_mut(), &mut net, 0);
        assert_eq!(net.params().values, before.values, "{name}");
        assert_eq!(stats.accepted, 0, "{name}");
    }
}

#[test]
fn non_finite_losses_are_never_taken() {
    // Every loss away from the initial weights is NaN: ES and CFD keep W all round; SPSA, which
    // sees only W ± εz, calls that divergence, with W as it was.
    for (name, mut opt) in methods() {
        let mut net = Logged::poisoned(network(7));
        let before = net.params();
        let result = opt.run_round(&mut net, 0, None, &mut |_| {});
        assert_eq!(net.params().values, before.values, "{name}");
        match result {
            Ok(stats) => assert!(name != "spsa" && stats.accepted == 0, "{name}: {stats:?}"),
            Err(e) => assert!(
                name == "spsa" && matches!(e, OptimError::StepDiverged { step: 0, .. }),
                "{name}: {e}"
            ),
        }
    }
}

#[test]
fn a_budget_stops_every_optimizer_before_it_is_exceeded() {
    let mut all = methods();
    all.push(("rso", Box::new(rso())));
    all.push(("sgd", Box::new(sgd())));
    for (name, mut opt) in all {
        let mut net = network(8);
        // Below SGD's epoch on 40 samples (3·40) and many steps of the others.
        let budget = 100;
        let stats = opt
            .run_round(&mut net, 0, Some(budget), &mut |_| {})
            .expect("round");
        assert!(stats.budget_reached, "{name}");
        assert!(stats.forward_equivalents <= budget, "{name}");
        // The next step (at most 3·k·B, CFD's block) would not have fitted.
        assert!(
            stats.forward_equivalents + 9 * BATCH as u64 > budget,
            "{name}"
        );
        let free = opt.run_round(&mut net, 1, None, &mut |_| {}).unwrap();
        assert!(!free.budget_reached, "{name}");
    }
    // A budget of exactly four RSO visits (every minibatch of 40 samples holds 8): all four are
    // taken, the fifth is not.
    let stats = rso()
        .run_round(&mut network(8), 0, Some(4 * 3 * BATCH as u64), &mut |_| {})
        .unwrap();
    assert_eq!((stats.steps, stats.forward_equivalents), (4, 96));
    assert!(stats.budget_reached);
}

#[test]
fn es_resumed_from_its_state_continues_exactly() {
    let (mut a, mut b) = (network(9), network(9));
    let mut whole = es(0.05);
    for r in 0..2 {
        round(&mut whole, &mut a, r);
    }
    let mut first = es(0.05);
    round(&mut first, &mut b, 0);
    let state = first.state();
    assert_eq!(
        state.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["sigma", "successes", "trials"]
    );
    let mut resumed = es(0.05);
    resumed.restore_state(&state).unwrap();
    round(&mut resumed, &mut b, 1);
    assert_eq!(a.params().values, b.params().values);
    assert_eq!(whole.state(), resumed.state());
    // σ moved from its initial value (the 1/5 rule acted), and a fresh ES would differ.
    assert_ne!(whole.sigma(), 0.05);
}

#[test]
fn bad_state_and_settings_are_refused() {
    let mut e = es(0.05);
    let s = |k: &str, v: &str| (k.to_string(), v.to_string());
    for bad in [
        vec![s("sigma", "0.1"), s("successes", "0")],
        vec![s("sigma", "x"), s("successes", "0"), s("trials", "0")],
        vec![s("sigma", "-1"), s("successes", "0"), s("trials", "0")],
        vec![s("sigma", "0.1"), s("successes", "3"), s("trials", "2")],
        vec![
            s("sigma", "0.1"),
            s("successes", "0"),
            s("trials", "0"),
            s("mu", "1"),
        ],
    ] {
        assert!(
            matches!(e.restore_state(&bad), Err(OptimError::State(_))),
            "{bad:?}"
        );
    }
    assert!(spsa(0.0, 1).restore_state(&[s("sigma", "1")]).is_err());
    assert!(Es::new(EsConfig {
        sigma: f64::INFINITY,
        ..EsConfig {
            sigma: 1.0,
            batch_size: 1,
            batch_policy: BatchPolicy::Random,
            reduction: Reduction::Mean,
            seed: 0
        }
    })
    .is_err());
    let mut c = SpsaConfig {
        eps: 0.0,
        lr: 0.1,
        directions: 1,
        dist: Direction::Rademacher,
        batch_size: 1,
        batch_policy: BatchPolicy::Random,
        reduction: Reduction::Mean,
        seed: 0,
    };
    assert!(Spsa::new(c.clone()).is_err());
    c.eps = 1e-3;
    c.directions = 0;
    assert!(Spsa::new(c).is_err());
}

#[test]
fn cfd_on_the_incremental_path_follows_the_reference_path() {
    let (mut a, mut b) = (network(10), network(10));
    round(&mut cfd(2, 0.05, RsoEval::Incremental), &mut a, 0);
    round(&mut cfd(2, 0.05, RsoEval::Reference), &mut b, 0);
    // The paths' losses differ in the last bits, so the central differences do by ≈ 1e-7 / μ.
    let tol = Tol {
        rtol: 1e-4,
        atol: 1e-4,
    };
    let (a, b) = (a.params(), b.params());
    for ((x, y), s) in a.values.iter().zip(&b.values).zip(&a.specs) {
        tol.assert_close(&s.name, x, &wide(y));
    }
    assert_ne!(a.values, network(10).params().values);
}

#[test]
fn no_method_keeps_a_weight_that_is_not_finite() {
    // Weights next to f32::MAX, steps at the largest size allowed, and a loss that rewards a
    // weight that overflowed: every optimizer is offered infinite weights and keeps none.
    let mut big_rso = RsoConfig::preset(Preset::Seed, 3, BATCH, 5);
    big_rso.sigma = SigmaRule::Fixed(SIGMA_MAX);
    let big_spsa = SpsaConfig {
        eps: SIGMA_MAX as f32,
        lr: 1e-3,
        directions: 1,
        dist: Direction::Gaussian,
        batch_size: BATCH,
        batch_policy: BatchPolicy::Random,
        reduction: Reduction::Mean,
        seed: 5,
    };
    let big_cfd = CfdConfig {
        preset: Preset::Seed,
        block: 1,
        mu: SIGMA_MAX as f32,
        lr: 1.0,
        batch_size: BATCH,
        batch_policy: BatchPolicy::Random,
        reduction: Reduction::Mean,
        eval: RsoEval::Incremental,
        seed: 5,
    };
    let big: Vec<(&str, Box<dyn Optimizer>)> = vec![
        ("rso", Box::new(Rso::new(&spec(), big_rso).unwrap())),
        ("spsa", Box::new(Spsa::new(big_spsa).unwrap())),
        ("es", Box::new(es(SIGMA_MAX))),
        ("cfd", Box::new(Cfd::new(&spec(), big_cfd).unwrap())),
    ];
    for (name, mut opt) in big {
        let mut net = Logged::luring(network(11));
        let _ = opt.run_round(&mut net, 0, None, &mut |_| {});
        // (ES checks a child before it evaluates it, so it is never even offered one.)
        assert!(name == "es" || net.lured > 0, "{name}: no step overflowed");
        let p = net.params();
        assert!(
            p.values.iter().flatten().all(|w| w.is_finite()),
            "{name} kept a weight that is not finite"
        );
    }
}
