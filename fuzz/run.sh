#!/usr/bin/env bash
# Builds and runs the fuzz targets with libFuzzer on *stable* Rust (see README.md).
#
#   fuzz/run.sh build                 build every target
#   fuzz/run.sh smoke [SECS]          every target for SECS (default 20) seconds, two
#                                     at a time; exits non-zero on any crash
#   fuzz/run.sh campaign [RUNS] [T..] every target (or those named) until it has run
#                                     RUNS (default 10^7) executions in total, over
#                                     all runs recorded in fuzz/work/campaign.tsv;
#                                     appends each run's counts there
#   fuzz/run.sh planted [SECS] [T..]  arms the planted bugs (FUZZ_PLANTED=1) and
#                                     checks libFuzzer finds each within SECS
#                                     (default 300); all targets unless named
#   fuzz/run.sh run TARGET [ARGS..]   one target, libFuzzer arguments passed on
#   fuzz/run.sh report                the campaign table (Markdown) from campaign.tsv
#
# The build is what `cargo fuzz build --sanitizer none` does (same flags, no
# -Zsanitizer), with plain cargo: nothing to install. No RUSTC_BOOTSTRAP needed.
# Work corpora, crash artifacts and logs go to fuzz/work/ (not committed); the
# committed seeds in fuzz/corpus/<target>/ are read, never written.
set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$FUZZ_DIR"
WORK="$FUZZ_DIR/work"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
BIN_DIR="$FUZZ_DIR/target/$TRIPLE/release"
TARGETS=(request request_structured sse usage verdict response_text snapshot
  plugin_config exposition collector_config)

# Dictionaries (libFuzzer -dict) per target; the others have none.
dict_for() {
  case "$1" in
    request | verdict | response_text | sse | usage) echo "$FUZZ_DIR/dict/json.dict" ;;
    plugin_config) echo "$FUZZ_DIR/dict/plugin_config.dict" ;;
    exposition) echo "$FUZZ_DIR/dict/prometheus.dict" ;;
    collector_config) echo "$FUZZ_DIR/dict/collector_config.dict" ;;
    *) echo "" ;;
  esac
}

build() {
  # FUZZ_NO_BUILD=1: use the binaries already in fuzz/target (e.g. while another
  # cargo holds the package cache lock).
  if [ "${FUZZ_NO_BUILD:-}" = 1 ]; then
    return 0
  fi
  # The main crate's build script builds the .wasm filter for its tests; the
  # fuzz targets do not need it.
  export INFERENCE_GATEWAY_WASM=/nonexistent/not-needed-by-fuzz-targets.wasm
  # cargo-fuzz 0.13's flags for `--sanitizer none` (all stable): SanitizerCoverage
  # with inline 8-bit counters, PC table, comparison tracing and stack depth, for
  # libFuzzer; `--cfg fuzzing`; debug assertions and overflow checks on.
  # --target keeps these flags away from build scripts and proc macros.
  RUSTFLAGS="-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cllvm-args=-sanitizer-coverage-stack-depth \
    -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --target "$TRIPLE" --bins
}

# fuzz_one TARGET LOG EXTRA_ARGS...: runs libFuzzer on TARGET with its work corpus
# (written) and the committed seeds (read); returns libFuzzer's status.
fuzz_one() {
  local t="$1" log="$2"
  shift 2
  local dict
  dict="$(dict_for "$t")"
  mkdir -p "$WORK/$t/corpus" "$WORK/$t/artifacts"
  local args=(-artifact_prefix="$WORK/$t/artifacts/" -print_final_stats=1 -timeout=10
    -rss_limit_mb=2048 -max_len=8192)
  [ -n "$dict" ] && args+=(-dict="$dict")
  "$BIN_DIR/$t" "${args[@]}" "$@" "$WORK/$t/corpus" "$FUZZ_DIR/corpus/$t" >"$log" 2>&1
}

stat_of() { sed -n "s/^stat::$2: *//p" "$1" | tail -1; }
cov_of() { grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$1" | tail -1; }

smoke() {
  local secs="${1:-20}" failed=() pids=() names=()
  mkdir -p "$WORK/logs"
  build
  run_smoke() {
    local t="$1"
    if fuzz_one "$t" "$WORK/logs/smoke-$t.log" -max_total_time="$secs"; then
      printf '%-20s ok    %10s runs  %s\n' "$t" "$(stat_of "$WORK/logs/smoke-$t.log" number_of_executed_units)" \
        "$(cov_of "$WORK/logs/smoke-$t.log")"
    else
      printf '%-20s CRASH (log: %s)\n' "$t" "$WORK/logs/smoke-$t.log"
      grep -E 'panicked|ERROR|Test unit written' "$WORK/logs/smoke-$t.log" | head -5
      return 1
    fi
  }
  # Two at a time: the machine has two cores.
  local i
  for ((i = 0; i < ${#TARGETS[@]}; i += 2)); do
    pids=() names=()
    for t in "${TARGETS[@]:i:2}"; do
      run_smoke "$t" &
      pids+=($!) names+=("$t")
    done
    for j in "${!pids[@]}"; do
      wait "${pids[$j]}" || failed+=("${names[$j]}")
    done
  done
  if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz smoke: crashes in ${failed[*]}"
    return 1
  fi
  echo "fuzz smoke: ${#TARGETS[@]} targets, no crash"
}

campaign() {
  local want="${1:-10000000}"
  shift || true
  local targets=("$@")
  [ "${#targets[@]}" -eq 0 ] && targets=("${TARGETS[@]}")
  mkdir -p "$WORK/logs"
  build
  local tsv="$WORK/campaign.tsv"
  [ -f "$tsv" ] || printf 'target\tdate\tcommit\texecutions\tseconds\tcorpus_files\tcoverage\tstatus\n' >"$tsv"
  local commit
  commit="$(git -C "$FUZZ_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  for t in "${targets[@]}"; do
    # Resumable: earlier rows of this target in the table count towards RUNS.
    local done_runs left
    done_runs="$(awk -F'\t' -v t="$t" '$1 == t { s += $4 } END { print s + 0 }' "$tsv")"
    left=$((want - done_runs))
    if [ "$left" -le 0 ]; then
      echo "campaign: $t already has $done_runs runs"
      continue
    fi
    local log="$WORK/logs/campaign-$t.log" t0=$SECONDS status=ok
    echo "campaign: $t, $left more runs (has $done_runs)"
    if ! fuzz_one "$t" "$log" -runs="$left"; then
      # A crash leaves an artifact; anything else (SIGTERM, SIGINT) is a stop.
      if grep -qE 'panicked|ERROR: libFuzzer|Test unit written' "$log"; then
        status="CRASH"
      else
        status="stopped"
      fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$(date -u +%FT%TZ)" "$commit" \
      "$(stat_of "$log" number_of_executed_units)" $((SECONDS - t0)) \
      "$(find "$WORK/$t/corpus" -type f | wc -l)" "$(cov_of "$log")" "$status" | tee -a "$tsv"
  done
}

planted() {
  local secs="${1:-300}"
  shift || true
  local targets=("$@") failed=()
  [ "${#targets[@]}" -eq 0 ] && targets=("${TARGETS[@]}")
  mkdir -p "$WORK/logs"
  build
  for t in "${targets[@]}"; do
    local log="$WORK/logs/planted-$t.log" t0=$SECONDS
    # A fresh corpus: only the committed seeds, so the find is not a replay.
    rm -rf "$WORK/planted/$t"
    mkdir -p "$WORK/planted/$t/corpus"
    local dict
    dict="$(dict_for "$t")"
    # Value profiling: comparison operands become coverage features, so the
    # thresholds in the planted conditions (a priority below -1000, ...) have a
    # gradient. Otherwise the same flags as smoke and campaign.
    local args=(-artifact_prefix="$WORK/planted/$t/" -print_final_stats=1 -timeout=10
      -max_len=8192 -max_total_time="$secs" -use_value_profile=1)
    [ -n "$dict" ] && args+=(-dict="$dict")
    if FUZZ_PLANTED=1 "$BIN_DIR/$t" "${args[@]}" "$WORK/planted/$t/corpus" "$FUZZ_DIR/corpus/$t" \
      >"$log" 2>&1; then
      printf '%-20s NOT FOUND in %ss\n' "$t" "$secs"
      failed+=("$t")
    elif grep -q "PLANTED BUG reached in $t" "$log"; then
      printf '%-20s found after %4ss, %10s runs\n' "$t" $((SECONDS - t0)) \
        "$(stat_of "$log" number_of_executed_units)"
      printf '%s\t%s\t%s\t%s\n' "$t" "$(date -u +%FT%TZ)" $((SECONDS - t0)) \
        "$(stat_of "$log" number_of_executed_units)" >>"$WORK/planted.tsv"
    else
      printf '%-20s crashed on something else (log: %s)\n' "$t" "$log"
      failed+=("$t")
    fi
  done
  if [ "${#failed[@]}" -ne 0 ]; then
    echo "planted: not found in ${failed[*]}"
    return 1
  fi
}

# report: the campaign table as Markdown, one row per target, summed over runs.
report() {
  local tsv="$WORK/campaign.tsv"
  echo "| target | executions | seconds | exec/s | corpus files | coverage (last run) | runs | crashes |"
  echo "|---|---:|---:|---:|---:|---|---:|---:|"
  for t in "${TARGETS[@]}"; do
    awk -F'\t' -v t="$t" '$1 == t { n += $4; s += $5; c = $6; cov = $7; r++; if ($8 == "CRASH") x++ }
      END { if (r) printf "| `%s` | %d | %d | %d | %d | %s | %d | %d |\n", t, n, s, (s ? n / s : 0), c, cov, r, x + 0 }' "$tsv"
  done
}

case "${1:-}" in
  build) build ;;
  report) report ;;
  smoke) smoke "${2:-20}" ;;
  campaign) shift; campaign "$@" ;;
  planted) shift; planted "$@" ;;
  run)
    shift
    t="$1"
    shift
    build
    mkdir -p "$WORK/$t/corpus"
    exec "$BIN_DIR/$t" "$@" "$WORK/$t/corpus" "$FUZZ_DIR/corpus/$t"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | grep '^#'
    exit 2
    ;;
esac
