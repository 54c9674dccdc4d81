/*
 * test-pipelining.c - PIPELINING (RFC 2920) in smtp_client_sendmail():
 * MAIL, the RCPTs and DATA in one write, replies matched back in order,
 * and every outcome the same as one command at a time
 *
 * The fake SMTP server records every byte it receives, so most tests
 * compare the whole session byte for byte.  That MAIL, the RCPTs and
 * DATA go out before MAIL is answered is shown with "on MAIL stall":
 * the server never answers MAIL, yet it has received everything up to
 * DATA.  That they go out in one write is shown twice: the test binary
 * is linked with send() wrapped (-Wl,--wrap=send) and counts the writes
 * that carry commands, and a peer the test plays itself reads the batch
 * with a single recv().
 */
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "test-common.h"

#define FROM          "sender@example.org"
#define PIPE_KEYWORDS "ehlo-keywords PIPELINING 8BITMIME SIZE 1000000\n"

/* What a client sends for FROM to a@ and b@ with the body "hi\r\n". */
#define EHLO_LINE "EHLO client.example\r\n"
#define ENVELOPE(from)                                                         \
	"MAIL FROM:<" from "> SIZE=4\r\n"                                      \
	"RCPT TO:<a@x.example>\r\n"                                            \
	"RCPT TO:<b@x.example>\r\n"                                            \
	"DATA\r\n"
#define BODY_WIRE "hi\r\n.\r\n"

static GPtrArray *plain_cases;

static const char *const two_rcpts[] = {"a@x.example", "b@x.example", NULL};

/* ------------------------------------------------------------------ */
/* Counting writes                                                      */
/* ------------------------------------------------------------------ */

ssize_t __real_send(int fd, const void *buf, size_t len, int flags);
ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags);

static GMutex writes_lock;
static GPtrArray *command_writes; /* char *: each send() that began with
                                   * MAIL, RCPT or DATA, as sent */

/* @buf is bytes, not a string: compare by length. */
static gboolean
starts_with(const void *buf, gsize len, const char *prefix)
{
	gsize n = strlen(prefix);

	return len >= n && memcmp(buf, prefix, n) == 0;
}

/* Every send() of this binary comes here (see meson.build): the server
 * cannot tell two quick writes from one, the sender can. */
ssize_t
__wrap_send(int fd, const void *buf, size_t len, int flags)
{
	ssize_t n = __real_send(fd, buf, len, flags);

	if (n > 0 && (starts_with(buf, n, "MAIL FROM:") ||
	              starts_with(buf, n, "RCPT TO:") ||
	              starts_with(buf, n, "DATA\r\n"))) {
		g_mutex_lock(&writes_lock);
		g_ptr_array_add(command_writes, g_strndup(buf, n));
		g_mutex_unlock(&writes_lock);
	}
	return n;
}

/* The command writes so far, "|"-joined, and forget them. */
static char *
take_command_writes(void)
{
	char *joined;

	g_mutex_lock(&writes_lock);
	g_ptr_array_add(command_writes, NULL);
	joined = g_strjoinv("|", (char **)command_writes->pdata);
	g_ptr_array_set_size(command_writes, 0);
	g_mutex_unlock(&writes_lock);
	return joined;
}

static void
fixture_set_up(Fixture *f, gconstpointer data)
{
	const CaseHead *head = data;
	SmtpTimeouts t = {5000, 1000, 5000, 5000};

	fixture_start(f, head->script, &t);
}

static SmtpResult *
send_to(Fixture *f, const char *from, const char *const *rcpts, GError **error)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);

	smtp_message_append_data(msg, "hi\r\n", 4);
	return smtp_client_sendmail(f->client, from, rcpts, msg, NULL, NULL,
	                            error);
}

/* Every byte the server received, as a string.  The server records in
 * its own thread: wait up to 2 s for at least @min_len bytes. */
static char *
received(Fixture *f, gsize min_len)
{
	gint64 end = g_get_monotonic_time() + 2 * G_USEC_PER_SEC;

	for (;;) {
		g_autoptr(GBytes) b = fake_smtp_get_received(f->fake);
		gsize len;
		const char *p = g_bytes_get_data(b, &len);

		if (len >= min_len || g_get_monotonic_time() > end)
			return g_strndup(p != NULL ? p : "", len);
		g_usleep(10000);
	}
}

static void
assert_refusal(const GPtrArray *refused, guint i, const char *rcpt, int code)
{
	const SmtpRefusal *r;

	g_assert_cmpuint(i, <, refused->len);
	r = g_ptr_array_index(refused, i);
	g_assert_cmpstr(r->recipient, ==, rcpt);
	g_assert_cmpint(r->reply.code, ==, code);
}

/* ------------------------------------------------------------------ */
/* The batch                                                            */
/* ------------------------------------------------------------------ */

/* The exact bytes of a pipelined session, and a delivered message. */
static void
test_wire(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *wire = NULL;
	const FakeSmtpMessage *m;

	(void)data;
	res = send_to(f, FROM, two_rcpts, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(res->refused->len, ==, 0);
	g_assert_cmpint(res->reply.code, ==, 250);
	g_assert_true(smtp_client_has_extension(f->client, "PIPELINING", NULL));
	wire = received(f, 0);
	g_assert_cmpstr(wire, ==, EHLO_LINE ENVELOPE(FROM) BODY_WIRE);
	m = fake_smtp_get_message(f->fake, 0);
	g_assert_nonnull(m);
	g_assert_cmpuint(m->rcpt_to->len, ==, 2);
}

/* The server never answers MAIL, yet has every RCPT and DATA: they went
 * out before MAIL's reply.  (With one command at a time, see
 * test_one_at_a_time, it has MAIL alone.) */
static void
test_before_mail_reply(Fixture *f, gconstpointer data)
{
	static const char expect[] = EHLO_LINE ENVELOPE(FROM);
	SmtpTimeouts t = {5000, 300, 5000, 5000};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *wire = NULL;

	(void)data;
	smtp_client_set_timeouts(f->client, &t);
	res = send_to(f, FROM, two_rcpts, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_TIMEOUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "mail");
	g_assert_false(smtp_client_is_connected(f->client));
	wire = received(f, sizeof(expect) - 1);
	g_assert_cmpstr(wire, ==, expect);
}

/* Without PIPELINING (or after HELO, where nothing is advertised), the
 * same stall shows that RCPT waits for MAIL's reply.  The client gave
 * up after its 300 ms limit, so anything it had sent is recorded. */
static void
test_one_at_a_time(Fixture *f, gconstpointer data)
{
	const CaseHead *head = data;
	SmtpTimeouts t = {5000, 300, 5000, 5000};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *wire = NULL;
	const char *mail;

	smtp_client_set_timeouts(f->client, &t);
	res = send_to(f, FROM, two_rcpts, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_TIMEOUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "mail");
	wire = received(f, 0);
	mail = strstr(wire, "MAIL FROM:<" FROM ">");
	g_assert_nonnull(mail);
	g_assert_true(g_str_has_suffix(mail, "\r\n"));
	g_assert_null(strstr(mail, "\r\nRCPT"));
	g_assert_cmpuint(count_commands(f, "RCPT"), ==, 0);
	if (strstr(head->name, "helo") != NULL)
		g_assert_cmpstr(mail, ==, "MAIL FROM:<" FROM ">\r\n");
}

/* Without PIPELINING the bytes are the same; only their timing differs,
 * so the success path is pinned for both. */
static void
test_plain_wire(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *wire = NULL;

	(void)data;
	res = send_to(f, FROM, two_rcpts, &error);
	g_assert_no_error(error);
	g_assert_false(
	    smtp_client_has_extension(f->client, "PIPELINING", NULL));
	wire = received(f, 0);
	g_assert_cmpstr(wire, ==, EHLO_LINE ENVELOPE(FROM) BODY_WIRE);
}

/* One send() for the whole batch with PIPELINING, one per command
 * without: the sender's view of what test_before_mail_reply shows. */
static void
test_one_send(Fixture *f, gconstpointer data)
{
	const CaseHead *head = data;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *writes = NULL;

	g_free(take_command_writes());
	res = send_to(f, FROM, two_rcpts, &error);
	g_assert_no_error(error);
	writes = take_command_writes();
	if (g_str_has_suffix(head->name, "pipelined"))
		g_assert_cmpstr(writes, ==, ENVELOPE(FROM));
	else
		g_assert_cmpstr(writes, ==,
		                "MAIL FROM:<" FROM "> SIZE=4\r\n|"
		                "RCPT TO:<a@x.example>\r\n|"
		                "RCPT TO:<b@x.example>\r\n|DATA\r\n");
}

/* ------------------------------------------------------------------ */
/* Replies matched back to recipients                                   */
/* ------------------------------------------------------------------ */

static void
test_some_refused(Fixture *f, gconstpointer data)
{
	static const char *const rcpts[] = {"a@x.example", "b@x.example",
	                                    "c@x.example", "d@x.example", NULL};
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const FakeSmtpMessage *m;

	(void)data;
	res = send_to(f, FROM, rcpts, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(res->refused->len, ==, 2);
	assert_refusal(res->refused, 0, "b@x.example", 550);
	g_assert_cmpstr(((SmtpRefusal *)res->refused->pdata[0])->reply.text, ==,
	                "no such user");
	assert_refusal(res->refused, 1, "c@x.example", 452);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	m = fake_smtp_get_message(f->fake, 0);
	g_assert_cmpuint(m->rcpt_to->len, ==, 2);
	g_assert_cmpstr(m->rcpt_to->pdata[0], ==, "TO:<a@x.example>");
	g_assert_cmpstr(m->rcpt_to->pdata[1], ==, "TO:<d@x.example>");
	g_assert_cmpuint(count_commands(f, "RSET"), ==, 0);
}

/* A reply text of 200 octets. */
#define TEXT_10 "0123456789"
#define TEXT_200                                                               \
	TEXT_10 TEXT_10 TEXT_10 TEXT_10 TEXT_10 TEXT_10 TEXT_10 TEXT_10        \
	    TEXT_10 TEXT_10 TEXT_10 TEXT_10 TEXT_10 TEXT_10 TEXT_10 TEXT_10    \
	        TEXT_10 TEXT_10 TEXT_10 TEXT_10

/* More recipients than one write carries: every refusal still lands on
 * its recipient, and the message goes to the others. */
static void
test_many_recipients(Fixture *f, gconstpointer data)
{
	g_autoptr(GPtrArray) rcpts = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	const FakeSmtpMessage *m;
	guint n_bad = 0;

	(void)data;
	for (guint i = 0; i < 250; i++)
		g_ptr_array_add(rcpts,
		                g_strdup_printf("%s%u@x.example",
		                                i % 7 == 3 ? "bad" : "ok", i));
	g_ptr_array_add(rcpts, NULL);
	res = send_to(f, FROM, (const char *const *)rcpts->pdata, &error);
	g_assert_no_error(error);
	for (guint i = 0; i < 250; i++) {
		if (i % 7 != 3)
			continue;
		assert_refusal(res->refused, n_bad++, rcpts->pdata[i], 550);
	}
	g_assert_cmpuint(res->refused->len, ==, n_bad);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
	m = fake_smtp_get_message(f->fake, 0);
	g_assert_cmpuint(m->rcpt_to->len, ==, 250 - n_bad);
	g_assert_cmpuint(count_commands(f, "DATA"), ==, 1);
}

/* MAIL refused with many recipients: the writes after the first are
 * moot and not sent; the stream stays in step for RSET. */
static void
test_many_mail_refused(Fixture *f, gconstpointer data)
{
	g_autoptr(GPtrArray) rcpts = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;

	(void)data;
	for (guint i = 0; i < 250; i++)
		g_ptr_array_add(rcpts, g_strdup_printf("r%u@x.example", i));
	g_ptr_array_add(rcpts, NULL);
	res = send_to(f, FROM, (const char *const *)rcpts->pdata, &error);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_SENDER_REFUSED);
	g_assert_cmpint(smtp_error_get_reply(error)->code, ==, 553);
	g_assert_cmpuint(count_commands(f, "RCPT"), <, 250);
	g_assert_cmpuint(count_commands(f, "DATA"), ==, 0);
	g_assert_cmpuint(count_commands(f, "RSET"), ==, 1);
	g_assert_true(smtp_client_is_connected(f->client));
	g_clear_error(&error);

	/* The replies were all read: the next transaction is in step. */
	res = send_to(f, "second@x.example", two_rcpts, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 1);
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 1);
}

/* Two messages over one pipelined connection. */
static void
test_reuse(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res1 = NULL, res2 = NULL;
	g_autofree char *wire = NULL;

	(void)data;
	res1 = send_to(f, FROM, two_rcpts, &error);
	g_assert_no_error(error);
	res2 = send_to(f, "second@x.example", two_rcpts, &error);
	g_assert_no_error(error);
	wire = received(f, 0);
	g_assert_cmpstr(wire, ==,
	                EHLO_LINE ENVELOPE(FROM)
	                    BODY_WIRE ENVELOPE("second@x.example") BODY_WIRE);
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 2);
}

/* ------------------------------------------------------------------ */
/* Failures: the smtplib contract, exact bytes, and the stream in step  */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *name;
	const char *script; /* after PIPE_KEYWORDS; rules for the first
	                     * transaction only (#1) */
	SmtpErrorCode code;
	const char *stage;
	int reply_code;
	gboolean temporary;
	gboolean connected; /* still connected, and RSET sent */
	const char *after;  /* bytes after the pipelined batch */
} FailCase;

static const FailCase fail_cases[] = {
    /* The fake answers the RCPTs and DATA after a refused MAIL with 503;
     * they are read and dropped. */
    {"mail-refused", PIPE_KEYWORDS "on MAIL#1 reply 553 5.7.1 rejected",
     SMTP_ERROR_SENDER_REFUSED, "mail", 553, FALSE, TRUE, "RSET\r\n"},
    {"mail-refused-data-354",
     PIPE_KEYWORDS "on MAIL#1 reply 451 4.3.0 later\n"
                   "on DATA#1 reply 354 go ahead\n"
                   "on DOT#1 reply 503 5.5.1 no transaction",
     SMTP_ERROR_SENDER_REFUSED, "mail", 451, TRUE, TRUE, ".\r\nRSET\r\n"},
    {"all-refused-503",
     PIPE_KEYWORDS "on RCPT#1 reply 450 4.2.0 busy\n"
                   "on RCPT#2 reply 550 5.1.1 unknown",
     SMTP_ERROR_RECIPIENTS_REFUSED, "rcpt", 550, TRUE, TRUE, "RSET\r\n"},
    {"all-refused-554",
     PIPE_KEYWORDS "on RCPT#1 reply 450 4.2.0 busy\n"
                   "on RCPT#2 reply 550 5.1.1 unknown\n"
                   "on DATA#1 reply 554 5.5.1 Error: no valid recipients",
     SMTP_ERROR_RECIPIENTS_REFUSED, "rcpt", 550, TRUE, TRUE, "RSET\r\n"},
    /* RFC 2920 section 3.1: a lone "." and no message. */
    {"all-refused-354",
     PIPE_KEYWORDS "on RCPT#1 reply 450 4.2.0 busy\n"
                   "on RCPT#2 reply 550 5.1.1 unknown\n"
                   "on DATA#1 reply 354 go ahead\n"
                   "on DOT#1 reply 554 5.5.1 Error: no valid recipients",
     SMTP_ERROR_RECIPIENTS_REFUSED, "rcpt", 550, TRUE, TRUE, ".\r\nRSET\r\n"},
    {"data-refused", PIPE_KEYWORDS "on DATA#1 reply 451 4.3.0 later",
     SMTP_ERROR_DATA, "data", 451, TRUE, TRUE, "RSET\r\n"},
    /* Replies out of step: PROTOCOL, closed without RSET. */
    {"data-not-354", PIPE_KEYWORDS "on DATA#1 reply 250 2.0.0 what",
     SMTP_ERROR_PROTOCOL, "data", 250, TRUE, FALSE, ""},
    {"rcpt-354", PIPE_KEYWORDS "on RCPT#2 reply 354 go ahead",
     SMTP_ERROR_PROTOCOL, "rcpt", 354, TRUE, FALSE, ""},
    {"mail-354", PIPE_KEYWORDS "on MAIL#1 reply 354 go ahead",
     SMTP_ERROR_PROTOCOL, "mail", 354, TRUE, FALSE, ""},
    {"421-mail", PIPE_KEYWORDS "on MAIL reply 421 4.3.2 bye",
     SMTP_ERROR_DISCONNECTED, "mail", 421, TRUE, FALSE, ""},
    {"421-rcpt", PIPE_KEYWORDS "on RCPT#2 reply 421 4.3.2 bye",
     SMTP_ERROR_DISCONNECTED, "rcpt", 421, TRUE, FALSE, ""},
    {"421-data", PIPE_KEYWORDS "on DATA reply 421 4.3.2 bye",
     SMTP_ERROR_DISCONNECTED, "data", 421, TRUE, FALSE, ""},
    {"close-after-mail", PIPE_KEYWORDS "on RCPT close", SMTP_ERROR_DISCONNECTED,
     "rcpt", 0, TRUE, FALSE, ""},
    {"close-at-data", PIPE_KEYWORDS "on DATA close", SMTP_ERROR_DISCONNECTED,
     "data", 0, TRUE, FALSE, ""},
    {"stall-at-rcpt", PIPE_KEYWORDS "on RCPT#2 stall", SMTP_ERROR_TIMEOUT,
     "rcpt", 0, TRUE, FALSE, ""},
    {"garbage-at-rcpt", PIPE_KEYWORDS "on RCPT#1 raw 250-ok\\r\\n999 x\\r\\n",
     SMTP_ERROR_PROTOCOL, "rcpt", 0, TRUE, FALSE, ""},
};

static void
test_fail_case(Fixture *f, gconstpointer data)
{
	const FailCase *c = data;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autofree char *expect = NULL, *wire = NULL;

	/* Step 1: the error is the one a one-at-a-time client gets. */
	res = send_to(f, FROM, two_rcpts, &error);
	g_assert_null(res);
	g_assert_error(error, SMTP_ERROR, (int)c->code);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, c->stage);
	g_assert_cmpint(smtp_error_get_reply(error)->code, ==, c->reply_code);
	g_assert_cmpint(smtp_error_is_temporary(error), ==, c->temporary);
	g_assert_cmpint(smtp_client_is_connected(f->client), ==, c->connected);
	if (c->code == SMTP_ERROR_RECIPIENTS_REFUSED) {
		const GPtrArray *refused = smtp_error_get_refused(error);

		g_assert_nonnull(refused);
		g_assert_cmpuint(refused->len, ==, 2);
		assert_refusal(refused, 0, "a@x.example", 450);
		assert_refusal(refused, 1, "b@x.example", 550);
	} else {
		g_assert_null(smtp_error_get_refused(error));
	}

	/* Step 2: the whole batch went out, then exactly @after: no
	 * message bytes, a lone "." only where RFC 2920 asks for it. */
	expect = g_strconcat(EHLO_LINE ENVELOPE(FROM), c->after, NULL);
	wire = received(f, strlen(expect));
	g_assert_cmpstr(wire, ==, expect);
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 0);
	if (!c->connected)
		return;

	/* Step 3: every reply was read, so the next transaction on the
	 * same connection gets its own replies. */
	g_clear_error(&error);
	res = send_to(f, "second@x.example", two_rcpts, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(res->refused->len, ==, 0);
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 1);
	g_assert_true(fake_smtp_wait_messages(f->fake, 1, 2000));
}

/* ------------------------------------------------------------------ */
/* One write: a peer that reads the batch with a single recv()          */
/* ------------------------------------------------------------------ */

typedef struct {
	int lfd;
	char batch[4096]; /* what the one recv() after EHLO got */
	GString *data;    /* the rest, up to the end of the message */
} Peer;

/* Read until @buf ends with @end or the peer closes (2 s at most). */
static void
peer_read_until(int fd, GString *buf, const char *end)
{
	while (!g_str_has_suffix(buf->str, end)) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		char chunk[4096];
		ssize_t n;

		if (poll(&pfd, 1, 2000) <= 0)
			return;
		n = recv(fd, chunk, sizeof(chunk), 0);
		if (n <= 0)
			return;
		g_string_append_len(buf, chunk, n);
	}
}

static void
peer_say(int fd, const char *text)
{
	g_assert_cmpint(send(fd, text, strlen(text), MSG_NOSIGNAL), ==,
	                (gssize)strlen(text));
}

static gpointer
peer_main(gpointer data)
{
	Peer *p = data;
	g_autoptr(GString) line = g_string_new(NULL);
	struct pollfd pfd;
	ssize_t n;
	int fd = accept(p->lfd, NULL, NULL);

	g_assert_cmpint(fd, >=, 0);
	peer_say(fd, "220 peer ESMTP\r\n");
	peer_read_until(fd, line, "\r\n");
	peer_say(fd, "250-peer\r\n250-SIZE 1000000\r\n250 PIPELINING\r\n");

	/* The client sends nothing more until this peer answers, so
	 * one recv() gets exactly what its first write carried. */
	pfd = (struct pollfd){.fd = fd, .events = POLLIN};
	g_assert_cmpint(poll(&pfd, 1, 2000), ==, 1);
	n = recv(fd, p->batch, sizeof(p->batch) - 1, 0);
	g_assert_cmpint(n, >, 0);
	peer_say(fd, "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n"
	             "354 go ahead\r\n");
	peer_read_until(fd, p->data, "\r\n.\r\n");
	peer_say(fd, "250 2.0.0 queued\r\n");
	g_string_truncate(line, 0);
	peer_read_until(fd, line, "\r\n");
	peer_say(fd, "221 bye\r\n");
	close(fd);
	return NULL;
}

static void
test_one_write(void)
{
	static const char *const rcpts[] = {"a@x.example", "b@x.example", NULL};
	struct sockaddr_in sin = {.sin_family = AF_INET};
	socklen_t len = sizeof(sin);
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autoptr(GString) data = g_string_new(NULL);
	Peer peer = {.data = data};
	GThread *thread;

	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	peer.lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	g_assert_cmpint(bind(peer.lfd, (struct sockaddr *)&sin, sizeof(sin)),
	                ==, 0);
	g_assert_cmpint(listen(peer.lfd, 1), ==, 0);
	g_assert_cmpint(getsockname(peer.lfd, (struct sockaddr *)&sin, &len),
	                ==, 0);
	thread = g_thread_new("peer", peer_main, &peer);

	client = smtp_client_new("127.0.0.1", ntohs(sin.sin_port));
	smtp_client_set_helo_name(client, "client.example");
	smtp_message_append_data(msg, "hi\r\n", 4);
	res =
	    smtp_client_sendmail(client, FROM, rcpts, msg, NULL, NULL, &error);
	g_assert_no_error(error);
	assert_refusal(res->refused, 0, "b@x.example", 550);
	g_clear_pointer(&client, smtp_client_free);
	g_thread_join(thread);
	close(peer.lfd);

	g_assert_cmpstr(peer.batch, ==, ENVELOPE(FROM));
	g_assert_cmpstr(data->str, ==, BODY_WIRE);
}

/* ------------------------------------------------------------------ */

static void
add_plain(const char *path, const char *script,
          void (*func)(Fixture *, gconstpointer))
{
	add_plain_case(plain_cases, "/smtpclient/pipelining/", path, script,
	               fixture_set_up, func);
}

int
main(int argc, char **argv)
{
	int rc;

	g_test_init(&argc, &argv, NULL);
	plain_cases = g_ptr_array_new_with_free_func(g_free);
	command_writes = g_ptr_array_new_with_free_func(g_free);

	add_plain("wire", PIPE_KEYWORDS, test_wire);
	add_plain("before-mail-reply", PIPE_KEYWORDS "on MAIL stall",
	          test_before_mail_reply);
	add_plain("reuse", PIPE_KEYWORDS, test_reuse);
	add_plain("one-send/pipelined", PIPE_KEYWORDS, test_one_send);
	add_plain("one-send/unadvertised", "ehlo-keywords SIZE 1000000",
	          test_one_send);
	add_plain("some-refused",
	          PIPE_KEYWORDS "on RCPT#2 reply 550 5.1.1 no such user\n"
	                        "on RCPT#3 reply 452 4.5.3 too many",
	          test_some_refused);
	add_plain("many-recipients",
	          PIPE_KEYWORDS "on RCPT /^TO:<bad/ reply 550 5.1.1 unknown",
	          test_many_recipients);
	/* 100 replies of 230 octets a group: reads that fill the buffer
	 * (read again at once) and reads that empty the socket (wait
	 * first) alternate, and each refusal still lands on its own */
	add_plain("many-recipients-long-replies",
	          PIPE_KEYWORDS "on RCPT /^TO:<bad/ reply 550 5.1.1 " TEXT_200
	                        "\n"
	                        "on RCPT reply 250 2.1.5 " TEXT_200,
	          test_many_recipients);
	add_plain("many-mail-refused",
	          PIPE_KEYWORDS "on MAIL#1 reply 553 5.7.1 rejected",
	          test_many_mail_refused);
	for (guint i = 0; i < G_N_ELEMENTS(fail_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/smtpclient/pipelining/fail/%s", fail_cases[i].name);

		g_test_add(path, Fixture, &fail_cases[i], fixture_set_up,
		           test_fail_case, fixture_tear_down);
	}
	add_plain("unadvertised/one-at-a-time",
	          "ehlo-keywords 8BITMIME SIZE 1000000\non MAIL stall",
	          test_one_at_a_time);
	add_plain("unadvertised/after-helo",
	          PIPE_KEYWORDS "on EHLO reply 502 5.5.2 no ESMTP\n"
	                        "on MAIL stall",
	          test_one_at_a_time);
	add_plain("unadvertised/wire", "ehlo-keywords 8BITMIME SIZE 1000000",
	          test_plain_wire);
	g_test_add_func("/smtpclient/pipelining/one-write", test_one_write);

	rc = g_test_run();
	g_ptr_array_unref(plain_cases);
	g_ptr_array_unref(command_writes);
	return rc;
}
