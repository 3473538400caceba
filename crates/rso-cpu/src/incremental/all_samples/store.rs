//! Activations of the whole training set, for models without BatchNorm (where every layer is
//! per-sample, so an activation of a sample does not depend on which batch it is in).
//!
//! Each stored array carries the tick of the [change clock](crate::incremental::Clock) at which it was last
//! consistent with the parameters; it is valid while no layer it depends on has changed since.

use crate::executor::{Executor, Mode, Op};
use crate::incremental::Clock;
use rayon::prelude::*;
use rso_models::SplitKind;

/// Samples per forward pass when filling the store.
const CHUNK: usize = 128;

/// An all-samples array and the tick it is consistent with.
#[derive(Debug, Default)]
pub(crate) struct Stamped<T> {
    pub(crate) data: Vec<T>,
    /// `None`: never computed (or dropped).
    pub(crate) tick: Option<u64>,
}

impl<T> Stamped<T> {
    /// Whether the array is consistent with the current parameters of layers `..upto`.
    pub(crate) fn valid(&self, clock: &Clock, upto: usize) -> bool {
        self.tick.is_some_and(|t| clock.unchanged_since(t, 0..upto))
    }
}

/// The all-samples arrays.
#[derive(Debug, Default)]
pub(crate) struct Store {
    /// `acts[a]`: activation `a` (output of layer `a − 1`) of every training sample,
    /// sample-major. `acts[0]` is never stored (the images are resident).
    pub(crate) acts: Vec<Stamped<f32>>,
    /// Logits of every sample, class-major (`z[class·N + sample]`, by position while a
    /// [`Layout`] is set), f64. Kept up to date by dense-layer changes ([`super::dense`]).
    pub(crate) z: Stamped<f64>,
    /// Change counter of each logit row (class): ticks whenever the row changes (a counter per
    /// row, apart from the parameters' `Clock`).
    pub(crate) row_ticks: Vec<u64>,
    /// The input of the final dense layer in blocks of [`FB`] features:
    /// `xb[(block·N + sample)·FB + feature % FB]`, so that one cache line holds a sample's
    /// features of a block (zero-padded past the last feature). By position while a
    /// [`Layout`] is set; not built while [`Store::xb_direct`] is.
    pub(crate) xb: Stamped<f32>,
    /// Accepted changes of the dense weights of row `pending_row`, block `pending_block`, not
    /// yet added to `z` (see [`super::dense`]): `pending[f]` is the summed change of feature
    /// `block·FB + f`, and the logits are `z + Σ_f pending[f]·x_f` while `has_pending`.
    pub(crate) pending: [f64; FB],
    pub(crate) has_pending: bool,
    pub(crate) pending_row: usize,
    pub(crate) pending_block: usize,
    /// While set, `z`, `xb` (and the dense path's row constants) are indexed by *position* in
    /// this order of the samples instead of by sample (see [`super::dense`]); [`Store::settle`]
    /// goes back to sample order.
    pub(crate) layout: Option<Layout>,
    /// When set, `xb` is not built: the lines of block `b` are read from the stored input of
    /// the dense layer (activation `xb_direct`, whose row length is a multiple of [`FB`]) at
    /// `acts[sample·d + b·FB..]`. Only in sample order (a layout always builds `xb`).
    pub(crate) xb_direct: Option<usize>,
}

/// An order of the training samples: the concatenation of the recurring batches of a dense
/// sweep, so that each of them is one contiguous range of positions.
#[derive(Debug)]
pub(crate) struct Layout {
    /// Sample at each position.
    pub(crate) perm: Vec<u32>,
    /// Position of each sample.
    pub(crate) inv: Vec<u32>,
    /// Label of the sample at each position.
    pub(crate) labels: Vec<u8>,
}

/// Features per block of [`Store::xb`] (a 64-byte cache line of f32).
pub(crate) const FB: usize = 16;

impl Store {
    /// Makes `acts[a]` valid for every `a` in `want` (`0 < a < plan.len()`), and the logits when
    /// `logits`, by chunked forward passes from the highest valid stored activation below the
    /// first invalid one (or from the images).
    pub(crate) fn ensure(
        &mut self,
        exec: &mut Executor,
        clock: &Clock,
        want: &[usize],
        logits: bool,
    ) {
        let layers = exec.plan.len();
        if self.acts.len() < layers {
            self.acts.resize_with(layers, Stamped::default);
        }
        let logits = logits && !self.z.valid(clock, layers);
        let Some((start, end, keep)) = self.refresh_range(exec, clock, want, logits) else {
            return;
        };
        self.forward_into(exec, start, end, &keep, logits);
        for &a in &keep {
            self.acts[a].tick = Some(clock.now());
        }
        if logits {
            // Computed from the current weights, in sample order: nothing is pending any more.
            if self.layout.take().is_some() {
                self.xb.tick = None;
            }
            self.z.tick = Some(clock.now());
            self.bump_all_rows(exec.spec.classes);
            self.pending = [0.0; FB];
            self.has_pending = false;
        }
    }

    /// What [`Store::ensure`] recomputes: `None` when everything is valid, else the stored
    /// activation the forward passes start from (0: the images), the last activation they
    /// reach, and the activations in between to keep.
    fn refresh_range(
        &self,
        exec: &Executor,
        clock: &Clock,
        want: &[usize],
        logits: bool,
    ) -> Option<(usize, usize, Vec<usize>)> {
        let layers = exec.plan.len();
        let invalid: Vec<usize> = want
            .iter()
            .copied()
            .filter(|&a| !self.acts[a].valid(clock, a))
            .collect();
        if invalid.is_empty() && !logits {
            return None;
        }
        let first = invalid.iter().copied().min().unwrap_or(layers);
        let start = (1..first)
            .rev()
            .find(|&a| self.acts[a].valid(clock, a))
            .unwrap_or(0);
        let end = if logits {
            layers
        } else {
            invalid.iter().copied().max().unwrap_or(start)
        };
        // Also refresh wanted arrays that were valid but lie inside the recomputed range (cheap,
        // and keeps the bookkeeping simple), and keep the arrays later sweeps of the round will
        // want, while they are computed anyway.
        let mut keep: Vec<usize> = want
            .iter()
            .copied()
            .filter(|&a| a > start && a <= end)
            .collect();
        for a in useful(exec) {
            if a > start && a <= end && !keep.contains(&a) {
                keep.push(a);
            }
        }
        Some((start, end, keep))
    }

    /// Runs the training set from activation `start` to `end` in chunks, copying activations
    /// `keep` (and the logits when `logits`) into the store.
    fn forward_into(
        &mut self,
        exec: &mut Executor,
        start: usize,
        end: usize,
        keep: &[usize],
        logits: bool,
    ) {
        let n = exec.train.len();
        let classes = exec.spec.classes;
        for &a in keep {
            let len = n * act_len(exec, a);
            let s = &mut self.acts[a];
            if s.data.len() != len {
                s.data = vec![0.0; len];
            }
        }
        if logits && self.z.data.len() != n * classes {
            self.z.data = vec![0.0; n * classes];
        }
        let mut cuts: Vec<usize> = keep.iter().copied().filter(|&a| a < end).collect();
        cuts.push(end);
        cuts.sort_unstable();
        cuts.dedup();
        let src_len = act_len(exec, start);
        for c0 in (0..n).step_by(CHUNK) {
            let m = CHUNK.min(n - c0);
            exec.reserve(m);
            if start == 0 {
                exec.load_range(SplitKind::Train, c0..c0 + m);
            } else {
                exec.ws.gathered = None;
                exec.ws.acts[start][..m * src_len]
                    .copy_from_slice(&self.acts[start].data[c0 * src_len..(c0 + m) * src_len]);
            }
            // Segment by segment, ending at each array to keep: the layers inside a segment
            // run in cache-sized pieces instead of writing every activation of the chunk.
            let mut from = start;
            for &to in &cuts {
                exec.forward_segment(from..to, m, Mode::Train, false);
                from = to;
            }
            self.copy_chunk(exec, c0, m, keep, logits);
        }
    }

    /// Copies activations `keep` (and the logits) of the `m` samples from `c0` out of the
    /// executor's buffers into the store.
    fn copy_chunk(&mut self, exec: &Executor, c0: usize, m: usize, keep: &[usize], logits: bool) {
        for &a in keep {
            let len = act_len(exec, a);
            let dst = &mut self.acts[a].data[c0 * len..(c0 + m) * len];
            let src = &exec.ws.acts[a][..m * len];
            // Over the threads when large: the first round's copies also fault the stored
            // arrays' pages in.
            const PIECE: usize = 1 << 16;
            if rayon::current_num_threads() > 1 && dst.len() >= 2 * PIECE {
                dst.par_chunks_mut(PIECE)
                    .zip(src.par_chunks(PIECE))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            } else {
                dst.copy_from_slice(src);
            }
        }
        if logits {
            let (n, classes) = (exec.train.len(), exec.spec.classes);
            let out = &exec.ws.acts[exec.plan.len()][..m * classes];
            for (i, row) in out.chunks_exact(classes).enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    self.z.data[k * n + c0 + i] = f64::from(v);
                }
            }
        }
    }

    /// Marks every logit row as changed.
    pub(crate) fn bump_all_rows(&mut self, classes: usize) {
        if self.row_ticks.len() != classes {
            self.row_ticks = vec![0; classes];
        }
        for g in &mut self.row_ticks {
            *g += 1;
        }
    }

    /// Makes `xb` (the blocked input of the dense layer at plan index `dense`) valid, from a
    /// valid `acts[dense]`.
    ///
    /// `layout_soon`: whether a [`Layout`] is expected early in the sweep; until then the lines
    /// are read from the stored input in place ([`Store::xb_direct`]) rather than building `xb`
    /// twice. (Read in place, a line usually straddles two cache lines, so a whole sweep that
    /// way would cost more than building `xb`.)
    pub(crate) fn ensure_xb(
        &mut self,
        exec: &mut Executor,
        clock: &Clock,
        dense: usize,
        layout_soon: bool,
    ) {
        if self.xb.valid(clock, dense) {
            return;
        }
        self.ensure(exec, clock, &[dense], false);
        let n = exec.train.len();
        let d = act_len(exec, dense);
        self.xb_direct = None;
        if self.layout.is_none() && layout_soon && d.is_multiple_of(FB) {
            self.xb_direct = Some(dense);
            self.xb.tick = Some(clock.now());
            return;
        }
        let blocks = d.div_ceil(FB);
        if self.xb.data.len() != blocks * n * FB {
            self.xb.data = vec![0.0; blocks * n * FB];
        }
        let src = &self.acts[dense].data;
        let perm = self.layout.as_ref().map(|l| &l.perm[..]);
        // By chunks of positions, each sample's row read once (in the layout's order that is a
        // random order of rows: whole rows keep the reads streaming) and cut into its lines.
        const PC: usize = 512;
        let mut parts: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(PC))
            .map(|_| Vec::with_capacity(blocks))
            .collect();
        for block in self.xb.data.chunks_mut(n * FB) {
            for (part, piece) in parts.iter_mut().zip(block.chunks_mut(PC * FB)) {
                part.push(piece);
            }
        }
        let task = |(c, mut lines): (usize, Vec<&mut [f32]>)| {
            for t in 0..lines[0].len() / FB {
                let p = c * PC + t;
                let i = perm.map_or(p, |perm| perm[p] as usize);
                let row = &src[i * d..][..d];
                for (b, block) in lines.iter_mut().enumerate() {
                    let f0 = b * FB;
                    let line: &mut [f32; FB] =
                        (&mut block[t * FB..][..FB]).try_into().expect("FB values");
                    if f0 + FB <= d {
                        // A fixed-size copy (inlined, not a `memmove` call per line).
                        *line = row[f0..f0 + FB].try_into().expect("FB values");
                    } else {
                        let fl = d - f0;
                        line[..fl].copy_from_slice(&row[f0..]);
                        line[fl..].fill(0.0);
                    }
                }
            }
        };
        if rayon::current_num_threads() > 1 && n * d >= 1 << 16 {
            parts.into_par_iter().enumerate().for_each(task);
        } else {
            parts.into_iter().enumerate().for_each(task);
        }
        self.xb.tick = Some(clock.now());
    }

    /// Puts the logits in `layout`'s order of the samples (from sample order); the blocked
    /// input must be rebuilt in that order ([`Store::ensure_xb`]) before anything reads the
    /// lines. Pending changes stay pending (they are per feature, not per sample), so that the
    /// logits get the same additions as without a layout.
    pub(crate) fn set_layout(&mut self, layout: Layout) {
        let n = layout.perm.len();
        let z = &self.z.data;
        let mut zp = vec![0.0; z.len()];
        for (dst, src) in zp.chunks_exact_mut(n).zip(z.chunks_exact(n)) {
            for (d, &i) in dst.iter_mut().zip(&layout.perm) {
                *d = src[i as usize];
            }
        }
        self.z.data = zp;
        self.layout = Some(layout);
        self.xb.tick = None;
        self.xb_direct = None;
        self.bump_all_rows(self.row_ticks.len());
    }

    /// Adds the pending dense-weight changes to the logits and puts them back in sample order:
    /// what every reader of the logits other than the dense path expects.
    pub(crate) fn settle(&mut self) {
        self.flush_pending();
        if let Some(layout) = self.layout.take() {
            let n = layout.perm.len();
            let z = &self.z.data;
            let mut zs = vec![0.0; z.len()];
            for (dst, src) in zs.chunks_exact_mut(n).zip(z.chunks_exact(n)) {
                for (&v, &i) in src.iter().zip(&layout.perm) {
                    dst[i as usize] = v;
                }
            }
            self.z.data = zs;
            self.xb.tick = None;
            self.bump_all_rows(self.row_ticks.len());
        }
    }

    /// Adds the pending dense-weight changes to the logits (see [`Store::pending`]).
    pub(crate) fn flush_pending(&mut self) {
        if !self.has_pending {
            return;
        }
        let n = self.z.data.len() / self.row_ticks.len().max(1);
        let (k, block) = (self.pending_row, self.pending_block);
        let (lines, stride) = lines(self.xb_direct, &self.acts, &self.xb.data, block, n);
        let row = &mut self.z.data[k * n..(k + 1) * n];
        let pending = &self.pending;
        const C: usize = 8192;
        let task = |(c, row): (usize, &mut [f64])| {
            super::pending::add_pending(pending, &lines[c * C * stride..], stride, row, None)
        };
        if rayon::current_num_threads() > 1 && n >= 2 * C {
            row.par_chunks_mut(C).enumerate().for_each(task);
        } else {
            row.chunks_mut(C).enumerate().for_each(task);
        }
        self.pending = [0.0; FB];
        self.has_pending = false;
    }

    /// The lines of block `block` of the dense layer's input (`n` samples): line `p` is
    /// `lines[p·stride..][..FB]` (see [`Store::xb_direct`]).
    pub(crate) fn lines(&self, block: usize, n: usize) -> (&[f32], usize) {
        lines(self.xb_direct, &self.acts, &self.xb.data, block, n)
    }

    /// Adds `dz[sample·classes + class]` (sample-major) to the class-major logits.
    pub(crate) fn add_logits(&mut self, dz: &[f64], classes: usize) {
        let n = self.z.data.len() / classes.max(1);
        for (k, row) in self.z.data.chunks_exact_mut(n.max(1)).enumerate() {
            for (i, z) in row.iter_mut().enumerate() {
                *z += dz[i * classes + k];
            }
        }
        for g in &mut self.row_ticks {
            *g += 1;
        }
    }
}

/// [`Store::lines`] from the store's fields.
fn lines<'a>(
    direct: Option<usize>,
    acts: &'a [Stamped<f32>],
    xb: &'a [f32],
    block: usize,
    n: usize,
) -> (&'a [f32], usize) {
    match direct {
        Some(a) => {
            let x = &acts[a].data;
            (&x[block * FB..], x.len() / n.max(1))
        }
        None => (&xb[block * n * FB..(block + 1) * n * FB], FB),
    }
}

/// Bytes of all-samples activations [`useful`] may keep.
const KEEP_BUDGET: usize = 2 << 30;

/// Activations that the sweeps of a model without BatchNorm read, smallest first within
/// [`KEEP_BUDGET`]: the input of every convolution but the first and of the final dense layer,
/// and the output of every convolution but the first (the next layer's input of the one before).
fn useful(exec: &Executor) -> Vec<usize> {
    let n = exec.train.len();
    let mut out: Vec<usize> = Vec::new();
    for (i, step) in exec.plan.iter().enumerate() {
        match step.op {
            Op::Conv { .. } if i > 0 => out.extend([i, i + 1]),
            Op::Dense { .. } if i > 0 && i + 1 == exec.plan.len() => out.push(i),
            _ => {}
        }
    }
    out.sort_unstable();
    out.dedup();
    out.sort_by_key(|&a| act_len(exec, a));
    let mut bytes = 0usize;
    out.retain(|&a| {
        bytes = bytes.saturating_add(4 * n * act_len(exec, a));
        bytes <= KEEP_BUDGET
    });
    out
}

/// Values per sample of activation `a` of `exec`'s plan.
pub(crate) fn act_len(exec: &Executor, a: usize) -> usize {
    if a == 0 {
        exec.plan[0].in_len
    } else {
        exec.plan[a - 1].out_len
    }
}
