"""Run ``referral-service serve`` as a real subprocess, the way ``make run`` does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None):
        self.port = port or free_port()
        self.http_port = free_port()
        self.workdir = workdir
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
        self.env.update(
            {
                "REFERRAL_DATA_DIR": str(workdir / "data"),
                "REFERRAL_GRPC_PORT": str(self.port),
                "REFERRAL_HTTP_PORT": str(self.http_port),
            }
        )
        self.env.update(env or {})
        self.process: subprocess.Popen[str] | None = None
        self.output = ""
        #: What the server has printed so far (read by a thread while it runs).
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 40.0) -> LiveServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "referral_service", "serve", *self.args],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines = []
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.stop()}") from None
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"server did not start:\n{self.stop()}")

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._lines.append(line)

    @property
    def log(self) -> str:
        """What the running server has printed so far."""
        return "".join(self._lines)

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Until the server has printed ``text`` (bounded; fails with what it printed)."""
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline or (self.process is not None and self.process.poll() is not None):
                raise AssertionError(f"the server never printed {text!r}:\n{self.log}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> str:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._reader = None
        self.output += "".join(self._lines)
        self._lines = []
        return self.output

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode
