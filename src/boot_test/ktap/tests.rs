//! Unit tests of `ktap.rs`.

use super::*;

fn log_of(text: &str) -> KtapLog {
    let mut log = KtapLog::new();
    for line in text.split('\n') {
        log.push(line.as_bytes());
    }
    log
}

fn counts(text: &str) -> Vec<String> {
    parse_documents(&log_of(text)).iter().map(|d| d.main.counts.to_string()).collect()
}

#[test]
fn nested_suites_count_leaves() {
    let text = "KTAP version 1\n1..2\n    KTAP version 1\n    # Subtest: blake3\n    1..3\n    ok 1 empty\n    not ok 2 one_page\n    ok 3 skipme # SKIP no hw\nnot ok 1 blake3\nok 2 other\n";
    assert_eq!(counts(text), ["Ran 4 tests: passed: 2, failed: 1, skipped: 1"]);
    let docs = parse_documents(&log_of(text));
    assert_eq!(docs[0].failed_suites().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["blake3"]);
    assert_eq!(docs[0].main.failed_names(), ["blake3.one_page"]);
}

#[test]
fn prefix_of_the_version_line_is_cut_from_later_lines() {
    let text = "[    1.000000] boot\n[    1.100000] KTAP version 1\n[    1.200000] 1..1\n[    1.300000]     # Subtest: s\n[    1.300000]     1..2\n[    1.400000]     ok 1 a\n[    1.400000] unrelated message\n[    1.500000]     ok 2 b # SKIP why\n[    1.600000] ok 1 s\n";
    assert_eq!(counts(text), ["Ran 2 tests: passed: 1, skipped: 1"]);
}

#[test]
fn missing_results_are_crashed_and_errors() {
    let text = "KTAP version 1\n1..3\n    # Subtest: s\n    1..2\n    ok 1 a\n";
    assert_eq!(counts(text), ["Ran 4 tests: passed: 1, crashed: 3, errors: 4"]);
}

#[test]
fn no_ktap_no_documents() {
    assert!(parse_documents(&log_of("ok 1 looks like tap\nnot ok 2 too\n")).is_empty());
}

#[test]
fn later_documents_are_parsed_separately() {
    let text =
        "KTAP version 1\n1..1\nok 1 first\nsome shell output\nTAP version 13\n1..2\nok 1 a\nnot ok 2 b\n";
    assert_eq!(counts(text), ["Ran 1 tests: passed: 1", "Ran 2 tests: passed: 1, failed: 1"]);
    assert_eq!(parse_documents(&log_of(text))[1].first_line, 5);
}

#[test]
fn hostile_plans_and_nesting_end() {
    assert_eq!(
        counts("KTAP version 1\n1..4000000000\n"),
        ["Ran 4000000000 tests: crashed: 4000000000, errors: 4000000000"]
    );
    let deep = "KTAP version 1\n".to_string() + &"# Subtest: x\n".repeat(10_000);
    assert_eq!(parse_documents(&log_of(&deep)).len(), 1);
    let stuck = "KTAP version 1\n1..3\n1..3\n";
    assert_eq!(parse_documents(&log_of(stuck)).len(), 1);
}

#[test]
fn invalid_utf8_is_escaped_like_python() {
    assert_eq!(decode_like_python(b"a\xffb"), "a\\xffb");
}
