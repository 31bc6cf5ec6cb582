//! The steps of building a VM (`docs/boot.md`), one function each, in the order
//! [`crate::vmm::Vm::build_in`] calls them: the layout, KVM, the VM, the command line, the
//! console, the legacy and virtio devices, the vCPUs.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use samepage_virtio::block::Block;
use samepage_virtio::entropy::{Entropy, EntropySource, EntropyStats, HostRandom};
use samepage_virtio::fphash::{FphashDevice, FphashStats};
use samepage_virtio::net::{Net, NetStats};
use samepage_virtio::vsock::{Vsock, VsockStats};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::Buses;
use crate::checked_open::{self, HostFileError};
use crate::config::{DiskConfig, EmulatedCpl0, NetConfig, SerialConfig, TapSource, VmConfig, VsockConfig};
use crate::devices::exit_port::ExitPort;
use crate::devices::fphash::VmMerger;
use crate::devices::i8042::I8042;
use crate::devices::image::ImageLeases;
use crate::devices::serial::SerialConsole;
use crate::devices::virtio_mmio::{self, VirtioSlot};
use crate::error::VmmError;
use crate::metrics::DiskCounters;
use crate::snapshot::SnapshotState;
use crate::stop::VmStop;
use crate::vcpu;
use crate::x86_64::boot::EntryPoint;
use crate::x86_64::layout::{
    EXIT_STATUS_PORT, I8042_DATA_PORT, KEYBOARD_IRQ, KVM_TSS_START, MAX_VIRTIO_DEVICES, SERIAL_COM1_IRQ,
    SERIAL_COM1_PORT, SERIAL_PORT_COUNT,
};
use crate::x86_64::vm_layout::{VirtioWindow, VmLayout};

/// Kernel parameters samepage always passes: the console on COM1, and reboot through the i8042
/// (there is no ACPI).
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k";
/// Parameters for hosts whose KVM emulates guest kernel code (docs/guest-interface.md): no
/// XSAVE, hide instructions the emulator lacks or runs slowly, and the guest patch's switch.
pub const EMULATED_CPL0_CMDLINE: &str = "noxsave clearcpuid=popcnt,smap,fsrm,erms emulated_cpl0";
/// The kernel module that serves /dev/kvm on hosts that emulate guest kernel code.
const EMULATING_KVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Step 1: where the VM's RAM and devices lie, once for every later step: RAM around the MMIO
/// gap, a virtio-mmio window and IRQ for each disk, the fphash device and the balloon.
pub(crate) fn plan_layout(config: &VmConfig) -> Result<VmLayout, VmmError> {
    let devices = config.disks.len()
        + 1
        + usize::from(config.entropy)
        + usize::from(config.balloon.is_some())
        + usize::from(config.vsock.is_some())
        + config.nets.len();
    if devices > MAX_VIRTIO_DEVICES {
        return Err(VmmError::TooManyDevices(devices));
    }
    Ok(VmLayout::new(config.mem_bytes, config.disks.len())
        .with_entropy(config.entropy)
        .with_balloon(config.balloon.is_some())
        .with_vsock(config.vsock.is_some())
        .with_nets(config.nets.len()))
}

/// Step 2: `/dev/kvm`, with the capabilities samepage relies on.
pub(crate) fn open_kvm() -> Result<Kvm, VmmError> {
    let kvm = Kvm::new().map_err(|source| match source.errno() {
        // SAFETY: getuid has no preconditions.
        libc::EACCES | libc::EPERM => VmmError::KvmAccess { uid: unsafe { libc::getuid() }, source },
        _ => VmmError::KvmOpen(source),
    })?;
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

/// Step 3: the VM with its in-kernel interrupt controllers and timer.
pub(crate) fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_START as usize).map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(VmmError::kvm("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// The kernel command line in parts: samepage's own parameters, the emulating-KVM workarounds
/// if wanted, a `virtio_mmio.device=` token per device where the layout puts it, then the
/// user's `--cmdline`.
pub(crate) fn kernel_cmdline(config: &VmConfig, layout: &VmLayout) -> Vec<String> {
    let mut parts = vec![BASE_CMDLINE.to_string()];
    if wants_emulated_cpl0(config.emulated_cpl0) {
        parts.push(EMULATED_CPL0_CMDLINE.to_string());
    }
    parts.extend(layout.virtio_windows().map(VirtioWindow::cmdline_token));
    parts.push(config.cmdline.clone());
    parts
}

pub(crate) fn serial_output(config: &SerialConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match config {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::None => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(checked_open::append_output(path).map_err(|e| match e {
            HostFileError::Io(source) => VmmError::ConsoleOpen { path: path.clone(), source },
            HostFileError::WrongType { found, .. } => VmmError::ConsoleType { path: path.clone(), found },
        })?),
    })
}

/// The legacy devices the VMM talks to after the build.
pub(crate) struct LegacyDevices {
    /// COM1.
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    /// The keyboard controller (for `SendCtrlAltDel`).
    pub(crate) i8042: Arc<Mutex<I8042>>,
}

/// Step 6: COM1, the i8042 (its keyboard on IRQ 1) and the exit-status port on the port-I/O
/// bus.
pub(crate) fn attach_legacy_devices(
    vm: &VmFd,
    buses: &mut Buses,
    stop: &Arc<VmStop>,
    output: Box<dyn Write + Send>,
) -> Result<LegacyDevices, VmmError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::host("serial irqfd"))?;
    vm.register_irqfd(&irq, SERIAL_COM1_IRQ).map_err(VmmError::kvm("KVM_IRQFD (serial)"))?;
    let console = Arc::new(Mutex::new(SerialConsole::new(irq, output)));
    let bus_error = |what: &'static str| move |source| VmmError::Bus { what, source };
    buses
        .pio
        .insert(SERIAL_COM1_PORT.into(), SERIAL_PORT_COUNT.into(), console.clone())
        .map_err(bus_error("COM1"))?;
    let keyboard_irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::host("keyboard irqfd"))?;
    vm.register_irqfd(&keyboard_irq, KEYBOARD_IRQ).map_err(VmmError::kvm("KVM_IRQFD (keyboard)"))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(stop.clone(), Box::new(keyboard_irq))));
    buses.pio.insert(I8042_DATA_PORT.into(), 5, i8042.clone()).map_err(bus_error("the i8042"))?;
    buses
        .pio
        .insert(EXIT_STATUS_PORT.into(), 1, Arc::new(Mutex::new(ExitPort::new(stop.clone()))))
        .map_err(bus_error("the exit-status port"))?;
    Ok(LegacyDevices { serial: console, i8042 })
}

/// The VM's virtio devices once attached.
pub(crate) struct VirtioDevices {
    /// One virtio-blk per disk, in `--disk` order.
    pub(crate) disks: Vec<VirtioSlot>,
    /// The fphash device.
    pub(crate) fphash: VirtioSlot,
    pub(crate) fphash_stats: Arc<FphashStats>,
    pub(crate) disk_counters: Vec<DiskCounters>,
}

/// Step 8: one virtio-blk per disk (a read-only image shared under a lease where it may be),
/// then the fphash device, which merges through `merger`; each where the layout puts it.
pub(crate) fn attach_virtio_devices(
    vm: &VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    layout: &VmLayout,
    disks: &[DiskConfig],
    merger: VmMerger,
    leases: &mut ImageLeases,
) -> Result<VirtioDevices, VmmError> {
    let mut blocks = Vec::with_capacity(disks.len());
    let mut disk_counters = Vec::with_capacity(disks.len());
    for (index, disk) in disks.iter().enumerate() {
        let mut block = Block::open(&disk.path, disk.read_only, format!("samepage-disk{index}"))?;
        let mut shared = false;
        if disk.shares() {
            shared = leases.share(&mut block);
            if shared {
                crate::ext4::warn_if_small_blocks(&disk.path, |buf, at| block.read_image_at(buf, at));
            }
        }
        let stats = block.stats();
        disk_counters.push(DiskCounters {
            path: disk.path.clone(),
            read_only: disk.read_only,
            shared,
            stats,
        });
        blocks.push(block);
    }
    // A VM generation ID made anew for every start of the VM: a restored clone reads one that
    // its driver has not seen and reseeds its RNG (docs/snapshot.md, "Clones").
    let mut vm_generation = [0u8; samepage_virtio::fphash::VM_GENERATION_LEN];
    HostRandom.fill(&mut vm_generation).map_err(VmmError::host("the VM generation ID"))?;
    let fphash = FphashDevice::new(Box::new(merger)).with_vm_generation(vm_generation);
    let fphash_stats = fphash.stats();
    let mut slots = Vec::with_capacity(blocks.len());
    for (block, window) in blocks.into_iter().zip(layout.disk_windows()) {
        slots.push(virtio_mmio::attach(vm, buses, mem, window, Box::new(block))?);
    }
    let fphash = virtio_mmio::attach(vm, buses, mem, layout.fphash_window(), Box::new(fphash))?;
    Ok(VirtioDevices { disks: slots, fphash, fphash_stats, disk_counters })
}

/// Step 8, `--entropy`: the virtio entropy device where the layout puts it, drawing from the
/// host's getrandom.
pub(crate) fn attach_entropy(
    vm: &VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    layout: &VmLayout,
) -> Result<Option<(VirtioSlot, Arc<EntropyStats>)>, VmmError> {
    let Some(window) = layout.entropy_window() else { return Ok(None) };
    let device = Entropy::new(Box::new(HostRandom));
    let stats = device.stats();
    Ok(Some((virtio_mmio::attach(vm, buses, mem, window, Box::new(device))?, stats)))
}

/// Step 8, `--vsock`: the virtio-vsock device where the layout puts it, its host clients'
/// socket claimed (a stale one a dead process left is replaced, a live one refused) and bound
/// with mode 0600.
pub(crate) fn attach_vsock(
    vm: &VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    layout: &VmLayout,
    config: Option<&VsockConfig>,
) -> Result<Option<(VirtioSlot, Arc<VsockStats>)>, VmmError> {
    let (Some(window), Some(config)) = (layout.vsock_window(), config) else { return Ok(None) };
    let path = &config.uds_path;
    let probe = |p: &Path| std::os::unix::net::UnixStream::connect(p).map(drop);
    crate::socket_file::claim(path, probe)
        .and_then(|_| crate::socket_file::bind_private(path, libc::SOCK_STREAM, VSOCK_BACKLOG))
        .map_err(VmmError::VsockSocket)
        .and_then(|fd| {
            let listener = std::os::unix::net::UnixListener::from(fd);
            Vsock::new(config.guest_cid, listener, path.clone()).map_err(VmmError::host("the vsock device"))
        })
        .and_then(|device| {
            let stats = device.stats();
            Ok(Some((virtio_mmio::attach(vm, buses, mem, window, Box::new(device))?, stats)))
        })
}

/// Step 8, `--net`: a virtio-net device per tap where the layout puts them, each tap attached
/// (or a passed-in tap descriptor taken over) now, before the seccomp filters.
pub(crate) fn attach_nets(
    vm: &VmFd,
    buses: &mut Buses,
    mem: &GuestMemoryMmap,
    layout: &VmLayout,
    nets: &[NetConfig],
) -> Result<Vec<(VirtioSlot, Arc<NetStats>)>, VmmError> {
    let mut attached = Vec::with_capacity(nets.len());
    for (net, window) in nets.iter().zip(layout.net_windows()) {
        let (fd, name) = match &net.tap {
            TapSource::Name(name) => (crate::tap::open(name)?, name.clone()),
            TapSource::Fd(fd) => crate::tap::adopt(*fd)?,
        };
        let mac = net.mac.unwrap_or_else(|| crate::tap::default_mac(&name));
        let device = Net::new(fd, mac).map_err(VmmError::host("a network device"))?;
        log::info!("net: tap {name}, guest MAC {}", crate::config::mac_text(&mac));
        let stats = device.stats();
        attached.push((virtio_mmio::attach(vm, buses, mem, window, Box::new(device))?, stats));
    }
    Ok(attached)
}

/// Host clients of the vsock socket waiting to be accepted.
const VSOCK_BACKLOG: i32 = 128;

/// Step 9: the vCPUs, with their CPUID, registers and, for the boot CPU, the kernel's entry.
pub(crate) fn create_vcpus(
    vm: &VmFd,
    count: u8,
    supported: &CpuId,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<Vec<VcpuFd>, VmmError> {
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let vcpu = vm.create_vcpu(u64::from(index)).map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
        vcpu::configure(&vcpu, index, count, supported, mem, entry)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Step 9 of a restore: the vCPUs, each with its saved state.
pub(crate) fn restore_vcpus(vm: &VmFd, state: &SnapshotState) -> Result<Vec<VcpuFd>, VmmError> {
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in state.vcpus.iter().enumerate() {
        let vcpu = vm.create_vcpu(index as u64).map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
        saved.restore(&vcpu, index as u8)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Whether to add [`EMULATED_CPL0_CMDLINE`].
pub(crate) fn wants_emulated_cpl0(setting: EmulatedCpl0) -> bool {
    match setting {
        EmulatedCpl0::On => true,
        EmulatedCpl0::Off => false,
        EmulatedCpl0::Auto => Path::new(EMULATING_KVM_MODULE).exists(),
    }
}
