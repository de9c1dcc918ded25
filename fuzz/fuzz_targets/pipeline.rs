//! Bytes → read (no shape inference) → dependency groups → the default pipeline
//! (`dce,fold,prune,identity`, half the channels of each group) → the ONNX writer, all in
//! memory and without tract. Every model the reader accepts must go through without a panic,
//! and what the writer emits must decode and build a graph again. (The reader's op rules may
//! refuse the output where the input was accepted: they judge what a model states, and folding
//! can turn an invalid shape the input computed, `Concat([-5])` say, into a stated constant.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use prunec_frontend::{ReadError, ReadOptions, read_bytes};


fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join("prunec-fuzz-empty");
    let _ = std::fs::create_dir_all(&dir);
    let options = ReadOptions { infer_shapes: false };
    let Ok(mut loaded) = read_bytes(bytes::Bytes::copy_from_slice(data), &dir, &options) else { return };
    let groups = prunec_ir::analyse_groups(&loaded.model.graph);
    let _ = groups.to_string();
    let _ = prunec_ir::model_stats(&loaded.model);
    let _ = prunec_ir::dump(&loaded.model);
    let passes = prunec_passes::parse_pipeline("dce,fold,prune{ratio=0.5},identity").expect("the pipeline parses");
    if prunec_passes::run_pipeline(&mut loaded.model, &passes, &mut Default::default()).is_err() {
        return;
    }
    let Ok(encoded) = prunec_backends::onnx::to_bytes(&loaded.model) else { return };
    match read_bytes(bytes::Bytes::from(encoded), &dir, &options) {
        Ok(_) | Err(ReadError::Invalid(_) | ReadError::Unsupported(_)) => {}
        Err(e) => panic!("the pipeline's output does not read back: {e}"),
    }
});
