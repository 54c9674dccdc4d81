/*
 * test-spoolcmd.c - `archive-milter --spool-list` and `--spool-retry`,
 * and the daemon's spool start-up, run as real processes
 *
 * The daemon's path is the first argument (or $ARCHIVE_MILTER).  The
 * spool is filled through spool.h, as the daemon would have left it.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sysexits.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "fakesmtp.h"
#include "spool.h"

#define BODY "Subject: spooled\r\n\r\nbody\r\n"

static const char *milter_path;

typedef struct {
	char *dir;
	char *spool_dir;
	char *conf;
	char *pid_file;
	guint16 port;
} Fixture;

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

static void
write_conf(Fixture *f)
{
	g_autofree char *text =
	    g_strdup_printf("[milter]\n"
	                    "socket = unix:%s/sock\n"
	                    "archive_id_key_file = %s/key\n"
	                    "spool_dir = %s\n"
	                    "pid_file = %s\n"
	                    "spool_min_free = 0\n"
	                    "workers = 1\n"
	                    "[relay:archive]\n"
	                    "host = 127.0.0.1\n"
	                    "port = %u\n"
	                    "timeout = 3\n"
	                    "[rule:all]\n"
	                    "relay = archive\n"
	                    "archive_to = a@archive.example\n"
	                    "delivery = spool\n",
	                    f->dir, f->dir, f->spool_dir, f->pid_file, f->port);

	g_assert_true(g_file_set_contents(f->conf, text, -1, NULL));
}

static void
fixture_set_up(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;

	(void)data;
	f->dir = g_dir_make_tmp("test-spoolcmd-XXXXXX", &error);
	g_assert_no_error(error);
	f->spool_dir = g_build_filename(f->dir, "spool", NULL);
	f->conf = g_build_filename(f->dir, "am.conf", NULL);
	f->pid_file = g_build_filename(f->dir, "am.pid", NULL);
	f->port = 9; /* nothing listens: the commands never connect */
	write_conf(f);
}

static void
fixture_tear_down(Fixture *f, gconstpointer data)
{
	g_autofree char *cmd = g_strdup_printf("rm -rf '%s'", f->dir);

	(void)data;
	g_assert_true(g_str_has_prefix(f->dir, g_get_tmp_dir()));
	g_assert_cmpint(system(cmd), ==, 0);
	g_free(f->pid_file);
	g_free(f->conf);
	g_free(f->spool_dir);
	g_free(f->dir);
}

static void
run_cmd(Run *r, Fixture *f, const char *opt, const char *arg)
{
	const char *argv[] = {milter_path, "-c", f->conf, opt, arg, NULL};
	g_autoptr(GError) error = NULL;
	int wait_status = 0;

	g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
	             &r->out, &r->err, &wait_status, &error);
	g_assert_no_error(error);
	r->status = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
	g_test_message("exit %d\nstdout: %s\nstderr: %s", r->status, r->out,
	               r->err);
}

static AmSpool *
open_spool(Fixture *f)
{
	g_autoptr(GError) error = NULL;
	AmSpool *spool = am_spool_open(f->spool_dir, 0, &error);

	g_assert_no_error(error);
	return spool;
}

static void
put(AmSpool *spool, const char *id, gint64 created, AmSpoolState state,
    const char *last_error)
{
	const char *to[] = {"a@archive.example", "b@archive.example", NULL};
	AmSpoolEntry e = {
	    .id = (char *)id,
	    .queue_id = (char *)"3F2A81C0DE",
	    .rule = (char *)"all",
	    .relay = (char *)"archive",
	    .from = (char *)"",
	    .to = (char **)to,
	    .created = created,
	    .last_error = (char *)last_error,
	    .attempts = last_error != NULL ? 2 : 0,
	};
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);

	smtp_message_append_data(msg, BODY, strlen(BODY));
	g_assert_true(am_spool_put(spool, &e, msg, state, NULL));
}

static void
write_file(Fixture *f, const char *sub, const char *name, const char *text)
{
	g_autofree char *path = g_build_filename(f->spool_dir, sub, name, NULL);

	g_assert_true(g_file_set_contents(path, text, -1, NULL));
}

static gboolean
exists(Fixture *f, const char *sub, const char *name)
{
	g_autofree char *path = g_build_filename(f->spool_dir, sub, name, NULL);

	return g_file_test(path, G_FILE_TEST_EXISTS);
}

static gint64
now_s(void)
{
	return g_get_real_time() / G_USEC_PER_SEC;
}

/* ------------------------------------------------------------------ */

static void
test_list_empty(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f);
	g_auto(Run) r = {0};

	(void)data;
	run_cmd(&r, f, "--spool-list", NULL);
	g_assert_cmpint(r.status, ==, 0);
	g_assert_cmpstr(r.out, ==,
	                "queued: 0\nheld: 0\ndamaged: 0\n"
	                "oldest_queued_age: 0\noldest_held_age: 0\n");
}

static void
test_list(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f);
	g_auto(Run) r = {0};
	g_auto(GStrv) lines = NULL;
	gint64 now = now_s();
	gint64 age;

	(void)data;
	put(spool, "am1.new", now - 10, AM_SPOOL_QUEUED, NULL);
	put(spool, "am1.old", now - 500, AM_SPOOL_QUEUED,
	    "451 4.3.0 try later");
	put(spool, "am1.held", now - 100, AM_SPOOL_HELD, "554 5.6.0 no");
	write_file(f, "queue", "am1.damaged", "archive-milter-spool 9\n\n");
	/* A state file someone edited, with a CR in the error. */
	write_file(f, "state", "am1.held",
	           "archive-milter-state 1\nattempts: 1\nlast_error: "
	           "550 a\rforged line\n");

	run_cmd(&r, f, "--spool-list", NULL);
	g_assert_cmpint(r.status, ==, 0);
	lines = g_strsplit(r.out, "\n", -1);
	g_assert_cmpuint(g_strv_length(lines), ==, 5 + 3 + 1);
	g_assert_cmpstr(lines[0], ==, "queued: 2");
	g_assert_cmpstr(lines[1], ==, "held: 1");
	g_assert_cmpstr(lines[2], ==, "damaged: 1");
	g_assert_true(g_str_has_prefix(lines[3], "oldest_queued_age: "));
	age = g_ascii_strtoll(lines[3] + 19, NULL, 10);
	g_assert_cmpint(age, >=, 500);
	g_assert_cmpint(age, <, 520);
	g_assert_true(g_str_has_prefix(lines[4], "oldest_held_age: "));

	/* Oldest queued first, then the held ones. */
	g_assert_true(g_str_has_prefix(lines[5], "am1.old queued age=5"));
	g_assert_nonnull(strstr(lines[5], " attempts=2 "));
	g_assert_nonnull(strstr(lines[5], " rule=all relay=archive "
	                                  "queue_id=3F2A81C0DE size=26 "
	                                  "to=<a@archive.example>,"
	                                  "<b@archive.example> "
	                                  "error=(451 4.3.0 try later)"));
	g_assert_true(g_str_has_prefix(lines[6], "am1.new queued age="));
	g_assert_true(g_str_has_suffix(lines[6], "error=()"));
	g_assert_true(g_str_has_prefix(lines[7], "am1.held held age=1"));
	g_assert_true(g_str_has_suffix(lines[7], "error=(550 a?forged line)"));
	g_assert_cmpstr(lines[8], ==, "");
	/* The damaged file is named on stderr and left alone. */
	g_assert_nonnull(strstr(r.err, "am1.damaged"));
	g_assert_true(exists(f, "queue", "am1.damaged"));
}

static void
test_retry(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f);
	g_auto(Run) r = {0};
	g_autoptr(AmSpoolEntry) e = NULL;

	(void)data;
	put(spool, "am1.h1", now_s(), AM_SPOOL_HELD, "554 no");
	put(spool, "am1.h2", now_s(), AM_SPOOL_HELD, "554 no");
	put(spool, "am1.h3", now_s(), AM_SPOOL_HELD, "554 no");

	run_cmd(&r, f, "--spool-retry", "am1.h1");
	g_assert_cmpint(r.status, ==, 0);
	g_assert_cmpstr(r.out, ==, "released am1.h1\n");
	g_assert_true(exists(f, "queue", "am1.h1"));
	g_assert_false(exists(f, "hold", "am1.h1"));
	e = am_spool_get(spool, "am1.h1", NULL);
	g_assert_cmpuint(e->attempts, ==, 0);
	run_clear(&r);

	/* Unknown, and no longer held. */
	run_cmd(&r, f, "--spool-retry", "am1.nosuch");
	g_assert_cmpint(r.status, ==, EX_NOINPUT);
	g_assert_nonnull(strstr(r.err, "no held copy am1.nosuch"));
	run_clear(&r);
	run_cmd(&r, f, "--spool-retry", "am1.h1");
	g_assert_cmpint(r.status, ==, EX_NOINPUT);
	run_clear(&r);
	run_cmd(&r, f, "--spool-retry", "../../etc/passwd");
	g_assert_cmpint(r.status, ==, EX_NOINPUT);
	g_assert_nonnull(strstr(r.err, "not a spool id: \"../../etc/passwd\""));
	run_clear(&r);

	run_cmd(&r, f, "--spool-retry", "all");
	g_assert_cmpint(r.status, ==, 0);
	g_assert_cmpstr(r.out, ==, "released 2 held copies\n");
	g_assert_true(exists(f, "queue", "am1.h3"));
	run_clear(&r);
	run_cmd(&r, f, "--spool-retry", "all");
	g_assert_cmpint(r.status, ==, 0);
	g_assert_cmpstr(r.out, ==, "released 0 held copies\n");
	run_clear(&r);

	/* A damaged held file is not sent anywhere. */
	write_file(f, "hold", "am1.bad", "garbage");
	run_cmd(&r, f, "--spool-retry", "am1.bad");
	g_assert_cmpint(r.status, ==, EX_DATAERR);
	g_assert_true(exists(f, "hold", "am1.bad"));
}

static void
test_bad_spool_dir(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};

	(void)data;
	/* Missing: the commands do not create it. */
	run_cmd(&r, f, "--spool-list", NULL);
	g_assert_cmpint(r.status, ==, EX_NOINPUT);
	g_assert_nonnull(strstr(r.err, f->spool_dir));
	g_assert_false(g_file_test(f->spool_dir, G_FILE_TEST_EXISTS));
	run_clear(&r);

	/* Open to others. */
	g_assert_cmpint(g_mkdir(f->spool_dir, 0700), ==, 0);
	g_assert_cmpint(chmod(f->spool_dir, 0755), ==, 0);
	run_cmd(&r, f, "--spool-retry", "all");
	g_assert_cmpint(r.status, ==, EX_IOERR);
	g_assert_nonnull(strstr(r.err, f->spool_dir));
	run_clear(&r);

	/* Options that exclude each other. */
	{
		const char *argv[] = {
		    milter_path,     "-c",  f->conf, "--spool-list",
		    "--spool-retry", "all", NULL};
		int ws = 0;

		g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL,
		             NULL, NULL, NULL, &ws, NULL);
		g_assert_true(WIFEXITED(ws));
		g_assert_cmpint(WEXITSTATUS(ws), ==, EX_USAGE);
	}
}

/* Beside a running daemon (here: a process holding the spool open) a
 * command must not clear tmp/, where the daemon writes; alone, it
 * deletes nothing either: only the daemon cleans up, at its start. */
static void
test_beside_daemon(Fixture *f, gconstpointer data)
{
	AmSpool *spool = open_spool(f);
	g_auto(Run) r = {0};

	(void)data;
	write_file(f, "tmp", "am1.writing", "archive-milter-spool 1\n");
	write_file(f, "state", "am1.orphan", "archive-milter-state 1\n");
	run_cmd(&r, f, "--spool-list", NULL);
	g_assert_cmpint(r.status, ==, 0);
	g_assert_true(exists(f, "tmp", "am1.writing"));
	am_spool_close(spool);
	run_clear(&r);

	run_cmd(&r, f, "--spool-list", NULL);
	g_assert_cmpint(r.status, ==, 0);
	run_clear(&r);
	run_cmd(&r, f, "--spool-retry", "all");
	g_assert_cmpint(r.status, ==, 0);
	g_assert_true(exists(f, "tmp", "am1.writing"));
	g_assert_true(exists(f, "state", "am1.orphan"));
	g_assert_cmpstr(r.err, ==, "");
}

/*
 * A spool directory owned by another user, or with a subdirectory that
 * is a symbolic link, is refused by the commands too, with a message
 * naming it, and nothing where the link points is deleted (even by a
 * root --spool-list).
 */
static void
test_unsafe_spool(Fixture *f, gconstpointer data)
{
	g_auto(Run) r = {0};
	g_autofree char *victim = g_build_filename(f->dir, "victim", NULL);
	g_autofree char *precious = g_build_filename(victim, "precious", NULL);
	g_autofree char *tmp = g_build_filename(f->spool_dir, "tmp", NULL);

	(void)data;
	g_assert_cmpint(g_mkdir(f->spool_dir, 0700), ==, 0);
	g_assert_cmpint(g_mkdir(victim, 0700), ==, 0);
	g_assert_true(g_file_set_contents(precious, "keep", -1, NULL));
	g_assert_cmpint(symlink(victim, tmp), ==, 0);
	run_cmd(&r, f, "--spool-list", NULL);
	g_assert_cmpint(r.status, ==, EX_IOERR);
	g_assert_nonnull(strstr(r.err, tmp));
	g_assert_nonnull(strstr(r.err, "symbolic link"));
	g_assert_true(g_file_test(precious, G_FILE_TEST_EXISTS));
	run_clear(&r);

	if (geteuid() != 0) {
		g_test_skip("needs root to chown the spool directory");
		return;
	}
	g_assert_cmpint(unlink(tmp), ==, 0);
	g_assert_cmpint(chown(f->spool_dir, 65534, 65534), ==, 0);
	run_cmd(&r, f, "--spool-retry", "all");
	g_assert_cmpint(r.status, ==, EX_IOERR);
	g_assert_nonnull(strstr(r.err, f->spool_dir));
	g_assert_nonnull(strstr(r.err, "owned by uid 65534"));
}

/* Read the daemon's stderr until a line holding @want, or EOF. */
static gboolean
wait_line(FILE *in, const char *want, GString *seen)
{
	char *line = NULL;
	size_t cap = 0;
	gboolean hit = FALSE;

	while (!hit && getline(&line, &cap, in) > 0) {
		g_string_append(seen, line);
		hit = strstr(line, want) != NULL;
	}
	free(line);
	return hit;
}

/*
 * The daemon: the spool is opened at start (a bad one is a fatal error
 * naming it), the pid file written and removed, copies left by an
 * earlier run delivered by its workers.
 */
static void
test_daemon(Fixture *f, gconstpointer data)
{
	g_autoptr(FakeSmtp) fake = fake_smtp_new(NULL, NULL);
	g_autoptr(GError) error = NULL;
	FILE *in;
	g_autoptr(GString) seen = g_string_new(NULL);
	g_autofree char *pid_text = NULL;
	const char *argv[] = {milter_path, "-c", f->conf, "-f", NULL};
	GPid pid;
	int err_fd, status;

	(void)data;
	f->port = fake_smtp_start(fake, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
	write_conf(f);

	/* A spool that is a file: fatal, and the message names it. */
	g_assert_true(g_file_set_contents(f->spool_dir, "x", -1, NULL));
	{
		g_auto(Run) r = {0};

		run_cmd(&r, f, "-f", NULL);
		g_assert_cmpint(r.status, ==, EX_CANTCREAT);
		g_assert_nonnull(strstr(r.err, f->spool_dir));
		g_assert_false(g_file_test(f->pid_file, G_FILE_TEST_EXISTS));
	}
	g_assert_cmpint(g_unlink(f->spool_dir), ==, 0);

	/* A copy of an earlier run waits in the spool. */
	{
		g_autoptr(AmSpool) spool = open_spool(f);

		put(spool, "am1.left", now_s(), AM_SPOOL_QUEUED, NULL);
	}
	g_spawn_async_with_pipes(NULL, (char **)argv, NULL,
	                         G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL, &pid,
	                         NULL, NULL, &err_fd, &error);
	g_assert_no_error(error);
	in = fdopen(err_fd, "r");
	g_assert_nonnull(in);
	g_assert_true(wait_line(in, "ready", seen));
	g_assert_true(g_file_get_contents(f->pid_file, &pid_text, NULL, NULL));
	g_assert_cmpint(g_ascii_strtoll(pid_text, NULL, 10), ==, pid);

	g_assert_true(fake_smtp_wait_messages(fake, 1, 8000));
	g_assert_true(wait_line(in, "status=sent", seen));
	g_assert_nonnull(strstr(seen->str, "3F2A81C0DE: archive=<"));

	kill(pid, SIGTERM);
	g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
	g_spawn_close_pid(pid);
	g_test_message("daemon's stderr:\n%s", seen->str);
	g_assert_true(WIFEXITED(status));
	g_assert_cmpint(WEXITSTATUS(status), ==, 0);
	g_assert_false(g_file_test(f->pid_file, G_FILE_TEST_EXISTS));
	g_assert_false(exists(f, "queue", "am1.left"));
	fclose(in);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	milter_path = argc > 1 ? argv[1] : g_getenv("ARCHIVE_MILTER");
	if (milter_path == NULL) {
		g_printerr("usage: test-spoolcmd PATH-TO-archive-milter\n");
		return 1;
	}
#define ADD(path, fn)                                                          \
	g_test_add(path, Fixture, NULL, fixture_set_up, fn, fixture_tear_down)
	ADD("/spoolcmd/list/empty", test_list_empty);
	ADD("/spoolcmd/list/copies", test_list);
	ADD("/spoolcmd/retry", test_retry);
	ADD("/spoolcmd/bad-spool-dir", test_bad_spool_dir);
	ADD("/spoolcmd/beside-daemon", test_beside_daemon);
	ADD("/spoolcmd/unsafe-spool", test_unsafe_spool);
	ADD("/spoolcmd/daemon", test_daemon);
#undef ADD
	return g_test_run();
}
