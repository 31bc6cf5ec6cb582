//! Tap devices for virtio-net (`--net tap=NAME` or `fd=N`): `/dev/net/tun` attached to the
//! named interface as `IFF_TAP | IFF_NO_PI` (one Ethernet frame per read and write, no packet
//! information, no virtio-net header: the device offers no offloads), non-blocking.
//!
//! Attaching to a tap needs `CAP_NET_ADMIN`, or a persistent tap its owner made for this user
//! (`ip tuntap add dev NAME mode tap user USER`). A descriptor passed in (`fd=N`, as an
//! orchestrator that made the tap hands it over) must be a tap in that mode.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Longest interface name (`IFNAMSIZ` less its NUL).
pub const MAX_NAME: usize = libc::IFNAMSIZ - 1;

/// `TUNSETIFF` and `TUNGETIFF` (`linux/if_tun.h`): `_IOW('T', 202, int)`, `_IOR('T', 210, unsigned int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// Why a tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or holds a NUL, `/` or space.
    #[error("invalid tap name '{0}': 1 to 15 bytes, no NUL, '/' or space")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    /// Attaching to the interface failed (no such tap and no right to make one, busy, or not
    /// a tap).
    #[error("cannot attach to tap {name} (it needs CAP_NET_ADMIN, or a persistent tap made for this user)")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A descriptor passed in that is not an open tap in the right mode.
    #[error("descriptor {fd} is not a tap opened as IFF_TAP | IFF_NO_PI without a virtio-net header")]
    NotATap {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks an interface name.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME
        || name.bytes().any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace());
    if bad {
        return Err(TapError::Name(name.to_string()));
    }
    Ok(())
}

/// Attaches to tap `name` (made if the process may make it), non-blocking and close-on-exec.
pub fn open(name: &str) -> Result<OwnedFd, TapError> {
    check_name(name)?;
    // SAFETY: a plain open of a constant NUL-terminated path.
    let raw =
        unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(TapError::Open(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
    for (dst, &src) in req.name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `req` is (with room to spare).
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(TapError::Attach { name: name.to_string(), source: io::Error::last_os_error() });
    }
    Ok(fd)
}

/// Takes over descriptor `fd` (passed in by whoever started samepage) if it is a tap in the
/// mode the device needs; made non-blocking. Returns it and the interface's name.
pub fn adopt(fd: RawFd) -> Result<(OwnedFd, String), TapError> {
    let not_a_tap = |source| TapError::NotATap { fd, source };
    // SAFETY: F_GETFD only asks whether `fd` is open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(not_a_tap(io::Error::from_raw_os_error(libc::EBADF)));
    }
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    // SAFETY: TUNGETIFF writes an `ifreq` into `req`.
    if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(not_a_tap(io::Error::last_os_error()));
    }
    let mode = req.flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE);
    if mode != IFF_TAP | IFF_NO_PI {
        return Err(not_a_tap(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor checked open above.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(not_a_tap(io::Error::last_os_error()));
    }
    req.name[libc::IFNAMSIZ - 1] = 0;
    // SAFETY: `req.name` is NUL-terminated (its last byte was just set to 0).
    let name = unsafe { CStr::from_ptr(req.name.as_ptr()) }.to_string_lossy().into_owned();
    // SAFETY: the caller gave samepage this descriptor to own (`--net fd=N`).
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, name))
}

/// A locally administered unicast MAC address for the tap `name`: the same every time for one
/// name, different for different names (BLAKE3 of the name).
pub fn default_mac(name: &str) -> [u8; 6] {
    let hash = blake3::hash(name.as_bytes());
    let b = hash.as_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked_and_default_macs_are_local_unicast_and_stable() {
        check_name("tap0").expect("a name");
        check_name("fifteen-bytes-x").expect("15 bytes");
        for bad in ["", "sixteen-bytes-xx", "a/b", "a b", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let mac = default_mac("tap0");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered, unicast");
        assert_eq!(mac, default_mac("tap0"));
        assert_ne!(mac, default_mac("tap1"));
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let fd = file.as_raw_fd();
        assert!(matches!(adopt(fd), Err(TapError::NotATap { .. })));
        assert!(matches!(adopt(-1), Err(TapError::NotATap { .. })));
    }
}
