//! What the host pays per page when a guest leaves hashing to it (`VIRTIO_FPHASH_F_HOST_HASH`;
//! `docs/fphash.md` quotes the figure): BLAKE3 of distinct 4 KiB pages, more of them than the
//! caches hold, as in merge batches. A measurement, not a test:
//!
//! `cargo bench --bench host_hash`

use std::hint::black_box;
use std::time::Instant;

const PAGE_SIZE: usize = 4096;
/// Distinct pages hashed per round: 16 MiB.
const PAGES: usize = 4096;
const ROUNDS: usize = 20;

/// Reproducible, distinct page contents (xorshift64).
fn pages() -> Vec<[u8; PAGE_SIZE]> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut pages = vec![[0u8; PAGE_SIZE]; PAGES];
    for page in &mut pages {
        for chunk in page.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
    }
    pages
}

fn main() {
    let pages = pages();
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for page in &pages {
            black_box(blake3::hash(black_box(page)));
        }
        times.push(start.elapsed().as_secs_f64() * 1e6 / PAGES as f64);
    }
    times.sort_by(f64::total_cmp);
    let best = times[0];
    let median = times[ROUNDS / 2];
    let gib_per_s = PAGE_SIZE as f64 / (best * 1e-6) / f64::from(1u32 << 30);
    println!("host BLAKE3 of a 4 KiB page, {ROUNDS} rounds of {PAGES} distinct pages");
    println!("| best | median | worst | best rate |");
    println!("|---|---|---|---|");
    println!("| {best:.2} µs | {median:.2} µs | {:.2} µs | {gib_per_s:.2} GiB/s |", times[ROUNDS - 1]);
}
