//! The batches a dense sweep's weight visits see, recognised by content, until they are seen
//! to partition the training set (see [`super::dense`]).

use std::collections::HashMap;

/// The distinct batches seen by the weight visits since the caches were dropped, while they
/// are disjoint (see [`Slots::register`]).
#[derive(Debug, Default)]
pub(crate) struct Slots {
    /// The batches' samples, concatenated in the order first seen.
    pub(crate) flat: Vec<u32>,
    /// Start of each batch in `flat`.
    pub(crate) starts: Vec<usize>,
    /// Batches by [`Slots::key`].
    pub(crate) by_key: HashMap<[u32; 4], Vec<usize>>,
    /// Per sample: whether it is in a batch already.
    pub(crate) owned: Vec<bool>,
    /// Two batches overlapped (or one repeated a sample): no layout until the caches drop.
    pub(crate) broken: bool,
}

impl Slots {
    /// A cheap key of a batch (a lookup compares the whole batch).
    fn key(batch: &[u32]) -> [u32; 4] {
        let n = batch.len();
        [n as u32, batch[0], batch[n / 2], batch[n - 1]]
    }

    /// Start in `flat` (the position range, once the layout is built) of a known batch.
    pub(crate) fn find(&self, batch: &[u32]) -> Option<usize> {
        let slots = self.by_key.get(&Slots::key(batch))?;
        slots.iter().find_map(|&s| {
            let start = self.starts[s];
            (self.flat.get(start..start + batch.len()) == Some(batch)).then_some(start)
        })
    }

    /// Records a batch not seen before; returns true when the batches seen so far are disjoint
    /// and cover all `n` samples (they then form a partition: the layout can be built).
    pub(crate) fn register(&mut self, batch: &[u32], n: usize) -> bool {
        if self.broken || self.find(batch).is_some() {
            return false;
        }
        if self.owned.len() != n {
            self.owned = vec![false; n];
        }
        for &i in batch {
            let owned = &mut self.owned[i as usize];
            if *owned {
                self.broken = true;
                return false;
            }
            *owned = true;
        }
        let s = self.starts.len();
        self.starts.push(self.flat.len());
        self.flat.extend_from_slice(batch);
        self.by_key.entry(Slots::key(batch)).or_default().push(s);
        self.flat.len() == n
    }
}
