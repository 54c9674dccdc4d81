/*
 * test-deliver.c - one copy against the fake SMTP server: each outcome,
 * and each relay setting (TLS level, credentials, stage limits,
 * copy_deadline) reaching the client
 *
 * TLS and AUTH cases hold whether or not the library implements them
 * yet: what they check is that a copy which must not go in clear does
 * not go at all.  The one case that needs a working AUTH skips itself
 * while the library answers "not implemented".
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
	f->relay.timeouts = (SmtpTimeouts){2000, 2000, 2000, 2000};
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
	return am_deliver(NULL, &req);
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
	f.relay.timeouts = (SmtpTimeouts){500, 500, 500, 500};
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

/*
 * One address refused at RCPT, then the copy refused at DATA or at the
 * end of data: each address is logged with its own reply, the refused
 * one with its RCPT reply, not the later one; the copy's outcome and
 * deciding reply are those of the later failure.
 */
typedef struct {
	const char *name;
	const char *script;
	const char *rcpt_reply;  /* of gone@ */
	const char *other_reply; /* of journal@ */
	AmStatus other_status;
	int code; /* d->reply */
} LaterCase;

static const LaterCase later_cases[] = {
    {"dot-451",
     "on RCPT /gone/ reply 450 4.2.1 busy\n"
     "on DOT reply 451 4.3.0 later",
     "450 4.2.1 busy (in reply to rcpt)",
     "451 4.3.0 later (in reply to end-of-data)", AM_STATUS_DEFERRED, 451},
    {"dot-554",
     "on RCPT /gone/ reply 450 4.2.1 busy\n"
     "on DOT reply 554 5.6.0 bad",
     "450 4.2.1 busy (in reply to rcpt)",
     "554 5.6.0 bad (in reply to end-of-data)", AM_STATUS_BOUNCED, 554},
    {"data-451",
     "on RCPT /gone/ reply 550 5.1.1 gone\n"
     "on DATA reply 451 4.3.0 later",
     "550 5.1.1 gone (in reply to rcpt)", "451 4.3.0 later (in reply to data)",
     AM_STATUS_DEFERRED, 451},
};

static void
test_refused_then_failed(gconstpointer data)
{
	const LaterCase *c = data;
	const char *to[] = {"journal@archive.example", "gone@archive.example",
	                    NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;

	fixture_start(&f, c->script);
	d = send_copy(&f, to, FALSE);
	g_test_message("%s: %s / %s", c->name, rcpt(d, 0)->reply,
	               rcpt(d, 1)->reply);
	g_assert_cmpstr(rcpt(d, 1)->address, ==, "gone@archive.example");
	g_assert_cmpstr(rcpt(d, 1)->reply, ==, c->rcpt_reply);
	g_assert_cmpint(rcpt(d, 1)->status, ==,
	                c->rcpt_reply[0] == '4' ? AM_STATUS_DEFERRED
	                                        : AM_STATUS_BOUNCED);
	g_assert_cmpstr(rcpt(d, 0)->reply, ==, c->other_reply);
	g_assert_cmpint(rcpt(d, 0)->status, ==, c->other_status);
	g_assert_cmpint(d->outcome, ==, AM_OUTCOME_DATA_ERROR);
	g_assert_cmpint(d->reply.code, ==, c->code);
	fixture_stop(&f);
}

/*
 * The outcome of the copy as a whole, for the policy table: every fault
 * the library can report, classified as conf.h documents AmOutcome,
 * with "temporary" and the reply that decided it.
 */
typedef struct {
	const char *name;
	const char *script; /* NULL: nothing listens */
	guint n_to;         /* 1 or 2 archive addresses */
	gboolean utf8;
	SmtpTlsLevel tls;
	gboolean auth; /* credentials, plaintext allowed */
	AmOutcome outcome;
	gboolean temporary;
	int code; /* of d->reply; 0: none */
	AmStatus status;
} OutcomeCase;

static const OutcomeCase outcome_cases[] = {
    {"sent", NULL, 1, FALSE, SMTP_TLS_NONE, FALSE, AM_OUTCOME_SENT, FALSE, 250,
     AM_STATUS_SENT},
    {"connect-refused", NULL, 1, FALSE, SMTP_TLS_NONE, FALSE,
     AM_OUTCOME_UNREACHABLE, TRUE, 0, AM_STATUS_DEFERRED},
    /* A 554 greeting is the relay's lasting "no SMTP service here"
     * (RFC 5321 section 3.1): the library calls it permanent (issue
     * 3); a 421 greeting stays temporary. */
    {"greeting-554", "greeting 554 5.3.2 no service", 1, FALSE, SMTP_TLS_NONE,
     FALSE, AM_OUTCOME_UNREACHABLE, FALSE, 554, AM_STATUS_BOUNCED},
    {"greeting-421", "greeting 421 4.3.2 busy", 1, FALSE, SMTP_TLS_NONE, FALSE,
     AM_OUTCOME_UNREACHABLE, TRUE, 421, AM_STATUS_DEFERRED},
    {"ehlo-refused", "on EHLO reply 550 5.7.1 no\non HELO reply 550 5.7.1 no",
     1, FALSE, SMTP_TLS_NONE, FALSE, AM_OUTCOME_UNREACHABLE, FALSE, 550,
     AM_STATUS_BOUNCED},
    {"ehlo-tempfail", "on EHLO reply 451 4.3.0 later\non HELO reply 451 later",
     1, FALSE, SMTP_TLS_NONE, FALSE, AM_OUTCOME_UNREACHABLE, TRUE, 451,
     AM_STATUS_DEFERRED},
    {"tls-not-offered", "", 1, FALSE, SMTP_TLS_ENCRYPT, FALSE,
     AM_OUTCOME_TLS_ERROR, FALSE, 0, AM_STATUS_BOUNCED},
    {"auth-535",
     "ehlo-keywords 8BITMIME AUTH PLAIN\non AUTH reply 535 5.7.8 bad", 1, FALSE,
     SMTP_TLS_NONE, TRUE, AM_OUTCOME_UNREACHABLE, FALSE, 535,
     AM_STATUS_BOUNCED},
    {"auth-454",
     "ehlo-keywords 8BITMIME AUTH PLAIN\non AUTH reply 454 4.7.0 later", 1,
     FALSE, SMTP_TLS_NONE, TRUE, AM_OUTCOME_UNREACHABLE, TRUE, 454,
     AM_STATUS_DEFERRED},
    {"mail-451", "on MAIL reply 451 4.3.0 later", 1, FALSE, SMTP_TLS_NONE,
     FALSE, AM_OUTCOME_SENDER_REFUSED, TRUE, 451, AM_STATUS_DEFERRED},
    {"mail-550", "on MAIL reply 550 5.7.1 go away", 1, FALSE, SMTP_TLS_NONE,
     FALSE, AM_OUTCOME_SENDER_REFUSED, FALSE, 550, AM_STATUS_BOUNCED},
    {"some-rcpt-450", "on RCPT /gone/ reply 450 4.2.1 busy", 2, FALSE,
     SMTP_TLS_NONE, FALSE, AM_OUTCOME_SOME_REFUSED, TRUE, 450,
     AM_STATUS_DEFERRED},
    {"some-rcpt-550", "on RCPT /gone/ reply 550 5.1.1 gone", 2, FALSE,
     SMTP_TLS_NONE, FALSE, AM_OUTCOME_SOME_REFUSED, FALSE, 550,
     AM_STATUS_BOUNCED},
    {"all-rcpt-450", "on RCPT reply 450 4.2.1 busy", 2, FALSE, SMTP_TLS_NONE,
     FALSE, AM_OUTCOME_ALL_REFUSED, TRUE, 450, AM_STATUS_DEFERRED},
    {"all-rcpt-550", "on RCPT reply 550 5.1.1 gone", 2, FALSE, SMTP_TLS_NONE,
     FALSE, AM_OUTCOME_ALL_REFUSED, FALSE, 550, AM_STATUS_BOUNCED},
    /* One 4xx among 5xx refusals: a retry may still save it, and the
     * 4xx is the reply that says so. */
    {"all-rcpt-mixed",
     "on RCPT /gone/ reply 550 5.1.1 gone\non RCPT reply 452 4.5.3 later", 2,
     FALSE, SMTP_TLS_NONE, FALSE, AM_OUTCOME_ALL_REFUSED, TRUE, 452,
     AM_STATUS_DEFERRED},
    {"data-451", "on DATA reply 451 4.3.0 later", 1, FALSE, SMTP_TLS_NONE,
     FALSE, AM_OUTCOME_DATA_ERROR, TRUE, 451, AM_STATUS_DEFERRED},
    {"data-554", "on DATA reply 554 5.3.4 no", 1, FALSE, SMTP_TLS_NONE, FALSE,
     AM_OUTCOME_DATA_ERROR, FALSE, 554, AM_STATUS_BOUNCED},
    {"dot-452", "on DOT reply 452 4.3.1 full", 1, FALSE, SMTP_TLS_NONE, FALSE,
     AM_OUTCOME_DATA_ERROR, TRUE, 452, AM_STATUS_DEFERRED},
    {"dot-554", "on DOT reply 554 5.6.0 bad", 1, FALSE, SMTP_TLS_NONE, FALSE,
     AM_OUTCOME_DATA_ERROR, FALSE, 554, AM_STATUS_BOUNCED},
    {"dot-421", "on DOT reply 421 4.3.2 bye", 1, FALSE, SMTP_TLS_NONE, FALSE,
     AM_OUTCOME_UNREACHABLE, TRUE, 421, AM_STATUS_DEFERRED},
    {"close-mid-data", "on DATA close-in-data", 1, FALSE, SMTP_TLS_NONE, FALSE,
     AM_OUTCOME_UNREACHABLE, TRUE, 0, AM_STATUS_DEFERRED},
    {"stall-after-dot", "on DOT stall", 1, FALSE, SMTP_TLS_NONE, FALSE,
     AM_OUTCOME_TIMEOUT, TRUE, 0, AM_STATUS_DEFERRED},
    {"smtputf8-not-offered", "ehlo-keywords 8BITMIME SIZE 10485760", 1, TRUE,
     SMTP_TLS_NONE, FALSE, AM_OUTCOME_DATA_ERROR, FALSE, 0, AM_STATUS_BOUNCED},
};

static void
test_outcome(gconstpointer data)
{
	const OutcomeCase *c = data;
	const char *to[] = {"journal@archive.example", "gone@archive.example",
	                    NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;

	fixture_start(&f, c->script);
	if (c->script == NULL && c->outcome != AM_OUTCOME_SENT)
		fake_smtp_stop(f.fake);
	f.relay.timeouts = (SmtpTimeouts){500, 500, 500, 500};
	f.relay.tls = c->tls;
	if (c->auth) {
		f.relay.auth_user = (char *)"u@example.org";
		f.relay.auth_password = (char *)"pw";
		f.relay.auth_plaintext = TRUE;
	}
	if (c->n_to == 1)
		to[1] = NULL;
	d = send_copy(&f, to, c->utf8);
	g_test_message("%s: outcome %d, %s, %d (%s)", c->name, d->outcome,
	               d->temporary ? "temporary" : "permanent", d->reply.code,
	               d->reason ? d->reason : "");
	g_assert_cmpint(d->outcome, ==, c->outcome);
	g_assert_cmpint(d->temporary, ==, c->temporary);
	g_assert_cmpint(d->reply.code, ==, c->code);
	g_assert_cmpint(d->status, ==, c->status);
	if (c->code != 0)
		g_assert_nonnull(d->reply.text);
	if (c->outcome == AM_OUTCOME_SOME_REFUSED) {
		g_assert_cmpint(rcpt(d, 0)->status, ==, AM_STATUS_SENT);
		g_assert_cmpint(rcpt(d, 1)->status, !=, AM_STATUS_SENT);
	}
	fixture_stop(&f);
}

/*
 * A protocol error from the relay (a reply that is not SMTP, or out of
 * step) says nothing lasting about the copy: it is deferred and
 * temporary, with a 4.X.X dsn, as Postfix's smtp(8) defers it, never
 * bounced or held.
 */
typedef struct {
	const char *name;
	const char *script;
} ProtocolCase;

static const ProtocolCase protocol_cases[] = {
    {"garbage", "on MAIL raw garbage\\r\\n"},
    {"nul", "on MAIL raw 250 o\\x00k\\r\\n"},
    {"code-150", "on MAIL reply 150 what"},
    {"code-2500", "on RCPT raw 2500 ok\\r\\n"},
    {"code-change", "on MAIL reply 250-fine|550 5.7.1 not fine"},
    {"extra-reply", "on MAIL raw 250 ok\\r\\n250 again\\r\\n"},
    {"data-250", "on DATA reply 250 2.0.0 ok"},
};

static void
test_protocol(gconstpointer data)
{
	const ProtocolCase *c = data;
	const char *to[] = {"journal@archive.example", "gone@archive.example",
	                    NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;
	guint i;

	fixture_start(&f, c->script);
	f.relay.timeouts = (SmtpTimeouts){500, 500, 500, 500};
	d = send_copy(&f, to, FALSE);
	g_test_message("%s: outcome %d, %s, %d (%s)", c->name, d->outcome,
	               d->temporary ? "temporary" : "permanent", d->reply.code,
	               d->reason ? d->reason : "");
	g_assert_cmpint(d->status, ==, AM_STATUS_DEFERRED);
	g_assert_true(d->temporary);
	g_assert_cmpint(d->outcome, ==, AM_OUTCOME_UNREACHABLE);
	for (i = 0; i < 2; i++) {
		g_assert_cmpint(rcpt(d, i)->status, ==, AM_STATUS_DEFERRED);
		g_assert_cmpint(rcpt(d, i)->dsn[0], ==, '4');
	}
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);
	fixture_stop(&f);
}

/* Whether the server received a command starting with @verb. */
static gboolean
got_command(FakeSmtp *fake, const char *verb)
{
	g_autoptr(GPtrArray) cmds = fake_smtp_get_commands(fake);
	guint i;

	for (i = 0; i < cmds->len; i++) {
		if (g_ascii_strncasecmp(cmds->pdata[i], verb, strlen(verb)) ==
		    0)
			return TRUE;
	}
	return FALSE;
}

/* Whether @needle occurs anywhere in what the server received. */
static gboolean
received(FakeSmtp *fake, const char *needle)
{
	g_autoptr(GBytes) bytes = fake_smtp_get_received(fake);
	gsize len;
	const char *data = g_bytes_get_data(bytes, &len);

	return data != NULL &&
	       memmem(data, len, needle, strlen(needle)) != NULL;
}

/*
 * TLS required by the level, not offered by the server (the fake never
 * advertises STARTTLS): the copy fails as a TLS failure (dsn X.7.5,
 * RFC 3463: cryptographic failure) and nothing of the transaction goes
 * out in clear.
 */
static void
test_tls_required(gconstpointer data)
{
	const SmtpTlsLevel level = GPOINTER_TO_INT(data);
	const char *to[] = {"journal@archive.example", NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;

	fixture_start(&f, NULL);
	f.relay.tls = level;
	f.relay.ca_file = (char *)"/nonexistent/archive-milter-test/ca.pem";
	d = send_copy(&f, to, FALSE);
	g_test_message("reply: %s", rcpt(d, 0)->reply);
	g_assert_cmpint(d->status, !=, AM_STATUS_SENT);
	g_assert_true(g_str_has_suffix(rcpt(d, 0)->dsn, ".7.5"));
	g_assert_false(got_command(f.fake, "MAIL"));
	g_assert_false(got_command(f.fake, "DATA"));
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);
	fixture_stop(&f);
}

#define USER   "milter@example.org"
#define SECRET "s3cret-pa55"
/* base64 of "\0" USER "\0" SECRET, and of SECRET alone (AUTH LOGIN) */
#define PLAIN_B64 "AG1pbHRlckBleGFtcGxlLm9yZwBzM2NyZXQtcGE1NQ=="
#define LOGIN_B64 "czNjcmV0LXBhNTU="

/* AUTH on a connection without TLS, not allowed: no credential leaves,
 * and the copy fails as a security policy failure (dsn X.7.0). */
static void
test_auth_no_plaintext(void)
{
	const char *to[] = {"journal@archive.example", NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;

	fixture_start(&f, "ehlo-keywords 8BITMIME SIZE 10485760 AUTH PLAIN "
	                  "LOGIN\non AUTH reply 235 2.7.0 ok\n");
	f.relay.auth_user = (char *)USER;
	f.relay.auth_password = (char *)SECRET;
	f.relay.auth_plaintext = FALSE;
	d = send_copy(&f, to, FALSE);
	g_test_message("reply: %s", rcpt(d, 0)->reply);
	g_assert_cmpint(d->status, !=, AM_STATUS_SENT);
	g_assert_true(g_str_has_suffix(rcpt(d, 0)->dsn, ".7.0"));
	g_assert_null(strstr(rcpt(d, 0)->reply, SECRET));
	g_assert_false(received(f.fake, SECRET));
	g_assert_false(received(f.fake, PLAIN_B64));
	g_assert_false(received(f.fake, LOGIN_B64));
	g_assert_false(got_command(f.fake, "MAIL"));
	fixture_stop(&f);
}

/* auth_plaintext = yes: the configured user and password are sent. */
static void
test_auth_plaintext(void)
{
	const char *to[] = {"journal@archive.example", NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;

	fixture_start(&f, "ehlo-keywords 8BITMIME SIZE 10485760 AUTH PLAIN\n"
	                  "on AUTH reply 235 2.7.0 ok\n");
	f.relay.auth_user = (char *)USER;
	f.relay.auth_password = (char *)SECRET;
	f.relay.auth_plaintext = TRUE;
	d = send_copy(&f, to, FALSE);
	if (d->status != AM_STATUS_SENT &&
	    strstr(rcpt(d, 0)->reply, "not implemented") != NULL) {
		g_test_skip("the library has no AUTH yet");
		fixture_stop(&f);
		return;
	}
	g_assert_cmpint(d->status, ==, AM_STATUS_SENT);
	g_assert_true(got_command(f.fake, "AUTH PLAIN"));
	g_assert_true(received(f.fake, PLAIN_B64));
	fixture_stop(&f);
}

typedef struct {
	const char *name;
	const char *script;
	SmtpTimeouts t;
	guint deadline_ms; /* copy_deadline; 0: none */
	gboolean sent;
	double min_delay, max_delay;
} TimeCase;

/*
 * Each stage limit is the one that applies at its stage: a short limit
 * elsewhere does not cut a slow stage short, and copy_deadline cuts
 * every stage to what is left of it.
 */
static const TimeCase time_cases[] = {
    {"connect", "greeting none", {300, 10000, 10000, 10000}, 0, FALSE, 0.25, 3},
    {"command", "on MAIL stall", {10000, 300, 10000, 10000}, 0, FALSE, 0.25, 3},
    {"final",
     "on DOT delay 1500 250 2.0.0 ok",
     {10000, 10000, 10000, 300},
     0,
     FALSE,
     0.25,
     1.4},
    {"final-not-command",
     "on DOT delay 600 250 2.0.0 ok",
     {5000, 300, 300, 5000},
     0,
     TRUE,
     0.5,
     3},
    {"deadline-greeting",
     "greeting none",
     {10000, 10000, 10000, 10000},
     500,
     FALSE,
     0.4,
     3},
    {"deadline-command",
     "on RCPT stall",
     {10000, 10000, 10000, 10000},
     500,
     FALSE,
     0.4,
     3},
    {"deadline-final",
     "on DOT stall",
     {10000, 10000, 10000, 10000},
     700,
     FALSE,
     0.6,
     3},
    /* Each reply inside its stage limit, four of them past the
     * deadline: the deadline still ends the copy. */
    {"deadline-slow-relay",
     "on MAIL delay 300 250 2.1.0 ok\n"
     "on RCPT delay 300 250 2.1.5 ok\n"
     "on DATA delay 300 354 go on\n"
     "on DOT delay 300 250 2.0.0 ok",
     {10000, 400, 10000, 400},
     700,
     FALSE,
     0.65,
     0.95},
    {"deadline-not-reached",
     "on DOT delay 300 250 2.0.0 ok",
     {10000, 10000, 10000, 10000},
     5000,
     TRUE,
     0.25,
     3},
};

static void
test_time(gconstpointer data)
{
	const TimeCase *c = data;
	const char *to[] = {"journal@archive.example", NULL};
	Fixture f = {0};
	g_autoptr(AmDelivery) d = NULL;

	fixture_start(&f, c->script);
	f.relay.timeouts = c->t;
	f.relay.copy_deadline_ms = c->deadline_ms;
	d = send_copy(&f, to, FALSE);
	g_test_message("%s: %s after %.3f s", c->name, rcpt(d, 0)->reply,
	               d->delay);
	g_assert_cmpint(d->status == AM_STATUS_SENT, ==, c->sent);
	if (!c->sent) {
		g_assert_cmpint(d->status, ==, AM_STATUS_DEFERRED);
		g_assert_cmpint(d->outcome, ==, AM_OUTCOME_TIMEOUT);
		g_assert_true(d->temporary);
	}
	g_assert_cmpfloat(d->delay, >=, c->min_delay);
	g_assert_cmpfloat(d->delay, <, c->max_delay);
	fixture_stop(&f);
}

/*
 * The caller's deadline (the message's, shared by its synchronous
 * copies) cuts a copy whose own copy_deadline is longer; a copy that
 * starts with none left is a time-out at once, with no connection.
 */
static void
test_request_deadline(void)
{
	const char *to[] = {"journal@archive.example", NULL};
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	AmCopyRequest req = {.from = "", .to = to, .msg = msg};
	Fixture f = {0};
	AmDelivery *d;

	fixture_start(&f, "on RCPT stall");
	f.relay.timeouts = (SmtpTimeouts){10000, 10000, 10000, 10000};
	f.relay.copy_deadline_ms = 10000;
	req.relay = &f.relay;
	smtp_message_append_data(msg, "Subject: t\r\n\r\nbody\r\n", 20);

	req.deadline = g_get_monotonic_time() + 500 * 1000;
	d = am_deliver(NULL, &req);
	g_assert_cmpint(d->outcome, ==, AM_OUTCOME_TIMEOUT);
	g_assert_true(d->temporary);
	g_assert_cmpfloat(d->delay, >=, 0.45);
	g_assert_cmpfloat(d->delay, <, 2);
	am_delivery_free(d);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);

	req.deadline = g_get_monotonic_time() - 1;
	d = am_deliver(NULL, &req);
	g_assert_cmpint(d->outcome, ==, AM_OUTCOME_TIMEOUT);
	g_assert_cmpint(d->status, ==, AM_STATUS_DEFERRED);
	g_assert_true(d->temporary);
	g_assert_cmpstr(d->relay, ==, "none");
	g_assert_cmpfloat(d->delay, <, 0.5);
	am_delivery_free(d);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	fixture_stop(&f);
}

/* ------------------------------------------------------------------ */
/* Batches                                                              */
/* ------------------------------------------------------------------ */

#define PIPE_KEYWORDS                                                          \
	"ehlo-keywords PIPELINING 8BITMIME SIZE 10485760 SMTPUTF8 DSN "        \
	"ENHANCEDSTATUSCODES\n"

/* Three copies, from first@, second@ and third@, with bodies "one",
 * "two" and "three", the second to two addresses, so that a script
 * can pick any of them. */
static const char *const batch_from[] = {
    "first@example.org", "second@example.org", "third@example.org"};
static const char *const batch_body[] = {"Subject: 1\r\n\r\none\r\n",
                                         "Subject: 2\r\n\r\ntwo\r\n",
                                         "Subject: 3\r\n\r\nthree\r\n"};
static const char *const batch_to0[] = {"a1@archive.example", NULL};
static const char *const batch_to1[] = {"a2@archive.example",
                                        "b2@archive.example", NULL};
static const char *const batch_to2[] = {"a3@archive.example", NULL};
static const char *const *const batch_to[] = {batch_to0, batch_to1, batch_to2};

/* @n (up to 3) copies to @relay, as a batch or one am_deliver() each,
 * through a pool; (transfer full) their outcomes. */
static GPtrArray *
send_copies(const AmRelay *relay, guint n, gboolean batch)
{
	AmPool *pool = am_pool_new(4, 10000);
	AmCopyRequest reqs[3];
	GPtrArray *out;

	g_assert_cmpuint(n, <=, 3);
	for (guint i = 0; i < n; i++) {
		reqs[i] = (AmCopyRequest){.relay = relay,
		                          .from = batch_from[i],
		                          .to = batch_to[i],
		                          .eightbit = TRUE};
		reqs[i].msg = smtp_message_new(SMTP_MESSAGE_BYTES);
		smtp_message_append_data(reqs[i].msg, batch_body[i],
		                         strlen(batch_body[i]));
	}
	if (batch) {
		out = am_deliver_batch(pool, reqs, n);
	} else {
		out = g_ptr_array_new_with_free_func(
		    (GDestroyNotify)am_delivery_free);
		for (guint i = 0; i < n; i++)
			g_ptr_array_add(out, am_deliver(pool, &reqs[i]));
	}
	am_pool_free(pool);
	for (guint i = 0; i < n; i++)
		smtp_message_free(reqs[i].msg);
	g_assert_nonnull(out);
	g_assert_cmpuint(out->len, ==, n);
	return out;
}

/* @s with the fake server's port (which differs between two runs)
 * written as "PORT". */
static char *
without_port(const char *s, guint16 port)
{
	g_autofree char *p = g_strdup_printf("%u", port);
	g_auto(GStrv) parts = g_strsplit(s != NULL ? s : "(null)", p, -1);

	return g_strjoinv("PORT", parts);
}

static void
assert_same_text(const char *a, guint16 port_a, const char *b, guint16 port_b)
{
	g_autofree char *x = without_port(a, port_a);
	g_autofree char *y = without_port(b, port_b);

	g_assert_cmpstr(x, ==, y);
}

/* Everything of an outcome but its delay. */
static void
assert_same_delivery(const AmDelivery *a, guint16 port_a, const AmDelivery *b,
                     guint16 port_b)
{
	g_assert_cmpint(a->status, ==, b->status);
	g_assert_cmpint(a->outcome, ==, b->outcome);
	g_assert_cmpint(a->temporary, ==, b->temporary);
	g_assert_cmpint(a->reply.code, ==, b->reply.code);
	assert_same_text(a->reply.text, port_a, b->reply.text, port_b);
	assert_same_text(a->reason, port_a, b->reason, port_b);
	assert_same_text(a->relay, port_a, b->relay, port_b);
	g_assert_cmpuint(a->rcpts->len, ==, b->rcpts->len);
	for (guint i = 0; i < a->rcpts->len; i++) {
		const AmRcptOutcome *x = a->rcpts->pdata[i];
		const AmRcptOutcome *y = b->rcpts->pdata[i];

		g_assert_cmpstr(x->address, ==, y->address);
		g_assert_cmpint(x->status, ==, y->status);
		g_assert_cmpstr(x->dsn, ==, y->dsn);
		assert_same_text(x->reply, port_a, y->reply, port_b);
	}
}

typedef struct {
	const char *name;
	const char *script; /* after PIPE_KEYWORDS; NULL: nothing listens */
	AmStatus status[3]; /* of each copy */
} BatchCase;

static const BatchCase batch_cases[] = {
    {"sent", "", {AM_STATUS_SENT, AM_STATUS_SENT, AM_STATUS_SENT}},
    {"dot-554-second",
     "on DOT /two/ reply 554 5.6.0 refused",
     {AM_STATUS_SENT, AM_STATUS_BOUNCED, AM_STATUS_SENT}},
    {"dot-451-second",
     "on DOT /two/ reply 451 4.3.0 later",
     {AM_STATUS_SENT, AM_STATUS_DEFERRED, AM_STATUS_SENT}},
    {"rcpt-550-second",
     "on RCPT /b2@/ reply 550 5.1.1 no such user",
     {AM_STATUS_SENT, AM_STATUS_BOUNCED, AM_STATUS_SENT}},
    {"mail-553-second",
     "on MAIL /second@/ reply 553 5.1.8 bad sender",
     {AM_STATUS_SENT, AM_STATUS_BOUNCED, AM_STATUS_SENT}},
    {"data-451-first",
     "on DATA#1 reply 451 4.3.0 later",
     {AM_STATUS_DEFERRED, AM_STATUS_SENT, AM_STATUS_SENT}},
    {"closed-after-second",
     "on DOT /two/ close",
     {AM_STATUS_SENT, AM_STATUS_DEFERRED, AM_STATUS_SENT}},
    {"nothing-listens",
     NULL,
     {AM_STATUS_DEFERRED, AM_STATUS_DEFERRED, AM_STATUS_DEFERRED}},
};

/*
 * Three copies as one batch end exactly as the same three sent one by
 * one with am_deliver() against the same script (but for the delay),
 * each as the case expects: a refusal, a lost connection or a failed
 * connect is never pinned on another copy, and both ways need as many
 * connections.
 */
static void
test_batch_same_as_alone(gconstpointer data)
{
	const BatchCase *c = data;
	g_autofree char *script =
	    g_strconcat(PIPE_KEYWORDS, c->script ? c->script : "", NULL);
	g_autoptr(GPtrArray) alone = NULL;
	g_autoptr(GPtrArray) batch = NULL;
	Fixture a = {0}, b = {0};

	fixture_start(&a, script);
	fixture_start(&b, script);
	if (c->script == NULL) {
		fake_smtp_stop(a.fake);
		fake_smtp_stop(b.fake);
	}
	alone = send_copies(&a.relay, 3, FALSE);
	batch = send_copies(&b.relay, 3, TRUE);
	for (guint i = 0; i < 3; i++) {
		const AmDelivery *d = batch->pdata[i];

		g_test_message("copy %u: %s", i,
		               d->reason ? d->reason : "sent");
		g_assert_cmpint(d->status, ==, c->status[i]);
		assert_same_delivery(alone->pdata[i], a.relay.port, d,
		                     b.relay.port);
	}
	g_assert_cmpuint(fake_smtp_get_connections(b.fake), ==,
	                 fake_smtp_get_connections(a.fake));
	g_assert_cmpuint(fake_smtp_get_message_count(b.fake), ==,
	                 fake_smtp_get_message_count(a.fake));
	fixture_stop(&a);
	fixture_stop(&b);
}

/*
 * Each copy of a batch has its own copy_deadline, counted from the end
 * of the copy before, and its own delay: the second copy, whose end
 * the relay answers too late, is a time-out; the third, on a new
 * connection, goes within its own limit, and the first and third take
 * about 0.4 s each, not the batch's time.
 */
static void
test_batch_deadline(void)
{
	Fixture f = {0};
	g_autoptr(GPtrArray) d = NULL;
	const AmDelivery *x;

	fixture_start(&f, PIPE_KEYWORDS "on DOT /two/ delay 1500 250 2.0.0 ok\n"
	                                "on DOT delay 400 250 2.0.0 ok");
	f.relay.copy_deadline_ms = 700;
	d = send_copies(&f.relay, 3, TRUE);
	for (guint i = 0; i < 3; i++) {
		x = d->pdata[i];
		g_test_message("copy %u: %s after %.3f s", i,
		               x->reason ? x->reason : "sent", x->delay);
		if (i == 1) {
			g_assert_cmpint(x->outcome, ==, AM_OUTCOME_TIMEOUT);
			g_assert_cmpfloat(x->delay, >=, 0.6);
			g_assert_cmpfloat(x->delay, <, 1.2);
			continue;
		}
		g_assert_cmpint(x->status, ==, AM_STATUS_SENT);
		g_assert_cmpfloat(x->delay, >=, 0.35);
		g_assert_cmpfloat(x->delay, <, 0.7);
	}
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	fixture_stop(&f);
}

int
main(int argc, char **argv)
{
	gsize i;

	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/deliver/sent", test_sent);
	g_test_add_func("/plugin/deliver/partial", test_partial);
	for (i = 0; i < G_N_ELEMENTS(outcome_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/plugin/deliver/outcome/%s", outcome_cases[i].name);

		g_test_add_data_func(path, &outcome_cases[i], test_outcome);
	}
	for (i = 0; i < G_N_ELEMENTS(later_cases); i++) {
		g_autofree char *path =
		    g_strdup_printf("/plugin/deliver/refused-then-failed/%s",
		                    later_cases[i].name);

		g_test_add_data_func(path, &later_cases[i],
		                     test_refused_then_failed);
	}
	for (i = 0; i < G_N_ELEMENTS(protocol_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/plugin/deliver/protocol/%s", protocol_cases[i].name);

		g_test_add_data_func(path, &protocol_cases[i], test_protocol);
	}
	for (i = 0; i < G_N_ELEMENTS(fail_cases); i++) {
		g_autofree char *path =
		    g_strdup_printf("/plugin/deliver/fail/%zu", i);

		g_test_add_data_func(path, &fail_cases[i], test_fail);
	}
	g_test_add_data_func("/plugin/deliver/tls/encrypt-not-offered",
	                     GINT_TO_POINTER(SMTP_TLS_ENCRYPT),
	                     test_tls_required);
	g_test_add_data_func("/plugin/deliver/tls/verify-not-offered",
	                     GINT_TO_POINTER(SMTP_TLS_VERIFY),
	                     test_tls_required);
	g_test_add_func("/plugin/deliver/auth/no-plaintext",
	                test_auth_no_plaintext);
	g_test_add_func("/plugin/deliver/auth/plaintext-allowed",
	                test_auth_plaintext);
	for (i = 0; i < G_N_ELEMENTS(time_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/plugin/deliver/time/%s", time_cases[i].name);

		g_test_add_data_func(path, &time_cases[i], test_time);
	}
	g_test_add_func("/plugin/deliver/time/request-deadline",
	                test_request_deadline);
	for (i = 0; i < G_N_ELEMENTS(batch_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/plugin/deliver/batch/%s", batch_cases[i].name);

		g_test_add_data_func(path, &batch_cases[i],
		                     test_batch_same_as_alone);
	}
	g_test_add_func("/plugin/deliver/batch/deadline", test_batch_deadline);
	return g_test_run();
}
