//! HTTP/1.1 on the API socket: requests read with `httparse`, bodies by `Content-Length`,
//! answered one at a time in the order they came, on one thread that polls the listening
//! socket and every client.
//!
//! Contract: client input is hostile. A request's head is at most [`MAX_HEAD`] bytes and its
//! body at most the payload limit (Firecracker's default, [`DEFAULT_MAX_PAYLOAD`]); chunked
//! bodies are refused; a malformed request gets one 400 reply and the connection is closed.
//! At most [`MAX_CLIENTS`] connections are open: a new one closes the longest idle one, or is
//! turned away when every one is in the middle of a request. A request not complete within
//! [`REQUEST_DEADLINE`] of its first byte is answered 408 and its connection closed, so a slow
//! client holds no slot for long. A client that does not read its reply within
//! [`WRITE_DEADLINE`] is dropped.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use super::ApiResponse;

/// Longest request line plus headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Firecracker's default limit on a request body (`--http-api-max-payload-size`).
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;
/// Most connections open at once.
pub const MAX_CLIENTS: usize = 16;
/// Most headers in a request.
const MAX_HEADERS: usize = 32;
/// How long a request may take to arrive, from its first byte.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client may take to read a reply.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(2);

/// One request read from a client's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpRequest {
    /// The method.
    pub method: String,
    /// The request target.
    pub path: String,
    /// The body (empty without one).
    pub body: Vec<u8>,
    /// The client asked to close the connection after the reply (or spoke HTTP/1.0).
    pub close: bool,
}

/// What the bytes received so far hold.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// Not a whole request yet.
    Partial,
    /// A request, and how many bytes it took.
    Complete(HttpRequest, usize),
    /// Not a request this server takes: the reply, after which the connection closes.
    Refused(ApiResponse),
}

/// Reads the first request in `bytes`, with bodies of at most `max_payload` bytes.
pub fn read_request(bytes: &[u8], max_payload: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(bytes) {
        Ok(httparse::Status::Partial) if bytes.len() > MAX_HEAD => {
            return Parsed::Refused(ApiResponse::fault(
                431,
                format!("Request headers over {MAX_HEAD} bytes."),
            ))
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Parsed::Refused(ApiResponse::fault(
                431,
                format!("Request headers over {MAX_HEAD} bytes."),
            ))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Err(e) => return Parsed::Refused(ApiResponse::bad_request(format!("Invalid HTTP request: {e}."))),
    };
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version) else {
        return Parsed::Refused(ApiResponse::bad_request("Invalid HTTP request."));
    };
    let mut close = version == 0;
    let mut length: Option<usize> = None;
    for header in request.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Refused(ApiResponse::fault(
                501,
                "Transfer-Encoding is not supported: send Content-Length.",
            ));
        }
        if header.name.eq_ignore_ascii_case("connection") {
            close |= value.eq_ignore_ascii_case("close");
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if length.is_none_or(|seen| seen == n) => length = Some(n),
                _ => return Parsed::Refused(ApiResponse::bad_request("Invalid Content-Length.")),
            }
        }
    }
    let length = length.unwrap_or(0);
    if length > max_payload {
        return Parsed::Refused(ApiResponse::fault(
            413,
            format!("Request payload with size {length} is larger than the limit of {max_payload} allowed by server."),
        ));
    }
    let Some(end) = head_len.checked_add(length).filter(|&end| end <= bytes.len()) else {
        return Parsed::Partial;
    };
    let request = HttpRequest {
        method: method.to_string(),
        path: path.to_string(),
        body: bytes[head_len..end].to_vec(),
        close,
    };
    Parsed::Complete(request, end)
}

/// `response` as bytes on the wire.
pub fn encode(response: &ApiResponse, close: bool) -> Vec<u8> {
    let mut head =
        format!("HTTP/1.1 {} {}\r\nServer: samepage\r\n", response.status, reason(response.status));
    if close {
        head.push_str("Connection: close\r\n");
    }
    // A 204 carries no body and no length (RFC 9110).
    if response.status != 204 {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            response.body.as_ref().map_or(0, Vec::len)
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if response.status != 204 {
        bytes.extend_from_slice(response.body.as_deref().unwrap_or_default());
    }
    bytes
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// One open connection.
struct Client {
    stream: UnixStream,
    received: Vec<u8>,
    /// When the first byte of the request being received came (`None` between requests).
    request_started: Option<Instant>,
    /// When it last sent or got anything.
    last_active: Instant,
}

/// Serves the socket until `stop` (an eventfd) becomes readable; each request goes to
/// `answer`. Never returns an error: a failing client is dropped, a failing listener logged.
pub fn serve(
    listener: &UnixListener,
    stop: RawFd,
    max_payload: usize,
    answer: &mut dyn FnMut(HttpRequest) -> ApiResponse,
) {
    let mut clients: Vec<Client> = Vec::new();
    loop {
        let mut fds = vec![
            libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        fds.extend(clients.iter().map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // A second at most: the request deadline is checked at least that often.
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("API socket: poll failed: {e}");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        let now = Instant::now();
        // Clients first (their indices match `fds`), then new connections.
        let mut keep = Vec::with_capacity(clients.len());
        for (client, fd) in clients.drain(..).zip(&fds[2..]) {
            let mut client = client;
            let open = if fd.revents != 0 { serve_client(&mut client, max_payload, answer) } else { true };
            let late = client.request_started.is_some_and(|t| now.duration_since(t) > REQUEST_DEADLINE);
            if open && late {
                let reply = ApiResponse::fault(408, "The request did not arrive in time.");
                let _ = write_reply(&mut client.stream, &encode(&reply, true));
                log::warn!(
                    "API socket: a client took over {} s to send a request; dropped",
                    REQUEST_DEADLINE.as_secs()
                );
            } else if open {
                keep.push(client);
            }
        }
        clients = keep;
        if fds[1].revents != 0 {
            accept_clients(listener, &mut clients);
        }
    }
}

/// Takes every pending connection, making room as the contract says.
fn accept_clients(listener: &UnixListener, clients: &mut Vec<Client>) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("API socket: accept failed: {e}");
                return;
            }
        };
        if clients.len() >= MAX_CLIENTS {
            let idle = clients
                .iter()
                .enumerate()
                .filter(|(_, c)| c.request_started.is_none())
                .min_by_key(|(_, c)| c.last_active)
                .map(|(i, _)| i);
            match idle {
                Some(oldest) => {
                    clients.swap_remove(oldest);
                }
                None => {
                    let mut stream = stream;
                    let busy =
                        ApiResponse::fault(503, format!("{MAX_CLIENTS} connections are busy; try again."));
                    let _ = stream
                        .set_nonblocking(true)
                        .and_then(|()| write_reply(&mut stream, &encode(&busy, true)));
                    log::warn!(
                        "API socket: {MAX_CLIENTS} clients in the middle of requests; one more turned away"
                    );
                    continue;
                }
            }
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("API socket: cannot make a client non-blocking: {e}");
            continue;
        }
        clients.push(Client {
            stream,
            received: Vec::new(),
            request_started: None,
            last_active: Instant::now(),
        });
    }
}

/// Reads what a client sent and answers every whole request in it; false when the connection
/// is to be closed.
fn serve_client(
    client: &mut Client,
    max_payload: usize,
    answer: &mut dyn FnMut(HttpRequest) -> ApiResponse,
) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match client.stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                if client.received.is_empty() {
                    client.request_started = Some(Instant::now());
                }
                client.received.extend_from_slice(&chunk[..n]);
                client.last_active = Instant::now();
                // No request is longer than this: stop reading, the parse refuses it below.
                if client.received.len() > MAX_HEAD + max_payload {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    loop {
        match read_request(&client.received, max_payload) {
            Parsed::Partial if client.received.len() > MAX_HEAD + max_payload => {
                let reply = ApiResponse::fault(413, "Request too large.");
                let _ = write_reply(&mut client.stream, &encode(&reply, true));
                return false;
            }
            Parsed::Partial => return true,
            Parsed::Refused(reply) => {
                log::warn!("API socket: request refused: {}", reply.message());
                let _ = write_reply(&mut client.stream, &encode(&reply, true));
                return false;
            }
            Parsed::Complete(request, used) => {
                client.received.drain(..used);
                client.request_started = (!client.received.is_empty()).then(Instant::now);
                let close = request.close;
                let reply = answer(request);
                if write_reply(&mut client.stream, &encode(&reply, close)).is_err() || close {
                    return false;
                }
                client.last_active = Instant::now();
            }
        }
    }
}

/// Writes `bytes` to a non-blocking client, waiting at most [`WRITE_DEADLINE`] for room.
fn write_reply(stream: &mut UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + WRITE_DEADLINE;
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut fd, 1, left.as_millis().clamp(1, 2000) as i32) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8]) -> (HttpRequest, usize) {
        match read_request(bytes, DEFAULT_MAX_PAYLOAD) {
            Parsed::Complete(request, used) => (request, used),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn refused(bytes: &[u8]) -> u16 {
        match read_request(bytes, DEFAULT_MAX_PAYLOAD) {
            Parsed::Refused(reply) => reply.status,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn requests_are_read_whole_and_one_at_a_time() {
        let two =
            b"PUT /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        let (first, used) = complete(two);
        assert_eq!(
            (first.method.as_str(), first.path.as_str(), first.body.as_slice(), first.close),
            ("PUT", "/vm", &b"{}"[..], false)
        );
        let (second, rest) = complete(&two[used..]);
        assert_eq!((second.path.as_str(), second.close, used + rest), ("/", true, two.len()));
        assert_eq!(
            read_request(b"PUT /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}", DEFAULT_MAX_PAYLOAD),
            Parsed::Partial
        );
        assert_eq!(read_request(b"GET / HTTP/1.1\r\nHost:", DEFAULT_MAX_PAYLOAD), Parsed::Partial);
        assert!(complete(b"GET / HTTP/1.0\r\n\r\n").0.close);
    }

    #[test]
    fn hostile_requests_are_refused_with_a_status() {
        assert_eq!(refused(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"), 413);
        assert_eq!(refused(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), 400);
        assert_eq!(refused(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(refused(b"GET / HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n"), 400);
        assert_eq!(refused(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 501);
        assert_eq!(refused(b"\x00\x01\x02 / HTTP/1.1\r\n\r\n"), 400);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD + 1));
        assert_eq!(refused(&long), 431);
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(refused(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), 400);
    }

    #[test]
    fn replies_carry_their_length_and_a_204_none() {
        let text = String::from_utf8(encode(&ApiResponse::fault(400, "no"), false)).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).expect("body");
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())), "{text}");
        let empty = String::from_utf8(encode(&ApiResponse::no_content(), true)).expect("utf8");
        assert_eq!(empty, "HTTP/1.1 204 No Content\r\nServer: samepage\r\nConnection: close\r\n\r\n");
    }
}
