/*
 * test-reply.c - the SMTP reply parser, case by case
 *
 * Every table case is fed whole, one byte at a time and in chunks of 7
 * bytes: a reply split across reads must parse exactly as one that
 * came in one piece.
 */
#include <string.h>

#include "smtp-private.h"

typedef struct {
	const char *name;
	const char *input;      /* one reply, maybe followed by more */
	SmtpParseStatus status; /* after feeding all of input */
	int code;
	const char *enhanced; /* NULL: none */
	const char *text;
} ReplyCase;

static const ReplyCase reply_cases[] = {
    {"single", "250 OK\r\n", SMTP_PARSE_DONE, 250, NULL, "OK"},
    {"multiline", "250-mx.example\r\n250-SIZE 100\r\n250 8BITMIME\r\n",
     SMTP_PARSE_DONE, 250, NULL, "mx.example\nSIZE 100\n8BITMIME"},
    {"code-only", "250\r\n", SMTP_PARSE_DONE, 250, NULL, ""},
    {"code-space", "354 \r\n", SMTP_PARSE_DONE, 354, NULL, ""},
    {"multiline-code-only", "250-\r\n250\r\n", SMTP_PARSE_DONE, 250, NULL,
     "\n"},
    {"bare-lf", "250-a\n250 b\n", SMTP_PARSE_DONE, 250, NULL, "a\nb"},
    {"mixed-eol", "250-a\r\n250 b\n", SMTP_PARSE_DONE, 250, NULL, "a\nb"},
    {"enhanced", "550 5.1.1 No such user\r\n", SMTP_PARSE_DONE, 550, "5.1.1",
     "No such user"},
    {"enhanced-long-parts", "451 4.123.456 later\r\n", SMTP_PARSE_DONE, 451,
     "4.123.456", "later"},
    {"enhanced-only", "250 2.0.0\r\n", SMTP_PARSE_DONE, 250, "2.0.0", ""},
    {"enhanced-wrong-class", "250 5.1.1 fine really\r\n", SMTP_PARSE_DONE, 250,
     NULL, "5.1.1 fine really"},
    {"enhanced-malformed", "250 2.0.0x\r\n", SMTP_PARSE_DONE, 250, NULL,
     "2.0.0x"},
    {"enhanced-too-many-digits", "450 4.1234.1 x\r\n", SMTP_PARSE_DONE, 450,
     NULL, "4.1234.1 x"},
    {"enhanced-multiline", "550-5.7.1 first\r\n550 5.7.1 second\r\n",
     SMTP_PARSE_DONE, 550, "5.7.1", "first\nsecond"},
    {"enhanced-later-line-differs", "550-5.7.1 a\r\n550 5.7.2 b\r\n",
     SMTP_PARSE_DONE, 550, "5.7.1", "a\n5.7.2 b"},
    {"text-keeps-spaces", "220  two  spaces \r\n", SMTP_PARSE_DONE, 220, NULL,
     " two  spaces "},
    {"invalid-utf8-replaced",
     "250 a\xff"
     "b\r\n",
     SMTP_PARSE_DONE, 250, NULL,
     "a\xef\xbf\xbd"
     "b"},
    {"first-of-two", "250 one\r\n250 two\r\n", SMTP_PARSE_DONE, 250, NULL,
     "one"},
    {"incomplete-line", "250 OK", SMTP_PARSE_MORE, 0, NULL, NULL},
    {"incomplete-reply", "250-a\r\n250-b\r\n", SMTP_PARSE_MORE, 0, NULL, NULL},
    {"garbage", "hello world\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"empty-line", "\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"short-code", "25\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"letter-in-code", "2x0 OK\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"bad-separator", "250x\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"tab-separator", "250\tOK\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"code-1xx", "150 OK\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"code-6xx", "600 OK\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"code-x6x", "260 OK\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    {"code-changes", "250-a\r\n251 b\r\n", SMTP_PARSE_ERROR, 0, NULL, NULL},
    /* A server shutting down cuts a reply short with 421: that reply
     * replaces the one it cut, enhanced code and all. */
    {"421-cuts-multiline", "250-mx.example\r\n250-SIZE 1\r\n421 4.3.2 bye\r\n",
     SMTP_PARSE_DONE, 421, "4.3.2", "bye"},
    {"421-multiline-cuts-multiline",
     "550-5.1.1 a\r\n421-4.4.2 shutting\r\n421 4.4.2 down\r\n", SMTP_PARSE_DONE,
     421, "4.4.2", "shutting\ndown"},
    {"421-then-other-code", "250-a\r\n421-b\r\n250 c\r\n", SMTP_PARSE_ERROR, 0,
     NULL, NULL},
    {"garbage-continuation", "250-a\r\nxyz\r\n", SMTP_PARSE_ERROR, 0, NULL,
     NULL},
};

/* Feed @input in chunks of @chunk bytes (0: whole), parse one reply. */
static SmtpParseStatus
parse_chunked(const char *input, gsize len, gsize chunk, SmtpReply *reply,
              gsize *used_total, GError **error)
{
	g_autoptr(SmtpReplyParser) p = smtp_reply_parser_new();
	SmtpParseStatus st = SMTP_PARSE_MORE;
	gsize off = 0;

	while (off < len && st == SMTP_PARSE_MORE) {
		gsize n = chunk ? MIN(chunk, len - off) : len - off;
		gsize used = 0;

		st = smtp_reply_parser_feed(p, input + off, n, &used, error);
		g_assert_cmpuint(used, <=, n);
		if (st == SMTP_PARSE_MORE)
			g_assert_cmpuint(used, ==, n);
		off += used;
	}
	if (st == SMTP_PARSE_DONE)
		smtp_reply_parser_take(p, reply);
	*used_total = off;
	return st;
}

static void
test_reply_case(gconstpointer data)
{
	const ReplyCase *c = data;
	static const gsize chunks[] = {0, 1, 2, 7};

	for (guint i = 0; i < G_N_ELEMENTS(chunks); i++) {
		g_autoptr(GError) error = NULL;
		SmtpReply reply = {0};
		gsize used = 0;
		SmtpParseStatus st;

		st = parse_chunked(c->input, strlen(c->input), chunks[i],
		                   &reply, &used, &error);
		g_assert_cmpint(st, ==, c->status);
		if (st == SMTP_PARSE_ERROR) {
			g_assert_error(error, SMTP_ERROR, SMTP_ERROR_PROTOCOL);
			continue;
		}
		g_assert_no_error(error);
		if (st == SMTP_PARSE_MORE)
			continue;
		g_assert_cmpint(reply.code, ==, c->code);
		g_assert_cmpstr(reply.enhanced, ==, c->enhanced);
		g_assert_cmpstr(reply.text, ==, c->text);
		smtp_reply_clear(&reply);
		g_assert_null(reply.text);
	}
}

/* Two replies in one buffer: the second is left for the next call. */
static void
test_reply_pipelined(void)
{
	g_autoptr(SmtpReplyParser) p = smtp_reply_parser_new();
	const char *in = "250 one\r\n354 go\r\n";
	SmtpReply reply = {0};
	gsize used = 0, used2 = 0;

	g_assert_cmpint(smtp_reply_parser_feed(p, in, strlen(in), &used, NULL),
	                ==, SMTP_PARSE_DONE);
	g_assert_cmpuint(used, ==, 9);
	smtp_reply_parser_take(p, &reply);
	g_assert_cmpint(reply.code, ==, 250);
	smtp_reply_clear(&reply);
	g_assert_cmpint(smtp_reply_parser_feed(p, in + used, strlen(in) - used,
	                                       &used2, NULL),
	                ==, SMTP_PARSE_DONE);
	smtp_reply_parser_take(p, &reply);
	g_assert_cmpint(reply.code, ==, 354);
	g_assert_cmpstr(reply.text, ==, "go");
	smtp_reply_clear(&reply);
}

static void
test_reply_nul(void)
{
	static const char in[] = "250 a\0b\r\n";
	g_autoptr(SmtpReplyParser) p = smtp_reply_parser_new();
	g_autoptr(GError) error = NULL;
	gsize used;

	g_assert_cmpint(
	    smtp_reply_parser_feed(p, in, sizeof(in) - 1, &used, &error), ==,
	    SMTP_PARSE_ERROR);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_PROTOCOL);
}

/* "250 " then @n octets of text: a line of 4 + @n octets. */
static GString *
line_of(gsize n, const char *eol)
{
	GString *s = g_string_new("250 ");

	for (gsize i = 0; i < n; i++)
		g_string_append_c(s, 'x');
	g_string_append(s, eol);
	return s;
}

static void
test_reply_long_line(void)
{
	static const char *const eols[] = {"\r\n", "\n"};

	for (guint e = 0; e < G_N_ELEMENTS(eols); e++) {
		g_autoptr(GString) ok =
		    line_of(SMTP_REPLY_MAX_LINE - 4, eols[e]);
		g_autoptr(GString) bad =
		    line_of(SMTP_REPLY_MAX_LINE - 3, eols[e]);
		g_autoptr(GError) error = NULL;
		SmtpReply reply = {0};
		gsize used;

		g_assert_cmpint(
		    parse_chunked(ok->str, ok->len, 0, &reply, &used, NULL), ==,
		    SMTP_PARSE_DONE);
		g_assert_cmpuint(strlen(reply.text), ==,
		                 SMTP_REPLY_MAX_LINE - 4);
		smtp_reply_clear(&reply);
		g_assert_cmpint(parse_chunked(bad->str, bad->len, 1000, &reply,
		                              &used, &error),
		                ==, SMTP_PARSE_ERROR);
		g_assert_error(error, SMTP_ERROR, SMTP_ERROR_PROTOCOL);
	}
}

/* A line that never ends must fail at the limit, not grow forever. */
static void
test_reply_endless_line(void)
{
	g_autoptr(SmtpReplyParser) p = smtp_reply_parser_new();
	g_autoptr(GError) error = NULL;
	char block[1000];
	SmtpParseStatus st = SMTP_PARSE_MORE;
	guint rounds = 0;
	gsize used;

	memset(block, 'x', sizeof(block));
	memcpy(block, "250 ", 4);
	while (st == SMTP_PARSE_MORE && rounds++ < 100)
		st = smtp_reply_parser_feed(p, block, sizeof(block), &used,
		                            &error);
	g_assert_cmpint(st, ==, SMTP_PARSE_ERROR);
	g_assert_cmpuint(rounds, <=, 6);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_PROTOCOL);
}

static void
test_reply_many_lines(void)
{
	for (guint n = SMTP_REPLY_MAX_LINES; n <= SMTP_REPLY_MAX_LINES + 1;
	     n++) {
		g_autoptr(GString) in = g_string_new(NULL);
		g_autoptr(GError) error = NULL;
		SmtpReply reply = {0};
		gsize used;
		SmtpParseStatus st;

		for (guint i = 1; i < n; i++)
			g_string_append(in, "250-line\r\n");
		g_string_append(in, "250 last\r\n");
		st = parse_chunked(in->str, in->len, 0, &reply, &used, &error);
		if (n <= SMTP_REPLY_MAX_LINES) {
			g_assert_cmpint(st, ==, SMTP_PARSE_DONE);
			smtp_reply_clear(&reply);
		} else {
			g_assert_cmpint(st, ==, SMTP_PARSE_ERROR);
			g_assert_error(error, SMTP_ERROR, SMTP_ERROR_PROTOCOL);
		}
	}
}

/* Random bytes: any status is fine, a crash or a leak is not. */
static void
test_reply_random(void)
{
	GRand *rand = g_rand_new_with_seed(5321);

	for (guint round = 0; round < 2000; round++) {
		g_autoptr(SmtpReplyParser) p = smtp_reply_parser_new();
		guint8 buf[64];
		gsize len = g_rand_int_range(rand, 0, sizeof(buf));
		gsize used;

		for (gsize i = 0; i < len; i++) {
			/* Mostly digits, spaces, dashes and line ends, so
			 * that some inputs get far into the parser. */
			static const char alphabet[] = "2505 -\r\n.x";

			buf[i] = g_rand_boolean(rand)
			             ? alphabet[g_rand_int_range(
			                   rand, 0, sizeof(alphabet) - 1)]
			             : g_rand_int_range(rand, 0, 256);
		}
		while (len > 0) {
			SmtpParseStatus st;

			st = smtp_reply_parser_feed(p, (char *)buf, len, &used,
			                            NULL);
			if (st == SMTP_PARSE_DONE) {
				SmtpReply reply = {0};

				smtp_reply_parser_take(p, &reply);
				g_assert_nonnull(reply.text);
				g_assert_true(
				    g_utf8_validate(reply.text, -1, NULL));
				smtp_reply_clear(&reply);
			}
			if (st != SMTP_PARSE_DONE)
				break;
			memmove(buf, buf + used, len - used);
			len -= used;
		}
	}
	g_rand_free(rand);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);

	for (guint i = 0; i < G_N_ELEMENTS(reply_cases); i++) {
		g_autofree char *path = g_strdup_printf("/smtpclient/reply/%s",
		                                        reply_cases[i].name);

		g_test_add_data_func(path, &reply_cases[i], test_reply_case);
	}
	g_test_add_func("/smtpclient/reply/pipelined", test_reply_pipelined);
	g_test_add_func("/smtpclient/reply/nul", test_reply_nul);
	g_test_add_func("/smtpclient/reply/long-line", test_reply_long_line);
	g_test_add_func("/smtpclient/reply/endless-line",
	                test_reply_endless_line);
	g_test_add_func("/smtpclient/reply/many-lines", test_reply_many_lines);
	g_test_add_func("/smtpclient/reply/random", test_reply_random);
	return g_test_run();
}
