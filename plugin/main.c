/*
 * main.c - archive-milter: options, start-up, --check
 *
 *   archive-milter -c FILE [-f] [-v] [--check]
 *   archive-milter -c FILE --spool-list
 *   archive-milter -c FILE --spool-retry ID|all
 *
 * The --spool-* commands work on the spool directory whether or not the
 * daemon runs: every change of state there is one rename (spool.h).
 * --spool-list prints counts for monitoring, then a line per copy;
 * --spool-retry moves held copies back to the queue, where the daemon's
 * next scan (every few seconds) finds them.
 *
 * Start-up opens the milter socket before anything else can go wrong
 * quietly: a socket that cannot be bound is a fatal error at once, and
 * "ready" is logged only when the socket listens, which is what tests
 * and service managers wait for.  Without -f the daemon detaches and
 * logs to syslog (LOG_MAIL).
 *
 * Known limits: XXX: no SIGUSR1 reload (the signal is ignored, not
 * fatal) and no privilege drop yet
 * (DESIGN.md section 3 and 4); run it as the user that owns the key
 * file.  libmilter's own signal thread takes SIGHUP, SIGINT and SIGTERM
 * as requests to stop.
 */
#include <errno.h>
#include <libmilter/mfapi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sysexits.h>
#include <unistd.h>

#include "archive-id.h"
#include "conf.h"
#include "log.h"
#include "milter.h"
#include "runner.h"
#include "spool.h"

/* Postfix's default milter_content_timeout: how long it waits for the
 * milter's answer to the end of a message. */
#define AM_POSTFIX_CONTENT_TIMEOUT_MS 300000

/* parse_options: the work is done (--version), exit 0. */
#define EX_OK_DONE (-1)
/* How long a stop waits for copies being sent (see run()). */
#define AM_STOP_GRACE_MS 5000

typedef struct {
	char *config_path;
	gboolean foreground;
	gboolean check;
	gboolean verbose;
	gboolean spool_list;
	char *spool_retry; /* ID or "all"; NULL: not asked */
} AmOptions;

static int
parse_options(int argc, char **argv, AmOptions *opt)
{
	gboolean version = FALSE;
	GOptionEntry entries[] = {
	    {"config", 'c', 0, G_OPTION_ARG_FILENAME, &opt->config_path,
	     "configuration file", "FILE"},
	    {"foreground", 'f', 0, G_OPTION_ARG_NONE, &opt->foreground,
	     "stay in the foreground and log to standard error", NULL},
	    {"check", 0, 0, G_OPTION_ARG_NONE, &opt->check,
	     "check the configuration and exit", NULL},
	    {"verbose", 'v', 0, G_OPTION_ARG_NONE, &opt->verbose,
	     "log debug detail", NULL},
	    {"spool-list", 0, 0, G_OPTION_ARG_NONE, &opt->spool_list,
	     "list the copies in the spool and exit", NULL},
	    {"spool-retry", 0, 0, G_OPTION_ARG_STRING, &opt->spool_retry,
	     "move held copy ID (or all) back to the queue and exit", "ID|all"},
	    {"version", 0, 0, G_OPTION_ARG_NONE, &version,
	     "print the version and exit", NULL},
	    {NULL, 0, 0, 0, NULL, NULL, NULL},
	};
	g_autoptr(GOptionContext) octx =
	    g_option_context_new("- archive copies of mail from a milter");
	g_autoptr(GError) error = NULL;

	g_option_context_add_main_entries(octx, entries, NULL);
	if (!g_option_context_parse(octx, &argc, &argv, &error)) {
		fprintf(stderr, "archive-milter: %s\n", error->message);
		return EX_USAGE;
	}
	if (version) {
		printf("archive-milter %s\n", AM_VERSION);
		g_clear_pointer(&opt->config_path, g_free);
		g_clear_pointer(&opt->spool_retry, g_free);
		return EX_OK_DONE;
	}
	if (opt->config_path == NULL || argc > 1 ||
	    opt->check + opt->spool_list + (opt->spool_retry != NULL) > 1) {
		fprintf(stderr, "usage: archive-milter -c FILE [-f] [-v] "
		                "[--check | --spool-list | --spool-retry "
		                "ID|all]\n"
		                "       archive-milter --version\n"
		                "-c FILE is required: there is no default "
		                "configuration path\n");
		/* Freed here: the tests run us under LeakSanitizer. */
		g_clear_pointer(&opt->config_path, g_free);
		g_clear_pointer(&opt->spool_retry, g_free);
		return EX_USAGE;
	}
	return EX_OK;
}

/*
 * --check judges the key file as the daemon will (am_archive_key_check
 * shares its code with the load) but never creates it: a missing file
 * is fine, the daemon makes one.  The message names the configuration
 * file, line and key, then the key file and the cause.  XXX: for a
 * missing file, whether the daemon could create it (its directory, or
 * that directory's parent, one level only) is not checked; the daemon
 * says so at start.
 */
static gboolean
check_key_file(const AmConfig *config, GPtrArray *errors)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *where = NULL;

	if (am_archive_key_check(config->archive_id_key_file, &error) ||
	    g_error_matches(error, AM_ARCHIVE_KEY_ERROR,
	                    AM_ARCHIVE_KEY_ERROR_MISSING))
		return TRUE;
	where = am_config_where(config, "milter", "archive_id_key_file");
	g_ptr_array_add(errors,
	                g_strdup_printf("%s: %s", where, error->message));
	return FALSE;
}

/*
 * Why the daemon could not write @path as its pid file, or NULL.  It
 * writes a temporary file next to it and renames it into place
 * (write_pid_file), so the directory must exist and take new files,
 * and @path must not be a directory.  XXX: access() answers for the
 * user running --check, as for spool_dir; run as root it says
 * writable for any directory on a writable file system.
 */
static char *
pid_file_why(const char *path)
{
	g_autofree char *dir = g_path_get_dirname(path);
	struct stat st;

	if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
		return g_strdup("is a directory");
	if (stat(dir, &st) != 0)
		return g_strdup_printf("its directory %s: %s (the daemon "
		                       "creates no directory for it)",
		                       dir, g_strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return g_strdup_printf("%s is not a directory", dir);
	if (access(dir, W_OK | X_OK) != 0)
		return g_strdup_printf("this user (uid %u) cannot create files "
		                       "in %s: %s",
		                       (unsigned)getuid(), dir,
		                       g_strerror(errno));
	return NULL;
}

/* An error, not a warning: the daemon refuses to start without it. */
static gboolean
check_pid_file(const AmConfig *config, GPtrArray *errors)
{
	g_autofree char *why = NULL;
	g_autofree char *where = NULL;

	if (config->pid_file == NULL ||
	    (why = pid_file_why(config->pid_file)) == NULL)
		return TRUE;
	where = am_config_where(config, "milter", "pid_file");
	g_ptr_array_add(errors,
	                g_strdup_printf("%s: \"%s\": %s; the daemon would not "
	                                "start",
	                                where, config->pid_file, why));
	return FALSE;
}

/* Seconds for humans: "30s", "2.5s". */
static char *
seconds(guint ms)
{
	return g_strdup_printf("%gs", ms / 1000.0);
}

/* The level, and whether the file chose it or the host's default did. */
static const char *
tls_reason(const AmRelay *r)
{
	if (r->tls_set)
		return "configured";
	return smtp_host_is_loopback(r->host) ? "loopback default" : "default";
}

static void
print_relay(const AmRelay *r)
{
	g_autofree char *connect = seconds(r->timeouts.connect_ms);
	g_autofree char *command = seconds(r->timeouts.command_ms);
	g_autofree char *data = seconds(r->timeouts.data_ms);
	g_autofree char *final = seconds(r->timeouts.final_ms);

	printf("relay %s: %s port %u, tls=%s (%s), timeouts connect=%s "
	       "command=%s data=%s final=%s",
	       r->name, r->host, r->port, smtp_tls_level_name(r->tls),
	       tls_reason(r), connect, command, data, final);
	if (r->ca_file != NULL)
		printf(", ca_file=%s", r->ca_file);
	/* The user and where the password comes from; never the password. */
	if (r->auth_user != NULL)
		printf(", auth_user=%s, auth_password_file=%s, "
		       "auth_plaintext=%s",
		       r->auth_user, r->auth_password_file,
		       r->auth_plaintext ? "yes" : "no");
	printf("\n");
}

/*
 * The rules that send through @relay (NULL: any relay) with delivery =
 * sync, joined as "rule a" or "rules a, b"; NULL when there are none.
 * Only those keep Postfix waiting: a spool rule answers once the copy
 * is on disk.
 */
static char *
sync_rules(const AmConfig *config, const AmRelay *relay)
{
	g_autoptr(GString) names = g_string_new(NULL);
	guint i, n = 0;

	for (i = 0; i < config->rules->len; i++) {
		const AmRule *rule = config->rules->pdata[i];

		if (rule->delivery != AM_DELIVERY_SYNC ||
		    (relay != NULL && rule->relay != relay))
			continue;
		g_string_append_printf(names, "%s%s", n++ > 0 ? ", " : "",
		                       rule->name);
	}
	if (n == 0)
		return NULL;
	return g_strdup_printf("rule%s %s", n > 1 ? "s" : "", names->str);
}

/* The most archive addresses a sync rule sends through @relay (>= 1). */
static guint
max_recipients(const AmConfig *config, const AmRelay *relay)
{
	guint i, n = 1;

	for (i = 0; i < config->rules->len; i++) {
		const AmRule *rule = config->rules->pdata[i];

		if (rule->relay == relay && rule->delivery == AM_DELIVERY_SYNC)
			n = MAX(n, g_strv_length(rule->archive_to));
	}
	return n;
}

/*
 * What the stage limits of @r allow one copy to @n addresses: connect,
 * EHLO, MAIL, one RCPT per address, DATA, the data and the final dot.
 * XXX: STARTTLS and AUTH add a few more round trips that the estimate
 * leaves out; copy_deadline still bounds them.
 */
static guint64
stage_sum_ms(const AmRelay *r, guint n)
{
	const SmtpTimeouts *t = &r->timeouts;

	return (guint64)t->connect_ms + (guint64)t->command_ms * (3 + n) +
	       t->data_ms + t->final_ms;
}

/*
 * A synchronous copy runs while Postfix waits for the milter's answer
 * to the end of the message; past milter_content_timeout (300 s by
 * default) Postfix gives up on the milter and applies its
 * milter_default_action, whatever the copy's outcome.  copy_deadline
 * bounds all the synchronous copies of one message together (milter.c),
 * so one copy takes at most min(its stage limits, copy_deadline), and
 * with match = all the copies of several rules, one after another, at
 * most copy_deadline in all.  Each warning names the rules that wait
 * (delivery = sync); a relay only spool rules use gets none.
 */
static void
print_timeout_warnings(const AmConfig *config)
{
	const guint64 postfix_ms = AM_POSTFIX_CONTENT_TIMEOUT_MS;
	const guint64 deadline_ms = config->copy_deadline_ms;
	g_autofree char *all = sync_rules(config, NULL);
	g_autofree char *deadline = seconds(config->copy_deadline_ms);
	guint64 total_ms = 0;
	guint i, n_sync = 0;

	for (i = 0; i < config->relays->len; i++) {
		const AmRelay *r = config->relays->pdata[i];
		guint n = max_recipients(config, r);
		guint64 worst = stage_sum_ms(r, n);
		g_autofree char *rules = NULL;
		g_autofree char *w = NULL;
		g_autofree char *cut = NULL;

		if (MIN(worst, deadline_ms) <= postfix_ms ||
		    (rules = sync_rules(config, r)) == NULL)
			continue;
		w = seconds((guint)MIN(worst, G_MAXUINT));
		cut = worst > deadline_ms
		          ? g_strdup_printf(", and copy_deadline stops it only "
		                            "at %s",
		                            deadline)
		          : g_strdup("");
		printf("WARNING: relay %s: its timeouts allow a copy to take "
		       "%s (timeout_connect + timeout_command * %u + "
		       "timeout_data + timeout_final)%s, more than Postfix's "
		       "milter_content_timeout of 300s; Postfix waits for it "
		       "in %s (delivery = sync)\n",
		       r->name, w, 3 + n, cut, rules);
	}

	/* match = all: the sync rules that match one message copy it one
	 * after another. */
	for (i = 0; i < config->rules->len; i++) {
		const AmRule *rule = config->rules->pdata[i];

		if (rule->delivery != AM_DELIVERY_SYNC)
			continue;
		n_sync++;
		total_ms +=
		    stage_sum_ms(rule->relay, g_strv_length(rule->archive_to));
	}
	if (config->match_all && n_sync > 1 &&
	    MIN(total_ms, deadline_ms) > postfix_ms) {
		g_autofree char *t = seconds((guint)MIN(total_ms, G_MAXUINT));
		g_autofree char *b =
		    seconds((guint)MIN(MIN(total_ms, deadline_ms), G_MAXUINT));

		printf("WARNING: match = all: %s (delivery = sync) may each "
		       "copy the same message, one after another; their "
		       "timeouts add up to %s and copy_deadline (%s) bounds "
		       "them together, so Postfix may wait %s, more than its "
		       "milter_content_timeout of 300s\n",
		       all, t, deadline, b);
	}

	if (deadline_ms >= postfix_ms && all != NULL)
		printf("WARNING: copy_deadline %s is not below Postfix's "
		       "milter_content_timeout of 300s; Postfix waits for it "
		       "in %s (delivery = sync)\n",
		       deadline, all);
}

/* A size as the file would write it: "100M", "512K", "1000". */
static char *
size_text(guint64 n)
{
	static const char units[] = "GMK";
	guint i;

	for (i = 0; i < 3 && n > 0; i++) {
		guint shift = 30 - 10 * i;

		if (n % (G_GUINT64_CONSTANT(1) << shift) == 0)
			return g_strdup_printf("%" G_GUINT64_FORMAT "%c",
			                       n >> shift, units[i]);
	}
	return g_strdup_printf("%" G_GUINT64_FORMAT, n);
}

/* A duration as the file would write it: "5d", "1h", "90s". */
static char *
duration_text(guint s)
{
	if (s > 0 && s % 86400 == 0)
		return g_strdup_printf("%ud", s / 86400);
	if (s > 0 && s % 3600 == 0)
		return g_strdup_printf("%uh", s / 3600);
	if (s > 0 && s % 60 == 0)
		return g_strdup_printf("%um", s / 60);
	return g_strdup_printf("%us", s);
}

static void
print_spool(const AmConfig *config)
{
	g_autofree char *min_free = size_text(config->spool_min_free);
	g_autofree char *max_age = duration_text(config->spool_max_age_s);
	g_autofree char *rmin = duration_text(config->spool_retry_min_s);
	g_autofree char *rmax = duration_text(config->spool_retry_max_s);

	printf("spool: spool_dir=%s, workers=%u, spool_min_free=%s, "
	       "spool_max_age=%s, spool_retry_min=%s, spool_retry_max=%s, "
	       "pid_file=%s\n",
	       config->spool_dir, config->workers, min_free, max_age, rmin,
	       rmax, config->pid_file != NULL ? config->pid_file : "none");
}

/*
 * The spool directory as am_spool_open() will want it: a directory
 * closed to group and others, owned by us, that we can write, or a
 * missing one whose parent lets us create it (one mkdir, no parents).
 * --check creates nothing.  What the daemon refuses whoever runs it (not
 * a directory, open to group or others, owned by another user) is an
 * error, so that "ok" means the daemon can start; what depends on the
 * user running --check (writable, creatable) is a warning, since the
 * daemon may run as another one.  XXX: access() answers for the user
 * running --check; as root it always says writable.
 */
static char *
spool_dir_error(const char *dir)
{
	struct stat st;

	if (lstat(dir, &st) != 0)
		return NULL; /* missing or unreadable: check_spool_dir warns */
	if (S_ISLNK(st.st_mode))
		return g_strdup("a symbolic link; the daemon wants the real "
		                "directory");
	if (!S_ISDIR(st.st_mode))
		return g_strdup("not a directory");
	if ((st.st_mode & 0077) != 0)
		return g_strdup_printf("mode %04o is open to group or others; "
		                       "the daemon refuses it unless it is "
		                       "0700 (chmod 0700 %s)",
		                       (unsigned)(st.st_mode & 07777), dir);
	if (st.st_uid != geteuid())
		return g_strdup_printf("owned by uid %u, not by this user (uid "
		                       "%u); the daemon refuses a spool "
		                       "others can change",
		                       (unsigned)st.st_uid,
		                       (unsigned)geteuid());
	return NULL;
}

static gboolean
check_spool_dir_errors(const AmConfig *config, GPtrArray *errors)
{
	g_autofree char *why = spool_dir_error(config->spool_dir);
	g_autofree char *where = NULL;

	if (why == NULL)
		return TRUE;
	where = am_config_where(config, "milter", "spool_dir");
	g_ptr_array_add(errors, g_strdup_printf("%s: %s: %s; the daemon would "
	                                        "not start",
	                                        where, config->spool_dir, why));
	return FALSE;
}

static void
check_spool_dir(const char *dir)
{
	g_autofree char *parent = NULL;
	struct stat st;

	if (stat(dir, &st) == 0) {
		if (S_ISDIR(st.st_mode) && access(dir, W_OK | X_OK) != 0)
			printf("WARNING: spool_dir %s: not writable by this "
			       "user (uid %u): %s\n",
			       dir, (unsigned)getuid(), g_strerror(errno));
		return;
	}
	if (errno != ENOENT) {
		printf("WARNING: spool_dir %s: %s\n", dir, g_strerror(errno));
		return;
	}
	parent = g_path_get_dirname(dir);
	if (stat(parent, &st) != 0 || !S_ISDIR(st.st_mode))
		printf("WARNING: spool_dir %s: does not exist, and cannot be "
		       "created: its parent %s is not a directory\n",
		       dir, parent);
	else if (access(parent, W_OK | X_OK) != 0)
		printf("WARNING: spool_dir %s: does not exist, and this user "
		       "(uid %u) cannot create it in %s: %s\n",
		       dir, (unsigned)getuid(), parent, g_strerror(errno));
}

/*
 * spool_min_free against the file system spool_dir is (or will be) on:
 * the spool refuses a copy that would leave less than that available
 * (f_bavail, as spool.c counts it), and its original is tempfailed.
 * A floor above the file system's whole size can never be met; one
 * above what is available now fails every spooled copy until space is
 * freed.  Warnings only, as for spool_dir: the daemon may run on
 * another machine.
 */
static void
check_spool_space(const AmConfig *config)
{
	g_autofree char *parent = g_path_get_dirname(config->spool_dir);
	g_autofree char *floor = NULL;
	g_autofree char *have = NULL;
	const char *on = config->spool_dir;
	struct statvfs sv;
	guint64 total, avail;

	if (config->spool_min_free == 0)
		return;
	if (!g_file_test(on, G_FILE_TEST_IS_DIR))
		on = parent;
	if (!g_file_test(on, G_FILE_TEST_IS_DIR) || statvfs(on, &sv) != 0)
		return; /* check_spool_dir says why */
	total = (guint64)sv.f_blocks * sv.f_frsize;
	avail = (guint64)sv.f_bavail * sv.f_frsize;
	floor = size_text(config->spool_min_free);
	if (config->spool_min_free > total) {
		have = size_text(total);
		printf("WARNING: spool_min_free %s is more than the whole file "
		       "system of spool_dir %s (%s): every copy sent to the "
		       "spool would be refused and its original tempfailed\n",
		       floor, config->spool_dir, have);
	} else if (config->spool_min_free > avail) {
		have = size_text(avail);
		printf("WARNING: spool_min_free %s is more than is available "
		       "now on the file system of spool_dir %s (%s): a copy "
		       "sent to the spool now would be refused and its "
		       "original tempfailed\n",
		       floor, config->spool_dir, have);
	}
}

/* Where a rule's action for @o comes from. */
static const char *
action_origin(const AmRule *r, AmOutcome o)
{
	if (r->actions[o] != 0)
		return "on_";
	if (o != AM_OUTCOME_SENT && r->on_failure != 0)
		return "on_failure";
	return "default";
}

/*
 * The effective policy of a rule, one line per outcome, for a temporary
 * and a permanent failure, and which key decided it.
 */
static void
print_policy(const AmRule *r)
{
	guint o;

	printf("  %-16s %-24s %-24s %s\n", "outcome", "temporary", "permanent",
	       "set by");
	for (o = 0; o < AM_OUTCOME_COUNT; o++) {
		g_autofree char *temp =
		    am_action_format(am_rule_action(r, o, TRUE));
		g_autofree char *perm =
		    am_action_format(am_rule_action(r, o, FALSE));
		const char *origin = action_origin(r, o);

		printf("  %-16s %-24s %-24s %s%s\n", am_outcome_name(o), temp,
		       perm, origin,
		       strcmp(origin, "on_") == 0 ? am_outcome_name(o) : "");
	}
}

/* reject_text is used only by a reject, which only a sync rule has. */
static gboolean
rule_rejects(const AmRule *r)
{
	guint o;

	for (o = 0; o < AM_OUTCOME_COUNT; o++) {
		if ((am_rule_action(r, o, TRUE) | am_rule_action(r, o, FALSE)) &
		    AM_ACTION_REJECT)
			return TRUE;
	}
	return FALSE;
}

static void
print_rule(const AmRule *r)
{
	g_autofree char *to = g_strjoinv(">, <", r->archive_to);

	printf("rule %s: mode=%s, delivery=%s, relay=%s, archive_to=<%s>, "
	       "archive_from=<%s>",
	       r->name, am_mode_name(r->mode),
	       am_delivery_mode_name(r->delivery), r->relay->name, to,
	       r->archive_from ? r->archive_from : "");
	if (r->reject_text != NULL)
		printf(", reject_text=\"%s\"", r->reject_text);
	printf("\n");
	print_policy(r);
	if (r->delivery == AM_DELIVERY_SPOOL)
		printf("  (delivery = spool: the original is accepted once "
		       "the copy is spooled; tempfail and spool retry, accept "
		       "moves the copy to hold/)\n");
}

static void
print_rule_warnings(const AmConfig *config)
{
	guint i;

	for (i = 0; i < config->rules->len; i++) {
		const AmRule *r = config->rules->pdata[i];

		if (r->reject_text != NULL && !rule_rejects(r))
			printf("WARNING: rule %s: reject_text is set but no "
			       "outcome rejects, so it is never used\n",
			       r->name);
	}
}

static void
print_summary(const AmConfig *config)
{
	g_autofree char *deadline = seconds(config->copy_deadline_ms);
	guint i;

	printf("%s: ok, %u relay(s), %u rule(s), match=%s, "
	       "copy_deadline=%s\n",
	       config->path, config->relays->len, config->rules->len,
	       config->match_all ? "all" : "first", deadline);
	print_spool(config);
	for (i = 0; i < config->relays->len; i++)
		print_relay(config->relays->pdata[i]);
	for (i = 0; i < config->rules->len; i++)
		print_rule(config->rules->pdata[i]);
	print_timeout_warnings(config);
	print_rule_warnings(config);
	check_spool_dir(config->spool_dir);
	check_spool_space(config);
}

static AmConfig *
load_config(const char *path, gboolean check)
{
	g_autoptr(GPtrArray) errors = NULL;
	AmConfig *config = am_config_load(path, &errors);
	guint i;

	if (config != NULL && check) {
		/* Both, so that every problem shows at once. */
		gboolean key_ok = check_key_file(config, errors);
		gboolean pid_ok = check_pid_file(config, errors);
		gboolean spool_ok = check_spool_dir_errors(config, errors);

		if (!key_ok || !pid_ok || !spool_ok)
			g_clear_pointer(&config, am_config_free);
	}
	for (i = 0; errors != NULL && i < errors->len; i++)
		fprintf(stderr, "%s\n", (const char *)errors->pdata[i]);
	if (config == NULL && (errors == NULL || errors->len == 0))
		fprintf(stderr, "%s: configuration not loaded\n", path);
	return config;
}

/* A stale socket file from a previous run would make bind() fail. */
static void
unlink_stale_socket(const char *spec)
{
	const char *path = NULL;
	struct stat st;

	if (g_str_has_prefix(spec, "unix:"))
		path = spec + 5;
	else if (g_str_has_prefix(spec, "local:"))
		path = spec + 6;
	else if (spec[0] == '/')
		path = spec;
	if (path != NULL && lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
}

static int
open_socket(const char *spec)
{
	unlink_stale_socket(spec);
	if (smfi_setconn((char *)spec) != MI_SUCCESS) {
		am_log_error("bad milter socket %s", spec);
		return EX_CONFIG;
	}
	errno = 0;
	if (smfi_opensocket(TRUE) != MI_SUCCESS) {
		/* libmilter says why only to syslog; errno is bind's. */
		int saved = errno;

		if (saved != 0)
			am_log_error("cannot listen on milter socket %s: %s",
			             spec, g_strerror(saved));
		else
			am_log_error("cannot listen on milter socket %s", spec);
		return EX_UNAVAILABLE;
	}
	return EX_OK;
}

/* ------------------------------------------------------------------ */
/* --spool-list and --spool-retry                                       */
/* ------------------------------------------------------------------ */

/* The spool of @config, which the commands never create: a directory
 * that is missing means a wrong spool_dir as often as an empty one.
 * Opened as a command: no lock (a daemon starting meanwhile must not
 * believe another daemon runs) and nothing deleted. */
static AmSpool *
open_spool_for_command(const AmConfig *config, int *rc)
{
	g_autoptr(GError) error = NULL;
	AmSpool *spool;

	if (!g_file_test(config->spool_dir, G_FILE_TEST_IS_DIR)) {
		fprintf(stderr,
		        "archive-milter: spool directory %s does not exist\n",
		        config->spool_dir);
		*rc = EX_NOINPUT;
		return NULL;
	}
	spool = am_spool_open_full(config->spool_dir, 0, AM_SPOOL_OPEN_COMMAND,
	                           &error);
	if (spool == NULL) {
		fprintf(stderr, "archive-milter: %s\n", error->message);
		*rc = EX_IOERR;
	}
	return spool;
}

/* Seconds since @t, never negative (a clock set back). */
static gint64
age_of(gint64 now, gint64 t)
{
	return now > t ? now - t : 0;
}

/* One line per copy; every field sanitized, so a hostile relay reply
 * kept as last_error cannot add a line of its own. */
static void
print_entry(const AmSpoolEntry *e, gint64 now)
{
	g_autofree char *to = g_strjoinv(">,<", e->to);
	const char *fields[] = {e->id,    e->rule,
	                        e->relay, e->queue_id ? e->queue_id : "NOQUEUE",
	                        to,       e->last_error ? e->last_error : ""};
	char *c[G_N_ELEMENTS(fields)];

	for (guint i = 0; i < G_N_ELEMENTS(fields); i++)
		c[i] = am_log_sanitize(fields[i], 1000);
	printf("%s %s age=%" G_GINT64_FORMAT
	       " attempts=%u next=%" G_GINT64_FORMAT
	       " rule=%s relay=%s queue_id=%s size=%" G_GUINT64_FORMAT
	       " to=<%s> error=(%s)\n",
	       c[0], e->state == AM_SPOOL_HELD ? "held" : "queued",
	       age_of(now, e->created), e->attempts,
	       e->next_attempt > now ? e->next_attempt - now : 0, c[1], c[2],
	       c[3], e->size, c[4], c[5]);
	for (guint i = 0; i < G_N_ELEMENTS(fields); i++)
		g_free(c[i]);
}

/*
 * The counts come first, one "key: value" each, so that a monitoring
 * script reads them with one grep: queued, held, damaged (files that
 * cannot be parsed: left for an administrator, never sent), and the
 * age in seconds of the oldest queued and held copy (0: none).
 */
static int
spool_list(const AmConfig *config)
{
	AmSpoolState states[] = {AM_SPOOL_QUEUED, AM_SPOOL_HELD};
	GPtrArray *lists[2] = {NULL, NULL};
	gint64 now = g_get_real_time() / G_USEC_PER_SEC;
	gint64 oldest[2] = {0, 0};
	guint damaged = 0;
	g_autoptr(AmSpool) spool = NULL;
	int rc = EX_OK;

	if ((spool = open_spool_for_command(config, &rc)) == NULL)
		return rc;
	for (guint i = 0; i < 2 && rc == EX_OK; i++) {
		g_autoptr(GError) error = NULL;
		guint bad = 0;

		/* A copy confirmed or moved while it is listed is gone,
		 * not damaged: the spool says which is which. */
		lists[i] = am_spool_list_full(spool, states[i], &bad, &error);
		if (lists[i] == NULL) {
			fprintf(stderr, "archive-milter: %s\n", error->message);
			rc = EX_IOERR;
			break;
		}
		damaged += bad;
		if (lists[i]->len > 0)
			oldest[i] = age_of(
			    now, ((AmSpoolEntry *)lists[i]->pdata[0])->created);
	}
	if (rc == EX_OK) {
		printf("queued: %u\nheld: %u\ndamaged: %u\n"
		       "oldest_queued_age: %" G_GINT64_FORMAT "\n"
		       "oldest_held_age: %" G_GINT64_FORMAT "\n",
		       lists[0]->len, lists[1]->len, damaged, oldest[0],
		       oldest[1]);
		for (guint i = 0; i < 2; i++)
			for (guint j = 0; j < lists[i]->len; j++)
				print_entry(lists[i]->pdata[j], now);
	}
	for (guint i = 0; i < 2; i++)
		if (lists[i] != NULL)
			g_ptr_array_unref(lists[i]);
	return rc;
}

static int
spool_retry(const AmConfig *config, const char *id)
{
	g_autoptr(AmSpool) spool = NULL;
	g_autoptr(GError) error = NULL;
	guint count = 0;
	int rc = EX_OK;

	if (strcmp(id, "all") != 0 && !am_spool_id_is_valid(id)) {
		g_autofree char *clean = am_log_sanitize(id, 200);

		fprintf(stderr, "archive-milter: not a spool id: \"%s\"\n",
		        clean);
		return EX_NOINPUT;
	}
	if ((spool = open_spool_for_command(config, &rc)) == NULL)
		return rc;
	if (am_spool_release(spool, id, &count, &error)) {
		if (strcmp(id, "all") == 0)
			printf("released %u held cop%s\n", count,
			       count == 1 ? "y" : "ies");
		else
			printf("released %s\n", id);
		return EX_OK;
	}
	if (count > 0)
		printf("released %u held cop%s before the error\n", count,
		       count == 1 ? "y" : "ies");
	if (g_error_matches(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND)) {
		g_autofree char *clean = am_log_sanitize(id, 200);

		fprintf(stderr, "archive-milter: no held copy %s in %s\n",
		        clean, config->spool_dir);
		return EX_NOINPUT;
	}
	fprintf(stderr, "archive-milter: %s\n", error->message);
	if (g_error_matches(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT))
		return EX_DATAERR;
	if (g_error_matches(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FULL))
		return EX_TEMPFAIL;
	return EX_IOERR;
}

/* ------------------------------------------------------------------ */
/* The daemon                                                           */
/* ------------------------------------------------------------------ */

/* The pid file, written after detaching, so that it names the daemon. */
static gboolean
write_pid_file(const char *path)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *text = NULL;

	if (path == NULL)
		return TRUE;
	text = g_strdup_printf("%ld\n", (long)getpid());
	if (g_file_set_contents_full(
	        path, text, -1, G_FILE_SET_CONTENTS_CONSISTENT, 0644, &error))
		return TRUE;
	/* GLib names its temporary file; the administrator needs ours,
	 * and the errno says what is wrong with its directory. */
	if (g_error_matches(error, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
		g_autofree char *dir = g_path_get_dirname(path);

		am_log_error("cannot write pid_file %s: its directory %s does "
		             "not exist",
		             path, dir);
	} else {
		am_log_error("cannot write pid_file %s: %s", path,
		             error->message);
	}
	return FALSE;
}

/* The steps of start-up that can fail before we serve: the key, the
 * spool, the socket, detaching, the pid file.  The runner starts after
 * daemon(), since threads do not survive its fork. */
static int
start(AmContext *ctx, AmSpool **spool, const AmOptions *opt)
{
	const AmConfig *config = ctx->config;
	g_autoptr(GError) error = NULL;
	int rc;

	/* Step 1: the spool, which every copy that is not confirmed at
	 * once needs; without it no promise to the MTA can be kept. */
	*spool =
	    am_spool_open(config->spool_dir, config->spool_min_free, &error);
	if (*spool == NULL) {
		am_log_error("cannot open spool_dir %s: %s", config->spool_dir,
		             error->message);
		return EX_CANTCREAT;
	}
	ctx->spool = *spool;
	/* Only a daemon takes the spool's lock (the --spool-* commands do
	 * not): a second one would deliver every copy twice. */
	if (!am_spool_is_exclusive(*spool)) {
		am_log_error("spool_dir %s is in use by another archive-milter "
		             "daemon; not starting a second one on it, which "
		             "would send every copy twice",
		             config->spool_dir);
		return EX_TEMPFAIL;
	}

	/* Step 2: the socket, so a bind error ends us now. */
	if (!am_milter_register(&error)) {
		am_log_error("%s", error->message);
		return EX_SOFTWARE;
	}
	if ((rc = open_socket(config->socket)) != EX_OK)
		return rc;
	if (!opt->foreground && daemon(0, 0) != 0) {
		am_log_error("cannot detach: %s", g_strerror(errno));
		return EX_OSERR;
	}
	if (!write_pid_file(config->pid_file))
		return EX_CANTCREAT;
	return EX_OK;
}

static int
run(AmConfig *config, const AmOptions *opt)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(AmSpool) spool = NULL;
	g_autoptr(AmContext) ctx = NULL;
	AmRunner *runner;
	guint busy = 0;
	AmArchiveKey *key;
	char *pid_file;
	int rc;

	/* Step 1: the secret behind X-Archive-Id. */
	key = am_archive_key_load(config->archive_id_key_file, &error);
	if (key == NULL) {
		g_autofree char *where =
		    am_config_where(config, "milter", "archive_id_key_file");

		am_log_error("%s: %s", where, error->message);
		am_config_free(config);
		return EX_CONFIG;
	}
	ctx = am_context_new(config, key);
	am_milter_set_context(ctx);

	/* Step 2: spool, socket, pid file; then the workers. */
	if ((rc = start(ctx, &spool, opt)) != EX_OK) {
		am_milter_set_context(NULL);
		return rc;
	}
	pid_file = g_strdup(config->pid_file);
	runner = am_runner_start(spool, config->workers, &error);
	if (runner == NULL) {
		am_log_error("cannot start the spool workers: %s",
		             error->message);
		rc = EX_OSERR;
		goto out;
	}
	ctx->runner = runner;
	am_log_info("ready: listening on %s, %u rule(s), spool %s",
	            config->socket, config->rules->len, config->spool_dir);

	/* Step 3: serve until libmilter's signal thread says stop; copies
	 * being sent may finish within AM_STOP_GRACE_MS, the rest wait in
	 * the spool for next time.  A copy still being sent then is left
	 * as a crash would leave it, which the spool is made to survive:
	 * a stop must not wait for a stalled relay's time limits (minutes),
	 * longer than a service manager waits before SIGKILL, while no
	 * message is served and the MTA applies milter_default_action. */
	rc = smfi_main() == MI_SUCCESS ? EX_OK : EX_SOFTWARE;
	ctx->runner = NULL;
	if (!am_runner_stop_within(runner, AM_STOP_GRACE_MS, &busy)) {
		am_log_warning("stop: %u worker(s) still sending after %d s; "
		               "their copies stay in the spool and go again at "
		               "the next start (one the relay took meanwhile "
		               "may arrive twice, with the same X-Archive-Id)",
		               busy, AM_STOP_GRACE_MS / 1000);
		am_log_info("stopped");
		if (pid_file != NULL)
			unlink(pid_file);
		/* Not exit(): the workers still use what its handlers and
		 * the sanitizers' leak check would tear down. */
		_exit(rc);
	}
	am_log_info("stopped");
out:
	am_milter_set_context(NULL);
	if (pid_file != NULL)
		unlink(pid_file);
	g_free(pid_file);
	return rc;
}

int
main(int argc, char **argv)
{
	AmOptions opt = {0};
	AmConfig *config;
	int rc;

	if ((rc = parse_options(argc, argv, &opt)) != EX_OK)
		return rc == EX_OK_DONE ? EX_OK : rc;

	/* A relay that closes mid-write must give EPIPE, not kill us. */
	signal(SIGPIPE, SIG_IGN);
	/* DESIGN.md names SIGUSR1 as "reload": until reload exists, an
	 * operator who sends it must not take the mail flow down with
	 * the default action, which is to terminate. */
	signal(SIGUSR1, SIG_IGN);

	/* --check ends here; the path is freed on every way out, as the
	 * tests run the daemon under LeakSanitizer. */
	config = load_config(opt.config_path, opt.check);
	if (config != NULL && (opt.spool_list || opt.spool_retry != NULL)) {
		rc = opt.spool_list ? spool_list(config)
		                    : spool_retry(config, opt.spool_retry);
		am_config_free(config);
		g_free(opt.spool_retry);
		g_free(opt.config_path);
		return rc;
	}
	if (config == NULL || opt.check) {
		rc = config != NULL ? EX_OK : EX_CONFIG;
		if (config != NULL)
			print_summary(config);
		am_config_free(config);
		g_free(opt.config_path);
		return rc;
	}
	am_log_init("archive-milter", opt.foreground, opt.verbose);
	rc = run(config, &opt);
	g_free(opt.config_path);
	return rc;
}
