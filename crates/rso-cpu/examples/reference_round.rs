//! Times the reference RSO step (`candidate_losses`: three full forward passes) on random
//! MNIST-shaped data and extrapolates one reference round (one step per weight).
//!
//! `cargo run --release -p rso-cpu --example reference_round [model:batch ...]`, e.g.
//! `one-conv:32 paper:256`; without arguments it runs the configurations of DESIGN §6.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rso_cpu::CpuNetwork;
use rso_data::{Dataset, Split};
use rso_models::{init_params, Init, ModelKind, Network, Reduction};
use std::time::{Duration, Instant};

fn random_set(n: usize, rng: &mut ChaCha8Rng) -> Dataset {
    Dataset {
        images: (0..n * 784).map(|_| rng.random::<f32>()).collect(),
        labels: (0..n).map(|_| rng.random_range(0..10u8)).collect(),
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let configs: Vec<(ModelKind, usize)> = if args.is_empty() {
        vec![
            (ModelKind::OneConv, 32),
            (ModelKind::OneConv, 1024),
            (ModelKind::TwoConv, 32),
            (ModelKind::Paper, 256),
        ]
    } else {
        args.iter()
            .map(|a| {
                let (m, b) = a.split_once(':').ok_or("expected model:batch")?;
                Ok((
                    m.parse::<ModelKind>()?,
                    b.parse::<usize>().map_err(|e| e.to_string())?,
                ))
            })
            .collect::<Result<_, String>>()?
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let train_len = 4096;
    println!("threads: {}", rayon::current_num_threads());
    for (kind, b) in configs {
        let spec = kind.mnist();
        let params = init_params(&spec, Init::He, &mut rng);
        let split = Split {
            train: random_set(train_len, &mut rng),
            test: random_set(16, &mut rng),
        };
        let mut net = CpuNetwork::new(&spec, &params, split)?;
        let weights = spec.param_count();
        let arrays = params.values.len();
        // A new random minibatch for every step, as the `seed` preset does, and weights drawn
        // from every array.
        let mut step = |rng: &mut ChaCha8Rng| {
            let batch: Vec<u32> = (0..b)
                .map(|_| rng.random_range(0..train_len as u32))
                .collect();
            let param = rng.random_range(0..arrays);
            let index = rng.random_range(0..params.values[param].len());
            let t = Instant::now();
            std::hint::black_box(net.candidate_losses(&batch, param, index, 0.01, Reduction::Mean));
            t.elapsed()
        };
        for _ in 0..3 {
            step(&mut rng);
        }
        let budget = Duration::from_secs(4);
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 10 || (start.elapsed() < budget && times.len() < 2000) {
            times.push(step(&mut rng));
        }
        times.sort();
        let median = times[times.len() / 2].as_secs_f64();
        let min = times[0].as_secs_f64();
        println!(
            "{:>8} B={:<5} candidate_losses: median {:>9.3} ms (min {:>9.3} ms, {} calls) → reference round ≈ {:>8.1} s ({} weights)",
            spec.name,
            b,
            median * 1e3,
            min * 1e3,
            times.len(),
            median * weights as f64,
            weights
        );
    }
    Ok(())
}
