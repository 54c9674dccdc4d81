/*
 * test-log.c - the delivery and decision lines, as a table
 */
#include "log.h"

typedef struct {
	const char *name;
	AmLogDelivery in;
	const char *expect;
} LogCase;

static const LogCase cases[] = {
    {"sent",
     {"3F2A81C0DE", "journal@archive.example", "archive.example[192.0.2.7]:25",
      0.1234, "2.0.0", AM_STATUS_SENT, "250 2.0.0 queued as 12AB"},
     "3F2A81C0DE: archive=<journal@archive.example>, "
     "relay=archive.example[192.0.2.7]:25, delay=0.12, dsn=2.0.0, "
     "status=sent (250 2.0.0 queued as 12AB)"},
    {"deferred, no connection",
     {"3F2A81C0DE", "journal@archive.example", NULL, 1.5, "4.4.1",
      AM_STATUS_DEFERRED,
      "cannot connect to 127.0.0.1[127.0.0.1]:2527: Connection refused"},
     "3F2A81C0DE: archive=<journal@archive.example>, relay=none, "
     "delay=1.50, dsn=4.4.1, status=deferred (cannot connect to "
     "127.0.0.1[127.0.0.1]:2527: Connection refused)"},
    {"bounced",
     {"ABC", "j@a.example", "a.example[192.0.2.7]:25", 0, "5.7.1",
      AM_STATUS_BOUNCED, "554 5.7.1 no (in reply to end-of-data)"},
     "ABC: archive=<j@a.example>, relay=a.example[192.0.2.7]:25, "
     "delay=0.00, dsn=5.7.1, status=bounced (554 5.7.1 no (in reply to "
     "end-of-data))"},
    {"refused recipient",
     {"ABC", "gone@a.example", "a.example[192.0.2.7]:25", 0.02, "5.1.1",
      AM_STATUS_BOUNCED, "550 5.1.1 unknown (in reply to rcpt)"},
     "ABC: archive=<gone@a.example>, relay=a.example[192.0.2.7]:25, "
     "delay=0.02, dsn=5.1.1, status=bounced (550 5.1.1 unknown (in "
     "reply to rcpt))"},
    {"no queue id, null address, hostile text",
     {NULL, "", "r[1.2.3.4]:25", 0, "4.0.0", AM_STATUS_DEFERRED,
      "451 try\r\nQUEUE: status=sent"},
     "NOQUEUE: archive=<>, relay=r[1.2.3.4]:25, delay=0.00, dsn=4.0.0, "
     "status=deferred (451 try??QUEUE: status=sent)"},
};

static void
test_delivery_table(void)
{
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *line = am_log_format_delivery(&cases[i].in);

		g_test_message("case: %s", cases[i].name);
		g_assert_cmpstr(line, ==, cases[i].expect);
	}
}

static void
test_decision(void)
{
	g_autofree char *line = am_log_format_decision(
	    "ABC", "tempfail", 1, 1, "archive copy failed: 451 x");

	g_assert_cmpstr(line, ==,
	                "ABC: action=tempfail, copies=1, "
	                "failed=1 (archive copy failed: 451 x)");
}

static void
test_sanitize_utf8_cut(void)
{
	/* "é" is two octets; a cut between them drops the half. */
	g_autofree char *a = am_log_sanitize("ab\xc3\xa9", 3);
	g_autofree char *b = am_log_sanitize("ab\xc3\xa9", 4);

	g_assert_cmpstr(a, ==, "ab");
	g_assert_cmpstr(b, ==, "ab\xc3\xa9");
}

/*
 * Characters that would let a relay's text forge or disguise a log line
 * (or the reply the client sees): each one, alone and between text,
 * becomes '?'.  Control C1 (NEL, CSI and the rest of U+0080..U+009F as
 * UTF-8), the Unicode line and paragraph separators, the bidirectional
 * and other format controls.
 */
static const char *const unsafe[] = {
    "\xc2\x80",     /* U+0080, first C1 */
    "\xc2\x85",     /* U+0085 NEL */
    "\xc2\x8d",     /* U+008D RI */
    "\xc2\x9b",     /* U+009B CSI */
    "\xc2\x9f",     /* U+009F, last C1 */
    "\x7f",         /* DEL */
    "\x1b",         /* ESC */
    "\xe2\x80\xa8", /* U+2028 LINE SEPARATOR */
    "\xe2\x80\xa9", /* U+2029 PARAGRAPH SEPARATOR */
    "\xe2\x80\x8e", /* U+200E LRM */
    "\xe2\x80\x8f", /* U+200F RLM */
    "\xe2\x80\xaa", /* U+202A LRE */
    "\xe2\x80\xab", /* U+202B RLE */
    "\xe2\x80\xac", /* U+202C PDF */
    "\xe2\x80\xad", /* U+202D LRO */
    "\xe2\x80\xae", /* U+202E RLO */
    "\xe2\x81\xa6", /* U+2066 LRI */
    "\xe2\x81\xa7", /* U+2067 RLI */
    "\xe2\x81\xa8", /* U+2068 FSI */
    "\xe2\x81\xa9", /* U+2069 PDI */
    "\xd8\x9c",     /* U+061C ALM */
};

static void
test_sanitize_unsafe(void)
{
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(unsafe); i++) {
		g_autofree char *in =
		    g_strdup_printf("250 ok%sQID: status=sent", unsafe[i]);
		g_autofree char *out = am_log_sanitize(in, 512);
		g_autofree char *alone = am_log_sanitize(unsafe[i], 512);

		g_test_message("case %zu: %s", i, out);
		g_assert_cmpstr(out, ==, "250 ok?QID: status=sent");
		g_assert_cmpstr(alone, ==, "?");
	}
}

/* The same characters in every field of a delivery line and in the
 * decision line: nothing unsafe gets through. */
static void
test_lines_unsafe(void)
{
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(unsafe); i++) {
		g_autofree char *addr =
		    g_strdup_printf("j%s@a.example", unsafe[i]);
		g_autofree char *relay =
		    g_strdup_printf("r%s[1.2.3.4]:25", unsafe[i]);
		g_autofree char *reply =
		    g_strdup_printf("451 x%sABC: status=sent", unsafe[i]);
		AmLogDelivery d = {
		    "ABC", addr, relay, 0, "4.0.0", AM_STATUS_DEFERRED, reply};
		g_autofree char *line = am_log_format_delivery(&d);
		g_autofree char *dec =
		    am_log_format_decision("ABC", "tempfail", 1, 1, reply);

		g_assert_cmpstr(line, ==,
		                "ABC: archive=<j?@a.example>, "
		                "relay=r?[1.2.3.4]:25, delay=0.00, dsn=4.0.0, "
		                "status=deferred (451 x?ABC: status=sent)");
		g_assert_cmpstr(dec, ==,
		                "ABC: action=tempfail, copies=1, failed=1 "
		                "(451 x?ABC: status=sent)");
	}
}

/* Octets that are not UTF-8 become '?' one by one; valid text beyond
 * ASCII (accents, CJK, emoji) stays as it is. */
static void
test_sanitize_invalid_utf8(void)
{
	static const struct {
		const char *in, *out;
	} cases[] = {
	    {"a\xff"
	     "b",
	     "a?b"},
	    {"a\xc2"
	     "b",
	     "a?b"}, /* truncated sequence */
	    {"a\xc0\x8a"
	     "b",
	     "a??b"}, /* overlong LF */
	    {"a\xe0\x80\x8a"
	     "b",
	     "a???b"}, /* overlong LF, 3 octets */
	    {"a\xed\xa0\x80"
	     "b",
	     "a???b"}, /* a UTF-16 surrogate */
	    {"a\xf4\x90\x80\x80"
	     "b",
	     "a????b"}, /* past U+10FFFF */
	    {"a\x80"
	     "b",
	     "a?b"}, /* lone continuation */
	    {"caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x93\xa7",
	     "caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x93\xa7"},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *out = am_log_sanitize(cases[i].in, 512);

		g_test_message("case %zu", i);
		g_assert_cmpstr(out, ==, cases[i].out);
		g_assert_true(g_utf8_validate(out, -1, NULL));
	}
}

/* A cut never splits a character, whatever its length. */
static void
test_sanitize_cut_long(void)
{
	const char *mail = "\xf0\x9f\x93\xa7"; /* 4 octets */
	g_autofree char *in = g_strdup_printf("ab%s", mail);
	g_autofree char *c5 = am_log_sanitize(in, 5);
	g_autofree char *c6 = am_log_sanitize(in, 6);
	g_autofree char *q = am_log_sanitize("ab\xc2\x85", 3);

	g_assert_cmpstr(c5, ==, "ab");
	g_assert_cmpstr(c6, ==, in);
	g_assert_cmpstr(q, ==, "ab?");
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/log/delivery", test_delivery_table);
	g_test_add_func("/plugin/log/decision", test_decision);
	g_test_add_func("/plugin/log/sanitize-utf8", test_sanitize_utf8_cut);
	g_test_add_func("/plugin/log/sanitize-unsafe", test_sanitize_unsafe);
	g_test_add_func("/plugin/log/lines-unsafe", test_lines_unsafe);
	g_test_add_func("/plugin/log/sanitize-invalid-utf8",
	                test_sanitize_invalid_utf8);
	g_test_add_func("/plugin/log/sanitize-cut-long",
	                test_sanitize_cut_long);
	return g_test_run();
}
