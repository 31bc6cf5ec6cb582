//! The API socket's request reading (`src/api/http.rs`) and routing (`src/api/routes.rs`):
//! the input is what a client sent on one connection, requests read from it one after the
//! other as the server does, each routed, and each refusal encoded as the reply it gets.
//!
//! Checked: a request read takes at least one byte and no more than there are, has a body
//! within the payload limit, and none of its strict prefixes reads as a whole request (the
//! server never answers half a request); a refusal is a 4xx or 5xx whose reply states its own
//! length; routing never panics and its messages carry no control character a client sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use samepage::api::http::{encode, read_request, Parsed, DEFAULT_MAX_PAYLOAD};
use samepage::api::routes;

/// A small limit too, so that bodies over it are reached.
const LIMITS: [usize; 2] = [DEFAULT_MAX_PAYLOAD, 16];

fn check_reply(reply: &samepage::api::ApiResponse) {
    let bytes = encode(reply, true);
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    if reply.status != 204 {
        // Every header line ends with CRLF; the split took the last one's.
        let head = format!("{head}\r\n");
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{text}");
    } else {
        assert!(body.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    for limit in LIMITS {
        let mut rest = data;
        for _ in 0..64 {
            match read_request(rest, limit) {
                Parsed::Partial => break,
                Parsed::Refused(reply) => {
                    assert!((400..600).contains(&reply.status), "{reply:?}");
                    check_reply(&reply);
                    break;
                }
                Parsed::Complete(request, used) => {
                    assert!(used > 0 && used <= rest.len());
                    assert!(request.body.len() <= limit);
                    for cut in [used / 2, used - 1] {
                        assert!(
                            !matches!(read_request(&rest[..cut], limit), Parsed::Complete(..)),
                            "{cut} of {used} bytes read as a whole request"
                        );
                    }
                    if let Err(e) = routes::parse(&request.method, &request.path, &request.body) {
                        let message = e.to_string();
                        assert!(!message.chars().any(|c| c.is_control()), "{message:?}");
                        check_reply(&samepage::api::ApiResponse::bad_request(message));
                    }
                    rest = &rest[used..];
                }
            }
        }
    }
});
