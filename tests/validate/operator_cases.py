"""ONNX's own operator test cases (onnx.backend.test.case.node), which the wheel no longer ships
as files.

    operator_cases.py OUT            writes `<case>.onnx` for every case with a model; for each
                                     case ONNX Runtime runs on its own inputs, also
                                     `<case>.inputs.npz` (those inputs, by input name). Prints
                                     the count of models.
    operator_cases.py --check PAIRS  PAIRS is a JSON list of [original, written, inputs]: checks
                                     that each written model passes the full checker and strict
                                     shape inference wherever its original does, and that ONNX
                                     Runtime gives the original's outputs with it. Prints the
                                     failures as a JSON list of [case, reason].
"""

import json
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx.backend.test.case.node import collect_testcases

# The element types prunec's `.npz` reader takes (runtime/src/tract.rs `read_array`); a case
# with other inputs is verified on prunec's own random inputs.
READABLE = {np.float32, np.float16, np.float64, np.int64, np.int32, np.bool_, np.uint8, np.int8}


def session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def runs_in_onnx_runtime(path, inputs):
    """The case's inputs by name if ONNX Runtime runs the model on them, else None."""
    try:
        s = session(path)
        names = [i.name for i in s.get_inputs()]
        if len(names) != len(inputs) or not all(isinstance(x, np.ndarray) for x in inputs):
            return None
        feed = dict(zip(names, inputs))
        s.run(None, feed)
        return feed
    except Exception:
        return None


def make(out):
    os.makedirs(out, exist_ok=True)
    count = 0
    with warnings.catch_warnings():
        # Some cases compute their expected outputs with divisions by zero on purpose.
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    for case in cases:
        if case.model is None:
            continue
        path = os.path.join(out, case.name + ".onnx")
        onnx.save(case.model, path)
        count += 1
        if not case.data_sets:
            continue
        feed = runs_in_onnx_runtime(path, list(case.data_sets[0][0]))
        if feed is None:
            continue
        if all(v.dtype.type in READABLE for v in feed.values()):
            np.savez(os.path.join(out, case.name + ".inputs.npz"), **feed)
        else:
            # ONNX Runtime runs it, but prunec verifies on random inputs of its own.
            open(os.path.join(out, case.name + ".runs"), "w").close()
    print(count)


def passes(check):
    try:
        check()
        return True
    except Exception:
        return False


def same(want, got):
    if want.shape != got.shape or want.dtype != got.dtype:
        return f"{got.dtype}{list(got.shape)} where the original gives {want.dtype}{list(want.shape)}"
    if want.dtype.kind in "fc":
        if not np.allclose(want, got, rtol=1e-5, atol=1e-6, equal_nan=True):
            return f"differs by {float(np.nanmax(np.abs(want.astype(np.float64) - got.astype(np.float64))))}"
    elif want.dtype.kind != "O" and not np.array_equal(want, got):
        return "differs"
    return None


def check_pairs(pairs_path):
    failures = []
    for original, written, inputs in json.load(open(pairs_path)):
        case = os.path.basename(original)[: -len(".onnx")]
        for what, check in [
            ("full_check", lambda p: onnx.checker.check_model(p, full_check=True)),
            ("strict shape inference", lambda p: onnx.shape_inference.infer_shapes(onnx.load(p), strict_mode=True)),
        ]:
            if passes(lambda: check(original)) and not passes(lambda: check(written)):
                failures.append([case, f"the written model fails {what}, the original passes"])
        want_session = session(original)
        if inputs:
            data = np.load(inputs)
            feed = {i.name: data[i.name] for i in want_session.get_inputs()}
        else:
            continue
        want = want_session.run(None, feed)
        try:
            got = session(written).run(None, feed)
        except Exception as e:
            failures.append([case, f"ONNX Runtime cannot run the written model: {str(e).splitlines()[0]}"])
            continue
        for k, (w, g) in enumerate(zip(want, got)):
            problem = same(np.asarray(w), np.asarray(g))
            if problem:
                failures.append([case, f"output {k} {problem}"])
    print(json.dumps(failures))


if __name__ == "__main__":
    if sys.argv[1] == "--check":
        check_pairs(sys.argv[2])
    else:
        make(sys.argv[1])
