/*
 * test-fakesmtp.c - self-test of the scripted fake SMTP server
 *
 * Drives the server through plain sockets, so what is tested is the
 * wire, not another SMTP client: the default dialogue, every directive
 * and action of the script, Nth and regex matching, dot-stuffing, the
 * store directory, stopping while a connection stalls, hostile input,
 * and the fake-smtpd program (found through $FAKE_SMTPD).
 *
 * Known limits: timing checks use generous bounds (a stop must take
 * under two seconds), so a loaded machine does not make them flaky.
 */
#include "fakesmtp.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib/gstdio.h>

/* How long a client waits for something that should come. */
#define WAIT_MS 5000

/* ---- a plain socket client ---------------------------------------- */

static int
client_connect_to(const char *address, guint16 port)
{
	struct sockaddr_storage ss = {0};
	struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
	socklen_t len;
	int fd;

	if (inet_pton(AF_INET, address, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		len = sizeof(*sin);
	} else {
		g_assert_cmpint(inet_pton(AF_INET6, address, &sin6->sin6_addr),
		                ==, 1);
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(port);
		len = sizeof(*sin6);
	}
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(connect(fd, (struct sockaddr *)&ss, len), ==, 0);
	return fd;
}

static int
client_connect(guint16 port)
{
	return client_connect_to("127.0.0.1", port);
}

/*
 * A free port on 127.0.0.1 that no other process can take until @fd is
 * closed: bound with SO_REUSEADDR and never listening, so a server that
 * sets SO_REUSEADDR (fakesmtp does) can still bind it and listen, while
 * no automatic choice of port (connect(), bind to port 0) picks it.
 * Returns the socket; the port goes to *@port.
 */
static int
reserve_port(guint16 *port)
{
	struct sockaddr_in sin = {.sin_family = AF_INET};
	socklen_t len = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;

	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)), ==, 0);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	g_assert_cmpint(bind(fd, (struct sockaddr *)&sin, len), ==, 0);
	g_assert_cmpint(getsockname(fd, (struct sockaddr *)&sin, &len), ==, 0);
	*port = ntohs(sin.sin_port);
	return fd;
}

static void
client_send_len(int fd, const void *data, gsize len)
{
	const char *p = data;

	while (len > 0) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

		g_assert_cmpint(n, >, 0);
		p += n;
		len -= (gsize)n;
	}
}

static void
client_send(int fd, const char *text)
{
	client_send_len(fd, text, strlen(text));
}

/*
 * Reads one byte within @timeout_ms.  Returns 1 with *byte, 0 at EOF
 * (or a reset), -1 on timeout.
 */
static int
client_getc(int fd, int timeout_ms, char *byte)
{
	struct pollfd pfd = {.fd = fd, .events = POLLIN};
	ssize_t n;

	if (poll(&pfd, 1, timeout_ms) == 0)
		return -1;
	n = read(fd, byte, 1);
	if (n < 0 && errno == ECONNRESET)
		return 0;
	g_assert_cmpint(n, >=, 0);
	return (int)n;
}

/* One line with its LF, or NULL at EOF; fails the test on timeout. */
static char *
client_line(int fd)
{
	g_autoptr(GString) line = g_string_new(NULL);
	char c;

	for (;;) {
		int r = client_getc(fd, WAIT_MS, &c);

		g_assert_cmpint(r, >=, 0);
		if (r == 0)
			return line->len > 0
			           ? g_string_free(g_steal_pointer(&line),
			                           FALSE)
			           : NULL;
		g_string_append_c(line, c);
		if (c == '\n')
			return g_string_free(g_steal_pointer(&line), FALSE);
	}
}

/* A whole reply, every line with its CRLF, or NULL at EOF. */
static char *
client_reply(int fd)
{
	g_autoptr(GString) reply = g_string_new(NULL);

	for (;;) {
		g_autofree char *line = client_line(fd);

		if (line == NULL)
			return NULL;
		g_string_append(reply, line);
		if (strlen(line) < 4 || line[3] != '-')
			return g_string_free(g_steal_pointer(&reply), FALSE);
	}
}

static char *
client_cmd(int fd, const char *cmd)
{
	client_send(fd, cmd);
	client_send(fd, "\r\n");
	return client_reply(fd);
}

#define assert_cmd(fd, cmd, expected)                                          \
	do {                                                                   \
		g_autofree char *r_ = client_cmd((fd), (cmd));                 \
		g_assert_cmpstr(r_, ==, (expected));                           \
	} while (0)

#define assert_reply(fd, expected)                                             \
	do {                                                                   \
		g_autofree char *r_ = client_reply(fd);                        \
		g_assert_cmpstr(r_, ==, (expected));                           \
	} while (0)

/* Reads exactly @len bytes (a reply raw text may end without LF). */
static void
client_expect_bytes(int fd, const char *expected, gsize len)
{
	g_autofree char *buf = g_malloc(len + 1);

	for (gsize i = 0; i < len; i++)
		g_assert_cmpint(client_getc(fd, WAIT_MS, &buf[i]), ==, 1);
	g_assert_cmpmem(buf, len, expected, len);
}

/* The received record as a string (it may hold NULs: tests avoid). */
static char *
received_str(FakeSmtp *fake)
{
	g_autoptr(GBytes) bytes = fake_smtp_get_received(fake);

	return g_strndup(g_bytes_get_data(bytes, NULL),
	                 g_bytes_get_size(bytes));
}

/* Asserts the server closes the connection within WAIT_MS without
 * sending anything more. */
static void
client_expect_eof(int fd)
{
	char c;

	g_assert_cmpint(client_getc(fd, WAIT_MS, &c), ==, 0);
}

/* Asserts nothing arrives for @ms and the connection stays open. */
static void
client_expect_silence(int fd, int ms)
{
	char c;

	g_assert_cmpint(client_getc(fd, ms, &c), ==, -1);
}

/* Greeting, EHLO, MAIL, RCPT: ready for DATA. */
static void
client_envelope(int fd, const char *from, const char *to)
{
	g_autofree char *mail = g_strdup_printf("MAIL FROM:<%s>", from);
	g_autofree char *rcpt = g_strdup_printf("RCPT TO:<%s>", to);

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	client_send(fd, "HELO client\r\n");
	assert_reply(fd, "250 fakesmtp\r\n");
	assert_cmd(fd, mail, "250 2.1.0 Ok\r\n");
	assert_cmd(fd, rcpt, "250 2.1.5 Ok\r\n");
}

static FakeSmtp *
start(const char *script, const char *store, guint16 *port)
{
	g_autoptr(GError) error = NULL;
	FakeSmtp *fake = fake_smtp_new(script, &error);

	g_assert_no_error(error);
	g_assert_nonnull(fake);
	*port = fake_smtp_start(fake, "127.0.0.1", store, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(*port, !=, 0);
	return fake;
}

static void
assert_bytes(GBytes *bytes, const char *expected, gsize len)
{
	gsize got_len;
	const char *got = g_bytes_get_data(bytes, &got_len);

	g_assert_cmpmem(got, got_len, expected, len);
}

/* A literal that holds NULs, sent whole. */
#define send_lit(fd, lit) client_send_len((fd), (lit), sizeof(lit) - 1)

#define assert_bytes_str(bytes, s) assert_bytes((bytes), (s), strlen(s))

/* ---- the plain server ---------------------------------------------- */

static void
test_plain_session(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake = start(NULL, NULL, &port);
	int fd = client_connect(port);
	const FakeSmtpMessage *msg;
	g_autoptr(GPtrArray) cmds = NULL;
	g_autoptr(GBytes) received = NULL;
	static const char data[] = "Subject: x\r\n\r\nbody\r\n.\r\n";

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "EHLO client.example",
	           "250-fakesmtp\r\n250-8BITMIME\r\n250-SIZE 10485760\r\n"
	           "250-SMTPUTF8\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n");
	assert_cmd(fd, "MAIL FROM:<a@example.org> SIZE=12", "250 2.1.0 Ok\r\n");
	assert_cmd(fd, "RCPT TO:<b@example.net> NOTIFY=NEVER",
	           "250 2.1.5 Ok\r\n");
	assert_cmd(fd, "RCPT TO:<c@example.net>", "250 2.1.5 Ok\r\n");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, data);
	assert_reply(fd, "250 2.0.0 Ok: queued as FAKE1\r\n");
	assert_cmd(fd, "QUIT", "221 2.0.0 Bye\r\n");
	client_expect_eof(fd);
	close(fd);

	g_assert_cmpuint(fake_smtp_get_connections(fake), ==, 1);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 1);
	msg = fake_smtp_get_message(fake, 0);
	g_assert_nonnull(msg);
	g_assert_null(fake_smtp_get_message(fake, 1));
	g_assert_cmpstr(msg->mail_from, ==, "FROM:<a@example.org> SIZE=12");
	g_assert_cmpuint(msg->rcpt_to->len, ==, 2);
	g_assert_cmpstr(msg->rcpt_to->pdata[0], ==,
	                "TO:<b@example.net> NOTIFY=NEVER");
	g_assert_cmpstr(msg->rcpt_to->pdata[1], ==, "TO:<c@example.net>");
	assert_bytes_str(msg->wire, data);
	assert_bytes_str(msg->content, "Subject: x\r\n\r\nbody\r\n");

	cmds = fake_smtp_get_commands(fake);
	g_assert_cmpuint(cmds->len, ==, 6);
	g_assert_cmpstr(cmds->pdata[0], ==, "EHLO client.example");
	g_assert_cmpstr(cmds->pdata[3], ==, "RCPT TO:<c@example.net>");
	g_assert_cmpstr(cmds->pdata[4], ==, "DATA");
	g_assert_cmpstr(cmds->pdata[5], ==, "QUIT");

	received = fake_smtp_get_received(fake);
	assert_bytes_str(received, "EHLO client.example\r\n"
	                           "MAIL FROM:<a@example.org> SIZE=12\r\n"
	                           "RCPT TO:<b@example.net> NOTIFY=NEVER\r\n"
	                           "RCPT TO:<c@example.net>\r\n"
	                           "DATA\r\n"
	                           "Subject: x\r\n\r\nbody\r\n.\r\n"
	                           "QUIT\r\n");
}

/* Default replies out of sequence, as Postfix words them. */
static void
test_plain_sequence(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake = start(NULL, NULL, &port);
	int fd = client_connect(port);

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "RCPT TO:<b@x>",
	           "503 5.5.1 Error: need MAIL command\r\n");
	assert_cmd(fd, "DATA", "503 5.5.1 Error: need MAIL command\r\n");
	assert_cmd(fd, "MAIL <a@x>",
	           "501 5.5.4 Syntax: MAIL FROM:<address>\r\n");
	assert_cmd(fd, "mail from:<a@x>", "250 2.1.0 Ok\r\n");
	assert_cmd(fd, "DATA", "503 5.5.1 Error: need RCPT command\r\n");
	assert_cmd(fd, "RCPT <b@x>", "501 5.5.4 Syntax: RCPT TO:<address>\r\n");
	assert_cmd(fd, "STARTTLS",
	           "502 5.5.1 Error: command not implemented\r\n");
	assert_cmd(fd, "AUTH PLAIN",
	           "502 5.5.1 Error: command not implemented\r\n");
	assert_cmd(fd, "BDAT 10 LAST",
	           "500 5.5.2 Error: command not recognized\r\n");
	assert_cmd(fd, "", "500 5.5.2 Error: command not recognized\r\n");
	assert_cmd(fd, "NOOP", "250 2.0.0 Ok\r\n");
	assert_cmd(fd, "RSET", "250 2.0.0 Ok\r\n");
	assert_cmd(fd, "HELO x", "250 fakesmtp\r\n");
	/* a bare LF ends a command line too */
	client_send(fd, "NOOP\n");
	assert_reply(fd, "250 2.0.0 Ok\r\n");
	/* "DOT" names the end of data in scripts, never a command */
	assert_cmd(fd, "DOT", "500 5.5.2 Error: command not recognized\r\n");
	close(fd);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 0);
}

/* RSET, a new MAIL, EHLO and HELO each start a new transaction. */
static void
test_plain_reset(void)
{
	static const char *const resets[] = {"RSET", "MAIL FROM:<new@x>",
	                                     "EHLO again", "HELO again"};
	guint16 port;
	g_autoptr(FakeSmtp) fake = start(NULL, NULL, &port);

	for (guint i = 0; i < G_N_ELEMENTS(resets); i++) {
		int fd = client_connect(port);
		g_autofree char *r = NULL;
		g_autofree char *r2 = NULL;
		const FakeSmtpMessage *msg;

		client_envelope(fd, "old@x", "old@y");
		r = client_cmd(fd, resets[i]);
		g_assert_true(g_str_has_prefix(r, "250"));
		if (i != 1)
			assert_cmd(fd, "MAIL FROM:<new@x>", "250 2.1.0 Ok\r\n");
		assert_cmd(fd, "RCPT TO:<new@y>", "250 2.1.5 Ok\r\n");
		assert_cmd(fd, "DATA",
		           "354 End data with <CR><LF>.<CR><LF>\r\n");
		client_send(fd, "x\r\n.\r\n");
		r2 = client_reply(fd);
		g_assert_true(g_str_has_prefix(r2, "250"));
		close(fd);

		g_assert_true(fake_smtp_wait_messages(fake, i + 1, WAIT_MS));
		msg = fake_smtp_get_message(fake, i);
		g_assert_cmpstr(msg->mail_from, ==, "FROM:<new@x>");
		g_assert_cmpuint(msg->rcpt_to->len, ==, 1);
		g_assert_cmpstr(msg->rcpt_to->pdata[0], ==, "TO:<new@y>");
	}
}

/* ---- message data -------------------------------------------------- */

typedef struct {
	const char *name;
	const char *wire;    /* sent after DATA, up to the final dot */
	const char *content; /* expected un-stuffed content */
} DataCase;

static const DataCase data_cases[] = {
    {"empty", ".\r\n", ""},
    {"one-line", "a\r\n.\r\n", "a\r\n"},
    {"stuffed", "..a\r\n...\r\nb.\r\n..\r\n.\r\n", ".a\r\n..\r\nb.\r\n.\r\n"},
    {"stuffed-first", "..\r\n.\r\n", ".\r\n"},
    /* a dot after a bare LF is not at a line start: kept */
    {"bare-lf", "a\n.b\r\n.\r\n", "a\n.b\r\n"},
    /* LF.LF and CR.CR do not end the data */
    {"bare-lf-dot", "a\n.\nb\r.\rc\r\n.\r\n", "a\n.\nb\r.\rc\r\n"},
    {"nul", "a\0b\r\n.\r\n", "a\0b\r\n"},
};

static gsize
data_len(const char *wire)
{
	/* The cases hold NULs: the wire ends at its ".\r\n" marker. */
	const char *end = wire;

	if (strncmp(wire, ".\r\n", 3) == 0)
		return 3;
	for (;;) {
		end = memchr(end, '\r', 64);
		g_assert_nonnull(end);
		if (strncmp(end, "\r\n.\r\n", 5) == 0)
			return (gsize)(end - wire) + 5;
		end++;
	}
}

static void
test_data_case(gconstpointer user_data)
{
	const DataCase *dc = user_data;
	gsize wire_len = data_len(dc->wire);
	gsize content_len = wire_len - 3;
	guint16 port;

	/* Whole, then one byte per write so the end marker is split. */
	for (int split = 0; split < 2; split++) {
		g_autoptr(FakeSmtp) fake = start(NULL, NULL, &port);
		int fd = client_connect(port);
		const FakeSmtpMessage *msg;
		gsize expect_len;

		client_envelope(fd, "a@x", "b@y");
		assert_cmd(fd, "DATA",
		           "354 End data with <CR><LF>.<CR><LF>\r\n");
		if (split) {
			for (gsize i = 0; i < wire_len; i++) {
				client_send_len(fd, dc->wire + i, 1);
				g_usleep(1000);
			}
		} else {
			client_send_len(fd, dc->wire, wire_len);
		}
		assert_reply(fd, "250 2.0.0 Ok: queued as FAKE1\r\n");
		close(fd);

		msg = fake_smtp_get_message(fake, 0);
		g_assert_nonnull(msg);
		assert_bytes(msg->wire, dc->wire, wire_len);
		/* the expected content is the wire minus stuffing */
		expect_len = content_len;
		for (gsize i = 0; i < content_len; i++)
			if (dc->wire[i] == '.' &&
			    (i == 0 || (i >= 2 && dc->wire[i - 1] == '\n' &&
			                dc->wire[i - 2] == '\r')))
				expect_len--;
		assert_bytes(msg->content, dc->content, expect_len);
	}
}

/* Everything in one write: commands after the data are read too. */
static void
test_data_pipelining(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake = start(NULL, NULL, &port);
	int fd = client_connect(port);

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	client_send(fd, "EHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n"
	                "DATA\r\none\r\n.\r\nMAIL FROM:<c@x>\r\n"
	                "RCPT TO:<d@y>\r\nDATA\r\ntwo\r\n.\r\nQUIT\r\n");
	g_free(client_reply(fd));
	assert_reply(fd, "250 2.1.0 Ok\r\n");
	assert_reply(fd, "250 2.1.5 Ok\r\n");
	assert_reply(fd, "354 End data with <CR><LF>.<CR><LF>\r\n");
	assert_reply(fd, "250 2.0.0 Ok: queued as FAKE1\r\n");
	assert_reply(fd, "250 2.1.0 Ok\r\n");
	assert_reply(fd, "250 2.1.5 Ok\r\n");
	assert_reply(fd, "354 End data with <CR><LF>.<CR><LF>\r\n");
	assert_reply(fd, "250 2.0.0 Ok: queued as FAKE2\r\n");
	assert_reply(fd, "221 2.0.0 Bye\r\n");
	client_expect_eof(fd);
	close(fd);

	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 2);
	assert_bytes_str(fake_smtp_get_message(fake, 1)->content, "two\r\n");
	g_assert_cmpstr(fake_smtp_get_message(fake, 1)->mail_from, ==,
	                "FROM:<c@x>");
}

/* ---- script directives --------------------------------------------- */

static void
test_script_greeting(void)
{
	guint16 port;

	{
		g_autoptr(FakeSmtp) fake = start(
		    "greeting 220-mx.example hello|220 more", NULL, &port);
		int fd = client_connect(port);

		assert_reply(fd, "220-mx.example hello\r\n220 more\r\n");
		close(fd);
	}
	{
		g_autoptr(FakeSmtp) fake = start("greeting none", NULL, &port);
		int fd = client_connect(port);

		client_expect_silence(fd, 200);
		/* it still answers commands */
		assert_cmd(fd, "NOOP", "250 2.0.0 Ok\r\n");
		close(fd);
	}
	{
		g_autoptr(FakeSmtp) fake =
		    start("greeting 554 5.7.1 go away", NULL, &port);
		int fd = client_connect(port);

		assert_reply(fd, "554 5.7.1 go away\r\n");
		assert_cmd(fd, "NOOP", "250 2.0.0 Ok\r\n");
		close(fd);
	}
	{
		/* 421 closes the channel, as a real server does */
		g_autoptr(FakeSmtp) fake =
		    start("greeting 421 4.3.2 busy", NULL, &port);
		int fd = client_connect(port);

		assert_reply(fd, "421 4.3.2 busy\r\n");
		client_expect_eof(fd);
		close(fd);
	}
}

typedef struct {
	const char *script;
	const char *reply;
} EhloCase;

static const EhloCase ehlo_cases[] = {
    {"ehlo-keywords PIPELINING SIZE 1000 AUTH PLAIN LOGIN STARTTLS "
     "\"X-FOO a b\" 8BITMIME",
     "250-fakesmtp\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
     "250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n250-X-FOO a b\r\n"
     "250 8BITMIME\r\n"},
    {"ehlo-keywords", "250 fakesmtp\r\n"},
    {"ehlo-keywords SMTPUTF8\nehlo-keywords DSN",
     "250-fakesmtp\r\n250 DSN\r\n"},
    /* a rule on EHLO replaces the whole reply, keywords and all */
    {"on EHLO reply 250-a|250-b|250 c", "250-a\r\n250-b\r\n250 c\r\n"},
};

static void
test_script_ehlo(gconstpointer user_data)
{
	const EhloCase *ec = user_data;
	guint16 port;
	g_autoptr(FakeSmtp) fake = start(ec->script, NULL, &port);
	int fd = client_connect(port);

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "EHLO x", ec->reply);
	close(fd);
}

/* on RCPT#2: the second RCPT of each connection, not of the server. */
static void
test_script_nth(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake = start("on RCPT#2 reply 550 5.1.1 second\n"
	                                 "on NOOP#1 reply 250 first noop\n",
	                                 NULL, &port);

	for (int round = 0; round < 2; round++) {
		int fd = client_connect(port);
		const FakeSmtpMessage *msg;

		client_envelope(fd, "a@x", "one@y");
		assert_cmd(fd, "RCPT TO:<two@y>", "550 5.1.1 second\r\n");
		assert_cmd(fd, "RCPT TO:<three@y>", "250 2.1.5 Ok\r\n");
		assert_cmd(fd, "NOOP", "250 first noop\r\n");
		assert_cmd(fd, "NOOP", "250 2.0.0 Ok\r\n");
		assert_cmd(fd, "DATA",
		           "354 End data with <CR><LF>.<CR><LF>\r\n");
		client_send(fd, "x\r\n.\r\n");
		g_free(client_reply(fd));
		close(fd);

		g_assert_true(
		    fake_smtp_wait_messages(fake, round + 1, WAIT_MS));
		msg = fake_smtp_get_message(fake, round);
		g_assert_cmpuint(msg->rcpt_to->len, ==, 2);
		g_assert_cmpstr(msg->rcpt_to->pdata[0], ==, "TO:<one@y>");
		g_assert_cmpstr(msg->rcpt_to->pdata[1], ==, "TO:<three@y>");
	}
}

/* DOT counts the messages of a connection. */
static void
test_script_nth_dot(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake =
	    start("on DOT#2 reply 451 4.3.0 try again", NULL, &port);
	int fd = client_connect(port);

	client_envelope(fd, "a@x", "b@y");
	for (int i = 1; i <= 3; i++) {
		if (i > 1) {
			assert_cmd(fd, "MAIL FROM:<a@x>", "250 2.1.0 Ok\r\n");
			assert_cmd(fd, "RCPT TO:<b@y>", "250 2.1.5 Ok\r\n");
		}
		assert_cmd(fd, "DATA",
		           "354 End data with <CR><LF>.<CR><LF>\r\n");
		client_send(fd, "x\r\n.\r\n");
		if (i == 2)
			assert_reply(fd, "451 4.3.0 try again\r\n");
		else
			assert_reply(fd, i == 1 ? "250 2.0.0 Ok: queued as "
			                          "FAKE1\r\n"
			                        : "250 2.0.0 Ok: queued as "
			                          "FAKE2\r\n");
	}
	close(fd);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 2);
}

/* Regexes on the argument; the first matching rule wins. */
static void
test_script_regex(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake =
	    start("# comment line\n"
	          "\n"
	          "on MAIL /(?i)size=99/ reply 552 5.3.4 too big\n"
	          "on RCPT /^TO:<bad\\/[0-9]+@/ reply 550 5.1.1 bad #1\n"
	          "on RCPT /^TO:<bad/ reply 551 never\n"
	          "on RCPT /\\xff/ reply 553 raw byte\n"
	          "on DOT /Subject: spam/ reply 554 5.7.1 spam\n",
	          NULL, &port);
	int fd = client_connect(port);

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "MAIL FROM:<a@x> size=99", "552 5.3.4 too big\r\n");
	assert_cmd(fd, "MAIL FROM:<a@x> SIZE=98", "250 2.1.0 Ok\r\n");
	assert_cmd(fd, "RCPT TO:<bad/12@y>", "550 5.1.1 bad #1\r\n");
	assert_cmd(fd, "RCPT TO:<bad@y>", "551 never\r\n");
	assert_cmd(fd, "RCPT TO:<\xff\xfe@y>", "553 raw byte\r\n");
	assert_cmd(fd, "RCPT TO:<good@y>", "250 2.1.5 Ok\r\n");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, "Subject: spam\r\n\r\nx\r\n.\r\n");
	assert_reply(fd, "554 5.7.1 spam\r\n");
	/* a refused message is not recorded, and the transaction is over */
	assert_cmd(fd, "DATA", "503 5.5.1 Error: need MAIL command\r\n");
	assert_cmd(fd, "MAIL FROM:<a@x>", "250 2.1.0 Ok\r\n");
	assert_cmd(fd, "RCPT TO:<good@y>", "250 2.1.5 Ok\r\n");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, "Subject: ham\r\n\r\nx\r\n.\r\n");
	assert_reply(fd, "250 2.0.0 Ok: queued as FAKE1\r\n");
	close(fd);

	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 1);
	g_assert_cmpuint(fake_smtp_get_message(fake, 0)->rcpt_to->len, ==, 1);
}

/* ---- actions -------------------------------------------------------- */

static void
test_action_reply_effects(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake =
	    start("on MAIL #1 reply 451 4.3.0 later\n"
	          "on RCPT /ok2/ reply 251 2.1.5 forwarded\n"
	          "on DATA reply 354 go ahead\n"
	          "on DOT reply 250-2.0.0 first|250 2.0.0 queued\n",
	          NULL, &port);
	int fd = client_connect(port);
	const FakeSmtpMessage *msg;

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "MAIL FROM:<a@x>", "451 4.3.0 later\r\n");
	/* a refused MAIL starts no transaction */
	assert_cmd(fd, "RCPT TO:<ok1@y>",
	           "503 5.5.1 Error: need MAIL command\r\n");
	assert_cmd(fd, "MAIL FROM:<b@x>", "250 2.1.0 Ok\r\n");
	assert_cmd(fd, "RCPT TO:<ok2@y>", "251 2.1.5 forwarded\r\n");
	assert_cmd(fd, "DATA", "354 go ahead\r\n");
	client_send(fd, "x\r\n.\r\n");
	assert_reply(fd, "250-2.0.0 first\r\n250 2.0.0 queued\r\n");
	close(fd);

	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 1);
	msg = fake_smtp_get_message(fake, 0);
	g_assert_cmpstr(msg->mail_from, ==, "FROM:<b@x>");
	g_assert_cmpuint(msg->rcpt_to->len, ==, 1);
	g_assert_cmpstr(msg->rcpt_to->pdata[0], ==, "TO:<ok2@y>");
}

static void
test_action_421_quit(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake = start("on NOOP reply 421 4.4.2 timeout\n"
	                                 "on QUIT reply 221 see you\n",
	                                 NULL, &port);
	int fd = client_connect(port);

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "NOOP", "421 4.4.2 timeout\r\n");
	client_expect_eof(fd);
	close(fd);

	fd = client_connect(port);
	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "QUIT", "221 see you\r\n");
	client_expect_eof(fd);
	close(fd);
	g_assert_cmpuint(fake_smtp_get_connections(fake), ==, 2);
}

static void
test_action_close(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake =
	    start("on RCPT close\non DOT close", NULL, &port);
	int fd = client_connect(port);

	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "MAIL FROM:<a@x>", "250 2.1.0 Ok\r\n");
	client_send(fd, "RCPT TO:<b@y>\r\n");
	client_expect_eof(fd);
	close(fd);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 0);
}

static void
test_action_close_dot(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake = start("on DOT close", NULL, &port);
	int fd = client_connect(port);

	client_envelope(fd, "a@x", "b@y");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, "x\r\n.\r\n");
	client_expect_eof(fd);
	close(fd);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 0);
}

static void
test_action_close_in_data(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake = start("on DATA close-in-data", NULL, &port);
	int fd = client_connect(port);
	g_autofree char *received = NULL;

	client_envelope(fd, "a@x", "b@y");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_expect_silence(fd, 100);
	client_send(fd, "Subject: first chunk\r\n");
	client_expect_eof(fd);
	close(fd);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 0);

	received = received_str(fake);
	g_assert_true(
	    g_str_has_suffix(received, "DATA\r\nSubject: first chunk\r\n"));
}

/* Data that came with DATA in one write is the first chunk too. */
static void
test_action_close_in_data_pipelined(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake =
	    start("on DATA#2 close-in-data", NULL, &port);
	int fd = client_connect(port);

	client_envelope(fd, "a@x", "b@y");
	client_send(fd, "DATA\r\none\r\n.\r\nMAIL FROM:<a@x>\r\n"
	                "RCPT TO:<b@y>\r\nDATA\r\nSubject: two\r\n");
	assert_reply(fd, "354 End data with <CR><LF>.<CR><LF>\r\n");
	assert_reply(fd, "250 2.0.0 Ok: queued as FAKE1\r\n");
	assert_reply(fd, "250 2.1.0 Ok\r\n");
	assert_reply(fd, "250 2.1.5 Ok\r\n");
	assert_reply(fd, "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_expect_eof(fd);
	close(fd);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 1);
}

/* Stop must return promptly while a connection stalls. */
static void
test_action_stall_stop(void)
{
	guint16 port;
	FakeSmtp *fake = start("on DATA stall", NULL, &port);
	int fd = client_connect(port);
	int other;
	gint64 t0;
	g_autofree char *received = NULL;
	g_autoptr(GPtrArray) cmds = NULL;

	client_envelope(fd, "a@x", "b@y");
	client_send(fd, "DATA\r\n");
	client_expect_silence(fd, 300);
	/* still read and recorded, never processed */
	client_send(fd, "NOOP\r\n");
	client_expect_silence(fd, 100);

	/* another connection is not held up */
	other = client_connect(port);
	assert_reply(other, "220 fakesmtp ESMTP\r\n");
	assert_cmd(other, "NOOP", "250 2.0.0 Ok\r\n");

	t0 = g_get_monotonic_time();
	fake_smtp_stop(fake);
	g_assert_cmpint(g_get_monotonic_time() - t0, <, 2 * G_USEC_PER_SEC);
	client_expect_eof(fd);
	client_expect_eof(other);
	close(fd);
	close(other);

	received = received_str(fake);
	g_assert_true(g_str_has_suffix(received, "DATA\r\nNOOP\r\nNOOP\r\n"));
	cmds = fake_smtp_get_commands(fake);
	g_assert_cmpstr(cmds->pdata[cmds->len - 2], ==, "DATA");
	g_assert_cmpstr(cmds->pdata[cmds->len - 1], ==, "NOOP");

	t0 = g_get_monotonic_time();
	fake_smtp_free(fake);
	g_assert_cmpint(g_get_monotonic_time() - t0, <, 2 * G_USEC_PER_SEC);
}

static void
test_action_delay(void)
{
	guint16 port;
	FakeSmtp *fake = start("on NOOP#1 delay 300 reply 250 slow\n"
	                       "on NOOP#2 delay 60000 reply 250 slower\n"
	                       "on DOT delay 200 reply 250 stored late\n",
	                       NULL, &port);
	int fd = client_connect(port);
	gint64 t0;

	client_envelope(fd, "a@x", "b@y");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	t0 = g_get_monotonic_time();
	client_send(fd, "x\r\n.\r\n");
	assert_reply(fd, "250 stored late\r\n");
	g_assert_cmpint(g_get_monotonic_time() - t0, >=, 200 * 1000);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 1);

	t0 = g_get_monotonic_time();
	assert_cmd(fd, "NOOP", "250 slow\r\n");
	g_assert_cmpint(g_get_monotonic_time() - t0, >=, 300 * 1000);

	/* a long delay does not hold up stop */
	client_send(fd, "NOOP\r\n");
	client_expect_silence(fd, 100);
	t0 = g_get_monotonic_time();
	fake_smtp_free(fake);
	g_assert_cmpint(g_get_monotonic_time() - t0, <, 2 * G_USEC_PER_SEC);
	client_expect_eof(fd);
	close(fd);
}

static void
test_action_raw(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake =
	    start("on NOOP#1 raw 250 bare lf\\n\n"
	          "on NOOP#2 raw 25\n"
	          "on NOOP#3 raw \\x32\\x350 a\\x00b\\t\\\\\\r\\n\n"
	          "on DATA raw 354 raw go\\r\\n\n"
	          "on DOT raw 250 raw done\\r\\n\n",
	          NULL, &port);
	int fd = client_connect(port);

	client_envelope(fd, "a@x", "b@y");
	client_send(fd, "NOOP\r\n");
	client_expect_bytes(fd, "250 bare lf\n", 12);
	/* raw sends no line end of its own */
	client_send(fd, "NOOP\r\n");
	client_expect_bytes(fd, "25", 2);
	client_expect_silence(fd, 100);
	client_send(fd, "NOOP\r\n");
	client_expect_bytes(fd, "250 a\0b\t\\\r\n", 11);

	/* a raw 354 to DATA starts message data, a raw 250 records it */
	assert_cmd(fd, "DATA", "354 raw go\r\n");
	client_send(fd, "x\r\n.\r\n");
	assert_reply(fd, "250 raw done\r\n");
	close(fd);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 1);
}

/* ---- parse errors ---------------------------------------------------- */

typedef struct {
	const char *line;    /* placed on line 3 of the script */
	const char *message; /* expected in the error */
} ParseCase;

static const ParseCase parse_cases[] = {
    {"bogus directive", "line 3: unknown directive \"bogus\""},
    {"on", "line 3: \"on\" needs a verb"},
    {"on FROB reply 250 x", "line 3: unknown verb \"FROB\""},
    {"on RCPT#0 reply 250 x", "line 3: bad count \"0\""},
    {"on RCPT#x reply 250 x", "line 3: bad count \"x\""},
    {"on RCPT#", "line 3: bad count \"\""},
    {"on RCPT", "line 3: missing action"},
    {"on RCPT /x/", "line 3: missing action"},
    {"on RCPT dance", "line 3: unknown action \"dance\""},
    {"on RCPT reply", "line 3: bad reply"},
    {"on RCPT reply 25 x", "line 3: bad reply \"25 x\""},
    {"on RCPT reply 250x", "line 3: bad reply"},
    {"on RCPT reply 250 a|", "line 3: bad reply \"\""},
    {"on RCPT reply ok", "line 3: bad reply"},
    {"on RCPT /x reply 250 x", "line 3: regex has no closing"},
    {"on RCPT /(/ reply 250 x", "line 3: bad regex /(/"},
    {"on RCPT delay reply 250", "line 3: delay needs milliseconds"},
    {"on RCPT delay -5 250 x", "line 3: delay needs milliseconds"},
    {"on RCPT delay 10", "line 3: bad reply"},
    {"on RCPT raw", "line 3: raw needs some text"},
    {"on RCPT raw a\\q", "line 3: bad escape"},
    {"on RCPT raw \\x4", "line 3: bad escape"},
    {"on RCPT raw a\\", "line 3: bad escape"},
    {"on RCPT close now", "line 3: close takes no argument"},
    {"on RCPT stall 5", "line 3: stall takes no argument"},
    {"on MAIL close-in-data", "line 3: close-in-data is for DATA only"},
    {"greeting hello", "line 3: bad reply"},
    {"greeting", "line 3: bad reply"},
    {"ehlo-keywords \"unclosed", "line 3: bad ehlo-keywords"},
};

static void
test_parse_error(gconstpointer user_data)
{
	const ParseCase *pc = user_data;
	g_autofree char *script = g_strdup_printf(
	    "# a comment\r\non NOOP reply 250 fine\r\n%s\non QUIT close\n",
	    pc->line);
	g_autoptr(GError) error = NULL;
	g_autoptr(FakeSmtp) fake = fake_smtp_new(script, &error);

	g_assert_null(fake);
	g_assert_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT);
	if (strstr(error->message, pc->message) == NULL)
		g_error("\"%s\": got \"%s\", want \"%s\"", pc->line,
		        error->message, pc->message);
}

/* ---- store directory ------------------------------------------------ */

static char *
read_file(const char *dir, const char *name)
{
	g_autofree char *path = g_build_filename(dir, name, NULL);
	char *text = NULL;

	if (!g_file_get_contents(path, &text, NULL, NULL))
		return NULL;
	return text;
}

static void
send_message(guint16 port, const char *from, const char *to, const char *data,
             const char *expect)
{
	int fd = client_connect(port);

	client_envelope(fd, from, to);
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, data);
	assert_reply(fd, expect);
	close(fd);
}

static void
test_store(void)
{
	g_autofree char *dir = g_dir_make_tmp("fakesmtp-XXXXXX", NULL);
	guint16 port;
	FakeSmtp *fake = start("on RCPT /refused/ reply 550 no", dir, &port);
	g_autofree char *env1 = NULL;
	g_autofree char *eml1 = NULL;
	g_autofree char *env2 = NULL;
	g_autofree char *eml2 = NULL;
	g_autoptr(GDir) d = NULL;
	const char *name;
	guint files = 0;
	int fd;

	g_assert_nonnull(dir);
	fd = client_connect(port);
	client_envelope(fd, "a@x", "b@y");
	assert_cmd(fd, "RCPT TO:<refused@y>", "550 no\r\n");
	assert_cmd(fd, "RCPT TO:<c@y> NOTIFY=NEVER", "250 2.1.5 Ok\r\n");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, "A: 1\r\n\r\n..x\r\n.\r\n");
	assert_reply(fd, "250 2.0.0 Ok: queued as FAKE1\r\n");
	close(fd);
	send_message(port, "", "d@y", "B: 2\r\n.\r\n",
	             "250 2.0.0 Ok: queued as FAKE2\r\n");

	env1 = read_file(dir, "1.env");
	eml1 = read_file(dir, "1.eml");
	env2 = read_file(dir, "2.env");
	eml2 = read_file(dir, "2.eml");
	g_assert_cmpstr(env1, ==,
	                "MAIL FROM:<a@x>\nRCPT TO:<b@y>\n"
	                "RCPT TO:<c@y> NOTIFY=NEVER\n");
	g_assert_cmpstr(eml1, ==, "A: 1\r\n\r\n.x\r\n");
	g_assert_cmpstr(env2, ==, "MAIL FROM:<>\nRCPT TO:<d@y>\n");
	g_assert_cmpstr(eml2, ==, "B: 2\r\n");

	/* nothing else: no temporary file is left behind */
	d = g_dir_open(dir, 0, NULL);
	while ((name = g_dir_read_name(d)) != NULL)
		files++;
	g_assert_cmpuint(files, ==, 4);

	/* a store that fails: 451, and the message is not recorded */
	for (guint i = 1; i <= 2; i++) {
		g_autofree char *n = g_strdup_printf("%u.env", i);
		g_autofree char *e = g_strdup_printf("%u.eml", i);
		g_autofree char *pn = g_build_filename(dir, n, NULL);
		g_autofree char *pe = g_build_filename(dir, e, NULL);

		g_assert_cmpint(g_unlink(pn), ==, 0);
		g_assert_cmpint(g_unlink(pe), ==, 0);
	}
	g_assert_cmpint(g_rmdir(dir), ==, 0);
	if (g_test_verbose())
		g_printerr("(a \"cannot store\" line follows, as expected)\n");
	send_message(port, "a@x", "b@y", "C\r\n.\r\n",
	             "451 4.3.0 Error: cannot store message\r\n");
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 2);
	fake_smtp_free(fake);
}

/*
 * Store files appear whole: inotify must show each final name only as
 * the target of a rename (never created or written under that name),
 * and N.env before N.eml.
 */
#define BIG_LEN   (1024 * 1024)
#define BIG_COUNT 3

static gboolean
is_store_name(const char *name)
{
	return g_regex_match_simple("^[0-9]+\\.(eml|env)$", name, 0, 0);
}

static void
test_store_atomic(void)
{
	g_autofree char *dir = g_dir_make_tmp("fakesmtp-XXXXXX", NULL);
	g_autofree char *body = g_malloc(BIG_LEN + 3);
	g_autoptr(GString) order = g_string_new(NULL);
	char events[64 * 1024]
	    __attribute__((aligned(__alignof__(struct inotify_event))));
	ssize_t n;
	guint16 port;
	FakeSmtp *fake;
	int in_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);

	g_assert_cmpint(in_fd, >=, 0);
	g_assert_cmpint(inotify_add_watch(in_fd, dir,
	                                  IN_CREATE | IN_MOVED_TO |
	                                      IN_CLOSE_WRITE | IN_MODIFY),
	                >=, 0);
	fake = start(NULL, dir, &port);

	/* lines of 78 'x' and CRLF, then the end marker */
	for (gsize i = 0; i < BIG_LEN; i++)
		body[i] = i % 80 == 78 ? '\r' : i % 80 == 79 ? '\n' : 'x';
	body[BIG_LEN - 2] = '\r';
	body[BIG_LEN - 1] = '\n';
	memcpy(body + BIG_LEN, ".\r\n", 3);
	for (guint i = 1; i <= BIG_COUNT; i++) {
		int fd = client_connect(port);
		g_autofree char *expect =
		    g_strdup_printf("250 2.0.0 Ok: queued as FAKE%u\r\n", i);

		client_envelope(fd, "a@x", "b@y");
		assert_cmd(fd, "DATA",
		           "354 End data with <CR><LF>.<CR><LF>\r\n");
		client_send_len(fd, body, BIG_LEN + 3);
		assert_reply(fd, expect);
		close(fd);
	}
	fake_smtp_free(fake);

	while ((n = read(in_fd, events, sizeof(events))) > 0) {
		for (char *p = events; p < events + n;) {
			struct inotify_event *ev = (void *)p;

			p += sizeof(*ev) + ev->len;
			if (ev->len == 0 || !is_store_name(ev->name))
				continue;
			if (ev->mask != IN_MOVED_TO)
				g_error("%s: event 0x%x, not a rename",
				        ev->name, ev->mask);
			g_string_append_printf(order, "%s ", ev->name);
		}
	}
	close(in_fd);
	g_assert_cmpstr(order->str, ==, "1.env 1.eml 2.env 2.eml 3.env 3.eml ");

	for (guint i = 1; i <= BIG_COUNT; i++) {
		g_autofree char *eml = g_strdup_printf("%s/%u.eml", dir, i);
		g_autofree char *env = g_strdup_printf("%s/%u.env", dir, i);
		g_autofree char *text = NULL;
		gsize len = 0;

		g_assert_true(g_file_get_contents(eml, &text, &len, NULL));
		g_assert_cmpmem(text, len, body, BIG_LEN);
		g_unlink(eml);
		g_unlink(env);
	}
	g_assert_cmpint(g_rmdir(dir), ==, 0);
}

/* A missing store directory is an error at start, not per message. */
static void
test_store_missing(void)
{
	g_autoptr(FakeSmtp) fake = fake_smtp_new(NULL, NULL);
	g_autoptr(GError) error = NULL;

	g_assert_cmpuint(
	    fake_smtp_start(fake, "127.0.0.1", "/nonexistent/fakesmtp", &error),
	    ==, 0);
	g_assert_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_LISTEN);
}

/* ---- start, stop, wait ---------------------------------------------- */

static void
test_start_addresses(void)
{
	g_autoptr(FakeSmtp) fake = fake_smtp_new("", NULL);
	g_autoptr(FakeSmtp) other = fake_smtp_new(NULL, NULL);
	g_autoptr(GError) error = NULL;
	guint16 port, fixed;
	int fd, reserved;

	/* IPv6 loopback */
	port = fake_smtp_start(fake, "::1", NULL, &error);
	g_assert_no_error(error);
	fd = client_connect_to("::1", port);
	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	close(fd);

	/* the same port twice: an error naming the address */
	g_assert_cmpuint(fake_smtp_start_port(other, "::1", port, NULL, &error),
	                 ==, 0);
	g_assert_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_LISTEN);
	g_assert_nonnull(strstr(error->message, "[::1]"));
	g_clear_error(&error);

	/*
	 * stop keeps the record; a restart on a fixed IPv4 port works.  Not
	 * the IPv6 port: free on ::1 is not free on 127.0.0.1, and once let
	 * go any other process may take it; a reserved port is safe.
	 */
	fake_smtp_stop(fake);
	fake_smtp_stop(fake);
	reserved = reserve_port(&fixed);
	g_assert_cmpuint(
	    fake_smtp_start_port(fake, "127.0.0.1", fixed, NULL, &error), ==,
	    fixed);
	g_assert_no_error(error);
	fd = client_connect(fixed);
	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "NOOP", "250 2.0.0 Ok\r\n");
	close(fd);
	g_assert_true(fake_smtp_get_connections(fake) >= 1);
	fake_smtp_stop(fake);
	g_assert_cmpuint(fake_smtp_get_connections(fake), ==, 2);
	close(reserved);

	/* not an address */
	g_assert_cmpuint(fake_smtp_start(other, "localhost", NULL, &error), ==,
	                 0);
	g_assert_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_LISTEN);
}

static gpointer
late_sender(gpointer data)
{
	guint16 port = GPOINTER_TO_UINT(data);

	g_usleep(200 * 1000);
	send_message(port, "a@x", "b@y", "x\r\n.\r\n",
	             "250 2.0.0 Ok: queued as FAKE1\r\n");
	return NULL;
}

static void
test_wait_messages(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake = start(NULL, NULL, &port);
	GThread *thread;
	gint64 t0 = g_get_monotonic_time();

	g_assert_false(fake_smtp_wait_messages(fake, 1, 150));
	g_assert_cmpint(g_get_monotonic_time() - t0, >=, 150 * 1000);
	g_assert_true(fake_smtp_wait_messages(fake, 0, 0));

	thread = g_thread_new("sender", late_sender, GUINT_TO_POINTER(port));
	g_assert_true(fake_smtp_wait_messages(fake, 1, WAIT_MS));
	g_thread_join(thread);
	g_assert_false(fake_smtp_wait_messages(fake, 2, 10));
}

/* ---- hostile input -------------------------------------------------- */

static void
test_hostile(void)
{
	guint16 port;
	g_autoptr(FakeSmtp) fake =
	    start("on RCPT /x/ reply 550 x", NULL, &port);
	g_autofree char *junk = g_malloc(200 * 1024);
	g_autoptr(GRand) rand = g_rand_new_with_seed(42);
	int fd = client_connect(port);

	/* an over-long line: refused once, then back in step */
	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	memset(junk, 'A', 200 * 1024);
	client_send_len(fd, junk, 200 * 1024);
	client_send(fd, "\r\n");
	assert_reply(fd, "500 5.5.2 Error: line too long\r\n");
	assert_cmd(fd, "NOOP", "250 2.0.0 Ok\r\n");

	/* NULs, control bytes, invalid UTF-8, lone CRs */
	send_lit(fd, "MAIL FROM:<a\0b>\r\n");
	assert_reply(fd, "250 2.1.0 Ok\r\n");
	send_lit(fd, "RCPT TO:<\xc3\x28x\r\r>\r\n");
	assert_reply(fd, "550 x\r\n");
	send_lit(fd, "\0\0\0\r\n");
	assert_reply(fd, "500 5.5.2 Error: command not recognized\r\n");
	close(fd);

	/* random bytes, then a disconnect in the middle of data */
	for (int i = 0; i < 20; i++) {
		fd = client_connect(port);
		for (gsize j = 0; j < 4096; j++)
			junk[j] = (char)g_rand_int_range(rand, 0, 256);
		client_send_len(fd, junk, 4096);
		close(fd);
	}
	fd = client_connect(port);
	client_envelope(fd, "a@x", "b@y");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, "half a message\r\n");
	close(fd);

	/* still serving */
	fd = client_connect(port);
	assert_reply(fd, "220 fakesmtp ESMTP\r\n");
	assert_cmd(fd, "NOOP", "250 2.0.0 Ok\r\n");
	close(fd);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 0);
	g_assert_cmpuint(fake_smtp_get_connections(fake), ==, 23);
}

/* Many clients at once each get their own thread and number. */
static gpointer
parallel_sender(gpointer data)
{
	guint16 port = GPOINTER_TO_UINT(data);
	int fd = client_connect(port);
	g_autofree char *r = NULL;

	client_envelope(fd, "a@x", "b@y");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, "x\r\n.\r\n");
	r = client_reply(fd);
	g_assert_true(g_str_has_prefix(r, "250 2.0.0 Ok: queued as FAKE"));
	close(fd);
	return NULL;
}

static void
test_parallel(void)
{
	g_autofree char *dir = g_dir_make_tmp("fakesmtp-XXXXXX", NULL);
	guint16 port;
	FakeSmtp *fake = start(NULL, dir, &port);
	GThread *threads[16];

	for (guint i = 0; i < G_N_ELEMENTS(threads); i++)
		threads[i] = g_thread_new("client", parallel_sender,
		                          GUINT_TO_POINTER(port));
	for (guint i = 0; i < G_N_ELEMENTS(threads); i++)
		g_thread_join(threads[i]);
	g_assert_cmpuint(fake_smtp_get_message_count(fake), ==, 16);
	fake_smtp_free(fake);

	for (guint i = 1; i <= 16; i++) {
		const char *ext[] = {"eml", "env"};

		for (guint e = 0; e < 2; e++) {
			g_autofree char *name =
			    g_strdup_printf("%u.%s", i, ext[e]);
			g_autofree char *path =
			    g_build_filename(dir, name, NULL);

			g_assert_true(g_file_test(path, G_FILE_TEST_EXISTS));
			g_unlink(path);
		}
	}
	g_rmdir(dir);
}

/*
 * Past 512 live connections a client gets 421 and a close; once one
 * ends, there is room again.  Needs some 1100 descriptors.
 */
static void
test_connection_limit(void)
{
	struct rlimit rl;
	guint16 port;
	g_autoptr(FakeSmtp) fake = NULL;
	int fds[512];
	int fd = -1;

	g_assert_cmpint(getrlimit(RLIMIT_NOFILE, &rl), ==, 0);
	if (rl.rlim_cur < 1200) {
		rl.rlim_cur = MIN(rl.rlim_max, 1200);
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (rl.rlim_cur < 1200) {
		g_test_skip("fewer than 1200 file descriptors");
		return;
	}

	fake = start(NULL, NULL, &port);
	for (guint i = 0; i < G_N_ELEMENTS(fds); i++) {
		fds[i] = client_connect(port);
		assert_reply(fds[i], "220 fakesmtp ESMTP\r\n");
	}
	fd = client_connect(port);
	assert_reply(fd, "421 4.3.2 fakesmtp: too many connections\r\n");
	client_expect_eof(fd);
	close(fd);

	assert_cmd(fds[0], "QUIT", "221 2.0.0 Bye\r\n");
	client_expect_eof(fds[0]);
	close(fds[0]);
	/* the thread marks itself done just after the close: retry */
	for (int tries = 0;; tries++) {
		g_autofree char *r = NULL;

		fd = client_connect(port);
		r = client_reply(fd);
		if (g_strcmp0(r, "220 fakesmtp ESMTP\r\n") == 0)
			break;
		g_assert_cmpint(tries, <, 100);
		close(fd);
		g_usleep(20 * 1000);
	}
	assert_cmd(fd, "NOOP", "250 2.0.0 Ok\r\n");
	close(fd);
	for (guint i = 1; i < G_N_ELEMENTS(fds); i++)
		close(fds[i]);
}

/* ---- the fake-smtpd program ----------------------------------------- */

static const char *
smtpd_path(void)
{
	const char *path = g_getenv("FAKE_SMTPD");

	if (path == NULL)
		g_test_skip("FAKE_SMTPD is not set");
	return path;
}

/* A failed assertion must not leave a fake-smtpd behind. */
static void
die_with_parent(gpointer data)
{
	(void)data;
	prctl(PR_SET_PDEATHSIG, SIGKILL);
}

static int
run_status(const char *const *argv)
{
	g_autoptr(GError) error = NULL;
	int status = 0;

	g_assert_true(g_spawn_sync(
	    NULL, (char **)argv, NULL,
	    G_SPAWN_STDOUT_TO_DEV_NULL | G_SPAWN_STDERR_TO_DEV_NULL,
	    die_with_parent, NULL, NULL, NULL, &status, &error));
	g_assert_no_error(error);
	g_assert_true(WIFEXITED(status));
	return WEXITSTATUS(status);
}

static void
test_smtpd(void)
{
	const char *exe = smtpd_path();
	g_autofree char *dir = NULL;
	g_autofree char *script = NULL;
	g_autofree char *store = NULL;
	g_autofree char *port_file = NULL;
	g_autofree char *pid_file = NULL;
	g_autofree char *port_text = NULL;
	g_autofree char *pid_text = NULL;
	g_autofree char *line = NULL;
	g_autofree char *eml = NULL;
	g_autoptr(GError) error = NULL;
	GPid pid;
	int out_fd;
	int status;
	int fd;
	guint16 port;

	if (exe == NULL)
		return;
	dir = g_dir_make_tmp("fake-smtpd-XXXXXX", NULL);
	script = g_build_filename(dir, "script", NULL);
	store = g_build_filename(dir, "store", NULL);
	port_file = g_build_filename(dir, "port", NULL);
	pid_file = g_build_filename(dir, "pid", NULL);
	g_assert_true(g_file_set_contents(
	    script, "greeting 220 smtpd test\non NOOP reply 250 scripted\n", -1,
	    NULL));
	g_assert_cmpint(g_mkdir(store, 0755), ==, 0);

	{
		const char *argv[] = {exe,          "--listen",    "::1",
		                      "--script",   script,        "--store",
		                      store,        "--port-file", port_file,
		                      "--pid-file", pid_file,      NULL};

		g_assert_true(g_spawn_async_with_pipes(
		    NULL, (char **)argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD,
		    die_with_parent, NULL, &pid, NULL, &out_fd, NULL, &error));
		g_assert_no_error(error);
	}

	/* the port on stdout, then the same in the port file */
	line = client_line(out_fd);
	g_assert_nonnull(line);
	port = (guint16)g_ascii_strtoull(line, NULL, 10);
	g_assert_cmpuint(port, !=, 0);
	port_text = read_file(dir, "port");
	g_assert_cmpstr(port_text, ==, line);
	pid_text = read_file(dir, "pid");
	g_assert_cmpint(atoi(pid_text), ==, pid);

	fd = client_connect_to("::1", port);
	assert_reply(fd, "220 smtpd test\r\n");
	assert_cmd(fd, "NOOP", "250 scripted\r\n");
	assert_cmd(fd, "MAIL FROM:<a@x>", "250 2.1.0 Ok\r\n");
	assert_cmd(fd, "RCPT TO:<b@y>", "250 2.1.5 Ok\r\n");
	assert_cmd(fd, "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n");
	client_send(fd, "hello\r\n.\r\n");
	assert_reply(fd, "250 2.0.0 Ok: queued as FAKE1\r\n");
	eml = read_file(store, "1.eml");
	g_assert_cmpstr(eml, ==, "hello\r\n");

	/* SIGTERM while a client is still connected: a clean exit 0 */
	g_assert_cmpint(kill(pid, SIGTERM), ==, 0);
	g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
	g_assert_true(WIFEXITED(status));
	g_assert_cmpint(WEXITSTATUS(status), ==, 0);
	client_expect_eof(fd);
	close(fd);
	close(out_fd);
	g_spawn_close_pid(pid);

	g_unlink(script);
	g_unlink(port_file);
	g_unlink(pid_file);
	{
		g_autofree char *p1 = g_build_filename(store, "1.eml", NULL);
		g_autofree char *p2 = g_build_filename(store, "1.env", NULL);

		g_unlink(p1);
		g_unlink(p2);
	}
	g_rmdir(store);
	g_rmdir(dir);
}

/* A fixed --port, SIGINT, and the failures with their exit codes. */
static void
test_smtpd_errors(void)
{
	const char *exe = smtpd_path();
	g_autofree char *dir = NULL;
	g_autofree char *bad = NULL;
	guint16 port;

	if (exe == NULL)
		return;
	dir = g_dir_make_tmp("fake-smtpd-XXXXXX", NULL);
	bad = g_build_filename(dir, "bad", NULL);
	g_assert_true(g_file_set_contents(bad, "\n\non NOOP wave\n", -1, NULL));

	{
		const char *argv[] = {exe, "--bogus", NULL};

		g_assert_cmpint(run_status(argv), ==, 2);
	}
	{
		const char *argv[] = {exe, "--port", "70000", NULL};

		g_assert_cmpint(run_status(argv), ==, 2);
	}
	{
		const char *argv[] = {exe, "--script", bad, NULL};

		g_assert_cmpint(run_status(argv), ==, 1);
	}
	{
		const char *argv[] = {exe, "--listen", "example.org", NULL};

		g_assert_cmpint(run_status(argv), ==, 1);
	}
	{
		/*
		 * a fixed port: a reserved one (reserve_port), so that no
		 * other process takes it while fake-smtpd starts; a server
		 * listening there first makes it "in use"
		 */
		int reserved = reserve_port(&port);
		g_autoptr(FakeSmtp) probe = fake_smtp_new(NULL, NULL);
		g_autofree char *port_arg = g_strdup_printf("%u", port);
		const char *argv[] = {exe, "--port", port_arg, NULL};
		g_autoptr(GError) error = NULL;
		g_autofree char *line = NULL;
		g_autofree char *expect = g_strdup_printf("%u\n", port);
		GPid pid;
		int out_fd;
		int status;
		int fd;

		/* in use: exit 1 */
		g_assert_cmpuint(fake_smtp_start_port(probe, "127.0.0.1", port,
		                                      NULL, &error),
		                 ==, port);
		g_assert_no_error(error);
		g_assert_cmpint(run_status(argv), ==, 1);
		fake_smtp_stop(probe);

		g_assert_true(g_spawn_async_with_pipes(
		    NULL, (char **)argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD,
		    die_with_parent, NULL, &pid, NULL, &out_fd, NULL, &error));
		g_assert_no_error(error);
		line = client_line(out_fd);
		g_assert_cmpstr(line, ==, expect);
		fd = client_connect(port);
		assert_reply(fd, "220 fakesmtp ESMTP\r\n");
		close(fd);
		g_assert_cmpint(kill(pid, SIGINT), ==, 0);
		g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
		g_assert_true(WIFEXITED(status));
		g_assert_cmpint(WEXITSTATUS(status), ==, 0);
		close(out_fd);
		g_spawn_close_pid(pid);
		close(reserved);
	}
	g_unlink(bad);
	g_rmdir(dir);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);

	g_test_add_func("/fakesmtp/plain/session", test_plain_session);
	g_test_add_func("/fakesmtp/plain/sequence", test_plain_sequence);
	g_test_add_func("/fakesmtp/plain/reset", test_plain_reset);
	for (gsize i = 0; i < G_N_ELEMENTS(data_cases); i++) {
		g_autofree char *path =
		    g_strdup_printf("/fakesmtp/data/%s", data_cases[i].name);

		g_test_add_data_func(path, &data_cases[i], test_data_case);
	}
	g_test_add_func("/fakesmtp/data/pipelining", test_data_pipelining);
	g_test_add_func("/fakesmtp/script/greeting", test_script_greeting);
	for (gsize i = 0; i < G_N_ELEMENTS(ehlo_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/fakesmtp/script/ehlo/%" G_GSIZE_FORMAT, i);

		g_test_add_data_func(path, &ehlo_cases[i], test_script_ehlo);
	}
	g_test_add_func("/fakesmtp/script/nth", test_script_nth);
	g_test_add_func("/fakesmtp/script/nth-dot", test_script_nth_dot);
	g_test_add_func("/fakesmtp/script/regex", test_script_regex);
	g_test_add_func("/fakesmtp/action/reply-effects",
	                test_action_reply_effects);
	g_test_add_func("/fakesmtp/action/421-quit", test_action_421_quit);
	g_test_add_func("/fakesmtp/action/close", test_action_close);
	g_test_add_func("/fakesmtp/action/close-dot", test_action_close_dot);
	g_test_add_func("/fakesmtp/action/close-in-data",
	                test_action_close_in_data);
	g_test_add_func("/fakesmtp/action/close-in-data-pipelined",
	                test_action_close_in_data_pipelined);
	g_test_add_func("/fakesmtp/action/stall-stop", test_action_stall_stop);
	g_test_add_func("/fakesmtp/action/delay", test_action_delay);
	g_test_add_func("/fakesmtp/action/raw", test_action_raw);
	for (gsize i = 0; i < G_N_ELEMENTS(parse_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/fakesmtp/parse-error/%" G_GSIZE_FORMAT, i);

		g_test_add_data_func(path, &parse_cases[i], test_parse_error);
	}
	g_test_add_func("/fakesmtp/store/files", test_store);
	g_test_add_func("/fakesmtp/store/atomic", test_store_atomic);
	g_test_add_func("/fakesmtp/store/missing", test_store_missing);
	g_test_add_func("/fakesmtp/start/addresses", test_start_addresses);
	g_test_add_func("/fakesmtp/wait", test_wait_messages);
	g_test_add_func("/fakesmtp/hostile", test_hostile);
	g_test_add_func("/fakesmtp/parallel", test_parallel);
	g_test_add_func("/fakesmtp/connection-limit", test_connection_limit);
	g_test_add_func("/fakesmtp/smtpd/run", test_smtpd);
	g_test_add_func("/fakesmtp/smtpd/errors", test_smtpd_errors);
	return g_test_run();
}
