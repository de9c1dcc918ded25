//! ONNX's own operator test cases, generated at test time from the validator venv's `onnx`
//! package (`tests/validate/operator_cases.py`): about 1,900 small valid models, one per case.
//!
//! The reader's checks (opset imports, function calls, the op rules it enforces from the
//! operator spec, on recorded and inferred shapes) must refuse none of them, and writing one back
//! unchanged must give its bytes again.

mod common;

use prunec::frontend::{ReadOptions, read_model};
use std::process::Command;

/// `onnx` 1.23.2 (tests/validate/requirements.txt) has 1,884 cases with a model.
const MIN_CASES: usize = 1_800;

#[test]
fn the_reader_refuses_none_of_onnxs_operator_test_models_and_writes_each_back_byte_for_byte() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let script = common::root().join("tests/validate/operator_cases.py");
    let made = Command::new(common::python()).arg(&script).arg(scratch.path()).output().expect("running operator_cases.py");
    assert!(made.status.success(), "operator_cases.py failed:\n{}", String::from_utf8_lossy(&made.stderr));
    let mut models: Vec<_> = std::fs::read_dir(scratch.path()).expect("the case folder").map(|e| e.expect("entry").path()).collect();
    models.sort();
    assert!(models.len() >= MIN_CASES, "only {} operator test models were made", models.len());
    let mut refused = Vec::new();
    let mut changed = Vec::new();
    for path in &models {
        let name = path.file_stem().expect("a file name").to_string_lossy().into_owned();
        match read_model(path, &ReadOptions::default()) {
            Err(e) => refused.push(format!("{name}: {e}")),
            Ok(loaded) => {
                let bytes = prunec::backends::onnx::to_bytes(&loaded.model).expect("a model that reads can be written");
                if bytes != std::fs::read(path).expect("the model file") {
                    changed.push(name);
                }
            }
        }
    }
    assert!(refused.is_empty(), "{} of {} operator test models refused:\n{}", refused.len(), models.len(), refused.join("\n"));
    assert!(changed.is_empty(), "{} of {} operator test models not written back byte for byte: {changed:?}", changed.len(), models.len());
}
