"""Export: parity with torch, dynamic axes, manifest round trip, refusal of bad artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_export.export import ServingGraph, check_parity, export_artifact
from model_export.model import RNNLM, ModelConfig
from service.contract.artifact import ArtifactError, ModelArtifact, sha256_of, write_manifest
from service.contract.vocab import Vocabulary
from tests.conftest import make_models_dir, tiny_vocab_tokens


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_parity_at_several_shapes(tiny_artifacts: Path, cell: str) -> None:
    manifest = json.loads((tiny_artifacts / cell / "manifest.json").read_text())
    parity = manifest["parity_max_abs_diff"]
    assert set(parity) >= {"1x1", "3x7", "8x1", "2x33"}
    assert max(parity.values()) <= 1e-4


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_graph_accepts_other_shapes_than_the_example(tiny_artifacts: Path, cell: str) -> None:
    artifact = ModelArtifact.load(tiny_artifacts / cell)
    session = ort.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])
    for batch, seq in ((1, 1), (5, 12), (17, 3), (64, 1)):
        feed = {"tokens": np.zeros((batch, seq), dtype=np.int64)}
        for name in ("h0", "c0")[: 2 if cell == "lstm" else 1]:
            feed[name] = np.zeros((artifact.layers, batch, artifact.hidden_size), np.float32)
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        assert out["hn"].shape == (artifact.layers, batch, artifact.hidden_size)
        assert out["topk_ids"].shape == (batch, artifact.max_k)
        assert out["probs"].shape == (batch, len(artifact.vocab))
        # top-k holds only suggestible words, with their unrenormalised probabilities
        ids = out["topk_ids"]
        assert artifact.vocab.suggestible[ids].all()
        np.testing.assert_allclose(
            np.take_along_axis(out["probs"], ids, 1), out["topk_probs"], atol=1e-6
        )
        np.testing.assert_allclose(out["probs"].sum(1), 1.0, atol=1e-4)


def test_parity_check_refuses_a_graph_that_differs(tiny_artifacts: Path) -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    torch.manual_seed(99)
    other = RNNLM(ModelConfig(len(vocab), "lstm", 16, 32, 2, 0.0)).eval()
    graph = ServingGraph(other, vocab.suggestible).eval()
    from model_export.export import ExportError

    with pytest.raises(ExportError, match="max abs difference"):
        check_parity(graph, tiny_artifacts / "lstm" / "model.onnx")


def test_int8_artifact_is_smaller_and_close(tmp_path: Path) -> None:
    models = make_models_dir(tmp_path, int8=True, hidden=96)
    manifest = json.loads((models / "lstm" / "manifest.json").read_text())
    quant = manifest["quantization"]
    assert quant["type"] == "int8-weights" and quant["quantized_weights"] >= 2
    assert (models / "lstm" / "model.onnx").stat().st_size < 0.5 * quant["fp32_bytes"]
    assert max(quant["max_abs_diff"].values()) < 0.05
    assert manifest["session_config"] == {"session.disable_quant_qdq": "1"}


def test_manifest_round_trip(tiny_artifacts: Path) -> None:
    artifact = ModelArtifact.load(tiny_artifacts / "gru")
    assert artifact.name == "gru" and artifact.cell == "gru"
    assert artifact.manifest["files"]["model.onnx"]["sha256"] == sha256_of(artifact.onnx_path)
    assert artifact.vocab.tokens == tiny_vocab_tokens()
    assert artifact.manifest["versions"]["opset"] >= 17


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_model_file_is_refused_naming_the_file(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    art = _copy(tiny_artifacts / "lstm", tmp_path / "lstm")
    data = bytearray((art / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256"):
        ModelArtifact.load(art)


def test_truncated_model_file_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    art = _copy(tiny_artifacts / "lstm", tmp_path / "lstm")
    data = (art / "model.onnx").read_bytes()
    (art / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match=r"model\.onnx: .*truncated"):
        ModelArtifact.load(art)


def test_mismatched_vocabulary_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    art = _copy(tiny_artifacts / "gru", tmp_path / "gru")
    (art / "vocab.txt").write_text("<pad>\n<unk>\n</s>\nfoo\n")
    with pytest.raises(ArtifactError, match=r"vocab\.txt"):
        ModelArtifact.load(art)


@pytest.mark.parametrize("damage", ["missing", "not-json", "wrong-version", "missing-keys"])
def test_bad_manifest_is_refused(tiny_artifacts: Path, tmp_path: Path, damage: str) -> None:
    art = _copy(tiny_artifacts / "gru", tmp_path / "gru")
    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "not-json":
        path.write_text("{not json")
    elif damage == "wrong-version":
        path.write_text(json.dumps({**manifest, "format_version": 99}))
    else:
        path.write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ArtifactError, match=r"manifest\.json"):
        ModelArtifact.load(art)


def test_export_writes_nothing_when_parity_fails(tmp_path: Path, monkeypatch) -> None:
    import model_export.export as export

    def broken(*args, **kwargs):
        raise export.ExportError("forced failure")

    monkeypatch.setattr(export, "check_parity", broken)
    vocab = Vocabulary(tiny_vocab_tokens())
    model = RNNLM(ModelConfig(len(vocab), "gru", 8, 8, 1, 0.0))
    with pytest.raises(export.ExportError):
        export_artifact(model, vocab, tmp_path / "gru")
    assert not (tmp_path / "gru").exists()


def test_display_forms_travel_with_the_artifact(tmp_path: Path) -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    model = RNNLM(ModelConfig(len(vocab), "gru", 8, 8, 1, 0.0))
    manifest = export_artifact(
        model, vocab, tmp_path / "gru", display_forms={"i": "I", "i'm": "I'm"}
    )
    assert "display.tsv" in manifest["files"]
    artifact = ModelArtifact.load(tmp_path / "gru")
    assert artifact.vocab.display[artifact.vocab.index["i"]] == "I"
    assert artifact.vocab.display[artifact.vocab.index["home"]] == "home"
    (tmp_path / "gru" / "display.tsv").write_text("i\tYou\n")
    with pytest.raises(ArtifactError, match=r"display\.tsv"):
        ModelArtifact.load(tmp_path / "gru")


def test_pair_forms_travel_with_the_artifact(tmp_path: Path) -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    model = RNNLM(ModelConfig(len(vocab), "gru", 8, 8, 1, 0.0))
    manifest = export_artifact(
        model, vocab, tmp_path / "gru", pair_forms={("big", "house"): "House"}
    )
    assert "display_pairs.tsv" in manifest["files"] and "display.tsv" not in manifest["files"]
    artifact = ModelArtifact.load(tmp_path / "gru")
    big, house = artifact.vocab.index["big"], artifact.vocab.index["house"]
    assert artifact.vocab.pair_display == {(big, house): "House"}
    assert artifact.vocab.display[house] == "house"
    # a changed table no longer matches its hash; a malformed one (its hash updated) says so
    pairs = tmp_path / "gru" / "display_pairs.tsv"
    pairs.write_text("big\thouse\tHOUSE\n")
    with pytest.raises(ArtifactError, match=r"display_pairs\.tsv"):
        ModelArtifact.load(tmp_path / "gru")
    pairs.write_text("big\tHouse\n")
    write_manifest(tmp_path / "gru", json.loads((tmp_path / "gru" / "manifest.json").read_text()))
    with pytest.raises(ArtifactError, match=r"display_pairs\.tsv: line 1"):
        ModelArtifact.load(tmp_path / "gru")
