/*
 * test-check.c - `archive-milter --check`, run as a real process
 *
 * The configurations under check/ are checked by the built daemon (its
 * path is the first argument, or $ARCHIVE_MILTER), and its output is
 * compared line by line: each relay's effective TLS level with the
 * reason, the WARNING lines about Postfix's milter_content_timeout, and
 * that no password is ever printed, also when its file is refused.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

static const char *milter_path;

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
run_check(Run *r, const char *conf)
{
	const char *argv[] = {milter_path, "-c", conf, "--check", NULL};
	g_autoptr(GError) error = NULL;
	int wait_status = 0;

	g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
	             &r->out, &r->err, &wait_status, &error);
	g_assert_no_error(error);
	r->status = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
	g_test_message("exit %d\nstdout: %s\nstderr: %s", r->status, r->out,
	               r->err);
}

/*
 * check/NAME with every "@TMP@" replaced by a fresh private directory
 * (0700), so that spool_dir can name a place that exists on any
 * machine.  The directory is removed with its content afterwards.
 */
static void
run_fixture(Run *r, const char *name)
{
	g_autofree char *src =
	    g_test_build_filename(G_TEST_DIST, "check", name, NULL);
	g_autoptr(GError) error = NULL;
	g_autofree char *dir = g_dir_make_tmp("am-check-XXXXXX", &error);
	g_autofree char *conf = NULL;
	g_autofree char *text = NULL;
	g_auto(GStrv) parts = NULL;
	g_autofree char *joined = NULL;
	g_autofree char *spool = NULL;

	g_assert_no_error(error);
	g_file_get_contents(src, &text, NULL, &error);
	g_assert_no_error(error);
	parts = g_strsplit(text, "@TMP@", -1);
	joined = g_strjoinv(dir, parts);
	conf = g_build_filename(dir, name, NULL);
	g_assert_true(g_file_set_contents(conf, joined, -1, NULL));

	run_check(r, conf);
	g_assert_cmpint(r->status, ==, 0);

	spool = g_build_filename(dir, "spool", NULL);
	g_rmdir(spool);
	g_unlink(conf);
	g_assert_cmpint(g_rmdir(dir), ==, 0);
}

/* The one line of @out starting with @prefix (which must exist). */
static char *
line_starting(const char *out, const char *prefix)
{
	g_auto(GStrv) lines = g_strsplit(out, "\n", -1);
	char *found = NULL;
	guint i;

	for (i = 0; lines[i] != NULL; i++) {
		if (g_str_has_prefix(lines[i], prefix)) {
			g_assert_null(found);
			found = g_strdup(lines[i]);
		}
	}
	if (found == NULL)
		g_error("no line starting with \"%s\" in:\n%s", prefix, out);
	return found;
}

static guint
count_lines_with(const char *out, const char *needle)
{
	g_auto(GStrv) lines = g_strsplit(out, "\n", -1);
	guint i, n = 0;

	for (i = 0; lines[i] != NULL; i++)
		n += strstr(lines[i], needle) != NULL;
	return n;
}

static void
test_tls_levels(void)
{
	static const struct {
		const char *prefix;
		const char *level;
	} cases[] = {
	    {"relay loop4: 127.0.0.1 port 25,", "tls=none (loopback default)"},
	    {"relay loop4b: 127.9.9.9 port 2525,",
	     "tls=none (loopback default)"},
	    {"relay loop6: ::1 port 25,", "tls=none (loopback default)"},
	    {"relay localname: localhost port 25,",
	     "tls=none (loopback default)"},
	    {"relay remote: archive.example port 25,", "tls=verify (default)"},
	    {"relay remote-ip: 192.0.2.7 port 25,", "tls=verify (default)"},
	    {"relay forced: 127.0.0.1 port 25,", "tls=encrypt (configured)"},
	    {"relay clear: archive.example port 25,", "tls=none (configured)"},
	};
	g_auto(Run) r = {0};
	guint i;

	run_fixture(&r, "levels.conf");
	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *line = line_starting(r.out, cases[i].prefix);
		g_autofree char *want = g_strconcat(cases[i].prefix, " ",
		                                    cases[i].level, ",", NULL);

		g_assert_true(g_str_has_prefix(line, want));
		g_assert_nonnull(strstr(line,
		                        ", timeouts connect=30s command=30s "
		                        "data=30s final=30s"));
	}
	g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==, 0);
	g_assert_cmpuint(count_lines_with(r.out, "copy_deadline=120s"), ==, 1);
}

static void
test_warnings(void)
{
	g_auto(Run) r = {0};
	g_autofree char *slow = NULL;
	g_autofree char *many = NULL;
	g_autofree char *deadline = NULL;

	run_fixture(&r, "warn.conf");
	slow = line_starting(r.out, "WARNING: relay slow:");
	g_assert_cmpstr(slow, ==,
	                "WARNING: relay slow: its timeouts allow a copy to "
	                "take 420s (timeout_connect + timeout_command * 4 + "
	                "timeout_data + timeout_final), and copy_deadline "
	                "stops it only at 400s, more than Postfix's "
	                "milter_content_timeout of 300s; Postfix waits for it "
	                "in rules slow, slow2 (delivery = sync)");
	/* The spool rule on "many" has more addresses: not counted. */
	many = line_starting(r.out, "WARNING: relay many:");
	g_assert_nonnull(strstr(many, " take 330s ("));
	g_assert_nonnull(strstr(many, " timeout_command * 8 "));
	g_assert_true(g_str_has_suffix(
	    many, "timeout_final), more than Postfix's milter_content_timeout "
	          "of 300s; Postfix waits for it in rule many (delivery = "
	          "sync)"));
	deadline = line_starting(r.out, "WARNING: copy_deadline");
	g_assert_cmpstr(deadline, ==,
	                "WARNING: copy_deadline 400s is not below Postfix's "
	                "milter_content_timeout of 300s; Postfix waits for it "
	                "in rules slow, slow2, many, fine, edge (delivery = "
	                "sync)");
	/* fine (210 s), edge (exactly 300 s) and spooled (420 s, but only
	 * a spool rule uses it) get none. */
	g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==, 3);
	g_assert_cmpuint(count_lines_with(r.out, "milter_content_timeout"), ==,
	                 3);
	g_assert_cmpuint(count_lines_with(r.out, "WARNING: relay spooled"), ==,
	                 0);
	g_assert_nonnull(strstr(r.out, "timeouts connect=10s command=10s "
	                               "data=10s final=240s"));
}

/*
 * copy_deadline bounds all the synchronous copies of one message: a
 * relay whose limits allow 420 s a copy, three rules with match = all,
 * and copy_deadline = 4 s keep Postfix waiting 4 s at most: no warning.
 */
static void
test_warnings_deadline_cut(void)
{
	g_auto(Run) r = {0};

	run_fixture(&r, "deadline-cut.conf");
	g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==, 0);
	g_assert_nonnull(strstr(r.out, ", match=all, copy_deadline=4s\n"));
	g_assert_nonnull(strstr(r.out, "timeouts connect=60s command=60s "
	                               "data=60s final=60s"));
}

/*
 * match = all: the sync rules' copies of one message add up (3 x 210 s),
 * cut at copy_deadline (400 s), which is still above Postfix's 300 s.
 * With match = first the same rules make one copy: only copy_deadline
 * itself is worth a warning.
 */
static void
test_warnings_match_all(void)
{
	g_auto(Run) all = {0};
	g_auto(Run) first = {0};
	g_autofree char *line = NULL;

	run_fixture(&all, "match-all.conf");
	line = line_starting(all.out, "WARNING: match = all:");
	g_assert_cmpstr(line, ==,
	                "WARNING: match = all: rules a, b, c (delivery = sync) "
	                "may each copy the same message, one after another; "
	                "their timeouts add up to 630s and copy_deadline "
	                "(400s) bounds them together, so Postfix may wait "
	                "400s, more than its milter_content_timeout of 300s");
	g_assert_nonnull(strstr(all.out, "WARNING: copy_deadline 400s is not "
	                                 "below Postfix's"));
	g_assert_cmpuint(count_lines_with(all.out, "WARNING"), ==, 2);

	run_fixture(&first, "match-first.conf");
	g_assert_cmpuint(count_lines_with(first.out, "WARNING: match"), ==, 0);
	g_assert_cmpuint(count_lines_with(first.out, "WARNING: relay"), ==, 0);
	g_assert_cmpuint(count_lines_with(first.out, "WARNING"), ==, 1);
	g_assert_nonnull(strstr(first.out, "WARNING: copy_deadline 400s is "
	                                   "not below Postfix's"));
}

/* Only spool rules: Postfix never waits for a copy, so no warning at all,
 * however long the relay's limits and copy_deadline. */
static void
test_warnings_spool_only(void)
{
	g_auto(Run) r = {0};

	run_fixture(&r, "spool-only.conf");
	g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==, 0);
	g_assert_nonnull(strstr(r.out, "copy_deadline=600s"));
}

static void
test_quiet(void)
{
	g_auto(Run) r = {0};

	run_fixture(&r, "quiet.conf");
	g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==, 0);
	g_assert_cmpuint(count_lines_with(r.out, "copy_deadline=299.999s"), ==,
	                 1);
}

/*
 * The policy row of @outcome under "rule @rule:", split at blanks:
 * outcome, temporary, permanent, set by.
 */
static GStrv
policy_row(const char *out, const char *rule, const char *outcome)
{
	g_autofree char *head = g_strdup_printf("rule %s: ", rule);
	g_autofree char *prefix = g_strdup_printf("  %s ", outcome);
	g_auto(GStrv) lines = g_strsplit(out, "\n", -1);
	guint i;

	for (i = 0; lines[i] != NULL; i++) {
		if (g_str_has_prefix(lines[i], head))
			break;
	}
	g_assert_nonnull(lines[i]);
	for (i++; lines[i] != NULL && g_str_has_prefix(lines[i], "  "); i++) {
		if (g_str_has_prefix(lines[i], prefix)) {
			g_autoptr(GRegex) blanks =
			    g_regex_new(" +", 0, 0, NULL);
			g_autofree char *line = g_strstrip(g_strdup(lines[i]));

			return g_regex_split(blanks, line, 0);
		}
	}
	g_error("no row %s under rule %s in:\n%s", outcome, rule, out);
	return NULL;
}

static void
assert_row(const char *out, const char *rule, const char *outcome,
           const char *temporary, const char *permanent, const char *by)
{
	g_auto(GStrv) row = policy_row(out, rule, outcome);

	g_assert_cmpuint(g_strv_length(row), ==, 4);
	g_assert_cmpstr(row[1], ==, temporary);
	g_assert_cmpstr(row[2], ==, permanent);
	g_assert_cmpstr(row[3], ==, by);
}

static const char *const outcomes[] = {
    "sent",       "some_refused", "all_refused", "sender_refused",
    "data_error", "unreachable",  "timeout",     "tls_error",
};

static void
test_policy(void)
{
	g_auto(Run) r = {0};
	g_autofree char *line = NULL;
	guint i;

	run_fixture(&r, "policy.conf");

	/* Defaults: never lose a copy. */
	line = line_starting(r.out, "rule sync-defaults: ");
	g_assert_true(g_str_has_prefix(line, "rule sync-defaults: "
	                                     "mode=journal, delivery=sync, "
	                                     "relay=r, "));
	assert_row(r.out, "sync-defaults", "sent", "accept", "accept",
	           "default");
	for (i = 1; i < G_N_ELEMENTS(outcomes); i++) {
		assert_row(r.out, "sync-defaults", outcomes[i], "tempfail",
		           "accept", "default");
		assert_row(r.out, "spool-defaults", outcomes[i], "spool",
		           "accept", "default");
	}
	g_clear_pointer(&line, g_free);
	line = line_starting(r.out, "rule spool-defaults: ");
	g_assert_nonnull(strstr(line, ", delivery=spool, "));

	/* on_OUTCOME wins over on_failure, which wins over the default. */
	g_clear_pointer(&line, g_free);
	line = line_starting(r.out, "rule mixed: ");
	g_assert_true(g_str_has_suffix(
	    line, ", reject_text=\"Archive refused the copy\""));
	assert_row(r.out, "mixed", "sent", "accept+header", "accept+header",
	           "on_sent");
	assert_row(r.out, "mixed", "all_refused", "reject", "reject",
	           "on_all_refused");
	assert_row(r.out, "mixed", "timeout", "spool+header", "spool+header",
	           "on_failure");
	assert_row(r.out, "mixed", "tls_error", "spool+header", "spool+header",
	           "on_failure");

	assert_row(r.out, "spool-policy", "sent", "accept", "accept",
	           "default");
	assert_row(r.out, "spool-policy", "timeout", "tempfail", "tempfail",
	           "on_timeout");
	assert_row(r.out, "spool-policy", "unreachable", "accept", "accept",
	           "on_failure");

	/* Spool rules say what their actions mean, sync rules do not. */
	g_assert_cmpuint(count_lines_with(r.out, "  (delivery = spool: "), ==,
	                 2);

	/* The spool's settings, as the file would write them. */
	g_clear_pointer(&line, g_free);
	line = line_starting(r.out, "spool: ");
	g_assert_true(g_str_has_suffix(
	    line, "/spool, workers=8, spool_min_free=1G, spool_max_age=2d, "
	          "spool_retry_min=30s, spool_retry_max=90m, "
	          "pid_file=/run/archive-milter-test.pid"));

	/* reject_text where nothing rejects is dead configuration. */
	g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==, 1);
	g_clear_pointer(&line, g_free);
	line = line_starting(r.out, "WARNING: rule");
	g_assert_cmpstr(line, ==,
	                "WARNING: rule unused-text: reject_text is set but "
	                "no outcome rejects, so it is never used");
}

/* The defaults of the spool, printed as they would be written. */
static void
test_spool_defaults(void)
{
	g_auto(Run) r = {0};
	g_autofree char *line = NULL;

	run_fixture(&r, "quiet.conf");
	line = line_starting(r.out, "spool: ");
	g_assert_true(g_str_has_suffix(
	    line, "/spool, workers=4, spool_min_free=100M, "
	          "spool_max_age=5d, spool_retry_min=1m, spool_retry_max=1h, "
	          "pid_file=none"));
}

/*
 * spool_dir: a private directory, or a missing one its parent lets us
 * create, is fine.  What the daemon refuses whoever runs it (not a
 * directory, a symbolic link, open to group or others, another user's)
 * is an error and exit 78, so that "ok" means the daemon can start;
 * what depends on the user (cannot be created here) is a WARNING.
 * --check creates nothing.
 */
static void
test_spool_dir(void)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *dir = g_dir_make_tmp("am-spool-XXXXXX", &error);
	g_autofree char *conf = g_build_filename(dir, "am.conf", NULL);
	g_autofree char *open_dir = g_build_filename(dir, "open", NULL);
	g_autofree char *ok_dir = g_build_filename(dir, "ok", NULL);
	g_autofree char *link = g_build_filename(dir, "link", NULL);
	g_autofree char *foreign = g_build_filename(dir, "foreign", NULL);
	g_autofree char *file = g_build_filename(dir, "file", NULL);
	g_autofree char *missing = g_build_filename(dir, "new", NULL);
	g_autofree char *deep = g_build_filename(dir, "no", "such", NULL);
	g_autofree char *under_file = g_build_filename(file, "spool", NULL);
	const struct {
		const char *spool_dir;
		const char *warning; /* NULL: none */
		const char *error;   /* NULL: none; else exit 78 */
	} cases[] = {
	    {ok_dir, NULL, NULL},
	    {missing, NULL, NULL},
	    {open_dir, NULL,
	     "mode 0755 is open to group or others; the daemon "
	     "refuses it unless it is 0700"},
	    {file, NULL, "not a directory"},
	    {link, NULL, "a symbolic link"},
	    {foreign, NULL, "owned by uid 65534, not by this user"},
	    {deep, "does not exist, and cannot be created: its parent ", NULL},
	    /* ENOTDIR, in strerror's words. */
	    {under_file, "Not a directory", NULL},
	};
	gsize i;

	g_assert_no_error(error);
	g_assert_cmpint(g_mkdir(ok_dir, 0700), ==, 0);
	g_assert_cmpint(g_mkdir(open_dir, 0700), ==, 0);
	g_assert_cmpint(g_chmod(open_dir, 0755), ==, 0);
	g_assert_true(g_file_set_contents(file, "x", -1, NULL));
	g_assert_cmpint(symlink(ok_dir, link), ==, 0);
	g_assert_cmpint(g_mkdir(foreign, 0700), ==, 0);
	if (geteuid() == 0)
		g_assert_cmpint(chown(foreign, 65534, 65534), ==, 0);

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *text = g_strdup_printf(
		    "[milter]\nsocket = unix:/run/am.sock\n"
		    "archive_id_key_file = %s/key\nspool_dir = %s\n"
		    "[relay:r]\nhost = 127.0.0.1\n"
		    "[rule:a]\nrelay = r\narchive_to = a@x.example\n",
		    dir, cases[i].spool_dir);
		g_auto(Run) r = {0};

		/* Only root can give a directory away. */
		if (cases[i].spool_dir == foreign && geteuid() != 0)
			continue;
		g_assert_true(g_file_set_contents(conf, text, -1, NULL));
		run_check(&r, conf);
		if (cases[i].error != NULL) {
			g_autofree char *want =
			    g_strdup_printf("spool_dir: %s: %s",
			                    cases[i].spool_dir, cases[i].error);

			g_assert_cmpint(r.status, ==, 78);
			g_assert_nonnull(strstr(r.err, want));
			g_assert_nonnull(strstr(r.err, "the daemon would not "
			                               "start"));
			continue;
		}
		g_assert_cmpint(r.status, ==, 0);
		if (cases[i].warning == NULL) {
			g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==,
			                 0);
		} else {
			g_autofree char *prefix = g_strdup_printf(
			    "WARNING: spool_dir %s: ", cases[i].spool_dir);
			g_autofree char *line = line_starting(r.out, prefix);

			g_assert_nonnull(strstr(line, cases[i].warning));
			g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==,
			                 1);
		}
	}
	/* Nothing was created. */
	g_assert_false(g_file_test(missing, G_FILE_TEST_EXISTS));
	g_assert_false(g_file_test(deep, G_FILE_TEST_EXISTS));

	g_rmdir(ok_dir);
	g_rmdir(open_dir);
	g_unlink(link);
	g_rmdir(foreign);
	g_unlink(file);
	g_unlink(conf);
	g_assert_cmpint(g_rmdir(dir), ==, 0);
}

/*
 * @dir/am.conf: a minimal file whose [milter] group sets the key file
 * on line 3 (@key_line, or the default key inside @dir) and @extra on
 * line 4.  (transfer full) its path
 */
static char *
write_conf(const char *dir, const char *key_line, const char *extra)
{
	g_autofree char *conf = g_build_filename(dir, "am.conf", NULL);
	g_autofree char *text = NULL;
	g_autofree char *key = NULL;

	if (key_line == NULL)
		key = g_strdup_printf("archive_id_key_file = %s/key", dir);
	text = g_strdup_printf("[milter]\nsocket = unix:/run/am.sock\n"
	                       "%s\n%s\n"
	                       "[relay:r]\nhost = 127.0.0.1\n"
	                       "[rule:a]\nrelay = r\n"
	                       "archive_to = a@x.example\n",
	                       key_line != NULL ? key_line : key, extra);
	g_assert_true(g_file_set_contents(conf, text, -1, NULL));
	return g_steal_pointer(&conf);
}

/* Remove write_conf()'s file from @dir. */
static void
remove_conf(const char *dir)
{
	g_autofree char *conf = g_build_filename(dir, "am.conf", NULL);

	g_unlink(conf);
}

/*
 * spool_min_free above the whole file system of spool_dir can never be
 * met, so every spooled copy would be refused (its original
 * tempfailed): a WARNING, for an existing spool_dir and for a missing
 * one (its parent's file system).  Above what is available now: another
 * WARNING.  A floor that fits: none.
 */
static void
test_spool_min_free(void)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *dir = g_dir_make_tmp("am-minfree-XXXXXX", &error);
	g_autofree char *spool = g_build_filename(dir, "spool", NULL);
	g_autofree char *missing = g_build_filename(dir, "new", NULL);
	struct statvfs sv;
	guint64 total, avail;
	guint i;

	g_assert_no_error(error);
	g_assert_cmpint(g_mkdir(spool, 0700), ==, 0);
	g_assert_cmpint(statvfs(dir, &sv), ==, 0);
	total = (guint64)sv.f_blocks * sv.f_frsize;
	avail = (guint64)sv.f_bavail * sv.f_frsize;

	for (i = 0; i < 4; i++) {
		const char *where = i == 1 ? missing : spool;
		guint64 floor = i < 2 ? total + 1 : i == 2 ? 1024 : 0;
		g_autofree char *extra = NULL;
		g_autofree char *conf = NULL;
		g_autofree char *prefix = NULL;
		g_autofree char *line = NULL;
		g_auto(Run) r = {0};

		if (i == 3) {
			/* Between available and total, with room on both
			 * sides for other writers meanwhile. */
			if (total - avail < 512 * 1024 * 1024 ||
			    avail < 512 * 1024 * 1024) {
				g_test_message("file system too full or too "
				               "empty for the 'available now' "
				               "case");
				continue;
			}
			floor = avail + (total - avail) / 2;
		}
		extra = g_strdup_printf("spool_dir = %s\n"
		                        "spool_min_free = %" G_GUINT64_FORMAT,
		                        where, floor);
		conf = write_conf(dir, NULL, extra);
		run_check(&r, conf);
		g_assert_cmpint(r.status, ==, 0);
		prefix = g_strdup("WARNING: spool_min_free ");
		if (i == 2) {
			g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==,
			                 0);
			continue;
		}
		line = line_starting(r.out, prefix);
		g_assert_cmpuint(count_lines_with(r.out, "WARNING"), ==, 1);
		if (i < 2)
			g_assert_nonnull(strstr(
			    line, " is more than the whole file system of "
			          "spool_dir "));
		else
			g_assert_nonnull(strstr(line, " is more than is "
			                              "available now on the "
			                              "file system of "
			                              "spool_dir "));
		g_assert_nonnull(strstr(line, where));
		g_assert_true(g_str_has_suffix(
		    line, "would be refused and its original tempfailed"));
		g_unlink(conf);
	}
	g_assert_false(g_file_test(missing, G_FILE_TEST_EXISTS));
	g_rmdir(spool);
	remove_conf(dir);
	g_assert_cmpint(g_rmdir(dir), ==, 0);
}

/*
 * A pid_file the daemon could not write stops its start, so --check
 * says so as an error (exit 78, EX_CONFIG), naming the file, line and
 * key; it creates nothing.  A path in a writable directory is fine.
 */
static void
test_pid_file(void)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *dir = g_dir_make_tmp("am-pid-XXXXXX", &error);
	g_autofree char *ok = g_build_filename(dir, "am.pid", NULL);
	g_autofree char *sub = g_build_filename(dir, "sub", NULL);
	g_autofree char *deep = g_build_filename(dir, "no", "am.pid", NULL);
	g_autofree char *file = g_build_filename(dir, "file", NULL);
	g_autofree char *under = g_build_filename(file, "am.pid", NULL);
	g_autofree char *locked = g_build_filename(dir, "locked", NULL);
	g_autofree char *in_locked = g_build_filename(locked, "am.pid", NULL);
	const struct {
		const char *path;
		const char *why; /* NULL: fine */
	} cases[] = {
	    {ok, NULL},
	    {sub, "is a directory"},
	    {deep, "No such file or directory (the daemon creates no "
	           "directory for it)"},
	    {under, "/file is not a directory"},
	    /* Read-only for everyone, root included. */
	    {"/proc/self/am.pid", "cannot create files in /proc/self: "},
	    /* Root writes there anyway: only run as another user. */
	    {getuid() != 0 ? in_locked : NULL, "cannot create files in "},
	};
	guint i;

	g_assert_no_error(error);
	g_assert_cmpint(g_mkdir(sub, 0700), ==, 0);
	g_assert_cmpint(g_mkdir(locked, 0500), ==, 0);
	g_assert_true(g_file_set_contents(file, "x", -1, NULL));

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *extra = NULL;
		g_autofree char *conf = NULL;
		g_autofree char *want = NULL;
		g_auto(Run) r = {0};

		if (cases[i].path == NULL)
			continue;
		extra = g_strdup_printf("pid_file = %s", cases[i].path);
		conf = write_conf(dir, NULL, extra);
		run_check(&r, conf);
		if (cases[i].why == NULL) {
			g_assert_cmpint(r.status, ==, 0);
			g_assert_cmpstr(r.err, ==, "");
			continue;
		}
		if (strcmp(cases[i].path, "/proc/self/am.pid") == 0 &&
		    access("/proc/self", W_OK) == 0) {
			g_test_message("/proc/self is writable here");
			continue;
		}
		g_assert_cmpint(r.status, ==, 78);
		want = g_strdup_printf(
		    "%s:4: [milter] pid_file: \"%s\": ", conf, cases[i].path);
		g_assert_true(g_str_has_prefix(r.err, want));
		g_assert_nonnull(strstr(r.err, cases[i].why));
		g_assert_true(g_str_has_suffix(r.err, "; the daemon would not "
		                                      "start\n"));
		g_assert_cmpuint(count_lines_with(r.err, "pid_file"), ==, 1);
	}
	g_assert_false(g_file_test(ok, G_FILE_TEST_EXISTS));
	g_assert_false(g_file_test(deep, G_FILE_TEST_EXISTS));
	g_rmdir(sub);
	g_rmdir(locked);
	g_unlink(file);
	remove_conf(dir);
	g_assert_cmpint(g_rmdir(dir), ==, 0);
}

/*
 * A key file the daemon would refuse: --check and the daemon's start
 * both name the configuration file, line and key, then the key file
 * and the cause, each cause in its own words.  --check creates no key;
 * the daemon stops before it listens (exit 78).
 */
static void
test_key_file(void)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *dir = g_dir_make_tmp("am-keychk-XXXXXX", &error);
	g_autofree char *key = g_build_filename(dir, "key", NULL);
	g_autofree char *missing = g_build_filename(dir, "missing", NULL);
	g_autofree char *key_line = NULL;
	g_autofree char *conf = NULL;
	g_autofree char *where = NULL;
	const struct {
		int kind; /* 0 short, 1 open mode, 2 directory, 3 long */
		const char *why;
	} cases[] = {
	    {0, "too short: a key needs at least 16 octets, the file has 5 "},
	    {1, "mode 0644 is open to group or others; the key must be "
	        "readable by its owner only (chmod 0600 "},
	    {2, "is a directory; the key must be a regular file"},
	    {3, "too long: a key holds at most 1024 octets, the file has "
	        "2048 "},
	};
	guint i;

	g_assert_no_error(error);
	key_line = g_strdup_printf("archive_id_key_file = %s", key);
	conf = write_conf(dir, key_line, "");
	where = g_strdup_printf(
	    "%s:3: [milter] archive_id_key_file: %s: ", conf, key);

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		const char *daemon_argv[] = {milter_path, "-c", conf, "-f",
		                             NULL};
		g_autofree char *want = g_strconcat(where, cases[i].why, NULL);
		g_autofree char *d_out = NULL;
		g_autofree char *d_err = NULL;
		g_auto(Run) r = {0};
		int status = 0;

		if (cases[i].kind == 2) {
			g_assert_cmpint(g_mkdir(key, 0700), ==, 0);
		} else {
			gsize len = cases[i].kind == 0   ? 5
			            : cases[i].kind == 3 ? 2048
			                                 : 32;
			g_autofree char *data = g_strnfill(len, 'k');

			g_assert_true(
			    g_file_set_contents(key, data, len, NULL));
			g_assert_cmpint(
			    g_chmod(key, cases[i].kind == 1 ? 0644 : 0600), ==,
			    0);
		}
		run_check(&r, conf);
		g_assert_cmpint(r.status, ==, 78);
		g_assert_true(g_str_has_prefix(r.err, want));

		/* The daemon, in the foreground, logs to stderr. */
		g_spawn_sync(NULL, (char **)daemon_argv, NULL, G_SPAWN_DEFAULT,
		             NULL, NULL, &d_out, &d_err, &status, &error);
		g_assert_no_error(error);
		g_test_message("daemon: %s", d_err);
		g_assert_true(WIFEXITED(status));
		g_assert_cmpint(WEXITSTATUS(status), ==, 78);
		g_assert_nonnull(strstr(d_err, want));

		if (cases[i].kind == 2)
			g_rmdir(key);
		else
			g_unlink(key);
	}

	/* A missing key is fine for --check, which does not create it. */
	{
		g_autofree char *line =
		    g_strdup_printf("archive_id_key_file = %s", missing);
		g_autofree char *conf2 = write_conf(dir, line, "");
		g_auto(Run) r = {0};

		run_check(&r, conf2);
		g_assert_cmpint(r.status, ==, 0);
		g_assert_false(g_file_test(missing, G_FILE_TEST_EXISTS));
	}
	g_unlink(conf);
	g_assert_cmpint(g_rmdir(dir), ==, 0);
}

#define SECRET "never-print-me-42"

/* The user and the file are shown; the password never, good or bad. */
static void
test_no_password(void)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *dir = g_dir_make_tmp("am-check-XXXXXX", &error);
	g_autofree char *pw = g_build_filename(dir, "pw", NULL);
	g_autofree char *ca = g_build_filename(dir, "ca.pem", NULL);
	g_autofree char *conf = g_build_filename(dir, "am.conf", NULL);
	g_autofree char *text = NULL;
	g_autofree char *line = NULL;
	g_autofree char *want = NULL;
	g_auto(Run) good = {0};
	g_auto(Run) bad = {0};

	g_assert_no_error(error);
	g_assert_true(g_file_set_contents(pw, SECRET "\n", -1, NULL));
	g_assert_cmpint(g_chmod(pw, 0600), ==, 0);
	g_assert_true(g_file_set_contents(ca, "PEM\n", -1, NULL));
	text =
	    g_strdup_printf("[milter]\nsocket = unix:/run/am.sock\n"
	                    "archive_id_key_file = %s/key\n"
	                    "[relay:r]\nhost = 192.0.2.7\nca_file = %s\n"
	                    "auth_user = archiver\nauth_password_file = %s\n"
	                    "[rule:a]\nrelay = r\narchive_to = a@x.example\n",
	                    dir, ca, pw);
	g_assert_true(g_file_set_contents(conf, text, -1, NULL));

	run_check(&good, conf);
	g_assert_cmpint(good.status, ==, 0);
	line = line_starting(good.out, "relay r:");
	want = g_strdup_printf(", ca_file=%s, auth_user=archiver, "
	                       "auth_password_file=%s, auth_plaintext=no",
	                       ca, pw);
	g_assert_true(g_str_has_suffix(line, want));
	g_assert_null(strstr(good.out, SECRET));
	g_assert_null(strstr(good.err, SECRET));

	/* Readable by others: refused, the mode named, no password. */
	g_assert_cmpint(g_chmod(pw, 0644), ==, 0);
	run_check(&bad, conf);
	g_assert_cmpint(bad.status, ==, 78); /* EX_CONFIG */
	g_assert_nonnull(strstr(bad.err, "auth_password_file: \""));
	g_assert_nonnull(strstr(bad.err, "mode 0644"));
	g_assert_null(strstr(bad.out, SECRET));
	g_assert_null(strstr(bad.err, SECRET));

	g_unlink(pw);
	g_unlink(ca);
	g_unlink(conf);
	g_rmdir(dir);
}

/*
 * SIGUSR1 (DESIGN.md: reload, not implemented yet) must not stop a
 * running daemon: it would take every message down to a tempfail.
 */
static void rm_spool(const char *dir);

/* A daemon's configuration @conf: socket @sock, the key and the spool
 * in @dir (never the system's), one rule; @extra: more [milter] lines
 * ("" for none). */
static void
write_daemon_conf(const char *conf, const char *dir, const char *sock,
                  const char *extra)
{
	g_autofree char *text = g_strdup_printf(
	    "[milter]\nsocket = unix:%s\narchive_id_key_file = %s/key\n"
	    "spool_dir = %s/spool\n%s"
	    "[relay:r]\nhost = 127.0.0.1\nport = 9\n"
	    "[rule:a]\nrelay = r\narchive_to = a@x.example\n",
	    sock, dir, dir, extra);

	g_assert_true(g_file_set_contents(conf, text, -1, NULL));
}

static void
test_sigusr1(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-usr1-XXXXXX", NULL);
	g_autofree char *conf = g_build_filename(dir, "a.conf", NULL);
	g_autofree char *sock = g_build_filename(dir, "sock", NULL);
	g_autofree char *key = g_build_filename(dir, "key", NULL);
	const char *argv[] = {milter_path, "-c", conf, "-f", NULL};
	g_autoptr(GError) error = NULL;
	GPid pid;
	int status = 0;

	write_daemon_conf(conf, dir, sock, "");
	g_spawn_async(NULL, (char **)argv, NULL,
	              G_SPAWN_DO_NOT_REAP_CHILD | G_SPAWN_STDERR_TO_DEV_NULL,
	              NULL, NULL, &pid, &error);
	g_assert_no_error(error);

	/* Listening: the socket file is there. */
	for (int i = 0; i < 100 && !g_file_test(sock, G_FILE_TEST_EXISTS); i++)
		g_usleep(50000);
	g_assert_true(g_file_test(sock, G_FILE_TEST_EXISTS));

	kill(pid, SIGUSR1);
	g_usleep(300000);
	g_assert_cmpint(waitpid(pid, &status, WNOHANG), ==, 0);

	/* SIGTERM still stops it (libmilter takes a few seconds). */
	kill(pid, SIGTERM);
	g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
	g_assert_true(WIFEXITED(status));
	g_spawn_close_pid(pid);
	g_unlink(sock);
	g_unlink(key);
	g_unlink(conf);
	rm_spool(dir);
	g_rmdir(dir);
}

/*
 * A daemon whose pid_file cannot be written (its directory is missing)
 * stops with 73 and names the configured path and the missing
 * directory, not the temporary name GLib writes first.
 */
static void
test_pid_file_start(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-pidstart-XXXXXX", NULL);
	g_autofree char *conf = g_build_filename(dir, "a.conf", NULL);
	g_autofree char *sock = g_build_filename(dir, "sock", NULL);
	g_autofree char *key = g_build_filename(dir, "key", NULL);
	g_autofree char *missing = g_build_filename(dir, "run", NULL);
	g_autofree char *pid = g_build_filename(missing, "am.pid", NULL);
	g_autofree char *extra = g_strdup_printf("pid_file = %s\n", pid);
	g_autofree char *want = NULL;
	const char *argv[] = {milter_path, "-c", conf, "-f", NULL};
	g_autoptr(GError) error = NULL;
	g_auto(Run) r = {0};
	int wait_status = 0;

	write_daemon_conf(conf, dir, sock, extra);
	g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
	             &r.out, &r.err, &wait_status, &error);
	g_assert_no_error(error);
	g_test_message("stderr: %s", r.err);
	g_assert_true(WIFEXITED(wait_status));
	g_assert_cmpint(WEXITSTATUS(wait_status), ==, 73);
	want = g_strdup_printf("cannot write pid_file %s: its directory %s "
	                       "does not exist",
	                       pid, missing);
	g_assert_nonnull(strstr(r.err, want));
	g_unlink(sock);
	g_unlink(key);
	g_unlink(conf);
	rm_spool(dir);
	g_rmdir(dir);
}

/* A spool the daemon made under @dir: its parts, then itself. */
static void
rm_spool(const char *dir)
{
	const char *parts[] = {"tmp", "queue", "hold", "state", NULL};
	g_autofree char *spool = g_build_filename(dir, "spool", NULL);
	g_autofree char *lock = g_build_filename(spool, "lock", NULL);

	for (const char **p = parts; *p != NULL; p++) {
		g_autofree char *d = g_build_filename(spool, *p, NULL);

		g_rmdir(d);
	}
	g_unlink(lock);
	g_rmdir(spool);
}

/* Start a daemon on @conf in the foreground; wait until it listens on
 * the unix socket @sock. */
static GPid
start_daemon(const char *conf, const char *sock)
{
	const char *argv[] = {milter_path, "-c", conf, "-f", NULL};
	g_autoptr(GError) error = NULL;
	GPid pid;

	g_spawn_async(NULL, (char **)argv, NULL,
	              G_SPAWN_DO_NOT_REAP_CHILD | G_SPAWN_STDERR_TO_DEV_NULL,
	              NULL, NULL, &pid, &error);
	g_assert_no_error(error);
	for (int i = 0; i < 100 && !g_file_test(sock, G_FILE_TEST_EXISTS); i++)
		g_usleep(50000);
	g_assert_true(g_file_test(sock, G_FILE_TEST_EXISTS));
	return pid;
}

/* A second daemon on a spool another daemon holds does not start: it
 * would deliver every copy twice. */
static void
test_second_daemon(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-two-XXXXXX", NULL);
	g_autofree char *conf1 = g_build_filename(dir, "1.conf", NULL);
	g_autofree char *conf2 = g_build_filename(dir, "2.conf", NULL);
	g_autofree char *sock1 = g_build_filename(dir, "sock1", NULL);
	g_autofree char *sock2 = g_build_filename(dir, "sock2", NULL);
	g_autofree char *key = g_build_filename(dir, "key", NULL);
	const char *argv[] = {milter_path, "-c", conf2, "-f", NULL};
	g_autofree char *err = NULL;
	g_autoptr(GError) error = NULL;
	int status = 0;
	GPid first;

	write_daemon_conf(conf1, dir, sock1, "");
	write_daemon_conf(conf2, dir, sock2, "");
	first = start_daemon(conf1, sock1);

	g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
	             NULL, &err, &status, &error);
	g_assert_no_error(error);
	g_test_message("second daemon: %s", err);
	g_assert_true(WIFEXITED(status));
	g_assert_cmpint(WEXITSTATUS(status), ==, 75);
	g_assert_nonnull(strstr(err, "in use by another archive-milter "
	                             "daemon"));
	g_assert_false(g_file_test(sock2, G_FILE_TEST_EXISTS));

	/* The first one still runs, and stops as usual. */
	g_assert_cmpint(waitpid(first, &status, WNOHANG), ==, 0);
	kill(first, SIGTERM);
	g_assert_cmpint(waitpid(first, &status, 0), ==, first);
	g_spawn_close_pid(first);
	g_unlink(sock1);
	g_unlink(key);
	g_unlink(conf1);
	g_unlink(conf2);
	rm_spool(dir);
	g_rmdir(dir);
}

static void
test_version(void)
{
	const char *argv[] = {milter_path, "--version", NULL};
	g_autofree char *out = NULL;
	g_autoptr(GError) error = NULL;
	int status = 0;

	g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
	             &out, NULL, &status, &error);
	g_assert_no_error(error);
	g_assert_true(WIFEXITED(status));
	g_assert_cmpint(WEXITSTATUS(status), ==, 0);
	g_assert_true(g_str_has_prefix(out, "archive-milter "));
	g_assert_true(g_ascii_isdigit(out[strlen("archive-milter ")]));
}

/* A socket another process holds: exit 69 and the reason, not just
 * "cannot listen". */
static void
test_socket_busy(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-busy-XXXXXX", NULL);
	g_autofree char *conf = g_build_filename(dir, "a.conf", NULL);
	g_autofree char *key = g_build_filename(dir, "key", NULL);
	g_autofree char *text = NULL;
	g_autofree char *err = NULL;
	const char *argv[] = {milter_path, "-c", conf, "-f", NULL};
	g_autoptr(GError) error = NULL;
	struct sockaddr_in sin = {.sin_family = AF_INET};
	socklen_t len = sizeof(sin);
	int holder = socket(AF_INET, SOCK_STREAM, 0);
	int status = 0;
	guint16 port;

	g_assert_cmpint(holder, >=, 0);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	g_assert_cmpint(bind(holder, (struct sockaddr *)&sin, sizeof(sin)), ==,
	                0);
	g_assert_cmpint(listen(holder, 1), ==, 0);
	g_assert_cmpint(getsockname(holder, (struct sockaddr *)&sin, &len), ==,
	                0);
	port = ntohs(sin.sin_port);

	text =
	    g_strdup_printf("[milter]\nsocket = inet:%u@127.0.0.1\n"
	                    "archive_id_key_file = %s\nspool_dir = %s/spool\n"
	                    "[relay:r]\nhost = 127.0.0.1\nport = 9\n"
	                    "[rule:a]\nrelay = r\narchive_to = a@x.example\n",
	                    port, key, dir);
	g_assert_true(g_file_set_contents(conf, text, -1, NULL));
	g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
	             NULL, &err, &status, &error);
	g_assert_no_error(error);
	g_test_message("stderr: %s", err);
	g_assert_true(WIFEXITED(status));
	g_assert_cmpint(WEXITSTATUS(status), ==, 69);
	g_assert_nonnull(strstr(err, "cannot listen on milter socket"));
	g_assert_nonnull(strstr(err, g_strerror(EADDRINUSE)));

	close(holder);
	g_unlink(key);
	g_unlink(conf);
	rm_spool(dir);
	g_rmdir(dir);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);

	milter_path = argc > 1 ? argv[1] : g_getenv("ARCHIVE_MILTER");
	if (milter_path == NULL)
		g_error("usage: %s PATH-TO-ARCHIVE-MILTER (or set "
		        "ARCHIVE_MILTER)",
		        argv[0]);

	g_test_add_func("/plugin/check/tls-levels", test_tls_levels);
	g_test_add_func("/plugin/check/timeout-warnings", test_warnings);
	g_test_add_func("/plugin/check/quiet", test_quiet);
	g_test_add_func("/plugin/check/timeout-warnings-spool-only",
	                test_warnings_spool_only);
	g_test_add_func("/plugin/check/timeout-warnings-deadline-cut",
	                test_warnings_deadline_cut);
	g_test_add_func("/plugin/check/timeout-warnings-match-all",
	                test_warnings_match_all);
	g_test_add_func("/plugin/check/policy", test_policy);
	g_test_add_func("/plugin/check/spool-defaults", test_spool_defaults);
	g_test_add_func("/plugin/check/spool-dir", test_spool_dir);
	g_test_add_func("/plugin/check/no-password", test_no_password);
	g_test_add_func("/plugin/check/spool-min-free", test_spool_min_free);
	g_test_add_func("/plugin/check/pid-file", test_pid_file);
	g_test_add_func("/plugin/check/pid-file-start", test_pid_file_start);
	g_test_add_func("/plugin/check/key-file", test_key_file);
	g_test_add_func("/plugin/daemon/sigusr1", test_sigusr1);
	g_test_add_func("/plugin/daemon/version", test_version);
	g_test_add_func("/plugin/daemon/second-daemon", test_second_daemon);
	g_test_add_func("/plugin/daemon/socket-busy", test_socket_busy);
	return g_test_run();
}
