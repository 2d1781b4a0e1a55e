"""ONNX Runtime engine: one InferenceSession per model artifact, run through IOBinding.

A run takes a batch of token rows (`(B, T)`: one step when T == 1, a prefill when
T > 1) and the batch's recurrent state, and returns the top `max_k` suggestible words
of the last position, optionally the full distribution (only for prefix completion),
and the new state. States cross the host/device boundary once per batch: inputs are
bound from host arrays, outputs are bound on the session's device and copied back once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.contract.artifact import (
    PROBS,
    TOKENS,
    TOPK_IDS,
    TOPK_PROBS,
    ArtifactError,
    ModelArtifact,
    state_inputs,
    state_outputs,
)

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_SHORT_NAMES = {"cuda": CUDA, "cpu": CPU, "tensorrt": "TensorrtExecutionProvider"}

State = tuple[np.ndarray, ...]  # (h,) or (h, c); each float32 (L, B, H)

# Where onnxruntime keeps its libraries (the CUDA provider's among them).
_CAPI_DIR = os.path.join(os.path.dirname(ort.__file__), "capi")
_PROBE_TIMEOUT_S = 120.0  # the driver's first initialisation can take seconds


@dataclass(frozen=True)
class CudaCheck:
    """Whether ONNX Runtime's CUDA provider can run here; if not, `reason` says why."""

    usable: bool
    reason: str = ""


@functools.cache
def check_cuda() -> CudaCheck:
    """Look for a usable CUDA GPU without asking ONNX Runtime (once per process).

    The driver, a device and the CUDA provider's libraries are checked in a child process
    (`service.engine.cuda_probe`): nothing they print reaches the console, and the
    provider's library is never loaded into this process outside ONNX Runtime.
    """
    if CUDA not in ort.get_available_providers():
        return CudaCheck(False, "this onnxruntime build has no CUDA provider")
    if os.name != "posix":  # the probe knows the Linux libraries only; let ONNX Runtime try
        return CudaCheck(True)
    from service.engine import cuda_probe

    try:
        done = subprocess.run(
            [sys.executable, "-I", cuda_probe.__file__, _CAPI_DIR],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CudaCheck(False, f"the CUDA check did not finish ({exc})")
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        return CudaCheck(bool(answer["usable"]), str(answer["reason"]))
    except (ValueError, IndexError, KeyError, TypeError):
        # A crash while loading the libraries (a signal: a negative status) lands here.
        return CudaCheck(False, f"the CUDA check failed (exit status {done.returncode})")


@dataclass(frozen=True)
class StepOutput:
    """What one run returns, for the last position of each row."""

    topk_probs: np.ndarray  # (B, K) float32, best first, suggestible words only
    topk_ids: np.ndarray  # (B, K) int64
    probs: np.ndarray | None  # (B, V) float32 full distribution, only when asked for
    state: State  # each (L, B, H) float32 (empty from a resident run, `ResidentOutput`)
    probs_at: np.ndarray | None = None  # (B, G) the distribution at ids a run was given
    # With the distribution of some rows only: `probs` has one row for each, and this maps
    # a batch row to its row of `probs` (-1: none). None: `probs` is (B, V).
    probs_index: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.topk_ids.shape[0])


def choose_providers(setting: str = "auto") -> list[str]:
    """Execution providers to request: "auto" is CUDA then CPU where CUDA is usable
    (`check_cuda`), else CPU; or the comma list `setting` names.

    A list naming CUDA where it is not usable is a ValueError that says why: asked for
    by name, CUDA is required, not silently replaced by CPU. `OrtModel.providers` is what
    a session really uses.
    """
    available = ort.get_available_providers()
    if setting.strip().lower() == "auto":
        return [CUDA, CPU] if check_cuda().usable else [CPU]
    chosen = []
    for name in (part.strip() for part in setting.split(",")):
        if not name:
            continue
        full = _SHORT_NAMES.get(name.lower(), name)
        if full not in available:
            raise ValueError(f"execution provider {name!r} is not available (have {available})")
        chosen.append(full)
    if not chosen:
        raise ValueError("no execution provider given")
    if CUDA in chosen and not (cuda := check_cuda()).usable:
        raise ValueError(
            f"providers {setting!r} ask for CUDA, which is not usable here: {cuda.reason} "
            '(use "auto" to fall back to CPU)'
        )
    return chosen


def default_threads() -> int:
    """ONNX Runtime threads per run: every core (measured on 2 cores: +36% end-to-end
    WebSocket throughput over one thread, once idle threads no longer spin)."""
    return os.cpu_count() or 1


class OrtModel:
    """One model artifact served by one ONNX Runtime InferenceSession."""

    def __init__(
        self,
        artifact: ModelArtifact,
        providers: Sequence[str],
        intra_op_threads: int = 0,
        *,
        allow_tf32: bool = False,
    ) -> None:
        self.artifact = artifact
        self.name = artifact.name
        self.revision = artifact.revision
        self.cell = artifact.cell
        self.vocab = artifact.vocab
        self.eos_id = artifact.vocab.eos_id
        self.layers = artifact.layers
        self.hidden_size = artifact.hidden_size
        self.state_inputs = state_inputs(self.cell)
        self.state_outputs = state_outputs(self.cell)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or default_threads()
        # Idle pool threads spin-wait by default, taking a core from the event loop
        # between runs (measured under load: +22% end-to-end throughput without it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in (artifact.manifest.get("session_config") or {}).items():
            options.add_session_config_entry(str(key), str(value))
        requested = list(providers)
        if CUDA in requested:
            # A CUDA provider that fails to start despite `check_cuda` (an unsupported GPU,
            # say) is logged by ORT at error level on every attempt; the fallback is
            # reported below in words.
            ort.set_default_logger_severity(4)
        # ORT's CUDA provider uses TF32 by default: max abs difference to CPU 1.3e-3 (LSTM) /
        # 5.8e-4 (GRU), past the 1e-4 invariants; use_tf32=0: 8e-8 / 4e-8 (H200,
        # onnxruntime-gpu 1.31.1).
        cuda_options = {"use_tf32": "1" if allow_tf32 else "0"}
        self.allow_tf32 = allow_tf32
        self._options = options
        self._providers: list[str | tuple[str, dict[str, str]]] = [
            (name, cuda_options) if name == CUDA else name for name in requested
        ]
        try:
            self.session = ort.InferenceSession(
                str(artifact.onnx_path), options, providers=self._providers
            )
        finally:
            ort.set_default_logger_severity(2)
        # The manifest's unhashed fields against the graph: an error naming the files.
        artifact.check_graph(
            {i.name: i.shape for i in self.session.get_inputs()},
            {o.name: o.shape for o in self.session.get_outputs()},
        )
        self.providers: list[str] = self.session.get_providers()
        self.on_cuda = self.providers[0] == CUDA
        # Why CUDA was asked for and not given (None: it was given, or not asked for).
        self.cuda_fallback: str | None = None
        if CUDA in requested and not self.on_cuda:
            self.cuda_fallback = "ONNX Runtime could not start its CUDA provider"
            # Later sessions of this model (the state pool's) ask only for what this got.
            self._providers = list(self.providers)
        have = {i.name for i in self.session.get_inputs()} | {
            o.name for o in self.session.get_outputs()
        }
        want = {TOKENS, *self.state_inputs, *self.state_outputs, TOPK_PROBS, TOPK_IDS, PROBS}
        if want - have:
            raise ArtifactError(f"{artifact.onnx_path}: graph lacks {sorted(want - have)}")

        self.max_k = artifact.max_k
        # The context of every text starts after an implicit end of sentence.
        self.start = self.run(
            np.array([[self.vocab.eos_id]], dtype=np.int64), self.zero_state(1), want_probs=True
        )

    def describe_providers(self, cuda_wanted: bool) -> str:
        """Where this model runs and, if CUDA was wanted and is not used, why (one line)."""
        where = f"model {self.name} ({self.cell}) runs on {', '.join(self.providers)}"
        if self.on_cuda or not cuda_wanted:
            return where
        why = self.cuda_fallback or check_cuda().reason
        return f"{where}; CUDA not used: {why}"

    def new_session(self, model: bytes) -> ort.InferenceSession:
        """Another graph on this model's providers and options (the state pool's)."""
        return ort.InferenceSession(model, self._options, providers=self._providers)

    def zero_state(self, batch: int) -> State:
        """An all-zero state for `batch` rows."""
        shape = (self.layers, batch, self.hidden_size)
        return tuple(np.zeros(shape, dtype=np.float32) for _ in self.state_inputs)

    def run(self, tokens: np.ndarray, state: State, want_probs: bool = False) -> StepOutput:
        """Run `tokens` (B, T) int64 from `state` (each (L, B, H)); B >= 1, T >= 1."""
        batch = tokens.shape[0]
        if tokens.ndim != 2 or batch == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty (B, T) array, got {tokens.shape}")
        for array in state:
            if array.shape != (self.layers, batch, self.hidden_size):
                raise ValueError(f"state of shape {array.shape} for a batch of {batch}")
        binding = self.session.io_binding()
        inputs = [(TOKENS, np.ascontiguousarray(tokens, dtype=np.int64))]
        inputs += [
            (name, np.ascontiguousarray(array, dtype=np.float32))
            for name, array in zip(self.state_inputs, state)
        ]
        device = "cuda" if self.on_cuda else "cpu"
        for name, array in inputs:
            if self.on_cuda:
                # One host-to-device copy per input and batch.
                binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
                )
            else:
                binding.bind_cpu_input(name, array)
        outputs = [*self.state_outputs, TOPK_PROBS, TOPK_IDS] + ([PROBS] if want_probs else [])
        for name in outputs:
            binding.bind_output(name, device)
        self.session.run_with_iobinding(binding)
        values = dict(zip(outputs, binding.copy_outputs_to_cpu()))
        return StepOutput(
            topk_probs=values[TOPK_PROBS],
            topk_ids=values[TOPK_IDS],
            probs=values.get(PROBS),
            state=tuple(values[name] for name in self.state_outputs),
        )


def top_words(
    output: StepOutput,
    row: int,
    k: int,
    candidates: np.ndarray | None = None,
    slips: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` (ids, probabilities) of one row, best first.

    Without `candidates` they come from the graph's top-k; with them (the sorted ids of
    the words matching a prefix) from the full distribution restricted to those ids,
    ranked by probability times `slips` (each candidate's slip likelihood) when given.
    """
    if candidates is None:
        return output.topk_ids[row, :k], output.topk_probs[row, :k]
    if output.probs is None:
        raise ValueError("prefix completion needs a run with want_probs=True")
    if output.probs_index is not None:
        row = int(output.probs_index[row])
        if row < 0:
            raise ValueError("prefix completion of a row whose distribution was not asked for")
    scores = output.probs[row, candidates]
    rank_by = scores if slips is None else scores * slips
    if k < len(candidates):
        best = np.argpartition(-rank_by, k - 1)[:k]
    else:
        best = np.arange(len(candidates))
    # Stable on ties: equal probabilities keep the vocabulary's id order.
    best = best[np.lexsort((candidates[best], -rank_by[best]))]
    return candidates[best], scores[best]
