//! The guest kernel held once (`docs/boot.md`, "The kernel held once"): the read-only loadable
//! segments of an ELF kernel (text and read-only data) map the kernel file's pages over the
//! guest pages the loader copied them into, copy-on-write, so every VM booting that file
//! shares one copy of them in the host's page cache until it writes a page (boot-time
//! patching does, for some). The pages are a shared image of the VM's dedup domain, booked and
//! leased like a disk's ([`super::image`]): a host process that opens the kernel file for
//! writing or truncates it breaks the lease, and the guest's pages are copied into its own
//! memory first.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::lock;
use crate::x86_64::boot::ReadOnlyKernel;

use super::image::{ImageLeases, Shared};

/// Most bytes compared at once: the segment is checked against the file a chunk at a time.
const CHUNK: usize = 1 << 20;

/// What holding the kernel once did for one VM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelSharing {
    /// Guest pages that map the kernel file now.
    pub pages: usize,
    /// Pages of read-only segments left as copies: the file no longer holds what was loaded
    /// (it changed in between), or the VMA budget was spent.
    pub copied: usize,
}

impl ImageLeases {
    /// Maps the whole pages of `kernel`'s read-only segments from its file over the guest
    /// pages of `mem` they were loaded into, under a read lease, where the file still holds
    /// exactly those bytes. Where there can be no lease the pages stay copies (one message).
    pub fn share_kernel(
        &mut self,
        kernel: ReadOnlyKernel,
        path: &Path,
        mem: &GuestMemoryMmap,
    ) -> KernelSharing {
        let runs: Vec<(u64, u64, usize)> = kernel.segments.iter().filter_map(|s| s.whole_pages()).collect();
        let total: usize = runs.iter().map(|r| r.2).sum();
        if total == 0 {
            return KernelSharing::default();
        }
        let Some(image) = self.lease(&kernel.file, path, Shared::Kernel) else {
            return KernelSharing { pages: 0, copied: total };
        };
        let (domain, vm, fd) = (self.domain(), self.vm(), kernel.file.as_raw_fd());
        let mut pages = 0;
        for (gpa, offset, count) in runs {
            // Under the lease the file cannot change unseen; before it, it could have: the
            // loaded bytes and the file's must agree.
            if !same_bytes(mem, gpa, &kernel.file, offset, count) {
                log::warn!(
                    "kernel {}: its file changed since it was loaded; {count} pages at {gpa:#x} stay copies",
                    path.display()
                );
                continue;
            }
            pages += lock(&domain).map_image(vm, image, fd, gpa, offset, count);
        }
        self.keep(kernel.file, image, path, Shared::Kernel);
        KernelSharing { pages, copied: total - pages }
    }
}

/// Whether `pages` guest pages from `gpa` hold the bytes of `file` from `offset`.
fn same_bytes(mem: &GuestMemoryMmap, gpa: u64, file: &std::fs::File, offset: u64, pages: usize) -> bool {
    let len = pages * samepage_virtio::PAGE_SIZE;
    let (mut in_guest, mut in_file) = (vec![0u8; CHUNK.min(len)], vec![0u8; CHUNK.min(len)]);
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        let guest_ok = mem.read_slice(&mut in_guest[..n], GuestAddress(gpa + done as u64)).is_ok();
        if !guest_ok || file.read_exact_at(&mut in_file[..n], offset + done as u64).is_err() {
            return false;
        }
        if in_guest[..n] != in_file[..n] {
            return false;
        }
        done += n;
    }
    true
}
