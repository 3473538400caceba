//! Loads the real MNIST files when present (scripts/fetch-mnist.sh puts them in data/mnist);
//! skips otherwise.

use rso_data::{load_mnist, Normalization};
use std::path::PathBuf;
use std::time::Instant;

/// `data/mnist` under the workspace root, else the shared folder beside the checkout.
fn mnist_dir() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    [root.join("data/mnist"), root.join("../shared/data/mnist")]
        .into_iter()
        .find(|d| {
            d.join("train-images-idx3-ubyte.gz").is_file()
                || d.join("train-images-idx3-ubyte").is_file()
        })
}

fn histogram(labels: &[u8]) -> [usize; 10] {
    let mut h = [0; 10];
    for &l in labels {
        h[usize::from(l)] += 1;
    }
    h
}

#[test]
fn real_mnist_loads_with_canonical_counts() {
    let Some(dir) = mnist_dir() else {
        eprintln!("skipped: no MNIST files (run scripts/fetch-mnist.sh)");
        return;
    };
    let t = Instant::now();
    let split = load_mnist(&dir, Normalization::UnitRange).unwrap();
    eprintln!(
        "loaded MNIST from {} in {:.3} s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    let (train, test) = (&split.train, &split.test);
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    for set in [train, test] {
        assert_eq!(
            (set.channels, set.height, set.width, set.classes),
            (1, 28, 28, 10)
        );
        assert_eq!(set.images.len(), set.len() * 784);
        assert!(set.images.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    assert_eq!(
        histogram(&train.labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        histogram(&test.labels),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    let mean = train.images.iter().map(|&v| f64::from(v)).sum::<f64>() / train.images.len() as f64;
    assert!((mean - 0.1307).abs() < 1e-3, "train pixel mean {mean}");

    let mut centred = split.clone();
    Normalization::CenterTrainMean.apply(&mut centred);
    let m = centred
        .train
        .images
        .iter()
        .map(|&v| f64::from(v))
        .sum::<f64>()
        / train.images.len() as f64;
    assert!(m.abs() < 1e-5, "centred train mean {m}");
}
