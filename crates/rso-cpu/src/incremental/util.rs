//! Pieces shared by the incremental paths: the loss accumulator, fixed-chunk parallelism and
//! per-thread scratch.

use crate::executor::{view, view_mut};
use crate::kernels::conv::{conv3x3_forward, conv3x3_forward_onto, Conv3x3};
use ndarray::aview1;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// [`conv3x3_forward`] of `n` samples held in flat buffers: the leading values of `x`, `weight`
/// and `y` as `[n, c_in, h, w]`, `[c_out, c_in, 3, 3]` and `[n, c_out, h, w]` views. The
/// incremental paths gather random rows, channel slices and weight slices into reused flat
/// scratch, whose lengths are set by the largest use, so they wrap them only at the call.
pub(crate) fn conv_forward(
    s: &Conv3x3,
    n: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (x, weight) = (view(s.input_shape(n), x), view(s.weight_shape(), weight));
    conv3x3_forward(
        s,
        x,
        weight,
        bias.map(aview1),
        view_mut(s.output_shape(n), y),
    );
}

/// [`conv3x3_forward_onto`] of `n` samples in flat buffers (as [`conv_forward`]):
/// `y = base + weight ∗ x`.
pub(crate) fn conv_forward_onto(
    s: &Conv3x3,
    n: usize,
    x: &[f32],
    weight: &[f32],
    base: &[f32],
    y: &mut [f32],
) {
    conv3x3_forward_onto(
        s,
        view(s.input_shape(n), x),
        view(s.weight_shape(), weight),
        view(s.output_shape(n), base),
        view_mut(s.output_shape(n), y),
    );
}

/// Σ of per-sample cross-entropies written as `CE = lin + ln(a)` with `a ≥ 1`, accumulated as
/// `Σ lin + ln(Π a)`: the product is kept as a mantissa in `[1, 2)` times a power of two, so a
/// batch costs one logarithm instead of one per sample. Exact to a few ulps of the sum (each
/// factor adds one rounding of relative size 2⁻⁵³ to the product).
#[derive(Clone, Copy, Debug)]
pub(super) struct LogProd {
    lin: f64,
    mant: f64,
    exp: i64,
}

impl Default for LogProd {
    fn default() -> Self {
        LogProd {
            lin: 0.0,
            mant: 1.0,
            exp: 0,
        }
    }
}

const FRAC_MASK: u64 = (1 << 52) - 1;

impl LogProd {
    /// Adds one sample's `lin + ln(a)`. A factor that is not a finite number `≥ 1` (an overflowed
    /// exponential, a NaN from diverged logits) is added as `ln(a)` directly, so NaN and ∞
    /// propagate to the sum as they would in a per-sample sum.
    #[inline(always)]
    pub(super) fn push(&mut self, lin: f64, a: f64) {
        if (1.0..1e300).contains(&a) {
            self.lin += lin;
            self.mant *= a;
            self.renorm();
        } else {
            self.lin += lin + a.ln();
        }
    }

    #[inline(always)]
    fn renorm(&mut self) {
        // `mant` is a normal positive number here (a product of numbers in [1, 2) and [1, 1e300]).
        let bits = self.mant.to_bits();
        self.exp += ((bits >> 52) & 0x7ff) as i64 - 1023;
        self.mant = f64::from_bits((bits & FRAC_MASK) | (1023 << 52));
    }

    /// An accumulator holding `lin + ln(mant·2^exp)` (`mant` a normal positive number).
    pub(super) fn from_parts(lin: f64, mant: f64, exp: i64) -> LogProd {
        let mut p = LogProd { lin, mant, exp };
        p.renorm();
        p
    }

    /// Adds another accumulator (callers merge chunk results in chunk order).
    pub(super) fn merge(&mut self, o: &LogProd) {
        self.lin += o.lin;
        self.mant *= o.mant;
        self.exp += o.exp;
        self.renorm();
    }

    /// The accumulated sum.
    pub(super) fn value(&self) -> f64 {
        self.lin + self.mant.ln() + self.exp as f64 * std::f64::consts::LN_2
    }
}

/// Adds one sample's cross-entropy `LSE(z) − z[label]` for f64 logits `z`, as
/// `lin = m − z[label]`, `a = Σ exp(z − m)` with `m = max z` (every `z − m ≤ 0`, where
/// [`exp_kernel`] is valid; a NaN or infinite logit takes the library's exponential).
#[inline(always)]
pub(super) fn push_ce(acc: &mut LogProd, z: &[f64], label: usize) {
    let m = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let a: f64 = if m.is_finite() {
        z.iter().map(|&v| exp_kernel(v - m)).sum()
    } else {
        z.iter().map(|&v| (v - m).exp()).sum()
    };
    // A NaN logit makes `a` NaN (max ignores NaN, the sum does not).
    acc.push(m - z[label], a);
}

/// Sum of the three accumulators of each chunk, in chunk order.
pub(super) fn combine(parts: &[[LogProd; 3]]) -> [f64; 3] {
    let mut total = [LogProd::default(); 3];
    for p in parts {
        for (t, q) in total.iter_mut().zip(p) {
            t.merge(q);
        }
    }
    total.map(|t| t.value())
}

/// The candidate values' changes `(w ± δ) − w` (the candidates are `w + δ` and `w − δ` rounded
/// to f32, as the reference path sets them), exact in f64 up to one rounding.
pub(super) fn changes(w: f32, delta: f32) -> [f64; 2] {
    [
        f64::from(w + delta) - f64::from(w),
        f64::from(w - delta) - f64::from(w),
    ]
}

/// Whether to split `work` multiply-add equivalents over rayon threads.
pub(super) fn parallel(work: usize) -> bool {
    rayon::current_num_threads() > 1 && work >= 200_000
}

/// Calls `f(range, out)` for the fixed chunks `range` of `0..n` (`chunk` items each; the last may
/// be shorter) with `out` the chunk's slot in `outs` (`outs.len() ≥ n.div_ceil(chunk)`), over
/// rayon threads when `par`. Chunks do not depend on the thread count, so neither do results
/// combined in chunk order.
pub(super) fn for_chunks<T: Send>(
    n: usize,
    chunk: usize,
    par: bool,
    outs: &mut [T],
    f: impl Fn(Range<usize>, &mut T) + Sync,
) {
    let count = n.div_ceil(chunk);
    let run = |c: usize, o: &mut T| f(c * chunk..((c + 1) * chunk).min(n), o);
    if par && count > 1 {
        outs[..count]
            .par_iter_mut()
            .enumerate()
            .for_each(|(c, o)| run(c, o));
    } else {
        for (c, o) in outs[..count].iter_mut().enumerate() {
            run(c, o);
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's f64 scratch of at least `len` values (contents unspecified). Not
/// re-entrant.
pub(super) fn with_scratch64<R>(len: usize, f: impl FnOnce(&mut [f64]) -> R) -> R {
    SCRATCH64.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// Runs `f` on this thread's f32 scratch of at least `len` values (contents unspecified). Not
/// re-entrant.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// A second per-thread f32 scratch, for use inside [`with_scratch`]. Not re-entrant.
pub(super) fn with_scratch_b<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH_B.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

pub(super) use crate::executor::grown;

/// `out = plane + d · shift(src)` for one `h × w` plane, where `shift` is the input plane as a
/// 3×3 tap `(ky, kx)` of a padding-1 convolution sees it: `src[y + ky − 1, x + kx − 1]`, zero
/// outside. With `d == 0` (or a zero source) `out` equals `plane` exactly.
#[allow(clippy::too_many_arguments)]
pub(super) fn add_shifted(
    h: usize,
    w: usize,
    plane: &[f32],
    src: &[f32],
    ky: usize,
    kx: usize,
    d: f32,
    out: &mut [f32],
) {
    out[..h * w].copy_from_slice(&plane[..h * w]);
    for y in 0..h {
        // Source row y + ky − 1, kept unsigned.
        if y + ky == 0 || y + ky > h {
            continue;
        }
        let srow = &src[(y + ky - 1) * w..][..w];
        let orow = &mut out[y * w..][..w];
        let (o, s) = match kx {
            0 => (&mut orow[1..], &srow[..w - 1]),
            1 => (&mut orow[..], srow),
            _ => (&mut orow[..w - 1], &srow[1..]),
        };
        for (o, &s) in o.iter_mut().zip(s) {
            *o += d * s;
        }
    }
}

/// `exp(x)` for `x ≤ 709` in plain arithmetic (no library call, no branch, so loops over it
/// vectorise): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (Cody–Waite), `exp(r)` by its Taylor
/// polynomial of degree 13 (truncation below 1e-17), times `2ⁿ` built in the exponent bits.
/// Relative error a few ulps; `x < −708` gives `exp(−708)` (callers add it to numbers ≥ 1,
/// where it vanishes). NaN or `x > 709` give garbage: callers check their inputs.
#[inline(always)]
pub(super) fn exp_kernel(x: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²: adding it rounds to an integer
                                                // ln 2 split so that n·LN2_HI is exact for |n| < 2²¹ (fdlibm's constants).
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    let x = if x < -708.0 { -708.0 } else { x };
    let t = x * std::f64::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 6_227_020_800.0; // 1/13!
    for c in [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // n's integer value sits in the low bits of t.
    let ni = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    p * f64::from_bits(((ni + 1023) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_product_sums_logarithms() {
        let mut acc = LogProd::default();
        let mut want = 0.0;
        for i in 0..5000 {
            let a = 1.0 + (i % 97) as f64 * 3.7;
            let lin = (i % 13) as f64 - 6.0;
            acc.push(lin, a);
            want += lin + a.ln();
        }
        assert!(
            (acc.value() - want).abs() <= 1e-9 * want.abs(),
            "{} vs {want}",
            acc.value()
        );
        let mut nan = acc;
        nan.push(0.0, f64::NAN);
        assert!(nan.value().is_nan());
        let mut inf = acc;
        inf.push(0.0, f64::INFINITY);
        assert_eq!(inf.value(), f64::INFINITY);
    }

    #[test]
    fn the_exponential_kernel_is_within_a_few_ulps() {
        let mut worst = 0.0f64;
        let mut x = -707.9;
        while x < 709.0 {
            let (got, want) = (exp_kernel(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        for x in [0.0, 1e-300, -1e-300, 0.5, -0.5, 1.0, 700.5, -700.5] {
            let (got, want) = (exp_kernel(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-15, "worst relative error {worst}");
        assert_eq!(exp_kernel(0.0), 1.0);
        assert!(exp_kernel(-1000.0) < 1e-300);
    }

    #[test]
    fn shifted_add_matches_the_convolution_tap() {
        let (h, w) = (3, 4);
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let zero = vec![0.0; 12];
        let mut out = vec![f32::NAN; 12];
        // Tap (0, 0): out(y, x) = src(y − 1, x − 1).
        add_shifted(h, w, &zero, &src, 0, 0, 1.0, &mut out);
        assert_eq!(out, [0., 0., 0., 0., 0., 0., 1., 2., 0., 4., 5., 6.]);
        // Tap (2, 2): out(y, x) = src(y + 1, x + 1).
        add_shifted(h, w, &zero, &src, 2, 2, 2.0, &mut out);
        assert_eq!(out, [10., 12., 14., 0., 18., 20., 22., 0., 0., 0., 0., 0.]);
    }
}
