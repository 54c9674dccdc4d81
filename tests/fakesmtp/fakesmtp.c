/*
 * fakesmtp.c - the scripted fake SMTP server of the tests
 *
 * Implements fakesmtp.h: a parser for the script language, a listener
 * thread, and one thread per connection running a small SMTP state
 * machine whose every reply the script may override.  All threads poll
 * the read end of one self-pipe besides their socket; fake_smtp_stop
 * writes a byte to it and every thread, even a stalled or delayed one,
 * wakes, closes its socket and returns, so stopping never hangs.
 *
 * Known limits:
 * XXX: no STARTTLS and no AUTH; both answer 502 unless scripted.  A test
 * of TLS needs a real server; this one only fakes the dialogue.
 * XXX: no BDAT (CHUNKING); BDAT is an unknown command here.
 * XXX: everything received stays in memory until fake_smtp_free; fine
 * for tests, not for a long soak that sends gigabytes.
 */
#include "fakesmtp.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <glib/gstdio.h>

/* A command line longer than this is refused and skipped up to its LF:
 * RFC 5321 section 4.5.3.1.4 allows 512 octets, extensions some more. */
#define MAX_LINE (64 * 1024)

/* One thread per connection; beyond this many a client gets 421, so a
 * runaway test fails instead of exhausting the threads of the host. */
#define MAX_CONNECTIONS 512

GQuark
fake_smtp_error_quark(void)
{
	return g_quark_from_static_string("fake-smtp-error-quark");
}

/* The verbs a rule may name; DOT is the end of message data. */
typedef enum {
	VERB_EHLO,
	VERB_HELO,
	VERB_MAIL,
	VERB_RCPT,
	VERB_DATA,
	VERB_RSET,
	VERB_NOOP,
	VERB_QUIT,
	VERB_STARTTLS,
	VERB_AUTH,
	VERB_DOT,
	VERB_OTHER,
	N_VERBS,
	VERB_UNKNOWN = N_VERBS,
} Verb;

static const char *const verb_names[N_VERBS] = {
    "EHLO", "HELO", "MAIL",     "RCPT", "DATA", "RSET",
    "NOOP", "QUIT", "STARTTLS", "AUTH", "DOT",  "OTHER",
};

typedef enum {
	ACTION_REPLY,
	ACTION_CLOSE,
	ACTION_STALL,
	ACTION_DELAY,
	ACTION_RAW,
	ACTION_CLOSE_IN_DATA,
} ActionKind;

typedef struct {
	Verb verb;
	guint nth;     /* 1-based, per connection; 0: every one */
	GRegex *regex; /* nullable; matched against the argument */
	ActionKind kind;
	guint delay_ms; /* ACTION_DELAY only, milliseconds */
	GBytes *text;   /* bytes to send, CRLFs included; nullable */
	int code;       /* reply code of the last line; 0: unknown */
} Rule;

struct FakeSmtp {
	/* The script: set by fake_smtp_new, read-only afterwards. */
	GBytes *greeting; /* nullable: "greeting none" */
	int greeting_code;
	GBytes *ehlo_reply;
	GPtrArray *rules; /* Rule *, first match wins */

	/* The listener: touched only by the thread that starts and stops. */
	gboolean running;
	int listen_fd;
	int stop_pipe[2]; /* a byte in [0] tells every thread to end */
	GThread *accept_thread;
	char *store_dir; /* nullable */

	/* What was received: under lock. */
	GMutex lock;
	GCond cond;   /* broadcast on each new message */
	GList *conns; /* Conn *, running or done, not yet joined */
	GByteArray *received;
	GPtrArray *commands; /* char * */
	GPtrArray *messages; /* FakeSmtpMessage * */
	guint connections;
};

typedef struct {
	FakeSmtp *fake;
	int fd;
	GThread *thread;
	gboolean done; /* under fake->lock: the thread may be joined */

	GByteArray *in;        /* received, not yet consumed */
	gboolean skipping;     /* inside an over-long line, up to its LF */
	guint counts[N_VERBS]; /* commands seen per verb, this connection */

	/* The transaction, reset by MAIL, RSET, EHLO, HELO and the dot. */
	char *mail_from;  /* nullable: no MAIL accepted yet */
	GPtrArray *rcpts; /* char *: arguments of accepted RCPTs */

	/* Message data. */
	gboolean in_data;
	gboolean close_in_data; /* close once the first data arrives */
	GByteArray *wire;       /* the payload so far, dot-stuffed */
	gsize scan;             /* where the search for the end goes on */
} Conn;

typedef enum {
	STEP_MORE, /* go on reading */
	STEP_END,  /* close the connection */
} Step;

static void
rule_free(gpointer data)
{
	Rule *rule = data;

	if (rule->regex != NULL)
		g_regex_unref(rule->regex);
	if (rule->text != NULL)
		g_bytes_unref(rule->text);
	g_free(rule);
}

static void
message_free(gpointer data)
{
	FakeSmtpMessage *msg = data;

	g_free(msg->mail_from);
	g_ptr_array_unref(msg->rcpt_to);
	g_bytes_unref(msg->wire);
	g_bytes_unref(msg->content);
	g_free(msg);
}

/* ---- script parsing ---------------------------------------------- */

static Verb
verb_lookup(const char *name)
{
	for (int i = 0; i < N_VERBS; i++)
		if (g_ascii_strcasecmp(name, verb_names[i]) == 0)
			return (Verb)i;
	return VERB_UNKNOWN;
}

/* The code of a wire reply: the first three digits of its last line. */
static int
reply_code(const char *text, gsize len)
{
	gsize end = len;
	gsize start;

	while (end > 0 && (text[end - 1] == '\n' || text[end - 1] == '\r'))
		end--;
	start = end;
	while (start > 0 && text[start - 1] != '\n')
		start--;
	if (end - start < 3 || !g_ascii_isdigit(text[start]) ||
	    !g_ascii_isdigit(text[start + 1]) ||
	    !g_ascii_isdigit(text[start + 2]))
		return 0;
	return (text[start] - '0') * 100 + (text[start + 1] - '0') * 10 +
	       (text[start + 2] - '0');
}

/*
 * A script REPLY, "250-a|250 b", to wire form with CRLFs.  Each line
 * must open with a code, so a typo does not become a malformed reply the
 * test did not mean; a deliberately malformed one is what raw is for.
 */
static GBytes *
parse_reply(const char *spec, guint lineno, GError **error)
{
	g_auto(GStrv) lines = g_strsplit(spec, "|", -1);
	g_autoptr(GString) out = g_string_new(NULL);

	if (lines[0] == NULL) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: bad reply \"\": each line "
		            "needs a three-digit code",
		            lineno);
		return NULL;
	}
	for (guint i = 0; lines[i] != NULL; i++) {
		const char *l = lines[i];

		if (strlen(l) < 3 || !g_ascii_isdigit(l[0]) ||
		    !g_ascii_isdigit(l[1]) || !g_ascii_isdigit(l[2]) ||
		    (l[3] != '\0' && l[3] != ' ' && l[3] != '-')) {
			g_set_error(error, FAKE_SMTP_ERROR,
			            FAKE_SMTP_ERROR_SCRIPT,
			            "script line %u: bad reply \"%s\": each "
			            "line needs a three-digit code",
			            lineno, l);
			return NULL;
		}
		g_string_append(out, l);
		g_string_append(out, "\r\n");
	}
	return g_string_free_to_bytes(g_steal_pointer(&out));
}

static int
hex_value(char c)
{
	if (!g_ascii_isxdigit(c))
		return -1;
	return g_ascii_xdigit_value(c);
}

/* raw TEXT: C escapes \r \n \t \\ \xHH; nothing is added. */
static GBytes *
parse_raw(const char *spec, guint lineno, GError **error)
{
	g_autoptr(GByteArray) out = g_byte_array_new();

	for (const char *p = spec; *p != '\0'; p++) {
		guint8 byte = (guint8)*p;

		if (*p == '\\') {
			p++;
			switch (*p) {
			case 'r':
				byte = '\r';
				break;
			case 'n':
				byte = '\n';
				break;
			case 't':
				byte = '\t';
				break;
			case '\\':
				byte = '\\';
				break;
			case 'x':
				if (hex_value(p[1]) < 0 || hex_value(p[2]) < 0)
					goto bad;
				byte = (guint8)(hex_value(p[1]) * 16 +
				                hex_value(p[2]));
				p += 2;
				break;
			default:
				goto bad;
			}
		}
		g_byte_array_append(out, &byte, 1);
	}
	if (out->len == 0) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: raw needs some text", lineno);
		return NULL;
	}
	return g_byte_array_free_to_bytes(g_steal_pointer(&out));

bad:
	g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
	            "script line %u: bad escape in raw text (use \\r \\n "
	            "\\t \\\\ \\xHH)",
	            lineno);
	return NULL;
}

/* Splits off the first whitespace-separated word of *rest. */
static char *
next_word(const char **rest)
{
	const char *p = *rest;
	const char *start;

	while (g_ascii_isspace(*p))
		p++;
	start = p;
	while (*p != '\0' && !g_ascii_isspace(*p))
		p++;
	*rest = p;
	while (g_ascii_isspace(**rest))
		(*rest)++;
	if (p == start)
		return NULL;
	return g_strndup(start, (gsize)(p - start));
}

/* VERB or VERB#N */
static gboolean
parse_verb(Rule *rule, const char *word, guint lineno, GError **error)
{
	g_autofree char *name = g_strdup(word);
	char *hash = strchr(name, '#');

	if (hash != NULL) {
		guint64 n;

		*hash = '\0';
		if (!g_ascii_string_to_unsigned(hash + 1, 10, 1, G_MAXUINT, &n,
		                                NULL)) {
			g_set_error(error, FAKE_SMTP_ERROR,
			            FAKE_SMTP_ERROR_SCRIPT,
			            "script line %u: bad count \"%s\" (want "
			            "VERB#N, N from 1)",
			            lineno, hash + 1);
			return FALSE;
		}
		rule->nth = (guint)n;
	}
	rule->verb = verb_lookup(name);
	if (rule->verb == VERB_UNKNOWN) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: unknown verb \"%s\"", lineno,
		            name);
		return FALSE;
	}
	return TRUE;
}

/*
 * /REGEX/: up to the first unescaped '/', so "\/" matches a slash.
 * Compiled raw: arguments from a client need not be UTF-8.
 */
static gboolean
parse_regex(Rule *rule, const char **rest, guint lineno, GError **error)
{
	const char *start = *rest + 1;
	const char *p = start;
	g_autofree char *pattern = NULL;
	g_autoptr(GError) local = NULL;

	while (*p != '\0' && *p != '/') {
		if (*p == '\\' && p[1] != '\0')
			p++;
		p++;
	}
	if (*p != '/') {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: regex has no closing '/'", lineno);
		return FALSE;
	}
	pattern = g_strndup(start, (gsize)(p - start));
	rule->regex = g_regex_new(pattern, G_REGEX_RAW, 0, &local);
	if (rule->regex == NULL) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: bad regex /%s/: %s", lineno,
		            pattern, local->message);
		return FALSE;
	}
	p++;
	while (g_ascii_isspace(*p))
		p++;
	*rest = p;
	return TRUE;
}

static gboolean
parse_action(Rule *rule, const char *rest, guint lineno, GError **error)
{
	g_autofree char *action = next_word(&rest);

	if (action == NULL) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: missing action", lineno);
		return FALSE;
	}
	if (strcmp(action, "reply") == 0) {
		rule->kind = ACTION_REPLY;
		rule->text = parse_reply(rest, lineno, error);
	} else if (strcmp(action, "raw") == 0) {
		rule->kind = ACTION_RAW;
		rule->text = parse_raw(rest, lineno, error);
	} else if (strcmp(action, "delay") == 0) {
		g_autofree char *ms = next_word(&rest);
		guint64 n;

		rule->kind = ACTION_DELAY;
		if (ms == NULL || !g_ascii_string_to_unsigned(
		                      ms, 10, 0, G_MAXINT, &n, NULL)) {
			g_set_error(error, FAKE_SMTP_ERROR,
			            FAKE_SMTP_ERROR_SCRIPT,
			            "script line %u: delay needs "
			            "milliseconds and a reply",
			            lineno);
			return FALSE;
		}
		rule->delay_ms = (guint)n;
		/* "delay 300 reply 250 ok" reads naturally: allow it. */
		if (g_str_has_prefix(rest, "reply ") ||
		    strcmp(rest, "reply") == 0)
			g_free(next_word(&rest));
		rule->text = parse_reply(rest, lineno, error);
	} else if (strcmp(action, "close") == 0 ||
	           strcmp(action, "stall") == 0 ||
	           strcmp(action, "close-in-data") == 0) {
		if (*rest != '\0') {
			g_set_error(error, FAKE_SMTP_ERROR,
			            FAKE_SMTP_ERROR_SCRIPT,
			            "script line %u: %s takes no argument",
			            lineno, action);
			return FALSE;
		}
		rule->kind = action[0] == 's'    ? ACTION_STALL
		             : action[5] == '\0' ? ACTION_CLOSE
		                                 : ACTION_CLOSE_IN_DATA;
		if (rule->kind == ACTION_CLOSE_IN_DATA &&
		    rule->verb != VERB_DATA) {
			g_set_error(error, FAKE_SMTP_ERROR,
			            FAKE_SMTP_ERROR_SCRIPT,
			            "script line %u: close-in-data is for "
			            "DATA only",
			            lineno);
			return FALSE;
		}
		return TRUE;
	} else {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: unknown action \"%s\"", lineno,
		            action);
		return FALSE;
	}
	if (rule->text == NULL)
		return FALSE;
	rule->code = reply_code(g_bytes_get_data(rule->text, NULL),
	                        g_bytes_get_size(rule->text));
	return TRUE;
}

/* on VERB[#N] [/REGEX/] ACTION */
static Rule *
parse_rule(const char *rest, guint lineno, GError **error)
{
	g_autoptr(GPtrArray) holder = g_ptr_array_new_with_free_func(rule_free);
	Rule *rule = g_new0(Rule, 1);
	g_autofree char *verb = next_word(&rest);

	g_ptr_array_add(holder, rule);
	if (verb == NULL) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: \"on\" needs a verb", lineno);
		return NULL;
	}
	/* "RCPT #2" is read as "RCPT#2": an easy slip to forgive. */
	if (strchr(verb, '#') == NULL && rest[0] == '#') {
		g_autofree char *count = next_word(&rest);
		char *joined = g_strconcat(verb, count, NULL);

		g_free(verb);
		verb = joined;
	}
	if (!parse_verb(rule, verb, lineno, error))
		return NULL;
	if (*rest == '/' && !parse_regex(rule, &rest, lineno, error))
		return NULL;
	if (!parse_action(rule, rest, lineno, error))
		return NULL;
	return g_ptr_array_steal_index(holder, 0);
}

/* Keywords that start a new EHLO line even right after AUTH. */
static gboolean
is_known_keyword(const char *word)
{
	static const char *const known[] = {
	    "8BITMIME",
	    "AUTH",
	    "BINARYMIME",
	    "CHUNKING",
	    "DELIVERBY",
	    "DSN",
	    "ENHANCEDSTATUSCODES",
	    "ETRN",
	    "EXPN",
	    "HELP",
	    "LIMITS",
	    "MTRK",
	    "PIPELINING",
	    "REQUIRETLS",
	    "SIZE",
	    "SMTPUTF8",
	    "STARTTLS",
	    "VRFY",
	    "XCLIENT",
	    "XFORWARD",
	};

	for (gsize i = 0; i < G_N_ELEMENTS(known); i++)
		if (g_ascii_strcasecmp(word, known[i]) == 0)
			return TRUE;
	return FALSE;
}

/*
 * ehlo-keywords: one EHLO line per keyword.  A number belongs to the
 * keyword before it ("SIZE 1000"), as do the
 * mechanisms after AUTH up to the next well-known keyword ("AUTH PLAIN
 * LOGIN"); shell quotes group anything else ("X-FOO a b").
 */
static GBytes *
build_ehlo_reply(const char *spec, guint lineno, GError **error)
{
	g_auto(GStrv) words = NULL;
	g_autoptr(GPtrArray) lines = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GString) out = g_string_new(NULL);
	g_autoptr(GError) local = NULL;
	gboolean in_auth = FALSE;

	if (*spec != '\0' && !g_shell_parse_argv(spec, NULL, &words, &local)) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
		            "script line %u: bad ehlo-keywords: %s", lineno,
		            local->message);
		return NULL;
	}
	for (guint i = 0; words != NULL && words[i] != NULL; i++) {
		const char *w = words[i];
		gboolean joins =
		    lines->len > 0 && !is_known_keyword(w) &&
		    (in_auth || strspn(w, "0123456789") == strlen(w));

		if (strpbrk(w, "\r\n") != NULL) {
			g_set_error(error, FAKE_SMTP_ERROR,
			            FAKE_SMTP_ERROR_SCRIPT,
			            "script line %u: line break in an EHLO "
			            "keyword",
			            lineno);
			return NULL;
		}
		if (joins) {
			char **last = (char **)&lines->pdata[lines->len - 1];
			char *joined = g_strconcat(*last, " ", w, NULL);

			g_free(*last);
			*last = joined;
			continue;
		}
		in_auth = g_ascii_strcasecmp(w, "AUTH") == 0;
		g_ptr_array_add(lines, g_strdup(w));
	}

	g_string_append(out, lines->len > 0 ? "250-fakesmtp\r\n"
	                                    : "250 fakesmtp\r\n");
	for (guint i = 0; i < lines->len; i++)
		g_string_append_printf(out, "250%c%s\r\n",
		                       i + 1 < lines->len ? '-' : ' ',
		                       (char *)lines->pdata[i]);
	return g_string_free_to_bytes(g_steal_pointer(&out));
}

static gboolean
parse_greeting(FakeSmtp *fake, const char *rest, guint lineno, GError **error)
{
	g_clear_pointer(&fake->greeting, g_bytes_unref);
	fake->greeting_code = 0;
	if (strcmp(rest, "none") == 0)
		return TRUE;
	fake->greeting = parse_reply(rest, lineno, error);
	if (fake->greeting == NULL)
		return FALSE;
	fake->greeting_code = reply_code(g_bytes_get_data(fake->greeting, NULL),
	                                 g_bytes_get_size(fake->greeting));
	return TRUE;
}

static gboolean
parse_line(FakeSmtp *fake, char *line, guint lineno, GError **error)
{
	const char *rest;
	g_autofree char *directive = NULL;
	Rule *rule;

	g_strstrip(line);
	if (line[0] == '\0' || line[0] == '#')
		return TRUE;
	rest = line;
	directive = next_word(&rest);

	if (strcmp(directive, "greeting") == 0)
		return parse_greeting(fake, rest, lineno, error);
	if (strcmp(directive, "ehlo-keywords") == 0) {
		GBytes *reply = build_ehlo_reply(rest, lineno, error);

		if (reply == NULL)
			return FALSE;
		g_bytes_unref(fake->ehlo_reply);
		fake->ehlo_reply = reply;
		return TRUE;
	}
	if (strcmp(directive, "on") == 0) {
		rule = parse_rule(rest, lineno, error);
		if (rule == NULL)
			return FALSE;
		g_ptr_array_add(fake->rules, rule);
		return TRUE;
	}
	g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_SCRIPT,
	            "script line %u: unknown directive \"%s\"", lineno,
	            directive);
	return FALSE;
}

FakeSmtp *
fake_smtp_new(const char *script, GError **error)
{
	g_autoptr(FakeSmtp) fake = g_new0(FakeSmtp, 1);
	g_auto(GStrv) lines = NULL;

	g_mutex_init(&fake->lock);
	g_cond_init(&fake->cond);
	fake->listen_fd = -1;
	fake->stop_pipe[0] = fake->stop_pipe[1] = -1;
	fake->rules = g_ptr_array_new_with_free_func(rule_free);
	fake->received = g_byte_array_new();
	fake->commands = g_ptr_array_new_with_free_func(g_free);
	fake->messages = g_ptr_array_new_with_free_func(message_free);
	fake->greeting = g_bytes_new_static("220 fakesmtp ESMTP\r\n", 20);
	fake->greeting_code = 220;
	fake->ehlo_reply = build_ehlo_reply(
	    "8BITMIME SIZE 10485760 SMTPUTF8 DSN ENHANCEDSTATUSCODES", 0, NULL);

	if (script == NULL)
		return g_steal_pointer(&fake);
	lines = g_strsplit(script, "\n", -1);
	for (guint i = 0; lines[i] != NULL; i++)
		if (!parse_line(fake, lines[i], i + 1, error))
			return NULL;
	return g_steal_pointer(&fake);
}

/* ---- connection I/O ---------------------------------------------- */

/*
 * Waits until @fd is ready for @events, the server stops, or
 * @timeout_ms (-1: forever) passes.  Returns 1 ready, 0 timed out,
 * -1 stopping or error.
 */
static int
conn_wait(Conn *c, short events, int timeout_ms)
{
	gint64 deadline = g_get_monotonic_time() +
	                  (gint64)timeout_ms * G_TIME_SPAN_MILLISECOND;

	for (;;) {
		struct pollfd fds[2] = {
		    {.fd = c->fake->stop_pipe[0], .events = POLLIN},
		    {.fd = c->fd, .events = events},
		};
		int left = timeout_ms;
		int n;

		if (timeout_ms >= 0) {
			gint64 now = g_get_monotonic_time();

			left = now >= deadline
			           ? 0
			           : (int)((deadline - now + 999) / 1000);
		}
		n = poll(fds, 2, left);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 || fds[0].revents != 0)
			return -1;
		if (n == 0)
			return 0;
		return 1;
	}
}

static gboolean
conn_send(Conn *c, const void *data, gsize len)
{
	const char *p = data;

	while (len > 0) {
		ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (conn_wait(c, POLLOUT, -1) < 0)
				return FALSE;
			continue;
		}
		if (n <= 0)
			return FALSE;
		p += n;
		len -= (gsize)n;
	}
	return TRUE;
}

static gboolean
conn_send_bytes(Conn *c, GBytes *bytes)
{
	gsize len;
	const void *data = g_bytes_get_data(bytes, &len);

	return conn_send(c, data, len);
}

static gboolean
conn_send_str(Conn *c, const char *text)
{
	return conn_send(c, text, strlen(text));
}

/* Reads what is there into c->in and the record; FALSE on EOF, error or
 * stop. */
static gboolean
conn_fill(Conn *c)
{
	guint8 buf[16384];
	ssize_t n;

	for (;;) {
		if (conn_wait(c, POLLIN, -1) < 0)
			return FALSE;
		n = recv(c->fd, buf, sizeof(buf), 0);
		if (n < 0 &&
		    (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
			continue;
		if (n <= 0)
			return FALSE;
		break;
	}
	g_mutex_lock(&c->fake->lock);
	g_byte_array_append(c->fake->received, buf, (guint)n);
	g_mutex_unlock(&c->fake->lock);
	g_byte_array_append(c->in, buf, (guint)n);
	return TRUE;
}

/* stall: keep reading (and recording) but never answer. */
static void
conn_stall(Conn *c)
{
	while (conn_fill(c))
		g_byte_array_set_size(c->in, 0);
}

/* delay: FALSE if the server stopped meanwhile. */
static gboolean
conn_sleep(Conn *c, guint ms)
{
	struct pollfd fd = {.fd = c->fake->stop_pipe[0], .events = POLLIN};
	gint64 deadline =
	    g_get_monotonic_time() + (gint64)ms * G_TIME_SPAN_MILLISECOND;

	for (;;) {
		gint64 now = g_get_monotonic_time();
		int n;

		if (now >= deadline)
			return TRUE;
		n = poll(&fd, 1, (int)((deadline - now + 999) / 1000));
		if (n < 0 && errno == EINTR)
			continue;
		if (n != 0)
			return FALSE;
	}
}

/* ---- the SMTP state machine -------------------------------------- */

static void
conn_reset(Conn *c)
{
	g_clear_pointer(&c->mail_from, g_free);
	g_ptr_array_set_size(c->rcpts, 0);
}

static const Rule *
conn_find_rule(Conn *c, Verb verb, const char *arg, gsize arg_len)
{
	GPtrArray *rules = c->fake->rules;

	for (guint i = 0; i < rules->len; i++) {
		const Rule *r = rules->pdata[i];

		if (r->verb != verb)
			continue;
		if (r->nth != 0 && r->nth != c->counts[verb])
			continue;
		if (r->regex != NULL &&
		    !g_regex_match_full(r->regex, arg, (gssize)arg_len, 0, 0,
		                        NULL, NULL))
			continue;
		return r;
	}
	return NULL;
}

/* The message without dot-stuffing and without the final ".\r\n". */
static GBytes *
unstuff(const guint8 *wire, gsize len)
{
	g_autoptr(GByteArray) out = g_byte_array_sized_new((guint)len);
	gsize body = len - 3; /* the wire ends with ".\r\n" */
	gboolean line_start = TRUE;

	for (gsize i = 0; i < body; i++) {
		if (line_start && wire[i] == '.') {
			line_start = FALSE;
			continue;
		}
		line_start = wire[i] == '\n' && i > 0 && wire[i - 1] == '\r';
		g_byte_array_append(out, &wire[i], 1);
	}
	return g_byte_array_free_to_bytes(g_steal_pointer(&out));
}

static gboolean
store_file(const char *dir, guint n, const char *ext, const void *data,
           gsize len, GError **error)
{
	g_autofree char *name = g_strdup_printf("%u.%s", n, ext);
	g_autofree char *path = g_build_filename(dir, name, NULL);

	/* CONSISTENT writes a temporary file and renames it: a watcher
	 * never sees half a message. */
	return g_file_set_contents_full(path, data, (gssize)len,
	                                G_FILE_SET_CONTENTS_CONSISTENT, 0644,
	                                error);
}

/* Writes N.env then N.eml, so once N.eml exists both are complete. */
static gboolean
store_message(const char *dir, guint n, const FakeSmtpMessage *msg,
              GError **error)
{
	g_autoptr(GString) env = g_string_new(NULL);
	gsize len;
	const void *data = g_bytes_get_data(msg->content, &len);

	g_string_append_printf(env, "MAIL %s\n", msg->mail_from);
	for (guint i = 0; i < msg->rcpt_to->len; i++)
		g_string_append_printf(env, "RCPT %s\n",
		                       (char *)msg->rcpt_to->pdata[i]);
	if (!store_file(dir, n, "env", env->str, env->len, error))
		return FALSE;
	return store_file(dir, n, "eml", data, len, error);
}

/*
 * Records the finished transaction as message N (returned, 0 if the
 * store failed).  The lock is held while storing so numbers and files
 * agree even with many connections.
 */
static guint
conn_record_message(Conn *c, GBytes *content)
{
	FakeSmtp *fake = c->fake;
	FakeSmtpMessage *msg = g_new0(FakeSmtpMessage, 1);
	g_autoptr(GError) error = NULL;
	guint n;

	msg->mail_from = g_strdup(c->mail_from != NULL ? c->mail_from : "");
	msg->rcpt_to = g_ptr_array_new_with_free_func(g_free);
	for (guint i = 0; i < c->rcpts->len; i++)
		g_ptr_array_add(msg->rcpt_to, g_strdup(c->rcpts->pdata[i]));
	msg->wire = g_bytes_new(c->wire->data, c->wire->len);
	msg->content = g_bytes_ref(content);

	g_mutex_lock(&fake->lock);
	n = fake->messages->len + 1;
	if (fake->store_dir != NULL &&
	    !store_message(fake->store_dir, n, msg, &error)) {
		g_mutex_unlock(&fake->lock);
		g_printerr("fakesmtp: cannot store message %u: %s\n", n,
		           error->message);
		message_free(msg);
		return 0;
	}
	g_ptr_array_add(fake->messages, msg);
	g_cond_broadcast(&fake->cond);
	g_mutex_unlock(&fake->lock);
	return n;
}

/* What a reply with @code does to the transaction, before it is sent. */
static void
conn_apply(Conn *c, Verb verb, const char *arg, int code)
{
	gboolean ok = code >= 200 && code < 300;

	switch (verb) {
	case VERB_EHLO:
	case VERB_HELO:
	case VERB_RSET:
		if (ok)
			conn_reset(c);
		break;
	case VERB_MAIL:
		if (ok) {
			conn_reset(c);
			c->mail_from = g_strdup(arg);
		}
		break;
	case VERB_RCPT:
		if (ok)
			g_ptr_array_add(c->rcpts, g_strdup(arg));
		break;
	case VERB_DATA:
		if (code == 354) {
			c->in_data = TRUE;
			c->scan = 0;
			g_byte_array_set_size(c->wire, 0);
		}
		break;
	default:
		break;
	}
}

/* After a reply: QUIT and any 421 close (RFC 5321 section 3.8). */
static Step
conn_after(Verb verb, int code)
{
	if (verb == VERB_QUIT || code == 421)
		return STEP_END;
	return STEP_MORE;
}

/* Runs a scripted rule; for DOT, @content is the message. */
static Step
conn_run_rule(Conn *c, const Rule *rule, Verb verb, const char *arg,
              GBytes *content)
{
	switch (rule->kind) {
	case ACTION_CLOSE:
		return STEP_END;
	case ACTION_STALL:
		conn_stall(c);
		return STEP_END;
	case ACTION_CLOSE_IN_DATA:
		c->close_in_data = TRUE;
		conn_apply(c, verb, arg, 354);
		if (!conn_send_str(c, "354 End data with <CR><LF>.<CR><LF>"
		                      "\r\n"))
			return STEP_END;
		return STEP_MORE;
	case ACTION_DELAY:
		if (!conn_sleep(c, rule->delay_ms))
			return STEP_END;
		break;
	case ACTION_REPLY:
	case ACTION_RAW:
		break;
	}

	if (verb == VERB_DOT) {
		if (rule->code >= 200 && rule->code < 300)
			conn_record_message(c, content);
		conn_reset(c);
	} else {
		conn_apply(c, verb, arg, rule->code);
	}
	if (!conn_send_bytes(c, rule->text))
		return STEP_END;
	return conn_after(verb, rule->code);
}

/* The reply of a plain accepting server, in Postfix's wording. */
static const char *
default_reply(Conn *c, Verb verb, const char *arg)
{
	switch (verb) {
	case VERB_HELO:
		return "250 fakesmtp\r\n";
	case VERB_MAIL:
		if (g_ascii_strncasecmp(arg, "FROM:", 5) != 0)
			return "501 5.5.4 Syntax: MAIL FROM:<address>\r\n";
		return "250 2.1.0 Ok\r\n";
	case VERB_RCPT:
		if (c->mail_from == NULL)
			return "503 5.5.1 Error: need MAIL command\r\n";
		if (g_ascii_strncasecmp(arg, "TO:", 3) != 0)
			return "501 5.5.4 Syntax: RCPT TO:<address>\r\n";
		return "250 2.1.5 Ok\r\n";
	case VERB_DATA:
		if (c->mail_from == NULL)
			return "503 5.5.1 Error: need MAIL command\r\n";
		if (c->rcpts->len == 0)
			return "503 5.5.1 Error: need RCPT command\r\n";
		return "354 End data with <CR><LF>.<CR><LF>\r\n";
	case VERB_RSET:
	case VERB_NOOP:
		return "250 2.0.0 Ok\r\n";
	case VERB_QUIT:
		return "221 2.0.0 Bye\r\n";
	case VERB_STARTTLS:
	case VERB_AUTH:
		return "502 5.5.1 Error: command not implemented\r\n";
	default:
		return "500 5.5.2 Error: command not recognized\r\n";
	}
}

static Step
conn_command(Conn *c, const char *line, gsize len)
{
	const char *space = memchr(line, ' ', len);
	gsize verb_len = space != NULL ? (gsize)(space - line) : len;
	g_autofree char *name = g_strndup(line, MIN(verb_len, 16));
	const char *arg = space != NULL ? space + 1 : "";
	gsize arg_len = space != NULL ? len - verb_len - 1 : 0;
	Verb verb = verb_len <= 8 ? verb_lookup(name) : VERB_UNKNOWN;
	const Rule *rule;
	const char *text;
	int code;

	/* DOT and OTHER are rule names, never commands a client sends. */
	if (verb == VERB_DOT || verb == VERB_OTHER)
		verb = VERB_UNKNOWN;

	g_mutex_lock(&c->fake->lock);
	g_ptr_array_add(c->fake->commands, g_strndup(line, len));
	g_mutex_unlock(&c->fake->lock);

	if (verb != VERB_UNKNOWN) {
		c->counts[verb]++;
		rule = conn_find_rule(c, verb, arg, arg_len);
		if (rule != NULL)
			return conn_run_rule(c, rule, verb, arg, NULL);
	} else {
		/* A line of no known verb, e.g. an AUTH continuation: OTHER
		 * rules match their REGEX against the whole line. */
		c->counts[VERB_OTHER]++;
		rule = conn_find_rule(c, VERB_OTHER, line, len);
		if (rule != NULL)
			return conn_run_rule(c, rule, VERB_OTHER, line, NULL);
	}

	if (verb == VERB_EHLO) {
		conn_apply(c, verb, arg, 250);
		if (!conn_send_bytes(c, c->fake->ehlo_reply))
			return STEP_END;
		return STEP_MORE;
	}
	text = default_reply(c, verb, arg);
	code = reply_code(text, strlen(text));
	conn_apply(c, verb, arg, code);
	if (!conn_send_str(c, text))
		return STEP_END;
	return conn_after(verb, code);
}

/* The end of message data: c->wire ends with the final ".\r\n". */
static Step
conn_end_of_data(Conn *c)
{
	g_autoptr(GBytes) content = unstuff(c->wire->data, c->wire->len);
	gsize len;
	const char *data = g_bytes_get_data(content, &len);
	const Rule *rule;
	g_autofree char *reply = NULL;
	guint n;

	c->in_data = FALSE;
	c->counts[VERB_DOT]++;
	rule = conn_find_rule(c, VERB_DOT, data != NULL ? data : "", len);
	if (rule != NULL)
		return conn_run_rule(c, rule, VERB_DOT, NULL, content);

	n = conn_record_message(c, content);
	conn_reset(c);
	if (n == 0)
		reply = g_strdup("451 4.3.0 Error: cannot store message\r\n");
	else
		reply =
		    g_strdup_printf("250 2.0.0 Ok: queued as FAKE%u\r\n", n);
	if (!conn_send_str(c, reply))
		return STEP_END;
	return STEP_MORE;
}

/*
 * In data: moves the input into c->wire and looks for CRLF.CRLF (or a
 * "." line right at the start, an empty message).  Only CRLF counts as a
 * line end, as in Postfix since the SMTP smuggling fixes, so a client
 * that lets a bare LF through is caught by the tests.  Bytes after the
 * end are commands again (PIPELINING), so they go back to c->in.
 */
static gboolean
conn_scan_data(Conn *c)
{
	gsize end = 0;

	g_byte_array_append(c->wire, c->in->data, c->in->len);
	g_byte_array_set_size(c->in, 0);

	if (c->scan == 0 && c->wire->len >= 3 &&
	    memcmp(c->wire->data, ".\r\n", 3) == 0) {
		end = 3;
	} else if (c->wire->len >= 5) {
		const guint8 *hit =
		    memmem(c->wire->data + c->scan, c->wire->len - c->scan,
		           "\r\n.\r\n", 5);

		if (hit != NULL)
			end = (gsize)(hit - c->wire->data) + 5;
		else
			c->scan = c->wire->len - 4;
	}
	if (end == 0)
		return FALSE;

	g_byte_array_append(c->in, c->wire->data + end,
	                    c->wire->len - (guint)end);
	g_byte_array_set_size(c->wire, (guint)end);
	return TRUE;
}

/* Handles every complete unit in c->in: command lines and data. */
static Step
conn_process(Conn *c)
{
	while (c->in->len > 0) {
		guint8 *lf;
		gsize len;
		char *line;
		Step step;

		if (c->in_data && c->close_in_data)
			return STEP_END;
		if (c->in_data) {
			if (!conn_scan_data(c))
				return STEP_MORE;
			step = conn_end_of_data(c);
			if (step == STEP_END)
				return step;
			continue;
		}

		lf = memchr(c->in->data, '\n', c->in->len);
		if (lf == NULL) {
			if (c->in->len <= MAX_LINE)
				return STEP_MORE;
			/* Refuse once, then skip up to the LF. */
			g_byte_array_set_size(c->in, 0);
			if (!c->skipping &&
			    !conn_send_str(c, "500 5.5.2 Error: line too "
			                      "long\r\n"))
				return STEP_END;
			c->skipping = TRUE;
			return STEP_MORE;
		}
		len = (gsize)(lf - c->in->data);
		if (c->skipping) {
			c->skipping = FALSE;
			g_byte_array_remove_range(c->in, 0, (guint)len + 1);
			continue;
		}

		/* CRLF, or a bare LF from a lenient client.  A copy, so
		 * the argument ends in a NUL where the line does. */
		if (len > 0 && lf[-1] == '\r')
			len--;
		line = g_strndup((char *)c->in->data, len);
		g_byte_array_remove_range(c->in, 0,
		                          (guint)(lf - c->in->data) + 1);
		step = conn_command(c, line, len);
		g_free(line);
		if (step == STEP_END)
			return step;
	}
	return STEP_MORE;
}

static gpointer
conn_main(gpointer data)
{
	Conn *c = data;
	FakeSmtp *fake = c->fake;

	if (fake->greeting != NULL &&
	    (!conn_send_bytes(c, fake->greeting) || fake->greeting_code == 421))
		goto out;
	while (conn_process(c) == STEP_MORE && conn_fill(c))
		;

out:
	/* A FIN, not an RST, where we can: the client reads our last
	 * reply before it sees the close. */
	shutdown(c->fd, SHUT_WR);
	close(c->fd);
	c->fd = -1;
	g_byte_array_unref(c->in);
	g_byte_array_unref(c->wire);
	g_ptr_array_unref(c->rcpts);
	g_free(c->mail_from);
	g_mutex_lock(&fake->lock);
	c->done = TRUE;
	g_mutex_unlock(&fake->lock);
	return NULL;
}

/* ---- listener ----------------------------------------------------- */

static void
conn_join(gpointer data)
{
	Conn *c = data;

	g_thread_join(c->thread);
	g_free(c);
}

/* Joins the connection threads that have finished. */
static guint
reap_done(FakeSmtp *fake)
{
	GList *done = NULL;
	guint alive;

	g_mutex_lock(&fake->lock);
	for (GList *l = fake->conns, *next; l != NULL; l = next) {
		Conn *c = l->data;

		next = l->next;
		if (c->done) {
			fake->conns = g_list_remove_link(fake->conns, l);
			done = g_list_concat(l, done);
		}
	}
	alive = g_list_length(fake->conns);
	g_mutex_unlock(&fake->lock);
	g_list_free_full(done, conn_join);
	return alive;
}

static void
serve(FakeSmtp *fake, int fd)
{
	Conn *c = g_new0(Conn, 1);
	g_autoptr(GError) error = NULL;

	c->fake = fake;
	c->fd = fd;
	c->in = g_byte_array_new();
	c->wire = g_byte_array_new();
	c->rcpts = g_ptr_array_new_with_free_func(g_free);

	g_mutex_lock(&fake->lock);
	fake->connections++;
	fake->conns = g_list_prepend(fake->conns, c);
	c->thread = g_thread_try_new("fakesmtp-conn", conn_main, c, &error);
	if (c->thread == NULL) {
		fake->conns = g_list_remove(fake->conns, c);
		g_mutex_unlock(&fake->lock);
		g_printerr("fakesmtp: %s\n", error->message);
		close(fd);
		g_byte_array_unref(c->in);
		g_byte_array_unref(c->wire);
		g_ptr_array_unref(c->rcpts);
		g_free(c);
		return;
	}
	g_mutex_unlock(&fake->lock);
}

static gpointer
accept_main(gpointer data)
{
	FakeSmtp *fake = data;

	for (;;) {
		struct pollfd fds[2] = {
		    {.fd = fake->stop_pipe[0], .events = POLLIN},
		    {.fd = fake->listen_fd, .events = POLLIN},
		};
		int fd;

		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (fds[0].revents != 0)
			break;
		fd = accept4(fake->listen_fd, NULL, NULL,
		             SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			/* EMFILE and the like: back off, do not spin. */
			if (errno != EINTR && errno != EAGAIN &&
			    errno != ECONNABORTED)
				g_usleep(10 * 1000);
			continue;
		}
		if (reap_done(fake) >= MAX_CONNECTIONS) {
			static const char busy[] =
			    "421 4.3.2 fakesmtp: too many connections\r\n";

			if (send(fd, busy, sizeof(busy) - 1, MSG_NOSIGNAL) <
			    0) {
				/* closing anyway */
			}
			close(fd);
			continue;
		}
		serve(fake, fd);
	}
	return NULL;
}

static int
listen_on(const char *address, guint16 port, guint16 *bound, GError **error)
{
	struct sockaddr_storage ss = {0};
	struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
	socklen_t len;
	int one = 1;
	int fd;

	if (inet_pton(AF_INET, address, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		len = sizeof(*sin);
	} else if (inet_pton(AF_INET6, address, &sin6->sin6_addr) == 1) {
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(port);
		len = sizeof(*sin6);
	} else {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_LISTEN,
		            "not a numeric IP address: \"%s\"", address);
		return -1;
	}

	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	/* A fixed port must be reusable right after a previous run. */
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		goto fail;
	if (bind(fd, (struct sockaddr *)&ss, len) < 0 || listen(fd, 128) < 0)
		goto fail;
	len = sizeof(ss);
	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
		goto fail;
	*bound =
	    ntohs(ss.ss_family == AF_INET ? sin->sin_port : sin6->sin6_port);
	return fd;

fail:
	g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_LISTEN,
	            "cannot listen on [%s]:%u: %s", address, port,
	            g_strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

guint16
fake_smtp_start_port(FakeSmtp *fake, const char *address, guint16 port,
                     const char *store_dir, GError **error)
{
	guint16 bound = 0;

	g_return_val_if_fail(fake != NULL, 0);
	g_return_val_if_fail(address != NULL, 0);
	g_return_val_if_fail(!fake->running, 0);

	if (store_dir != NULL && !g_file_test(store_dir, G_FILE_TEST_IS_DIR)) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_LISTEN,
		            "store directory \"%s\" does not exist", store_dir);
		return 0;
	}
	fake->listen_fd = listen_on(address, port, &bound, error);
	if (fake->listen_fd < 0)
		return 0;
	if (pipe2(fake->stop_pipe, O_CLOEXEC) < 0) {
		g_set_error(error, FAKE_SMTP_ERROR, FAKE_SMTP_ERROR_LISTEN,
		            "pipe: %s", g_strerror(errno));
		close(fake->listen_fd);
		fake->listen_fd = -1;
		return 0;
	}
	g_free(fake->store_dir);
	fake->store_dir = g_strdup(store_dir);
	fake->accept_thread =
	    g_thread_new("fakesmtp-accept", accept_main, fake);
	fake->running = TRUE;
	return bound;
}

guint16
fake_smtp_start(FakeSmtp *fake, const char *address, const char *store_dir,
                GError **error)
{
	return fake_smtp_start_port(fake, address, 0, store_dir, error);
}

void
fake_smtp_stop(FakeSmtp *fake)
{
	GList *conns;

	g_return_if_fail(fake != NULL);
	if (!fake->running)
		return;

	/* One byte wakes every poll in every thread, for good. */
	while (write(fake->stop_pipe[1], "x", 1) < 0 && errno == EINTR)
		;
	g_thread_join(fake->accept_thread);
	fake->accept_thread = NULL;

	g_mutex_lock(&fake->lock);
	conns = g_steal_pointer(&fake->conns);
	g_mutex_unlock(&fake->lock);
	g_list_free_full(conns, conn_join);

	close(fake->listen_fd);
	close(fake->stop_pipe[0]);
	close(fake->stop_pipe[1]);
	fake->listen_fd = fake->stop_pipe[0] = fake->stop_pipe[1] = -1;
	fake->running = FALSE;
}

void
fake_smtp_free(FakeSmtp *fake)
{
	if (fake == NULL)
		return;
	fake_smtp_stop(fake);
	g_clear_pointer(&fake->greeting, g_bytes_unref);
	g_clear_pointer(&fake->ehlo_reply, g_bytes_unref);
	g_ptr_array_unref(fake->rules);
	g_byte_array_unref(fake->received);
	g_ptr_array_unref(fake->commands);
	g_ptr_array_unref(fake->messages);
	g_free(fake->store_dir);
	g_mutex_clear(&fake->lock);
	g_cond_clear(&fake->cond);
	g_free(fake);
}

/* ---- getters ------------------------------------------------------ */

GBytes *
fake_smtp_get_received(FakeSmtp *fake)
{
	GBytes *bytes;

	g_return_val_if_fail(fake != NULL, NULL);
	g_mutex_lock(&fake->lock);
	bytes = g_bytes_new(fake->received->data, fake->received->len);
	g_mutex_unlock(&fake->lock);
	return bytes;
}

GPtrArray *
fake_smtp_get_commands(FakeSmtp *fake)
{
	GPtrArray *copy;

	g_return_val_if_fail(fake != NULL, NULL);
	g_mutex_lock(&fake->lock);
	copy = g_ptr_array_copy(fake->commands,
	                        (GCopyFunc)(void (*)(void))g_strdup, NULL);
	g_mutex_unlock(&fake->lock);
	g_ptr_array_set_free_func(copy, g_free);
	return copy;
}

guint
fake_smtp_get_connections(FakeSmtp *fake)
{
	guint n;

	g_return_val_if_fail(fake != NULL, 0);
	g_mutex_lock(&fake->lock);
	n = fake->connections;
	g_mutex_unlock(&fake->lock);
	return n;
}

guint
fake_smtp_get_message_count(FakeSmtp *fake)
{
	guint n;

	g_return_val_if_fail(fake != NULL, 0);
	g_mutex_lock(&fake->lock);
	n = fake->messages->len;
	g_mutex_unlock(&fake->lock);
	return n;
}

const FakeSmtpMessage *
fake_smtp_get_message(FakeSmtp *fake, guint i)
{
	const FakeSmtpMessage *msg = NULL;

	g_return_val_if_fail(fake != NULL, NULL);
	g_mutex_lock(&fake->lock);
	if (i < fake->messages->len)
		msg = fake->messages->pdata[i];
	g_mutex_unlock(&fake->lock);
	return msg;
}

gboolean
fake_smtp_wait_messages(FakeSmtp *fake, guint n, guint timeout_ms)
{
	gint64 deadline = g_get_monotonic_time() +
	                  (gint64)timeout_ms * G_TIME_SPAN_MILLISECOND;
	gboolean ok;

	g_return_val_if_fail(fake != NULL, FALSE);
	g_mutex_lock(&fake->lock);
	while (fake->messages->len < n &&
	       g_cond_wait_until(&fake->cond, &fake->lock, deadline))
		;
	ok = fake->messages->len >= n;
	g_mutex_unlock(&fake->lock);
	return ok;
}
