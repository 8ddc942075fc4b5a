"""README.md runs as written: every shell block a user is meant to run is run here.

Convention (visible in the README source): the line above each fenced ```` ```bash ```` block says
what this test does with it:

* ``<!-- readme-test -->``: run by :func:`test_readme_blocks_run` in every test run;
* ``<!-- readme-test: slow -->``: run too, but only with ``EDGESPLIT_README_ALL=1`` (then all
  blocks run, in order). These are single long ``edgesplit train``/``evaluate`` runs whose code
  paths ``tests/cli`` and ``tests/evaluate`` cover; each adds 10-30 s of CPU, and the default run
  must stay about a minute on 2 cores;
* ``<!-- readme-test: skip REASON -->``: not run (``make demo`` / ``make test`` set up the very
  environment this test runs in).

Every bash block carries one of the three, so a new block cannot go unchecked.

The blocks run **in README order, in one bash process** (as a user pastes them into one shell:
later blocks use files and the exported token of earlier ones), in a temporary directory that
holds what a checkout holds for them: ``.venv`` and ``examples/`` (symlinks to this checkout's).
``set -e -o pipefail`` makes any failing command fail the test, which is stricter than an
interactive shell.

Substitutions, so the commands run in seconds (otherwise they are exactly as written):

* ``--epochs 1`` for every ``edgesplit train``, ``evaluate`` and ``serve`` (and every ``--epochs N``
  becomes 1), ``--seeds 1`` for every ``evaluate`` — the README's figures come from the full
  settings, this test checks that the commands work;
* the fixed ports ``5005x`` become free ports, so the test does not collide with another
  server on the machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

RUN_MARK = "<!-- readme-test -->"
SLOW_MARK = "<!-- readme-test: slow -->"
SKIP_MARK = re.compile(r"<!-- readme-test: skip \S.*-->")
#: Set to 1 to run the slow blocks too.
ALL_ENV = "EDGESPLIT_README_ALL"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
#: One bash process for all blocks; a hung server must not hang the suite.
TIMEOUT_S = 600


def bash_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line, marker, body)`` of every ```` ```bash ```` block; ``marker`` is the line above."""
    blocks = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        above = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((line, above, m.group(1)))
    return blocks


def runnable_blocks(text: str, *, slow: bool = False) -> list[tuple[int, str]]:
    """``(line, body)`` of the blocks to run (``slow``: the slow ones too), in README order."""
    marks = (RUN_MARK, SLOW_MARK) if slow else (RUN_MARK,)
    return [(line, body) for line, mark, body in bash_blocks(text) if mark in marks]


def small(body: str, ports: dict[str, str]) -> str:
    """The block with the substitutions the module docstring lists."""
    body = re.sub(r"--epochs \d+", "--epochs 1", body)
    body = re.sub(r"--seeds \d+", "--seeds 1", body)
    body = re.sub(r"\bedgesplit (train|evaluate|serve)\b", r"edgesplit \1 --epochs 1", body)
    body = re.sub(r"\bedgesplit evaluate\b", "edgesplit evaluate --seeds 1", body)
    return re.sub(r"\b5005\d\b", lambda m: ports[m.group(0)], body)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_every_bash_block_is_marked() -> None:
    """A bash block is either run by this test or skipped with a stated reason."""
    unmarked = [
        (line, body.splitlines()[0])
        for line, mark, body in bash_blocks(README.read_text())
        if mark not in (RUN_MARK, SLOW_MARK) and not SKIP_MARK.fullmatch(mark)
    ]
    assert unmarked == [], f"README bash blocks without a readme-test marker: {unmarked}"


def test_substitutions_keep_the_command() -> None:
    """The substitutions only shrink sizes and move ports; the commands stay those written."""
    ports = {"50051": "61234"}
    out = small("edgesplit evaluate --data digits --seeds 3 --epochs 10 --port 50051\n", ports)
    assert out == (
        "edgesplit evaluate --seeds 1 --epochs 1 --data digits --seeds 1 --epochs 1 --port 61234\n"
    )
    assert small("edgesplit client --server 127.0.0.1:50051\n", ports) == (
        "edgesplit client --server 127.0.0.1:61234\n"
    )


@pytest.mark.skipif(sys.platform == "win32", reason="the README's blocks are bash")
@pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "edgesplit").exists(),
    reason="needs the dev environment the README activates (.venv)",
)
def test_readme_blocks_run(tmp_path: Path) -> None:
    slow = os.environ.get(ALL_ENV) == "1"
    blocks = runnable_blocks(README.read_text(), slow=slow)
    assert len(blocks) >= (10 if slow else 5), "the README's runnable blocks were not found"
    for name in (".venv", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    ports = {f"5005{i}": free_port() for i in range(10)}
    script = ["set -e -o pipefail"]
    for line, body in blocks:
        # the marker goes to stdout so a failure is located by the last one printed
        script += [f"echo '=== README.md line {line}'", small(body, ports)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESPLIT_", "VIRTUAL_ENV"))}
    # own session: whatever the script leaves running (a server after a failure) is ended below
    proc = subprocess.Popen(
        ["bash", "-c", "\n".join(script)],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"README blocks still running after {TIMEOUT_S} s; output:\n{out[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left running
            os.killpg(proc.pid, signal.SIGKILL)
    started = re.findall(r"^=== README\.md line (\d+)$", out, re.M)
    logs = "".join(
        f"\n--- {p.name}:\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("serve*.log"))
    )
    assert proc.returncode == 0, (
        f"README block at line {started[-1] if started else '?'} failed "
        f"(exit {proc.returncode}); output:\n{out[-4000:]}{logs}"
    )
    assert len(started) == len(blocks)
    # what the blocks are for, checked in the files and output they leave
    assert (tmp_path / "export/out/digits-vanilla/client.onnx").is_file()
    assert (tmp_path / "export/out/digits-train/client.onnx").is_file()
    assert "listening on" in (tmp_path / "serve.log").read_text()
    assert (tmp_path / "runs/metrics.jsonl").stat().st_size > 0  # the edge client's probes
    assert (tmp_path / "runs/mine").is_dir() and (tmp_path / "my.npz").is_file()
    # --json objects: the edge client's infer run, 3 network clients, `train --data my.npz`
    assert out.count('"accuracy"') >= 5, out[-4000:]
    if slow:
        assert (tmp_path / "export/out/trained/client.onnx").is_file()
        assert (tmp_path / "runs/evaluate/report.md").is_file()
        assert (tmp_path / "runs/my-npz").is_dir()
