"""Review of the pool's TopK with K as an input (`service.engine.pool.TOP_K`): the pool
relies on ONNX Runtime's TopK ordering ties by the lower index, so that the best k of
any wider K are the same words in the same order. Checked on ONNX Runtime itself, on
rows full of ties, for every k from 1 to a max_k wider than some rows' distinct values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.contract.artifact import TOPK_PROBS, ModelArtifact
from service.engine.pool import StatePool
from service.engine.runtime import OrtModel
from tests.engine.test_pool import random_states


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


def test_a_graph_whose_top_k_is_not_one_topk_keeps_its_k_in_the_pool(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose top-k probabilities pass through another node after TopK (not an
    export of ours): the pool still builds, its top-k arrays are max_k wide whatever
    `top` asks, and their first words are what the copied run answers."""
    model = OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), ["CPUExecutionProvider"])
    real_load = onnx.load

    def load(path: str, *a: Any, **kw: Any) -> onnx.ModelProto:
        proto = real_load(path, *a, **kw)
        (topk,) = [n for n in proto.graph.node if n.op_type == "TopK"]
        at = list(topk.output).index(TOPK_PROBS)
        topk.output[at] = "topk_probs_raw"
        proto.graph.node.append(helper.make_node("Identity", ["topk_probs_raw"], [TOPK_PROBS]))
        return proto

    monkeypatch.setattr(onnx, "load", load)
    pool = StatePool(model, 16)
    monkeypatch.undo()
    rng = np.random.default_rng(4)
    states = random_states(model, 3, seed=4)
    rows = pool.upload(states)
    tokens = rng.integers(3, len(model.vocab), size=(3, 1))
    out = pool.run(tokens, rows, want_probs=False, top=3)
    assert out.topk_ids.shape == (3, model.max_k)
    host = tuple(np.stack([s[i] for s in states], axis=1) for i in range(len(states[0])))
    copied = model.run(tokens, host, want_probs=False)
    np.testing.assert_array_equal(out.topk_ids, copied.topk_ids)
    pool.release(np.concatenate([rows, out.rows]))
