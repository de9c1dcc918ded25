//! Cleanup passes change the graph, never what it computes.

mod common;

use common::{all_cases, feed};
use prunec::frontend::{ReadOptions, read_model};
use prunec::passes::{PipelineOptions, parse_pipeline, run_pipeline};

#[test]
fn identity_elimination_and_batchnorm_folding_keep_the_outputs() {
    let passes = parse_pipeline("identity,fold-bn", &PipelineOptions::default()).expect("registered");
    let mut folded = Vec::new();
    for case in all_cases().iter().filter(|c| c.tract_unsupported.is_none()) {
        let loaded = read_model(&case.path, &ReadOptions::default()).expect("the model reads");
        let mut model = loaded.model.clone();
        let runs = run_pipeline(&mut model, &passes).expect("the passes run");
        let removed: usize = runs.iter().map(|r| r.report.ops_removed).sum();
        if removed == 0 {
            continue;
        }
        folded.push(format!("{}: {removed} ops removed", case.name));
        let inputs = feed(case, &loaded.model);
        let v = prunec::verify::verify(&loaded.model, &model, None, &loaded.dir, &inputs, 0.0)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        for o in &v.outputs {
            // Folding reassociates float products: 1e-5 of the output's scale, or 1e-5 absolute
            // for outputs near zero (a sigmoid map of a random image).
            assert!(o.max_abs <= 1e-5 * o.scale.max(1.0), "{}: output `{}` moved by {:.3e} (scale {:.3e})", case.name, o.name, o.max_abs, o.scale);
        }
    }
    eprintln!("{}", folded.join("\n"));
    assert!(folded.iter().any(|f| f.starts_with("conv_residual")), "nothing folded in conv_residual: {folded:?}");
}

#[test]
fn batchnorm_folding_is_snapshotted() {
    let path = common::root().join("testdata/models/conv_residual.onnx");
    let mut model = read_model(&path, &ReadOptions::default()).expect("the model reads").model;
    run_pipeline(&mut model, &parse_pipeline("fold-bn", &PipelineOptions::default()).expect("registered")).expect("the pass runs");
    insta::assert_snapshot!(prunec::ir::dump(&model));
}
