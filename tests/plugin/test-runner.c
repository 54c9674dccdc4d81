/*
 * test-runner.c - the spool's workers against the fake SMTP server:
 * pick-up at start, kick, retry then success, a refusal held, partial
 * success, max age, a rule or relay gone, the log lines; copies due
 * together for one relay sent as one pipelined batch, each settled by
 * its own outcome
 */
#include <fcntl.h>
#include <glib/gstdio.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fakesmtp.h"
#include "log.h"
#include "runner.h"

#define BODY     "Subject: spooled\r\nX-Archive-Id: x\r\n\r\nbody\r\n"
#define WAIT_MS  8000
#define QUEUE_ID "3F2A81C0DE"
#define ADDR_A   "a@archive.example"
#define ADDR_B   "b@archive.example"

typedef struct {
	char *dir;
	char *spool_dir;
	FakeSmtp *fake;
	guint16 port;
	AmSpool *spool;
	AmRunner *runner;
	char *log_path;
	int saved_stderr;
} Fixture;

static void
rm_rf(const char *path)
{
	g_autofree char *cmd = NULL;

	g_assert_true(g_str_has_prefix(path, g_get_tmp_dir()));
	cmd = g_strdup_printf("rm -rf '%s'", path);
	g_assert_cmpint(system(cmd), ==, 0);
}

/* Log lines go to stderr in the foreground: send them to a file the
 * test can read, and back at the end. */
static void
capture_log(Fixture *f)
{
	int fd;

	f->log_path = g_build_filename(f->dir, "log", NULL);
	fd = open(f->log_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	g_assert_cmpint(fd, >=, 0);
	fflush(stderr);
	f->saved_stderr = dup(2);
	g_assert_cmpint(dup2(fd, 2), ==, 2);
	close(fd);
}

static char *
log_text(Fixture *f)
{
	char *text = NULL;

	fflush(stderr);
	g_assert_true(g_file_get_contents(f->log_path, &text, NULL, NULL));
	return text;
}

static void
start_fake(Fixture *f, const char *script, guint16 port)
{
	g_autoptr(GError) error = NULL;

	f->fake = fake_smtp_new(script, &error);
	g_assert_no_error(error);
	f->port =
	    fake_smtp_start_port(f->fake, "127.0.0.1", port, NULL, &error);
	g_assert_no_error(error);
}

/* A fresh server with @script on the same port: the relay changes its
 * mind between attempts. */
static void
replace_fake(Fixture *f, const char *script)
{
	fake_smtp_free(f->fake);
	start_fake(f, script, f->port);
}

/* The configuration the daemon would load, with retries after
 * @retry, and @extra at its end. */
static void
set_context_full(Fixture *f, const char *max_age, const char *retry,
                 const char *extra)
{
	g_autofree char *path = g_build_filename(f->dir, "am.conf", NULL);
	g_autofree char *key_path = g_build_filename(f->dir, "key", NULL);
	g_autofree char *text =
	    g_strdup_printf("[milter]\n"
	                    "socket = unix:%s/sock\n"
	                    "archive_id_key_file = %s\n"
	                    "spool_dir = %s\n"
	                    "spool_min_free = 0\n"
	                    "spool_retry_min = %s\n"
	                    "spool_retry_max = %s\n"
	                    "spool_max_age = %s\n"
	                    "[relay:archive]\n"
	                    "host = 127.0.0.1\n"
	                    "port = %u\n"
	                    "timeout = 3\n"
	                    "[rule:all]\n"
	                    "relay = archive\n"
	                    "archive_to = " ADDR_A ", " ADDR_B "\n"
	                    "delivery = spool\n"
	                    "%s",
	                    f->dir, key_path, f->spool_dir, retry, retry,
	                    max_age, f->port, extra);
	g_autoptr(GPtrArray) errors = NULL;
	static const guint8 secret[32] = {1, 2, 3};
	AmConfig *config;
	AmContext *ctx;

	g_assert_true(g_file_set_contents(path, text, -1, NULL));
	config = am_config_load(path, &errors);
	for (guint i = 0; errors != NULL && i < errors->len; i++)
		g_printerr("%s\n", (char *)errors->pdata[i]);
	g_assert_nonnull(config);
	ctx =
	    am_context_new(config, am_archive_key_new(secret, sizeof(secret)));
	ctx->spool = f->spool;
	am_milter_set_context(ctx);
	am_context_unref(ctx);
}

/* The configuration the daemon would load, with short retries. */
static void
set_context(Fixture *f, const char *max_age)
{
	set_context_full(f, max_age, "1s", "");
}

static void
fixture_set_up(Fixture *f, const char *script)
{
	g_autoptr(GError) error = NULL;

	f->dir = g_dir_make_tmp("test-runner-XXXXXX", &error);
	g_assert_no_error(error);
	f->spool_dir = g_build_filename(f->dir, "spool", NULL);
	f->spool = am_spool_open(f->spool_dir, 0, &error);
	g_assert_no_error(error);
	start_fake(f, script, 0);
	capture_log(f);
}

static void
start_runner(Fixture *f, guint scan_ms)
{
	g_autoptr(GError) error = NULL;

	f->runner = am_runner_start_full(f->spool, 2, scan_ms, &error);
	g_assert_no_error(error);
	g_assert_nonnull(f->runner);
}

static void
fixture_tear_down(Fixture *f)
{
	am_runner_stop(f->runner);
	am_milter_set_context(NULL);
	am_spool_close(f->spool);
	fake_smtp_free(f->fake);
	fflush(stderr);
	dup2(f->saved_stderr, 2);
	close(f->saved_stderr);
	rm_rf(f->dir);
	g_free(f->log_path);
	g_free(f->spool_dir);
	g_free(f->dir);
}

static void
put_copy(Fixture *f, const char *id, const char *rule, const char *relay,
         gint64 created)
{
	const char *to[] = {ADDR_A, ADDR_B, NULL};
	AmSpoolEntry e = {
	    .id = (char *)id,
	    .queue_id = (char *)QUEUE_ID,
	    .rule = (char *)rule,
	    .relay = (char *)relay,
	    .from = (char *)"",
	    .to = (char **)to,
	    .created = created,
	};
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;

	smtp_message_append_data(msg, BODY, strlen(BODY));
	g_assert_true(am_spool_put(f->spool, &e, msg, AM_SPOOL_QUEUED, &error));
	g_assert_no_error(error);
}

static gint64
now_s(void)
{
	return g_get_real_time() / G_USEC_PER_SEC;
}

static guint
count(Fixture *f, AmSpoolState state)
{
	g_autoptr(GPtrArray) ids = am_spool_list_ids(f->spool, state, NULL);

	g_assert_nonnull(ids);
	return ids->len;
}

/* Entries in the spool's subdirectory @sub. */
static guint
count_dir(Fixture *f, const char *sub)
{
	g_autofree char *path = g_build_filename(f->spool_dir, sub, NULL);
	GDir *d = g_dir_open(path, 0, NULL);
	guint n = 0;

	g_assert_nonnull(d);
	while (g_dir_read_name(d) != NULL)
		n++;
	g_dir_close(d);
	return n;
}

/* Poll until queue/ and hold/ hold @queued and @held copies. */
static gboolean
wait_counts(Fixture *f, guint queued, guint held)
{
	gint64 end = g_get_monotonic_time() + WAIT_MS * 1000;

	while (g_get_monotonic_time() < end) {
		if (count(f, AM_SPOOL_QUEUED) == queued &&
		    count(f, AM_SPOOL_HELD) == held)
			return TRUE;
		g_usleep(20000);
	}
	return FALSE;
}

/* Poll until copy @id has made @attempts attempts. */
static AmSpoolEntry *
wait_attempts(Fixture *f, const char *id, guint attempts)
{
	gint64 end = g_get_monotonic_time() + WAIT_MS * 1000;

	while (g_get_monotonic_time() < end) {
		AmSpoolEntry *e = am_spool_get(f->spool, id, NULL);

		if (e != NULL && e->attempts >= attempts)
			return e;
		am_spool_entry_free(e);
		g_usleep(20000);
	}
	return NULL;
}

static guint
count_lines(const char *text, const char *part)
{
	g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
	guint n = 0;

	for (guint i = 0; lines[i] != NULL; i++)
		if (strstr(lines[i], part) != NULL)
			n++;
	return n;
}

/* The log once it holds a line with @part (the line comes just after
 * the rename the test waited for). */
static char *
wait_log(Fixture *f, const char *part)
{
	gint64 end = g_get_monotonic_time() + WAIT_MS * 1000;
	char *text = log_text(f);

	while (count_lines(text, part) == 0 && g_get_monotonic_time() < end) {
		g_free(text);
		g_usleep(20000);
		text = log_text(f);
	}
	return text;
}

/* ------------------------------------------------------------------ */

/* Copies left by an earlier run go out when the runner starts. */
static void
test_restart_pickup(void)
{
	Fixture f = {0};
	const FakeSmtpMessage *m;
	g_autofree char *log = NULL;

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	put_copy(&f, "am1.p1", "all", "archive", now_s());
	put_copy(&f, "am1.p2", "all", "archive", now_s());
	put_copy(&f, "am1.p3", "all", "archive", now_s());
	start_runner(&f, 60000);
	g_assert_true(fake_smtp_wait_messages(f.fake, 3, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));

	m = fake_smtp_get_message(f.fake, 0);
	g_assert_true(g_str_has_prefix(m->mail_from, "FROM:<>"));
	g_assert_cmpuint(m->rcpt_to->len, ==, 2);
	g_assert_cmpstr(m->rcpt_to->pdata[0], ==, "TO:<" ADDR_A ">");
	g_assert_cmpmem(g_bytes_get_data(m->content, NULL),
	                g_bytes_get_size(m->content), BODY, strlen(BODY));

	/* One line per address per copy, with the original's queue id. */
	log = log_text(&f);
	g_assert_cmpuint(count_lines(log, QUEUE_ID ": archive=<" ADDR_A ">"),
	                 ==, 3);
	g_assert_cmpuint(count_lines(log, "status=sent"), ==, 6);
	fixture_tear_down(&f);
}

/* A copy spooled while the runner runs goes at once on a kick, long
 * before the next scan. */
static void
test_kick(void)
{
	Fixture f = {0};

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	start_runner(&f, 60000);
	g_usleep(100000); /* the first scan is over */
	put_copy(&f, "am1.kick", "all", "archive", now_s());
	am_runner_kick(f.runner, "am1.kick");
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, 3000));
	g_assert_true(wait_counts(&f, 0, 0));
	fixture_tear_down(&f);
}

/* A temporary refusal: the copy waits (its state says why and when),
 * then goes when the relay takes it; nothing is held. */
static void
test_retry_then_success(void)
{
	Fixture f = {0};
	g_autoptr(AmSpoolEntry) e = NULL;
	g_autofree char *log = NULL;
	gint64 before = now_s();

	fixture_set_up(&f, "on DOT reply 451 4.3.0 try later");
	set_context(&f, "5d");
	put_copy(&f, "am1.r", "all", "archive", now_s());
	start_runner(&f, 100);
	e = wait_attempts(&f, "am1.r", 1);
	g_assert_nonnull(e);
	g_test_message("last error: %s", e->last_error);
	g_assert_cmpint(e->state, ==, AM_SPOOL_QUEUED);
	g_assert_nonnull(strstr(e->last_error, "451 4.3.0 try later"));
	g_assert_cmpint(e->next_attempt, >=, before + 1);
	g_assert_cmpuint(g_strv_length(e->to), ==, 2);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);

	replace_fake(&f, NULL);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	log = log_text(&f);
	g_assert_cmpuint(count_lines(log, QUEUE_ID ": archive=<" ADDR_A
	                                           ">, relay=127.0.0.1["),
	                 >=, 2);
	g_assert_cmpuint(count_lines(log, "status=deferred (451 4.3.0"), >=, 2);
	g_assert_cmpuint(count_lines(log, "status=sent"), ==, 2);
	g_assert_cmpuint(count_lines(log, "held"), ==, 0);
	fixture_tear_down(&f);
}

/* A permanent refusal under the default policy: held, logged at error
 * level, not retried. */
static void
test_refused_held(void)
{
	Fixture f = {0};
	g_autoptr(AmSpoolEntry) e = NULL;
	g_autofree char *log = NULL;

	fixture_set_up(&f, "on DOT reply 554 5.6.0 content refused");
	set_context(&f, "5d");
	put_copy(&f, "am1.h", "all", "archive", now_s());
	start_runner(&f, 100);
	g_assert_true(wait_counts(&f, 0, 1));
	e = am_spool_get(f.spool, "am1.h", NULL);
	g_assert_nonnull(e);
	g_assert_cmpint(e->state, ==, AM_SPOOL_HELD);
	g_assert_nonnull(strstr(e->last_error, "554 5.6.0 content refused"));
	g_assert_cmpuint(e->attempts, ==, 1);

	/* Held copies are left alone by the workers. */
	g_usleep(300000);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	log = wait_log(&f, "error: am1.h: held (data_error");
	g_assert_cmpuint(count_lines(log, "status=bounced (554 5.6.0"), ==, 2);
	g_assert_cmpuint(count_lines(log, "error: am1.h: held (data_error"), ==,
	                 1);
	fixture_tear_down(&f);
}

/* One address taken, one deferred: the retry goes to the second only. */
static void
test_partial(void)
{
	Fixture f = {0};
	g_autoptr(AmSpoolEntry) e = NULL;
	const FakeSmtpMessage *m;

	fixture_set_up(&f, "on RCPT /b@archive/ reply 450 4.2.0 busy");
	set_context(&f, "5d");
	put_copy(&f, "am1.part", "all", "archive", now_s());
	start_runner(&f, 100);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	m = fake_smtp_get_message(f.fake, 0);
	g_assert_cmpuint(m->rcpt_to->len, ==, 1);
	g_assert_cmpstr(m->rcpt_to->pdata[0], ==, "TO:<" ADDR_A ">");
	e = wait_attempts(&f, "am1.part", 1);
	g_assert_nonnull(e);
	g_assert_cmpuint(g_strv_length(e->to), ==, 1);
	g_assert_cmpstr(e->to[0], ==, ADDR_B);

	replace_fake(&f, NULL);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	m = fake_smtp_get_message(f.fake, 0);
	g_assert_cmpuint(m->rcpt_to->len, ==, 1);
	g_assert_cmpstr(m->rcpt_to->pdata[0], ==, "TO:<" ADDR_B ">");
	g_assert_true(wait_counts(&f, 0, 0));
	fixture_tear_down(&f);
}

/* A copy older than spool_max_age whose attempt fails is held. */
static void
test_max_age(void)
{
	Fixture f = {0};
	g_autoptr(AmSpoolEntry) e = NULL;
	g_autofree char *log = NULL;

	fixture_set_up(&f, "on MAIL reply 451 4.3.0 later");
	set_context(&f, "1h");
	put_copy(&f, "am1.old", "all", "archive", now_s() - 7200);
	put_copy(&f, "am1.young", "all", "archive", now_s());
	start_runner(&f, 100);
	g_assert_true(wait_counts(&f, 1, 1));
	e = am_spool_get(f.spool, "am1.old", NULL);
	g_assert_cmpint(e->state, ==, AM_SPOOL_HELD);
	g_assert_nonnull(strstr(e->last_error, "spool_max_age"));
	g_assert_nonnull(strstr(e->last_error, "451 4.3.0 later"));
	log = wait_log(&f, "am1.old: held (queued");
	g_assert_cmpuint(count_lines(log, "am1.old: held (queued"), ==, 1);
	g_assert_cmpuint(count_lines(log, "am1.young: held"), ==, 0);
	fixture_tear_down(&f);
}

/* A copy whose rule or relay left the configuration is held untried. */
static void
test_rule_gone(void)
{
	Fixture f = {0};
	g_autoptr(AmSpoolEntry) r = NULL;
	g_autoptr(AmSpoolEntry) y = NULL;

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	put_copy(&f, "am1.norule", "gone", "archive", now_s());
	put_copy(&f, "am1.norelay", "all", "gone", now_s());
	start_runner(&f, 100);
	g_assert_true(wait_counts(&f, 0, 2));
	r = am_spool_get(f.spool, "am1.norule", NULL);
	g_assert_cmpstr(r->last_error, ==,
	                "rule gone is no longer in the configuration");
	y = am_spool_get(f.spool, "am1.norelay", NULL);
	g_assert_cmpstr(y->last_error, ==,
	                "relay gone is no longer in the configuration");
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 0);
	fixture_tear_down(&f);
}

/*
 * A copy the scan finds while the runner runs, not kicked, may belong
 * to a message the milter has not answered yet: it waits, and goes on
 * the kick.  A copy released from hold by another process goes at
 * once, found by the scan.
 */
static void
test_scan_while_running(void)
{
	Fixture f = {0};
	guint n = 0;

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	/* A copy there at start: once it is sent, the first scan is
	 * over. */
	put_copy(&f, "am1.before", "all", "archive", now_s());
	start_runner(&f, 50);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));

	put_copy(&f, "am1.unsettled", "all", "archive", now_s());
	g_usleep(500000); /* ten scans */
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 1);
	g_assert_cmpuint(count(&f, AM_SPOOL_QUEUED), ==, 1);
	am_runner_kick(f.runner, "am1.unsettled");
	g_assert_true(fake_smtp_wait_messages(f.fake, 2, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	{
		const char *to[] = {ADDR_A, NULL};
		AmSpoolEntry e = {.id = (char *)"am1.rel",
		                  .queue_id = (char *)QUEUE_ID,
		                  .rule = (char *)"all",
		                  .relay = (char *)"archive",
		                  .from = (char *)"",
		                  .to = (char **)to,
		                  .created = now_s(),
		                  .last_error = (char *)"held by hand"};
		g_autoptr(SmtpMessage) msg =
		    smtp_message_new(SMTP_MESSAGE_BYTES);

		smtp_message_append_data(msg, BODY, strlen(BODY));
		g_assert_true(
		    am_spool_put(f.spool, &e, msg, AM_SPOOL_HELD, NULL));
	}
	g_usleep(300000);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 2);
	g_assert_true(am_spool_release(f.spool, "am1.rel", &n, NULL));
	g_assert_true(fake_smtp_wait_messages(f.fake, 3, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	fixture_tear_down(&f);
}

/*
 * A copy spooled just after the runner started, not kicked, belongs to
 * a message whose answer may still be pending: not sent until the kick,
 * however soon after the start it came (the first scan is over before
 * am_runner_start_full() returns; made by the scanner thread, it once
 * raced with such a copy and sent it at once).
 */
static void
test_scan_at_start(void)
{
	Fixture f = {0};

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	put_copy(&f, "am1.old", "all", "archive", now_s() - 10);
	start_runner(&f, 50);
	put_copy(&f, "am1.young", "all", "archive", now_s());
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	g_usleep(300000); /* six scans */
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 1);
	g_assert_cmpuint(count(&f, AM_SPOOL_QUEUED), ==, 1);
	am_runner_kick(f.runner, "am1.young");
	g_assert_true(fake_smtp_wait_messages(f.fake, 2, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	fixture_tear_down(&f);
}

/* Whether the fake has received a whole message's data (its end
 * marker), within @ms. */
static gboolean
wait_end_marker(Fixture *f, guint ms)
{
	gint64 until = g_get_monotonic_time() + ms * (gint64)1000;

	do {
		g_autoptr(GBytes) got = fake_smtp_get_received(f->fake);
		gsize len = 0;
		const char *data = g_bytes_get_data(got, &len);

		if (data != NULL && g_strstr_len(data, len, "\r\n.\r\n"))
			return TRUE;
		g_usleep(10000);
	} while (g_get_monotonic_time() < until);
	return FALSE;
}

/*
 * A stop waits for a copy being sent at most as long as it is told: a
 * relay that stalls after the end marker (here for its 3 s limit)
 * leaves the stop FALSE within the grace, the worker named busy, the
 * copy in queue/; am_runner_stop() then waits for it.  A runner with
 * nothing to send stops within the grace, TRUE.
 */
static void
test_stop_within(void)
{
	Fixture f = {0};
	guint busy = 99;
	gint64 t0;

	fixture_set_up(&f, "on DOT stall");
	set_context(&f, "5d");
	start_runner(&f, 60000);
	g_assert_true(am_runner_stop_within(f.runner, 2000, &busy));
	g_assert_cmpuint(busy, ==, 0);

	put_copy(&f, "am1.stalled", "all", "archive", now_s() - 10);
	start_runner(&f, 60000);
	g_assert_true(wait_end_marker(&f, WAIT_MS));
	t0 = g_get_monotonic_time();
	g_assert_false(am_runner_stop_within(f.runner, 200, &busy));
	g_assert_cmpint(g_get_monotonic_time() - t0, <, 1000000);
	g_assert_cmpuint(busy, ==, 1);
	g_assert_cmpuint(count(&f, AM_SPOOL_QUEUED), ==, 1);
	fixture_tear_down(&f);
}

static void
write_spool_file(Fixture *f, const char *sub, const char *name,
                 const char *text)
{
	g_autofree char *path = g_build_filename(f->spool_dir, sub, name, NULL);

	g_assert_true(g_file_set_contents(path, text, -1, NULL));
}

/*
 * A state file whose next_attempt lies far in the future (damaged, or
 * written while the clock was far ahead) is bounded by spool_retry_max:
 * the copy goes within seconds, and no arithmetic overflows (the ASan
 * build runs with UBSan).
 */
static void
test_far_future_state(void)
{
	Fixture f = {0};
	g_autofree char *log = NULL;

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	put_copy(&f, "am1.future", "all", "archive", now_s());
	write_spool_file(&f, "state", "am1.future",
	                 "archive-milter-state 1\n"
	                 "attempts: 1\n"
	                 "next_attempt: 99999999999999\n"
	                 "released: 0\n");
	start_runner(&f, 100);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	log = log_text(&f);
	g_assert_cmpuint(count_lines(log, "am1.future: next attempt "
	                                  "99999999999999 is more than"),
	                 ==, 1);
	fixture_tear_down(&f);
}

/*
 * A created time in the future (a clock set back, a damaged file) is
 * taken as now and saved, so that the copy's age grows from then on
 * and spool_max_age can end its retries.
 */
static void
test_future_created(void)
{
	Fixture f = {0};
	g_autoptr(AmSpoolEntry) e = NULL;
	gint64 before = now_s();

	fixture_set_up(&f, "on MAIL reply 451 4.3.0 later");
	set_context(&f, "5d");
	put_copy(&f, "am1.ahead", "all", "archive", G_MAXINT64 / 2);
	start_runner(&f, 100);
	e = wait_attempts(&f, "am1.ahead", 1);
	g_assert_nonnull(e);
	g_assert_cmpint(e->created, >=, before);
	g_assert_cmpint(e->created, <=, now_s());
	fixture_tear_down(&f);
}

/*
 * A copy past spool_max_age that was tried before is held without
 * another attempt, even when its next attempt was set far ahead: a
 * copy that never gets tried still ends in hold/.
 */
static void
test_max_age_untried(void)
{
	Fixture f = {0};
	g_autoptr(AmSpoolEntry) e = NULL;

	fixture_set_up(&f, NULL);
	set_context(&f, "1h");
	put_copy(&f, "am1.stuck", "all", "archive", now_s() - 7200);
	write_spool_file(&f, "state", "am1.stuck",
	                 "archive-milter-state 1\n"
	                 "attempts: 3\n"
	                 "next_attempt: 99999999999999\n"
	                 "released: 0\n"
	                 "last_error: 451 4.3.0 later\n");
	start_runner(&f, 100);
	g_assert_true(wait_counts(&f, 0, 1));
	e = am_spool_get(f.spool, "am1.stuck", NULL);
	g_assert_nonnull(e);
	g_assert_nonnull(strstr(e->last_error, "spool_max_age"));
	g_assert_nonnull(strstr(e->last_error, "451 4.3.0 later"));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 0);
	fixture_tear_down(&f);
}

/* Overwrite @len octets at @from_end octets before the end of the
 * spool file @id in queue/. */
static void
damage(Fixture *f, const char *id, const char *with, goffset from_end)
{
	g_autofree char *path =
	    g_build_filename(f->spool_dir, "queue", id, NULL);
	GStatBuf st;
	int fd;

	g_assert_cmpint(g_stat(path, &st), ==, 0);
	fd = open(path, O_WRONLY);
	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(pwrite(fd, with, strlen(with), st.st_size - from_end),
	                ==, (gssize)strlen(with));
	close(fd);
}

/*
 * A damaged copy is never sent: one cut short is left where it is with
 * an error-level line; one whose octets changed is held with an
 * error-level line.
 */
static void
test_damaged_not_sent(void)
{
	Fixture f = {0};
	g_autofree char *trunc = NULL;
	g_autofree char *log = NULL;

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	put_copy(&f, "am1.trunc", "all", "archive", now_s());
	put_copy(&f, "am1.flip", "all", "archive", now_s());
	trunc = g_build_filename(f.spool_dir, "queue", "am1.trunc", NULL);
	{
		GStatBuf st;

		g_assert_cmpint(g_stat(trunc, &st), ==, 0);
		g_assert_cmpint(truncate(trunc, st.st_size - 10), ==, 0);
	}
	damage(&f, "am1.flip", "X", 3);
	start_runner(&f, 100);
	g_assert_true(wait_counts(&f, 1, 1));
	/* Two workers: each line comes after its own copy's rename. */
	g_free(wait_log(&f, "error: am1.flip: held (spool file"));
	log = wait_log(&f, "error: am1.trunc: ");
	g_assert_cmpuint(count_lines(log, "error: am1.trunc: spool file"), ==,
	                 1);
	g_assert_cmpuint(count_lines(log, "damaged: the copy is"), ==, 1);
	g_assert_cmpuint(count_lines(log, "error: am1.flip: held (spool file"),
	                 ==, 1);
	g_assert_cmpuint(count_lines(log, "SHA-256"), ==, 1);
	g_usleep(300000);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 0);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);
	g_assert_true(g_file_test(trunc, G_FILE_TEST_EXISTS));
	fixture_tear_down(&f);
}

/* Spool copy @id as the milter does, then hand it to the runner with
 * its message in memory (@body: what the message in memory holds). */
static void
put_kick_copy(Fixture *f, const char *id, const char *body)
{
	const char *to[] = {ADDR_A, ADDR_B, NULL};
	AmSpoolEntry e = {
	    .id = (char *)id,
	    .queue_id = (char *)QUEUE_ID,
	    .rule = (char *)"all",
	    .relay = (char *)"archive",
	    .from = (char *)"",
	    .to = (char **)to,
	    .created = now_s(),
	};
	SmtpMessage *msg = smtp_message_new(SMTP_MESSAGE_BYTES);

	put_copy(f, id, "all", "archive", e.created);
	smtp_message_append_data(msg, body, strlen(body));
	am_runner_kick_copy(f->runner, am_spool_entry_copy(&e), msg);
}

static AmRunnerStats
stats(Fixture *f)
{
	AmRunnerStats st;

	am_runner_get_stats(f->runner, &st);
	return st;
}

/*
 * A copy handed over with its message goes from memory: the same
 * octets as a copy read from its file, its file never read (a byte
 * changed on disk meanwhile does not show; the digest check would
 * have held it), and removed once confirmed.  The cap is released
 * after each attempt: with room for one message only, every copy in
 * turn still goes from memory.
 */
static void
test_kick_copy_memory(void)
{
	Fixture f = {0};
	const FakeSmtpMessage *disk, *mem;

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	start_runner(&f, 60000);
	g_usleep(100000); /* the first scan is over */

	put_copy(&f, "am1.disk", "all", "archive", now_s());
	am_runner_kick(f.runner, "am1.disk");
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	g_assert_cmpuint(stats(&f).from_disk, ==, 1);

	am_runner_set_memory_max(f.runner, strlen(BODY));
	put_kick_copy(&f, "am1.mem", BODY);
	g_assert_true(fake_smtp_wait_messages(f.fake, 2, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	disk = fake_smtp_get_message(f.fake, 0);
	mem = fake_smtp_get_message(f.fake, 1);
	g_assert_true(g_bytes_equal(disk->content, mem->content));
	g_assert_cmpstr(mem->mail_from, ==, disk->mail_from);
	g_assert_cmpuint(mem->rcpt_to->len, ==, 2);
	g_assert_cmpstr(mem->rcpt_to->pdata[1], ==, "TO:<" ADDR_B ">");

	/* Changed on disk after the put: memory's octets go, the file is
	 * not read. */
	for (guint i = 0; i < 3; i++) {
		g_autofree char *id = g_strdup_printf("am1.m%u", i);
		const FakeSmtpMessage *m;

		put_copy(&f, id, "all", "archive", now_s());
		damage(&f, id, "X", 3);
		{
			const char *to[] = {ADDR_A, ADDR_B, NULL};
			AmSpoolEntry e = {.id = id,
			                  .queue_id = (char *)QUEUE_ID,
			                  .rule = (char *)"all",
			                  .relay = (char *)"archive",
			                  .from = (char *)"",
			                  .to = (char **)to,
			                  .created = now_s()};
			SmtpMessage *msg = smtp_message_new(SMTP_MESSAGE_BYTES);

			smtp_message_append_data(msg, BODY, strlen(BODY));
			am_runner_kick_copy(f.runner, am_spool_entry_copy(&e),
			                    msg);
		}
		g_assert_true(fake_smtp_wait_messages(f.fake, 3 + i, WAIT_MS));
		m = fake_smtp_get_message(f.fake, 2 + i);
		g_assert_true(g_bytes_equal(disk->content, m->content));
		g_assert_true(wait_counts(&f, 0, 0));
	}
	g_assert_cmpuint(stats(&f).from_memory, ==, 4);
	g_assert_cmpuint(stats(&f).from_disk, ==, 1);
	g_assert_cmpuint(stats(&f).over_cap, ==, 0);
	/* No state file was made for a copy confirmed at once. */
	g_assert_cmpuint(count_dir(&f, "state"), ==, 0);
	fixture_tear_down(&f);
}

/*
 * Beyond the memory cap the message is dropped and the copy read from
 * its file, digest checked: a byte changed on disk is caught (held),
 * which proves the file was read.
 */
static void
test_kick_copy_over_cap(void)
{
	Fixture f = {0};

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	start_runner(&f, 60000);
	g_usleep(100000);
	am_runner_set_memory_max(f.runner, strlen(BODY) - 1);
	put_copy(&f, "am1.big", "all", "archive", now_s());
	damage(&f, "am1.big", "X", 3);
	{
		const char *to[] = {ADDR_A, NULL};
		AmSpoolEntry e = {.id = (char *)"am1.big",
		                  .queue_id = (char *)QUEUE_ID,
		                  .rule = (char *)"all",
		                  .relay = (char *)"archive",
		                  .from = (char *)"",
		                  .to = (char **)to,
		                  .created = now_s()};
		SmtpMessage *msg = smtp_message_new(SMTP_MESSAGE_BYTES);

		smtp_message_append_data(msg, BODY, strlen(BODY));
		am_runner_kick_copy(f.runner, am_spool_entry_copy(&e), msg);
	}
	g_assert_true(wait_counts(&f, 0, 1));
	g_free(wait_log(&f, "error: am1.big: held (spool file"));
	g_assert_cmpuint(stats(&f).over_cap, ==, 1);
	g_assert_cmpuint(stats(&f).from_memory, ==, 0);
	g_assert_cmpuint(stats(&f).from_disk, ==, 1);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);

	/* Within the cap again: from memory. */
	am_runner_set_memory_max(f.runner, AM_RUNNER_MEMORY_MAX);
	put_kick_copy(&f, "am1.small", BODY);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	g_assert_cmpuint(stats(&f).from_memory, ==, 1);
	fixture_tear_down(&f);
}

/*
 * A copy handed over in memory that the runner could not send before
 * it went away (no configuration yet, then stopped: a daemon killed)
 * is in its file all the same, and the next runner sends it from
 * there.  A first attempt from memory that fails leaves the retries to
 * the file, with its state saved as for any copy.
 */
static void
test_kick_copy_restart(void)
{
	Fixture f = {0};
	g_autoptr(AmSpoolEntry) e = NULL;

	fixture_set_up(&f, "on DOT reply 451 4.3.0 try later");
	start_runner(&f, 60000);
	put_kick_copy(&f, "am1.lost", BODY);
	g_usleep(200000);
	am_runner_stop(f.runner);
	f.runner = NULL;
	g_assert_cmpuint(count(&f, AM_SPOOL_QUEUED), ==, 1);

	set_context(&f, "5d");
	start_runner(&f, 100);
	e = wait_attempts(&f, "am1.lost", 1);
	g_assert_nonnull(e);
	g_assert_nonnull(strstr(e->last_error, "451 4.3.0 try later"));
	g_assert_cmpuint(stats(&f).from_disk, >=, 1);

	/* A fresh copy whose attempt from memory fails: retried from its
	 * file. */
	put_kick_copy(&f, "am1.retry", BODY);
	g_clear_pointer(&e, am_spool_entry_free);
	e = wait_attempts(&f, "am1.retry", 1);
	g_assert_nonnull(e);
	g_assert_cmpuint(stats(&f).from_memory, ==, 1);
	replace_fake(&f, NULL);
	g_assert_true(fake_smtp_wait_messages(f.fake, 2, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	g_assert_cmpuint(count_dir(&f, "state"), ==, 0);
	fixture_tear_down(&f);
}

/*
 * A kick while one worker is busy with a slow relay is taken by the
 * other worker at once: each job wakes a worker of its own.
 */
static void
test_kick_while_busy(void)
{
	Fixture f = {0};
	gint64 start;

	fixture_set_up(&f, "on DOT /slow/ delay 2500 250 2.0.0 ok");
	set_context(&f, "5d");
	start_runner(&f, 60000);
	g_usleep(100000);
	put_kick_copy(&f, "am1.slow", "Subject: slow\r\n\r\nslow\r\n");
	g_usleep(300000); /* the first worker waits for the slow DOT */
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 0);
	start = g_get_monotonic_time();
	put_kick_copy(&f, "am1.fast", BODY);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, 2000));
	g_assert_cmpint(g_get_monotonic_time() - start, <, 2000 * 1000);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	g_assert_true(fake_smtp_wait_messages(f.fake, 2, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	fixture_tear_down(&f);
}

/* ------------------------------------------------------------------ */
/* Batches: copies due together for one relay, pipelined                */
/* ------------------------------------------------------------------ */

/* Every send() of the process, while recording: the client's writes,
 * which show what rode together (the fake server's replies are
 * recorded too, and never match what the tests look for). */
ssize_t __real_send(int fd, const void *buf, size_t len, int flags);
ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags);

static GMutex writes_lock;
static GPtrArray *writes; /* GBytes */

ssize_t
__wrap_send(int fd, const void *buf, size_t len, int flags)
{
	ssize_t n = __real_send(fd, buf, len, flags);

	g_mutex_lock(&writes_lock);
	if (n > 0 && writes != NULL)
		g_ptr_array_add(writes, g_bytes_new(buf, n));
	g_mutex_unlock(&writes_lock);
	return n;
}

static void
writes_start(void)
{
	g_mutex_lock(&writes_lock);
	g_clear_pointer(&writes, g_ptr_array_unref);
	writes = g_ptr_array_new_with_free_func((GDestroyNotify)g_bytes_unref);
	g_mutex_unlock(&writes_lock);
}

static void
writes_stop(void)
{
	g_mutex_lock(&writes_lock);
	g_clear_pointer(&writes, g_ptr_array_unref);
	g_mutex_unlock(&writes_lock);
}

/* How many writes hold @needle. */
static guint
writes_with(const char *needle)
{
	guint n = 0;

	g_mutex_lock(&writes_lock);
	for (guint i = 0; writes != NULL && i < writes->len; i++) {
		gsize len;
		const char *p = g_bytes_get_data(writes->pdata[i], &len);

		if (g_strstr_len(p, len, needle) != NULL)
			n++;
	}
	g_mutex_unlock(&writes_lock);
	return n;
}

/* A relay that pipelines; the slow copy holds the only worker. */
#define PIPE_SCRIPT                                                            \
	"ehlo-keywords PIPELINING 8BITMIME SIZE 10485760 "                     \
	"ENHANCEDSTATUSCODES\n"                                                \
	"on DOT /slow/ delay 1500 250 2.0.0 ok\n"
#define SLOW_BODY "Subject: slow\r\n\r\nslow\r\n"

/* The body of copy @id: "copy-ID" in it, for scripts and checks. */
static char *
body_of(const char *id)
{
	return g_strdup_printf("Subject: %s\r\n\r\ncopy-%s\r\n", id, id);
}

/* A write that ends copy @id's message and carries the next MAIL. */
static char *
dot_then_mail(const char *id)
{
	return g_strdup_printf("copy-%s\r\n.\r\nMAIL FROM:<>", id);
}

static void
start_runner_n(Fixture *f, guint workers, guint scan_ms)
{
	g_autoptr(GError) error = NULL;

	f->runner = am_runner_start_full(f->spool, workers, scan_ms, &error);
	g_assert_no_error(error);
}

/* Copy @id for @relay written to the spool (as the milter does before
 * it kicks), with @body. */
static AmSpoolEntry *
put_body(Fixture *f, const char *id, const char *relay, const char *body)
{
	const char *to[] = {ADDR_A, ADDR_B, NULL};
	AmSpoolEntry e = {
	    .id = (char *)id,
	    .queue_id = (char *)QUEUE_ID,
	    .rule = (char *)"all",
	    .relay = (char *)relay,
	    .from = (char *)"",
	    .to = (char **)to,
	    .created = now_s(),
	};
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;

	smtp_message_append_data(msg, body, strlen(body));
	g_assert_true(am_spool_put(f->spool, &e, msg, AM_SPOOL_QUEUED, &error));
	g_assert_no_error(error);
	return am_spool_entry_copy(&e);
}

/* Hand copy @e (transfer full) to the runner with @body in memory. */
static void
kick_body(Fixture *f, AmSpoolEntry *e, const char *body)
{
	SmtpMessage *msg = smtp_message_new(SMTP_MESSAGE_BYTES);

	smtp_message_append_data(msg, body, strlen(body));
	am_runner_kick_copy(f->runner, e, msg);
}

/*
 * Hold the runner's only worker on the slow copy, then hand it the
 * copies @ids for @relays (written first), which pile up behind it:
 * back from the slow one, the worker finds them all due.
 */
static void
kick_behind_slow(Fixture *f, const char *const *ids, const char *const *relays,
                 guint n)
{
	AmSpoolEntry *entries[8];

	g_assert_cmpuint(n, <=, G_N_ELEMENTS(entries));
	start_runner_n(f, 1, 60000);
	g_usleep(100000); /* the first scan is over */
	for (guint i = 0; i < n; i++) {
		g_autofree char *body = body_of(ids[i]);

		entries[i] = put_body(f, ids[i], relays[i], body);
	}
	kick_body(f, put_body(f, "am1.slow", "archive", SLOW_BODY), SLOW_BODY);
	g_usleep(300000); /* the worker waits for the slow one's end */
	g_assert_cmpuint(fake_smtp_get_message_count(f->fake), ==, 0);
	writes_start();
	for (guint i = 0; i < n; i++) {
		g_autofree char *body = body_of(ids[i]);

		kick_body(f, entries[i], body);
	}
}

/*
 * Copies kicked while the worker is busy go together when it is back:
 * one connection, each next envelope in the same write as the end
 * marker of the copy before (RFC 2920), none behind the last.
 */
static void
test_batch_pipelined(void)
{
	static const char *const ids[] = {"b1", "b2", "b3", "b4"};
	static const char *const relays[] = {"archive", "archive", "archive",
	                                     "archive"};
	Fixture f = {0};

	fixture_set_up(&f, PIPE_SCRIPT);
	set_context_full(&f, "5d", "2s", "");
	kick_behind_slow(&f, ids, relays, 4);
	g_assert_true(fake_smtp_wait_messages(f.fake, 5, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	for (guint i = 0; i < 4; i++) {
		g_autofree char *w = dot_then_mail(ids[i]);

		g_assert_cmpuint(writes_with(w), ==, i < 3 ? 1 : 0);
	}
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	g_assert_cmpuint(stats(&f).from_memory, ==, 5);
	g_assert_cmpuint(count_dir(&f, "state"), ==, 0);
	writes_stop();
	fixture_tear_down(&f);
}

/*
 * The relay refuses the second copy of three after its end of data:
 * only that one follows its policy (554: held; 451: retried, and sent
 * once the relay takes it); the others are confirmed and removed.
 */
static void
test_batch_one_refused(gconstpointer data)
{
	static const char *const ids[] = {"r1", "r2", "r3"};
	static const char *const relays[] = {"archive", "archive", "archive"};
	const char *reply = data;
	gboolean temporary = reply[0] == '4';
	g_autofree char *script =
	    g_strdup_printf(PIPE_SCRIPT "on DOT /copy-r2/ reply %s", reply);
	g_autoptr(AmSpoolEntry) e = NULL;
	g_autofree char *log = NULL;
	Fixture f = {0};

	fixture_set_up(&f, script);
	set_context_full(&f, "5d", "2s", "");
	kick_behind_slow(&f, ids, relays, 3);
	g_assert_true(fake_smtp_wait_messages(f.fake, 3, WAIT_MS));
	e = wait_attempts(&f, "r2", 1);
	g_assert_nonnull(e);
	g_assert_nonnull(strstr(e->last_error, reply));
	g_assert_true(wait_counts(&f, temporary ? 1 : 0, temporary ? 0 : 1));
	g_assert_cmpint(e->state, ==,
	                temporary ? AM_SPOOL_QUEUED : AM_SPOOL_HELD);
	g_assert_null(am_spool_get(f.spool, "r1", NULL));
	g_assert_null(am_spool_get(f.spool, "r3", NULL));
	{
		g_autofree char *w1 = dot_then_mail("r1");
		g_autofree char *w2 = dot_then_mail("r2");

		g_assert_cmpuint(writes_with(w1), ==, 1);
		g_assert_cmpuint(writes_with(w2), ==, 1);
	}
	log = wait_log(&f, "status=sent");
	/* A retry may have come meanwhile; a bounce is final. */
	if (temporary)
		g_assert_cmpuint(count_lines(log, "status=deferred"), >=, 2);
	else
		g_assert_cmpuint(count_lines(log, "status=bounced"), ==, 2);
	if (temporary) {
		/* Retried alone, from its file, when the relay takes it. */
		replace_fake(&f, NULL);
		g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
		g_assert_true(wait_counts(&f, 0, 0));
	} else {
		g_free(log);
		log = wait_log(&f, "error: r2: held (data_error");
		g_assert_cmpuint(count_lines(log, "held"), ==, 1);
	}
	writes_stop();
	fixture_tear_down(&f);
}

/*
 * The relay drops the connection after the second copy's data: that
 * copy, whose end got no answer, is retried; the third, whose envelope
 * was on its way, goes over a new connection; none is lost.
 */
static void
test_batch_dropped(void)
{
	static const char *const ids[] = {"d1", "d2", "d3"};
	static const char *const relays[] = {"archive", "archive", "archive"};
	g_autoptr(AmSpoolEntry) e = NULL;
	const FakeSmtpMessage *m;
	g_autofree char *body = body_of("d2");
	Fixture f = {0};

	fixture_set_up(&f, PIPE_SCRIPT "on DOT /copy-d2/ close\n");
	set_context_full(&f, "5d", "2s", "");
	kick_behind_slow(&f, ids, relays, 3);
	g_assert_true(fake_smtp_wait_messages(f.fake, 3, WAIT_MS));
	e = wait_attempts(&f, "d2", 1);
	g_assert_nonnull(e);
	g_assert_true(wait_counts(&f, 1, 0));
	g_assert_null(am_spool_get(f.spool, "d1", NULL));
	g_assert_null(am_spool_get(f.spool, "d3", NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	{
		/* The third's envelope was behind the second's end. */
		g_autofree char *w1 = dot_then_mail("d1");
		g_autofree char *w2 = dot_then_mail("d2");

		g_assert_cmpuint(writes_with(w1), ==, 1);
		g_assert_cmpuint(writes_with(w2), ==, 1);
	}

	replace_fake(&f, NULL);
	g_assert_true(fake_smtp_wait_messages(f.fake, 1, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	m = fake_smtp_get_message(f.fake, 0);
	g_assert_cmpmem(g_bytes_get_data(m->content, NULL),
	                g_bytes_get_size(m->content), body, strlen(body));
	writes_stop();
	fixture_tear_down(&f);
}

/*
 * Each copy of a batch is settled as its reply comes, not when the
 * batch is over: the first copy's file is gone while the second still
 * waits for its answer (a crash then sends again only what was not
 * confirmed).  A stop during the batch ends it there: the copy being
 * answered ends, the one not started stays queued with no attempt
 * counted, and the stop does not wait for it.
 */
static void
test_batch_settled_each(void)
{
	static const char *const ids[] = {"s1", "s2", "s3"};
	static const char *const relays[] = {"archive", "archive", "archive"};
	g_autoptr(AmSpoolEntry) s2 = NULL;
	g_autoptr(AmSpoolEntry) s3 = NULL;
	Fixture f = {0};
	gint64 t0, took;

	fixture_set_up(&f, PIPE_SCRIPT
	               "on DOT /copy-s[23]/ delay 1500 250 2.0.0 ok\n");
	set_context_full(&f, "5d", "2s", "");
	kick_behind_slow(&f, ids, relays, 3);
	/* The slow copy and s1 are in; s2 is being answered. */
	g_assert_true(fake_smtp_wait_messages(f.fake, 2, WAIT_MS));
	g_usleep(200000);
	g_assert_null(am_spool_get(f.spool, "s1", NULL));
	s2 = am_spool_get(f.spool, "s2", NULL);
	g_assert_nonnull(s2);

	t0 = g_get_monotonic_time();
	g_assert_true(am_runner_stop_within(f.runner, 5000, NULL));
	f.runner = NULL;
	took = g_get_monotonic_time() - t0;
	g_test_message("the stop took %" G_GINT64_FORMAT " us", took);
	g_assert_cmpint(took, <, 2300000);
	g_assert_null(am_spool_get(f.spool, "s2", NULL));
	s3 = am_spool_get(f.spool, "s3", NULL);
	g_assert_nonnull(s3);
	g_assert_cmpuint(s3->attempts, ==, 0);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 3);
	writes_stop();
	fixture_tear_down(&f);
}

/*
 * Copies for two relays, due together: each relay gets its own batch
 * on its own connection, and neither server sees the other's copies.
 */
static void
test_batch_mixed_relays(void)
{
	static const char *const ids[] = {"a1", "o1", "a2", "o2"};
	static const char *const relays[] = {"archive", "other", "archive",
	                                     "other"};
	g_autoptr(FakeSmtp) other = fake_smtp_new(PIPE_SCRIPT, NULL);
	g_autoptr(GError) error = NULL;
	g_autofree char *extra = NULL;
	guint16 port;
	Fixture f = {0};

	fixture_set_up(&f, PIPE_SCRIPT);
	port = fake_smtp_start(other, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
	extra = g_strdup_printf("[relay:other]\nhost = 127.0.0.1\n"
	                        "port = %u\ntimeout = 3\n",
	                        port);
	set_context_full(&f, "5d", "2s", extra);
	kick_behind_slow(&f, ids, relays, 4);
	g_assert_true(fake_smtp_wait_messages(f.fake, 3, WAIT_MS));
	g_assert_true(fake_smtp_wait_messages(other, 2, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 0));
	for (guint i = 0; i < 3; i++) {
		const FakeSmtpMessage *m = fake_smtp_get_message(f.fake, i);
		g_autofree char *text =
		    g_strndup(g_bytes_get_data(m->content, NULL),
		              g_bytes_get_size(m->content));

		g_assert_true(strstr(text, "copy-a") != NULL ||
		              strstr(text, "slow") != NULL);
	}
	for (guint i = 0; i < 2; i++) {
		const FakeSmtpMessage *m = fake_smtp_get_message(other, i);
		g_autofree char *text =
		    g_strndup(g_bytes_get_data(m->content, NULL),
		              g_bytes_get_size(m->content));

		g_assert_nonnull(strstr(text, "copy-o"));
	}
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 3);
	g_assert_cmpuint(fake_smtp_get_message_count(other), ==, 2);
	{
		g_autofree char *a1 = dot_then_mail("a1");
		g_autofree char *o1 = dot_then_mail("o1");

		g_assert_cmpuint(writes_with(a1), ==, 1);
		g_assert_cmpuint(writes_with(o1), ==, 1);
	}
	g_assert_cmpuint(fake_smtp_get_connections(other), ==, 1);
	writes_stop();
	fixture_tear_down(&f);
}

/*
 * Retries read from their files join a batch only once checked as
 * alone: three copies fail their first attempt, come due again while
 * the worker is busy, and go together; the one whose file changed
 * meanwhile is held (SHA-256) instead, and the other two ride one
 * behind the other.
 */
static void
test_batch_from_files(void)
{
	static const char *const ids[] = {"f1", "f2", "f3"};
	g_autofree char *log = NULL;
	g_autofree char *w1 = dot_then_mail("f1");
	g_autofree char *w3 = dot_then_mail("f3");
	AmSpoolEntry *slow;
	Fixture f = {0};

	/* The first three end-of-data replies of the one connection
	 * refuse; the retries, 2 s later, come due while the slow copy
	 * holds the worker for 2.5 s (under the relay's 3 s limit). */
	fixture_set_up(&f, "ehlo-keywords PIPELINING 8BITMIME\n"
	                   "on DOT#1 reply 451 4.3.0 later\n"
	                   "on DOT#2 reply 451 4.3.0 later\n"
	                   "on DOT#3 reply 451 4.3.0 later\n"
	                   "on DOT /slow/ delay 2500 250 2.0.0 ok\n");
	set_context_full(&f, "5d", "2s", "");
	start_runner_n(&f, 1, 60000);
	g_usleep(100000);
	for (guint i = 0; i < 3; i++) {
		g_autofree char *body = body_of(ids[i]);

		am_spool_entry_free(put_body(&f, ids[i], "archive", body));
	}
	slow = put_body(&f, "am1.slow", "archive", SLOW_BODY);
	writes_start();
	for (guint i = 0; i < 3; i++)
		am_runner_kick(f.runner, ids[i]);
	kick_body(&f, slow, SLOW_BODY);
	for (guint i = 0; i < 3; i++)
		am_spool_entry_free(wait_attempts(&f, ids[i], 1));
	damage(&f, "f2", "X", 3);

	g_assert_true(fake_smtp_wait_messages(f.fake, 3, WAIT_MS));
	g_assert_true(wait_counts(&f, 0, 1));
	log = wait_log(&f, "error: f2: held (spool file");
	g_assert_cmpuint(count_lines(log, "SHA-256"), ==, 1);
	g_assert_cmpuint(writes_with(w1), ==, 1);
	g_assert_cmpuint(writes_with(w3), ==, 0);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	g_assert_cmpuint(stats(&f).from_disk, ==, 6);
	g_assert_cmpuint(stats(&f).from_memory, ==, 1);
	writes_stop();
	fixture_tear_down(&f);
}

/*
 * Copies spooled one shortly after the other, with workers idle, wait
 * a moment for each other and go as one batch: the first does not
 * leave before its linger is over, and the others, kicked during it,
 * ride behind it.
 */
static void
test_batch_linger(void)
{
	static const char *const ids[] = {"l1", "l2", "l3"};
	AmSpoolEntry *entries[3];
	gint64 start;
	Fixture f = {0};

	fixture_set_up(&f, PIPE_SCRIPT);
	set_context_full(&f, "5d", "2s", "");
	start_runner_n(&f, 2, 60000);
	am_runner_set_linger_ms(f.runner, 400);
	g_usleep(100000); /* the first scan is over */
	for (guint i = 0; i < 3; i++) {
		g_autofree char *body = body_of(ids[i]);

		entries[i] = put_body(&f, ids[i], "archive", body);
	}
	writes_start();
	start = g_get_monotonic_time();
	for (guint i = 0; i < 3; i++) {
		g_autofree char *body = body_of(ids[i]);

		/* The later ones come within the first one's linger, and
		 * leave with it, before their own is over. */
		if (i == 1)
			g_usleep(150000);
		kick_body(&f, entries[i], body);
	}
	g_assert_true(fake_smtp_wait_messages(f.fake, 3, WAIT_MS));
	g_assert_cmpint(g_get_monotonic_time() - start, >=, 350 * 1000);
	g_assert_true(wait_counts(&f, 0, 0));
	for (guint i = 0; i < 3; i++) {
		g_autofree char *w = dot_then_mail(ids[i]);

		g_assert_cmpuint(writes_with(w), ==, i < 2 ? 1 : 0);
	}
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	writes_stop();
	fixture_tear_down(&f);
}

/*
 * A worker is woken for each copy that needs one: copies kicked while
 * the workers sleep (up to a second), or while one is busy, go at
 * once, never after a sleep runs out.
 */
static void
test_kick_prompt(void)
{
	Fixture f = {0};

	fixture_set_up(&f, NULL);
	set_context(&f, "5d");
	start_runner_n(&f, 2, 60000);
	am_runner_set_linger_ms(f.runner, 0);
	g_usleep(100000);
	for (guint i = 0; i < 6; i++) {
		g_autofree char *id = g_strdup_printf("am1.p%u", i);
		g_autofree char *body = body_of(id);
		AmSpoolEntry *e = put_body(&f, id, "archive", body);
		gint64 start = g_get_monotonic_time();

		kick_body(&f, e, body);
		g_assert_true(fake_smtp_wait_messages(f.fake, i + 1, WAIT_MS));
		g_assert_cmpint(g_get_monotonic_time() - start, <, 500 * 1000);
		g_usleep(i * 70000);
	}
	g_assert_true(wait_counts(&f, 0, 0));
	fixture_tear_down(&f);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	am_log_init("test-runner", TRUE, FALSE);
	g_test_add_func("/runner/restart-pickup", test_restart_pickup);
	g_test_add_func("/runner/kick", test_kick);
	g_test_add_func("/runner/retry-then-success", test_retry_then_success);
	g_test_add_func("/runner/refused-held", test_refused_held);
	g_test_add_func("/runner/partial", test_partial);
	g_test_add_func("/runner/max-age", test_max_age);
	g_test_add_func("/runner/rule-gone", test_rule_gone);
	g_test_add_func("/runner/scan-while-running", test_scan_while_running);
	g_test_add_func("/runner/scan-at-start", test_scan_at_start);
	g_test_add_func("/runner/stop-within", test_stop_within);
	g_test_add_func("/runner/far-future-state", test_far_future_state);
	g_test_add_func("/runner/future-created", test_future_created);
	g_test_add_func("/runner/max-age-untried", test_max_age_untried);
	g_test_add_func("/runner/damaged-not-sent", test_damaged_not_sent);
	g_test_add_func("/runner/kick-copy-memory", test_kick_copy_memory);
	g_test_add_func("/runner/kick-copy-over-cap", test_kick_copy_over_cap);
	g_test_add_func("/runner/kick-copy-restart", test_kick_copy_restart);
	g_test_add_func("/runner/kick-while-busy", test_kick_while_busy);
	g_test_add_func("/runner/batch/pipelined", test_batch_pipelined);
	g_test_add_data_func("/runner/batch/one-refused/554",
	                     "554 5.6.0 refused", test_batch_one_refused);
	g_test_add_data_func("/runner/batch/one-refused/451", "451 4.3.0 later",
	                     test_batch_one_refused);
	g_test_add_func("/runner/batch/dropped", test_batch_dropped);
	g_test_add_func("/runner/batch/settled-each", test_batch_settled_each);
	g_test_add_func("/runner/batch/mixed-relays", test_batch_mixed_relays);
	g_test_add_func("/runner/batch/from-files", test_batch_from_files);
	g_test_add_func("/runner/batch/linger", test_batch_linger);
	g_test_add_func("/runner/kick-prompt", test_kick_prompt);
	return g_test_run();
}
