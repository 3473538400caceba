//! Model specs: layers, the canonical parameter layout, and the three models of DESIGN §3.

/// One layer of a model. Tensors are NCHW; convolutions are 3×3, stride 1, padding 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layer {
    /// 3×3 convolution with padding 1; weight shape `[c_out, c_in, 3, 3]`, bias `[c_out]`.
    Conv {
        /// Parameter name prefix, e.g. `conv1`.
        name: String,
        /// Input channels.
        c_in: usize,
        /// Output channels.
        c_out: usize,
        /// Whether the layer has a bias.
        bias: bool,
    },
    /// Elementwise `max(x, 0)`.
    Relu,
    /// 2×2 max pooling, stride 2.
    MaxPool2,
    /// 2×2 mean pooling, stride 2.
    AvgPool2,
    /// Per-channel batch normalisation `γ (x − μ)/sqrt(var + ε) + β`; training and RSO use the
    /// batch's statistics (biased variance), evaluation the running statistics.
    BatchNorm {
        /// Parameter name prefix, e.g. `bn1`.
        name: String,
        /// Channels.
        channels: usize,
    },
    /// Mean over each channel's whole plane: `[N, C, H, W]` → `[N, C]`.
    GlobalAvgPool,
    /// Fully connected layer on the flattened input (C, H, W order); weight `[d_out, d_in]`.
    Dense {
        /// Parameter name prefix, e.g. `fc`.
        name: String,
        /// Input features.
        d_in: usize,
        /// Output features.
        d_out: usize,
        /// Whether the layer has a bias.
        bias: bool,
    },
}

/// BatchNorm's ε, as in PyTorch and Flux.
pub const BN_EPS: f32 = 1e-5;

/// What a parameter array is, which decides its initialiser and RSO's σ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// Convolution kernel `[c_out, c_in, 3, 3]`.
    ConvWeight,
    /// Convolution bias `[c_out]`.
    ConvBias,
    /// BatchNorm scale `[channels]`.
    BnGamma,
    /// BatchNorm shift `[channels]`.
    BnBeta,
    /// Dense weight `[d_out, d_in]`.
    DenseWeight,
    /// Dense bias `[d_out]`.
    DenseBias,
}

/// One parameter array in the canonical layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Canonical name, e.g. `conv1.weight`, `bn1.gamma`, `fc.bias`.
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// What the array is.
    pub kind: ParamKind,
    /// Index of the owning layer in [`ModelSpec::layers`].
    pub layer: usize,
    /// Fan-in of one output unit (`c_in·9` for a conv, `d_in` for a dense layer, 1 for BN).
    pub fan_in: usize,
    /// Fan-out as Flux counts it (`c_out·9` for a conv, `d_out` for dense, 1 for BN).
    pub fan_out: usize,
}

impl ParamSpec {
    /// Number of scalars in the array.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for an array of no scalars (never the case for the built-in models).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The three models of DESIGN §3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// conv 1→4 +b, ReLU, maxpool, dense 784→10 +b (7 890 parameters).
    OneConv,
    /// conv 1→16 +b, ReLU, maxpool, conv 16→16 +b, ReLU, maxpool, dense 784→10 +b (10 330).
    TwoConv,
    /// The paper's six-conv BatchNorm network with global average pooling (12 016).
    Paper,
}

impl ModelKind {
    /// All models, in CLI order.
    pub const ALL: [ModelKind; 3] = [ModelKind::OneConv, ModelKind::TwoConv, ModelKind::Paper];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::OneConv => "one-conv",
            ModelKind::TwoConv => "two-conv",
            ModelKind::Paper => "paper",
        }
    }

    /// The spec for images of `channels × size × size` and `classes` classes.
    pub fn spec(self, channels: usize, size: usize, classes: usize) -> ModelSpec {
        let conv = |name: &str, c_in, c_out, bias| Layer::Conv {
            name: name.to_string(),
            c_in,
            c_out,
            bias,
        };
        let dense = |d_in, bias| Layer::Dense {
            name: "fc".into(),
            d_in,
            d_out: classes,
            bias,
        };
        let layers = match self {
            ModelKind::OneConv => vec![
                conv("conv1", channels, 4, true),
                Layer::Relu,
                Layer::MaxPool2,
                dense(4 * (size / 2) * (size / 2), true),
            ],
            ModelKind::TwoConv => vec![
                conv("conv1", channels, 16, true),
                Layer::Relu,
                Layer::MaxPool2,
                conv("conv2", 16, 16, true),
                Layer::Relu,
                Layer::MaxPool2,
                dense(16 * (size / 4) * (size / 4), true),
            ],
            ModelKind::Paper => {
                let mut layers = Vec::new();
                for i in 1..=6 {
                    if i > 1 {
                        layers.push(Layer::Relu);
                    }
                    let c_in = if i == 1 { channels } else { 16 };
                    layers.push(conv(&format!("conv{i}"), c_in, 16, false));
                    if i == 2 || i == 4 {
                        layers.push(Layer::AvgPool2);
                    }
                    layers.push(Layer::BatchNorm {
                        name: format!("bn{i}"),
                        channels: 16,
                    });
                }
                layers.push(Layer::GlobalAvgPool);
                layers.push(dense(16, false));
                layers
            }
        };
        ModelSpec {
            name: self.name().to_string(),
            input: [channels, size, size],
            classes,
            layers,
        }
    }

    /// The spec for MNIST (1×28×28, 10 classes).
    pub fn mnist(self) -> ModelSpec {
        self.spec(1, 28, 10)
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ModelKind::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown model '{s}' (expected one-conv, two-conv or paper)"))
    }
}

/// A model: its input shape, class count and layers. Backends instantiate it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Model name (`one-conv`, `two-conv`, `paper`).
    pub name: String,
    /// Input `[channels, height, width]`.
    pub input: [usize; 3],
    /// Number of output classes (logits).
    pub classes: usize,
    /// Layers, input to output.
    pub layers: Vec<Layer>,
}

impl ModelSpec {
    /// The canonical parameter arrays, in layer order; within a layer weight before bias and
    /// γ before β.
    pub fn params(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        for (layer, l) in self.layers.iter().enumerate() {
            let mut push = |name: String, shape: Vec<usize>, kind, fan_in, fan_out| {
                out.push(ParamSpec {
                    name,
                    shape,
                    kind,
                    layer,
                    fan_in,
                    fan_out,
                })
            };
            match l {
                Layer::Conv {
                    name,
                    c_in,
                    c_out,
                    bias,
                } => {
                    let (fi, fo) = (c_in * 9, c_out * 9);
                    push(
                        format!("{name}.weight"),
                        vec![*c_out, *c_in, 3, 3],
                        ParamKind::ConvWeight,
                        fi,
                        fo,
                    );
                    if *bias {
                        push(
                            format!("{name}.bias"),
                            vec![*c_out],
                            ParamKind::ConvBias,
                            fi,
                            fo,
                        );
                    }
                }
                Layer::BatchNorm { name, channels } => {
                    push(
                        format!("{name}.gamma"),
                        vec![*channels],
                        ParamKind::BnGamma,
                        1,
                        1,
                    );
                    push(
                        format!("{name}.beta"),
                        vec![*channels],
                        ParamKind::BnBeta,
                        1,
                        1,
                    );
                }
                Layer::Dense {
                    name,
                    d_in,
                    d_out,
                    bias,
                } => {
                    push(
                        format!("{name}.weight"),
                        vec![*d_out, *d_in],
                        ParamKind::DenseWeight,
                        *d_in,
                        *d_out,
                    );
                    if *bias {
                        push(
                            format!("{name}.bias"),
                            vec![*d_out],
                            ParamKind::DenseBias,
                            *d_in,
                            *d_out,
                        );
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Total number of scalar parameters.
    pub fn param_count(&self) -> usize {
        self.params().iter().map(ParamSpec::len).sum()
    }

    /// Whether any layer is a BatchNorm (whose batch statistics mix samples).
    pub fn has_batch_norm(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l, Layer::BatchNorm { .. }))
    }

    /// The activation shape `[c, h, w]` after each layer (index `i` = output of layer `i`);
    /// the GAP and dense layers report `[features, 1, 1]`.
    pub fn shapes(&self) -> Vec<[usize; 3]> {
        let mut s = self.input;
        self.layers
            .iter()
            .map(|l| {
                s = match l {
                    Layer::Conv { c_out, .. } => [*c_out, s[1], s[2]],
                    Layer::MaxPool2 | Layer::AvgPool2 => [s[0], s[1] / 2, s[2] / 2],
                    Layer::GlobalAvgPool => [s[0], 1, 1],
                    Layer::Dense { d_out, .. } => [*d_out, 1, 1],
                    Layer::Relu | Layer::BatchNorm { .. } => s,
                };
                s
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_design() {
        assert_eq!(ModelKind::OneConv.mnist().param_count(), 7_890);
        assert_eq!(ModelKind::TwoConv.mnist().param_count(), 10_330);
        assert_eq!(ModelKind::Paper.mnist().param_count(), 12_016);
    }

    #[test]
    fn dense_input_matches_the_flattened_shape() {
        for kind in ModelKind::ALL {
            let spec = kind.mnist();
            let shapes = spec.shapes();
            let last = spec.layers.len() - 1;
            let [c, h, w] = shapes[last - 1];
            match &spec.layers[last] {
                Layer::Dense { d_in, d_out, .. } => {
                    assert_eq!(*d_in, c * h * w, "{}", spec.name);
                    assert_eq!(*d_out, 10);
                }
                other => panic!("{}: last layer {other:?}", spec.name),
            }
        }
    }

    #[test]
    fn canonical_names_are_unique_and_ordered() {
        let names: Vec<String> = ModelKind::Paper
            .mnist()
            .params()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names[0], "conv1.weight");
        assert_eq!(names[1], "bn1.gamma");
        assert_eq!(names[2], "bn1.beta");
        assert_eq!(names.last().map(String::as_str), Some("fc.weight"));
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }

    #[test]
    fn model_names_round_trip() {
        for kind in ModelKind::ALL {
            assert_eq!(kind.name().parse::<ModelKind>(), Ok(kind));
        }
        assert!("three-conv".parse::<ModelKind>().is_err());
    }
}
