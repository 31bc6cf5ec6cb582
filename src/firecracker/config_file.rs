//! Firecracker's JSON configuration file (`firecracker --config-file FILE`,
//! docs/firecracker-compat.md): the sections samepage implements, turned into `samepage run`'s
//! options; every section or field samepage does not implement is refused by name, so a
//! configuration never silently runs a different VM than it describes.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::balloon_options::BalloonOptions;
use crate::config::{parse_mem_size, DedupMode, DiskConfig, NetConfig, VsockConfig};
use crate::run_args::RunArgs;

/// Largest configuration file read (Firecracker's own limit on an API payload is 51,200 bytes;
/// a file may list more drives).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why a configuration file cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// Opening or reading the file failed, or it is no regular file.
    #[error("cannot read the configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::checked_open::HostFileError,
    },
    /// Over [`MAX_FILE_BYTES`].
    #[error("the configuration file {path} is over the 1 MiB samepage reads")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not JSON of Firecracker's shape (an unknown section or field is refused here too).
    #[error("the configuration file {path} is not a Firecracker configuration samepage reads")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why.
        #[source]
        source: serde_json::Error,
    },
    /// A section or value samepage does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// A value out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The file, as Firecracker defines it (`vmm_config` in Firecracker's source). Sections
/// samepage does not implement are read only to be refused with their name.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// The kernel, its command line and initrd.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config")]
    pub machine_config: Option<MachineConfig>,
    /// The balloon device.
    pub balloon: Option<Balloon>,
    /// The entropy device (its rate limiter is not implemented).
    pub entropy: Option<Entropy>,
    /// Where metrics go.
    pub metrics: Option<Metrics>,
    /// The logger (accepted; samepage logs to standard error, set by `RUST_LOG`).
    pub logger: Option<serde_json::Value>,
    /// virtio-net devices on taps (docs/net.md).
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The vsock device, with Firecracker's host side (docs/vsock.md).
    pub vsock: Option<Vsock>,
    /// Not implemented: refused.
    #[serde(rename = "mmds-config")]
    pub mmds_config: Option<serde_json::Value>,
    /// Not implemented: refused.
    #[serde(rename = "cpu-config")]
    pub cpu_config: Option<serde_json::Value>,
    /// samepage's own settings, which Firecracker does not have (docs/firecracker-compat.md).
    pub samepage: Option<SamepageExtensions>,
}

/// `boot-source`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel.
    pub kernel_image_path: PathBuf,
    /// The initrd.
    pub initrd_path: Option<PathBuf>,
    /// The kernel command line (after samepage's own parameters).
    pub boot_args: Option<String>,
}

/// One of `drives`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Its name.
    pub drive_id: String,
    /// The image.
    pub path_on_host: Option<PathBuf>,
    /// Whether the kernel mounts it as `/`.
    pub is_root_device: bool,
    /// Read-only (shared page by page by default, samepage's image sharing).
    pub is_read_only: Option<bool>,
    /// Not implemented: refused when set.
    pub partuuid: Option<String>,
    /// `Unsafe` (samepage's only behaviour) or `Writeback` (refused).
    pub cache_type: Option<String>,
    /// `Sync` (samepage's only engine) or `Async` (refused).
    pub io_engine: Option<String>,
    /// Not implemented: refused when set.
    pub rate_limiter: Option<serde_json::Value>,
    /// vhost-user: not implemented, refused.
    pub socket: Option<String>,
}

/// `machine-config`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpu_count: u8,
    /// Guest RAM, MiB.
    pub mem_size_mib: u64,
    /// SMT: only off.
    pub smt: Option<bool>,
    /// Accepted, ignored (samepage's snapshots are full).
    pub track_dirty_pages: Option<bool>,
    /// Not implemented: refused when set.
    pub cpu_template: Option<String>,
    /// Only `None`.
    pub huge_pages: Option<String>,
}

/// `balloon`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// The target at start: only 0 (set one later with `samepage balloon --target`).
    pub amount_mib: u64,
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Statistics every this many seconds, 0 for none.
    #[serde(default)]
    pub stats_polling_interval_s: u64,
    /// Free page reporting (Firecracker 1.10+; samepage's default with a balloon: on).
    pub free_page_reporting: Option<bool>,
    /// Free page hinting: not implemented, refused when true.
    pub free_page_hinting: Option<bool>,
}

/// `entropy`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// Not implemented: refused when set.
    pub rate_limiter: Option<serde_json::Value>,
}

/// `network-interfaces[]`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id (1-64 letters, digits or `_`).
    pub iface_id: String,
    /// The host's tap.
    pub host_dev_name: String,
    /// The guest's MAC address; without it one derived from the tap's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Not implemented: refused when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Not implemented: refused when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

impl NetworkInterface {
    /// samepage's `--net` for this interface.
    pub fn config(&self) -> Result<NetConfig, ConfigFileError> {
        if self.rx_rate_limiter.is_some() || self.tx_rate_limiter.is_some() {
            return Err(unsupported(&format!("network interface {:?}: rate limiters", self.iface_id)));
        }
        let mut text = format!("tap={}", self.host_dev_name);
        if let Some(mac) = &self.guest_mac {
            text.push_str(&format!(",mac={mac}"));
        }
        text.parse().map_err(|e: crate::config::ConfigError| {
            ConfigFileError::Invalid(format!("network interface {:?}: {e}", self.iface_id))
        })
    }
}

/// `vsock`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Firecracker's deprecated device name; accepted and ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context ID, 3 or more.
    pub guest_cid: u64,
    /// The host clients' socket; the guest's connections to host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// `metrics`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// samepage writes its own counters there as one JSON object (not Firecracker's lines).
    pub metrics_path: PathBuf,
}

/// `samepage`: samepage's settings, an extension Firecracker clients leave out.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SamepageExtensions {
    /// `hinted` (default), `ksm` or `off`.
    pub dedup: Option<DedupMode>,
    /// The broker's socket (`run --dedup-socket`).
    pub dedup_socket: Option<PathBuf>,
    /// The broker's dedup domain.
    pub dedup_domain: Option<String>,
    /// Share read-only drives page by page (default true).
    pub share_images: Option<bool>,
}

/// Reads and parses `path`: a regular file (opened without blocking, so a FIFO or a device
/// named here is refused, not waited on or read forever), at most [`MAX_FILE_BYTES`].
pub fn load(path: &Path) -> Result<FirecrackerConfig, ConfigFileError> {
    use std::io::Read;
    let read = |source| ConfigFileError::Read { path: path.to_path_buf(), source };
    let file = crate::checked_open::open_regular(path).map_err(read)?;
    let mut text = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| read(crate::checked_open::HostFileError::Io(e)))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigFileError::TooLarge { path: path.to_path_buf() });
    }
    serde_json::from_slice(&text)
        .map_err(|source| ConfigFileError::Parse { path: path.to_path_buf(), source })
}

fn unsupported(what: &str) -> ConfigFileError {
    ConfigFileError::Unsupported(format!(
        "{what} is not implemented by samepage (docs/firecracker-compat.md)"
    ))
}

impl FirecrackerConfig {
    /// Puts the VM this file describes into `args` (whose other options, such as the console,
    /// timeout and name, stay).
    pub fn apply(self, args: &mut RunArgs) -> Result<(), ConfigFileError> {
        for (present, what) in
            [(self.mmds_config.is_some(), "mmds-config"), (self.cpu_config.is_some(), "cpu-config")]
        {
            if present {
                return Err(unsupported(what));
            }
        }
        let extensions = self.samepage.unwrap_or_default();
        args.kernel = Some(self.boot_source.kernel_image_path);
        args.initrd = self.boot_source.initrd_path;
        let mut cmdline = self.boot_source.boot_args.unwrap_or_default();
        if let Some(machine) = self.machine_config {
            machine.apply(args)?;
        }
        args.disks = drives(self.drives, extensions.share_images, &mut cmdline)?;
        args.cmdline = cmdline;
        if let Some(balloon) = self.balloon {
            args.balloon = Some(balloon.options()?);
        }
        if let Some(entropy) = self.entropy {
            if entropy.rate_limiter.is_some() {
                return Err(unsupported("entropy.rate_limiter"));
            }
            args.entropy = true;
        }
        args.nets = self.network_interfaces.iter().map(NetworkInterface::config).collect::<Result<_, _>>()?;
        if let Some(vsock) = self.vsock {
            args.vsock = Some(
                VsockConfig::new(vsock.guest_cid, vsock.uds_path)
                    .map_err(|e| ConfigFileError::Invalid(e.to_string()))?,
            );
        }
        if let Some(metrics) = self.metrics {
            args.metrics = Some(metrics.metrics_path);
        }
        if let Some(mode) = extensions.dedup {
            args.dedup = mode;
        }
        if extensions.dedup_socket.is_some() {
            args.dedup_socket = extensions.dedup_socket;
        }
        if extensions.dedup_domain.is_some() {
            if args.dedup_socket.is_none() {
                return Err(ConfigFileError::Invalid(
                    "samepage.dedup_domain needs samepage.dedup_socket".into(),
                ));
            }
            args.dedup_domain = extensions.dedup_domain;
        }
        Ok(())
    }
}

impl MachineConfig {
    fn apply(self, args: &mut RunArgs) -> Result<(), ConfigFileError> {
        if self.smt == Some(true) {
            return Err(unsupported("machine-config.smt = true"));
        }
        if self.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return Err(unsupported("machine-config.cpu_template"));
        }
        if self.huge_pages.as_deref().is_some_and(|h| h != "None") {
            return Err(unsupported("machine-config.huge_pages other than None"));
        }
        args.vcpus = self.vcpu_count;
        args.mem = parse_mem_size(&self.mem_size_mib.to_string())
            .map_err(|e| ConfigFileError::Invalid(format!("machine-config.mem_size_mib: {e}")))?;
        Ok(())
    }
}

impl Balloon {
    fn options(self) -> Result<BalloonOptions, ConfigFileError> {
        if self.amount_mib != 0 {
            return Err(unsupported(
                "balloon.amount_mib other than 0 at start (set a target with `samepage balloon`)",
            ));
        }
        if self.free_page_hinting == Some(true) {
            return Err(unsupported("balloon.free_page_hinting"));
        }
        let stats = match self.stats_polling_interval_s {
            0 => String::from("0"),
            s => s.to_string(),
        };
        let reporting = if self.free_page_reporting.unwrap_or(true) { "on" } else { "off" };
        let oom = if self.deflate_on_oom { "on" } else { "off" };
        format!("free-page-reporting={reporting},stats={stats},deflate-on-oom={oom}")
            .parse()
            .map_err(|e| ConfigFileError::Invalid(format!("balloon: {e}")))
    }
}

/// The drives as samepage's disks, the root device first (it becomes `/dev/vda`, and
/// `root=/dev/vda` with `ro` or `rw` joins `cmdline` unless it names a root already, as
/// Firecracker does).
fn drives(
    drives: Vec<Drive>,
    share: Option<bool>,
    cmdline: &mut String,
) -> Result<Vec<DiskConfig>, ConfigFileError> {
    if drives.iter().filter(|d| d.is_root_device).count() > 1 {
        return Err(ConfigFileError::Invalid("more than one drive has is_root_device = true".into()));
    }
    let mut ids = std::collections::HashSet::new();
    let mut disks = Vec::with_capacity(drives.len());
    let mut root = None;
    for drive in drives {
        if !ids.insert(drive.drive_id.clone()) {
            return Err(ConfigFileError::Invalid(format!("drive_id {:?} is given twice", drive.drive_id)));
        }
        let name = &drive.drive_id;
        for (set, what) in [
            (drive.partuuid.is_some(), "partuuid"),
            (drive.rate_limiter.is_some(), "rate_limiter"),
            (drive.socket.is_some(), "socket (vhost-user)"),
            (drive.cache_type.as_deref().is_some_and(|c| c != "Unsafe"), "cache_type other than Unsafe"),
            (drive.io_engine.as_deref().is_some_and(|e| e != "Sync"), "io_engine other than Sync"),
        ] {
            if set {
                return Err(unsupported(&format!("drive {name:?}: {what}")));
            }
        }
        let path = drive
            .path_on_host
            .ok_or_else(|| ConfigFileError::Invalid(format!("drive {name:?} has no path_on_host")))?;
        let read_only = drive.is_read_only.unwrap_or(false);
        let disk = DiskConfig { path, read_only, share: if read_only { share } else { None } };
        if drive.is_root_device {
            root = Some(read_only);
            disks.insert(0, disk);
        } else {
            disks.push(disk);
        }
    }
    if let Some(read_only) = root {
        if !cmdline.split_whitespace().any(|p| p.starts_with("root=")) {
            let mode = if read_only { "ro" } else { "rw" };
            *cmdline = format!("{cmdline} root=/dev/vda {mode}").trim_start().to_string();
        }
    }
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn base() -> RunArgs {
        Cli::parse_from(["samepage", "--kernel", "placeholder"]).run
    }

    fn applied(json: &str) -> Result<RunArgs, ConfigFileError> {
        let config: FirecrackerConfig = serde_json::from_str(json)
            .map_err(|source| ConfigFileError::Parse { path: "test.json".into(), source })?;
        let mut args = base();
        config.apply(&mut args)?;
        Ok(args)
    }

    #[test]
    fn a_firecracker_configuration_becomes_samepage_options() {
        let args = applied(
            r#"{
              "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0 quiet", "initrd_path": null},
              "drives": [
                {"drive_id": "data", "path_on_host": "data.img", "is_root_device": false, "is_read_only": false},
                {"drive_id": "rootfs", "path_on_host": "root.img", "is_root_device": true, "is_read_only": true,
                 "cache_type": "Unsafe", "io_engine": "Sync"}
              ],
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "smt": false, "track_dirty_pages": false},
              "balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 5},
              "entropy": {},
              "logger": {"log_path": "/dev/null", "level": "Info"},
              "metrics": {"metrics_path": "m.json"},
              "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}],
              "vsock": {"vsock_id": "vsock0", "guest_cid": 52, "uds_path": "/run/v.sock"},
              "samepage": {"dedup": "ksm", "share_images": false}
            }"#,
        )
        .expect("applies");
        assert_eq!(args.kernel.as_deref(), Some(Path::new("vmlinux")));
        assert_eq!(args.cmdline, "console=ttyS0 quiet root=/dev/vda ro");
        assert_eq!((args.vcpus, args.mem), (2, 512 << 20));
        assert_eq!(
            args.disks,
            [
                DiskConfig { path: "root.img".into(), read_only: true, share: Some(false) },
                DiskConfig::new("data.img", false)
            ]
        );
        let balloon = args.balloon.expect("balloon");
        assert!(balloon.deflate_on_oom && balloon.free_page_reporting);
        assert_eq!(balloon.stats_every, Some(std::time::Duration::from_secs(5)));
        assert!(args.entropy);
        assert_eq!(args.metrics.as_deref(), Some(Path::new("m.json")));
        assert_eq!(args.dedup, DedupMode::Ksm);
        assert_eq!(args.vsock, Some(VsockConfig { guest_cid: 52, uds_path: "/run/v.sock".into() }));
        assert_eq!(args.nets, ["tap=tap0,mac=06:00:ac:10:00:02".parse().expect("net")]);
    }

    #[test]
    fn what_samepage_does_not_implement_is_refused_by_name() {
        let boot = r#""boot-source": {"kernel_image_path": "k"}"#;
        for (extra, expected) in [
            (
                r#""network-interfaces": [{"iface_id": "eth0", "host_dev_name": "t", "rx_rate_limiter": {}}]"#,
                "rate limiters",
            ),
            (r#""mmds-config": {}"#, "mmds-config"),
            (r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#, "smt"),
            (r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}"#, "huge_pages"),
            (r#""balloon": {"amount_mib": 64, "deflate_on_oom": false}"#, "amount_mib"),
            (r#""entropy": {"rate_limiter": {}}"#, "rate_limiter"),
            (
                r#""drives": [{"drive_id": "a", "path_on_host": "a", "is_root_device": false, "io_engine": "Async"}]"#,
                "io_engine",
            ),
            (
                r#""drives": [{"drive_id": "a", "path_on_host": "a", "is_root_device": false, "partuuid": "x"}]"#,
                "partuuid",
            ),
        ] {
            let e = applied(&format!("{{{boot}, {extra}}}")).expect_err(extra).to_string();
            assert!(e.contains(expected) && e.contains("not implemented"), "{extra}: {e}");
        }
    }

    #[test]
    fn malformed_or_inconsistent_configurations_are_refused() {
        let boot = r#""boot-source": {"kernel_image_path": "k"}"#;
        for (extra, expected) in [
            (r#""unknown-section": {}"#, "unknown field"),
            (r#""vsock": {"guest_cid": 2, "uds_path": "v.sock"}"#, "CID 2"),
            (r#""vsock": {"guest_cid": 3}"#, "uds_path"),
            (r#""network-interfaces": [{"iface_id": "eth0"}]"#, "host_dev_name"),
            (
                r#""network-interfaces": [{"iface_id": "e", "host_dev_name": "t", "guest_mac": "01:00:00:00:00:00"}]"#,
                "invalid net",
            ),
            (
                r#""network-interfaces": [{"iface_id": "e", "host_dev_name": "sixteen-bytes-xx"}]"#,
                "invalid net",
            ),
            (r#""vsock": {"guest_cid": 3, "uds_path": "v", "port": 1}"#, "unknown field"),
            (r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "vcpu": 1}"#, "unknown field"),
            (r#""machine-config": {"vcpu_count": 300, "mem_size_mib": 128}"#, "300"),
            (r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 18446744073709551615}"#, "mem_size_mib"),
            (r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 1}"#, "mem_size_mib"),
            (
                r#""drives": [{"drive_id": "a", "path_on_host": "a", "is_root_device": true}, {"drive_id": "b", "path_on_host": "b", "is_root_device": true}]"#,
                "more than one",
            ),
            (
                r#""drives": [{"drive_id": "a", "path_on_host": "a", "is_root_device": false}, {"drive_id": "a", "path_on_host": "b", "is_root_device": false}]"#,
                "twice",
            ),
            (r#""drives": [{"drive_id": "a", "is_root_device": false}]"#, "no path_on_host"),
            (r#""samepage": {"dedup_domain": "x"}"#, "dedup_socket"),
        ] {
            let e = applied(&format!("{{{boot}, {extra}}}")).expect_err(extra);
            let text =
                format!("{e} {}", std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default());
            assert!(text.contains(expected), "{extra}: {text}");
        }
        assert!(applied("[]").is_err() && applied("{}").is_err(), "boot-source is required");
    }
}
