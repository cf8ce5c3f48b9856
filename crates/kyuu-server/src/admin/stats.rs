//! What `/status` draws: a sample every [`INTERVAL`] of the relay's totals (read from the same
//! Prometheus registry `/metrics` renders, so both always agree), kept for [`HISTORY`] samples,
//! plus the current top users and refusals.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::relay::RelayControl;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Samples kept: ten minutes.
pub const HISTORY: usize = 300;

/// One point of the charts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// Unix time, milliseconds.
    pub t_ms: u64,
    pub allocations: u64,
    /// `kyuu_turn_relayed_bytes_total`, both directions.
    pub relayed_bytes: u64,
    /// `kyuu_turn_relayed_packets_total`, both directions.
    pub relayed_packets: u64,
    pub signaling_connections: u64,
}

/// One user's share of the relayed traffic of live allocations.
#[derive(Debug, Clone, Serialize)]
pub struct TopUser {
    pub user: String,
    pub allocations: u64,
    pub bytes: u64,
    /// Bytes per second over the last sample interval.
    pub bytes_per_sec: f64,
}

/// The `/admin/v1/stats` body.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub now: Sample,
    pub interval_secs: u64,
    pub history: Vec<Sample>,
    pub top_users: Vec<TopUser>,
    /// Refusals and drops by `metric:reason` (quota refusals, auth failures, dropped input,
    /// refused signaling handshakes).
    pub refusals: BTreeMap<String, u64>,
    /// Whether the numbers come from the Prometheus registry (`http.metrics = true`).
    pub metrics: bool,
}

#[derive(Debug, Default)]
struct Inner {
    history: VecDeque<Sample>,
    last_user_bytes: HashMap<String, u64>,
    last_at_ms: u64,
    top: Vec<TopUser>,
}

/// Samples in the background; [`Sampler::snapshot`] for the page.
pub(crate) struct Sampler {
    metrics: Option<PrometheusHandle>,
    relay: Option<RelayControl>,
    signal: Option<kyuu_signal::SignalAdmin>,
    inner: Mutex<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sums every series of `name` in a Prometheus text rendering.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    metric_by_label(text, name, None).values().sum()
}

/// Values of `name` grouped by the value of `label` (all series under `""` when `None`).
pub fn metric_by_label(text: &str, name: &str, label: Option<&str>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.chars().next() {
            Some('{') => match rest.rsplit_once('}') {
                Some((l, v)) => (l.get(1..).unwrap_or(""), v),
                None => continue,
            },
            Some(' ') => ("", rest),
            _ => continue,
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let key = label
            .and_then(|want| {
                labels.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == want).then(|| v.trim_matches('"').to_owned())
                })
            })
            .unwrap_or_default();
        *out.entry(key).or_insert(0) += v.max(0.0) as u64;
    }
    out
}

impl Sampler {
    pub(crate) fn new(
        metrics: Option<PrometheusHandle>,
        relay: Option<RelayControl>,
        signal: Option<kyuu_signal::SignalAdmin>,
    ) -> Self {
        Sampler {
            metrics,
            relay,
            signal,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn current(&self, text: &str) -> Sample {
        Sample {
            t_ms: now_ms(),
            allocations: self
                .relay
                .as_ref()
                .map_or(0, |r| u64::from(r.allocation_count())),
            relayed_bytes: metric_sum(text, "kyuu_turn_relayed_bytes_total"),
            relayed_packets: metric_sum(text, "kyuu_turn_relayed_packets_total"),
            signaling_connections: self
                .signal
                .as_ref()
                .map_or(0, |s| s.connections().len() as u64),
        }
    }

    fn render(&self) -> String {
        self.metrics
            .as_ref()
            .map(|m| m.render())
            .unwrap_or_default()
    }

    /// Takes one sample (called every [`INTERVAL`]).
    pub(crate) async fn tick(&self) {
        let sample = self.current(&self.render());
        let mut per_user: HashMap<String, (u64, u64)> = HashMap::new();
        if let Some(r) = &self.relay {
            for a in r.allocations().await {
                let e = per_user.entry(a.info.username.clone()).or_default();
                e.0 += 1;
                e.1 += a.info.to_peer_bytes + a.info.to_client_bytes;
            }
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let dt = sample.t_ms.saturating_sub(inner.last_at_ms).max(1) as f64 / 1000.0;
        let mut top: Vec<TopUser> = per_user
            .iter()
            .map(|(user, (n, bytes))| {
                let before = inner.last_user_bytes.get(user).copied().unwrap_or(*bytes);
                TopUser {
                    user: user.clone(),
                    allocations: *n,
                    bytes: *bytes,
                    bytes_per_sec: bytes.saturating_sub(before) as f64 / dt,
                }
            })
            .collect();
        top.sort_by(|a, b| {
            b.bytes_per_sec
                .total_cmp(&a.bytes_per_sec)
                .then(b.bytes.cmp(&a.bytes))
        });
        top.truncate(10);
        inner.top = top;
        inner.last_user_bytes = per_user.into_iter().map(|(u, (_, b))| (u, b)).collect();
        inner.last_at_ms = sample.t_ms;
        if inner.history.len() >= HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(sample);
    }

    pub(crate) async fn snapshot(&self) -> Snapshot {
        let text = self.render();
        let now = self.current(&text);
        let mut refusals = BTreeMap::new();
        for (metric, label, prefix) in [
            ("kyuu_turn_quota_refusals_total", "quota", "quota"),
            ("kyuu_turn_auth_failures_total", "reason", "auth"),
            ("kyuu_turn_dropped_total", "reason", "dropped"),
            ("kyuu_signal_refused_total", "status", "signaling"),
        ] {
            for (k, v) in metric_by_label(&text, metric, Some(label)) {
                refusals.insert(format!("{prefix}:{k}"), v);
            }
        }
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Snapshot {
            now,
            interval_secs: INTERVAL.as_secs(),
            history: inner.history.iter().copied().collect(),
            top_users: inner.top.clone(),
            refusals,
            metrics: self.metrics.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_prometheus_series() {
        let text = "# TYPE kyuu_turn_relayed_bytes_total counter\n\
            kyuu_turn_relayed_bytes_total{direction=\"to_peer\",transport=\"udp\"} 100\n\
            kyuu_turn_relayed_bytes_total{direction=\"to_client\",transport=\"udp\"} 23\n\
            kyuu_turn_relayed_bytes_totally 5\n\
            kyuu_up 1\n";
        assert_eq!(metric_sum(text, "kyuu_turn_relayed_bytes_total"), 123);
        assert_eq!(metric_sum(text, "kyuu_up"), 1);
        let by = metric_by_label(text, "kyuu_turn_relayed_bytes_total", Some("direction"));
        assert_eq!(by.get("to_client"), Some(&23));
    }
}
