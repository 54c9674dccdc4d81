#!/bin/sh
# make-certs.sh - the test CA and server certificates of the TLS tests
#
# Usage: make-certs.sh DIR
#
# Writes into DIR (created if missing), at test time, so no private key
# is ever committed:
#   ca.crt                      the test CA (what clients are given)
#   good.crt good.key           signed by the CA, for localhost and
#                               127.0.0.1, valid now
#   expired.crt expired.key     the same names, valid only on 1-2
#                               January 2020
#   wronghost.crt wronghost.key signed by the CA, for wrong.example only
#   selfsigned.crt selfsigned.key  localhost and 127.0.0.1, but signed
#                               by itself
# Only the openssl command of OpenSSL 3.0 is used: "openssl ca" takes
# -startdate/-enddate, which "openssl x509 -req" of 3.0 lacks, so the
# expired certificate needs no clock tricks.  A private configuration
# file is used throughout, so the system openssl.cnf plays no part.
set -eu

if [ $# -ne 1 ]; then
	echo "usage: $0 DIR" >&2
	exit 64
fi
dir=$1
mkdir -p "$dir"
cd "$dir"
rm -rf ca-db
mkdir ca-db
: >ca-db/index.txt
echo 01 >ca-db/serial

# One configuration for the CA, the requests and the extensions; SAN
# comes from the environment so each certificate gets its own names.
cat >ca.cnf <<'CNF'
[ ca ]
default_ca = test_ca

[ test_ca ]
dir = ca-db
database = $dir/index.txt
serial = $dir/serial
new_certs_dir = $dir
certificate = ca.crt
private_key = ca.key
default_md = sha256
policy = any_policy
unique_subject = no
copy_extensions = none
email_in_dn = no

[ any_policy ]
commonName = supplied

[ req ]
distinguished_name = req_dn
prompt = no

[ req_dn ]
CN = archive-milter test

[ ca_ext ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ server_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $ENV::SAN
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

export SAN="DNS:localhost, IP:127.0.0.1"
quiet() {
	out=$("$@" 2>&1) || {
		echo "$out" >&2
		exit 1
	}
}

# The CA.
quiet openssl req -config ca.cnf -x509 -new -newkey rsa:2048 -nodes \
    -keyout ca.key -out ca.crt -days 30 -subj "/CN=archive-milter test CA" \
    -extensions ca_ext

# A server key and its request; $1 the file stem, $2 the common name.
request() {
	quiet openssl req -config ca.cnf -new -newkey rsa:2048 -nodes \
	    -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
}

# Signed by the CA; the rest of the arguments set the validity.
sign() {
	stem=$1
	shift
	quiet openssl ca -config ca.cnf -batch -notext \
	    -extensions server_ext -in "$stem.csr" -out "$stem.crt" "$@"
	rm -f "$stem.csr"
}

request good localhost
sign good -days 30

request expired localhost
sign expired -startdate 20200101000000Z -enddate 20200102000000Z

request wronghost wrong.example
SAN="DNS:wrong.example"
sign wronghost -days 30

SAN="DNS:localhost, IP:127.0.0.1"

quiet openssl req -config ca.cnf -x509 -new -newkey rsa:2048 -nodes \
    -keyout selfsigned.key -out selfsigned.crt -days 30 \
    -subj "/CN=localhost" -extensions server_ext

chmod 600 ./*.key
