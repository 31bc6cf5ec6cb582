//! The format of `/proc/self/pagemap` (the kernel's `Documentation/admin-guide/mm/pagemap.rst`):
//! one native-endian 64-bit entry per virtual page of this process, at byte offset
//! `page number × 8`. Only the bits samepage reads are named; one definition for every module
//! that reads the file.

/// The file.
pub const PATH: &str = "/proc/self/pagemap";
/// Bit 63: the page is present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out (also a migration entry while the kernel moves it).
pub const PM_SWAPPED: u64 = 1 << 62;
/// Bit 61: a file page or shared anonymous, that is not a private anonymous page.
pub const PM_FILE: u64 = 1 << 61;
/// Bit 56: the page is mapped only once (not the host's shared zero page, nor a page another
/// mapping or process maps too).
pub const PM_EXCLUSIVE: u64 = 1 << 56;
/// Bits 0-54: the page frame number of a present page (0 unless the reader has
/// `CAP_SYS_ADMIN`).
pub const PM_PFN: u64 = (1 << 55) - 1;

/// Whether an entry is a page this process wrote: present, private anonymous and mapped only
/// here (the host's shared zero page, which a read of a page never written maps, is not).
pub fn is_written_here(entry: u64) -> bool {
    entry & PM_PRESENT != 0 && entry & PM_FILE == 0 && entry & PM_EXCLUSIVE != 0
}
