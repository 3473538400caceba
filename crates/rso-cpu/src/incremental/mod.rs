//! Incremental RSO candidate evaluation: the three losses of [`Network::candidate_losses`] (at
//! W, at `w + δ`, at `w − δ`) computed from what one scalar change touches instead of three
//! forward passes, equal to the reference path ([`reference_candidate_losses`](rso_models::network::reference_candidate_losses)) up to
//! floating-point rounding (tests/incremental.rs holds them to 1e-5 relative and checks that a
//! seeded RSO round takes the same decisions on both paths).
//!
//! What each layer kind does (N training samples, B per batch):
//!
//! | visited array | model without BatchNorm (`one-conv`, `two-conv`) | model with BatchNorm on batch statistics (`paper`) |
//! |---|---|---|
//! | final dense weight/bias | [`all_samples::dense::cached`]: logits of all N samples (f64) and the layer's input kept in the [store]; O(B) per visit (one vectorised exponential per sample and candidate), accepted changes added to all N logits once per block of 16 weights; once the visits' batches are seen to partition the training set (preset `seed`: the round's shuffled batches, recognised by content), logits, input and per-row constants are kept in the order of those batches, so that a visit reads contiguous ranges instead of gathering its samples | [`per_batch::dense::per_batch`]: one forward pass of the batch (from the layer's input when the batch recurs, [`per_batch::memo::ActivationMemo`]), then O(B) |
//! | convolution weight/bias | [`all_samples::conv`]: a snapshot of all N samples' next-layer input and logits (or next convolution's output); per visit channel `k` (and any *dirty* channel) for the batch only — from the stored layer output plus a convolution of the input channels whose weights changed since the snapshot when the store keeps that output — then one block of logits (or one input channel of the next convolution); dirty channels folded into the snapshot when RSO moves on | [`per_batch::conv::conv`]: one forward pass of the batch (from the layer's input when the batch recurs), then channel `k` alone through pooling, BatchNorm (channel `k`'s batch statistics) and ReLU, one input channel of the next convolution, and a forward pass of the rest per candidate |
//! | BatchNorm γ/β | — | [`per_batch::conv::norm`]: as a convolution, from the BatchNorm on |
//!
//! Anything else (a layer order these paths do not recognise, more than 64 classes, an empty
//! batch) takes the reference path.
//!
//! The all-samples arrays are hundreds of MB read at random rows, so the paths prefetch the rows
//! of samples a little ahead of the one being computed.
//!
//! Caches are built lazily by the first incremental visit of a sweep (so `--rso-eval reference`
//! never builds them) and checked against a change clock: every parameter change ticks it and
//! records the tick per layer ([`Clock`]); a cached array remembers the tick it is consistent
//! with and is valid while no layer it depends on changed since. Changes of the final dense
//! layer are added to the all-samples logits ([`all_samples::dense::update`]); a convolution's changes are
//! folded into its snapshot ([`all_samples::conv`]); `set_params` and SGD steps mark every layer changed.
//! The sweep that starts every RSO round (the final dense layer's weights) drops all caches,
//! so a round's arithmetic depends only on the weights it starts from: a run resumed from a
//! checkpoint computes bit for bit what the uninterrupted run computes.
//!
//! Work is split over rayon threads in fixed chunks of samples and every reduction combines the
//! chunks in order, so the losses do not depend on the number of threads.
//!
//! Cost per round, in the terms of DESIGN §5: a model without BatchNorm runs one forward pass
//! of the training set per round (at the dense sweep) and no forward pass of a batch at all;
//! its dense sweep is O(B) per weight; a convolution weight costs O(B·c_in·9·h·w) for channel
//! `k` (or O(B·h·w) per change since the channel's snapshot) plus the next layer's share. The
//! `paper` model's BatchNorm mixes the samples of a batch, so each visit runs one forward pass
//! of its batch (the layers before the visited one skipped when the batch recurs) and each
//! candidate the layers after the next convolution.

//!
//! Layout: [`all_samples`] holds the strategy of the models without BatchNorm (arrays of the
//! whole training set kept current), [`per_batch`] that of the BatchNorm models (state kept per
//! batch); [`util`] the loss accumulator, chunking and scratch both use.

mod all_samples;
mod per_batch;
mod util;

use all_samples::{conv, dense, store};

use crate::executor::{Executor, Op};
#[cfg(doc)]
use rso_models::Network;
use rso_models::Reduction;
use std::ops::Range;

/// One RSO visit: the batch, the scalar (array, index), Δ and the loss reduction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Visit<'a> {
    pub(crate) batch: &'a [u32],
    pub(crate) param: usize,
    pub(crate) index: usize,
    pub(crate) delta: f32,
    pub(crate) reduction: Reduction,
}

/// The parameter layer after a visited layer and the channel-local layers that follow it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Next {
    /// The final dense layer (plan index, input length, weight array).
    Dense {
        layer: usize,
        d_in: usize,
        weight: usize,
    },
    /// A convolution (plan index, shape, weight array).
    Conv {
        layer: usize,
        conv: crate::kernels::conv::Conv3x3,
        weight: usize,
    },
}

impl Next {
    /// Its plan index.
    pub(crate) fn layer(self) -> usize {
        match self {
            Next::Dense { layer, .. } | Next::Conv { layer, .. } => layer,
        }
    }
}

/// Largest class count of the incremental paths (their per-sample logits live on the stack).
pub(super) const MAX_CLASSES: usize = 64;

/// The change clock: a tick per parameter change, and the tick of each layer's last change.
#[derive(Debug, Default)]
pub(super) struct Clock {
    tick: u64,
    changed: Vec<u64>,
}

impl Clock {
    /// The current tick.
    pub(super) fn now(&self) -> u64 {
        self.tick
    }

    /// Whether none of plan layers `layers` changed after tick `t`.
    pub(super) fn unchanged_since(&self, t: u64, layers: Range<usize>) -> bool {
        self.changed[layers].iter().all(|&c| c <= t)
    }

    fn touch(&mut self, layer: usize) {
        self.tick += 1;
        self.changed[layer] = self.tick;
    }

    fn touch_all(&mut self) {
        self.tick += 1;
        let t = self.tick;
        self.changed.iter_mut().for_each(|c| *c = t);
    }
}

/// Where each parameter array lives, resolved once per network.
#[derive(Debug)]
struct Topology {
    /// Plan index of each parameter array's layer.
    param_layer: Vec<usize>,
    /// Whether any layer is a BatchNorm (batch statistics mix samples).
    has_bn: bool,
    /// Plan index of the last layer when it is dense.
    dense: Option<usize>,
}

impl Topology {
    fn of(exec: &Executor) -> Topology {
        let mut param_layer = vec![0; exec.params.values.len()];
        let mut has_bn = false;
        for (i, step) in exec.plan.iter().enumerate() {
            let arrays: [Option<usize>; 2] = match step.op {
                Op::Conv { weight, bias, .. } | Op::Dense { weight, bias, .. } => {
                    [Some(weight), bias]
                }
                Op::BatchNorm { gamma, beta, .. } => {
                    has_bn = true;
                    [Some(gamma), Some(beta)]
                }
                _ => [None, None],
            };
            for p in arrays.into_iter().flatten() {
                param_layer[p] = i;
            }
        }
        let last = exec.plan.len() - 1;
        let dense = matches!(exec.plan[last].op, Op::Dense { .. }).then_some(last);
        Topology {
            param_layer,
            has_bn,
            dense,
        }
    }
}

/// The incremental path's caches and scratch, beside the [`Executor`] in a `CpuNetwork`.
#[derive(Default)]
pub(crate) struct Incremental {
    topo: Option<Topology>,
    clock: Clock,
    store: store::Store,
    dense: dense::DenseState,
    conv: Option<conv::ConvCache>,
    bn: per_batch::PerBatch,
}

impl std::fmt::Debug for Incremental {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incremental")
            .field("tick", &self.clock.tick)
            .field("conv_snapshot", &self.conv.as_ref().map(|c| c.layer))
            .finish_non_exhaustive()
    }
}

impl Incremental {
    /// Marks every layer changed (after `set_params`, an SGD step): every cache becomes stale.
    pub(crate) fn invalidate(&mut self) {
        if self.topo.is_some() {
            self.clock.touch_all();
            self.conv = None;
            self.dense.forget_rows();
            self.dense.forget_slots();
            self.store.pending = [0.0; store::FB];
            self.store.has_pending = false;
            self.store.layout = None;
        }
    }

    fn init(&mut self, exec: &Executor) {
        if self.topo.is_none() {
            self.topo = Some(Topology::of(exec));
            self.clock.changed = vec![0; exec.plan.len()];
        }
    }

    /// Ends the convolution snapshot, if any (see [`conv::finish`]).
    fn finish_conv(&mut self, exec: &Executor) {
        if let Some(cache) = self.conv.take() {
            conv::finish(self, cache, exec);
        }
    }

    fn route(&mut self, exec: &mut Executor, v: Visit) -> Option<[f64; 3]> {
        let topo = self.topo.as_ref().expect("initialised");
        let layer = topo.param_layer[v.param];
        let (has_bn, dense) = (topo.has_bn, topo.dense);
        match exec.plan[layer].op {
            Op::Dense { .. } if dense == Some(layer) => {
                self.finish_conv(exec);
                Some(if has_bn {
                    per_batch::dense::per_batch(self, exec, layer, v)
                } else {
                    dense::cached(self, exec, layer, v)
                })
            }
            Op::Conv { .. } if has_bn => {
                per_batch::conv::conv(&mut self.bn, &self.clock, exec, layer, v)
            }
            Op::Conv { .. } => conv::visit(self, exec, layer, v),
            Op::BatchNorm { .. } => {
                per_batch::conv::norm(&mut self.bn, &self.clock, exec, layer, v)
            }
            _ => None,
        }
    }
}

impl Incremental {
    /// The three losses of [`Network::candidate_losses`] by the incremental path, or `None`
    /// where it does not apply (the caller then takes the reference path through the whole
    /// network, so that its temporary weight changes reach [`Incremental::weight_changed`]).
    pub(crate) fn candidate_losses(&mut self, exec: &mut Executor, v: Visit) -> Option<[f64; 3]> {
        if v.batch.is_empty() || !(2..=MAX_CLASSES).contains(&exec.spec.classes) {
            return None;
        }
        self.init(exec);
        self.route(exec, v)
    }

    /// [`Network::begin_sweep`]. Caches are built lazily; this only ends what the new sweep
    /// does not continue:
    /// - the sweep of the final dense layer's weight is where every RSO round starts (both
    ///   presets visit it first): all caches are dropped there, so that a round's arithmetic
    ///   depends on the weights it starts from and not on earlier rounds (a run resumed from a
    ///   checkpoint then computes bit for bit what the uninterrupted run computes);
    /// - a sweep of another layer ends the convolution snapshot, folding it so that the next
    ///   sweep starts from current all-samples arrays.
    pub(crate) fn begin_sweep(&mut self, exec: &Executor, param: usize) {
        let Some(topo) = &self.topo else {
            return;
        };
        let layer = topo.param_layer[param];
        let round_start = topo.dense == Some(layer)
            && matches!(exec.plan[layer].op, Op::Dense { weight, .. } if weight == param);
        if round_start {
            self.invalidate();
        } else if self.conv.as_ref().is_some_and(|c| c.layer != layer) {
            self.finish_conv(exec);
        }
    }

    /// Called by `set_weight` after scalar `index` of array `param` changed from `old`: ticks
    /// the clock, and keeps the all-samples logits current when the final dense layer changed.
    pub(crate) fn weight_changed(&mut self, exec: &Executor, param: usize, index: usize, old: f32) {
        let new = exec.params.values[param][index];
        if new.to_bits() == old.to_bits() {
            return;
        }
        let Some(topo) = &self.topo else {
            return;
        };
        let layer = topo.param_layer[param];
        let layers = exec.plan.len();
        let eager = topo.dense == Some(layer)
            && !topo.has_bn
            && self.store.z.valid(&self.clock, layers)
            && self.store.xb.valid(&self.clock, layer);
        self.clock.touch(layer);
        if eager {
            dense::update(self, exec, layer, param, index, old, new);
        }
    }
}

/// The layer's shape: `(d_in, d_out, weight, bias)`.
pub(super) fn dense_shape(exec: &Executor, layer: usize) -> (usize, usize, usize, Option<usize>) {
    match exec.plan[layer].op {
        Op::Dense {
            d_in,
            d_out,
            weight,
            bias,
        } => (d_in, d_out, weight, bias),
        _ => unreachable!("layer {layer} is not dense"),
    }
}

/// Which logit row and which input a scalar of the layer moves: `(k, Some(j))` for weight
/// `(k, j)`, `(k, None)` for bias `k`.
pub(super) fn dense_target(
    exec: &Executor,
    layer: usize,
    param: usize,
    index: usize,
) -> (usize, Option<usize>) {
    let (d_in, _, weight, _) = dense_shape(exec, layer);
    if param == weight {
        (index / d_in, Some(index % d_in))
    } else {
        (index, None)
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil as tu;
    use crate::CpuNetwork;
    use rand::Rng;
    use rso_models::network::reference_candidate_losses;
    use rso_models::{init_params, Init, ModelKind, Network, Reduction};
    use rso_testkit::{Labels, Pixels, RandomData};

    fn network(kind: ModelKind, n: usize, seed: u64) -> CpuNetwork {
        let spec = kind.spec(1, 12, 10);
        // Mostly zero pixels, as in MNIST.
        let split = RandomData::of(&spec)
            .pixels(Pixels::Sparse { zero_below: 0.6 })
            .labels(Labels::Cyclic)
            .split(n, 4, &mut tu::rng(seed));
        let params = init_params(&spec, Init::GlorotUniform, &mut tu::rng(seed + 1));
        CpuNetwork::new(&spec, &params, split).expect("network")
    }

    /// Sweeps of every array with batches drawn from a fixed partition (preset `seed`'s
    /// batches): the dense path switches to the batches' order of the samples, and computes
    /// the same losses, bit for bit, as in sample order; both match the reference.
    #[test]
    fn the_batch_order_layout_changes_no_loss() {
        for kind in [ModelKind::OneConv, ModelKind::TwoConv] {
            let n = 48;
            let mut nets = [network(kind, n, 3), network(kind, n, 3)];
            let mut rng = tu::rng(4);
            let mut order: Vec<u32> = (0..n as u32).collect();
            for i in (1..n).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            let batches: Vec<&[u32]> = order.chunks(10).collect();
            let lens: Vec<usize> = nets[0].spec().params().iter().map(|p| p.len()).collect();
            let mut laid_out = false;
            for param in (0..lens.len()).rev() {
                for net in nets.iter_mut() {
                    net.begin_sweep(param);
                }
                nets[1].inc.dense.disable_layout();
                for index in 0..lens[param].min(200) {
                    let batch = batches[rng.random_range(0..batches.len())];
                    let delta = rng.random_range(-0.3f32..0.3);
                    let [a, b] = &mut nets;
                    let la = a.candidate_losses(batch, param, index, delta, Reduction::Mean);
                    let lb = b.candidate_losses(batch, param, index, delta, Reduction::Mean);
                    laid_out |= a.inc.store.layout.is_some();
                    assert!(b.inc.store.layout.is_none());
                    assert_eq!(
                        la.map(f64::to_bits),
                        lb.map(f64::to_bits),
                        "{kind:?} {param}"
                    );
                    let r =
                        reference_candidate_losses(a, batch, param, index, delta, Reduction::Mean);
                    for (x, y) in la.iter().zip(&r) {
                        assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-3), "{la:?} {r:?}");
                    }
                    let w = a.weight(param, index);
                    let best = (0..3).min_by(|&i, &j| la[i].total_cmp(&la[j])).expect("3");
                    let v = [w, w + delta, w - delta][best];
                    for net in nets.iter_mut() {
                        net.set_weight(param, index, v);
                    }
                }
            }
            assert!(laid_out, "{kind:?}: the batches' order was never used");
        }
    }
}
