"""The documentation: its generated tables match the code, the README stays short and its
links resolve, and the site builds offline and strictly (a broken link or a stale table
fails the build)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import REGISTRY

from service.api import create_app
from service.config import Settings
from tests.live_server import ROOT

DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).with_name("mkdocs")
needs_mkdocs = pytest.mark.skipif(
    not MKDOCS.exists(), reason="mkdocs is not installed (the dev extra)"
)


def load_reference() -> ModuleType:
    """docs/reference.py (not a package module: it lives beside the pages it writes)."""
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = load_reference()


def test_the_generated_tables_match_the_code() -> None:
    assert reference.stale() == [], "run: python docs/reference.py --write"


def test_a_changed_setting_makes_its_table_stale_until_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for page in DOCS.glob("*.md"):
        shutil.copy(page, tmp_path / page.name)
    real = reference.settings_table
    monkeypatch.setitem(
        reference.TABLES,
        "settings",
        ("configuration.md", lambda: real().replace("port to listen on", "port to serve on")),
    )
    assert reference.stale(tmp_path) == ["configuration.md: settings"]
    assert reference.write(tmp_path) == ["configuration.md: settings"]
    assert reference.stale(tmp_path) == []
    assert "port to serve on" in (tmp_path / "configuration.md").read_text()


def test_every_setting_metric_error_and_route_is_documented() -> None:
    # Read from the code directly, not through the generator: a table that drops a row
    # fails here even if the generator agrees with itself.
    configuration = (DOCS / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        env = field.validation_alias or f"NEXTWORD_{name.upper()}"
        assert f"| `{env}` |" in configuration, env
    operations = (DOCS / "operations.md").read_text()
    names = {n for c in list(REGISTRY._collector_to_names) for n in REGISTRY._collector_to_names[c]}
    for name in names:
        if name.startswith("nextword_") and not name.endswith(("_created", "_bucket")):
            base = re.sub(r"_(sum|count)$", "", name)
            # A counter registers its base name beside `_total`; a histogram `_sum`, `_count`.
            documented = {f"`{name}`", f"`{name}_total`", f"`{base}`"}
            assert any(form in operations for form in documented), name
    api = (DOCS / "api.md").read_text()
    for cls in reference.error_classes():
        assert f"| `{cls.code}` | `{cls.__name__}` | {cls.status} |" in api, cls
    for path, methods in create_app().openapi()["paths"].items():
        for method in methods:
            assert f"### {method.upper()} `{path}`" in api, (method, path)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc make it (for the headings used here)."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        target, _, anchor = link.partition("#")
        path = (ROOT / target) if target else readme
        assert path.exists(), link
        if anchor:
            assert anchor in anchors(path), link


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@needs_mkdocs
def test_the_site_builds_strictly_and_offline(tmp_path: Path) -> None:
    done = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr
    pages = list((tmp_path / "site").rglob("*.html"))
    assert {p.parent.name for p in pages} >= {"api", "configuration", "operations", "models"}
    for page in pages:
        html = page.read_text()
        # Scripts, styles, fonts and images all come from the site itself.
        for tag in re.findall(r"<(?:script|link|img)\b[^>]*>", html):
            source = re.search(r'(?:src|href)="([^"]*)"', tag)
            if source:
                assert not re.match(r"(https?:)?//", source.group(1)), (page, tag)
        assert "fonts.googleapis" not in html
        assert 'class="mermaid"' not in html  # Material would fetch mermaid from a CDN


@pytest.mark.slow
@needs_mkdocs
def test_a_broken_link_or_a_stale_table_fails_the_build(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    config = (ROOT / "mkdocs.yml").read_text()
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("  - docs/reference.py", f"  - {docs / 'reference.py'}")
    (tmp_path / "mkdocs.yml").write_text(config)
    assert build_site(tmp_path / "mkdocs.yml", tmp_path / "site").returncode == 0

    page = docs / "models.md"
    good = page.read_text()
    page.write_text(good + "\nSee [the missing page](missing.md).\n")
    done = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and "missing.md" in done.stderr

    page.write_text(good)
    configuration = docs / "configuration.md"
    configuration.write_text(configuration.read_text().replace("| `8000` |", "| `8080` |"))
    done = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "generated tables out of date (configuration.md: settings)" in done.stderr
