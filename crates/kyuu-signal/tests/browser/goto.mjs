// Navigation that survives Chromium's start-up in a fresh network namespace.
//
// Chromium reports ERR_NETWORK_CHANGED when it starts right after the test's veth pair came up.
// Playwright surfaces that either as the net error itself or, when Chromium has already
// committed its error page, as "interrupted by another navigation to chrome-error://…".
// Both are retried, a bounded number of times; any other error is thrown at once.
const ATTEMPTS = 5;

export function transient(e) {
  const s = String(e);
  return s.includes('ERR_NETWORK_CHANGED') || s.includes('interrupted by another navigation to "chrome-error://');
}

export async function gotoRetrying(page, url) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await page.goto(url);
    } catch (e) {
      if (attempt >= ATTEMPTS || !transient(e)) throw e;
      console.error(`navigation attempt ${attempt} to ${url} failed (${String(e).split('\n')[0]}); retrying`);
      await new Promise((r) => setTimeout(r, 500 * attempt));
    }
  }
}
