//! Dependency groups, checked against Torch-Pruning's DepGraph on the reference models and
//! snapshotted for every testdata and shared model.

mod common;

use prunec::frontend::{ReadOptions, read_model};
use prunec::ir::{Groups, analyse_groups};
use std::collections::BTreeSet;
use std::path::Path;

fn groups_of(path: &Path) -> Groups {
    let loaded = read_model(path, &ReadOptions::default()).expect("model reads");
    analyse_groups(&loaded.model.graph)
}

/// Every group Torch-Pruning finds is a prunable prunec group with the same members and size.
#[test]
fn groups_match_torch_pruning_on_the_reference_models() {
    let shared = common::shared();
    for model in ["resnet18", "mobilenet_v2", "mobilenet_v3_small"] {
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(shared.join(format!("reference/{model}.tp_groups.json"))).expect("reference exists"),
        )
        .expect("json");
        let ours = groups_of(&shared.join(format!("models/zoo/{model}.onnx")));
        let prunable: Vec<(u64, BTreeSet<String>)> = ours
            .groups
            .iter()
            .filter(|g| g.prunable)
            .map(|g| (g.channels.expect("prunable groups have a size"), g.members.iter().cloned().collect()))
            .collect();
        let expected: Vec<(u64, BTreeSet<String>)> = reference["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .map(|g| {
                let members = g["members"].as_array().expect("members").iter().map(|m| m.as_str().expect("string").to_string()).collect();
                (g["channels"].as_u64().expect("channels"), members)
            })
            .collect();
        for group in &expected {
            assert!(prunable.contains(group), "{model}: Torch-Pruning's group {group:?} is not a prunable prunec group");
        }
        assert_eq!(prunable.len(), expected.len(), "{model}: prunec finds prunable groups Torch-Pruning does not");
    }
}

/// The group listing of every testdata and shared model, as `prunec groups` prints it.
#[test]
fn group_listings() {
    let mut seen = BTreeSet::new();
    for case in common::all_cases() {
        if !seen.insert(case.path.clone()) {
            continue;
        }
        let name = case.path.file_stem().and_then(|s| s.to_str()).expect("file name").to_string();
        let name = if name == "model" { case.name.clone() } else { name };
        insta::assert_snapshot!(format!("groups_{name}"), groups_of(&case.path).to_string());
    }
}

/// An op prunec has never heard of is analysed: the axes it touches are frozen, and the group
/// says which op froze it; the rest of the model stays prunable.
#[test]
fn an_unknown_op_freezes_only_what_it_touches() {
    use prost::Message;
    use prunec::ir::proto;
    let path = common::root().join("testdata/models/conv_residual.onnx");
    let mut model = proto::ModelProto::decode(std::fs::read(&path).expect("model").as_slice()).expect("decodes");
    let graph = model.graph.as_mut().expect("graph");
    let relu = graph.node.iter_mut().find(|n| n.op_type() == "Relu").expect("a Relu");
    relu.op_type = Some("MysteryActivation".into());
    relu.domain = Some("com.example".into());
    let relu_name = relu.name().to_string();
    model.opset_import.push(proto::OperatorSetIdProto { domain: Some("com.example".into()), version: Some(1) });
    let dir = tempfile::tempdir().expect("temp dir");
    let mutated = dir.path().join("mystery.onnx");
    std::fs::write(&mutated, model.encode_to_vec()).expect("write");

    let groups = groups_of(&mutated);
    let frozen: Vec<_> = groups
        .groups
        .iter()
        .filter(|g| g.frozen_reasons.iter().any(|r| r.contains("MysteryActivation") && r.contains(&relu_name)))
        .collect();
    assert!(!frozen.is_empty(), "the unknown op must freeze its groups and name itself:\n{groups}");
    assert!(frozen.iter().all(|g| !g.prunable));
    assert!(groups.groups.iter().any(|g| g.prunable), "groups the unknown op does not touch stay prunable:\n{groups}");
}

/// Every reader of a prunable group's channels is in the group. With the group's consumer
/// slices of one channel zeroed, nothing written into that channel by its producers (weights,
/// biases, BatchNorm statistics) may reach an output: if it does, a reader is missing.
#[test]
fn groups_list_every_reader_of_their_channels() {
    use prunec::ir::{Model, Role, Tensor, Value, ValueKind, constant_tensor};
    use prunec::runtime::tract::{Plan, compare};
    use std::collections::HashMap;

    /// Sets the indices `which` of `axis` of a weight (as one op uses it) to `fill(k)`.
    fn rewrite(model: &mut Model, node: &str, weight: &str, axis: usize, which: &[usize], fill: &dyn Fn(usize) -> f32) {
        let graph = &mut model.graph;
        let op = graph.op_ids().find(|&o| graph.op(o).name == node).expect("member node exists");
        let old = graph.value_by_name(weight).expect("weight exists");
        let tensor = constant_tensor(graph, old).expect("a constant");
        let dims = tensor.dims();
        let mut data = tensor.to_f32_vec().expect("a float weight");
        let stride: u64 = dims[axis + 1..].iter().product();
        for (k, x) in data.iter_mut().enumerate() {
            if which.contains(&(((k as u64 / stride) % dims[axis]) as usize)) {
                *x = fill(k);
            }
        }
        // A private copy for this use, so weights shared with other ops stay as they are.
        let name = format!("{weight}#{node}");
        let new = match graph.value_by_name(&name) {
            Some(v) => {
                graph.value_mut(v).kind = ValueKind::Initializer(Tensor::from_f32(&name, &dims, &data));
                v
            }
            None => {
                let v =
                    graph.add_value(Value::new(&name, ValueKind::Initializer(Tensor::from_f32(&name, &dims, &data)))).expect("new name");
                graph.initializers.push(v);
                v
            }
        };
        for (slot, input) in graph.op_inputs(op).into_iter().enumerate() {
            if input == Some(old) {
                graph.set_op_input(op, slot, new);
            }
        }
    }

    let mut checked = 0;
    let cases: Vec<common::Case> = common::all_cases()
        .into_iter()
        .filter(|c| {
            ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "conv_residual", "depthwise", "grouped_conv", "concat_split", "attention"]
                .contains(&c.name.as_str())
        })
        .collect();
    for case in cases {
        let loaded = read_model(&case.path, &ReadOptions::default()).expect("model reads");
        let feed = common::feed(&case, &loaded.model);
        let groups = analyse_groups(&loaded.model.graph);
        for group in groups.groups.iter().filter(|g| g.prunable) {
            let channels = group.channels.expect("prunable") as usize;
            for c in [0, channels - 1] {
                let mut masked = loaded.model.clone();
                for w in group.weights.iter().filter(|w| w.role == Role::Consumer) {
                    rewrite(&mut masked, &w.node, &w.weight, w.axis, &w.indices[c], &|_| 0.0);
                }
                let mut perturbed = masked.clone();
                let noise: HashMap<Role, fn(usize) -> f32> = HashMap::from([
                    (Role::Producer, (|k| ((k * 7919) % 17) as f32 / 8.0 - 1.0) as fn(usize) -> f32),
                    // Positive, so perturbed variances stay valid.
                    (Role::Param, (|k| 0.5 + ((k * 104_729) % 13) as f32 / 13.0) as fn(usize) -> f32),
                ]);
                for w in group.weights.iter().filter(|w| w.role != Role::Consumer) {
                    rewrite(&mut perturbed, &w.node, &w.weight, w.axis, &w.indices[c], &noise[&w.role]);
                }
                let run = |m: &Model| Plan::from_model(m, &loaded.dir, &feed).and_then(|p| p.run(&feed)).expect("tract runs it");
                let (a, b) = (run(&masked), run(&perturbed));
                for ((name, x), (_, y)) in a.values.iter().zip(&b.values) {
                    let d = compare(x, y).expect("same shapes");
                    assert!(
                        d.max_abs <= 1e-5 * d.ref_max_abs.max(1.0),
                        "{}: group {} channel {c}: output {name} moved by {} when only the group's producers changed; a reader is missing",
                        case.name,
                        group.id,
                        d.max_abs
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} channels checked");
}
