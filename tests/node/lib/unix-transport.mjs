// An MCP client transport over the gateway's Unix socket: one JSON-RPC message per line, as
// `cordon bridge` relays it. It fits both TypeScript SDKs' Transport interface
// (@modelcontextprotocol/sdk 1.x and @modelcontextprotocol/client 2.x): start, send, close and
// the onmessage/onclose/onerror callbacks. `trace` records every message both ways, so a test
// can check the wire as well as what the SDK surfaces.

import net from 'node:net';

export class UnixSocketTransport {
  /** @param {string} socketPath */
  constructor(socketPath) {
    this.socketPath = socketPath;
    /** @type {{dir: 'out' | 'in', msg: any}[]} */
    this.trace = [];
    this._buf = '';
    this._waiters = [];
  }

  start() {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(this.socketPath);
      this._sock = sock;
      sock.setEncoding('utf8');
      sock.once('connect', () => {
        sock.off('error', reject);
        sock.on('error', (err) => this.onerror?.(err));
        resolve();
      });
      sock.once('error', reject);
      sock.on('data', (chunk) => this._data(chunk));
      sock.on('close', () => this.onclose?.());
    });
  }

  _data(chunk) {
    this._buf += chunk;
    let nl;
    while ((nl = this._buf.indexOf('\n')) >= 0) {
      const line = this._buf.slice(0, nl);
      this._buf = this._buf.slice(nl + 1);
      if (!line.trim()) continue;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch (err) {
        this.onerror?.(new Error(`gateway sent a line that is not JSON: ${line.slice(0, 200)}`));
        continue;
      }
      this._record('in', msg);
      this.onmessage?.(msg);
    }
  }

  _record(dir, msg) {
    this.trace.push({ dir, msg });
    this._waiters = this._waiters.filter((w) => !(w.dir === dir && w.pred(msg) && (w.resolve(msg), true)));
  }

  /** Resolves with the first message (already traced or still to come) going `dir` that `pred` accepts. */
  waitFor(dir, pred) {
    const seen = this.trace.find((t) => t.dir === dir && pred(t.msg));
    if (seen) return Promise.resolve(seen.msg);
    return new Promise((resolve) => this._waiters.push({ dir, pred, resolve }));
  }

  send(message) {
    this._record('out', message);
    return new Promise((resolve, reject) => {
      if (!this._sock || this._sock.destroyed) return reject(new Error('socket closed'));
      this._sock.write(JSON.stringify(message) + '\n', (err) => (err ? reject(err) : resolve()));
    });
  }

  close() {
    this._sock?.destroy();
    return Promise.resolve();
  }
}
