// Test harness: the real server binary (spawned on 127.0.0.1 with a temp data dir) and a
// headless Chromium driven by playwright-core.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root. */
export const REPO = fileURLToPath(new URL('../../../', import.meta.url));
/** Where screenshots and logs go. */
export const OUT_DIR = join(process.env.CARGO_TARGET_DIR || join(REPO, 'target'), 'browser-test');

/** Path of the release server binary (`cargo build --release` makes it). */
export function serverBin() {
  return process.env.COLLAB_SERVER_BIN || join(process.env.CARGO_TARGET_DIR || join(REPO, 'target'), 'release', 'collab-engine');
}

/** A fresh temp directory, removed by the returned cleanup function. */
export function tempDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/**
 * Spawns the server and resolves once it prints `listening on http://ADDR`.
 * Returns `{addr, http, ws, port, stop(signal)}`.
 */
export async function startServer({ dataDir, listen = '127.0.0.1:0', extraArgs = [] }) {
  const bin = serverBin();
  if (!existsSync(bin)) throw new Error(`no server binary at ${bin}; run cargo build --release`);
  const child = spawn(bin, ['--listen', listen, '--data-dir', dataDir, ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn' },
  });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr = (stderr + d).slice(-4000); });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const addr = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`server did not start within 20 s; stderr: ${stderr}`)); }, 20000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = /listening on http:\/\/(\S+)/.exec(out);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    exited.then(({ code, signal }) => { clearTimeout(timer); reject(new Error(`server exited (${code ?? signal}) before listening; stderr: ${stderr}`)); });
  });
  const port = Number(addr.slice(addr.lastIndexOf(':') + 1));
  return {
    addr,
    port,
    http: `http://${addr}`,
    ws: `ws://${addr}`,
    child,
    exited,
    /** Stops the server: SIGKILL simulates a crash, SIGTERM a graceful shutdown. */
    async stop(signal = 'SIGKILL') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const t = setTimeout(() => child.kill('SIGKILL'), 10000);
      await exited;
      clearTimeout(t);
    },
  };
}

/** Launches headless Chromium (the Debian package) through playwright-core. */
export async function launchBrowser() {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
}

export function ensureOutDir() {
  mkdirSync(OUT_DIR, { recursive: true });
  return OUT_DIR;
}

/** A seeded xorshift generator of numbers in [0, 1), so that a failure replays from its seed. */
export function rng(seed) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    return s / 2 ** 32;
  };
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
