//! Keeping the recorded types (`ValueInfoProto`s) in step with the graph.
//!
//! A value's records are written back verbatim, so every size a pass changes must reach them:
//! ONNX's checker (`full_check`), strict shape inference and tract all refuse a model whose
//! records contradict what its weights and ops give. [`Graph::reconcile_records`] is the net under
//! every pass: where the IR knows a size it corrects a record that says otherwise, and where the
//! IR no longer knows one the record loses it too, so no stale size survives.

use crate::graph::{Graph, Listed, Value, ValueKind};
use crate::proto::{self, tensor_shape_proto::dimension::Value as DimValue};
use crate::shape::{Dim, Shape};

/// The shape a tensor record declares, to change.
pub(crate) fn recorded_shape_mut(info: &mut proto::ValueInfoProto) -> Option<&mut proto::TensorShapeProto> {
    match info.r#type.as_mut()?.value.as_mut()? {
        proto::type_proto::Value::TensorType(t) => t.shape.as_mut(),
        _ => None,
    }
}

/// Makes `record` agree with `shape`, what the IR knows of the value now (`None`: not even the
/// rank). A recorded size the IR contradicts becomes the IR's; one it no longer knows is dropped
/// (the record keeps the axis, with neither size nor name), as is the whole shape when the rank
/// differs. Names (`dim_param`) are kept: a symbol the IR has a size for (after `--input-shape`)
/// still holds for that size, and negative sizes (PaddlePaddle's "open") say nothing to contradict.
fn reconcile(record: &mut proto::ValueInfoProto, shape: Option<&Shape>) -> bool {
    let Some(recorded) = recorded_shape_mut(record) else { return false };
    let Some(shape) = shape.filter(|s| s.rank() == recorded.dim.len()) else {
        if let Some(proto::type_proto::Value::TensorType(t)) = record.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            t.shape = None;
        }
        return true;
    };
    let mut changed = false;
    for (d, now) in recorded.dim.iter_mut().zip(&shape.0) {
        let Some(DimValue::DimValue(n)) = d.value else { continue };
        if n < 0 {
            continue;
        }
        match now {
            Dim::Known(m) if *m == n as u64 => {}
            Dim::Known(m) => {
                d.value = Some(DimValue::DimValue(*m as i64));
                changed = true;
            }
            Dim::Sym(_) | Dim::Unknown => {
                d.value = None;
                changed = true;
            }
        }
    }
    changed
}

impl Value {
    /// Makes every record of this value agree with its shape (an initializer's: its tensor's).
    /// Whether any record changed.
    pub fn reconcile_records(&mut self) -> bool {
        let shape = match &self.kind {
            ValueKind::Initializer(t) => Some(Shape::known(&t.dims())),
            _ => self.shape.clone(),
        };
        let mut changed = false;
        for record in self.records_mut() {
            changed |= reconcile(record, shape.as_ref());
        }
        changed
    }
}

impl Graph {
    /// Makes every record of the graph agree with it: each value's records with its shape, and
    /// no orphan `value_info` naming a value the graph holds (a repeated record, or one whose name
    /// a pass has since given to a new value), which nothing would keep in step. Subgraph bodies
    /// are not visited: every axis an op with subgraphs touches is frozen, so no pass changes a
    /// size they record. The number of records changed or dropped.
    pub fn reconcile_records(&mut self) -> usize {
        let ids: Vec<_> = self.value_ids().collect();
        let mut changed = 0;
        for id in ids {
            changed += self.value_mut(id).reconcile_records() as usize;
        }
        let before = self.value_infos.len();
        let held: Vec<bool> =
            self.value_infos.iter().map(|l| matches!(l, Listed::Orphan(info) if self.value_by_name(info.name()).is_some())).collect();
        let mut held = held.into_iter();
        self.value_infos.retain(|_| !held.next().unwrap_or(false));
        changed + (before - self.value_infos.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::InfoList;
    use crate::tensor::Tensor;

    fn record(name: &str, dims: &[DimValue]) -> proto::ValueInfoProto {
        proto::ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(proto::TypeProto {
                value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(proto::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| proto::tensor_shape_proto::Dimension { value: Some(d.clone()), denotation: None })
                            .collect(),
                    }),
                })),
                denotation: None,
            }),
            ..Default::default()
        }
    }

    fn dims(info: &proto::ValueInfoProto) -> Vec<Option<DimValue>> {
        let mut info = info.clone();
        recorded_shape_mut(&mut info).map(|s| s.dim.iter().map(|d| d.value.clone()).collect()).unwrap_or_default()
    }

    #[test]
    fn a_sliced_weight_takes_its_new_size_into_every_record() {
        let mut g = Graph::default();
        let w = g.add_initializer("w", Tensor::from_f32("w", &[4, 3], &[0.0; 12]));
        g.value_mut(w).add_record(InfoList::ValueInfo, record("w", &[DimValue::DimValue(4), DimValue::DimValue(3)]));
        g.value_infos.push(Listed::Value(w));
        g.set_initializer(w, Tensor::from_f32("w", &[2, 3], &[0.0; 6]));
        g.reconcile_records();
        assert_eq!(dims(g.value(w).record(InfoList::ValueInfo).unwrap()), [Some(DimValue::DimValue(2)), Some(DimValue::DimValue(3))]);
    }

    #[test]
    fn a_size_the_graph_no_longer_knows_leaves_the_record_and_names_stay() {
        let mut v = Value::new("x", ValueKind::Produced);
        v.set_info(record("x", &[DimValue::DimParam("batch".into()), DimValue::DimValue(8)]));
        v.add_record(InfoList::Output, record("x", &[DimValue::DimParam("batch".into()), DimValue::DimValue(8)]));
        v.shape = Some(Shape(vec![Dim::Known(1), Dim::Unknown]));
        assert!(v.reconcile_records());
        for info in [v.record(InfoList::ValueInfo).unwrap(), v.record(InfoList::Output).unwrap()] {
            assert_eq!(dims(info), [Some(DimValue::DimParam("batch".into())), None]);
        }
        v.shape = Some(Shape(vec![Dim::Known(1)]));
        v.reconcile_records();
        assert_eq!(dims(v.info.as_ref().unwrap()), [], "a record of another rank loses its shape");
    }

    #[test]
    fn an_orphan_record_naming_a_value_is_dropped_and_others_stay() {
        let mut g = Graph::default();
        let w = g.add_initializer("w", Tensor::from_f32("w", &[2], &[0.0; 2]));
        g.value_infos.push(Listed::Orphan(Box::new(record("w", &[DimValue::DimValue(4)]))));
        g.value_infos.push(Listed::Orphan(Box::new(record("elsewhere", &[DimValue::DimValue(4)]))));
        assert_eq!(g.reconcile_records(), 1);
        assert!(matches!(&g.value_infos[..], [Listed::Orphan(o)] if o.name() == "elsewhere"));
        assert!(g.value(w).info.is_none());
    }
}
