//! TURN ChannelData messages (RFC 8656 §12.4) and stream framing (RFC 8656 §12.5).

use crate::{Error, HEADER_LEN};

/// The valid channel number range (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// The last channel number of RFC 5766 (§11), which RFC 8656 narrowed to [`CHANNEL_MAX`]. Servers
/// still meet clients using it (coturn's `turnutils_uclient` picks numbers up to here).
pub const CHANNEL_MAX_RFC5766: u16 = 0x7FFF;

/// A TURN channel number, always within 0x4000..=0x7FFF: the RFC 8656 range (0x4000..=0x4FFF,
/// §12) unless built with [`ChannelNumber::new_rfc5766`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    /// A channel number of RFC 8656 §12 (0x4000..=0x4FFF); `None` outside it.
    pub const fn new(n: u16) -> Option<Self> {
        if n >= CHANNEL_MIN && n <= CHANNEL_MAX {
            Some(ChannelNumber(n))
        } else {
            None
        }
    }

    /// A channel number of the older RFC 5766 range (0x4000..=0x7FFF), which a server accepts
    /// from clients written against it; `None` outside it.
    pub const fn new_rfc5766(n: u16) -> Option<Self> {
        if n >= CHANNEL_MIN && n <= CHANNEL_MAX_RFC5766 {
            Some(ChannelNumber(n))
        } else {
            None
        }
    }

    /// The number as sent on the wire.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl std::fmt::Display for ChannelNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#06x}", self.0)
    }
}

/// A parsed ChannelData message borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    pub channel: ChannelNumber,
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData message. Trailing bytes beyond the length (UDP or stream padding) are
    /// ignored. Channel numbers of the RFC 5766 range are accepted (every first byte 0x40..=0x7F
    /// demultiplexes to ChannelData); whether a number is bound is the receiver's business.
    /// This is the only ChannelData parser: the server's relay path uses it too.
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        if buf.len() < 4 {
            return Err(Error::Truncated {
                expected: 4,
                actual: buf.len(),
            });
        }
        let Some(channel) = ChannelNumber::new_rfc5766(u16::from_be_bytes([buf[0], buf[1]])) else {
            return Err(Error::NotStun("channel number outside 0x4000-0x7FFF"));
        };
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        let data = buf
            .get(4..)
            .and_then(|rest| rest.get(..len))
            .ok_or(Error::Truncated {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_numbers_outside_their_range_are_refused() {
        assert_eq!(ChannelNumber::new(0x3FFF), None);
        assert_eq!(
            ChannelNumber::new(0x4000).map(ChannelNumber::get),
            Some(0x4000)
        );
        assert_eq!(
            ChannelNumber::new(0x4FFF).map(ChannelNumber::get),
            Some(0x4FFF)
        );
        assert_eq!(ChannelNumber::new(0x5000), None);
        assert_eq!(
            ChannelNumber::new_rfc5766(0x7FFF).map(ChannelNumber::get),
            Some(0x7FFF)
        );
        assert_eq!(ChannelNumber::new_rfc5766(0x8000), None);
    }

    #[test]
    fn channel_data_parse_checks_the_length_and_ignores_padding() {
        assert!(ChannelData::parse(&[0x40, 0x00, 0x00]).is_err());
        assert!(ChannelData::parse(&[0x40, 0x00, 0x00, 0x02, 1]).is_err());
        assert!(ChannelData::parse(&[0x80, 0x00, 0x00, 0x00]).is_err());
        let cd = ChannelData::parse(&[0x70, 0x01, 0x00, 0x01, 9, 0, 0, 0]).ok();
        assert_eq!(
            cd.map(|c| (c.channel.get(), c.data)),
            Some((0x7001, &[9u8][..]))
        );
    }
}
