//! The VM a client configures through the API before it starts: Firecracker's sections, kept
//! in the configuration file's shape ([`FirecrackerConfig`]), so that `GET /vm/config` shows
//! them and the start turns them into `samepage run`'s options as a configuration file is
//! turned ([`FirecrackerConfig::apply`]).
//!
//! Contract: a change that would not start (an unknown value, a refused feature, a file that
//! is not there) is refused when it is made, and the resources stay as they were.

use std::path::Path;

use serde::Serialize;

use super::routes::{DrivePatch, MachineConfigPatch};
use crate::firecracker::config_file::{
    Balloon, BootSource, ConfigFileError, Drive, Entropy, FirecrackerConfig, MachineConfig, Metrics,
    NetworkInterface, SamepageExtensions, Vsock,
};
use crate::run_args::RunArgs;

/// Firecracker's default machine: one vCPU, 128 MiB.
const DEFAULT_VCPUS: u8 = 1;
const DEFAULT_MEM_MIB: u64 = 128;

/// What has been configured so far.
#[derive(Debug, Clone)]
pub struct VmResources {
    /// `run`'s options the process was started with (console, name, seccomp, timeout).
    base: RunArgs,
    boot_source: Option<BootSource>,
    machine: MachineConfig,
    drives: Vec<Drive>,
    balloon: Option<Balloon>,
    entropy: Option<Entropy>,
    vsock: Option<Vsock>,
    network_interfaces: Vec<NetworkInterface>,
    metrics: Option<Metrics>,
    logger: bool,
    samepage: SamepageExtensions,
}

/// `GET /vm/config`'s and the configuration file's shape.
#[derive(Serialize)]
struct FullConfig<'a> {
    #[serde(rename = "boot-source")]
    boot_source: &'a Option<BootSource>,
    drives: &'a [Drive],
    #[serde(rename = "machine-config")]
    machine_config: &'a MachineConfig,
    balloon: &'a Option<Balloon>,
    entropy: &'a Option<Entropy>,
    vsock: &'a Option<Vsock>,
    metrics: &'a Option<Metrics>,
    #[serde(rename = "network-interfaces")]
    network_interfaces: &'a [NetworkInterface],
    samepage: &'a SamepageExtensions,
}

impl VmResources {
    /// Nothing configured yet but Firecracker's default machine; `base`: `run`'s options the
    /// process was started with, which the configuration fills in.
    pub fn new(base: RunArgs) -> Self {
        VmResources {
            base,
            boot_source: None,
            machine: MachineConfig {
                vcpu_count: DEFAULT_VCPUS,
                mem_size_mib: DEFAULT_MEM_MIB,
                smt: Some(false),
                track_dirty_pages: Some(false),
                cpu_template: None,
                huge_pages: Some("None".into()),
            },
            drives: Vec::new(),
            balloon: None,
            entropy: None,
            vsock: None,
            network_interfaces: Vec::new(),
            metrics: None,
            logger: false,
            samepage: SamepageExtensions::default(),
        }
    }

    /// The resources `samepage run`'s own options give (`--kernel` with `--api-sock`), as
    /// `GET /vm/config` shows them: drives named `drive0`, `drive1`, ... in `--disk` order.
    pub fn from_run_args(args: &RunArgs) -> VmResources {
        let mut resources = VmResources::new(args.clone());
        resources.boot_source = args.kernel.clone().map(|kernel| BootSource {
            kernel_image_path: kernel,
            initrd_path: args.initrd.clone(),
            boot_args: Some(args.cmdline.clone()),
        });
        resources.machine.vcpu_count = args.vcpus;
        resources.machine.mem_size_mib = args.mem >> 20;
        resources.drives = args
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| Drive {
                drive_id: format!("drive{index}"),
                path_on_host: Some(disk.path.clone()),
                is_root_device: false,
                is_read_only: Some(disk.read_only),
                partuuid: None,
                cache_type: None,
                io_engine: None,
                rate_limiter: None,
                socket: None,
            })
            .collect();
        resources.entropy = args.entropy.then_some(Entropy { rate_limiter: None });
        resources.metrics = args.metrics.clone().map(|metrics_path| Metrics { metrics_path });
        resources.samepage = SamepageExtensions {
            dedup: Some(args.dedup),
            dedup_socket: args.dedup_socket.clone(),
            dedup_domain: args.dedup_domain.clone(),
            share_images: None,
        };
        resources
    }

    /// The resources a configuration file gave (`--api-sock` with `--config-file`).
    pub fn from_config(base: RunArgs, config: FirecrackerConfig) -> VmResources {
        let defaults = VmResources::new(base.clone());
        VmResources {
            base,
            boot_source: Some(config.boot_source),
            machine: config.machine_config.unwrap_or(defaults.machine),
            drives: config.drives,
            balloon: config.balloon,
            entropy: config.entropy,
            vsock: config.vsock,
            network_interfaces: config.network_interfaces,
            metrics: config.metrics,
            logger: config.logger.is_some(),
            samepage: config.samepage.unwrap_or_default(),
        }
    }

    /// The configuration as `GET /vm/config` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let full = FullConfig {
            boot_source: &self.boot_source,
            drives: &self.drives,
            machine_config: &self.machine,
            balloon: &self.balloon,
            entropy: &self.entropy,
            vsock: &self.vsock,
            metrics: &self.metrics,
            network_interfaces: &self.network_interfaces,
            samepage: &self.samepage,
        };
        serde_json::to_value(full).unwrap_or_default()
    }

    /// `run`'s options the process was started with.
    pub fn base(&self) -> &RunArgs {
        &self.base
    }

    /// `GET /balloon`: the balloon as configured, if one is.
    pub fn balloon(&self) -> Option<&Balloon> {
        self.balloon.as_ref()
    }

    /// `GET /machine-config`.
    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }

    /// Sets the kernel.
    pub fn set_boot_source(&mut self, boot: BootSource) -> Result<(), ConfigFileError> {
        exists("boot-source.kernel_image_path", &boot.kernel_image_path)?;
        if let Some(initrd) = &boot.initrd_path {
            exists("boot-source.initrd_path", initrd)?;
        }
        self.change(|r| r.boot_source = Some(boot))
    }

    /// Sets the machine.
    pub fn set_machine(&mut self, machine: MachineConfig) -> Result<(), ConfigFileError> {
        self.change(|r| r.machine = machine)
    }

    /// Changes the machine's fields given.
    pub fn patch_machine(&mut self, patch: MachineConfigPatch) -> Result<(), ConfigFileError> {
        self.change(|r| {
            let m = &mut r.machine;
            m.vcpu_count = patch.vcpu_count.unwrap_or(m.vcpu_count);
            m.mem_size_mib = patch.mem_size_mib.unwrap_or(m.mem_size_mib);
            m.smt = patch.smt.or(m.smt.take());
            m.track_dirty_pages = patch.track_dirty_pages.or(m.track_dirty_pages.take());
            m.cpu_template = patch.cpu_template.or(m.cpu_template.take());
            m.huge_pages = patch.huge_pages.or(m.huge_pages.take());
        })
    }

    /// Adds a drive, or replaces the one of its id.
    pub fn put_drive(&mut self, drive: Drive) -> Result<(), ConfigFileError> {
        if let Some(path) = &drive.path_on_host {
            exists(&format!("drive {:?}: path_on_host", drive.drive_id), path)?;
        }
        self.change(|r| match r.drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
            Some(old) => *old = drive,
            None => r.drives.push(drive),
        })
    }

    /// Changes a configured drive's image (before the start).
    pub fn patch_drive(&mut self, patch: DrivePatch) -> Result<(), ConfigFileError> {
        if patch.rate_limiter.is_some() {
            return Err(ConfigFileError::Unsupported(format!(
                "drive {:?}: rate_limiter is not implemented by samepage (docs/firecracker-compat.md)",
                patch.drive_id
            )));
        }
        if !self.drives.iter().any(|d| d.drive_id == patch.drive_id) {
            return Err(ConfigFileError::Invalid(format!("no drive {:?} is configured", patch.drive_id)));
        }
        if let Some(path) = &patch.path_on_host {
            exists(&format!("drive {:?}: path_on_host", patch.drive_id), path)?;
        }
        self.change(|r| {
            if let Some(drive) = r.drives.iter_mut().find(|d| d.drive_id == patch.drive_id) {
                drive.path_on_host = patch.path_on_host.or(drive.path_on_host.take());
            }
        })
    }

    /// Sets the balloon.
    pub fn set_balloon(&mut self, balloon: Balloon) -> Result<(), ConfigFileError> {
        self.change(|r| r.balloon = Some(balloon))
    }

    /// Sets the entropy device.
    pub fn put_network_interface(&mut self, iface: NetworkInterface) -> Result<(), ConfigFileError> {
        self.change(|r| match r.network_interfaces.iter_mut().find(|i| i.iface_id == iface.iface_id) {
            Some(old) => *old = iface,
            None => r.network_interfaces.push(iface),
        })
    }

    /// Adds the vsock device.
    pub fn set_vsock(&mut self, vsock: Vsock) -> Result<(), ConfigFileError> {
        self.change(|r| r.vsock = Some(vsock))
    }

    /// Adds the entropy device.
    pub fn set_entropy(&mut self, entropy: Entropy) -> Result<(), ConfigFileError> {
        self.change(|r| r.entropy = Some(entropy))
    }

    /// Sets where metrics go.
    pub fn set_metrics(&mut self, metrics: Metrics) -> Result<(), ConfigFileError> {
        self.change(|r| r.metrics = Some(metrics))
    }

    /// Notes a logger (accepted; samepage logs to standard error).
    pub fn set_logger(&mut self) {
        self.logger = true;
    }

    /// Sets samepage's own settings.
    pub fn set_samepage(&mut self, samepage: SamepageExtensions) -> Result<(), ConfigFileError> {
        self.change(|r| r.samepage = samepage)
    }

    /// `samepage run`'s options for the configured VM: the base options with the VM put in.
    pub fn run_args(&self) -> Result<RunArgs, ConfigFileError> {
        let Some(boot_source) = self.boot_source.clone() else {
            return Err(ConfigFileError::Invalid(
                "Cannot start microvm without kernel configuration (PUT /boot-source).".into(),
            ));
        };
        let mut args = self.base.clone();
        self.config_file(boot_source).apply(&mut args)?;
        args.vm_config().validate().map_err(|e| ConfigFileError::Invalid(e.to_string()))?;
        Ok(args)
    }

    fn config_file(&self, boot_source: BootSource) -> FirecrackerConfig {
        FirecrackerConfig {
            boot_source,
            drives: self.drives.clone(),
            machine_config: Some(self.machine.clone()),
            balloon: self.balloon.clone(),
            entropy: self.entropy.clone(),
            metrics: self.metrics.clone(),
            logger: self.logger.then(|| serde_json::json!({})),
            network_interfaces: self.network_interfaces.clone(),
            vsock: self.vsock.clone(),
            mmds_config: None,
            cpu_config: None,
            samepage: Some(self.samepage.clone()),
        }
    }

    /// Makes `edit` if the resources still make a VM samepage runs afterwards.
    fn change(&mut self, edit: impl FnOnce(&mut VmResources)) -> Result<(), ConfigFileError> {
        let mut changed = self.clone();
        edit(&mut changed);
        let boot = changed.boot_source.clone().unwrap_or(BootSource {
            kernel_image_path: "/".into(),
            initrd_path: None,
            boot_args: None,
        });
        let mut scratch = self.base.clone();
        changed.config_file(boot).apply(&mut scratch)?;
        scratch.vm_config().validate().map_err(|e| ConfigFileError::Invalid(e.to_string()))?;
        *self = changed;
        Ok(())
    }
}

/// Refuses a path nothing is at, naming the field.
fn exists(field: &str, path: &Path) -> Result<(), ConfigFileError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(ConfigFileError::Invalid(format!("{field}: {}: {e}", path.display()))),
    }
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
        Cli::parse_from(["samepage", "--api-sock", "/tmp/x"]).run
    }

    fn machine(vcpus: u8, mib: u64) -> MachineConfig {
        MachineConfig {
            vcpu_count: vcpus,
            mem_size_mib: mib,
            smt: None,
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
        }
    }

    #[test]
    fn changes_that_would_not_start_are_refused_and_leave_the_resources_as_they_were() {
        let mut resources = VmResources::new(base());
        assert_eq!(resources.machine().mem_size_mib, DEFAULT_MEM_MIB);
        resources.set_machine(machine(2, 256)).expect("a machine");
        assert!(resources.set_machine(machine(0, 256)).is_err(), "no vCPU");
        assert!(resources.set_machine(machine(1, 1)).is_err(), "1 MiB of RAM");
        assert_eq!((resources.machine().vcpu_count, resources.machine().mem_size_mib), (2, 256));
        resources
            .patch_machine(MachineConfigPatch { mem_size_mib: Some(512), ..Default::default() })
            .expect("patch");
        assert_eq!((resources.machine().vcpu_count, resources.machine().mem_size_mib), (2, 512));
        let missing =
            BootSource { kernel_image_path: "/no/such/kernel".into(), initrd_path: None, boot_args: None };
        assert!(resources.set_boot_source(missing).unwrap_err().to_string().contains("kernel_image_path"));
        let e = resources.run_args().unwrap_err().to_string();
        assert!(e.contains("without kernel configuration"), "{e}");
        let no_drive = DrivePatch { drive_id: "x".into(), path_on_host: None, rate_limiter: None };
        assert!(resources.patch_drive(no_drive).is_err());
    }

    #[test]
    fn the_configured_vm_becomes_run_options_and_shows_in_vm_config() {
        let exe = std::env::current_exe().expect("exe");
        let mut resources = VmResources::new(base());
        resources
            .set_boot_source(BootSource {
                kernel_image_path: exe.clone(),
                initrd_path: None,
                boot_args: Some("quiet".into()),
            })
            .expect("kernel");
        let drive = |id: &str| Drive {
            drive_id: id.into(),
            path_on_host: Some(exe.clone()),
            is_root_device: id == "rootfs",
            is_read_only: Some(true),
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        };
        resources.put_drive(drive("data")).expect("data");
        resources.put_drive(drive("rootfs")).expect("rootfs");
        resources.put_drive(drive("rootfs")).expect("rootfs again replaces it");
        let args = resources.run_args().expect("args");
        assert_eq!(args.disks.len(), 2);
        assert_eq!(args.cmdline, "quiet root=/dev/vda ro");
        assert_eq!((args.vcpus, args.mem), (1, 128 << 20));
        let json = resources.to_json();
        assert_eq!(json["drives"].as_array().map(Vec::len), Some(2));
        assert_eq!(json["machine-config"]["mem_size_mib"], 128);
        assert_eq!(json["boot-source"]["boot_args"], "quiet");
    }
}
