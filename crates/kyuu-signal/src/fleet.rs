//! Fleet mode: many signaling nodes as one service, over Redis.
//!
//! The hub stays sans-IO: a destination it does not know comes out as
//! [`Output::Route`](crate::hub::Output::Route) and this module's glue looks the id up and
//! forwards the frame; frames from other nodes go in through [`Hub::from_remote`].
//!
//! # Redis layout
//!
//! * `kyuu:peer:<id>` = owning node name, `EX peer_ttl_secs`. Set when a client connects and
//!   refreshed for every live client by the heartbeat (every `heartbeat_secs`). A node that dies
//!   stops refreshing, so its ids vanish fleet-wide within `peer_ttl_secs`.
//! * `kyuu:node:<name>` (pub/sub channel): frames routed to that node, JSON
//!   `{"to": <id>, "text": <frame>}`.
//! * `kyuu:owner:<id>` = SHA-256 (hex) of the id's resume token, same expiry, for ids whose
//!   client holds one: another node lets a handshake take the id only with that token
//!   ([`Fleet::admit`]) and tells the old node to close its connection (`"evict"`).
//! * `kyuu:alive:<name>` = `1`, `EX peer_ttl_secs`, refreshed by the heartbeat. A node whose
//!   key is gone is dead: the others withdraw the directory entries they mirror from it.
//! * `kyuu:name:<name>` = the id holding a directory name fleet-wide, `EX peer_ttl_secs`,
//!   claimed atomically (a Lua `GET`/`SET`) before the publication is announced and refreshed by
//!   the heartbeat. Of two clients on two nodes publishing one name at once, the later claim
//!   is revoked: its client gets `unpublished` and a `name-taken` error.
//! * `kyuu:events` (pub/sub channel): room joins/leaves and directory publications and
//!   withdrawals of every node,
//!   mirrored by every other node into its hub ([`Hub::remote_dir`]), and resync requests (a
//!   node that (re)subscribes asks all others to announce their publications again).
//!
//! # Ordering
//!
//! Every route and registration of a node goes through one task, in hub output order, and each
//! command is awaited before the next is sent on the one connection. Redis delivers the
//! messages of one publishing connection to a subscriber in publish order, and the subscriber
//! task feeds them to the hub in that order, so frames from one sender to one receiver arrive
//! in the order sent.
//!
//! # Redis unreachable
//!
//! Local relaying never touches Redis. When Redis fails, the node marks itself degraded
//! (`/healthz`), answers routes to unknown ids as if the id were unknown (held or
//! `unknown-peer`), keeps retrying, and on reconnect re-subscribes and re-registers every live
//! id at the next heartbeat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::hub::{ConnId, DirKey};

/// The `[fleet]` configuration section. Absent: a single node, no Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
    pub redis_url: String,
    /// This node's name, unique in the fleet (letters, digits, `-`, `_`, `.`).
    pub node: String,
    /// Region of this node: `/v1/ice-servers` prefers TURN nodes of the client's region.
    #[serde(default)]
    pub region: String,
    /// Public HTTP(S) base URL of this node, e.g. `https://eu1.example.org`: where a draining
    /// node sends its signaling clients.
    #[serde(default)]
    pub public_http: Option<String>,
    /// Seconds a client id stays registered without a heartbeat; also the bound on how long
    /// a dead node's clients still look present to the rest of the fleet.
    #[serde(default = "default_peer_ttl")]
    pub peer_ttl_secs: u64,
    /// Interval of the registry heartbeat, seconds (must be below `peer_ttl_secs`).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// Secret shared by every node, from which the TURN nonce key is derived so that a nonce
    /// issued by one node is accepted by all. Unset: derived from the first
    /// `turn.static_auth_secrets` entry (which the nodes of a fleet share anyway, so that REST
    /// credentials verify on every node); with neither, a random key per process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce_secret: Option<String>,
    /// The TURN URLs other nodes hand out for this one (e.g.
    /// `turn:eu1.example.org:3478?transport=udp`). Empty: the URLs this node hands out itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_turn: Vec<String>,
}

fn default_peer_ttl() -> u64 {
    10
}

fn default_heartbeat() -> u64 {
    3
}

impl FleetConfig {
    /// Checks the section; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.redis_url.starts_with("redis://") || self.redis_url.starts_with("rediss://")) {
            return Err(format!(
                "fleet.redis_url: {:?} is not a redis:// URL",
                self.redis_url
            ));
        }
        if redis::Client::open(self.redis_url.as_str()).is_err() {
            return Err(format!(
                "fleet.redis_url: {:?} is not valid",
                self.redis_url
            ));
        }
        if self.node.is_empty()
            || self.node.len() > 64
            || !self
                .node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "fleet.node: {:?} must be 1..=64 of letters, digits, '-', '_', '.'",
                self.node
            ));
        }
        if self.peer_ttl_secs < 2 {
            return Err("fleet.peer_ttl_secs: must be at least 2".into());
        }
        if self.nonce_secret.as_deref().is_some_and(|k| k.len() < 16) {
            return Err("fleet.nonce_secret: must be at least 16 characters".into());
        }
        if let Some(u) = self
            .public_turn
            .iter()
            .find(|u| !(u.starts_with("turn:") || u.starts_with("turns:")))
        {
            return Err(format!(
                "fleet.public_turn: {u:?} is not a turn: or turns: URL"
            ));
        }
        if self.heartbeat_secs == 0 || self.heartbeat_secs >= self.peer_ttl_secs {
            return Err("fleet.heartbeat_secs: must be positive and below peer_ttl_secs".into());
        }
        Ok(())
    }
}

/// Whether this node currently reaches Redis; shared with `/healthz`.
#[derive(Debug, Clone)]
pub struct FleetStatus {
    ok: Arc<AtomicBool>,
}

impl FleetStatus {
    fn new() -> FleetStatus {
        FleetStatus {
            ok: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `"ok"` when Redis answered the last command, `"degraded"` otherwise.
    pub fn as_str(&self) -> &'static str {
        if self.ok.load(Ordering::Relaxed) {
            "ok"
        } else {
            "degraded"
        }
    }

    fn set(&self, ok: bool) {
        let was = self.ok.swap(ok, Ordering::Relaxed);
        if was && !ok {
            warn!("fleet: Redis unreachable; serving local clients only until it is back");
        } else if !was && ok {
            info!("fleet: Redis reachable");
        }
    }
}

/// Work for the routing task, in hub output order.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// A local client took an id; with the SHA-256 (hex) of its resume token when it has one.
    Claim(String, Option<String>),
    /// A frame for an id that is not on this node.
    Route {
        from_conn: ConnId,
        from: String,
        to: String,
        text: String,
    },
    /// A local client published or withdrew a directory key.
    Dir { key: DirKey, peer: String, on: bool },
    /// A local client joined or left a room.
    Room {
        room: String,
        peer: String,
        on: bool,
    },
    /// Announce every local publication (asked by another node, or after subscribing).
    Announce,
    /// Ask every node to announce its publications (after (re)subscribing).
    AskResync,
    /// A message held here for `to`, whose client resumed on `node`.
    Forward {
        node: String,
        to: String,
        text: String,
    },
}

/// Fleet-wide events on [`EVENTS`].
#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Event {
    Dir {
        node: String,
        key: DirKey,
        peer: String,
        on: bool,
    },
    Room {
        node: String,
        room: String,
        peer: String,
        on: bool,
    },
    Resync {
        node: String,
    },
}

/// The fleet events channel: directory changes and resync requests.
const EVENTS: &str = "kyuu:events";

/// What the glue needs from the shell that owns the hub.
pub(crate) trait HubPort: Send + Sync + 'static {
    /// Ids of the live local clients, with the hash of their resume token ([`token_hash`]).
    fn live_ids(&self) -> Vec<(String, Option<String>)>;
    /// `id` was taken over on another node; returns the messages held here for it.
    fn evict(&self, id: &str) -> Vec<String>;
    /// The local publications.
    fn local_publications(&self) -> Vec<(DirKey, String)>;
    /// The local room memberships (room, id).
    fn local_memberships(&self) -> Vec<(String, String)>;
    /// A room membership on another node changed.
    fn remote_room(&self, node: &str, room: &str, peer: &str, on: bool);
    /// Nodes whose publications or memberships are mirrored here.
    fn remote_nodes(&self) -> Vec<String>;
    /// A publication on another node changed.
    fn remote_dir(&self, node: &str, key: DirKey, peer: &str, on: bool);
    /// `node` no longer refreshes its liveness key.
    fn node_gone(&self, node: &str);
    /// A frame from another node for local client `to`.
    fn deliver_remote(&self, to: &str, text: String);
    /// A message held for `to` on another node, which `to` left for this one.
    fn deliver_held(&self, to: &str, text: String);
    /// No node has `to`.
    fn remote_unknown(&self, from_conn: ConnId, from: &str, to: &str, text: String);
    /// Local client `peer`'s name `key` is held by a client of another node.
    fn name_taken(&self, peer: &str, key: &DirKey);
}

/// `kyuu:name:<name>` = the id holding the name fleet-wide. Claims it for ARGV[1] with expiry
/// ARGV[2] when free, refreshes it when ARGV[1] holds it; 1 when ARGV[1] holds it after,
/// 0 when another id does.
const CLAIM_NAME: &str = "local v = redis.call('GET', KEYS[1]) \
    if not v then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end \
    if v == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end \
    return 0";

/// Frees `kyuu:name:<name>` if ARGV[1] holds it.
const RELEASE_NAME: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) end return 0";

fn name_key(name: &str) -> String {
    format!("kyuu:name:{name}")
}

#[derive(Serialize, Deserialize)]
struct Wire {
    to: String,
    #[serde(default)]
    text: String,
    /// `to` was taken over on another node: close it here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    evict: bool,
    /// With `evict`: the node that took `to` over, where messages held for it go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    /// A message held for `to` on its old node (hold it here if `to` is still connecting).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    held: bool,
}

fn peer_key(id: &str) -> String {
    format!("kyuu:peer:{id}")
}

fn owner_key(id: &str) -> String {
    format!("kyuu:owner:{id}")
}

/// What the registry stores of a resume token: its SHA-256, hex.
pub(crate) fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why [`Fleet::admit`] refused an id.
#[derive(Debug)]
pub(crate) struct HeldElsewhere;

fn node_channel(node: &str) -> String {
    format!("kyuu:node:{node}")
}

/// The running fleet glue of one node; dropping it stops its tasks.
pub(crate) struct Fleet {
    tx: mpsc::Sender<Cmd>,
    status: FleetStatus,
    tasks: Vec<AbortHandle>,
    cfg: Arc<FleetConfig>,
    client: redis::Client,
    mgr: Mgr,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Queue depth of the routing task; beyond it routes are refused like an unknown peer.
const QUEUE: usize = 65_536;

impl Fleet {
    /// Starts the routing, subscriber and heartbeat tasks (needs a tokio runtime).
    pub(crate) fn start(
        cfg: FleetConfig,
        port: std::sync::Weak<dyn HubPort>,
    ) -> Result<Fleet, String> {
        cfg.validate()?;
        let client = redis::Client::open(cfg.redis_url.as_str())
            .map_err(|e| format!("fleet.redis_url: {e}"))?;
        let status = FleetStatus::new();
        let (tx, rx) = mpsc::channel(QUEUE);
        let cfg = Arc::new(cfg);
        let mgr = Arc::new(tokio::sync::OnceCell::new());
        let route = tokio::spawn(route_task(
            cfg.clone(),
            client.clone(),
            mgr.clone(),
            status.clone(),
            port.clone(),
            rx,
        ));
        let heartbeat = tokio::spawn(heartbeat_task(
            cfg.clone(),
            client.clone(),
            mgr.clone(),
            status.clone(),
            port.clone(),
        ));
        let subscribe = tokio::spawn(subscribe_task(
            cfg.clone(),
            client.clone(),
            status.clone(),
            port,
            tx.clone(),
        ));
        let tasks = vec![
            route.abort_handle(),
            heartbeat.abort_handle(),
            subscribe.abort_handle(),
        ];
        Ok(Fleet {
            tx,
            status,
            tasks,
            cfg,
            client,
            mgr,
        })
    }

    /// Fleet-wide id ownership, checked before the local hub sees a handshake for `id`.
    /// When another node holds `id`, the handshake may take it only with the id's resume
    /// token (or, for an id claimed without one, when `legacy_takeover` is on); the other
    /// node is then told to close its connection. Redis unreachable: admitted (the node
    /// serves on local rules while degraded).
    pub(crate) async fn admit(
        &self,
        id: &str,
        resume: Option<&str>,
        legacy_takeover: bool,
    ) -> Result<(), HeldElsewhere> {
        let Some(mut c) = manager(&self.client, &self.mgr).await else {
            return Ok(());
        };
        let got: redis::RedisResult<(Option<String>, Option<String>)> = redis::pipe()
            .cmd("GET")
            .arg(peer_key(id))
            .cmd("GET")
            .arg(owner_key(id))
            .query_async(&mut c)
            .await;
        let (node, owner) = match got {
            Ok(v) => v,
            Err(e) => {
                debug!("fleet: admitting {id}: {e}");
                self.status.set(false);
                return Ok(());
            }
        };
        let Some(node) = node.filter(|n| *n != self.cfg.node) else {
            return Ok(());
        };
        let allowed = match (owner, resume) {
            (Some(h), Some(t)) => ct_eq_str(&h, &token_hash(t)),
            (Some(_), None) => false,
            (None, _) => legacy_takeover,
        };
        if !allowed {
            return Err(HeldElsewhere);
        }
        let payload = serde_json::to_string(&Wire {
            to: id.to_owned(),
            text: String::new(),
            evict: true,
            by: Some(self.cfg.node.clone()),
            held: false,
        })
        .unwrap_or_default();
        let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(node_channel(&node))
            .arg(payload)
            .query_async(&mut c)
            .await;
        if let Err(e) = r {
            debug!("fleet: telling {node} to drop {id}: {e}");
        }
        info!("fleet: {id} taken over from node {node}");
        Ok(())
    }

    pub(crate) fn status(&self) -> FleetStatus {
        self.status.clone()
    }

    /// Queues `cmd`; `false` when the queue is full (the caller treats the route as unknown).
    pub(crate) fn send(&self, cmd: Cmd) -> bool {
        self.tx.try_send(cmd).is_ok()
    }
}

type Mgr = Arc<tokio::sync::OnceCell<ConnectionManager>>;

/// The shared auto-reconnecting connection, created on first success.
async fn manager(client: &redis::Client, mgr: &Mgr) -> Option<ConnectionManager> {
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_millis(500))
        .set_response_timeout(Duration::from_millis(1000))
        .set_number_of_retries(1)
        .set_max_delay(200);
    mgr.get_or_try_init(|| ConnectionManager::new_with_config(client.clone(), cfg))
        .await
        .ok()
        .cloned()
}

async fn route_task(
    cfg: Arc<FleetConfig>,
    client: redis::Client,
    mgr: Mgr,
    status: FleetStatus,
    port: std::sync::Weak<dyn HubPort>,
    mut rx: mpsc::Receiver<Cmd>,
) {
    let mut last_fail: Option<tokio::time::Instant> = None;
    // A command taken from the queue while gathering a batch of routes, handled next.
    let mut next: Option<Cmd> = None;
    loop {
        let cmd = match next.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => return,
            },
        };
        let Some(port) = port.upgrade() else {
            return;
        };
        // While Redis is down, fail fast instead of waiting for a timeout per frame.
        let fresh_failure = last_fail.is_some_and(|t| t.elapsed() < Duration::from_millis(500));
        let conn = if fresh_failure {
            None
        } else {
            manager(&client, &mgr).await
        };
        match cmd {
            Cmd::Claim(id, hash) => {
                let Some(mut c) = conn else { continue };
                let mut pipe = redis::pipe();
                register(&mut pipe, &cfg, &id, hash.as_deref());
                let r: redis::RedisResult<()> = pipe.query_async(&mut c).await;
                if let Err(e) = r {
                    debug!("fleet: registering {id}: {e}");
                    status.set(false);
                    last_fail = Some(tokio::time::Instant::now());
                }
            }
            Cmd::Dir { key, peer, on } => {
                // A name has one holder fleet-wide: claim it in Redis (atomically) before
                // announcing it; the later of two concurrent claims is revoked.
                if let (DirKey::Name(n), Some(c)) = (&key, conn.as_ref()) {
                    let mut c = c.clone();
                    let script = if on { CLAIM_NAME } else { RELEASE_NAME };
                    let r: redis::RedisResult<i64> = redis::cmd("EVAL")
                        .arg(script)
                        .arg(1)
                        .arg(name_key(n))
                        .arg(&peer)
                        .arg(cfg.peer_ttl_secs)
                        .query_async(&mut c)
                        .await;
                    match r {
                        Ok(0) if on => {
                            info!(
                                "fleet: name {n} is held on another node; {peer}'s claim revoked"
                            );
                            port.name_taken(&peer, &key);
                            continue;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            debug!("fleet: claiming name {n}: {e}");
                            status.set(false);
                            last_fail = Some(tokio::time::Instant::now());
                        }
                    }
                }
                let ev = Event::Dir {
                    node: cfg.node.clone(),
                    key,
                    peer,
                    on,
                };
                if let Some(mut c) = conn {
                    if !publish_event(&mut c, &ev, &status).await {
                        last_fail = Some(tokio::time::Instant::now());
                    }
                }
            }
            Cmd::Room { room, peer, on } => {
                let ev = Event::Room {
                    node: cfg.node.clone(),
                    room,
                    peer,
                    on,
                };
                if let Some(mut c) = conn {
                    if !publish_event(&mut c, &ev, &status).await {
                        last_fail = Some(tokio::time::Instant::now());
                    }
                }
            }
            Cmd::Forward { node, to, text } => {
                let Some(mut c) = conn else {
                    debug!("fleet: a message held for {to} lost (Redis unreachable)");
                    continue;
                };
                let payload = serde_json::to_string(&Wire {
                    to,
                    text,
                    evict: false,
                    by: None,
                    held: true,
                })
                .unwrap_or_default();
                let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(node_channel(&node))
                    .arg(payload)
                    .query_async(&mut c)
                    .await;
                match r {
                    Ok(_) => {
                        metrics::counter!("kyuu_signal_fleet_held_forwarded_total").increment(1);
                    }
                    Err(e) => {
                        debug!("fleet: forwarding to {node}: {e}");
                        status.set(false);
                        last_fail = Some(tokio::time::Instant::now());
                    }
                }
            }
            Cmd::Announce | Cmd::AskResync => {
                // Resync must not be lost to the fail-fast window: retry for a few seconds.
                let ask = matches!(cmd, Cmd::AskResync);
                let mut conn = conn;
                for attempt in 0..20 {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        conn = manager(&client, &mgr).await;
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    if announce(c, &cfg, &*port, ask, &status).await {
                        last_fail = None;
                        break;
                    }
                    last_fail = Some(tokio::time::Instant::now());
                }
            }
            Cmd::Route {
                from_conn,
                from,
                to,
                text,
            } => {
                // Every route queued behind this one goes in the same two round trips (one
                // pipeline of owner lookups, one of publishes), in queue order, so the order
                // per sender and receiver is kept. A command of another kind ends the batch
                // and is handled next.
                let mut batch = vec![Route {
                    from_conn,
                    from,
                    to,
                    text,
                }];
                while batch.len() < ROUTE_BATCH {
                    match rx.try_recv() {
                        Ok(Cmd::Route {
                            from_conn,
                            from,
                            to,
                            text,
                        }) => batch.push(Route {
                            from_conn,
                            from,
                            to,
                            text,
                        }),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let Some(mut c) = conn else {
                    for r in batch {
                        port.remote_unknown(r.from_conn, &r.from, &r.to, r.text);
                    }
                    continue;
                };
                if !route_batch(&mut c, &cfg, &*port, batch).await {
                    status.set(false);
                    last_fail = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

/// Most routes sent in one batch (two pipelines).
const ROUTE_BATCH: usize = 256;

/// A frame for an id on another node (or nowhere), as queued by the hub.
struct Route {
    from_conn: ConnId,
    from: String,
    to: String,
    text: String,
}

/// Looks up the owners of a batch of routes in one pipeline and publishes them in another, in
/// batch order. False when Redis failed; every frame not published is then answered as for an
/// unknown peer.
async fn route_batch(
    c: &mut ConnectionManager,
    cfg: &FleetConfig,
    port: &dyn HubPort,
    batch: Vec<Route>,
) -> bool {
    let mut lookup = redis::pipe();
    for r in &batch {
        lookup.cmd("GET").arg(peer_key(&r.to));
    }
    let owners: redis::RedisResult<Vec<Option<String>>> = lookup.query_async(c).await;
    let owners = match owners {
        Ok(o) if o.len() == batch.len() => o,
        Ok(_) | Err(_) => {
            if let Err(e) = owners {
                debug!("fleet: looking up {} ids: {e}", batch.len());
            }
            for r in batch {
                port.remote_unknown(r.from_conn, &r.from, &r.to, r.text);
            }
            return false;
        }
    };
    let mut publish = redis::pipe();
    let mut published: Vec<Route> = Vec::new();
    for (r, owner) in batch.into_iter().zip(owners) {
        match owner {
            None => port.remote_unknown(r.from_conn, &r.from, &r.to, r.text),
            // It connected here after the hub emitted the route.
            Some(n) if n == cfg.node => port.deliver_remote(&r.to, r.text),
            Some(node) => {
                let payload = match serde_json::to_string(&Wire {
                    to: r.to.clone(),
                    text: r.text.clone(),
                    evict: false,
                    by: None,
                    held: false,
                }) {
                    Ok(p) => p,
                    Err(_) => continue,
                };
                publish
                    .cmd("PUBLISH")
                    .arg(node_channel(&node))
                    .arg(payload)
                    .ignore();
                published.push(r);
            }
        }
    }
    if published.is_empty() {
        return true;
    }
    let r: redis::RedisResult<()> = publish.query_async(c).await;
    match r {
        Ok(()) => {
            metrics::counter!("kyuu_signal_fleet_routed_total").increment(published.len() as u64);
            true
        }
        Err(e) => {
            debug!("fleet: publishing {} frames: {e}", published.len());
            false
        }
    }
}

/// Publishes a resync request (when `ask`) and every local publication and membership.
async fn announce(
    c: &mut ConnectionManager,
    cfg: &FleetConfig,
    port: &dyn HubPort,
    ask: bool,
    status: &FleetStatus,
) -> bool {
    if ask {
        let ev = Event::Resync {
            node: cfg.node.clone(),
        };
        if !publish_event(c, &ev, status).await {
            return false;
        }
    }
    let pubs = port
        .local_publications()
        .into_iter()
        .map(|(key, peer)| Event::Dir {
            node: cfg.node.clone(),
            key,
            peer,
            on: true,
        });
    let rooms = port
        .local_memberships()
        .into_iter()
        .map(|(room, peer)| Event::Room {
            node: cfg.node.clone(),
            room,
            peer,
            on: true,
        });
    for ev in pubs.chain(rooms) {
        if !publish_event(c, &ev, status).await {
            return false;
        }
    }
    true
}

async fn publish_event(c: &mut ConnectionManager, ev: &Event, status: &FleetStatus) -> bool {
    let Ok(payload) = serde_json::to_string(ev) else {
        return true;
    };
    let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg(EVENTS)
        .arg(payload)
        .query_async(c)
        .await;
    match r {
        Ok(_) => true,
        Err(e) => {
            debug!("fleet: publishing an event: {e}");
            status.set(false);
            false
        }
    }
}

/// Adds the registry writes for one live id to `pipe`.
fn register(pipe: &mut redis::Pipeline, cfg: &FleetConfig, id: &str, hash: Option<&str>) {
    pipe.cmd("SET")
        .arg(peer_key(id))
        .arg(&cfg.node)
        .arg("EX")
        .arg(cfg.peer_ttl_secs)
        .ignore();
    match hash {
        Some(h) => pipe
            .cmd("SET")
            .arg(owner_key(id))
            .arg(h)
            .arg("EX")
            .arg(cfg.peer_ttl_secs)
            .ignore(),
        None => pipe.cmd("DEL").arg(owner_key(id)).ignore(),
    };
}

fn ct_eq_str(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn heartbeat_task(
    cfg: Arc<FleetConfig>,
    client: redis::Client,
    mgr: Mgr,
    status: FleetStatus,
    port: std::sync::Weak<dyn HubPort>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.heartbeat_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids = match port.upgrade() {
            Some(p) => p.live_ids(),
            None => return,
        };
        let Some(mut c) = manager(&client, &mgr).await else {
            status.set(false);
            continue;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(format!("kyuu:alive:{}", cfg.node))
            .arg(1)
            .arg("EX")
            .arg(cfg.peer_ttl_secs)
            .ignore();
        for (id, hash) in &ids {
            register(&mut pipe, &cfg, id, hash.as_deref());
        }
        // Keep this node's name claims alive.
        let names = port
            .upgrade()
            .map(|p| p.local_publications())
            .unwrap_or_default();
        for (key, peer) in &names {
            if let DirKey::Name(n) = key {
                pipe.cmd("EVAL")
                    .arg(CLAIM_NAME)
                    .arg(1)
                    .arg(name_key(n))
                    .arg(peer)
                    .arg(cfg.peer_ttl_secs)
                    .ignore();
            }
        }
        let r: redis::RedisResult<()> = pipe.query_async(&mut c).await;
        if r.is_ok() {
            // Nodes whose publications we mirror and that stopped refreshing their key.
            let nodes = port.upgrade().map(|p| p.remote_nodes()).unwrap_or_default();
            for n in nodes {
                let alive: redis::RedisResult<bool> = redis::cmd("EXISTS")
                    .arg(format!("kyuu:alive:{n}"))
                    .query_async(&mut c)
                    .await;
                if let (Ok(false), Some(p)) = (alive, port.upgrade()) {
                    p.node_gone(&n);
                }
            }
        }
        match r {
            Ok(()) => status.set(true),
            Err(e) => {
                debug!("fleet: heartbeat: {e}");
                status.set(false);
            }
        }
    }
}

async fn subscribe_task(
    cfg: Arc<FleetConfig>,
    client: redis::Client,
    status: FleetStatus,
    port: std::sync::Weak<dyn HubPort>,
    tx: mpsc::Sender<Cmd>,
) {
    let channel = node_channel(&cfg.node);
    let mut backoff = Duration::from_millis(100);
    loop {
        if port.strong_count() == 0 {
            return;
        }
        let ps = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub()).await;
        let mut ps = match ps {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => {
                debug!("fleet: subscribing: {e}");
                status.set(false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => {
                status.set(false);
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        if let Err(e) = ps.subscribe(&[channel.as_str(), EVENTS]).await {
            debug!("fleet: subscribing: {e}");
            status.set(false);
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        info!("fleet: node {} subscribed to {channel}", cfg.node);
        // Others may have changed their publications while we were not listening.
        let _ = tx.try_send(Cmd::AskResync);
        let mut stream = ps.into_on_message();
        while let Some(msg) = stream.next().await {
            let Some(port) = port.upgrade() else {
                return;
            };
            if msg.get_channel_name() == EVENTS {
                match serde_json::from_slice::<Event>(msg.get_payload_bytes()) {
                    Ok(Event::Dir {
                        node,
                        key,
                        peer,
                        on,
                    }) if node != cfg.node => port.remote_dir(&node, key, &peer, on),
                    Ok(Event::Room {
                        node,
                        room,
                        peer,
                        on,
                    }) if node != cfg.node => port.remote_room(&node, &room, &peer, on),
                    Ok(Event::Resync { node }) if node != cfg.node => {
                        let _ = tx.try_send(Cmd::Announce);
                    }
                    Ok(_) => {}
                    Err(_) => debug!("fleet: malformed event, dropped"),
                }
                continue;
            }
            let Ok(w) = serde_json::from_slice::<Wire>(msg.get_payload_bytes()) else {
                debug!("fleet: malformed frame on {channel}, dropped");
                continue;
            };
            if w.evict {
                let held = port.evict(&w.to);
                if let Some(node) = w.by.filter(|n| *n != cfg.node) {
                    if !held.is_empty() {
                        info!(
                            "fleet: {} held message(s) for {} follow it to {node}",
                            held.len(),
                            w.to
                        );
                    }
                    for text in held {
                        let to = w.to.clone();
                        if tx
                            .try_send(Cmd::Forward {
                                node: node.clone(),
                                to,
                                text,
                            })
                            .is_err()
                        {
                            warn!("fleet: queue full, a held message was not forwarded");
                        }
                    }
                }
            } else if w.held {
                port.deliver_held(&w.to, w.text);
            } else {
                port.deliver_remote(&w.to, w.text);
            }
        }
        // The connection ended (Redis restarted or unreachable): subscribe again.
        status.set(false);
        warn!("fleet: lost the subscription to {channel}; reconnecting");
        tokio::time::sleep(backoff).await;
    }
}
