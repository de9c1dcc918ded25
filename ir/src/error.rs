//! Errors of IR construction and checks.

/// What is wrong with a graph or a tensor handed to the IR.
#[derive(Debug, thiserror::Error)]
pub enum IrError {
    /// A tensor whose dims, element type and data disagree.
    #[error("tensor `{name}` {what}")]
    BadTensor {
        /// The tensor's name.
        name: String,
        /// What is wrong, as a phrase that follows the name.
        what: String,
    },
    /// Two definitions of one value name.
    #[error("value `{name}` is defined twice: {first} and {second}")]
    DuplicateValue {
        /// The value name.
        name: String,
        /// The first definition.
        first: String,
        /// The second definition.
        second: String,
    },
    /// A node reads a value that nothing defines.
    #[error("node `{node}` ({op_type}) reads `{value}` as input {slot}, but no node, graph input or initializer defines it")]
    UndefinedInput {
        /// Node name.
        node: String,
        /// Node op type.
        op_type: String,
        /// The missing value name.
        value: String,
        /// Input slot.
        slot: usize,
    },
    /// A graph output that nothing defines.
    #[error("graph output `{0}` is not defined by any node, graph input or initializer")]
    UndefinedOutput(String),
    /// The graph is not acyclic.
    #[error("the graph has a cycle through node `{node}` ({op_type})")]
    Cycle {
        /// A node on the cycle.
        node: String,
        /// Its op type.
        op_type: String,
    },
    /// The model has no main graph.
    #[error("the model has no graph")]
    MissingGraph,
}
