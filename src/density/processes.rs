//! `samepage density` as users run VMs: one `samepage run` process per VM, all joined to a
//! broker (`samepage dedupd`) that this run starts on a private socket. The figures come from
//! each VMM's metrics file (`--metrics`) and the broker's `status` and `check`; the VMMs keep
//! their guests' memory after the guests stop (`--hold-until-eof`) until the figures are taken.
//! What the VMMs print on standard error is relayed to density's own (`relay.rs`).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::relay::{Relay, VmStderr};
use super::DensityError;
use super::{config_for, progress_line, DensityConfig, DensityReport, KsmMeter, Sample, VmEnd};
use crate::config::{BrokerConfig, DedupMode, SerialConfig, VmConfig};
use crate::dedup::DedupStats;
use crate::dedupd::report::{CheckReport, StatusReport};
use crate::metrics::VmMetrics;
use crate::residency::Resident;
use crate::run_args::{value_arg, RunArgs};
use crate::stop::VmStop;

/// How long the broker may take to answer its first STATUS.
const BROKER_START_WITHIN: Duration = Duration::from_secs(10);
/// How often the run looks whether the VMs stopped (progress lines come less often).
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// One VM's process.
struct VmProcess {
    child: Child,
    /// Closing it lets the VMM exit after its guest stopped.
    stdin: Option<ChildStdin>,
    metrics: PathBuf,
    /// Its standard error, relayed.
    stderr: VmStderr,
    /// Its last metrics.
    last: Option<VmMetrics>,
}

/// The broker this run started.
struct Broker {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGTERM: the broker removes its socket and exits.
        // SAFETY: kill on the pid of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Runs the VMs as processes; returns once all have stopped and the figures are taken.
pub fn run(config: &DensityConfig) -> Result<DensityReport, DensityError> {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(std::env::temp_dir().join("samepage-density-"))
        .map_err(|e| {
            DensityError::host("density's private directory")(std::io::Error::from_raw_os_error(e.errno()))
        })?;
    let exe = std::env::current_exe().map_err(DensityError::host("the samepage binary's path"))?;
    let broker = match config.template.dedup.mode {
        DedupMode::Hinted => Some(start_broker(&exe, dir.as_path())?),
        DedupMode::Ksm | DedupMode::Off => None,
    };
    let ksm = (config.template.dedup.mode == DedupMode::Ksm).then(KsmMeter::start);
    let started = Instant::now();
    let mut vms = Vec::with_capacity(config.vms);
    for index in 0..config.vms {
        vms.push(start_vm(&exe, config, index, dir.as_path(), broker.as_ref().map(|b| b.socket.as_path()))?);
    }
    // Read before the filter, which has no lseek for it.
    let kernel_copy_bytes = super::kernel_copy_bytes(config);
    // This thread starts nothing more: from here it watches, queries and reports under its
    // seccomp filter.
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Density) {
        for vm in &mut vms {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
        }
        return Err(e.into());
    }
    let stop = Arc::new(VmStop::new());
    crate::signals::watch(&stop);

    let mut relay = Relay::default();
    let mut samples = Vec::new();
    let mut next_line = Instant::now();
    let mut forwarded = false;
    loop {
        for vm in &mut vms {
            vm.stderr.pump(&mut relay);
        }
        let stopped = vms.iter_mut().map(vm_stopped).filter(|s| *s).count();
        if let (Some(crate::stop::VmExit::Signal(num)), false) = (stop.wait(Duration::ZERO), forwarded) {
            forwarded = true;
            for vm in &vms {
                // SAFETY: kill on the pid of our own child, not yet reaped.
                unsafe { libc::kill(vm.child.id() as i32, num) };
            }
        }
        if Instant::now() >= next_line || stopped == vms.len() {
            let status = broker.as_ref().and_then(|b| broker_status(&b.socket));
            let sample = sample(config, kernel_copy_bytes, &vms, status.as_ref(), ksm.as_ref(), started);
            let (mapped, store) = status.as_ref().map_or((0, 0), domain_figures);
            progress_line(&sample, vms.len() - stopped, vms.len(), mapped, store);
            samples.push(sample);
            next_line = Instant::now() + config.progress_every;
        }
        if stopped == vms.len() {
            break;
        }
        std::thread::sleep(LOOK_EVERY);
    }
    let elapsed = started.elapsed();

    // The broker's merging ends here: what it does next (the check below re-hashes the store,
    // the VMMs' exits release references) is not merge work.
    let broker_cpu = broker.as_ref().map_or(Duration::ZERO, |b| process_cpu(b.child.id()));
    // Every VMM holds its guest's memory now: take the domain's figures, then let them go.
    let status = broker.as_ref().and_then(|b| broker_status(&b.socket));
    let check = match &broker {
        Some(b) => Some(broker_check(&b.socket)?),
        None => None,
    };
    let ksm_saved_bytes = ksm.as_ref().map_or(0, KsmMeter::saved_bytes);
    let ends = release_vms(&mut vms, &mut relay)?;
    if relay.repeats > 0 {
        eprintln!(
            "density: {} more line(s) from the VMs not shown: each repeats one shown above",
            relay.repeats
        );
    }
    let report = build_report(
        &vms,
        ends,
        status.as_ref(),
        check.as_ref(),
        samples,
        ksm_saved_bytes,
        elapsed,
        broker.as_ref(),
        broker_cpu,
    );
    let disks: Vec<_> =
        vms.iter().map(|vm| vm.last.as_ref().map(|m| m.disks.clone()).unwrap_or_default()).collect();
    let mut report = DensityReport {
        image_cache_bytes: super::image_cache_bytes(config),
        snapshot_cache_bytes: super::snapshot_cache_bytes(config),
        kernel_copy_bytes,
        disks: super::disk_figures(config, &disks),
        ..report
    };
    // The last sample is the final saving, shared images included.
    let saved = report.saved_bytes();
    if let Some(last) = report.samples.last_mut() {
        last.saved_bytes = saved;
    }
    drop(broker);
    Ok(report)
}

/// Lets every VMM exit (its standard input ends) and waits for them, relaying what they print
/// meanwhile (one that fills its pipe would otherwise wait for us as we wait for it); returns
/// how each ended.
fn release_vms(vms: &mut [VmProcess], relay: &mut Relay) -> Result<Vec<VmEnd>, DensityError> {
    for vm in vms.iter_mut() {
        drop(vm.stdin.take());
    }
    let mut statuses = vec![None; vms.len()];
    while statuses.iter().any(Option::is_none) {
        for (vm, status) in vms.iter_mut().zip(&mut statuses) {
            vm.stderr.pump(relay);
            if status.is_none() {
                *status = vm.child.try_wait().map_err(DensityError::host("a VM process"))?;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ends = Vec::with_capacity(vms.len());
    for (vm, status) in vms.iter_mut().zip(statuses.into_iter().flatten()) {
        // Its write end closed with it: what is left in the pipe arrives now.
        while vm.stderr.open() {
            vm.stderr.pump(relay);
            if vm.stderr.open() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        ends.push(vm_end(vm, status));
    }
    Ok(ends)
}

/// Starts `samepage dedupd` on a socket in `dir` and waits until it answers.
fn start_broker(exe: &Path, dir: &Path) -> Result<Broker, DensityError> {
    let socket = dir.join("dedupd.sock");
    let log = dir.join("dedupd.log");
    let child = Command::new(exe)
        .arg("dedupd")
        .arg("--socket")
        .arg(&socket)
        .arg("--seccomp")
        .arg(value_arg(crate::seccomp::setting()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).map_err(|source| DensityError::File { path: log.clone(), source })?)
        .spawn()
        .map_err(DensityError::host("the dedup broker"))?;
    let mut broker = Broker { child, socket, log };
    let start = Instant::now();
    while broker_status(&broker.socket).is_none() {
        let gone = broker.child.try_wait().ok().flatten();
        if gone.is_some() || start.elapsed() > BROKER_START_WITHIN {
            let said = std::fs::read_to_string(&broker.log).unwrap_or_default();
            let last: Vec<&str> = said.lines().rev().take(3).collect();
            return Err(DensityError::BrokerStart {
                said: last.into_iter().rev().collect::<Vec<_>>().join(" / "),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(broker)
}

/// The `samepage run` arguments of VM `index` (`vm`): its console in the console directory
/// (or none), its merging through `socket`, its metrics file, and held until its standard input
/// ends, under the seccomp setting of this process.
fn run_args(
    mut vm: VmConfig,
    config: &DensityConfig,
    index: usize,
    metrics: &Path,
    socket: Option<&Path>,
) -> Vec<OsString> {
    vm.serial = match &config.console_dir {
        Some(dir) => SerialConfig::File(dir.join(format!("vm{index}.log"))),
        None => SerialConfig::None,
    };
    // This run's own broker, never one the template names.
    vm.dedup.broker = socket.map(|socket| BrokerConfig { socket: socket.to_path_buf(), domain: None });
    let mut args = RunArgs::for_vm(&vm, format!("vm{index}"));
    args.restore = config.restore.clone();
    args.metrics = Some(metrics.to_path_buf());
    args.hold_until_eof = true;
    args.seccomp = crate::seccomp::setting();
    std::iter::once("run".into()).chain(args.to_args()).collect()
}

fn start_vm(
    exe: &Path,
    config: &DensityConfig,
    index: usize,
    dir: &Path,
    socket: Option<&Path>,
) -> Result<VmProcess, DensityError> {
    let vm = config_for(config, index);
    if let Some(dir) = &config.console_dir {
        // The VMM appends: start each run's console afresh.
        let path = dir.join(format!("vm{index}.log"));
        crate::checked_open::create_output(&path).map_err(|source| DensityError::Console { path, source })?;
    }
    let metrics = dir.join(format!("vm{index}.json"));
    let mut child = Command::new(exe)
        .args(run_args(vm, config, index, &metrics, socket))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(DensityError::host("a VM process"))?;
    let stdin = child.stdin.take();
    let stderr = child.stderr.take().ok_or_else(|| {
        DensityError::host("a VM process's standard error")(std::io::Error::from(
            std::io::ErrorKind::BrokenPipe,
        ))
    })?;
    let stderr = match VmStderr::new(format!("vm{index}"), stderr) {
        Ok(stderr) => stderr,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DensityError::host("a VM process's standard error")(e));
        }
    };
    Ok(VmProcess { child, stdin, metrics, stderr, last: None })
}

/// Whether the VM's guest stopped (its final metrics are written) or its process ended.
fn vm_stopped(vm: &mut VmProcess) -> bool {
    if let Some(m) = read_metrics(&vm.metrics) {
        vm.last = Some(m);
    }
    vm.last.as_ref().is_some_and(|m| !m.running) || vm.child.try_wait().ok().flatten().is_some()
}

fn read_metrics(path: &Path) -> Option<VmMetrics> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn broker_status(socket: &Path) -> Option<StatusReport> {
    crate::dedupd::query::status(socket).ok().map(|answer| answer.report)
}

fn broker_check(socket: &Path) -> Result<CheckReport, DensityError> {
    crate::dedupd::query::check(socket).map(|answer| answer.report).map_err(DensityError::BrokerQuery)
}

/// Guest pages mapping the store (references) and the store's bytes, over the broker's domains.
fn domain_figures(status: &StatusReport) -> (u64, u64) {
    status.domains.iter().fold((0, 0), |(r, b), d| (r + d.references, b + d.store_bytes))
}

fn sample(
    config: &DensityConfig,
    kernel_copy_bytes: u64,
    vms: &[VmProcess],
    status: Option<&StatusReport>,
    ksm: Option<&KsmMeter>,
    started: Instant,
) -> Sample {
    let reported = vms.iter().filter_map(|vm| vm.last.as_ref()).map(|m| m.fphash.records).sum();
    let saved_bytes = match (ksm, status) {
        (Some(k), _) => k.saved_bytes(),
        (None, Some(s)) => s.domains.iter().map(|d| d.references.saturating_sub(d.store_pages) * 4096).sum(),
        (None, None) => 0,
    };
    let image_pages = vms.iter().filter_map(|vm| vm.last.as_ref()).map(|m| m.dedup.image_pages).sum();
    let kernel_pages = vms.iter().filter_map(|vm| vm.last.as_ref()).map(|m| m.dedup.kernel_pages).sum();
    let saved_bytes = saved_bytes
        + super::image_saving(config, image_pages)
        + super::kernel_saving(kernel_copy_bytes, kernel_pages);
    Sample { at: started.elapsed(), saved_bytes, reported }
}

/// How a VM ended: its final metrics, or its process's status.
fn vm_end(vm: &VmProcess, status: std::process::ExitStatus) -> VmEnd {
    use std::os::unix::process::ExitStatusExt;
    if let Some(m) = vm.last.as_ref().filter(|m| !m.running) {
        if let Some(code) = m.exit_code {
            return VmEnd { code, message: m.exit_reason.clone() };
        }
    }
    let last_line = vm.stderr.last_line();
    match (status.code(), status.signal()) {
        (Some(code), _) => {
            VmEnd { code: code as u8, message: Some(format!("the VMM exited with {code}: {last_line}")) }
        }
        (None, Some(sig)) => VmEnd {
            code: 128u8.saturating_add(sig as u8),
            message: Some(format!("the VMM died of signal {sig}")),
        },
        _ => VmEnd { code: 1, message: Some("the VMM ended".into()) },
    }
}

/// CPU time a process has used (user + system), from `/proc/<pid>/stat`.
fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf only reads a system value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    vms: &[VmProcess],
    ends: Vec<VmEnd>,
    status: Option<&StatusReport>,
    check: Option<&CheckReport>,
    mut samples: Vec<Sample>,
    ksm_saved_bytes: u64,
    elapsed: Duration,
    broker: Option<&Broker>,
    broker_cpu: Duration,
) -> DensityReport {
    let metrics: Vec<&VmMetrics> = vms.iter().filter_map(|vm| vm.last.as_ref()).collect();
    let mut stats = DedupStats::default();
    let mut guest_ram = Resident::default();
    let mut merge_cpu = Duration::ZERO;
    let mut refresh_cpu = Duration::ZERO;
    let mut process_vmas = 0;
    for m in &metrics {
        stats.add(&m.dedup);
        process_vmas = process_vmas.max(m.process_vmas);
        if let Some(r) = m.guest_ram {
            guest_ram.rss_bytes += r.rss_bytes;
            guest_ram.anonymous_bytes += r.anonymous_bytes;
        }
        merge_cpu += Duration::from_micros(m.merge_cpu_us);
        refresh_cpu += Duration::from_micros(m.refresh_cpu_us);
    }
    // The domain's store, as the broker counts it.
    if let Some(s) = status {
        let (references, store_bytes) = domain_figures(s);
        let store_pages: u64 = s.domains.iter().map(|d| d.store_pages).sum();
        stats.store_pages = store_pages;
        stats.store_bytes_allocated = store_bytes;
        stats.bytes_saved = references.saturating_sub(store_pages) * 4096;
    }
    merge_cpu += broker_cpu;
    let broker_rss_bytes = broker.map_or(0, |b| process_rss(b.child.id()));
    let store_pages_verified =
        check.map_or(0, |c| c.domains.iter().map(|d| d.pages_checked).sum::<u64>() as usize);
    if check.is_some_and(|c| !c.consistent) {
        log::error!(
            "the broker's check found a disagreement: {:?}",
            check.and_then(|c| c.first_disagreement.clone())
        );
    }
    let reported = metrics.iter().map(|m| m.fphash.records).sum();
    samples.push(Sample { at: elapsed, saved_bytes: stats.bytes_saved + ksm_saved_bytes, reported });
    let vmas_counted = metrics.iter().map(|m| m.vmas_counted).sum();
    DensityReport {
        ends,
        vmas_counted,
        stats,
        process_vmas,
        guest_ram,
        store_pages_verified,
        devices: metrics.iter().map(|m| m.fphash).collect(),
        samples,
        ksm_saved_bytes,
        image_cache_bytes: 0,
        snapshot_cache_bytes: 0,
        kernel_copy_bytes: 0,
        merge_cpu,
        refresh_cpu,
        broker_cpu,
        broker_rss_bytes,
        elapsed,
        disks: Vec::new(),
    }
}

/// Resident memory of a process (`VmRSS` of `/proc/<pid>/status`).
fn process_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
