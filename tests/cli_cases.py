"""Bad inputs a new user meets, each run through the real `aesthetics` command in a subprocess.

The test suite asserts each case (tests/test_cli_errors.py); ``python -m tests.cli_cases`` prints the
table of case, exit code, seconds and first line of stderr on a freshly made img2dataset shard.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.errors import ExitCode
from pipeline.io import layout

REPO = Path(__file__).resolve().parents[1]
AESTHETICS = [sys.executable, "-m", "pipeline.cli"]
NO_FILE_PIN = "0" * 64


@dataclass(frozen=True)
class Workspace:
    """A folder to break things in, beside good shards and a good head."""

    root: Path
    shards: Path  # img2dataset shards that score fine
    head: str  # a --head value that loads: "PATH,sha256=HEX"

    @property
    def output(self) -> Path:
        return self.root / "scores"

    def score(self, *extra: str, input: str | Path | None = None, output: str | Path | None = None,
              head: str | None = None, model: str = "tiny-random") -> list[str]:
        return ["score", "--input", str(input or self.shards), "--output", str(output or self.output),
                "--model", model, "--precision", "fp32", "--head", head or self.head, *extra]

    @property
    def weights(self) -> Path:
        return self.root / "tiny.safetensors"


@dataclass(frozen=True)
class Case:
    name: str
    expected: ExitCode
    argv: Callable[[Workspace], list[str]]
    setup: Callable[[Workspace], None] = lambda ws: None
    undo: Callable[[Workspace], None] = lambda ws: None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    code: int
    seconds: float
    stdout: str
    stderr: str
    written: list[str]  # what the output holds afterwards that it did not hold before

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)


def can_make_immutable(scratch: Path) -> bool:
    """Whether this filesystem and user can set the immutable flag (ext4 as root: yes)."""
    probe = scratch / "immutable-probe"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        _immutable(probe, True)
    except (OSError, subprocess.CalledProcessError):
        return False
    _immutable(probe, False)
    return True


def _save_tiny_weights(ws: Workspace) -> None:
    """Real open_clip weights, of the tiny architecture: a file that loads, but into another model."""
    import open_clip
    from safetensors.torch import save_file

    from pipeline.models.clip import _register_tiny_model

    _register_tiny_model()
    state = open_clip.create_model("tiny-random").state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(ws.weights))


def _sha256(path: Path) -> str:
    from pipeline.models.weights import sha256_of

    return sha256_of(path)


def _hold_output(ws: Workspace) -> None:
    """A lease of a live run (this process) on the output."""
    _write(ws.output / layout.LOCK, json.dumps({
        "run_id": "20260101T000000Z-other", "host": socket.gethostname(), "pid": os.getpid(),
        "expires_at": time.time() + 3600}))


CASES: tuple[Case, ...] = (
    Case("output is an existing file", ExitCode.OUTPUT, lambda ws: ws.score(output=ws.root / "a-file"),
         setup=lambda ws: _write(ws.root / "a-file", "")),
    Case("output folder cannot be written", ExitCode.OUTPUT, lambda ws: ws.score(output=ws.root / "locked" / "scores"),
         setup=lambda ws: ((ws.root / "locked").mkdir(), _immutable(ws.root / "locked", True)),
         undo=lambda ws: _immutable(ws.root / "locked", False)),
    Case("output inside the input", ExitCode.OUTPUT, lambda ws: ws.score(output=ws.shards / "scores")),
    Case("input inside the output", ExitCode.OUTPUT, lambda ws: ws.score(output=ws.shards.parent)),
    Case("config is not YAML", ExitCode.USAGE, lambda ws: ws.score("--config", str(ws.root / "bad.yaml")),
         setup=lambda ws: _write(ws.root / "bad.yaml", "input: [x\n")),
    Case("config file missing", ExitCode.USAGE, lambda ws: ws.score("--config", str(ws.root / "none.yaml"))),
    Case("tiny-random with a sha256 pin", ExitCode.USAGE,
         lambda ws: ws.score("--pretrained-sha256", NO_FILE_PIN)),
    Case("input does not exist", ExitCode.INPUT, lambda ws: ws.score(input=ws.root / "no-such-folder")),
    Case("input is an empty folder", ExitCode.INPUT, lambda ws: ws.score(input=ws.root / "empty"),
         setup=lambda ws: (ws.root / "empty").mkdir()),
    Case("input is not a tar", ExitCode.INPUT, lambda ws: ws.score(input=ws.root / "notes.txt"),
         setup=lambda ws: _write(ws.root / "notes.txt", "hello")),
    Case("exclusion list has a line that is no digest", ExitCode.INPUT,
         lambda ws: ws.score("--exclude-hashes", str(ws.root / "list.txt")),
         setup=lambda ws: _write(ws.root / "list.txt", "d41d8cd98f00b204e9800998ecf8427e\nnot-a-digest\n")),
    Case("head is not a torch file", ExitCode.WEIGHTS, lambda ws: ws.score(head=str(ws.root / "head.pth")),
         setup=lambda ws: _write(ws.root / "head.pth", b"not a torch file" * 8)),
    Case("head name unknown", ExitCode.WEIGHTS, lambda ws: ws.score(head="no_such_head")),
    Case("CLIP weights not the pinned file", ExitCode.WEIGHTS,
         lambda ws: ws.score("--pretrained", str(ws.weights), "--pretrained-sha256", NO_FILE_PIN, model="ViT-B-32"),
         setup=_save_tiny_weights),
    Case("CLIP weights of another architecture", ExitCode.WEIGHTS,
         lambda ws: ws.score("--pretrained", str(ws.weights), "--pretrained-sha256", _sha256(ws.weights),
                             model="ViT-B-32"),
         setup=_save_tiny_weights),
    Case("object store refuses connections", ExitCode.UNREACHABLE,
         lambda ws: ws.score("--storage-option", "endpoint_url=http://127.0.0.1:1", input="s3://bucket/shards")),
    Case("another run holds the output", ExitCode.BUSY, lambda ws: ws.score(), setup=_hold_output),
)


def _listing(folder: Path) -> set[str]:
    if not folder.exists():
        return set()
    return {str(path.relative_to(folder)) for path in folder.rglob("*")} | {"."}


def run_case(case: Case, ws: Workspace, *extra_flags: str) -> Outcome:
    """Set the case up, run the command, and undo what would stop the workspace being cleaned."""
    case.setup(ws)
    argv = case.argv(ws)
    output = Path(argv[argv.index("--output") + 1])
    before = _listing(output)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(case.env)
    start = time.perf_counter()
    try:
        result = subprocess.run([*AESTHETICS, *extra_flags, *argv], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
    finally:
        case.undo(ws)
    seconds = time.perf_counter() - start
    written = sorted(_listing(output) - before) if not output.is_file() else []
    return Outcome(result.returncode, seconds, result.stdout, result.stderr, written)


def workspace(root: Path, shards: Path) -> Workspace:
    from pipeline.demo import random_v2_head

    path, digest = random_v2_head(root / "heads")
    return Workspace(root, shards, f"{path},sha256={digest}")


def main() -> int:
    import tempfile

    from pipeline.sample_data import build_sample_dataset

    with tempfile.TemporaryDirectory() as scratch:
        data = build_sample_dataset(Path(scratch) / "data", n_images=5, images_per_shard=5, broken_urls=0)
        print("| case | exit code | seconds | first line of stderr |\n|---|---:|---:|---|")
        for case in CASES:
            root = Path(scratch) / case.name.replace(" ", "-")
            root.mkdir()
            outcome = run_case(case, workspace(root, Path(data.shards_dir)))
            first = outcome.stderr_lines[0] if outcome.stderr_lines else ""
            print(f"| {case.name} | {outcome.code} | {outcome.seconds:.1f} | `{first}` |", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
