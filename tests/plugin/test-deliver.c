/*
 * test-deliver.c - one copy against the fake SMTP server: each outcome
 */
#include <string.h>

#include "deliver.h"
#include "fakesmtp.h"

typedef struct {
	FakeSmtp *fake;
	AmRelay relay;
} Fixture;

static void
fixture_start(Fixture *f, const char *script)
{
	g_autoptr(GError) error = NULL;

	f->fake = fake_smtp_new(script, &error);
	g_assert_no_error(error);
	f->relay.name = (char *)"test";
	f->relay.host = (char *)"127.0.0.1";
	f->relay.timeout_ms = 2000;
	f->relay.port = fake_smtp_start(f->fake, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
}

static void
fixture_stop(Fixture *f)
{
	fake_smtp_free(f->fake);
}

static AmDelivery *
send_copy(Fixture *f, const char *const *to, gboolean utf8)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	AmCopyRequest req = {
	    .relay = &f->relay,
	    .from = "",
	    .to = to,
	    .msg = msg,
	    .smtputf8 = utf8,
	    .eightbit = TRUE,
	};

	smtp_message_append_data(msg, "Subject: t\r\n\r\nbody\r\n", 20);
	return am_deliver(&req);
}

static const AmRcptOutcome *
rcpt(const AmDelivery *d, guint i)
{
	g_assert_cmpuint(i, <, d->rcpts->len);
	return d->rcpts->pdata[i];
}

static void
test_sent(void)
{
	const char *to[] = {"journal@archive.example", NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;
	const FakeSmtpMessage *m;
	g_autofree char *peer = NULL;

	fixture_start(&f, NULL);
	d = send_copy(&f, to, TRUE);
	g_assert_cmpint(d->status, ==, AM_STATUS_SENT);
	g_assert_null(d->reason);
	peer = g_strdup_printf("[127.0.0.1]:%u", f.relay.port);
	g_assert_nonnull(strstr(d->relay, peer));
	g_assert_cmpstr(rcpt(d, 0)->dsn, ==, "2.0.0");
	g_assert_true(g_str_has_prefix(rcpt(d, 0)->reply, "250 2.0.0 "));

	/* Null sender, and the original's options carried over. */
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, 2000));
	m = fake_smtp_get_message(f.fake, 0);
	g_assert_true(g_str_has_prefix(m->mail_from, "FROM:<>"));
	g_assert_nonnull(strstr(m->mail_from, "SMTPUTF8"));
	g_assert_nonnull(strstr(m->mail_from, "BODY=8BITMIME"));
	fixture_stop(&f);
}

typedef struct {
	const char *name;
	const char *script; /* NULL: nothing listens */
	gboolean utf8;
	AmStatus status;
	const char *dsn;
	gboolean relay_none;
	const char *reply_part;
} FailCase;

static const FailCase fail_cases[] = {
    {"deferred at end of data", "on DOT reply 451 4.3.0 try later", FALSE,
     AM_STATUS_DEFERRED, "4.3.0", FALSE, "451 4.3.0 try later"},
    {"deferred, no class detail", "on MAIL reply 452 full", FALSE,
     AM_STATUS_DEFERRED, "4.0.0", FALSE, "452 full"},
    {"deferred, nothing listens", NULL, FALSE, AM_STATUS_DEFERRED, "4.4.1",
     TRUE, ""},
    {"deferred, stall", "on DOT stall", FALSE, AM_STATUS_DEFERRED, "4.4.2",
     FALSE, ""},
    {"bounced at RCPT", "on RCPT reply 550 5.1.1 no such user", FALSE,
     AM_STATUS_BOUNCED, "5.1.1", FALSE, "(in reply to rcpt)"},
    {"bounced at end of data", "on DOT reply 554 5.6.0 bad", FALSE,
     AM_STATUS_BOUNCED, "5.6.0", FALSE, "554 5.6.0 bad"},
    {"bounced, SMTPUTF8 not offered", "ehlo-keywords 8BITMIME SIZE 10485760",
     TRUE, AM_STATUS_BOUNCED, "5.6.7", FALSE, ""},
};

static void
test_fail(gconstpointer data)
{
	const FailCase *c = data;
	const char *to[] = {"journal@archive.example", NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;

	fixture_start(&f, c->script);
	if (c->script == NULL)
		fake_smtp_stop(f.fake);
	f.relay.timeout_ms = 500;
	d = send_copy(&f, to, c->utf8);
	g_assert_cmpint(d->status, ==, c->status);
	g_assert_cmpstr(rcpt(d, 0)->dsn, ==, c->dsn);
	g_assert_cmpint(strcmp(d->relay, "none") == 0, ==, c->relay_none);
	g_assert_nonnull(strstr(rcpt(d, 0)->reply, c->reply_part));
	g_assert_nonnull(d->reason);
	fixture_stop(&f);
}

/* One of two archive addresses refused: one line each, copy failed. */
static void
test_partial(void)
{
	const char *to[] = {"journal@archive.example", "gone@archive.example",
	                    NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;

	fixture_start(&f, "on RCPT /gone/ reply 550 5.1.1 gone");
	d = send_copy(&f, to, FALSE);
	g_assert_cmpint(d->status, ==, AM_STATUS_BOUNCED);
	g_assert_cmpint(rcpt(d, 0)->status, ==, AM_STATUS_SENT);
	g_assert_cmpint(rcpt(d, 1)->status, ==, AM_STATUS_BOUNCED);
	g_assert_cmpstr(rcpt(d, 1)->address, ==, "gone@archive.example");
	g_assert_cmpstr(rcpt(d, 1)->dsn, ==, "5.1.1");
	fixture_stop(&f);
}

int
main(int argc, char **argv)
{
	gsize i;

	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/deliver/sent", test_sent);
	g_test_add_func("/plugin/deliver/partial", test_partial);
	for (i = 0; i < G_N_ELEMENTS(fail_cases); i++) {
		g_autofree char *path =
		    g_strdup_printf("/plugin/deliver/fail/%zu", i);

		g_test_add_data_func(path, &fail_cases[i], test_fail);
	}
	return g_test_run();
}
