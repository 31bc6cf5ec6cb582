//! The `samepage` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use samepage::boot_test::host_files::IncludeSpec;
use samepage::boot_test::BootTest;
use samepage::config::{
    parse_interval, parse_mem_size, parse_timeout, parse_vm_cmdline, DiskConfig, EmulatedCpl0, NetConfig,
    VsockConfig,
};
use samepage::density::DensityConfig;
use samepage::exit_code::Exit;
use samepage::firecracker::config_file::FirecrackerConfig;
use samepage::run_args::RunArgs;
use samepage::seccomp::Seccomp;

#[derive(Parser)]
#[command(
    name = "samepage",
    version,
    about = "A small KVM VMM that merges identical guest file pages across VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM and run it until the guest stops.
    Run(RunArgs),
    /// Boot a kernel, run a command (or a shell) in it and exit with its status (255 on a
    /// kernel panic, oops, BUG or WARNING; 1 on KTAP failures; 124 on timeout; 125 if the VM
    /// cannot start).
    BootTest(BootTestArgs),
    /// Print the kernel config fragment a kernel needs to boot under samepage.
    Kconfig,
    /// Run many VMs sharing one dedup domain (one process each, joined to a broker this run
    /// starts), and report what merging saved.
    Density(DensityArgs),
    /// Run the dedup broker that lets VMs of different processes share pages (docs/dedupd.md),
    /// in the foreground until SIGINT or SIGTERM; or query one (status, check).
    Dedupd(DedupdArgs),
    /// Run as Firecracker would, with Firecracker's options (`--no-api --config-file FILE`;
    /// docs/firecracker-compat.md). A link to samepage named `firecracker` takes them directly.
    Firecracker(samepage::firecracker::cli::FirecrackerArgs),
    /// Show a running VM's balloon (target, what the guest gave back, its statistics), or set
    /// its target: the VM's `run --balloon-socket PATH` (docs/balloon.md).
    Balloon(BalloonArgs),
}

#[derive(clap::Args)]
struct BalloonArgs {
    /// The VM's balloon control socket (`run --balloon-socket`).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Ask the guest to give up this much of its RAM, e.g. 64M or 1G (a bare number is MiB;
    /// 0 gives it all back).
    #[arg(long, value_name = "SIZE", value_parser = samepage::balloon_options::parse_target)]
    target: Option<u64>,
    /// Print the VM's JSON reply.
    #[arg(long)]
    json: bool,
}

/// `balloon`: one request to the VM's control socket; its figures as text or JSON.
fn balloon(args: &BalloonArgs) -> Exit {
    use samepage::balloon::wire::Request;
    let request = match args.target {
        Some(bytes) => Request::SetTarget { bytes },
        None => Request::Status {},
    };
    let reply = match samepage::balloon::client::request(&args.socket, &request) {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!("samepage: error: {}", samepage::error_chain(&e));
            return Exit::Failed;
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
    } else if let Some(figures) = &reply.balloon {
        print!("{}", samepage::balloon::client::render(figures));
    }
    match reply.error {
        None => Exit::Success,
        Some(why) => {
            eprintln!("samepage: balloon: {}", samepage::escape_controls(&why));
            Exit::Failed
        }
    }
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct DedupdArgs {
    #[command(subcommand)]
    query: Option<DedupdQuery>,
    /// Unix socket to serve (a lock is held on PATH.lock while the broker runs).
    #[arg(long, value_name = "PATH", required = true)]
    socket: Option<PathBuf>,
    /// Who may join which domain: lines `name: uid:N gid:N ...`.
    #[arg(long, value_name = "FILE")]
    domains: Option<PathBuf>,
    /// Seccomp filter on the broker's loop; off is for debugging only.
    #[arg(long, value_enum, default_value = "on")]
    seccomp: Seccomp,
}

#[derive(Subcommand)]
enum DedupdQuery {
    /// Print each domain's store and each client's figures.
    Status {
        /// The broker's socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Print the broker's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify every stored page and reference count; exit 0 if all agree, 1 otherwise.
    Check {
        /// The broker's socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Print the broker's JSON.
        #[arg(long)]
        json: bool,
    },
}

fn dedupd(args: DedupdArgs) -> ExitCode {
    ExitCode::from(match (args.query, args.socket) {
        (Some(DedupdQuery::Status { socket, json }), _) => dedupd_status(&socket, json),
        (Some(DedupdQuery::Check { socket, json }), _) => dedupd_check(&socket, json),
        (None, Some(socket)) => match samepage::dedupd::serve(&socket, args.domains.as_deref()) {
            Ok(()) => Exit::Success,
            Err(e) => {
                eprintln!("samepage: error: {}", samepage::error_chain(&e));
                Exit::StartFailed
            }
        },
        // clap requires --socket without a subcommand.
        (None, None) => Exit::Usage,
    })
}

/// `dedupd status`: the broker's figures as text, or its JSON.
fn dedupd_status(socket: &Path, json: bool) -> Exit {
    match samepage::dedupd::query::status(socket) {
        Ok(answer) => {
            let text = if json { answer.json } else { samepage::dedupd::report::render(&answer.report) };
            println!("{}", text.trim_end());
            Exit::Success
        }
        Err(e) => {
            eprintln!("samepage: error: {}", samepage::error_chain(&e));
            Exit::Failed
        }
    }
}

/// `dedupd check`: each domain's check as text, or the broker's JSON; fails with the first
/// disagreement, or when no check could be made.
fn dedupd_check(socket: &Path, json: bool) -> Exit {
    let answer = match samepage::dedupd::query::check(socket) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("samepage: error: {}", samepage::error_chain(&e));
            return Exit::Failed;
        }
    };
    if json {
        println!("{}", answer.json.trim_end());
    } else {
        print!("{}", samepage::dedupd::report::render_check(&answer.report));
    }
    match answer.report.failure() {
        None => Exit::Success,
        Some(reason) => {
            eprintln!("samepage: check: {}", samepage::escape_controls(reason));
            Exit::Failed
        }
    }
}

/// The VMs share the options of `run`; in a --disk path, `{vm}` stands for the VM's index
/// (0, 1, ...), so each VM can get its own copy of an image.
#[derive(clap::Args)]
struct DensityArgs {
    /// How many VMs (1 to 256).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    vms: u16,
    /// Write each VM's console to DIR/vmN.log.
    #[arg(long)]
    console_dir: Option<PathBuf>,
    /// Seconds between progress lines (0.01 to 3600).
    #[arg(long, default_value = "1", value_parser = parse_interval)]
    progress_every: Duration,
    /// Write the savings curve (seconds, MiB saved, pages reported) as CSV.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Extra kernel command line for one VM, INDEX:TEXT; repeat for more.
    #[arg(long = "vm-cmdline", value_parser = parse_vm_cmdline)]
    vm_cmdlines: Vec<(usize, String)>,
    /// Run every VM in this process, sharing an in-process store, instead of one `samepage
    /// run` process per VM and a broker.
    #[arg(long)]
    threads: bool,
    #[command(flatten)]
    vm: RunArgs,
}

/// Without --initrd, the guest runs a busybox initramfs built around the command (or shell)
/// and the included host files.
#[derive(clap::Args)]
struct BootTestArgs {
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Shell command to run in the guest (default: true); its output goes to the console.
    #[arg(long, conflicts_with = "shell")]
    exec: Option<String>,
    /// Boot into an interactive shell on this terminal (raw mode, Ctrl-A x stops the VM); the
    /// shell's exit status is the exit code. No timeout unless --timeout is given.
    #[arg(long)]
    shell: bool,
    /// Use this initramfs instead of the built busybox one (--exec is then ignored).
    #[arg(long, conflicts_with_all = ["shell", "include", "include_binary"])]
    initrd: Option<PathBuf>,
    /// Put a host file or directory into the guest, HOST_PATH[:GUEST_PATH] (default: the same
    /// absolute path); repeat for more. All included files together: at most a quarter of --mem.
    #[arg(long, value_name = "HOST_PATH[:GUEST_PATH]")]
    include: Vec<IncludeSpec>,
    /// Like --include for a dynamically linked binary, plus the shared libraries and loader
    /// ldd lists for it (at their host paths); repeat for more.
    #[arg(long, value_name = "PATH[:GUEST_PATH]")]
    include_binary: Vec<IncludeSpec>,
    /// Raw disk image as virtio-blk, PATH[,ro][,share=on|off]; repeat for more disks (at most
    /// 18).
    ///
    /// ,ro opens the image read-only (writes fail; one image may back many VMs). A read-only
    /// image is shared page by page (share=on, the default with ,ro): the guest's page-aligned
    /// reads map the host's page cache of the image copy-on-write instead of copying it, so VMs
    /// reading one image hold one copy; an ext4 image needs 4 KiB blocks for that (mkfs.ext4 -b
    /// 4096). share=off copies every read (for merging pages with other images through
    /// fphash). The path cannot hold a comma.
    #[arg(long = "disk", value_name = "PATH[,ro][,share=on|off]")]
    disks: Vec<DiskConfig>,
    /// Guest RAM, 16M to 1T, e.g. 256M or 2G (a bare number is MiB).
    #[arg(long, default_value = "256M", value_parser = parse_mem_size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Give up after this many seconds, 0 to 31536000 (365 days) (exit code 124); default 300
    /// (none with --shell).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// Write the whole console log here (a file, a FIFO someone reads, or a character device;
    /// a write error is reported as a warning and ends the log, the verdict stands).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Stop with success as soon as a console line matches this regular expression.
    #[arg(long)]
    expect: Option<regex::Regex>,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Add kernel parameters for hosts whose KVM emulates guest kernel code.
    #[arg(long, value_enum, default_value = "auto")]
    emulated_cpl0: EmulatedCpl0,
    /// Statically linked busybox for the built initramfs.
    #[arg(long, default_value = samepage::boot_test::initramfs::DEFAULT_BUSYBOX)]
    busybox: PathBuf,
    /// Also write the built initramfs here (to rerun the same test elsewhere).
    #[arg(long)]
    save_initramfs: Option<PathBuf>,
    /// A virtio-vsock device with Firecracker's host side, [cid=N,]uds=PATH (as `run
    /// --vsock`; docs/vsock.md).
    #[arg(long, value_name = "[cid=N,]uds=PATH")]
    vsock: Option<VsockConfig>,
    /// A virtio-net device on a tap, tap=NAME|fd=N[,mac=MAC] (as `run --net`; docs/net.md);
    /// repeat for more.
    #[arg(long = "net", value_name = "tap=NAME|fd=N[,mac=MAC]")]
    nets: Vec<NetConfig>,
    /// Seccomp filters on the VMM's threads; off is for debugging only.
    #[arg(long, value_enum, default_value = "on")]
    seccomp: Seccomp,
}

impl From<BootTestArgs> for BootTest {
    fn from(args: BootTestArgs) -> Self {
        let timeout = match (args.timeout, args.shell) {
            (Some(limit), _) => Some(limit),
            (None, true) => None,
            (None, false) => Some(samepage::boot_test::DEFAULT_EXEC_TIMEOUT),
        };
        BootTest {
            kernel: args.kernel,
            exec: args.exec,
            shell: args.shell,
            initrd: args.initrd,
            includes: args.include,
            binaries: args.include_binary,
            disks: args.disks,
            mem_bytes: args.mem,
            vcpus: args.vcpus,
            timeout,
            log: args.log,
            expect: args.expect,
            cmdline: args.cmdline,
            emulated_cpl0: args.emulated_cpl0,
            busybox: args.busybox,
            save_initramfs: args.save_initramfs,
            vsock: args.vsock,
            nets: args.nets,
        }
    }
}

fn run(args: RunArgs, config: Option<FirecrackerConfig>) -> ExitCode {
    match samepage::run::run(&args, config) {
        Ok(exit) => {
            if let Some(message) = exit.message() {
                eprintln!("samepage: {message}");
            }
            ExitCode::from(exit.exit())
        }
        Err(e) => {
            eprintln!("samepage: error: {}", samepage::error_chain(&e));
            ExitCode::from(Exit::StartFailed)
        }
    }
}

fn density(args: DensityArgs) -> ExitCode {
    let samples = args.samples.clone();
    // Created before the run: a bad path must not cost a long run's results.
    if let Some(path) = &samples {
        if let Err(e) = samepage::checked_open::create_output(path) {
            let message = format!("cannot create samples file {}: {e}", path.display());
            eprintln!("samepage: error: {}", samepage::escape_controls(&message));
            return ExitCode::from(Exit::StartFailed);
        }
    }
    let config = DensityConfig {
        vms: usize::from(args.vms),
        template: args.vm.vm_config(),
        console_dir: args.console_dir,
        progress_every: args.progress_every,
        vm_cmdlines: args.vm_cmdlines,
        threads: args.threads,
        restore: args.vm.restore.clone(),
    };
    match samepage::density::run(&config) {
        Ok(report) => {
            print!("{}", samepage::density::summary(&report, &config));
            if let Some(path) = &samples {
                if let Err(e) = report.write_samples(path) {
                    let message = format!("cannot write {}: {e}", path.display());
                    eprintln!("samepage: error: {}", samepage::escape_controls(&message));
                    return ExitCode::from(Exit::Failed);
                }
            }
            if let Some(num) = samepage::signals::received() {
                eprintln!("samepage: stopped by signal {num}");
                return ExitCode::from(Exit::Signal(num));
            }
            let failed = report.ends.iter().any(|e| e.code != 0);
            if failed {
                ExitCode::from(Exit::Failed)
            } else {
                ExitCode::from(Exit::Success)
            }
        }
        Err(e) => {
            eprintln!("samepage: error: {}", samepage::error_chain(&e));
            ExitCode::from(Exit::StartFailed)
        }
    }
}

/// Makes any panic, in any thread and under any seccomp filter, end the process with one line
/// and [`Exit::Panic`]. std's own hook prints the thread's OS id, which it asks the kernel for
/// (`gettid`): no filter allows that, so a panic in a filtered thread looked like a seccomp
/// violation. This hook makes only calls every filter allows: it writes to standard error,
/// restores a terminal left in raw mode (as the violation handler does) and ends the process
/// at once (`_exit`: other threads may hold locks that exiting normally would wait for). With
/// `--seccomp off`, `RUST_BACKTRACE=1` adds a backtrace: reading the binary's debug
/// information takes calls the filters forbid.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = info.payload_as_str().unwrap_or("(a panic without a message)");
        let mut report = panic_line(thread.name(), message, info.location().map(|l| (l.file(), l.line())));
        if !samepage::seccomp::enabled() {
            let backtrace = std::backtrace::Backtrace::capture();
            if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
                report.push_str(&format!("{backtrace}\n"));
            }
        }
        samepage::raw_mode::restore_after_fault();
        write_stderr(report.as_bytes());
        // SAFETY: _exit ends the process (exit_group, which every filter allows) without
        // running anything else: no destructor or atexit handler can wait for what the
        // panicking thread or another one holds.
        unsafe { libc::_exit(i32::from(Exit::Panic.code())) }
    }));
}

/// "samepage: error: panic in thread NAME: MESSAGE at FILE:LINE\n", control characters
/// escaped so that it stays one line.
fn panic_line(thread: Option<&str>, message: &str, location: Option<(&str, u32)>) -> String {
    let escape = samepage::escape_controls;
    let mut line =
        format!("samepage: error: panic in thread {}: {}", escape(thread.unwrap_or("?")), escape(message));
    if let Some((file, number)) = location {
        line.push_str(&format!(" at {}:{number}", escape(file)));
    }
    line.push('\n');
    line
}

/// Writes all of `bytes` to standard error with `write(2)` alone (no lock, no buffer); gives
/// up on an error, as there is nowhere else to say it.
fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writes from a live slice of `bytes.len()` bytes to standard error.
        let written = unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
        match usize::try_from(written) {
            Ok(n) if n > 0 => bytes = &bytes[n.min(bytes.len())..],
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

fn main() -> ExitCode {
    install_panic_hook();
    samepage::process_start();
    // Started as `firecracker` (a link to this binary): Firecracker's command line.
    let as_firecracker = std::env::args_os()
        .next()
        .is_some_and(|argv0| Path::new(&argv0).file_name().is_some_and(|name| name == "firecracker"));
    let command = if as_firecracker {
        use clap::Parser as _;
        Command::Firecracker(samepage::firecracker::cli::FirecrackerCli::parse().args)
    } else {
        Cli::parse().command
    };
    let broker = matches!(command, Command::Dedupd(_));
    let seccomp = match &command {
        Command::Run(args) => args.seccomp,
        Command::Firecracker(args) => args.seccomp(),
        Command::BootTest(args) => args.seccomp,
        Command::Density(args) => args.vm.seccomp,
        Command::Dedupd(args) => args.seccomp,
        Command::Kconfig | Command::Balloon(_) => Seccomp::On,
    };
    // The broker logs its own lifecycle (listening, clients joining and leaving) by default.
    let default_filter = if broker { "warn,samepage::dedupd=info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter)).init();
    samepage::seccomp::configure(seccomp);
    if seccomp == Seccomp::Off {
        eprintln!(
            "samepage: warning: --seccomp off: no thread runs under a seccomp filter, so a \
             compromised device or broker thread may make any system call; use it only for debugging"
        );
    }
    // Before any other thread starts, so that every thread inherits the blocked stop signals.
    // The broker reads SIGINT and SIGTERM from a signalfd in its own loop instead.
    if !broker {
        if let Err(e) = samepage::signals::install() {
            eprintln!("samepage: error: cannot set up signal handling: {}", samepage::error_chain(e));
            return ExitCode::from(Exit::StartFailed);
        }
    }
    match command {
        Command::Run(args) => run(args, None),
        Command::Firecracker(args) => match args.launch() {
            Ok((args, config)) => run(args, config),
            Err(e) => {
                eprintln!("samepage: error: {}", samepage::error_chain(&e));
                ExitCode::from(Exit::StartFailed)
            }
        },
        Command::BootTest(args) => ExitCode::from(samepage::boot_test::run(&args.into())),
        Command::Density(args) => density(args),
        Command::Kconfig => {
            print!("{}", samepage::KCONFIG_FRAGMENT);
            ExitCode::from(Exit::Success)
        }
        Command::Dedupd(args) => dedupd(args),
        Command::Balloon(args) => ExitCode::from(balloon(&args)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_panic_line_names_thread_message_and_place_on_one_line() {
        assert_eq!(
            panic_line(Some("virtio"), "index out of bounds", Some(("src/devices/virtio_mmio.rs", 154))),
            "samepage: error: panic in thread virtio: index out of bounds at src/devices/virtio_mmio.rs:154\n"
        );
        assert_eq!(
            panic_line(None, "two\nlines\x1b[2J", None),
            "samepage: error: panic in thread ?: two\\nlines\\u{1b}[2J\n"
        );
    }
}
