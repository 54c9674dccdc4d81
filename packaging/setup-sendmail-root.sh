#!/bin/sh
# Prepare the private Sendmail root that tests/e2e/test_sendmail.py runs:
#
#   sh packaging/setup-sendmail-root.sh [ROOT]
#
# ROOT defaults to $ARCHIVE_SENDMAIL_ROOT, else
# /var/lib/archive-milter-test/sendmail (outside any build directory, so
# that wiping a build does not download it again).
#
# Debian's sendmail-bin conflicts with postfix, which the other tests
# need, so Sendmail is never installed: `apt-get download` fetches the
# Debian 12 packages and `dpkg-deb -x` unpacks them into ROOT, which dpkg
# never hears of (../shared/MTA-NOTES.md, "Sendmail beside Postfix").
# The shared libraries it needs from the system are installed by
# setup-debian.sh; the unpacked libwrap0 and m4 stay inside ROOT.
#
# Idempotent and non-interactive: ROOT/.versions records the version of
# each unpacked package; when those are the versions apt would fetch now
# (or apt knows no version at all, e.g. before `apt-get update`, and ROOT
# is complete), nothing is downloaded.  A new ROOT is unpacked beside the
# old one and swapped in whole, so a failed run leaves the old one.
set -eu

ROOT=${1:-${ARCHIVE_SENDMAIL_ROOT:-/var/lib/archive-milter-test/sendmail}}
PKGS="sendmail-bin sendmail-base sendmail-cf libwrap0 m4"
STAMP="$ROOT/.versions"
SM="$ROOT/usr/libexec/sendmail/sendmail"

# "pkg=version" per line, as apt would fetch them now; "" unless apt
# knows a version of every package.  One apt-cache call: each is slow.
wanted() {
	# shellcheck disable=SC2086
	apt-cache show --no-all-versions $PKGS 2>/dev/null | awk -v want="$PKGS" '
	    /^Package: / { p = $2 }
	    /^Version: / && !(p in v) { v[p] = $2 }
	    END {
		n = split(want, w, " ")
		for (i = 1; i <= n; i++)
			if (!(w[i] in v))
				exit
		for (i = 1; i <= n; i++)
			print w[i] "=" v[w[i]]
	    }'
}

root_complete() {
	[ -x "$SM" ] && [ -x "$ROOT/usr/bin/m4" ] &&
	    [ -f "$ROOT/usr/share/sendmail/cf/m4/cf.m4" ] && [ -f "$STAMP" ]
}

want=$(wanted)
if root_complete && { [ -z "$want" ] || [ "$want" = "$(cat "$STAMP")" ]; }; then
	echo "setup: sendmail root $ROOT up to date"
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "setup: sendmail root $ROOT missing or out of date" \
	    "(run this script as root)" >&2
	exit 1
fi

# Step 1: apt must know the versions; a fresh machine has no lists yet.
if [ -z "$want" ]; then
	apt-get update -qq
	want=$(wanted)
	if [ -z "$want" ]; then
		echo "setup: apt knows no version of:$PKGS" >&2
		exit 1
	fi
fi

# Step 2: download into a directory of our own, then unpack beside ROOT.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/sendmail-debs.XXXXXX")
trap 'rm -rf "$tmp" "$ROOT.new"' EXIT
# shellcheck disable=SC2046
(cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root \
    $(echo "$want" | tr '\n' ' '))
mkdir -p "$(dirname "$ROOT")"
rm -rf "$ROOT.new"
mkdir -m 0755 "$ROOT.new"
for deb in "$tmp"/*.deb; do
	dpkg-deb -x "$deb" "$ROOT.new"
done

# Step 3: no setuid or setgid bit anywhere: glibc ignores LD_LIBRARY_PATH
# and LD_PRELOAD for such a program, and the tests need both.
find "$ROOT.new" -type f -perm /6000 -exec chmod ug-s {} +

# Step 4: every library the binary needs is found (the system's, or the
# unpacked libwrap0), else the test would fail later and less clearly.
libdir=$(find "$ROOT.new/usr/lib" -name 'libwrap.so.0' -exec dirname {} \; |
    head -n 1)
missing=$(LD_LIBRARY_PATH="$libdir" \
    ldd "$ROOT.new/usr/libexec/sendmail/sendmail" | grep 'not found' || true)
if [ -n "$missing" ]; then
	echo "setup: the unpacked sendmail lacks libraries:" >&2
	echo "$missing" >&2
	exit 1
fi

# Step 5: swap the new root in whole.
echo "$want" >"$ROOT.new/.versions"
rm -rf "$ROOT.old"
if [ -e "$ROOT" ]; then
	mv "$ROOT" "$ROOT.old"
fi
mv "$ROOT.new" "$ROOT"
rm -rf "$ROOT.old"
echo "setup: sendmail root $ROOT: $(echo "$want" | tr '\n' ' ')"
