//! systemd readiness notifications (`sd_notify(3)`): a datagram to the unix socket named by
//! `NOTIFY_SOCKET`, as `Type=notify` units expect. Without the variable nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1"`); returns whether a notification socket received it.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket name (Linux).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// `RELOADING=1` with the monotonic time systemd wants beside it (`Type=notify-reload`
/// requires it; plain `notify` accepts it).
pub fn reloading() -> bool {
    let usec = monotonic_usec();
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
}

fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec.max(0) as u64) * 1_000_000 + (t.tv_nsec.max(0) as u64) / 1000
}
