//! The TURN side of fleet mode (`[fleet]`): load publishing, the view of the other nodes that
//! provisioning and drain choose from, fleet-wide per-user quotas, and the shared nonce key.
//! Signaling across nodes lives in `kyuu_signal::fleet`; both use the same Redis.
//!
//! # Redis layout
//!
//! * `kyuu:load:<node>` = JSON [`NodeLoad`] (allocations, relayed bytes/s, signaling
//!   connections, draining, public TURN URLs and addresses, `public_http`), `EX peer_ttl_secs`,
//!   rewritten every second and at once when the node starts draining. A dead node's key
//!   expires, so it stops being handed out within `peer_ttl_secs`.
//! * `kyuu:nodes` = set of node names (a name whose load key is gone is removed by whoever
//!   notices).
//! * `kyuu:turnusers:<node>` = hash user → live allocations on that node, `EX peer_ttl_secs`,
//!   rewritten when the counts change (checked every 250 ms) and every second. Each node sums
//!   the other live nodes' hashes into the core's "elsewhere" counts
//!   ([`kyuu_turn::Shared::set_remote_user_allocations`]); the core adds its own when it
//!   checks `turn.user_quota` on Allocate. Nothing on the per-packet path touches Redis, and
//!   the Allocate path does not either: it reads the last snapshot.
//!
//! # Redis unreachable
//!
//! The view is cleared (provisioning hands out this node only), the elsewhere counts are
//! cleared (the quota is per node again), `kyuu_fleet_turn_degraded` is 1 and the log says so
//! once; everything comes back at the next successful round.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kyuu_signal::{FleetConfig, FleetView, NodeLoad, SignalAdmin};
use redis::aio::ConnectionManager;
use sha2::Digest as _;
use tokio::sync::Notify;

use crate::relay::RelayControl;

/// How often the load is published and the view refreshed.
const LOAD_EVERY: Duration = Duration::from_secs(1);
/// How often changed per-user counts are published and the others' read.
const QUOTA_EVERY: Duration = Duration::from_millis(250);

/// The nonce key of a fleet node: SHA-256 of `fleet.nonce_secret`, else of the first TURN REST
/// secret (shared by the fleet so credentials verify everywhere). `None`: a random key.
pub fn nonce_key(fleet: Option<&FleetConfig>, rest_secret: Option<&str>) -> Option<[u8; 32]> {
    let fleet = fleet?;
    let secret = fleet.nonce_secret.as_deref().or(rest_secret)?;
    let mut h = sha2::Sha256::new();
    h.update(b"kyuu turn nonce key\0");
    h.update(secret.as_bytes());
    Some(h.finalize().into())
}

/// What the publisher reads its numbers from.
pub(crate) struct Sources {
    pub relay: RelayControl,
    pub signal: Option<SignalAdmin>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// What other nodes hand out for this one.
    pub turn_urls: Vec<String>,
    /// Public TURN addresses (for 300 ALTERNATE-SERVER), one per family at most.
    pub turn_addrs: Vec<SocketAddr>,
}

/// The running TURN fleet glue; dropping it stops its task.
#[derive(Debug)]
pub struct TurnFleet {
    view: FleetView,
    draining: Arc<AtomicBool>,
    poke: Arc<Notify>,
    task: tokio::task::AbortHandle,
}

impl Drop for TurnFleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TurnFleet {
    /// Starts the publisher (needs a tokio runtime).
    pub(crate) fn start(cfg: FleetConfig, src: Sources) -> Result<TurnFleet, String> {
        cfg.validate()?;
        let client = redis::Client::open(cfg.redis_url.as_str())
            .map_err(|e| format!("fleet.redis_url: {e}"))?;
        let view = FleetView::new(&cfg.node, &cfg.region);
        let draining = Arc::new(AtomicBool::new(false));
        let poke = Arc::new(Notify::new());
        let task = tokio::spawn(run(
            cfg,
            client,
            src,
            view.clone(),
            draining.clone(),
            poke.clone(),
        ))
        .abort_handle();
        Ok(TurnFleet {
            view,
            draining,
            poke,
            task,
        })
    }

    /// The nodes' snapshot (shared with provisioning).
    pub fn view(&self) -> FleetView {
        self.view.clone()
    }

    /// Publishes this node as draining now, so that no node hands it out any more.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.poke.notify_one();
    }

    /// Where a draining node sends TURN clients: per family, the least loaded other healthy,
    /// non-draining node (same region first) with a TURN address of that family.
    pub fn alternates(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut out = Vec::new();
        for v4 in [true, false] {
            let has = |a: &SocketAddr| a.is_ipv4() == v4;
            if let Some(n) = self
                .view
                .pick(None, true, now, |n| n.turn_addrs.iter().any(has))
            {
                out.extend(n.turn_addrs.iter().copied().find(has));
            }
        }
        out
    }

    /// Where a draining node sends its signaling clients: the WebSocket URL of the least
    /// loaded other healthy, non-draining node that has `fleet.public_http`.
    pub fn signal_url(&self) -> Option<String> {
        self.view
            .pick(None, true, Instant::now(), |n| n.ws_url().is_some())
            .and_then(|n| n.ws_url())
    }
}

fn load_key(node: &str) -> String {
    format!("kyuu:load:{node}")
}

fn users_key(node: &str) -> String {
    format!("kyuu:turnusers:{node}")
}

const NODES: &str = "kyuu:nodes";

struct Publisher {
    cfg: FleetConfig,
    src: Sources,
    view: FleetView,
    draining: Arc<AtomicBool>,
    last_bytes: Option<(Instant, u64)>,
    bandwidth: u64,
    published_generation: Option<u64>,
    degraded: bool,
}

async fn run(
    cfg: FleetConfig,
    client: redis::Client,
    src: Sources,
    view: FleetView,
    draining: Arc<AtomicBool>,
    poke: Arc<Notify>,
) {
    let mut p = Publisher {
        cfg,
        src,
        view,
        draining,
        last_bytes: None,
        bandwidth: 0,
        published_generation: None,
        degraded: false,
    };
    let mut conn: Option<ConnectionManager> = None;
    let mut last_load: Option<Instant> = None;
    loop {
        let poked = tokio::select! {
            () = poke.notified() => true,
            () = tokio::time::sleep(QUOTA_EVERY) => false,
        };
        if conn.is_none() {
            let c = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_millis(500))
                .set_response_timeout(Duration::from_millis(1000))
                .set_number_of_retries(1)
                .set_max_delay(200);
            match ConnectionManager::new_with_config(client.clone(), c).await {
                Ok(m) => conn = Some(m),
                Err(e) => {
                    p.fail(&e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let due = poked || last_load.is_none_or(|t| t.elapsed() >= LOAD_EVERY);
        let r = if due {
            last_load = Some(Instant::now());
            p.load_round(c).await
        } else {
            p.quota_round(c, false).await
        };
        match r {
            Ok(()) => p.ok(),
            Err(e) => p.fail(&e),
        }
    }
}

impl Publisher {
    fn ok(&mut self) {
        if self.degraded {
            tracing::info!("fleet: Redis reachable again; TURN quotas and provisioning fleet-wide");
        }
        self.degraded = false;
        metrics::gauge!("kyuu_fleet_turn_degraded").set(0.0);
    }

    fn fail(&mut self, e: &redis::RedisError) {
        if !self.degraded {
            tracing::warn!(
                "fleet: Redis unreachable ({e}): TURN user quotas count this node only and \
                 /v1/ice-servers hands out this node until it is back"
            );
        }
        self.degraded = true;
        metrics::gauge!("kyuu_fleet_turn_degraded").set(1.0);
        self.view.clear();
        self.src
            .relay
            .shared
            .set_remote_user_allocations(HashMap::new());
        self.published_generation = None;
    }

    fn my_load(&mut self) -> NodeLoad {
        if let Some(h) = &self.src.metrics {
            let bytes = crate::admin::metric_sum(&h.render(), "kyuu_turn_relayed_bytes_total");
            let now = Instant::now();
            if let Some((t, b)) = self.last_bytes {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                if dt > 0.0 {
                    self.bandwidth = (bytes.saturating_sub(b) as f64 / dt) as u64;
                }
            }
            self.last_bytes = Some((now, bytes));
        }
        NodeLoad {
            node: self.cfg.node.clone(),
            region: self.cfg.region.clone(),
            draining: self.draining.load(Ordering::Relaxed),
            allocations: self.src.relay.allocation_count(),
            bandwidth_bps: self.bandwidth,
            signal_conns: self
                .src
                .signal
                .as_ref()
                .map_or(0, |s| s.connection_count() as u64),
            turn_urls: self.src.turn_urls.clone(),
            turn_addrs: self.src.turn_addrs.clone(),
            public_http: self.cfg.public_http.clone(),
        }
    }

    /// Publishes this node's load, reads every node's, then does a quota round.
    async fn load_round(&mut self, c: &mut ConnectionManager) -> redis::RedisResult<()> {
        let me = self.my_load();
        let json = serde_json::to_string(&me).unwrap_or_default();
        let ttl = self.cfg.peer_ttl_secs;
        let (_, _, names): ((), (), Vec<String>) = redis::pipe()
            .cmd("SET")
            .arg(load_key(&me.node))
            .arg(json)
            .arg("EX")
            .arg(ttl)
            .cmd("SADD")
            .arg(NODES)
            .arg(&me.node)
            .cmd("SMEMBERS")
            .arg(NODES)
            .query_async(c)
            .await?;
        let names: Vec<String> = names.into_iter().take(1024).collect();
        let keys: Vec<String> = names.iter().map(|n| load_key(n)).collect();
        let loads: Vec<Option<String>> = if keys.is_empty() {
            Vec::new()
        } else {
            redis::cmd("MGET").arg(&keys).query_async(c).await?
        };
        let mut nodes = Vec::new();
        let mut gone = Vec::new();
        for (name, l) in names.iter().zip(loads) {
            match l.and_then(|j| serde_json::from_str::<NodeLoad>(&j).ok()) {
                Some(n) if n.node == *name => nodes.push(n),
                _ => gone.push(name.clone()),
            }
        }
        if !gone.is_empty() {
            let _: i64 = redis::cmd("SREM")
                .arg(NODES)
                .arg(&gone)
                .query_async(c)
                .await?;
        }
        metrics::gauge!("kyuu_fleet_nodes").set(nodes.len() as f64);
        self.view.update(nodes, Instant::now());
        self.quota_round(c, true).await
    }

    /// Publishes this node's per-user counts when they changed (or `refresh`), then reads the
    /// other live nodes' counts into the core.
    async fn quota_round(
        &mut self,
        c: &mut ConnectionManager,
        refresh: bool,
    ) -> redis::RedisResult<()> {
        let shared = &self.src.relay.shared;
        let generation = shared.user_allocations_generation();
        if refresh || self.published_generation != Some(generation) {
            let (generation, users) = shared.user_allocations();
            let key = users_key(&self.cfg.node);
            let mut pipe = redis::pipe();
            pipe.atomic().cmd("DEL").arg(&key).ignore();
            if !users.is_empty() {
                pipe.cmd("HSET").arg(&key);
                for (u, n) in &users {
                    pipe.arg(u).arg(*n);
                }
                pipe.ignore();
                pipe.cmd("EXPIRE")
                    .arg(&key)
                    .arg(self.cfg.peer_ttl_secs)
                    .ignore();
            }
            let () = pipe.query_async(c).await?;
            self.published_generation = Some(generation);
        }
        let others: Vec<String> = self
            .view
            .nodes(Instant::now())
            .into_iter()
            .map(|n| n.node)
            .filter(|n| *n != self.cfg.node)
            .collect();
        let mut remote: HashMap<String, u32> = HashMap::new();
        if !others.is_empty() {
            let mut pipe = redis::pipe();
            for n in &others {
                pipe.cmd("HGETALL").arg(users_key(n));
            }
            let all: Vec<HashMap<String, u32>> = pipe.query_async(c).await?;
            for m in all {
                for (u, n) in m {
                    *remote.entry(u).or_insert(0) += n;
                }
            }
        }
        shared.set_remote_user_allocations(remote);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nonce_key_is_shared_only_in_a_fleet_with_a_secret() {
        let f: FleetConfig =
            toml::from_str("redis_url = \"redis://127.0.0.1:1/\"\nnode = \"a\"\n").unwrap();
        assert!(nonce_key(None, Some("s")).is_none());
        assert!(nonce_key(Some(&f), None).is_none());
        let a = nonce_key(Some(&f), Some("rest")).unwrap();
        assert_eq!(Some(a), nonce_key(Some(&f), Some("rest")));
        let g = FleetConfig {
            nonce_secret: Some("a nonce secret of some length".into()),
            ..f
        };
        assert_ne!(Some(a), nonce_key(Some(&g), Some("rest")));
    }
}
