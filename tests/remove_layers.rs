//! The `remove-layers` pass: the command removes layers chosen by score or by index, verifies
//! the result against the original with the removed residual branches zeroed, and writes a
//! model the checker and ONNX Runtime accept; a layer made an exact identity is the one the
//! pass's data-driven scores rank last.

mod common;

use common::{Case, feed, feed_json, prunec, run_captured, shared_cases, validate_with_python};
use prunec::backends::onnx::{WriteOptions, write_model};
use prunec::frontend::{ReadOptions, read_model};
use prunec::ir::Model;
use prunec::passes::layers::{self, RemoveLayersReport, ZeroedBranch, find_blocks};
use prunec::passes::{Context, parse_pipeline, run_pipeline};
use prunec::runtime::measure::{GivenInputs, TractRuntime};
use serde_json::{Value as Json, json};
use std::path::Path;
use std::time::Duration;

fn case(name: &str) -> Case {
    shared_cases().into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no shared case {name}"))
}

fn inputs_npz(case: &Case) -> &Path {
    match &case.feed {
        common::FeedSpec::Npz(p) => p,
        _ => panic!("{}: the zoo models come with .inputs.npz", case.name),
    }
}

/// Runs the command and gives its JSON report.
fn compile(case: &Case, passes: &str, out: &Path) -> Json {
    let report = out.with_extension("json");
    let mut cmd = prunec();
    cmd.arg(&case.path).arg("-o").arg(out).args(["--passes", passes, "--inputs"]).arg(inputs_npz(case)).arg("--report").arg(&report);
    let run = run_captured(cmd, Duration::from_secs(300)).expect("prunec runs");
    assert_eq!(run.code, Some(0), "{} {passes}: exit {:?}\n{}", case.name, run.code, run.stderr);
    assert!(run.stderr.contains("remove-layers:"), "the pass's summary is on stderr:\n{}", run.stderr);
    serde_json::from_str(&std::fs::read_to_string(&report).expect("report written")).expect("report is JSON")
}

fn details(report: &Json) -> &Json {
    let pass = report["passes"].as_array().expect("passes").iter().find(|p| p["name"] == "remove-layers").expect("the pass ran");
    &pass["details"]
}

/// The original with the branches the report names zeroed, written beside `out`.
fn write_reference(case: &Case, details: &Json, out: &Path) -> std::path::PathBuf {
    let mut original = read_model(&case.path, &ReadOptions::default()).expect("reads").model;
    let branches: Vec<ZeroedBranch> = details["zeroed"]
        .as_array()
        .expect("zeroed")
        .iter()
        .map(|z| ZeroedBranch { sum: z["sum"].as_str().expect("sum").into(), branch: z["branch"].as_str().expect("branch").into() })
        .collect();
    assert!(!branches.is_empty());
    layers::zero_branches(&mut original, &branches).expect("the names are the original's");
    let path = out.with_extension("reference.onnx");
    write_model(&original, &path, &WriteOptions::default()).expect("writes");
    path
}

#[test]
fn the_command_removes_layers_and_verifies_them_against_the_zeroed_reference() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut manifest = Vec::new();
    let mut reports = Vec::new();
    for (name, passes, removed) in [
        ("tiny_bert", "dce,fold,remove-layers{n=1},identity", 1),
        // (Not tiny_vit: torchvision's all-zero head makes its comparison vacuous, which
        // verification refuses; a diffusion transformer instead.)
        ("tiny_flux", "dce,fold,remove-layers{n=1},identity", 1),
        // The gates over a grid of timesteps: the report's `gate` against the schema.
        ("tiny_flux", "dce,fold,remove-layers{n=1,score=gate},identity", 1),
        ("tiny_bert", "dce,fold,remove-layers{layers=1,2},identity", 2),
        ("tiny_bert", "dce,fold,remove-layers{n=1,sub-block=mlp,score=influence},identity", 1),
        ("tiny_bert", "dce,fold,remove-layers{n=1,merge=average},identity", 1),
    ] {
        let case = case(name);
        let out = scratch.path().join(format!("{name}_{}.onnx", manifest.len()));
        let report = compile(&case, passes, &out);
        reports.push(out.with_extension("json"));
        let v = &report["verification"];
        assert_eq!(v["judged"], true, "{name} {passes}: {v}");
        assert_eq!(v["reference"], "reference", "{name} {passes}: {v}");
        let d = details(&report);
        assert_eq!(d["removed"].as_array().expect("removed").len(), removed, "{d}");
        assert_eq!(d["input_sets"], 1, "{d}");
        assert!(d["output_change"].as_array().is_some_and(|c| c.len() == 1), "{d}");
        let (before, after) = (d["parameters"][0].as_u64().expect("count"), d["parameters"][1].as_u64().expect("count"));
        assert!(after < before, "{d}");
        if passes.contains("layers=1,2") {
            let layers: Vec<u64> = d["removed"].as_array().unwrap().iter().map(|r| r["layer"].as_u64().unwrap()).collect();
            assert_eq!(layers, [1, 2]);
        }
        if passes.contains("sub-block=mlp") {
            assert_eq!(d["removed"][0]["sub_blocks"], json!(["mlp"]), "{d}");
        }
        let averaged = passes.contains("merge=average");
        if averaged {
            assert!(d["merged"].as_array().is_some_and(|m| m.len() == 1), "{d}");
            assert!(v["reference_description"].as_str().is_some_and(|s| s.contains("averaged")), "{v}");
        }
        // ONNX Runtime against the zeroed reference (an averaged survivor is not in it: valid only).
        let reference = write_reference(&case, d, &out);
        manifest.push(json!({
            "original": if averaged { case.path.clone() } else { reference }, "output": out, "feed": feed_json(&case),
            "max_abs": 1e-4, "compare": !averaged,
        }));
    }
    validate_with_python(&manifest, scratch.path());
    // The reports, details included, against the report's JSON Schema.
    let schema = common::root().join("src/cli/report.schema.json");
    let script = "import json, sys, jsonschema\nschema = json.load(open(sys.argv[1]))\njsonschema.Draft202012Validator.check_schema(schema)\n\
                  for path in sys.argv[2:]:\n    jsonschema.validate(json.load(open(path)), schema)\nprint(len(sys.argv) - 2)\n";
    let mut cmd = std::process::Command::new(common::python());
    cmd.arg("-c").arg(script).arg(&schema).args(&reports);
    let r = run_captured(cmd, Duration::from_secs(120)).expect("python runs");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), reports.len().to_string());
}

/// Runs `dce,fold,<pass>` on `model` with `case`'s inputs given, and gives the pass's details.
fn run_pass(case: &Case, model: &Model, dir: &Path, pass: &str) -> RemoveLayersReport {
    let mut model = model.clone();
    let given = GivenInputs { feed: feed(case, &model), source: "the test's inputs".into() };
    let mut runtime = TractRuntime { dir: dir.to_path_buf(), given: Some(given), input_shapes: Default::default() };
    let pipeline = parse_pipeline(&format!("dce,fold,{pass}")).expect("parses");
    let runs = run_pipeline(&mut model, &pipeline, &mut Context::with_runtime(&mut runtime)).expect("the pipeline runs");
    runs[2].report.details::<RemoveLayersReport>().expect("remove-layers details").clone()
}

#[test]
fn a_layer_made_an_identity_is_ranked_last_by_every_data_driven_score_of_the_pass() {
    let case = case("tiny_bert");
    let loaded = read_model(&case.path, &ReadOptions::default()).expect("reads");
    // Detection on the folded graph, as the pass sees it (folding again in the pipeline
    // changes nothing).
    let mut model = loaded.model.clone();
    run_pipeline(&mut model, &parse_pipeline("fold").expect("registered"), &mut Context::default()).expect("folds");
    let report = find_blocks(&model.graph);
    let identity = 2;
    common::zero_output_projections(&mut model, &report.layers[identity]);
    for score in ["ablation", "influence"] {
        for greedy in [false, true] {
            let pass = format!("remove-layers{{n=2,score={score},greedy={greedy},keep-first=0,keep-last=0}}");
            let details = run_pass(&case, &model, &loaded.dir, &pass);
            let scores: Vec<(usize, f64)> = details.candidates.iter().map(|c| (c.layer, c.score)).collect();
            eprintln!("{pass}: {scores:?}");
            assert_eq!(scores.len(), 4);
            let least = scores.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map(|s| s.0);
            assert_eq!(least, Some(identity), "{pass}: {scores:?}");
            assert!(scores.iter().all(|&(l, s)| l == identity || s > 1e-4), "{pass}: every other layer matters: {scores:?}");
            assert_eq!(details.removed[0].unit.layer, identity, "{pass}");
            assert_eq!(details.removed.len(), 2);
        }
    }
}

#[test]
fn targets_contiguous_runs_and_data_free_scores_choose_what_they_say() {
    let case = case("tiny_flux");
    let loaded = read_model(&case.path, &ReadOptions::default()).expect("reads");
    // A contiguous pair: two neighbouring layers, scored together.
    let d = run_pass(&case, &loaded.model, &loaded.dir, "remove-layers{n=2,contiguous=true,keep-first=0,keep-last=0}");
    let layers: Vec<usize> = d.removed.iter().map(|r| r.unit.layer).collect();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[1], layers[0] + 1, "{layers:?}");
    // A parameter target: removed until a fifth of the parameters is gone.
    let d = run_pass(&case, &loaded.model, &loaded.dir, "remove-layers{target=params=0.2,score=weights}");
    assert!((d.parameters.0 - d.parameters.1) as f64 >= 0.2 * d.parameters.0 as f64, "{:?}", d.parameters);
    assert_eq!(d.score, "weights");
    // The gate score reads the adaLN gates; the position prior keeps the ends.
    let d = run_pass(&case, &loaded.model, &loaded.dir, "remove-layers{n=1,score=gate}");
    assert!(d.candidates.iter().all(|c| c.layer != 0 && c.layer != 4), "{:?}", d.candidates);
    let d = run_pass(&case, &loaded.model, &loaded.dir, "remove-layers{n=1,score=position}");
    assert_eq!(d.removed[0].unit.layer, 3, "later layers first, short of the last");
}

#[test]
fn prunec_blocks_with_inputs_adds_the_measured_scores() {
    let case = case("tiny_bert");
    let mut cmd = prunec();
    cmd.arg("blocks").arg(&case.path).arg("--inputs").arg(inputs_npz(&case)).arg("--json");
    let run = run_captured(cmd, Duration::from_secs(300)).expect("prunec runs");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let json: Json = serde_json::from_str(&run.stdout).expect("JSON");
    let measured = json["measured"]["layers"].as_array().expect("measured layers");
    assert_eq!(measured.len(), json["layers"].as_array().expect("layers").len());
    for l in measured {
        assert!(l["ablation"].as_f64().is_some_and(|a| a > 0.0) && l["influence"].as_f64().is_some_and(|i| i > 0.0), "{l}");
        assert_eq!(l["ablation_per_set"].as_array().map(Vec::len), Some(1));
    }
    let mut cmd = prunec();
    cmd.arg("blocks").arg(&case.path).arg("--inputs").arg(inputs_npz(&case));
    let run = run_captured(cmd, Duration::from_secs(300)).expect("prunec runs");
    assert!(run.stdout.contains("influence     ablation"), "{}", run.stdout);
}

/// A measurement of several feeds at once, their values stacked along a new first axis: what
/// a feed of several samples looks like to the pass (here for a model whose batch is fixed).
struct Stacked(Vec<prunec::runtime::measure::TractMeasure>);

impl prunec::passes::Measure for Stacked {
    fn source(&self) -> &str {
        "stacked feeds"
    }

    fn capture(
        &mut self,
        model: &Model,
        probes: &[prunec::ir::ValueId],
    ) -> Result<std::collections::BTreeMap<prunec::ir::ValueId, prunec::passes::Activation>, prunec::passes::MeasureError> {
        let mut stacked: std::collections::BTreeMap<_, prunec::passes::Activation> = Default::default();
        for m in &mut self.0 {
            for (v, a) in m.capture(model, probes)? {
                let entry =
                    stacked.entry(v).or_insert_with(|| prunec::passes::Activation { shape: [&[0], &a.shape[..]].concat(), values: vec![] });
                entry.shape[0] += 1;
                entry.values.extend(a.values);
            }
        }
        Ok(stacked)
    }

    fn stepwise<'a>(&'a mut self, _: &Model) -> Box<dyn prunec::passes::Stepwise + 'a> {
        unimplemented!("remove-layers does not walk")
    }
}

struct StackedRuntime(Vec<prunec::runtime::tract::Feed>, std::path::PathBuf);

impl prunec::passes::Runtime for StackedRuntime {
    fn has_inputs(&self) -> bool {
        true
    }

    fn measure<'a>(
        &'a mut self,
        model: &Model,
        _: prunec::passes::Inputs,
    ) -> Result<Box<dyn prunec::passes::Measure + 'a>, prunec::passes::MeasureError> {
        let measures =
            self.0.iter().map(|f| prunec::runtime::measure::TractMeasure::new(&self.1, model, f.clone(), "one feed".into())).collect();
        Ok(Box::new(Stacked(measures)))
    }
}

#[test]
fn each_sample_of_a_feed_is_an_input_set_scored_as_if_alone() {
    let case = case("tiny_bert");
    let loaded = read_model(&case.path, &ReadOptions::default()).expect("reads");
    let one = feed(&case, &loaded.model);
    // A second sample: the same tokens, reversed.
    let mut other = one.clone();
    let ids = other.0.get_mut("input_ids").expect("tiny_bert reads input_ids");
    let mut tokens = ids.try_as_plain_ram().expect("in memory").as_slice::<i64>().expect("i64 ids").to_vec();
    tokens.reverse();
    *ids = prunec::runtime::tract::TractTensor::from_shape(ids.shape(), &tokens).expect("same shape");
    let pass = "remove-layers{n=1,score=ablation,aggregate=max,keep-first=0,keep-last=0}";
    let pipeline = parse_pipeline(&format!("dce,fold,{pass}")).expect("parses");
    let mut alone = Vec::new();
    for f in [&one, &other] {
        let mut runtime = StackedRuntime(vec![f.clone()], loaded.dir.clone());
        let runs = run_pipeline(&mut loaded.model.clone(), &pipeline, &mut Context::with_runtime(&mut runtime)).expect("runs");
        alone.push(runs[2].report.details::<RemoveLayersReport>().expect("details").clone());
    }
    assert_eq!(alone[0].input_sets, 1, "a feed of one sample is one set");
    let mut runtime = StackedRuntime(vec![one, other], loaded.dir.clone());
    let runs = run_pipeline(&mut loaded.model.clone(), &pipeline, &mut Context::with_runtime(&mut runtime)).expect("runs");
    let both = runs[2].report.details::<RemoveLayersReport>().expect("details").clone();
    assert_eq!(both.input_sets, 2, "{}", both.input_sets_note);
    for (l, c) in both.candidates.iter().enumerate() {
        let (a, b) = (alone[0].candidates[l].score, alone[1].candidates[l].score);
        assert!((c.per_set[0] - a).abs() < 1e-9 && (c.per_set[1] - b).abs() < 1e-9, "layer {l}: {:?} against {a}, {b}", c.per_set);
        assert_eq!(c.score, a.max(b), "aggregate=max");
    }
    assert_eq!(both.output_change.as_ref().map(Vec::len), Some(2));
}

/// The original model of `case`, folded as the pass sees it, with its layers.
fn folded(case: &Case) -> (Model, layers::BlockReport, std::path::PathBuf) {
    let loaded = read_model(&case.path, &ReadOptions::default()).expect("reads");
    let mut model = loaded.model;
    run_pipeline(&mut model, &parse_pipeline("fold").expect("registered"), &mut Context::default()).expect("folds");
    let report = find_blocks(&model.graph);
    (model, report, loaded.dir)
}

#[test]
fn the_gate_score_follows_the_gates_over_timesteps_and_a_zeroed_gate_scores_zero() {
    for name in ["tiny_flux", "tiny_sd3", "tiny_qwenimage"] {
        let case = case(name);
        let (model, report, dir) = folded(&case);
        let pass = "remove-layers{n=1,score=gate,keep-first=0,keep-last=0}";
        let d = run_pass(&case, &model, &dir, pass);
        let gate = d.gate.as_ref().expect("the gate score says what it used");
        assert_eq!(gate.basis, "timesteps", "{name}: {}", gate.note);
        let grid = gate.grid.as_ref().expect("a grid");
        assert_eq!((grid.input.as_str(), grid.timesteps.len()), ("timestep", layers::gate::GRID), "{name}");
        let varies = grid.layers.iter().any(|l| {
            let (lo, hi) = (l.per_timestep.iter().copied().fold(f64::INFINITY, f64::min), l.max.unwrap_or(0.0));
            hi > 0.0 && (hi - lo) / hi > 1e-4
        });
        assert!(varies, "{name}: the gates change with the timestep: {:?}", grid.layers);
        for c in &d.candidates {
            let l = &grid.layers[c.layer];
            assert_eq!(c.per_set, l.per_timestep, "{name} layer {}: one score per timestep", c.layer);
            assert!((c.score - l.mean.expect("gated")).abs() < 1e-12, "{name}: aggregate=mean is the grid's mean");
        }
        let max = run_pass(&case, &model, &dir, "remove-layers{n=1,score=gate,aggregate=max,keep-first=0,keep-last=0}");
        for c in &max.candidates {
            assert_eq!(Some(c.score), grid.layers[c.layer].max, "{name}: aggregate=max is the grid's max");
        }

        // A layer whose modulation is zeroed has zero gates at every timestep: removed first.
        let zeroed = 1;
        let mut edited = model.clone();
        common::zero_gate_projections(&mut edited, &report.layers[zeroed]);
        let d = run_pass(&case, &edited, &dir, pass);
        let scores: Vec<(usize, f64)> = d.candidates.iter().map(|c| (c.layer, c.score)).collect();
        assert!(scores.iter().all(|&(l, s)| if l == zeroed { s == 0.0 } else { s > 1e-3 }), "{name}: {scores:?}");
        assert_eq!(d.removed[0].unit.layer, zeroed, "{name}: {scores:?}");
    }
}

#[test]
fn without_a_runtime_the_gate_score_falls_back_to_the_modulation_weights_and_says_so() {
    let case = case("tiny_flux");
    let (mut model, ..) = folded(&case);
    let pipeline = parse_pipeline("dce,fold,remove-layers{n=1,score=gate}").expect("parses");
    let runs = run_pipeline(&mut model, &pipeline, &mut Context::default()).expect("runs without a runtime");
    let d = runs[2].report.details::<RemoveLayersReport>().expect("details");
    let gate = d.gate.as_ref().expect("the basis is reported");
    assert_eq!(gate.basis, "weights", "{}", gate.note);
    assert!(gate.note.contains("failed"), "{}", gate.note);
    assert!(gate.grid.is_none());
    assert_eq!(d.candidates.iter().map(|c| c.per_set.len()).collect::<Vec<_>>(), [1, 1, 1], "one weight score per layer");
    // A model without gates has no basis at all for the score.
    let (mut model, ..) = folded(&self::case("tiny_bert"));
    let err = run_pipeline(&mut model, &pipeline, &mut Context::default()).expect_err("tiny_bert has no gates");
    assert!(err.to_string().contains("no layer of this model has a gated residual"), "{err}");
}

/// `count` PP-OCRv4 rec dev lines from `first` on, written by numpy to `dir` (x only).
fn ocr_lines(dir: &Path, first: usize, count: usize) -> std::path::PathBuf {
    let out = dir.join(format!("lines_{first}_{count}.npz"));
    let dev = common::shared().join("data/rapidocr_rec.dev.npz");
    let script = format!(
        "import numpy as np; d = np.load({dev:?}); np.savez({out:?}, x=d['x'][{first}:{}])",
        first + count,
        dev = dev.display().to_string(),
        out = out.display().to_string()
    );
    let r = run_captured(
        {
            let mut c = std::process::Command::new(common::python());
            c.args(["-c", &script]);
            c
        },
        Duration::from_secs(60),
    )
    .expect("python runs");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    out
}

#[test]
fn a_real_feed_of_several_text_lines_is_scored_per_line_and_aggregated() {
    // PP-OCRv4 rec takes a batch of lines (the zoo's transformers are exported at batch 1).
    let case = case("ppocr_rec");
    let scratch = tempfile::tempdir().expect("temp dir");
    let lines = 3;
    let scored = |npz: &Path, batch: u64, aggregate: &str| -> RemoveLayersReport {
        let mut loaded = read_model(&case.path, &ReadOptions { infer_shapes: false }).expect("reads");
        // At open width shape inference cannot prove the neck's sums keep their shape.
        loaded.infer_shapes(&std::collections::BTreeMap::from([("x".to_string(), vec![batch, 3, 48, 320])])).expect("shapes infer");
        let feed = prunec::runtime::tract::load_npz(npz, &loaded.model).expect("the lines load");
        let given = GivenInputs { feed, source: npz.display().to_string() };
        let mut runtime = TractRuntime { dir: loaded.dir.clone(), given: Some(given), input_shapes: Default::default() };
        let pass = format!("dce,fold,remove-layers{{n=1,score=ablation,aggregate={aggregate},keep-first=0,keep-last=0}}");
        let runs = run_pipeline(&mut loaded.model, &parse_pipeline(&pass).expect("parses"), &mut Context::with_runtime(&mut runtime))
            .expect("the pipeline runs");
        runs[2].report.details::<RemoveLayersReport>().expect("details").clone()
    };
    let alone: Vec<RemoveLayersReport> = (0..lines).map(|i| scored(&ocr_lines(scratch.path(), i, 1), 1, "mean")).collect();
    let batch = ocr_lines(scratch.path(), 0, lines);
    let mean = scored(&batch, lines as u64, "mean");
    let max = scored(&batch, lines as u64, "max");
    assert_eq!(alone[0].input_sets, 1);
    assert_eq!((mean.input_sets, max.input_sets), (lines, lines), "{}", mean.input_sets_note);
    assert_eq!(mean.candidates.len(), 2, "the neck's two blocks");
    for (l, (m, x)) in mean.candidates.iter().zip(&max.candidates).enumerate() {
        let each: Vec<f64> = alone.iter().map(|a| a.candidates[l].score).collect();
        for (got, want) in m.per_set.iter().zip(&each) {
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1e-6), "layer {l}: line scored in the batch {got}, alone {want}");
        }
        assert_eq!(m.per_set, x.per_set);
        let spread = each.iter().copied().fold(f64::NEG_INFINITY, f64::max) - each.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(spread > 1e-3, "layer {l}: the lines differ, so max and mean do: {each:?}");
        assert!((m.score - m.per_set.iter().sum::<f64>() / lines as f64).abs() < 1e-12, "mean");
        assert_eq!(x.score, x.per_set.iter().copied().fold(f64::NEG_INFINITY, f64::max), "max");
        assert!(x.score > m.score);
    }
    assert_eq!(mean.output_change.as_ref().map(Vec::len), Some(lines));
}
