//! Fixtures shared by the criterion benches in `benches/`: data, networks and optimizers set up
//! the way `rso train` sets them up.

use rand::{Rng, SeedableRng};
use rso_data::{Dataset, Split};
use rso_models::{init_params, ModelKind, Preset};
use std::path::Path;

/// MNIST (normalised for `preset`, cut to `train` and `test` samples) when the fetched files
/// are there; otherwise random images of MNIST's shape, so the benches run anywhere (timings
/// do not depend on pixel values).
pub fn mnist_or_synthetic(preset: Preset, train: usize, test: usize) -> Split {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    if let Ok(mut split) = rso_data::load_mnist(&dir, preset.normalization()) {
        split.train.truncate(train);
        split.test.truncate(test);
        return split;
    }
    eprintln!("bench: {} not found, using random images", dir.display());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut set = |n: usize| Dataset {
        images: (0..n * 784).map(|_| rng.random::<f32>()).collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    Split { train: set(train), test: set(test) }
}

/// A pure-Rust network of `model` initialised by `preset` from seed 0.
pub fn cpu_network(model: ModelKind, preset: Preset, split: Split) -> rso_cpu::CpuNetwork {
    let spec = model.mnist();
    let params = init_params(&spec, preset.init(), &mut rso_optim::setup_rng(0, 0));
    rso_cpu::CpuNetwork::new(&spec, &params, split).expect("bench network")
}
