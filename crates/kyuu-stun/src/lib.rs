//! Sans-IO STUN codec: [RFC 8489] messages, the attributes TURN ([RFC 8656], [RFC 6062]) and
//! NAT behaviour discovery ([RFC 5780]) need, and TURN ChannelData framing.
//!
//! * [`Message::parse`] validates a whole message once (header, length, attribute TLVs and
//!   padding), after which no accessor can panic. Parsing borrows the input; nothing is copied.
//! * [`MessageBuilder`] writes a message straight into a caller-provided buffer, including
//!   MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT, and reports [`Error::BufferTooSmall`] instead of
//!   growing anything.
//! * [`ChannelData`] and [`frame_len`] handle the TURN ChannelData format and stream framing.
//!
//! Why hand-written rather than `stun-types`/`stun_codec`: kyuu needs custom comprehension-required
//! attributes for RAWR, one pass over the bytes per packet on the relay path with no allocation,
//! integrity checks that work on the received bytes in place, and a parser small enough to fuzz
//! exhaustively. `stun_codec` decodes into owned enums (allocation per attribute) and `stun-types`
//! ties attribute handling to its own trait registry; both are fine crates, but the code this
//! crate replaces them with is a few hundred lines and fully under our control. See `docs/design.md`.
//!
//! [RFC 8489]: https://www.rfc-editor.org/rfc/rfc8489
//! [RFC 8656]: https://www.rfc-editor.org/rfc/rfc8656
//! [RFC 6062]: https://www.rfc-editor.org/rfc/rfc6062
//! [RFC 5780]: https://www.rfc-editor.org/rfc/rfc5780

pub mod attr;
pub mod bucket;
mod builder;
mod channel;
pub mod classic;
mod error;
mod error_code;
pub mod integrity;
mod message;
pub mod method;
pub mod rest;

pub use builder::MessageBuilder;
pub use channel::{
    frame_len, ChannelData, ChannelNumber, CHANNEL_MAX, CHANNEL_MAX_RFC5766, CHANNEL_MIN,
};
pub use classic::{
    build_classic_error, build_classic_success, ClassicRequest, ClassicTransactionId,
};
pub use error::Error;
pub use error_code::ErrorCode;
pub use integrity::{opaque_string, PrepError};
pub use message::{is_stun, AttrIter, Class, Message, RawAttr, TransactionId};

/// The fixed magic cookie of RFC 8489 section 5.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
