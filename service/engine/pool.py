"""The resident state pool: session states kept on the model's device between steps.

A `StatePool` is a fixed number of rows, each one recurrent state after some token (the
(L, H) arrays of every state input: h, or h and c), in one (rows, L, H) float32 tensor
per state input on the session's device: GPU memory on CUDA, host memory on CPU (the
same code). A resident session holds two rows: the state after its last token and the
state before it (`service.engine.residency`).

Rows are plain ints (numpy int64 arrays for a batch), and the pool is their one owner:
it keeps an explicit reference count per row (in the style of vLLM's BlockPool). `take`
hands out free rows held once each, `hold` and `release` add and drop a hold (vectorised,
a row may appear several times), `pin` holds rows for good (the start and zero states);
a row is free again exactly when its count reaches 0. Who holds what is written down in
`residency` (a session's two rows, a batch's rows in flight, a long step's carried row),
and every route a step can end by gives its holds back there: nothing rides on the
garbage collector.

Rows are write-once: a run gathers its batch's input rows on the device, runs the model
and scatters the new states into rows it has just taken, so a row never changes while
anyone holds it.

Per batch only the token ids and the row numbers go in, and only the top-k (and, for
rows that ask for it, the full distribution) comes out. The gather, the model and the
scatter are one ONNX graph (the model's graph with a Gather before each state input
and a ScatterND after each state output), run with IOBinding: the pool tensors are
bound as both input and output, and ONNX Runtime's ScatterND (CUDA and CPU) writes in
place when they are one buffer, so a step costs its rows, not the pool. Two small
graphs copy rows from and to host memory (a session spilled to the host, or kept by a
store that serializes states, such as Redis).

The pool has a fixed size (`rows`): when it runs short, the residency spills its least
recently used sessions to host memory (`Residency.spill`), and they come back on their
next step.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service.arrays import stack_rows
from service.contract.artifact import PROBS, TOKENS, TOPK_IDS, TOPK_PROBS
from service.engine.runtime import OrtModel, State, StepOutput

log = logging.getLogger(__name__)

FROM_ROWS = "nextword_from_rows"  # (B,) int64: the rows the batch starts from
TO_ROWS = "nextword_to_rows"  # (B,) int64: the rows its new states go to
GATHER_IDS = "nextword_gather_ids"  # (B, G) int32: vocabulary ids whose probabilities ...
PROBS_AT = "nextword_probs_at"  # (B, G) float32: ... come out (the writer's words)
PROBS_ROWS = "nextword_probs_rows"  # (P,) int64: rows whose whole distribution ...
PROBS_OF_ROWS = "nextword_probs_of_rows"  # (P, V) float32: ... comes out (prefixes)
TOP_K = "nextword_top_k"  # (1,) int64: how many of the best words come out (1..max_k)
_STATES = "nextword_states"  # host states to upload, one per state input


def _pool_name(i: int) -> str:
    return f"nextword_pool{i}"


def _pool_out(i: int) -> str:
    return f"nextword_pool{i}_out"


@dataclass(frozen=True)
class ResidentOutput(StepOutput):
    """A resident run's answer: the new states stay on the device, one fresh row per
    batch row (`rows`, int64, each held once for the caller), and `state` is empty."""

    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


class PoolExhausted(RuntimeError):
    """No free row: every row holds a live session or a step in flight."""


def _tensor(name: str, elem: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def resident_graph(
    model: onnx.ModelProto, state_inputs: Sequence[str], state_outputs: Sequence[str]
) -> onnx.ModelProto:
    """The model's graph reading its states from pool rows and writing them back.

    Inputs: the tokens, `FROM_ROWS`, `TO_ROWS`, `GATHER_IDS`, `PROBS_ROWS`, `TOP_K` and
    one pool (rows, L, H) per state input; outputs: the model's outputs but the states (the
    top-k ones `TOP_K` wide), `PROBS_AT` (the distribution at `GATHER_IDS`, row by row),
    `PROBS_OF_ROWS` (the distributions of the rows `PROBS_ROWS` names) and each pool
    (`_pool_out(i)`, to be bound to the input pool's buffer).

    `TOP_K` replaces the graph's constant K (its `max_k`): a batch whose steps ask for 5
    words selects 5, not 50 (TopK over (B, V) costs ~6% of the LSTM's run at K=50, and
    most of that goes with K). ONNX's TopK orders ties by the lower index, a total order,
    so the best k of any K >= k are the same words with the same probabilities. (A graph
    whose top-k outputs do not come straight from one TopK keeps its K: `TOP_K` is then
    read by nothing, and the top-k arrays are max_k wide.)"""
    resident = onnx.ModelProto()
    resident.CopyFrom(model)
    graph = resident.graph
    inputs = {i.name: i for i in graph.input}
    shapes = []
    for name in state_inputs:
        dims = inputs[name].type.tensor_type.shape.dim
        shapes.append((dims[0].dim_value, dims[2].dim_value))  # (L, B, H): L and H fixed
    kept_inputs = [i for i in graph.input if i.name not in state_inputs]
    kept_outputs = [o for o in graph.output if o.name not in state_outputs]
    outputs = {o.name: o for o in graph.output}
    del graph.input[:]
    del graph.output[:]
    graph.input.extend(kept_inputs)
    graph.input.extend([_tensor(FROM_ROWS, TensorProto.INT64, ["batch"])])
    graph.input.extend([_tensor(TO_ROWS, TensorProto.INT64, ["batch"])])
    graph.input.extend([_tensor(GATHER_IDS, TensorProto.INT32, ["batch", "gathered"])])
    graph.input.extend([_tensor(PROBS_ROWS, TensorProto.INT64, ["some"])])
    graph.input.extend([_tensor(TOP_K, TensorProto.INT64, [1])])
    topks = [n for n in graph.node if n.op_type == "TopK" and TOPK_PROBS in n.output]
    if len(topks) == 1:  # else (not an export of ours) `TOP_K` is unread: max_k wide
        constant_k, topks[0].input[1] = topks[0].input[1], TOP_K
        _drop_unused(graph, constant_k)  # ORT warns of an unused initializer
    front, back = [], []
    axes = "nextword_axes1"
    graph.initializer.append(helper.make_tensor(axes, TensorProto.INT64, [1], [1]))
    to_index = "nextword_to_index"
    back.append(helper.make_node("Unsqueeze", [TO_ROWS, axes], [to_index]))
    for i, (name_in, name_out, (layers, hidden)) in enumerate(
        zip(state_inputs, state_outputs, shapes)
    ):
        pool, gathered, moved = _pool_name(i), f"nextword_gathered{i}", f"nextword_moved{i}"
        graph.input.extend([_tensor(pool, TensorProto.FLOAT, ["rows", layers, hidden])])
        front.append(helper.make_node("Gather", [pool, FROM_ROWS], [gathered], axis=0))
        front.append(helper.make_node("Transpose", [gathered], [name_in], perm=[1, 0, 2]))
        back.append(helper.make_node("Transpose", [name_out], [moved], perm=[1, 0, 2]))
        back.append(helper.make_node("ScatterND", [pool, to_index, moved], [_pool_out(i)]))
        graph.output.extend([_tensor(_pool_out(i), TensorProto.FLOAT, ["rows", layers, hidden])])
    graph.output.extend(kept_outputs)
    for output in graph.output:
        if output.name in (TOPK_PROBS, TOPK_IDS):
            output.type.tensor_type.shape.dim[1].dim_param = "top_k"  # was max_k
    back.append(helper.make_node("GatherElements", [PROBS, GATHER_IDS], [PROBS_AT], axis=1))
    graph.output.extend([_tensor(PROBS_AT, TensorProto.FLOAT, ["batch", "gathered"])])
    back.append(helper.make_node("Gather", [PROBS, PROBS_ROWS], [PROBS_OF_ROWS], axis=0))
    vocab = outputs[PROBS].type.tensor_type.shape.dim[1].dim_value
    graph.output.extend([_tensor(PROBS_OF_ROWS, TensorProto.FLOAT, ["some", vocab])])
    nodes = [*front, *graph.node, *back]
    del graph.node[:]
    graph.node.extend(nodes)
    return resident


def _drop_unused(graph: onnx.GraphProto, name: str) -> None:
    """Remove the Constant node or initializer `name` if nothing reads it."""
    if any(name in n.input for n in graph.node) or name in {o.name for o in graph.output}:
        return
    kept = [n for n in graph.node if not (n.op_type == "Constant" and name in n.output)]
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    kept_init = [i for i in graph.initializer if i.name != name]
    if len(kept_init) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept_init)


def _copy_graphs(
    shapes: Sequence[tuple[int, int]], opset: int
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(download, upload): rows of each pool out to (B, L, H) arrays, and arrays into rows."""
    rows = _tensor(FROM_ROWS, TensorProto.INT64, ["batch"])
    pools = [
        _tensor(_pool_name(i), TensorProto.FLOAT, ["rows", layers, hidden])
        for i, (layers, hidden) in enumerate(shapes)
    ]
    states = [
        _tensor(f"{_STATES}{i}", TensorProto.FLOAT, ["batch", layers, hidden])
        for i, (layers, hidden) in enumerate(shapes)
    ]
    gather = [
        helper.make_node("Gather", [_pool_name(i), FROM_ROWS], [f"{_STATES}{i}"], axis=0)
        for i in range(len(shapes))
    ]
    download = helper.make_graph(gather, "nextword_download", [*pools, rows], states)
    axes = helper.make_tensor("nextword_axes1", TensorProto.INT64, [1], [1])
    scatter = [helper.make_node("Unsqueeze", [FROM_ROWS, "nextword_axes1"], ["index"])]
    scatter += [
        helper.make_node("ScatterND", [_pool_name(i), "index", f"{_STATES}{i}"], [_pool_out(i)])
        for i in range(len(shapes))
    ]
    outs = [
        _tensor(_pool_out(i), TensorProto.FLOAT, ["rows", layers, hidden])
        for i, (layers, hidden) in enumerate(shapes)
    ]
    upload = helper.make_graph(
        scatter, "nextword_upload", [*pools, rows, *states], outs, initializer=[axes]
    )
    opsets = [helper.make_opsetid("", opset)]
    return (
        helper.make_model(download, opset_imports=opsets, ir_version=8),
        helper.make_model(upload, opset_imports=opsets, ir_version=8),
    )


def device_free_bytes() -> int | None:
    """Free memory of CUDA device 0 (cudaMemGetInfo through the CUDA runtime ONNX Runtime
    loaded), None where it cannot be asked."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if runtime.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
        return None
    return None


def row_bytes(model: OrtModel) -> int:
    """Bytes of one pool row of `model`: every state input's (L, H) float32."""
    return len(model.state_inputs) * model.layers * model.hidden_size * 4


def pool_rows(
    setting: int, session_cap: int, max_batch: int, row_bytes: int, budget: int | None
) -> int:
    """Rows of a model's pool: `setting`, or (0) two per session up to the cap and room for
    the batches in flight, within `budget` bytes (None: no bound). At least the rows of
    the batches in flight, or a ValueError when `setting` gives fewer."""
    least = 8 * max_batch + 16  # two batches in flight, four rows a step at most
    if setting:
        if setting < least:
            raise ValueError(
                f"NEXTWORD_STATE_POOL_ROWS={setting} is below {least}, the rows of the "
                f"batches in flight at max_batch={max_batch}"
            )
        return setting
    rows = 2 * session_cap + least
    if budget is not None:
        rows = min(rows, budget // row_bytes)
    return max(rows, least)


def _distinct(rows: np.ndarray) -> np.ndarray:
    """`np.unique(rows)` (sorted, each row once) for a batch's rows: a sort and a compare,
    a third of `np.unique`'s time on a few hundred rows (numpy 2.4)."""
    ordered = np.sort(rows)
    first = np.empty(len(ordered), dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


class StatePool:
    """A model's rows of resident states and the three graphs that use them."""

    def __init__(self, model: OrtModel, rows: int) -> None:
        if rows < 2:
            raise ValueError("a state pool needs at least 2 rows")
        self.model = model
        self.rows = rows
        self.kinds = len(model.state_inputs)
        self.layers = model.layers
        self.hidden = model.hidden_size
        self.device = "cuda" if model.on_cuda else "cpu"
        shape = (rows, self.layers, self.hidden)
        self.row_bytes = row_bytes(model)
        self._host: list[np.ndarray] = []  # the CPU pool's memory (the OrtValues share it)
        if self.device == "cpu":
            # Zero pages are only made resident when first written.
            self._host = [np.zeros(shape, dtype=np.float32) for _ in range(self.kinds)]
            self.arrays = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._host]
        else:
            self.arrays = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
                for _ in range(self.kinds)
            ]
        proto = onnx.load(str(model.artifact.onnx_path))
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        fused = resident_graph(proto, model.state_inputs, model.state_outputs)
        download, upload = _copy_graphs([(self.layers, self.hidden)] * self.kinds, opset)
        self._step = model.new_session(fused.SerializeToString())
        self._download = model.new_session(download.SerializeToString())
        self._upload = model.new_session(upload.SerializeToString())
        self._top_k = [np.array([k], dtype=np.int64) for k in range(model.max_k + 1)]
        # Reference counts: a row is free exactly when its count is 0. The free rows are
        # a stack (`_free[:_nfree]`), the most recently freed on top, row 0 first at start.
        self._counts = np.zeros(rows, dtype=np.int64)
        self._free = np.arange(rows - 1, -1, -1, dtype=np.int64)
        self._nfree = rows
        self._lock = threading.Lock()  # the engine thread takes rows, the event loop releases
        self._pinned = np.zeros(rows, dtype=bool)  # rows held for good (`pin`)
        self.reserved = 0  # rows promised to batches about to run (`free` leaves them out)
        log.info(
            "model %s: state pool of %d rows on %s (%.1f MiB, %d B a row)",
            model.name,
            rows,
            self.device,
            rows * self.row_bytes / 2**20,
            self.row_bytes,
        )

    def check(self, atol: float | None = None) -> str | None:
        """Run a few steps through the pool and through the copied path from the same
        random states: None when they agree within `atol` (the answers and the states
        read back), else what differs. The pool's graph, its in-place writes and its
        copies are checked on this device before any session relies on them.

        `atol` is 1e-4 (the service's invariant), 1e-2 with TF32 allowed (its error is
        ~1e-3, and the two graphs may not pick the same kernels)."""
        if atol is None:
            atol = 1e-2 if self.model.on_cuda and self.model.allow_tf32 else 1e-4
        model = self.model
        rng = np.random.default_rng(0)
        batch = 3
        shape = (model.layers, batch, model.hidden_size)
        state = tuple(
            rng.standard_normal(shape).astype(np.float32) * 0.5 for _ in range(self.kinds)
        )
        rows = self.upload([tuple(a[:, b] for a in state) for b in range(batch)])
        taken = [rows]
        try:
            return self._check(rng, state, rows, taken, atol)
        finally:
            self.release(np.concatenate(taken))

    def _check(
        self,
        rng: np.random.Generator,
        state: State,
        rows: np.ndarray,
        taken: list[np.ndarray],
        atol: float,
    ) -> str | None:
        model = self.model
        batch = len(rows)
        gather = rng.integers(0, len(model.vocab), size=(batch, 4)).astype(np.int32)
        for length in (2, 1):
            tokens = rng.integers(3, len(model.vocab), size=(batch, length))
            copied = model.run(tokens, state, want_probs=True)
            resident = self.run(tokens, rows, False, gather, [1])
            taken.append(resident.rows)
            if copied.probs is None or resident.probs is None or resident.probs_at is None:
                return "a run did not return the distribution asked for"
            back = self.download(resident.rows)
            checks = {
                "top-k probabilities": float(np.abs(copied.topk_probs - resident.topk_probs).max()),
                "a prefix row's distribution": float(
                    np.abs(copied.probs[1] - resident.probs[0]).max()
                ),
                "probabilities at given ids": float(
                    np.abs(np.take_along_axis(copied.probs, gather, 1) - resident.probs_at).max()
                ),
                "states read back": max(
                    float(np.abs(np.stack([b[i] for b in back], axis=1) - copied.state[i]).max())
                    for i in range(self.kinds)
                ),
            }
            for what, diff in checks.items():
                if not diff <= atol:
                    return f"{what} differ by {diff:.3g} from the copied path"
            state, rows = copied.state, resident.rows
        return None

    # --- rows ---------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Rows free now (count 0), less those reserved."""
        return self._nfree - self.reserved

    @property
    def used(self) -> int:
        """Rows held (by sessions, steps in flight, or for good), and those reserved."""
        return self.rows - self.free

    @property
    def nbytes(self) -> int:
        """Bytes of the pool tensors."""
        return self.rows * self.row_bytes

    def take(self, n: int) -> np.ndarray:
        """`n` free rows (int64), each held once; raises `PoolExhausted` (taking none) when
        fewer are free."""
        with self._lock:
            if n > self._nfree:
                raise PoolExhausted(
                    f"model {self.model.name!r}: {n} state rows needed, {self._nfree} free "
                    f"of {self.rows}"
                )
            self._nfree -= n
            rows = self._free[self._nfree : self._nfree + n][::-1].copy()
            self._counts[rows] = 1
        return rows

    def hold(self, rows: np.ndarray) -> None:
        """One more hold on each of `rows` (a row may appear more than once); each must be
        held already (a free row is taken, never held)."""
        if len(rows) == 0:
            return
        with self._lock:
            if (self._counts[rows] <= 0).any():
                raise ValueError("hold of a free state row")
            np.add.at(self._counts, rows, 1)

    def release(self, rows: np.ndarray) -> None:
        """Drop one hold on each of `rows` (once per appearance); the rows whose count
        reaches 0 are free again. Releasing a free row is a bug: ValueError, nothing
        released."""
        if len(rows) == 0:
            return
        with self._lock:
            counts = self._counts
            np.subtract.at(counts, rows, 1)
            left = counts[rows]
            if (left < 0).any():
                np.add.at(counts, rows, 1)
                raise ValueError("release of a free state row")
            freed = rows[left == 0]
            if len(freed) > 1:
                freed = _distinct(freed)
            n = len(freed)
            self._free[self._nfree : self._nfree + n] = freed
            self._nfree += n

    def pin(self, rows: np.ndarray) -> None:
        """Make the caller's hold on `rows` (just taken) a hold for good (the start and zero
        states): never released, so spilling the sessions that share them frees nothing."""
        if (self._counts[rows] <= 0).any():
            raise ValueError("pin of a free state row")
        self._pinned[rows] = True

    def pinned(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` are held for good (bool per row)."""
        return self._pinned[rows]  # type: ignore[no-any-return]

    def counts(self) -> np.ndarray:
        """A copy of every row's count (a debugging aid: tests compare it with the holders
        they know of)."""
        with self._lock:
            return self._counts.copy()

    def check_counts(self, holders: np.ndarray) -> None:
        """Raise AssertionError unless the counts are exactly `holders` (rows, one entry
        per hold; pinned rows' holds included) and the free rows are those with count 0."""
        want = np.bincount(np.asarray(holders, dtype=np.int64), minlength=self.rows)
        counts = self.counts()
        if not np.array_equal(counts, want):
            wrong = np.flatnonzero(counts != want)[:8]
            raise AssertionError(
                f"state row counts differ at rows {wrong.tolist()}: "
                f"{counts[wrong].tolist()} held, {want[wrong].tolist()} expected"
            )
        with self._lock:
            free = np.sort(self._free[: self._nfree])
        if not np.array_equal(free, np.flatnonzero(counts == 0)):
            raise AssertionError("the free rows are not the rows of count 0")

    def _rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        array = np.asarray(rows, dtype=np.int64)
        if array.ndim != 1 or (len(array) and (array.min() < 0 or array.max() >= self.rows)):
            raise ValueError(f"state rows out of this pool's {self.rows}")
        return array

    def _bind_pools(self, binding: ort.IOBinding, write: bool) -> None:
        for i, value in enumerate(self.arrays):
            binding.bind_ortvalue_input(_pool_name(i), value)
            if write:
                binding.bind_ortvalue_output(_pool_out(i), value)  # in place

    # --- the runs -----------------------------------------------------------------

    def run(
        self,
        tokens: np.ndarray,
        start: np.ndarray | Sequence[int],
        want_probs: bool,
        gather: np.ndarray | None = None,
        probs_rows: Sequence[int] | None = None,
        top: int | None = None,
    ) -> ResidentOutput:
        """Run `tokens` (B, T) int64, row b from the state in `start[b]`; the new states
        go to fresh rows (`ResidentOutput.rows`, each held once for the caller, who releases
        them; its `state` is empty; on an error they are released here). With `gather` (B, G)
        vocabulary ids, their probabilities come out too (`StepOutput.probs_at`). The full
        distribution comes out for every row with `want_probs`, or for the rows
        `probs_rows` names (`StepOutput.probs`, one row each, `StepOutput.probs_index`
        mapping a batch row to its row there, -1 for none).

        The top-k arrays are `top` wide (clipped to 1..max_k; None: max_k; see
        `resident_graph`), the first `top` of what a run at max_k gives: a batch selects
        only the words its steps ask for."""
        batch = tokens.shape[0]
        if tokens.ndim != 2 or batch == 0 or tokens.shape[1] == 0 or len(start) != batch:
            raise ValueError(f"tokens {tokens.shape} for {len(start)} start rows")
        max_k = self.model.max_k
        k = max_k if top is None else min(max(top, 1), max_k)
        out = self.take(batch)
        try:
            return self._run(tokens, self._rows(start), out, want_probs, gather, probs_rows, k)
        except BaseException:
            self.release(out)
            raise

    def _run(
        self,
        tokens: np.ndarray,
        start: np.ndarray,
        out: np.ndarray,
        want_probs: bool,
        gather: np.ndarray | None,
        probs_rows: Sequence[int] | None,
        k: int,
    ) -> ResidentOutput:
        batch = tokens.shape[0]
        binding = self._step.io_binding()
        binding.bind_cpu_input(TOP_K, self._top_k[k])
        binding.bind_cpu_input(TOKENS, np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input(FROM_ROWS, start)
        binding.bind_cpu_input(TO_ROWS, out)
        ids = np.zeros((batch, 1), np.int32) if gather is None else gather.astype(np.int32)
        binding.bind_cpu_input(GATHER_IDS, np.ascontiguousarray(ids))
        some = want_probs or probs_rows is None or len(probs_rows) == 0
        rows = np.zeros(1, np.int64) if some else np.asarray(probs_rows, dtype=np.int64)
        binding.bind_cpu_input(PROBS_ROWS, rows)
        names = [TOPK_PROBS, TOPK_IDS] + ([PROBS] if want_probs else [])
        names += [PROBS_AT] if gather is not None else []
        names += [] if some else [PROBS_OF_ROWS]
        for name in names:
            binding.bind_output(name, "cpu")
        self._bind_pools(binding, write=True)  # bound after: `get_outputs` starts with names
        self._step.run_with_iobinding(binding)
        values = {name: v.numpy() for name, v in zip(names, binding.get_outputs())}
        probs, index = values.get(PROBS), None
        if PROBS_OF_ROWS in values:
            probs = values[PROBS_OF_ROWS]
            index = np.full(batch, -1, dtype=np.int64)
            index[rows] = np.arange(len(rows))
        return ResidentOutput(
            values[TOPK_PROBS], values[TOPK_IDS], probs, (), values.get(PROBS_AT), index, out,
        )  # fmt: skip

    def upload(self, states: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """Host states (each `kinds` arrays (L, H)) into fresh rows, each held once for the
        caller (released here on an error)."""
        if not states:
            return np.empty(0, dtype=np.int64)
        out = self.take(len(states))
        try:
            self._upload_into(out, states)
        except BaseException:
            self.release(out)
            raise
        return out

    def _upload_into(self, out: np.ndarray, states: Sequence[Sequence[np.ndarray]]) -> None:
        binding = self._upload.io_binding()
        binding.bind_cpu_input(FROM_ROWS, self._rows(out))
        for i in range(self.kinds):
            stacked = np.ascontiguousarray(stack_rows([s[i] for s in states]), dtype=np.float32)
            if stacked.shape[1:] != (self.layers, self.hidden):
                raise ValueError(f"a state of shape {stacked.shape[1:]} for this pool")
            binding.bind_cpu_input(f"{_STATES}{i}", stacked)
        self._bind_pools(binding, write=True)
        self._upload.run_with_iobinding(binding)

    def download(self, rows: np.ndarray | Sequence[int]) -> list[tuple[np.ndarray, ...]]:
        """The states of rows, in host memory (each `kinds` arrays (L, H))."""
        if len(rows) == 0:
            return []
        binding = self._download.io_binding()
        binding.bind_cpu_input(FROM_ROWS, self._rows(rows))
        self._bind_pools(binding, write=False)
        names = [f"{_STATES}{i}" for i in range(self.kinds)]
        for name in names:
            binding.bind_output(name, "cpu")
        self._download.run_with_iobinding(binding)
        arrays = binding.copy_outputs_to_cpu()
        return [tuple(a[b] for a in arrays) for b in range(len(rows))]
