/*
 * log.h - archive-milter's log lines
 *
 * Every line the daemon writes goes through here: to standard error
 * (line-buffered, one line per event) when running in the foreground,
 * to syslog (LOG_MAIL) otherwise.  The delivery line of each archive
 * copy is built in one function, am_log_format_delivery(), so that its
 * format is defined in one place.
 */
#ifndef AM_LOG_H
#define AM_LOG_H

#include <glib.h>

G_BEGIN_DECLS

/* Outcome of one archive recipient of one copy, as Postfix names it. */
typedef enum {
	AM_STATUS_SENT,     /* the relay took it */
	AM_STATUS_DEFERRED, /* temporary failure: may succeed later */
	AM_STATUS_BOUNCED,  /* permanent failure */
} AmStatus;

/* "sent", "deferred" or "bounced" (static). */
const char *am_status_name(AmStatus status);

/*
 * am_log_init: choose the destination.  @foreground: standard error,
 * else syslog with @ident.  @verbose: also write am_log_debug() lines.
 * Call once, before any thread logs.
 */
void am_log_init(const char *ident, gboolean foreground, gboolean verbose);

/* Lines at a syslog priority; @fmt must not end in a newline. */
void am_log_info(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
void am_log_warning(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
void am_log_error(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/* Debug detail, written only with -v; start @fmt with the component. */
void am_log_debug(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/*
 * AmLogDelivery: the fields of one delivery line.  Strings are borrowed.
 */
typedef struct {
	const char *queue_id; /* NULL: "NOQUEUE" */
	const char *address;  /* archive address, bare */
	const char *relay;    /* "host[ip]:port"; NULL: "none" */
	double delay;         /* seconds */
	const char *dsn;      /* "X.Y.Z" */
	AmStatus status;
	const char *reply; /* the relay's reply or our reason */
} AmLogDelivery;

/*
 * am_log_format_delivery: the Postfix-style line
 *   QUEUEID: archive=<ADDR>, relay=HOST[IP]:PORT, delay=S, dsn=X.Y.Z,
 *   status=STATUS (REPLY)
 * Every field goes through am_log_sanitize(), so that a hostile relay
 * cannot forge a second log line.  (transfer full): g_free().
 */
char *am_log_format_delivery(const AmLogDelivery *d);

/* am_log_delivery: format and write the line at info level. */
void am_log_delivery(const AmLogDelivery *d);

/*
 * am_log_format_decision: the line for what the milter told the MTA:
 *   QUEUEID: action=ACTION, copies=N, failed=M (DETAIL)
 * (transfer full).  am_log_decision() writes it at info level.
 */
char *am_log_format_decision(const char *queue_id, const char *action,
                             guint copies, guint failed, const char *detail);
void am_log_decision(const char *queue_id, const char *action, guint copies,
                     guint failed, const char *detail);

/*
 * am_log_sanitize: a copy of @s (NULL: "") that is valid UTF-8 and
 * holds no character that could forge or disguise a line: every
 * control (C0, DEL, C1 U+0080 to U+009F), U+2028, U+2029 and every
 * format character (the bidirectional controls among them) becomes
 * '?', and so does each octet that is not part of valid UTF-8.  Cut to
 * at most @max bytes, on a character boundary.  Used for log lines and
 * for the reply text given to libmilter.  (transfer full).
 */
char *am_log_sanitize(const char *s, gsize max);

G_END_DECLS

#endif /* AM_LOG_H */
