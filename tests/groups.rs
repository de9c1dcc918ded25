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
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(shared.join(format!("reference/{model}.tp_groups.json"))).expect("reference exists")).expect("json");
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
