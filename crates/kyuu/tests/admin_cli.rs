//! `kyuu admin …` against a real `kyuu serve` on free loopback ports: credentials minted by the
//! CLI allocate, `sessions` lists the allocation, `kill` ends it, `reload` and `SIGHUP` apply a
//! changed file (a broken one is refused), systemd readiness notifications arrive on
//! `NOTIFY_SOCKET`, and `drain` makes the server exit.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod support;
use support::Proc;

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");
const TOKEN: &str = "cli-test-token-0123456789";

struct Serve {
    proc: Proc,
    summary: String,
}

fn start(config: &Path, notify: &Path) -> Serve {
    let (proc, summary) = support::serve_until_with(
        &[("NOTIFY_SOCKET", notify.as_os_str())],
        &["--config".as_ref(), config.as_os_str()],
        |l| l.contains("try it"),
    );
    Serve { proc, summary }
}

impl Serve {
    fn addr_after(&self, label: &str, scheme: &str) -> SocketAddr {
        let l = self
            .summary
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line in\n{}", self.summary));
        let a = l.split(scheme).nth(1).unwrap();
        a.split(['/', ' ']).next().unwrap().parse().unwrap()
    }
}

fn admin(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(KYUU);
    c.arg("admin").args(args).env("KYUU_ADMIN_URL", url);
    match token {
        Some(t) => c.env("KYUU_ADMIN_TOKEN", t),
        None => c.env_remove("KYUU_ADMIN_TOKEN"),
    };
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "kyuu admin failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn config(dir: &Path, extra_turn: &str) -> String {
    let _ = dir;
    format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\ntls = []\nthreads = 1\n\
         [turn]\nstatic_auth_secrets = [\"s3cret\"]\nallow_peers = [\"127.0.0.0/8\"]\n{extra_turn}\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
    )
}

fn notifications(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = m == want;
            got.push(m);
            if done {
                return got;
            }
        }
    }
    panic!("no {want:?} notification; got {got:?}");
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("kyuu-admin-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn admin_cli_against_kyuu_serve() {
    let dir = temp_dir();
    let file = dir.join("kyuu.toml");
    std::fs::write(&file, config(&dir, "")).unwrap();
    let notify_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let mut serve = start(&file, &notify_path);
    assert_eq!(notifications(&notify, "READY=1"), ["READY=1"]);
    let admin_addr = serve.addr_after("admin", "http://");
    let turn = serve.addr_after("STUN/TURN", "udp  ");
    let url = format!("http://{admin_addr}");
    let t = Some(TOKEN);

    // Without the token: refused, exit status 1.
    let o = admin(&url, None, &["sessions"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("HTTP 401"));

    // Credentials from the CLI allocate.
    let out = ok(&admin(
        &url,
        t,
        &["credentials", "--user", "alice", "--ttl", "1h"],
    ));
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let (user, pass) = (field("username"), field("password"));
    assert!(user.ends_with(":alice"), "{out}");
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(matches!(
        support::allocate(&client, turn, &user, &pass),
        kyuu_client::turn::Event::Allocated { .. }
    ));
    let check = ok(&admin(&url, t, &["credentials", "--check", &user, &pass]));
    assert!(
        check.starts_with("valid (rest, expires at unix "),
        "{check}"
    );
    let bad = ok(&admin(&url, t, &["credentials", "--check", &user, "nope"]));
    assert_eq!(bad, "invalid: wrong_password\n");

    // sessions: a table by default, the API's JSON with --json.
    let table = ok(&admin(&url, t, &["sessions"]));
    println!("$ kyuu admin sessions\n{table}");
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in [
        "ID",
        "USER",
        "CLIENT",
        "TRANSPORT",
        "RELAYED",
        "PEERS",
        "AGE",
    ] {
        assert!(header.contains(col), "{table}");
    }
    let row = lines.next().unwrap();
    assert!(row.contains(&user), "{table}");
    assert!(
        row.contains(&client.local_addr().unwrap().to_string()),
        "{table}"
    );
    assert!(table.ends_with("1 allocation(s)\n"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&admin(&url, t, &["sessions", "--json"]))).unwrap();
    assert_eq!(json["count"], 1);
    let id = json["allocations"][0]["id"].as_str().unwrap().to_owned();
    assert!(row.starts_with(&id), "{table}");

    let sig = ok(&admin(&url, t, &["sessions", "--signaling"]));
    assert!(sig.ends_with("0 connection(s)\n"), "{sig}");

    // kill
    assert_eq!(
        ok(&admin(&url, t, &["kill", &id])),
        format!("killed {id}\n")
    );
    assert!(ok(&admin(&url, t, &["sessions"])).ends_with("0 allocation(s)\n"));
    let o = admin(&url, t, &["kill", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("HTTP 404: no allocation"));

    // loglevel
    assert_eq!(
        ok(&admin(&url, t, &["loglevel", "debug"])),
        "log level: debug\n"
    );
    assert_eq!(ok(&admin(&url, t, &["loglevel"])), "log level: debug\n");
    let o = admin(&url, t, &["loglevel", "info,=x=y"]);
    assert_eq!(o.status.code(), Some(1));

    // reload through the API: a new static user.
    std::fs::write(
        &file,
        config(
            &dir,
            "[[turn.users]]\nname = \"carol\"\npassword = \"pw\"\n",
        ),
    )
    .unwrap();
    let r = ok(&admin(&url, t, &["reload"]));
    assert!(r.contains("applied         log.level, turn"), "{r}");
    assert!(
        ok(&admin(&url, t, &["credentials", "--check", "carol", "pw"]))
            .starts_with("valid (static_user")
    );
    // A broken file: refused with the key, nothing changes.
    std::fs::write(&file, "[turn]\nrelay_ports = { min = 6, max = 5 }\n").unwrap();
    let o = admin(&url, t, &["reload"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("HTTP 400: turn.relay_ports"), "{err}");
    assert!(ok(&admin(&url, t, &["credentials", "--check", "carol", "pw"])).starts_with("valid"));

    // SIGHUP reloads too, between RELOADING=1 and READY=1.
    std::fs::write(
        &file,
        config(
            &dir,
            "[[turn.users]]\nname = \"dave\"\npassword = \"pw2\"\n",
        ),
    )
    .unwrap();
    let pid = serve.proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let got = notifications(&notify, "READY=1");
    assert!(
        got[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{got:?}"
    );
    assert!(ok(&admin(&url, t, &["credentials", "--check", "dave", "pw2"])).starts_with("valid"));
    assert_eq!(
        ok(&admin(&url, t, &["credentials", "--check", "carol", "pw"])),
        "invalid: unknown_user\n"
    );

    // drain with no allocations left: the server exits by itself, status 0.
    let d = ok(&admin(&url, t, &["drain", "--deadline", "30"]));
    assert!(d.starts_with("draining: 0 allocation(s) left"), "{d}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = serve.proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "kyuu serve did not exit after drain"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
    assert!(notifications(&notify, "STOPPING=1").contains(&"STOPPING=1".to_owned()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn admin_cli_reports_unreachable_and_bad_urls() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let o = admin(&format!("http://{addr}"), None, &["sessions"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the admin API"));
    let o = admin("https://127.0.0.1:1", None, &["sessions"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("https is not supported"));
}

/// `kyuu serve --check` refuses a public admin listener without a token, naming the key.
#[test]
fn check_refuses_public_admin_without_token() {
    let dir = temp_dir().join("check");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("public.toml");
    std::fs::write(&f, "[admin]\nlisten = \"0.0.0.0:8081\"\n").unwrap();
    let o = Command::new(KYUU)
        .args(["serve", "--check", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "admin.listen: 0.0.0.0:8081 is not a loopback address and admin.token is not set"
        ),
        "{err}"
    );
}
