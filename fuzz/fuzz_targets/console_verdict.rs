//! The boot-test console recorder and verdict parser (`src/console.rs`): console output with
//! printk timestamps, KTAP results nested by indentation, kernel failures, the `--expect`
//! line and arbitrary bytes, fed to `ConsoleTap` in arbitrary pieces.
//!
//! Checked: the record does not depend on how the bytes were split; its bounds hold (lines
//! kept, failure excerpts and their context); KTAP results counted from the kept KTAP lines
//! equal those counted from the whole console, and, for structured consoles, the count of
//! leaf results the KTAP rule gives; each failure line yields an excerpt of its kind; the
//! `--expect` pattern stops the VM exactly when a line matches.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use samepage::console::{kernel_failure, ktap_summary, ConsoleRecord, ConsoleTap, KtapSummary};
use samepage::stop::VmStop;
use samepage_fuzz::counted;

const KEPT_LINES: usize = 4000;
const MAX_EXCERPTS: usize = 16;
/// Context before, the line, context after.
const MAX_EXCERPT_LINES: usize = 3 + 1 + 12;
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
    Header { indent: u8, ktap: bool },
    Plan { indent: u8, tests: u8 },
    Subtest { indent: u8, name: String },
    Result { indent: u8, ok: bool, number: u16, name: String, skip: bool },
    Failure { kind: u8, rest: String },
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

/// The KTAP rule, on the structured lines: after a header, a result counts unless the result
/// before it was more deeply indented (it sums up its subtests).
fn leaf_results(lines: &[&LineSpec]) -> KtapSummary {
    let mut summary = KtapSummary::default();
    let mut header = false;
    let mut previous: Option<usize> = None;
    for spec in lines {
        match &spec.line {
            Line::Header { .. } => header = true,
            Line::Result { indent, ok, name, skip, .. } if header => {
                let indent = usize::from(indent % 4) * 4;
                let parent = previous.is_some_and(|p| p > indent);
                previous = Some(indent);
                if parent {
                    continue;
                }
                let skipped = *skip || clean(name).to_ascii_uppercase().contains("# SKIP");
                match (skipped, ok) {
                    (true, _) => summary.skipped += 1,
                    (false, true) => summary.passed += 1,
                    (false, false) => summary.failed += 1,
                }
            }
            _ => {}
        }
    }
    summary
}

/// What a record holds, for comparing two.
type Seen = (Vec<String>, Vec<(&'static str, Vec<String>)>, Vec<String>, bool);

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
    let failures = rec.failures.iter().map(|f| (f.kind, f.lines.clone())).collect();
    let seen = (rec.recent.iter().cloned().collect(), failures, rec.ktap_lines.clone(), rec.expect_matched);
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
    let (recent, failures, ktap_lines, expect_matched) = whole;

    let lines: Vec<String> = String::from_utf8_lossy(&console).split('\n').map(|l| l.to_string()).collect();
    assert!(recent.len() <= KEPT_LINES);
    assert!(failures.len() <= MAX_EXCERPTS);
    assert!(failures.iter().all(|(_, lines)| lines.len() <= MAX_EXCERPT_LINES));
    let summary = ktap_summary(ktap_lines.iter().map(String::as_str));
    assert_eq!(summary, ktap_summary(recent.iter().map(String::as_str)), "KTAP lines are what counts");
    assert!(summary.passed + summary.failed + summary.skipped <= ktap_lines.len());

    let matched = recent.iter().any(|l| l == EXPECTED_LINE);
    assert_eq!(expect_matched, input.expect && matched);
    assert_eq!(stopped, expect_matched, "the VM stops when the expected line comes");

    let failing: Vec<&'static str> = recent.iter().filter_map(|l| kernel_failure(l)).collect();
    let kinds: Vec<&'static str> = failures.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        failing.iter().copied().take(MAX_EXCERPTS).collect::<Vec<_>>(),
        "one excerpt per failure"
    );

    let structured = specs.iter().all(|s| !matches!(s.line, Line::Text(_) | Line::Bytes(_)));
    if structured && lines.len() <= KEPT_LINES {
        assert_eq!(summary, leaf_results(&specs), "KTAP leaves of {lines:#?}");
        for spec in &specs {
            if let Line::Failure { .. } = spec.line {
                assert!(!failures.is_empty(), "a failure line without an excerpt");
            }
        }
    }
});
