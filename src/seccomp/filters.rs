//! What each kind of thread may call, group by group, and why; anything else raises SIGSYS
//! (`trap.rs`). The groups come from the threads' real calls under `strace -f` over the test
//! suite's workloads (Rust std and glibc included: allocation, thread exit, debug builds'
//! descriptor checks). Arguments are checked where that is cheap and narrows what a thread
//! could do: no executable memory anywhere, ioctls by request number, sockets only of
//! `AF_UNIX`, files opened read-only where nothing is written, and no signal but the vCPU kick
//! (to threads) and the stop signals (density to its children).

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::ThreadKind;

use libc::{
    SYS_accept4, SYS_brk, SYS_clock_gettime, SYS_clock_nanosleep, SYS_close, SYS_connect, SYS_epoll_ctl,
    SYS_epoll_wait, SYS_exit, SYS_exit_group, SYS_fadvise64, SYS_fallocate, SYS_fchmod, SYS_fcntl,
    SYS_fdatasync, SYS_flock, SYS_ftruncate, SYS_futex, SYS_getdents64, SYS_getpid, SYS_getrandom,
    SYS_getsockopt, SYS_ioctl, SYS_kill, SYS_lseek, SYS_madvise, SYS_memfd_create, SYS_mincore, SYS_mmap,
    SYS_mprotect, SYS_mremap, SYS_munmap, SYS_newfstatat, SYS_openat, SYS_pidfd_open, SYS_poll, SYS_pread64,
    SYS_pwrite64, SYS_read, SYS_recvfrom, SYS_recvmsg, SYS_rename, SYS_restart_syscall, SYS_rt_sigprocmask,
    SYS_rt_sigreturn, SYS_rt_sigtimedwait, SYS_sched_yield, SYS_sendmsg, SYS_sendto, SYS_setsockopt,
    SYS_shutdown, SYS_sigaltstack, SYS_socket, SYS_statx, SYS_tgkill, SYS_unlink, SYS_unlinkat, SYS_wait4,
    SYS_write,
};

vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, kvm_bindings::KVMIO, 0x81, kvm_bindings::kvm_regs);
// What a snapshot reads (kvm-ioctls' request numbers; linux/kvm.h).
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, kvm_bindings::KVMIO, 0x83, kvm_bindings::kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, kvm_bindings::KVMIO, 0x88, kvm_bindings::kvm_msrs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, kvm_bindings::KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, kvm_bindings::KVMIO, 0x91, kvm_bindings::kvm_cpuid2);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, kvm_bindings::KVMIO, 0x98, kvm_bindings::kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, kvm_bindings::KVMIO, 0x9f, kvm_bindings::kvm_vcpu_events);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, kvm_bindings::KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, kvm_bindings::KVMIO, 0xa4, kvm_bindings::kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, kvm_bindings::KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, kvm_bindings::KVMIO, 0x62, kvm_bindings::kvm_irqchip);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, kvm_bindings::KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, kvm_bindings::KVMIO, 0x7c, kvm_bindings::kvm_clock_data);

/// One test of a syscall argument, as the 32-bit value the kernel sees for an `int` (every
/// argument tested here is one: descriptors, flags, request numbers, signals).
#[derive(Clone, Copy, Debug)]
enum Arg {
    /// Argument `index` equals the value.
    Eq(u8, u64),
    /// Argument `index`, masked, equals the value.
    Masked(u8, u64, u64),
}

impl Arg {
    fn condition(self) -> Result<SeccompCondition, BackendError> {
        let (index, op, value) = match self {
            Arg::Eq(index, value) => (index, SeccompCmpOp::Eq, value),
            Arg::Masked(index, mask, value) => (index, SeccompCmpOp::MaskedEq(mask), value),
        };
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
    }
}

/// A filter being put together: per syscall, `None` for any arguments, or the argument tests
/// any one of which (all its `Arg`s true) allows the call.
#[derive(Default)]
struct Rules(BTreeMap<i64, Option<Vec<Vec<Arg>>>>);

impl Rules {
    /// Allows `syscalls` with any arguments.
    fn allow(&mut self, syscalls: &[libc::c_long]) -> &mut Self {
        for &nr in syscalls {
            self.0.insert(nr, None);
        }
        self
    }

    /// Allows `syscall` when all of `args` hold (or as another rule already allows it).
    fn allow_if(&mut self, syscall: libc::c_long, args: &[Arg]) -> &mut Self {
        if let Some(rules) = self.0.entry(syscall).or_insert_with(|| Some(Vec::new())) {
            rules.push(args.to_vec());
        }
        self
    }

    fn compile(self) -> Result<BpfProgram, BackendError> {
        let mut rules = BTreeMap::new();
        for (nr, tests) in self.0 {
            let chain = match tests {
                None => Vec::new(),
                Some(tests) => tests
                    .into_iter()
                    .map(|args| {
                        let conditions = args.into_iter().map(Arg::condition).collect::<Result<_, _>>()?;
                        SeccompRule::new(conditions)
                    })
                    .collect::<Result<_, _>>()?,
            };
            rules.insert(nr, chain);
        }
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)?.try_into()
    }
}

/// The compiled filter of `kind`.
pub(super) fn compile(kind: ThreadKind) -> Result<BpfProgram, BackendError> {
    rules(kind).compile()
}

/// How many syscalls a thread of `kind` may make at all (some only with certain arguments).
#[cfg(test)]
pub(super) fn allowed_count(kind: ThreadKind) -> usize {
    rules(kind).0.len()
}

/// What a thread of `kind` may call.
fn rules(kind: ThreadKind) -> Rules {
    let mut r = Rules::default();
    every_thread(&mut r);
    match kind {
        ThreadKind::Vcpu => {
            raw_terminal(&mut r);
            vcpu(&mut r);
        }
        ThreadKind::Virtio | ThreadKind::VirtioVsock => {
            raw_terminal(&mut r);
            virtio_queues(&mut r);
            kick_vcpus(&mut r);
            merge_engine(&mut r);
            broker_client(&mut r);
            image_leases(&mut r);
            if kind == ThreadKind::VirtioVsock {
                vsock_sockets(&mut r);
            }
        }
        ThreadKind::Signals => {
            raw_terminal(&mut r);
            // sigwaitinfo for the stop signals and the lease signal; the eventfd write that
            // wakes the event loop of a VM whose image lease broke (`lease::broken`).
            r.allow(&[SYS_rt_sigtimedwait, SYS_write]);
        }
        ThreadKind::Stdin => {
            raw_terminal(&mut r);
            // Standard input, and the console's interrupt eventfd when the guest's receive FIFO
            // fills; when input ends after the VM stopped, the thread holds the console's last
            // reference and closes its eventfds.
            r.allow_if(SYS_read, &[Arg::Eq(0, libc::STDIN_FILENO as u64)]).allow(&[SYS_write]);
            close_descriptors(&mut r);
        }
        ThreadKind::Vmm => {
            raw_terminal(&mut r);
            vmm(&mut r);
            snapshots(&mut r);
            kick_vcpus(&mut r);
            merge_engine(&mut r);
            broker_client(&mut r);
            page_cache_figures(&mut r);
        }
        ThreadKind::Density => {
            density(&mut r);
            page_cache_figures(&mut r);
        }
        ThreadKind::Dedupd => dedupd(&mut r),
        ThreadKind::BalloonControl => {
            raw_terminal(&mut r);
            balloon_control(&mut r);
        }
        ThreadKind::Api => {
            raw_terminal(&mut r);
            api_server(&mut r);
        }
    }
    r
}

/// `PROT_EXEC` in `mmap`'s and `mprotect`'s argument 2: never asked for after start-up.
fn no_exec() -> Arg {
    Arg::Masked(2, libc::PROT_EXEC as u64, 0)
}

/// Every thread: memory for the allocator and thread stacks, never executable; locks and
/// condition variables; clock reads the vDSO does not serve, and sleeps (resumed by
/// `restart_syscall` after the process was stopped and continued); log lines and the
/// violation line and the panic line on stderr; the thread's end (its signal stack freed,
/// signals blocked) and the process's (`exit_group`, also the violation handler's and the
/// panic hook's; `abort` after a panic inside the panic hook, which raises SIGABRT: `tgkill`
/// with that signal); the process id (`abort`, kicks,
/// the broker's status); returning from a signal handler (the vCPU kick); std's random hash
/// keys, drawn once per thread.
fn every_thread(r: &mut Rules) {
    let anonymous = Arg::Masked(3, libc::MAP_ANONYMOUS as u64, libc::MAP_ANONYMOUS as u64);
    r.allow_if(SYS_mmap, &[no_exec(), anonymous])
        .allow_if(SYS_mprotect, &[no_exec()])
        .allow(&[SYS_munmap, SYS_mremap, SYS_madvise, SYS_brk])
        .allow(&[SYS_futex, SYS_sched_yield])
        .allow(&[SYS_clock_gettime, SYS_clock_nanosleep, SYS_restart_syscall])
        .allow_if(SYS_write, &[Arg::Eq(0, libc::STDERR_FILENO as u64)])
        .allow(&[SYS_sigaltstack, SYS_rt_sigprocmask, SYS_exit, SYS_exit_group, SYS_rt_sigreturn])
        .allow_if(SYS_tgkill, &[Arg::Eq(2, libc::SIGABRT as u64)])
        .allow(&[SYS_getpid, SYS_getrandom]);
}

/// The threads of a VMM: the violation handler restores a terminal in raw mode before the
/// process ends, as the main thread does when the VM stops (glibc's `tcsetattr` is `TCSETS`
/// on standard input, with `TCGETS` around it).
fn raw_terminal(r: &mut Rules) {
    for request in [libc::TCSETS, libc::TCGETS] {
        r.allow_if(SYS_ioctl, &[Arg::Eq(0, libc::STDIN_FILENO as u64), Arg::Eq(1, request)]);
    }
}

/// Closing descriptors; debug builds check a descriptor (`F_GETFD`) before closing it.
fn close_descriptors(r: &mut Rules) {
    r.allow(&[SYS_close]).allow_if(SYS_fcntl, &[Arg::Eq(1, libc::F_GETFD as u64)]);
}

/// A vCPU: `KVM_RUN`, and `KVM_GET_REGS` for the RIP of a crash; the devices it emulates on
/// the way write console output (standard output or a file) and interrupt eventfds; its
/// descriptor closes when its thread ends.
fn vcpu(r: &mut Rules) {
    for request in [KVM_RUN(), KVM_GET_REGS()] {
        r.allow_if(SYS_ioctl, &[Arg::Eq(1, request)]);
    }
    vcpu_state(r);
    r.allow(&[SYS_write]);
    close_descriptors(r);
}

/// A snapshot's save of a vCPU, on its own thread (`x86_64/vcpu_state.rs`): every register
/// group KVM reads, nothing written.
fn vcpu_state(r: &mut Rules) {
    for request in [
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
    ] {
        r.allow_if(SYS_ioctl, &[Arg::Eq(1, request)]);
    }
}

/// Taking a snapshot (`snapshot/take.rs`): the VM's interrupt controllers, PIT and clock read;
/// the memory and state files created in the snapshot directory (made before the filters),
/// written at offsets, sized, flushed and renamed into place; whether an older state is
/// there.
fn snapshots(r: &mut Rules) {
    for request in [KVM_GET_IRQCHIP(), KVM_GET_PIT2(), KVM_GET_CLOCK()] {
        r.allow_if(SYS_ioctl, &[Arg::Eq(1, request)]);
    }
    r.allow(&[SYS_pwrite64, SYS_ftruncate, SYS_fdatasync, SYS_rename, SYS_statx, SYS_newfstatat]);
}

/// The virtio event loop: waits on the queue eventfds, its timer and its stop eventfd; reads
/// and writes disk images (raw files or block devices) at their offsets (`lseek`, `read`,
/// `write`) and flushes them (`fdatasync`); raises interrupts through irqfds.
fn virtio_queues(r: &mut Rules) {
    r.allow(&[SYS_epoll_wait, SYS_read, SYS_write, SYS_lseek, SYS_fdatasync]);
}

/// A vsock device's host side (`samepage_virtio::vsock::host_side`): host clients accepted
/// (non-blocking from `accept4`), connections to the host listeners of guest connections
/// (`socket` of `AF_UNIX`, `connect`), every socket in the device's own epoll set, bytes
/// each way (std's sockets `send` with `MSG_NOSIGNAL` and `recv`: `sendto`, `recvfrom`), write
/// sides shut when the guest is done sending, and sockets closed.
fn vsock_sockets(r: &mut Rules) {
    r.allow(&[SYS_accept4, SYS_epoll_ctl, SYS_recvfrom, SYS_sendto, SYS_shutdown, SYS_connect])
        .allow_if(SYS_socket, &[Arg::Eq(0, libc::AF_UNIX as u64)]);
    close_descriptors(r);
}

/// Pausing and stopping vCPUs: the kick signal to a vCPU thread (glibc's `pthread_kill` asks
/// for the pid and blocks signals around it, which every thread may).
fn kick_vcpus(r: &mut Rules) {
    r.allow_if(SYS_tgkill, &[Arg::Eq(2, crate::signal_numbers::kick_signal() as u64)]);
}

/// Merging guest pages (docs/fphash.md): store pages mapped copy-on-write over guest pages
/// (`MAP_PRIVATE | MAP_FIXED`), the local store grown, sized (`statx`) and its free pages
/// punched out, merged pages looked up in `/proc/self/pagemap` (`pread64`) and the VMA count
/// in `/proc/self/maps` (opened read-only, never created); image pages read into the page cache
/// before they are mapped and the page cache of image pages merged by content given back
/// (`fadvise64` `POSIX_FADV_WILLNEED` and `POSIX_FADV_DONTNEED` only).
fn merge_engine(r: &mut Rules) {
    let fixed_private = libc::MAP_FIXED | libc::MAP_PRIVATE;
    let kind = (libc::MAP_FIXED | libc::MAP_TYPE | libc::MAP_ANONYMOUS) as u64;
    r.allow_if(SYS_mmap, &[no_exec(), Arg::Masked(3, kind, fixed_private as u64)])
        .allow_if(SYS_fadvise64, &[Arg::Eq(3, libc::POSIX_FADV_DONTNEED as u64)])
        .allow_if(SYS_fadvise64, &[Arg::Eq(3, libc::POSIX_FADV_WILLNEED as u64)])
        .allow(&[SYS_ftruncate])
        .allow_if(SYS_fallocate, &[punch_hole()])
        .allow_if(SYS_openat, &[read_only_open()])
        .allow(&[SYS_read, SYS_pread64, SYS_lseek, SYS_statx]);
    close_descriptors(r);
}

/// A shared image's lease broke (`devices/image.rs`): the event loop copies the guest pages
/// that map it into fresh anonymous memory (`mmap` of anonymous memory, which every thread may)
/// and then gives the lease up so the writer goes on: `fcntl(F_SETLEASE, F_UNLCK)`, never a
/// lease taken (leases are taken before the filters are in place).
fn image_leases(r: &mut Rules) {
    r.allow_if(SYS_fcntl, &[Arg::Eq(1, libc::F_SETLEASE as u64), Arg::Eq(2, libc::F_UNLCK as u64)]);
}

/// `fallocate`'s mode freeing store pages.
fn punch_hole() -> Arg {
    Arg::Eq(1, (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64)
}

/// `openat` flags that only read an existing file.
fn read_only_open() -> Arg {
    let mask = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
    Arg::Masked(2, mask, libc::O_RDONLY as u64)
}

/// The broker's client (`dedup/remote.rs`): a Unix socket to the broker (connected again
/// after the broker restarts), with answer timeouts; requests and answers, the store's
/// descriptor among them; the store mapped shared and read-only to compare pages.
fn broker_client(r: &mut Rules) {
    let shared_read_only = [
        Arg::Eq(2, libc::PROT_READ as u64),
        Arg::Masked(3, (libc::MAP_TYPE | libc::MAP_FIXED) as u64, libc::MAP_SHARED as u64),
    ];
    r.allow_if(SYS_socket, &[Arg::Eq(0, libc::AF_UNIX as u64)])
        .allow_if(SYS_setsockopt, &[Arg::Eq(1, libc::SOL_SOCKET as u64)])
        .allow(&[SYS_connect, SYS_sendmsg, SYS_recvmsg])
        .allow_if(SYS_mmap, &shared_read_only);
    close_descriptors(r);
}

/// density's figure of shared images' page cache (`residency::file_cache_bytes`): `cachestat`
/// on the image opened read-only, or on kernels without it `mincore` over a shared read-only
/// mapping of it.
fn page_cache_figures(r: &mut Rules) {
    let shared_read_only = [
        Arg::Eq(2, libc::PROT_READ as u64),
        Arg::Masked(3, (libc::MAP_TYPE | libc::MAP_FIXED) as u64, libc::MAP_SHARED as u64),
    ];
    r.allow(&[crate::residency::SYS_CACHESTAT, SYS_mincore])
        .allow_if(SYS_openat, &[read_only_open()])
        .allow_if(SYS_mmap, &shared_read_only);
    close_descriptors(r);
}

/// A thread that runs built VMs: waits for a stop (and for its threads), stops the event loop
/// through an eventfd, prints why the VM stopped; writes `--metrics` files (a temporary file
/// renamed over the old one) and density's samples, reads `/proc/self/smaps` and the host's
/// KSM figures, reads standard input until it ends (`--hold-until-eof`); releases guest RAM
/// and every descriptor of the VM; opens, looks at (`statx`), locks (`flock`) and sizes
/// (`lseek`) a disk's new image (the API's `PATCH /drives/{id}` on a running VM).
fn vmm(r: &mut Rules) {
    r.allow(&[SYS_write, SYS_openat, SYS_rename, SYS_flock, SYS_statx, SYS_lseek]);
    close_descriptors(r);
}

/// density's front-end: watches its VM processes (`wait4`) and forwards a stop signal to them
/// (SIGTERM also ends the broker); asks its broker for STATUS and CHECK over a Unix socket,
/// with answer timeouts; reads the VMs' metrics files, `/proc/<pid>/stat|status` and the VMs'
/// standard error (pipes, relayed); prints progress and the report, writes the samples file; removes its private directory at the end
/// (glibc's `fdopendir` checks the directory's descriptor: `F_GETFL`, `F_SETFD`).
fn density(r: &mut Rules) {
    r.allow(&[SYS_wait4]);
    for signal in crate::signal_numbers::STOP_SIGNALS {
        r.allow_if(SYS_kill, &[Arg::Eq(1, signal as u64)]);
    }
    r.allow_if(SYS_socket, &[Arg::Eq(0, libc::AF_UNIX as u64)])
        .allow_if(SYS_setsockopt, &[Arg::Eq(1, libc::SOL_SOCKET as u64)])
        .allow(&[SYS_connect, SYS_sendmsg, SYS_recvmsg])
        .allow(&[SYS_openat, SYS_read, SYS_write, SYS_statx, SYS_newfstatat])
        .allow(&[SYS_getdents64, SYS_unlinkat]);
    for command in [libc::F_GETFL, libc::F_SETFD] {
        r.allow_if(SYS_fcntl, &[Arg::Eq(1, command as u64)]);
    }
    close_descriptors(r);
}

/// A VM's balloon control thread (`balloon/control.rs`): waits on its listening socket, the
/// client's and its stop eventfd (`poll`); takes one client at a time (`accept4`), reads its
/// requests and writes the replies (`recvmsg`, `sendmsg`; no descriptor is taken: `recvmsg`
/// without control room installs none); a new target raises the balloon's configuration
/// interrupt (`write` to its irqfd eventfd); closes clients and, at the end, removes its
/// socket file (`unlink`).
fn balloon_control(r: &mut Rules) {
    r.allow(&[SYS_poll, SYS_accept4, SYS_recvmsg, SYS_sendmsg, SYS_write, SYS_unlink]);
    close_descriptors(r);
}

/// The API thread (`api/http.rs`): waits on its listening socket, its clients and its stop
/// eventfd (`poll`); accepts clients (`accept4`) and makes them non-blocking (`ioctl`
/// `FIONBIO`); reads requests and writes replies (std's socket reads and writes are `recvfrom`
/// and `sendto`); closes clients and, at the end, removes its socket file (`unlink`). It opens
/// nothing: what a request names (a snapshot's files) is opened by the VM's owner.
fn api_server(r: &mut Rules) {
    r.allow(&[SYS_poll, SYS_accept4, SYS_recvfrom, SYS_sendto, SYS_unlink])
        .allow_if(SYS_ioctl, &[Arg::Eq(1, libc::FIONBIO)]);
    close_descriptors(r);
}

/// The broker's loop (docs/dedupd.md): its epoll set and signalfd; accepting clients and
/// their credentials (`SO_PEERCRED`, `SO_PEERGROUPS`); requests and replies, store
/// descriptors among them (`SCM_RIGHTS`); stores: memfds grown, sealed and made read-only for
/// clients (`fchmod`, `F_ADD_SEALS`, a read-only descriptor through `/proc/self/fd/N`),
/// mapped shared, sized (`statx`), their free pages punched out; a pidfd of each client's
/// process (`SO_PEERPIDFD`, else `pidfd_open`), polled to learn when a departed client's
/// process exited; removing its socket and lock at the end.
fn dedupd(r: &mut Rules) {
    let shared = Arg::Masked(3, (libc::MAP_TYPE | libc::MAP_FIXED) as u64, libc::MAP_SHARED as u64);
    r.allow(&[SYS_epoll_wait, SYS_epoll_ctl, SYS_read])
        .allow(&[SYS_accept4, SYS_getsockopt, SYS_recvmsg, SYS_sendmsg])
        .allow_if(SYS_pidfd_open, &[Arg::Eq(1, 0)])
        .allow(&[SYS_poll])
        .allow(&[SYS_memfd_create, SYS_ftruncate, SYS_fchmod, SYS_statx])
        .allow_if(SYS_fallocate, &[punch_hole()])
        .allow_if(SYS_fcntl, &[Arg::Eq(1, libc::F_ADD_SEALS as u64)])
        .allow_if(SYS_openat, &[read_only_open()])
        .allow_if(SYS_mmap, &[no_exec(), shared])
        .allow(&[SYS_unlink]);
    close_descriptors(r);
}
