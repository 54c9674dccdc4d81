/*
 * capture.c - the envelope and byte-exact message of one transaction
 *
 * The milter protocol does not hand over the message as sent: it gives
 * each header as a name and a value, then the body in chunks.  We put
 * the bytes back together as NAME ":" VALUE CRLF.  Postfix (3.7,
 * measured) passes a folded value with a bare "\n" at each fold,
 * followed by the continuation's own white space, and, with
 * SMFIP_HDR_LEADSPC, the value's leading white space as received
 * (none, one space, several, a tab).  So each fold ("\n" or "\r\n"
 * before white space) becomes CRLF and nothing else changes; a value
 * with any other CR or LF is refused (see header_rebuild()).  Body
 * chunks arrive with CRLF line ends and dots already un-stuffed; they
 * are kept as they are.
 *
 * Memory stays bounded: past memory_max octets everything moves to a
 * temporary file that is unlinked as soon as it is created, so it
 * vanishes with the process, whatever way the process ends.
 *
 * Known limits: headers the MTA adds after the milter saw the message
 * (Postfix's own Received:) are not in the capture; Postfix also adds
 * Message-Id/Date/From for local clients before the milter sees them,
 * and those are.  XXX: libmilter hands a header value over as a C
 * string, so a NUL inside a value sent over the raw milter protocol
 * cuts the value there: the copy has the part before the NUL, which
 * can forge nothing, but differs from what the MTA keeps.  Seeing it
 * would need the value's length, which libmilter does not give.
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
	gsize header_octets;    /* names and values in headers */
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

/*
 * An address the journal could not write on one line is refused here,
 * when the MTA can still tell its client (a 4xx for that RCPT alone),
 * rather than at end of message, where it would fail the whole copy.
 */
static gboolean
address_fits(const char *addr, const char *what, GError **error)
{
	gsize len = strlen(addr);

	if (len <= AM_ADDRESS_MAX)
		return TRUE;
	g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
	            "%s address of %zu octets is longer than %d, too long "
	            "for a header line of the archive copy",
	            what, len, AM_ADDRESS_MAX);
	return FALSE;
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
	if (!address_fits(addr, "MAIL FROM", error)) {
		g_free(addr);
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
	if (!address_fits(addr, "RCPT TO", error)) {
		g_free(addr);
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

/*
 * Line breaks inside a header value.  RFC 5322 section 2.2.3 allows a
 * line break in a header only as a fold: CRLF followed by white space.
 * Postfix hands a fold over as a bare LF, some MTAs as CRLF; both are
 * written as CRLF.  Any other CR or LF would end the header early in
 * the copy and start a line of the sender's choosing: a value
 * "x\nX-Envelope-To: <evil>" forges a header, "x\n\nbody" ends the
 * headers, and a lone CR becomes a line end in the SMTP encoder.
 *
 * Such a value is refused, not repaired.  An archive is worth what its
 * copies are faithful: any repair (a space after the break, the break
 * turned into a space) makes a copy that differs from what the MTA
 * delivered, in a way no reader of the archive can see, and which
 * bytes the MTA delivers for such a value differs from MTA to MTA, so
 * no repair can be right for all of them.  A refusal is visible: the
 * message is tempfailed with the reason, nothing is accepted without a
 * faithful copy, and mail through Postfix never meets it (Postfix
 * cleans header values before any milter sees them).
 */
typedef enum {
	BREAK_NONE, /* not a line break */
	BREAK_FOLD, /* a fold: its break length in *len */
	BREAK_BAD,  /* CR or LF that does not fold */
} BreakKind;

static BreakKind
line_break_at(const char *v, gsize *len)
{
	*len = 0;
	if (*v == '\r' && v[1] == '\n')
		*len = 2;
	else if (*v == '\n')
		*len = 1;
	else if (*v == '\r')
		return BREAK_BAD; /* a lone CR */
	else
		return BREAK_NONE;
	return v[*len] == ' ' || v[*len] == '\t' ? BREAK_FOLD : BREAK_BAD;
}

/*
 * RFC 5322 section 2.2: a field name is printable US-ASCII but ':'.
 * Anything else (control characters, white space, 8-bit) would not be
 * read back as the same header.
 */
static gboolean
header_name_valid(const char *name)
{
	const char *p;

	if (*name == '\0')
		return FALSE;
	for (p = name; *p != '\0'; p++)
		if ((guchar)*p < 33 || (guchar)*p > 126 || *p == ':')
			return FALSE;
	return TRUE;
}

/*
 * NAME ":" VALUE CRLF with each fold written as CRLF, or NULL with
 * @error (INPUT) when the value holds a CR or LF that is not a fold.
 */
static GString *
header_rebuild(const char *name, const char *value, gboolean leading_space,
               GError **error)
{
	g_autoptr(GString) out =
	    g_string_sized_new(strlen(name) + strlen(value) + 8);
	const char *v;
	gsize len;

	g_string_append(out, name);
	g_string_append_c(out, ':');

	/* Without LEADSPC the MTA dropped the one space after the colon. */
	if (!leading_space && *value != '\0')
		g_string_append_c(out, ' ');
	for (v = value; *v != '\0'; v++) {
		switch (line_break_at(v, &len)) {
		case BREAK_NONE:
			g_string_append_c(out, *v);
			break;
		case BREAK_FOLD:
			g_string_append(out, "\r\n");
			v += len - 1;
			break;
		case BREAK_BAD:
			g_set_error(error, AM_CAPTURE_ERROR,
			            AM_CAPTURE_ERROR_INPUT,
			            "header %.64s: line break not followed by "
			            "white space at octet %zu (a forged header "
			            "line?)",
			            name, (gsize)(v - value));
			return NULL;
		}
	}
	g_string_append(out, "\r\n");
	return g_steal_pointer(&out);
}

/* The headers kept in memory stay within the limits of capture.h. */
static gboolean
header_fits(const AmCapture *cap, const char *name, const char *value,
            GError **error)
{
	gsize octets = strlen(name) + strlen(value);

	if (cap->headers->len >= AM_CAPTURE_HEADERS_MAX) {
		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
		            "more than %d headers", AM_CAPTURE_HEADERS_MAX);
		return FALSE;
	}
	if (octets > AM_CAPTURE_HEADER_OCTETS_MAX - cap->header_octets) {
		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
		            "headers of more than %d octets in all",
		            AM_CAPTURE_HEADER_OCTETS_MAX);
		return FALSE;
	}
	return TRUE;
}

gboolean
am_capture_add_header(AmCapture *cap, const char *name, const char *value,
                      GError **error)
{
	g_autoptr(GString) line = NULL;
	AmHeader *h;

	if (name == NULL || value == NULL || !header_name_valid(name) ||
	    cap->headers_done) {
		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
		            "malformed header from the MTA");
		return FALSE;
	}
	if (!header_fits(cap, name, value, error))
		return FALSE;
	line = header_rebuild(name, value, cap->leading_space, error);
	if (line == NULL)
		return FALSE;
	if (!capture_write(cap, line->str, line->len, error))
		return FALSE;
	cap->header_octets += strlen(name) + strlen(value);
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
