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
    /// open(2) or fstat(2) failed.
    #[error("cannot open")]
    Open(#[source] std::io::Error),
    /// The file exists but is of a type this use does not take.
    #[error("is {found}, not {wanted}")]
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
                _ => HostFileError::Open(e),
            })
        }
    };
    let file_type = file.metadata().map_err(HostFileError::Open)?.file_type();
    if !(accepts.accepts)(&file_type) {
        return Err(wrong_type(file_type));
    }
    Ok(file)
}

/// Opens a regular file for reading.
pub fn open_regular(path: &Path) -> Result<File, HostFileError> {
    open(OpenOptions::new().read(true), path, REGULAR)
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
        assert!(matches!(open_regular(Path::new("/nonexistent")), Err(HostFileError::Open(_))));
    }
}
