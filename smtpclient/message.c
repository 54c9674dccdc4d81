/*
 * message.c - SmtpMessage, its segments, and the DATA encoder
 *
 * A message is a list of segments (bytes in memory, or a range of a
 * file descriptor read with pread()), walked in blocks of at most
 * SMTP_MESSAGE_BLOCK octets, so memory stays flat whatever the size of
 * the file parts, and the message can be sent again (retry, several
 * relays) because nothing moves a file offset.
 *
 * The encoder writes what RFC 5321 section 4.1.1.4 and 4.5.2 ask for,
 * and more: every lone CR and lone LF becomes CRLF, in both message
 * kinds.  A bare LF or CR that one server reads as a line end and the
 * next one does not is how SMTP smuggling hides a second message
 * inside the first; a relay of ours must never pass one on.  Its state
 * (a CR seen at the end of one block, a line start) crosses block and
 * segment boundaries.  An empty message is sent as the end marker
 * alone, right after the 354 line.
 *
 * XXX: lines over 1000 octets (RFC 5321 section 4.5.3.1.6) are sent
 * as they are; cutting them would change the message, and the servers
 * we relay to accept them.  Issue 3 may add a policy.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "smtp-private.h"

typedef struct {
	GBytes *bytes;  /* memory segment, or NULL */
	int fd;         /* file segment (dup()ed), or -1 */
	goffset offset; /* first octet of the file range */
	guint64 len;    /* octets */
} Segment;

struct SmtpMessage {
	SmtpMessageKind kind;
	GArray *segments; /* Segment */
	guint64 size;     /* octets in all segments */
};

static void
segment_clear(gpointer data)
{
	Segment *seg = data;

	g_clear_pointer(&seg->bytes, g_bytes_unref);
	if (seg->fd >= 0)
		close(seg->fd);
	seg->fd = -1;
}

SmtpMessage *
smtp_message_new(SmtpMessageKind kind)
{
	SmtpMessage *msg = g_new0(SmtpMessage, 1);

	msg->kind = kind;
	msg->segments = g_array_new(FALSE, TRUE, sizeof(Segment));
	g_array_set_clear_func(msg->segments, segment_clear);
	return msg;
}

void
smtp_message_free(SmtpMessage *msg)
{
	if (msg == NULL)
		return;
	g_array_unref(msg->segments);
	g_free(msg);
}

SmtpMessageKind
smtp_message_get_kind(const SmtpMessage *msg)
{
	return msg->kind;
}

void
smtp_message_append_bytes(SmtpMessage *msg, GBytes *bytes)
{
	Segment seg = {.fd = -1};

	g_return_if_fail(msg != NULL && bytes != NULL);
	seg.len = g_bytes_get_size(bytes);
	if (seg.len == 0)
		return;
	seg.bytes = g_bytes_ref(bytes);
	g_array_append_val(msg->segments, seg);
	msg->size += seg.len;
}

void
smtp_message_append_data(SmtpMessage *msg, const void *data, gsize len)
{
	g_autoptr(GBytes) bytes = NULL;

	g_return_if_fail(msg != NULL && (data != NULL || len == 0));
	bytes = g_bytes_new(data, len);
	smtp_message_append_bytes(msg, bytes);
}

gboolean
smtp_message_append_fd(SmtpMessage *msg, int fd, goffset offset, gint64 len,
                       GError **error)
{
	Segment seg = {.fd = -1, .offset = offset};
	struct stat st;

	g_return_val_if_fail(msg != NULL, FALSE);
	if (offset < 0 || len < -1) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "bad file range");
		return FALSE;
	}
	if (fstat(fd, &st) < 0) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "cannot stat message file: %s",
		               g_strerror(errno));
		return FALSE;
	}
	if (len == -1)
		len = st.st_size > offset ? st.st_size - offset : 0;
	if (len == 0)
		return TRUE;
	seg.fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (seg.fd < 0) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "cannot dup message file: %s",
		               g_strerror(errno));
		return FALSE;
	}
	seg.len = len;
	g_array_append_val(msg->segments, seg);
	msg->size += seg.len;
	return TRUE;
}

guint64
smtp_message_get_size(const SmtpMessage *msg)
{
	return msg->size;
}

/* Walk one file segment in blocks read with pread(). */
static gboolean
foreach_file_block(const Segment *seg, guint8 *buf, SmtpBlockFunc func,
                   gpointer user_data, GError **error)
{
	guint64 done = 0;

	while (done < seg->len) {
		gsize want = MIN(seg->len - done, SMTP_MESSAGE_BLOCK);
		ssize_t n = pread(seg->fd, buf, want, seg->offset + done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			smtp_set_error(error, SMTP_ERROR_INPUT, "message", NULL,
			               "cannot read message file: %s",
			               g_strerror(errno));
			return FALSE;
		}
		if (n == 0) {
			smtp_set_error(error, SMTP_ERROR_INPUT, "message", NULL,
			               "message file changed while being read: "
			               "it ends after %" G_GUINT64_FORMAT
			               " of %" G_GUINT64_FORMAT " octets",
			               done, seg->len);
			return FALSE;
		}
		if (!func(buf, n, user_data, error))
			return FALSE;
		done += n;
	}
	return TRUE;
}

gboolean
smtp_message_foreach_block(const SmtpMessage *msg, SmtpBlockFunc func,
                           gpointer user_data, GError **error)
{
	g_autofree guint8 *buf = NULL;

	for (guint i = 0; i < msg->segments->len; i++) {
		const Segment *seg = &g_array_index(msg->segments, Segment, i);
		const guint8 *p;

		if (seg->fd >= 0) {
			if (buf == NULL)
				buf = g_malloc(SMTP_MESSAGE_BLOCK);
			if (!foreach_file_block(seg, buf, func, user_data,
			                        error))
				return FALSE;
			continue;
		}
		p = g_bytes_get_data(seg->bytes, NULL);
		for (guint64 done = 0; done < seg->len;) {
			gsize n = MIN(seg->len - done, SMTP_MESSAGE_BLOCK);

			if (!func(p + done, n, user_data, error))
				return FALSE;
			done += n;
		}
	}
	return TRUE;
}

/* Write one block to the fd in @user_data, whatever write() takes at
 * a time. */
static gboolean
write_block(const guint8 *data, gsize len, gpointer user_data, GError **error)
{
	int fd = *(const int *)user_data;

	while (len > 0) {
		ssize_t n = write(fd, data, len);
		int errnum = errno;

		if (n < 0 && errnum == EINTR)
			continue;
		if (n <= 0) {
			/* write() returning 0 for a non-empty buffer: the
			 * device takes no more, which is what ENOSPC says. */
			if (n == 0)
				errnum = ENOSPC;
			smtp_set_error(error, SMTP_ERROR_IO, "write", NULL,
			               "cannot write message: %s",
			               g_strerror(errnum));
			if (error != NULL)
				smtp_error_set_errno(*error, errnum);
			return FALSE;
		}
		data += n;
		len -= n;
	}
	return TRUE;
}

gboolean
smtp_message_write_raw(SmtpMessage *msg, int fd, GError **error)
{
	g_return_val_if_fail(msg != NULL, FALSE);
	return smtp_message_foreach_block(msg, write_block, &fd, error);
}

/* ------------------------------------------------------------------ */
/* The encoder                                                          */
/* ------------------------------------------------------------------ */

static const guint8 crlf[2] = {'\r', '\n'};

void
smtp_encoder_init(SmtpEncoder *enc)
{
	/* The 354 reply leaves us at the start of a line. */
	enc->line_start = TRUE;
	enc->pending_cr = FALSE;
}

void
smtp_encoder_feed(SmtpEncoder *enc, const guint8 *data, gsize len,
                  GByteArray *out)
{
	gsize run = 0; /* start of bytes copied as they are */

	for (gsize i = 0; i < len; i++) {
		guint8 c = data[i];

		/* A CR from before decides now: with this LF it was a
		 * CRLF, otherwise a lone CR; either way one line end. */
		if (enc->pending_cr) {
			enc->pending_cr = FALSE;
			g_byte_array_append(out, crlf, 2);
			enc->line_start = TRUE;
			run = i;
			if (c == '\n') {
				run = i + 1;
				continue;
			}
		}
		if (c == '\r' || c == '\n') {
			g_byte_array_append(out, data + run, i - run);
			run = i + 1;
			if (c == '\r') {
				enc->pending_cr = TRUE;
			} else {
				g_byte_array_append(out, crlf, 2);
				enc->line_start = TRUE;
			}
			continue;
		}
		if (enc->line_start && c == '.') {
			/* RFC 5321 section 4.5.2: double it. */
			g_byte_array_append(out, data + run, i - run);
			g_byte_array_append(out, (const guint8 *)".", 1);
			run = i;
		}
		enc->line_start = FALSE;
	}
	/* A CR at the very end set run past itself: it waits in
	 * pending_cr for the next block or for finish. */
	g_byte_array_append(out, data + run, len - run);
}

void
smtp_encoder_finish(SmtpEncoder *enc, GByteArray *out)
{
	if (enc->pending_cr || !enc->line_start)
		g_byte_array_append(out, crlf, 2);
	g_byte_array_append(out, (const guint8 *)".\r\n", 3);
	smtp_encoder_init(enc);
}

/* ------------------------------------------------------------------ */
/* Charset check of TEXT messages                                       */
/* ------------------------------------------------------------------ */

void
smtp_utf8_check_init(SmtpUtf8Check *check)
{
	memset(check, 0, sizeof(*check));
	check->ascii_only = TRUE;
}

/* Lead byte @c: how many continuation bytes follow and the range of
 * the first (RFC 3629 section 4 excludes overlongs and surrogates). */
static gboolean
utf8_lead(SmtpUtf8Check *check, guint8 c)
{
	check->lo = 0x80;
	check->hi = 0xbf;
	if (c >= 0xc2 && c <= 0xdf) {
		check->need = 1;
	} else if (c >= 0xe0 && c <= 0xef) {
		check->need = 2;
		if (c == 0xe0)
			check->lo = 0xa0;
		else if (c == 0xed)
			check->hi = 0x9f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		check->need = 3;
		if (c == 0xf0)
			check->lo = 0x90;
		else if (c == 0xf4)
			check->hi = 0x8f;
	} else {
		return FALSE;
	}
	return TRUE;
}

void
smtp_utf8_check_feed(SmtpUtf8Check *check, const guint8 *data, gsize len)
{
	for (gsize i = 0; i < len && !check->bad; i++) {
		guint8 c = data[i];

		if (check->need > 0) {
			if (c < check->lo || c > check->hi) {
				check->bad = TRUE;
				break;
			}
			check->need--;
			check->lo = 0x80;
			check->hi = 0xbf;
			continue;
		}
		if (c < 0x80)
			continue;
		check->ascii_only = FALSE;
		if (!utf8_lead(check, c))
			check->bad = TRUE;
	}
}

gboolean
smtp_utf8_check_finish(SmtpUtf8Check *check)
{
	return !check->bad && check->need == 0;
}

static gboolean
check_block(const guint8 *data, gsize len, gpointer user_data, GError **error)
{
	(void)error;
	smtp_utf8_check_feed(user_data, data, len);
	return TRUE;
}

gboolean
smtp_message_check_text(const SmtpMessage *msg, gboolean utf8_ok,
                        GError **error)
{
	SmtpUtf8Check check;

	if (msg->kind != SMTP_MESSAGE_TEXT)
		return TRUE;
	smtp_utf8_check_init(&check);
	if (!smtp_message_foreach_block(msg, check_block, &check, error)) {
		if (error != NULL)
			smtp_error_set_stage(*error, "input");
		return FALSE;
	}
	if (utf8_ok && smtp_utf8_check_finish(&check))
		return TRUE;
	if (!utf8_ok && check.ascii_only)
		return TRUE;
	smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
	               utf8_ok ? "text message is not valid UTF-8"
	                       : "text message is not ASCII (UTF-8 text "
	                         "needs SMTPUTF8 or BODY=8BITMIME)");
	return FALSE;
}
