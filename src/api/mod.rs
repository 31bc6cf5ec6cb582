//! Firecracker's HTTP API on a Unix socket (`run --api-sock PATH`, `firecracker --api-sock`;
//! docs/firecracker-compat.md, "The API"): a thread of its own, under its own seccomp filter,
//! reads requests ([`http`]) and turns them into [`routes::ApiRequest`]s, which it hands to
//! the thread that owns the VM as [`ApiCall`]s and answers with what comes back: before the
//! VM starts the main thread configures it ([`preboot`], [`resources`]), afterwards the VMM
//! thread answers between its other work (`vmm/api_calls.rs`).
//!
//! Contract: the socket is bound (mode 0600: its owner and root may connect) before any
//! filter and removed when the server stops; one request is answered at a time, in the order
//! they came; the owner's answer comes back within [`ANSWER_WAIT`] or the client gets a 503
//! and the owner's late answer is dropped. Client input is hostile: see [`http`] and
//! [`routes`].

pub mod http;
pub mod preboot;
pub mod resources;
pub mod routes;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::ThreadKind;
use crate::socket_file::SocketFileError;
use crate::stop::VmStop;
use routes::ApiRequest;

/// How long the API thread waits for the owner of the VM to answer one request (a snapshot
/// of a large VM, or a VM's build, takes a while).
pub const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Pending connections the kernel queues.
const BACKLOG: i32 = 16;

/// How often a thread waiting for calls before the VM starts looks for a stop signal.
const STOP_POLL: Duration = Duration::from_millis(100);

/// A reply: its status and its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body (none for 204).
    pub body: Option<Vec<u8>>,
}

impl ApiResponse {
    /// 204: done.
    pub fn no_content() -> ApiResponse {
        ApiResponse { status: 204, body: None }
    }

    /// 200 with `value` as JSON.
    pub fn json(value: &impl serde::Serialize) -> ApiResponse {
        match serde_json::to_vec(value) {
            Ok(body) => ApiResponse { status: 200, body: Some(body) },
            Err(e) => ApiResponse::fault(500, format!("cannot write the reply: {e}")),
        }
    }

    /// `status` with Firecracker's error body, `{"fault_message": message}`.
    pub fn fault(status: u16, message: impl std::fmt::Display) -> ApiResponse {
        let body = serde_json::json!({ "fault_message": message.to_string() });
        ApiResponse { status, body: Some(body.to_string().into_bytes()) }
    }

    /// 400 with `message`.
    pub fn bad_request(message: impl std::fmt::Display) -> ApiResponse {
        ApiResponse::fault(400, message)
    }

    /// The fault message, for logs (empty when there is none).
    pub fn message(&self) -> String {
        self.body
            .as_deref()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
            .and_then(|v| v.get("fault_message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_default()
    }
}

/// A request handed to the owner of the VM, with where its answer goes.
pub struct ApiCall {
    /// What the client asked.
    pub request: ApiRequest,
    reply: SyncSender<ApiResponse>,
}

impl ApiCall {
    /// Answers the call (the client may have been given up on: then nothing happens).
    pub fn answer(self, response: ApiResponse) {
        let _ = self.reply.send(response);
    }
}

/// The owner's end: the calls clients made, in order.
pub struct ApiInbox {
    calls: Receiver<ApiCall>,
}

impl ApiInbox {
    /// Waits for the next call while `stop` has not been asked to stop (a stop signal);
    /// `None` then, or once the server has stopped.
    pub fn next_unless_stopped(&self, stop: &VmStop) -> Option<ApiCall> {
        while !stop.is_stopped() {
            match self.calls.recv_timeout(STOP_POLL) {
                Ok(call) => return Some(call),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
        None
    }

    /// The next call if one is waiting.
    pub fn try_next(&self) -> Option<ApiCall> {
        self.calls.try_recv().ok()
    }
}

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The path is taken, or the socket could not be bound there.
    #[error("API socket")]
    Claim(#[source] SocketFileError),
    /// Binding or listening failed.
    #[error("cannot {what} the API socket {}", .path.display())]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The thread could not start under its filter.
    #[error(transparent)]
    Thread(#[from] crate::seccomp::SeccompError),
}

/// The bound, listening API socket.
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    /// Binds and listens at `path` (mode 0600), taking over a socket nobody answers on.
    pub fn bind(path: &Path) -> Result<ApiSocket, ApiError> {
        if crate::socket_file::claim(path, |p| UnixStream::connect(p).map(drop)).map_err(ApiError::Claim)? {
            log::info!("took over the stale API socket {}", path.display());
        }
        // Mode 0600 before it listens: the API is its owner's.
        let fd =
            crate::socket_file::bind_private(path, libc::SOCK_STREAM, BACKLOG).map_err(ApiError::Claim)?;
        Ok(ApiSocket { listener: UnixListener::from(fd), path: path.to_path_buf() })
    }

    /// Serves the socket on thread `api` (under its seccomp filter) until the returned
    /// server is stopped or dropped; calls go to the returned inbox, and `wake` is nudged for
    /// each, so a VMM thread waiting on it looks.
    pub fn serve(self, wake: Arc<VmStop>) -> Result<(ApiServer, ApiInbox), ApiError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|source| ApiError::Socket {
            what: "make the stop eventfd of",
            path: self.path.clone(),
            source,
        })?;
        let stop_fd = stop.try_clone().map_err(|source| ApiError::Socket {
            what: "make the stop eventfd of",
            path: self.path.clone(),
            source,
        })?;
        let (calls_tx, calls) = mpsc::channel();
        let (done_tx, done) = mpsc::channel::<()>();
        let thread = crate::seccomp::spawn("api".into(), ThreadKind::Api, move || {
            let _done = done_tx;
            let mut answer = |request| forward(&calls_tx, &wake, request);
            http::serve(&self.listener, stop_fd.as_raw_fd(), http::DEFAULT_MAX_PAYLOAD, &mut answer);
            // The socket file goes with the thread (`Drop`): nothing answers on it any more.
            drop(self);
        })?;
        Ok((ApiServer { stop, thread: Some(thread), done }, ApiInbox { calls }))
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Hands one request to the owner and waits for its answer.
fn forward(calls: &Sender<ApiCall>, wake: &VmStop, request: http::HttpRequest) -> ApiResponse {
    let request = match routes::parse(&request.method, &request.path, &request.body) {
        Ok(request) => request,
        Err(e) => {
            log::warn!("API: {e}");
            return ApiResponse::bad_request(e);
        }
    };
    let (reply, answer) = mpsc::sync_channel(1);
    if calls.send(ApiCall { request, reply }).is_err() {
        return ApiResponse::fault(503, "The VM is stopping.");
    }
    wake.nudge();
    match answer.recv_timeout(ANSWER_WAIT) {
        Ok(response) => response,
        Err(RecvTimeoutError::Timeout) => {
            ApiResponse::fault(503, format!("No answer within {} s: the VMM is busy.", ANSWER_WAIT.as_secs()))
        }
        Err(RecvTimeoutError::Disconnected) => ApiResponse::fault(503, "The VM is stopping."),
    }
}

/// The running API thread.
pub struct ApiServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    done: Receiver<()>,
}

impl ApiServer {
    /// Stops the thread and waits for it until `deadline`; false when it did not end by then
    /// (it is left behind, in the middle of a request).
    pub fn stop(mut self, deadline: Instant) -> bool {
        let _ = self.stop.write(1);
        let left = deadline.saturating_duration_since(Instant::now());
        match self.done.recv_timeout(left) {
            Err(RecvTimeoutError::Timeout) => false,
            _ => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
                true
            }
        }
    }
}
