//! Fixtures shared by the criterion benches in `benches/`: data, networks and optimizers set up
//! the way `rso train` sets them up.

use rand::Rng;
use rso_data::Split;
use rso_models::network::reference_candidate_losses;
use rso_models::{init_params, ModelKind, Network, Preset};
use rso_optim::{choose, Batches, Choice, Rso, RsoEval};
use rso_testkit::{rng, Labels, RandomData};
use std::path::Path;
use std::time::{Duration, Instant};

/// MNIST (normalised for `preset`, cut to `train` and `test` samples) when the fetched files
/// are there (`RSO_DATA_DIR`, else `data/mnist` of the checkout); otherwise random images of
/// MNIST's shape, so the benches run anywhere (timings do not depend on pixel values).
pub fn mnist_or_synthetic(preset: Preset, train: usize, test: usize) -> Split {
    let dir = std::env::var_os("RSO_DATA_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist"),
        std::path::PathBuf::from,
    );
    if let Ok(mut split) = rso_data::load_mnist(&dir, preset.normalization()) {
        split.train.truncate(train);
        split.test.truncate(test);
        return split;
    }
    eprintln!("bench: {} not found, using random images", dir.display());
    RandomData::mnist()
        .labels(Labels::Cyclic)
        .split(train, test, &mut rng(5))
}

/// The first `⌈fraction·N⌉` training samples of `split` (at least `min`), for
/// [`extrapolated_round`].
pub fn scaled_split(split: &Split, fraction: f64, min: usize) -> Split {
    let mut s = split.clone();
    let n = ((fraction * s.train.len() as f64).ceil() as usize).max(min);
    s.train.truncate(n);
    s
}

/// A pure-Rust network of `model` initialised by `preset` from seed 0.
pub fn cpu_network(model: ModelKind, preset: Preset, split: Split) -> rso_cpu::CpuNetwork {
    let spec = model.mnist();
    let params = init_params(&spec, preset.init(), &mut rso_optim::setup_rng(0, 0));
    rso_cpu::CpuNetwork::new(&spec, &params, split).expect("bench network")
}

/// A libtorch network of `model` on `device` initialised by `preset` from seed 0 (the same
/// weights as [`cpu_network`]).
#[cfg(feature = "tch")]
pub fn tch_network(
    model: ModelKind,
    preset: Preset,
    split: &Split,
    device: &str,
) -> rso_tch::TchNetwork {
    let spec = model.mnist();
    let params = init_params(&spec, preset.init(), &mut rso_optim::setup_rng(0, 0));
    rso_tch::TchNetwork::new(&spec, &params, split, device)
        .unwrap_or_else(|e| panic!("bench network on {device}: {e}"))
}

/// The time of one RSO round of `rso`, estimated from a round scaled down by `fraction`: `net`
/// should hold `fraction` of the training set (see [`scaled_split`]), and the first
/// `⌈fraction·len⌉` scalars of every array are visited in RSO's order (`begin_sweep`, then in
/// order; batches as `rso`'s policy draws them — random batches of a shuffled partition of
/// that training set, or consecutive windows of a shuffle made per layer's sweep; Δ ~ N(0, σ);
/// the argmin accepted), each array's time scaled by `len / visited`. Scaling the training set with the
/// visits keeps what the incremental path's costs depend on in proportion: work per training
/// sample (forward passes of the training set, folds) and how often a batch recurs within a
/// sweep (the paper model's per-batch memo); the reference path's cost does not depend on the
/// training set. For rounds too long to time whole (minutes).
/// `sync` waits for the device (libtorch on CUDA) and is called inside each timed region.
pub fn extrapolated_round<N: Network + ?Sized>(
    net: &mut N,
    rso: &Rso,
    fraction: f64,
    seed: u64,
    sync: impl Fn(&N),
) -> Duration {
    let mut rng = rng(seed);
    let n = net.train_len();
    let batch = rso.config().batch_size.min(n);
    let reduction = rso.config().reduction;
    let mut batches = Batches::new(rso.config().batch_policy, batch, n, &mut rng);
    let mut group = usize::MAX;
    let lens: Vec<usize> = net.spec().params().iter().map(|p| p.len()).collect();
    let mut total = 0.0;
    for step in rso.schedule() {
        if step.group != group {
            group = step.group;
            batches.start_group(&mut rng);
        }
        let len = lens[step.param];
        let visits = ((fraction * len as f64).ceil() as usize).clamp(1, len);
        let t = Instant::now();
        net.begin_sweep(step.param);
        for index in 0..visits {
            let b = batches.next(&mut rng);
            // Δ ~ N(0, σ) by Box–Muller (timings do not depend on the exact draws).
            let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
            let delta =
                (step.sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
            let w = net.weight(step.param, index);
            let losses = match rso.config().eval {
                RsoEval::Reference => {
                    reference_candidate_losses(net, b, step.param, index, delta, reduction)
                }
                RsoEval::Incremental => {
                    net.candidate_losses(b, step.param, index, delta, reduction)
                }
            };
            match choose(losses) {
                Choice::Keep => {}
                Choice::Plus => net.set_weight(step.param, index, w + delta),
                Choice::Minus => net.set_weight(step.param, index, w - delta),
            }
        }
        sync(net);
        total += t.elapsed().as_secs_f64() * len as f64 / visits as f64;
    }
    Duration::from_secs_f64(total)
}
