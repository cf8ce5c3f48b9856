// Drives kyuu's /check page (STUN/TURN check, like Trickle ICE) in the system Chromium (never a
// downloaded one):
//
//   node check.mjs http://198.18.77.1:8080/check [screenshot.png]
//
// Loads the page with ?auto=1 (it fetches /v1/ice-servers and gathers candidates against each
// server), waits until it is done, and prints one line "RESULT <json>": every server's
// candidates and errors, the page's verdict text and whether it says the servers work.
// Exits 0 when the page ran to the end (whatever its verdict), 1 otherwise.
import { chromium } from 'playwright-core';
import { gotoRetrying } from './goto.mjs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const target = process.argv[2];
const screenshot = process.argv[3];
if (!target) {
  console.error('usage: node check.mjs <http://host:port/check> [screenshot.png]');
  process.exit(2);
}
const executablePath = process.env.KYUU_CHROMIUM || '/usr/bin/chromium';
const timeoutMs = Number(process.env.KYUU_CHECK_TIMEOUT_MS || 40000);
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];

const dir = mkdtempSync(join(tmpdir(), 'kyuu-check-'));
const logs = [];
let ctx;

async function main() {
  ctx = await chromium.launchPersistentContext(dir, {
    executablePath, headless: true, args, viewport: { width: 1100, height: 900 },
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e}`));
  const url = new URL(target);
  url.searchParams.set('auto', '1');
  // Short per-server timeout: gathering ends early when ICE gathering completes.
  await gotoRetrying(page, url.toString());
  await page.waitForFunction(() => window.kyuuCheck && window.kyuuCheck.done, null,
    { timeout: timeoutMs, polling: 200 });
  const result = await page.evaluate(() => ({
    ok: window.kyuuCheck.ok,
    verdict: document.getElementById('verdict').textContent,
    servers: window.kyuuCheck.servers,
  }));
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  return result;
}

let code = 0;
try {
  const result = await main();
  console.log('RESULT ' + JSON.stringify(result));
} catch (e) {
  console.log('RESULT ' + JSON.stringify({ ok: false, error: String(e) }));
  code = 1;
} finally {
  for (const l of logs) console.error(`[page] ${l}`);
  if (ctx) await ctx.close().catch(() => {});
  rmSync(dir, { recursive: true, force: true });
}
process.exit(code);
