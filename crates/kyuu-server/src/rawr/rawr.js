// RAWR for web apps (docs/rawr.md §9). Load from your gateway node: <script src="/rawr/rawr.js">
// then: const { iceServers, route } = await rawrIceServers({ gateway: "/rawr", root: "198.18.0.10:3479", session });
// `session` is a hex string of at least 16 random bytes shared through your signaling.
// The control plane runs over one WebSocket (`<gateway>/ws`), falling back to plain HTTP POSTs
// when the WebSocket cannot open; `transport: "http"` forces the latter.
(function (global) {
  "use strict";

  // The gateway is the node that served this script (docs/rawr.md §8.1): a page learns its
  // gateway from the node it loaded rawr.js from, with no configuration.
  let scriptBase = "/rawr";
  try {
    const src = global.document && global.document.currentScript && global.document.currentScript.src;
    if (src) scriptBase = src.replace(/\/rawr\.js(\?.*)?$/, "");
  } catch (_) { /* not in a page */ }

  function randomMac() {
    const b = new Uint8Array(6);
    crypto.getRandomValues(b);
    b[0] = (b[0] | 0x02) & 0xfe; // locally administered, unicast
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join(":");
  }

  function failure(message, code) {
    const e = new Error(message);
    e.code = code;
    return e;
  }

  // The HTTP form: one POST per operation.
  function httpClient(base) {
    return {
      kind: "http",
      pending: 0,
      async call(op, body) {
        const r = await fetch(base + "/" + op, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(body),
        });
        const j = await r.json().catch(() => ({ error: "bad response", code: r.status }));
        if (!r.ok) throw failure(j.error || "RAWR " + op + " failed", j.code);
        return j;
      },
      close() {},
    };
  }

  // The WebSocket form: every operation on one connection, answers matched by id; the node's
  // pending indications arrive as {id, pending: true}.
  function wsClient(base) {
    const url = new URL(base + "/ws", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    const waiting = new Map();
    let next = 1;
    const client = {
      kind: "ws",
      pending: 0,
      opened: new Promise((res, rej) => {
        ws.onopen = () => res();
        ws.onerror = () => rej(failure("websocket failed", 0));
      }),
      call(op, body) {
        const id = next++;
        return new Promise((res, rej) => {
          waiting.set(id, { res, rej });
          ws.send(JSON.stringify(Object.assign({ op, id }, body)));
        });
      },
      close() { try { ws.close(); } catch (_) { /* closed */ } },
    };
    ws.onmessage = (e) => {
      let m;
      try { m = JSON.parse(e.data); } catch (_) { return; }
      const w = waiting.get(m.id);
      if (!w) return;
      if (m.pending) { client.pending++; return; }
      waiting.delete(m.id);
      if (m.error) w.rej(failure(m.error, m.code));
      else w.res(m.result);
    };
    ws.onclose = () => {
      for (const w of waiting.values()) w.rej(failure("websocket closed", 0));
      waiting.clear();
    };
    return client;
  }

  async function controlPlane(base, transport) {
    if (transport !== "http" && typeof WebSocket !== "undefined") {
      const c = wsClient(base);
      try {
        await c.opened;
        return c;
      } catch (_) {
        c.close();
      }
    }
    return httpClient(base);
  }

  function newSession() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  // `gateway` defaults to the node that served rawr.js.
  // Returns { iceServers, route: "node" | "root", path, mac, gatewayError, transport, pending }.
  async function rawrIceServers(opts) {
    const gateway = opts.gateway || scriptBase;
    const root = opts.root;
    const session = opts.session;
    // One MAC per session, kept across reloads: the root refuses a third MAC for a session.
    const key = "rawr-mac-" + session;
    let stored = null;
    try { stored = sessionStorage.getItem(key); } catch (_) { /* storage disabled */ }
    const mac = opts.mac || stored || randomMac();
    try { sessionStorage.setItem(key, mac); } catch (_) { /* storage disabled */ }
    const cp = await controlPlane(gateway, opts.transport);
    try {
      await cp.call("register", { mac });
      // Exchange and Connect in parallel (docs/rawr.md §8): Connect without a target pairs with
      // the other peer of the session, so setup costs one root round trip, not two.
      let gatewayError = null;
      const viaGateway = cp.call("connect", { session, mac, root }).catch((e) => {
        gatewayError = String(e.message || e);
        return null;
      });
      const ex = await cp.call("exchange", { session, mac, root });
      let ans = await viaGateway;
      if (ans === null) {
        ans = await cp.call("connect", { session, mac, target: ex.mac, root, at: "root" });
      }
      return {
        iceServers: ans.iceServers,
        route: ans.atRoot ? "root" : "node",
        path: ans.path,
        mac,
        gatewayError,
        transport: cp.kind,
        pending: cp.pending,
      };
    } finally {
      cp.close();
    }
  }

  global.rawrIceServers = rawrIceServers;
  global.rawrNewSession = newSession;
})(typeof window !== "undefined" ? window : globalThis);
