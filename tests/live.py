"""Run ``referral-service serve`` as a real subprocess, the way ``make run`` does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> str:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        self.output += out or ""
        return self.output

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode
