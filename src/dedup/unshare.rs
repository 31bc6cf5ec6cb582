//! Giving up a shared image whose file is about to change (`docs/fphash.md`, "Read-only
//! images"): every guest page that maps the image becomes the guest's own anonymous memory
//! with the same bytes, so a writer or a truncation of the file no longer reaches the guest,
//! and the image's later reads are copied.
//!
//! The pages are found in the VMA model, not in `image_pages`: a page the guest wrote is its
//! own copy *inside* the file's VMA, and truncating the file takes such copies away too
//! (`truncate` unmaps private copies of the pages it cuts off), so it moves as well.

use std::io;

use super::domain::{Domain, VmState};
use super::error::DedupError;
use super::image_ids::{is_image_key, ImageId};
use super::words::{VmId, PAGE_SIZE};

/// Pages copied per mapping: bounds the buffer the bytes pass through (1 MiB).
const CHUNK_PAGES: usize = 256;

impl Domain {
    /// Maps no more pages of `image` (from now on [`Domain::map_image`] declines it and its
    /// reads are copied). Pages that map it already stay as they are.
    pub fn stop_sharing(&mut self, image: ImageId) {
        self.images.unshare(image);
    }

    /// Stops sharing `image` and copies every page of `vm` that maps it into anonymous memory
    /// of the VM's own, with the same bytes; returns how many pages moved. The VMA count is
    /// set from the kernel's afterwards.
    ///
    /// Nothing may write the VM's pages meanwhile: its vCPUs are paused and its devices idle
    /// (the caller runs on the VM's event loop and holds a pause), or a write that lands
    /// between the copy and the new mapping is lost. An error leaves the page that failed, and
    /// those after it, mapping the image, or unmapped if the kernel could not restore them:
    /// the VM must not run on.
    pub fn unshare_image(&mut self, id: VmId, image: ImageId) -> Result<usize, DedupError> {
        self.stop_sharing(image);
        self.counters.images_unshared += 1;
        let Some(mut vm) = self.take_vm(id) else { return Ok(0) };
        let moved = self.move_image_pages(&mut vm, image);
        self.vmas = self.vms.values().chain(Some(&vm)).map(VmState::vmas).sum();
        self.reconcile_vmas_with(Some(&mut vm));
        self.put_vm(id, vm);
        moved
    }

    fn move_image_pages(&mut self, state: &mut VmState, image: ImageId) -> Result<usize, DedupError> {
        let mut buffer = Vec::new();
        let mut moved = 0;
        for (region, rv) in state.regions.iter().zip(state.vmas.iter_mut()) {
            for (first, pages) in rv.pages_where(|key| is_image_key(key, image)) {
                for start in (first..first + pages).step_by(CHUNK_PAGES) {
                    let n = CHUNK_PAGES.min(first + pages - start);
                    let host = region.host_addr + start * PAGE_SIZE;
                    let gpa = region.gpa + (start * PAGE_SIZE) as u64;
                    copy_into_anonymous(host, n, &mut buffer).map_err(|source| DedupError::Unshare {
                        gpa,
                        pages: n,
                        source,
                    })?;
                    rv.unmap_run(start, n);
                    for k in 0..n {
                        let page = gpa + (k * PAGE_SIZE) as u64;
                        state.image_pages.remove(&page);
                        state.suspects.remove(&page);
                    }
                    moved += n;
                    self.counters.image_unshared_pages += n as u64;
                }
            }
        }
        Ok(moved)
    }
}

/// Replaces `pages` pages of guest RAM at `host` with fresh anonymous memory holding the same
/// bytes, passed through `buffer`.
fn copy_into_anonymous(host: usize, pages: usize, buffer: &mut Vec<u8>) -> io::Result<()> {
    let len = pages * PAGE_SIZE;
    buffer.resize(len, 0);
    // SAFETY: `host..host + len` is registered guest RAM (the contract of `register_vm`),
    // mapped and readable; nothing writes it meanwhile (the caller's precondition). The file
    // it maps still holds these pages: its writer waits for the lease this copy precedes.
    unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buffer.as_mut_ptr(), len) };
    // SAFETY: whole pages of registered guest RAM get fresh private anonymous memory, the kind
    // guest RAM is made of (vm-memory maps it MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
    // their bytes are written back below before anything reads them.
    let mapped = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fresh mapping of `len` bytes at `host`; `buffer` holds `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(buffer.as_ptr(), host as *mut u8, len) };
    Ok(())
}
