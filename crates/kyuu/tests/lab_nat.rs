//! `kyuu nat` from behind each lab NAT kind against `kyuu serve --alt-ip` (RFC 5780 with two
//! addresses) classifies every kind correctly; and (interop) gives the same verdict against
//! coturn's `turnserver` run with two addresses, whose own `turnutils_stunclient -f` sees the
//! same answers from kyuu as from coturn.
//!
//! Needs root, `ip` and `nft` (SKIP otherwise, failure with `KYUU_LAB_REQUIRED=1`); the coturn
//! test also needs coturn (SKIP otherwise, failure with `KYUU_INTEROP_REQUIRED=1`).
//!
//! Topology: one WAN switch with the server (198.18.0.10 and .11) and one router per NAT kind
//! (198.18.0.k), each with its own LAN 198.19.k.0/24 and a client at 198.19.k.10.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kyuu_lab::{lab_or_skip, Lab, LabChild, NatKind, Node};

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");
const S1: &str = "198.18.0.10";
const S2: &str = "198.18.0.11";
const KYUU_PORT: u16 = 3478;
const COTURN_PORT: u16 = 3480;

const KINDS: [NatKind; 5] = [
    NatKind::FullCone,
    NatKind::RestrictedCone,
    NatKind::PortRestrictedCone,
    NatKind::Symmetric,
    NatKind::None,
];

struct World {
    lab: Lab,
    server: Node,
    /// (kind, client, the router's WAN address = the expected public IP)
    clients: Vec<(NatKind, Node, String)>,
}

fn build(lab: Lab) -> Result<World> {
    let wan = lab.switch("wan")?;
    let server = lab.host("srv")?;
    let eth = server.attach(&wan, &format!("{S1}/24"))?;
    server.add_addr(&eth, &format!("{S2}/24"))?;
    let mut clients = Vec::new();
    for (i, kind) in KINDS.iter().enumerate() {
        let k = i + 1;
        let lan = lab.switch(&format!("lan{k}"))?;
        let nat = lab.router(&format!("nat{k}"), *kind)?;
        let wan_ip = format!("198.18.0.{k}");
        nat.wan(&wan, &format!("{wan_ip}/24"))?;
        nat.lan(&lan, &format!("198.19.{k}.1/24"))?;
        let client = lab.host(&format!("cli{k}"))?;
        client.attach(&lan, &format!("198.19.{k}.10/24"))?;
        client.route_default(&format!("198.19.{k}.1"))?;
        if *kind == NatKind::None {
            server.route(&format!("198.19.{k}.0/24"), &wan_ip)?;
        }
        clients.push((*kind, client, wan_ip));
    }
    Ok(World {
        lab,
        server,
        clients,
    })
}

/// `kyuu serve` on S1:3478 with alternate S2:3479; returns once it listens.
fn start_kyuu(server: &Node) -> Result<LabChild> {
    let mut cmd = server.command(KYUU);
    cmd.args([
        "serve",
        "--listen",
        &format!("{S1}:{KYUU_PORT}"),
        "--alt-ip",
        S2,
        "--tls",
        "off",
        "--http",
        "off",
        "--log",
        "warn",
    ])
    .env_remove("RUST_LOG")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let child = server.spawn(cmd)?;
    let out = child.take_stdout().context("kyuu stdout")?;
    let mut lines = BufReader::new(out).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    loop {
        let Some(line) = lines.next() else {
            bail!("kyuu serve exited: {seen}");
        };
        let line = line?;
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("RFC 5780") {
            ensure!(
                line.contains(&format!("{S2}:{}", KYUU_PORT + 1)),
                "unexpected alternate: {line}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "kyuu serve did not start: {seen}"
        );
    }
    // Keep draining stdout.
    std::thread::spawn(move || for _ in lines {});
    Ok(child)
}

/// coturn on S1:3480 and S2:3480 (alternate port 3481): RFC 5780 mode.
fn start_coturn(lab: &Lab, server: &Node) -> Result<LabChild> {
    let dir = std::env::temp_dir().join(format!("{}-coturn", lab.prefix()));
    std::fs::create_dir_all(&dir)?;
    let mut cmd = server.command("turnserver");
    cmd.args([
        "-n",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "-L",
        S1,
        "-L",
        S2,
        "-p",
        &COTURN_PORT.to_string(),
        "--alt-listening-port",
        &(COTURN_PORT + 1).to_string(),
        "--use-auth-secret",
        "--static-auth-secret",
        "lab",
        "--realm",
        "lab",
        "--no-stdout-log",
        "--simple-log",
    ])
    .arg("--log-file")
    .arg(dir.join("turn.log"))
    .arg("--pidfile")
    .arg(dir.join("turn.pid"))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = server.spawn(cmd)?;
    // Ready when it answers with OTHER-ADDRESS.
    let deadline = Instant::now() + Duration::from_secs(15);
    let target: SocketAddr = format!("{S1}:{COTURN_PORT}").parse()?;
    let sock = server.udp_bind(&format!("{S1}:0"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let mut req = [0u8; kyuu_client::binding::MAX_REQUEST_LEN];
        let n = kyuu_client::binding::write_request(
            &mut req,
            kyuu_client::binding::new_transaction_id(),
            0,
            false,
        )?;
        sock.send_to(&req[..n], target)?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let msg = kyuu_stun_message(&buf[..n])?;
            ensure!(msg, "coturn runs without RFC 5780 (no OTHER-ADDRESS)");
            return Ok(child);
        }
    }
    bail!("coturn did not answer on {target}")
}

/// Whether a Binding success response carries OTHER-ADDRESS.
fn kyuu_stun_message(data: &[u8]) -> Result<bool> {
    use kyuu_client::binding::{parse_response, BindingResponse};
    let msg = kyuu_stun::Message::parse(data)?;
    Ok(matches!(
        parse_response(&msg)?,
        Some(BindingResponse::Success { other: Some(_), .. })
    ))
}

/// Runs `kyuu nat --json` in `client`'s namespace.
fn kyuu_nat(client: &Node, server: &str) -> Result<serde_json::Value> {
    let mut cmd = client.command(KYUU);
    cmd.args(["nat", server, "--json", "--timeout", "2s"]);
    let out = client.run(cmd, Duration::from_secs(60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(0),
        "kyuu nat {server} exited {:?}: {stdout} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).with_context(|| format!("not JSON: {stdout}"))
}

fn expected(kind: NatKind) -> (&'static str, &'static str, &'static str, bool) {
    match kind {
        NatKind::FullCone => (
            "endpoint-independent",
            "endpoint-independent",
            "full-cone",
            true,
        ),
        NatKind::RestrictedCone => (
            "endpoint-independent",
            "address-dependent",
            "restricted-cone",
            true,
        ),
        NatKind::PortRestrictedCone => (
            "endpoint-independent",
            "address-and-port-dependent",
            "port-restricted-cone",
            true,
        ),
        NatKind::Symmetric => (
            "address-and-port-dependent",
            "address-and-port-dependent",
            "symmetric",
            true,
        ),
        NatKind::None => (
            "endpoint-independent",
            "endpoint-independent",
            "open-internet",
            false,
        ),
    }
}

fn check_report(kind: NatKind, public_ip: &str, v: &serde_json::Value) -> Result<()> {
    let (mapping, filtering, name, behind) = expected(kind);
    let ctx = || format!("{kind:?}: {v}");
    ensure!(v["rfc5780"] == true, "{}", ctx());
    ensure!(v["behind_nat"] == behind, "{}", ctx());
    ensure!(v["mapping"] == mapping, "mapping: {}", ctx());
    ensure!(v["filtering"] == filtering, "filtering: {}", ctx());
    ensure!(v["nat_type"] == name, "nat_type: {}", ctx());
    let public = v["public"].as_str().unwrap_or_default();
    if behind {
        ensure!(
            public.starts_with(&format!("{public_ip}:")),
            "public address: {}",
            ctx()
        );
        ensure!(v["hairpinning"].is_boolean(), "hairpinning: {}", ctx());
    }
    ensure!(
        v["problems"].as_array().is_some_and(|p| p.is_empty()),
        "problems: {}",
        ctx()
    );
    Ok(())
}

/// Runs `f` for every client in parallel (each `kyuu nat` spends seconds waiting on silence).
fn for_each_client<T: Send>(
    w: &World,
    f: impl Fn(NatKind, &Node, &str) -> Result<T> + Sync,
) -> Vec<(NatKind, Result<T>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = w
            .clients
            .iter()
            .map(|(kind, client, ip)| {
                let f = &f;
                (*kind, s.spawn(move || f(*kind, client, ip)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(k, h)| {
                (
                    k,
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked"))),
                )
            })
            .collect()
    })
}

#[test]
fn kyuu_nat_classifies_every_lab_nat() -> Result<()> {
    let Some(lab) = lab_or_skip("kyuu_nat_classifies_every_lab_nat") else {
        return Ok(());
    };
    let w = build(lab)?;
    let _kyuu = start_kyuu(&w.server)?;
    let server = format!("{S1}:{KYUU_PORT}");
    let results = for_each_client(&w, |kind, client, ip| {
        let v = kyuu_nat(client, &server)?;
        check_report(kind, ip, &v)?;
        Ok(v)
    });
    let mut failures = Vec::new();
    for (kind, r) in results {
        match r {
            Ok(v) => println!(
                "{kind:?}: {} (mapping {}, filtering {}, hairpinning {}, public {})",
                v["nat_type"], v["mapping"], v["filtering"], v["hairpinning"], v["public"]
            ),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn interop_or_skip(test: &str) -> bool {
    let required = std::env::var("KYUU_INTEROP_REQUIRED").is_ok_and(|v| v == "1");
    let have = ["turnserver", "turnutils_stunclient", "stdbuf", "timeout"]
        .iter()
        .all(|b| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !have {
        assert!(
            !required,
            "{test}: coturn (turnserver, turnutils_stunclient) is not installed and KYUU_INTEROP_REQUIRED=1"
        );
        println!(
            "SKIP {test}: coturn is not installed (set KYUU_INTEROP_REQUIRED=1 to make this a failure)"
        );
    }
    have
}

/// What `turnutils_stunclient -f` saw: for each of its three requests, whether an answer came
/// and from where (the reflexive ports are per-run and not compared).
fn stunclient(client: &Node, port: u16) -> Result<Vec<Option<String>>> {
    // It waits forever for an answer that a NAT filtered out, and block-buffers a pipe: bound
    // it with timeout(1) and make it line-buffered so what it saw before is kept.
    let mut cmd = client.command("timeout");
    cmd.args([
        "6",
        "stdbuf",
        "-oL",
        "turnutils_stunclient",
        "-f",
        "-p",
        &port.to_string(),
        S1,
    ]);
    let out = client.run(cmd, Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut answers = vec![None; 3];
    for block in text.split("RFC 5780 response ").skip(1) {
        let n: usize = block
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let origin = block
            .lines()
            .find_map(|l| l.split("Response origin: : ").nth(1))
            .map(|o| o.trim().to_owned());
        if let Some(slot) = n.checked_sub(1).and_then(|i| answers.get_mut(i)) {
            *slot = Some(origin.unwrap_or_default());
        }
    }
    Ok(answers)
}

#[test]
fn kyuu_nat_agrees_against_coturn() -> Result<()> {
    const TEST: &str = "kyuu_nat_agrees_against_coturn";
    if !interop_or_skip(TEST) {
        return Ok(());
    }
    let Some(lab) = lab_or_skip(TEST) else {
        return Ok(());
    };
    let w = build(lab)?;
    let _kyuu = start_kyuu(&w.server)?;
    let _coturn = start_coturn(&w.lab, &w.server)?;
    let results = for_each_client(&w, |kind, client, ip| {
        let ours = kyuu_nat(client, &format!("{S1}:{KYUU_PORT}"))?;
        let theirs = kyuu_nat(client, &format!("{S1}:{COTURN_PORT}"))?;
        check_report(kind, ip, &theirs).context("against coturn")?;
        for key in [
            "behind_nat",
            "mapping",
            "filtering",
            "nat_type",
            "hairpinning",
        ] {
            ensure!(
                ours[key] == theirs[key],
                "{kind:?}: {key} differs: kyuu {} coturn {}",
                ours[key],
                theirs[key]
            );
        }
        // coturn's own client sees the same answers (modulo ports) from both servers.
        let a = stunclient(client, KYUU_PORT)?;
        let b = stunclient(client, COTURN_PORT)?;
        let strip = |v: &[Option<String>]| -> Vec<Option<String>> {
            v.iter()
                .map(|o| {
                    o.as_ref().map(|s| {
                        s.rsplit_once(':')
                            .map_or(s.clone(), |(ip, _)| ip.to_owned())
                    })
                })
                .collect()
        };
        ensure!(
            strip(&a) == strip(&b),
            "{kind:?}: turnutils_stunclient -f: kyuu {a:?} coturn {b:?}"
        );
        ensure!(
            a.first().is_some_and(Option::is_some),
            "{kind:?}: no answer to test 1: {a:?}"
        );
        Ok((theirs["nat_type"].clone(), a))
    });
    let mut failures = Vec::new();
    for (kind, r) in results {
        match r {
            Ok((name, sc)) => {
                println!("{kind:?}: kyuu and coturn agree: {name}; stunclient {sc:?}")
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
