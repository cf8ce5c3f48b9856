//! Read-only views of a [`Hub`] for operators: live connections and rooms.

use std::net::IpAddr;

use serde::Serialize;

use super::{ConnId, Hub};

/// One live signaling connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnInfo {
    #[serde(skip)]
    pub conn: ConnId,
    /// The client id it is reachable under.
    pub id: String,
    /// The client's IP address.
    pub ip: IpAddr,
    /// Whether it speaks the opt-in protocol (`PROTOCOL.md`) rather than the legacy relay.
    pub v2: bool,
    /// Rooms it joined.
    pub rooms: Vec<String>,
}

/// One room and its members' ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomInfo {
    pub name: String,
    pub members: Vec<String>,
}

impl Hub {
    /// Every live connection, ordered by id.
    pub fn connection_list(&self) -> Vec<ConnInfo> {
        let mut v: Vec<ConnInfo> = self
            .conns
            .iter()
            .map(|(conn, c)| ConnInfo {
                conn: *conn,
                id: c.id.clone(),
                ip: c.ip,
                v2: c.v2,
                rooms: c.rooms.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Every room with members, ordered by name.
    pub fn room_list(&self) -> Vec<RoomInfo> {
        let mut v: Vec<RoomInfo> = self
            .rooms
            .iter()
            .map(|(name, members)| RoomInfo {
                name: name.clone(),
                members: members.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The live connection that holds client id `id`.
    pub fn conn_of(&self, id: &str) -> Option<ConnId> {
        self.conns
            .iter()
            .find(|(_, c)| c.id == id)
            .map(|(conn, _)| *conn)
    }
}
