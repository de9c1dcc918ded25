//! The text dump of a model: the format of `prunec dump` and of every snapshot test.
//!
//! One line per graph input, weight, op and output, in the order the writer would emit them.
//! The format is stable and deterministic: no addresses, no hash-map order, floats printed in
//! a fixed notation. Users snapshot it too, so change it only on purpose.
//!
//! ```text
//! input  %x: f32[1,4]
//! weight %w: f32[4,8] mean=1.200e-2 std=3.400e-1 absmax=9.900e-1
//! op     %h: f32[1,8] = MatMul "/fc/MatMul" (%x, %w)
//! output %h
//! ```

use crate::graph::{Attribute, Graph, Model, Value};
use crate::proto;
use crate::shape::DType;
use crate::tensor::Tensor;
use std::fmt::Write;

/// Renders the text dump of a model.
pub fn dump(model: &Model) -> String {
    let mut out = String::new();
    let shell = &model.shell;
    let opsets: Vec<String> = shell
        .opset_import
        .iter()
        .map(|o| format!("{}:{}", if o.domain().is_empty() { "ai.onnx" } else { o.domain() }, o.version()))
        .collect();
    let _ = writeln!(out, "model ir_version={} opsets=[{}]", shell.ir_version(), opsets.join(", "));
    if !shell.functions.is_empty() {
        let names: Vec<String> = shell.functions.iter().map(|f| format!("{}.{}", f.domain(), f.name())).collect();
        let _ = writeln!(out, "functions [{}]", names.join(", "));
    }
    dump_graph(&model.graph, &mut out);
    out
}

fn dump_graph(graph: &Graph, out: &mut String) {
    let _ = writeln!(out, "graph {:?}", graph.shell.name());
    for &id in &graph.inputs {
        let v = graph.value(id);
        if v.initializer().is_none() {
            let _ = writeln!(out, "input  {}", typed(v));
        }
    }
    for &id in &graph.initializers {
        let v = graph.value(id);
        if let Some(t) = v.initializer() {
            let _ = writeln!(out, "weight %{}: {}", v.name, tensor_summary(t));
        }
    }
    for &id in &graph.sparse_initializers {
        let _ = writeln!(out, "sparse {}", typed(graph.value(id)));
    }
    let order = match graph.topo_order() {
        Ok(order) => order,
        Err(e) => {
            let _ = writeln!(out, "error  {e}");
            return;
        }
    };
    for op_id in order {
        let op = graph.op(op_id);
        let outputs: Vec<String> =
            graph.op_outputs(op_id).into_iter().map(|o| o.map_or("_".to_string(), |v| typed(graph.value(v)))).collect();
        let inputs: Vec<String> =
            graph.op_inputs(op_id).into_iter().map(|i| i.map_or("_".to_string(), |v| format!("%{}", graph.value(v).name))).collect();
        let op_type = if op.domain.is_empty() { op.op_type.clone() } else { format!("{}.{}", op.domain, op.op_type) };
        let _ = write!(out, "op     {} = {op_type} {:?} ({})", outputs.join(", "), op.name, inputs.join(", "));
        let captures = graph.op_captures(op_id);
        if !captures.is_empty() {
            let names: Vec<String> = captures.iter().map(|&v| format!("%{}", graph.value(v).name)).collect();
            let _ = write!(out, " captures({})", names.join(", "));
        }
        let attrs: Vec<String> = op.attributes.iter().map(attribute).collect();
        if !attrs.is_empty() {
            let _ = write!(out, " {{{}}}", attrs.join(", "));
        }
        out.push('\n');
        for a in &op.attributes {
            for sub in a.proto.g.iter().chain(a.proto.graphs.iter()) {
                let _ = writeln!(out, "       {}:", a.name());
                dump_subgraph(sub, 2, out);
            }
        }
    }
    for &id in &graph.outputs {
        let _ = writeln!(out, "output %{}", graph.value(id).name);
    }
}

/// Subgraph bodies stay protobuf in the IR; they are listed node by node, without shapes.
fn dump_subgraph(g: &proto::GraphProto, depth: usize, out: &mut String) {
    let pad = "    ".repeat(depth);
    for t in &g.initializer {
        let _ = writeln!(out, "{pad}weight %{}: {}", t.name(), proto_tensor_summary(t));
    }
    for n in &g.node {
        let inputs: Vec<String> = n.input.iter().map(|i| if i.is_empty() { "_".into() } else { format!("%{i}") }).collect();
        let outputs: Vec<String> = n.output.iter().map(|o| format!("%{o}")).collect();
        let attrs: Vec<String> = n.attribute.iter().map(|a| attribute_text(a, a.t.as_ref().map(proto_tensor_summary))).collect();
        let _ = write!(out, "{pad}op {} = {} {:?} ({})", outputs.join(", "), n.op_type(), n.name(), inputs.join(", "));
        if !attrs.is_empty() {
            let _ = write!(out, " {{{}}}", attrs.join(", "));
        }
        out.push('\n');
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                let _ = writeln!(out, "{pad}  {}:", a.name());
                dump_subgraph(sub, depth + 1, out);
            }
        }
    }
    let outputs: Vec<String> = g.output.iter().map(|o| format!("%{}", o.name())).collect();
    let _ = writeln!(out, "{pad}return {}", outputs.join(", "));
}

fn typed(v: &Value) -> String {
    let dtype = v.dtype.map_or("?".to_string(), |d| d.to_string());
    let shape = v.shape.as_ref().map_or("[?]".to_string(), |s| s.to_string());
    format!("%{}: {dtype}{shape}", v.name)
}

fn attribute(a: &Attribute) -> String {
    attribute_text(&a.proto, a.tensor.as_ref().map(tensor_summary))
}

fn attribute_text(a: &proto::AttributeProto, tensor: Option<String>) -> String {
    use proto::attribute_proto::AttributeType as T;
    let name = a.name();
    if let Some(r) = &a.ref_attr_name {
        return format!("{name}=@{r}");
    }
    let floats = |v: &[f32]| v.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(",");
    let value = match a.r#type() {
        T::Float => format!("{:?}", a.f()),
        T::Int => a.i().to_string(),
        T::String => format!("{:?}", String::from_utf8_lossy(a.s())),
        T::Tensor => tensor.unwrap_or_else(|| "tensor".into()),
        T::Graph => format!("graph {:?}", a.g.as_ref().map_or("", |g| g.name())),
        T::Floats => format!("[{}]", floats(&a.floats)),
        T::Ints => format!("[{}]", a.ints.iter().map(i64::to_string).collect::<Vec<_>>().join(",")),
        T::Strings => format!("[{}]", a.strings.iter().map(|s| format!("{:?}", String::from_utf8_lossy(s))).collect::<Vec<_>>().join(",")),
        T::Tensors => format!("[{} tensors]", a.tensors.len()),
        T::Graphs => format!("[{} graphs]", a.graphs.len()),
        T::SparseTensor => "sparse tensor".into(),
        T::SparseTensors => format!("[{} sparse tensors]", a.sparse_tensors.len()),
        T::TypeProto => "type".into(),
        T::TypeProtos => format!("[{} types]", a.type_protos.len()),
        T::Undefined => "undefined".into(),
    };
    format!("{name}={value}")
}

/// A tensor as `f32[64,3,7,7] mean=… std=… absmax=…`, or with its values when it has at most 8.
pub(crate) fn tensor_summary(t: &Tensor) -> String {
    let dims = t.dims().iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let head = format!("{}[{dims}]", t.dtype());
    let external = if t.is_external() { " external" } else { "" };
    match t.to_f64_vec() {
        Some(values) => format!("{head}{external} {}", values_summary(&values, t.dtype())),
        None => format!("{head}{external}"),
    }
}

fn proto_tensor_summary(t: &proto::TensorProto) -> String {
    match Tensor::from_proto(t.clone()) {
        Ok(t) => tensor_summary(&t),
        Err(_) => format!("{}{:?} (not readable)", DType(t.data_type()), t.dims),
    }
}

fn values_summary(values: &[f64], dtype: DType) -> String {
    if values.len() <= 8 {
        let items: Vec<String> = values.iter().map(|&v| if dtype.is_float() { fmt_float(v) } else { format!("{}", v as i64) }).collect();
        return format!("= [{}]", items.join(","));
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let absmax = values.iter().fold(0f64, |m, v| m.max(v.abs()));
    format!("mean={} std={} absmax={}", fmt_float(mean), fmt_float(var.sqrt()), fmt_float(absmax))
}

/// Four significant digits in scientific notation: stable across platforms, readable in diffs.
fn fmt_float(v: f64) -> String {
    if v == 0.0 { "0".into() } else { format!("{v:.3e}") }
}
