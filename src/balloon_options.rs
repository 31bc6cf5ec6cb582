//! What the user asks of a VM's balloon: `--balloon [free-page-reporting=on|off][,stats=SECS]
//! [,deflate-on-oom=on|off]`, parsed and written back (density passes it to its VMs), and the
//! sizes `samepage balloon --target` takes.
//!
//! Contract: every value comes from a command line; a malformed one is a
//! [`BalloonOptionsError`] naming it, never a panic; [`BalloonOptions::to_arg`] writes what
//! parses back to the same options. A leaf: configuration and the balloon both use it.

use std::str::FromStr;
use std::time::Duration;

use samepage_virtio::balloon::BalloonConfig;

/// Longest statistics period (an hour; longer ones are surely typos).
pub const MAX_STATS_SECS: u64 = 3600;

/// The syntax of `--balloon`'s value, for messages.
pub const SYNTAX: &str = "[free-page-reporting=on|off][,stats=SECS][,deflate-on-oom=on|off]";

/// A balloon value the user gave that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalloonOptionsError {
    /// A `--balloon` value that is not the balloon's options.
    #[error(
        "invalid balloon options '{0}': expected {SYNTAX} (SECS: whole seconds, 0 to {MAX_STATS_SECS}; 0: \
         no statistics)"
    )]
    Options(String),
    /// A balloon target that is not a size of whole 4 KiB pages the device can hold.
    #[error(
        "invalid balloon target '{0}': expected e.g. 0, 512K, 64M or 2G (whole 4 KiB pages, below 16 TiB)"
    )]
    Target(String),
}

/// A VM's balloon as `--balloon` asks for it. `--balloon` alone: free page reporting on, no
/// statistics, no deflate on OOM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Offer VIRTIO_BALLOON_F_PAGE_REPORTING: the guest reports free pages, which the host
    /// takes back.
    pub free_page_reporting: bool,
    /// Ask the guest for memory statistics this often (`stats=SECS`, whole seconds); `None`
    /// (`stats=0`): no statistics queue.
    pub stats_every: Option<Duration>,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back from the balloon,
    /// below the target, when it runs out of memory.
    pub deflate_on_oom: bool,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        BalloonOptions { free_page_reporting: true, stats_every: None, deflate_on_oom: false }
    }
}

impl BalloonOptions {
    /// What the device offers.
    pub fn device_config(&self) -> BalloonConfig {
        BalloonConfig {
            stats: self.stats_every.is_some(),
            deflate_on_oom: self.deflate_on_oom,
            free_page_reporting: self.free_page_reporting,
        }
    }

    /// The `--balloon` value that gives these options, every key spelled out.
    pub fn to_arg(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        format!(
            "free-page-reporting={},stats={},deflate-on-oom={}",
            on(self.free_page_reporting),
            self.stats_every.map_or(0, |d| d.as_secs()),
            on(self.deflate_on_oom)
        )
    }
}

impl FromStr for BalloonOptions {
    type Err = BalloonOptionsError;

    /// Comma-separated `key=value`s, each key at most once, in any order; empty: the
    /// defaults.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BalloonOptionsError::Options(text.to_string());
        let switch = |value: &str| match value {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(bad()),
        };
        let mut options = BalloonOptions::default();
        let mut seen = [false; 3];
        if text.is_empty() {
            return Ok(options);
        }
        for part in text.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(bad)?;
            let index = match key {
                "free-page-reporting" => {
                    options.free_page_reporting = switch(value)?;
                    0
                }
                "stats" => {
                    // Whole seconds only: digits, no sign, no fraction.
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad());
                    }
                    let secs: u64 = value.parse().map_err(|_| bad())?;
                    if secs > MAX_STATS_SECS {
                        return Err(bad());
                    }
                    options.stats_every = (secs > 0).then(|| Duration::from_secs(secs));
                    1
                }
                "deflate-on-oom" => {
                    options.deflate_on_oom = switch(value)?;
                    2
                }
                _ => return Err(bad()),
            };
            if std::mem::replace(&mut seen[index], true) {
                return Err(bad());
            }
        }
        Ok(options)
    }
}

/// Parses a balloon target, `samepage balloon --target SIZE`: a number of bytes with an
/// optional K, M or G suffix (powers of 1024), a bare number being MiB, as `--mem` takes
/// them; 0 empties the balloon. It must be whole 4 KiB pages and fit the device's 32-bit page
/// count; whether it fits the VM's RAM only the VM knows.
pub fn parse_target(text: &str) -> Result<u64, BalloonOptionsError> {
    let bad = || BalloonOptionsError::Target(text.to_string());
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'k' | 'K')) => (&trimmed[..i], 10),
        Some((i, 'm' | 'M')) => (&trimmed[..i], 20),
        Some((i, 'g' | 'G')) => (&trimmed[..i], 30),
        Some(_) => (trimmed, 20),
        None => return Err(bad()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let bytes = value.checked_shl(shift).filter(|b| b >> shift == value).ok_or_else(bad)?;
    if !bytes.is_multiple_of(4096) || bytes / 4096 > u64::from(u32::MAX) {
        return Err(bad());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_balloon_takes_keys_in_any_order_and_defaults_for_the_rest() {
        assert_eq!("".parse(), Ok(BalloonOptions::default()));
        assert!(BalloonOptions::default().free_page_reporting);
        let o: BalloonOptions = "stats=5,free-page-reporting=off".parse().unwrap();
        assert_eq!(
            o,
            BalloonOptions {
                free_page_reporting: false,
                stats_every: Some(Duration::from_secs(5)),
                deflate_on_oom: false
            }
        );
        let o: BalloonOptions = "deflate-on-oom=on,stats=0".parse().unwrap();
        assert_eq!((o.deflate_on_oom, o.stats_every, o.free_page_reporting), (true, None, true));
        assert_eq!(
            "stats=3600".parse::<BalloonOptions>().unwrap().stats_every,
            Some(Duration::from_secs(3600))
        );
        let c = o.device_config();
        assert_eq!((c.stats, c.deflate_on_oom, c.free_page_reporting), (false, true, true));
    }

    #[test]
    fn malformed_balloon_options_are_refused_by_name() {
        for bad in [
            ",",
            "stats",
            "stats=",
            "stats=-1",
            "stats=+5",
            "stats=1.5",
            "stats=3601",
            "stats=18446744073709551616",
            "stats=5,stats=6",
            "free-page-reporting=yes",
            "free-page-reporting=ON",
            "free-page-reporting=on,",
            "deflate-on-oom",
            "deflate_on_oom=on",
            "target=64M",
            " stats=5",
            "stats=5 ",
            "stats=٣",
            "free-page-reporting=on,free-page-reporting=off",
            "=on",
        ] {
            assert_eq!(
                bad.parse::<BalloonOptions>(),
                Err(BalloonOptionsError::Options(bad.to_string())),
                "{bad:?}"
            );
        }
        let message = BalloonOptionsError::Options("x".into()).to_string();
        assert!(message.contains(SYNTAX), "{message}");
    }

    #[test]
    fn balloon_options_go_through_their_argument_and_back() {
        for o in [
            BalloonOptions::default(),
            BalloonOptions {
                free_page_reporting: false,
                stats_every: Some(Duration::from_secs(1)),
                deflate_on_oom: true,
            },
            BalloonOptions {
                free_page_reporting: true,
                stats_every: Some(Duration::from_secs(3600)),
                deflate_on_oom: false,
            },
        ] {
            assert_eq!(o.to_arg().parse(), Ok(o), "{}", o.to_arg());
        }
        assert_eq!(BalloonOptions::default().to_arg(), "free-page-reporting=on,stats=0,deflate-on-oom=off");
    }

    #[test]
    fn targets_are_whole_pages_in_the_devices_range() {
        assert_eq!(parse_target("0"), Ok(0));
        assert_eq!(parse_target("64"), Ok(64 << 20));
        assert_eq!(parse_target("64M"), Ok(64 << 20));
        assert_eq!(parse_target("8k"), Ok(8 << 10));
        assert_eq!(parse_target("2G"), Ok(2 << 30));
        assert_eq!(parse_target("16383G"), Ok(16383 << 30));
        for bad in
            ["", "M", "-1", "+1M", "1.5M", "6K", "16384G", "99999999999999999999", "1T", "64 M", "0x10"]
        {
            assert_eq!(parse_target(bad), Err(BalloonOptionsError::Target(bad.to_string())), "{bad:?}");
        }
    }
}
