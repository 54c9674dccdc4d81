/*
 * conf.c - archive-milter configuration: loading, validation, defaults
 *
 * The file is read twice.  A line scanner of our own goes first: it
 * records the line of every group and key, reports duplicate groups
 * and keys (GKeyFile would merge the groups and keep the last key
 * silently), accepts ';' as well as '#' comments, and rejects lines
 * that are neither a group, a key = value pair nor a comment.  It
 * hands GKeyFile a cleaned copy (comments blanked, bad lines dropped,
 * values trimmed) so that one bad line does not hide the errors of the
 * rest.  GKeyFile then holds the values, and validation walks its
 * groups and keys.  Every problem becomes one message; none stops the
 * load early.
 *
 * Values are taken literally (g_key_file_get_value): GKeyFile's
 * backslash escapes are not interpreted, so a regular expression is
 * written exactly as GRegex reads it ("\." is a dot, not an error).
 *
 * Known limits:
 * XXX: a comment must be on a line of its own; "port = 25 # smtp" makes
 *      the value "25 # smtp", which is then rejected as a bad port.
 * XXX: archive_to is split at commas and whitespace, so a quoted local
 *      part containing either ("a b"@example.com) cannot be written.
 *      Such addresses are very rare on archive mailboxes.
 * Addresses in archive_to and archive_from must be ASCII: a copy goes
 * with SMTPUTF8 only when its original did, so a non-ASCII archive
 * address would fail the copy of every plain message.
 *
 * XXX: an on_OUTCOME key sets one action for both a temporary and a
 *      permanent failure of that outcome; only the defaults tell them
 *      apart.  "Retry a 4xx refusal, hold a 5xx one" for a single
 *      outcome cannot be written except by leaving the key unset.
 * XXX: host names are checked for form only (RFC 1123 labels, or an IP
 *      literal); whether they resolve is found out when connecting.
 *
 * Secrets: a relay's AUTH password is read at load from
 * auth_password_file, which must be a regular file its group and others
 * cannot read (smtp_password_file_read() holds that rule for smtp-send
 * too).  The password lives only in AmRelay, is wiped when the
 * configuration is freed, and no message of this module quotes it.
 * ca_file and the password file are read at load, so a bad path is found
 * by --check and not by the first copy; a later change to either file
 * takes effect only when the configuration is loaded again.
 */
#include <stdarg.h>
#include <string.h>
#include <sys/un.h>

#include "conf.h"

#define DEFAULT_PORT                25
#define DEFAULT_TIMEOUT_MS          30000
#define DEFAULT_COPY_DEADLINE_MS    120000
#define MAX_TIMEOUT_S               86400
#define DEFAULT_CAPTURE_MEMORY_MAX  (1024 * 1024)
#define DEFAULT_ARCHIVE_ID_KEY_FILE "/var/lib/archive-milter/archive-id.key"
#define DEFAULT_SPOOL_DIR           "/var/spool/archive-milter"
#define DEFAULT_WORKERS             4
#define MAX_WORKERS                 64
#define DEFAULT_SPOOL_MIN_FREE      (100 * 1024 * 1024)
#define DEFAULT_SPOOL_MAX_AGE_S     (5 * 86400)
#define DEFAULT_SPOOL_RETRY_MIN_S   60
#define DEFAULT_SPOOL_RETRY_MAX_S   3600
#define MAX_DURATION_S              (365 * 86400)
#define MAX_REJECT_TEXT             200

/* One error; kept with its line so --check can print them in file order. */
typedef struct {
	guint line; /* 0: no line known, printed last */
	guint seq;  /* order of discovery, breaks ties */
	char *text;
} ConfError;

/* Where a key was seen: the first for duplicate reports, the last
 * because that is the value GKeyFile keeps. */
typedef struct {
	guint first;
	guint last;
} KeyLines;

typedef struct {
	const char *path;
	GPtrArray *errors;       /* ConfError * */
	GHashTable *group_lines; /* group name -> GUINT line of first */
	GHashTable *key_lines;   /* "group\nkey" -> KeyLines * */
	GKeyFile *kf;
	AmConfig *config;
} Loader;

/* The keys each kind of group may hold; any other is an error. */
static const char *const milter_keys[] = {
    "socket",
    "archive_id_key_file",
    "capture_memory_max",
    "match",
    "copy_deadline",
    "pid_file",
    "spool_dir",
    "workers",
    "spool_min_free",
    "spool_max_age",
    "spool_retry_min",
    "spool_retry_max",
    NULL,
};

static const char *const relay_keys[] = {
    "host",
    "port",
    "helo_name",
    "timeout",
    "timeout_connect",
    "timeout_command",
    "timeout_data",
    "timeout_final",
    "tls",
    "ca_file",
    "auth_user",
    "auth_password_file",
    "auth_plaintext",
    NULL,
};

static const char *const rule_keys[] = {
    "mode",
    "relay",
    "archive_to",
    "archive_from",
    "delivery",
    "on_failure",
    "on_sent",
    "on_some_refused",
    "on_all_refused",
    "on_sender_refused",
    "on_data_error",
    "on_unreachable",
    "on_timeout",
    "on_tls_error",
    "reject_text",
    "match_sender",
    "match_recipient",
    "match_client",
    "match_header",
    "min_size",
    NULL,
};

static void
conf_error_free(gpointer data)
{
	ConfError *e = data;

	g_free(e->text);
	g_free(e);
}

/*
 * Record one problem as "FILE:LINE: [GROUP] KEY: reason"; LINE 0 drops
 * ":LINE", a NULL group drops "[GROUP] ", a NULL key gives "[GROUP]: ".
 */
static void add_error(Loader *l, guint line, const char *group, const char *key,
                      const char *fmt, ...) G_GNUC_PRINTF(5, 6);

static void
add_error(Loader *l, guint line, const char *group, const char *key,
          const char *fmt, ...)
{
	g_autoptr(GString) s = g_string_new(l->path);
	g_autofree char *reason = NULL;
	ConfError *e;
	va_list ap;

	va_start(ap, fmt);
	reason = g_strdup_vprintf(fmt, ap);
	va_end(ap);

	if (line > 0)
		g_string_append_printf(s, ":%u", line);
	g_string_append(s, ": ");
	if (group != NULL && key != NULL)
		g_string_append_printf(s, "[%s] %s: ", group, key);
	else if (group != NULL)
		g_string_append_printf(s, "[%s]: ", group);
	else if (key != NULL)
		g_string_append_printf(s, "%s: ", key);
	g_string_append(s, reason);

	e = g_new0(ConfError, 1);
	e->line = line;
	e->seq = l->errors->len;
	e->text = g_string_free(g_steal_pointer(&s), FALSE);
	g_ptr_array_add(l->errors, e);
}

static guint
group_line(Loader *l, const char *group)
{
	return GPOINTER_TO_UINT(g_hash_table_lookup(l->group_lines, group));
}

static guint
key_line(Loader *l, const char *group, const char *key)
{
	g_autofree char *id = g_strconcat(group, "\n", key, NULL);
	KeyLines *kl = g_hash_table_lookup(l->key_lines, id);

	return kl != NULL ? kl->last : 0;
}

/* ---- the line scanner ------------------------------------------------ */

static gboolean
is_key_char(char c)
{
	return g_ascii_isalnum(c) || c == '_' || c == '-' || c == '.';
}

/* Control characters would end up inside values (a CR inside an
 * address is how header and SMTP injection starts); tabs are spacing. */
static gboolean
line_is_clean(const char *s, gsize len)
{
	gsize i;

	for (i = 0; i < len; i++) {
		guchar c = (guchar)s[i];

		if ((c < 0x20 && c != '\t') || c == 0x7f)
			return FALSE;
	}
	return g_utf8_validate_len(s, len, NULL);
}

/*
 * A group line.  After a bad one, *current becomes NULL and *skipping
 * TRUE: its keys belong to no group we know, and reporting each of them
 * would only repeat the one error.
 */
static void
scan_group(Loader *l, guint lineno, const char *s, GString *clean,
           char **current, gboolean *skipping)
{
	g_autofree char *name = NULL;
	gsize len = strlen(s);
	guint first;

	g_clear_pointer(current, g_free);
	*skipping = TRUE;
	if (len < 2 || s[len - 1] != ']') {
		add_error(l, lineno, NULL, NULL,
		          "a group line must end with ']' (a comment goes "
		          "on a line of its own)");
		return;
	}
	name = g_strndup(s + 1, len - 2);
	if (*name == '\0' || strpbrk(name, "[]") != NULL) {
		add_error(l, lineno, NULL, NULL, "bad group name \"%s\"", name);
		return;
	}

	first = group_line(l, name);
	if (first > 0)
		add_error(l, lineno, name, NULL,
		          "duplicate group, first on line %u", first);
	else
		g_hash_table_insert(l->group_lines, g_strdup(name),
		                    GUINT_TO_POINTER(lineno));

	g_string_append_printf(clean, "[%s]", name);
	*current = g_steal_pointer(&name);
	*skipping = FALSE;
}

static void
scan_key(Loader *l, guint lineno, const char *s, GString *clean,
         const char *current, gboolean skipping)
{
	const char *eq = strchr(s, '=');
	g_autofree char *key = NULL;
	g_autofree char *id = NULL;
	g_autofree char *value = NULL;
	const char *p;
	KeyLines *kl;

	if (eq == NULL) {
		add_error(l, lineno, NULL, NULL,
		          "not a [group], a key = value line or a comment");
		return;
	}
	if (current == NULL && skipping)
		return;
	key = g_strstrip(g_strndup(s, eq - s));
	for (p = key; *p != '\0' && is_key_char(*p); p++)
		;
	if (*key == '\0') {
		add_error(l, lineno, current, NULL, "no key before '='");
		return;
	}
	if (*p != '\0') {
		add_error(l, lineno, current, NULL, "bad key name \"%s\"", key);
		return;
	}
	if (current == NULL) {
		add_error(l, lineno, NULL, key, "key before any [group]");
		return;
	}

	id = g_strconcat(current, "\n", key, NULL);
	kl = g_hash_table_lookup(l->key_lines, id);
	if (kl != NULL) {
		add_error(l, lineno, current, key,
		          "duplicate key, first set on line %u", kl->first);
		kl->last = lineno;
	} else {
		kl = g_new(KeyLines, 1);
		kl->first = kl->last = lineno;
		g_hash_table_insert(l->key_lines, g_steal_pointer(&id), kl);
	}

	/* The line is already stripped at both ends. */
	value = g_strchug(g_strdup(eq + 1));
	g_string_append_printf(clean, "%s=%s", key, value);
}

/*
 * Scan @data line by line; returns the text GKeyFile is to parse, the
 * same number of lines, each line either kept (normalised) or blanked.
 */
static GString *
scan(Loader *l, const char *data, gsize len)
{
	GString *clean = g_string_sized_new(len + 1);
	g_autofree char *current = NULL;
	gboolean skipping = FALSE;
	const char *p = data;
	const char *end = data + len;
	guint lineno = 0;

	while (p < end) {
		const char *nl = memchr(p, '\n', end - p);
		const char *eol = nl != NULL ? nl : end;
		g_autofree char *line = NULL;
		char *s;

		lineno++;
		/* CRLF files are common when edited elsewhere. */
		if (eol > p && eol[-1] == '\r')
			eol--;

		if (!line_is_clean(p, eol - p)) {
			add_error(l, lineno, NULL, NULL,
			          "control character, NUL byte or invalid "
			          "UTF-8 in line");
		} else {
			/* GKeyFile would keep trailing blanks in a value;
			 * nobody means them, and nobody can see them. */
			line = g_strndup(p, eol - p);
			s = g_strstrip(line);
			if (*s == '\0' || *s == '#' || *s == ';')
				;
			else if (*s == '[')
				scan_group(l, lineno, s, clean, &current,
				           &skipping);
			else
				scan_key(l, lineno, s, clean, current,
				         skipping);
		}
		g_string_append_c(clean, '\n');
		p = nl != NULL ? nl + 1 : end;
	}
	return clean;
}

/* ---- value checks ---------------------------------------------------- */

/* Decimal digits only: no sign, no spaces, no hex, no exponent. */
static gboolean
parse_uint(const char *s, guint64 max, guint64 *out)
{
	guint64 v = 0;

	if (*s == '\0')
		return FALSE;
	for (; *s != '\0'; s++) {
		if (!g_ascii_isdigit(*s))
			return FALSE;
		if (v > (max - (*s - '0')) / 10)
			return FALSE;
		v = v * 10 + (*s - '0');
	}
	*out = v;
	return TRUE;
}

static gboolean
parse_port(const char *s, guint16 *out)
{
	guint64 v;

	if (!parse_uint(s, 65535, &v) || v == 0)
		return FALSE;
	*out = (guint16)v;
	return TRUE;
}

/* "123", "10K", "5M", "1G": octets, binary multiples. */
static gboolean
parse_size(const char *s, guint64 max, guint64 *out)
{
	g_autofree char *digits = g_strdup(s);
	gsize len = strlen(digits);
	guint shift = 0;
	guint64 v;

	if (len > 0) {
		switch (g_ascii_toupper(digits[len - 1])) {
		case 'K':
			shift = 10;
			break;
		case 'M':
			shift = 20;
			break;
		case 'G':
			shift = 30;
			break;
		}
		if (shift > 0)
			digits[len - 1] = '\0';
	}
	if (!parse_uint(digits, max >> shift, &v))
		return FALSE;
	*out = v << shift;
	return TRUE;
}

/*
 * Seconds with an optional fraction ("30", "2.5") to milliseconds,
 * rounded up so that a tiny positive value never becomes zero.
 */
static gboolean
parse_timeout(const char *s, guint *out_ms)
{
	const char *dot = strchr(s, '.');
	g_autofree char *whole =
	    g_strndup(s, dot ? (gsize)(dot - s) : strlen(s));
	const char *f = dot != NULL ? dot + 1 : "";
	gboolean round_up = FALSE;
	guint64 secs = 0, ms = 0;
	guint i;

	if (*whole == '\0' && *f == '\0')
		return FALSE;
	if (*whole != '\0' && !parse_uint(whole, MAX_TIMEOUT_S, &secs))
		return FALSE;
	for (i = 0; f[i] != '\0'; i++) {
		if (!g_ascii_isdigit(f[i]))
			return FALSE;
		if (i < 3)
			ms = ms * 10 + (f[i] - '0');
		else if (f[i] != '0')
			round_up = TRUE;
	}
	for (; i < 3; i++)
		ms *= 10;
	ms += secs * 1000 + (round_up ? 1 : 0);
	if (ms == 0 || ms > (guint64)MAX_TIMEOUT_S * 1000)
		return FALSE;
	*out_ms = (guint)ms;
	return TRUE;
}

/*
 * Spool durations: whole seconds, or a number with one unit, s, m, h
 * or d, as Postfix writes its queue lifetimes ("5d").  Copies wait for
 * days, not milliseconds, so no fraction.
 */
static gboolean
parse_duration(const char *s, guint *out_s)
{
	g_autofree char *digits = g_strdup(s);
	gsize len = strlen(digits);
	guint64 unit = 1, v;

	if (len > 0) {
		switch (digits[len - 1]) {
		case 's':
			unit = 1;
			break;
		case 'm':
			unit = 60;
			break;
		case 'h':
			unit = 3600;
			break;
		case 'd':
			unit = 86400;
			break;
		default:
			unit = 0;
			break;
		}
		if (unit > 0)
			digits[len - 1] = '\0';
		else
			unit = 1;
	}
	if (!parse_uint(digits, MAX_DURATION_S / unit, &v) || v == 0)
		return FALSE;
	*out_s = (guint)(v * unit);
	return TRUE;
}

/* RFC 1123 host name: labels of letters, digits and inner hyphens. */
static gboolean
is_host_name(const char *s)
{
	gsize len = strlen(s), label = 0;
	gboolean all_numeric = TRUE;
	const char *p;

	if (len > 0 && s[len - 1] == '.')
		len--;
	if (len == 0 || len > 253)
		return FALSE;
	for (p = s; p < s + len; p++) {
		if (*p == '.') {
			if (label == 0 || p[-1] == '-')
				return FALSE;
			label = 0;
			continue;
		}
		if (!g_ascii_isalnum(*p) && *p != '-')
			return FALSE;
		if (*p == '-' && label == 0)
			return FALSE;
		if (!g_ascii_isdigit(*p))
			all_numeric = FALSE;
		if (++label > 63)
			return FALSE;
	}
	/* "999.1.1.1" is a mistyped address, not a name. */
	return p[-1] != '-' && !all_numeric;
}

static gboolean
is_ipv4(const char *s)
{
	return strchr(s, ':') == NULL && g_hostname_is_ip_address(s);
}

static gboolean
is_ipv6(const char *s)
{
	return strchr(s, ':') != NULL && g_hostname_is_ip_address(s);
}

static gboolean
is_host(const char *s)
{
	return g_hostname_is_ip_address(s) || is_host_name(s);
}

/* EHLO's argument: a domain or an address literal (RFC 5321 4.1.3). */
static gboolean
is_helo_name(const char *s)
{
	gsize len = strlen(s);
	g_autofree char *inner = NULL;

	if (len > 2 && s[0] == '[' && s[len - 1] == ']') {
		inner = g_strndup(s + 1, len - 2);
		if (g_str_has_prefix(inner, "IPv6:"))
			return is_ipv6(inner + 5);
		return is_ipv4(inner);
	}
	return is_host_name(s);
}

/* RFC 5322 atext: what a local part may hold outside quotes. */
static gboolean
is_atext(char c)
{
	return g_ascii_isalnum(c) || strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

/*
 * The closing quote of the quoted string that starts @s (@len octets
 * in all), or NULL: '\' escapes the next character, so "a\"b" is one
 * string.
 */
static const char *
quoted_end(const char *s, gsize len)
{
	const char *p;

	for (p = s + 1; p < s + len; p++) {
		if (*p == '\\')
			p++;
		else if (*p == '"')
			return p;
	}
	return NULL;
}

/* Where the local part of @s (@len octets) ends: its '@', or NULL.  A
 * quoted local part may hold '@' itself. */
static const char *
local_part_end(const char *s, gsize len)
{
	const char *q;

	if (*s != '"')
		return memchr(s, '@', len);
	q = quoted_end(s, len);
	return q != NULL && q + 1 < s + len && q[1] == '@' ? q + 1 : NULL;
}

/*
 * The local part from @s to @end (the '@'): a dot-atom, or a quoted
 * string (local_part_end found its end).  NULL when fine, else why.
 */
static const char *
local_part_why(const char *s, const char *end)
{
	const char *p;

	if (s == end)
		return "empty local part before '@'";
	if (end - s > 64)
		return "local part longer than 64 characters";
	if (*s == '"')
		return NULL;
	for (p = s; p < end; p++) {
		if (*p == '.' && (p == s || p + 1 == end || p[1] == '.'))
			return "a dot at the start or end of the local part, "
			       "or two in a row";
		if (*p != '.' && !is_atext(*p))
			return "character not allowed in an unquoted local "
			       "part";
	}
	return NULL;
}

/* A domain: a host name, or an address literal such as [192.0.2.1]. */
static const char *
domain_why(const char *s)
{
	if (*s == '\0')
		return "empty domain after '@'";
	if (strchr(s, '@') != NULL)
		return "more than one '@' (a local part with '@' must be "
		       "quoted)";
	if (!is_helo_name(s))
		return "the domain is not a host name or an address literal "
		       "like [192.0.2.1]";
	return NULL;
}

/*
 * Why a non-ASCII address is refused: a copy is sent with SMTPUTF8 only
 * when the original came with it (deliver.c), and the library refuses
 * a non-ASCII address without it, so such an archive or sender address
 * would fail the copy of every plain message.  Refused here, where the
 * administrator sees why.
 */
#define NON_ASCII_WHY                                                          \
	"non-ASCII address: copies of plain mail are sent without "            \
	"SMTPUTF8, and no relay takes such an address then; use an ASCII "     \
	"address (a domain in its xn-- form)"

/*
 * One bare address; "<addr>" is accepted and unwrapped.  Returns the
 * bare address, or NULL with @why set.  The null address (written as
 * nothing, <> or "") is returned as "": the caller decides whether the
 * null sender is allowed.
 * The address must be local@domain as RFC 5321 writes it (one '@' outside
 * quotes, a dot-atom or quoted local part, a host name or an address
 * literal as the domain): the relay would refuse anything else, at the
 * first copy instead of now.
 */
static char *
bare_address(const char *s, const char **why)
{
	g_autofree char *addr = NULL;
	gsize len = strlen(s);
	const char *at;
	const char *p;

	if (len >= 2 && s[0] == '<' && s[len - 1] == '>') {
		s++;
		len -= 2;
	}
	for (p = s; p < s + len; p++) {
		if (*p == '<' || *p == '>') {
			*why = "angle brackets inside an address";
			return NULL;
		}
		if (g_ascii_isspace(*p) || g_ascii_iscntrl(*p)) {
			*why = "space, tab, CR or LF inside an address";
			return NULL;
		}
	}
	/* The example writes the null sender as "" as well as <>; the
	 * value arrives with its quotes, as values are taken literally. */
	if (len == 2 && s[0] == '"' && s[1] == '"')
		len = 0;
	addr = g_strndup(s, len);
	if (len == 0)
		return g_steal_pointer(&addr);
	if (!g_str_is_ascii(addr)) {
		*why = NON_ASCII_WHY;
		return NULL;
	}
	at = local_part_end(addr, len);
	if (at == NULL) {
		*why = *addr == '"' ? "unbalanced quotes in the local part, "
		                      "or no '@' after it"
		                    : "not an address of the form local@domain";
		return NULL;
	}
	if ((*why = local_part_why(addr, at)) != NULL ||
	    (*why = domain_why(at + 1)) != NULL)
		return NULL;
	return g_steal_pointer(&addr);
}

/* ---- groups ---------------------------------------------------------- */

static char *
get(Loader *l, const char *group, const char *key)
{
	return g_key_file_get_value(l->kf, group, key, NULL);
}

static void
check_keys(Loader *l, const char *group, const char *const *allowed)
{
	g_auto(GStrv) keys = g_key_file_get_keys(l->kf, group, NULL, NULL);
	guint i;

	for (i = 0; keys != NULL && keys[i] != NULL; i++) {
		if (!g_strv_contains(allowed, keys[i]))
			add_error(l, key_line(l, group, keys[i]), group,
			          keys[i], "unknown key");
	}
}

static char *
require(Loader *l, const char *group, const char *key)
{
	char *v = get(l, group, key);

	if (v == NULL)
		add_error(l, group_line(l, group), group, key,
		          "missing required key");
	return v;
}

/* Report an empty value; TRUE when @v is set and not empty. */
static gboolean
non_empty(Loader *l, const char *group, const char *key, const char *v)
{
	if (v == NULL)
		return FALSE;
	if (*v == '\0') {
		add_error(l, key_line(l, group, key), group, key,
		          "must not be empty");
		return FALSE;
	}
	return TRUE;
}

/* libmilter's smfi_setconn() forms; the bare "inet:PORT" (every
 * interface) is refused on purpose: the listening address is explicit. */
static gboolean
is_socket_spec(const char *s, const char **why)
{
	struct sockaddr_un sa;
	const char *path = NULL;
	g_autofree char *port = NULL;
	const char *rest = NULL;
	const char *host;
	const char *at;
	gboolean v6;
	guint16 p;

	*why = "must be unix:/PATH, local:/PATH, inet:PORT@HOST or "
	       "inet6:PORT@HOST";
	if (g_str_has_prefix(s, "unix:"))
		path = s + 5;
	else if (g_str_has_prefix(s, "local:"))
		path = s + 6;
	if (path != NULL) {
		if (path[0] != '/' || path[1] == '\0')
			return FALSE;
		if (strlen(path) >= sizeof(sa.sun_path)) {
			*why = "socket path too long for a unix socket";
			return FALSE;
		}
		return TRUE;
	}

	v6 = g_str_has_prefix(s, "inet6:");
	if (v6)
		rest = s + 6;
	else if (g_str_has_prefix(s, "inet:"))
		rest = s + 5;
	if (rest == NULL || (at = strchr(rest, '@')) == NULL)
		return FALSE;
	port = g_strndup(rest, at - rest);
	if (!parse_port(port, &p)) {
		*why = "port must be a number from 1 to 65535";
		return FALSE;
	}
	host = at + 1;
	if (!(v6 ? is_ipv6(host) : is_ipv4(host)) && !is_host_name(host)) {
		*why = "host must be an address of the socket's family or "
		       "a host name";
		return FALSE;
	}
	return TRUE;
}

static gboolean absolute_path(Loader *l, const char *g, const char *key,
                              const char *v);

static void
load_duration(Loader *l, const char *g, const char *key, guint *out_s)
{
	g_autofree char *v = get(l, g, key);

	if (v != NULL && !parse_duration(v, out_s))
		add_error(l, key_line(l, g, key), g, key,
		          "\"%s\": must be a whole number of seconds, or a "
		          "number with a unit s, m, h or d (90s, 10m, 1h, 5d), "
		          "from 1s to 365d",
		          v);
}

/*
 * The delay doubles from spool_retry_min up to spool_retry_max, so the
 * first cannot be the longer.  The error goes to whichever key the file
 * set (spool_retry_max when both), with the other value and its origin.
 */
static void
check_retry_range(Loader *l, const char *g)
{
	const AmConfig *c = l->config;
	guint min_line = key_line(l, g, "spool_retry_min");
	guint max_line = key_line(l, g, "spool_retry_max");

	if (c->spool_retry_min_s <= c->spool_retry_max_s)
		return;
	if (max_line > 0)
		add_error(l, max_line, g, "spool_retry_max",
		          "%us is shorter than spool_retry_min (%us%s): the "
		          "longest retry delay cannot be below the first",
		          c->spool_retry_max_s, c->spool_retry_min_s,
		          min_line > 0 ? "" : ", the default");
	else
		add_error(l, min_line, g, "spool_retry_min",
		          "%us is longer than spool_retry_max (%us, the "
		          "default): the first retry delay cannot be above the "
		          "longest",
		          c->spool_retry_min_s, c->spool_retry_max_s);
}

/* An absolute path replacing *@field, or the default kept. */
static void
load_path(Loader *l, const char *g, const char *key, char **field)
{
	g_autofree char *v = get(l, g, key);

	if (absolute_path(l, g, key, v)) {
		g_free(*field);
		*field = g_steal_pointer(&v);
	}
}

/*
 * The spool's keys.  The directory is only named here: whether it
 * exists with the right mode is checked by --check and by the spool
 * when it opens it, since a configuration may well be checked on
 * another machine.
 */
static void
load_spool(Loader *l, const char *g)
{
	AmConfig *c = l->config;
	g_autofree char *workers = get(l, g, "workers");
	g_autofree char *min_free = get(l, g, "spool_min_free");
	guint64 v;

	load_path(l, g, "spool_dir", &c->spool_dir);
	load_path(l, g, "pid_file", &c->pid_file);

	if (workers != NULL) {
		if (parse_uint(workers, MAX_WORKERS, &v) && v > 0)
			c->workers = (guint)v;
		else
			add_error(l, key_line(l, g, "workers"), g, "workers",
			          "\"%s\": must be a number from 1 to %d",
			          workers, MAX_WORKERS);
	}

	if (min_free != NULL &&
	    !parse_size(min_free, G_MAXUINT64, &c->spool_min_free))
		add_error(l, key_line(l, g, "spool_min_free"), g,
		          "spool_min_free",
		          "\"%s\": must be a size in octets, with an optional "
		          "K, M or G suffix",
		          min_free);

	load_duration(l, g, "spool_max_age", &c->spool_max_age_s);
	load_duration(l, g, "spool_retry_min", &c->spool_retry_min_s);
	load_duration(l, g, "spool_retry_max", &c->spool_retry_max_s);
	check_retry_range(l, g);
}

static void
load_milter(Loader *l)
{
	static const char g[] = "milter";
	AmConfig *c = l->config;
	g_autofree char *spec = require(l, g, "socket");
	g_autofree char *key_file = get(l, g, "archive_id_key_file");
	g_autofree char *mem = get(l, g, "capture_memory_max");
	g_autofree char *match = get(l, g, "match");
	g_autofree char *deadline = get(l, g, "copy_deadline");
	const char *why;
	guint64 size;

	check_keys(l, g, milter_keys);

	if (non_empty(l, g, "socket", spec)) {
		if (is_socket_spec(spec, &why))
			c->socket = g_steal_pointer(&spec);
		else
			add_error(l, key_line(l, g, "socket"), g, "socket",
			          "\"%s\": %s", spec, why);
	}

	/* The daemon runs from "/": a relative name would be a surprise. */
	if (non_empty(l, g, "archive_id_key_file", key_file)) {
		if (g_path_is_absolute(key_file)) {
			g_free(c->archive_id_key_file);
			c->archive_id_key_file = g_steal_pointer(&key_file);
		} else {
			add_error(l, key_line(l, g, "archive_id_key_file"), g,
			          "archive_id_key_file",
			          "\"%s\": must be an absolute path", key_file);
		}
	}

	if (mem != NULL) {
		if (parse_size(mem, G_MAXSIZE, &size))
			c->capture_memory_max = (gsize)size;
		else
			add_error(l, key_line(l, g, "capture_memory_max"), g,
			          "capture_memory_max",
			          "\"%s\": must be a size in octets, with an "
			          "optional K, M or G suffix",
			          mem);
	}

	if (match != NULL) {
		if (strcmp(match, "first") == 0 || strcmp(match, "all") == 0)
			c->match_all = strcmp(match, "all") == 0;
		else
			add_error(l, key_line(l, g, "match"), g, "match",
			          "\"%s\": must be first or all", match);
	}

	if (deadline != NULL && !parse_timeout(deadline, &c->copy_deadline_ms))
		add_error(l, key_line(l, g, "copy_deadline"), g,
		          "copy_deadline",
		          "\"%s\": must be a positive number of seconds, at "
		          "most %d",
		          deadline, MAX_TIMEOUT_S);

	load_spool(l, g);
}

/* [relay:NAME] and [rule:NAME] names are used in logs and references. */
static gboolean
check_name(Loader *l, const char *group, const char *name)
{
	const char *p;

	for (p = name; *p != '\0' && is_key_char(*p); p++)
		;
	if (*name != '\0' && *p == '\0')
		return TRUE;
	add_error(l, group_line(l, group), group, NULL,
	          "the name after ':' must be letters, digits, '.', '_' "
	          "or '-'");
	return FALSE;
}

static void
relay_free(gpointer data)
{
	AmRelay *r = data;

	g_free(r->name);
	g_free(r->host);
	g_free(r->helo_name);
	g_free(r->ca_file);
	g_free(r->auth_user);
	g_free(r->auth_password_file);
	smtp_password_free(r->auth_password);
	g_free(r);
}

static void
load_seconds(Loader *l, const char *g, const char *key, guint *ms)
{
	g_autofree char *v = get(l, g, key);

	if (v != NULL && !parse_timeout(v, ms))
		add_error(l, key_line(l, g, key), g, key,
		          "\"%s\": must be a positive number of seconds, at "
		          "most %d",
		          v, MAX_TIMEOUT_S);
}

/* "timeout" sets every stage; a stage's own key wins over it. */
static void
load_timeouts(Loader *l, const char *g, AmRelay *r)
{
	static const struct {
		const char *key;
		glong offset;
	} stages[] = {
	    {"timeout_connect", G_STRUCT_OFFSET(SmtpTimeouts, connect_ms)},
	    {"timeout_command", G_STRUCT_OFFSET(SmtpTimeouts, command_ms)},
	    {"timeout_data", G_STRUCT_OFFSET(SmtpTimeouts, data_ms)},
	    {"timeout_final", G_STRUCT_OFFSET(SmtpTimeouts, final_ms)},
	};
	guint all = DEFAULT_TIMEOUT_MS;
	guint i;

	load_seconds(l, g, "timeout", &all);
	for (i = 0; i < G_N_ELEMENTS(stages); i++) {
		guint *field =
		    G_STRUCT_MEMBER_P(&r->timeouts, stages[i].offset);

		*field = all;
		load_seconds(l, g, stages[i].key, field);
	}
}

/* An absolute path, so that the daemon's working directory ("/")
 * cannot change which file is meant. */
static gboolean
absolute_path(Loader *l, const char *g, const char *key, const char *v)
{
	if (!non_empty(l, g, key, v))
		return FALSE;
	if (g_path_is_absolute(v))
		return TRUE;
	add_error(l, key_line(l, g, key), g, key,
	          "\"%s\": must be an absolute path", v);
	return FALSE;
}

/* The CA file is opened now, so that a typo shows at --check time and
 * not as a failed handshake at the first copy. */
static void
load_ca_file(Loader *l, const char *g, AmRelay *r)
{
	g_autofree char *v = get(l, g, "ca_file");
	g_autoptr(GError) why = NULL;

	if (!absolute_path(l, g, "ca_file", v))
		return;
	if (smtp_ca_file_check(v, &why))
		r->ca_file = g_steal_pointer(&v);
	else
		add_error(l, key_line(l, g, "ca_file"), g, "ca_file",
		          "\"%s\": cannot read: %s", v, why->message);
}

static gboolean
parse_yes_no(const char *s, gboolean *out)
{
	if (strcmp(s, "yes") == 0 || strcmp(s, "no") == 0) {
		*out = strcmp(s, "yes") == 0;
		return TRUE;
	}
	return FALSE;
}

/* tls, or the default for the host: none on loopback, else verify. */
static void
load_tls(Loader *l, const char *g, AmRelay *r)
{
	g_autofree char *v = get(l, g, "tls");

	r->tls = smtp_tls_default_for_host(r->host != NULL ? r->host : "");
	if (v == NULL)
		return;
	if (smtp_tls_level_from_name(v, &r->tls))
		r->tls_set = TRUE;
	else
		add_error(l, key_line(l, g, "tls"), g, "tls",
		          "\"%s\": must be none, may, encrypt or verify", v);
}

/*
 * auth_user and auth_password_file go together.  The password is read
 * now; an error names the file and the problem, never its content.
 */
static void
load_auth(Loader *l, const char *g, AmRelay *r)
{
	g_autofree char *user = get(l, g, "auth_user");
	g_autofree char *file = get(l, g, "auth_password_file");
	g_autofree char *plain = get(l, g, "auth_plaintext");
	g_autoptr(GError) error = NULL;
	gboolean have_user, have_file;

	if (plain != NULL && !parse_yes_no(plain, &r->auth_plaintext))
		add_error(l, key_line(l, g, "auth_plaintext"), g,
		          "auth_plaintext", "\"%s\": must be yes or no", plain);

	have_user = non_empty(l, g, "auth_user", user);
	have_file = absolute_path(l, g, "auth_password_file", file);
	if (user != NULL && file == NULL)
		add_error(l, key_line(l, g, "auth_user"), g, "auth_user",
		          "needs auth_password_file as well");
	if (file != NULL && user == NULL)
		add_error(l, key_line(l, g, "auth_password_file"), g,
		          "auth_password_file", "needs auth_user as well");
	if (!have_user || !have_file)
		return;

	r->auth_password = smtp_password_file_read(file, &error);
	if (r->auth_password == NULL) {
		add_error(l, key_line(l, g, "auth_password_file"), g,
		          "auth_password_file", "\"%s\": %s", file,
		          error->message);
		return;
	}
	r->auth_user = g_steal_pointer(&user);
	r->auth_password_file = g_steal_pointer(&file);
}

/*
 * The library refuses AUTH without TLS unless auth_plaintext allows
 * it, so such a relay could never take a copy: say so now.
 */
static void
check_auth_tls(Loader *l, const char *g, const AmRelay *r)
{
	if (r->auth_user == NULL || r->tls != SMTP_TLS_NONE ||
	    r->auth_plaintext)
		return;
	add_error(l, key_line(l, g, "auth_user"), g, "auth_user",
	          "AUTH needs TLS, and tls is none%s: set tls = encrypt or "
	          "verify, or auth_plaintext = yes",
	          r->tls_set ? "" : " (the default for a loopback host)");
}

static void
load_relay(Loader *l, const char *g)
{
	AmRelay *r = g_new0(AmRelay, 1);
	g_autofree char *host = require(l, g, "host");
	g_autofree char *port = get(l, g, "port");
	g_autofree char *helo = get(l, g, "helo_name");

	r->name = g_strdup(strchr(g, ':') + 1);
	r->port = DEFAULT_PORT;
	g_ptr_array_add(l->config->relays, r);
	check_name(l, g, r->name);
	check_keys(l, g, relay_keys);

	if (non_empty(l, g, "host", host)) {
		if (is_host(host))
			r->host = g_steal_pointer(&host);
		else
			add_error(l, key_line(l, g, "host"), g, "host",
			          "\"%s\": not an IP address (without "
			          "brackets) or a host name",
			          host);
	}

	if (port != NULL && !parse_port(port, &r->port))
		add_error(l, key_line(l, g, "port"), g, "port",
		          "\"%s\": must be a number from 1 to 65535", port);

	load_timeouts(l, g, r);

	if (non_empty(l, g, "helo_name", helo)) {
		if (is_helo_name(helo))
			r->helo_name = g_steal_pointer(&helo);
		else
			add_error(l, key_line(l, g, "helo_name"), g,
			          "helo_name",
			          "\"%s\": not a host name or an address "
			          "literal like [192.0.2.1]",
			          helo);
	}

	load_tls(l, g, r);
	load_ca_file(l, g, r);
	load_auth(l, g, r);
	check_auth_tls(l, g, r);
}

static void
rule_free(gpointer data)
{
	AmRule *r = data;

	g_free(r->name);
	g_strfreev(r->archive_to);
	g_free(r->archive_from);
	g_free(r->reject_text);
	g_clear_pointer(&r->match_sender, g_regex_unref);
	g_clear_pointer(&r->match_recipient, g_regex_unref);
	g_clear_pointer(&r->match_client, g_regex_unref);
	g_clear_pointer(&r->match_header, g_regex_unref);
	g_free(r);
}

/*
 * Split @v at runs of commas and blanks, in one pass: a list of tens of
 * thousands of addresses costs time in proportion to its length (a
 * regular expression split copied the rest of the string per piece).
 */
static GPtrArray *
split_list(const char *v)
{
	GPtrArray *parts = g_ptr_array_new_with_free_func(g_free);
	const char *p = v;

	for (;;) {
		const char *start;

		while (*p == ',' || g_ascii_isspace(*p))
			p++;
		if (*p == '\0')
			break;
		start = p;
		while (*p != '\0' && *p != ',' && !g_ascii_isspace(*p))
			p++;
		g_ptr_array_add(parts, g_strndup(start, p - start));
	}
	return parts;
}

static void
load_archive_to(Loader *l, const char *g, AmRule *r)
{
	g_autofree char *v = require(l, g, "archive_to");
	g_autoptr(GPtrArray) parts = NULL;
	g_autoptr(GPtrArray) list = NULL;
	guint line = key_line(l, g, "archive_to");
	const char *why;
	guint i;

	if (v == NULL)
		return;
	list = g_ptr_array_new_with_free_func(g_free);
	parts = split_list(v);
	for (i = 0; i < parts->len; i++) {
		const char *part = parts->pdata[i];
		char *addr = bare_address(part, &why);

		if (addr != NULL && *addr == '\0') {
			why = "the null address <> cannot receive mail";
			g_clear_pointer(&addr, g_free);
		}
		if (addr == NULL) {
			add_error(l, line, g, "archive_to", "\"%s\": %s", part,
			          why);
			return;
		}
		g_ptr_array_add(list, addr);
	}
	if (list->len == 0) {
		add_error(l, line, g, "archive_to",
		          "must list at least one address");
		return;
	}
	g_ptr_array_add(list, NULL);
	r->archive_to =
	    (char **)g_ptr_array_free(g_steal_pointer(&list), FALSE);
}

static void
load_archive_from(Loader *l, const char *g, AmRule *r)
{
	g_autofree char *v = get(l, g, "archive_from");
	const char *why;
	char *addr;

	if (v == NULL)
		return;
	if (strpbrk(v, ", \t") != NULL) {
		add_error(l, key_line(l, g, "archive_from"), g, "archive_from",
		          "\"%s\": must be one address", v);
		return;
	}
	addr = bare_address(v, &why);
	if (addr == NULL) {
		add_error(l, key_line(l, g, "archive_from"), g, "archive_from",
		          "\"%s\": %s", v, why);
		return;
	}
	g_free(r->archive_from);
	r->archive_from = addr;
}

static GRegex *
load_regex(Loader *l, const char *g, const char *key)
{
	g_autofree char *v = get(l, g, key);
	g_autoptr(GError) error = NULL;
	GRegex *re;

	if (!non_empty(l, g, key, v))
		return NULL;
	re = g_regex_new(v, G_REGEX_CASELESS, 0, &error);
	if (re == NULL)
		add_error(l, key_line(l, g, key), g, key,
		          "bad regular expression: %s", error->message);
	return re;
}

static void
load_delivery(Loader *l, const char *g, AmRule *r)
{
	g_autofree char *v = get(l, g, "delivery");

	if (v == NULL)
		return;
	if (strcmp(v, "sync") == 0)
		r->delivery = AM_DELIVERY_SYNC;
	else if (strcmp(v, "spool") == 0)
		r->delivery = AM_DELIVERY_SPOOL;
	else
		add_error(l, key_line(l, g, "delivery"), g, "delivery",
		          "\"%s\": must be sync or spool", v);
}

/* One on_OUTCOME key (@outcome AM_OUTCOME_COUNT: on_failure) into @out. */
static void
load_action(Loader *l, const char *g, const char *key, AmOutcome outcome,
            AmDeliveryMode delivery, guint *out)
{
	g_autofree char *v = get(l, g, key);
	g_autofree char *why = NULL;

	if (v != NULL && !am_action_parse(v, outcome, delivery, out, &why))
		add_error(l, key_line(l, g, key), g, key, "\"%s\": %s", v, why);
}

/* on_failure and every on_OUTCOME, checked against the rule's delivery
 * (load_delivery comes first; a bad delivery counts as sync). */
static void
load_policy(Loader *l, const char *g, AmRule *r)
{
	guint i;

	load_action(l, g, "on_failure", AM_OUTCOME_COUNT, r->delivery,
	            &r->on_failure);
	for (i = 0; i < AM_OUTCOME_COUNT; i++) {
		g_autofree char *key =
		    g_strconcat("on_", am_outcome_name(i), NULL);

		load_action(l, g, key, i, r->delivery, &r->actions[i]);
	}
}

/*
 * The text of a configured 550.  It goes into an SMTP reply through
 * smfi_setreply(), which takes printable ASCII only and treats '%' as
 * a format character; 200 characters keep the reply line well inside
 * SMTP's 512.
 */
static void
load_reject_text(Loader *l, const char *g, AmRule *r)
{
	g_autofree char *v = get(l, g, "reject_text");
	guint line = key_line(l, g, "reject_text");
	const char *p;

	if (!non_empty(l, g, "reject_text", v))
		return;
	if (strlen(v) > MAX_REJECT_TEXT) {
		add_error(l, line, g, "reject_text",
		          "%zu characters: an SMTP reply text here may have at "
		          "most %d",
		          strlen(v), MAX_REJECT_TEXT);
		return;
	}
	for (p = v; *p != '\0'; p++) {
		if ((guchar)*p < 0x20 || (guchar)*p > 0x7e) {
			add_error(l, line, g, "reject_text",
			          "must be printable ASCII: an SMTP reply "
			          "carries no other characters");
			return;
		}
		if (*p == '%') {
			add_error(
			    l, line, g, "reject_text",
			    "'%%' is not allowed: libmilter reads it as a "
			    "format character and would drop the text");
			return;
		}
	}
	r->reject_text = g_steal_pointer(&v);
}

static void
load_rule(Loader *l, const char *g)
{
	AmRule *r = g_new0(AmRule, 1);
	g_autofree char *mode = get(l, g, "mode");
	g_autofree char *relay = require(l, g, "relay");
	g_autofree char *min_size = get(l, g, "min_size");

	r->name = g_strdup(strchr(g, ':') + 1);
	r->mode = AM_MODE_JOURNAL;
	r->archive_from = g_strdup("");
	g_ptr_array_add(l->config->rules, r);
	check_name(l, g, r->name);
	check_keys(l, g, rule_keys);

	if (mode != NULL && strcmp(mode, "journal") != 0)
		add_error(l, key_line(l, g, "mode"), g, "mode",
		          "\"%s\": must be journal", mode);

	if (non_empty(l, g, "relay", relay)) {
		r->relay = am_config_find_relay(l->config, relay);
		if (r->relay == NULL)
			add_error(l, key_line(l, g, "relay"), g, "relay",
			          "\"%s\": no [relay:%s] group", relay, relay);
	}

	load_archive_to(l, g, r);
	load_archive_from(l, g, r);

	load_delivery(l, g, r);
	load_policy(l, g, r);
	load_reject_text(l, g, r);

	r->match_sender = load_regex(l, g, "match_sender");
	r->match_recipient = load_regex(l, g, "match_recipient");
	r->match_client = load_regex(l, g, "match_client");
	r->match_header = load_regex(l, g, "match_header");

	if (min_size != NULL &&
	    !parse_size(min_size, G_MAXUINT64, &r->min_size))
		add_error(l, key_line(l, g, "min_size"), g, "min_size",
		          "\"%s\": must be a size in octets, with an optional "
		          "K, M or G suffix",
		          min_size);
}

/*
 * Relays first, so that a rule may name a relay defined further down;
 * rules keep file order.
 */
static void
load_groups(Loader *l)
{
	g_auto(GStrv) groups = g_key_file_get_groups(l->kf, NULL);
	gboolean have_milter = FALSE;
	guint i;

	for (i = 0; groups[i] != NULL; i++) {
		const char *g = groups[i];

		if (strcmp(g, "milter") == 0) {
			have_milter = TRUE;
			load_milter(l);
		} else if (g_str_has_prefix(g, "relay:")) {
			load_relay(l, g);
		} else if (!g_str_has_prefix(g, "rule:")) {
			add_error(l, group_line(l, g), g, NULL,
			          "unknown group; expected [milter], "
			          "[relay:NAME] or [rule:NAME]");
		}
	}
	for (i = 0; groups[i] != NULL; i++) {
		if (g_str_has_prefix(groups[i], "rule:"))
			load_rule(l, groups[i]);
	}

	/* [milter] may come after the relays in the file. */
	for (i = 0; i < l->config->relays->len; i++) {
		AmRelay *r = g_ptr_array_index(l->config->relays, i);

		r->copy_deadline_ms = l->config->copy_deadline_ms;
	}

	if (!have_milter)
		add_error(l, 0, "milter", NULL, "missing group");
	if (l->config->rules->len == 0)
		add_error(l, 0, NULL, NULL,
		          "no [rule:NAME] group: nothing would be archived");
}

static gint
error_cmp(gconstpointer a, gconstpointer b)
{
	const ConfError *x = *(const ConfError *const *)a;
	const ConfError *y = *(const ConfError *const *)b;
	guint xl = x->line > 0 ? x->line : G_MAXUINT;
	guint yl = y->line > 0 ? y->line : G_MAXUINT;

	if (xl != yl)
		return xl < yl ? -1 : 1;
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static AmConfig *
config_new(const char *path)
{
	AmConfig *c = g_new0(AmConfig, 1);

	c->path = g_strdup(path);
	c->archive_id_key_file = g_strdup(DEFAULT_ARCHIVE_ID_KEY_FILE);
	c->capture_memory_max = DEFAULT_CAPTURE_MEMORY_MAX;
	c->copy_deadline_ms = DEFAULT_COPY_DEADLINE_MS;
	c->spool_dir = g_strdup(DEFAULT_SPOOL_DIR);
	c->workers = DEFAULT_WORKERS;
	c->spool_min_free = DEFAULT_SPOOL_MIN_FREE;
	c->spool_max_age_s = DEFAULT_SPOOL_MAX_AGE_S;
	c->spool_retry_min_s = DEFAULT_SPOOL_RETRY_MIN_S;
	c->spool_retry_max_s = DEFAULT_SPOOL_RETRY_MAX_S;
	c->relays = g_ptr_array_new_with_free_func(relay_free);
	c->rules = g_ptr_array_new_with_free_func(rule_free);
	return c;
}

static void
load(Loader *l)
{
	g_autofree char *data = NULL;
	g_autoptr(GString) clean = NULL;
	g_autoptr(GError) error = NULL;
	gsize len;

	if (!g_file_get_contents(l->path, &data, &len, &error)) {
		add_error(l, 0, NULL, NULL, "cannot read: %s", error->message);
		return;
	}

	clean = scan(l, data, len);
	if (!g_key_file_load_from_data(l->kf, clean->str, clean->len,
	                               G_KEY_FILE_NONE, &error)) {
		/* The scanner should have caught it: say what GKeyFile saw. */
		add_error(l, 0, NULL, NULL, "not a valid INI file: %s",
		          error->message);
		return;
	}
	load_groups(l);
}

AmConfig *
am_config_load(const char *path, GPtrArray **errors)
{
	g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GPtrArray) list = NULL;
	g_autoptr(GKeyFile) kf = g_key_file_new();
	Loader l = {0};
	guint i;

	g_return_val_if_fail(path != NULL, NULL);

	l.path = path;
	l.errors = list = g_ptr_array_new_with_free_func(conf_error_free);
	l.group_lines =
	    g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
	l.key_lines =
	    g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
	l.kf = kf;
	l.config = config_new(path);

	load(&l);
	g_hash_table_unref(l.group_lines);
	/* Kept for am_config_where(): checks made after loading (--check,
	 * the daemon's start) name the line too. */
	l.config->key_lines = l.key_lines;

	/* Errors in file order, those without a line last. */
	g_ptr_array_sort(list, error_cmp);
	for (i = 0; i < list->len; i++) {
		ConfError *e = g_ptr_array_index(list, i);

		g_ptr_array_add(out, g_steal_pointer(&e->text));
	}
	if (out->len > 0)
		g_clear_pointer(&l.config, am_config_free);
	if (errors != NULL)
		*errors = g_steal_pointer(&out);
	return l.config;
}

void
am_config_free(AmConfig *config)
{
	if (config == NULL)
		return;
	/* Rules point at relays: free them first. */
	g_ptr_array_unref(config->rules);
	g_ptr_array_unref(config->relays);
	g_free(config->path);
	g_free(config->socket);
	g_free(config->archive_id_key_file);
	g_free(config->pid_file);
	g_free(config->spool_dir);
	if (config->key_lines != NULL)
		g_hash_table_unref(config->key_lines);
	g_free(config);
}

guint
am_config_key_line(const AmConfig *config, const char *group, const char *key)
{
	g_autofree char *id = NULL;
	const KeyLines *kl;

	g_return_val_if_fail(config != NULL, 0);
	g_return_val_if_fail(group != NULL && key != NULL, 0);

	if (config->key_lines == NULL)
		return 0;
	id = g_strconcat(group, "\n", key, NULL);
	kl = g_hash_table_lookup(config->key_lines, id);
	return kl != NULL ? kl->last : 0;
}

char *
am_config_where(const AmConfig *config, const char *group, const char *key)
{
	guint line;

	g_return_val_if_fail(config != NULL, NULL);

	line = am_config_key_line(config, group, key);
	if (line == 0)
		return g_strdup_printf("%s: [%s] %s (default)", config->path,
		                       group, key);
	return g_strdup_printf("%s:%u: [%s] %s", config->path, line, group,
	                       key);
}

const AmRelay *
am_config_find_relay(const AmConfig *config, const char *name)
{
	guint i;

	g_return_val_if_fail(config != NULL, NULL);
	g_return_val_if_fail(name != NULL, NULL);

	for (i = 0; i < config->relays->len; i++) {
		const AmRelay *r = g_ptr_array_index(config->relays, i);

		if (strcmp(r->name, name) == 0)
			return r;
	}
	return NULL;
}

const char *
am_mode_name(AmMode mode)
{
	switch (mode) {
	case AM_MODE_JOURNAL:
		return "journal";
	}
	return "unknown";
}

const char *
am_delivery_mode_name(AmDeliveryMode delivery)
{
	switch (delivery) {
	case AM_DELIVERY_SYNC:
		return "sync";
	case AM_DELIVERY_SPOOL:
		return "spool";
	}
	return "unknown";
}

/* In AmOutcome order; the keys are "on_" and these. */
static const char *const outcome_names[AM_OUTCOME_COUNT] = {
    "sent",       "some_refused", "all_refused", "sender_refused",
    "data_error", "unreachable",  "timeout",     "tls_error",
};

const char *
am_outcome_name(AmOutcome outcome)
{
	if ((guint)outcome >= AM_OUTCOME_COUNT)
		return "unknown";
	return outcome_names[outcome];
}

/* In bit order of AmAction: names[i] is 1 << i. */
static const char *const action_names[] = {
    "accept", "tempfail", "reject", "quarantine", "spool", "header",
};

#define ACTION_LIST "accept, tempfail, reject, quarantine, spool and header"

static gboolean fail_why(char **why, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

/* Set *@why (when asked for) and return FALSE. */
static gboolean
fail_why(char **why, const char *fmt, ...)
{
	va_list ap;

	if (why == NULL)
		return FALSE;
	va_start(ap, fmt);
	*why = g_strdup_vprintf(fmt, ap);
	va_end(ap);
	return FALSE;
}

/* The bit named @name exactly, or 0. */
static guint
action_bit(const char *name)
{
	guint i;

	for (i = 0; i < G_N_ELEMENTS(action_names); i++) {
		if (strcmp(name, action_names[i]) == 0)
			return 1u << i;
	}
	return 0;
}

/* "accept+header" into bits; each name once, blanks around '+' allowed. */
static gboolean
action_names_parse(const char *text, guint *out, char **why)
{
	g_auto(GStrv) names = g_strsplit(text, "+", -1);
	guint set = 0;
	guint i;

	for (i = 0; names[i] != NULL; i++) {
		const char *name = g_strstrip(names[i]);
		g_autofree char *lower = NULL;
		guint bit;

		if (*name == '\0')
			return fail_why(
			    why, "an action name is missing (a '+' "
			         "at the start, at the end or twice "
			         "in a row); the actions are " ACTION_LIST);
		bit = action_bit(name);
		if (bit == 0) {
			lower = g_ascii_strdown(name, -1);
			if (action_bit(lower) != 0)
				return fail_why(
				    why,
				    "action names are written in lower "
				    "case: %s",
				    lower);
			return fail_why(why,
			                "unknown action \"%s\"; the actions "
			                "are " ACTION_LIST,
			                name);
		}
		if (set & bit)
			return fail_why(why, "\"%s\" is named twice", name);
		set |= bit;
	}
	*out = set;
	return TRUE;
}

/*
 * Whether @set is one of the combinations that mean something.  Only
 * one thing can happen to the original (accept, tempfail, reject), and
 * a copy not confirmed either waits in the queue (spool) or is given up
 * on into hold/ (accept).
 */
static gboolean
action_set_check(guint set, char **why)
{
	if ((set & AM_ACTION_REJECT) && set != AM_ACTION_REJECT)
		return fail_why(why, "reject refuses the original, so it "
		                     "cannot be combined with another action");
	if ((set & AM_ACTION_TEMPFAIL) && set != AM_ACTION_TEMPFAIL)
		return fail_why(why, "tempfail asks the sender to try again "
		                     "later, so it cannot be combined with "
		                     "another action");
	if ((set & AM_ACTION_ACCEPT) && (set & AM_ACTION_SPOOL))
		return fail_why(why, "accept and spool cannot be combined: "
		                     "both accept the original, but spool "
		                     "keeps the copy queued for retry while "
		                     "accept gives up on it (hold/); choose "
		                     "one");
	if ((set & AM_ACTION_QUARANTINE) && !(set & AM_ACTION_SPOOL))
		return fail_why(why,
		                "quarantine needs spool as well "
		                "(spool+quarantine): Postfix does not pass a "
		                "held message through the milters again when "
		                "it is released, so only the spool can still "
		                "deliver its archive copy");
	return TRUE;
}

/* The first of @set's actions that delivery = spool cannot carry out. */
static const char *
spool_refuses(guint set)
{
	if (set & AM_ACTION_REJECT)
		return "reject";
	if (set & AM_ACTION_QUARANTINE)
		return "quarantine";
	if (set & AM_ACTION_HEADER)
		return "header";
	return NULL;
}

gboolean
am_action_parse(const char *text, AmOutcome outcome, AmDeliveryMode delivery,
                guint *actions, char **why)
{
	const char *refused;
	guint set = 0;

	g_return_val_if_fail(text != NULL, FALSE);
	g_return_val_if_fail(actions != NULL, FALSE);
	g_return_val_if_fail((guint)outcome <= AM_OUTCOME_COUNT, FALSE);

	/* Step 1: the names, then whether they go together. */
	if (*text == '\0')
		return fail_why(why, "no action; the actions are " ACTION_LIST
		                     ", several joined with '+' "
		                     "(spool+header)");
	if (!action_names_parse(text, &set, why) || !action_set_check(set, why))
		return FALSE;
	if (set == AM_ACTION_HEADER)
		set |= AM_ACTION_ACCEPT;

	/* Step 2: what the outcome and the delivery mode leave possible. */
	if (outcome == AM_OUTCOME_SENT &&
	    (set & ~(guint)AM_ACTION_HEADER) != AM_ACTION_ACCEPT)
		return fail_why(why, "the copy was confirmed, so there is "
		                     "nothing to retry, hold or refuse: use "
		                     "accept or accept+header");
	if (delivery == AM_DELIVERY_SPOOL &&
	    (refused = spool_refuses(set)) != NULL)
		return fail_why(
		    why,
		    "with delivery = spool the original is already accepted "
		    "when the copy's outcome is known, so %s cannot apply; "
		    "use tempfail or spool (retry later) or accept (stop "
		    "retrying, the copy is kept in hold/)",
		    refused);

	*actions = set;
	return TRUE;
}

guint
am_rule_action(const AmRule *rule, AmOutcome outcome, gboolean temporary)
{
	g_return_val_if_fail(rule != NULL, AM_ACTION_TEMPFAIL);
	g_return_val_if_fail((guint)outcome < AM_OUTCOME_COUNT,
	                     AM_ACTION_TEMPFAIL);

	if (rule->actions[outcome] != 0)
		return rule->actions[outcome];
	if (outcome == AM_OUTCOME_SENT)
		return AM_ACTION_ACCEPT;
	if (rule->on_failure != 0)
		return rule->on_failure;
	if (!temporary)
		return AM_ACTION_ACCEPT;
	return rule->delivery == AM_DELIVERY_SPOOL ? AM_ACTION_SPOOL
	                                           : AM_ACTION_TEMPFAIL;
}

char *
am_action_format(guint actions)
{
	/* What happens to the original first, then to the copy, then the
	 * header: "spool+quarantine+header". */
	static const AmAction order[] = {
	    AM_ACTION_ACCEPT, AM_ACTION_TEMPFAIL,   AM_ACTION_REJECT,
	    AM_ACTION_SPOOL,  AM_ACTION_QUARANTINE, AM_ACTION_HEADER,
	};
	GString *out = g_string_new(NULL);
	guint i;

	for (i = 0; i < G_N_ELEMENTS(order); i++) {
		if ((actions & order[i]) == 0)
			continue;
		if (out->len > 0)
			g_string_append_c(out, '+');
		g_string_append(out, action_names[g_bit_nth_lsf(order[i], -1)]);
	}
	if (out->len == 0)
		g_string_append(out, "default");
	return g_string_free(out, FALSE);
}
