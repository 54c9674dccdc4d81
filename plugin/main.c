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
 * Known limits: XXX: no SIGUSR1 reload and no privilege drop yet
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

static void
print_summary(const AmConfig *config)
{
	guint i;

	printf("%s: ok, %u relay(s), %u rule(s), match=%s\n", config->path,
	       config->relays->len, config->rules->len,
	       config->match_all ? "all" : "first");
	for (i = 0; i < config->relays->len; i++) {
		const AmRelay *r = config->relays->pdata[i];

		printf("relay %s: %s port %u, timeout %us\n", r->name, r->host,
		       r->port, r->timeout_ms / 1000);
	}
	for (i = 0; i < config->rules->len; i++) {
		const AmRule *r = config->rules->pdata[i];
		g_autofree char *to = g_strjoinv(">, <", r->archive_to);

		printf("rule %s: mode=%s, relay=%s, archive_to=<%s>, "
		       "archive_from=<%s>, on_failure=%s\n",
		       r->name, am_mode_name(r->mode), r->relay->name, to,
		       r->archive_from ? r->archive_from : "",
		       am_on_failure_name(r->on_failure));
	}
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

	config = load_config(opt.config_path, opt.check);
	if (config == NULL)
		return EX_CONFIG;
	if (opt.check) {
		print_summary(config);
		am_config_free(config);
		return EX_OK;
	}
	am_log_init("archive-milter", opt.foreground, opt.verbose);
	rc = run(config, &opt);
	g_free(opt.config_path);
	return rc;
}
