//! `--policy auto` for `bench` and `generate`: the search of
//! `runtime::search` with the flags the user gave pinned, the budgets of
//! this machine and its calibrated rates (measured on first use). Where no
//! GPU engine can run, the CPU engine keeps its default placement.

use engine_opt::{Error, Result};
use runtime::plan::Workload;
use runtime::search::{search, Choice, CompressMode, Pins, Request};

use super::bench::BenchArgs;
use super::generate::GenerateArgs;
use super::plan::{budgets, check_family_pins, host_kind, planned_model};

/// How a run's placement is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The flags as given (`--policy manual`, or `--percent` given).
    Manual,
    /// The search; `asked` when `--policy auto` was given, not merely the
    /// default (only then does a machine without a GPU say it ignored it).
    Auto { asked: bool },
}

/// `--policy` as given (if at all) and whether `--percent` was: the search
/// is the default unless the user placed the run by hand.
pub fn mode(policy: Option<&str>, percent_given: bool) -> Mode {
    match policy {
        Some("manual") => Mode::Manual,
        Some(_) => Mode::Auto { asked: true },
        None if percent_given => Mode::Manual,
        None => Mode::Auto { asked: false },
    }
}

/// Refuses the flags that only the search reads when the run is manual.
pub fn check_auto_only(mode: Mode, flags: &[(bool, &str)]) -> Result<()> {
    if mode == Mode::Manual {
        if let Some((_, flag)) = flags.iter().find(|(given, _)| *given) {
            return Err(Error::InvalidArgument(format!(
                "{flag} is read by the policy search only; drop --percent/--policy manual to let it choose, or drop {flag}"
            )));
        }
    }
    Ok(())
}

/// What a machine without a GPU says about an asked-for `--policy auto`.
pub fn no_gpu_note(mode: Mode) {
    if mode == (Mode::Auto { asked: true }) {
        eprintln!(
            "note: --policy auto: no GPU here ({}); the CPU engine runs with everything in host memory",
            tier_cuda::probe_message()
        );
    }
}

fn percent_pin(p: &Option<Vec<f64>>) -> Result<Option<[f64; 6]>> {
    match p {
        None => Ok(None),
        Some(v) => <[f64; 6]>::try_from(v.as_slice())
            .map(Some)
            .map_err(|_| Error::InvalidArgument(format!("--percent takes six numbers, got {}", v.len()))),
    }
}

/// The compression the search may use: `--compress` (default none), or
/// exactly what `--compress-weight` and `--compress-cache` ask for when
/// either is given (they pin it, as any policy flag does); a `--compress`
/// other than none or auto that disagrees with them is refused.
fn compress_mode(compress: CompressMode, weight: bool, cache: bool) -> Result<CompressMode> {
    if !weight && !cache {
        return Ok(compress);
    }
    let pinned = CompressMode::of(weight, cache);
    match compress {
        CompressMode::None | CompressMode::Auto => Ok(pinned),
        m if m == pinned => Ok(pinned),
        m => Err(Error::InvalidArgument(format!(
            "--compress {} disagrees with{}{}: give one or the other",
            m.flag(),
            if weight { " --compress-weight" } else { "" },
            if cache { " --compress-cache" } else { "" },
        ))),
    }
}

/// What the search needs beside the pins.
struct Ask<'a> {
    model: &'a str,
    work: Workload,
    prompts: usize,
    gpu_mem: Option<u64>,
    host_mem: Option<u64>,
    offload_dir: Option<&'a std::path::Path>,
    calibration: Option<&'a std::path::Path>,
    objective: runtime::search::Objective,
    compress: CompressMode,
}

fn choose(ask: Ask<'_>, pins: Pins) -> Result<Option<Choice>> {
    if !engine_opt::gpu::available() {
        return Ok(None);
    }
    let planned = planned_model(ask.model)?;
    check_family_pins(&planned, pins.percent)?;
    // A family whose GPU engine fixes the activations' tier (Llama's: the
    // GPU) has it pinned; the cache, its compression and CPU attention are
    // searched as for OPT.
    let pins = Pins { act: planned.act, ..pins };
    let spec = planned.spec;
    let dir = ask.offload_dir.map(std::path::Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
    let cap = budgets(ask.gpu_mem, ask.host_mem, &dir)?;
    let rates = super::calibrate::load(&dir, ask.calibration, false)?.calibration.rates;
    let req = Request {
        spec: &spec,
        work: ask.work,
        prompts: ask.prompts,
        cap,
        rates,
        objective: ask.objective,
        compress: ask.compress,
        host: host_kind(None)?,
        pins,
    };
    let out = search(&req)?;
    if let Some(n) = &out.note {
        eprintln!("note: {n}");
    }
    eprintln!("policy (auto): {}; predicted {}", out.best.flags(), super::plan::prediction_line(&out.best.prediction));
    Ok(Some(out.best))
}

/// The policy `bench --policy auto` runs (`None` where there is no GPU):
/// the one block of `--num-prompts` prompts (default `--gpu-batch-size` ×
/// `--num-gpu-batches`), every policy flag given pinned.
pub fn for_bench(args: &BenchArgs) -> Result<Option<Choice>> {
    for (given, flag) in [(args.gpu_batch_size, "--gpu-batch-size"), (args.num_gpu_batches, "--num-gpu-batches")] {
        if given == Some(0) {
            return Err(Error::InvalidArgument(format!("{flag} must be at least 1")));
        }
    }
    let given_block = args.gpu_batch_size.unwrap_or(4).checked_mul(args.num_gpu_batches.unwrap_or(1));
    let prompts = match (args.num_prompts, given_block) {
        (Some(n), _) => n,
        (None, Some(b)) => b,
        (None, None) => return Err(Error::InvalidArgument("--gpu-batch-size × --num-gpu-batches overflows".into())),
    };
    super::bench::check_block(prompts, 1)?;
    if prompts == 0 {
        return Err(Error::InvalidArgument("--num-prompts must be at least 1".into()));
    }
    let pins = Pins {
        gpu_batch_size: args.gpu_batch_size,
        num_gpu_batches: args.num_gpu_batches,
        percent: percent_pin(&args.percent)?,
        pin_weight: args.pin_weight,
        cpu_cache_compute: args.cpu_cache_compute.then_some(true),
        sep_layer: args.sep_layer,
        act: None,
    };
    let ask = Ask {
        model: &args.model,
        work: Workload { prompt_len: args.prompt_len, gen_len: args.gen_len },
        prompts,
        gpu_mem: args.gpu_mem,
        host_mem: args.host_mem,
        offload_dir: args.offload_dir.as_deref(),
        calibration: args.calibration.as_deref(),
        objective: args.objective,
        compress: compress_mode(args.compress, args.compress_weight, args.compress_cache)?,
    };
    let Some(mut choice) = choose(ask, pins)? else {
        return Ok(None);
    };
    if choice.policy.block_size() != prompts {
        // The search's blocks divide the prompts; each block runs alike, so
        // bench measures one of them.
        eprintln!(
            "note: --policy auto runs {prompts} prompts in blocks of {}; bench measures one block",
            choice.policy.block_size()
        );
    }
    // Flags the search does not choose come from the command line.
    choice.policy.attn_sparsity = args.attn_sparsity;
    choice.policy.overlap = true;
    Ok(Some(choice))
}

/// The policy `generate --policy auto` runs (`None` where there is no GPU):
/// batches of `--gpu-batch-size` one at a time, so the batch is pinned;
/// the prompt length planned for is the longest input's bytes (a bound on
/// its tokens).
pub fn for_generate(args: &GenerateArgs, inputs: &[super::generate::Input]) -> Result<Option<Choice>> {
    let longest = inputs
        .iter()
        .map(|i| match i {
            super::generate::Input::Ids(ids) => ids.len(),
            super::generate::Input::Text(t) => t.len().saturating_add(1),
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let pins = Pins {
        gpu_batch_size: Some(args.gpu_batch_size),
        num_gpu_batches: Some(1),
        percent: percent_pin(&args.percent)?,
        pin_weight: args.pin_weight,
        cpu_cache_compute: args.cpu_cache_compute.then_some(true),
        sep_layer: None,
        act: None,
    };
    let ask = Ask {
        model: &args.model,
        work: Workload { prompt_len: longest, gen_len: args.max_new_tokens.max(1) },
        prompts: args.gpu_batch_size.min(inputs.len().max(1)),
        gpu_mem: args.gpu_mem,
        host_mem: args.host_mem,
        offload_dir: args.offload_dir.as_deref(),
        calibration: args.calibration.as_deref(),
        objective: args.objective,
        compress: compress_mode(args.compress, args.compress_weight, args.compress_cache)?,
    };
    let Some(mut choice) = choose(ask, pins)? else {
        return Ok(None);
    };
    choice.policy.attn_sparsity = args.attn_sparsity;
    Ok(Some(choice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compression_flags_pin_what_the_search_may_use() {
        use CompressMode::*;
        // No flag: --compress as given.
        assert_eq!(compress_mode(Auto, false, false).unwrap(), Auto);
        assert_eq!(compress_mode(None, false, false).unwrap(), None);
        // A flag pins exactly its compression, over the default or auto.
        assert_eq!(compress_mode(None, true, false).unwrap(), Weight);
        assert_eq!(compress_mode(Auto, false, true).unwrap(), Cache);
        assert_eq!(compress_mode(None, true, true).unwrap(), Both);
        assert_eq!(compress_mode(Weight, true, false).unwrap(), Weight);
        // A --compress that disagrees is refused, naming both.
        let e = compress_mode(Cache, true, false).unwrap_err().to_string();
        assert!(e.contains("--compress cache") && e.contains("--compress-weight"), "{e}");
    }
}
