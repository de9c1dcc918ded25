//! The verification reference of a removal: the original with the removed branches zeroed.
//!
//! Each selected residual sum `y = x + f(x)` becomes `y = x + Mul(f(x), 0)`, with the zero a
//! scalar constant of the branch's element type. For finite branch values this is exactly `x`
//! (`x + 0 = x`, and `x + (−0) = x`), so the removed model must equal the reference to float
//! rounding of the rest of the graph; a branch that overflows to ±Inf or NaN makes the reference
//! NaN where the removal does not, which a comparison reports rather than hides. The branch is
//! still computed, so the reference runs the original's ops in the original's order.
//!
//! The edit names what it changes by value names ([`ZeroedBranch`]), not by graph handles, so
//! it applies to any model that keeps those names: a copy of the original, or the original
//! already edited by the references of earlier passes.

use super::detect::BlockReport;
use super::remove::{Selection, selected_regions};
use crate::PassError;
use prunec_ir::{DType, Model, Op, Tensor, Value, ValueKind};
use serde::Serialize;

/// One residual branch to zero, by the names of the sum and of the Add's branch input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ZeroedBranch {
    /// The Add's output.
    pub sum: String,
    /// The Add's input that is not the skip.
    pub branch: String,
}

/// The branches of the selected layers and sub-blocks of `report`, checked against `model`
/// (the model the report was made for).
pub fn zeroed_branches(model: &Model, report: &BlockReport, which: &[Selection]) -> Result<Vec<ZeroedBranch>, PassError> {
    let regions = selected_regions(model, report, which)?;
    Ok(regions.iter().map(|r| ZeroedBranch { sum: r.sum.clone(), branch: r.branch.clone() }).collect())
}

/// Zeroes the residual branches of the selected layers and sub-blocks of `report` in `model`
/// (a copy of the model the report was made for); returns the number of branches zeroed.
pub fn zero_residuals(model: &mut Model, report: &BlockReport, which: &[Selection]) -> Result<usize, PassError> {
    let branches = zeroed_branches(model, report, which)?;
    zero_branches(model, &branches)?;
    Ok(branches.len())
}

/// Makes each named sum read `Mul(branch, 0)` instead of its branch.
pub fn zero_branches(model: &mut Model, branches: &[ZeroedBranch]) -> Result<(), PassError> {
    let graph = &mut model.graph;
    for ZeroedBranch { sum, branch: branch_name } in branches {
        let missing = |what: &str| PassError::StaleBlockReport(format!("{what} of the residual sum `{sum}`"));
        let sum_value = graph.value_by_name(sum).ok_or_else(|| missing("no value"))?;
        let branch = graph.value_by_name(branch_name).ok_or_else(|| missing("no branch"))?;
        let (add, _) = graph.producer(sum_value).filter(|(op, _)| graph.op(*op).op_type == "Add").ok_or_else(|| missing("no Add"))?;
        let slot = graph.op_inputs(add).iter().position(|v| *v == Some(branch)).ok_or_else(|| missing("no branch input"))?;
        let dtype = graph.value(branch).dtype.unwrap_or(DType::F32);
        let bytes = dtype
            .bit_width()
            .filter(|_| dtype.is_float())
            .ok_or_else(|| PassError::StaleBlockReport(format!("the branch `{branch_name}` is {dtype}, not a float")))?
            .div_ceil(8) as usize;
        let zero = graph.add_initializer(&format!("{branch_name}_zero"), Tensor::from_raw("", dtype, &[], vec![0; bytes]));
        let name = std::iter::once(format!("{branch_name}_zeroed"))
            .chain((2..).map(|i| format!("{branch_name}_zeroed_{i}")))
            .find(|n| graph.value_by_name(n).is_none())
            .unwrap_or_default();
        let mut zeroed = Value::new(name.clone(), ValueKind::Produced);
        zeroed.dtype = graph.value(branch).dtype;
        zeroed.shape = graph.value(branch).shape.clone();
        let zeroed = graph.add_value(zeroed).map_err(|e| PassError::StaleBlockReport(e.to_string()))?;
        // The Add's position: the writer keeps the Mul beside the sum it feeds.
        let seq = graph.op(add).seq;
        let mul = Op { name, op_type: "Mul".into(), domain: String::new(), attributes: Vec::new(), meta: Default::default(), seq };
        graph.add_op(mul, &[Some(branch), Some(zero)], &[Some(zeroed)]).map_err(|e| PassError::StaleBlockReport(e.to_string()))?;
        graph.set_op_input(add, slot, zeroed);
    }
    Ok(())
}
