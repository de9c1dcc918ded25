"""Exporter variants of a model, made at test time, and the strict checks of a pruned one.

Exporters differ in what they record: PyTorch's dynamo exporter writes a `value_info` for almost
every value, weights (initializers) included, and names the batch dimension; older converters
write value_info entries for graph outputs with less than the output declares. prunec must
keep every record in step with the graph it writes; these variants put records everywhere.

    exporters.py make SRC OUT_DIR
        Writes OUT_DIR/all_value_info.onnx (ONNX shape inference's record of every value, plus a
        record of every initializer) and OUT_DIR/symbolic.onnx (the same with the first input
        dimension named `batch` on the inputs and outputs and propagated by inference). Prints
        their paths, one a line.

    exporters.py legacy OUT
        Writes an old converter's model (IR version 6, opset 12, `com.microsoft` domains in
        opset_import): a graph output declared f32[1, seqlen] that value_info also lists with
        no shape, an input that is also an output, a repeated value_info entry between others,
        and a value_info naming a value the graph does not hold.

    exporters.py fp16 SRC FEED.npz OUT_DIR
        Writes OUT_DIR/fp16.onnx, the whole graph in float16 (inputs, outputs, weights, every
        value), as a converter that keeps no f32 interface writes it, and OUT_DIR/fp16_io.onnx,
        float16 inside behind Casts from and to the f32 inputs and outputs (a mixed-precision
        export), and OUT_DIR/fp16_matmul.onnx, the whole-graph one with its Gemms as MatMul and
        Add (tract 0.23 cannot run a float16 Gemm with a bias). Writes each one's feed beside it (`*.inputs.npz`: FEED cast to its input types).
        Prints `MODEL FEED` lines.

    exporters.py qdq SRC FEED.npz OUT_DIR
        Writes OUT_DIR/qdq.onnx: SRC quantised by ONNX Runtime's `quantize_static` (QDQ format,
        int8 weights with per-channel scales, uint8 activations), calibrated on FEED. Prints
        `MODEL FEED`.

    exporters.py qoperator SRC FEED.npz OUT_DIR
        The same quantisation in ONNX Runtime's operator format (QLinearConv, QLinearMatMul and
        friends, no QDQ pairs): OUT_DIR/qoperator.onnx. Prints `MODEL FEED`.

    exporters.py uint8 SRC FEED.npz OUT_DIR
        Writes OUT_DIR/uint8.onnx: SRC behind a uint8 image input (`Cast` to float and `Div` by
        255, as image pipelines export), and its feed (FEED rescaled to 0..255). Prints `MODEL FEED`.

    exporters.py check ORIGINAL PRUNED FEED.npz
        Refuses PRUNED unless the full checker and strict shape inference accept it and ONNX
        Runtime runs it on FEED with the original's output shapes and types. Exits 1 with the
        reason otherwise.
"""
import sys

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
from onnx import TensorProto


def record_initializers(model):
    """Adds a value_info entry for every initializer that has none, as dynamo exports do."""
    graph = model.graph
    recorded = {v.name for v in graph.value_info} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for t in graph.initializer:
        if t.name not in recorded:
            graph.value_info.append(oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def name_batch(model):
    """Names the first dimension of every input and output `batch`, then lets inference carry it."""
    graph = model.graph
    del graph.value_info[:]
    for v in list(graph.input) + list(graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    return model


def make(src, out_dir):
    base = onnx.load(src)
    everything = record_initializers(onnx.shape_inference.infer_shapes(base, strict_mode=True))
    onnx.checker.check_model(everything, full_check=True)
    paths = []
    path = f"{out_dir}/all_value_info.onnx"
    onnx.save(everything, path)
    paths.append(path)
    symbolic = onnx.load(src)
    symbolic = record_initializers(onnx.shape_inference.infer_shapes(name_batch(symbolic), strict_mode=True))
    onnx.checker.check_model(symbolic, full_check=True)
    inner = [v for v in symbolic.graph.value_info if any(d.dim_param == "batch" for d in v.type.tensor_type.shape.dim)]
    if not inner:
        raise SystemExit(f"{src}: no value_info carries the named batch dimension")
    path = f"{out_dir}/symbolic.onnx"
    onnx.save(symbolic, path)
    paths.append(path)
    print("\n".join(paths))


def legacy(out):
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seqlen", 4])
    mask = oh.make_tensor_value_info("mask", TensorProto.FLOAT, [1, "seqlen"])
    scores = oh.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "seqlen"])
    w = oh.make_tensor("w", TensorProto.FLOAT, [4, 1], np.linspace(-1, 1, 4).astype(np.float32))
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["proj"], name="proj"),
        oh.make_node("Squeeze", ["proj"], ["squeezed"], name="squeeze", axes=[2]),
        oh.make_node("Mul", ["squeezed", "mask"], ["scores"], name="mask_mul"),
    ]
    graph = oh.make_graph(
        nodes,
        "legacy_ocr",
        [x, mask],
        # `mask` is both an input and an output, as pass-through outputs of old converters are.
        [scores, oh.make_tensor_value_info("mask", TensorProto.FLOAT, [1, "seqlen"])],
        initializer=[w],
        value_info=[
            oh.make_tensor_value_info("proj", TensorProto.FLOAT, [1, "seqlen", 1]),
            # The converter's entry for the output: element type only, no shape.
            onnx.ValueInfoProto(name="scores", type=onnx.TypeProto(tensor_type=onnx.TypeProto.Tensor(elem_type=TensorProto.FLOAT))),
            oh.make_tensor_value_info("proj", TensorProto.FLOAT, None),
            oh.make_tensor_value_info("elsewhere", TensorProto.FLOAT, [3]),
            oh.make_tensor_value_info("squeezed", TensorProto.FLOAT, [1, "seqlen"]),
        ],
    )
    model = oh.make_model(
        graph,
        ir_version=6,
        producer_name="legacy-converter",
        opset_imports=[
            oh.make_opsetid("", 12),
            oh.make_opsetid("com.microsoft", 1),
            oh.make_opsetid("com.microsoft.nchwc", 1),
            oh.make_opsetid("com.microsoft.mlfeaturizers", 1),
            oh.make_opsetid("ai.onnx.ml", 2),
        ],
    )
    onnx.save(model, out)
    print(out)


F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _retype_values(values, old, new):
    for v in values:
        if v.type.tensor_type.elem_type == old:
            v.type.tensor_type.elem_type = new


def _graph_to_fp16(graph):
    """Every float weight, Constant, Cast target and recorded value type of `graph` in float16."""
    for t in graph.initializer:
        if t.data_type == F32:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32:
                a.t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            if n.op_type == "Cast" and a.name == "to" and a.i == F32:
                a.i = F16
    _retype_values(graph.value_info, F32, F16)
    del graph.value_info[:]


def _save_checked(model, path):
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def _feed_for(model_path, feed, out):
    """FEED's arrays cast to the model's input types, saved at `out`."""
    types = {i.name: i.type for i in session(model_path).get_inputs()}
    cast = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(uint8)": np.uint8}
    np.savez(out, **{k: v.astype(cast[types[k]]) for k, v in feed.items() if k in types})
    return out


def fp16(src, feed_path, out_dir):
    feed = dict(np.load(feed_path))
    lines = []
    whole = onnx.load(src)
    _graph_to_fp16(whole.graph)
    _retype_values(list(whole.graph.input) + list(whole.graph.output), F32, F16)
    path = f"{out_dir}/fp16.onnx"
    _save_checked(whole, path)
    lines.append(f"{path} {_feed_for(path, feed, f'{out_dir}/fp16.inputs.npz')}")

    io = onnx.load(src)
    g = io.graph
    _graph_to_fp16(g)
    casts_in, casts_out = [], []
    for i in g.input:
        if i.type.tensor_type.elem_type != F32:
            continue
        inner = f"{i.name}_fp16"
        for n in g.node:
            n.input[:] = [inner if x == i.name else x for x in n.input]
        casts_in.append(oh.make_node("Cast", [i.name], [inner], name=f"{i.name}_to_fp16", to=F16))
    for o in g.output:
        if o.type.tensor_type.elem_type != F32:
            continue
        inner = f"{o.name}_fp16"
        for n in g.node:
            n.output[:] = [inner if x == o.name else x for x in n.output]
            n.input[:] = [inner if x == o.name else x for x in n.input]
        casts_out.append(oh.make_node("Cast", [inner], [o.name], name=f"{o.name}_to_fp32", to=F32))
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    path = f"{out_dir}/fp16_io.onnx"
    _save_checked(io, path)
    lines.append(f"{path} {_feed_for(path, feed, f'{out_dir}/fp16_io.inputs.npz')}")

    # tract 0.23 cannot run a float16 Gemm with a bias (its expansion multiplies C by an f32
    # beta, so the sum comes out f32); the same model with the Gemm as MatMul and Add (how
    # exporters write Linear layers on 3-D inputs) is what tract can verify.
    matmul = onnx.load(path.replace("fp16_io", "fp16"))
    _gemm_to_matmul(matmul.graph)
    path = f"{out_dir}/fp16_matmul.onnx"
    _save_checked(matmul, path)
    lines.append(f"{path} {_feed_for(path, feed, f'{out_dir}/fp16_matmul.inputs.npz')}")
    print("\n".join(lines))


def _gemm_to_matmul(graph):
    """Every Gemm of a constant B (alpha 1, no transA) as MatMul(A, B') and Add(·, C)."""
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for n in graph.node:
        attrs = {a.name: a for a in n.attribute}
        plain = n.op_type == "Gemm" and n.input[1] in inits and not attrs.get("transA", onnx.AttributeProto()).i
        plain = plain and attrs.get("alpha", onnx.AttributeProto(f=1.0)).f == 1.0 and attrs.get("beta", onnx.AttributeProto(f=1.0)).f == 1.0
        if not plain:
            nodes.append(n)
            continue
        b = inits[n.input[1]]
        if attrs.get("transB", onnx.AttributeProto()).i:
            b.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(b).T.copy(), b.name))
        out = n.output[0]
        if len(n.input) > 2 and n.input[2]:
            nodes.append(oh.make_node("MatMul", n.input[:2], [f"{out}_matmul"], name=f"{n.name}_matmul"))
            nodes.append(oh.make_node("Add", [f"{out}_matmul", n.input[2]], [out], name=f"{n.name}_bias"))
        else:
            nodes.append(oh.make_node("MatMul", n.input[:2], [out], name=f"{n.name}_matmul"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


def qdq(src, feed_path, out_dir, quant_format="QDQ"):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    feed = dict(np.load(feed_path))
    names = [i.name for i in session(src).get_inputs()]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = [{k: feed[k] for k in names}]

        def get_next(self):
            return self.batches.pop() if self.batches else None

    stem = "qdq" if quant_format == "QDQ" else "qoperator"
    path = f"{out_dir}/{stem}.onnx"
    # quantize_static writes a shape-inferred copy beside its input: quantise a copy in OUT_DIR,
    # never the shared model (and never two runs over one file).
    source = f"{out_dir}/{stem}.source.onnx"
    onnx.save(onnx.load(src), source)
    quantize_static(
        source,
        path,
        Reader(),
        quant_format=QuantFormat.QDQ if quant_format == "QDQ" else QuantFormat.QOperator,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    print(f"{path} {_feed_for(path, feed, f'{out_dir}/{stem}.inputs.npz')}")


def qoperator(src, feed_path, out_dir):
    qdq(src, feed_path, out_dir, "QOperator")


def uint8(src, feed_path, out_dir):
    model = onnx.load(src)
    g = model.graph
    x = g.input[0]
    raw = f"{x.name}_uint8"
    for n in g.node:
        n.input[:] = [f"{x.name}_scaled" if i == x.name else i for i in n.input]
    g.initializer.append(onnx.numpy_helper.from_array(np.array(255.0, np.float32), "pixel_scale"))
    front = [
        oh.make_node("Cast", [raw], [f"{x.name}_float"], name="pixels_to_float", to=F32),
        oh.make_node("Div", [f"{x.name}_float", "pixel_scale"], [f"{x.name}_scaled"], name="pixels_scale"),
    ]
    nodes = front + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    x.name = raw
    x.type.tensor_type.elem_type = TensorProto.UINT8
    del g.value_info[:]
    path = f"{out_dir}/uint8.onnx"
    _save_checked(model, path)
    feed = dict(np.load(feed_path))
    first = feed[list(feed)[0]]
    lo, hi = first.min(), first.max()
    pixels = np.round((first - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    out = f"{out_dir}/uint8.inputs.npz"
    np.savez(out, **{raw: pixels})
    print(f"{path} {out}")


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def check(original, pruned, feed_path):
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(onnx.load(pruned), strict_mode=True, check_type=True)
    data = np.load(feed_path)
    want = session(original)
    feed = {i.name: data[i.name] for i in want.get_inputs()}
    expected = want.run(None, feed)
    got = session(pruned).run(None, feed)
    for i, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape or e.dtype != g.dtype:
            raise SystemExit(f"{pruned}: output {i} is {g.dtype}{list(g.shape)}, the original's {e.dtype}{list(e.shape)}")
    print(f"ok {pruned}")


def against(model, feed_path, computed_path):
    """Prints the largest difference between ONNX Runtime's outputs of MODEL on FEED and the
    arrays of COMPUTED (named like the outputs), each relative to that output's largest
    magnitude (at least 1)."""
    data, computed = np.load(feed_path), np.load(computed_path)
    s = session(model)
    feed = {i.name: data[i.name] for i in s.get_inputs()}
    worst = 0.0
    for meta, want in zip(s.get_outputs(), s.run(None, feed)):
        got = computed[meta.name]
        if got.shape != want.shape:
            raise SystemExit(f"output {meta.name}: {list(got.shape)} computed, {list(want.shape)} in ONNX Runtime")
        want, got = want.astype(np.float64), got.astype(np.float64)
        worst = max(worst, float(np.abs(want - got).max() / max(np.abs(want).max(), 1.0)))
    print(worst)


def samples(model, src, out, count="8"):
    """SRC's arrays with COUNT samples where the model has a batch axis (the saved one, each
    float copy perturbed by seeded noise), the others (FLUX's position ids) as they are: a
    calibration set larger than the batch many exports are traced at."""
    # A batch axis: the first, declared open or of size 1.
    first = {i.name: i.type.tensor_type.shape.dim[0] for i in onnx.load(model).graph.input if i.type.tensor_type.shape.dim}
    batch_inputs = {k for k, d in first.items() if d.dim_value in (0, 1)}
    rng = np.random.default_rng(0)
    result = {}
    for k, v in dict(np.load(src)).items():
        if v.ndim == 0 or k not in batch_inputs:
            result[k] = v
            continue
        rows = v[np.arange(int(count)) % v.shape[0]]
        result[k] = (rows + 0.1 * rng.standard_normal(rows.shape)).astype(v.dtype) if v.dtype.kind == "f" else rows
    np.savez(out, **result)
    print(out)


def main():
    command, *args = sys.argv[1:]
    commands = {"make": make, "legacy": legacy, "check": check, "against": against, "samples": samples}
    commands.update({"fp16": fp16, "qdq": qdq, "qoperator": qoperator, "uint8": uint8})
    commands[command](*args)


if __name__ == "__main__":
    main()
