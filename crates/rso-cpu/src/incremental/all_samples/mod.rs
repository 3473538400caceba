//! The paths of models without BatchNorm (`one-conv`, `two-conv`): every layer is per-sample,
//! so activations of the whole training set can be kept current across batches.
//!
//! Files: [`store`] (the all-samples arrays and their freshness), [`dense`] (the final dense
//! layer: O(B) visits from the all-samples logits), [`conv`] (convolutions: a snapshot, dirty
//! channels, folds).

pub(crate) mod conv;
pub(crate) mod dense;
pub(crate) mod store;
