//! Cleanup passes change the graph, never what it computes.

mod common;

use common::{all_cases, feed};
use prunec::frontend::{ReadOptions, read_model};
use prunec::passes::{parse_pipeline, run_pipeline};

#[test]
fn folding_identity_elimination_and_batchnorm_folding_keep_the_outputs() {
    let passes = parse_pipeline("fold,identity,fold-bn").expect("registered");
    let mut folded = Vec::new();
    for case in all_cases().iter() {
        let mut loaded = read_model(&case.path, &ReadOptions::default()).expect("the model reads");
        // An all-zero head would make the comparison vacuous (and verification refuses it).
        common::weigh_vit_head(&mut loaded.model);
        let mut model = loaded.model.clone();
        let runs = run_pipeline(&mut model, &passes, &mut Default::default()).expect("the passes run");
        let removed: usize = runs.iter().map(|r| r.report.ops_removed).sum();
        if removed == 0 {
            continue;
        }
        folded.push(format!("{}: {removed} ops removed", case.name));
        let inputs = feed(case, &loaded.model);
        let v = prunec::runtime::verify::verify(&loaded.model, &model, &[], &loaded.dir, &inputs, f64::INFINITY)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        for o in &v.outputs {
            // Folding reassociates float products: 1e-5 of the output's scale, or 1e-5 absolute
            // for outputs near zero (a sigmoid map of a random image).
            assert!(
                o.max_abs <= 1e-5 * o.scale.max(1.0),
                "{}: output `{}` moved by {:.3e} (scale {:.3e})",
                case.name,
                o.name,
                o.max_abs,
                o.scale
            );
        }
    }
    eprintln!("{}", folded.join("\n"));
    for name in ["conv_residual", "shufflenet_v2_x0_5", "tiny_flux"] {
        assert!(folded.iter().any(|f| f.starts_with(name)), "nothing folded in {name}: {folded:?}");
    }
}

#[test]
fn batchnorm_folding_is_snapshotted() {
    let path = common::root().join("testdata/models/conv_residual.onnx");
    let mut model = read_model(&path, &ReadOptions::default()).expect("the model reads").model;
    run_pipeline(&mut model, &parse_pipeline("fold-bn").expect("registered"), &mut Default::default()).expect("the pass runs");
    insta::assert_snapshot!(prunec::ir::dump(&model));
}

#[test]
fn folding_shape_arithmetic_unfreezes_the_groups_it_read() {
    // ShuffleNetV2 splits its channels with Slice bounds computed from Shape at run time, which
    // freezes both halves; the sizes are fixed, so folding makes the bounds constants.
    let path = common::shared().join("models/zoo/shufflenet_v2_x0_5.onnx");
    let mut model = read_model(&path, &ReadOptions::default()).expect("the model reads").model;
    let prunable = |m: &prunec::ir::Model| prunec::ir::analyse_groups(&m.graph).groups.iter().filter(|g| g.prunable).count();
    let before = prunable(&model);
    run_pipeline(&mut model, &parse_pipeline("fold").expect("registered"), &mut Default::default()).expect("the pass runs");
    let after = prunable(&model);
    assert!(after > before, "folding left {before} prunable groups");
    assert!(model.graph.op_ids().all(|op| model.graph.op(op).op_type != "Shape"), "a Shape of fixed sizes is left");
}

#[test]
fn cleaned_models_pass_the_checker_and_compute_the_same_in_onnxruntime() {
    // Every model, the ones tract cannot run included: ONNX Runtime is the judge here.
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut manifest = Vec::new();
    for case in all_cases() {
        for (tag, passes, max_abs) in [("exact", "dce,fold,identity", 0.0), ("bn", "fold-bn", 1e-4)] {
            let out = scratch.path().join(format!("{}_{tag}.onnx", case.name));
            let run = common::prunec()
                .arg(&case.path)
                .arg("-o")
                .arg(&out)
                .args(["--passes", passes, "--no-verify"])
                .output()
                .expect("running prunec");
            assert!(run.status.success(), "{} {passes}: {}", case.name, String::from_utf8_lossy(&run.stderr));
            manifest
                .push(serde_json::json!({ "original": case.path, "output": out, "feed": common::feed_json(&case), "max_abs": max_abs }));
        }
    }
    common::validate_with_python(&manifest, scratch.path());
}
