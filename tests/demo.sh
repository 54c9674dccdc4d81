#!/bin/bash
# tests/demo.sh - archive-milter on real mail, on loopback
#
#   bash tests/demo.sh           (as root on Debian 12; from any directory)
#
# Installs what is missing (packaging/setup-debian.sh), builds into build/,
# then runs tests/e2e/demo.py: a private Postfix whose smtpd_milters is
# archive-milter, a main relay and an archive relay, all on 127.0.0.1 on
# ports picked at run time; the milter's spool is in the demo's own
# temporary work directory (never /var/spool/archive-milter).  Sections:
#   1. corpus messages through Postfix (sync rule): the archived copies
#      with their X-Envelope-* and X-Archive-Id headers, the milter's log;
#   2. archive relay stopped: Postfix answers 4xx for the sync rule;
#   3. spool mode (delivery = spool), relay down: Postfix accepts at once,
#      --spool-list shows the copies queued; the relay comes back and the
#      spool drains, the copies arriving with the X-Archive-Id listed;
#   4. the archive refuses the archive address with 550, default policy:
#      the original is accepted, the copy held (--spool-list, an error
#      line); the relay accepts again and --spool-retry all sends it.
# Each step is checked; the last line says "demo: all N checks passed"
# or lists what did not happen, and the exit status is then 1.
# Everything it starts is stopped at the end, pass or fail (about 20 s
# after the build).
# Extra arguments go to demo.py (e.g. --per-folder 5, --keep DIR).
set -eu

cd "$(dirname "$0")/.."
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3

# The messages it sends: checked first, before minutes of set-up.
if [ -z "$(ls -A ../shared/corpus 2>/dev/null)" ]; then
	echo "demo: no test messages in $(cd .. && pwd)/shared/corpus:" \
	    "the shared corpus must sit beside the repository (README.md)" >&2
	exit 1
fi
sh packaging/setup-debian.sh
if [ -f build/meson-private/coredata.dat ]; then
	meson setup --reconfigure build >/dev/null
else
	meson setup build >/dev/null
fi
ninja -C build

milter=build/plugin/archive-milter
send=build/smtpclient/smtp-send
if [ ! -x "$milter" ]; then
	echo "demo: $milter was not built" >&2
	exit 1
fi
sendargs=()
[ -x "$send" ] && sendargs=(--smtp-send "$send")

exec "$PYTHON" tests/e2e/demo.py --milter "$milter" "${sendargs[@]}" \
    --corpus ../shared/corpus "$@"
