/*
 * smtp-send.c - the command-line face of smtp_client_sendmail()
 *
 * smtp-send --server HOST[:PORT] --from ADDR --to ADDR [--to ADDR]...
 *           [--mail-option OPT]... [--rcpt-option OPT]... [--helo NAME]
 *           [--timeout SECONDS] [--tls LEVEL] [--ca-file FILE]
 *           [--auth-user USER --auth-password-file FILE]
 *           [--auth-plaintext] [--text] [--json] [FILE]...
 *
 * Each FILE is one message; all of them go over one SmtpClient, in order,
 * and sending goes on after a failure (the library connects again by
 * itself after a lost connection).  They go to the library in batches
 * (smtp_client_send_batch), so that with PIPELINING each message costs
 * one round trip; what each one reports is the same as if sent alone.
 * A thread loads the next batch while one is being sent (see Loader).
 * With no FILE, or for a FILE "-", the message is read from standard
 * input, wholly into memory, so that SIZE= can be announced.  A regular
 * file over 64 KiB is handed to the library as a file descriptor and
 * streamed; a smaller one is read into memory first: the library reads
 * with pread(), and for a small file one read costs fewer system calls.
 * A FILE that is not a regular file (a FIFO, a device) is refused as
 * unreadable (66): it is opened without blocking and never read, since
 * a FIFO nobody writes to would hold smtp-send (and its idle relay
 * connection) for ever, whatever --timeout says, and a device such as
 * /dev/zero has no end.  Such input goes through standard input ("-").
 * What is read into memory (standard input, a small file that grows
 * while read) is capped at 64 MiB (MEMORY_INPUT_MAX): beyond that the
 * message is an INPUT error (65), not an unbounded allocation.
 * XXX: standard input itself is read without a time limit.
 *
 * Output, per message.  Plain: "FILE: sent (REPLY)" or "FILE: error" on
 * standard output, then "refused <ADDR>: CODE X.Y.Z TEXT" per refused
 * recipient and "dropped option OPT: ..." per option the server does not
 * advertise; the error itself goes to standard error as key=value pairs.
 * Server text is escaped there (\n, \xHH, \uXXXX for the Unicode
 * direction controls), as a server could otherwise write terminal
 * control sequences to the operator's screen or reorder its text.  --json:
 * exactly one object per message and line:
 *
 *   {"file": "-", "status": "sent" | "error",
 *    "refused": {"ADDR": [CODE, "TEXT"] | [CODE, "TEXT", "X.Y.Z"]},
 *    "error": null | {"kind": "...", "code": N, "text": "...",
 *                     "enhanced": "X.Y.Z", "stage": "..."},
 *    "dropped_options": ["OPT", ...]}
 *
 * Issue 2 shows a refusal as [CODE, "TEXT"] and asks for the enhanced
 * code "inside each refusal where the server gave one"; the array keeps
 * the shape and carries it as an optional third element.
 * "enhanced" in "error" is likewise present only when given.  "code" is
 * 0 where no reply was involved.  Strings are always valid JSON and
 * UTF-8: control characters become \u00XX, and each byte that is not
 * part of valid UTF-8 becomes U+FFFD (the server's text is not ours to
 * trust).  A recipient given twice appears once in "refused".
 *
 * Exit status (sysexits.h): 0 when every message was accepted for at
 * least one recipient; 64 usage; 65 bad input found before sending
 * (SMTP_ERROR_INPUT); 66 unreadable file; 69 permanent failure (5xx at
 * any stage, a permanent TLS or AUTH failure, and NOT_SUPPORTED: the
 * server lacks SMTPUTF8, which retrying will not change); 75 temporary
 * failure (4xx, connect, timeout, disconnect, and a protocol error: a
 * garbled or out-of-step reply, which smtp_error_is_temporary() calls
 * temporary, as RFC 5321 clients retry); 76 only for an error outside
 * the library's domain, which it never raises.  With several messages:
 * 75 when any failure was temporary, else the first failure's status.
 * 74 when the report itself cannot be written, as the caller then
 * cannot know what was sent.
 *
 * TLS and AUTH: --tls takes Postfix's level names; the default is that
 * of smtp_tls_default_for_host(), the rule archive-milter's relays
 * follow too (none for a loopback server, else verify).  The password
 * comes only from --auth-password-file, read with the library's
 * smtp_password_file_read() (a regular file its group and others cannot
 * read): a password in argv would be visible to every user through ps
 * and /proc.  It is wiped after use and never printed.  A bad level, a
 * --ca-file that cannot be read, a user without a password file (or the
 * other way round) and a refused password file are usage errors (64),
 * found before any connection.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include <glib.h>

#include "smtpclient.h"

#define DEFAULT_PORT 25

/* Regular files up to this size are read into memory, larger ones are
 * streamed from their descriptor; a batch of BATCH small files thus
 * holds at most 4 MiB, the two batches of the Loader 8 MiB. */
#define SMALL_FILE (64 * 1024)

/* The most read into memory for one message (standard input, or a
 * small file that grows while read): /dev/zero on standard input must
 * not take all the memory there is. */
#define MEMORY_INPUT_MAX (64 * 1024 * 1024)

typedef struct {
	char *server; /* HOST[:PORT] as given */
	char *from;   /* NULL: not given; "" or "<>": null sender */
	char **to;
	char **mail_options;
	char **rcpt_options;
	char *helo;
	char *timeout; /* seconds, as given */
	char *tls;     /* level name, as given; NULL: by host */
	char *ca_file;
	char *auth_user;
	char *auth_password_file;
	gboolean auth_plaintext;
	gboolean text;
	gboolean json;
	char **files;
} Options;

/* What happened to one message, gathered for the report. */
typedef struct {
	const char *file;
	const GError *error;      /* NULL: sent */
	const GPtrArray *refused; /* SmtpRefusal *, or NULL */
	const GPtrArray *dropped; /* char *, or NULL */
	const SmtpReply *reply;   /* the answer to ".", when sent */
} Outcome;

static const char epilogue[] =
    "Each FILE is one message; all are sent over one connection, in order,\n"
    "and a failure does not stop the others.  With no FILE, or FILE \"-\",\n"
    "the message is read from standard input (at most 64 MiB).  A FILE must\n"
    "be a regular file: a FIFO or device is refused (66); pipe it to \"-\".\n"
    "--from \"\" or \"<>\" is the null sender; angle brackets around\n"
    "addresses are removed.\n"
    "\n"
    "--json prints one object per message and line:\n"
    "  {\"file\": \"-\", \"status\": \"sent\" or \"error\",\n"
    "   \"refused\": {\"ADDR\": [CODE, \"TEXT\"] or [CODE, \"TEXT\", "
    "\"X.Y.Z\"]},\n"
    "   \"error\": null or {\"kind\": \"...\", \"code\": N, \"text\": "
    "\"...\",\n"
    "                     \"enhanced\": \"X.Y.Z\", \"stage\": \"...\"},\n"
    "   \"dropped_options\": [\"OPT\", ...]}\n"
    "The enhanced status code (third element of a refusal, \"enhanced\" in\n"
    "\"error\") is there only when the server gave one; \"code\" is 0 when\n"
    "no reply was involved; \"stage\" is the step that failed (connect,\n"
    "ehlo, mail, rcpt, data, end-of-data, input...).  kind is one of\n"
    "recipients_refused, sender_refused, data_error, helo_error,\n"
    "not_supported, connect, timeout, disconnected, protocol, tls, auth,\n"
    "input.\n"
    "\n"
    "Exit status: 0 every message accepted for at least one recipient;\n"
    "64 usage error; 65 bad input found before sending; 66 unreadable "
    "file;\n"
    "69 permanent failure (5xx, not_supported); 75 temporary failure (4xx,\n"
    "connect, timeout, disconnected, protocol).  With several messages:\n"
    "75 if any failure was temporary, else the first failure's.\n"
    "\n"
    "--tls LEVEL is none, may (STARTTLS when offered, unverified), encrypt\n"
    "(required, unverified) or verify (required, certificate and host name\n"
    "checked against --ca-file or the system store).  Default: verify, or\n"
    "none for a loopback server (127.0.0.0/8, ::1, localhost).  The AUTH\n"
    "password is the first line of --auth-password-file, which its group\n"
    "and others must not be able to read; AUTH is refused without TLS\n"
    "unless --auth-plaintext is given.";

/* ------------------------------------------------------------------ */
/* Arguments                                                            */
/* ------------------------------------------------------------------ */

static gboolean
parse_port(const char *s, guint16 *port)
{
	guint64 v;

	if (!g_ascii_string_to_unsigned(s, 10, 1, G_MAXUINT16, &v, NULL))
		return FALSE;
	*port = (guint16)v;
	return TRUE;
}

static gboolean
has_space_or_control(const char *s)
{
	for (; *s != '\0'; s++) {
		if (g_ascii_isspace(*s) || g_ascii_iscntrl(*s))
			return TRUE;
	}
	return FALSE;
}

/*
 * Split "host", "host:port", "[addr]" or "[addr]:port".  A bare IPv6
 * address is refused: "::1:2525" could be either an address or an
 * address and a port, so brackets are required, as in Postfix.
 */
static gboolean
parse_server(const char *arg, char **host, guint16 *port, GError **error)
{
	g_autofree char *name = NULL;
	const char *rest;

	*port = DEFAULT_PORT;
	if (arg[0] == '[') {
		const char *close = strchr(arg, ']');

		if (close == NULL)
			goto bad;
		name = g_strndup(arg + 1, close - arg - 1);
		if (!g_hostname_is_ip_address(name))
			goto bad;
		rest = close + 1;
	} else {
		rest = strchr(arg, ':');
		if (rest != NULL && strchr(rest + 1, ':') != NULL)
			goto bad;
		name = rest ? g_strndup(arg, rest - arg) : g_strdup(arg);
		if (rest == NULL)
			rest = "";
	}

	if (name[0] == '\0' || has_space_or_control(name))
		goto bad;
	if (rest[0] == ':' && !parse_port(rest + 1, port))
		goto bad;
	if (rest[0] != ':' && rest[0] != '\0')
		goto bad;
	*host = g_steal_pointer(&name);
	return TRUE;

bad:
	g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
	            "--server: expected HOST, HOST:PORT or [ADDRESS]:PORT "
	            "(port 1-65535), got \"%s\"",
	            arg);
	return FALSE;
}

/*
 * Seconds, fractions allowed (tests use short limits), to milliseconds:
 * decimal digits with at most one ".", nothing else.  strtod() would
 * also take hex ("0x10"), exponents, "inf", "nan" and leading blanks,
 * which an operator typing a time limit never means.
 */
static gboolean
parse_timeout(const char *arg, guint *ms, GError **error)
{
	gsize int_digits = strspn(arg, "0123456789");
	const char *frac = arg + int_digits;
	gsize frac_digits = 0;
	double v = 0;

	if (*frac == '.')
		frac_digits = strspn(frac + 1, "0123456789");
	if (int_digits + frac_digits > 0 &&
	    frac[*frac == '.' ? 1 + frac_digits : 0] == '\0')
		v = g_ascii_strtod(arg, NULL);
	if (!(v > 0) || v > G_MAXUINT / 1000.0) {
		g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
		            "--timeout: expected a positive number of "
		            "seconds (digits, optionally with a decimal "
		            "point), got \"%s\"",
		            arg);
		return FALSE;
	}
	*ms = (guint)(v * 1000.0);
	if (*ms == 0)
		*ms = 1;
	return TRUE;
}

/* --tls, or the default for @host when not given. */
static gboolean
parse_tls(const Options *opt, const char *host, SmtpTlsLevel *level,
          GError **error)
{
	*level = smtp_tls_default_for_host(host);
	if (opt->tls == NULL || smtp_tls_level_from_name(opt->tls, level))
		return TRUE;
	g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
	            "--tls: expected none, may, encrypt or verify, got \"%s\"",
	            opt->tls);
	return FALSE;
}

/* The CA file is opened now: a typo is a usage error, not a failed
 * handshake after the connection. */
static gboolean
check_ca_file(const char *path, GError **error)
{
	g_autoptr(GError) why = NULL;

	if (path == NULL || smtp_ca_file_check(path, &why))
		return TRUE;
	g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
	            "--ca-file: cannot read %s: %s", path, why->message);
	return FALSE;
}

/*
 * The password of --auth-password-file, or NULL without AUTH (and
 * without an error).  Errors name the file and the reason, never a byte
 * of its content.
 */
static gboolean
read_password(const Options *opt, char **password, GError **error)
{
	g_autoptr(GError) local = NULL;

	*password = NULL;
	if ((opt->auth_user == NULL) != (opt->auth_password_file == NULL)) {
		g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
		            "--auth-user and --auth-password-file go together");
		return FALSE;
	}
	if (opt->auth_user == NULL)
		return TRUE;
	if (opt->auth_user[0] == '\0') {
		g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
		            "--auth-user: must not be empty");
		return FALSE;
	}
	*password = smtp_password_file_read(opt->auth_password_file, &local);
	if (*password != NULL)
		return TRUE;
	g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
	            "--auth-password-file: %s: %s", opt->auth_password_file,
	            local->message);
	return FALSE;
}

/* "<a@b>" -> "a@b", "<>" -> "": the library wants bare addresses. */
static char *
bare_address(const char *arg)
{
	gsize len = strlen(arg);

	if (len >= 2 && arg[0] == '<' && arg[len - 1] == '>')
		return g_strndup(arg + 1, len - 2);
	return g_strdup(arg);
}

static int
usage_error(const char *message)
{
	g_printerr("%s: %s\n", g_get_prgname(), message);
	g_printerr("Try '%s --help' for more information.\n", g_get_prgname());
	return EX_USAGE;
}

/* Checks GOption cannot express: required options, stdin used once. */
static gboolean
check_options(const Options *opt, GError **error)
{
	const char *missing = NULL;
	guint n_stdin = 0;

	if (opt->server == NULL)
		missing = "--server";
	else if (opt->from == NULL)
		missing = "--from";
	else if (opt->to == NULL || opt->to[0] == NULL)
		missing = "--to";
	if (missing != NULL) {
		g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
		            "%s is required", missing);
		return FALSE;
	}
	for (char **t = opt->to; *t != NULL; t++) {
		if (**t == '\0' || strcmp(*t, "<>") == 0) {
			g_set_error(error, G_OPTION_ERROR,
			            G_OPTION_ERROR_BAD_VALUE,
			            "--to: a recipient cannot be empty");
			return FALSE;
		}
	}
	for (char **f = opt->files; f != NULL && *f != NULL; f++)
		n_stdin += strcmp(*f, "-") == 0;
	if (n_stdin > 1) {
		g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
		            "standard input (\"-\") can be given only once");
		return FALSE;
	}
	return TRUE;
}

/* ------------------------------------------------------------------ */
/* Messages                                                             */
/* ------------------------------------------------------------------ */

/* Read @fd to its end; NULL with a G_FILE_ERROR naming @name, or an
 * SMTP_ERROR_INPUT past MEMORY_INPUT_MAX octets. */
static GBytes *
read_all(int fd, const char *name, GError **error)
{
	g_autoptr(GByteArray) buf = g_byte_array_new();
	guint8 chunk[65536];

	for (;;) {
		ssize_t n;

		if (buf->len > MEMORY_INPUT_MAX) {
			g_set_error(error, SMTP_ERROR, SMTP_ERROR_INPUT,
			            "%s: more than %d MiB to read into memory "
			            "(give a large message as a regular file)",
			            name, MEMORY_INPUT_MAX / (1024 * 1024));
			return NULL;
		}
		n = read(
		    fd, chunk,
		    MIN(sizeof(chunk), (gsize)MEMORY_INPUT_MAX + 1 - buf->len));

		if (n == 0)
			break;
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int saved = errno;

			g_set_error(
			    error, G_FILE_ERROR, g_file_error_from_errno(saved),
			    "cannot read %s: %s", name, g_strerror(saved));
			return NULL;
		}
		g_byte_array_append(buf, chunk, (guint)n);
	}
	return g_byte_array_free_to_bytes(g_steal_pointer(&buf));
}

static gboolean
append_from_memory(SmtpMessage *msg, int fd, const char *name, GError **error)
{
	g_autoptr(GBytes) bytes = read_all(fd, name, error);

	if (bytes == NULL)
		return FALSE;
	smtp_message_append_bytes(msg, bytes);
	return TRUE;
}

/*
 * The message of @file ("-": standard input).  Errors opening or
 * reading are in G_FILE_ERROR, which the report counts as unreadable.
 */
static SmtpMessage *
load_message(const char *file, SmtpMessageKind kind, GError **error)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(kind);
	struct stat st;
	gboolean ok;
	int fd;

	if (strcmp(file, "-") == 0) {
		if (!append_from_memory(msg, STDIN_FILENO, "standard input",
		                        error))
			return NULL;
		return g_steal_pointer(&msg);
	}

	/* Open and check the file.  O_NONBLOCK: open() of a FIFO without
	 * a writer would otherwise wait for one for ever; for a regular
	 * file it changes nothing. */
	fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0 || fstat(fd, &st) < 0) {
		int saved = errno;

		g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(saved),
		            "cannot open %s: %s", file, g_strerror(saved));
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	if (S_ISDIR(st.st_mode)) {
		g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_ISDIR,
		            "cannot read %s: %s", file, g_strerror(EISDIR));
		close(fd);
		return NULL;
	}
	if (!S_ISREG(st.st_mode)) {
		g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
		            "cannot read %s: not a regular file (a FIFO or a "
		            "device: give it on standard input as \"-\")",
		            file);
		close(fd);
		return NULL;
	}

	/* Stream regular files, but read small ones at once: that saves
	 * the library a dup(), an fstat() and a pread() per message. */
	if (st.st_size > SMALL_FILE)
		ok = smtp_message_append_fd(msg, fd, 0, -1, error);
	else
		ok = append_from_memory(msg, fd, file, error);
	close(fd);
	return ok ? g_steal_pointer(&msg) : NULL;
}

/* ------------------------------------------------------------------ */
/* Outcome: kind and exit status                                        */
/* ------------------------------------------------------------------ */

static const char *
error_kind(const GError *error)
{
	static const char *const names[] = {
	    [SMTP_ERROR_RECIPIENTS_REFUSED] = "recipients_refused",
	    [SMTP_ERROR_SENDER_REFUSED] = "sender_refused",
	    [SMTP_ERROR_DATA] = "data_error",
	    [SMTP_ERROR_HELO] = "helo_error",
	    [SMTP_ERROR_NOT_SUPPORTED] = "not_supported",
	    [SMTP_ERROR_CONNECT] = "connect",
	    [SMTP_ERROR_TIMEOUT] = "timeout",
	    [SMTP_ERROR_DISCONNECTED] = "disconnected",
	    [SMTP_ERROR_TLS] = "tls",
	    [SMTP_ERROR_AUTH] = "auth",
	    [SMTP_ERROR_PROTOCOL] = "protocol",
	    [SMTP_ERROR_INPUT] = "input",
	    [SMTP_ERROR_IO] = "io",
	};

	/* An unreadable file is bad input, with a status of its own */
	if (error->domain == G_FILE_ERROR)
		return "input";
	if (error->domain == SMTP_ERROR && error->code >= 0 &&
	    (gsize)error->code < G_N_ELEMENTS(names) &&
	    names[error->code] != NULL)
		return names[error->code];

	/* The library promises SMTP_ERROR only; anything else is as
	 * unexpected as a malformed reply */
	return "protocol";
}

static int
error_status(const GError *error)
{
	if (error == NULL)
		return EX_OK;
	if (error->domain == G_FILE_ERROR)
		return EX_NOINPUT;
	if (error->domain != SMTP_ERROR)
		return EX_PROTOCOL;
	switch (error->code) {
	case SMTP_ERROR_INPUT:
		return EX_DATAERR;
	case SMTP_ERROR_NOT_SUPPORTED:
		/* a missing capability; retrying will not add it */
		return EX_UNAVAILABLE;
	default:
		/* The library's word, the one the milter goes by too: a
		 * garbled or out-of-step reply (PROTOCOL) is temporary */
		return smtp_error_is_temporary(error) ? EX_TEMPFAIL
		                                      : EX_UNAVAILABLE;
	}
}

static const SmtpReply *
error_reply(const GError *error)
{
	return error->domain == SMTP_ERROR ? smtp_error_get_reply(error) : NULL;
}

static const char *
error_stage(const GError *error)
{
	if (error->domain == G_FILE_ERROR)
		return "input";
	/* smtp-send's own INPUT (the memory cap) carries no stage */
	if (error->domain == SMTP_ERROR)
		return smtp_error_get_stage(error) != NULL ||
		               error->code != SMTP_ERROR_INPUT
		           ? smtp_error_get_stage(error)
		           : "input";
	return NULL;
}

static gboolean
has_text(const char *s)
{
	return s != NULL && s[0] != '\0';
}

/* ------------------------------------------------------------------ */
/* JSON output                                                          */
/* ------------------------------------------------------------------ */

/*
 * The escapes JSON and the terminal share: the backslash, LF, CR and
 * TAB; NULL for any other character.
 */
static const char *
common_escape(gunichar c)
{
	switch (c) {
	case '\\':
		return "\\\\";
	case '\n':
		return "\\n";
	case '\r':
		return "\\r";
	case '\t':
		return "\\t";
	default:
		return NULL;
	}
}

/*
 * Unicode's invisible direction and format controls: LRE, RLE, PDF,
 * LRO, RLO (U+202A-202E), the isolates LRI, RLI, FSI, PDI
 * (U+2066-2069), LRM, RLM (U+200E, U+200F) and the Arabic letter mark
 * (U+061C), plus the line and paragraph separators.  Shown raw, a
 * server's text could reorder what the operator reads ("Trojan
 * Source"), so both outputs escape them.
 */
static gboolean
is_invisible_control(gunichar c)
{
	return (c >= 0x202a && c <= 0x202e) || (c >= 0x2066 && c <= 0x2069) ||
	       c == 0x200e || c == 0x200f || c == 0x061c || c == 0x2028 ||
	       c == 0x2029;
}

/*
 * The length of the run at @s of octets both outputs pass unchanged:
 * printable ASCII but the backslash and the double quote.  Appended in
 * one piece, they spare the report a call per character (server text
 * and file names are mostly such runs).
 */
static gsize
safe_run(const char *s, const char *end)
{
	const char *p = s;

	while (p < end && *p >= 0x20 && *p < 0x7f && *p != '\\' && *p != '"')
		p++;
	return p - s;
}

/*
 * Append @s as a JSON string.  Bytes that are not valid UTF-8 become
 * U+FFFD so that the line stays valid JSON whatever the server sent;
 * U+2028 and U+2029 are escaped for JavaScript consumers, and the
 * direction controls for whoever reads the JSON on a terminal.
 */
static void
json_append_string(GString *out, const char *s)
{
	const char *end;

	if (s == NULL) {
		g_string_append(out, "null");
		return;
	}
	end = s + strlen(s);
	g_string_append_c(out, '"');
	while (s < end) {
		gsize run = safe_run(s, end);
		gunichar c;
		const char *next, *esc;

		if (run > 0) {
			g_string_append_len(out, s, run);
			s += run;
			continue;
		}
		c = g_utf8_get_char_validated(s, end - s);
		if (c == (gunichar)-1 || c == (gunichar)-2) {
			g_string_append(out, "\\ufffd");
			s++;
			continue;
		}
		next = g_utf8_next_char(s);
		esc = c == '"' ? "\\\"" : common_escape(c);
		if (esc != NULL)
			g_string_append(out, esc);
		else if (c < 0x20 || c == 0x7f || is_invisible_control(c))
			g_string_append_printf(out, "\\u%04x", c);
		else
			g_string_append_len(out, s, next - s);
		s = next;
	}
	g_string_append_c(out, '"');
}

/* Whether the refusal at @i repeats an earlier recipient's address. */
static gboolean
refusal_seen_before(const GPtrArray *refused, guint i)
{
	const SmtpRefusal *r = g_ptr_array_index(refused, i);

	for (guint j = 0; j < i; j++) {
		const SmtpRefusal *o = g_ptr_array_index(refused, j);

		if (g_strcmp0(o->recipient, r->recipient) == 0)
			return TRUE;
	}
	return FALSE;
}

static void
json_append_refused(GString *out, const GPtrArray *refused)
{
	gboolean first = TRUE;

	g_string_append_c(out, '{');
	for (guint i = 0; refused != NULL && i < refused->len; i++) {
		const SmtpRefusal *r = g_ptr_array_index(refused, i);

		/* duplicate keys would make the object ambiguous */
		if (refusal_seen_before(refused, i))
			continue;
		if (!first)
			g_string_append(out, ", ");
		first = FALSE;
		json_append_string(out, r->recipient);
		g_string_append_printf(out, ": [%d, ", r->reply.code);
		json_append_string(out, r->reply.text ? r->reply.text : "");
		if (has_text(r->reply.enhanced)) {
			g_string_append(out, ", ");
			json_append_string(out, r->reply.enhanced);
		}
		g_string_append_c(out, ']');
	}
	g_string_append_c(out, '}');
}

static void
json_append_error(GString *out, const GError *error)
{
	const SmtpReply *reply;

	if (error == NULL) {
		g_string_append(out, "null");
		return;
	}
	reply = error_reply(error);
	g_string_append(out, "{\"kind\": ");
	json_append_string(out, error_kind(error));
	g_string_append_printf(
	    out, ", \"code\": %d, \"text\": ", reply ? reply->code : 0);

	/* The server's text when there was a reply, else our own words */
	if (reply != NULL && reply->code != 0 && reply->text != NULL)
		json_append_string(out, reply->text);
	else
		json_append_string(out, error->message);
	if (reply != NULL && has_text(reply->enhanced)) {
		g_string_append(out, ", \"enhanced\": ");
		json_append_string(out, reply->enhanced);
	}
	g_string_append(out, ", \"stage\": ");
	json_append_string(out, error_stage(error));
	g_string_append_c(out, '}');
}

static void
print_json(const Outcome *o)
{
	g_autoptr(GString) out = g_string_new("{\"file\": ");

	json_append_string(out, o->file);
	g_string_append(out, ", \"status\": ");
	g_string_append(out, o->error ? "\"error\"" : "\"sent\"");
	g_string_append(out, ", \"refused\": ");
	json_append_refused(out, o->refused);
	g_string_append(out, ", \"error\": ");
	json_append_error(out, o->error);
	g_string_append(out, ", \"dropped_options\": [");
	for (guint i = 0; o->dropped != NULL && i < o->dropped->len; i++) {
		if (i > 0)
			g_string_append(out, ", ");
		json_append_string(out, g_ptr_array_index(o->dropped, i));
	}
	g_string_append(out, "]}\n");
	fwrite(out->str, 1, out->len, stdout);
}

/* ------------------------------------------------------------------ */
/* Plain output                                                         */
/* ------------------------------------------------------------------ */

/*
 * Append @s for a terminal: control characters (C0, DEL, C1), bytes
 * that are not UTF-8, the backslash, and the direction and format
 * controls of is_invisible_control() (as \uXXXX) are escaped, so a
 * server cannot move the cursor, hide or reorder text, and each item
 * stays on one line.
 */
static void
plain_append(GString *out, const char *s)
{
	const char *end = s + strlen(s);

	while (s < end) {
		gsize run = safe_run(s, end);
		gunichar c;
		const char *next, *esc;

		if (run > 0) {
			g_string_append_len(out, s, run);
			s += run;
			continue;
		}
		c = g_utf8_get_char_validated(s, end - s);
		if (c == (gunichar)-1 || c == (gunichar)-2) {
			g_string_append_printf(out, "\\x%02x",
			                       (guint)(guchar)*s);
			s++;
			continue;
		}
		next = g_utf8_next_char(s);
		esc = common_escape(c);
		if (esc != NULL)
			g_string_append(out, esc);
		else if (c < 0x20 || (c >= 0x7f && c <= 0x9f))
			g_string_append_printf(out, "\\x%02x", c);
		else if (is_invisible_control(c))
			g_string_append_printf(out, "\\u%04x", c);
		else
			g_string_append_len(out, s, next - s);
		s = next;
	}
}

/* "CODE X.Y.Z TEXT", the enhanced code only when given */
static void
plain_append_reply(GString *out, const SmtpReply *reply)
{
	g_string_append_printf(out, "%d", reply->code);
	if (has_text(reply->enhanced)) {
		g_string_append_c(out, ' ');
		plain_append(out, reply->enhanced);
	}
	if (has_text(reply->text)) {
		g_string_append_c(out, ' ');
		plain_append(out, reply->text);
	}
}

/* One line on stderr: kind, code, enhanced code, stage, then the text */
static void
print_plain_error(const char *file, const GError *error)
{
	g_autoptr(GString) out = g_string_new(NULL);
	const SmtpReply *reply = error_reply(error);
	const char *stage = error_stage(error);

	g_string_append_printf(out, "%s: ", g_get_prgname());
	plain_append(out, file);
	g_string_append_printf(out, ": kind=%s, code=%d", error_kind(error),
	                       reply ? reply->code : 0);
	if (reply != NULL && has_text(reply->enhanced)) {
		g_string_append(out, ", enhanced=");
		plain_append(out, reply->enhanced);
	}
	g_string_append_printf(out, ", stage=%s (", stage ? stage : "none");
	if (reply != NULL && reply->code != 0 && reply->text != NULL)
		plain_append(out, reply->text);
	else
		plain_append(out, error->message);
	g_string_append(out, ")\n");
	fwrite(out->str, 1, out->len, stderr);
}

static void
print_plain(const Outcome *o)
{
	g_autoptr(GString) out = g_string_new(NULL);

	/* The status line, with the server's answer to "." when sent */
	plain_append(out, o->file);
	if (o->error != NULL) {
		g_string_append(out, ": error\n");
	} else {
		g_string_append(out, ": sent (");
		plain_append_reply(out, o->reply);
		g_string_append(out, ")\n");
	}

	for (guint i = 0; o->refused != NULL && i < o->refused->len; i++) {
		const SmtpRefusal *r = g_ptr_array_index(o->refused, i);

		g_string_append(out, "refused <");
		plain_append(out, r->recipient);
		g_string_append(out, ">: ");
		plain_append_reply(out, &r->reply);
		g_string_append_c(out, '\n');
	}
	for (guint i = 0; o->dropped != NULL && i < o->dropped->len; i++) {
		g_string_append(out, "dropped option ");
		plain_append(out, g_ptr_array_index(o->dropped, i));
		g_string_append(out, ": not advertised by the server\n");
	}
	fwrite(out->str, 1, out->len, stdout);

	/* The error line on stderr must not overtake its status line */
	if (o->error != NULL) {
		fflush(stdout);
		print_plain_error(o->file, o->error);
	}
}

/* ------------------------------------------------------------------ */
/* Sending                                                              */
/* ------------------------------------------------------------------ */

/*
 * Messages go to the library in batches of this many, so that the next
 * message's commands can ride behind the end of the one before
 * (smtp_client_send_batch).  A batch keeps its large files open, and at
 * most two batches exist at once (see Loader): 128 descriptors, well
 * inside the usual limit of 1024.
 *
 * XXX: the last message of a batch has no next job to look ahead to,
 * so the first envelope of the next batch costs a round trip of its
 * own: one more per 64 messages.  Avoiding it needs a batch call that
 * takes its jobs as they come (a callback), not an array.
 */
#define BATCH 64

/* Print what happened to @job (loaded from @file), return its status. */
static int
report(const Options *opt, const char *file, const SmtpJob *job,
       const GError *load_error)
{
	Outcome o = {.file = file};

	/* Gather the refusals and dropped options from either side */
	if (job->result != NULL) {
		o.refused = job->result->refused;
		o.dropped = job->result->dropped_options;
		o.reply = &job->result->reply;
	} else {
		o.error = load_error != NULL ? load_error : job->error;
		g_assert(o.error != NULL);
		if (o.error->domain == SMTP_ERROR) {
			o.refused = smtp_error_get_refused(o.error);
			o.dropped = smtp_error_get_dropped_options(o.error);
		}
	}

	if (opt->json)
		print_json(&o);
	else
		print_plain(&o);
	return error_status(o.error);
}

/* ------------------------------------------------------------------ */
/* Loading, one batch ahead                                             */
/* ------------------------------------------------------------------ */

/* The files of one batch, loaded: for each, a message or why not. */
typedef struct {
	const char *const *files; /* the batch's first file */
	gsize n;
	SmtpMessage *msgs[BATCH]; /* NULL where loading failed */
	GError *errors[BATCH];    /* set where it failed */
} Batch;

/*
 * A thread that loads batch k+1 while batch k is on the wire.  Loading
 * is open, fstat, read and close per file; done in line, it would sit
 * between a 354 and the data that answers it while the server idles.
 * Two Batch slots go round between the two threads: the loader takes
 * an empty one, fills it, hands it over; the sender sends it, reports,
 * empties it and gives it back.  So at most two batches are in memory,
 * and the loader is never more than one batch ahead.  Reports stay in
 * file order: the sender takes batches in order and reports each in
 * order.  A file that changes after it was loaded is what it was at
 * load time when small (read into memory), and checked by the library
 * when streamed (a changed size is an INPUT error for that file), as
 * it was when a batch was loaded just before being sent.
 */
typedef struct {
	const char *const *files;
	gsize n_files;
	SmtpMessageKind kind;
	GAsyncQueue *empty;  /* Batch *: for the loader to fill */
	GAsyncQueue *loaded; /* Batch *: for the sender, in order */
	Batch slots[2];
	GThread *thread;
} Loader;

static void
batch_load(Batch *b, const char *const *files, gsize n, SmtpMessageKind kind)
{
	b->files = files;
	b->n = n;
	for (gsize i = 0; i < n; i++)
		b->msgs[i] = load_message(files[i], kind, &b->errors[i]);
}

static void
batch_clear(Batch *b)
{
	for (gsize i = 0; i < b->n; i++) {
		g_clear_pointer(&b->msgs[i], smtp_message_free);
		g_clear_error(&b->errors[i]);
	}
	b->n = 0;
}

static gpointer
loader_run(gpointer data)
{
	Loader *l = data;

	for (gsize done = 0; done < l->n_files; done += BATCH) {
		Batch *b = g_async_queue_pop(l->empty);

		batch_load(b, l->files + done, MIN(BATCH, l->n_files - done),
		           l->kind);
		g_async_queue_push(l->loaded, b);
	}
	return NULL;
}

static void
loader_start(Loader *l, const char *const *files, gsize n_files,
             SmtpMessageKind kind)
{
	*l = (Loader){.files = files, .n_files = n_files, .kind = kind};
	l->empty = g_async_queue_new();
	l->loaded = g_async_queue_new();
	for (guint i = 0; i < G_N_ELEMENTS(l->slots); i++)
		g_async_queue_push(l->empty, &l->slots[i]);
	l->thread = g_thread_new("loader", loader_run, l);
}

/* The next batch, in order; waits for the loader if need be. */
static Batch *
loader_next(Loader *l)
{
	return g_async_queue_pop(l->loaded);
}

/* Give @b back, emptied, for the loader to fill again. */
static void
loader_done(Loader *l, Batch *b)
{
	batch_clear(b);
	g_async_queue_push(l->empty, b);
}

/* After the last batch: the loader has ended, or ends now. */
static void
loader_finish(Loader *l)
{
	g_thread_join(l->thread);
	g_async_queue_unref(l->empty);
	g_async_queue_unref(l->loaded);
}

/* ------------------------------------------------------------------ */
/* Sending                                                              */
/* ------------------------------------------------------------------ */

/*
 * Send the loaded messages of @b over @client as one batch, print what
 * happened to each file, in order, and put its status in @statuses.  A
 * file that could not be loaded is reported in its place and left out.
 */
static void
send_batch(SmtpClient *client, const Options *opt, const SmtpRecipient *rcpts,
           gsize n_rcpts, const char *from, const Batch *b, int *statuses)
{
	SmtpJob jobs[BATCH];
	gsize slot[BATCH], n_jobs = 0;

	/* The loaded files become jobs */
	for (gsize i = 0; i < b->n; i++) {
		if (b->msgs[i] == NULL)
			continue;
		slot[i] = n_jobs;
		jobs[n_jobs++] = (SmtpJob){
		    from,       (const char *const *)opt->mail_options,
		    rcpts,      n_rcpts,
		    b->msgs[i], NULL,
		    NULL};
	}

	smtp_client_send_batch(client, jobs, n_jobs);

	/* Report in file order, then free the outcomes */
	for (gsize i = 0; i < b->n; i++) {
		static const SmtpJob none = {0};
		const SmtpJob *job =
		    b->msgs[i] == NULL ? &none : &jobs[slot[i]];

		statuses[i] = report(opt, b->files[i], job, b->errors[i]);
	}
	fflush(stdout); /* a batch at a time, not a write per message */
	for (gsize j = 0; j < n_jobs; j++) {
		smtp_result_free(jobs[j].result);
		g_clear_error(&jobs[j].error);
	}
}

static int
send_all(const Options *opt, const char *host, guint16 port, guint ms,
         SmtpTlsLevel tls, const char *password)
{
	static const char *const stdin_only[] = {"-", NULL};
	g_autoptr(SmtpClient) client = smtp_client_new(host, port);
	g_autofree char *from = bare_address(opt->from);
	g_auto(GStrv) to = NULL;
	g_autofree SmtpRecipient *rcpts = NULL;
	const char *const *files;
	gboolean any_temporary = FALSE;
	int first_failure = EX_OK;
	guint n = g_strv_length(opt->to);
	gsize n_files;
	Loader loader;

	/* Set up the envelope and the client */
	to = g_new0(char *, n + 1);
	rcpts = g_new0(SmtpRecipient, n);
	for (guint i = 0; i < n; i++) {
		to[i] = bare_address(opt->to[i]);
		rcpts[i].address = to[i];
		rcpts[i].options = (const char *const *)opt->rcpt_options;
	}
	if (opt->helo != NULL)
		smtp_client_set_helo_name(client, opt->helo);
	if (ms != 0) {
		SmtpTimeouts t = {ms, ms, ms, ms};

		smtp_client_set_timeouts(client, &t);
	}
	smtp_client_set_tls(client, tls, opt->ca_file);
	if (password != NULL)
		smtp_client_set_auth(client, opt->auth_user, password,
		                     opt->auth_plaintext);

	/* Every message, in order, whatever happened to the one before */
	files = opt->files && opt->files[0] ? (const char *const *)opt->files
	                                    : stdin_only;
	n_files = g_strv_length((char **)files);
	loader_start(&loader, files, n_files,
	             opt->text ? SMTP_MESSAGE_TEXT : SMTP_MESSAGE_BYTES);
	for (gsize done = 0; done < n_files; done += BATCH) {
		Batch *b = loader_next(&loader);
		int statuses[BATCH];

		send_batch(client, opt, rcpts, n, from, b, statuses);
		for (gsize i = 0; i < b->n; i++) {
			if (statuses[i] == EX_TEMPFAIL)
				any_temporary = TRUE;
			if (statuses[i] != EX_OK && first_failure == EX_OK)
				first_failure = statuses[i];
		}
		loader_done(&loader, b);
	}
	loader_finish(&loader);
	return any_temporary ? EX_TEMPFAIL : first_failure;
}

static void
options_clear(Options *opt)
{
	g_free(opt->server);
	g_free(opt->from);
	g_strfreev(opt->to);
	g_strfreev(opt->mail_options);
	g_strfreev(opt->rcpt_options);
	g_free(opt->helo);
	g_free(opt->timeout);
	g_free(opt->tls);
	g_free(opt->ca_file);
	g_free(opt->auth_user);
	g_free(opt->auth_password_file);
	g_strfreev(opt->files);
}

int
main(int argc, char **argv)
{
	Options opt = {0};
	/* FILENAME types: addresses and options pass as raw bytes, not
	 * converted from the locale, and the library judges them */
	GOptionEntry entries[] = {
	    {"server", 0, 0, G_OPTION_ARG_FILENAME, &opt.server,
	     "Relay to send to (port 25 by default)", "HOST[:PORT]"},
	    {"from", 0, 0, G_OPTION_ARG_FILENAME, &opt.from,
	     "Envelope sender; \"\" or \"<>\" for the null sender", "ADDR"},
	    {"to", 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &opt.to,
	     "Envelope recipient (repeat for more)", "ADDR"},
	    {"mail-option", 0, 0, G_OPTION_ARG_FILENAME_ARRAY,
	     &opt.mail_options, "MAIL FROM parameter, e.g. BODY=8BITMIME",
	     "OPT"},
	    {"rcpt-option", 0, 0, G_OPTION_ARG_FILENAME_ARRAY,
	     &opt.rcpt_options, "RCPT TO parameter, e.g. NOTIFY=NEVER", "OPT"},
	    {"helo", 0, 0, G_OPTION_ARG_FILENAME, &opt.helo,
	     "Name to say in EHLO/HELO", "NAME"},
	    {"timeout", 0, 0, G_OPTION_ARG_STRING, &opt.timeout,
	     "Limit for each stage (default: RFC 5321 values)", "SECONDS"},
	    {"tls", 0, 0, G_OPTION_ARG_STRING, &opt.tls,
	     "none, may, encrypt or verify (default: verify, none on "
	     "loopback)",
	     "LEVEL"},
	    {"ca-file", 0, 0, G_OPTION_ARG_FILENAME, &opt.ca_file,
	     "CA certificates (PEM) for --tls verify (default: system store)",
	     "FILE"},
	    {"auth-user", 0, 0, G_OPTION_ARG_FILENAME, &opt.auth_user,
	     "User name for AUTH (needs --auth-password-file)", "USER"},
	    {"auth-password-file", 0, 0, G_OPTION_ARG_FILENAME,
	     &opt.auth_password_file,
	     "File whose first line is the AUTH password (mode 0600)", "FILE"},
	    {"auth-plaintext", 0, 0, G_OPTION_ARG_NONE, &opt.auth_plaintext,
	     "Allow AUTH on a connection without TLS", NULL},
	    {"text", 0, 0, G_OPTION_ARG_NONE, &opt.text,
	     "Send as text: ASCII, or UTF-8 with SMTPUTF8 or 8BITMIME", NULL},
	    {"json", 0, 0, G_OPTION_ARG_NONE, &opt.json,
	     "Print one JSON object per message", NULL},
	    {G_OPTION_REMAINING, 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &opt.files,
	     NULL, "[FILE]..."},
	    {NULL, 0, 0, 0, NULL, NULL, NULL},
	};
	g_autoptr(GOptionContext) ctx = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *host = NULL;
	char *password = NULL;
	SmtpTlsLevel tls = SMTP_TLS_VERIFY;
	guint16 port = DEFAULT_PORT;
	guint ms = 0;
	int status;

	/* A relay closing early must end in DISCONNECTED, not a signal */
	signal(SIGPIPE, SIG_IGN);
	g_set_prgname("smtp-send");

	/* Parse and check the command line */
	ctx = g_option_context_new(NULL);
	g_option_context_set_summary(ctx, "Send messages through an SMTP relay "
	                                  "and report what it answered.");
	g_option_context_add_main_entries(ctx, entries, NULL);
	g_option_context_set_description(ctx, epilogue);
	if (!g_option_context_parse(ctx, &argc, &argv, &error) ||
	    !check_options(&opt, &error) ||
	    !parse_server(opt.server, &host, &port, &error) ||
	    (opt.timeout != NULL && !parse_timeout(opt.timeout, &ms, &error)) ||
	    !parse_tls(&opt, host, &tls, &error) ||
	    !check_ca_file(opt.ca_file, &error) ||
	    !read_password(&opt, &password, &error)) {
		status = usage_error(error->message);
		options_clear(&opt);
		return status;
	}

	/* Send, then make sure the report reached its reader */
	status = send_all(&opt, host, port, ms, tls, password);
	smtp_password_free(password);
	options_clear(&opt);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		g_printerr("%s: cannot write standard output: %s\n",
		           g_get_prgname(), g_strerror(errno));
		return EX_IOERR;
	}
	return status;
}
