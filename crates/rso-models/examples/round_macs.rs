//! Prints the multiply-adds of one RSO round (`rso_models::cost::round_macs`) for each model at
//! the batch sizes the benches and the notebook's table use:
//!
//! ```text
//! cargo run -p rso-models --example round_macs
//! ```

use rso_models::cost::round_macs;
use rso_models::ModelKind;

fn main() {
    println!("model,batch,reference_tmac,floor_tmac,floor_new_batches_tmac");
    for kind in ModelKind::ALL {
        for batch in [32, 256, 1000, 1024, 5000] {
            let m = round_macs(&kind.mnist(), batch);
            println!(
                "{},{batch},{:.4},{:.4},{:.4}",
                kind.name(),
                m.reference as f64 / 1e12,
                m.floor as f64 / 1e12,
                m.floor_new_batches as f64 / 1e12
            );
        }
    }
}
