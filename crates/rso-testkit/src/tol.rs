//! The one tolerance helper of the workspace's tests, [`Tol`].

use rso_models::Reduction;

/// A tolerance: `actual` is close to `expected` when
///
/// ```text
/// |actual − expected| <= atol + rtol · |expected|
/// ```
///
/// with `expected` the reference (a naive f64 oracle, the reference path, the pure-Rust backend).
/// Any NaN (or an infinity, whose difference is NaN or infinite) never passes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    /// Relative part, scaled by `|expected|`.
    pub rtol: f64,
    /// Absolute floor, for values near zero.
    pub atol: f64,
}

impl Tol {
    /// A near-tie of two losses: within 1e-6 relative, no absolute floor. Where the reference
    /// and incremental paths may choose differently (RSO's argmin of two candidates this close
    /// is decided by rounding).
    pub const NEAR_TIE: Tol = Tol {
        rtol: 1e-6,
        atol: 0.0,
    };

    /// Relative tolerance `rtol` with an absolute floor of `rtol · scale`: for a vector whose
    /// largest reference magnitude is `scale` (see [`max_abs`]), elements near zero are held to
    /// the precision of the vector's largest element (summation-order rounding is relative to
    /// the terms, not to the result).
    pub fn scaled(rtol: f64, scale: f64) -> Tol {
        Tol {
            rtol,
            atol: rtol * scale,
        }
    }

    /// The tolerance between the incremental and the reference losses of one RSO visit, on a
    /// batch of `n` samples under `reduction`: 1e-5 relative, with an absolute floor of 1e-7 per
    /// sample (times `n` for summed losses).
    pub fn losses(n: usize, reduction: Reduction) -> Tol {
        const RTOL: f64 = 1e-5;
        const ATOL_PER_SAMPLE: f64 = 1e-7;
        let atol = match reduction {
            Reduction::Mean => ATOL_PER_SAMPLE,
            Reduction::Sum => ATOL_PER_SAMPLE * n as f64,
        };
        Tol { rtol: RTOL, atol }
    }

    /// `|actual − expected| <= atol + rtol · |expected|`; false for any NaN.
    pub fn close(self, actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= self.atol + self.rtol * expected.abs()
    }

    /// Checks two equally long sequences element by element (`actual` f32 or f64, widened).
    /// The error names `what`, the first failing index and both values, or the two lengths.
    pub fn check<A: Copy + Into<f64>>(
        self,
        what: &str,
        actual: &[A],
        expected: &[f64],
    ) -> Result<(), String> {
        if actual.len() != expected.len() {
            return Err(format!(
                "{what}: {} values, expected {}",
                actual.len(),
                expected.len()
            ));
        }
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let a: f64 = a.into();
            if !self.close(a, e) {
                return Err(format!(
                    "{what}[{i}]: {a} vs reference {e} (|diff| {:e} > {:e} + {:e}·|ref|)",
                    (a - e).abs(),
                    self.atol,
                    self.rtol
                ));
            }
        }
        Ok(())
    }

    /// [`Tol::check`], as an assertion.
    ///
    /// # Panics
    /// With [`Tol::check`]'s message when the lengths differ or an element is not close.
    #[track_caller]
    pub fn assert_close<A: Copy + Into<f64>>(self, what: &str, actual: &[A], expected: &[f64]) {
        if let Err(e) = self.check(what, actual, expected) {
            panic!("{e}");
        }
    }
}

/// f32 values widened to f64 (for comparisons with an f64 reference).
pub fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// The largest magnitude in `v`, at least `floor` (the `scale` of [`Tol::scaled`]).
pub fn max_abs(v: &[f64], floor: f64) -> f64 {
    v.iter().fold(floor, |m, x| m.max(x.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_is_absolute_plus_relative_and_refuses_nan() {
        let t = Tol {
            rtol: 0.1,
            atol: 1.0,
        };
        assert!(t.close(12.0, 10.0));
        assert!(!t.close(12.1, 10.0));
        assert!(!t.close(f64::NAN, 10.0));
        assert!(!t.close(1.0, f64::NAN));
        assert!(!t.close(f64::INFINITY, f64::INFINITY));
    }

    #[test]
    fn check_names_the_first_offending_element() {
        let t = Tol::scaled(1e-3, 10.0);
        assert_eq!(
            t,
            Tol {
                rtol: 1e-3,
                atol: 1e-2
            }
        );
        assert!(t.check("v", &[1.0f32, 2.0], &[1.0, 2.0]).is_ok());
        let e = t
            .check("v", &[1.0, 2.5, 9.0], &[1.0, 2.0, 3.0])
            .unwrap_err();
        assert!(e.starts_with("v[1]: 2.5 vs reference 2"), "{e}");
        let e = t.check("v", &[1.0f32], &[1.0, 2.0]).unwrap_err();
        assert_eq!(e, "v: 1 values, expected 2");
    }

    #[test]
    #[should_panic(expected = "x[0]")]
    fn assert_close_panics_with_the_message() {
        Tol::NEAR_TIE.assert_close("x", &[1.0], &[2.0]);
    }

    #[test]
    fn loss_tolerance_scales_with_summed_batches() {
        assert_eq!(Tol::losses(8, Reduction::Mean).atol, 1e-7);
        assert_eq!(Tol::losses(8, Reduction::Sum).atol, 8e-7);
        assert_eq!(Tol::losses(8, Reduction::Sum).rtol, 1e-5);
    }
}
