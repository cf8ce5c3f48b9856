//! TCP relaying (RFC 6062): Connect, ConnectionAttempt, ConnectionBind.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use kyuu_client::turn::{AllocateOptions, Client, Event};
use kyuu_stun::ErrorCode;
use kyuu_turn::{ClientSocket, ConnectionId, Family, Output, PeerAddr};

/// alice over TCP with a TCP allocation.
fn tcp_allocation() -> Pair {
    let mut p = Pair::tcp(cfg());
    let o = AllocateOptions {
        transport: Some(6),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    assert!(matches!(p.run().as_slice(), [Event::Allocated { .. }]));
    p
}

/// The client's Connect to `peer`; returns the id the core asked the shell to connect.
fn connect(p: &mut Pair, peer: std::net::SocketAddr) -> ConnectionId {
    p.client.connect(p.now, peer);
    p.run();
    let Some(Output::ConnectPeer { connection_id, .. }) = p.other.pop() else {
        panic!("{:?}", p.other)
    };
    connection_id
}

fn connected(p: &mut Pair) -> ConnectionId {
    let id = connect(p, peer());
    p.server.peer_connected(p.now, id, true);
    p.pump_server();
    assert_eq!(
        p.run(),
        vec![Event::Connected {
            connection_id: id.get()
        }]
    );
    id
}

fn data_socket(p: &Pair) -> ClientSocket {
    ClientSocket {
        remote: "203.0.113.5:40001".parse().unwrap(),
        ..p.sock
    }
}

#[test]
fn channel_bind_on_a_tcp_allocation_gets_400() {
    let mut p = tcp_allocation();
    p.client.channel_bind(p.now, 0x4000, peer());
    p.expect_error(ErrorCode::BAD_REQUEST);
}

#[test]
fn connect_to_a_denied_peer_gets_403() {
    let mut p = tcp_allocation();
    p.client.connect(p.now, "127.0.0.1:80".parse().unwrap());
    p.expect_error(ErrorCode::FORBIDDEN);
}

#[test]
fn connect_on_a_udp_allocation_gets_400() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.client.connect(p.now, peer());
    p.expect_error(ErrorCode::BAD_REQUEST);
}

#[test]
fn connect_succeeds_with_the_connection_id_once_the_shell_has_connected() {
    let mut p = tcp_allocation();
    connected(&mut p);
}

#[test]
fn a_second_connect_to_the_same_peer_gets_446() {
    let mut p = tcp_allocation();
    connected(&mut p);
    p.client.connect(p.now, peer());
    p.expect_error(ErrorCode::CONNECTION_ALREADY_EXISTS);
}

#[test]
fn a_failed_connect_gets_447() {
    let mut p = tcp_allocation();
    let id = connect(&mut p, "8.8.4.4:80".parse().unwrap());
    p.server.peer_connected(p.now, id, false);
    p.pump_server();
    assert!(matches!(
        p.run().as_slice(),
        [Event::Error { code: 447, .. }]
    ));
}

#[test]
fn connection_bind_on_a_new_connection_splices_it_to_the_peer() {
    let mut p = tcp_allocation();
    let id = connected(&mut p);
    let data_sock = data_socket(&p);
    let mut dc = Client::new("alice", "secret", true);
    dc.share_credentials(&p.client);
    dc.connection_bind(p.now, id.get());
    let b = dc.poll_transmit().unwrap();
    p.server.handle_client(p.now, data_sock, &b);
    let mut spliced = false;
    while let Some(o) = p.server.poll_output() {
        match o {
            Output::Transmit(t) => dc.handle_input(p.now, &t.data),
            Output::SpliceConnection {
                connection_id,
                client,
            } => spliced = connection_id == id && client == data_sock,
            _ => {}
        }
    }
    assert!(spliced);
    assert_eq!(dc.poll_event(), Some(Event::ConnectionBound));
}

#[test]
fn connection_bind_with_an_unknown_id_gets_400() {
    let mut p = tcp_allocation();
    let mut dc = Client::new("alice", "secret", true);
    dc.share_credentials(&p.client);
    dc.connection_bind(p.now, 12345);
    let b = dc.poll_transmit().unwrap();
    p.server.handle_client(p.now, data_socket(&p), &b);
    let t = next_transmit(&mut p.server).unwrap();
    assert_eq!(error_code(&t.data), Some(400));
}

#[test]
fn a_peer_connecting_without_a_permission_is_refused() {
    let mut p = tcp_allocation();
    let relay = p.relay(Family::V4);
    let peer = PeerAddr::new("1.1.1.1:5".parse().unwrap());
    assert!(p
        .server
        .peer_connection_accepted(p.now, relay, peer)
        .is_none());
}

#[test]
fn a_permitted_peer_connecting_is_announced_with_connection_attempt() {
    let mut p = tcp_allocation();
    p.permit("8.8.8.8:1".parse().unwrap());
    let relay = p.relay(Family::V4);
    let from = "8.8.8.8:7".parse().unwrap();
    let id = p
        .server
        .peer_connection_accepted(p.now, relay, PeerAddr::new(from))
        .unwrap();
    p.pump_server();
    assert_eq!(
        p.client.poll_event(),
        Some(Event::ConnectionAttempt {
            connection_id: id.get(),
            peer: from
        })
    );
}

#[test]
fn an_unclaimed_peer_connection_is_closed_after_30_seconds() {
    let mut p = tcp_allocation();
    let id = connected(&mut p);
    p.advance(std::time::Duration::from_secs(31));
    assert!(p.other.iter().any(
        |o| matches!(o, Output::ClosePeerConnection { connection_id } if *connection_id == id)
    ));
}

#[test]
fn closing_the_control_connection_ends_the_allocation() {
    let mut p = tcp_allocation();
    p.server.client_closed(p.now, p.sock);
    assert_eq!(p.server.allocation_count(), 0);
}
