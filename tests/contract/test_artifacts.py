"""Model artifacts: every directory of a models folder is a model or a clear error; manifest
paths stay in their directory; manifest fields that contradict the graph are refused naming
the files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from service.contract.artifact import ArtifactError, ModelArtifact, write_manifest
from service.engine.core import artifact_dirs, load_models
from service.engine.runtime import OrtModel
from tests.api_support import api_settings
from tests.paths import ROOT as REPO_ROOT

CPU = ["CPUExecutionProvider"]


def copy_model(tiny_artifacts: Path, root: Path, name: str = "lstm") -> Path:
    """A writable copy of a tiny artifact as `root/name`."""
    return Path(shutil.copytree(tiny_artifacts / name, root / name))


def edit_manifest(art: Path, **changes: Any) -> Path:
    path = art / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def test_a_directory_without_a_manifest_is_an_error_naming_it(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    copy_model(tiny_artifacts, tmp_path, "lstm")
    (tmp_path / "lstm-old").mkdir()
    (tmp_path / "lstm-old" / "model.onnx").write_bytes(b"")
    with pytest.raises(
        ArtifactError, match=r"lstm-old: not a model artifact \(no manifest\.json\)"
    ):
        artifact_dirs(tmp_path)
    settings = api_settings(tmp_path)
    with pytest.raises(ArtifactError, match="lstm-old"):
        load_models(settings)


def test_hidden_directories_pycache_and_files_are_skipped(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    copy_model(tiny_artifacts, tmp_path, "lstm")
    copy_model(tiny_artifacts, tmp_path, "gru")
    for skipped in (".git", ".cache", "__pycache__"):
        (tmp_path / skipped).mkdir()
    (tmp_path / "README.md").write_text("models\n")
    assert [p.name for p in artifact_dirs(tmp_path)] == ["gru", "lstm"]
    assert sorted(load_models(api_settings(tmp_path))) == ["gru", "lstm"]


def test_an_empty_or_missing_models_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    with pytest.raises(ArtifactError, match="no model artifacts"):
        artifact_dirs(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        artifact_dirs(tmp_path / "missing")


@pytest.mark.parametrize(
    "entry",
    [
        "../../etc/hostname",
        "../gru/model.onnx",
        "/etc/hostname",
        "sub/../../x",
        "./model.onnx",
        "a//b",
        "C:/Windows/win.ini",
        "..\\..\\etc\\hostname",
        "",
    ],
)
def test_manifest_file_entries_stay_in_their_directory(
    tiny_artifacts: Path, tmp_path: Path, entry: str
) -> None:
    art = copy_model(tiny_artifacts, tmp_path / "models")
    copy_model(tiny_artifacts, tmp_path / "models", "gru")
    manifest = json.loads((art / "manifest.json").read_text())
    files = {**manifest["files"], entry: {"bytes": 1, "sha256": "0" * 64}}
    path = edit_manifest(art, files=files)
    with pytest.raises(ArtifactError, match=re.escape(str(path))) as raised:
        ModelArtifact.load(art)
    assert "file entry" in str(raised.value)


def test_a_file_entry_that_is_not_an_object_is_refused(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    art = copy_model(tiny_artifacts, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    path = edit_manifest(art, files={**manifest["files"], "vocab.txt": "sha"})
    with pytest.raises(ArtifactError, match=re.escape(str(path))):
        ModelArtifact.load(art)


def test_files_in_subdirectories_are_allowed(tiny_artifacts: Path, tmp_path: Path) -> None:
    art = copy_model(tiny_artifacts, tmp_path)
    (art / "extra").mkdir()
    (art / "extra" / "notes.txt").write_text("notes\n")
    manifest = json.loads((art / "manifest.json").read_text())
    write_manifest(art, {**manifest, "files": {**manifest["files"], "extra/notes.txt": {}}})
    assert ModelArtifact.load(art).name == "lstm"


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", "32"), ("layers", 0), ("vocab_size", True), ("max_k", 2.5)],
)
def test_sizes_must_be_positive_integers(
    tiny_artifacts: Path, tmp_path: Path, field: str, value: Any
) -> None:
    art = copy_model(tiny_artifacts, tmp_path)
    path = edit_manifest(art, **{field: value})
    with pytest.raises(ArtifactError, match=re.escape(f"{path}: {field}")):
        ModelArtifact.load(art)


@pytest.mark.parametrize(
    ("name", "changes", "complaint"),
    [
        (
            "lstm",
            {"hidden_size": 64},
            r"hidden_size is 64 but input h0 has shape \[2, 'batch', 32\]",
        ),
        ("lstm", {"layers": 3}, r"layers is 3 but input h0"),
        ("gru", {"layers": 2}, r"layers is 2 but input h0"),
        ("lstm", {"cell": "gru"}, r"inputs \['c0'\] that a 'gru' cell does not feed"),
        ("gru", {"cell": "lstm"}, r"the graph lacks \['c0', 'cn'\]"),
        ("gru", {"max_k": 80}, r"max_k is 80 but output topk_probs"),
    ],
)
def test_manifest_fields_that_contradict_the_graph_are_refused(
    tiny_artifacts: Path, tmp_path: Path, name: str, changes: dict[str, Any], complaint: str
) -> None:
    art = copy_model(tiny_artifacts, tmp_path, name)
    manifest = edit_manifest(art, **changes)
    artifact = ModelArtifact.load(art)  # the hashes still match: the manifest is not hashed
    with pytest.raises(ArtifactError) as raised:
        OrtModel(artifact, CPU)
    message = str(raised.value)
    assert str(manifest) in message and str(art / "model.onnx") in message, message
    assert re.search(complaint, message), message


def test_a_vocabulary_size_that_contradicts_the_graph_is_refused(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    art = copy_model(tiny_artifacts, tmp_path, "gru")
    with (art / "vocab.txt").open("a") as vocab:
        vocab.write("zyzzyva\n")
    manifest = json.loads((art / "manifest.json").read_text())
    write_manifest(art, {**manifest, "vocab_size": manifest["vocab_size"] + 1})  # rehashed
    artifact = ModelArtifact.load(art)
    with pytest.raises(ArtifactError, match=r"vocab_size is \d+ but output probs"):
        OrtModel(artifact, CPU)


def test_the_tiny_and_bundled_models_pass_the_graph_check(tiny_artifacts: Path) -> None:
    bundled = REPO_ROOT / "service" / "models"
    for models in (tiny_artifacts, bundled):
        for name in ("lstm", "gru"):
            assert OrtModel(ModelArtifact.load(models / name), CPU).name == name


def test_the_revision_names_the_weights_and_the_vocabulary(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    """Sessions are kept per revision (`SessionRecord.revision`): it must change with the
    graph or the vocabulary and with nothing else (not the card, not the metrics)."""
    art = copy_model(tiny_artifacts, tmp_path, "lstm")
    first = ModelArtifact.load(art).revision
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert OrtModel(ModelArtifact.load(art), CPU).revision == first
    edit_manifest(art, metrics={"note": "re-evaluated"})
    assert ModelArtifact.load(art).revision == first
    manifest = json.loads((art / "manifest.json").read_text())
    files = manifest["files"]
    for name in ("model.onnx", "vocab.txt"):
        changed = {**files, name: {**files[name], "sha256": "0" * 64}}
        assert (
            ModelArtifact(
                art, {**manifest, "files": changed}, ModelArtifact.load(art).vocab
            ).revision
            != first
        )
