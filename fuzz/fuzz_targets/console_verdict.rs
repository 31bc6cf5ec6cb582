//! The boot-test console recorder (`src/boot_test/console.rs`) and the KTAP parser
//! (`src/boot_test/ktap.rs`): console output with printk timestamps, KTAP results nested by
//! indentation, kernel failure reports (with the task they name, and their end line), the
//! `--expect` line and arbitrary bytes, fed to `ConsoleTap` in arbitrary pieces.
//!
//! Checked: the record and the parsed KTAP documents do not depend on how the bytes were
//! split; the record's bounds hold (lines kept, reports and their excerpts); a console
//! without a version or executor line has no KTAP document, and no document counts more
//! results than the console has result lines; an oops counts as caught by KUnit only in
//! KUnit's try-catch thread; a failure line leaves a report; the `--expect` pattern stops the
//! VM exactly when a line matches.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage::boot_test::console::{kernel_failure, ConsoleRecord, ConsoleTap};
use samepage::boot_test::ktap::{self, Counts, Status};
use samepage::stop::VmStop;
use samepage_fuzz::counted;

/// `console.rs`: lines kept, reports with excerpts per class, reports tracked.
const KEPT_LINES: usize = 4000;
const MAX_EXCERPTS: usize = 16;
const MAX_REPORTS: usize = 10_000;
/// Context before, the line, report lines after.
const MAX_EXCERPT_LINES: usize = 3 + 1 + 20;
const MAX_LINES: usize = 400;
const EXPECTED_LINE: &str = "samepage-boot-test: done";

#[derive(Arbitrary, Debug)]
struct Input {
    #[arbitrary(with = counted::<_, 0, MAX_LINES>)]
    lines: Vec<LineSpec>,
    /// Where the console's bytes are split into writes.
    cuts: Vec<u16>,
    expect: bool,
    /// The last line ends with a newline.
    final_newline: bool,
}

#[derive(Arbitrary, Debug)]
struct LineSpec {
    /// A printk timestamp `[seconds.micros] ` before the line.
    timestamp: Option<(u16, u32)>,
    line: Line,
}

#[derive(Arbitrary, Debug)]
enum Line {
    Header {
        indent: u8,
        ktap: bool,
    },
    Plan {
        indent: u8,
        tests: u8,
    },
    Subtest {
        indent: u8,
        name: String,
    },
    Result {
        indent: u8,
        ok: bool,
        number: u16,
        name: String,
        skip: bool,
    },
    Failure {
        kind: u8,
        rest: String,
    },
    /// A report's "CPU: ... Comm: TASK" line, KUnit's try-catch thread or another.
    Task {
        kunit: bool,
    },
    EndTrace,
    ExecutorError(String),
    Expected,
    Text(String),
    Bytes(Vec<u8>),
}

/// Without line breaks, which would make several lines of one.
fn clean(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn render(spec: &LineSpec) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some((s, us)) = spec.timestamp {
        out.extend_from_slice(format!("[{s:5}.{:06}] ", us % 1_000_000).as_bytes());
    }
    let pad = |indent: u8| " ".repeat(usize::from(indent % 4) * 4);
    let text = match &spec.line {
        Line::Header { indent, ktap } => {
            format!("{}{} version 1", pad(*indent), if *ktap { "KTAP" } else { "TAP" })
        }
        Line::Plan { indent, tests } => format!("{}1..{tests}", pad(*indent)),
        Line::Subtest { indent, name } => format!("{}# Subtest: {}", pad(*indent), clean(name)),
        Line::Result { indent, ok, number, name, skip } => format!(
            "{}{}ok {number} {}{}",
            pad(*indent),
            if *ok { "" } else { "not " },
            clean(name),
            if *skip { " # SKIP no hardware" } else { "" }
        ),
        Line::Failure { kind, rest } => {
            let head = ["Kernel panic - not syncing", "Oops:", "BUG:", "kernel BUG at", "WARNING:"];
            format!("{} {}", head[usize::from(*kind) % head.len()], clean(rest))
        }
        Line::Task { kunit } => {
            format!(
                "CPU: 0 UID: 0 PID: 92 Comm: {} Tainted: G N",
                if *kunit { "kunit_try_catch" } else { "sh" }
            )
        }
        Line::EndTrace => "---[ end trace 0000000000000000 ]---".to_string(),
        Line::ExecutorError(e) => format!("kunit executor: {}", clean(e)),
        Line::Expected => EXPECTED_LINE.to_string(),
        Line::Text(t) => clean(t),
        Line::Bytes(b) => {
            out.extend(b.iter().copied().filter(|&c| c != b'\n'));
            return out;
        }
    };
    out.extend_from_slice(text.as_bytes());
    out
}

/// What a record holds, for comparing two: recent lines, reports (kind, excerpt, task,
/// caught by KUnit), too many reports, expect matched, and per KTAP document its first line,
/// counts and status.
type Seen = (
    Vec<String>,
    Vec<(&'static str, Vec<String>, Option<String>, bool)>,
    bool,
    bool,
    Vec<(usize, Counts, Status)>,
);

fn record(console: &[u8], cuts: &[usize], expect: bool) -> (Seen, bool) {
    let stop = Arc::new(VmStop::new());
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let compiled =
        || PATTERN.get_or_init(|| regex::Regex::new(&format!("^{EXPECTED_LINE}$")).expect("pattern"));
    let pattern = expect.then(|| compiled().clone());
    let rec = Arc::new(Mutex::new(ConsoleRecord::new(false, None, pattern, stop.clone())));
    let mut tap = ConsoleTap(rec.clone());
    let mut at = 0;
    for &cut in cuts.iter().chain([&console.len()]) {
        tap.write_all(&console[at..cut]).expect("console write");
        at = cut;
    }
    let mut rec = rec.lock().expect("record");
    rec.finish();
    let reports =
        rec.reports.iter().map(|r| (r.kind, r.lines.clone(), r.task.clone(), r.caught_by_kunit())).collect();
    let documents = ktap::parse_documents(&rec.ktap)
        .iter()
        .map(|d| (d.first_line, d.main.counts, d.main.status))
        .collect();
    let seen =
        (rec.recent.iter().cloned().collect(), reports, rec.too_many_reports, rec.expect_matched, documents);
    (seen, stop.is_stopped())
}

fuzz_target!(|input: Input| {
    let specs: Vec<&LineSpec> = input.lines.iter().collect();
    let mut console = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        console.extend(render(spec));
        if i + 1 < specs.len() || input.final_newline {
            console.push(b'\n');
        }
    }
    let mut cuts: Vec<usize> = input.cuts.iter().map(|&c| usize::from(c) % (console.len() + 1)).collect();
    cuts.sort_unstable();

    let (whole, stopped_whole) = record(&console, &[], input.expect);
    let (pieces, stopped) = record(&console, &cuts, input.expect);
    assert_eq!(whole, pieces, "the record depends on how the console was split");
    assert_eq!(stopped, stopped_whole);
    let (recent, reports, too_many, expect_matched, documents) = whole;

    // A line per newline, and the last one if it has bytes.
    let text = String::from_utf8_lossy(&console);
    let lines: Vec<&str> = text.split('\n').collect();
    let line_count = lines.len() - usize::from(lines.last().is_some_and(|l| l.is_empty()));
    assert_eq!(recent.len(), line_count.min(KEPT_LINES));

    assert!(reports.len() <= MAX_REPORTS);
    assert!(reports.iter().all(|(_, lines, _, _)| lines.len() <= MAX_EXCERPT_LINES));
    // Excerpts are kept per class: reports KUnit may catch, and the others.
    let kept = reports.iter().filter(|r| !r.1.is_empty()).count();
    assert!(kept <= 2 * MAX_EXCERPTS, "{kept} excerpts kept");
    for (kind, _, task, caught) in &reports {
        if *caught {
            assert_eq!(task.as_deref(), Some("kunit_try_catch"), "a {kind} caught outside KUnit's thread");
            assert_ne!(*kind, "WARNING", "a warning is never caught");
        }
    }
    let failure_lines = recent.iter().filter(|l| kernel_failure(l).is_some()).count();
    if failure_lines > 0 && line_count <= KEPT_LINES {
        assert!(!reports.is_empty() || too_many, "failure lines without a report");
    }

    let starts = lines.iter().any(|l| l.contains("TAP version") || l.contains("kunit executor: "));
    if !starts {
        assert!(documents.is_empty(), "a KTAP document without a version or executor line");
    }
    let result_lines = lines.iter().filter(|l| l.contains("ok ")).count();
    for (_, counts, _) in &documents {
        assert!(counts.passed + counts.failed + counts.skipped <= result_lines, "{counts:?}");
    }

    let matched = recent.iter().any(|l| l == EXPECTED_LINE);
    assert_eq!(expect_matched, input.expect && matched);
    assert_eq!(stopped, expect_matched, "the VM stops when the expected line comes");
});
