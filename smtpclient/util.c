/*
 * util.c - small helpers the library's users share: TLS level names and
 * defaults, and reading a password file
 *
 * archive-milter's configuration and smtp-send must agree on which
 * relays get TLS by default and on what makes a password file safe, so
 * both rules live here, once.  A loopback relay defaults to no TLS: the
 * traffic never leaves the machine, and a local content filter or test
 * server seldom has a certificate that could be verified.  Any other
 * relay defaults to "verify", as an archive copy is exactly the mail
 * that must not be read or redirected on the way.
 *
 * Known limits: XXX: only "localhost" is known as a loopback name; a
 * name is never resolved here (that would block, and the answer could
 * change before the connect), so another name for 127.0.0.1 gets
 * "verify".  IPv4-mapped ::ffff:127.0.0.1 is not counted as loopback
 * either, as GLib's g_inet_address_get_is_loopback() does not.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "smtpclient.h"

/* A password line longer than this is a wrong file, not a password. */
#define PASSWORD_MAX 1024

gboolean
smtp_host_is_loopback(const char *host)
{
	struct in6_addr a6;
	struct in_addr a4;

	g_return_val_if_fail(host != NULL, FALSE);

	if (g_ascii_strcasecmp(host, "localhost") == 0 ||
	    g_ascii_strcasecmp(host, "localhost.") == 0)
		return TRUE;
	if (inet_pton(AF_INET, host, &a4) == 1)
		return (ntohl(a4.s_addr) >> 24) == 127;
	if (inet_pton(AF_INET6, host, &a6) == 1)
		return IN6_IS_ADDR_LOOPBACK(&a6);
	return FALSE;
}

SmtpTlsLevel
smtp_tls_default_for_host(const char *host)
{
	return smtp_host_is_loopback(host) ? SMTP_TLS_NONE : SMTP_TLS_VERIFY;
}

static const char *const tls_names[] = {
    [SMTP_TLS_NONE] = "none",
    [SMTP_TLS_MAY] = "may",
    [SMTP_TLS_ENCRYPT] = "encrypt",
    [SMTP_TLS_VERIFY] = "verify",
};

const char *
smtp_tls_level_name(SmtpTlsLevel level)
{
	if ((guint)level < G_N_ELEMENTS(tls_names))
		return tls_names[level];
	return "unknown";
}

gboolean
smtp_tls_level_from_name(const char *name, SmtpTlsLevel *level)
{
	guint i;

	g_return_val_if_fail(name != NULL, FALSE);

	for (i = 0; i < G_N_ELEMENTS(tls_names); i++) {
		if (strcmp(name, tls_names[i]) == 0) {
			*level = (SmtpTlsLevel)i;
			return TRUE;
		}
	}
	return FALSE;
}

void
smtp_password_free(char *password)
{
	if (password == NULL)
		return;
	explicit_bzero(password, strlen(password));
	g_free(password);
}

/* open() and fstat(): what is checked is what is read, even if the
 * name is swapped for another file in between. */
static int
open_password_file(const char *path, GError **error)
{
	struct stat st;
	int fd, saved;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0 || fstat(fd, &st) != 0) {
		saved = errno;
		g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(saved),
		            "cannot open: %s", g_strerror(saved));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	if (!S_ISREG(st.st_mode)) {
		g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
		            "not a regular file");
		close(fd);
		return -1;
	}
	if ((st.st_mode & (S_IRGRP | S_IROTH)) != 0) {
		g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_PERM,
		            "mode %04o lets the group or others read the "
		            "password; chmod go-r it (e.g. 0600)",
		            (guint)(st.st_mode & 07777));
		close(fd);
		return -1;
	}
	return fd;
}

gboolean
smtp_ca_file_check(const char *path, GError **error)
{
	struct stat st;
	int fd, saved;

	g_return_val_if_fail(path != NULL, FALSE);

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0 || fstat(fd, &st) != 0) {
		saved = errno;
		g_set_error_literal(error, G_FILE_ERROR,
		                    g_file_error_from_errno(saved),
		                    g_strerror(saved));
		if (fd >= 0)
			close(fd);
		return FALSE;
	}
	close(fd);
	if (!S_ISREG(st.st_mode)) {
		g_set_error_literal(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
		                    "not a regular file");
		return FALSE;
	}
	return TRUE;
}

/* Read up to @size bytes; -1 with errno on error. */
static gssize
read_some(int fd, char *buf, gsize size)
{
	gsize got = 0;

	while (got < size) {
		gssize n = read(fd, buf + got, size - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		if (n == 0)
			break;
		got += (gsize)n;
	}
	return (gssize)got;
}

char *
smtp_password_file_read(const char *path, GError **error)
{
	char buf[PASSWORD_MAX + 2];
	char *password = NULL;
	const char *nl;
	gssize n;
	gsize len;
	int fd, saved;

	g_return_val_if_fail(path != NULL, NULL);

	/* Step 1: the file, checked before a byte of it is read. */
	fd = open_password_file(path, error);
	if (fd < 0)
		return NULL;
	n = read_some(fd, buf, sizeof(buf) - 1);
	saved = errno;
	close(fd);
	if (n < 0) {
		g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(saved),
		            "cannot read: %s", g_strerror(saved));
		return NULL;
	}

	/* Step 2: the first line, without LF or CRLF.  No error below
	 * quotes the buffer: it is the secret. */
	nl = memchr(buf, '\n', (gsize)n);
	len = nl != NULL ? (gsize)(nl - buf) : (gsize)n;
	if (len > 0 && buf[len - 1] == '\r')
		len--;
	if (len > PASSWORD_MAX)
		g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
		            "the first line is longer than %d octets",
		            PASSWORD_MAX);
	else if (len == 0)
		g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
		            "the first line (the password) is empty");
	else if (memchr(buf, '\0', len) != NULL)
		g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
		            "the password holds a NUL byte");
	else
		password = g_strndup(buf, len);
	explicit_bzero(buf, sizeof(buf));
	return password;
}
