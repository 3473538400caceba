//! Input normalisation, one variant per preset (see DESIGN §2).

use crate::Split;

/// How raw 8-bit pixels become network inputs. Readers first scale pixels to `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    /// Pixels / 255, nothing else (preset `seed`: the notebook's inputs).
    UnitRange,
    /// Pixels / 255 minus the training set's per-channel mean, applied to every set
    /// (preset `paper`: the authors' code).
    CenterTrainMean,
}

impl Normalization {
    /// Applies the normalisation to a split whose pixels are already scaled to `[0, 1]`.
    pub fn apply(self, split: &mut Split) {
        match self {
            Normalization::UnitRange => {}
            Normalization::CenterTrainMean => {
                let means = channel_means(&split.train);
                for set in [&mut split.train, &mut split.test, &mut split.validation] {
                    let plane = set.height * set.width;
                    for (i, v) in set.images.iter_mut().enumerate() {
                        *v -= means[(i / plane) % set.channels];
                    }
                }
            }
        }
    }
}

/// Per-channel mean over all samples, accumulated in f64.
fn channel_means(set: &crate::Dataset) -> Vec<f32> {
    let plane = set.height * set.width;
    let mut sums = vec![0f64; set.channels];
    for (i, v) in set.images.iter().enumerate() {
        sums[(i / plane) % set.channels] += f64::from(*v);
    }
    let count = (set.len() * plane).max(1) as f64;
    sums.iter().map(|s| (s / count) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dataset;

    fn set(images: Vec<f32>, channels: usize) -> Dataset {
        let n = images.len() / channels;
        Dataset {
            labels: vec![0; 1],
            images,
            channels,
            height: 1,
            width: n,
            classes: 10,
        }
    }

    #[test]
    fn centering_uses_the_training_mean_per_channel() {
        let mut split = Split {
            train: set(vec![0.0, 1.0, 1.0, 1.0], 2),
            test: set(vec![0.5, 0.5, 0.5, 0.5], 2),
            validation: set(vec![1.0, 1.0, 0.0, 0.0], 2),
        };
        Normalization::CenterTrainMean.apply(&mut split);
        assert_eq!(split.train.images, vec![-0.5, 0.5, 0.0, 0.0]);
        assert_eq!(split.test.images, vec![0.0, 0.0, -0.5, -0.5]);
        assert_eq!(split.validation.images, vec![0.5, 0.5, -1.0, -1.0]);
    }

    #[test]
    fn unit_range_changes_nothing() {
        let mut split = Split::new(set(vec![0.25; 2], 1), set(vec![0.75; 2], 1));
        Normalization::UnitRange.apply(&mut split);
        assert_eq!(split.train.images, vec![0.25; 2]);
        assert_eq!(split.test.images, vec![0.75; 2]);
    }
}
