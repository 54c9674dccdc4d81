/*
 * test-smtp-send.c - the smtp-send tool, run as a real process
 *
 * Each case starts the in-process fake SMTP server with a script, runs
 * the smtp-send binary (its path is the first argument, or $SMTP_SEND)
 * with g_spawn, and checks the exit status, standard output and what the
 * server received.  JSON output is checked by python3, which parses each
 * line strictly (UTF-8, no raw control characters, no duplicate keys)
 * and prints it back in compact form, so a case can compare whole
 * objects, key order included, as plain strings.  GLib has no JSON
 * parser and a second one written here would need tests of its own.
 *
 * $SMTP_SEND_WRAP, if set, is a command line put before smtp-send (a
 * memory checker, say).
 *
 * Known limit: the default port 25 is not exercised, as the tests must
 * not connect to anything they did not start themselves.
 */
#include <fcntl.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "fakesmtp.h"

static const char *smtp_send_path;

#define FROM "alice@example.org"
#define TO   "bob@example.net"

/* ------------------------------------------------------------------ */
/* Running smtp-send                                                    */
/* ------------------------------------------------------------------ */

typedef struct {
	int status; /* exit status, or -1 when killed */
	char *out;
	char *err;
} Run;

static void
run_clear(Run *r)
{
	g_clear_pointer(&r->out, g_free);
	g_clear_pointer(&r->err, g_free);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(Run, run_clear)

/* In the child, before exec: the prepared file becomes stdin. */
static void
child_stdin(gpointer data)
{
	int fd = *(int *)data;

	if (fd >= 0)
		dup2(fd, STDIN_FILENO);
}

/*
 * Run smtp-send with @args (NULL-terminated), @input (may be NULL: empty)
 * as standard input, and wait for it.
 */
static void
run_argv(Run *r, const char *input, const char *const *args)
{
	g_autoptr(GPtrArray) argv = g_ptr_array_new();
	g_autoptr(GError) error = NULL;
	g_autofree char *in_path = NULL;
	int wait_status = 0;
	int fd;

	/* Standard input from a temporary file, so any size works */
	fd = g_file_open_tmp("smtp-send-in-XXXXXX", &in_path, &error);
	g_assert_no_error(error);
	if (input != NULL)
		g_assert_cmpint(write(fd, input, strlen(input)), ==,
		                (gssize)strlen(input));
	g_assert_cmpint(lseek(fd, 0, SEEK_SET), ==, 0);

	/* $SMTP_SEND_WRAP, e.g. "valgrind -q --error-exitcode=99", runs
	 * each smtp-send under a checker; its own words are not freed */
	if (g_getenv("SMTP_SEND_WRAP") != NULL) {
		char **wrap = NULL;

		g_shell_parse_argv(g_getenv("SMTP_SEND_WRAP"), NULL, &wrap,
		                   &error);
		g_assert_no_error(error);
		for (char **w = wrap; *w != NULL; w++)
			g_ptr_array_add(argv, *w);
	}
	g_ptr_array_add(argv, (gpointer)smtp_send_path);
	for (; *args != NULL; args++)
		g_ptr_array_add(argv, (gpointer)*args);
	g_ptr_array_add(argv, NULL);

	g_spawn_sync(NULL, (char **)argv->pdata, NULL, G_SPAWN_SEARCH_PATH,
	             child_stdin, &fd, &r->out, &r->err, &wait_status, &error);
	g_assert_no_error(error);
	close(fd);
	g_unlink(in_path);
	r->status = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
	g_test_message("exit %d\nstdout: %s\nstderr: %s", r->status, r->out,
	               r->err);
}

static void G_GNUC_NULL_TERMINATED
run(Run *r, const char *input, ...)
{
	g_autoptr(GPtrArray) args = g_ptr_array_new();
	const char *a;
	va_list ap;

	va_start(ap, input);
	while ((a = va_arg(ap, const char *)) != NULL)
		g_ptr_array_add(args, (gpointer)a);
	va_end(ap);
	g_ptr_array_add(args, NULL);
	run_argv(r, input, (const char *const *)args->pdata);
}

/*
 * The JSON lines of @out, each parsed strictly and printed back compact
 * ("," and ":" without spaces, non-ASCII as \uXXXX), joined by "\n".
 * Fails the test if any line is not valid JSON.
 */
static char *
json_canon(const char *out)
{
	static const char script[] =
	    "import json, os, sys\n"
	    "def pairs(p):\n"
	    "    keys = [k for k, _ in p]\n"
	    "    if len(keys) != len(set(keys)):\n"
	    "        raise ValueError('duplicate key')\n"
	    "    return dict(p)\n"
	    "text = os.fsencode(sys.argv[1]).decode('utf-8')\n"
	    "if not text.endswith('\\n'):\n"
	    "    raise ValueError('no final newline')\n"
	    "res = []\n"
	    "for line in text[:-1].split('\\n'):\n"
	    "    obj = json.loads(line, object_pairs_hook=pairs)\n"
	    "    if not isinstance(obj, dict):\n"
	    "        raise ValueError('not an object')\n"
	    "    res.append(json.dumps(obj, separators=(',', ':')))\n"
	    "sys.stdout.write('\\n'.join(res))\n";
	g_autoptr(GError) error = NULL;
	g_autofree char *python = g_find_program_in_path("python3");
	const char *argv[] = {python, "-c", script, out, NULL};
	char *canon = NULL;
	g_autofree char *err = NULL;
	int wait_status = 0;

	g_assert_nonnull(python);
	g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
	             &canon, &err, &wait_status, &error);
	g_assert_no_error(error);
	if (!WIFEXITED(wait_status) || WEXITSTATUS(wait_status) != 0)
		g_error("not valid JSON lines: %s\n%s", out, err);
	return canon;
}

static gboolean
have_python(void)
{
	g_autofree char *python = g_find_program_in_path("python3");

	if (python == NULL)
		g_test_skip("python3 is needed to check JSON output");
	return python != NULL;
}

/* ------------------------------------------------------------------ */
/* Server and files                                                     */
/* ------------------------------------------------------------------ */

typedef struct {
	FakeSmtp *fake;
	guint16 port;
	char *server; /* "127.0.0.1:PORT" for --server */
	char *dir;    /* a temporary directory for message files */
} Fixture;

/* Fixture data for cases that start their own server, or none. */
static const char NO_SERVER[] = "";

/* Start a fake server running @script (NULL: plain) on @address. */
static gboolean
fixture_start(Fixture *f, const char *script, const char *address)
{
	g_autoptr(GError) error = NULL;

	f->fake = fake_smtp_new(script, &error);
	g_assert_no_error(error);
	f->port = fake_smtp_start(f->fake, address, NULL, &error);
	if (f->port == 0)
		return FALSE;
	f->server = strchr(address, ':')
	                ? g_strdup_printf("[%s]:%u", address, f->port)
	                : g_strdup_printf("%s:%u", address, f->port);
	return TRUE;
}

static void
fixture_setup(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;

	f->dir = g_dir_make_tmp("smtp-send-XXXXXX", &error);
	g_assert_no_error(error);
	if (data != NO_SERVER)
		g_assert_true(fixture_start(f, data, "127.0.0.1"));
}

static void
fixture_teardown(Fixture *f, gconstpointer data)
{
	g_autoptr(GDir) dir = g_dir_open(f->dir, 0, NULL);
	const char *name;

	(void)data;
	while (dir != NULL && (name = g_dir_read_name(dir)) != NULL) {
		g_autofree char *path = g_build_filename(f->dir, name, NULL);

		g_chmod(path, 0700);
		if (g_remove(path) != 0)
			g_rmdir(path);
	}
	g_rmdir(f->dir);
	g_free(f->dir);
	g_free(f->server);
	g_clear_pointer(&f->fake, fake_smtp_free);
}

/* Write @content to @name in the fixture's directory; returns the path. */
static char *
fixture_file(Fixture *f, const char *name, const char *content)
{
	g_autoptr(GError) error = NULL;
	char *path = g_build_filename(f->dir, name, NULL);

	g_file_set_contents(path, content, -1, &error);
	g_assert_no_error(error);
	return path;
}

static const FakeSmtpMessage *
message(Fixture *f, guint i)
{
	g_assert_true(fake_smtp_wait_messages(f->fake, i + 1, 5000));
	return fake_smtp_get_message(f->fake, i);
}

static void
assert_content(const FakeSmtpMessage *m, const char *expected)
{
	gsize len = 0;
	const char *data = g_bytes_get_data(m->content, &len);

	g_assert_cmpmem(data, len, expected, strlen(expected));
}

/* Whether any command received starts with @verb. */
static gboolean
got_command(Fixture *f, const char *verb)
{
	g_autoptr(GPtrArray) cmds = fake_smtp_get_commands(f->fake);

	for (guint i = 0; i < cmds->len; i++) {
		if (g_ascii_strncasecmp(g_ptr_array_index(cmds, i), verb,
		                        strlen(verb)) == 0)
			return TRUE;
	}
	return FALSE;
}

#define MSG "Subject: test\r\n\r\nHello.\r\n"

/* ------------------------------------------------------------------ */
/* Sending                                                              */
/* ------------------------------------------------------------------ */

static void
test_stdin(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	const FakeSmtpMessage *m;
	g_autofree char *size = NULL;

	(void)data;
	run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--timeout", "5", NULL);
	g_assert_cmpint(r.status, ==, 0);
	g_assert_true(g_str_has_prefix(r.out, "-: sent (250"));
	g_assert_cmpstr(r.err, ==, "");

	/* SIZE= announced: stdin was read wholly first */
	m = message(f, 0);
	size = g_strdup_printf("FROM:<" FROM "> SIZE=%zu", strlen(MSG));
	g_assert_cmpstr(m->mail_from, ==, size);
	g_assert_cmpuint(m->rcpt_to->len, ==, 1);
	g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 0), ==, "TO:<" TO ">");
	assert_content(m, MSG);
}

/* "<>" and "" are the null sender; brackets around addresses go. */
static void
test_null_sender(Fixture *f, gconstpointer data)
{
	const char *senders[] = {"<>", ""};

	(void)data;
	for (guint i = 0; i < G_N_ELEMENTS(senders); i++) {
		g_auto(Run) r = {0};
		const FakeSmtpMessage *m;

		run(&r, MSG, "--server", f->server, "--from", senders[i],
		    "--to", "<" TO ">", "--to", "carol@example.net", "-", NULL);
		g_assert_cmpint(r.status, ==, 0);
		m = message(f, i);
		g_assert_true(g_str_has_prefix(m->mail_from, "FROM:<> "));
		g_assert_cmpuint(m->rcpt_to->len, ==, 2);
		g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 0), ==,
		                "TO:<" TO ">");
	}
}

/* Several files: one connection, in order, one JSON line each. */
static void
test_files(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_autofree char *a =
	    fixture_file(f, "a.eml", "Subject: a\r\n\r\nA\r\n");
	g_autofree char *b =
	    fixture_file(f, "b.eml", "Subject: b\r\n\r\nB\r\n");
	g_autofree char *canon = NULL;
	g_autofree char *expected = NULL;

	(void)data;
	if (!have_python())
		return;
	run(&r, "Subject: in\r\n\r\nI\r\n", "--server", f->server, "--from",
	    FROM, "--to", TO, "--json", a, "-", b, NULL);
	g_assert_cmpint(r.status, ==, 0);
	canon = json_canon(r.out);
	expected = g_strdup_printf(
	    "{\"file\":\"%s\",\"status\":\"sent\",\"refused\":{},"
	    "\"error\":null,\"dropped_options\":[]}\n"
	    "{\"file\":\"-\",\"status\":\"sent\",\"refused\":{},"
	    "\"error\":null,\"dropped_options\":[]}\n"
	    "{\"file\":\"%s\",\"status\":\"sent\",\"refused\":{},"
	    "\"error\":null,\"dropped_options\":[]}",
	    a, b);
	g_assert_cmpstr(canon, ==, expected);

	assert_content(message(f, 0), "Subject: a\r\n\r\nA\r\n");
	assert_content(message(f, 1), "Subject: in\r\n\r\nI\r\n");
	assert_content(message(f, 2), "Subject: b\r\n\r\nB\r\n");
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 3);
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 1);
}

static void
test_helo(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_autoptr(GPtrArray) cmds = NULL;

	(void)data;
	run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--helo", "relay-test.example", NULL);
	g_assert_cmpint(r.status, ==, 0);
	cmds = fake_smtp_get_commands(f->fake);
	g_assert_cmpuint(cmds->len, >, 0);
	g_assert_cmpstr(g_ptr_array_index(cmds, 0), ==,
	                "EHLO relay-test.example");
}

/* ------------------------------------------------------------------ */
/* Refusals and errors, as JSON and exit status                         */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *name;
	const char *script;
	const char *const to[4];
	const char *const extra[6]; /* more arguments */
	int status;
	const char *json; /* the canonical JSON line expected */
	guint n_messages; /* what the server should have received */
} ErrorCase;

static const ErrorCase error_cases[] = {
    {"some-refused",
     "on RCPT /bad@/ reply 550 5.1.1 No such user\n"
     "on RCPT /later@/ reply 450 Try later\n",
     {"bad@example.net", TO, "later@example.net"},
     {NULL},
     0,
     "{\"file\":\"-\",\"status\":\"sent\",\"refused\":{"
     "\"bad@example.net\":[550,\"No such user\",\"5.1.1\"],"
     "\"later@example.net\":[450,\"Try later\"]},"
     "\"error\":null,\"dropped_options\":[]}",
     1},
    {"all-refused-permanent",
     "on RCPT reply 550 5.1.1 No such user\n",
     {TO, "bad@example.net"},
     {NULL},
     69,
     "{\"file\":\"-\",\"status\":\"error\",\"refused\":{"
     "\"bob@example.net\":[550,\"No such user\",\"5.1.1\"],"
     "\"bad@example.net\":[550,\"No such user\",\"5.1.1\"]},"
     "\"error\":{\"kind\":\"recipients_refused\",\"code\":550,"
     "\"text\":\"No such user\",\"enhanced\":\"5.1.1\","
     "\"stage\":\"rcpt\"},\"dropped_options\":[]}",
     0},
    {"all-refused-temporary",
     "on RCPT reply 450 4.2.1 Mailbox busy\n",
     {TO},
     {NULL},
     75,
     "{\"file\":\"-\",\"status\":\"error\",\"refused\":{"
     "\"bob@example.net\":[450,\"Mailbox busy\",\"4.2.1\"]},"
     "\"error\":{\"kind\":\"recipients_refused\",\"code\":450,"
     "\"text\":\"Mailbox busy\",\"enhanced\":\"4.2.1\","
     "\"stage\":\"rcpt\"},\"dropped_options\":[]}",
     0},
    {"all-refused-mixed",
     "on RCPT /bad@/ reply 550 5.1.1 No such user\n"
     "on RCPT reply 452 4.5.3 Too many recipients\n",
     {"bad@example.net", TO},
     {NULL},
     75,
     NULL,
     0},
    {"sender-refused",
     "on MAIL reply 553 5.1.8 Sender address rejected\n",
     {TO},
     {NULL},
     69,
     "{\"file\":\"-\",\"status\":\"error\",\"refused\":{},"
     "\"error\":{\"kind\":\"sender_refused\",\"code\":553,"
     "\"text\":\"Sender address rejected\",\"enhanced\":\"5.1.8\","
     "\"stage\":\"mail\"},\"dropped_options\":[]}",
     0},
    {"sender-refused-temporary",
     "on MAIL reply 451 Local error\n",
     {TO},
     {NULL},
     75,
     "{\"file\":\"-\",\"status\":\"error\",\"refused\":{},"
     "\"error\":{\"kind\":\"sender_refused\",\"code\":451,"
     "\"text\":\"Local error\",\"stage\":\"mail\"},"
     "\"dropped_options\":[]}",
     0},
    {"data-refused",
     "on DOT reply 554 5.6.0 Content rejected\n",
     {TO},
     {NULL},
     69,
     "{\"file\":\"-\",\"status\":\"error\",\"refused\":{},"
     "\"error\":{\"kind\":\"data_error\",\"code\":554,"
     "\"text\":\"Content rejected\",\"enhanced\":\"5.6.0\","
     "\"stage\":\"end-of-data\"},\"dropped_options\":[]}",
     0},
    {"dropped-option",
     "ehlo-keywords 8BITMIME SIZE 10485760 ENHANCEDSTATUSCODES\n",
     {TO},
     {"--rcpt-option", "NOTIFY=NEVER", "--mail-option", "BODY=8BITMIME"},
     0,
     "{\"file\":\"-\",\"status\":\"sent\",\"refused\":{},"
     "\"error\":null,\"dropped_options\":[\"NOTIFY=NEVER\"]}",
     1},
    {"not-supported",
     "ehlo-keywords 8BITMIME SIZE 10485760 ENHANCEDSTATUSCODES\n",
     {TO},
     {"--mail-option", "SMTPUTF8"},
     69,
     NULL,
     0},
    /* A garbled reply is temporary, as the library (and so the
     * milter) call it: the session went wrong, not the message. */
    {"protocol", "on MAIL raw 2x0 what?\\r\\n\n", {TO}, {NULL}, 75, NULL, 0},
    /* A 250 to DATA is the server out of step: temporary too. */
    {"out-of-step",
     "on DATA reply 250 2.0.0 Ok\n",
     {TO},
     {NULL},
     75,
     "{\"file\":\"-\",\"status\":\"error\",\"refused\":{},"
     "\"error\":{\"kind\":\"protocol\",\"code\":250,"
     "\"text\":\"Ok\",\"enhanced\":\"2.0.0\","
     "\"stage\":\"data\"},\"dropped_options\":[]}",
     0},
    {"cr-in-recipient",
     NULL,
     {"bob@example.net\rRCPT TO:<eve@example.com>"},
     {NULL},
     65,
     NULL,
     0},
    {"text-non-ascii", NULL, {TO}, {"--text"}, 65, NULL, 0},
    {"bytes-non-ascii", NULL, {TO}, {NULL}, 0, NULL, 1},
    {"timeout", "on DATA stall\n", {TO}, {"--timeout", "0.5"}, 75, NULL, 0},
    /* RFC 5321 section 3.1: "no SMTP service here" is permanent. */
    {"greeting-554",
     "greeting 554 5.7.1 No SMTP service here\n",
     {TO},
     {NULL},
     69,
     "{\"file\":\"-\",\"status\":\"error\",\"refused\":{},"
     "\"error\":{\"kind\":\"connect\",\"code\":554,"
     "\"text\":\"No SMTP service here\",\"enhanced\":\"5.7.1\","
     "\"stage\":\"greeting\"},\"dropped_options\":[]}",
     0},
    /* A 421 cutting a multi-line reply short: the server is going. */
    {"421-inside-multiline",
     "on MAIL raw 250-ok\\r\\n421 4.3.2 Shutting down\\r\\n\n",
     {TO},
     {NULL},
     75,
     "{\"file\":\"-\",\"status\":\"error\",\"refused\":{},"
     "\"error\":{\"kind\":\"disconnected\",\"code\":421,"
     "\"text\":\"Shutting down\",\"enhanced\":\"4.3.2\","
     "\"stage\":\"mail\"},\"dropped_options\":[]}",
     0},
    {"space-in-local-part",
     NULL,
     {"bob smith@example.net"},
     {NULL},
     65,
     NULL,
     0},
    {"quoted-space-in-local-part",
     NULL,
     {"\"bob smith\"@example.net"},
     {NULL},
     0,
     NULL,
     1},
};

/* The kind each case without a full expected line must report. */
static const char *
expected_kind(const ErrorCase *c)
{
	if (strcmp(c->name, "all-refused-mixed") == 0)
		return "recipients_refused";
	if (strcmp(c->name, "not-supported") == 0)
		return "not_supported";
	if (strcmp(c->name, "protocol") == 0)
		return "protocol";
	if (strcmp(c->name, "timeout") == 0)
		return "timeout";
	if (c->status == 65)
		return "input";
	return NULL;
}

static void
test_error_case(gconstpointer data)
{
	const ErrorCase *c = data;
	Fixture f = {0};
	g_auto(Run) r = {0};
	g_autoptr(GPtrArray) args = g_ptr_array_new();
	g_autofree char *canon = NULL;
	const char *input = MSG;

	if (!have_python())
		return;
	fixture_setup(&f, c->script);
	if (strstr(c->name, "non-ascii") != NULL)
		input = "Subject: caf\xc3\xa9\r\n\r\nd\xc3\xa9j\xc3\xa0 vu\r\n";

	g_ptr_array_add(args, "--json");
	g_ptr_array_add(args, "--server");
	g_ptr_array_add(args, f.server);
	g_ptr_array_add(args, "--from");
	g_ptr_array_add(args, FROM);
	for (guint i = 0; c->to[i] != NULL; i++) {
		g_ptr_array_add(args, "--to");
		g_ptr_array_add(args, (gpointer)c->to[i]);
	}
	for (guint i = 0; c->extra[i] != NULL; i++)
		g_ptr_array_add(args, (gpointer)c->extra[i]);
	if (c->extra[0] == NULL || strcmp(c->extra[0], "--timeout") != 0) {
		g_ptr_array_add(args, "--timeout");
		g_ptr_array_add(args, "5");
	}
	g_ptr_array_add(args, NULL);
	run_argv(&r, input, (const char *const *)args->pdata);

	g_assert_cmpint(r.status, ==, c->status);
	canon = json_canon(r.out);
	if (c->json != NULL) {
		g_assert_cmpstr(canon, ==, c->json);
	} else {
		g_autofree char *kind = NULL;

		if (c->status == 0) {
			g_assert_true(strstr(canon, "\"error\":null") != NULL);
		} else {
			kind = g_strdup_printf("\"kind\":\"%s\"",
			                       expected_kind(c));
			g_assert_nonnull(strstr(canon, kind));
		}
	}

	/* Errors found before sending leave nothing on the server; bad
	 * addresses are found before connecting at all */
	if (c->status == 65)
		g_assert_false(got_command(&f, "MAIL"));
	if (strcmp(c->name, "space-in-local-part") == 0)
		g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 0);
	if (c->n_messages > 0)
		message(&f, c->n_messages - 1);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==,
	                 c->n_messages);
	fixture_teardown(&f, NULL);
}

/* The dropped option was not sent; the advertised one was. */
static void
test_dropped_option_wire(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	const FakeSmtpMessage *m;

	(void)data;
	run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--rcpt-option", "NOTIFY=NEVER", "--mail-option", "BODY=8BITMIME",
	    NULL);
	g_assert_cmpint(r.status, ==, 0);
	g_assert_nonnull(strstr(r.out, "dropped option NOTIFY=NEVER"));
	m = message(f, 0);
	g_assert_nonnull(strstr(m->mail_from, "BODY=8BITMIME"));
	g_assert_cmpstr(g_ptr_array_index(m->rcpt_to, 0), ==, "TO:<" TO ">");
}

/*
 * A hostile server text: control characters, quotes, a backslash and
 * bytes that are not UTF-8.  JSON stays valid; plain output carries no
 * raw escape character to the terminal.
 */
static void
test_hostile_text(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_auto(Run) p = {0};
	g_autofree char *canon = NULL;

	(void)data;
	if (!have_python())
		return;
	run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--json", NULL);
	g_assert_cmpint(r.status, ==, 69);
	canon = json_canon(r.out);
	g_assert_cmpstr(
	    canon, ==,
	    "{\"file\":\"-\",\"status\":\"error\",\"refused\":{"
	    "\"bob@example.net\":[550,\"first\\nBad \\u001b[31m \\\"q\\\" "
	    "\\\\ \\ufffd\\ufffd( \\u00e9 \\u007f\",\"5.1.1\"]},"
	    "\"error\":{\"kind\":\"recipients_refused\",\"code\":550,"
	    "\"text\":\"first\\nBad \\u001b[31m \\\"q\\\" \\\\ "
	    "\\ufffd\\ufffd( \\u00e9 \\u007f\",\"enhanced\":\"5.1.1\","
	    "\"stage\":\"rcpt\"},\"dropped_options\":[]}");

	run(&p, MSG, "--server", f->server, "--from", FROM, "--to", TO, NULL);
	g_assert_cmpint(p.status, ==, 69);
	g_assert_null(strchr(p.out, '\x1b'));
	g_assert_null(strchr(p.err, '\x1b'));
	g_assert_nonnull(strstr(p.out, "refused <" TO ">: 550 5.1.1 first\\n"
	                               "Bad \\x1b[31m"));
	g_assert_nonnull(strstr(p.err, "kind=recipients_refused, code=550, "
	                               "enhanced=5.1.1, stage=rcpt"));
}

/*
 * Unicode direction and format controls in a server's text (RLO, LRI,
 * PDI, LRM, RLM, ALM, LRE, PDF): never raw in plain output, where they
 * would reorder what the operator reads, nor in JSON.
 */
static void
test_bidi_text(Fixture *f, gconstpointer data)
{
	static const char *const raw[] = {
	    "\xe2\x80\xae", "\xe2\x81\xa6", "\xe2\x81\xa9", "\xe2\x80\x8e",
	    "\xe2\x80\x8f", "\xd8\x9c",     "\xe2\x80\xaa", "\xe2\x80\xac",
	};
	g_auto(Run) p = {0};
	g_auto(Run) j = {0};

	(void)data;
	run(&p, MSG, "--server", f->server, "--from", FROM, "--to", TO, NULL);
	g_assert_cmpint(p.status, ==, 69);
	run(&j, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--json", NULL);
	g_assert_cmpint(j.status, ==, 69);
	for (guint i = 0; i < G_N_ELEMENTS(raw); i++) {
		g_assert_null(strstr(p.out, raw[i]));
		g_assert_null(strstr(p.err, raw[i]));
		g_assert_null(strstr(j.out, raw[i]));
	}
	g_assert_nonnull(strstr(p.out, "refused <" TO ">: 550 5.1.1 a\\u202e"
	                               "b \\u2066c\\u2069 \\u200ed\\u200f "
	                               "\\u061ce \\u202af\\u202c \xc3\xa9"));
	g_assert_nonnull(strstr(p.err, "\\u202e"));
	g_assert_nonnull(strstr(j.out, "a\\u202eb \\u2066c\\u2069"));
}

/* ------------------------------------------------------------------ */
/* Files, connections and the command line                              */
/* ------------------------------------------------------------------ */

/* An unreadable file: 66, and the files around it are still sent. */
static void
test_unreadable(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_autofree char *a =
	    fixture_file(f, "a.eml", "Subject: a\r\n\r\nA\r\n");
	g_autofree char *b =
	    fixture_file(f, "b.eml", "Subject: b\r\n\r\nB\r\n");
	g_autofree char *missing = g_build_filename(f->dir, "none", NULL);
	g_autofree char *canon = NULL;
	g_auto(GStrv) lines = NULL;

	(void)data;
	if (!have_python())
		return;
	run(&r, NULL, "--server", f->server, "--from", FROM, "--to", TO,
	    "--json", a, missing, f->dir, b, NULL);
	g_assert_cmpint(r.status, ==, 66);
	canon = json_canon(r.out);
	lines = g_strsplit(canon, "\n", -1);
	g_assert_cmpuint(g_strv_length(lines), ==, 4);
	g_assert_nonnull(strstr(lines[0], "\"status\":\"sent\""));
	g_assert_nonnull(strstr(lines[1], "\"status\":\"error\""));
	g_assert_nonnull(strstr(lines[1], "{\"kind\":\"input\",\"code\":0,"));
	g_assert_nonnull(strstr(lines[1], "\"stage\":\"input\"}"));
	g_assert_nonnull(strstr(lines[2], "{\"kind\":\"input\",\"code\":0,"));
	g_assert_nonnull(strstr(lines[3], "\"status\":\"sent\""));

	assert_content(message(f, 0), "Subject: a\r\n\r\nA\r\n");
	assert_content(message(f, 1), "Subject: b\r\n\r\nB\r\n");
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 1);
}

/*
 * A FIFO nobody writes to, and /dev/zero, given as FILEs (break3
 * finding 5: the loader thread blocked in open() of the FIFO for ever,
 * whatever --timeout said).  Both are refused as unreadable (66)
 * without being read, at once; the files around them are sent.
 */
static void
test_not_regular(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_autofree char *a =
	    fixture_file(f, "a.eml", "Subject: a\r\n\r\nA\r\n");
	g_autofree char *b =
	    fixture_file(f, "b.eml", "Subject: b\r\n\r\nB\r\n");
	g_autofree char *fifo = g_build_filename(f->dir, "fifo", NULL);
	g_autofree char *canon = NULL;
	g_auto(GStrv) lines = NULL;
	gint64 start;

	(void)data;
	if (!have_python())
		return;
	g_assert_cmpint(mkfifo(fifo, 0600), ==, 0);
	start = g_get_monotonic_time();
	run(&r, NULL, "--server", f->server, "--from", FROM, "--to", TO,
	    "--json", "--timeout", "2", a, fifo, "/dev/zero", b, NULL);
	g_assert_cmpint(g_get_monotonic_time() - start, <, 5 * G_USEC_PER_SEC);
	g_unlink(fifo);
	g_assert_cmpint(r.status, ==, 66);
	canon = json_canon(r.out);
	lines = g_strsplit(canon, "\n", -1);
	g_assert_cmpuint(g_strv_length(lines), ==, 4);
	g_assert_nonnull(strstr(lines[0], "\"status\":\"sent\""));
	for (guint i = 1; i <= 2; i++) {
		g_assert_nonnull(strstr(lines[i], "\"status\":\"error\""));
		g_assert_nonnull(
		    strstr(lines[i], "{\"kind\":\"input\",\"code\":0,"));
		g_assert_nonnull(strstr(lines[i], "not a regular file"));
		g_assert_nonnull(strstr(lines[i], "\"stage\":\"input\"}"));
	}
	g_assert_nonnull(strstr(lines[3], "\"status\":\"sent\""));
	assert_content(message(f, 0), "Subject: a\r\n\r\nA\r\n");
	assert_content(message(f, 1), "Subject: b\r\n\r\nB\r\n");
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 2);
}

/*
 * /dev/zero on standard input: read into memory, but no more than
 * 64 MiB; then the message is bad input (65), nothing of it sent, and
 * smtp-send's peak memory stays bounded (before: it grew until killed).
 */
static void
test_stdin_cap(Fixture *f, gconstpointer data)
{
	const char *argv[] = {
	    smtp_send_path, "--server", f->server, "--from", FROM,
	    "--to",         TO,         "--json",  "-",      NULL};
	g_autoptr(GError) error = NULL;
	g_autofree char *out = NULL, *err = NULL;
	struct rusage ru;
	int fd = open("/dev/zero", O_RDONLY | O_CLOEXEC), status = 0;

	(void)data;
	g_assert_cmpint(fd, >=, 0);
	g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, child_stdin,
	             &fd, &out, &err, &status, &error);
	g_assert_no_error(error);
	close(fd);
	g_test_message("stdout: %s\nstderr: %s", out, err);
	g_assert_true(WIFEXITED(status));
	g_assert_cmpint(WEXITSTATUS(status), ==, 65);
	g_assert_nonnull(strstr(out, "\"kind\": \"input\""));
	g_assert_nonnull(strstr(out, "64 MiB"));
	g_assert_nonnull(strstr(out, "\"stage\": \"input\""));
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 0);

	/* ru_maxrss (KiB) is the largest child so far: all small but
	 * this one, whose 64 MiB may sit in a buffer of 128 MiB */
	g_assert_cmpint(getrusage(RUSAGE_CHILDREN, &ru), ==, 0);
	g_assert_cmpint(ru.ru_maxrss, <, 400 * 1024);
}

/* Content of the numbered message @i of the many-files tests. */
static char *
numbered(guint i)
{
	return g_strdup_printf("Subject: m%u\r\n\r\nBody %u.\r\n", i, i);
}

/*
 * Files over several batches (smtp-send hands the library 64 at a time,
 * loading the next batch meanwhile), some unreadable, at and around the
 * batch boundaries: every file is reported once, in order, with its own
 * status, and every readable one is sent, in order, over one connection.
 */
static void
test_many_files(Fixture *f, gconstpointer data)
{
	static const guint bad[] = {0, 63, 64, 65, 127, 128, 149};
	const guint n = 150;
	g_autoptr(GPtrArray) args = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GPtrArray) paths = g_ptr_array_new_with_free_func(g_free);
	g_auto(Run) r = {0};
	g_autofree char *canon = NULL;
	g_auto(GStrv) lines = NULL;
	guint sent = 0;

	(void)data;
	if (!have_python())
		return;
	g_ptr_array_add(args, g_strdup("--json"));
	g_ptr_array_add(args, g_strdup("--server"));
	g_ptr_array_add(args, g_strdup(f->server));
	g_ptr_array_add(args, g_strdup("--from"));
	g_ptr_array_add(args, g_strdup(FROM));
	g_ptr_array_add(args, g_strdup("--to"));
	g_ptr_array_add(args, g_strdup(TO));
	for (guint i = 0, b = 0; i < n; i++) {
		g_autofree char *name = g_strdup_printf("m%03u.eml", i);
		g_autofree char *body = numbered(i);
		char *path;

		/* Missing files and directories, alternately */
		if (b < G_N_ELEMENTS(bad) && bad[b] == i) {
			path = g_build_filename(f->dir, name, NULL);
			if (b++ % 2 == 1)
				g_assert_cmpint(g_mkdir(path, 0700), ==, 0);
		} else {
			path = fixture_file(f, name, body);
		}
		g_ptr_array_add(paths, path);
		g_ptr_array_add(args, g_strdup(path));
	}
	g_ptr_array_add(args, NULL);
	run_argv(&r, NULL, (const char *const *)args->pdata);

	/* The report: one line per file, in order */
	g_assert_cmpint(r.status, ==, 66);
	canon = json_canon(r.out);
	lines = g_strsplit(canon, "\n", -1);
	g_assert_cmpuint(g_strv_length(lines), ==, n);
	for (guint i = 0, b = 0; i < n; i++) {
		g_autofree char *file = g_strdup_printf(
		    "{\"file\":\"%s\",", (char *)g_ptr_array_index(paths, i));

		g_assert_true(g_str_has_prefix(lines[i], file));
		if (b < G_N_ELEMENTS(bad) && bad[b] == i) {
			b++;
			g_assert_nonnull(
			    strstr(lines[i], "\"status\":\"error\""));
			g_assert_nonnull(strstr(
			    lines[i], "{\"kind\":\"input\",\"code\":0,"));
			g_assert_nonnull(strstr(lines[i], b % 2 ? "No such file"
			                                        : "directory"));
		} else {
			g_autofree char *body = numbered(i);

			g_assert_nonnull(
			    strstr(lines[i], "\"status\":\"sent\""));
			assert_content(message(f, sent++), body);
		}
	}
	g_assert_cmpuint(sent, ==, n - G_N_ELEMENTS(bad));
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, sent);
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 1);
}

/* Whether process @pid has @path open (its /proc/PID/fd links). */
static gboolean
has_open(GPid pid, const char *path)
{
	g_autofree char *dir_path = g_strdup_printf("/proc/%d/fd", (int)pid);
	g_autoptr(GDir) dir = g_dir_open(dir_path, 0, NULL);
	const char *name;

	while (dir != NULL && (name = g_dir_read_name(dir)) != NULL) {
		g_autofree char *link = g_build_filename(dir_path, name, NULL);
		g_autofree char *target = g_file_read_link(link, NULL);

		if (g_strcmp0(target, path) == 0)
			return TRUE;
	}
	return FALSE;
}

/*
 * The second batch is loaded while the first is on the wire (the first
 * message's end-of-data reply takes 2 s here).  Once the loader has it
 * open, a small file of that batch is rewritten and a large one (over
 * 64 KiB, streamed from its descriptor) cut short, or (@grow) made
 * longer (break3 finding 3: it went out cut at its old end, reported
 * sent).  The small one goes out as it was when loaded; the large one
 * is an INPUT error (exit 65) naming the change, never ended with a
 * dot (the server records nothing of it); the files around them are
 * sent.
 */
static void
run_change_while_ahead(Fixture *f, gboolean grow)
{
	const guint n_first = 64; /* smtp-send's batch */
	g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GString) big_body = g_string_new("Subject: big\r\n\r\n");
	g_autoptr(GError) error = NULL;
	g_autofree char *small = NULL, *big = NULL, *after = NULL;
	g_autofree char *out = NULL, *canon = NULL;
	g_auto(GStrv) lines = NULL;
	GPid pid;
	int out_fd, status = 0;
	gint64 until;

	if (!have_python())
		return;
	g_ptr_array_add(argv, g_strdup(smtp_send_path));
	g_ptr_array_add(argv, g_strdup("--json"));
	g_ptr_array_add(argv, g_strdup("--server"));
	g_ptr_array_add(argv, g_strdup(f->server));
	g_ptr_array_add(argv, g_strdup("--from"));
	g_ptr_array_add(argv, g_strdup(FROM));
	g_ptr_array_add(argv, g_strdup("--to"));
	g_ptr_array_add(argv, g_strdup(TO));
	for (guint i = 0; i < n_first; i++) {
		g_autofree char *name = g_strdup_printf("m%03u.eml", i);
		g_autofree char *body = numbered(i);

		g_ptr_array_add(argv, fixture_file(f, name, body));
	}
	while (big_body->len < 200 * 1024)
		g_string_append(big_body, "0123456789abcdef0123456789\r\n");
	small = fixture_file(f, "small.eml", "Subject: as loaded\r\n\r\n");
	big = fixture_file(f, "big.eml", big_body->str);
	after = fixture_file(f, "after.eml", "Subject: after\r\n\r\n");
	g_ptr_array_add(argv, g_strdup(small));
	g_ptr_array_add(argv, g_strdup(big));
	g_ptr_array_add(argv, g_strdup(after));
	g_ptr_array_add(argv, NULL);

	g_spawn_async_with_pipes(NULL, (char **)argv->pdata, NULL,
	                         G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL, &pid,
	                         NULL, &out_fd, NULL, &error);
	g_assert_no_error(error);

	/* The loader opens big.eml (after reading small.eml) while the
	 * first message waits for its reply */
	until = g_get_monotonic_time() + 1500 * 1000;
	while (!has_open(pid, big) && g_get_monotonic_time() < until)
		g_usleep(1000);
	g_assert_true(has_open(pid, big));
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 0);
	g_file_set_contents(small, "Subject: rewritten later\r\n\r\n", -1,
	                    &error);
	g_assert_no_error(error);
	if (grow) {
		FILE *fp = fopen(big, "a");

		g_assert_nonnull(fp);
		g_assert_cmpint(fputs("APPENDED-LINE\r\n", fp), >=, 0);
		g_assert_cmpint(fclose(fp), ==, 0);
	} else {
		g_assert_cmpint(truncate(big, 1000), ==, 0);
	}

	/* Then its report and exit status */
	{
		g_autoptr(GIOChannel) ch = g_io_channel_unix_new(out_fd);

		g_io_channel_set_close_on_unref(ch, TRUE);
		g_io_channel_read_to_end(ch, &out, NULL, &error);
		g_assert_no_error(error);
	}
	g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
	g_spawn_close_pid(pid);
	g_test_message("stdout: %s", out);
	g_assert_true(WIFEXITED(status));
	g_assert_cmpint(WEXITSTATUS(status), ==, 65);
	canon = json_canon(out);
	lines = g_strsplit(canon, "\n", -1);
	g_assert_cmpuint(g_strv_length(lines), ==, n_first + 3);
	g_assert_nonnull(strstr(lines[n_first], "\"status\":\"sent\""));
	g_assert_nonnull(strstr(lines[n_first + 1], "\"status\":\"error\""));
	g_assert_nonnull(
	    strstr(lines[n_first + 1], "{\"kind\":\"input\",\"code\":0,"));
	g_assert_nonnull(strstr(lines[n_first + 1], "changed while being"));
	g_assert_nonnull(strstr(lines[n_first + 1], "\"stage\":\"message\""));
	g_assert_nonnull(strstr(lines[n_first + 2], "\"status\":\"sent\""));

	/* What the server stored: small.eml as loaded, no big.eml */
	assert_content(message(f, n_first), "Subject: as loaded\r\n\r\n");
	assert_content(message(f, n_first + 1), "Subject: after\r\n\r\n");
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, n_first + 2);
}

static void
test_change_while_ahead(Fixture *f, gconstpointer data)
{
	(void)data;
	run_change_while_ahead(f, FALSE);
}

static void
test_grow_while_ahead(Fixture *f, gconstpointer data)
{
	(void)data;
	run_change_while_ahead(f, TRUE);
}

/* A failure in the middle: 75 wins over a later 69 or an earlier 66. */
static void
test_exit_status_mix(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_auto(Run) r2 = {0};
	g_autofree char *ok = fixture_file(f, "ok.eml", "Subject: ok\r\n\r\n");
	g_autofree char *missing = g_build_filename(f->dir, "none", NULL);

	(void)data;
	/* 66 first, then sent: the first failure's status */
	run(&r, NULL, "--server", f->server, "--from", FROM, "--to", TO,
	    missing, ok, NULL);
	g_assert_cmpint(r.status, ==, 66);
	g_assert_nonnull(strstr(r.err, "kind=input"));

	/* 66 then a temporary refusal: 75 */
	run(&r2, NULL, "--server", f->server, "--from", FROM, "--to",
	    "later@example.net", missing, ok, NULL);
	g_assert_cmpint(r2.status, ==, 75);
}

/* The connection lost during the first message; the second still goes. */
static void
test_reconnect(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_autofree char *a =
	    fixture_file(f, "a.eml", "Subject: lost message\r\n\r\n");
	g_autofree char *b =
	    fixture_file(f, "b.eml", "Subject: b\r\n\r\nB\r\n");

	(void)data;
	run(&r, NULL, "--server", f->server, "--from", FROM, "--to", TO,
	    "--timeout", "5", a, b, NULL);
	g_assert_cmpint(r.status, ==, 75);
	g_assert_nonnull(strstr(r.err, "kind=disconnected"));
	assert_content(message(f, 0), "Subject: b\r\n\r\nB\r\n");
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 1);
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 2);
}

/* Nothing listening: connect, code 0, 75, for every message. */
static void
test_connect_refused(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_autofree char *canon = NULL;
	g_auto(GStrv) lines = NULL;

	(void)data;
	if (!have_python())
		return;

	/* A port of our own that nobody listens on any more */
	g_assert_true(fixture_start(f, NULL, "127.0.0.1"));
	fake_smtp_stop(f->fake);

	run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--json", "--timeout", "5", NULL);
	g_assert_cmpint(r.status, ==, 75);
	canon = json_canon(r.out);
	lines = g_strsplit(canon, "\n", -1);
	g_assert_cmpuint(g_strv_length(lines), ==, 1);
	g_assert_true(g_str_has_prefix(
	    lines[0], "{\"file\":\"-\",\"status\":\"error\",\"refused\":{},"
	              "\"error\":{\"kind\":\"connect\",\"code\":0,"
	              "\"text\":"));
	g_assert_true(g_str_has_suffix(
	    lines[0], "\"stage\":\"connect\"},\"dropped_options\":[]}"));
}

/* --server with an IPv6 literal in brackets. */
static void
test_server_ipv6(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};

	(void)data;
	if (!fixture_start(f, NULL, "::1")) {
		g_test_skip("no IPv6 loopback");
		return;
	}
	g_assert_true(g_str_has_prefix(f->server, "[::1]:"));
	run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--timeout", "5", NULL);
	g_assert_cmpint(r.status, ==, 0);
	assert_content(message(f, 0), MSG);
}

/* Malformed --server values and other usage errors: 64, no connection. */
static void
test_usage(Fixture *f, gconstpointer data)
{
	g_autofree char *v6_bad = g_strdup_printf("[::1]x%u", f->port);
	g_autofree char *v6_bare = g_strdup_printf("::1:%u", f->port);
	g_autofree char *named = g_strdup_printf("[localhost]:%u", f->port);
	const char *servers[] = {
	    "",
	    ":25",
	    "127.0.0.1:",
	    "127.0.0.1:0",
	    "127.0.0.1:65536",
	    "127.0.0.1:abc",
	    "127.0.0.1:-1",
	    "127.0.0.1:25x",
	    "[::1",
	    "[]:25",
	    "[::1]:",
	    v6_bad,
	    v6_bare,
	    named,
	    "bad host:25",
	};
	struct {
		const char *args[10];
	} others[] = {
	    {{"--from", FROM, "--to", TO}},
	    {{"--server", f->server, "--to", TO}},
	    {{"--server", f->server, "--from", FROM}},
	    {{"--server", f->server, "--from", FROM, "--to", ""}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "abc"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "0"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "-3"}},
	    /* strtod() would take all of these */
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "0x10"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "1e3"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "inf"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "nan"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      " 5"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "5s"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "1.5.2"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      "."}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--timeout",
	      ""}},
	    {{"--server", f->server, "--from", FROM, "--to", TO,
	      "--no-such-option"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "--to"}},
	    {{"--server", f->server, "--from", FROM, "--to", TO, "-", "-"}},
	};

	(void)data;
	for (guint i = 0; i < G_N_ELEMENTS(servers); i++) {
		g_auto(Run) r = {0};

		run(&r, MSG, "--server", servers[i], "--from", FROM, "--to", TO,
		    NULL);
		g_assert_cmpint(r.status, ==, 64);
		g_assert_nonnull(strstr(r.err, "--help"));
		g_assert_cmpstr(r.out, ==, "");
	}
	for (guint i = 0; i < G_N_ELEMENTS(others); i++) {
		g_auto(Run) r = {0};

		run_argv(&r, MSG, others[i].args);
		g_assert_cmpint(r.status, ==, 64);
		g_assert_cmpstr(r.out, ==, "");
	}
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 0);
}

static void
test_help(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};

	(void)f;
	(void)data;
	run(&r, NULL, "--help", NULL);
	g_assert_cmpint(r.status, ==, 0);
	g_assert_nonnull(strstr(r.out, "--server"));
	g_assert_nonnull(strstr(r.out, "[CODE, \"TEXT\", \"X.Y.Z\"]"));
	g_assert_nonnull(strstr(r.out, "Exit status"));
	g_assert_nonnull(strstr(r.out, "--tls LEVEL"));
	g_assert_nonnull(strstr(r.out, "--auth-password-file"));
	g_assert_nonnull(strstr(r.out, "none for a loopback server"));
}

/* ------------------------------------------------------------------ */
/* TLS and AUTH                                                         */
/* ------------------------------------------------------------------ */

#define USER   "relay-user"
#define SECRET "n0t-in-argv-9"
/* base64 of "\0" USER "\0" SECRET (AUTH PLAIN) and of SECRET (LOGIN) */
#define PLAIN_B64 "AHJlbGF5LXVzZXIAbjB0LWluLWFyZ3YtOQ=="
#define LOGIN_B64 "bjB0LWluLWFyZ3YtOQ=="
#define AUTH_SCRIPT                                                            \
	"ehlo-keywords 8BITMIME SIZE 10485760 AUTH PLAIN LOGIN\n"              \
	"on AUTH reply 235 2.7.0 Authentication successful\n"

/* Whether @needle occurs anywhere in what the server received. */
static gboolean
received(Fixture *f, const char *needle)
{
	g_autoptr(GBytes) bytes = fake_smtp_get_received(f->fake);
	gsize len;
	const char *data = g_bytes_get_data(bytes, &len);

	return data != NULL &&
	       memmem(data, len, needle, strlen(needle)) != NULL;
}

/* A password file of mode @mode in the fixture's directory. */
static char *
password_file(Fixture *f, const char *content, int mode)
{
	char *path = fixture_file(f, "pw", content);

	g_assert_cmpint(g_chmod(path, mode), ==, 0);
	return path;
}

/* No secret in what smtp-send printed. */
static void
assert_no_secret(const Run *r)
{
	g_assert_null(strstr(r->out, SECRET));
	g_assert_null(strstr(r->err, SECRET));
	g_assert_null(strstr(r->out, PLAIN_B64));
	g_assert_null(strstr(r->err, PLAIN_B64));
}

/* TLS required, STARTTLS not offered: a TLS error, nothing in clear. */
static void
test_tls_required(Fixture *f, gconstpointer data)
{
	const char *levels[] = {"encrypt", "verify"};
	g_autofree char *ca = fixture_file(f, "ca.pem", "not a PEM\n");

	(void)data;
	for (guint i = 0; i < G_N_ELEMENTS(levels); i++) {
		g_auto(Run) r = {0};

		run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
		    "--timeout", "5", "--tls", levels[i], "--ca-file", ca,
		    NULL);
		g_assert_cmpint(r.status, !=, 0);
		g_assert_cmpint(r.status, !=, 64);
		g_assert_nonnull(strstr(r.err, "kind=tls"));
		g_assert_true(g_str_has_prefix(r.out, "-: error"));
	}
	g_assert_false(got_command(f, "MAIL"));
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 0);
}

/* --tls none, and the default for 127.0.0.1 and localhost: in clear. */
static void
test_tls_none(Fixture *f, gconstpointer data)
{
	g_autofree char *local = g_strdup_printf("localhost:%u", f->port);
	const char *const cases[][3] = {
	    {f->server, "--tls", "none"},
	    {f->server, NULL, NULL},
	    {local, NULL, NULL},
	};

	(void)data;
	for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_auto(Run) r = {0};
		const char *args[] = {"--server",  cases[i][0], "--from",
		                      FROM,        "--to",      TO,
		                      "--timeout", "5",         cases[i][1],
		                      cases[i][2], NULL};

		run_argv(&r, MSG, args);
		g_assert_cmpint(r.status, ==, 0);
	}
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 3);
	g_assert_false(got_command(f, "STARTTLS"));
}

/* Credentials over a connection without TLS: refused, none sent. */
static void
test_auth_no_plaintext(Fixture *f, gconstpointer data)
{
	g_autofree char *pw = password_file(f, SECRET "\n", 0600);
	g_auto(Run) r = {0};

	(void)data;
	run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--timeout", "5", "--auth-user", USER, "--auth-password-file", pw,
	    NULL);
	g_assert_cmpint(r.status, !=, 0);
	g_assert_cmpint(r.status, !=, 64);
	g_assert_nonnull(strstr(r.err, "kind=auth"));
	assert_no_secret(&r);
	g_assert_false(received(f, SECRET));
	g_assert_false(received(f, PLAIN_B64));
	g_assert_false(received(f, LOGIN_B64));
	g_assert_false(got_command(f, "MAIL"));
}

/* --auth-plaintext: the file's first line is the password on the wire. */
static void
test_auth_plaintext(Fixture *f, gconstpointer data)
{
	g_autofree char *pw =
	    password_file(f, SECRET "\r\nnot the password\n", 0400);
	g_auto(Run) r = {0};

	(void)data;
	run(&r, MSG, "--server", f->server, "--from", FROM, "--to", TO,
	    "--timeout", "5", "--auth-user", USER, "--auth-password-file", pw,
	    "--auth-plaintext", NULL);
	if (r.status != 0 && strstr(r.err, "not implemented") != NULL) {
		g_test_skip("the library has no AUTH yet");
		return;
	}
	g_assert_cmpint(r.status, ==, 0);
	assert_no_secret(&r);
	g_assert_true(got_command(f, "AUTH PLAIN"));
	g_assert_true(received(f, PLAIN_B64));
	assert_content(message(f, 0), MSG);
}

/* Every flag's errors: 64, said on stderr, no connection, no secret. */
static void
test_tls_auth_usage(Fixture *f, gconstpointer data)
{
	g_autofree char *open_pw = password_file(f, SECRET "\n", 0644);
	g_autofree char *group_pw = fixture_file(f, "gpw", SECRET "\n");
	g_autofree char *empty_pw = fixture_file(f, "epw", "\n" SECRET "\n");
	g_autofree char *ok_pw = fixture_file(f, "okpw", SECRET "\n");
	g_autofree char *missing = g_build_filename(f->dir, "none", NULL);
	const struct {
		const char *args[4];
		const char *said;
	} cases[] = {
	    {{"--tls", "maybe"},
	     "--tls: expected none, may, encrypt or "
	     "verify, got \"maybe\""},
	    {{"--tls", "VERIFY"}, "got \"VERIFY\""},
	    {{"--tls", ""}, "--tls: "},
	    {{"--ca-file", missing}, "--ca-file: cannot read "},
	    {{"--ca-file", f->dir}, "not a regular file"},
	    {{"--auth-user", USER},
	     "--auth-user and --auth-password-file go "
	     "together"},
	    {{"--auth-password-file", ok_pw}, "go together"},
	    {{"--auth-user", USER, "--auth-password-file", open_pw},
	     "mode 0644 lets the group or others read"},
	    {{"--auth-user", USER, "--auth-password-file", group_pw},
	     "mode 0640 lets the group or others read"},
	    {{"--auth-user", USER, "--auth-password-file", missing},
	     "--auth-password-file: "},
	    {{"--auth-user", USER, "--auth-password-file", empty_pw},
	     "the first line (the password) is empty"},
	    {{"--auth-user", "", "--auth-password-file", ok_pw},
	     "--auth-user: must not be empty"},
	    {{"--auth-password", SECRET}, "--auth-password"},
	};

	(void)data;
	g_assert_cmpint(g_chmod(group_pw, 0640), ==, 0);
	g_assert_cmpint(g_chmod(empty_pw, 0600), ==, 0);
	g_assert_cmpint(g_chmod(ok_pw, 0600), ==, 0);
	for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GPtrArray) args = g_ptr_array_new();
		g_auto(Run) r = {0};
		const char *base[] = {"--server", f->server, "--from",
		                      FROM,       "--to",    TO};

		for (guint j = 0; j < G_N_ELEMENTS(base); j++)
			g_ptr_array_add(args, (gpointer)base[j]);
		for (guint j = 0; j < 4 && cases[i].args[j] != NULL; j++)
			g_ptr_array_add(args, (gpointer)cases[i].args[j]);
		g_ptr_array_add(args, NULL);
		run_argv(&r, MSG, (const char *const *)args->pdata);
		g_assert_cmpint(r.status, ==, 64);
		g_assert_cmpstr(r.out, ==, "");
		g_assert_nonnull(strstr(r.err, cases[i].said));
		/* The last case has the secret in argv on purpose. */
		if (i + 1 < G_N_ELEMENTS(cases))
			assert_no_secret(&r);
	}
	g_assert_cmpuint(fake_smtp_get_connections(f->fake), ==, 0);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);

	smtp_send_path = argc > 1 ? argv[1] : g_getenv("SMTP_SEND");
	if (smtp_send_path == NULL)
		g_error("usage: %s PATH-TO-SMTP-SEND (or set SMTP_SEND)",
		        argv[0]);

#define ADD(path, script, fn)                                                  \
	g_test_add("/smtp-send/" path, Fixture, script, fixture_setup, fn,     \
	           fixture_teardown)

	ADD("send/stdin", NULL, test_stdin);
	ADD("send/null-sender", NULL, test_null_sender);
	ADD("send/files-one-connection", NULL, test_files);
	ADD("send/helo", NULL, test_helo);
	ADD("send/dropped-option-wire",
	    "ehlo-keywords 8BITMIME SIZE 10485760 ENHANCEDSTATUSCODES\n",
	    test_dropped_option_wire);
	ADD("json/hostile-server-text",
	    "on RCPT raw 550-5.1.1 first\\r\\n550 5.1.1 Bad \\x1b[31m \"q\" "
	    "\\\\ \\xff\\xc3( \\xc3\\xa9 \\x7f\\r\\n\n",
	    test_hostile_text);
	ADD("plain/bidi-server-text",
	    "on RCPT raw 550 5.1.1 a\\xe2\\x80\\xaeb "
	    "\\xe2\\x81\\xa6c\\xe2\\x81\\xa9 "
	    "\\xe2\\x80\\x8ed\\xe2\\x80\\x8f \\xd8\\x9ce "
	    "\\xe2\\x80\\xaaf\\xe2\\x80\\xac \\xc3\\xa9\\r\\n\n",
	    test_bidi_text);
	ADD("files/unreadable", NULL, test_unreadable);
	ADD("files/not-regular", NULL, test_not_regular);
	ADD("files/stdin-cap", NULL, test_stdin_cap);
	ADD("files/many-over-batches", NULL, test_many_files);
	ADD("files/many-over-batches-pipelined",
	    "ehlo-keywords PIPELINING 8BITMIME SIZE 10485760\n",
	    test_many_files);
	ADD("files/change-while-loaded-ahead",
	    "on DOT#1 delay 2000 250 2.0.0 Ok\n", test_change_while_ahead);
	ADD("files/grow-while-loaded-ahead",
	    "on DOT#1 delay 2000 250 2.0.0 Ok\n", test_grow_while_ahead);
	ADD("files/exit-status-mix", "on RCPT /later@/ reply 450 4.2.1 Busy\n",
	    test_exit_status_mix);
	ADD("files/reconnect-after-loss", "on MAIL /SIZE=25( |$)/ close\n",
	    test_reconnect);
	ADD("connect/refused", NO_SERVER, test_connect_refused);
	ADD("server/ipv6-literal", NO_SERVER, test_server_ipv6);
	ADD("usage/errors", NULL, test_usage);
	ADD("usage/help", NULL, test_help);
	ADD("tls/required-not-offered", NULL, test_tls_required);
	ADD("tls/none-and-loopback-default", NULL, test_tls_none);
	ADD("auth/refused-without-tls", AUTH_SCRIPT, test_auth_no_plaintext);
	ADD("auth/plaintext-allowed", AUTH_SCRIPT, test_auth_plaintext);
	ADD("usage/tls-auth-errors", NULL, test_tls_auth_usage);

	for (guint i = 0; i < G_N_ELEMENTS(error_cases); i++) {
		g_autofree char *path = g_strdup_printf("/smtp-send/outcome/%s",
		                                        error_cases[i].name);

		g_test_add_data_func(path, &error_cases[i], test_error_case);
	}
	return g_test_run();
}
