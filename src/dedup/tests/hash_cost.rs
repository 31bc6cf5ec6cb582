//! What the host pays per page when a guest leaves hashing to it (`VIRTIO_FPHASH_F_HOST_HASH`,
//! `docs/fphash.md` quotes the figure). Run it with:
//! `cargo nextest run -E 'test(host_blake3_cost_per_page)' --run-ignored only --no-capture`

use std::hint::black_box;
use std::time::Instant;

use super::*;

/// Distinct pages hashed per round: 16 MiB, more than the caches hold, as in a merge batch.
const PAGES: usize = 4096;
const ROUNDS: usize = 20;

#[test]
#[ignore = "a measurement, not a check: prints the host's BLAKE3 time per 4 KiB page"]
fn host_blake3_cost_per_page() {
    let mut pages = vec![[0u8; PAGE_SIZE]; PAGES];
    for (i, page) in pages.iter_mut().enumerate() {
        *page = file_page(77, i);
    }
    let mut best = f64::INFINITY;
    let mut first = [0u8; 32];
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for page in &pages {
            first = *black_box(blake3::hash(black_box(page))).as_bytes();
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    let us_per_page = best * 1e6 / PAGES as f64;
    let gib_per_s = (PAGES * PAGE_SIZE) as f64 / best / f64::from(1u32 << 30);
    println!(
        "host BLAKE3: {us_per_page:.2} µs per 4 KiB page ({gib_per_s:.2} GiB/s), best of {ROUNDS} rounds \
         of {PAGES} distinct pages"
    );
    // The measurement hashed real, distinct content.
    assert_eq!(first, *blake3::hash(&pages[PAGES - 1]).as_bytes());
    assert_ne!(blake3::hash(&pages[0]), blake3::hash(&pages[1]));
}
