//! One logical tensor split into segments on several devices.
//!
//! FlexGen places each weight, the KV cache and the activations by
//! percentages over GPU, host and disk. A [`SegmentedTensor`] is that
//! placement for one tensor: split along one dimension, with split points
//! rounded to a granularity the caller gives (whole attention heads, whole
//! sequences), each segment a dense tensor on its own device.

use crate::device::Device;
use crate::dtype::{DType, Shape};
use crate::error::{Error, Result};
use crate::tensor::TensorView;
use std::ops::Range;

/// The ranges `[0, total)` is split into for `percents` (which must sum to
/// 100), each boundary rounded to the nearest multiple of `granularity`
/// (the end stays `total`). Empty ranges are kept so that the result lines up
/// with `percents`.
pub fn split_points(total: usize, percents: &[f64], granularity: usize) -> Result<Vec<Range<usize>>> {
    if granularity == 0 {
        return Err(Error::BadSplit("the split granularity must be at least 1".into()));
    }
    if percents.is_empty() {
        return Err(Error::BadSplit("a split needs at least one share".into()));
    }
    for &p in percents {
        if !(0.0..=100.0).contains(&p) || p.is_nan() {
            return Err(Error::BadSplit(format!("share {p}% is outside 0..=100")));
        }
    }
    let sum: f64 = percents.iter().sum();
    if (sum - 100.0).abs() > 1e-6 {
        return Err(Error::BadSplit(format!("shares sum to {sum}%, not 100%")));
    }
    let mut ranges = Vec::with_capacity(percents.len());
    let mut cumulative = 0.0;
    let mut start = 0usize;
    for (i, &p) in percents.iter().enumerate() {
        cumulative += p;
        let end = if i + 1 == percents.len() {
            total
        } else {
            let exact = total as f64 * cumulative / 100.0;
            let units = (exact / granularity as f64).round() as usize;
            units.saturating_mul(granularity).min(total).max(start)
        };
        ranges.push(start..end);
        start = end;
    }
    Ok(ranges)
}

/// One piece of a segmented tensor: the range it covers along the split
/// dimension, and a view (usually a whole tensor) on its device.
#[derive(Clone, Debug)]
pub struct Segment {
    pub range: Range<usize>,
    pub view: TensorView,
}

/// A logical tensor whose pieces along `dim` live on different devices.
#[derive(Clone, Debug)]
pub struct SegmentedTensor {
    shape: Shape,
    dtype: DType,
    dim: usize,
    segments: Vec<Segment>,
}

impl SegmentedTensor {
    /// Allocates the segments: `placements` pairs each device with its share
    /// in percent (shares sum to 100); split points fall on multiples of
    /// `granularity` along `dim`. Devices whose share rounds to nothing get
    /// no segment. If an allocation fails, the ones already made are freed.
    pub fn allocate(
        shape: &Shape,
        dtype: DType,
        dim: usize,
        placements: &[(&dyn Device, f64)],
        granularity: usize,
    ) -> Result<Self> {
        let size = *shape.dims().get(dim).ok_or(Error::DimOutOfRange { dim, rank: shape.rank() })?;
        let percents: Vec<f64> = placements.iter().map(|p| p.1).collect();
        let ranges = split_points(size, &percents, granularity)?;
        let mut segments = Vec::new();
        for ((device, _), range) in placements.iter().zip(ranges) {
            if range.is_empty() {
                continue;
            }
            let mut dims = shape.dims().to_vec();
            dims[dim] = range.len();
            let tensor = device.allocate(&Shape::new(dims), dtype)?;
            segments.push(Segment { range, view: tensor.view() });
        }
        Ok(SegmentedTensor { shape: shape.clone(), dtype, dim, segments })
    }

    /// A segmented tensor from segments made elsewhere (allocated in
    /// parallel, say): they must cover `0..shape[dim]` in order without gaps,
    /// each view of `dtype` with `shape`'s dimensions except its range's
    /// length along `dim`.
    pub fn from_segments(shape: &Shape, dtype: DType, dim: usize, segments: Vec<Segment>) -> Result<Self> {
        let size = *shape.dims().get(dim).ok_or(Error::DimOutOfRange { dim, rank: shape.rank() })?;
        let mut next = 0;
        for s in &segments {
            if s.range.start != next || s.range.end < s.range.start {
                return Err(Error::BadSplit(format!(
                    "segment {:?} does not follow the previous one (expected a start at {next})",
                    s.range
                )));
            }
            let mut dims = shape.dims().to_vec();
            dims[dim] = s.range.len();
            let want = Shape::new(dims);
            if s.view.shape() != want || s.view.dtype() != dtype {
                return Err(Error::BadSplit(format!(
                    "segment {:?} is a {} view of shape {}, expected {dtype} of shape {want}",
                    s.range,
                    s.view.dtype(),
                    s.view.shape()
                )));
            }
            next = s.range.end;
        }
        if next != size {
            return Err(Error::BadSplit(format!("segments cover 0..{next} of 0..{size}")));
        }
        Ok(SegmentedTensor { shape: shape.clone(), dtype, dim, segments })
    }

    /// A plain view seen as a segmented tensor of one segment along `dim`.
    pub fn single(view: TensorView, dim: usize) -> Result<Self> {
        let shape = view.shape();
        let size = *shape.dims().get(dim).ok_or(Error::DimOutOfRange { dim, rank: shape.rank() })?;
        Ok(SegmentedTensor { dtype: view.dtype(), shape, dim, segments: vec![Segment { range: 0..size, view }] })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_round_to_granularity() {
        // 32 sequences × 12 heads = 384 rows, split 30/30/40 in whole sequences of 12.
        let r = split_points(384, &[30.0, 30.0, 40.0], 12).unwrap();
        assert_eq!(r, vec![0..120, 120..228, 228..384]);
        for x in &r[..2] {
            assert_eq!(x.end % 12, 0);
        }
    }

    #[test]
    fn from_segments_checks_coverage_and_shapes() {
        use crate::tensor::test_support::tensor;
        let shape = Shape::new(vec![10, 4]);
        let (a, b) = (tensor(&[3, 4], DType::F16), tensor(&[7, 4], DType::F16));
        let seg = |range: Range<usize>, t: &crate::tensor::Tensor| Segment { range, view: t.view() };
        let t = SegmentedTensor::from_segments(&shape, DType::F16, 0, vec![seg(0..3, &a), seg(3..10, &b)]).unwrap();
        assert_eq!(t.segments().len(), 2);
        // A gap, a short cover, a wrong shape, a wrong dtype: refused.
        assert!(SegmentedTensor::from_segments(&shape, DType::F16, 0, vec![seg(0..3, &a), seg(4..10, &b)]).is_err());
        assert!(SegmentedTensor::from_segments(&shape, DType::F16, 0, vec![seg(0..3, &a)]).is_err());
        assert!(SegmentedTensor::from_segments(&shape, DType::F16, 0, vec![seg(0..7, &a), seg(7..10, &b)]).is_err());
        assert!(SegmentedTensor::from_segments(&shape, DType::F32, 0, vec![seg(0..3, &a), seg(3..10, &b)]).is_err());
        assert!(SegmentedTensor::from_segments(&shape, DType::F16, 2, vec![]).is_err());
    }

    #[test]
    fn zero_shares_give_empty_ranges() {
        let r = split_points(10, &[0.0, 100.0, 0.0], 1).unwrap();
        assert_eq!(r, vec![0..0, 0..10, 10..10]);
    }

    #[test]
    fn bad_splits_are_errors() {
        assert!(split_points(10, &[50.0, 40.0], 1).is_err());
        assert!(split_points(10, &[150.0, -50.0], 1).is_err());
        assert!(split_points(10, &[f64::NAN, 100.0], 1).is_err());
        assert!(split_points(10, &[100.0], 0).is_err());
    }
}
