//! Times the reference RSO step ([`reference_candidate_losses`]: three full forward passes) on
//! random MNIST-shaped data and extrapolates one reference round (one step per weight).
//!
//! Reports the median and 10th percentile of the wall time per step and, on Linux, the
//! process CPU time per step (with one rayon thread, `RAYON_NUM_THREADS=1`, that is the step's
//! cost without the time other processes took the core away).
//!
//! `cargo run --release -p rso-cpu --example reference_round [model:batch ...]`, e.g.
//! `one-conv:32 paper:256`; without arguments it runs the configurations of DESIGN §6.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rso_cpu::CpuNetwork;
use rso_models::network::reference_candidate_losses;
use rso_models::{init_params, Init, ModelKind, Reduction};
use rso_testkit::{random_batch, rng, RandomData};
use std::time::{Duration, Instant};

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
    let mut rng = rng(7);
    let train_len = 4096;
    println!("threads: {}", rayon::current_num_threads());
    for (kind, b) in configs {
        let spec = kind.mnist();
        let params = init_params(&spec, Init::He, &mut rng);
        let split = RandomData::mnist().split(train_len, 16, &mut rng);
        let mut net = CpuNetwork::new(&spec, &params, split)?;
        let weights = spec.param_count();
        let arrays = params.values.len();
        // A new random minibatch for every step, as the `seed` preset does, and weights drawn
        // from every array.
        let mut step = |rng: &mut ChaCha8Rng| {
            let batch = random_batch(rng, train_len, b);
            let param = rng.random_range(0..arrays);
            let index = rng.random_range(0..params.values[param].len());
            let t = Instant::now();
            std::hint::black_box(reference_candidate_losses(
                &mut net,
                &batch,
                param,
                index,
                0.01,
                Reduction::Mean,
            ));
            t.elapsed()
        };
        for _ in 0..3 {
            step(&mut rng);
        }
        let budget = Duration::from_secs(4);
        let mut times = Vec::new();
        let start = Instant::now();
        let cpu_start = cpu_seconds();
        while times.len() < 10 || (start.elapsed() < budget && times.len() < 2000) {
            times.push(step(&mut rng));
        }
        let cpu = cpu_seconds()
            .zip(cpu_start)
            .map(|(end, start)| (end - start) / times.len() as f64);
        times.sort();
        let median = times[times.len() / 2].as_secs_f64();
        let p10 = times[times.len() / 10].as_secs_f64();
        let cpu_text = cpu.map_or(String::new(), |c| format!(", CPU {:.3} ms", c * 1e3));
        println!(
            "{:>8} B={:<5} step: median {:.3} ms, p10 {:.3} ms{cpu_text} ({} steps) → round ≈ {:.1} s (median), {:.1} s (p10) for {} weights",
            spec.name,
            b,
            median * 1e3,
            p10 * 1e3,
            times.len(),
            median * weights as f64,
            p10 * weights as f64,
            weights
        );
    }
    Ok(())
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`, 100 ticks/s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
