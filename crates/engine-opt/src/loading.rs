//! From a model argument (a checkpoint directory or a preset name) to a
//! model in memory, with its tokenizer when the directory has one.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::config::OptConfig;
use crate::dummy::DummyWeights;
use crate::error::{Error, Result};
use crate::memory;
use crate::model::OptModel;
use crate::progress;
use crate::tokenizer::{OptTokenizer, BOS_TOKEN_ID};
use runtime::cpu::HostLayer;

/// A model ready to run.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: OptModel,
    pub tokenizer: Option<OptTokenizer>,
    /// The checkpoint directory, if the model came from one.
    pub dir: Option<PathBuf>,
    /// A short description for reports: `opt-125m (dummy weights)`.
    pub description: String,
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A checkpoint directory.
    Dir(PathBuf),
    /// A published size, with its canonical name.
    Preset(String, OptConfig),
}

impl ModelSpec {
    /// A directory if `arg` names one, else a preset (`opt-125m`,
    /// `facebook/opt-125m`).
    pub fn parse(arg: &str) -> Result<Self> {
        let path = Path::new(arg);
        if path.is_dir() {
            return Ok(ModelSpec::Dir(path.to_path_buf()));
        }
        if let Some(config) = OptConfig::preset(arg) {
            let short = arg.rsplit('/').next().unwrap_or(arg).to_ascii_lowercase();
            let name = if short.starts_with("opt-") { short } else { format!("opt-{short}") };
            return Ok(ModelSpec::Preset(name, config));
        }
        Err(Error::UnknownModel { name: arg.to_string(), known: OptConfig::preset_names().join(", ") })
    }
}

/// The checkpoint in `dir`, once it is known to hold every tensor
/// `config` needs in the right shape and a readable type (OPT's spec,
/// [`crate::spec::model_spec`]): a mismatch is refused before anything is
/// allocated, naming the tensor, its file and what was expected.
pub fn open_checked(dir: &Path, config: &OptConfig) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(dir)?;
    crate::spec::model_spec(config, false)?.check_checkpoint(&ckpt)?;
    Ok(ckpt)
}

/// Refuses to load weights that cannot fit in the memory available.
pub fn check_fits(what: &str, need: u64) -> Result<()> {
    if let Some(avail) = memory::available_bytes() {
        if need > avail {
            return Err(Error::OutOfMemory {
                what: what.to_string(),
                need_gib: memory::gib(need),
                avail_gib: memory::gib(avail),
            });
        }
    }
    Ok(())
}

/// Loads the model `arg` names: checkpoint weights from a directory, or
/// deterministic random weights (`dummy`, seeded by `seed`) for a directory's
/// configuration or a preset.
pub fn load_model(arg: &str, dummy: bool, seed: u64) -> Result<LoadedModel> {
    load_model_with(arg, dummy, seed, None)
}

/// [`load_model`], with the decoder layers from `offload.0` on written to
/// the disk tier `offload.1` as they load (the CPU engine's weights on
/// disk, [`crate::cpu_offload`]); only the resident ones stay in memory.
pub fn load_model_with(
    arg: &str,
    dummy: bool,
    seed: u64,
    offload: Option<(usize, &mut crate::cpu_offload::DiskLayers)>,
) -> Result<LoadedModel> {
    let spec = ModelSpec::parse(arg)?;
    let (config, dir, name) = match spec {
        ModelSpec::Dir(dir) => {
            let config = OptConfig::from_dir(&dir)?;
            let name = dir.display().to_string();
            (config, Some(dir), name)
        }
        ModelSpec::Preset(name, config) => {
            if !dummy {
                return Err(Error::InvalidArgument(format!(
                    "{name} is a preset: give a checkpoint directory, or --dummy for random weights"
                )));
            }
            (config, None, name)
        }
    };
    let layers = config.num_hidden_layers;
    let (resident, mut disk) = match offload {
        Some((resident, disk)) => (resident, Some(disk)),
        None => (layers, None),
    };
    let mut away = |i: usize, layer: HostLayer| match disk.as_mut() {
        Some(d) => Ok(d.put(i, &layer)?),
        None => Ok(()),
    };
    let in_memory = config.weight_bytes() - (layers - resident.min(layers)) as u64 * config.layer_param_count() * 2;
    check_fits(&format!("{name}'s weights"), in_memory)?;
    let pb = progress::bar(OptModel::tensor_count(&config), "loading");
    let (model, description) = if dummy {
        let src = DummyWeights::new(seed);
        (
            OptModel::load_streaming(config, &src, &pb, resident, &mut away)?,
            format!("{name} (dummy weights, seed {seed})"),
        )
    } else {
        let dir_ref = dir.as_deref().ok_or_else(|| Error::InvalidArgument("no checkpoint directory".into()))?;
        let src = open_checked(dir_ref, &config)?;
        (OptModel::load_streaming(config, &src, &pb, resident, &mut away)?, name)
    };
    pb.finish_and_clear();
    let tokenizer = match &dir {
        Some(d) => OptTokenizer::from_dir(d, model.config.bos_token_id.unwrap_or(BOS_TOKEN_ID))?,
        None => None,
    };
    Ok(LoadedModel { model, tokenizer, dir, description })
}
