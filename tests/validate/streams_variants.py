"""Variants of the shared tiny FLUX model for the dual-to-single stream tests, made at test time.

    streams_variants.py equal SRC OUT
        Writes OUT: SRC with as many text tokens as image tokens (64). The exporter traced the
        text length into constants (Reshape targets naming the joint length 72, the Slices of
        the joint sequence back into the streams at 8), which are rewritten to 128 and 64; the
        `encoder_hidden_states` and `txt_ids` inputs get 64 rows. Recorded intermediate shapes
        are dropped (they name the old lengths).

    streams_variants.py masked_split SRC OUT
        Writes OUT: SRC where every dual-stream block slices its attention output back into the
        streams with one `Split` (instead of two Slices), and every attention (dual and single
        stream) adds a joint additive mask to its scores before the Softmax: a new input
        `txt_mask` f32[1, 8] (0 keeps a text token, a large negative value masks it),
        concatenated with zeros for the image tokens and reshaped to [1, 1, 1, 72].

Every variant is checked with the full ONNX checker before it is written. Prints OUT.
"""

import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

TEXT, IMAGE = 8, 64


def constant_value(node):
    return numpy_helper.to_array(node.attribute[0].t)


def set_constant(node, array):
    node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.asarray(array, dtype=np.int64), node.attribute[0].t.name))


def equal(model):
    g = model.graph
    readers = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            readers.setdefault(x, []).append((n, i))
    joint, new_joint = TEXT + IMAGE, 2 * IMAGE
    for n in g.node:
        if n.op_type != "Constant" or not n.attribute or n.attribute[0].t.data_type != onnx.TensorProto.INT64:
            continue
        v = constant_value(n)
        uses = {(r.op_type, i) for r, i in readers.get(n.output[0], [])}
        if v.ndim == 1 and v.size == 5 and v[1] == joint and uses <= {("Reshape", 1)}:
            v = v.copy()
            v[1] = new_joint
            set_constant(n, v)
        elif v.tolist() == [joint] and uses <= {("Slice", 2)}:
            set_constant(n, [new_joint])
        elif v.tolist() == [TEXT] and uses and uses <= {("Slice", 1), ("Slice", 2)}:
            set_constant(n, [IMAGE])
    for i in g.input:
        dims = i.type.tensor_type.shape.dim
        if i.name == "encoder_hidden_states":
            dims[1].dim_value = IMAGE
        if i.name == "txt_ids":
            dims[0].dim_value = IMAGE
    del g.value_info[:]
    return model


def masked_split(model):
    g = model.graph
    nodes = list(g.node)
    by_name = {n.name: n for n in nodes}
    out = []
    mask_in = helper.make_tensor_value_info("txt_mask", onnx.TensorProto.FLOAT, [1, TEXT])
    g.input.append(mask_in)
    g.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((1, IMAGE), np.float32), "streams_variant.image_mask"),
            numpy_helper.from_array(np.array([1, 1, 1, TEXT + IMAGE], np.int64), "streams_variant.mask_shape"),
            numpy_helper.from_array(np.array([TEXT, IMAGE], np.int64), "streams_variant.split"),
        ]
    )
    # One joint mask for the whole model, as an exporter writes it from the pipeline's mask.
    out.append(helper.make_node("Concat", ["txt_mask", "streams_variant.image_mask"], ["streams_variant.joint_mask"], name="/m/mask/Concat", axis=1))
    out.append(helper.make_node("Reshape", ["streams_variant.joint_mask", "streams_variant.mask_shape"], ["streams_variant.mask"], name="/m/mask/Reshape"))
    splits = {}
    for block in range(3):
        t, i = by_name[f"/m/transformer_blocks.{block}/attn/Slice_16"], by_name[f"/m/transformer_blocks.{block}/attn/Slice_17"]
        assert t.input[0] == i.input[0]
        splits[t.name] = helper.make_node(
            "Split", [t.input[0], "streams_variant.split"], [t.output[0], i.output[0]], name=f"/m/transformer_blocks.{block}/attn/Split_streams", axis=1
        )
        splits[i.name] = None
    for n in nodes:
        if n.name in splits:
            if splits[n.name] is not None:
                out.append(splits[n.name])
            continue
        if n.op_type == "Softmax":
            masked = n.input[0] + "/masked"
            out.append(helper.make_node("Add", [n.input[0], "streams_variant.mask"], [masked], name=n.name + "/mask_Add"))
            n.input[0] = masked
        out.append(n)
    # The removed Slices' bounds are read by nothing now.
    read = {x for n in out for x in n.input} | {o.name for o in g.output}
    out = [n for n in out if n.op_type != "Constant" or any(o in read for o in n.output)]
    del g.node[:]
    g.node.extend(out)
    del g.value_info[:]
    return model


def main():
    kind, src, dst = sys.argv[1:4]
    model = onnx.load(src)
    model = {"equal": equal, "masked_split": masked_split}[kind](model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, dst)
    print(dst)


if __name__ == "__main__":
    main()
