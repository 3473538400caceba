//! Tests of the libtorch backend on its own: devices and their errors, input checks, scalar
//! access, the RSO reference path, SGD, BatchNorm calibration, evaluation and checkpoints.

mod common;

use common::{random_batch, random_params, random_split};
use rso_models::network::reference_candidate_losses;
use rso_models::{BackendError, ModelKind, Network, Params, Reduction, SplitKind};
use rso_tch::TchNetwork;
use rso_testkit::{wide, Tol};

fn net(kind: ModelKind, device: &str, seed: u64) -> TchNetwork {
    common::single_threaded();
    let spec = kind.mnist();
    let split = random_split(&spec, 24, 12, seed);
    TchNetwork::new(&spec, &random_params(&spec, seed + 1), &split, device).expect("engine")
}

fn device_error(device: &str) -> String {
    let spec = ModelKind::OneConv.mnist();
    let split = random_split(&spec, 2, 1, 0);
    match TchNetwork::new(&spec, &Params::zeros(&spec), &split, device) {
        Err(e @ BackendError::Device(_)) => e.to_string(),
        Err(e) => panic!("{device}: expected a device error, got {e}"),
        Ok(_) => panic!("{device}: expected an error"),
    }
}

#[test]
fn unknown_devices_are_refused_by_name() {
    for bad in ["gpu", "cuda:x", "cuda:-1", ""] {
        let err = device_error(bad);
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
    }
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if rso_tch::cuda_available() {
        let err = device_error("cuda:4096");
        assert!(err.contains("only"), "{err}");
        return;
    }
    for dev in ["cuda", "cuda:0", "cuda:1"] {
        let err = device_error(dev);
        assert!(
            err.contains("CUDA requested but no CUDA device is available ("),
            "{err}"
        );
    }
    eprintln!("no CUDA here: {}", device_error("cuda"));
}

#[test]
fn bad_inputs_are_data_errors() {
    let spec = ModelKind::OneConv.mnist();
    let params = Params::zeros(&spec);
    let split = random_split(&spec, 4, 2, 3);

    let mut s = split.clone();
    s.train.labels[2] = 10;
    let err = TchNetwork::new(&spec, &params, &s, "cpu")
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 10"), "{err}");

    let mut s = split.clone();
    s.test.images[5] = f32::NAN;
    let err = TchNetwork::new(&spec, &params, &s, "cpu")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test image 0") && err.contains("non-finite"),
        "{err}"
    );

    let other = ModelKind::OneConv.spec(1, 8, 10);
    let err = TchNetwork::new(&other, &Params::zeros(&other), &split, "cpu")
        .unwrap_err()
        .to_string();
    assert!(err.contains("8×8"), "{err}");

    let err = TchNetwork::new(
        &spec,
        &Params::zeros(&ModelKind::TwoConv.mnist()),
        &split,
        "cpu",
    )
    .unwrap_err();
    assert!(matches!(err, BackendError::Params(_)), "{err}");
}

#[test]
fn weights_round_trip_through_scalar_access_and_params() {
    let mut n = net(ModelKind::TwoConv, "cpu", 10);
    let before = n.params();
    assert_eq!(n.weight(2, 17), before.values[2][17]);
    n.set_weight(2, 17, 0.625);
    n.set_weight(0, 0, -3.5);
    assert_eq!(n.weight(2, 17), 0.625);
    let after = n.params();
    assert_eq!(after.values[2][17], 0.625);
    assert_eq!(after.values[0][0], -3.5);
    // Untouched scalars are bit-identical after the device round trip.
    assert_eq!(after.values[4], before.values[4]);
    n.set_params(&before).expect("same layout");
    assert_eq!(n.params(), before);
    assert_eq!(
        (n.backend(), n.device(), n.train_len()),
        ("tch", "cpu".to_string(), 24)
    );
}

/// The engine's candidate losses (its incremental path; `tests/incremental.rs` tests it in
/// depth) against the trait's reference path, and the weight left as it was.
#[test]
fn candidate_losses_match_the_trait_reference_and_restore_the_weight() {
    for kind in ModelKind::ALL {
        let mut n = net(kind, "cpu", 20);
        let batch = random_batch(24, 7, 21);
        for (param, index, delta) in [
            (0, 3, 0.3f32),
            (1, 0, -0.05),
            (n.params().specs.len() - 1, 5, 0.2),
        ] {
            let w = n.weight(param, index);
            for reduction in [Reduction::Mean, Reduction::Sum] {
                let fast = n.candidate_losses(&batch, param, index, delta, reduction);
                let reference =
                    reference_candidate_losses(&mut n, &batch, param, index, delta, reduction);
                let tol = Tol {
                    rtol: 1e-5,
                    atol: 0.0,
                };
                tol.check(&format!("{} candidates", kind.name()), &fast, &reference)
                    .unwrap();
                assert_eq!(n.weight(param, index), w);
                let at_w = n.batch_loss(&batch, reduction);
                tol.check(&format!("{} loss at W", kind.name()), &fast[..1], &[at_w])
                    .unwrap();
            }
        }
    }
}

#[test]
fn sgd_step_is_w_minus_lr_grad_in_place() {
    for kind in ModelKind::ALL {
        let mut n = net(kind, "cpu", 30);
        let batch = random_batch(24, 9, 31);
        let before = n.params();
        let (loss, grads) = n.loss_and_grad(&batch, Reduction::Mean);
        let lr = 1e-3f32;
        let step_loss = n.sgd_step(&batch, lr);
        assert_eq!(step_loss, loss);
        let after = n.params();
        for ((b, a), g) in before.values.iter().zip(&after.values).zip(&grads) {
            let want: Vec<f64> = b
                .iter()
                .zip(g)
                .map(|(w, d)| f64::from(w - lr * d))
                .collect();
            Tol {
                rtol: 1e-6,
                atol: 1e-7,
            }
            .check(kind.name(), &wide(a), &want)
            .unwrap();
        }
        assert!(
            n.batch_loss(&batch, Reduction::Mean) < loss,
            "{}: a small step lowers the loss",
            kind.name()
        );
    }
}

#[test]
fn calibrated_evaluation_reproduces_the_training_mode_loss() {
    let mut n = net(ModelKind::Paper, "cpu", 40);
    for (mean, var) in n.bn_running_stats() {
        assert!(mean.iter().all(|&m| m == 0.0) && var.iter().all(|&v| v == 1.0));
    }
    let batch: Vec<u32> = (0..10).collect();
    let uncalibrated = n.evaluate(SplitKind::Train, Some(10));
    n.calibrate_bn(&batch);
    let eval = n.evaluate(SplitKind::Train, Some(10));
    let train_mode = n.batch_loss(&batch, Reduction::Mean);
    assert!(
        Tol {
            rtol: 1e-5,
            atol: 0.0
        }
        .close(eval.loss, train_mode),
        "{eval:?} vs {train_mode}"
    );
    assert!(
        (eval.loss - uncalibrated.loss).abs() > 1e-3,
        "calibration changed nothing"
    );
    assert_eq!(eval.samples, 10);
    // The running variance is the biased one: for a single sample and a 1×1 plane it would be 0;
    // here check it against the training-mode logits instead.
    let logits = n.logits(&batch);
    assert_eq!(logits.len(), 100);
}

#[test]
fn evaluate_counts_argmax_hits() {
    let mut n = net(ModelKind::OneConv, "cpu", 50);
    let all: Vec<u32> = (0..24).collect();
    let logits = n.logits(&all);
    let labels = random_split(&ModelKind::OneConv.mnist(), 24, 12, 50)
        .train
        .labels;
    let hits = logits
        .chunks(10)
        .zip(&labels)
        .filter(|(row, &l)| {
            let best = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
            best == l as usize
        })
        .count();
    let eval = n.evaluate(SplitKind::Train, None);
    assert_eq!(eval.samples, 24);
    assert_eq!(eval.accuracy, hits as f64 / 24.0);
    let mean = n.batch_loss(&all, Reduction::Mean);
    assert!(Tol {
        rtol: 1e-9,
        atol: 0.0
    }
    .close(eval.loss, mean));
    assert_eq!(n.evaluate(SplitKind::Test, Some(5)).samples, 5);
}

#[test]
fn the_validation_set_is_resident_and_empty_when_none_is_held_out() {
    common::single_threaded();
    let spec = ModelKind::TwoConv.mnist();
    let params = random_params(&spec, 60);
    // None held out: evaluating it gives no samples.
    let mut none =
        TchNetwork::new(&spec, &params, &random_split(&spec, 8, 4, 61), "cpu").expect("engine");
    let eval = none.evaluate(SplitKind::Validation, None);
    assert_eq!((eval.samples, eval.loss, eval.accuracy), (0, 0.0, 0.0));
    // The test set placed in the validation slot evaluates exactly as the test set.
    let mut split = random_split(&spec, 8, 5, 62);
    split.validation = split.test.clone();
    let mut n = TchNetwork::new(&spec, &params, &split, "cpu").expect("engine");
    n.calibrate_bn(&[0, 2, 4, 6]);
    let test = n.evaluate(SplitKind::Test, None);
    assert_eq!(test.samples, 5);
    assert_eq!(n.evaluate(SplitKind::Validation, None), test);
    assert_eq!(
        n.evaluate(SplitKind::Validation, Some(2)),
        n.evaluate(SplitKind::Test, Some(2))
    );
    // A held-out set is checked like the others.
    let mut bad = random_split(&spec, 8, 5, 63);
    bad.validation = bad.test.clone();
    bad.validation.labels[3] = 10;
    let e = TchNetwork::new(&spec, &params, &bad, "cpu").unwrap_err();
    assert!(e.to_string().contains("validation"), "{e}");
}

#[test]
fn checkpoints_round_trip_through_safetensors() {
    let dir = tempfile::tempdir().expect("temp dir");
    for kind in ModelKind::ALL {
        let spec = kind.mnist();
        let mut n = net(kind, "cpu", 60);
        n.sgd_step(&[1, 2, 3], 0.1);
        let path = dir.path().join(format!("{}.safetensors", kind.name()));
        n.params().save(&path).expect("save");
        let loaded = Params::load(&spec, &path).expect("load");
        assert_eq!(loaded, n.params());
        let split = random_split(&spec, 24, 12, 60);
        let mut m = TchNetwork::new(&spec, &loaded, &split, "cpu").expect("engine");
        assert_eq!(m.logits(&[0, 5, 7]), n.logits(&[0, 5, 7]));
    }
}

#[test]
fn cuda_support_loads_with_full_f32_convolutions() {
    let precision = rso_tch::cuda_conv_precision();
    if cfg!(feature = "cuda") {
        // The libtorch of scripts/setup-libtorch.sh is the CUDA wheel: libtorch_cuda.so loads
        // even without a GPU, and TF32 must be off for cuDNN convolutions.
        assert_eq!(
            precision,
            "ieee",
            "{:?}",
            rso_tch::cuda_unavailable_reason()
        );
    } else {
        assert_eq!(precision, "not-loaded");
        let why = rso_tch::cuda_unavailable_reason().expect("no CUDA without the feature");
        assert!(why.contains("`cuda` feature"), "{why}");
    }
}
