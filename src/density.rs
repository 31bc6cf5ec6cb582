//! `samepage density`: many VMs in one process sharing one dedup domain, with a progress line
//! while they run and what merging saved at the end.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::bus::lock;
use crate::config::{DedupMode, SerialConfig, VmConfig};
use crate::dedup::{DedupStats, Domain, Limits};
use crate::devices::fphash::merge_cpu_time;
use crate::error::VmmError;
use crate::hostmem::{resident_in, Resident};
use crate::stop::VmExit;
use crate::vmm::{StoppedVm, Vm, VmContext};
use samepage_virtio::fphash::{FphashStats, FphashStatsSnapshot};

/// A density run.
#[derive(Debug, Clone)]
pub struct DensityConfig {
    /// How many VMs.
    pub vms: usize,
    /// Every VM's configuration (the consoles are set per VM).
    pub template: VmConfig,
    /// Write each VM's console to `<dir>/vm<N>.log`.
    pub console_dir: Option<PathBuf>,
    /// How often to print the progress line (and scan for copy-on-write breaks).
    pub progress_every: Duration,
    /// Extra kernel command line for single VMs: (VM index, text appended to its command line).
    pub vm_cmdlines: Vec<(usize, String)>,
    /// How often each VM's merged pages are checked for copy-on-write breaks.
    pub dedup_scan_every: Duration,
}

/// One point of the savings curve.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Since the VMs started.
    pub at: Duration,
    /// Host memory merging (or KSM) saved then.
    pub saved_bytes: u64,
    /// Page records the VMs' fphash devices had received then.
    pub reported: u64,
}

/// KSM's count of pages merged into others, system-wide (/sys/kernel/mm/ksm/pages_sharing).
fn ksm_pages_sharing() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/ksm/pages_sharing")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// What a density run did.
#[derive(Debug)]
pub struct DensityReport {
    /// How each VM ended.
    pub exits: Vec<VmExit>,
    /// The domain's figures after the last VM stopped (before any memory was released); its
    /// VMA figure is the kernel's (`/proc/self/maps`).
    pub stats: DedupStats,
    /// The domain's own VMA count just before it was checked against the kernel's.
    pub vmas_counted: u64,
    /// VMAs of the whole process at the end (`vm.max_map_count` bounds them).
    pub process_vmas: u64,
    /// Host memory the guests' RAM held at the end: private pages plus the store.
    pub guest_ram: Resident,
    /// Store pages checked against their hashes.
    pub store_pages_verified: usize,
    /// Each VM's fphash device counters (what the device rejected never reaches the domain).
    pub devices: Vec<FphashStatsSnapshot>,
    /// Savings over time.
    pub samples: Vec<Sample>,
    /// Host memory KSM saved at the end (`--dedup ksm`; pages_sharing since the start).
    pub ksm_saved_bytes: u64,
    /// CPU time samepage spent merging.
    pub merge_cpu: Duration,
    /// How long the VMs ran.
    pub elapsed: Duration,
}

impl DensityReport {
    /// Host memory merging saved at the end, whichever way it merged.
    pub fn saved_bytes(&self) -> u64 {
        self.stats.bytes_saved + self.ksm_saved_bytes
    }

    /// Host memory the guests' RAM held at the end: private pages, less what KSM shares, plus
    /// the store.
    pub fn host_bytes(&self) -> u64 {
        (self.guest_ram.anonymous_bytes + self.stats.store_bytes_allocated)
            .saturating_sub(self.ksm_saved_bytes)
    }

    /// The first time the saving reached `fraction` of its final value.
    pub fn time_to(&self, fraction: f64) -> Option<Duration> {
        let target = (self.saved_bytes() as f64 * fraction) as u64;
        self.samples.iter().find(|s| s.saved_bytes >= target && s.saved_bytes > 0).map(|s| s.at)
    }

    /// When the last page report arrived (the last sample whose count grew).
    pub fn last_report(&self) -> Option<Duration> {
        let last = self.samples.last()?.reported;
        self.samples.iter().find(|s| s.reported == last && last > 0).map(|s| s.at)
    }

    /// Writes the savings curve as CSV (seconds, MiB saved, pages reported).
    pub fn write_samples(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut out = String::from("seconds,mib_saved,pages_reported\n");
        for s in &self.samples {
            out.push_str(&format!(
                "{:.3},{:.3},{}\n",
                s.at.as_secs_f64(),
                s.saved_bytes as f64 / MIB,
                s.reported
            ));
        }
        std::fs::write(path, out)
    }
}

const MIB: f64 = (1u64 << 20) as f64;
const PAGE_BYTES: u64 = 4096;

fn console_for(config: &DensityConfig, index: usize) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match &config.console_dir {
        Some(dir) => {
            let path = dir.join(format!("vm{index}.log"));
            Box::new(
                crate::hostfile::create_output(&path).map_err(|source| VmmError::Output { path, source })?,
            )
        }
        None => Box::new(std::io::sink()),
    })
}

/// Placeholder in a `--disk` path replaced by the VM's index, so each VM can have its own
/// copy of an image.
pub const VM_INDEX_PLACEHOLDER: &str = "{vm}";

/// VM `index`'s configuration: the template with its own disk paths and no console of its own.
fn config_for(template: &VmConfig, index: usize) -> VmConfig {
    let mut config = template.clone();
    config.serial = SerialConfig::None;
    for disk in &mut config.disks {
        let path = disk.path.to_string_lossy();
        if path.contains(VM_INDEX_PLACEHOLDER) {
            disk.path = PathBuf::from(path.replace(VM_INDEX_PLACEHOLDER, &index.to_string()));
        }
    }
    config
}

/// Builds and runs the VMs; returns once all have stopped.
pub fn run(config: &DensityConfig) -> Result<DensityReport, VmmError> {
    if let Some((vm, _)) = config.vm_cmdlines.iter().find(|(vm, _)| *vm >= config.vms) {
        return Err(VmmError::Config(crate::config::ConfigError::VmIndex { index: *vm, vms: config.vms }));
    }
    if let Some(dir) = &config.console_dir {
        std::fs::create_dir_all(dir).map_err(|source| VmmError::File { path: dir.clone(), source })?;
    }
    let domain = Arc::new(Mutex::new(Domain::new("density", Limits::default())?));
    let vms = build_vms(config, &domain)?;
    let device_stats: Vec<Arc<FphashStats>> = vms.iter().map(Vm::fphash_stats).collect();
    let meter = SavingsMeter::new(config.template.dedup == DedupMode::Ksm);
    let reported_now = || device_stats.iter().map(|d| d.snapshot().records).sum::<u64>();

    let started = Instant::now();
    // Each VM thread says when it ends, so that the progress loop ends with the last one.
    let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
    let threads: Vec<JoinHandle<Result<(VmExit, StoppedVm), VmmError>>> = vms
        .into_iter()
        .enumerate()
        .map(|(index, vm)| {
            let ended_tx = ended_tx.clone();
            std::thread::Builder::new()
                .name(format!("vm{index}"))
                .spawn(move || {
                    let result = vm.run_and_keep();
                    let _ = ended_tx.send(());
                    result
                })
                .map_err(VmmError::host("VM thread"))
        })
        .collect::<Result<_, _>>()?;
    drop(ended_tx);
    let mut samples =
        sample_until_stopped(config, &domain, threads.len(), &ended, &meter, &reported_now, started);
    let elapsed = started.elapsed();

    let mut exits = Vec::new();
    let mut stopped = Vec::new();
    for thread in threads {
        let (exit, vm) = thread.join().map_err(|_| VmmError::Host {
            what: "VM thread",
            source: std::io::Error::other("a VM thread panicked"),
        })??;
        exits.push(exit);
        stopped.push(vm);
    }
    // Every copy-on-write break by now is found (two looks) before the figures are taken.
    let stats = {
        let mut domain = lock(&domain);
        if let Err(e) = domain.settle() {
            log::warn!("dedup refresh failed: {e}");
        }
        let counted = domain.stats().vmas;
        domain.reconcile_vmas();
        (domain.stats(), counted)
    };
    let (stats, vmas_counted) = stats;
    let process_vmas = crate::dedup::process_vmas()? as u64;
    let ksm_saved_bytes = if meter.ksm { meter.saved(&stats) } else { 0 };
    samples.push(Sample { at: elapsed, saved_bytes: meter.saved(&stats), reported: reported_now() });
    let ranges: Vec<(usize, usize)> = stopped
        .iter()
        .flat_map(|vm| vm.mem.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)))
        .collect();
    let guest_ram = resident_in(&ranges).map_err(VmmError::host("/proc/self/smaps reading"))?;
    let store_pages_verified = lock(&domain).verify_store()?;
    drop(stopped);
    let devices = device_stats.iter().map(|d| d.snapshot()).collect();
    Ok(DensityReport {
        exits,
        stats,
        vmas_counted,
        process_vmas,
        guest_ram,
        store_pages_verified,
        devices,
        samples,
        ksm_saved_bytes,
        merge_cpu: merge_cpu_time(),
        elapsed,
    })
}

/// Builds every VM of the run in the shared domain.
fn build_vms(config: &DensityConfig, domain: &Arc<Mutex<Domain>>) -> Result<Vec<Vm>, VmmError> {
    let mut vms = Vec::with_capacity(config.vms);
    for index in 0..config.vms {
        let mut vm_config = config_for(&config.template, index);
        for (_, extra) in config.vm_cmdlines.iter().filter(|(vm, _)| *vm == index) {
            vm_config.cmdline = format!("{} {extra}", vm_config.cmdline);
        }
        let context = VmContext {
            label: format!("vm{index}"),
            console: Some(console_for(config, index)?),
            domain: Some(domain.clone()),
            dedup_scan_every: config.dedup_scan_every,
            ..VmContext::default()
        };
        vms.push(Vm::build_in(&vm_config, context)?);
    }
    Ok(vms)
}

/// What merging saves now: the domain's figure, or KSM's since the run started.
struct SavingsMeter {
    ksm: bool,
    ksm_baseline: u64,
}

impl SavingsMeter {
    fn new(ksm: bool) -> SavingsMeter {
        SavingsMeter { ksm, ksm_baseline: if ksm { ksm_pages_sharing() } else { 0 } }
    }

    fn saved(&self, stats: &DedupStats) -> u64 {
        if self.ksm {
            ksm_pages_sharing().saturating_sub(self.ksm_baseline) * PAGE_BYTES
        } else {
            stats.bytes_saved
        }
    }
}

/// Prints a progress line every `progress_every` until all `vms` VM threads have ended (each
/// sends on `ended`); returns the samples. The VMs' own event loops find copy-on-write breaks;
/// this only reads the figures.
fn sample_until_stopped(
    config: &DensityConfig,
    domain: &Mutex<Domain>,
    vms: usize,
    ended: &Receiver<()>,
    meter: &SavingsMeter,
    reported_now: &dyn Fn() -> u64,
    started: Instant,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut running = vms;
    loop {
        let stats = lock(domain).stats();
        let sample =
            Sample { at: started.elapsed(), saved_bytes: meter.saved(&stats), reported: reported_now() };
        samples.push(sample);
        eprintln!(
            "density: {:6.1} s  {running}/{vms} VMs running  reported {}  merged {}  saved {:.1} MiB  store {:.1} MiB",
            sample.at.as_secs_f64(),
            sample.reported,
            stats.mapped_pages,
            sample.saved_bytes as f64 / MIB,
            stats.store_bytes_allocated as f64 / MIB,
        );
        if running == 0 {
            return samples;
        }
        // Until the next progress line, or at once when the last VM ends.
        let next = Instant::now() + config.progress_every;
        while running > 0 {
            match ended.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(()) => running -= 1,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => running = 0,
            }
        }
    }
}

/// Prints the end-of-run summary.
pub fn print_report(report: &DensityReport, config: &DensityConfig) {
    let s = &report.stats;
    println!(
        "density: {} VMs, dedup {:?}, ran {:.1} s",
        config.vms,
        config.template.dedup,
        report.elapsed.as_secs_f64()
    );
    for (index, exit) in report.exits.iter().enumerate() {
        let how = exit.message().unwrap_or_else(|| format!("exit status {}", exit.exit_code()));
        println!("  vm{index}: {how}");
    }
    println!("  dedup: {s}");
    let sum = |field: fn(&FphashStatsSnapshot) -> u64| report.devices.iter().map(field).sum::<u64>();
    let (batches, rejected, bad_gpa, bad_record) =
        (sum(|d| d.batches), sum(|d| d.rejected_batches), sum(|d| d.bad_gpa), sum(|d| d.bad_record));
    println!(
        "  fphash devices: {batches} batches answered, {rejected} rejected; records refused as bad_gpa {bad_gpa}, bad_record {bad_record}"
    );
    println!(
        "  guest RAM on the host at the end: {:.1} MiB private + {:.1} MiB shared store = {:.1} MiB",
        report.guest_ram.anonymous_bytes as f64 / MIB,
        s.store_bytes_allocated as f64 / MIB,
        (report.guest_ram.anonymous_bytes + s.store_bytes_allocated) as f64 / MIB,
    );
    println!("  store: {} pages verified against their hashes", report.store_pages_verified);
    if config.template.dedup == DedupMode::Ksm {
        println!("  KSM shared {:.1} MiB of it", report.ksm_saved_bytes as f64 / MIB);
    }
    if config.template.dedup == DedupMode::Hinted {
        let ninety = report.time_to(0.9).map_or("n/a".to_string(), |t| format!("{:.1} s", t.as_secs_f64()));
        println!(
            "  merging saved {:.1} MiB of host memory (90 % of it after {ninety})",
            s.bytes_saved as f64 / MIB
        );
    }
    // One machine-readable line for scripts and tests.
    println!(
        "density-result: vms={} reported={} merged={} already={} mismatch={} bad_gpa={} no_room={} \
         cow_breaks={} mapped_pages={} store_pages={} store_bytes={} saved_bytes={} private_bytes={} \
         vmas={} vmas_counted={} process_vmas={} vma_undercount_max={} host_hashes={} second_look_kept={} seen_moving={} store_verified={} t90_ms={} elapsed_ms={} device_batches={} device_rejected_batches={} \
         device_bad_gpa={} device_bad_record={} host_bytes={} total_saved_bytes={} ksm_saved_bytes={} \
         last_report_ms={} merge_cpu_us={}",
        config.vms,
        s.reported,
        s.merged,
        s.already,
        s.rejected_mismatch,
        s.rejected_bad_gpa,
        s.rejected_no_room,
        s.cow_breaks,
        s.mapped_pages,
        s.store_pages,
        s.store_bytes_allocated,
        s.bytes_saved,
        report.guest_ram.anonymous_bytes,
        s.vmas,
        report.vmas_counted,
        report.process_vmas,
        s.vma_undercount_max,
        s.host_hashes,
        s.second_look_kept,
        s.seen_moving,
        report.store_pages_verified,
        report.time_to(0.9).map_or(-1, |t| t.as_millis() as i64),
        report.elapsed.as_millis(),
        batches,
        rejected,
        bad_gpa,
        bad_record,
        report.host_bytes(),
        report.saved_bytes(),
        report.ksm_saved_bytes,
        report.last_report().map_or(-1, |t| t.as_millis() as i64),
        report.merge_cpu.as_micros(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, EmulatedCpl0};

    #[test]
    fn each_vm_gets_its_own_disk_path() {
        let template = VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            mem_bytes: 256 << 20,
            vcpus: 1,
            disks: vec![
                DiskConfig { path: "/img/disk-{vm}.ext4".into(), read_only: false },
                DiskConfig { path: "/img/base.img".into(), read_only: true },
            ],
            serial: SerialConfig::Stdout,
            timeout: None,
            emulated_cpl0: EmulatedCpl0::Off,
            dedup: DedupMode::Hinted,
        };
        let vm3 = config_for(&template, 3);
        assert_eq!(vm3.disks[0].path, PathBuf::from("/img/disk-3.ext4"));
        assert_eq!(vm3.disks[1].path, PathBuf::from("/img/base.img"));
        assert_eq!(vm3.serial, SerialConfig::None);
    }
}
