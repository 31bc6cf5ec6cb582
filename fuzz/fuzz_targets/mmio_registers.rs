//! The virtio-mmio register file (virtio 1.2 §4.2.2): sequences of register reads and writes,
//! status and feature negotiation, queue setup and notifications, with the fphash device or
//! virtio-blk behind `MmioTransport`.
//!
//! Besides raw accesses at any offset and width, an input holds whole driver steps: the
//! initialisation of §3.1.1 (which must reach DRIVER_OK, or have FEATURES_OK refused for
//! features the device did not offer), a well-formed request in the queue it set up, and
//! notifications, which must then be served. After every step the register file must hold
//! what the spec allows: the status only along the initialisation order, FEATURES_OK only
//! with offered features and VERSION_1, constant identification registers, zeros for invalid
//! accesses, and no device work before DRIVER_OK.
#![no_main]

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage_fuzz::{counted, guest_memory, linked, queue_size, Ring};
use samepage_virtio::block::{Block, RequestHeader};
use samepage_virtio::fphash::{
    FphashDevice, FphashHeader, FphashRecord, Hashing, PageMerger, PageReport, RecordStatus, ReportKind,
    FLAG_FILE_PAGE, TYPE_ADDED,
};
use samepage_virtio::interrupt::{InterruptKind, InterruptTrigger, INTERRUPT_STATUS_MASK};
use samepage_virtio::mmio::*;
use samepage_virtio::{MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: usize = 0x10_0000;
const RING: u64 = 0x1000;
const INDIRECT: (u64, u64) = (0x8000, 0x9000);
const REQUEST: u64 = 0x2_0000;
const RESPONSE: u64 = 0x2_1000;
const DATA: u64 = 0x3_0000;
const PAGE: u64 = 0x5_0000;
const MAX_OPS: usize = 64;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
/// The statuses of the initialisation order (virtio 1.2 §3.1.1).
const STEPS: [u32; 5] =
    [0, ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK, ACK | DRIVER | FEATURES_OK | DRIVER_OK];

#[derive(Arbitrary, Debug)]
struct Input {
    block: bool,
    read_only: bool,
    /// The interrupt fails to signal.
    failing_interrupt: bool,
    #[arbitrary(with = counted::<_, 1, MAX_OPS>)]
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Reg {
    MagicValue,
    Version,
    DeviceId,
    VendorId,
    DeviceFeatures,
    DeviceFeaturesSel,
    DriverFeatures,
    DriverFeaturesSel,
    LegacyGuestPageSize,
    QueueSel,
    QueueNumMax,
    QueueNum,
    LegacyQueueAlign,
    LegacyQueuePfn,
    QueueReady,
    QueueNotify,
    InterruptStatus,
    InterruptAck,
    Status,
    QueueDescLow,
    QueueDescHigh,
    QueueDriverLow,
    QueueDriverHigh,
    QueueDeviceLow,
    QueueDeviceHigh,
    ShmSel,
    ShmLenLow,
    ShmLenHigh,
    ShmBaseLow,
    ShmBaseHigh,
    QueueReset,
    ConfigGeneration,
}

fn offset(reg: Reg) -> u64 {
    match reg {
        Reg::MagicValue => MAGIC_VALUE,
        Reg::Version => VERSION,
        Reg::DeviceId => DEVICE_ID,
        Reg::VendorId => VENDOR_ID,
        Reg::DeviceFeatures => DEVICE_FEATURES,
        Reg::DeviceFeaturesSel => DEVICE_FEATURES_SEL,
        Reg::DriverFeatures => DRIVER_FEATURES,
        Reg::DriverFeaturesSel => DRIVER_FEATURES_SEL,
        Reg::LegacyGuestPageSize => LEGACY_GUEST_PAGE_SIZE,
        Reg::QueueSel => QUEUE_SEL,
        Reg::QueueNumMax => QUEUE_NUM_MAX,
        Reg::QueueNum => QUEUE_NUM,
        Reg::LegacyQueueAlign => LEGACY_QUEUE_ALIGN,
        Reg::LegacyQueuePfn => LEGACY_QUEUE_PFN,
        Reg::QueueReady => QUEUE_READY,
        Reg::QueueNotify => QUEUE_NOTIFY,
        Reg::InterruptStatus => INTERRUPT_STATUS,
        Reg::InterruptAck => INTERRUPT_ACK,
        Reg::Status => STATUS,
        Reg::QueueDescLow => QUEUE_DESC_LOW,
        Reg::QueueDescHigh => QUEUE_DESC_HIGH,
        Reg::QueueDriverLow => QUEUE_DRIVER_LOW,
        Reg::QueueDriverHigh => QUEUE_DRIVER_HIGH,
        Reg::QueueDeviceLow => QUEUE_DEVICE_LOW,
        Reg::QueueDeviceHigh => QUEUE_DEVICE_HIGH,
        Reg::ShmSel => SHM_SEL,
        Reg::ShmLenLow => SHM_LEN_LOW,
        Reg::ShmLenHigh => SHM_LEN_HIGH,
        Reg::ShmBaseLow => SHM_BASE_LOW,
        Reg::ShmBaseHigh => SHM_BASE_HIGH,
        Reg::QueueReset => QUEUE_RESET,
        Reg::ConfigGeneration => CONFIG_GENERATION,
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The driver's initialisation, accepting the offered features (`features` None) or
    /// others, with a queue of `samepage_fuzz::queue_size` entries.
    Init {
        features: Option<u64>,
        queue_size: u8,
    },
    /// A well-formed request in the queue the last initialisation set up.
    Request,
    /// The VMM's ioeventfd for this queue index fired.
    Notify(u32),
    /// The VMM's ioeventfd without datamatch fired.
    NotifyAll,
    ReadReg(Reg),
    WriteReg(Reg, u32),
    /// A read anywhere in (and past) the window, of width `[1, 2, 4, 8, 3, 0, 16][w % 7]`.
    Read {
        offset: u16,
        width: u8,
    },
    Write {
        offset: u16,
        width: u8,
        value: u64,
    },
}

/// Answers every ADDED record MERGED.
struct Merger;

impl PageMerger for Merger {
    fn merge_batch(&mut self, kind: ReportKind, _: Hashing, _: &[PageReport], statuses: &mut [RecordStatus]) {
        if kind == ReportKind::Added {
            statuses.fill(RecordStatus::Merged);
        }
    }
}

/// An interrupt line that counts, and fails on demand.
#[derive(Default)]
struct Irq {
    status: AtomicU32,
    fail: bool,
}

impl InterruptTrigger for Irq {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
        if self.fail {
            return Err(std::io::Error::other("injected interrupt failure"));
        }
        Ok(())
    }
    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// The driver's side: the device under test and what the driver set up.
struct Rig {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    irq: Arc<Irq>,
    /// Work the device did, from its counters.
    work: Box<dyn Fn() -> u64>,
    offered: u64,
    device_type: u32,
    block: bool,
    /// The queue the last initialisation set up, while no other write may have changed it.
    ring: Option<Ring>,
    pending: u64,
    _image: Option<TempFile>,
}

impl Rig {
    fn new(input: &Input) -> Rig {
        let mem = guest_memory(&[(0, MEM_SIZE)]);
        let irq = Arc::new(Irq { fail: input.failing_interrupt, ..Irq::default() });
        let (device, work, image): (Box<dyn VirtioDevice>, Box<dyn Fn() -> u64>, _) = if input.block {
            let image = TempFile::new().expect("temporary image");
            image.as_file().write_all(&[0x5a; 4096]).expect("image content");
            let block = Block::open(image.as_path(), input.read_only, "fuzz").expect("opening the image");
            let stats = block.stats();
            let work = move || {
                let s = stats.snapshot();
                s.reads
                    + s.writes
                    + s.flushes
                    + s.get_ids
                    + s.unsupported
                    + s.malformed_chains
                    + s.bad_headers
                    + s.bad_data_descriptors
                    + s.out_of_range
                    + s.read_only_writes
                    + s.io_errors
                    + s.unanswerable
            };
            (Box::new(block), Box::new(work), Some(image))
        } else {
            let dev = FphashDevice::new(Box::new(Merger));
            let stats = dev.stats();
            let work = move || {
                let s = stats.snapshot();
                s.batches + s.rejected_batches + s.unanswered
            };
            (Box::new(dev), Box::new(work), None)
        };
        let offered = device.device_features();
        let device_type = device.device_type();
        let t = MmioTransport::new(device, mem.clone(), irq.clone()).expect("transport");
        Rig {
            t,
            mem,
            irq,
            work,
            offered,
            device_type,
            block: input.block,
            ring: None,
            pending: 0,
            _image: image,
        }
    }

    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0xa5u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    fn driver_ok(&self) -> bool {
        self.t.status() & (DRIVER_OK | FAILED | NEEDS_RESET) == DRIVER_OK
    }

    /// Virtio 1.2 §3.1.1, with the queue of `size` entries at RING.
    fn init(&mut self, features: Option<u64>, size: u16) {
        self.ring = None;
        self.pending = 0;
        self.w(STATUS, 0);
        assert_eq!(self.t.status(), 0, "reset");
        self.w(STATUS, ACK);
        self.w(STATUS, ACK | DRIVER);
        self.w(DEVICE_FEATURES_SEL, 0);
        let low = self.r(DEVICE_FEATURES);
        self.w(DEVICE_FEATURES_SEL, 1);
        let high = self.r(DEVICE_FEATURES);
        assert_eq!(u64::from(high) << 32 | u64::from(low), self.offered, "DeviceFeatures");
        let accepted = features.unwrap_or(self.offered);
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, accepted as u32);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (accepted >> 32) as u32);
        self.w(STATUS, ACK | DRIVER | FEATURES_OK);
        let acceptable = accepted & !self.offered == 0 && accepted & VIRTIO_F_VERSION_1 != 0;
        if !acceptable {
            assert_eq!(self.r(STATUS) & FEATURES_OK, 0, "FEATURES_OK for features {accepted:#x}");
            return;
        }
        assert_eq!(self.r(STATUS), ACK | DRIVER | FEATURES_OK);
        assert_eq!(self.t.acked_features(), accepted);
        self.w(QUEUE_SEL, 0);
        let max = self.r(QUEUE_NUM_MAX);
        let size = size.min(max as u16);
        let ring = Ring::new(&self.mem, RING, size, INDIRECT);
        let (desc, avail, used) = ring.addresses();
        self.w(QUEUE_NUM, u32::from(size));
        for (low, value) in [(QUEUE_DESC_LOW, desc), (QUEUE_DRIVER_LOW, avail), (QUEUE_DEVICE_LOW, used)] {
            self.w(low, value as u32);
            self.w(low + 4, (value >> 32) as u32);
        }
        self.w(QUEUE_READY, 1);
        assert_eq!(self.r(QUEUE_READY), 1, "queue of {size} entries made ready");
        self.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(self.r(STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK, "DRIVER_OK");
        self.ring = Some(ring);
    }

    /// A one-record ADDED batch, or a one-sector read.
    fn request(&mut self) {
        let Some(ring) = self.ring.as_mut() else { return };
        let chain = if self.block {
            let header = RequestHeader { request_type: VIRTIO_BLK_T_IN, reserved: 0, sector: 1 };
            self.mem.write_obj(header, GuestAddress(REQUEST)).expect("header");
            linked(&[(REQUEST, 16, false), (DATA, 512, true), (RESPONSE, 1, true)])
        } else {
            let mut request = FphashHeader { report_type: TYPE_ADDED, nr_records: 1 }.to_bytes().to_vec();
            let record = FphashRecord { gpa: PAGE, hash: [1; 32], flags: FLAG_FILE_PAGE, reserved: 0 };
            request.extend_from_slice(&record.to_bytes());
            self.mem.write_slice(&request, GuestAddress(REQUEST)).expect("request");
            linked(&[(REQUEST, request.len() as u32, false), (RESPONSE, 5, true)])
        };
        if ring.add_chain(&self.mem, &chain, false) {
            self.pending += 1;
        }
    }

    /// A notification of queue `index` (or of all) arrived: with a queue set up and untouched
    /// since, every pending request must be served.
    fn notified(&mut self, index: Option<u32>) {
        let served_before = self.ring.as_ref().map(|r| r.used_idx(&self.mem));
        let work_before = (self.work)();
        let active = self.driver_ok();
        match index {
            Some(i) => self.t.notify(i),
            None => self.t.process_notifications(),
        }
        let work = (self.work)() - work_before;
        if !active {
            assert_eq!(work, 0, "device work before DRIVER_OK (status {:#x})", self.t.status());
        }
        if let (Some(ring), Some(before)) = (self.ring.as_ref(), served_before) {
            if index.is_none_or(|i| i == 0) && active {
                let served = ring.used_idx(&self.mem).wrapping_sub(before);
                assert_eq!(u64::from(served), self.pending, "pending requests served");
                assert_eq!(work, self.pending, "one counted request each");
                if self.pending > 0 {
                    assert_ne!(self.irq.status() & 1, 0, "used-ring interrupt");
                }
                self.pending = 0;
            }
        }
    }

    /// What must hold after every step.
    fn check(&mut self, stats_before: MmioStats) {
        let status = self.t.status();
        assert!(STEPS.contains(&(status & !(FAILED | NEEDS_RESET))), "status {status:#x}");
        if status & FEATURES_OK != 0 {
            let acked = self.t.acked_features();
            assert_eq!(acked & !self.offered, 0, "unoffered features accepted: {acked:#x}");
            assert_ne!(acked & VIRTIO_F_VERSION_1, 0, "FEATURES_OK without VERSION_1");
        }
        assert_eq!(self.irq.status() & !INTERRUPT_STATUS_MASK, 0);
        let s = self.t.stats();
        let pairs = [
            (stats_before.invalid_accesses, s.invalid_accesses),
            (stats_before.rejected_status_writes, s.rejected_status_writes),
            (stats_before.rejected_feature_writes, s.rejected_feature_writes),
            (stats_before.rejected_queue_configs, s.rejected_queue_configs),
            (stats_before.spurious_notifications, s.spurious_notifications),
            (stats_before.interrupt_errors, s.interrupt_errors),
        ];
        assert!(pairs.iter().all(|(a, b)| a <= b), "counters only grow: {stats_before:?} -> {s:?}");
        assert_eq!(self.r(MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(self.r(VERSION), MMIO_VERSION);
        assert_eq!(self.r(VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(self.r(DEVICE_ID), self.device_type);
        assert_eq!(self.r(STATUS), status);
        assert_eq!(self.r(INTERRUPT_STATUS), self.irq.status());
    }
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8, 3, 0, 16][usize::from(w % 7)]
}

fuzz_target!(|input: Input| {
    let mut rig = Rig::new(&input);
    for op in &input.ops {
        let before = rig.t.stats();
        match *op {
            Op::Read { offset, width: w } => {
                let offset = u64::from(offset) % (MMIO_WINDOW_SIZE + 0x100);
                let mut data = vec![0xa5u8; width(w)];
                rig.t.read(offset, &mut data);
                let valid = if offset >= CONFIG_SPACE {
                    matches!(data.len(), 1 | 2 | 4 | 8) && offset + data.len() as u64 <= MMIO_WINDOW_SIZE
                } else {
                    data.len() == 4 && offset.is_multiple_of(4)
                };
                if !valid {
                    assert!(data.iter().all(|&b| b == 0), "invalid read at {offset:#x} returned {data:?}");
                    assert_eq!(rig.t.stats().invalid_accesses, before.invalid_accesses + 1);
                }
            }
            Op::Write { offset, width: w, value } => {
                let offset = u64::from(offset) % (MMIO_WINDOW_SIZE + 0x100);
                let data = &value.to_le_bytes().repeat(2)[..width(w)];
                let status = rig.t.status();
                let notify = offset == QUEUE_NOTIFY && data.len() == 4;
                if notify {
                    rig.notified(Some(value as u32));
                } else {
                    rig.t.write(offset, data);
                }
                if offset < CONFIG_SPACE && (data.len() != 4 || !offset.is_multiple_of(4)) {
                    assert_eq!(rig.t.status(), status, "an invalid write changed the status");
                    assert_eq!(rig.t.stats().invalid_accesses, before.invalid_accesses + 1);
                } else if !notify && offset < CONFIG_SPACE {
                    rig.ring = None;
                }
            }
            Op::ReadReg(reg) => {
                let _ = rig.r(offset(reg));
            }
            Op::WriteReg(Reg::QueueNotify, value) => rig.notified(Some(value)),
            Op::WriteReg(reg, value) => {
                rig.w(offset(reg), value);
                rig.ring = None;
            }
            Op::Init { features, queue_size: size } => rig.init(features, queue_size(size)),
            Op::Request => rig.request(),
            Op::Notify(index) => rig.notified(Some(index)),
            Op::NotifyAll => rig.notified(None),
        }
        rig.check(before);
    }
});
