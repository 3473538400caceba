//! Prints the multiply-adds of one RSO round (`rso_models::cost::round_macs`) for each model at
//! the batch sizes the benches and the notebook's table use, in GMAC (10⁹ multiply-adds). Only
//! convolutions and dense layers count: for one-conv and two-conv, whose incremental visits
//! are mostly O(B) logit updates, the floor is small and the loss arithmetic dominates.
//!
//! ```text
//! cargo run -p rso-models --example round_macs
//! ```

use rso_models::cost::round_macs;
use rso_models::ModelKind;

fn main() {
    println!("model,batch,reference_gmac,floor_gmac,floor_new_batches_gmac");
    for kind in ModelKind::ALL {
        for batch in [32, 256, 1000, 1024, 5000] {
            let m = round_macs(&kind.mnist(), batch);
            println!(
                "{},{batch},{:.3},{:.3},{:.3}",
                kind.name(),
                m.reference as f64 / 1e9,
                m.floor as f64 / 1e9,
                m.floor_new_batches as f64 / 1e9
            );
        }
    }
}
