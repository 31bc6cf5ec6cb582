//! Enough of an ext2/3/4 superblock to tell whether a shared read-only image can be shared page
//! by page. Image sharing maps a guest's read of whole 4 KiB pages at 4 KiB-aligned image
//! offsets (`docs/fphash.md`, "Read-only images"); a filesystem with 1 KiB or 2 KiB blocks
//! (what `mkfs.ext4` makes for images smaller than 512 MiB unless told `-b 4096`) places file
//! data at block, not page, boundaries, so the guest's page cache reads of it never line up
//! with the image's pages and are copied. Nothing else would say so: the VM runs, only without
//! sharing.
//!
//! The superblock is read from an image a user names, so every field used is checked; anything
//! that does not hold together is "not ext2/3/4", never a panic.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where the superblock starts in the image.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// The superblock's size.
pub const SUPERBLOCK_LEN: usize = 1024;
/// `s_magic`.
const MAGIC: u16 = 0xEF53;
/// Largest `s_log_block_size`: 64 KiB blocks (1024 << 6), the most ext4 formats.
const MAX_LOG_BLOCK_SIZE: u32 = 6;
/// Smallest block size whose blocks start on page boundaries.
pub const PAGE_ALIGNED_BLOCK: u32 = 4096;

// Field offsets in the superblock (the kernel's `struct ext4_super_block`).
const S_INODES_COUNT: usize = 0;
const S_FIRST_DATA_BLOCK: usize = 20;
const S_LOG_BLOCK_SIZE: usize = 24;
const S_BLOCKS_PER_GROUP: usize = 32;
const S_INODES_PER_GROUP: usize = 40;
const S_MAGIC: usize = 56;

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

/// The block size of the ext2/3/4 filesystem whose superblock is `superblock` (the image's
/// bytes from [`SUPERBLOCK_OFFSET`]), or `None` when it is not one that holds together: the
/// magic number, a block size of 1 KiB to 64 KiB, the first data block that size implies (1
/// with 1 KiB blocks, else 0), inodes, and groups whose block and inode bitmaps fit in a block.
pub fn block_size(superblock: &[u8]) -> Option<u32> {
    if superblock.len() < SUPERBLOCK_LEN || le16(superblock, S_MAGIC)? != MAGIC {
        return None;
    }
    let log = le32(superblock, S_LOG_BLOCK_SIZE)?;
    if log > MAX_LOG_BLOCK_SIZE {
        return None;
    }
    let block = 1024u32 << log;
    let bits_per_bitmap = 8 * block;
    let first_data_block = u32::from(block == 1024);
    let holds = le32(superblock, S_FIRST_DATA_BLOCK)? == first_data_block
        && le32(superblock, S_INODES_COUNT)? > 0
        && (1..=bits_per_bitmap).contains(&le32(superblock, S_BLOCKS_PER_GROUP)?)
        && (1..=bits_per_bitmap).contains(&le32(superblock, S_INODES_PER_GROUP)?);
    holds.then_some(block)
}

/// The warning for a shared image whose ext2/3/4 filesystem has `block`-byte blocks, if they
/// are smaller than a page.
pub fn small_blocks_warning(image: &Path, block: u32) -> Option<String> {
    (block < PAGE_ALIGNED_BLOCK).then(|| {
        format!(
            "disk {}: its ext2/3/4 filesystem has {block}-byte blocks, so file data is not 4 KiB-aligned \
             in the image and the guest's reads of it are copied, not shared page by page; for sharing, \
             make the image with 4 KiB blocks (mkfs.ext4 -b 4096)",
            crate::escape_controls(&image.display().to_string())
        )
    })
}

/// Warns, once per image in this process, when the shared image `image` holds an ext2/3/4
/// filesystem with blocks smaller than a page; `read_at` reads the image's bytes at an offset.
/// An image that cannot be read there, or holds no such filesystem, says nothing.
pub fn warn_if_small_blocks(image: &Path, read_at: impl FnOnce(&mut [u8], u64) -> std::io::Result<()>) {
    let mut superblock = [0u8; SUPERBLOCK_LEN];
    if read_at(&mut superblock, SUPERBLOCK_OFFSET).is_err() {
        return;
    }
    let Some(warning) = block_size(&superblock).and_then(|block| small_blocks_warning(image, block)) else {
        return;
    };
    // Many VMs of one process (density --threads) open the same image.
    static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if warned.get_or_insert_with(HashSet::new).insert(image.to_path_buf()) {
        log::warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A superblock as mkfs.ext4 writes one for `log` (block size 1024 << log).
    fn superblock(log: u32) -> Vec<u8> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        let block = 1024u32 << log;
        let mut put = |at: usize, value: u32| sb[at..at + 4].copy_from_slice(&value.to_le_bytes());
        put(S_INODES_COUNT, 2048);
        put(S_FIRST_DATA_BLOCK, u32::from(block == 1024));
        put(S_LOG_BLOCK_SIZE, log);
        put(S_BLOCKS_PER_GROUP, 8 * block);
        put(S_INODES_PER_GROUP, 2048);
        sb[S_MAGIC..S_MAGIC + 2].copy_from_slice(&MAGIC.to_le_bytes());
        sb
    }

    #[test]
    fn block_sizes_of_well_formed_superblocks() {
        for log in 0..=MAX_LOG_BLOCK_SIZE {
            assert_eq!(block_size(&superblock(log)), Some(1024 << log), "log {log}");
        }
    }

    #[test]
    fn superblocks_that_do_not_hold_together_are_not_ext() {
        type Edit = fn(&mut Vec<u8>);
        let broken: [(&str, Edit); 9] = [
            ("short", |sb| sb.truncate(SUPERBLOCK_LEN - 1)),
            ("no magic", |sb| sb[S_MAGIC] ^= 1),
            ("block size past 64 KiB", |sb| sb[S_LOG_BLOCK_SIZE] = 7),
            ("huge log", |sb| sb[S_LOG_BLOCK_SIZE + 3] = 0x80),
            ("first data block", |sb| sb[S_FIRST_DATA_BLOCK] = 0),
            ("no inodes", |sb| sb[S_INODES_COUNT..S_INODES_COUNT + 4].fill(0)),
            ("no blocks per group", |sb| sb[S_BLOCKS_PER_GROUP..S_BLOCKS_PER_GROUP + 4].fill(0)),
            ("blocks per group past a bitmap", |sb| sb[S_BLOCKS_PER_GROUP + 2] = 1),
            ("inodes per group past a bitmap", |sb| sb[S_INODES_PER_GROUP + 3] = 1),
        ];
        for (what, edit) in broken {
            let mut sb = superblock(0);
            edit(&mut sb);
            assert_eq!(block_size(&sb), None, "{what}");
        }
        assert_eq!(block_size(&[]), None);
        assert_eq!(block_size(&[0xff; SUPERBLOCK_LEN]), None);
    }

    #[test]
    fn only_blocks_smaller_than_a_page_are_warned_about() {
        let path = Path::new("/img/base\n.ext4");
        let warning = small_blocks_warning(path, 1024).expect("1 KiB blocks");
        assert!(
            warning.starts_with("disk /img/base\\n.ext4: ") && warning.contains("1024-byte blocks"),
            "{warning}"
        );
        assert!(small_blocks_warning(path, 2048).is_some());
        assert!(small_blocks_warning(path, 4096).is_none());
        assert!(small_blocks_warning(path, 65536).is_none());
    }

    #[test]
    fn unreadable_images_say_nothing() {
        warn_if_small_blocks(Path::new("x"), |_, _| {
            Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
        });
    }
}
