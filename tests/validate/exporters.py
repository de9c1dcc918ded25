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


def main():
    command, *args = sys.argv[1:]
    {"make": make, "legacy": legacy, "check": check}[command](*args)


if __name__ == "__main__":
    main()
