//! Parsing of inbound text frames and rewriting of relayed frames.
//!
//! The relay contract inherited from libdatachannel's example servers: a JSON object with a
//! string member `"id"` is delivered to the client of that id, with `"id"` replaced by the
//! sender's id and *every other member untouched*. To keep members byte-exact (number
//! formatting, key order, escapes) the object is validated with one pass that borrows every
//! value as a [`RawValue`] and keeps nothing but where the `"id"` value sits; the outgoing frame
//! is the inbound text with that value replaced (one allocation, no re-serialisation). Only a
//! frame with several `"id"` members is re-assembled member by member (the duplicates dropped).
//!
//! A JSON object without `"id"` but with a string `"type"` is a control message of the opt-in
//! protocol (see `PROTOCOL.md`).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Why an inbound text frame could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not valid JSON at all.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// Valid JSON but not an object.
    #[error("message is not a JSON object")]
    NotAnObject,
    /// `"id"` is present but is not a string.
    #[error("\"id\" must be a string")]
    IdNotString,
    /// Neither a string `"id"` (relay) nor a string `"type"` (control).
    #[error("message has neither a string \"id\" nor a string \"type\"")]
    NoIdNoType,
    /// A control message whose shape is wrong.
    #[error("bad control message: {0}")]
    BadControl(String),
}

/// One member of a JSON object, value kept as its original text.
struct Member<'a> {
    key: Cow<'a, str>,
    value: &'a RawValue,
}

/// A JSON object as an ordered list of members with raw values.
struct RawObject<'a>(Vec<Member<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4).min(16));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push(Member { key, value });
                }
                Ok(RawObject(members))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// What one validating pass over a JSON object keeps: where its first `"id"` value is, how
/// many `"id"` members it has, and whether it has a string `"type"`.
struct Scan<'a> {
    id: Option<&'a RawValue>,
    ids: usize,
    typed: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for Scan<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Scan<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut scan = Scan {
                    id: None,
                    ids: 0,
                    typed: false,
                };
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    if key == "id" {
                        scan.ids += 1;
                        scan.id.get_or_insert(value);
                    } else if key == "type" && value.get().starts_with('"') {
                        scan.typed = true;
                    }
                }
                Ok(scan)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// An inbound text frame, classified.
#[derive(Debug)]
pub enum Inbound<'a> {
    /// A message for another client (legacy relay format).
    Relay(RelayFrame<'a>),
    /// A control message for the server (opt-in protocol).
    Control(Control),
}

/// A parsed relay frame: destination plus the inbound text and where its `"id"` value is.
pub struct RelayFrame<'a> {
    /// Destination id (the value of `"id"`), borrowed from the frame unless it has escapes.
    pub to: Cow<'a, str>,
    text: &'a str,
    /// Byte range of the (first) `"id"` value in `text`, where the sender's id is written.
    id_span: std::ops::Range<usize>,
    /// More than one `"id"` member: re-assemble without the duplicates.
    duplicate_ids: bool,
}

impl fmt::Debug for RelayFrame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayFrame")
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl RelayFrame<'_> {
    /// The frame to deliver: same members in the same order, `"id"` set to `from`.
    pub fn rewrite(&self, from: &str) -> String {
        let (Some(head), Some(tail), false) = (
            self.text.get(..self.id_span.start),
            self.text.get(self.id_span.end..),
            self.duplicate_ids,
        ) else {
            return self.reassemble(from);
        };
        let mut out = String::with_capacity(head.len() + from.len() + 2 + tail.len());
        out.push_str(head);
        push_json_str(&mut out, from);
        out.push_str(tail);
        out
    }

    /// The slow path for a frame with duplicate `"id"` members: parsed again member by member,
    /// re-assembled with only the first `"id"` (set to `from`).
    fn reassemble(&self, from: &str) -> String {
        let Ok(members) = serde_json::from_str::<RawObject<'_>>(self.text) else {
            // Parsed once already; cannot fail. Deliver nothing rather than the sender's frame.
            return String::from("{}");
        };
        let id_pos = members.0.iter().position(|m| m.key == "id").unwrap_or(0);
        let mut out = String::with_capacity(self.text.len() + from.len() + 8);
        out.push('{');
        let mut first = true;
        for (i, m) in members.0.iter().enumerate() {
            if i != id_pos && m.key == "id" {
                // Duplicate "id" members are dropped: the destination must see one sender id.
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            push_json_str(&mut out, &m.key);
            out.push(':');
            if i == id_pos {
                push_json_str(&mut out, from);
            } else {
                out.push_str(m.value.get());
            }
        }
        out.push('}');
        out
    }
}

/// Control messages of the opt-in protocol (JSON objects with `"type"` and no `"id"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// Keepalive; answered with `pong` (echoing `ts` if given).
    Ping {
        #[serde(default)]
        ts: Option<serde_json::Number>,
    },
    /// Join a room.
    Join { room: String },
    /// Leave a room.
    Leave { room: String },
    /// List a room's members.
    Members { room: String },
    /// Publish the sender under a unique name or in a topic.
    Publish {
        #[serde(flatten)]
        key: DirKeyWire,
    },
    /// Withdraw a publication.
    Unpublish {
        #[serde(flatten)]
        key: DirKeyWire,
    },
    /// Look a name or topic up once.
    Lookup {
        #[serde(flatten)]
        key: DirKeyWire,
    },
    /// Look up and keep receiving `published`/`unpublished` events.
    Watch {
        #[serde(flatten)]
        key: DirKeyWire,
    },
    /// Stop watching.
    Unwatch {
        #[serde(flatten)]
        key: DirKeyWire,
    },
}

/// Wire form of a directory key: exactly one of `name` or `topic`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirKeyWire {
    /// A unique name (one owner).
    #[serde(default)]
    pub name: Option<String>,
    /// A topic (any number of publishers).
    #[serde(default)]
    pub topic: Option<String>,
}

/// Parse an inbound text frame.
pub fn parse(text: &str) -> Result<Inbound<'_>, FrameError> {
    let scan: Scan<'_> = match serde_json::from_str(text) {
        Ok(o) => o,
        // Distinguish "not JSON" from "JSON but not an object".
        Err(_) => {
            return Err(match serde_json::from_str::<de::IgnoredAny>(text) {
                Ok(_) => FrameError::NotAnObject,
                Err(e) => FrameError::InvalidJson(e.to_string()),
            })
        }
    };
    if let Some(raw) = scan.id {
        let raw = raw.get();
        let to = match serde_json::from_str::<&str>(raw) {
            Ok(s) => Cow::Borrowed(s),
            // Escapes in the id: decode into an owned string.
            Err(_) => Cow::Owned(
                serde_json::from_str::<String>(raw).map_err(|_| FrameError::IdNotString)?,
            ),
        };
        // The raw value borrows from `text`: its offset is the pointer difference.
        let start = (raw.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
        return Ok(Inbound::Relay(RelayFrame {
            to,
            text,
            id_span: start..start.saturating_add(raw.len()),
            duplicate_ids: scan.ids > 1,
        }));
    }
    if !scan.typed {
        return Err(FrameError::NoIdNoType);
    }
    let c: Control =
        serde_json::from_str(text).map_err(|e| FrameError::BadControl(e.to_string()))?;
    Ok(Inbound::Control(c))
}

/// Append `s` as a JSON string literal.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    // Nothing to escape (serde_json escapes only '"', '\\' and control characters): copy.
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    // serde_json's escaping is the reference; serialising a &str cannot fail.
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => out.push_str("\"\""),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SEED_CANDIDATE: &str = r#"{"id":"3251357a","payload":{"candidate":"candidate:1 1 UDP 2122317823 10.5.0.6 53578 typ host","sdpMid":"0"}}"#;

    #[test]
    fn rewrites_only_id_and_keeps_members_byte_exact() {
        let Inbound::Relay(r) = parse(SEED_CANDIDATE).unwrap() else {
            panic!("not relay")
        };
        assert_eq!(r.to, "3251357a");
        assert_eq!(
            r.rewrite("4626b02b"),
            r#"{"id":"4626b02b","payload":{"candidate":"candidate:1 1 UDP 2122317823 10.5.0.6 53578 typ host","sdpMid":"0"}}"#
        );
    }

    #[test]
    fn keeps_order_numbers_and_escapes() {
        let text = r#"{"type":"offer","n":1.50e3,"id":"b","description":"v=0\r\n\u00e9"}"#;
        let Inbound::Relay(r) = parse(text).unwrap() else {
            panic!()
        };
        assert_eq!(
            r.rewrite("a\"x"),
            r#"{"type":"offer","n":1.50e3,"id":"a\"x","description":"v=0\r\n\u00e9"}"#
        );
    }

    #[test]
    fn rewrite_keeps_whitespace_and_escaped_ids() {
        let Inbound::Relay(r) = parse(r#"{ "x" : [1, 2], "id" : "b\u0062" , "y":{} }"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.to, "bb");
        assert_eq!(
            r.rewrite("a\n"),
            r#"{ "x" : [1, 2], "id" : "a\n" , "y":{} }"#
        );
        // The rewrite escapes exactly as serde_json does.
        for from in ["plain", "q\"uote", "back\\slash", "ctl\u{1}", "é/\u{7f}"] {
            let mut s = String::new();
            push_json_str(&mut s, from);
            assert_eq!(s, serde_json::to_string(from).unwrap());
        }
    }

    #[test]
    fn duplicate_ids_are_collapsed() {
        let Inbound::Relay(r) = parse(r#"{"id":"b","id":"c","x":1}"#).unwrap() else {
            panic!()
        };
        assert_eq!(r.to, "b");
        assert_eq!(r.rewrite("a"), r#"{"id":"a","x":1}"#);
    }

    #[test]
    fn errors() {
        assert!(matches!(parse("{"), Err(FrameError::InvalidJson(_))));
        assert!(matches!(parse("[1]"), Err(FrameError::NotAnObject)));
        assert!(matches!(parse("\"s\""), Err(FrameError::NotAnObject)));
        assert!(matches!(parse(r#"{"id":5}"#), Err(FrameError::IdNotString)));
        assert!(matches!(parse(r#"{"x":5}"#), Err(FrameError::NoIdNoType)));
        assert!(matches!(
            parse(r#"{"type":"nope"}"#),
            Err(FrameError::BadControl(_))
        ));
        assert!(matches!(
            parse(r#"{"type":"join"}"#),
            Err(FrameError::BadControl(_))
        ));
    }

    #[test]
    fn controls() {
        assert_eq!(
            parse(r#"{"type":"join","room":"x"}"#).map(|i| match i {
                Inbound::Control(c) => Some(c),
                Inbound::Relay(_) => None,
            }),
            Ok(Some(Control::Join { room: "x".into() }))
        );
        let Inbound::Control(Control::Publish { key }) =
            parse(r#"{"type":"publish","topic":"/cam"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(key.topic.as_deref(), Some("/cam"));
    }

    #[test]
    fn garbage_never_panics() {
        for s in [
            "",
            " ",
            "null",
            "{}",
            "{\"id\":null}",
            "{\"id\":\"\"}",
            "{\"type\":1}",
            "\u{0}",
            "{\"id\":\"a\",",
            "{\"type\":\"ping\",\"ts\":\"x\"}",
            "{\"type\":\"publish\"}",
        ] {
            let _ = parse(s);
        }
    }
}
