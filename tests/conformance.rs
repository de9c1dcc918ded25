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
    let mut models: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("the case folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
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

/// What the default command did with one operator test model.
enum Outcome {
    /// It wrote a verified model.
    Written,
    /// It refused, with this reason (the first line of the error chain, names replaced).
    Refused(String),
}

/// The default command (`prunec CASE -o OUT`, verification on the case's own inputs where
/// prunec reads their types, else on seeded random ones) on every case ONNX Runtime runs.
/// `groups` and `inspect` succeed on each. Each written model must pass the full checker and
/// strict shape inference wherever its original does and give the original's outputs in ONNX
/// Runtime; each refusal must be one of `tests/conformance_refusals.txt`, whose lines say why the
/// refusal is right (the model's own problem) or what prunec's runtime lacks. The list is
/// compared both ways, so a case that starts to pass must leave it.
#[test]
fn the_default_command_writes_a_model_onnx_runtime_agrees_with_or_refuses_for_a_listed_reason() {
    use prunec::passes::Pipeline;
    use prunec::recipe::{Recipe, VerifySettings};
    let scratch = tempfile::tempdir().expect("temp dir");
    let (cases, written_dir) = (scratch.path().join("cases"), scratch.path().join("written"));
    std::fs::create_dir(&written_dir).expect("folder");
    let script = common::root().join("tests/validate/operator_cases.py");
    let made = Command::new(common::python()).arg(&script).arg(&cases).output().expect("running operator_cases.py");
    assert!(made.status.success(), "operator_cases.py failed:\n{}", String::from_utf8_lossy(&made.stderr));
    let mut runnable: Vec<(String, Option<std::path::PathBuf>)> = std::fs::read_dir(&cases)
        .expect("the case folder")
        .filter_map(|e| {
            let path = e.expect("entry").path();
            let name = path.file_name()?.to_str()?.to_string();
            let case = name.strip_suffix(".inputs.npz").map(|c| (c.to_string(), Some(path.clone())));
            case.or_else(|| name.strip_suffix(".runs").map(|c| (c.to_string(), None)))
        })
        .collect();
    runnable.sort();
    assert!(runnable.len() >= 1_000, "ONNX Runtime runs only {} operator test models", runnable.len());
    let pipeline = Pipeline::parse(prunec::passes::DEFAULT_PIPELINE).expect("the default pipeline");
    let mut outcomes: Vec<(String, Outcome)> = Vec::new();
    let mut pairs = Vec::new();
    for (case, inputs) in &runnable {
        let model = cases.join(format!("{case}.onnx"));
        let loaded = read_model(&model, &ReadOptions::default()).unwrap_or_else(|e| panic!("{case}: the reader refuses it: {e}"));
        let _ = prunec::ir::model_stats(&loaded.model);
        let _ = prunec::ir::analyse_groups(&loaded.model.graph);
        drop(loaded);
        let recipe = Recipe { verify: VerifySettings { inputs: inputs.clone(), ..Default::default() }, ..Default::default() };
        let compiled = prunec::compile(&model, &pipeline, &recipe, &mut |_, _| std::ops::ControlFlow::Continue(()), None);
        match compiled {
            Ok(compiled) => {
                assert!(compiled.verification.is_some(), "{case}: written unverified");
                let out = written_dir.join(format!("{case}.onnx"));
                prunec::emit(&compiled.loaded, &out, prunec::Format::Onnx, &Default::default()).expect("writes");
                pairs.push(serde_json::json!([model, out, inputs]));
                outcomes.push((case.clone(), Outcome::Written));
            }
            Err(e) => outcomes.push((case.clone(), Outcome::Refused(reason(&e)))),
        }
    }
    let pairs_path = scratch.path().join("pairs.json");
    std::fs::write(&pairs_path, serde_json::to_string(&pairs).expect("json")).expect("writes");
    let checked = Command::new(common::python()).arg(&script).arg("--check").arg(&pairs_path).output().expect("running the check");
    assert!(checked.status.success(), "operator_cases.py --check failed:\n{}", String::from_utf8_lossy(&checked.stderr));
    let failures: Vec<(String, String)> = serde_json::from_slice(&checked.stdout).expect("a JSON list");
    assert!(failures.is_empty(), "{} written models disagree with their originals:\n{failures:#?}", failures.len());

    let refused: Vec<String> =
        outcomes.iter().filter_map(|(case, o)| if let Outcome::Refused(why) = o { Some(format!("{case}: {why}")) } else { None }).collect();
    let listed_path = common::root().join("tests/conformance_refusals.txt");
    let listed_text = std::fs::read_to_string(&listed_path).unwrap_or_default();
    let listed: Vec<&str> = listed_text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let unlisted: Vec<&String> = refused.iter().filter(|r| !listed.contains(&r.as_str())).collect();
    let stale: Vec<&&str> = listed.iter().filter(|l| !refused.iter().any(|r| r == **l)).collect();
    let written = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Written)).count();
    eprintln!("{} cases ONNX Runtime runs: {written} written and agreeing, {} refused", runnable.len(), refused.len());
    if std::env::var_os("PRUNEC_BLESS_REFUSALS").is_some() {
        let header: String = listed_text.lines().take_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        std::fs::write(&listed_path, header + &refused.join("\n") + "\n").expect("writes the list");
        return;
    }
    assert!(unlisted.is_empty(), "{} refusals not in tests/conformance_refusals.txt:\n{unlisted:#?}", unlisted.len());
    assert!(stale.is_empty(), "{} listed refusals no longer happen (remove them):\n{stale:#?}", stale.len());
}

/// The first line of an error's chain, with the case's file names removed, so that the list of
/// refusals reads the same wherever the cases are made.
fn reason(e: &prunec::Error) -> String {
    let mut chain = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let text = chain.join(": ");
    let line = text.lines().next().unwrap_or_default().to_string();
    // Paths of the scratch folder differ per run.
    let path = regex_free_path_strip(&line);
    path.chars().take(300).collect()
}

/// Replaces every backquoted absolute path with `…`.
fn regex_free_path_strip(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find("`/") {
        out += &rest[..start];
        match rest[start + 1..].find('`') {
            Some(end) => {
                out += "`…`";
                rest = &rest[start + end + 2..];
            }
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out + rest
}

/// Found by the run above: ONNX's attention and fmod cases compute NaN and -inf on purpose, and a
/// written model computing the same ones was refused as different ("by NaN of its scale").
#[test]
fn the_same_nan_or_infinity_in_both_outputs_is_agreement_and_anywhere_else_a_difference() {
    use prunec::runtime::tract::{TractTensor, compare};
    let t = |v: &[f32]| TractTensor::from_shape(&[v.len()], v).expect("a tensor");
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let same = compare(&t(&[1.0, nan, -inf, inf, 2.0]), &t(&[1.0, nan, -inf, inf, 2.0])).expect("comparable");
    assert_eq!((same.max_abs, same.ref_max_abs), (0.0, 2.0), "{same:?}");
    assert!((same.cosine - 1.0).abs() < 1e-12, "{same:?}");
    for other in [[1.0, 0.0, -inf, inf, 2.0], [1.0, nan, inf, inf, 2.0], [1.0, nan, -inf, 3.0, 2.0]] {
        let d = compare(&t(&[1.0, nan, -inf, inf, 2.0]), &t(&other)).expect("comparable");
        assert_eq!(d.max_abs, f64::INFINITY, "{other:?}: {d:?}");
    }
}
