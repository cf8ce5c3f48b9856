//! `kyuu serve`.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use kyuu_server::config::Config;
use kyuu_turn::{PortRange, UserConfig};

use crate::cli::ServeArgs;

/// Exit status for configuration errors (also clap's status for bad arguments).
const CONFIG_ERROR: u8 = 2;

pub fn run(args: ServeArgs) -> ExitCode {
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config error: {e}");
            return ExitCode::from(CONFIG_ERROR);
        }
    };
    if args.print_config {
        return match config.to_toml() {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.check {
        for w in config.exposure_warnings(kyuu_server::limits::host_public_address()) {
            eprintln!("warning: {w}");
        }
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let log_hook = init_logging(&config);
    let reload_args = std::sync::Arc::new(args);
    let hooks = kyuu_server::admin::Hooks {
        log_level: log_hook,
        reload_config: Some(std::sync::Arc::new(move || {
            load(&reload_args).map_err(|e| e.to_string())
        })),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kyuu-http")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(config, hooks)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, hooks: kyuu_server::admin::Hooks) -> anyhow::Result<()> {
    let mut running = kyuu_server::start_with(config, hooks).await?;
    print!("{}", running.summary());
    // Scripts (and the lab tests) read the summary through a pipe.
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    tracing::info!("started");
    crate::sdnotify::notify("READY=1");
    let admin = running.admin.clone();
    let reloads = async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return std::future::pending().await;
            };
            while hup.recv().await.is_some() {
                crate::sdnotify::reloading();
                match admin.reload().await {
                    Ok(r) => eprintln!(
                        "SIGHUP: configuration reloaded (applied: {}; restart needed: {})",
                        list_or_none(&r.applied),
                        list_or_none(&r.restart_needed)
                    ),
                    Err(e) => eprintln!("SIGHUP: configuration not reloaded: {e}"),
                }
                crate::sdnotify::notify("READY=1");
            }
        }
        std::future::pending::<()>().await;
    };
    let result = tokio::select! {
        r = running.wait() => r,
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
        () = reloads => Ok(()),
    };
    crate::sdnotify::notify("STOPPING=1");
    running.shutdown(Duration::from_secs(2)).await;
    result
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Defaults, then the file, then the flags; then validation.
fn load(args: &ServeArgs) -> Result<Config, kyuu_server::config::ConfigError> {
    let mut c = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    apply_flags(&mut c, args)?;
    c.validate()?;
    Ok(c)
}

fn apply_flags(c: &mut Config, a: &ServeArgs) -> Result<(), kyuu_server::config::ConfigError> {
    use kyuu_server::config::ConfigError::Invalid;
    if !a.listen.is_empty() {
        c.listen.udp.clone_from(&a.listen);
        c.listen.tcp.clone_from(&a.listen);
        // TLS follows the listen IPs unless given explicitly.
        if a.tls.is_empty() {
            let tls_port = c.listen.tls.first().map_or(5349, |t| t.port());
            c.listen.tls = a
                .listen
                .iter()
                .map(|l| SocketAddr::new(l.ip(), tls_port))
                .collect();
        }
    }
    if !a.tls.is_empty() {
        c.listen.tls.clear();
        for t in &a.tls {
            if t == "off" {
                continue;
            }
            let addr = t
                .parse::<SocketAddr>()
                .or_else(|_| t.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 5349)))
                .map_err(|_| Invalid(format!("--tls: {t:?} is not IP, IP:PORT or off")))?;
            c.listen.tls.push(addr);
        }
    }
    if !a.dtls.is_empty() {
        c.listen.dtls.clear();
        for t in &a.dtls {
            if t == "off" {
                continue;
            }
            let addr = t
                .parse::<SocketAddr>()
                .or_else(|_| t.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 5349)))
                .map_err(|_| Invalid(format!("--dtls: {t:?} is not IP, IP:PORT or off")))?;
            c.listen.dtls.push(addr);
        }
    }
    if let Some(h) = &a.http {
        if h == "off" {
            c.http.enabled = false;
        } else {
            c.http.enabled = true;
            c.http.listen = h
                .parse::<SocketAddr>()
                .or_else(|_| h.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 8080)))
                .map_err(|_| Invalid(format!("--http: {h:?} is not IP, IP:PORT or off")))?;
        }
    }
    if let Some(h) = &a.https {
        c.http.tls_listen = if h == "off" {
            None
        } else {
            Some(
                h.parse::<SocketAddr>()
                    .or_else(|_| h.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 8443)))
                    .map_err(|_| Invalid(format!("--https: {h:?} is not IP, IP:PORT or off")))?,
            )
        };
    }
    if let Some(r) = &a.realm {
        c.turn.realm.clone_from(r);
    }
    for ip in &a.external_ip {
        match ip {
            IpAddr::V4(v4) => c.turn.external_ipv4 = Some(*v4),
            IpAddr::V6(v6) => c.turn.external_ipv6 = Some(*v6),
        }
    }
    if a.alt_ip.is_some() {
        c.listen.alt_ip = a.alt_ip;
    }
    if a.alt_port.is_some() {
        c.listen.alt_port = a.alt_port;
    }
    if !a.secret.is_empty() {
        c.turn.static_auth_secrets.clone_from(&a.secret);
    }
    for (name, password) in &a.user {
        c.turn.users.push(UserConfig {
            name: name.clone(),
            password: Some(password.clone()),
            key: None,
            key_sha256: None,
        });
    }
    if a.no_turn {
        c.turn.enabled = false;
    }
    if let Some((min, max)) = a.relay_ports {
        c.turn.relay_ports = PortRange { min, max };
    }
    if let Some(t) = a.threads {
        c.listen.threads = t;
    }
    if let Some(l) = &a.log {
        c.log.level.clone_from(l);
    }
    if a.production {
        c.server.profile = kyuu_server::config::Profile::Production;
    }
    Ok(())
}

/// Installs the logger; returns the hook that changes its filter at run time (admin API,
/// reloads).
fn init_logging(config: &Config) -> Option<kyuu_server::admin::LogHook> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = config.log.ansi && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (filter, handle) = reload::Layer::new(filter);
    let ok = tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
        .try_init()
        .is_ok();
    ok.then(|| -> kyuu_server::admin::LogHook {
        std::sync::Arc::new(move |level: &str| {
            let f = EnvFilter::try_new(level).map_err(|e| format!("level: {level:?}: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())
        })
    })
}
