// One Chromium (the system one, never a downloaded one) loads the RAWR test page, which gets
// its ICE servers through RAWR (rawr.js) and opens a relay-only data channel.
//
//   node rawr-e2e.mjs <page url>
//
// Prints one line "RESULT <json>" (the page's window.result) and exits 0 when it says ok.
import { chromium } from 'playwright-core';
// The navigation retry shared with kyuu-signal's drivers (Chromium's ERR_NETWORK_CHANGED in a fresh namespace).
import { gotoRetrying } from '../../../kyuu-signal/tests/browser/goto.mjs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const url = process.argv[2];
if (!url) {
  console.error('usage: node rawr-e2e.mjs <url>');
  process.exit(2);
}
const executablePath = process.env.KYUU_CHROMIUM || '/usr/bin/chromium';
const timeoutMs = Number(process.env.KYUU_E2E_TIMEOUT_MS || 60000);
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];

const dir = mkdtempSync(join(tmpdir(), 'kyuu-rawr-e2e-'));
let ctx;
const logs = [];
let code = 1;
try {
  ctx = await chromium.launchPersistentContext(dir, { executablePath, headless: true, args });
  const page = ctx.pages()[0] || await ctx.newPage();
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e}`));
  await gotoRetrying(page, url);
  await page.waitForFunction(() => window.result !== null, null, { timeout: timeoutMs, polling: 200 });
  const result = await page.evaluate(() => window.result);
  console.log('RESULT ' + JSON.stringify(result));
  code = result.ok ? 0 : 1;
} catch (e) {
  console.log('RESULT ' + JSON.stringify({ ok: false, error: String(e), logs }));
} finally {
  if (ctx) await ctx.close().catch(() => {});
  rmSync(dir, { recursive: true, force: true });
}
process.exit(code);
