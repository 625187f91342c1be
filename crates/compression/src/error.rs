//! The crate's one error type.

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
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
