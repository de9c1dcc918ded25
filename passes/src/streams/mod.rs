//! Dual-stream blocks of MMDiT diffusion transformers (FLUX, SD3, Qwen-Image): which ops of the
//! text stream are twins of which ops of the image stream, and how far their weights diverge.
//!
//! - [`find_streams`] (`twins.rs`) starts from the dual-stream layers [`crate::layers::find_blocks`]
//!   finds, anchors each on its joint attention (the Concats of both streams on the sequence
//!   axis) and walks both streams backwards in step from the anchor and from the streams'
//!   residual exits, pairing ops of equal type, attributes and weight shapes, down to the
//!   block's residual inputs. What both walks reach through the same value is shared: the
//!   conditioning (timestep embedding, a joint rotary table) or the attention core. A block with
//!   an op that has no twin is declined with the reason.
//! - The data-free divergence of a block is the relative Frobenius distance between its text
//!   and image weights: how much tying the text branch to the image branch changes.
//! - [`convert`] (`convert.rs`) runs a range of tied blocks as single-stream blocks, and
//!   [`SingleStream`] (`pass.rs`) is the `single-stream` pass: tying to the image or text
//!   branch or to the average of aligned twins ([`average_image_weights`]), and PPCL's
//!   `text=linear`, whose text map [`fit_text_map`] (`linear.rs`) fits.

mod convert;
mod linear;
mod pass;
mod twins;

pub use convert::{ConvertedBlock, convert};
pub use linear::{TextMap, fit_text_map};
pub use pass::{BlockParameters, SingleStream, SingleStreamOptions, SingleStreamReport, TextMapReport, TextStream, Tie};

pub use twins::{
    DeclinedBlock, DualBlock, Order, RowRanges, StreamReport, TwinOp, TwinWeight, average_image_weights, find_streams, find_streams_in,
    tie_text_weights,
};
