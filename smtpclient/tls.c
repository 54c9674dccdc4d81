/*
 * tls.c - STARTTLS: the handshake, certificate and host-name checks,
 * and the OpenSSL transport that io.c uses afterwards
 *
 * Policy: TLS 1.2 at least; SNI for names, never for address literals
 * (RFC 6066 section 3); at SMTP_TLS_VERIFY the chain is checked against
 * the CA file or the system store and the name with OpenSSL's own
 * matcher (no partial wildcards), an address literal against the
 * certificate's IP entries.  Lower levels encrypt without checking, as
 * Postfix's "may" and "encrypt" do.  Every failure becomes one readable
 * sentence built from OpenSSL's reason ("certificate has expired",
 * "host name mismatch: certificate is for ...").
 *
 * Threads: each connection has its own SSL_CTX and SSL, and OpenSSL 3
 * keeps its error queue per thread; the queue is cleared before each
 * handshake and after each failure so an old reason never explains a
 * new error.
 *
 * Known limits:
 * XXX: an SSL_CTX is built for every connection, so a CA file is read
 * again each time; a client reuses its connection for many messages,
 * so this costs one parse per connection, not per message.
 * XXX: bytes the server injects after its 220 are caught when they have
 * arrived by the time the handshake starts (read buffer and socket are
 * both checked); bytes that arrive later land inside the handshake and
 * fail it, so they are never read as replies either.
 */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "smtp-private.h"

/* ------------------------------------------------------------------ */
/* The socket under OpenSSL                                             */
/* ------------------------------------------------------------------ */

/* OpenSSL's own socket BIO writes with write(), which raises SIGPIPE
 * when the peer has gone; a library must not kill its host for that,
 * so this BIO sends with MSG_NOSIGNAL, as io.c does. */
static int
bio_write(BIO *bio, const char *buf, int len)
{
	ssize_t n;

	BIO_clear_retry_flags(bio);
	n = send(GPOINTER_TO_INT(BIO_get_data(bio)), buf, len, MSG_NOSIGNAL);
	if (n < 0 &&
	    (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		BIO_set_retry_write(bio);
	return (int)n;
}

static int
bio_read(BIO *bio, char *buf, int len)
{
	ssize_t n;

	BIO_clear_retry_flags(bio);
	n = recv(GPOINTER_TO_INT(BIO_get_data(bio)), buf, len, 0);
	if (n < 0 &&
	    (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		BIO_set_retry_read(bio);
	return (int)n;
}

static long
bio_ctrl(BIO *bio, int cmd, long num, void *ptr)
{
	(void)bio;
	(void)num;
	(void)ptr;
	return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int
bio_create(BIO *bio)
{
	BIO_set_init(bio, 1);
	return 1;
}

static gsize bio_method_once;

/* The method table, built once for the process (OpenSSL makes it
 * thread-safe to share). */
static const BIO_METHOD *
bio_method(void)
{
	if (g_once_init_enter(&bio_method_once)) {
		BIO_METHOD *m = BIO_meth_new(
		    BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "smtp socket");

		BIO_meth_set_write(m, bio_write);
		BIO_meth_set_read(m, bio_read);
		BIO_meth_set_ctrl(m, bio_ctrl);
		BIO_meth_set_create(m, bio_create);
		g_once_init_leave(&bio_method_once, (gsize)m);
	}
	return (const BIO_METHOD *)bio_method_once;
}

/* ------------------------------------------------------------------ */
/* The TLS transport                                                    */
/* ------------------------------------------------------------------ */

/* Map an SSL_read/SSL_write result to the transport contract: a count,
 * 0 for end of stream, or -1 with errno (EAGAIN and *@want). */
static ssize_t
tls_result(SSL *ssl, int rc, short *want)
{
	int err = SSL_get_error(ssl, rc);

	switch (err) {
	case SSL_ERROR_NONE:
		return rc;
	case SSL_ERROR_ZERO_RETURN:
		return 0;
	case SSL_ERROR_WANT_READ:
		*want = POLLIN;
		errno = EAGAIN;
		return -1;
	case SSL_ERROR_WANT_WRITE:
		*want = POLLOUT;
		errno = EAGAIN;
		return -1;
	case SSL_ERROR_SYSCALL:
		if (errno == 0)
			errno = ECONNRESET;
		ERR_clear_error();
		return -1;
	default:
		/* A bad record or alert mid-session: the stream cannot be
		 * trusted any more; io.c reports a lost connection. */
		ERR_clear_error();
		errno = EPROTO;
		return -1;
	}
}

static ssize_t
tls_recv(SmtpConn *conn, void *buf, gsize len, short *want)
{
	SSL *ssl = smtp_conn_get_transport_data(conn);
	size_t n = 0;
	int rc;

	rc = SSL_read_ex(ssl, buf, len, &n);
	return tls_result(ssl, rc > 0 ? (int)n : rc, want);
}

static ssize_t
tls_send(SmtpConn *conn, const void *buf, gsize len, short *want)
{
	SSL *ssl = smtp_conn_get_transport_data(conn);
	size_t n = 0;
	int rc;

	rc = SSL_write_ex(ssl, buf, len, &n);
	return tls_result(ssl, rc > 0 ? (int)n : rc, want);
}

/*
 * Application data waiting, decrypted or still on the socket.  The raw
 * socket cannot tell: under TLS 1.3 it also carries session tickets
 * and other records that are no reply, so peek through OpenSSL (the
 * socket is non-blocking; "nothing yet" is just WANT_READ).
 */
static gboolean
tls_pending(SmtpConn *conn)
{
	SSL *ssl = smtp_conn_get_transport_data(conn);
	size_t n = 0;
	char c;
	int rc;

	if (SSL_pending(ssl) > 0)
		return TRUE;
	rc = SSL_peek_ex(ssl, &c, 1, &n);
	ERR_clear_error();
	return rc > 0 && n > 0;
}

/* Best-effort close_notify: one non-blocking try, no waiting for the
 * peer's; the socket is closed right after. */
static void
tls_close(SmtpConn *conn)
{
	SSL *ssl = smtp_conn_get_transport_data(conn);

	if (ssl == NULL)
		return;
	if (SSL_is_init_finished(ssl))
		SSL_shutdown(ssl);
	ERR_clear_error();
	SSL_free(ssl);
}

static const SmtpTransport tls_transport = {
    tls_recv,
    tls_send,
    tls_pending,
    tls_close,
};

/* ------------------------------------------------------------------ */
/* Readable errors                                                      */
/* ------------------------------------------------------------------ */

/* An IP subjectAltName as text. */
static char *
ip_text(const ASN1_OCTET_STRING *ip)
{
	char buf[INET6_ADDRSTRLEN];
	int len = ASN1_STRING_length(ip);
	int family = len == 4 ? AF_INET : len == 16 ? AF_INET6 : 0;

	if (family == 0 || inet_ntop(family, ASN1_STRING_get0_data(ip), buf,
	                             sizeof(buf)) == NULL)
		return g_strdup("(bad address)");
	return g_strdup(buf);
}

/* The names a certificate is for, ", "-separated: its DNS and IP
 * subjectAltNames, or its common name when it has none.  Escaped: the
 * text comes from the peer and goes into logs. */
static char *
cert_names(X509 *cert)
{
	g_autoptr(GString) out = g_string_new(NULL);
	GENERAL_NAMES *sans;
	char cn[256];

	sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
	for (int i = 0; i < sk_GENERAL_NAME_num(sans); i++) {
		const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, i);
		g_autofree char *text = NULL;

		if (gn->type == GEN_DNS)
			text = g_strndup(
			    (const char *)ASN1_STRING_get0_data(gn->d.dNSName),
			    ASN1_STRING_length(gn->d.dNSName));
		else if (gn->type == GEN_IPADD)
			text = ip_text(gn->d.iPAddress);
		if (text != NULL)
			g_string_append_printf(out, "%s%s",
			                       out->len ? ", " : "", text);
	}
	GENERAL_NAMES_free(sans);
	if (out->len == 0 &&
	    X509_NAME_get_text_by_NID(X509_get_subject_name(cert),
	                              NID_commonName, cn, sizeof(cn)) > 0)
		g_string_append(out, cn);
	if (out->len == 0)
		g_string_append(out, "no name");
	return g_strescape(out->str, NULL);
}

/* The verification failure as a sentence; the host-name case names
 * what the certificate is for, since that is what an operator must
 * compare with the relay setting. */
static void
verify_error(SSL *ssl, long result, const char *host, GError **error)
{
	STACK_OF(X509) *chain = SSL_get_peer_cert_chain(ssl);
	X509 *leaf = sk_X509_num(chain) > 0 ? sk_X509_value(chain, 0) : NULL;
	g_autofree char *names = NULL;

	if (result != X509_V_ERR_HOSTNAME_MISMATCH &&
	    result != X509_V_ERR_IP_ADDRESS_MISMATCH) {
		smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
		               "TLS certificate verify failed: %s",
		               X509_verify_cert_error_string(result));
		return;
	}
	names = leaf != NULL ? cert_names(leaf) : g_strdup("unknown names");
	smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
	               "TLS host name mismatch: certificate is for %s, "
	               "not %s",
	               names, host);
}

/* Why SSL_connect() failed, from the verify result, the error queue or
 * errno, in that order of precision. */
static void
handshake_error(SSL *ssl, int rc, SmtpTlsLevel level, const char *host,
                GError **error)
{
	int err = SSL_get_error(ssl, rc);
	unsigned long e = ERR_peek_last_error();
	long result = SSL_get_verify_result(ssl);
	char buf[256];

	if (level == SMTP_TLS_VERIFY && result != X509_V_OK) {
		verify_error(ssl, result, host, error);
		return;
	}
	if (e != 0) {
		const char *reason = ERR_reason_error_string(e);

		if (reason == NULL) {
			ERR_error_string_n(e, buf, sizeof(buf));
			reason = buf;
		}
		smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
		               "TLS handshake failed: %s", reason);
		return;
	}
	if (err == SSL_ERROR_SYSCALL && errno != 0) {
		smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
		               "TLS handshake failed: %s", g_strerror(errno));
		return;
	}
	smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
	               "TLS handshake failed: connection closed by server");
}

/* ------------------------------------------------------------------ */
/* The handshake                                                        */
/* ------------------------------------------------------------------ */

/* RFC 3207 section 4.2 leaves nothing between the 220 and the
 * handshake; bytes there were injected by whoever could write into the
 * clear-text stream, and would later pass for replies sent under TLS
 * (CVE-2011-0411 and its many cousins). */
static gboolean
injected(SmtpConn *conn)
{
	return smtp_conn_has_pending(conn);
}

static SSL_CTX *
new_context(SmtpTlsLevel level, const char *ca_file, GError **error)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	int ok;

	if (ctx == NULL) {
		smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
		               "TLS setup failed: %s",
		               ERR_reason_error_string(ERR_peek_last_error()));
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);

	/* SMTP frames its own replies, so a close without close_notify
	 * cannot truncate one unnoticed; many servers skip it. */
	SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF |
	                             SSL_OP_NO_RENEGOTIATION);

	/* io.c retries a write with the same bytes, possibly at another
	 * address, and takes partial counts. */
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
	                          SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	if (level != SMTP_TLS_VERIFY) {
		SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
		return ctx;
	}

	ok = ca_file != NULL ? SSL_CTX_load_verify_file(ctx, ca_file)
	                     : SSL_CTX_set_default_verify_paths(ctx);
	if (!ok) {
		smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
		               "cannot load CA certificates from %s: %s",
		               ca_file != NULL ? ca_file : "the system store",
		               ERR_reason_error_string(ERR_peek_last_error()));
		SSL_CTX_free(ctx);
		return NULL;
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	return ctx;
}

static SSL *
new_ssl(SmtpConn *conn, SmtpTlsLevel level, const char *host,
        const char *ca_file, GError **error)
{
	SSL_CTX *ctx = new_context(level, ca_file, error);
	gboolean is_ip = g_hostname_is_ip_address(host);
	BIO *bio;
	SSL *ssl;

	if (ctx == NULL)
		return NULL;
	ssl = SSL_new(ctx);
	SSL_CTX_free(ctx); /* the SSL holds its own reference */
	bio = ssl != NULL ? BIO_new(bio_method()) : NULL;
	if (bio == NULL)
		goto fail;
	BIO_set_data(bio, GINT_TO_POINTER(smtp_conn_get_fd(conn)));
	SSL_set_bio(ssl, bio, bio);

	/* RFC 6066 section 3: no address literal in server_name. */
	if (!is_ip && !SSL_set_tlsext_host_name(ssl, host))
		goto fail;
	if (level != SMTP_TLS_VERIFY)
		return ssl;
	if (is_ip) {
		if (!X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host))
			goto fail;
		return ssl;
	}
	SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
	if (!SSL_set1_host(ssl, host))
		goto fail;
	return ssl;

fail:
	smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
	               "TLS setup for %s failed: %s", host,
	               ERR_reason_error_string(ERR_peek_last_error()));
	SSL_free(ssl);
	return NULL;
}

gboolean
smtp_tls_start(SmtpConn *conn, SmtpTlsLevel level, const char *host,
               const char *ca_file, guint timeout_ms, GError **error)
{
	gboolean is_hard;
	gint64 deadline = smtp_conn_deadline(conn, timeout_ms, &is_hard);
	SSL *ssl;

	/* Step 1: nothing may follow the 220. */
	if (injected(conn)) {
		smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
		               "server sent data after its 220 to STARTTLS "
		               "(response injection); connection closed");
		return FALSE;
	}

	/* Step 2: a fresh error queue, so that the reasons below are
	 * this handshake's. */
	ERR_clear_error();
	ssl = new_ssl(conn, level, host, ca_file, error);
	if (ssl == NULL) {
		ERR_clear_error();
		return FALSE;
	}

	/* Step 3: the handshake, on the non-blocking socket. */
	for (;;) {
		int rc, err;

		errno = 0;
		rc = SSL_connect(ssl);
		if (rc == 1)
			break;
		err = SSL_get_error(ssl, rc);
		if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
			short ev =
			    err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;

			if (smtp_conn_wait(conn, ev, deadline))
				continue;
			if (is_hard)
				smtp_set_deadline_error(
				    error, "starttls",
				    "during the TLS handshake");
			else
				smtp_set_error(error, SMTP_ERROR_TIMEOUT,
				               "starttls", NULL,
				               "TLS handshake timed out after "
				               "%u ms",
				               timeout_ms);
		} else {
			handshake_error(ssl, rc, level, host, error);
		}
		SSL_free(ssl);
		ERR_clear_error();
		return FALSE;
	}

	/* Step 4: from here on every byte goes through OpenSSL. */
	smtp_conn_set_transport(conn, &tls_transport, ssl);
	return TRUE;
}
