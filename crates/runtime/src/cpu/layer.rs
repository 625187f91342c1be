//! One layer's weights in host memory, as the spec lists them.

use ops::cpu::{DType, Tensor};

use crate::error::{Error, Result};
use crate::spec::{ModelSpec, TensorSpec};

/// The op layer's CPU type for a spec's held type (the CPU holds floats
/// only).
pub fn cpu_dtype(d: tier_api::DType) -> Result<DType> {
    match d {
        tier_api::DType::F16 => Ok(DType::F16),
        tier_api::DType::BF16 => Ok(DType::BF16),
        tier_api::DType::F32 => Ok(DType::F32),
        other => Err(Error::Spec(format!("the CPU engine holds weights as floats, not {other:?}"))),
    }
}

/// One layer's weights: the tensors of the spec's layer, in its order, by
/// the spec's names (relative to the layer's prefix).
#[derive(Debug, Clone, PartialEq)]
pub struct HostLayer {
    tensors: Vec<(String, Tensor)>,
}

impl HostLayer {
    /// A layer of these tensors, checked against `spec`'s layer: the same
    /// names in the same order, each of its shape and held type.
    pub fn new(spec: &ModelSpec, tensors: Vec<(String, Tensor)>) -> Result<HostLayer> {
        if tensors.len() != spec.layer.len() {
            return Err(Error::Spec(format!(
                "a layer of {} tensors, but the spec lists {}",
                tensors.len(),
                spec.layer.len()
            )));
        }
        for ((name, t), ts) in tensors.iter().zip(&spec.layer) {
            if *name != ts.name || t.shape() != ts.shape.as_slice() || t.dtype() != cpu_dtype(ts.dtype)? {
                return Err(Error::Spec(format!(
                    "layer tensor {name} {:?} {}, but the spec lists {} {:?} {:?}",
                    t.shape(),
                    t.dtype(),
                    ts.name,
                    ts.shape,
                    ts.dtype
                )));
            }
        }
        Ok(HostLayer { tensors })
    }

    /// Layer `j` of `spec` from a checkpoint's tensors: `get(name, shape)`
    /// returns the tensor of that full name (the layer's prefix included)
    /// in any float type; a tensor the spec makes of several (q, k and v
    /// stacked) is their concatenation along the first dimension; each is
    /// converted to the type the spec holds it in.
    pub fn assemble(
        spec: &ModelSpec,
        j: usize,
        mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<HostLayer> {
        let mut tensors = Vec::with_capacity(spec.layer.len());
        for ts in &spec.layer {
            let dtype = cpu_dtype(ts.dtype)?;
            let parts = ts
                .sources()
                .iter()
                .map(|src| get(&spec.layer_name(j, &src.name), &src.shape))
                .collect::<Result<Vec<_>>>()?;
            tensors.push((ts.name.clone(), concat_rows(ts, parts, dtype)?));
        }
        HostLayer::new(spec, tensors)
    }

    /// The tensor the spec names `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Spec(format!("the layer holds no tensor {name}")))
    }

    /// The tensor `name` if the layer holds one (optional tensors: biases,
    /// norms a configuration leaves out).
    pub fn find(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The tensors, in the spec's order.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|(_, t)| t.as_bytes().len() as u64).sum()
    }
}

/// `parts` (each of the shape its source says) stacked along the first
/// dimension into `ts`'s shape, in `dtype`.
fn concat_rows(ts: &TensorSpec, parts: Vec<Tensor>, dtype: DType) -> Result<Tensor> {
    let total: usize = parts.iter().map(Tensor::len).sum();
    let want = ts.elements().ok_or_else(|| Error::Spec(format!("{}: {:?} overflows", ts.name, ts.shape)))?;
    if total as u64 != want {
        return Err(Error::Spec(format!("{}: its parts hold {total} values, the spec {want}", ts.name)));
    }
    if parts.len() == 1 && parts[0].dtype() == dtype {
        let one = parts.into_iter().next().map(Tensor::into_storage);
        if let Some(storage) = one {
            return Ok(Tensor::new(ts.shape.clone(), storage)?);
        }
        return Err(Error::Spec(format!("{}: no parts", ts.name)));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(total.saturating_mul(dtype.size()))
        .map_err(|e| Error::Spec(format!("{}: {total} values cannot be held in memory ({e})", ts.name)))?;
    for p in &parts {
        if p.dtype() == dtype {
            bytes.extend_from_slice(p.as_bytes());
        } else {
            bytes.extend_from_slice(Tensor::from_f32(dtype, vec![p.len()], &p.to_f32())?.as_bytes());
        }
    }
    Ok(Tensor::from_le_bytes(dtype, ts.shape.clone(), &bytes)?)
}
