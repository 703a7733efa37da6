"""Drive the real cordon gateway through the official MCP Python SDK (see conftest.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from cordon_client import MCPError, Trace, text_of

pytestmark = pytest.mark.anyio

TOOLS = {"kv_get", "kv_put", "kv_delete", "kv_list", "kv_scan", "kv_txn", "kv_watch"}
PROTOCOL_VERSION = "2025-11-25"

ALL_TRANSPORTS = pytest.mark.parametrize(
    ("kind", "mode"),
    [(k, m) for k in ("socket", "stdio") for m in ("auto", "legacy", "2026-07-28")],
)

NESTED = {
    "name": "caf\u00e9 \u2603",
    "n": [1, -2, 2.5, None, True, False, ""],
    "obj": {"deep": {"list": [{"a": 1}, []], "empty": {}}},
}


def ok(result: Any) -> dict[str, Any]:
    """A successful tool result: structured content, mirrored exactly as JSON text content."""
    assert not result.is_error, f"unexpected tool error: {result.structured_content!r} / {text_of(result)!r}"
    data = result.structured_content
    assert isinstance(data, dict), result
    assert json.loads(text_of(result)) == data, "text content differs from structured content"
    return data


def err(result: Any, code: str) -> dict[str, Any]:
    """A tool error (is_error) with structured {"error": {"code": code, "message": str}}."""
    assert result.is_error, f"expected tool error {code!r}, got {result.structured_content!r}"
    data = result.structured_content
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert data["error"]["code"] == code, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"], data
    return data["error"]


# --------------------------------------------------------------------------------------
# 1. tools/list
# --------------------------------------------------------------------------------------


@ALL_TRANSPORTS
async def test_list_tools(gateway, kind, mode):
    async with gateway.client(kind, mode) as client:
        tools = (await client.list_tools()).tools
    names = [t.name for t in tools]
    assert sorted(names) == sorted(TOOLS), names
    assert len(names) == len(set(names)), names
    for tool in tools:
        assert isinstance(tool.input_schema, dict), tool
        assert tool.input_schema.get("type") == "object", (tool.name, tool.input_schema)


# --------------------------------------------------------------------------------------
# 2. every tool once
# --------------------------------------------------------------------------------------


@ALL_TRANSPORTS
async def test_every_tool(gateway, kind, mode):
    p = f"/t/{kind}-{mode}/kv"
    async with gateway.client(kind, mode) as client:

        async def call(name: str, **args: Any) -> Any:
            return await client.call_tool(name, args)

        # put (new key) + get: a nested JSON value round-trips
        put = ok(await call("kv_put", key=f"{p}/a", value=NESTED))
        r1 = put["revision"]
        assert put == {"key": f"{p}/a", "revision": r1, "create_revision": r1, "previous_revision": None}
        assert ok(await call("kv_get", key=f"{p}/a")) == {
            "key": f"{p}/a",
            "value": NESTED,
            "revision": r1,
            "create_revision": r1,
        }

        # CAS: wrong revision and "must not exist" both conflict and change nothing
        err(await call("kv_put", key=f"{p}/a", value=1, if_revision=r1 + 1000), "conflict")
        err(await call("kv_put", key=f"{p}/a", value=1, if_revision=0), "conflict")
        assert ok(await call("kv_get", key=f"{p}/a"))["revision"] == r1
        put = ok(await call("kv_put", key=f"{p}/a", value=2, if_revision=r1))
        r2 = put["revision"]
        assert r2 > r1
        assert put == {"key": f"{p}/a", "revision": r2, "create_revision": r1, "previous_revision": r1}

        # more keys: if_revision 0 creates; the prefix itself is covered, a sibling "/kvx" is not
        rb = ok(await call("kv_put", key=f"{p}/b", value="b", if_revision=0))["revision"]
        rp = ok(await call("kv_put", key=p, value="root"))["revision"]
        ok(await call("kv_put", key=f"{p}x", value="sibling"))
        assert r2 < rb < rp

        # list (+ paging)
        listed = ok(await call("kv_list", prefix=p))
        assert listed == {
            "keys": [
                {"key": p, "revision": rp, "create_revision": rp},
                {"key": f"{p}/a", "revision": r2, "create_revision": r1},
                {"key": f"{p}/b", "revision": rb, "create_revision": rb},
            ],
            "next_cursor": None,
        }
        page1 = ok(await call("kv_list", prefix=p, limit=2))
        assert [k["key"] for k in page1["keys"]] == [p, f"{p}/a"]
        assert isinstance(page1["next_cursor"], str)
        page2 = ok(await call("kv_list", prefix=p, limit=2, cursor=page1["next_cursor"]))
        assert [k["key"] for k in page2["keys"]] == [f"{p}/b"]
        assert page2["next_cursor"] is None

        # scan
        assert ok(await call("kv_scan", prefix=p)) == {
            "entries": [
                {"key": p, "value": "root", "revision": rp, "create_revision": rp},
                {"key": f"{p}/a", "value": 2, "revision": r2, "create_revision": r1},
                {"key": f"{p}/b", "value": "b", "revision": rb, "create_revision": rb},
            ],
            "next_cursor": None,
        }
        page = ok(await call("kv_scan", prefix=p, limit=1))
        assert [e["key"] for e in page["entries"]] == [p] and page["next_cursor"] is not None

        # txn with checks, get/put/delete
        txn = ok(
            await call(
                "kv_txn",
                checks=[{"key": f"{p}/a", "revision": r2}, {"key": f"{p}/b", "value": "b"}],
                ops=[
                    {"op": "get", "key": f"{p}/a"},
                    {"op": "get", "key": f"{p}/missing"},
                    {"op": "put", "key": f"{p}/c", "value": {"c": [1, 2]}},
                    {"op": "delete", "key": f"{p}/b"},
                ],
            )
        )
        rt = txn["revision"]
        assert rt > rp
        get_a, get_missing, put_c, del_b = txn["results"]
        assert get_a == {
            "op": "get",
            "key": f"{p}/a",
            "found": True,
            "entry": {"key": f"{p}/a", "value": 2, "revision": r2, "create_revision": r1},
        }
        assert get_missing["op"] == "get" and get_missing["key"] == f"{p}/missing"
        assert get_missing["found"] is False and get_missing.get("entry") is None
        assert put_c == {"op": "put", "key": f"{p}/c", "revision": rt, "create_revision": rt, "previous_revision": None}
        assert del_b == {"op": "delete", "key": f"{p}/b", "deleted": True, "revision": rt}

        # a failed check writes nothing
        err(
            await call(
                "kv_txn",
                checks=[{"key": f"{p}/a", "revision": r2 + 1000}],
                ops=[{"op": "put", "key": f"{p}/d", "value": 1}, {"op": "delete", "key": f"{p}/a"}],
            ),
            "check_failed",
        )
        err(await call("kv_get", key=f"{p}/d"), "not_found")
        assert ok(await call("kv_get", key=f"{p}/a"))["revision"] == r2

        # watch: everything under the prefix since just before the first put (returns at once)
        t0 = time.monotonic()
        watch = ok(await call("kv_watch", prefix=p, since_revision=r1 - 1, timeout_ms=5000))
        assert time.monotonic() - t0 < 4, "kv_watch with pending events did not return immediately"
        expected_events = [
            {"revision": r1, "key": f"{p}/a", "type": "put", "value": NESTED, "create_revision": r1},
            {"revision": r2, "key": f"{p}/a", "type": "put", "value": 2, "create_revision": r1},
            {"revision": rb, "key": f"{p}/b", "type": "put", "value": "b", "create_revision": rb},
            {"revision": rp, "key": p, "type": "put", "value": "root", "create_revision": rp},
            {"revision": rt, "key": f"{p}/c", "type": "put", "value": {"c": [1, 2]}, "create_revision": rt},
            {"revision": rt, "key": f"{p}/b", "type": "delete"},
        ]
        assert watch == {"events": expected_events, "revision": rt, "more": False, "timed_out": False}
        # ... and again in pages of (at most) 2 events, resuming from the returned revision
        seen: list[dict[str, Any]] = []
        since = r1 - 1
        for _ in range(10):
            w = ok(await call("kv_watch", prefix=p, since_revision=since, timeout_ms=100, limit=2))
            assert not w["timed_out"] and 1 <= len(w["events"]) <= 2, w
            assert all(e["revision"] > since for e in w["events"]), w
            seen += w["events"]
            since = w["revision"]
            if not w["more"]:
                break
        assert seen == expected_events

        # delete: CAS conflict, then delete, then a no-op delete
        err(await call("kv_delete", key=f"{p}/a", if_revision=r1), "conflict")
        deleted = ok(await call("kv_delete", key=f"{p}/a", if_revision=r2))
        rd = deleted["revision"]
        assert deleted == {"key": f"{p}/a", "deleted": True, "revision": rd} and rd > rt
        err(await call("kv_get", key=f"{p}/a"), "not_found")
        again = ok(await call("kv_delete", key=f"{p}/a"))
        assert again["key"] == f"{p}/a" and again["deleted"] is False

        # errors: missing key, invalid keys
        missing = err(await call("kv_get", key=f"{p}/nope"), "not_found")
        assert f"{p}/nope" in missing["message"]
        err(await call("kv_get", key="/a/../b"), "invalid_key")
        err(await call("kv_put", key="/a/../b", value=1), "invalid_key")
        err(await call("kv_get", key="no-leading-slash"), "invalid_key")


# --------------------------------------------------------------------------------------
# 3. protocol version negotiation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy", "2026-07-28"])
async def test_protocol_version(gateway, mode):
    trace = Trace()
    async with gateway.client("socket", mode, trace=trace) as client:
        # auto: server/discover is answered, so the SDK speaks 2026-07-28 (no handshake).
        want = PROTOCOL_VERSION if mode == "legacy" else "2026-07-28"
        assert client.protocol_version == want
        if mode != "2026-07-28":  # pinned: the SDK synthesises a discover result of its own
            assert client.server_info.name == "cordon"
        ok(await client.call_tool("kv_put", {"key": f"/pv/{mode}", "value": 1}))

    sent = trace.methods("send")
    if mode == "2026-07-28":
        # Pinned: no probe, no handshake; every request names the version in _meta and the
        # gateway serves it (a 2025-only server would answer -32022 or -32602).
        assert "initialize" not in sent and "server/discover" not in sent, sent
        call = next(m for m in trace.messages("send") if m.get("method") == "tools/call")
        assert call["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28", call
        reply = next(m for m in trace.messages("recv") if m.get("id") == call["id"])
        assert reply["result"]["resultType"] == "complete", reply
    elif mode == "auto":
        assert sent[0] == "server/discover", sent
        assert "initialize" not in sent, sent
        discover_id = next(m["id"] for m in trace.messages("send") if m.get("method") == "server/discover")
        reply = next(m for m in trace.messages("recv") if m.get("id") == discover_id)
        assert "2026-07-28" in reply["result"]["supportedVersions"], reply
    else:
        assert sent[:2] == ["initialize", "notifications/initialized"], sent
        assert "server/discover" not in sent
        init_id = next(m["id"] for m in trace.messages("send") if m.get("method") == "initialize")
        init_reply = next(m for m in trace.messages("recv") if m.get("id") == init_id)
        assert init_reply["result"]["protocolVersion"] == PROTOCOL_VERSION


# --------------------------------------------------------------------------------------
# 4. kv_watch timing out
# --------------------------------------------------------------------------------------


async def test_watch_times_out_when_nothing_new(gateway):
    p = "/t/watch-idle"
    async with gateway.client("socket", "legacy") as client:
        head = ok(await client.call_tool("kv_put", {"key": f"{p}/k", "value": 1}))["revision"]
        t0 = time.monotonic()
        w = ok(await client.call_tool("kv_watch", {"prefix": p, "since_revision": head, "timeout_ms": 100}))
        elapsed = time.monotonic() - t0
    assert w["events"] == []
    assert w["timed_out"] is True
    assert w["more"] is False
    assert w["revision"] >= head
    assert 0.08 <= elapsed < 5, elapsed


# --------------------------------------------------------------------------------------
# 5. unknown tool
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["socket", "stdio"])
async def test_unknown_tool_is_invalid_params(gateway, kind):
    async with gateway.client(kind, "legacy") as client:
        with pytest.raises(MCPError) as info:
            await client.call_tool("kv_nope", {"key": "/x"})
        assert info.value.error.code == -32602, info.value.error
        # the session is still usable afterwards
        assert len((await client.list_tools()).tools) == len(TOOLS)


# --------------------------------------------------------------------------------------
# 6. what a narrow role and a refused connection look like through the SDK
# --------------------------------------------------------------------------------------

MODES = pytest.mark.parametrize("mode", ["auto", "legacy", "2026-07-28"])


@MODES
async def test_denied_tool_and_denied_key(limited_gateway, mode):
    from mcp.shared.exceptions import MCPError

    async with limited_gateway.client("socket", mode) as client:
        # Control: what the role may do works.
        ok(await client.call_tool("kv_put", {"key": f"/pub/{mode}", "value": 1}))
        assert {t.name for t in (await client.list_tools()).tools} == {"kv_get", "kv_put"}
        # A tool the role may not call: a JSON-RPC error with cordon's "denied" code, which no
        # SDK uses for its own errors (-32001 is the SDKs' request timeout).
        with pytest.raises(MCPError) as denied:
            await client.call_tool("kv_delete", {"key": f"/pub/{mode}"})
        assert denied.value.error.code == -32010, denied.value.error
        assert "may not call kv_delete" in denied.value.error.message
        # A key outside the role's scopes: a tool error the model can read.
        e = err(await client.call_tool("kv_get", {"key": "/private/x"}), "denied")
        assert "may not read /private/x" in e["message"], e
        # The connection still serves after both.
        ok(await client.call_tool("kv_get", {"key": f"/pub/{mode}"}))


@MODES
async def test_refused_connection_names_its_reason(limited_gateway, mode):
    """The second connection of an agent limited to one is refused, and the SDK shows why.
    In `auto` mode the SDK takes the refusal of its server/discover probe for "a legacy
    server" and retries with initialize: the gateway answers that with the reason too."""
    from mcp.shared.exceptions import MCPError

    async with limited_gateway.client("socket", "legacy") as holder:
        ok(await holder.call_tool("kv_put", {"key": "/pub/held", "value": 1}))
        with pytest.raises(MCPError) as refused:
            async with limited_gateway.client("socket", mode) as second:
                await second.call_tool("kv_get", {"key": "/pub/held"})
        assert refused.value.error.code == -32014, refused.value.error
        assert "already has 1 connections" in refused.value.error.message, refused.value.error
        # Control: the held connection was never disturbed.
        ok(await holder.call_tool("kv_get", {"key": "/pub/held"}))
