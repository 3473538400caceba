//! 3×3 convolution, stride 1, zero padding 1: a direct register-tiled forward pass (also
//! added onto a base, [`conv3x3_forward_onto`], or of normalised and rectified input,
//! [`bn_relu_conv3x3_forward`]), and backward passes through im2col and `sgemm`.
//!
//! Weight layout `[c_out, c_in, 3, 3]`, row-major, so a weight row is one output channel's
//! `c_in·9` taps in the same order as the rows of the im2col matrix. The kernels take
//! [`Conv3x3`] as the shape and views whose shapes must agree with it.

use super::{copy_row, gemm, values, values_mut, Mat};
use crate::simd::{simd_dispatch, Lanes};
use ndarray::{ArrayView1, ArrayView4, ArrayViewMut1, ArrayViewMut4, Axis};
use std::cell::RefCell;

/// Shape of a 3×3, stride 1, padding 1 convolution over `c_in × h × w` images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv3x3 {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Image height (input and output).
    pub h: usize,
    /// Image width (input and output).
    pub w: usize,
}

impl Conv3x3 {
    /// Values per input sample, `c_in·h·w`.
    pub fn in_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// Values per output sample, `c_out·h·w`.
    pub fn out_len(&self) -> usize {
        self.c_out * self.h * self.w
    }

    /// Taps per output channel, `c_in·9` (a weight row, an im2col column).
    pub fn taps(&self) -> usize {
        self.c_in * 9
    }

    /// Multiply-adds of one sample's forward pass.
    pub fn macs(&self) -> usize {
        self.out_len() * self.taps()
    }

    /// Shape of `n` input samples, `[n, c_in, h, w]`.
    pub fn input_shape(&self, n: usize) -> (usize, usize, usize, usize) {
        (n, self.c_in, self.h, self.w)
    }

    /// Shape of `n` output samples, `[n, c_out, h, w]`.
    pub fn output_shape(&self, n: usize) -> (usize, usize, usize, usize) {
        (n, self.c_out, self.h, self.w)
    }

    /// Shape of the weight, `[c_out, c_in, 3, 3]`.
    pub fn weight_shape(&self) -> (usize, usize, usize, usize) {
        (self.c_out, self.c_in, 3, 3)
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }
}

/// Asserts the shapes of a kernel's views against `s`: `x` (or `dx`) `[n, c_in, h, w]`, `y`
/// (or `dy`) `[n, c_out, h, w]`, the weight (or its gradient) `[c_out, c_in, 3, 3]`, the bias
/// (or its gradient) `[c_out]`; `None` for an argument the kernel does not take.
#[track_caller]
fn check(
    kernel: &str,
    s: &Conv3x3,
    n: usize,
    x: Option<(usize, usize, usize, usize)>,
    y: Option<(usize, usize, usize, usize)>,
    weight: (usize, usize, usize, usize),
    bias: Option<usize>,
) {
    if let Some(x) = x {
        assert_eq!(
            x,
            s.input_shape(n),
            "{kernel}: input is not [n, c_in, h, w] of {s:?}"
        );
    }
    if let Some(y) = y {
        assert_eq!(
            y,
            s.output_shape(n),
            "{kernel}: output is not [n, c_out, h, w] of {s:?}"
        );
    }
    assert_eq!(
        weight,
        s.weight_shape(),
        "{kernel}: weight is not [c_out, c_in, 3, 3] of {s:?}"
    );
    if let Some(b) = bias {
        assert_eq!(b, s.c_out, "{kernel}: bias is not [c_out] of {s:?}");
    }
}

thread_local! {
    /// Per-thread im2col scratch; grows to the largest size used, then stays.
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` values (contents unspecified).
fn with_col<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    COL.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() < len {
            c.resize(len, 0.0);
        }
        f(&mut c[..len])
    })
}

/// One sample's im2col matrix `[c_in·9, h·w]`: row `(ci·3 + ky)·3 + kx`, column `y·w + x` holds
/// `x[ci, y + ky − 1, x + kx − 1]`, zero outside the image.
fn im2col(s: &Conv3x3, x: &[f32], col: &mut [f32]) {
    let (h, w, hw) = (s.h, s.w, s.plane());
    for (ci, plane) in x.chunks_exact(hw).take(s.c_in).enumerate() {
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &mut col[((ci * 3 + ky) * 3 + kx) * hw..][..hw];
                for (y, out) in row.chunks_exact_mut(w).enumerate() {
                    // Source row y + ky − 1, kept unsigned.
                    if y + ky == 0 || y + ky > h {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[(y + ky - 1) * w..][..w];
                    match kx {
                        0 => {
                            out[0] = 0.0;
                            copy_row(&mut out[1..], &src[..w - 1]);
                        }
                        1 => copy_row(out, src),
                        _ => {
                            copy_row(&mut out[..w - 1], &src[1..]);
                            out[w - 1] = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// Adds an im2col-shaped gradient back onto the image it was taken from (the adjoint of
/// [`im2col`]); `dx` accumulates.
fn col2im(s: &Conv3x3, col: &[f32], dx: &mut [f32]) {
    let (h, w, hw) = (s.h, s.w, s.plane());
    for (ci, plane) in dx.chunks_exact_mut(hw).take(s.c_in).enumerate() {
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &col[((ci * 3 + ky) * 3 + kx) * hw..][..hw];
                for (y, g) in row.chunks_exact(w).enumerate() {
                    if y + ky == 0 || y + ky > h {
                        continue;
                    }
                    let dst = &mut plane[(y + ky - 1) * w..][..w];
                    let (d, g) = match kx {
                        0 => (&mut dst[..w - 1], &g[1..]),
                        1 => (&mut dst[..], g),
                        _ => (&mut dst[1..], &g[..w - 1]),
                    };
                    for (d, g) in d.iter_mut().zip(g) {
                        *d += g;
                    }
                }
            }
        }
    }
}

/// Output runs are padded to whole multiples of this many values (the widest vector).
const TILE: usize = 16;

/// Forward pass of `n` samples: `y[i] = weight ∗ x[i] + bias` (cross-correlation).
///
/// # Shapes
/// `x: [n, c_in, h, w]`, `weight: [c_out, c_in, 3, 3]`, `bias: [c_out]`,
/// `y: [n, c_out, h, w]`, with `c_in`, `c_out`, `h`, `w` those of `s`.
///
/// # Panics
/// If a shape does not agree with `s` or with the others, or a view is not in standard layout.
///
/// Computed directly rather than through im2col + `sgemm`, which measured 3.7× slower for
/// 1→4 channels, 1.5–1.9× slower on 14×14 and 7×7 planes and about as fast for 16→16 on 28×28
/// (the models' shapes, 32 images, one thread): each input plane is copied into a
/// zero-bordered `(h+2)×(w+2)` plane; the output, laid out with the same padded row width, is
/// then one flat run per channel (padded to whole multiples of `TILE` values) in which every
/// value is `Σ_ci Σ_taps w·xp[j + ky·(w+2) + kx]`, with no edge cases (the two extra columns per
/// row are computed and dropped). A register tile is 4 channels × `PV` vectors of the level's
/// lanes (see `Tile`: 24 values per channel at AVX2, 64 at AVX-512).
pub fn conv3x3_forward(
    s: &Conv3x3,
    x: ArrayView4<f32>,
    weight: ArrayView4<f32>,
    bias: Option<ArrayView1<f32>>,
    y: ArrayViewMut4<f32>,
) {
    const K: &str = "conv3x3_forward";
    let n = x.len_of(Axis(0));
    let b_len = bias.as_ref().map(|b| b.len());
    check(K, s, n, Some(x.dim()), Some(y.dim()), weight.dim(), b_len);
    let (x, weight) = (values(x, K, "x"), values(weight, K, "weight"));
    let bias = bias.map(|b| values(b, K, "bias"));
    forward(s, n, x, weight, bias, None, values_mut(y, K, "y"));
}

/// Forward pass added onto a base: `y[i] = base[i] + weight ∗ x[i]` (no bias), each value
/// `base + (Σ_ci Σ_taps w·x)` — the same bits as [`conv3x3_forward`] into a buffer and then
/// added, without that buffer's pass over memory. The incremental paths move a kept
/// convolution output by the effect of one changed input channel this way.
///
/// # Shapes
/// `x: [n, c_in, h, w]`, `weight: [c_out, c_in, 3, 3]`, `base` and `y: [n, c_out, h, w]`.
///
/// # Panics
/// If a shape does not agree with `s` or with the others, or a view is not in standard layout.
pub fn conv3x3_forward_onto(
    s: &Conv3x3,
    x: ArrayView4<f32>,
    weight: ArrayView4<f32>,
    base: ArrayView4<f32>,
    y: ArrayViewMut4<f32>,
) {
    const K: &str = "conv3x3_forward_onto";
    let n = x.len_of(Axis(0));
    check(K, s, n, Some(x.dim()), Some(y.dim()), weight.dim(), None);
    check(K, s, n, None, Some(base.dim()), weight.dim(), None);
    let (x, weight) = (values(x, K, "x"), values(weight, K, "weight"));
    let base = values(base, K, "base");
    forward(s, n, x, weight, None, Some(base), values_mut(y, K, "y"));
}

/// Forward pass of ReLU(BatchNorm(x)) in one: `y[i] = weight ∗ relu(x[i]·scale + shift) +
/// bias`, the normalisation applied per input channel as each plane is copied into the
/// kernel's zero-bordered scratch (the same `f32` multiply, add and `v > 0 ? v : 0` as
/// [`batchnorm_apply`](super::batchnorm::batchnorm_apply) with
/// [`bn_affine`](super::batchnorm::bn_affine)'s `scale`, `shift` and then
/// [`relu_forward`](super::relu::relu_forward), so the same bits), without writing the
/// normalised activations anywhere.
///
/// # Shapes
/// `x: [n, c_in, h, w]`, `scale`, `shift: [c_in]`, `weight: [c_out, c_in, 3, 3]`,
/// `bias: [c_out]`, `y: [n, c_out, h, w]`.
///
/// # Panics
/// If a shape does not agree with `s` or with the others, or a view is not in standard layout.
pub fn bn_relu_conv3x3_forward(
    s: &Conv3x3,
    x: ArrayView4<f32>,
    (scale, shift): (ArrayView1<f32>, ArrayView1<f32>),
    weight: ArrayView4<f32>,
    bias: Option<ArrayView1<f32>>,
    y: ArrayViewMut4<f32>,
) {
    const K: &str = "bn_relu_conv3x3_forward";
    let n = x.len_of(Axis(0));
    let b_len = bias.as_ref().map(|b| b.len());
    check(K, s, n, Some(x.dim()), Some(y.dim()), weight.dim(), b_len);
    assert_eq!(scale.len(), s.c_in, "{K}: scale is not [c_in] of {s:?}");
    assert_eq!(shift.len(), s.c_in, "{K}: shift is not [c_in] of {s:?}");
    let (x, weight) = (values(x, K, "x"), values(weight, K, "weight"));
    let norm = (values(scale, K, "scale"), values(shift, K, "shift"));
    let bias = bias.map(|b| values(b, K, "bias"));
    let y = values_mut(y, K, "y");
    let io = Io {
        x,
        norm: Some(norm),
        base: None,
        y,
    };
    run_io(s, n, io, weight, bias);
}

fn forward(
    s: &Conv3x3,
    n: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    base: Option<&[f32]>,
    y: &mut [f32],
) {
    let io = Io {
        x,
        norm: None,
        base,
        y,
    };
    run_io(s, n, io, weight, bias);
}

fn run_io(s: &Conv3x3, n: usize, io: Io, weight: &[f32], bias: Option<&[f32]>) {
    if s.h * s.w == 0 {
        return;
    }
    let g = Padded::new(s);
    with_col(g.scratch_len(s), |scratch| {
        direct(s, &g, n, io, weight, bias, scratch)
    });
}

/// The samples a forward call reads and writes: `y = base + conv(x)` (or `conv(x) + bias`),
/// with `x` first normalised per input channel (`relu(x·scale + shift)`) when `norm` is given.
struct Io<'a> {
    x: &'a [f32],
    norm: Option<(&'a [f32], &'a [f32])>,
    base: Option<&'a [f32]>,
    y: &'a mut [f32],
}

/// Layout of the zero-bordered planes of the forward kernels.
struct Padded {
    /// Padded row width, `w + 2`.
    wp: usize,
    /// Values per output run (`h·wp` rounded up to whole tiles).
    run_pad: usize,
    /// Values per padded input plane, with slack for the last tile.
    plane_p: usize,
}

impl Padded {
    fn new(s: &Conv3x3) -> Padded {
        let wp = s.w + 2;
        let run_pad = (s.h * wp).div_ceil(TILE) * TILE;
        Padded {
            wp,
            run_pad,
            // Every tap of every tile stays inside the padded plane plus this slack.
            plane_p: (s.h + 2) * wp + (run_pad - s.h * wp) + 2,
        }
    }

    /// Scratch values of one call: the padded input planes, then the output runs.
    fn scratch_len(&self, s: &Conv3x3) -> usize {
        s.c_in * self.plane_p + s.c_out * self.run_pad
    }
}

simd_dispatch! {
    fn direct(
        s: &Conv3x3,
        g: &Padded,
        n: usize,
        io: Io,
        weight: &[f32],
        bias: Option<&[f32]>,
        scratch: &mut [f32],
    ) => direct_at(lanes)
}

/// The register tile of one level: 4 output channels × `PV` vectors of `L::LANES` values
/// (`4·PV` accumulators; 8 vectors for a single output channel). Per input channel and tap a
/// tile loads `PV` input vectors and broadcasts 4 weights for `4·PV` multiply-adds. 12 of the
/// 16 AVX2 registers hold accumulators, 16 of the 32 AVX-512 ones (untested on hardware). The
/// window of a tile is sliced once per input channel so the loads need no bounds checks: with
/// a check per load the compiler spilled the accumulators (measured on AMD EPYC).
trait Tile: Lanes {
    const PV: usize;
}

impl Tile for crate::simd::Portable {
    const PV: usize = 2;
}

#[cfg(target_arch = "x86_64")]
impl Tile for crate::simd::Avx2 {
    const PV: usize = 3;
}

#[cfg(target_arch = "x86_64")]
impl Tile for crate::simd::Avx512 {
    const PV: usize = 4;
}

/// Every output value is `bias + Σ_ci Σ_taps w·x` (or `base + (Σ_ci Σ_taps w·x)`), `x` being
/// the input or its normalised and rectified copy, added in that order (input channel, then
/// tap), whatever the level and tile: the wide levels fuse each multiply-add, so they agree
/// bit for bit; the tiles only change which values are computed together.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn direct_at<L: Tile>(
    lanes: L,
    s: &Conv3x3,
    g: &Padded,
    n: usize,
    io: Io,
    weight: &[f32],
    bias: Option<&[f32]>,
    scratch: &mut [f32],
) {
    let Io { x, norm, base, y } = io;
    let (w, hw) = (s.w, s.plane());
    let (xp, yp) = scratch.split_at_mut(s.c_in * g.plane_p);
    xp.fill(0.0);
    let k = Kernel { s, g, weight, bias };
    for i in 0..n {
        let xi = &x[i * s.in_len()..][..s.in_len()];
        for (ci, (src, dst)) in xi
            .chunks_exact(hw)
            .zip(xp.chunks_exact_mut(g.plane_p))
            .enumerate()
        {
            for (r, row) in src.chunks_exact(w).enumerate() {
                let dst = &mut dst[(r + 1) * g.wp + 1..][..w];
                match norm {
                    None => copy_row(dst, row),
                    Some((scale, shift)) => {
                        let (a, b) = (scale[ci], shift[ci]);
                        for (d, &x) in dst.iter_mut().zip(row) {
                            let v = x * a + b;
                            *d = if v > 0.0 { v } else { 0.0 };
                        }
                    }
                }
            }
        }
        // Runs of `PV` vectors, then the rest in shorter runs; tiles outermost, so the input
        // window of a tile is reused from L1 by every block of output channels.
        let nv = g.run_pad / L::LANES;
        let mut v = 0;
        if s.c_out == 1 {
            // One channel: one tile's accumulators would form too few dependency chains to
            // hide the multiply-add latency, so the tile is wider.
            v = k.run::<L, 1, 8>(lanes, xp, yp, v, nv);
            v = k.run::<L, 1, 4>(lanes, xp, yp, v, nv);
        } else if L::PV == 4 {
            v = k.run::<L, 4, 4>(lanes, xp, yp, v, nv);
        } else if L::PV == 3 {
            v = k.run::<L, 4, 3>(lanes, xp, yp, v, nv);
        }
        v = k.run::<L, 4, 2>(lanes, xp, yp, v, nv);
        k.run::<L, 4, 1>(lanes, xp, yp, v, nv);
        let yi = &mut y[i * s.out_len()..][..s.out_len()];
        let bi = base.map(|b| &b[i * s.out_len()..][..s.out_len()]);
        for (c, (dst, src)) in yi
            .chunks_exact_mut(hw)
            .zip(yp.chunks_exact(g.run_pad))
            .enumerate()
        {
            for (r, row) in dst.chunks_exact_mut(w).enumerate() {
                let src = &src[r * g.wp..][..w];
                match bi {
                    None => copy_row(row, src),
                    Some(b) => {
                        let b = &b[c * hw + r * w..][..w];
                        for ((y, &b), &v) in row.iter_mut().zip(b).zip(src) {
                            *y = b + v;
                        }
                    }
                }
            }
        }
    }
}

/// What every tile of one forward call reads.
struct Kernel<'a> {
    s: &'a Conv3x3,
    g: &'a Padded,
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl Kernel<'_> {
    /// Tiles of `PV` vectors from vector `v` while whole ones fit below `nv`, each for every
    /// block of `CB` output channels (the remaining channels one at a time); returns the first
    /// vector not done.
    #[inline(always)]
    fn run<L: Lanes, const CB: usize, const PV: usize>(
        &self,
        lanes: L,
        xp: &[f32],
        yp: &mut [f32],
        mut v: usize,
        nv: usize,
    ) -> usize {
        while v + PV <= nv {
            let j0 = v * L::LANES;
            let mut co = 0;
            while co + CB <= self.s.c_out {
                self.tile::<L, CB, PV>(lanes, j0, co, xp, yp);
                co += CB;
            }
            while co < self.s.c_out {
                self.tile::<L, 1, PV>(lanes, j0, co, xp, yp);
                co += 1;
            }
            v += PV;
        }
        v
    }

    /// Output values `j0..j0 + PV·LANES` of channels `co..co + CB` of one sample into the
    /// padded-width runs `yp`.
    #[inline(always)]
    fn tile<L: Lanes, const CB: usize, const PV: usize>(
        &self,
        lanes: L,
        j0: usize,
        co: usize,
        xp: &[f32],
        yp: &mut [f32],
    ) {
        let (s, g) = (self.s, self.g);
        let (taps, l) = (s.taps(), L::LANES);
        let mut acc: [[L::V; PV]; CB] =
            std::array::from_fn(|c| [lanes.splat(self.bias.map_or(0.0, |b| b[co + c])); PV]);
        // The tile's window of every input plane: rows `0..3` of `wp` values from `j0`, plus
        // the tile's width (checked once here, so the loads below need no checks).
        let span = 2 * g.wp + 2 + PV * l;
        for ci in 0..s.c_in {
            let win = &xp[ci * g.plane_p + j0..][..span];
            let w9: [&[f32; 9]; CB] = std::array::from_fn(|c| {
                self.weight[(co + c) * taps + ci * 9..][..9]
                    .try_into()
                    .expect("9 taps")
            });
            for ky in 0..3 {
                let row = &win[ky * g.wp..][..2 + PV * l];
                for kx in 0..3 {
                    let xs: [L::V; PV] =
                        std::array::from_fn(|p| lanes.load(&row[kx + p * l..][..l]));
                    for (a, w9) in acc.iter_mut().zip(&w9) {
                        let wv = lanes.splat(w9[ky * 3 + kx]);
                        for (a, &xv) in a.iter_mut().zip(&xs) {
                            *a = lanes.madd(*a, wv, xv);
                        }
                    }
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            let out = &mut yp[(co + c) * g.run_pad + j0..][..PV * l];
            for (p, &a) in a.iter().enumerate() {
                lanes.store(a, &mut out[p * l..]);
            }
        }
    }
}

/// Gradient with respect to the input: `dx[i] = weightᵀ ⋆ dy[i]` (fully written).
///
/// # Shapes
/// `dy: [n, c_out, h, w]`, `weight: [c_out, c_in, 3, 3]`, `dx: [n, c_in, h, w]`, with `c_in`,
/// `c_out`, `h`, `w` those of `s`.
///
/// # Panics
/// If a shape does not agree with `s` or with the others, or a view is not in standard layout.
pub fn conv3x3_backward_input(
    s: &Conv3x3,
    dy: ArrayView4<f32>,
    weight: ArrayView4<f32>,
    dx: ArrayViewMut4<f32>,
) {
    const K: &str = "conv3x3_backward_input";
    let n = dy.len_of(Axis(0));
    check(K, s, n, Some(dx.dim()), Some(dy.dim()), weight.dim(), None);
    let (dy, weight) = (values(dy, K, "dy"), values(weight, K, "weight"));
    input_grad(s, n, dy, weight, values_mut(dx, K, "dx"));
}

fn input_grad(s: &Conv3x3, n: usize, dy: &[f32], weight: &[f32], dx: &mut [f32]) {
    let (hw, taps) = (s.plane(), s.taps());
    if hw == 0 {
        return;
    }
    with_col(taps * hw, |dcol| {
        for i in 0..n {
            let dyi = &dy[i * s.out_len()..][..s.out_len()];
            gemm(
                taps,
                s.c_out,
                hw,
                Mat::transposed(weight, taps),
                Mat::rows(dyi, hw),
                0.0,
                dcol,
            );
            let dxi = &mut dx[i * s.in_len()..][..s.in_len()];
            dxi.fill(0.0);
            col2im(s, dcol, dxi);
        }
    });
}

/// Gradients with respect to weight and bias, summed over the `n` samples in sample order
/// (both fully written).
///
/// # Shapes
/// `x: [n, c_in, h, w]`, `dy: [n, c_out, h, w]`, `dweight: [c_out, c_in, 3, 3]`,
/// `dbias: [c_out]`, with `c_in`, `c_out`, `h`, `w` those of `s`.
///
/// # Panics
/// If a shape does not agree with `s` or with the others, or a view is not in standard layout.
pub fn conv3x3_backward_params(
    s: &Conv3x3,
    x: ArrayView4<f32>,
    dy: ArrayView4<f32>,
    dweight: ArrayViewMut4<f32>,
    dbias: Option<ArrayViewMut1<f32>>,
) {
    const K: &str = "conv3x3_backward_params";
    let n = x.len_of(Axis(0));
    let b_len = dbias.as_ref().map(|b| b.len());
    check(K, s, n, Some(x.dim()), Some(dy.dim()), dweight.dim(), b_len);
    let (x, dy) = (values(x, K, "x"), values(dy, K, "dy"));
    let dbias = dbias.map(|b| values_mut(b, K, "dbias"));
    param_grads(s, n, x, dy, values_mut(dweight, K, "dweight"), dbias);
}

fn param_grads(
    s: &Conv3x3,
    n: usize,
    x: &[f32],
    dy: &[f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    let (hw, taps) = (s.plane(), s.taps());
    dweight[..s.c_out * taps].fill(0.0);
    if let Some(db) = dbias {
        for (co, d) in db[..s.c_out].iter_mut().enumerate() {
            let mut sum = 0.0f64;
            for i in 0..n {
                let plane = &dy[i * s.out_len() + co * hw..][..hw];
                sum += plane.iter().map(|&g| f64::from(g)).sum::<f64>();
            }
            *d = sum as f32;
        }
    }
    if hw == 0 {
        return;
    }
    with_col(taps * hw, |col| {
        for i in 0..n {
            im2col(s, &x[i * s.in_len()..][..s.in_len()], col);
            let dyi = &dy[i * s.out_len()..][..s.out_len()];
            gemm(
                s.c_out,
                hw,
                taps,
                Mat::rows(dyi, hw),
                Mat::transposed(col, hw),
                1.0,
                dweight,
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        self as tu, assert_close, config, dot, integers, numeric_grad, uniform, wide,
    };
    use ndarray::{aview1, aview_mut1, Array4, ArrayView};
    use proptest::prelude::*;

    fn v4<'a>(shape: (usize, usize, usize, usize), x: &'a [f32]) -> ArrayView4<'a, f32> {
        ArrayView::from_shape(shape, x).expect("test shape")
    }

    fn v4m<'a>(shape: (usize, usize, usize, usize), x: &'a mut [f32]) -> ArrayViewMut4<'a, f32> {
        ArrayViewMut4::from_shape(shape, x).expect("test shape")
    }

    fn run(s: &Conv3x3, n: usize, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![f32::NAN; n * s.out_len()];
        let (x, w) = (v4(s.input_shape(n), x), v4(s.weight_shape(), w));
        conv3x3_forward(s, x, w, b.map(aview1), v4m(s.output_shape(n), &mut y));
        y
    }

    /// The input gradient, and the weight and bias gradients.
    fn grads(s: &Conv3x3, n: usize, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
        let mut dx = vec![f32::NAN; x.len()];
        let (dyv, wv) = (v4(s.output_shape(n), dy), v4(s.weight_shape(), w));
        conv3x3_backward_input(s, dyv, wv, v4m(s.input_shape(n), &mut dx));
        let (mut dw, mut db) = (vec![f32::NAN; w.len()], vec![f32::NAN; s.c_out]);
        let (dwv, dbv) = (v4m(s.weight_shape(), &mut dw), aview_mut1(&mut db));
        conv3x3_backward_params(s, v4(s.input_shape(n), x), dyv, dwv, Some(dbv));
        [dx, dw, db]
    }

    #[test]
    fn forward_matches_hand_computed_sums() {
        let s = Conv3x3 {
            c_in: 1,
            c_out: 2,
            h: 3,
            w: 3,
        };
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        // Channel 0: all-ones kernel (neighbourhood sums); channel 1: only the top-left tap, so
        // out(y, x) = in(y − 1, x − 1): cross-correlation, not a flipped convolution.
        let mut w = vec![1.0; 9];
        w.extend([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let y = run(&s, 1, &x, &w, Some(&[0.5, -1.0]));
        let want = [
            12.5, 21.5, 16.5, 27.5, 45.5, 33.5, 24.5, 39.5, 28.5, -1.0, -1.0, -1.0, -1.0, 0.0, 1.0,
            -1.0, 3.0, 4.0,
        ];
        assert_eq!(y, want);
    }

    #[test]
    fn forward_matches_naive_loops_exactly_on_integers() {
        let mut rng = tu::rng(1);
        for (n, c_in, c_out, h, w) in [
            (2, 3, 2, 5, 4),
            (1, 1, 4, 1, 1),
            (3, 2, 3, 2, 7),
            (1, 16, 16, 7, 7),
        ] {
            let s = Conv3x3 { c_in, c_out, h, w };
            let x = integers(&mut rng, n * s.in_len(), 3);
            let wt = integers(&mut rng, c_out * s.taps(), 2);
            let b = integers(&mut rng, c_out, 5);
            for bias in [None, Some(b.as_slice())] {
                let y = run(&s, n, &x, &wt, bias);
                let want = tu::conv(
                    n,
                    c_in,
                    c_out,
                    h,
                    w,
                    &wide(&x),
                    &wide(&wt),
                    bias.map(wide).as_deref(),
                );
                assert_eq!(wide(&y), want, "{s:?} bias {}", bias.is_some());
            }
        }
    }

    /// The scalar sum each output value must equal bit for bit: `bias`, then every input
    /// channel's 9 taps in order (zeros outside the image included), fused or not.
    fn scalar_sum(
        s: &Conv3x3,
        n: usize,
        x: &[f32],
        wt: &[f32],
        b: Option<&[f32]>,
        fused: bool,
    ) -> Vec<f32> {
        let (h, w) = (s.h as isize, s.w as isize);
        let mut y = Vec::with_capacity(n * s.out_len());
        for i in 0..n {
            for co in 0..s.c_out {
                for oy in 0..h {
                    for ox in 0..w {
                        let mut acc = b.map_or(0.0, |b| b[co]);
                        for ci in 0..s.c_in {
                            for t in 0..9 {
                                let (iy, ix) = (oy + t as isize / 3 - 1, ox + t as isize % 3 - 1);
                                let v = if (0..h).contains(&iy) && (0..w).contains(&ix) {
                                    x[((i * s.c_in + ci) * s.h + iy as usize) * s.w + ix as usize]
                                } else {
                                    0.0
                                };
                                let wv = wt[(co * s.c_in + ci) * 9 + t];
                                acc = if fused {
                                    wv.mul_add(v, acc)
                                } else {
                                    acc + wv * v
                                };
                            }
                        }
                        y.push(acc);
                    }
                }
            }
        }
        y
    }

    /// [`direct_at`] at the level of `lanes` (called directly: correct, if slow, outside the
    /// dispatch's target-feature copy).
    fn at_level<L: Tile>(
        lanes: L,
        s: &Conv3x3,
        n: usize,
        x: &[f32],
        wt: &[f32],
        b: Option<&[f32]>,
    ) -> Vec<f32> {
        let g = Padded::new(s);
        let mut scratch = vec![f32::NAN; g.scratch_len(s)];
        let mut y = vec![f32::NAN; n * s.out_len()];
        let io = Io {
            x,
            norm: None,
            base: None,
            y: &mut y,
        };
        direct_at(lanes, s, &g, n, io, wt, b, &mut scratch);
        y
    }

    #[test]
    fn every_simd_level_adds_in_the_stated_order_bit_for_bit() {
        use crate::simd::{Avx2, Avx512, Portable};
        let mut rng = tu::rng(5);
        let mut ran = vec!["portable"];
        for (n, c_in, c_out, h, w) in [
            (2, 1, 1, 1, 1),
            (1, 1, 4, 28, 28),
            (2, 16, 16, 7, 7),
            (1, 16, 16, 14, 14),
            (1, 16, 1, 14, 14),
            (1, 16, 3, 14, 14),
            (2, 2, 5, 5, 3),
            (1, 3, 6, 2, 9),
            (1, 16, 16, 28, 28),
        ] {
            let s = Conv3x3 { c_in, c_out, h, w };
            let x = uniform(&mut rng, n * s.in_len(), 1.0);
            let wt = uniform(&mut rng, c_out * s.taps(), 1.0);
            let b = uniform(&mut rng, c_out, 1.0);
            for bias in [None, Some(b.as_slice())] {
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                let (plain, fused) = (
                    bits(scalar_sum(&s, n, &x, &wt, bias, false)),
                    bits(scalar_sum(&s, n, &x, &wt, bias, true)),
                );
                assert_eq!(
                    bits(at_level(Portable, &s, n, &x, &wt, bias)),
                    plain,
                    "portable {s:?}"
                );
                #[cfg(target_arch = "x86_64")]
                if let Some(l) = Avx2::new() {
                    assert_eq!(bits(at_level(l, &s, n, &x, &wt, bias)), fused, "avx2 {s:?}");
                    ran.push("avx2");
                }
                #[cfg(target_arch = "x86_64")]
                if let Some(l) = Avx512::new() {
                    assert_eq!(
                        bits(at_level(l, &s, n, &x, &wt, bias)),
                        fused,
                        "avx512 {s:?}"
                    );
                    ran.push("avx512");
                }
                // And the dispatched kernel, at this process's level.
                let fuses = crate::simd::level() > crate::simd::SimdLevel::Portable;
                let want = if fuses { &fused } else { &plain };
                assert_eq!(&bits(run(&s, n, &x, &wt, bias)), want, "dispatched {s:?}");
            }
        }
        ran.dedup();
        crate::simd::report_levels("conv3x3_forward", &ran);
    }

    #[test]
    fn forward_onto_adds_the_base_to_the_same_sums() {
        let mut rng = tu::rng(8);
        for (n, c_in, c_out, h, w) in [(3, 1, 16, 14, 14), (2, 16, 16, 7, 7), (1, 2, 3, 5, 4)] {
            let s = Conv3x3 { c_in, c_out, h, w };
            let x = uniform(&mut rng, n * s.in_len(), 1.0);
            let wt = uniform(&mut rng, c_out * s.taps(), 1.0);
            let base = uniform(&mut rng, n * s.out_len(), 4.0);
            let sums = run(&s, n, &x, &wt, None);
            let want: Vec<u32> = base
                .iter()
                .zip(&sums)
                .map(|(b, v)| (b + v).to_bits())
                .collect();
            let mut y = vec![f32::NAN; n * s.out_len()];
            conv3x3_forward_onto(
                &s,
                v4(s.input_shape(n), &x),
                v4(s.weight_shape(), &wt),
                v4(s.output_shape(n), &base),
                v4m(s.output_shape(n), &mut y),
            );
            let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{s:?}");
        }
    }

    #[test]
    fn bn_relu_conv_gives_the_bits_of_the_three_layers() {
        use crate::kernels::batchnorm::{batchnorm_apply, bn_affine};
        use crate::kernels::relu::relu_forward;
        use ndarray::aview1;
        let mut rng = tu::rng(9);
        for (n, c_in, c_out, h, w) in [(3, 16, 16, 14, 14), (2, 16, 16, 7, 7), (1, 3, 5, 6, 4)] {
            let s = Conv3x3 { c_in, c_out, h, w };
            // Mixed signs, so that ReLU cuts about half the normalised values.
            let x = uniform(&mut rng, n * s.in_len(), 2.0);
            let wt = uniform(&mut rng, c_out * s.taps(), 1.0);
            let b = uniform(&mut rng, c_out, 1.0);
            let mean: Vec<f64> = uniform(&mut rng, c_in, 0.5)
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let var: Vec<f64> = uniform(&mut rng, c_in, 1.0)
                .iter()
                .map(|&v| f64::from(v.abs() + 0.1))
                .collect();
            let (gamma, beta) = (uniform(&mut rng, c_in, 2.0), uniform(&mut rng, c_in, 1.0));
            let shape = (n, c_in, h * w);
            let mut normed = vec![f32::NAN; x.len()];
            batchnorm_apply(
                ndarray::ArrayView3::from_shape(shape, &x).unwrap(),
                aview1(&mean),
                aview1(&var),
                aview1(&gamma),
                aview1(&beta),
                ndarray::ArrayViewMut3::from_shape(shape, &mut normed).unwrap(),
            );
            let mut relu = vec![f32::NAN; x.len()];
            relu_forward(aview1(&normed), ndarray::aview_mut1(&mut relu));
            let want = run(&s, n, &relu, &wt, Some(&b));
            let (scale, shift): (Vec<f32>, Vec<f32>) = (0..c_in)
                .map(|c| bn_affine(mean[c], var[c], gamma[c], beta[c]))
                .unzip();
            let mut y = vec![f32::NAN; n * s.out_len()];
            bn_relu_conv3x3_forward(
                &s,
                v4(s.input_shape(n), &x),
                (aview1(&scale), aview1(&shift)),
                v4(s.weight_shape(), &wt),
                Some(aview1(&b)),
                v4m(s.output_shape(n), &mut y),
            );
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&want), "{s:?}");
        }
    }

    #[test]
    fn backward_is_the_exact_adjoint_on_integers() {
        let mut rng = tu::rng(2);
        for (n, c_in, c_out, h, w) in [(2, 3, 2, 5, 4), (1, 1, 1, 1, 1), (3, 2, 4, 6, 3)] {
            let s = Conv3x3 { c_in, c_out, h, w };
            let x = integers(&mut rng, n * s.in_len(), 3);
            let wt = integers(&mut rng, c_out * s.taps(), 2);
            let b = integers(&mut rng, c_out, 2);
            let dy = integers(&mut rng, n * s.out_len(), 2);
            let y = run(&s, n, &x, &wt, Some(&b));
            let [dx, dw, db] = grads(&s, n, &x, &wt, &dy);
            let y0 = run(&s, n, &x, &wt, None);
            // <dy, conv(x)> = <dx, x> and <dy, conv(x; W, b)> = <dW, W> + <db, b>, exactly.
            assert_eq!(
                dot(&dy, &wide(&y0)),
                dot(&dx, &wide(&x)),
                "{s:?}: input adjoint"
            );
            assert_eq!(
                dot(&dy, &wide(&y)),
                dot(&dw, &wide(&wt)) + dot(&db, &wide(&b)),
                "{s:?}: param adjoint"
            );
        }
    }

    #[test]
    fn zero_samples_give_zero_parameter_gradients() {
        let s = Conv3x3 {
            c_in: 2,
            c_out: 3,
            h: 4,
            w: 4,
        };
        let (mut dw, mut db) = (vec![f32::NAN; 3 * 18], vec![f32::NAN; 3]);
        let (x, dy) = (v4(s.input_shape(0), &[]), v4(s.output_shape(0), &[]));
        let (dwv, dbv) = (v4m(s.weight_shape(), &mut dw), aview_mut1(&mut db));
        conv3x3_backward_params(&s, x, dy, dwv, Some(dbv));
        assert!(dw.iter().chain(&db).all(|&v| v == 0.0));
    }

    #[test]
    #[should_panic(expected = "conv3x3_forward: output is not [n, c_out, h, w]")]
    fn forward_rejects_an_output_of_another_shape() {
        let s = Conv3x3 {
            c_in: 1,
            c_out: 2,
            h: 3,
            w: 3,
        };
        let (x, w) = (vec![0.0; 9], vec![0.0; 18]);
        let mut y = vec![0.0; 18];
        let (x, w) = (v4(s.input_shape(1), &x), v4(s.weight_shape(), &w));
        conv3x3_forward(&s, x, w, None, v4m((1, 2, 9, 1), &mut y));
    }

    #[test]
    #[should_panic(expected = "conv3x3_forward: `x` is not in standard")]
    fn forward_rejects_a_transposed_input() {
        let s = Conv3x3 {
            c_in: 1,
            c_out: 1,
            h: 3,
            w: 3,
        };
        let x = Array4::<f32>::zeros((1, 1, 3, 3));
        let (w, mut y) = (vec![0.0; 9], vec![0.0; 9]);
        let x = x.view().permuted_axes([0, 1, 3, 2]);
        conv3x3_forward(
            &s,
            x,
            v4(s.weight_shape(), &w),
            None,
            v4m(s.output_shape(1), &mut y),
        );
    }

    proptest! {
        #![proptest_config(config(24))]
        #[test]
        fn gradients_match_finite_differences(
            n in 1usize..=3, c_in in 1usize..=3, c_out in 1usize..=3, h in 1usize..=6, w in 1usize..=6,
            seed in any::<u64>(),
        ) {
            let s = Conv3x3 { c_in, c_out, h, w };
            let mut rng = tu::rng(seed);
            let x = uniform(&mut rng, n * s.in_len(), 1.0);
            let wt = uniform(&mut rng, c_out * s.taps(), 1.0);
            let b = uniform(&mut rng, c_out, 1.0);
            let r = uniform(&mut rng, n * s.out_len(), 1.0);
            let (xw, ww, bw) = (wide(&x), wide(&wt), wide(&b));
            let loss = |x: &[f64], wt: &[f64], b: &[f64]| dot(&r, &tu::conv(n, c_in, c_out, h, w, x, wt, Some(b)));

            let [dx, dw, db] = grads(&s, n, &x, &wt, &r);

            assert_close(&dx, &numeric_grad(|x| loss(x, &ww, &bw), &xw, 1e-3), 1e-4, 1e-4, "dx");
            assert_close(&dw, &numeric_grad(|wt| loss(&xw, wt, &bw), &ww, 1e-3), 1e-4, 1e-4, "dw");
            assert_close(&db, &numeric_grad(|b| loss(&xw, &ww, b), &bw, 1e-3), 1e-4, 1e-4, "db");
        }
    }
}
