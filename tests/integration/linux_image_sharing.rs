//! Read-only image sharing with the project's Linux guest: two VMs, each its own `samepage
//! run` process, boot from one ext4 image opened `--disk IMG,ro` (shared page by page, the
//! default) and read the same 8 MiB file. Their reads map the image's pages instead of copying
//! them, so the host holds the file once, in its page cache: the test shows it from both VMM
//! processes' smaps and pagemap (the same host page frames, those of the image's page cache),
//! and both guests' SHA-256 of the file match the host's. The VMs run with `--dedup off`: with
//! merging on, the guests' reports would move these pages into the store (merged by content,
//! `image_content.rs`), and the test looks at the image's own sharing.

use crate::common;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::linux::{
    file_mappings, file_pfns, guest_sha256, kernel_and_initrd, make_ext4, metric, read_metrics, sha256,
    FileMappings, LiveVm,
};
use common::{make_image, tempdir};

const DATA_BYTES: usize = 8 << 20;
const DATA_PAGES: u64 = (DATA_BYTES / 4096) as u64;
const MIB: f64 = 1048576.0;
const VMS: usize = 2;

/// Guest-side script, run by the guest's /init as `sh /mnt/share.sh` (`samepage.script=`).
/// It waits on its console while the test looks at the host's memory.
const GUEST_SCRIPT: &str =
    "# Run by the guest's /init (samepage.script=share.sh), in /mnt (the disk, read-only).\n\
                            sha256sum data || exit 2\n\
                            echo 'share: read'\n\
                            read -r _\n";

const GUEST_TIMEOUT_S: u64 = 540;
/// Both guests boot and read at once: ~25 s to /init and ~15 s to read alone on an emulating
/// host, ~90 s for both together, ~160 s beside another Linux guest.
const LIMIT: Duration = Duration::from_secs(GUEST_TIMEOUT_S);

/// The page frames of the image file's page cache: the test maps the image and touches each
/// page, then reads its own pagemap.
fn page_cache_pfns(image: &Path) -> BTreeSet<u64> {
    let file = std::fs::File::open(image).expect("open image");
    let len = file.metadata().expect("image size").len() as usize;
    // SAFETY: a new private read-only mapping of a file we opened, at an address the kernel
    // picks; nothing else refers to it, and it is unmapped below before `file` is dropped.
    let addr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0)
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap {}: {}", image.display(), std::io::Error::last_os_error());
    let base = addr as usize;
    for offset in (0..len).step_by(4096) {
        // SAFETY: `offset` is inside the mapping made above, which is readable.
        unsafe { std::ptr::read_volatile((base + offset) as *const u8) };
    }
    let pfns = file_pfns(std::process::id(), base as u64, (base + len) as u64);
    // SAFETY: unmaps exactly the mapping made above; no reference into it remains.
    unsafe { libc::munmap(addr, len) };
    pfns
}

#[test]
fn two_linux_guests_reading_one_read_only_image_hold_one_copy_of_it() {
    let started = Instant::now();
    let (kernel, initrd) = kernel_and_initrd();
    let tmp = tempdir();
    let root = tmp.as_path();
    let content = root.join("content");
    std::fs::create_dir_all(&content).expect("mkdir");
    make_image(&content.join("data"), DATA_BYTES, 0x5a4e_d000);
    std::fs::write(content.join("share.sh"), GUEST_SCRIPT).expect("write share.sh");
    let image = root.join("img");
    make_ext4(&content, &image, "16M");
    let image = image.canonicalize().expect("image path");
    let disk = format!("{},ro", image.display());
    let timeout = GUEST_TIMEOUT_S.to_string();
    let metrics: Vec<_> = (0..VMS).map(|i| root.join(format!("vm{i}.json"))).collect();
    let mut vms: Vec<LiveVm> = (0..VMS)
        .map(|i| {
            LiveVm::start(&[
                "--kernel",
                kernel.to_str().expect("path"),
                "--initrd",
                initrd.to_str().expect("path"),
                "--mem",
                "64M",
                "--disk",
                &disk,
                "--cmdline",
                "samepage.script=share.sh",
                "--name",
                &format!("vm{i}"),
                "--metrics",
                metrics[i].to_str().expect("path"),
                "--timeout",
                &timeout,
                "--dedup",
                "off",
            ])
        })
        .collect();

    // Both guests have read the file and wait.
    for vm in &mut vms {
        vm.wait_for_line("share: read", LIMIT.saturating_sub(started.elapsed()));
    }
    let read_at = started.elapsed();
    let maps: Vec<FileMappings> = vms.iter().map(|vm| file_mappings(vm.pid(), &image)).collect();
    let cache = page_cache_pfns(&image);
    let mut runs = Vec::new();
    for (i, mut vm) in vms.into_iter().enumerate() {
        let pid = vm.pid();
        vm.send("done");
        let run = vm.finish(Duration::from_secs(120));
        let last = read_metrics(&metrics[i]).unwrap_or_else(|| panic!("no metrics from vm{i}"));
        runs.push((pid, run, last));
    }

    let expected = sha256(&std::fs::read(content.join("data")).expect("read data"));
    println!("host sha256 of the 8 MiB file: {expected}");
    for (i, (m, (pid, _, last))) in maps.iter().zip(&runs).enumerate() {
        println!(
            "vm{i} (pid {pid}): {} VMAs map the image: Rss {:.2} MiB, Shared_Clean {:.2} MiB, Anonymous {:.2} MiB, \
             {} image page frames; {} guest pages map the image, {} merged by content",
            m.vmas,
            m.rss as f64 / MIB,
            m.shared_clean as f64 / MIB,
            m.anonymous as f64 / MIB,
            m.pfns.len(),
            metric(last, "/dedup/image_pages"),
            metric(last, "/dedup/image_merged"),
        );
    }
    let common_pfns: BTreeSet<u64> = maps[0].pfns.intersection(&maps[1].pfns).copied().collect();
    let in_cache = common_pfns.intersection(&cache).count();
    println!(
        "page frames both VMMs map from the image: {} ({:.2} MiB), {in_cache} of them the image's page cache \
         ({} frames for the 16 MiB image)",
        common_pfns.len(),
        common_pfns.len() as f64 * 4096.0 / MIB,
        cache.len()
    );

    // Each VMM maps the whole file from the image, unwritten, and the two map the same host
    // pages: the image's page cache. (Page frame numbers show only to root, as which the
    // README's test command runs.)
    for (i, m) in maps.iter().enumerate() {
        assert!(m.rss >= DATA_BYTES as u64, "vm{i} maps less than the file from the image: {m:?}");
        assert!(m.shared_clean >= DATA_BYTES as u64, "vm{i}'s image pages are not shared: {m:?}");
        assert!(m.anonymous < DATA_BYTES as u64 / 16, "vm{i} copied image pages: {m:?}");
    }
    assert!(
        common_pfns.len() as u64 >= DATA_PAGES,
        "the VMMs map {} common image page frames, fewer than the file's {DATA_PAGES} pages (run as root?)",
        common_pfns.len()
    );
    assert_eq!(in_cache, common_pfns.len(), "image pages the VMMs map that are not the image's page cache");

    // Both guests read the file as the host has it.
    for (i, (_, run, _)) in runs.iter().enumerate() {
        let got = guest_sha256(&run.stdout, "data");
        println!("vm{i} guest sha256 of the file: {}", got.as_deref().unwrap_or("(none)"));
        run.assert_no_panic();
        assert_eq!(run.code, Some(0), "vm{i} failed:\n{}\nstderr:\n{}", run.stdout, run.stderr);
        assert_eq!(got.as_deref(), Some(expected.as_str()), "vm{i} read other data:\n{}", run.stdout);
    }
    println!(
        "image sharing test: both guests had read the file at {read_at:.0?}, done at {:.0?}",
        started.elapsed()
    );
}
