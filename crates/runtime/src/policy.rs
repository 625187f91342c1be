//! FlexGen's placement policy (its `Policy`): batch sizes, the
//! GPU/CPU/disk split of weights, KV cache and activations, and the flags of
//! the tiered engine. The CPU engine accepts only the policies it can honour
//! and names what needs the GPU engine or the tiered engine.

use crate::error::{Error, Result};

/// A placement policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub gpu_batch_size: usize,
    pub num_gpu_batches: usize,
    /// Percent of weights on the GPU and on the CPU (the rest on disk).
    pub w_gpu_percent: f64,
    pub w_cpu_percent: f64,
    /// Percent of the KV cache on the GPU and on the CPU.
    pub cache_gpu_percent: f64,
    pub cache_cpu_percent: f64,
    /// Percent of activations on the GPU and on the CPU.
    pub act_gpu_percent: f64,
    pub act_cpu_percent: f64,
    /// Copies overlap compute. Always true: both engines read ahead (the
    /// GPU engine streams two layers ahead and moves the next batch's cache
    /// beside the compute, the CPU engine reads its next disk layer ahead);
    /// there is no sequential mode, and `--overlap false` is refused.
    pub overlap: bool,
    pub sep_layer: bool,
    pub pin_weight: bool,
    pub cpu_cache_compute: bool,
    pub attn_sparsity: f64,
    pub compress_weight: bool,
    pub compress_cache: bool,
}

impl Default for Policy {
    /// Everything on the CPU, one batch of one, no GPU-engine flag.
    fn default() -> Self {
        Policy {
            gpu_batch_size: 1,
            num_gpu_batches: 1,
            w_gpu_percent: 0.0,
            w_cpu_percent: 100.0,
            cache_gpu_percent: 0.0,
            cache_cpu_percent: 100.0,
            act_gpu_percent: 0.0,
            act_cpu_percent: 100.0,
            overlap: true,
            // FlexGen's default.
            sep_layer: true,
            pin_weight: true,
            cpu_cache_compute: false,
            attn_sparsity: 1.0,
            compress_weight: false,
            compress_cache: false,
        }
    }
}

impl Policy {
    /// Sets the six percentages from FlexGen's `--percent` order: weights
    /// GPU, CPU; cache GPU, CPU; activations GPU, CPU.
    pub fn with_percent(mut self, percent: &[f64]) -> Result<Self> {
        let [wg, wc, cg, cc, ag, ac] = percent else {
            return Err(Error::InvalidArgument(format!(
                "--percent takes six numbers (weights GPU CPU, cache GPU CPU, activations GPU CPU), got {}",
                percent.len()
            )));
        };
        (
            self.w_gpu_percent,
            self.w_cpu_percent,
            self.cache_gpu_percent,
            self.cache_cpu_percent,
            self.act_gpu_percent,
            self.act_cpu_percent,
        ) = (*wg, *wc, *cg, *cc, *ag, *ac);
        Ok(self)
    }

    /// The six percentages in FlexGen's `--percent` order.
    pub fn percent(&self) -> [f64; 6] {
        [
            self.w_gpu_percent,
            self.w_cpu_percent,
            self.cache_gpu_percent,
            self.cache_cpu_percent,
            self.act_gpu_percent,
            self.act_cpu_percent,
        ]
    }

    /// Prompts in one block: `gpu_batch_size × num_gpu_batches`.
    pub fn block_size(&self) -> usize {
        self.gpu_batch_size.saturating_mul(self.num_gpu_batches)
    }

    /// Percent on disk for weights, cache and activations.
    pub fn disk_percents(&self) -> [f64; 3] {
        [
            100.0 - self.w_gpu_percent - self.w_cpu_percent,
            100.0 - self.cache_gpu_percent - self.cache_cpu_percent,
            100.0 - self.act_gpu_percent - self.act_cpu_percent,
        ]
    }

    fn pairs(&self) -> [(&'static str, f64, f64); 3] {
        [
            ("weights", self.w_gpu_percent, self.w_cpu_percent),
            ("KV cache", self.cache_gpu_percent, self.cache_cpu_percent),
            ("activations", self.act_gpu_percent, self.act_cpu_percent),
        ]
    }

    /// Checks the numbers are in range (any engine).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.gpu_batch_size == 0 {
            return bad("--gpu-batch-size must be at least 1".to_string());
        }
        if self.num_gpu_batches == 0 {
            return bad("--num-gpu-batches must be at least 1".to_string());
        }
        for (what, gpu, cpu) in self.pairs() {
            for v in [gpu, cpu] {
                if !(0.0..=100.0).contains(&v) {
                    return bad(format!("--percent: {what} share {v} is outside 0..=100"));
                }
            }
            if gpu + cpu > 100.0 {
                return bad(format!("--percent: {what} GPU {gpu} + CPU {cpu} = {} is over 100", gpu + cpu));
            }
        }
        let [_, _, act_disk] = self.disk_percents();
        if ![self.act_gpu_percent, self.act_cpu_percent, act_disk].contains(&100.0) {
            return bad("--percent: activations must sit on one tier (100 on GPU, CPU or disk)".to_string());
        }
        if !(self.attn_sparsity > 0.0 && self.attn_sparsity <= 1.0) {
            return bad(format!("--attn-sparsity {} is outside (0, 1]", self.attn_sparsity));
        }
        Ok(())
    }

    /// Checks the policy can run on the CPU engine (everything in host
    /// memory, no GPU-engine feature).
    pub fn check_cpu_engine(&self) -> Result<()> {
        self.validate()?;
        // The GPU engine runs weights and KV cache on any tiers, the
        // CPU's attention and 4-bit weights; computing on the CPU over disk
        // tiers is the tiered engine's, not built yet.
        for (what, gpu, _) in self.pairs() {
            if gpu > 0.0 {
                return Err(Error::NeedsGpuEngine(format!("putting {gpu}% of the {what} on the GPU")));
            }
        }
        for ((what, _, _), disk) in self.pairs().iter().zip(self.disk_percents()) {
            // Weights on disk stream through the CPU engine too
            // (`crate::cpu_offload`).
            if disk > 0.0 && *what == "activations" {
                return Err(Error::NeedsTieredEngine(format!("putting {disk}% of the {what} on disk")));
            }
        }
        let gpu_flags = [
            (self.compress_weight, "--compress-weight"),
            (self.attn_sparsity < 1.0, "--attn-sparsity below 1"),
            (self.compress_cache, "--compress-cache"),
        ];
        if let Some((_, flag)) = gpu_flags.iter().find(|f| f.0) {
            return Err(Error::NeedsGpuEngine((*flag).to_string()));
        }
        // --sep-layer changes only when a streamed layer's MLP weights are
        // waited for; the CPU engine reads its disk layers whole either way.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(p: &[f64]) -> Result<Policy> {
        Policy::default().with_percent(p)
    }

    #[test]
    fn percent_validation() {
        assert!(with(&[0.0, 100.0, 0.0, 100.0, 0.0, 100.0]).unwrap().check_cpu_engine().is_ok());
        assert!(with(&[0.0, 100.0]).is_err());
        let p = with(&[1.0, 2.0, 3.0, 4.0, 5.0, 95.0]).unwrap();
        assert_eq!(p.percent(), [1.0, 2.0, 3.0, 4.0, 5.0, 95.0], "round-trips in --percent order");
        let over = with(&[60.0, 50.0, 0.0, 100.0, 0.0, 100.0]).unwrap().validate().unwrap_err();
        assert!(over.to_string().contains("over 100"), "{over}");
        let neg = with(&[-1.0, 100.0, 0.0, 100.0, 0.0, 100.0]).unwrap().validate().unwrap_err();
        assert!(neg.to_string().contains("outside"), "{neg}");
        let split = with(&[0.0, 100.0, 0.0, 100.0, 50.0, 50.0]).unwrap().validate().unwrap_err();
        assert!(split.to_string().contains("one tier"), "{split}");
    }

    #[test]
    fn gpu_shares_and_flags_need_the_gpu_engine() {
        let gpu = with(&[100.0, 0.0, 100.0, 0.0, 100.0, 0.0]).unwrap().check_cpu_engine().unwrap_err();
        assert!(matches!(gpu, Error::NeedsGpuEngine(_)), "{gpu}");
        // Weights and the KV cache on disk run on the CPU engine too;
        // activations on disk do not.
        assert!(with(&[0.0, 75.0, 0.0, 100.0, 0.0, 100.0]).unwrap().check_cpu_engine().is_ok());
        assert!(with(&[0.0, 75.0, 0.0, 60.0, 0.0, 100.0]).unwrap().check_cpu_engine().is_ok());
        let disk = with(&[0.0, 100.0, 0.0, 100.0, 0.0, 0.0]).unwrap().check_cpu_engine().unwrap_err();
        assert!(matches!(disk, Error::NeedsTieredEngine(_)), "{disk}");
        assert!(disk.to_string().contains("100% of the activations on disk"), "{disk}");
        // Both engines overlap their copies with compute.
        assert!(Policy { overlap: true, ..Policy::default() }.check_cpu_engine().is_ok());
        let zero = Policy { gpu_batch_size: 0, ..Policy::default() };
        assert!(zero.validate().is_err());
    }
}
