//! Register-protocol tests of the virtio-mmio transport with a fake device.

use std::sync::Mutex;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueOwnedT;
use vm_memory::GuestAddress;

use super::*;
use crate::interrupt::{EventFdInterrupt, INTERRUPT_STATUS_CONFIG_CHANGE, INTERRUPT_STATUS_USED_RING};

const MEM_SIZE: usize = 0x10_0000;
const FAKE_TYPE: u32 = 63;
/// Offered: VERSION_1 and bit 3.
const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << 3;

/// What the fake device saw.
#[derive(Default)]
struct Seen {
    activated: Option<u64>,
    resets: u32,
    processed: Vec<usize>,
    config_writes: Vec<(u64, Vec<u8>)>,
    fail_activation: bool,
}

struct Fake {
    seen: Arc<Mutex<Seen>>,
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        FAKE_TYPE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn device_features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.seen.lock().unwrap().config_writes.push((offset, data.to_vec()));
    }
    fn activate(&mut self, acked: u64, _ready: &[bool]) -> Result<(), Error> {
        let mut seen = self.seen.lock().unwrap();
        if seen.fail_activation {
            return Err(Error::QueueNotReady(0));
        }
        seen.activated = Some(acked);
        Ok(())
    }
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        self.seen.lock().unwrap().processed.push(index);
        let heads: Vec<u16> = queue.iter(mem).unwrap().map(|c| c.head_index()).collect();
        for head in &heads {
            queue.add_used(mem, *head, 0).unwrap();
        }
        !heads.is_empty()
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().resets += 1;
    }
}

struct Rig {
    t: MmioTransport,
    irq: Arc<EventFdInterrupt>,
    seen: Arc<Mutex<Seen>>,
    mem: GuestMemoryMmap,
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let irq = Arc::new(EventFdInterrupt::new().unwrap());
    let device = Box::new(Fake { seen: seen.clone() });
    let t = MmioTransport::new(device, mem.clone(), irq.clone()).unwrap();
    Rig { t, irq, seen, mem }
}

impl Rig {
    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0xa5u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }
    /// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK; returns the resulting status.
    fn negotiate(&mut self, features: u64) -> u32 {
        self.w(STATUS, S_ACKNOWLEDGE);
        self.w(STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, features as u32);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (features >> 32) as u32);
        self.w(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        self.r(STATUS)
    }
    fn set_queue(&mut self, sel: u32, size: u32, desc: u64, driver: u64, device: u64) {
        self.w(QUEUE_SEL, sel);
        self.w(QUEUE_NUM, size);
        self.w(QUEUE_DESC_LOW, desc as u32);
        self.w(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(QUEUE_DRIVER_LOW, driver as u32);
        self.w(QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.w(QUEUE_DEVICE_LOW, device as u32);
        self.w(QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        self.w(QUEUE_READY, 1);
    }
    /// A well-placed queue `sel` of `size` entries at `base`.
    fn good_queue(&mut self, sel: u32, size: u16, base: u64) {
        let mem = self.mem.clone();
        let mq = MockSplitQueue::create(&mem, GuestAddress(base), size);
        let (d, a, u) = (mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0);
        self.set_queue(sel, u32::from(size), d, a, u);
    }
}

const FULL: u32 = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;

#[test]
fn identification_registers() {
    let mut r = rig();
    assert_eq!(r.r(MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r.r(VERSION), 2);
    assert_eq!(r.r(DEVICE_ID), FAKE_TYPE);
    assert_eq!(r.r(VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(r.r(STATUS), 0);
    assert_eq!(r.r(INTERRUPT_STATUS), 0);
    assert_eq!(r.r(CONFIG_GENERATION), 0);
    r.w(QUEUE_SEL, 0);
    assert_eq!(r.r(QUEUE_NUM_MAX), 16);
    r.w(QUEUE_SEL, 1);
    assert_eq!(r.r(QUEUE_NUM_MAX), 8);
    r.w(QUEUE_SEL, 2);
    assert_eq!(r.r(QUEUE_NUM_MAX), 0);
    assert_eq!(r.r(QUEUE_READY), 0);
    r.w(SHM_SEL, 0);
    assert_eq!(r.r(SHM_LEN_LOW), u32::MAX);
    assert_eq!(r.r(SHM_LEN_HIGH), u32::MAX);
    assert_eq!(r.t.stats(), MmioStats::default());
}

#[test]
fn device_feature_pages() {
    let mut r = rig();
    r.w(DEVICE_FEATURES_SEL, 0);
    assert_eq!(r.r(DEVICE_FEATURES), FAKE_FEATURES as u32);
    r.w(DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.r(DEVICE_FEATURES), (FAKE_FEATURES >> 32) as u32);
    r.w(DEVICE_FEATURES_SEL, 7);
    assert_eq!(r.r(DEVICE_FEATURES), 0);
}

#[test]
fn feature_negotiation() {
    let mut r = rig();
    // Before DRIVER: refused.
    r.w(DRIVER_FEATURES, 8);
    assert_eq!(r.t.stats().rejected_feature_writes, 1);
    assert_eq!(r.t.acked_features(), 0);

    // An unoffered bit: FEATURES_OK stays clear.
    assert_eq!(r.negotiate(FAKE_FEATURES | 1 << 5), S_ACKNOWLEDGE | S_DRIVER);
    assert_eq!(r.t.stats().rejected_status_writes, 1);

    // Without VERSION_1 (a legacy driver): refused too.
    r.w(STATUS, 0);
    assert_eq!(r.negotiate(1 << 3), S_ACKNOWLEDGE | S_DRIVER);
    assert_eq!(r.t.stats().rejected_status_writes, 2);

    r.w(STATUS, 0);
    assert_eq!(r.negotiate(FAKE_FEATURES), S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(r.t.acked_features(), FAKE_FEATURES);

    // After FEATURES_OK, and on pages past bit 63: refused.
    r.w(DRIVER_FEATURES_SEL, 0);
    r.w(DRIVER_FEATURES, 0);
    assert_eq!(r.t.acked_features(), FAKE_FEATURES);
    assert_eq!(r.t.stats().rejected_feature_writes, 2);
}

#[test]
fn status_sequence_is_enforced() {
    let mut r = rig();
    // Skipping steps, or a device-owned bit.
    for bad in [S_DRIVER, S_FEATURES_OK, S_DRIVER_OK, S_NEEDS_RESET, 0x20, 0xffff_ffff] {
        r.w(STATUS, bad);
        assert_eq!(r.r(STATUS), 0, "status {bad:#x} accepted");
    }
    assert_eq!(r.t.stats().rejected_status_writes, 6);

    // Several steps at once are fine; clearing bits is not.
    r.w(STATUS, S_ACKNOWLEDGE | S_DRIVER);
    assert_eq!(r.r(STATUS), S_ACKNOWLEDGE | S_DRIVER);
    r.w(STATUS, S_ACKNOWLEDGE);
    assert_eq!(r.r(STATUS), S_ACKNOWLEDGE | S_DRIVER);
    r.w(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
    assert_eq!(r.r(STATUS), S_ACKNOWLEDGE | S_DRIVER);
    assert_eq!(r.t.stats().rejected_status_writes, 8);
    // Rewriting the same value is harmless.
    r.w(STATUS, S_ACKNOWLEDGE | S_DRIVER);
    assert_eq!(r.t.stats().rejected_status_writes, 8);

    // FAILED sticks until reset.
    r.w(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
    assert_eq!(r.r(STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
    r.w(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(r.r(STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
    r.w(STATUS, 0);
    assert_eq!(r.r(STATUS), 0);
    assert_eq!(r.seen.lock().unwrap().resets, 1);
}

#[test]
fn full_setup_notify_and_interrupt() {
    let mut r = rig();
    assert_eq!(r.negotiate(FAKE_FEATURES), S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    let mem = r.mem.clone();
    let mut mq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let (d, a, u) = (mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0);
    r.set_queue(0, 16, d, a, u);
    assert_eq!(r.r(QUEUE_READY), 1);
    r.w(STATUS, FULL);
    assert_eq!(r.r(STATUS), FULL);
    assert_eq!(r.seen.lock().unwrap().activated, Some(FAKE_FEATURES));

    mq.add_chain(1).unwrap();
    r.w(QUEUE_NOTIFY, 0);
    assert_eq!(r.seen.lock().unwrap().processed, vec![0]);
    assert_eq!(r.r(INTERRUPT_STATUS), INTERRUPT_STATUS_USED_RING);
    assert_eq!(r.irq.eventfd().read().unwrap(), 1);
    r.w(INTERRUPT_ACK, INTERRUPT_STATUS_USED_RING);
    assert_eq!(r.r(INTERRUPT_STATUS), 0);

    // The ioeventfd paths.
    mq.add_chain(1).unwrap();
    r.t.notify(0);
    assert_eq!(r.r(INTERRUPT_STATUS), INTERRUPT_STATUS_USED_RING);
    r.t.process_notifications();
    assert_eq!(r.seen.lock().unwrap().processed, vec![0, 0, 0]);

    // Queue 1 was never made ready; queue 9 does not exist.
    r.t.notify(1);
    r.w(QUEUE_NOTIFY, 9);
    assert_eq!(r.t.stats().spurious_notifications, 2);
    assert_eq!(r.seen.lock().unwrap().processed.len(), 3);

    // Reset clears the queues and the interrupt status.
    r.w(STATUS, 0);
    assert_eq!(r.r(INTERRUPT_STATUS), 0);
    r.w(QUEUE_SEL, 0);
    assert_eq!(r.r(QUEUE_READY), 0);
    assert_eq!(r.t.acked_features(), 0);
    r.t.notify(0);
    assert_eq!(r.t.stats().spurious_notifications, 3);
}

#[test]
fn notify_before_driver_ok_is_ignored() {
    let mut r = rig();
    r.negotiate(FAKE_FEATURES);
    r.good_queue(0, 16, 0x1_0000);
    r.w(QUEUE_NOTIFY, 0);
    r.t.process_notifications();
    assert!(r.seen.lock().unwrap().processed.is_empty());
    assert_eq!(r.t.stats().spurious_notifications, 1);
}

#[test]
fn bad_queue_sizes_are_refused() {
    let mut r = rig();
    r.negotiate(FAKE_FEATURES);
    for (i, size) in [0u32, 3, 12, 32, 0x1_0000, u32::MAX].into_iter().enumerate() {
        let mem = r.mem.clone();
        let mq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let (d, a, u) = (mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0);
        r.set_queue(0, size, d, a, u);
        assert_eq!(r.r(QUEUE_READY), 0, "size {size} accepted");
        // QueueNum and QueueReady both count.
        assert_eq!(r.t.stats().rejected_queue_configs, 2 * (i as u64 + 1));
    }
    // A valid size afterwards clears the error.
    r.good_queue(0, 8, 0x1_0000);
    assert_eq!(r.r(QUEUE_READY), 1);
}

#[test]
fn bad_queue_addresses_are_refused() {
    let mut r = rig();
    r.negotiate(FAKE_FEATURES);
    let end = MEM_SIZE as u64;
    let cases = [
        (0x1_0008, 0x2_0000, 0x3_0000),      // descriptor table misaligned (16)
        (0x1_0000, 0x2_0001, 0x3_0000),      // available ring misaligned (2)
        (0x1_0000, 0x2_0000, 0x3_0002),      // used ring misaligned (4)
        (end - 0x10, 0x2_0000, 0x3_0000),    // descriptor table runs past RAM
        (0x1_0000, 0x1_0000_0000, 0x3_0000), // available ring above RAM
        (0x1_0000, 0x2_0000, u64::MAX - 3),  // used ring at the top of the address space
    ];
    for (i, (d, a, u)) in cases.into_iter().enumerate() {
        r.set_queue(0, 16, d, a, u);
        assert_eq!(r.r(QUEUE_READY), 0, "case {i} accepted");
        assert_eq!(r.t.stats().rejected_queue_configs, i as u64 + 1);
    }
}

#[test]
fn queue_registers_only_during_setup() {
    let mut r = rig();
    // Before FEATURES_OK.
    r.w(STATUS, S_ACKNOWLEDGE | S_DRIVER);
    r.good_queue(0, 16, 0x1_0000);
    assert_eq!(r.r(QUEUE_READY), 0);
    assert!(r.t.stats().rejected_queue_configs >= 1);

    r.w(STATUS, 0);
    r.negotiate(FAKE_FEATURES);
    r.good_queue(0, 16, 0x1_0000);
    assert_eq!(r.r(QUEUE_READY), 1);
    let before = r.t.stats().rejected_queue_configs;
    // While ready: the size cannot change.
    r.w(QUEUE_NUM, 4);
    assert_eq!(r.t.stats().rejected_queue_configs, before + 1);
    // A queue that does not exist.
    r.w(QUEUE_SEL, 5);
    r.w(QUEUE_NUM, 4);
    r.w(QUEUE_READY, 1);
    assert_eq!(r.t.stats().rejected_queue_configs, before + 3);
    // After DRIVER_OK.
    r.w(STATUS, FULL);
    r.good_queue(1, 8, 0x2_0000);
    r.w(QUEUE_SEL, 1);
    assert_eq!(r.r(QUEUE_READY), 0);
}

#[test]
fn activation_failure_sets_needs_reset() {
    let mut r = rig();
    r.seen.lock().unwrap().fail_activation = true;
    r.negotiate(FAKE_FEATURES);
    r.w(STATUS, FULL);
    assert_eq!(r.r(STATUS), FULL | S_NEEDS_RESET);
    assert_eq!(r.r(INTERRUPT_STATUS), INTERRUPT_STATUS_CONFIG_CHANGE);
    // Notifications are refused until reset.
    r.t.notify(0);
    assert_eq!(r.t.stats().spurious_notifications, 1);
}

#[test]
fn config_space_accesses() {
    let mut r = rig();
    let mut b = [0u8; 2];
    r.t.read(CONFIG_SPACE + 4, &mut b);
    assert_eq!(b, [4, 5]);
    let mut one = [0u8; 1];
    r.t.read(CONFIG_SPACE + 0x10, &mut one);
    assert_eq!(one, [0x10]);
    r.t.write(CONFIG_SPACE + 2, &[9, 8, 7, 6]);
    assert_eq!(r.seen.lock().unwrap().config_writes, vec![(2, vec![9, 8, 7, 6])]);

    // Width 3, crossing the end of the window, past the window: zeros, ignored, counted.
    let mut three = [0xffu8; 3];
    r.t.read(CONFIG_SPACE, &mut three);
    assert_eq!(three, [0; 3]);
    let mut four = [0xffu8; 4];
    r.t.read(MMIO_WINDOW_SIZE - 2, &mut four);
    assert_eq!(four, [0; 4]);
    r.t.read(MMIO_WINDOW_SIZE, &mut four);
    r.t.read(u64::MAX - 1, &mut four);
    r.t.write(u64::MAX, &[1]);
    assert_eq!(four, [0; 4]);
    assert_eq!(r.seen.lock().unwrap().config_writes.len(), 1);
    assert_eq!(r.t.stats().invalid_accesses, 5);
}

#[test]
fn invalid_register_accesses() {
    let mut r = rig();
    // Wrong width, misaligned, legacy, write-only and read-only registers.
    let mut two = [0xffu8; 2];
    r.t.read(MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    let mut eight = [0xffu8; 8];
    r.t.read(MAGIC_VALUE, &mut eight);
    assert_eq!(eight, [0; 8]);
    assert_eq!(r.r(MAGIC_VALUE + 1), 0);
    r.t.write(STATUS, &[1]);
    assert_eq!(r.r(STATUS), 0);
    r.w(LEGACY_GUEST_PAGE_SIZE, 4096);
    r.w(LEGACY_QUEUE_PFN, 1);
    assert_eq!(r.r(LEGACY_QUEUE_PFN), 0);
    assert_eq!(r.r(QUEUE_DESC_LOW), 0);
    r.w(MAGIC_VALUE, 0);
    r.w(INTERRUPT_STATUS, 1);
    assert_eq!(r.r(0x0e0), 0);
    assert_eq!(r.t.stats().invalid_accesses, 11);
    assert_eq!(r.r(MAGIC_VALUE), MMIO_MAGIC);
}

/// Every offset, width and a spread of values, in every status: nothing panics.
#[test]
fn register_fuzz_never_panics() {
    let mut r = rig();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let v = next();
        let offset = (v >> 8) % 0x1100;
        let len = [1usize, 2, 3, 4, 8][(v % 5) as usize];
        let value = next().to_le_bytes();
        if v & 0x80 != 0 {
            r.t.write(offset & !3, &value[..4]);
        } else if v & 0x40 != 0 {
            r.t.write(offset, &value[..len]);
        } else {
            let mut buf = [0u8; 8];
            r.t.read(offset, &mut buf[..len]);
        }
        if v & 0xfff == 0 {
            r.t.process_notifications();
        }
    }
}

#[test]
fn a_saved_state_restored_into_a_fresh_transport_reads_and_works_the_same() {
    let mut r = rig();
    assert_eq!(r.negotiate(FAKE_FEATURES) & S_FEATURES_OK, S_FEATURES_OK);
    r.good_queue(0, 16, 0x4000);
    r.w(STATUS, FULL);
    let saved = r.t.save_state();

    // A fresh transport over its own RAM, laid out as the first's (a restore maps the same).
    let mut back = rig();
    let mem = back.mem.clone();
    let mut mq = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
    back.t.restore_state(&saved).expect("restore");
    assert_eq!(back.t.save_state(), saved);
    assert_eq!(back.r(STATUS), FULL);
    back.w(QUEUE_SEL, 0);
    assert_eq!(back.r(QUEUE_READY), 1);
    assert_eq!(back.seen.lock().unwrap().activated, Some(FAKE_FEATURES), "the device was activated again");
    // A request the driver adds after the restore is served from where the queue was.
    mq.add_chain(1).unwrap();
    back.t.notify(0);
    assert_eq!(back.seen.lock().unwrap().processed, vec![0]);
    assert_eq!(back.irq.status() & INTERRUPT_STATUS_USED_RING, INTERRUPT_STATUS_USED_RING);
}

#[test]
fn states_no_driver_could_reach_are_refused_and_leave_the_transport_reset() {
    let mut r = rig();
    r.negotiate(FAKE_FEATURES);
    r.good_queue(0, 16, 0x4000);
    r.w(STATUS, FULL);
    let good = r.t.save_state();
    let refused = |edit: &dyn Fn(&mut TransportState)| {
        let mut state = good.clone();
        edit(&mut state);
        let mut fresh = rig();
        let result = fresh.t.restore_state(&state);
        assert_eq!(fresh.t.status(), 0);
        assert!(fresh.seen.lock().unwrap().activated.is_none());
        result.expect_err("a hostile state was accepted")
    };
    assert!(matches!(refused(&|s| s.device_type = 2), StateError::DeviceType { .. }));
    assert!(matches!(refused(&|s| s.queues.truncate(1)), StateError::QueueCount { .. }));
    assert!(matches!(refused(&|s| s.status = S_DRIVER_OK), StateError::Status(_)));
    assert!(matches!(refused(&|s| s.acked_features |= 1 << 40), StateError::Features { .. }));
    assert!(matches!(refused(&|s| s.acked_features &= !VIRTIO_F_VERSION_1), StateError::Features { .. }));
    assert!(matches!(refused(&|s| s.queues[0].size = 3), StateError::Queue { .. }));
    assert!(matches!(refused(&|s| s.queues[0].size = 64), StateError::Queue { .. }));
    assert!(matches!(refused(&|s| s.queues[0].desc = 0x4001), StateError::Queue { .. }));
    assert!(matches!(refused(&|s| s.queues[0].device = MEM_SIZE as u64), StateError::Queue { .. }));
    assert!(matches!(
        refused(&|s| {
            s.status = S_ACKNOWLEDGE | S_DRIVER;
        }),
        StateError::Queue { .. }
    ));
}

#[test]
fn a_configuration_changed_by_the_vmm_moves_the_generation_and_interrupts_only_a_running_driver() {
    let mut r = rig();
    // Before the driver runs: the generation moves, no interrupt (the driver reads the new
    // configuration when it starts).
    r.t.config_changed();
    assert_eq!((r.r(CONFIG_GENERATION), r.r(INTERRUPT_STATUS)), (1, 0));
    assert!(r.irq.eventfd().read().is_err(), "no signal before DRIVER_OK");
    r.negotiate(FAKE_FEATURES);
    r.good_queue(0, 16, 0x1_0000);
    r.w(STATUS, FULL);
    r.t.config_changed();
    assert_eq!(r.r(CONFIG_GENERATION), 2);
    assert_eq!(r.r(INTERRUPT_STATUS), INTERRUPT_STATUS_CONFIG_CHANGE);
    assert_eq!(r.irq.eventfd().read().unwrap(), 1);
    r.w(INTERRUPT_ACK, INTERRUPT_STATUS_CONFIG_CHANGE);
    assert_eq!(r.r(INTERRUPT_STATUS), 0);
}
