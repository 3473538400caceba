//! Cross-backend properties: the libtorch backend (on each device) against the pure-Rust CPU
//! engine as the reference, on random batch sizes, random inputs and random parameters copied
//! into both. Every comparison goes through the one tolerance helper, [`Tol`] (`rso-testkit`).
//!
//! Tolerances (relative; the absolute floor is the relative tolerance times the largest
//! reference magnitude of the compared vector, [`Tol::scaled`]): logits 1e-4, losses 1e-5,
//! gradients 1e-4 (per array, the floor's scale at least 1e-2 of the largest gradient of any
//! array), parameters after one SGD step 1e-5. RSO decisions must agree except where the two candidates the engines chose
//! have losses within 1e-6 relative of each other.

mod common;

use common::{random_batch, random_params, random_split_with_validation, runner};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rso_cpu::CpuNetwork;
use rso_models::{init::he_std, ModelKind, ModelSpec, Network, Params, Reduction, SplitKind};
use rso_tch::TchNetwork;
use rso_testkit::{max_abs, wide, Tol};

/// Training samples in each generated data set (batches index into it, with repetition).
const TRAIN: usize = 16;
/// Test samples in each generated data set.
const TEST: usize = 8;
/// Validation samples in each generated data set.
const VALIDATION: usize = 6;
/// Proptest cases per model and property.
const CASES: u32 = 16;

/// Both engines on the same spec, parameters and data.
fn engines(spec: &ModelSpec, params: &Params, seed: u64, device: &str) -> (CpuNetwork, TchNetwork) {
    common::single_threaded();
    let split = random_split_with_validation(spec, TRAIN, TEST, VALIDATION, seed);
    let tch = TchNetwork::new(spec, params, &split, device).expect("tch engine");
    let cpu = CpuNetwork::new(spec, params, split).expect("cpu engine");
    (cpu, tch)
}

/// A random case: model, batch length, seed.
fn cases() -> impl Strategy<Value = (usize, usize, u64)> {
    (0..ModelKind::ALL.len(), 1..=12usize, any::<u64>())
}

/// Runs `check` on `CASES` random cases per model with a fixed proptest configuration.
fn for_each_case(check: impl Fn(ModelKind, &[u32], u64) -> Result<(), String>) {
    runner(CASES * ModelKind::ALL.len() as u32)
        .run(&cases(), |(k, len, seed)| {
            let kind = ModelKind::ALL[k];
            let batch = random_batch(TRAIN, len, seed ^ 0x5eed);
            check(kind, &batch, seed).map_err(|e| {
                TestCaseError::fail(format!("{} batch {batch:?} seed {seed}: {e}", kind.name()))
            })
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

fn logits_agree(device: &str) {
    for_each_case(|kind, batch, seed| {
        let spec = kind.mnist();
        let (mut cpu, mut tch) = engines(&spec, &random_params(&spec, seed), seed, device);
        let want = wide(&cpu.logits(batch));
        Tol::scaled(1e-4, max_abs(&want, 1.0)).check("logits", &wide(&tch.logits(batch)), &want)
    });
}
test_device!(logits_agree, logits_agree_cpu, logits_agree_cuda);

fn losses_agree(device: &str) {
    for_each_case(|kind, batch, seed| {
        let spec = kind.mnist();
        let (mut cpu, mut tch) = engines(&spec, &random_params(&spec, seed), seed, device);
        for reduction in [Reduction::Mean, Reduction::Sum] {
            let want = cpu.batch_loss(batch, reduction);
            let got = tch.batch_loss(batch, reduction);
            Tol {
                rtol: 1e-5,
                atol: 0.0,
            }
            .check(&format!("{reduction:?} loss"), &[got], &[want])?;
        }
        Ok(())
    });
}
test_device!(losses_agree, losses_agree_cpu, losses_agree_cuda);

fn gradients_and_sgd_steps_agree(device: &str) {
    for_each_case(|kind, batch, seed| {
        let spec = kind.mnist();
        let (mut cpu, mut tch) = engines(&spec, &random_params(&spec, seed), seed, device);
        let (want_loss, want) = cpu.loss_and_grad(batch, Reduction::Mean);
        let (got_loss, got) = tch.loss_and_grad(batch, Reduction::Mean);
        Tol {
            rtol: 1e-5,
            atol: 0.0,
        }
        .check("loss", &[got_loss], &[want_loss])?;
        // Each array at its own scale, but at least 1e-2 of the largest gradient of any array:
        // some gradients are zero in exact arithmetic and only rounding noise in f32 (the
        // `paper` convs on a one-sample batch: BatchNorm then global pooling make the output
        // independent of them), and BatchNorm's backward pass cancels terms of the size of the
        // largest gradients.
        let global = want.iter().fold(0.0f64, |m, w| max_abs(&wide(w), m));
        for ((spec, g), w) in cpu.params().specs.iter().zip(&got).zip(&want) {
            let w = wide(w);
            let scale = max_abs(&w, 1e-2 * global);
            Tol::scaled(1e-4, scale).check(&format!("∇{}", spec.name), &wide(g), &w)?;
        }
        // One in-place SGD step on the device against the CPU backend's step.
        let lr = 0.01;
        cpu.sgd_step(batch, lr);
        tch.sgd_step(batch, lr);
        for ((spec, g), w) in cpu
            .params()
            .specs
            .iter()
            .zip(&tch.params().values)
            .zip(&cpu.params().values)
        {
            let w = wide(w);
            Tol::scaled(1e-5, max_abs(&w, 1e-6)).check(
                &format!("{} after SGD", spec.name),
                &wide(g),
                &w,
            )?;
        }
        Ok(())
    });
}
test_device!(
    gradients_and_sgd_steps_agree,
    gradients_and_sgd_steps_agree_cpu,
    gradients_and_sgd_steps_agree_cuda
);

fn calibrated_evaluation_agrees(device: &str) {
    for_each_case(|kind, batch, seed| {
        let spec = kind.mnist();
        let (mut cpu, mut tch) = engines(&spec, &random_params(&spec, seed), seed, device);
        cpu.calibrate_bn(batch);
        tch.calibrate_bn(batch);
        for split in [SplitKind::Train, SplitKind::Test, SplitKind::Validation] {
            let (want, got) = (cpu.evaluate(split, None), tch.evaluate(split, None));
            if want.samples != got.samples || want.samples == 0 {
                return Err(format!(
                    "{split:?}: {} samples on cpu, {} on tch",
                    want.samples, got.samples
                ));
            }
            Tol {
                rtol: 1e-5,
                atol: 0.0,
            }
            .check(&format!("{split:?} loss"), &[got.loss], &[want.loss])?;
            // Accuracy may differ only by an arg-max near-tie: at most one sample.
            let n = want.samples as f64;
            Tol {
                rtol: 0.0,
                atol: 1.0 / n,
            }
            .check(
                &format!("{split:?} accuracy"),
                &[got.accuracy],
                &[want.accuracy],
            )?;
        }
        Ok(())
    });
}
test_device!(
    calibrated_evaluation_agrees,
    calibrated_evaluation_agrees_cpu,
    calibrated_evaluation_agrees_cuda
);

/// Index of the smallest of `[W, W+Δ, W−Δ]`; ties keep the earlier (W first).
fn decide(l: [f64; 3]) -> usize {
    let mut best = 0;
    for i in 1..3 {
        if l[i] < l[best] {
            best = i;
        }
    }
    best
}

/// Whether two candidate losses lie within 1e-6 relative of each other.
fn near_tie(a: f64, b: f64) -> bool {
    Tol::NEAR_TIE.close(a, b) || Tol::NEAR_TIE.close(b, a)
}

/// One RSO round driven by hand on both backends from the same state and seed: arrays from the
/// output layer back, the first `per_array` scalars of each (all when `None`), a fresh batch and
/// Δ ~ N(0, He σ) per weight. Returns the number of tolerated (near-tie) disagreements.
fn rso_round(
    spec: &ModelSpec,
    device: &str,
    batch_len: usize,
    per_array: Option<usize>,
    reduction: Reduction,
    seed: u64,
) -> Result<usize, String> {
    let params = random_params(spec, seed);
    let (mut cpu, mut tch) = engines(spec, &params, seed, device);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xdec1de);
    let mut tolerated = 0;
    for (p, ps) in params.specs.iter().enumerate().rev() {
        let sigma = he_std(ps.fan_in) as f32;
        let normal = Normal::new(0.0, sigma).map_err(|e| e.to_string())?;
        for j in 0..per_array.map_or(ps.len(), |n| n.min(ps.len())) {
            let batch = random_batch(TRAIN, batch_len, rand::Rng::random(&mut rng));
            let delta: f32 = normal.sample(&mut rng);
            let w = cpu.weight(p, j);
            if tch.weight(p, j) != w {
                return Err(format!(
                    "{}[{j}]: weights diverged before the visit",
                    ps.name
                ));
            }
            let want = cpu.candidate_losses(&batch, p, j, delta, reduction);
            let got = tch.candidate_losses(&batch, p, j, delta, reduction);
            Tol {
                rtol: 1e-5,
                atol: 0.0,
            }
            .check(&format!("{}[{j}] candidate losses", ps.name), &got, &want)?;
            let (dc, dt) = (decide(want), decide(got));
            if dc != dt {
                if !(near_tie(want[dc], want[dt]) && near_tie(got[dc], got[dt])) {
                    return Err(format!(
                        "{}[{j}]: decisions {dc} (cpu {want:?}) vs {dt} (tch {got:?}) without a near-tie",
                        ps.name
                    ));
                }
                tolerated += 1;
            }
            // Both follow the reference engine's decision, so a tolerated tie does not fork them.
            let new = [w, w + delta, w - delta][dc];
            cpu.set_weight(p, j, new);
            tch.set_weight(p, j, new);
        }
    }
    let (want, got) = (cpu.params(), tch.params());
    for ((s, g), w) in want.specs.iter().zip(&got.values).zip(&want.values) {
        Tol {
            rtol: 0.0,
            atol: 0.0,
        }
        .check(&format!("final {}", s.name), &wide(g), &wide(w))?;
    }
    // The models still compute the same function after the round.
    let all: Vec<u32> = (0..TRAIN as u32).collect();
    Tol {
        rtol: 1e-5,
        atol: 0.0,
    }
    .check(
        "loss after the round",
        &[tch.batch_loss(&all, reduction)],
        &[cpu.batch_loss(&all, reduction)],
    )?;
    Ok(tolerated)
}

fn rso_rounds_agree(device: &str) {
    let small_one_conv = ModelKind::OneConv.spec(1, 8, 10);
    let small_paper = ModelKind::Paper.spec(1, 8, 10);
    runner(6)
        .run(&(2..=8usize, any::<u64>()), |(batch_len, seed)| {
            // Every weight of a small one-conv (preset seed: mean loss) ...
            let t1 = rso_round(
                &small_one_conv,
                device,
                batch_len,
                None,
                Reduction::Mean,
                seed,
            )
            .map_err(|e| {
                TestCaseError::fail(format!("one-conv 8×8, B={batch_len}, seed {seed}: {e}"))
            })?;
            // ... and the first scalars of every array of a small paper model (sum loss, BN with
            // batch statistics, γ and β included).
            let t2 = rso_round(
                &small_paper,
                device,
                batch_len,
                Some(16),
                Reduction::Sum,
                seed,
            )
            .map_err(|e| {
                TestCaseError::fail(format!("paper 8×8, B={batch_len}, seed {seed}: {e}"))
            })?;
            if t1 + t2 > 0 {
                eprintln!(
                    "B={batch_len} seed {seed}: {} tolerated near-tie disagreements",
                    t1 + t2
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}
test_device!(
    rso_rounds_agree,
    rso_rounds_agree_cpu,
    rso_rounds_agree_cuda
);

fn checkpoints_load_in_the_other_engine(device: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    for kind in ModelKind::ALL {
        let spec = kind.mnist();
        let (mut cpu, mut tch) = engines(&spec, &random_params(&spec, 7), 7, device);
        let batch = [0, 3, 3, 9];
        // Move both away from the shared start, differently.
        tch.sgd_step(&batch, 0.05);
        cpu.sgd_step(&[1, 2], 0.05);
        let from_tch = dir.path().join(format!("{}-tch.safetensors", kind.name()));
        let from_cpu = dir.path().join(format!("{}-cpu.safetensors", kind.name()));
        tch.params().save(&from_tch).expect("save from tch");
        cpu.params().save(&from_cpu).expect("save from cpu");

        let (mut cpu2, mut tch2) = engines(
            &spec,
            &Params::load(&spec, &from_tch).expect("load"),
            7,
            device,
        );
        assert_eq!(
            cpu2.params(),
            tch.params(),
            "{}: tch file into the cpu engine",
            kind.name()
        );
        let want = wide(&tch.logits(&batch));
        Tol::scaled(1e-4, max_abs(&want, 1.0))
            .check(
                "cpu logits from a tch file",
                &wide(&cpu2.logits(&batch)),
                &want,
            )
            .unwrap();

        tch2.set_params(&Params::load(&spec, &from_cpu).expect("load"))
            .expect("layout");
        assert_eq!(
            tch2.params(),
            cpu.params(),
            "{}: cpu file into the tch engine",
            kind.name()
        );
        let want = wide(&cpu.logits(&batch));
        Tol::scaled(1e-4, max_abs(&want, 1.0))
            .check(
                "tch logits from a cpu file",
                &wide(&tch2.logits(&batch)),
                &want,
            )
            .unwrap();
    }
}
test_device!(
    checkpoints_load_in_the_other_engine,
    checkpoints_load_in_the_other_engine_cpu,
    checkpoints_load_in_the_other_engine_cuda
);

#[test]
fn tolerance_helper_refuses_nan_and_infinity() {
    let t = Tol {
        rtol: 1e-3,
        atol: 1e-3,
    };
    assert!(t.close(1.0005, 1.0));
    assert!(!t.close(1.01, 1.0));
    assert!(!t.close(f64::NAN, 1.0));
    assert!(!t.close(1.0, f64::NAN));
    assert!(!t.close(f64::NAN, f64::NAN));
    assert!(!t.close(f64::INFINITY, f64::INFINITY));
    assert!(t.check("v", &[1.0, f64::NAN], &[1.0, 1.0]).is_err());
    assert!(t.check("v", &[1.0], &[1.0, 1.0]).is_err());
}
