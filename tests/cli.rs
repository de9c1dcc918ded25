//! The `prunec` command line on models it must refuse, and on verification that cannot pass.
//!
//! Every bad model is built here, in a temporary folder, by breaking one small valid model
//! (`x: f32[1,4] -> MatMul(W: f32[4,4]) -> Relu -> y`). For each, prunec:
//! - exits with code 1 (2 for a command-line usage error, as clap does);
//! - prints `error:`, the file it was reading and a phrase naming the problem (the node, value,
//!   tensor or external-data location at fault);
//! - writes nothing: no output file and no temporary file is left in the output folder, and an
//!   existing output file is not touched;
//! - answers quickly, without panicking, hanging or allocating what a model merely declares.

mod common;

use common::{Run, prunec};
use prost::Message;
use prost::bytes::Bytes;
use prunec::ir::proto::{
    self, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
    tensor_proto::{DataLocation, DataType},
    tensor_shape_proto::{Dimension, dimension},
    type_proto,
};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A refusal must not take longer than this (the binary starts in milliseconds).
const QUICK: Duration = Duration::from_secs(5);
/// A run still going after this is a hang: it is killed and the test fails.
const HANG: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The valid model and the pieces it is built from.

fn dims(shape: &[i64]) -> TensorShapeProto {
    TensorShapeProto { dim: shape.iter().map(|&d| Dimension { value: Some(dimension::Value::DimValue(d)), denotation: None }).collect() }
}

fn f32_info(name: &str, shape: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(dims(shape)),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn node(name: &str, op_type: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op_type.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// An f32 tensor stored as `raw_data`.
fn f32_tensor(name: &str, shape: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: shape.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(Bytes::from(f32_bytes(values))),
        ..Default::default()
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The 4x4 weight: 16 parameters.
fn weight_values() -> Vec<f32> {
    (0..16).map(|i| i as f32 / 16.0 - 0.5).collect()
}

/// `x: f32[1,4] -> MatMul(x, W) -> h -> Relu -> y`, named nodes `matmul` and `relu`.
fn valid_model() -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("prunec tests/cli.rs".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        graph: Some(GraphProto {
            name: Some("tiny".into()),
            node: vec![node("matmul", "MatMul", &["x", "W"], &["h"]), node("relu", "Relu", &["h"], &["y"])],
            initializer: vec![f32_tensor("W", &[4, 4], &weight_values())],
            input: vec![f32_info("x", &[1, 4])],
            output: vec![f32_info("y", &[1, 4])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The valid model with its graph changed by `f`.
fn model_with(f: impl FnOnce(&mut GraphProto)) -> ModelProto {
    let mut m = valid_model();
    f(m.graph.as_mut().expect("the valid model has a graph"));
    m
}

/// The valid model with its weight `W` changed by `f`.
fn model_with_weight(f: impl FnOnce(&mut TensorProto)) -> ModelProto {
    model_with(|g| f(&mut g.initializer[0]))
}

/// The valid model with `W` stored externally: `location` (and optionally offset and length).
fn external_model(location: &str, offset: Option<u64>, length: Option<u64>) -> ModelProto {
    model_with_weight(|w| {
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        w.raw_data = None;
        w.data_location = Some(DataLocation::External as i32);
        w.external_data = std::iter::once(entry("location", location.into()))
            .chain(offset.map(|o| entry("offset", o.to_string())))
            .chain(length.map(|l| entry("length", l.to_string())))
            .collect();
    })
}

// ---------------------------------------------------------------------------------------------
// A scratch folder per test: models go to `model/`, outputs to `out/`.

struct Scratch {
    _root: tempfile::TempDir,
    root: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let root = tempfile::tempdir().expect("temp dir");
        let path = root.path().to_path_buf();
        std::fs::create_dir(path.join("model")).expect("model folder");
        std::fs::create_dir(path.join("out")).expect("out folder");
        Scratch { _root: root, root: path }
    }

    fn model_dir(&self) -> PathBuf {
        self.root.join("model")
    }

    fn out_dir(&self) -> PathBuf {
        self.root.join("out")
    }

    /// Writes raw bytes as `model/<name>`.
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.model_dir().join(name);
        std::fs::write(&path, bytes).expect("writing test file");
        path
    }

    /// Encodes a model as `model/model.onnx`.
    fn model(&self, model: &ModelProto) -> PathBuf {
        self.file("model.onnx", &model.encode_to_vec())
    }

    fn output(&self) -> PathBuf {
        self.out_dir().join("pruned.onnx")
    }

    fn out_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.out_dir())
            .expect("out folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

// ---------------------------------------------------------------------------------------------
// Running prunec.

/// Runs prunec with `args`, killing it (and failing the test) if it hangs.
fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd: Command = prunec();
    cmd.args(args);
    let run = common::run_captured(cmd, HANG).unwrap_or_else(|e| panic!("prunec: {e}"));
    // Shown with `--nocapture`: the exact messages users see.
    eprintln!("prunec exited with {:?} in {:?}; stderr:\n{}", run.code, run.elapsed, run.stderr);
    run
}

/// `prunec <model> -o out/pruned.onnx` must fail with code 1, naming the model file and every
/// phrase of `expected`, quickly, and leave the output folder empty.
#[track_caller]
fn assert_rejected(scratch: &Scratch, model: &Path, expected: &[&str]) {
    let r = run([model.as_os_str(), OsStr::new("-o"), scratch.output().as_os_str()]);
    assert_failed_cleanly(&r, model, expected);
    assert!(!scratch.output().exists(), "an output file was written for a model that was refused");
    assert_eq!(scratch.out_entries(), Vec::<String>::new(), "files were left in the output folder");
}

#[track_caller]
fn assert_failed_cleanly(r: &Run, model: &Path, expected: &[&str]) {
    assert_eq!(r.code, Some(1), "expected exit code 1; stderr:\n{}", r.stderr);
    assert!(r.stderr.starts_with("error: "), "stderr does not start with `error: `:\n{}", r.stderr);
    // Named once: by the reader where its message is about the file, else by "reading `…`".
    let file = format!("`{}`", model.display());
    assert_eq!(r.stderr.matches(&file).count(), 1, "stderr does not name the model file ({file}) once:\n{}", r.stderr);
    for phrase in expected {
        assert!(r.stderr.contains(phrase), "stderr does not say {phrase:?}:\n{}", r.stderr);
    }
    assert!(!r.stderr.contains("panicked"), "prunec panicked:\n{}", r.stderr);
    let cause = r.stderr.trim_end().rsplit(": ").next().unwrap_or_default();
    assert_eq!(r.stderr.matches(cause).count(), 1, "the message repeats its cause {cause:?}:\n{}", r.stderr);
    assert!(r.elapsed < QUICK, "prunec took {:?} to refuse the model", r.elapsed);
}

// ---------------------------------------------------------------------------------------------
// Files that are not ONNX models.

#[test]
fn random_bytes_are_not_a_protobuf() {
    let s = Scratch::new();
    // A fixed xorshift sequence: the same "random" bytes on every run.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect();
    let model = s.file("noise.onnx", &bytes);
    assert_rejected(&s, &model, &["is not a valid ONNX protobuf"]);
}

#[test]
fn a_truncated_model_is_not_a_protobuf() {
    let s = Scratch::new();
    let bytes = valid_model().encode_to_vec();
    let model = s.file("truncated.onnx", &bytes[..bytes.len() / 2]);
    assert_rejected(&s, &model, &["is not a valid ONNX protobuf"]);
}

#[test]
fn an_empty_file_is_not_a_model() {
    let s = Scratch::new();
    let model = s.file("empty.onnx", &[]);
    assert_rejected(&s, &model, &["is empty"]);
}

#[test]
fn a_model_without_a_graph_is_refused() {
    let s = Scratch::new();
    let model = s.model(&ModelProto { graph: None, ..valid_model() });
    assert_rejected(&s, &model, &["the model has no graph"]);
}

#[test]
fn a_folder_is_not_a_model() {
    let s = Scratch::new();
    let model = s.model_dir().join("a_folder.onnx");
    std::fs::create_dir(&model).expect("folder");
    assert_rejected(&s, &model, &["is not a regular file"]);
}

#[test]
fn a_missing_model_file_is_reported() {
    let s = Scratch::new();
    let model = s.model_dir().join("does_not_exist.onnx");
    assert_rejected(&s, &model, &["cannot read", "No such file or directory"]);
}

// ---------------------------------------------------------------------------------------------
// Graphs that break the rules of ONNX.

#[test]
fn a_cycle_is_refused_naming_a_node_on_it() {
    let s = Scratch::new();
    // `a` reads `b` and `b` reads `a`; `y` depends on both.
    let model = s.model(&model_with(|g| {
        g.node = vec![
            node("matmul", "MatMul", &["x", "W"], &["h"]),
            node("a", "Add", &["h", "b_out"], &["a_out"]),
            node("b", "Relu", &["a_out"], &["b_out"]),
            node("relu", "Relu", &["b_out"], &["y"]),
        ];
    }));
    assert_rejected(&s, &model, &["the graph has a cycle through node `a` (Add)"]);
}

#[test]
fn a_node_input_naming_no_value_is_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with(|g| g.node[1].input[0] = "nowhere".into()));
    assert_rejected(&s, &model, &["node `relu` (Relu) reads `nowhere` as input 0", "no node, graph input or initializer defines it"]);
}

#[test]
fn two_nodes_producing_one_value_are_refused_naming_both() {
    let s = Scratch::new();
    let model = s.model(&model_with(|g| g.node.insert(1, node("other", "Relu", &["x"], &["h"]))));
    assert_rejected(&s, &model, &["value `h` is defined twice", "output of node `matmul`", "output of node `other`"]);
}

#[test]
fn an_initializer_named_like_a_node_output_is_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with(|g| g.initializer.push(f32_tensor("h", &[1, 4], &[0.0; 4]))));
    assert_rejected(&s, &model, &["value `h` is defined twice", "initializer", "output of node `matmul`"]);
}

#[test]
fn a_graph_output_naming_nothing_is_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with(|g| g.output.push(f32_info("ghost", &[1, 4]))));
    assert_rejected(&s, &model, &["graph output `ghost` is not defined"]);
}

// ---------------------------------------------------------------------------------------------
// Tensors whose dims, type and data disagree.

#[test]
fn raw_data_shorter_than_dims_and_type_need_is_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with_weight(|w| w.raw_data = Some(Bytes::from(f32_bytes(&[0.5; 15])))));
    assert_rejected(&s, &model, &["tensor `W` has 60 bytes of raw_data", "[4, 4]", "need 64"]);
}

#[test]
fn negative_dims_are_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with_weight(|w| w.dims = vec![4, -4]));
    assert_rejected(&s, &model, &["tensor `W` has a negative dimension in dims [4, -4]"]);
}

#[test]
fn dims_whose_element_count_overflows_are_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with_weight(|w| w.dims = vec![1 << 32, 1 << 32]));
    assert_rejected(&s, &model, &["tensor `W` has dims [4294967296, 4294967296] whose element count overflows 64 bits"]);
}

#[test]
fn dims_whose_byte_size_overflows_are_refused_as_such() {
    let s = Scratch::new();
    // 2^63 elements fit in 64 bits; their 2^65 bytes do not.
    let model = s.model(&model_with_weight(|w| w.dims = vec![1 << 31, 1 << 31, 2]));
    assert_rejected(&s, &model, &["tensor `W`", "[2147483648, 2147483648, 2]", "overflows"]);
}

#[test]
fn a_huge_declared_tensor_with_tiny_data_is_refused_without_allocating_it() {
    let s = Scratch::new();
    // 10^12 f32 elements (4 TB) declared, 64 bytes stored.
    let model = s.model(&model_with_weight(|w| w.dims = vec![1_000_000, 1_000_000]));
    assert_rejected(&s, &model, &["tensor `W` has 64 bytes of raw_data", "need 4000000000000"]);
}

#[test]
fn an_unknown_data_type_code_is_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with_weight(|w| w.data_type = Some(999)));
    assert_rejected(&s, &model, &["tensor `W` has unknown element type code 999"]);
}

#[test]
fn an_opset_that_does_not_exist_is_refused() {
    let s = Scratch::new();
    let mut m = valid_model();
    m.opset_import[0].version = Some(999);
    assert_rejected(&s, &s.model(&m), &["imports opset 999 of the default ONNX domain, which does not exist"]);
}

#[test]
fn a_node_without_an_op_type_is_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with(|g| g.node[1].op_type = Some(String::new())));
    assert_rejected(&s, &model, &["node `relu` () has no op_type"]);
}

#[test]
fn a_reshape_to_a_shape_of_another_size_is_refused() {
    let s = Scratch::new();
    let model = s.model(&model_with(|g| {
        g.node[1] = node("reshape", "Reshape", &["h", "shape"], &["y"]);
        let shape: Vec<u8> = [7i64, 7].iter().flat_map(|d| d.to_le_bytes()).collect();
        g.initializer.push(TensorProto {
            name: Some("shape".into()),
            dims: vec![2],
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some(Bytes::from(shape)),
            ..Default::default()
        });
        g.value_info.push(f32_info("h", &[1, 4]));
        g.output[0].r#type = None;
    }));
    assert_rejected(&s, &model, &["node `reshape` (Reshape) reshapes an input of shape [1, 4] to [7, 7]: the element counts differ"]);
}

// ---------------------------------------------------------------------------------------------
// External data: only files inside the model's folder, and only bytes they hold.

/// Writes the 64 bytes of `W` as `model/w.bin`.
fn weight_file(s: &Scratch) -> PathBuf {
    s.file("w.bin", &f32_bytes(&weight_values()))
}

#[test]
fn external_data_inside_the_model_folder_is_accepted() {
    // The control for the cases below: the same model with a plain location works.
    let s = Scratch::new();
    weight_file(&s);
    let model = s.model(&external_model("w.bin", Some(0), Some(64)));
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str()]);
    assert_eq!(r.code, Some(0), "stderr:\n{}", r.stderr);
    assert!(s.output().is_file());
}

#[test]
fn an_absolute_external_data_location_is_refused() {
    let s = Scratch::new();
    let data = weight_file(&s);
    let location = data.to_str().expect("utf-8 temp path");
    let model = s.model(&external_model(location, None, None));
    let phrase = format!("tensor `W`: external data location `{location}` is not a plain relative path inside the model's folder");
    assert_rejected(&s, &model, &[&phrase]);
}

#[test]
fn an_external_data_location_leaving_the_folder_is_refused() {
    let s = Scratch::new();
    std::fs::write(s.root.join("w.bin"), f32_bytes(&weight_values())).expect("data file outside the model folder");
    let model = s.model(&external_model("../w.bin", None, None));
    assert_rejected(&s, &model, &["tensor `W`: external data location `../w.bin` is not a plain relative path inside the model's folder"]);
}

#[cfg(unix)]
#[test]
fn external_data_through_a_symlink_out_of_the_folder_is_refused() {
    let s = Scratch::new();
    let outside = s.root.join("outside.bin");
    std::fs::write(&outside, f32_bytes(&weight_values())).expect("data file outside the model folder");
    std::os::unix::fs::symlink(&outside, s.model_dir().join("w.bin")).expect("symlink");
    let model = s.model(&external_model("w.bin", None, None));
    assert_rejected(&s, &model, &["tensor `W`: external data location `w.bin` resolves to", "outside.bin`, outside the model's folder"]);
}

#[test]
fn a_missing_external_data_file_is_refused() {
    let s = Scratch::new();
    let model = s.model(&external_model("missing.bin", None, None));
    assert_rejected(&s, &model, &["tensor `W`: external data file `missing.bin` cannot be opened", "No such file or directory"]);
}

#[test]
fn an_external_data_location_naming_a_folder_is_refused() {
    let s = Scratch::new();
    std::fs::create_dir(s.model_dir().join("w.bin")).expect("folder");
    let model = s.model(&external_model("w.bin", None, None));
    assert_rejected(&s, &model, &["tensor `W`: external data file `w.bin` is not a regular file but a folder"]);
}

#[test]
fn external_data_past_the_end_of_the_file_is_refused() {
    let s = Scratch::new();
    weight_file(&s);
    let model = s.model(&external_model("w.bin", Some(32), Some(64)));
    assert_rejected(&s, &model, &["tensor `W`: external data asks for bytes 32..96 of `w.bin`, which has 64"]);
}

#[test]
fn an_external_data_offset_past_the_end_of_the_file_is_refused() {
    let s = Scratch::new();
    weight_file(&s);
    let model = s.model(&external_model("w.bin", Some(1 << 40), None));
    assert_rejected(&s, &model, &["tensor `W`: external data asks for bytes 1099511627776..", "of `w.bin`, which has 64"]);
}

// ---------------------------------------------------------------------------------------------
// The output, the other commands, and the command line itself.

#[test]
fn a_failed_run_leaves_an_existing_output_untouched() {
    let s = Scratch::new();
    let previous = valid_model().encode_to_vec();
    std::fs::write(s.output(), &previous).expect("existing output");
    let model = s.model(&model_with(|g| g.node[1].input[0] = "nowhere".into()));
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str()]);
    assert_failed_cleanly(&r, &model, &["reads `nowhere`"]);
    assert_eq!(std::fs::read(s.output()).expect("output still there"), previous, "the existing output was changed");
    assert_eq!(s.out_entries(), vec!["pruned.onnx".to_string()], "files were left in the output folder");
}

#[test]
fn inspect_and_dump_refuse_a_bad_model_too() {
    let s = Scratch::new();
    let model = s.model(&model_with(|g| g.output.push(f32_info("ghost", &[1, 4]))));
    for command in [&["inspect"][..], &["inspect", "--json"], &["dump"]] {
        let r = run(command.iter().map(OsStr::new).chain([model.as_os_str()]));
        assert_failed_cleanly(&r, &model, &["graph output `ghost` is not defined"]);
        assert_eq!(r.stdout, "", "{command:?} printed something about a model it refused");
    }
}

#[test]
fn no_arguments_is_a_usage_error() {
    let r = run(Vec::<&str>::new());
    assert_eq!(r.code, Some(2), "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("error:") && r.stderr.contains("Usage:"), "stderr:\n{}", r.stderr);
}

#[test]
fn an_unknown_flag_is_a_usage_error() {
    let s = Scratch::new();
    let model = s.model(&valid_model());
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str(), OsStr::new("--bogus")]);
    assert_eq!(r.code, Some(2), "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("error: unexpected argument '--bogus'"), "stderr:\n{}", r.stderr);
    assert_eq!(s.out_entries(), Vec::<String>::new());
}

#[test]
fn an_unknown_pass_is_refused_before_reading_the_model_listing_the_known_passes() {
    // An unknown pass name is a usage error: exit code 2, as for clap's own usage errors. The
    // message must list what is accepted.
    let s = Scratch::new();
    let model = s.model_dir().join("not_read.onnx");
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str(), OsStr::new("--passes"), OsStr::new("dce,bogus")]);
    assert_eq!(r.code, Some(2), "stderr:\n{}", r.stderr);
    assert!(r.stderr.starts_with("error: unknown pass `bogus`; known passes: "), "stderr:\n{}", r.stderr);
    for pass in prunec::passes::REGISTRY {
        assert!(r.stderr.contains(pass.name), "known pass `{}` not listed:\n{}", pass.name, r.stderr);
    }
    assert!(!r.stderr.contains("not_read.onnx"), "the model was read before the pipeline was checked:\n{}", r.stderr);
    assert_eq!(s.out_entries(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// And valid models.

#[test]
fn a_shape_inference_failure_is_reported_quietly_not_as_a_panic() {
    // A valid model whose constant tract evaluates while inferring shapes: 2^48 f32 elements,
    // more than any address space, so tract's allocation fails and it panics. prunec must still
    // compile the model, say why shapes are unknown, and print no panic; tract cannot run it
    // either, so only --no-verify writes it (exit code 3 otherwise).
    let s = Scratch::new();
    let shape: Vec<u8> = [1i64 << 24, 1 << 24].iter().flat_map(|d| d.to_le_bytes()).collect();
    let model = s.model(&model_with(|g| {
        g.node = vec![node("fill", "ConstantOfShape", &["shape"], &["y"])];
        g.initializer = vec![TensorProto {
            name: Some("shape".into()),
            dims: vec![2],
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some(Bytes::from(shape)),
            ..Default::default()
        }];
        g.input.clear();
        g.output[0].r#type = None;
    }));
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str()]);
    assert_eq!(r.code, Some(3), "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("tract cannot run the original model"), "stderr:\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "a handled panic was printed:\n{}", r.stderr);
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str(), OsStr::new("--no-verify")]);
    assert_eq!(r.code, Some(0), "stderr:\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "a handled panic was printed:\n{}", r.stderr);
    assert!(r.elapsed < QUICK, "took {:?}", r.elapsed);
    let i = run([OsStr::new("inspect"), OsStr::new("--json"), model.as_os_str()]);
    assert_eq!(i.code, Some(0), "stderr:\n{}", i.stderr);
    assert!(!i.stderr.contains("panicked"), "a handled panic was printed:\n{}", i.stderr);
    let summary: serde_json::Value = serde_json::from_str(&i.stdout).expect("inspect prints JSON");
    let problem = summary["shape_inference_problem"].as_str().unwrap_or_default();
    assert!(problem.starts_with("tract panicked while analysing the model: "), "inspect --json: {summary:#}");
}

#[test]
fn the_valid_model_compiles_and_inspects() {
    let s = Scratch::new();
    let model = s.model(&valid_model());
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str()]);
    assert_eq!(r.code, Some(0), "stderr:\n{}", r.stderr);
    assert!(!r.stderr.contains("error") && !r.stderr.contains("panicked"), "stderr:\n{}", r.stderr);
    assert!(s.output().is_file(), "no output written");
    assert_eq!(s.out_entries(), vec!["pruned.onnx".to_string()], "temporary files were left in the output folder");
    let decoded = proto::ModelProto::decode(std::fs::read(s.output()).expect("output").as_slice()).expect("the output decodes");
    assert_eq!(decoded.graph.expect("graph").node.len(), 2);
    let summary = common::inspect_json(&s.output());
    assert_eq!(summary["parameters"], 16, "inspect --json: {summary:#}");
    assert_eq!(summary["ops"], 2, "inspect --json: {summary:#}");
}

// ---------------------------------------------------------------------------------------------
// Pruning from the command line.

#[test]
fn a_dry_run_plans_verifies_and_reports_but_writes_no_model() {
    let s = Scratch::new();
    let model = common::root().join("testdata/models/conv_residual.onnx");
    let report = s.out_dir().join("report.json");
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str(), OsStr::new("--ratio"), OsStr::new("0.5")]
        .into_iter()
        .chain([OsStr::new("--dry-run"), OsStr::new("--report"), report.as_os_str()]));
    assert_eq!(r.code, Some(0), "stderr:\n{}", r.stderr);
    assert!(!s.output().exists(), "a dry run wrote the model");
    for phrase in ["parameters", "MACs", "tract time", "equals the masked original", "dry run: nothing written"] {
        assert!(r.stderr.contains(phrase), "stderr does not say {phrase:?}:\n{}", r.stderr);
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).expect("report written")).expect("JSON");
    assert!(json["after"]["parameters"].as_u64() < json["before"]["parameters"].as_u64(), "{json:#}");
    assert_eq!(json["verification"]["judged"], true, "{json:#}");
    assert_eq!(json["verification"]["reference"], "masked", "{json:#}");
    assert_eq!(common::pass_details(&json, "prune")["channels_removed"], 16, "{json:#}");
    assert_eq!(common::pass_options(&json, "prune")["criterion"], "l2", "{json:#}");
}

#[test]
fn the_default_command_prunes_and_the_output_is_smaller() {
    let s = Scratch::new();
    let model = common::root().join("testdata/models/conv_residual.onnx");
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str()]);
    assert_eq!(r.code, Some(0), "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("ratio 0.3 per group"), "stderr:\n{}", r.stderr);
    let (before, after) = (common::inspect_json(&model), common::inspect_json(&s.output()));
    assert!(after["parameters"].as_u64() < before["parameters"].as_u64(), "{before:#} vs {after:#}");
}

#[test]
fn pruning_options_out_of_range_are_usage_errors() {
    let s = Scratch::new();
    let model = s.model_dir().join("not_read.onnx");
    for (flag, value, says) in [
        ("--ratio", "1.5", "is not a share in [0, 1)"),
        ("--target", "params=2", "is not a share in [0, 1)"),
        ("--target", "bytes=0.5", "is not `params=SHARE` or `flops=SHARE`"),
        ("--criterion", "l3", "unknown criterion `l3`; expected one of l1, l2, random, bn-scale, lamp"),
        ("--node-ratio", "conv", "is not `GLOB=RATIO`"),
        ("--hessian", "fisher", "unknown Hessian source `fisher`; expected one of calib, noise, bn, identity"),
        ("--damping", "-1", "must be a non-negative number"),
    ] {
        let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str(), OsStr::new(flag), OsStr::new(value)]);
        assert_eq!(r.code, Some(2), "{flag} {value}: stderr:\n{}", r.stderr);
        assert!(r.stderr.contains(says), "{flag} {value}: stderr does not say {says:?}:\n{}", r.stderr);
    }
    assert_eq!(s.out_entries(), Vec::<String>::new());
}

#[test]
fn calibration_criteria_without_inputs_name_the_missing_flag() {
    // wanda always reads activations; obspa and flap do with --hessian calib. Without --inputs
    // the run stops before any work and writes nothing.
    let s = Scratch::new();
    let model = common::root().join("testdata/models/mlp.onnx");
    let output = s.output();
    for extra in
        [&["--criterion", "wanda"][..], &["--criterion", "obspa", "--hessian", "calib"], &["--criterion", "flap", "--hessian", "calib"]]
    {
        let mut args = vec![model.as_os_str(), OsStr::new("-o"), output.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        let r = run(args);
        assert_eq!(r.code, Some(1), "{extra:?}: stderr:\n{}", r.stderr);
        assert!(r.stderr.contains("needs calibration inputs: pass --inputs FILE.npz"), "{extra:?}: stderr:\n{}", r.stderr);
    }
    assert_eq!(s.out_entries(), Vec::<String>::new());
}

#[test]
fn obspa_without_data_measures_noise_and_verifies_the_compensated_model() {
    // The default Hessian source needs no data: seeded synthetic inputs run through the model,
    // the consumers are refitted, and verification checks the pruned model against the
    // compensated and masked original.
    let s = Scratch::new();
    let model = common::root().join("testdata/models/conv_residual.onnx");
    let report = s.output().with_extension("json");
    obspa_verified(&model, &[OsStr::new("--ratio"), OsStr::new("0.5"), OsStr::new("--report"), report.as_os_str()]);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
    let c = &common::pass_details(&json, "prune")["compensation"];
    assert!(c["hessian"].as_str().is_some_and(|h| h.starts_with("noise")), "{c:#}");
    assert!(c["layers_compensated"].as_u64() >= Some(2), "{c:#}");
    // The recipe keeps the choice as asked: `auto`, which is noise without inputs.
    assert_eq!(common::pass_options(&json, "prune")["hessian"], "auto");
}

/// `prunec MODEL -o OUT --criterion obspa ARGS…`: the run and its stderr, which must report an
/// exit code 0 and a pruned model equal to the compensated and masked original.
fn obspa_verified(model: &Path, args: &[&OsStr]) -> Run {
    let s = Scratch::new();
    let output = s.output();
    let mut all = vec![model.as_os_str(), OsStr::new("-o"), output.as_os_str(), OsStr::new("--criterion"), OsStr::new("obspa")];
    all.extend_from_slice(args);
    let r = run(all);
    assert_eq!(r.code, Some(0), "{args:?}, stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("equals the compensated and masked original"), "{args:?}, stderr:\n{}", r.stderr);
    r
}

#[test]
fn obspa_refit_on_the_pruned_prefix_still_equals_the_compensated_and_masked_original() {
    // --refit prefix and outputs run the pruned model level by level and refit the layers on what
    // it gives them; the weights they end with are the compensation verification applies.
    let model = common::root().join("testdata/models/conv_residual.onnx");
    let scratch = Scratch::new();
    let report = scratch.output().with_extension("json");
    let mut compensated = Vec::new();
    for mode in ["none", "prefix", "outputs"] {
        let flags =
            [OsStr::new("--ratio"), OsStr::new("0.5"), OsStr::new("--refit"), OsStr::new(mode), OsStr::new("--report"), report.as_os_str()];
        let r = obspa_verified(&model, &flags);
        assert_eq!(r.stderr.contains("on the pruned prefix"), mode != "none", "--refit {mode}, stderr:\n{}", r.stderr);
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
        let c = &common::pass_details(&json, "prune")["compensation"];
        assert_eq!(c["refit_levels"].as_u64().unwrap() > 0, mode != "none", "{c:#}");
        compensated.push(c["layers_compensated"].as_u64().unwrap());
    }
    // prefix refits the consumers the one-shot update compensates; outputs also the layers after.
    assert_eq!(compensated[0], compensated[1]);
    assert!(compensated[2] >= compensated[1], "{compensated:?}");

    // On calibration inputs the refit is the default; on synthetic ones it is not.
    let zoo = common::shared().join("models/zoo");
    let inputs = zoo.join("mobilenet_v2.inputs.npz");
    let r = obspa_verified(&zoo.join("mobilenet_v2.onnx"), &[OsStr::new("--inputs"), inputs.as_os_str()]);
    assert!(r.stderr.contains("on the pruned prefix"), "stderr:\n{}", r.stderr);

    // Magika computes a Reshape's target from its input's Shape: the pieces of the refit
    // recompute such shape arithmetic instead of feeding it back to tract as data.
    let inputs = scratch.output().with_extension("npz");
    let dev = common::shared().join("data/magika.dev.npz");
    let sliced = std::process::Command::new(common::python())
        .args(["-c", "import sys, numpy as np; np.savez(sys.argv[2], bytes=np.load(sys.argv[1])['bytes'][:16])"])
        .args([dev.as_os_str(), inputs.as_os_str()])
        .status()
        .expect("python runs");
    assert!(sliced.success());
    let flags = [
        OsStr::new("--inputs"),
        inputs.as_os_str(),
        OsStr::new("--input-shape"),
        OsStr::new("bytes=16,2048"),
        OsStr::new("--refit"),
        OsStr::new("outputs"),
    ];
    let r = obspa_verified(&common::shared().join("models/real/magika/model.onnx"), &flags);
    assert!(r.stderr.contains("refit in 3 levels"), "stderr:\n{}", r.stderr);
}

// ---------------------------------------------------------------------------------------------
// Verification: only `--no-verify` writes a model that was not verified. Where verification was
// meant to run and fails or cannot run, prunec exits with code 3, says why and writes nothing.

/// `x: f32[1,4] -> MatMul(W1) -> Add(B) -> Exp -> MatMul(W2) -> y`: the four hidden channels
/// form one prunable group. `W1` is zero and `B` 1000, so every hidden channel is `exp(1000)`,
/// infinite; `W2` is positive, so `y` is infinite too.
fn two_layer_model(f: impl FnOnce(&mut GraphProto)) -> ModelProto {
    let mut m = valid_model();
    let g = m.graph.as_mut().expect("graph");
    g.node = vec![
        node("mm1", "MatMul", &["x", "W1"], &["h"]),
        node("bias", "Add", &["h", "B"], &["hb"]),
        node("exp", "Exp", &["hb"], &["e"]),
        node("mm2", "MatMul", &["e", "W2"], &["y"]),
    ];
    g.initializer = vec![f32_tensor("W1", &[4, 4], &[0.0; 16]), f32_tensor("B", &[4], &[1000.0; 4]), f32_tensor("W2", &[4, 4], &[0.5; 16])];
    f(g);
    m
}

/// `prunec MODEL -o out/pruned.onnx ARGS` must exit with code 3, say every phrase of `expected`
/// and leave the output folder as it was: `existing` (if any) untouched, nothing else there.
#[track_caller]
fn assert_unverified(scratch: &Scratch, model: &Path, args: &[&str], expected: &[&str]) {
    let before = scratch.out_entries();
    let existing = std::fs::read(scratch.output()).ok();
    let r = run([model.as_os_str(), OsStr::new("-o"), scratch.output().as_os_str()].into_iter().chain(args.iter().map(OsStr::new)));
    assert_eq!(r.code, Some(3), "expected exit code 3; stderr:\n{}", r.stderr);
    for phrase in expected.iter().chain(&["nothing was written"]) {
        assert!(r.stderr.contains(phrase), "stderr does not say {phrase:?}:\n{}", r.stderr);
    }
    assert!(!r.stderr.contains("panicked"), "prunec panicked:\n{}", r.stderr);
    assert_eq!(scratch.out_entries(), before, "the output folder changed");
    assert_eq!(std::fs::read(scratch.output()).ok(), existing, "the existing output was changed");
}

#[test]
fn a_model_tract_cannot_run_is_not_written_unverified() {
    let s = Scratch::new();
    // A second output from an op of a domain tract does not know; the hidden group is prunable.
    let model = s.model(&{
        let mut m = two_layer_model(|g| {
            g.node.push(NodeProto { domain: Some("com.example".into()), ..node("custom", "Mystery", &["x"], &["z"]) });
            g.output.push(f32_info("z", &[1, 4]));
            g.initializer[0] = f32_tensor("W1", &[4, 4], &weight_values());
            g.initializer[1] = f32_tensor("B", &[4], &[0.0; 4]);
        });
        m.opset_import.push(OperatorSetIdProto { domain: Some("com.example".into()), version: Some(1) });
        m
    });
    assert_unverified(&s, &model, &["--ratio", "0.5"], &["cannot verify the result for", "tract cannot run the original model"]);
    let previous = b"an earlier result".to_vec();
    std::fs::write(s.output(), &previous).expect("existing output");
    assert_unverified(&s, &model, &["--ratio", "0.5"], &["tract cannot run the original model"]);
    // The same command with --no-verify writes the model.
    let r = run([
        model.as_os_str(),
        OsStr::new("-o"),
        s.output().as_os_str(),
        OsStr::new("--ratio"),
        OsStr::new("0.5"),
        OsStr::new("--no-verify"),
    ]);
    assert_eq!(r.code, Some(0), "stderr:\n{}", r.stderr);
    assert_ne!(std::fs::read(s.output()).expect("output"), previous);
}

#[test]
fn a_pruned_model_that_differs_from_the_masked_original_is_not_written() {
    // Masking zeroes the removed channels' rows of W2: 0 × ∞ is NaN in the masked original,
    // while the pruned model, without those channels, stays infinite.
    let s = Scratch::new();
    let model = s.model(&two_layer_model(|_| {}));
    assert_unverified(
        &s,
        &model,
        &["--ratio", "0.5"],
        &["verification failed on the result for", "differs from the masked original on output `y`"],
    );
}

#[test]
fn verify_refuses_a_pruned_model_whose_output_changed_shape() {
    // No pruning run gives such a model (the rewrite never changes an output), so verification is
    // handed one: the CLI turns every verification error into exit code 3, as tested above.
    use prunec::frontend::{ReadOptions, read_bytes};
    let read = |m: &ModelProto| read_bytes(Bytes::from(m.encode_to_vec()), Path::new("."), &ReadOptions::default()).expect("reads").model;
    let original = read(&valid_model());
    let wider = read(&model_with(|g| {
        g.initializer[0] = f32_tensor("W", &[4, 6], &[0.25; 24]);
        g.output[0] = f32_info("y", &[1, 6]);
    }));
    let feed = prunec::runtime::tract::random_feed(&original, Default::default(), &Default::default(), 1).expect("feed");
    let e = prunec::runtime::verify::verify(&original, &wider, &[], Path::new("."), &feed, 1e-4).expect_err("the output changed shape");
    assert!(matches!(e, prunec::runtime::verify::VerifyError::OutputChanged { .. }), "{e}");
    assert_eq!(e.to_string(), "the pruned model's output `y` is F32[1, 6], the original's F32[1, 4]");
}

#[test]
fn a_model_over_a_gib_of_weights_is_neither_verified_nor_written_unasked() {
    // W: f32[4, 72 Mi] external, in a sparse file: 1.125 GiB of weights that take no disk space.
    let s = Scratch::new();
    let columns: i64 = 72 << 20;
    let data = std::fs::File::create(s.model_dir().join("w.bin")).expect("data file");
    data.set_len((4 * columns * 4) as u64).expect("sparse file");
    let model = s.model(&model_with(|g| {
        let entry = |k: &str, v: &str| StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
        g.initializer[0] = TensorProto {
            name: Some("W".into()),
            dims: vec![4, columns],
            data_type: Some(DataType::Float as i32),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![entry("location", "w.bin")],
            ..Default::default()
        };
        g.output[0] = f32_info("y", &[1, columns]);
    }));
    assert_unverified(&s, &model, &[], &["GiB of weights, over the 1 GiB", "pass --verify", "or --no-verify"]);
}

#[test]
fn inputs_whose_arrays_name_no_input_are_an_error_naming_both() {
    let s = Scratch::new();
    let model = s.model(&valid_model());
    let npz = s.model_dir().join("inputs.npz");
    savez(&npz, &["images", "labels"]);
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str(), OsStr::new("--inputs"), npz.as_os_str()]);
    assert_eq!(r.code, Some(1), "stderr:\n{}", r.stderr);
    for phrase in ["no array is named like an input of the model", "it expects `x`", "the file has `images`, `labels`"] {
        assert!(r.stderr.contains(phrase), "stderr does not say {phrase:?}:\n{}", r.stderr);
    }
    assert_eq!(s.out_entries(), Vec::<String>::new(), "files were left in the output folder");
}

#[test]
fn inputs_that_give_some_inputs_say_which_were_generated() {
    let s = Scratch::new();
    // `x` and a second input `bias` added to the weights' product.
    let model = s.model(&model_with(|g| {
        g.node.insert(1, node("add", "Add", &["h", "bias"], &["hb"]));
        g.node[2].input[0] = "hb".into();
        g.input.push(f32_info("bias", &[1, 4]));
    }));
    let npz = s.model_dir().join("inputs.npz");
    savez(&npz, &["x", "labels"]);
    let r = run([model.as_os_str(), OsStr::new("-o"), s.output().as_os_str(), OsStr::new("--inputs"), npz.as_os_str()]);
    assert_eq!(r.code, Some(0), "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("has no array for input `bias`; verification feeds it seeded random values"), "stderr:\n{}", r.stderr);
    assert!(!r.stderr.contains("input `x`"), "stderr:\n{}", r.stderr);
}

/// Writes an `.npz` of f32[1, 4] arrays with the given names.
fn savez(path: &Path, names: &[&str]) {
    let arrays = names.iter().map(|n| format!("{n}=np.ones((1, 4), np.float32)")).collect::<Vec<_>>().join(", ");
    let status = Command::new(common::python())
        .args(["-c", &format!("import sys, numpy as np; np.savez(sys.argv[1], {arrays})")])
        .arg(path)
        .status()
        .expect("python runs");
    assert!(status.success());
}

#[test]
fn unnamed_nodes_are_masked_and_compensated_where_their_weights_are_read() {
    // Many exporters leave node names empty: the masked reference and the compensation must
    // find each consumer as the reader of its weight, not as the first node named "".
    let s = Scratch::new();
    let model = s.model(&two_layer_model(|g| {
        g.initializer[0] = f32_tensor("W1", &[4, 4], &weight_values());
        g.initializer[1] = f32_tensor("B", &[4], &[0.1, -0.2, 0.3, 0.0]);
        g.initializer[2] = f32_tensor("W2", &[4, 4], &weight_values().iter().rev().copied().collect::<Vec<_>>());
        for n in &mut g.node {
            n.name = None;
        }
    }));
    for criterion in ["l2", "obspa"] {
        let r = run([
            model.as_os_str(),
            OsStr::new("--dry-run"),
            OsStr::new("--ratio"),
            OsStr::new("0.5"),
            OsStr::new("--criterion"),
            OsStr::new(criterion),
        ]);
        assert_eq!(r.code, Some(0), "{criterion}: stderr:\n{}", r.stderr);
        assert!(r.stderr.contains("masked original ("), "{criterion}: stderr:\n{}", r.stderr);
    }
}
