//! One VM's layout, computed once from its configuration: where its RAM lies around the 32-bit
//! MMIO gap, the memory map its kernel is given, and the register window and IRQ of each of its
//! virtio-mmio devices (its disks, then the fphash device, then the entropy device, the balloon
//! and the vsock device when it has them). Guest memory, the loaders, the boot
//! structures and the devices all read this one value; the fixed addresses it is made of are in
//! [`super::layout`].

use vm_memory::GuestAddress;

use super::layout::{
    EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, VIRTIO_IRQ_FIRST, VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_START,
};

/// Where one virtio-mmio device lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioWindow {
    /// The device's number, from 0.
    pub index: usize,
    /// Guest-physical base of its [`VIRTIO_MMIO_SIZE`]-byte register window.
    pub base: u64,
    /// Its interrupt line.
    pub irq: u32,
}

impl VirtioWindow {
    /// The `virtio_mmio.device=` token that announces the device to Linux
    /// (drivers/virtio/virtio_mmio.c).
    pub fn cmdline_token(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// Where a VM's RAM and devices lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLayout {
    mem_bytes: u64,
    /// RAM below the MMIO gap and, when it does not fit there, the rest from 4 GiB on.
    ram: Vec<(GuestAddress, usize)>,
    /// One virtio-blk device per disk, in `--disk` order.
    disks: Vec<VirtioWindow>,
    /// The fphash device, after the disks.
    fphash: VirtioWindow,
    /// The virtio entropy device, after the fphash device, when the VM has one.
    entropy: Option<VirtioWindow>,
    /// The virtio-balloon device, after the entropy device, when the VM has one.
    balloon: Option<VirtioWindow>,
    /// The virtio-vsock device, after the balloon, when the VM has one.
    vsock: Option<VirtioWindow>,
    /// One virtio-net device per `--net`, last, in order.
    nets: Vec<VirtioWindow>,
}

impl VmLayout {
    /// The layout of `mem_bytes` of RAM, `disks` virtio-blk devices and the fphash device (at
    /// most [`super::layout::MAX_VIRTIO_DEVICES`] devices in all: each takes an IRQ).
    pub fn new(mem_bytes: u64, disks: usize) -> VmLayout {
        let low = mem_bytes.min(MMIO_GAP_START);
        let mut ram = vec![(GuestAddress(0), low as usize)];
        if mem_bytes > low {
            ram.push((GuestAddress(MMIO_GAP_END), (mem_bytes - low) as usize));
        }
        VmLayout {
            mem_bytes,
            ram,
            disks: (0..disks).map(window).collect(),
            fphash: window(disks),
            entropy: None,
            balloon: None,
            vsock: None,
            nets: Vec::new(),
        }
    }

    /// The same layout with a virtio entropy device after the fphash device (`entropy`).
    pub fn with_entropy(mut self, entropy: bool) -> VmLayout {
        self.entropy = entropy.then(|| window(self.disks.len() + 1));
        let balloon = self.balloon.is_some();
        self.with_balloon(balloon)
    }

    /// The same layout with a virtio-balloon device after the entropy device (`balloon`).
    pub fn with_balloon(mut self, balloon: bool) -> VmLayout {
        self.balloon = balloon.then(|| window(self.disks.len() + 1 + usize::from(self.entropy.is_some())));
        let vsock = self.vsock.is_some();
        self.with_vsock(vsock)
    }

    /// The same layout with a virtio-vsock device after every other device (`vsock`).
    pub fn with_vsock(mut self, vsock: bool) -> VmLayout {
        let before =
            self.disks.len() + 1 + usize::from(self.entropy.is_some()) + usize::from(self.balloon.is_some());
        self.vsock = vsock.then(|| window(before));
        let nets = self.nets.len();
        self.with_nets(nets)
    }

    /// The same layout with `nets` virtio-net devices after every other device.
    pub fn with_nets(mut self, nets: usize) -> VmLayout {
        let before = self.disks.len()
            + 1
            + usize::from(self.entropy.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.vsock.is_some());
        self.nets = (before..before + nets).map(window).collect();
        self
    }

    /// The network devices' windows, in `--net` order.
    pub fn net_windows(&self) -> &[VirtioWindow] {
        &self.nets
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The guest-physical RAM ranges: one below the MMIO gap and, when the RAM does not fit
    /// there, the rest from 4 GiB on.
    pub fn ram_ranges(&self) -> &[(GuestAddress, usize)] {
        &self.ram
    }

    /// Where RAM ends (exclusive) in guest-physical address space: past the MMIO gap once it
    /// exceeds the RAM below it.
    pub fn ram_end(&self) -> u64 {
        self.ram.last().map_or(0, |&(base, len)| base.0 + len as u64)
    }

    /// Where RAM below the MMIO gap ends (exclusive): the top for the initrd.
    pub fn low_ram_end(&self) -> u64 {
        self.mem_bytes.min(MMIO_GAP_START)
    }

    /// Whether RAM holds all of `[start, end)`.
    pub fn in_ram(&self, start: u64, end: u64) -> bool {
        self.ram.iter().any(|&(base, len)| start >= base.0 && end <= base.0 + len as u64)
    }

    /// RAM as the kernel's memory map gives it, (start, size) ranges: conventional memory below
    /// the EBDA, then from 1 MiB up to the MMIO gap, then above 4 GiB.
    pub fn memory_map(&self) -> Vec<(u64, u64)> {
        let mut map = vec![(0, EBDA_START), (HIMEM_START, self.low_ram_end() - HIMEM_START)];
        if self.mem_bytes > MMIO_GAP_START {
            map.push((MMIO_GAP_END, self.mem_bytes - MMIO_GAP_START));
        }
        map
    }

    /// The disks' windows, in `--disk` order.
    pub fn disk_windows(&self) -> &[VirtioWindow] {
        &self.disks
    }

    /// The fphash device's window.
    pub fn fphash_window(&self) -> &VirtioWindow {
        &self.fphash
    }

    /// The entropy device's window, when the VM has one.
    pub fn entropy_window(&self) -> Option<&VirtioWindow> {
        self.entropy.as_ref()
    }

    /// The balloon's window, when the VM has one.
    pub fn balloon_window(&self) -> Option<&VirtioWindow> {
        self.balloon.as_ref()
    }

    /// The vsock device's window, when the VM has one.
    pub fn vsock_window(&self) -> Option<&VirtioWindow> {
        self.vsock.as_ref()
    }

    /// Every virtio-mmio device's window, in device order.
    pub fn virtio_windows(&self) -> impl Iterator<Item = &VirtioWindow> {
        self.disks
            .iter()
            .chain([&self.fphash])
            .chain(self.entropy.as_ref())
            .chain(self.balloon.as_ref())
            .chain(self.vsock.as_ref())
            .chain(self.nets.iter())
    }
}

/// The window of virtio device number `index`.
fn window(index: usize) -> VirtioWindow {
    VirtioWindow {
        index,
        base: VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQ_FIRST + index as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(VmLayout::new(256 << 20, 0).ram_ranges(), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_gap() {
        let layout = VmLayout::new(4 << 30, 0);
        let ranges = layout.ram_ranges();
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(ranges[1], (GuestAddress(MMIO_GAP_END), ((4u64 << 30) - MMIO_GAP_START) as usize));
    }

    #[test]
    fn ram_map_leaves_out_the_ebda_hole_and_the_mmio_gap() {
        let map = VmLayout::new(4 << 30, 0).memory_map();
        assert_eq!(map[0], (0, EBDA_START));
        assert_eq!(map[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START));
        assert_eq!(map[2], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START));
        assert_eq!(VmLayout::new(64 << 20, 0).memory_map().len(), 2);
    }

    #[test]
    fn virtio_devices_take_consecutive_windows_and_irqs_the_disks_first() {
        let layout = VmLayout::new(64 << 20, 1);
        let windows: Vec<&VirtioWindow> = layout.virtio_windows().collect();
        assert_eq!(windows, [&layout.disk_windows()[0], layout.fphash_window()]);
        assert_eq!(
            *windows[1],
            VirtioWindow { index: 1, base: VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE, irq: 6 }
        );
        assert_eq!(windows[0].cmdline_token(), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(VmLayout::new(64 << 20, 0).fphash_window().index, 0);
        assert_eq!(layout.balloon_window(), None);
        let ballooned = VmLayout::new(64 << 20, 1).with_balloon(true);
        let windows: Vec<&VirtioWindow> = ballooned.virtio_windows().collect();
        assert_eq!(windows.len(), 3);
        assert_eq!(
            *windows[2],
            VirtioWindow { index: 2, base: VIRTIO_MMIO_START + 2 * VIRTIO_MMIO_SIZE, irq: 7 }
        );
        assert_eq!(ballooned.balloon_window(), Some(windows[2]));
        // The entropy device comes after fphash and before the balloon, whichever was asked first.
        for both in [
            VmLayout::new(64 << 20, 1).with_entropy(true).with_balloon(true),
            VmLayout::new(64 << 20, 1).with_balloon(true).with_entropy(true),
        ] {
            let indices: Vec<usize> = both.virtio_windows().map(|w| w.index).collect();
            assert_eq!(indices, [0, 1, 2, 3]);
            assert_eq!(both.entropy_window().map(|w| w.index), Some(2));
            assert_eq!(both.balloon_window().map(|w| (w.index, w.irq)), Some((3, 8)));
        }
        // The vsock device comes last, whichever was asked first.
        for all in [
            VmLayout::new(64 << 20, 1).with_vsock(true).with_entropy(true).with_balloon(true),
            VmLayout::new(64 << 20, 1).with_entropy(true).with_balloon(true).with_vsock(true),
        ] {
            assert_eq!(all.virtio_windows().count(), 5);
            assert_eq!(all.vsock_window().map(|w| (w.index, w.irq)), Some((4, 9)));
        }
        assert_eq!(VmLayout::new(64 << 20, 0).with_vsock(true).vsock_window().map(|w| w.index), Some(1));
        // Network devices come after everything else, however the layout was put together.
        for nets in [
            VmLayout::new(64 << 20, 1).with_nets(2).with_vsock(true).with_balloon(true),
            VmLayout::new(64 << 20, 1).with_balloon(true).with_vsock(true).with_nets(2),
        ] {
            let indices: Vec<usize> = nets.net_windows().iter().map(|w| w.index).collect();
            assert_eq!(indices, [4, 5]);
            assert_eq!(nets.virtio_windows().count(), 6);
        }
    }
}
