"""Test-client harness for cordon, built on the official MCP Python SDK (mcp==2.3.0).

Usage (inside an async test, any anyio backend)::

    from cordon_client import connect, text_of

    async with connect("socket", "/run/cordon.sock", mode="legacy") as client:
        tools = (await client.list_tools()).tools
        result = await client.call_tool("echo", {"msg": "hi"})
        assert not result.is_error
        assert result.structured_content == {"result": "hi"}
        assert text_of(result) == "hi"

``connect`` yields a connected ``mcp.Client`` (the handshake has already been done:
``initialize`` + ``notifications/initialized`` in "legacy" mode, ``server/discover`` with
fallback to ``initialize`` in "auto" mode). Result objects are pydantic models with
*snake_case* attributes only: ``structured_content``, ``is_error``, ``content``.

Kinds:
  * ``"socket"``: ``target`` is a Unix socket path; newline-delimited JSON-RPC in both
    directions (one JSON message per line). Transport implemented here (``unix_socket_client``)
    in the same shape as ``mcp.client.stdio.stdio_client``.
  * ``"stdio"``: ``target`` is a command list, e.g. ``["/path/cordon", "bridge", "--socket", p]``,
    spawned with the SDK's ``stdio_client``.

Pass ``trace=Trace()`` to record every JSON-RPC message in both directions (raw lines for
"socket"; for "stdio" the outgoing lines are byte-identical to what stdio_client writes and the
incoming ones are re-serialised from the parsed message).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import anyio
import mcp_types as types
from mcp import Client, StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

__all__ = [
    "MCPError",
    "Trace",
    "connect",
    "is_error",
    "structured",
    "text_of",
    "unix_socket_client",
]

Kind = Literal["socket", "stdio"]
Mode = Literal["auto", "legacy", "2026-07-28"]

DEFAULT_READ_TIMEOUT = 10.0
"""Per-request timeout (seconds). Without one, a request the gateway never answers hangs forever."""

_FLUSH_TIMEOUT = 0.5


# --------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------


@dataclass
class Trace:
    """Records wire traffic as (direction, line) tuples; direction is "send" or "recv"."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, direction: str, line: str) -> None:
        self.lines.append((direction, line))

    def messages(self, direction: str | None = None) -> list[dict[str, Any]]:
        """Parsed messages (lines that are not valid JSON are returned as {"_unparsed": line})."""
        out: list[dict[str, Any]] = []
        for d, line in self.lines:
            if direction is not None and d != direction:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"_unparsed": line})
        return out

    def methods(self, direction: str = "send") -> list[str]:
        """Method names of requests/notifications seen in one direction, in order."""
        return [m["method"] for m in self.messages(direction) if "method" in m]


def _dump(message: SessionMessage) -> str:
    # Exactly what the SDK's stdio transports write.
    return message.message.model_dump_json(by_alias=True, exclude_unset=True)


@asynccontextmanager
async def _traced(streams: Any, trace: Trace) -> AsyncIterator[Any]:
    """Wrap a transport's (read, write) memory-stream pair so every message is recorded."""
    inner_read, inner_write = streams
    out_send, out_recv = anyio.create_memory_object_stream[SessionMessage](0)
    in_send, in_recv = anyio.create_memory_object_stream[SessionMessage | Exception](0)

    async def pump_out() -> None:
        async with out_recv:
            async for msg in out_recv:
                trace.add("send", _dump(msg))
                try:
                    await inner_write.send(msg)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    break
        await inner_write.aclose()

    async def pump_in() -> None:
        async with in_send:
            try:
                async for item in inner_read:
                    trace.add("recv", _dump(item) if isinstance(item, SessionMessage) else f"<exception {item!r}>")
                    await in_send.send(item)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
                pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump_out)
        tg.start_soon(pump_in)
        try:
            yield in_recv, out_send
        finally:
            out_send.close()
            in_recv.close()
            tg.cancel_scope.cancel()


# --------------------------------------------------------------------------------------
# Unix-socket transport (newline-delimited JSON-RPC)
# --------------------------------------------------------------------------------------


def _parse_line(line: str) -> SessionMessage | Exception:
    """Same contract as mcp.client.stdio._parse_line: parse errors are *returned*, and the
    dispatcher hands them to Client(message_handler=...) instead of failing the session."""
    try:
        message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        return exc
    return SessionMessage(message)


@asynccontextmanager
async def unix_socket_client(
    path: str | os.PathLike[str],
    *,
    trace: Trace | None = None,
    encoding: str = "utf-8",
) -> AsyncIterator[tuple[Any, Any]]:
    """Connect to a Unix socket speaking newline-delimited JSON-RPC.

    Yields ``(read_stream, write_stream)``: ``read_stream`` yields ``SessionMessage`` (or an
    ``Exception`` for a line that failed to parse), ``write_stream`` accepts ``SessionMessage``.
    This is the ``mcp.client.Transport`` shape, so it can be passed to ``mcp.Client(...)``
    directly. When the server closes the connection the read stream ends, and every pending
    request fails with ``MCPError(CONNECTION_CLOSED)``.
    """
    sock = await anyio.connect_unix(os.fspath(path))

    read_stream_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_stream_reader = anyio.create_memory_object_stream[SessionMessage](0)
    writer_done = anyio.Event()

    async def socket_reader() -> None:
        buffer = b""
        try:
            async with read_stream_writer:
                while True:
                    try:
                        chunk = await sock.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                        break
                    lines = (buffer + chunk).split(b"\n")
                    buffer = lines.pop()
                    for raw in lines:
                        line = raw.decode(encoding, errors="replace")
                        if trace is not None:
                            trace.add("recv", line)
                        try:
                            await read_stream_writer.send(_parse_line(line))
                        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                            return  # session gone
                if buffer.strip():
                    # Unterminated final line before EOF: surface it like the SDK would a bad line.
                    line = buffer.decode(encoding, errors="replace")
                    if trace is not None:
                        trace.add("recv", line)
                    try:
                        await read_stream_writer.send(_parse_line(line))
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        return
        except anyio.ClosedResourceError:
            pass

    async def socket_writer() -> None:
        try:
            async with write_stream_reader:
                async for session_message in write_stream_reader:
                    line = _dump(session_message)
                    if trace is not None:
                        trace.add("send", line)
                    await sock.send((line + "\n").encode(encoding))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # Peer gone: end the read side so waiters see CONNECTION_CLOSED, not a hang.
            await read_stream_writer.aclose()
        finally:
            writer_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(socket_reader)
        tg.start_soon(socket_writer)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):
                # Flush anything already accepted, half-close, then tear down (all bounded).
                write_stream.close()
                with anyio.move_on_after(_FLUSH_TIMEOUT):
                    await writer_done.wait()
                try:
                    await sock.send_eof()
                except Exception:
                    pass
                read_stream.close()
                tg.cancel_scope.cancel()
                await sock.aclose()
                for s in (read_stream_writer, write_stream_reader):
                    await s.aclose()


# --------------------------------------------------------------------------------------
# connect()
# --------------------------------------------------------------------------------------


def _stderr_has_fd() -> bool:
    # stdio_client hands errlog to the child as its stderr, so it needs a real fd
    # (pytest's capsys replaces sys.stderr with an object that has none).
    try:
        sys.stderr.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


@asynccontextmanager
async def connect(
    kind: Kind,
    target: str | os.PathLike[str] | Sequence[str],
    mode: Mode = "auto",
    *,
    read_timeout: float | None = DEFAULT_READ_TIMEOUT,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    errlog: TextIO | None = None,
    trace: Trace | None = None,
    message_handler: Any = None,
    client_name: str = "cordon-tests",
) -> AsyncIterator[Client]:
    """Open an initialized MCP client against cordon.

    Args:
        kind: "socket" (target = Unix socket path) or "stdio" (target = command list).
        mode: "auto" (server/discover probe, fallback to initialize), "legacy" (initialize only)
            or "2026-07-28" (pinned: no probe, no handshake; every request carries that version).
        read_timeout: per-request timeout in seconds (MCPError code -32001 on expiry); None = wait forever.
        env: stdio only. Extra environment for the child, merged over the SDK default, which passes
            through ONLY HOME, LOGNAME, PATH, SHELL, TERM, USER (so e.g. RUST_LOG must be given here).
        errlog: stdio only. File object (with a real fd) that receives the child's stderr.
        trace: a Trace that records every JSON-RPC message sent/received.
        message_handler: forwarded to mcp.Client; receives server notifications and transport
            Exceptions (e.g. unparseable lines).

    Yields:
        mcp.Client (already handshaken). Useful members: list_tools(), call_tool(name, args),
        protocol_version, server_info, server_capabilities, session (the raw ClientSession).
    """
    if mode not in ("auto", "legacy", "2026-07-28"):
        raise ValueError(f"mode must be 'auto', 'legacy' or '2026-07-28', got {mode!r}")

    owned_errlog: TextIO | None = None
    if kind == "socket":
        if not isinstance(target, (str, os.PathLike)):
            raise TypeError("socket target must be a path")
        transport = unix_socket_client(target, trace=trace)
    elif kind == "stdio":
        if isinstance(target, (str, os.PathLike)) or not target:
            raise TypeError("stdio target must be a non-empty command list")
        cmd = [os.fspath(a) for a in target]
        params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=env, cwd=cwd)
        if errlog is None and not _stderr_has_fd():
            owned_errlog = errlog = open(os.devnull, "w")  # noqa: SIM115
        transport = stdio_client(params, errlog=errlog or sys.stderr)
        if trace is not None:
            transport = _traced_transport(transport, trace)
    else:
        raise ValueError(f"kind must be 'socket' or 'stdio', got {kind!r}")

    client = Client(
        transport,
        mode=mode,
        read_timeout_seconds=read_timeout,
        message_handler=message_handler,
        client_info=types.Implementation(name=client_name, version="0"),
        cache=None,  # never serve tools/list etc. from a client-side cache in tests
    )
    # NB: do not wrap the handshake in anyio.fail_after(): Client.__aenter__ opens task groups
    # that outlive it, and leaving a cancel scope around them raises "non-innermost cancel scope".
    # The handshake is bounded by read_timeout (initialize) and the SDK's 10 s discover timeout.
    try:
        async with client:
            yield client
    except BaseExceptionGroup as group:
        # ClientSession.__aexit__ and the transport's task group each wrap whatever escapes the
        # `async with` body (including pytest assertion failures and MCPError) in an
        # ExceptionGroup, so a failing assert surfaces as ExceptionGroup(ExceptionGroup(...)).
        # Hand a lone leaf back as itself; leave real multi-error groups and cancellation alone.
        leaf = _sole_leaf(group)
        if leaf is None or isinstance(leaf, anyio.get_cancelled_exc_class()):
            raise
        raise leaf from None
    finally:
        if owned_errlog is not None:
            owned_errlog.close()


def _sole_leaf(exc: BaseException) -> BaseException | None:
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def _traced_transport(transport: Any, trace: Trace) -> AsyncIterator[Any]:
    async with transport as streams:
        async with _traced(streams, trace) as wrapped:
            yield wrapped


# --------------------------------------------------------------------------------------
# result helpers (mcp 2.3.0 result models are snake_case pydantic models)
# --------------------------------------------------------------------------------------


def structured(result: types.CallToolResult) -> Any:
    """The tool's structuredContent (``result.structured_content``), or None."""
    return result.structured_content


def is_error(result: types.CallToolResult) -> bool:
    """The tool's isError flag (``result.is_error``; defaults to False when absent)."""
    return result.is_error


def text_of(result: types.CallToolResult | types.GetPromptResult | Any) -> str:
    """Concatenated text of all TextContent blocks in ``result.content``."""
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))
