//! `samepage run`'s command line, both ways: parsed by clap into a [`VmConfig`] and the
//! process's own settings, and a [`VmConfig`] turned back into the arguments that give it
//! (`density` starts each VM as a `samepage run` process). Flag values are spelled by the
//! types that parse them (clap's [`ValueEnum`], [`DiskConfig::to_arg`],
//! [`SerialConfig::to_arg`]); a test parses what [`RunArgs::to_args`] writes back through clap.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use crate::balloon::BalloonOptions;
use crate::config::{
    parse_interval, parse_mem_size, parse_timeout, BrokerConfig, DedupConfig, DedupMode, DiskConfig,
    EmulatedCpl0, NetConfig, SerialConfig, SnapshotRequest, VmConfig, VsockConfig,
};
use crate::seccomp::Seccomp;

/// `samepage run`'s options (`density` takes them too, for every VM).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH entry if present) or bzImage.
    #[arg(long, required_unless_present_any = ["restore", "api_sock"])]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (e.g. an uncompressed cpio).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, after samepage's own parameters.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest RAM, 16M to 1T, e.g. 256M or 2G (a bare number is MiB).
    #[arg(long, default_value = "256M", value_parser = parse_mem_size)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
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
    pub disks: Vec<DiskConfig>,
    /// Guest console: stdout (with input from stdin), file:PATH, or none.
    #[arg(long, default_value = "stdout")]
    pub serial: SerialConfig,
    /// Stop the guest after this many seconds, 0 to 31536000 (365 days) (exit code 124).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Add kernel parameters for hosts whose KVM emulates guest kernel code.
    #[arg(long, value_enum, default_value = "auto")]
    pub emulated_cpl0: EmulatedCpl0,
    /// Page merging: hinted (guest reports file pages), ksm, or off.
    #[arg(long, value_enum, default_value = "hinted")]
    pub dedup: DedupMode,
    /// Seconds between checks of merged pages for copy-on-write breaks (store pages nobody
    /// maps any more are freed then).
    #[arg(long, default_value = "1", value_parser = parse_interval)]
    pub dedup_scan_every: Duration,
    /// Merge pages with the VMs of other samepage processes through the broker
    /// (`samepage dedupd`) at this socket.
    #[arg(long)]
    pub dedup_socket: Option<PathBuf>,
    /// The broker's dedup domain to join (default: your user's own).
    #[arg(long, requires = "dedup_socket")]
    pub dedup_domain: Option<String>,
    /// A virtio-balloon device: the guest gives memory it does not use back to the host
    /// (docs/balloon.md). Optional value: [free-page-reporting=on|off][,stats=SECS]
    /// [,deflate-on-oom=on|off]; `--balloon` alone is free-page-reporting=on,stats=0,
    /// deflate-on-oom=off.
    #[arg(
        long,
        value_name = "OPTIONS",
        num_args = 0..=1,
        require_equals = false,
        default_missing_value = ""
    )]
    pub balloon: Option<BalloonOptions>,
    /// Serve the balloon's control socket at PATH (mode 0600), for `samepage balloon --socket
    /// PATH [--target SIZE]`; in density, `{vm}` in PATH stands for the VM's index. Needs
    /// --balloon, or a --restore of a VM that had one.
    #[arg(long, value_name = "PATH")]
    pub balloon_socket: Option<PathBuf>,
    /// A virtio entropy device (virtio-rng): the guest draws random bytes from the host's
    /// getrandom (Linux: CONFIG_HW_RANDOM_VIRTIO).
    #[arg(long, conflicts_with = "restore")]
    pub entropy: bool,
    /// A virtio-vsock device with Firecracker's host side (docs/vsock.md), [cid=N,]uds=PATH:
    /// a host process connects to PATH and writes `CONNECT <port>` to reach guest port
    /// <port>; the guest's connections to host port P go to a listener on PATH_P. The guest's
    /// CID defaults to 3.
    #[arg(long, value_name = "[cid=N,]uds=PATH", conflicts_with_all = ["restore", "snapshot_to"])]
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device on a tap (docs/net.md): tap=NAME attaches to (or, with
    /// CAP_NET_ADMIN, makes) the tap NAME; fd=N takes over a tap descriptor samepage was
    /// started with. mac= sets the guest's MAC (default: derived from the tap's name). No
    /// offloads. Repeat for more.
    #[arg(long = "net", value_name = "tap=NAME|fd=N[,mac=MAC]", conflicts_with_all = ["restore", "snapshot_to"])]
    pub nets: Vec<NetConfig>,
    /// Resume the VM snapshotted in DIR instead of booting one (docs/snapshot.md): its RAM maps
    /// DIR/memory copy-on-write, so VMs restored from one snapshot share it until they write.
    /// The hardware (RAM, vCPUs, disks, command line) is the snapshot's; merging, console,
    /// timeout and metrics are this command's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "disks", "balloon", "vcpus"])]
    pub restore: Option<PathBuf>,
    /// Snapshot the VM into DIR (made if missing; a snapshot there is replaced) the first time
    /// its console prints --snapshot-at's text; the VM goes on (docs/snapshot.md).
    #[arg(long, value_name = "DIR", requires = "snapshot_at")]
    pub snapshot_to: Option<PathBuf>,
    /// The console text that triggers --snapshot-to.
    #[arg(long, value_name = "TEXT", requires = "snapshot_to", value_parser = marker)]
    pub snapshot_at: Option<String>,
    /// Serve Firecracker's HTTP API on a Unix socket at PATH (mode 0600;
    /// docs/firecracker-compat.md): without --kernel or --restore the VM is configured and
    /// started through it (`PUT /actions {"action_type": "InstanceStart"}`); either way a
    /// running VM can be paused, resumed and snapshotted through it.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM's name, in logs and in `samepage dedupd status`.
    #[arg(long, default_value = "vm")]
    pub name: String,
    /// Write the VM's counters to FILE as JSON, every second and when it stops.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// After the guest stops, keep its memory (and its merged pages) until standard input
    /// ends: for a caller that measures them (samepage density does).
    #[arg(long)]
    pub hold_until_eof: bool,
    /// Seccomp filters on the VMM's threads (and density's, its VMs' and its broker's); off
    /// is for debugging only.
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: Seccomp,
}

impl RunArgs {
    /// The options that give `config`, for the VM named `name`, with no metrics file, no hold
    /// and seccomp filters on (set the fields to change those).
    pub fn for_vm(config: &VmConfig, name: impl Into<String>) -> RunArgs {
        let broker = config.dedup.broker.clone();
        RunArgs {
            kernel: Some(config.kernel.clone()),
            initrd: config.initrd.clone(),
            cmdline: config.cmdline.clone(),
            mem: config.mem_bytes,
            vcpus: config.vcpus,
            disks: config.disks.clone(),
            serial: config.serial.clone(),
            timeout: config.timeout,
            emulated_cpl0: config.emulated_cpl0,
            dedup: config.dedup.mode,
            dedup_scan_every: config.dedup.scan_every,
            dedup_socket: broker.as_ref().map(|b| b.socket.clone()),
            dedup_domain: broker.and_then(|b| b.domain),
            balloon: config.balloon,
            balloon_socket: config.balloon_socket.clone(),
            entropy: config.entropy,
            vsock: config.vsock.clone(),
            nets: config.nets.clone(),
            restore: None,
            snapshot_to: config.snapshot.as_ref().map(|s| s.dir.clone()),
            snapshot_at: config.snapshot.as_ref().map(|s| s.at.clone()),
            api_sock: None,
            name: name.into(),
            metrics: None,
            hold_until_eof: false,
            seccomp: Seccomp::On,
        }
    }

    /// The VM these options describe.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone().unwrap_or_default(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            mem_bytes: self.mem,
            vcpus: self.vcpus,
            disks: self.disks.clone(),
            serial: self.serial.clone(),
            timeout: self.timeout,
            emulated_cpl0: self.emulated_cpl0,
            dedup: DedupConfig {
                mode: self.dedup,
                scan_every: self.dedup_scan_every,
                broker: self
                    .dedup_socket
                    .clone()
                    .map(|socket| BrokerConfig { socket, domain: self.dedup_domain.clone() }),
            },
            balloon: self.balloon,
            balloon_socket: self.balloon_socket.clone(),
            snapshot: self
                .snapshot_to
                .clone()
                .zip(self.snapshot_at.clone())
                .map(|(dir, at)| SnapshotRequest { dir, at }),
            entropy: self.entropy,
            vsock: self.vsock.clone(),
            nets: self.nets.clone(),
        }
    }

    /// The arguments after `samepage run` that parse back into these options. Each is one
    /// `--flag=value`, so that a value starting with `-` (a kernel command line) stays a value.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        let mut give = |flag: &str, value: OsString| {
            let mut arg = OsString::from(format!("--{flag}="));
            arg.push(value);
            args.push(arg);
        };
        // A restore takes the machine from its snapshot.
        if self.restore.is_none() {
            if let Some(kernel) = &self.kernel {
                give("kernel", kernel.clone().into());
            }
            if let Some(initrd) = &self.initrd {
                give("initrd", initrd.clone().into());
            }
            give("cmdline", self.cmdline.clone().into());
            // Guest RAM is whole 4 KiB pages: KiB say it exactly.
            give("mem", format!("{}K", self.mem >> 10).into());
            give("vcpus", self.vcpus.to_string().into());
            for disk in &self.disks {
                give("disk", disk.to_arg());
            }
        }
        give("serial", self.serial.to_arg());
        if let Some(timeout) = self.timeout {
            // --timeout parses whole seconds.
            give("timeout", timeout.as_secs().to_string().into());
        }
        give("emulated-cpl0", value_arg(self.emulated_cpl0));
        give("dedup", value_arg(self.dedup));
        give("dedup-scan-every", self.dedup_scan_every.as_secs_f64().to_string().into());
        if let Some(socket) = &self.dedup_socket {
            give("dedup-socket", socket.clone().into());
        }
        if let Some(domain) = &self.dedup_domain {
            give("dedup-domain", domain.into());
        }
        if let Some(balloon) = &self.balloon {
            give("balloon", balloon.to_arg().into());
        }
        if let Some(socket) = &self.balloon_socket {
            give("balloon-socket", socket.clone().into());
        }
        if let Some(dir) = &self.restore {
            give("restore", dir.clone().into());
        }
        if let (Some(dir), Some(at)) = (&self.snapshot_to, &self.snapshot_at) {
            give("snapshot-to", dir.clone().into());
            give("snapshot-at", at.into());
        }
        if let Some(socket) = &self.api_sock {
            give("api-sock", socket.clone().into());
        }
        give("name", self.name.clone().into());
        if let Some(metrics) = &self.metrics {
            give("metrics", metrics.clone().into());
        }
        give("seccomp", value_arg(self.seccomp));
        if self.hold_until_eof {
            args.push("--hold-until-eof".into());
        }
        // A restore's devices are its snapshot's.
        if self.entropy && self.restore.is_none() {
            args.push("--entropy".into());
        }
        if let Some(vsock) = &self.vsock {
            give_vsock(&mut args, vsock);
        }
        for net in &self.nets {
            args.push(format!("--net={}", net.to_arg()).into());
        }
        args
    }
}

/// `--vsock=...` for `vsock`.
fn give_vsock(args: &mut Vec<OsString>, vsock: &VsockConfig) {
    let mut arg = OsString::from("--vsock=");
    arg.push(vsock.to_arg());
    args.push(arg);
}

/// Longest `--snapshot-at` text: the console watch compares each byte the guest writes with
/// it, falling back along its prefixes, so its length bounds the work per byte.
pub const MAX_MARKER_BYTES: usize = 256;

/// A `--snapshot-at` text: not empty (it would match everywhere), at most
/// [`MAX_MARKER_BYTES`].
fn marker(text: &str) -> Result<String, String> {
    match text.len() {
        0 => Err("may not be empty".into()),
        n if n > MAX_MARKER_BYTES => Err(format!("is {n} bytes long, at most {MAX_MARKER_BYTES}")),
        _ => Ok(text.to_string()),
    }
}

/// A [`ValueEnum`] value as its option takes it (`hinted`, `off`, ...).
pub fn value_arg<E: ValueEnum>(value: E) -> OsString {
    value.to_possible_value().map(|v| OsString::from(v.get_name())).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `samepage run` as main.rs parses it.
    #[derive(Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    fn parse(args: &RunArgs) -> RunArgs {
        let argv = std::iter::once(OsString::from("run")).chain(args.to_args());
        Run::try_parse_from(argv).unwrap_or_else(|e| panic!("{:?} does not parse: {e}", args.to_args())).args
    }

    #[test]
    fn a_config_goes_through_its_arguments_and_back_through_clap() {
        let config = VmConfig {
            kernel: "/boot/vmlinux".into(),
            initrd: Some("/boot/initrd.cpio".into()),
            cmdline: "-- quiet init=/bin/sh".into(),
            mem_bytes: (3 << 30) + (4 << 10),
            vcpus: 3,
            disks: vec![
                "/img/base.img,ro".parse().expect("disk"),
                "/img/own.img".parse().expect("disk"),
                "/img/copy.img,ro,share=off".parse().expect("disk"),
            ],
            serial: SerialConfig::File("/tmp/console log".into()),
            timeout: Some(Duration::from_secs(300)),
            emulated_cpl0: EmulatedCpl0::On,
            dedup: DedupConfig {
                mode: DedupMode::Ksm,
                scan_every: Duration::from_millis(250),
                broker: Some(BrokerConfig { socket: "/run/dedupd.sock".into(), domain: Some("team".into()) }),
            },
            balloon: Some("stats=7,deflate-on-oom=on,free-page-reporting=off".parse().expect("balloon")),
            balloon_socket: Some("/run/vm3 balloon".into()),
            snapshot: None,
            entropy: false,
            vsock: None,
            nets: Vec::new(),
        };
        let mut args = RunArgs::for_vm(&config, "vm3");
        args.metrics = Some("/tmp/vm3.json".into());
        args.hold_until_eof = true;
        args.seccomp = Seccomp::Off;
        let back = parse(&args);
        assert_eq!(back, args);
        assert_eq!(back.vm_config(), config);

        let plain = VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            mem_bytes: crate::config::DEFAULT_MEM_BYTES,
            vcpus: 1,
            disks: Vec::new(),
            serial: SerialConfig::None,
            timeout: None,
            emulated_cpl0: EmulatedCpl0::Auto,
            dedup: DedupConfig::default(),
            balloon: None,
            balloon_socket: None,
            snapshot: Some(SnapshotRequest { dir: "/tmp/snap shot".into(), at: "-- ready --".into() }),
            entropy: false,
            vsock: None,
            nets: Vec::new(),
        };
        let args = RunArgs::for_vm(&plain, "vm");
        assert_eq!(parse(&args), args);
        assert_eq!(parse(&args).vm_config(), plain);
    }

    fn parse_argv(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["run", "--kernel", "k"].iter().chain(argv);
        Run::try_parse_from(argv).map(|r| r.args)
    }

    #[test]
    fn the_balloon_option_takes_an_optional_value_and_its_socket_needs_it() {
        assert_eq!(parse_argv(&[]).unwrap().balloon, None);
        assert_eq!(parse_argv(&["--balloon"]).unwrap().balloon, Some(BalloonOptions::default()));
        // Without a value before another option, with one after a space or an equals sign.
        let args = parse_argv(&["--balloon", "--mem", "64M"]).unwrap();
        assert_eq!((args.balloon, args.mem), (Some(BalloonOptions::default()), 64 << 20));
        let stats = Some(Duration::from_secs(2));
        assert_eq!(parse_argv(&["--balloon", "stats=2"]).unwrap().balloon.unwrap().stats_every, stats);
        assert_eq!(parse_argv(&["--balloon=stats=2"]).unwrap().balloon.unwrap().stats_every, stats);
        assert!(parse_argv(&["--balloon", "stats=soon"]).is_err());
        // A socket without a balloon parses (a restored VM's balloon is the snapshot's) and is
        // refused when the VM is checked.
        let lone = parse_argv(&["--balloon-socket", "/tmp/b"]).unwrap().vm_config();
        assert!(matches!(lone.validate(), Err(crate::config::ConfigError::BalloonSocketWithoutBalloon)));
        let args = parse_argv(&["--balloon", "--balloon-socket", "/tmp/b"]).unwrap();
        assert_eq!(args.vm_config().balloon_socket, Some(PathBuf::from("/tmp/b")));
        assert_eq!(parse(&args), args);
    }

    #[test]
    fn enum_values_are_spelled_as_clap_parses_them() {
        assert_eq!(value_arg(DedupMode::Hinted), "hinted");
        assert_eq!(value_arg(EmulatedCpl0::Auto), "auto");
        assert_eq!(value_arg(Seccomp::Off), "off");
    }
}
