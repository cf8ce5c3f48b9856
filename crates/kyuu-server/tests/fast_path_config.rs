//! `turn.fast_path`: "required" refuses to start when the fast path cannot be attached, naming
//! the key and the reason; "auto" starts without it and relays in userspace; the keys parse.
#![allow(clippy::unwrap_used)]

use kyuu_server::relay::{self, ListenConfig, Transport};
use kyuu_turn::{FastPathMode, TurnConfig};

fn listen() -> ListenConfig {
    ListenConfig {
        udp: vec!["127.0.0.1:0".parse().unwrap()],
        tcp: vec![],
        tls: vec![],
        threads: 1,
        ..Default::default()
    }
}

fn turn(mode: FastPathMode) -> TurnConfig {
    TurnConfig {
        fast_path: mode,
        fast_path_interface: Some("kyuu-no-such0".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn required_without_a_usable_interface_refuses_to_start_naming_the_key() {
    let err = relay::start(&listen(), turn(FastPathMode::Required), None)
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("turn.fast_path = \"required\""), "{msg}");
    assert!(
        msg.contains("kyuu-no-such0") || msg.contains("unavailable"),
        "{msg}"
    );
}

#[tokio::test]
async fn auto_without_a_usable_interface_starts_in_userspace() {
    let h = relay::start(&listen(), turn(FastPathMode::Auto), None)
        .await
        .unwrap();
    assert!(h.addr(Transport::Udp).is_some());
    h.shutdown().await;
}

#[test]
fn the_keys_parse_and_a_bad_value_names_the_key() {
    let cfg = kyuu_server::config::Config::from_toml(
        "[turn]\nfast_path = \"auto\"\nfast_path_interface = \"eth0\"\n",
        "t.toml",
    )
    .unwrap();
    assert_eq!(cfg.turn.fast_path, FastPathMode::Auto);
    assert_eq!(cfg.turn.fast_path_interface.as_deref(), Some("eth0"));
    let err = kyuu_server::config::Config::from_toml("[turn]\nfast_path = \"fast\"\n", "t.toml")
        .unwrap_err();
    assert!(format!("{err:#}").contains("fast_path"), "{err:#}");
}
