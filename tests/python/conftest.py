"""Fixtures that run the real cordon gateway binary for the SDK tests.

The binary is $CORDON_BIN if set, else <repo>/target/debug/cordon (repo = two levels above
this file). Build it first with `cargo build`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cordon_client import Trace, connect

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "cordon"

READY_TIMEOUT = 30.0
"""Overall bound (s) on the gateway printing its readiness line."""

STOP_TIMEOUT = 15.0
"""Bound (s) on the gateway exiting after SIGTERM."""

AGENT = "coder"

CONFIG = """\
[gateway]
store = "state/store"
runtime_dir = "state/run"
policy = "policy.toml"
map_size = "64MiB"

[agents.coder]
role = "coder"
"""

# The SDK tests exercise the tool surface, not the policy: coder may do anything.
POLICY = """\
[roles.coder]
tools = ["kv_*"]
read = ["/**"]
write = ["/**"]
delete = ["/**"]
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def cordon_bin() -> Path:
    path = Path(os.environ.get("CORDON_BIN") or DEFAULT_BIN)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"cordon binary not found or not executable: {path} (run `cargo build` or set CORDON_BIN)")
    return path


@dataclass
class Gateway:
    bin: Path
    dir: Path
    pid: int
    socket: Path
    stderr_log: Path

    def bridge_cmd(self) -> list[str]:
        return [str(self.bin), "bridge", "--socket", str(self.socket)]

    def target(self, kind: str) -> Any:
        return str(self.socket) if kind == "socket" else self.bridge_cmd()

    @asynccontextmanager
    async def client(self, kind: str, mode: str, *, trace: Trace | None = None) -> AsyncIterator[Any]:
        """A connected, handshaken mcp.Client over `kind` ("socket" or "stdio" via the bridge)."""
        if kind == "stdio":
            # The bridge's stderr goes to a file (never an unread pipe).
            with open(self.dir / "bridge-stderr.log", "a", encoding="utf-8") as errlog:
                async with connect(kind, self.bridge_cmd(), mode, errlog=errlog, trace=trace) as client:
                    yield client
        else:
            async with connect(kind, str(self.socket), mode, trace=trace) as client:
                yield client

    def stderr_tail(self, n: int = 40) -> str:
        try:
            lines = self.stderr_log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            return f"<cannot read {self.stderr_log}: {exc}>"
        return "\n".join(lines[-n:])


def _read_ready_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
    """Blocking readline on the gateway's stdout, bounded by `timeout`. None if it timed out."""
    box: dict[str, Any] = {}

    def reader() -> None:
        try:
            box["line"] = proc.stdout.readline()  # type: ignore[union-attr]
        except Exception as exc:  # pragma: no cover - surfaced below
            box["exc"] = exc

    thread = threading.Thread(target=reader, name="cordon-ready-reader", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        # Kill so the readline sees EOF and the thread ends; the caller reports the timeout.
        proc.kill()
        thread.join(5)
        return None
    if "exc" in box:
        raise box["exc"]
    return box["line"]


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM and reap. Returns (exit code, note). Always reaps, escalating to SIGKILL."""
    note = ""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            note = f"gateway did not exit within {STOP_TIMEOUT}s of SIGTERM; killed"
            proc.kill()
            proc.wait()
    else:
        note = f"gateway had already exited (code {proc.returncode}) before SIGTERM"
    return proc.returncode, note


@contextmanager
def _running(root: Path, cordon_bin: Path, config: str, policy: str) -> Iterator[Gateway]:
    """A gateway on `config` and `policy` in `root`; SIGTERMed and reaped at the end, which
    asserts a clean exit."""
    config_path = root / "cordon.toml"
    config_path.write_text(config, encoding="utf-8")
    (root / "policy.toml").write_text(policy, encoding="utf-8")
    stderr_log = root / "gateway-stderr.log"
    expected_socket = root / "state" / "run" / "agents" / AGENT / "mcp.sock"

    with open(stderr_log, "wb") as errf:
        proc = subprocess.Popen(
            [str(cordon_bin), "gateway", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errf,
            cwd=root,
        )
    gw = Gateway(bin=cordon_bin, dir=root, pid=proc.pid, socket=expected_socket, stderr_log=stderr_log)
    try:
        line = _read_ready_line(proc, READY_TIMEOUT)
        if line is None:
            pytest.fail(f"gateway not ready within {READY_TIMEOUT}s\n--- stderr ---\n{gw.stderr_tail()}")
        if not line:
            proc.wait(timeout=STOP_TIMEOUT)
            pytest.fail(
                f"gateway exited (code {proc.returncode}) before printing its ready line\n"
                f"--- stderr ---\n{gw.stderr_tail()}"
            )
        try:
            ready = json.loads(line)
        except ValueError:
            pytest.fail(f"ready line is not JSON: {line!r}\n--- stderr ---\n{gw.stderr_tail()}")
        assert ready.get("ready") is True, ready
        assert ready.get("pid") == proc.pid, ready
        sockets = ready.get("sockets")
        assert isinstance(sockets, dict) and set(sockets) == {AGENT}, ready
        sock = Path(sockets[AGENT])
        assert sock.is_absolute(), f"socket path in ready line is not absolute: {sock}"
        assert sock == expected_socket, ready
        assert sock.is_socket(), f"{sock} is not a socket after the ready line"
        yield gw
    finally:
        code, note = _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()

    assert code == 0, f"gateway exit code {code} after SIGTERM ({note})\n--- stderr ---\n{gw.stderr_tail()}"
    assert not note, note
    assert not expected_socket.exists(), f"socket {expected_socket} not removed on shutdown"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, cordon_bin: Path) -> Iterator[Gateway]:
    """One gateway per test module, on CONFIG and POLICY."""
    with _running(tmp_path_factory.mktemp("gateway"), cordon_bin, CONFIG, POLICY) as gw:
        yield gw


LIMITED_CONFIG = CONFIG.replace('map_size = "64MiB"\n', 'map_size = "64MiB"\nmax_connections_per_agent = 1\n')

# A narrow role: reads under /pub only, no kv_delete.
LIMITED_POLICY = """\
[roles.coder]
tools = ["kv_get", "kv_put"]
read = ["/pub/**"]
write = ["/pub/**"]
"""


@pytest.fixture(scope="module")
def limited_gateway(tmp_path_factory: pytest.TempPathFactory, cordon_bin: Path) -> Iterator[Gateway]:
    """A gateway that serves one connection per agent, to a narrow role."""
    assert "max_connections_per_agent = 1" in LIMITED_CONFIG
    with _running(tmp_path_factory.mktemp("limited"), cordon_bin, LIMITED_CONFIG, LIMITED_POLICY) as gw:
        yield gw
