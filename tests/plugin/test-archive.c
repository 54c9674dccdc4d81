/*
 * test-archive.c - the end-of-message work (am_milter_archive) with a
 * real configuration file, a real spool in a temporary directory and
 * the fake SMTP server as archive relay: every action of the policy
 * table in both delivery modes, what the MTA is told, what is left in
 * queue/ and hold/, and the log lines that matter
 */
#include <glib/gstdio.h>
#include <string.h>

#include "fakesmtp.h"
#include "log.h"
#include "milter.h"
#include "runner.h"
#include "spool.h"

typedef struct {
	char *dir;
	FakeSmtp *fake;
	FakeSmtp *down; /* started and stopped: a port nobody listens on */
	AmContext *ctx;
	AmSpool *spool;
} Fixture;

/*
 * [rule:a] with @rule_a, by default to journal@ on relay "archive"
 * ("down": nothing listens there); [rule:b], when
 * @rule_b is not NULL, with its own lines (relay, archive_to...).
 * @spool_full: a free-space floor no file system meets.
 */
static void
fixture_setup_full(Fixture *f, const char *script, const char *milter_extra,
                   const char *relay_extra, const char *rule_a,
                   const char *rule_b, gboolean spool_full)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(GPtrArray) errors = NULL;
	g_autofree char *conf = NULL;
	g_autofree char *path = NULL;
	g_autofree char *keyfile = NULL;
	g_autofree char *spooldir = NULL;
	g_autofree char *b = NULL;
	AmConfig *config;
	AmArchiveKey *key;
	guint16 port, down_port;
	guint i;

	f->dir = g_dir_make_tmp("am-archive-XXXXXX", NULL);
	f->fake = fake_smtp_new(script, &error);
	g_assert_no_error(error);
	port = fake_smtp_start(f->fake, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
	f->down = fake_smtp_new(NULL, &error);
	down_port = fake_smtp_start(f->down, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
	fake_smtp_stop(f->down);

	keyfile = g_build_filename(f->dir, "key", NULL);
	spooldir = g_build_filename(f->dir, "spool", NULL);
	b = rule_b ? g_strdup_printf("[rule:b]\nmode = journal\n%s\n", rule_b)
	           : g_strdup("");
	conf = g_strdup_printf(
	    "[milter]\nsocket = inet:1@127.0.0.1\n"
	    "archive_id_key_file = %s\ncapture_memory_max = 64\n"
	    "spool_dir = %s\nmatch = all\n%s\n"
	    "[relay:archive]\nhost = 127.0.0.1\nport = %u\n"
	    "timeout = 2\n%s\n"
	    "[relay:down]\nhost = 127.0.0.1\nport = %u\ntimeout = 1\n"
	    "[rule:a]\nmode = journal\n%s%s%s\n%s",
	    keyfile, spooldir, milter_extra, port, relay_extra, down_port,
	    strstr(rule_a, "relay =") ? "" : "relay = archive\n",
	    strstr(rule_a, "archive_to =")
	        ? ""
	        : "archive_to = journal@archive.example\n",
	    rule_a, b);
	path = g_build_filename(f->dir, "test.conf", NULL);
	g_assert_true(g_file_set_contents(path, conf, -1, NULL));
	config = am_config_load(path, &errors);
	for (i = 0; errors != NULL && i < errors->len; i++)
		g_test_message("config: %s", (char *)errors->pdata[i]);
	g_assert_nonnull(config);
	key = am_archive_key_load(keyfile, &error);
	g_assert_no_error(error);
	f->ctx = am_context_new(config, key);
	f->spool =
	    am_spool_open(spooldir, spool_full ? G_MAXUINT64 / 2 : 0, &error);
	g_assert_no_error(error);
	f->ctx->spool = f->spool;
	g_unlink(path);
	g_unlink(keyfile);
}

static void
fixture_setup(Fixture *f, const char *script, const char *rule_a)
{
	fixture_setup_full(f, script, "", "", rule_a, NULL, FALSE);
}

static void
rm_rf(const char *path)
{
	GDir *dir = g_dir_open(path, 0, NULL);
	const char *name;

	while (dir != NULL && (name = g_dir_read_name(dir)) != NULL) {
		g_autofree char *child = g_build_filename(path, name, NULL);

		if (g_file_test(child, G_FILE_TEST_IS_DIR))
			rm_rf(child);
		else
			g_unlink(child);
	}
	if (dir != NULL)
		g_dir_close(dir);
	g_rmdir(path);
}

static void
fixture_teardown(Fixture *f)
{
	am_context_unref(f->ctx);
	am_spool_close(f->spool);
	fake_smtp_free(f->fake);
	fake_smtp_free(f->down);
	rm_rf(f->dir);
	g_free(f->dir);
}

static AmEnvelope *
envelope(const char *const *rcpts)
{
	AmEnvelope *env = am_envelope_new();

	env->queue_id = g_strdup("TESTQ1");
	env->sender = g_strdup("s@ex.org");
	for (; *rcpts != NULL; rcpts++)
		g_ptr_array_add(env->recipients, g_strdup(*rcpts));
	return env;
}

static AmCapture *
capture_sized(const char *archive_id, gsize memory_max)
{
	AmCapture *cap = am_capture_new(memory_max, NULL, TRUE);
	static const char body[] = "line one\r\n.dot line\r\nline three\r\n";

	g_assert_true(am_capture_add_header(cap, "Subject", " t\n more", NULL));
	if (archive_id != NULL)
		g_assert_true(am_capture_add_header(cap, "X-Archive-Id",
		                                    archive_id, NULL));
	g_assert_true(am_capture_add_body(cap, (const guchar *)body,
	                                  sizeof(body) - 1, NULL));
	return cap;
}

/* A capture that spills to its temporary file (32 octets in memory). */
static AmCapture *
capture(const char *archive_id)
{
	return capture_sized(archive_id, 32);
}

/* The end-of-message work as cb_eom does it, for an MTA that granted
 * every action and applied the verdict as it came: decide, settle. */
static AmVerdict *
archive(Fixture *f, const AmEnvelope *env, AmCapture *cap)
{
	AmVerdict *v = am_milter_archive(f->ctx, env, cap, TRUE);

	am_milter_settle(f->ctx, v);
	g_assert_null(v->copies);
	return v;
}

static AmVerdict *
archive_one(Fixture *f)
{
	const char *rcpts[] = {"a@dest.example", "bcc@dest.example", NULL};
	g_autoptr(AmEnvelope) env = envelope(rcpts);
	g_autoptr(AmCapture) cap = capture(NULL);

	return archive(f, env, cap);
}

static GPtrArray *
spool_list(Fixture *f, AmSpoolState state)
{
	g_autoptr(GError) error = NULL;
	GPtrArray *list = am_spool_list(f->spool, state, &error);

	g_assert_no_error(error);
	return list;
}

/* The X-Archive-Id header of the @i-th message the relay took. */
static char *
relay_copy_id(Fixture *f, guint i)
{
	const FakeSmtpMessage *m = fake_smtp_get_message(f->fake, i);
	const char *data = g_bytes_get_data(m->content, NULL);
	const char *p = strstr(data, "X-Archive-Id: ");
	const char *end;

	g_assert_nonnull(p);
	p += strlen("X-Archive-Id: ");
	end = strstr(p, "\r\n");
	return g_strndup(p, end - p);
}

/* The copy on the relay: prefix with all recipients, then the bytes. */
static void
test_sent(void)
{
	const char *rcpts[] = {"a@dest.example", "bcc@dest.example", NULL};
	Fixture f = {0};
	g_autoptr(AmEnvelope) env = envelope(rcpts);
	g_autoptr(AmCapture) cap = capture(NULL);
	g_autoptr(GBytes) orig = NULL;
	g_autoptr(AmVerdict) v = NULL;
	g_autoptr(GPtrArray) queued = NULL;
	g_autoptr(GPtrArray) held = NULL;
	g_autofree char *id = NULL;
	const FakeSmtpMessage *m;
	const char *data;
	const char *body;
	gsize len;

	fixture_setup(&f, NULL, "");
	v = archive(&f, env, cap);
	g_assert_cmpint(v->action, ==, AM_VERDICT_ACCEPT);
	g_assert_null(v->rcode);
	g_assert_cmpuint(v->headers->len, ==, 0);
	g_assert_null(v->quarantine);
	g_assert_true(am_capture_is_spilled(cap));
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, 2000));
	m = fake_smtp_get_message(f.fake, 0);
	data = g_bytes_get_data(m->content, &len);
	g_assert_true(g_str_has_prefix(data,
	                               "X-Envelope-From: <s@ex.org>\r\n"
	                               "X-Envelope-To: <a@dest.example>\r\n"
	                               "X-Envelope-To: <bcc@dest.example>\r\n"
	                               "X-Archive-Id: am1."));
	body = strstr(data, "\r\nSubject:");
	g_assert_nonnull(body);
	body += 2;
	orig = am_capture_read_all(cap, NULL);
	g_assert_cmpmem(body, len - (body - data), g_bytes_get_data(orig, NULL),
	                g_bytes_get_size(orig));

	/* The copy's id is the one kept for the after-EOM log. */
	id = relay_copy_id(&f, 0);
	g_assert_cmpuint(v->ids->len, ==, 1);
	g_assert_cmpstr(v->ids->pdata[0], ==, id);
	queued = spool_list(&f, AM_SPOOL_QUEUED);
	held = spool_list(&f, AM_SPOOL_HELD);
	g_assert_cmpuint(queued->len + held->len, ==, 0);
	fixture_teardown(&f);
}

/*
 * One case of the policy table, delivery = sync unless the rule says
 * otherwise.  Expectations: what the MTA is told, the headers and
 * quarantine, and what the spool holds.
 */
typedef struct {
	const char *name;
	const char *script; /* the relay "archive" */
	const char *rule_a; /* more lines for [rule:a] */
	const char *rule_b; /* [rule:b] lines, or NULL: no rule b */
	gboolean spool_full;
	AmVerdictAction action;
	const char *reply; /* "RCODE XCODE" prefix of the reply; NULL */
	const char *text;  /* part of the reply text; NULL */
	const char *header[2];
	const char *quarantine; /* part of it; NULL: none */
	guint queued, held;
	const char *spooled_to; /* the one address of the spooled copy */
	guint relay_messages;   /* copies the relay took */
	guint ids;              /* v->ids->len */
} PolicyCase;

#define REFUSED        "on RCPT /refused/ reply 550 5.1.1 no such archive"
#define RULE_B_REFUSED "relay = archive\narchive_to = refused@archive.example\n"

static const PolicyCase policy_cases[] = {
    /* sync, outcome sent */
    {"sent-header",
     NULL,
     "on_sent = accept+header",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {"sent; id=am1.", NULL},
     NULL,
     0,
     0,
     NULL,
     1,
     1},

    /* sync, relay down: the defaults and each action */
    {"down-default-tempfail",
     NULL,
     "relay = down",
     NULL,
     FALSE,
     AM_VERDICT_TEMPFAIL,
     "451 4.3.0",
     "archive copy failed: unreachable",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    {"down-spool",
     NULL,
     "relay = down\non_unreachable = spool",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {NULL},
     NULL,
     1,
     0,
     "journal@archive.example",
     0,
     1},
    {"down-spool-quarantine-header",
     NULL,
     "relay = down\non_unreachable = spool+quarantine+header",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {"unreachable; spooled; id=am1.", NULL},
     "archive copy unreachable; spooled; X-Archive-Id=am1.",
     1,
     0,
     "journal@archive.example",
     0,
     1},
    {"down-accept-holds",
     NULL,
     "relay = down\non_unreachable = accept",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {NULL},
     NULL,
     0,
     1,
     "journal@archive.example",
     0,
     1},
    {"down-accept-header",
     NULL,
     "relay = down\non_failure = header",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {"unreachable; held; id=am1.", NULL},
     NULL,
     0,
     1,
     "journal@archive.example",
     0,
     1},
    {"down-reject",
     NULL,
     "relay = down\non_unreachable = reject",
     NULL,
     FALSE,
     AM_VERDICT_REJECT,
     "550 5.4.1",
     "archive copy refused: unreachable",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},

    /* sync, the spool cannot take what the policy keeps: tempfail */
    {"down-spool-full",
     NULL,
     "relay = down\non_unreachable = spool",
     NULL,
     TRUE,
     AM_VERDICT_TEMPFAIL,
     "451 4.3.0",
     "archive spool full",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    {"refused-hold-full",
     REFUSED,
     "archive_to = refused@archive.example",
     NULL,
     TRUE,
     AM_VERDICT_TEMPFAIL,
     "451 4.3.0",
     "archive spool full",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},

    /* sync, refusals */
    {"all-refused-default-holds",
     REFUSED,
     "archive_to = refused@archive.example",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {NULL},
     NULL,
     0,
     1,
     "refused@archive.example",
     0,
     1},
    {"all-refused-reject",
     REFUSED,
     "archive_to = refused@archive.example\non_all_refused = reject",
     NULL,
     FALSE,
     AM_VERDICT_REJECT,
     "550 5.1.1",
     "archive copy refused: 550 5.1.1 no such archive",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    {"all-refused-reject-text",
     REFUSED,
     "archive_to = refused@archive.example\non_all_refused = reject\n"
     "reject_text = Archive refuses this message",
     NULL,
     FALSE,
     AM_VERDICT_REJECT,
     "550 5.1.1",
     "Archive refuses this message",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    /* A 4xx rejected with a 5xx reply: the relay's code, made 5.x.x. */
    {"sender-4xx-reject",
     "on MAIL reply 451 4.3.2 not now",
     "on_sender_refused = reject",
     NULL,
     FALSE,
     AM_VERDICT_REJECT,
     "550 5.3.2",
     "451 4.3.2 not now",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    {"sender-4xx-default",
     "on MAIL reply 451 4.3.2 not now",
     "",
     NULL,
     FALSE,
     AM_VERDICT_TEMPFAIL,
     "451 4.3.0",
     "451 4.3.2 not now",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    /* Only the refused address goes to hold/: the other was taken. */
    {"some-refused-holds-refused-only",
     REFUSED,
     "archive_to = journal@archive.example, refused@archive.example\n"
     "on_some_refused = accept+header",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {"some_refused; held; id=am1.", NULL},
     NULL,
     0,
     1,
     "refused@archive.example",
     1,
     1},
    {"some-refused-4xx-default",
     "on RCPT /refused/ reply 452 4.2.2 full",
     "archive_to = journal@archive.example, refused@archive.example",
     NULL,
     FALSE,
     AM_VERDICT_TEMPFAIL,
     "451 4.3.0",
     "452 4.2.2 full",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     1,
     0},
    {"some-refused-4xx-spool",
     "on RCPT /refused/ reply 452 4.2.2 full",
     "archive_to = journal@archive.example, refused@archive.example\n"
     "on_some_refused = spool",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {NULL},
     NULL,
     1,
     0,
     "refused@archive.example",
     1,
     1},
    {"data-5xx-tempfail",
     "on DOT reply 554 5.6.0 bad",
     "on_data_error = tempfail",
     NULL,
     FALSE,
     AM_VERDICT_TEMPFAIL,
     "451 4.3.0",
     "554 5.6.0 bad",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    {"timeout-spool",
     "on DOT stall",
     "on_timeout = spool+header",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {"timeout; spooled; id=am1.", NULL},
     NULL,
     1,
     0,
     "journal@archive.example",
     0,
     1},

    /* delivery = spool: queued before the answer, nothing sent yet */
    {"spool-mode",
     NULL,
     "delivery = spool",
     NULL,
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {NULL},
     NULL,
     1,
     0,
     "journal@archive.example",
     0,
     1},
    {"spool-mode-full",
     NULL,
     "delivery = spool",
     NULL,
     TRUE,
     AM_VERDICT_TEMPFAIL,
     "451 4.3.0",
     "archive spool full",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},

    /* Several rules: reject beats tempfail beats accept; headers add
     * up; a spooled copy of an original not accepted is withdrawn. */
    {"two-rules-headers",
     NULL,
     "on_sent = accept+header",
     "relay = down\narchive_to = other@archive.example\n"
     "on_unreachable = spool+header",
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {"sent; id=am1.", "unreachable; spooled; id=am1."},
     NULL,
     1,
     0,
     "other@archive.example",
     1,
     2},
    {"two-rules-reject-wins",
     REFUSED,
     "relay = down",
     RULE_B_REFUSED "on_all_refused = reject",
     FALSE,
     AM_VERDICT_REJECT,
     "550 5.1.1",
     "no such archive",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    {"two-rules-tempfail-withdraws-spooled",
     NULL,
     "delivery = spool",
     "relay = down\narchive_to = other@archive.example",
     FALSE,
     AM_VERDICT_TEMPFAIL,
     "451 4.3.0",
     "archive copy failed",
     {NULL},
     NULL,
     0,
     0,
     NULL,
     0,
     0},
    {"two-rules-quarantine",
     REFUSED,
     "on_sent = accept",
     RULE_B_REFUSED "on_all_refused = spool+quarantine",
     FALSE,
     AM_VERDICT_ACCEPT,
     NULL,
     NULL,
     {NULL},
     "archive copy all_refused; spooled; X-Archive-Id=am1.",
     1,
     0,
     "refused@archive.example",
     1,
     2},
};

static void
test_policy(gconstpointer data)
{
	const PolicyCase *c = data;
	Fixture f = {0};
	g_autoptr(AmVerdict) v = NULL;
	g_autoptr(GPtrArray) queued = NULL;
	g_autoptr(GPtrArray) held = NULL;
	GPtrArray *spooled;
	guint i;

	fixture_setup_full(&f, c->script, "", "", c->rule_a, c->rule_b,
	                   c->spool_full);
	v = archive_one(&f);
	g_test_message("%s: action %d, %s %s %s", c->name, v->action,
	               v->rcode ? v->rcode : "-", v->xcode ? v->xcode : "-",
	               v->text ? v->text : "-");

	/* What the MTA is told. */
	g_assert_cmpint(v->action, ==, c->action);
	if (c->reply != NULL) {
		g_autofree char *reply =
		    g_strdup_printf("%s %s", v->rcode, v->xcode);

		g_assert_cmpstr(reply, ==, c->reply);
	} else {
		g_assert_null(v->rcode);
	}
	if (c->text != NULL)
		g_assert_nonnull(strstr(v->text, c->text));
	/* The client reads the relay's reply or a condition, never our
	 * client library's text (the relay's address) or a spool path. */
	if (v->text != NULL) {
		g_assert_null(strstr(v->text, "127.0.0.1"));
		g_assert_null(strstr(v->text, f.dir));
		g_assert_null(strstr(v->text, "am1."));
	}

	/* Headers and quarantine. */
	for (i = 0; i < G_N_ELEMENTS(c->header) && c->header[i]; i++) {
		g_assert_cmpuint(i, <, v->headers->len);
		g_test_message("header: %s", (char *)v->headers->pdata[i]);
		g_assert_true(
		    g_str_has_prefix(v->headers->pdata[i], c->header[i]));
	}
	g_assert_cmpuint(v->headers->len, ==, i);
	if (c->quarantine != NULL) {
		g_assert_nonnull(v->quarantine);
		g_assert_true(g_str_has_prefix(v->quarantine, c->quarantine));
	} else {
		g_assert_null(v->quarantine);
	}

	/* The spool, and the relay. */
	queued = spool_list(&f, AM_SPOOL_QUEUED);
	held = spool_list(&f, AM_SPOOL_HELD);
	g_assert_cmpuint(queued->len, ==, c->queued);
	g_assert_cmpuint(held->len, ==, c->held);
	spooled = queued->len > 0 ? queued : held;
	if (c->spooled_to != NULL) {
		const AmSpoolEntry *e = spooled->pdata[0];

		g_assert_cmpstr(e->to[0], ==, c->spooled_to);
		g_assert_null(e->to[1]);
		g_assert_cmpstr(e->queue_id, ==, "TESTQ1");
		/* The X-Archive-Id in a header names the spooled copy. */
		for (i = 0; i < v->headers->len; i++) {
			if (strstr(v->headers->pdata[i], "spooled") ||
			    strstr(v->headers->pdata[i], "held"))
				g_assert_true(g_str_has_suffix(
				    v->headers->pdata[i], e->id));
		}
		if (v->quarantine != NULL)
			g_assert_true(g_str_has_suffix(v->quarantine, e->id));
		/* Among the ids kept for the after-EOM log. */
		g_assert_true(g_ptr_array_find_with_equal_func(
		    v->ids, e->id, g_str_equal, NULL));
	}
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==,
	                 c->relay_messages);
	g_assert_cmpuint(v->ids->len, ==, c->ids);
	fixture_teardown(&f);
}

/*
 * The spooled copy is the copy: same X-Archive-Id in its file name, its
 * envelope and its header, the envelope of the rule, the message as the
 * journal builds it.
 */
static void
test_spool_mode_content(void)
{
	Fixture f = {0};
	g_autoptr(AmVerdict) v = NULL;
	g_autoptr(GPtrArray) queued = NULL;
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autofree char *want = NULL;
	const AmSpoolEntry *e;
	g_autoptr(GByteArray) got = g_byte_array_new();
	g_autofree char *path = NULL;
	g_autofree char *file = NULL;

	fixture_setup(&f, NULL, "delivery = spool\narchive_from = arch@ex.org");
	v = archive_one(&f);
	g_assert_cmpint(v->action, ==, AM_VERDICT_ACCEPT);
	queued = spool_list(&f, AM_SPOOL_QUEUED);
	g_assert_cmpuint(queued->len, ==, 1);
	e = queued->pdata[0];
	g_assert_cmpstr(e->rule, ==, "a");
	g_assert_cmpstr(e->relay, ==, "archive");
	g_assert_cmpstr(e->from, ==, "arch@ex.org");
	g_assert_cmpuint(e->attempts, ==, 0);
	path = g_build_filename(f.dir, "spool", "queue", e->id, NULL);
	g_assert_true(g_file_get_contents(path, &file, NULL, NULL));
	want = g_strdup_printf("X-Archive-Id: %s\r\n", e->id);
	g_assert_nonnull(strstr(file, want));
	g_assert_nonnull(strstr(file, "X-Envelope-To: <bcc@dest.example>"));
	g_assert_nonnull(strstr(file, ".dot line"));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 0);
	fixture_teardown(&f);
}

/* @content with the X-Archive-Id's value @id replaced by "ID". */
static char *
without_id(GBytes *content, const char *id)
{
	g_autofree char *text = g_strndup(g_bytes_get_data(content, NULL),
	                                  g_bytes_get_size(content));
	g_auto(GStrv) parts = g_strsplit(text, id, -1);

	g_assert_cmpuint(g_strv_length(parts), ==, 2);
	return g_strjoinv("ID", parts);
}

/*
 * delivery = spool with a runner: an accepted original's copy is handed
 * over with its message and goes from memory, octet for octet what a
 * copy read back from its file sends (the capture here is in a file:
 * capture_memory_max = 64), and leaves the spool.
 */
static void
test_spool_mode_handoff(void)
{
	Fixture f = {0};
	g_autoptr(GError) error = NULL;
	AmRunnerStats st;
	AmRunner *runner;
	char *ids[3];

	fixture_setup(&f, NULL, "delivery = spool");
	runner = am_runner_start_full(f.spool, 1, 60000, &error);
	g_assert_no_error(error);
	f.ctx->runner = runner;
	am_milter_set_context(f.ctx);

	/* 0: over the runner's cap, read from disk; 1: from memory;
	 * 2: a capture spilled to its file is never held by the runner
	 * (it would keep that file open), read from disk. */
	for (guint i = 0; i < 3; i++) {
		const char *rcpts[] = {"a@dest.example", "bcc@dest.example",
		                       NULL};
		g_autoptr(AmEnvelope) env = envelope(rcpts);
		g_autoptr(AmCapture) cap =
		    capture_sized(NULL, i == 2 ? 32 : 1024 * 1024);
		g_autoptr(AmVerdict) v = NULL;

		g_assert_cmpint(am_capture_is_spilled(cap), ==, i == 2);
		am_runner_set_memory_max(runner,
		                         i == 0 ? 0 : AM_RUNNER_MEMORY_MAX);
		v = archive(&f, env, cap);
		g_assert_cmpint(v->action, ==, AM_VERDICT_ACCEPT);
		g_assert_cmpuint(v->ids->len, ==, 1);
		ids[i] = g_strdup(v->ids->pdata[0]);
		g_assert_true(fake_smtp_wait_messages(f.fake, i + 1, 5000));
		am_runner_get_stats(runner, &st);
		g_assert_cmpuint(st.over_cap, ==, 1);
		g_assert_cmpuint(st.from_memory, ==, i >= 1 ? 1 : 0);
	}
	{
		g_autofree char *disk = without_id(
		    fake_smtp_get_message(f.fake, 0)->content, ids[0]);
		g_autofree char *mem = without_id(
		    fake_smtp_get_message(f.fake, 1)->content, ids[1]);
		g_autofree char *spilled = without_id(
		    fake_smtp_get_message(f.fake, 2)->content, ids[2]);

		g_assert_cmpstr(mem, ==, disk);
		g_assert_cmpstr(spilled, ==, disk);
	}
	am_runner_stop(runner);
	am_milter_set_context(NULL);
	{
		g_autoptr(GPtrArray) queued = spool_list(&f, AM_SPOOL_QUEUED);

		g_assert_cmpuint(queued->len, ==, 0);
	}
	for (guint i = 0; i < G_N_ELEMENTS(ids); i++)
		g_free(ids[i]);
	fixture_teardown(&f);
}

/* A sync failure spooled for retry carries its first attempt, so the
 * runner's backoff starts from it. */
static void
test_sync_spool_attempt(void)
{
	Fixture f = {0};
	g_autoptr(AmVerdict) v = NULL;
	g_autoptr(GPtrArray) queued = NULL;
	const AmSpoolEntry *e;
	gint64 now = g_get_real_time() / G_USEC_PER_SEC;

	fixture_setup_full(&f, NULL, "spool_retry_min = 60", "",
	                   "relay = down\non_unreachable = spool", NULL, FALSE);
	v = archive_one(&f);
	g_assert_cmpint(v->action, ==, AM_VERDICT_ACCEPT);
	queued = spool_list(&f, AM_SPOOL_QUEUED);
	g_assert_cmpuint(queued->len, ==, 1);
	e = queued->pdata[0];
	g_assert_cmpuint(e->attempts, ==, 1);
	g_assert_cmpint(e->next_attempt, >=, now + 59);
	g_assert_nonnull(e->last_error);
	fixture_teardown(&f);
}

/*
 * Log lines, checked in a subprocess whose standard error is the log:
 * a permanent failure kept in hold/ is an error line per refused
 * address; a copy sent for an original then rejected is named.
 */
static void
test_log_held(void)
{
	if (g_test_subprocess()) {
		Fixture f = {0};
		g_autoptr(AmVerdict) v = NULL;

		am_log_init("test-archive", TRUE, FALSE);
		fixture_setup(&f, REFUSED,
		              "archive_to = journal@archive.example, "
		              "refused@archive.example");
		v = archive_one(&f);
		g_assert_cmpint(v->action, ==, AM_VERDICT_ACCEPT);
		fixture_teardown(&f);
		return;
	}
	g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
	g_test_trap_assert_passed();
	g_test_trap_assert_stderr(
	    "*TESTQ1: archive=<journal@archive.example>, relay=*status=sent*");
	g_test_trap_assert_stderr(
	    "*TESTQ1: archive=<refused@archive.example>, relay=*"
	    "status=bounced (550 5.1.1 no such archive*");
	g_test_trap_assert_stderr(
	    "*error*TESTQ1: archive=<refused@archive.example>, rule=a, "
	    "X-Archive-Id=am1.*, status=held (550 5.1.1 no such archive*");
	g_test_trap_assert_stderr("*TESTQ1: action=accept, copies=1, "
	                          "failed=1 (a: some_refused -> accept*");
}

static void
test_log_sent_not_accepted(void)
{
	if (g_test_subprocess()) {
		Fixture f = {0};
		g_autoptr(AmVerdict) v = NULL;

		am_log_init("test-archive", TRUE, FALSE);
		fixture_setup_full(&f, REFUSED, "", "", "",
		                   RULE_B_REFUSED "on_all_refused = reject",
		                   FALSE);
		v = archive_one(&f);
		g_assert_cmpint(v->action, ==, AM_VERDICT_REJECT);
		fixture_teardown(&f);
		return;
	}
	g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
	g_test_trap_assert_passed();
	g_test_trap_assert_stderr("*TESTQ1: original not accepted (reject) "
	                          "but its archive copy was sent, "
	                          "X-Archive-Id=am1.*");
	g_test_trap_assert_stderr("*TESTQ1: action=reject, copies=2, "
	                          "failed=1 (550 5.1.1 archive copy refused*");
}

static void
test_log_spool_mode(void)
{
	if (g_test_subprocess()) {
		Fixture f = {0};
		g_autoptr(AmVerdict) v = NULL;

		am_log_init("test-archive", TRUE, FALSE);
		fixture_setup(&f, NULL, "delivery = spool");
		v = archive_one(&f);
		fixture_teardown(&f);
		return;
	}
	g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
	g_test_trap_assert_passed();
	g_test_trap_assert_stderr(
	    "*TESTQ1: rule=a, X-Archive-Id=am1.*, status=queued*");
	g_test_trap_assert_stderr(
	    "*TESTQ1: action=accept, copies=1, failed=0 (a: queued, id=am1.*");
}

/* Our own copy coming back to the archive address: not copied. */
static void
test_returning_copy(void)
{
	const char *rcpts[] = {"Journal@Archive.example", NULL};
	Fixture f = {0};
	g_autoptr(AmEnvelope) env = envelope(rcpts);
	g_autoptr(AmCapture) cap = NULL;
	g_autoptr(AmVerdict) v = NULL;
	g_autofree char *id = NULL;
	g_autofree char *value = NULL;

	fixture_setup(&f, NULL, "");
	id = am_archive_id_new(f.ctx->key);
	value = g_strconcat(" ", id, NULL);
	cap = capture(value);
	v = archive(&f, env, cap);
	g_assert_cmpint(v->action, ==, AM_VERDICT_ACCEPT);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 0);
	fixture_teardown(&f);
}

/* A forged id, or a real one replayed onto other mail, is archived. */
static void
test_forged_or_replayed(gconstpointer data)
{
	gboolean replay = GPOINTER_TO_INT(data);
	const char *rcpts[] = {"a@dest.example", NULL};
	Fixture f = {0};
	g_autoptr(AmEnvelope) env = envelope(rcpts);
	g_autoptr(AmCapture) cap = NULL;
	g_autoptr(AmVerdict) v = NULL;
	g_autofree char *id = NULL;

	fixture_setup(&f, NULL, "");
	id = replay ? am_archive_id_new(f.ctx->key)
	            : g_strdup("am1.00000000000000000000000000000000."
	                       "00000000000000000000000000000000");
	cap = capture(id);
	v = archive(&f, env, cap);
	g_assert_cmpint(v->action, ==, AM_VERDICT_ACCEPT);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, 2000));
	fixture_teardown(&f);
}

/*
 * Relay settings from the file reach the copy: copy_deadline cuts the
 * relay's 10 s limit, and tls = encrypt keeps the copy from going out
 * in clear to a relay that offers no STARTTLS.
 */
typedef struct {
	const char *script;
	const char *milter_extra;
	const char *relay_extra;
	const char *rule;
	AmVerdictAction action;
} SettingCase;

static const SettingCase deadline_case = {
    "on RCPT stall", "copy_deadline = 0.5", "timeout_command = 10", "",
    AM_VERDICT_TEMPFAIL};
/* A TLS failure is permanent: by default the copy goes to hold/. */
static const SettingCase tls_case = {
    NULL, "", "tls = encrypt", "on_tls_error = tempfail", AM_VERDICT_TEMPFAIL};

static void
test_relay_setting(gconstpointer data)
{
	const SettingCase *c = data;
	Fixture f = {0};
	g_autoptr(AmVerdict) v = NULL;
	gint64 start;
	double took;

	fixture_setup_full(&f, c->script, c->milter_extra, c->relay_extra,
	                   c->rule, NULL, FALSE);
	start = g_get_monotonic_time();
	v = archive_one(&f);
	took = (g_get_monotonic_time() - start) / (double)G_USEC_PER_SEC;
	g_test_message("%s after %.3f s", v->text, took);
	g_assert_cmpint(v->action, ==, c->action);
	g_assert_cmpfloat(took, <, 3);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);
	fixture_teardown(&f);
}

/*
 * copy_deadline bounds all synchronous copies of one message together
 * (match = all, two sync rules, a relay that never answers RCPT): the
 * first copy runs out at copy_deadline, the second gets no time left
 * and is a timeout too, without a connection; the message takes about
 * copy_deadline, not twice it.  Checked in a subprocess whose standard
 * error is the log, for the decision line.
 */
static void
test_message_deadline(void)
{
	if (g_test_subprocess()) {
		Fixture f = {0};
		g_autoptr(AmVerdict) v = NULL;
		gint64 start;
		double took;

		am_log_init("test-archive", TRUE, FALSE);
		fixture_setup_full(
		    &f, "on RCPT stall", "copy_deadline = 1.5",
		    "timeout_command = 10", "on_timeout = tempfail",
		    "relay = archive\narchive_to = second@archive.example\n"
		    "on_timeout = tempfail",
		    FALSE);
		start = g_get_monotonic_time();
		v = archive_one(&f);
		took =
		    (g_get_monotonic_time() - start) / (double)G_USEC_PER_SEC;
		g_test_message("took %.3f s: %s", took, v->text);
		g_assert_cmpint(v->action, ==, AM_VERDICT_TEMPFAIL);
		g_assert_cmpfloat(took, >=, 1.4);
		g_assert_cmpfloat(took, <, 2.6);
		g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
		g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);
		fixture_teardown(&f);
		return;
	}
	g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
	g_test_trap_assert_passed();
	g_test_trap_assert_stderr(
	    "*TESTQ1: action=tempfail, copies=2, "
	    "failed=2 (*a: timeout -> tempfail, id=am1.*; "
	    "b: timeout -> tempfail, id=am1.*");
	g_test_trap_assert_stderr(
	    "*TESTQ1: archive=<second@archive.example>, relay=none, *"
	    "status=deferred (*deadline*");
}

/*
 * The reply text given to libmilter: a relay's text with a C1 control,
 * a Unicode line break, a bidi control or invalid UTF-8 reaches the
 * client as '?', '%' doubled for smfi_setreply.
 */
static void
test_reply_text(void)
{
	static const char *const unsafe[] = {
	    "\xc2\x85",     "\xc2\x9b",     "\xc2\x80",     "\xc2\x9f",
	    "\xe2\x80\xa8", "\xe2\x80\xa9", "\xe2\x80\x8e", "\xe2\x80\x8f",
	    "\xe2\x80\xaa", "\xe2\x80\xae", "\xe2\x81\xa6", "\xe2\x81\xa9",
	    "\xd8\x9c",     "\xff",         "\r\n",         "\x1b",
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(unsafe); i++) {
		g_autofree char *reason =
		    g_strdup_printf("451 4.3.0 100%% full%s250 ok", unsafe[i]);
		g_autofree char *text =
		    am_milter_reply_text("archive copy failed: ", reason);
		g_autofree char *expect = g_strdup_printf(
		    "archive copy failed: 451 4.3.0 100%%%% full%s250 ok",
		    strlen(unsafe[i]) == 2 && unsafe[i][0] == '\r' ? "??"
		                                                   : "?");

		g_test_message("case %zu: %s", i, text);
		g_assert_cmpstr(text, ==, expect);
	}
}

/*
 * A rule asks for quarantine (spool+quarantine on a failed sync copy)
 * and a second rule spools its copy (delivery = spool) for a runner
 * that would send it at once if handed it.  @QUARANTINE_GRANTED: the
 * verdict is applied as it came, both copies are handed over, the
 * runner sends rule b's.  @QUARANTINE_DENIED: the MTA did not grant
 * SMFIF_QUARANTINE; the verdict is a tempfail from the start.
 * @QUARANTINE_FAILED: granted, but smfi_quarantine() failed when
 * cb_eom applied it (am_verdict_no_quarantine before the settling).
 * In both failing cases the copies are withdrawn, the runner never
 * sees them, and the decision line says tempfail.
 */
typedef enum {
	QUARANTINE_GRANTED,
	QUARANTINE_DENIED,
	QUARANTINE_FAILED,
} QuarantineCase;

static void
test_quarantine(gconstpointer data)
{
	QuarantineCase qc = GPOINTER_TO_INT(data);
	const char *rcpts[] = {"a@dest.example", NULL};
	Fixture f = {0};
	g_autoptr(AmEnvelope) env = NULL;
	g_autoptr(AmCapture) cap = NULL;
	g_autoptr(AmVerdict) v = NULL;
	g_autoptr(GError) error = NULL;
	AmRunner *runner;

	if (!g_test_subprocess()) {
		g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
		g_test_trap_assert_passed();
		if (qc == QUARANTINE_GRANTED) {
			g_test_trap_assert_stderr(
			    "*TESTQ1: action=accept, copies=2, failed=1 (*; "
			    "quarantined*");
			return;
		}
		g_test_trap_assert_stderr(
		    "*error*TESTQ1: cannot quarantine the original (archive "
		    "copy unreachable; spooled; X-Archive-Id=am1.*");
		g_test_trap_assert_stderr(
		    "*TESTQ1: action=tempfail, copies=2, failed=1 (451 4.3.0 "
		    "archive-milter: cannot quarantine message; a: "
		    "unreachable -> spool+quarantine+header*; b: queued*; "
		    "not quarantined (*): tempfail)*");
		return;
	}

	am_log_init("test-archive", TRUE, FALSE);
	fixture_setup_full(&f, NULL, "", "",
	                   "relay = down\n"
	                   "on_unreachable = spool+quarantine+header",
	                   "relay = archive\ndelivery = spool\n"
	                   "archive_to = other@archive.example\n",
	                   FALSE);
	runner = am_runner_start_full(f.spool, 1, 60000, &error);
	g_assert_no_error(error);
	f.ctx->runner = runner;
	am_milter_set_context(f.ctx);
	env = envelope(rcpts);
	cap = capture(NULL);

	/* Step 1: the decision; nothing handed to the runner yet. */
	v = am_milter_archive(f.ctx, env, cap, qc != QUARANTINE_DENIED);
	if (qc == QUARANTINE_DENIED) {
		g_assert_cmpint(v->action, ==, AM_VERDICT_TEMPFAIL);
	} else {
		g_autoptr(GPtrArray) queued = spool_list(&f, AM_SPOOL_QUEUED);

		g_assert_cmpint(v->action, ==, AM_VERDICT_ACCEPT);
		g_assert_nonnull(v->quarantine);
		g_assert_cmpuint(queued->len, ==, 2);
		g_assert_false(fake_smtp_wait_messages(f.fake, 1, 300));
	}

	/* Step 2: cb_eom's quarantine failing, then the settling. */
	if (qc == QUARANTINE_FAILED)
		am_verdict_no_quarantine(v, "smfi_quarantine failed");
	am_milter_settle(f.ctx, v);
	g_assert_null(v->copies);

	if (qc == QUARANTINE_GRANTED) {
		g_assert_cmpuint(v->ids->len, ==, 2);
		g_assert_true(fake_smtp_wait_messages(f.fake, 1, 5000));
	} else {
		g_autoptr(GPtrArray) queued = spool_list(&f, AM_SPOOL_QUEUED);
		g_autoptr(GPtrArray) held = spool_list(&f, AM_SPOOL_HELD);

		g_assert_cmpint(v->action, ==, AM_VERDICT_TEMPFAIL);
		g_assert_cmpstr(v->rcode, ==, "451");
		g_assert_cmpstr(v->xcode, ==, "4.3.0");
		g_assert_cmpstr(v->text, ==,
		                "archive-milter: cannot quarantine message");
		g_assert_null(v->quarantine);
		g_assert_cmpuint(v->headers->len, ==, 0);
		g_assert_cmpuint(v->ids->len, ==, 0);
		g_assert_cmpuint(queued->len, ==, 0);
		g_assert_cmpuint(held->len, ==, 0);
		g_assert_false(fake_smtp_wait_messages(f.fake, 1, 500));
	}
	am_runner_stop(runner);
	am_milter_set_context(NULL);
	fixture_teardown(&f);
}

/*
 * The spool's tmp/ gone from under it (as a file system gone
 * read-only or unmounted would): 451 "archive spool unavailable" for
 * a delivery = spool copy and for a sync copy the policy spools,
 * naming neither the spool's path nor the copy's id, which the log
 * line has.
 */
static void
test_spool_unavailable(gconstpointer data)
{
	const char *rule = data;
	Fixture f = {0};
	g_autoptr(AmVerdict) v = NULL;
	g_autofree char *tmp = NULL;

	if (!g_test_subprocess()) {
		g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
		g_test_trap_assert_passed();
		g_test_trap_assert_stderr("*error*TESTQ1: rule a: *am1.*"
		                          "cannot create */spool/tmp/am1.*");
		g_test_trap_assert_stderr("*TESTQ1: action=tempfail, *(451 "
		                          "4.3.0 archive spool unavailable; *");
		return;
	}
	am_log_init("test-archive", TRUE, FALSE);
	fixture_setup(&f, NULL, rule);
	tmp = g_build_filename(f.dir, "spool", "tmp", NULL);
	g_assert_cmpint(g_rmdir(tmp), ==, 0);
	v = archive_one(&f);
	g_assert_cmpint(v->action, ==, AM_VERDICT_TEMPFAIL);
	g_assert_cmpstr(v->rcode, ==, "451");
	g_assert_cmpstr(v->text, ==, "archive spool unavailable");
	fixture_teardown(&f);
}

int
main(int argc, char **argv)
{
	gsize i;

	g_test_init(&argc, &argv, NULL);
	am_log_init("test-archive", TRUE, TRUE);
	g_test_add_func("/plugin/archive/sent", test_sent);
	for (i = 0; i < G_N_ELEMENTS(policy_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/plugin/archive/policy/%s", policy_cases[i].name);

		g_test_add_data_func(path, &policy_cases[i], test_policy);
	}
	g_test_add_func("/plugin/archive/spool-mode-content",
	                test_spool_mode_content);
	g_test_add_func("/plugin/archive/spool-mode-handoff",
	                test_spool_mode_handoff);
	g_test_add_func("/plugin/archive/sync-spool-attempt",
	                test_sync_spool_attempt);
	g_test_add_func("/plugin/archive/log/held", test_log_held);
	g_test_add_func("/plugin/archive/log/sent-not-accepted",
	                test_log_sent_not_accepted);
	g_test_add_func("/plugin/archive/log/spool-mode", test_log_spool_mode);
	g_test_add_func("/plugin/archive/returning-copy", test_returning_copy);
	g_test_add_data_func("/plugin/archive/quarantine/granted",
	                     GINT_TO_POINTER(QUARANTINE_GRANTED),
	                     test_quarantine);
	g_test_add_data_func("/plugin/archive/quarantine/not-granted",
	                     GINT_TO_POINTER(QUARANTINE_DENIED),
	                     test_quarantine);
	g_test_add_data_func("/plugin/archive/quarantine/failed-at-eom",
	                     GINT_TO_POINTER(QUARANTINE_FAILED),
	                     test_quarantine);
	g_test_add_data_func("/plugin/archive/spool-unavailable/spool-mode",
	                     "delivery = spool", test_spool_unavailable);
	g_test_add_data_func("/plugin/archive/spool-unavailable/sync",
	                     "relay = down\non_unreachable = spool",
	                     test_spool_unavailable);
	g_test_add_func("/plugin/archive/reply-text", test_reply_text);
	g_test_add_func("/plugin/archive/message-deadline",
	                test_message_deadline);
	g_test_add_data_func("/plugin/archive/forged-id",
	                     GINT_TO_POINTER(FALSE), test_forged_or_replayed);
	g_test_add_data_func("/plugin/archive/replayed-id",
	                     GINT_TO_POINTER(TRUE), test_forged_or_replayed);
	g_test_add_data_func("/plugin/archive/copy-deadline", &deadline_case,
	                     test_relay_setting);
	g_test_add_data_func("/plugin/archive/tls-encrypt-not-offered",
	                     &tls_case, test_relay_setting);
	return g_test_run();
}
