//! The guest console as `samepage boot-test` watches it: every byte echoed and logged, lines
//! kept for the verdict (kernel panics, oopses, `BUG:` and `WARNING:` lines with context), an
//! optional `--expect` pattern that ends the run, and KTAP results summarised.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::bus::lock;
use crate::stop::{VmExit, VmStop};

/// Lines kept for "last lines" reports and the verdict; older ones are only in the log.
const KEPT_LINES: usize = 4000;
/// Lines of context kept before and after a kernel failure line.
const CONTEXT_BEFORE: usize = 3;
const CONTEXT_AFTER: usize = 12;
/// Most failure excerpts kept (a guest warning in a loop must not fill memory).
const MAX_EXCERPTS: usize = 16;

/// Strips the printk timestamp ("[    1.234567] ") from a console line, keeping the
/// indentation after it (KTAP nests subtests by indentation).
fn message(line: &str) -> &str {
    match line.trim_start().strip_prefix('[').and_then(|rest| rest.split_once("] ")) {
        Some((stamp, rest)) if stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.') => rest,
        _ => line,
    }
}

/// Which kind of kernel failure a console line reports, if any.
pub fn kernel_failure(line: &str) -> Option<&'static str> {
    let text = message(line).trim_start();
    if text.starts_with("Kernel panic - not syncing") {
        Some("kernel panic")
    } else if text.starts_with("Oops:") || text.contains("] Oops:") {
        Some("oops")
    } else if text.starts_with("BUG:") || text.starts_with("kernel BUG at") {
        Some("BUG")
    } else if text.starts_with("WARNING:") {
        Some("WARNING")
    } else if text.starts_with("general protection fault") {
        Some("general protection fault")
    } else {
        None
    }
}

/// A kernel failure and the console lines around it.
#[derive(Debug, Clone)]
pub struct FailureExcerpt {
    /// What kind of failure.
    pub kind: &'static str,
    /// Context before, the line itself, and context after.
    pub lines: Vec<String>,
    context_after_left: usize,
}

/// KTAP (Documentation/dev-tools/ktap.rst) results seen on the console: leaf test results,
/// i.e. result lines that are not a parent's summary of subtests just before it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KtapSummary {
    /// `ok` results without a SKIP directive.
    pub passed: usize,
    /// `not ok` results without a SKIP directive.
    pub failed: usize,
    /// Results with `# SKIP`.
    pub skipped: usize,
}

impl KtapSummary {
    /// Whether any KTAP result was seen.
    pub fn any(&self) -> bool {
        self.passed + self.failed + self.skipped > 0
    }
}

/// Parses one KTAP result line into (indent, ok, skipped).
fn ktap_result(line: &str) -> Option<(usize, bool, bool)> {
    let text = message(line);
    let body = text.trim_start();
    let indent = text.len() - body.len();
    let (ok, rest) = if let Some(rest) = body.strip_prefix("not ok ") {
        (false, rest)
    } else if let Some(rest) = body.strip_prefix("ok ") {
        (true, rest)
    } else {
        return None;
    };
    let number = rest.split_whitespace().next()?;
    if !number.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let skipped = rest.to_ascii_uppercase().contains("# SKIP");
    Some((indent, ok, skipped))
}

/// Summarises KTAP results in `lines`: a result is a leaf unless the result before it was
/// more deeply indented (its subtests).
pub fn ktap_summary<'a>(lines: impl IntoIterator<Item = &'a str>) -> KtapSummary {
    let mut summary = KtapSummary::default();
    let mut previous_indent: Option<usize> = None;
    let mut seen_header = false;
    for line in lines {
        let text = message(line).trim_start();
        if text.starts_with("KTAP version") || text.starts_with("TAP version") {
            seen_header = true;
            continue;
        }
        let Some((indent, ok, skipped)) = ktap_result(line).filter(|_| seen_header) else { continue };
        let is_parent = previous_indent.is_some_and(|p| p > indent);
        previous_indent = Some(indent);
        if is_parent {
            continue;
        }
        match (ok, skipped) {
            (_, true) => summary.skipped += 1,
            (true, false) => summary.passed += 1,
            (false, false) => summary.failed += 1,
        }
    }
    summary
}

/// What the console recorder keeps.
pub struct ConsoleRecord {
    partial: Vec<u8>,
    /// The last [`KEPT_LINES`] complete lines.
    pub recent: VecDeque<String>,
    /// Kernel failures, with context.
    pub failures: Vec<FailureExcerpt>,
    /// KTAP results so far.
    pub ktap_lines: Vec<String>,
    /// Whether the `--expect` pattern matched.
    pub expect_matched: bool,
    echo: bool,
    log: Option<File>,
    expect: Option<regex::Regex>,
    stop: Arc<VmStop>,
}

impl ConsoleRecord {
    /// A recorder that echoes to stdout if `echo`, appends to `log`, and stops the VM with
    /// status 0 once a line matches `expect`.
    pub fn new(echo: bool, log: Option<File>, expect: Option<regex::Regex>, stop: Arc<VmStop>) -> Self {
        ConsoleRecord {
            partial: Vec::new(),
            recent: VecDeque::new(),
            failures: Vec::new(),
            ktap_lines: Vec::new(),
            expect_matched: false,
            echo,
            log,
            expect,
            stop,
        }
    }

    fn complete_line(&mut self, line: String) {
        for excerpt in self.failures.iter_mut().filter(|e| e.context_after_left > 0) {
            excerpt.lines.push(line.clone());
            excerpt.context_after_left -= 1;
        }
        if let Some(kind) = kernel_failure(&line) {
            if self.failures.len() < MAX_EXCERPTS {
                let before = self.recent.iter().rev().take(CONTEXT_BEFORE).rev().cloned();
                let mut lines: Vec<String> = before.collect();
                lines.push(line.clone());
                self.failures.push(FailureExcerpt { kind, lines, context_after_left: CONTEXT_AFTER });
            }
        }
        if ktap_result(&line).is_some() || message(&line).trim_start().contains("TAP version") {
            self.ktap_lines.push(line.clone());
        }
        if !self.expect_matched && self.expect.as_ref().is_some_and(|re| re.is_match(&line)) {
            self.expect_matched = true;
            self.stop.request(VmExit::GuestStatus(0));
        }
        if self.recent.len() == KEPT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }

    fn take_bytes(&mut self, bytes: &[u8]) {
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(bytes);
        }
        for &byte in bytes {
            if byte == b'\n' {
                let raw = std::mem::take(&mut self.partial);
                let line = String::from_utf8_lossy(&raw).trim_end_matches('\r').to_string();
                self.complete_line(line);
            } else if self.partial.len() < 64 * 1024 {
                self.partial.push(byte);
            }
        }
    }

    /// Flushes a final line without a newline.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            let raw = std::mem::take(&mut self.partial);
            self.complete_line(String::from_utf8_lossy(&raw).to_string());
        }
    }
}

/// The UART's output writer that feeds a shared [`ConsoleRecord`].
pub struct ConsoleTap(pub Arc<Mutex<ConsoleRecord>>);

impl Write for ConsoleTap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).take_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_failures_are_recognised_with_or_without_timestamps() {
        assert_eq!(kernel_failure("[    1.234] Kernel panic - not syncing: boom"), Some("kernel panic"));
        assert_eq!(kernel_failure("WARNING: CPU: 0 PID: 1 at lib/x.c:3 f+0x1/0x2"), Some("WARNING"));
        assert_eq!(kernel_failure("[ 0.5] BUG: kernel NULL pointer dereference"), Some("BUG"));
        assert_eq!(kernel_failure("[ 0.5] Oops: 0002 [#1] SMP"), Some("oops"));
        assert_eq!(kernel_failure("[ 0.5] all fine, no WARNING: here"), None);
        assert_eq!(kernel_failure("samepage-init: reached /init"), None);
    }

    #[test]
    fn ktap_counts_leaves_not_parents() {
        let text = "KTAP version 1\n1..2\n    KTAP version 1\n    # Subtest: blake3\n    1..3\n    ok 1 empty\n    not ok 2 one_page\n    ok 3 skipme # SKIP no hw\nnot ok 1 blake3\nok 2 other\n";
        let summary = ktap_summary(text.lines());
        assert_eq!(summary, KtapSummary { passed: 2, failed: 1, skipped: 1 });
    }

    #[test]
    fn ktap_needs_a_header() {
        assert!(!ktap_summary(["ok 1 looks like tap"]).any());
    }

    #[test]
    fn recorder_keeps_failure_context_and_matches_expect() {
        let stop = Arc::new(VmStop::new());
        let expect = regex::Regex::new("^ready$").ok();
        let record = Arc::new(Mutex::new(ConsoleRecord::new(false, None, expect, stop.clone())));
        let mut tap = ConsoleTap(record.clone());
        tap.write_all(b"a\nb\nc\n[ 1.0] WARNING: CPU: 0 at x\nd\nready\n").expect("write");
        let record = lock(&record);
        assert_eq!(record.failures.len(), 1);
        assert_eq!(
            record.failures[0].lines,
            vec!["a", "b", "c", "[ 1.0] WARNING: CPU: 0 at x", "d", "ready"]
        );
        assert!(record.expect_matched);
        assert_eq!(stop.wait(std::time::Duration::from_millis(1)), Some(VmExit::GuestStatus(0)));
    }
}
