//! Hostile command lines through the real binary, generated from a seeded PRNG: numbers out of
//! range, special files, repeated and conflicting options, over-long and non-UTF-8 arguments,
//! truncated, foreign and mangled ELF kernels. Every run must end on its own before a
//! deadline, without a panic or a signal, with a documented exit code, and when it fails with
//! exactly one error line: `samepage: error:` and the start-failure code, or clap's `error:`
//! and code 2. Where the outcome is known (a FIFO is never a kernel), it is checked too.
//!
//! `SAMEPAGE_FUZZ_SEED=<n>` runs another set of cases; the seed is printed with the summary.

use crate::common;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{elf, mkfifo, samepage, tempdir, test_guest, test_guest_variant};

/// The default seed: fixed, so that a failure reproduces.
const DEFAULT_SEED: u64 = 0x5eed_0fc1_1f02;
/// A run still going after this is hung: VM runs pass `--timeout` of at most 3 s.
const DEADLINE: Duration = Duration::from_secs(20);
/// `--timeout` for runs whose guest might not stop on its own.
const VM_TIMEOUT: &str = "3";
/// Random cases per generated category.
const RANDOM_CASES: usize = 24;

/// xorshift64*: small, seedable, good enough to pick inputs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sub {
    Run,
    BootTest,
    Density,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Sub::Run => "run",
            Sub::BootTest => "boot-test",
            Sub::Density => "density",
        }
    }

    /// The exit code when samepage cannot start (README: 1 for run and density, 125 for
    /// boot-test).
    fn start_failure_code(self) -> i32 {
        match self {
            Sub::BootTest => 125,
            Sub::Run | Sub::Density => 1,
        }
    }

    /// Whether `code` is a documented outcome of a VM that started: for run the guest's byte
    /// (the test guest writes 0 or 1), 124 on timeout, 125 on a crash; for boot-test the
    /// command's status, 1, 124 or 255; for density success or failure.
    fn documented_vm_code(self, code: i32) -> bool {
        match self {
            Sub::Run => matches!(code, 0 | 1 | 124 | 125),
            Sub::BootTest => matches!(code, 0 | 1 | 124 | 255),
            Sub::Density => matches!(code, 0 | 1),
        }
    }
}

/// How a run ended, told from its exit code and error lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// clap refused the command line: code 2, one `error:` line.
    Usage,
    /// samepage refused the input: one `samepage: error:` line, the start-failure code.
    StartFailure,
    /// The VM started and stopped with a documented code, no error line.
    Started,
}

/// What a case should end in; `None` where the generator does not know.
type Expect = Option<Outcome>;

struct Case {
    category: &'static str,
    sub: Sub,
    args: Vec<OsString>,
    expect: Expect,
}

/// A file for the special-files cases, with what each use should make of it.
struct SpecialFile {
    path: PathBuf,
    /// Taken as an initrd: a non-empty regular file.
    initrd: bool,
    /// Taken as a disk: a regular file with a whole sector.
    disk: bool,
    /// Taken as an output (console, log, samples); `None` for regular files, which the
    /// cases leave alone rather than append to.
    output: Option<bool>,
}

/// Files the cases point at, in one temporary directory.
struct Fixtures {
    dir: vmm_sys_util::tempdir::TempDir,
    kernel: PathBuf,
    /// An 8 KiB image of random bytes: a valid disk and initrd.
    image: PathBuf,
    /// A FIFO that keeps a reader (this process) for the whole test.
    fifo_with_reader: PathBuf,
    _reader: File,
}

impl Fixtures {
    fn new() -> Fixtures {
        let dir = tempdir();
        let kernel = test_guest();
        let image = dir.as_path().join("image.img");
        common::make_image(&image, 8192, 11);
        let fifo_with_reader = dir.as_path().join("fifo-with-reader");
        mkfifo(&fifo_with_reader);
        // O_RDWR does not wait for a writer.
        let _reader = OpenOptions::new().read(true).write(true).open(&fifo_with_reader).expect("open FIFO");
        Fixtures { dir, kernel, image, fifo_with_reader, _reader }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.as_path().join(name)
    }

    /// Special and odd files, with what each use should make of them.
    fn special_files(&self) -> Vec<SpecialFile> {
        let make = |name: &str, bytes: usize| {
            let path = self.path(name);
            common::make_image(&path, bytes, bytes as u64);
            path
        };
        let fifo = self.path("fifo");
        mkfifo(&fifo);
        let sub_dir = self.path("sub");
        std::fs::create_dir(&sub_dir).expect("mkdir");
        let link = |name: &str, target: &Path| {
            let path = self.path(name);
            std::os::unix::fs::symlink(target, &path).expect("symlink");
            path
        };
        let file = |path: PathBuf, initrd: bool, disk: bool, output: Option<bool>| SpecialFile {
            path,
            initrd,
            disk,
            output,
        };
        vec![
            file(fifo.clone(), false, false, Some(false)),
            file(self.fifo_with_reader.clone(), false, false, Some(false)),
            file(sub_dir.clone(), false, false, Some(false)),
            file(PathBuf::from("/"), false, false, Some(false)),
            file(make("empty", 0), false, false, None),
            file(make("one-byte", 1), true, false, None),
            file(make("511-bytes", 511), true, false, None),
            file(make("513-bytes", 513), true, true, None),
            file(self.image.clone(), true, true, None),
            file(link("link-to-fifo", &fifo), false, false, Some(false)),
            file(link("link-to-dir", &sub_dir), false, false, Some(false)),
            file(link("link-to-zero", Path::new("/dev/zero")), false, false, Some(true)),
            // Output is created through the link.
            file(link("dangling", &self.path("missing")), false, false, Some(true)),
            file(PathBuf::from("/dev/zero"), false, false, Some(true)),
            file(PathBuf::from("/dev/full"), false, false, Some(true)),
            file(PathBuf::from("/dev/null"), false, false, Some(true)),
            file(PathBuf::from("/nonexistent/file"), false, false, Some(false)),
        ]
    }
}

fn os(text: impl AsRef<OsStr>) -> OsString {
    text.as_ref().to_os_string()
}

/// `sub` with `--kernel` (unless the case gives its own) and the options that bound a VM run.
fn base(sub: Sub, fx: &Fixtures, with_kernel: bool) -> Vec<OsString> {
    let mut args = vec![os(sub.name())];
    if with_kernel {
        args.extend([os("--kernel"), os(&fx.kernel)]);
    }
    match sub {
        Sub::Run => args.extend([os("--serial"), os("none"), os("--timeout"), os(VM_TIMEOUT)]),
        Sub::BootTest => args.extend([os("--initrd"), os(&fx.image), os("--timeout"), os(VM_TIMEOUT)]),
        Sub::Density => args.extend([os("--vms"), os("1"), os("--timeout"), os(VM_TIMEOUT)]),
    }
    args
}

fn case(category: &'static str, sub: Sub, args: Vec<OsString>, expect: Expect) -> Case {
    Case { category, sub, args, expect }
}

/// `args` with `option` set to `value` as `--option=VALUE` (so that negative numbers reach
/// the parser), in place of any `option VALUE` already there (clap refuses repeats).
fn with_option(mut args: Vec<OsString>, option: &str, value: &str) -> Vec<OsString> {
    if let Some(at) = args.iter().position(|a| a == option) {
        args.drain(at..at + 2);
    }
    args.push(os(format!("{option}={value}")));
    args
}

/// A hostile number: special spellings, huge and negative values, floats and exponents.
fn hostile_number(rng: &mut Rng) -> String {
    // '|'-separated, with the empty string and a blank first.
    const SPECIAL: &str = "| |0|-0|+1|-1|1.5|.5|5.|1e3|1e-3|1e300|-1e300|inf|-inf|infinity|NaN|nan|0x10|\
        1_000|\u{663}|18446744073709551615|18446744073709551616|9223372036854775808|4294967296|65536|\
        256|340282366920938463463374607431768211456";
    match rng.below(5) {
        0 | 1 => rng.pick(&SPECIAL.split('|').collect::<Vec<_>>()).to_string(),
        2 => rng.next().to_string(),
        3 => format!("-{}", rng.next() >> rng.below(64)),
        _ => format!("{}e{}", rng.below(1000), rng.below(700) as i64 - 350),
    }
}

/// Numbers out of range in every numeric option. Options take `--opt=VALUE` so that negative
/// values reach the parser.
fn numbers(rng: &mut Rng, fx: &Fixtures) -> Vec<Case> {
    let known: &[(Sub, &str, &str, Outcome)] = &[
        (Sub::Run, "--vcpus", "0", Outcome::StartFailure),
        (Sub::Run, "--vcpus", "33", Outcome::StartFailure),
        (Sub::Run, "--vcpus", "256", Outcome::Usage),
        (Sub::Run, "--vcpus", "2", Outcome::Started),
        (Sub::Run, "--mem", "15M", Outcome::Usage),
        (Sub::Run, "--mem", "16M", Outcome::Started),
        (Sub::Run, "--mem", "1T", Outcome::Started),
        (Sub::Run, "--mem", "1025G", Outcome::Usage),
        (Sub::Run, "--mem", "16385K", Outcome::Usage),
        (Sub::Run, "--mem", "-1M", Outcome::Usage),
        (Sub::Run, "--mem", "99999999999999999999T", Outcome::Usage),
        (Sub::Density, "--vms", "0", Outcome::Usage),
        (Sub::Density, "--vms", "257", Outcome::Usage),
        (Sub::Density, "--vms", "2", Outcome::Started),
        (Sub::Density, "--progress-every", "inf", Outcome::Usage),
        (Sub::Density, "--progress-every", "0.01", Outcome::Started),
        (Sub::Density, "--vm-cmdline", "1:quiet", Outcome::StartFailure),
        (Sub::BootTest, "--timeout", "18446744073709551616", Outcome::Usage),
        // Values that once overflowed a deadline in the VMM (a panic): refused by the parser.
        (Sub::Run, "--timeout", "18446744073709551615", Outcome::Usage),
        (Sub::Run, "--timeout", "31536001", Outcome::Usage),
        (Sub::Run, "--timeout", "31536000", Outcome::Started),
        (Sub::BootTest, "--timeout", "18446744073709551615", Outcome::Usage),
        (Sub::Density, "--timeout", "18446744073709551615", Outcome::Usage),
        (Sub::Density, "--timeout", "9223372036854775808", Outcome::Usage),
        (Sub::Run, "--dedup-scan-every", "18446744073709551615", Outcome::Usage),
        (Sub::Run, "--dedup-scan-every", "1e300", Outcome::Usage),
        (Sub::Density, "--dedup-scan-every", "3600", Outcome::Started),
        (Sub::Density, "--progress-every", "18446744073709551615", Outcome::Usage),
        (Sub::Run, "--vcpus", "4294967296", Outcome::Usage),
        (Sub::BootTest, "--mem", "18446744073709551615", Outcome::Usage),
        (Sub::Density, "--mem", "17592186044416K", Outcome::Usage),
        (Sub::Density, "--vms", "18446744073709551615", Outcome::Usage),
        (Sub::Density, "--vm-cmdline", "18446744073709551615:quiet", Outcome::StartFailure),
        (Sub::Density, "--vm-cmdline", "18446744073709551616:quiet", Outcome::Usage),
    ];
    let mut cases: Vec<Case> = known
        .iter()
        .map(|&(sub, option, value, outcome)| {
            case("numbers", sub, with_option(base(sub, fx, true), option, value), Some(outcome))
        })
        .collect();
    let options: &[(Sub, &str)] = &[
        (Sub::Run, "--vcpus"),
        (Sub::Run, "--mem"),
        (Sub::Run, "--timeout"),
        (Sub::Run, "--dedup-scan-every"),
        (Sub::BootTest, "--vcpus"),
        (Sub::BootTest, "--mem"),
        (Sub::BootTest, "--timeout"),
        (Sub::Density, "--vms"),
        (Sub::Density, "--progress-every"),
        (Sub::Density, "--vm-cmdline"),
        (Sub::Density, "--timeout"),
        (Sub::Density, "--dedup-scan-every"),
    ];
    for _ in 0..RANDOM_CASES * 3 {
        let &(sub, option) = rng.pick(options);
        let mut value = hostile_number(rng);
        if option == "--vm-cmdline" {
            value.push_str(":quiet");
        }
        // A valid large --vms would start that many VMs; the bounds are tested above.
        if option == "--vms" && value.trim().parse::<u16>().is_ok_and(|n| (3..=256).contains(&n)) {
            value = "3".into();
        }
        cases.push(case("numbers", sub, with_option(base(sub, fx, true), option, &value), None));
    }
    cases
}

/// Special files in every place that takes a file.
fn special_files(fx: &Fixtures) -> Vec<Case> {
    let mut cases = Vec::new();
    for SpecialFile { path, initrd: is_initrd, disk: is_disk, output } in fx.special_files() {
        let failure_unless = |ok: bool| Some(if ok { Outcome::Started } else { Outcome::StartFailure });
        let mut kernel = base(Sub::Run, fx, false);
        kernel.extend([os("--kernel"), os(&path)]);
        cases.push(case("special files", Sub::Run, kernel, Some(Outcome::StartFailure)));
        let mut initrd = base(Sub::Run, fx, true);
        initrd.extend([os("--initrd"), os(&path)]);
        cases.push(case("special files", Sub::Run, initrd, failure_unless(is_initrd)));
        for suffix in ["", ",ro"] {
            let mut disk = base(Sub::Run, fx, true);
            let mut spec = path.clone().into_os_string();
            spec.push(suffix);
            disk.extend([os("--disk"), spec]);
            cases.push(case("special files", Sub::Run, disk, failure_unless(is_disk)));
        }
        if let Some(is_output) = output {
            let mut serial = vec![os("run"), os("--kernel"), os(&fx.kernel), os("--timeout"), os(VM_TIMEOUT)];
            let mut spec = os("file:");
            spec.push(&path);
            serial.extend([os("--serial"), spec]);
            cases.push(case("special files", Sub::Run, serial, failure_unless(is_output)));
            let mut log = base(Sub::BootTest, fx, true);
            log.extend([os("--log"), os(&path)]);
            // boot-test's log also takes a FIFO someone reads (`--log >(grep ...)`).
            let log_ok = is_output || path == fx.fifo_with_reader;
            cases.push(case("special files", Sub::BootTest, log, failure_unless(log_ok)));
            let mut samples = base(Sub::Density, fx, true);
            samples.extend([os("--samples"), os(&path)]);
            // Writing the samples to /dev/full fails at the end, after the VMs ran.
            let full = path == Path::new("/dev/full");
            let expect = if full { None } else { failure_unless(is_output) };
            cases.push(case("special files", Sub::Density, samples, expect));
        }
    }
    cases
}

/// Repeated and conflicting options: clap refuses repeats of single-valued options; a
/// writable disk named twice (however spelled) is refused by samepage.
fn duplicates(rng: &mut Rng, fx: &Fixtures) -> Vec<Case> {
    let single: &[(&str, &[&str])] = &[
        ("--kernel", &[]),
        ("--mem", &["16M", "1G", "lots"]),
        ("--vcpus", &["1", "2", "0"]),
        ("--serial", &["none", "stdout", "file:/dev/null"]),
        ("--cmdline", &["quiet", ""]),
        ("--dedup", &["off", "ksm", "hinted", "bogus"]),
        ("--emulated-cpl0", &["on", "off", "auto"]),
    ];
    let mut cases = Vec::new();
    for _ in 0..RANDOM_CASES {
        let &(option, values) = rng.pick(single);
        let mut args = base(Sub::Run, fx, true);
        if option == "--serial" {
            let at = args.iter().position(|a| a == "--serial").expect("base option");
            args.drain(at..at + 2);
        }
        for _ in 0..2 {
            let value = if values.is_empty() { os(&fx.kernel) } else { os(rng.pick(values)) };
            args.extend([os(option), value]);
        }
        cases.push(case("duplicates", Sub::Run, args, Some(Outcome::Usage)));
    }
    let image = fx.image.display().to_string();
    let spellings = [image.clone(), format!("{}/./image.img", fx.dir.as_path().display())];
    for first in ["", ",ro", ",rw"] {
        for second in ["", ",ro", ",rw"] {
            let mut args = base(Sub::Run, fx, true);
            args.extend([os("--disk"), os(format!("{}{first}", spellings[0]))]);
            args.extend([os("--disk"), os(format!("{}{second}", rng.pick(&spellings)))]);
            let both_ro = first == ",ro" && second == ",ro";
            let expect = if both_ro { Outcome::Started } else { Outcome::StartFailure };
            cases.push(case("duplicates", Sub::Run, args, Some(expect)));
        }
    }
    // Options of one subcommand given to another.
    for (sub, alien) in
        [(Sub::Run, "--vms"), (Sub::Run, "--exec"), (Sub::BootTest, "--serial"), (Sub::Density, "--log")]
    {
        let mut args = base(sub, fx, true);
        args.extend([os(alien), os("1")]);
        cases.push(case("duplicates", sub, args, Some(Outcome::Usage)));
    }
    cases
}

/// Over-long strings: command lines past the kernel's limit, paths past PATH_MAX and
/// NAME_MAX, huge regular expressions.
fn long_strings(rng: &mut Rng, fx: &Fixtures) -> Vec<Case> {
    let mut cases = Vec::new();
    for _ in 0..RANDOM_CASES {
        let len = *rng.pick(&[255, 256, 2047, 2048, 4095, 4096, 5000, 70_000]);
        let text = "x".repeat(len);
        let long_path = format!("{}/{}", fx.dir.as_path().display(), "d/".repeat(len / 2));
        let (sub, option, value, expect) = match rng.below(7) {
            // The kernel's limit is 2048 bytes with the NUL, samepage's own parameters included.
            0 => (Sub::Run, "--cmdline", text, (len > 1900).then_some(Outcome::StartFailure)),
            1 => (Sub::Run, "--disk", long_path, Some(Outcome::StartFailure)),
            2 => (Sub::Run, "--initrd", format!("/{text}"), Some(Outcome::StartFailure)),
            3 => (Sub::Run, "--serial", format!("file:/nonexistent/{text}"), Some(Outcome::StartFailure)),
            4 => (Sub::Density, "--vm-cmdline", format!("0:{text}"), None),
            5 => (Sub::BootTest, "--expect", format!("a{{{len}}}{{{len}}}"), None),
            _ => (Sub::Run, "--kernel", long_path, Some(Outcome::StartFailure)),
        };
        let full = with_option(base(sub, fx, true), option, &value);
        cases.push(case("long strings", sub, full, expect));
    }
    cases
}

/// Arguments that are not UTF-8: fine in paths clap keeps as `PathBuf`, a usage error in
/// options clap parses as text.
fn non_utf8(rng: &mut Rng, fx: &Fixtures) -> Vec<Case> {
    let mut cases = Vec::new();
    for _ in 0..RANDOM_CASES {
        let mut bytes = fx.dir.as_path().as_os_str().as_bytes().to_vec();
        bytes.extend([b'/', 0xff]);
        for _ in 0..rng.below(8) {
            // Bytes that cannot start or continue valid UTF-8 here, and control characters.
            bytes.push(*rng.pick(&[0xff, 0xfe, 0xc0, 0x80, b'\n', 0x1b, b'a']));
        }
        let path = OsString::from_vec(bytes);
        let mut prefixed = os("file:");
        prefixed.push(&path);
        let (sub, option, value, expect) = match rng.below(7) {
            0 => (Sub::Run, "--kernel", path, Some(Outcome::StartFailure)),
            1 => (Sub::Run, "--initrd", path, Some(Outcome::StartFailure)),
            2 => (Sub::Run, "--disk", path, Some(Outcome::Usage)),
            3 => (Sub::Run, "--serial", prefixed, Some(Outcome::Usage)),
            4 => (Sub::Run, "--cmdline", path, Some(Outcome::Usage)),
            5 => (Sub::Run, "--mem", path, Some(Outcome::Usage)),
            // The directory is made (or exists as a file): either way no hang, one line.
            _ => (Sub::Density, "--console-dir", path, None),
        };
        let mut args = base(sub, fx, option != "--kernel");
        args.extend([os(option), value]);
        cases.push(case("non-UTF-8", sub, args, expect));
    }
    cases
}

/// Truncated, foreign and mangled copies of the test guest as the kernel.
fn elf_files(rng: &mut Rng, fx: &Fixtures) -> Vec<Case> {
    let size = std::fs::metadata(&fx.kernel).expect("test guest").len() as usize;
    let mut cases = Vec::new();
    for index in 0..RANDOM_CASES * 2 {
        let path = fx.path(&format!("kernel-{index}.elf"));
        let choice = rng.below(6);
        let cut = rng.below(size);
        let (field, value) = (rng.below(40), rng.next());
        test_guest_variant(&path, |b| match choice {
            0 => b.truncate(cut),
            1 => b[elf::E_MACHINE..elf::E_MACHINE + 2].copy_from_slice(&(value as u16 | 1).to_le_bytes()),
            2 => b[elf::EI_CLASS] = value as u8,
            // One header byte: ident, type, machine, entry, phoff, phnum and the rest.
            3 => b[field * 64 / 40] = value as u8,
            // One 8-byte field of one program header, to a random or an extreme value.
            _ => {
                // p_offset, p_vaddr, p_paddr, p_filesz or p_memsz.
                let at = elf::phdr_field(b, rng.below(3), 8 + 8 * (field % 5));
                let value = *rng.pick(&[value, u64::MAX, 1 << 63, 0x7fff_ffff_f000, 0]);
                b[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        });
        let mut args = base(Sub::Run, fx, false);
        args.extend([os("--kernel"), os(&path), os("--mem"), os(rng.pick(&["16M", "64M", "256M"]))]);
        let foreign = choice == 1 || (choice == 2 && value as u8 != 2);
        cases.push(case("ELF files", Sub::Run, args, foreign.then_some(Outcome::StartFailure)));
    }
    cases
}

/// Runs a case to its end or the deadline; returns its status (None if it was killed) and
/// standard error.
fn run_case(case: &Case, stderr_path: &Path) -> (Option<ExitStatus>, String) {
    let stderr_file = File::create(stderr_path).expect("stderr file");
    let mut child = samepage()
        .args(&case.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .spawn()
        .expect("start samepage");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = String::from_utf8_lossy(&std::fs::read(stderr_path).expect("read stderr")).into_owned();
    (status, stderr)
}

/// What is wrong with how a case ended, if anything.
fn check(case: &Case, status: Option<ExitStatus>, stderr: &str) -> Result<(), String> {
    let status = status.ok_or(format!("hung: killed after {DEADLINE:?}"))?;
    if stderr.contains("panicked") || stderr.contains("samepage: error: panic in thread") {
        return Err("panicked".into());
    }
    let code = status.code().ok_or(format!("killed by signal {:?}", status.signal()))?;
    // density relays what its VM processes print, each line after the VM's name (a VM that
    // cannot start says why there too): what follows judges density's own lines.
    let own: String = stderr
        .lines()
        .filter(|l| case.sub != Sub::Density || !relayed(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let stderr = own.as_str();
    let clap_lines = stderr.lines().filter(|l| l.starts_with("error:")).count();
    let samepage_lines = stderr.matches("samepage: error:").count();
    let outcome = match (clap_lines, samepage_lines) {
        (1, 0) if code == 2 => Outcome::Usage,
        (0, 1) if code == case.sub.start_failure_code() => Outcome::StartFailure,
        (0, 0) if case.sub.documented_vm_code(code) => Outcome::Started,
        _ => {
            return Err(format!(
                "exit code {code} with {clap_lines} clap and {samepage_lines} samepage error lines"
            ))
        }
    };
    // A refused start prints its one error line and maybe log lines: anything else is part of
    // an error message that spilled over a line (a newline in a path, say).
    let stray = |l: &&str| !(l.starts_with("samepage") || l.starts_with('[') || l.starts_with("density:"));
    if let (Outcome::StartFailure, Some(line)) = (outcome, stderr.lines().find(stray)) {
        return Err(format!("stray line after the error line: {line:?}"));
    }
    match case.expect {
        Some(expected) if expected != outcome => {
            Err(format!("expected {expected:?}, got {outcome:?} (exit {code})"))
        }
        _ => Ok(()),
    }
}

/// Whether `line` is one density relayed from a VM process: `vmN: ...`.
fn relayed(line: &str) -> bool {
    line.split_once(": ")
        .and_then(|(name, _)| name.strip_prefix("vm"))
        .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn hostile_command_lines_end_cleanly() {
    let seed = std::env::var("SAMEPAGE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    let mut rng = Rng::new(seed);
    let fx = Fixtures::new();
    let mut cases = numbers(&mut rng, &fx);
    cases.extend(special_files(&fx));
    cases.extend(duplicates(&mut rng, &fx));
    cases.extend(long_strings(&mut rng, &fx));
    cases.extend(non_utf8(&mut rng, &fx));
    cases.extend(elf_files(&mut rng, &fx));

    let stderr_path = fx.path("stderr.txt");
    let started = Instant::now();
    let mut per_category: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        let (status, stderr) = run_case(case, &stderr_path);
        *per_category.entry(case.category).or_default() += 1;
        *per_outcome.entry(format!("exit {:?}", status.and_then(|s| s.code()))).or_default() += 1;
        if let Err(why) = check(case, status, &stderr) {
            let args: Vec<String> = case.args.iter().map(|a| format!("{:?}", a)).collect();
            let shown: String = stderr.chars().take(600).collect();
            failures.push(format!("{why}: samepage {}\n{shown}", args.join(" ")));
        }
    }
    let elapsed = started.elapsed();
    let counts: Vec<String> = per_category.iter().map(|(c, n)| format!("{c} {n}")).collect();
    let outcomes: Vec<String> = per_outcome.iter().map(|(o, n)| format!("{o}: {n}")).collect();
    println!(
        "cli fuzz: seed {seed}, {} cases in {:.1} s; {}; {}",
        cases.len(),
        elapsed.as_secs_f64(),
        counts.join(", "),
        outcomes.join(", ")
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
