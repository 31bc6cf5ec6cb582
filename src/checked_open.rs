//! Files named on the command line, opened without ever blocking and checked for their type.
//!
//! open(2) of a FIFO waits for the other end (forever, past `--timeout` and signals, which
//! samepage only looks at once the VM runs), so every file is opened with `O_NONBLOCK` and its
//! type is checked on the open descriptor before anything reads or writes it.

use std::fs::{File, FileType, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a file named on the command line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    /// open(2), fstat(2), or the copy of [`copy_to_output`] failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The file exists but is of a type this use does not take.
    #[error("it is {found}, not {wanted}")]
    WrongType {
        /// What it is, e.g. "a FIFO".
        found: &'static str,
        /// What this use takes, e.g. "a regular file".
        wanted: &'static str,
    },
}

/// What a file is, for messages.
pub fn describe(file_type: FileType) -> &'static str {
    if file_type.is_file() {
        "a regular file"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// Which file types a use takes, and how to name them in messages.
#[derive(Debug, Clone, Copy)]
pub struct Accepts {
    /// Whether a file of this type is taken.
    pub accepts: fn(&FileType) -> bool,
    /// The types taken, for messages ("a regular file").
    pub wanted: &'static str,
}

/// Regular files only: images read whole (kernel, initrd).
pub const REGULAR: Accepts = Accepts { accepts: FileType::is_file, wanted: "a regular file" };

/// Where output goes (console, logs, results): a regular file or a character device such as
/// /dev/null or a terminal. Not a FIFO or socket: nothing guarantees their reader keeps up,
/// and a full pipe would stop whichever thread writes to it (a vCPU, for the console).
pub const OUTPUT: Accepts =
    Accepts { accepts: |t| t.is_file() || t.is_char_device(), wanted: "a regular file or character device" };

/// Opens `path` with `options` plus `O_NONBLOCK | O_NOCTTY` and checks its type. `O_NONBLOCK`
/// stays set: it changes nothing for regular files, and other accepted types (character
/// devices) must not block the thread that writes them either.
pub fn open(options: &mut OpenOptions, path: &Path, accepts: Accepts) -> Result<File, HostFileError> {
    let wrong_type =
        |file_type: FileType| HostFileError::WrongType { found: describe(file_type), wanted: accepts.wanted };
    let file = match options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path) {
        Ok(file) => file,
        // A FIFO without a reader (ENXIO) or a directory opened for writing (EISDIR) fails
        // here; its type is the better reason.
        Err(e) => {
            return Err(match std::fs::metadata(path) {
                Ok(meta) if !(accepts.accepts)(&meta.file_type()) => wrong_type(meta.file_type()),
                _ => HostFileError::Io(e),
            })
        }
    };
    let file_type = file.metadata().map_err(HostFileError::Io)?.file_type();
    if !(accepts.accepts)(&file_type) {
        return Err(wrong_type(file_type));
    }
    Ok(file)
}

/// Opens a regular file for reading.
pub fn open_regular(path: &Path) -> Result<File, HostFileError> {
    open(OpenOptions::new().read(true), path, REGULAR)
}

/// Opens an [`OUTPUT`] file to append to, creating it if needed.
pub fn append_output(path: &Path) -> Result<File, HostFileError> {
    open(OpenOptions::new().create(true).append(true), path, OUTPUT)
}

/// Creates an [`OUTPUT`] file, or truncates it.
pub fn create_output(path: &Path) -> Result<File, HostFileError> {
    open(OpenOptions::new().create(true).write(true).truncate(true), path, OUTPUT)
}

/// Copies the file at `from` to a new [`OUTPUT`] file at `to` (as `std::fs::copy`, without
/// blocking on a FIFO at `to`).
pub fn copy_to_output(from: &Path, to: &Path) -> Result<u64, HostFileError> {
    let mut out = create_output(to)?;
    Ok(std::io::copy(&mut File::open(from)?, &mut out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_and_devices_are_not_regular_files() {
        let err = open_regular(Path::new("/")).expect_err("a directory");
        assert!(matches!(err, HostFileError::WrongType { found: "a directory", .. }), "{err}");
        let err = open_regular(Path::new("/dev/null")).expect_err("a device");
        assert!(matches!(err, HostFileError::WrongType { found: "a character device", .. }), "{err}");
        assert!(matches!(open_regular(Path::new("/nonexistent")), Err(HostFileError::Io(_))));
    }

    #[test]
    fn outputs_are_files_or_character_devices_and_fifos_do_not_block() {
        let dir =
            vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/samepage-checked-open-").expect("tempdir");
        let fifo = dir.as_path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().expect("path")).expect("no NUL");
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let err = create_output(&fifo).expect_err("a FIFO without reader");
        assert!(matches!(err, HostFileError::WrongType { found: "a FIFO", .. }), "{err}");
        // With a reader, open(2) would succeed: the type check still refuses it.
        let _reader = open(OpenOptions::new().read(true), &fifo, Accepts { accepts: |_| true, wanted: "" });
        let err = append_output(&fifo).expect_err("a FIFO with a reader");
        assert!(matches!(err, HostFileError::WrongType { found: "a FIFO", .. }), "{err}");
        assert!(append_output(Path::new("/dev/null")).is_ok());
        let (from, to) = (dir.as_path().join("from"), dir.as_path().join("to"));
        std::fs::write(&from, b"archive").expect("write");
        assert_eq!(copy_to_output(&from, &to).expect("copy"), 7);
        assert_eq!(std::fs::read(&to).expect("read"), b"archive");
        assert!(copy_to_output(&from, &fifo).is_err());
    }
}
