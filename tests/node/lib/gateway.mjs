// Starts the real cordon gateway binary for the Node client tests, as tests/python/conftest.py
// does: a temp dir with a config and a policy, `cordon gateway --config`, its JSON ready line on
// stdout, SIGTERM at the end (which must exit 0 and remove the sockets).
//
// The binary is $CORDON_BIN, else <repo>/target/debug/cordon.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const CORDON_BIN = process.env.CORDON_BIN || path.join(REPO, 'target/debug/cordon');
const READY_MS = 30_000;
const STOP_MS = 15_000;

/** A bound on a promise: rejects with `what` if it takes longer than `ms` (a guard, not a sync). */
export function within(ms, what, promise) {
  let timer;
  const guard = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
  });
  return Promise.race([promise, guard]).finally(() => clearTimeout(timer));
}

/**
 * @param {object} o
 * @param {Record<string, string>} o.agents  agent name -> role
 * @param {string} o.policy                  policy TOML
 * @param {string} [o.gateway]               extra lines for [gateway]
 */
export async function startGateway({ agents, policy, gateway = '' }) {
  if (!fs.existsSync(CORDON_BIN)) throw new Error(`cordon binary not found: ${CORDON_BIN} (cargo build, or set CORDON_BIN)`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cordon-node-'));
  const config = path.join(dir, 'cordon.toml');
  const policyPath = path.join(dir, 'policy.toml');
  let toml = `[gateway]\nstore = "state/store"\nruntime_dir = "state/run"\npolicy = "policy.toml"\nmap_size = "64MiB"\n${gateway}\n`;
  for (const [name, role] of Object.entries(agents)) toml += `\n[agents.${name}]\nrole = "${role}"\n`;
  fs.writeFileSync(config, toml);
  fs.writeFileSync(policyPath, policy);
  const log = path.join(dir, 'gateway-stderr.log');
  const errFd = fs.openSync(log, 'a');
  const child = spawn(CORDON_BIN, ['gateway', '--config', config], { cwd: dir, stdio: ['ignore', 'pipe', errFd] });
  fs.closeSync(errFd);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const tail = () => fs.readFileSync(log, 'utf8').split('\n').slice(-30).join('\n');

  const ready = await within(
    READY_MS,
    'gateway ready line',
    new Promise((resolve, reject) => {
      const rl = readline.createInterface({ input: child.stdout });
      rl.once('line', (line) => {
        try {
          resolve(JSON.parse(line));
        } catch {
          reject(new Error(`gateway ready line is not JSON: ${line}`));
        }
      });
      exited.then(({ code, signal }) => reject(new Error(`gateway exited (${code ?? signal}) before its ready line\n${tail()}`)));
    }),
  ).catch((err) => {
    child.kill('SIGKILL');
    throw err;
  });
  if (ready.ready !== true || ready.pid !== child.pid) throw new Error(`unexpected ready line ${JSON.stringify(ready)}`);
  for (const name of Object.keys(agents)) {
    if (!ready.sockets?.[name]) throw new Error(`no socket for agent ${name} in ${JSON.stringify(ready)}`);
  }

  return {
    dir,
    config,
    policyPath,
    pid: child.pid,
    sockets: ready.sockets,
    adminSocket: path.join(dir, 'state/run/admin.sock'),
    tail,
    /** One request on the admin socket (`{"op":"status"}` …), its JSON reply. */
    admin(req) {
      return within(
        5000,
        `admin ${JSON.stringify(req)}`,
        new Promise((resolve, reject) => {
          const s = net.createConnection(path.join(dir, 'state/run/admin.sock'));
          let buf = '';
          s.setEncoding('utf8');
          s.on('connect', () => s.write(JSON.stringify(req) + '\n'));
          s.on('data', (d) => {
            buf += d;
            const nl = buf.indexOf('\n');
            if (nl >= 0) {
              s.destroy();
              resolve(JSON.parse(buf.slice(0, nl)));
            }
          });
          s.on('error', reject);
        }),
      );
    },
    /** SIGTERM; resolves once it exited 0 and removed its sockets, else throws with its stderr. */
    async stop() {
      child.kill('SIGTERM');
      const { code, signal } = await within(STOP_MS, 'gateway exit after SIGTERM', exited).catch((err) => {
        child.kill('SIGKILL');
        throw err;
      });
      if (code !== 0) throw new Error(`gateway exited ${code ?? signal} after SIGTERM\n${tail()}`);
      for (const s of Object.values(ready.sockets)) {
        if (fs.existsSync(s)) throw new Error(`socket ${s} not removed at shutdown`);
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
