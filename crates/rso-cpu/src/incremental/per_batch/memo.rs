//! The per-batch memo of the BatchNorm models' paths: activations around the visited layer,
//! kept per recurring batch (see [`ActivationMemo`]).

use super::conv::{chain, input_channel, moved_by_channel, next_after};
use super::CHUNK;
use crate::executor::{view, view_mut, Executor, Mode, Op};
use crate::incremental::util::{conv_forward, grown, parallel};
use crate::incremental::{Clock, Next};
use crate::kernels::conv::Conv3x3;
use crate::kernels::pool::{avgpool2_forward, maxpool2_forward};
use rayon::prelude::*;
use rso_models::Reduction;
use std::collections::HashMap;

/// Bytes each array of a [`ActivationMemo`] may hold.
const MEMO_BUDGET: usize = 1 << 30;

/// Channel updates a kept next-convolution output takes before it is recomputed whole.
pub(crate) const REFRESH: usize = 16;

/// What an [`ActivationMemo`] keeps per sample, in values (0: not kept).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Shape {
    /// The visited layer's input.
    in_len: usize,
    /// The activation index of the kept convolution output (after its pooling), and its length.
    out_act: usize,
    out_len: usize,
    /// The convolution's weights and biases (one copy per entry).
    w_len: usize,
    /// The plan index of the next convolution, and its output's length.
    next: usize,
    next_len: usize,
    /// The plan index of the convolution before the visited one, and its input's length: kept
    /// for the sweep of that layer, which comes next in RSO's order (last layer first).
    prev: usize,
    prev_len: usize,
}

/// Per-batch copies of activations around the visited layer, for batches that recur: preset
/// `seed` cuts each round's shuffled training set into ⌈N/B⌉ batches and draws one per visit,
/// so during a sweep every batch comes back many times.
/// - The visited layer's *input*: the layers before it do not change during its sweep, so
///   they run once per batch instead of once per visit. A hit copies the input into place and
///   the forward pass starts there (the same arithmetic on the same values).
/// - A convolution's *output* (after the pooling that follows it, if any), with the weights it
///   was computed with: on a hit only the channels whose weights changed since (channel `k`,
///   the one being swept) are recomputed, and the pass starts after the convolution.
/// - Or, in place of the output, when only channel-local layers lie between the visited
///   convolution and the next one: the *next* convolution's output (as the libtorch engine
///   keeps it), with the weights it was computed with. On a hit each changed channel `c` moves
///   it by `W_next[:, c] ⊛ (x_c − x_c')`, the change of that channel's input to the next
///   convolution (both planes recomputed from the kept input, with the entry's and the current
///   weights), so the pass starts after the next convolution. After [`REFRESH`] such updates
///   an entry is recomputed whole, which bounds the rounding they add up.
/// - The *previous* convolution's input, recorded when a batch is first seen: RSO sweeps the
///   layers last to first, and the layers before that convolution do not change during this
///   sweep, so the next sweep starts with its inputs in place (see [`ActivationMemo::reset`]).
/// - BatchNorm scalars visited right after their convolution use the same inputs.
///
/// Which of these are kept is decided per sweep by `kept_shape`: an array is kept only when
/// the whole training set's rows fit [`MEMO_BUDGET`] (so the 16×28×28 activations of the first
/// two convolutions never are), the input only when the layers before the visited one are at
/// least a quarter of the forward pass, and the next convolution's output in place of the
/// visited one's whenever it fits. Arrays a sweep does not use are given back (at most three
/// are in use at once: ≈ 1.7 GB for the paper model on MNIST). Batches that do not recur
/// (preset `paper`'s windows when B does not divide N) stop the memo from storing after
/// 2·⌈N/B⌉ entries without a hit. Indices: `act`, `out_act` are activation indices (the input
/// of plan layer `i` is activation `i`), `next`, `prev` plan indices of convolutions.
#[derive(Debug, Default)]
pub(crate) struct ActivationMemo {
    /// The visited layer, and the clock tick the entries were made at (valid while no layer
    /// before it changed since; its own changes are tracked per entry).
    act: usize,
    tick: u64,
    active: bool,
    /// What is kept.
    shape: Shape,
    /// Entry by hash of the batch's indices; the entries' indices, one after the other.
    index: HashMap<u64, usize>,
    entries: Vec<Entry>,
    batches: Vec<u32>,
    /// Channels to recompute on a hit (reused buffer).
    chans: Vec<usize>,
    input: Vec<f32>,
    output: Vec<f32>,
    weights: Vec<f32>,
    next_out: Vec<f32>,
    prev_input: Vec<f32>,
    hits: usize,
    /// Scratch of the channel recomputation: the versions to compute, their planes
    /// `[n][m][h·w]` and weight rows, one version's planes as it is pooled.
    versions: Vec<Version>,
    tmp: Vec<f32>,
    rows: Vec<f32>,
    planes: Vec<f32>,
    /// Scratch of the next convolution's updates: channels whose weights changed, chain planes
    /// (two buffers, moments), their values before the change `[changed][n][h·w]`, input-channel
    /// weights.
    changed: Vec<usize>,
    a: Vec<f32>,
    b: Vec<f32>,
    moments: Vec<(f64, f64)>,
    old: Vec<f32>,
    w_k: Vec<f32>,
}

/// One memoised batch: where its indices are in `ActivationMemo::batches`, and the offsets of its
/// rows (in values).
#[derive(Debug, Default)]
struct Entry {
    batch: std::ops::Range<usize>,
    input: Option<usize>,
    /// Offsets of its output rows and of its copy of the weights.
    output: Option<usize>,
    weights: Option<usize>,
    /// Offset of its next-convolution output rows, and the channel updates they took since
    /// they were last computed whole.
    next: Option<(usize, usize)>,
    /// Offset of its rows of the previous convolution's input.
    prev: Option<usize>,
}

/// The visited convolution, for [`forward`]'s output memo.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Visited {
    pub(crate) conv: Conv3x3,
    pub(crate) weight: usize,
    pub(crate) bias: Option<usize>,
    /// The channel being swept (its full-resolution output is always recomputed: the
    /// candidates start from it).
    pub(crate) k: usize,
}

/// Runs layers `..end` on the `n` loaded samples, leaving `acts[end]` and the inputs of the
/// BatchNorm layers before it (which use the batch's statistics); the other activations in
/// between are not written (a visit reads none of them, and at the 28×28 planes their memory
/// traffic is most of the prefix's time).
fn forward_prefix(exec: &mut Executor, n: usize, end: usize) {
    let is_bn = |op: &Op| matches!(op, Op::BatchNorm { .. });
    let mut a = 0;
    while a < end {
        if is_bn(&exec.plan[a].op) {
            exec.batch_statistics(a, n);
        }
        let b = (a + 1..end)
            .find(|&i| is_bn(&exec.plan[i].op))
            .unwrap_or(end);
        exec.forward_segment(a..b, n, Mode::Train, false);
        a = b;
    }
}

/// A hash of a batch's indices (a lookup key; entries compare the whole batch).
fn batch_hash(batch: &[u32]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(batch)
}

/// Loads `batch` and runs the forward pass; returns the loss at W. A pass from the first layer
/// keeps every activation; a pass from what the memo kept writes the visited layer's input and
/// output, the next convolution's output and the logits, and of the layers in between and after
/// only the segment ends (the inputs of BatchNorm layers).
/// `act` is the visited layer (for a convolution, `visited` describes it): the [`ActivationMemo`]
/// supplies its input and, for a convolution, its output when the batch was seen since the
/// layers before it last changed. Worth it only where those layers are a sizeable part of the
/// pass (the input) or the output fits the budget.
pub(crate) fn forward(
    memo: &mut ActivationMemo,
    clock: &Clock,
    exec: &mut Executor,
    batch: &[u32],
    reduction: Reduction,
    act: usize,
    visited: Option<Visited>,
) -> f64 {
    let n = batch.len();
    exec.load_batch(batch);
    let shape = kept_shape(exec, act, visited);
    if shape == Shape::default() {
        exec.forward_from(0, n, Mode::Train, true);
        return reduction.finish(exec.loss_sum(n), n);
    }
    // The kept next-convolution outputs also depend on the layers up to it (BatchNorm's γ, β).
    let after = if shape.next > 0 {
        act + 1..shape.next + 1
    } else {
        0..0
    };
    let same = memo.active
        && memo.act == act
        && memo.shape == shape
        && clock.unchanged_since(memo.tick, 0..act)
        && clock.unchanged_since(memo.tick, after);
    if !same {
        memo.reset(act, clock, shape, exec.train.len(), n);
    }
    let h = batch_hash(batch);
    let hit = memo
        .index
        .get(&h)
        .copied()
        .filter(|&e| memo.batches[memo.entries[e].batch.clone()] == batch[..]);
    match hit {
        Some(e) => memo.replay(exec, e, n, visited),
        None => {
            exec.forward_from(0, n, Mode::Train, true);
            memo.record(exec, batch, h, visited);
        }
    }
    reduction.finish(exec.loss_sum(n), n)
}

/// What the memo keeps for visited layer `act` (see [`ActivationMemo`]).
fn kept_shape(exec: &Executor, act: usize, visited: Option<Visited>) -> Shape {
    let n_train = exec.train.len();
    let prefix: usize = exec.plan[..act].iter().map(|s| s.work).sum();
    let total: usize = exec.plan.iter().map(|s| s.work).sum();
    let fits = |len: usize| n_train * len * 4 <= MEMO_BUDGET;
    let in_len = if act > 0 && 4 * prefix >= total && fits(exec.plan[act - 1].out_len) {
        exec.plan[act - 1].out_len
    } else {
        0
    };
    let prev = (1..act)
        .rev()
        .find(|&p| matches!(exec.plan[p].op, Op::Conv { .. }))
        .filter(|&p| {
            let prefix: usize = exec.plan[..p].iter().map(|s| s.work).sum();
            4 * prefix >= total && fits(exec.plan[p - 1].out_len)
        });
    let (prev, prev_len) = prev.map_or((0, 0), |p| (p, exec.plan[p - 1].out_len));
    let only_input = Shape {
        in_len,
        prev,
        prev_len,
        ..Shape::default()
    };
    let Some(v) = visited else {
        return only_input;
    };
    // The output kept: after the convolution and the pooling right after it.
    let mut o = act + 1;
    while matches!(exec.plan[o].op, Op::AvgPool { .. } | Op::MaxPool { .. }) {
        o += 1;
    }
    let len = exec.plan[o - 1].out_len;
    let w_len =
        exec.params.values[v.weight].len() + v.bias.map_or(0, |b| exec.params.values[b].len());
    let (next, next_len) = match next_after(exec, o) {
        Some(Next::Conv { layer, conv, .. }) if fits(conv.out_len()) => (layer, conv.out_len()),
        _ if !fits(len) => return only_input,
        _ => (0, 0),
    };
    Shape {
        in_len,
        out_act: o,
        out_len: if next > 0 { 0 } else { len },
        w_len,
        next,
        next_len,
        prev,
        prev_len,
    }
}

impl ActivationMemo {
    /// Starts afresh for layer `act` at the clock's tick, keeping the buffers, with room for
    /// every batch (of `n` samples) of a partition of `n_train` samples twice (so that visits
    /// allocate nothing once the memo is set up). When the memo was recording the inputs of
    /// `act` for the sweep before (its previous convolution) and nothing before `act` changed
    /// since, those become the entries' inputs.
    fn reset(&mut self, act: usize, clock: &Clock, shape: Shape, n_train: usize, n: usize) {
        let unchanged = self.active && clock.unchanged_since(self.tick, 0..act);
        let adopt = unchanged
            && self.shape.prev == act
            && self.shape.prev_len == shape.in_len
            && shape.in_len > 0;
        // The same layer after a change behind it (a BatchNorm scalar): the inputs still hold.
        let same_inputs = unchanged && self.act == act && self.shape.in_len == shape.in_len;
        let same_prev =
            same_inputs && (self.shape.prev, self.shape.prev_len) == (shape.prev, shape.prev_len);
        let slots = 2 * n_train.div_ceil(n);
        self.act = act;
        self.tick = clock.now();
        self.active = true;
        self.shape = shape;
        let (in_len, out_len, w_len) = (shape.in_len, shape.out_len, shape.w_len);
        if adopt || same_inputs {
            if adopt {
                std::mem::swap(&mut self.input, &mut self.prev_input);
            }
            for e in &mut self.entries {
                *e = Entry {
                    batch: e.batch.clone(),
                    input: if adopt { e.prev } else { e.input },
                    prev: e.prev.filter(|_| same_prev),
                    ..Entry::default()
                };
            }
        } else {
            self.index.clear();
            self.entries.clear();
            self.batches.clear();
            self.input.clear();
        }
        self.index.reserve(slots);
        self.entries.reserve(slots);
        self.batches.reserve(2 * n_train + n);
        room(&mut self.input, (n_train + n) * in_len);
        if !same_prev {
            self.prev_input.clear();
        }
        room(&mut self.prev_input, (n_train + n) * shape.prev_len);
        self.output.clear();
        room(&mut self.output, (n_train + n) * out_len);
        self.weights.clear();
        room(&mut self.weights, slots * w_len);
        self.next_out.clear();
        room(&mut self.next_out, (n_train + n) * shape.next_len);
        self.chans.reserve(64);
        self.hits = 0;
    }

    /// The forward pass of the loaded batch of entry `e` from what the entry keeps: its input
    /// to the visited layer, then either its next convolution's output moved by the changes
    /// of the channels whose weights changed since, or its convolution output with those
    /// channels (and channel `k`) recomputed; the entry is brought up to date.
    fn replay(&mut self, exec: &mut Executor, e: usize, n: usize, visited: Option<Visited>) {
        self.hits += 1;
        let (act, sh) = (self.act, self.shape);
        let Entry {
            input,
            output,
            weights,
            next,
            ..
        } = self.entries[e];
        match input {
            Some(off) => exec.ws.acts[act][..n * sh.in_len]
                .copy_from_slice(&self.input[off..off + n * sh.in_len]),
            None => forward_prefix(exec, n, act),
        }
        let (Some(w_off), Some(v)) = (weights, visited) else {
            exec.forward_from(act, n, Mode::Train, true);
            // An entry adopted from the sweep before gets the rest now.
            self.fill(exec, e, n, visited, false);
            return;
        };
        let mut changed = std::mem::take(&mut self.changed);
        self.changed_channels(exec, v, w_off, &mut changed);
        let mut chans = std::mem::take(&mut self.chans);
        chans.clone_from(&changed);
        if !chans.contains(&v.k) {
            chans.push(v.k);
        }
        let p_len = n * sh.next_len;
        match (next, output) {
            (Some((p_off, updates)), _) if updates + changed.len() <= REFRESH => {
                self.recompute_channels(exec, v, Some(w_off), &changed, &chans, n);
                self.move_next_output(exec, &changed, n, p_off);
                self.entries[e].next = Some((p_off, updates + changed.len()));
                // The candidates read nothing after the next convolution's output but the
                // logits, so the layers after it keep only their segments' ends.
                exec.forward_from(sh.next + 1, n, Mode::Train, false);
            }
            (Some((p_off, _)), _) => {
                exec.forward_from(act, n, Mode::Train, true);
                self.next_out[p_off..p_off + p_len]
                    .copy_from_slice(&exec.ws.acts[sh.next + 1][..p_len]);
                self.entries[e].next = Some((p_off, 0));
            }
            (None, Some(off)) => {
                let (out_act, out_len) = (sh.out_act, sh.out_len);
                let kept = &mut self.output[off..off + n * out_len];
                exec.ws.acts[out_act][..n * out_len].copy_from_slice(kept);
                self.recompute_channels(exec, v, None, &[], &chans, n);
                exec.forward_from(out_act, n, Mode::Train, true);
                // Keep the entry current, so that the next hit recomputes only what changed.
                self.output[off..off + n * out_len]
                    .copy_from_slice(&exec.ws.acts[out_act][..n * out_len]);
            }
            (None, None) => exec.forward_from(act, n, Mode::Train, true),
        }
        copy_weights(exec, v, &mut self.weights[w_off..w_off + sh.w_len]);
        self.chans = chans;
        self.changed = changed;
    }

    /// Recomputes channels `changed` with the weights the entry kept at `w_off` and channels
    /// `chans` with the current ones, [`VERSION_GROUP`] at a time in one pass over the visited
    /// layer's input; the former through the chain to the next convolution's input into
    /// `self.old` (`[c][n][h·w]`), the latter into place in `acts` (the output and its pooled
    /// copies up to `out_act`).
    fn recompute_channels(
        &mut self,
        exec: &mut Executor,
        v: Visited,
        w_off: Option<usize>,
        changed: &[usize],
        chans: &[usize],
        n: usize,
    ) {
        let (act, sh) = (self.act, self.shape);
        let mut versions = std::mem::take(&mut self.versions);
        versions.clear();
        let entry = |c| Version { c, entry: true };
        versions.extend(changed.iter().copied().map(entry));
        versions.extend(chans.iter().map(|&c| Version { c, entry: false }));
        self.old.clear();
        for group in versions.chunks(VERSION_GROUP) {
            let kept = w_off.map_or(&[][..], |o| &self.weights[o..o + sh.w_len]);
            let (tmp, rows) = (&mut self.tmp, &mut self.rows);
            conv_versions(tmp, rows, exec, act, v, group, kept, n);
            for (j, version) in group.iter().enumerate() {
                let (tmp, planes) = (&self.tmp, &mut self.planes);
                let jmc = (j, group.len(), version.c);
                place_version(tmp, planes, exec, act, sh.out_act, v.conv, jmc, n);
                if version.entry {
                    self.chain_of(exec, version.c, n);
                    let len = n * next_plane(exec, sh.next);
                    self.old.extend_from_slice(&self.a[..len]);
                }
            }
        }
        self.versions = versions;
    }

    /// Channel `c`'s planes of `acts[out_act]` through the chain to the next convolution's
    /// input, left in `self.a` (`[n][h·w]` of the next convolution).
    fn chain_of(&mut self, exec: &Executor, c: usize, n: usize) {
        let out_act = self.shape.out_act;
        // Values per sample of `acts[out_act]` (kept or not).
        let out_len = exec.plan[out_act - 1].out_len;
        let plane = out_len / channels_of(exec, out_act);
        let a = grown(
            &mut self.a,
            n * plane.max(next_plane(exec, self.shape.next)),
            0.0,
        );
        let y = &exec.ws.acts[out_act];
        for (t, dst) in a.chunks_exact_mut(plane).take(n).enumerate() {
            dst.copy_from_slice(&y[t * out_len + c * plane..][..plane]);
        }
        let ops = out_act..self.shape.next;
        chain(
            exec,
            ops,
            c,
            n,
            &mut self.a,
            &mut self.b,
            &mut self.moments,
            None,
        );
    }

    /// Moves the entry's next-convolution output (at `p_off` in `next_out`) by the change of
    /// each channel of `changed` between `self.old` and its recomputed planes (in channel
    /// order), leaving the result both there and in `acts[next + 1]`. Each move writes
    /// `base + effect` from one of the two buffers into the other.
    fn move_next_output(&mut self, exec: &mut Executor, changed: &[usize], n: usize, p_off: usize) {
        let Op::Conv { conv, weight, .. } = exec.plan[self.shape.next].op else {
            unreachable!("the kept next layer is a convolution");
        };
        let (hw, p_len) = (conv.h * conv.w, n * conv.out_len());
        let mut in_acts = false;
        for (i, &c) in changed.iter().enumerate() {
            self.chain_of(exec, c, n);
            for (new, &old) in self.a[..n * hw].iter_mut().zip(&self.old[i * n * hw..]) {
                *new -= old;
            }
            input_channel(&exec.params.values[weight], conv, c, &mut self.w_k);
            let kept = &mut self.next_out[p_off..p_off + p_len];
            let acts = &mut exec.ws.acts[self.shape.next + 1][..p_len];
            let (from, to) = if in_acts { (acts, kept) } else { (kept, acts) };
            moved_by_channel(conv, &self.w_k, n, &self.a[..n * hw], from, to);
            in_acts = !in_acts;
        }
        let kept = &mut self.next_out[p_off..p_off + p_len];
        let acts = &mut exec.ws.acts[self.shape.next + 1][..p_len];
        if in_acts {
            kept.copy_from_slice(acts);
        } else {
            acts.copy_from_slice(kept);
        }
    }

    /// Into `chans`: the channels whose weights differ from the entry's copy at `w_off`.
    fn changed_channels(&self, exec: &Executor, v: Visited, w_off: usize, chans: &mut Vec<usize>) {
        let p = &exec.params.values;
        let taps = v.conv.taps();
        let w = &self.weights[w_off..w_off + self.shape.w_len];
        let wl = p[v.weight].len();
        let differs =
            |a: &[f32], b: &[f32]| a.iter().zip(b).any(|(a, b)| a.to_bits() != b.to_bits());
        chans.clear();
        chans.extend((0..v.conv.c_out).filter(|&c| {
            differs(&p[v.weight][c * taps..(c + 1) * taps], &w[c * taps..])
                || v.bias
                    .is_some_and(|b| differs(&p[b][c..c + 1], &w[wl + c..]))
        }));
    }

    /// Stores the loaded batch's activations (just computed) under hash `h`, while within the
    /// room reserved at [`ActivationMemo::reset`] (no reallocation) and unless batches
    /// evidently do not recur.
    fn record(&mut self, exec: &Executor, batch: &[u32], h: u64, visited: Option<Visited>) {
        let n = batch.len();
        let recurs = self.hits > 0 || self.entries.len() < 2 * exec.train.len().div_ceil(n);
        let room = self.batches.len() + n <= self.batches.capacity()
            && self.entries.len() < self.entries.capacity();
        if !recurs || !room || self.index.contains_key(&h) {
            return;
        }
        let e = self.entries.len();
        let start = self.batches.len();
        self.batches.extend_from_slice(batch);
        self.entries.push(Entry {
            batch: start..start + n,
            ..Entry::default()
        });
        self.fill(exec, e, n, visited, true);
        let Entry {
            input,
            weights,
            prev,
            ..
        } = self.entries[e];
        if input.is_some() || weights.is_some() || prev.is_some() {
            self.index.insert(h, e);
        } else {
            self.entries.pop();
            self.batches.truncate(start);
        }
    }

    /// Stores what entry `e` lacks from the activations just computed for its batch, while
    /// within the room reserved at [`ActivationMemo::reset`]: the input, the convolution output
    /// or the next convolution's output with the weights, and — after a pass from the first
    /// layer (`from_start`) — the previous convolution's input.
    fn fill(
        &mut self,
        exec: &Executor,
        e: usize,
        n: usize,
        visited: Option<Visited>,
        from_start: bool,
    ) {
        let (act, sh) = (self.act, self.shape);
        // Appended while within the room reserved at reset (no reallocation): the offset.
        let take = |store: &mut Vec<f32>, src: &[f32]| {
            (store.len() + src.len() <= store.capacity()).then(|| {
                store.extend_from_slice(src);
                store.len() - src.len()
            })
        };
        let acts = &exec.ws.acts;
        let mut entry = std::mem::take(&mut self.entries[e]);
        if entry.input.is_none() && sh.in_len > 0 {
            entry.input = take(&mut self.input, &acts[act][..n * sh.in_len]);
        }
        if let Some(v) = visited.filter(|_| entry.weights.is_none()) {
            if sh.out_len > 0 {
                let src = &acts[sh.out_act][..n * sh.out_len];
                entry.output = take(&mut self.output, src);
            }
            if sh.next > 0 {
                let src = &acts[sh.next + 1][..n * sh.next_len];
                entry.next = take(&mut self.next_out, src).map(|o| (o, 0));
            }
            if entry.output.is_some() || entry.next.is_some() {
                let w_off = e * sh.w_len;
                let w = grown(&mut self.weights, w_off + sh.w_len, 0.0);
                copy_weights(exec, v, &mut w[w_off..]);
                entry.weights = Some(w_off);
            }
        }
        if from_start && entry.prev.is_none() && sh.prev > 0 {
            let src = &acts[sh.prev][..n * sh.prev_len];
            entry.prev = take(&mut self.prev_input, src);
        }
        self.entries[e] = entry;
    }
}

/// Gives `v` room for `len` values and no more than half as much again: a layer's sweep needs
/// other arrays than the sweep before (up to `MEMO_BUDGET` each), and what one no longer needs
/// goes back to the system rather than adding up over the sweeps. Values already in `v` (kept
/// entries' rows) stay.
fn room(v: &mut Vec<f32>, len: usize) {
    let len = len.max(v.len());
    if v.capacity() > len + len / 2 {
        let mut fresh = Vec::with_capacity(len);
        fresh.extend_from_slice(v);
        *v = fresh;
    }
    v.reserve(len - v.len());
}

/// The visited convolution's weights then biases into `out`.
fn copy_weights(exec: &Executor, v: Visited, out: &mut [f32]) {
    let w = &exec.params.values[v.weight];
    out[..w.len()].copy_from_slice(w);
    if let Some(b) = v.bias {
        out[w.len()..].copy_from_slice(&exec.params.values[b]);
    }
}

/// Channel versions recomputed per convolution call: one register tile's worth of output
/// channels, and a scratch of `n·4·h·w` values whatever the number of changed channels.
const VERSION_GROUP: usize = 4;

/// A channel of the visited convolution to recompute, with the current weights or (`entry`)
/// with an entry's copy of them.
#[derive(Clone, Copy, Debug)]
struct Version {
    c: usize,
    entry: bool,
}

/// Recomputes the channel `versions` of the convolution at plan index `act` from its input in
/// `acts[act]`, all in one pass over that input (one convolution whose output channels are
/// the versions' weight rows), into `tmp` as `[n][m][h·w]`; `kept` is the entry's copy of the
/// weights (laid out as [`copy_weights`] writes it). Then [`place_version`] writes them out.
#[allow(clippy::too_many_arguments)]
fn conv_versions(
    tmp: &mut Vec<f32>,
    rows: &mut Vec<f32>,
    exec: &Executor,
    act: usize,
    v: Visited,
    versions: &[Version],
    kept: &[f32],
    n: usize,
) {
    let conv = v.conv;
    let (hw, taps, m) = (conv.h * conv.w, conv.taps(), versions.len());
    let p = &exec.params.values;
    let wl = p[v.weight].len();
    // The versions' weight rows, then their biases.
    rows.clear();
    for &Version { c, entry } in versions {
        let w = if entry { &kept[..wl] } else { &p[v.weight][..] };
        rows.extend_from_slice(&w[c * taps..(c + 1) * taps]);
    }
    if let Some(b) = v.bias {
        for &Version { c, entry } in versions {
            rows.push(if entry { kept[wl + c] } else { p[b][c] });
        }
    }
    let (w, b) = rows.split_at(m * taps);
    let b = v.bias.map(|_| b);
    let s = Conv3x3 { c_out: m, ..conv };
    let x = &exec.ws.acts[act][..n * conv.in_len()];
    let task = |(t, y): (usize, &mut [f32])| {
        let k = y.len() / s.out_len();
        let x = &x[t * CHUNK * conv.in_len()..][..k * conv.in_len()];
        conv_forward(&s, k, x, w, b, y);
    };
    let y = &mut grown(tmp, n * m * hw, 0.0)[..n * m * hw];
    if parallel(n * s.macs()) {
        y.par_chunks_mut(CHUNK * s.out_len())
            .enumerate()
            .for_each(task);
    } else {
        y.chunks_mut(CHUNK * s.out_len()).enumerate().for_each(task);
    }
}

/// Writes version `j` of the `m` in `tmp` (from [`conv_versions`]) as channel `c` of the
/// convolution's output `acts[act + 1]`, and pools it layer by layer up to `acts[out_act]`.
#[allow(clippy::too_many_arguments)]
fn place_version(
    tmp: &[f32],
    planes: &mut Vec<f32>,
    exec: &mut Executor,
    act: usize,
    out_act: usize,
    conv: Conv3x3,
    (j, m, c): (usize, usize, usize),
    n: usize,
) {
    let (hw, c_out) = (conv.h * conv.w, conv.c_out);
    let buf = grown(planes, 2 * n * hw, 0.0);
    let (y, z) = buf.split_at_mut(n * hw);
    for t in 0..n {
        let src = &tmp[(t * m + j) * hw..][..hw];
        y[t * hw..][..hw].copy_from_slice(src);
        exec.ws.acts[act + 1][(t * c_out + c) * hw..][..hw].copy_from_slice(src);
    }
    for i in act + 1..out_act {
        let (h, w) = match exec.plan[i].op {
            Op::AvgPool { h, w, .. } => {
                avgpool2_forward(view((n, 1, h, w), y), view_mut((n, 1, h / 2, w / 2), z));
                (h, w)
            }
            Op::MaxPool { h, w, .. } => {
                maxpool2_forward(view((n, 1, h, w), y), view_mut((n, 1, h / 2, w / 2), z));
                (h, w)
            }
            _ => unreachable!("only pooling between a convolution and its kept output"),
        };
        let plane = (h / 2) * (w / 2);
        for t in 0..n {
            exec.ws.acts[i + 1][(t * c_out + c) * plane..][..plane]
                .copy_from_slice(&z[t * plane..][..plane]);
        }
        y[..n * plane].copy_from_slice(&z[..n * plane]);
    }
}

/// Values per channel plane of the input of the convolution at plan index `next`.
fn next_plane(exec: &Executor, next: usize) -> usize {
    match exec.plan[next].op {
        Op::Conv { conv, .. } => conv.h * conv.w,
        _ => 0,
    }
}

/// Channels of activation `i` (the output of plan layer `i − 1`), from the convolution that
/// made them.
fn channels_of(exec: &Executor, i: usize) -> usize {
    (0..i)
        .rev()
        .find_map(|l| match exec.plan[l].op {
            Op::Conv { conv, .. } => Some(conv.c_out),
            _ => None,
        })
        .unwrap_or(1)
}
