"""Layer removal fidelity and scoring time, driven through the `prunec` command.

For each shared transformer: `prunec blocks --inputs` (timed: every layer's block influence and
ablation), then `remove-layers{n=K,score=S}` for K = 1, 2, 3 and each score, and every choice of
one and of two layers: the output cosine against the original. Every layer is a candidate
(`keep-first=0,keep-last=0`), so three of four can go. torchvision initialises tiny_vit's
classifier to zeros (its output is the same whatever the encoder does), so the script gives it
seeded weights first, as `tests/blocks.rs` does. tract computes the cosine through the
command's verification (`--report`: the lowest cosine over the outputs); tiny_llama, which tract
cannot run, is scored data-free only and its outputs compared in ONNX Runtime.

    .venv/bin/python xtask/layers_fidelity.py target/debug/prunec /work/shared/models/zoo > fidelity.md
"""

import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRUNEC, ZOO = Path(sys.argv[1]), Path(sys.argv[2])
MODELS = ["tiny_bert", "tiny_vit", "tiny_flux", "tiny_sd3", "tiny_qwenimage", "tiny_llama"]
GATED = {"tiny_flux", "tiny_sd3", "tiny_qwenimage"}
UNTRACTED = {"tiny_llama"}


def run(cmd):
    start = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    return p, time.perf_counter() - start


def ort_cosine(original, pruned, inputs):
    import onnxruntime as ort

    feed = dict(np.load(inputs))
    a = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feed)
    b = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"]).run(None, feed)
    cos = []
    for x, y in zip(a, b):
        x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        cos.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return min(cos)


def model_path(model, scratch):
    if model != "tiny_vit":
        return ZOO / f"{model}.onnx"
    import onnx
    from onnx import numpy_helper

    path = scratch / "tiny_vit_head.onnx"
    if not path.exists():
        m = onnx.load(ZOO / "tiny_vit.onnx")
        for init in m.graph.initializer:
            if init.name == "heads.head.weight":
                shape = numpy_helper.to_array(init).shape
                values = np.random.default_rng(7).uniform(-0.5, 0.5, shape).astype(np.float32)
                init.CopyFrom(numpy_helper.from_array(values, init.name))
        onnx.save(m, path)
    return path


def removal(model, options, scratch):
    """(cosine, removed layers, pass ms) of `dce,fold,remove-layers{options},identity`."""
    onnx, inputs = model_path(model, scratch), ZOO / f"{model}.inputs.npz"
    out, report = scratch / "out.onnx", scratch / "r.json"
    cmd = [PRUNEC, onnx, "-o", out, "-q", "--passes", f"dce,fold,remove-layers{{{options}}},identity", "--report", report]
    cmd += ["--no-verify"] if model in UNTRACTED else ["--inputs", inputs]
    p, _ = run(cmd)
    if p.returncode != 0:
        return None, p.stderr.strip().splitlines()[-1:], None
    r = json.loads(report.read_text())
    rl = next(x for x in r["passes"] if x["name"] == "remove-layers")
    layers = [u["layer"] for u in rl["details"]["removed"]]
    if model in UNTRACTED:
        cos = ort_cosine(onnx, out, inputs)
    else:
        cos = min(o["cosine"] for o in r["verification"]["outputs"])
    return cos, layers, rl["ms"]


def main():
    scratch = Path(tempfile.mkdtemp())
    print("| model | layers | `prunec blocks --inputs` (s) | K | " + " | ".join(
        ["position", "weights", "gate", "influence", "ablation", "ablation greedy", "best (exhaustive)"]) + " |")
    print("|---|---|---|---|" + "---|" * 7)
    for model in MODELS:
        onnx, inputs = model_path(model, scratch), ZOO / f"{model}.inputs.npz"
        p, _ = run([PRUNEC, "blocks", onnx, "--json"])
        n = len(json.loads(p.stdout)["layers"])
        if model in UNTRACTED:
            timing = "— (tract cannot run it)"
        else:
            _, seconds = run([PRUNEC, "blocks", onnx, "--inputs", inputs, "--json"])
            timing = f"{seconds:.2f}"
        candidates = list(range(n))
        scores = ["score=position", "score=weights", "score=gate", "score=influence", "score=ablation", "score=ablation,greedy=true"]
        for k in (1, 2, 3):
            cells = []
            for s in scores:
                data = "influence" in s or "ablation" in s
                if (data and model in UNTRACTED) or ("gate" in s and model not in GATED) or k > len(candidates):
                    cells.append("—")
                    continue
                cos, layers, ms = removal(model, f"n={k},{s},keep-first=0,keep-last=0", scratch)
                cells.append("fails" if cos is None else f"{cos:.5f} {layers}" + (f" {ms:.0f} ms" if data else ""))
            if k <= 2 and k <= len(candidates):
                best = None
                for choice in itertools.combinations(candidates, k):
                    cos, layers, _ = removal(model, "layers=" + ",".join(map(str, choice)), scratch)
                    if cos is not None and (best is None or cos > best[0]):
                        best = (cos, layers)
                cells.append(f"{best[0]:.5f} {best[1]}" if best else "fails")
            else:
                cells.append("—")
            print(f"| {model} | {n} | {timing if k == 1 else ''} | {k} | " + " | ".join(cells) + " |", flush=True)


main()
