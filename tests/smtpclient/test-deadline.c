/*
 * test-deadline.c - smtp_client_set_deadline(): the hard overall limit
 *
 * The server in these cases is slow but never too slow: it answers
 * every command a little inside the stage limit, so only the overall
 * deadline can end the call early.  Each case measures how long the
 * call took: it must end at the deadline (with some slack for a loaded
 * machine), well before the sum of the stage waits, and say that the
 * deadline, not a stage limit, ran out.  A control case runs the same
 * server without a deadline and must succeed, which shows that no
 * stage limit alone would have stopped it.
 */
#include <string.h>

#include "test-common.h"

#define STAGE_MS    400 /* every stage limit */
#define DELAY_MS    300 /* the server's answer time, inside it */
#define DEADLINE_MS 700 /* about two slow answers */
/* Scheduling on a loaded machine; the sum stays well under the 1500 ms
 * the slow server takes without a deadline. */
#define SLACK_MS 400

/* Every command answered DELAY_MS late, inside STAGE_MS. */
static const char slow_script[] =
    "on EHLO delay 300 250-fakesmtp|250 8BITMIME\n"
    "on MAIL delay 300 250 2.1.0 Ok\n"
    "on RCPT delay 300 250 2.1.5 Ok\n"
    "on DATA delay 300 354 go on\n"
    "on DOT delay 300 250 2.0.0 Ok: queued\n"
    "on RSET delay 300 250 2.0.0 Ok\n"
    "on QUIT delay 300 221 2.0.0 Bye\n";

static const SmtpTimeouts stage_limits = {STAGE_MS, STAGE_MS, STAGE_MS,
                                          STAGE_MS};

static const char *const one_rcpt[] = {"rcpt@example.org", NULL};

static void
start(Fixture *f, const char *script)
{
	fixture_start(f, script, &stage_limits);
}

static SmtpResult *
send_one(Fixture *f, GError **error)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);

	smtp_message_append_data(msg, "Subject: t\r\n\r\nbody\r\n", 21);
	return smtp_client_sendmail(f->client, "from@example.org", one_rcpt,
	                            msg, NULL, NULL, error);
}

/* Milliseconds since @t0 (monotonic us). */
static gint64
ms_since(gint64 t0)
{
	return (g_get_monotonic_time() - t0) / 1000;
}

/* The error says the deadline ran out, in @stage (NULL: any). */
static void
assert_deadline_error(const GError *error, const char *stage)
{
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_TIMEOUT);
	g_assert_nonnull(strstr(error->message, "deadline ran out"));
	if (stage != NULL)
		g_assert_cmpstr(smtp_error_get_stage(error), ==, stage);
	g_assert_nonnull(strstr(error->message, smtp_error_get_stage(error)));
	g_assert_true(smtp_error_is_temporary(error));
}

/* Control: the same slow server, no deadline: it works, and takes
 * longer than the deadline of the other cases would allow. */
static void
test_control(void)
{
	Fixture f;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) result = NULL;
	gint64 t0 = g_get_monotonic_time();

	start(&f, slow_script);
	result = send_one(&f, &error);
	g_assert_no_error(error);
	g_assert_nonnull(result);
	g_assert_cmpint(ms_since(t0), >=, 5 * DELAY_MS);
	fixture_tear_down(&f, NULL);
}

/* The deadline ends a sendmail() whose every stage is in time. */
static void
test_sendmail(void)
{
	Fixture f;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) result = NULL;
	gint64 t0 = g_get_monotonic_time();
	gint64 took;

	start(&f, slow_script);
	smtp_client_set_deadline(f.client, t0 + DEADLINE_MS * 1000);
	result = send_one(&f, &error);
	took = ms_since(t0);
	g_assert_null(result);
	assert_deadline_error(error, NULL);
	g_test_message("ended after %" G_GINT64_FORMAT " ms in %s", took,
	               smtp_error_get_stage(error));
	g_assert_cmpint(took, >=, DEADLINE_MS - 5);
	g_assert_cmpint(took, <, DEADLINE_MS + SLACK_MS);
	g_assert_false(smtp_client_is_connected(f.client));
	fixture_tear_down(&f, NULL);
}

/* QUIT (smtp_client_free) waits 5 s at most on its own; under a
 * deadline it waits no longer than the deadline. */
static void
test_quit(void)
{
	static const SmtpTimeouts t = {5000, 5000, 5000, 5000};
	Fixture f;
	g_autoptr(GError) error = NULL;
	gint64 t0;

	fixture_start(&f, "on QUIT stall\n", &t);
	g_assert_true(smtp_client_connect(f.client, &error));
	t0 = g_get_monotonic_time();
	smtp_client_set_deadline(f.client, t0 + 300 * 1000);
	smtp_client_quit(f.client);
	g_assert_cmpint(ms_since(t0), >=, 295);
	g_assert_cmpint(ms_since(t0), <, 300 + SLACK_MS);
	g_assert_cmpuint(count_commands(&f, "QUIT"), ==, 1);
	fixture_tear_down(&f, NULL);
}

/* A greeting that never comes: the deadline, not the connect limit. */
static void
test_greeting(void)
{
	static const SmtpTimeouts t = {5000, 5000, 5000, 5000};
	Fixture f;
	g_autoptr(GError) error = NULL;
	gint64 t0 = g_get_monotonic_time();

	fixture_start(&f, "greeting none\n", &t);
	smtp_client_set_deadline(f.client, t0 + 300 * 1000);
	g_assert_false(smtp_client_connect(f.client, &error));
	assert_deadline_error(error, "greeting");
	g_assert_cmpint(ms_since(t0), <, 300 + SLACK_MS);
	fixture_tear_down(&f, NULL);
}

/* A deadline that has passed: TIMEOUT at once, not even a connection
 * attempt. */
static void
test_already_passed(void)
{
	Fixture f;
	g_autoptr(GError) error = NULL;

	start(&f, NULL);
	smtp_client_set_deadline(f.client, g_get_monotonic_time() - 1);
	g_assert_false(smtp_client_connect(f.client, &error));
	assert_deadline_error(error, "connect");
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 0);
	fixture_tear_down(&f, NULL);
}

/* Set on an open connection, it limits the next waits; here the reply
 * to the final dot, whose own limit is long. */
static void
test_open_connection(void)
{
	static const SmtpTimeouts t = {5000, 5000, 5000, 5000};
	Fixture f;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) result = NULL;
	gint64 t0;

	fixture_start(&f, "on DOT stall\n", &t);
	g_assert_true(smtp_client_connect(f.client, &error));
	t0 = g_get_monotonic_time();
	smtp_client_set_deadline(f.client, t0 + 300 * 1000);
	result = send_one(&f, &error);
	g_assert_null(result);
	assert_deadline_error(error, "end-of-data");
	g_assert_cmpint(ms_since(t0), >=, 295);
	g_assert_cmpint(ms_since(t0), <, 300 + SLACK_MS);
	fixture_tear_down(&f, NULL);
}

/* 0 removes it: the control's slow server then works again on the
 * same client. */
static void
test_cleared(void)
{
	Fixture f;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) result = NULL;

	start(&f, slow_script);
	smtp_client_set_deadline(f.client, g_get_monotonic_time() - 1);
	g_assert_false(smtp_client_connect(f.client, &error));
	g_clear_error(&error);
	smtp_client_set_deadline(f.client, 0);
	result = send_one(&f, &error);
	g_assert_no_error(error);
	g_assert_nonnull(result);
	fixture_tear_down(&f, NULL);
}

/* The TLS handshake: a server that says 220 to STARTTLS and then
 * never speaks TLS holds the handshake until the deadline. */
static void
test_tls_handshake(void)
{
	static const SmtpTimeouts t = {5000, 5000, 5000, 5000};
	Fixture f;
	g_autoptr(GError) error = NULL;
	gint64 t0 = g_get_monotonic_time();

	fixture_start(&f,
	              "ehlo-keywords STARTTLS 8BITMIME\n"
	              "on STARTTLS reply 220 2.0.0 Ready to start TLS\n"
	              "on OTHER stall\n",
	              &t);
	smtp_client_set_tls(f.client, SMTP_TLS_ENCRYPT, NULL);
	smtp_client_set_deadline(f.client, t0 + 300 * 1000);
	g_assert_false(smtp_client_connect(f.client, &error));
	assert_deadline_error(error, "starttls");
	g_assert_nonnull(strstr(error->message, "handshake"));
	g_assert_cmpint(ms_since(t0), <, 300 + SLACK_MS);
	fixture_tear_down(&f, NULL);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/smtpclient/deadline/control", test_control);
	g_test_add_func("/smtpclient/deadline/sendmail", test_sendmail);
	g_test_add_func("/smtpclient/deadline/quit", test_quit);
	g_test_add_func("/smtpclient/deadline/greeting", test_greeting);
	g_test_add_func("/smtpclient/deadline/already-passed",
	                test_already_passed);
	g_test_add_func("/smtpclient/deadline/open-connection",
	                test_open_connection);
	g_test_add_func("/smtpclient/deadline/cleared", test_cleared);
	g_test_add_func("/smtpclient/deadline/tls-handshake",
	                test_tls_handshake);
	return g_test_run();
}
