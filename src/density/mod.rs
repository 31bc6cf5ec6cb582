//! `samepage density`: many VMs sharing one dedup domain, with a progress line while they run
//! and what merging saved at the end. By default each VM is its own `samepage run` process,
//! joined to a broker the run starts ([`processes`], as users run VMs); `--threads` runs
//! them all in this process ([`threads`]).

mod error;
pub mod processes;
mod relay;
pub mod threads;

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use samepage_virtio::fphash::FphashStatsSnapshot;

pub use error::DensityError;

use crate::config::{ConfigError, DedupMode, SerialConfig, VmConfig};
use crate::dedup::DedupStats;
use crate::metrics::DiskMetrics;
use crate::residency::Resident;

/// A density run.
#[derive(Debug, Clone)]
pub struct DensityConfig {
    /// How many VMs.
    pub vms: usize,
    /// Every VM's configuration (the consoles are set per VM).
    pub template: VmConfig,
    /// Write each VM's console to `<dir>/vm<N>.log`.
    pub console_dir: Option<PathBuf>,
    /// How often to print the progress line.
    pub progress_every: Duration,
    /// Extra kernel command line for single VMs: (VM index, text appended to its command line).
    pub vm_cmdlines: Vec<(usize, String)>,
    /// All VMs in this process instead of one process each.
    pub threads: bool,
    /// Restore every VM from this snapshot instead of booting it (`--restore`): clones
    /// sharing the snapshot's memory copy-on-write.
    pub restore: Option<PathBuf>,
}

/// Runs the VMs as `config` says; returns once all have stopped.
pub fn run(config: &DensityConfig) -> Result<DensityReport, DensityError> {
    if let Some((vm, _)) = config.vm_cmdlines.iter().find(|(vm, _)| *vm >= config.vms) {
        return Err(ConfigError::VmIndex { index: *vm, vms: config.vms }.into());
    }
    // One snapshot directory for every VM would have them replace each other's snapshot; one
    // VM may take one (the clone benchmark's booted guest, measured as density measures).
    if config.template.snapshot.is_some() && config.vms > 1 {
        return Err(ConfigError::DensitySnapshot.into());
    }
    if config.restore.is_some() && (config.threads || !config.vm_cmdlines.is_empty()) {
        return Err(ConfigError::DensityRestore.into());
    }
    // Clones have the snapshot's machine: the report's figures (the disks shared, the RAM)
    // are of that machine.
    let restored;
    let config = match &config.restore {
        Some(dir) => {
            let machine = crate::snapshot::open(&crate::snapshot::SnapshotFiles::in_dir(dir))?.state.machine;
            restored = DensityConfig {
                template: VmConfig {
                    kernel: machine.kernel.clone(),
                    cmdline: machine.cmdline.clone(),
                    mem_bytes: machine.mem_bytes,
                    vcpus: machine.vcpus,
                    disks: machine.disks.iter().map(crate::snapshot::state::SavedDisk::config).collect(),
                    ..config.template.clone()
                },
                ..config.clone()
            };
            &restored
        }
        None => config,
    };
    // Each VM serves its own balloon socket: one path for several would have all but the
    // first fail to start.
    if let Some(socket) = &config.template.balloon_socket {
        if config.vms > 1 && !socket.to_string_lossy().contains(VM_INDEX_PLACEHOLDER) {
            return Err(ConfigError::BalloonSocketShared(socket.clone()).into());
        }
    }
    if let Some(dir) = &config.console_dir {
        std::fs::create_dir_all(dir).map_err(|source| DensityError::File { path: dir.clone(), source })?;
    }
    // Each VM says when KSM is not running (a VM process's line is relayed once).
    if config.threads {
        threads::run(config)
    } else {
        processes::run(config)
    }
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

/// How one VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEnd {
    /// The exit code its `samepage run` has (or would have).
    pub code: u8,
    /// Why, when it is not an ordinary stop.
    pub message: Option<String>,
}

/// KSM's count of pages merged into others, system-wide (/sys/kernel/mm/ksm/pages_sharing).
fn ksm_pages_sharing() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/ksm/pages_sharing")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// What KSM saved since a run started.
struct KsmMeter {
    baseline: u64,
}

impl KsmMeter {
    fn start() -> KsmMeter {
        KsmMeter { baseline: ksm_pages_sharing() }
    }

    fn saved_bytes(&self) -> u64 {
        ksm_pages_sharing().saturating_sub(self.baseline) * crate::dedup::PAGE_SIZE as u64
    }
}

/// What a density run did.
#[derive(Debug)]
pub struct DensityReport {
    /// How each VM ended.
    pub ends: Vec<VmEnd>,
    /// The domain's figures after the last VM stopped (before any memory was released); its
    /// VMA figure is the kernel's (`/proc/<pid>/maps`).
    pub stats: DedupStats,
    /// The VMA count the merge engine kept, just before it was checked against the kernel's.
    pub vmas_counted: u64,
    /// VMAs of the VMM process with the most (`vm.max_map_count` bounds each).
    pub process_vmas: u64,
    /// Host memory the guests' RAM held at the end: private pages (the store is apart).
    pub guest_ram: Resident,
    /// Store pages checked against their hashes.
    pub store_pages_verified: usize,
    /// Each VM's fphash device counters (what the device rejected never reaches the domain).
    pub devices: Vec<FphashStatsSnapshot>,
    /// Savings over time.
    pub samples: Vec<Sample>,
    /// Host memory KSM saved at the end (`--dedup ksm`; pages_sharing since the start).
    pub ksm_saved_bytes: u64,
    /// The page cache of the shared read-only images (the one copy their VMs map).
    pub image_cache_bytes: u64,
    /// The page cache of the snapshot's memory file that clones map (`--restore`; its one
    /// copy, shared by every clone until it writes).
    pub snapshot_cache_bytes: u64,
    /// The kernel file's read-only segments in whole pages: the one copy of the kernel's text
    /// and read-only data that every VM booting it maps (`docs/boot.md`).
    pub kernel_copy_bytes: u64,
    /// CPU time spent merging: the VMMs' merge batches with their vCPU pauses, their periodic
    /// refreshes and the broker's process.
    pub merge_cpu: Duration,
    /// The VMMs' periodic refreshes (part of `merge_cpu`).
    pub refresh_cpu: Duration,
    /// The broker's CPU time (part of `merge_cpu`; 0 without a broker).
    pub broker_cpu: Duration,
    /// The broker's resident memory at the end (0 without a broker).
    pub broker_rss_bytes: u64,
    /// How long the VMs ran.
    pub elapsed: Duration,
    /// Each `--disk` over all VMs: pages mapped from its image, bytes copied.
    pub disks: Vec<DiskFigures>,
}

/// One `--disk` over all VMs: how the guests' reads of it were served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskFigures {
    /// The `--disk` path as given (`{vm}` and all).
    pub path: String,
    /// Whether the VMs share its image (reads of whole aligned pages map them).
    pub shared: bool,
    /// Pages mapped from the image.
    pub mapped_pages: u64,
    /// Pages copied into guest memory (each VM's copied bytes in 4 KiB pages, rounded up).
    pub copied_pages: u64,
    /// Bytes copied into guest memory.
    pub copied_bytes: u64,
}

/// Each `--disk`'s figures summed over the VMs, from each VM's disks (`per_vm`, in `--disk`
/// order).
fn disk_figures(config: &DensityConfig, per_vm: &[Vec<DiskMetrics>]) -> Vec<DiskFigures> {
    let mut disks: Vec<DiskFigures> = config
        .template
        .disks
        .iter()
        .map(|d| DiskFigures { path: d.path.to_string_lossy().into_owned(), ..DiskFigures::default() })
        .collect();
    for vm in per_vm {
        for (total, disk) in disks.iter_mut().zip(vm) {
            total.shared |= disk.shared;
            total.mapped_pages += disk.device.shared_pages;
            total.copied_pages += disk.copied_pages;
            total.copied_bytes += disk.device.copied_bytes;
        }
    }
    disks
}

impl DensityReport {
    /// Host memory that sharing image pages saved: the guest pages that map them, less the
    /// one copy in the page cache.
    pub fn image_saved_bytes(&self) -> u64 {
        (self.stats.image_pages * crate::dedup::PAGE_SIZE as u64).saturating_sub(self.image_cache_bytes)
    }

    /// Host memory that holding the kernel once saved: the guest pages that map the kernel
    /// file, less its one copy.
    pub fn kernel_saved_bytes(&self) -> u64 {
        kernel_saving(self.kernel_copy_bytes, self.stats.kernel_pages)
    }

    /// The kernel file's page cache the guests map (its one copy; none when no page maps it).
    fn kernel_cache_bytes(&self) -> u64 {
        if self.stats.kernel_pages == 0 {
            0
        } else {
            self.kernel_copy_bytes
        }
    }

    /// Host memory merging saved at the end, whichever way it merged.
    pub fn saved_bytes(&self) -> u64 {
        self.stats.bytes_saved + self.ksm_saved_bytes + self.image_saved_bytes() + self.kernel_saved_bytes()
    }

    /// Host memory the guests' RAM held at the end: private pages, less what KSM shares, plus
    /// the store, the shared images' page cache and the kernel's.
    pub fn host_bytes(&self) -> u64 {
        (self.guest_ram.anonymous_bytes
            + self.stats.store_bytes_allocated
            + self.image_cache_bytes
            + self.snapshot_cache_bytes
            + self.kernel_cache_bytes())
        .saturating_sub(self.ksm_saved_bytes)
    }

    /// The first time the saving reached `fraction` of its final value.
    pub fn time_to(&self, fraction: f64) -> Option<Duration> {
        let target = (self.saved_bytes() as f64 * fraction) as u64;
        self.samples.iter().find(|s| s.saved_bytes >= target && s.saved_bytes > 0).map(|s| s.at)
    }

    /// When the last page report arrived (the first sample with the final count).
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

    /// The machine-readable result (`density-result:`, one JSON object).
    pub fn result(&self, vms: usize) -> DensityResult {
        let s = &self.stats;
        let sum = |field: fn(&FphashStatsSnapshot) -> u64| self.devices.iter().map(field).sum::<u64>();
        let ms = |d: Option<Duration>| d.map_or(-1, |t| t.as_millis() as i64);
        DensityResult {
            vms,
            reported: s.reported,
            merged: s.merged,
            already: s.already,
            mismatch: s.rejected_mismatch,
            bad_gpa: s.rejected_bad_gpa,
            no_room: s.rejected_no_room,
            broker_unavailable: s.broker_unavailable,
            cow_breaks: s.cow_breaks,
            mapped_pages: s.mapped_pages,
            store_pages: s.store_pages,
            store_bytes: s.store_bytes_allocated,
            saved_bytes: s.bytes_saved,
            private_bytes: self.guest_ram.anonymous_bytes,
            vmas: s.vmas,
            vmas_counted: self.vmas_counted,
            process_vmas: self.process_vmas,
            vma_undercount_max: s.vma_undercount_max,
            host_hashes: s.host_hashes,
            host_hashes_for_guests: s.host_hashes_for_guests,
            image_pages: s.image_pages,
            image_mapped: s.image_mapped,
            image_merged: s.image_merged,
            image_stragglers_merged: s.image_stragglers_merged,
            image_hashes_remembered: s.image_hashes_remembered,
            image_cow_breaks: s.image_cow_breaks,
            image_unshared_pages: s.image_unshared_pages,
            image_cache_bytes: self.image_cache_bytes,
            image_saved_bytes: self.image_saved_bytes(),
            snapshot_cache_bytes: self.snapshot_cache_bytes,
            kernel_pages: s.kernel_pages,
            kernel_mapped: s.kernel_mapped,
            kernel_cow_breaks: s.kernel_cow_breaks,
            kernel_copies_merged: s.kernel_copies_merged,
            kernel_saved_bytes: self.kernel_saved_bytes(),
            second_look_kept: s.second_look_kept,
            seen_moving: s.seen_moving,
            store_verified: self.store_pages_verified as u64,
            t90_ms: ms(self.time_to(0.9)),
            elapsed_ms: self.elapsed.as_millis() as u64,
            device_batches: sum(|d| d.batches),
            device_rejected_batches: sum(|d| d.rejected_batches),
            device_bad_gpa: sum(|d| d.bad_gpa),
            device_bad_record: sum(|d| d.bad_record),
            device_host_hashed: sum(|d| d.host_hashed),
            host_bytes: self.host_bytes(),
            total_saved_bytes: self.saved_bytes(),
            ksm_saved_bytes: self.ksm_saved_bytes,
            last_report_ms: ms(self.last_report()),
            merge_cpu_us: self.merge_cpu.as_micros() as u64,
            refresh_cpu_us: self.refresh_cpu.as_micros() as u64,
            broker_cpu_us: self.broker_cpu.as_micros() as u64,
            broker_rss_bytes: self.broker_rss_bytes,
            disk_mapped_pages: self.disks.iter().map(|d| d.mapped_pages).sum(),
            disk_copied_pages: self.disks.iter().map(|d| d.copied_pages).sum(),
            disk_copied_bytes: self.disks.iter().map(|d| d.copied_bytes).sum(),
            discarded: s.discarded,
            discarded_remapped: s.discarded_remapped,
            zero_pages_checked: s.zero_pages_checked,
            zero_pages_given_back: s.zero_pages_given_back,
            zero_sweeps: s.zero_sweeps,
        }
    }
}

/// The figures scripts and tests read (`density-result: {...}`), flat.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)] // Each is the figure of the same name in DensityReport / DedupStats.
pub struct DensityResult {
    pub vms: usize,
    pub reported: u64,
    pub merged: u64,
    pub already: u64,
    pub mismatch: u64,
    pub bad_gpa: u64,
    pub no_room: u64,
    pub broker_unavailable: u64,
    pub cow_breaks: u64,
    pub mapped_pages: u64,
    pub store_pages: u64,
    pub store_bytes: u64,
    pub saved_bytes: u64,
    pub private_bytes: u64,
    pub vmas: u64,
    pub vmas_counted: u64,
    pub process_vmas: u64,
    pub vma_undercount_max: u64,
    pub host_hashes: u64,
    pub host_hashes_for_guests: u64,
    pub image_pages: u64,
    pub image_mapped: u64,
    pub image_merged: u64,
    pub image_stragglers_merged: u64,
    pub image_hashes_remembered: u64,
    pub image_cow_breaks: u64,
    pub image_unshared_pages: u64,
    pub image_cache_bytes: u64,
    pub image_saved_bytes: u64,
    pub snapshot_cache_bytes: u64,
    pub kernel_pages: u64,
    pub kernel_mapped: u64,
    pub kernel_cow_breaks: u64,
    pub kernel_copies_merged: u64,
    pub kernel_saved_bytes: u64,
    pub second_look_kept: u64,
    pub seen_moving: u64,
    pub store_verified: u64,
    pub t90_ms: i64,
    pub elapsed_ms: u64,
    pub device_batches: u64,
    pub device_rejected_batches: u64,
    pub device_bad_gpa: u64,
    pub device_bad_record: u64,
    pub device_host_hashed: u64,
    pub host_bytes: u64,
    pub total_saved_bytes: u64,
    pub ksm_saved_bytes: u64,
    pub last_report_ms: i64,
    pub merge_cpu_us: u64,
    pub refresh_cpu_us: u64,
    pub broker_cpu_us: u64,
    pub broker_rss_bytes: u64,
    pub disk_mapped_pages: u64,
    pub disk_copied_pages: u64,
    pub disk_copied_bytes: u64,
    pub discarded: u64,
    pub discarded_remapped: u64,
    pub zero_pages_checked: u64,
    pub zero_pages_given_back: u64,
    pub zero_sweeps: u64,
}

const MIB: f64 = (1u64 << 20) as f64;

/// Placeholder in a `--disk` or `--balloon-socket` path replaced by the VM's index, so each
/// VM can have its own copy of an image and its own balloon socket.
pub const VM_INDEX_PLACEHOLDER: &str = "{vm}";

/// VM `index`'s configuration: the template with its own disk paths and balloon socket, its
/// extra command line and no console of its own.
fn config_for(config: &DensityConfig, index: usize) -> VmConfig {
    let mut vm = config.template.clone();
    vm.serial = SerialConfig::None;
    for disk in &mut vm.disks {
        let path = disk.path.to_string_lossy();
        if path.contains(VM_INDEX_PLACEHOLDER) {
            disk.path = PathBuf::from(path.replace(VM_INDEX_PLACEHOLDER, &index.to_string()));
        }
    }
    if let Some(socket) = &vm.balloon_socket {
        let path = socket.to_string_lossy();
        if path.contains(VM_INDEX_PLACEHOLDER) {
            vm.balloon_socket = Some(PathBuf::from(path.replace(VM_INDEX_PLACEHOLDER, &index.to_string())));
        }
    }
    for (_, extra) in config.vm_cmdlines.iter().filter(|(vm, _)| *vm == index) {
        vm.cmdline = format!("{} {extra}", vm.cmdline);
    }
    vm
}

/// The page cache of the snapshot's memory file the clones map (`--restore`), counted whole
/// when it cannot be measured.
fn snapshot_cache_bytes(config: &DensityConfig) -> u64 {
    let Some(dir) = &config.restore else { return 0 };
    let memory = dir.join(crate::snapshot::MEMORY_FILE);
    crate::residency::file_cache_bytes(&memory)
        .unwrap_or_else(|_| std::fs::metadata(&memory).map_or(0, |m| m.len()))
}

/// The page cache of the run's shared read-only images (each file once).
fn image_cache_bytes(config: &DensityConfig) -> u64 {
    let mut paths: Vec<PathBuf> = (0..config.vms)
        .flat_map(|i| config_for(config, i).disks)
        .filter(|d| d.shares())
        .map(|d| d.path)
        .collect();
    paths.sort();
    paths.dedup();
    // A file whose cache cannot be measured counts whole: the saving is never overstated.
    paths
        .iter()
        .map(|p| {
            crate::residency::file_cache_bytes(p).unwrap_or_else(|e| {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    log::warn!("page cache of {} not measured ({e}); counting the whole file", p.display())
                });
                std::fs::metadata(p).map_or(0, |m| m.len())
            })
        })
        .sum()
}

/// The kernel file's read-only segments in whole pages, in bytes: the one copy of them that
/// every VM booting the file maps (0 for a bzImage or a file that cannot be read now).
fn kernel_copy_bytes(config: &DensityConfig) -> u64 {
    let Ok(mut file) = std::fs::File::open(&config.template.kernel) else { return 0 };
    let pages: usize = crate::x86_64::kernel_file::read_only_segments(&mut file)
        .iter()
        .filter_map(|s| s.whole_pages())
        .map(|(_, _, pages)| pages)
        .sum();
    (pages * crate::dedup::PAGE_SIZE) as u64
}

/// What holding the kernel once saves while `kernel_pages` guest pages map its file: those
/// pages less the one copy (`copy_bytes`).
fn kernel_saving(copy_bytes: u64, kernel_pages: u64) -> u64 {
    (kernel_pages * crate::dedup::PAGE_SIZE as u64).saturating_sub(copy_bytes)
}

/// What sharing images saves while `image_pages` guest pages map them: those pages less the
/// images' page cache (measured only when some page maps an image).
fn image_saving(config: &DensityConfig, image_pages: u64) -> u64 {
    if image_pages == 0 {
        return 0;
    }
    (image_pages * crate::dedup::PAGE_SIZE as u64).saturating_sub(image_cache_bytes(config))
}

/// One progress line.
fn progress_line(sample: &Sample, running: usize, vms: usize, mapped_pages: u64, store_bytes: u64) {
    eprintln!(
        "density: {:6.1} s  {running}/{vms} VMs running  reported {}  merged {}  saved {:.1} MiB  store {:.1} MiB",
        sample.at.as_secs_f64(),
        sample.reported,
        mapped_pages,
        sample.saved_bytes as f64 / MIB,
        store_bytes as f64 / MIB,
    );
}

/// The end-of-run summary and the machine-readable result, as `density` prints them.
pub fn summary(report: &DensityReport, config: &DensityConfig) -> String {
    let mut out = String::new();
    let s = &report.stats;
    let mode = if config.threads { "threads" } else { "processes" };
    let _ = writeln!(
        out,
        "density: {} VMs ({mode}), dedup {:?}, ran {:.1} s",
        config.vms,
        config.template.dedup.mode,
        report.elapsed.as_secs_f64()
    );
    for (index, end) in report.ends.iter().enumerate() {
        let how = end.message.clone().unwrap_or_else(|| format!("exit status {}", end.code));
        let _ = writeln!(out, "  vm{index}: {how}");
    }
    let _ = writeln!(out, "  dedup: {s}");
    let r = report.result(config.vms);
    let _ = writeln!(
        out,
        "  fphash devices: {} batches answered, {} rejected; records refused as bad_gpa {}, bad_record {}; \
         {} records hashed by the host (HOST_HASH)",
        r.device_batches,
        r.device_rejected_batches,
        r.device_bad_gpa,
        r.device_bad_record,
        r.device_host_hashed
    );
    let _ = writeln!(
        out,
        "  guest RAM on the host at the end: {:.1} MiB private + {:.1} MiB shared store + {:.1} MiB image page \
         cache + {:.1} MiB kernel page cache{} = {:.1} MiB",
        report.guest_ram.anonymous_bytes as f64 / MIB,
        s.store_bytes_allocated as f64 / MIB,
        report.image_cache_bytes as f64 / MIB,
        report.kernel_cache_bytes() as f64 / MIB,
        match config.restore {
            Some(_) => format!(" + {:.1} MiB snapshot page cache", report.snapshot_cache_bytes as f64 / MIB),
            None => String::new(),
        },
        (report.guest_ram.anonymous_bytes
            + s.store_bytes_allocated
            + report.image_cache_bytes
            + report.snapshot_cache_bytes
            + report.kernel_cache_bytes()) as f64
            / MIB,
    );
    let _ = writeln!(out, "  store: {} pages verified against their hashes", report.store_pages_verified);
    for (index, disk) in report.disks.iter().enumerate() {
        let how = if disk.shared { "shared" } else { "not shared" };
        let _ = writeln!(
            out,
            "  disk{index} {} ({how}): {} pages mapped from the image, {} pages copied ({:.1} MiB)",
            crate::escape_controls(&disk.path),
            disk.mapped_pages,
            disk.copied_pages,
            disk.copied_bytes as f64 / MIB
        );
    }
    if s.image_pages > 0 {
        let _ = writeln!(
            out,
            "  shared images: {} guest pages map them ({:.1} MiB) from {:.1} MiB of page cache, saving {:.1} MiB",
            s.image_pages,
            (s.image_pages * crate::dedup::PAGE_SIZE as u64) as f64 / MIB,
            report.image_cache_bytes as f64 / MIB,
            report.image_saved_bytes() as f64 / MIB
        );
    }
    if s.image_merged > 0 {
        let _ = writeln!(
            out,
            "  image pages merged by content: {} (counted with merging), {} of them without a report (left \
             alone in a page-cache block whose other pages merged)",
            s.image_merged, s.image_stragglers_merged
        );
    }
    if s.kernel_pages > 0 || s.kernel_cow_breaks > 0 {
        let _ = writeln!(
            out,
            "  kernel held once: {} guest pages map the kernel file's text and read-only data ({:.1} MiB) \
             from one {:.1} MiB copy, saving {:.1} MiB; {} pages were written by the guests (copied), \
             {} of those merged since (counted with merging)",
            s.kernel_pages,
            (s.kernel_pages * crate::dedup::PAGE_SIZE as u64) as f64 / MIB,
            report.kernel_copy_bytes as f64 / MIB,
            report.kernel_saved_bytes() as f64 / MIB,
            s.kernel_cow_breaks,
            s.kernel_copies_merged
        );
    }
    if config.template.dedup.mode == DedupMode::Ksm {
        let _ = writeln!(out, "  KSM shared {:.1} MiB of it", report.ksm_saved_bytes as f64 / MIB);
    }
    if config.template.dedup.mode == DedupMode::Hinted || s.image_pages > 0 {
        let ninety = report.time_to(0.9).map_or("n/a".to_string(), |t| format!("{:.1} s", t.as_secs_f64()));
        let _ = writeln!(
            out,
            "  saved {:.1} MiB of host memory: merging {:.1} MiB, shared images {:.1} MiB, the kernel held \
             once {:.1} MiB (90 % of it after {ninety})",
            report.saved_bytes() as f64 / MIB,
            s.bytes_saved as f64 / MIB,
            report.image_saved_bytes() as f64 / MIB,
            report.kernel_saved_bytes() as f64 / MIB,
        );
    }
    // One machine-readable line for scripts and tests.
    match serde_json::to_string(&r) {
        Ok(json) => {
            let _ = writeln!(out, "density-result: {json}");
        }
        Err(e) => log::error!("cannot encode the density result: {e}"),
    }
    out
}

#[cfg(test)]
mod tests;
