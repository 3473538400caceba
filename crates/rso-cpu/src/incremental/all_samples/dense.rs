//! Candidates of the final dense layer: a weight `(k, j)` moves logit `k` of every sample by
//! `Δ·x_j` (a bias by `Δ`), so a candidate costs O(B) given the logits and the layer's input.
//!
//! Without BatchNorm ([`cached`]) both come from the [store](super::store): the logits of the
//! whole training set (f64, class-major) and the layer's input in blocks of 16 features per
//! sample (one cache line, so the visits of a block gather from a few MB that stay in cache).
//! Accepted changes of row `k` stay *pending* while RSO is in the same block of 16 weights and
//! are added to the logits of all N samples when it leaves the block ([`update`],
//! [`Store::flush_pending`](super::store::Store::flush_pending)): one pass over N per block
//! instead of one per change. A visit adds the pending changes to its batch's logits itself,
//! from the cache lines it reads `x_j` from.
//!
//! During the sweep of row `k`, `m_i = max_{c≠k} z_ic` and `s_i = Σ_{c≠k} exp(z_ic − m_i)` do
//! not change, so they are computed once per row for every sample ([`Rows`]); a sample's
//! cross-entropy at a candidate is then `m_i − z_i,label + ln(s_i + exp(z_ik − m_i))`: one
//! exponential per sample and candidate (a vectorised polynomial, [`exp_kernel`](crate::incremental::util::exp_kernel)) and one
//! logarithm per lane of a chunk of samples ([`LogProd`]).
//!
//! The batches of preset `seed` are the round's ⌈N/B⌉ shuffled batches, each drawn about 130
//! times per dense sweep. The weight visits record the distinct batches they see ([`Slots`],
//! keyed by content); once those are disjoint and cover the training set, the store switches
//! to their order ([`Layout`]): the logits, the blocked input and the row constants are then
//! indexed by position in the concatenated batches, and a visit of one of them reads three
//! contiguous ranges (a visit of any other batch gathers its positions). Until then the lines
//! are read from the stored input itself ([`Store::lines`](super::store::Store::lines)), so the
//! blocked copy is built once, in the final order. Every sample goes through the same
//! arithmetic in either order, so the losses do not depend on the layout;
//! [`Store::settle`](super::store::Store::settle) returns to sample order for every other
//! reader of the logits.

use super::dense_rows::{constants, lanes, row_constants, row_constants_at, Rows};
use super::pending::pending_sum;
use super::slots::Slots;
use super::store::{Layout, FB};
use crate::executor::Executor;
use crate::incremental::util::{
    changes, combine, for_chunks, grown, parallel, push_ce, with_scratch, with_scratch64, LogProd,
};
use crate::incremental::{dense_shape, dense_target, Incremental, Visit, MAX_CLASSES};
use crate::simd::prefetch;

/// Samples per chunk of a candidate evaluation (fixed: results do not depend on threads).
const CHUNK: usize = 256;

/// Batches at least this large split their candidate evaluation over threads. A visit of 1024
/// samples takes tens of microseconds; splitting it measured slower than not (waking the
/// second thread costs about as much), so in practice visits stay on one thread.
const PAR_BATCH: usize = 1 << 20;

/// Consecutive weight visits of one row, with no other row changed between them, after which
/// its [`Rows`] are computed for every sample. RSO visits a row's weights one after the other,
/// so it computes them on its fourth visit of each row and keeps them for the rest; in an order
/// that jumps between rows (CFD's shuffled coordinates) they would be stale at the next visit,
/// so each visit computes its batch's constants on the spot instead of the training set's.
const ROWS_AFTER: usize = 4;

/// State of the dense path.
#[derive(Debug, Default)]
pub(crate) struct DenseState {
    rows: Option<Rows>,
    /// The row of the last weight visit that found no current [`Rows`], the row ticks then,
    /// and how many such visits in a row it had.
    streak: (usize, Vec<u64>, usize),
    parts: Vec<[LogProd; 3]>,
    slots: Slots,
}

impl DenseState {
    pub(crate) fn forget_rows(&mut self) {
        self.rows = None;
    }

    /// Forgets the batches seen (when the caches drop, at the start of every round).
    pub(crate) fn forget_slots(&mut self) {
        self.slots = Slots::default();
    }

    /// Keeps sample order until the caches drop (tests compare both orders).
    #[cfg(test)]
    pub(crate) fn disable_layout(&mut self) {
        self.slots.broken = true;
    }
}

/// The three losses for a scalar of the final dense layer (plan index `layer`) of a model
/// without BatchNorm, from the all-samples logits.
pub(crate) fn cached(
    inc: &mut Incremental,
    exec: &mut Executor,
    layer: usize,
    v: Visit,
) -> [f64; 3] {
    let Visit {
        batch,
        param,
        index,
        delta,
        reduction,
    } = v;
    let n = exec.train.len();
    let (k, j) = dense_target(exec, layer, param, index);
    let rows_kept = prepare(inc, exec, layer, batch, k, j);
    let [dp, dm] = changes(exec.params.values[param][index], delta);
    // The block of x_j, and where x_j sits in a sample's line of it.
    let (xb, stride, f) = match j {
        Some(j) => {
            let (lines, stride) = inc.store.lines(j / FB, n);
            (Some(lines), stride, j % FB)
        }
        None => (None, FB, 0),
    };
    let layout = inc.store.layout.as_ref();
    let ctx = DenseVisit {
        z: &inc.store.z.data,
        n,
        k,
        classes: exec.spec.classes,
        // Bias visits compute their row constants on the spot, and so do weight visits of a
        // row whose constants are not kept (with their arithmetic).
        rows: inc.dense.rows.as_ref().filter(|_| rows_kept),
        on_the_spot_as_rows: j.is_some(),
        xb,
        stride,
        f,
        pending: &inc.store.pending,
        labels: &exec.train.labels,
        run: layout.and_then(|_| inc.dense.slots.find(batch)),
        inv: layout.map(|l| &l.inv[..]),
        ds: [0.0, dp, dm],
    };
    let chunks = batch.len().div_ceil(CHUNK);
    let parts = grown(&mut inc.dense.parts, chunks, Default::default());
    let par = batch.len() >= PAR_BATCH && parallel(1 << 20);
    for_chunks(batch.len(), CHUNK, par, parts, |r, acc| {
        *acc = Default::default();
        if !ctx.chunk(r.start, &batch[r.clone()], acc) {
            *acc = Default::default();
            ctx.exact_chunk(r.start, &batch[r], acc);
        }
    });
    let sums = combine(&parts[..chunks]);
    sums.map(|s| reduction.finish(s, batch.len()))
}

/// Makes what a visit of row `k` (input `j`, `None` for the bias) reads current: the store's
/// logits and blocked input, the batches' layout, the pending changes, the row constants.
/// Returns whether the kept [`Rows`] are row `k`'s and current (else the visit computes its
/// batch's on the spot; see [`ROWS_AFTER`]).
fn prepare(
    inc: &mut Incremental,
    exec: &mut Executor,
    layer: usize,
    batch: &[u32],
    k: usize,
    j: Option<usize>,
) -> bool {
    let n = exec.train.len();
    inc.store.ensure(exec, &inc.clock, &[layer], true);
    if j.is_none() {
        // Bias visits (one per row, after the weights) compute their row constants on the
        // spot, in sample order.
        inc.store.settle();
    } else if inc.store.layout.is_none() && inc.dense.slots.register(batch, n) {
        // The weight visits' batches so far partition the training set (preset `seed`: the
        // round's shuffled batches): from now on the logits, the blocked input and the row
        // constants are kept in the order of these batches, so that a visit of one of them
        // reads contiguous ranges instead of gathering its samples.
        let perm = inc.dense.slots.flat.clone();
        let mut inv = vec![0u32; n];
        for (p, &i) in perm.iter().enumerate() {
            inv[i as usize] = p as u32;
        }
        let labels = perm
            .iter()
            .map(|&i| exec.train.labels[i as usize])
            .collect();
        inc.store.set_layout(Layout { perm, inv, labels });
    }
    // The layout forms once every batch has been seen: after about `m·(ln m + 1)` visits for
    // `m` batches drawn with replacement. Expected within the first eighth of the sweep?
    let m = n.div_ceil(batch.len()) as f64;
    let (d_in, d_out, _, _) = dense_shape(exec, layer);
    let layout_soon = 8.0 * m * (m.ln() + 1.0) <= (d_in * d_out) as f64;
    inc.store.ensure_xb(exec, &inc.clock, layer, layout_soon);
    // Pending changes of another row or block are added to the logits first.
    let store = &mut inc.store;
    if store.has_pending
        && j.is_none_or(|j| (store.pending_row, store.pending_block) != (k, j / FB))
    {
        store.flush_pending();
    }
    // Row constants: computed once per row of a weight sweep.
    if j.is_none() {
        return false;
    }
    let others_unchanged = |k0: usize, ticks: &[u64]| {
        k0 == k
            && ticks
                .iter()
                .zip(&inc.store.row_ticks)
                .enumerate()
                .all(|(c, (a, b))| c == k || a == b)
    };
    let fresh = inc
        .dense
        .rows
        .as_ref()
        .is_some_and(|r| others_unchanged(r.k, &r.ticks));
    if fresh {
        return true;
    }
    let (k0, ticks, count) = &inc.dense.streak;
    let count = if others_unchanged(*k0, ticks) {
        count + 1
    } else {
        1
    };
    let streak = &mut inc.dense.streak;
    streak.0 = k;
    streak.1.clone_from(&inc.store.row_ticks);
    streak.2 = count;
    if count < ROWS_AFTER {
        return false;
    }
    let labels = inc
        .store
        .layout
        .as_ref()
        .map_or(&exec.train.labels[..], |l| &l.labels[..]);
    let rows = row_constants(
        &inc.store.z.data,
        labels,
        exec.spec.classes,
        k,
        &inc.store.row_ticks,
        &mut inc.dense.rows,
    );
    inc.dense.rows = Some(rows);
    true
}

/// What every chunk of a dense visit reads.
struct DenseVisit<'a> {
    /// The all-samples logits (class-major, by position).
    z: &'a [f64],
    /// Training samples.
    n: usize,
    /// The visited logit row.
    k: usize,
    classes: usize,
    /// Row `k`'s constants (weight visits); `None`: computed per sample.
    rows: Option<&'a Rows>,
    /// Per-sample constants with the arithmetic of [`Rows`] (weight visits, so that the losses
    /// do not depend on whether the rows were kept), else with `f64::exp` (bias visits).
    on_the_spot_as_rows: bool,
    /// The lines of `x_j`'s block (`None` for a bias), line `p` at `xb[p·stride..][..FB]`, and
    /// `x_j`'s place `f` in a line.
    xb: Option<&'a [f32]>,
    stride: usize,
    f: usize,
    pending: &'a [f64; FB],
    labels: &'a [u8],
    /// Where the batch's samples are: one contiguous run of positions from `run` when the
    /// batch is one of the layout's, else position `inv[i]` (sample `i` without a layout).
    run: Option<usize>,
    inv: Option<&'a [u32]>,
    /// The candidates' changes `[0, Δ₊, Δ₋]`.
    ds: [f64; 3],
}

impl DenseVisit<'_> {
    /// Position of the batch's `t`-th sample `i` (same values either way).
    fn pos(&self, t: usize, i: u32) -> usize {
        match (self.run, self.inv) {
            (Some(p0), _) => p0 + t,
            (None, Some(inv)) => inv[i as usize] as usize,
            (None, None) => i as usize,
        }
    }

    /// Logit `k` (with the pending changes) and `x_j` at position `p`.
    fn logit_and_x(&self, p: usize) -> (f64, f64) {
        let zk = self.z[self.k * self.n + p];
        match self.xb {
            Some(xb) => {
                let line = &xb[p * self.stride..][..FB];
                (
                    zk + pending_sum(self.pending, line),
                    f64::from(line[self.f]),
                )
            }
            None => (zk, 1.0),
        }
    }

    /// Adds the chunk's cross-entropies (samples `idx`, the batch's from `t0`) to `acc`
    /// through the row constants and the vectorised exponential; false when a value is out
    /// of its range (the caller then takes [`DenseVisit::exact_chunk`]).
    fn chunk(&self, t0: usize, idx: &[u32], acc: &mut [LogProd; 3]) -> bool {
        let len = idx.len();
        with_scratch64(6 * len, |buf| {
            let (zk, buf) = buf.split_at_mut(len);
            let (x, buf) = buf.split_at_mut(len);
            let (m, buf) = buf.split_at_mut(len);
            let (s, buf) = buf.split_at_mut(len);
            let (zl, isk) = buf.split_at_mut(len);
            self.gather(t0, idx, [zk, m, s, zl, isk]);
            self.add_lines(t0, idx, zk, x);
            let mut ok = true;
            for (a, &d) in acc.iter_mut().zip(&self.ds) {
                ok &= lanes(zk, x, m, s, zl, isk, d, a);
            }
            ok
        })
    }

    /// Logit `k` and the row constants `[m, s, z_label, label == k]` of the chunk's samples.
    fn gather(&self, t0: usize, idx: &[u32], [zk, m, s, zl, isk]: [&mut [f64]; 5]) {
        let (z, n, k) = (self.z, self.n, self.k);
        if let (Some(p0), Some(rows)) = (self.run, self.rows) {
            // Contiguous: plain copies.
            let p0 = p0 + t0;
            for (t, c) in rows.c[p0..p0 + idx.len()].iter().enumerate() {
                [m[t], s[t], zl[t], isk[t]] = *c;
            }
            zk.copy_from_slice(&z[k * n + p0..][..idx.len()]);
            return;
        }
        // Gather first (loads only, a few samples ahead prefetched, so that many cache
        // misses are in flight at once), then compute.
        const AHEAD: usize = 16;
        for (t, &i) in idx.iter().enumerate() {
            if let Some(&a) = idx.get(t + AHEAD) {
                let a = self.pos(t0 + t + AHEAD, a);
                if let Some(rows) = self.rows {
                    prefetch(&rows.c[a]);
                }
                prefetch(&z[k * n + a]);
                if let Some(xb) = self.xb {
                    prefetch(&xb[a * self.stride]);
                }
            }
            let p = self.pos(t0 + t, i);
            let label = usize::from(self.labels[i as usize]);
            [m[t], s[t], zl[t], isk[t]] = match self.rows {
                Some(rows) => rows.c[p],
                None if self.on_the_spot_as_rows => {
                    row_constants_at(z, n, self.classes, k, p, label)
                }
                None => constants(z, n, self.classes, k, p, label),
            };
            zk[t] = z[k * n + p];
        }
    }

    /// `zk += pending changes` and `x = x_j` of the chunk's samples (1 for a bias).
    fn add_lines(&self, t0: usize, idx: &[u32], zk: &mut [f64], x: &mut [f64]) {
        let (pending, f, len) = (self.pending, self.f, idx.len());
        match (self.xb, self.run) {
            (Some(xb), Some(p0)) if self.stride == FB => {
                add_lines(pending, f, &xb[(p0 + t0) * FB..][..len * FB], zk, x);
            }
            (Some(xb), _) => with_scratch(len * FB, |lines| {
                for (t, (dst, &i)) in lines.chunks_exact_mut(FB).zip(idx).enumerate() {
                    dst.copy_from_slice(&xb[self.pos(t0 + t, i) * self.stride..][..FB]);
                }
                add_lines(pending, f, lines, zk, x);
            }),
            (None, _) => x.fill(1.0),
        }
    }

    /// [`DenseVisit::chunk`] by the plain per-sample log-sum-exp over all logits: for an
    /// overflowing exponential or non-finite logits.
    fn exact_chunk(&self, t0: usize, idx: &[u32], acc: &mut [LogProd; 3]) {
        let (z, n, k, classes) = (self.z, self.n, self.k, self.classes);
        let mut zrow = [0.0f64; MAX_CLASSES];
        for (t, &i) in idx.iter().enumerate() {
            let p = self.pos(t0 + t, i);
            let label = usize::from(self.labels[i as usize]);
            let (zk, x) = self.logit_and_x(p);
            for (a, &d) in acc.iter_mut().zip(&self.ds) {
                for (c, zc) in zrow[..classes].iter_mut().enumerate() {
                    *zc = z[c * n + p];
                }
                zrow[k] = zk + d * x;
                push_ce(a, &zrow[..classes], label);
            }
        }
    }
}

/// `zk[t] += pending_sum(line t)` and `x[t] = line t[f]` for consecutive lines of 16 f32.
fn add_lines(pending: &[f64; FB], f: usize, lines: &[f32], zk: &mut [f64], x: &mut [f64]) {
    super::pending::add_pending(pending, lines, FB, zk, Some((x, f)));
}

/// Keeps the all-samples logits current after scalar `index` of array `param` (of the dense
/// layer at plan index `layer`) changed from `old` to `new`: a weight `(k, j)` joins the
/// pending changes (added to row `k` of all N samples when RSO leaves its block of features),
/// a bias moves row `k` by `new − old` at once. The caller checked that the logits and the
/// blocked input are valid.
pub(crate) fn update(
    inc: &mut Incremental,
    exec: &Executor,
    layer: usize,
    param: usize,
    index: usize,
    old: f32,
    new: f32,
) {
    let n = exec.train.len();
    let (k, j) = dense_target(exec, layer, param, index);
    let d = f64::from(new) - f64::from(old);
    let store = &mut inc.store;
    match j {
        Some(j) => {
            if store.has_pending && (store.pending_row, store.pending_block) != (k, j / FB) {
                store.flush_pending();
            }
            store.pending_row = k;
            store.pending_block = j / FB;
            store.pending[j % FB] += d;
            store.has_pending = true;
        }
        None => {
            store.flush_pending();
            store.z.data[k * n..(k + 1) * n]
                .iter_mut()
                .for_each(|z| *z += d);
        }
    }
    store.z.tick = Some(inc.clock.now());
    store.row_ticks[k] += 1;
}
