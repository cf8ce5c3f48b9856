// kyuu signaling client for the browser (plain JS, no build step).
// Speaks the opt-in protocol described in crates/kyuu-signal/PROTOCOL.md.
'use strict';

class KyuuSignal extends EventTarget {
  // url: ws(s)://host/ (server-assigned id) or ws(s)://host/<id>?v=2
  constructor(url) {
    super();
    this.url = url;
    this.id = null;
    this.iceServers = [];
    this.ws = null;
  }

  static defaultUrl(extra) {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const q = new URLSearchParams(location.search);
    const token = q.get('token');
    let url = `${proto}//${location.host}/?v=2`;
    if (token) url += `&token=${encodeURIComponent(token)}`;
    return url + (extra || '');
  }

  connect() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      ws.onerror = () => reject(new Error('WebSocket error'));
      ws.onclose = (e) => {
        this.dispatchEvent(new CustomEvent('close', { detail: { code: e.code, reason: e.reason } }));
        reject(new Error(`closed ${e.code} ${e.reason}`));
      };
      ws.onmessage = (e) => {
        let msg;
        try { msg = JSON.parse(e.data); } catch { return; }
        if (typeof msg.id === 'string') {
          // Relayed from a peer: "id" is the sender.
          this.dispatchEvent(new CustomEvent('peer', { detail: msg }));
          return;
        }
        if (msg.type === 'welcome') {
          this.id = msg.you;
          this.resume = msg.resume;
          this.iceServers = msg.iceServers || [];
          resolve(this);
        }
        this.dispatchEvent(new CustomEvent(msg.type || 'unknown', { detail: msg }));
        this.dispatchEvent(new CustomEvent('control', { detail: msg }));
      };
    });
  }

  send(obj) { this.ws.send(JSON.stringify(obj)); }
  // Relay a message to a peer (libdatachannel format: "id" is the destination).
  toPeer(id, obj) { this.send(Object.assign({ id }, obj)); }
  publish(name) { this.send({ type: 'publish', name }); }
  watch(name) { this.send({ type: 'watch', name }); }
  lookup(name) { this.send({ type: 'lookup', name }); }
  join(room) { this.send({ type: 'join', room }); }
  ping() { this.send({ type: 'ping', ts: Date.now() }); }
}

// Describes the selected candidate pair of a peer connection:
// {local, remote, protocol, rtt (s), address}
async function selectedPath(pc) {
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((s) => {
    if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
  });
  if (!pair) {
    stats.forEach((s) => {
      if (s.type === 'candidate-pair' && s.state === 'succeeded' && (s.selected || s.nominated)) pair = s;
    });
  }
  if (!pair) return null;
  const l = stats.get(pair.localCandidateId) || {};
  const r = stats.get(pair.remoteCandidateId) || {};
  return {
    local: l.candidateType,
    remote: r.candidateType,
    protocol: l.protocol,
    localAddress: `${l.address || l.ip}:${l.port}`,
    remoteAddress: `${r.address || r.ip}:${r.port}`,
    rtt: pair.currentRoundTripTime,
  };
}

window.KyuuSignal = KyuuSignal;
window.kyuuSelectedPath = selectedPath;
