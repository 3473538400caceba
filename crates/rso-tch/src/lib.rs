//! The libtorch backend of the rso workspace: every [`ModelSpec`] on `tch` tensors, on the CPU or
//! a CUDA GPU, behind the [`Network`] trait the optimizers drive.
//!
//! - The training, test and validation sets are uploaded to the device once; a minibatch is an
//!   `index_select` of the resident set on the device.
//! - Parameters live on the device in canonical order and shapes ([`ModelSpec::params`]);
//!   [`Network::params`]/[`Network::set_params`] copy them through the host, so checkpoints go
//!   through [`Params`] (safetensors) and are portable between engines by construction.
//! - Semantics equal the pure-Rust backend: conv 3×3 stride 1 padding 1, 2×2 max/avg pooling,
//!   BatchNorm with the batch's statistics (biased variance, ε = [`rso_models::spec::BN_EPS`]) in training and RSO,
//!   running statistics (mean 0, variance 1 until [`Network::calibrate_bn`]) in evaluation,
//!   global average pooling, dense layers on the flattened (C, H, W) activations.
//! - Loss: the logits are f32; the per-sample cross-entropy is computed from them **in f64 on the
//!   device** (log-softmax in f64) and summed in f64, then reduced as [`Reduction`] says.
//! - RSO's candidate losses run the incremental path under `no_grad` (the `incremental` module:
//!   the visited layer's input cached, channel-local candidates, one stacked batch, one transfer
//!   per visit); the reference path (three full forward passes) stays available through
//!   [`reference_candidate_losses`]. SGD uses autograd and updates the parameters in place on
//!   the device.
//!
//! Devices are runtime values: `"cpu"`, `"cuda"` or `"cuda:N"`. CUDA needs the `cuda` feature,
//! which loads `libtorch_cuda.so` at run time (see the `cuda` module source for why).
//!
//! Build set-up: `scripts/setup-libtorch.sh` installs libtorch 2.11.0 (the `torch` wheel) into
//! `.venv/`; `.cargo/config.toml` points torch-sys at it, and this crate's build script sets an
//! rpath so binaries run without `LD_LIBRARY_PATH`.

#![deny(unsafe_code)]

// dlopen/dlsym of libtorch's CUDA library and its TF32 switch: C calls, so `unsafe`.
#[allow(unsafe_code)]
mod cuda;
mod incremental;

use rso_models::network::reference_candidate_losses;
use rso_models::{
    BackendError, Eval, Layer, ModelSpec, Network, ParamSpec, Params, Reduction, SplitKind,
};
use std::cell::{Ref, RefCell};
use tch::{Device, Kind, Tensor};

/// BatchNorm's ε (the models crate's f32 constant, as libtorch takes it).
const BN_EPS: f64 = rso_models::spec::BN_EPS as f64;

/// Samples per forward pass in [`Network::evaluate`] on the CPU.
const EVAL_CHUNK_CPU: usize = 1000;
/// Samples per forward pass in [`Network::evaluate`] on a GPU.
const EVAL_CHUNK_CUDA: usize = 10_000;

/// Whether a CUDA device is usable by this engine: the build has the `cuda` feature, libtorch's
/// CUDA library loaded, and libtorch sees at least one device.
///
/// Call this (or [`TchNetwork::new`]) before using `tch` directly: libtorch decides once, at its
/// first CUDA query, whether CUDA exists in the process.
pub fn cuda_available() -> bool {
    cuda_device_count().is_ok()
}

/// How f32 convolutions run on CUDA, for diagnostics: `"ieee"` (full f32: TF32 switched off for
/// cuDNN, the normal case with the `cuda` feature), `"cudnn-disabled"` (TF32 could not be switched
/// off, so cuDNN is off: exact but slower), or `"not-loaded"` (no CUDA support in this process).
pub fn cuda_conv_precision() -> &'static str {
    let _ = cuda::ensure_loaded();
    cuda::conv_precision()
}

/// The version of the libtorch this crate was built against, as its PyTorch wheel names it
/// (`2.11.0+cu130`), or `unknown`.
pub const LIBTORCH_VERSION: &str = env!("RSO_LIBTORCH_VERSION");

/// Sets the number of CPU threads libtorch uses for intra-op parallelism (process-wide; libtorch
/// defaults to one per core). On small batches, or when the machine is shared, 1 is often
/// fastest: libtorch's OpenMP workers spin at barriers and slow down badly when descheduled.
pub fn set_threads(n: usize) {
    let _ = cuda::ensure_loaded();
    tch::set_num_threads(n.clamp(1, i32::MAX as usize) as i32);
}

/// Why CUDA cannot be used, or `None` when a CUDA device is usable.
pub fn cuda_unavailable_reason() -> Option<String> {
    cuda_device_count().err()
}

/// The number of usable CUDA devices, or why there is none.
fn cuda_device_count() -> Result<usize, String> {
    let loaded = cuda::ensure_loaded();
    let count = tch::Cuda::device_count();
    if count > 0 {
        return Ok(count as usize);
    }
    Err(match loaded {
        Err(why) => why,
        Ok(()) => {
            "libtorch's CUDA support is loaded but it sees no device (no GPU or driver)".into()
        }
    })
}

/// Parses a device name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
fn parse_device(name: &str) -> Result<Device, BackendError> {
    let name = name.trim();
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(BackendError::Device(format!(
                    "unknown device '{name}' (expected cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    let count = cuda_device_count().map_err(|why| {
        BackendError::Device(format!(
            "CUDA requested but no CUDA device is available ({why})"
        ))
    })?;
    if ordinal >= count {
        return Err(BackendError::Device(format!(
            "CUDA device {ordinal} requested but only {count} CUDA device(s) are available"
        )));
    }
    Ok(Device::Cuda(ordinal))
}

/// Where each layer finds its parameters (indices into the canonical arrays).
#[derive(Clone, Copy, Debug, Default)]
struct LayerParams {
    /// Conv/dense weight or BatchNorm γ.
    first: Option<usize>,
    /// Conv/dense bias or BatchNorm β.
    second: Option<usize>,
}

/// How BatchNorm normalises in a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BnMode {
    /// The batch's statistics (training, RSO, logits, loss).
    Batch,
    /// The running statistics (evaluation).
    Running,
}

/// A model instantiated on libtorch (CPU or CUDA), with its data resident on the device.
pub struct TchNetwork {
    spec: ModelSpec,
    specs: Vec<ParamSpec>,
    device: Device,
    /// Parameters on the device, canonical order and shapes, f32, never requiring grad.
    params: Vec<Tensor>,
    /// Host copy of `params` for scalar reads; `None` when stale (after an in-place SGD step).
    host: RefCell<Option<Vec<Vec<f32>>>>,
    layer_params: Vec<LayerParams>,
    /// BatchNorm running (mean, biased variance) per layer index; `None` for other layers.
    running: Vec<Option<(Tensor, Tensor)>>,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    /// The validation set ([`SplitKind::Validation`]), evaluated only; often empty.
    validation_x: Tensor,
    validation_y: Tensor,
    train_len: usize,
    test_len: usize,
    validation_len: usize,
    /// Caches of the incremental RSO path (see the `incremental` module).
    inc: incremental::Incremental,
}

impl std::fmt::Debug for TchNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TchNetwork")
            .field("model", &self.spec.name)
            .field("device", &self.device())
            .field("train_len", &self.train_len)
            .field("test_len", &self.test_len)
            .field("validation_len", &self.validation_len)
            .finish()
    }
}

/// Checks that a data set fits the model and uploads it as (images `[N,C,H,W]` f32,
/// labels `[N]` i64).
fn upload(
    spec: &ModelSpec,
    set: &rso_data::Dataset,
    which: &str,
    device: Device,
) -> Result<(Tensor, Tensor), BackendError> {
    let [c, h, w] = spec.input;
    if [set.channels, set.height, set.width] != spec.input {
        return Err(BackendError::Data(format!(
            "{which} images are {}×{}×{}, model {} expects {c}×{h}×{w}",
            set.channels, set.height, set.width, spec.name
        )));
    }
    let n = set.len();
    if set.images.len() != n * set.image_len() {
        return Err(BackendError::Data(format!(
            "{which} set has {} pixel values for {n} images of {} values",
            set.images.len(),
            set.image_len()
        )));
    }
    if let Some(bad) = set.labels.iter().find(|&&l| l as usize >= spec.classes) {
        return Err(BackendError::Data(format!(
            "{which} label {bad} is out of range for {} classes",
            spec.classes
        )));
    }
    if let Some((sample, offset)) = set.first_non_finite() {
        return Err(BackendError::Data(format!(
            "{which} image {sample} has a non-finite value at offset {offset}"
        )));
    }
    let dims = [n as i64, c as i64, h as i64, w as i64];
    let x = Tensor::from_slice(&set.images).view(dims).to_device(device);
    let labels: Vec<i64> = set.labels.iter().map(|&l| i64::from(l)).collect();
    let y = Tensor::from_slice(&labels).to_device(device);
    Ok((x, y))
}

/// Per-sample cross-entropy of f32 logits `[B, K]` against i64 labels `[B]`, in f64: `[B]`.
fn per_sample_cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    let log_p = logits.to_kind(Kind::Double).log_softmax(1, Kind::Double);
    -log_p.gather(1, &labels.unsqueeze(1), false).squeeze_dim(1)
}

/// Reduces per-sample f64 losses `[B]` to a scalar f64 tensor.
fn reduce(per_sample: &Tensor, reduction: Reduction) -> Tensor {
    match reduction {
        Reduction::Mean => per_sample.mean(Kind::Double),
        Reduction::Sum => per_sample.sum(Kind::Double),
    }
}

/// The models' convolution: 3×3, stride 1, padding 1, `groups` groups.
fn conv3x3(x: &Tensor, w: &Tensor, b: Option<&Tensor>, groups: i64) -> Tensor {
    x.conv2d(w, b, [1, 1], [1, 1], [1, 1], groups)
}

/// BatchNorm with the batch's statistics (biased variance, ε = [`BN_EPS`]) per channel.
fn batch_norm_of_batch(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>) -> Tensor {
    x.batch_norm(
        gamma,
        beta,
        None::<&Tensor>,
        None::<&Tensor>,
        true,
        0.0,
        BN_EPS,
        true,
    )
}

/// `t` repeated `copies` times along its first dimension (`[copies·d0, …]`).
fn repeat_first(t: &Tensor, copies: i64) -> Tensor {
    let mut dims = vec![1i64; t.dim()];
    dims[0] = copies;
    t.repeat(dims.as_slice())
}

/// A parameterless layer (ReLU, 2×2 max or mean pooling) on `x`; `None` for other layers.
fn plain_layer(layer: &Layer, x: &Tensor) -> Option<Tensor> {
    match layer {
        Layer::Relu => Some(x.relu()),
        Layer::MaxPool2 => Some(x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)),
        Layer::AvgPool2 => Some(x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)),
        _ => None,
    }
}

/// Copies a device tensor to a host f32 vector (row-major).
fn to_host(t: &Tensor) -> Vec<f32> {
    let flat = t
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view(-1);
    Vec::<f32>::try_from(&flat).expect("a flat f32 CPU tensor converts to Vec<f32>")
}

impl TchNetwork {
    /// Instantiates `spec` with `params` on `device` (`"cpu"`, `"cuda"` or `"cuda:N"`), uploading
    /// the training, test and validation sets once.
    ///
    /// # Errors
    /// An unknown device name, or a CUDA device without a usable GPU
    /// ([`BackendError::Device`], "CUDA requested but no CUDA device is available (…)"); parameters
    /// that do not fit the spec ([`BackendError::Params`]); images of another shape, labels out of
    /// range or non-finite pixels ([`BackendError::Data`]). An empty validation set is not
    /// checked (its header may be anything).
    pub fn new(
        spec: &ModelSpec,
        params: &Params,
        data: &rso_data::Split,
        device: &str,
    ) -> Result<TchNetwork, BackendError> {
        // Before any tensor operation: libtorch decides CUDA support once (see the cuda module).
        let _ = cuda::ensure_loaded();
        let device = parse_device(device)?;
        params.check_layout(spec, "tch engine")?;
        let specs = spec.params();
        let mut layer_params = vec![LayerParams::default(); spec.layers.len()];
        for (i, p) in specs.iter().enumerate() {
            let lp = &mut layer_params[p.layer];
            if lp.first.is_none() {
                lp.first = Some(i);
            } else {
                lp.second = Some(i);
            }
        }
        let running = spec
            .layers
            .iter()
            .map(|l| match l {
                Layer::BatchNorm { channels, .. } => {
                    let c = *channels as i64;
                    let opts = (Kind::Float, device);
                    Some((Tensor::zeros([c], opts), Tensor::ones([c], opts)))
                }
                _ => None,
            })
            .collect();
        let (train_x, train_y) = upload(spec, &data.train, "training", device)?;
        let (test_x, test_y) = upload(spec, &data.test, "test", device)?;
        let validation = if data.validation.is_empty() {
            // None held out: an empty set of the model's shape, whatever its header says.
            &rso_data::Dataset {
                channels: spec.input[0],
                height: spec.input[1],
                width: spec.input[2],
                ..data.validation.empty_like()
            }
        } else {
            &data.validation
        };
        let (validation_x, validation_y) = upload(spec, validation, "validation", device)?;
        let mut net = TchNetwork {
            spec: spec.clone(),
            specs,
            device,
            params: Vec::new(),
            host: RefCell::new(None),
            layer_params,
            running,
            train_x,
            train_y,
            test_x,
            test_y,
            validation_x,
            validation_y,
            train_len: data.train.len(),
            test_len: data.test.len(),
            validation_len: data.validation.len(),
            inc: incremental::Incremental::default(),
        };
        net.upload_params(params);
        Ok(net)
    }

    /// The libtorch device the network lives on.
    pub fn tch_device(&self) -> Device {
        self.device
    }

    /// Waits until all queued work on the device is done (a no-op on the CPU); benches call it
    /// inside the timed region.
    pub fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// The BatchNorm running statistics `(mean, biased variance)` of every BatchNorm layer, in
    /// layer order (empty for models without BatchNorm).
    pub fn bn_running_stats(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        self.running
            .iter()
            .flatten()
            .map(|(m, v)| (to_host(m), to_host(v)))
            .collect()
    }

    /// Replaces the device parameters from layout-checked host values.
    fn upload_params(&mut self, params: &Params) {
        self.params = self
            .specs
            .iter()
            .zip(&params.values)
            .map(|(s, v)| {
                let shape: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
                Tensor::from_slice(v)
                    .view(shape.as_slice())
                    .to_device(self.device)
            })
            .collect();
        *self.host.borrow_mut() = Some(params.values.clone());
    }

    /// The host copy of the parameters, downloaded when stale.
    fn host(&self) -> Ref<'_, Vec<Vec<f32>>> {
        if self.host.borrow().is_none() {
            let values = self.params.iter().map(to_host).collect();
            *self.host.borrow_mut() = Some(values);
        }
        Ref::map(self.host.borrow(), |h| {
            h.as_ref().expect("filled just above")
        })
    }

    /// The device index tensor of a minibatch. Panics if an index is out of range (indices come
    /// from the program, not from users).
    fn index_tensor(&self, batch: &[u32]) -> Tensor {
        let idx: Vec<i64> = batch
            .iter()
            .map(|&i| {
                assert!(
                    (i as usize) < self.train_len,
                    "sample index {i} out of range for a training set of {}",
                    self.train_len
                );
                i64::from(i)
            })
            .collect();
        Tensor::from_slice(&idx).to_device(self.device)
    }

    /// Images and labels of the given training samples, gathered on the device.
    fn gather(&self, batch: &[u32]) -> (Tensor, Tensor) {
        let idx = self.index_tensor(batch);
        (
            self.train_x.index_select(0, &idx),
            self.train_y.index_select(0, &idx),
        )
    }

    /// The forward pass to logits `[B, classes]` with the given parameter tensors. With
    /// `stats`, records each BatchNorm layer's batch (mean, biased variance) by layer index.
    fn forward(
        &self,
        x: &Tensor,
        params: &[Tensor],
        bn: BnMode,
        stats: Option<&mut Vec<(usize, Tensor, Tensor)>>,
    ) -> Tensor {
        self.forward_layers(x, 0..self.spec.layers.len(), params, bn, 1, stats)
    }

    /// Runs `layers` of the model on `x`.
    ///
    /// With `groups = G > 1` the activations hold G independent versions of the batch stacked
    /// along the channels (`[B, G·C, H, W]`, version-major; the incremental RSO path's
    /// candidates) and `params` are [`TchNetwork::grouped_params`]: convolutions run grouped,
    /// BatchNorm normalises each stacked channel by its own batch statistics (so each version by
    /// its own), and the final dense layer maps `[B, G·F]` to `[B, G·classes]`. With `stats`
    /// (only for `G = 1`), records each BatchNorm layer's batch (mean, biased variance) by layer
    /// index.
    fn forward_layers(
        &self,
        x: &Tensor,
        layers: std::ops::Range<usize>,
        params: &[Tensor],
        bn: BnMode,
        groups: i64,
        mut stats: Option<&mut Vec<(usize, Tensor, Tensor)>>,
    ) -> Tensor {
        let mut x = x.shallow_clone();
        for i in layers {
            let layer = &self.spec.layers[i];
            let lp = self.layer_params[i];
            let first = lp.first.map(|j| &params[j]);
            let second = lp.second.map(|j| &params[j]);
            if let Some(y) = plain_layer(layer, &x) {
                x = y;
                continue;
            }
            x = match layer {
                Layer::Conv { .. } => conv3x3(
                    &x,
                    first.expect("a conv layer has a weight"),
                    second,
                    groups,
                ),
                Layer::BatchNorm { .. } => {
                    let (gamma, beta) = (first, second);
                    if let Some(out) = stats.as_deref_mut() {
                        let mean = x.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
                        let centred = &x - mean.view([1, -1, 1, 1]);
                        let var =
                            centred
                                .square()
                                .mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
                        out.push((i, mean, var));
                    }
                    match bn {
                        BnMode::Batch => batch_norm_of_batch(&x, gamma, beta),
                        BnMode::Running => {
                            let (m, v) = self.running[i]
                                .as_ref()
                                .expect("a BatchNorm layer has statistics");
                            x.batch_norm(gamma, beta, Some(m), Some(v), false, 0.0, BN_EPS, true)
                        }
                    }
                }
                Layer::GlobalAvgPool => x.mean_dim([2i64, 3].as_slice(), false, Kind::Float),
                Layer::Relu | Layer::MaxPool2 | Layer::AvgPool2 => {
                    unreachable!("handled by plain_layer above")
                }
                Layer::Dense { .. } => {
                    // Each stacked version of a sample's input is one row.
                    let w = first.expect("a dense layer has a weight");
                    let rows = x.size()[0];
                    x.reshape([rows * groups, -1])
                        .linear(w, second)
                        .reshape([rows, -1])
                }
            };
        }
        x
    }

    /// The parameters for [`TchNetwork::forward_layers`] with `groups` stacked versions:
    /// convolution and BatchNorm arrays repeated `groups` times along their first dimension,
    /// dense arrays as they are.
    fn grouped_params(&self, groups: i64) -> Vec<Tensor> {
        self.specs
            .iter()
            .zip(&self.params)
            .map(|(s, p)| {
                if matches!(self.spec.layers[s.layer], Layer::Dense { .. }) {
                    p.shallow_clone()
                } else {
                    repeat_first(p, groups)
                }
            })
            .collect()
    }

    /// The loss of `batch` (no gradient) as a scalar f64 device tensor.
    fn loss_tensor(&self, x: &Tensor, y: &Tensor, reduction: Reduction) -> Tensor {
        let logits = self.forward(x, &self.params, BnMode::Batch, None);
        reduce(&per_sample_cross_entropy(&logits, y), reduction)
    }

    /// Loss and gradients (as device tensors, canonical order) through autograd.
    fn loss_and_grad_tensors(&self, batch: &[u32], reduction: Reduction) -> (f64, Vec<Tensor>) {
        let leaves: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.detach().set_requires_grad(true))
            .collect();
        let (x, y) = self.gather(batch);
        let logits = self.forward(&x, &leaves, BnMode::Batch, None);
        let loss = reduce(&per_sample_cross_entropy(&logits, &y), reduction);
        loss.backward();
        let grads = leaves
            .iter()
            .map(|l| {
                let g = l.grad();
                if g.defined() {
                    g.detach()
                } else {
                    l.zeros_like().detach()
                }
            })
            .collect();
        (loss.double_value(&[]), grads)
    }
}

impl Network for TchNetwork {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn backend(&self) -> &'static str {
        "tch"
    }

    fn device(&self) -> String {
        match self.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            Device::Cpu => "cpu".into(),
            other => format!("{other:?}").to_lowercase(),
        }
    }

    fn train_len(&self) -> usize {
        self.train_len
    }

    fn params(&self) -> Params {
        Params {
            specs: self.specs.clone(),
            values: self.host().clone(),
        }
    }

    fn set_params(&mut self, params: &Params) -> Result<(), BackendError> {
        params.check_layout(&self.spec, "tch engine")?;
        self.inc.clear();
        self.upload_params(params);
        Ok(())
    }

    fn weight(&self, param: usize, index: usize) -> f32 {
        self.host()[param][index]
    }

    fn set_weight(&mut self, param: usize, index: usize, value: f32) {
        let len = self.specs[param].len();
        assert!(
            index < len,
            "index {index} out of range for {} ({len} scalars)",
            self.specs[param].name
        );
        let old = self.weight(param, index);
        self.inc_weight_changed(param, index, old, value);
        tch::no_grad(|| {
            let _ = self.params[param]
                .view(-1)
                .get(index as i64)
                .fill_(f64::from(value));
        });
        if let Some(h) = self.host.borrow_mut().as_mut() {
            h[param][index] = value;
        }
    }

    fn logits(&mut self, batch: &[u32]) -> Vec<f32> {
        if batch.is_empty() {
            return Vec::new();
        }
        tch::no_grad(|| {
            let (x, _) = self.gather(batch);
            to_host(&self.forward(&x, &self.params, BnMode::Batch, None))
        })
    }

    fn batch_loss(&mut self, batch: &[u32], reduction: Reduction) -> f64 {
        if batch.is_empty() {
            return reduction.finish(0.0, 0);
        }
        tch::no_grad(|| {
            let (x, y) = self.gather(batch);
            self.loss_tensor(&x, &y, reduction).double_value(&[])
        })
    }

    /// The incremental path (see the `incremental` module): the layers before the visited
    /// one skipped, the three versions of the layer run as one stacked batch (or O(B) from
    /// cached logits for the final dense layer of a model without BatchNorm), one transfer of
    /// the three losses. Equal to [`reference_candidate_losses`] up to rounding.
    fn candidate_losses(
        &mut self,
        batch: &[u32],
        param: usize,
        index: usize,
        delta: f32,
        reduction: Reduction,
    ) -> [f64; 3] {
        if !batch.is_empty() {
            if let Some(losses) = self.inc_candidate_losses(batch, param, index, delta, reduction) {
                return losses;
            }
        }
        reference_candidate_losses(self, batch, param, index, delta, reduction)
    }

    fn begin_sweep(&mut self, param: usize) {
        self.inc_begin_sweep(param);
    }

    fn loss_and_grad(&mut self, batch: &[u32], reduction: Reduction) -> (f64, Vec<Vec<f32>>) {
        if batch.is_empty() {
            let zeros = self.specs.iter().map(|s| vec![0.0; s.len()]).collect();
            return (reduction.finish(0.0, 0), zeros);
        }
        let (loss, grads) = self.loss_and_grad_tensors(batch, reduction);
        (loss, grads.iter().map(to_host).collect())
    }

    /// `w ← w − lr·∇` in place on the device (the gradient of the mean loss of `batch`).
    fn sgd_step(&mut self, batch: &[u32], lr: f32) -> f64 {
        if batch.is_empty() {
            return 0.0;
        }
        let (loss, grads) = self.loss_and_grad_tensors(batch, Reduction::Mean);
        tch::no_grad(|| {
            for (p, g) in self.params.iter_mut().zip(&grads) {
                let _ = p.g_sub_(&(g * f64::from(lr)));
            }
        });
        *self.host.borrow_mut() = None;
        self.inc.clear();
        loss
    }

    /// Sets each BatchNorm layer's running mean and running (biased) variance to the batch's
    /// statistics at that layer, so evaluating that batch reproduces the training-mode output.
    fn calibrate_bn(&mut self, batch: &[u32]) {
        if batch.is_empty() || !self.spec.has_batch_norm() {
            return;
        }
        let stats = tch::no_grad(|| {
            let (x, _) = self.gather(batch);
            let mut stats = Vec::new();
            let _ = self.forward(&x, &self.params, BnMode::Batch, Some(&mut stats));
            stats
        });
        for (i, mean, var) in stats {
            self.running[i] = Some((mean, var));
        }
    }

    fn evaluate(&mut self, split: SplitKind, limit: Option<usize>) -> Eval {
        let (x, y, len) = match split {
            SplitKind::Train => (&self.train_x, &self.train_y, self.train_len),
            SplitKind::Test => (&self.test_x, &self.test_y, self.test_len),
            SplitKind::Validation => (&self.validation_x, &self.validation_y, self.validation_len),
        };
        let n = limit.map_or(len, |l| l.min(len));
        if n == 0 {
            return Eval {
                loss: 0.0,
                accuracy: 0.0,
                samples: 0,
            };
        }
        let chunk = if self.device == Device::Cpu {
            EVAL_CHUNK_CPU
        } else {
            EVAL_CHUNK_CUDA
        };
        tch::no_grad(|| {
            let mut loss_sum = Tensor::zeros([], (Kind::Double, self.device));
            let mut correct = Tensor::zeros([], (Kind::Int64, self.device));
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                let xs = x.narrow(0, start as i64, len as i64);
                let ys = y.narrow(0, start as i64, len as i64);
                let logits = self.forward(&xs, &self.params, BnMode::Running, None);
                loss_sum += per_sample_cross_entropy(&logits, &ys).sum(Kind::Double);
                correct += logits.argmax(1, false).eq_tensor(&ys).sum(Kind::Int64);
                start += len;
            }
            Eval {
                loss: loss_sum.double_value(&[]) / n as f64,
                accuracy: correct.int64_value(&[]) as f64 / n as f64,
                samples: n,
            }
        })
    }
}
