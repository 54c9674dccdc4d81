/*
 * test-sendmail.c - every outcome of smtp_client_sendmail() against the
 * scripted fake SMTP server
 *
 * Each test gets a fresh fake server (its script is the test's data)
 * and a client with short time limits, so a bug shows as a failure
 * within seconds rather than a hung suite.  Assertions look at what
 * the server received: commands, MAIL and RCPT arguments, and the DATA
 * payload byte for byte.
 */
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "test-common.h"

#define FROM "sender@example.org"

/* CaseHeads of the tests that are not in a table, freed at exit. */
static GPtrArray *plain_cases;

static void
fixture_set_up(Fixture *f, gconstpointer data)
{
	const CaseHead *head = data;
	SmtpTimeouts t = {5000, 5000, 5000, 5000};

	fixture_start(f, head->script, &t);
}

/* Send @body (BYTES) to the NULL-terminated @rcpts. */
static SmtpResult *
send_body(Fixture *f, const char *from, const char *const *rcpts,
          const char *body, const char *const *mail_opts,
          const char *const *rcpt_opts, GError **error)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);

	smtp_message_append_data(msg, body, strlen(body));
	return smtp_client_sendmail(f->client, from, rcpts, msg, mail_opts,
	                            rcpt_opts, error);
}

static SmtpResult *
send_simple(Fixture *f, GError **error)
{
	static const char *const rcpts[] = {"rcpt@example.com", NULL};

	return send_body(f, FROM, rcpts, "Subject: x\r\n\r\nhi\r\n", NULL, NULL,
	                 error);
}

/* The commands as one string, "|"-separated, for exact comparisons. */
static char *
joined_commands(Fixture *f)
{
	g_autoptr(GPtrArray) cmds = fake_smtp_get_commands(f->fake);

	g_ptr_array_add(cmds, NULL);
	return g_strjoinv("|", (char **)cmds->pdata);
}

static void
assert_reply(const SmtpReply *r, int code, const char *enhanced,
             const char *text)
{
	g_assert_nonnull(r);
	g_assert_cmpint(r->code, ==, code);
	g_assert_cmpstr(r->enhanced, ==, enhanced);
	g_assert_cmpstr(r->text, ==, text);
}

/* ------------------------------------------------------------------ */
/* Success                                                              */
/* ------------------------------------------------------------------ */

static void
test_all_accepted(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@example.com", "b@example.com",
	                                    NULL};
	static const char body[] = "Subject: t\r\n\r\nhello\n.dot\nend";
	static const char wire[] =
	    "Subject: t\r\n\r\nhello\r\n..dot\r\nend\r\n.\r\n";
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *peer = NULL, *mail = NULL;
	const FakeSmtpMessage *m;
	const char *param = NULL;
	gsize len;
	const void *p;

	(void)data;
	res = send_body(f, FROM, rcpts, body, NULL, NULL, &error);
	g_assert_no_error(error);
	g_assert_nonnull(res);
	g_assert_cmpuint(res->refused->len, ==, 0);
	g_assert_cmpuint(res->dropped_options->len, ==, 0);
	g_assert_cmpint(res->reply.code, ==, 250);
	g_assert_cmpstr(res->reply.enhanced, ==, "2.0.0");

	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	m = fake_smtp_get_message(f->fake, 0);
	/* SIZE is what went out before the end marker: CRLF line
	 * ends, the doubled dot, the closing CRLF. */
	mail = g_strdup_printf("FROM:<" FROM "> SIZE=%zu", sizeof(wire) - 4);
	g_assert_cmpstr(m->mail_from, ==, mail);
	g_assert_cmpuint(m->rcpt_to->len, ==, 2);
	g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 0), ==,
	                "TO:<a@example.com>");
	g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 1), ==,
	                "TO:<b@example.com>");
	p = g_bytes_get_data(m->wire, &len);
	g_assert_cmpmem(p, len, wire, sizeof(wire) - 1);
	g_assert_cmpstr(count_commands(f, "EHLO client.example") ? "y" : "n",
	                ==, "y");

	/* Session facts the milter logs and decides on. */
	peer = g_strdup_printf("127.0.0.1[127.0.0.1]:%u", f->port);
	g_assert_cmpstr(smtp_client_get_peer(f->client), ==, peer);
	g_assert_true(smtp_client_is_connected(f->client));
	g_assert_true(smtp_client_has_extension(f->client, "size", &param));
	g_assert_cmpstr(param, ==, "10485760");
	g_assert_true(smtp_client_has_extension(f->client, "DSN", &param));
	g_assert_cmpstr(param, ==, "");
	g_assert_false(smtp_client_has_extension(f->client, "CHUNKING", NULL));
}

static void
test_empty_message(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@example.com", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const FakeSmtpMessage *m;

	(void)data;
	res = send_body(f, "", rcpts, "", NULL, NULL, &error);
	g_assert_no_error(error);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	m = fake_smtp_get_message(f->fake, 0);
	g_assert_cmpstr(m->mail_from, ==, "FROM:<> SIZE=0");
	g_assert_cmpmem(g_bytes_get_data(m->wire, NULL),
	                g_bytes_get_size(m->wire), ".\r\n", 3);
}

static void
test_some_refused(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"good@x.example", "bad@x.example",
	                                    "good2@x.example", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const SmtpRefusal *r;

	(void)data;
	res = send_body(f, FROM, rcpts, "hi\r\n", NULL, NULL, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(res->refused->len, ==, 1);
	r = g_ptr_array_index(res->refused, 0);
	g_assert_cmpstr(r->recipient, ==, "bad@x.example");
	assert_reply(&r->reply, 550, "5.1.1", "no such user\nreally");
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	g_assert_cmpuint(fake_smtp_get_message(f->fake, 0)->rcpt_to->len, ==,
	                 2);
}

/* ------------------------------------------------------------------ */
/* Refusals: the error, its reply, RSET, and the connection reusable    */
/* ------------------------------------------------------------------ */

static void
test_all_refused(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", "b@x.example", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(GError) copy = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const GPtrArray *refused;

	(void)data;
	res = send_body(f, FROM, rcpts, "hi\r\n", NULL, NULL, &error);
	g_assert_null(res);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_RECIPIENTS_REFUSED);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "rcpt");
	refused = smtp_error_get_refused(error);
	g_assert_nonnull(refused);
	g_assert_cmpuint(refused->len, ==, 2);
	g_assert_cmpstr(((SmtpRefusal *)refused->pdata[0])->recipient, ==,
	                "a@x.example");
	assert_reply(&((SmtpRefusal *)refused->pdata[0])->reply, 450, "4.2.0",
	             "busy");
	assert_reply(&((SmtpRefusal *)refused->pdata[1])->reply, 550, "5.1.1",
	             "unknown");
	/* One 4xx among them: worth a retry. */
	g_assert_true(smtp_error_is_temporary(error));

	/* The extra data survives a copy. */
	copy = g_error_copy(error);
	g_assert_cmpuint(smtp_error_get_refused(copy)->len, ==, 2);
	g_assert_cmpint(smtp_error_get_reply(copy)->code, ==, 550);

	g_assert_cmpuint(count_commands(f, "DATA"), ==, 0);
	g_assert_cmpuint(count_commands(f, "RSET"), ==, 1);
	g_assert_true(smtp_client_is_connected(f->client));
}

typedef struct {
	const char *name;
	const char *script;
	SmtpErrorCode code;
	const char *stage;
	int reply_code; /* -1: do not check */
	gboolean temporary;
	gboolean connected; /* still connected after the error */
	gboolean rset;      /* an RSET follows the error */
} FailCase;

static const FailCase fail_cases[] = {
    {"sender-refused", "on MAIL reply 553 5.7.1 sender rejected",
     SMTP_ERROR_SENDER_REFUSED, "mail", 553, FALSE, TRUE, TRUE},
    {"sender-refused-temp", "on MAIL reply 451 4.3.0 try later",
     SMTP_ERROR_SENDER_REFUSED, "mail", 451, TRUE, TRUE, TRUE},
    {"all-refused-perm", "on RCPT reply 550 5.1.1 unknown",
     SMTP_ERROR_RECIPIENTS_REFUSED, "rcpt", 550, FALSE, TRUE, TRUE},
    {"data-refused", "on DATA reply 554 5.5.1 no thanks", SMTP_ERROR_DATA,
     "data", 554, FALSE, TRUE, TRUE},
    /* A 250 to DATA, a 354 to RCPT or MAIL or to the end of data: the
     * server out of step, PROTOCOL (temporary), closed without RSET. */
    {"data-not-354", "on DATA reply 250 2.0.0 what", SMTP_ERROR_PROTOCOL,
     "data", 250, TRUE, FALSE, FALSE},
    {"rcpt-not-2xx-or-refusal", "on RCPT reply 354 go ahead",
     SMTP_ERROR_PROTOCOL, "rcpt", 354, TRUE, FALSE, FALSE},
    {"mail-354", "on MAIL reply 354 go ahead", SMTP_ERROR_PROTOCOL, "mail", 354,
     TRUE, FALSE, FALSE},
    {"dot-354", "on DOT reply 354 go ahead", SMTP_ERROR_PROTOCOL, "end-of-data",
     354, TRUE, FALSE, FALSE},
    {"dot-refused", "on DOT reply 552 5.3.4 too big", SMTP_ERROR_DATA,
     "end-of-data", 552, FALSE, TRUE, TRUE},
    {"dot-refused-temp", "on DOT reply 451 4.3.0 queue full", SMTP_ERROR_DATA,
     "end-of-data", 451, TRUE, TRUE, TRUE},
    {"helo-error",
     "on EHLO reply 502 5.5.2 no\non HELO reply 504 5.5.2 bad name",
     SMTP_ERROR_HELO, "helo", 504, FALSE, FALSE, FALSE},
    /* RFC 5321 section 3.1: no service here, and no use retrying. */
    {"greeting-554", "greeting 554 5.7.1 go away", SMTP_ERROR_CONNECT,
     "greeting", 554, FALSE, FALSE, FALSE},
    {"greeting-450", "greeting 450 4.3.2 busy", SMTP_ERROR_CONNECT, "greeting",
     450, TRUE, FALSE, FALSE},
    {"421-greeting", "greeting 421 4.3.2 not now", SMTP_ERROR_DISCONNECTED,
     "greeting", 421, TRUE, FALSE, FALSE},
    {"421-ehlo", "on EHLO reply 421 4.3.2 bye", SMTP_ERROR_DISCONNECTED, "ehlo",
     421, TRUE, FALSE, FALSE},
    {"421-mail", "on MAIL reply 421 4.3.2 bye", SMTP_ERROR_DISCONNECTED, "mail",
     421, TRUE, FALSE, FALSE},
    {"421-rcpt", "on RCPT reply 421 4.3.2 bye", SMTP_ERROR_DISCONNECTED, "rcpt",
     421, TRUE, FALSE, FALSE},
    {"421-data", "on DATA reply 421 4.3.2 bye", SMTP_ERROR_DISCONNECTED, "data",
     421, TRUE, FALSE, FALSE},
    {"421-dot", "on DOT reply 421 4.3.2 bye", SMTP_ERROR_DISCONNECTED,
     "end-of-data", 421, TRUE, FALSE, FALSE},
    /* A 421 that cuts a multi-line reply short is still a 421. */
    {"421-inside-ehlo-reply",
     "on EHLO raw 250-fakesmtp\\r\\n250-SIZE 1000\\r\\n421 4.4.2 closing\\r\\n",
     SMTP_ERROR_DISCONNECTED, "ehlo", 421, TRUE, FALSE, FALSE},
    {"421-inside-rcpt-reply", "on RCPT raw 250-ok\\r\\n421 4.3.2 bye\\r\\n",
     SMTP_ERROR_DISCONNECTED, "rcpt", 421, TRUE, FALSE, FALSE},
    {"close-at-ehlo", "on EHLO close", SMTP_ERROR_DISCONNECTED, "ehlo", 0, TRUE,
     FALSE, FALSE},
    {"close-after-rcpt", "on DATA close", SMTP_ERROR_DISCONNECTED, "data", 0,
     TRUE, FALSE, FALSE},
    {"close-at-rcpt", "on RCPT close", SMTP_ERROR_DISCONNECTED, "rcpt", 0, TRUE,
     FALSE, FALSE},
    {"close-at-dot", "on DOT close", SMTP_ERROR_DISCONNECTED, "end-of-data", 0,
     TRUE, FALSE, FALSE},
    {"garbage", "on MAIL raw hello there\\r\\n", SMTP_ERROR_PROTOCOL, "mail", 0,
     TRUE, FALSE, FALSE},
    {"garbage-in-multiline", "on RCPT raw 250-ok\\r\\n999 x\\r\\n",
     SMTP_ERROR_PROTOCOL, "rcpt", 0, TRUE, FALSE, FALSE},
    /* Replies sent ahead of their commands: a forged "250 queued"
     * behind the 354 must never pass for the end-of-data reply. */
    {"reply-ahead-of-dot",
     "on DATA raw 354 go\\r\\n250 2.0.0 Ok: queued as FORGED\\r\\n\n"
     "on DOT stall",
     SMTP_ERROR_PROTOCOL, "message", 0, TRUE, FALSE, FALSE},
    {"reply-ahead-of-dot-pipelined",
     "ehlo-keywords PIPELINING 8BITMIME SIZE 10485760\n"
     "on DATA raw 354 go\\r\\n250 2.0.0 Ok: queued as FORGED\\r\\n\n"
     "on DOT stall",
     SMTP_ERROR_PROTOCOL, "message", 0, TRUE, FALSE, FALSE},
    {"replies-ahead-of-rcpt",
     "on MAIL raw 250 ok\\r\\n250 ok\\r\\n354 go\\r\\n250 queued\\r\\n\n"
     "on RCPT stall",
     SMTP_ERROR_PROTOCOL, "rcpt", 0, TRUE, FALSE, FALSE},
    {"rset-refused",
     "on MAIL reply 550 5.7.1 no\non RSET reply 502 5.5.1 no RSET",
     SMTP_ERROR_SENDER_REFUSED, "mail", 550, FALSE, FALSE, TRUE},
};

static void
test_fail_case(Fixture *f, gconstpointer data)
{
	const FailCase *c = data;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;

	res = send_simple(f, &error);
	g_assert_null(res);
	g_assert_error(error, SMTP_ERROR, (int)c->code);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, c->stage);
	if (c->reply_code >= 0)
		g_assert_cmpint(smtp_error_get_reply(error)->code, ==,
		                c->reply_code);
	g_assert_cmpint(smtp_error_is_temporary(error), ==, c->temporary);
	g_assert_cmpint(smtp_client_is_connected(f->client), ==, c->connected);
	if (c->code == SMTP_ERROR_DISCONNECTED && c->reply_code == 421)
		g_assert_nonnull(strstr(error->message, c->stage));
	g_assert_cmpuint(count_commands(f, "RSET"), ==, c->rset ? 1 : 0);
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 0);
	g_assert_nonnull(smtp_error_get_dropped_options(error));
	if (c->code != SMTP_ERROR_RECIPIENTS_REFUSED)
		g_assert_null(smtp_error_get_refused(error));
}

/* After a refusal and RSET, the same connection carries a message. */
static void
test_rset_reuse(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *cmds = NULL;

	(void)data;
	res =
	    send_body(f, "first@x.example", rcpts, "1\r\n", NULL, NULL, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_SENDER_REFUSED);
	g_clear_error(&error);
	res = send_body(f, "second@x.example", rcpts, "2\r\n", NULL, NULL,
	                &error);
	g_assert_no_error(error);
	g_assert_nonnull(res);
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 1);
	cmds = joined_commands(f);
	g_assert_cmpstr(cmds, ==,
	                "EHLO client.example|"
	                "MAIL FROM:<first@x.example> SIZE=3|RSET|"
	                "MAIL FROM:<second@x.example> SIZE=3|"
	                "RCPT TO:<a@x.example>|DATA");
}

/* After a 421 the next call connects again and succeeds. */
static void
test_reconnect_after_421(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;

	(void)data;
	res =
	    send_body(f, "first@x.example", rcpts, "1\r\n", NULL, NULL, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_DISCONNECTED);
	assert_reply(smtp_error_get_reply(error), 421, "4.3.2", "bye");
	g_assert_false(smtp_client_is_connected(f->client));
	g_clear_error(&error);
	res = send_body(f, "second@x.example", rcpts, "2\r\n", NULL, NULL,
	                &error);
	g_assert_no_error(error);
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 2);
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 1);
}

/* ------------------------------------------------------------------ */
/* EHLO, HELO and options                                               */
/* ------------------------------------------------------------------ */

static void
test_helo_fallback(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	static const char *const mopts[] = {"BODY=8BITMIME", NULL};
	static const char *const ropts[] = {"NOTIFY=NEVER", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *cmds = NULL;

	(void)data;
	res = send_body(f, FROM, rcpts, "hi\r\n", mopts, ropts, &error);
	g_assert_no_error(error);
	cmds = joined_commands(f);
	g_assert_cmpstr(cmds, ==,
	                "EHLO client.example|HELO client.example|"
	                "MAIL FROM:<" FROM ">|RCPT TO:<a@x.example>|DATA");
	g_assert_cmpuint(res->dropped_options->len, ==, 2);
	g_assert_cmpstr(res->dropped_options->pdata[0], ==, "BODY=8BITMIME");
	g_assert_cmpstr(res->dropped_options->pdata[1], ==, "NOTIFY=NEVER");
	g_assert_false(smtp_client_has_extension(f->client, "SIZE", NULL));
}

/* After HELO, SMTPUTF8 cannot be had: NOT_SUPPORTED, no MAIL. */
static void
test_helo_smtputf8(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	static const char *const mopts[] = {"SMTPUTF8", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;

	(void)data;
	res = send_body(f, FROM, rcpts, "hi\r\n", mopts, NULL, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_NOT_SUPPORTED);
	g_assert_cmpuint(count_commands(f, "MAIL"), ==, 0);
}

typedef struct {
	const char *name;
	const char *script;
	const char *mail_options[6];
	const char *rcpt_options[4];
	const char *mail;    /* MAIL argument expected */
	const char *rcpt;    /* RCPT argument expected */
	const char *dropped; /* "|"-joined */
} OptionCase;

static const OptionCase option_cases[] = {
    {"size-advertised",
     NULL,
     {NULL},
     {NULL},
     "FROM:<" FROM "> SIZE=4",
     "TO:<a@x.example>",
     ""},
    {"size-not-advertised",
     "ehlo-keywords 8BITMIME",
     {NULL},
     {NULL},
     "FROM:<" FROM ">",
     "TO:<a@x.example>",
     ""},
    {"all-sent",
     "ehlo-keywords SIZE DSN 8BITMIME XFOO",
     {"RET=HDRS", "ENVID=abc", "BODY=8BITMIME", "XFOO=1", NULL},
     {"NOTIFY=NEVER", "ORCPT=rfc822;a@x.example", NULL},
     "FROM:<" FROM "> SIZE=4 RET=HDRS ENVID=abc BODY=8BITMIME XFOO=1",
     "TO:<a@x.example> NOTIFY=NEVER ORCPT=rfc822;a@x.example",
     ""},
    {"none-advertised",
     "ehlo-keywords SIZE 1000000",
     {"RET=HDRS", "ENVID=abc", "BODY=8BITMIME", "XFOO=1", NULL},
     {"NOTIFY=NEVER", "ORCPT=rfc822;a@x.example", NULL},
     "FROM:<" FROM "> SIZE=4",
     "TO:<a@x.example>",
     "RET=HDRS|ENVID=abc|BODY=8BITMIME|XFOO=1|NOTIFY=NEVER|"
     "ORCPT=rfc822;a@x.example"},
    {"keyword-case",
     "ehlo-keywords dsn",
     {"ret=FULL", NULL},
     {NULL},
     "FROM:<" FROM "> ret=FULL",
     "TO:<a@x.example>",
     ""},
    {"caller-size-dropped",
     NULL,
     {"SIZE=1", NULL},
     {NULL},
     "FROM:<" FROM "> SIZE=4",
     "TO:<a@x.example>",
     "SIZE=1"},
    {"smtputf8-advertised",
     NULL,
     {"SMTPUTF8", NULL},
     {NULL},
     "FROM:<" FROM "> SIZE=4 SMTPUTF8",
     "TO:<a@x.example>",
     ""},
};

static void
test_option_case(Fixture *f, gconstpointer data)
{
	const OptionCase *c = data;
	static const char *const rcpts[] = {"a@x.example", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *dropped = NULL;
	const FakeSmtpMessage *m;

	res = send_body(f, FROM, rcpts, "hi\r\n", c->mail_options,
	                c->rcpt_options, &error);
	g_assert_no_error(error);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	m = fake_smtp_get_message(f->fake, 0);
	g_assert_cmpstr(m->mail_from, ==, c->mail);
	g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 0), ==, c->rcpt);
	g_ptr_array_add(res->dropped_options, NULL);
	dropped = g_strjoinv("|", (char **)res->dropped_options->pdata);
	g_assert_cmpstr(dropped, ==, c->dropped);
}

/* Dropped options are listed with an error too. */
static void
test_dropped_on_error(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	static const char *const mopts[] = {"RET=HDRS", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const GPtrArray *dropped;

	(void)data;
	res = send_body(f, FROM, rcpts, "hi\r\n", mopts, NULL, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_SENDER_REFUSED);
	dropped = smtp_error_get_dropped_options(error);
	g_assert_cmpuint(dropped->len, ==, 1);
	g_assert_cmpstr(dropped->pdata[0], ==, "RET=HDRS");
}

static void
test_smtputf8_unadvertised(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"j\xc3\xb6@x.example", NULL};
	static const char *const mopts[] = {"SMTPUTF8", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *cmds = NULL;

	(void)data;
	res = send_body(f, FROM, rcpts, "hi\r\n", mopts, NULL, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_NOT_SUPPORTED);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "mail");
	g_assert_false(smtp_error_is_temporary(error));
	cmds = joined_commands(f);
	g_assert_cmpstr(cmds, ==, "EHLO client.example");
	g_assert_true(smtp_client_is_connected(f->client));
}

static void
test_smtputf8_address(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"\xc3\xbc@x.example", NULL};
	static const char *const mopts[] = {"SMTPUTF8", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const FakeSmtpMessage *m;

	(void)data;
	res = send_body(f, "j\xc3\xb6s\xc3\xa9@ex\xc3\xa4mple.org", rcpts,
	                "hi\r\n", mopts, NULL, &error);
	g_assert_no_error(error);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	m = fake_smtp_get_message(f->fake, 0);
	g_assert_cmpstr(m->mail_from, ==,
	                "FROM:<j\xc3\xb6s\xc3\xa9@ex\xc3\xa4mple.org> SIZE=4 "
	                "SMTPUTF8");
	g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 0), ==,
	                "TO:<\xc3\xbc@x.example>");
}

/* ------------------------------------------------------------------ */
/* Bad input: an error before anything is sent                          */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *name;
	const char *script; /* always NULL: nothing may reach it */
	const char *from;
	const char *rcpt;
	const char *mail_option;
	const char *rcpt_option;
	const char *helo;
	SmtpMessageKind kind;
	const char *body;
} InputCase;

static const InputCase input_cases[] = {
    {"from-crlf", NULL, "a@x\r\nRSET", "b@x", NULL, NULL, NULL, 0, "hi"},
    {"from-lf", NULL, "a@x\nRSET", "b@x", NULL, NULL, NULL, 0, "hi"},
    {"from-cr", NULL, "a@x\rRSET", "b@x", NULL, NULL, NULL, 0, "hi"},
    {"rcpt-crlf", NULL, "a@x", "b@x\r\nDATA", NULL, NULL, NULL, 0, "hi"},
    {"rcpt-bracket", NULL, "a@x", "b@x> NOTIFY=NEVER", NULL, NULL, NULL, 0,
     "hi"},
    {"from-bracket", NULL, "<a@x>", "b@x", NULL, NULL, NULL, 0, "hi"},
    {"mail-option-crlf", NULL, "a@x", "b@x", "RET=HDRS\r\nRSET", NULL, NULL, 0,
     "hi"},
    {"mail-option-space", NULL, "a@x", "b@x", "RET=HDRS FOO=1", NULL, NULL, 0,
     "hi"},
    {"mail-option-empty", NULL, "a@x", "b@x", "", NULL, NULL, 0, "hi"},
    {"mail-option-no-value", NULL, "a@x", "b@x", "RET=", NULL, NULL, 0, "hi"},
    {"rcpt-option-lf", NULL, "a@x", "b@x", NULL, "NOTIFY=NEVER\nX", NULL, 0,
     "hi"},
    {"helo-crlf", NULL, "a@x", "b@x", NULL, NULL, "me\r\nMAIL FROM:<x>", 0,
     "hi"},
    {"helo-empty", NULL, "a@x", "b@x", NULL, NULL, "", 0, "hi"},
    {"from-non-ascii", NULL, "j\xc3\xb6@x", "b@x", NULL, NULL, NULL, 0, "hi"},
    {"rcpt-non-ascii", NULL, "a@x", "\xc3\xbc@x", NULL, NULL, NULL, 0, "hi"},
    {"rcpt-non-ascii-body8bit", NULL, "a@x", "\xc3\xbc@x", "BODY=8BITMIME",
     NULL, NULL, 0, "hi"},
    {"utf8-invalid-address", NULL, "a@x", "\xff@x", "SMTPUTF8", NULL, NULL, 0,
     "hi"},
    {"binarymime", NULL, "a@x", "b@x", "BODY=BINARYMIME", NULL, NULL, 0, "hi"},
    {"text-not-ascii", NULL, "a@x", "b@x", NULL, NULL, NULL, SMTP_MESSAGE_TEXT,
     "caf\xc3\xa9"},
    {"text-not-utf8", NULL, "a@x", "b@x", "BODY=8BITMIME", NULL, NULL,
     SMTP_MESSAGE_TEXT, "caf\xe9"},
    {"no-recipient", NULL, "a@x", NULL, NULL, NULL, NULL, 0, "hi"},
    {"rcpt-space", NULL, "a@x", "a b@x", NULL, NULL, NULL, 0, "hi"},
    {"from-space", NULL, "a b@x", "b@x", NULL, NULL, NULL, 0, "hi"},
    {"rcpt-space-in-domain", NULL, "a@x", "a@x y", NULL, NULL, NULL, 0, "hi"},
    {"rcpt-space-after-quote", NULL, "a@x", "\"a\" b@x", NULL, NULL, NULL, 0,
     "hi"},
    {"rcpt-quote-open", NULL, "a@x", "\"a b@x", NULL, NULL, NULL, 0, "hi"},
    {"rcpt-quote-escaped-end", NULL, "a@x", "\"a b\\\"@x", NULL, NULL, NULL, 0,
     "hi"},
};

static void
test_input_case(Fixture *f, gconstpointer data)
{
	const InputCase *c = data;
	const char *rcpts[] = {c->rcpt, NULL};
	const char *mopts[] = {c->mail_option, NULL};
	const char *ropts[] = {c->rcpt_option, NULL};
	g_autoptr(SmtpMessage) msg = smtp_message_new(c->kind);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;

	if (c->helo != NULL)
		smtp_client_set_helo_name(f->client, c->helo);
	smtp_message_append_data(msg, c->body, strlen(c->body));
	res = smtp_client_sendmail(f->client, c->from, rcpts, msg, mopts, ropts,
	                           &error);
	g_assert_null(res);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_INPUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "input");
	g_assert_cmpint(smtp_error_get_reply(error)->code, ==, 0);
	g_assert_false(smtp_error_is_temporary(error));
	g_assert_false(smtp_client_is_connected(f->client));
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 0);
}

/* A quoted local part may hold spaces (and an escaped quote): sent as
 * given. */
static void
test_quoted_local_part(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"\"a b\"@x.example",
	                                    "\"c \\\" d\"@x.example", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const FakeSmtpMessage *m;

	(void)data;
	res = send_body(f, "\"s p\"@example.org", rcpts, "hi\r\n", NULL, NULL,
	                &error);
	g_assert_no_error(error);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	m = fake_smtp_get_message(f->fake, 0);
	g_assert_true(
	    g_str_has_prefix(m->mail_from, "FROM:<\"s p\"@example.org>"));
	g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 0), ==,
	                "TO:<\"a b\"@x.example>");
	g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 1), ==,
	                "TO:<\"c \\\" d\"@x.example>");
}

/* TEXT that is UTF-8 passes with BODY=8BITMIME and goes out as is. */
static void
test_text_8bit(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	static const char *const mopts[] = {"BODY=8BITMIME", NULL};
	static const char body[] = "caf\xc3\xa9\n";
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_TEXT);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const FakeSmtpMessage *m;

	(void)data;
	smtp_message_append_data(msg, body, sizeof(body) - 1);
	res = smtp_client_sendmail(f->client, FROM, rcpts, msg, mopts, NULL,
	                           &error);
	g_assert_no_error(error);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	m = fake_smtp_get_message(f->fake, 0);
	g_assert_cmpmem(g_bytes_get_data(m->wire, NULL),
	                g_bytes_get_size(m->wire), "caf\xc3\xa9\r\n.\r\n", 10);
}

/* ------------------------------------------------------------------ */
/* Time limits and connections                                          */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *name;
	const char *script;
	SmtpTimeouts timeouts;
	const char *stage;
} TimeoutCase;

static const TimeoutCase timeout_cases[] = {
    {"never-greets", "greeting none", {300, 5000, 5000, 5000}, "greeting"},
    {"stall-at-mail", "on MAIL stall", {5000, 300, 5000, 5000}, "mail"},
    {"stall-after-dot", "on DOT stall", {5000, 5000, 5000, 300}, "end-of-data"},
    {"slow-dot",
     "on DOT delay 2000 250 2.0.0 late",
     {5000, 5000, 5000, 300},
     "end-of-data"},
};

static void
test_timeout_case(Fixture *f, gconstpointer data)
{
	const TimeoutCase *c = data;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	gint64 start = g_get_monotonic_time();

	smtp_client_set_timeouts(f->client, &c->timeouts);
	res = send_simple(f, &error);
	g_assert_null(res);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_TIMEOUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, c->stage);
	g_assert_true(smtp_error_is_temporary(error));
	g_assert_false(smtp_client_is_connected(f->client));
	g_assert_cmpint(g_get_monotonic_time() - start, <, 2 * G_USEC_PER_SEC);
}

static void
test_connect_refused(void)
{
	struct sockaddr_in sin = {.sin_family = AF_INET};
	socklen_t len = sizeof(sin);
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *peer = NULL;
	static const char *const rcpts[] = {"a@x.example", NULL};
	int fd;

	/* A port that was free a moment ago and has no listener. */
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	fd = socket(AF_INET, SOCK_STREAM, 0);
	g_assert_cmpint(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), ==, 0);
	g_assert_cmpint(getsockname(fd, (struct sockaddr *)&sin, &len), ==, 0);
	close(fd);

	client = smtp_client_new("127.0.0.1", ntohs(sin.sin_port));
	g_assert_cmpstr(smtp_client_get_peer(client), ==, "none");
	smtp_message_append_data(msg, "hi", 2);
	res =
	    smtp_client_sendmail(client, FROM, rcpts, msg, NULL, NULL, &error);
	g_assert_null(res);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_CONNECT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "connect");
	g_assert_cmpint(smtp_error_get_reply(error)->code, ==, 0);
	g_assert_true(smtp_error_is_temporary(error));
	peer = g_strdup_printf("127.0.0.1[127.0.0.1]:%u", ntohs(sin.sin_port));
	g_assert_cmpstr(smtp_client_get_peer(client), ==, peer);
}

static void
test_connect_unresolvable(void)
{
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(GError) error = NULL;

	/* RFC 2606 reserves .invalid; a numeric-looking junk host fails
	 * in getaddrinfo without a DNS query being needed to prove it. */
	client = smtp_client_new("999.999.999.999", 25);
	g_assert_false(smtp_client_connect(client, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_CONNECT);
	g_assert_cmpstr(smtp_client_get_peer(client), ==,
	                "999.999.999.999[unknown]:25");
}

/* "localhost" resolves from /etc/hosts; ::1 may come first and be
 * refused, the next address must then be tried. */
static void
test_connect_localhost(Fixture *f, gconstpointer data)
{
	g_autoptr(SmtpClient) client = smtp_client_new("localhost", f->port);
	g_autoptr(GError) error = NULL;

	(void)data;
	g_assert_true(smtp_client_connect(client, &error));
	g_assert_no_error(error);
	g_assert_true(
	    g_str_has_prefix(smtp_client_get_peer(client), "localhost["));
	/* Connected already: a second call does nothing. */
	g_assert_true(smtp_client_connect(client, &error));
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 1);
}

/* The plain fake server offers neither STARTTLS nor AUTH: a required
 * TLS level and credentials each fail and close (test-tls.c has the
 * rest of STARTTLS and AUTH). */
static void
test_tls_auth_unavailable(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;

	(void)data;
	smtp_client_set_tls(f->client, SMTP_TLS_ENCRYPT, NULL);
	g_assert_false(smtp_client_connect(f->client, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_TLS);
	g_assert_false(smtp_client_is_connected(f->client));
	g_clear_error(&error);
	smtp_client_set_tls(f->client, SMTP_TLS_NONE, NULL);
	smtp_client_set_auth(f->client, "user", "secret", TRUE);
	g_assert_false(smtp_client_connect(f->client, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_AUTH);
	g_assert_false(smtp_client_is_connected(f->client));
	g_assert_cmpuint(count_commands(f, "MAIL"), ==, 0);
	g_assert_cmpuint(count_commands(f, "AUTH"), ==, 0);
}

static void
test_rset_quit(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL;

	(void)data;
	g_assert_false(smtp_client_rset(f->client, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_DISCONNECTED);
	g_clear_error(&error);
	g_assert_true(smtp_client_connect(f->client, &error));
	g_assert_true(smtp_client_rset(f->client, &error));
	smtp_client_quit(f->client);
	g_assert_false(smtp_client_is_connected(f->client));
	cmds = joined_commands(f);
	g_assert_cmpstr(cmds, ==, "EHLO client.example|RSET|QUIT");
}

/* A long reply line is PROTOCOL and closes, whatever follows. */
static void
test_long_reply_line(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;

	(void)data;
	res = send_simple(f, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_PROTOCOL);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "mail");
	g_assert_false(smtp_client_is_connected(f->client));
}

/* ------------------------------------------------------------------ */
/* Streaming                                                            */
/* ------------------------------------------------------------------ */

/* Several MB from a file, with bare LFs and leading dots: what arrives
 * is the normalised message, and SIZE is what went out before the end
 * marker, lone LFs made CRLF and dots doubled: never less than sent
 * (the file's own size would be short by a third of its lines). */
static void
test_big_file(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	g_autoptr(GString) file = g_string_new(NULL);
	g_autoptr(GString) expect = g_string_new(NULL);
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *path = NULL, *mail = NULL;
	const FakeSmtpMessage *m;
	int fd;

	(void)data;
	for (guint i = 0; file->len < 6 * 1024 * 1024; i++) {
		const char *lead = i % 7 == 0 ? "." : "";
		const char *eol = i % 3 == 0 ? "\n" : "\r\n";

		g_string_append_printf(file, "%sline %u %s%s", lead, i,
		                       "0123456789abcdefghijklmnopqrstuvwxyz"
		                       "0123456789abcdefghijklmnopqrstuvwxyz",
		                       eol);
		g_string_append_printf(expect, "%sline %u %s\r\n", lead, i,
		                       "0123456789abcdefghijklmnopqrstuvwxyz"
		                       "0123456789abcdefghijklmnopqrstuvwxyz");
	}
	fd = g_file_open_tmp("smtpclient-big-XXXXXX", &path, &error);
	g_assert_no_error(error);
	g_unlink(path);
	g_assert_cmpint(write(fd, file->str, file->len), ==, (gssize)file->len);
	g_assert_true(smtp_message_append_fd(msg, fd, 0, -1, &error));
	close(fd);

	res = smtp_client_sendmail(f->client, FROM, rcpts, msg, NULL, NULL,
	                           &error);
	g_assert_no_error(error);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 5000));
	m = fake_smtp_get_message(f->fake, 0);
	mail = g_strdup_printf("FROM:<" FROM "> SIZE=%zu",
	                       g_bytes_get_size(m->wire) - 3);
	g_assert_cmpstr(m->mail_from, ==, mail);
	g_assert_cmpuint(g_bytes_get_size(m->wire) - 3, >, file->len);
	g_assert_cmpmem(g_bytes_get_data(m->content, NULL),
	                g_bytes_get_size(m->content), expect->str, expect->len);
}

/*
 * A message file that changes after sendmail() has counted it for
 * SIZE=: a thread changes it as soon as the server has MAIL, which the
 * script answers late, so the change falls between the count and the
 * data.  Whatever the change, no end marker may follow: the server
 * must record nothing, the connection is closed, and the error is
 * INPUT naming the file and saying that it changed.
 */
typedef struct {
	Fixture *f;
	int fd;
	gboolean shrink; /* else: same size, lone LFs instead of text */
	gboolean grow;   /* else: as @shrink says */
} Mutator;

static gpointer
mutate_after_mail(gpointer data)
{
	Mutator *m = data;
	gint64 give_up = g_get_monotonic_time() + 5 * G_USEC_PER_SEC;

	while (count_commands(m->f, "MAIL") == 0 &&
	       g_get_monotonic_time() < give_up)
		g_usleep(1000);
	if (m->grow) {
		g_assert_cmpint(pwrite(m->fd, "more\r\n", 6, 300000), ==, 6);
	} else if (m->shrink) {
		g_assert_cmpint(ftruncate(m->fd, 1000), ==, 0);
	} else {
		g_autofree char *lf = g_strnfill(4096, '\n');

		g_assert_cmpint(pwrite(m->fd, lf, 4096, 0), ==, 4096);
	}
	return NULL;
}

static void
run_changed_file(Fixture *f, gboolean shrink, gboolean grow)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GBytes) received = NULL;
	g_autofree char *path = NULL, *head = g_strnfill(200000, 'h');
	g_autofree char *body = g_strnfill(300000, 'b');
	Mutator m = {f, -1, shrink, grow};
	GThread *thread;
	const char *wire;
	gsize len;

	/* 200 KB in memory go out before the file is read again. */
	m.fd = g_file_open_tmp("smtpclient-changed-XXXXXX", &path, &error);
	g_assert_no_error(error);
	g_assert_cmpint(write(m.fd, body, 300000), ==, 300000);
	smtp_message_append_data(msg, head, 200000);
	g_assert_true(smtp_message_append_fd(msg, m.fd, 0, -1, &error));

	thread = g_thread_new("mutator", mutate_after_mail, &m);
	res = smtp_client_sendmail(f->client, FROM, rcpts, msg, NULL, NULL,
	                           &error);
	g_thread_join(thread);
	close(m.fd);
	g_unlink(path);

	g_assert_null(res);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_INPUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "message");
	g_assert_nonnull(strstr(error->message, path));
	g_assert_nonnull(strstr(error->message, "changed"));
	g_assert_false(smtp_error_is_temporary(error));
	g_assert_false(smtp_client_is_connected(f->client));

	/* Data went out (the 354 was answered) but no end marker. */
	g_assert_cmpuint(count_commands(f, "DATA"), ==, 1);
	g_usleep(100 * 1000);
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 0);
	received = fake_smtp_get_received(f->fake);
	wire = g_bytes_get_data(received, &len);
	g_assert_nonnull(g_strstr_len(wire, len, "hhhh"));
	g_assert_null(g_strstr_len(wire, len, "\r\n.\r\n"));
}

static void
test_file_shrank_in_send(Fixture *f, gconstpointer data)
{
	(void)data;
	run_changed_file(f, TRUE, FALSE);
}

static void
test_file_changed_in_send(Fixture *f, gconstpointer data)
{
	(void)data;
	run_changed_file(f, FALSE, FALSE);
}

/* A file appended "to its end" that grows before it is sent: sent cut
 * at its old end, it would look whole to the server.  INPUT, no end
 * marker (break3 finding 3). */
static void
test_file_grew_in_send(Fixture *f, gconstpointer data)
{
	(void)data;
	run_changed_file(f, FALSE, TRUE);
}

/* The server closes in the middle of the data: never a success. */
static void
test_close_in_data(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", NULL};
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *big = g_malloc(4 * 1024 * 1024);

	(void)data;
	memset(big, 'x', 4 * 1024 * 1024);
	smtp_message_append_data(msg, big, 4 * 1024 * 1024);
	res = smtp_client_sendmail(f->client, FROM, rcpts, msg, NULL, NULL,
	                           &error);
	g_assert_null(res);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_DISCONNECTED);
	g_assert_false(smtp_client_is_connected(f->client));
}

/* ------------------------------------------------------------------ */
/* The I/O layer against a socket the test drives itself                */
/* ------------------------------------------------------------------ */

/* A listener on 127.0.0.1; *@port receives its port. */
static int
listen_loopback(guint16 *port)
{
	struct sockaddr_in sin = {.sin_family = AF_INET};
	socklen_t len = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	g_assert_cmpint(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), ==, 0);
	g_assert_cmpint(listen(fd, 4), ==, 0);
	g_assert_cmpint(getsockname(fd, (struct sockaddr *)&sin, &len), ==, 0);
	*port = ntohs(sin.sin_port);
	return fd;
}

typedef struct {
	int fd;
	const char *const *pieces; /* written one by one, NULL-terminated */
	guint pause_ms;            /* between pieces */
} Writer;

static gpointer
writer_main(gpointer data)
{
	Writer *w = data;

	for (guint i = 0; w->pieces[i] != NULL; i++) {
		g_usleep(w->pause_ms * 1000);
		if (send(w->fd, w->pieces[i], strlen(w->pieces[i]),
		         MSG_NOSIGNAL) < 0)
			break;
	}
	return NULL;
}

/* A reply that arrives in pieces, cut inside the code, inside a line
 * and between CR and LF, parses as one; the next stays buffered. */
static void
test_io_split_reply(void)
{
	static const char *const pieces[] = {"2",
	                                     "50-first\r",
	                                     "\n250-sec",
	                                     "ond\n25",
	                                     "0 2.0.0 last\r\n"
	                                     "354 go\r\n",
	                                     NULL};
	g_autoptr(SmtpConn) conn = NULL;
	g_autoptr(GError) error = NULL;
	SmtpReply reply = {0};
	Writer w = {.pieces = pieces, .pause_ms = 20};
	GThread *thread;
	guint16 port;
	int lfd = listen_loopback(&port);

	conn = smtp_conn_open("127.0.0.1", port, 2000, 0, NULL, &error);
	g_assert_no_error(error);
	w.fd = accept(lfd, NULL, NULL);
	thread = g_thread_new("writer", writer_main, &w);
	g_assert_true(smtp_conn_read_reply(conn, 2000, "mail", &reply, &error));
	g_assert_no_error(error);
	assert_reply(&reply, 250, NULL, "first\nsecond\n2.0.0 last");
	smtp_reply_clear(&reply);
	g_assert_true(smtp_conn_read_reply(conn, 2000, "data", &reply, &error));
	assert_reply(&reply, 354, NULL, "go");
	smtp_reply_clear(&reply);
	g_assert_false(smtp_conn_has_pending(conn));
	g_thread_join(thread);
	close(w.fd);
	close(lfd);
}

/* A server that dribbles a byte at a time cannot stretch the limit:
 * it is a deadline for the whole reply, not a limit per read. */
static void
test_io_dribble(void)
{
	static const char *const pieces[] = {"2", "5", "0", " ", "s", "l",
	                                     "o", "w", "l", "y", NULL};
	g_autoptr(SmtpConn) conn = NULL;
	g_autoptr(GError) error = NULL;
	SmtpReply reply = {0};
	Writer w = {.pieces = pieces, .pause_ms = 100};
	GThread *thread;
	guint16 port;
	int lfd = listen_loopback(&port);
	gint64 start;

	conn = smtp_conn_open("127.0.0.1", port, 2000, 0, NULL, &error);
	w.fd = accept(lfd, NULL, NULL);
	thread = g_thread_new("writer", writer_main, &w);
	start = g_get_monotonic_time();
	g_assert_false(smtp_conn_read_reply(conn, 350, "rcpt", &reply, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_TIMEOUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "rcpt");
	g_assert_cmpint(g_get_monotonic_time() - start, <, 800000);
	g_thread_join(thread);
	close(w.fd);
	close(lfd);
}

/* A peer that never reads: the write stops at the data limit. */
static void
test_io_write_timeout(void)
{
	g_autoptr(SmtpConn) conn = NULL;
	g_autoptr(GError) error = NULL;
	gsize len = 64 * 1024 * 1024;
	g_autofree char *big = g_malloc0(len);
	guint16 port;
	int lfd = listen_loopback(&port);

	/* Never accepted: the kernel completes the handshake and the
	 * buffers fill up. */
	conn = smtp_conn_open("127.0.0.1", port, 2000, 0, NULL, &error);
	g_assert_no_error(error);
	g_assert_false(smtp_conn_write(conn, big, len, 300, "message", &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_TIMEOUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "message");
	close(lfd);
}

/* The same client over IPv6, when the host has ::1. */
static void
test_connect_ipv6(void)
{
	g_autoptr(FakeSmtp) fake = fake_smtp_new(NULL, NULL);
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *peer = NULL;
	guint16 port;

	port = fake_smtp_start(fake, "::1", NULL, &error);
	if (port == 0) {
		g_test_skip("no IPv6 loopback here");
		return;
	}
	client = smtp_client_new("::1", port);
	g_assert_true(smtp_client_connect(client, &error));
	g_assert_no_error(error);
	peer = g_strdup_printf("::1[::1]:%u", port);
	g_assert_cmpstr(smtp_client_get_peer(client), ==, peer);
}

/* ------------------------------------------------------------------ */

static void
add_plain(const char *path, const char *script,
          void (*func)(Fixture *, gconstpointer))
{
	add_plain_case(plain_cases, "/smtpclient/sendmail/", path, script,
	               fixture_set_up, func);
}

#define ADD(path, script, func) add_plain(path, script, func)

/* One test per row of @table; each row starts with a CaseHead. */
#define ADD_TABLE(dir, table, func)                                            \
	for (guint i_ = 0; i_ < G_N_ELEMENTS(table); i_++) {                   \
		g_autofree char *p_ = g_strdup_printf(                         \
		    "/smtpclient/sendmail/" dir "/%s", table[i_].name);        \
                                                                               \
		g_test_add(p_, Fixture, &table[i_], fixture_set_up, func,      \
		           fixture_tear_down);                                 \
	}

int
main(int argc, char **argv)
{
	g_autofree char *long_line = NULL;
	g_autofree char *x = NULL;
	int rc;

	g_test_init(&argc, &argv, NULL);
	plain_cases = g_ptr_array_new_with_free_func(g_free);

	ADD("all-accepted", NULL, test_all_accepted);
	ADD("empty-message", NULL, test_empty_message);
	ADD("some-refused",
	    "on RCPT /bad@/ reply 550-5.1.1 no such user|550 5.1.1 really",
	    test_some_refused);
	ADD("all-refused",
	    "on RCPT /^TO:<a@/ reply 450 4.2.0 busy\n"
	    "on RCPT /^TO:<b@/ reply 550 5.1.1 unknown",
	    test_all_refused);
	ADD_TABLE("fail", fail_cases, test_fail_case);
	ADD_TABLE("options", option_cases, test_option_case);
	ADD_TABLE("input", input_cases, test_input_case);
	ADD_TABLE("timeout", timeout_cases, test_timeout_case);
	ADD("rset-reuse", "on MAIL /first@/ reply 550 5.7.1 not you",
	    test_rset_reuse);
	ADD("reconnect-after-421", "on MAIL /first@/ reply 421 4.3.2 bye",
	    test_reconnect_after_421);
	ADD("ehlo/helo-fallback", "on EHLO reply 502 5.5.2 no ESMTP",
	    test_helo_fallback);
	ADD("ehlo/helo-smtputf8", "on EHLO reply 500 5.5.2 what",
	    test_helo_smtputf8);
	ADD("options/dropped-on-error",
	    "ehlo-keywords SIZE\non MAIL reply 550 5.7.1 no",
	    test_dropped_on_error);
	ADD("smtputf8/unadvertised", "ehlo-keywords SIZE 1000 8BITMIME",
	    test_smtputf8_unadvertised);
	ADD("smtputf8/address", NULL, test_smtputf8_address);
	ADD("text-8bit", NULL, test_text_8bit);
	ADD("quoted-local-part", NULL, test_quoted_local_part);
	ADD("connect/localhost", NULL, test_connect_localhost);
	ADD("connect/tls-auth-unavailable", NULL, test_tls_auth_unavailable);
	ADD("rset-quit", NULL, test_rset_quit);
	ADD("big-file", NULL, test_big_file);
	ADD("close-in-data", "on DATA close-in-data", test_close_in_data);
	ADD("file-shrank-in-send", "on MAIL delay 500 250 2.1.0 Ok",
	    test_file_shrank_in_send);
	ADD("file-changed-in-send", "on MAIL delay 500 250 2.1.0 Ok",
	    test_file_changed_in_send);
	ADD("file-grew-in-send", "on MAIL delay 500 250 2.1.0 Ok",
	    test_file_grew_in_send);
	g_test_add_func("/smtpclient/sendmail/connect/refused",
	                test_connect_refused);
	g_test_add_func("/smtpclient/sendmail/connect/unresolvable",
	                test_connect_unresolvable);
	g_test_add_func("/smtpclient/sendmail/connect/ipv6", test_connect_ipv6);
	g_test_add_func("/smtpclient/io/split-reply", test_io_split_reply);
	g_test_add_func("/smtpclient/io/dribble", test_io_dribble);
	g_test_add_func("/smtpclient/io/write-timeout", test_io_write_timeout);

	x = g_strnfill(SMTP_REPLY_MAX_LINE + 10, 'x');
	long_line = g_strdup_printf("on MAIL raw 250 %s\\r\\n", x);
	ADD("long-reply-line", long_line, test_long_reply_line);
	rc = g_test_run();
	g_ptr_array_unref(plain_cases);
	return rc;
}
