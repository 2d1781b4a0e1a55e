"""ONNX export of a trained model into a servable artifact (see service/artifact.py).

The graph takes `tokens` (B, T) and the state, and returns the new state, the top
`max_k` suggestible words of the last position (`topk_probs`, `topk_ids`) and the
full distribution of the last position (`probs`, fetched only for prefix completion).
Export uses the legacy TorchScript exporter (`dynamo=False`): it keeps native
`LSTM`/`GRU` nodes with dynamic batch and seq axes, where torch 2.13's default
exporter silently fixes the seq axis. Parity with torch is checked at several
shapes and an artifact that fails is never written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model_export.model import RNNLM
from service.contract.artifact import (
    DISPLAY_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    PAIR_DISPLAY_FILE,
    PROBS,
    TOKENS,
    TOPK_IDS,
    TOPK_PROBS,
    VOCAB_FILE,
    state_inputs,
    state_outputs,
    write_display_forms,
    write_manifest,
    write_pair_forms,
)
from service.contract.vocab import Vocabulary

OPSET = 17
MAX_K = 50
PARITY_SHAPES = ((1, 1), (3, 7), (8, 1), (2, 33))
PARITY_TOLERANCE = 1e-4
# int8 weights cannot meet the float tolerance; on the random (batch, seq) probes (random
# words from a random state) the models differ by 0.01-0.07 in a probability or a state
# value, and the 3,000-step 20k-word GRU by 0.101 after 33 random words. This bound
# catches a broken graph (off by ~1); what int8 costs in accuracy is measured by
# `nextword evaluate` (the manifests' `metrics` against `metrics_float32`).
INT8_TOLERANCE = 0.15


class ExportError(RuntimeError):
    """The exported graph does not behave like the torch model; nothing was written."""


class ServingGraph(nn.Module):
    """What the service runs: one step or a prefill, answering for the last position."""

    def __init__(self, model: RNNLM, suggestible: np.ndarray, max_k: int = MAX_K) -> None:
        super().__init__()
        self.model = model
        self.cell = model.config.cell
        self.max_k = min(max_k, int(suggestible.sum()))
        self.suggest: torch.Tensor
        self.register_buffer("suggest", torch.tensor(suggestible, dtype=torch.float32))

    def forward(self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None = None):
        state: tuple[torch.Tensor, ...] = (h0, c0) if c0 is not None else (h0,)
        y, new_state = self.model.features(tokens, state)  # (B, T, E)
        logits = self.model.decoder(y[:, -1, :])  # (B, V): only the last position is needed
        probs = torch.softmax(logits, dim=-1)
        # Specials and punctuation get score 0, so the top k are words; values stay
        # the model's real (not renormalised) probabilities.
        topk_probs, topk_ids = torch.topk(probs * self.suggest, self.max_k, dim=-1)
        return (*new_state, topk_probs, topk_ids, probs)


def output_names(cell: str) -> list[str]:
    return [*state_outputs(cell), TOPK_PROBS, TOPK_IDS, PROBS]


def _example(
    graph: ServingGraph, batch: int, seq: int, vocab_size: int
) -> tuple[torch.Tensor, ...]:
    cfg = graph.model.config
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    tokens = torch.randint(0, vocab_size, (batch, seq), generator=g)
    states = [
        torch.randn(cfg.layers, batch, cfg.hidden_size, generator=g) * 0.5
        for _ in state_inputs(cfg.cell)
    ]
    return (tokens, *states)


def export_onnx(graph: ServingGraph, path: Path) -> None:
    """Write the graph with named inputs/outputs and dynamic batch and seq axes."""
    cell = graph.cell
    inputs = [TOKENS, *state_inputs(cell)]
    outputs = output_names(cell)
    axes: dict[str, dict[int, str]] = {TOKENS: {0: "batch", 1: "seq"}}
    axes.update({name: {1: "batch"} for name in state_inputs(cell) + state_outputs(cell)})
    axes.update({name: {0: "batch"} for name in (TOPK_PROBS, TOPK_IDS, PROBS)})
    example = _example(graph, 2, 3, graph.model.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def check_parity(
    graph: ServingGraph,
    path: Path,
    shapes=PARITY_SHAPES,
    tolerance: float = PARITY_TOLERANCE,
    session_config: dict[str, str] | None = None,
) -> dict[str, float]:
    """Run torch and ONNX Runtime at several (batch, seq) shapes; max abs difference per shape."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    report: dict[str, float] = {}
    for batch, seq in shapes:
        example = _example(graph, batch, seq, graph.model.config.vocab_size)
        with torch.inference_mode():
            expected = [t.numpy() for t in graph(*example)]
        got = session.run(output_names(graph.cell), dict(zip(names, (t.numpy() for t in example))))
        diff = 0.0
        for name, want, have in zip(output_names(graph.cell), expected, got):
            if want.shape != have.shape:
                raise ExportError(
                    f"{path}: output {name} has shape {have.shape} at (batch={batch}, "
                    f"seq={seq}), torch gives {want.shape}"
                )
            if name == TOPK_IDS:
                continue  # ids may swap on ties; their probabilities are compared instead
            diff = max(diff, float(np.abs(want.astype(np.float64) - have).max()))
        report[f"{batch}x{seq}"] = diff
        if diff > tolerance:
            raise ExportError(
                f"{path}: max abs difference {diff:.2e} > {tolerance:.0e} "
                f"at (batch={batch}, seq={seq})"
            )
    return report


# ONNX Runtime folds DequantizeLinear of constant weights at load time only with this
# entry set; the engine applies the manifest's "session_config" to its SessionOptions.
INT8_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


def quantize_int8(src: Path, dst: Path, min_elements: int = 4096) -> dict[str, int]:
    """Store every large float weight as int8 with per-channel scales + DequantizeLinear.

    `onnxruntime.quantization.quantize_dynamic` cannot be used here: it quantises the
    tied embedding twice (Gather and Gemm want different layouts) and breaks the
    Gather, and it leaves GRU weights in float32. With per-channel symmetric int8
    storage the file is ~4x smaller for both cells, and ONNX Runtime folds the weights
    back to float32 when the session is created (see INT8_SESSION_CONFIG), so
    serving speed is that of the float model.
    """
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    model = onnx.load(str(src))
    graph = model.graph
    kept, dequantize = [], []
    counts = {"quantized_weights": 0, "quantized_elements": 0}
    for init in graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.ndim < 2 or w.size < min_elements:
            kept.append(init)
            continue
        axis = 0 if w.ndim == 2 else 1  # rows of a matrix; gates*hidden of an RNN weight
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=reduce) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        kept += [
            numpy_helper.from_array(q, f"{init.name}_int8"),
            numpy_helper.from_array(scale, f"{init.name}_scale"),
        ]
        dequantize.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{init.name}_int8", f"{init.name}_scale"],
                [init.name],
                axis=axis,
                name=f"{init.name}_dequantize",
            )
        )
        counts["quantized_weights"] += 1
        counts["quantized_elements"] += int(w.size)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantize + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return counts


def export_artifact(
    model: RNNLM,
    vocab: Vocabulary,
    out: Path | str,
    *,
    name: str | None = None,
    int8: bool = False,
    extra: dict[str, Any] | None = None,
    max_k: int = MAX_K,
    display_forms: dict[str, str] | None = None,
    pair_forms: dict[tuple[str, str], str] | None = None,
) -> dict[str, Any]:
    """Export, verify and write an artifact directory; returns its manifest.

    `display_forms` and `pair_forms` (from `model_export.casing`) become display.tsv and
    display_pairs.tsv when given.

    The directory is assembled in a temporary place and moved into `out` only after
    every check passed.
    """
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415

    out = Path(out)
    model = model.eval()
    graph = ServingGraph(model, vocab.suggestible, max_k).eval()
    steps = tqdm(total=4 if int8 else 3, desc=f"export {out.name}", unit="stage")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fp32 = tmp / "model.fp32.onnx"
        export_onnx(graph, fp32)
        onnx.checker.check_model(str(fp32))
        steps.update(1)
        parity = check_parity(graph, fp32)
        steps.update(1)
        quant: dict[str, Any] | None = None
        stage = tmp / "artifact"
        stage.mkdir()
        if int8:
            counts = quantize_int8(fp32, stage / MODEL_FILE)
            # int8 cannot meet the float tolerance: check shapes and a loose bound here;
            # what it costs in accuracy is measured by `nextword evaluate`.
            loose = check_parity(
                graph,
                stage / MODEL_FILE,
                tolerance=INT8_TOLERANCE,
                session_config=INT8_SESSION_CONFIG,
            )
            quant = {
                "type": "int8-weights",
                "scheme": "symmetric per-channel, DequantizeLinear folded to float32 at load",
                **counts,
                "max_abs_diff": loose,
                "fp32_bytes": fp32.stat().st_size,
            }
            steps.update(1)
        else:
            shutil.copyfile(fp32, stage / MODEL_FILE)
        vocab.save(stage / VOCAB_FILE)
        files: dict[str, Any] = {MODEL_FILE: {}, VOCAB_FILE: {}}
        if display_forms:
            write_display_forms(stage / DISPLAY_FILE, display_forms)
            files[DISPLAY_FILE] = {}
        if pair_forms:
            write_pair_forms(stage / PAIR_DISPLAY_FILE, pair_forms)
            files[PAIR_DISPLAY_FILE] = {}
        cfg = model.config
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": name or out.name,
            "cell": cfg.cell,
            "vocab_size": cfg.vocab_size,
            "embedding_size": cfg.embedding_size,
            "hidden_size": cfg.hidden_size,
            "layers": cfg.layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_k": graph.max_k,
            "inputs": [TOKENS, *state_inputs(cfg.cell)],
            "outputs": output_names(cfg.cell),
            "tokenizer": {
                "name": "nextword-words",
                "version": 1,
                "lowercase": True,
                "normalization": "NFKC",
                "sentence_end": ".!?… -> </s>",
                "start_token": "</s>",
                "specials": {"pad": "<pad>", "unk": "<unk>", "eos": "</s>"},
            },
            "quantization": quant,
            "session_config": INT8_SESSION_CONFIG if int8 else {},
            "parity_max_abs_diff": parity,
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "opset": OPSET,
                "onnxruntime": onnxruntime.__version__,
            },
            **(extra or {}),
            "files": files,
        }
        write_manifest(stage, manifest)
        steps.update(1)
        steps.close()
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stage, out)
    return json.loads((out / "manifest.json").read_text())
