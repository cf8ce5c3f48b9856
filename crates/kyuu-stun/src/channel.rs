//! TURN ChannelData messages (RFC 8656 §12.4) and stream framing (RFC 8656 §12.5).

use crate::{Error, HEADER_LEN};

/// The valid channel number range (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x4FFF;

/// A parsed ChannelData message borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    pub channel: u16,
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData message. Trailing bytes beyond the length (UDP padding) are ignored.
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        if buf.len() < 4 {
            return Err(Error::Truncated {
                expected: 4,
                actual: buf.len(),
            });
        }
        let channel = u16::from_be_bytes([buf[0], buf[1]]);
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) {
            return Err(Error::NotStun("channel number outside 0x4000-0x4FFF"));
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        let data = buf.get(4..4 + len).ok_or(Error::Truncated {
            expected: 4 + len,
            actual: buf.len(),
        })?;
        Ok(ChannelData { channel, data })
    }

    /// Writes the 4-byte header for `len` payload bytes on `channel` into `out[..4]`.
    pub fn write_header(channel: u16, len: u16, out: &mut [u8]) -> Result<(), Error> {
        let head = out.get_mut(..4).ok_or(Error::BufferTooSmall)?;
        head[..2].copy_from_slice(&channel.to_be_bytes());
        head[2..4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Writes a whole ChannelData message (padded to 4 bytes when `pad` is set, as TCP requires).
    pub fn encode(channel: u16, data: &[u8], pad: bool, out: &mut [u8]) -> Result<usize, Error> {
        let len = u16::try_from(data.len()).map_err(|_| Error::ValueTooLong(data.len()))?;
        let total = if pad {
            (4 + data.len() + 3) & !3
        } else {
            4 + data.len()
        };
        let slot = out.get_mut(..total).ok_or(Error::BufferTooSmall)?;
        Self::write_header(channel, len, slot)?;
        slot[4..4 + data.len()].copy_from_slice(data);
        for b in &mut slot[4 + data.len()..] {
            *b = 0;
        }
        Ok(total)
    }
}

/// For a byte stream (TCP/TLS): the size of the next frame, STUN message or ChannelData (padded
/// to a multiple of 4), once its first four bytes are available. `None` when fewer than four bytes
/// are buffered; an error when the bytes start neither kind of frame.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, Error> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    match head[0] >> 6 {
        0b00 => Ok(Some(HEADER_LEN + len)),
        0b01 => Ok(Some((4 + len + 3) & !3)),
        _ => Err(Error::NotStun(
            "stream frame starts with neither STUN nor ChannelData",
        )),
    }
}
