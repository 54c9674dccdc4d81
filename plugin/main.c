/*
 * main.c - archive-milter: options, start-up, --check
 *
 *   archive-milter -c FILE [-f] [-v] [--check]
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
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include "archive-id.h"
#include "conf.h"
#include "log.h"
#include "milter.h"

/* Postfix's default milter_content_timeout: how long it waits for the
 * milter's answer to the end of a message. */
#define AM_POSTFIX_CONTENT_TIMEOUT_MS 300000

typedef struct {
	char *config_path;
	gboolean foreground;
	gboolean check;
	gboolean verbose;
} AmOptions;

static int
parse_options(int argc, char **argv, AmOptions *opt)
{
	GOptionEntry entries[] = {
	    {"config", 'c', 0, G_OPTION_ARG_FILENAME, &opt->config_path,
	     "configuration file", "FILE"},
	    {"foreground", 'f', 0, G_OPTION_ARG_NONE, &opt->foreground,
	     "stay in the foreground and log to standard error", NULL},
	    {"check", 0, 0, G_OPTION_ARG_NONE, &opt->check,
	     "check the configuration and exit", NULL},
	    {"verbose", 'v', 0, G_OPTION_ARG_NONE, &opt->verbose,
	     "log debug detail", NULL},
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
	if (opt->config_path == NULL || argc > 1) {
		fprintf(stderr, "usage: archive-milter -c FILE [-f] [-v] "
		                "[--check]\n");
		return EX_USAGE;
	}
	return EX_OK;
}

/* --check looks at the key file but never creates it. */
static gboolean
check_key_file(const char *path, GPtrArray *errors)
{
	struct stat st;

	if (path == NULL)
		return TRUE;
	if (stat(path, &st) != 0) {
		if (errno == ENOENT)
			return TRUE;
		g_ptr_array_add(
		    errors, g_strdup_printf("%s: %s", path, g_strerror(errno)));
		return FALSE;
	}
	if ((st.st_mode & 0077) != 0 || st.st_size < AM_ARCHIVE_KEY_MIN) {
		g_ptr_array_add(
		    errors,
		    g_strdup_printf(
		        "%s: key file must be mode 0600 and hold at least "
		        "%d octets",
		        path, AM_ARCHIVE_KEY_MIN));
		return FALSE;
	}
	return TRUE;
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

/* The most archive addresses any rule sends through @relay (at least 1). */
static guint
max_recipients(const AmConfig *config, const AmRelay *relay)
{
	guint i, n = 1;

	for (i = 0; i < config->rules->len; i++) {
		const AmRule *rule = config->rules->pdata[i];

		if (rule->relay == relay)
			n = MAX(n, g_strv_length(rule->archive_to));
	}
	return n;
}

/*
 * A synchronous copy runs while Postfix waits for the milter's answer
 * to the end of the message; past milter_content_timeout (300 s by
 * default) Postfix gives up on the milter and applies its
 * milter_default_action, whatever the copy's outcome.  The worst case
 * counts EHLO, MAIL, one RCPT per archive address and DATA at the
 * command limit.  XXX: STARTTLS and AUTH add a few more round trips that
 * the estimate leaves out; copy_deadline still bounds them.
 */
static void
print_timeout_warnings(const AmConfig *config)
{
	const guint64 postfix_ms = AM_POSTFIX_CONTENT_TIMEOUT_MS;
	guint i;

	for (i = 0; i < config->relays->len; i++) {
		const AmRelay *r = config->relays->pdata[i];
		const SmtpTimeouts *t = &r->timeouts;
		guint n = max_recipients(config, r);
		guint64 worst = (guint64)t->connect_ms +
		                (guint64)t->command_ms * (3 + n) + t->data_ms +
		                t->final_ms;
		g_autofree char *w = NULL;

		if (worst <= postfix_ms)
			continue;
		w = seconds((guint)MIN(worst, G_MAXUINT));
		printf("WARNING: relay %s: its timeouts allow a copy to take "
		       "%s (timeout_connect + timeout_command * %u + "
		       "timeout_data + timeout_final), more than Postfix's "
		       "milter_content_timeout of 300s\n",
		       r->name, w, 3 + n);
	}
	if (config->copy_deadline_ms >= postfix_ms) {
		g_autofree char *d = seconds(config->copy_deadline_ms);

		printf("WARNING: copy_deadline %s is not below Postfix's "
		       "milter_content_timeout of 300s\n",
		       d);
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
	for (i = 0; i < config->relays->len; i++)
		print_relay(config->relays->pdata[i]);
	for (i = 0; i < config->rules->len; i++) {
		const AmRule *r = config->rules->pdata[i];
		g_autofree char *to = g_strjoinv(">, <", r->archive_to);
		g_autofree char *fail = am_action_format(r->on_failure);

		printf("rule %s: mode=%s, relay=%s, archive_to=<%s>, "
		       "archive_from=<%s>, on_failure=%s\n",
		       r->name, am_mode_name(r->mode), r->relay->name, to,
		       r->archive_from ? r->archive_from : "", fail);
	}
	print_timeout_warnings(config);
}

static AmConfig *
load_config(const char *path, gboolean check)
{
	g_autoptr(GPtrArray) errors = NULL;
	AmConfig *config = am_config_load(path, &errors);
	guint i;

	if (config != NULL && check &&
	    !check_key_file(config->archive_id_key_file, errors))
		g_clear_pointer(&config, am_config_free);
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
	if (smfi_opensocket(TRUE) != MI_SUCCESS) {
		am_log_error("cannot listen on milter socket %s", spec);
		return EX_UNAVAILABLE;
	}
	return EX_OK;
}

static int
run(AmConfig *config, const AmOptions *opt)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(AmContext) ctx = NULL;
	AmArchiveKey *key;
	int rc;

	/* Step 1: the secret behind X-Archive-Id. */
	key = am_archive_key_load(config->archive_id_key_file, &error);
	if (key == NULL) {
		am_log_error("%s", error->message);
		am_config_free(config);
		return EX_CONFIG;
	}
	ctx = am_context_new(config, key);
	am_milter_set_context(ctx);

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
	am_log_info("ready: listening on %s, %u rule(s)", config->socket,
	            config->rules->len);

	/* Step 3: serve until libmilter's signal thread says stop. */
	rc = smfi_main() == MI_SUCCESS ? EX_OK : EX_SOFTWARE;
	am_log_info("stopped");
	am_milter_set_context(NULL);
	return rc;
}

int
main(int argc, char **argv)
{
	AmOptions opt = {0};
	AmConfig *config;
	int rc;

	if ((rc = parse_options(argc, argv, &opt)) != EX_OK)
		return rc;

	/* A relay that closes mid-write must give EPIPE, not kill us. */
	signal(SIGPIPE, SIG_IGN);
	/* DESIGN.md names SIGUSR1 as "reload": until reload exists, an
	 * operator who sends it must not take the mail flow down with
	 * the default action, which is to terminate. */
	signal(SIGUSR1, SIG_IGN);

	/* --check ends here; the path is freed on every way out, as the
	 * tests run the daemon under LeakSanitizer. */
	config = load_config(opt.config_path, opt.check);
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
