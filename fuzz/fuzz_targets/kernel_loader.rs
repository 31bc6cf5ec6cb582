//! The kernel and initrd loaders as `samepage run` uses them (`src/x86_64/boot.rs`): ELF
//! vmlinux (PVH note or not) and bzImage through linux-loader, samepage's own ELF inspection,
//! the initrd's placement at the top of low RAM, the command line and the boot information
//! (zero page, PVH start info), on guest memory of the sizes `--mem` takes.
//!
//! Most inputs are plausible kernels (a 64-bit x86_64 ELF with loadable segments above 1 MiB,
//! a bzImage with a valid setup header) that load; some carry a wrong field or two. Checked:
//! no panic (errors are formatted too), a loaded kernel lies in guest RAM above 1 MiB, a
//! placed initrd is page-aligned, above the kernel, below the end of low RAM and holds the
//! file's bytes, and refusals agree with that arithmetic.
#![no_main]

use std::io::{Cursor, Write};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage::memory::create_guest_memory;
use samepage::x86_64::boot::{
    build_cmdline, load_initrd, load_kernel, write_cmdline, write_pvh_start_info, write_zero_page, BootError,
    EntryPoint, LoadedInitrd,
};
use samepage::x86_64::kernel_file;
use samepage::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use samepage::x86_64::vm_layout::VmLayout;
use samepage_fuzz::counted;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const MIB: u64 = 1 << 20;
/// Guest RAM sizes `--mem` takes; the last reaches past the MMIO gap.
const MEM_SIZES: [u64; 4] = [16 * MIB, 32 * MIB, 64 * MIB, MMIO_GAP_START + 64 * MIB];
const PAGE: u64 = 4096;

#[derive(Arbitrary, Debug)]
struct Input {
    mem: u8,
    kernel: KernelSpec,
    initrd: InitrdSpec,
    kernel_end: KernelEnd,
    cmdline: Vec<String>,
}

#[derive(Arbitrary, Debug)]
enum KernelSpec {
    Elf(ElfSpec),
    BzImage(BzSpec),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct ElfSpec {
    /// Bad header fields apply when this is 216 or more.
    fault_roll: u8,
    faults: Vec<ElfFault>,
    entry: u32,
    #[arbitrary(with = counted::<_, 1, 16>)]
    phdrs: Vec<PhdrSpec>,
    /// A PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) with this entry.
    pvh: Option<u32>,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ElfFault {
    Class(u8),
    Data(u8),
    Machine(u16),
    Entry(u64),
    Phoff(u64),
    Phentsize(u16),
    Phnum(u16),
    Truncate(u16),
}

#[derive(Arbitrary, Debug)]
struct PhdrSpec {
    /// PT_LOAD unless this is 224 or more (then PT_NOTE or another type).
    kind_roll: u8,
    other_type: u32,
    /// Where it goes: 1 MiB + this.
    paddr: u32,
    /// One less than the bytes in the file.
    filesz: u16,
    bss: u32,
    /// A bad field when this is 232 or more.
    fault_roll: u8,
    fault: PhdrFault,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PhdrFault {
    Offset(u64),
    Paddr(u64),
    Filesz(u64),
    Memsz(u64),
}

#[derive(Arbitrary, Debug)]
struct BzSpec {
    setup_sects: u8,
    /// A bad header field when this is 216 or more.
    fault_roll: u8,
    fault: BzFault,
    /// Where the kernel goes: 1 MiB + this % 16 MiB.
    code32_start: u32,
    payload: Vec<u8>,
    /// Extra zero bytes (a sparse file) after the payload, up to 32 MiB, when
    /// `padding_roll` is 224 or more.
    padding_roll: u8,
    padding: u32,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum BzFault {
    BootFlag(u16),
    Magic(u32),
    Version(u16),
    Loadflags(u8),
    Code32Start(u32),
    Truncate(u16),
}

#[derive(Arbitrary, Debug)]
struct InitrdSpec {
    bytes: Vec<u8>,
    /// A sparse size instead: up to 64 KiB more, up to 20 MiB more, or past what low RAM
    /// above 1 MiB can ever hold.
    sparse: Option<SparseSize>,
}

#[derive(Arbitrary, Debug)]
enum SparseSize {
    Small(u16),
    Large(u32),
    Huge(u32),
}

#[derive(Arbitrary, Debug)]
enum KernelEnd {
    /// Where the loaded kernel ends (1 MiB if it did not load).
    Loaded,
    /// Anywhere from 1 MiB, where kernels load, up.
    Any(u64),
    /// This many bytes below the end of low RAM.
    BelowTop(u32),
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(dst) = b.get_mut(at..at + v.len()) {
        dst.copy_from_slice(v);
    }
}

/// An ELF-64 x86_64 executable: header, program headers, the PVH note, segment data.
fn elf(spec: &ElfSpec) -> Vec<u8> {
    let phdrs: Vec<&PhdrSpec> = spec.phdrs.iter().collect();
    let note_at = 64 + 56 * phdrs.len();
    let note_len = if spec.pvh.is_some() { 20 } else { 0 };
    let data_at = note_at + note_len;
    let mut b = vec![0u8; data_at];
    put(&mut b, 0, b"\x7fELF\x02\x01\x01");
    put(&mut b, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut b, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut b, 20, &1u32.to_le_bytes());
    put(&mut b, 24, &(HIMEM_START + u64::from(spec.entry) % (16 * MIB)).to_le_bytes());
    put(&mut b, 32, &64u64.to_le_bytes());
    put(&mut b, 52, &64u16.to_le_bytes());
    put(&mut b, 54, &56u16.to_le_bytes());
    put(&mut b, 56, &(phdrs.len() as u16).to_le_bytes());
    if let Some(entry) = spec.pvh {
        let mut note = Vec::new();
        for v in [4u32, 4, 18] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&entry.to_le_bytes());
        put(&mut b, note_at, &note);
    }
    for (i, p) in phdrs.iter().enumerate() {
        let at = 64 + 56 * i;
        let (p_type, offset, filesz) = if p.kind_roll < 224 {
            let offset = b.len() as u64;
            let filesz = u64::from(p.filesz) + 1;
            let fill = spec.payload.iter().copied().cycle().take(filesz as usize);
            let mut data: Vec<u8> = fill.collect();
            data.resize(filesz as usize, 0);
            b.extend_from_slice(&data);
            (1u32, offset, filesz)
        } else if p.other_type % 2 == 0 {
            (4, note_at as u64, note_len as u64) // PT_NOTE
        } else {
            (p.other_type, 0, u64::from(p.filesz))
        };
        let mut paddr = HIMEM_START + u64::from(p.paddr) % (16 * MIB);
        let mut memsz = filesz + u64::from(p.bss) % (4 * MIB);
        let (mut offset, mut filesz) = (offset, filesz);
        if p.fault_roll >= 232 {
            match p.fault {
                PhdrFault::Offset(v) => offset = v,
                PhdrFault::Paddr(v) => paddr = v,
                PhdrFault::Filesz(v) => filesz = v,
                PhdrFault::Memsz(v) => memsz = v,
            }
        }
        put(&mut b, at, &p_type.to_le_bytes());
        put(&mut b, at + 8, &offset.to_le_bytes());
        put(&mut b, at + 16, &paddr.to_le_bytes());
        put(&mut b, at + 24, &paddr.to_le_bytes());
        put(&mut b, at + 32, &filesz.to_le_bytes());
        put(&mut b, at + 40, &memsz.to_le_bytes());
    }
    if spec.fault_roll >= 216 {
        for f in spec.faults.iter().take(4) {
            match *f {
                ElfFault::Class(v) => put(&mut b, 4, &[v]),
                ElfFault::Data(v) => put(&mut b, 5, &[v]),
                ElfFault::Machine(v) => put(&mut b, 18, &v.to_le_bytes()),
                ElfFault::Entry(v) => put(&mut b, 24, &v.to_le_bytes()),
                ElfFault::Phoff(v) => put(&mut b, 32, &v.to_le_bytes()),
                ElfFault::Phentsize(v) => put(&mut b, 54, &v.to_le_bytes()),
                ElfFault::Phnum(v) => put(&mut b, 56, &v.to_le_bytes()),
                ElfFault::Truncate(n) => b.truncate(usize::from(n)),
            }
        }
    }
    b
}

/// A bzImage: setup sectors with the boot protocol header at 0x1f1, then the kernel.
fn bzimage(spec: &BzSpec) -> (Vec<u8>, u64) {
    let sects = usize::from(spec.setup_sects % 64);
    let setup_len = 512 * (if sects == 0 { 4 } else { sects } + 1);
    let mut b = vec![0u8; setup_len];
    put(&mut b, 0x1f1, &[sects as u8]);
    put(&mut b, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut b, 0x202, b"HdrS");
    put(&mut b, 0x206, &0x020fu16.to_le_bytes());
    put(&mut b, 0x211, &[1]); // LOADED_HIGH
    let code32_start = HIMEM_START as u32 + spec.code32_start % (16 * MIB as u32);
    put(&mut b, 0x214, &code32_start.to_le_bytes());
    b.extend_from_slice(&spec.payload);
    if spec.fault_roll >= 216 {
        match spec.fault {
            BzFault::BootFlag(v) => put(&mut b, 0x1fe, &v.to_le_bytes()),
            BzFault::Magic(v) => put(&mut b, 0x202, &v.to_le_bytes()),
            BzFault::Version(v) => put(&mut b, 0x206, &v.to_le_bytes()),
            BzFault::Loadflags(v) => put(&mut b, 0x211, &[v]),
            BzFault::Code32Start(v) => put(&mut b, 0x214, &v.to_le_bytes()),
            BzFault::Truncate(n) => b.truncate(usize::from(n)),
        }
    }
    let padding = if spec.padding_roll >= 224 { u64::from(spec.padding) % (32 * MIB) } else { 0 };
    (b, padding)
}

fn temp_file(bytes: &[u8], sparse_len: Option<u64>) -> TempFile {
    let file = TempFile::new().expect("temporary file");
    file.as_file().write_all(bytes).expect("temporary file content");
    if let Some(len) = sparse_len {
        file.as_file().set_len(len).expect("sparse size");
    }
    file
}

/// An error formats without panicking, on one line.
fn formatted(e: &BootError) -> String {
    let line = samepage::error_chain(e);
    assert!(!line.contains('\n'), "error on several lines: {line:?}");
    line
}

fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

fuzz_target!(|input: Input| {
    let mem_bytes = MEM_SIZES[usize::from(input.mem) % MEM_SIZES.len()];
    let layout = VmLayout::new(mem_bytes, 0);
    let mem = create_guest_memory(&layout).expect("guest memory");

    let (bytes, padding) = match &input.kernel {
        KernelSpec::Elf(spec) => (elf(spec), 0),
        KernelSpec::BzImage(spec) => bzimage(spec),
        KernelSpec::Raw(bytes) => (bytes.clone(), 0),
    };
    let kernel_len = bytes.len() as u64 + padding;
    let kind = kernel_file::inspect(&mut Cursor::new(&bytes)).expect("inspecting bytes in memory");
    let file = temp_file(&bytes, (padding > 0).then_some(kernel_len));
    let kernel = load_kernel(&mem, file.as_path(), &layout);
    match &kernel {
        Ok(k) => {
            assert!(k.end <= low_ram_end(mem_bytes), "kernel ends at {:#x}, past low RAM", k.end);
            match k.entry {
                EntryPoint::Linux64(entry) if k.setup_header.is_some() => {
                    // bzImage: the compressed kernel from code32_start, entry 0x200 in.
                    let start = entry.raw_value() - 0x200;
                    assert!(start >= HIMEM_START && k.end >= start);
                    if k.end > start {
                        assert!(mem.check_range(GuestAddress(start), (k.end - start) as usize));
                    }
                }
                EntryPoint::Linux64(entry) => {
                    assert!(matches!(kind, kernel_file::KernelFile::Elf { .. }), "{kind:?}");
                    assert!(entry.raw_value() >= HIMEM_START, "ELF entry {entry:?} below 1 MiB");
                }
                EntryPoint::Pvh(_) => assert!(matches!(kind, kernel_file::KernelFile::Elf { .. })),
            }
        }
        Err(e) => {
            formatted(e);
            if let BootError::ForeignElf { .. } | BootError::ElfClass { .. } = e {
                assert!(!matches!(
                    kind,
                    kernel_file::KernelFile::Elf { .. } | kernel_file::KernelFile::NotElf
                ));
            }
        }
    }

    let kernel_end = match input.kernel_end {
        KernelEnd::Loaded => kernel.as_ref().map_or(HIMEM_START, |k| k.end).max(HIMEM_START),
        KernelEnd::Any(v) => v.max(HIMEM_START),
        KernelEnd::BelowTop(v) => low_ram_end(mem_bytes).saturating_sub(u64::from(v)).max(HIMEM_START),
    };
    let initrd = initrd(&mem, &layout, kernel_end, &input.initrd);

    let parts: Vec<&str> = input.cmdline.iter().map(String::as_str).collect();
    let cmdline_size = match build_cmdline(&parts) {
        Ok(cmdline) => {
            let size = write_cmdline(&mem, &cmdline).expect("the command line fits its place");
            assert!(size as usize <= CMDLINE_MAX_SIZE);
            let mut nul = [0xffu8; 1];
            mem.read_slice(&mut nul, GuestAddress(CMDLINE_START + u64::from(size) - 1)).expect("cmdline");
            assert_eq!(nul, [0], "the command line ends with NUL");
            size
        }
        Err(e) => {
            formatted(&e);
            1
        }
    };
    if let Ok(k) = &kernel {
        match k.entry {
            EntryPoint::Linux64(_) => write_zero_page(&mem, k, cmdline_size, initrd, &layout),
            EntryPoint::Pvh(_) => write_pvh_start_info(&mem, initrd, &layout),
        }
        .expect("boot information in low RAM");
    }
});

/// Places the initrd and checks where it went, or why not.
fn initrd(
    mem: &GuestMemoryMmap,
    layout: &VmLayout,
    kernel_end: u64,
    spec: &InitrdSpec,
) -> Option<LoadedInitrd> {
    let mem_bytes = layout.mem_bytes();
    let bytes = &spec.bytes;
    let size = match spec.sparse {
        None => bytes.len() as u64,
        Some(SparseSize::Small(n)) => bytes.len() as u64 + u64::from(n),
        Some(SparseSize::Large(n)) => bytes.len() as u64 + u64::from(n) % (20 * MIB),
        Some(SparseSize::Huge(n)) => MMIO_GAP_START - HIMEM_START + 1 + u64::from(n),
    };
    let file = temp_file(bytes, (size != bytes.len() as u64).then_some(size));
    let aligned_end = kernel_end.checked_next_multiple_of(PAGE);
    match load_initrd(mem, file.as_path(), layout, kernel_end) {
        Ok(placed) => {
            let addr = placed.addr.raw_value();
            assert_eq!(placed.size, size);
            assert_eq!(addr % PAGE, 0, "initrd at {addr:#x}");
            assert!(addr >= kernel_end, "initrd at {addr:#x} below the kernel's end {kernel_end:#x}");
            assert!(addr + size <= low_ram_end(mem_bytes), "initrd past low RAM");
            let head = bytes.len().min(64 * 1024);
            let mut got = vec![0u8; head];
            mem.read_slice(&mut got, placed.addr).expect("initrd in guest memory");
            assert!(got == bytes[..head], "initrd bytes");
            Some(placed)
        }
        Err(e) => {
            formatted(&e);
            let needed = aligned_end.map(|end| end.saturating_add(size));
            match e {
                BootError::InitrdEmpty { .. } => assert_eq!(size, 0),
                BootError::InitrdTooBigForAnyMem { .. } => {
                    assert!(needed.is_none_or(|n| n > MMIO_GAP_START));
                }
                BootError::InitrdTooBig { needed_bytes, .. } => {
                    assert_eq!(Some(needed_bytes), needed);
                    assert!(needed_bytes > low_ram_end(mem_bytes) && needed_bytes <= MMIO_GAP_START);
                }
                other => panic!("initrd of {size} bytes refused: {other}"),
            }
            None
        }
    }
}
