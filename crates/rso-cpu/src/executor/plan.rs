//! The plan: a [`ModelSpec`]'s layers resolved into [`Step`]s with their shapes and parameter
//! arrays, and the checks of the resident data against it.

use crate::kernels::conv::Conv3x3;
use rso_data::Dataset;
use rso_models::{EngineError, Layer, ModelSpec, ParamError};

/// One layer, with its shapes resolved and its parameter arrays located.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Conv {
        conv: Conv3x3,
        weight: usize,
        bias: Option<usize>,
    },
    Relu,
    MaxPool {
        c: usize,
        h: usize,
        w: usize,
    },
    AvgPool {
        c: usize,
        h: usize,
        w: usize,
    },
    BatchNorm {
        c: usize,
        hw: usize,
        gamma: usize,
        beta: usize,
        slot: usize,
    },
    GlobalAvgPool {
        c: usize,
        hw: usize,
    },
    Dense {
        d_in: usize,
        d_out: usize,
        weight: usize,
        bias: Option<usize>,
    },
}

/// A layer of the plan: its operation and per-sample sizes.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub(crate) op: Op,
    /// Input values per sample.
    pub(crate) in_len: usize,
    /// Output values per sample.
    pub(crate) out_len: usize,
    /// Rough forward cost per sample, in multiply-add equivalents (for the threading choice).
    pub(crate) work: usize,
}

/// Resolves the layers of `spec` into steps, checking that their shapes chain.
pub(super) fn build_plan(spec: &ModelSpec) -> Result<Vec<Step>, EngineError> {
    let bad = |reason: String| {
        EngineError::Params(ParamError::Mismatch {
            context: format!("model {}", spec.name),
            reason,
        })
    };
    let [mut c, mut h, mut w] = spec.input;
    let mut plan = Vec::with_capacity(spec.layers.len());
    let (mut param, mut slot) = (0, 0);
    for (i, layer) in spec.layers.iter().enumerate() {
        let in_len = c * h * w;
        let op = match layer {
            Layer::Conv {
                c_in, c_out, bias, ..
            } => {
                if *c_in != c {
                    return Err(bad(format!(
                        "layer {i}: conv expects {c_in} channels, gets {c}"
                    )));
                }
                let conv = Conv3x3 {
                    c_in: c,
                    c_out: *c_out,
                    h,
                    w,
                };
                let op = Op::Conv {
                    conv,
                    weight: param,
                    bias: bias.then_some(param + 1),
                };
                param += 1 + usize::from(*bias);
                c = *c_out;
                op
            }
            Layer::Relu => Op::Relu,
            Layer::MaxPool2 | Layer::AvgPool2 => {
                if h < 2 || w < 2 {
                    return Err(bad(format!("layer {i}: cannot pool a {h}×{w} plane")));
                }
                let op = if matches!(layer, Layer::MaxPool2) {
                    Op::MaxPool { c, h, w }
                } else {
                    Op::AvgPool { c, h, w }
                };
                (h, w) = (h / 2, w / 2);
                op
            }
            Layer::BatchNorm { channels, .. } => {
                if *channels != c {
                    return Err(bad(format!(
                        "layer {i}: batch norm over {channels} channels, gets {c}"
                    )));
                }
                let op = Op::BatchNorm {
                    c,
                    hw: h * w,
                    gamma: param,
                    beta: param + 1,
                    slot,
                };
                param += 2;
                slot += 1;
                op
            }
            Layer::GlobalAvgPool => {
                let op = Op::GlobalAvgPool { c, hw: h * w };
                (h, w) = (1, 1);
                op
            }
            Layer::Dense {
                d_in, d_out, bias, ..
            } => {
                if *d_in != in_len {
                    return Err(bad(format!(
                        "layer {i}: dense expects {d_in} inputs, gets {c}×{h}×{w}"
                    )));
                }
                let op = Op::Dense {
                    d_in: *d_in,
                    d_out: *d_out,
                    weight: param,
                    bias: bias.then_some(param + 1),
                };
                param += 1 + usize::from(*bias);
                (c, h, w) = (*d_out, 1, 1);
                op
            }
        };
        let out_len = c * h * w;
        if out_len == 0 {
            return Err(bad(format!("layer {i}: empty output")));
        }
        let work = match &op {
            Op::Conv { conv, .. } => conv.macs(),
            Op::Dense { d_in, d_out, .. } => d_in * d_out,
            Op::BatchNorm { .. } => 4 * in_len,
            _ => 2 * in_len,
        };
        plan.push(Step {
            op,
            in_len,
            out_len,
            work,
        });
    }
    if plan.is_empty() || c * h * w != spec.classes {
        return Err(bad(format!(
            "the last layer gives {c}×{h}×{w} values, not {} logits",
            spec.classes
        )));
    }
    Ok(plan)
}

/// Checks that a resident set fits the model: image shape, pixel count, finite pixels, labels.
pub(super) fn check_set(spec: &ModelSpec, set: &Dataset, name: &str) -> Result<(), EngineError> {
    let shape = [set.channels, set.height, set.width];
    if shape != spec.input {
        return Err(EngineError::Data(format!(
            "{name} set: images are {}×{}×{}, model {} expects {}×{}×{}",
            shape[0], shape[1], shape[2], spec.name, spec.input[0], spec.input[1], spec.input[2]
        )));
    }
    if set.images.len() != set.len() * set.image_len() {
        return Err(EngineError::Data(format!(
            "{name} set: {} pixel values for {} images of {} values",
            set.images.len(),
            set.len(),
            set.image_len()
        )));
    }
    if set.len() > u32::MAX as usize + 1 {
        return Err(EngineError::Data(format!(
            "{name} set: {} samples, more than u32 indices address",
            set.len()
        )));
    }
    if let Some((sample, offset)) = set.first_non_finite() {
        let v = set.images[sample * set.image_len() + offset];
        return Err(EngineError::Data(format!(
            "{name} set: sample {sample} has a non-finite pixel ({v} at offset {offset})"
        )));
    }
    if let Some(i) = set
        .labels
        .iter()
        .position(|&l| usize::from(l) >= spec.classes)
    {
        return Err(EngineError::Data(format!(
            "{name} set: sample {i} has label {}, model {} has {} classes",
            set.labels[i], spec.name, spec.classes
        )));
    }
    Ok(())
}
