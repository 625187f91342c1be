//! Checks that weights and logits are finite numbers.
//!
//! A checkpoint stored in f32 or bf16 may hold values that do not fit f16,
//! the type weights are kept in (|x| > 65504 becomes infinity), or NaNs
//! from a broken training run or a corrupt file. Either makes every output
//! garbage without any other sign, so the loaders check each tensor as it
//! arrives ([`check_weights`]) and the engines check the logits they sample
//! from ([`check_logits`]).

use half::f16;

use crate::error::{Error, Result};

/// The largest finite f16 value.
const F16_MAX: f32 = 65504.0;

/// Refuses the tensor `name` if any of its f16 values is infinite or NaN,
/// naming the tensor, how many values are bad and the first one.
pub fn check_weights(name: &str, values: &[f16]) -> Result<()> {
    // Exponent bits all ones: infinity or NaN.
    let bad = |v: &f16| v.to_bits() & 0x7c00 == 0x7c00;
    let Some(first) = values.iter().position(bad) else {
        return Ok(());
    };
    let count = values[first..].iter().filter(|v| bad(v)).count();
    let value = values[first];
    let reason = if value.is_nan() {
        "NaN (the checkpoint holds NaNs: is the file corrupt, or did training diverge?)".to_string()
    } else {
        format!(
            "{} after conversion to f16, which holds at most ±{F16_MAX}: the checkpoint's values are too large \
             for the f16 weights tierlm computes with (rescale them, or use a checkpoint made for f16)",
            f32::from(value)
        )
    };
    Err(Error::NonFinite(format!(
        "tensor {name} has {count} value{} that {} not finite; the first, at index {first}, is {reason}",
        if count == 1 { "" } else { "s" },
        if count == 1 { "is" } else { "are" },
    )))
}

/// Refuses logits (`rows × vocab`, row-major) that hold NaN or infinity,
/// naming the sequence of the batch whose row does: sampling from them
/// would give garbage.
pub fn check_logits(logits: &[f32], vocab: usize) -> Result<()> {
    let Some(i) = logits.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    Err(Error::NonFinite(format!(
        "the model's logits for sequence {} of the batch hold {} (token {}): the weights or activations \
         overflow, so the output would be garbage; check the checkpoint's values",
        i / vocab.max(1),
        logits[i],
        i % vocab.max(1)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_weights_pass_and_others_are_named() {
        let ok: Vec<f16> = [0.0f32, -1.5, 65504.0, -65504.0, 1e-8].iter().map(|&x| f16::from_f32(x)).collect();
        check_weights("w", &ok).unwrap();
        let big: Vec<f16> = [1.0f32, 1e6, 2.0, -1e6].iter().map(|&x| f16::from_f32(x)).collect();
        let err = check_weights("decoder.layers.0.fc1.weight", &big).unwrap_err().to_string();
        assert!(err.contains("tensor decoder.layers.0.fc1.weight has 2 values that are not finite"), "{err}");
        assert!(err.contains("index 1, is inf after conversion to f16"), "{err}");
        let nan = [f16::ONE, f16::NAN];
        let err = check_weights("b", &nan).unwrap_err().to_string();
        assert!(err.contains("1 value that is not finite; the first, at index 1, is NaN"), "{err}");
    }

    #[test]
    fn logits_name_the_sequence() {
        check_logits(&[0.0, 1.0, -3e38, 3e38], 2).unwrap();
        let err = check_logits(&[0.0, 1.0, 2.0, f32::NAN], 2).unwrap_err().to_string();
        assert!(err.contains("sequence 1 of the batch hold NaN (token 1)"), "{err}");
        let err = check_logits(&[f32::NEG_INFINITY], 4).unwrap_err().to_string();
        assert!(err.contains("sequence 0 of the batch hold -inf (token 0)"), "{err}");
    }
}
