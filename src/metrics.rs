//! `--metrics FILE`: a VM's counters as one JSON object, rewritten (atomically: a temporary
//! file renamed over it) every second while the VM runs and once when it has stopped. Scripts
//! and `samepage density` read this instead of parsing text.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use samepage_virtio::block::{BlockStats, BlockStatsSnapshot};
use samepage_virtio::fphash::FphashStatsSnapshot;
use samepage_virtio::PAGE_SIZE;

use crate::dedup::DedupStats;
use crate::residency::Resident;
use crate::stop::VmExit;

/// How often the file is rewritten while the VM runs.
pub const METRICS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What `--metrics` writes.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmMetrics {
    /// The VM's name (`--name`).
    pub vm: String,
    /// The VMM's process id.
    pub pid: u32,
    /// Whether the VM still runs (false in the last write).
    pub running: bool,
    /// Since the VM started.
    pub elapsed_ms: u64,
    /// The exit code samepage exits with, once stopped.
    pub exit_code: Option<u8>,
    /// Why it stopped, once stopped (`None` for an ordinary stop).
    pub exit_reason: Option<String>,
    /// The fphash device's counters.
    pub fphash: FphashStatsSnapshot,
    /// The dedup domain's counters and figures (for a broker's domain: this VMM's view).
    pub dedup: DedupStats,
    /// Host memory of the guest's RAM: measured in the last write only (it reads smaps).
    pub guest_ram: Option<Resident>,
    /// The merge engine's own VMA count, before the last write set it from the kernel's.
    pub vmas_counted: u64,
    /// VMAs of the whole process (last write only).
    pub process_vmas: u64,
    /// CPU time this process spent merging.
    pub merge_cpu_us: u64,
    /// The part of `merge_cpu_us` its periodic refreshes spent.
    #[serde(default)]
    pub refresh_cpu_us: u64,
    /// How long pausing the vCPUs for merge batches took.
    pub pause: crate::pause::PauseStats,
    /// The broker's domain joined, when merging through a broker and connected.
    pub broker_domain: Option<String>,
    /// Each disk's figures, in `--disk` order.
    #[serde(default)]
    pub disks: Vec<DiskMetrics>,
    /// The balloon's figures (target, the guest's statistics, pages given back), when the VM
    /// has one (`--balloon`).
    #[serde(default)]
    pub balloon: Option<crate::balloon::BalloonMetrics>,
    /// The entropy device's counters (requests, bytes, refusals), when the VM has one
    /// (`--entropy`).
    #[serde(default)]
    pub entropy: Option<samepage_virtio::entropy::EntropyStatsSnapshot>,
    /// The vsock device's counters (connections, bytes each way, refusals), when the VM has
    /// one (`--vsock`).
    #[serde(default)]
    pub vsock: Option<samepage_virtio::vsock::VsockStatsSnapshot>,
    /// Each network device's counters (frames and bytes each way, drops, refusals), in
    /// `--net` order.
    #[serde(default)]
    pub nets: Vec<samepage_virtio::net::NetStatsSnapshot>,
}

/// One disk's figures: what its guest read and how (pages mapped from a shared image, bytes
/// copied).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskMetrics {
    /// The image, as given.
    pub path: String,
    /// Opened read-only.
    pub read_only: bool,
    /// Its image is shared: reads of whole 4 KiB-aligned pages map the image's pages.
    pub shared: bool,
    /// `copied_bytes` in 4 KiB pages (rounded up), to set against `shared_pages`.
    pub copied_pages: u64,
    /// The virtio-blk device's counters: `shared_pages` (pages mapped from the image),
    /// `copied_bytes`, `reads`, `bytes_read` and the rest.
    #[serde(flatten)]
    pub device: BlockStatsSnapshot,
}

/// A disk of a running VM, whose counters its metrics read.
#[derive(Clone, Debug)]
pub struct DiskCounters {
    /// The image, as given.
    pub path: PathBuf,
    /// Opened read-only.
    pub read_only: bool,
    /// Its image is shared.
    pub shared: bool,
    /// The device's counters.
    pub stats: Arc<BlockStats>,
}

impl DiskCounters {
    /// The figures now.
    pub fn metrics(&self) -> DiskMetrics {
        let device = self.stats.snapshot();
        DiskMetrics {
            path: self.path.to_string_lossy().into_owned(),
            read_only: self.read_only,
            shared: self.shared,
            copied_pages: device.copied_bytes.div_ceil(PAGE_SIZE as u64),
            device,
        }
    }
}

impl VmMetrics {
    /// Fills in how the VM stopped.
    pub fn stopped(mut self, exit: &VmExit, guest_ram: Option<Resident>) -> VmMetrics {
        self.running = false;
        self.exit_code = Some(exit.exit_code());
        self.exit_reason = exit.message();
        self.guest_ram = guest_ram;
        self.process_vmas = crate::dedup::process_vmas().unwrap_or(0) as u64;
        self
    }
}

/// Why the metrics file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Creating, writing or renaming the file failed.
    #[error("cannot write {path}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The figures did not encode.
    #[error("cannot encode the metrics")]
    Encode(#[source] serde_json::Error),
}

/// Writes `metrics` to `path` atomically.
pub fn write(path: &Path, metrics: &VmMetrics) -> Result<(), MetricsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    fn io(p: &Path) -> impl FnOnce(std::io::Error) -> MetricsError + '_ {
        move |source| MetricsError::Io { path: p.to_path_buf(), source }
    }
    let json = serde_json::to_vec_pretty(metrics).map_err(MetricsError::Encode)?;
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(&json).and_then(|()| file.write_all(b"\n")).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
