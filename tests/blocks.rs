//! Layer removal: every residual layer of the shared models is found, each one removed alone
//! gives a valid model equal to the original with that layer's residual branches zeroed, and a
//! layer made into an exact identity is the one ablation and block influence rank last.

mod common;

use common::{Case, feed, feed_json, prunec, shared, shared_cases, validate_with_python};
use prunec::backends::onnx::{WriteOptions, write_model};
use prunec::frontend::{Loaded, ReadOptions, read_model};
use prunec::ir::{Model, Tensor, constant_tensor};
use prunec::passes::layers::{self, BlockKind, BlockReport, DeclineReason, Merge, Selection, find_blocks, score};
use prunec::runtime::tract::{Feed, Plan, TractTensor, compare};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// A shared model and what `prunec blocks` must find in it.
struct Expected {
    case: &'static str,
    /// `--input-shape`, for models whose recorded shapes leave the residual sums unproved.
    input_shape: Option<(&'static str, &'static [u64])>,
    /// Layers per stack, in order.
    stacks: &'static [usize],
    /// Each layer's sub-blocks (`attention×2 mlp mlp`), as `prunec blocks` prints them.
    sub_blocks: &'static [&'static str],
}

const EXPECTED: &[Expected] = &[
    Expected { case: "tiny_bert", input_shape: None, stacks: &[4], sub_blocks: &["attention mlp"; 4] },
    Expected { case: "tiny_vit", input_shape: None, stacks: &[4], sub_blocks: &["attention mlp"; 4] },
    // Three dual-stream blocks (one joint attention over both streams, an MLP per stream),
    // then two single-stream blocks (attention and MLP in parallel: one branch).
    Expected {
        case: "tiny_flux",
        input_shape: None,
        stacks: &[3, 2],
        sub_blocks: &["attention×2 mlp mlp", "attention×2 mlp mlp", "attention×2 mlp mlp", "attention", "attention"],
    },
    // The last joint block has no text output (context_pre_only): only the image residuals.
    Expected {
        case: "tiny_sd3",
        input_shape: None,
        stacks: &[3, 1],
        sub_blocks: &["attention×2 mlp mlp", "attention×2 mlp mlp", "attention×2 mlp mlp", "attention mlp"],
    },
    // The last block's text branch ends at the attention: its text residuals are dead code.
    Expected {
        case: "tiny_qwenimage",
        input_shape: None,
        stacks: &[3, 1],
        sub_blocks: &["attention×2 mlp mlp", "attention×2 mlp mlp", "attention×2 mlp mlp", "attention mlp"],
    },
    Expected { case: "tiny_llama", input_shape: None, stacks: &[4], sub_blocks: &["attention mlp"; 4] },
    // The basic blocks with identity shortcuts; each stage's first block but layer1's has a
    // downsample shortcut. Stages differ in width, so each is its own stack.
    Expected { case: "resnet18", input_shape: None, stacks: &[2, 1, 1, 1], sub_blocks: &["conv"; 5] },
    // Beyond the list, two more convolution families. MobileNetV2's ten inverted
    // residuals with identity shortcuts (a stage's first block changes width: no shortcut).
    Expected { case: "mobilenet_v2", input_shape: None, stacks: &[1, 2, 3, 2, 2], sub_blocks: &["conv"; 10] },
    // PP-OCRv4 det's residual squeeze-excitation layers in the FPN (its top-down sums are two
    // deep paths meeting, not shortcuts, and are not reported).
    Expected { case: "ppocr_det", input_shape: Some(("x", &[1, 3, 64, 64])), stacks: &[4, 4], sub_blocks: &["conv"; 8] },
    // SVTR's two transformer blocks in the neck.
    Expected { case: "ppocr_rec", input_shape: Some(("x", &[1, 3, 48, 96])), stacks: &[2], sub_blocks: &["attention mlp"; 2] },
];

fn case(name: &str) -> Case {
    let mut cases = shared_cases();
    cases.push(Case {
        name: "tiny_llama".into(),
        path: shared().join("models/zoo/tiny_llama.onnx"),
        feed: common::FeedSpec::Npz(shared().join("models/zoo/tiny_llama.inputs.npz")),
    });
    cases.into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no shared case {name}"))
}

/// Reads a model as `prunec blocks` does: shapes inferred (at `--input-shape`), shape
/// arithmetic folded.
fn load(path: &Path, input_shape: Option<(&str, &[u64])>) -> Loaded {
    let mut loaded = read_model(path, &ReadOptions { infer_shapes: input_shape.is_none() }).expect("the model reads");
    if let Some((name, dims)) = input_shape {
        loaded.infer_shapes(&BTreeMap::from([(name.to_string(), dims.to_vec())])).expect("shapes infer");
    }
    let fold = prunec::passes::parse_pipeline("fold").expect("registered");
    prunec::passes::run_pipeline(&mut loaded.model, &fold, &mut Default::default()).expect("folding succeeds");
    loaded
}

#[test]
fn every_layer_of_the_shared_models_is_found() {
    for expected in EXPECTED {
        let loaded = load(&case(expected.case).path, expected.input_shape);
        let report = find_blocks(&loaded.model.graph);
        let stacks: Vec<usize> = report.stacks.iter().map(|s| s.layers.len()).collect();
        assert_eq!(stacks, expected.stacks, "{}: layers per stack", expected.case);
        let found: Vec<String> = report.layers.iter().map(layers::Layer::sub_block_summary).collect();
        assert_eq!(found, expected.sub_blocks, "{}: sub-blocks per layer", expected.case);
        for layer in &report.layers {
            assert!(layer.parameters > 0 && layer.nodes > 0, "{} layer {}: {layer:?}", expected.case, layer.index);
        }
        // Only ResNet has shortcuts that compute something.
        if expected.case != "resnet18" {
            assert!(report.declined.is_empty(), "{}: {:?}", expected.case, report.declined);
        }
    }
}

#[test]
fn resnet_downsample_blocks_are_declined_because_their_shortcut_is_not_an_identity() {
    let report = find_blocks(&load(&case("resnet18").path, None).model.graph);
    let declined: Vec<(&str, &DeclineReason)> = report.declined.iter().map(|d| (d.add.as_str(), &d.reason)).collect();
    let downsample = |stage: usize| DeclineReason::NonIdentityShortcut {
        shortcut: vec![format!("/layer{stage}/layer{stage}.0/downsample/downsample.0/Conv")],
    };
    assert_eq!(
        declined,
        [("/layer2/layer2.0/Add", &downsample(2)), ("/layer3/layer3.0/Add", &downsample(3)), ("/layer4/layer4.0/Add", &downsample(4))]
    );
    assert!(report.declined[0].text.contains("the shortcut is not an identity"), "{}", report.declined[0].text);
}

#[test]
fn the_blocks_table_is_snapshotted() {
    for (name, input_shape) in [("tiny_bert", None), ("tiny_flux", None), ("resnet18", None), ("ppocr_rec", Some("x=1,3,48,96"))] {
        let mut cmd = prunec();
        cmd.arg("blocks").arg(case(name).path);
        if let Some(shape) = input_shape {
            cmd.args(["--input-shape", shape]);
        }
        let out = cmd.output().expect("running prunec");
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        insta::assert_snapshot!(format!("blocks_{name}"), String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn the_json_report_names_every_field_of_the_table() {
    let out = prunec().arg("blocks").arg("--json").arg(case("tiny_sd3").path).output().expect("running prunec");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let layer = &report["layers"][1];
    for field in ["index", "stack", "position", "sub_blocks", "nodes", "parameters", "macs", "macs_incomplete", "signature", "score"] {
        assert!(!layer[field].is_null(), "layer has no `{field}`: {layer}");
    }
    let region = &layer["sub_blocks"][0]["regions"][0];
    assert_eq!(layer["sub_blocks"][0]["kind"], "attention");
    assert!(region["gate"].is_string(), "an adaLN-gated residual names its gate: {region}");
    assert!(report["stacks"].is_array() && report["declined"].is_array());
}

/// torchvision initialises ViT's classifier to zeros, so its output is the same whatever the
/// encoder computes: seeded weights make the comparison see the layers.
fn give_the_head_weights(model: &mut Model) {
    let graph = &mut model.graph;
    let head = graph.value_by_name("heads.head.weight").expect("tiny_vit's head");
    let dims = graph.value(head).initializer().expect("a weight").dims();
    let mut rng = prunec::ir::SplitMix64(7);
    let values: Vec<f32> = (0..dims.iter().product::<u64>()).map(|_| rng.unit() as f32 - 0.5).collect();
    graph.set_initializer(head, Tensor::from_f32("heads.head.weight", &dims, &values));
}

/// Runs a model in tract on `inputs` and gives its first output; the plan is dropped before
/// returning, so only one lives at a time.
fn run(model: &Model, dir: &Path, inputs: &Feed) -> TractTensor {
    let plan = Plan::from_model(model, dir, inputs).expect("tract builds the plan");
    let mut outputs = plan.run(inputs).expect("tract runs the plan");
    outputs.values.swap_remove(0).1
}

fn floats(t: &TractTensor) -> Vec<f32> {
    let t = t.cast_to::<f32>().expect("a float output");
    t.try_as_plain_ram().expect("in memory").as_slice::<f32>().expect("f32").to_vec()
}

fn write(model: &Model, path: &Path) {
    write_model(model, path, &WriteOptions::default()).expect("the model writes");
}

#[test]
fn removing_any_single_layer_equals_the_original_with_its_residual_branches_zeroed() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut manifest = Vec::new();
    let mut table = String::new();
    for expected in EXPECTED {
        let case = case(expected.case);
        let mut loaded = load(&case.path, expected.input_shape);
        if case.name == "tiny_vit" {
            give_the_head_weights(&mut loaded.model);
        }
        let original = &loaded.model;
        let report = find_blocks(&original.graph);
        let inputs = feed(&case, original);
        let mut selections: Vec<Vec<Selection>> = (0..report.layers.len()).map(|l| vec![Selection::Layer(l)]).collect();
        // One sub-block alone: the second layer's first (its attention, both streams of it for MMDiT).
        if report.layers.get(1).is_some_and(|l| l.sub_blocks.len() > 1) {
            selections.push(vec![Selection::SubBlock { layer: 1, sub_block: 0 }]);
        }
        // Two neighbours at once: the second sum's skip is the first's output, spliced away first.
        if report.layers.len() >= 3 {
            selections.push(vec![Selection::Layer(1), Selection::Layer(2)]);
        }
        for selection in selections {
            let label = selection.iter().fold(case.name.clone(), |label, s| match s {
                Selection::Layer(l) => format!("{label}_layer{l}"),
                Selection::SubBlock { layer, sub_block } => format!("{label}_layer{layer}_sub{sub_block}"),
            });
            let mut removed = original.clone();
            let removal = layers::remove(&mut removed, &report, &selection).expect("removal succeeds");
            removed.graph.reconcile_records();
            removed.graph.topo_order().expect("the graph stays acyclic");
            let mut reference = original.clone();
            layers::zero_residuals(&mut reference, &report, &selection).expect("zeroing succeeds");
            let want = run(&reference, &loaded.dir, &inputs);
            let got = run(&removed, &loaded.dir, &inputs);
            let d = compare(&want, &got).expect("comparable outputs");
            assert!(d.ref_max_abs > 0.0, "{label}: the output is zero, the comparison would see nothing");
            let tolerance = 1e-5 * d.ref_max_abs.max(1.0);
            assert!(d.max_abs <= tolerance, "{label}: max abs {} over {tolerance} ({d:?})", d.max_abs);
            table += &format!("{label:<28} tract: max abs {:.1e} (scale {:.1e})\n", d.max_abs, d.ref_max_abs);
            let (params_before, params_after) =
                (prunec::ir::model_stats(original).parameters, prunec::ir::model_stats(&removed).parameters);
            assert!(params_after < params_before, "{label}: parameters {params_before} -> {params_after}");
            if let [Selection::Layer(l)] = selection[..] {
                assert_eq!(params_before - params_after, report.layers[l].parameters, "{label}: the parameters the report promised");
                assert_eq!(removal.ops_removed, report.layers[l].nodes, "{label}: the ops the report promised");
            }
            table += &format!("{label:<28} {:>4} ops removed\n", removal.ops_removed);
            let (out, reference_path) =
                (scratch.path().join(format!("{label}.onnx")), scratch.path().join(format!("{label}.reference.onnx")));
            write(&removed, &out);
            write(&reference, &reference_path);
            manifest.push(json!({
                "original": reference_path, "output": out, "feed": feed_json(&case), "max_abs": tolerance,
                "params": prunec::ir::model_stats(&removed).parameters,
            }));
        }
    }
    eprintln!("{table}");
    // The checker (full_check where the reference passes it) and ONNX Runtime, reference against removal.
    validate_with_python(&manifest, scratch.path());
}

#[test]
fn a_layer_made_an_identity_ranks_least_important_by_ablation_and_by_block_influence() {
    // (Not tiny_vit: torchvision initialises its head to zeros, so no layer changes its output.)
    let case = case("tiny_bert");
    let loaded = load(&case.path, None);
    let mut model = loaded.model.clone();
    let report = find_blocks(&model.graph);
    let identity = 2;
    common::zero_output_projections(&mut model, &report.layers[identity]);
    let inputs = feed(&case, &model);
    let values = |t: &TractTensor| floats(t);
    let original = values(&run(&model, &loaded.dir, &inputs));
    let scores: Vec<f64> = (0..report.layers.len())
        .map(|l| {
            let mut ablated = model.clone();
            layers::remove(&mut ablated, &report, &[Selection::Layer(l)]).expect("removal succeeds");
            score::ablation_change(&original, &values(&run(&ablated, &loaded.dir, &inputs))).expect("same lengths")
        })
        .collect();
    eprintln!("ablation change per layer: {scores:?}");
    assert!(scores[identity] < 1e-6, "the identity layer changes the output: {scores:?}");
    let least = (0..scores.len()).min_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    assert_eq!(least, Some(identity), "{scores:?}");
    assert!(scores.iter().enumerate().all(|(l, &s)| l == identity || s > 1e-4), "every other layer matters: {scores:?}");

    // Block influence from the activations around each layer's MLP: its skip and its sum,
    // captured as extra graph outputs.
    let mut probed = model.clone();
    let mut hidden = Vec::new();
    for layer in &report.layers {
        let mlp = layer.sub_blocks.last().and_then(|s| s.regions.first()).expect("an MLP region");
        for name in [&mlp.skip, &mlp.sum] {
            let v = probed.graph.value_by_name(name).expect("a value");
            probed.graph.outputs.push(v);
        }
        let skip = probed.graph.value_by_name(&mlp.skip).expect("a value");
        hidden.push(probed.graph.value(skip).shape.as_ref().and_then(|s| s.0.last()?.known()).expect("a known width") as usize);
    }
    let plan = Plan::from_model(&probed, &loaded.dir, &inputs).expect("tract builds the plan");
    let outputs = plan.run(&inputs).expect("tract runs the plan").values;
    let influence: Vec<f64> = (0..report.layers.len())
        .map(|l| {
            let (x_in, x_out) = (floats(&outputs[1 + 2 * l].1), floats(&outputs[2 + 2 * l].1));
            score::block_influence(&x_in, &x_out, hidden[l]).expect("whole tokens")
        })
        .collect();
    eprintln!("MLP block influence per layer: {influence:?}");
    assert!(influence[identity].abs() < 1e-7, "{influence:?}");
    assert!(influence.iter().enumerate().all(|(l, &b)| l == identity || b > 1e-4), "{influence:?}");
}

#[test]
fn averaging_makes_the_survivor_the_mean_of_the_layers_it_stands_for() {
    let loaded = load(&case("tiny_flux").path, None);
    let report = find_blocks(&loaded.model.graph);
    let weight = |model: &Model, layer: usize, k: usize| -> Vec<f32> {
        let v = report.layers[layer].weights()[k];
        constant_tensor(&model.graph, v).and_then(Tensor::to_f32_vec).expect("f32 weight")
    };
    let mut merged = loaded.model.clone();
    let removal = layers::remove_with(&mut merged, &report, &[Selection::Layer(2)], Merge::Average).expect("layers 1 and 2 are alike");
    assert_eq!(removal.merged, [(1, vec![2])]);
    for k in 0..report.layers[1].weights().len() {
        let (a, b, mean) = (weight(&loaded.model, 1, k), weight(&loaded.model, 2, k), weight(&merged, 1, k));
        assert!(a.iter().zip(&b).zip(&mean).all(|((a, b), m)| (m - (a + b) / 2.0).abs() <= 1e-6), "weight {k} is not the mean");
    }
    let inputs = feed(&case("tiny_flux"), &merged);
    let out = run(&merged, &loaded.dir, &inputs);
    assert!(floats(&out).iter().all(|v| v.is_finite()));
    // The last single-stream block has no same-stack survivor once both are removed.
    let err = layers::remove_with(&mut loaded.model.clone(), &report, &[Selection::Layer(3), Selection::Layer(4)], Merge::Average)
        .expect_err("no survivor");
    assert!(err.to_string().contains("every layer of its stack 1 is removed"), "{err}");
    let err = layers::remove_with(&mut loaded.model.clone(), &report, &[Selection::SubBlock { layer: 1, sub_block: 0 }], Merge::Average)
        .expect_err("sub-blocks are not averaged");
    assert!(err.to_string().contains("not sub-blocks"), "{err}");
}

#[test]
fn detection_never_panics_and_selections_outside_the_report_are_errors() {
    for case in common::all_cases() {
        let loaded = read_model(&case.path, &ReadOptions::default()).expect("reads");
        let report: BlockReport = find_blocks(&loaded.model.graph);
        for layer in &report.layers {
            assert!(layer.sub_blocks.iter().all(|s| !s.regions.is_empty()), "{}", case.name);
        }
    }
    let loaded = load(&case("tiny_bert").path, None);
    let report = find_blocks(&loaded.model.graph);
    let err = layers::remove(&mut loaded.model.clone(), &report, &[Selection::Layer(9)]).expect_err("no layer 9");
    assert_eq!(err.to_string(), "no such block: layer 9 (there are 4)");
    assert_eq!(report.layers[0].sub_blocks[0].kind, BlockKind::Attention);
    // A report is only good for the graph it was made for.
    let other = load(&case("tiny_vit").path, None);
    assert!(layers::remove(&mut other.model.clone(), &report, &[Selection::Layer(0)]).is_err());
}
