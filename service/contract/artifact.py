"""The model artifact: a directory holding model.onnx, manifest.json and vocab.txt.

This module is the contract between `model_export` (which writes artifacts) and
the engine (which serves them). Loading verifies everything it can before any
ONNX Runtime session exists: a corrupt, truncated or mismatched artifact is refused
with an `ArtifactError` naming the offending file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.contract.vocab import Vocabulary

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
VOCAB_FILE = "vocab.txt"
DISPLAY_FILE = "display.tsv"  # optional: "token<TAB>display form" per line
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

# Graph names (inputs: tokens, h0[, c0]; outputs: hn[, cn], topk_probs, topk_ids, probs).
TOKENS = "tokens"
TOPK_PROBS = "topk_probs"
TOPK_IDS = "topk_ids"
PROBS = "probs"


class ArtifactError(ValueError):
    """An artifact that cannot be served; the message names the file at fault."""


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

    @classmethod
    def load(cls, path: Path | str) -> ModelArtifact:
        """Read and verify an artifact directory; raise `ArtifactError` naming the bad file."""
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
        files = manifest["files"]
        if not isinstance(files, dict) or MODEL_FILE not in files or VOCAB_FILE not in files:
            raise ArtifactError(f"{manifest_path}: 'files' must list {MODEL_FILE} and {VOCAB_FILE}")
        for name, meta in files.items():
            file = path / name
            if not file.is_file():
                raise ArtifactError(f"{file}: missing")
            if file.stat().st_size != meta.get("bytes"):
                raise ArtifactError(
                    f"{file}: {file.stat().st_size} bytes, manifest says {meta.get('bytes')} (truncated?)"
                )
            if sha256_of(file) != meta.get("sha256"):
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
        return cls(path, manifest, vocab)


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


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json, recording size and sha256 of every file it lists."""
    manifest = dict(manifest)
    manifest["files"] = {
        name: {"bytes": (path / name).stat().st_size, "sha256": sha256_of(path / name)}
        for name in manifest.get("files", {})
    }
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
