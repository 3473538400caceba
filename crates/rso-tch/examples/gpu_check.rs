//! The GPU check, run on a CUDA machine (see `gpu/README.md`): the same checkpoint's loss on the
//! CUDA engine, the libtorch CPU engine and the pure-Rust engine, then seconds per round of the
//! reference RSO path for a model and batch size, printed as a short table.
//!
//! `gpu_check [device] [model] [batch] [weights]` (defaults: cuda paper 1000 600). The data are
//! random (MNIST-shaped, 60 000 training images): timing and agreement do not depend on them.
//! The round time is extrapolated from `weights` visits spread over all arrays in sweep order:
//! s/round = (seconds per visit) × (weights in the model).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rso_models::{init_params, Init, ModelKind, Network, Params, Reduction};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let device = args.get(1).map_or("cuda", String::as_str);
    let kind: ModelKind = args.get(2).map_or("paper", String::as_str).parse()?;
    let batch_len: usize = args.get(3).map_or(Ok(1000), |s| s.parse())?;
    let visits: usize = args.get(4).map_or(Ok(600), |s| s.parse())?;

    println!("cuda_available: {}", rso_tch::cuda_available());
    println!(
        "cuda: {:?}",
        rso_tch::cuda_unavailable_reason().unwrap_or_else(|| "usable".into())
    );
    println!("conv precision: {}", rso_tch::cuda_conv_precision());

    let spec = kind.mnist();
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut set = |n: usize| rso_data::Dataset {
        images: (0..n * 784).map(|_| rng.random::<f32>()).collect(),
        labels: (0..n).map(|_| rng.random_range(0..10u8)).collect(),
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    let split = rso_data::Split {
        train: set(60_000),
        test: set(10_000),
    };
    let params = init_params(&spec, Init::He, &mut ChaCha8Rng::seed_from_u64(7));

    // A checkpoint through a file, loaded on each engine.
    let dir = std::env::temp_dir().join(format!("rso-gpu-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ckpt = dir.join("ckpt.safetensors");
    params.save(&ckpt)?;
    let loaded = Params::load(&spec, &ckpt)?;
    let batch: Vec<u32> = (0..batch_len as u32).map(|i| i * 7 % 60_000).collect();

    let mut dev = rso_tch::TchNetwork::new(&spec, &loaded, &split, device)?;
    let mut tcpu = rso_tch::TchNetwork::new(&spec, &loaded, &split, "cpu")?;
    let mut rust = rso_cpu::CpuNetwork::new(&spec, &loaded, split.clone())?;
    let l_dev = dev.batch_loss(&batch, Reduction::Sum);
    let l_tcpu = tcpu.batch_loss(&batch, Reduction::Sum);
    let l_rust = rust.batch_loss(&batch, Reduction::Sum);
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    println!(
        "\ncheckpoint loss (sum over B={batch_len}) of {}:",
        spec.name
    );
    println!("  tch {device}: {l_dev:.9}");
    println!(
        "  tch cpu: {l_tcpu:.9}   rel diff {:.2e}",
        rel(l_dev, l_tcpu)
    );
    println!(
        "  pure-Rust cpu: {l_rust:.9}   rel diff {:.2e}",
        rel(l_dev, l_rust)
    );
    let ok = rel(l_dev, l_rust) <= 1e-4 && rel(l_dev, l_tcpu) <= 1e-4;
    println!("  within 1e-4 relative: {ok}");

    // Reference RSO visits spread over all arrays, output layer first.
    let total = spec.param_count();
    let order: Vec<(usize, usize)> = {
        let specs = spec.params();
        let mut v = Vec::new();
        for (p, s) in specs.iter().enumerate().rev() {
            let share = (visits * s.len()).div_ceil(total).max(1);
            v.extend((0..share.min(s.len())).map(|j| (p, j * s.len() / share.min(s.len()))));
        }
        v
    };
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let batches: Vec<Vec<u32>> = (0..order.len())
        .map(|_| {
            (0..batch_len)
                .map(|_| rng.random_range(0..60_000u32))
                .collect()
        })
        .collect();
    // Warm-up (cuDNN algorithm choice, allocator).
    for (b, &(p, j)) in batches.iter().zip(&order).take(5) {
        dev.candidate_losses(b, p, j, 0.01, Reduction::Sum);
    }
    dev.sync();
    let t = Instant::now();
    for (b, &(p, j)) in batches.iter().zip(&order) {
        let l = dev.candidate_losses(b, p, j, 0.01, Reduction::Sum);
        let best = if l[1] < l[0] && l[1] <= l[2] {
            1
        } else if l[2] < l[0] {
            2
        } else {
            0
        };
        let w = dev.weight(p, j);
        dev.set_weight(p, j, [w, w + 0.01, w - 0.01][best]);
    }
    dev.sync();
    let secs = t.elapsed().as_secs_f64();
    let per_visit = secs / order.len() as f64;
    println!("\n| model | batch | device | visits timed | s/visit | s/round (×{total}) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {batch_len} | tch {device} | {} | {per_visit:.5} | {:.1} |",
        spec.name,
        order.len(),
        per_visit * total as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
    if !ok {
        return Err("checkpoint losses differ by more than 1e-4 relative".into());
    }
    Ok(())
}
