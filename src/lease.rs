//! Read leases on shared read-only images (`docs/fphash.md`, "Read-only images").
//!
//! A guest page that maps an image page `MAP_PRIVATE` shows the file's current bytes until the
//! guest writes it, and faults once the file is truncated below it. So samepage shares an image
//! only while it holds a read lease on its descriptor (`fcntl(F_SETLEASE, F_RDLCK)`): another
//! process's `open` for writing, or a `truncate`, then waits while the kernel tells samepage,
//! with [`lease_signal`] (`F_SETSIG`, so the signal carries the descriptor in `si_fd`). The
//! signal thread ([`crate::signals`]) hands the descriptor to [`broken`], which queues it in the
//! inbox of the VM that holds it and wakes that VM's event loop; the loop copies the VM's pages
//! of the image into its own memory and releases the lease ([`release`]), and the writer goes
//! on.
//!
//! The kernel sends the signal to the process, to any thread that does not block it; an
//! unblocked real-time signal with no handler ends the process. So leases are taken only when
//! every thread blocks the signal: [`crate::signals::install`] blocked it before any other
//! thread started, and said so ([`set_routed`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::lock;
use crate::signal_numbers::lease_signal;

/// Whether the lease signal reaches the signal thread alone ([`set_routed`]).
static ROUTED: AtomicBool = AtomicBool::new(false);

/// Says that the lease signal reaches the signal thread alone: [`crate::signals::install`]
/// blocked it while the process had no other thread, and that thread hands each break to
/// [`broken`]. No lease is taken before: a lease signal that some thread does not block would
/// end the process.
pub fn set_routed() {
    ROUTED.store(true, Ordering::SeqCst);
}

/// Why an image cannot be leased (it is then copied, not shared).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Some thread of the process may not block the lease signal (samepage used as a library
    /// without [`crate::signals::install`] first in `main`).
    #[error("the lease signal does not reach samepage's signal thread alone")]
    NotRouted,
    /// `fcntl(F_SETSIG)` failed.
    #[error("fcntl(F_SETSIG) failed")]
    SetSig(#[source] io::Error),
    /// `fcntl(F_SETLEASE, F_RDLCK)` failed: EAGAIN when the file is open for writing somewhere,
    /// EACCES when samepage is neither its owner nor has CAP_LEASE.
    #[error("no read lease (fcntl(F_SETLEASE, F_RDLCK) failed)")]
    SetLease(#[source] io::Error),
}

/// `F_SETSIG` (`<asm-generic/fcntl.h>`), which the libc crate does not name: the signal the
/// kernel sends for the descriptor's leases, with `si_fd` set.
const F_SETSIG: libc::c_int = 10;

fn fcntl(fd: RawFd, command: libc::c_int, arg: libc::c_int) -> io::Result<()> {
    // SAFETY: F_SETSIG and F_SETLEASE take an int argument and touch no memory of ours.
    if unsafe { libc::fcntl(fd, command, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes a read lease on `file` (open read-only), broken by [`lease_signal`]. The lease lasts
/// until [`release`] or until the file's last descriptor is closed.
pub fn take(file: &File) -> Result<(), LeaseError> {
    if !ROUTED.load(Ordering::SeqCst) {
        return Err(LeaseError::NotRouted);
    }
    let fd = file.as_raw_fd();
    // The signal first: a lease that broke at once must not raise SIGIO, which ends the process.
    fcntl(fd, F_SETSIG, lease_signal()).map_err(LeaseError::SetSig)?;
    fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK).map_err(LeaseError::SetLease)
}

/// Gives up the lease on `fd`: a writer waiting for it goes on.
pub fn release(fd: RawFd) -> io::Result<()> {
    fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK)
}

/// Where the broken leases of one VM's images wait for its event loop.
pub struct LeaseInbox {
    /// Descriptors whose lease broke, not yet handled.
    pending: Mutex<Vec<RawFd>>,
    /// Wakes the VM's event loop.
    wake: EventFd,
}

/// Every inbox of the process, by descriptor (dead entries are the VMs' that ended).
static INBOXES: Mutex<Vec<(RawFd, Weak<LeaseInbox>)>> = Mutex::new(Vec::new());

impl LeaseInbox {
    /// An empty inbox.
    pub fn new() -> io::Result<Arc<LeaseInbox>> {
        Ok(Arc::new(LeaseInbox { pending: Mutex::new(Vec::new()), wake: EventFd::new(EFD_NONBLOCK)? }))
    }

    /// Routes the breaks of the lease on `fd` here, for as long as this inbox lives.
    pub fn register(self: &Arc<Self>, fd: RawFd) {
        let mut inboxes = lock(&INBOXES);
        // A descriptor number of a VM that ended may be reused: the newest holder wins.
        inboxes.retain(|(f, inbox)| *f != fd && inbox.strong_count() > 0);
        inboxes.push((fd, Arc::downgrade(self)));
    }

    /// The eventfd that becomes readable when a lease broke.
    pub fn event(&self) -> &EventFd {
        &self.wake
    }

    /// The descriptors whose lease broke since the last call.
    pub fn take(&self) -> Vec<RawFd> {
        let _ = self.wake.read();
        std::mem::take(&mut *lock(&self.pending))
    }
}

/// The lease on `fd` is breaking (the signal thread calls this): queues it for the VM that
/// holds it and wakes that VM's event loop.
pub fn broken(fd: RawFd) {
    let inbox = lock(&INBOXES).iter().find(|(f, _)| *f == fd).and_then(|(_, inbox)| inbox.upgrade());
    let Some(inbox) = inbox else {
        // The VM ended: its descriptor closes with it, and the lease with the descriptor.
        log::info!("lease signal for descriptor {fd}, which no running VM holds");
        return;
    };
    lock(&inbox.pending).push(fd);
    if let Err(e) = inbox.wake.write(1) {
        log::error!("cannot wake the VM whose image lease broke (descriptor {fd}): {e}");
    }
}
