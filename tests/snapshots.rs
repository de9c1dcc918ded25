//! Snapshots of the IR text dump: of every testdata model as read, and of every rewrite before
//! and after. Review changes to `tests/snapshots/*.snap` like code.

mod common;

use prunec::frontend::{ReadOptions, read_model};
use prunec::ir::dump;

fn dump_of(file: &str) -> (prunec::ir::Model, String) {
    let loaded = read_model(&common::root().join("testdata/models").join(file), &ReadOptions::default()).expect("testdata models read");
    let text = dump(&loaded.model);
    (loaded.model, text)
}

#[test]
fn dumps_of_testdata_models() {
    for file in [
        "attention.onnx",
        "concat_split.onnx",
        "conv_residual.onnx",
        "dead_code.onnx",
        "depthwise.onnx",
        "grouped_conv.onnx",
        "exotic.onnx",
        "external_data/model.onnx",
        "if_subgraph.onnx",
        "mlp.onnx",
        "byte_embed.onnx",
    ] {
        let name = file.trim_end_matches(".onnx").replace('/', "_");
        insta::assert_snapshot!(format!("dump_{name}"), dump_of(file).1);
    }
}

#[test]
fn dce_removes_the_dead_branch_and_its_weights() {
    let (mut model, before) = dump_of("dead_code.onnx");
    let passes = prunec::passes::parse_pipeline("dce").expect("dce is registered");
    let runs = prunec::passes::run_pipeline(&mut model, &passes, &mut Default::default()).expect("dce runs");
    assert_eq!((runs[0].report.ops_removed, runs[0].report.values_removed), (2, 4));
    insta::assert_snapshot!("dce_dead_code_before", before);
    insta::assert_snapshot!("dce_dead_code_after", dump(&model));
}
