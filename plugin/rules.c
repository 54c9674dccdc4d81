/*
 * rules.c - select the rules that match a message
 *
 * All criteria of a rule must hold (AND); a list criterion (recipient,
 * header) holds when any element matches.  Matching happens once, at
 * end of message, when everything is known.
 *
 * Known limits: no match on the authenticated user or by domain list
 * yet (DESIGN.md section 2, step 2); a regex on the address covers the
 * domain case meanwhile.
 */
#include "rules.h"

/*
 * GRegex expects UTF-8 unless compiled raw; mail is not always UTF-8,
 * so anything else is matched in its repaired form.
 */
static gboolean
regex_match(const GRegex *re, const char *subject)
{
	g_autofree char *valid = NULL;

	if (subject == NULL)
		subject = "";
	if (!(g_regex_get_compile_flags(re) & G_REGEX_RAW) &&
	    !g_utf8_validate(subject, -1, NULL))
		subject = valid = g_utf8_make_valid(subject, -1);
	return g_regex_match(re, subject, 0, NULL);
}

static gboolean
any_recipient_matches(const GRegex *re, const AmEnvelope *env)
{
	guint i;

	for (i = 0; i < env->recipients->len; i++)
		if (regex_match(re, env->recipients->pdata[i]))
			return TRUE;
	return FALSE;
}

static gboolean
any_header_matches(const GRegex *re, const GPtrArray *headers)
{
	guint i;

	for (i = 0; headers != NULL && i < headers->len; i++) {
		g_autofree char *line = am_header_unfold(headers->pdata[i]);

		if (regex_match(re, line))
			return TRUE;
	}
	return FALSE;
}

gboolean
am_rule_matches(const AmRule *rule, const AmEnvelope *env,
                const GPtrArray *headers, guint64 size)
{
	if (rule->min_size > 0 && size < rule->min_size)
		return FALSE;
	if (rule->match_sender != NULL &&
	    !regex_match(rule->match_sender, env->sender))
		return FALSE;
	if (rule->match_recipient != NULL &&
	    !any_recipient_matches(rule->match_recipient, env))
		return FALSE;
	if (rule->match_client != NULL &&
	    !regex_match(rule->match_client, env->client_addr))
		return FALSE;
	if (rule->match_header != NULL &&
	    !any_header_matches(rule->match_header, headers))
		return FALSE;
	return TRUE;
}

GPtrArray *
am_rules_select(const AmConfig *config, const AmEnvelope *env,
                const GPtrArray *headers, guint64 size)
{
	GPtrArray *out = g_ptr_array_new();
	guint i;

	for (i = 0; i < config->rules->len; i++) {
		AmRule *rule = config->rules->pdata[i];

		if (!am_rule_matches(rule, env, headers, size))
			continue;
		g_ptr_array_add(out, rule);
		if (!config->match_all)
			break;
	}
	return out;
}
