//! The pass framework from the command line: pipelines with per-pass options, their printed
//! form, recipes and replayed reports, the registry's promises, exit codes, and the report's
//! schema.

mod common;

use common::{all_cases, prunec, python, run_captured};
use prunec::passes::{PassOptions, Pipeline, REGISTRY};
use serde_json::Value as Json;
use std::path::Path;
use std::time::Duration;

const HANG: Duration = Duration::from_secs(600);

/// Runs `prunec ARGS…`; the exit code and stderr.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = prunec();
    cmd.args(args);
    let r = run_captured(cmd, HANG).expect("prunec runs");
    (r.code, r.stderr)
}

fn read_json(path: &Path) -> Json {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("JSON")
}

/// The report without what changes from run to run (timings).
fn without_timings(mut report: Json) -> Json {
    for pass in report["passes"].as_array_mut().into_iter().flatten() {
        pass["ms"] = Json::Null;
    }
    if let Some(v) = report.get_mut("verification").filter(|v| !v.is_null()) {
        v["original_ms"] = Json::Null;
        v["pruned_ms"] = Json::Null;
    }
    report
}

#[test]
fn options_in_the_pipeline_write_what_the_shorthand_flags_write() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let (a, b) = (scratch.path().join("a.onnx"), scratch.path().join("b.onnx"));
    let mut checked = 0;
    for case in all_cases().iter().filter(|c| c.path.starts_with(common::shared())) {
        let model = case.path.to_str().expect("utf-8 path");
        let inline = ["--passes", "dce,fold,prune{ratio=0.4,criterion=l1},identity"];
        let flags = ["--ratio", "0.4", "--criterion", "l1"];
        for (out, args) in [(&a, &inline[..]), (&b, &flags[..])] {
            let (code, stderr) = run(&[&[model, "-o", out.to_str().unwrap(), "--no-verify"][..], args].concat());
            assert_eq!(code, Some(0), "{}: {args:?}: {stderr}", case.name);
        }
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "{}: the two forms wrote different models", case.name);
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} shared models");
}

#[test]
fn the_printed_pipeline_parses_back_to_the_same_pipeline() {
    for text in [
        "none",
        prunec::passes::DEFAULT_PIPELINE,
        "dce,prune{ratio=0.5,exclude=/a/*,/b/*},prune{criterion=obspa,hessian=bn,target=params=0.3},fold-bn",
        r#"prune{exclude="odd,name{1}",node-ratio=/x*=0.2,/y*=0.1,refit=outputs,damping=0.05}"#,
    ] {
        let printed = Pipeline::parse(text).expect(text).to_string();
        let again = Pipeline::parse(&printed).unwrap_or_else(|e| panic!("{printed}: {e}")).to_string();
        assert_eq!(printed, again, "{text}");
    }
    // The command line prints the same, with the shorthand flags folded into the prune entry.
    let (code, _) = run(&["--print-pipeline", "--ratio", "0.25"]);
    assert_eq!(code, Some(0));
    let mut cmd = prunec();
    cmd.args(["--print-pipeline", "--ratio", "0.25"]);
    let printed = run_captured(cmd, HANG).expect("runs").stdout;
    assert!(printed.contains("prune{criterion=l2,ratio=0.25,"), "{printed}");
    let mut cmd = prunec();
    cmd.args(["--print-pipeline", "--passes", printed.trim()]);
    assert_eq!(run_captured(cmd, HANG).expect("runs").stdout, printed);
}

#[test]
fn every_registered_pass_documents_its_options_prints_them_back_and_has_a_snapshot() {
    // Where each pass's rewrite is snapshotted (tests/snapshots/<file>.snap).
    let snapshots = [
        ("dce", "snapshots__dce_dead_code_after"),
        ("fold", "snapshots__fold_tiny_bert_diff"),
        ("identity", "snapshots__identity_mobilenet_v3_small_diff"),
        ("fold-bn", "cleanup__batchnorm_folding_is_snapshotted"),
        ("dequantize", "nnef__dequantize_qdq_weights_diff"),
        ("prune", "prune__pruned_conv_residual"),
        ("remove-layers", "snapshots__remove_layers_tiny_bert_layer1_diff"),
        ("single-stream", "streams__single_stream_tiny_sd3_last1_diff"),
    ];
    for r in REGISTRY {
        assert!(!r.summary.is_empty(), "{}: no summary", r.name);
        for o in r.options {
            assert!(!o.doc.is_empty() && !o.kind.is_empty(), "{}: option `{}` is undocumented", r.name, o.key);
        }
        let pass = (r.build)(&[]).unwrap_or_else(|e| panic!("{}: the defaults do not build: {e}", r.name));
        let printed: Vec<(String, String)> = pass.options().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let keys: Vec<&str> = printed.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, r.options.iter().map(|o| o.key).collect::<Vec<_>>(), "{}: printed keys differ from the schema", r.name);
        for ((key, value), spec) in printed.iter().zip(r.options) {
            assert_eq!(value, spec.default, "{}: `{key}` prints {value:?} by default, the schema says {:?}", r.name, spec.default);
        }
        let rebuilt = (r.build)(&printed).unwrap_or_else(|e| panic!("{}: its printed options do not parse: {e}", r.name));
        assert_eq!(rebuilt.options(), pass.options(), "{}", r.name);
        let (_, file) = snapshots.iter().find(|(n, _)| *n == r.name).unwrap_or_else(|| panic!("{}: no snapshot test", r.name));
        let path = common::root().join("tests/snapshots").join(format!("{file}.snap"));
        assert!(path.is_file(), "{}: {} is missing", r.name, path.display());
    }
    // Every non-default value prints back too.
    let mut options = prunec::passes::prune::PruneOptions::default();
    for (key, value) in [("target", "flops=0.25"), ("exclude", "/a*,/b*"), ("node-ratio", "/c*=0.5"), ("hessian", "bn"), ("refit", "none")]
    {
        options.set(key, value).expect("valid");
        assert_eq!(options.get(key), value);
    }
    let mut options = prunec::passes::layers::RemoveLayersOptions::default();
    for (key, value) in [
        ("layers", "3,4,5"),
        ("target", "params=0.25"),
        ("sub-block", "mlp"),
        ("score", "influence"),
        ("aggregate", "max"),
        ("merge", "average"),
        ("greedy", "true"),
        ("contiguous", "true"),
    ] {
        options.set(key, value).expect("valid");
        assert_eq!(options.get(key), value);
    }
}

#[test]
fn a_recipe_and_the_equivalent_flags_give_the_same_model_and_report() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = common::root().join("testdata/models/conv_residual.onnx");
    let (out, report) = (scratch.path().join("out.onnx"), scratch.path().join("report.json"));
    let recipe = scratch.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        "[[passes]]\nname = \"dce\"\n\n[[passes]]\nname = \"fold\"\n\n[[passes]]\nname = \"prune\"\nratio = 0.5\ncriterion = \"obspa\"\nseed = 3\n\n\
         [[passes]]\nname = \"identity\"\n\n[verify]\nenabled = true\nforce = false\ntolerance = 1e-5\nseed = 3\n\n[output]\nexternal-data = \"inline\"\nlayout = \"one-file\"\n",
    )
    .expect("recipe written");
    let m = model.to_str().unwrap();
    let base = [m, "-o", out.to_str().unwrap(), "--report", report.to_str().unwrap()];
    let mut results = Vec::new();
    for args in [
        vec!["--recipe", recipe.to_str().unwrap()],
        vec!["--ratio", "0.5", "--criterion", "obspa", "--tolerance", "1e-5", "--seed", "3", "--external-data", "inline"],
    ] {
        let (code, stderr) = run(&[&base[..], &args[..]].concat());
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        results.push((std::fs::read(&out).unwrap(), without_timings(read_json(&report))));
    }
    assert!(results[0].0 == results[1].0, "the recipe and the flags wrote different models");
    assert_eq!(results[0].1, results[1].1, "the recipe and the flags wrote different reports");
    // A flag overrides the recipe.
    let (code, _) = run(&[&base[..], &["--recipe", recipe.to_str().unwrap(), "--ratio", "0.25"]].concat());
    assert_eq!(code, Some(0));
    assert_eq!(common::pass_options(&read_json(&report), "prune")["ratio"], "0.25");
}

#[test]
fn a_report_replayed_as_a_recipe_gives_the_same_output() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = common::root().join("testdata/models/concat_split.onnx");
    let m = model.to_str().unwrap();
    let (first, second) = (scratch.path().join("first.onnx"), scratch.path().join("second.onnx"));
    let report = scratch.path().join("first.json");
    let replayed = scratch.path().join("second.json");
    let (code, stderr) = run(&[
        m,
        "-o",
        first.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--passes",
        "dce,prune{ratio=0.5,global=true},identity",
        "--round-to",
        "2",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) =
        run(&[m, "-o", second.to_str().unwrap(), "--recipe", report.to_str().unwrap(), "--report", replayed.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(std::fs::read(&first).unwrap() == std::fs::read(&second).unwrap(), "the replay wrote another model");
    let (mut a, mut b) = (without_timings(read_json(&report)), without_timings(read_json(&replayed)));
    for r in [&mut a, &mut b] {
        r["output"] = Json::Null;
    }
    assert_eq!(a, b);
}

#[test]
fn stop_after_ends_the_pipeline_and_print_after_dumps_the_ir() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = common::root().join("testdata/models/dead_code.onnx");
    let report = scratch.path().join("r.json");
    let out = scratch.path().join("out.onnx");
    let (code, stderr) = run(&[
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--stop-after",
        "dce",
        "--print-after",
        "all",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("; IR after pass `dce`\nmodel ir_version="), "{stderr}");
    assert!(!stderr.contains("IR after pass `fold`"), "{stderr}");
    let names: Vec<Json> = read_json(&report)["passes"].as_array().unwrap().iter().map(|p| p["name"].clone()).collect();
    assert_eq!(names, vec![Json::from("dce")]);
    // A pass the pipeline does not run is a usage error, before anything is read.
    let (code, stderr) = run(&["missing.onnx", "-o", out.to_str().unwrap(), "--stop-after", "fold-bn"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("the pipeline has no pass `fold-bn`"), "{stderr}");
}

#[test]
fn exit_codes_tell_usage_errors_from_other_errors() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let out = scratch.path().join("out.onnx");
    let o = out.to_str().unwrap();
    let bad_recipe = scratch.path().join("bad.toml");
    std::fs::write(&bad_recipe, "[verify]\nenabled = \"maybe\"\n").unwrap();
    let model = common::root().join("testdata/models/mlp.onnx");
    let m = model.to_str().unwrap();
    for (args, code, says) in [
        (vec![m, "-o", o, "--passes", "prune{ratio=2}"], 2, "is not a share in [0, 1)"),
        (vec![m, "-o", o, "--passes", "prune{speed=11}"], 2, "has no option `speed`"),
        (vec![m, "-o", o, "--passes", "dce{x=1}"], 2, "pass `dce` has no option `x`"),
        (vec![m, "-o", o, "--passes", "prune{ratio=0.3"], 2, "is not closed"),
        (vec![m, "-o", o, "--passes", "squash"], 2, "unknown pass `squash`"),
        (vec![m, "-o", o, "--recipe", bad_recipe.to_str().unwrap()], 2, "is not valid"),
        (vec!["no_such_model.onnx", "-o", o], 1, "no_such_model.onnx"),
        (vec![m, "-o", o, "--criterion", "wanda"], 1, "needs calibration inputs"),
    ] {
        let (got, stderr) = run(&args);
        assert_eq!(got, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} does not say {says:?}: {stderr}");
        assert!(!out.exists(), "{args:?} wrote a model");
    }
}

#[test]
fn reports_follow_their_committed_schema() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let zoo = common::shared().join("models/zoo");
    let runs: Vec<(String, Vec<String>)> = vec![
        ("conv_residual.onnx".into(), vec![]),
        ("conv_residual.onnx".into(), vec!["--criterion".into(), "obspa".into()]),
        ("mlp.onnx".into(), vec!["--passes".into(), "none".into()]),
        ("attention.onnx".into(), vec!["--dry-run".into()]),
        ("concat_split.onnx".into(), vec!["--no-verify".into(), "--target".into(), "params=0.3".into()]),
    ];
    let mut reports = Vec::new();
    for (i, (model, args)) in runs.iter().enumerate() {
        let model = common::root().join("testdata/models").join(model);
        let report = scratch.path().join(format!("{i}.json"));
        let out = scratch.path().join(format!("{i}.onnx"));
        let mut all = vec![
            model.to_str().unwrap().to_string(),
            "-o".into(),
            out.to_str().unwrap().into(),
            "--report".into(),
            report.to_str().unwrap().into(),
        ];
        all.extend(args.iter().cloned());
        let (code, stderr) = run(&all.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, Some(0), "{all:?}: {stderr}");
        reports.push(report);
    }
    // A diffusion transformer whose pruned groups cross a LayerNorm: verified, but not judged.
    let flux = scratch.path().join("flux.json");
    let (code, stderr) = run(&[
        zoo.join("tiny_flux.onnx").to_str().unwrap(),
        "--dry-run",
        "--report",
        flux.to_str().unwrap(),
        "--inputs",
        zoo.join("tiny_flux.inputs.npz").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let v = &read_json(&flux)["verification"];
    assert_eq!((&v["judged"], &v["reference"]), (&Json::from(false), &Json::from("tolerance")), "{v:#}");
    reports.push(flux);
    let schema = common::root().join("src/cli/report.schema.json");
    let script = "import json, sys, jsonschema\nschema = json.load(open(sys.argv[1]))\njsonschema.Draft202012Validator.check_schema(schema)\n\
                  for path in sys.argv[2:]:\n    jsonschema.validate(json.load(open(path)), schema)\nprint(len(sys.argv) - 2)\n";
    let mut cmd = std::process::Command::new(python());
    cmd.arg("-c").arg(script).arg(&schema).args(&reports);
    let r = run_captured(cmd, HANG).expect("python runs");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), reports.len().to_string());
}

#[test]
fn a_comparison_of_outputs_that_do_not_depend_on_the_inputs_is_vacuous_and_refused() {
    // torchvision initialises ViT's classifier to zeros: whatever the pruning did, the logits
    // are 0 everywhere, and "equal to the reference" would say nothing.
    let scratch = tempfile::tempdir().expect("temp dir");
    let out = scratch.path().join("vit.onnx");
    let zoo = common::shared().join("models/zoo");
    let (code, stderr) = run(&[zoo.join("tiny_vit.onnx").to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("is 0 everywhere") && stderr.contains("would prove nothing"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn open_image_sides_are_verified_at_a_realistic_size_and_the_report_says_which() {
    // PP-OCRv4's detector declares `x` [N, 3, H, W] with every axis open: a 1×1 image would
    // make verification (and data-free statistics) say nothing about the convolutions.
    let scratch = tempfile::tempdir().expect("temp dir");
    let report = scratch.path().join("det.json");
    let det = common::shared().join("models/real/rapidocr/ch_PP-OCRv4_det_infer.onnx");
    let (code, stderr) = run(&[det.to_str().unwrap(), "--dry-run", "--report", report.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("x[1, 3, 224, 224]"), "{stderr}");
    assert_eq!(read_json(&report)["inputs"]["shapes"]["x"], serde_json::json!([1, 3, 224, 224]));
}
