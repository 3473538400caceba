//! Candidates of the final dense layer of a model with BatchNorm: the logits depend on the
//! batch, so one forward pass of the batch gives them and the layer's input (from the
//! [memo](super::memo) when the batch recurs), and the candidates are O(B) from there.

use crate::executor::Executor;
use crate::incremental::util::{changes, combine, for_chunks, grown, parallel, push_ce};
use crate::incremental::{dense_target, Incremental, Visit, MAX_CLASSES};

/// Samples per chunk of a candidate evaluation (fixed: results do not depend on threads).
const CHUNK: usize = 256;

/// The three losses for a scalar of the final dense layer (plan index `layer`) of a model with
/// BatchNorm: one forward pass of the batch, then O(B) per candidate.
pub(crate) fn per_batch(
    inc: &mut Incremental,
    exec: &mut Executor,
    layer: usize,
    v: Visit,
) -> [f64; 3] {
    let Visit {
        batch,
        param,
        index,
        delta,
        reduction,
    } = v;
    let b = batch.len();
    let classes = exec.spec.classes;
    // The forward pass (its loss is not used: the base goes through the same arithmetic as the
    // candidates); the layer's input comes from the per-batch memo when the batch recurs.
    super::memo::forward(
        &mut inc.bn.memo,
        &inc.clock,
        exec,
        batch,
        reduction,
        layer,
        None,
    );
    let (k, j) = dense_target(exec, layer, param, index);
    let [dp, dm] = changes(exec.params.values[param][index], delta);
    let d_in = exec.plan[layer].in_len;
    let x = &exec.ws.acts[layer][..b * d_in];
    let logits = &exec.ws.acts[exec.plan.len()][..b * classes];
    let labels = &exec.ws.labels[..b];
    let chunks = b.div_ceil(CHUNK);
    let parts = grown(&mut inc.bn.parts, chunks, Default::default());
    for_chunks(b, CHUNK, parallel(b * classes * 30), parts, |r, acc| {
        *acc = Default::default();
        let mut zrow = [0.0f64; MAX_CLASSES];
        for t in r {
            let label = usize::from(labels[t]);
            let xj = j.map_or(1.0, |j| f64::from(x[t * d_in + j]));
            for (v, a) in acc.iter_mut().enumerate() {
                for (zc, &l) in zrow.iter_mut().zip(&logits[t * classes..(t + 1) * classes]) {
                    *zc = f64::from(l);
                }
                match v {
                    0 => {}
                    1 => zrow[k] += dp * xj,
                    _ => zrow[k] += dm * xj,
                }
                push_ce(a, &zrow[..classes], label);
            }
        }
    });
    let sums = combine(&parts[..chunks]);
    sums.map(|s| reduction.finish(s, b))
}
