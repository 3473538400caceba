//! Incremental RSO candidates on libtorch: the three losses of [`Network::candidate_losses`]
//! (at W, at `w + δ`, at `w − δ`) from what one scalar change touches, equal to the reference
//! path ([`reference_candidate_losses`](rso_models::network::reference_candidate_losses)) up to
//! floating-point rounding (`tests/incremental.rs` holds them to 1e-5 relative and checks that a
//! seeded RSO round decides the same on both paths).
//!
//! For a scalar of layer `L`:
//!
//! | what | how |
//! |---|---|
//! | layers before `L` | skipped: the input of `L` does not change during `L`'s sweep. Without BatchNorm before `L` it is computed once per sweep for the whole training set and gathered per batch; with BatchNorm (statistics of the batch mix its samples) it is kept per batch, for batches that recur ([`Prefix`]) |
//! | convolution or BatchNorm followed by channel-local layers (ReLU, pooling, BatchNorm) and a convolution `L'` (`paper`'s conv1–5 and bn1–5, `two-conv`'s conv1) | the base (W) runs from `L` once, keeping the input and output of `L'`; a scalar of output channel `k` changes channel `k` alone up to `L'`, so the two candidates compute channel `k` (one output channel of `L`, BatchNorm with channel `k`'s batch statistics), add their change through `L'`'s weights of input channel `k` (a 1-input-channel convolution) to `L'`s stored output, and run the layers after `L'` as one stacked batch of 2 |
//! | `L` and after, generic | the three versions of the layer (W, W+Δ, W−Δ) stacked along the channels and run as one batch (`[B, 3·C, H, W]`: grouped convolutions, per-channel BatchNorm statistics = per-version statistics) to `[B, 3, classes]`, cross-entropy in f64, the three losses read back in **one** transfer |
//! | final dense layer of a model without BatchNorm | the logits of the whole training set (f64) and the layer's input kept for the sweep; a weight `(k, j)` moves logit `k` of a sample by `Δ·x_j`, so a visit is O(B) (gather, three candidate rows, log-softmax); an accepted change updates logit column `k` of all N samples in place |
//!
//! Caches live for one layer's sweep: [`Network::begin_sweep`] of another layer (or a repeated
//! sweep of the same array: the next round) drops them, so a round's arithmetic depends only on
//! the weights it starts from. A change of an earlier layer (`set_weight`, `set_params`, an SGD
//! step) drops them too. Everything stays on the device; on CUDA the host waits once per visit.

use crate::{batch_norm_of_batch, conv3x3, plain_layer, repeat_first, TchNetwork};
use rso_models::{Layer, Network, Reduction};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Largest total size of the per-batch layer inputs kept on the CPU (bytes).
const MEMO_BYTES_CPU: i64 = 4 << 30;
/// Largest total size of the per-batch layer inputs kept on a GPU (bytes).
const MEMO_BYTES_CUDA: i64 = 24 << 30;
/// Training samples per forward pass when a layer's input is computed for the whole set.
const CHUNK: i64 = 5000;

/// The input of the swept layer, by batch.
#[derive(Debug, Default)]
enum Prefix {
    /// Not computed yet for this sweep.
    #[default]
    Empty,
    /// For every training sample (no BatchNorm before the layer): `[N, …]`.
    All(Tensor),
    /// For recurring batches (BatchNorm before the layer).
    PerBatch(BatchMemo<Tensor>),
}

/// Values kept per recurring batch (keyed by the batch's indices), with the bytes they hold
/// counted against a cap.
#[derive(Debug)]
struct BatchMemo<T> {
    map: HashMap<Vec<u32>, (T, i64)>,
    bytes: i64,
}

impl<T> Default for BatchMemo<T> {
    fn default() -> Self {
        BatchMemo {
            map: HashMap::new(),
            bytes: 0,
        }
    }
}

impl<T> BatchMemo<T> {
    fn get(&self, batch: &[u32]) -> Option<&T> {
        self.map.get(batch).map(|(v, _)| v)
    }

    fn remove(&mut self, batch: &[u32]) -> Option<T> {
        let (v, size) = self.map.remove(batch)?;
        self.bytes -= size;
        Some(v)
    }

    /// Keeps `value` (of `size` bytes) for `batch` if the total stays within `cap`.
    fn insert(&mut self, batch: &[u32], value: T, size: i64, cap: i64) {
        if self.bytes + size <= cap {
            self.bytes += size;
            if let Some((_, old)) = self.map.insert(batch.to_vec(), (value, size)) {
                self.bytes -= old;
            }
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

/// The incremental path's caches for the running sweep.
#[derive(Debug, Default)]
pub(crate) struct Incremental {
    /// The array whose sweep runs (from `begin_sweep` or the first visit).
    param: Option<usize>,
    /// Its layer.
    layer: usize,
    prefix: Prefix,
    /// Logits of every training sample, f64 `[N, classes]` (final dense layer, no BatchNorm).
    logits: Option<Tensor>,
    /// The parameters repeated for 2 or 3 stacked versions (`grouped_params`), by group count;
    /// only the arrays of layers after the swept one are read, and those do not change during
    /// its sweep.
    grouped: Vec<(i64, Vec<Tensor>)>,
    /// Device indices and labels of recurring batches.
    batches: HashMap<Vec<u32>, (Tensor, Tensor)>,
    /// Per recurring batch, the input and output of the convolution after the swept layer
    /// (channel-local path).
    tails: BatchMemo<Tail>,
    /// The output channel of every change of the swept layer since the sweep began; a tail
    /// that has seen the first `n` is brought up to date by recomputing the channels of the rest.
    changes: Vec<i64>,
}

/// The state of one batch after the swept layer `L` (channel-local path): the input `a` and the
/// output `z` of the next convolution at the current weights.
#[derive(Debug)]
struct Tail {
    a: Tensor,
    z: Tensor,
    /// How many of [`Incremental::changes`] are in `a` and `z`.
    seen: usize,
    /// Channel updates since `a` and `z` were computed whole (their rounding accumulates, so
    /// they are recomputed after [`MAX_REFRESHES`]).
    refreshes: usize,
}

/// Channel updates of a [`Tail`] before it is recomputed whole.
const MAX_REFRESHES: usize = 32;

/// Largest number of batches whose device indices and labels are kept.
const MAX_BATCHES: usize = 4096;

impl Incremental {
    /// Drops every cache (parameters before the swept layer changed, or a new sweep starts).
    pub(crate) fn clear(&mut self) {
        self.prefix = Prefix::Empty;
        self.logits = None;
        self.grouped.clear();
        self.clear_tails();
    }

    /// Drops the per-batch tails (a layer after the swept one changed, or a new sweep).
    fn clear_tails(&mut self) {
        self.tails.clear();
        self.changes.clear();
    }
}

impl TchNetwork {
    /// Starts (or continues) the sweep of array `param`: caches of another layer, or of a
    /// previous sweep of the same array, are dropped.
    pub(crate) fn inc_begin_sweep(&mut self, param: usize) {
        let layer = self.specs[param].layer;
        if self.inc.param == Some(param) || self.inc.param.is_none() || self.inc.layer != layer {
            self.inc.clear();
        }
        self.inc.param = Some(param);
        self.inc.layer = layer;
    }

    /// Keeps the caches consistent with a change of scalar `(param, index)` from `old` to
    /// `new` (called before the parameter tensor changes).
    pub(crate) fn inc_weight_changed(&mut self, param: usize, index: usize, old: f32, new: f32) {
        let layer = self.specs[param].layer;
        if self.inc.param.is_none() {
            return;
        }
        if layer > self.inc.layer {
            self.inc.grouped.clear();
            self.inc.clear_tails();
            return;
        }
        if layer < self.inc.layer {
            self.inc.clear();
            return;
        }
        // The swept layer itself: its input is unchanged; the tails are behind by a channel;
        // the all-samples logits move.
        let k = self.channel_of(param, index);
        self.inc.changes.push(k);
        if let (Some(z), Prefix::All(x)) = (&self.inc.logits, &self.inc.prefix) {
            let d_in = x.size()[1];
            let (k, feature) = self.dense_target(param, index, d_in);
            let change = f64::from(new) - f64::from(old);
            tch::no_grad(|| {
                let mut column = z.select(1, k);
                match feature {
                    Some(j) => {
                        let _ = column.g_add_(&(x.select(1, j).to_kind(Kind::Double) * change));
                    }
                    None => {
                        let _ = column.g_add_scalar_(change);
                    }
                }
            });
        }
    }

    /// The output channel (first index) that scalar `index` of array `param` belongs to.
    fn channel_of(&self, param: usize, index: usize) -> i64 {
        let spec = &self.specs[param];
        (index / (spec.len() / spec.shape[0])) as i64
    }

    /// Which logit `k` and which input feature (`None` for the bias) scalar `index` of a dense
    /// layer's array moves.
    fn dense_target(&self, param: usize, index: usize, d_in: i64) -> (i64, Option<i64>) {
        let spec = &self.specs[param];
        if spec.shape.len() == 2 {
            let index = index as i64;
            (index / d_in, Some(index % d_in))
        } else {
            (index as i64, None)
        }
    }

    /// The three losses by the incremental path, or `None` where it does not apply (the caller
    /// takes the reference path).
    pub(crate) fn inc_candidate_losses(
        &mut self,
        batch: &[u32],
        param: usize,
        index: usize,
        delta: f32,
        reduction: Reduction,
    ) -> Option<[f64; 3]> {
        let layer = self.specs[param].layer;
        let last = self.spec.layers.len() - 1;
        if matches!(self.spec.layers[layer], Layer::Dense { .. }) && layer != last {
            return None;
        }
        if self.inc.param.is_none() || self.inc.layer != layer {
            self.inc_begin_sweep(param);
        }
        let w = self.weight(param, index);
        let values = [w, w + delta, w - delta];
        let bn_before = self.spec.layers[..layer]
            .iter()
            .any(|l| matches!(l, Layer::BatchNorm { .. }));
        let losses = tch::no_grad(|| {
            let (idx, labels) = self.batch_tensors(batch);
            let logits = if layer == last && !bn_before {
                self.cached_dense_candidates(&idx, param, index, values)
            } else {
                let x = self.layer_input(layer, batch, &idx, bn_before);
                match self.next_conv(layer) {
                    Some(next) => {
                        self.channel_candidates(&x, batch, layer, next, param, index, values)
                    }
                    None => self.stacked_candidates(&x, layer, param, index, values),
                }
            };
            candidate_losses_of(&logits, &labels, reduction)
        });
        Some(losses)
    }

    /// The input of `layer` for `batch` (`idx` its device indices).
    fn layer_input(
        &mut self,
        layer: usize,
        batch: &[u32],
        idx: &Tensor,
        bn_before: bool,
    ) -> Tensor {
        if layer == 0 {
            return self.train_x.index_select(0, idx);
        }
        if !bn_before {
            if !matches!(self.inc.prefix, Prefix::All(_)) {
                let all = self.all_inputs(layer);
                self.inc.prefix = Prefix::All(all);
            }
            let Prefix::All(all) = &self.inc.prefix else {
                unreachable!("set just above")
            };
            return all.index_select(0, idx);
        }
        if let Prefix::PerBatch(memo) = &self.inc.prefix {
            if let Some(x) = memo.get(batch) {
                return x.shallow_clone();
            }
        }
        let images = self.train_x.index_select(0, idx);
        let x = self.forward_layers(
            &images,
            0..layer,
            &self.params,
            crate::BnMode::Batch,
            1,
            None,
        );
        let cap = self.memo_cap();
        if !matches!(self.inc.prefix, Prefix::PerBatch(_)) {
            self.inc.prefix = Prefix::PerBatch(BatchMemo::default());
        }
        if let Prefix::PerBatch(memo) = &mut self.inc.prefix {
            memo.insert(batch, x.shallow_clone(), x.numel() as i64 * 4, cap);
        }
        x
    }

    /// The input of `layer` for every training sample, computed in chunks (no BatchNorm before
    /// `layer`, so a sample's activations do not depend on the others).
    fn all_inputs(&self, layer: usize) -> Tensor {
        let n = self.train_len as i64;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let images = self.train_x.narrow(0, start, len);
            parts.push(self.forward_layers(
                &images,
                0..layer,
                &self.params,
                crate::BnMode::Batch,
                1,
                None,
            ));
            start += len;
        }
        Tensor::cat(&parts, 0)
    }

    /// The parameter arrays of `layer` with the three versions of scalar `(param, index)`
    /// stacked along the first dimension (`[3·d0, …]`); the layer's other array repeated.
    fn stacked_params(
        &self,
        layer: usize,
        param: usize,
        index: usize,
        values: [f32; 3],
    ) -> (Option<Tensor>, Option<Tensor>) {
        let stack = |j: usize| -> Tensor {
            let edit = (j == param).then_some(index as i64);
            versions(&self.params[j], 3, edit, &values[1..])
        };
        let lp = self.layer_params[layer];
        (lp.first.map(stack), lp.second.map(stack))
    }

    /// Logits `[B, 3, classes]` of the three versions from the input `x` of `layer`: the layer
    /// with stacked parameters, then the rest of the model on the stacked activations.
    fn stacked_candidates(
        &mut self,
        x: &Tensor,
        layer: usize,
        param: usize,
        index: usize,
        values: [f32; 3],
    ) -> Tensor {
        let (first, second) = self.stacked_params(layer, param, index, values);
        let out = match &self.spec.layers[layer] {
            Layer::Conv { .. } => conv3x3(
                x,
                first.as_ref().expect("a conv layer has a weight"),
                second.as_ref(),
                1,
            ),
            Layer::BatchNorm { .. } => {
                batch_norm_of_batch(&x.repeat([1, 3, 1, 1]), first.as_ref(), second.as_ref())
            }
            Layer::Dense { .. } => x.flatten(1, -1).linear(
                first.as_ref().expect("a dense layer has a weight"),
                second.as_ref(),
            ),
            other => unreachable!("layer {layer} ({other:?}) has no parameters"),
        };
        let layers = self.spec.layers.len();
        let grouped = self.grouped(3);
        let logits = self.forward_layers(
            &out,
            layer + 1..layers,
            &grouped,
            crate::BnMode::Batch,
            3,
            None,
        );
        logits.view([x.size()[0], 3, -1])
    }

    /// [`TchNetwork::grouped_params`] for `groups` versions, kept for the sweep.
    fn grouped(&mut self, groups: i64) -> Vec<Tensor> {
        if let Some((_, p)) = self.inc.grouped.iter().find(|(g, _)| *g == groups) {
            return p.iter().map(Tensor::shallow_clone).collect();
        }
        let p = self.grouped_params(groups);
        let copy = p.iter().map(Tensor::shallow_clone).collect();
        self.inc.grouped.push((groups, p));
        copy
    }

    /// The device indices and labels of `batch`, kept for batches that recur.
    fn batch_tensors(&mut self, batch: &[u32]) -> (Tensor, Tensor) {
        if let Some((idx, labels)) = self.inc.batches.get(batch) {
            return (idx.shallow_clone(), labels.shallow_clone());
        }
        let idx = self.index_tensor(batch);
        let labels = self.train_y.index_select(0, &idx);
        if self.inc.batches.len() >= MAX_BATCHES {
            self.inc.batches.clear();
        }
        self.inc.batches.insert(
            batch.to_vec(),
            (idx.shallow_clone(), labels.shallow_clone()),
        );
        (idx, labels)
    }

    /// The convolution that follows `layer` (a convolution or BatchNorm) through channel-local
    /// layers only (ReLU, pooling, BatchNorm), if any.
    fn next_conv(&self, layer: usize) -> Option<usize> {
        if !matches!(
            self.spec.layers[layer],
            Layer::Conv { .. } | Layer::BatchNorm { .. }
        ) {
            return None;
        }
        for (i, l) in self.spec.layers.iter().enumerate().skip(layer + 1) {
            match l {
                Layer::Relu | Layer::MaxPool2 | Layer::AvgPool2 | Layer::BatchNorm { .. } => {}
                Layer::Conv { .. } => return Some(i),
                _ => return None,
            }
        }
        None
    }

    /// Logits `[B, 3, classes]` for a scalar of output channel `k` of `layer` (a convolution or
    /// BatchNorm, input `x`) when only channel-local layers lie between it and the
    /// convolution `next`: the batch's [`Tail`] (input and output of `next` at W), the two
    /// candidates' channel `k` up to `next`, their change added through `next`'s weights of
    /// input channel `k` to the output of `next`, and the layers after `next` on W and both
    /// candidates as one stacked batch of 3.
    #[allow(clippy::too_many_arguments)]
    fn channel_candidates(
        &mut self,
        x: &Tensor,
        batch: &[u32],
        layer: usize,
        next: usize,
        param: usize,
        index: usize,
        values: [f32; 3],
    ) -> Tensor {
        let layers = self.spec.layers.len();
        let rows = x.size()[0];
        let (a, z) = self.tail(batch, x, layer, next);
        // Channel k of `layer`'s output for the two candidates: [B, 2, H, W].
        let k = self.channel_of(param, index);
        let lp = self.layer_params[layer];
        let two = |j: usize| -> Tensor {
            let channel = self.params[j].narrow(0, k, 1);
            let edit = (j == param).then(|| index as i64 - k * channel.numel() as i64);
            versions(&channel, 2, edit, &values[1..])
        };
        let y = self.channel_output(x, layer, k, lp.first.map(two), lp.second.map(two));
        let y = self.channel_chain(y, layer + 1..next, k, 2);
        // Their change of `next`'s input channel k, through `next`'s weights of that channel.
        let change = y - a.narrow(1, k, 1);
        let w_k = self.next_weight(next, k).repeat([2, 1, 1, 1]);
        let dz = conv3x3(&change, &w_k, None, 2);
        let z3 = Tensor::cat(&[z.shallow_clone(), z.repeat([1, 2, 1, 1]) + dz], 1);
        let grouped = self.grouped(3);
        let logits = self.forward_layers(
            &z3,
            next + 1..layers,
            &grouped,
            crate::BnMode::Batch,
            3,
            None,
        );
        logits.view([rows, 3, -1])
    }

    /// Output channel `k` of `layer` (a convolution or BatchNorm, input `x`) for as many versions
    /// as `first`/`second` (the layer's two arrays restricted to channel `k`) stack: `[B, G, H, W]`.
    fn channel_output(
        &self,
        x: &Tensor,
        layer: usize,
        k: i64,
        first: Option<Tensor>,
        second: Option<Tensor>,
    ) -> Tensor {
        match &self.spec.layers[layer] {
            Layer::Conv { .. } => conv3x3(
                x,
                first.as_ref().expect("a conv layer has a weight"),
                second.as_ref(),
                1,
            ),
            _ => {
                let copies = first.as_ref().map_or(1, |f| f.size()[0]);
                let channel = x.narrow(1, k, 1).repeat([1, copies, 1, 1]);
                batch_norm_of_batch(&channel, first.as_ref(), second.as_ref())
            }
        }
    }

    /// The channel-local `layers` (ReLU, pooling, BatchNorm with channel `k`'s parameters) on
    /// `copies` stacked versions of channel `k`.
    fn channel_chain(
        &self,
        mut y: Tensor,
        layers: std::ops::Range<usize>,
        k: i64,
        copies: i64,
    ) -> Tensor {
        for i in layers {
            let layer = &self.spec.layers[i];
            y = match plain_layer(layer, &y) {
                Some(out) => out,
                None => {
                    assert!(
                        matches!(layer, Layer::BatchNorm { .. }),
                        "layer {i} ({layer:?}) is not channel-local"
                    );
                    let p = self.layer_params[i];
                    let pick = |j: usize| self.params[j].narrow(0, k, 1).repeat([copies]);
                    let (gamma, beta) = (p.first.map(pick), p.second.map(pick));
                    batch_norm_of_batch(&y, gamma.as_ref(), beta.as_ref())
                }
            };
        }
        y
    }

    /// The weights of convolution `next` for its input channel `k`: `[C_out, 1, 3, 3]`.
    fn next_weight(&self, next: usize, k: i64) -> Tensor {
        let w = &self.params[self.layer_params[next]
            .first
            .expect("a conv layer has a weight")];
        w.narrow(1, k, 1)
    }

    /// The [`Tail`] of `batch` (input `x` of `layer`): kept from an earlier visit and brought up
    /// to date channel by channel, or computed (and kept while the memory cap allows).
    fn tail(&mut self, batch: &[u32], x: &Tensor, layer: usize, next: usize) -> (Tensor, Tensor) {
        let now = self.inc.changes.len();
        let cap = self.memo_cap();
        if let Some(mut t) = self.inc.tails.remove(batch) {
            let mut channels = self.inc.changes[t.seen..].to_vec();
            channels.sort_unstable();
            channels.dedup();
            if t.refreshes + channels.len() <= MAX_REFRESHES {
                let lp = self.layer_params[layer];
                for k in channels {
                    let pick = |j: usize| self.params[j].narrow(0, k, 1);
                    let y =
                        self.channel_output(x, layer, k, lp.first.map(pick), lp.second.map(pick));
                    let a_k = self.channel_chain(y, layer + 1..next, k, 1);
                    let mut old = t.a.narrow(1, k, 1);
                    let change = &a_k - &old;
                    let dz = conv3x3(&change, &self.next_weight(next, k), None, 1);
                    let _ = t.z.g_add_(&dz);
                    old.copy_(&a_k);
                    t.refreshes += 1;
                }
                t.seen = now;
                let out = (t.a.shallow_clone(), t.z.shallow_clone());
                let size = (t.a.numel() + t.z.numel()) as i64 * 4;
                self.inc.tails.insert(batch, t, size, cap);
                return out;
            }
        }
        let bn = crate::BnMode::Batch;
        let a = self.forward_layers(x, layer..next, &self.params, bn, 1, None);
        let z = self.forward_layers(&a, next..next + 1, &self.params, bn, 1, None);
        let size = (a.numel() + z.numel()) as i64 * 4;
        let t = Tail {
            a: a.shallow_clone(),
            z: z.shallow_clone(),
            seen: now,
            refreshes: 0,
        };
        self.inc.tails.insert(batch, t, size, cap);
        (a, z)
    }

    /// Logits `[B, 3, classes]` f64 for a scalar of the final dense layer of a model without
    /// BatchNorm, from the all-samples logits and the layer's input.
    fn cached_dense_candidates(
        &mut self,
        idx: &Tensor,
        param: usize,
        index: usize,
        values: [f32; 3],
    ) -> Tensor {
        let layer = self.specs[param].layer;
        if !matches!(self.inc.prefix, Prefix::All(_)) {
            let all = self.all_inputs(layer).flatten(1, -1);
            self.inc.prefix = Prefix::All(all);
            self.inc.logits = None;
        }
        let Prefix::All(x) = &self.inc.prefix else {
            unreachable!("set just above")
        };
        if self.inc.logits.is_none() {
            let lp = self.layer_params[layer];
            let w = &self.params[lp.first.expect("a dense layer has a weight")];
            let b = lp.second.map(|j| &self.params[j]);
            self.inc.logits = Some(x.linear(w, b).to_kind(Kind::Double));
        }
        let z = self.inc.logits.as_ref().expect("set just above");
        let (k, feature) = self.dense_target(param, index, x.size()[1]);
        // The exact changes of the f32 candidates (w + δ and w − δ round in f32).
        let w = f64::from(values[0]);
        let (plus, minus) = (f64::from(values[1]) - w, f64::from(values[2]) - w);
        let z = z.index_select(0, idx);
        let rows = z.size()[0];
        let xj = match feature {
            Some(j) => x.select(1, j).index_select(0, idx).to_kind(Kind::Double),
            None => Tensor::ones([rows], (Kind::Double, self.device)),
        };
        // Logit k of each sample moves by change·x_j (computed on the device: no transfer).
        let moves = Tensor::stack(&[xj.zeros_like(), &xj * plus, &xj * minus], 1);
        let stacked = z.unsqueeze(1).repeat([1, 3, 1]);
        let _ = stacked.select(2, k).g_add_(&moves);
        stacked
    }

    /// The memory cap of each per-batch cache on this device (bytes).
    fn memo_cap(&self) -> i64 {
        if self.device == Device::Cpu {
            MEMO_BYTES_CPU
        } else {
            MEMO_BYTES_CUDA
        }
    }
}

/// The three reduced losses of logits `[B, 3, classes]` (any float kind) against labels `[B]`,
/// per-sample cross-entropy in f64, read back in one transfer.
fn candidate_losses_of(logits: &Tensor, labels: &Tensor, reduction: Reduction) -> [f64; 3] {
    let rows = logits.size()[0];
    let log_p = logits.to_kind(Kind::Double).log_softmax(2, Kind::Double);
    let target = labels.view([rows, 1, 1]).expand([rows, 3, 1], false);
    let per_sample = -log_p.gather(2, &target, false).squeeze_dim(2);
    let sums = per_sample.sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
    let sums = sums.to_device(Device::Cpu);
    let v = Vec::<f64>::try_from(&sums).expect("three f64 losses");
    [
        reduction.finish(v[0], rows as usize),
        reduction.finish(v[1], rows as usize),
        reduction.finish(v[2], rows as usize),
    ]
}

/// `copies` versions of array `p` stacked along its first dimension; with `edit = Some(at)`, the
/// last `values.len()` versions have flat element `at` (of one version) set to `values`.
fn versions(p: &Tensor, copies: i64, edit: Option<i64>, values: &[f32]) -> Tensor {
    let stacked = repeat_first(p, copies);
    if let Some(at) = edit {
        let flat = stacked.view(-1);
        let len = p.numel() as i64;
        let first = copies - values.len() as i64;
        for (g, &v) in (first..).zip(values) {
            let _ = flat.get(g * len + at).fill_(f64::from(v));
        }
    }
    stacked
}
