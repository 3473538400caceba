//! One visit of a convolution scalar in a model without BatchNorm, for the samples of a batch:
//! the phases of [`ConvVisit::chunk`], run on fixed chunks of the batch (see the
//! [conv module docs](super::conv) for the scheme).

use super::conv::{conv_channel, run_tail, ConvCache};
use super::store::Store;
use crate::executor::{layer_forward, Executor};
use crate::incremental::util::{
    add_shifted, conv_forward, push_ce, with_scratch, with_scratch_b, LogProd,
};
use crate::incremental::{Next, MAX_CLASSES};
use crate::kernels::conv::Conv3x3;
use crate::simd::{prefetch, prefetch_slice};

/// Channel `k`'s weight and bias changes since the snapshot.
#[derive(Debug, Default)]
pub(crate) struct KChanges {
    /// Input channels `..ng` hold every changed weight of channel `k` (0: none changed).
    pub(crate) ng: usize,
    /// The weight changes of those input channels, `[ng][9]` (zero where unchanged).
    pub(crate) dw: Vec<f32>,
    /// The bias change, if any.
    pub(crate) db: Option<f32>,
}

impl KChanges {
    /// Channel `k`'s changes between `w_snap`/`b_snap` and the current weights.
    pub(crate) fn of(cache: &ConvCache, exec: &Executor, k: usize, out: &mut KChanges) {
        let taps = cache.conv.taps();
        let p = &exec.params.values;
        let w = &p[cache.weight][k * taps..(k + 1) * taps];
        let snap = &cache.w_snap[k * taps..(k + 1) * taps];
        let changed = |t: usize| w[t].to_bits() != snap[t].to_bits();
        out.ng = (0..taps)
            .filter(|&t| changed(t))
            .map(|t| t / 9 + 1)
            .max()
            .unwrap_or(0);
        out.dw.clear();
        out.dw.resize(out.ng * 9, 0.0);
        for t in (0..out.ng * 9).filter(|&t| changed(t)) {
            out.dw[t] = w[t] - snap[t];
        }
        out.db = cache
            .bias
            .filter(|&b| p[b][k].to_bits() != cache.b_snap[k].to_bits())
            .map(|b| p[b][k] - cache.b_snap[k]);
    }
}

/// What every chunk of a visit reads: the snapshot, the stored arrays, the visited scalar.
pub(crate) struct ConvVisit<'a> {
    pub(crate) exec: &'a Executor,
    pub(crate) cache: &'a ConvCache,
    pub(crate) store: &'a Store,
    /// The convolution's input rows of every training sample.
    pub(crate) x_all: &'a [f32],
    /// The layer's own stored output (empty unless channel `k` comes from the snapshot).
    pub(crate) own_all: &'a [f32],
    /// Dirty channels other than `k`.
    pub(crate) dirty: &'a [usize],
    pub(crate) kc: &'a KChanges,
    /// Channel `k` from the stored output plus the changes (else a full convolution).
    pub(crate) from_snapshot: bool,
    /// The visited output channel, and its tap (`None`: the bias).
    pub(crate) k: usize,
    pub(crate) tap: Option<usize>,
    /// The candidates' changes `[0, Δ₊, Δ₋]` of the scalar, as f32.
    pub(crate) ds: [f32; 3],
}

impl ConvVisit<'_> {
    fn in_len(&self) -> usize {
        self.cache.conv.in_len()
    }

    fn hw(&self) -> usize {
        self.cache.conv.h * self.cache.conv.w
    }

    /// The stored rows of `O`, the next parameter layer's input (the snapshot's tail outputs).
    fn o_all(&self) -> &[f32] {
        &self.store.acts[self.cache.next_index()].data
    }

    fn x_of(&self, i: u32) -> &[f32] {
        &self.x_all[i as usize * self.in_len()..][..self.in_len()]
    }

    /// Adds the cross-entropies at W, W + Δ, W − Δ of the samples `idx` to `acc`.
    pub(crate) fn chunk(&self, idx: &[u32], acc: &mut [LogProd; 3]) {
        let nc = idx.len();
        let (hw, hwo, nd) = (self.hw(), self.cache.hw_out, self.dirty.len());
        // Scratch: pre | cand | tmp | dO | dK. The samples' inputs are read where they are
        // (one convolution call per sample), not gathered: copying them was a third of the
        // memory traffic of a visit.
        let sizes = [nc * hw, nc * hw, nc * hw, nc * nd * hwo, 3 * nc * hwo];
        with_scratch(sizes.iter().sum(), |s| {
            let (pre, s) = s.split_at_mut(sizes[0]);
            let (cand, s) = s.split_at_mut(sizes[1]);
            let (tmp, s) = s.split_at_mut(sizes[2]);
            let (d_o, dk) = s.split_at_mut(sizes[3]);
            // `cand` is free until channel k: the dirty channels' tail output goes there.
            self.dirty_changes(idx, pre, tmp, cand, d_o);
            if self.from_snapshot {
                self.channel_k_from_snapshot(idx, pre);
            } else {
                self.conv_rows(idx, self.k, pre);
            }
            self.prefetch_snapshot(idx);
            self.candidate_changes(idx, pre, cand, tmp, dk);
            match self.cache.next {
                Next::Dense { .. } => self.dense_losses(idx, d_o, dk, acc),
                Next::Conv { .. } => self.conv_losses(idx, d_o, dk, acc),
            }
        });
    }

    /// Channel `c` of the convolution for the samples `idx` into `out` (`[nc][hw]`).
    fn conv_rows(&self, idx: &[u32], c: usize, out: &mut [f32]) {
        let (nc, in_len, hw) = (idx.len(), self.in_len(), self.hw());
        if in_len <= 1024 {
            // Small inputs (the images): gathered, so one kernel call covers the chunk.
            with_scratch_b(nc * in_len, |xg| {
                for (dst, &i) in xg.chunks_exact_mut(in_len).zip(idx) {
                    dst.copy_from_slice(self.x_of(i));
                }
                conv_channel(self.exec, self.cache, c, nc, xg, out);
            });
        } else {
            for (t, y) in out.chunks_exact_mut(hw).enumerate() {
                if t + 2 < nc {
                    prefetch_slice(self.x_of(idx[t + 2]));
                }
                conv_channel(self.exec, self.cache, c, 1, self.x_of(idx[t]), y);
            }
        }
    }

    /// The dirty channels' current tail outputs minus the snapshot's, `d_o: [t][dirty][hwo]`
    /// (`pre`, `tmp` and `tail_scratch` are scratch of `nc` planes each).
    fn dirty_changes(
        &self,
        idx: &[u32],
        pre: &mut [f32],
        tmp: &mut [f32],
        tail_scratch: &mut [f32],
        d_o: &mut [f32],
    ) {
        let (nc, hwo, nd) = (idx.len(), self.cache.hw_out, self.dirty.len());
        let o_len = self.cache.conv.c_out * hwo;
        for (q, &c) in self.dirty.iter().enumerate() {
            self.conv_rows(idx, c, pre);
            run_tail(
                &self.cache.tail,
                nc,
                pre,
                tmp,
                &mut tail_scratch[..nc * hwo],
            );
            for (t, &i) in idx.iter().enumerate() {
                let snap = &self.o_all()[i as usize * o_len + c * hwo..][..hwo];
                let dst = &mut d_o[(t * nd + q) * hwo..][..hwo];
                for ((d, &o), &s) in dst.iter_mut().zip(&tail_scratch[t * hwo..]).zip(snap) {
                    *d = o - s;
                }
            }
        }
    }

    /// Channel `k`'s pre-activation at W from the stored output: plus one convolution of the
    /// input channels `..ng` with the weight changes and plus the bias change.
    fn channel_k_from_snapshot(&self, idx: &[u32], pre: &mut [f32]) {
        let conv = self.cache.conv;
        let (nc, hw, in_len, k) = (idx.len(), self.hw(), self.in_len(), self.k);
        let (ng, own_len) = (self.kc.ng, conv.out_len());
        let s = Conv3x3 {
            c_in: ng,
            c_out: 1,
            ..conv
        };
        // The samples' input channels `..ng` gathered (the rows of a sample two ahead
        // prefetched: random rows of arrays far larger than the caches), then one convolution
        // call for the chunk.
        let gl = ng * hw;
        with_scratch_b(nc * gl + nc * hw, |buf| {
            let (xg, y) = buf.split_at_mut(nc * gl);
            for (t, dst) in xg.chunks_exact_mut(gl.max(1)).enumerate().take(nc) {
                if let Some(&a) = idx.get(t + 2) {
                    let a = a as usize;
                    prefetch_slice(&self.own_all[a * own_len + k * hw..][..hw]);
                    prefetch_slice(&self.x_all[a * in_len..][..gl]);
                }
                if gl > 0 {
                    dst.copy_from_slice(&self.x_of(idx[t])[..gl]);
                }
            }
            if ng > 0 {
                conv_forward(&s, nc, xg, &self.kc.dw, None, y);
            }
            for (t, (out, &i)) in pre.chunks_exact_mut(hw).zip(idx).enumerate() {
                let own = &self.own_all[i as usize * own_len + k * hw..][..hw];
                if ng > 0 {
                    for ((o, &a), &b) in out.iter_mut().zip(own).zip(&y[t * hw..]) {
                        *o = a + b;
                    }
                } else {
                    out.copy_from_slice(own);
                }
                if let Some(d) = self.kc.db {
                    out.iter_mut().for_each(|o| *o += d);
                }
            }
        });
    }

    /// Prefetches the snapshot planes and logits the rest reads (random rows).
    fn prefetch_snapshot(&self, idx: &[u32]) {
        let hwo = self.cache.hw_out;
        let o_len = self.cache.conv.c_out * hwo;
        let n_train = self.exec.train.len();
        for &i in idx {
            let i = i as usize;
            prefetch_slice(&self.o_all()[i * o_len + self.k * hwo..][..hwo]);
            if let Next::Dense { .. } = self.cache.next {
                for cls in 0..self.exec.spec.classes {
                    prefetch(&self.store.z.data[cls * n_train + i]);
                }
            }
        }
    }

    /// Channel `k` at W, W + Δ, W − Δ through the tail, minus the snapshot:
    /// `dk: [v][t][hwo]`.
    fn candidate_changes(
        &self,
        idx: &[u32],
        pre: &[f32],
        cand: &mut [f32],
        tmp: &mut [f32],
        dk: &mut [f32],
    ) {
        let conv = self.cache.conv;
        let (nc, hw, hwo) = (idx.len(), self.hw(), self.cache.hw_out);
        let o_len = conv.c_out * hwo;
        for (v, &d) in self.ds.iter().enumerate() {
            match (v, self.tap) {
                (0, _) => cand.copy_from_slice(pre),
                (_, Some(tap)) => {
                    let (ci, ky, kx) = (tap / 9, (tap % 9) / 3, tap % 3);
                    for (t, &i) in idx.iter().enumerate() {
                        let src = &self.x_of(i)[ci * hw..];
                        let (plane, out) = (&pre[t * hw..], &mut cand[t * hw..]);
                        add_shifted(conv.h, conv.w, plane, src, ky, kx, d, out);
                    }
                }
                (_, None) => {
                    for (c, &p) in cand.iter_mut().zip(pre.iter()) {
                        *c = p + d;
                    }
                }
            }
            let out = &mut dk[v * nc * hwo..(v + 1) * nc * hwo];
            run_tail(&self.cache.tail, nc, cand, tmp, out);
            for (t, &i) in idx.iter().enumerate() {
                let snap = &self.o_all()[i as usize * o_len + self.k * hwo..][..hwo];
                for (o, &s) in out[t * hwo..(t + 1) * hwo].iter_mut().zip(snap) {
                    *o -= s;
                }
            }
        }
    }

    /// Next layer dense: each sample's snapshot logits plus the dirty channels' and channel
    /// `k`'s changes times the dense weights (`cache.wt`), then the cross-entropies.
    fn dense_losses(&self, idx: &[u32], d_o: &[f32], dk: &[f32], acc: &mut [LogProd; 3]) {
        let (nc, hwo, nd) = (idx.len(), self.cache.hw_out, self.dirty.len());
        let classes = self.exec.spec.classes;
        let n_train = self.exec.train.len();
        let cp = classes.div_ceil(4) * 4;
        let (z, wt) = (&self.store.z.data, &self.cache.wt);
        let blk = hwo * cp;
        let mut zb = [0.0f64; MAX_CLASSES];
        let mut zv = [0.0f64; MAX_CLASSES];
        for (t, &i) in idx.iter().enumerate() {
            let i = i as usize;
            for (cls, zb) in zb[..classes].iter_mut().enumerate() {
                *zb = z[cls * n_train + i];
            }
            for q in 0..nd {
                let d = &d_o[(t * nd + q) * hwo..][..hwo];
                logit_changes(&wt[q * blk..(q + 1) * blk], d, &mut zb[..cp]);
            }
            let label = usize::from(self.exec.train.labels[i]);
            for (v, a) in acc.iter_mut().enumerate() {
                zv[..cp].copy_from_slice(&zb[..cp]);
                let d = &dk[(v * nc + t) * hwo..][..hwo];
                logit_changes(&wt[nd * blk..(nd + 1) * blk], d, &mut zv[..cp]);
                push_ce(a, &zv[..classes], label);
            }
        }
    }

    /// Next layer a convolution: its output for each variant is `P_snap + ΔP_dirty + ΔP_k`,
    /// after which the rest of the network runs on the `3·nc` samples.
    fn conv_losses(&self, idx: &[u32], d_o: &[f32], dk: &[f32], acc: &mut [LogProd; 3]) {
        let Next::Conv {
            layer: nl,
            conv: nconv,
            ..
        } = self.cache.next
        else {
            unreachable!("conv_losses with a dense next layer");
        };
        let plan = &self.exec.plan;
        let (nc, nd, p_len) = (idx.len(), self.dirty.len(), nconv.out_len());
        let max_len = plan[nl..].iter().map(|s| s.out_len).max().unwrap_or(0);
        // Scratch (this thread's second buffer): dPD | dPK | a | b.
        let sizes = [nc * p_len, nc * p_len, 3 * nc * max_len, 3 * nc * max_len];
        with_scratch_b(sizes.iter().sum(), |s| {
            let (dpd, s) = s.split_at_mut(sizes[0]);
            let (dpk, s) = s.split_at_mut(sizes[1]);
            let (a, b) = s.split_at_mut(sizes[2]);
            if nd > 0 {
                let s = Conv3x3 { c_in: nd, ..nconv };
                let d_o = &d_o[..nc * nd * nconv.h * nconv.w];
                conv_forward(&s, nc, d_o, &self.cache.w_dirty, None, dpd);
            }
            self.next_conv_inputs(idx, nconv, nl, dpd, dpk, dk, a);
            let logits = self.rest_of_network(nl, 3 * nc, a, b);
            let classes = self.exec.spec.classes;
            let mut z = [0.0f64; MAX_CLASSES];
            for (v, acc) in acc.iter_mut().enumerate() {
                for (t, &i) in idx.iter().enumerate() {
                    let row = &logits[(v * nc + t) * classes..][..classes];
                    for (z, &l) in z.iter_mut().zip(row) {
                        *z = f64::from(l);
                    }
                    let label = usize::from(self.exec.train.labels[i as usize]);
                    push_ce(acc, &z[..classes], label);
                }
            }
        });
    }

    /// The next convolution's output for each variant, `a: [v][t][p_len]`: the stored `P`
    /// plus the dirty channels' `dpd` plus channel `k`'s change convolved (`dpk`, scratch).
    #[allow(clippy::too_many_arguments)]
    fn next_conv_inputs(
        &self,
        idx: &[u32],
        nconv: Conv3x3,
        nl: usize,
        dpd: &[f32],
        dpk: &mut [f32],
        dk: &[f32],
        a: &mut [f32],
    ) {
        let (nc, nd, p_len) = (idx.len(), self.dirty.len(), nconv.out_len());
        let p_all = &self.store.acts[nl + 1].data;
        let s1 = Conv3x3 { c_in: 1, ..nconv };
        let hwo = nconv.h * nconv.w;
        for v in 0..3 {
            let dkv = &dk[v * nc * hwo..(v + 1) * nc * hwo];
            conv_forward(&s1, nc, dkv, &self.cache.w_k, None, dpk);
            for (t, &i) in idx.iter().enumerate() {
                if v == 0 {
                    if let Some(&a) = idx.get(t + 2) {
                        prefetch_slice(&p_all[a as usize * p_len..][..p_len]);
                    }
                }
                let snap = &p_all[i as usize * p_len..][..p_len];
                let dst = &mut a[(v * nc + t) * p_len..][..p_len];
                if nd > 0 {
                    for (((d, &p), &x), &y) in dst
                        .iter_mut()
                        .zip(snap)
                        .zip(&dpd[t * p_len..])
                        .zip(&dpk[t * p_len..])
                    {
                        *d = (p + x) + y;
                    }
                } else {
                    for ((d, &p), &y) in dst.iter_mut().zip(snap).zip(&dpk[t * p_len..]) {
                        *d = p + y;
                    }
                }
            }
        }
    }

    /// The layers after the next convolution (plan index `nl`) on `m` samples held in `a`,
    /// ping-ponging between `a` and `b`; returns the logits.
    fn rest_of_network<'s>(
        &self,
        nl: usize,
        m: usize,
        a: &'s mut [f32],
        b: &'s mut [f32],
    ) -> &'s [f32] {
        let (plan, params) = (&self.exec.plan, &self.exec.params.values);
        let mut in_a = true;
        for step in &plan[nl + 1..] {
            let (src, dst) = if in_a {
                (&a[..m * step.in_len], &mut b[..m * step.out_len])
            } else {
                (&b[..m * step.in_len], &mut a[..m * step.out_len])
            };
            layer_forward(&step.op, params, &[], m, src, dst);
            in_a = !in_a;
        }
        let classes = self.exec.spec.classes;
        if in_a {
            &a[..m * classes]
        } else {
            &b[..m * classes]
        }
    }
}

/// `z[c] += Σ_p w[p·cp + c]·d[p]` for every class slot `c < cp = z.len()` (a multiple of 4),
/// in f64: two partial sums (even and odd `p`) added at the end (a fixed order; the AVX2 and
/// the plain version round identically).
fn logit_changes(w: &[f64], d: &[f32], z: &mut [f64]) {
    let cp = z.len();
    assert!(
        cp.is_multiple_of(4) && w.len() >= d.len() * cp,
        "logit_changes: shapes"
    );
    if crate::simd::logit_changes_avx2(w, d, z) {
        return;
    }
    for c0 in (0..cp).step_by(4) {
        let mut s = [[0.0f64; 4]; 2];
        for (p, &dv) in d.iter().enumerate() {
            let dv = f64::from(dv);
            for l in 0..4 {
                s[p % 2][l] += w[p * cp + c0 + l] * dv;
            }
        }
        for l in 0..4 {
            z[c0 + l] += s[0][l] + s[1][l];
        }
    }
}
