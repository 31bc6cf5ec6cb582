//! `samepage density --threads`: every VM in this process, sharing one in-process dedup
//! domain.

use std::io::Write;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::DensityError;
use super::{config_for, progress_line, DensityConfig, DensityReport, KsmMeter, Sample, VmEnd};
use crate::bus::lock;
use crate::config::DedupMode;
use crate::dedup::{Domain, Limits};
use crate::error::VmmError;
use crate::merge_cpu;
use crate::metrics::DiskCounters;
use crate::residency::resident_in;
use crate::stop::VmExit;
use crate::vmm::{StoppedVm, Vm, VmContext};
use samepage_virtio::fphash::FphashStats;

fn console_for(config: &DensityConfig, index: usize) -> Result<Box<dyn Write + Send>, DensityError> {
    Ok(match &config.console_dir {
        Some(dir) => {
            let path = dir.join(format!("vm{index}.log"));
            Box::new(
                crate::checked_open::create_output(&path)
                    .map_err(|source| DensityError::Console { path, source })?,
            )
        }
        None => Box::new(std::io::sink()),
    })
}

/// Builds and runs the VMs in this process; returns once all have stopped.
pub fn run(config: &DensityConfig) -> Result<DensityReport, DensityError> {
    let domain = Arc::new(Mutex::new(Domain::new("density", Limits::default())?));
    let vms = build_vms(config, &domain)?;
    let device_stats: Vec<Arc<FphashStats>> = vms.iter().map(Vm::fphash_stats).collect();
    let disk_counters: Vec<Vec<DiskCounters>> = vms.iter().map(Vm::disk_counters).collect();
    let ksm = (config.template.dedup.mode == DedupMode::Ksm).then(KsmMeter::start);
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
                .map_err(DensityError::host("VM thread"))
        })
        .collect::<Result<_, _>>()?;
    drop(ended_tx);
    // This thread starts nothing more: from here it samples, settles and reports under the
    // filter of threads that run VMs (a failure ends the process, and with it the VMs).
    let kernel_copy_bytes = super::kernel_copy_bytes(config);
    crate::seccomp::install(crate::seccomp::ThreadKind::Vmm)?;
    let saved_now = |domain: &Domain| {
        let stats = domain.stats();
        let merged = ksm.as_ref().map_or(stats.bytes_saved, KsmMeter::saved_bytes);
        merged
            + super::image_saving(config, stats.image_pages)
            + super::kernel_saving(kernel_copy_bytes, stats.kernel_pages)
    };
    let mut samples =
        sample_until_stopped(config, &domain, threads.len(), &ended, &saved_now, &reported_now, started);
    let elapsed = started.elapsed();

    let mut ends = Vec::new();
    let mut stopped = Vec::new();
    for (index, thread) in threads.into_iter().enumerate() {
        let (exit, vm) = thread.join().map_err(|_| DensityError::VmThreadPanicked(index))??;
        ends.push(VmEnd { code: exit.exit_code(), message: exit.message() });
        stopped.push(vm);
    }
    // Every copy-on-write break by now is found (two looks) before the figures are taken.
    let (stats, vmas_counted) = {
        let mut domain = lock(&domain);
        if let Err(e) = domain.settle() {
            log::warn!("dedup refresh failed: {e}");
        }
        let counted = domain.stats().vmas;
        domain.reconcile_vmas();
        (domain.stats(), counted)
    };
    let process_vmas = crate::dedup::process_vmas()? as u64;
    let ksm_saved_bytes = ksm.as_ref().map_or(0, KsmMeter::saved_bytes);
    samples.push(Sample { at: elapsed, saved_bytes: saved_now(&lock(&domain)), reported: reported_now() });
    let ranges: Vec<(usize, usize)> = stopped
        .iter()
        .flat_map(|vm| vm.mem.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)))
        .collect();
    let guest_ram = resident_in(&ranges).map_err(DensityError::host("/proc/self/smaps reading"))?;
    let store_pages_verified = lock(&domain).verify_store()?;
    drop(stopped);
    let devices = device_stats.iter().map(|d| d.snapshot()).collect();
    let disks: Vec<Vec<_>> =
        disk_counters.iter().map(|vm| vm.iter().map(DiskCounters::metrics).collect()).collect();
    Ok(DensityReport {
        ends,
        stats,
        vmas_counted,
        process_vmas,
        guest_ram,
        store_pages_verified,
        devices,
        samples,
        ksm_saved_bytes,
        image_cache_bytes: super::image_cache_bytes(config),
        snapshot_cache_bytes: super::snapshot_cache_bytes(config),
        kernel_copy_bytes,
        merge_cpu: merge_cpu::total(),
        refresh_cpu: merge_cpu::refresh_total(),
        broker_cpu: std::time::Duration::ZERO,
        broker_rss_bytes: 0,
        elapsed,
        disks: super::disk_figures(config, &disks),
    })
}

/// Builds every VM of the run in the shared domain.
fn build_vms(config: &DensityConfig, domain: &Arc<Mutex<Domain>>) -> Result<Vec<Vm>, DensityError> {
    let mut vms = Vec::with_capacity(config.vms);
    for index in 0..config.vms {
        let vm_config = config_for(config, index);
        let context = VmContext {
            label: format!("vm{index}"),
            console: Some(console_for(config, index)?),
            domain: Some(domain.clone()),
            ..VmContext::default()
        };
        vms.push(Vm::build_in(&vm_config, context)?);
    }
    Ok(vms)
}

/// Prints a progress line every `progress_every` until all `vms` VM threads have ended (each
/// sends on `ended`); returns the samples. The VMs' own event loops find copy-on-write breaks;
/// this only reads the figures.
fn sample_until_stopped(
    config: &DensityConfig,
    domain: &Mutex<Domain>,
    vms: usize,
    ended: &Receiver<()>,
    saved_now: &dyn Fn(&Domain) -> u64,
    reported_now: &dyn Fn() -> u64,
    started: Instant,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut running = vms;
    loop {
        let (saved_bytes, stats) = {
            let domain = lock(domain);
            (saved_now(&domain), domain.stats())
        };
        let sample = Sample { at: started.elapsed(), saved_bytes, reported: reported_now() };
        samples.push(sample);
        progress_line(&sample, running, vms, stats.mapped_pages, stats.store_bytes_allocated);
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
