/*
 * test-runner.c - the spool's workers against the fake SMTP server:
 * pick-up at start, kick, retry then success, a refusal held, partial
 * success, max age, a rule or relay gone, the log lines
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

/* The configuration the daemon would load, with short retries. */
static void
set_context(Fixture *f, const char *max_age)
{
	g_autofree char *path = g_build_filename(f->dir, "am.conf", NULL);
	g_autofree char *key_path = g_build_filename(f->dir, "key", NULL);
	g_autofree char *text =
	    g_strdup_printf("[milter]\n"
	                    "socket = unix:%s/sock\n"
	                    "archive_id_key_file = %s\n"
	                    "spool_dir = %s\n"
	                    "spool_min_free = 0\n"
	                    "spool_retry_min = 1s\n"
	                    "spool_retry_max = 1s\n"
	                    "spool_max_age = %s\n"
	                    "[relay:archive]\n"
	                    "host = 127.0.0.1\n"
	                    "port = %u\n"
	                    "timeout = 3\n"
	                    "[rule:all]\n"
	                    "relay = archive\n"
	                    "archive_to = " ADDR_A ", " ADDR_B "\n"
	                    "delivery = spool\n",
	                    f->dir, key_path, f->spool_dir, max_age, f->port);
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
	g_test_add_func("/runner/far-future-state", test_far_future_state);
	g_test_add_func("/runner/future-created", test_future_created);
	g_test_add_func("/runner/max-age-untried", test_max_age_untried);
	g_test_add_func("/runner/damaged-not-sent", test_damaged_not_sent);
	g_test_add_func("/runner/kick-copy-memory", test_kick_copy_memory);
	g_test_add_func("/runner/kick-copy-over-cap", test_kick_copy_over_cap);
	g_test_add_func("/runner/kick-copy-restart", test_kick_copy_restart);
	g_test_add_func("/runner/kick-while-busy", test_kick_while_busy);
	return g_test_run();
}
