//! The IR's validation runs after every pass (in debug builds and tests): a pass that leaves a
//! model the reader would refuse is caught at that pass, by name.

mod common;

use common::root;
use prunec::frontend::{ReadOptions, read_model};
use prunec::ir::{Model, OpRule, ValidateError, constant_tensor};
use prunec::passes::{Context, Pass, PassError, PassReport, Pipeline, parse_pipeline, run_pipeline};

/// A deliberately broken rewrite: drops the first input channel of one Conv's weight and leaves
/// its input alone, as a pruning rewrite that forgot a consumer would.
struct DropConvInputChannel;

impl Pass for DropConvInputChannel {
    fn name(&self) -> &'static str {
        "drop-conv-input-channel"
    }

    fn options(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    fn needs_shapes(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, _: &mut Context) -> Result<PassReport, PassError> {
        let g = &mut model.graph;
        let w = g
            .op_ids()
            .filter(|&op| g.op(op).op_type == "Conv" && g.op(op).attr_int("group").unwrap_or(1) == 1)
            .find_map(|op| {
                let w = g.op_input(op, 1)?;
                g.value(w).initializer().is_some().then_some(w)
            })
            .expect("the model has a Conv with an initializer weight");
        let sliced = constant_tensor(g, w).expect("a constant").remove_indices(1, &[0]).expect("the weight has input channels");
        g.set_initializer(w, sliced);
        Ok(PassReport::default())
    }
}

fn model() -> Model {
    read_model(&root().join("testdata/models/conv_residual.onnx"), &ReadOptions::default()).expect("the model reads").model
}

#[test]
fn a_pass_that_breaks_a_conv_is_caught_and_named() {
    let mut model = model();
    let passes = Pipeline { passes: vec![Box::new(DropConvInputChannel)] };
    let err = run_pipeline(&mut model, &passes, &mut Context::default()).expect_err("the broken rewrite is caught");
    let PassError::Invalid { pass, source } = &err else { panic!("not a validation error: {err}") };
    assert_eq!(*pass, "drop-conv-input-channel");
    let ValidateError::Op { rule, op_type, what, .. } = source else { panic!("not an op rule: {source}") };
    assert_eq!((*rule, op_type.as_str()), (OpRule::Conv, "Conv"));
    assert!(what.contains("input channels per group, but its input has"), "{what}");
    assert_eq!(err.to_string(), "pass `drop-conv-input-channel` left a graph the reader would refuse");
    // The rule's message is the reader's: the same text the hostile corpus expects of a model
    // written that way.
    assert!(source.to_string().starts_with("node `"), "{source}");
}

#[test]
fn the_default_pipeline_leaves_every_testdata_model_valid() {
    // `run_pipeline` validates after every pass; a pruning run of each model passes that check.
    let passes = parse_pipeline(prunec::passes::DEFAULT_PIPELINE).expect("registered");
    let dir = root().join("testdata/models");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("testdata/models")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    names.sort();
    assert!(names.len() > 5, "{names:?}");
    for path in names {
        let mut model = read_model(&path, &ReadOptions::default()).expect("the model reads").model;
        match run_pipeline(&mut model, &passes, &mut Context::default()) {
            Ok(_) | Err(PassError::Rewrite(_)) => {}
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}
