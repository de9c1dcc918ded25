"""Layer removal fidelity and scoring time, driven through the `prunec` command.

For each shared transformer: `prunec blocks --inputs` (timed: every layer's block influence and
ablation), then `remove-layers{n=K,score=S}` for K = 1, 2, 3 and each score, and every choice of
one and of two layers: the output cosine against the original. Every layer is a candidate
(`keep-first=0,keep-last=0`), so three of four can go. torchvision initialises tiny_vit's
classifier to zeros (its output is the same whatever the encoder does), so the script gives it
seeded weights first, as `tests/blocks.rs` does. tract computes the cosine through the
command's verification (`--report`: the lowest cosine over the outputs).

Then PP-OCRv4 rec's character error rate, "score on some, measure on the rest": the 48 dev lines
are split, the scores run on the first 16 (`--inputs`, at `--input-shape x=16,3,48,320`: at open
width shape inference cannot prove the neck's residual sums keep their shape, so the pass finds
no layers), and the CER is measured in ONNX Runtime on the other 32 (greedy CTC decoding, as
/work/shared/models/README.md describes it).

    .venv/bin/python xtask/layers_fidelity.py target/debug/prunec /work/shared/models/zoo \
        /work/shared/models/real/rapidocr/ch_PP-OCRv4_rec_infer.onnx /work/shared/data/rapidocr_rec.dev.npz > fidelity.md
"""

import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import metrics  # noqa: E402  (the task metrics of `cargo xtask metrics`)

PRUNEC, ZOO = Path(sys.argv[1]), Path(sys.argv[2])
OCR, OCR_DEV = (Path(sys.argv[3]), Path(sys.argv[4])) if len(sys.argv) > 4 else (None, None)
SCORED_LINES = 16
MODELS = ["tiny_bert", "tiny_vit", "tiny_flux", "tiny_sd3", "tiny_qwenimage", "tiny_llama"]
GATED = {"tiny_flux", "tiny_sd3", "tiny_qwenimage"}


def run(cmd):
    start = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    return p, time.perf_counter() - start


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
    cmd += ["--inputs", inputs]
    p, _ = run(cmd)
    if p.returncode != 0:
        return None, p.stderr.strip().splitlines()[-1:], None
    r = json.loads(report.read_text())
    rl = next(x for x in r["passes"] if x["name"] == "remove-layers")
    layers = [u["layer"] for u in rl["details"]["removed"]]
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
        _, seconds = run([PRUNEC, "blocks", onnx, "--inputs", inputs, "--json"])
        timing = f"{seconds:.2f}"
        candidates = list(range(n))
        scores = ["score=position", "score=weights", "score=gate", "score=influence", "score=ablation", "score=ablation,greedy=true"]
        for k in (1, 2, 3):
            cells = []
            for s in scores:
                data = "influence" in s or "ablation" in s
                if ("gate" in s and model not in GATED) or k > len(candidates):
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


def cer(model, x, labels):
    """Character error rate of `model` on the lines `x`, as `cargo xtask metrics` measures it
    (greedy CTC decoding with the original's character list, spaces stripped); a model
    specialised to the scoring batch runs in batches of it."""
    return metrics.rec_cer(str(OCR), metrics.run(str(model), {"x": x}), [str(l) for l in labels])


def ocr():
    """PP-OCRv4 rec: scored on the first SCORED_LINES dev lines, CER measured on the rest."""
    scratch = Path(tempfile.mkdtemp())
    dev = np.load(OCR_DEV)
    x, labels = dev["x"], dev["labels"]
    score_npz = scratch / "score.npz"
    np.savez(score_npz, x=x[:SCORED_LINES])
    held_x, held_labels = x[SCORED_LINES:], labels[SCORED_LINES:]
    shape = "x=" + ",".join(map(str, (SCORED_LINES,) + x.shape[1:]))
    print()
    print(f"PP-OCRv4 rec ({OCR.name}): scored on dev lines 0–{SCORED_LINES - 1} (`--inputs`, `--input-shape {shape}`), "
          f"CER on lines {SCORED_LINES}–{len(x) - 1} in ONNX Runtime; original CER {100 * cer(OCR, held_x, held_labels):.2f}%")
    print()
    print("| K | " + " | ".join(["position", "weights", "influence", "ablation", "ablation greedy", "best (exhaustive)"]) + " |")
    print("|---|" + "---|" * 6)

    def removal_cer(options):
        out, report = scratch / "out.onnx", scratch / "r.json"
        cmd = [PRUNEC, OCR, "-o", out, "-q", "--input-shape", shape, "--inputs", score_npz, "--report", report,
               "--passes", f"dce,fold,remove-layers{{{options}}},identity"]
        p, _ = run(cmd)
        if p.returncode != 0:
            return None, p.stderr.strip().splitlines()[-1:], None
        r = json.loads(report.read_text())
        rl = next(x for x in r["passes"] if x["name"] == "remove-layers")
        return cer(out, held_x, held_labels), [u["layer"] for u in rl["details"]["removed"]], rl["ms"]

    p, _ = run([PRUNEC, "blocks", OCR, "--input-shape", shape, "--json"])
    n = len(json.loads(p.stdout)["layers"])
    scores = ["score=position", "score=weights", "score=influence", "score=ablation", "score=ablation,greedy=true"]
    for k in range(1, n + 1):
        cells = []
        for s in scores:
            c, layers, ms = removal_cer(f"n={k},{s},keep-first=0,keep-last=0")
            data = "influence" in s or "ablation" in s
            cells.append("fails" if c is None else f"{100 * c:.2f}% {layers}" + (f" {ms:.0f} ms" if data else ""))
        best = None
        for choice in itertools.combinations(range(n), k):
            c, layers, _ = removal_cer("layers=" + ",".join(map(str, choice)))
            if c is not None and (best is None or c < best[0]):
                best = (c, layers)
        cells.append(f"{100 * best[0]:.2f}% {best[1]}" if best else "fails")
        print(f"| {k} | " + " | ".join(cells) + " |", flush=True)


if OCR is None or "--ocr-only" not in sys.argv:
    main()
if OCR is not None:
    ocr()
