//! Borrowed views of GPU buffers, the arguments of the ops in [`super::blas`],
//! [`super::kernels`] and [`super::llm`] in place of long lists of buffers
//! and sizes.
//!
//! - [`Layout`]: where a matrix's elements sit in a buffer of some length
//!   (an element offset, rows × cols, a row stride `ld ≥ cols`), checked
//!   once, with checked arithmetic, when it is made. It knows no GPU, so the
//!   bounds logic is tested on the CPU.
//! - [`Mat`]: a [`DevBuf`] seen through a [`Layout`], read by an op;
//!   [`MatMut`]: the same, written by an op. Sub-views
//!   ([`Mat::rows_range`], [`Mat::cols_range`]) stay inside their parent.
//! - [`KvShape`] (query heads, key/value heads, head size) and [`KvView`]
//!   (a KV cache's keys and values, `[batch][kv_heads][capacity][head_dim]`
//!   each, checked to fit their buffers).
//! - [`Rotary`]: the rotary embedding's positions and inverse frequencies.
//! - [`DecodeAttn`]: what the decode attention reads besides q and the
//!   cache: the key mask, the positions visible, the scale.
//! - [`ScoreRows`]: where a block of attention score rows sits in the batch
//!   (the softmax kernels' masking).
//! - [`Gemm`] and [`Operand`]: a strided batched product's description and
//!   its operands (checked against their buffers when the product runs,
//!   where the matrices' shapes are known).
//!
//! The GPU's buffers are written through shared references (the stream
//! orders the writes), so [`MatMut`] says what an op writes; it does not
//! make the borrow exclusive. Launchers turn a view's sizes into the
//! kernels' 32-bit ones with checked conversions.

use std::marker::PhantomData;
use std::mem::size_of;

use super::buffer::{DevBuf, DevElem};
use crate::error::{Error, Result};

/// Where the elements of a `rows × cols` matrix sit in a buffer: row `r`,
/// column `c` at element `offset + r·ld + c`. Made only by
/// [`Layout::new`], which checks that every element lies inside the
/// buffer's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The length of the buffer it was checked against.
    len: usize,
    offset: usize,
    rows: usize,
    cols: usize,
    ld: usize,
}

impl Layout {
    /// The layout of `rows × cols` elements from `offset`, rows `ld` apart,
    /// in a buffer of `len` elements: an error where `ld < cols`, where an
    /// element (or, for an empty matrix, the offset) lies past `len`, or
    /// where the extent overflows.
    pub fn new(len: usize, offset: usize, rows: usize, cols: usize, ld: usize) -> Result<Self> {
        if ld < cols {
            return Err(Error::Gpu(format!("matrix view: row stride {ld} is shorter than its {cols} columns")));
        }
        let layout = Layout { len, offset, rows, cols, ld };
        let end = layout.end().ok_or_else(|| Error::Overflow {
            what: format!("matrix view of {rows}x{cols} (row stride {ld}) at element {offset}"),
        })?;
        if end > len {
            return Err(Error::Gpu(format!(
                "matrix view of {rows}x{cols} (row stride {ld}) at element {offset} reaches element {end} of a \
                 {len}-element buffer"
            )));
        }
        Ok(layout)
    }

    /// One past the last element touched (the offset for an empty
    /// matrix), or `None` where that overflows.
    fn end(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 {
            return Some(self.offset);
        }
        (self.rows - 1).checked_mul(self.ld)?.checked_add(self.cols)?.checked_add(self.offset)
    }

    /// The element where row 0, column 0 sits.
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements from one row's start to the next's.
    pub fn ld(&self) -> usize {
        self.ld
    }

    /// Whether the rows follow each other without gaps (`ld == cols`, or
    /// at most one row).
    pub fn is_dense(&self) -> bool {
        self.ld == self.cols || self.rows <= 1
    }

    /// Rows `start..start + n`, within these rows.
    pub fn rows_range(&self, start: usize, n: usize) -> Result<Self> {
        match start.checked_add(n) {
            Some(end) if end <= self.rows => {}
            _ => {
                return Err(Error::Gpu(format!("matrix view: rows {start}..+{n} of a view of {} rows", self.rows)));
            }
        }
        let offset = start.checked_mul(self.ld).and_then(|o| o.checked_add(self.offset));
        let offset = offset.ok_or_else(|| Error::Overflow { what: format!("matrix view: row {start}") })?;
        // Checked again as a whole: an empty range past the last row
        // must not start past the buffer either.
        Layout::new(self.len, offset, n, self.cols, self.ld)
    }

    /// Columns `start..start + n` of every row, within these columns (the
    /// row stride stays the parent's).
    pub fn cols_range(&self, start: usize, n: usize) -> Result<Self> {
        match start.checked_add(n) {
            Some(end) if end <= self.cols => {}
            _ => {
                return Err(Error::Gpu(format!(
                    "matrix view: columns {start}..+{n} of a view of {} columns",
                    self.cols
                )));
            }
        }
        let offset = start.checked_add(self.offset);
        let offset = offset.ok_or_else(|| Error::Overflow { what: format!("matrix view: column {start}") })?;
        Layout::new(self.len, offset, self.rows, n, self.ld)
    }
}

/// A `rows × cols` matrix of `T` in a [`DevBuf`], read by an op. Cheap to
/// copy; checked against the buffer once, when made.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a, T: DevElem> {
    buf: &'a DevBuf<T>,
    at: Layout,
}

impl<'a, T: DevElem> Mat<'a, T> {
    /// Rows `ld` apart from element `offset` of `buf`.
    pub fn strided(buf: &'a DevBuf<T>, offset: usize, rows: usize, cols: usize, ld: usize) -> Result<Self> {
        Ok(Mat { buf, at: Layout::new(buf.len(), offset, rows, cols, ld)? })
    }

    /// Dense rows from the buffer's first element.
    pub fn new(buf: &'a DevBuf<T>, rows: usize, cols: usize) -> Result<Self> {
        Self::strided(buf, 0, rows, cols, cols)
    }

    /// The whole buffer as dense rows of `cols` (its length a multiple of
    /// `cols`, which is not 0).
    pub fn by_rows(buf: &'a DevBuf<T>, cols: usize) -> Result<Self> {
        if cols == 0 || !buf.len().is_multiple_of(cols) {
            return Err(Error::Gpu(format!("matrix view: {} elements are not rows of {cols}", buf.len())));
        }
        Self::new(buf, buf.len() / cols, cols)
    }

    /// Rows `start..start + n` of this view.
    pub fn rows_range(self, start: usize, n: usize) -> Result<Self> {
        Ok(Mat { buf: self.buf, at: self.at.rows_range(start, n)? })
    }

    /// Columns `start..start + n` of every row of this view (such as the
    /// gate half of stacked gate/up rows).
    pub fn cols_range(self, start: usize, n: usize) -> Result<Self> {
        Ok(Mat { buf: self.buf, at: self.at.cols_range(start, n)? })
    }

    pub fn rows(&self) -> usize {
        self.at.rows
    }

    pub fn cols(&self) -> usize {
        self.at.cols
    }

    /// The row stride, in elements.
    pub fn ld(&self) -> usize {
        self.at.ld
    }

    /// The element of the buffer where the view starts.
    pub fn offset(&self) -> usize {
        self.at.offset
    }

    pub fn layout(&self) -> Layout {
        self.at
    }

    /// The buffer viewed.
    pub fn buf(&self) -> &'a DevBuf<T> {
        self.buf
    }

    /// The device address of row 0, column 0.
    pub fn ptr(&self) -> u64 {
        // The offset is at most the buffer's length (checked when made), so
        // the byte offset is at most the buffer's size.
        self.buf.ptr() + (self.at.offset * size_of::<T>()) as u64
    }

    pub fn is_dense(&self) -> bool {
        self.at.is_dense()
    }

    /// An error naming `what` unless the rows are dense (a kernel that
    /// takes no row stride).
    pub fn check_dense(&self, what: &str) -> Result<()> {
        if self.is_dense() {
            Ok(())
        } else {
            Err(Error::Gpu(format!(
                "{what}: the op takes dense rows, the view's {} columns are {} apart",
                self.at.cols, self.at.ld
            )))
        }
    }

    /// An error naming `what` unless the view is `rows × cols`.
    pub fn check_shape(&self, what: &str, rows: usize, cols: usize) -> Result<()> {
        if (self.at.rows, self.at.cols) == (rows, cols) {
            Ok(())
        } else {
            Err(Error::Gpu(format!("{what}: a {}x{} view where {rows}x{cols} is expected", self.at.rows, self.at.cols)))
        }
    }
}

/// A matrix an op writes: a [`Mat`] (which it derefs to, for its shape)
/// marked as the op's output.
#[derive(Debug, Clone, Copy)]
pub struct MatMut<'a, T: DevElem>(Mat<'a, T>);

impl<'a, T: DevElem> MatMut<'a, T> {
    /// Rows `ld` apart from element `offset` of `buf`.
    pub fn strided(buf: &'a DevBuf<T>, offset: usize, rows: usize, cols: usize, ld: usize) -> Result<Self> {
        Ok(MatMut(Mat::strided(buf, offset, rows, cols, ld)?))
    }

    /// Dense rows from the buffer's first element.
    pub fn new(buf: &'a DevBuf<T>, rows: usize, cols: usize) -> Result<Self> {
        Ok(MatMut(Mat::new(buf, rows, cols)?))
    }

    /// The whole buffer as dense rows of `cols`.
    pub fn by_rows(buf: &'a DevBuf<T>, cols: usize) -> Result<Self> {
        Ok(MatMut(Mat::by_rows(buf, cols)?))
    }

    /// Rows `start..start + n` of this view.
    pub fn rows_range(self, start: usize, n: usize) -> Result<Self> {
        Ok(MatMut(self.0.rows_range(start, n)?))
    }

    /// Columns `start..start + n` of every row of this view.
    pub fn cols_range(self, start: usize, n: usize) -> Result<Self> {
        Ok(MatMut(self.0.cols_range(start, n)?))
    }

    /// The same elements, to read.
    pub fn as_mat(&self) -> Mat<'a, T> {
        self.0
    }
}

impl<'a, T: DevElem> std::ops::Deref for MatMut<'a, T> {
    type Target = Mat<'a, T>;
    fn deref(&self) -> &Mat<'a, T> {
        &self.0
    }
}

/// The heads of an attention: `heads` query heads of `head_dim` values,
/// grouped over `kv_heads` key/value heads (query head `h` reads kv head
/// `h / (heads / kv_heads)`; a multi-head cache has as many as query heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Values of a row of queries, `heads · head_dim` (overflow: an error).
    pub fn q_width(&self) -> Result<usize> {
        self.heads.checked_mul(self.head_dim).ok_or_else(|| Error::Overflow { what: format!("{self:?}: q width") })
    }

    /// Values of a row of keys (or values), `kv_heads · head_dim`.
    pub fn kv_width(&self) -> Result<usize> {
        self.kv_heads.checked_mul(self.head_dim).ok_or_else(|| Error::Overflow { what: format!("{self:?}: kv width") })
    }
}

/// Elements of each buffer of a KV cache of `batch` sequences of
/// `capacity` positions: `batch · kv_heads · capacity · head_dim`.
pub fn kv_cache_len(batch: usize, capacity: usize, shape: &KvShape) -> Result<usize> {
    [batch, shape.kv_heads, capacity, shape.head_dim].iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(
        || Error::Overflow { what: format!("a KV cache of {batch} sequences of {capacity} positions of {shape:?}") },
    )
}

/// A KV cache as the attention reads it and the step's keys and values are
/// stored into it: `keys` and `values` each `[batch][kv_heads][capacity]
/// [head_dim]`, checked when made to hold that many elements.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a, T: DevElem> {
    keys: &'a DevBuf<T>,
    values: &'a DevBuf<T>,
    batch: usize,
    capacity: usize,
    shape: KvShape,
}

impl<'a, T: DevElem> KvView<'a, T> {
    /// The caches of `batch` sequences of `capacity` positions each.
    pub fn new(
        (keys, values): (&'a DevBuf<T>, &'a DevBuf<T>),
        batch: usize,
        capacity: usize,
        shape: KvShape,
    ) -> Result<Self> {
        let len = kv_cache_len(batch, capacity, &shape)?;
        if keys.len() < len || values.len() < len {
            return Err(Error::Gpu(format!(
                "KV cache view of {batch} sequences of {capacity} positions of {shape:?}: {len} elements, the \
                 buffers hold {} and {}",
                keys.len(),
                values.len()
            )));
        }
        Ok(KvView { keys, values, batch, capacity, shape })
    }

    pub fn keys(&self) -> &'a DevBuf<T> {
        self.keys
    }

    pub fn values(&self) -> &'a DevBuf<T> {
        self.values
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Positions per sequence (the cache's third dimension).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }
}

/// The rotary embedding (Hugging Face's rotate-half): row `r` rotated at
/// `positions[r]` with the `head_dim / 2` frequencies of `inv_freq`.
#[derive(Debug, Clone, Copy)]
pub struct Rotary<'a> {
    pub positions: &'a DevBuf<i32>,
    pub inv_freq: &'a DevBuf<f32>,
}

/// What the decode attention reads besides the queries and the cache: the
/// key mask (`batch` rows of positions, row `b`'s positions `0..total`
/// visible where it is non-zero), the positions `total` (this step's
/// included) and the scale of the scores.
#[derive(Debug, Clone, Copy)]
pub struct DecodeAttn<'a> {
    pub mask: Mat<'a, u8>,
    pub total: usize,
    pub scale: f32,
}

/// A block of attention score rows, `[seqs][heads][new_len]` rows (the
/// batch's sequences `first..first + seqs`), each over the keys of its
/// row: the queries are the `new_len` positions after `past`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreRows {
    pub seqs: usize,
    pub heads: usize,
    pub new_len: usize,
    pub past: usize,
    pub first: usize,
}

impl ScoreRows {
    /// Rows of scores, `seqs · heads · new_len`.
    pub fn rows(&self) -> Result<usize> {
        self.seqs
            .checked_mul(self.heads)
            .and_then(|n| n.checked_mul(self.new_len))
            .ok_or_else(|| Error::Overflow { what: format!("{self:?}: score rows") })
    }
}

/// A strided batched product, cuBLAS's convention: `C[i] = alpha · op(A[i])
/// · op(B[i]) + beta · C[i]` for `batch` column-major matrices, op(A)
/// `m × k`, op(B) `k × n`, C `m × n`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// `C[i] = A[i] · B[i]`, no transposes, alpha 1, beta 0.
    pub fn new((m, n, k): (usize, usize, usize), batch: usize) -> Self {
        Gemm { trans_a: false, trans_b: false, m, n, k, batch, alpha: 1.0, beta: 0.0 }
    }

    /// With A transposed (A's matrices are `k × m`).
    pub fn transpose_a(self) -> Self {
        Gemm { trans_a: true, ..self }
    }

    /// With B transposed (B's matrices are `n × k`).
    pub fn transpose_b(self) -> Self {
        Gemm { trans_b: true, ..self }
    }

    /// With the product scaled by `alpha`.
    pub fn scaled(self, alpha: f32) -> Self {
        Gemm { alpha, ..self }
    }

    /// With `beta · C` added.
    pub fn plus(self, beta: f32) -> Self {
        Gemm { beta, ..self }
    }
}

/// One operand of a batched product: matrices in a buffer from element
/// `offset`, their columns `ld` apart (column-major) and the matrices
/// `stride` apart. Checked against the buffer when the product runs,
/// where the matrices' shape is known.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a, T: DevElem> {
    ptr: u64,
    len: usize,
    pub offset: usize,
    pub ld: usize,
    pub stride: usize,
    _buf: PhantomData<&'a DevBuf<T>>,
}

impl<'a, T: DevElem> Operand<'a, T> {
    /// Matrices in `buf` from element `offset`, `ld` apart within a
    /// matrix and `stride` apart between them.
    pub fn new(buf: &'a DevBuf<T>, offset: usize, ld: usize, stride: usize) -> Self {
        Operand { ptr: buf.ptr(), len: buf.len(), offset, ld, stride, _buf: PhantomData }
    }

    /// Checks that `batch` column-major `rows × cols` matrices fit, and
    /// returns the address of the first.
    pub(crate) fn checked(&self, what: &str, rows: usize, cols: usize, batch: usize) -> Result<u64> {
        batched_end(self.len, (self.offset, self.ld, self.stride), (rows, cols, batch))
            .map_err(|e| Error::Gpu(format!("GPU batched product: {what}: {e}")))?;
        Ok(self.ptr + (self.offset * size_of::<T>()) as u64)
    }
}

/// Where `batch` column-major `rows × cols` matrices from `offset`, columns
/// `ld` apart and matrices `stride` apart, end in a buffer of `len`
/// elements: an error where `rows > ld`, an element lies past `len`, or
/// the extent overflows.
fn batched_end(
    len: usize,
    (offset, ld, stride): (usize, usize, usize),
    (rows, cols, batch): (usize, usize, usize),
) -> Result<usize, String> {
    if rows > ld {
        return Err(format!("{rows} rows but ld {ld}"));
    }
    let end = if rows == 0 || cols == 0 || batch == 0 {
        Some(offset)
    } else {
        (batch - 1)
            .checked_mul(stride)
            .and_then(|a| (cols - 1).checked_mul(ld).and_then(|b| a.checked_add(b)))
            .and_then(|a| a.checked_add(rows))
            .and_then(|a| a.checked_add(offset))
    };
    match end {
        Some(end) if end <= len => Ok(end),
        Some(end) => Err(format!("reaches element {end} of a {len}-element buffer")),
        None => Err(format!("{batch} matrices of {rows}x{cols} (ld {ld}, stride {stride}) at {offset} overflow")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dense_and_strided_layouts() {
        let l = Layout::new(12, 0, 3, 4, 4).unwrap();
        assert_eq!((l.rows(), l.cols(), l.ld(), l.offset()), (3, 4, 4, 0));
        assert!(l.is_dense());
        // The last row ends at 2·6 + 4 = 16.
        assert!(Layout::new(16, 0, 3, 4, 6).is_ok());
        assert!(Layout::new(15, 0, 3, 4, 6).is_err());
        assert!(!Layout::new(16, 0, 3, 4, 6).unwrap().is_dense());
        // One row: any stride of at least its width is dense.
        assert!(Layout::new(4, 0, 1, 4, 100).unwrap().is_dense());
    }

    #[test]
    fn out_of_range_offsets_are_errors() {
        assert!(Layout::new(12, 1, 3, 4, 4).is_err());
        assert!(Layout::new(12, 13, 0, 4, 4).is_err(), "an empty view past the end");
        assert!(Layout::new(12, 12, 0, 4, 4).is_ok(), "an empty view at the end");
        assert!(Layout::new(12, 12, 3, 0, 4).is_ok());
        assert!(Layout::new(0, 0, 0, 0, 0).is_ok());
    }

    #[test]
    fn strides_shorter_than_a_row_are_errors() {
        assert!(Layout::new(100, 0, 2, 4, 3).is_err());
        assert!(Layout::new(100, 0, 1, 4, 3).is_err());
        assert!(Layout::new(100, 0, 0, 4, 3).is_err());
    }

    #[test]
    fn overflow_near_usize_max_is_an_error() {
        let e = Layout::new(usize::MAX, 0, 3, 4, usize::MAX / 2 + 1).unwrap_err();
        assert!(matches!(e, Error::Overflow { .. }), "{e}");
        let e = Layout::new(usize::MAX, usize::MAX, 1, 1, 1).unwrap_err();
        assert!(matches!(e, Error::Overflow { .. }), "{e}");
        let e = Layout::new(usize::MAX, usize::MAX - 3, 1, 4, 4).unwrap_err();
        assert!(matches!(e, Error::Overflow { .. }), "{e}");
        assert!(Layout::new(usize::MAX, usize::MAX - 4, 1, 4, 4).is_ok());
        assert!(Layout::new(usize::MAX, 0, 2, usize::MAX, usize::MAX).is_err());
        assert!(Layout::new(usize::MAX, 0, usize::MAX, 1, 1).is_ok());
    }

    #[test]
    fn sub_views_stay_inside() {
        // Stacked gate/up rows: 3 rows of 2·5, the gate half.
        let l = Layout::new(30, 0, 3, 10, 10).unwrap();
        let gate = l.cols_range(0, 5).unwrap();
        assert_eq!((gate.offset(), gate.rows(), gate.cols(), gate.ld()), (0, 3, 5, 10));
        let up = l.cols_range(5, 5).unwrap();
        assert_eq!(up.offset(), 5);
        assert!(l.cols_range(6, 5).is_err());
        assert!(l.cols_range(usize::MAX, 2).is_err());
        let last = l.rows_range(2, 1).unwrap();
        assert_eq!((last.offset(), last.rows()), (20, 1));
        assert!(l.rows_range(2, 2).is_err());
        assert!(l.rows_range(usize::MAX, 1).is_err());
        assert_eq!(l.rows_range(3, 0).unwrap().offset(), 30);
        // The gate half's rows end at 25: no empty range starts past that.
        let gate = Layout::new(25, 0, 3, 5, 10).unwrap();
        assert!(gate.rows_range(3, 0).is_err());
        assert_eq!(gate.rows_range(2, 1).unwrap().offset(), 20);
    }

    #[test]
    fn kv_caches_and_batched_operands() {
        let shape = KvShape { heads: 8, kv_heads: 2, head_dim: 64 };
        assert_eq!(kv_cache_len(3, 16, &shape).unwrap(), 3 * 2 * 16 * 64);
        assert_eq!(shape.q_width().unwrap(), 512);
        assert_eq!(shape.kv_width().unwrap(), 128);
        assert!(kv_cache_len(usize::MAX, 2, &shape).is_err());
        // Two 4x3 column-major matrices (ld 5), 20 apart, from 1: the
        // last element is 1 + 20 + 2·5 + 4 = 35.
        assert_eq!(batched_end(35, (1, 5, 20), (4, 3, 2)), Ok(35));
        assert!(batched_end(34, (1, 5, 20), (4, 3, 2)).is_err());
        assert!(batched_end(100, (0, 3, 20), (4, 3, 2)).is_err(), "rows > ld");
        assert!(batched_end(usize::MAX, (0, 5, usize::MAX), (4, 3, 2)).is_err());
        assert_eq!(batched_end(7, (7, 5, 20), (0, 3, 2)), Ok(7));
        assert!(batched_end(7, (8, 5, 20), (0, 3, 2)).is_err());
    }

    #[test]
    fn gemm_descriptions() {
        let g = Gemm::new((2, 3, 4), 5).transpose_a().scaled(0.5).plus(1.0);
        assert_eq!(g, Gemm { trans_a: true, trans_b: false, m: 2, n: 3, k: 4, batch: 5, alpha: 0.5, beta: 1.0 });
    }

    fn size() -> impl Strategy<Value = usize> {
        prop_oneof![0usize..64, Just(usize::MAX), Just(usize::MAX / 2), Just(usize::MAX / 2 + 1), any::<usize>()]
    }

    proptest! {
        /// Any layout accepted lies within the buffer: its last element,
        /// computed in u128, is below the length; so does any sub-view.
        #[test]
        fn accepted_views_lie_within_the_buffer(
            len in size(), offset in size(), rows in size(), cols in size(), ld in size(),
            start in 0usize..8, n in 0usize..8,
        ) {
            if let Ok(l) = Layout::new(len, offset, rows, cols, ld) {
                prop_assert!(l.ld() >= l.cols());
                let last = |l: &Layout| -> u128 {
                    if l.rows() == 0 || l.cols() == 0 {
                        l.offset() as u128
                    } else {
                        l.offset() as u128 + (l.rows() as u128 - 1) * l.ld() as u128 + l.cols() as u128
                    }
                };
                prop_assert!(last(&l) <= len as u128);
                if let Ok(r) = l.rows_range(start, n) {
                    prop_assert!(last(&r) <= len as u128);
                }
                if let Ok(c) = l.cols_range(start, n) {
                    prop_assert!(last(&c) <= len as u128);
                }
            }
        }

        /// Batched operands accepted lie within their buffer.
        #[test]
        fn accepted_operands_lie_within_the_buffer(
            len in size(), offset in size(), ld in size(), stride in size(),
            rows in size(), cols in size(), batch in size(),
        ) {
            if batched_end(len, (offset, ld, stride), (rows, cols, batch)).is_ok() {
                let last = if rows == 0 || cols == 0 || batch == 0 {
                    offset as u128
                } else {
                    offset as u128 + (batch as u128 - 1) * stride as u128 + (cols as u128 - 1) * ld as u128
                        + rows as u128
                };
                prop_assert!(last <= len as u128);
            }
        }
    }
}
