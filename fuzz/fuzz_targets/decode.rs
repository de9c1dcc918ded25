//! Bytes → `prunec_frontend::read_bytes` with shape inference off: prost decoding, the reader's
//! checks and the lift into the IR, never tract. Any error is fine; a panic, an abort, a hang or
//! an allocation of what the input merely declares is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prunec_frontend::{ReadOptions, read_bytes};

fuzz_target!(|data: &[u8]| {
    // External-data locations resolve against a folder that holds nothing, so no input can
    // reach a real file, and the folder is the same on every run.
    let dir = std::env::temp_dir().join("prunec-fuzz-empty");
    let _ = std::fs::create_dir_all(&dir);
    let _ = read_bytes(bytes::Bytes::copy_from_slice(data), &dir, &ReadOptions { infer_shapes: false });
});
