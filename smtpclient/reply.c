/*
 * reply.c - the SMTP reply parser
 *
 * Incremental: bytes go in as they arrive, cut anywhere, and a reply
 * comes out when its last line is complete, so a reply split across
 * reads (or several replies in one read, as PIPELINING will bring) is
 * handled in one place.  RFC 5321 section 4.2: "CODE-text" lines go on,
 * "CODE text" or a bare "CODE" ends the reply; every line must carry
 * the same code, except a 421, which replaces the reply it cuts.  Lines
 * ending in a bare LF are accepted (some servers send them; refusing
 * them gains nothing on the reply side).
 *
 * Enhanced status codes (RFC 3463, RFC 2034) are taken from the first
 * line only when their class matches the reply's first digit: a "250
 * 5.1.1 ok" is text, not a permanent failure.  The same code at the
 * start of later lines is removed so the text reads cleanly.
 *
 * Anything else is SMTP_ERROR_PROTOCOL: a line over
 * SMTP_REPLY_MAX_LINE octets, more than SMTP_REPLY_MAX_LINES lines, a
 * NUL, a code outside 200-559.  The text is made valid UTF-8 (invalid
 * octets become U+FFFD) because it ends up in logs and JSON.
 */
#include <string.h>

#include "smtp-private.h"

struct SmtpReplyParser {
	GString *line;  /* the line being read, without its EOL */
	GString *text;  /* text of the lines so far */
	int code;       /* code of the first line; 0 before it */
	char *enhanced; /* from the first line, or NULL */
	guint lines;    /* complete lines so far */
	SmtpParseStatus status;
};

SmtpReplyParser *
smtp_reply_parser_new(void)
{
	SmtpReplyParser *p = g_new0(SmtpReplyParser, 1);

	p->line = g_string_sized_new(128);
	p->text = g_string_sized_new(128);
	p->status = SMTP_PARSE_MORE;
	return p;
}

void
smtp_reply_parser_free(SmtpReplyParser *parser)
{
	if (parser == NULL)
		return;
	g_string_free(parser->line, TRUE);
	g_string_free(parser->text, TRUE);
	g_free(parser->enhanced);
	g_free(parser);
}

static void
parser_reset(SmtpReplyParser *p)
{
	g_string_truncate(p->line, 0);
	g_string_truncate(p->text, 0);
	g_clear_pointer(&p->enhanced, g_free);
	p->code = 0;
	p->lines = 0;
	p->status = SMTP_PARSE_MORE;
}

/* Length of 1 to 3 digits at @s (bounded by @end), or 0. */
static gsize
digits(const char *s, const char *end)
{
	gsize n = 0;

	while (s + n < end && n < 4 && g_ascii_isdigit(s[n]))
		n++;
	return n >= 1 && n <= 3 ? n : 0;
}

/*
 * Length of an enhanced status code "C.SSS.DDD" opening @s, followed by
 * a space or the end, whose class C is @class; 0 when there is none.
 */
static gsize
enhanced_len(const char *s, gsize len, char class)
{
	const char *end = s + len, *q = s;
	gsize n;

	if (len < 5 || q[0] != class || q[1] != '.')
		return 0;
	q += 2;
	if ((n = digits(q, end)) == 0 || q + n >= end || q[n] != '.')
		return 0;
	q += n + 1;
	if ((n = digits(q, end)) == 0)
		return 0;
	q += n;
	if (q < end && *q != ' ')
		return 0;
	return q - s;
}

static SmtpParseStatus
parse_fail(SmtpReplyParser *p, GError **error, const char *why)
{
	p->status = SMTP_PARSE_ERROR;
	smtp_set_error(error, SMTP_ERROR_PROTOCOL, "reply", NULL,
	               "malformed reply from server: %s", why);
	return p->status;
}

/* One complete line (EOL removed): add it, say whether it was last. */
static SmtpParseStatus
parse_line(SmtpReplyParser *p, const char *l, gsize len, GError **error)
{
	const char *rest;
	gsize rest_len, elen;
	gboolean last;
	int code;

	/* Step 1: "DDD", then " ", "-" or nothing. */
	if (len < 3 || !g_ascii_isdigit(l[0]) || !g_ascii_isdigit(l[1]) ||
	    !g_ascii_isdigit(l[2]))
		return parse_fail(p, error, "no reply code");
	if (l[0] < '2' || l[0] > '5' || l[1] > '5')
		return parse_fail(p, error, "reply code out of range");
	if (len > 3 && l[3] != ' ' && l[3] != '-')
		return parse_fail(p, error, "bad character after code");
	if (memchr(l, '\0', len) != NULL)
		return parse_fail(p, error, "NUL in reply");
	code = (l[0] - '0') * 100 + (l[1] - '0') * 10 + (l[2] - '0');
	last = len == 3 || l[3] == ' ';
	rest = len > 3 ? l + 4 : l + 3;
	rest_len = len > 3 ? len - 4 : 0;

	/* Step 2: every line of one reply carries the same code, but a
	 * server shutting down may cut a reply short with 421 (RFC 5321
	 * section 3.8): that is a new reply, the only one that counts,
	 * so the caller sees the 421 and closes, instead of a protocol
	 * error that would read as a permanent failure. */
	if (p->lines > 0 && code != p->code && code == 421) {
		g_string_truncate(p->text, 0);
		g_clear_pointer(&p->enhanced, g_free);
		p->lines = 0;
	}
	if (p->lines > 0 && code != p->code)
		return parse_fail(p, error, "code changes within a reply");
	if (++p->lines > SMTP_REPLY_MAX_LINES)
		return parse_fail(p, error, "too many lines");
	p->code = code;

	/* Step 3: an enhanced code of the same class, RFC 3463. */
	elen = enhanced_len(rest, rest_len, l[0]);
	if (p->lines == 1 && elen > 0) {
		p->enhanced = g_strndup(rest, elen);
	} else if (elen == 0 || p->enhanced == NULL ||
	           strlen(p->enhanced) != elen ||
	           memcmp(p->enhanced, rest, elen) != 0) {
		elen = 0;
	}
	if (elen > 0) {
		rest += elen;
		rest_len -= elen;
		if (rest_len > 0) {
			rest++;
			rest_len--;
		}
	}

	/* Step 4: the text, lines joined by "\n". */
	if (p->lines > 1)
		g_string_append_c(p->text, '\n');
	g_string_append_len(p->text, rest, rest_len);
	if (last)
		p->status = SMTP_PARSE_DONE;
	return p->status;
}

SmtpParseStatus
smtp_reply_parser_feed(SmtpReplyParser *parser, const char *data, gsize len,
                       gsize *consumed, GError **error)
{
	gsize used = 0;

	if (parser->status == SMTP_PARSE_DONE)
		parser_reset(parser);
	while (parser->status == SMTP_PARSE_MORE && used < len) {
		const char *nl = memchr(data + used, '\n', len - used);
		gsize take = nl ? (gsize)(nl - (data + used)) : len - used;

		/* Count a CR the line ends with against the limit only
		 * once the LF shows it is the line end. */
		if (parser->line->len + take > SMTP_REPLY_MAX_LINE + 1) {
			parse_fail(parser, error, "line too long");
			break;
		}
		g_string_append_len(parser->line, data + used, take);
		used += take;
		if (nl == NULL)
			break;
		used++;
		if (parser->line->len > 0 &&
		    parser->line->str[parser->line->len - 1] == '\r')
			g_string_truncate(parser->line, parser->line->len - 1);
		if (parser->line->len > SMTP_REPLY_MAX_LINE) {
			parse_fail(parser, error, "line too long");
			break;
		}
		parse_line(parser, parser->line->str, parser->line->len, error);
		g_string_truncate(parser->line, 0);
	}
	if (consumed != NULL)
		*consumed = used;
	return parser->status;
}

void
smtp_reply_parser_take(SmtpReplyParser *parser, SmtpReply *reply)
{
	g_return_if_fail(parser->status == SMTP_PARSE_DONE);

	reply->code = parser->code;
	reply->enhanced = g_steal_pointer(&parser->enhanced);
	reply->text = g_utf8_make_valid(parser->text->str, parser->text->len);
	parser_reset(parser);
}
