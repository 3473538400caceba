//! The incremental RSO path of the CPU backend (`CpuNetwork::candidate_losses`) against the
//! reference path (`reference_candidate_losses`, three full forward passes): the same three
//! losses within [`Tol::losses`] for random models, weights, batches and both reductions — also after
//! accepted changes, weight decay, `set_params` and sweeps in RSO's order — and a seeded RSO
//! round that takes the same decisions on both paths.

use proptest::prelude::*;
use proptest::test_runner::Config;
use rand::Rng;
use rso_cpu::CpuNetwork;
use rso_models::network::reference_candidate_losses;
use rso_models::{ModelKind, ModelSpec, Network, Params, Preset, Reduction};
use rso_optim::{choose, BatchPolicy, Cfd, CfdConfig, Optimizer, Rso, RsoConfig, RsoEval};
use rso_testkit::{
    check_visit, proptest_config, random_batch, random_batch_up_to, random_params, rng, slim_paper,
    Pixels, RandomData, Recorder, Tol, Weights,
};

/// A fixed-seed proptest configuration with `cases` cases and no shrinking.
fn config(cases: u32) -> Config {
    Config {
        max_shrink_iters: 0,
        ..proptest_config(cases, 0x1_2c_4e)
    }
}

/// A network of `kind` on `size × size` images with `classes` classes and `n` random training
/// samples, and its parameters.
fn network(
    kind: ModelKind,
    size: usize,
    classes: usize,
    n: usize,
    preset: Preset,
    seed: u64,
) -> (CpuNetwork, Params) {
    network_of(&kind.spec(1, size, classes), n, preset, seed)
}

/// [`network`] for any spec: pixels uniform in `[lo, lo + 1)` (`lo` −0.15 for the paper preset,
/// roughly centred as its normalisation does, else 0), parameters initialised as `preset` does
/// with biases, β and γ moved (so that every array matters).
fn network_of(spec: &ModelSpec, n: usize, preset: Preset, seed: u64) -> (CpuNetwork, Params) {
    let mut rng = rng(seed);
    let lo = if preset == Preset::Paper { -0.15 } else { 0.0 };
    let split = RandomData::of(spec)
        .pixels(Pixels::Uniform { lo })
        .split(n, 4, &mut rng);
    let params = random_params(spec, Weights::Init(preset.init()), &mut rng);
    let net = CpuNetwork::new(spec, &params, split).expect("valid network");
    (net, params)
}

/// [`rso_testkit::exercise`] on a random network of `kind`: random RSO visits, every one
/// checked against the reference.
fn exercise(
    kind: ModelKind,
    size: usize,
    classes: usize,
    seed: u64,
    sum: bool,
    paper_init: bool,
    steps: usize,
) {
    let preset = if paper_init {
        Preset::Paper
    } else {
        Preset::Seed
    };
    let (mut net, _) = network(kind, size, classes, 48, preset, seed);
    let reduction = if sum { Reduction::Sum } else { Reduction::Mean };
    let what = format!("{} {size}x{size} seed {seed} {reduction:?}", kind.name());
    rso_testkit::exercise(&mut net, seed, steps, reduction, &what);
}

proptest! {
    #![proptest_config(config(10))]

    #[test]
    fn one_conv_incremental_losses_match_the_reference(
        seed in any::<u64>(), sum in any::<bool>(), paper_init in any::<bool>(),
        size in prop::sample::select(vec![4usize, 8, 12]), classes in 2usize..=10,
    ) {
        exercise(ModelKind::OneConv, size, classes, seed, sum, paper_init, 80);
    }

    #[test]
    fn two_conv_incremental_losses_match_the_reference(
        seed in any::<u64>(), sum in any::<bool>(), paper_init in any::<bool>(),
        size in prop::sample::select(vec![4usize, 8, 12]), classes in 2usize..=10,
    ) {
        exercise(ModelKind::TwoConv, size, classes, seed, sum, paper_init, 80);
    }

    #[test]
    fn paper_incremental_losses_match_the_reference(
        seed in any::<u64>(), sum in any::<bool>(), paper_init in any::<bool>(),
        size in prop::sample::select(vec![4usize, 8]), classes in 2usize..=10,
    ) {
        exercise(ModelKind::Paper, size, classes, seed, sum, paper_init, 60);
    }
}

/// The models' real shapes (28×28, 10 classes), a few visits of every array.
#[test]
fn mnist_shapes_match_the_reference() {
    for (s, kind) in ModelKind::ALL.into_iter().enumerate() {
        // The paper model's forward pass is 3 MFLOP per image: fewer, smaller batches.
        let (n, visits) = if kind == ModelKind::Paper {
            (12, 1)
        } else {
            (40, 3)
        };
        for (preset, reduction) in [
            (Preset::Seed, Reduction::Mean),
            (Preset::Paper, Reduction::Sum),
        ] {
            let (mut net, _) = network(kind, 28, 10, n, preset, 70 + s as u64);
            let mut rng = rng(5 + s as u64);
            let lens: Vec<usize> = net.spec().params().iter().map(|p| p.len()).collect();
            // Last array first, as RSO visits them.
            for param in (0..lens.len()).rev() {
                net.begin_sweep(param);
                for _ in 0..visits {
                    let index = rng.random_range(0..lens[param]);
                    let batch = random_batch_up_to(&mut rng, n, n);
                    let delta = rng.random_range(-0.3f32..0.3);
                    let what = format!("{} 28x28 {preset:?}", kind.name());
                    let losses =
                        check_visit(&mut net, &batch, param, index, delta, reduction, &what);
                    if losses[1] < losses[0] {
                        let w = net.weight(param, index);
                        net.set_weight(param, index, w + delta);
                    }
                }
            }
        }
    }
}

/// Batches that recur, as preset `seed` draws them (the paper model's per-batch memo of the
/// visited layer's input, output and next convolution's output, and of the previous
/// convolution's input for the next sweep): sweeps of every array, last to first, with batches
/// drawn from a fixed partition, accepted changes between the visits and — in the second
/// pass — a change of the first layer between sweeps, against the reference path.
#[test]
fn recurring_batches_match_the_reference() {
    for (spec, n, touch_first) in [
        (slim_paper(8, 10, 4), 48, false),
        (ModelKind::Paper.spec(1, 8, 10), 24, false),
        (ModelKind::Paper.spec(1, 8, 10), 24, true),
    ] {
        let (mut net, _) = network_of(&spec, n, Preset::Seed, 41);
        let mut rng = rng(42);
        let order: Vec<u32> = {
            let mut o: Vec<u32> = (0..n as u32).collect();
            for i in (1..o.len()).rev() {
                o.swap(i, rng.random_range(0..=i));
            }
            o
        };
        let batches: Vec<&[u32]> = order.chunks(8).collect();
        let lens: Vec<usize> = net.spec().params().iter().map(|p| p.len()).collect();
        for param in (0..lens.len()).rev() {
            net.begin_sweep(param);
            for index in 0..lens[param].min(24) {
                let batch = batches[rng.random_range(0..batches.len())];
                let delta = rng.random_range(-0.4f32..0.4);
                let what = format!("{} recurring", spec.name);
                let losses =
                    check_visit(&mut net, batch, param, index, delta, Reduction::Sum, &what);
                let w = net.weight(param, index);
                match choose(losses) {
                    rso_optim::Choice::Keep => {}
                    rso_optim::Choice::Plus => net.set_weight(param, index, w + delta),
                    rso_optim::Choice::Minus => net.set_weight(param, index, w - delta),
                }
            }
            if touch_first {
                // What the memo kept for the next sweep no longer holds.
                let w = net.weight(0, param % lens[0]);
                net.set_weight(0, param % lens[0], w + 0.05);
            }
        }
    }
}

/// A candidate that changes nothing for the batch ties with W exactly on both paths (RSO then
/// keeps W): here a dense weight whose input feature is zero for every sample, and a zero Δ.
#[test]
fn candidates_that_change_nothing_tie_exactly() {
    for kind in ModelKind::ALL {
        let (mut net, _) = network(kind, 8, 10, 32, Preset::Seed, 3);
        let batch: Vec<u32> = (0..32).collect();
        let params = net.spec().params();
        for (p, spec) in params.iter().enumerate() {
            let inc = net.candidate_losses(&batch, p, spec.len() / 2, 0.0, Reduction::Mean);
            assert_eq!(
                inc[0].to_bits(),
                inc[1].to_bits(),
                "{} {}",
                kind.name(),
                spec.name
            );
            assert_eq!(
                inc[0].to_bits(),
                inc[2].to_bits(),
                "{} {}",
                kind.name(),
                spec.name
            );
        }
    }
    // one-conv with a conv bias so negative that every feature is 0 after the ReLU: every dense
    // weight's candidates tie with W.
    let (mut net, mut params) = network(ModelKind::OneConv, 8, 10, 32, Preset::Seed, 4);
    params.values[1].iter_mut().for_each(|b| *b = -100.0);
    net.set_params(&params).unwrap();
    let batch: Vec<u32> = (0..32).collect();
    for index in [0, 5, 17, 63] {
        let inc = net.candidate_losses(&batch, 2, index, 0.7, Reduction::Mean);
        let reference =
            reference_candidate_losses(&mut net, &batch, 2, index, 0.7, Reduction::Mean);
        assert_eq!(reference[0], reference[1]);
        assert_eq!(inc[0].to_bits(), inc[1].to_bits());
        assert_eq!(inc[0].to_bits(), inc[2].to_bits());
    }
}

/// The incremental losses do not depend on the number of threads (bit for bit), on batches
/// large enough for the paths to split their work.
#[test]
fn incremental_losses_do_not_depend_on_the_thread_count() {
    let run = |threads: usize, kind: ModelKind, n: usize, b: usize, per_array: usize| -> Vec<u64> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            let (mut net, _) = network(kind, 28, 10, n, Preset::Seed, 11);
            let mut rng = rng(12);
            let lens: Vec<usize> = net.spec().params().iter().map(|p| p.len()).collect();
            let mut out = Vec::new();
            for param in (0..lens.len()).rev() {
                net.begin_sweep(param);
                for index in 0..per_array.min(lens[param]) {
                    let batch = random_batch(&mut rng, n, b);
                    let delta = rng.random_range(-0.3f32..0.3);
                    let l = net.candidate_losses(&batch, param, index, delta, Reduction::Mean);
                    out.extend(l.map(f64::to_bits));
                    if l[2] < l[0] {
                        let w = net.weight(param, index);
                        net.set_weight(param, index, w - delta);
                    }
                }
            }
            out
        })
    };
    for (kind, n, b, per_array) in [
        (ModelKind::OneConv, 600, 300, 4),
        (ModelKind::TwoConv, 300, 150, 3),
        (ModelKind::Paper, 48, 40, 1),
    ] {
        assert_eq!(
            run(1, kind, n, b, per_array),
            run(2, kind, n, b, per_array),
            "{}",
            kind.name()
        );
    }
}

/// One seeded RSO round through `rso_optim::Rso` on two identical networks, one with
/// `RsoEval::Reference` and one with `RsoEval::Incremental`: the same decisions (except at
/// near-ties, after which the two runs may part) and, when no decision differed, the same
/// weights bit for bit.
fn same_round(spec: &ModelSpec, preset: Preset, batch: usize, seed: u64) {
    let n = 64;
    let mut nets = [RsoEval::Reference, RsoEval::Incremental]
        .map(|_| Recorder::new(network_of(spec, n, preset, seed).0));
    for (net, eval) in nets
        .iter_mut()
        .zip([RsoEval::Reference, RsoEval::Incremental])
    {
        let mut cfg = RsoConfig::preset(preset, 3, batch, seed);
        cfg.eval = eval;
        let mut rso = Rso::new(net.spec(), cfg).expect("config");
        // Round 1 of 3 (σ annealed for the paper preset).
        let t = std::time::Instant::now();
        let stats = rso.run_round(net, 1, None, &mut |_| {}).expect("round");
        // The work counted is the reference path's forward passes, whichever path ran.
        let forwarded = match eval {
            RsoEval::Reference => net.batch_loss_samples,
            RsoEval::Incremental => 3 * net.candidate_samples,
        };
        assert_eq!(stats.forward_equivalents, forwarded, "{}", spec.name);
        eprintln!(
            "{} {preset:?} {eval:?}: {:.3} s",
            spec.name,
            t.elapsed().as_secs_f64()
        );
    }
    let [reference, incremental] = nets;
    let ref_visits = reference.reference_visits();
    assert_eq!(ref_visits.len(), incremental.visits.len());
    assert_eq!(ref_visits.len(), reference.net.spec().param_count());
    let (mut accepted, mut parted) = (0, None);
    for (v, (r, i)) in ref_visits.iter().zip(&incremental.visits).enumerate() {
        let (cr, ci) = (choose(*r) as usize, choose(*i) as usize);
        if cr != ci {
            assert!(
                Tol::NEAR_TIE.close(r[cr], r[ci]),
                "{} {preset:?}: visit {v} decided differently and not at a near-tie: reference {r:?}, incremental {i:?}",
                spec.name
            );
            parted = Some(v);
            break;
        }
        Tol::losses(batch, preset_reduction(preset)).assert_close(
            &format!("{} visit {v}", spec.name),
            i,
            r,
        );
        accepted += usize::from(cr != 0);
    }
    match parted {
        None => assert_eq!(
            reference.net.params().values,
            incremental.net.params().values,
            "{}: same decisions, different weights",
            spec.name
        ),
        Some(v) => eprintln!(
            "{} {preset:?}: runs parted at a near-tie at visit {v} of {}",
            spec.name,
            ref_visits.len()
        ),
    }
    assert!(accepted > 0, "{}: nothing accepted", spec.name);
}

/// A round computes the same losses, bit for bit, whether the network ran earlier rounds or was
/// just given the weights they left (what resuming from a checkpoint relies on): the caches of
/// the incremental path do not carry rounding from one round into the next.
fn history_independent(spec: &ModelSpec, preset: Preset, batch: usize, seed: u64) {
    let mut cfg = RsoConfig::preset(preset, 3, batch, seed);
    cfg.eval = RsoEval::Incremental;
    let mut rso = Rso::new(spec, cfg).expect("config");
    let (mut first, _) = network_of(spec, 64, preset, seed);
    rso.run_round(&mut first, 0, None, &mut |_| {})
        .expect("round 0");
    let (mut fresh, _) = network_of(spec, 64, preset, seed);
    fresh.set_params(&first.params()).expect("same layout");
    let mut runs = [first, fresh].map(Recorder::new);
    for r in runs.iter_mut() {
        rso.run_round(r, 1, None, &mut |_| {}).expect("round 1");
    }
    let [a, b] = runs;
    let bits =
        |v: &[[f64; 3]]| -> Vec<[u64; 3]> { v.iter().map(|l| l.map(f64::to_bits)).collect() };
    assert_eq!(
        bits(&a.visits),
        bits(&b.visits),
        "{}: round 1 losses differ",
        spec.name
    );
    assert_eq!(
        a.net.params().values,
        b.net.params().values,
        "{}",
        spec.name
    );
}

#[test]
fn a_round_does_not_depend_on_earlier_rounds() {
    history_independent(&ModelKind::OneConv.spec(1, 12, 10), Preset::Seed, 16, 31);
    history_independent(&ModelKind::TwoConv.spec(1, 4, 10), Preset::Paper, 8, 32);
    history_independent(&slim_paper(8, 10, 4), Preset::Seed, 16, 33);
}

fn preset_reduction(preset: Preset) -> Reduction {
    match preset {
        Preset::Seed => Reduction::Mean,
        Preset::Paper => Reduction::Sum,
    }
}

#[test]
fn an_rso_round_decides_the_same_on_both_paths_one_conv() {
    let spec = ModelKind::OneConv.spec(1, 12, 10);
    same_round(&spec, Preset::Seed, 16, 21);
    same_round(&spec, Preset::Paper, 16, 22);
}

#[test]
fn an_rso_round_decides_the_same_on_both_paths_two_conv() {
    let spec = ModelKind::TwoConv.spec(1, 4, 10);
    same_round(&spec, Preset::Seed, 8, 23);
    same_round(&spec, Preset::Paper, 8, 24);
}

/// The paper model's layers with 4 channels (a full-width round is 12 016 visits).
#[test]
fn an_rso_round_decides_the_same_on_both_paths_paper() {
    let spec = slim_paper(8, 10, 4);
    same_round(&spec, Preset::Seed, 16, 25);
    same_round(&spec, Preset::Paper, 16, 26);
}

/// CFD visits each array's scalars in a random order and changes every one it visits, unlike
/// RSO, whose order the caches' fold rule and row constants are tuned for (a folded channel, a
/// logit row, would be stale at the next visit): every visit's losses still match the reference.
#[test]
fn a_cfd_round_in_shuffled_order_matches_the_reference_at_every_visit() {
    for (spec, seed) in [
        (ModelKind::OneConv.spec(1, 12, 10), 41),
        (ModelKind::TwoConv.spec(1, 8, 10), 42),
    ] {
        let mut net = Recorder::checked(network_of(&spec, 160, Preset::Seed, seed).0);
        let mut cfd = Cfd::new(
            &spec,
            CfdConfig {
                preset: Preset::Seed,
                block: 1,
                mu: 1e-2,
                lr: 0.5,
                batch_size: 16,
                batch_policy: BatchPolicy::Random,
                reduction: Reduction::Mean,
                eval: RsoEval::Incremental,
                seed,
            },
        )
        .expect("config");
        let stats = cfd
            .run_round(&mut net, 0, None, &mut |_| {})
            .expect("round");
        assert_eq!(net.visits.len(), spec.param_count(), "{}", spec.name);
        assert!(
            stats.accepted > spec.param_count() / 2,
            "{}: {stats:?}",
            spec.name
        );
    }
}
