//! The process-wide Prometheus recorder behind `/metrics`.
//!
//! `metrics` has one global recorder per process, so [`install`] installs it once and hands out
//! the same handle afterwards (tests start several servers in one process).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder (first call) and returns its handle. `None` when another recorder was
/// installed by someone else first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => {
                describe();
                Some(handle)
            }
            Err(e) => {
                tracing::warn!("metrics disabled: {e}");
                None
            }
        })
        .clone()
}

/// Histograms need periodic upkeep when no exporter thread does it; call from a tokio task.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    metrics::describe_gauge!("kyuu_up", "1 while the server runs");
    metrics::describe_gauge!(
        "kyuu_start_time_seconds",
        metrics::Unit::Seconds,
        "Unix time the server started"
    );
    metrics::describe_counter!(
        "kyuu_http_requests_total",
        "HTTP requests served by kyuu's own routes"
    );
}
