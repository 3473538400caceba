//! Times one RSO round on the pure-Rust backend, incremental candidate path against the
//! reference path, in the same run.
//!
//! ```text
//! cargo run --release -p rso-cpu --example incremental_round -- [model:batch[:fraction]] ...
//! ```
//! (default: `one-conv:1024 two-conv:1000 paper:256:0.02`). With a fraction `f < 1` each array's
//! first `⌈f·len⌉` scalars are visited (as RSO visits them: `begin_sweep`, then in order) and
//! each array's time is scaled by `len / visited`; with `f = 1` the incremental path runs
//! `ROUNDS` (default 2) whole rounds through `rso_optim::Rso` (preset `seed`) and reports the
//! last. (Preset `seed` draws each visit's batch from ⌈N/B⌉ per round, so the incremental
//! path's per-batch memo of the paper model only pays off over whole sweeps: extrapolating it
//! from a small fraction overstates its round time.) The reference path is always
//! extrapolated from `--reference-fraction` (default 0.01) of each array, because a full
//! reference round takes minutes to tens of minutes.
//!
//! MNIST is read from `data/mnist` (60 000 training images) when present, else random images;
//! `--train-limit N` keeps the first `N` (with a fraction `f`, `N ≈ f·60 000` keeps the share
//! of visits that find their batch in the paper model's memo about as in a whole round).

use rand_distr::{Distribution, Normal};
use rso_cpu::CpuNetwork;
use rso_data::Split;
use rso_models::network::reference_candidate_losses;
use rso_models::{init_params, ModelKind, Network, Preset, Reduction};
use rso_optim::{choose, Batches, Choice, Optimizer, Rso, RsoConfig};
use rso_testkit::{rng, Labels, RandomData};
use std::path::Path;
use std::time::Instant;

fn data() -> (Split, &'static str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist");
    if let Ok(split) = rso_data::load_mnist(&dir, Preset::Seed.normalization()) {
        return (split, "MNIST");
    }
    (
        RandomData::mnist()
            .labels(Labels::Cyclic)
            .split(60_000, 100, &mut rng(5)),
        "random images",
    )
}

/// Visits the first `⌈fraction·len⌉` scalars of every array in RSO's order (random batches of
/// the round's partition, Δ ~ N(0, σ), the argmin accepted); returns the extrapolated round
/// time and the time per array.
fn partial_round(
    net: &mut CpuNetwork,
    rso: &Rso,
    batch: usize,
    fraction: f64,
    reference: bool,
) -> (f64, Vec<(String, f64, usize)>) {
    let mut rng = rng(9);
    let n = net.train_len();
    let mut batches = Batches::new(rso.config().batch_policy, batch, n, &mut rng);
    let params = net.spec().params();
    let mut total = 0.0;
    let mut per_array = Vec::new();
    let only = std::env::var("ONLY").ok();
    for step in rso.schedule() {
        let len = params[step.param].len();
        let mut visits = ((fraction * len as f64).ceil() as usize).clamp(1, len);
        if only
            .as_deref()
            .is_some_and(|o| !params[step.param].name.contains(o))
        {
            visits = 1; // profiling aid: `ONLY=conv2` visits the other arrays once
        }
        let normal = Normal::new(0.0, step.sigma).expect("σ");
        let t = Instant::now();
        net.begin_sweep(step.param);
        for index in 0..visits {
            let b = batches.next(&mut rng);
            let delta = normal.sample(&mut rng) as f32;
            let w = net.weight(step.param, index);
            let losses = if reference {
                reference_candidate_losses(net, b, step.param, index, delta, Reduction::Mean)
            } else {
                net.candidate_losses(b, step.param, index, delta, Reduction::Mean)
            };
            match choose(losses) {
                Choice::Keep => {}
                Choice::Plus => net.set_weight(step.param, index, w + delta),
                Choice::Minus => net.set_weight(step.param, index, w - delta),
            }
        }
        let secs = t.elapsed().as_secs_f64() * len as f64 / visits as f64;
        total += secs;
        per_array.push((params[step.param].name.clone(), secs, visits));
    }
    (total, per_array)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut ref_fraction = 0.01;
    if let Some(i) = args.iter().position(|a| a == "--reference-fraction") {
        ref_fraction = args
            .get(i + 1)
            .ok_or("--reference-fraction needs a value")?
            .parse()?;
        args.drain(i..i + 2);
    }
    let mut train_limit = usize::MAX;
    if let Some(i) = args.iter().position(|a| a == "--train-limit") {
        train_limit = args
            .get(i + 1)
            .ok_or("--train-limit needs a value")?
            .parse()?;
        args.drain(i..i + 2);
    }
    let skip_reference = args.iter().any(|a| a == "--no-reference");
    args.retain(|a| a != "--no-reference");
    if args.is_empty() {
        args = vec![
            "one-conv:1024".into(),
            "two-conv:1000".into(),
            "paper:256:0.02".into(),
        ];
    }
    let (mut split, source) = data();
    split.train.truncate(train_limit);
    println!(
        "data: {source}, {} training images; rayon threads: {}",
        split.train.len(),
        rayon::current_num_threads()
    );
    for a in &args {
        let parts: Vec<&str> = a.split(':').collect();
        let kind: ModelKind = parts[0].parse()?;
        let batch: usize = parts.get(1).ok_or("expected model:batch")?.parse()?;
        let fraction: f64 = parts.get(2).map_or(Ok(1.0), |f| f.parse())?;
        let spec = kind.mnist();
        let params = init_params(&spec, Preset::Seed.init(), &mut rso_optim::setup_rng(0, 0));
        let cfg = RsoConfig::preset(Preset::Seed, 1, batch, 0);
        let mut rso = Rso::new(&spec, cfg)?;
        let weights = spec.param_count();

        let mut net = CpuNetwork::new(&spec, &params, split.clone())?;
        let (inc, how) = if fraction >= 1.0 {
            let mut times = Vec::new();
            let rounds: usize = std::env::var("ROUNDS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(2);
            for round in 0..rounds.max(1) {
                let t = Instant::now();
                let stats = rso.run_round(&mut net, round, None, &mut |_| {})?;
                times.push(t.elapsed().as_secs_f64());
                println!(
                    "{:>8} B={batch:<5} incremental round {round}: {:8.3} s ({} of {} accepted, mean batch loss {:.4})",
                    spec.name, times[round], stats.accepted, stats.steps, stats.mean_batch_loss
                );
            }
            let last = times.len() - 1;
            (times[last], format!("measured (full round {last})"))
        } else {
            let (t, arrays) = partial_round(&mut net, &rso, batch, fraction, false);
            for (name, secs, visits) in arrays {
                println!(
                    "{:>8} B={batch:<5} incremental {name:>14}: {secs:9.3} s ({visits} visits)",
                    spec.name
                );
            }
            (
                t,
                format!("extrapolated from {:.1}% of each array", 100.0 * fraction),
            )
        };
        println!(
            "{:>8} B={batch:<5} incremental: {inc:9.3} s/round, {:9.0} weights/s [{how}]",
            spec.name,
            weights as f64 / inc
        );
        if !skip_reference {
            let mut net = CpuNetwork::new(&spec, &params, split.clone())?;
            let (t, _) = partial_round(&mut net, &rso, batch, ref_fraction, true);
            println!(
                "{:>8} B={batch:<5} reference:   {t:9.3} s/round, {:9.0} weights/s [extrapolated from {:.1}% of each array]; ratio {:.1}x",
                spec.name,
                weights as f64 / t,
                100.0 * ref_fraction,
                t / inc
            );
        }
    }
    Ok(())
}
