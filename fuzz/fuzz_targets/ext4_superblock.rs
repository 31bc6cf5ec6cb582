//! The ext2/3/4 superblock check (`src/ext4.rs`) that decides whether a shared image's
//! filesystem has blocks smaller than a page: `block_size` and the warning built from it, on
//! bytes from an image file a user names.
//!
//! The first byte picks the input's form: below 128, a superblock built from the rest (block
//! size exponent 0 to 7, inode and group fields from the next bytes, mostly in range, the
//! other bytes as given, the magic and first data block right), whose answer is restated here
//! from the superblock's rules; otherwise the rest as raw bytes. Checked, for any input: no
//! panic; an answer is a block size of 1 KiB to 64 KiB that the magic number,
//! `s_log_block_size` and `s_first_data_block` at their offsets agree with; bytes past the
//! superblock change nothing; the warning comes exactly for blocks below 4 KiB.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use samepage::ext4::{block_size, small_blocks_warning, PAGE_ALIGNED_BLOCK, SUPERBLOCK_LEN};

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// A superblock from `rest`: its first byte gives the block size exponent, the next three
/// pairs the inode count and the blocks and inodes per group (mostly in range), the rest of
/// the bytes the fields not checked. Returns it and the block size it must be found to have.
fn built(rest: &[u8]) -> (Vec<u8>, Option<u32>) {
    let byte = |i: usize| rest.get(i).copied().unwrap_or(0);
    let pair = |i: usize| u32::from(u16::from_le_bytes([byte(i), byte(i + 1)]));
    let mut sb = vec![0u8; SUPERBLOCK_LEN];
    let n = rest.len().min(SUPERBLOCK_LEN);
    sb[..n].copy_from_slice(&rest[..n]);
    let log = u32::from(byte(0) % 8);
    let block = 1024u32 << log;
    let (inodes, blocks_per_group, inodes_per_group) = (pair(1), pair(3) * 8, pair(5));
    for (at, value) in [
        (0, inodes),
        (20, u32::from(block == 1024)),
        (24, log),
        (32, blocks_per_group),
        (40, inodes_per_group),
    ] {
        sb[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
    let bitmap_bits = 8 * block;
    let valid = log <= 6
        && inodes > 0
        && (1..=bitmap_bits).contains(&blocks_per_group)
        && (1..=bitmap_bits).contains(&inodes_per_group);
    (sb, valid.then_some(block))
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else { return };
    let (superblock, expected) = if form < 128 {
        let (sb, expected) = built(rest);
        (sb, Some(expected))
    } else {
        (rest.to_vec(), None)
    };
    let found = block_size(&superblock);
    if let Some(expected) = expected {
        assert_eq!(found, expected, "built superblock");
    }
    if let Some(block) = found {
        assert!(superblock.len() >= SUPERBLOCK_LEN, "an answer from {} bytes", superblock.len());
        assert!(block.is_power_of_two() && (1024..=65536).contains(&block), "block size {block}");
        assert_eq!(&superblock[56..58], &[0x53, 0xEF], "magic");
        assert_eq!(1024u64 << le32(&superblock, 24), u64::from(block), "s_log_block_size");
        assert_eq!(le32(&superblock, 20), u32::from(block == 1024), "s_first_data_block");
        let warning = small_blocks_warning(Path::new("image"), block);
        assert_eq!(warning.is_some(), block < PAGE_ALIGNED_BLOCK, "warning for {block}-byte blocks");
    }
    if superblock.len() > SUPERBLOCK_LEN {
        assert_eq!(block_size(&superblock[..SUPERBLOCK_LEN]), found, "bytes past the superblock");
    }
});
