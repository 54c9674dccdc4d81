/*
 * test-journal.c - the journal copy's prefix and layout
 */
#include <string.h>

#include "journal.h"

static AmEnvelope *
envelope_new(const char *sender, const char *const *rcpts)
{
	AmEnvelope *env = am_envelope_new();

	env->sender = g_strdup(sender);
	for (; *rcpts != NULL; rcpts++)
		g_ptr_array_add(env->recipients, g_strdup(*rcpts));
	return env;
}

static void
test_prefix_exact(void)
{
	const char *rcpts[] = {"a@dest.example", "b@dest.example",
	                       "bcc@dest.example", NULL};
	g_autoptr(AmEnvelope) env = envelope_new("s@ex.org", rcpts);
	g_autoptr(GError) error = NULL;
	g_autoptr(GBytes) prefix = am_journal_prefix(env, "am1.x", &error);
	const char *expect = "X-Envelope-From: <s@ex.org>\r\n"
	                     "X-Envelope-To: <a@dest.example>\r\n"
	                     "X-Envelope-To: <b@dest.example>\r\n"
	                     "X-Envelope-To: <bcc@dest.example>\r\n"
	                     "X-Archive-Id: am1.x\r\n";
	gsize len;
	const char *data;

	g_assert_no_error(error);
	data = g_bytes_get_data(prefix, &len);
	g_assert_cmpmem(data, len, expect, strlen(expect));
}

static void
test_prefix_null_sender(void)
{
	const char *rcpts[] = {"a@dest.example", NULL};
	g_autoptr(AmEnvelope) env = envelope_new("", rcpts);
	g_autoptr(GBytes) prefix = am_journal_prefix(env, "id", NULL);
	gsize len;
	const char *data = g_bytes_get_data(prefix, &len);

	g_assert_true(len > 21 &&
	              memcmp(data, "X-Envelope-From: <>\r\n", 21) == 0);
}

/* An address smuggling a line break must not become a header. */
static void
test_prefix_injection(void)
{
	const char *rcpts[] = {"a@dest.example\r\nX-Archive-Id: forged", NULL};
	g_autoptr(AmEnvelope) env = envelope_new("s@ex.org", rcpts);
	g_autoptr(GError) error = NULL;
	g_autoptr(GBytes) prefix = am_journal_prefix(env, "id", &error);

	g_assert_null(prefix);
	g_assert_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT);
}

/* "LOCAL@x.example" of exactly @len octets. */
static char *
address_of_length(gsize len)
{
	g_autofree char *local = g_strnfill(len - strlen("@x.example"), 'a');

	return g_strconcat(local, "@x.example", NULL);
}

/* The longest line of @prefix, CRLF not counted. */
static gsize
longest_line(GBytes *prefix)
{
	gsize len, i, start = 0, longest = 0;
	const char *data = g_bytes_get_data(prefix, &len);

	for (i = 0; i + 1 < len; i++) {
		if (data[i] == '\r' && data[i + 1] == '\n') {
			longest = MAX(longest, i - start);
			start = i + 2;
		}
	}
	g_assert_cmpuint(start, ==, len); /* every line ends in CRLF */
	return longest;
}

/*
 * RFC 5322 section 2.1.1: 998 octets before CRLF at most.  An address
 * is never cut or folded: a line of 998 goes out whole, one of 999 is
 * refused, for the sender and for a recipient.
 */
static void
test_prefix_line_limit(void)
{
	static const struct {
		gboolean sender; /* the long address is the sender */
		gsize addr_len;
		gboolean fits;
	} cases[] = {
	    /* "X-Envelope-To: <" + 981 + ">" is 998 octets */
	    {FALSE, 981, TRUE},
	    {FALSE, 982, FALSE},
	    {FALSE, 100000, FALSE},
	    /* "X-Envelope-From: <" + 979 + ">" is 998 octets */
	    {TRUE, 979, TRUE},
	    {TRUE, 980, FALSE},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *addr = address_of_length(cases[i].addr_len);
		const char *rcpts[] = {"a@dest.example", NULL, NULL};
		g_autoptr(AmEnvelope) env = NULL;
		g_autoptr(GError) error = NULL;
		g_autoptr(GBytes) prefix = NULL;

		if (!cases[i].sender)
			rcpts[1] = addr;
		env = envelope_new(cases[i].sender ? addr : "s@ex.org", rcpts);
		prefix = am_journal_prefix(env, "am1.z", &error);
		if (!cases[i].fits) {
			g_assert_null(prefix);
			g_assert_error(error, AM_CAPTURE_ERROR,
			               AM_CAPTURE_ERROR_INPUT);
			g_assert_nonnull(strstr(error->message, "998"));
			continue;
		}
		g_assert_no_error(error);
		g_assert_cmpuint(longest_line(prefix), ==, 998);
		g_assert_nonnull(g_strstr_len(g_bytes_get_data(prefix, NULL),
		                              g_bytes_get_size(prefix), addr));
	}
}

/* The copy is prefix + original, the original byte for byte. */
static void
test_build(gconstpointer data)
{
	gsize limit = GPOINTER_TO_SIZE(data);
	const char *rcpts[] = {"a@dest.example", NULL};
	g_autoptr(AmEnvelope) env = envelope_new("s@ex.org", rcpts);
	g_autoptr(AmCapture) cap = am_capture_new(limit, NULL, TRUE);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(GBytes) prefix = NULL;

	g_assert_true(am_capture_add_header(cap, "Subject", " hi", &error));
	g_assert_true(
	    am_capture_add_body(cap, (const guchar *)"body\r\n", 6, &error));
	msg = am_journal_build(env, "am1.y", cap, &error);
	g_assert_no_error(error);
	prefix = am_journal_prefix(env, "am1.y", NULL);
	g_assert_cmpuint(smtp_message_get_size(msg), ==,
	                 g_bytes_get_size(prefix) + am_capture_get_size(cap));
	g_assert_cmpuint(am_capture_is_spilled(cap), ==, limit < 10);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/journal/prefix/exact", test_prefix_exact);
	g_test_add_func("/plugin/journal/prefix/null-sender",
	                test_prefix_null_sender);
	g_test_add_func("/plugin/journal/prefix/injection",
	                test_prefix_injection);
	g_test_add_func("/plugin/journal/prefix/line-limit",
	                test_prefix_line_limit);
	g_test_add_data_func("/plugin/journal/build/memory",
	                     GSIZE_TO_POINTER(1 << 20), test_build);
	g_test_add_data_func("/plugin/journal/build/file", GSIZE_TO_POINTER(4),
	                     test_build);
	return g_test_run();
}
