//! A checkpoint written through this engine loads in PyTorch (the `.venv` of
//! scripts/setup-libtorch.sh) and computes the same logits there. Skipped, with a message, when
//! that Python is missing.

mod common;

use common::{random_params, random_split};
use rso_models::{Layer, ModelKind, ModelSpec, Network};
use rso_tch::TchNetwork;
use rso_testkit::{max_abs, wide, Tol};
use std::path::PathBuf;

/// The model as tests/py/forward.py reads it.
fn describe(spec: &ModelSpec) -> String {
    let layers: Vec<String> = spec
        .layers
        .iter()
        .map(|l| match l {
            Layer::Conv { name, .. } => format!(r#"{{"kind":"conv","name":"{name}"}}"#),
            Layer::Relu => r#"{"kind":"relu"}"#.into(),
            Layer::MaxPool2 => r#"{"kind":"maxpool"}"#.into(),
            Layer::AvgPool2 => r#"{"kind":"avgpool"}"#.into(),
            Layer::BatchNorm { name, .. } => format!(r#"{{"kind":"bn","name":"{name}"}}"#),
            Layer::GlobalAvgPool => r#"{"kind":"gap"}"#.into(),
            Layer::Dense { name, .. } => format!(r#"{{"kind":"dense","name":"{name}"}}"#),
        })
        .collect();
    let [c, h, w] = spec.input;
    format!(
        r#"{{"input":[{c},{h},{w}],"layers":[{}]}}"#,
        layers.join(",")
    )
}

#[test]
fn pytorch_reads_checkpoints_and_computes_the_same_logits() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("../../.venv/bin/python");
    if !python.exists() {
        eprintln!(
            "skipped: no {} (run scripts/setup-libtorch.sh)",
            python.display()
        );
        return;
    }
    common::single_threaded();
    let dir = tempfile::tempdir().expect("temp dir");
    for kind in ModelKind::ALL {
        let spec = kind.mnist();
        let split = random_split(&spec, 6, 1, 80);
        let mut net =
            TchNetwork::new(&spec, &random_params(&spec, 81), &split, "cpu").expect("engine");
        net.sgd_step(&[0, 1, 2], 0.01);
        let ckpt = dir.path().join(format!("{}.safetensors", kind.name()));
        net.params().save(&ckpt).expect("save");
        let batch: Vec<u32> = (0..6).collect();
        let images: Vec<u8> = split
            .train
            .images
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let input = dir.path().join("images.f32");
        std::fs::write(&input, images).expect("write images");

        let out = std::process::Command::new(&python)
            .arg(root.join("tests/py/forward.py"))
            .arg(&ckpt)
            .arg(describe(&spec))
            .arg(&input)
            .arg(batch.len().to_string())
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{}: {}",
            kind.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("");
        let got: Vec<f64> = line
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|v| v.trim().parse::<f64>().unwrap_or(f64::NAN))
            .collect();
        let want = wide(&net.logits(&batch));
        Tol::scaled(1e-4, max_abs(&want, 1.0))
            .check(&format!("{} logits in PyTorch", kind.name()), &got, &want)
            .unwrap();
    }
}
