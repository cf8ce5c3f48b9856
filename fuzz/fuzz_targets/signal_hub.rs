//! Drives the signaling hub (`kyuu_signal::hub::Hub`, sans-IO) with arbitrary sequences of
//! connects (given, assigned and reused ids, resume tokens, tokens' claims, addresses),
//! disconnects (live, replaced and unknown connections), text frames (relay frames, every
//! control message, raw bytes), binary frames and time. The hub must never panic, and its
//! outputs must stay consistent with what it was told.
#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use kyuu_signal::hub::{ConnId, ConnectRequest, Hub, Output};
use kyuu_signal::token::Claims;
use kyuu_signal::SignalConfig;
use libfuzzer_sys::fuzz_target;

/// Reads the fuzz input as a stream of choices; zeros once exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn pick<'b, T>(&mut self, items: &'b [T]) -> Option<&'b T> {
        if items.is_empty() {
            return None;
        }
        items.get(usize::from(self.byte()) % items.len())
    }
    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }
    /// A short string straight from the input (lossy UTF-8).
    fn raw(&mut self, max: usize) -> String {
        let n = usize::from(self.byte()) % (max + 1);
        let n = n.min(self.0.len());
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8_lossy(s).into_owned()
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

const IDS: &[&str] = &["a", "b", "c", "3251357a", "", "x/y", "\"q", "healthz"];
const NAMES: &[&str] = &["r", "s", "arm-7", "/cam", ""];

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A text frame: mostly well-formed protocol messages, some raw input.
fn frame(inp: &mut Input, ids: &[String]) -> String {
    let id = |inp: &mut Input| -> String {
        if inp.flag() {
            inp.pick(ids).cloned().unwrap_or_default()
        } else {
            (*inp.pick(IDS).unwrap_or(&"a")).to_owned()
        }
    };
    let name = |inp: &mut Input| json_str(inp.pick(NAMES).unwrap_or(&"r"));
    let key = |inp: &mut Input| if inp.flag() { "name" } else { "topic" };
    match inp.byte() % 16 {
        0 => format!(
            r#"{{"id":{},"type":"offer","description":"v=0\r\n"}}"#,
            json_str(&id(inp))
        ),
        1 => format!(
            r#"{{"id":{},"payload":{{"candidate":"c","sdpMid":"0"}},"id":"dup"}}"#,
            json_str(&id(inp))
        ),
        2 => format!(r#"{{"type":"ping","ts":{}}}"#, inp.byte()),
        3 => format!(r#"{{"type":"join","room":{}}}"#, name(inp)),
        4 => format!(r#"{{"type":"leave","room":{}}}"#, name(inp)),
        5 => format!(r#"{{"type":"members","room":{}}}"#, name(inp)),
        6 => format!(r#"{{"type":"publish","{}":{}}}"#, key(inp), name(inp)),
        7 => format!(r#"{{"type":"unpublish","{}":{}}}"#, key(inp), name(inp)),
        8 => format!(r#"{{"type":"lookup","{}":{}}}"#, key(inp), name(inp)),
        9 => format!(r#"{{"type":"watch","{}":{}}}"#, key(inp), name(inp)),
        10 => format!(r#"{{"type":"unwatch","{}":{}}}"#, key(inp), name(inp)),
        11 => format!(r#"{{"id":{}}}"#, json_str(&inp.raw(80))),
        12 => format!(r#"{{"type":{}}}"#, json_str(&inp.raw(16))),
        13 => "x".repeat(usize::from(inp.byte()) * 4),
        _ => inp.raw(200),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let cfg = SignalConfig {
        max_message_size: 64 + usize::from(inp.byte()) * 4,
        rate_limit_per_sec: u32::from(inp.byte() % 8),
        rate_limit_burst: u32::from(inp.byte() % 16),
        max_connections: 1 + usize::from(inp.byte() % 8),
        max_connections_per_ip: 1 + usize::from(inp.byte() % 4),
        resume_grace_secs: u64::from(inp.byte() % 3),
        pending_ttl_ms: u64::from(inp.byte()) * 8,
        pending_max_per_peer: usize::from(inp.byte() % 4),
        pending_max_total: usize::from(inp.byte() % 6),
        buffer_unknown: inp.flag(),
        legacy_takeover: inp.flag(),
        assigned_id_len: 1 + usize::from(inp.byte() % 8),
        max_id_len: 1 + usize::from(inp.byte() % 16),
        max_name_len: 1 + usize::from(inp.byte() % 8),
        max_subscriptions: usize::from(inp.byte() % 4),
        max_room_members: usize::from(inp.byte() % 4),
        ..SignalConfig::default()
    };
    let max_connections = cfg.max_connections;
    let t0 = Instant::now();
    let mut now = t0;
    let mut hub = Hub::new(cfg, u64::from(inp.byte()));
    // Every connection ever accepted (live or not), ids handed out, resume tokens seen.
    let mut conns: Vec<ConnId> = Vec::new();
    let mut live: HashSet<ConnId> = HashSet::new();
    let mut ids: Vec<String> = Vec::new();
    let mut resumes: Vec<String> = Vec::new();

    for _ in 0..512 {
        if inp.done() {
            break;
        }
        match inp.byte() % 8 {
            0 | 1 => {
                let id = match inp.byte() % 4 {
                    0 => None,
                    1 => Some(inp.raw(20)),
                    2 => inp.pick(&ids).cloned(),
                    _ => inp.pick(IDS).map(|s| (*s).to_owned()),
                };
                let resume = match inp.byte() % 3 {
                    0 => inp.pick(&resumes).cloned(),
                    1 => Some(inp.raw(40)),
                    _ => None,
                };
                let claims = match inp.byte() % 4 {
                    0 => Some(Claims {
                        sub: if inp.flag() { "*".into() } else { inp.raw(8) },
                        rooms: inp.flag().then(|| vec!["r".to_owned()]),
                        exp: u64::MAX,
                    }),
                    _ => None,
                };
                let req = ConnectRequest {
                    id,
                    resume,
                    v2: inp.flag(),
                    ip: IpAddr::V4(Ipv4Addr::new(198, 18, 0, inp.byte() % 3)),
                    claims,
                    ice_servers: inp
                        .flag()
                        .then(|| serde_json::json!([{"urls": ["stun:198.18.0.1:3478"]}])),
                };
                if let Ok(acc) = hub.connect(now, req) {
                    assert!(live.insert(acc.conn), "a ConnId was handed out twice");
                    assert_eq!(hub.id_of(acc.conn), Some(acc.id.as_str()));
                    conns.push(acc.conn);
                    ids.push(acc.id);
                }
            }
            2 => {
                if let Some(&c) = inp.pick(&conns) {
                    hub.disconnect(now, c);
                    live.remove(&c);
                }
            }
            3 | 4 | 5 => {
                if let Some(&c) = inp.pick(&conns) {
                    let text = frame(&mut inp, &ids);
                    hub.text(now, c, &text);
                }
            }
            6 => {
                if let Some(&c) = inp.pick(&conns) {
                    hub.binary(now, c, usize::from(inp.byte()));
                }
            }
            _ => {
                now += Duration::from_millis(u64::from(inp.byte()) * 16);
                hub.handle_timeout(now);
            }
        }
        while let Some(out) = hub.poll_output() {
            match out {
                Output::Send { conn, text } => {
                    assert!(conns.contains(&conn), "output for a never-accepted conn");
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        if let Some(r) = v.get("resume").and_then(|r| r.as_str()) {
                            if resumes.len() < 64 {
                                resumes.push(r.to_owned());
                            }
                        }
                    }
                }
                Output::Close { conn, .. } => {
                    assert!(conns.contains(&conn), "close for a never-accepted conn");
                    // The shell disconnects a closed connection.
                    live.remove(&conn);
                    hub.disconnect(now, conn);
                }
                // Fleet outputs (cross-node routing, room and directory mirroring); this hub
                // runs single-node, so they carry nothing for the shell to check here.
                Output::Route { .. } | Output::Room { .. } | Output::Dir { .. } => {}
            }
        }
        assert!(hub.connections() <= max_connections);
        if let Some(t) = hub.poll_timeout() {
            // A deadline in the past must be cleared by handle_timeout(now).
            if t <= now {
                hub.handle_timeout(now);
                assert!(
                    hub.poll_timeout().map_or(true, |t2| t2 > now),
                    "timeout not cleared"
                );
            }
        }
    }
    for c in conns {
        hub.disconnect(now, c);
    }
    while hub.poll_output().is_some() {}
    assert_eq!(
        hub.connections(),
        0,
        "connections left after every disconnect"
    );
});
