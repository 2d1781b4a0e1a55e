"""Review of the pool's TopK with K as an input (`service.engine.pool.TOP_K`): the pool
relies on ONNX Runtime's TopK ordering ties by the lower index, so that the best k of
any wider K are the same words in the same order. Checked on ONNX Runtime itself, on
rows full of ties, for every k from 1 to a max_k wider than some rows' distinct values."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def _topk_session() -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1)],
        "topk",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "v"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["b", "k"]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["b", "k"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def test_any_k_is_the_first_k_of_a_wider_one_with_ties_by_lower_id() -> None:
    session = _topk_session()
    rng = np.random.default_rng(7)
    vocab, max_k = 3000, 50
    # Rows of few distinct values (ties everywhere), one constant row, and a row of
    # softmax-like probabilities where a handful tie.
    x = rng.integers(0, 4, size=(64, vocab)).astype(np.float32) / 4
    x[0] = 0.25
    x[1] = rng.random(vocab).astype(np.float32)
    x[1, [5, 900, 2999]] = 2.0
    wide_values, wide_ids = session.run(None, {"x": x, "k": np.array([max_k], np.int64)})
    for row, ids, values in zip(x, wide_ids, wide_values):
        # The reference: by value descending, then by id ascending.
        want = np.lexsort((np.arange(vocab), -row))[:max_k]
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(values, row[want])
    for k in range(1, max_k + 1):
        values, ids = session.run(None, {"x": x, "k": np.array([k], np.int64)})
        np.testing.assert_array_equal(ids, wide_ids[:, :k])
        np.testing.assert_array_equal(values, wide_values[:, :k])
