//! Typed handles into a [`crate::Graph`].
//!
//! petgraph's `NodeIndex` is untyped; wrapping it keeps op and value handles from being mixed up.
//! Handles of removed nodes must not be kept: a `StableGraph` reuses freed slots.

use petgraph::stable_graph::NodeIndex;
use std::fmt;

/// Handle of an op (an ONNX node) in a [`crate::Graph`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub(crate) NodeIndex);

/// Handle of a value (a tensor name) in a [`crate::Graph`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub(crate) NodeIndex);

impl fmt::Debug for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.0.index())
    }
}

impl fmt::Debug for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "value#{}", self.0.index())
    }
}
