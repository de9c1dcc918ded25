"""`prunec bench` in ONNX Runtime: times two models in alternation on the same inputs.

argv: ORIGINAL PRUNED INPUTS.npz WARMUP RUNS THREADS. Prints one JSON object: the ONNX Runtime
version and each model's run times in milliseconds, or {"unavailable": reason}.
"""
import json
import sys
import time


def main():
    original, pruned, inputs, warmup, runs, threads = sys.argv[1:7]
    warmup, runs, threads = int(warmup), int(runs), int(threads)
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        print(json.dumps({"unavailable": f"{sys.executable} cannot import onnxruntime ({e})"}))
        return

    def session(path):
        options = ort.SessionOptions()
        # The same thread count as tract, so the ratio compares models, not parallelism.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    data = np.load(inputs)
    sessions = [session(original), session(pruned)]
    feeds = [{i.name: data[i.name] for i in s.get_inputs()} for s in sessions]
    times = [[], []]

    def timed(k):
        start = time.perf_counter()
        sessions[k].run(None, feeds[k])
        times[k].append((time.perf_counter() - start) * 1e3)

    for _ in range(warmup):
        sessions[0].run(None, feeds[0])
        sessions[1].run(None, feeds[1])
    for i in range(runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            timed(k)
    print(json.dumps({"version": ort.__version__, "original_ms": times[0], "pruned_ms": times[1]}))


if __name__ == "__main__":
    main()
