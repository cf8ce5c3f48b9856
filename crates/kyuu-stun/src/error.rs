/// Why bytes could not be parsed or a message could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("truncated: need {expected} bytes, have {actual}")]
    Truncated { expected: usize, actual: usize },
    #[error("not a STUN message: {0}")]
    NotStun(&'static str),
    #[error("message length {length} does not match the {actual} bytes received")]
    LengthMismatch { length: usize, actual: usize },
    #[error("attribute 0x{attr_type:04x} at offset {offset} overruns the message")]
    AttributeOverrun { attr_type: u16, offset: usize },
    #[error("attribute 0x{attr_type:04x} has an invalid value: {reason}")]
    InvalidAttribute {
        attr_type: u16,
        reason: &'static str,
    },
    #[error("attribute 0x{0:04x} is missing")]
    MissingAttribute(u16),
    #[error("MESSAGE-INTEGRITY check failed")]
    IntegrityMismatch,
    #[error("FINGERPRINT check failed")]
    FingerprintMismatch,
    #[error("output buffer too small")]
    BufferTooSmall,
    #[error("attribute value too long ({0} bytes)")]
    ValueTooLong(usize),
}
