//! Loading the kernel, initrd and command line, and writing the boot information the kernel
//! reads first: the PVH `hvm_start_info` or the Linux zero page, each with a memory map, and
//! the MP table. [`load`] does it all, in one pass over the VM's layout.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use samepage_virtio::PAGE_SIZE;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap, ReadVolatile};

use crate::checked_open::{self, HostFileError};
use crate::config::size_text;

use super::kernel_file::{self, KernelFile, ReadOnlySegment};
use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use super::mptable::{self, MptableError};
use super::vm_layout::VmLayout;

/// e820 type of usable RAM (ACPI spec §15, "AddressRangeMemory").
const E820_RAM: u32 = 1;
/// `hvm_start_info.magic` (Xen `arch-x86/hvm/start_info.h`: XEN_HVM_START_MAGIC_VALUE).
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Boot protocol: `boot_flag` must read 0xaa55 (Documentation/arch/x86/boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Boot protocol: `header` must read "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Boot protocol: `type_of_loader` 0xff, "undefined" loader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Boot protocol: kernel alignment Linux x86_64 expects (CONFIG_PHYSICAL_ALIGN default).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Boot protocol: the 64-bit entry point of a bzImage is 0x200 past its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors while loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Kernel or initrd could not be opened.
    #[error("cannot open {what} {path}")]
    Open {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Kernel or initrd is a directory, FIFO, device or socket.
    #[error("{what} {path} is {found}, not a regular file")]
    NotRegular {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What it is instead.
        found: &'static str,
    },
    /// Neither ELF nor bzImage.
    #[error("{path} is not a kernel samepage can boot: neither an ELF vmlinux nor a bzImage")]
    NotAKernel {
        /// The path.
        path: PathBuf,
    },
    /// An ELF for another machine (linux-loader would load it all the same).
    #[error("kernel {path} is an ELF for machine {machine} ({}), not x86_64", kernel_file::machine_name(*.machine))]
    ForeignElf {
        /// The path.
        path: PathBuf,
        /// Its `e_machine`.
        machine: u16,
    },
    /// A 32-bit (or invalid-class) ELF, which linux-loader would read as a 64-bit one.
    #[error("kernel {path} is {} ELF, not a 64-bit x86_64 kernel", kernel_file::class_name(*.class))]
    ElfClass {
        /// The path.
        path: PathBuf,
        /// Its `e_ident[EI_CLASS]`.
        class: u8,
    },
    /// The kernel's image would end past guest RAM.
    #[error("kernel {path} does not fit in guest RAM of {}", size_text(*.mem_bytes))]
    KernelTooBig {
        /// The path.
        path: PathBuf,
        /// Guest RAM.
        mem_bytes: u64,
        /// linux-loader's error, when it was the one to find out.
        #[source]
        source: Option<linux_loader::loader::Error>,
    },
    /// A 64-bit x86_64 ELF that linux-loader cannot load.
    #[error("cannot load ELF kernel {path}")]
    ElfLoad {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// A bzImage (its header checked out) that linux-loader cannot load.
    #[error("cannot load bzImage kernel {path}")]
    BzImageLoad {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Initrd could not be read.
    #[error("cannot read initrd {path}")]
    Initrd {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading the initrd into guest RAM failed (an I/O error, or a file that shrank).
    #[error("cannot copy initrd {path} into guest RAM")]
    InitrdCopy {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// An empty initrd (Linux would ignore it; surely the wrong file).
    #[error("initrd {path} is empty")]
    InitrdEmpty {
        /// The path.
        path: PathBuf,
    },
    /// The initrd does not fit between the kernel and the top of low RAM, but a larger --mem
    /// would make room.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM of {}; raise --mem to at least {} MiB", size_text(*.mem_bytes), .needed_bytes.div_ceil(1 << 20))]
    InitrdTooBig {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Guest RAM.
        mem_bytes: u64,
        /// Guest RAM it would fit in.
        needed_bytes: u64,
    },
    /// The initrd is larger than the room between the kernel and the MMIO gap: no --mem helps.
    #[error("initrd {path} ({size} bytes) cannot fit under any --mem: it must lie above the kernel (ends at {kernel_end:#x}) and below the MMIO gap at {MMIO_GAP_START:#x}")]
    InitrdTooBigForAnyMem {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// First byte past the kernel.
        kernel_end: u64,
    },
    /// Command line too long or invalid.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Could not write the command line to guest memory.
    #[error("cannot write the command line to guest memory")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    /// Could not write boot parameters.
    #[error("cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// The MP table could not be written.
    #[error("cannot write the MP table")]
    MpTable(#[source] MptableError),
}

/// How the boot CPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, %ebx = `hvm_start_info`.
    Pvh(GuestAddress),
    /// Linux 64-bit boot protocol: long mode, %rsi = zero page.
    Linux64(GuestAddress),
}

/// A loaded kernel: where it starts, where it ends, and its bzImage header if any.
#[derive(Debug)]
pub struct LoadedKernel {
    /// Entry point and protocol.
    pub entry: EntryPoint,
    /// First byte past the kernel image.
    pub end: u64,
    /// bzImage setup header, to copy into the zero page.
    pub setup_header: Option<setup_header>,
    /// An ELF kernel's read-only segments, which may map its file instead (none for a bzImage).
    pub read_only: Option<ReadOnlyKernel>,
}

/// An ELF kernel's file, still open, and its read-only loadable segments as loaded.
#[derive(Debug)]
pub struct ReadOnlyKernel {
    /// The kernel file the segments were read from.
    pub file: File,
    /// Its text and read-only data.
    pub segments: Vec<ReadOnlySegment>,
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest-physical start (page aligned).
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Opens a kernel or initrd: a regular file, without blocking on a FIFO.
fn open_image(what: &'static str, path: &Path) -> Result<File, BootError> {
    checked_open::open_regular(path).map_err(|e| match e {
        HostFileError::Io(source) => BootError::Open { what, path: path.into(), source },
        HostFileError::WrongType { found, .. } => BootError::NotRegular { what, path: path.into(), found },
    })
}

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub struct BootImages<'a> {
    /// Kernel image: ELF vmlinux or bzImage.
    pub kernel: &'a Path,
    /// Optional initrd / initramfs.
    pub initrd: Option<&'a Path>,
    /// The kernel command line, in parts (blank ones left out).
    pub cmdline: &'a [&'a str],
    /// vCPUs, for the MP table.
    pub vcpus: u8,
}

/// What the boot CPU needs once everything is in guest RAM.
#[derive(Debug)]
pub struct Booted {
    /// Where and how it enters the kernel.
    pub entry: EntryPoint,
    /// The kernel command line as the guest sees it.
    pub cmdline: String,
    /// An ELF kernel's read-only segments, to be held once by every VM booting the file.
    pub read_only_kernel: Option<ReadOnlyKernel>,
    /// Where the kernel was loaded: guest-physical start and end.
    pub kernel_span: (u64, u64),
}

/// Loads the kernel and the initrd, writes the command line, the boot information for the
/// kernel's entry (PVH `hvm_start_info` or the zero page, each with the memory map) and the MP
/// table into `mem`, where `layout` says RAM is.
pub fn load(mem: &GuestMemoryMmap, layout: &VmLayout, images: &BootImages) -> Result<Booted, BootError> {
    let mut kernel = load_kernel(mem, images.kernel, layout)?;
    let initrd = match images.initrd {
        Some(path) => Some(load_initrd(mem, path, layout, kernel.end)?),
        None => None,
    };
    let cmdline = build_cmdline(images.cmdline)?;
    let cmdline_size = write_cmdline(mem, &cmdline)?;
    match kernel.entry {
        EntryPoint::Pvh(_) => write_pvh_start_info(mem, initrd, layout)?,
        EntryPoint::Linux64(_) => write_zero_page(mem, &kernel, cmdline_size, initrd, layout)?,
    }
    mptable::write(mem, images.vcpus).map_err(BootError::MpTable)?;
    let cmdline = cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    let kernel_span = (HIMEM_START, kernel.end);
    Ok(Booted { entry: kernel.entry, cmdline, read_only_kernel: kernel.read_only.take(), kernel_span })
}

/// Loads an ELF vmlinux (PVH entry when it has the note) or else a bzImage at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path, layout: &VmLayout) -> Result<LoadedKernel, BootError> {
    let mut file = open_image("kernel", path)?;
    let kind = kernel_file::inspect(&mut file).map_err(|source| BootError::Open {
        what: "kernel",
        path: path.into(),
        source,
    })?;
    let too_big =
        |source| BootError::KernelTooBig { path: path.into(), mem_bytes: layout.mem_bytes(), source };
    match kind {
        KernelFile::ForeignElf { machine } => Err(BootError::ForeignElf { path: path.into(), machine }),
        KernelFile::ElfClass { class } => Err(BootError::ElfClass { path: path.into(), class }),
        KernelFile::Elf { load_end } => {
            match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
                Ok(result) if !layout.in_ram(HIMEM_START, result.kernel_end) => Err(too_big(None)),
                Ok(result) => {
                    let segments = kernel_file::read_only_segments(&mut file);
                    Ok(from_elf(result, ReadOnlyKernel { file, segments }))
                }
                Err(source) if load_end.is_some_and(|end| !layout.in_ram(HIMEM_START, end)) => {
                    Err(too_big(Some(source)))
                }
                Err(source) => Err(BootError::ElfLoad { path: path.into(), source }),
            }
        }
        KernelFile::NotElf => load_bzimage(mem, file, path, layout),
    }
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    mut file: File,
    path: &Path,
    layout: &VmLayout,
) -> Result<LoadedKernel, BootError> {
    let mem_bytes = layout.mem_bytes();
    use linux_loader::loader::bzimage::Error as BzError;
    use linux_loader::loader::Error as LoaderError;
    let file_size = file.metadata().map_or(0, |m| m.len());
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        // Only an empty protected-mode kernel "loads" at an address past guest RAM.
        Ok(result) if !layout.in_ram(result.kernel_load.raw_value(), result.kernel_end) => {
            Err(BootError::KernelTooBig { path: path.into(), mem_bytes, source: None })
        }
        Ok(result) => Ok(LoadedKernel {
            entry: EntryPoint::Linux64(result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET)),
            end: result.kernel_end,
            setup_header: result.setup_header,
            read_only: None,
        }),
        Err(LoaderError::Bzimage(BzError::InvalidBzImage | BzError::ReadBzImageHeader)) => {
            Err(BootError::NotAKernel { path: path.into() })
        }
        // The compressed kernel goes to 1 MiB and is almost the whole file.
        Err(
            source @ (LoaderError::MemoryOverflow
            | LoaderError::Bzimage(BzError::ReadBzImageCompressedKernel)),
        ) if !layout.in_ram(HIMEM_START, HIMEM_START.saturating_add(file_size)) => {
            Err(BootError::KernelTooBig { path: path.into(), mem_bytes, source: Some(source) })
        }
        Err(source) => Err(BootError::BzImageLoad { path: path.into(), source }),
    }
}

fn from_elf(result: KernelLoaderResult, read_only: ReadOnlyKernel) -> LoadedKernel {
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr),
        _ => EntryPoint::Linux64(result.kernel_load),
    };
    LoadedKernel { entry, end: result.kernel_end, setup_header: None, read_only: Some(read_only) }
}

/// Loads the initrd at the top of low RAM, page aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    layout: &VmLayout,
    kernel_end: u64,
) -> Result<LoadedInitrd, BootError> {
    let err = |source| BootError::Initrd { path: path.into(), source };
    let mut file = open_image("initrd", path)?;
    let size = file.metadata().map_err(err)?.len();
    if size == 0 {
        return Err(BootError::InitrdEmpty { path: path.into() });
    }
    // The lowest end of low RAM that leaves room for it above the kernel, page aligned.
    let needed_bytes =
        kernel_end.checked_next_multiple_of(PAGE_SIZE as u64).unwrap_or(u64::MAX).saturating_add(size);
    if needed_bytes > MMIO_GAP_START {
        return Err(BootError::InitrdTooBigForAnyMem { path: path.into(), size, kernel_end });
    }
    if needed_bytes > layout.low_ram_end() {
        let mem_bytes = layout.mem_bytes();
        return Err(BootError::InitrdTooBig { path: path.into(), size, mem_bytes, needed_bytes });
    }
    let addr = (layout.low_ram_end() - size) & !(PAGE_SIZE as u64 - 1);
    copy_into_guest(mem, GuestAddress(addr), &mut file, size)
        .map_err(|source| BootError::InitrdCopy { path: path.into(), source })?;
    Ok(LoadedInitrd { addr: GuestAddress(addr), size })
}

/// Reads `size` bytes of `src` into guest RAM at `addr`. vm-memory's `read_exact_volatile_from`
/// takes a short read for an error, and one read(2) moves at most 2 GiB - 4 KiB: this reads
/// until done, and fails only at the end of `src` (a file that shrank) or on an error.
fn copy_into_guest<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    src: &mut F,
    size: u64,
) -> Result<(), GuestMemoryError> {
    let mut done = 0u64;
    while done < size {
        let rest = usize::try_from(size - done).unwrap_or(usize::MAX);
        match mem.read_volatile_from(addr.unchecked_add(done), src, rest)? {
            0 => {
                return Err(GuestMemoryError::PartialBuffer {
                    expected: size as usize,
                    completed: done as usize,
                })
            }
            n => done += n as u64,
        }
    }
    Ok(())
}

/// Builds a command line within the Linux x86 limit.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    for part in parts.iter().filter(|p| !p.trim().is_empty()) {
        cmdline.insert_str(part.trim()).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line at [`CMDLINE_START`]; returns its length with the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<u32, BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::CmdlineLoad)?;
    let len = cmdline.as_cstring().map_err(BootError::Cmdline)?.as_bytes_with_nul().len();
    Ok(len as u32)
}

/// Writes the zero page for the Linux 64-bit boot protocol.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_size: u32,
    initrd: Option<LoadedInitrd>,
    layout: &VmLayout,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (i, (addr, size)) in layout.memory_map().into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: E820_RAM };
        params.e820_entries = (i + 1) as u8;
    }
    let boot = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem).map_err(BootError::BootParams)
}

/// Writes `hvm_start_info`, the module list (the initrd) and the memory map for PVH entry.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<LoadedInitrd>,
    layout: &VmLayout,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .memory_map()
        .into_iter()
        .take(PVH_MEMMAP_MAX_ENTRIES)
        .map(|(addr, size)| hvm_memmap_table_entry { addr, size, type_: E820_RAM, reserved: 0 })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
        let module =
            hvm_modlist_entry { paddr: initrd.addr.raw_value(), size: initrd.size, ..Default::default() };
        boot.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(PVH_MODLIST_START));
    }
    boot.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem).map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn layout(bytes: u64) -> VmLayout {
        VmLayout::new(bytes, 0)
    }

    fn mem(bytes: u64) -> GuestMemoryMmap {
        crate::memory::create_guest_memory(&layout(bytes)).expect("guest memory")
    }

    #[test]
    fn a_file_that_is_no_kernel_is_rejected() {
        let file = vmm_sys_util::tempfile::TempFile::new().expect("tempfile");
        file.as_file().write_all(&[0x42; 8192]).expect("write");
        let err = load_kernel(&mem(32 << 20), file.as_path(), &layout(32 << 20)).expect_err("not a kernel");
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
    }

    #[test]
    fn an_empty_bzimage_kernel_past_guest_ram_does_not_load() {
        // Setup sectors only: boot_flag, "HdrS", version 2.15, LOADED_HIGH, code32_start at
        // 17 MiB, past 16 MiB of guest RAM; no protected-mode kernel after them.
        let mut image = vec![0u8; 5 * 512];
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 1;
        image[0x214..0x218].copy_from_slice(&0x110_0000u32.to_le_bytes());
        let file = vmm_sys_util::tempfile::TempFile::new().expect("tempfile");
        file.as_file().write_all(&image).expect("write");
        let err =
            load_kernel(&mem(16 << 20), file.as_path(), &layout(16 << 20)).expect_err("kernel past RAM");
        assert!(matches!(err, BootError::KernelTooBig { source: None, .. }), "{err}");
    }

    /// Gives at most 7 bytes per read, as read(2) may (it stops at 2 GiB - 4 KiB).
    struct ShortReads<'a>(&'a [u8]);

    impl ReadVolatile for ShortReads<'_> {
        fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
            &mut self,
            buf: &mut vm_memory::VolatileSlice<B>,
        ) -> Result<usize, vm_memory::VolatileMemoryError> {
            let mut part = buf.subslice(0, buf.len().min(7))?;
            self.0.read_volatile(&mut part)
        }
    }

    #[test]
    fn initrd_copy_survives_short_reads_and_notices_a_short_file() {
        let m = mem(32 << 20);
        let data: Vec<u8> = (0..100u8).collect();
        copy_into_guest(&m, GuestAddress(0x10_0000), &mut ShortReads(&data), 100).expect("short reads");
        let mut back = [0u8; 100];
        m.read_slice(&mut back, GuestAddress(0x10_0000)).expect("read back");
        assert_eq!(back[..], data[..]);
        let err = copy_into_guest(&m, GuestAddress(0x10_0000), &mut ShortReads(&data), 101).expect_err("EOF");
        assert!(matches!(err, GuestMemoryError::PartialBuffer { expected: 101, completed: 100 }), "{err}");
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let file = vmm_sys_util::tempfile::TempFile::new().expect("tempfile");
        file.as_file().write_all(&[7; 10000]).expect("write");
        let m = mem(32 << 20);
        let initrd = load_initrd(&m, file.as_path(), &layout(32 << 20), 0x20_0000).expect("initrd");
        assert_eq!(initrd.size, 10000);
        assert_eq!(initrd.addr.raw_value() % 4096, 0);
        assert!(initrd.addr.raw_value() + 10000 <= 32 << 20);
        assert_eq!(m.read_obj::<u8>(initrd.addr).expect("byte"), 7);
        let err = load_initrd(&m, file.as_path(), &layout(32 << 20), (32 << 20) - 4096).expect_err("too big");
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
    }

    #[test]
    fn pvh_start_info_carries_magic_cmdline_and_initrd() {
        let m = mem(64 << 20);
        let initrd = LoadedInitrd { addr: GuestAddress(0x300_0000), size: 1234 };
        write_pvh_start_info(&m, Some(initrd), &layout(64 << 20)).expect("start info");
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).expect("read");
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 2);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).expect("module");
        assert_eq!((module.paddr, module.size), (0x300_0000, 1234));
    }

    #[test]
    fn overlong_cmdline_is_an_error() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(build_cmdline(&[&long]), Err(BootError::Cmdline(_))));
    }
}
