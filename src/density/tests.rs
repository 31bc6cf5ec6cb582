//! The density module's own tests: each VM's configuration from the template, and the
//! result line.

use super::*;
use crate::config::{DedupConfig, DiskConfig, EmulatedCpl0};

#[test]
fn each_vm_gets_its_own_disk_path_and_command_line() {
    let template = VmConfig {
        kernel: "k".into(),
        initrd: None,
        cmdline: "a".into(),
        mem_bytes: 256 << 20,
        vcpus: 1,
        disks: vec![DiskConfig::new("/img/disk-{vm}.ext4", false), DiskConfig::new("/img/base.img", true)],
        serial: SerialConfig::Stdout,
        timeout: None,
        emulated_cpl0: EmulatedCpl0::Off,
        dedup: DedupConfig::default(),
        balloon: None,
        balloon_socket: Some("/run/vm-{vm}.balloon".into()),
        snapshot: None,
        entropy: false,
        vsock: None,
        nets: Vec::new(),
    };
    let config = DensityConfig {
        vms: 4,
        template,
        console_dir: None,
        progress_every: Duration::from_secs(1),
        vm_cmdlines: vec![(3, "b".into())],
        threads: true,
        restore: None,
    };
    let vm3 = config_for(&config, 3);
    assert_eq!(vm3.disks[0].path, PathBuf::from("/img/disk-3.ext4"));
    assert_eq!(vm3.disks[1].path, PathBuf::from("/img/base.img"));
    assert_eq!((vm3.serial, vm3.cmdline.as_str()), (SerialConfig::None, "a b"));
    assert_eq!(config_for(&config, 2).cmdline, "a");
    assert_eq!(vm3.balloon_socket, Some(PathBuf::from("/run/vm-3.balloon")));
}

#[test]
fn one_balloon_socket_for_several_vms_is_refused() {
    let template = VmConfig {
        kernel: "k".into(),
        initrd: None,
        cmdline: String::new(),
        mem_bytes: 256 << 20,
        vcpus: 1,
        disks: Vec::new(),
        serial: SerialConfig::None,
        timeout: None,
        emulated_cpl0: EmulatedCpl0::Off,
        dedup: DedupConfig::default(),
        balloon: Some(crate::balloon::BalloonOptions::default()),
        balloon_socket: Some("/run/one.balloon".into()),
        snapshot: None,
        entropy: false,
        vsock: None,
        nets: Vec::new(),
    };
    let mut config = DensityConfig {
        vms: 2,
        template,
        console_dir: None,
        progress_every: Duration::from_secs(1),
        vm_cmdlines: Vec::new(),
        threads: true,
        restore: None,
    };
    assert!(matches!(run(&config), Err(DensityError::Config(ConfigError::BalloonSocketShared(_)))));
    config.vms = 1;
    assert_eq!(config_for(&config, 0).balloon_socket, Some(PathBuf::from("/run/one.balloon")));
}
