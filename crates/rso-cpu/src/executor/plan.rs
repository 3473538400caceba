//! The plan: a [`ModelSpec`]'s layers resolved into [`Step`]s with their shapes and parameter
//! arrays, and the checks of the resident data against it.

use crate::kernels::conv::Conv3x3;
use rso_data::Dataset;
use rso_models::{BackendError, Layer, ModelSpec, ParamError};

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
pub(super) fn build_plan(spec: &ModelSpec) -> Result<Vec<Step>, BackendError> {
    let bad = |reason: String| {
        BackendError::Params(ParamError::Mismatch {
            context: format!("model {}", spec.name),
            reason,
        })
    };
    let [c, h, w] = spec.input;
    let mut at = Cursor {
        c,
        h,
        w,
        param: 0,
        slot: 0,
    };
    let mut plan = Vec::with_capacity(spec.layers.len());
    for (i, layer) in spec.layers.iter().enumerate() {
        let in_len = at.c * at.h * at.w;
        let op = at
            .resolve(layer)
            .map_err(|e| bad(format!("layer {i}: {e}")))?;
        let out_len = at.c * at.h * at.w;
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
    let Cursor { c, h, w, .. } = at;
    if plan.is_empty() || c * h * w != spec.classes {
        return Err(bad(format!(
            "the last layer gives {c}×{h}×{w} values, not {} logits",
            spec.classes
        )));
    }
    Ok(plan)
}

/// Where [`build_plan`] is: the activation shape so far, and the next parameter array and
/// BatchNorm statistics slot.
struct Cursor {
    c: usize,
    h: usize,
    w: usize,
    param: usize,
    slot: usize,
}

impl Cursor {
    /// The operation of `layer` on the current shape, moving past it; the error says why the
    /// shapes do not chain.
    fn resolve(&mut self, layer: &Layer) -> Result<Op, String> {
        let Cursor { c, h, w, .. } = *self;
        let op = match layer {
            Layer::Conv {
                c_in, c_out, bias, ..
            } => {
                if *c_in != c {
                    return Err(format!("conv expects {c_in} channels, gets {c}"));
                }
                let conv = Conv3x3 {
                    c_in: c,
                    c_out: *c_out,
                    h,
                    w,
                };
                self.c = *c_out;
                self.arrays(Op::Conv {
                    conv,
                    weight: self.param,
                    bias: bias.then_some(self.param + 1),
                })
            }
            Layer::Relu => Op::Relu,
            Layer::MaxPool2 | Layer::AvgPool2 => {
                if h < 2 || w < 2 {
                    return Err(format!("cannot pool a {h}×{w} plane"));
                }
                (self.h, self.w) = (h / 2, w / 2);
                if matches!(layer, Layer::MaxPool2) {
                    Op::MaxPool { c, h, w }
                } else {
                    Op::AvgPool { c, h, w }
                }
            }
            Layer::BatchNorm { channels, .. } => {
                if *channels != c {
                    return Err(format!("batch norm over {channels} channels, gets {c}"));
                }
                self.slot += 1;
                self.arrays(Op::BatchNorm {
                    c,
                    hw: h * w,
                    gamma: self.param,
                    beta: self.param + 1,
                    slot: self.slot - 1,
                })
            }
            Layer::GlobalAvgPool => {
                (self.h, self.w) = (1, 1);
                Op::GlobalAvgPool { c, hw: h * w }
            }
            Layer::Dense {
                d_in, d_out, bias, ..
            } => {
                if *d_in != c * h * w {
                    return Err(format!("dense expects {d_in} inputs, gets {c}×{h}×{w}"));
                }
                (self.c, self.h, self.w) = (*d_out, 1, 1);
                self.arrays(Op::Dense {
                    d_in: *d_in,
                    d_out: *d_out,
                    weight: self.param,
                    bias: bias.then_some(self.param + 1),
                })
            }
        };
        Ok(op)
    }

    /// Moves the parameter cursor past `op`'s arrays; returns `op`.
    fn arrays(&mut self, op: Op) -> Op {
        self.param += match op {
            Op::Conv { bias, .. } | Op::Dense { bias, .. } => 1 + usize::from(bias.is_some()),
            Op::BatchNorm { .. } => 2,
            _ => 0,
        };
        op
    }
}

/// Checks that a resident set fits the model: image shape, pixel count, finite pixels, labels.
pub(super) fn check_set(spec: &ModelSpec, set: &Dataset, name: &str) -> Result<(), BackendError> {
    let shape = [set.channels, set.height, set.width];
    if shape != spec.input {
        return Err(BackendError::Data(format!(
            "{name} set: images are {}×{}×{}, model {} expects {}×{}×{}",
            shape[0], shape[1], shape[2], spec.name, spec.input[0], spec.input[1], spec.input[2]
        )));
    }
    if set.images.len() != set.len() * set.image_len() {
        return Err(BackendError::Data(format!(
            "{name} set: {} pixel values for {} images of {} values",
            set.images.len(),
            set.len(),
            set.image_len()
        )));
    }
    if set.len() > u32::MAX as usize + 1 {
        return Err(BackendError::Data(format!(
            "{name} set: {} samples, more than u32 indices address",
            set.len()
        )));
    }
    if let Some((sample, offset)) = set.first_non_finite() {
        let v = set.images[sample * set.image_len() + offset];
        return Err(BackendError::Data(format!(
            "{name} set: sample {sample} has a non-finite pixel ({v} at offset {offset})"
        )));
    }
    if let Some(i) = set
        .labels
        .iter()
        .position(|&l| usize::from(l) >= spec.classes)
    {
        return Err(BackendError::Data(format!(
            "{name} set: sample {i} has label {}, model {} has {} classes",
            set.labels[i], spec.name, spec.classes
        )));
    }
    Ok(())
}
