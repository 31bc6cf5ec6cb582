//! What a user asks for on the command line, parsed and checked before any KVM work starts.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::x86_64::layout::{MAX_VCPUS, MAX_VIRTIO_DEVICES};

/// Smallest guest RAM samepage accepts: enough for the low-memory boot structures and a kernel.
pub const MIN_MEM_BYTES: u64 = 16 << 20;
/// Largest guest RAM samepage accepts (1 TiB); larger requests are almost surely typos. RAM
/// past 3 GiB lies above the 1 GiB MMIO gap, so 1 TiB of RAM ends at guest-physical 1 TiB +
/// 1 GiB; `Vm::build` also checks that against the host's guest-physical address width.
pub const MAX_MEM_BYTES: u64 = 1 << 40;
/// Default guest RAM.
pub const DEFAULT_MEM_BYTES: u64 = 256 << 20;
/// Most `--disk`s: every VM also has the fphash device, and each device takes an IRQ.
pub const MAX_DISKS: usize = MAX_VIRTIO_DEVICES - 1;
/// Shortest interval of `--progress-every` and `--dedup-scan-every`: a scan reads the page
/// table of every merged page, which must not take over the host.
pub const MIN_INTERVAL_SECS: f64 = 0.01;
/// Longest such interval (an hour); longer ones are surely typos.
pub const MAX_INTERVAL_SECS: f64 = 3600.0;
/// Longest `--timeout` (365 days, in seconds). Longer ones are surely typos, and the VMM adds
/// the timeout to the clock for its deadline, which must not overflow; a VM without
/// `--timeout` runs until it stops.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// Errors in user-supplied configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--balloon-socket` for a VM without a balloon.
    #[error("--balloon-socket needs a balloon: --balloon, or a snapshot whose VM had one")]
    BalloonSocketWithoutBalloon,
    /// A memory size that is not `<number>[K|M|G]`.
    #[error("invalid memory size '{0}': expected e.g. 256M, 2G or 1T")]
    MemSyntax(String),
    /// A memory size out of range.
    #[error("memory size {0} bytes out of range: need 16 MiB to 1 TiB")]
    MemRange(u64),
    /// A memory size that is not a whole number of 4 KiB pages.
    #[error("memory size {0} bytes is not a multiple of 4 KiB")]
    MemAlignment(u64),
    /// vCPU count out of range.
    #[error("vCPU count {0} out of range: need 1 to {max}", max = MAX_VCPUS)]
    Vcpus(u8),
    /// A disk option with an unknown flag.
    #[error("invalid disk '{0}': expected PATH[,ro][,share=on|off] (sharing needs ,ro)")]
    Disk(String),
    /// `density` with `--snapshot-to` and more than one VM.
    #[error("density --snapshot-to takes one VM (--vms 1): several would replace each other's snapshot")]
    DensitySnapshot,
    /// `density --restore` with `--threads` or `--vm-cmdline`.
    #[error("density --restore runs each clone as its own process, with the snapshot's command line: not with --threads or --vm-cmdline")]
    DensityRestore,
    /// A per-VM option for a VM that does not exist.
    #[error("VM index {index} out of range: there are {vms} VMs")]
    VmIndex {
        /// The index given.
        index: usize,
        /// How many VMs there are.
        vms: usize,
    },
    /// A `--vm-cmdline` that is not INDEX:TEXT.
    #[error("invalid per-VM command line '{0}': expected INDEX:TEXT, e.g. 1:quiet")]
    VmCmdline(String),
    /// A serial option that is not stdout, none or file:PATH.
    #[error("invalid serial '{0}': expected stdout, none or file:PATH")]
    Serial(String),
    /// More disks than there are IRQs for.
    #[error("too many disks: {0} (at most {MAX_DISKS})")]
    TooManyDisks(usize),
    /// More disks and network devices than there are IRQs for.
    #[error("too many disks and network devices: {0} (at most {MAX_DISKS} together, less one for each balloon, entropy or vsock device)")]
    TooManyDevices(usize),
    /// One image given twice where one of them is writable: the second open would find the
    /// image locked by the first.
    #[error("disk {} given twice (a writable disk needs its image alone)", .0.display())]
    DiskTwice(PathBuf),
    /// A progress interval that is not a number of seconds in range (also inf and NaN).
    #[error("invalid interval '{0}': need {MIN_INTERVAL_SECS} to {MAX_INTERVAL_SECS} seconds")]
    Interval(String),
    /// A timeout that is not a whole number of seconds in range.
    #[error("invalid timeout '{0}': need a whole number of seconds, 0 to {MAX_TIMEOUT_SECS} (365 days)")]
    Timeout(String),
    /// A `--balloon` value or a balloon target that cannot be taken.
    #[error(transparent)]
    Balloon(#[from] crate::balloon_options::BalloonOptionsError),
    /// A `--vsock` value that is not `[cid=N,]uds=PATH`.
    #[error("invalid vsock '{0}': expected [cid=N,]uds=PATH (the path last)")]
    Vsock(String),
    /// A `--net` value that is not `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`.
    #[error("invalid net '{0}': expected tap=NAME[,mac=aa:bb:cc:dd:ee:ff] or fd=N[,mac=...] (a unicast MAC, a name of 1-15 bytes)")]
    Net(String),
    /// Two network devices on one tap, or with one MAC address.
    #[error("two network devices share {0}")]
    NetTwice(String),
    /// A guest CID out of range.
    #[error("vsock guest CID {0} out of range: need 3 to 4294967294")]
    VsockCid(u64),
    /// A balloon control socket shared by several VMs of a density run.
    #[error("balloon socket {} would serve every VM: put {{vm}} in its path for each VM's own", .0.display())]
    BalloonSocketShared(PathBuf),
}

/// Parses a memory size: a number of bytes with an optional K, M, G or T suffix (powers of 1024).
/// A bare number is taken as MiB, as QEMU and Firecracker users expect.
pub fn parse_mem_size(text: &str) -> Result<u64, ConfigError> {
    let syntax = || ConfigError::MemSyntax(text.to_string());
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'k' | 'K')) => (&trimmed[..i], 10),
        Some((i, 'm' | 'M')) => (&trimmed[..i], 20),
        Some((i, 'g' | 'G')) => (&trimmed[..i], 30),
        Some((i, 't' | 'T')) => (&trimmed[..i], 40),
        Some(_) => (trimmed, 20),
        None => return Err(syntax()),
    };
    let value: u64 = digits.parse().map_err(|_| syntax())?;
    let bytes = value.checked_shl(shift).filter(|b| b >> shift == value).ok_or_else(syntax)?;
    if !(MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&bytes) {
        return Err(ConfigError::MemRange(bytes));
    }
    if bytes % 4096 != 0 {
        return Err(ConfigError::MemAlignment(bytes));
    }
    Ok(bytes)
}

/// A size as a message shows it: whole MiB when it is some, else KiB (guest RAM is whole
/// 4 KiB pages).
pub fn size_text(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// Parses an interval in seconds (fractions allowed): `--progress-every`,
/// `--dedup-scan-every`.
pub fn parse_interval(text: &str) -> Result<Duration, ConfigError> {
    let secs: f64 = text.trim().parse().map_err(|_| ConfigError::Interval(text.to_string()))?;
    // NaN is in no range, so it fails here too.
    if !(MIN_INTERVAL_SECS..=MAX_INTERVAL_SECS).contains(&secs) {
        return Err(ConfigError::Interval(text.to_string()));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a `--timeout` in whole seconds, 0 to [`MAX_TIMEOUT_SECS`].
pub fn parse_timeout(text: &str) -> Result<Duration, ConfigError> {
    match text.trim().parse::<u64>() {
        Ok(secs) if secs <= MAX_TIMEOUT_SECS => Ok(Duration::from_secs(secs)),
        _ => Err(ConfigError::Timeout(text.to_string())),
    }
}

/// Parses a `--vm-cmdline INDEX:TEXT`.
pub fn parse_vm_cmdline(text: &str) -> Result<(usize, String), ConfigError> {
    let (index, extra) = text.split_once(':').ok_or_else(|| ConfigError::VmCmdline(text.to_string()))?;
    let index = index.trim().parse().map_err(|_| ConfigError::VmCmdline(text.to_string()))?;
    Ok((index, extra.to_string()))
}

/// One `--disk PATH[,ro][,share=on|off]` (the path cannot hold a comma).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Opened read-only: the guest sees VIRTIO_BLK_F_RO and writes fail.
    pub read_only: bool,
    /// Map the image's pages into guest RAM instead of copying them, where a read allows it
    /// (`docs/fphash.md`, "Read-only images"); `None`: on for read-only disks.
    pub share: Option<bool>,
}

impl DiskConfig {
    /// A disk with the default sharing.
    pub fn new(path: impl Into<PathBuf>, read_only: bool) -> DiskConfig {
        DiskConfig { path: path.into(), read_only, share: None }
    }

    /// Whether the image's pages are shared with the guest.
    pub fn shares(&self) -> bool {
        self.read_only && self.share.unwrap_or(true)
    }

    /// The `--disk` argument that gives this disk.
    pub fn to_arg(&self) -> std::ffi::OsString {
        let mut arg = self.path.clone().into_os_string();
        if self.read_only {
            arg.push(",ro");
        }
        match self.share {
            Some(true) => arg.push(",share=on"),
            Some(false) => arg.push(",share=off"),
            None => {}
        }
        arg
    }
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Disk(text.to_string());
        let mut parts = text.split(',');
        let path = parts.next().unwrap_or_default();
        let (mut read_only, mut share) = (None, None);
        for option in parts {
            match option {
                "ro" | "rw" if read_only.is_none() => read_only = Some(option == "ro"),
                "share=on" | "share=off" if share.is_none() => share = Some(option == "share=on"),
                _ => return Err(bad()),
            }
        }
        let read_only = read_only.unwrap_or(false);
        if path.is_empty() || (share == Some(true) && !read_only) {
            return Err(bad());
        }
        Ok(DiskConfig { path: PathBuf::from(path), read_only, share })
    }
}

/// `--vsock uds=PATH[,cid=N]`: a virtio-vsock device whose host side is Firecracker's (a host
/// process connects to PATH and writes `CONNECT <port>`; the guest's connections to host port
/// P go to `PATH_P`), the guest at context ID N (default [`DEFAULT_GUEST_CID`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID, 3 to 2^32 - 2.
    pub guest_cid: u64,
    /// The host clients' socket, and the prefix of the guest's host listeners.
    pub uds_path: PathBuf,
}

/// The guest CID when `--vsock` gives none (the first a guest may have; Firecracker's
/// examples and Kata use 3 as well).
pub const DEFAULT_GUEST_CID: u64 = samepage_virtio::vsock::wire::MIN_GUEST_CID;

impl VsockConfig {
    /// A device at `guest_cid` serving `uds_path`; the CID is checked.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<VsockConfig, ConfigError> {
        use samepage_virtio::vsock::wire::{MAX_GUEST_CID, MIN_GUEST_CID};
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(ConfigError::VsockCid(guest_cid));
        }
        if uds_path.as_os_str().is_empty() {
            return Err(ConfigError::Vsock(String::new()));
        }
        Ok(VsockConfig { guest_cid, uds_path })
    }

    /// The `--vsock` argument that gives this device.
    pub fn to_arg(&self) -> std::ffi::OsString {
        let mut arg = std::ffi::OsString::from(format!("cid={},uds=", self.guest_cid));
        arg.push(&self.uds_path);
        arg
    }
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Vsock(text.to_string());
        let (mut cid, mut uds) = (None, None);
        // The path comes last and may hold commas: everything after `uds=` is the path.
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(path) = rest.strip_prefix("uds=") {
                if uds.is_some() {
                    return Err(bad());
                }
                uds = Some(PathBuf::from(path));
                break;
            }
            let (option, tail) = rest.split_once(',').unwrap_or((rest, ""));
            match option.strip_prefix("cid=") {
                Some(n) if cid.is_none() => cid = Some(n.parse::<u64>().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
            rest = tail;
        }
        let uds = uds.ok_or_else(bad)?;
        VsockConfig::new(cid.unwrap_or(DEFAULT_GUEST_CID), uds)
    }
}

/// Where a network device's frames go: a tap interface by name, or a tap descriptor passed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// `tap=NAME`: attach to (or make) the tap of this name.
    Name(String),
    /// `fd=N`: a tap descriptor the process was started with.
    Fd(i32),
}

/// `--net tap=NAME[,mac=MAC]` or `--net fd=N[,mac=MAC]`: a virtio-net device on a tap
/// (docs/net.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap.
    pub tap: TapSource,
    /// The guest's MAC address; `None`: one derived from the tap's name.
    pub mac: Option<[u8; 6]>,
}

/// Parses a MAC address, `aa:bb:cc:dd:ee:ff` (hex, either case): unicast only.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl NetConfig {
    /// The `--net` argument that gives this device.
    pub fn to_arg(&self) -> String {
        let tap = match &self.tap {
            TapSource::Name(name) => format!("tap={name}"),
            TapSource::Fd(fd) => format!("fd={fd}"),
        };
        match &self.mac {
            Some(mac) => format!("{tap},mac={}", mac_text(mac)),
            None => tap,
        }
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Net(text.to_string());
        let (mut tap, mut mac) = (None, None);
        for option in text.split(',') {
            match option.split_once('=') {
                Some(("tap", name)) if tap.is_none() => {
                    crate::tap::check_name(name).map_err(|_| bad())?;
                    tap = Some(TapSource::Name(name.to_string()));
                }
                Some(("fd", n)) if tap.is_none() => {
                    let fd: i32 = n.parse().map_err(|_| bad())?;
                    // 0-2 are standard input, output and error, never a tap.
                    if fd < 3 {
                        return Err(bad());
                    }
                    tap = Some(TapSource::Fd(fd));
                }
                Some(("mac", m)) if mac.is_none() => mac = Some(parse_mac(m).ok_or_else(bad)?),
                _ => return Err(bad()),
            }
        }
        Ok(NetConfig { tap: tap.ok_or_else(bad)?, mac })
    }
}

/// Where the guest's COM1 output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's standard output; input from standard input.
    Stdout,
    /// Appended to a file; no input.
    File(PathBuf),
    /// Discarded.
    None,
}

impl SerialConfig {
    /// The `--serial` argument that gives this console.
    pub fn to_arg(&self) -> std::ffi::OsString {
        match self {
            SerialConfig::Stdout => "stdout".into(),
            SerialConfig::None => "none".into(),
            SerialConfig::File(path) => {
                let mut arg = std::ffi::OsString::from("file:");
                arg.push(path);
                arg
            }
        }
    }
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "stdout" => Ok(SerialConfig::Stdout),
            "none" => Ok(SerialConfig::None),
            _ => match text.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
                _ => Err(ConfigError::Serial(text.to_string())),
            },
        }
    }
}

/// Whether to add the kernel command-line workarounds for hosts whose KVM emulates guest
/// kernel code (see docs/guest-interface.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmulatedCpl0 {
    /// Add them when the host's KVM is the emulating kind (`/sys/module/kvm_pvm` exists).
    Auto,
    /// Always add them.
    On,
    /// Never add them.
    Off,
}

/// How a VM's pages are merged with other VMs' (docs/fphash.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// The guest reports file pages through fphash; the host verifies and merges them.
    Hinted,
    /// Linux KSM scans guest RAM (`madvise(MADV_MERGEABLE)`); fphash reports are answered OFF.
    Ksm,
    /// No merging; fphash reports are answered OFF.
    Off,
}

/// How often, by default, each VM's event loop looks for merged pages that were copied on
/// write and frees the store pages nobody maps any more (`--dedup-scan-every`).
pub const DEDUP_SCAN_EVERY: Duration = Duration::from_secs(1);

/// A broker that merges pages with the VMs of other processes (`docs/dedupd.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Its socket (`--dedup-socket`).
    pub socket: PathBuf,
    /// The domain to join (`--dedup-domain`); `None`: the user's own.
    pub domain: Option<String>,
}

/// How a VM's pages are merged, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupConfig {
    /// Hinted, KSM or none (`--dedup`).
    pub mode: DedupMode,
    /// How often the VM's merged pages are checked for copy-on-write breaks (and store pages
    /// nobody maps any more are freed) (`--dedup-scan-every`).
    pub scan_every: Duration,
    /// Merge through this broker instead of within this process; `None`: a domain of this
    /// process.
    pub broker: Option<BrokerConfig>,
}

impl Default for DedupConfig {
    /// Hinted merging within the process, scanned every [`DEDUP_SCAN_EVERY`].
    fn default() -> Self {
        DedupConfig { mode: DedupMode::Hinted, scan_every: DEDUP_SCAN_EVERY, broker: None }
    }
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended after samepage's own parameters.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// virtio-blk disks, in order.
    pub disks: Vec<DiskConfig>,
    /// COM1 output.
    pub serial: SerialConfig,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
    /// Emulating-KVM workarounds on the command line.
    pub emulated_cpl0: EmulatedCpl0,
    /// Page merging.
    pub dedup: DedupConfig,
    /// A virtio-balloon device, as `--balloon` asks for it; `None`: no balloon.
    pub balloon: Option<crate::balloon_options::BalloonOptions>,
    /// Serve the balloon's control socket here (`--balloon-socket`; needs `balloon`).
    pub balloon_socket: Option<PathBuf>,
    /// Take a snapshot when the console shows a marker (`--snapshot-at`, `--snapshot-to`).
    pub snapshot: Option<SnapshotRequest>,
    /// A virtio entropy device (`--entropy`).
    pub entropy: bool,
    /// A virtio-vsock device (`--vsock`).
    pub vsock: Option<VsockConfig>,
    /// virtio-net devices (`--net`), in order.
    pub nets: Vec<NetConfig>,
}

/// `--snapshot-to DIR --snapshot-at MARKER`: snapshot the VM into DIR the first time its
/// console prints MARKER (docs/snapshot.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The snapshot directory (made if missing; a snapshot in it is replaced).
    pub dir: PathBuf,
    /// The console text that triggers it.
    pub at: String,
}

impl VmConfig {
    /// Checks values that clap cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.balloon_socket.is_some() && self.balloon.is_none() {
            return Err(ConfigError::BalloonSocketWithoutBalloon);
        }
        // The balloon takes a device slot of its own.
        let max_disks = MAX_DISKS
            - usize::from(self.balloon.is_some())
            - usize::from(self.entropy)
            - usize::from(self.vsock.is_some());
        if self.disks.len() > max_disks {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        if self.disks.len() + self.nets.len() > max_disks {
            return Err(ConfigError::TooManyDevices(self.disks.len() + self.nets.len()));
        }
        for (i, net) in self.nets.iter().enumerate() {
            let earlier = &self.nets[..i];
            if earlier.iter().any(|e| e.tap == net.tap) {
                return Err(ConfigError::NetTwice(net.to_arg()));
            }
            if let Some(mac) = net.mac.filter(|m| earlier.iter().any(|e| e.mac == Some(*m))) {
                return Err(ConfigError::NetTwice(mac_text(&mac)));
            }
        }
        self.check_disks_given_once()
    }

    /// A writable disk's image may appear only once, however its path is spelled. Images that
    /// cannot be looked at are compared by path (opening them fails later with the reason).
    fn check_disks_given_once(&self) -> Result<(), ConfigError> {
        let identity = |disk: &DiskConfig| match std::fs::metadata(&disk.path) {
            Ok(meta) => DiskIdentity::File(meta.dev(), meta.ino()),
            Err(_) => DiskIdentity::Path(disk.path.clone()),
        };
        let identities: Vec<DiskIdentity> = self.disks.iter().map(identity).collect();
        for (later, disk) in self.disks.iter().enumerate().skip(1) {
            let clash = (0..later).find(|&earlier| identities[earlier] == identities[later]);
            if clash.is_some_and(|earlier| !self.disks[earlier].read_only || !disk.read_only) {
                return Err(ConfigError::DiskTwice(disk.path.clone()));
            }
        }
        Ok(())
    }
}

/// What makes two disk paths the same image.
#[derive(PartialEq, Eq)]
enum DiskIdentity {
    /// Device and inode of an existing file.
    File(u64, u64),
    /// The path as given, for files that cannot be looked at.
    Path(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes_parse_with_suffixes() {
        assert_eq!(parse_mem_size("256M"), Ok(256 << 20));
        assert_eq!(parse_mem_size("2G"), Ok(2 << 30));
        assert_eq!(parse_mem_size("65536k"), Ok(64 << 20));
        assert_eq!(parse_mem_size("512"), Ok(512 << 20));
        assert_eq!(parse_mem_size("1T"), Ok(MAX_MEM_BYTES));
        assert_eq!(parse_mem_size("1024G"), Ok(MAX_MEM_BYTES));
    }

    #[test]
    fn bad_mem_sizes_are_rejected() {
        assert!(matches!(parse_mem_size("lots"), Err(ConfigError::MemSyntax(_))));
        assert!(matches!(parse_mem_size(""), Err(ConfigError::MemSyntax(_))));
        assert!(matches!(parse_mem_size("-1M"), Err(ConfigError::MemSyntax(_))));
        assert!(matches!(parse_mem_size("1M"), Err(ConfigError::MemRange(_))));
        assert!(matches!(parse_mem_size("99999999999G"), Err(ConfigError::MemSyntax(_))));
        assert!(matches!(parse_mem_size("2T"), Err(ConfigError::MemRange(_))));
        assert!(matches!(parse_mem_size("1025G"), Err(ConfigError::MemRange(_))));
        assert!(matches!(parse_mem_size("99999999T"), Err(ConfigError::MemSyntax(_))));
        assert!(matches!(parse_mem_size("16385K"), Err(ConfigError::MemAlignment(_))));
    }

    #[test]
    fn disks_take_ro_and_share_after_the_path() {
        let d: DiskConfig = "b.img,ro,share=off".parse().unwrap();
        assert_eq!((d.path, d.read_only, d.share), (PathBuf::from("b.img"), true, Some(false)));
        let d: DiskConfig = "base.img,ro".parse().unwrap();
        assert!(d.shares(), "read-only disks share by default");
        assert_eq!(d.to_arg(), "base.img,ro");
        assert!(!"rw.img".parse::<DiskConfig>().unwrap().shares());
        for bad in ["x.img,share=on", "x.img,ro,ro", ",ro", "x.img,share=maybe,ro", "x.img,sideways"] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn intervals_in_range_only() {
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("3600"), Ok(Duration::from_secs(3600)));
        for bad in ["inf", "-inf", "NaN", "1e300", "-1", "0", "0.001", "3600.5", "", "soon"] {
            assert!(parse_interval(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timeouts_in_range_only() {
        assert_eq!(parse_timeout("0"), Ok(Duration::ZERO));
        assert_eq!(parse_timeout("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_timeout("31536000"), Ok(Duration::from_secs(MAX_TIMEOUT_SECS)));
        for bad in
            ["31536001", "18446744073709551615", "18446744073709551616", "-1", "1.5", "1e3", "", "soon"]
        {
            assert_eq!(parse_timeout(bad), Err(ConfigError::Timeout(bad.to_string())), "{bad:?} accepted");
        }
    }

    fn config_with_disks(disks: &[&str]) -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            mem_bytes: DEFAULT_MEM_BYTES,
            vcpus: 1,
            disks: disks.iter().map(|d| d.parse().expect("disk")).collect(),
            serial: SerialConfig::None,
            timeout: None,
            emulated_cpl0: EmulatedCpl0::Off,
            dedup: DedupConfig { mode: DedupMode::Off, ..DedupConfig::default() },
            balloon: None,
            balloon_socket: None,
            snapshot: None,
            entropy: false,
            vsock: None,
            nets: Vec::new(),
        }
    }

    #[test]
    fn net_options_name_a_tap_or_a_descriptor_and_maybe_a_unicast_mac() {
        let n: NetConfig = "tap=tap0".parse().expect("tap alone");
        assert_eq!(n, NetConfig { tap: TapSource::Name("tap0".into()), mac: None });
        let n: NetConfig = "tap=sp-tap0,mac=06:00:AC:10:00:02".parse().expect("with a mac");
        assert_eq!(n.mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(n.to_arg(), "tap=sp-tap0,mac=06:00:ac:10:00:02");
        assert_eq!(n.to_arg().parse::<NetConfig>(), Ok(n));
        assert_eq!("fd=3".parse::<NetConfig>().map(|n| n.tap), Ok(TapSource::Fd(3)));
        for bad in [
            "",
            "tap=",
            "tap=sixteen-bytes-xx",
            "tap=a/b",
            "fd=2",
            "fd=-1",
            "fd=x",
            "tap=a,fd=3",
            "tap=a,tap=b",
            "tap=a,mac=01:00:00:00:00:01",
            "tap=a,mac=06:00:00:00:00",
            "tap=a,mac=06:00:00:00:00:00:00",
            "tap=a,mac=0g:00:00:00:00:00",
            "tap=a,mtu=9000",
            "mac=06:00:00:00:00:01",
        ] {
            assert_eq!(bad.parse::<NetConfig>(), Err(ConfigError::Net(bad.to_string())), "{bad:?}");
        }
        let mut config = config_with_disks(&[]);
        config.nets = vec!["tap=a".parse().expect("a"), "tap=a".parse().expect("a")];
        assert!(matches!(config.validate(), Err(ConfigError::NetTwice(_))));
        config.nets = vec![
            "tap=a,mac=06:00:00:00:00:01".parse().expect("a"),
            "tap=b,mac=06:00:00:00:00:01".parse().expect("b"),
        ];
        assert!(matches!(config.validate(), Err(ConfigError::NetTwice(_))));
        config.nets = (0..MAX_DISKS + 1).map(|i| format!("tap=t{i}").parse().expect("tap")).collect();
        assert!(matches!(config.validate(), Err(ConfigError::TooManyDevices(_))));
    }

    #[test]
    fn vsock_options_are_a_cid_in_range_and_a_path_that_may_hold_commas() {
        let v: VsockConfig = "uds=/run/v.sock".parse().expect("uds alone");
        assert_eq!(v, VsockConfig { guest_cid: 3, uds_path: "/run/v.sock".into() });
        let v: VsockConfig = "cid=52,uds=/tmp/a,b.sock".parse().expect("cid and a comma in the path");
        assert_eq!((v.guest_cid, v.uds_path.clone()), (52, PathBuf::from("/tmp/a,b.sock")));
        assert_eq!(v.to_arg(), "cid=52,uds=/tmp/a,b.sock");
        assert_eq!(v.to_arg().to_str().expect("utf-8").parse::<VsockConfig>(), Ok(v));
        for (bad, error) in [
            ("cid=2,uds=/v", ConfigError::VsockCid(2)),
            ("cid=4294967295,uds=/v", ConfigError::VsockCid(u32::MAX as u64)),
            ("cid=18446744073709551616,uds=/v", ConfigError::Vsock("cid=18446744073709551616,uds=/v".into())),
            ("cid=3", ConfigError::Vsock("cid=3".into())),
            ("uds=", ConfigError::Vsock(String::new())),
            ("cid=3,cid=4,uds=/v", ConfigError::Vsock("cid=3,cid=4,uds=/v".into())),
            ("port=3,uds=/v", ConfigError::Vsock("port=3,uds=/v".into())),
            ("", ConfigError::Vsock(String::new())),
        ] {
            assert_eq!(bad.parse::<VsockConfig>(), Err(error), "{bad:?}");
        }
    }

    #[test]
    fn writable_disks_appear_once_and_disks_are_counted() {
        assert!(config_with_disks(&["/a.img,ro", "/a.img,ro", "/b.img"]).validate().is_ok());
        for twice in [
            &["/a.img", "/a.img"][..],
            &["/a.img,ro", "/b.img", "/a.img"],
            &["/dev/null", "/dev/../dev/null,ro"],
        ] {
            let err = config_with_disks(twice).validate().expect_err("given twice");
            assert!(matches!(err, ConfigError::DiskTwice(_)), "{twice:?}: {err}");
        }
        let many = vec!["/a.img,ro"; MAX_DISKS + 1];
        assert_eq!(config_with_disks(&many).validate(), Err(ConfigError::TooManyDisks(MAX_DISKS + 1)));
        assert!(config_with_disks(&many[1..]).validate().is_ok());
        let mut ballooned = config_with_disks(&many[1..]);
        ballooned.balloon = Some(crate::balloon_options::BalloonOptions::default());
        assert_eq!(
            ballooned.validate(),
            Err(ConfigError::TooManyDisks(MAX_DISKS)),
            "the balloon takes a slot"
        );
        assert!(config_with_disks(&many[2..]).validate().is_ok());
    }

    #[test]
    fn disks_and_serial_parse() {
        let ro: DiskConfig = "a.img,ro".parse().expect("ro disk");
        assert!(ro.read_only);
        let rw: DiskConfig = "b.img,rw".parse().expect("rw disk");
        assert!(!rw.read_only);
        assert!("b.img,bogus".parse::<DiskConfig>().is_err());
        assert!(!"b.img".parse::<DiskConfig>().expect("plain").read_only);
        assert!(",ro".parse::<DiskConfig>().is_err());
        assert_eq!("none".parse::<SerialConfig>(), Ok(SerialConfig::None));
        assert_eq!("file:/tmp/x".parse::<SerialConfig>(), Ok(SerialConfig::File("/tmp/x".into())));
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }
}
