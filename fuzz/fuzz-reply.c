/*
 * fuzz-reply.c - libFuzzer target for the SMTP reply parser (reply.c)
 *
 * The parser reads whatever a server sends, so it must survive any
 * bytes, cut anywhere: no crash, no leak, no hang.  The first two input
 * bytes seed the cut points; the rest is the server's byte stream.  It
 * is parsed twice, once in a single feed and once in chunks of 1 to 64
 * octets, and both runs must give the same replies and stop on the same
 * error: a reply must not depend on how TCP happened to split it.
 *
 * After the first PROTOCOL error parsing stops, as the client closes
 * the connection then.  Every reply taken must be well formed: a code
 * in 200-559, an enhanced code of the same class, text valid UTF-8.
 * abort() marks a broken invariant of ours; bad input never does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtp-private.h"

/* Everything one parse produced, for comparing the two runs. */
typedef struct {
	GString *replies; /* each reply as "CODE|ENH|TEXT\0" */
	gboolean failed;  /* stopped on a PROTOCOL error */
} Transcript;

/* A small xorshift generator: cut points from the input's seed. */
static guint32
next_cut(guint32 *state)
{
	guint32 x = *state;

	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	*state = x;
	return 1 + x % 64;
}

/* Check a reply the parser gave out, and record it. */
static void
record_reply(Transcript *t, const SmtpReply *reply)
{
	if (reply->code < 200 || reply->code > 559 || reply->text == NULL)
		abort();
	if (!g_utf8_validate(reply->text, -1, NULL))
		abort();
	if (reply->enhanced != NULL &&
	    reply->enhanced[0] != '0' + reply->code / 100)
		abort();
	g_string_append_printf(t->replies, "%d|%s|%s", reply->code,
	                       reply->enhanced ? reply->enhanced : "",
	                       reply->text);
	g_string_append_c(t->replies, '\0');
}

/*
 * Feed one chunk until it is used up.  Returns FALSE once the parser
 * failed.  A MORE that leaves bytes unused would make the caller spin.
 */
static gboolean
feed_chunk(SmtpReplyParser *parser, Transcript *t, const char *data, gsize len)
{
	while (len > 0) {
		g_autoptr(GError) error = NULL;
		SmtpReply reply = {0};
		gsize used = 0;
		SmtpParseStatus st;

		st = smtp_reply_parser_feed(parser, data, len, &used, &error);
		if (used > len)
			abort();
		if (st == SMTP_PARSE_ERROR) {
			if (error == NULL || error->domain != SMTP_ERROR ||
			    error->code != SMTP_ERROR_PROTOCOL)
				abort();
			t->failed = TRUE;
			return FALSE;
		}
		if (error != NULL)
			abort();
		if (st == SMTP_PARSE_MORE) {
			if (used != len)
				abort();
			return TRUE;
		}
		smtp_reply_parser_take(parser, &reply);
		record_reply(t, &reply);
		smtp_reply_clear(&reply);
		data += used;
		len -= used;
	}
	return TRUE;
}

/* Parse @data cut by @seed (0: in one piece). */
static void
parse(const char *data, gsize len, guint32 seed, Transcript *t)
{
	g_autoptr(SmtpReplyParser) parser = smtp_reply_parser_new();
	gsize done = 0;

	while (done < len) {
		gsize n = seed != 0 ? next_cut(&seed) : len;

		/* (MIN() would call next_cut() twice.) */
		n = MIN(n, len - done);

		if (!feed_chunk(parser, t, data + done, n))
			return;
		done += n;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	Transcript whole = {g_string_new(NULL), FALSE};
	Transcript cut = {g_string_new(NULL), FALSE};
	guint32 seed;

	if (size < 2)
		return 0;

	/* Step 1: a non-zero seed, so the generator never sticks. */
	seed = ((guint32)data[0] << 8 | data[1]) + 1;
	data += 2;
	size -= 2;

	/* Step 2: the same bytes in one piece and in chunks. */
	parse((const char *)data, size, 0, &whole);
	parse((const char *)data, size, seed, &cut);

	/* Step 3: the cuts must not change what was understood. */
	if (whole.failed != cut.failed ||
	    whole.replies->len != cut.replies->len ||
	    memcmp(whole.replies->str, cut.replies->str, whole.replies->len) !=
	        0)
		abort();

	g_string_free(whole.replies, TRUE);
	g_string_free(cut.replies, TRUE);
	return 0;
}
