//! Building a VM in one place, in the order of docs/boot.md, and running it until it stops.

mod api_calls;
mod device_counters;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use samepage_virtio::entropy::EntropyStats;
use samepage_virtio::fphash::FphashStats;
use samepage_virtio::net::NetStats;
use samepage_virtio::vsock::VsockStats;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::api::ApiInbox;
use crate::balloon::control::{self, ControlSocket};
use crate::balloon::VmBalloon;
use crate::bus::lock;
use crate::bus::Buses;
use crate::config::{DedupMode, SerialConfig, VmConfig};
use crate::dedup::Domain;
use crate::devices::fphash::VmMerger;
use crate::devices::image::ImageLeases;
use crate::devices::serial::SerialConsole;
use crate::devices::virtio_mmio::{spawn_event_loop, OnEvent, Periodic, ServeNoSooner, VirtioSlot};
pub use crate::domain_membership::DomainMembership;
use crate::error::VmmError;
use crate::metrics::{self, DiskCounters, VmMetrics, METRICS_EVERY};
use crate::pause::PauseControl;
use crate::raw_mode::RawMode;
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::marker::MarkerWatch;
use crate::snapshot::plan::{MarkerTrigger, Snapshotter};
use crate::snapshot::state::SavedDisk;
use crate::snapshot::{self, Snapshot, SnapshotError, SnapshotFiles};
use crate::vcpu;
use crate::x86_64::boot::{self, BootImages};
use crate::x86_64::cpuid;
use crate::{memory, signals, terminal};

use crate::stop::CrashReason;
pub use crate::stop::{VmExit, VmStop};
pub use crate::vm_build::EMULATED_CPL0_CMDLINE;
use crate::vm_build::{
    attach_entropy, attach_legacy_devices, attach_nets, attach_virtio_devices, attach_vsock, create_vcpus,
    create_vm, kernel_cmdline, open_kvm, plan_layout, restore_vcpus, serial_output, LegacyDevices,
    VirtioDevices,
};

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
    /// The dedup domain of this process to merge pages in (`density --threads` shares one);
    /// `None` makes one for this VM as `config.dedup` says (alone, or through the broker).
    pub domain: Option<Arc<Mutex<Domain>>>,
    /// Write the VM's counters here as JSON while it runs and when it stops.
    pub metrics: Option<PathBuf>,
    /// The VM may be asked for snapshots while it runs (through the API): its vCPU threads
    /// are made ready to save their vCPUs.
    pub snapshots_on_request: bool,
}

impl Default for VmContext {
    fn default() -> Self {
        VmContext {
            label: "vm".into(),
            console: None,
            input: false,
            stop: Arc::new(VmStop::new()),
            domain: None,
            metrics: None,
            snapshots_on_request: false,
        }
    }
}

/// A stopped VM whose guest RAM is still mapped.
pub struct StoppedVm {
    // Field order is drop order: leave the domain before the RAM goes.
    /// Its dedup domain membership (`None` when a wedged thread was left behind).
    pub membership: Option<DomainMembership>,
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
    /// What the event loop does when a shared image's lease breaks.
    on_lease_break: Option<OnEvent>,
    fphash_stats: Arc<FphashStats>,
    disks: Vec<DiskCounters>,
    /// The balloon (`--balloon`), its statistics timer and its control socket, bound.
    balloon: Option<VmBalloon>,
    balloon_stats: Option<Periodic>,
    balloon_socket: Option<ControlSocket>,
    timeout: Option<Duration>,
    dedup_scan_every: Duration,
    metrics: Option<PathBuf>,
    label: String,
    /// What snapshots of this VM are taken with (`--snapshot-to`, or the API).
    snapshotter: Option<Snapshotter>,
    /// `--snapshot-to`'s trigger, until the snapshot is taken.
    marker: Option<MarkerTrigger>,
    /// The API's calls, answered while the VM runs, and the configuration `GET /vm/config`
    /// shows.
    api: Option<(ApiInbox, serde_json::Value)>,
    /// The entropy device's counters (`--entropy`).
    entropy: Option<Arc<EntropyStats>>,
    /// The keyboard controller (the API's `SendCtrlAltDel`).
    i8042: Arc<Mutex<crate::devices::i8042::I8042>>,
    /// Each disk's transport, in `--disk` order.
    disk_transports: Vec<Arc<Mutex<samepage_virtio::MmioTransport>>>,
    /// The vsock device's counters (`--vsock`).
    vsock: Option<Arc<VsockStats>>,
    /// Each network device's counters (`--net`).
    nets: Vec<Arc<NetStats>>,
    /// The kernel command line as the guest sees it.
    pub cmdline: String,
}

impl Vm {
    /// Builds a VM from `config`, step by step as docs/boot.md lists them, with its own dedup
    /// domain and console.
    pub fn build(config: &VmConfig) -> Result<Vm, VmmError> {
        Self::build_in(config, VmContext::default())
    }

    /// Builds a VM from `config` in `context` (shared dedup domain, console, stop switch), in
    /// one pass, in the order of docs/boot.md: the layout first, which every later step reads;
    /// guest RAM; everything the kernel boots from; the devices that merge nothing; the VM's
    /// place in its dedup domain; the devices that merge into it; the vCPUs.
    pub fn build_in(config: &VmConfig, context: VmContext) -> Result<Vm, VmmError> {
        Self::assemble(config, context, None)
    }

    /// Restores the VM snapshotted in `files` (docs/snapshot.md, "Restoring"): the snapshot's
    /// hardware (RAM, vCPUs, disks, command line) with `config`'s host-side settings (merging,
    /// console, timeout, a further snapshot), built as [`Vm::build_in`] builds, with RAM mapped
    /// from the snapshot's memory file instead of a boot, and every saved state put back.
    pub fn restore_in(files: &SnapshotFiles, config: &VmConfig, context: VmContext) -> Result<Vm, VmmError> {
        let snapshot = snapshot::open(files)?;
        let machine = &snapshot.state.machine;
        // Checked by `snapshot::open`.
        let balloon = machine.balloon.as_deref().and_then(|options| options.parse().ok());
        let config = VmConfig {
            kernel: machine.kernel.clone(),
            initrd: None,
            cmdline: machine.cmdline.clone(),
            mem_bytes: machine.mem_bytes,
            vcpus: machine.vcpus,
            disks: machine.disks.iter().map(SavedDisk::config).collect(),
            entropy: machine.entropy,
            balloon,
            // A VM with a vsock or network device is never snapshotted.
            vsock: None,
            nets: Vec::new(),
            ..config.clone()
        };
        if let Some(request) = &config.snapshot {
            if SnapshotFiles::in_dir(&request.dir).overlaps(files) {
                return Err(SnapshotError::Invalid(
                    "--snapshot-to is the directory restored from: a snapshot there would replace the one \
                     every later clone restores"
                        .into(),
                )
                .into());
            }
        }
        Self::assemble(&config, context, Some(&snapshot))
    }

    fn assemble(config: &VmConfig, context: VmContext, restore: Option<&Snapshot>) -> Result<Vm, VmmError> {
        config.validate()?;
        // Steps 1 to 3: the layout, KVM, the VM.
        let layout = plan_layout(config)?;
        let kvm = open_kvm()?;
        let vm = create_vm(&kvm)?;

        // Step 4: guest RAM where the layout puts it, within the vCPUs' reach.
        let supported = cpuid::supported(&kvm).map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let ksm = config.dedup.mode == DedupMode::Ksm;
        let emulating = crate::vm_build::wants_emulated_cpl0(crate::config::EmulatedCpl0::Auto);
        let host = snapshot::host_identity(&kvm, &supported, emulating);
        let phys_bits = cpuid::phys_addr_bits(&supported);
        let mem = match restore {
            None => memory::create_guest_ram(&vm, &layout, phys_bits, ksm)?,
            Some(snapshot) => {
                snapshot::check_host(&snapshot.state, &host)?;
                memory::restore_guest_ram(&vm, &layout, phys_bits, &snapshot.memory, ksm)?
            }
        };

        // Step 5: kernel, initrd, command line, boot information, MP table, in one call; a
        // restored VM has them in its RAM already.
        let mut booted = match restore {
            None => {
                let cmdline = kernel_cmdline(config, &layout);
                let cmdline: Vec<&str> = cmdline.iter().map(String::as_str).collect();
                let images = BootImages {
                    kernel: &config.kernel,
                    initrd: config.initrd.as_deref(),
                    cmdline: &cmdline,
                    vcpus: config.vcpus,
                };
                let booted = boot::load(&mem, &layout, &images)?;
                // An ELF kernel's data segment holds page-aligned arrays of zeros, which the
                // loader copied into private pages (0.43 MiB per Linux guest of this project,
                // docs/bench-linux-density.md): given back, they cost nothing until written.
                let (start, end) = booted.kernel_span;
                let dropped = memory::drop_zero_pages(&mem, start, end);
                log::info!(
                    "{}: {dropped} pages of zeros the kernel's loading wrote given back",
                    context.label
                );
                Some(booted)
            }
            Some(_) => None,
        };
        let guest_cmdline = match (&booted, restore) {
            (Some(booted), _) => booted.cmdline.clone(),
            (None, Some(snapshot)) => snapshot.state.machine.cmdline.clone(),
            (None, None) => String::new(),
        };

        // Step 6: the devices that merge nothing.
        let mut buses = Buses::default();
        let interactive =
            context.input || (context.console.is_none() && config.serial == SerialConfig::Stdout);
        let console = match context.console {
            Some(out) => out,
            None => serial_output(&config.serial)?,
        };
        let snapshot_seen = Arc::new(AtomicBool::new(false));
        let console = match &config.snapshot {
            Some(request) => Box::new(MarkerWatch::new(console, &request.at, snapshot_seen.clone())),
            None => console,
        };
        let LegacyDevices { serial, i8042 } = attach_legacy_devices(&vm, &mut buses, &context.stop, console)?;
        if let Some(snapshot) = restore {
            lock(&serial).restore_state(&snapshot.state.serial).map_err(SnapshotError::Serial)?;
        }

        // Step 7: the VM's place in its dedup domain.
        // SAFETY: `Vm` and `StoppedVm` keep `mem` alive until this membership is dropped (their
        // field order).
        let membership = unsafe { DomainMembership::join(config, &context.label, context.domain, &mem)? };

        // Step 8: the virtio devices, which merge into that domain (fphash) or map pages into
        // the VM through it (shared images).
        let pause = Arc::new(PauseControl::new(vcpu::kick_thread));
        let gather = Arc::new(ServeNoSooner::default());
        let merger = VmMerger::new(
            membership.domain.clone(),
            membership.vm,
            pause.clone(),
            config.dedup.mode,
            gather.clone(),
        );
        let mut leases = ImageLeases::new(
            membership.domain.clone(),
            membership.vm,
            &context.label,
            pause.clone(),
            context.stop.clone(),
        )
        .map_err(VmmError::host("the image lease inbox"))?;
        let VirtioDevices { disks: mut virtio, mut fphash, fphash_stats, disk_counters } =
            attach_virtio_devices(&vm, &mut buses, &mem, &layout, &config.disks, merger, &mut leases)?;
        // The disks' transports, for an image swapped while the VM runs (the API's PATCH).
        let disk_transports = virtio.iter().map(|slot| slot.transport.clone()).collect();
        // The kernel's text and read-only data, held once by every VM that boots its file; not
        // in the baselines (`--dedup off`: nothing merged; `ksm`: KSM alone).
        let read_only_kernel = booted.as_mut().and_then(|b| b.read_only_kernel.take());
        if let (Some(read_only), DedupMode::Hinted) = (read_only_kernel, config.dedup.mode) {
            let kernel = leases.share_kernel(read_only, &config.kernel, &mem);
            log::info!(
                "{}: kernel {}: {} pages of its text and read-only data map the file ({} stay copies)",
                context.label,
                config.kernel.display(),
                kernel.pages,
                kernel.copied
            );
        }
        if let Some(snapshot) = restore {
            leases
                .guard_snapshot_memory(
                    &snapshot.memory,
                    &snapshot.files.memory,
                    snapshot.memory_identity,
                    &mem,
                )
                .map_err(VmmError::host("a guard on the snapshot memory file"))?;
        }
        let on_lease_break = leases.into_event().map_err(VmmError::host("the image lease inbox"))?;
        // The fphash device merges guest pages: its queue is served with the vCPUs paused.
        // Its batches cost per batch more than per page: small ones let the next gather.
        if config.dedup.mode == DedupMode::Hinted {
            fphash.pause = Some(pause.clone());
            fphash.gather = Some(gather);
        }
        fphash.wedge = crate::fault::injected("wedge-fphash");
        let fphash_transport = fphash.transport.clone();
        virtio.push(fphash);
        let entropy = match attach_entropy(&vm, &mut buses, &mem, &layout)? {
            Some((slot, stats)) => {
                virtio.push(slot);
                Some(stats)
            }
            None => None,
        };
        // The balloon, which gives pages back through the domain, and its control socket.
        let (mut balloon, mut balloon_stats) = (None, None);
        if let (Some(options), Some(window)) = (config.balloon, layout.balloon_window()) {
            let attached =
                crate::devices::balloon::attach(&vm, &mut buses, &mem, window, options, &membership, ksm)?;
            virtio.push(attached.slot);
            balloon = Some(attached.balloon);
            balloon_stats = attached.stats;
        }
        // The vsock device comes last (the layout's order).
        let vsock = match attach_vsock(&vm, &mut buses, &mem, &layout, config.vsock.as_ref())? {
            Some((slot, stats)) => {
                virtio.push(slot);
                Some(stats)
            }
            None => None,
        };
        // Then the network devices, last.
        let mut nets = Vec::with_capacity(config.nets.len());
        for (slot, stats) in attach_nets(&vm, &mut buses, &mem, &layout, &config.nets)? {
            virtio.push(slot);
            nets.push(stats);
        }
        let balloon_socket = config.balloon_socket.as_deref().map(ControlSocket::bind).transpose()?;
        if let Some(snapshot) = restore {
            for (index, (slot, saved)) in virtio.iter().zip(&snapshot.state.devices).enumerate() {
                lock(&slot.transport)
                    .restore_state(saved)
                    .map_err(|source| SnapshotError::Device { index, source })?;
            }
        }

        // Step 9: the vCPUs, booting or as the snapshot had them.
        let vcpus = match (&booted, restore) {
            (Some(booted), _) => create_vcpus(&vm, config.vcpus, &supported, &mem, booted.entry)?,
            (None, Some(snapshot)) => restore_vcpus(&vm, &snapshot.state)?,
            (None, None) => Vec::new(),
        };
        if let Some(snapshot) = restore {
            snapshot.state.vm.restore(&vm).map_err(SnapshotError::VmState)?;
            // Requests the guest made just before the snapshot, whose notification the device
            // thread had not served yet: served now, before the guest runs.
            for slot in &virtio {
                lock(&slot.transport).process_notifications();
            }
            // The fphash device's new VM generation ID, announced to the restored driver,
            // which reseeds the guest's RNG in that interrupt before the guest runs on. Raised
            // only now: KVM_SET_IRQCHIP above would have dropped an interrupt raised before it.
            lock(&fphash_transport).config_changed();
        }
        let snapshotter = if config.snapshot.is_some() || context.snapshots_on_request {
            let transports = virtio.iter().map(|slot| slot.transport.clone()).collect();
            Some(Snapshotter::new(&kvm, config, transports, &guest_cmdline, host)?)
        } else {
            None
        };
        let marker =
            config.snapshot.as_ref().map(|request| MarkerTrigger::new(request, snapshot_seen)).transpose()?;

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
            on_lease_break,
            fphash_stats,
            disks: disk_counters,
            balloon,
            balloon_stats,
            balloon_socket,
            timeout: config.timeout,
            dedup_scan_every: config.dedup.scan_every,
            metrics: context.metrics,
            label: context.label,
            snapshotter,
            marker,
            api: None,
            entropy,
            vsock,
            nets,
            disk_transports,
            i8042,
            cmdline: guest_cmdline,
        })
    }

    /// The fphash device's counters.
    pub fn fphash_stats(&self) -> Arc<FphashStats> {
        self.fphash_stats.clone()
    }

    /// The disks' counters, in `--disk` order.
    pub fn disk_counters(&self) -> Vec<DiskCounters> {
        self.disks.clone()
    }

    /// The balloon, when the VM has one.
    pub fn balloon(&self) -> Option<VmBalloon> {
        self.balloon.clone()
    }

    /// Answers the API's calls from `inbox` while the VM runs; `config` is what
    /// `GET /vm/config` shows. Build the VM with [`VmContext::snapshots_on_request`] for
    /// `PUT /snapshot/create` to work.
    pub fn serve_api(&mut self, inbox: ApiInbox, config: serde_json::Value) {
        self.api = Some((inbox, config));
    }

    /// Keeps the vCPUs from entering the guest until the API resumes the VM (a snapshot
    /// loaded without `resume_vm`).
    pub fn start_paused(&self) {
        self.pause.hold();
    }

    /// Runs the VM (see [`Vm::run_and_keep`]) and releases it.
    pub fn run(self) -> Result<VmExit, VmmError> {
        self.run_and_keep().map(|(exit, _)| exit)
    }

    /// Runs the VM (docs/boot.md, "Running") until the guest stops it, it crashes, `--timeout`
    /// expires or a signal arrives; returns why it stopped.
    ///
    /// The stopped VM keeps its guest RAM (and its pages in the dedup domain) until the
    /// returned [`StoppedVm`] is dropped, so that memory can be measured after the guest ends.
    /// Stopping takes a bounded time: threads that do not end within [`STOP_GRACE`] (a wedged
    /// device) are left behind with what they hold, and the VM leaves its domain only when the
    /// process exits.
    pub fn run_and_keep(mut self) -> Result<(VmExit, StoppedVm), VmmError> {
        vcpu::install_kick_handler().map_err(VmmError::host("vCPU kick signal handler"))?;
        signals::install().map_err(VmmError::Signals)?;
        signals::watch(&self.stop);
        let _raw_mode = if self.interactive { RawMode::enable() } else { None };
        if self.interactive {
            terminal::spawn_input_thread(self.serial.clone(), self.stop.clone(), _raw_mode.is_some())?;
        }
        let refresh = Periodic {
            every: self.dedup_scan_every,
            action: Box::new(self.membership.refresher(self.pause.clone())),
        };
        let periodic = std::iter::once(refresh).chain(self.balloon_stats.take()).collect();
        let event_loop = spawn_event_loop(
            std::mem::take(&mut self.virtio),
            periodic,
            self.on_lease_break.take(),
            self.vsock.is_some(),
        )?;
        let control = match control::serve_if_bound(self.balloon_socket.take(), self.balloon.as_ref()) {
            Ok(control) => control,
            Err(e) => {
                event_loop.stop(Instant::now() + STOP_GRACE);
                return Err(e.into());
            }
        };

        let started = Instant::now();
        // The vCPUs enter the guest only once every thread of the VM runs under its seccomp
        // filter, this one included: they wait for this lock, held until then.
        let start_gate = Arc::new(RwLock::new(()));
        let gate_held = start_gate.write().unwrap_or_else(PoisonError::into_inner);
        let threads = self.spawn_vcpus(&start_gate);
        if let Err(e) = seccomp::install(ThreadKind::Vmm) {
            // Nothing ran in the guest: the vCPUs leave at the gate.
            self.pause.stop_all();
            drop(gate_held);
            event_loop.stop(Instant::now() + STOP_GRACE);
            control::stop_if_running(control, Instant::now() + STOP_GRACE);
            return Err(e.into());
        }
        drop(gate_held);

        let exit = self.wait_for_stop(started);
        if crate::fault::injected("panic-vmm") {
            crate::fault::panic("panic-vmm");
        }
        // One kick per vCPU thread; then a bounded wait for them and for the device thread.
        self.pause.stop_all();
        let deadline = Instant::now() + STOP_GRACE;
        let vcpus_left = self.pause.wait_stopped(deadline);
        let devices_stopped = event_loop.stop(deadline) & control::stop_if_running(control, deadline);
        if vcpus_left > 0 || !devices_stopped {
            log::error!(
                "{}: {vcpus_left} vCPU thread(s) and {} device thread did not stop within {} s; \
                 leaving them behind",
                self.membership.vm_label,
                if devices_stopped { "no" } else { "the" },
                STOP_GRACE.as_secs()
            );
            // Whatever a wedged thread holds (the domain's lock included) stays held: the VM's
            // place in its domain is released when the process exits.
            std::mem::forget(self.membership);
            return Ok((exit, StoppedVm { membership: None, _vm: self.vm, mem: self.mem }));
        }
        for thread in threads {
            let _ = thread.join();
        }
        self.write_final_metrics(started, &exit);
        Ok((exit, StoppedVm { membership: Some(self.membership), _vm: self.vm, mem: self.mem }))
    }

    /// Starts one thread per vCPU, each under its seccomp filter, waiting for `gate` before it
    /// enters the guest. A thread that cannot start (or take its filter) stops the VM.
    fn spawn_vcpus(&mut self, gate: &Arc<RwLock<()>>) -> Vec<JoinHandle<()>> {
        let mut threads = Vec::new();
        for (index, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let (buses, stop, pause) = (self.buses.clone(), self.stop.clone(), self.pause.clone());
            let saves = self.snapshotter.as_ref().map(|s| s.saves.clone());
            let gate = gate.clone();
            let thread = seccomp::spawn(format!("vcpu{index}"), ThreadKind::Vcpu, move || {
                drop(gate.read());
                vcpu::run_loop(vcpu, index as u8, buses, stop, pause, saves)
            });
            match thread {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    log::error!("{}", crate::error_chain(&e));
                    self.stop.request(VmExit::Crashed {
                        vcpu: index as u8,
                        reason: CrashReason::ThreadStart(e.errno()),
                        rip: 0,
                    });
                    break;
                }
            }
        }
        threads
    }

    /// Waits for the first stop request; `--timeout` makes one. With `--metrics`, rewrites
    /// the metrics file every [`METRICS_EVERY`] meanwhile.
    fn wait_for_stop(&mut self, started: Instant) -> VmExit {
        // The command line bounds --timeout; a deadline past what the clock holds is none.
        let deadline = self.timeout.and_then(|limit| started.checked_add(limit));
        loop {
            self.take_snapshot_if_due();
            let metrics_tick = self.metrics.as_ref().map(|_| Instant::now() + METRICS_EVERY);
            // While a snapshot waits for its marker, the console is looked at this often.
            let snapshot_tick = self.marker.as_ref().map(|_| Instant::now() + SNAPSHOT_POLL);
            let tick = match (metrics_tick, snapshot_tick) {
                (Some(m), Some(s)) => Some(m.min(s)),
                (m, s) => m.or(s),
            };
            let until = match (deadline, tick) {
                (Some(d), Some(t)) => Some(d.min(t)),
                (d, t) => d.or(t),
            };
            if let Some(exit) = self.stop.wait_until(until) {
                return exit;
            }
            self.answer_api_calls(started);
            if let (Some(d), Some(limit)) = (deadline, self.timeout) {
                if Instant::now() >= d {
                    self.stop.request(VmExit::Timeout(limit));
                    continue;
                }
            }
            if let Some(path) =
                self.metrics.as_ref().filter(|_| metrics_tick.is_some_and(|t| Instant::now() >= t))
            {
                if let Err(e) = metrics::write(path, &self.metrics_now(started)) {
                    log::warn!("{}", crate::error_chain(&e));
                }
            }
        }
    }

    /// Takes the `--snapshot-to` snapshot once the console showed its marker; the VM goes on
    /// either way (a failure is logged).
    fn take_snapshot_if_due(&mut self) {
        if !self.marker.as_ref().is_some_and(MarkerTrigger::due) {
            return;
        }
        let (Some(marker), Some(snapshotter)) = (self.marker.take(), self.snapshotter.as_ref()) else {
            return;
        };
        let dir = marker.request.dir.display().to_string();
        match snapshotter.take(&self.vm, &self.mem, &self.pause, &self.serial, &marker.files()) {
            Ok(taken) => log::info!(
                "{}: snapshot written to {dir}: guest paused {:.1} ms, {:.1} MiB of RAM written (zero pages are holes)",
                self.label,
                taken.paused.as_secs_f64() * 1e3,
                taken.ram_written as f64 / (1 << 20) as f64
            ),
            Err(e) => log::error!("{}: {}", self.label, crate::error_chain(&e)),
        }
    }

    /// The VM's counters now.
    fn metrics_now(&self, started: Instant) -> VmMetrics {
        let domain = lock(&self.membership.domain);
        VmMetrics {
            vm: self.label.clone(),
            pid: std::process::id(),
            running: true,
            elapsed_ms: started.elapsed().as_millis() as u64,
            exit_code: None,
            exit_reason: None,
            fphash: self.fphash_stats.snapshot(),
            dedup: domain.stats(),
            guest_ram: None,
            vmas_counted: 0,
            process_vmas: 0,
            merge_cpu_us: crate::merge_cpu::total().as_micros() as u64,
            refresh_cpu_us: crate::merge_cpu::refresh_total().as_micros() as u64,
            pause: self.pause.stats(),
            broker_domain: domain.broker_domain().map(str::to_string),
            disks: self.disks.iter().map(DiskCounters::metrics).collect(),
            balloon: self.balloon.as_ref().map(VmBalloon::metrics),
            entropy: self.entropy.as_ref().map(|stats| stats.snapshot()),
            vsock: self.vsock.as_ref().map(|stats| stats.snapshot()),
            nets: self.nets.iter().map(|stats| stats.snapshot()).collect(),
        }
    }

    /// Writes the last metrics, with how the VM stopped and what its RAM holds; first finds
    /// every copy-on-write break (two looks) and sets the VMA count from the kernel's.
    fn write_final_metrics(&self, started: Instant, exit: &VmExit) {
        self.log_device_counters();
        let Some(path) = &self.metrics else { return };
        let vmas_counted = {
            let mut domain = lock(&self.membership.domain);
            if let Err(e) = domain.settle() {
                log::warn!("dedup refresh failed: {e}");
            }
            let counted = domain.stats().vmas;
            domain.reconcile_vmas();
            counted
        };
        let ranges: Vec<(usize, usize)> =
            self.mem.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)).collect();
        let ram = crate::residency::resident_in(&ranges).ok();
        let mut last = self.metrics_now(started).stopped(exit, ram);
        last.vmas_counted = vmas_counted;
        if let Err(e) = metrics::write(path, &last) {
            log::warn!("{}", crate::error_chain(&e));
        }
    }
}

/// How often the VMM thread looks for a `--snapshot-at` marker.
const SNAPSHOT_POLL: Duration = Duration::from_millis(10);

/// How long stopping may wait for the VM's threads before it leaves them behind.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
