//! Dual-stream blocks: the twin ops and weights of the text and image streams of the shared
//! MMDiT models (FLUX, SD3, Qwen-Image) are matched without names, and the tied copy (text
//! weights overwritten by their image twins) has no divergence left and runs.

mod common;

use common::{Case, feed, feed_json, prunec, shared_cases, validate_with_python};
use prunec::backends::onnx::{WriteOptions, write_model};
use prunec::frontend::{Loaded, ReadOptions, read_model};
use prunec::ir::constant_tensor;
use prunec::passes::streams::{
    DualBlock, Order, RowRanges, StreamReport, average_image_weights, convert, find_streams, fit_text_map, tie_text_weights,
};
use prunec::runtime::tract::{Plan, compare};
use serde_json::json;
use std::collections::BTreeSet;

fn case(name: &str) -> Case {
    shared_cases().into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no shared case {name}"))
}

/// Reads a model as `prunec streams` does: shapes inferred, shape arithmetic folded.
fn load(name: &str) -> Loaded {
    let mut loaded = read_model(&case(name).path, &ReadOptions { infer_shapes: true }).expect("the model reads");
    let fold = prunec::passes::parse_pipeline("fold").expect("registered");
    prunec::passes::run_pipeline(&mut loaded.model, &fold, &mut Default::default()).expect("folding succeeds");
    loaded
}

/// What a model must give: its name, blocks, order, axis, whether the last block's text branch
/// ends at the attention, twin weights per block.
type Expected = (&'static str, usize, Order, usize, bool, &'static [usize]);

/// What each model must give.
const EXPECTED: &[Expected] = &[
    // Three dual-stream blocks before the single-stream stack; rotary on the joint sequence.
    ("tiny_flux", 3, Order::TextFirst, 1, false, &[14, 14, 14]),
    // `[B,H,L,d]`, image first; the last block's text side is a (scale, shift) modulation and
    // Q/K/V only.
    ("tiny_sd3", 4, Order::ImageFirst, 2, true, &[14, 14, 14, 10]),
    // Rotary per stream (positional twins), QK RMSNorm weights; the last block's text branch
    // ends at the attention.
    ("tiny_qwenimage", 4, Order::TextFirst, 1, true, &[16, 16, 16, 10]),
];

#[test]
fn the_dual_stream_blocks_of_the_shared_mmdits_are_matched() {
    for &(name, blocks, order, axis, last_ends, weights) in EXPECTED {
        let loaded = load(name);
        let graph = &loaded.model.graph;
        let report = find_streams(graph);
        assert!(report.declined.is_empty(), "{name}: {:?}", report.declined);
        assert_eq!(report.blocks.len(), blocks, "{name}");
        let found: Vec<usize> = report.blocks.iter().map(|b| b.weights.len()).collect();
        assert_eq!(found, weights, "{name}: twin weights per block");
        for (i, b) in report.blocks.iter().enumerate() {
            assert_eq!((b.index, b.order, b.axis, b.anchors.len()), (i, order, axis, 3), "{name} block {i}");
            let last = i + 1 == blocks;
            assert_eq!(b.text_output.is_none(), last && last_ends, "{name} block {i}: text output {:?}", b.text_output);
            // A block's streams enter from the block before.
            if i > 0 {
                let before = &report.blocks[i - 1];
                assert_eq!(Some(&b.text_input), before.text_output.as_ref(), "{name} block {i}");
                assert_eq!(b.image_input, before.image_output, "{name} block {i}");
            }
            // The text parameters are the text weights, each once.
            let distinct: BTreeSet<&str> = b.weights.iter().map(|w| w.text.as_str()).collect();
            let sum: u64 = distinct.iter().map(|w| constant_tensor(graph, graph.value_by_name(w).unwrap()).unwrap().numel()).sum();
            assert_eq!(b.text_parameters, sum, "{name} block {i}");
            // Seeded weights: every twin differs, and the block's divergence is near √2 (two
            // independent draws of one scale).
            for w in &b.weights {
                assert!(w.divergence.is_some_and(|d| d > 0.0), "{name} block {i}: {w:?}");
                assert_ne!(w.text, w.image);
            }
            assert!(b.divergence.is_some_and(|d| (1.0..2.0).contains(&d)), "{name} block {i}: {:?}", b.divergence);
        }
    }
}

#[test]
fn qwen_image_rotary_tables_are_positional_twins_and_flux_has_none() {
    let qwen = find_streams(&load("tiny_qwenimage").model.graph);
    for b in &qwen.blocks {
        let tables: Vec<[&str; 2]> = b.positional.iter().map(|[t, i]| [t.as_str(), i.as_str()]).collect();
        assert_eq!(
            tables,
            [["m.pos_embed.txt_rope_cos", "m.pos_embed.img_rope_cos"], ["m.pos_embed.txt_rope_sin", "m.pos_embed.img_rope_sin"]],
            "block {}",
            b.index
        );
    }
    let flux = find_streams(&load("tiny_flux").model.graph);
    assert!(flux.blocks.iter().all(|b| b.positional.is_empty() && !b.shared.is_empty()), "{:?}", flux.blocks[0].positional);
}

#[test]
fn sd3_last_text_modulation_pairs_rows_in_swapped_order() {
    let report = find_streams(&load("tiny_sd3").model.graph);
    let last = report.blocks.last().expect("blocks");
    let rows: Vec<(&str, &RowRanges)> = last.weights.iter().filter_map(|w| w.rows.as_ref().map(|r| (w.text.as_str(), r))).collect();
    // (scale, shift) rows of the text Gemm against the image Gemm's (shift, scale), weight and bias.
    let mut ranges: Vec<([u64; 2], [u64; 2], &str)> = rows.iter().map(|(t, r)| (r.text, r.image, *t)).collect();
    ranges.sort();
    assert_eq!(
        ranges,
        [
            ([0, 128], [128, 256], "m.transformer_blocks.3.norm1_context.linear.bias"),
            ([0, 128], [128, 256], "m.transformer_blocks.3.norm1_context.linear.weight"),
            ([128, 256], [0, 128], "m.transformer_blocks.3.norm1_context.linear.bias"),
            ([128, 256], [0, 128], "m.transformer_blocks.3.norm1_context.linear.weight"),
        ]
    );
    // Earlier blocks' modulations are twins row for row: whole weights.
    assert!(report.blocks[0].weights.iter().all(|w| w.rows.is_none()));
}

#[test]
fn the_tied_copy_has_no_divergence_and_runs_in_tract() {
    for &(name, ..) in EXPECTED {
        let loaded = load(name);
        let original = &loaded.model;
        let report = find_streams(&original.graph);
        let mut tied = original.clone();
        let mut overwritten = 0;
        for b in &report.blocks {
            overwritten += tie_text_weights(&mut tied.graph, b).expect("ties");
        }
        let total: u64 = report.blocks.iter().flat_map(|b| &b.weights).map(|w| w.parameters).sum();
        assert_eq!(overwritten, total, "{name}");
        // Matched again, the tied copy has the same twins, all equal.
        let again: StreamReport = find_streams(&tied.graph);
        assert_eq!(again.blocks.len(), report.blocks.len(), "{name}");
        for b in &again.blocks {
            assert_eq!(b.divergence, Some(0.0), "{name} block {}", b.index);
        }
        // It runs, gives finite outputs, and tying changed what the model computes.
        let inputs = feed(&case(name), original);
        let run = |model: &prunec::ir::Model| {
            let plan = Plan::from_model(model, &loaded.dir, &inputs).expect("tract builds the plan");
            plan.run(&inputs).expect("tract runs").values.swap_remove(0).1
        };
        let (before, after) = (run(original), run(&tied));
        let diff = compare(&before, &after).expect("same shapes");
        assert!(diff.max_abs.is_finite() && diff.max_abs > 1e-6, "{name}: {diff:?}");
        // Deterministic: a second run of the tied copy gives the same outputs.
        assert_eq!(compare(&after, &run(&tied)).expect("same shapes").max_abs, 0.0, "{name}");
    }
}

#[test]
fn the_streams_table_is_snapshotted() {
    for &(name, ..) in EXPECTED {
        let out = prunec().arg("streams").arg(case(name).path).output().expect("running prunec");
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        insta::assert_snapshot!(format!("streams_{name}"), String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn the_json_report_names_its_fields() {
    let out = prunec().arg("streams").arg("--json").arg(case("tiny_sd3").path).output().expect("running prunec");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let block = &report["blocks"][3];
    for field in
        ["index", "layer", "order", "axis", "anchors", "text_input", "image_input", "image_output", "ops", "weights", "text_parameters"]
    {
        assert!(!block[field].is_null(), "block has no `{field}`: {block}");
    }
    assert!(block["text_output"].is_null(), "SD3's last block has no text output");
    assert_eq!(block["order"], "image_first");
    assert!(report["declined"].is_array());
}

/// Float weight elements of a model.
fn parameters(model: &prunec::ir::Model) -> u64 {
    let g = &model.graph;
    g.value_ids().filter_map(|v| g.value(v).initializer()).filter(|t| t.dtype().is_float()).map(|t| t.numel()).sum()
}

/// A model to convert: read and folded as `prunec streams` reads it, with the feed tract runs it
/// on and the same feed for `validate.py`.
struct Subject {
    name: String,
    loaded: Loaded,
    inputs: prunec::runtime::tract::Feed,
    feed: serde_json::Value,
}

/// The shared MMDiTs.
fn shared_subjects() -> Vec<Subject> {
    EXPECTED
        .iter()
        .map(|&(name, ..)| {
            let loaded = load(name);
            let inputs = feed(&case(name), &loaded.model);
            Subject { name: name.to_string(), loaded, inputs, feed: feed_json(&case(name)) }
        })
        .collect()
}

/// A variant of tiny_flux made by `tests/validate/streams_variants.py KIND` in `dir`, on seeded
/// random inputs.
fn flux_variant(kind: &str, dir: &std::path::Path) -> Subject {
    let path = dir.join(format!("tiny_flux_{kind}.onnx"));
    let out = std::process::Command::new(common::python())
        .arg(common::root().join("tests/validate/streams_variants.py"))
        .arg(kind)
        .arg(case("tiny_flux").path)
        .arg(&path)
        .output()
        .expect("running python");
    assert!(out.status.success(), "streams_variants.py {kind}: {}", String::from_utf8_lossy(&out.stderr));
    let mut loaded = read_model(&path, &ReadOptions { infer_shapes: true }).expect("the variant reads");
    let fold = prunec::passes::parse_pipeline("fold").expect("registered");
    prunec::passes::run_pipeline(&mut loaded.model, &fold, &mut Default::default()).expect("folding succeeds");
    let inputs = prunec::runtime::tract::random_feed(&loaded.model, Default::default(), &Default::default(), 7).expect("feed");
    Subject { name: format!("tiny_flux_{kind}"), loaded, inputs, feed: json!({ "tensors": [] }) }
}

/// Converts the last K dual-stream blocks of every subject, for every K, after `merge` made
/// each converted block's twins equal: the conversion frees exactly the text weights and
/// equals the merged copy to 1e-5 in tract, the checker and ONNX Runtime.
fn conversion_equals_the_merged_copy(what: &str, subjects: &[Subject], merge: impl Fn(&mut prunec::ir::Graph, &DualBlock)) {
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut manifest = Vec::new();
    for Subject { name, loaded, inputs, feed } in subjects {
        let original = &loaded.model;
        let report = find_streams(&original.graph);
        assert!(report.declined.is_empty(), "{name}: {:?}", report.declined);
        let blocks = report.blocks.len();
        assert!(blocks > 0, "{name}: no dual-stream blocks");
        let run = |model: &prunec::ir::Model| {
            let plan = Plan::from_model(model, &loaded.dir, inputs).expect("tract builds the plan");
            plan.run(inputs).expect("tract runs").values.swap_remove(0).1
        };
        for k in 1..=blocks {
            let range = blocks - k..blocks;
            let mut tied = original.clone();
            for b in &report.blocks[range.clone()] {
                merge(&mut tied.graph, b);
            }
            let mut converted = tied.clone();
            let done = convert(&mut converted, &report, range.clone()).unwrap_or_else(|e| panic!("{name} last {k}: {e}"));
            converted.graph.reconcile_records();
            prunec::ir::validate(&converted.graph).unwrap_or_else(|e| panic!("{name} last {k}: {e}"));
            let freed: u64 = done.iter().map(|b| b.text_parameters).sum();
            assert_eq!(parameters(&tied) - parameters(&converted), freed, "{name} last {k}");
            let diff = compare(&run(&tied), &run(&converted)).expect("same shapes");
            eprintln!("{what}: {name} last {k}: freed {freed}, max |merged - converted| = {:.3e}", diff.max_abs);
            assert!(diff.max_abs <= 1e-5, "{what}: {name} last {k}: {diff:?}");
            // The checker and ONNX Runtime: the converted model against the merged copy.
            let (out, reference) =
                (scratch.path().join(format!("{name}_last{k}.onnx")), scratch.path().join(format!("{name}_last{k}.merged.onnx")));
            write_model(&converted, &out, &WriteOptions::default()).expect("writes");
            write_model(&tied, &reference, &WriteOptions::default()).expect("writes");
            manifest.push(json!({
                "original": reference, "output": out, "feed": feed, "max_abs": 1e-5,
                "params": prunec::ir::model_stats(&converted).parameters,
            }));
        }
    }
    validate_with_python(&manifest, scratch.path());
}

/// Ties the text weights to the image branch.
fn tie(g: &mut prunec::ir::Graph, b: &DualBlock) {
    tie_text_weights(g, b).expect("ties");
}

#[test]
fn converting_the_last_k_blocks_equals_the_tied_copy_and_frees_the_text_weights() {
    conversion_equals_the_merged_copy("tie=image", &shared_subjects(), tie);
}

#[test]
fn streams_of_equal_length_convert_on_the_attention_axis() {
    // As many text tokens as image tokens: the shapes of the streams no longer say which axis is
    // the sequence; the joint attention's Concat does.
    let scratch = tempfile::tempdir().expect("temp dir");
    let subject = flux_variant("equal", scratch.path());
    let report = find_streams(&subject.loaded.model.graph);
    assert_eq!(report.blocks.len(), 3, "{:?}", report.declined);
    let x = subject.loaded.model.graph.value_by_name(&report.blocks[0].text_input).expect("text input");
    assert_eq!(subject.loaded.model.graph.value(x).shape.as_ref().map(|s| s.to_string()), Some("[1,64,128]".into()));
    conversion_equals_the_merged_copy("equal lengths", &[subject], tie);
}

#[test]
fn a_split_re_split_and_a_joint_mask_convert() {
    // Every dual-stream block cuts its attention output back into the streams with one Split,
    // and every attention adds a joint mask (the text mask, an input, joined with zeros).
    let scratch = tempfile::tempdir().expect("temp dir");
    let subject = flux_variant("masked_split", scratch.path());
    let graph = &subject.loaded.model.graph;
    let report = find_streams(graph);
    assert_eq!(report.blocks.len(), 3, "{:?}", report.declined);
    for b in &report.blocks {
        // The Split belongs to the joint core, so it is no twin op, and the Slices it replaced
        // are gone.
        let split = format!("/m/transformer_blocks.{}/attn/Split_streams", b.index);
        assert!(graph.op_ids().any(|op| graph.op(op).name == split), "{split}");
        assert!(!b.ops.iter().any(|op| op.image == split || op.text == split || op.image.ends_with("attn/Slice_17")), "{:?}", b.ops);
    }
    let mask = graph.value_by_name("txt_mask").expect("the mask input");
    assert!(!graph.consumers(mask).is_empty());
    conversion_equals_the_merged_copy("Split and mask", &[subject], tie);
}

#[test]
fn converting_the_last_k_blocks_equals_the_averaged_copy() {
    conversion_equals_the_merged_copy("tie=average", &shared_subjects(), |g, b| {
        average_image_weights(g, b).expect("averages");
        tie_text_weights(g, b).expect("ties");
    });
}

/// The f32 data of an initializer.
fn data(graph: &prunec::ir::Graph, name: &str) -> Vec<f32> {
    constant_tensor(graph, graph.value_by_name(name).expect("a value")).expect("a constant").to_f32_vec().expect("f32")
}

#[test]
fn averaging_takes_the_mean_of_aligned_twins_and_keeps_the_image_mlp() {
    for &(name, ..) in EXPECTED {
        let loaded = load(name);
        let original = &loaded.model.graph;
        let report = find_streams(original);
        for b in &report.blocks {
            // The MLP's four weights (fc1 weight and bias, fc2 weight and bias) where the text
            // branch has an MLP, none where it ends at the attention.
            let mlp = b.weights.iter().filter(|w| w.mlp).count();
            assert_eq!(mlp, if b.text_output.is_some() { 4 } else { 0 }, "{name} block {}", b.index);
            let mut merged = original.clone();
            average_image_weights(&mut merged, b).expect("averages");
            tie_text_weights(&mut merged, b).expect("ties");
            for w in &b.weights {
                let (t, i) = (data(original, &w.text), data(original, &w.image));
                let (mt, mi) = (data(&merged, &w.text), data(&merged, &w.image));
                let Some(r) = &w.rows else {
                    let expected: Vec<f32> = if w.mlp { i.clone() } else { t.iter().zip(&i).map(|(a, c)| 0.5 * (a + c)).collect() };
                    assert_eq!(mi, expected, "{name} block {}: {}", b.index, w.image);
                    assert_eq!(mt, expected, "{name} block {}: {}", b.index, w.text);
                    continue;
                };
                // SD3's last modulation: text rows (scale, shift) against image rows (shift,
                // scale); both become the mean of the twin rows, the image's other rows stay.
                assert_eq!(r.axis, 0, "{name}: rows of a transposed Gemm weight");
                let inner = (w.parameters / (r.text[1] - r.text[0])) as usize;
                let rows = |x: &[f32], range: [u64; 2]| x[range[0] as usize * inner..range[1] as usize * inner].to_vec();
                let mean: Vec<f32> = rows(&t, r.text).iter().zip(rows(&i, r.image)).map(|(a, c)| 0.5 * (a + c)).collect();
                assert_eq!(rows(&mi, r.image), mean, "{name} block {}: {} rows {:?}", b.index, w.image, r.image);
                assert_eq!(rows(&mt, r.text), mean, "{name} block {}: {} rows {:?}", b.index, w.text, r.text);
                let twin: Vec<std::ops::Range<usize>> = b
                    .weights
                    .iter()
                    .filter(|x| x.image == w.image)
                    .filter_map(|x| x.rows.as_ref())
                    .map(|x| x.image[0] as usize * inner..x.image[1] as usize * inner)
                    .collect();
                let untouched: Vec<usize> = (0..i.len()).filter(|k| !twin.iter().any(|r| r.contains(k))).collect();
                assert!(!untouched.is_empty(), "{name}: the image modulation has rows without a text twin");
                for k in untouched {
                    assert_eq!(mi[k], i[k], "{name} block {}: {}[{k}] has no text twin", b.index, w.image);
                }
            }
        }
    }
}

#[test]
fn the_single_stream_pass_is_judged_against_the_tied_original() {
    // Through the CLI: the verifier builds the reference from the pass's edit and judges it.
    let scratch = tempfile::tempdir().expect("temp dir");
    for (name, passes) in [
        ("tiny_flux", "single-stream{last=3}"),
        ("tiny_sd3", "single-stream{blocks=1..3}"),
        ("tiny_qwenimage", "single-stream{last=2,tie=text}"),
        ("tiny_sd3", "single-stream{last=2,tie=average}"),
    ] {
        let stem = format!("{name}_{}", passes.len());
        let (out, report) = (scratch.path().join(format!("{stem}.onnx")), scratch.path().join(format!("{stem}.json")));
        let run = prunec()
            .arg(case(name).path)
            .arg("-o")
            .arg(&out)
            .args(["--passes", passes])
            .arg("--report")
            .arg(&report)
            .output()
            .expect("prunec");
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
        let details = common::pass_details(&report, "single-stream");
        let freed: u64 = details["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .map(|b| b["before"].as_u64().unwrap() - b["after"].as_u64().unwrap())
            .sum();
        let (before, after) = (details["parameters_before"].as_u64().unwrap(), details["parameters_after"].as_u64().unwrap());
        assert_eq!(before - after, freed, "{name}: {details}");
        let text = report.to_string();
        assert!(text.contains("twin weights tied"), "{name}: the reference is the tied original: {text}");
    }
}

#[test]
fn the_single_stream_rewrite_is_snapshotted() {
    // tiny_sd3's last block: image-first order, a text branch that ends at the attention, row
    // twins of the modulation.
    let loaded = load("tiny_sd3");
    let before = prunec::ir::dump(&loaded.model);
    let mut model = loaded.model.clone();
    let passes = prunec::passes::parse_pipeline("single-stream{last=1}").expect("registered");
    prunec::passes::run_pipeline(&mut model, &passes, &mut Default::default()).expect("runs");
    insta::assert_snapshot!("single_stream_tiny_sd3_last1_diff", common::dump_diff(&before, &prunec::ir::dump(&model)));
}

#[test]
fn the_averaged_rewrite_differs_from_the_image_tied_one_in_the_aligned_weights_only() {
    // tiny_flux's last block, which has an MLP on both streams: against `tie=image`, only the
    // image weights that are not the MLP's change (the structure is the same).
    let loaded = load("tiny_flux");
    let run = |passes: &str| {
        let mut model = loaded.model.clone();
        let passes = prunec::passes::parse_pipeline(passes).expect("registered");
        prunec::passes::run_pipeline(&mut model, &passes, &mut Default::default()).expect("runs");
        prunec::ir::dump(&model)
    };
    let (image, average) = (run("single-stream{last=1}"), run("single-stream{last=1,tie=average}"));
    insta::assert_snapshot!("single_stream_tiny_flux_last1_average_vs_image", common::dump_diff(&image, &average));
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

#[test]
fn the_text_map_fit_recovers_an_affine_stream() {
    // More token rows than features: ordinary least squares, exact on an affine stream.
    let (n, d) = (40, 6);
    let x = noise(n * d, 1);
    let (w, b) = (noise(d * d, 2), noise(d, 3));
    let y: Vec<f32> = (0..n * d)
        .map(|k| {
            let (r, j) = (k / d, k % d);
            b[j] + (0..d).map(|i| x[r * d + i] * w[i * d + j]).sum::<f32>()
        })
        .collect();
    let map = fit_text_map(&x, &y, d).expect("fits");
    assert_eq!(map.samples, n);
    for (got, want) in map.weight.iter().zip(&w).chain(map.bias.iter().zip(&b)) {
        assert!((got - want).abs() < 1e-4, "{got} against {want}");
    }
    assert!(map.residual.is_some_and(|r| r < 1e-4), "{:?}", map.residual);
    // A stream that is not affine: the fit is still no worse than the identity, and not exact.
    let bent: Vec<f32> = y.iter().zip(&x).map(|(y, x)| y + (3.0 * x).sin()).collect();
    let map = fit_text_map(&x, &bent, d).expect("fits");
    assert!(map.residual.is_some_and(|r| r > 1e-3 && r < 1.0), "{:?}", map.residual);
}

#[test]
fn with_fewer_tokens_than_features_the_text_map_is_the_identity_off_their_span() {
    let (n, d) = (3, 8);
    let (x, y) = (noise(n * d, 4), noise(n * d, 5));
    let map = fit_text_map(&x, &y, d).expect("fits");
    assert!(map.residual.is_some_and(|r| r < 1e-3), "{:?}", map.residual);
    // A direction orthogonal to every measured token: mapped to itself (plus the bias).
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for r in 0..n {
        let mut v: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
        for q in &basis {
            let dot: f64 = v.iter().zip(q).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(q).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        basis.push(v.into_iter().map(|a| a / norm).collect());
    }
    let mut probe: Vec<f64> = noise(d, 6).into_iter().map(f64::from).collect();
    for q in &basis {
        let dot: f64 = probe.iter().zip(q).map(|(a, b)| a * b).sum();
        probe.iter_mut().zip(q).for_each(|(a, b)| *a -= dot * b);
    }
    for j in 0..d {
        let mapped: f64 = (0..d).map(|i| probe[i] * map.weight[i * d + j] as f64).sum();
        assert!((mapped - probe[j]).abs() < 1e-3, "{mapped} against {}", probe[j]);
    }
}

#[test]
fn the_text_map_fit_refuses_bad_sizes_and_values() {
    assert!(fit_text_map(&[1.0; 6], &[1.0; 4], 2).is_err());
    assert!(fit_text_map(&[1.0; 5], &[1.0; 5], 2).is_err());
    assert!(fit_text_map(&[f32::NAN, 1.0], &[1.0, 1.0], 2).is_err());
}

#[test]
fn the_linear_text_variant_writes_valid_models_and_fits_below_the_identity() {
    // Through the CLI on the saved inputs: one fitted map per converted block with a text
    // output, reported but not judged; the checker and ONNX Runtime accept the output.
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut manifest = Vec::new();
    for (name, passes, maps) in [
        ("tiny_flux", "single-stream{last=3,text=linear}", 3),
        ("tiny_sd3", "single-stream{last=2,text=linear}", 1),
        ("tiny_qwenimage", "single-stream{blocks=1..4,text=linear,tie=average}", 2),
    ] {
        let c = case(name);
        let inputs = c.path.with_file_name(format!("{name}.inputs.npz"));
        let (out, report) = (scratch.path().join(format!("{name}.onnx")), scratch.path().join(format!("{name}.json")));
        let run = prunec()
            .arg(&c.path)
            .arg("-o")
            .arg(&out)
            .args(["--passes", passes])
            .arg("--inputs")
            .arg(&inputs)
            .arg("--report")
            .arg(&report)
            .output()
            .expect("prunec");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{name}: {stderr}");
        eprintln!("{name} {passes}:\n{stderr}");
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
        let details = common::pass_details(&report, "single-stream");
        assert_eq!(details["text"], "linear", "{name}");
        assert!(details["measured_on"].as_str().is_some_and(|s| s.contains("inputs.npz")), "{name}: {details}");
        let blocks = details["blocks"].as_array().expect("blocks");
        let fitted: Vec<&serde_json::Value> = blocks.iter().filter(|b| !b["text_map"].is_null()).collect();
        assert_eq!(fitted.len(), maps, "{name}: {details}");
        for b in fitted {
            let map = &b["text_map"];
            // Eight text tokens of 128 features: fewer rows than unknowns, so the training fit
            // is exact, far below the identity's residual of 1.
            assert_eq!(map["samples"], 8, "{name}: {map}");
            assert!(map["residual"].as_f64().is_some_and(|r| r < 1e-3), "{name}: {map}");
        }
        // Parameters: the freed text weights, less the maps' D×D + D.
        let (before, after) = (details["parameters_before"].as_u64().unwrap(), details["parameters_after"].as_u64().unwrap());
        let freed: u64 = blocks.iter().map(|b| b["before"].as_u64().unwrap() - b["after"].as_u64().unwrap()).sum();
        assert_eq!(before - after, freed, "{name}: {details}");
        assert_eq!(report["verification"]["reference"], "tolerance", "{name}: not judged: {}", report["verification"]);
        manifest.push(json!({
            "original": c.path, "output": out, "feed": feed_json(&c), "compare": false,
        }));
    }
    validate_with_python(&manifest, scratch.path());
}

#[test]
fn the_linear_text_rewrite_is_snapshotted() {
    // tiny_flux's last block on seeded noise: against the tied conversion, the text stream the
    // single-stream stack reads is the fitted map of the block's text input.
    let loaded = load("tiny_flux");
    let run = |passes: &str| {
        let mut model = loaded.model.clone();
        let mut runtime = prunec::runtime::measure::TractRuntime { dir: loaded.dir.clone(), ..Default::default() };
        let passes = prunec::passes::parse_pipeline(passes).expect("registered");
        prunec::passes::run_pipeline(&mut model, &passes, &mut prunec::passes::Context::with_runtime(&mut runtime)).expect("runs");
        prunec::ir::dump(&model)
    };
    let (tied, linear) = (run("single-stream{last=1}"), run("single-stream{last=1,text=linear}"));
    insta::assert_snapshot!("single_stream_tiny_flux_last1_linear_vs_tied", common::dump_diff(&tied, &linear));
}

/// The MACs conversion must remove from `original`'s blocks `range`, from the weights' shapes
/// alone: each text modulation Gemm (`batch × K × N`, the only text op not on the sequence:
/// every other text MatMul's MACs move to its image twin, which now runs on the text tokens
/// too), less, in a block whose text branch ends at the attention, the image-only MatMuls after
/// it, which now also run on the `lt` text tokens.
fn expected_macs_removed(original: &prunec::ir::Model, report: &StreamReport, range: std::ops::Range<usize>, lt: u64) -> i64 {
    let g = &original.graph;
    let op_named = |name: &str| g.op_ids().find(|&op| g.op(op).name == name).expect("an op");
    let weight = |op| g.op_input(op, 1).and_then(|v| constant_tensor(g, v)).map(|t| t.numel());
    let mut removed = 0i64;
    for b in &report.blocks[range] {
        for pair in b.ops.iter().filter(|p| p.op_type == "Gemm") {
            let op = op_named(&pair.text);
            let batch = g.value(g.op_input(op, 0).unwrap()).shape.as_ref().unwrap().0[0].known().unwrap();
            removed += (batch * weight(op).expect("a constant Gemm weight")) as i64;
        }
        if b.text_output.is_none() {
            let prefix = format!("{}/", b.anchors[0].split("/attn/").next().expect("a block prefix"));
            let twins: BTreeSet<&str> = b.ops.iter().flat_map(|p| [p.text.as_str(), p.image.as_str()]).collect();
            for op in g.op_ids().filter(|&op| g.op(op).op_type == "MatMul" && g.op(op).name.starts_with(&prefix)) {
                if let (false, Some(w)) = (twins.contains(g.op(op).name.as_str()), weight(op)) {
                    removed -= (lt * w) as i64;
                }
            }
        }
    }
    removed
}

#[test]
fn macs_after_conversion_are_the_macs_before_less_the_text_branch() {
    // The shapes on the joint sequence are derived after conversion, so every MAC is counted,
    // those of image-only ops after the attention of SD3's and Qwen-Image's last block too.
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut subjects = shared_subjects();
    subjects.push(flux_variant("equal", scratch.path()));
    subjects.push(flux_variant("masked_split", scratch.path()));
    for Subject { name, loaded, .. } in &subjects {
        let original = &loaded.model;
        let before = prunec::ir::model_stats(original);
        assert!(before.macs_unknown.is_empty(), "{name}: {:?}", before.macs_unknown);
        let report = find_streams(&original.graph);
        let blocks = report.blocks.len();
        let g = &original.graph;
        let lt = g.value(g.value_by_name(&report.blocks[0].text_input).unwrap()).shape.as_ref().unwrap().0[1].known().unwrap();
        for k in 1..=blocks {
            let range = blocks - k..blocks;
            let mut converted = original.clone();
            for b in &report.blocks[range.clone()] {
                tie(&mut converted.graph, b);
            }
            convert(&mut converted, &report, range.clone()).unwrap_or_else(|e| panic!("{name} last {k}: {e}"));
            converted.graph.reconcile_records();
            let after = prunec::ir::model_stats(&converted);
            assert!(after.macs_unknown.is_empty(), "{name} last {k}: {:?}", after.macs_unknown);
            let removed = expected_macs_removed(original, &report, range, lt);
            eprintln!("{name} last {k}: MACs {} -> {} (removed {removed})", before.macs, after.macs);
            assert_eq!(before.macs as i64 - after.macs as i64, removed, "{name} last {k}");
        }
    }
}

#[test]
fn symbolic_stream_lengths_are_declined_with_the_way_out() {
    // The conversion writes the lengths into Slice bounds and Reshape targets: a symbolic text
    // length is refused, before anything changes, naming `--input-shape`.
    let loaded = load("tiny_flux");
    let mut model = loaded.model.clone();
    let report = find_streams(&model.graph);
    let g = &mut model.graph;
    let x = g.value_by_name(&report.blocks[2].text_input).expect("text input");
    let mut shape = g.value(x).shape.clone().expect("a shape");
    shape.0[1] = prunec::ir::Dim::Sym("text_len".into());
    g.value_mut(x).shape = Some(shape);
    let before = prunec::ir::dump(&model);
    let err = convert(&mut model, &report, 2..3).expect_err("declined");
    assert!(err.contains("text_len") && err.contains("--input-shape"), "{err}");
    assert_eq!(prunec::ir::dump(&model), before, "nothing changed");
}
