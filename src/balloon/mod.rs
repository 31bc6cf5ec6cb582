//! The VMM's half of virtio-balloon (`docs/balloon.md`): the `--balloon` options
//! ([`crate::balloon_options`]), the backend that gives the guest's freed and inflated pages back to the host
//! through the VM's dedup domain ([`backend`]), the statistics timer (which also hands the
//! guest's statistics on for the broker's `status`), the figures `--metrics` and the control
//! socket show ([`BalloonMetrics`]), and the control socket itself
//! ([`control`], with its messages in [`wire`] and the `samepage balloon` client in
//! [`client`]).
//!
//! Contract: a [`VmBalloon`] is the VMM's one view of a VM's balloon, safe to share between
//! threads: it sets the target (checked against guest RAM), asks for statistics on the event
//! loop's schedule and reads every figure. Whatever a guest or a control client sends is
//! checked before it changes anything, and what is refused is counted.

pub mod backend;
pub mod client;
pub mod control;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use samepage_virtio::balloon::{BalloonCountersSnapshot, BalloonHandle, GuestMemoryStats};
use samepage_virtio::{MmioTransport, PAGE_SIZE};

pub use crate::balloon_options::BalloonOptions;
use crate::broker_wire::guest_stats;
use crate::broker_wire::proto::GuestStats;
use crate::bus::lock;
use crate::devices::virtio_mmio::Periodic;

/// The host's side of a balloon: what it did with the pages, and what control clients asked.
/// Written by the backend (on the event loop) and the control thread; read for the figures.
#[derive(Debug, Default)]
pub struct HostCounters {
    /// Calls of the backend's discard (one per chain that named pages).
    pub discards: AtomicU64,
    /// Pages the dedup domain gave back to the host (`Domain::discard`).
    pub discarded_pages: AtomicU64,
    /// Discards that failed (the pages stay the guest's, at a cost in host memory only).
    pub discard_failures: AtomicU64,
    /// Time spent giving pages back, in µs (the guest waits for it on each chain).
    pub discard_us: AtomicU64,
    /// Pages the guest took back from the balloon (deflateq): nothing to do, counted.
    pub reclaimed_pages: AtomicU64,
    /// Targets a control client set.
    pub target_changes: AtomicU64,
    /// Control requests answered.
    pub control_requests: AtomicU64,
    /// Control requests refused (malformed, too long, a target out of range).
    pub control_rejected: AtomicU64,
    /// Sets of guest statistics not handed on to the broker: a memory size beyond guest RAM,
    /// or more free than total (`broker_wire::guest_stats::check`).
    pub stats_refused: AtomicU64,
}

/// A plain copy of [`HostCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostCountersSnapshot {
    /// See [`HostCounters::discards`].
    pub discards: u64,
    /// See [`HostCounters::discarded_pages`].
    pub discarded_pages: u64,
    /// See [`HostCounters::discard_failures`].
    pub discard_failures: u64,
    /// See [`HostCounters::discard_us`].
    pub discard_us: u64,
    /// See [`HostCounters::reclaimed_pages`].
    pub reclaimed_pages: u64,
    /// See [`HostCounters::target_changes`].
    pub target_changes: u64,
    /// See [`HostCounters::control_requests`].
    pub control_requests: u64,
    /// See [`HostCounters::control_rejected`].
    pub control_rejected: u64,
    /// See [`HostCounters::stats_refused`].
    #[serde(default)]
    pub stats_refused: u64,
}

impl HostCounters {
    /// Adds `n` to `counter`; returns the new count.
    pub fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed).wrapping_add(n)
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> HostCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HostCountersSnapshot {
            discards: get(&self.discards),
            discarded_pages: get(&self.discarded_pages),
            discard_failures: get(&self.discard_failures),
            discard_us: get(&self.discard_us),
            reclaimed_pages: get(&self.reclaimed_pages),
            target_changes: get(&self.target_changes),
            control_requests: get(&self.control_requests),
            control_rejected: get(&self.control_rejected),
            stats_refused: get(&self.stats_refused),
        }
    }
}

/// A balloon's figures: in `--metrics` (`balloon`) and in the control socket's answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonMetrics {
    /// The options it was created with, as `--balloon` takes them.
    pub options: String,
    /// Guest RAM: the most the target may be.
    pub guest_ram_bytes: u64,
    /// The target the guest is asked to give up (`num_pages` × 4 KiB).
    pub target_bytes: u64,
    /// What the guest says its balloon holds (`actual` × 4 KiB): its word, not a measure.
    pub actual_bytes: u64,
    /// The guest's latest memory statistics (with `stats=SECS`; `None` before the first).
    pub guest_stats: Option<GuestMemoryStats>,
    /// The device's counters: requests, pages and every rejection of guest input.
    pub device: BalloonCountersSnapshot,
    /// What the host did with the pages, and the control socket's requests.
    pub host: HostCountersSnapshot,
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not a whole number of 4 KiB pages.
    #[error("target {0} bytes is not a whole number of 4 KiB pages")]
    Unaligned(u64),
    /// More than the guest has.
    #[error("target {target} bytes is more than the guest's {ram} bytes of RAM")]
    TooLarge {
        /// The target asked for.
        target: u64,
        /// Guest RAM.
        ram: u64,
    },
}

/// The VMM's view of one VM's balloon.
#[derive(Clone)]
pub struct VmBalloon {
    handle: BalloonHandle,
    options: BalloonOptions,
    ram_bytes: u64,
    host: Arc<HostCounters>,
}

impl VmBalloon {
    /// The view of the device `handle` belongs to, created with `options` in a VM of
    /// `ram_bytes`, whose backend counts into `host`.
    pub fn new(
        handle: BalloonHandle,
        options: BalloonOptions,
        ram_bytes: u64,
        host: Arc<HostCounters>,
    ) -> Self {
        VmBalloon { handle, options, ram_bytes, host }
    }

    /// The host's counters.
    pub fn host_counters(&self) -> &HostCounters {
        &self.host
    }

    /// Asks the guest to give up `bytes` of its RAM (0: all back). Refused unless it is whole
    /// pages and at most guest RAM.
    pub fn set_target(&self, bytes: u64) -> Result<(), TargetError> {
        if !bytes.is_multiple_of(PAGE_SIZE as u64) {
            return Err(TargetError::Unaligned(bytes));
        }
        if bytes > self.ram_bytes {
            return Err(TargetError::TooLarge { target: bytes, ram: self.ram_bytes });
        }
        let pages = u32::try_from(bytes / PAGE_SIZE as u64)
            .map_err(|_| TargetError::TooLarge { target: bytes, ram: self.ram_bytes })?;
        self.handle.set_target_pages(pages);
        Ok(())
    }

    /// The figures now.
    pub fn metrics(&self) -> BalloonMetrics {
        let page = PAGE_SIZE as u64;
        BalloonMetrics {
            options: self.options.to_arg(),
            guest_ram_bytes: self.ram_bytes,
            target_bytes: u64::from(self.handle.target_pages()) * page,
            actual_bytes: u64::from(self.handle.actual_pages()) * page,
            guest_stats: self.handle.guest_stats(),
            device: self.handle.counters(),
            host: self.host.snapshot(),
        }
    }

    /// The event loop's statistics timer (with `stats=SECS`): every period it asks for fresh
    /// statistics and serves the statsq through `transport`, which returns the buffer the
    /// device holds so the driver refills it. Then it hands the guest's latest statistics,
    /// when they changed, to `forward` (for the broker's `status`), if they pass the broker's
    /// check; figures that do not are counted (`stats_refused`) and logged sparsely.
    pub fn stats_job(
        &self,
        transport: Arc<Mutex<MmioTransport>>,
        mut forward: impl FnMut(GuestStats) + Send + 'static,
    ) -> Option<Periodic> {
        let every = self.options.stats_every?;
        let (handle, host, ram_bytes) = (self.handle.clone(), self.host.clone(), self.ram_bytes);
        let mut last: Option<GuestMemoryStats> = None;
        let action = move || {
            if let Some(queue) = handle.request_stats() {
                lock(&transport).notify(queue);
            }
            let Some(stats) = handle.guest_stats().filter(|s| last != Some(*s)) else { return };
            last = Some(stats);
            let entry = guest_stats::from_memory_stats(&stats);
            match guest_stats::check(&entry, ram_bytes) {
                Ok(()) => forward(entry),
                Err(e) => {
                    let n = HostCounters::add(&host.stats_refused, 1);
                    if n.is_power_of_two() {
                        log::warn!("balloon: the guest's statistics are not passed on: {e} ({n} so far)");
                    }
                }
            }
        };
        Some(Periodic { every, action: Box::new(action) })
    }
}
