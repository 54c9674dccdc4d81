#!/bin/bash
# tests/run-all.sh - the one test command of archive-milter
#
#   bash tests/run-all.sh        (as root on Debian 12; from any directory)
#
# 1. packaging/setup-debian.sh installs what is missing (needs root the
#    first time);
# 2. clang-format --dry-run --Werror over the C sources (.clang-format);
#    a file out of format counts as one failed test;
# 3. build/: meson setup (or reconfigure) and ninja, then every suite but
#    bench and soak (unit and e2e; e2e starts private Postfix instances and
#    needs root);
# 4. build-asan/: the same sources with AddressSanitizer and UBSan, unit
#    suite only;
# 5. a short libFuzzer run of each fuzz target (fuzz/run-short.sh);
# 6. the last line is "N passed, N failed" (", N skipped" when any were),
#    counted from both builds' meson-logs/testlog.json: OK and
#    EXPECTEDFAIL pass; FAIL, TIMEOUT, ERROR and UNEXPECTEDPASS fail; SKIP
#    is skipped.  A step that stops a build from testing at all (setup,
#    configure, compile) counts as one failed test, so a broken build can
#    never look green.
#
# Exit status: 0 when nothing failed and at least one test ran, else 1.
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3

step_failures=0
fail_step() {
	echo "run-all: FAILED: $*" >&2
	step_failures=$((step_failures + 1))
}

# configure DIR [OPTIONS...]: fresh setup, or reconfigure an existing
# build directory (wiping it when reconfiguring fails).
configure() {
	dir=$1
	shift
	if [ -f "$dir/meson-private/coredata.dat" ]; then
		meson setup --reconfigure "$dir" "$@" ||
		    meson setup --wipe "$dir" "$@"
	else
		rm -rf "$dir"
		meson setup "$dir" "$@"
	fi
}

# build_and_test DIR SUITE-ARGS -- SETUP-OPTIONS
build_and_test() {
	dir=$1
	shift
	suites=()
	while [ $# -gt 0 ] && [ "$1" != "--" ]; do
		suites+=("$1")
		shift
	done
	[ $# -gt 0 ] && shift
	rm -f "$dir/meson-logs/testlog.json"
	echo "run-all: === $dir: configure ==="
	if ! configure "$dir" "$@"; then
		fail_step "meson setup $dir"
		return
	fi
	echo "run-all: === $dir: build ==="
	if ! ninja -C "$dir"; then
		fail_step "ninja -C $dir"
		return
	fi
	echo "run-all: === $dir: meson test ${suites[*]} ==="
	# A failing test is counted below from testlog.json, not here.
	meson test -C "$dir" "${suites[@]}" --print-errorlogs ||
	    echo "run-all: meson test -C $dir reported failures" >&2
}

echo "run-all: === setup ==="
if ! sh packaging/setup-debian.sh; then
	fail_step "packaging/setup-debian.sh"
fi

if [ -f .clang-format ]; then
	echo "run-all: === clang-format check ==="
	# Sources only: never build directories (git may be absent on a
	# fresh machine, so no git ls-files).
	mapfile -t csrc < <(find . \( -name 'build*' -o -name '_*' \
	    -o -name '.*' ! -name . \) -prune -o -type f \
	    \( -name '*.c' -o -name '*.h' \) -print | sort)
	if [ ${#csrc[@]} -gt 0 ] &&
	    ! clang-format --dry-run --Werror "${csrc[@]}"; then
		fail_step "clang-format --dry-run --Werror (see above)"
	fi
fi

build_and_test build --no-suite bench --no-suite soak
build_and_test build-asan --suite unit -- \
    -Db_sanitize=address,undefined -Db_lundef=false

# A short libFuzzer run of the reply parser and the message encoder
# (issue 3); it counts as one test that passes or fails.
step_passes=0
echo "run-all: === fuzz: short run ==="
if bash fuzz/run-short.sh "${FUZZ_SECONDS:-20}"; then
	step_passes=$((step_passes + 1))
else
	fail_step "fuzz/run-short.sh (inputs in build-fuzz/fuzz-artifacts/)"
fi

"$PYTHON" - "$step_failures" "$step_passes" build/meson-logs/testlog.json \
    build-asan/meson-logs/testlog.json <<'PY'
import json, sys

passed = failed = skipped = 0
for path in sys.argv[3:]:
    try:
        f = open(path)
    except OSError:
        continue
    with f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                result = json.loads(line).get("result", "")
            except ValueError:
                # A torn or corrupt record must not look green.
                result = "UNREADABLE"
            if result in ("OK", "EXPECTEDFAIL"):
                passed += 1
            elif result == "SKIP":
                skipped += 1
            else:
                # FAIL, TIMEOUT, ERROR, UNEXPECTEDPASS and anything new
                failed += 1
failed += int(sys.argv[1])
passed += int(sys.argv[2])
line = "%d passed, %d failed" % (passed, failed)
if skipped:
    line += ", %d skipped" % skipped
print(line)
sys.exit(0 if failed == 0 and passed > 0 else 1)
PY
