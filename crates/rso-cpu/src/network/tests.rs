//! Tests of [`CpuNetwork`] against the naive f64 reference and the `Network` contract.

use super::*;
use crate::executor::{Mode, EVAL_CHUNK, GRAD_CHUNK, PAR_MIN_WORK};
use crate::testutil::{self as tu, assert_close, config, wide};
use ndarray::aview1;
use proptest::prelude::*;
use rand::Rng;
use rso_data::Dataset;
use rso_models::{Init, ModelKind};
use rso_testkit::{RandomData, Weights};

/// `n` random images in `[0, 1)` with random labels, for `spec`.
fn random_set(spec: &ModelSpec, n: usize, seed: u64) -> Dataset {
    RandomData::of(spec).set(n, &mut tu::rng(seed))
}

/// Glorot weights, with nonzero biases and BN γ, β so that every gradient is exercised.
fn random_params(spec: &ModelSpec, seed: u64) -> Params {
    let weights = Weights::Init(Init::GlorotUniform);
    rso_testkit::random_params(spec, weights, &mut tu::rng(seed))
}

fn network(kind: ModelKind, train: usize, test: usize, seed: u64) -> CpuNetwork {
    network_of(&kind.mnist(), train, test, seed)
}

fn network_of(spec: &ModelSpec, train: usize, test: usize, seed: u64) -> CpuNetwork {
    let spec = spec.clone();
    let split = Split::new(
        random_set(&spec, train, seed),
        random_set(&spec, test, seed + 1),
    );
    CpuNetwork::new(&spec, &random_params(&spec, seed + 2), split).expect("valid network")
}

/// The naive reference logits of training samples `batch` (BatchNorm with batch statistics).
fn naive_logits(net: &CpuNetwork, params: &[Vec<f64>], batch: &[u32]) -> Vec<f64> {
    let images: Vec<f64> = batch
        .iter()
        .flat_map(|&i| wide(net.exec.train.image(i as usize)))
        .collect();
    tu::forward(&net.exec.spec, params, &images, batch.len(), None)
}

fn naive_loss(net: &CpuNetwork, params: &[Vec<f64>], batch: &[u32], reduction: Reduction) -> f64 {
    let z = naive_logits(net, params, batch);
    let labels: Vec<u8> = batch
        .iter()
        .map(|&i| net.exec.train.labels[i as usize])
        .collect();
    let sum: f64 = tu::cross_entropy(batch.len(), net.exec.spec.classes, &z, &labels)
        .iter()
        .sum();
    reduction.finish(sum, batch.len())
}

fn wide_params(p: &Params) -> Vec<Vec<f64>> {
    p.values.iter().map(|v| wide(v)).collect()
}

#[test]
fn forward_matches_the_naive_reference() {
    for kind in ModelKind::ALL {
        let mut net = network(kind, 6, 2, 10);
        let batch = [4, 0, 5, 2];
        let want = naive_logits(&net, &wide_params(&net.exec.params), &batch);
        let got = net.logits(&batch);
        assert_close(&got, &want, 1e-4, 1e-4, kind.name());
        // Every layer's output is in the activation buffers (the input of forward_from).
        assert_eq!(
            net.exec.activation(net.exec.plan.len(), batch.len()),
            got.as_slice()
        );
        let loss = net.batch_loss(&batch, Reduction::Sum);
        let want = naive_loss(&net, &wide_params(&net.exec.params), &batch, Reduction::Sum);
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs(),
            "{}: loss {loss} vs {want}",
            kind.name()
        );
    }
}

#[test]
fn forward_from_a_middle_layer_reproduces_the_full_forward() {
    for kind in ModelKind::ALL {
        let mut net = network(kind, 4, 1, 11);
        let batch = [3, 1, 2];
        let full = net.logits(&batch);
        net.exec.forward_from(0, batch.len(), Mode::Train, true);
        assert_eq!(
            net.exec.activation(net.exec.plan.len(), batch.len()),
            full.as_slice()
        );
        for first in 1..net.exec.plan.len() {
            // Scribble over everything after the cached input of `first`, then rerun from it.
            for buf in &mut net.exec.ws.acts[first + 1..] {
                buf.fill(f32::NAN);
            }
            net.exec.forward_from(first, batch.len(), Mode::Train, true);
            assert_eq!(
                net.exec.activation(net.exec.plan.len(), batch.len()),
                full.as_slice(),
                "{} from {first}",
                kind.name()
            );
        }
    }
}

/// Up to `per_array` scalar indices of each parameter array (all of them when it is small).
fn sample_coordinates(p: &Params, per_array: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = tu::rng(seed);
    let mut out = Vec::new();
    for (a, v) in p.values.iter().enumerate() {
        if v.len() <= per_array {
            out.extend((0..v.len()).map(|i| (a, i)));
        } else {
            out.extend((0..per_array).map(|_| (a, rng.random_range(0..v.len()))));
        }
    }
    out
}

/// Checks `loss_and_grad` on 4 samples against central differences of the naive f64 loss at
/// `per_array` coordinates of every parameter array. The step is small enough that no ReLU
/// crosses its kink (larger steps visibly do in the six-layer model).
fn check_gradient(spec: &ModelSpec, reduction: Reduction, per_array: usize, seed: u64) {
    let mut net = network_of(spec, 6, 1, seed);
    let batch = [5, 1, 3, 0];
    let (loss, grads) = net.loss_and_grad(&batch, reduction);
    let mut p = wide_params(&net.exec.params);
    let want = naive_loss(&net, &p, &batch, reduction);
    assert!(
        (loss - want).abs() <= 1e-4 * want.abs(),
        "loss {loss} vs {want}"
    );
    let coords = sample_coordinates(&net.exec.params, per_array, seed);
    let h = 1e-6;
    let mut fd = Vec::new();
    for &(a, i) in &coords {
        let w = p[a][i];
        p[a][i] = w + h;
        let up = naive_loss(&net, &p, &batch, reduction);
        p[a][i] = w - h;
        let down = naive_loss(&net, &p, &batch, reduction);
        p[a][i] = w;
        fd.push((up - down) / (2.0 * h));
    }
    let got: Vec<f32> = coords.iter().map(|&(a, i)| grads[a][i]).collect();
    let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(
        &got,
        &fd,
        1e-3,
        1e-4 * scale,
        &format!("{} {reduction:?} gradient", spec.name),
    );
}

proptest! {
    #![proptest_config(config(3))]
    #[test]
    fn one_conv_gradient_matches_finite_differences(seed in 0u64..1000, sum in any::<bool>()) {
        let reduction = if sum { Reduction::Sum } else { Reduction::Mean };
        check_gradient(&ModelKind::OneConv.mnist(), reduction, 40, seed);
    }

    #[test]
    fn two_conv_gradient_matches_finite_differences(seed in 0u64..1000, sum in any::<bool>()) {
        let reduction = if sum { Reduction::Sum } else { Reduction::Mean };
        check_gradient(&ModelKind::TwoConv.mnist(), reduction, 6, seed);
    }

    /// On 14×14 images (14 → 7 → 3 after the mean pools, so an odd edge is dropped) to keep
    /// the naive six-conv forward passes quick.
    #[test]
    fn paper_gradient_matches_finite_differences(seed in 0u64..1000, sum in any::<bool>()) {
        let reduction = if sum { Reduction::Sum } else { Reduction::Mean };
        check_gradient(&ModelKind::Paper.spec(1, 14, 10), reduction, 2, seed);
    }
}

#[test]
fn reference_candidate_losses_are_the_losses_at_w_and_w_plus_minus_delta() {
    // The engine's own `candidate_losses` is the incremental path (tests/incremental.rs holds it
    // to this one within a tolerance); this is the reference path, exactly.
    use rso_models::network::reference_candidate_losses;
    for kind in ModelKind::ALL {
        let mut net = network(kind, 8, 1, 20);
        let batch = [7, 2, 2, 5, 0];
        let before = net.params();
        // The last array (dense) and the first (first conv) of every model.
        for (param, index) in [(0, 3), (before.values.len() - 1, 5)] {
            let delta = 0.05;
            let got =
                reference_candidate_losses(&mut net, &batch, param, index, delta, Reduction::Mean);
            assert_eq!(net.params(), before, "{}: weights changed", kind.name());
            let w = net.weight(param, index);
            let mut want = [0.0; 3];
            for (k, v) in [w, w + delta, w - delta].into_iter().enumerate() {
                net.set_weight(param, index, v);
                want[k] = net.batch_loss(&batch, Reduction::Mean);
            }
            net.set_weight(param, index, w);
            assert_eq!(got, want, "{} param {param}", kind.name());
            assert_ne!(
                got[1],
                got[0],
                "{}: a change of {delta} moved nothing",
                kind.name()
            );

            let same =
                reference_candidate_losses(&mut net, &batch, param, index, 0.0, Reduction::Sum);
            assert_eq!(
                [same[0], same[0]],
                [same[1], same[2]],
                "{}: delta 0",
                kind.name()
            );
            assert_eq!(same[0], net.batch_loss(&batch, Reduction::Sum));
        }
    }
}

#[test]
fn calibrated_evaluation_of_a_batch_equals_its_training_mode_loss() {
    for kind in ModelKind::ALL {
        let mut net = network(kind, 12, 3, 30);
        let batch: Vec<u32> = (0..9).collect();
        let train_loss = net.batch_loss(&batch, Reduction::Mean);
        net.calibrate_bn(&batch);
        let eval = net.evaluate(SplitKind::Train, Some(batch.len()));
        assert_eq!(eval.samples, 9);
        assert_eq!(eval.loss, train_loss, "{}", kind.name());
        let logits = net.logits(&batch);
        let hits = (0..9).filter(|&i| {
            crate::kernels::loss::argmax(aview1(&logits[i * 10..][..10]))
                == net.exec.train.labels[i] as usize
        });
        assert_eq!(eval.accuracy, hits.count() as f64 / 9.0);
    }
}

#[test]
fn evaluation_before_calibration_uses_mean_zero_variance_one() {
    let mut net = network(ModelKind::Paper, 2, 5, 40);
    let p = wide_params(&net.exec.params);
    let identity: Vec<(Vec<f64>, Vec<f64>)> =
        (0..6).map(|_| (vec![0.0; 16], vec![1.0; 16])).collect();
    let images = wide(&net.exec.test.images);
    let z = tu::forward(&net.exec.spec, &p, &images, 5, Some(&identity));
    let want = tu::cross_entropy(5, 10, &z, &net.exec.test.labels)
        .iter()
        .sum::<f64>()
        / 5.0;
    let eval = net.evaluate(SplitKind::Test, None);
    assert_eq!(eval.samples, 5);
    assert!(
        (eval.loss - want).abs() < 1e-4 * want,
        "{} vs {want}",
        eval.loss
    );
}

#[test]
fn evaluation_spans_several_chunks_and_honours_the_limit() {
    let n = EVAL_CHUNK + 17;
    let spec = ModelKind::OneConv.mnist();
    let set = random_set(&spec, n, 50);
    let params = random_params(&spec, 51);
    let split = Split::new(set.clone(), set);
    let mut net = CpuNetwork::new(&spec, &params, split).expect("valid network");
    let all = net.evaluate(SplitKind::Test, None);
    assert_eq!(all.samples, n);
    // Without BatchNorm, evaluation is the training-mode loss of the whole set, summed in the
    // same sample order.
    let batch: Vec<u32> = (0..n as u32).collect();
    assert_eq!(all.loss, net.batch_loss(&batch, Reduction::Mean));
    let logits = net.logits(&batch);
    let hits = (0..n).filter(|&i| {
        crate::kernels::loss::argmax(aview1(&logits[i * 10..][..10]))
            == net.exec.test.labels[i] as usize
    });
    assert_eq!(all.accuracy, hits.count() as f64 / n as f64);

    assert_eq!(net.evaluate(SplitKind::Test, Some(10 * n)).samples, n);
    let some = net.evaluate(SplitKind::Train, Some(3));
    assert_eq!(some.samples, 3);
    assert_eq!(some.loss, net.batch_loss(&[0, 1, 2], Reduction::Mean));
    let none = net.evaluate(SplitKind::Train, Some(0));
    assert_eq!((none.samples, none.loss, none.accuracy), (0, 0.0, 0.0));
}

#[test]
fn the_validation_set_evaluates_as_the_test_set_does() {
    for kind in ModelKind::ALL {
        let spec = kind.mnist();
        // One-conv spans two evaluation chunks; the BatchNorm models stay small.
        let n = if kind == ModelKind::OneConv {
            EVAL_CHUNK + 17
        } else {
            23
        };
        let set = random_set(&spec, n, 60);
        let split = Split {
            train: random_set(&spec, 12, 61),
            test: set.clone(),
            validation: set,
        };
        let mut net = CpuNetwork::new(&spec, &random_params(&spec, 62), split).expect("valid");
        net.calibrate_bn(&[0, 3, 5, 7, 11]);
        let test = net.evaluate(SplitKind::Test, None);
        let validation = net.evaluate(SplitKind::Validation, None);
        assert_eq!(validation.samples, n, "{}", kind.name());
        assert_eq!(validation, test, "{}", kind.name());
        assert_eq!(
            net.evaluate(SplitKind::Validation, Some(7)),
            net.evaluate(SplitKind::Test, Some(7)),
            "{}",
            kind.name()
        );
        // The validation set is not the training set: evaluating it says something else.
        assert_ne!(validation, net.evaluate(SplitKind::Train, None));
    }
}

#[test]
fn an_empty_validation_set_evaluates_to_no_samples() {
    let mut net = network(ModelKind::TwoConv, 6, 4, 70);
    assert!(net.exec.validation.is_empty());
    net.calibrate_bn(&[0, 1, 2]);
    let eval = net.evaluate(SplitKind::Validation, None);
    assert_eq!((eval.samples, eval.loss, eval.accuracy), (0, 0.0, 0.0));
    // Training and test evaluation still see their sets afterwards.
    assert_eq!(net.evaluate(SplitKind::Test, None).samples, 4);
    assert_eq!(net.evaluate(SplitKind::Train, None).samples, 6);
}

#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    let pool = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool")
    };
    let (one, two) = (pool(1), pool(2));
    for kind in ModelKind::ALL {
        // Big enough that every step splits over two threads and the convolution weight
        // gradients use several chunks.
        let n = 3 * GRAD_CHUNK + 5;
        let batch: Vec<u32> = (0..n as u32).rev().collect();
        let run = |pool: &rayon::ThreadPool, par_min_work| {
            let mut net = network(kind, n, 40, 60);
            net.exec.par_min_work = par_min_work;
            pool.install(|| {
                let loss = net.batch_loss(&batch, Reduction::Sum);
                let (gl, grads) = net.loss_and_grad(&batch, Reduction::Mean);
                net.calibrate_bn(&batch[..50]);
                let eval = net.evaluate(SplitKind::Test, None);
                let bits: Vec<u32> = grads.iter().flatten().map(|g| g.to_bits()).collect();
                (loss.to_bits(), gl.to_bits(), bits, eval.loss.to_bits())
            })
        };
        // Every step split over two threads, and the default choice.
        let single = run(&one, 0);
        assert!(single == run(&two, 0), "{}: every step split", kind.name());
        assert!(
            single == run(&two, PAR_MIN_WORK),
            "{}: default threading",
            kind.name()
        );
    }
}

#[test]
fn sgd_step_is_a_plain_gradient_step() {
    for kind in ModelKind::ALL {
        let mut net = network(kind, 6, 1, 70);
        let batch = [1, 4, 2];
        let before = net.params();
        let (loss, grads) = net.loss_and_grad(&batch, Reduction::Mean);
        assert_eq!(net.sgd_step(&batch, 0.1), loss);
        for ((after, before), g) in net
            .exec
            .params
            .values
            .iter()
            .zip(&before.values)
            .zip(&grads)
        {
            for ((a, b), g) in after.iter().zip(before).zip(g) {
                assert_eq!(*a, b - 0.1 * g);
            }
        }
        assert!(
            net.batch_loss(&batch, Reduction::Mean) < loss,
            "{}: step did not descend",
            kind.name()
        );
    }
}

#[test]
fn the_gathered_batch_is_reused_only_when_it_is_the_same() {
    let mut net = network(ModelKind::TwoConv, 10, 4, 80);
    let (a, b) = ([1, 2, 3], [1, 2, 4]);
    let la = net.batch_loss(&a, Reduction::Sum);
    let lb = net.batch_loss(&b, Reduction::Sum);
    assert_ne!(la, lb);
    net.evaluate(SplitKind::Test, None);
    assert_eq!(net.batch_loss(&a, Reduction::Sum), la);
    assert_eq!(
        net.batch_loss(&a[..2], Reduction::Sum),
        network(ModelKind::TwoConv, 10, 4, 80).batch_loss(&a[..2], Reduction::Sum)
    );
    assert_eq!(net.batch_loss(&b, Reduction::Sum), lb);
}

#[test]
fn an_empty_batch_has_zero_loss_and_zero_gradient() {
    for kind in ModelKind::ALL {
        let mut net = network(kind, 3, 1, 90);
        assert_eq!(net.batch_loss(&[], Reduction::Mean), 0.0);
        let (loss, grads) = net.loss_and_grad(&[], Reduction::Sum);
        assert_eq!(loss, 0.0);
        assert!(grads.iter().flatten().all(|&g| g == 0.0), "{}", kind.name());
        net.calibrate_bn(&[]);
        assert!(net.logits(&[]).is_empty());
    }
}

#[test]
fn weights_and_parameters_round_trip() {
    let mut net = network(ModelKind::Paper, 2, 1, 100);
    assert_eq!(
        (net.backend(), net.device().as_str(), net.train_len()),
        ("cpu", "cpu", 2)
    );
    net.set_weight(3, 7, 1.25);
    assert_eq!(net.weight(3, 7), 1.25);
    assert_eq!(net.params().values[3][7], 1.25);
    let mut p = net.params();
    p.values[0][0] = -3.0;
    net.set_params(&p).expect("same layout");
    assert_eq!(net.weight(0, 0), -3.0);
    let other = Params::zeros(&ModelKind::OneConv.mnist());
    assert!(matches!(
        net.set_params(&other),
        Err(BackendError::Params(_))
    ));
}

#[test]
fn construction_rejects_what_does_not_fit() {
    let spec = ModelKind::OneConv.mnist();
    let params = random_params(&spec, 1);
    let good = || Split::new(random_set(&spec, 4, 2), random_set(&spec, 3, 3));
    let err = |split: Split, params: &Params| match CpuNetwork::new(&spec, params, split) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };

    let e = err(good(), &random_params(&ModelKind::TwoConv.mnist(), 1));
    assert!(matches!(e, BackendError::Params(_)), "{e}");

    let mut split = good();
    split.test.images[2 * 784 + 5] = f32::NAN;
    let e = err(split, &params).to_string();
    assert!(e.contains("test set") && e.contains("sample 2"), "{e}");

    let mut split = good();
    split.train.images[3 * 784] = f32::INFINITY;
    let e = err(split, &params).to_string();
    assert!(e.contains("training set") && e.contains("sample 3"), "{e}");

    let mut split = good();
    split.train.labels[1] = 10;
    let e = err(split, &params).to_string();
    assert!(
        e.contains("training set") && e.contains("sample 1") && e.contains("label 10"),
        "{e}"
    );

    let mut split = good();
    split.train.height = 14;
    split.train.width = 56;
    assert!(matches!(err(split, &params), BackendError::Data(_)));

    let mut split = good();
    split.test.images.pop();
    assert!(matches!(err(split, &params), BackendError::Data(_)));

    // A validation set is checked like the others once it holds samples.
    let mut split = good();
    split.validation = random_set(&spec, 3, 4);
    split.validation.labels[1] = 10;
    let e = err(split, &params).to_string();
    assert!(
        e.contains("validation set") && e.contains("sample 1"),
        "{e}"
    );
    let mut split = good();
    split.validation = random_set(&spec, 2, 4);
    split.validation.images[784] = f32::NAN;
    let e = err(split, &params).to_string();
    assert!(
        e.contains("validation set") && e.contains("sample 1"),
        "{e}"
    );

    // A spec whose shapes do not chain.
    let mut bad = spec.clone();
    bad.layers.remove(2); // the max pool: dense now gets 4×28×28 inputs
    let e = CpuNetwork::new(&bad, &Params::zeros(&bad), good())
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(e, BackendError::Params(_)) && e.to_string().contains("dense"),
        "{e}"
    );
}

#[test]
fn a_single_threaded_loss_on_a_batch_no_larger_than_before_allocates_nothing() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("thread pool");
    for kind in ModelKind::ALL {
        let mut net = network(kind, 40, 1, 110);
        pool.install(|| {
            net.batch_loss(&(0..32).collect::<Vec<u32>>(), Reduction::Mean);
            // The incremental path builds its caches on its first visit of a layer.
            let _ =
                net.candidate_losses(&(0..32).collect::<Vec<u32>>(), 0, 0, 0.1, Reduction::Mean);
            for start in 1..4u32 {
                let batch: Vec<u32> = (start..start + 32).collect();
                let allocated = tu::allocations();
                let _ = net.candidate_losses(&batch, 0, 1, 0.1, Reduction::Mean);
                assert_eq!(
                    tu::allocations(),
                    allocated,
                    "{}: candidate_losses allocated",
                    kind.name()
                );
            }
            // A batch seen before, with the visited layer changed since (the per-batch memo's
            // hits recompute the changed channels): after one such hit, nothing either.
            let batch: Vec<u32> = (1..33).collect();
            for hit in 0..2 {
                let w = net.weight(0, 1);
                net.set_weight(0, 1, w + 0.01);
                let allocated = tu::allocations();
                let _ = net.candidate_losses(&batch, 0, 1, 0.1, Reduction::Mean);
                assert!(
                    hit == 0 || tu::allocations() == allocated,
                    "{}: a recurring batch's candidate_losses allocated",
                    kind.name()
                );
            }
            // The counter does see the engine's allocations: a larger batch grows the buffers.
            let batch: Vec<u32> = (0..40).collect();
            let allocated = tu::allocations();
            net.batch_loss(&batch, Reduction::Mean);
            assert!(
                tu::allocations() > allocated,
                "{}: nothing counted",
                kind.name()
            );
        });
    }
}
