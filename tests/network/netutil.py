"""Start real ``edgesplit serve`` processes on 127.0.0.1 and run real client processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_tokens(path: Path, names: list[str]) -> dict[str, str]:
    """A token file for ``names``: each trains and reads Status (``role=train,admin``)."""
    tokens = {name: f"{name}-token-{i:04d}-abcdefghijkl" for i, name in enumerate(names)}
    path.write_text("".join(f"{n} {t} role=train,admin\n" for n, t in tokens.items()))
    path.chmod(0o600)
    return tokens


class Server:
    """An ``edgesplit serve`` subprocess; ``address`` once it printed 'listening on'."""

    def __init__(self, *args: str, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgesplit.cli.main", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        deadline = time.monotonic() + timeout
        self.address = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"serve exited: {self.proc.stderr.read()}")
            match = re.search(r"listening on (\S+)", line)
            if match:
                self.address = match.group(1)
                return
        raise RuntimeError("serve did not start in time")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def client(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgesplit.cli.main", "client", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=ENV,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"client exited {proc.returncode}: {err[-2000:]}")
    return json.loads(out)
