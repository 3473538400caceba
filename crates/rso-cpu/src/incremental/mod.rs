//! Incremental RSO candidate evaluation: the three losses of [`Network::candidate_losses`] (at
//! W, at `w + δ`, at `w − δ`) computed from what one scalar change touches instead of three
//! forward passes, equal to the reference path ([`reference_candidate_losses`]) up to
//! floating-point rounding (tests/incremental.rs holds them to 1e-5 relative and checks that a
//! seeded RSO round takes the same decisions on both paths).
//!
//! What each layer kind does (N training samples, B per batch):
//!
//! | visited array | model without BatchNorm (`one-conv`, `two-conv`) | model with BatchNorm on batch statistics (`paper`) |
//! |---|---|---|
//! | final dense weight/bias | [`dense::cached`]: logits of all N samples (f64) and the layer's input kept in the [store](store); O(B) per visit (one vectorised exponential per sample and candidate), accepted changes added to all N logits once per block of 16 weights; once the visits' batches are seen to partition the training set (preset `seed`: the round's shuffled batches, recognised by content), logits, input and per-row constants are kept in the order of those batches, so that a visit reads contiguous ranges instead of gathering its samples | [`dense::per_batch`]: one forward pass of the batch (from the layer's input when the batch recurs, [`bn::BatchMemo`]), then O(B) |
//! | convolution weight/bias | [`conv`]: a snapshot of all N samples' next-layer input and logits (or next convolution's output); per visit channel `k` (and any *dirty* channel) for the batch only — from the stored layer output plus a convolution of the input channels whose weights changed since the snapshot when the store keeps that output — then one block of logits (or one input channel of the next convolution); dirty channels folded into the snapshot when RSO moves on | [`bn::conv`]: one forward pass of the batch (from the layer's input when the batch recurs), then channel `k` alone through pooling, BatchNorm (channel `k`'s batch statistics) and ReLU, one input channel of the next convolution, and a forward pass of the rest per candidate |
//! | BatchNorm γ/β | — | [`bn::norm`]: as a convolution, from the BatchNorm on |
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
//! layer are added to the all-samples logits ([`dense::update`]); a convolution's changes are
//! folded into its snapshot ([`conv`]); `set_params` and SGD steps mark every layer changed.
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

mod bn;
mod conv;
mod dense;
mod store;
mod util;

use crate::network::{CpuNetwork, Op};
use rso_models::network::reference_candidate_losses;
#[cfg(doc)]
use rso_models::Network;
use rso_models::Reduction;
use std::ops::Range;

/// One RSO visit: the batch, the scalar (array, index), Δ and the loss reduction.
#[derive(Clone, Copy, Debug)]
pub(super) struct Visit<'a> {
    pub(super) batch: &'a [u32],
    pub(super) param: usize,
    pub(super) index: usize,
    pub(super) delta: f32,
    pub(super) reduction: Reduction,
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
    fn of(net: &CpuNetwork) -> Topology {
        let mut param_layer = vec![0; net.params.values.len()];
        let mut has_bn = false;
        for (i, step) in net.plan.iter().enumerate() {
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
        let last = net.plan.len() - 1;
        let dense = matches!(net.plan[last].op, Op::Dense { .. }).then_some(last);
        Topology {
            param_layer,
            has_bn,
            dense,
        }
    }
}

/// The incremental path's caches and scratch, owned by the [`CpuNetwork`].
#[derive(Default)]
pub(crate) struct Incremental {
    topo: Option<Topology>,
    clock: Clock,
    store: store::Store,
    dense: dense::DenseState,
    conv: Option<conv::ConvCache>,
    bn: bn::BnScratch,
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

    fn init(&mut self, net: &CpuNetwork) {
        if self.topo.is_none() {
            self.topo = Some(Topology::of(net));
            self.clock.changed = vec![0; net.plan.len()];
        }
    }

    /// Ends the convolution snapshot, if any (see [`conv::finish`]).
    fn finish_conv(&mut self, net: &CpuNetwork) {
        if let Some(cache) = self.conv.take() {
            conv::finish(self, cache, net);
        }
    }

    fn route(&mut self, net: &mut CpuNetwork, v: Visit) -> Option<[f64; 3]> {
        let topo = self.topo.as_ref().expect("initialised");
        let layer = topo.param_layer[v.param];
        let (has_bn, dense) = (topo.has_bn, topo.dense);
        match net.plan[layer].op {
            Op::Dense { .. } if dense == Some(layer) => {
                self.finish_conv(net);
                Some(if has_bn {
                    dense::per_batch(self, net, layer, v)
                } else {
                    dense::cached(self, net, layer, v)
                })
            }
            Op::Conv { .. } if has_bn => bn::conv(&mut self.bn, &self.clock, net, layer, v),
            Op::Conv { .. } => conv::visit(self, net, layer, v),
            Op::BatchNorm { .. } => bn::norm(&mut self.bn, &self.clock, net, layer, v),
            _ => None,
        }
    }
}

/// [`Network::candidate_losses`] of the CPU engine: the incremental path where it applies, else
/// the reference path.
pub(crate) fn candidate_losses(
    net: &mut CpuNetwork,
    batch: &[u32],
    param: usize,
    index: usize,
    delta: f32,
    reduction: Reduction,
) -> [f64; 3] {
    let supported = !batch.is_empty() && (2..=MAX_CLASSES).contains(&net.spec.classes);
    let out = if supported {
        let mut inc = std::mem::take(&mut net.inc);
        inc.init(net);
        let visit = Visit {
            batch,
            param,
            index,
            delta,
            reduction,
        };
        let out = inc.route(net, visit);
        net.inc = inc;
        out
    } else {
        None
    };
    out.unwrap_or_else(|| reference_candidate_losses(net, batch, param, index, delta, reduction))
}

/// [`Network::begin_sweep`]. Caches are built lazily; this only ends what the new sweep does not
/// continue:
/// - the sweep of the final dense layer's weight is where every RSO round starts (both presets
///   visit it first): all caches are dropped there, so that a round's arithmetic depends on
///   the weights it starts from and not on earlier rounds (a run resumed from a checkpoint then
///   computes bit for bit what the uninterrupted run computes);
/// - a sweep of another layer ends the convolution snapshot, folding it so that the next
///   sweep starts from current all-samples arrays.
pub(crate) fn begin_sweep(net: &mut CpuNetwork, param: usize) {
    let mut inc = std::mem::take(&mut net.inc);
    if let Some(topo) = &inc.topo {
        let layer = topo.param_layer[param];
        let round_start = topo.dense == Some(layer)
            && matches!(net.plan[layer].op, Op::Dense { weight, .. } if weight == param);
        if round_start {
            inc.invalidate();
        } else if inc.conv.as_ref().is_some_and(|c| c.layer != layer) {
            inc.finish_conv(net);
        }
    }
    net.inc = inc;
}

/// Called by `set_weight` after scalar `index` of array `param` changed from `old`: ticks the
/// clock, and keeps the all-samples logits current when the final dense layer changed.
pub(crate) fn weight_changed(net: &mut CpuNetwork, param: usize, index: usize, old: f32) {
    let new = net.params.values[param][index];
    if new.to_bits() == old.to_bits() {
        return;
    }
    let mut inc = std::mem::take(&mut net.inc);
    if let Some(topo) = &inc.topo {
        let layer = topo.param_layer[param];
        let layers = net.plan.len();
        let eager = topo.dense == Some(layer)
            && !topo.has_bn
            && inc.store.z.valid(&inc.clock, layers)
            && inc.store.xb.valid(&inc.clock, layer);
        inc.clock.touch(layer);
        if eager {
            dense::update(&mut inc, net, layer, param, index, old, new);
        }
    }
    net.inc = inc;
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
