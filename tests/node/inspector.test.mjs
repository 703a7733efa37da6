// The MCP inspector CLI (@modelcontextprotocol/inspector-cli 1.0.3) against the real gateway,
// through `cordon bridge --socket S` as its stdio server (node:test).
// Run: CORDON_BIN=target/debug/cordon node --test tests/node/inspector.test.mjs

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { CORDON_BIN, startGateway } from './lib/gateway.mjs';

const run = promisify(execFile);
const HERE = path.dirname(fileURLToPath(import.meta.url));
const INSPECTOR = path.join(HERE, 'node_modules/.bin/mcp-inspector-cli');
// inspector-cli 1.0.3 picks its own package.json by testing "../package.json" against the
// working directory and then imports that path relative to its module: from a directory whose
// parent holds a package.json it finds its own, from anywhere else it fails with "Cannot find
// module …/@modelcontextprotocol/package.json". tests/node/lib's parent holds one.
const CWD = path.join(HERE, 'lib');

const POLICY = `[roles.coder]
tools = ["kv_*"]
read = ["/**"]
write = ["/**"]
delete = ["/**"]

[roles.reader]
tools = ["kv_get"]
read = ["/pub/**"]
`;

let gw;
before(async () => {
  gw = await startGateway({ agents: { coder: 'coder', reader: 'reader' }, policy: POLICY });
});
after(() => gw?.stop());

/** Runs the inspector in --cli mode against `agent`'s socket; {code, json, stderr}. */
async function inspector(agent, ...args) {
  const argv = ['--cli', CORDON_BIN, 'bridge', '--socket', gw.sockets[agent], ...args];
  const r = await run(INSPECTOR, argv, { cwd: CWD }).then(
    (out) => ({ code: 0, ...out }),
    (err) => ({ code: err.code, stdout: err.stdout, stderr: err.stderr }),
  );
  let json;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = undefined;
  }
  return { code: r.code, json, stdout: r.stdout, stderr: r.stderr };
}

test('tools/list prints the role\'s tools as JSON', async () => {
  const r = await inspector('coder', '--method', 'tools/list');
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(r.json.tools.map((t) => t.name).sort(), ['kv_delete', 'kv_get', 'kv_list', 'kv_put', 'kv_scan', 'kv_txn', 'kv_watch']);
  for (const t of r.json.tools) assert.ok(t.outputSchema && t.inputSchema, `${t.name} lacks a schema`);
  const reader = await inspector('reader', '--method', 'tools/list');
  assert.deepEqual(reader.json.tools.map((t) => t.name), ['kv_get']);
});

test('tools/call: a put, then a get of it; a tool error exits 0 too, so isError is what tells', async () => {
  const put = await inspector('coder', '--method', 'tools/call', '--tool-name', 'kv_put', '--tool-arg', 'key=/pub/inspector', 'value={"n":1}');
  assert.equal(put.code, 0, put.stderr);
  assert.equal(put.json.isError, false, put.stdout);
  assert.equal(put.json.structuredContent.key, '/pub/inspector');
  const get = await inspector('reader', '--method', 'tools/call', '--tool-name', 'kv_get', '--tool-arg', 'key=/pub/inspector');
  assert.equal(get.code, 0, get.stderr);
  assert.equal(get.json.isError, false, get.stdout);
  assert.deepEqual(get.json.structuredContent.value, { n: 1 });
  assert.equal(get.json.structuredContent.revision, put.json.structuredContent.revision);
  // A key outside the reader's scopes: a tool error, yet exit code 0.
  const denied = await inspector('reader', '--method', 'tools/call', '--tool-name', 'kv_get', '--tool-arg', 'key=/private/x');
  assert.equal(denied.code, 0, denied.stderr);
  assert.equal(denied.json.isError, true, denied.stdout);
  assert.equal(denied.json.structuredContent.error.code, 'denied');
});

test('a tool outside the role is a JSON-RPC error: the inspector exits 1 naming -32010', async () => {
  const r = await inspector('reader', '--method', 'tools/call', '--tool-name', 'kv_put', '--tool-arg', 'key=/pub/x', 'value=1');
  assert.notEqual(r.code, 0, r.stdout);
  assert.match(r.stderr, /-32010/);
});
