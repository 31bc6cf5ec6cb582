//! Building a VM in one place, in the order of docs/boot.md, and running it until it stops.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use samepage_virtio::block::Block;
use samepage_virtio::fphash::{FphashDevice, FphashStats};
use samepage_virtio::VirtioDevice;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::lock;
use crate::config::{DedupMode, EmulatedCpl0, SerialConfig, VmConfig};
use crate::dedup::{Domain, Limits, VmId};
use crate::devices::exit_port::ExitPort;
use crate::devices::fphash::VmMerger;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialConsole;
use crate::devices::virtio_mmio::{self, spawn_event_loop, VirtioSlot};
use crate::error::VmmError;
use crate::pause::PauseControl;
use crate::vcpu::{self, Buses};
use crate::x86_64::boot::{self, EntryPoint};
use crate::x86_64::layout::{
    EXIT_STATUS_PORT, I8042_DATA_PORT, IRQ_LAST, KVM_TSS_START, SERIAL_COM1_IRQ, SERIAL_COM1_PORT,
    SERIAL_PORT_COUNT, VIRTIO_IRQ_FIRST,
};
use crate::x86_64::{cpuid, mptable};
use crate::{memory, signals, terminal};

/// Kernel parameters samepage always passes: the console on COM1, and reboot through the i8042
/// (there is no ACPI).
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k";
/// Parameters for hosts whose KVM emulates guest kernel code (docs/guest-interface.md): no
/// XSAVE, hide instructions the emulator lacks or runs slowly, and the guest patch's switch.
pub const EMULATED_CPL0_CMDLINE: &str = "noxsave clearcpuid=popcnt,smap,fsrm,erms emulated_cpl0";
/// The kernel module that serves /dev/kvm on hosts that emulate guest kernel code.
const EMULATING_KVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the exit-status port.
    GuestStatus(u8),
    /// The guest rebooted or powered off.
    Reset,
    /// The guest cannot go on.
    Crashed {
        /// Which vCPU saw it.
        vcpu: u8,
        /// The exit reason.
        reason: String,
        /// The vCPU's RIP then.
        rip: u64,
    },
    /// `--timeout` expired.
    Timeout(Duration),
    /// SIGINT or SIGTERM (or Ctrl-A x).
    Signal(i32),
}

/// samepage's exit code for `--timeout` (as coreutils' `timeout`).
pub const EXIT_TIMEOUT: u8 = 124;
/// samepage's exit code for a crashed guest.
pub const EXIT_CRASHED: u8 = 125;

impl VmExit {
    /// The process exit code (docs/guest-interface.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            VmExit::GuestStatus(status) => *status,
            VmExit::Reset => 0,
            VmExit::Crashed { .. } => EXIT_CRASHED,
            VmExit::Timeout(_) => EXIT_TIMEOUT,
            VmExit::Signal(num) => 128u8.saturating_add(*num as u8),
        }
    }

    /// One line for the user, or `None` when the exit is ordinary.
    pub fn message(&self) -> Option<String> {
        match self {
            VmExit::GuestStatus(_) | VmExit::Reset => None,
            VmExit::Crashed { vcpu, reason, rip } => {
                Some(format!("guest crashed on vCPU {vcpu}: {reason} at RIP {rip:#x}"))
            }
            VmExit::Timeout(after) => {
                Some(format!("timeout: guest still running after {} s", after.as_secs()))
            }
            VmExit::Signal(num) => Some(format!("stopped by signal {num}")),
        }
    }
}

/// The first stop request wins; everyone can wait for it.
#[derive(Default)]
pub struct VmStop {
    exit: Mutex<Option<VmExit>>,
    changed: Condvar,
}

impl VmStop {
    /// A VM that has not stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the VM to stop for `exit`, unless it already is stopping for another reason.
    pub fn request(&self, exit: VmExit) {
        let mut current = lock(&self.exit);
        if current.is_none() {
            *current = Some(exit);
            self.changed.notify_all();
        }
    }

    /// Whether a stop was requested.
    pub fn is_stopped(&self) -> bool {
        lock(&self.exit).is_some()
    }

    /// Waits up to `timeout` for a stop request.
    pub fn wait(&self, timeout: Duration) -> Option<VmExit> {
        let guard = lock(&self.exit);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |exit| exit.is_none())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.clone()
    }
}

/// What a VM is built in besides its configuration.
pub struct VmContext {
    /// Name for logs and the dedup domain.
    pub label: String,
    /// Console output instead of `config.serial` (then without input unless `input`).
    pub console: Option<Box<dyn Write + Send>>,
    /// Feed standard input to the console (raw mode on a terminal) even with `console`.
    pub input: bool,
    /// The stop switch (give one to whatever else may stop the VM).
    pub stop: Arc<VmStop>,
    /// The dedup domain to merge pages in; `None` makes one for this VM alone.
    pub domain: Option<Arc<Mutex<Domain>>>,
}

impl Default for VmContext {
    fn default() -> Self {
        VmContext {
            label: "vm".into(),
            console: None,
            input: false,
            stop: Arc::new(VmStop::new()),
            domain: None,
        }
    }
}

/// A VM's place in a dedup domain; leaving it (on drop) releases the VM's merged pages.
pub struct DomainMembership {
    /// The domain.
    pub domain: Arc<Mutex<Domain>>,
    /// The VM's id in it.
    pub vm: VmId,
}

impl DomainMembership {
    fn join(domain: Arc<Mutex<Domain>>, label: &str, mem: &GuestMemoryMmap) -> Self {
        // SAFETY: the regions are vm-memory's private anonymous guest RAM mappings; `Vm` and
        // `StoppedVm` keep `mem` alive until this membership is dropped (field order), and
        // guest RAM is only touched through vm-memory's volatile accessors and by KVM.
        let vm = unsafe { lock(&domain).register_vm(label, memory::ram_regions(mem)) };
        DomainMembership { domain, vm }
    }
}

impl Drop for DomainMembership {
    fn drop(&mut self) {
        lock(&self.domain).unregister_vm(self.vm);
    }
}

/// A stopped VM whose guest RAM is still mapped.
pub struct StoppedVm {
    // Field order is drop order: leave the domain before the RAM goes.
    /// Its dedup domain membership.
    pub membership: DomainMembership,
    _vm: VmFd,
    /// Its guest RAM.
    pub mem: GuestMemoryMmap,
}

/// A built VM, ready to run.
pub struct Vm {
    // Field order is drop order: vCPU fds before the VM fd, the domain membership before the
    // memory it describes, the VM before its memory.
    vcpus: Vec<VcpuFd>,
    membership: DomainMembership,
    vm: VmFd,
    mem: GuestMemoryMmap,
    buses: Arc<Buses>,
    stop: Arc<VmStop>,
    pause: Arc<PauseControl>,
    serial: Arc<Mutex<SerialConsole>>,
    interactive: bool,
    virtio: Vec<VirtioSlot>,
    fphash_stats: Arc<FphashStats>,
    timeout: Option<Duration>,
    /// The kernel command line as the guest sees it.
    pub cmdline: String,
}

fn open_kvm() -> Result<Kvm, VmmError> {
    let kvm = Kvm::new().map_err(VmmError::KvmOpen)?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::KvmCapability(name));
        }
    }
    Ok(kvm)
}

/// Step 1: the VM with its in-kernel interrupt controllers and timer.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_START as usize).map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(VmmError::kvm("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

fn serial_output(config: &SerialConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match config {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::None => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::File { path: path.clone(), source })?,
        ),
    })
}

/// Step 3: COM1, the i8042 and the exit-status port on the port-I/O bus.
fn attach_legacy_devices(
    vm: &VmFd,
    buses: &mut Buses,
    stop: &Arc<VmStop>,
    output: Box<dyn Write + Send>,
) -> Result<Arc<Mutex<SerialConsole>>, VmmError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::host("serial irqfd"))?;
    vm.register_irqfd(&irq, SERIAL_COM1_IRQ).map_err(VmmError::kvm("KVM_IRQFD (serial)"))?;
    let console = Arc::new(Mutex::new(SerialConsole::new(irq, output)));
    let bus_error =
        |e: crate::bus::BusError| VmmError::Host { what: "port-I/O bus", source: std::io::Error::other(e) };
    buses
        .pio
        .insert(SERIAL_COM1_PORT.into(), SERIAL_PORT_COUNT.into(), console.clone())
        .map_err(bus_error)?;
    buses
        .pio
        .insert(I8042_DATA_PORT.into(), 5, Arc::new(Mutex::new(I8042::new(stop.clone()))))
        .map_err(bus_error)?;
    buses
        .pio
        .insert(EXIT_STATUS_PORT.into(), 1, Arc::new(Mutex::new(ExitPort::new(stop.clone()))))
        .map_err(bus_error)?;
    Ok(console)
}

/// The VM's virtio devices once attached.
struct VirtioDevices {
    slots: Vec<VirtioSlot>,
    /// `virtio_mmio.device=` command-line tokens, in device order.
    tokens: Vec<String>,
    fphash_stats: Arc<FphashStats>,
}

/// Step 4: one virtio-blk per disk, then the fphash device.
fn attach_virtio_devices(
    vm: &VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    merger: VmMerger,
) -> Result<VirtioDevices, VmmError> {
    let count = config.disks.len() + 1;
    if count > (IRQ_LAST - VIRTIO_IRQ_FIRST + 1) as usize {
        return Err(VmmError::TooManyDevices(count));
    }
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::with_capacity(count);
    for (index, disk) in config.disks.iter().enumerate() {
        devices.push(Box::new(Block::open(&disk.path, disk.read_only, format!("samepage-disk{index}"))?));
    }
    let fphash = FphashDevice::new(Box::new(merger));
    let fphash_stats = fphash.stats();
    devices.push(Box::new(fphash));
    let mut slots = Vec::with_capacity(count);
    let mut tokens = Vec::with_capacity(count);
    for (index, device) in devices.into_iter().enumerate() {
        let (slot, token) = virtio_mmio::attach(vm, buses, mem, index, device)?;
        slots.push(slot);
        tokens.push(token);
    }
    Ok(VirtioDevices { slots, tokens, fphash_stats })
}

/// Whether to add [`EMULATED_CPL0_CMDLINE`].
fn wants_emulated_cpl0(setting: EmulatedCpl0) -> bool {
    match setting {
        EmulatedCpl0::On => true,
        EmulatedCpl0::Off => false,
        EmulatedCpl0::Auto => Path::new(EMULATING_KVM_MODULE).exists(),
    }
}

impl Vm {
    /// Builds a VM from `config`, step by step as docs/boot.md lists them, with its own dedup
    /// domain and console.
    pub fn build(config: &VmConfig) -> Result<Vm, VmmError> {
        Self::build_in(config, VmContext::default())
    }

    /// Builds a VM from `config` in `context` (shared dedup domain, console, stop switch).
    pub fn build_in(config: &VmConfig, context: VmContext) -> Result<Vm, VmmError> {
        config.validate()?;
        let kvm = open_kvm()?;
        let vm = create_vm(&kvm)?;

        // Step 2: guest RAM, known to KVM and to the dedup domain.
        let mem = memory::create_guest_memory(config.mem_bytes)?;
        memory::register_with_kvm(&vm, &mem)?;
        if config.dedup == DedupMode::Ksm {
            memory::mark_mergeable(&mem)?;
        }
        let domain = match context.domain {
            Some(domain) => domain,
            None => Arc::new(Mutex::new(Domain::new(&context.label, Limits::default())?)),
        };
        let membership = DomainMembership::join(domain, &context.label, &mem);
        let pause = Arc::new(PauseControl::new());
        let merger = VmMerger::new(membership.domain.clone(), membership.vm, pause.clone(), config.dedup);

        let mut buses = Buses::default();
        let interactive =
            context.input || (context.console.is_none() && config.serial == SerialConfig::Stdout);
        let console = match context.console {
            Some(out) => out,
            None => serial_output(&config.serial)?,
        };
        let serial = attach_legacy_devices(&vm, &mut buses, &context.stop, console)?;
        let VirtioDevices { slots: virtio, tokens, fphash_stats } =
            attach_virtio_devices(&vm, &mut buses, &mem, config, merger)?;

        // Step 5: kernel, initrd, command line, boot information, MP table.
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&mem, path, config.mem_bytes, kernel.end)?),
            None => None,
        };
        let mut parts = vec![BASE_CMDLINE];
        if wants_emulated_cpl0(config.emulated_cpl0) {
            parts.push(EMULATED_CPL0_CMDLINE);
        }
        parts.extend(tokens.iter().map(String::as_str));
        parts.push(&config.cmdline);
        let cmdline = boot::build_cmdline(&parts)?;
        let cmdline_size = boot::write_cmdline(&mem, &cmdline)?;
        match kernel.entry {
            EntryPoint::Pvh(_) => boot::write_pvh_start_info(&mem, initrd, config.mem_bytes)?,
            EntryPoint::Linux64(_) => {
                boot::write_zero_page(&mem, &kernel, cmdline_size, initrd, config.mem_bytes)?
            }
        }
        mptable::write(&mem, config.vcpus)
            .map_err(|e| VmmError::Host { what: "MP table", source: std::io::Error::other(e) })?;

        // Step 6: vCPUs.
        let supported = cpuid::supported(&kvm).map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = vm.create_vcpu(u64::from(index)).map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
            vcpu::configure(&vcpu, index, config.vcpus, &supported, &mem, kernel.entry)?;
            vcpus.push(vcpu);
        }

        Ok(Vm {
            vcpus,
            membership,
            vm,
            mem,
            buses: Arc::new(buses),
            stop: context.stop,
            pause,
            serial,
            interactive,
            virtio,
            fphash_stats,
            timeout: config.timeout,
            cmdline: cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default(),
        })
    }

    /// The fphash device's counters.
    pub fn fphash_stats(&self) -> Arc<FphashStats> {
        self.fphash_stats.clone()
    }

    /// Runs the VM (see [`Vm::run_and_keep`]) and releases it.
    pub fn run(self) -> Result<VmExit, VmmError> {
        self.run_and_keep().map(|(exit, _)| exit)
    }

    /// Step 7: runs the VM until the guest stops it, it crashes, `--timeout` expires or a
    /// signal arrives; returns why it stopped.
    ///
    /// The stopped VM keeps its guest RAM (and its pages in the dedup domain) until the
    /// returned [`StoppedVm`] is dropped, so that memory can be measured after the guest ends.
    pub fn run_and_keep(mut self) -> Result<(VmExit, StoppedVm), VmmError> {
        vcpu::install_kick_handler().map_err(VmmError::host("vCPU kick signal handler"))?;
        signals::install().map_err(VmmError::host("signal handlers"))?;
        let _raw_mode = if self.interactive { terminal::RawMode::enable() } else { None };
        if self.interactive {
            terminal::spawn_input_thread(self.serial.clone(), self.stop.clone(), _raw_mode.is_some())
                .map_err(VmmError::host("stdin thread"))?;
        }
        let loop_stop = EventFd::new(EFD_NONBLOCK).map_err(VmmError::host("event loop eventfd"))?;
        let event_loop = spawn_event_loop(
            std::mem::take(&mut self.virtio),
            loop_stop.try_clone().map_err(VmmError::host("event loop eventfd"))?,
        )
        .map_err(VmmError::host("virtio event loop"))?;

        let started = Instant::now();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (index, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let (buses, stop, pause) = (self.buses.clone(), self.stop.clone(), self.pause.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu::run_loop(vcpu, index as u8, buses, stop, pause))
                .map_err(VmmError::host("vCPU thread"))?;
            threads.push(thread);
        }

        let exit = self.wait_for_stop(started);
        // Kick until every vCPU has left KVM_RUN: a kick can land just before a thread enters it.
        while threads.iter().any(|t| !t.is_finished()) {
            threads.iter().filter(|t| !t.is_finished()).for_each(|t| vcpu::kick_thread(t.as_pthread_t()));
            std::thread::sleep(Duration::from_millis(2));
        }
        for thread in threads {
            let _ = thread.join();
        }
        let _ = loop_stop.write(1);
        let _ = event_loop.join();
        Ok((exit, StoppedVm { membership: self.membership, _vm: self.vm, mem: self.mem }))
    }

    fn wait_for_stop(&self, started: Instant) -> VmExit {
        loop {
            if let Some(exit) = self.stop.wait(Duration::from_millis(20)) {
                return exit;
            }
            if let Some(num) = signals::pending() {
                self.stop.request(VmExit::Signal(num));
            }
            if let Some(limit) = self.timeout {
                if started.elapsed() >= limit {
                    self.stop.request(VmExit::Timeout(limit));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stop_request_wins() {
        let stop = VmStop::new();
        assert_eq!(stop.wait(Duration::from_millis(1)), None);
        stop.request(VmExit::GuestStatus(3));
        stop.request(VmExit::Reset);
        assert_eq!(stop.wait(Duration::from_millis(1)), Some(VmExit::GuestStatus(3)));
    }

    #[test]
    fn exit_codes_are_as_documented() {
        assert_eq!(VmExit::GuestStatus(7).exit_code(), 7);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Timeout(Duration::from_secs(1)).exit_code(), 124);
        assert_eq!(VmExit::Crashed { vcpu: 0, reason: String::new(), rip: 0 }.exit_code(), 125);
        assert_eq!(VmExit::Signal(libc::SIGTERM).exit_code(), 143);
    }
}
