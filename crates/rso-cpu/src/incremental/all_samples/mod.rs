//! The paths of models without BatchNorm (`one-conv`, `two-conv`): every layer is per-sample,
//! so activations of the whole training set can be kept current across batches.
//!
//! Files: [`store`] (the all-samples arrays and their freshness), [`dense`] (the final dense
//! layer: O(B) visits from the all-samples logits, with [`dense_rows`], [`slots`] and [`pending`]), [`conv`] (convolutions: the snapshot, dirty
//! channels), [`conv_visit`] (the phases of one visit) and [`fold`] (when and how dirty channels are folded into the snapshot).

pub(crate) mod conv;
pub(crate) mod conv_visit;
pub(crate) mod dense;
pub(crate) mod dense_rows;
pub(crate) mod fold;
pub(crate) mod pending;
pub(crate) mod slots;
pub(crate) mod store;
