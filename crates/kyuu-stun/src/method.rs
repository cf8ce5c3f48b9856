//! STUN methods ([RFC 8489 §18.2](https://www.rfc-editor.org/rfc/rfc8489#section-18.2),
//! [RFC 8656 §17](https://www.rfc-editor.org/rfc/rfc8656#section-17),
//! [RFC 6062 §6.1](https://www.rfc-editor.org/rfc/rfc6062#section-6.1)).

pub const BINDING: u16 = 0x001;
pub const ALLOCATE: u16 = 0x003;
pub const REFRESH: u16 = 0x004;
pub const SEND: u16 = 0x006;
pub const DATA: u16 = 0x007;
pub const CREATE_PERMISSION: u16 = 0x008;
pub const CHANNEL_BIND: u16 = 0x009;
pub const CONNECT: u16 = 0x00A;
pub const CONNECTION_BIND: u16 = 0x00B;
pub const CONNECTION_ATTEMPT: u16 = 0x00C;

/// A human name for logs and metrics.
pub fn name(method: u16) -> &'static str {
    match method {
        BINDING => "binding",
        ALLOCATE => "allocate",
        REFRESH => "refresh",
        SEND => "send",
        DATA => "data",
        CREATE_PERMISSION => "create_permission",
        CHANNEL_BIND => "channel_bind",
        CONNECT => "connect",
        CONNECTION_BIND => "connection_bind",
        CONNECTION_ATTEMPT => "connection_attempt",
        _ => "other",
    }
}
