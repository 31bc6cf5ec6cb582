//! virtio-balloon (device ID 5; virtio 1.2 §5.5, the "traditional memory balloon"), modern
//! interface only.
//!
//! The device offers VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_DEFLATE_ON_OOM and
//! VIRTIO_BALLOON_F_PAGE_REPORTING as its [`BalloonConfig`] says (the VMM's `--balloon`), and
//! never FREE_PAGE_HINT, PAGE_POISON or MUST_TELL_HOST. Its queues are numbered as Linux's
//! driver and the transports number them: inflateq 0, deflateq 1, then the statsq if
//! STATS_VQ was negotiated, then the reporting_vq if PAGE_REPORTING was; a queue that was not
//! negotiated takes no index (`virtio_balloon.c`, `init_vqs`).
//!
//! Contract with the VMM:
//! - pages the guest gives up (inflateq) or reports free (reporting_vq) go to
//!   [`BalloonBackend::discard`], pages it takes back (deflateq) to
//!   [`BalloonBackend::reclaim`], as coalesced [`GuestRange`]s, each inside one RAM region;
//!   the chain is returned to the driver only after the call, so the guest never touches a
//!   page while the backend works on it;
//! - the VMM keeps a [`BalloonHandle`] to set the target ([`BalloonHandle::set_target_pages`],
//!   which raises the configuration-change interrupt), read `actual`, ask for statistics
//!   ([`BalloonHandle::request_stats`]) and read them and the counters;
//! - the device never touches guest pages itself and never writes guest memory but the used
//!   rings.
//!
//! Guest input is hostile: nothing here panics on a descriptor, a PFN or a statistic; buffers
//! are allocated once; every chain is returned to the used ring (the statsq's one buffer when
//! the VMM asks for statistics), so the driver never waits forever; every rejection is counted
//! in [`BalloonCounters`] and logged sparsely.

mod counters;
mod handle;
pub mod wire;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{info, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use counters::{BalloonCounters, BalloonCountersSnapshot};
pub use handle::BalloonHandle;
pub use wire::{GuestMemoryStats, GuestRange};

use crate::device_state::{BalloonState, DeviceState, DeviceStateError};
use crate::interrupt::InterruptTrigger;
use crate::{
    collect_chain, drain_queue, read_config_bytes, should_log, Error, VirtioDevice, VIRTIO_F_VERSION_1,
};
use handle::{Shared, NO_QUEUE};
use wire::{ChainError, F_DEFLATE_ON_OOM, F_PAGE_REPORTING, F_STATS_VQ, PFN_LEN};

/// QueueNumMax of every queue. Linux keeps one inflate or deflate buffer in flight and needs
/// 32 descriptors on the reporting_vq (`PAGE_REPORTING_CAPACITY`); 256 leaves room.
pub const QUEUE_SIZE: u16 = 256;
/// Most descriptors in one chain on any queue.
pub const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
/// Most PFNs in one inflateq or deflateq chain: Linux sends at most 256
/// (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`); four times that allows for other drivers.
pub const MAX_PFNS: usize = 1024;
/// Longest statsq buffer read: 102 entries, where Linux sends 16.
pub const MAX_STATS_BYTES: usize = 1024;

/// Which optional features the device offers (the VMM's `--balloon` options).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_STATS_VQ (`stats=SECS` with SECS above 0; the period is the
    /// VMM's timer, see [`BalloonHandle::request_stats`]).
    pub stats: bool,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (`deflate-on-oom=on`).
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_PAGE_REPORTING (`free-page-reporting=on`).
    pub free_page_reporting: bool,
}

/// Why pages are handed to [`BalloonBackend::discard`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Discard {
    /// The guest gave them to the balloon (inflateq): it does not use them until it takes
    /// them back through the deflateq.
    Inflated,
    /// The guest reported them free (reporting_vq): it may use them again as soon as the
    /// device returns the chain, and expects nothing of their content (§5.5.6.7, without
    /// PAGE_POISON).
    Reported,
}

/// What the VMM does with the pages the guest gives up or takes back.
///
/// The device calls these on the thread that serves its queues (the VMM's event loop), with
/// the transport's lock held, while it serves the chain that named the ranges; the chain goes
/// back to the driver when the call returns. Ranges are sorted, do not overlap, are 4 KiB
/// aligned and each lies inside one guest RAM region. There is no error to return: whatever
/// the backend cannot do, the guest is told nothing different (a page not discarded only
/// costs host memory), so the backend logs and counts its own failures.
pub trait BalloonBackend: Send {
    /// Makes `ranges` fresh zeroed anonymous memory, so that their host memory is freed now
    /// and faulted in again (as zeros) if the guest touches them later. The device knows
    /// nothing of how guest pages are backed: a page merged with other VMs' or mapped from a
    /// disk image must lose that mapping too, which only the VMM can do.
    fn discard(&mut self, ranges: &[GuestRange], why: Discard);

    /// The guest takes `ranges` back from the balloon (deflateq). They were discarded on
    /// inflation and fault in as zeros on first touch, so there is usually nothing to do.
    /// The guest may already be using them (MUST_TELL_HOST is not offered, so it need not
    /// wait for the device, §5.5.6), so this must not change their content.
    fn reclaim(&mut self, ranges: &[GuestRange]);
}

/// A queue's role, from the negotiated features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Inflate => "inflateq",
            Role::Deflate => "deflateq",
            Role::Stats => "statsq",
            Role::Reporting => "reporting_vq",
        }
    }
}

/// The virtio-balloon device.
pub struct Balloon {
    config: BalloonConfig,
    backend: Box<dyn BalloonBackend>,
    shared: Arc<Shared>,
    /// QueueNumMax of the queues offered: 2, 3 or 4 of them.
    queue_max_sizes: Vec<u16>,
    /// Each queue's role once features are accepted.
    roles: [Option<Role>; 4],
    /// The statsq buffer the device keeps to ask for the next statistics.
    held_stats: Option<u16>,
    /// Buffers of the current chain, allocated once.
    descs: Vec<Descriptor>,
    bytes: Vec<u8>,
    pfns: Vec<u32>,
    ranges: Vec<GuestRange>,
}

impl Balloon {
    /// A balloon offering what `config` says, handing pages to `backend`. `interrupt` must be
    /// the trigger its transport raises (the device raises configuration changes on it).
    pub fn new(
        config: BalloonConfig,
        backend: Box<dyn BalloonBackend>,
        interrupt: Arc<dyn InterruptTrigger>,
    ) -> Balloon {
        let queues = 2 + usize::from(config.stats) + usize::from(config.free_page_reporting);
        Balloon {
            config,
            backend,
            shared: Arc::new(Shared::new(interrupt)),
            queue_max_sizes: vec![QUEUE_SIZE; queues],
            roles: [None; 4],
            held_stats: None,
            descs: Vec::with_capacity(MAX_CHAIN_DESCS),
            bytes: vec![0; (MAX_PFNS * PFN_LEN).max(MAX_STATS_BYTES)],
            pfns: Vec::with_capacity(MAX_PFNS),
            ranges: Vec::with_capacity(MAX_PFNS.max(MAX_CHAIN_DESCS)),
        }
    }

    /// The VMM's handle on this device; keep it before the device moves into its transport.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle { shared: Arc::clone(&self.shared) }
    }

    /// Each queue's role for the accepted `features`: inflateq, deflateq, then the optional
    /// queues that were negotiated, without gaps (§5.5.2 numbers all five; the transports
    /// give only the present ones indices).
    fn assign_roles(&mut self, features: u64) {
        let features = features & self.device_features();
        let optional = [(F_STATS_VQ, Role::Stats), (F_PAGE_REPORTING, Role::Reporting)];
        let present = optional.iter().filter(|(bit, _)| features & bit != 0).map(|&(_, role)| role);
        self.roles = [None; 4];
        for (slot, role) in
            self.roles.iter_mut().zip([Role::Inflate, Role::Deflate].into_iter().chain(present))
        {
            *slot = Some(role);
        }
    }

    fn role(&self, index: usize) -> Option<Role> {
        self.roles.get(index).copied().flatten()
    }

    fn counters(&self) -> &BalloonCounters {
        &self.shared.counters
    }

    /// Counts and logs a chain returned unused.
    fn reject(&self, role: Role, why: ChainError) {
        let n = BalloonCounters::add(&self.counters().rejected_chains, 1);
        if should_log(n) {
            warn!("virtio-balloon: {} chain returned unused: {why} ({n} such chains)", role.name());
        }
    }

    /// Serves one inflateq or deflateq chain; returns the used length (always 0: the device
    /// writes nothing).
    fn handle_pfn_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        role: Role,
    ) -> u32 {
        let too_many = collect_chain(chain, MAX_CHAIN_DESCS, &mut self.descs);
        let limit = MAX_PFNS * PFN_LEN;
        let read = wire::check_chain(&self.descs, too_many, MAX_CHAIN_DESCS, false).and_then(|()| {
            let buf = self.bytes.get_mut(..limit).unwrap_or_default();
            wire::read_pfns(mem, &self.descs, buf, &mut self.pfns)
        });
        if let Err(why) = read {
            self.reject(role, why);
            return 0;
        }
        self.ranges.clear();
        for &pfn in &self.pfns {
            match wire::pfn_range(mem, pfn) {
                Some(range) => self.ranges.push(range),
                None => {
                    let n = BalloonCounters::add(&self.shared.counters.invalid_pfns, 1);
                    if should_log(n) {
                        warn!(
                            "virtio-balloon: {} PFN {pfn:#x} (GPA {:#x}) is not guest RAM; skipped \
                             ({n} such PFNs)",
                            role.name(),
                            u64::from(pfn) << wire::PFN_SHIFT
                        );
                    }
                }
            }
        }
        wire::coalesce(mem, &mut self.ranges);
        let pages: u64 = self.ranges.iter().map(GuestRange::pages).sum();
        let c = &self.shared.counters;
        if role == Role::Inflate {
            if !self.ranges.is_empty() {
                self.backend.discard(&self.ranges, Discard::Inflated);
            }
            BalloonCounters::add(&c.inflate_requests, 1);
            BalloonCounters::add(&c.inflated_pages, pages);
        } else {
            if !self.ranges.is_empty() {
                self.backend.reclaim(&self.ranges);
            }
            BalloonCounters::add(&c.deflate_requests, 1);
            BalloonCounters::add(&c.deflated_pages, pages);
        }
        0
    }

    /// Serves one reporting_vq chain: each device-writable descriptor is a range of free
    /// pages (§5.5.6.7). Returns the used length: 0, as the device writes nothing into the
    /// ranges (the backend changes what backs them, not their bytes through the buffers).
    fn handle_report_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let too_many = collect_chain(chain, MAX_CHAIN_DESCS, &mut self.descs);
        if let Err(why) = wire::check_chain(&self.descs, too_many, MAX_CHAIN_DESCS, true) {
            self.reject(Role::Reporting, why);
            return 0;
        }
        self.ranges.clear();
        for d in &self.descs {
            match wire::checked_range(mem, d.addr().0, u64::from(d.len())) {
                Ok(range) => self.ranges.push(range),
                Err(why) => {
                    let n = BalloonCounters::add(&self.shared.counters.invalid_ranges, 1);
                    if should_log(n) {
                        warn!(
                            "virtio-balloon: reported range of {} bytes at {:#x} skipped: {why} \
                             ({n} such ranges)",
                            d.len(),
                            d.addr().0
                        );
                    }
                }
            }
        }
        wire::coalesce(mem, &mut self.ranges);
        if !self.ranges.is_empty() {
            self.backend.discard(&self.ranges, Discard::Reported);
        }
        let pages: u64 = self.ranges.iter().map(GuestRange::pages).sum();
        BalloonCounters::add(&self.shared.counters.reports, 1);
        BalloonCounters::add(&self.shared.counters.reported_pages, pages);
        0
    }

    /// Reads a statsq buffer into the shared statistics (which it replaces: each buffer is
    /// the driver's full set, §5.5.6.3).
    fn take_stats(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) {
        let c = &self.shared.counters;
        BalloonCounters::add(&c.stats_buffers, 1);
        let too_many = collect_chain(chain, MAX_CHAIN_DESCS, &mut self.descs);
        let buf = self.bytes.get_mut(..MAX_STATS_BYTES).unwrap_or_default();
        let read = wire::check_chain(&self.descs, too_many, MAX_CHAIN_DESCS, false)
            .and_then(|()| wire::read_chain(mem, &self.descs, buf));
        let len = match read {
            Ok(len) => len,
            Err(why) => {
                let n = BalloonCounters::add(&c.stats_rejected, 1);
                if should_log(n) {
                    warn!("virtio-balloon: statistics buffer ignored: {why} ({n} such buffers)");
                }
                return;
            }
        };
        let mut stats = GuestMemoryStats::default();
        let found = wire::parse_stats(buf.get(..len).unwrap_or_default(), &mut stats);
        if found.trailing > 0 {
            let n = BalloonCounters::add(&c.stats_odd_lengths, 1);
            if should_log(n) {
                warn!(
                    "virtio-balloon: statistics buffer of {len} bytes is not whole 10-byte \
                     entries; the last {} bytes ignored ({n} such buffers)",
                    found.trailing
                );
            }
        }
        if found.unknown > 0 {
            // Added several at a time, so log when the count passes a power of two.
            let n = BalloonCounters::add(&c.stats_unknown_tags, found.unknown as u64);
            let before = n - found.unknown as u64;
            if before == 0 || n.ilog2() > before.ilog2() {
                info!("virtio-balloon: ignored {} statistics with unknown tags ({n} so far)", found.unknown);
            }
        }
        *self.shared.stats() = Some(stats);
    }

    /// Serves the statsq: keeps the newest buffer (returning an older one the driver should
    /// not have left), then returns it if the VMM asked for statistics.
    fn serve_stats(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            self.take_stats(chain, mem);
            if let Some(older) = self.held_stats.replace(head) {
                let n = BalloonCounters::add(&self.counters().stats_extra_buffers, 1);
                if should_log(n) {
                    warn!("virtio-balloon: a second statistics buffer; the first returned ({n} times)");
                }
                used |= queue.add_used(mem, older, 0).is_ok();
            }
        }
        // The statsq never has notifications disabled, so this only tells whether the ring
        // holds chains virtio-queue refused to read.
        if !popped && queue.enable_notification(mem).unwrap_or(false) {
            let n = BalloonCounters::add(&self.counters().bad_avail_index, 1);
            if should_log(n) {
                warn!("virtio-balloon: statsq available ring index is invalid");
            }
        }
        if self.shared.stats_requested.swap(false, Ordering::SeqCst) {
            if let Some(head) = self.held_stats.take() {
                if queue.add_used(mem, head, 0).is_ok() {
                    used = true;
                    BalloonCounters::add(&self.counters().stats_requests, 1);
                }
            }
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        wire::DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        let c = &self.config;
        let bit = |on: bool, feature: u64| if on { feature } else { 0 };
        VIRTIO_F_VERSION_1
            | bit(c.stats, F_STATS_VQ)
            | bit(c.deflate_on_oom, F_DEFLATE_ON_OOM)
            | bit(c.free_page_reporting, F_PAGE_REPORTING)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = wire::config_bytes(
            self.shared.target.load(Ordering::SeqCst),
            self.shared.actual.load(Ordering::SeqCst),
        );
        read_config_bytes(&bytes, offset, data);
    }

    /// Only `actual` is the driver's to write (§5.5.4); bytes of it may be written alone, as
    /// legacy drivers did (§5.5.6.2.1). Everything else is ignored and counted.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = wire::CONFIG_ACTUAL;
        let within =
            offset >= start && offset.checked_add(data.len() as u64).is_some_and(|end| end <= start + 4);
        if within && !data.is_empty() {
            let at = (offset - start) as usize;
            let mut actual = self.shared.actual.load(Ordering::SeqCst).to_le_bytes();
            if let Some(dst) = actual.get_mut(at..at + data.len()) {
                dst.copy_from_slice(data);
                self.shared.actual.store(u32::from_le_bytes(actual), Ordering::SeqCst);
                return;
            }
        }
        let n = BalloonCounters::add(&self.counters().config_writes_ignored, 1);
        if should_log(n) {
            warn!(
                "virtio-balloon: ignored write of {} bytes to config offset {offset:#x} (only \
                 `actual` is writable; {n} such writes)",
                data.len()
            );
        }
    }

    fn features_accepted(&mut self, acked_features: u64) {
        self.assign_roles(acked_features);
    }

    fn activate(&mut self, acked_features: u64, queues_ready: &[bool]) -> Result<(), Error> {
        self.assign_roles(acked_features);
        for (index, role) in self.roles.iter().enumerate() {
            if role.is_some() && !queues_ready.get(index).copied().unwrap_or(false) {
                return Err(Error::QueueNotReady(index));
            }
        }
        let stats = self.roles.iter().position(|&r| r == Some(Role::Stats));
        let stats = stats.and_then(|i| u32::try_from(i).ok()).unwrap_or(NO_QUEUE);
        self.shared.stats_queue.store(stats, Ordering::SeqCst);
        self.shared.active.store(true, Ordering::SeqCst);
        let roles: Vec<&str> = self.roles.iter().flatten().map(|r| r.name()).collect();
        info!("virtio-balloon: driver ready; queues {}", roles.join(", "));
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let role = self.role(index).filter(|_| self.shared.active.load(Ordering::SeqCst));
        let Some(role) = role else {
            let n = BalloonCounters::add(&self.counters().unready_queue_uses, 1);
            if should_log(n) {
                warn!("virtio-balloon: queue {index} served while not in use ({n} times)");
            }
            return false;
        };
        if role == Role::Stats {
            return self.serve_stats(queue, mem);
        }
        let shared = Arc::clone(&self.shared);
        drain_queue(
            queue,
            mem,
            |chain| match role {
                Role::Reporting => self.handle_report_chain(chain, mem),
                _ => self.handle_pfn_chain(chain, mem, role),
            },
            || {
                if should_log(BalloonCounters::add(&shared.counters.bad_avail_index, 1)) {
                    warn!("virtio-balloon: {} available ring index is invalid", role.name());
                }
            },
        )
    }

    fn save_device_state(&self) -> Option<DeviceState> {
        let s = &self.shared;
        Some(DeviceState::Balloon(BalloonState {
            target: s.target.load(Ordering::SeqCst),
            actual: s.actual.load(Ordering::SeqCst),
            held_stats: self.held_stats,
        }))
    }

    fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Balloon(saved) = state;
        if let Some(head) = saved.held_stats {
            // Only a running driver's statsq hands the device a buffer, and its head indexes
            // the queue's descriptor table.
            let stats = self.roles.iter().position(|&r| r == Some(Role::Stats));
            let size = stats.and_then(|i| self.queue_max_sizes.get(i).copied());
            if !self.shared.active.load(Ordering::SeqCst) || size.is_none_or(|size| head >= size) {
                return Err(DeviceStateError::Impossible(
                    "a held statistics buffer without a running statsq holding it",
                ));
            }
        }
        self.shared.target.store(saved.target, Ordering::SeqCst);
        self.shared.actual.store(saved.actual, Ordering::SeqCst);
        self.held_stats = saved.held_stats;
        Ok(())
    }

    fn reset(&mut self) {
        // The transport resets the queues: a held statistics buffer is the driver's again.
        self.held_stats = None;
        self.roles = [None; 4];
        let s = &self.shared;
        s.active.store(false, Ordering::SeqCst);
        s.stats_queue.store(NO_QUEUE, Ordering::SeqCst);
        s.stats_requested.store(false, Ordering::SeqCst);
        // A reset driver has no balloon; the target stays the VMM's.
        s.actual.store(0, Ordering::SeqCst);
        *s.stats() = None;
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod transport_tests;
