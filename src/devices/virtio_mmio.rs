//! Virtio-mmio transports on the MMIO bus, with their queue notifications served by an event
//! loop thread (one per VM) that waits on the ioeventfds KVM signals.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use samepage_virtio::{EventFdInterrupt, MmioTransport, VirtioDevice};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::eventfd::EFD_NONBLOCK;
use vmm_sys_util::timerfd::TimerFd;

use crate::bus::Buses;
use crate::bus::{lock, BusDevice};
use crate::error::VmmError;
use crate::pause::PauseControl;
use crate::seccomp::ThreadKind;
use crate::x86_64::layout::VIRTIO_MMIO_SIZE;
use crate::x86_64::vm_layout::VirtioWindow;

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
    /// The VM's vCPUs, for a device that must have them paused while it serves its queues.
    pub pause: Option<Arc<PauseControl>>,
    /// For a device that lets work gather: its notifications are served no sooner than this
    /// says.
    pub gather: Option<Arc<ServeNoSooner>>,
    /// Fault injection (`crate::fault`): wedge on the first notification.
    pub wedge: bool,
}

/// When a device's next queue notification may be served: a device whose requests cost per
/// request more than per item (the fphash device: a pause of every vCPU and a broker round
/// trip a batch) sets a time after a small request, so that the driver's next request holds
/// what gathered meanwhile.
#[derive(Default)]
pub struct ServeNoSooner(Mutex<Option<Instant>>);

impl ServeNoSooner {
    /// Notifications until `at` wait for it; `None` serves them at once.
    pub fn set(&self, at: Option<Instant>) {
        *lock(&self.0) = at;
    }

    /// The time notifications wait for, if it is after `now`.
    fn after(&self, now: Instant) -> Option<Instant> {
        (*lock(&self.0)).filter(|t| *t > now)
    }
}

/// Puts a virtio device on the MMIO bus where the VM's layout gives it `window`: its register
/// window, an irqfd on its IRQ and an ioeventfd per queue on QueueNotify (datamatch: the queue
/// index).
pub fn attach(
    vm: &VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    window: &VirtioWindow,
    device: Box<dyn VirtioDevice>,
) -> Result<VirtioSlot, VmmError> {
    let interrupt = Arc::new(EventFdInterrupt::new().map_err(VmmError::host("virtio irqfd"))?);
    attach_with_interrupt(vm, buses, mem, window, device, interrupt)
}

/// As [`attach`], with the interrupt made beforehand: for a device that raises interrupts
/// itself (the balloon's configuration changes), which must get the transport's trigger.
pub fn attach_with_interrupt(
    vm: &VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    window: &VirtioWindow,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<EventFdInterrupt>,
) -> Result<VirtioSlot, VmmError> {
    let VirtioWindow { index, base, irq } = *window;
    vm.register_irqfd(interrupt.eventfd(), irq).map_err(VmmError::kvm("KVM_IRQFD (virtio)"))?;
    let transport = MmioTransport::new(device, mem.clone(), interrupt)
        .map_err(|source| VmmError::Transport { index, source })?;
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
        .map_err(|source| VmmError::Bus { what: "a virtio-mmio window", source })?;
    Ok(VirtioSlot { transport, notify, pause: None, gather: None, wedge: false })
}

/// epoll data of the loop's own stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;
/// epoll data of the [`OnEvent`] eventfd.
const EVENT_TOKEN: u64 = u64::MAX - 1;
/// epoll data of periodic job `i`'s timer: `TIMER_TOKEN - i`.
const TIMER_TOKEN: u64 = u64::MAX - 2;
/// Most periodic jobs (their tokens stay clear of the queues', which are below 2^37).
const MAX_PERIODIC: usize = 8;
/// The "queue" of a device's backend descriptor in its tokens (`device << 32 | queue`): no
/// queue has this index.
const BACKEND_QUEUE: u32 = u32::MAX;

/// Work the event loop does on a schedule (the dedup domain's refresh of this VM's pages, the
/// balloon's statistics requests).
pub struct Periodic {
    /// How often.
    pub every: Duration,
    /// What.
    pub action: Box<dyn FnMut() + Send>,
}

/// Work the event loop does when another thread asks through an eventfd (a shared image's
/// lease broke): on the loop's thread, between queue notifications, so no device of the VM is
/// in the middle of a request.
pub struct OnEvent {
    /// Readable when there is work; `action` reads (resets) it.
    pub event: EventFd,
    /// What.
    pub action: Box<dyn FnMut() + Send>,
}

/// The running event loop thread.
pub struct EventLoop {
    stop: EventFd,
    thread: JoinHandle<()>,
    /// Disconnected when the thread ends.
    done: Receiver<()>,
}

impl EventLoop {
    /// Asks the loop to end and waits for it until `deadline`; false if it did not end (a
    /// device wedged: the thread is left behind).
    pub fn stop(self, deadline: Instant) -> bool {
        let _ = self.stop.write(1);
        let left = deadline.saturating_duration_since(Instant::now());
        match self.done.recv_timeout(left) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = self.thread.join();
                true
            }
        }
    }
}

/// Starts the thread that serves queue notifications (and each of `periodic`, at most
/// [`MAX_PERIODIC`], and `on_event`) until stopped; it runs under its seccomp filter from the
/// start, which allows host sockets only when `vsock` (a vsock device's host side).
pub fn spawn_event_loop(
    slots: Vec<VirtioSlot>,
    mut periodic: Vec<Periodic>,
    mut on_event: Option<OnEvent>,
    vsock: bool,
) -> Result<EventLoop, VmmError> {
    let (epoll, stop, mut timers) =
        event_sources(&slots, &periodic).map_err(VmmError::host("the virtio event loop"))?;
    if let Some(e) = &on_event {
        epoll
            .ctl(ControlOperation::Add, e.event.as_raw_fd(), EpollEvent::new(EventSet::IN, EVENT_TOKEN))
            .map_err(VmmError::host("the virtio event loop"))?;
    }
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let kind = if vsock { ThreadKind::VirtioVsock } else { ThreadKind::Virtio };
    let thread = crate::seccomp::spawn("virtio".into(), kind, move || {
        let _done = done_tx;
        let mut events = vec![EpollEvent::default(); 32];
        // Notifications of gathering devices waiting for their time: (device, queue). A
        // snapshot taken meanwhile keeps the request available; the restore serves it.
        let mut waiting: Vec<(usize, u32)> = Vec::new();
        loop {
            serve_waiting(&slots, &mut waiting);
            let ready = match epoll.wait(wait_ms(&slots, &waiting), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio event loop: epoll_wait failed: {e}");
                    return;
                }
            };
            for event in &events[..ready] {
                match event.data() {
                    STOP_TOKEN => return,
                    EVENT_TOKEN => {
                        if let Some(e) = on_event.as_mut() {
                            (e.action)();
                        }
                    }
                    token if token <= TIMER_TOKEN && token > TIMER_TOKEN - MAX_PERIODIC as u64 => {
                        let i = (TIMER_TOKEN - token) as usize;
                        if let (Some(timer), Some(p)) = (timers.get_mut(i), periodic.get_mut(i)) {
                            let _ = timer.wait();
                            (p.action)();
                        }
                    }
                    token => {
                        if crate::fault::injected("forbidden-syscall") {
                            crate::fault::forbidden_syscall();
                        }
                        if crate::fault::injected("panic-virtio") {
                            crate::fault::panic("panic-virtio");
                        }
                        let (device, queue) = ((token >> 32) as usize, (token & 0xffff_ffff) as u32);
                        match slots.get(device) {
                            Some(slot) if queue == BACKEND_QUEUE => lock(&slot.transport).backend_ready(),
                            Some(slot)
                                if slot
                                    .gather
                                    .as_ref()
                                    .is_some_and(|g| g.after(Instant::now()).is_some()) =>
                            {
                                take_notification(slot, queue);
                                if !waiting.contains(&(device, queue)) {
                                    waiting.push((device, queue));
                                }
                            }
                            Some(slot) => serve(slot, queue),
                            None => {}
                        }
                    }
                }
            }
        }
    })?;
    Ok(EventLoop { stop, thread, done })
}

/// The loop's epoll set over every queue's eventfd, its stop eventfd and a timer per periodic
/// job.
fn event_sources(
    slots: &[VirtioSlot],
    periodic: &[Periodic],
) -> std::io::Result<(Epoll, EventFd, Vec<TimerFd>)> {
    if periodic.len() > MAX_PERIODIC {
        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
    }
    let epoll = Epoll::new()?;
    for (device, slot) in slots.iter().enumerate() {
        for (queue, evt) in slot.notify.iter().enumerate() {
            let token = ((device as u64) << 32) | queue as u64;
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, token))?;
        }
        if let Some(fd) = lock(&slot.transport).backend_fd() {
            let token = ((device as u64) << 32) | u64::from(BACKEND_QUEUE);
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))?;
        }
    }
    let stop = EventFd::new(EFD_NONBLOCK)?;
    epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))?;
    let errno = |e: vmm_sys_util::errno::Error| std::io::Error::from_raw_os_error(e.errno());
    let mut timers = Vec::with_capacity(periodic.len());
    for (i, p) in periodic.iter().enumerate() {
        let mut timer = TimerFd::new().map_err(errno)?;
        timer.reset(p.every, Some(p.every)).map_err(errno)?;
        let token = TIMER_TOKEN - i as u64;
        epoll.ctl(ControlOperation::Add, timer.as_raw_fd(), EpollEvent::new(EventSet::IN, token))?;
        timers.push(timer);
    }
    Ok((epoll, stop, timers))
}

/// Serves the waiting notifications whose time has come.
fn serve_waiting(slots: &[VirtioSlot], waiting: &mut Vec<(usize, u32)>) {
    let now = Instant::now();
    waiting.retain(|&(device, queue)| {
        let Some(slot) = slots.get(device) else { return false };
        if slot.gather.as_ref().is_some_and(|g| g.after(now).is_some()) {
            return true;
        }
        serve(slot, queue);
        false
    });
}

/// How long the loop may wait for events: until the first waiting notification's time.
fn wait_ms(slots: &[VirtioSlot], waiting: &[(usize, u32)]) -> i32 {
    let now = Instant::now();
    let first =
        waiting.iter().filter_map(|&(device, _)| slots.get(device)?.gather.as_ref()?.after(now)).min();
    match first {
        None if waiting.is_empty() => -1,
        None => 0,
        // Rounded up: woken early, the loop would only wait again.
        Some(t) => i32::try_from((t - now).as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
    }
}

/// Resets a queue's notification eventfd (non-blocking: a spurious wake-up reads EAGAIN,
/// which is harmless).
fn take_notification(slot: &VirtioSlot, queue: u32) {
    if let Some(evt) = slot.notify.get(queue as usize) {
        let _ = evt.read();
    }
}

/// Serves one queue notification. A device that merges guest pages gets the VM's vCPUs paused
/// first, and only then its lock: a vCPU waiting for that lock is never what the pause waits
/// for.
fn serve(slot: &VirtioSlot, queue: u32) {
    take_notification(slot, queue);
    if slot.wedge {
        let _held = lock(&slot.transport);
        log::error!("fault injection: the device thread wedges holding a transport lock");
        loop {
            std::thread::park();
        }
    }
    let Some(pause) = &slot.pause else {
        lock(&slot.transport).notify(queue);
        return;
    };
    // The device merges guest pages: the pause and the batches it serves count as merging.
    crate::merge_cpu::measure(|| {
        // None: the VM is stopping; leave the buffers to nobody.
        if let Some(_paused) = pause.pause_all() {
            lock(&slot.transport).notify(queue);
        }
    });
}
