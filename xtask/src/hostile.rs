//! Builds the hostile-input corpus under `testdata/hostile/`: malformed and malicious ONNX
//! models that prunec must refuse with exit code 1 and a message naming the problem, without
//! panicking, hanging, allocating what a file merely declares or reading outside the model's
//! folder.
//!
//! Each case is one small file `<name>.onnx`, or a folder `<name>/` holding `model.onnx` and the
//! external data (or symlink) it points at. `MANIFEST.json` lists every case with a phrase the
//! error message must contain; `tests/hostile.rs` runs every command of the CLI over the corpus
//! and checks the committed files are what this module generates.
//!
//! This file is also compiled into `tests/hostile.rs` (by `#[path]`, with `proto.rs` beside it as
//! `crate::proto`), so it only uses crates both have: prost (with its `bytes` re-export),
//! prunec-ir, anyhow and serde_json.
//!
//! The output is byte-identical on every run: nothing records a time, a path or a random draw.

use crate::proto::{attr, attr_graph, attr_int, attr_ints, attr_tensor, tensor_f32, tensor_i64};
use anyhow::{Context, Result, ensure};
use prost::Message;
use prost::bytes::Bytes;
use prost::encoding::{WireType, encode_key, encode_varint};
use prunec_ir::proto::{
    AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, SparseTensorProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType,
    tensor_proto::{DataLocation, DataType},
    tensor_shape_proto::{Dimension, dimension},
    type_proto,
};
use std::fs;
use std::path::{Path, PathBuf};

/// The corpus folder, relative to the workspace root.
pub const CORPUS_DIR: &str = "testdata/hostile";
/// The manifest file inside the corpus folder.
pub const MANIFEST: &str = "MANIFEST.json";
/// Levels of nested `If` in the deepest case: far past prost's recursion limit of 100.
pub const DEEP_IF_LEVELS: usize = 10_000;
/// Levels of nested `If` in the case that still decodes (each level costs prost three message
/// levels: graph, node, attribute), so the reader's own walks over subgraphs are exercised.
pub const DECODABLE_IF_LEVELS: usize = 24;

/// One hostile model.
pub struct Case {
    /// File or folder name in the corpus, without extension.
    pub name: &'static str,
    /// What is wrong with it.
    pub what: &'static str,
    /// A phrase the error message must contain: it names the problem (and the tensor, node or
    /// location at fault where there is one).
    pub expect: &'static str,
    /// The files of the case; a single-file case has one, at `<name>.onnx`.
    pub files: Vec<Entry>,
}

/// A file of a case, relative to the corpus folder.
pub enum Entry {
    /// A regular file.
    File(String, Vec<u8>),
    /// A symbolic link and its target (relative to the link's folder).
    Symlink(String, String),
    /// A FIFO (named pipe). Git stores no FIFOs, so the committed corpus lacks these entries;
    /// `tests/hostile.rs` runs the corpus as generated.
    Fifo(String),
    /// A Unix socket, likewise not in the committed corpus.
    Socket(String),
}

impl Entry {
    /// Whether git can store the entry: only such entries are in the committed corpus.
    pub fn is_committed(&self) -> bool {
        matches!(self, Entry::File(..) | Entry::Symlink(..))
    }
}

impl Case {
    /// The model file, relative to the corpus folder.
    pub fn model_path(&self) -> String {
        match self.files.as_slice() {
            [Entry::File(path, _)] => path.clone(),
            _ => format!("{}/model.onnx", self.name),
        }
    }
}

/// `cargo xtask hostile [--out DIR]`: writes the corpus to `DIR` (default `testdata/hostile/`,
/// which is emptied first so a removed case does not linger). `cargo xtask hostile --mixed-chain
/// N FILE` writes the valid long-chain model of [`valid_mixed_chain`] instead, for BENCHMARKS.md.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let out = match args {
        [] => root.join(CORPUS_DIR),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        [flag, n, file] if flag == "--mixed-chain" => {
            let n: usize = n.parse().with_context(|| format!("--mixed-chain takes a number of ops, not `{n}`"))?;
            return write(Path::new(file), &valid_mixed_chain(n));
        }
        _ => anyhow::bail!("usage: cargo xtask hostile [--out DIR | --mixed-chain N FILE]"),
    };
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("emptying {}", out.display()))?;
    }
    let cases = write_corpus(&out)?;
    let bytes: u64 = cases.iter().flat_map(|c| &c.files).map(|e| if let Entry::File(_, b) = e { b.len() as u64 } else { 0 }).sum();
    eprintln!("wrote {} hostile cases ({bytes} bytes) to {}", cases.len(), out.display());
    let special = cases.iter().flat_map(|c| &c.files).filter(|e| !e.is_committed()).count();
    eprintln!("{special} FIFOs and sockets among them are not stored by git; the tests make them afresh");
    Ok(())
}

/// Writes every case and the manifest under `dir`, returning the cases.
pub fn write_corpus(dir: &Path) -> Result<Vec<Case>> {
    let cases = cases()?;
    let mut names = std::collections::BTreeSet::new();
    for case in &cases {
        ensure!(names.insert(case.name), "case name `{}` is repeated", case.name);
        for entry in &case.files {
            match entry {
                Entry::File(rel, bytes) => write(&dir.join(rel), bytes)?,
                Entry::Symlink(rel, target) => symlink(&dir.join(rel), target)?,
                Entry::Fifo(rel) => fifo(&dir.join(rel))?,
                Entry::Socket(rel) => socket(&dir.join(rel))?,
            }
        }
    }
    write(&dir.join(MANIFEST), manifest(&cases).as_bytes())?;
    Ok(cases)
}

/// The manifest: one entry per case, in corpus order.
pub fn manifest(cases: &[Case]) -> String {
    let entries: Vec<serde_json::Value> =
        cases.iter().map(|c| serde_json::json!({ "name": c.name, "model": c.model_path(), "what": c.what, "expect": c.expect })).collect();
    let mut text = serde_json::to_string_pretty(&serde_json::json!({ "cases": entries })).expect("JSON values always serialise");
    text.push('\n');
    text
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("corpus paths have a parent folder");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(unix)]
fn symlink(path: &Path, target: &str) -> Result<()> {
    let dir = path.parent().expect("corpus paths have a parent folder");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::os::unix::fs::symlink(target, path).with_context(|| format!("linking {} to {target}", path.display()))
}

#[cfg(not(unix))]
fn symlink(path: &Path, _target: &str) -> Result<()> {
    anyhow::bail!("{}: the hostile corpus holds a symlink, which needs a Unix file system", path.display())
}

/// Makes a FIFO with coreutils' `mkfifo` (std has no call for it, and the test that compiles
/// this file has no libc).
fn fifo(path: &Path) -> Result<()> {
    let dir = path.parent().expect("corpus paths have a parent folder");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let status = std::process::Command::new("mkfifo").arg(path).status().context("running mkfifo (coreutils)")?;
    ensure!(status.success(), "mkfifo {} failed: {status}", path.display());
    Ok(())
}

/// Leaves a Unix socket file behind: binding creates it, and dropping the listener keeps it.
#[cfg(unix)]
fn socket(path: &Path) -> Result<()> {
    let dir = path.parent().expect("corpus paths have a parent folder");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::os::unix::net::UnixListener::bind(path).with_context(|| format!("binding a socket at {}", path.display()))?;
    Ok(())
}

#[cfg(not(unix))]
fn socket(path: &Path) -> Result<()> {
    anyhow::bail!("{}: the hostile corpus holds a Unix socket", path.display())
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// Every case, in manifest order.
pub fn cases() -> Result<Vec<Case>> {
    let tiny = tiny_model().encode_to_vec();
    let mut cases = vec![
        // Bytes that are not an ONNX protobuf at all.
        file("empty", "a file of zero bytes", "is empty", vec![]),
        file("png_header", "a PNG image, not a protobuf", "is not a valid ONNX protobuf: invalid tag value: 0", png()),
        file("text", "ONNX's text format, which prunec does not read", "is not a valid ONNX protobuf", text_model()),
        file("truncated_after_1_byte", "a valid model cut after its first byte", "truncated", tiny[..1].to_vec()),
        file("truncated_at_half", "a valid model cut in half", "truncated", tiny[..tiny.len() / 2].to_vec()),
        file("truncated_before_last_byte", "a valid model without its last byte", "truncated", tiny[..tiny.len() - 1].to_vec()),
        file("truncated_in_raw_data", "a valid model cut inside the weight's raw_data", "truncated", cut_in_raw_data(&tiny)?),
        file(
            "wire_type_ir_version_as_bytes",
            "ir_version (an int64) stored as a length-delimited field",
            "invalid wire type",
            [ld(1, b"\x08"), tiny.clone()].concat(),
        ),
        file(
            "wire_type_graph_as_varint",
            "the graph field stored as a varint",
            "invalid wire type",
            [varint_field(7, 1), tiny.clone()].concat(),
        ),
        file(
            "wire_type_node_name_as_fixed32",
            "a node's name stored as a fixed32 inside the graph",
            "invalid wire type",
            wire_type_in_node()?,
        ),
        file(
            "wire_type_7",
            "a field key with wire type 7, which does not exist",
            "invalid wire type value: 7",
            [vec![0x0f], tiny.clone()].concat(),
        ),
        file("field_number_0", "a field key with field number 0", "invalid tag value: 0", [vec![0x00, 0x00], tiny.clone()].concat()),
        file("invalid_utf8_node_name", "a node name that is not UTF-8", "not UTF-8", invalid_utf8(&tiny)?),
        file(
            "length_claims_2_60_bytes",
            "the graph field claiming 2^60 bytes in a 20-byte file",
            "truncated",
            [key(7, WireType::LengthDelimited), varint(1 << 60), vec![0; 16]].concat(),
        ),
        file("packed_dims_claim_2_60_bytes", "a weight's packed dims claiming 2^60 bytes", "truncated", packed_dims_claim()?),
        file(
            "nested_if_10000_levels",
            "an If whose then_branch holds an If, 10000 levels deep (prost's limit is 100)",
            "nested too deeply",
            deep_if(DEEP_IF_LEVELS)?,
        ),
        // Models that decode but break the rules of ONNX.
        model("no_graph", "a model without a graph", "the model has no graph", ModelProto { graph: None, ..tiny_model() }),
        model("ir_version_0", "ir_version 0", "ir_version 0", ModelProto { ir_version: Some(0), ..tiny_model() }),
        model(
            "ir_version_absurd",
            "ir_version 2^62",
            "ir_version 4611686018427387904",
            ModelProto { ir_version: Some(1 << 62), ..tiny_model() },
        ),
        model(
            "ir_version_missing",
            "no ir_version at all",
            "does not declare its ir_version",
            ModelProto { ir_version: None, ..tiny_model() },
        ),
        model("opset_999", "an import of default-domain opset 999", "imports opset 999 of the default ONNX domain", {
            let mut m = tiny_model();
            m.opset_import[0].version = Some(999);
            m
        }),
        model(
            "cycle",
            "two nodes that read each other's output",
            "the graph has a cycle through node `a` (Add)",
            tiny_with(|g| {
                g.node = vec![
                    node("matmul", "MatMul", &["x", "W"], &["h"], vec![]),
                    node("a", "Add", &["h", "b_out"], &["a_out"], vec![]),
                    node("b", "Relu", &["a_out"], &["b_out"], vec![]),
                    node("relu", "Relu", &["b_out"], &["y"], vec![]),
                ];
            }),
        ),
        model(
            "self_loop",
            "a node that reads its own output",
            "the graph has a cycle through node `relu` (Relu)",
            tiny_with(|g| {
                g.node[1].input = vec!["y".into()];
            }),
        ),
        model(
            "two_nodes_one_output",
            "two nodes writing the value `h`",
            "value `h` is defined twice",
            tiny_with(|g| {
                g.node.insert(1, node("other", "Relu", &["x"], &["h"], vec![]));
            }),
        ),
        model(
            "two_initializers_one_name",
            "two initializers called `W`",
            "value `W` is defined twice",
            tiny_with(|g| {
                g.initializer.push(tensor_f32("W", &[4, 4], &weights(16)));
            }),
        ),
        model(
            "initializer_named_like_node_output",
            "an initializer called like the output `h`",
            "value `h` is defined twice",
            tiny_with(|g| {
                g.initializer.push(tensor_f32("h", &[1, 4], &[0.0; 4]));
            }),
        ),
        model(
            "input_listed_twice",
            "the graph input `x` declared twice",
            "value `x` is defined twice",
            tiny_with(|g| {
                let x = g.input[0].clone();
                g.input.push(x);
            }),
        ),
        model(
            "node_input_names_nothing",
            "a node reading a value nothing defines",
            "reads `nowhere` as input 0",
            tiny_with(|g| {
                g.node[1].input[0] = "nowhere".into();
            }),
        ),
        model(
            "no_nodes_output_names_nothing",
            "no nodes, and a graph output naming nothing",
            "graph output `y` is not defined",
            tiny_with(|g| {
                g.node.clear();
                g.initializer.clear();
            }),
        ),
        model(
            "nested_if_reads_nothing",
            "If branches nested 24 levels deep whose innermost node reads a value nothing defines",
            "reads `nowhere`",
            nested_if_reading_nothing(DECODABLE_IF_LEVELS),
        ),
        model(
            "empty_op_type",
            "a node with an empty op_type",
            "node `relu` () has no op_type",
            tiny_with(|g| {
                g.node[1].op_type = Some(String::new());
            }),
        ),
        // Tensors whose dims, type and data disagree.
        model(
            "raw_data_too_short",
            "60 bytes of raw_data for a [4, 4] float tensor",
            "tensor `W` has 60 bytes of raw_data",
            tiny_with_weight(|w| {
                w.raw_data = Some(f32_bytes(&weights(15)));
            }),
        ),
        model(
            "raw_data_too_long",
            "68 bytes of raw_data for a [4, 4] float tensor",
            "tensor `W` has 68 bytes of raw_data",
            tiny_with_weight(|w| {
                w.raw_data = Some(f32_bytes(&weights(17)));
            }),
        ),
        model(
            "float_data_too_short",
            "3 float_data entries for a [4, 4] tensor",
            "tensor `W` has 3 entries in float_data",
            tiny_with_weight(|w| {
                w.raw_data = None;
                w.float_data = vec![0.5, 0.25, 0.125];
            }),
        ),
        model(
            "int64_data_too_long",
            "a Reshape shape with 3 int64_data entries for dims [2]",
            "tensor `shape` has 3 entries in int64_data",
            reshape_model(|s| {
                s.raw_data = None;
                s.int64_data = vec![1, 4, 1];
            }),
        ),
        model(
            "negative_dims",
            "a weight with dims [4, -4]",
            "tensor `W` has a negative dimension",
            tiny_with_weight(|w| w.dims = vec![4, -4]),
        ),
        model(
            "dims_overflow_u64",
            "a weight whose dims multiply past 2^64",
            "tensor `W` has dims [4294967296, 4294967296] whose element count overflows 64 bits",
            tiny_with_weight(|w| w.dims = vec![1 << 32, 1 << 32]),
        ),
        model(
            "byte_size_overflows_u64",
            "a weight of 2^63 floats: the element count fits in 64 bits, the byte size does not",
            "whose byte size overflows 64 bits",
            tiny_with_weight(|w| w.dims = vec![1 << 31, 1 << 31, 2]),
        ),
        model(
            "declares_1e12_elements_raw",
            "a weight declaring 10^12 floats with 64 bytes of raw_data",
            "need 4000000000000",
            tiny_with_weight(|w| w.dims = vec![1_000_000, 1_000_000]),
        ),
        model(
            "declares_1e12_elements_typed",
            "a weight declaring 10^12 floats with no data at all",
            "need 1000000000000",
            tiny_with_weight(|w| {
                w.dims = vec![1_000_000, 1_000_000];
                w.raw_data = None;
            }),
        ),
        model(
            "unknown_dtype_999_initializer",
            "a weight of element type 999",
            "tensor `W` has unknown element type code 999",
            tiny_with_weight(|w| w.data_type = Some(999)),
        ),
        model(
            "unknown_dtype_999_input",
            "a graph input of element type 999",
            "value `x` has unknown element type code 999",
            tiny_with(|g| {
                if let Some(type_proto::Value::TensorType(t)) = g.input[0].r#type.as_mut().and_then(|t| t.value.as_mut()) {
                    t.elem_type = Some(999);
                }
            }),
        ),
        model(
            "cast_to_dtype_999",
            "a Cast to element type 999",
            "node `cast` (Cast) casts to unknown element type code 999",
            tiny_with(|g| {
                g.node[1] = node("cast", "Cast", &["h"], &["y"], vec![attr_int("to", 999)]);
            }),
        ),
        model(
            "constant_value_too_short",
            "a Constant node whose value has 2 of 4 floats",
            "tensor `bias` has 8 bytes of raw_data",
            tiny_with(|g| {
                g.node.insert(0, node("bias", "Constant", &[], &["b"], vec![attr_tensor("value", tensor_f32("bias", &[4], &[1.0, 2.0]))]));
                g.node[2] = node("add", "Add", &["h", "b"], &["y"], vec![]);
            }),
        ),
        model(
            "sparse_indices_out_of_range",
            "a sparse initializer whose indices point past its dims",
            "sparse tensor `S`",
            sparse_out_of_range(),
        ),
        // Ops whose attributes or constant inputs break the op's own rules.
        model(
            "conv_group_as_string",
            "Conv `group` given as the string \"2\"",
            "node `conv` (Conv) has attribute `group` of type STRING, where INT is required",
            conv_with(|n, _| {
                set_attr(n, AttributeProto { s: Some(b"2".to_vec()), ..attr("group", AttributeType::String) });
            }),
        ),
        model("conv_group_0", "Conv `group` = 0", "node `conv` (Conv) has group 0", conv_with(|n, _| set_attr(n, attr_int("group", 0)))),
        model(
            "conv_group_not_dividing",
            "Conv `group` = 3 for 4 input channels",
            "node `conv` (Conv) has group 3",
            conv_with(|n, _| set_attr(n, attr_int("group", 3))),
        ),
        model(
            "conv_kernel_shape_negative",
            "Conv `kernel_shape` [3, -3]",
            "node `conv` (Conv) has kernel_shape [3, -3]",
            conv_with(|n, _| set_attr(n, attr_ints("kernel_shape", &[3, -3]))),
        ),
        model(
            "conv_weight_rank_2",
            "a 2-D Conv weight for a 4-D input",
            "node `conv` (Conv) has a weight of rank 2",
            conv_with(|_, g| {
                g.initializer[0] = tensor_f32("W", &[8, 36], &weights(8 * 36));
            }),
        ),
        model(
            "attribute_type_disagrees_with_value",
            "an attribute declared INT that holds a string",
            "node `conv` (Conv) has attribute `group` declared INT but holding STRING",
            conv_with(|n, _| set_attr(n, AttributeProto { s: Some(b"1".to_vec()), ..attr("group", AttributeType::Int) })),
        ),
        model(
            "attribute_holds_two_values",
            "an attribute holding both an int and a float",
            "node `conv` (Conv) has attribute `group` holding more than one value",
            conv_with(|n, _| set_attr(n, AttributeProto { i: Some(1), f: Some(1.0), ..attr("group", AttributeType::Int) })),
        ),
        model(
            "matmul_output_rank_wrong",
            "a MatMul of [1, 4] by [4, 4] whose output is recorded as rank 1 (found by fuzzing: the group analysis overflowed)",
            "node `matmul` (MatMul) records an output of rank 1, but operands of ranks 2 and 2 give rank 2",
            tiny_with(|g| g.value_info.push(f32_info("h", &[4]))),
        ),
        model(
            "reshape_to_another_size",
            "a Reshape of a [1, 4] value to the constant shape [7, 7]",
            "node `reshape` (Reshape) reshapes an input of shape [1, 4] to [7, 7]: the element counts differ",
            reshape_model(|s| s.raw_data = Some(i64_bytes(&[7, 7]))),
        ),
        model(
            "gather_index_out_of_range_constant",
            "a Gather at index 5 of a 3-element constant shape feeding a Reshape",
            "node `gather` (Gather) reads index 5 of an axis of size 3",
            gather_model(false),
        ),
        model(
            "gather_index_out_of_range_shape",
            "a Gather at index 7 of the shape of a rank-4 input, feeding a Reshape",
            "node `gather` (Gather) reads index 7 of an axis of size 4",
            gather_model(true),
        ),
        model(
            "split_sizes_do_not_sum",
            "a Split of an 8-channel axis into sizes [3, 3]",
            "node `split` (Split) splits axis 1 of size 8 into sizes [3, 3], which sum to 6",
            split_model(),
        ),
        model(
            "if_branches_output_counts_differ",
            "an If whose then_branch has 1 output and else_branch 2",
            "node `if` (If) has branches with different output counts",
            if_branch_counts(),
        ),
        // External data: only files inside the model's folder, and only bytes they hold.
        external("external_absolute", "an absolute external-data location", "is not a plain relative path", "/etc/passwd", None, None, &[]),
        external(
            "external_dotdot",
            "an external-data location going up with `..`",
            "location `../w.bin` is not a plain relative path",
            "../w.bin",
            None,
            None,
            &[],
        ),
        external(
            "external_missing_file",
            "an external-data file that does not exist",
            "external data file `missing.bin` cannot be opened",
            "missing.bin",
            None,
            None,
            &[],
        ),
        external(
            "external_past_end",
            "external bytes 32..96 of a 64-byte file",
            "asks for bytes 32..96 of `w.bin`, which has 64",
            "w.bin",
            Some("32"),
            Some("64"),
            &[("w.bin", 64)],
        ),
        external(
            "external_offset_past_end",
            "an external-data offset of 2^40 in a 64-byte file",
            "asks for bytes 1099511627776..",
            "w.bin",
            Some("1099511627776"),
            None,
            &[("w.bin", 64)],
        ),
        external(
            "external_length_overflows",
            "an external-data offset + length past 2^64",
            "asks for bytes 16..18446744073709551631",
            "w.bin",
            Some("16"),
            Some("18446744073709551615"),
            &[("w.bin", 64)],
        ),
        external(
            "external_offset_not_a_number",
            "an external-data offset of `twelve`",
            "has offset `twelve`, which is not a byte count",
            "w.bin",
            Some("twelve"),
            None,
            &[("w.bin", 64)],
        ),
        external(
            "external_offset_negative",
            "an external-data offset of -8",
            "has offset `-8`, which is not a byte count",
            "w.bin",
            Some("-8"),
            None,
            &[("w.bin", 64)],
        ),
        external(
            "external_no_location",
            "external data without a location",
            "tensor `W`: external data has no `location`",
            "",
            Some("0"),
            None,
            &[("w.bin", 64)],
        ),
        external(
            "external_declares_1e12_elements",
            "an external weight declaring 10^12 floats, backed by 64 bytes",
            "has 64 bytes of external data",
            "w.bin",
            None,
            None,
            &[("w.bin", 64)],
        ),
        external_folder_location(),
        external_symlink_outside(),
        external_in_subgraph(),
        // Opset imports: required since IR version 3, and every node's domain among them.
        model(
            "opset_import_missing",
            "a model of IR version 8 without any opset_import",
            "the model has no opset_import, which ONNX requires since IR version 3 (it declares ir_version 8)",
            ModelProto { opset_import: vec![], ..tiny_model() },
        ),
        model(
            "opset_import_missing_ir_version_3",
            "a model of IR version 3, the first that requires opset_import, without any",
            "the model has no opset_import, which ONNX requires since IR version 3 (it declares ir_version 3)",
            ModelProto { opset_import: vec![], ir_version: Some(3), ..tiny_model() },
        ),
        model(
            "opset_import_lacks_the_default_domain",
            "a model importing only `com.microsoft`, whose nodes are default-domain ops",
            "node `matmul` (MatMul) is an op of the default ONNX domain, which the model's opset_import does not import",
            ModelProto { opset_import: vec![opset("com.microsoft", 1)], ..tiny_model() },
        ),
        model(
            "opset_import_lacks_a_node_domain",
            "a node of domain `com.example`, which the model does not import",
            "node `relu` (Relu) is an op of domain `com.example`, which the model's opset_import does not import",
            tiny_with(|g| g.node[1].domain = Some("com.example".into())),
        ),
        model(
            "opset_import_lacks_a_domain_used_in_a_branch",
            "an If branch holding a node of domain `com.example`, which the model does not import",
            "node `then_relu` (Relu) is an op of domain `com.example`",
            opset_in_branch(),
        ),
        // Model-local functions that call themselves: inlining them would never end.
        model(
            "function_calls_itself",
            "a model-local function whose body calls itself",
            "model-local function `local.f` calls itself: `local.f` -> `local.f`",
            with_functions(&[("f", &["f"])]),
        ),
        model(
            "functions_call_each_other",
            "two model-local functions that call each other",
            "model-local function `local.f` calls itself through other functions: `local.f` -> `local.g` -> `local.f`",
            with_functions(&[("f", &["g"]), ("g", &["f"])]),
        ),
        model(
            "functions_call_in_a_ring_of_three",
            "three model-local functions calling each other in a ring, beside one that is not recursive",
            "model-local function `local.f` calls itself through other functions: `local.f` -> `local.g` -> `local.h` -> `local.f`",
            with_functions(&[("leaf", &[]), ("f", &["leaf", "g"]), ("g", &["h"]), ("h", &["f"])]),
        ),
        model(
            "function_calls_itself_in_an_if_branch",
            "a model-local function whose body calls itself inside an If branch",
            "model-local function `local.f` calls itself: `local.f` -> `local.f`",
            function_recursing_in_branch(),
        ),
        // Shapes that contradict an op's rule, recorded or found by shape inference.
        model(
            "reshape_computed_value_to_another_size",
            "a Reshape of a MatMul's [1, 4] output (shape not recorded, inferred) to [3, 3]",
            "node `reshape` (Reshape) reshapes an input of shape [1, 4] to [3, 3]: the element counts differ",
            computed_reshape(&[3, 3]),
        ),
        model(
            "reshape_minus_one_does_not_divide",
            "a Reshape of a computed [1, 4] value to [-1, 3]",
            "node `reshape` (Reshape) reshapes an input of shape [1, 4] to [-1, 3]: the element counts differ",
            computed_reshape(&[-1, 3]),
        ),
        model(
            "reshape_two_minus_ones",
            "a Reshape target [-1, -1]",
            "node `reshape` (Reshape) reshapes to [-1, -1], which has more than one -1",
            computed_reshape(&[-1, -1]),
        ),
        model(
            "reshape_three_minus_ones",
            "a Reshape of a recorded [1, 4] value to [-1, 2, -1, -1]",
            "node `reshape` (Reshape) reshapes to [-1, 2, -1, -1], which has more than one -1",
            reshape_model(|s| {
                s.dims = vec![4];
                s.raw_data = Some(i64_bytes(&[-1, 2, -1, -1]));
            }),
        ),
        model(
            "reshape_size_below_minus_one",
            "a Reshape target [-2, 2]",
            "node `reshape` (Reshape) reshapes to [-2, 2], which holds the size -2",
            computed_reshape(&[-2, 2]),
        ),
        model(
            "conv_weight_expects_more_channels",
            "a Conv weight of 6 input channels for a recorded input of 4",
            "node `conv` (Conv) has group 1 and weight `W` of 6 input channels per group, but its input has 4 channels",
            conv_with(|_, g| g.initializer[0] = tensor_f32("W", &[8, 6, 3, 3], &weights(8 * 6 * 9))),
        ),
        model(
            "conv_weight_expects_more_channels_computed",
            "a Conv weight of 6 input channels for a computed input of 4 (its shape inferred)",
            "node `conv` (Conv) has group 1 and weight `W` of 6 input channels per group, but its input has 4 channels",
            conv_with(|n, g| {
                g.initializer[0] = tensor_f32("W", &[8, 6, 3, 3], &weights(8 * 6 * 9));
                g.node.insert(0, node("pre", "Relu", &["x"], &["xr"], vec![]));
                n.input[0] = "xr".into();
            }),
        ),
        model(
            "conv_grouped_weight_expects_more_channels",
            "a Conv of group 2 whose weight has 4 input channels per group, for an input of 4",
            "node `conv` (Conv) has group 2 and weight `W` of 4 input channels per group, but its input has 4 channels",
            conv_with(|n, _| set_attr(n, attr_int("group", 2))),
        ),
        model(
            "gemm_inner_dimensions_differ",
            "a Gemm of A [1, 4] by B [5, 3]",
            "node `gemm` (Gemm) multiplies `x` [1, 4] (transA=0) by `B` [5, 3] (transB=0): the inner dimensions 4 and 5 differ",
            gemm_model(&[5, 3], 0, None),
        ),
        model(
            "gemm_inner_dimensions_differ_trans_b",
            "a Gemm of A [1, 4] by Bᵀ with B [3, 5]",
            "node `gemm` (Gemm) multiplies `x` [1, 4] (transA=0) by `B` [3, 5] (transB=1): the inner dimensions 4 and 5 differ",
            gemm_model(&[3, 5], 1, None),
        ),
        model(
            "gemm_bias_does_not_broadcast",
            "a Gemm of [1, 4] by [4, 3] with a bias C of 4 elements",
            "node `gemm` (Gemm) has C `C` [4] that does not broadcast to the result [1, 3]",
            gemm_model(&[4, 3], 0, Some(4)),
        ),
        model(
            "matmul_inner_dimensions_differ",
            "a MatMul of [1, 4] by [5, 4]",
            "node `matmul` (MatMul) multiplies `x` [1, 4] by `W` [5, 4]: the inner dimensions 4 and 5 differ",
            tiny_with_weight(|w| *w = tensor_f32("W", &[5, 4], &weights(20))),
        ),
        model(
            "add_shapes_do_not_broadcast",
            "an Add of a computed [1, 4] value and a constant of 3 elements",
            "node `add` (Add) has inputs `h` [1, 4] and `b` [3] whose sizes 4 and 3 do not broadcast",
            tiny_with(|g| {
                g.node[1] = node("add", "Add", &["h", "b"], &["y"], vec![]);
                g.initializer.push(tensor_f32("b", &[3], &weights(3)));
                g.output[0].r#type = None;
            }),
        ),
        model(
            "concat_sizes_differ_off_the_axis",
            "a Concat on axis 1 of [1, 4] and a constant [2, 4]",
            "node `concat` (Concat) joins `h` [1, 4] and `c` [2, 4] on axis 1, but they differ on axis 0 (1 and 2)",
            tiny_with(|g| {
                g.node[1] = node("concat", "Concat", &["h", "c"], &["y"], vec![attr_int("axis", 1)]);
                g.initializer.push(tensor_f32("c", &[2, 4], &weights(8)));
                g.output[0].r#type = None;
            }),
        ),
        // External data that is not a regular file: never opened for reading.
        external_special("external_data_is_a_fifo", "an external-data file that is a FIFO (opening it would block)", "a FIFO", Entry::Fifo),
        external_special("external_data_is_a_socket", "an external-data file that is a Unix socket", "a socket", Entry::Socket),
        external_device("external_data_is_dev_zero", "/dev/zero"),
        external_device("external_data_is_dev_null", "/dev/null"),
        Case {
            name: "model_is_a_fifo",
            what: "the model path itself is a FIFO",
            expect: "model.onnx` is not a regular file but a FIFO (named pipe)",
            files: vec![Entry::Fifo("model_is_a_fifo/model.onnx".into())],
        },
    ];
    cases.sort_by_key(|c| c.name);
    Ok(cases)
}

fn file(name: &'static str, what: &'static str, expect: &'static str, bytes: Vec<u8>) -> Case {
    Case { name, what, expect, files: vec![Entry::File(format!("{name}.onnx"), bytes)] }
}

fn model(name: &'static str, what: &'static str, expect: &'static str, m: ModelProto) -> Case {
    file(name, what, expect, m.encode_to_vec())
}

/// A folder case: `W` of the tiny model stored externally at `location` (omitted when empty),
/// with data files of the given sizes beside the model.
fn external(
    name: &'static str,
    what: &'static str,
    expect: &'static str,
    location: &str,
    offset: Option<&str>,
    length: Option<&str>,
    data: &[(&str, usize)],
) -> Case {
    let mut m = external_model(location, offset, length);
    if name == "external_declares_1e12_elements" {
        m.graph.as_mut().expect("the tiny model has a graph").initializer[0].dims = vec![1_000_000, 1_000_000];
    }
    let mut files = vec![Entry::File(format!("{name}/model.onnx"), m.encode_to_vec())];
    files.extend(data.iter().map(|&(file, len)| Entry::File(format!("{name}/{file}"), f32_bytes(&weights(len / 4)).to_vec())));
    Case { name, what, expect, files }
}

fn external_folder_location() -> Case {
    let name = "external_location_is_a_folder";
    Case {
        name,
        what: "an external-data location naming a folder",
        expect: "w.bin` is not a regular file",
        files: vec![
            Entry::File(format!("{name}/model.onnx"), external_model("w.bin", None, None).encode_to_vec()),
            // Git keeps no empty folders: the folder holds a file.
            Entry::File(format!("{name}/w.bin/README"), b"a folder where a data file is expected\n".to_vec()),
        ],
    }
}

/// `w.bin` is a committed symlink to a file beside the case's folder: the file exists and holds
/// the right bytes, but it is outside the model's folder.
fn external_symlink_outside() -> Case {
    let name = "external_symlink_outside";
    Case {
        name,
        what: "an external-data file that is a symlink to a file outside the model's folder",
        expect: "outside the model's folder",
        files: vec![
            Entry::File(format!("{name}/model.onnx"), external_model("w.bin", None, None).encode_to_vec()),
            Entry::Symlink(format!("{name}/w.bin"), "../external_symlink_target.bin".into()),
            Entry::File("external_symlink_target.bin".into(), f32_bytes(&weights(16)).to_vec()),
        ],
    }
}

fn external_in_subgraph() -> Case {
    let name = "external_in_subgraph";
    let mut then_branch = GraphProto {
        name: Some("then".into()),
        node: vec![node("then_matmul", "MatMul", &["x", "Wt"], &["t"], vec![])],
        initializer: vec![tensor_f32("Wt", &[4, 4], &weights(16))],
        output: vec![f32_info("t", &[1, 4])],
        ..Default::default()
    };
    externalize(&mut then_branch.initializer[0], "w.bin", None, None);
    let else_branch = GraphProto {
        name: Some("else".into()),
        node: vec![node("else_relu", "Relu", &["x"], &["e"], vec![])],
        output: vec![f32_info("e", &[1, 4])],
        ..Default::default()
    };
    let m = ModelProto {
        graph: Some(GraphProto {
            name: Some("if_external".into()),
            node: vec![node(
                "if",
                "If",
                &["cond"],
                &["y"],
                vec![attr_graph("then_branch", then_branch), attr_graph("else_branch", else_branch)],
            )],
            input: vec![f32_info("x", &[1, 4]), typed_info("cond", DataType::Bool, &[])],
            output: vec![f32_info("y", &[1, 4])],
            ..Default::default()
        }),
        ..tiny_model()
    };
    Case {
        name,
        what: "external data inside an If branch (the writer cannot relocate it)",
        expect: "tensor `Wt` in a subgraph of node `if` uses external data",
        files: vec![
            Entry::File(format!("{name}/model.onnx"), m.encode_to_vec()),
            Entry::File(format!("{name}/w.bin"), f32_bytes(&weights(16)).to_vec()),
        ],
    }
}

/// A folder case whose external-data file `w.bin` is a special file made by `make`.
fn external_special(name: &'static str, what: &'static str, kind: &'static str, make: fn(String) -> Entry) -> Case {
    let expect = match kind {
        "a FIFO" => "tensor `W`: external data file `w.bin` is not a regular file but a FIFO (named pipe)",
        _ => "tensor `W`: external data file `w.bin` is not a regular file but a socket",
    };
    Case {
        name,
        what,
        expect,
        files: vec![
            Entry::File(format!("{name}/model.onnx"), external_model("w.bin", None, None).encode_to_vec()),
            make(format!("{name}/w.bin")),
        ],
    }
}

/// A folder case whose `w.bin` is a committed symlink to a device: the device's type is
/// refused before anything opens it (a read of `/dev/zero` never ends).
fn external_device(name: &'static str, device: &'static str) -> Case {
    Case {
        name,
        what: if device == "/dev/zero" {
            "an external-data file that links to /dev/zero"
        } else {
            "an external-data file that links to /dev/null"
        },
        expect: "tensor `W`: external data file `w.bin` is not a regular file but a character device",
        files: vec![
            Entry::File(format!("{name}/model.onnx"), external_model("w.bin", None, None).encode_to_vec()),
            Entry::Symlink(format!("{name}/w.bin"), device.into()),
        ],
    }
}

fn opset(domain: &str, version: i64) -> OperatorSetIdProto {
    OperatorSetIdProto { domain: Some(domain.into()), version: Some(version) }
}

/// `y = If(cond) then Relu(x) (domain com.example) else Neg(x)`.
fn opset_in_branch() -> ModelProto {
    let mut m = if_branch_counts();
    let g = m.graph.as_mut().expect("the If model has a graph");
    let branches = &mut g.node[0].attribute;
    let then = branches[0].g.as_mut().expect("then_branch");
    then.node[0].domain = Some("com.example".into());
    let e = branches[1].g.as_mut().expect("else_branch");
    e.node.truncate(1);
    e.output.truncate(1);
    m
}

/// The tiny model whose Relu is replaced by a call of the model-local function `local.<first>`;
/// each function `(name, callees)` applies Relu, then calls its callees in a chain.
fn with_functions(functions: &[(&str, &[&str])]) -> ModelProto {
    let function = |name: &str, callees: &[&str]| {
        let mut nodes = vec![node(&format!("{name}_relu"), "Relu", &["a"], &["r0"], vec![])];
        for (i, callee) in callees.iter().enumerate() {
            let mut call = node(&format!("{name}_calls_{callee}"), callee, &[&format!("r{i}")], &[&format!("r{}", i + 1)], vec![]);
            call.domain = Some("local".into());
            nodes.push(call);
        }
        nodes.push(node(&format!("{name}_out"), "Identity", &[&format!("r{}", callees.len())], &["b"], vec![]));
        FunctionProto {
            name: Some(name.into()),
            domain: Some("local".into()),
            input: vec!["a".into()],
            output: vec!["b".into()],
            node: nodes,
            opset_import: vec![opset("", 13), opset("local", 1)],
            ..Default::default()
        }
    };
    let first = functions.iter().find(|(_, c)| !c.is_empty()).map_or("f", |(n, _)| n);
    let mut m = tiny_with(|g| {
        g.node[1] = node("call", first, &["h"], &["y"], vec![]);
        g.node[1].domain = Some("local".into());
    });
    m.opset_import.push(opset("local", 1));
    m.functions = functions.iter().map(|(n, c)| function(n, c)).collect();
    m
}

/// A model-local function `local.f` whose body calls `f` inside the then_branch of an If.
fn function_recursing_in_branch() -> ModelProto {
    let mut m = with_functions(&[("f", &[])]);
    let mut call = node("then_calls_f", "f", &["a"], &["t"], vec![]);
    call.domain = Some("local".into());
    let then_branch =
        GraphProto { name: Some("then".into()), node: vec![call], output: vec![f32_info("t", &[1, 4])], ..Default::default() };
    let else_branch = GraphProto {
        name: Some("else".into()),
        node: vec![node("else_neg", "Neg", &["a"], &["e"], vec![])],
        output: vec![f32_info("e", &[1, 4])],
        ..Default::default()
    };
    let f = &mut m.functions[0];
    f.input.push("cond".into());
    f.node =
        vec![node("f_if", "If", &["cond"], &["b"], vec![attr_graph("then_branch", then_branch), attr_graph("else_branch", else_branch)])];
    let g = m.graph.as_mut().expect("graph");
    g.input.push(typed_info("cond", DataType::Bool, &[]));
    g.node[1].input.push("cond".into());
    m
}

/// `x: f32[1,4] -> MatMul(x, W) -> h -> Reshape(h, target) -> y`, with nothing recorded of `h`
/// or `y`: only shape inference knows `h` is `[1, 4]`.
fn computed_reshape(target: &[i64]) -> ModelProto {
    tiny_with(|g| {
        g.node[1] = node("reshape", "Reshape", &["h", "shape"], &["y"], vec![]);
        g.initializer.push(tensor_i64("shape", &[target.len() as i64], target));
        g.output[0].r#type = None;
    })
}

/// `x: f32[1,4] -> Gemm(x, B, C?) -> y`, B of dims `b` and C of `c` elements.
fn gemm_model(b: &[i64], trans_b: i64, c: Option<i64>) -> ModelProto {
    tiny_with(|g| {
        let mut inputs = vec!["x", "B"];
        g.initializer = vec![tensor_f32("B", b, &weights((b[0] * b[1]) as usize))];
        if let Some(c) = c {
            inputs.push("C");
            g.initializer.push(tensor_f32("C", &[c], &weights(c as usize)));
        }
        g.node = vec![node("gemm", "Gemm", &inputs, &["y"], vec![attr_int("transB", trans_b)])];
        g.output[0].r#type = None;
    })
}

// ---------------------------------------------------------------------------------------------
// The valid models the cases break
// ---------------------------------------------------------------------------------------------

/// `x: f32[1,4] -> MatMul(x, W) -> h -> Relu -> y`, nodes `matmul` and `relu`.
fn tiny_model() -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("prunec xtask hostile".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        graph: Some(GraphProto {
            name: Some("tiny".into()),
            node: vec![node("matmul", "MatMul", &["x", "W"], &["h"], vec![]), node("relu", "Relu", &["h"], &["y"], vec![])],
            initializer: vec![tensor_f32("W", &[4, 4], &weights(16))],
            input: vec![f32_info("x", &[1, 4])],
            output: vec![f32_info("y", &[1, 4])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tiny_with(f: impl FnOnce(&mut GraphProto)) -> ModelProto {
    let mut m = tiny_model();
    f(m.graph.as_mut().expect("the tiny model has a graph"));
    m
}

fn tiny_with_weight(f: impl FnOnce(&mut TensorProto)) -> ModelProto {
    tiny_with(|g| f(&mut g.initializer[0]))
}

fn external_model(location: &str, offset: Option<&str>, length: Option<&str>) -> ModelProto {
    tiny_with_weight(|w| externalize(w, location, offset, length))
}

fn externalize(w: &mut TensorProto, location: &str, offset: Option<&str>, length: Option<&str>) {
    w.raw_data = None;
    w.data_location = Some(DataLocation::External as i32);
    w.external_data = [("location", (!location.is_empty()).then_some(location)), ("offset", offset), ("length", length)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) }))
        .collect();
}

/// `x: f32[1,4,8,8] -> Conv(W: [8,4,3,3], B: [8], pads 1) -> c -> Relu -> y: [1,8,8,8]`.
fn conv_with(f: impl FnOnce(&mut NodeProto, &mut GraphProto)) -> ModelProto {
    let mut g = GraphProto {
        name: Some("conv".into()),
        node: vec![
            node(
                "conv",
                "Conv",
                &["x", "W", "B"],
                &["c"],
                vec![
                    attr_ints("dilations", &[1, 1]),
                    attr_int("group", 1),
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                    attr_ints("strides", &[1, 1]),
                ],
            ),
            node("relu", "Relu", &["c"], &["y"], vec![]),
        ],
        initializer: vec![tensor_f32("W", &[8, 4, 3, 3], &weights(8 * 4 * 9)), tensor_f32("B", &[8], &weights(8))],
        input: vec![f32_info("x", &[1, 4, 8, 8])],
        output: vec![f32_info("y", &[1, 8, 8, 8])],
        ..Default::default()
    };
    let mut conv = g.node.remove(0);
    f(&mut conv, &mut g);
    g.node.insert(0, conv);
    ModelProto { graph: Some(g), ..tiny_model() }
}

/// Replaces the attribute of the same name.
fn set_attr(n: &mut NodeProto, a: AttributeProto) {
    match n.attribute.iter_mut().find(|x| x.name == a.name) {
        Some(slot) => *slot = a,
        None => n.attribute.push(a),
    }
}

/// `x: f32[1,4] -> MatMul(x, W) -> h: [1,4] (recorded) -> Reshape(h, shape) -> y`, with the
/// shape constant `[1, 4]` changed by `f`.
fn reshape_model(f: impl FnOnce(&mut TensorProto)) -> ModelProto {
    tiny_with(|g| {
        g.node[1] = node("reshape", "Reshape", &["h", "shape"], &["y"], vec![]);
        let mut shape = tensor_i64("shape", &[2], &[1, 4]);
        f(&mut shape);
        g.initializer.push(shape);
        g.value_info.push(f32_info("h", &[1, 4]));
        g.output[0].r#type = None;
    })
}

/// Shape arithmetic that reads past the end of a shape: `Gather(shape, [i])` feeds the Reshape
/// of `x: f32[1,8,4,4]` to `[-1, gathered]`. The shape is a constant of 3 elements read at 5, or
/// (`from_shape_op`) the output of `Shape(x)`, 4 elements, read at 7.
fn gather_model(from_shape_op: bool) -> ModelProto {
    let mut nodes = Vec::new();
    let mut initializer = vec![tensor_i64("minus_one", &[1], &[-1]), tensor_i64("axes", &[1], &[0])];
    let index = if from_shape_op {
        nodes.push(node("shape", "Shape", &["x"], &["s"], vec![]));
        7
    } else {
        initializer.push(tensor_i64("s", &[3], &[8, 4, 4]));
        5
    };
    initializer.push(tensor_i64("index", &[], &[index]));
    nodes.extend([
        node("gather", "Gather", &["s", "index"], &["d"], vec![attr_int("axis", 0)]),
        node("unsqueeze", "Unsqueeze", &["d", "axes"], &["d1"], vec![]),
        node("concat", "Concat", &["minus_one", "d1"], &["new_shape"], vec![attr_int("axis", 0)]),
        node("reshape", "Reshape", &["x", "new_shape"], &["y"], vec![]),
    ]);
    let g = GraphProto {
        name: Some("gather".into()),
        node: nodes,
        initializer,
        input: vec![f32_info("x", &[1, 8, 4, 4])],
        output: vec![ValueInfoProto { name: Some("y".into()), ..Default::default() }],
        ..Default::default()
    };
    ModelProto { graph: Some(g), ..tiny_model() }
}

/// `x: f32[1,8,4,4] -> Split(axis 1, sizes [3, 3]) -> a, b`.
fn split_model() -> ModelProto {
    let g = GraphProto {
        name: Some("split".into()),
        node: vec![
            node("split", "Split", &["x", "sizes"], &["a", "b"], vec![attr_int("axis", 1)]),
            node("add", "Add", &["a", "b"], &["y"], vec![]),
        ],
        initializer: vec![tensor_i64("sizes", &[2], &[3, 3])],
        input: vec![f32_info("x", &[1, 8, 4, 4])],
        output: vec![f32_info("y", &[1, 3, 4, 4])],
        ..Default::default()
    };
    ModelProto { graph: Some(g), ..tiny_model() }
}

/// An If with one output whose then_branch yields one value and else_branch two.
fn if_branch_counts() -> ModelProto {
    let then_branch = GraphProto {
        name: Some("then".into()),
        node: vec![node("then_relu", "Relu", &["x"], &["t"], vec![])],
        output: vec![f32_info("t", &[1, 4])],
        ..Default::default()
    };
    let else_branch = GraphProto {
        name: Some("else".into()),
        node: vec![node("else_relu", "Relu", &["x"], &["e"], vec![]), node("else_neg", "Neg", &["x"], &["e2"], vec![])],
        output: vec![f32_info("e", &[1, 4]), f32_info("e2", &[1, 4])],
        ..Default::default()
    };
    let g = GraphProto {
        name: Some("if".into()),
        node: vec![node(
            "if",
            "If",
            &["cond"],
            &["y"],
            vec![attr_graph("then_branch", then_branch), attr_graph("else_branch", else_branch)],
        )],
        input: vec![f32_info("x", &[1, 4]), typed_info("cond", DataType::Bool, &[])],
        output: vec![f32_info("y", &[1, 4])],
        ..Default::default()
    };
    ModelProto { graph: Some(g), ..tiny_model() }
}

/// Nested Ifs, built inside out (one new level wraps the previous one, nothing is cloned); the
/// innermost then_branch reads `nowhere`.
fn nested_if_reading_nothing(levels: usize) -> ModelProto {
    let mut inner = GraphProto {
        name: Some(format!("level{levels}")),
        node: vec![node("innermost", "Relu", &["nowhere"], &["r"], vec![])],
        output: vec![ValueInfoProto { name: Some("r".into()), ..Default::default() }],
        ..Default::default()
    };
    for level in (0..levels).rev() {
        let else_branch = GraphProto {
            name: Some(format!("else{level}")),
            node: vec![node(&format!("else_relu{level}"), "Relu", &["x"], &["e"], vec![])],
            output: vec![ValueInfoProto { name: Some("e".into()), ..Default::default() }],
            ..Default::default()
        };
        let out = if level == 0 { "y".to_string() } else { format!("o{level}") };
        inner = GraphProto {
            name: Some(format!("level{level}")),
            node: vec![node(
                &format!("if{level}"),
                "If",
                &["cond"],
                &[&out],
                vec![attr_graph("then_branch", inner), attr_graph("else_branch", else_branch)],
            )],
            output: vec![ValueInfoProto { name: Some(out.clone()), ..Default::default() }],
            ..Default::default()
        };
    }
    inner.input = vec![f32_info("x", &[1, 4]), typed_info("cond", DataType::Bool, &[])];
    inner.output = vec![f32_info("y", &[1, 4])];
    ModelProto { graph: Some(inner), ..tiny_model() }
}

/// A sparse initializer of dims [4, 4] with two values at flat indices 3 and 99.
fn sparse_out_of_range() -> ModelProto {
    tiny_with(|g| {
        g.sparse_initializer.push(SparseTensorProto {
            values: Some(tensor_f32("S", &[2], &[1.0, 2.0])),
            indices: Some(tensor_i64("S_indices", &[2], &[3, 99])),
            dims: vec![4, 4],
        });
        g.node[1] = node("add", "Add", &["h", "S"], &["y"], vec![]);
    })
}

/// Not a committed case (it is megabytes): `x: f32[1,4] -> Reshape(x, s) -> y` where the shape
/// `s` is the constant `[7, 7]` behind a chain of `len` Identity ops. Reading it must follow the
/// chain without recursing once per link; `tests/hostile.rs` builds it at run time.
#[allow(dead_code, reason = "used by tests/hostile.rs, which compiles this file too")]
pub fn identity_chain(len: usize) -> Vec<u8> {
    let mut nodes: Vec<NodeProto> = (0..len)
        .map(|i| NodeProto {
            input: vec![format!("s{i}")],
            output: vec![format!("s{}", i + 1)],
            op_type: Some("Identity".into()),
            ..Default::default()
        })
        .collect();
    nodes.push(node("reshape", "Reshape", &["x", &format!("s{len}")], &["y"], vec![]));
    let g = GraphProto {
        name: Some("identity_chain".into()),
        node: nodes,
        initializer: vec![tensor_i64("s0", &[2], &[7, 7])],
        input: vec![f32_info("x", &[1, 4])],
        output: vec![ValueInfoProto { name: Some("y".into()), ..Default::default() }],
        ..Default::default()
    };
    ModelProto { graph: Some(g), ..tiny_model() }.encode_to_vec()
}

/// Not a case either: a valid model with two chains of `len` Identity ops, one carrying the
/// Reshape target `[2, 2]` from an initializer, the other the reshaped activation, before a
/// Relu. Asking for the constant behind each link anew made group analysis and folding quadratic
/// in the chain's length; `tests/hostile.rs` builds it at run time.
#[allow(dead_code, reason = "used by tests/hostile.rs, which compiles this file too")]
pub fn valid_identity_chains(len: usize) -> Vec<u8> {
    let link = |prefix: &str, i: usize| NodeProto {
        input: vec![format!("{prefix}{i}")],
        output: vec![format!("{prefix}{}", i + 1)],
        op_type: Some("Identity".into()),
        name: Some(format!("{prefix}_link{i}")),
        ..Default::default()
    };
    let mut nodes: Vec<NodeProto> = (0..len).map(|i| link("s", i)).collect();
    nodes.push(node("reshape", "Reshape", &["x", &format!("s{len}")], &["a0"], vec![]));
    nodes.extend((0..len).map(|i| link("a", i)));
    nodes.push(node("relu", "Relu", &[&format!("a{len}")], &["y"], vec![]));
    let g = GraphProto {
        name: Some("valid_identity_chains".into()),
        node: nodes,
        initializer: vec![tensor_i64("s0", &[2], &[2, 2])],
        input: vec![f32_info("x", &[1, 4])],
        output: vec![f32_info("y", &[2, 2])],
        ..Default::default()
    };
    ModelProto { graph: Some(g), ..tiny_model() }.encode_to_vec()
}

/// Not a case: a valid model `x: f32[1,16] -> Gemm(16 -> 32) -> len ops alternating Identity
/// and Relu -> Gemm(32 -> 8) -> y`, one 32-channel group that every analysis and pass must
/// follow through the chain in linear time; `tests/hostile.rs` builds it at run time and
/// BENCHMARKS.md times it.
pub fn valid_mixed_chain(len: usize) -> Vec<u8> {
    let mut nodes = vec![node("gemm_in", "Gemm", &["x", "W1", "B1"], &["h0"], vec![attr_int("transB", 1)])];
    nodes.extend((0..len).map(|i| NodeProto {
        input: vec![format!("h{i}")],
        output: vec![format!("h{}", i + 1)],
        op_type: Some(if i % 2 == 0 { "Identity" } else { "Relu" }.into()),
        name: Some(format!("link{i}")),
        ..Default::default()
    }));
    nodes.push(node("gemm_out", "Gemm", &[&format!("h{len}"), "W2", "B2"], &["y"], vec![attr_int("transB", 1)]));
    let g = GraphProto {
        name: Some("valid_mixed_chain".into()),
        node: nodes,
        initializer: vec![
            tensor_f32("W1", &[32, 16], &weights(32 * 16)),
            tensor_f32("B1", &[32], &weights(32)),
            tensor_f32("W2", &[8, 32], &weights(8 * 32)),
            tensor_f32("B2", &[8], &weights(8)),
        ],
        input: vec![f32_info("x", &[1, 16])],
        output: vec![f32_info("y", &[1, 8])],
        ..Default::default()
    };
    ModelProto { graph: Some(g), ..tiny_model() }.encode_to_vec()
}

// ---------------------------------------------------------------------------------------------
// Byte-level cases
// ---------------------------------------------------------------------------------------------

/// The eight-byte PNG signature and an IHDR chunk header.
fn png() -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00".to_vec();
    b.extend_from_slice(&[0x1f, 0xf3, 0xff, 0x61]);
    b
}

fn text_model() -> Vec<u8> {
    b"ir_version: 8\nopset_import { domain: \"\" version: 13 }\ngraph {\n  name: \"tiny\"\n  node { input: \"x\" output: \"y\" op_type: \"Relu\" }\n}\n".to_vec()
}

/// The tiny model cut halfway through the weight's 64 bytes of raw_data.
fn cut_in_raw_data(tiny: &[u8]) -> Result<Vec<u8>> {
    let raw = f32_bytes(&weights(16));
    let at = find(tiny, &raw).context("the encoded tiny model holds W's raw bytes")?;
    Ok(tiny[..at + raw.len() / 2].to_vec())
}

/// The tiny model with `relu`'s name replaced by bytes that are not UTF-8 (same length, so no
/// length prefix changes).
fn invalid_utf8(tiny: &[u8]) -> Result<Vec<u8>> {
    let mut bytes = tiny.to_vec();
    let at = find(&bytes, b"relu").context("the encoded tiny model holds the name `relu`")?;
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xc0, 0x80]);
    Ok(bytes)
}

/// The tiny model plus a third node whose `name` (field 3, a string) has wire type fixed32.
fn wire_type_in_node() -> Result<Vec<u8>> {
    let mut m = tiny_model();
    let graph = m.graph.take().context("graph")?;
    let bad_node = [ld(4, b"Relu"), key(3, WireType::ThirtyTwoBit), vec![1, 2, 3, 4]].concat();
    let graph = [graph.encode_to_vec(), ld(1, &bad_node)].concat();
    Ok([m.encode_to_vec(), ld(7, &graph)].concat())
}

/// A model whose graph holds one initializer whose packed `dims` field claims 2^60 bytes.
fn packed_dims_claim() -> Result<Vec<u8>> {
    let mut m = tiny_model();
    m.graph = None;
    let tensor = [key(1, WireType::LengthDelimited), varint(1 << 60), vec![4; 8]].concat();
    let graph = ld(5, &tensor);
    Ok([m.encode_to_vec(), ld(7, &graph)].concat())
}

/// `levels` Ifs nested in then_branch, encoded by hand from the inside out: encoding a deep
/// message with prost would recurse once per level, and the bytes are all that is needed.
fn deep_if(levels: usize) -> Result<Vec<u8>> {
    // A level is `GraphProto { node: [NodeProto { op_type: "If", attribute: [AttributeProto {
    // name: "then_branch", g: <inner>, type: GRAPH }] }] }`, fields in tag order as prost writes.
    let wrap = |inner: &[u8]| -> Vec<u8> {
        let attribute = [ld(1, b"then_branch"), ld(6, inner), varint_field(20, AttributeType::Graph as u64)].concat();
        let node = [ld(4, b"If"), ld(5, &attribute)].concat();
        ld(1, &node)
    };
    // The hand encoding must be what prost writes for the same structure.
    let level = |g: GraphProto| GraphProto {
        node: vec![NodeProto { op_type: Some("If".into()), attribute: vec![attr_graph("then_branch", g)], ..Default::default() }],
        ..Default::default()
    };
    ensure!(wrap(&wrap(&[])) == level(level(GraphProto::default())).encode_to_vec(), "hand-encoded If levels differ from prost's");
    let mut graph = Vec::new();
    for _ in 0..levels {
        graph = wrap(&graph);
    }
    let mut m = tiny_model();
    m.graph = None;
    Ok([m.encode_to_vec(), ld(7, &graph)].concat())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn key(field: u32, wire: WireType) -> Vec<u8> {
    let mut b = Vec::new();
    encode_key(field, wire, &mut b);
    b
}

fn varint(v: u64) -> Vec<u8> {
    let mut b = Vec::new();
    encode_varint(v, &mut b);
    b
}

fn varint_field(field: u32, v: u64) -> Vec<u8> {
    [key(field, WireType::Varint), varint(v)].concat()
}

/// A length-delimited field.
fn ld(field: u32, payload: &[u8]) -> Vec<u8> {
    [key(field, WireType::LengthDelimited), varint(payload.len() as u64), payload.to_vec()].concat()
}

// ---------------------------------------------------------------------------------------------
// Protobuf helpers
// ---------------------------------------------------------------------------------------------

fn node(name: &str, op_type: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op_type.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

fn typed_info(name: &str, elem: DataType, shape: &[i64]) -> ValueInfoProto {
    let dim = shape.iter().map(|&d| Dimension { value: Some(dimension::Value::DimValue(d)), denotation: None }).collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn f32_info(name: &str, shape: &[i64]) -> ValueInfoProto {
    typed_info(name, DataType::Float, shape)
}

fn f32_bytes(values: &[f32]) -> Bytes {
    Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

fn i64_bytes(values: &[i64]) -> Bytes {
    Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

/// `n` distinct small floats: weights that are neither zero nor all alike.
fn weights(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 17) as f32 / 16.0 - 0.5).collect()
}
