//! `--snapshot-at MARKER`: watches the console output for MARKER and raises a flag the
//! VMM thread polls. The guest writes its console a byte at a time, so the watch keeps how much
//! of the marker the last bytes matched.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A console writer that passes everything on and raises `seen` once MARKER went by.
pub struct MarkerWatch {
    out: Box<dyn Write + Send>,
    marker: Vec<u8>,
    /// The longest prefix of the marker the output ends with.
    matched: usize,
    seen: Arc<AtomicBool>,
}

impl MarkerWatch {
    /// Watches what goes to `out` for `marker` (not empty).
    pub fn new(out: Box<dyn Write + Send>, marker: &str, seen: Arc<AtomicBool>) -> MarkerWatch {
        MarkerWatch { out, marker: marker.as_bytes().to_vec(), matched: 0, seen }
    }

    fn feed(&mut self, byte: u8) {
        // Fall back along the marker's own prefixes (Knuth-Morris-Pratt without the table:
        // markers are short).
        loop {
            if self.marker.get(self.matched) == Some(&byte) {
                self.matched += 1;
                break;
            }
            if self.matched == 0 {
                break;
            }
            let tail = &self.marker[1..self.matched];
            self.matched = (0..self.matched)
                .rev()
                .find(|&len| len <= tail.len() && tail.ends_with(&self.marker[..len]))
                .unwrap_or(0);
        }
        if self.matched == self.marker.len() && !self.marker.is_empty() {
            self.seen.store(true, Ordering::Release);
            self.matched = 0;
        }
    }
}

impl Write for MarkerWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.out.write(buf)?;
        buf[..written].iter().for_each(|&b| self.feed(b));
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sees(marker: &str, text: &str) -> bool {
        let seen = Arc::new(AtomicBool::new(false));
        let mut watch = MarkerWatch::new(Box::new(std::io::sink()), marker, seen.clone());
        for byte in text.bytes() {
            watch.write_all(&[byte]).expect("write");
        }
        seen.load(Ordering::Acquire)
    }

    #[test]
    fn the_marker_is_found_across_writes_and_after_false_starts() {
        assert!(sees("snap!", "boot... snap!\n"));
        assert!(sees("aab", "aaab"));
        assert!(sees("abab", "ababab"));
        assert!(sees("abac", "ababac"));
        assert!(!sees("snap!", "snap snap? sna p!"));
        assert!(!sees("abc", "ab"));
    }
}
