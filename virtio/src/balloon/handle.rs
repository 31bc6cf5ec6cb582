//! The VMM's side of a balloon: [`BalloonHandle`], and the state it shares with the device.
//!
//! Contract: the handle may be used from any thread while the device sits in its transport
//! (behind the transport's lock, which the handle never takes). What crosses between them is
//! atomics and one mutex around plain data: the target and `actual`, whether the driver is
//! running, the statsq's index and a pending statistics request, the latest statistics, the
//! counters, and the interrupt both raise.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::warn;

use super::{BalloonCounters, BalloonCountersSnapshot, GuestMemoryStats};
use crate::interrupt::{InterruptKind, InterruptTrigger};
use crate::should_log;

/// `stats_queue` when no statsq is in use.
pub(super) const NO_QUEUE: u32 = u32::MAX;

/// State the device shares with its [`BalloonHandle`]s.
pub(super) struct Shared {
    /// `num_pages`, set by the VMM.
    pub(super) target: AtomicU32,
    /// `actual`, written by the driver.
    pub(super) actual: AtomicU32,
    /// The driver set DRIVER_OK and the device accepted it (cleared by a reset).
    pub(super) active: AtomicBool,
    /// Index of the statsq while one is in use, else [`NO_QUEUE`].
    pub(super) stats_queue: AtomicU32,
    /// The VMM asked for statistics; the statsq's next service returns the held buffer.
    pub(super) stats_requested: AtomicBool,
    /// The latest statistics, `None` before the first buffer or after a reset.
    pub(super) guest_stats: Mutex<Option<GuestMemoryStats>>,
    pub(super) counters: BalloonCounters,
    pub(super) interrupt: Arc<dyn InterruptTrigger>,
}

impl Shared {
    /// The state of a device that has not met its driver yet, with a target of 0.
    pub(super) fn new(interrupt: Arc<dyn InterruptTrigger>) -> Shared {
        Shared {
            target: AtomicU32::new(0),
            actual: AtomicU32::new(0),
            active: AtomicBool::new(false),
            stats_queue: AtomicU32::new(NO_QUEUE),
            stats_requested: AtomicBool::new(false),
            guest_stats: Mutex::new(None),
            counters: BalloonCounters::default(),
            interrupt,
        }
    }

    pub(super) fn stats(&self) -> MutexGuard<'_, Option<GuestMemoryStats>> {
        // Only plain data is behind the lock: a panic elsewhere cannot leave it half-written
        // in a way that matters.
        self.guest_stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The VMM's side of a balloon: cheap to clone, usable from any thread while the device sits
/// in its transport.
#[derive(Clone)]
pub struct BalloonHandle {
    pub(super) shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Sets `num_pages`, the number of 4 KiB pages the guest should give up, and, if the
    /// value changed and the driver is running, raises the configuration-change interrupt
    /// (§5.5.6: the driver re-reads `num_pages` then). A driver that starts later reads it
    /// during its initialization. The device does not cap the value: the VMM should keep it
    /// below guest RAM.
    pub fn set_target_pages(&self, pages: u32) {
        let old = self.shared.target.swap(pages, Ordering::SeqCst);
        if old == pages || !self.shared.active.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.shared.interrupt.trigger(InterruptKind::ConfigChange) {
            let n = BalloonCounters::add(&self.shared.counters.interrupt_errors, 1);
            if should_log(n) {
                warn!("virtio-balloon: cannot signal the new target: {e} ({n} failures)");
            }
        }
    }

    /// The target, `num_pages`.
    pub fn target_pages(&self) -> u32 {
        self.shared.target.load(Ordering::SeqCst)
    }

    /// `actual` as the driver last wrote it: pages in the balloon (0 before the driver
    /// writes it and after a reset). The guest's word, not a measure.
    pub fn actual_pages(&self) -> u32 {
        self.shared.actual.load(Ordering::SeqCst)
    }

    /// Asks for fresh statistics (call it every `stats` seconds). Returns the statsq's index,
    /// which the VMM passes to `MmioTransport::notify` on its event-loop thread: serving the
    /// statsq reads any buffer the driver added and returns the held one, which makes the
    /// driver refill it (§5.5.6.3). `None` when no statsq is in use (not offered, not
    /// negotiated, or the driver is not running). A request that finds no buffer held (the
    /// driver is still refilling) is dropped.
    ///
    /// The first call after the driver starts also picks up the driver's first buffer, which
    /// Linux adds before DRIVER_OK, when the transport ignores notifications.
    pub fn request_stats(&self) -> Option<u32> {
        let queue = self.shared.stats_queue.load(Ordering::SeqCst);
        if queue == NO_QUEUE {
            return None;
        }
        self.shared.stats_requested.store(true, Ordering::SeqCst);
        Some(queue)
    }

    /// The guest's latest memory statistics; `None` before its first statistics buffer.
    pub fn guest_stats(&self) -> Option<GuestMemoryStats> {
        *self.shared.stats()
    }

    /// The device's counters.
    pub fn counters(&self) -> BalloonCountersSnapshot {
        self.shared.counters.snapshot()
    }
}
