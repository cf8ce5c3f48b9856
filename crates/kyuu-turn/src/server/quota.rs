//! Allocation quotas ([RFC 8656 §7.2] step 10: 486 Allocation Quota Reached): total, per user and
//! per client IP, counted across all shards.
//!
//! [RFC 8656 §7.2]: https://www.rfc-editor.org/rfc/rfc8656#section-7.2

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::config::TurnConfig;

/// Which quota refused an allocation; a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QuotaExceeded {
    #[error("total allocation quota reached")]
    Total,
    #[error("per-user allocation quota reached")]
    User,
    #[error("per-client allocation quota reached")]
    Client,
    #[error("quota table unavailable")]
    Internal,
}

impl QuotaExceeded {
    pub fn label(self) -> &'static str {
        match self {
            QuotaExceeded::Total => "total",
            QuotaExceeded::User => "user",
            QuotaExceeded::Client => "client",
            QuotaExceeded::Internal => "internal",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_user: HashMap<String, u32>,
    per_ip: HashMap<IpAddr, u32>,
    /// Fleet mode: each user's allocations on the other nodes, as the shell last read them
    /// from Redis (empty when alone or when Redis is unreachable: the local quota then).
    remote_users: HashMap<String, u32>,
    /// Bumped whenever `per_user` changes, so the shell publishes only when needed.
    generation: u64,
}

/// The counters, shared by all shards (touched only when allocations come and go).
#[derive(Debug, Default)]
pub(crate) struct Quotas(Mutex<Counts>);

impl Quotas {
    pub fn total(&self) -> u32 {
        self.0.lock().map(|q| q.total).unwrap_or(0)
    }

    /// Counts one more allocation for `username` from `ip`, unless a quota of `cfg` is full.
    pub fn take(&self, cfg: &TurnConfig, username: &str, ip: IpAddr) -> Result<(), QuotaExceeded> {
        let Ok(mut q) = self.0.lock() else {
            return Err(QuotaExceeded::Internal);
        };
        if cfg.total_quota > 0 && q.total >= cfg.total_quota {
            return Err(QuotaExceeded::Total);
        }
        let here = q.per_user.get(username).copied().unwrap_or(0);
        let elsewhere = q.remote_users.get(username).copied().unwrap_or(0);
        if cfg.user_quota > 0 && here.saturating_add(elsewhere) >= cfg.user_quota {
            return Err(QuotaExceeded::User);
        }
        if cfg.client_quota > 0 && q.per_ip.get(&ip).copied().unwrap_or(0) >= cfg.client_quota {
            return Err(QuotaExceeded::Client);
        }
        q.total += 1;
        q.generation += 1;
        *q.per_user.entry(username.to_owned()).or_insert(0) += 1;
        *q.per_ip.entry(ip).or_insert(0) += 1;
        Ok(())
    }

    /// Each user's live allocations here, and the generation they were read at.
    pub fn users(&self) -> (u64, Vec<(String, u32)>) {
        let Ok(q) = self.0.lock() else {
            return (0, Vec::new());
        };
        let users = q.per_user.iter().map(|(u, n)| (u.clone(), *n)).collect();
        (q.generation, users)
    }

    /// The generation of the per-user counts (changes whenever they do).
    pub fn generation(&self) -> u64 {
        self.0.lock().map(|q| q.generation).unwrap_or(0)
    }

    /// Replaces the other nodes' per-user counts (empty: count only this node).
    pub fn set_remote_users(&self, remote: HashMap<String, u32>) {
        if let Ok(mut q) = self.0.lock() {
            q.remote_users = remote;
        }
    }

    pub fn release(&self, username: &str, ip: IpAddr) {
        let Ok(mut q) = self.0.lock() else {
            return;
        };
        q.total = q.total.saturating_sub(1);
        q.generation += 1;
        if let Some(n) = q.per_user.get_mut(username) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                q.per_user.remove(username);
            }
        }
        if let Some(n) = q.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                q.per_ip.remove(&ip);
            }
        }
    }
}
