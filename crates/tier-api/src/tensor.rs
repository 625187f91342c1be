//! Tensor handles and views.

use crate::device::DeviceKind;
use crate::dtype::{DType, Shape};
use crate::error::{Error, IoOp, Result};
use crate::storage::{Access, Storage};
use std::ops::Range;
use std::sync::Arc;

/// A dense, row-major tensor owning its storage on one device. Cloning the
/// handle shares the storage; the bytes are freed with the last handle (and
/// the last in-flight copy, which holds one).
#[derive(Clone, Debug)]
pub struct Tensor {
    storage: Arc<dyn Storage>,
    shape: Shape,
    dtype: DType,
}

impl Tensor {
    /// Wraps a backend's storage. Its length must be the dense size of
    /// `shape` and `dtype`.
    pub fn from_storage(storage: Arc<dyn Storage>, shape: Shape, dtype: DType) -> Result<Self> {
        let expected = shape.byte_size(dtype)?;
        if storage.len() != expected {
            return Err(Error::LengthMismatch { len: storage.len(), expected });
        }
        Ok(Tensor { storage, shape, dtype })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> DeviceKind {
        self.storage.device()
    }

    pub fn byte_len(&self) -> usize {
        self.storage.len()
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Whether two handles share one storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.storage), Arc::as_ptr(&other.storage))
    }

    /// The whole tensor as a view.
    pub fn view(&self) -> TensorView {
        TensorView { ranges: self.shape.dims().iter().map(|&d| 0..d).collect(), tensor: self.clone() }
    }

    /// The view `start..start + len` along `dim`, everything along the others.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<TensorView> {
        self.view().narrow(dim, start, len)
    }

    /// Writes `src` at byte `offset`, synchronously, on a host or disk tier.
    /// GPU tensors are written through the copy matrix.
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check_range(offset, src.len())?;
        if self.storage.read_only() {
            return Err(read_only_error(self.device()));
        }
        match self.storage.access() {
            Access::Host(span) => {
                // SAFETY: the range was checked; a synchronous write from the
                // caller's thread, who must not run a copy into the same bytes.
                let dst = unsafe { span.slice_mut(offset, src.len()) };
                dst.ok_or(Error::LengthMismatch { len: offset + src.len(), expected: span.len() })?
                    .copy_from_slice(src);
                Ok(())
            }
            Access::Block { io, base } => io.write_at(base + offset as u64, src),
            Access::Opaque => Err(self.opaque(IoOp::Write)),
        }
    }

    /// Reads bytes at `offset` into `dst`, synchronously, from a host or disk tier.
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check_range(offset, dst.len())?;
        match self.storage.access() {
            Access::Host(span) => {
                // SAFETY: range checked; the caller must not run a copy into
                // these bytes at the same time.
                let src = unsafe { span.slice(offset, dst.len()) };
                dst.copy_from_slice(
                    src.ok_or(Error::LengthMismatch { len: offset + dst.len(), expected: span.len() })?,
                );
                Ok(())
            }
            Access::Block { io, base } => io.read_at(base + offset as u64, dst),
            Access::Opaque => Err(self.opaque(IoOp::Read)),
        }
    }

    /// All bytes of a host or disk tensor.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.byte_len()];
        self.read_bytes(0, &mut out)?;
        Ok(out)
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.byte_len() => Ok(()),
            _ => Err(Error::LengthMismatch { len: offset.saturating_add(len), expected: self.byte_len() }),
        }
    }

    fn opaque(&self, op: IoOp) -> Error {
        Error::Unsupported {
            what: format!("a synchronous {op} of {} memory", self.device()),
            hint: "copy through the copy matrix into a host tensor instead".into(),
        }
    }
}

/// The error for writing into a read-only storage.
pub(crate) fn read_only_error(device: crate::DeviceKind) -> Error {
    Error::Unsupported {
        what: format!("writing into read-only {device} memory (a file mapped read-only)"),
        hint: "copy into a tensor allocated on a device instead".into(),
    }
}

/// A rectangular window of a tensor: one range along each dimension.
#[derive(Clone, Debug)]
pub struct TensorView {
    tensor: Tensor,
    ranges: Vec<Range<usize>>,
}

impl TensorView {
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    pub fn dtype(&self) -> DType {
        self.tensor.dtype
    }

    pub fn device(&self) -> DeviceKind {
        self.tensor.device()
    }

    /// The view's own shape (the lengths of its ranges).
    pub fn shape(&self) -> Shape {
        Shape::new(self.ranges.iter().map(|r| r.len()).collect::<Vec<_>>())
    }

    /// Bytes the view covers.
    pub fn byte_len(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).product::<usize>() * self.tensor.dtype.size()
    }

    /// Narrows further: `start..start + len` relative to this view along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<TensorView> {
        let rank = self.ranges.len();
        let current = self.ranges.get(dim).ok_or(Error::DimOutOfRange { dim, rank })?;
        let out_of_range = || Error::ViewOutOfRange {
            dim,
            start,
            end: start.saturating_add(len),
            size: current.len(),
            shape: self.shape(),
        };
        let end = start.checked_add(len).ok_or_else(out_of_range)?;
        if end > current.len() {
            return Err(out_of_range());
        }
        let mut ranges = self.ranges.clone();
        ranges[dim] = current.start + start..current.start + end;
        Ok(TensorView { tensor: self.tensor.clone(), ranges })
    }

    /// Whether the view is one contiguous byte range of its tensor.
    pub fn is_contiguous(&self) -> bool {
        self.byte_runs().len() <= 1
    }

    /// The contiguous byte ranges `(offset, len)` of the tensor that the view
    /// covers, in row-major order of the view's elements, adjacent runs merged.
    pub fn byte_runs(&self) -> Vec<(u64, u64)> {
        let dims = self.tensor.shape.dims();
        let elem = self.tensor.dtype.size() as u64;
        if self.ranges.iter().any(|r| r.is_empty()) {
            return Vec::new();
        }
        if dims.is_empty() {
            return vec![(0, elem)];
        }
        let strides = self.tensor.shape.strides();
        // The outermost dimension k such that every dimension after it is
        // whole: a run spans the view's range along k.
        let mut k = dims.len() - 1;
        while k > 0 && self.ranges[k].len() == dims[k] {
            k -= 1;
        }
        let run_len = self.ranges[k].len() as u64 * strides[k] as u64 * elem;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut index: Vec<usize> = self.ranges[..k].iter().map(|r| r.start).collect();
        loop {
            let mut offset = self.ranges[k].start * strides[k];
            for (i, &ix) in index.iter().enumerate() {
                offset += ix * strides[i];
            }
            let offset = offset as u64 * elem;
            match runs.last_mut() {
                Some((o, l)) if *o + *l == offset => *l += run_len,
                _ => runs.push((offset, run_len)),
            }
            // Advance the multi-index over dimensions 0..k, innermost first.
            let mut d = k;
            loop {
                if d == 0 {
                    return runs;
                }
                d -= 1;
                index[d] += 1;
                if index[d] < self.ranges[d].end {
                    break;
                }
                index[d] = self.ranges[d].start;
            }
        }
    }
}

/// A host tensor over a plain boxed slice, for unit tests in this crate.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::storage::HostSpan;
    use std::any::Any;
    use std::ptr::NonNull;

    #[derive(Debug)]
    struct VecStorage(Box<[u8]>);

    impl Storage for VecStorage {
        fn device(&self) -> DeviceKind {
            DeviceKind::Host { mem: crate::HostMemKind::Pageable }
        }
        fn len(&self) -> usize {
            self.0.len()
        }
        fn access(&self) -> Access<'_> {
            let ptr = NonNull::new(self.0.as_ptr() as *mut u8).unwrap_or(NonNull::dangling());
            // SAFETY: the boxed slice lives as long as the storage.
            Access::Host(unsafe { HostSpan::new(ptr, self.0.len()) })
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    /// A zeroed tensor of `shape` in ordinary memory.
    pub(crate) fn tensor(shape: &[usize], dtype: DType) -> Tensor {
        let len = Shape::from(shape).byte_size(dtype).unwrap();
        Tensor::from_storage(Arc::new(VecStorage(vec![0; len].into())), Shape::from(shape), dtype).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::tensor;
    use super::*;

    #[test]
    fn whole_tensor_is_one_run() {
        let t = tensor(&[4, 5, 6], DType::F16);
        assert_eq!(t.view().byte_runs(), vec![(0, 240)]);
    }

    #[test]
    fn row_view_is_contiguous() {
        let t = tensor(&[4, 5, 6], DType::F32);
        let v = t.narrow(0, 1, 2).unwrap();
        assert_eq!(v.byte_runs(), vec![(120, 240)]);
        assert!(v.is_contiguous());
    }

    #[test]
    fn inner_view_is_strided() {
        let t = tensor(&[2, 3, 4], DType::U8);
        let v = t.narrow(2, 1, 2).unwrap();
        let runs = v.byte_runs();
        assert_eq!(runs.len(), 6);
        assert_eq!(runs[0], (1, 2));
        assert_eq!(runs[1], (5, 2));
        assert_eq!(runs[5], (21, 2));
        assert_eq!(v.byte_len(), 12);
        let v = t.narrow(1, 1, 1).unwrap().narrow(0, 1, 1).unwrap();
        assert_eq!(v.byte_runs(), vec![(16, 4)]);
    }

    #[test]
    fn out_of_range_views_are_errors() {
        let t = tensor(&[4, 5], DType::F16);
        assert!(matches!(t.narrow(0, 3, 2), Err(Error::ViewOutOfRange { dim: 0, start: 3, end: 5, size: 4, .. })));
        assert!(matches!(t.narrow(2, 0, 1), Err(Error::DimOutOfRange { dim: 2, rank: 2 })));
        assert!(t.narrow(1, usize::MAX, 2).is_err());
        let v = t.narrow(1, 1, 3).unwrap();
        assert!(v.narrow(1, 1, 3).is_err(), "narrowing is relative to the view");
        assert_eq!(v.narrow(1, 1, 2).unwrap().ranges()[1], 2..4);
    }

    #[test]
    fn empty_views_have_no_runs() {
        let t = tensor(&[4, 5], DType::F16);
        assert!(t.narrow(0, 2, 0).unwrap().byte_runs().is_empty());
    }

    #[test]
    fn bytes_round_trip_on_host() {
        let t = tensor(&[8], DType::U8);
        t.write_bytes(2, &[1, 2, 3]).unwrap();
        assert_eq!(t.to_bytes().unwrap(), vec![0, 0, 1, 2, 3, 0, 0, 0]);
        assert!(t.write_bytes(7, &[1, 2]).is_err());
    }
}
