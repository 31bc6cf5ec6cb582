//! What a kernel file is, read from its first bytes before linux-loader loads it: an ELF
//! (which must be 64-bit x86_64; linux-loader checks neither) or anything else, which is then
//! tried as a bzImage. For an ELF also where its loadable segments end, to tell a kernel that
//! does not fit in guest RAM from a broken one, and its read-only loadable segments (text and
//! read-only data), which the VMM maps from the file instead of copying (`docs/boot.md`).

use std::io::{Read, Seek, SeekFrom};

/// ELF magic, `e_ident[0..4]`.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// `e_ident[EI_CLASS]` of a 64-bit object (System V gABI, "ELF Identification").
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_CLASS]` of a 32-bit object.
const ELFCLASS32: u8 = 1;
/// `e_machine` of x86_64 (System V gABI machine list).
pub const EM_X86_64: u16 = 62;
/// Program header type of a loadable segment.
const PT_LOAD: u32 = 1;
/// `p_flags` bit of a segment the program may write.
const PF_W: u32 = 2;
/// The page the guest maps a file in (4 KiB).
const PAGE: u64 = 4096;
/// Size of the ELF-64 header, and of one ELF-64 program header.
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// More program headers than any kernel has: a bound on what a hostile header makes us read.
const MAX_PHDRS: u16 = 256;

/// The kind of kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFile {
    /// A 64-bit x86_64 ELF, with the end of its highest loadable segment (`p_paddr +
    /// p_memsz`) when the program headers could be read.
    Elf {
        /// Where the loaded image ends in guest-physical memory.
        load_end: Option<u64>,
    },
    /// A 64-bit ELF for another machine.
    ForeignElf {
        /// Its `e_machine`.
        machine: u16,
    },
    /// An ELF of another class (32-bit or invalid).
    ElfClass {
        /// Its `e_ident[EI_CLASS]`.
        class: u8,
    },
    /// Not an ELF (maybe a bzImage).
    NotElf,
}

/// The usual name of an ELF machine number, for messages.
pub fn machine_name(machine: u16) -> &'static str {
    match machine {
        3 => "i386",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "S/390",
        40 => "ARM",
        EM_X86_64 => "x86_64",
        183 => "AArch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => "unknown",
    }
}

/// What `e_ident[EI_CLASS]` means, for messages.
pub fn class_name(class: u8) -> &'static str {
    match class {
        ELFCLASS32 => "a 32-bit",
        ELFCLASS64 => "a 64-bit",
        _ => "an invalid-class",
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut le = [0u8; 4];
    le.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(le)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

/// A loadable segment of an ELF kernel that is not writable (text, read-only data): the loader
/// put the file's `filesz` bytes from `offset` at guest-physical `paddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOnlySegment {
    /// Where it was loaded (`p_paddr`).
    pub paddr: u64,
    /// Where its bytes are in the file (`p_offset`).
    pub offset: u64,
    /// How many bytes (`p_filesz`).
    pub filesz: u64,
}

impl ReadOnlySegment {
    /// The whole pages of the segment that can map the file in place: (first guest-physical
    /// address, its file offset, pages). `None` when the file offset and the address differ
    /// within a page (the file cannot be mapped there) or no whole page is left.
    pub fn whole_pages(&self) -> Option<(u64, u64, usize)> {
        if self.paddr % PAGE != self.offset % PAGE {
            return None;
        }
        let end = self.paddr.checked_add(self.filesz)? / PAGE * PAGE;
        let start = self.paddr.checked_next_multiple_of(PAGE)?;
        let pages = usize::try_from(end.checked_sub(start)? / PAGE).ok().filter(|&n| n > 0)?;
        Some((start, self.offset + (start - self.paddr), pages))
    }
}

/// The read-only loadable segments of an ELF kernel, empty when the headers are not an
/// x86_64 ELF-64's or cannot be read; leaves the file position anywhere.
pub fn read_only_segments<F: Read + Seek>(file: &mut F) -> Vec<ReadOnlySegment> {
    let mut ehdr = [0u8; EHDR_SIZE];
    let header = file.seek(SeekFrom::Start(0)).and_then(|_| file.read_exact(&mut ehdr));
    if header.is_err() || ehdr[..4] != ELF_MAGIC || ehdr[4] != ELFCLASS64 || u16_at(&ehdr, 18) != EM_X86_64 {
        return Vec::new();
    }
    let Some(phdrs) = program_headers(file, &ehdr) else { return Vec::new() };
    phdrs
        .chunks_exact(PHDR_SIZE)
        .filter(|p| u32_at(p, 0) == PT_LOAD && u32_at(p, 4) & PF_W == 0 && u64_at(p, 32) > 0)
        .map(|p| ReadOnlySegment { paddr: u64_at(p, 24), offset: u64_at(p, 8), filesz: u64_at(p, 32) })
        .collect()
}

/// Reads the kernel file's header (and an ELF's program headers); leaves the file position
/// anywhere. A file too short for an ELF header is [`KernelFile::NotElf`].
pub fn inspect<F: Read + Seek>(file: &mut F) -> std::io::Result<KernelFile> {
    let mut ehdr = [0u8; EHDR_SIZE];
    file.seek(SeekFrom::Start(0))?;
    let mut read = 0;
    while read < EHDR_SIZE {
        match file.read(&mut ehdr[read..])? {
            0 => break,
            n => read += n,
        }
    }
    if read < ELF_MAGIC.len() || ehdr[..4] != ELF_MAGIC {
        return Ok(KernelFile::NotElf);
    }
    let class = ehdr[4];
    if class != ELFCLASS64 {
        return Ok(KernelFile::ElfClass { class });
    }
    if read < EHDR_SIZE {
        // Truncated: linux-loader reports it.
        return Ok(KernelFile::Elf { load_end: None });
    }
    let machine = u16_at(&ehdr, 18);
    if machine != EM_X86_64 {
        return Ok(KernelFile::ForeignElf { machine });
    }
    Ok(KernelFile::Elf { load_end: load_end(file, &ehdr) })
}

/// The end of the highest loadable segment, or `None` if the program headers are unreadable
/// or add up past 2^64 (linux-loader then has its own reason to refuse the file).
fn load_end<F: Read + Seek>(file: &mut F, ehdr: &[u8]) -> Option<u64> {
    let phdrs = program_headers(file, ehdr)?;
    let mut end = 0u64;
    for phdr in phdrs.chunks_exact(PHDR_SIZE) {
        let (p_type, p_paddr, p_filesz, p_memsz) =
            (u32_at(phdr, 0), u64_at(phdr, 24), u64_at(phdr, 32), u64_at(phdr, 40));
        // linux-loader skips empty segments too.
        if p_type == PT_LOAD && p_filesz > 0 {
            end = end.max(p_paddr.checked_add(p_memsz.max(p_filesz))?);
        }
    }
    Some(end)
}

/// The program header table, or `None` if its entries are not ELF-64's, there are more than
/// any kernel has, or it cannot be read.
fn program_headers<F: Read + Seek>(file: &mut F, ehdr: &[u8]) -> Option<Vec<u8>> {
    let (phoff, phentsize, phnum) = (u64_at(ehdr, 32), u16_at(ehdr, 54), u16_at(ehdr, 56));
    if usize::from(phentsize) != PHDR_SIZE || phnum > MAX_PHDRS {
        return None;
    }
    file.seek(SeekFrom::Start(phoff)).ok()?;
    let mut phdrs = vec![0u8; PHDR_SIZE * usize::from(phnum)];
    file.read_exact(&mut phdrs).ok()?;
    Some(phdrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn elf(class: u8, machine: u16, segment: (u64, u64)) -> Vec<u8> {
        let mut bytes = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        bytes[..4].copy_from_slice(&ELF_MAGIC);
        bytes[4] = class;
        bytes[5] = 1;
        bytes[18..20].copy_from_slice(&machine.to_le_bytes());
        bytes[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        bytes[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        bytes[56..58].copy_from_slice(&1u16.to_le_bytes());
        let phdr = &mut bytes[EHDR_SIZE..];
        phdr[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        phdr[24..32].copy_from_slice(&segment.0.to_le_bytes());
        phdr[32..40].copy_from_slice(&1u64.to_le_bytes());
        phdr[40..48].copy_from_slice(&segment.1.to_le_bytes());
        bytes
    }

    #[test]
    fn x86_64_elf_with_its_extent() {
        let mut file = Cursor::new(elf(ELFCLASS64, EM_X86_64, (0x100_0000, 0x20_0000)));
        assert_eq!(inspect(&mut file).expect("inspect"), KernelFile::Elf { load_end: Some(0x120_0000) });
    }

    #[test]
    fn foreign_machines_classes_and_non_elf_files() {
        let mut aarch64 = Cursor::new(elf(ELFCLASS64, 183, (0, 1)));
        assert_eq!(inspect(&mut aarch64).expect("inspect"), KernelFile::ForeignElf { machine: 183 });
        let mut elf32 = Cursor::new(elf(ELFCLASS32, 3, (0, 1)));
        assert_eq!(inspect(&mut elf32).expect("inspect"), KernelFile::ElfClass { class: ELFCLASS32 });
        assert_eq!(inspect(&mut Cursor::new(b"MZ".to_vec())).expect("inspect"), KernelFile::NotElf);
        assert_eq!(inspect(&mut Cursor::new(Vec::new())).expect("inspect"), KernelFile::NotElf);
    }

    #[test]
    fn read_only_segments_and_their_whole_pages() {
        let mut bytes = elf(ELFCLASS64, EM_X86_64, (0x100_0000, 0x20_0000));
        // p_offset 0x1000 beside p_paddr 0x100_0000: congruent; p_filesz 0x2800: two pages.
        bytes[EHDR_SIZE + 8..EHDR_SIZE + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        bytes[EHDR_SIZE + 32..EHDR_SIZE + 40].copy_from_slice(&0x2800u64.to_le_bytes());
        let segments = read_only_segments(&mut Cursor::new(bytes.clone()));
        assert_eq!(segments, [ReadOnlySegment { paddr: 0x100_0000, offset: 0x1000, filesz: 0x2800 }]);
        assert_eq!(segments[0].whole_pages(), Some((0x100_0000, 0x1000, 2)));
        // A writable segment is not one.
        bytes[EHDR_SIZE + 4..EHDR_SIZE + 8].copy_from_slice(&(PF_W | 4).to_le_bytes());
        assert_eq!(read_only_segments(&mut Cursor::new(bytes)), []);
        // Offsets that differ within a page, a segment inside one page, hostile sizes.
        let shifted = ReadOnlySegment { paddr: 0x100_0800, offset: 0x1000, filesz: 0x10_0000 };
        assert_eq!(shifted.whole_pages(), None);
        let inside = ReadOnlySegment { paddr: 0x100_0800, offset: 0x1800, filesz: 0x900 };
        assert_eq!(inside.whole_pages(), None);
        let unaligned = ReadOnlySegment { paddr: 0x100_0800, offset: 0x1800, filesz: 0x2000 };
        assert_eq!(unaligned.whole_pages(), Some((0x100_1000, 0x2000, 1)));
        let wrapping = ReadOnlySegment { paddr: u64::MAX - 0xfff, offset: 0, filesz: 0x3000 };
        assert_eq!(wrapping.whole_pages(), None);
        assert_eq!(read_only_segments(&mut Cursor::new(b"MZ".to_vec())), []);
    }

    #[test]
    fn hostile_program_headers_give_no_extent() {
        let mut wrapping = Cursor::new(elf(ELFCLASS64, EM_X86_64, (u64::MAX, 2)));
        assert_eq!(inspect(&mut wrapping).expect("inspect"), KernelFile::Elf { load_end: None });
        let mut cut = elf(ELFCLASS64, EM_X86_64, (0, 1));
        cut.truncate(EHDR_SIZE + 8);
        assert_eq!(inspect(&mut Cursor::new(cut)).expect("inspect"), KernelFile::Elf { load_end: None });
    }
}
