//! 2×2 stride-2 max and mean pooling, and global mean pooling, over independent planes.
//!
//! A batch `[n, c, h, w]` is `n·c` planes of `h × w`. The 2×2 pools produce `h/2 × w/2`
//! (rounded down; an odd last row or column is dropped and gets zero gradient).

/// 2×2 max pooling. Within a window the first maximum in row-major order wins (strict `>`),
/// which is also where [`maxpool2_backward`] routes the gradient.
pub fn maxpool2_forward(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    for p in 0..planes {
        let xp = &x[p * h * w..][..h * w];
        let yp = &mut y[p * oh * ow..][..oh * ow];
        for (oy, yrow) in yp.chunks_exact_mut(ow.max(1)).take(oh).enumerate() {
            let r0 = &xp[2 * oy * w..][..w];
            let r1 = &xp[(2 * oy + 1) * w..][..w];
            for (ox, out) in yrow.iter_mut().enumerate() {
                let mut m = r0[2 * ox];
                for v in [r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]] {
                    if v > m {
                        m = v;
                    }
                }
                *out = m;
            }
        }
    }
}

/// Gradient of [`maxpool2_forward`]: each window's `dy` goes to its first maximum in `x`
/// (recomputed), everything else gets 0. `dx` is fully written.
pub fn maxpool2_backward(planes: usize, h: usize, w: usize, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    dx[..planes * h * w].fill(0.0);
    for p in 0..planes {
        let xp = &x[p * h * w..][..h * w];
        let dyp = &dy[p * oh * ow..][..oh * ow];
        let dxp = &mut dx[p * h * w..][..h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let window = [
                    2 * oy * w + 2 * ox,
                    2 * oy * w + 2 * ox + 1,
                    (2 * oy + 1) * w + 2 * ox,
                    (2 * oy + 1) * w + 2 * ox + 1,
                ];
                let mut best = window[0];
                for &k in &window[1..] {
                    if xp[k] > xp[best] {
                        best = k;
                    }
                }
                dxp[best] = dyp[oy * ow + ox];
            }
        }
    }
}

/// 2×2 mean pooling.
pub fn avgpool2_forward(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    for p in 0..planes {
        let xp = &x[p * h * w..][..h * w];
        let yp = &mut y[p * oh * ow..][..oh * ow];
        for (oy, yrow) in yp.chunks_exact_mut(ow.max(1)).take(oh).enumerate() {
            let r0 = &xp[2 * oy * w..][..w];
            let r1 = &xp[(2 * oy + 1) * w..][..w];
            for (ox, out) in yrow.iter_mut().enumerate() {
                *out = ((r0[2 * ox] + r0[2 * ox + 1]) + (r1[2 * ox] + r1[2 * ox + 1])) * 0.25;
            }
        }
    }
}

/// Gradient of [`avgpool2_forward`]: a quarter of each window's `dy` to each of its four inputs.
/// `dx` is fully written.
pub fn avgpool2_backward(planes: usize, h: usize, w: usize, dy: &[f32], dx: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    dx[..planes * h * w].fill(0.0);
    for p in 0..planes {
        let dyp = &dy[p * oh * ow..][..oh * ow];
        let dxp = &mut dx[p * h * w..][..h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let g = dyp[oy * ow + ox] * 0.25;
                for k in [2 * oy * w + 2 * ox, (2 * oy + 1) * w + 2 * ox] {
                    dxp[k] = g;
                    dxp[k + 1] = g;
                }
            }
        }
    }
}

/// Global mean pooling: `y[p]` = mean of plane `p` (`hw` values, summed in f64).
pub fn global_avgpool_forward(planes: usize, hw: usize, x: &[f32], y: &mut [f32]) {
    for (p, out) in y[..planes].iter_mut().enumerate() {
        let sum: f64 = x[p * hw..][..hw].iter().map(|&v| f64::from(v)).sum();
        *out = (sum / hw.max(1) as f64) as f32;
    }
}

/// Gradient of [`global_avgpool_forward`]: `dy[p] / hw` to every value of plane `p`.
pub fn global_avgpool_backward(planes: usize, hw: usize, dy: &[f32], dx: &mut [f32]) {
    let scale = 1.0 / hw.max(1) as f32;
    for (p, &g) in dy[..planes].iter().enumerate() {
        dx[p * hw..][..hw].fill(g * scale);
    }
}
