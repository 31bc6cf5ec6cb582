//! Initramfs archives for `samepage boot-test`: a newc cpio writer, the cached base archive
//! (Debian's busybox-static and the boot-test /init), and the small per-run archive holding
//! the command. Linux unpacks concatenated cpio archives in order, so the two are simply
//! joined.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::host_files::GuestEntry;

/// The boot-test /init script.
const BOOT_TEST_INIT: &str = include_str!("../../resources/boot-test/init");
/// Where Debian's busybox-static installs its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// Largest busybox accepted (Debian's static one is about 2 MiB).
pub const MAX_BUSYBOX_BYTES: u64 = 32 << 20;

/// Errors while building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// busybox missing or unreadable.
    #[error("cannot read busybox at {path} (install Debian's busybox-static)")]
    Busybox {
        /// The path tried.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// busybox is dynamically linked: it would not run in an initramfs without libc.
    #[error("{0} is not statically linked (install Debian's busybox-static)")]
    NotStatic(PathBuf),
    /// busybox is a device, FIFO or directory.
    #[error("busybox {0} is not a regular file")]
    BusyboxNotRegular(PathBuf),
    /// busybox is larger than any busybox.
    #[error("busybox {path} has {size} bytes, more than the {MAX_BUSYBOX_BYTES} accepted")]
    BusyboxTooBig {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// `busybox --list` failed.
    #[error("cannot list the applets of {0}")]
    Applets(PathBuf),
    /// Cache directory or file could not be written.
    #[error("cannot write initramfs cache {path}")]
    Cache {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// File type bits of `st_mode` (inode(7)).
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Builds a cpio archive in the "newc" format (the one Linux unpacks: Documentation/
/// driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_inode: u32,
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        CpioWriter { out: Vec::new(), next_inode: 1 }
    }

    fn pad4(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let inode = self.next_inode;
        self.next_inode += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields =
            [inode, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
        self.out.extend_from_slice(data);
        self.pad4();
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0));
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, data, (0, 0));
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, target.as_bytes(), (0, 0));
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | perm, &[], (major, minor));
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

/// Whether an ELF file has no PT_INTERP program header (is statically linked).
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read = |at: usize, len: usize| bytes.get(at..at + len);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (read(0x20, 8), read(0x36, 2), read(0x38, 2)) else {
        return false;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().unwrap_or_default()) as usize;
    let phentsize = u16::from_le_bytes(phentsize.try_into().unwrap_or_default()) as usize;
    let phnum = u16::from_le_bytes(phnum.try_into().unwrap_or_default()) as usize;
    bytes.starts_with(b"\x7fELF")
        && (0..phnum).all(|i| {
            read(phoff + i * phentsize, 4)
                .map(|t| u32::from_le_bytes(t.try_into().unwrap_or_default()) != PT_INTERP)
                .unwrap_or(false)
        })
}

/// Checks that `busybox` is a regular file of a sane size (not /dev/zero, not a FIFO).
fn busybox_metadata(busybox: &Path) -> Result<fs::Metadata, InitramfsError> {
    let meta =
        fs::metadata(busybox).map_err(|source| InitramfsError::Busybox { path: busybox.into(), source })?;
    if !meta.is_file() {
        return Err(InitramfsError::BusyboxNotRegular(busybox.into()));
    }
    if meta.len() > MAX_BUSYBOX_BYTES {
        return Err(InitramfsError::BusyboxTooBig { path: busybox.into(), size: meta.len() });
    }
    Ok(meta)
}

/// Reads busybox, at most [`MAX_BUSYBOX_BYTES`] (the file may change after the check).
fn read_busybox(busybox: &Path) -> Result<Vec<u8>, InitramfsError> {
    let read_error = |source| InitramfsError::Busybox { path: busybox.into(), source };
    let file = fs::File::open(busybox).map_err(read_error)?;
    if !file.metadata().map_err(read_error)?.is_file() {
        return Err(InitramfsError::BusyboxNotRegular(busybox.into()));
    }
    let mut binary = Vec::new();
    file.take(MAX_BUSYBOX_BYTES + 1).read_to_end(&mut binary).map_err(read_error)?;
    if binary.len() as u64 > MAX_BUSYBOX_BYTES {
        return Err(InitramfsError::BusyboxTooBig { path: busybox.into(), size: binary.len() as u64 });
    }
    Ok(binary)
}

/// The base archive: busybox with a link per applet, /init, and the directories and device
/// nodes a console needs before devtmpfs is mounted.
pub fn base_archive(busybox: &Path) -> Result<Vec<u8>, InitramfsError> {
    busybox_metadata(busybox)?;
    let binary = read_busybox(busybox)?;
    if !is_static_elf(&binary) {
        return Err(InitramfsError::NotStatic(busybox.into()));
    }
    let listing = Command::new(busybox)
        .arg("--list-full")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .ok_or_else(|| InitramfsError::Applets(busybox.into()))?;
    let mut cpio = CpioWriter::new();
    for dir in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "samepage"]
    {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.char_device("dev/null", 0o666, 1, 3);
    cpio.file("bin/busybox", 0o755, &binary);
    for applet in String::from_utf8_lossy(&listing.stdout).lines().map(str::trim) {
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let depth = applet.matches('/').count();
        cpio.symlink(applet, &format!("{}bin/busybox", "../".repeat(depth)));
    }
    cpio.file("init", 0o755, BOOT_TEST_INIT.as_bytes());
    Ok(cpio.finish())
}

/// The per-run archive: the host files, then the command as /samepage/exec.sh.
pub fn exec_archive(command: &str, files: &[GuestEntry]) -> Vec<u8> {
    let mut cpio = CpioWriter::new();
    for entry in files {
        match entry {
            GuestEntry::Dir(path) => cpio.dir(path),
            GuestEntry::File(path, mode, data) => cpio.file(path, *mode, data),
            GuestEntry::Symlink(path, target) => cpio.symlink(path, target),
        }
    }
    cpio.file("samepage/exec.sh", 0o755, format!("{command}\n").as_bytes());
    cpio.finish()
}

/// Where built archives are cached: `$SAMEPAGE_CACHE_DIR`, else `$XDG_CACHE_HOME/samepage`,
/// else `~/.cache/samepage`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SAMEPAGE_CACHE_DIR") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("samepage")
}

/// The boot-test initramfs for `command` and the host `files`: the cached base archive
/// (rebuilt when busybox or /init change) followed by the run's archive.
pub fn boot_test_initramfs(
    busybox: &Path,
    command: &str,
    files: &[GuestEntry],
) -> Result<Vec<u8>, InitramfsError> {
    boot_test_initramfs_cached_in(&cache_dir(), busybox, command, files)
}

fn boot_test_initramfs_cached_in(
    dir: &Path,
    busybox: &Path,
    command: &str,
    files: &[GuestEntry],
) -> Result<Vec<u8>, InitramfsError> {
    let cache_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitramfsError::Cache { path, source }
    };
    let binary_meta = busybox_metadata(busybox)?;
    let key = blake3::hash(
        format!(
            "{}:{}:{:?}:{BOOT_TEST_INIT}",
            busybox.display(),
            binary_meta.len(),
            binary_meta.modified().ok()
        )
        .as_bytes(),
    );
    let cached = dir.join(format!("boot-test-base-{}.cpio", &key.to_hex()[..16]));
    let base = match fs::read(&cached) {
        Ok(bytes) => bytes,
        Err(_) => {
            let bytes = base_archive(busybox)?;
            fs::create_dir_all(dir).map_err(cache_error(dir))?;
            // A name of our own: concurrent runs may build the same archive at once, and the
            // last rename wins with identical bytes.
            static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let build = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let partial = cached.with_extension(format!("partial.{}.{build}", std::process::id()));
            fs::write(&partial, &bytes).map_err(cache_error(&partial))?;
            fs::rename(&partial, &cached).map_err(cache_error(&cached))?;
            bytes
        }
    };
    let mut joined = base;
    joined.extend(exec_archive(command, files));
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut cpio = CpioWriter::new();
        cpio.file("a", 0o644, b"hello");
        cpio.symlink("b", "a");
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("hello") && text.contains("TRAILER!!!"));
        // Mode of the first entry: regular file 0644.
        assert_eq!(&bytes[14..22], b"000081a4");
        // File size field.
        assert_eq!(&bytes[54..62], b"00000005");
    }

    #[test]
    fn exec_archive_holds_the_command() {
        let bytes = exec_archive("uname -r; exit 7", &[]);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("samepage/exec.sh") && text.contains("uname -r; exit 7\n"));
    }

    #[test]
    fn concurrent_runs_share_the_cache() {
        let dir = std::env::temp_dir().join(format!("samepage-cache-test-{}", std::process::id()));
        let busybox = Path::new(DEFAULT_BUSYBOX);
        if !busybox.exists() {
            panic!("{DEFAULT_BUSYBOX} is missing: install Debian's busybox-static (scripts/setup-host.sh)");
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || boot_test_initramfs_cached_in(&dir, busybox, "true", &[]))
            })
            .collect();
        for thread in threads {
            let archive = thread.join().expect("thread").expect("initramfs");
            assert!(archive.len() > 1 << 20);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn busybox_must_be_a_regular_file_of_sane_size() {
        assert!(matches!(
            busybox_metadata(Path::new("/dev/zero")),
            Err(InitramfsError::BusyboxNotRegular(_))
        ));
        assert!(matches!(busybox_metadata(Path::new("/")), Err(InitramfsError::BusyboxNotRegular(_))));
        assert!(matches!(read_busybox(Path::new("/dev/zero")), Err(InitramfsError::BusyboxNotRegular(_))));
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"not an elf"));
        let me = fs::read("/proc/self/exe").expect("read self");
        // Test binaries link glibc dynamically.
        assert!(!is_static_elf(&me));
    }
}
