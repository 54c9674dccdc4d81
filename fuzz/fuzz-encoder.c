/*
 * fuzz-encoder.c - libFuzzer target for the DATA encoder (message.c)
 *
 * The encoder is what stands between a message and SMTP smuggling, so
 * its output is checked, not only survived.  The first input byte says
 * how the rest is cut into 1 to 3 segments and whether the middle one
 * is a file (a memfd, read with pread() like a spool file); the next
 * two give the cut points.  The message is walked with
 * smtp_message_foreach_block() into one SmtpEncoder, as sendmail.c
 * does, and the wire bytes must satisfy, or abort():
 *
 * 1. no lone CR and no lone LF;
 * 2. every line opening with "." has it doubled, so no line of the
 *    body reads as the end marker;
 * 3. the data ends with CRLF "." CRLF (an empty message: "." CRLF
 *    alone, right after the 354 line);
 * 4. removing the doubled dots gives back the input with every CRLF,
 *    lone CR and lone LF made CRLF, and a CRLF added after an open last
 *    line;
 * 5. the same input fed to a fresh encoder in one piece gives the same
 *    bytes: the encoder's state must carry across every cut;
 * 6. smtp_message_get_wire_size() (what SIZE= announces) is exactly the
 *    octets before the final ".CRLF".
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "smtp-private.h"

typedef struct {
	SmtpEncoder enc;
	GByteArray *out;
} Sink;

static gboolean
encode_block(const guint8 *data, gsize len, gpointer user_data, GError **error)
{
	Sink *sink = user_data;

	(void)error;
	smtp_encoder_feed(&sink->enc, data, len, sink->out);
	return TRUE;
}

/* Append @len bytes at @data to @msg as a memfd segment. */
static void
append_file(SmtpMessage *msg, const guint8 *data, gsize len)
{
	g_autoptr(GError) error = NULL;
	gsize done = 0;
	int fd = memfd_create("fuzz-encoder", MFD_CLOEXEC);

	if (fd < 0)
		abort();
	while (done < len) {
		ssize_t n = write(fd, data + done, len - done);

		if (n <= 0)
			abort();
		done += n;
	}
	if (!smtp_message_append_fd(msg, fd, 0, -1, &error))
		abort();
	close(fd);
}

/* The input as the wire must carry it, before dot-stuffing. */
static GByteArray *
normalise(const guint8 *data, gsize len)
{
	GByteArray *out = g_byte_array_sized_new(len + len / 2 + 2);

	for (gsize i = 0; i < len; i++) {
		if (data[i] == '\r' || data[i] == '\n') {
			if (data[i] == '\r' && i + 1 < len &&
			    data[i + 1] == '\n')
				i++;
			g_byte_array_append(out, (const guint8 *)"\r\n", 2);
			continue;
		}
		g_byte_array_append(out, data + i, 1);
	}
	if (out->len > 0 && out->data[out->len - 1] != '\n')
		g_byte_array_append(out, (const guint8 *)"\r\n", 2);
	return out;
}

/*
 * Check invariants 1 to 3 on @wire and return the un-stuffed body
 * (the wire without the end marker and with one "." removed from each
 * line opening with one).
 */
static GByteArray *
check_and_unstuff(const GByteArray *wire)
{
	const guint8 *w = wire->data;
	gsize len = wire->len, body_len;
	GByteArray *body = g_byte_array_sized_new(len);
	gboolean line_start = TRUE;

	/* Invariant 3: the end marker, on a line of its own. */
	if (len == 3) {
		if (memcmp(w, ".\r\n", 3) != 0)
			abort();
		return body;
	}
	if (len < 5 || memcmp(w + len - 5, "\r\n.\r\n", 5) != 0)
		abort();
	body_len = len - 3;

	for (gsize i = 0; i < body_len; i++) {
		/* Invariant 1: CR and LF only as a pair. */
		if (w[i] == '\r' && (i + 1 >= len || w[i + 1] != '\n'))
			abort();
		if (w[i] == '\n' && (i == 0 || w[i - 1] != '\r'))
			abort();

		/* Invariant 2: a leading dot is always doubled. */
		if (line_start && w[i] == '.') {
			if (i + 1 >= body_len || w[i + 1] != '.')
				abort();
			i++;
		}
		g_byte_array_append(body, w + i, 1);
		line_start = w[i] == '\n';
	}
	return body;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	Sink sink, whole;
	GByteArray *expect, *body;
	gsize cut1, cut2;
	guint n_segments;
	gboolean middle_file;

	if (size < 3)
		return 0;

	/* Step 1: the layout from the first three bytes. */
	n_segments = 1 + data[0] % 3;
	middle_file = (data[0] & 0x80) != 0;
	cut1 = size > 3 ? data[1] % (size - 3 + 1) : 0;
	cut2 = size > 3 ? data[2] % (size - 3 + 1) : 0;
	if (cut1 > cut2) {
		gsize t = cut1;

		cut1 = cut2;
		cut2 = t;
	}
	data += 3;
	size -= 3;
	if (n_segments == 1)
		cut1 = cut2 = size;
	else if (n_segments == 2)
		cut2 = size;

	/* Step 2: the message, as sendmail() would walk it. */
	smtp_message_append_data(msg, data, cut1);
	if (middle_file && cut2 > cut1)
		append_file(msg, data + cut1, cut2 - cut1);
	else
		smtp_message_append_data(msg, data + cut1, cut2 - cut1);
	smtp_message_append_data(msg, data + cut2, size - cut2);
	if (smtp_message_get_size(msg) != size)
		abort();

	sink.out = g_byte_array_new();
	smtp_encoder_init(&sink.enc);
	if (!smtp_message_foreach_block(msg, encode_block, &sink, &error))
		abort();
	smtp_encoder_finish(&sink.enc, sink.out);

	/* Step 3: invariants 1 to 4. */
	body = check_and_unstuff(sink.out);
	expect = normalise(data, size);
	if (body->len != expect->len ||
	    memcmp(body->data, expect->data, body->len) != 0)
		abort();

	/* Step 4: invariant 6, the counted size. */
	{
		guint64 wire_size = 0;

		if (!smtp_message_get_wire_size(msg, &wire_size, &error) ||
		    wire_size != sink.out->len - 3)
			abort();
	}

	/* Step 5: invariant 5, the cuts change nothing. */
	whole.out = g_byte_array_new();
	smtp_encoder_init(&whole.enc);
	smtp_encoder_feed(&whole.enc, data, size, whole.out);
	smtp_encoder_finish(&whole.enc, whole.out);
	if (whole.out->len != sink.out->len ||
	    memcmp(whole.out->data, sink.out->data, sink.out->len) != 0)
		abort();

	g_byte_array_unref(whole.out);
	g_byte_array_unref(sink.out);
	g_byte_array_unref(body);
	g_byte_array_unref(expect);
	return 0;
}
