"""Writes every model of ONNX's own operator test cases (onnx.backend.test.case.node) into a
folder, one `<case>.onnx` each: the wheel no longer ships them as files. Prints the count."""

import os
import sys
import warnings

import onnx
from onnx.backend.test.case.node import collect_testcases


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    count = 0
    with warnings.catch_warnings():
        # Some cases compute their expected outputs with divisions by zero on purpose.
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    for case in cases:
        if case.model is None:
            continue
        onnx.save(case.model, os.path.join(out, case.name + ".onnx"))
        count += 1
    print(count)


if __name__ == "__main__":
    main(sys.argv[1])
