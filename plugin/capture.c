/*
 * capture.c - the envelope and byte-exact message of one transaction
 *
 * The milter protocol does not hand over the message as sent: it gives
 * each header as a name and a value, then the body in chunks.  We put
 * the bytes back together as NAME ":" VALUE CRLF.  Postfix (3.7,
 * measured) passes a folded value with a bare "\n" at each fold,
 * followed by the continuation's own white space, and, with
 * SMFIP_HDR_LEADSPC, the value's leading white space as received
 * (none, one space, several, a tab).  So each bare "\n" becomes CRLF
 * and nothing else changes.  Body chunks arrive with CRLF line ends and
 * dots already un-stuffed; they are kept as they are.
 *
 * Memory stays bounded: past memory_max octets everything moves to a
 * temporary file that is unlinked as soon as it is created, so it
 * vanishes with the process, whatever way the process ends.
 *
 * Known limits: headers the MTA adds after the milter saw the message
 * (Postfix's own Received:) are not in the capture; Postfix also adds
 * Message-Id/Date/From for local clients before the milter sees them,
 * and those are.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "capture.h"

G_DEFINE_QUARK(am - capture - error - quark, am_capture_error)

struct AmCapture {
	gsize memory_max;       /* octets kept in memory at most */
	char *tmpdir;           /* where the spill file goes */
	gboolean leading_space; /* values keep their leading space */
	GPtrArray *headers;     /* AmHeader * */
	gboolean headers_done;  /* the blank line is written */
	GByteArray *mem;        /* the message while in memory */
	GBytes *frozen;         /* mem, frozen for sending */
	gboolean finished;      /* end of message: no more data */
	int fd;                 /* the spill file, or -1 */
	guint64 size;           /* octets captured */
};

/* ------------------------------------------------------------------ */
/* Envelope                                                             */
/* ------------------------------------------------------------------ */

AmEnvelope *
am_envelope_new(void)
{
	AmEnvelope *env = g_new0(AmEnvelope, 1);

	env->mail_params = g_ptr_array_new_with_free_func(g_free);
	env->recipients = g_ptr_array_new_with_free_func(g_free);
	return env;
}

void
am_envelope_free(AmEnvelope *env)
{
	if (env == NULL)
		return;
	g_free(env->queue_id);
	g_free(env->client_addr);
	g_free(env->client_name);
	g_free(env->auth_user);
	g_free(env->sender);
	g_ptr_array_unref(env->mail_params);
	g_ptr_array_unref(env->recipients);
	g_free(env);
}

static gboolean
has_control(const char *s)
{
	for (; *s != '\0'; s++)
		if (g_ascii_iscntrl(*s))
			return TRUE;
	return FALSE;
}

char *
am_address_strip(const char *arg)
{
	gsize len;

	if (arg == NULL || has_control(arg))
		return NULL;

	/* Postfix passes the address in brackets; tolerate it without. */
	len = strlen(arg);
	if (len >= 2 && arg[0] == '<' && arg[len - 1] == '>')
		return g_strndup(arg + 1, len - 2);
	if (strchr(arg, '<') != NULL || strchr(arg, '>') != NULL ||
	    strchr(arg, ' ') != NULL)
		return NULL;
	return g_strdup(arg);
}

gboolean
am_envelope_set_sender(AmEnvelope *env, char **argv, GError **error)
{
	char *addr = argv ? am_address_strip(argv[0]) : NULL;
	char **p;

	if (addr == NULL) {
		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
		            "unusable MAIL FROM address");
		return FALSE;
	}
	g_free(env->sender);
	env->sender = addr;
	g_ptr_array_set_size(env->mail_params, 0);
	env->smtputf8 = env->eightbit = FALSE;

	/* The parameters decide the options of the copy's own MAIL. */
	for (p = argv + 1; *p != NULL; p++) {
		if (has_control(*p))
			continue;
		g_ptr_array_add(env->mail_params, g_strdup(*p));
		if (g_ascii_strcasecmp(*p, "SMTPUTF8") == 0)
			env->smtputf8 = TRUE;
		else if (g_ascii_strcasecmp(*p, "BODY=8BITMIME") == 0)
			env->eightbit = TRUE;
	}
	return TRUE;
}

gboolean
am_envelope_add_recipient(AmEnvelope *env, char **argv, GError **error)
{
	char *addr = argv ? am_address_strip(argv[0]) : NULL;

	if (addr == NULL || *addr == '\0') {
		g_free(addr);
		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
		            "unusable RCPT TO address");
		return FALSE;
	}
	g_ptr_array_add(env->recipients, addr);
	return TRUE;
}

/* ------------------------------------------------------------------ */
/* Headers                                                              */
/* ------------------------------------------------------------------ */

static void
header_free(gpointer data)
{
	AmHeader *h = data;

	g_free(h->name);
	g_free(h->value);
	g_free(h);
}

char *
am_header_unfold(const AmHeader *header)
{
	GString *out = g_string_new(header->name);
	const char *v = header->value;

	g_string_append(out, ": ");
	while (*v == ' ' || *v == '\t' || *v == '\r' || *v == '\n')
		v++;

	/* RFC 5322 section 2.2.3: unfolding removes the line breaks only. */
	for (; *v != '\0'; v++)
		if (*v != '\r' && *v != '\n')
			g_string_append_c(out, *v);
	return g_string_free(out, FALSE);
}

/* ------------------------------------------------------------------ */
/* Storage                                                              */
/* ------------------------------------------------------------------ */

AmCapture *
am_capture_new(gsize memory_max, const char *tmpdir, gboolean leading_space)
{
	AmCapture *cap = g_new0(AmCapture, 1);

	if (tmpdir == NULL)
		tmpdir = g_getenv("TMPDIR");
	if (tmpdir == NULL || *tmpdir == '\0')
		tmpdir = "/var/tmp";
	cap->memory_max = memory_max;
	cap->tmpdir = g_strdup(tmpdir);
	cap->leading_space = leading_space;
	cap->headers = g_ptr_array_new_with_free_func(header_free);
	cap->mem = g_byte_array_new();
	cap->fd = -1;
	return cap;
}

void
am_capture_free(AmCapture *cap)
{
	if (cap == NULL)
		return;
	g_free(cap->tmpdir);
	g_ptr_array_unref(cap->headers);
	if (cap->mem != NULL)
		g_byte_array_unref(cap->mem);
	if (cap->frozen != NULL)
		g_bytes_unref(cap->frozen);
	if (cap->fd >= 0)
		close(cap->fd);
	g_free(cap);
}

static gboolean
write_all(int fd, const guint8 *data, gsize len, GError **error)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int saved = errno;

			g_set_error(error, AM_CAPTURE_ERROR,
			            AM_CAPTURE_ERROR_IO,
			            "cannot write temporary file: %s",
			            g_strerror(saved));
			return FALSE;
		}
		data += n;
		len -= n;
	}
	return TRUE;
}

/* Move what is in memory into a new, already unlinked file. */
static gboolean
spill(AmCapture *cap, GError **error)
{
	g_autofree char *path =
	    g_build_filename(cap->tmpdir, "archive-milter.XXXXXX", NULL);
	int fd = g_mkstemp_full(path, O_RDWR | O_CLOEXEC, 0600);

	if (fd < 0) {
		int saved = errno;

		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_IO,
		            "cannot create temporary file in %s: %s",
		            cap->tmpdir, g_strerror(saved));
		return FALSE;
	}
	unlink(path);
	if (!write_all(fd, cap->mem->data, cap->mem->len, error)) {
		close(fd);
		return FALSE;
	}
	cap->fd = fd;
	g_byte_array_unref(cap->mem);
	cap->mem = NULL;
	return TRUE;
}

static gboolean
capture_write(AmCapture *cap, const void *data, gsize len, GError **error)
{
	if (cap->finished) {
		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
		            "message data after end of message");
		return FALSE;
	}
	if (cap->fd < 0 && cap->mem->len + len > cap->memory_max &&
	    !spill(cap, error))
		return FALSE;
	if (cap->fd >= 0) {
		if (!write_all(cap->fd, data, len, error))
			return FALSE;
	} else {
		g_byte_array_append(cap->mem, data, len);
	}
	cap->size += len;
	return TRUE;
}

/* NAME ":" VALUE CRLF with each bare LF of a fold turned into CRLF. */
static GString *
header_rebuild(const char *name, const char *value, gboolean leading_space)
{
	GString *out = g_string_sized_new(strlen(name) + strlen(value) + 8);
	const char *v;

	g_string_append(out, name);
	g_string_append_c(out, ':');

	/* Without LEADSPC the MTA dropped the one space after the colon. */
	if (!leading_space && *value != '\0')
		g_string_append_c(out, ' ');
	for (v = value; *v != '\0'; v++) {
		if (*v == '\n' && (v == value || v[-1] != '\r'))
			g_string_append_c(out, '\r');
		g_string_append_c(out, *v);
	}
	g_string_append(out, "\r\n");
	return out;
}

gboolean
am_capture_add_header(AmCapture *cap, const char *name, const char *value,
                      GError **error)
{
	g_autoptr(GString) line = NULL;
	AmHeader *h;

	if (name == NULL || value == NULL || *name == '\0' ||
	    strpbrk(name, ": \t\r\n") != NULL || cap->headers_done) {
		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
		            "malformed header from the MTA");
		return FALSE;
	}
	line = header_rebuild(name, value, cap->leading_space);
	if (!capture_write(cap, line->str, line->len, error))
		return FALSE;
	h = g_new(AmHeader, 1);
	h->name = g_strdup(name);
	h->value = g_strdup(value);
	g_ptr_array_add(cap->headers, h);
	return TRUE;
}

gboolean
am_capture_end_headers(AmCapture *cap, GError **error)
{
	if (cap->headers_done)
		return TRUE;
	if (!capture_write(cap, "\r\n", 2, error))
		return FALSE;
	cap->headers_done = TRUE;
	return TRUE;
}

gboolean
am_capture_add_body(AmCapture *cap, const guchar *data, gsize len,
                    GError **error)
{
	if (!am_capture_end_headers(cap, error))
		return FALSE;
	return capture_write(cap, data, len, error);
}

const GPtrArray *
am_capture_get_headers(const AmCapture *cap)
{
	return cap->headers;
}

guint64
am_capture_get_size(const AmCapture *cap)
{
	return cap->size;
}

gboolean
am_capture_is_spilled(const AmCapture *cap)
{
	return cap->fd >= 0;
}

/* Stop accepting data; the memory buffer becomes shareable bytes. */
static gboolean
capture_freeze(AmCapture *cap, GError **error)
{
	if (!am_capture_end_headers(cap, error))
		return FALSE;
	if (cap->frozen == NULL && cap->fd < 0) {
		cap->frozen = g_byte_array_free_to_bytes(cap->mem);
		cap->mem = NULL;
	}
	cap->finished = TRUE;
	return TRUE;
}

gboolean
am_capture_append_to(AmCapture *cap, SmtpMessage *msg, GError **error)
{
	if (!capture_freeze(cap, error))
		return FALSE;
	if (cap->fd >= 0)
		return smtp_message_append_fd(msg, cap->fd, 0, cap->size,
		                              error);
	smtp_message_append_bytes(msg, cap->frozen);
	return TRUE;
}

GBytes *
am_capture_read_all(AmCapture *cap, GError **error)
{
	guint8 *buf;
	guint64 done = 0;

	if (!capture_freeze(cap, error))
		return NULL;
	if (cap->fd < 0)
		return g_bytes_ref(cap->frozen);

	buf = g_malloc(cap->size + 1);
	while (done < cap->size) {
		ssize_t n = pread(cap->fd, buf + done, cap->size - done, done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			g_set_error(error, AM_CAPTURE_ERROR,
			            AM_CAPTURE_ERROR_IO,
			            "cannot read temporary file back");
			g_free(buf);
			return NULL;
		}
		done += n;
	}
	return g_bytes_new_take(buf, cap->size);
}
