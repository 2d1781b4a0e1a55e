"""Podman or Docker, driven from tests: find a working one, build an image, run containers.

Podman is tried first (it needs no daemon). The options that make it work on hosts
without systemd and where a process may not raise its own limits (CI machines, most
containers-in-VMs) are set here once, harmless where they are not needed:

- a containers.conf of our own (`CONTAINERS_CONF`) whose `default_ulimits = []`: the
  default asks runc to set RLIMIT_NOFILE, which such a host refuses;
- `--cgroup-manager cgroupfs` when PID 1 is not systemd;
- `--isolation chroot` for builds (no nested user namespace), `--format docker` so that
  HEALTHCHECK is kept in the image (the OCI format has no field for it);
- the host's CA bundle mounted read-only over the same path in builds, so that pip
  inside the build trusts what the host trusts (a TLS-inspecting proxy, a private index);
- host networking: no bridge network is needed, each container gets its own port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's, and the stand-in base's


class EngineUnavailable(Exception):
    """No container engine that can run containers here (the reason is the message)."""


@dataclass
class ContainerEngine:
    """One engine binary with the options it needs on this host."""

    name: str  # "podman" or "docker"
    env: dict[str, str]
    global_args: list[str] = field(default_factory=list)

    @classmethod
    def find(cls, workdir: Path) -> ContainerEngine:
        """Podman, else Docker, whichever answers `info`; EngineUnavailable says why not."""
        reasons = []
        for name in ("podman", "docker"):
            if shutil.which(name) is None:
                reasons.append(f"no {name}")
                continue
            engine = cls.configure(name, workdir)
            info = engine.call(["info"], check=False, timeout=60)
            if info.returncode == 0:
                return engine
            reasons.append(f"`{name} info` failed: {info.stderr.strip()[-300:]}")
        raise EngineUnavailable("; ".join(reasons))

    @classmethod
    def configure(cls, name: str, workdir: Path) -> ContainerEngine:
        env = dict(os.environ)
        args: list[str] = []
        if name == "podman":
            conf = workdir / "containers.conf"
            conf.write_text("[containers]\ndefault_ulimits = []\n")
            env["CONTAINERS_CONF"] = str(conf)
            if Path("/proc/1/comm").read_text().strip() != "systemd":
                args += ["--cgroup-manager", "cgroupfs"]
        return cls(name, env, args)

    @property
    def is_podman(self) -> bool:
        return self.name == "podman"

    def call(
        self, args: Sequence[str | Path], *, check: bool = True, timeout: float = 120, **kwargs
    ) -> subprocess.CompletedProcess[str]:
        """Run `ENGINE ARGS...`; with check, a failure raises with its output."""
        command = [self.name, *self.global_args, *map(str, args)]
        result = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited with {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def has_image(self, tag: str) -> bool:
        return self.call(["image", "inspect", tag], check=False).returncode == 0

    def inspect_image(self, tag: str) -> dict:
        """`image inspect` of one image, with `Config.Healthcheck` where Docker puts it."""
        record = json.loads(self.call(["image", "inspect", tag]).stdout)[0]
        # Podman reports the health check beside Config, Docker inside it.
        if record.get("Healthcheck") and not record["Config"].get("Healthcheck"):
            record["Config"]["Healthcheck"] = record["Healthcheck"]
        return record

    def build(
        self, context: Path, dockerfile: Path, tag: str, *, target: str | None = None
    ) -> None:
        """Build (layers cached by the engine) and tag; an error raises with the build log.

        The image the tag named before, if another, is removed unless something else
        uses it: its last layers are the size of the image, and every edit of the
        source would leave one more behind.
        """
        before = self.inspect_image(tag)["Id"] if self.has_image(tag) else None
        args: list[str | Path] = ["build", "--network", "host", "-f", dockerfile, "-t", tag]
        if target:
            args += ["--target", target]
        if self.is_podman:
            args += ["--isolation", "chroot", "--format", "docker"]
            if CA_BUNDLE.is_file():
                args += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
        self.call([*args, context], timeout=900)
        if before not in (None, self.inspect_image(tag)["Id"]):
            self.call(["rmi", before], check=False)

    def run(self, image: str, options: Sequence[str], env: dict[str, str]) -> Container:
        """Start a detached container on the host's network."""
        name = f"nextword-test-{uuid.uuid4().hex[:10]}"
        args = ["run", "--detach", "--name", name, "--network", "host", *options]
        if self.is_podman:
            args += ["--ulimit", "host"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        self.call([*args, image])
        return Container(self, name)


@dataclass
class Container:
    """A started container, removed by `remove()`."""

    engine: ContainerEngine
    name: str

    def exec(self, command: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.engine.call(["exec", self.name, *command], check=False, timeout=timeout)

    def inspect(self) -> dict:
        return json.loads(self.engine.call(["container", "inspect", self.name]).stdout)[0]

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def signal(self, name: str) -> None:
        self.engine.call(["kill", "--signal", name, self.name])

    def wait(self, timeout: float) -> int:
        """The exit status once the container has stopped (TimeoutExpired past timeout)."""
        out = self.engine.call(["wait", self.name], timeout=timeout).stdout
        return int(out.strip().splitlines()[-1])

    def logs(self) -> str:
        result = self.engine.call(["logs", self.name], check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        self.engine.call(["rm", "--force", self.name], check=False)
