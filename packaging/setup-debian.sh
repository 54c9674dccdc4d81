#!/bin/sh
# Install every Debian 12 package that building, testing and the demo of
# archive-milter need.  Idempotent and non-interactive: run it as root as
# often as you like; it only calls apt-get when something is missing.
#
# Postfix is preseeded to "No configuration" so that installing it never
# touches /etc/postfix or starts a system instance: the tests and the demo
# run private instances with their own config directories.
set -eu

PKGS="
	build-essential meson ninja-build pkg-config
	libglib2.0-dev libglib2.0-bin libssl-dev libmilter-dev
	postfix openssl python3 clang libclang-rt-14-dev
	sasl2-bin libsasl2-modules libsasl2-modules-db
	clang-format procps iproute2 util-linux time
	libdb5.3 libldap-2.5-0 libnsl2 libsasl2-2 libssl3
"

# The private Sendmail of tests/e2e/test_sendmail.py is unpacked, never
# installed (sendmail-bin conflicts with postfix): setup-sendmail-root.sh
# does that after the packages; the libraries of the line above are the
# ones its binary takes from the system.
SENDMAIL_ROOT_SETUP="$(dirname "$0")/setup-sendmail-root.sh"

missing=""
for p in $PKGS; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
	    grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done

if [ -z "$missing" ]; then
	echo "setup: all packages present"
	exec sh "$SENDMAIL_ROOT_SETUP"
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "setup: missing packages:$missing (run this script as root)" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" |
    debconf-set-selections

# apt-get update once per run, and only when something must be installed.
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing

# A Debian postfix package may start its own instance; ours never needs it.
if [ -x /usr/sbin/postfix ] && postfix status >/dev/null 2>&1; then
	postfix stop >/dev/null 2>&1 || true
fi
echo "setup: installed:$missing"
exec sh "$SENDMAIL_ROOT_SETUP"
