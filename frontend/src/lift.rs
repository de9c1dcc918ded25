//! Lifting a decoded `ModelProto` into the IR.

use crate::ReadError;
use crate::check;
use crate::external::ExternalData;
use prunec_ir::{Attribute, Graph, InfoList, IrError, Listed, Model, NodeMeta, Op, Value, ValueKind, captured_names, proto};
use std::collections::HashMap;
use std::path::Path;

/// Moves the main graph of `proto` into a [`Graph`], keeping every other field in the shells.
pub(crate) fn lift(
    mut proto: proto::ModelProto,
    dir: &Path,
    model_pages: Option<std::sync::Arc<crate::external::MappedFile>>,
) -> Result<Model, ReadError> {
    check::check_is_onnx(&proto)?;
    let graph = proto.graph.take().ok_or(IrError::MissingGraph)?;
    check::check_ir_version(&proto)?;
    check::check_opsets(&proto, &graph)?;
    check::check_function_calls(&proto)?;
    for f in &proto.functions {
        reject_nested_external(f.node.iter())?;
        check::check_attributes(&f.node)?;
    }
    check::check_attributes(&graph.node)?;
    for s in &graph.sparse_initializer {
        check::check_sparse(s)?;
    }
    let mut externals = ExternalData::new(dir, model_pages);
    let graph = lift_graph(graph, &mut externals)?;
    prunec_ir::validate(&graph)?;
    Ok(Model { shell: proto, graph })
}

fn lift_graph(g: proto::GraphProto, externals: &mut ExternalData) -> Result<Graph, ReadError> {
    let proto::GraphProto {
        node,
        name,
        initializer,
        doc_string,
        input,
        output,
        value_info,
        quantization_annotation,
        sparse_initializer,
        metadata_props,
    } = g;
    reject_nested_external(node.iter())?;
    let mut graph = Graph::new(proto::GraphProto { name, doc_string, quantization_annotation, metadata_props, ..Default::default() });

    for t in initializer {
        let name = t.name().to_string();
        let tensor = externals.tensor(t)?;
        let id = graph.add_value(Value::new(name, ValueKind::Initializer(tensor)))?;
        graph.initializers.push(id);
    }
    for s in sparse_initializer {
        let name = s.values.as_ref().map(|v| v.name().to_string()).unwrap_or_default();
        let id = graph.add_value(Value::new(name, ValueKind::SparseInitializer(Box::new(s))))?;
        graph.sparse_initializers.push(id);
    }
    for info in input {
        let id = match graph.value_by_name(info.name()) {
            // IR versions < 4 list initializers as inputs too.
            Some(id) if graph.value(id).initializer().is_some() && !graph.inputs.contains(&id) => id,
            _ => graph.add_value(Value::new(info.name(), ValueKind::Input))?,
        };
        graph.value_mut(id).set_info(info);
        graph.inputs.push(id);
    }

    // Outputs first, inputs second: a node may read a value that a later node produces (the
    // order is checked by `topo_order`, not by position).
    let mut pending = Vec::with_capacity(node.len());
    let mut producers = HashMap::new();
    for (seq, n) in node.into_iter().enumerate() {
        let proto::NodeProto {
            input,
            output,
            name,
            op_type,
            domain,
            overload,
            attribute,
            doc_string,
            metadata_props,
            device_configurations,
        } = n;
        let node_name = name.clone().unwrap_or_default();
        let outputs = output
            .iter()
            .map(|o| {
                if o.is_empty() {
                    return Ok(None);
                }
                let id =
                    graph.add_value(Value::new(o.clone(), ValueKind::Produced)).map_err(|e| name_producers(e, &producers, &node_name))?;
                producers.insert(o.clone(), node_name.clone());
                Ok(Some(id))
            })
            .collect::<Result<Vec<_>, IrError>>()?;
        let attributes = attribute.into_iter().map(|a| lift_attribute(a, externals)).collect::<Result<Vec<_>, _>>()?;
        let op = Op {
            meta: NodeMeta {
                has_name: name.is_some(),
                has_domain: domain.is_some(),
                doc_string,
                overload,
                metadata_props,
                device_configurations,
            },
            name: name.unwrap_or_default(),
            op_type: op_type.unwrap_or_default(),
            domain: domain.unwrap_or_default(),
            attributes,
            seq: seq as u64,
        };
        pending.push((op, input, outputs));
    }
    for (op, input_names, outputs) in pending {
        let mut inputs = Vec::with_capacity(input_names.len());
        for (slot, name) in input_names.iter().enumerate() {
            if name.is_empty() {
                inputs.push(None);
                continue;
            }
            let id = graph.value_by_name(name).ok_or_else(|| IrError::UndefinedInput {
                node: op.name.clone(),
                op_type: op.op_type.clone(),
                value: name.clone(),
                slot,
            })?;
            inputs.push(Some(id));
        }
        let captured: Vec<String> = op.subgraphs().flat_map(captured_names).collect();
        let (node_name, op_type) = (op.name.clone(), op.op_type.clone());
        let id = graph.add_op(op, &inputs, &outputs)?;
        let mut seen = std::collections::BTreeSet::new();
        for name in captured.into_iter().filter(|n| seen.insert(n.clone())) {
            let value = graph.value_by_name(&name).ok_or_else(|| IrError::UndefinedInput {
                node: node_name.clone(),
                op_type: op_type.clone(),
                value: name.clone(),
                slot: inputs.len(),
            })?;
            graph.add_capture(id, value);
        }
    }

    // A value named in several lists keeps each list's record: they may differ (a converter's
    // value_info entry for an output, with no shape, beside the output's declared shape), and
    // `--passes none` gives every list back as read.
    for info in output {
        let id = graph.value_by_name(info.name()).ok_or_else(|| IrError::UndefinedOutput(info.name().to_string()))?;
        if !graph.outputs.contains(&id) {
            graph.value_mut(id).add_record(InfoList::Output, info);
        }
        graph.outputs.push(id);
    }
    for info in value_info {
        match graph.value_by_name(info.name()) {
            Some(id) if !graph.value_infos.contains(&Listed::Value(id)) => {
                graph.value_mut(id).add_record(InfoList::ValueInfo, info);
                graph.value_infos.push(Listed::Value(id));
            }
            // A value_info naming no value (or repeating one) describes nothing the IR holds;
            // keep it verbatim, in its place, so the writer emits it again.
            _ => graph.value_infos.push(Listed::Orphan(Box::new(info))),
        }
    }
    graph.topo_order()?;
    Ok(graph)
}

/// Node outputs are added before any node is, so the IR can only call a second definition "node
/// output"; name the nodes that produce the value instead.
fn name_producers(e: IrError, producers: &HashMap<String, String>, node: &str) -> IrError {
    match e {
        IrError::DuplicateValue { name, first, .. } => {
            let first = producers.get(&name).map_or(first, |p| format!("output of node `{p}`"));
            IrError::DuplicateValue { name, first, second: format!("output of node `{node}`") }
        }
        e => e,
    }
}

fn lift_attribute(mut a: proto::AttributeProto, externals: &mut ExternalData) -> Result<Attribute, ReadError> {
    let tensor = a.t.take().map(|t| externals.tensor(t)).transpose()?;
    Ok(Attribute { proto: a, tensor })
}

/// External data inside subgraphs and functions would need relocating on write, which the
/// writer does not do yet; refuse rather than emit a model whose data file is missing.
fn reject_nested_external<'a>(nodes: impl Iterator<Item = &'a proto::NodeProto>) -> Result<(), ReadError> {
    for n in nodes {
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                let external = g.initializer.iter().find(|t| t.data_location() == proto::tensor_proto::DataLocation::External);
                if let Some(t) = external {
                    return Err(ReadError::Unsupported(format!(
                        "tensor `{}` in a subgraph of node `{}` uses external data",
                        t.name(),
                        n.name()
                    )));
                }
                reject_nested_external(g.node.iter())?;
            }
        }
    }
    Ok(())
}
