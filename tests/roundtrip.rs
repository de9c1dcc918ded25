//! Roundtrip: every model written back with `--passes none` is the same model.
//!
//! For each testdata and shared model:
//! - the output decodes to the same protobuf as the input (external data compared by content);
//! - tract gives bit-identical outputs for both (or, where tract cannot run the model, fails on
//!   the original too);
//! - the reference ONNX checker accepts the output, ONNX Runtime gives bit-identical outputs,
//!   and an independent parameter count agrees with `prunec inspect`.

mod common;

use common::{Case, all_cases, feed, feed_json, inspect_json, prunec, validate_with_python};
use prost::Message;
use prunec::backends::tract::{Plan, compare};
use prunec::frontend::{ReadOptions, read_model};
use prunec::ir::proto;
use serde_json::json;
use std::path::Path;

#[test]
fn every_model_roundtrips_unchanged() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut manifest = Vec::new();
    for case in all_cases() {
        let out = scratch.path().join(format!("{}.onnx", case.name));
        let status = prunec().arg(&case.path).arg("-o").arg(&out).args(["--passes", "none"]).status().expect("running prunec");
        assert!(status.success(), "{}: prunec exited with {status}", case.name);
        assert_eq!(decode_inline(&case.path), decode_inline(&out), "{}: the written protobuf differs from the input", case.name);
        check_tract(&case, &out);
        let params = inspect_json(&out)["parameters"].as_u64().expect("parameters");
        manifest.push(json!({
            "original": case.path, "output": out, "feed": feed_json(&case), "max_abs": 0.0, "params": params,
        }));
    }
    validate_with_python(&manifest, scratch.path());
}

#[test]
fn output_is_deterministic() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = common::root().join("testdata/models/conv_residual.onnx");
    let write = |name: &str| {
        let out = scratch.path().join(name);
        assert!(prunec().arg(&model).arg("-o").arg(&out).status().expect("running prunec").success());
        std::fs::read(out).expect("output exists")
    };
    assert_eq!(write("a.onnx"), write("b.onnx"));
}

#[test]
fn external_data_layout_follows_the_option() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = common::root().join("testdata/models/external_data/model.onnx");
    let run = |name: &str, option: &str| {
        let out = scratch.path().join(name);
        let status = prunec()
            .arg(&model)
            .arg("-o")
            .arg(&out)
            .args(["--passes", "none", "--external-data", option])
            .status()
            .expect("running prunec");
        assert!(status.success());
        let proto = proto::ModelProto::decode(std::fs::read(&out).expect("output").as_slice()).expect("decodes");
        let external = proto.graph.expect("graph").initializer.iter().filter(|t| !t.external_data.is_empty()).count();
        (external, out.with_extension("onnx.data").exists())
    };
    assert_eq!(run("keep.onnx", "keep"), (2, true), "the input keeps two tensors external");
    assert_eq!(run("inline.onnx", "inline"), (0, false));
    assert_eq!(run("big.onnx", "512B"), (1, true), "only the 864-byte tensor reaches 512 bytes");
    assert_eq!(decode_inline(&model), decode_inline(&scratch.path().join("big.onnx")));
}

fn check_tract(case: &Case, out: &Path) {
    let loaded = read_model(&case.path, &ReadOptions { infer_shapes: false }).expect("prunec reads its input");
    let feed = feed(case, &loaded.model);
    let original = Plan::from_file(&case.path, &feed).and_then(|p| p.run(&feed));
    if let Some(reason) = case.tract_unsupported {
        assert!(original.is_err(), "{}: tract runs the model now; remove the exemption ({reason})", case.name);
        return;
    }
    let original = original.unwrap_or_else(|e| panic!("{}: tract cannot run the original: {e}", case.name));
    let written = Plan::from_file(out, &feed)
        .and_then(|p| p.run(&feed))
        .unwrap_or_else(|e| panic!("{}: tract cannot run the output: {e}", case.name));
    for ((name, a), (_, b)) in original.values.iter().zip(&written.values) {
        let diff = compare(a, b).expect("same shapes");
        assert_eq!(diff.max_abs, 0.0, "{}: output {name} differs by {}", case.name, diff.max_abs);
    }
}

/// The model's protobuf with external tensors inlined, so layouts compare by content.
fn decode_inline(path: &Path) -> proto::ModelProto {
    let mut model = proto::ModelProto::decode(std::fs::read(path).expect("model file").as_slice()).expect("decodes");
    let dir = path.parent().expect("model in a folder");
    for t in &mut model.graph.as_mut().expect("graph").initializer {
        if t.data_location() != proto::tensor_proto::DataLocation::External {
            continue;
        }
        let field = |k: &str| t.external_data.iter().find(|e| e.key() == k).map(|e| e.value().to_string());
        let data = std::fs::read(dir.join(field("location").expect("location"))).expect("data file");
        let offset: usize = field("offset").map_or(0, |o| o.parse().expect("offset"));
        let length: usize = field("length").map_or(data.len() - offset, |l| l.parse().expect("length"));
        t.raw_data = Some(data[offset..offset + length].to_vec().into());
        t.external_data.clear();
        t.data_location = None;
    }
    model
}
