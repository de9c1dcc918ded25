//! Snapshots of the IR text dump: of every testdata model as read, and of every rewrite before
//! and after. Review changes to `tests/snapshots/*.snap` like code.

mod common;

use prunec::frontend::{ReadOptions, read_model};
use prunec::ir::dump;
use prunec::passes::PassDetails;

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

fn run(model: &mut prunec::ir::Model, pipeline: &str) -> Vec<prunec::passes::PassRun> {
    let passes = prunec::passes::parse_pipeline(pipeline).expect("the pipeline parses");
    prunec::passes::run_pipeline(model, &passes, &mut Default::default()).expect("the pipeline runs")
}

#[test]
fn fold_turns_the_shape_arithmetic_of_known_sizes_into_constants() {
    // tiny_bert computes its attention's head shapes from Shape reads of fixed axes.
    let path = common::shared().join("models/zoo/tiny_bert.onnx");
    let mut model = read_model(&path, &ReadOptions::default()).expect("tiny_bert reads").model;
    let before = dump(&model);
    let runs = run(&mut model, "fold");
    assert!(runs[0].report.ops_removed > 0);
    insta::assert_snapshot!("fold_tiny_bert_diff", common::dump_diff(&before, &dump(&model)));
}

#[test]
fn identity_elimination_rewires_the_readers_and_keeps_the_outputs_named() {
    // mobilenet_v3_small's exporter left Identity copies of shared weights; exotic.onnx's one
    // Identity produces a graph output, whose name is the interface: it stays.
    let path = common::shared().join("models/zoo/mobilenet_v3_small.onnx");
    let mut model = read_model(&path, &ReadOptions::default()).expect("mobilenet_v3_small reads").model;
    let before = dump(&model);
    let runs = run(&mut model, "identity");
    assert_eq!(runs[0].report.ops_removed, 5);
    insta::assert_snapshot!("identity_mobilenet_v3_small_diff", common::dump_diff(&before, &dump(&model)));
    let (mut exotic, before) = dump_of("exotic.onnx");
    run(&mut exotic, "identity");
    assert_eq!(dump(&exotic), before, "the Identity naming a graph output was removed");
}

#[test]
fn obspa_compensation_rewrites_the_kept_weights_of_the_consumers() {
    // The dump summarises each weight (mean, std, largest magnitude): the compensated consumers
    // differ from a plain slice of the original, the pruned producers do not.
    let path = common::root().join("testdata/models/mlp.onnx");
    let loaded = read_model(&path, &ReadOptions::default()).expect("mlp reads");
    let mut model = loaded.model.clone();
    let before = dump(&model);
    let mut runtime = prunec::runtime::measure::TractRuntime { dir: loaded.dir.clone(), ..Default::default() };
    let passes = prunec::passes::parse_pipeline("prune{criterion=obspa,ratio=0.5,hessian=noise}").expect("parses");
    let runs = prunec::passes::run_pipeline(&mut model, &passes, &mut prunec::passes::Context::with_runtime(&mut runtime)).expect("runs");
    let report = runs[0].report.details::<prunec::passes::prune::PruneReport>().expect("prune details");
    assert!(report.compensation.as_ref().is_some_and(|c| c.layers_compensated > 0), "{report:?}");
    insta::assert_snapshot!("prune_obspa_mlp_diff", common::dump_diff(&before, &dump(&model)));
}

#[test]
fn two_prune_entries_of_one_pipeline_keep_their_own_options() {
    // The first entry leaves the group fc3 reads (fc2's outputs) alone and halves fc1's; the
    // second then takes a quarter of what is left of both, by another criterion.
    let (mut model, before) = dump_of("mlp.onnx");
    let runs = run(&mut model, "prune{ratio=0.5,exclude=/fc3/*},prune{ratio=0.25,criterion=l1}");
    let summary: Vec<String> = runs
        .iter()
        .map(|r| {
            let p = r.report.details::<prunec::passes::prune::PruneReport>().expect("prune details");
            let groups: Vec<String> = p.groups.iter().map(|g| format!("group {} kept {} of {}", g.id, g.kept, g.channels)).collect();
            format!("{} ratio {} criterion {}: {}", r.name, p.ratio, p.criterion, groups.join(", "))
        })
        .collect();
    insta::assert_snapshot!("two_prunes_mlp", format!("{}\n\n{}", summary.join("\n"), common::dump_diff(&before, &dump(&model))));
}

#[test]
fn remove_layers_splices_out_a_layer_and_its_dead_branch() {
    // tiny_bert's layer 1, chosen by index (data-free: no inputs), after folding its shape
    // arithmetic: the readers of its output sum read its input instead, and both branches go
    // with the weights only they used.
    let path = common::shared().join("models/zoo/tiny_bert.onnx");
    let mut model = read_model(&path, &ReadOptions::default()).expect("tiny_bert reads").model;
    run(&mut model, "fold");
    let before = dump(&model);
    let runs = run(&mut model, "remove-layers{layers=1}");
    let report = runs[0].report.details::<prunec::passes::layers::RemoveLayersReport>().expect("remove-layers details");
    assert_eq!(report.removed.iter().map(|r| r.unit.layer).collect::<Vec<_>>(), [1]);
    insta::assert_snapshot!(
        "remove_layers_tiny_bert_layer1_diff",
        format!("{}\n\n{}", report.summary().join("\n"), common::dump_diff(&before, &dump(&model)))
    );
}
