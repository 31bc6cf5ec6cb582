//! The balloon behind a real `MmioTransport`, driven register by register the way Linux's
//! virtio-mmio and balloon drivers drive it: queue numbering after negotiation, the first
//! statistics buffer added before DRIVER_OK, the VMM's statistics request through
//! `MmioTransport::notify`, target changes and `actual` through configuration space.

use std::sync::Mutex;

use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::wire::*;
use super::*;
use crate::interrupt::{EventFdInterrupt, INTERRUPT_STATUS_CONFIG_CHANGE, INTERRUPT_STATUS_USED_RING};
use crate::mmio::*;
use crate::test_chains::linked;
use crate::MmioTransport;

const MEM_SIZE: usize = 0x10_0000;
/// Each queue's rings (16 entries) at `RINGS + index * RING_STRIDE`.
const RINGS: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x1000;
const RING_SIZE: u16 = 16;
const BUF: u64 = 0x8000;
const S_NEGOTIATING: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;

type Calls = Arc<Mutex<Vec<(Vec<GuestRange>, Option<Discard>)>>>;

struct Recorder(Calls);

impl BalloonBackend for Recorder {
    fn discard(&mut self, ranges: &[GuestRange], why: Discard) {
        self.0.lock().unwrap().push((ranges.to_vec(), Some(why)));
    }
    fn reclaim(&mut self, ranges: &[GuestRange]) {
        self.0.lock().unwrap().push((ranges.to_vec(), None));
    }
}

struct Guest {
    t: MmioTransport,
    handle: BalloonHandle,
    irq: Arc<EventFdInterrupt>,
    calls: Calls,
    mem: GuestMemoryMmap,
}

impl Guest {
    fn new(config: BalloonConfig) -> Guest {
        Guest::with_memory(
            config,
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        )
    }

    /// A balloon on `mem` (a restored device sees the rings its original set up).
    fn with_memory(config: BalloonConfig, mem: GuestMemoryMmap) -> Guest {
        let calls = Calls::default();
        let irq = Arc::new(EventFdInterrupt::new().unwrap());
        let dev = Balloon::new(config, Box::new(Recorder(calls.clone())), irq.clone());
        let handle = dev.handle();
        let t = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone()).unwrap();
        Guest { t, handle, irq, calls, mem }
    }

    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    /// The device's feature bits, as a driver reads them.
    fn device_features(&mut self) -> u64 {
        self.w(DEVICE_FEATURES_SEL, 0);
        let low = self.r(DEVICE_FEATURES);
        self.w(DEVICE_FEATURES_SEL, 1);
        u64::from(low) | u64::from(self.r(DEVICE_FEATURES)) << 32
    }

    /// Negotiates `features` and sets up queues `0..queues` at their rings in `mem` (a clone
    /// of the guest's memory, so that the rings do not borrow `self`); returns the rings.
    fn setup<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        features: u64,
        queues: u32,
    ) -> Vec<MockSplitQueue<'m, GuestMemoryMmap>> {
        self.w(STATUS, S_NEGOTIATING);
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, features as u32);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (features >> 32) as u32);
        self.w(STATUS, S_NEGOTIATING | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_ne!(self.r(STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0, "features {features:#x} accepted");
        let mut rings = Vec::new();
        for sel in 0..queues {
            self.w(QUEUE_SEL, sel);
            assert_eq!(self.r(QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
            let base = RINGS + u64::from(sel) * RING_STRIDE;
            let mq = MockSplitQueue::create(mem, GuestAddress(base), RING_SIZE);
            let addrs = [mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0];
            self.w(QUEUE_NUM, u32::from(RING_SIZE));
            for (low, addr) in [QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW].into_iter().zip(addrs) {
                self.w(low, addr as u32);
                self.w(low + 4, (addr >> 32) as u32);
            }
            self.w(QUEUE_READY, 1);
            assert_eq!(self.r(QUEUE_READY), 1, "queue {sel} ready");
            rings.push(mq);
        }
        rings
    }

    fn driver_ok(&mut self) {
        self.w(STATUS, S_NEGOTIATING | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(self.r(STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_DRIVER_OK);
    }
}

fn write_pfns(mem: &GuestMemoryMmap, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    bytes.len() as u32
}

#[test]
fn notifications_before_driver_ok_reach_no_queue() {
    let mut g = Guest::new(BalloonConfig { stats: true, deflate_on_oom: true, free_page_reporting: true });
    assert_eq!(g.r(crate::mmio::DEVICE_ID), wire::DEVICE_ID);
    let mem = g.mem.clone();
    // At reset, then before FEATURES_OK, then with the queues ready but before DRIVER_OK.
    g.w(QUEUE_NOTIFY, 0);
    g.w(STATUS, S_NEGOTIATING);
    g.w(QUEUE_NOTIFY, 0);
    let rings = g.setup(&mem, VIRTIO_F_VERSION_1, 2);
    let len = write_pfns(&mem, &[1, 2]);
    rings[0].add_desc_chains(&linked(&[(BUF, len, false)]), 0).unwrap();
    g.w(QUEUE_NOTIFY, 0);
    assert_eq!(g.t.stats().spurious_notifications, 3);
    assert!(g.calls.lock().unwrap().is_empty());
    assert_eq!(g.handle.counters(), BalloonCountersSnapshot::default(), "the device was never asked");
    assert_eq!(g.handle.request_stats(), None);
    // Once running, the same chain is served.
    g.driver_ok();
    g.w(QUEUE_NOTIFY, 0);
    assert_eq!(g.calls.lock().unwrap().len(), 1);
}

#[test]
fn linux_style_bring_up_with_stats_and_reporting() {
    let mut g = Guest::new(BalloonConfig { stats: true, deflate_on_oom: false, free_page_reporting: true });
    let offered = g.device_features();
    assert_eq!(offered, VIRTIO_F_VERSION_1 | F_STATS_VQ | F_PAGE_REPORTING);
    g.handle.set_target_pages(256);
    let mem = g.mem.clone();
    let rings = g.setup(&mem, offered, 4);

    // Linux primes the statsq and kicks it before DRIVER_OK: the transport drops the kick.
    let stats: Vec<u8> = [(S_MEMFREE, 1u64 << 20), (S_MEMTOT, 1 << 30)]
        .iter()
        .flat_map(|&(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect();
    mem.write_slice(&stats, GuestAddress(BUF + 0x800)).unwrap();
    rings[2].add_desc_chains(&linked(&[(BUF + 0x800, stats.len() as u32, false)]), 0).unwrap();
    g.w(QUEUE_NOTIFY, 2);
    assert_eq!(g.t.stats().spurious_notifications, 1);
    g.driver_ok();
    assert_eq!(g.irq.status(), 0, "no interrupt yet");

    // The driver reads the target, inflates and writes `actual`.
    assert_eq!(g.r(CONFIG_SPACE + CONFIG_NUM_PAGES), 256);
    let len = write_pfns(&mem, &[0x40, 0x41, 0x43]);
    rings[0].add_desc_chains(&linked(&[(BUF, len, false)]), 0).unwrap();
    g.w(QUEUE_NOTIFY, 0);
    assert_eq!(g.irq.status(), INTERRUPT_STATUS_USED_RING);
    let want = vec![GuestRange { gpa: 0x40000, len: 0x2000 }, GuestRange { gpa: 0x43000, len: 0x1000 }];
    assert_eq!(g.calls.lock().unwrap().as_slice(), [(want, Some(Discard::Inflated))]);
    g.w(CONFIG_SPACE + CONFIG_ACTUAL, 3);
    assert_eq!(g.handle.actual_pages(), 3);
    g.w(INTERRUPT_ACK, INTERRUPT_STATUS_USED_RING);

    // The VMM's statistics timer finds the primed buffer, reads it and hands it back.
    assert_eq!(g.handle.guest_stats(), None);
    let q = g.handle.request_stats().expect("a statsq");
    assert_eq!(q, 2);
    g.t.notify(q);
    let s = g.handle.guest_stats().expect("statistics read");
    assert_eq!((s.free_memory, s.total_memory), (Some(1 << 20), Some(1 << 30)));
    assert_eq!(g.irq.status(), INTERRUPT_STATUS_USED_RING, "the driver hears its buffer came back");
    let used_idx: u16 = mem.read_obj(rings[2].used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used_idx, 1);
    g.w(INTERRUPT_ACK, INTERRUPT_STATUS_USED_RING);

    // Free page reporting on queue 3, the last one.
    rings[3].add_desc_chains(&linked(&[(0x8_0000, 0x4_0000, true)]), 0).unwrap();
    g.w(QUEUE_NOTIFY, 3);
    let last = g.calls.lock().unwrap().pop();
    assert_eq!(last, Some((vec![GuestRange { gpa: 0x8_0000, len: 0x4_0000 }], Some(Discard::Reported))));

    // A new target: a configuration change interrupt, which the driver acknowledges.
    g.w(INTERRUPT_ACK, INTERRUPT_STATUS_USED_RING);
    g.handle.set_target_pages(16);
    assert_eq!(g.r(INTERRUPT_STATUS), INTERRUPT_STATUS_CONFIG_CHANGE);
    assert_eq!(g.r(CONFIG_SPACE), 16);
    g.w(INTERRUPT_ACK, INTERRUPT_STATUS_CONFIG_CHANGE);
    assert_eq!(g.r(INTERRUPT_STATUS), 0);

    // A driver reset leaves the VMM's target and clears the rest.
    g.w(STATUS, 0);
    assert_eq!((g.handle.target_pages(), g.handle.actual_pages()), (16, 0));
    assert_eq!(g.handle.request_stats(), None);
}

#[test]
fn without_stats_the_reporting_vq_is_queue_2() {
    let mut g = Guest::new(BalloonConfig { stats: true, deflate_on_oom: true, free_page_reporting: true });
    let mem = g.mem.clone();
    // A driver that declines STATS_VQ sets up three queues.
    let rings = g.setup(&mem, VIRTIO_F_VERSION_1 | F_DEFLATE_ON_OOM | F_PAGE_REPORTING, 3);
    g.driver_ok();
    assert_eq!(g.t.status() & VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_DRIVER_OK, "activated");
    rings[2].add_desc_chains(&linked(&[(0x2_0000, 0x1000, true)]), 0).unwrap();
    g.w(QUEUE_NOTIFY, 2);
    let calls = g.calls.lock().unwrap().clone();
    assert_eq!(calls, [(vec![GuestRange { gpa: 0x2_0000, len: 0x1000 }], Some(Discard::Reported))]);
    // Queue 3 exists (the device offered four) but was never made ready.
    g.w(QUEUE_NOTIFY, 3);
    assert_eq!(g.t.stats().spurious_notifications, 1);
    assert_eq!(g.handle.request_stats(), None);
    let used: u16 = mem.read_obj(rings[2].used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used, 1);
}

#[test]
fn a_snapshot_keeps_target_actual_and_the_held_statistics_buffer_and_refuses_impossible_ones() {
    let config = BalloonConfig { stats: true, deflate_on_oom: false, free_page_reporting: true };
    let mut g = Guest::new(config);
    let offered = g.device_features();
    g.handle.set_target_pages(300);
    let mem = g.mem.clone();
    let rings = g.setup(&mem, offered, 4);
    let stats: Vec<u8> = (S_MEMFREE).to_le_bytes().into_iter().chain((1u64 << 20).to_le_bytes()).collect();
    mem.write_slice(&stats, GuestAddress(BUF + 0x800)).unwrap();
    rings[2].add_desc_chains(&linked(&[(BUF + 0x800, stats.len() as u32, false)]), 0).unwrap();
    g.driver_ok();
    // The device takes the statistics buffer (and holds it) the first time it serves the statsq.
    g.t.notify(2);
    g.w(CONFIG_SPACE + CONFIG_ACTUAL, 7);
    let saved = g.t.save_state();
    let Some(DeviceState::Balloon(balloon)) = saved.device else { panic!("no balloon state: {saved:?}") };
    assert_eq!((balloon.target, balloon.actual, balloon.held_stats), (300, 7, Some(0)));

    // A fresh balloon restored from it: the driver's view and the held buffer come back, so
    // the VMM's next statistics request returns the buffer to the driver.
    let mut back = Guest::with_memory(config, mem.clone());
    back.t.restore_state(&saved).expect("restore");
    assert_eq!(back.t.save_state(), saved);
    assert_eq!((back.handle.target_pages(), back.handle.actual_pages()), (300, 7));
    assert_eq!(back.r(CONFIG_SPACE + CONFIG_NUM_PAGES), 300);
    let q = back.handle.request_stats().expect("a statsq");
    back.t.notify(q);
    let used_idx: u16 = mem.read_obj(rings[2].used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used_idx, 1, "the held buffer went back to the driver");

    // Refused whole, leaving the transport reset: a held buffer past the queue, or one held
    // by a balloon without a statsq.
    let mut bad = saved.clone();
    bad.device = Some(DeviceState::Balloon(BalloonState { held_stats: Some(QUEUE_SIZE), ..balloon }));
    let mut fresh = Guest::new(config);
    assert!(matches!(fresh.t.restore_state(&bad), Err(StateError::Device(_))));
    assert_eq!(fresh.r(STATUS), 0);
    let mut no_stats =
        Guest::new(BalloonConfig { stats: false, deflate_on_oom: false, free_page_reporting: false });
    let mut two_queues = saved.clone();
    two_queues.acked_features = VIRTIO_F_VERSION_1;
    two_queues.queues.truncate(2);
    assert!(matches!(no_stats.t.restore_state(&two_queues), Err(StateError::Device(_))));
}
