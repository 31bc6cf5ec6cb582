#!/usr/bin/env bash
# Runs every fuzz target (fuzz/: cargo fuzz, libFuzzer, on the nightly toolchain) from the
# checked-in seeds in fuzz/seeds/, and prints per target the executions run, the coverage
# reached and anything found. Exits non-zero if a target crashed, hung or ran out of memory.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each target SECONDS (default 300); the corpus
#                                           grows in target/fuzz/corpus/<target>
#   scripts/fuzz.sh --smoke [TARGET...]     each target 10 s from the seeds alone (the test
#                                           command's step)
#
# Targets run two at a time (FUZZ_JOBS=N for another number).
# Installs the nightly toolchain and cargo-fuzz (into target/tools) if they are missing.
# Builds go to target/fuzz; crashing inputs to target/fuzz/artifacts/<target>/ (replay one
# with: target/fuzz/x86_64-unknown-linux-gnu/release/<target> FILE).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

seconds=300
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=1
  seconds=10
  shift
elif [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
all_targets=(fphash_request virtio_blk mmio_registers kernel_loader console_verdict dedupd_messages
  ext4_superblock virtio_balloon snapshot_state virtio_entropy api_request virtio_vsock virtio_net)
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")

out="$repo/target/fuzz"
export CARGO_TARGET_DIR="$out"
# The targets' temporary disk images, kernels and initrds.
export TMPDIR="$out/tmp"
mkdir -p "$TMPDIR"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  export PATH="$repo/target/tools/bin:$PATH"
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz into target/tools"
    cargo install cargo-fuzz --locked --root "$repo/target/tools"
  fi
fi

start=$(date +%s)
if ! (cd fuzz && cargo +nightly fuzz build) >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log" >&2
  echo "fuzz: the fuzz targets do not build (log: $out/build.log)" >&2
  exit 1
fi
echo "fuzz: built in $(($(date +%s) - start)) s"

bin="$out/x86_64-unknown-linux-gnu/release"
# Fuzzes target $1; writes its summary line(s) to $out/$1.result, "FAILED" lines on a finding.
fuzz_one() {
  local t=$1 corpus artifacts log status=0 execs cov found
  if ((smoke)); then
    corpus="$out/smoke-corpus/$t"
    rm -rf "$corpus"
  else
    corpus="$out/corpus/$t"
  fi
  artifacts="$out/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  log="$out/$t.log"
  # -timeout: an input that runs 10 s is a hang; -print_final_stats: the execution count.
  "$bin/$t" "$corpus" "fuzz/seeds/$t" -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1 || true)
  found=$(sed -n 's/.*Test unit written to //p' "$log" | tail -1)
  if ((status != 0)); then
    {
      echo "fuzz: $t: FAILED after ${execs:-?} executions (${cov:-no coverage line}): ${found:-see $log}"
      grep -m1 -A1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" | sed 's/^/fuzz:   /' || true
    } >"$out/$t.result"
  else
    echo "fuzz: $t: ${execs:-?} executions in ${seconds} s, ${cov:-no coverage line}; nothing found" \
      >"$out/$t.result"
  fi
}

# Two targets at a time (FUZZ_JOBS): this machine's cores are shared.
jobs=${FUZZ_JOBS:-2}
for t in "${targets[@]}"; do
  while (($(jobs -rp | wc -l) >= jobs)); do
    wait -n || true
  done
  fuzz_one "$t" &
done
wait
failed=()
for t in "${targets[@]}"; do
  cat "$out/$t.result"
  grep -q "^fuzz: $t: FAILED" "$out/$t.result" && failed+=("$t")
done
echo "fuzz: done in $(($(date +%s) - start)) s"
if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]} (logs in $out/<target>.log, inputs in $out/artifacts/)" >&2
  exit 1
fi
