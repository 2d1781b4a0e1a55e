"""The model artifact: a directory holding model.onnx, manifest.json and vocab.txt.

This module is the contract between `model_export` (which writes artifacts) and
the engine (which serves them). Loading verifies everything it can before any
ONNX Runtime session exists: a corrupt, truncated or mismatched artifact is refused
with an `ArtifactError` naming the offending file.

What is verified:

- `manifest.json`: valid JSON, the required keys, the format version, a known cell, the
  sizes positive integers; every entry of `files` a plain relative path inside the
  artifact's directory (no absolute path, no `..`: a manifest cannot make the service
  read other files) whose size and sha256 match.
- `vocab.txt`: its token count is the manifest's `vocab_size`.
- The graph (`check_graph`, once ONNX Runtime has opened it): its inputs and outputs are
  those of the manifest's cell, and the fields the hashes do not cover (`layers`,
  `hidden_size`, `vocab_size`, `max_k`) agree with their shapes.

A models directory (`model_dirs`) holds one artifact per subdirectory; every
subdirectory must be one, except hidden ones (`.git`, `.cache`...) and `__pycache__`,
which are skipped. Plain files beside them (a README) are ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from service.contract.vocab import Vocabulary

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
VOCAB_FILE = "vocab.txt"
DISPLAY_FILE = "display.tsv"  # optional: "token<TAB>display form" per line
# optional: "previous token<TAB>token<TAB>display form" per line: a word's form after a word
PAIR_DISPLAY_FILE = "display_pairs.tsv"
CELLS = {"lstm": ("h", "c"), "gru": ("h",)}
REQUIRED_KEYS = (
    "format_version",
    "name",
    "cell",
    "vocab_size",
    "embedding_size",
    "hidden_size",
    "layers",
    "max_k",
    "tokenizer",
    "files",
)
SIZE_KEYS = ("vocab_size", "embedding_size", "hidden_size", "layers", "max_k")
SKIPPED_DIRS = ("__pycache__",)  # besides hidden directories (".git", ".cache", ...)

# Graph names (inputs: tokens, h0[, c0]; outputs: hn[, cn], topk_probs, topk_ids, probs).
TOKENS = "tokens"
TOPK_PROBS = "topk_probs"
TOPK_IDS = "topk_ids"
PROBS = "probs"


class ArtifactError(ValueError):
    """An artifact that cannot be served; the message names the file at fault."""


def model_dirs(models_dir: Path) -> list[Path]:
    """The artifact directories of a models directory, sorted by name.

    Every subdirectory must be an artifact (hold a manifest); one that does not is an
    `ArtifactError` naming it, rather than a model silently missing. Hidden
    subdirectories and `__pycache__` are skipped; plain files are ignored.
    """
    if not models_dir.is_dir():
        raise ArtifactError(f"{models_dir}: models directory not found")
    found = []
    for path in sorted(models_dir.iterdir()):
        if not path.is_dir() or path.name.startswith(".") or path.name in SKIPPED_DIRS:
            continue
        if not (path / MANIFEST_FILE).is_file():
            raise ArtifactError(
                f"{path}: not a model artifact (no {MANIFEST_FILE}); every directory in "
                f"{models_dir} must be one: remove or move it (hidden directories are skipped)"
            )
        found.append(path)
    if not found:
        raise ArtifactError(f"{models_dir}: no model artifacts (directories with {MANIFEST_FILE})")
    return found


def confined(path: Path, name: object, manifest_path: Path) -> Path:
    """`path / name` for a manifest `files` entry that names a file inside `path`.

    Refused (an `ArtifactError` naming the manifest): anything but a plain relative path,
    i.e. absolute paths, drive letters, `..` and empty parts, backslashes. Checked on the
    name itself: a symbolic link placed in the directory is followed as usual.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"{manifest_path}: file entry {name!r} is not a plain relative path")
    posix = PurePosixPath(name)
    if (
        posix.is_absolute()
        or PureWindowsPath(name).drive
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise ArtifactError(
            f"{manifest_path}: file entry {name!r} is outside the artifact's directory"
        )
    return path.joinpath(*posix.parts)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_inputs(cell: str) -> list[str]:
    """Graph input names of the recurrent state: ["h0"] or ["h0", "c0"]."""
    return [f"{s}0" for s in CELLS[cell]]


def state_outputs(cell: str) -> list[str]:
    """Graph output names of the new state: ["hn"] or ["hn", "cn"]."""
    return [f"{s}n" for s in CELLS[cell]]


@dataclass(frozen=True)
class ModelArtifact:
    """A verified model directory."""

    path: Path
    manifest: dict[str, Any]
    vocab: Vocabulary

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def cell(self) -> str:
        return str(self.manifest["cell"])

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def layers(self) -> int:
        return int(self.manifest["layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def max_k(self) -> int:
        return int(self.manifest["max_k"])

    @property
    def revision(self) -> str:
        """Which weights and vocabulary these are: 16 hex digits of a hash of the graph's and
        the vocabulary's sha256 (as the manifest lists them, checked by `load`). A session's
        state is only meaningful to the revision that wrote it: same name, other weights or
        word ids (a retrained model) give other states."""
        files = self.manifest["files"]
        both = f"{files[MODEL_FILE].get('sha256')}:{files[VOCAB_FILE].get('sha256')}"
        return hashlib.sha256(both.encode()).hexdigest()[:16]

    @classmethod
    def load(cls, path: Path | str, hashed: Collection[str] | None = None) -> ModelArtifact:
        """Read and verify an artifact directory; raise `ArtifactError` naming the bad file.

        Every file's size is checked; its sha256 too, unless `hashed` names the only files
        to hash (an API process reads the vocabulary, never the graph)."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ArtifactError(f"{manifest_path}: missing")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{manifest_path}: not a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise ArtifactError(f"{manifest_path}: missing keys {missing}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise ArtifactError(
                f"{manifest_path}: format_version {manifest['format_version']!r} "
                f"is not supported (this service reads {FORMAT_VERSION})"
            )
        if manifest["cell"] not in CELLS:
            raise ArtifactError(f"{manifest_path}: unknown cell {manifest['cell']!r}")
        for key in SIZE_KEYS:
            value = manifest[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ArtifactError(f"{manifest_path}: {key} {value!r} is not a positive integer")
        files = manifest["files"]
        if not isinstance(files, dict) or MODEL_FILE not in files or VOCAB_FILE not in files:
            raise ArtifactError(f"{manifest_path}: 'files' must list {MODEL_FILE} and {VOCAB_FILE}")
        for name, meta in files.items():
            file = confined(path, name, manifest_path)
            if not isinstance(meta, dict):
                raise ArtifactError(f"{manifest_path}: entry {name!r} is not an object")
            if not file.is_file():
                raise ArtifactError(f"{file}: missing")
            if file.stat().st_size != meta.get("bytes"):
                raise ArtifactError(
                    f"{file}: {file.stat().st_size} bytes, manifest says {meta.get('bytes')} (truncated?)"
                )
            if (hashed is None or name in hashed) and sha256_of(file) != meta.get("sha256"):
                raise ArtifactError(f"{file}: sha256 does not match {manifest_path}")
        try:
            vocab = Vocabulary.load(path / VOCAB_FILE)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"{path / VOCAB_FILE}: {exc}") from exc
        if len(vocab) != manifest["vocab_size"]:
            raise ArtifactError(
                f"{path / VOCAB_FILE}: {len(vocab)} tokens, manifest says {manifest['vocab_size']}"
            )
        if DISPLAY_FILE in files:
            vocab.set_display_forms(read_display_forms(path / DISPLAY_FILE))
        if PAIR_DISPLAY_FILE in files:
            vocab.set_pair_forms(read_pair_forms(path / PAIR_DISPLAY_FILE))
        return cls(path, manifest, vocab)

    def check_graph(
        self,
        inputs: Mapping[str, Sequence[int | str | None]],
        outputs: Mapping[str, Sequence[int | str | None]],
    ) -> None:
        """Check the graph's inputs and outputs (name -> shape) against the manifest.

        The manifest itself is not hashed: a `cell`, `layers`, `hidden_size`, `vocab_size`
        or `max_k` that contradicts the graph is refused here, with an `ArtifactError`
        naming both files, instead of an ONNX Runtime error at the first run. Dimensions
        that are not fixed numbers in the graph (named, dynamic) are not compared.
        """
        manifest_path = self.path / MANIFEST_FILE
        where = f"{manifest_path} does not match {self.onnx_path}"
        want_inputs = [TOKENS, *state_inputs(self.cell)]
        want_outputs = [*state_outputs(self.cell), TOPK_PROBS, TOPK_IDS, PROBS]
        missing = [n for n in want_inputs if n not in inputs]
        missing += [n for n in want_outputs if n not in outputs]
        if missing:
            raise ArtifactError(
                f"{where}: the graph lacks {missing} (cell {self.cell!r} needs inputs "
                f"{want_inputs} and outputs {want_outputs})"
            )
        extra = sorted(set(inputs) - set(want_inputs))
        if extra:
            raise ArtifactError(
                f"{where}: the graph has inputs {extra} that a {self.cell!r} cell does not feed"
            )

        def fixed(shape: Sequence[int | str | None], axis: int) -> int | None:
            """A dimension that is a number in the graph, else None (named, or no such axis)."""
            if not -len(shape) <= axis < len(shape):
                return None
            dim = shape[axis]
            return dim if isinstance(dim, int) and not isinstance(dim, bool) else None

        for kind, names in (
            ("input", state_inputs(self.cell)),
            ("output", state_outputs(self.cell)),
        ):
            for name in names:
                shape = (inputs if kind == "input" else outputs)[name]
                if len(shape) != 3:
                    raise ArtifactError(
                        f"{where}: {kind} {name} has shape {list(shape)}, not [layers, batch, hidden]"
                    )
                for key, axis in (("layers", 0), ("hidden_size", 2)):
                    dim = fixed(shape, axis)
                    if dim is not None and dim != self.manifest[key]:
                        raise ArtifactError(
                            f"{where}: {key} is {self.manifest[key]} but {kind} {name} has "
                            f"shape {list(shape)}"
                        )
        vocab = fixed(outputs[PROBS], -1)
        if vocab is not None and vocab != self.manifest["vocab_size"]:
            raise ArtifactError(
                f"{where}: vocab_size is {self.manifest['vocab_size']} but output {PROBS} "
                f"has shape {list(outputs[PROBS])}"
            )
        for name in (TOPK_PROBS, TOPK_IDS):
            k = fixed(outputs[name], -1)
            if k is not None and k < self.max_k:
                raise ArtifactError(
                    f"{where}: max_k is {self.max_k} but output {name} has shape "
                    f"{list(outputs[name])}"
                )


def read_display_forms(path: Path) -> dict[str, str]:
    """Parse display.tsv into {token: display form}."""
    forms = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        token, sep, form = line.partition("\t")
        if not sep:
            raise ArtifactError(f"{path}: line {number} is not 'token<TAB>form'")
        forms[token] = form
    return forms


def write_display_forms(path: Path, forms: dict[str, str]) -> None:
    """Write display.tsv, sorted by token."""
    path.write_text("".join(f"{t}\t{f}\n" for t, f in sorted(forms.items())), encoding="utf-8")


def read_pair_forms(path: Path) -> dict[tuple[str, str], str]:
    """Parse display_pairs.tsv into {(previous token, token): display form}."""
    forms = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ArtifactError(f"{path}: line {number} is not 'previous<TAB>token<TAB>form'")
        forms[fields[0], fields[1]] = fields[2]
    return forms


def write_pair_forms(path: Path, forms: dict[tuple[str, str], str]) -> None:
    """Write display_pairs.tsv, sorted by (previous token, token)."""
    path.write_text(
        "".join(f"{p}\t{t}\t{f}\n" for (p, t), f in sorted(forms.items())), encoding="utf-8"
    )


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json, recording size and sha256 of every file it lists."""
    manifest = dict(manifest)
    manifest["files"] = {
        name: {"bytes": (path / name).stat().st_size, "sha256": sha256_of(path / name)}
        for name in manifest.get("files", {})
    }
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
