//! The fphash device (virtio device ID 60): file-page hash reports from the guest.
//!
//! The protocol is specified in `docs/fphash.md` (protocol version 2: version 1 plus the
//! [`F_HOST_HASH`] feature); the constants and wire types of `wire.rs`, re-exported here,
//! follow it field by field. One report queue: each descriptor chain carries a batch, `struct
//! fphash_header` then `nr_records` × `struct fphash_record` in device-readable descriptors
//! (split any way the driver likes), followed by device-writable descriptors that receive
//! `struct fphash_response` (`batch_status`, then one status byte per record).
//!
//! The device checks the batch's framing and every record's shape (alignment, guest RAM,
//! flags); records that pass go, in one call per batch, to a [`PageMerger`], the host's merge
//! engine, which verifies the pages themselves and decides each record's status. A driver that
//! accepted [`F_HOST_HASH`] reports pages without a hash: the device passes its records' hash
//! fields on as zeros, whatever they hold, and the merger hashes the pages itself.
//!
//! Guest input is hostile: nothing here panics on a descriptor or a record, buffers are
//! allocated once (a batch is bounded by [`MAX_RECORDS`]), and every rejection is counted in
//! [`FphashStats`] and logged sparsely.
//!
//! Here: the device and its interface to the merger. `wire.rs`: the wire format and the
//! parsing of a batch's framing; `counters.rs`: [`FphashStats`].

mod counters;
mod wire;

pub use counters::{FphashStats, FphashStatsSnapshot};
pub use wire::*;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::warn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{
    bump, collect_chain, drain_queue, read_config_bytes, should_log, Error, VirtioDevice, VIRTIO_F_VERSION_1,
};
use wire::{parse_batch, record_shape_ok, Batch};

/// Size of the report queue offered to the driver (QueueNumMax).
pub const QUEUE_SIZE: u16 = 256;

/// One record that passed the device's checks: `gpa` is page-aligned and the whole page lies
/// in one guest RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageReport {
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// The hash the guest reported (meaningless for [`ReportKind::Removed`]); never trusted.
    /// Zero when the driver accepted [`F_HOST_HASH`].
    pub hash: [u8; HASH_LEN],
}

/// Who hashed the pages of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hashing {
    /// The guest: each report's `hash` is what the guest claims (a lookup key, never trusted).
    Guest,
    /// The host: the driver accepted [`F_HOST_HASH`]; every report's `hash` is zero and the
    /// merger hashes each page it reads.
    Host,
}

/// The host's merge engine, as the device sees it.
pub trait PageMerger: Send {
    /// Handles one batch of records that passed the device's checks (aligned, in guest RAM,
    /// valid flags), in request order; writes one status per record into `statuses` (same
    /// length as `reports`). Called on the VMM's event-loop thread. `hashing` says whether the
    /// reports carry the guest's hashes or none ([`Hashing::Host`], ADDED batches only).
    ///
    /// `statuses` arrives filled with [`RecordStatus::Off`] for ADDED batches and
    /// [`RecordStatus::Done`] for REMOVED ones; entries the merger leaves alone keep that
    /// value. The device does not call the merger for a batch without valid records.
    fn merge_batch(
        &mut self,
        kind: ReportKind,
        hashing: Hashing,
        reports: &[PageReport],
        statuses: &mut [RecordStatus],
    );
}

/// The fphash device.
pub struct FphashDevice {
    merger: Box<dyn PageMerger>,
    config: FphashConfig,
    queue_max_sizes: [u16; 1],
    acked_features: u64,
    stats: Arc<FphashStats>,
    config_writes: u64,
    /// Buffers of the current chain, allocated once.
    descs: Vec<Descriptor>,
    request: Vec<u8>,
    statuses: Vec<RecordStatus>,
    reports: Vec<PageReport>,
    report_index: Vec<usize>,
    merged: Vec<RecordStatus>,
    response: FphashResponse,
}

impl FphashDevice {
    /// A device that hands valid records to `merger`.
    pub fn new(merger: Box<dyn PageMerger>) -> FphashDevice {
        let config = FphashConfig {
            max_records: MAX_RECORDS,
            page_size: PAGE_SIZE as u32,
            hash_alg: HASH_ALG_BLAKE3,
            version: PROTOCOL_VERSION_1,
            vm_generation: [0; VM_GENERATION_LEN],
        };
        let max = MAX_RECORDS as usize;
        FphashDevice {
            merger,
            config,
            queue_max_sizes: [QUEUE_SIZE],
            acked_features: 0,
            stats: Arc::new(FphashStats::default()),
            config_writes: 0,
            descs: Vec::with_capacity(MAX_CHAIN_LEN),
            request: vec![0; MAX_REQUEST_LEN],
            statuses: Vec::with_capacity(max),
            reports: Vec::with_capacity(max),
            report_index: Vec::with_capacity(max),
            merged: Vec::with_capacity(max),
            response: FphashResponse::default(),
        }
    }

    /// The device with `id` as its VM generation ID ([`F_VM_GENERATION`]): the VMM makes one
    /// anew for every start of the VM, so that a VM restored from a snapshot reads an ID other
    /// than the one its driver read before the snapshot.
    pub fn with_vm_generation(mut self, id: [u8; VM_GENERATION_LEN]) -> FphashDevice {
        self.config.vm_generation = id;
        self
    }

    /// The device's counters; keep the `Arc` to read them after the device moved into its
    /// transport.
    pub fn stats(&self) -> Arc<FphashStats> {
        Arc::clone(&self.stats)
    }

    /// Serves one chain; returns the used length.
    fn handle_chain(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let too_long = collect_chain(chain, MAX_CHAIN_LEN, &mut self.descs);

        // The response goes to the writable descriptors, in chain order.
        let mut writable = 0u64;
        let mut writable_in_ram = true;
        for d in self.descs.iter().filter(|d| d.is_write_only()) {
            writable += u64::from(d.len());
            writable_in_ram &= mem.check_range(d.addr(), d.len() as usize);
        }
        let answerable = writable_in_ram && writable >= RESPONSE_HEADER_LEN as u64;

        // On success, `parse_batch` checked that every descriptor is in guest RAM and that the
        // writable part can hold the response.
        let batch = match parse_batch(mem, &self.descs, too_long, writable, &mut self.request) {
            Ok(batch) => batch,
            Err(why) => {
                let n = bump(&self.stats.rejected_batches);
                if should_log(n) {
                    warn!("fphash: rejected batch: {why:?} ({n} rejected batches)");
                }
                self.response.batch_status = BATCH_BAD_REQUEST;
                return self.respond(mem, answerable, self.response.wire(0));
            }
        };
        self.check_and_merge(mem, &batch);

        self.response.batch_status = BATCH_OK;
        for (byte, status) in self.response.status.iter_mut().zip(&self.statuses) {
            *byte = status.as_byte();
        }
        let used = self.respond(mem, true, self.response.wire(self.statuses.len()));
        if used > 0 {
            bump(&self.stats.batches);
            self.stats.records.fetch_add(batch.nr_records as u64, Ordering::Relaxed);
            for &s in &self.statuses {
                bump(self.stats.status_counter(s));
            }
        }
        used
    }

    /// Checks each record of a valid batch, hands the good ones to the merger and fills
    /// `self.statuses`.
    fn check_and_merge(&mut self, mem: &GuestMemoryMmap, batch: &Batch) {
        self.statuses.clear();
        self.reports.clear();
        self.report_index.clear();
        for (i, record) in batch.records(&self.request).enumerate() {
            let status = if !record_shape_ok(batch.kind, &record) {
                Some(RecordStatus::BadRecord)
            } else if !page_in_ram(mem, record.gpa) {
                Some(RecordStatus::BadGpa)
            } else {
                None
            };
            match status {
                Some(bad) => {
                    let n = self.stats.status_counter(bad).load(Ordering::Relaxed) + 1;
                    if should_log(n) {
                        warn!(
                            "fphash: {bad:?} record: gpa {:#x}, flags {:#x}, reserved {:#x} \
                             ({n} such records)",
                            record.gpa, record.flags, record.reserved
                        );
                    }
                    self.statuses.push(bad);
                }
                None => {
                    // Placeholder, replaced by the merger's answer below.
                    self.statuses.push(RecordStatus::Off);
                    self.report_index.push(i);
                    // With F_HOST_HASH the hash field means nothing: it goes no further.
                    let hash =
                        if self.acked_features & F_HOST_HASH != 0 { [0; HASH_LEN] } else { record.hash };
                    self.reports.push(PageReport { gpa: record.gpa, hash });
                }
            }
        }
        if self.reports.is_empty() {
            return;
        }
        let fill = match batch.kind {
            ReportKind::Added => RecordStatus::Off,
            ReportKind::Removed => RecordStatus::Done,
        };
        let hashing = match batch.kind {
            ReportKind::Added if self.acked_features & F_HOST_HASH != 0 => {
                self.stats.host_hashed.fetch_add(self.reports.len() as u64, Ordering::Relaxed);
                Hashing::Host
            }
            _ => Hashing::Guest,
        };
        self.merged.clear();
        self.merged.resize(self.reports.len(), fill);
        self.merger.merge_batch(batch.kind, hashing, &self.reports, &mut self.merged);
        for (&i, &s) in self.report_index.iter().zip(&self.merged) {
            if let Some(slot) = self.statuses.get_mut(i) {
                *slot = s;
            }
        }
    }

    /// Writes `bytes` across the chain's writable descriptors (if `answerable`); returns the
    /// used length, 0 if nothing was written.
    fn respond(&self, mem: &GuestMemoryMmap, answerable: bool, bytes: &[u8]) -> u32 {
        if answerable && !bytes.is_empty() && write_out(mem, &self.descs, bytes) {
            // At most 4 + MAX_RECORDS bytes.
            return u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        }
        let n = bump(&self.stats.unanswered);
        if should_log(n) {
            warn!("fphash: chain returned without a response ({n} such chains)");
        }
        0
    }
}

/// Whether `gpa` is page-aligned and its whole page lies in one guest RAM region.
fn page_in_ram(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return false;
    }
    let addr = GuestAddress(gpa);
    let Some(region) = mem.find_region(addr) else {
        return false;
    };
    region.to_region_addr(addr).is_some_and(|offset| region.len() - offset.0 >= PAGE_SIZE as u64)
}

/// Writes `bytes` to the writable descriptors of `descs`, in order; false if they are too
/// short or a write fails.
fn write_out(mem: &GuestMemoryMmap, descs: &[Descriptor], bytes: &[u8]) -> bool {
    let mut rest = bytes;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len() as usize);
        let (now, later) = rest.split_at(n);
        if mem.write_slice(now, d.addr()).is_err() {
            return false;
        }
        rest = later;
    }
    rest.is_empty()
}

impl VirtioDevice for FphashDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_HOST_HASH | F_VM_GENERATION
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes += 1;
        if should_log(self.config_writes) {
            warn!(
                "fphash: ignored write of {} bytes to read-only config offset {offset:#x} \
                 ({} such writes)",
                data.len(),
                self.config_writes
            );
        }
    }

    fn features_accepted(&mut self, acked_features: u64) {
        let host_hash = acked_features & F_HOST_HASH != 0;
        self.config.version = if host_hash { PROTOCOL_VERSION } else { PROTOCOL_VERSION_1 };
    }

    fn activate(&mut self, acked_features: u64, queues_ready: &[bool]) -> Result<(), Error> {
        if !queues_ready.first().copied().unwrap_or(false) {
            return Err(Error::QueueNotReady(0));
        }
        self.acked_features = acked_features;
        let who = if acked_features & F_HOST_HASH != 0 { "the host" } else { "the guest" };
        log::info!("fphash: driver ready; {who} hashes the reported pages");
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if index != 0 {
            return false;
        }
        let stats = self.stats.clone();
        drain_queue(
            queue,
            mem,
            |chain| self.handle_chain(chain, mem),
            || {
                if should_log(bump(&stats.rejected_batches)) {
                    warn!("fphash: available ring index is invalid");
                }
            },
        )
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.config.version = PROTOCOL_VERSION_1;
    }
}

#[cfg(test)]
mod tests;
