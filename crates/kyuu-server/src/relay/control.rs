//! Operator commands for the relay shards. Each shard owns its `kyuu_turn::Server`, so a command
//! travels to the shard as a message on its control channel and the answer comes back on a
//! oneshot channel: the relay path never takes a lock for the admin API.

use std::net::SocketAddr;
use std::sync::Arc;

use kyuu_turn::{AllocId, AllocationInfo, ClientSocket, NotApplied, Shared, TurnConfig};
use tokio::sync::{mpsc, oneshot};

/// A command for one shard.
#[derive(Debug)]
pub(crate) enum ShardCmd {
    /// Snapshot of the shard's allocations.
    Allocations(oneshot::Sender<Vec<AllocationInfo>>),
    /// End one allocation.
    Kill {
        id: AllocId,
        reply: oneshot::Sender<bool>,
    },
    /// Apply a new (already validated) `[turn]` section.
    Reconfigure {
        turn: Box<TurnConfig>,
        reply: oneshot::Sender<Result<NotApplied, String>>,
    },
    /// Refuse new allocations from now on.
    Drain { alternate: Option<SocketAddr> },
    /// RAWR paired the allocations made with these usernames (`docs/rawr.md` §6.1).
    Pair {
        usernames: [String; 2],
        lifetime: std::time::Duration,
        limits: kyuu_turn::SessionLimits,
        /// Told the username of an allocation cut by `limits`.
        ended: Option<mpsc::UnboundedSender<String>>,
        /// Link the allocations in-process (else only hold them to `limits`).
        link: bool,
    },
    /// Link allocation `alloc` of this shard with `other` on shard `shard` (RAWR pair across
    /// shards).
    LinkRemote {
        alloc: AllocId,
        shard: u16,
        other: AllocId,
        other_addr: [Option<SocketAddr>; 2],
    },
    /// Allocation `gone` on another shard, linked with `alloc` here, went away.
    Unlink { alloc: AllocId, gone: AllocId },
    /// Refuse new allocations, sending clients to the alternate of their family.
    DrainTo { alternates: Vec<SocketAddr> },
    /// Serve STUN/TURN on a stream accepted elsewhere (TURN over TLS on the HTTPS port).
    Stream {
        stream: AdoptedStream,
        client: ClientSocket,
    },
}

/// A client byte stream (already past TLS) handed to the relay.
pub type AdoptedStream = Box<dyn AdoptableStream>;

/// What [`RelayControl::adopt_stream`] takes: any byte stream that can move to a shard thread.
pub trait AdoptableStream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> AdoptableStream
    for T
{
}

impl std::fmt::Debug for dyn AdoptableStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdoptedStream")
    }
}

/// One allocation and the shard that holds it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardAllocation {
    /// `"<shard>-<slot>-<generation>"`: what `kill` takes.
    pub id: String,
    pub shard: usize,
    #[serde(flatten)]
    pub info: AllocationInfo,
}

/// A cloneable handle that sends commands to every shard.
#[derive(Debug, Clone)]
pub struct RelayControl {
    pub(crate) shards: Vec<mpsc::UnboundedSender<ShardCmd>>,
    pub(crate) shared: Arc<Shared>,
    /// The kernel fast path, when it answers STUN Binding: a reload hands it the new limit.
    /// Weak: the shards own it, and it detaches when they stop.
    pub(crate) binding: Option<std::sync::Weak<std::sync::Mutex<kyuu_ebpf::FastPath>>>,
}

/// Parses an allocation id made by [`RelayControl::allocations`].
pub fn parse_alloc_id(s: &str) -> Option<(usize, AllocId)> {
    let mut it = s.split('-');
    let shard = it.next()?.parse().ok()?;
    let slot = it.next()?.parse().ok()?;
    let generation = it.next()?.parse().ok()?;
    it.next()
        .is_none()
        .then_some((shard, AllocId { slot, generation }))
}

impl RelayControl {
    /// Live allocations across shards.
    pub fn allocation_count(&self) -> u32 {
        self.shared.allocations()
    }

    /// Every allocation of every shard (a shard that has stopped contributes none).
    pub async fn allocations(&self) -> Vec<ShardAllocation> {
        let mut out = Vec::new();
        for (shard, tx) in self.shards.iter().enumerate() {
            let (reply, rx) = oneshot::channel();
            if tx.send(ShardCmd::Allocations(reply)).is_err() {
                continue;
            }
            for info in rx.await.unwrap_or_default() {
                out.push(ShardAllocation {
                    id: format!("{shard}-{}-{}", info.id.slot, info.id.generation),
                    shard,
                    info,
                });
            }
        }
        out
    }

    /// Ends the allocation `id` (as listed by [`RelayControl::allocations`]); false when there
    /// is no such allocation.
    pub async fn kill(&self, id: &str) -> bool {
        let Some((shard, id)) = parse_alloc_id(id) else {
            return false;
        };
        let Some(tx) = self.shards.get(shard) else {
            return false;
        };
        let (reply, rx) = oneshot::channel();
        if tx.send(ShardCmd::Kill { id, reply }).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Validates `turn`, then applies it on every shard. Nothing changes when it is invalid.
    pub async fn reconfigure(&self, turn: &TurnConfig) -> Result<NotApplied, String> {
        turn.validate().map_err(|e| e.to_string())?;
        let mut not_applied = NotApplied::default();
        for tx in &self.shards {
            let (reply, rx) = oneshot::channel();
            let cmd = ShardCmd::Reconfigure {
                turn: Box::new(turn.clone()),
                reply,
            };
            if tx.send(cmd).is_err() {
                continue;
            }
            if let Ok(r) = rx.await {
                not_applied = r?;
            }
        }
        if let Some(fp) = self.binding.as_ref().and_then(std::sync::Weak::upgrade) {
            // The kernel answers plain Binding requests under its own copy of the limit.
            let result = match fp.lock() {
                Ok(mut k) => {
                    k.set_binding_limits(&turn.software, turn.unauth_rate, turn.unauth_burst)
                }
                Err(_) => Ok(false),
            };
            if let Err(e) = result {
                tracing::warn!(target: "kyuu::relay", "fast path: the reloaded STUN Binding limit did not reach the kernel: {e}");
                not_applied.0.push("turn.unauth_rate (kernel STUN Binding)");
            }
        }
        Ok(not_applied)
    }

    /// Serves STUN/TURN on `stream` as if it had arrived on a TURN listener (stream clients all
    /// live on the first shard, like the TCP/TLS listeners). False when the relay has stopped.
    pub fn adopt_stream(&self, stream: AdoptedStream, client: ClientSocket) -> bool {
        self.shards
            .first()
            .is_some_and(|tx| tx.send(ShardCmd::Stream { stream, client }).is_ok())
    }

    /// Tells every shard that the allocations made with `usernames` belong together (RAWR
    /// pairing); they are linked in-process, on one shard or across two (the shards then hand
    /// each other the pair's packets over a bounded channel).
    /// Each side is held to `limits` (bytes, time) on whichever shard it is; `ended` hears the
    /// username of a side cut by them.
    pub fn pair(
        &self,
        usernames: [String; 2],
        lifetime: std::time::Duration,
        limits: kyuu_turn::SessionLimits,
        ended: Option<mpsc::UnboundedSender<String>>,
        link: bool,
    ) {
        for tx in &self.shards {
            let _ = tx.send(ShardCmd::Pair {
                usernames: usernames.clone(),
                lifetime,
                limits,
                ended: ended.clone(),
                link,
            });
        }
    }

    /// Every shard refuses new allocations from now on, answering 300 with the address of
    /// `alternates` of the client's family (other fleet nodes), or 486 without one.
    pub fn drain_to(&self, alternates: &[SocketAddr]) {
        for tx in &self.shards {
            let _ = tx.send(ShardCmd::DrainTo {
                alternates: alternates.to_vec(),
            });
        }
    }

    /// Every shard refuses new allocations from now on.
    pub fn drain(&self, alternate: Option<SocketAddr>) {
        for tx in &self.shards {
            let _ = tx.send(ShardCmd::Drain { alternate });
        }
    }
}
