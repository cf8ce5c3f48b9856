// Gathers relay candidates in the system Chromium (never a downloaded one) through one TURN
// server, for kyuu's "TURN over TLS beside HTTPS" test:
//
//   node turns.mjs 'turns:localhost:8443?transport=tcp' USERNAME PASSWORD
//
// iceTransportPolicy "relay", so only candidates allocated through that server appear. The
// server's certificate is self-signed: Chromium runs with --ignore-certificate-errors.
// Prints one line "RESULT <json>" ({candidates, errors}); exits 0 when gathering ended.
import { chromium } from 'playwright-core';

const [url, username, credential] = process.argv.slice(2);
if (!url || !username || !credential) {
  console.error('usage: node turns.mjs <turns:host:port?transport=tcp> <username> <password>');
  process.exit(2);
}
const executablePath = process.env.KYUU_CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({
  executablePath, headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--ignore-certificate-errors', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage();
  const result = await page.evaluate(async ({ url, username, credential }) => {
    const candidates = [];
    const errors = [];
    const pc = new RTCPeerConnection({
      iceServers: [{ urls: url, username, credential }], iceTransportPolicy: 'relay',
    });
    pc.createDataChannel('probe');
    const done = new Promise((resolve) => {
      pc.onicecandidate = (e) => (e.candidate ? candidates.push(e.candidate.candidate) : resolve());
      setTimeout(resolve, 15000);
    });
    pc.onicecandidateerror = (e) => errors.push(`${e.errorCode} ${e.errorText} ${e.url}`);
    await pc.setLocalDescription(await pc.createOffer());
    await done;
    pc.close();
    return { candidates, errors };
  }, { url, username, credential });
  console.log('RESULT ' + JSON.stringify(result));
} finally {
  await browser.close();
}
