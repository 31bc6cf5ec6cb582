//! Stop signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM): blocked in every
//! thread and taken by one thread with `sigwait`, which stops every VM of the process that
//! watches for them. A VM stopped that way ends like any other stop: the terminal is restored,
//! the guest's memory released, and the process exits with 128 + the signal number.
//!
//! No asynchronous handler runs, so the stop path may lock, allocate and log.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::bus::lock;
use crate::seccomp::{SeccompError, ThreadKind};
use crate::stop::{VmExit, VmStop};

/// The signals that stop a VM.
pub const STOP_SIGNALS: [libc::c_int; 7] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGALRM];

/// The first stop signal received, 0 before.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Who to stop when one arrives.
static WATCHERS: Mutex<Vec<Weak<VmStop>>> = Mutex::new(Vec::new());
static INSTALLED: OnceLock<Result<(), SignalsError>> = OnceLock::new();

/// Why the stop signals cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    /// `pthread_sigmask` failed.
    #[error("cannot block the stop signals")]
    Block(#[source] std::io::Error),
    /// The thread that takes them did not start (or not under its filter).
    #[error(transparent)]
    Thread(#[from] SeccompError),
}

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for num in STOP_SIGNALS {
        // SAFETY: as above; `num` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, num) };
    }
    set
}

/// Blocks the stop signals in the calling thread (and so in every thread it starts later) and
/// starts the thread that waits for them, under its seccomp filter. Call it from `main` before
/// any other thread starts; later calls return the first call's result.
pub fn install() -> Result<(), &'static SignalsError> {
    let result = INSTALLED.get_or_init(|| {
        let set = stop_set();
        // SAFETY: `set` is initialized; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SignalsError::Block(std::io::Error::from_raw_os_error(rc)));
        }
        crate::seccomp::spawn("signals".into(), ThreadKind::Signals, move || wait_for_signals(set))?;
        Ok(())
    });
    result.as_ref().map(|_| ())
}

fn wait_for_signals(set: libc::sigset_t) {
    loop {
        let mut num: libc::c_int = 0;
        // SAFETY: `set` holds signals blocked in this thread; `num` is ours to write.
        if unsafe { libc::sigwait(&set, &mut num) } != 0 {
            continue;
        }
        let _ = RECEIVED.compare_exchange(0, num, Ordering::SeqCst, Ordering::SeqCst);
        log::info!("signal {num}: stopping");
        let mut watchers = lock(&WATCHERS);
        watchers.retain(|w| match w.upgrade() {
            Some(stop) => {
                stop.request(VmExit::Signal(num));
                true
            }
            None => false,
        });
    }
}

/// Stops `stop` when a stop signal arrives (at once if one already did).
pub fn watch(stop: &Arc<VmStop>) {
    lock(&WATCHERS).push(Arc::downgrade(stop));
    if let Some(num) = received() {
        stop.request(VmExit::Signal(num));
    }
}

/// The first stop signal received so far, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        num => Some(num),
    }
}
