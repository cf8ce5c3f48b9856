//! The fleet's view of its nodes: what each node publishes about itself (load, draining, public
//! TURN URLs and addresses) and the choice of a node for a client.
//!
//! The view is a snapshot that the server's fleet task refreshes from Redis about once a
//! second (`kyuu:load:<node>`, see `kyuu_server::fleet`); choosing a node never touches Redis.
//! A snapshot older than [`FleetView::STALE`] (Redis unreachable) is not used: the node then
//! hands out itself.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a node publishes about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// `fleet.node`.
    pub node: String,
    /// `fleet.region`.
    #[serde(default)]
    pub region: String,
    /// Draining: not handed out, not an alternate server.
    #[serde(default)]
    pub draining: bool,
    /// Live TURN allocations.
    #[serde(default)]
    pub allocations: u32,
    /// Relayed bytes per second, both directions (0 when metrics are off).
    #[serde(default)]
    pub bandwidth_bps: u64,
    /// Live signaling connections.
    #[serde(default)]
    pub signal_conns: u64,
    /// The TURN URLs `/v1/ice-servers` hands out for this node.
    #[serde(default)]
    pub turn_urls: Vec<String>,
    /// Public UDP/TCP TURN addresses, for 300 ALTERNATE-SERVER (one per family at most).
    #[serde(default)]
    pub turn_addrs: Vec<SocketAddr>,
    /// `fleet.public_http`: where its signaling is (`ws(s)://` derived from it).
    #[serde(default)]
    pub public_http: Option<String>,
}

impl NodeLoad {
    /// Lower is less loaded: allocations first, then relayed bandwidth (per Mbit/s), then
    /// signaling connections.
    fn score(&self) -> (u32, u64, u64) {
        (
            self.allocations,
            self.bandwidth_bps / 125_000,
            self.signal_conns,
        )
    }

    /// The signaling WebSocket base URL (`ws://host:port/`), from `public_http`.
    pub fn ws_url(&self) -> Option<String> {
        let h = self.public_http.as_deref()?;
        let rest = h
            .strip_prefix("https://")
            .map(|r| format!("wss://{r}"))
            .or_else(|| h.strip_prefix("http://").map(|r| format!("ws://{r}")))?;
        Some(if rest.ends_with('/') {
            rest
        } else {
            format!("{rest}/")
        })
    }
}

#[derive(Debug, Default)]
struct ViewState {
    me: String,
    region: String,
    nodes: Vec<NodeLoad>,
    refreshed: Option<Instant>,
}

/// The shared snapshot of the fleet's nodes (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct FleetView(Arc<RwLock<ViewState>>);

impl FleetView {
    /// A snapshot older than this is not trusted (Redis unreachable).
    pub const STALE: Duration = Duration::from_secs(5);

    /// An empty view for node `me` in `region`.
    pub fn new(me: &str, region: &str) -> FleetView {
        FleetView(Arc::new(RwLock::new(ViewState {
            me: me.to_owned(),
            region: region.to_owned(),
            nodes: Vec::new(),
            refreshed: None,
        })))
    }

    /// This node's name.
    pub fn me(&self) -> String {
        self.read(|s| s.me.clone())
    }

    fn read<T>(&self, f: impl FnOnce(&ViewState) -> T) -> T {
        f(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the snapshot with the live nodes read at `now` (this node included).
    pub fn update(&self, nodes: Vec<NodeLoad>, now: Instant) {
        let mut s = self.0.write().unwrap_or_else(|p| p.into_inner());
        s.nodes = nodes;
        s.refreshed = Some(now);
    }

    /// Forgets the snapshot (Redis unreachable): choices fall back to this node.
    pub fn clear(&self) {
        let mut s = self.0.write().unwrap_or_else(|p| p.into_inner());
        s.nodes.clear();
        s.refreshed = None;
    }

    /// The nodes of a fresh snapshot (empty when stale).
    pub fn nodes(&self, now: Instant) -> Vec<NodeLoad> {
        self.read(|s| match s.refreshed {
            Some(t) if now.saturating_duration_since(t) <= Self::STALE => s.nodes.clone(),
            _ => Vec::new(),
        })
    }

    /// The least loaded healthy, non-draining node for a client in `region` (this node's
    /// region when `None` or empty), preferring that region; `others_only` leaves this node
    /// out, `accept` filters further. `None`: no fresh snapshot or no candidate.
    pub fn pick(
        &self,
        region: Option<&str>,
        others_only: bool,
        now: Instant,
        accept: impl Fn(&NodeLoad) -> bool,
    ) -> Option<NodeLoad> {
        let (me, own_region) = self.read(|s| (s.me.clone(), s.region.clone()));
        let region = region.filter(|r| !r.is_empty()).unwrap_or(&own_region);
        self.nodes(now)
            .into_iter()
            .filter(|n| !n.draining && (!others_only || n.node != me) && accept(n))
            .min_by(|a, b| {
                (a.region != region, a.score(), a.node != me, &a.node).cmp(&(
                    b.region != region,
                    b.score(),
                    b.node != me,
                    &b.node,
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(name: &str, region: &str, allocations: u32) -> NodeLoad {
        NodeLoad {
            node: name.into(),
            region: region.into(),
            allocations,
            turn_urls: vec![format!("turn:{name}:3478")],
            ..NodeLoad::default()
        }
    }

    #[test]
    fn least_loaded_in_region_never_draining_and_stale_is_empty() {
        let v = FleetView::new("a", "eu");
        let t = Instant::now();
        assert!(v.pick(None, false, t, |_| true).is_none(), "no snapshot");
        let mut c = node("c", "eu", 1);
        v.update(vec![node("a", "eu", 5), node("b", "us", 0), c.clone()], t);
        assert_eq!(v.pick(None, false, t, |_| true).unwrap().node, "c");
        assert_eq!(v.pick(Some("us"), false, t, |_| true).unwrap().node, "b");
        assert_eq!(v.pick(Some("ap"), false, t, |_| true).unwrap().node, "b");
        c.draining = true;
        v.update(vec![node("a", "eu", 5), node("b", "us", 0), c], t);
        assert_eq!(v.pick(None, false, t, |_| true).unwrap().node, "a");
        assert_eq!(v.pick(None, true, t, |_| true).unwrap().node, "b");
        assert!(v
            .pick(None, false, t + FleetView::STALE * 2, |_| true)
            .is_none());
        let ws = NodeLoad {
            public_http: Some("https://eu1.example.org".into()),
            ..NodeLoad::default()
        };
        assert_eq!(ws.ws_url().unwrap(), "wss://eu1.example.org/");
    }
}
