//! `packaging/`: the production configuration passes `kyuu serve --check` (as the systemd unit
//! and the Dockerfile run it), the unit is a `Type=notify` service reloaded by SIGHUP, and every
//! metric the Grafana dashboard queries is one the code records.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap()
}

#[test]
fn production_config_passes_check() {
    let cfg = root().join("packaging/kyuu.toml");
    let o = Command::new(KYUU)
        .args(["serve", "--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "configuration is valid\n"
    );
    // The unit and the image pass the file through KYUU_CONFIG.
    let o = Command::new(KYUU)
        .args(["serve", "--check"])
        .env("KYUU_CONFIG", &cfg)
        .output()
        .unwrap();
    assert!(o.status.success());
    // And --check really checks: a broken copy fails, naming the key.
    let broken = std::env::temp_dir().join(format!("kyuu-pkg-{}.toml", std::process::id()));
    std::fs::write(
        &broken,
        read("packaging/kyuu.toml")
            .replace("listen = \"127.0.0.1:8081\"", "listen = \"0.0.0.0:8081\""),
    )
    .unwrap();
    let o = Command::new(KYUU)
        .args(["serve", "--check", "--config"])
        .arg(&broken)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("admin.listen"));
    // The production profile: no signal token, no start.
    let text: String = read("packaging/kyuu.toml")
        .lines()
        .filter(|l| !l.starts_with("auth_secret"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&broken, text).unwrap();
    let o = Command::new(KYUU)
        .args(["serve", "--check", "--config"])
        .arg(&broken)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&broken);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("server.profile"));
}

#[test]
fn systemd_unit_is_notify_with_reload_and_check() {
    let unit = read("packaging/kyuu.service");
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for want in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStartPre=/usr/local/bin/kyuu serve --check",
        "ExecStart=/usr/local/bin/kyuu serve",
        "Environment=KYUU_CONFIG=/etc/kyuu/kyuu.toml",
    ] {
        assert!(lines.contains(&want), "kyuu.service lacks {want:?}");
    }
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(root().join("packaging/kyuu.service"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        // /usr/local/bin/kyuu is not installed here; anything else is a real complaint.
        for l in err.lines().filter(|l| !l.contains("/usr/local/bin/kyuu")) {
            assert!(!l.contains("kyuu.service:"), "systemd-analyze: {l}");
        }
    }
}

#[test]
fn dockerfile_is_multi_stage_and_checks_config() {
    let d = read("packaging/Dockerfile");
    let froms: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].contains("rust") && froms[0].ends_with("AS build"));
    assert!(froms[1].contains("-slim"));
    assert!(d.contains("cargo build --release --locked -p kyuu"));
    assert!(d.contains("COPY packaging/kyuu.toml /etc/kyuu/kyuu.toml"));
    assert!(d.contains("kyuu serve --check"));
}

/// Metric names the code records: the string literal after `counter!(`, `gauge!(`,
/// `histogram!(` in every crate's `src/`.
fn recorded_metrics() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    for c in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        let src = c.path().join("src");
        if src.is_dir() {
            walk(&src, &mut files);
        }
    }
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for mac in ["counter!(", "gauge!(", "histogram!("] {
            for (i, _) in text.match_indices(mac) {
                let rest = text[i + mac.len()..].trim_start();
                if let Some(lit) = rest.strip_prefix('"') {
                    if let Some(end) = lit.find('"') {
                        names.insert(lit[..end].to_owned());
                    }
                }
            }
        }
    }
    names
}

#[test]
fn grafana_dashboard_queries_only_recorded_metrics() {
    let recorded = recorded_metrics();
    assert!(
        recorded.contains("kyuu_turn_relayed_bytes_total"),
        "{recorded:?}"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&read("packaging/grafana-dashboard.json")).unwrap();
    let mut used = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("kyuu_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                used.insert(name);
            }
        }
    }
    let strip = |n: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .map_or(n.to_owned(), str::to_owned)
    };
    let unknown: Vec<&String> = used
        .iter()
        .filter(|n| !recorded.contains(*n) && !recorded.contains(&strip(n)))
        .collect();
    assert!(
        unknown.is_empty(),
        "dashboard queries unknown metrics: {unknown:?}"
    );
    assert!(used.len() >= 20, "dashboard covers the metrics: {used:?}");
}
