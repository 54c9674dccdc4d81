/*
 * conf.h - archive-milter configuration: loading, validation, defaults
 *
 * One INI file read with GKeyFile.  Unlike GKeyFile alone, a duplicate
 * key or group is an error, an unknown key is an error, and every error
 * names the file, the line where it can, the group, the key and why.
 * Loading collects every error rather than stopping at the first, so
 * that `archive-milter --check` can print them all at once.
 *
 * Groups:
 *   [milter]          socket, archive_id_key_file, capture_memory_max,
 *                     match (first | all), copy_deadline
 *   [relay:NAME]      host, port, helo_name, timeout, timeout_connect,
 *                     timeout_command, timeout_data, timeout_final,
 *                     tls (none | may | encrypt | verify), ca_file,
 *                     auth_user, auth_password_file, auth_plaintext
 *   [rule:NAME]       mode, relay, archive_to, archive_from, on_failure,
 *                     match_sender, match_recipient, match_client,
 *                     match_header, min_size
 * Rules are kept in file order; the first that matches wins unless
 * [milter] match = all.
 */
#ifndef AM_CONF_H
#define AM_CONF_H

#include <glib.h>

#include "smtpclient.h"

G_BEGIN_DECLS

typedef enum {
	AM_MODE_JOURNAL, /* one copy to the archive address(es) */
} AmMode;

typedef enum {
	AM_ON_FAILURE_TEMPFAIL, /* no copy, no delivery: the default */
	AM_ON_FAILURE_ACCEPT,   /* deliver the original anyway */
} AmOnFailure;

typedef struct {
	char *name;               /* NAME of [relay:NAME] */
	char *host;               /* name or address literal, no brackets */
	guint16 port;             /* default 25 */
	SmtpTimeouts timeouts;    /* ms per stage, never 0: timeout_connect,
				 * _command, _data, _final, else timeout,
				 * else 30 s each, so that a copy stays well
				 * inside Postfix's 300 s
				 * milter_content_timeout */
	char *helo_name;          /* NULL: the library's default */
	SmtpTlsLevel tls;         /* effective level */
	gboolean tls_set;         /* TRUE: from the file; FALSE: the default
				 * of smtp_tls_default_for_host() */
	char *ca_file;            /* absolute, readable at load; NULL: the
				 * system store */
	char *auth_user;          /* NULL: no AUTH */
	char *auth_password_file; /* set with auth_user, absolute */
	char *auth_password;      /* its first line, read at load; wiped on
				 * free; never printed or logged */
	gboolean auth_plaintext;  /* AUTH allowed without TLS; default no */
	guint copy_deadline_ms;   /* [milter] copy_deadline, copied here so
				 * that a copy request carries it */
} AmRelay;

typedef struct {
	char *name; /* NAME of [rule:NAME] */
	AmMode mode;
	const AmRelay *relay; /* (transfer none): owned by the config */
	char **archive_to;    /* NULL-terminated, at least one address */
	char *archive_from;   /* "" (the null sender) by default */
	AmOnFailure on_failure;

	/* Selection: every criterion set must match; none set: all mail.
	 * Each GRegex is case-insensitive and NULL when not configured. */
	GRegex *match_sender;    /* envelope sender, bare address */
	GRegex *match_recipient; /* any envelope recipient */
	GRegex *match_client;    /* client address, e.g. "127.0.0.1" */
	GRegex *match_header;    /* any "Name: value" header line, unfolded */
	guint64 min_size;        /* octets; 0: no limit */
} AmRule;

typedef struct {
	char *path;                /* the file this was loaded from */
	char *socket;              /* libmilter socket spec, required */
	char *archive_id_key_file; /* secret for X-Archive-Id; created
				 * (0600, random) if missing */
	gsize capture_memory_max;  /* octets kept in memory per message
				 * before spilling to a temporary file;
				 * default 1 MiB */
	gboolean match_all;        /* every matching rule copies */
	guint copy_deadline_ms;    /* overall limit of one synchronous copy,
				 * every stage included; default 120 s */
	GPtrArray *relays;         /* AmRelay *, file order */
	GPtrArray *rules;          /* AmRule *, file order, at least one */
} AmConfig;

/*
 * am_config_load: read and validate @path.
 *
 * Returns: (transfer full) the configuration, or NULL when anything is
 * wrong.  @errors receives (transfer full) an array of messages, one
 * per problem, each "FILE:LINE: [GROUP] KEY: reason" (":LINE" omitted
 * where no line is known); it is empty on success.  Free the
 * configuration with am_config_free().
 */
AmConfig *am_config_load(const char *path, GPtrArray **errors);

void am_config_free(AmConfig *config);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmConfig, am_config_free)

/* am_config_find_relay: the relay named @name, or NULL. (transfer none) */
const AmRelay *am_config_find_relay(const AmConfig *config, const char *name);

/* Names for logs and --check output, static strings. */
const char *am_mode_name(AmMode mode);
const char *am_on_failure_name(AmOnFailure on_failure);

G_END_DECLS

#endif /* AM_CONF_H */
