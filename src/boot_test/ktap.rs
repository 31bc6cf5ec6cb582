//! KTAP results (Documentation/dev-tools/ktap.rst) counted the way the kernel's reference
//! parser counts them: this is a port of `tools/testing/kunit/kunit_parser.py` (Linux 6.12,
//! `kunit.py parse`), so that boot-test's totals for a console log equal `kunit.py parse`'s
//! for the same log. Function names follow the Python ones.
//!
//! Console lines are kept compactly ([`KtapLog`]): a run of lines that cannot be KTAP under
//! any prefix is kept as one gap, since the parser only ever asks whether such lines are
//! there. After the first KTAP document (the one `kunit.py parse` reads), later documents on
//! the console (e.g. a kselftest the command ran) are parsed the same way and reported
//! separately.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

/// Most lines [`KtapLog`] keeps (a guest printing `ok 1 x` forever must not fill memory).
const MAX_KEPT_LINES: usize = 1 << 20;
/// Deepest subtest nesting parsed (kunit.py itself stops at Python's recursion limit).
const MAX_DEPTH: usize = 64;
/// Most failing test names listed for one suite.
const MAX_FAILED_NAMES: usize = 10;

fn pattern(text: &str) -> Regex {
    Regex::new(text).expect("the KTAP patterns are valid regular expressions")
}

// The patterns of kunit_parser.py, verbatim. Python's re.match anchors at the start; the
// `match_start` helper below does the same with these.
static KTAP_START: LazyLock<Regex> = LazyLock::new(|| pattern(r"\s*KTAP version ([0-9]+)$"));
static TAP_START: LazyLock<Regex> = LazyLock::new(|| pattern(r"\s*TAP version ([0-9]+)$"));
static KTAP_END: LazyLock<Regex> = LazyLock::new(|| {
    pattern(r"\s*(List of all partitions:|Kernel panic - not syncing: VFS:|reboot: System halted)")
});
static EXECUTOR_ERROR: LazyLock<Regex> = LazyLock::new(|| pattern(r"\s*kunit executor: (.*)$"));
static TEST_HEADER: LazyLock<Regex> = LazyLock::new(|| pattern(r"^\s*# Subtest: (.*)$"));
static TEST_PLAN: LazyLock<Regex> = LazyLock::new(|| pattern(r"^\s*1\.\.([0-9]+)"));
static TEST_RESULT: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"^\s*(ok|not ok) ([0-9]+) (- )?([^#]*)( # .*)?$"));
static TEST_RESULT_SKIP: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"^\s*(ok|not ok) ([0-9]+) (- )?(.*) # SKIP(.*)$"));

/// Python's `re.match`: a match that starts at the beginning of `line`.
fn match_start<'a>(re: &Regex, line: &'a str) -> Option<regex::Captures<'a>> {
    re.captures(line).filter(|c| c.get(0).is_some_and(|m| m.start() == 0))
}

/// Substrings one of which every line the parser can act on contains, whatever prefix is
/// cut from it (a suffix of a line contains only what the line contains).
const STRUCTURAL_NEEDLES: [&str; 8] = [
    "ok ",
    "1..",
    "# Subtest: ",
    "TAP version",
    "kunit executor: ",
    "List of all partitions:",
    "Kernel panic - not syncing: VFS:",
    "reboot: System halted",
];

#[derive(Debug, Clone)]
enum Entry {
    /// One or more lines that are diagnostic under any prefix.
    Gap,
    /// A line that may be KTAP, with its 1-based line number in the log.
    Line(usize, String),
}

/// Console lines as the KTAP parser needs them.
#[derive(Debug, Clone, Default)]
pub struct KtapLog {
    entries: Vec<Entry>,
    lines: usize,
    /// More lines than [`MAX_KEPT_LINES`] came; later ones were dropped.
    pub truncated: bool,
}

/// Python's `str.splitlines()` boundaries besides `\n` (which splits console lines already).
fn is_python_line_break(c: char) -> bool {
    matches!(c, '\r' | '\x0b' | '\x0c' | '\x1c' | '\x1d' | '\x1e' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// Decodes like Python's `bytes.decode('utf-8', errors='backslashreplace')` (how kunit.py
/// reads a log), so prefix lengths count the same characters.
pub fn decode_like_python(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

impl KtapLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one console line (split at `\n`, without it).
    pub fn push(&mut self, raw: &[u8]) {
        let decoded = decode_like_python(raw);
        let body = decoded.strip_suffix('\r').unwrap_or(&decoded);
        for line in body.split(is_python_line_break) {
            self.push_line(line);
        }
    }

    fn push_line(&mut self, line: &str) {
        self.lines += 1;
        let line = line.trim_end();
        let structural = STRUCTURAL_NEEDLES.iter().any(|needle| line.contains(needle));
        if !structural && matches!(self.entries.last(), Some(Entry::Gap)) {
            return;
        }
        if self.entries.len() >= MAX_KEPT_LINES {
            self.truncated = true;
            return;
        }
        self.entries.push(if structural { Entry::Line(self.lines, line.to_string()) } else { Entry::Gap });
    }
}

/// `TestStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `ok`.
    Success,
    /// `not ok`.
    Failure,
    /// `# SKIP`.
    Skipped,
    /// No result line (the default until one is parsed).
    Crashed,
    /// A parent without subtests.
    NoTests,
}

/// `TestCounts`: leaf results, and parse errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Passed tests.
    pub passed: usize,
    /// Failed tests.
    pub failed: usize,
    /// Tests without a result line.
    pub crashed: usize,
    /// Skipped tests.
    pub skipped: usize,
    /// Parse errors (not tests).
    pub errors: usize,
}

impl Counts {
    /// Test cases (errors are not tests).
    pub fn total(&self) -> usize {
        self.passed + self.failed + self.crashed + self.skipped
    }

    fn add_subtest_counts(&mut self, other: &Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.crashed += other.crashed;
        self.skipped += other.skipped;
        self.errors += other.errors;
    }

    fn get_status(&self) -> Status {
        if self.total() == 0 {
            Status::NoTests
        } else if self.crashed > 0 {
            Status::Crashed
        } else if self.failed > 0 {
            Status::Failure
        } else if self.passed > 0 {
            Status::Success
        } else {
            Status::Skipped
        }
    }

    fn add_status(&mut self, status: Status) {
        match status {
            Status::Success => self.passed += 1,
            Status::Failure => self.failed += 1,
            Status::Skipped => self.skipped += 1,
            Status::NoTests => {}
            Status::Crashed => self.crashed += 1,
        }
    }

    /// Whether any test failed or crashed.
    pub fn has_failures(&self) -> bool {
        self.failed + self.crashed > 0
    }
}

impl fmt::Display for Counts {
    /// As kunit.py prints it: "Ran 74 tests: passed: 69, skipped: 5".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let statuses = [
            ("passed", self.passed),
            ("failed", self.failed),
            ("crashed", self.crashed),
            ("skipped", self.skipped),
            ("errors", self.errors),
        ];
        let parts: Vec<String> =
            statuses.iter().filter(|(_, n)| *n > 0).map(|(s, n)| format!("{s}: {n}")).collect();
        write!(f, "Ran {} tests: {}", self.total(), parts.join(", "))
    }
}

/// One test: a leaf case or a parent (suite, or the whole document).
#[derive(Debug, Clone)]
pub struct Test {
    /// Name from its result or `# Subtest:` line.
    pub name: String,
    /// Its status.
    pub status: Status,
    /// Subtests, for parents.
    pub subtests: Vec<Test>,
    /// Leaf counts below it (or of itself, for a leaf).
    pub counts: Counts,
    expected_count: Option<usize>,
}

impl Test {
    fn new() -> Self {
        Test {
            name: String::new(),
            status: Status::Crashed,
            subtests: Vec::new(),
            counts: Counts::default(),
            expected_count: Some(0),
        }
    }

    fn add_error(&mut self) {
        self.counts.errors += 1;
    }

    /// Passed or skipped.
    pub fn ok_status(&self) -> bool {
        matches!(self.status, Status::Success | Status::Skipped)
    }

    /// Leaf tests below this one that did not pass or skip, as kunit.py's failure summary
    /// names them ("suite.case"); a parent whose subtests all failed is named alone.
    pub fn failed_names(&self) -> Vec<String> {
        fn walk(test: &Test, parent: &str, out: &mut Vec<String>) {
            let full = if parent.is_empty() || parent == "main" {
                test.name.clone()
            } else {
                format!("{parent}.{}", test.name)
            };
            if test.subtests.is_empty() {
                out.push(full);
                return;
            }
            let failed: Vec<&Test> = test.subtests.iter().filter(|t| !t.ok_status()).collect();
            if !parent.is_empty() && failed.len() == test.subtests.len() {
                out.push(full);
                return;
            }
            for sub in failed {
                walk(sub, &full, out);
            }
        }
        let mut out = Vec::new();
        walk(self, "", &mut out);
        out.truncate(MAX_FAILED_NAMES);
        out
    }
}

/// `LineStream` over extracted lines; `entry` maps each back to its [`KtapLog`] entry.
struct LineStream<'a> {
    lines: &'a [(usize, String)],
    pos: usize,
}

impl LineStream<'_> {
    /// At the end, Python's LineStream keeps returning the last line it read.
    fn peek(&self) -> &str {
        match self.lines.get(self.pos).or_else(|| self.lines.last()) {
            Some((_, line)) => line,
            None => "",
        }
    }

    fn pop(&mut self) {
        if self.pos < self.lines.len() {
            self.pos += 1;
        }
    }

    fn has_more(&self) -> bool {
        self.pos < self.lines.len()
    }
}

/// `isolate_ktap_output` from entry `from`: the lines after the first KTAP/TAP version line
/// with that line's prefix cut off, up to an end marker. Returns (entry index, line) pairs
/// and the index of the end marker, if one stopped it.
fn extract_tap_lines(log: &KtapLog, from: usize) -> (Vec<(usize, String)>, Option<usize>) {
    let mut out = Vec::new();
    let mut prefix_len: Option<usize> = None;
    for (index, entry) in log.entries.iter().enumerate().skip(from) {
        let line = match entry {
            Entry::Gap => {
                if prefix_len.is_some() {
                    out.push((index, String::new()));
                }
                continue;
            }
            Entry::Line(_, line) => line.as_str(),
        };
        match prefix_len {
            None => {
                let start = if KTAP_START.is_match(line) {
                    line.split("KTAP version").next()
                } else if TAP_START.is_match(line) {
                    line.split("TAP version").next()
                } else {
                    None
                };
                if let Some(prefix) = start {
                    let len = prefix.chars().count();
                    prefix_len = Some(len);
                    out.push((index, line.chars().skip(len).collect()));
                } else if EXECUTOR_ERROR.is_match(line) {
                    out.push((index, line.to_string()));
                }
            }
            Some(len) => {
                if KTAP_END.is_match(line) {
                    return (out, Some(index));
                }
                out.push((index, line.chars().skip(len).collect()));
            }
        }
    }
    (out, None)
}

/// `check_version`: an error for a version outside `min..=max` (or too long to read).
fn check_version(version: &str, min: u64, max: u64, test: &mut Test) {
    if !version.parse::<u64>().is_ok_and(|v| (min..=max).contains(&v)) {
        test.add_error();
    }
}

fn parse_ktap_header(lines: &mut LineStream, test: &mut Test) -> bool {
    let line = lines.peek();
    if let Some(c) = match_start(&KTAP_START, line) {
        check_version(&c[1], 1, 1, test);
    } else if let Some(c) = match_start(&TAP_START, line) {
        check_version(&c[1], 13, 14, test);
    } else {
        return false;
    }
    lines.pop();
    true
}

fn parse_test_header(lines: &mut LineStream, test: &mut Test) -> bool {
    let Some(c) = match_start(&TEST_HEADER, lines.peek()) else { return false };
    test.name = c[1].to_string();
    lines.pop();
    true
}

fn parse_test_plan(lines: &mut LineStream, test: &mut Test) -> bool {
    let Some(c) = match_start(&TEST_PLAN, lines.peek()) else {
        test.expected_count = None;
        return false;
    };
    // A count too large for usize cannot be reached anyway.
    test.expected_count = Some(c[1].parse().unwrap_or(usize::MAX));
    lines.pop();
    true
}

fn peek_test_name_match(lines: &LineStream, test: &Test) -> bool {
    match_start(&TEST_RESULT, lines.peek()).is_some_and(|c| c.get(4).map_or("", |m| m.as_str()) == test.name)
}

fn parse_test_result(lines: &mut LineStream, test: &mut Test, expected_num: usize) -> bool {
    let line = lines.peek().to_string();
    let Some(result) = match_start(&TEST_RESULT, &line) else { return false };
    let skip = match_start(&TEST_RESULT_SKIP, &line);
    lines.pop();
    let name = skip.as_ref().unwrap_or(&result).get(4).map_or("", |m| m.as_str());
    test.name = name.to_string();
    if result[2].parse::<usize>().ok() != Some(expected_num) {
        test.add_error();
    }
    test.status = if skip.is_some() {
        Status::Skipped
    } else if &result[1] == "ok" {
        Status::Success
    } else {
        Status::Failure
    };
    true
}

fn is_diagnostic(line: &str) -> bool {
    ![&*TEST_RESULT, &*TEST_HEADER, &*KTAP_START, &*TAP_START, &*TEST_PLAN]
        .iter()
        .any(|re| match_start(re, line).is_some())
}

fn parse_diagnostic(lines: &mut LineStream) {
    while lines.has_more() && is_diagnostic(lines.peek()) {
        lines.pop();
    }
}

fn bubble_up_test_results(test: &mut Test) {
    let mut counts = test.counts;
    for sub in &test.subtests {
        counts.add_subtest_counts(&sub.counts);
    }
    test.counts = counts;
    if test.counts.total() == 0 {
        test.counts.add_status(test.status);
    } else if test.counts.get_status() == Status::Crashed {
        test.status = Status::Crashed;
    }
}

/// The start of `parse_test`: the version line, `# Subtest:` header and plan; returns
/// whether the test is a parent (has subtests to parse).
fn parse_test_head(lines: &mut LineStream, test: &mut Test, is_subtest: bool) -> bool {
    parse_diagnostic(lines);
    if !is_subtest {
        test.name = "main".into();
        parse_ktap_header(lines, test);
        parse_diagnostic(lines);
        parse_test_plan(lines, test);
        return true;
    }
    let ktap_line = parse_ktap_header(lines, test);
    let subtest_line = parse_test_header(lines, test);
    let parent = ktap_line || subtest_line;
    if parent {
        parse_diagnostic(lines);
        parse_test_plan(lines, test);
    }
    parent
}

/// The subtest loop of `parse_test`: up to the plan's count, or (without a plan) up to the
/// parent's own result line or the end.
fn parse_subtests(lines: &mut LineStream, test: &mut Test, is_subtest: bool, depth: usize) -> Vec<Test> {
    let expected_count = test.expected_count;
    let mut subtests = Vec::new();
    let mut test_num = 1usize;
    while expected_count.is_none_or(|count| test_num <= count) {
        parse_diagnostic(lines);
        if !lines.has_more() || (peek_test_name_match(lines, test) && is_subtest) {
            if let Some(count) = expected_count.filter(|&count| count > 0 && test_num <= count) {
                // Every missing subtest is one crashed test and one error; count them at
                // once (a plan can promise billions).
                let missing = count - test_num + 1;
                test.counts.errors += missing;
                test.counts.crashed += missing;
                subtests.push(Test::new());
            }
            break;
        }
        let before = lines.pos;
        subtests.push(parse_test(lines, test_num, true, depth + 1));
        test_num += 1;
        if lines.pos == before {
            // Nothing was consumed, so every further iteration would add the same crashed
            // subtest: count the rest at once, or stop where kunit.py would loop forever.
            if let Some(count) = expected_count {
                test.counts.crashed += count.saturating_sub(test_num - 1);
            }
            break;
        }
    }
    subtests
}

/// `parse_test`; `depth` guards against hostile nesting.
fn parse_test(lines: &mut LineStream, expected_num: usize, is_subtest: bool, depth: usize) -> Test {
    let mut test = Test::new();
    let parent_test = parse_test_head(lines, &mut test, is_subtest);
    if parent_test && depth >= MAX_DEPTH {
        test.add_error();
        lines.pos = lines.lines.len();
        bubble_up_test_results(&mut test);
        return test;
    }
    if parent_test {
        test.subtests = parse_subtests(lines, &mut test, is_subtest, depth);
    }
    if is_subtest {
        parse_diagnostic(lines);
        if !test.name.is_empty() && !peek_test_name_match(lines, &test) {
            test.add_error();
        } else {
            parse_test_result(lines, &mut test, expected_num);
        }
    }
    if parent_test && test.subtests.is_empty() && matches!(test.status, Status::Crashed | Status::Success) {
        test.status = Status::NoTests;
        test.add_error();
    }
    bubble_up_test_results(&mut test);
    test
}

/// One KTAP document found on the console.
#[derive(Debug, Clone)]
pub struct Document {
    /// Line number (1-based, in the log) of its version line.
    pub first_line: usize,
    /// The top-level test ("main"); its counts are the document's.
    pub main: Test,
}

impl Document {
    /// The suites (top-level tests) that did not pass or skip.
    pub fn failed_suites(&self) -> impl Iterator<Item = &Test> {
        self.main.subtests.iter().filter(|t| !t.ok_status())
    }
}

fn is_version_line(log: &KtapLog, index: usize) -> bool {
    matches!(log.entries.get(index), Some(Entry::Line(_, l)) if KTAP_START.is_match(l) || TAP_START.is_match(l))
}

/// `parse_run_tests` on the log: the first document is exactly what `kunit.py parse` reports;
/// later ones follow. Empty when the log has no KTAP.
pub fn parse_documents(log: &KtapLog) -> Vec<Document> {
    let mut documents = Vec::new();
    let mut from = 0;
    loop {
        let (lines, end_marker) = extract_tap_lines(log, from);
        let Some(&(first_index, _)) = lines.first() else { break };
        if !documents.is_empty() && !is_version_line(log, first_index) {
            // A later document starts at its version line, not at a stray executor error.
            match lines.iter().find(|(index, _)| is_version_line(log, *index)) {
                Some(&(index, _)) => {
                    from = index;
                    continue;
                }
                None => break,
            }
        }
        let first_line = match log.entries.get(first_index) {
            Some(Entry::Line(number, _)) => *number,
            _ => 0,
        };
        let mut stream = LineStream { lines: &lines, pos: 0 };
        let mut main = parse_test(&mut stream, 0, false, 0);
        if main.status != Status::NoTests {
            main.status = main.counts.get_status();
        }
        documents.push(Document { first_line, main });
        let next = match (lines.get(stream.pos), end_marker) {
            (Some(&(index, _)), _) => index,
            (None, Some(index)) => index + 1,
            (None, None) => break,
        };
        if next <= from {
            break;
        }
        from = next;
    }
    documents
}

#[cfg(test)]
mod tests;
