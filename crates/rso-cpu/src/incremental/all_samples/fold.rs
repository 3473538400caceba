//! Folds: the dirty channels of a convolution's snapshot brought up to date for the whole
//! training set (see the [conv module docs](super::conv)).

use super::conv::{conv_channel, inputs, run_tail, ConvCache};
use crate::executor::Executor;
use crate::incremental::util::{conv_forward, grown, parallel, with_scratch, with_scratch_b};
use crate::incremental::Incremental;
use crate::incremental::Next;
use crate::kernels::conv::Conv3x3;
use rayon::prelude::*;
use std::ops::Range;

/// Samples per chunk of a fold.
const FOLD_CHUNK: usize = 64;

/// Whether to fold the `dirty` channels now. Folding costs about N (`n_train`) samples' worth
/// of what keeping them dirty costs each later visit (B, `batch` samples), so fold when the
/// `remaining` visits of the layer cost at least as much: `remaining·B ≥ N`. With a
/// convolution next (`next_conv`) a fold also reads and writes the next convolution's whole
/// output once, whatever the number of channels folded (about as much again per sample as two
/// channels): fold there when also `dirty·(remaining·B − N) ≥ 2·N`.
pub(crate) fn fold_now(
    next_conv: bool,
    dirty: usize,
    remaining: usize,
    batch: usize,
    n_train: usize,
) -> bool {
    let rb = remaining.saturating_mul(batch);
    if next_conv {
        rb >= n_train && dirty.saturating_mul(rb - n_train) >= 2 * n_train
    } else {
        rb >= n_train
    }
}

/// What every chunk of a fold reads.
struct FoldCtx<'a> {
    exec: &'a Executor,
    cache: &'a ConvCache,
    /// The channels folded.
    chans: &'a [usize],
    /// The convolution's input rows for the whole training set.
    x_all: &'a [f32],
}

/// One chunk of a fold: its samples and their rows of the arrays the fold updates.
struct FoldChunk<'a> {
    samples: Range<usize>,
    /// Rows of `O`, the next parameter layer's input.
    o: &'a mut [f32],
    /// Rows of the layer's own output (pre-activation), when the store keeps it.
    own: Option<&'a mut [f32]>,
    next: NextRows<'a>,
}

/// A fold chunk's rows of what the next parameter layer computes.
enum NextRows<'a> {
    /// Next layer dense: the logit changes, `[nc][classes]`.
    Logits(&'a mut [f64]),
    /// Next layer a convolution: its output `P`, `[nc][p_len]`.
    Conv(&'a mut [f32]),
}

impl FoldCtx<'_> {
    /// New outputs of the folded channels for one chunk into its rows of `O` (and of the own
    /// output), their changes since the snapshot into `d_o` (`[nc][chans][hwo]`).
    fn channel_outputs(
        &self,
        samples: Range<usize>,
        o: &mut [f32],
        mut own: Option<&mut [f32]>,
        d_o: &mut [f32],
    ) {
        let conv = self.cache.conv;
        let (hw, in_len, hwo) = (conv.h * conv.w, conv.in_len(), self.cache.hw_out);
        let (o_len, own_len, nd) = (conv.c_out * hwo, conv.out_len(), self.chans.len());
        let nc = samples.len();
        with_scratch(3 * nc * hw, |s| {
            let (pre, s) = s.split_at_mut(nc * hw);
            let (tmp, out) = s.split_at_mut(nc * hw);
            let xs = &self.x_all[samples.start * in_len..samples.end * in_len];
            for (q, &c) in self.chans.iter().enumerate() {
                conv_channel(self.exec, self.cache, c, nc, xs, pre);
                if let Some(own) = own.as_deref_mut() {
                    for (t, p) in pre.chunks_exact(hw).enumerate() {
                        own[t * own_len + c * hw..][..hw].copy_from_slice(p);
                    }
                }
                run_tail(&self.cache.tail, nc, pre, tmp, &mut out[..nc * hwo]);
                for t in 0..nc {
                    let snap = &mut o[t * o_len + c * hwo..][..hwo];
                    let d = &mut d_o[(t * nd + q) * hwo..][..hwo];
                    for ((d, s), &v) in d.iter_mut().zip(snap.iter_mut()).zip(&out[t * hwo..]) {
                        *d = v - *s;
                        *s = v;
                    }
                }
            }
        });
    }

    /// Folds one chunk: new channel outputs, then their effect on the next layer.
    fn run(&self, chunk: FoldChunk) {
        let FoldChunk {
            samples,
            o,
            own,
            next,
        } = chunk;
        let nc = samples.len();
        let (hwo, nd) = (self.cache.hw_out, self.chans.len());
        match (self.cache.next, next) {
            (Next::Dense { d_in, weight, .. }, NextRows::Logits(dz)) => {
                with_scratch_b(nc * nd * hwo, |d_o| {
                    self.channel_outputs(samples, o, own, d_o);
                    let wf = &self.exec.params.values[weight];
                    let classes = self.exec.spec.classes;
                    for t in 0..nc {
                        for cls in 0..classes {
                            let row = &wf[cls * d_in..(cls + 1) * d_in];
                            dz[t * classes + cls] = self
                                .chans
                                .iter()
                                .enumerate()
                                .map(|(q, &c)| {
                                    dot(
                                        &row[c * hwo..(c + 1) * hwo],
                                        &d_o[(t * nd + q) * hwo..][..hwo],
                                    )
                                })
                                .sum();
                        }
                    }
                });
            }
            (Next::Conv { conv: nconv, .. }, NextRows::Conv(p)) => {
                let p_len = nconv.out_len();
                with_scratch_b(nc * nd * hwo + nc * p_len, |s| {
                    let (d_o, dp) = s.split_at_mut(nc * nd * hwo);
                    self.channel_outputs(samples, o, own, d_o);
                    let s = Conv3x3 { c_in: nd, ..nconv };
                    conv_forward(&s, nc, d_o, &self.cache.w_dirty, None, dp);
                    for (p, &d) in p.iter_mut().zip(dp.iter()) {
                        *p += d;
                    }
                });
            }
            _ => unreachable!("a fold chunk's rows match the next layer"),
        }
    }
}

/// Brings the snapshot of channels `chans` up to date for the whole training set: `O` (and the
/// layer's own output, when kept), then the logits or the next convolution's output `P`.
pub(crate) fn fold(inc: &mut Incremental, cache: &mut ConvCache, exec: &Executor, chans: &[usize]) {
    if chans.is_empty() {
        return;
    }
    let conv = cache.conv;
    let n = exec.train.len();
    let classes = exec.spec.classes;
    ConvCache::gather_next(exec, cache.next, chans, &mut cache.w_dirty);
    // The arrays the fold writes leave the store while the chunks hold their rows; the input
    // (an earlier activation) stays and is read in place.
    let o_idx = cache.next_index();
    let own_idx = (cache.own_out && cache.layer + 1 != o_idx).then_some(cache.layer + 1);
    let p_idx = match cache.next {
        Next::Conv { layer, .. } => Some(layer + 1),
        Next::Dense { .. } => None,
    };
    let acts = &mut inc.store.acts;
    let mut take =
        |i: Option<usize>| i.map_or_else(Vec::new, |i| std::mem::take(&mut acts[i].data));
    let (mut o_all, mut own_all, mut p_all) = (take(Some(o_idx)), take(own_idx), take(p_idx));
    let mut dz = std::mem::take(&mut cache.dz);
    let o_len = conv.c_out * cache.hw_out;
    let nexts: Vec<NextRows> = match cache.next {
        Next::Dense { .. } => grown(&mut dz, n * classes, 0.0)
            .chunks_mut(FOLD_CHUNK * classes)
            .map(NextRows::Logits)
            .collect(),
        Next::Conv { conv: nconv, .. } => p_all[..n * nconv.out_len()]
            .chunks_mut(FOLD_CHUNK * nconv.out_len())
            .map(NextRows::Conv)
            .collect(),
    };
    let mut os = o_all[..n * o_len].chunks_mut(FOLD_CHUNK * o_len);
    let mut owns = own_all.chunks_mut(FOLD_CHUNK * conv.out_len());
    let chunks: Vec<FoldChunk> = nexts
        .into_iter()
        .enumerate()
        .map(|(c, next)| FoldChunk {
            samples: c * FOLD_CHUNK..((c + 1) * FOLD_CHUNK).min(n),
            o: os.next().expect("an O chunk per fold chunk"),
            own: owns.next(),
            next,
        })
        .collect();
    let store_in = inc
        .store
        .acts
        .get(cache.layer)
        .map_or(&[][..], |s| &s.data[..]);
    let ctx = FoldCtx {
        exec,
        cache,
        chans,
        x_all: inputs(exec, store_in, cache.layer),
    };
    if parallel(n * chans.len() * conv.macs() / conv.c_out) {
        chunks.into_par_iter().for_each(|c| ctx.run(c));
    } else {
        chunks.into_iter().for_each(|c| ctx.run(c));
    }
    let acts = &mut inc.store.acts;
    acts[o_idx].data = o_all;
    if let Some(i) = own_idx {
        acts[i].data = own_all;
    }
    match p_idx {
        Some(i) => acts[i].data = p_all,
        None => inc.store.add_logits(&dz[..n * classes], classes),
    }
    cache.dz = dz;
    cache.update_snapshot(exec, chans);
}

/// `Σ a·b` in f64: four interleaved partial sums, added pairwise (a fixed order).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += f64::from(a[l]) * f64::from(b[l]);
        }
    }
    for (l, (&a, &b)) in ra.iter().zip(rb).enumerate() {
        acc[l] += f64::from(a) * f64::from(b);
    }
    (acc[0] + acc[2]) + (acc[1] + acc[3])
}

#[cfg(test)]
mod tests {
    use super::fold_now;

    #[test]
    fn folds_when_the_remaining_visits_cost_more_than_the_fold() {
        // Next layer dense: remaining·B against N.
        assert!(fold_now(false, 1, 10, 100, 1000));
        assert!(!fold_now(false, 1, 9, 100, 1000));
        // Next layer a convolution: also the dirty channels' excess against 2N.
        assert!(!fold_now(true, 1, 10, 100, 1000), "no excess");
        assert!(!fold_now(true, 1, 20, 100, 1000), "excess 1000 < 2000");
        assert!(fold_now(true, 2, 20, 100, 1000), "excess 2·1000 ≥ 2000");
        assert!(fold_now(true, 1, 30, 100, 1000), "excess 2000 ≥ 2000");
        // No overflow on huge counts.
        assert!(fold_now(true, usize::MAX, usize::MAX, usize::MAX, 1));
    }
}
