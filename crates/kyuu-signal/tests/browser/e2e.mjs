// End-to-end test of kyuu-signal's web page in the system Chromium (never a downloaded one).
//
//   node e2e.mjs http://127.0.0.1:8080/        (host candidates, iceTransportPolicy 'all')
//   KYUU_E2E_RELAY=1 node e2e.mjs <url>        (iceTransportPolicy 'relay': TURN only)
//   KYUU_E2E_BASE_BOB=<url2>                    (bob on another fleet node than alice)
//
// Two separate browser profiles (two persistent contexts, each with a fresh --user-data-dir)
// load the page; "alice" publishes her name, "bob" watches it, and they open a data channel
// through kyuu's signaling. Prints one line "RESULT <json>" and exits 0 on success.
// KYUU_E2E_SCREENSHOT=/tmp/kyuu-call also saves the pages as /tmp/kyuu-call-{alice,bob}.png
// (alice before the call, then both once connected) for a person to look at.
import { chromium } from 'playwright-core';
import { gotoRetrying } from './goto.mjs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const base = process.argv[2];
if (!base) {
  console.error('usage: node e2e.mjs <http://host:port/>');
  process.exit(2);
}
const relay = process.env.KYUU_E2E_RELAY === '1';
const executablePath = process.env.KYUU_CHROMIUM || '/usr/bin/chromium';
const timeoutMs = Number(process.env.KYUU_E2E_TIMEOUT_MS || 45000);
const shots = process.env.KYUU_E2E_SCREENSHOT;
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // Real host addresses instead of mDNS names, so two local profiles can reach each other.
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  // A synthetic camera, so the video path is exercised too.
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
];
// KYUU_E2E_INSECURE=1: accept kyuu's self-signed HTTPS certificate (https:// page, wss:// signaling).
if (process.env.KYUU_E2E_INSECURE === '1') args.push('--ignore-certificate-errors');

const tag = Math.random().toString(36).slice(2, 8);
const names = { alice: `alice-${tag}`, bob: `bob-${tag}` };
const dirs = [];
const contexts = [];
const logs = { alice: [], bob: [] };

async function open(who, query) {
  const dir = mkdtempSync(join(tmpdir(), `kyuu-e2e-${who}-`));
  dirs.push(dir);
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath, headless: true, args, permissions: ['camera', 'microphone'],
  });
  contexts.push(ctx);
  const page = ctx.pages()[0] || await ctx.newPage();
  page.on('console', (m) => logs[who].push(m.text()));
  page.on('pageerror', (e) => logs[who].push(`pageerror: ${e}`));
  // KYUU_E2E_BASE_BOB: bob loads the page from another node of a fleet.
  const url = new URL(who === 'bob' && process.env.KYUU_E2E_BASE_BOB ? process.env.KYUU_E2E_BASE_BOB : base);
  for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
  if (relay) url.searchParams.set('relay', '1');
  await gotoRetrying(page, url.toString());
  return page;
}

async function main() {
  const alice = await open('alice', { name: names.alice });
  await alice.waitForFunction(() => window.kyuu && window.kyuu.id, null, { timeout: timeoutMs });
  if (shots) await alice.screenshot({ path: `${shots}-alice-waiting.png`, fullPage: true });
  const bob = await open('bob', { name: names.bob, call: names.alice });
  const opened = (p) => p.waitForFunction(
    () => window.kyuu.error || (window.kyuu.state === 'open' && window.kyuu.received.length > 0 && window.kyuu.path),
    null, { timeout: timeoutMs, polling: 200 });
  await Promise.all([opened(alice), opened(bob)]);
  // Fail fast when either page reports an ICE or signaling error instead of waiting out the timeout.
  for (const [who, p] of [['alice', alice], ['bob', bob]]) {
    const err = await p.evaluate(() => window.kyuu.error);
    if (err) throw new Error(`${who}: ${err}`);
  }
  // Wait for an application-level round trip over the data channel too.
  await bob.waitForFunction(() => window.kyuu.appRtt !== null, null, { timeout: 10000 });
  if (shots) {
    // Let the path line pick up the data channel RTT first.
    await bob.waitForTimeout(1500);
    await alice.screenshot({ path: `${shots}-alice.png`, fullPage: true });
    await bob.screenshot({ path: `${shots}-bob.png`, fullPage: true });
  }
  const a = await alice.evaluate(() => window.kyuu);
  const b = await bob.evaluate(() => window.kyuu);
  const result = {
    ok: true,
    relay,
    alice: { id: a.id, peer: a.peer, received: a.received, path: a.path },
    bob: { id: b.id, peer: b.peer, received: b.received, path: b.path, appRttMs: b.appRtt },
  };
  if (a.peer !== b.id || b.peer !== a.id) throw new Error(`peers do not match: ${JSON.stringify(result)}`);
  if (!a.received[0].includes(names.bob) || !b.received[0].includes(names.alice)) {
    throw new Error(`unexpected greetings: ${JSON.stringify(result)}`);
  }
  const relayBoth = (p) => p.local === 'relay' && p.remote === 'relay';
  if (relay && !(relayBoth(a.path) && relayBoth(b.path))) {
    throw new Error(`relay-only run did not use a relay candidate: ${JSON.stringify(result)}`);
  }
  console.log('RESULT ' + JSON.stringify(result));
}

let code = 0;
try {
  await main();
} catch (e) {
  code = 1;
  console.log('RESULT ' + JSON.stringify({ ok: false, error: String(e) }));
  for (const [who, lines] of Object.entries(logs)) {
    console.error(`--- ${who} console ---\n${lines.join('\n')}`);
  }
} finally {
  for (const c of contexts) await c.close().catch(() => {});
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}
process.exit(code);
