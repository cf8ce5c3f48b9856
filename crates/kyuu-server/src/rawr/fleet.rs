//! RAWR across a fleet of root nodes (`docs/rawr.md` §4.7): which node holds a session.
//!
//! The first fleet node that sees a root request of a session (Exchange, or a Connect naming
//! it as ROOT) claims the session in Redis (`SET kyuu:rawr:s:<sha256> <its address> NX PX ttl`);
//! a node that finds another node's claim forwards the session's root requests there (the node
//! shell does that, with [`kyuu_rawr::node::Node::fleet_forward`]). Every answer is cached in
//! the process for the claim's lifetime, so a session's requests hit Redis once per node, and
//! Redis going away mid-session loses nothing: a node keeps its cached owners and its own state.
//!
//! Redis unreachable (or slower than [`LOOKUP_TIMEOUT`]): the node keeps the session itself
//! (per-node behaviour, as without a fleet) and does not ask Redis again for [`BACKOFF`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;

/// How long a claim lives in Redis (and in each node's cache): longer than a peer's whole
/// algorithm (30 s) plus the Exchange linger (30 s).
pub const CLAIM_TTL: Duration = Duration::from_secs(90);
/// The most a root request waits for Redis before the node keeps the session itself.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_millis(300);
/// After a failure, Redis is not asked again for this long.
pub const BACKOFF: Duration = Duration::from_secs(2);

/// Who holds a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This node (it won the claim, or Redis is unreachable).
    Me,
    /// Another fleet node, reached at this address (its STUN/TURN port).
    Other(SocketAddr),
}

/// The Redis side of a fleet root node.
pub struct RawrFleet {
    client: redis::Client,
    /// This node's address as the others reach it (one of its `self` addresses).
    me: SocketAddr,
    conn: Mutex<Option<ConnectionManager>>,
    down_until: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RawrFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawrFleet")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl RawrFleet {
    /// A fleet client for `redis_url`; `me` is what other nodes forward to.
    pub fn new(redis_url: &str, me: SocketAddr) -> Result<Arc<RawrFleet>, String> {
        let client = redis::Client::open(redis_url).map_err(|e| format!("fleet.redis_url: {e}"))?;
        Ok(Arc::new(RawrFleet {
            client,
            me,
            conn: Mutex::new(None),
            down_until: std::sync::Mutex::new(None),
        }))
    }

    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// Who holds `session`: claims it for this node when `claim` and nobody holds it. Never
    /// fails: Redis trouble answers [`Owner::Me`].
    pub async fn owner(&self, session: &[u8], claim: bool) -> Owner {
        if self
            .down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| Instant::now() < t)
        {
            return Owner::Me;
        }
        let key = kyuu_rawr::cred::fleet_key(session);
        match tokio::time::timeout(LOOKUP_TIMEOUT, self.ask(&key, claim)).await {
            Ok(Ok(v)) => {
                metrics::gauge!("kyuu_rawr_fleet_degraded").set(0.0);
                match v.and_then(|s| s.parse::<SocketAddr>().ok()) {
                    Some(a) if a != self.me => Owner::Other(a),
                    _ => Owner::Me,
                }
            }
            Ok(Err(e)) => self.fail(&e.to_string()).await,
            Err(_) => self.fail("timed out").await,
        }
    }

    async fn fail(&self, why: &str) -> Owner {
        let mut d = self
            .down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.is_none() {
            tracing::warn!(
                "rawr fleet: Redis unreachable ({why}): sessions stay on the node that sees them"
            );
        }
        *d = Some(Instant::now() + BACKOFF);
        drop(d);
        metrics::gauge!("kyuu_rawr_fleet_degraded").set(1.0);
        // Drop the connection so the next try reconnects from scratch.
        if let Ok(mut c) = self.conn.try_lock() {
            *c = None;
        }
        Owner::Me
    }

    /// `SET key me NX PX ttl GET` (Redis >= 7.0): nil when this node now holds the claim, else
    /// the holder. Without `claim`, `GET key`.
    async fn ask(&self, key: &str, claim: bool) -> redis::RedisResult<Option<String>> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let c = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(LOOKUP_TIMEOUT)
                .set_response_timeout(LOOKUP_TIMEOUT)
                .set_number_of_retries(0);
            *guard = Some(ConnectionManager::new_with_config(self.client.clone(), c).await?);
        }
        let Some(c) = guard.as_mut() else {
            return Ok(None);
        };
        if claim {
            redis::cmd("SET")
                .arg(key)
                .arg(self.me.to_string())
                .arg("NX")
                .arg("PX")
                .arg(CLAIM_TTL.as_millis() as u64)
                .arg("GET")
                .query_async(c)
                .await
        } else {
            redis::cmd("GET").arg(key).query_async(c).await
        }
    }
}
