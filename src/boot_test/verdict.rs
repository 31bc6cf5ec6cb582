//! boot-test's verdict: what the console and the VM's exit say, printed for the developer and
//! turned into the exit code (docs/boot-test.md).

use std::path::Path;

use super::console::{ConsoleRecord, FailureReport};
use super::ktap::{self, Document};
use crate::exit_code::Exit;
use crate::stop::VmExit;

/// Console lines shown when the run times out.
const LAST_LINES_ON_TIMEOUT: usize = 25;
/// Lines shown of an oops KUnit caught (its first lines say what and where).
const CAUGHT_LINES_SHOWN: usize = 8;
/// Caught oopses shown; the rest are counted.
const CAUGHT_SHOWN: usize = 3;

fn print_excerpt(report: &FailureReport, lines: &[String]) {
    eprintln!("--- {} ---", report.kind);
    for line in lines {
        eprintln!("    {line}");
    }
}

/// Oopses KUnit caught: shown, but the tests' KTAP results decide.
fn report_caught(record: &ConsoleRecord) {
    let caught: Vec<&FailureReport> = record.caught().collect();
    if caught.is_empty() {
        return;
    }
    eprintln!(
        "\nsamepage boot-test: oops caught by KUnit ({} in its test thread, kunit_try_catch): reported, but the tests' KTAP results decide:",
        caught.len()
    );
    for report in caught.iter().filter(|r| !r.lines.is_empty()).take(CAUGHT_SHOWN) {
        let end = report.lines.len().min(report.first + CAUGHT_LINES_SHOWN);
        print_excerpt(report, &report.lines[report.first.min(end)..end]);
    }
}

/// Prints the KTAP summaries; returns whether any document has failed or crashed tests.
fn report_ktap(documents: &[Document], truncated: bool) -> bool {
    let mut failed = false;
    for (index, document) in documents.iter().enumerate() {
        let label =
            if index == 0 { String::new() } else { format!(" (from console line {})", document.first_line) };
        eprintln!("samepage boot-test: KTAP{label}: {}", document.main.counts);
        for suite in document.failed_suites() {
            eprintln!(
                "samepage boot-test: KTAP: not ok: {}: {} ({})",
                suite.name,
                suite.counts,
                suite.failed_names().join(", ")
            );
        }
        failed |= document.main.counts.has_failures();
    }
    if truncated {
        eprintln!(
            "samepage boot-test: KTAP: the console had too many result lines; later ones were not counted"
        );
    }
    failed
}

/// Kernel failures KUnit did not catch: the run fails with [`Exit::KernelFailure`].
fn report_uncaught(record: &ConsoleRecord) -> Option<Exit> {
    let first = record.uncaught().next();
    if first.is_none() && !record.too_many_reports {
        return None;
    }
    eprintln!("\nsamepage boot-test: kernel failure on the console:");
    for report in record.uncaught().filter(|r| !r.lines.is_empty()) {
        print_excerpt(report, &report.lines);
    }
    let kind = first.map_or("kernel failures", |r| r.kind);
    if record.too_many_reports {
        eprintln!("samepage boot-test: more kernel failure reports than are kept");
    }
    eprintln!("samepage boot-test: verdict: {kind} (exit {})", Exit::KernelFailure.code());
    Some(Exit::KernelFailure)
}

/// What the developer asked of the run, as far as the verdict depends on it.
pub struct Asked<'a> {
    /// The console log file, if one was asked for.
    pub log: Option<&'a Path>,
    /// Whether an `--expect` pattern was given.
    pub expect: bool,
    /// An interactive shell rather than a command.
    pub shell: bool,
}

/// Decides the exit code and prints the report.
pub fn decide(exit: &VmExit, record: &ConsoleRecord, asked: &Asked) -> Exit {
    if let (Some(error), Some(path)) = (&record.log_error, asked.log) {
        eprintln!(
            "samepage boot-test: warning: console log {} is incomplete: write failed: {error}",
            path.display()
        );
    }
    report_caught(record);
    let documents = ktap::parse_documents(&record.ktap);
    let ktap_failed = report_ktap(&documents, record.ktap.truncated);
    if let Some(code) = report_uncaught(record) {
        return code;
    }
    let status = match exit {
        VmExit::Crashed { .. } => {
            eprintln!("samepage boot-test: {}", exit.message().unwrap_or_default());
            return Exit::KernelFailure;
        }
        VmExit::Timeout(after) => {
            eprintln!("\nsamepage boot-test: no verdict within {} s; last console lines:", after.as_secs());
            let skip = record.recent.len().saturating_sub(LAST_LINES_ON_TIMEOUT);
            for line in record.recent.iter().skip(skip) {
                eprintln!("    {line}");
            }
            return Exit::Timeout;
        }
        VmExit::Signal(_) => {
            eprintln!("samepage boot-test: {}", exit.message().unwrap_or_default());
            return exit.exit();
        }
        VmExit::GuestStatus(status) => *status,
        VmExit::Reset => 0,
    };
    if asked.expect && !record.expect_matched {
        eprintln!("samepage boot-test: the --expect pattern never matched");
        return if status == 0 { Exit::TestFailed } else { Exit::Status(status) };
    }
    if ktap_failed && status == 0 {
        eprintln!("samepage boot-test: verdict: KTAP failures (exit {})", Exit::TestFailed.code());
        return Exit::TestFailed;
    }
    let what = if asked.shell { "shell" } else { "command" };
    eprintln!("samepage boot-test: verdict: {what} exited with status {status}");
    Exit::Status(status)
}
