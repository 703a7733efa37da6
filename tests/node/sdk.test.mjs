// The official TypeScript MCP SDKs as clients of the real cordon gateway (node:test).
//
//   - @modelcontextprotocol/client 2.4 (the one with protocol modes: `versionNegotiation.mode`
//     'legacy' = the 2025 initialize handshake, 'auto' = probe with server/discover and fall back,
//     { pin: '2026-07-28' } = 2026-07-28 or nothing): every test runs in all three modes.
//   - @modelcontextprotocol/sdk 1.32 (2025 handshake only): tools, a denial, the long watch.
//
// Clients connect through UnixSocketTransport (lib/unix-transport.mjs) or through
// StdioClientTransport running `cordon bridge --socket S`, as Claude Code does.
// Run: CORDON_BIN=target/debug/cordon node --test tests/node/sdk.test.mjs

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';

import { Client, ProtocolError, SdkError, SdkErrorCode } from '@modelcontextprotocol/client';
import { StdioClientTransport } from '@modelcontextprotocol/client/stdio';
import { Client as Client1 } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport as StdioClientTransport1 } from '@modelcontextprotocol/sdk/client/stdio.js';
import { DEFAULT_REQUEST_TIMEOUT_MSEC as DEFAULT_TIMEOUT_1 } from '@modelcontextprotocol/sdk/shared/protocol.js';
import { McpError } from '@modelcontextprotocol/sdk/types.js';
import Ajv2020 from 'ajv/dist/2020.js';

import { CORDON_BIN, startGateway, within } from './lib/gateway.mjs';
import { UnixSocketTransport } from './lib/unix-transport.mjs';

const run = promisify(execFile);

const MODES = [
  { name: 'legacy', mode: 'legacy', version: '2025-11-25' },
  { name: 'auto', mode: 'auto', version: '2026-07-28' },
  { name: 'pinned-2026-07-28', mode: { pin: '2026-07-28' }, version: '2026-07-28' },
];
const TOOLS = ['kv_delete', 'kv_get', 'kv_list', 'kv_put', 'kv_scan', 'kv_txn', 'kv_watch'];
const DENIED = -32010; // README: denied by policy (the role may not call this tool)
const REFUSED = -32014; // README: connection refused
const LONG_WATCH_MS = 70_000; // longer than the SDKs' default 60 s request timeout

const ALL = `[roles.coder]
tools = ["kv_*"]
read = ["/**"]
write = ["/**"]
delete = ["/**"]
`;
const POLICY = `${ALL}
[roles.reader]
tools = ["kv_get", "kv_list", "kv_watch"]
read = ["/pub/**"]
`;

// --- helpers -------------------------------------------------------------------------------

const ajv = new Ajv2020({ allErrors: true, allowUnionTypes: true });
/** tool name -> compiled outputSchema validator, filled from the first tools/list. */
const validators = new Map();

function learnSchemas(tools) {
  for (const t of tools) {
    assert.ok(t.outputSchema, `${t.name} has no outputSchema`);
    if (!validators.has(t.name)) validators.set(t.name, ajv.compile(t.outputSchema));
  }
}

/**
 * One tools/call whose result is checked beyond what the SDK checks: structuredContent matches
 * the tool's outputSchema (ajv), and the text content is the same JSON.
 */
async function call(client, name, args, options) {
  const r = await client.callTool({ name, arguments: args }, options);
  checkResult(name, r);
  return r;
}

function checkResult(name, r) {
  const validate = validators.get(name);
  assert.ok(validate, `no outputSchema learnt for ${name}`);
  assert.ok(validate(r.structuredContent), `${name} structuredContent fails its outputSchema: ${ajv.errorsText(validate.errors)}\n${JSON.stringify(r.structuredContent)}`);
  assert.equal(r.content?.[0]?.type, 'text');
  if (r.isError) {
    // For the model: a readable line naming the error code.
    assert.ok(r.content[0].text.includes(r.structuredContent.error.code), `${name}: error text does not name the code: ${r.content[0].text}`);
  } else {
    assert.deepEqual(JSON.parse(r.content[0].text), r.structuredContent, `${name}: text content is not the structured result`);
  }
}

function ok(r) {
  assert.equal(r.isError, false, `tool error: ${JSON.stringify(r.structuredContent)}`);
  return r.structuredContent;
}

function toolError(r) {
  assert.equal(r.isError, true, `expected a tool error, got ${JSON.stringify(r.structuredContent)}`);
  return r.structuredContent.error;
}

async function connect(socket, mode, options = {}) {
  const client = new Client({ name: 'cordon-node-test', version: '0' }, { versionNegotiation: { mode }, ...options });
  const transport = new UnixSocketTransport(socket);
  await client.connect(transport);
  return { client, transport };
}

function bridge(socket) {
  return new StdioClientTransport({ command: CORDON_BIN, args: ['bridge', '--socket', socket], stderr: 'pipe' });
}

/** Collects a stdio transport's stderr (the bridge prints refusals there). */
function stderrOf(transport) {
  let text = '';
  transport.stderr?.setEncoding('utf8');
  transport.stderr?.on('data', (d) => (text += d));
  return () => text;
}

/**
 * Waits, by admin-socket round trips (no sleeps), until the gateway's count of waiting kv_watch
 * calls is `n`; fails after `tries` round trips.
 */
async function watchingBecomes(gw, n, tries = 2000) {
  let last;
  for (let i = 0; i < tries; i++) {
    last = (await gw.admin({ op: 'status' })).watching;
    if (last === n) return;
  }
  assert.fail(`gateway status.watching stayed ${last}, expected ${n}`);
}

async function revision(client) {
  return ok(await call(client, 'kv_watch', { prefix: '/', since_revision: 0, timeout_ms: 0, limit: 1 })).revision;
}

// --- tests ---------------------------------------------------------------------------------

// Two branches run side by side: the 70 s watches (the slow part) and everything else.
describe('TypeScript SDKs against the real gateway', { concurrency: true }, () => {
  describe('a kv_watch longer than the default 60 s request timeout', { concurrency: true }, () => {
    let gw;
    before(async () => {
      // Default watch_progress_ms (15 s): the shipped behaviour.
      gw = await startGateway({ agents: { coder: 'coder' }, policy: ALL });
    });
    after(() => gw?.stop());

    test('the SDKs default to a 60 s timeout', () => {
      assert.equal(DEFAULT_TIMEOUT_1, 60_000);
      assert.ok(LONG_WATCH_MS > DEFAULT_TIMEOUT_1);
    });

    const clients = [
      ...MODES.map((m) => ({ name: `client 2.4 ${m.name}`, open: () => connect(gw.sockets.coder, m.mode), timedOut: (e) => e instanceof SdkError && e.code === SdkErrorCode.RequestTimeout })),
      {
        name: 'sdk 1.32',
        open: async () => {
          const client = new Client1({ name: 'cordon-node-test', version: '0' });
          const transport = new UnixSocketTransport(gw.sockets.coder);
          await client.connect(transport);
          return { client, transport };
        },
        timedOut: (e) => e instanceof McpError && e.code === -32001,
      },
    ];
    // 1.32's callTool takes (params, resultSchema, options); 2.4's takes (params, options).
    const callLong = (c, client, args, options) =>
      c.name === 'sdk 1.32' ? client.callTool({ name: 'kv_watch', arguments: args }, undefined, options) : client.callTool({ name: 'kv_watch', arguments: args }, options);

    for (const c of clients) {
      test(`${c.name}: survives on notifications/progress (resetTimeoutOnProgress)`, async () => {
        const { client } = await c.open();
        learnSchemas((await client.listTools()).tools);
        const since = await revision(client);
        const progress = [];
        const r = await callLong(c, client, { prefix: `/long/${c.name}/quiet`, since_revision: since, timeout_ms: LONG_WATCH_MS }, {
          resetTimeoutOnProgress: true,
          onprogress: (p) => progress.push(p),
        });
        checkResult('kv_watch', r);
        const out = ok(r);
        assert.equal(out.timed_out, true);
        assert.deepEqual(out.events, []);
        assert.ok(progress.length >= 1, 'no progress notification reached onprogress');
        console.log(`# ${c.name}: 70 s watch returned after ${progress.length} progress notifications`);
        await client.close();
      });

      test(`${c.name}: control: the same watch without progress handling is cut at the default timeout`, async () => {
        const { client, transport } = await c.open();
        const since = ok(await client.callTool({ name: 'kv_watch', arguments: { prefix: '/', since_revision: 0, timeout_ms: 0, limit: 1 } })).revision;
        const err = await callLong(c, client, { prefix: `/long/${c.name}/control`, since_revision: since, timeout_ms: LONG_WATCH_MS }, undefined).then(
          (r) => assert.fail(`the watch was not cut: ${JSON.stringify(r)}`),
          (e) => e,
        );
        assert.ok(c.timedOut(err), `expected the SDK's request timeout, got ${err?.constructor?.name} ${err?.code}: ${err?.message}`);
        // The SDK tells the gateway, which ends the watch; the connection stays usable.
        const call = transport.trace.find((t) => t.dir === 'out' && t.msg.method === 'tools/call' && t.msg.params?.arguments?.prefix === `/long/${c.name}/control`);
        assert.ok(transport.trace.some((t) => t.dir === 'out' && t.msg.method === 'notifications/cancelled' && t.msg.params?.requestId === call.msg.id), 'no notifications/cancelled sent on timeout');
        assert.equal(ok(await client.callTool({ name: 'kv_list', arguments: { prefix: '/long' } })).keys.length, 0);
        await client.close();
      });
    }
  });

  // Sequential (the cancellation test counts the gateway's waiting watches).
  describe('everything else', { concurrency: 1 }, () => {
    let gw;
    before(async () => {
      gw = await startGateway({ agents: { coder: 'coder', reader: 'reader' }, policy: POLICY });
    });
    after(() => gw?.stop());

    for (const m of MODES) {
      describe(`client 2.4, mode ${m.name}`, () => {
        const base = `/m/${m.name}`;
        let coder;
        let transport;
        before(async () => {
          ({ client: coder, transport } = await connect(gw.sockets.coder, m.mode));
        });
        after(() => coder?.close());

        test('negotiates the expected protocol version', () => {
          assert.equal(coder.getNegotiatedProtocolVersion(), m.version);
          assert.equal(coder.getServerVersion()?.name, 'cordon');
          const first = transport.trace.find((t) => t.dir === 'out')?.msg.method;
          assert.equal(first, m.name === 'legacy' ? 'initialize' : 'server/discover');
        });

        test('tools/list: exactly the kv tools, each with an outputSchema', async () => {
          const { tools } = await coder.listTools();
          assert.deepEqual(tools.map((t) => t.name).sort(), TOOLS);
          learnSchemas(tools);
        });

        test('every tool, results checked against their outputSchema', async () => {
          const a = `${base}/a`;
          const b = `${base}/b`;
          const c = `${base}/c`;
          const put = ok(await call(coder, 'kv_put', { key: a, value: { n: 1 }, if_revision: 0 }));
          assert.equal(put.previous_revision, null);
          const r1 = put.revision;
          assert.equal(toolError(await call(coder, 'kv_put', { key: a, value: { n: 2 }, if_revision: 0 })).code, 'conflict');
          assert.deepEqual(ok(await call(coder, 'kv_get', { key: a })), { key: a, value: { n: 1 }, revision: r1, create_revision: r1 });
          ok(await call(coder, 'kv_put', { key: b, value: 'x' }));
          assert.deepEqual(ok(await call(coder, 'kv_list', { prefix: base })).keys.map((k) => k.key), [a, b]);
          const page = ok(await call(coder, 'kv_scan', { prefix: base, limit: 1 }));
          assert.deepEqual(page.entries.map((e) => [e.key, e.value]), [[a, { n: 1 }]]);
          assert.ok(page.next_cursor, 'kv_scan with limit 1 of 2 gave no next_cursor');
          const page2 = ok(await call(coder, 'kv_scan', { prefix: base, limit: 1, cursor: page.next_cursor }));
          assert.deepEqual(page2.entries.map((e) => [e.key, e.value]), [[b, 'x']]);
          const txn = ok(
            await call(coder, 'kv_txn', {
              checks: [{ key: a, revision: r1 }],
              ops: [{ op: 'put', key: c, value: 3 }, { op: 'delete', key: b }, { op: 'get', key: a }],
            }),
          );
          assert.equal(txn.results.length, 3);
          // A failed check writes nothing.
          assert.equal(toolError(await call(coder, 'kv_txn', { checks: [{ key: a, revision: r1 + 1000 }], ops: [{ op: 'delete', key: a }] })).code, 'check_failed');
          assert.equal(toolError(await call(coder, 'kv_get', { key: b })).code, 'not_found');
          const w = ok(await call(coder, 'kv_watch', { prefix: base, since_revision: r1, timeout_ms: 5000 }));
          assert.deepEqual(w.events.map((e) => [e.type, e.key]), [['put', b], ['put', c], ['delete', b]]);
          assert.equal(w.timed_out, false);
          assert.equal(ok(await call(coder, 'kv_delete', { key: a })).deleted, true);
          assert.equal(toolError(await call(coder, 'kv_get', { key: a })).code, 'not_found');
        });

        test('a tool outside the role is refused with -32010 (control: an allowed tool works)', async () => {
          const { client: reader } = await connect(gw.sockets.reader, m.mode);
          try {
            const { tools } = await reader.listTools();
            assert.deepEqual(tools.map((t) => t.name).sort(), ['kv_get', 'kv_list', 'kv_watch']);
            ok(await call(coder, 'kv_put', { key: `/pub/${m.name}`, value: 1 }));
            assert.equal(ok(await call(reader, 'kv_get', { key: `/pub/${m.name}` })).value, 1);
            const err = await reader.callTool({ name: 'kv_put', arguments: { key: `/pub/${m.name}`, value: 2 } }).then(
              (r) => assert.fail(`kv_put was not refused: ${JSON.stringify(r)}`),
              (e) => e,
            );
            assert.ok(err instanceof ProtocolError, `expected a ProtocolError, got ${err}`);
            assert.equal(err.code, DENIED, err.message);
          } finally {
            await reader.close();
          }
        });

        test('a key outside the role is a tool error (control: a key inside works)', async () => {
          const { client: reader } = await connect(gw.sockets.reader, m.mode);
          try {
            ok(await call(coder, 'kv_put', { key: `${base}/secret`, value: 's' }));
            const err = toolError(await call(reader, 'kv_get', { key: `${base}/secret` }));
            assert.equal(err.code, 'denied', JSON.stringify(err));
            assert.equal(ok(await call(reader, 'kv_get', { key: `/pub/${m.name}` })).key, `/pub/${m.name}`);
          } finally {
            await reader.close();
          }
        });

        test('an AbortSignal cancels a waiting kv_watch; the gateway ends it; the connection still works', async () => {
          const since = await revision(coder);
          await watchingBecomes(gw, 0);
          const ac = new AbortController();
          const watch = coder.callTool({ name: 'kv_watch', arguments: { prefix: `${base}/never`, since_revision: since, timeout_ms: 120_000 } }, { signal: ac.signal });
          const settled = watch.then(
            (r) => ({ r }),
            (e) => ({ e }),
          );
          const sent = await transport.waitFor('out', (msg) => msg.method === 'tools/call' && msg.params?.arguments?.prefix === `${base}/never`);
          await watchingBecomes(gw, 1); // the gateway is waiting on it
          ac.abort(new Error('test abort'));
          const { r, e } = await settled;
          assert.equal(r, undefined, `the watch returned: ${JSON.stringify(r)}`);
          assert.match(String(e?.message ?? e), /abort/i);
          await within(5000, 'notifications/cancelled on the wire', transport.waitFor('out', (msg) => msg.method === 'notifications/cancelled' && msg.params?.requestId === sent.id));
          // Next call on the same connection succeeds.
          assert.equal(ok(await call(coder, 'kv_list', { prefix: `${base}/never` })).keys.length, 0);
          await watchingBecomes(gw, 0);
          assert.ok(!transport.trace.some((t) => t.dir === 'in' && t.msg.id === sent.id), 'the gateway answered a cancelled request');
        });

        test('stdio through `cordon bridge`: tools/list and a call', async () => {
          const client = new Client({ name: 'cordon-node-test', version: '0' }, { versionNegotiation: { mode: m.mode } });
          await client.connect(bridge(gw.sockets.coder));
          try {
            assert.equal(client.getNegotiatedProtocolVersion(), m.version);
            assert.deepEqual((await client.listTools()).tools.map((t) => t.name).sort(), TOOLS);
            assert.equal(ok(await call(client, 'kv_put', { key: `${base}/stdio`, value: true })).key, `${base}/stdio`);
          } finally {
            await client.close();
          }
        });
      });
    }

    describe('sdk 1.32 (2025 handshake)', () => {
      test('socket and stdio: tools/list, calls checked against outputSchema, a denial is -32010', async () => {
        for (const kind of ['socket', 'stdio']) {
          const client = new Client1({ name: 'cordon-node-test', version: '0' });
          await client.connect(kind === 'socket' ? new UnixSocketTransport(gw.sockets.coder) : new StdioClientTransport1({ command: CORDON_BIN, args: ['bridge', '--socket', gw.sockets.coder], stderr: 'pipe' }));
          const { tools } = await client.listTools();
          assert.deepEqual(tools.map((t) => t.name).sort(), TOOLS);
          learnSchemas(tools);
          const key = `/sdk1/${kind}`;
          ok(await call(client, 'kv_put', { key, value: [1, 2] }));
          assert.deepEqual(ok(await call(client, 'kv_get', { key })).value, [1, 2]);
          await client.close();
        }
        const reader = new Client1({ name: 'cordon-node-test', version: '0' });
        await reader.connect(new UnixSocketTransport(gw.sockets.reader));
        ok(await reader.callTool({ name: 'kv_list', arguments: { prefix: '/pub' } }));
        const err = await reader.callTool({ name: 'kv_delete', arguments: { key: '/pub/x' } }).then(
          (r) => assert.fail(`kv_delete was not refused: ${JSON.stringify(r)}`),
          (e) => e,
        );
        assert.ok(err instanceof McpError, String(err));
        assert.equal(err.code, DENIED);
        await reader.close();
      });
    });

    describe('a refused connection (max_connections_per_agent = 1)', () => {
      let lim;
      let holder;
      before(async () => {
        lim = await startGateway({ agents: { coder: 'coder' }, policy: ALL, gateway: 'max_connections_per_agent = 1' });
        // Control: a connection within the limit is served.
        ({ client: holder } = await connect(lim.sockets.coder, 'legacy'));
        learnSchemas((await holder.listTools()).tools);
        ok(await call(holder, 'kv_put', { key: '/held', value: 1 }));
      });
      after(async () => {
        await holder?.close();
        await lim?.stop();
      });

      for (const m of MODES) {
        test(`mode ${m.name}, socket: the gateway answers -32014 with the reason`, async () => {
          const transport = new UnixSocketTransport(lim.sockets.coder);
          const client = new Client({ name: 'cordon-node-test', version: '0' }, { versionNegotiation: { mode: m.mode } });
          const err = await client.connect(transport).then(
            () => assert.fail('a connection over the limit was served'),
            (e) => e,
          );
          // On the wire, always: the first request's id, -32014, the reason.
          const refusal = await transport.waitFor('in', (msg) => msg.error?.code === REFUSED);
          assert.equal(refusal.id, transport.trace.find((t) => t.dir === 'out').msg.id);
          assert.match(refusal.error.message, /connection refused: .*limit/);
          if (m.name === 'legacy' || m.name === 'auto') {
            // auto (2.4.0) reads any error to server/discover other than -32022 as "not a 2026
            // server" and sends initialize on the same connection: the gateway answers every
            // request of a refused connection, so that one carries the reason too.
            assert.ok(err instanceof ProtocolError, String(err));
            assert.equal(err.code, REFUSED);
            assert.match(err.message, /connection refused: .*limit/);
          } else {
            // Pinned: no fallback, and the error does not carry the gateway's message either.
            assert.ok(err instanceof SdkError, String(err));
            assert.equal(err.code, SdkErrorCode.EraNegotiationFailed, err.message);
          }
        });

        test(`mode ${m.name}, stdio bridge: the reason reaches the client`, async () => {
          const transport = bridge(lim.sockets.coder);
          const stderr = stderrOf(transport);
          const client = new Client({ name: 'cordon-node-test', version: '0' }, { versionNegotiation: { mode: m.mode } });
          const err = await client.connect(transport).then(
            () => assert.fail('a connection over the limit was served'),
            (e) => e,
          );
          if (m.name === 'pinned-2026-07-28') {
            // The SDK probes on a throwaway bridge process whose stderr it discards (where the
            // bridge printed the reason) and never starts this transport: the reason is lost.
            assert.ok(err instanceof SdkError && err.code === SdkErrorCode.EraNegotiationFailed, String(err));
            assert.equal(stderr(), '');
          } else {
            // auto probes on a throwaway bridge, then the real one gets initialize refused.
            assert.ok(err instanceof ProtocolError, String(err));
            assert.equal(err.code, REFUSED);
            assert.match(err.message, /connection refused: .*limit/);
          }
        });
      }
    });

    for (const m of MODES) {
      test(`client 2.4, mode ${m.name}: a policy reload that revokes kv_delete sends notifications/tools/list_changed`, async () => {
        const p = await startGateway({ agents: { coder: 'coder' }, policy: ALL });
        let changed;
        const notified = new Promise((resolve) => (changed = resolve));
        const { client, transport } = await connect(p.sockets.coder, m.mode, {
          listChanged: { tools: { onChanged: (err, items) => changed({ err, items }), debounceMs: 0, autoRefresh: false } },
        });
        try {
          // Control: before the reload kv_delete is listed and callable.
          const before = await client.listTools();
          assert.ok(before.tools.some((t) => t.name === 'kv_delete'));
          learnSchemas(before.tools);
          assert.equal(ok(await call(client, 'kv_delete', { key: '/nothing' })).deleted, false);
          if (m.name !== 'legacy') {
            // 2026-07-28: the notification comes on a subscriptions/listen stream the SDK opens.
            await within(5000, 'subscriptions/listen acknowledged', transport.waitFor('in', (msg) => msg.method === 'notifications/subscriptions/acknowledged'));
          }
          fs.writeFileSync(p.policyPath, ALL.replace('tools = ["kv_*"]', 'tools = ["kv_get", "kv_put", "kv_list", "kv_scan", "kv_txn", "kv_watch"]'));
          if (m.name === 'legacy') process.kill(p.pid, 'SIGHUP');
          else await run(CORDON_BIN, ['policy', 'reload', '--config', p.config]);
          const { err } = await within(10_000, 'notifications/tools/list_changed', notified);
          assert.equal(err, null);
          assert.ok(transport.trace.some((t) => t.dir === 'in' && t.msg.method === 'notifications/tools/list_changed'));
          const after = await client.listTools();
          assert.deepEqual(after.tools.map((t) => t.name).sort(), TOOLS.filter((t) => t !== 'kv_delete'));
          const refused = await client.callTool({ name: 'kv_delete', arguments: { key: '/nothing' } }).then(
            (r) => assert.fail(`revoked kv_delete ran: ${JSON.stringify(r)}`),
            (e) => e,
          );
          assert.equal(refused.code, DENIED, String(refused));
        } finally {
          await client.close();
          await p.stop();
        }
      });
    }
  });
});
