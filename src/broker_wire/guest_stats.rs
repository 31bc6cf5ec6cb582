//! A guest's balloon statistics on the broker's wire (GUEST_STATS, `docs/dedupd.md`): the
//! [`GuestStats`] entry built from the balloon's [`GuestMemoryStats`] and read back into it,
//! and the one check both sides apply to it. The VMM sends only figures that pass
//! [`check`] (its guest may say anything); the broker refuses any that do not (its clients
//! may send anything).
//!
//! Contract: nothing here panics on any bit pattern; an entry that passes [`check`] reads
//! back ([`to_memory_stats`]) into exactly the statistics it was built from.

use samepage_virtio::balloon::wire::{S_AVAIL, S_CACHES, S_MEMFREE, S_MEMTOT};
use samepage_virtio::balloon::GuestMemoryStats;

use super::proto::{GuestStats, GUEST_STAT_TAGS};

/// The statistics that are sizes of the guest's memory now (not counts, nor bytes moved
/// since boot): none may exceed the guest's RAM.
const SIZE_TAGS: [(u16, &str); 4] =
    [(S_MEMFREE, "free"), (S_MEMTOT, "total"), (S_AVAIL, "available"), (S_CACHES, "disk caches")];

/// Why a GUEST_STATS entry is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestStatsError {
    /// `reserved`, or a bit of `present` beyond the known tags, is set.
    #[error("reserved bits set (present {present:#x}, reserved {reserved:#x})")]
    Reserved {
        /// `present`.
        present: u32,
        /// `reserved`.
        reserved: u32,
    },
    /// A value without its `present` bit is not 0.
    #[error("statistic {tag} is absent but its value is {value}")]
    ValueOfAbsent {
        /// Its tag.
        tag: usize,
        /// The value.
        value: u64,
    },
    /// A memory size beyond the guest's RAM.
    #[error("{name} memory of {value} bytes is more than the guest's {ram} bytes of RAM")]
    OverRam {
        /// Which size.
        name: &'static str,
        /// The value.
        value: u64,
        /// The guest's RAM.
        ram: u64,
    },
    /// More memory free than there is.
    #[error("{free} bytes free of {total} bytes total")]
    FreeOverTotal {
        /// Free bytes.
        free: u64,
        /// Total bytes.
        total: u64,
    },
}

impl GuestStatsError {
    /// Whether the entry breaks the layout (rather than saying something impossible).
    pub fn is_malformed(&self) -> bool {
        matches!(self, GuestStatsError::Reserved { .. } | GuestStatsError::ValueOfAbsent { .. })
    }
}

/// The entry for `stats` (statistics of tags beyond the entry's room are left out; there
/// are none today).
pub fn from_memory_stats(stats: &GuestMemoryStats) -> GuestStats {
    let mut entry = GuestStats::default();
    for (tag, value) in entry.values.iter_mut().enumerate() {
        let Some(v) = u16::try_from(tag).ok().and_then(|t| stats.get(t)) else { continue };
        *value = v;
        entry.present |= 1 << tag;
    }
    entry
}

/// The statistics an entry holds (call [`check`] first: this reads whatever it is given).
pub fn to_memory_stats(entry: &GuestStats) -> GuestMemoryStats {
    let mut stats = GuestMemoryStats::default();
    for (tag, &value) in entry.values.iter().enumerate() {
        if entry.present & (1 << tag) != 0 {
            if let Ok(t) = u16::try_from(tag) {
                stats.set(t, value);
            }
        }
    }
    stats
}

/// Checks an entry of a guest with `ram_bytes` of RAM: its layout (reserved bits, values
/// only where `present` says), then that no memory size exceeds the RAM and free memory
/// does not exceed the total. Counts, and bytes swapped or scanned since boot, may be
/// anything.
pub fn check(entry: &GuestStats, ram_bytes: u64) -> Result<(), GuestStatsError> {
    let known = (1u32 << GUEST_STAT_TAGS) - 1;
    if entry.reserved != 0 || entry.present & !known != 0 {
        return Err(GuestStatsError::Reserved { present: entry.present, reserved: entry.reserved });
    }
    let present = |tag: usize| entry.present & (1 << tag) != 0;
    if let Some((tag, &value)) = entry.values.iter().enumerate().find(|&(tag, &v)| !present(tag) && v != 0) {
        return Err(GuestStatsError::ValueOfAbsent { tag, value });
    }
    let value = |tag: u16| present(usize::from(tag)).then(|| entry.values[usize::from(tag)]);
    for (tag, name) in SIZE_TAGS {
        if let Some(v) = value(tag).filter(|&v| v > ram_bytes) {
            return Err(GuestStatsError::OverRam { name, value: v, ram: ram_bytes });
        }
    }
    if let (Some(free), Some(total)) = (value(S_MEMFREE), value(S_MEMTOT)) {
        if free > total {
            return Err(GuestStatsError::FreeOverTotal { free, total });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use samepage_virtio::balloon::wire::{S_DIRECT_RECLAIM, S_MAJFLT, S_SWAP_IN};

    const RAM: u64 = 64 << 20;

    fn linux_like() -> GuestMemoryStats {
        GuestMemoryStats {
            swap_in: Some(0),
            major_faults: Some(12),
            minor_faults: Some(34_567),
            free_memory: Some(40 << 20),
            total_memory: Some(60 << 20),
            available_memory: Some(45 << 20),
            disk_caches: Some(3 << 20),
            direct_reclaims: Some(u64::MAX),
            ..GuestMemoryStats::default()
        }
    }

    #[test]
    fn an_entry_holds_exactly_the_statistics_it_was_built_from() {
        let stats = linux_like();
        let entry = from_memory_stats(&stats);
        assert_eq!(check(&entry, RAM), Ok(()));
        assert_eq!(to_memory_stats(&entry), stats);
        let bits = [S_SWAP_IN, S_MAJFLT, 3, S_MEMFREE, S_MEMTOT, S_AVAIL, S_CACHES, S_DIRECT_RECLAIM];
        assert_eq!(entry.present, bits.iter().map(|&t| 1u32 << t).sum::<u32>());
        assert_eq!(entry.values[usize::from(S_MEMTOT)], 60 << 20);
        let none = from_memory_stats(&GuestMemoryStats::default());
        assert_eq!((none, check(&none, RAM)), (GuestStats::default(), Ok(())));
    }

    #[test]
    fn bad_layouts_and_impossible_sizes_are_refused() {
        let good = from_memory_stats(&linux_like());
        let with = |tag: u16, value: u64| {
            let mut e = good;
            e.values[usize::from(tag)] = value;
            e
        };
        let (present, total) = (good.present, 60 << 20);
        let cases = [
            (
                "reserved set",
                GuestStats { reserved: 1, ..good },
                GuestStatsError::Reserved { present, reserved: 1 },
            ),
            (
                "an unknown tag's bit",
                GuestStats { present: present | 1 << 16, ..good },
                GuestStatsError::Reserved { present: present | 1 << 16, reserved: 0 },
            ),
            (
                "a value without its bit",
                GuestStats { present: present & !(1 << S_MAJFLT), ..good },
                GuestStatsError::ValueOfAbsent { tag: 2, value: 12 },
            ),
            (
                "total above the RAM",
                with(S_MEMTOT, RAM + 1),
                GuestStatsError::OverRam { name: "total", value: RAM + 1, ram: RAM },
            ),
            (
                "caches of u64::MAX",
                with(S_CACHES, u64::MAX),
                GuestStatsError::OverRam { name: "disk caches", value: u64::MAX, ram: RAM },
            ),
            (
                "more free than total",
                with(S_MEMFREE, total + 1),
                GuestStatsError::FreeOverTotal { free: total + 1, total },
            ),
        ];
        for (what, entry, expected) in cases {
            assert_eq!(check(&entry, RAM), Err(expected), "{what}");
            let malformed =
                matches!(expected, GuestStatsError::Reserved { .. } | GuestStatsError::ValueOfAbsent { .. });
            assert_eq!(expected.is_malformed(), malformed, "{what}");
        }
        // Free memory alone, or sizes equal to the RAM, are fine.
        let mut edge = GuestStats { present: 1 << S_MEMFREE | 1 << S_AVAIL, ..GuestStats::default() };
        edge.values[usize::from(S_MEMFREE)] = RAM;
        edge.values[usize::from(S_AVAIL)] = RAM;
        assert_eq!(check(&edge, RAM), Ok(()));
    }
}
