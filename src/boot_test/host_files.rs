//! Host files for the boot-test guest (`--include`, `--include-binary`): read from the host,
//! checked against a size limit, and turned into entries of the per-run initramfs.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

/// Errors while collecting the host files `--include` and `--include-binary` name.
#[derive(Debug, thiserror::Error)]
pub enum IncludeError {
    /// A host file or directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A FIFO, socket or device: nothing an initramfs can hold.
    #[error("cannot include {0}: not a regular file, directory or symbolic link")]
    Special(PathBuf),
    /// The files do not fit.
    #[error("included files exceed {limit} bytes (at {path}); use fewer files or raise --mem")]
    TooBig {
        /// Where the limit was crossed.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// A guest path that is not absolute and plain.
    #[error("guest path {0:?} must be absolute, without '.' or '..'")]
    GuestPath(String),
    /// A guest path that the guest's /init mounts over.
    #[error("guest path {0:?} is under /{1}, which the guest mounts over; give another (HOST:GUEST)")]
    MountedOver(String, &'static str),
    /// A host path that is not UTF-8 (the guest path is made from it).
    #[error("{0} is not valid UTF-8; give a guest path (HOST:GUEST)")]
    NotUtf8(PathBuf),
    /// `ldd` could not run.
    #[error("cannot run ldd on {path}")]
    Ldd {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A library the binary needs is missing on the host.
    #[error("{binary} needs {library}, which ldd cannot find")]
    MissingLibrary {
        /// The binary.
        binary: PathBuf,
        /// The library's name.
        library: String,
    },
}

/// `HOST_PATH[:GUEST_PATH]` from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncludeSpec {
    /// The host file or directory.
    pub host: PathBuf,
    /// Where it goes in the guest; `None`: the same absolute path as on the host.
    pub guest: Option<String>,
}

impl FromStr for IncludeSpec {
    type Err = IncludeError;

    /// The last `:` followed by `/` separates the guest path, so host paths with colons
    /// still work.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.rsplit_once(":/") {
            Some((host, guest)) if !host.is_empty() => {
                let guest = format!("/{guest}");
                guest_relative(&guest)?;
                Ok(IncludeSpec { host: host.into(), guest: Some(guest) })
            }
            _ => Ok(IncludeSpec { host: text.into(), guest: None }),
        }
    }
}

/// One entry of the guest's file tree, its path relative to `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEntry {
    /// A directory.
    Dir(String),
    /// A regular file with its permission bits.
    File(String, u32, Vec<u8>),
    /// A symbolic link to a target.
    Symlink(String, String),
}

/// Directories the boot-test /init mounts file systems on (resources/boot-test/init).
const MOUNTED_OVER: [&str; 3] = ["proc", "sys", "dev"];

/// `/a/b` as `a/b`, refusing relative paths, `.`/`..`, and places /init mounts over.
fn guest_relative(path: &str) -> Result<String, IncludeError> {
    let bad = || IncludeError::GuestPath(path.to_string());
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(bad());
    }
    if let Some(top) = MOUNTED_OVER.iter().find(|top| parts[0] == **top) {
        return Err(IncludeError::MountedOver(path.to_string(), top));
    }
    Ok(parts.join("/"))
}

/// Collects guest entries within a byte budget for regular files.
pub struct GuestFiles {
    entries: Vec<GuestEntry>,
    dirs: BTreeSet<String>,
    paths: BTreeSet<String>,
    bytes: u64,
    limit: u64,
}

impl GuestFiles {
    /// Nothing yet; regular files may add up to `limit` bytes.
    pub fn new(limit: u64) -> Self {
        GuestFiles { entries: Vec::new(), dirs: BTreeSet::new(), paths: BTreeSet::new(), bytes: 0, limit }
    }

    /// The entries, each after the directories above it.
    pub fn into_entries(self) -> Vec<GuestEntry> {
        self.entries
    }

    /// Bytes of file data so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn parents(&mut self, guest: &str) {
        let mut end = 0;
        while let Some(slash) = guest[end..].find('/') {
            end += slash;
            let dir = &guest[..end];
            if self.dirs.insert(dir.to_string()) {
                self.entries.push(GuestEntry::Dir(dir.to_string()));
            }
            end += 1;
        }
    }

    fn push(&mut self, entry: GuestEntry) {
        let path = match &entry {
            GuestEntry::Dir(p) | GuestEntry::File(p, _, _) | GuestEntry::Symlink(p, _) => p.clone(),
        };
        self.parents(&path);
        if let GuestEntry::Dir(dir) = &entry {
            if !self.dirs.insert(dir.clone()) {
                return;
            }
        } else if !self.paths.insert(path) {
            // The same guest path twice (a library two binaries need): the first wins.
            return;
        }
        self.entries.push(entry);
    }

    /// Reads a regular file, at most what is left of the budget (a file may grow, or
    /// report a size of 0 as /proc files do).
    fn read_file(&mut self, host: &Path) -> Result<Vec<u8>, IncludeError> {
        let read_error = |source| IncludeError::Read { path: host.to_path_buf(), source };
        let left = self.limit.saturating_sub(self.bytes);
        let file = fs::File::open(host).map_err(read_error)?;
        let mut data = Vec::new();
        file.take(left.saturating_add(1)).read_to_end(&mut data).map_err(read_error)?;
        self.bytes += data.len() as u64;
        if self.bytes > self.limit {
            return Err(IncludeError::TooBig { path: host.to_path_buf(), limit: self.limit });
        }
        Ok(data)
    }

    /// Adds a host file or directory tree (symbolic links inside it stay links; the path
    /// itself is followed) at `guest` (relative to `/`).
    pub fn add_path(&mut self, host: &Path, guest: &str) -> Result<(), IncludeError> {
        let meta = fs::metadata(host).map_err(|source| IncludeError::Read { path: host.into(), source })?;
        self.add_with_metadata(host, guest, &meta)
    }

    fn add_with_metadata(
        &mut self,
        host: &Path,
        guest: &str,
        meta: &fs::Metadata,
    ) -> Result<(), IncludeError> {
        let kind = meta.file_type();
        if kind.is_dir() {
            self.push(GuestEntry::Dir(guest.to_string()));
            let read_error = |source| IncludeError::Read { path: host.to_path_buf(), source };
            let mut children: Vec<_> =
                fs::read_dir(host).map_err(read_error)?.collect::<Result<_, _>>().map_err(read_error)?;
            children.sort_by_key(|c| c.file_name());
            for child in children {
                let path = child.path();
                let name =
                    child.file_name().into_string().map_err(|_| IncludeError::NotUtf8(path.clone()))?;
                let meta = fs::symlink_metadata(&path)
                    .map_err(|source| IncludeError::Read { path: path.clone(), source })?;
                self.add_with_metadata(&path, &format!("{guest}/{name}"), &meta)?;
            }
        } else if kind.is_symlink() {
            let target =
                fs::read_link(host).map_err(|source| IncludeError::Read { path: host.into(), source })?;
            let target =
                target.into_os_string().into_string().map_err(|_| IncludeError::NotUtf8(host.into()))?;
            self.push(GuestEntry::Symlink(guest.to_string(), target));
        } else if kind.is_file() {
            if meta.len() > self.limit.saturating_sub(self.bytes) {
                return Err(IncludeError::TooBig { path: host.to_path_buf(), limit: self.limit });
            }
            let data = self.read_file(host)?;
            self.push(GuestEntry::File(guest.to_string(), meta.permissions().mode() & 0o7777, data));
        } else if kind.is_fifo() || kind.is_socket() || kind.is_block_device() || kind.is_char_device() {
            return Err(IncludeError::Special(host.to_path_buf()));
        }
        Ok(())
    }

    /// Adds `--include` items.
    pub fn add_spec(&mut self, spec: &IncludeSpec) -> Result<(), IncludeError> {
        let guest = guest_path_of(spec)?;
        self.add_path(&spec.host, &guest)
    }

    /// Adds an `--include-binary` item: the binary, and the shared libraries and loader
    /// `ldd` lists, each at its host path.
    pub fn add_binary(&mut self, spec: &IncludeSpec) -> Result<(), IncludeError> {
        self.add_spec(spec)?;
        for library in shared_libraries(&spec.host)? {
            let guest = host_path_in_guest(&library)?;
            self.add_path(&library, &guest)?;
        }
        Ok(())
    }
}

/// The guest path of an include: the one given, or the host path made absolute.
fn guest_path_of(spec: &IncludeSpec) -> Result<String, IncludeError> {
    match &spec.guest {
        Some(guest) => guest_relative(guest),
        None => host_path_in_guest(&spec.host),
    }
}

fn host_path_in_guest(host: &Path) -> Result<String, IncludeError> {
    let absolute = std::path::absolute(host)
        .map_err(|source| IncludeError::Read { path: host.to_path_buf(), source })?;
    let mut parts = Vec::new();
    for component in absolute.components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or_else(|| IncludeError::NotUtf8(host.to_path_buf()))?)
            }
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    guest_relative(&format!("/{}", parts.join("/")))
}

/// Paths of the shared objects `ldd` lists for `binary` (none for a static binary).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, IncludeError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| IncludeError::Ldd { path: binary.to_path_buf(), source })?;
    parse_ldd(&String::from_utf8_lossy(&out.stdout), binary)
}

/// Parses `ldd` output: "name => /path (0x...)", "/path (0x...)", "name (0x...)" (the vDSO,
/// no file), "name => not found", or "not a dynamic executable"/"statically linked".
fn parse_ldd(text: &str, binary: &Path) -> Result<Vec<PathBuf>, IncludeError> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim) {
        let target = match line.split_once(" => ") {
            Some((name, rest)) => {
                if rest.trim_start().starts_with("not found") {
                    return Err(IncludeError::MissingLibrary {
                        binary: binary.into(),
                        library: name.to_string(),
                    });
                }
                rest
            }
            None => line,
        };
        let path = target.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_specs() {
        let spec: IncludeSpec = "./a.out".parse().expect("spec");
        assert_eq!(spec, IncludeSpec { host: "./a.out".into(), guest: None });
        let spec: IncludeSpec = "dir/x:y:/opt/t".parse().expect("spec");
        assert_eq!(spec, IncludeSpec { host: "dir/x:y".into(), guest: Some("/opt/t".into()) });
        assert!("a:/../etc".parse::<IncludeSpec>().is_err());
        assert!(guest_relative("relative").is_err());
        assert!(matches!(guest_relative("/proc/x"), Err(IncludeError::MountedOver(..))));
        assert_eq!(guest_relative("/a//b/").expect("path"), "a/b");
    }

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let paths = parse_ldd(text, Path::new("t")).expect("parse");
        assert_eq!(
            paths,
            [PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), "/lib64/ld-linux-x86-64.so.2".into()]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n", Path::new("t")).expect("static").is_empty());
        let missing = parse_ldd("\tlibnope.so.1 => not found\n", Path::new("t"));
        assert!(matches!(missing, Err(IncludeError::MissingLibrary { .. })));
    }

    #[test]
    fn directories_keep_links_and_parents_come_first() {
        let dir =
            vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/samepage-hostfiles-").expect("tempdir");
        let root = dir.as_path();
        fs::create_dir(root.join("sub")).expect("mkdir");
        fs::write(root.join("sub/f"), b"data").expect("write");
        fs::set_permissions(root.join("sub/f"), fs::Permissions::from_mode(0o640)).expect("chmod");
        std::os::unix::fs::symlink("f", root.join("sub/l")).expect("symlink");
        let mut files = GuestFiles::new(1 << 20);
        files.add_path(root, "opt/t").expect("add");
        let entries = files.into_entries();
        assert_eq!(
            entries,
            [
                GuestEntry::Dir("opt".into()),
                GuestEntry::Dir("opt/t".into()),
                GuestEntry::Dir("opt/t/sub".into()),
                GuestEntry::File("opt/t/sub/f".into(), 0o640, b"data".to_vec()),
                GuestEntry::Symlink("opt/t/sub/l".into(), "f".into()),
            ]
        );
    }

    #[test]
    fn limits_and_special_files() {
        let mut files = GuestFiles::new(3);
        assert!(matches!(
            files.add_path(Path::new("/proc/self/status"), "s"),
            Err(IncludeError::TooBig { .. })
        ));
        let mut files = GuestFiles::new(1 << 20);
        assert!(matches!(files.add_path(Path::new("/dev/zero"), "z"), Err(IncludeError::Special(_))));
    }
}
