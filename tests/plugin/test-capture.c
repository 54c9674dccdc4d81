/*
 * test-capture.c - capture: byte-exact rebuild, memory and spill
 */
#include <glib/gstdio.h>
#include <string.h>

#include "capture.h"

static void
assert_bytes(GBytes *bytes, const char *expect)
{
	gsize len;
	const char *data = g_bytes_get_data(bytes, &len);

	g_assert_cmpmem(data, len, expect, strlen(expect));
}

/* What Postfix 3.7 hands over with SMFIP_HDR_LEADSPC, and the bytes. */
static void
test_rebuild_leadspc(void)
{
	g_autoptr(AmCapture) cap = am_capture_new(1 << 20, NULL, TRUE);
	g_autoptr(GBytes) all = NULL;
	g_autoptr(GError) error = NULL;
	static const char *const hdrs[][2] = {
	    {"Subject", "NoSpace"},
	    {"X-Two", "  two spaces "},
	    {"X-Tab", "\ttab"},
	    {"X-Fold", " first\n  second\n\tthird"},
	    {"X-Empty", ""},
	    {"X-FoldEmpty", "\n next"},
	    {"X-Crlf", " already\r\n folded"},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(hdrs); i++)
		g_assert_true(
		    am_capture_add_header(cap, hdrs[i][0], hdrs[i][1], &error));
	g_assert_true(am_capture_end_headers(cap, &error));
	g_assert_true(
	    am_capture_add_body(cap, (const guchar *)"a\r\n", 3, &error));
	g_assert_true(
	    am_capture_add_body(cap, (const guchar *)"b\r\n", 3, &error));
	all = am_capture_read_all(cap, &error);
	g_assert_no_error(error);
	assert_bytes(all, "Subject:NoSpace\r\n"
	                  "X-Two:  two spaces \r\n"
	                  "X-Tab:\ttab\r\n"
	                  "X-Fold: first\r\n  second\r\n\tthird\r\n"
	                  "X-Empty:\r\n"
	                  "X-FoldEmpty:\r\n next\r\n"
	                  "X-Crlf: already\r\n folded\r\n"
	                  "\r\n"
	                  "a\r\nb\r\n");
	g_assert_cmpuint(am_capture_get_size(cap), ==, g_bytes_get_size(all));
	g_assert_false(am_capture_is_spilled(cap));
	g_assert_cmpuint(am_capture_get_headers(cap)->len, ==,
	                 G_N_ELEMENTS(hdrs));
}

/* Without LEADSPC the MTA removed one space: it is put back. */
static void
test_rebuild_no_leadspc(void)
{
	g_autoptr(AmCapture) cap = am_capture_new(1 << 20, NULL, FALSE);
	g_autoptr(GBytes) all = NULL;
	g_autoptr(GError) error = NULL;

	g_assert_true(am_capture_add_header(cap, "Subject", "hi", &error));
	g_assert_true(am_capture_add_header(cap, "X-E", "", &error));
	all = am_capture_read_all(cap, &error);
	g_assert_no_error(error);
	assert_bytes(all, "Subject: hi\r\nX-E:\r\n\r\n");
}

static void
test_bad_header(void)
{
	g_autoptr(AmCapture) cap = am_capture_new(1 << 20, NULL, TRUE);
	g_autoptr(GError) error = NULL;

	g_assert_false(am_capture_add_header(cap, "Bad:Name", "x", &error));
	g_assert_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT);
	g_clear_error(&error);
	g_assert_false(am_capture_add_header(cap, "", "x", &error));
	g_assert_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT);
}

/*
 * A CR or LF that is not a fold would start a line of the sender's
 * choosing in the copy: every such value is refused, nothing of it is
 * written, and the capture still takes the next (good) header.
 */
static void
test_forged_lines(void)
{
	static const char *const values[] = {
	    " x\nX-Envelope-To: <evil@example>",   /* bare LF + name */
	    " x\rX-Envelope-To: <evil@example>",   /* lone CR + name */
	    " x\r\nX-Envelope-To: <evil@example>", /* CRLF + name */
	    " x\n\nforged body",                   /* ends the headers */
	    " x\r\n\r\nforged body",
	    " x\n", /* break at the end */
	    " x\r",
	    " x\r\n",
	    "\nX-Envelope-To: <evil@example>", /* break first */
	    " x\r \n\tfold after a lone CR",
	    " x\n\r\n folded CRLF after a bare LF",
	    " ok\n fold\nX-Evil: after a good fold",
	    " x\n\rX-Evil: y",
	    " x\r\rX-Evil: y",
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(values); i++) {
		g_autoptr(AmCapture) cap = am_capture_new(1 << 20, NULL, TRUE);
		g_autoptr(GError) error = NULL;
		g_autoptr(GBytes) all = NULL;
		g_autofree char *shown = g_strescape(values[i], NULL);

		g_test_message("value %zu: \"%s\"", i, shown);
		g_assert_false(
		    am_capture_add_header(cap, "Subject", values[i], &error));
		g_assert_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT);
		g_assert_nonnull(strstr(error->message, "Subject"));
		g_clear_error(&error);

		/* Nothing of the refused header reached the capture. */
		g_assert_cmpuint(am_capture_get_headers(cap)->len, ==, 0);
		g_assert_cmpuint(am_capture_get_size(cap), ==, 0);
		g_assert_true(am_capture_add_header(cap, "X-Ok", " y", &error));
		all = am_capture_read_all(cap, &error);
		g_assert_no_error(error);
		assert_bytes(all, "X-Ok: y\r\n\r\n");
	}
}

/*
 * A NUL cannot reach the capture inside a value (libmilter and this API
 * take C strings): whatever follows it is simply not there, and so can
 * forge nothing.
 */
static void
test_nul_cuts_value(void)
{
	static const char value[] = " x\0\r\nX-Envelope-To: <evil@example>";
	g_autoptr(AmCapture) cap = am_capture_new(1 << 20, NULL, TRUE);
	g_autoptr(GError) error = NULL;
	g_autoptr(GBytes) all = NULL;

	g_assert_true(am_capture_add_header(cap, "Subject", value, &error));
	all = am_capture_read_all(cap, &error);
	g_assert_no_error(error);
	assert_bytes(all, "Subject: x\r\n\r\n");
}

/* RFC 5322 section 2.2: a name is printable US-ASCII without ':'. */
static void
test_bad_names(void)
{
	static const char *const names[] = {
	    "Bad:Name", "",     "X-Sp ace", "X-Tab\t", "X\r\nX-Evil",
	    "X\nY",     "X\rY", "X\x01",    "X\x7f",   "X-\xc3\xa9",
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(names); i++) {
		g_autoptr(AmCapture) cap = am_capture_new(1 << 20, NULL, TRUE);
		g_autoptr(GError) error = NULL;

		g_assert_false(
		    am_capture_add_header(cap, names[i], " x", &error));
		g_assert_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT);
		g_assert_cmpuint(am_capture_get_size(cap), ==, 0);
	}
}

/* At most AM_CAPTURE_HEADERS_MAX headers; the next is refused. */
static void
test_header_count_limit(void)
{
	g_autoptr(AmCapture) cap = am_capture_new(1 << 20, NULL, TRUE);
	g_autoptr(GError) error = NULL;
	guint64 size;
	guint i;

	for (i = 0; i < AM_CAPTURE_HEADERS_MAX; i++)
		g_assert_true(am_capture_add_header(cap, "A", "b", &error));
	size = am_capture_get_size(cap);
	g_assert_false(am_capture_add_header(cap, "A", "b", &error));
	g_assert_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT);
	g_assert_nonnull(strstr(error->message, "10000 headers"));
	g_assert_cmpuint(am_capture_get_headers(cap)->len, ==,
	                 AM_CAPTURE_HEADERS_MAX);
	g_assert_cmpuint(am_capture_get_size(cap), ==, size);
}

/* Names and values: AM_CAPTURE_HEADER_OCTETS_MAX in all, exactly. */
static void
test_header_octets_limit(void)
{
	g_autoptr(AmCapture) cap = am_capture_new(1 << 16, NULL, TRUE);
	g_autoptr(GError) error = NULL;
	const gsize chunk = 1024 * 1024;
	g_autofree char *big = g_strnfill(chunk - 1, 'v'); /* + "X" = 1 MiB */
	g_autofree char *rest = NULL;
	guint i;

	for (i = 0; i < 3; i++)
		g_assert_true(am_capture_add_header(cap, "X", big, &error));
	/* The fourth MiB exactly fills the limit; one more octet does not
	 * fit. */
	rest = g_strnfill(chunk - 2, 'w');
	g_assert_true(am_capture_add_header(cap, "YY", rest, &error));
	g_assert_no_error(error);
	g_assert_false(am_capture_add_header(cap, "Z", "", &error));
	g_assert_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT);
	g_assert_nonnull(strstr(error->message, "4194304 octets"));
	g_assert_cmpuint(am_capture_get_headers(cap)->len, ==, 4);
}

/* Spill happens exactly when the next write would pass the limit. */
static void
test_spill_threshold(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-capture-XXXXXX", NULL);
	g_autoptr(AmCapture) cap = am_capture_new(20, dir, TRUE);
	g_autoptr(GError) error = NULL;
	g_autoptr(GBytes) all = NULL;
	g_autoptr(GDir) d = NULL;

	g_assert_true(am_capture_add_header(cap, "Subject", " 12", &error));
	g_assert_true(am_capture_end_headers(cap, &error));
	/* "Subject: 12\r\n\r\n" is 15 octets; 5 more is exactly 20. */
	g_assert_true(
	    am_capture_add_body(cap, (const guchar *)"abcde", 5, &error));
	g_assert_false(am_capture_is_spilled(cap));
	g_assert_true(am_capture_add_body(cap, (const guchar *)"f", 1, &error));
	g_assert_true(am_capture_is_spilled(cap));
	g_assert_true(
	    am_capture_add_body(cap, (const guchar *)"\r\n", 2, &error));
	g_assert_no_error(error);

	/* The temporary file is unlinked at once: the directory is empty. */
	d = g_dir_open(dir, 0, NULL);
	g_assert_nonnull(d);
	g_assert_null(g_dir_read_name(d));

	all = am_capture_read_all(cap, &error);
	g_assert_no_error(error);
	assert_bytes(all, "Subject: 12\r\n\r\nabcdef\r\n");
	g_assert_cmpuint(am_capture_get_size(cap), ==, 23);
	g_rmdir(dir);
}

/* Both storage kinds go into an SmtpMessage with the same size. */
static void
test_append_to_message(gconstpointer data)
{
	gsize limit = GPOINTER_TO_SIZE(data);
	g_autoptr(AmCapture) cap = am_capture_new(limit, NULL, TRUE);
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	guchar body[4096];

	memset(body, 'x', sizeof(body));
	g_assert_true(am_capture_add_header(cap, "A", " b", &error));
	g_assert_true(am_capture_add_body(cap, body, sizeof(body), &error));
	g_assert_true(am_capture_append_to(cap, msg, &error));
	g_assert_no_error(error);
	g_assert_cmpuint(am_capture_is_spilled(cap), ==, limit < 4096);
	g_assert_cmpuint(smtp_message_get_size(msg), ==, 6 + 2 + 4096);

	/* After the end of message nothing more may be added. */
	g_assert_false(am_capture_add_body(cap, body, 1, &error));
}

static void
test_address_strip(void)
{
	static const struct {
		const char *in;
		const char *out;
	} cases[] = {
	    {"<a@b.example>", "a@b.example"},
	    {"<>", ""},
	    {"a@b.example", "a@b.example"},
	    {"<\"a b\"@c.example>", "\"a b\"@c.example"},
	    {"<a@b\r\nX: y>", NULL},
	    {"a b", NULL},
	    {"<a@b", NULL},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *got = am_address_strip(cases[i].in);

		g_assert_cmpstr(got, ==, cases[i].out);
	}
}

static void
test_envelope(void)
{
	g_autoptr(AmEnvelope) env = am_envelope_new();
	g_autoptr(GError) error = NULL;
	char *mail[] = {"<s@ex.org>", "BODY=8BITMIME", "SMTPUTF8", NULL};
	char *rcpt[] = {"<r@ex.org>", "NOTIFY=NEVER", NULL};
	char *bad[] = {"<r@ex.org\n>", NULL};

	g_assert_true(am_envelope_set_sender(env, mail, &error));
	g_assert_cmpstr(env->sender, ==, "s@ex.org");
	g_assert_true(env->eightbit);
	g_assert_true(env->smtputf8);
	g_assert_cmpuint(env->mail_params->len, ==, 2);
	g_assert_true(am_envelope_add_recipient(env, rcpt, &error));
	g_assert_false(am_envelope_add_recipient(env, bad, &error));
	g_assert_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT);
	g_assert_cmpuint(env->recipients->len, ==, 1);
}

/*
 * An address longer than AM_ADDRESS_MAX would not fit in a header line
 * of the journal: refused when the MTA hands it over, 979 taken.
 */
static void
test_envelope_address_max(void)
{
	static const struct {
		gsize len;
		gboolean ok;
	} cases[] = {
	    {AM_ADDRESS_MAX, TRUE},
	    {AM_ADDRESS_MAX + 1, FALSE},
	    {65536, FALSE},
	};
	gsize i;

	g_assert_cmpint(AM_ADDRESS_MAX, ==,
	                998 - (int)strlen("X-Envelope-From: <>"));
	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(AmEnvelope) env = am_envelope_new();
		g_autoptr(GError) error = NULL;
		g_autofree char *local =
		    g_strnfill(cases[i].len - strlen("@x.example"), 'a');
		g_autofree char *arg =
		    g_strconcat("<", local, "@x.example>", NULL);
		char *argv[] = {arg, NULL};

		g_assert_cmpint(am_envelope_set_sender(env, argv, &error), ==,
		                cases[i].ok);
		g_assert_cmpint(am_envelope_add_recipient(
		                    env, argv, cases[i].ok ? &error : NULL),
		                ==, cases[i].ok);
		if (cases[i].ok) {
			g_assert_no_error(error);
			g_assert_cmpuint(strlen(env->sender), ==, cases[i].len);
			g_assert_cmpuint(env->recipients->len, ==, 1);
		} else {
			g_assert_error(error, AM_CAPTURE_ERROR,
			               AM_CAPTURE_ERROR_INPUT);
			g_assert_nonnull(strstr(error->message, "979"));
			g_assert_null(env->sender);
			g_assert_cmpuint(env->recipients->len, ==, 0);
		}
	}
}

static void
test_unfold(void)
{
	AmHeader h = {"Subject", (char *)" a\r\n b\n\tc"};
	g_autofree char *line = am_header_unfold(&h);

	g_assert_cmpstr(line, ==, "Subject: a b\tc");
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/capture/rebuild/leadspc",
	                test_rebuild_leadspc);
	g_test_add_func("/plugin/capture/rebuild/no-leadspc",
	                test_rebuild_no_leadspc);
	g_test_add_func("/plugin/capture/rebuild/bad-header", test_bad_header);
	g_test_add_func("/plugin/capture/rebuild/bad-names", test_bad_names);
	g_test_add_func("/plugin/capture/rebuild/forged-lines",
	                test_forged_lines);
	g_test_add_func("/plugin/capture/rebuild/nul", test_nul_cuts_value);
	g_test_add_func("/plugin/capture/limits/count",
	                test_header_count_limit);
	g_test_add_func("/plugin/capture/limits/octets",
	                test_header_octets_limit);
	g_test_add_func("/plugin/capture/spill/threshold",
	                test_spill_threshold);
	g_test_add_data_func("/plugin/capture/append/memory",
	                     GSIZE_TO_POINTER(1 << 20), test_append_to_message);
	g_test_add_data_func("/plugin/capture/append/file",
	                     GSIZE_TO_POINTER(100), test_append_to_message);
	g_test_add_func("/plugin/capture/envelope/strip", test_address_strip);
	g_test_add_func("/plugin/capture/envelope/params", test_envelope);
	g_test_add_func("/plugin/capture/envelope/address-max",
	                test_envelope_address_max);
	g_test_add_func("/plugin/capture/unfold", test_unfold);
	return g_test_run();
}
