//! Virtio-mmio transports on the MMIO bus, with their queue notifications served by an event
//! loop thread (one per VM) that waits on the ioeventfds KVM signals.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use samepage_virtio::{EventFdInterrupt, MmioTransport, VirtioDevice};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::bus::{lock, BusDevice};
use crate::error::VmmError;
use crate::vcpu::Buses;
use crate::x86_64::layout::{VIRTIO_IRQ_FIRST, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

/// One attached virtio device: its transport and one ioeventfd per queue (datamatch = queue
/// index on QueueNotify).
pub struct VirtioSlot {
    /// The transport, shared with the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Queue notification eventfds, indexed by queue.
    pub notify: Vec<EventFd>,
}

/// Puts virtio device number `index` on the MMIO bus: its window, an irqfd on its IRQ and an
/// ioeventfd per queue on QueueNotify (datamatch: the queue index). Returns the slot and the
/// `virtio_mmio.device=` token that announces it to Linux.
pub fn attach(
    vm: &VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    index: usize,
    device: Box<dyn VirtioDevice>,
) -> Result<(VirtioSlot, String), VmmError> {
    let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
    let irq = VIRTIO_IRQ_FIRST + index as u32;
    let interrupt = Arc::new(EventFdInterrupt::new().map_err(VmmError::host("virtio irqfd"))?);
    vm.register_irqfd(interrupt.eventfd(), irq).map_err(VmmError::kvm("KVM_IRQFD (virtio)"))?;
    let transport = MmioTransport::new(device, mem.clone(), interrupt)
        .map_err(|e| VmmError::Host { what: "virtio-mmio transport", source: std::io::Error::other(e) })?;
    let queues = transport.queue_count();
    let transport = Arc::new(Mutex::new(transport));
    let mut notify = Vec::with_capacity(queues);
    for queue in 0..queues as u32 {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::host("virtio ioeventfd"))?;
        let addr = IoEventAddress::Mmio(base + samepage_virtio::mmio::QUEUE_NOTIFY);
        vm.register_ioevent(&evt, &addr, queue).map_err(VmmError::kvm("KVM_IOEVENTFD"))?;
        notify.push(evt);
    }
    buses
        .mmio
        .insert(base, VIRTIO_MMIO_SIZE, transport.clone())
        .map_err(|e| VmmError::Host { what: "MMIO bus", source: std::io::Error::other(e) })?;
    Ok((VirtioSlot { transport, notify }, format!("virtio_mmio.device=4K@{base:#x}:{irq}")))
}

/// epoll data of the loop's own stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

/// Starts the thread that serves queue notifications until `stop` is written.
pub fn spawn_event_loop(slots: Vec<VirtioSlot>, stop: EventFd) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    for (device, slot) in slots.iter().enumerate() {
        for (queue, evt) in slot.notify.iter().enumerate() {
            let token = ((device as u64) << 32) | queue as u64;
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, token))?;
        }
    }
    epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))?;
    std::thread::Builder::new().name("virtio".into()).spawn(move || {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio event loop: epoll_wait failed: {e}");
                    return;
                }
            };
            for event in &events[..ready] {
                let token = event.data();
                if token == STOP_TOKEN {
                    return;
                }
                let (device, queue) = ((token >> 32) as usize, (token & 0xffff_ffff) as u32);
                let Some(slot) = slots.get(device) else { continue };
                if let Some(evt) = slot.notify.get(queue as usize) {
                    // Non-blocking: a spurious wake-up reads EAGAIN, which is harmless.
                    let _ = evt.read();
                }
                lock(&slot.transport).notify(queue);
            }
        }
    })
}
