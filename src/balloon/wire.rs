//! The balloon control socket's messages (`run --balloon-socket PATH`, `samepage balloon`):
//! one JSON object per `SOCK_SEQPACKET` packet each way. A request is
//! `{"op":"status"}` or `{"op":"set_target","bytes":N}`; every request is answered with a
//! [`Reply`]: the balloon's figures after the request, or why it was refused.
//!
//! Contract: [`decode_request`] takes whatever a client sent (any bytes, any length the
//! socket delivered, cut or not) and either returns a well-formed request or says why not;
//! it never panics and reads at most [`MAX_REQUEST`] bytes. Unknown operations and fields are
//! refused, not ignored, so a client never mistakes a request the VMM did not understand for
//! one it carried out.

use super::BalloonMetrics;

/// Longest request read; longer packets are refused whole.
pub const MAX_REQUEST: usize = 256;
/// Longest reply (the figures with every statistic are about 1.5 KiB).
pub const MAX_REPLY: usize = 16 * 1024;

/// What a control client asks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The balloon's figures. (Braces: serde refuses unknown fields only in struct
    /// variants; a unit variant would take `{"op":"status","bytes":1}` silently.)
    Status {},
    /// Ask the guest to give up `bytes` of its RAM (whole 4 KiB pages, at most guest RAM; 0
    /// gives it all back); answered with the figures.
    SetTarget {
        /// The new target.
        bytes: u64,
    },
}

/// The answer to every request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// Why the request was refused; `None` when it was carried out.
    #[serde(default)]
    pub error: Option<String>,
    /// The balloon's figures after the request (also when it was refused, unless it could
    /// not be read at all).
    #[serde(default)]
    pub balloon: Option<BalloonMetrics>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The packet was empty.
    #[error("empty request")]
    Empty,
    /// The packet was longer than [`MAX_REQUEST`].
    #[error("request of {0} bytes is longer than {MAX_REQUEST}")]
    TooLong(usize),
    /// The packet carried descriptors or other ancillary data.
    #[error("request carried ancillary data (descriptors are not taken)")]
    Ancillary,
    /// Not one of the requests.
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// Reads a request of `len` bytes on the wire, the first `min(len, buf.len())` of which are
/// in `buf`.
pub fn decode_request(buf: &[u8], len: usize, ancillary: bool) -> Result<Request, RequestError> {
    if ancillary {
        return Err(RequestError::Ancillary);
    }
    if len == 0 {
        return Err(RequestError::Empty);
    }
    if len > MAX_REQUEST || len > buf.len() {
        return Err(RequestError::TooLong(len));
    }
    let text = buf.get(..len).ok_or(RequestError::TooLong(len))?;
    // serde_json's message names the position and what it expected, never the input's bytes
    // beyond a short excerpt; escape it anyway, as it ends up in a log line.
    serde_json::from_slice(text).map_err(|e| RequestError::Malformed(crate::escape_controls(&e.to_string())))
}

/// A request as sent.
pub fn encode_request(request: &Request) -> Vec<u8> {
    // A Request holds an enum tag and a number: it always encodes.
    serde_json::to_vec(request).unwrap_or_default()
}

/// A reply as sent: at most [`MAX_REPLY`] bytes (the figures are left out of one that would
/// be longer, which no real reply is).
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let bytes = serde_json::to_vec(reply).unwrap_or_default();
    if !bytes.is_empty() && bytes.len() <= MAX_REPLY {
        return bytes;
    }
    let short = Reply { error: Some("reply too long".into()), balloon: None };
    serde_json::to_vec(&short).unwrap_or_default()
}

/// Reads a reply (the client's side).
pub fn decode_reply(buf: &[u8]) -> Result<Reply, serde_json::Error> {
    serde_json::from_slice(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &[u8]) -> Result<Request, RequestError> {
        decode_request(text, text.len(), false)
    }

    #[test]
    fn the_two_requests_decode_and_encode() {
        assert_eq!(decode(br#"{"op":"status"}"#), Ok(Request::Status {}));
        assert_eq!(
            decode(br#" {"op" : "set_target", "bytes": 67108864}"#),
            Ok(Request::SetTarget { bytes: 64 << 20 })
        );
        assert_eq!(decode(br#"{"bytes":0,"op":"set_target"}"#), Ok(Request::SetTarget { bytes: 0 }));
        for r in [Request::Status {}, Request::SetTarget { bytes: u64::MAX }] {
            let bytes = encode_request(&r);
            assert_eq!(decode(&bytes), Ok(r));
        }
    }

    #[test]
    fn hostile_requests_are_refused_with_a_reason() {
        let malformed = [
            &b""[..],
            b"{}",
            b"null",
            b"[]",
            b"\"status\"",
            b"status",
            br#"{"op":"Status"}"#,
            br#"{"op":"status","bytes":1}"#,
            br#"{"op":"set_target"}"#,
            br#"{"op":"set_target","bytes":-1}"#,
            br#"{"op":"set_target","bytes":1.5}"#,
            br#"{"op":"set_target","bytes":"64M"}"#,
            br#"{"op":"set_target","bytes":18446744073709551616}"#,
            br#"{"op":"set_target","bytes":1,"bytes":2}"#,
            br#"{"op":"set_target","bytes":1,"extra":true}"#,
            br#"{"op":"reboot"}"#,
            br#"{"op":"status"} {"op":"status"}"#,
            b"{\"op\":\"stat\xffus\"}",
            b"\x00\x01\x02",
            br#"{"op":"status""#,
        ];
        for text in malformed {
            let got = decode(text);
            assert!(got.is_err(), "{:?} accepted as {got:?}", String::from_utf8_lossy(text));
        }
        assert_eq!(decode(b""), Err(RequestError::Empty));
        let long = vec![b' '; MAX_REQUEST + 1];
        assert_eq!(decode(&long), Err(RequestError::TooLong(MAX_REQUEST + 1)));
        // A packet cut by the receive buffer: its length on the wire says so.
        assert_eq!(
            decode_request(br#"{"op":"status"}"#, 100_000, false),
            Err(RequestError::TooLong(100_000))
        );
        assert_eq!(decode_request(br#"{"op":"status"}"#, 15, true), Err(RequestError::Ancillary));
    }

    #[test]
    fn replies_go_through_the_wire_and_stay_short() {
        let reply = Reply { error: None, balloon: Some(BalloonMetrics::default()) };
        let bytes = encode_reply(&reply);
        assert!(bytes.len() < MAX_REPLY);
        assert_eq!(decode_reply(&bytes).unwrap(), reply);
        let refused = Reply { error: Some("no".into()), balloon: None };
        assert_eq!(decode_reply(&encode_reply(&refused)).unwrap(), refused);
        let huge = Reply { error: Some("x".repeat(MAX_REPLY)), balloon: None };
        let bytes = encode_reply(&huge);
        assert!(bytes.len() <= MAX_REPLY);
        assert_eq!(decode_reply(&bytes).unwrap().error.as_deref(), Some("reply too long"));
    }
}
