#!/bin/bash
# tests/demo.sh - archive-milter on real mail, on loopback
#
#   bash tests/demo.sh           (as root on Debian 12; from any directory)
#
# Installs what is missing (packaging/setup-debian.sh), builds into build/,
# then runs tests/e2e/demo.py: a private Postfix whose smtpd_milters is
# archive-milter, a main relay and an archive relay, all on 127.0.0.1 on
# ports picked at run time; a set of corpus messages goes through Postfix
# and the demo shows the archived copies with their X-Envelope-* headers
# and the milter's log lines.  Everything it starts is stopped at the end.
# Extra arguments go to demo.py (e.g. --per-folder 5, --keep DIR).
set -eu

cd "$(dirname "$0")/.."
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3

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
