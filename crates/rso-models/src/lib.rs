//! Models for the rso workspace, defined once and instantiated by every engine.
//!
//! - [`spec`]: a model is a [`ModelSpec`], a list of [`Layer`]s; [`ModelSpec::params`] gives the
//!   canonical parameter order, names and shapes shared by all engines and by checkpoints.
//! - [`params`]: [`Params`], the host copy of a model's parameters, and its safetensors I/O.
//! - [`init`]: the two presets' initialisers.
//! - [`network`]: the [`Network`] trait, the seam between optimizers and engines.
//! - [`cost`]: multiply-adds of an RSO round (reference and incremental floor), for the benches.

#![forbid(unsafe_code)]

pub mod cost;
pub mod init;
pub mod network;
pub mod params;
pub mod spec;

pub use init::{init_params, Init};
pub use network::{BackendError, Eval, Network, Reduction, SplitKind};
pub use params::{ParamError, Params};
pub use spec::{Layer, ModelKind, ModelSpec, ParamKind, ParamSpec};

/// The two configurations of the algorithm (DESIGN §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// What the reference notebook (Julia/Flux) ran.
    Seed,
    /// What the paper authors' released code runs.
    Paper,
}

impl Preset {
    /// The preset's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Seed => "seed",
            Preset::Paper => "paper",
        }
    }

    /// The preset's initialiser.
    pub fn init(self) -> Init {
        match self {
            Preset::Seed => Init::GlorotUniform,
            Preset::Paper => Init::He,
        }
    }

    /// The preset's input normalisation.
    pub fn normalization(self) -> rso_data::Normalization {
        match self {
            Preset::Seed => rso_data::Normalization::UnitRange,
            Preset::Paper => rso_data::Normalization::CenterTrainMean,
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seed" => Ok(Preset::Seed),
            "paper" => Ok(Preset::Paper),
            other => Err(format!("unknown preset '{other}' (expected seed or paper)")),
        }
    }
}
