#!/bin/bash
# fuzz/run-short.sh - a short libFuzzer run of every target, for the
# test command
#
#   bash fuzz/run-short.sh [SECONDS]     (default 30 per target)
#
# Configures build-fuzz/ (clang, ASan and UBSan, -Dfuzz=true) when it is
# not configured yet, builds the targets and runs each on a copy of its
# seed corpus in a temporary directory (the committed corpus never
# grows), for SECONDS of wall time.  A crash, leak, time-out or broken
# invariant makes libFuzzer exit non-zero, and so this script; the
# input that did it is left in build-fuzz/fuzz-artifacts/.
#
# Exit status: 0 when every target ran clean, 1 otherwise.
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
BUILD=$ROOT/build-fuzz
SECONDS_EACH=${1:-30}
TARGETS="fuzz-reply fuzz-encoder fuzz-capture"

# Step 1: configure once; a stale directory is set up again.
if [ ! -f "$BUILD/meson-private/coredata.dat" ]; then
	rm -rf "$BUILD"
	if ! CC=clang meson setup "$BUILD" -Dfuzz=true \
	    -Db_sanitize=address,undefined -Db_lundef=false; then
		echo "run-short: FAILED: meson setup $BUILD" >&2
		exit 1
	fi
fi

# Step 2: build only the fuzz targets; the rest is another build's job.
targets=""
for t in $TARGETS; do
	targets="$targets fuzz/$t"
done
# shellcheck disable=SC2086
if ! ninja -C "$BUILD" $targets; then
	echo "run-short: FAILED: ninja -C $BUILD" >&2
	exit 1
fi

# Step 3: each target on a scratch copy of its corpus.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$BUILD/fuzz-artifacts"
status=0
for t in $TARGETS; do
	corpus=$work/${t#fuzz-}
	mkdir "$corpus"
	cp "$ROOT/fuzz/corpus-${t#fuzz-}/"* "$corpus/"
	echo "run-short: === $t, ${SECONDS_EACH}s ==="
	# UBSan findings must fail the run, not only print.
	if ! UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	    ASAN_OPTIONS=detect_leaks=1 \
	    "$BUILD/fuzz/$t" -max_total_time="$SECONDS_EACH" \
	    -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
	    -artifact_prefix="$BUILD/fuzz-artifacts/$t-" \
	    -print_final_stats=1 "$corpus" 2>"$work/$t.log"; then
		tail -n 60 "$work/$t.log" >&2
		echo "run-short: FAILED: $t (artifacts in" \
		    "$BUILD/fuzz-artifacts/)" >&2
		status=1
		continue
	fi
	grep -E '^(stat::number_of_executed_units|Done)' "$work/$t.log"
	echo "run-short: $t: ok"
done
exit $status
