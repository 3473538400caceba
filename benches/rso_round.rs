//! Criterion benches: the forward pass of each model, and one RSO round.
//!
//! `cargo bench` runs them; `scripts/bench-to-csv.sh` exports the estimates.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rso_bench::{cpu_network, mnist_or_synthetic};
use rso_models::{ModelKind, Network, Preset, Reduction};
use rso_optim::{Optimizer, Rso, RsoConfig, RsoEval};

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    for model in ModelKind::ALL {
        let batch: Vec<u32> = (0..256).collect();
        let mut net = cpu_network(model, Preset::Seed, mnist_or_synthetic(Preset::Seed, 256, 10));
        group.throughput(Throughput::Elements(batch.len() as u64));
        group.bench_function(BenchmarkId::new(format!("{}/cpu", model.name()), 256), |b| {
            b.iter(|| net.batch_loss(&batch, Reduction::Mean))
        });
    }
    group.finish();
}

/// One RSO round per (model, batch, eval path) on the pure-Rust engine.
fn rso_round(c: &mut Criterion) {
    let cases: &[(ModelKind, usize, RsoEval)] = &[
        (ModelKind::OneConv, 32, RsoEval::Reference),
    ];
    for &(model, batch, eval) in cases {
        let mut group = c.benchmark_group(format!("rso_round/{}/cpu", model.name()));
        group.sample_size(10);
        let split = mnist_or_synthetic(Preset::Seed, 60_000, 10);
        let mut net = cpu_network(model, Preset::Seed, split);
        let mut cfg = RsoConfig::preset(Preset::Seed, 1, batch, 0);
        cfg.eval = eval;
        let mut rso = Rso::new(net.spec(), cfg).expect("config");
        group.throughput(Throughput::Elements(net.spec().param_count() as u64));
        let id = format!("{}-{batch}", if eval == RsoEval::Reference { "reference" } else { "incremental" });
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| rso.run_round(&mut net, 0, &mut |_| {}).expect("round"))
        });
        group.finish();
    }
}

criterion_group!(benches, forward, rso_round);
criterion_main!(benches);
