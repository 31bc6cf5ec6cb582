//! The guest console as `samepage boot-test` watches it: every byte echoed and logged, lines
//! kept for the verdict (kernel panics, oopses, `BUG:` and `WARNING:` reports with context,
//! and whether KUnit caught an oops), an optional `--expect` pattern that ends the run, and
//! the lines the KTAP parser needs ([`super::ktap`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use super::ktap::KtapLog;
use crate::bus::lock;
use crate::stop::{VmExit, VmStop};

/// Lines kept for "last lines" reports; older ones are only in the log.
const KEPT_LINES: usize = 4000;
/// Lines of context kept before a report's first line, and report lines kept after it.
const CONTEXT_BEFORE: usize = 3;
const CONTEXT_AFTER: usize = 20;
/// A report without an `---[ end trace` line ends after this many lines.
const REPORT_MAX_LINES: usize = 120;
/// Reports whose lines are kept, per class (caught by KUnit or not).
const MAX_EXCERPTS: usize = 16;
/// Reports tracked at all; a guest warning in a loop must not fill memory. Past this, the
/// run counts as failed.
const MAX_REPORTS: usize = 10_000;
/// The name of KUnit's try-catch kthread (lib/kunit/try-catch.c): an oops there kills only
/// that thread, and KUnit reports the test's result.
const KUNIT_TRY_CATCH_TASK: &str = "kunit_try_catch";

/// Strips the printk timestamp ("[    1.234567] ") from a console line, keeping the
/// indentation after it.
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

/// Whether a line is a KTAP test result ("ok 3 name", "not ok 1 name", any indentation).
fn is_ktap_result(line: &str) -> bool {
    let body = message(line).trim_start();
    let rest = body.strip_prefix("not ok ").or_else(|| body.strip_prefix("ok "));
    rest.and_then(|r| r.split_whitespace().next()).is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
}

/// The task a report names on its "CPU: 0 UID: 0 PID: 92 Comm: kunit_try_catch ..." line.
fn reported_task(line: &str) -> Option<&str> {
    let text = message(line).trim_start();
    if !text.starts_with("CPU: ") {
        return None;
    }
    text.split_once("Comm: ").and_then(|(_, rest)| rest.split_whitespace().next())
}

/// One kernel failure report: its first line and what follows up to `---[ end trace`.
#[derive(Debug, Clone)]
pub struct FailureReport {
    /// What kind of failure its first line reports.
    pub kind: &'static str,
    /// Context before, the first line, and the report lines after it (empty when more than
    /// [`MAX_EXCERPTS`] reports of its class came before).
    pub lines: Vec<String>,
    /// Index in `lines` of its first line (after the context before it).
    pub first: usize,
    /// The task it names (`Comm:`).
    pub task: Option<String>,
    /// It includes an `Oops:` line: the task that hit it was killed.
    oops: bool,
    /// A KTAP result line came after it.
    result_after: bool,
    open: bool,
    lines_seen: usize,
}

impl FailureReport {
    /// An oops in KUnit's try-catch thread followed by a KTAP result: KUnit caught it and
    /// reported it as that test's result, which decides instead.
    pub fn caught_by_kunit(&self) -> bool {
        self.kunit_candidate() && self.result_after
    }

    /// A report that may turn out caught by KUnit (everything but the KTAP result is known).
    fn kunit_candidate(&self) -> bool {
        self.leads_to_oops() && self.oops && self.task.as_deref() == Some(KUNIT_TRY_CATCH_TASK)
    }

    /// Kinds of report an `Oops:` line ends or is: never a warning or a panic.
    fn leads_to_oops(&self) -> bool {
        matches!(self.kind, "BUG" | "oops" | "general protection fault")
    }

    /// Adds a line that follows the first; returns false once the report has ended.
    fn continue_with(&mut self, line: &str) -> bool {
        self.lines_seen += 1;
        if self.lines_seen <= CONTEXT_AFTER {
            self.lines.push(line.to_string());
        }
        if self.task.is_none() {
            self.task = reported_task(line).map(str::to_string);
        }
        if kernel_failure(line) == Some("oops") {
            self.oops = true;
        }
        let ended =
            message(line).trim_start().starts_with("---[ end trace") || self.lines_seen >= REPORT_MAX_LINES;
        !ended
    }
}

/// What the console recorder keeps.
pub struct ConsoleRecord {
    partial: Vec<u8>,
    /// The last [`KEPT_LINES`] complete lines.
    pub recent: VecDeque<String>,
    /// Kernel failure reports, in console order.
    pub reports: Vec<FailureReport>,
    /// More than [`MAX_REPORTS`] reports came (the later ones are not kept).
    pub too_many_reports: bool,
    /// What the KTAP parser needs of the console.
    pub ktap: KtapLog,
    /// Whether the `--expect` pattern matched.
    pub expect_matched: bool,
    /// The first error writing the log (the log is not written after it).
    pub log_error: Option<std::io::Error>,
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
            reports: Vec::new(),
            too_many_reports: false,
            ktap: KtapLog::new(),
            expect_matched: false,
            log_error: None,
            echo,
            log,
            expect,
            stop,
        }
    }

    /// Reports KUnit did not catch (the ones that fail the run).
    pub fn uncaught(&self) -> impl Iterator<Item = &FailureReport> {
        self.reports.iter().filter(|r| !r.caught_by_kunit())
    }

    /// Reports KUnit caught.
    pub fn caught(&self) -> impl Iterator<Item = &FailureReport> {
        self.reports.iter().filter(|r| r.caught_by_kunit())
    }

    /// Ends the open report; drops its lines if enough of its class are kept already.
    fn close_report(&mut self) {
        let Some(last) = self.reports.len().checked_sub(1) else { return };
        if !self.reports[last].open {
            return;
        }
        self.reports[last].open = false;
        let candidate = self.reports[last].kunit_candidate();
        let kept = self.reports[..last]
            .iter()
            .filter(|r| r.kunit_candidate() == candidate && !r.lines.is_empty())
            .count();
        if kept >= MAX_EXCERPTS {
            self.reports[last].lines = Vec::new();
        }
    }

    fn open_report(&mut self, kind: &'static str, line: &str) {
        self.close_report();
        if self.reports.len() >= MAX_REPORTS {
            self.too_many_reports = true;
            return;
        }
        let mut lines: Vec<String> = self.recent.iter().rev().take(CONTEXT_BEFORE).rev().cloned().collect();
        let first = lines.len();
        lines.push(line.to_string());
        self.reports.push(FailureReport {
            kind,
            lines,
            first,
            task: None,
            oops: kind == "oops",
            result_after: false,
            open: true,
            lines_seen: 0,
        });
    }

    fn track_reports(&mut self, line: &str) {
        let open = self.reports.last().is_some_and(|r| r.open);
        let oops_follows = self.reports.last().is_some_and(|r| r.open && r.leads_to_oops() && !r.oops);
        match kernel_failure(line) {
            // An oops continues the report that led to it ("BUG: kernel NULL pointer
            // dereference", then "Oops: 0002 [#1]").
            Some("oops") if oops_follows => {
                if let Some(report) = self.reports.last_mut() {
                    if !report.continue_with(line) {
                        self.close_report();
                    }
                }
            }
            Some(kind) => self.open_report(kind, line),
            None if open => {
                if let Some(report) = self.reports.last_mut() {
                    if !report.continue_with(line) {
                        self.close_report();
                    }
                }
            }
            None => {}
        }
        if is_ktap_result(line) {
            self.close_report();
            for report in self.reports.iter_mut().rev().take_while(|r| !r.result_after) {
                report.result_after = true;
            }
        }
    }

    fn complete_line(&mut self, raw: &[u8]) {
        self.ktap.push(raw);
        let line = String::from_utf8_lossy(raw).trim_end_matches('\r').to_string();
        self.track_reports(&line);
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
            if let Err(e) = log.write_all(bytes) {
                // One error is enough: stop writing, report it with the verdict.
                self.log_error = Some(e);
                self.log = None;
            }
        }
        for &byte in bytes {
            if byte == b'\n' {
                let raw = std::mem::take(&mut self.partial);
                self.complete_line(&raw);
            } else if self.partial.len() < 64 * 1024 {
                self.partial.push(byte);
            }
        }
    }

    /// Flushes a final line without a newline and ends an open report.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            let raw = std::mem::take(&mut self.partial);
            self.complete_line(&raw);
        }
        self.close_report();
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

    fn record_of(text: &[u8]) -> ConsoleRecord {
        let mut record = ConsoleRecord::new(false, None, None, Arc::new(VmStop::new()));
        record.take_bytes(text);
        record.finish();
        record
    }

    #[test]
    fn kernel_failures_are_recognised_with_or_without_timestamps() {
        assert_eq!(kernel_failure("[    1.234] Kernel panic - not syncing: boom"), Some("kernel panic"));
        assert_eq!(kernel_failure("WARNING: CPU: 0 PID: 1 at lib/x.c:3 f+0x1/0x2"), Some("WARNING"));
        assert_eq!(kernel_failure("[ 0.5] BUG: kernel NULL pointer dereference"), Some("BUG"));
        assert_eq!(kernel_failure("[ 0.5] Oops: 0002 [#1] SMP"), Some("oops"));
        assert_eq!(kernel_failure("[ 0.5] all fine, no WARNING: here"), None);
        assert_eq!(kernel_failure("samepage-init: reached /init"), None);
    }

    /// The kunit_fault suite's console, as Linux 6.12 prints it.
    const KUNIT_FAULT: &[u8] = b"[ 12.77]     # Subtest: kunit_fault
[ 12.78]     1..1
[ 12.91] BUG: kernel NULL pointer dereference, address: 0000000000000000
[ 12.92] #PF: supervisor write access in kernel mode
[ 12.94] Oops: Oops: 0002 [#1] SMP
[ 12.95] CPU: 0 UID: 0 PID: 92 Comm: kunit_try_catch Tainted: G S N 6.12.117 #2
[ 13.07] Call Trace:
[ 13.12] ---[ end trace 0000000000000000 ]---
[ 13.22] note: kunit_try_catch[92] exited with irqs disabled
[ 13.34]     # kunit_test_fault_null_dereference: try faulted: last line seen lib/kunit/kunit-test.c:95
[ 13.41]     ok 1 kunit_test_fault_null_dereference
[ 13.42] ok 9 kunit_fault
";

    #[test]
    fn an_oops_kunit_caught_is_one_report_that_does_not_fail() {
        let record = record_of(KUNIT_FAULT);
        assert_eq!(record.reports.len(), 1, "BUG and Oops lines are one report");
        let report = &record.reports[0];
        assert_eq!(report.kind, "BUG");
        assert_eq!(report.task.as_deref(), Some("kunit_try_catch"));
        assert!(report.caught_by_kunit());
        assert_eq!(record.uncaught().count(), 0);
    }

    #[test]
    fn an_oops_elsewhere_or_without_a_result_fails() {
        let other_task =
            String::from_utf8_lossy(KUNIT_FAULT).replace("Comm: kunit_try_catch", "Comm: swapper/0");
        assert_eq!(record_of(other_task.as_bytes()).uncaught().count(), 1);
        // Up to the oops report's end, before KUnit's verdict on the test.
        let cut = String::from_utf8_lossy(KUNIT_FAULT).find("[ 13.34]").expect("line");
        assert_eq!(record_of(&KUNIT_FAULT[..cut]).uncaught().count(), 1, "no KTAP result after the oops");
        let mut panicked = KUNIT_FAULT[..cut].to_vec();
        panicked.extend_from_slice(b"[ 13.3] Kernel panic - not syncing: Fatal exception\n[ 13.4] ok 1 x\n");
        let record = record_of(&panicked);
        assert_eq!(record.uncaught().map(|r| r.kind).collect::<Vec<_>>(), ["kernel panic"]);
    }

    #[test]
    fn a_warning_in_a_kunit_thread_still_fails() {
        let text = b"[ 1.0] WARNING: CPU: 0 PID: 92 at lib/x.c:3 f\n[ 1.1] CPU: 0 UID: 0 PID: 92 Comm: kunit_try_catch\n[ 1.2] Oops: 0000 [#1]\n[ 1.2] ---[ end trace 0 ]---\n[ 1.3]     ok 1 t\n";
        let record = record_of(text);
        assert_eq!(record.uncaught().map(|r| r.kind).collect::<Vec<_>>(), ["WARNING", "oops"]);
        assert_eq!(record.caught().count(), 0);
    }

    #[test]
    fn recorder_keeps_failure_context_and_matches_expect() {
        let stop = Arc::new(VmStop::new());
        let expect = regex::Regex::new("^ready$").ok();
        let record = Arc::new(Mutex::new(ConsoleRecord::new(false, None, expect, stop.clone())));
        let mut tap = ConsoleTap(record.clone());
        tap.write_all(b"a\nb\nc\n[ 1.0] WARNING: CPU: 0 at x\nd\nready\n").expect("write");
        let record = lock(&record);
        assert_eq!(record.reports.len(), 1);
        assert_eq!(record.reports[0].lines, vec!["a", "b", "c", "[ 1.0] WARNING: CPU: 0 at x", "d", "ready"]);
        assert!(record.expect_matched);
        assert_eq!(stop.wait(std::time::Duration::from_millis(1)), Some(VmExit::GuestStatus(0)));
    }

    #[test]
    fn a_warning_loop_is_bounded() {
        let text = "[ 1.0] WARNING: CPU: 0 at x\n".repeat(MAX_REPORTS + 5);
        let record = record_of(text.as_bytes());
        assert_eq!(record.reports.len(), MAX_REPORTS);
        assert!(record.too_many_reports);
        assert_eq!(record.reports.iter().filter(|r| !r.lines.is_empty()).count(), MAX_EXCERPTS);
    }
}
