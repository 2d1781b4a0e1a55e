"""Print the project's runtime requirements with the ONNX Runtime distribution chosen.

The project depends on `onnxruntime-gpu` on Linux (it serves on CPU too), but a
CPU image should not carry ~340 MB of CUDA kernels. Both distributions install
the same `onnxruntime` import package, so an image installs these requirements
first and then the project's wheel with `--no-deps`. They are read from
pyproject.toml, the single list. `make lock` compiles this output into the locks
the images install (requirements/runtime.txt with `onnxruntime`,
requirements/runtime-gpu.txt with `onnxruntime-gpu`); tests/system/test_lock.py checks
that the locks still pin every requirement it prints. Standard library only.

    python docker/runtime_requirements.py pyproject.toml --onnxruntime onnxruntime
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib  # Python 3.11+; the images and the tests run 3.11 or newer

ORT_DISTRIBUTIONS = {"onnxruntime", "onnxruntime-gpu"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(.*)$")


def runtime_requirements(pyproject: Path, onnxruntime: str) -> list[str]:
    """`[project].dependencies`; every ONNX Runtime line becomes one unmarked `onnxruntime`."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out: list[str] = []
    ort_spec: str | None = None
    for line in dependencies:
        requirement = line.partition(";")[0]
        match = _NAME.match(requirement)
        if match is None:
            raise ValueError(f"cannot read requirement {line!r}")
        dist, spec = match.group(1), match.group(2).strip()
        if re.sub(r"[-_.]+", "-", dist).lower() in ORT_DISTRIBUTIONS:
            ort_spec = spec if ort_spec is None else ort_spec
            continue
        out.append(line.strip())
    if ort_spec is None:
        raise ValueError(f"{pyproject} does not depend on ONNX Runtime")
    out.append(f"{onnxruntime}{ort_spec}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument(
        "--onnxruntime",
        default="onnxruntime",
        help="distribution to install (default: onnxruntime, the CPU build; or onnxruntime-gpu)",
    )
    args = parser.parse_args(argv)
    for requirement in runtime_requirements(args.pyproject, args.onnxruntime):
        sys.stdout.write(requirement + "\n")


if __name__ == "__main__":
    main()
