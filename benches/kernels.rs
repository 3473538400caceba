//! Criterion benches of the pure-Rust backend's forward kernels on the models' shapes (what the
//! `#[ignore]`d `conv_speed` and `dense_speed` unit tests of `rso-cpu` printed before).
//!
//! Groups `kernels/conv3x3_forward`, ids `{c_in}-{c_out}/{hw}x{hw}` (8 images), and
//! `kernels/dense_forward`, ids `{n}x{d_in}-{d_out}`; throughput in multiply-adds per second
//! (criterion's "elements"). The kernels are single-threaded. Inputs are uniform in
//! `[−1, 1)` from a fixed seed.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{aview1, ArrayView2, ArrayView4, ArrayViewMut2, ArrayViewMut4};
use rso_cpu::kernels::conv::{conv3x3_forward, Conv3x3};
use rso_cpu::kernels::dense::dense_forward;
use rso_testkit::{rng, uniform};
use std::hint::black_box;

/// `conv3x3_forward` on 8 images for each (c_in, c_out, size) the models run.
fn conv(c: &mut Criterion) {
    // The level the kernels run at (criterion compares runs by id, not by level).
    eprintln!("kernels: SIMD level {}", rso_cpu::simd::level().name());
    let mut group = c.benchmark_group("kernels/conv3x3_forward");
    let mut rng = rng(9);
    let n = 8;
    for (c_in, c_out, hw) in [
        (1, 4, 28),
        (1, 16, 28),
        (16, 16, 28),
        (16, 16, 14),
        (16, 16, 7),
        (16, 1, 14),
        (1, 16, 14),
        (1, 1, 28),
        (16, 1, 7),
    ] {
        let s = Conv3x3 {
            c_in,
            c_out,
            h: hw,
            w: hw,
        };
        let x = uniform(&mut rng, n * s.in_len(), 1.0);
        let wt = uniform(&mut rng, c_out * s.taps(), 1.0);
        let b = uniform(&mut rng, c_out, 1.0);
        let mut y = vec![0.0; n * s.out_len()];
        let x = ArrayView4::from_shape(s.input_shape(n), &x).expect("[n, c_in, h, w]");
        let wt = ArrayView4::from_shape(s.weight_shape(), &wt).expect("[c_out, c_in, 3, 3]");
        let mut y = ArrayViewMut4::from_shape(s.output_shape(n), &mut y).expect("[n, c_out, h, w]");
        group.throughput(Throughput::Elements((n * s.macs()) as u64));
        group.bench_function(
            BenchmarkId::new(format!("{c_in}-{c_out}"), format!("{hw}x{hw}")),
            |bench| {
                bench.iter(|| {
                    conv3x3_forward(&s, black_box(x), wt, Some(aview1(&b)), y.view_mut());
                    black_box(&y);
                })
            },
        );
    }
    group.finish();
}

/// `dense_forward` for each (batch, d_in, d_out) the models run.
fn dense(c: &mut Criterion) {
    let mut group = c.benchmark_group("kernels/dense_forward");
    let mut rng = rng(9);
    for (n, d_in, d_out) in [(32, 784, 10), (8, 784, 10), (256, 16, 10)] {
        let x = uniform(&mut rng, n * d_in, 1.0);
        let w = uniform(&mut rng, d_out * d_in, 1.0);
        let b = uniform(&mut rng, d_out, 1.0);
        let mut y = vec![0.0; n * d_out];
        let x = ArrayView2::from_shape((n, d_in), &x).expect("[n, d_in]");
        let w = ArrayView2::from_shape((d_out, d_in), &w).expect("[d_out, d_in]");
        let mut y = ArrayViewMut2::from_shape((n, d_out), &mut y).expect("[n, d_out]");
        group.throughput(Throughput::Elements((n * d_in * d_out) as u64));
        group.bench_function(format!("{n}x{d_in}-{d_out}"), |bench| {
            bench.iter(|| {
                dense_forward(black_box(x), w, Some(aview1(&b)), y.view_mut());
                black_box(&y);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, conv, dense);
criterion_main!(benches);
