//! Linear layers, elementwise activations and embedding lookup.

use gemm::Parallelism;
use rayon::prelude::*;

use super::tensor::Tensor;
use crate::error::{check_len, mul, Error, Result};

/// An activation fused into a linear layer's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    /// `x · sigmoid(x)`.
    Silu,
}

impl Activation {
    fn apply(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::Silu => silu(v),
        }
    }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `dst (m × n, row stride n) = lhs (m × k, row-major) · rhsᵀ` where `rhs`
/// is `n × k` row-major, in f32 on the calling thread.
///
/// # Panics
/// If the slices are shorter than the dimensions say (callers size them).
pub(crate) fn matmul_nt(dst: &mut [f32], lhs: &[f32], rhs: &[f32], m: usize, n: usize, k: usize) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= n * k, "matmul_nt: slices too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    // SAFETY: `dst` holds m·n values written at (r, c) → r·n + c; `lhs` is
    // read at (r, i) → r·k + i (m·k values); `rhs`, read as the k × n matrix
    // rhsᵀ, at (i, c) → c·k + i (n·k values): every index is inside its
    // slice by the assertion above; `dst` is borrowed mutably, so it aliases
    // neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, all row-major, in f32 on the
/// calling thread.
///
/// # Panics
/// If the slices are shorter than the dimensions say (callers size them).
pub(crate) fn matmul_nn(dst: &mut [f32], lhs: &[f32], rhs: &[f32], m: usize, n: usize, k: usize) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n, "matmul_nn: slices too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    // SAFETY: as in `matmul_nt`, with `rhs` read at (i, c) → i·n + c, inside
    // its k·n values by the assertion above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Weight rows converted to f32 and multiplied together, so a tile stays in
/// cache between its conversion and its use: narrow tiles for the few rows
/// of a decoding step, wider ones for a prefill.
const SMALL_TILE_ROWS: usize = 16;
const LARGE_TILE_ROWS: usize = 128;
const LARGE_M: usize = 32;

/// Activation rows multiplied per pass over the weights, which bounds the
/// per-tile results held at once.
const ROW_BLOCK: usize = 512;

/// `y = act(x · Wᵀ + bias)`: `x` is `rows × k` f32, `weight` an `n × k`
/// tensor (a PyTorch `Linear` weight) in any stored type, `bias` `[n]`; the
/// result is `rows × n` f32.
///
/// Threads each convert a tile of weight rows to f32 and multiply the
/// activations with it, so the weights stay in their stored type and the
/// arithmetic (accumulation included) is f32.
pub fn linear(x: &[f32], rows: usize, weight: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Vec<f32>> {
    let (n, k) = weight.matrix("linear", "the weight")?;
    check_len("linear", "the input", x.len(), mul(rows, k, "linear input")?)?;
    let bias = bias.map(|b| b.vector("linear", "the bias", n)).transpose()?;
    let mut out = vec![0.0f32; mul(rows, n, "linear output")?];
    if rows == 0 || n == 0 {
        return Ok(out);
    }
    let tile = if rows >= LARGE_M { LARGE_TILE_ROWS } else { SMALL_TILE_ROWS }.min(n);
    for (xb, ob) in x.chunks(ROW_BLOCK * k.max(1)).zip(out.chunks_mut(ROW_BLOCK * n)) {
        let m = ob.len() / n;
        let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(tile))
            .into_par_iter()
            .map_init(Vec::new, |wbuf: &mut Vec<f32>, t| {
                let n0 = t * tile;
                let nt = tile.min(n - n0);
                wbuf.resize(nt * k, 0.0);
                weight.storage().read_f32(n0 * k, wbuf);
                let mut part = vec![0.0f32; m * nt];
                matmul_nt(&mut part, xb, wbuf, m, nt, k);
                (n0, part)
            })
            .collect();
        for (n0, part) in parts {
            let nt = part.len() / m;
            for (dst, src) in ob.chunks_mut(n).zip(part.chunks(nt)) {
                dst[n0..n0 + nt].copy_from_slice(src);
            }
        }
    }
    if bias.is_some() || act != Activation::None {
        out.par_chunks_mut(n).for_each(|row| {
            for (c, o) in row.iter_mut().enumerate() {
                let v = *o + bias.as_ref().map_or(0.0, |b| b[c]);
                *o = act.apply(v);
            }
        });
    }
    Ok(out)
}

/// `gate = silu(gate) · up`, elementwise (the SwiGLU MLP's product).
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) -> Result<()> {
    check_len("silu_mul", "up", up.len(), gate.len())?;
    gate.par_chunks_mut(1 << 14).zip(up.par_chunks(1 << 14)).for_each(|(g, u)| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = silu(*g) * u;
        }
    });
    Ok(())
}

/// `max(x, 0)` in place.
pub fn relu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
}

/// `acc += x`, elementwise (a residual connection).
pub fn add_inplace(acc: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("add", "the addend", x.len(), acc.len())?;
    acc.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(a, b)| {
        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    });
    Ok(())
}

/// The rows of `table` (`vocab × dim`) for `ids`, as f32 (`ids.len() × dim`).
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Vec<f32>> {
    let (vocab, dim) = table.matrix("embedding", "the table")?;
    let mut out = vec![0.0f32; mul(ids.len(), dim, "embedding output")?];
    for (&id, row) in ids.iter().zip(out.chunks_mut(dim.max(1))) {
        let i = id as usize;
        if i >= vocab {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
        table.storage().read_f32(i * dim, row);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tensor::DType;

    fn pseudo(i: usize) -> f32 {
        ((i * 7919 % 1013) as f32 / 1013.0) - 0.5
    }

    #[test]
    fn linear_matches_a_naive_product_in_every_dtype() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for &(rows, n, k) in &[(1, 5, 3), (3, 300, 70), (40, 130, 64), (600, 20, 8)] {
                let x: Vec<f32> = (0..rows * k).map(pseudo).collect();
                let w = Tensor::from_f32(dtype, vec![n, k], &(0..n * k).map(|i| pseudo(i + 11)).collect::<Vec<_>>())
                    .unwrap();
                let b = Tensor::from_f32(dtype, vec![n], &(0..n).map(|i| pseudo(i + 5)).collect::<Vec<_>>()).unwrap();
                let (wf, bf) = (w.to_f32(), b.to_f32());
                for act in [Activation::None, Activation::Relu, Activation::Silu] {
                    let got = linear(&x, rows, &w, Some(&b), act).unwrap();
                    for r in 0..rows {
                        for c in 0..n {
                            let s: f64 = (0..k).map(|i| x[r * k + i] as f64 * wf[c * k + i] as f64).sum();
                            let v = s as f32 + bf[c];
                            let want = match act {
                                Activation::None => v,
                                Activation::Relu => v.max(0.0),
                                Activation::Silu => v / (1.0 + (-v).exp()),
                            };
                            let g = got[r * n + c];
                            assert!((g - want).abs() < 1e-4, "{dtype} {rows}x{n}x{k} {act:?}: {g} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn linear_refuses_mismatched_sizes() {
        let w = Tensor::from_f32(DType::F32, vec![2, 3], &[0.0; 6]).unwrap();
        let err = linear(&[0.0; 5], 2, &w, None, Activation::None).unwrap_err();
        assert!(err.to_string().contains("expected 6"), "{err}");
        let b = Tensor::from_f32(DType::F32, vec![3], &[0.0; 3]).unwrap();
        let err = linear(&[0.0; 6], 2, &w, Some(&b), Activation::None).unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
    }

    #[test]
    fn swiglu_relu_and_embedding() {
        let mut g = vec![0.0, 1.0, -2.0];
        silu_mul_inplace(&mut g, &[5.0, 2.0, 3.0]).unwrap();
        let s = |v: f32| v / (1.0 + (-v).exp());
        assert_eq!(g, vec![0.0, 2.0 * s(1.0), 3.0 * s(-2.0)]);
        let mut r = vec![-1.0, 0.5];
        relu_inplace(&mut r);
        assert_eq!(r, vec![0.0, 0.5]);
        let table = Tensor::from_f32(DType::BF16, vec![3, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(embedding(&table, &[2, 0]).unwrap(), vec![4.0, 5.0, 0.0, 1.0]);
        let err = embedding(&table, &[3]).unwrap_err();
        assert!(matches!(err, Error::TokenOutOfRange { id: 3, vocab: 3 }), "{err}");
    }
}
