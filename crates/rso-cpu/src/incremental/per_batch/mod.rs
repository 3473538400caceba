//! The paths of models with BatchNorm on batch statistics (`paper`): state kept *per batch*.
//!
//! Batch statistics mix the samples of a batch, so nothing after the first BatchNorm can be
//! kept across batches: every visit runs one forward pass of its batch (which gives the loss at
//! W and the activations the candidates start from). From there a candidate is *channel-local*: a weight of output
//! channel `k` (or `γ_k`, `β_k`) changes channel `k` of the layer's output only, and the
//! layers up to the next parameter layer — pooling, BatchNorm (channel `k`'s statistics only),
//! ReLU, global average pooling — act on each channel alone (the *chain*). Then:
//! - the next layer is a convolution: its output moves by `W_next[:, k] ⊛ Δo_k` (one input
//!   channel instead of all), and the rest of the network runs from there on the batch (its
//!   BatchNorm statistics change in every channel, so that part is a plain forward pass);
//! - the next layer is the final dense layer: the logits move by `W_fc[:, block k]·Δo_k`.
//!
//! The base goes through the same arithmetic as the candidates (the loss of the forward pass
//! for a next convolution, the same logit update with `Δo_k = 0` for a next dense layer), so a
//! candidate that changes nothing ties with W exactly, as on the reference path.
//!
//! The layers before the visited one do not change during its sweep, so when a batch comes
//! back (preset `seed` draws every visit's batch from the ⌈N/B⌉ batches of the round; preset
//! `paper`'s windows recur when B divides N) an [`ActivationMemo`] supplies its input to the
//! visited layer and, for a convolution, the next convolution's output at W moved by the
//! channels changed since, so W's pass starts after the next convolution. What it keeps, and
//! when, is listed on [`ActivationMemo`].
//!
//! Files: [`memo`] (the per-batch activations and the forward pass that uses them), [`conv`]
//! (convolution and BatchNorm scalars), [`dense`] (the final dense layer).

pub(crate) mod conv;
pub(crate) mod dense;
pub(crate) mod memo;

use crate::incremental::util::LogProd;
use memo::ActivationMemo;

/// Samples per task of the one-channel convolution (fixed: results do not depend on threads).
const CHUNK: usize = 16;

/// State of the per-batch paths: the memo and reused buffers.
#[derive(Debug, Default)]
pub(crate) struct PerBatch {
    pub(super) memo: ActivationMemo,
    /// Channel-`k` planes of the three variants, `[3][B][hw]`, and a second buffer.
    pub(super) a: Vec<f32>,
    pub(super) b: Vec<f32>,
    pub(super) moments: Vec<(f64, f64)>,
    /// The next convolution's output at W, `[B][len]`, while the candidates run (swapped
    /// with the executor's buffer, whose length it takes).
    pub(super) base_p: Vec<f32>,
    /// `Δo_k` of a candidate, `[B][hw]` (and, in `finish`, the three variants' chain outputs).
    pub(super) delta: Vec<f32>,
    /// One variant's channel-`k` planes on their way through the chain.
    pub(super) chained: Vec<f32>,
    /// The next convolution's weights of input channel `k`, `[c_out][9]`.
    pub(super) w_k: Vec<f32>,
    /// Per-chunk loss accumulators of a dense visit.
    pub(super) parts: Vec<[LogProd; 3]>,
}
