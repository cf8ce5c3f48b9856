// libdatachannel's examples/client, ported to node-datachannel (libdatachannel's own Node
// binding): the same signaling through libdatachannel's own WebSocket client, the same JSON on
// the wire, the same data channel label and greeting. Driven by crates/kyuu/tests/libdatachannel.rs.
//
// Signaling (as in examples/client/main.cpp):
//   connect to ws://host:port/<localId>
//   send {"id": remoteId, "type": "offer"|"answer", "description": sdp}
//        {"id": remoteId, "type": "candidate", "candidate": c, "mid": mid}
//   on receipt "id" names the sender; an offer from an unknown id creates a PeerConnection.
// With --format seed004 the same content travels as seed 004's robots send it:
//        {"id": remoteId, "payload": {"sdp": sdp, "type": "offer"|"answer"}}
//        {"id": remoteId, "payload": {"candidate": c, "sdpMid": mid}}
//
// Usage: node client.mjs --url ws://host:port --id <localId> [--offer <remoteId>]
//          [--format libdatachannel|seed004] [--ice-servers <json>] [--relay]
//          [--messages N] [--timeout-ms T]
// --ice-servers is a JSON array of libdatachannel ice servers (URL strings or
// {hostname, port, username, password, relayType}) or of RTCIceServer objects ({urls,
// username, credential}), which are converted.
//
// Prints progress lines, "WebSocket connected, signaling ready" once signaling is up, and a
// last line `RESULT {json}`; exits 0 when the exchange completed.

import { createHash } from 'node:crypto';

import nodeDataChannel from 'node-datachannel';

function parseArgs(argv) {
  const args = { format: 'libdatachannel', iceServers: [], relay: false, messages: 5, timeoutMs: 30000 };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${key} needs a value`);
      return argv[++i];
    };
    switch (key) {
      case '--url': args.url = value(); break;
      case '--id': args.id = value(); break;
      case '--offer': args.offer = value(); break;
      case '--format': args.format = value(); break;
      case '--ice-servers': args.iceServers = JSON.parse(value()); break;
      case '--relay': args.relay = true; break;
      case '--messages': args.messages = Number(value()); break;
      case '--timeout-ms': args.timeoutMs = Number(value()); break;
      default: throw new Error(`unknown argument ${key}`);
    }
  }
  if (!args.url || !args.id) throw new Error('--url and --id are required');
  if (!['libdatachannel', 'seed004'].includes(args.format)) throw new Error(`bad --format ${args.format}`);
  return args;
}

// RTCIceServer ({urls, username, credential}) to libdatachannel's IceServer objects.
function toLibdatachannel(servers) {
  const out = [];
  for (const s of servers) {
    if (typeof s === 'string' || s.hostname) {
      out.push(s);
      continue;
    }
    const urls = Array.isArray(s.urls) ? s.urls : [s.urls];
    for (const url of urls) {
      const m = /^(stuns?|turns?):([^:?]+|\[[^\]]+\]):(\d+)(?:\?transport=(udp|tcp))?$/.exec(url);
      if (!m) throw new Error(`cannot convert ICE server URL ${url}`);
      const [, scheme, hostname, port, transport] = m;
      if (scheme.startsWith('stun')) {
        out.push({ hostname, port: Number(port) });
        continue;
      }
      const relayType = scheme === 'turns' ? 'TurnTls' : transport === 'tcp' ? 'TurnTcp' : 'TurnUdp';
      out.push({ hostname, port: Number(port), username: s.username, password: s.credential, relayType });
    }
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
// libdatachannel's own warnings (an ignored ICE server, a failed TURN allocation) on stdout.
nodeDataChannel.initLogger('Warning', (level, message) => console.log(`[libdatachannel ${level}] ${message}`));
const localId = args.id;
const log = (...a) => console.log(`[${localId}]`, ...a);

const config = { iceServers: toLibdatachannel(args.iceServers) };
if (args.relay) config.iceTransportPolicy = 'relay';
log('ICE servers', JSON.stringify(config.iceServers.map((s) => (typeof s === 'string' ? s : { ...s, password: s.password ? '***' : undefined }))));

const peerConnectionMap = new Map();
const dataChannelMap = new Map();
const received = [];
const localCandidates = [];
// SHA-256 of every description sent and received, so the harness can tell that what one
// client sent is what the other got.
const signaling = { sent: 0, received: 0, types: {}, descriptionsSent: [], descriptionsReceived: [] };
const sha256 = (text) => createHash('sha256').update(text).digest('hex');
let pair = null;
let finished = false;
let exitCode = 1;

function finish(ok, why) {
  if (finished) return;
  finished = true;
  exitCode = ok ? 0 : 1;
  for (const pc of peerConnectionMap.values()) {
    try {
      pair = pair ?? pc.getSelectedCandidatePair();
    } catch {
      // no pair selected
    }
  }
  const result = {
    ok,
    why: ok ? undefined : why,
    id: localId,
    format: args.format,
    relay: args.relay,
    received,
    localCandidates,
    pair,
    states: [...peerConnectionMap.values()].map((pc) => pc.state()),
    signaling,
  };
  console.log(`RESULT ${JSON.stringify(result)}`);
  // Let the last data channel messages and signaling frames drain, then tear everything down.
  setTimeout(() => {
    for (const dc of dataChannelMap.values()) dc.close();
    for (const pc of peerConnectionMap.values()) pc.close();
    try {
      ws.close();
    } catch {
      // already closed
    }
    nodeDataChannel.cleanup();
    process.exit(exitCode);
  }, 1000);
}

setTimeout(() => finish(false, `timed out after ${args.timeoutMs} ms`), args.timeoutMs);

// libdatachannel's WebSocket client, as the example uses rtc::WebSocket.
const ws = new nodeDataChannel.WebSocket();

function send(message) {
  const text = JSON.stringify(message);
  signaling.sent++;
  ws.sendMessage(text);
}

function descriptionMessage(id, sdp, type) {
  return args.format === 'seed004'
    ? { id, payload: { sdp, type } }
    : { id, type, description: sdp };
}

function candidateMessage(id, candidate, mid) {
  return args.format === 'seed004'
    ? { id, payload: { candidate, sdpMid: mid } }
    : { id, type: 'candidate', candidate, mid };
}

// The offerer sends hello + N numbered messages and expects the answerer's hello + N echoes;
// the answerer sends its hello and echoes what it gets. Both check what they receive.
function expected(offerer, remoteId) {
  const want = [`Hello from ${remoteId}`];
  for (let i = 0; i < args.messages; i++) want.push(offerer ? `echo:${i}:${localId}` : `${i}:${remoteId}`);
  return want;
}

// Done when every expected message arrived and at least one of the peer's candidates came
// through the signaling (on a fast link the data can flow before the peer's trickled
// candidates arrive: ICE finds it peer-reflexive from its checks).
function maybeFinish(id, offerer) {
  const pc = peerConnectionMap.get(id);
  if (finished || !pc) return;
  if (!expected(offerer, id).every((w) => received.includes(w))) return;
  if (!(signaling.types.candidate >= 1)) return;
  pair = pc.getSelectedCandidatePair();
  log('selected candidate pair', JSON.stringify(pair));
  finish(true);
}

function onMessageFrom(id, dc, offerer) {
  return (msg) => {
    const text = typeof msg === 'string' ? msg : `<binary ${msg.length}>`;
    log(`Message from ${id} received: ${text}`);
    received.push(text);
    if (!offerer && /^\d+:/.test(text)) dc.sendMessage(`echo:${text}`);
    maybeFinish(id, offerer);
  };
}

function createPeerConnection(id) {
  const pc = new nodeDataChannel.PeerConnection(`${localId}-${id}`, config);
  pc.onStateChange((state) => {
    log('State:', state);
    // Let libdatachannel's own error lines reach the log first (its logger is asynchronous).
    if (state === 'failed') setTimeout(() => finish(false, 'PeerConnection failed'), 200);
  });
  pc.onGatheringStateChange((state) => log('Gathering State:', state));
  pc.onLocalDescription((sdp, type) => {
    signaling.descriptionsSent.push(sha256(sdp));
    log(`local description (${type}) sha256 ${sha256(sdp)}`);
    send(descriptionMessage(id, sdp, type));
  });
  pc.onLocalCandidate((candidate, mid) => {
    log('local candidate', candidate);
    localCandidates.push(candidate);
    send(candidateMessage(id, candidate, mid));
  });
  pc.onDataChannel((dc) => {
    log(`DataChannel from ${id} received with label "${dc.getLabel()}"`);
    dc.onClosed(() => log(`DataChannel from ${id} closed`));
    dc.onMessage(onMessageFrom(id, dc, false));
    dc.sendMessage(`Hello from ${localId}`);
    dataChannelMap.set(id, dc);
  });
  peerConnectionMap.set(id, pc);
  return pc;
}

ws.onOpen(() => {
  log('WebSocket connected, signaling ready');
  if (!args.offer) return;
  const id = args.offer;
  log(`Offering to ${id}`);
  const pc = createPeerConnection(id);
  const dc = pc.createDataChannel('test');
  dc.onOpen(() => {
    log(`DataChannel from ${id} open`);
    dc.sendMessage(`Hello from ${localId}`);
    for (let i = 0; i < args.messages; i++) dc.sendMessage(`${i}:${localId}`);
  });
  dc.onClosed(() => log(`DataChannel from ${id} closed`));
  dc.onMessage(onMessageFrom(id, dc, true));
  dataChannelMap.set(id, dc);
});

ws.onError((err) => {
  log('WebSocket error', err);
  finish(false, `WebSocket error: ${err}`);
});
ws.onClosed(() => {
  log('WebSocket closed');
  if (!finished) finish(false, 'WebSocket closed');
});

ws.onMessage((data) => {
  if (typeof data !== 'string') return;
  let message;
  try {
    message = JSON.parse(data);
  } catch (e) {
    finish(false, `signaling frame is not JSON: ${data}`);
    return;
  }
  signaling.received++;
  const id = message.id;
  if (typeof id !== 'string') {
    log('ignoring frame without id', data);
    return;
  }
  let type;
  let description;
  let candidate;
  let mid;
  if (args.format === 'seed004') {
    const p = message.payload ?? {};
    if (typeof p.sdp === 'string') {
      type = p.type;
      description = p.sdp;
    } else if (typeof p.candidate === 'string') {
      type = 'candidate';
      candidate = p.candidate;
      mid = p.sdpMid;
    }
  } else {
    type = message.type;
    description = message.description;
    candidate = message.candidate;
    mid = message.mid;
  }
  if (typeof type !== 'string') return;
  signaling.types[type] = (signaling.types[type] ?? 0) + 1;

  let pc = peerConnectionMap.get(id);
  if (!pc) {
    if (type !== 'offer') return;
    log(`Answering to ${id}`);
    pc = createPeerConnection(id);
  }
  try {
    if (type === 'offer' || type === 'answer') {
      signaling.descriptionsReceived.push(sha256(description));
      log(`remote description (${type}) sha256 ${sha256(description)}`);
      pc.setRemoteDescription(description, type);
    } else if (type === 'candidate') {
      pc.addRemoteCandidate(candidate, mid);
      maybeFinish(id, !!args.offer);
    }
  } catch (e) {
    // An exception thrown out of a native callback would abort the process.
    log(`libdatachannel refused the ${type} from ${id}: ${e}`);
    if (!finished) setTimeout(() => finish(false, `${type} from ${id}: ${e}`), 200);
  }
});

const url = `${args.url}/${localId}`;
log('Url is', url);
ws.open(url);
