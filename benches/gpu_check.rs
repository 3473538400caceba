//! The GPU check (a plain program, not a criterion bench), run on a CUDA machine by
//! `scripts/gpu/run.sh`: first correctness — one checkpoint's loss on the libtorch backend on
//! the device, on libtorch's CPU and on the pure-Rust backend (within 1e-4 relative) —, then
//! seconds per RSO round of the reference and the incremental path for the issue's GPU cases,
//! printed as a table last.
//!
//! ```text
//! gpu_check [device] [scale]      (defaults: cuda 1)
//! ```
//! Rounds are estimated from a round scaled down by a fraction ([`extrapolated_round`]; the
//! fractions are multiplied by `scale`: larger is steadier and slower). Data: MNIST when
//! `RSO_DATA_DIR` names its directory, else random images of its shape (timings do not depend
//! on pixel values). Exits non-zero when the losses disagree.

use rso_bench::{extrapolated_round, mnist_or_synthetic, scaled_split, tch_network};
use rso_models::{ModelKind, Network, Preset, Reduction};
use rso_optim::{Rso, RsoConfig, RsoEval};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let device = args.first().map_or("cuda", String::as_str);
    let scale: f64 = args.get(1).map_or(Ok(1.0), |s| s.parse())?;
    rso_tch::set_threads(1);
    println!("cuda_available: {}", rso_tch::cuda_available());
    println!(
        "cuda: {}",
        rso_tch::cuda_unavailable_reason().unwrap_or_else(|| "usable".into())
    );
    println!("conv precision: {}", rso_tch::cuda_conv_precision());
    let split = mnist_or_synthetic(Preset::Paper, 60_000, 10_000);

    // 1. A checkpoint through a file, its loss on each engine.
    let spec = ModelKind::Paper.mnist();
    let net = tch_network(ModelKind::Paper, Preset::Paper, &split, "cpu");
    let params = net.params();
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("ckpt.safetensors");
    params.save(&ckpt)?;
    let loaded = rso_models::Params::load(&spec, &ckpt)?;
    let batch: Vec<u32> = (0..1000u32).map(|i| i * 7 % 60_000).collect();
    let mut on_device = rso_tch::TchNetwork::new(&spec, &loaded, &split, device)?;
    let mut tch_cpu = rso_tch::TchNetwork::new(&spec, &loaded, &split, "cpu")?;
    let mut rust = rso_cpu::CpuNetwork::new(&spec, &loaded, split.clone())?;
    let l_dev = on_device.batch_loss(&batch, Reduction::Sum);
    let l_tcpu = tch_cpu.batch_loss(&batch, Reduction::Sum);
    let l_rust = rust.batch_loss(&batch, Reduction::Sum);
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    println!("\ncheckpoint loss (paper, sum over B=1000):");
    println!("  tch {device}: {l_dev:.9}");
    println!(
        "  tch cpu: {l_tcpu:.9}   rel diff {:.2e}",
        rel(l_dev, l_tcpu)
    );
    println!(
        "  pure-Rust cpu: {l_rust:.9}   rel diff {:.2e}",
        rel(l_dev, l_rust)
    );
    let agree = rel(l_dev, l_rust) <= 1e-4 && rel(l_dev, l_tcpu) <= 1e-4;
    println!("  within 1e-4 relative: {agree}");
    drop((on_device, tch_cpu, rust));

    // 2. Seconds per round, both paths, in the same process on the same device.
    use ModelKind::*;
    // (model, batch, fraction of a round timed for the reference path, for the incremental
    // path, target). The incremental path has costs per sweep and batch (caches) that a small
    // fraction overstates once scaled up, so its fractions are larger.
    let cases: [(ModelKind, usize, f64, f64, &str); 4] = [
        (OneConv, 1024, 0.01, 1.0, "≤ 0.3 s"),
        (Paper, 1000, 0.005, 0.05, "≤ 2.5 s"),
        (Paper, 5000, 0.005, 0.05, "≤ 9 s"),
        (TwoConv, 1000, 0.01, 0.2, "—"),
    ];
    let mut rows = Vec::new();
    for (model, batch, f_ref, f_inc, target) in cases {
        let mut secs = [0.0; 2];
        for (s, (eval, f)) in secs
            .iter_mut()
            .zip([(RsoEval::Reference, f_ref), (RsoEval::Incremental, f_inc)])
        {
            let f = (f * scale).min(1.0);
            let data = scaled_split(&split, f, batch);
            let mut net = tch_network(model, Preset::Seed, &data, device);
            let mut cfg = RsoConfig::preset(Preset::Seed, 1, batch, 0);
            cfg.eval = eval;
            let rso = Rso::new(net.spec(), cfg)?;
            // Warm-up (cuDNN's algorithm choice, the allocator), then the timed estimate.
            extrapolated_round(&mut net, &rso, f / 10.0, 1, |n: &rso_tch::TchNetwork| {
                n.sync()
            });
            *s = extrapolated_round(&mut net, &rso, f, 2, |n: &rso_tch::TchNetwork| n.sync())
                .as_secs_f64();
            eprintln!("{} B={batch} {eval:?}: {:.2} s/round", model.name(), *s);
        }
        rows.push((model, batch, secs, target));
    }
    println!("\n| model | batch | device | reference s/round | incremental s/round | speed-up | target |");
    println!("|---|---|---|---|---|---|---|");
    for (model, batch, [r, i], target) in rows {
        println!(
            "| {} | {batch} | tch {device} | {r:.2} | {i:.2} | {:.1}× | {target} |",
            model.name(),
            r / i
        );
    }
    if !agree {
        return Err("checkpoint losses differ by more than 1e-4 relative".into());
    }
    Ok(())
}
