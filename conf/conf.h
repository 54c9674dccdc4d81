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
 *                     match (first | all), copy_deadline, pid_file,
 *                     spool_dir, workers, spool_min_free, spool_max_age,
 *                     spool_retry_min, spool_retry_max
 *   [relay:NAME]      host, port, helo_name, timeout, timeout_connect,
 *                     timeout_command, timeout_data, timeout_final,
 *                     tls (none | may | encrypt | verify), ca_file,
 *                     auth_user, auth_password_file, auth_plaintext
 *   [rule:NAME]       mode, relay, archive_to, archive_from, delivery
 *                     (sync | spool), on_failure, on_OUTCOME for each
 *                     outcome of AmOutcome, reject_text, match_sender,
 *                     match_recipient, match_client, match_header,
 *                     min_size
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
	AM_DELIVERY_SYNC,  /* the copy is sent at end of message */
	AM_DELIVERY_SPOOL, /* the copy is written to the spool, fsynced,
			    * then delivered by a worker */
} AmDeliveryMode;

/*
 * AmOutcome: what became of one copy, as the policy table names it.
 * Classified from the library's result or error (deliver.c):
 *   SENT            every archive address taken
 *   SOME_REFUSED    some addresses refused at RCPT, the rest taken
 *   ALL_REFUSED     every address refused at RCPT
 *   SENDER_REFUSED  MAIL refused
 *   DATA_ERROR      DATA or the final dot refused; also a copy the
 *                   relay cannot take (SMTPUTF8 not offered) or a local
 *                   failure to read the captured message
 *   UNREACHABLE     no connection, refused greeting or EHLO, AUTH
 *                   failure, protocol garbage, or the connection lost
 *                   (SMTP_ERROR_DISCONNECTED, including 421)
 *   TIMEOUT         a stage limit or copy_deadline ran out
 *   TLS_ERROR       STARTTLS required but not offered, or failed
 */
typedef enum {
	AM_OUTCOME_SENT,
	AM_OUTCOME_SOME_REFUSED,
	AM_OUTCOME_ALL_REFUSED,
	AM_OUTCOME_SENDER_REFUSED,
	AM_OUTCOME_DATA_ERROR,
	AM_OUTCOME_UNREACHABLE,
	AM_OUTCOME_TIMEOUT,
	AM_OUTCOME_TLS_ERROR,
	AM_OUTCOME_COUNT
} AmOutcome;

/*
 * Actions of the policy table, combined as a bit set ("spool+header").
 * The valid sets (anything else is a configuration error naming the
 * key):
 *   accept [+header]              accept the original; a copy not
 *                                 confirmed goes to the spool's hold/
 *   spool [+quarantine] [+header] accept (quarantine: Postfix hold
 *                                 queue); the copy goes to the spool
 *                                 queue for retry
 *   tempfail                      451 for the original
 *   reject                        550 for the original, with the
 *                                 relay's code and text, or reject_text
 *   header alone means accept+header.  on_sent takes accept[+header]
 *   only.  With delivery = spool the milter has answered before the
 *   outcome is known, so only retry (tempfail or spool) and stop
 *   (accept: the copy moves to hold/) apply; reject, quarantine and
 *   header there are errors.
 */
typedef enum {
	AM_ACTION_ACCEPT = 1 << 0,
	AM_ACTION_TEMPFAIL = 1 << 1,
	AM_ACTION_REJECT = 1 << 2,
	AM_ACTION_QUARANTINE = 1 << 3,
	AM_ACTION_SPOOL = 1 << 4,
	AM_ACTION_HEADER = 1 << 5,
} AmAction;

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
				 * that a copy request carries it (the
				 * limit of all a message's sync copies
				 * together: milter.c may pass less) */
} AmRelay;

typedef struct {
	char *name; /* NAME of [rule:NAME] */
	AmMode mode;
	const AmRelay *relay; /* (transfer none): owned by the config */
	char **archive_to;    /* NULL-terminated, at least one address */
	char *archive_from;   /* "" (the null sender) by default */
	AmDeliveryMode delivery;
	guint on_failure;                /* AmAction set; 0: not set */
	guint actions[AM_OUTCOME_COUNT]; /* on_OUTCOME; 0: not set */
	char *reject_text;               /* NULL: the relay's reply; else
					  * printable ASCII, no '%', at
					  * most 200 characters */

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
	guint copy_deadline_ms;    /* overall limit of all the synchronous
				 * copies of one message together, every
				 * stage included; default 120 s */
	char *pid_file;            /* NULL: none written */
	char *spool_dir;           /* default /var/spool/archive-milter */
	guint workers;             /* spool delivery threads; default 4 */
	guint64 spool_min_free;    /* octets that must stay free on the
				 * spool's file system; default 100 MiB */
	guint spool_max_age_s;     /* a queued copy older moves to hold/;
				 * default 5 days.  The three durations
				 * are written as seconds or with one
				 * unit s, m, h, d ("5d"), 1 s to 365 d */
	guint spool_retry_min_s;   /* first retry delay; default 60 s,
				 * doubling per attempt */
	guint spool_retry_max_s;   /* longest retry delay; default 1 h */
	GPtrArray *relays;         /* AmRelay *, file order */
	GPtrArray *rules;          /* AmRule *, file order, at least one */
	GHashTable *key_lines;     /* private: where each key was set, for
				 * am_config_key_line() */
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

/*
 * am_config_key_line: the line of config->path where [@group] @key was
 * set (the last time, the value kept), or 0 when the file leaves it at
 * its default.
 */
guint am_config_key_line(const AmConfig *config, const char *group,
                         const char *key);

/*
 * am_config_where: where a value came from, to start a message about a
 * problem found after loading (a key file the daemon cannot use):
 * "FILE:LINE: [GROUP] KEY", or "FILE: [GROUP] KEY (default)" when the
 * file does not set it.  (transfer full)
 */
char *am_config_where(const AmConfig *config, const char *group,
                      const char *key);

/* Names for logs and --check output, static strings. */
const char *am_mode_name(AmMode mode);
const char *am_delivery_mode_name(AmDeliveryMode delivery);
/* "some_refused" etc., as in the key on_some_refused. */
const char *am_outcome_name(AmOutcome outcome);

/*
 * am_action_parse: @text ("spool+header") as an AmAction set, checked
 * against the valid sets above for @outcome (AM_OUTCOME_COUNT: the
 * on_failure key) and @delivery.  Names are lower case, each at most
 * once, joined by '+' (blanks around '+' allowed); "header" alone is
 * stored as ACCEPT|HEADER.  FALSE with @why (nullable; transfer full)
 * the reason, to be prefixed with file, line and key by the caller;
 * *@actions is then left as it was.
 */
gboolean am_action_parse(const char *text, AmOutcome outcome,
                         AmDeliveryMode delivery, guint *actions, char **why);

/*
 * am_action_format: "spool+quarantine+header": the original's fate
 * first, then the copy's, then the header; "default" for 0, bits
 * without a name left out.  am_action_parse reads it back.
 * (transfer full) free with g_free()
 */
char *am_action_format(guint actions);

/*
 * am_rule_action: the action set for @outcome of a copy under @rule.
 * @temporary: a retry might succeed (smtp_error_is_temporary, or a 4xx
 * refusal).  In order: on_OUTCOME, then on_failure for any outcome but
 * SENT, then the defaults, which never lose a copy:
 *   SENT                      accept
 *   temporary, sync           tempfail
 *   temporary, spool          spool (retry)
 *   permanent                 accept (the copy kept in hold/, and an
 *                             error line in the log)
 * The set is returned as configured: with delivery = spool, tempfail
 * and spool both mean "retry" and the caller treats them alike.
 * @temporary matters only where neither key is set.
 */
guint am_rule_action(const AmRule *rule, AmOutcome outcome, gboolean temporary);

G_END_DECLS

#endif /* AM_CONF_H */
