//! vCPU threads: creation-time setup, the `KVM_RUN` loop, and the free function that decides
//! what each exit means (callable from tests with hand-made exits).

use std::cell::Cell;
use std::sync::Arc;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::register_signal_handler;

use crate::bus::Buses;
use crate::pause::{Gate, PauseControl};
use crate::signal_numbers::kick_signal;
use crate::snapshot::vcpu_saves::VcpuSaves;
use crate::stop::{CrashReason, VmExit, VmStop};
use crate::x86_64::boot::EntryPoint;
use crate::x86_64::{cpuid, regs};

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Enter the guest again.
    Continue,
    /// The guest asked to stop (halt with nothing to wake it, shutdown request).
    Stop(VmExit),
    /// The guest cannot go on.
    Crash(CrashReason),
}

/// Decides what one `KVM_RUN` exit means. I/O to addresses without a device reads as all ones
/// and ignores writes, as on a PC bus, so probing guests boot.
pub fn handle_kvm_exit(exit: VcpuExit<'_>, buses: &Buses) -> ExitOutcome {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            ExitOutcome::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                log::trace!("ignored write to port {port:#x}");
            }
            ExitOutcome::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                log::debug!("MMIO read of {} bytes at {addr:#x} outside any device", data.len());
                data.fill(0xff);
            }
            ExitOutcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log::debug!("MMIO write of {} bytes at {addr:#x} outside any device", data.len());
            }
            ExitOutcome::Continue
        }
        // With the in-kernel irqchip KVM handles HLT itself; an exit means nothing will wake us.
        VcpuExit::Hlt => ExitOutcome::Stop(VmExit::Reset),
        VcpuExit::Shutdown => ExitOutcome::Crash(CrashReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                ExitOutcome::Stop(VmExit::Reset)
            }
            other => ExitOutcome::Crash(CrashReason::SystemEvent(other)),
        },
        VcpuExit::InternalError => ExitOutcome::Crash(CrashReason::KvmInternalError),
        VcpuExit::FailEntry(reason, cpu) => ExitOutcome::Crash(CrashReason::FailEntry { reason, cpu }),
        VcpuExit::Unsupported(reason) => ExitOutcome::Crash(CrashReason::UnsupportedExit(reason)),
        other => ExitOutcome::Crash(CrashReason::UnhandledExit(format!("{other:?}"))),
    }
}

/// Configures vCPU `index` of `vcpus`: CPUID, MSRs, FPU, LAPIC pins, and for the boot CPU the
/// entry registers.
pub fn configure(
    vcpu: &VcpuFd,
    index: u8,
    vcpus: u8,
    supported_cpuid: &CpuId,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), regs::RegsError> {
    let mut cpuid = supported_cpuid.clone();
    cpuid::patch_for_vcpu(&mut cpuid, index, vcpus);
    vcpu.set_cpuid2(&cpuid).map_err(|source| regs::RegsError::Kvm {
        what: "KVM_SET_CPUID2",
        vcpu: index,
        source,
    })?;
    regs::setup_msrs(vcpu, index)?;
    regs::setup_fpu(vcpu, index)?;
    regs::setup_lint(vcpu, index)?;
    if index == 0 {
        regs::setup_sregs(vcpu, mem, entry)?;
        regs::setup_regs(vcpu, entry)?;
    }
    Ok(())
}

thread_local! {
    /// This thread's `kvm_run` while it runs a vCPU (null otherwise), for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs the handler for the kick signal: it interrupts `KVM_RUN` with EINTR instead of
/// killing the process, and sets the thread's `immediate_exit`, so that a kick that lands just
/// before the thread enters `KVM_RUN` makes it return at once (one kick is always enough).
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // A const-initialized thread-local without destructor: a plain TLS read, which is
        // async-signal-safe.
        let run = KVM_RUN.with(Cell::get);
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by `run_loop` while
            // it owns the VcpuFd and cleared before the fd is dropped.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    }
    register_signal_handler(kick_signal(), on_kick).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Interrupts the `KVM_RUN` of the vCPU thread `thread`.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: callers pass the id of a vCPU thread still in its run loop: PauseControl drops
    // an id before its thread leaves the loop, under the lock the kicker holds.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// Runs one vCPU until the VM stops, parking it whenever `pause` asks, and saving its state
/// into `saves` when a snapshot asks.
pub fn run_loop(
    mut vcpu: VcpuFd,
    index: u8,
    buses: Arc<Buses>,
    stop: Arc<VmStop>,
    pause: Arc<PauseControl>,
    saves: Option<Arc<VcpuSaves>>,
) {
    KVM_RUN.with(|run| run.set(vcpu.get_kvm_run()));
    pause.vcpu_started();
    run_until_stopped(&mut vcpu, index, &buses, &stop, &pause, saves.as_deref());
    pause.vcpu_stopped();
    KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
}

/// Clears this thread's `immediate_exit` after `KVM_RUN` returned, before the loop looks at
/// why it should stop or park (a kick sets the flag after setting its reason).
fn clear_immediate_exit() {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: this thread's own kvm_run mapping (see `run_loop`).
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0) };
    }
}

/// Completes the I/O the vCPU exited for, without entering the guest: `KVM_RUN` with
/// `immediate_exit` set finishes an emulated instruction (an IN's value into RAX, RIP past
/// it) and returns EINTR at once. Before reading a vCPU's state for a snapshot.
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

fn run_until_stopped(
    vcpu: &mut VcpuFd,
    index: u8,
    buses: &Buses,
    stop: &VmStop,
    pause: &PauseControl,
    saves: Option<&VcpuSaves>,
) {
    let mut first_exit = index == 0;
    let mut first_entry = index == 0;
    let mut errands = pause.errands();
    loop {
        match pause.gate(&mut errands) {
            Gate::Run if !stop.is_stopped() => {}
            Gate::Run | Gate::Stop => return,
            Gate::Errand => {
                if let Some(saves) = saves {
                    saves.save(vcpu, index, complete_pending_io);
                }
                continue;
            }
        }
        if first_entry {
            first_entry = false;
            let elapsed = crate::process_start().elapsed();
            log::info!("vCPU 0 enters the guest {:.3} ms after process start", elapsed.as_secs_f64() * 1e3);
        }
        let result = vcpu.run();
        clear_immediate_exit();
        let outcome = match result {
            Ok(exit) => {
                if first_exit {
                    first_exit = false;
                    let elapsed = crate::process_start().elapsed();
                    log::info!("first guest exit {:.3} ms after process start", elapsed.as_secs_f64() * 1e3);
                }
                handle_kvm_exit(exit, buses)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => ExitOutcome::Crash(CrashReason::KvmRun(e.errno())),
        };
        match outcome {
            ExitOutcome::Continue => {}
            ExitOutcome::Stop(exit) => {
                stop.request(exit);
                return;
            }
            ExitOutcome::Crash(reason) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
                stop.request(VmExit::Crashed { vcpu: index, reason, rip });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Port(u8);
    impl crate::bus::BusDevice for Port {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn buses() -> Buses {
        let mut buses = Buses::default();
        buses.pio.insert(0x80, 1, Arc::new(Mutex::new(Port(1)))).expect("insert");
        buses
    }

    #[test]
    fn io_goes_to_devices_and_unknown_ports_read_all_ones() {
        let b = buses();
        assert_eq!(handle_kvm_exit(VcpuExit::IoOut(0x80, &[7]), &b), ExitOutcome::Continue);
        let mut data = [0u8];
        handle_kvm_exit(VcpuExit::IoIn(0x80, &mut data), &b);
        assert_eq!(data, [7]);
        let mut unknown = [0u8; 2];
        handle_kvm_exit(VcpuExit::IoIn(0x1234, &mut unknown), &b);
        assert_eq!(unknown, [0xff, 0xff]);
        let mut mmio = [0u8; 4];
        handle_kvm_exit(VcpuExit::MmioRead(0xd000_0000, &mut mmio), &b);
        assert_eq!(mmio, [0xff; 4]);
    }

    #[test]
    fn fatal_exits_are_named() {
        let b = buses();
        for (exit, name) in [
            (VcpuExit::Shutdown, "triple fault"),
            (VcpuExit::InternalError, "internal error"),
            (VcpuExit::FailEntry(7, 0), "entry failed"),
            (VcpuExit::Unsupported(99), "unsupported exit reason 99"),
        ] {
            match handle_kvm_exit(exit, &b) {
                ExitOutcome::Crash(reason) => assert!(reason.to_string().contains(name), "{reason}"),
                other => panic!("expected a crash, got {other:?}"),
            }
        }
    }
}
