//! `kyuu admin …`: a client of the admin API (`docs/admin-openapi.json`). Human tables by
//! default, the API's JSON with `--json`.
//!
//! The admin API is plain HTTP on a loopback or private listener, so a minimal blocking
//! HTTP/1.1 client is enough here; `https://` URLs are refused with a message.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Options of `kyuu admin`.
#[derive(Debug, Args)]
#[command(
    after_help = "The server must enable the admin API: [admin] listen = \"127.0.0.1:8081\"
(no token needed on loopback) and/or [admin] token = \"...\".

Examples:
  kyuu admin sessions
  kyuu admin sessions --signaling --json
  kyuu admin kill 0-3-1
  kyuu admin kill --signaling alice
  kyuu admin credentials --user alice --ttl 1h
  kyuu admin credentials --check 1767225600:alice 'c2VjcmV0...'
  kyuu admin loglevel debug,kyuu_turn=trace
  kyuu admin reload
  kyuu admin drain --deadline 10m --alternate 203.0.113.20:3478
  kyuu admin --url http://10.0.0.5:8081 --token \"$KYUU_ADMIN_TOKEN\" sessions

Exit status: 0 done; 1 the server refused or could not be reached; 2 bad arguments."
)]
pub struct AdminArgs {
    /// Admin API base URL.
    #[arg(
        long,
        global = true,
        env = "KYUU_ADMIN_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub url: String,
    /// Bearer token (admin.token).
    #[arg(long, global = true, env = "KYUU_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List TURN allocations (user, client, transport, relayed address, peers, traffic, age).
    Sessions {
        /// List signaling connections and rooms instead.
        #[arg(long)]
        signaling: bool,
    },
    /// End a TURN allocation by id (from `sessions`), or a signaling connection by client id.
    Kill {
        /// Allocation id, or client id with --signaling.
        id: String,
        #[arg(long)]
        signaling: bool,
    },
    /// Mint TURN REST credentials, or check a username and password with --check.
    Credentials {
        /// User part of the REST username.
        #[arg(long, default_value = "admin")]
        user: String,
        /// Lifetime (e.g. 1h, 30m, 3600); default http.credential_ttl_secs.
        #[arg(long, value_parser = parse_secs)]
        ttl: Option<u64>,
        /// Check USERNAME PASSWORD instead of minting.
        #[arg(long, num_args = 2, value_names = ["USERNAME", "PASSWORD"])]
        check: Option<Vec<String>>,
    },
    /// Show the log filter, or set it (tracing directives such as `debug` or `info,kyuu_turn=debug`).
    Loglevel { level: Option<String> },
    /// Re-read the configuration file and apply what can change live.
    Reload,
    /// Stop new allocations; the server exits when the last ends or at the deadline.
    Drain {
        /// Longest wait before exiting anyway (e.g. 10m, 3600).
        #[arg(long, value_parser = parse_secs)]
        deadline: Option<u64>,
        /// Send new clients here (300 Try Alternate) instead of refusing them with 486.
        #[arg(long, value_name = "IP:PORT")]
        alternate: Option<std::net::SocketAddr>,
        /// Only show whether a drain is under way.
        #[arg(long)]
        status: bool,
    },
}

/// `90`, `90s`, `10m`, `2h`.
fn parse_secs(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 90, 90s, 10m, 2h)");
    let (n, mul) = match s.trim() {
        t if t.ends_with('h') => (t.trim_end_matches('h'), 3600),
        t if t.ends_with('m') => (t.trim_end_matches('m'), 60),
        t if t.ends_with('s') => (t.trim_end_matches('s'), 1),
        t => (t, 1),
    };
    let v: u64 = n.trim().parse().map_err(|_| bad())?;
    v.checked_mul(mul).filter(|v| *v > 0).ok_or_else(bad)
}

pub fn run(args: AdminArgs) -> ExitCode {
    match run_inner(&args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(a: &AdminArgs) -> Result<String, String> {
    let c = Client::new(&a.url, a.token.clone())?;
    let (v, table): (Value, fn(&Value) -> String) = match &a.command {
        AdminCommand::Sessions { signaling: false } => (
            c.call("GET", "/admin/v1/allocations", None)?,
            sessions_table,
        ),
        AdminCommand::Sessions { signaling: true } => {
            (c.call("GET", "/admin/v1/signaling", None)?, signaling_table)
        }
        AdminCommand::Kill { id, signaling } => {
            let kind = if *signaling {
                "signaling"
            } else {
                "allocations"
            };
            let path = format!("/admin/v1/{kind}/{}", encode_path(id));
            (c.call("DELETE", &path, None)?, |v| {
                format!("killed {}\n", v["id"].as_str().unwrap_or("?"))
            })
        }
        AdminCommand::Credentials {
            check: Some(up), ..
        } => {
            let (Some(u), Some(p)) = (up.first(), up.get(1)) else {
                return Err("--check needs USERNAME PASSWORD".into());
            };
            let body = json!({ "username": u, "password": p });
            (
                c.call("POST", "/admin/v1/credentials/check", Some(body))?,
                check_text,
            )
        }
        AdminCommand::Credentials { user, ttl, .. } => {
            let mut body = json!({ "user": user });
            if let Some(t) = ttl {
                body["ttl_secs"] = json!(t);
            }
            (
                c.call("POST", "/admin/v1/credentials", Some(body))?,
                credentials_text,
            )
        }
        AdminCommand::Loglevel { level: None } => {
            (c.call("GET", "/admin/v1/loglevel", None)?, level_text)
        }
        AdminCommand::Loglevel { level: Some(l) } => (
            c.call("PUT", "/admin/v1/loglevel", Some(json!({ "level": l })))?,
            level_text,
        ),
        AdminCommand::Reload => (c.call("POST", "/admin/v1/reload", None)?, reload_text),
        AdminCommand::Drain { status: true, .. } => {
            (c.call("GET", "/admin/v1/drain", None)?, drain_text)
        }
        AdminCommand::Drain {
            deadline,
            alternate,
            ..
        } => {
            let mut body = json!({});
            if let Some(d) = deadline {
                body["deadline_secs"] = json!(d);
            }
            if let Some(alt) = alternate {
                body["alternate"] = json!(alt.to_string());
            }
            (c.call("POST", "/admin/v1/drain", Some(body))?, drain_text)
        }
    };
    if a.json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        ));
    }
    Ok(table(&v))
}

fn encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Column-aligned text; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                s.push_str(&c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn sessions_table(v: &Value) -> String {
    let empty = Vec::new();
    let list = v["allocations"].as_array().unwrap_or(&empty);
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            let n = |k: &str| a[k].as_u64().unwrap_or(0);
            let peers = strs(&a["permissions"]);
            vec![
                a["id"].as_str().unwrap_or("?").to_owned(),
                a["username"].as_str().unwrap_or("").to_owned(),
                a["client"].as_str().unwrap_or("").to_owned(),
                format!(
                    "{}/{}",
                    a["transport"].as_str().unwrap_or("?"),
                    a["relay_transport"].as_str().unwrap_or("?")
                ),
                strs(&a["relayed"]).join(","),
                if peers.is_empty() {
                    "-".into()
                } else {
                    peers.join(",")
                },
                format!(
                    "{} / {}",
                    human_bytes(n("to_peer_bytes")),
                    n("to_peer_packets")
                ),
                format!(
                    "{} / {}",
                    human_bytes(n("to_client_bytes")),
                    n("to_client_packets")
                ),
                human_age(n("age_secs")),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "ID",
            "USER",
            "CLIENT",
            "TRANSPORT",
            "RELAYED",
            "PEERS",
            "TO PEER (bytes/pkts)",
            "TO CLIENT (bytes/pkts)",
            "AGE",
        ],
        &rows,
    );
    out.push_str(&format!("{} allocation(s)\n", rows.len()));
    out
}

fn signaling_table(v: &Value) -> String {
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = v["connections"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|c| {
            vec![
                c["id"].as_str().unwrap_or("?").to_owned(),
                c["ip"].as_str().unwrap_or("").to_owned(),
                if c["v2"].as_bool().unwrap_or(false) {
                    "v2".into()
                } else {
                    "legacy".into()
                },
                strs(&c["rooms"]).join(","),
            ]
        })
        .collect();
    let mut out = table(&["ID", "IP", "PROTOCOL", "ROOMS"], &rows);
    out.push_str(&format!("{} connection(s)\n", rows.len()));
    let rooms: Vec<Vec<String>> = v["rooms"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|r| {
            vec![
                r["name"].as_str().unwrap_or("?").to_owned(),
                strs(&r["members"]).join(","),
            ]
        })
        .collect();
    if !rooms.is_empty() {
        out.push('\n');
        out.push_str(&table(&["ROOM", "MEMBERS"], &rooms));
    }
    out
}

fn credentials_text(v: &Value) -> String {
    format!(
        "username  {}\npassword  {}\nexpires   in {} (unix {})\nuris      {}\n",
        v["username"].as_str().unwrap_or(""),
        v["password"].as_str().unwrap_or(""),
        human_age(v["ttl_secs"].as_u64().unwrap_or(0)),
        v["expires_at"].as_u64().unwrap_or(0),
        strs(&v["uris"]).join(" ")
    )
}

fn check_text(v: &Value) -> String {
    if v["valid"].as_bool().unwrap_or(false) {
        let exp = v["expires_at"]
            .as_u64()
            .map(|e| format!(", expires at unix {e}"))
            .unwrap_or_default();
        format!("valid ({}{exp})\n", v["kind"].as_str().unwrap_or("?"))
    } else {
        format!("invalid: {}\n", v["reason"].as_str().unwrap_or("?"))
    }
}

fn level_text(v: &Value) -> String {
    format!("log level: {}\n", v["level"].as_str().unwrap_or("?"))
}

fn reload_text(v: &Value) -> String {
    let list = |k: &str| {
        let l = strs(&v[k]);
        if l.is_empty() {
            "none".to_owned()
        } else {
            l.join(", ")
        }
    };
    format!(
        "configuration reloaded\n  applied         {}\n  restart needed  {}\n",
        list("applied"),
        list("restart_needed")
    )
}

fn drain_text(v: &Value) -> String {
    if !v["draining"].as_bool().unwrap_or(false) {
        return format!(
            "not draining; {} allocation(s)\n",
            v["allocations"].as_u64().unwrap_or(0)
        );
    }
    format!(
        "draining: {} allocation(s) left; the server exits when none are left or in {}\n",
        v["allocations"].as_u64().unwrap_or(0),
        human_age(v["deadline_in_secs"].as_u64().unwrap_or(0))
    )
}

/// A minimal HTTP/1.1 client for the admin API.
struct Client {
    host: String,
    port: u16,
    prefix: String,
    token: Option<String>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    fn new(url: &str, token: Option<String>) -> Result<Client, String> {
        if url.starts_with("https://") {
            return Err(format!(
                "--url {url}: https is not supported by `kyuu admin`; reach the admin listener \
                 over http (e.g. through an SSH tunnel)"
            ));
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--url {url:?}: expected http://HOST:PORT"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.to_owned(),
                p.parse()
                    .map_err(|_| format!("--url {url:?}: bad port {p:?}"))?,
            ),
            _ => (authority.to_owned(), 80),
        };
        Ok(Client {
            host,
            port,
            prefix: format!("/{}", path.trim_end_matches('/'))
                .trim_end_matches('/')
                .to_owned(),
            token: token.filter(|t| !t.is_empty()),
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let addr = (host, self.port)
            .to_socket_addrs()
            .map_err(|e| format!("{}:{}: {e}", self.host, self.port))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.host))?;
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
            .map_err(|e| format!("cannot reach the admin API at {addr}: {e}"))?;
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let _ = s.set_write_timeout(Some(TIMEOUT));
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: kyuu-admin\r\n",
            self.prefix, self.host, self.port
        );
        if let Some(t) = &self.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(req.as_bytes())
            .map_err(|e| format!("sending to {addr}: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| format!("reading from {addr}: {e}"))?;
        let (status, body) = parse_response(&raw)?;
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).trim().to_owned()));
        if !(200..300).contains(&status) {
            let msg = v["error"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(format!("HTTP {status}: {msg}"));
        }
        Ok(v)
    }
}

/// Status code and body (de-chunked) of a whole HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("truncated HTTP response")?;
    let head = String::from_utf8_lossy(raw.get(..split).unwrap_or_default());
    let body = raw.get(split + 4..).unwrap_or_default();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(rest.get(..eol).unwrap_or_default());
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let chunk = rest
            .get(start..start + size)
            .ok_or("truncated chunked body")?;
        out.extend_from_slice(chunk);
        rest = rest.get(start + size + 2..).unwrap_or_default();
    }
    Ok((status, out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_and_responses() {
        let c = Client::new("http://127.0.0.1:8081/", None).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.prefix.as_str()),
            ("127.0.0.1", 8081, "")
        );
        let c = Client::new("http://[::1]:9/x/", Some(String::new())).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.prefix.as_str()),
            ("[::1]", 9, "/x")
        );
        assert!(c.token.is_none());
        assert!(Client::new("https://h:1", None).is_err());
        let (s, b) = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n3\r\n\":1\r\n1\r\n}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (200, b"{\"a\":1}".as_slice()));
        assert_eq!(parse_secs("10m").unwrap(), 600);
        assert!(parse_secs("0").is_err());
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "USER", "AGE"],
            &[vec!["0-1-1".into(), "alice".into(), "5s".into()]],
        );
        assert_eq!(t, "ID     USER   AGE\n0-1-1  alice  5s\n");
    }
}
