//! How much host memory ranges of this process's address space hold, from /proc/self/smaps.

use std::fs::File;
use std::io::{BufRead, BufReader};

/// Resident memory of some address ranges.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resident {
    /// `Rss:` summed (shared pages count once per mapping).
    pub rss_bytes: u64,
    /// `Anonymous:` summed: private pages (never merged, or copied on write).
    pub anonymous_bytes: u64,
}

/// Sorted, merged (start, end) intervals covering `ranges` (start, length): the kernel merges
/// adjacent mappings into one VMA, so a VMA may span several of the ranges.
fn union(ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = ranges.iter().map(|&(base, len)| (base, base + len)).collect();
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Sums smaps figures over the mappings that lie inside the union of `ranges` (start, length).
pub fn resident_in(ranges: &[(usize, usize)]) -> std::io::Result<Resident> {
    let spans = union(ranges);
    let smaps = BufReader::new(File::open("/proc/self/smaps")?);
    let mut inside = false;
    let mut total = Resident::default();
    for line in smaps.lines() {
        let line = line?;
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
            else {
                inside = false;
                continue;
            };
            inside = spans.iter().any(|&(base, limit)| start >= base && end <= limit);
            continue;
        }
        if !inside {
            continue;
        }
        let kib = || line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        if line.starts_with("Rss:") {
            total.rss_bytes += kib();
        } else if line.starts_with("Anonymous:") {
            total.anonymous_bytes += kib();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_ranges_form_one_span() {
        assert_eq!(
            union(&[(0x3000, 0x1000), (0x1000, 0x2000), (0x8000, 0x1000)]),
            vec![(0x1000, 0x4000), (0x8000, 0x9000)]
        );
    }

    #[test]
    fn counts_touched_anonymous_pages() {
        let len = 64 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        for page in 0..16 {
            // SAFETY: inside the mapping.
            unsafe { (addr as *mut u8).add(page * 4096).write_volatile(1) };
        }
        let resident = resident_in(&[(addr as usize, len)]).expect("smaps");
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(addr, len) };
        assert_eq!(resident.anonymous_bytes, 16 * 4096);
        assert_eq!(resident.rss_bytes, 16 * 4096);
    }
}
