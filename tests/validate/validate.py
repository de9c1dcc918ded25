"""External validation of prunec's outputs with the reference ONNX tools.

Reads a JSON manifest (a list of cases) and, for each case:
- runs the reference checker on the output (full_check as well, when the original passes it);
- runs the original and the output in ONNX Runtime on the same inputs and compares every output
  (`max_abs` tolerance; 0 means bit-identical);
- counts parameters independently (elements of floating-point initializers and tensor attributes,
  subgraphs included) and compares with what prunec reported, when given.

Case fields: original, output, feed ({"npz": path} or {"tensors": [{name, dtype, shape, fill}]}),
max_abs, params (optional), run (default true), compare (default true; false checks only that
every output keeps its shape and type, for pruned models whose values legitimately change).
Prints one line per case and exits 1 if any case fails.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
}


def count_params(graph):
    total = 0
    for t in graph.initializer:
        if t.data_type in FLOAT_TYPES:
            total += int(np.prod(t.dims, dtype=np.int64))
    for node in graph.node:
        for a in node.attribute:
            tensors = ([a.t] if a.HasField("t") else []) + list(a.tensors)
            for t in tensors:
                if t.data_type in FLOAT_TYPES:
                    total += int(np.prod(t.dims, dtype=np.int64))
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                total += count_params(g)
    return total


ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
             "tensor(int32)": "int32", "tensor(bool)": "bool"}


def make_feed(spec, session_inputs):
    """The inputs a case names; inputs it leaves out get random values of their recorded shape
    (unknown or symbolic dims set to 1), as the Rust side does."""
    if "npz" in spec:
        data = np.load(spec["npz"])
        return {k: data[k] for k in data.files if k in spec.get("names", data.files)}
    rng = np.random.default_rng(0)
    feed = {}
    listed = {t["name"] for t in spec["tensors"]}
    missing = [
        {"name": i.name, "dtype": ORT_TYPES[i.type], "fill": "random",
         "shape": [d if isinstance(d, int) else 1 for d in i.shape]}
        for i in session_inputs if i.name not in listed
    ]
    for t in spec["tensors"] + missing:
        shape, dtype, fill = t["shape"], np.dtype(t["dtype"]), t["fill"]
        if fill == "random":
            if dtype.kind == "f":
                value = rng.uniform(-1, 1, size=shape).astype(dtype)
            elif dtype.kind == "b":
                value = rng.integers(0, 2, size=shape).astype(dtype)
            else:
                value = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            value = np.full(shape, fill, dtype=dtype)
        feed[t["name"]] = value
    return feed


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # Graph optimisations may reorder float arithmetic; compare the models as written.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def check_case(case):
    problems = []
    onnx.checker.check_model(case["output"])
    try:
        onnx.checker.check_model(case["original"], full_check=True)
        original_full = True
    except Exception:
        original_full = False
    if original_full:
        try:
            onnx.checker.check_model(case["output"], full_check=True)
        except Exception as e:
            problems.append(f"full_check fails on the output but not on the original: {e}")
    if "params" in case:
        model = onnx.load(case["output"], load_external_data=False)
        expected = count_params(model.graph)
        if expected != case["params"]:
            problems.append(f"prunec counts {case['params']} parameters, the reference count is {expected}")
    detail = ""
    if case.get("run", True):
        reference = session(case["original"])
        feed = make_feed(case["feed"], reference.get_inputs())
        names = [i.name for i in reference.get_inputs()]
        feed = {k: v for k, v in feed.items() if k in names}
        want = reference.run(None, feed)
        got = session(case["output"]).run(None, feed)
        worst = 0.0
        for w, g in zip(want, got):
            w, g = np.asarray(w), np.asarray(g)
            if w.shape != g.shape or w.dtype != g.dtype:
                problems.append(f"output {g.dtype}{g.shape} differs from {w.dtype}{w.shape}")
                continue
            if not case.get("compare", True):
                continue
            if w.dtype.kind in "fc":
                diff = float(np.max(np.abs(w.astype(np.float64) - g.astype(np.float64)), initial=0.0))
                if np.isnan(w).any() or np.isnan(g).any():
                    if not np.array_equal(np.isnan(w), np.isnan(g)):
                        diff = float("inf")
            else:
                diff = 0.0 if np.array_equal(w, g) else float("inf")
            worst = max(worst, diff)
        if worst > case.get("max_abs", 0.0):
            problems.append(f"outputs differ by {worst:.3e} (allowed {case.get('max_abs', 0.0)})")
        detail = f"max_abs={worst:.3e}"
    return problems, detail


def run_cases(check, label, key):
    """Runs `check` on every case of the JSON file named on the command line, prints one line per
    case (its `key` field) and a closing count under `label`, and exits 1 if any case failed."""
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    failed = 0
    for case in cases:
        try:
            problems, detail = check(case)
        except Exception as e:  # a checker or runtime rejection is a failure of that case
            problems, detail = [f"{type(e).__name__}: {e}"], ""
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {case[key]} {detail}")
        for p in problems:
            print(f"     {p}")
        failed += bool(problems)
    print(f"{label}: {len(cases) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


def main():
    run_cases(check_case, "validate", "output")


if __name__ == "__main__":
    main()
