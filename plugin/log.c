/*
 * log.c - log destination and the one delivery line
 *
 * Foreground mode writes each line with one fputs() of a complete line,
 * so that lines of concurrent sessions never interleave (stdio locks
 * the stream per call).  Syslog mode uses LOG_MAIL, as Postfix does, so
 * that the lines land next to the MTA's own.
 *
 * Known limits: the destination is chosen once at start; there is no
 * reopening of a log file (there is no log file).
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include "log.h"

/* Longest relay reply kept in a line: enough for any real reply. */
#define AM_LOG_REPLY_MAX 512

static gboolean log_foreground = TRUE;
static gboolean log_verbose;
static char *log_ident;

const char *
am_status_name(AmStatus status)
{
	switch (status) {
	case AM_STATUS_SENT:
		return "sent";
	case AM_STATUS_DEFERRED:
		return "deferred";
	case AM_STATUS_BOUNCED:
		return "bounced";
	}
	return "unknown";
}

void
am_log_init(const char *ident, gboolean foreground, gboolean verbose)
{
	g_free(log_ident);
	log_ident = g_strdup(ident);
	log_foreground = foreground;
	log_verbose = verbose;
	if (foreground) {
		/* Tests read stderr line by line while we run. */
		setvbuf(stderr, NULL, _IOLBF, 0);
	} else {
		openlog(log_ident, LOG_PID | LOG_NDELAY, LOG_MAIL);
	}
}

static const char *
priority_name(int priority)
{
	switch (priority) {
	case LOG_ERR:
		return "error: ";
	case LOG_WARNING:
		return "warning: ";
	case LOG_DEBUG:
		return "debug: ";
	default:
		return "";
	}
}

static void
log_write(int priority, const char *fmt, va_list ap)
{
	g_autofree char *msg = g_strdup_vprintf(fmt, ap);
	g_autofree char *line = NULL;

	if (!log_foreground) {
		syslog(priority, "%s%s", priority_name(priority), msg);
		return;
	}
	line = g_strdup_printf("%s[%ld]: %s%s\n",
	                       log_ident ? log_ident : "archive-milter",
	                       (long)getpid(), priority_name(priority), msg);
	fputs(line, stderr);
}

void
am_log_info(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_write(LOG_INFO, fmt, ap);
	va_end(ap);
}

void
am_log_warning(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_write(LOG_WARNING, fmt, ap);
	va_end(ap);
}

void
am_log_error(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_write(LOG_ERR, fmt, ap);
	va_end(ap);
}

void
am_log_debug(const char *fmt, ...)
{
	va_list ap;

	if (!log_verbose)
		return;
	va_start(ap, fmt);
	log_write(LOG_DEBUG, fmt, ap);
	va_end(ap);
}

/*
 * Characters that must not reach a log line or a reply text: every
 * control (C0, DEL and C1, among them NEL U+0085 and CSI U+009B, which
 * terminals and some log readers take as a line break or an escape),
 * the Unicode line and paragraph separators U+2028 and U+2029, and
 * format characters (Cf), among them the bidirectional controls
 * (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069) that
 * make a line read other than it is.
 */
static gboolean
unsafe_char(gunichar c)
{
	switch (g_unichar_type(c)) {
	case G_UNICODE_CONTROL:
	case G_UNICODE_FORMAT:
	case G_UNICODE_LINE_SEPARATOR:
	case G_UNICODE_PARAGRAPH_SEPARATOR:
		return TRUE;
	default:
		return FALSE;
	}
}

char *
am_log_sanitize(const char *s, gsize max)
{
	GString *out = g_string_new(NULL);
	const char *end;

	if (s == NULL)
		return g_string_free(out, FALSE);
	end = s + strlen(s);
	while (*s != '\0') {
		gunichar c = g_utf8_get_char_validated(s, end - s);
		gsize len;

		if (c == (gunichar)-1 || c == (gunichar)-2) {
			/* Not UTF-8: one octet, one '?'. */
			if (out->len + 1 > max)
				break;
			g_string_append_c(out, '?');
			s++;
			continue;
		}
		len = g_utf8_next_char(s) - s;
		/* A whole character or none: never half a sequence. */
		if (out->len + (unsafe_char(c) ? 1 : len) > max)
			break;
		if (unsafe_char(c))
			g_string_append_c(out, '?');
		else
			g_string_append_len(out, s, len);
		s += len;
	}
	return g_string_free(out, FALSE);
}

char *
am_log_format_delivery(const AmLogDelivery *d)
{
	g_autofree char *qid =
	    am_log_sanitize(d->queue_id ? d->queue_id : "NOQUEUE", 64);
	g_autofree char *addr = am_log_sanitize(d->address, 512);
	g_autofree char *relay =
	    am_log_sanitize(d->relay ? d->relay : "none", 512);
	g_autofree char *dsn = am_log_sanitize(d->dsn, 16);
	g_autofree char *reply = am_log_sanitize(d->reply, AM_LOG_REPLY_MAX);

	return g_strdup_printf("%s: archive=<%s>, relay=%s, delay=%.2f, "
	                       "dsn=%s, status=%s (%s)",
	                       qid, addr, relay, d->delay < 0 ? 0.0 : d->delay,
	                       dsn, am_status_name(d->status), reply);
}

void
am_log_delivery(const AmLogDelivery *d)
{
	g_autofree char *line = am_log_format_delivery(d);

	am_log_info("%s", line);
}

char *
am_log_format_decision(const char *queue_id, const char *action, guint copies,
                       guint failed, const char *detail)
{
	g_autofree char *qid =
	    am_log_sanitize(queue_id ? queue_id : "NOQUEUE", 64);
	g_autofree char *text = am_log_sanitize(detail, AM_LOG_REPLY_MAX);

	return g_strdup_printf("%s: action=%s, copies=%u, failed=%u (%s)", qid,
	                       action, copies, failed, text);
}

void
am_log_decision(const char *queue_id, const char *action, guint copies,
                guint failed, const char *detail)
{
	g_autofree char *line =
	    am_log_format_decision(queue_id, action, copies, failed, detail);

	am_log_info("%s", line);
}
