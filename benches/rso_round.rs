//! Criterion benches: the forward pass of each model, and one RSO round per (model, batch size,
//! engine, candidate path).
//!
//! Groups `rso_round/{model}/{engine}` (`cpu`; with `--features tch|cuda` also `tch-cpu` or,
//! with `RSO_BENCH_DEVICE=cuda`, `tch-cuda`; `RSO_BENCH_ENGINE=cpu|tch` runs one engine only),
//! ids `{eval}/{batch}` (`incremental/1024`, `reference/32`),
//! throughput in weights per second (one round visits every weight once). Preset `seed` (the
//! CLI's default: random batches, mean loss) on MNIST's 60 000 training images (random images
//! when `data/mnist` is absent, said on stderr); the paper model also with preset `paper` (ids
//! `…-preset-paper/{batch}`: sum loss, sequential batches, σ of round 0 of 50, weight decay). Cases whose round takes minutes are timed on a round scaled
//! down by a fraction (that fraction of the training set and of every array's scalars) and
//! scaled back up (see [`rso_bench::extrapolated_round`]); their ids say so
//! (`reference-est/1024`), and the case table below gives the fraction. `RSO_BENCH_FULL=1` adds the long cases as whole rounds
//! (two-conv at B=1000, paper at B=256: tens of minutes for ten samples). `scripts/bench-to-csv.sh` exports
//! the estimates to `results/bench_rso_round.csv`.

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use rso_bench::{cpu_network, extrapolated_round, mnist_or_synthetic, scaled_split};
use rso_models::cost::round_macs;
use rso_models::{ModelKind, Network, Preset, Reduction};
use rso_optim::{Optimizer, Rso, RsoConfig, RsoEval};
use std::time::{Duration, Instant};

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    for model in ModelKind::ALL {
        let batch: Vec<u32> = (0..256).collect();
        let mut net = cpu_network(
            model,
            Preset::Seed,
            mnist_or_synthetic(Preset::Seed, 256, 10),
        );
        group.throughput(Throughput::Elements(batch.len() as u64));
        group.bench_function(
            BenchmarkId::new(format!("{}/cpu", model.name()), 256),
            |b| b.iter(|| net.batch_loss(&batch, Reduction::Mean)),
        );
    }
    group.finish();
}

/// How a case is timed.
#[derive(Clone, Copy)]
enum Timing {
    /// Whole rounds through `Rso::run_round`.
    Round,
    /// Extrapolated from this fraction of every array's scalars.
    Fraction(f64),
}

/// One benchmark case: model, batch size, candidate path, timing.
type Case = (ModelKind, usize, RsoEval, Timing);

/// One RSO round per (model, batch, eval path) on the pure-Rust backend and, with the `tch`
/// feature, on libtorch (device from `RSO_BENCH_DEVICE`: `cpu`, the default, or `cuda`).
fn rso_round(c: &mut Criterion) {
    use ModelKind::*;
    use RsoEval::*;
    use Timing::*;
    let full = std::env::var_os("RSO_BENCH_FULL").is_some_and(|v| v != "0");
    let mut cases: Vec<Case> = vec![
        // The baseline: three forward passes per weight (about 5–10 s a round).
        (OneConv, 32, Reference, Round),
        (OneConv, 32, Incremental, Round),
        (OneConv, 1024, Reference, Fraction(0.01)),
        (OneConv, 1024, Incremental, Round),
        (TwoConv, 32, Incremental, Round),
        (TwoConv, 1000, Reference, Fraction(0.002)),
        (TwoConv, 1000, Incremental, Fraction(0.1)),
        (Paper, 256, Reference, Fraction(0.002)),
        (Paper, 256, Incremental, Fraction(0.05)),
    ];
    if full {
        cases.push((TwoConv, 1000, Incremental, Round));
        cases.push((Paper, 256, Incremental, Round));
    }
    // Preset `paper` (sum loss, sequential batches, σ annealed over 50 rounds, weight decay) on
    // the paper model at its own batch sizes. At B = 1000 the windows recur (1000 divides the
    // training set, and the 1/30 fraction keeps it so: 2000 images); at B = 256 none does.
    let paper: Vec<Case> = vec![
        (Paper, 256, Incremental, Fraction(0.05)),
        (Paper, 1000, Incremental, Fraction(1.0 / 30.0)),
    ];
    let split = mnist_or_synthetic(Preset::Seed, 60_000, 10);
    let split_paper = mnist_or_synthetic(Preset::Paper, 60_000, 10);
    let only = std::env::var("RSO_BENCH_ENGINE").ok();
    if only.as_deref().is_none_or(|e| e == "cpu") {
        for (preset, cases, split) in [
            (Preset::Seed, &cases, &split),
            (Preset::Paper, &paper, &split_paper),
        ] {
            run_cases(
                c,
                "cpu",
                preset,
                cases,
                split,
                |model, data| cpu_network(model, preset, data),
                |_| {},
            );
        }
    }
    #[cfg(feature = "tch")]
    if only.as_deref().is_none_or(|e| e == "tch") {
        let device = std::env::var("RSO_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
        // One intra-op thread: libtorch's OpenMP workers spin at barriers and, on a shared
        // 2-core machine, turn a round's time into noise.
        rso_tch::set_threads(1);
        // The GPU targets (paper at B=1000 and 5000, one-conv at 1024), both paths;
        // on the CPU the same cases at the sizes the pure-Rust backend is timed at.
        let cases: Vec<Case> = if device.starts_with("cuda") {
            vec![
                (OneConv, 1024, Reference, Fraction(0.01)),
                (OneConv, 1024, Incremental, Round),
                (TwoConv, 1000, Reference, Fraction(0.01)),
                (TwoConv, 1000, Incremental, Fraction(0.1)),
                (Paper, 1000, Reference, Fraction(0.005)),
                (Paper, 1000, Incremental, Fraction(0.02)),
                (Paper, 5000, Reference, Fraction(0.002)),
                (Paper, 5000, Incremental, Fraction(0.01)),
            ]
        } else {
            vec![
                (OneConv, 32, Reference, Fraction(0.05)),
                (OneConv, 32, Incremental, Fraction(0.2)),
                (OneConv, 1024, Reference, Fraction(0.002)),
                (OneConv, 1024, Incremental, Fraction(0.1)),
                (Paper, 256, Reference, Fraction(0.002)),
                (Paper, 256, Incremental, Fraction(0.01)),
            ]
        };
        for (preset, cases, split) in [
            (Preset::Seed, &cases, &split),
            (Preset::Paper, &paper, &split_paper),
        ] {
            run_cases(
                c,
                &format!("tch-{device}"),
                preset,
                cases,
                split,
                |model, data| rso_bench::tch_network(model, preset, &data, &device),
                |net| net.sync(),
            );
        }
    }
}

/// Runs `cases` as groups `rso_round/{model}/{engine}` on networks made by `make`; `sync`
/// waits for the device inside each timed region.
fn run_cases<N: Network>(
    c: &mut Criterion,
    engine: &str,
    preset: Preset,
    cases: &[Case],
    split: &rso_data::Split,
    make: impl Fn(ModelKind, rso_data::Split) -> N,
    sync: impl Fn(&N) + Copy,
) {
    use Timing::*;
    for model in ModelKind::ALL {
        let mut group = c.benchmark_group(format!("rso_round/{}/{engine}", model.name()));
        group.sample_size(10);
        group.sampling_mode(SamplingMode::Flat);
        group.warm_up_time(Duration::from_millis(1));
        group.measurement_time(Duration::from_secs(1));
        for &(_, batch, eval, timing) in cases.iter().filter(|c| c.0 == model) {
            let data = match timing {
                Round => split.clone(),
                Fraction(f) => scaled_split(split, f, batch),
            };
            let mut net = make(model, data);
            // Round 0 of the preset's own schedule (σ annealed over 50 rounds for `paper`).
            let rounds = if preset == Preset::Paper { 50 } else { 1 };
            let mut cfg = RsoConfig::preset(preset, rounds, batch, 0);
            cfg.eval = eval;
            let mut rso = Rso::new(net.spec(), cfg).expect("config");
            group.throughput(Throughput::Elements(net.spec().param_count() as u64));
            let name = match eval {
                RsoEval::Reference => "reference",
                RsoEval::Incremental => "incremental",
            };
            // Extrapolated cases say so in their id (`incremental-est/1000`), and preset `paper`
            // cases too (`incremental-est-preset-paper/256`).
            let est = if matches!(timing, Fraction(_)) {
                "-est"
            } else {
                ""
            };
            let tag = if preset == Preset::Paper {
                "-preset-paper"
            } else {
                ""
            };
            let id = BenchmarkId::new(format!("{name}{est}{tag}"), batch);
            // MACs a round cannot avoid (rso_models::cost), reported as achieved GMAC/s.
            let macs = round_macs(net.spec(), batch);
            // Sequential windows recur only when the batch size divides the training set.
            let recur = preset != Preset::Paper || net.train_len().is_multiple_of(batch);
            let floor = match eval {
                RsoEval::Reference => macs.reference,
                _ if recur => macs.floor,
                _ => macs.floor_new_batches,
            };
            let what = format!(
                "rso_round/{}/{engine} {name}{est}{tag}/{batch}",
                model.name()
            );
            let mut seed = 0;
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        seed += 1;
                        total += match timing {
                            Round => {
                                let t = Instant::now();
                                rso.run_round(&mut net, 0, None, &mut |_| {})
                                    .expect("round");
                                sync(&net);
                                t.elapsed()
                            }
                            Fraction(f) => extrapolated_round(&mut net, &rso, f, seed, sync),
                        };
                    }
                    let secs = total.as_secs_f64() / iters.max(1) as f64;
                    eprintln!(
                        "{what}: {secs:.3} s/round; floor {:.3} TMAC, {:.1} GMAC/s",
                        floor as f64 / 1e12,
                        floor as f64 / secs / 1e9
                    );
                    total
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, forward, rso_round);
criterion_main!(benches);
