//! The crate's one error type.

use std::fmt;
use std::sync::Arc;

use crate::format::{MAX_DIMS, MAX_GROUP_SIZE};

/// Everything that can go wrong in this crate. No function here panics on
/// bad input; it returns one of these instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A NaN or an infinity in the values to quantize.
    #[error("non-finite input value {value} at flat index {index}")]
    NonFinite { index: usize, value: f32 },

    /// A finite f32 input whose magnitude is above the f16 maximum (65504):
    /// the group's min and scale are stored as f16 and could not describe it.
    #[error("input value {value} at flat index {index} is outside the f16 range [-65504, 65504]")]
    OutOfRange { index: usize, value: f32 },

    /// Group size zero, odd, or above [`MAX_GROUP_SIZE`].
    #[error("group size must be even, non-zero and at most {MAX_GROUP_SIZE}; got {0}")]
    InvalidGroupSize(usize),

    /// Bits per value other than 4 or 8.
    #[error("unsupported bits per value {0}; supported: 4, 8")]
    UnsupportedBits(u8),

    /// The group dimension index is not a dimension of the shape.
    #[error("group dim {dim} is out of range for a {ndim}-D shape")]
    InvalidGroupDim { dim: usize, ndim: usize },

    /// More dimensions than the header can describe.
    #[error("shape has {0} dims; at most {MAX_DIMS} are supported")]
    TooManyDims(usize),

    /// The shape's byte sizes do not fit in `usize`.
    #[error("shape {0:?} is too large to lay out")]
    ShapeOverflow(Vec<usize>),

    /// The data's length does not match the shape's element count.
    #[error("shape {shape:?} has {expected} elements but the data has {found}")]
    ShapeMismatch { shape: Vec<usize>, expected: usize, found: usize },

    /// A buffer (`what` names it) of the wrong length.
    #[error("{what} has the wrong size: expected {expected}, found {found}")]
    BufferSize { what: &'static str, expected: usize, found: usize },

    /// A group or position index past the end.
    #[error("{what} {index} is out of range (there are {len})")]
    IndexOutOfRange { what: &'static str, index: usize, len: usize },

    /// The bytes do not start with a valid header.
    #[error("invalid compressed tensor header: {0}")]
    InvalidHeader(&'static str),

    /// The buffer's header describes a different tensor than the layout given.
    #[error("the buffer's header does not match the layout given")]
    LayoutMismatch,

    /// `quantize_into` was given values of another dtype than the layout's.
    #[error("layout was made for {expected:?} input, got {found:?}")]
    DtypeMismatch { expected: crate::SourceDtype, found: crate::SourceDtype },

    /// GPU work asked for where there is no CUDA driver or no GPU.
    #[error("no CUDA driver: {0}")]
    NoCudaDriver(String),

    /// GPU work asked for where NVRTC, which compiles the kernels, is missing.
    #[error("no NVRTC: {0}")]
    NoNvrtc(String),

    /// A tensor (`what` names it) of the wrong element type.
    #[error("{what} must be a {expected} tensor, found {found}")]
    TensorDtype { what: &'static str, expected: tier_api::DType, found: tier_api::DType },

    /// A tensor (`what` names it) on the wrong device.
    #[error("{what} must live on {expected}, found one on {found}")]
    TensorDevice { what: &'static str, expected: tier_api::DeviceKind, found: tier_api::DeviceKind },

    /// A view (`what` names it) that is not one contiguous byte range.
    #[error("{0} must be a contiguous view (one byte range of its tensor)")]
    NotContiguous(&'static str),

    /// The output shares bytes with the compressed buffer it is decoded from.
    #[error("the output overlaps the compressed buffer")]
    OverlappingBuffers,

    /// A stream of another GPU than the one the kernels are loaded on.
    #[error("the stream belongs to another GPU than the dequantizer's")]
    ForeignStream,

    /// A failure of a memory tier or of the GPU (allocation, copy, driver
    /// call, kernel compilation or launch).
    #[error("{0}")]
    Tier(TierError),
}

/// A `tier_api` error inside [`Error`]: shared, so that [`Error`] stays
/// `Clone`, and compared by message.
#[derive(Debug, Clone)]
pub struct TierError(Arc<tier_api::Error>);

impl TierError {
    /// The tier's error.
    pub fn inner(&self) -> &tier_api::Error {
        &self.0
    }
}

impl PartialEq for TierError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TierError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

impl From<tier_api::Error> for Error {
    fn from(e: tier_api::Error) -> Self {
        Error::Tier(TierError(Arc::new(e)))
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
