//! # runtime: what every model family runs on
//!
//! This room holds the parts of tierlm that know no model family: the tiers
//! of a run ([`tiers::Tiers`], built once per process and shared by the
//! weights, the KV cache and the activations), what each tier held at its
//! peak ([`TierPeaks`]), stopping cleanly on Ctrl-C ([`interrupt`]) and
//! progress bars ([`progress`]).
//!
//! It may use the tier crates (`tier-api`, `tier-host`, `tier-disk`,
//! `tier-cuda`) through their public types; it names no model, no tensor of
//! a model and no model configuration, and nothing here calls `cudarc`. A
//! model family's crate (`engine-opt`) and the `tierlm` command depend on
//! it; it depends on neither.
//!
//! Every failure here is a [`Error`].

mod error;
pub mod interrupt;
pub mod progress;
pub mod tiers;

pub use error::{Error, Result};
pub use tiers::{TierPeaks, Tiers};
