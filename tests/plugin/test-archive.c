/*
 * test-archive.c - the end-of-message work (am_milter_archive) with a
 * real configuration file and the fake SMTP server as archive relay
 */
#include <glib/gstdio.h>
#include <string.h>

#include "fakesmtp.h"
#include "log.h"
#include "milter.h"

typedef struct {
	char *dir;
	FakeSmtp *fake;
	AmContext *ctx;
} Fixture;

/* @milter_extra and @relay_extra: more lines for those groups. */
static void
fixture_setup_with(Fixture *f, const char *script, gboolean listening,
                   const char *on_failure, const char *milter_extra,
                   const char *relay_extra)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(GPtrArray) errors = NULL;
	g_autofree char *conf = NULL;
	g_autofree char *path = NULL;
	g_autofree char *keyfile = NULL;
	AmConfig *config;
	AmArchiveKey *key;
	guint16 port;

	f->dir = g_dir_make_tmp("am-archive-XXXXXX", NULL);
	f->fake = fake_smtp_new(script, &error);
	g_assert_no_error(error);
	port = fake_smtp_start(f->fake, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
	if (!listening)
		fake_smtp_stop(f->fake);

	keyfile = g_build_filename(f->dir, "key", NULL);
	conf = g_strdup_printf(
	    "[milter]\nsocket = inet:1@127.0.0.1\n"
	    "archive_id_key_file = %s\ncapture_memory_max = 64\n%s\n"
	    "[relay:archive]\nhost = 127.0.0.1\nport = %u\n"
	    "timeout = 2\n%s\n"
	    "[rule:everything]\nmode = journal\nrelay = archive\n"
	    "archive_to = journal@archive.example\n"
	    "on_failure = %s\n",
	    keyfile, milter_extra, port, relay_extra, on_failure);
	path = g_build_filename(f->dir, "test.conf", NULL);
	g_assert_true(g_file_set_contents(path, conf, -1, NULL));
	config = am_config_load(path, &errors);
	g_assert_nonnull(config);
	key = am_archive_key_load(keyfile, &error);
	g_assert_no_error(error);
	f->ctx = am_context_new(config, key);
	g_unlink(path);
	g_unlink(keyfile);
}

static void
fixture_setup(Fixture *f, const char *script, gboolean listening,
              const char *on_failure)
{
	fixture_setup_with(f, script, listening, on_failure, "", "");
}

static void
fixture_teardown(Fixture *f)
{
	am_context_unref(f->ctx);
	fake_smtp_free(f->fake);
	g_rmdir(f->dir);
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
capture(const char *archive_id)
{
	AmCapture *cap = am_capture_new(32, NULL, TRUE);
	static const char body[] = "line one\r\n.dot line\r\nline three\r\n";

	g_assert_true(am_capture_add_header(cap, "Subject", " t\n more", NULL));
	if (archive_id != NULL)
		g_assert_true(am_capture_add_header(cap, "X-Archive-Id",
		                                    archive_id, NULL));
	g_assert_true(am_capture_add_body(cap, (const guchar *)body,
	                                  sizeof(body) - 1, NULL));
	return cap;
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
	g_autofree char *reason = NULL;
	const FakeSmtpMessage *m;
	const char *data;
	const char *body;
	gsize len;

	fixture_setup(&f, NULL, TRUE, "tempfail");
	g_assert_cmpint(am_milter_archive(f.ctx, env, cap, &reason), ==,
	                AM_VERDICT_ACCEPT);
	g_assert_null(reason);
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
	fixture_teardown(&f);
}

static void
test_relay_down(gconstpointer data)
{
	const char *on_failure = data;
	const char *rcpts[] = {"a@dest.example", NULL};
	Fixture f = {0};
	g_autoptr(AmEnvelope) env = envelope(rcpts);
	g_autoptr(AmCapture) cap = capture(NULL);
	g_autofree char *reason = NULL;
	AmVerdict v;

	fixture_setup(&f, NULL, FALSE, on_failure);
	v = am_milter_archive(f.ctx, env, cap, &reason);
	if (strcmp(on_failure, "tempfail") == 0) {
		g_assert_cmpint(v, ==, AM_VERDICT_TEMPFAIL);
		g_assert_nonnull(reason);
	} else {
		g_assert_cmpint(v, ==, AM_VERDICT_ACCEPT);
		g_assert_null(reason);
	}
	fixture_teardown(&f);
}

/* Our own copy coming back to the archive address: not copied. */
static void
test_returning_copy(void)
{
	const char *rcpts[] = {"Journal@Archive.example", NULL};
	Fixture f = {0};
	g_autoptr(AmEnvelope) env = envelope(rcpts);
	g_autoptr(AmCapture) cap = NULL;
	g_autofree char *id = NULL;
	g_autofree char *value = NULL;
	g_autofree char *reason = NULL;

	fixture_setup(&f, NULL, TRUE, "tempfail");
	id = am_archive_id_new(f.ctx->key);
	value = g_strconcat(" ", id, NULL);
	cap = capture(value);
	g_assert_cmpint(am_milter_archive(f.ctx, env, cap, &reason), ==,
	                AM_VERDICT_ACCEPT);
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
	g_autofree char *id = NULL;
	g_autofree char *reason = NULL;

	fixture_setup(&f, NULL, TRUE, "tempfail");
	id = replay ? am_archive_id_new(f.ctx->key)
	            : g_strdup("am1.00000000000000000000000000000000."
	                       "00000000000000000000000000000000");
	cap = capture(id);
	g_assert_cmpint(am_milter_archive(f.ctx, env, cap, &reason), ==,
	                AM_VERDICT_ACCEPT);
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
} SettingCase;

static const SettingCase deadline_case = {
    "on RCPT stall", "copy_deadline = 0.5", "timeout_command = 10"};
static const SettingCase tls_case = {NULL, "", "tls = encrypt"};

static void
test_relay_setting(gconstpointer data)
{
	const SettingCase *c = data;
	const char *rcpts[] = {"a@dest.example", NULL};
	Fixture f = {0};
	g_autoptr(AmEnvelope) env = envelope(rcpts);
	g_autoptr(AmCapture) cap = capture(NULL);
	g_autofree char *reason = NULL;
	gint64 start;
	double took;

	fixture_setup_with(&f, c->script, TRUE, "tempfail", c->milter_extra,
	                   c->relay_extra);
	start = g_get_monotonic_time();
	g_assert_cmpint(am_milter_archive(f.ctx, env, cap, &reason), ==,
	                AM_VERDICT_TEMPFAIL);
	took = (g_get_monotonic_time() - start) / (double)G_USEC_PER_SEC;
	g_test_message("%s after %.3f s", reason, took);
	g_assert_nonnull(reason);
	g_assert_cmpfloat(took, <, 3);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);
	fixture_teardown(&f);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	am_log_init("test-archive", TRUE, TRUE);
	g_test_add_func("/plugin/archive/sent", test_sent);
	g_test_add_data_func("/plugin/archive/relay-down/tempfail", "tempfail",
	                     test_relay_down);
	g_test_add_data_func("/plugin/archive/relay-down/accept", "accept",
	                     test_relay_down);
	g_test_add_func("/plugin/archive/returning-copy", test_returning_copy);
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
