/*
 * test-conf.c - unit tests of the configuration module (conf/conf.c)
 *
 * Three kinds of test:
 *  - fixture pairs under cases/: NAME.conf is loaded and its errors are
 *    compared, in order and in number, with NAME.expected, one line per
 *    error (lines starting with '#' explain the case; an expected file
 *    with no error lines means the file must load).  Each expected line
 *    is a g_pattern_match_simple() glob ('*' and '?'), matched against
 *    the whole message after the fixture's full path is replaced by
 *    NAME.conf, so line numbers are checked too.  New cases need no code.
 *  - good files under good/ and the shipped conf/archive-milter.conf,
 *    with every parsed field and every default asserted.
 *  - tables of single values (ports, timeouts, sizes, sockets, hosts,
 *    addresses) spliced into a minimal file written to a temporary dir.
 *
 * The source directory comes from G_TEST_SRCDIR (set by meson).
 */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <glib/gstdio.h>

#include "conf.h"

/* The smallest valid file; %s are extra lines for each of the groups. */
#define BASE_CONF                                                              \
	"[milter]\n"                                                           \
	"socket = unix:/run/archive-milter/milter.sock\n"                      \
	"%s\n"                                                                 \
	"[relay:r]\n"                                                          \
	"host = 127.0.0.1\n"                                                   \
	"%s\n"                                                                 \
	"[rule:a]\n"                                                           \
	"relay = r\n"                                                          \
	"archive_to = journal@archive.example\n"                               \
	"%s\n"

enum { IN_MILTER, IN_RELAY, IN_RULE };

static char *tmp_dir;

static char *
case_path(const char *dir, const char *file)
{
	return g_test_build_filename(G_TEST_DIST, dir, file, NULL);
}

static char *
example_path(void)
{
	return g_test_build_filename(G_TEST_DIST, "..", "..", "conf",
	                             "archive-milter.conf", NULL);
}

static void
dump_errors(const GPtrArray *errors)
{
	guint i;

	for (i = 0; i < errors->len; i++)
		g_test_message("error: %s",
		               (const char *)g_ptr_array_index(errors, i));
}

/* Write @text to a fresh file in the temporary directory. */
static char *
write_tmp(const char *text, gssize len)
{
	static guint n;
	g_autoptr(GError) error = NULL;
	char *path;

	path = g_strdup_printf("%s/t%u.conf", tmp_dir, n++);
	g_file_set_contents(path, text, len, &error);
	g_assert_no_error(error);
	return path;
}

/* Load BASE_CONF with @extra added to the group @where. */
static AmConfig *
load_with(int where, const char *extra, GPtrArray **errors)
{
	g_autofree char *text = NULL;
	g_autofree char *path = NULL;

	text = g_strdup_printf(BASE_CONF, where == IN_MILTER ? extra : "",
	                       where == IN_RELAY ? extra : "",
	                       where == IN_RULE ? extra : "");
	path = write_tmp(text, -1);
	return am_config_load(path, errors);
}

static const AmRelay *
relay_at(const AmConfig *c, guint i)
{
	g_assert_cmpuint(i, <, c->relays->len);
	return g_ptr_array_index(c->relays, i);
}

static const AmRule *
rule_at(const AmConfig *c, guint i)
{
	g_assert_cmpuint(i, <, c->rules->len);
	return g_ptr_array_index(c->rules, i);
}

static void
assert_timeouts(const AmRelay *r, guint connect, guint command, guint data,
                guint final)
{
	g_assert_cmpuint(r->timeouts.connect_ms, ==, connect);
	g_assert_cmpuint(r->timeouts.command_ms, ==, command);
	g_assert_cmpuint(r->timeouts.data_ms, ==, data);
	g_assert_cmpuint(r->timeouts.final_ms, ==, final);
}

static void
assert_matches(GRegex *re, const char *yes, const char *no)
{
	g_assert_nonnull(re);
	g_assert_true(g_regex_match(re, yes, 0, NULL));
	g_assert_false(g_regex_match(re, no, 0, NULL));
}

static void
assert_spool_defaults(const AmConfig *c)
{
	g_assert_null(c->pid_file);
	g_assert_cmpstr(c->spool_dir, ==, "/var/spool/archive-milter");
	g_assert_cmpuint(c->workers, ==, 4);
	g_assert_cmpuint(c->spool_min_free, ==, 100 * 1024 * 1024);
	g_assert_cmpuint(c->spool_max_age_s, ==, 5 * 86400);
	g_assert_cmpuint(c->spool_retry_min_s, ==, 60);
	g_assert_cmpuint(c->spool_retry_max_s, ==, 3600);
}

static void
assert_no_actions(const AmRule *r)
{
	guint i;

	for (i = 0; i < AM_OUTCOME_COUNT; i++)
		g_assert_cmpuint(r->actions[i], ==, 0);
}

/* ---- fixture pairs --------------------------------------------------- */

/* Expected lines of NAME.expected, comments and blank lines dropped. */
static GPtrArray *
read_expected(const char *name)
{
	g_autofree char *file = g_strconcat(name, ".expected", NULL);
	g_autofree char *path = case_path("cases", file);
	g_autofree char *text = NULL;
	g_autoptr(GError) error = NULL;
	g_auto(GStrv) lines = NULL;
	GPtrArray *out = g_ptr_array_new_with_free_func(g_free);
	guint i;

	g_file_get_contents(path, &text, NULL, &error);
	g_assert_no_error(error);
	lines = g_strsplit(text, "\n", -1);
	for (i = 0; lines[i] != NULL; i++) {
		if (lines[i][0] != '\0' && lines[i][0] != '#')
			g_ptr_array_add(out, g_strdup(lines[i]));
	}
	return out;
}

static void
test_case(gconstpointer data)
{
	const char *name = data;
	g_autofree char *file = g_strconcat(name, ".conf", NULL);
	g_autofree char *path = case_path("cases", file);
	g_autoptr(GPtrArray) expected = read_expected(name);
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) config = am_config_load(path, &errors);
	guint i;

	g_assert_nonnull(errors);
	dump_errors(errors);
	g_assert_cmpuint(errors->len, ==, expected->len);
	if (expected->len == 0)
		g_assert_nonnull(config);
	else
		g_assert_null(config);

	for (i = 0; i < errors->len; i++) {
		const char *e = g_ptr_array_index(errors, i);
		const char *want = g_ptr_array_index(expected, i);
		g_autofree char *shown = NULL;

		/* Every message names the file it is about. */
		g_assert_true(g_str_has_prefix(e, path));
		shown = g_strconcat(file, e + strlen(path), NULL);
		if (!g_pattern_match_simple(want, shown))
			g_error("%s: error %u\n  got:      %s\n  expected: %s",
			        file, i + 1, shown, want);
	}
}

/* Each NAME.conf has its NAME.expected and the other way round. */
static void
test_cases_paired(void)
{
	g_autofree char *dir_path = case_path("cases", NULL);
	g_autoptr(GError) error = NULL;
	g_autoptr(GDir) dir = g_dir_open(dir_path, 0, &error);
	const char *f;
	guint n = 0;

	g_assert_no_error(error);
	while ((f = g_dir_read_name(dir)) != NULL) {
		g_autofree char *stem = NULL;
		g_autofree char *other = NULL;
		g_autofree char *other_path = NULL;

		if (g_str_has_suffix(f, ".conf")) {
			stem = g_strndup(f, strlen(f) - 5);
			other = g_strconcat(stem, ".expected", NULL);
			n++;
		} else if (g_str_has_suffix(f, ".expected")) {
			stem = g_strndup(f, strlen(f) - 9);
			other = g_strconcat(stem, ".conf", NULL);
		} else {
			g_error("cases/%s: neither .conf nor .expected", f);
		}
		other_path = case_path("cases", other);
		if (!g_file_test(other_path, G_FILE_TEST_IS_REGULAR))
			g_error("cases/%s has no cases/%s", f, other);
	}
	/* A lost directory must not pass as "no cases, no failures". */
	g_assert_cmpuint(n, >=, 20);
}

static gint
str_cmp(gconstpointer a, gconstpointer b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void
add_case_tests(void)
{
	g_autofree char *dir_path = case_path("cases", NULL);
	g_autoptr(GDir) dir = g_dir_open(dir_path, 0, NULL);
	g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
	const char *f;
	guint i;

	if (dir == NULL)
		return; /* test_cases_paired reports it */
	while ((f = g_dir_read_name(dir)) != NULL) {
		if (g_str_has_suffix(f, ".conf"))
			g_ptr_array_add(names, g_strndup(f, strlen(f) - 5));
	}
	g_ptr_array_sort(names, str_cmp);
	for (i = 0; i < names->len; i++) {
		const char *name = g_ptr_array_index(names, i);
		g_autofree char *test = g_strconcat("/conf/case/", name, NULL);

		g_test_add_data_func_full(test, g_strdup(name), test_case,
		                          g_free);
	}
}

/* ---- good files: every field ----------------------------------------- */

static void
test_good_minimal(void)
{
	g_autofree char *path = case_path("good", "minimal.conf");
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = am_config_load(path, &errors);
	const AmRelay *relay;
	const AmRule *rule;

	dump_errors(errors);
	g_assert_cmpuint(errors->len, ==, 0);
	g_assert_nonnull(c);

	g_assert_cmpstr(c->path, ==, path);
	g_assert_cmpstr(c->socket, ==, "local:/run/archive-milter/sock");
	g_assert_cmpstr(c->archive_id_key_file, ==,
	                "/var/lib/archive-milter/archive-id.key");
	g_assert_cmpuint(c->capture_memory_max, ==, 1024 * 1024);
	g_assert_false(c->match_all);
	assert_spool_defaults(c);

	g_assert_cmpuint(c->relays->len, ==, 1);
	relay = relay_at(c, 0);
	g_assert_cmpstr(relay->name, ==, "archive");
	g_assert_cmpstr(relay->host, ==, "127.0.0.1");
	g_assert_cmpuint(relay->port, ==, 25);
	assert_timeouts(relay, 30000, 30000, 30000, 30000);
	g_assert_null(relay->helo_name);
	/* 127.0.0.1: no TLS by default, and not because the file said so. */
	g_assert_cmpint(relay->tls, ==, SMTP_TLS_NONE);
	g_assert_false(relay->tls_set);
	g_assert_null(relay->ca_file);
	g_assert_null(relay->auth_user);
	g_assert_null(relay->auth_password_file);
	g_assert_null(relay->auth_password);
	g_assert_false(relay->auth_plaintext);
	g_assert_cmpuint(c->copy_deadline_ms, ==, 120000);
	g_assert_cmpuint(relay->copy_deadline_ms, ==, 120000);

	g_assert_cmpuint(c->rules->len, ==, 1);
	rule = rule_at(c, 0);
	g_assert_cmpstr(rule->name, ==, "all");
	g_assert_cmpint(rule->mode, ==, AM_MODE_JOURNAL);
	g_assert_true(rule->relay == relay);
	g_assert_cmpstrv(
	    rule->archive_to,
	    ((const char *const[]){"journal@archive.example", NULL}));
	g_assert_cmpstr(rule->archive_from, ==, "");
	g_assert_cmpint(rule->delivery, ==, AM_DELIVERY_SYNC);
	g_assert_cmpint(rule->on_failure, ==, 0);
	assert_no_actions(rule);
	g_assert_null(rule->reject_text);
	g_assert_null(rule->match_sender);
	g_assert_null(rule->match_recipient);
	g_assert_null(rule->match_client);
	g_assert_null(rule->match_header);
	g_assert_cmpuint(rule->min_size, ==, 0);
}

static void
test_good_full(void)
{
	g_autofree char *path = case_path("good", "full.conf");
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = am_config_load(path, &errors);
	const AmRelay *r0, *r1;
	const AmRule *a, *b;

	dump_errors(errors);
	g_assert_cmpuint(errors->len, ==, 0);
	g_assert_nonnull(c);

	g_assert_cmpstr(c->socket, ==, "inet6:8891@::1");
	g_assert_cmpstr(c->archive_id_key_file, ==, "/etc/am/id.key");
	g_assert_cmpuint(c->capture_memory_max, ==, 256 * 1024);
	g_assert_true(c->match_all);
	g_assert_cmpstr(c->pid_file, ==, "/run/am/am.pid");
	g_assert_cmpstr(c->spool_dir, ==, "/srv/am-spool");
	g_assert_cmpuint(c->workers, ==, 64);
	g_assert_cmpuint(c->spool_min_free, ==, 0);
	g_assert_cmpuint(c->spool_max_age_s, ==, 12 * 3600);
	g_assert_cmpuint(c->spool_retry_min_s, ==, 90);
	g_assert_cmpuint(c->spool_retry_max_s, ==, 90);

	/* Relays in file order, each field. */
	g_assert_cmpuint(c->relays->len, ==, 2);
	r0 = relay_at(c, 0);
	g_assert_cmpstr(r0->name, ==, "primary");
	g_assert_cmpstr(r0->host, ==, "127.0.0.1");
	g_assert_cmpuint(r0->port, ==, 2527);
	assert_timeouts(r0, 2500, 2500, 2500, 60000);
	g_assert_cmpstr(r0->helo_name, ==, "milter.example");
	g_assert_cmpint(r0->tls, ==, SMTP_TLS_ENCRYPT);
	g_assert_true(r0->tls_set);
	g_assert_false(r0->auth_plaintext);
	/* [milter] comes first here; the relays still get its value. */
	g_assert_cmpuint(c->copy_deadline_ms, ==, 45500);
	g_assert_cmpuint(r0->copy_deadline_ms, ==, 45500);
	r1 = relay_at(c, 1);
	g_assert_cmpstr(r1->name, ==, "v6_relay-2.b");
	g_assert_cmpstr(r1->host, ==, "::1");
	g_assert_cmpuint(r1->port, ==, 65535);
	assert_timeouts(r1, 500, 1000, 1000, 1000);
	g_assert_cmpstr(r1->helo_name, ==, "[IPv6:::1]");
	g_assert_cmpint(r1->tls, ==, SMTP_TLS_MAY);
	g_assert_true(r1->tls_set);
	g_assert_true(r1->auth_plaintext);
	g_assert_cmpuint(r1->copy_deadline_ms, ==, 45500);

	/* Rules in file order; the second names the relay defined later. */
	g_assert_cmpuint(c->rules->len, ==, 2);
	a = rule_at(c, 0);
	g_assert_cmpstr(a->name, ==, "finance");
	g_assert_cmpint(a->mode, ==, AM_MODE_JOURNAL);
	g_assert_true(a->relay == r1);
	g_assert_cmpstrv(
	    a->archive_to,
	    ((const char *const[]){"one@archive.example", "two@archive.example",
	                           "three@archive.example", NULL}));
	g_assert_cmpstr(a->archive_from, ==, "milter@mail.example");
	g_assert_cmpint(a->delivery, ==, AM_DELIVERY_SYNC);
	g_assert_cmpint(a->on_failure, ==, AM_ACTION_ACCEPT);
	g_assert_cmpuint(a->actions[AM_OUTCOME_SENT], ==,
	                 AM_ACTION_ACCEPT | AM_ACTION_HEADER);
	/* "header" alone is accept+header. */
	g_assert_cmpuint(a->actions[AM_OUTCOME_SOME_REFUSED], ==,
	                 AM_ACTION_ACCEPT | AM_ACTION_HEADER);
	g_assert_cmpuint(a->actions[AM_OUTCOME_ALL_REFUSED], ==,
	                 AM_ACTION_REJECT);
	g_assert_cmpuint(a->actions[AM_OUTCOME_SENDER_REFUSED], ==,
	                 AM_ACTION_TEMPFAIL);
	g_assert_cmpuint(a->actions[AM_OUTCOME_DATA_ERROR], ==,
	                 AM_ACTION_SPOOL | AM_ACTION_QUARANTINE |
	                     AM_ACTION_HEADER);
	g_assert_cmpuint(a->actions[AM_OUTCOME_UNREACHABLE], ==,
	                 AM_ACTION_SPOOL);
	g_assert_cmpuint(a->actions[AM_OUTCOME_TIMEOUT], ==,
	                 AM_ACTION_SPOOL | AM_ACTION_HEADER);
	g_assert_cmpuint(a->actions[AM_OUTCOME_TLS_ERROR], ==,
	                 AM_ACTION_ACCEPT);
	g_assert_cmpstr(a->reject_text, ==,
	                "Archive refused this message, see "
	                "https://x.example/a?b=1#c");
	/* Case-insensitive, and backslashes reach GRegex untouched. */
	assert_matches(a->match_sender, "Boss@Finance.Example",
	               "boss@financeXexample");
	assert_matches(a->match_recipient, "AUDIT@x.example",
	               "x@audit.example");
	assert_matches(a->match_client, "127.0.0.1", "127.0.0.10");
	assert_matches(a->match_header, "subject: [archive] Q3",
	               "Subject: archive Q3");
	g_assert_cmpuint(a->min_size, ==, 10 * 1024);

	b = rule_at(c, 1);
	g_assert_cmpstr(b->name, ==, "rest");
	g_assert_true(b->relay == r0);
	g_assert_cmpstrv(b->archive_to, ((const char *const[]){
	                                    "journal@archive.example", NULL}));
	g_assert_cmpstr(b->archive_from, ==, "");
	g_assert_cmpint(b->delivery, ==, AM_DELIVERY_SPOOL);
	g_assert_cmpint(b->on_failure, ==, AM_ACTION_TEMPFAIL);
	g_assert_cmpuint(b->actions[AM_OUTCOME_SENT], ==, AM_ACTION_ACCEPT);
	g_assert_cmpuint(b->actions[AM_OUTCOME_SOME_REFUSED], ==, 0);
	g_assert_cmpuint(b->actions[AM_OUTCOME_ALL_REFUSED], ==,
	                 AM_ACTION_SPOOL);
	g_assert_cmpuint(b->actions[AM_OUTCOME_DATA_ERROR], ==,
	                 AM_ACTION_ACCEPT);
	g_assert_cmpuint(b->actions[AM_OUTCOME_TIMEOUT], ==, 0);
	g_assert_null(b->reject_text);
	g_assert_cmpuint(b->min_size, ==, 2ULL * 1024 * 1024 * 1024);
}

/* The file we ship must load as is, with the values it documents. */
static void
test_example(void)
{
	g_autofree char *path = example_path();
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = am_config_load(path, &errors);
	const AmRelay *relay;
	const AmRule *rule;

	dump_errors(errors);
	g_assert_cmpuint(errors->len, ==, 0);
	g_assert_nonnull(c);
	g_assert_cmpstr(c->socket, ==, "inet:8891@127.0.0.1");
	g_assert_cmpstr(c->archive_id_key_file, ==,
	                "/var/lib/archive-milter/archive-id.key");
	g_assert_cmpuint(c->capture_memory_max, ==, 1024 * 1024);
	g_assert_false(c->match_all);

	relay = am_config_find_relay(c, "archive");
	g_assert_nonnull(relay);
	g_assert_cmpstr(relay->host, ==, "127.0.0.1");
	g_assert_cmpuint(relay->port, ==, 2527);
	assert_timeouts(relay, 30000, 30000, 30000, 30000);
	g_assert_null(relay->helo_name);
	g_assert_cmpint(relay->tls, ==, SMTP_TLS_NONE);
	g_assert_false(relay->tls_set);
	g_assert_null(relay->auth_user);
	g_assert_cmpuint(c->copy_deadline_ms, ==, 120000);

	assert_spool_defaults(c);

	/* The spool rule first: large mail, a policy of its own. */
	g_assert_cmpuint(c->rules->len, ==, 2);
	rule = rule_at(c, 0);
	g_assert_cmpstr(rule->name, ==, "large");
	g_assert_true(rule->relay == relay);
	g_assert_cmpint(rule->delivery, ==, AM_DELIVERY_SPOOL);
	g_assert_cmpuint(rule->min_size, ==, 10 * 1024 * 1024);
	g_assert_cmpint(rule->on_failure, ==, 0);
	g_assert_cmpuint(rule->actions[AM_OUTCOME_ALL_REFUSED], ==,
	                 AM_ACTION_SPOOL);
	g_assert_cmpuint(rule->actions[AM_OUTCOME_TLS_ERROR], ==,
	                 AM_ACTION_ACCEPT);
	g_assert_cmpuint(am_rule_action(rule, AM_OUTCOME_ALL_REFUSED, FALSE),
	                 ==, AM_ACTION_SPOOL);
	g_assert_cmpuint(am_rule_action(rule, AM_OUTCOME_TIMEOUT, TRUE), ==,
	                 AM_ACTION_SPOOL);
	g_assert_cmpuint(am_rule_action(rule, AM_OUTCOME_DATA_ERROR, FALSE), ==,
	                 AM_ACTION_ACCEPT);

	rule = rule_at(c, 1);
	g_assert_cmpstr(rule->name, ==, "everything");
	g_assert_true(rule->relay == relay);
	g_assert_cmpstrv(
	    rule->archive_to,
	    ((const char *const[]){"journal@archive.example", NULL}));
	g_assert_cmpstr(rule->archive_from, ==, "");
	g_assert_cmpint(rule->delivery, ==, AM_DELIVERY_SYNC);
	g_assert_cmpint(rule->on_failure, ==, AM_ACTION_TEMPFAIL);
	assert_no_actions(rule);
	g_assert_null(rule->reject_text);
	g_assert_null(rule->match_sender);
	g_assert_cmpuint(rule->min_size, ==, 0);
}

/*
 * The commented-out sample lines of the example must be valid too:
 * uncommenting them is what an administrator does first.
 */
static void
test_example_uncommented(void)
{
	g_autofree char *path = example_path();
	g_autofree char *text = NULL;
	g_autofree char *tmp = NULL;
	g_autoptr(GRegex) re = NULL;
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(GError) error = NULL;
	g_autoptr(AmConfig) c = NULL;
	g_autofree char *out = NULL;
	const AmRule *rule;

	g_file_get_contents(path, &text, NULL, &error);
	g_assert_no_error(error);
	re = g_regex_new("^#([a-z_]+ = )", G_REGEX_MULTILINE, 0, NULL);
	out = g_regex_replace(re, text, -1, 0, "\\1", 0, &error);
	g_assert_no_error(error);
	tmp = write_tmp(out, -1);
	c = am_config_load(tmp, &errors);
	dump_errors(errors);
	g_assert_cmpuint(errors->len, ==, 0);
	rule = rule_at(c, 1);
	g_assert_cmpstr(c->pid_file, ==,
	                "/run/archive-milter/archive-milter.pid");
	/* The samples show the defaults. */
	g_assert_cmpstr(c->spool_dir, ==, "/var/spool/archive-milter");
	g_assert_cmpuint(c->workers, ==, 4);
	g_assert_cmpuint(c->spool_min_free, ==, 100 * 1024 * 1024);
	g_assert_cmpuint(c->spool_max_age_s, ==, 5 * 86400);
	g_assert_cmpuint(c->spool_retry_min_s, ==, 60);
	g_assert_cmpuint(c->spool_retry_max_s, ==, 3600);
	g_assert_cmpint(rule->delivery, ==, AM_DELIVERY_SYNC);
	g_assert_cmpuint(rule->actions[AM_OUTCOME_SENT], ==, AM_ACTION_ACCEPT);
	g_assert_cmpuint(rule->actions[AM_OUTCOME_ALL_REFUSED], ==,
	                 AM_ACTION_REJECT);
	g_assert_cmpuint(rule->actions[AM_OUTCOME_UNREACHABLE], ==,
	                 AM_ACTION_SPOOL | AM_ACTION_HEADER);
	g_assert_cmpstr(rule->reject_text, ==,
	                "Message not accepted: it could not be archived");
	g_assert_cmpstr(relay_at(c, 0)->helo_name, ==, "milter.example");
	assert_timeouts(relay_at(c, 0), 30000, 30000, 30000, 60000);
	g_assert_cmpint(relay_at(c, 0)->tls, ==, SMTP_TLS_NONE);
	g_assert_true(relay_at(c, 0)->tls_set);
	g_assert_false(relay_at(c, 0)->auth_plaintext);
	g_assert_cmpuint(c->copy_deadline_ms, ==, 120000);
	assert_matches(rule->match_sender, "a@EXAMPLE.com", "a@example.org");
	assert_matches(rule->match_recipient, "finance@x", "x@finance");
	assert_matches(rule->match_client, "127.0.0.1", "127.0.0.12");
	assert_matches(rule->match_header, "Subject: x [ARCHIVE]",
	               "Subject: archive");
	g_assert_cmpuint(rule->min_size, ==, 0);
}

/* Every key of issue 4 is in the example, set or as a sample line. */
static void
test_example_documents_keys(void)
{
	static const char *const keys[] = {
	    "pid_file",        "spool_dir",     "workers",
	    "spool_min_free",  "spool_max_age", "spool_retry_min",
	    "spool_retry_max", "delivery",      "on_failure",
	    "reject_text",
	};
	g_autofree char *path = example_path();
	g_autofree char *text = NULL;
	g_autoptr(GError) error = NULL;
	guint i;

	g_file_get_contents(path, &text, NULL, &error);
	g_assert_no_error(error);
	for (i = 0; i < G_N_ELEMENTS(keys) + AM_OUTCOME_COUNT; i++) {
		g_autofree char *key =
		    i < G_N_ELEMENTS(keys)
		        ? g_strdup(keys[i])
		        : g_strconcat("on_",
		                      am_outcome_name(i - G_N_ELEMENTS(keys)),
		                      NULL);
		g_autofree char *set = g_strdup_printf("\n%s = ", key);
		g_autofree char *sample = g_strdup_printf("\n#%s = ", key);

		if (strstr(text, set) == NULL && strstr(text, sample) == NULL)
			g_error("%s is not in the example", key);
	}
}

/* ---- tables of single values ----------------------------------------- */

typedef struct {
	const char *line; /* added to the group */
	guint64 want;     /* the parsed value; 0: must be an error */
} ValueCase;

static void
run_value_table(int where, const char *key, const ValueCase *cases, gsize n,
                guint64 (*field)(const AmConfig *))
{
	gsize i;

	for (i = 0; i < n; i++) {
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		g_test_message("%s", cases[i].line);
		c = load_with(where, cases[i].line, &errors);
		dump_errors(errors);
		if (cases[i].want == 0) {
			g_autofree char *frag = g_strdup_printf("] %s: ", key);

			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(
			    strstr(g_ptr_array_index(errors, 0), frag));
		} else {
			g_assert_nonnull(c);
			g_assert_cmpuint(field(c), ==, cases[i].want);
		}
	}
}

static guint64
relay_port(const AmConfig *c)
{
	return relay_at(c, 0)->port;
}

/* "timeout" sets all four stages alike. */
static guint64
relay_timeout(const AmConfig *c)
{
	const SmtpTimeouts *t = &relay_at(c, 0)->timeouts;

	g_assert_cmpuint(t->command_ms, ==, t->connect_ms);
	g_assert_cmpuint(t->data_ms, ==, t->connect_ms);
	g_assert_cmpuint(t->final_ms, ==, t->connect_ms);
	return t->connect_ms;
}

static guint64
relay_plaintext(const AmConfig *c)
{
	/* 1 and 2 so that FALSE is told apart from "must fail". */
	return relay_at(c, 0)->auth_plaintext ? 2 : 1;
}

static guint64
rule_min_size(const AmConfig *c)
{
	/* +1 so that min_size = 0 is told apart from "must fail". */
	return rule_at(c, 0)->min_size + 1;
}

static guint64
capture_max(const AmConfig *c)
{
	return c->capture_memory_max + 1;
}

static void
test_ports(void)
{
	static const ValueCase cases[] = {
	    {"port = 1", 1},         {"port = 25", 25},
	    {"port = 65535", 65535}, {"port = 0", 0},
	    {"port = 65536", 0},     {"port = 99999999999999999999999", 0},
	    {"port = -25", 0},       {"port = +25", 0},
	    {"port = 0x19", 0},      {"port = 2 5", 0},
	    {"port = smtp", 0},      {"port =", 0},
	};

	run_value_table(IN_RELAY, "port", cases, G_N_ELEMENTS(cases),
	                relay_port);
}

static void
test_timeouts(void)
{
	static const ValueCase cases[] = {
	    {"timeout = 30", 30000},
	    {"timeout = 1", 1000},
	    {"timeout = 2.5", 2500},
	    {"timeout = .25", 250},
	    {"timeout = 7.", 7000},
	    {"timeout = 0.001", 1},
	    /* Rounded up: a positive timeout never becomes 0 ms. */
	    {"timeout = 0.0001", 1},
	    {"timeout = 1.0005", 1001},
	    {"timeout = 1.0000", 1000},
	    {"timeout = 86400", 86400000},
	    {"timeout = 0", 0},
	    {"timeout = 0.0", 0},
	    {"timeout = 86400.001", 0},
	    {"timeout = 86401", 0},
	    {"timeout = 4294968", 0},
	    {"timeout = -1", 0},
	    {"timeout = 1e3", 0},
	    {"timeout = 1.2.3", 0},
	    {"timeout = .", 0},
	    {"timeout = 30s", 0},
	    {"timeout = nan", 0},
	    {"timeout = inf", 0},
	    {"timeout =", 0},
	};

	run_value_table(IN_RELAY, "timeout", cases, G_N_ELEMENTS(cases),
	                relay_timeout);
}

/* A stage key wins over "timeout", whichever comes first. */
static void
test_stage_timeouts(void)
{
	static const struct {
		const char *lines;
		guint want[4]; /* connect, command, data, final */
	} cases[] = {
	    {"", {30000, 30000, 30000, 30000}},
	    {"timeout_connect = 5", {5000, 30000, 30000, 30000}},
	    {"timeout_command = 0.25", {30000, 250, 30000, 30000}},
	    {"timeout_data = 90", {30000, 30000, 90000, 30000}},
	    {"timeout_final = 600", {30000, 30000, 30000, 600000}},
	    {"timeout = 10\ntimeout_data = 60", {10000, 10000, 60000, 10000}},
	    {"timeout_final = 2\ntimeout = 7", {7000, 7000, 7000, 2000}},
	    {"timeout = 1\ntimeout_connect = 2\ntimeout_command = 3\n"
	     "timeout_data = 4\ntimeout_final = 5",
	     {2000, 3000, 4000, 5000}},
	};
	static const char *const keys[] = {"timeout_connect", "timeout_command",
	                                   "timeout_data", "timeout_final"};
	static const char *const bad[] = {"0", "-1", "1e3", "86401", "x", ""};
	gsize i, j;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		g_test_message("%s", cases[i].lines);
		c = load_with(IN_RELAY, cases[i].lines, &errors);
		dump_errors(errors);
		g_assert_nonnull(c);
		assert_timeouts(relay_at(c, 0), cases[i].want[0],
		                cases[i].want[1], cases[i].want[2],
		                cases[i].want[3]);
	}

	/* Each key has the checks of "timeout", and names itself. */
	for (i = 0; i < G_N_ELEMENTS(keys); i++) {
		for (j = 0; j < G_N_ELEMENTS(bad); j++) {
			g_autofree char *line =
			    g_strdup_printf("%s = %s", keys[i], bad[j]);
			g_autofree char *frag =
			    g_strdup_printf("] %s: \"%s\": must be a positive",
			                    keys[i], bad[j]);
			g_autoptr(GPtrArray) errors = NULL;
			g_autoptr(AmConfig) c = NULL;

			c = load_with(IN_RELAY, line, &errors);
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(
			    strstr(g_ptr_array_index(errors, 0), frag));
		}
	}
}

static guint64
copy_deadline(const AmConfig *c)
{
	/* Every relay carries the [milter] value. */
	g_assert_cmpuint(relay_at(c, 0)->copy_deadline_ms, ==,
	                 c->copy_deadline_ms);
	return c->copy_deadline_ms;
}

static void
test_copy_deadline(void)
{
	static const ValueCase cases[] = {
	    {"copy_deadline = 120", 120000},
	    {"copy_deadline = 0.5", 500},
	    {"copy_deadline = 299.9", 299900},
	    {"copy_deadline = 86400", 86400000},
	    {"copy_deadline = 0", 0},
	    {"copy_deadline = -1", 0},
	    {"copy_deadline = 2m", 0},
	    {"copy_deadline =", 0},
	};

	run_value_table(IN_MILTER, "copy_deadline", cases, G_N_ELEMENTS(cases),
	                copy_deadline);
}

/* The default follows the host; a configured level is kept as given. */
static void
test_tls_levels(void)
{
	static const struct {
		const char *host;
		const char *tls; /* NULL: not set */
		SmtpTlsLevel want;
	} cases[] = {
	    {"127.0.0.1", NULL, SMTP_TLS_NONE},
	    {"127.8.9.10", NULL, SMTP_TLS_NONE},
	    {"::1", NULL, SMTP_TLS_NONE},
	    {"localhost", NULL, SMTP_TLS_NONE},
	    {"128.0.0.1", NULL, SMTP_TLS_VERIFY},
	    {"192.0.2.7", NULL, SMTP_TLS_VERIFY},
	    {"::2", NULL, SMTP_TLS_VERIFY},
	    {"archive.example", NULL, SMTP_TLS_VERIFY},
	    {"localhost.example", NULL, SMTP_TLS_VERIFY},
	    {"127.0.0.1", "verify", SMTP_TLS_VERIFY},
	    {"127.0.0.1", "encrypt", SMTP_TLS_ENCRYPT},
	    {"::1", "may", SMTP_TLS_MAY},
	    {"archive.example", "none", SMTP_TLS_NONE},
	    {"archive.example", "may", SMTP_TLS_MAY},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *text = g_strdup_printf(
		    "[milter]\nsocket = unix:/run/s\n[relay:r]\nhost = %s\n"
		    "%s%s\n[rule:a]\nrelay = r\narchive_to = j@a.example\n",
		    cases[i].host, cases[i].tls ? "tls = " : "",
		    cases[i].tls ? cases[i].tls : "");
		g_autofree char *path = write_tmp(text, -1);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = am_config_load(path, &errors);

		g_test_message("host %s, tls %s", cases[i].host,
		               cases[i].tls ? cases[i].tls : "(unset)");
		dump_errors(errors);
		g_assert_nonnull(c);
		g_assert_cmpint(relay_at(c, 0)->tls, ==, cases[i].want);
		g_assert_cmpint(relay_at(c, 0)->tls_set, ==,
		                cases[i].tls != NULL);
	}
}

/* Write @content to a fresh file of mode @mode; returns its path. */
static char *
write_mode(const char *content, int mode)
{
	char *path = write_tmp(content, -1);

	g_assert_cmpint(g_chmod(path, mode), ==, 0);
	return path;
}

static void
test_ca_file(void)
{
	g_autofree char *ca = write_mode("not parsed at load\n", 0644);
	g_autofree char *line = g_strdup_printf("ca_file = %s", ca);
	g_autofree char *dir_line = g_strdup_printf("ca_file = %s", tmp_dir);
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(GPtrArray) dir_errors = NULL;
	g_autoptr(AmConfig) c = load_with(IN_RELAY, line, &errors);
	g_autoptr(AmConfig) d = NULL;
	g_autofree char *want = NULL;

	g_assert_nonnull(c);
	g_assert_cmpstr(relay_at(c, 0)->ca_file, ==, ca);

	/* A directory is not a CA file; the error names it. */
	d = load_with(IN_RELAY, dir_line, &dir_errors);
	g_assert_null(d);
	g_assert_cmpuint(dir_errors->len, ==, 1);
	want = g_strdup_printf("] ca_file: \"%s\": cannot read: not a regular "
	                       "file",
	                       tmp_dir);
	g_assert_nonnull(strstr(g_ptr_array_index(dir_errors, 0), want));
}

#define SECRET "pa55 w0rd;#x"

/* Load a relay on 192.0.2.1 (tls verify) with @file as password file. */
static AmConfig *
load_auth(const char *file, const char *extra, GPtrArray **errors)
{
	g_autofree char *text = g_strdup_printf(
	    "[milter]\nsocket = unix:/run/s\n[relay:r]\nhost = 192.0.2.1\n"
	    "auth_user = milter@example.org\nauth_password_file = %s\n%s\n"
	    "[rule:a]\nrelay = r\narchive_to = j@a.example\n",
	    file, extra);
	g_autofree char *path = write_tmp(text, -1);

	return am_config_load(path, errors);
}

/* The first line is the password, with LF or CRLF, whatever follows. */
static void
test_auth_good(void)
{
	static const char *const contents[] = {
	    SECRET,
	    SECRET "\n",
	    SECRET "\r\n",
	    SECRET "\nsecond line\n",
	    SECRET "\r\nsecond\r\n",
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(contents); i++) {
		int mode = i % 2 == 0 ? 0600 : 0400;
		g_autofree char *pw = write_mode(contents[i], mode);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = load_auth(pw, "", &errors);
		const AmRelay *r;

		dump_errors(errors);
		g_assert_nonnull(c);
		r = relay_at(c, 0);
		g_assert_cmpstr(r->auth_user, ==, "milter@example.org");
		g_assert_cmpstr(r->auth_password_file, ==, pw);
		g_assert_cmpstr(r->auth_password, ==, SECRET);
		g_assert_false(r->auth_plaintext);
		g_assert_cmpint(r->tls, ==, SMTP_TLS_VERIFY);
	}
}

/* Every refusal names the file and the reason, never the password. */
static void
test_auth_bad(void)
{
	static const struct {
		const char *content;
		int mode;
		const char *why;
	} cases[] = {
	    {SECRET "\n", 0640, "\": mode 0640 lets the group or others read"},
	    {SECRET "\n", 0604, "\": mode 0604 lets the group or others read"},
	    {SECRET "\n", 0644, "\": mode 0644 lets the group or others read"},
	    {"\n" SECRET "\n", 0600,
	     "\": the first line (the password) is "
	     "empty"},
	    {"", 0600, "\": the first line (the password) is empty"},
	};
	g_autofree char *long_pw = g_strnfill(1025, 'p');
	gsize i;

	for (i = 0; i <= G_N_ELEMENTS(cases); i++) {
		gboolean last = i == G_N_ELEMENTS(cases);
		g_autofree char *pw =
		    write_mode(last ? long_pw : cases[i].content,
		               last ? 0600 : cases[i].mode);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = load_auth(pw, "", &errors);
		g_autofree char *want = g_strdup_printf(
		    ":6: [relay:r] auth_password_file: \"%s%s", pw,
		    last ? "\": the first line is longer than 1024 octets"
		         : cases[i].why);
		const char *e;

		dump_errors(errors);
		g_assert_null(c);
		g_assert_cmpuint(errors->len, ==, 1);
		e = g_ptr_array_index(errors, 0);
		g_assert_nonnull(strstr(e, want));
		g_assert_null(strstr(e, "pa55"));
		g_assert_null(strstr(e, "pppp"));
	}

	/* A directory, and a FIFO that would block a careless reader. */
	{
		g_autofree char *fifo = g_build_filename(tmp_dir, "fifo", NULL);
		const char *files[] = {tmp_dir, fifo};

		g_assert_cmpint(mkfifo(fifo, 0600), ==, 0);
		for (i = 0; i < G_N_ELEMENTS(files); i++) {
			g_autoptr(GPtrArray) errors = NULL;
			g_autoptr(AmConfig) c =
			    load_auth(files[i], "", &errors);
			g_autofree char *want = g_strdup_printf(
			    "auth_password_file: \"%s\": not a regular file",
			    files[i]);

			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(
			    strstr(g_ptr_array_index(errors, 0), want));
		}
		g_unlink(fifo);
	}
}

/* AUTH on a relay without TLS is refused unless auth_plaintext says. */
static void
test_auth_needs_tls(void)
{
	g_autofree char *pw = write_mode(SECRET "\n", 0600);
	static const struct {
		const char *extra;
		gboolean ok;
	} cases[] = {
	    {"tls = none", FALSE},
	    {"tls = none\nauth_plaintext = no", FALSE},
	    {"tls = none\nauth_plaintext = yes", TRUE},
	    {"tls = may", TRUE},
	    {"tls = encrypt", TRUE},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = load_auth(pw, cases[i].extra, &errors);

		g_test_message("%s", cases[i].extra);
		dump_errors(errors);
		if (cases[i].ok) {
			g_assert_nonnull(c);
			g_assert_cmpstr(relay_at(c, 0)->auth_password, ==,
			                SECRET);
		} else {
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(
			    strstr(g_ptr_array_index(errors, 0),
			           ":5: [relay:r] auth_user: AUTH "
			           "needs TLS, and tls is none: "));
		}
	}

	/* On loopback the error says the level came from the default. */
	{
		g_autofree char *line = g_strdup_printf(
		    "auth_user = u\nauth_password_file = %s", pw);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = load_with(IN_RELAY, line, &errors);

		g_assert_null(c);
		g_assert_cmpuint(errors->len, ==, 1);
		g_assert_nonnull(strstr(g_ptr_array_index(errors, 0),
		                        "tls is none (the default for a "
		                        "loopback host)"));
	}
}

static void
test_auth_plaintext(void)
{
	static const ValueCase cases[] = {
	    {"auth_plaintext = yes", 2},  {"auth_plaintext = no", 1},
	    {"auth_plaintext = Yes", 0},  {"auth_plaintext = 1", 0},
	    {"auth_plaintext = true", 0}, {"auth_plaintext =", 0},
	};

	run_value_table(IN_RELAY, "auth_plaintext", cases, G_N_ELEMENTS(cases),
	                relay_plaintext);
}

static void
test_sizes(void)
{
	static const ValueCase min[] = {
	    {"min_size = 0", 1},
	    {"min_size = 1000", 1001},
	    {"min_size = 1K", 1024 + 1},
	    {"min_size = 3k", 3 * 1024 + 1},
	    {"min_size = 5M", 5 * 1024 * 1024 + 1},
	    {"min_size = 2g", 2ULL * 1024 * 1024 * 1024 + 1},
	    /* 2^64 - 2^30 still fits; 2^64 overflows. */
	    {"min_size = 17179869183G", 18446744072635809792ULL + 1},
	    {"min_size = 17179869184G", 0},
	    {"min_size = 18446744073709551616", 0},
	    {"min_size = 10 M", 0},
	    {"min_size = 10MB", 0},
	    {"min_size = 10T", 0},
	    {"min_size = K", 0},
	    {"min_size = -1", 0},
	    {"min_size = 1.5M", 0},
	    {"min_size =", 0},
	};
	static const ValueCase mem[] = {
	    {"capture_memory_max = 0", 1},
	    {"capture_memory_max = 64K", 64 * 1024 + 1},
	    {"capture_memory_max = 16M", 16 * 1024 * 1024 + 1},
	    {"capture_memory_max = 1X", 0},
	    {"capture_memory_max =", 0},
	};

	run_value_table(IN_RULE, "min_size", min, G_N_ELEMENTS(min),
	                rule_min_size);
	run_value_table(IN_MILTER, "capture_memory_max", mem, G_N_ELEMENTS(mem),
	                capture_max);
}

/* Apart from the table: G_MAXUINT64 + 1 would wrap in its accessor. */
static void
test_size_max(void)
{
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = NULL;

	c = load_with(IN_RULE, "min_size = 18446744073709551615", &errors);
	g_assert_nonnull(c);
	g_assert_cmpuint(rule_at(c, 0)->min_size, ==, G_MAXUINT64);
}

typedef struct {
	const char *value;
	gboolean ok;
} ValidCase;

/* Replace the [milter] socket of BASE_CONF. */
static void
test_sockets(void)
{
	static const ValidCase cases[] = {
	    {"unix:/run/am.sock", TRUE},
	    {"local:/var/spool/postfix/am/sock", TRUE},
	    {"inet:8891@127.0.0.1", TRUE},
	    {"inet:8891@localhost", TRUE},
	    {"inet6:8891@::1", TRUE},
	    {"inet6:1@localhost", TRUE},
	    {"inet:65535@127.0.0.1", TRUE},
	    {"unix:relative/sock", FALSE},
	    {"unix:/", FALSE},
	    {"unix:", FALSE},
	    {"local:", FALSE},
	    {"/run/am.sock", FALSE},
	    {"inet:8891", FALSE},
	    {"inet:@127.0.0.1", FALSE},
	    {"inet:0@127.0.0.1", FALSE},
	    {"inet:70000@127.0.0.1", FALSE},
	    {"inet:8891@", FALSE},
	    {"inet:8891@::1", FALSE},
	    {"inet6:8891@127.0.0.1", FALSE},
	    {"inet:8891@[127.0.0.1]", FALSE},
	    {"inet6:8891@[::1]", FALSE},
	    {"inet:8891@local host", FALSE},
	    {"tcp:8891@127.0.0.1", FALSE},
	    {"INET:8891@127.0.0.1", FALSE},
	    {"", FALSE},
	};
	g_autofree char *long_path = g_strnfill(120, 'a');
	gsize i;

	for (i = 0; i <= G_N_ELEMENTS(cases); i++) {
		gboolean last = i == G_N_ELEMENTS(cases);
		g_autofree char *value =
		    last ? g_strconcat("unix:/", long_path, NULL)
		         : g_strdup(cases[i].value);
		gboolean ok = last ? FALSE : cases[i].ok;
		g_autofree char *text = g_strdup_printf(
		    "[milter]\nsocket = %s\n[relay:r]\nhost = 127.0.0.1\n"
		    "[rule:a]\nrelay = r\narchive_to = j@a.example\n",
		    value);
		g_autofree char *path = write_tmp(text, -1);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = am_config_load(path, &errors);

		g_test_message("socket = %s", value);
		dump_errors(errors);
		if (ok) {
			g_assert_nonnull(c);
			g_assert_cmpstr(c->socket, ==, value);
		} else {
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(strstr(g_ptr_array_index(errors, 0),
			                        ":2: [milter] socket: "));
		}
	}
}

static void
run_valid_table(int where, const char *key, const ValidCase *cases, gsize n,
                const char *(*field)(const AmConfig *))
{
	gsize i;

	for (i = 0; i < n; i++) {
		g_autofree char *line =
		    g_strdup_printf("%s = %s", key, cases[i].value);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		g_test_message("%s", line);
		c = load_with(where, line, &errors);
		dump_errors(errors);
		if (cases[i].ok) {
			g_assert_nonnull(c);
			g_assert_cmpstr(field(c), ==, cases[i].value);
		} else {
			g_autofree char *frag = g_strdup_printf("] %s: ", key);

			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(
			    strstr(g_ptr_array_index(errors, 0), frag));
		}
	}
}

static const char *
relay_host(const AmConfig *c)
{
	/* BASE_CONF's host line comes first; the test adds a second
	 * [relay:h] group so that the duplicate key check stays out. */
	return relay_at(c, 1)->host;
}

static void
test_hosts(void)
{
	static const ValidCase cases[] = {
	    {"127.0.0.1", TRUE},
	    {"::1", TRUE},
	    {"fe80::1", TRUE},
	    {"localhost", TRUE},
	    {"archive.example", TRUE},
	    {"archive.example.", TRUE},
	    {"a-1.b2.example", TRUE},
	    {"xn--bcher-kva.example", TRUE},
	    {"[127.0.0.1]", FALSE},
	    {"[::1]", FALSE},
	    {"archive example", FALSE},
	    {"999.1.1.1", FALSE},
	    {"1.2.3", FALSE},
	    {"-archive.example", FALSE},
	    {"archive-.example", FALSE},
	    {"archive..example", FALSE},
	    {".archive.example", FALSE},
	    {"arch_ive.example", FALSE},
	    {"archive.example:25", FALSE},
	    {"bücher.example", FALSE},
	    {"a@b", FALSE},
	};
	g_autofree char *long_label = g_strnfill(64, 'a');
	g_autofree char *ok_label = g_strnfill(63, 'a');
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases) + 2; i++) {
		gboolean extra = i >= G_N_ELEMENTS(cases);
		const char *host = !extra                     ? cases[i].value
		                   : i == G_N_ELEMENTS(cases) ? ok_label
		                                              : long_label;
		gboolean ok = !extra ? cases[i].ok : i == G_N_ELEMENTS(cases);
		g_autofree char *text = g_strdup_printf(
		    BASE_CONF, "", "", "[relay:h]\nhost = %s\n");
		g_autofree char *full = NULL;
		g_autofree char *path = NULL;
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		full = g_strdup_printf(text, host);
		path = write_tmp(full, -1);
		c = am_config_load(path, &errors);
		g_test_message("host = %s", host);
		dump_errors(errors);
		if (ok) {
			g_assert_nonnull(c);
			g_assert_cmpstr(relay_host(c), ==, host);
		} else {
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(strstr(g_ptr_array_index(errors, 0),
			                        ":11: [relay:h] host: "));
		}
	}
}

static const char *
relay_helo(const AmConfig *c)
{
	return relay_at(c, 0)->helo_name;
}

static void
test_helo_names(void)
{
	static const ValidCase cases[] = {
	    {"milter.example", TRUE},    {"localhost", TRUE},
	    {"[127.0.0.1]", TRUE},       {"[IPv6:::1]", TRUE},
	    {"127.0.0.1", FALSE},        {"[::1]", FALSE},
	    {"[IPv6:127.0.0.1]", FALSE}, {"[milter.example]", FALSE},
	    {"milter example", FALSE},   {"", FALSE},
	};

	run_valid_table(IN_RELAY, "helo_name", cases, G_N_ELEMENTS(cases),
	                relay_helo);
}

typedef struct {
	const char *value;
	const char *want; /* joined by '|'; NULL: must be an error */
} ListCase;

static void
test_archive_to(void)
{
	static const ListCase cases[] = {
	    {"a@x.example", "a@x.example"},
	    {"<a@x.example>", "a@x.example"},
	    {"a@x.example,b@x.example", "a@x.example|b@x.example"},
	    {"a@x.example, b@x.example", "a@x.example|b@x.example"},
	    {"a@x.example b@x.example\tc@x.example",
	     "a@x.example|b@x.example|c@x.example"},
	    {",a@x.example,,<b@x.example>,", "a@x.example|b@x.example"},
	    {"\"quoted\"@x.example", "\"quoted\"@x.example"},
	    {"jörg@bücher.example", NULL},
	    {"a@x.example, journal@bücher.example", NULL},
	    {"", NULL},
	    {",, ,", NULL},
	    {"<>", NULL},
	    {"a@x.example, <>", NULL},
	    {"<a@x.example", NULL},
	    {"a@x.example>", NULL},
	    {"<<a@x.example>>", NULL},
	    {"a<b>@x.example", NULL},
	    {"< a@x.example >", NULL},
	    {"nobody", NULL},
	    {"@x.example", NULL},
	    {"a@", NULL},
	    {"\"\"", NULL},
	    /* One '@' outside quotes, a dot-atom or quoted local part, a
	     * host name or an address literal after it. */
	    {"a@b@c", NULL},
	    {"a@x.example,a@b@c", NULL},
	    {"a@@x.example", NULL},
	    {"a.@x.example", NULL},
	    {".a@x.example", NULL},
	    {"a..b@x.example", NULL},
	    {"a(b)@x.example", NULL},
	    {"a@x..example", NULL},
	    {"a@-x.example", NULL},
	    {"a@x_y.example", NULL},
	    {"a@[999.1.1.1]", NULL},
	    {"\"a@b\"", NULL},
	    {"\"a@x.example", NULL},
	    {"\"a\"b@x.example", NULL},
	    {"\"a\"@", NULL},
	    {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	     "@x.example",
	     NULL},
	    {"\"a@b\"@x.example", "\"a@b\"@x.example"},
	    {"\"a\\\"@b\"@x.example", "\"a\\\"@b\"@x.example"},
	    {"\"\"@x.example", "\"\"@x.example"},
	    {"first.last+tag@x.example", "first.last+tag@x.example"},
	    {"o'brien!#$%&*/=?^_`{|}~-@x.example",
	     "o'brien!#$%&*/=?^_`{|}~-@x.example"},
	    {"a@[127.0.0.1]", "a@[127.0.0.1]"},
	    {"a@[IPv6:::1]", "a@[IPv6:::1]"},
	    {"a@localhost", "a@localhost"},
	    {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	     "@x.example",
	     "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	     "@x.example"},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		/* Replace BASE_CONF's archive_to, not add a second one. */
		g_autofree char *text = g_strdup_printf(
		    "[milter]\nsocket = unix:/run/s\n[relay:r]\n"
		    "host = 127.0.0.1\n[rule:a]\nrelay = r\n"
		    "archive_to = %s\n",
		    cases[i].value);
		g_autofree char *path = write_tmp(text, -1);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = am_config_load(path, &errors);

		g_test_message("archive_to = %s", cases[i].value);
		dump_errors(errors);
		if (cases[i].want != NULL) {
			g_autofree char *got = NULL;

			g_assert_nonnull(c);
			got = g_strjoinv("|", rule_at(c, 0)->archive_to);
			g_assert_cmpstr(got, ==, cases[i].want);
		} else {
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(strstr(g_ptr_array_index(errors, 0),
			                        ":7: [rule:a] archive_to: "));
		}
	}
}

static void
test_archive_from(void)
{
	static const ListCase cases[] = {
	    {"", ""},
	    {"<>", ""},
	    /* As the example documents it: the quotes arrive with it. */
	    {"\"\"", ""},
	    {"\"\"\"", NULL},
	    {"\"\"@x.example", "\"\"@x.example"},
	    {"a@b@x.example", NULL},
	    {"\"a@b\"@x.example", "\"a@b\"@x.example"},
	    {"milter@x.example", "milter@x.example"},
	    {"<milter@x.example>", "milter@x.example"},
	    {"a@x.example,b@x.example", NULL},
	    {"a@x.example b@x.example", NULL},
	    {"<milter@x.example", NULL},
	    {"<<>>", NULL},
	    {"milter", NULL},
	    {"a<b>@x.example", NULL},
	    {"jörg@x.example", NULL},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *line =
		    g_strdup_printf("archive_from = %s", cases[i].value);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		g_test_message("%s", line);
		c = load_with(IN_RULE, line, &errors);
		dump_errors(errors);
		if (cases[i].want != NULL) {
			g_assert_nonnull(c);
			g_assert_cmpstr(rule_at(c, 0)->archive_from, ==,
			                cases[i].want);
		} else {
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(strstr(g_ptr_array_index(errors, 0),
			                        "] archive_from: "));
		}
	}
}

/*
 * A non-ASCII address would make every copy of plain mail fail (copies
 * go without SMTPUTF8 unless the original had it): the load refuses it
 * and says so.
 */
static void
test_non_ascii(void)
{
	static const char *const lines[][2] = {
	    {"archive_to = jörg@x.example",
	     ":8: [rule:a] archive_to: \"jörg@x.example\": "},
	    {"archive_to = a@x.example, b@bücher.example",
	     ":8: [rule:a] archive_to: \"b@bücher.example\": "},
	    {"archive_from = <müller@x.example>",
	     ":8: [rule:a] archive_from: \"<müller@x.example>\": "},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(lines); i++) {
		g_autofree char *text = g_strdup_printf(
		    "[milter]\nsocket = unix:/run/s\n[relay:r]\n"
		    "host = 127.0.0.1\n[rule:a]\nrelay = r\n%s\n%s\n",
		    g_str_has_prefix(lines[i][0], "archive_to")
		        ? ""
		        : "archive_to = j@x.example",
		    lines[i][0]);
		g_autofree char *path = write_tmp(text, -1);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = am_config_load(path, &errors);
		const char *e;

		dump_errors(errors);
		g_assert_null(c);
		g_assert_cmpuint(errors->len, ==, 1);
		e = g_ptr_array_index(errors, 0);
		g_assert_nonnull(strstr(e, lines[i][1]));
		g_assert_nonnull(strstr(e, "non-ASCII address: copies of "
		                           "plain mail are sent without "
		                           "SMTPUTF8"));
	}
}

/*
 * 100,000 addresses on one line load whole and in order.  The split is
 * a single pass by construction (split_list); before, a regular
 * expression split took 27 s for 80,000.  No clock is asserted: the
 * test's own timeout is the bound.
 */
static void
test_archive_to_large(void)
{
	const guint n = 100000;
	g_autoptr(GString) text = g_string_new(
	    "[milter]\nsocket = unix:/run/s\n[relay:r]\nhost = 127.0.0.1\n"
	    "[rule:a]\nrelay = r\narchive_to =");
	g_autofree char *path = NULL;
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = NULL;
	char **to;
	guint i;

	for (i = 0; i < n; i++)
		g_string_append_printf(text, "%s a%u@x.example",
		                       i % 2 ? "," : "", i);
	g_string_append_c(text, '\n');
	path = write_tmp(text->str, text->len);
	c = am_config_load(path, &errors);
	dump_errors(errors);
	g_assert_nonnull(c);
	to = rule_at(c, 0)->archive_to;
	g_assert_cmpuint(g_strv_length(to), ==, n);
	for (i = 0; i < n; i += 9973) {
		g_autofree char *want = g_strdup_printf("a%u@x.example", i);

		g_assert_cmpstr(to[i], ==, want);
	}
	g_assert_cmpstr(to[n - 1], ==, "a99999@x.example");
}

/* ---- the spool's keys ------------------------------------------------- */

static guint64
workers(const AmConfig *c)
{
	return c->workers;
}

static guint64
min_free(const AmConfig *c)
{
	return c->spool_min_free + 1;
}

static guint64
max_age(const AmConfig *c)
{
	return c->spool_max_age_s;
}

static guint64
retry_min(const AmConfig *c)
{
	return c->spool_retry_min_s;
}

static guint64
retry_max(const AmConfig *c)
{
	return c->spool_retry_max_s;
}

static void
test_workers(void)
{
	static const ValueCase cases[] = {
	    {"workers = 1", 1},   {"workers = 4", 4},    {"workers = 64", 64},
	    {"workers = 0", 0},   {"workers = 65", 0},   {"workers = -1", 0},
	    {"workers = 2x", 0},  {"workers = 4.0", 0},  {"workers =", 0},
	    {"workers = 1e1", 0}, {"workers = 0x10", 0},
	};

	run_value_table(IN_MILTER, "workers", cases, G_N_ELEMENTS(cases),
	                workers);
}

static void
test_spool_min_free(void)
{
	static const ValueCase cases[] = {
	    {"spool_min_free = 0", 1},
	    {"spool_min_free = 100M", 100 * 1024 * 1024 + 1},
	    {"spool_min_free = 2G", 2ULL * 1024 * 1024 * 1024 + 1},
	    {"spool_min_free = 512k", 512 * 1024 + 1},
	    {"spool_min_free = 1T", 0},
	    {"spool_min_free = -1", 0},
	    {"spool_min_free = 1.5G", 0},
	    {"spool_min_free =", 0},
	};

	run_value_table(IN_MILTER, "spool_min_free", cases, G_N_ELEMENTS(cases),
	                min_free);
}

/* Durations: plain seconds or one unit; the three keys alike. */
static void
test_durations(void)
{
	static const struct {
		const char *value;
		guint64 want; /* seconds; 0: must be an error */
	} cases[] = {
	    {"1", 1},
	    {"60", 60},
	    {"90s", 90},
	    {"10m", 600},
	    {"1h", 3600},
	    {"5d", 432000},
	    {"365d", 365 * 86400},
	    {"31536000", 31536000},
	    {"0", 0},
	    {"0s", 0},
	    {"366d", 0},
	    {"31536001", 0},
	    {"99999999999999999999d", 0},
	    {"1.5h", 0},
	    {"1w", 0},
	    {"1H", 0},
	    {"1 h", 0},
	    {"h", 0},
	    {"1hs", 0},
	    {"-1", 0},
	    {"", 0},
	};
	static const struct {
		const char *key;
		guint64 (*field)(const AmConfig *);
	} keys[] = {
	    {"spool_max_age", max_age},
	    {"spool_retry_min", retry_min},
	    {"spool_retry_max", retry_max},
	};
	gsize i, j;

	for (j = 0; j < G_N_ELEMENTS(keys); j++) {
		for (i = 0; i < G_N_ELEMENTS(cases); i++) {
			g_autofree char *line = NULL;
			g_autoptr(GPtrArray) errors = NULL;
			g_autoptr(AmConfig) c = NULL;

			/* The retry range check stays out of the way. */
			if (strcmp(keys[j].key, "spool_retry_min") == 0)
				line = g_strdup_printf("%s = %s\n"
				                       "spool_retry_max = 365d",
				                       keys[j].key,
				                       cases[i].value);
			else if (strcmp(keys[j].key, "spool_retry_max") == 0)
				line = g_strdup_printf("%s = %s\n"
				                       "spool_retry_min = 1",
				                       keys[j].key,
				                       cases[i].value);
			else
				line = g_strdup_printf("%s = %s", keys[j].key,
				                       cases[i].value);
			g_test_message("%s", line);
			c = load_with(IN_MILTER, line, &errors);
			dump_errors(errors);
			if (cases[i].want == 0) {
				g_autofree char *frag = g_strdup_printf(
				    ":3: [milter] %s: \"%s\": must be a whole "
				    "number of seconds",
				    keys[j].key, cases[i].value);

				g_assert_null(c);
				g_assert_cmpuint(errors->len, ==, 1);
				g_assert_nonnull(
				    strstr(g_ptr_array_index(errors, 0), frag));
			} else {
				g_assert_nonnull(c);
				g_assert_cmpuint(keys[j].field(c), ==,
				                 cases[i].want);
			}
		}
	}
}

/* spool_retry_min <= spool_retry_max, defaults included. */
static void
test_retry_range(void)
{
	static const struct {
		const char *lines;
		const char *error; /* NULL: loads */
	} cases[] = {
	    {"spool_retry_min = 1h\nspool_retry_max = 1h", NULL},
	    {"spool_retry_min = 1h", NULL},
	    {"spool_retry_max = 60", NULL},
	    {"spool_retry_min = 30\nspool_retry_max = 45", NULL},
	    {"spool_retry_min = 2h\nspool_retry_max = 1h",
	     ":4: [milter] spool_retry_max: 3600s is shorter than "
	     "spool_retry_min (7200s): the longest retry delay cannot be "
	     "below the first"},
	    {"spool_retry_max = 59",
	     ":3: [milter] spool_retry_max: 59s is shorter than "
	     "spool_retry_min (60s, the default): "},
	    {"spool_retry_min = 3601",
	     ":3: [milter] spool_retry_min: 3601s is longer than "
	     "spool_retry_max (3600s, the default): "},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		g_test_message("%s", cases[i].lines);
		c = load_with(IN_MILTER, cases[i].lines, &errors);
		dump_errors(errors);
		if (cases[i].error == NULL) {
			g_assert_nonnull(c);
			g_assert_cmpuint(c->spool_retry_min_s, <=,
			                 c->spool_retry_max_s);
		} else {
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(strstr(g_ptr_array_index(errors, 0),
			                        cases[i].error));
		}
	}
}

static void
test_spool_paths(void)
{
	static const struct {
		const char *line;
		const char *spool_dir; /* NULL: must be an error */
		const char *pid_file;
	} cases[] = {
	    {"spool_dir = /var/spool/am", "/var/spool/am", NULL},
	    {"pid_file = /run/am.pid", "/var/spool/archive-milter",
	     "/run/am.pid"},
	    {"spool_dir = spool", NULL, NULL},
	    {"spool_dir = ./spool", NULL, NULL},
	    {"spool_dir =", NULL, NULL},
	    {"pid_file = am.pid", NULL, NULL},
	    {"pid_file =", NULL, NULL},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		g_test_message("%s", cases[i].line);
		c = load_with(IN_MILTER, cases[i].line, &errors);
		dump_errors(errors);
		if (cases[i].spool_dir != NULL) {
			g_assert_nonnull(c);
			g_assert_cmpstr(c->spool_dir, ==, cases[i].spool_dir);
			g_assert_cmpstr(c->pid_file, ==, cases[i].pid_file);
		} else {
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(strstr(g_ptr_array_index(errors, 0),
			                        ":3: [milter] "));
		}
	}
}

/* ---- delivery, the policy keys, reject_text --------------------------- */

static guint64
rule_delivery(const AmConfig *c)
{
	return rule_at(c, 0)->delivery + 1;
}

static void
test_delivery(void)
{
	static const ValueCase cases[] = {
	    {"delivery = sync", AM_DELIVERY_SYNC + 1},
	    {"delivery = spool", AM_DELIVERY_SPOOL + 1},
	    {"delivery = Spool", 0},
	    {"delivery = async", 0},
	    {"delivery =", 0},
	};

	run_value_table(IN_RULE, "delivery", cases, G_N_ELEMENTS(cases),
	                rule_delivery);
}

/* Every on_OUTCOME key lands in its own slot and nowhere else. */
static void
test_policy_keys(void)
{
	guint i, j;

	for (i = 0; i < AM_OUTCOME_COUNT; i++) {
		g_autofree char *line = g_strdup_printf("on_%s = accept+header",
		                                        am_outcome_name(i));
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;
		const AmRule *r;

		g_test_message("%s", line);
		c = load_with(IN_RULE, line, &errors);
		dump_errors(errors);
		g_assert_nonnull(c);
		r = rule_at(c, 0);
		g_assert_cmpuint(r->on_failure, ==, 0);
		for (j = 0; j < AM_OUTCOME_COUNT; j++)
			g_assert_cmpuint(
			    r->actions[j], ==,
			    i == j ? AM_ACTION_ACCEPT | AM_ACTION_HEADER : 0);
	}
}

/*
 * A key's action is checked against the rule's delivery wherever the
 * delivery key is written, and the error names the key and the value.
 */
static void
test_policy_delivery(void)
{
	static const struct {
		const char *lines;
		const char *error; /* NULL: loads */
	} cases[] = {
	    {"on_timeout = reject\ndelivery = sync", NULL},
	    {"on_timeout = reject\ndelivery = spool",
	     ":10: [rule:a] on_timeout: \"reject\": with delivery = spool "},
	    {"delivery = spool\non_failure = spool+header",
	     ":11: [rule:a] on_failure: \"spool+header\": with delivery = "
	     "spool the original is already accepted when the copy's "
	     "outcome is known, so header cannot apply; "},
	    {"delivery = spool\non_sent = accept+header",
	     ":11: [rule:a] on_sent: \"accept+header\": with delivery = "
	     "spool "},
	    {"delivery = spool\non_unreachable = tempfail\n"
	     "on_data_error = accept\non_timeout = spool",
	     NULL},
	    /* A bad delivery is one error; the actions are read as sync. */
	    {"delivery = later\non_timeout = reject",
	     ":10: [rule:a] delivery: \"later\": must be sync or spool"},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		g_test_message("%s", cases[i].lines);
		c = load_with(IN_RULE, cases[i].lines, &errors);
		dump_errors(errors);
		if (cases[i].error == NULL) {
			g_assert_nonnull(c);
		} else {
			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(strstr(g_ptr_array_index(errors, 0),
			                        cases[i].error));
		}
	}
}

static void
test_reject_text(void)
{
	g_autofree char *long_ok = g_strnfill(200, 'x');
	g_autofree char *too_long = g_strnfill(201, 'x');
	const struct {
		const char *value;
		const char *error; /* NULL: loads with the value */
	} cases[] = {
	    {"Message not archived, contact postmaster@x.example", NULL},
	    {"  trimmed  ", NULL},
	    {long_ok, NULL},
	    {too_long, "201 characters: an SMTP reply text here may have "
	               "at most 200"},
	    {"", "must not be empty"},
	    {"100% archived", "'%' is not allowed: libmilter reads it as a "
	                      "format character"},
	    {"Nachricht nicht übernommen",
	     "must be printable ASCII: an SMTP reply carries no other "
	     "characters"},
	    {"tab\tinside", "must be printable ASCII"},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *line =
		    g_strdup_printf("reject_text = %s", cases[i].value);
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = NULL;

		g_test_message("%s", line);
		c = load_with(IN_RULE, line, &errors);
		dump_errors(errors);
		if (cases[i].error == NULL) {
			g_autofree char *want =
			    g_strstrip(g_strdup(cases[i].value));

			g_assert_nonnull(c);
			g_assert_cmpstr(rule_at(c, 0)->reject_text, ==, want);
		} else {
			g_autofree char *frag = g_strconcat(
			    ":10: [rule:a] reject_text: ", cases[i].error,
			    NULL);

			g_assert_null(c);
			g_assert_cmpuint(errors->len, ==, 1);
			g_assert_nonnull(
			    strstr(g_ptr_array_index(errors, 0), frag));
		}
	}
}

/* ---- am_action_parse, am_action_format, am_rule_action ----------------- */

#define A       AM_ACTION_ACCEPT
#define T       AM_ACTION_TEMPFAIL
#define R       AM_ACTION_REJECT
#define Q       AM_ACTION_QUARANTINE
#define S       AM_ACTION_SPOOL
#define H       AM_ACTION_HEADER
#define FAILURE AM_OUTCOME_COUNT /* the on_failure key */

typedef struct {
	const char *text;
	AmOutcome outcome;
	AmDeliveryMode delivery;
	guint want;         /* 0: must fail */
	const char *reason; /* when failing: a fragment of the reason */
} ActionCase;

static const ActionCase action_cases[] = {
    /* Every valid set, in sync mode, for a failure. */
    {"accept", FAILURE, AM_DELIVERY_SYNC, A, NULL},
    {"accept+header", FAILURE, AM_DELIVERY_SYNC, A | H, NULL},
    {"header+accept", FAILURE, AM_DELIVERY_SYNC, A | H, NULL},
    {"header", FAILURE, AM_DELIVERY_SYNC, A | H, NULL},
    {"tempfail", FAILURE, AM_DELIVERY_SYNC, T, NULL},
    {"reject", FAILURE, AM_DELIVERY_SYNC, R, NULL},
    {"spool", FAILURE, AM_DELIVERY_SYNC, S, NULL},
    {"spool+header", FAILURE, AM_DELIVERY_SYNC, S | H, NULL},
    {"spool+quarantine", FAILURE, AM_DELIVERY_SYNC, S | Q, NULL},
    {"quarantine+spool", FAILURE, AM_DELIVERY_SYNC, S | Q, NULL},
    {"spool+quarantine+header", FAILURE, AM_DELIVERY_SYNC, S | Q | H, NULL},
    {"header+quarantine+spool", FAILURE, AM_DELIVERY_SYNC, S | Q | H, NULL},
    {" spool + header ", FAILURE, AM_DELIVERY_SYNC, S | H, NULL},
    {"reject", AM_OUTCOME_UNREACHABLE, AM_DELIVERY_SYNC, R, NULL},
    {"spool+quarantine", AM_OUTCOME_TLS_ERROR, AM_DELIVERY_SYNC, S | Q, NULL},

    /* Names. */
    {"", FAILURE, AM_DELIVERY_SYNC, 0,
     "no action; the actions are accept, "
     "tempfail, reject, quarantine, spool "
     "and header"},
    {"bounce", FAILURE, AM_DELIVERY_SYNC, 0,
     "unknown action \"bounce\"; the actions are accept, tempfail, reject, "
     "quarantine, spool and header"},
    {"accept,header", FAILURE, AM_DELIVERY_SYNC, 0,
     "unknown action \"accept,header\""},
    {"accept header", FAILURE, AM_DELIVERY_SYNC, 0,
     "unknown action \"accept header\""},
    {"Accept", FAILURE, AM_DELIVERY_SYNC, 0,
     "action names are written in lower case: accept"},
    {"spool+HEADER", FAILURE, AM_DELIVERY_SYNC, 0,
     "action names are written in lower case: header"},
    {"+accept", FAILURE, AM_DELIVERY_SYNC, 0, "an action name is missing"},
    {"accept+", FAILURE, AM_DELIVERY_SYNC, 0, "an action name is missing"},
    {"spool++header", FAILURE, AM_DELIVERY_SYNC, 0,
     "an action name is missing"},
    {"+", FAILURE, AM_DELIVERY_SYNC, 0, "an action name is missing"},
    {"header+header", FAILURE, AM_DELIVERY_SYNC, 0,
     "\"header\" is named twice"},
    {"spool+header+spool", FAILURE, AM_DELIVERY_SYNC, 0,
     "\"spool\" is named twice"},

    /* Combinations. */
    {"reject+header", FAILURE, AM_DELIVERY_SYNC, 0,
     "reject refuses the original, so it cannot be combined"},
    {"tempfail+reject", FAILURE, AM_DELIVERY_SYNC, 0,
     "reject refuses the original"},
    {"tempfail+header", FAILURE, AM_DELIVERY_SYNC, 0,
     "tempfail asks the sender to try again later, so it cannot be "
     "combined"},
    {"tempfail+spool", FAILURE, AM_DELIVERY_SYNC, 0,
     "tempfail asks the sender"},
    {"accept+spool", FAILURE, AM_DELIVERY_SYNC, 0,
     "accept and spool cannot be combined"},
    {"accept+spool+header", FAILURE, AM_DELIVERY_SYNC, 0,
     "accept and spool cannot be combined"},
    {"quarantine", FAILURE, AM_DELIVERY_SYNC, 0,
     "quarantine needs spool as well (spool+quarantine): Postfix does not "
     "pass a held message through the milters again"},
    {"accept+quarantine", FAILURE, AM_DELIVERY_SYNC, 0,
     "quarantine needs spool"},
    {"quarantine+header", FAILURE, AM_DELIVERY_SYNC, 0,
     "quarantine needs spool"},
    {"reject+quarantine", FAILURE, AM_DELIVERY_SYNC, 0, "reject refuses"},

    /* on_sent: accept, optionally with the header. */
    {"accept", AM_OUTCOME_SENT, AM_DELIVERY_SYNC, A, NULL},
    {"accept+header", AM_OUTCOME_SENT, AM_DELIVERY_SYNC, A | H, NULL},
    {"header", AM_OUTCOME_SENT, AM_DELIVERY_SYNC, A | H, NULL},
    {"accept", AM_OUTCOME_SENT, AM_DELIVERY_SPOOL, A, NULL},
    {"tempfail", AM_OUTCOME_SENT, AM_DELIVERY_SYNC, 0,
     "the copy was confirmed, so there is nothing to retry, hold or "
     "refuse: use accept or accept+header"},
    {"reject", AM_OUTCOME_SENT, AM_DELIVERY_SYNC, 0, "the copy was confirmed"},
    {"spool", AM_OUTCOME_SENT, AM_DELIVERY_SYNC, 0, "the copy was confirmed"},
    {"spool+header", AM_OUTCOME_SENT, AM_DELIVERY_SYNC, 0,
     "the copy was confirmed"},
    {"spool+quarantine", AM_OUTCOME_SENT, AM_DELIVERY_SYNC, 0,
     "the copy was confirmed"},
    {"tempfail", AM_OUTCOME_SENT, AM_DELIVERY_SPOOL, 0,
     "the copy was confirmed"},
    {"accept+header", AM_OUTCOME_SENT, AM_DELIVERY_SPOOL, 0,
     "with delivery = spool the original is already accepted when the "
     "copy's outcome is known, so header cannot apply; use tempfail or "
     "spool (retry later) or accept (stop retrying, the copy is kept in "
     "hold/)"},

    /* delivery = spool: retry or stop only. */
    {"tempfail", FAILURE, AM_DELIVERY_SPOOL, T, NULL},
    {"spool", FAILURE, AM_DELIVERY_SPOOL, S, NULL},
    {"accept", FAILURE, AM_DELIVERY_SPOOL, A, NULL},
    {"accept", AM_OUTCOME_ALL_REFUSED, AM_DELIVERY_SPOOL, A, NULL},
    {"tempfail", AM_OUTCOME_TIMEOUT, AM_DELIVERY_SPOOL, T, NULL},
    {"reject", AM_OUTCOME_DATA_ERROR, AM_DELIVERY_SPOOL, 0,
     "so reject cannot apply"},
    {"spool+quarantine", FAILURE, AM_DELIVERY_SPOOL, 0,
     "so quarantine cannot apply"},
    {"spool+header", FAILURE, AM_DELIVERY_SPOOL, 0, "so header cannot apply"},
    {"accept+header", FAILURE, AM_DELIVERY_SPOOL, 0, "so header cannot apply"},
    {"header", AM_OUTCOME_SOME_REFUSED, AM_DELIVERY_SPOOL, 0,
     "so header cannot apply"},
};

static void
test_action_parse(void)
{
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(action_cases); i++) {
		const ActionCase *t = &action_cases[i];
		g_autofree char *why = NULL;
		guint got = 0xdead;
		gboolean ok;

		g_test_message("\"%s\" for %s, delivery %s", t->text,
		               am_outcome_name(t->outcome),
		               am_delivery_mode_name(t->delivery));
		ok = am_action_parse(t->text, t->outcome, t->delivery, &got,
		                     &why);
		if (t->want != 0) {
			g_assert_true(ok);
			g_assert_null(why);
			g_assert_cmpuint(got, ==, t->want);
		} else {
			g_assert_false(ok);
			/* Untouched on failure. */
			g_assert_cmpuint(got, ==, 0xdead);
			g_assert_nonnull(why);
			if (strstr(why, t->reason) == NULL)
				g_error("\"%s\": reason \"%s\" lacks \"%s\"",
				        t->text, why, t->reason);
		}
		/* @why is optional. */
		g_assert_cmpint(am_action_parse(t->text, t->outcome,
		                                t->delivery, &got, NULL),
		                ==, ok);
	}
}

/* Each failure outcome takes the same sets as on_failure. */
static void
test_action_parse_outcomes(void)
{
	static const char *const texts[] = {
	    "accept",
	    "accept+header",
	    "tempfail",
	    "reject",
	    "spool",
	    "spool+header",
	    "spool+quarantine",
	    "spool+quarantine+header",
	    "quarantine",
	    "accept+spool",
	    "reject+header",
	};
	guint o, d, i;

	for (o = AM_OUTCOME_SOME_REFUSED; o < AM_OUTCOME_COUNT; o++) {
		for (d = AM_DELIVERY_SYNC; d <= AM_DELIVERY_SPOOL; d++) {
			for (i = 0; i < G_N_ELEMENTS(texts); i++) {
				guint a = 0, b = 0;
				gboolean x, y;

				x = am_action_parse(texts[i], o, d, &a, NULL);
				y = am_action_parse(texts[i], FAILURE, d, &b,
				                    NULL);
				g_assert_cmpint(x, ==, y);
				g_assert_cmpuint(a, ==, b);
			}
		}
	}
}

static void
test_action_format(void)
{
	static const struct {
		guint actions;
		const char *text;
	} cases[] = {
	    {0, "default"},
	    {A, "accept"},
	    {A | H, "accept+header"},
	    {T, "tempfail"},
	    {R, "reject"},
	    {S, "spool"},
	    {S | H, "spool+header"},
	    {S | Q, "spool+quarantine"},
	    {S | Q | H, "spool+quarantine+header"},
	    {A | T | R | Q | S | H,
	     "accept+tempfail+reject+spool+quarantine+header"},
	    /* Bits without a name are left out. */
	    {S | (1u << 20), "spool"},
	};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *got = am_action_format(cases[i].actions);

		g_assert_cmpstr(got, ==, cases[i].text);
	}

	/* What format prints, parse reads back. */
	for (i = 0; i < G_N_ELEMENTS(action_cases); i++) {
		const ActionCase *t = &action_cases[i];
		g_autofree char *text = NULL;
		guint again = 0;

		if (t->want == 0)
			continue;
		text = am_action_format(t->want);
		g_assert_true(am_action_parse(text, t->outcome, t->delivery,
		                              &again, NULL));
		g_assert_cmpuint(again, ==, t->want);
	}
}

/*
 * Every outcome x temporary/permanent x sync/spool, with the outcome's
 * own key set, unset, or only on_failure set.
 */
static void
test_rule_action(void)
{
	/* Values that differ from every default. */
	const guint own[2] = {[AM_DELIVERY_SYNC] = R, [AM_DELIVERY_SPOOL] = T};
	const guint fail[2] = {
	    [AM_DELIVERY_SYNC] = S | Q | H, [AM_DELIVERY_SPOOL] = A};
	guint o, d, temp, setting;

	for (o = 0; o < AM_OUTCOME_COUNT; o++) {
		for (d = AM_DELIVERY_SYNC; d <= AM_DELIVERY_SPOOL; d++) {
			for (temp = 0; temp < 2; temp++) {
				for (setting = 0; setting < 4; setting++) {
					AmRule rule = {0};
					guint want, sent_own = A | H;

					rule.delivery = d;
					/* 0: nothing set; 1: on_OUTCOME;
					 * 2: on_failure; 3: both. */
					if (setting & 1)
						rule.actions[o] =
						    o == AM_OUTCOME_SENT
						        ? sent_own
						        : own[d];
					if (setting & 2)
						rule.on_failure = fail[d];
					/* Another outcome's key changes
					 * nothing here. */
					rule.actions[(o + 1) %
					             AM_OUTCOME_COUNT] = A | H;

					if (setting & 1)
						want = rule.actions[o];
					else if (o == AM_OUTCOME_SENT)
						want = A;
					else if (setting & 2)
						want = fail[d];
					else if (!temp)
						want = A;
					else if (d == AM_DELIVERY_SPOOL)
						want = S;
					else
						want = T;
					g_test_message(
					    "%s %s %s setting %u",
					    am_outcome_name(o),
					    temp ? "temporary" : "permanent",
					    am_delivery_mode_name(d), setting);
					g_assert_cmpuint(
					    am_rule_action(&rule, o, temp), ==,
					    want);
				}
			}
		}
	}
}

/* The defaults spelled out once, as the README will state them. */
static void
test_rule_action_defaults(void)
{
	AmRule sync = {.delivery = AM_DELIVERY_SYNC};
	AmRule spool = {.delivery = AM_DELIVERY_SPOOL};

	g_assert_cmpuint(am_rule_action(&sync, AM_OUTCOME_SENT, FALSE), ==, A);
	g_assert_cmpuint(am_rule_action(&spool, AM_OUTCOME_SENT, TRUE), ==, A);
	g_assert_cmpuint(am_rule_action(&sync, AM_OUTCOME_UNREACHABLE, TRUE),
	                 ==, T);
	g_assert_cmpuint(am_rule_action(&spool, AM_OUTCOME_UNREACHABLE, TRUE),
	                 ==, S);
	g_assert_cmpuint(am_rule_action(&sync, AM_OUTCOME_ALL_REFUSED, FALSE),
	                 ==, A);
	g_assert_cmpuint(am_rule_action(&spool, AM_OUTCOME_ALL_REFUSED, FALSE),
	                 ==, A);
}

#undef A
#undef T
#undef R
#undef Q
#undef S
#undef H
#undef FAILURE

/* ---- file-level behaviour -------------------------------------------- */

static void
test_unreadable(void)
{
	g_autofree char *missing = g_strconcat(tmp_dir, "/missing.conf", NULL);
	g_autofree char *dir = case_path("cases", NULL);
	const char *paths[] = {missing, dir};
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(paths); i++) {
		g_autoptr(GPtrArray) errors = NULL;
		g_autoptr(AmConfig) c = am_config_load(paths[i], &errors);
		g_autofree char *prefix =
		    g_strconcat(paths[i], ": cannot read: ", NULL);

		dump_errors(errors);
		g_assert_null(c);
		g_assert_cmpuint(errors->len, ==, 1);
		g_assert_true(
		    g_str_has_prefix(g_ptr_array_index(errors, 0), prefix));
	}
}

/* A file saved with CRLF line ends loads, and no CR reaches a value. */
static void
test_crlf(void)
{
	static const char text[] = "; written on another system\r\n"
	                           "[milter]\r\n"
	                           "socket = unix:/run/s\r\n"
	                           "\r\n"
	                           "[relay:r]\r\n"
	                           "host = 127.0.0.1\r\n"
	                           "port = 2525\r\n"
	                           "[rule:a]\r\n"
	                           "relay = r\r\n"
	                           "archive_to = a@x.example, b@x.example\r\n"
	                           "archive_from = <>\r\n";
	g_autofree char *path = write_tmp(text, -1);
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = am_config_load(path, &errors);

	dump_errors(errors);
	g_assert_nonnull(c);
	g_assert_cmpstr(c->socket, ==, "unix:/run/s");
	g_assert_cmpuint(relay_at(c, 0)->port, ==, 2525);
	g_assert_cmpstrv(
	    rule_at(c, 0)->archive_to,
	    ((const char *const[]){"a@x.example", "b@x.example", NULL}));
	g_assert_cmpstr(rule_at(c, 0)->archive_from, ==, "");
}

/*
 * A lone CR, a NUL byte, other control characters and invalid UTF-8 are
 * errors of their line (a CR inside an address would be SMTP injection),
 * and the lines around them are still read and checked.
 */
static void
test_bad_bytes(void)
{
	static const char text[] =
	    "[milter]\n"
	    "socket = unix:/run/s\n"
	    "[relay:r]\n"
	    "host = 127.0.0.1\n"
	    "port = 0\n"
	    "[rule:a]\n"
	    "relay = r\n"
	    "archive_to = a@x.example\rRCPT TO:<b@x.example>\n"
	    "archive_from = \0evil\n"
	    "match_header = caf\xe9\n"
	    "on_failure = \x1b[1maccept\n"
	    "mode = \x7f\n";
	g_autofree char *path = write_tmp(text, sizeof(text) - 1);
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = am_config_load(path, &errors);
	static const char *const want[] = {
	    ":5: [relay:r] port: ",
	    ":6: [rule:a] archive_to: missing required key",
	    ":8: control character, NUL byte or invalid UTF-8 in line",
	    ":9: control character, NUL byte or invalid UTF-8 in line",
	    ":10: control character, NUL byte or invalid UTF-8 in line",
	    ":11: control character, NUL byte or invalid UTF-8 in line",
	    ":12: control character, NUL byte or invalid UTF-8 in line",
	};
	gsize i;

	dump_errors(errors);
	g_assert_null(c);
	g_assert_cmpuint(errors->len, ==, G_N_ELEMENTS(want));
	for (i = 0; i < errors->len; i++)
		g_assert_nonnull(strstr(g_ptr_array_index(errors, i), want[i]));
}

/* @errors may be NULL; the result is unchanged. */
static void
test_errors_optional(void)
{
	g_autofree char *bad = case_path("cases", "bad-port.conf");
	g_autofree char *good = case_path("good", "minimal.conf");
	g_autoptr(AmConfig) c1 = am_config_load(bad, NULL);
	g_autoptr(AmConfig) c2 = am_config_load(good, NULL);

	g_assert_null(c1);
	g_assert_nonnull(c2);
}

/* A good load hands back an empty array, not NULL. */
static void
test_errors_empty(void)
{
	g_autofree char *good = case_path("good", "minimal.conf");
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = am_config_load(good, &errors);

	g_assert_nonnull(c);
	g_assert_nonnull(errors);
	g_assert_cmpuint(errors->len, ==, 0);
}

static void
test_find_relay(void)
{
	g_autofree char *path = case_path("good", "full.conf");
	g_autoptr(AmConfig) c = am_config_load(path, NULL);

	g_assert_nonnull(c);
	g_assert_true(am_config_find_relay(c, "primary") == relay_at(c, 0));
	g_assert_true(am_config_find_relay(c, "v6_relay-2.b") ==
	              relay_at(c, 1));
	g_assert_null(am_config_find_relay(c, "Primary"));
	g_assert_null(am_config_find_relay(c, "relay:primary"));
	g_assert_null(am_config_find_relay(c, ""));
}

static void
test_names(void)
{
	static const char *const outcomes[] = {
	    "sent",       "some_refused", "all_refused", "sender_refused",
	    "data_error", "unreachable",  "timeout",     "tls_error",
	};
	guint i;

	g_assert_cmpstr(am_mode_name(AM_MODE_JOURNAL), ==, "journal");
	g_assert_cmpstr(am_mode_name((AmMode)42), ==, "unknown");
	g_assert_cmpstr(am_delivery_mode_name(AM_DELIVERY_SYNC), ==, "sync");
	g_assert_cmpstr(am_delivery_mode_name(AM_DELIVERY_SPOOL), ==, "spool");
	g_assert_cmpstr(am_delivery_mode_name((AmDeliveryMode)42), ==,
	                "unknown");
	G_STATIC_ASSERT(G_N_ELEMENTS(outcomes) == AM_OUTCOME_COUNT);
	for (i = 0; i < AM_OUTCOME_COUNT; i++)
		g_assert_cmpstr(am_outcome_name(i), ==, outcomes[i]);
	g_assert_cmpstr(am_outcome_name(AM_OUTCOME_COUNT), ==, "unknown");
}

/* Where a value came from, for messages about it after loading: the
 * line it was set on (the last, for a duplicate is an error anyway), or
 * "(default)". */
static void
test_where(void)
{
	g_autoptr(GPtrArray) errors = NULL;
	g_autoptr(AmConfig) c = load_with(
	    IN_MILTER, "archive_id_key_file = /var/lib/am/key", &errors);
	g_autofree char *set = NULL;
	g_autofree char *unset = NULL;
	g_autofree char *want_set = NULL;
	g_autofree char *want_unset = NULL;

	dump_errors(errors);
	g_assert_nonnull(c);
	g_assert_cmpuint(am_config_key_line(c, "milter", "socket"), ==, 2);
	g_assert_cmpuint(am_config_key_line(c, "milter", "archive_id_key_file"),
	                 ==, 3);
	g_assert_cmpuint(am_config_key_line(c, "rule:a", "archive_to"), ==, 9);
	g_assert_cmpuint(am_config_key_line(c, "milter", "pid_file"), ==, 0);
	g_assert_cmpuint(am_config_key_line(c, "relay:r", "archive_to"), ==, 0);

	set = am_config_where(c, "milter", "archive_id_key_file");
	want_set =
	    g_strdup_printf("%s:3: [milter] archive_id_key_file", c->path);
	g_assert_cmpstr(set, ==, want_set);
	unset = am_config_where(c, "milter", "pid_file");
	want_unset =
	    g_strdup_printf("%s: [milter] pid_file (default)", c->path);
	g_assert_cmpstr(unset, ==, want_unset);
}

static void
test_free_null(void)
{
	am_config_free(NULL);
}

static void
remove_tmp_dir(void)
{
	g_autoptr(GDir) dir = g_dir_open(tmp_dir, 0, NULL);
	const char *f;

	while (dir != NULL && (f = g_dir_read_name(dir)) != NULL) {
		g_autofree char *p = g_build_filename(tmp_dir, f, NULL);

		g_unlink(p);
	}
	g_rmdir(tmp_dir);
}

int
main(int argc, char **argv)
{
	g_autoptr(GError) error = NULL;
	int ret;

	g_test_init(&argc, &argv, NULL);
	tmp_dir = g_dir_make_tmp("test-conf-XXXXXX", &error);
	g_assert_no_error(error);

	g_test_add_func("/conf/cases/paired", test_cases_paired);
	add_case_tests();
	g_test_add_func("/conf/good/minimal", test_good_minimal);
	g_test_add_func("/conf/good/full", test_good_full);
	g_test_add_func("/conf/example/loads", test_example);
	g_test_add_func("/conf/example/uncommented", test_example_uncommented);
	g_test_add_func("/conf/example/documents-keys",
	                test_example_documents_keys);
	g_test_add_func("/conf/value/port", test_ports);
	g_test_add_func("/conf/value/timeout", test_timeouts);
	g_test_add_func("/conf/value/stage-timeouts", test_stage_timeouts);
	g_test_add_func("/conf/value/copy-deadline", test_copy_deadline);
	g_test_add_func("/conf/value/auth-plaintext", test_auth_plaintext);
	g_test_add_func("/conf/relay/tls-levels", test_tls_levels);
	g_test_add_func("/conf/relay/ca-file", test_ca_file);
	g_test_add_func("/conf/relay/auth", test_auth_good);
	g_test_add_func("/conf/relay/auth-bad-file", test_auth_bad);
	g_test_add_func("/conf/relay/auth-needs-tls", test_auth_needs_tls);
	g_test_add_func("/conf/value/size", test_sizes);
	g_test_add_func("/conf/value/size-max", test_size_max);
	g_test_add_func("/conf/value/socket", test_sockets);
	g_test_add_func("/conf/value/host", test_hosts);
	g_test_add_func("/conf/value/helo-name", test_helo_names);
	g_test_add_func("/conf/value/archive-to", test_archive_to);
	g_test_add_func("/conf/value/archive-from", test_archive_from);
	g_test_add_func("/conf/value/non-ascii", test_non_ascii);
	g_test_add_func("/conf/value/archive-to-large", test_archive_to_large);
	g_test_add_func("/conf/spool/workers", test_workers);
	g_test_add_func("/conf/spool/min-free", test_spool_min_free);
	g_test_add_func("/conf/spool/durations", test_durations);
	g_test_add_func("/conf/spool/retry-range", test_retry_range);
	g_test_add_func("/conf/spool/paths", test_spool_paths);
	g_test_add_func("/conf/policy/delivery", test_delivery);
	g_test_add_func("/conf/policy/keys", test_policy_keys);
	g_test_add_func("/conf/policy/delivery-checks", test_policy_delivery);
	g_test_add_func("/conf/policy/reject-text", test_reject_text);
	g_test_add_func("/conf/policy/action-parse", test_action_parse);
	g_test_add_func("/conf/policy/action-parse-outcomes",
	                test_action_parse_outcomes);
	g_test_add_func("/conf/policy/action-format", test_action_format);
	g_test_add_func("/conf/policy/rule-action", test_rule_action);
	g_test_add_func("/conf/policy/rule-action-defaults",
	                test_rule_action_defaults);
	g_test_add_func("/conf/file/unreadable", test_unreadable);
	g_test_add_func("/conf/file/crlf", test_crlf);
	g_test_add_func("/conf/file/bad-bytes", test_bad_bytes);
	g_test_add_func("/conf/api/errors-optional", test_errors_optional);
	g_test_add_func("/conf/api/errors-empty", test_errors_empty);
	g_test_add_func("/conf/api/find-relay", test_find_relay);
	g_test_add_func("/conf/api/names", test_names);
	g_test_add_func("/conf/api/free-null", test_free_null);
	g_test_add_func("/conf/api/where", test_where);

	ret = g_test_run();
	remove_tmp_dir();
	g_free(tmp_dir);
	return ret;
}
