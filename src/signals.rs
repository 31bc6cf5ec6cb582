//! Stop signals ([`STOP_SIGNALS`]: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2,
//! SIGALRM): blocked in every thread and taken by one thread with `sigwait`, which stops every
//! VM of the process that watches for them. A VM stopped that way ends like any other stop: the terminal is restored,
//! the guest's memory released, and the process exits with 128 + the signal number.
//!
//! The same thread takes the signal the kernel sends when a shared image's read lease breaks
//! ([`crate::lease`]), blocked in every thread too, and hands its descriptor on.
//!
//! No asynchronous handler runs, so the stop path may lock, allocate and log.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::bus::lock;
use crate::seccomp::{SeccompError, ThreadKind};
use crate::signal_numbers::{lease_signal, STOP_SIGNALS};
use crate::stop::{VmExit, VmStop};

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

/// The stop signals and the lease signal.
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for num in STOP_SIGNALS.into_iter().chain([lease_signal()]) {
        // SAFETY: as above; `num` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, num) };
    }
    set
}

/// Blocks the stop signals and the lease signal in the calling thread (and so in every thread
/// it starts later) and starts the thread that waits for them, under its seccomp filter. Call
/// it from `main` before any other thread starts; later calls return the first call's result.
pub fn install() -> Result<(), &'static SignalsError> {
    let result = INSTALLED.get_or_init(|| {
        let alone = threads() == Some(1);
        let set = signal_set();
        // SAFETY: `set` is initialized; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SignalsError::Block(std::io::Error::from_raw_os_error(rc)));
        }
        crate::seccomp::spawn("signals".into(), ThreadKind::Signals, move || wait_for_signals(set))?;
        // Blocked while the process had one thread, the signals are blocked in every thread,
        // and only the signal thread takes them.
        if alone {
            crate::lease::set_routed();
        }
        Ok(())
    });
    result.as_ref().map(|_| ())
}

/// The process's threads now (`None` if `/proc` cannot tell).
fn threads() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(Iterator::count)
}

/// `siginfo_t` as the kernel fills it for SIGPOLL-like signals (`_sigpoll` in `<signal.h>`:
/// after `si_signo`, `si_errno`, `si_code` and padding to 8 bytes, `long si_band; int si_fd`).
#[repr(C)]
struct SigPoll {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    band: libc::c_long,
    fd: libc::c_int,
}

const _: () = assert!(size_of::<SigPoll>() <= size_of::<libc::siginfo_t>());

fn wait_for_signals(set: libc::sigset_t) {
    let lease = lease_signal();
    loop {
        // SAFETY: siginfo_t is plain data, filled in by sigwaitinfo.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` holds signals blocked in this thread; `info` is ours to write.
        let num = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if num < 0 {
            continue;
        }
        if num == lease {
            // SAFETY: `SigPoll` is a prefix of `siginfo_t` (checked above) of plain integers,
            // and `info` is aligned for both.
            let poll = unsafe { &*(&info as *const libc::siginfo_t as *const SigPoll) };
            // Only the kernel's (si_code > 0) carries a descriptor; kill or sigqueue from a
            // process would name one of its choosing.
            if poll.code > 0 {
                crate::lease::broken(poll.fd);
            } else {
                log::warn!(
                    "ignoring signal {num} sent by a process (si_code {}): it is samepage's lease signal",
                    poll.code
                );
            }
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
