"""An APEX-style MCP server, the baseline cordon's benchmarks compare against.

The pattern of nibzard/apex's LMDB MCP server: the official Python SDK's
high-level server API over py-lmdb, tools read / write / list with APEX's
semantics (a write is one LMDB write transaction, committed with its fsync;
values are JSON text; list returns the keys under a prefix). Served on stdio,
as every APEX agent spawns its own. No access control, no audit.

Usage: server.py DB_DIR   (pinned versions: requirements.txt beside this file)
"""

import json
import sys

import lmdb
from mcp.server.mcpserver import MCPServer

env = lmdb.open(sys.argv[1], map_size=1 << 30, max_dbs=1)
server = MCPServer("apex-style-lmdb")


@server.tool()
def read(key: str) -> str:
    """Read one key's JSON value."""
    with env.begin() as txn:
        raw = txn.get(key.encode())
    if raw is None:
        raise ValueError(f"key not found: {key}")
    return raw.decode()


@server.tool()
def write(key: str, value: str) -> str:
    """Write a JSON value to a key (one durable write transaction)."""
    with env.begin(write=True) as txn:
        txn.put(key.encode(), json.dumps(value).encode())
    return json.dumps({"ok": True, "key": key})


@server.tool()
def list(prefix: str) -> str:  # noqa: A001 (APEX's tool name)
    """List the keys under a prefix."""
    keys = []
    with env.begin() as txn:
        cur = txn.cursor()
        if cur.set_range(prefix.encode()):
            for k in cur.iternext(values=False):
                if not k.startswith(prefix.encode()):
                    break
                keys.append(k.decode())
    return json.dumps(keys)


if __name__ == "__main__":
    server.run("stdio")
