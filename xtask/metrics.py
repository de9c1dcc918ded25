"""Task metrics of pruned models on the shared dev sets, for `cargo xtask metrics`.

    metrics.py split DATA.npz CALIB.npz EVAL.npz N    first N samples for calibration, the rest held out
    metrics.py eval KIND ORIGINAL.onnx PRUNED.onnx EVAL.npz
        prints {"metric": ..., "value": ...} as JSON; KIND is rec, cls or magika

Metrics (../shared/models/README.md): rec, character error rate after greedy CTC decoding;
cls, accuracy; magika, top-1 agreement with the original model.
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def run(path, feed):
    """The first output on the whole feed; a model whose inputs declare a fixed batch (pruned at
    one `--input-shape`) runs in batches of that size."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in inputs}
    batch = inputs[next(iter(feed))].shape[0]
    total = len(next(iter(feed.values())))
    step = batch if isinstance(batch, int) and batch > 0 else total
    parts = [session.run(None, {k: v[i:i + step] for k, v in feed.items()})[0] for i in range(0, total, step)]
    return np.concatenate(parts)


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[len(b)]


def ctc_greedy(probs, charset):
    texts = []
    for steps in probs.argmax(-1):
        out, last = [], 0
        for k in steps:
            if k != last and k != 0:
                out.append(charset[k - 1] if k - 1 < len(charset) else " ")
            last = k
        texts.append("".join(out))
    return texts


def rec_cer(original, probs, labels):
    """Character error rate of the recognition outputs `probs` against `labels`, decoded with
    the character list of the model `original` (its `character` metadata), spaces stripped."""
    meta = {p.key: p.value for p in onnx.load(original, load_external_data=False).metadata_props}
    texts = ctc_greedy(probs, meta["character"].split("\n"))
    errors = sum(edit_distance(t.replace(" ", ""), l.replace(" ", "")) for t, l in zip(texts, labels))
    return errors / sum(len(l.replace(" ", "")) for l in labels)


def main():
    mode = sys.argv[1]
    if mode == "split":
        data, calib, held_out, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        d = np.load(data)
        np.savez(calib, **{k: d[k][:n] for k in d.files})
        np.savez(held_out, **{k: d[k][n:] for k in d.files})
        return
    kind, original, pruned, data = sys.argv[2:6]
    d = dict(np.load(data))
    got = run(pruned, d)
    if kind == "rec":
        value = rec_cer(original, got, d["labels"])
        metric = "CER"
    elif kind == "cls":
        value = float(np.mean(got.argmax(-1) == d["labels"]))
        metric = "accuracy"
    elif kind == "magika":
        want = run(original, d)
        value = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        metric = "top-1 agreement"
    else:
        raise SystemExit(f"unknown kind {kind}")
    print(json.dumps({"metric": metric, "value": value, "samples": int(len(got))}))


if __name__ == "__main__":
    main()
