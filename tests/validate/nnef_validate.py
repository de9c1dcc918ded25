"""External validation of prunec's tract NNEF archives with the `tract` Python package.

Reads a JSON manifest (a list of cases) and, for each case, loads the archive `nnef` in tract's
Python bindings (with the extension registries prunec writes with), runs it on the case's feed,
and compares every output with ONNX Runtime's output of the ONNX model `onnx` on the same feed:
same shape and type, and a largest absolute difference of at most `rel` times the largest
absolute value of ONNX Runtime's output (integer and boolean outputs must be equal).

Case fields: nnef, onnx, feed (as in validate.py), rel, scale_floor (optional: the least scale
an output is measured against, for outputs whose range is known, such as probabilities, but
whose values on the test input are all near 0). Prints one line per case and exits 1 if
any case fails.
"""
import os
import sys

import numpy as np
import tract

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from validate import make_feed, run_cases, session  # noqa: E402


def tract_model(path):
    return tract.nnef().with_onnx().with_tract_transformers().with_tract_extra().load(path).into_runnable()


def check_case(case):
    reference = session(case["onnx"])
    feed = make_feed(case["feed"], reference.get_inputs())
    names = [i.name for i in reference.get_inputs()]
    feed = {k: v for k, v in feed.items() if k in names}
    want = reference.run(None, feed)
    model = tract_model(case["nnef"])
    tract_facts = [str(model.input_fact(i)) for i in range(model.input_count())]
    if model.input_count() != len(names):
        return [f"the archive has {model.input_count()} inputs ({tract_facts}), the ONNX model {len(names)}"], ""
    # NNEF keeps the inputs in the ONNX graph's order.
    got = [t.to_numpy() for t in model.run([feed[n] for n in names])]
    problems, worst = [], 0.0
    if len(got) != len(want):
        return [f"the archive has {len(got)} outputs, the ONNX model {len(want)}"], ""
    for k, (w, g) in enumerate(zip(want, got)):
        w, g = np.asarray(w), np.asarray(g)
        if w.shape != g.shape or w.dtype != g.dtype:
            problems.append(f"output {k}: tract gives {g.dtype}{g.shape}, ONNX Runtime {w.dtype}{w.shape}")
            continue
        if w.dtype.kind in "fc":
            scale = float(np.max(np.abs(w.astype(np.float64)), initial=0.0))
            diff = float(np.max(np.abs(w.astype(np.float64) - g.astype(np.float64)), initial=0.0))
            if not np.array_equal(np.isnan(w), np.isnan(g)):
                diff = float("inf")
            rel = diff / max(scale, case.get("scale_floor", 0.0), np.finfo(np.float64).tiny)
        else:
            rel = 0.0 if np.array_equal(w, g) else float("inf")
        worst = max(worst, rel)
        if not rel <= case["rel"]:
            problems.append(f"output {k}: differs by {rel:.3e} of its scale (allowed {case['rel']:.1e})")
    return problems, f"rel={worst:.3e}"


def main():
    run_cases(check_case, f"nnef_validate: tract {tract.version()}", "nnef")


if __name__ == "__main__":
    main()
