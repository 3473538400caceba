//! The generic check of an engine's incremental RSO path ([`Network::candidate_losses`])
//! against the reference path ([`reference_candidate_losses`], three full forward passes).

use crate::{random_visits, Tol};
use rso_models::network::reference_candidate_losses;
use rso_models::{Network, Reduction};

/// One RSO visit of scalar `index` of array `param` with step `delta` on `batch`: the
/// incremental losses, then the reference losses on the same network (whose `set_weight` calls
/// exercise the engine's cache bookkeeping), compared within [`Tol::losses`]. Returns the
/// reference losses `[W, W+Δ, W−Δ]`.
///
/// # Panics
/// If the incremental path moved the weight, or a loss is not within [`Tol::losses`] (the
/// message starts with `what` and names the array, the index, Δ and the batch size); or as the
/// network's own methods panic on an out-of-range `param`, `index` or sample.
pub fn check_visit<N: Network + ?Sized>(
    net: &mut N,
    batch: &[u32],
    param: usize,
    index: usize,
    delta: f32,
    reduction: Reduction,
    what: &str,
) -> [f64; 3] {
    let w = net.weight(param, index);
    let inc = net.candidate_losses(batch, param, index, delta, reduction);
    assert_eq!(
        net.weight(param, index).to_bits(),
        w.to_bits(),
        "{what}: weight moved"
    );
    let reference = reference_candidate_losses(net, batch, param, index, delta, reduction);
    let name = &net.spec().params()[param].name;
    Tol::losses(batch.len(), reduction).assert_close(
        &format!("{what}: {name}[{index}] δ={delta} batch of {}", batch.len()),
        &inc,
        &reference,
    );
    reference
}

/// [`random_visits`] from `seed` for `steps` visits on `net`, every visit checked by
/// [`check_visit`] under `reduction`; `what` starts every failure message.
///
/// # Panics
/// As [`check_visit`].
pub fn exercise<N: Network + ?Sized>(
    net: &mut N,
    seed: u64,
    steps: usize,
    reduction: Reduction,
    what: &str,
) {
    random_visits(net, seed, steps, |net, batch, param, index, delta| {
        check_visit(net, batch, param, index, delta, reduction, what)
    });
}
