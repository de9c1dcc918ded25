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
