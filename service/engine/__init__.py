"""The engine layer: ONNX Runtime models, the step scheduler and every session's state.

Names (one meaning each, in this package and the stores):

- **session**: one writer's text context, named by its `session_id`; any API process can
  step it, only the engine writes it.
- **record** (`SessionRecord`): what a store keeps of a session: its state and the state
  before its last token, that token, the token count, version (for compare-and-set),
  owner, timestamps and memory.
- **state**: the recurrent state of one position: (h,) or (h, c), each (L, H) float32 for a
  session, (L, B, H) for a batch (`runtime.State`).
- **step** (`steps.Step`): one request to advance a session (or a stateless context)
  by some tokens and answer its top-k; a **batch** is the steps taken into one run.
- **sink** (`steps.StepSink`): where a step goes when it ends (answered, failed or
  cancelled), exactly once: its owner's callable, called by the scheduler with the steps
  that ended together (the core's: one per frame and model; `StepBatcher.submit`'s: a
  future per step, for in-process callers and tests).
- **pool** (`pool.StatePool`): a model's states on its device, a fixed number of
  **rows**; a row is a plain int (a batch's rows an int64 array), held by explicit
  reference counts that the pool keeps (`take`, `hold`, `release`, `pin`). (The memory
  store keeps its host rows per record shape in a `store.arena.RowArena`.) A **slot**
  is one place of a writer's-words memory (`WordMemory`, C slots), never a row.
- **residency** (`residency.Residency`): which sessions hold pool rows (they are
  **resident**; their records say `state_on_device`), spilling them to host memory and
  bringing them back, and who holds each row (an entry, a batch's `Holding`, a long
  step's carried row, the pinned start states).
- **owner**: who a session counts against for quotas: an API key's name, or a client
  address without keys.
- **memory** (`store.WordMemory`, `adapt`): the writer's words a session remembers for
  adaptation; "cache" and "adapt" name the mechanism, not the data.
- **runner**: what runs a model for the scheduler (an `OrtModel`, a fake in tests).
"""
