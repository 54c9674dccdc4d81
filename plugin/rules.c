/*
 * rules.c - select the rules that match a message
 *
 * All criteria of a rule must hold (AND); a list criterion (recipient,
 * header) holds when any element matches.  Matching happens once, at
 * end of message, when everything is known.
 *
 * The headers are unfolded and made valid UTF-8 once per message, not
 * once per rule: a message of many large headers meets every rule.  The
 * values hold no CR or LF but in folds (capture.c refuses any other), so
 * an unfolded line is one line and '^' and '$' mean what they say.
 *
 * A regular expression that PCRE gives up on (its backtracking limit,
 * reached by a pattern like "(a+)+$" on a long header a sender chose)
 * is an error, never a miss: taken as a miss it would let a sender
 * steer around a rule, and the message would go without its copy.
 *
 * Known limits: no match on the authenticated user or by domain list
 * yet (DESIGN.md section 2, step 2); a regex on the address covers the
 * domain case meanwhile.  XXX: each match still costs PCRE a UTF-8
 * check of the whole line (GLib 2.74 offers no way to skip it but
 * G_REGEX_RAW), so a message costs rules x header octets; capture.h
 * caps the header octets at 4 MiB.
 */
#include "rules.h"

G_DEFINE_QUARK(am - rules - error - quark, am_rules_error)

/* The headers of one message as rules match them, made when a rule
 * first needs them. */
typedef struct {
	const GPtrArray *headers; /* AmHeader *, or NULL */
	GPtrArray *lines; /* char *: "Name: value", unfolded, UTF-8 valid */
} Prepared;

/*
 * GRegex expects UTF-8 unless compiled raw; mail is not always UTF-8,
 * so anything else is matched in its repaired form.
 */
static char *
utf8_line(char *line)
{
	char *valid;

	if (g_utf8_validate(line, -1, NULL))
		return line;
	valid = g_utf8_make_valid(line, -1);
	g_free(line);
	return valid;
}

static const GPtrArray *
prepared_lines(Prepared *p)
{
	guint i;

	if (p->lines != NULL)
		return p->lines;
	p->lines = g_ptr_array_new_with_free_func(g_free);
	for (i = 0; p->headers != NULL && i < p->headers->len; i++)
		g_ptr_array_add(p->lines, utf8_line(am_header_unfold(
		                              p->headers->pdata[i])));
	return p->lines;
}

static void
prepared_clear(Prepared *p)
{
	g_clear_pointer(&p->lines, g_ptr_array_unref);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(Prepared, prepared_clear)

/*
 * Match @subject (valid UTF-8 unless @re is raw); FALSE with @error
 * when PCRE could not finish.
 */
static gboolean
regex_run(const AmRule *rule, const char *what, const GRegex *re,
          const char *subject, gboolean *matched, GError **error)
{
	g_autoptr(GError) local = NULL;

	*matched = g_regex_match_full(re, subject, -1, 0, 0, NULL, &local);
	if (local == NULL)
		return TRUE;
	g_set_error(error, AM_RULES_ERROR, AM_RULES_ERROR_MATCH,
	            "rule %s: %s cannot be decided: %s", rule->name, what,
	            local->message);
	return FALSE;
}

/* Envelope values are short: validated per match, kept as they are. */
static gboolean
regex_match(const AmRule *rule, const char *what, const GRegex *re,
            const char *subject, gboolean *matched, GError **error)
{
	g_autofree char *valid = NULL;

	if (subject == NULL)
		subject = "";
	if (!(g_regex_get_compile_flags(re) & G_REGEX_RAW) &&
	    !g_utf8_validate(subject, -1, NULL))
		subject = valid = g_utf8_make_valid(subject, -1);
	return regex_run(rule, what, re, subject, matched, error);
}

static gboolean
any_recipient_matches(const AmRule *rule, const AmEnvelope *env,
                      gboolean *matched, GError **error)
{
	guint i;

	*matched = FALSE;
	for (i = 0; i < env->recipients->len && !*matched; i++)
		if (!regex_match(rule, "match_recipient", rule->match_recipient,
		                 env->recipients->pdata[i], matched, error))
			return FALSE;
	return TRUE;
}

/*
 * Headers are matched in their valid UTF-8 form even by a raw regex
 * (conf.c compiles none): invalid octets read as U+FFFD.
 */
static gboolean
any_header_matches(const AmRule *rule, Prepared *p, gboolean *matched,
                   GError **error)
{
	const GPtrArray *lines = prepared_lines(p);
	guint i;

	*matched = FALSE;
	for (i = 0; i < lines->len && !*matched; i++)
		if (!regex_run(rule, "match_header", rule->match_header,
		               lines->pdata[i], matched, error))
			return FALSE;
	return TRUE;
}

static gboolean
rule_matches(const AmRule *rule, const AmEnvelope *env, Prepared *p,
             guint64 size, gboolean *matched, GError **error)
{
	*matched = !(rule->min_size > 0 && size < rule->min_size);
	if (*matched && rule->match_sender != NULL &&
	    !regex_match(rule, "match_sender", rule->match_sender, env->sender,
	                 matched, error))
		return FALSE;
	if (*matched && rule->match_recipient != NULL &&
	    !any_recipient_matches(rule, env, matched, error))
		return FALSE;
	if (*matched && rule->match_client != NULL &&
	    !regex_match(rule, "match_client", rule->match_client,
	                 env->client_addr, matched, error))
		return FALSE;
	if (*matched && rule->match_header != NULL &&
	    !any_header_matches(rule, p, matched, error))
		return FALSE;
	return TRUE;
}

gboolean
am_rule_matches(const AmRule *rule, const AmEnvelope *env,
                const GPtrArray *headers, guint64 size, gboolean *matched,
                GError **error)
{
	g_auto(Prepared) p = {.headers = headers};

	return rule_matches(rule, env, &p, size, matched, error);
}

GPtrArray *
am_rules_select(const AmConfig *config, const AmEnvelope *env,
                const GPtrArray *headers, guint64 size, GError **error)
{
	g_autoptr(GPtrArray) out = g_ptr_array_new();
	g_auto(Prepared) p = {.headers = headers};
	gboolean matched;
	guint i;

	for (i = 0; i < config->rules->len; i++) {
		AmRule *rule = config->rules->pdata[i];

		if (!rule_matches(rule, env, &p, size, &matched, error))
			return NULL;
		if (!matched)
			continue;
		g_ptr_array_add(out, rule);
		if (!config->match_all)
			break;
	}
	return g_steal_pointer(&out);
}
