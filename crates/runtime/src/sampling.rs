//! Choosing the next token: greedy, or sampling with temperature, top-k and
//! top-p from a seeded generator, so that a run can be repeated exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// 0 for greedy decoding; above 0, sample from `softmax(logits / t)`.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: all). Sampling only.
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities add up to `p` (1: all).
    /// Sampling only.
    pub top_p: f32,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingConfig {
    /// Whether tokens are picked greedily.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the values are in range and make sense together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be 0 (greedy) or positive");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p must be in (0, 1]");
        }
        if self.is_greedy() && (self.top_k != 0 || self.top_p != 1.0) {
            return bad("top-k and top-p apply to sampling: give a temperature above 0 too");
        }
        Ok(())
    }
}

/// Picks tokens from logits; holds the random generator of a run.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler seeded from `config.seed`.
    pub fn new(config: SamplingConfig) -> Self {
        Sampler { config, rng: ChaCha8Rng::seed_from_u64(config.seed), scratch: Vec::new() }
    }

    /// The next token for one sequence's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.is_greedy() {
            return argmax(logits);
        }
        let c = self.config;
        // Candidates by descending logit (stable: ties keep the lower id).
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (l / c.temperature, i as u32)));
        cand.sort_by(|a, b| b.0.total_cmp(&a.0));
        if c.top_k > 0 && c.top_k < cand.len() {
            // Like transformers, keep every token tied with the k-th.
            let kth = cand[c.top_k - 1].0;
            let keep = cand.iter().take_while(|x| x.0 >= kth).count();
            cand.truncate(keep);
        }
        let max = cand[0].0;
        let mut probs: Vec<f32> = cand.iter().map(|x| (x.0 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if c.top_p < 1.0 {
            // The smallest prefix whose mass reaches top_p (at least one).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (p, x) in probs.iter().zip(cand.iter()) {
            if u < *p {
                return x.1;
            }
            u -= p;
        }
        cand[probs.len() - 1].1
    }
}

/// Index of the largest value (the first, on ties; as `torch.argmax`).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 * 0.1).collect();
        let cfg = SamplingConfig { temperature: 1.0, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(cfg);
        assert_eq!(s.sample(&logits), argmax(&logits));

        let cfg = SamplingConfig { temperature: 0.8, top_k: 20, top_p: 0.9, seed: 42 };
        let run = |cfg| {
            let mut s = Sampler::new(cfg);
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(cfg), run(cfg));
        assert_ne!(run(cfg), run(SamplingConfig { seed: 43, ..cfg }));
    }

    #[test]
    fn top_p_keeps_only_the_head() {
        // One token holds almost all the mass: top-p 0.5 must always pick it.
        let mut logits = vec![0.0f32; 10];
        logits[7] = 10.0;
        let mut s = Sampler::new(SamplingConfig { temperature: 1.0, top_p: 0.5, seed: 1, ..Default::default() });
        assert!((0..100).all(|_| s.sample(&logits) == 7));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens, probabilities 0.5/0.5 at temperature 1: both appear.
        let mut s = Sampler::new(SamplingConfig { temperature: 1.0, seed: 3, ..Default::default() });
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&[1.0, 1.0])).collect();
        let ones = picks.iter().filter(|&&p| p == 1).count();
        assert!((60..140).contains(&ones), "{ones}");
    }

    #[test]
    fn invalid_configs() {
        let greedy_top_k = SamplingConfig { top_k: 5, ..Default::default() };
        assert!(greedy_top_k.validate().is_err());
        let neg = SamplingConfig { temperature: -1.0, ..Default::default() };
        assert!(neg.validate().is_err());
        let p0 = SamplingConfig { temperature: 1.0, top_p: 0.0, ..Default::default() };
        assert!(p0.validate().is_err());
    }
}
