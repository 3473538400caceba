//! Times `sgd_step` (forward, backward and update) on random MNIST-shaped data.
//!
//! `cargo run --release -p rso-cpu --example sgd_step [model:batch ...]` (default `one-conv:32
//! two-conv:32 paper:256`).

use rso_cpu::CpuNetwork;
use rso_models::{init_params, Init, ModelKind, Network};
use rso_testkit::{random_batch, rng, RandomData};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = if args.is_empty() {
        vec![
            "one-conv:32".to_string(),
            "two-conv:32".into(),
            "paper:256".into(),
        ]
    } else {
        args
    };
    let mut rng = rng(8);
    let train_len = 4096;
    for a in &args {
        let (m, b) = a.split_once(':').ok_or("expected model:batch")?;
        let (kind, b): (ModelKind, usize) = (m.parse()?, b.parse()?);
        let spec = kind.mnist();
        let params = init_params(&spec, Init::GlorotUniform, &mut rng);
        let split = RandomData::mnist().split(train_len, 16, &mut rng);
        let mut net = CpuNetwork::new(&spec, &params, split)?;
        let mut times = Vec::new();
        for _ in 0..60 {
            let batch = random_batch(&mut rng, train_len, b);
            let t = Instant::now();
            std::hint::black_box(net.sgd_step(&batch, 0.01));
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{:>8} B={b:<5} sgd_step: median {:8.3} ms, min {:8.3} ms",
            spec.name,
            times[times.len() / 2] * 1e3,
            times[0] * 1e3
        );
    }
    Ok(())
}
