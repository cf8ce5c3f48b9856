// RAWR for web apps (docs/rawr.md §9). Load from your gateway node: <script src="/rawr/rawr.js">
// then: const { iceServers, route } = await rawrIceServers({ gateway: "/rawr", root: "198.18.0.10:3479", session });
// `session` is a hex string of at least 16 random bytes shared through your signaling.
(function (global) {
  "use strict";

  function randomMac() {
    const b = new Uint8Array(6);
    crypto.getRandomValues(b);
    b[0] = (b[0] | 0x02) & 0xfe; // locally administered, unicast
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join(":");
  }

  async function post(base, path, body) {
    const r = await fetch(base + path, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const j = await r.json().catch(() => ({ error: "bad response", code: r.status }));
    if (!r.ok) {
      const e = new Error(j.error || "RAWR " + path + " failed");
      e.code = j.code;
      throw e;
    }
    return j;
  }

  function newSession() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  // Returns { iceServers, route: "node" | "root", path, mac, gatewayError }.
  async function rawrIceServers(opts) {
    const gateway = opts.gateway || "/rawr";
    const root = opts.root;
    const session = opts.session;
    // One MAC per session, kept across reloads: the root refuses a third MAC for a session.
    const key = "rawr-mac-" + session;
    let stored = null;
    try { stored = sessionStorage.getItem(key); } catch (_) { /* storage disabled */ }
    const mac = opts.mac || stored || randomMac();
    try { sessionStorage.setItem(key, mac); } catch (_) { /* storage disabled */ }
    await post(gateway, "/register", { mac });
    // Exchange and Connect in parallel (docs/rawr.md §8): Connect without a target pairs with
    // the other peer of the session, so setup costs one root round trip, not two.
    let gatewayError = null;
    const viaGateway = post(gateway, "/connect", { session, mac, root }).catch((e) => {
      gatewayError = String(e.message || e);
      return null;
    });
    const ex = await post(gateway, "/exchange", { session, mac, root });
    let ans = await viaGateway;
    if (ans === null) {
      ans = await post(gateway, "/connect", { session, mac, target: ex.mac, root, at: "root" });
    }
    return {
      iceServers: ans.iceServers,
      route: ans.atRoot ? "root" : "node",
      path: ans.path,
      mac,
      gatewayError,
    };
  }

  global.rawrIceServers = rawrIceServers;
  global.rawrNewSession = newSession;
})(typeof window !== "undefined" ? window : globalThis);
