//! Seeded random inputs: data sets, parameters, batches and values, and the slim paper model.
//! Everything random flows from a caller's generator (usually [`rng`]`(seed)`), so the same
//! seed gives the same values on every run and machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rso_data::{Dataset, Split};
use rso_models::{init_params, Init, Layer, ModelKind, ModelSpec, ParamKind, Params};

/// The seeded generator of the tests, benches and examples: ChaCha8 from `seed`.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// How [`RandomData`] draws each pixel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pixels {
    /// Uniform in `[lo, lo + 1)`.
    Uniform {
        /// The lower end.
        lo: f32,
    },
    /// Standard normal, N(0, 1).
    Normal,
    /// Uniform in `[0, 1)`, with every draw below `zero_below` replaced by 0: a fraction
    /// `zero_below` of zero pixels, as in MNIST.
    Sparse {
        /// The fraction of zero pixels (and the smallest nonzero value).
        zero_below: f32,
    },
}

/// How [`RandomData`] labels its samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    /// Uniform over the classes, drawn after all of the set's pixels.
    Random,
    /// Sample `i` has class `i mod classes` (draws nothing).
    Cyclic,
}

/// A recipe for random data sets: the image shape, the number of classes, and how pixels and
/// labels are drawn. Build one with [`RandomData::of`] or [`RandomData::mnist`] and adjust it
/// with [`RandomData::pixels`] and [`RandomData::labels`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomData {
    /// `[channels, height, width]` of every image.
    pub shape: [usize; 3],
    /// Number of classes (labels are `0..classes`).
    pub classes: usize,
    /// How pixels are drawn.
    pub pixels: Pixels,
    /// How labels are chosen.
    pub labels: Labels,
}

impl RandomData {
    /// Images of `spec`'s input shape and labels of its classes; pixels uniform in `[0, 1)`,
    /// labels uniform.
    pub fn of(spec: &ModelSpec) -> RandomData {
        RandomData {
            shape: spec.input,
            classes: spec.classes,
            pixels: Pixels::Uniform { lo: 0.0 },
            labels: Labels::Random,
        }
    }

    /// MNIST's shape (1 × 28 × 28, 10 classes); pixels uniform in `[0, 1)`, labels uniform.
    pub fn mnist() -> RandomData {
        RandomData::of(&ModelKind::OneConv.mnist())
    }

    /// The same recipe with pixels drawn as `pixels`.
    pub fn pixels(self, pixels: Pixels) -> RandomData {
        RandomData { pixels, ..self }
    }

    /// The same recipe with labels chosen as `labels`.
    pub fn labels(self, labels: Labels) -> RandomData {
        RandomData { labels, ..self }
    }

    /// `n` samples: all pixels first (`n · channels · height · width` draws, sample-major),
    /// then the labels.
    ///
    /// # Panics
    /// If `classes` is 0 or above 256 (labels are bytes).
    pub fn set(&self, n: usize, rng: &mut impl Rng) -> Dataset {
        assert!(
            (1..=256).contains(&self.classes),
            "{} classes do not fit byte labels",
            self.classes
        );
        let [channels, height, width] = self.shape;
        let len = n * channels * height * width;
        let images = match self.pixels {
            Pixels::Uniform { lo } => (0..len).map(|_| lo + rng.random::<f32>()).collect(),
            Pixels::Normal => {
                let normal = Normal::new(0.0f32, 1.0).expect("σ > 0");
                (0..len).map(|_| normal.sample(rng)).collect()
            }
            Pixels::Sparse { zero_below } => (0..len)
                .map(|_| {
                    let v: f32 = rng.random();
                    if v < zero_below {
                        0.0
                    } else {
                        v
                    }
                })
                .collect(),
        };
        let labels = match self.labels {
            Labels::Random => (0..n)
                .map(|_| rng.random_range(0..self.classes) as u8)
                .collect(),
            Labels::Cyclic => (0..n).map(|i| (i % self.classes) as u8).collect(),
        };
        Dataset {
            images,
            labels,
            channels,
            height,
            width,
            classes: self.classes,
        }
    }

    /// A training set of `train` samples, then a test set of `test` samples, from `rng` in that
    /// order (see [`RandomData::set`]).
    ///
    /// # Panics
    /// As [`RandomData::set`].
    pub fn split(&self, train: usize, test: usize, rng: &mut impl Rng) -> Split {
        let train = self.set(train, rng);
        let test = self.set(test, rng);
        Split::new(train, test)
    }
}

/// How [`random_params`] draws parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// The initialiser's parameters ([`init_params`]), then (array by array) every bias and β
    /// moved to uniform in `[−0.2, 0.2)` and every γ to uniform in `[0.5, 1.5)`, so that every
    /// array matters.
    Init(Init),
    /// Every array drawn element by element, in order: weights N(0, √(2/fan_in)) (He), biases
    /// and β N(0, 0.1), γ uniform in `[0.5, 1.5)`.
    Normal,
}

/// Random parameters of `spec`, drawn from `rng` as `weights` says.
pub fn random_params(spec: &ModelSpec, weights: Weights, rng: &mut impl Rng) -> Params {
    match weights {
        Weights::Init(init) => {
            let mut p = init_params(spec, init, rng);
            for (s, v) in p.specs.iter().zip(p.values.iter_mut()) {
                match s.kind {
                    ParamKind::ConvBias | ParamKind::DenseBias | ParamKind::BnBeta => {
                        v.iter_mut().for_each(|x| *x = rng.random_range(-0.2..0.2))
                    }
                    ParamKind::BnGamma => {
                        v.iter_mut().for_each(|x| *x = rng.random_range(0.5..1.5))
                    }
                    ParamKind::ConvWeight | ParamKind::DenseWeight => {}
                }
            }
            p
        }
        Weights::Normal => {
            let mut p = Params::zeros(spec);
            for (s, v) in p.specs.iter().zip(p.values.iter_mut()) {
                let he = (2.0 / s.fan_in as f64).sqrt() as f32;
                for x in v.iter_mut() {
                    *x = match s.kind {
                        ParamKind::ConvWeight | ParamKind::DenseWeight => {
                            Normal::new(0.0, he).expect("σ > 0").sample(rng)
                        }
                        ParamKind::ConvBias | ParamKind::DenseBias | ParamKind::BnBeta => {
                            Normal::new(0.0, 0.1f32).expect("σ > 0").sample(rng)
                        }
                        ParamKind::BnGamma => rng.random_range(0.5..1.5),
                    };
                }
            }
            p
        }
    }
}

/// `len` indices drawn uniformly (with repetition) from a training set of `n` samples.
///
/// # Panics
/// If `n` is 0 and `len` is not, or `n` exceeds `u32::MAX`.
pub fn random_batch(rng: &mut impl Rng, n: usize, len: usize) -> Vec<u32> {
    let n = u32::try_from(n).expect("a training set indexable by u32");
    (0..len).map(|_| rng.random_range(0..n)).collect()
}

/// A batch of random length, uniform in `1..=min(max, n)`, then [`random_batch`] of it.
///
/// # Panics
/// If `n` or `max` is 0, or `n` exceeds `u32::MAX`.
pub fn random_batch_up_to(rng: &mut impl Rng, n: usize, max: usize) -> Vec<u32> {
    let len = rng.random_range(1..=max.min(n));
    random_batch(rng, n, len)
}

/// `len` values uniform in `[−a, a)`.
///
/// # Panics
/// If `a` is not positive.
pub fn uniform(rng: &mut impl Rng, len: usize, a: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-a..a)).collect()
}

/// The `paper` model's layers (six 3×3 convolutions, pooling after the second and fourth,
/// BatchNorm after each, global average pooling, dense) on `size × size` one-channel images with
/// `classes` classes, with `width` channels instead of 16, so that a whole RSO round of it is
/// quick. `size` should be a multiple of 4 (two 2×2 poolings).
pub fn slim_paper(size: usize, classes: usize, width: usize) -> ModelSpec {
    let mut spec = ModelKind::Paper.spec(1, size, classes);
    for layer in &mut spec.layers {
        match layer {
            Layer::Conv { c_in, c_out, .. } => {
                *c_in = if *c_in == 1 { 1 } else { width };
                *c_out = width;
            }
            Layer::BatchNorm { channels, .. } => *channels = width,
            Layer::Dense { d_in, .. } => *d_in = width,
            _ => {}
        }
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_have_the_recipe_shape_and_pixels() {
        let spec = ModelKind::TwoConv.spec(1, 8, 3);
        let set = RandomData::of(&spec)
            .pixels(Pixels::Uniform { lo: -0.5 })
            .set(5, &mut rng(1));
        assert_eq!(set.images.len(), 5 * 64);
        assert_eq!(
            (set.channels, set.height, set.width, set.classes),
            (1, 8, 8, 3)
        );
        assert!(set.images.iter().all(|&v| (-0.5..0.5).contains(&v)));
        assert!(set.labels.iter().all(|&l| l < 3));

        let sparse = RandomData::mnist()
            .pixels(Pixels::Sparse { zero_below: 0.6 })
            .labels(Labels::Cyclic)
            .set(20, &mut rng(2));
        let zeros = sparse.images.iter().filter(|&&v| v == 0.0).count();
        let fraction = zeros as f64 / sparse.images.len() as f64;
        assert!((0.55..0.65).contains(&fraction), "{fraction}");
        assert!(sparse.images.iter().all(|&v| v == 0.0 || v >= 0.6));
        assert_eq!(sparse.labels[..12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    }

    #[test]
    fn the_same_seed_gives_the_same_data() {
        let data = RandomData::mnist().pixels(Pixels::Normal);
        let (a, b) = (data.split(3, 2, &mut rng(7)), data.split(3, 2, &mut rng(7)));
        assert_eq!((a.train, a.test), (b.train, b.test));
        let spec = slim_paper(8, 10, 4);
        for w in [Weights::Init(Init::He), Weights::Normal] {
            let p = random_params(&spec, w, &mut rng(3));
            assert_eq!(p.values, random_params(&spec, w, &mut rng(3)).values);
        }
    }

    #[test]
    fn batches_stay_in_range() {
        let mut r = rng(4);
        for _ in 0..100 {
            let b = random_batch_up_to(&mut r, 5, 8);
            assert!((1..=5).contains(&b.len()));
            assert!(b.iter().all(|&i| i < 5));
        }
        assert_eq!(random_batch(&mut r, 3, 7).len(), 7);
    }

    #[test]
    fn slim_paper_has_width_channels() {
        let spec = slim_paper(8, 10, 4);
        assert_eq!(
            spec.layers.len(),
            ModelKind::Paper.spec(1, 8, 10).layers.len()
        );
        // Six 3×3 convolutions (1→4, then 4→4), six BatchNorms (γ, β), dense 4→10; no biases.
        assert_eq!(spec.param_count(), 36 + 5 * 144 + 6 * 8 + 40);
    }
}
