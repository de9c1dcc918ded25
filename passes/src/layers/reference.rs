//! The verification reference of a removal: the original with the removed branches zeroed.
//!
//! Each selected residual sum `y = x + f(x)` becomes `y = x + Mul(f(x), 0)`, with the zero a
//! scalar constant of the branch's element type. For finite branch values this is exactly `x`
//! (`x + 0 = x`, and `x + (−0) = x`), so the removed model must equal the reference to float
//! rounding of the rest of the graph; a branch that overflows to ±Inf or NaN makes the reference
//! NaN where the removal does not, which a comparison reports rather than hides. The branch is
//! still computed, so the reference runs the original's ops in the original's order.

use super::detect::BlockReport;
use super::remove::{Selection, selected_regions};
use crate::PassError;
use prunec_ir::{DType, Model, Op, Tensor, Value, ValueKind};

/// Zeroes the residual branches of the selected layers and sub-blocks of `report` in `model`
/// (a copy of the model the report was made for); returns the number of branches zeroed.
pub fn zero_residuals(model: &mut Model, report: &BlockReport, which: &[Selection]) -> Result<usize, PassError> {
    let regions = selected_regions(model, report, which)?;
    let graph = &mut model.graph;
    for region in &regions {
        let branch = region.branch_value;
        let dtype = graph.value(branch).dtype.unwrap_or(DType::F32);
        let bytes = dtype
            .bit_width()
            .filter(|_| dtype.is_float())
            .ok_or_else(|| PassError::StaleBlockReport(format!("the branch of `{}` is {dtype}, not a float", region.add)))?
            .div_ceil(8) as usize;
        let base = graph.value(branch).name.clone();
        let zero = graph.add_initializer(&format!("{base}_zero"), Tensor::from_raw("", dtype, &[], vec![0; bytes]));
        let name = std::iter::once(format!("{base}_zeroed"))
            .chain((2..).map(|i| format!("{base}_zeroed_{i}")))
            .find(|n| graph.value_by_name(n).is_none())
            .unwrap_or_default();
        let mut zeroed = Value::new(name.clone(), ValueKind::Produced);
        zeroed.dtype = graph.value(branch).dtype;
        zeroed.shape = graph.value(branch).shape.clone();
        let zeroed = graph.add_value(zeroed).map_err(|e| PassError::StaleBlockReport(e.to_string()))?;
        let seq = graph.op(region.add_op).seq;
        let mul = Op {
            name: name.clone(),
            op_type: "Mul".into(),
            domain: String::new(),
            attributes: Vec::new(),
            meta: Default::default(),
            seq,
        };
        graph.add_op(mul, &[Some(branch), Some(zero)], &[Some(zeroed)]).map_err(|e| PassError::StaleBlockReport(e.to_string()))?;
        graph.set_op_input(region.add_op, 1 - region.skip_slot, zeroed);
    }
    Ok(regions.len())
}
