#!/usr/bin/env node
// A pass-through streamable-HTTP <-> unix-socket adapter for the 2026-07-28 conformance set.
//
// supergateway and mcp-proxy cannot carry 2026-07-28 unchanged (supergateway keeps a session
// per stdio child; mcp-proxy --modern answers 2026 clients itself over a 2025 session), so the
// suite's 2026 scenarios reach cordon through this file instead. It never answers an MCP message
// itself: each POST body is written as one line to a fresh connection to the gateway socket and
// the gateway's lines are relayed back until the reply with the request's id. 2026-07-28 is
// stateless (no MCP-Session-Id, every request carries its own _meta), so one connection per
// request loses nothing and keeps concurrent clients' ids apart.
//
// What the adapter does decide is HTTP framing only, as the 2026-07-28 streamable HTTP transport
// rules that the suite checks (server-stateless, sep-2575-http-*) state them:
//   - a reply before any other message: application/json; a notification first (progress, the
//     subscriptions/listen acknowledgement): text/event-stream, every message one `data:` event;
//   - a JSON-RPC error reply's HTTP status: -32601 -> 404; -32700/-32600/-32602/-32020/-32021/
//     -32022 -> 400; others 200 (the body is the gateway's, byte for byte);
//   - a POST holding only notifications or responses -> 202 Accepted, no body;
//   - GET and DELETE -> 405 (no standalone stream, no sessions in 2026-07-28).
// It checks no headers (MCP-Protocol-Version, Mcp-Method, Origin): those are an HTTP server's
// duties, and cordon serves no HTTP; expected-failures.txt lists the scenarios that test them.
// When the HTTP client goes away before the reply, the gateway connection is closed, which the
// gateway treats as the end of that request (a waiting kv_watch ends).
//
// Usage: node adapter.mjs --socket PATH [--port N]   (prints {"listening":PORT} when ready)

import http from 'node:http';
import net from 'node:net';

const args = process.argv.slice(2);
function opt(name, dflt) {
  const i = args.indexOf(name);
  if (i < 0) return dflt;
  if (i + 1 >= args.length) throw new Error(`${name} needs a value`);
  return args[i + 1];
}
const socketPath = opt('--socket');
const port = Number(opt('--port', '0'));
if (!socketPath) {
  console.error('usage: adapter.mjs --socket PATH [--port N]');
  process.exit(2);
}

const MAX_BODY = 4 << 20;
const BAD_REQUEST = new Set([-32700, -32600, -32602, -32020, -32021, -32022]);

function httpStatus(reply) {
  const code = reply && !Array.isArray(reply) && reply.error ? reply.error.code : undefined;
  if (code === -32601) return 404;
  if (BAD_REQUEST.has(code)) return 400;
  return 200;
}

// The ids the gateway will answer: requests carry `method` and `id`.
function requestIds(msg) {
  const msgs = Array.isArray(msg) ? msg : [msg];
  return msgs
    .filter((m) => m && typeof m === 'object' && typeof m.method === 'string' && 'id' in m)
    .map((m) => JSON.stringify(m.id));
}

function isReplyTo(msg, ids) {
  if (Array.isArray(msg)) return true; // a batch is answered by one array
  if (!msg || typeof msg !== 'object' || !('result' in msg || 'error' in msg)) return false;
  // A parse error (id null) answers whatever was sent.
  return ids.includes(JSON.stringify(msg.id)) || msg.id === null;
}

function handlePost(req, res, body) {
  let parsed;
  try {
    parsed = JSON.parse(body);
  } catch {
    parsed = undefined; // the gateway answers a parse error itself
  }
  const ids = parsed === undefined ? ['null'] : requestIds(parsed);
  // Raw CR/LF in valid JSON can only be whitespace (strings escape them), so this keeps the
  // message as sent while making it one line, which is the gateway's framing.
  const line = body.replace(/[\r\n]/g, ' ') + '\n';
  const conn = net.createConnection(socketPath);
  let done = false;
  let sse = false;
  let buf = '';
  const finish = () => {
    done = true;
    conn.destroy();
  };
  conn.on('error', (err) => {
    if (done) return;
    done = true;
    if (!res.headersSent) {
      res.writeHead(502, { 'Content-Type': 'text/plain' });
      res.end(`adapter: gateway socket: ${err.message}\n`);
    } else res.end();
  });
  res.on('close', () => {
    if (!done) finish(); // the client went away: end the gateway side too
  });
  conn.on('connect', () => {
    conn.write(line);
    if (ids.length === 0 && parsed !== undefined) {
      // Notifications and client responses are answered by nothing: 202, then close once written.
      conn.end();
      done = true;
      res.writeHead(202);
      res.end();
    }
  });
  conn.setEncoding('utf8');
  conn.on('data', (chunk) => {
    if (done) return;
    buf += chunk;
    let nl;
    while (!done && (nl = buf.indexOf('\n')) >= 0) {
      const text = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!text.trim()) continue;
      let msg;
      try {
        msg = JSON.parse(text);
      } catch {
        msg = undefined;
      }
      const last = isReplyTo(msg, ids);
      if (last && !sse) {
        res.writeHead(httpStatus(msg), { 'Content-Type': 'application/json' });
        res.end(text);
        finish();
        return;
      }
      if (!sse) {
        sse = true;
        res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
      }
      res.write(`event: message\ndata: ${text}\n\n`);
      if (last) {
        res.end();
        finish();
      }
    }
  });
  conn.on('end', () => {
    if (done) return;
    done = true;
    if (!res.headersSent) {
      res.writeHead(502, { 'Content-Type': 'text/plain' });
      res.end('adapter: the gateway closed the connection without a reply\n');
    } else res.end();
  });
}

const server = http.createServer((req, res) => {
  if (req.method !== 'POST') {
    res.writeHead(405, { Allow: 'POST' });
    res.end();
    return;
  }
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) {
      res.writeHead(413);
      res.end();
      req.destroy();
      return;
    }
    chunks.push(c);
  });
  req.on('end', () => {
    if (size <= MAX_BODY) handlePost(req, res, Buffer.concat(chunks).toString('utf8'));
  });
});

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ listening: server.address().port }) + '\n');
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
