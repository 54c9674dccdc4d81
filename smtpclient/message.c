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
	GBytes *bytes;     /* memory segment, or NULL */
	int fd;            /* file segment (dup()ed), or -1 */
	goffset offset;    /* first octet of the file range */
	guint64 len;       /* octets */
	gboolean to_eof;   /* appended with len -1: the range must still
	                    * end where the file does when it is read */
	guint64 file_size; /* when to_eof: the file's size then */
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

/* The path of @fd, as the kernel knows it, for error messages: a file
 * that changes under us must be named.  "file descriptor N" where
 * /proc is not mounted.  Looked up only when needed: it is a system
 * call, and the common case never fails.  (transfer full) */
static char *
fd_name(int fd)
{
	g_autofree char *link = g_strdup_printf("/proc/self/fd/%d", fd);
	char *name = g_file_read_link(link, NULL);

	return name != NULL ? name : g_strdup_printf("file descriptor %d", fd);
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
	/* A range "to the end" is remembered as such, even an empty one:
	 * a file that grows or shrinks before it is read must be caught
	 * (foreach_file_block), not sent cut at today's end. */
	if (len == -1) {
		seg.to_eof = TRUE;
		seg.file_size = st.st_size;
		len = st.st_size > offset ? st.st_size - offset : 0;
	}
	if (len == 0 && !seg.to_eof)
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

char *
smtp_message_describe_files(const SmtpMessage *msg)
{
	GString *names = g_string_new(NULL);

	for (guint i = 0; i < msg->segments->len; i++) {
		const Segment *seg = &g_array_index(msg->segments, Segment, i);
		g_autofree char *name = NULL;

		if (seg->fd < 0)
			continue;
		name = fd_name(seg->fd);
		if (names->len > 0)
			g_string_append(names, ", ");
		g_string_append(names, name);
	}
	return g_string_free(names, names->len == 0);
}

gboolean
smtp_message_in_memory(const SmtpMessage *msg)
{
	for (guint i = 0; i < msg->segments->len; i++) {
		if (g_array_index(msg->segments, Segment, i).fd >= 0)
			return FALSE;
	}
	return TRUE;
}

/* The error for a segment "to the end of the file" whose file no
 * longer ends where it did when appended. */
static void
set_end_moved_error(const Segment *seg, const char *how, GError **error)
{
	g_autofree char *name = fd_name(seg->fd);

	smtp_set_error(error, SMTP_ERROR_INPUT, "message", NULL,
	               "message file %s changed while being read: it %s "
	               "(it had %" G_GUINT64_FORMAT " octets)",
	               name, how, seg->file_size);
}

/* For a segment to the end of its file: whether the file has exactly
 * the size it had when appended.  Checked before each walk, so a file
 * that grew since is refused before MAIL (SIZE count, text check) or
 * at least before any of it is sent. */
static gboolean
check_size_kept(const Segment *seg, GError **error)
{
	struct stat st;

	if (fstat(seg->fd, &st) < 0) {
		int errnum = errno;
		g_autofree char *name = fd_name(seg->fd);

		smtp_set_error(error, SMTP_ERROR_INPUT, "message", NULL,
		               "cannot stat message file %s: %s", name,
		               g_strerror(errnum));
		return FALSE;
	}
	if ((guint64)st.st_size == seg->file_size)
		return TRUE;
	set_end_moved_error(
	    seg, (guint64)st.st_size > seg->file_size ? "grew" : "shrank",
	    error);
	return FALSE;
}

/* A read of @seg's file failed with @errnum: an INPUT error naming the
 * file.  Always FALSE. */
static gboolean
set_read_error(const Segment *seg, int errnum, GError **error)
{
	g_autofree char *name = fd_name(seg->fd);

	smtp_set_error(error, SMTP_ERROR_INPUT, "message", NULL,
	               "cannot read message file %s: %s", name,
	               g_strerror(errnum));
	return FALSE;
}

/* After the last block of a segment to the end of its file: the file
 * must end there.  The fstat() before the walk cannot see a write made
 * during it; one octet read past the end can, and then the message is
 * not whole: its end marker must not go out. */
static gboolean
check_at_eof(const Segment *seg, GError **error)
{
	guint8 octet;
	ssize_t n;

	do
		n = pread(seg->fd, &octet, 1, seg->offset + seg->len);
	while (n < 0 && errno == EINTR);
	if (n == 0)
		return TRUE;
	if (n < 0) {
		return set_read_error(seg, errno, error);
	}
	set_end_moved_error(seg, "grew", error);
	return FALSE;
}

/* Walk one file segment in blocks read with pread(). */
static gboolean
foreach_file_block(const Segment *seg, guint8 *buf, SmtpBlockFunc func,
                   gpointer user_data, GError **error)
{
	guint64 done = 0;

	if (seg->to_eof && !check_size_kept(seg, error))
		return FALSE;
	while (done < seg->len) {
		gsize want = MIN(seg->len - done, SMTP_MESSAGE_BLOCK);
		ssize_t n = pread(seg->fd, buf, want, seg->offset + done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			return set_read_error(seg, errno, error);
		}
		if (n == 0) {
			g_autofree char *name = fd_name(seg->fd);

			smtp_set_error(error, SMTP_ERROR_INPUT, "message", NULL,
			               "message file %s changed while being "
			               "read: it ends after %" G_GUINT64_FORMAT
			               " of %" G_GUINT64_FORMAT " octets",
			               name, seg->offset + done,
			               seg->offset + seg->len);
			return FALSE;
		}
		if (!func(buf, n, user_data, error))
			return FALSE;
		done += n;
	}
	return !seg->to_eof || check_at_eof(seg, error);
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

typedef struct {
	int fd;
	GChecksum *sum;
} WriteSum;

/* The block into the checksum, then to the file: the same octets. */
static gboolean
write_sum_block(const guint8 *data, gsize len, gpointer user_data,
                GError **error)
{
	WriteSum *ws = user_data;

	g_checksum_update(ws->sum, data, len);
	return write_block(data, len, &ws->fd, error);
}

gboolean
smtp_message_write_raw_sum(SmtpMessage *msg, int fd, GChecksum *sum,
                           GError **error)
{
	WriteSum ws = {fd, sum};

	g_return_val_if_fail(msg != NULL && sum != NULL, FALSE);
	return smtp_message_foreach_block(msg, write_sum_block, &ws, error);
}

/* ------------------------------------------------------------------ */
/* The encoder                                                          */
/* ------------------------------------------------------------------ */

void
smtp_encoder_init(SmtpEncoder *enc)
{
	/* The 354 reply leaves us at the start of a line. */
	enc->line_start = TRUE;
	enc->pending_cr = FALSE;
}

/* Copy @n octets to *@out (when writing) and count them. */
static inline gsize
put(guint8 **out, const void *src, gsize n)
{
	if (*out != NULL) {
		memcpy(*out, src, n);
		*out += n;
	}
	return n;
}

/*
 * The encoder proper, run either to write (@out: room for at most
 * 2 * @len + 2 octets) or only to count (@out NULL), so the size we
 * announce and the octets we send come from one piece of code.
 *
 * It works a line at a time: memchr() finds the next LF and, before
 * it, the next CR; the octets in between are copied in one piece.  The
 * LF found is kept until the scan passes it, and once there is no LF
 * left none is searched for again, so a message of lone CRs (or one
 * without any line end) is still read once, not once per line.
 */
static gsize
encode(SmtpEncoder *enc, const guint8 *data, gsize len, guint8 *out)
{
	const guint8 *p = data, *end = data + len, *lf;
	guint8 *o = out;
	gsize n = 0;

	if (len == 0)
		return 0;

	/* A CR that ended the last block is one line end, with or
	 * without the LF that may open this one. */
	if (enc->pending_cr) {
		enc->pending_cr = FALSE;
		enc->line_start = TRUE;
		n += put(&o, "\r\n", 2);
		if (*p == '\n')
			p++;
	}

	lf = p < end ? memchr(p, '\n', end - p) : NULL;
	while (p < end) {
		const guint8 *limit, *cr, *eol;

		/* RFC 5321 section 4.5.2: a leading dot is doubled. */
		if (enc->line_start && *p == '.')
			n += put(&o, ".", 1);

		/* The line's end: the first CR, or else the LF. */
		if (lf != NULL && lf < p)
			lf = memchr(p, '\n', end - p);
		limit = lf != NULL ? lf : end;
		cr = memchr(p, '\r', limit - p);
		eol = cr != NULL ? cr : lf;
		if (eol == NULL) {
			n += put(&o, p, end - p);
			enc->line_start = FALSE;
			break;
		}
		n += put(&o, p, eol - p);

		/* A CR as the block's last octet waits for the next. */
		if (*eol == '\r' && eol + 1 == end) {
			enc->pending_cr = TRUE;
			enc->line_start = FALSE;
			break;
		}

		/* CRLF, lone CR and lone LF: all one CRLF. */
		n += put(&o, "\r\n", 2);
		enc->line_start = TRUE;
		p = eol + 1;
		if (*eol == '\r' && *p == '\n')
			p++;
	}
	return n;
}

void
smtp_encoder_feed(SmtpEncoder *enc, const guint8 *data, gsize len,
                  GByteArray *out)
{
	guint old = out->len;
	gsize n;

	/* Worst case: each octet doubled (a lone LF, a leading dot), plus
	 * the CRLF of a CR left from the block before. */
	g_byte_array_set_size(out, old + 2 * len + 2);
	n = encode(enc, data, len, out->data + old);
	g_byte_array_set_size(out, old + n);
}

gsize
smtp_encoder_count(SmtpEncoder *enc, const guint8 *data, gsize len)
{
	return encode(enc, data, len, NULL);
}

guint
smtp_encoder_finish_count(const SmtpEncoder *enc)
{
	return enc->pending_cr || !enc->line_start ? 2 : 0;
}

void
smtp_encoder_finish(SmtpEncoder *enc, GByteArray *out)
{
	if (smtp_encoder_finish_count(enc) > 0)
		g_byte_array_append(out, (const guint8 *)"\r\n", 2);
	g_byte_array_append(out, (const guint8 *)".\r\n", 3);
	smtp_encoder_init(enc);
}

static gboolean
count_block(const guint8 *data, gsize len, gpointer user_data, GError **error)
{
	SmtpWireCount *wc = user_data;

	(void)error;
	wc->octets += smtp_encoder_count(&wc->enc, data, len);
	return TRUE;
}

gboolean
smtp_message_get_wire_size(const SmtpMessage *msg, guint64 *size,
                           GError **error)
{
	SmtpWireCount wc = {0};

	smtp_encoder_init(&wc.enc);
	if (!smtp_message_foreach_block(msg, count_block, &wc, error))
		return FALSE;
	*size = wc.octets + smtp_encoder_finish_count(&wc.enc);
	return TRUE;
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
