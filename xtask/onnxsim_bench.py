#!/usr/bin/env python3
"""Side-by-side benchmark: prunec against onnxsim 0.8.1's structural pruning.

Never part of CI or the test suite. Run from the repository root:

    python3 xtask/onnxsim_bench.py [--prunec PATH] [--shares 0.3,0.5] [--repeats 3]
                                   [--models resnet18,...] [--calibrated]

It creates its own venv under `target/onnxsim-venv` (onnxsim==0.8.1, onnx,
onnxruntime, numpy) if missing and re-executes itself inside it.

For every shared model and parameter share it runs
  * prunec:  `prunec MODEL -o OUT --target params=S --report R.json` (plus the
    model's `--input-shape`/`--inputs`), and
  * onnxsim: `onnxsim.apply_structured_pruning(model, sparsity=s)`.
onnxsim's `sparsity` is the share of each matched chain's output channels, not
a share of the parameters, so the bench bisects `s` until the measured
parameter share is nearest to the target and reports the share reached.
Both outputs are measured the same way here, in Python: float
initializer/Constant elements before and after, onnx.checker full_check,
whether ONNX Runtime loads and runs them, output cosine (min over outputs) or
the task metric, wall time and peak RSS (GNU time, median of --repeats runs,
the two tools alternated run by run).

With --calibrated it also runs the calibrated modes for ResNet-18:
prunec `--criterion obspa --inputs NPZ` against onnxsim
`apply_structured_wanda_pruning(calibration_data=...)` followed by
`apply_pruning_finetune` (ridge refit), both calibrated on the same inputs
they are evaluated on.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "target", "onnxsim-venv")
VPY = os.path.join(VENV, "bin", "python")
SHARED = os.environ.get("PRUNEC_SHARED", os.path.join(ROOT, "..", "shared"))
if not os.path.isdir(os.path.join(SHARED, "models")):
    SHARED = "/work/shared"
ZOO = os.path.join(SHARED, "models", "zoo")
REAL = os.path.join(SHARED, "models", "real")
DATA = os.path.join(SHARED, "data")


def ensure_venv():
    if os.path.abspath(sys.prefix) == os.path.abspath(VENV):
        return
    if not os.path.exists(VPY):
        print(f"creating {VENV}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([VPY, "-m", "pip", "install", "-q",
                               "onnxsim==0.8.1", "onnx", "onnxruntime", "numpy"])
    os.execv(VPY, [VPY] + sys.argv)


# --------------------------------------------------------------------------
# models

def zoo_models():
    out = []
    for name in ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5",
                 "tiny_vit", "tiny_bert", "tiny_flux", "tiny_sd3", "tiny_qwenimage",
                 "tiny_llama"]:
        p = os.path.join(ZOO, name + ".onnx")
        if os.path.exists(p):
            out.append(dict(name=name, path=p, kind="zoo",
                            inputs=os.path.join(ZOO, name + ".inputs.npz"),
                            prunec_args=[]))
    return out


def real_models():
    oc = os.path.join(REAL, "rapidocr")
    return [
        dict(name="ppocrv4_det", path=os.path.join(oc, "ch_PP-OCRv4_det_infer.onnx"), kind="det",
             inputs=os.path.join(DATA, "rapidocr_det.dev.npz"),
             prunec_args=["--input-shape", "x=1,3,640,640"]),
        dict(name="ppocrv4_rec", path=os.path.join(oc, "ch_PP-OCRv4_rec_infer.onnx"), kind="rec",
             inputs=os.path.join(DATA, "rapidocr_rec.dev.npz"),
             prunec_args=["--input-shape", "x=1,3,48,320"]),
        dict(name="ppocr_cls", path=os.path.join(oc, "ch_ppocr_mobile_v2.0_cls_infer.onnx"), kind="cls",
             inputs=os.path.join(DATA, "rapidocr_cls.dev.npz"),
             prunec_args=["--input-shape", "x=1,3,48,192"]),
        dict(name="magika", path=os.path.join(REAL, "magika", "model.onnx"), kind="magika",
             inputs=os.path.join(DATA, "magika.dev.npz"),
             prunec_args=["--input-shape", "bytes=1,2048"]),
    ]


NOT_APPLICABLE = [
    ("silero_vad_16k_op15", "not run: no dev inputs or task metric in shared/data; weights inside If subgraphs with a recurrent state input"),
    ("silero_vad_16k_sequence", "not run: no dev inputs or task metric in shared/data; LSTM with recurrent h/c inputs"),
]


# --------------------------------------------------------------------------
# measurement

FLOAT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def count_params(model):
    """Float elements in initializers and Constant nodes, subgraphs included."""
    import numpy as np
    from onnx import helper

    def tensor_elems(t):
        if t.data_type in FLOAT_TYPES:
            return int(np.prod(t.dims)) if len(t.dims) else 1
        return 0

    def graph_count(g):
        n = sum(tensor_elems(t) for t in g.initializer)
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        n += tensor_elems(a.t)
            for a in node.attribute:
                if a.type == helper.AttributeProto.GRAPH:
                    n += graph_count(a.g)
                elif a.type == helper.AttributeProto.GRAPHS:
                    n += sum(graph_count(sg) for sg in a.graphs)
        return n

    return graph_count(model.graph)


def load_inputs(m):
    import numpy as np
    d = np.load(m["inputs"])
    return {k: d[k] for k in d.files}


def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_outputs(sess, m, data):
    """Outputs of the model on its evaluation inputs: a list (per output) of arrays.
    Image models with fixed batch 1 after prunec are run one sample at a time."""
    import numpy as np
    names = [i.name for i in sess.get_inputs()]
    if m["kind"] == "zoo":
        feed = {k: data[k] for k in names}
        return [np.asarray(o) for o in sess.run(None, feed)]
    key = names[0]
    x = data[key]
    outs = None
    for i in range(x.shape[0]):
        r = sess.run(None, {key: x[i:i + 1]})
        if outs is None:
            outs = [[] for _ in r]
        for j, o in enumerate(r):
            outs[j].append(np.asarray(o))
    return [np.concatenate(o, axis=0) for o in outs]


def cosine(a, b):
    import numpy as np
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def rec_cer(probs, labels, chars):
    import numpy as np
    errs = total = 0
    for p, lab in zip(probs, labels):
        idx = np.argmax(p, axis=-1)
        s, last = [], -1
        for k in idx:
            if k != last and k != 0:
                s.append(chars[k - 1] if k - 1 < len(chars) else " ")
            last = k
        pred = "".join(s).replace(" ", "")
        lab = str(lab).replace(" ", "")
        errs += edit_distance(pred, lab)
        total += len(lab)
    return errs / max(total, 1)


def task_metric(m, outs, ref_outs, data, model_proto):
    import numpy as np
    k = m["kind"]
    if k == "zoo":
        return "cos", min(cosine(a, b) for a, b in zip(ref_outs, outs))
    if k == "rec":
        meta = {p.key: p.value for p in model_proto.metadata_props}
        chars = meta["character"].splitlines() + [" "]
        return "CER", rec_cer(outs[0], data["labels"], chars)
    if k == "cls":
        return "acc", float(np.mean(np.argmax(outs[0], -1) == data["labels"]))
    if k == "det":
        a = ref_outs[0] > 0.3
        b = outs[0] > 0.3
        return "IoU", float((a & b).sum() / max((a | b).sum(), 1))
    if k == "magika":
        return "top1", float(np.mean(np.argmax(outs[0], -1) == np.argmax(ref_outs[0], -1)))


def evaluate(m, out_path, orig_params, ref_outs, data, orig_proto):
    import onnx
    r = {}
    try:
        mp = onnx.load(out_path)
    except Exception as e:
        r["check"] = f"load: {str(e)[:80]}"
        return r
    r["params"] = count_params(mp)
    r["share"] = 1 - r["params"] / orig_params
    try:
        onnx.checker.check_model(mp, full_check=True)
        r["check"] = "ok"
    except Exception as e:
        r["check"] = "FAIL: " + str(e).splitlines()[0][:100]
    try:
        sess = ort_session(out_path)
        outs = run_outputs(sess, m, data)
        r["ort"] = "ok"
        r["metric_name"], r["metric"] = task_metric(m, outs, ref_outs, data, orig_proto)
        if m["kind"] != "zoo":
            r["cos"] = min(cosine(a, b) for a, b in zip(ref_outs, outs))
    except Exception as e:
        r["ort"] = "FAIL: " + str(e).splitlines()[0][:100]
    return r


def timed(cmd):
    """Run cmd under GNU time; return (rc, wall s, peak RSS MiB, stderr tail)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf:
        tpath = tf.name
    p = subprocess.run(["/usr/bin/time", "-v", "-o", tpath] + cmd,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    txt = open(tpath).read()
    os.unlink(tpath)
    wall = rss = None
    mm = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", txt)
    if mm:
        parts = [float(x) for x in mm.group(1).split(":")]
        wall = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    mm = re.search(r"Maximum resident set size \(kbytes\): (\d+)", txt)
    if mm:
        rss = int(mm.group(1)) / 1024
    return p.returncode, wall, rss, (p.stderr or "").strip().splitlines()[-3:]


# --------------------------------------------------------------------------
# onnxsim worker (run in its own process, so GNU time measures it alone)

def onnxsim_prune(model_path, sparsity, calib_npz=None):
    import onnx
    import onnxsim
    if calib_npz:
        import numpy as np
        d = np.load(calib_npz)
        m = onnx.load(model_path)
        names = [i.name for i in m.graph.input]
        calib = [{k: d[k] for k in names if k in d.files}]
        p = onnxsim.apply_structured_wanda_pruning(m, calibration_data=calib, sparsity=sparsity)
        return onnxsim.apply_pruning_finetune(m, p, calibration_data=calib)
    return onnxsim.apply_structured_pruning(model_path, sparsity=sparsity)


def worker(argv):
    model_path, out_path, sparsity = argv[0], argv[1], float(argv[2])
    calib = argv[3] if len(argv) > 3 else None
    import onnx
    p = onnxsim_prune(model_path, sparsity, calib)
    onnx.save(p, out_path)


def onnxsim_share(model_path, sparsity, orig_params, calib):
    try:
        p = onnxsim_prune(model_path, sparsity, calib)
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return 1 - count_params(p) / orig_params, None


def sweep_onnxsim(model_path, target, orig_params, calib):
    """Bisect onnxsim's per-chain channel sparsity for the parameter share nearest target."""
    tried = {}

    def share(s):
        if s not in tried:
            tried[s] = onnxsim_share(model_path, s, orig_params, calib)
        return tried[s]

    top, err = share(0.95)
    if top is None:
        return None, None, err, tried
    if top < target:
        return 0.95, top, None, tried
    lo, hi = 0.0, 0.95
    for _ in range(7):
        mid = round((lo + hi) / 2, 4)
        sh, err = share(mid)
        if sh is None:
            break
        if sh < target:
            lo = mid
        else:
            hi = mid
    best = min((s for s in tried if tried[s][0] is not None), key=lambda s: abs(tried[s][0] - target))
    return best, tried[best][0], None, tried


# --------------------------------------------------------------------------

def run_prunec_only(args, m, mode, calib, share, orig_params, ref, data, orig, base_metric):
    tag = f"{m['name']}_{mode}_matched{int(share * 1000)}"
    print(f"== {tag}", file=sys.stderr, flush=True)
    p_out = os.path.join(args.work, tag + ".prunec.onnx")
    rep = os.path.join(args.work, tag + ".prunec.json")
    pcmd = [args.prunec, m["path"], "-o", p_out, "--target", f"params={share}",
            "--report", rep, "-q"] + m["prunec_args"]
    if mode == "calibrated":
        pcmd += ["--criterion", "obspa", "--inputs", calib]
    times, rc, tail = [], None, []
    for _ in range(args.repeats):
        rc, wall, rss, tail = timed(pcmd)
        times.append((wall, rss))
        if rc != 0:
            break
    row = dict(model=m["name"], mode=mode + " (onnxsim's share)", target=share, tool="prunec",
               base_metric=base_metric, orig_params=orig_params,
               wall=statistics.median(t[0] for t in times), rss=statistics.median(t[1] for t in times),
               runs=len(times))
    if rc != 0:
        row["refused"] = f"exit {rc}: " + " / ".join(tail)[:200]
    elif os.path.exists(p_out):
        row.update(evaluate(m, p_out, orig_params, ref, data, orig))
    print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    for f in (p_out, p_out + ".data"):
        if os.path.exists(f):
            os.unlink(f)
    return [row]


def short(msg, n=70):
    msg = str(msg).replace("|", "/").replace("\n", " ")
    return msg if len(msg) <= n else msg[:n] + "…"


def fmt(v, nd=4):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prunec", default=os.path.join(ROOT, "target", "release", "prunec"))
    ap.add_argument("--shares", default="0.3,0.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="")
    ap.add_argument("--calibrated", action="store_true")
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "onnxsim-bench"))
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import numpy as np  # noqa: F401
    import onnx
    import onnxsim
    os.makedirs(args.work, exist_ok=True)
    shares = [float(s) for s in args.shares.split(",")]
    models = zoo_models() + real_models()
    if args.models:
        want = args.models.split(",")
        models = [m for m in models if m["name"] in want]

    rows = []
    for m in models:
        orig = onnx.load(m["path"])
        orig_params = count_params(orig)
        data = load_inputs(m)
        ref = run_outputs(ort_session(m["path"]), m, data)
        base_metric = task_metric(m, ref, ref, data, orig)
        modes = [("default", None)]
        if args.calibrated and m["name"] == "resnet18":
            modes.append(("calibrated", m["inputs"]))
        for mode, calib in modes:
            matched_done = set()
            for target in shares + ["matched"]:
                if target == "matched":
                    # prunec again at the share onnxsim actually reached, where
                    # onnxsim fell well short of a target: the same-share comparison
                    reached = sorted({round(r["share"], 3) for r in rows
                                      if r["model"] == m["name"] and r["mode"] == mode
                                      and r["tool"] == "onnxsim" and "share" in r
                                      and 0.005 < r["share"] < r["target"] - 0.05})
                    for sh in reached:
                        if sh in matched_done:
                            continue
                        matched_done.add(sh)
                        rows.extend(run_prunec_only(args, m, mode, calib, sh, orig_params, ref, data,
                                                    orig, base_metric))
                    continue
                tag = f"{m['name']}_{mode}_{int(target * 100)}"
                print(f"== {tag}", file=sys.stderr, flush=True)
                # onnxsim: find its sparsity first (untimed sweep)
                t0 = time.time()
                sp, sh, err, tried = sweep_onnxsim(m["path"], target, orig_params, calib)
                sweep_s = time.time() - t0
                p_out = os.path.join(args.work, tag + ".prunec.onnx")
                o_out = os.path.join(args.work, tag + ".onnxsim.onnx")
                rep = os.path.join(args.work, tag + ".prunec.json")
                pcmd = [args.prunec, m["path"], "-o", p_out, "--target", f"params={target}",
                        "--report", rep, "-q"] + m["prunec_args"]
                if mode == "calibrated":
                    pcmd += ["--criterion", "obspa", "--inputs", calib]
                ocmd = None
                if sp is not None:
                    ocmd = [sys.executable, os.path.abspath(__file__), "--onnxsim-worker",
                            m["path"], o_out, str(sp)] + ([calib] if calib else [])
                pt, ot = [], []
                prc = orc = None
                ptail = otail = []
                for i in range(args.repeats):
                    order = [("p", pcmd), ("o", ocmd)] if i % 2 == 0 else [("o", ocmd), ("p", pcmd)]
                    for who, cmd in order:
                        if cmd is None:
                            continue
                        rc, wall, rss, tail = timed(cmd)
                        if who == "p":
                            prc, ptail = rc, tail
                            pt.append((wall, rss))
                        else:
                            orc, otail = rc, tail
                            ot.append((wall, rss))
                    if prc not in (0, None) and (orc not in (0, None) or ocmd is None):
                        break  # a refusal does not need repeating
                for tool, rc, times, outp, tail in (("prunec", prc, pt, p_out, ptail),
                                                    ("onnxsim", orc, ot, o_out, otail)):
                    row = dict(model=m["name"], mode=mode, target=target, tool=tool,
                               base_metric=base_metric, orig_params=orig_params)
                    if times:
                        row["wall"] = statistics.median(t[0] for t in times)
                        row["rss"] = statistics.median(t[1] for t in times)
                        row["runs"] = len(times)
                    if tool == "onnxsim":
                        row["sparsity"] = sp
                        row["sweep_s"] = sweep_s
                        row["sweep"] = {str(k): v[0] for k, v in tried.items()}
                        if err:
                            row["refused"] = err
                    if tool == "prunec" and rc not in (0, None):
                        row["refused"] = f"exit {rc}: " + " / ".join(tail)[:200]
                    elif tool == "onnxsim" and sp is not None and rc not in (0, None):
                        row["refused"] = f"exit {rc}: " + " / ".join(tail)[:200]
                    if "refused" not in row and os.path.exists(outp):
                        row.update(evaluate(m, outp, orig_params, ref, data, orig))
                    if tool == "prunec" and os.path.exists(rep):
                        try:
                            row["prunec_verify"] = json.load(open(rep)).get("verification", {}).get("judged")
                        except Exception:
                            pass
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "sweep"}, default=str),
                          file=sys.stderr, flush=True)
                for f in (p_out, o_out):
                    if os.path.exists(f):
                        os.unlink(f)
                    if os.path.exists(f + ".data"):
                        os.unlink(f + ".data")

    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1, default=str)

    print(f"onnxsim {onnxsim.__version__}, onnx {onnx.__version__}, "
          f"prunec `{args.prunec}`, shares {shares}, {args.repeats} timed runs each (median)\n")
    print("| model | mode | target | tool | share removed | onnxsim sparsity | check_model | ORT runs | metric (original) | metric | min cos | wall s | peak RSS MiB | note |")
    print("|---|---|--:|---|--:|--:|---|---|--:|--:|--:|--:|--:|---|")
    for r in rows:
        bm = r["base_metric"]
        metric = r.get("metric")
        cosv = r.get("cos") if r.get("metric_name") != "cos" else r.get("metric")
        note = r.get("refused", "")
        if "share" in r and r["share"] < r["target"] - 0.05:
            note = (note + "; " if note else "") + f"reaches only {r['share']:.3f}"
        print(f"| {r['model']} | {r['mode']} | {r['target']} | {r['tool']} | {fmt(r.get('share'), 3)} "
              f"| {fmt(r.get('sparsity'), 3) if r['tool'] == 'onnxsim' else '—'} "
              f"| {short(r.get('check', '—'))} | {short(r.get('ort', '—'))} "
              f"| {bm[0]} {bm[1]:.4f} | {fmt(metric)} | {fmt(cosv)} "
              f"| {fmt(r.get('wall'), 2)} | {fmt(r.get('rss'), 0)} | {short(note, 160)} |")
    for name, why in NOT_APPLICABLE:
        print(f"| {name} | — | — | both | — | — | — | — | — | — | — | — | — | {why} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--onnxsim-worker":
        worker(sys.argv[2:])
    else:
        ensure_venv()
        main()
