//! Roundtrip: every model written back with `--passes none` is the same model.
//!
//! For each testdata and shared model:
//! - the output decodes to the same protobuf as the input (external data compared by content);
//! - tract gives bit-identical outputs for both (its own copy of each where it refuses the model
//!   as written; or, where it cannot run even that, fails on the original too);
//! - the reference ONNX checker accepts the output, ONNX Runtime gives bit-identical outputs,
//!   and an independent parameter count agrees with `prunec inspect`.

mod common;

use common::{Case, all_cases, feed, feed_json, inspect_json, prunec, validate_with_python};
use prost::Message;
use prunec::frontend::{ReadOptions, read_model};
use prunec::ir::proto;
use prunec::runtime::tract::{Plan, compare};
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

/// Both files read by prunec and run in tract: where tract refuses a model as written it runs
/// its own copy (functions expanded, the feed's `If`s inlined), made the same way for both.
fn check_tract(case: &Case, out: &Path) {
    let loaded = read_model(&case.path, &ReadOptions { infer_shapes: false }).expect("prunec reads its input");
    let feed = feed(case, &loaded.model);
    let original = Plan::from_model(&loaded.model, &loaded.dir, &feed).and_then(|p| p.run(&feed));
    let original = original.unwrap_or_else(|e| panic!("{}: tract cannot run the original: {e}", case.name));
    let written = read_model(out, &ReadOptions { infer_shapes: false }).expect("prunec reads its output");
    let written = Plan::from_model(&written.model, &written.dir, &feed)
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

/// Pruning slices external weights lazily and streams the kept elements into the output's data
/// file; the model must be the one pruning the same weights inline gives, byte for byte once the
/// external data is inlined, and run identically in tract and ONNX Runtime.
#[test]
fn pruned_external_tensors_stream_like_inline_ones() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let case = all_cases().into_iter().find(|c| c.name == "conv_residual").expect("testdata model");
    let dir = |name: &str| {
        let d = scratch.path().join(name);
        std::fs::create_dir_all(&d).expect("folder");
        d
    };
    let run = |args: &[&str], input: &Path, out: &Path| {
        let o = prunec().arg(input).arg("-o").arg(out).args(args).output().expect("running prunec");
        assert!(o.status.success(), "prunec {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    };
    // Every tensor of the input external (threshold one byte), then pruned keeping that layout.
    let external = dir("external").join("model.onnx");
    run(&["--passes", "none", "--external-data", "1"], &case.path, &external);
    let inline = dir("inline").join("pruned.onnx");
    run(&["--ratio", "0.5", "--no-verify"], &case.path, &inline);
    let streamed = dir("streamed").join("pruned.onnx");
    // Verification runs here too: the masked reference and tract read the sliced tensors whole.
    run(&["--ratio", "0.5"], &external, &streamed);
    let materialised = dir("materialised").join("pruned.onnx");
    run(&["--ratio", "0.5", "--no-verify", "--external-data", "inline"], &external, &materialised);

    let data = streamed.with_extension("onnx.data");
    assert!(data.exists(), "the sliced weights stay external");
    let want = decode_inline(&inline);
    assert_eq!(decode_inline(&streamed), want, "streamed external slices differ from inline slicing");
    assert_eq!(decode_inline(&materialised), want, "materialised slices differ from inline slicing");

    let loaded = read_model(&case.path, &ReadOptions { infer_shapes: false }).expect("prunec reads its input");
    let input = feed(&case, &loaded.model);
    let run_tract = |p: &Path| Plan::from_file(p, &input).and_then(|plan| plan.run(&input)).expect("tract runs the pruned model");
    let (ra, rb) = (run_tract(&inline), run_tract(&streamed));
    for ((name, x), (_, y)) in ra.values.iter().zip(&rb.values) {
        assert_eq!(compare(x, y).expect("same shapes").max_abs, 0.0, "output {name} differs in tract");
    }
    let manifest = [json!({ "original": inline, "output": streamed, "feed": feed_json(&case), "max_abs": 0.0 })];
    validate_with_python(&manifest, scratch.path());
}

#[test]
fn per_tensor_external_data_puts_each_tensor_in_its_own_file() {
    // `--external-data 1 --external-data-layout per-tensor`: every initializer of conv_residual
    // in a file of its own, and the model still runs identically in tract and ONNX Runtime and
    // passes the checker.
    let scratch = tempfile::tempdir().expect("temp dir");
    let case = all_cases().into_iter().find(|c| c.name == "conv_residual").expect("testdata model");
    let out = scratch.path().join("model.onnx");
    let o = prunec()
        .arg(&case.path)
        .arg("-o")
        .arg(&out)
        .args(["--passes", "none", "--external-data", "1", "--external-data-layout", "per-tensor"])
        .output()
        .expect("running prunec");
    assert!(o.status.success(), "prunec failed: {}", String::from_utf8_lossy(&o.stderr));
    let loaded = read_model(&case.path, &ReadOptions { infer_shapes: false }).expect("prunec reads its input");
    let initializers = loaded.model.graph.initializers.len();
    let mut files: Vec<String> =
        std::fs::read_dir(scratch.path()).expect("listing").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files.len(), initializers + 1, "one data file per initializer plus the model: {files:?}");
    assert!(files.iter().all(|f| f == "model.onnx" || f.starts_with("model.onnx.data")), "{files:?}");
    assert_eq!(decode_inline(&out), decode_inline(&case.path), "the same model once its data is inlined");
    let input = feed(&case, &loaded.model);
    let run_tract = |p: &Path| Plan::from_file(p, &input).and_then(|plan| plan.run(&input)).expect("tract runs the model");
    let (ra, rb) = (run_tract(&case.path), run_tract(&out));
    for ((name, x), (_, y)) in ra.values.iter().zip(&rb.values) {
        assert_eq!(compare(x, y).expect("same shapes").max_abs, 0.0, "output {name} differs in tract");
    }
    let manifest = [json!({ "original": case.path, "output": out, "feed": feed_json(&case), "max_abs": 0.0 })];
    validate_with_python(&manifest, scratch.path());
}

/// Graph outputs with symbolic dimensions, and records of one value that disagree, come back
/// byte for byte: an old converter's model (IR version 6, opset 12, `com.microsoft` domains)
/// whose output `scores` is declared f32[1, seqlen] while value_info lists it with no shape, whose
/// input `mask` is also an output, and whose value_info repeats an entry between others and names
/// a value the graph does not hold; and the zoo's resnet18 with every value and weight recorded,
/// batch named `batch` in its input, output and inner records.
#[test]
fn passes_none_gives_back_every_record_byte_for_byte() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let py = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(common::python())
            .arg(common::root().join("tests/validate/exporters.py"))
            .args(args)
            .output()
            .expect("running python");
        assert!(out.status.success(), "exporters.py failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(std::path::PathBuf::from).collect::<Vec<_>>()
    };
    let legacy = scratch.path().join("legacy.onnx");
    py(&[std::ffi::OsStr::new("legacy"), legacy.as_os_str()]);
    let resnet = common::shared().join("models/zoo/resnet18.onnx");
    let mut models = py(&[std::ffi::OsStr::new("make"), resnet.as_os_str(), scratch.path().as_os_str()]);
    models.insert(0, legacy.clone());
    let mut manifest = Vec::new();
    for model in &models {
        let out = model.with_extension("out.onnx");
        let o = prunec().arg(model).arg("-o").arg(&out).args(["--passes", "none"]).output().expect("running prunec");
        assert!(o.status.success(), "{}: {}", model.display(), String::from_utf8_lossy(&o.stderr));
        let (want, got) = (std::fs::read(model).expect("model"), std::fs::read(&out).expect("output"));
        assert_eq!(decode_inline(model), decode_inline(&out), "{}: the written protobuf differs from the input", model.display());
        assert!(want == got, "{}: the protobuf is the same but the bytes are not", model.display());
        let feed = if *model == legacy {
            json!({ "tensors": [
                { "name": "x", "dtype": "float32", "shape": [1, 5, 4], "fill": "random" },
                { "name": "mask", "dtype": "float32", "shape": [1, 5], "fill": "random" },
            ] })
        } else {
            json!({ "npz": common::shared().join("models/zoo/resnet18.inputs.npz") })
        };
        manifest.push(json!({ "original": model, "output": out, "feed": feed, "max_abs": 0.0 }));
    }
    validate_with_python(&manifest, scratch.path());
    let declared =
        proto::ModelProto::decode(std::fs::read(legacy.with_extension("out.onnx")).expect("output").as_slice()).expect("decodes");
    let scores = &declared.graph.expect("graph").output[0];
    assert_eq!(scores.name(), "scores");
    let Some(proto::type_proto::Value::TensorType(t)) = scores.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        panic!("no tensor type")
    };
    assert_eq!(t.shape.as_ref().map(|s| s.dim.len()), Some(2), "the output keeps its declared f32[1, seqlen]");
}
