//! Initialisers of the two presets (DESIGN §2).

use crate::params::Params;
use crate::spec::{ModelSpec, ParamKind};
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// How parameters start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Flux's default: weights `U(±sqrt(6/(fan_in+fan_out)))`, biases zero, BN γ=1, β=0.
    GlorotUniform,
    /// The paper's: weights `N(0, sqrt(2/fan_in))`, no biases drawn (zero), BN γ=1, β=0.
    He,
}

/// The He standard deviation `sqrt(2/fan_in)` of a weight array.
pub fn he_std(fan_in: usize) -> f64 {
    (2.0 / fan_in as f64).sqrt()
}

/// Draws initial parameters for `spec` from `rng` (arrays in canonical order, each row-major).
pub fn init_params(spec: &ModelSpec, init: Init, rng: &mut impl Rng) -> Params {
    let mut params = Params::zeros(spec);
    for (p, v) in params.specs.iter().zip(params.values.iter_mut()) {
        match (p.kind, init) {
            (ParamKind::ConvWeight | ParamKind::DenseWeight, Init::GlorotUniform) => {
                let a = (6.0 / (p.fan_in + p.fan_out) as f64).sqrt();
                for x in v.iter_mut() {
                    *x = rng.random_range(-a..a) as f32;
                }
            }
            (ParamKind::ConvWeight | ParamKind::DenseWeight, Init::He) => {
                let normal = Normal::new(0.0, he_std(p.fan_in)).expect("finite positive std");
                for x in v.iter_mut() {
                    *x = normal.sample(rng) as f32;
                }
            }
            (ParamKind::BnGamma, _) => v.fill(1.0),
            (ParamKind::ConvBias | ParamKind::DenseBias | ParamKind::BnBeta, _) => v.fill(0.0),
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelKind;
    use rand::SeedableRng;

    fn std(v: &[f32]) -> f64 {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        (v.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / n).sqrt()
    }

    #[test]
    fn he_weights_have_the_he_std() {
        let spec = ModelKind::Paper.mnist();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let p = init_params(&spec, Init::He, &mut rng);
        let i = p.index_of("conv3.weight").unwrap();
        let s = std(&p.values[i]);
        assert!((s / he_std(144) - 1.0).abs() < 0.05, "std {s}");
        assert!(p.values[p.index_of("bn3.gamma").unwrap()]
            .iter()
            .all(|&g| g == 1.0));
    }

    #[test]
    fn glorot_weights_stay_in_bounds_and_biases_are_zero() {
        let spec = ModelKind::OneConv.mnist();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let p = init_params(&spec, Init::GlorotUniform, &mut rng);
        let a = (6.0f64 / (784.0 + 10.0)).sqrt() as f32;
        let w = &p.values[p.index_of("fc.weight").unwrap()];
        assert!(w.iter().all(|x| x.abs() <= a));
        assert!(std(w) > 0.5 * f64::from(a) / 3f64.sqrt());
        assert!(p.values[p.index_of("fc.bias").unwrap()]
            .iter()
            .all(|&b| b == 0.0));
    }

    #[test]
    fn same_seed_same_parameters() {
        let spec = ModelKind::TwoConv.mnist();
        let a = init_params(
            &spec,
            Init::He,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(7),
        );
        let b = init_params(
            &spec,
            Init::He,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(7),
        );
        assert_eq!(a, b);
    }
}
