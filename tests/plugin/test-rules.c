/*
 * test-rules.c - rule matching, one table row per case
 */
#include <string.h>

#include "rules.h"

typedef struct {
	const char *name;
	const char *sender_re;
	const char *recipient_re;
	const char *client_re;
	const char *header_re;
	guint64 min_size;
	gboolean expect;
} RuleCase;

/* The message all cases look at. */
static AmEnvelope *
envelope(void)
{
	AmEnvelope *env = am_envelope_new();

	env->sender = g_strdup("alice@finance.example");
	env->client_addr = g_strdup("192.0.2.7");
	g_ptr_array_add(env->recipients, g_strdup("bob@other.example"));
	g_ptr_array_add(env->recipients, g_strdup("hidden@bcc.example"));
	return env;
}

static GPtrArray *
headers(void)
{
	GPtrArray *h = g_ptr_array_new();
	static AmHeader subject = {"Subject", (char *)" Quarterly\n report"};
	static AmHeader latin = {"X-Latin", (char *)" caf\xe9"};
	static AmHeader folded = {"X-Folded", (char *)" x\r\n X-Inner: y"};
	static AmHeader ctl = {"X-Ctl", (char *)" a\vb"};

	g_ptr_array_add(h, &subject);
	g_ptr_array_add(h, &latin);
	g_ptr_array_add(h, &folded);
	g_ptr_array_add(h, &ctl);
	return h;
}

static GRegex *
re(const char *pattern)
{
	return pattern ? g_regex_new(pattern, G_REGEX_CASELESS, 0, NULL) : NULL;
}

static void
rule_clear(AmRule *rule)
{
	g_clear_pointer(&rule->match_sender, g_regex_unref);
	g_clear_pointer(&rule->match_recipient, g_regex_unref);
	g_clear_pointer(&rule->match_client, g_regex_unref);
	g_clear_pointer(&rule->match_header, g_regex_unref);
}

static const RuleCase cases[] = {
    {"no criteria", NULL, NULL, NULL, NULL, 0, TRUE},
    {"sender domain", "@finance\\.example$", NULL, NULL, NULL, 0, TRUE},
    {"sender caseless", "^ALICE@", NULL, NULL, NULL, 0, TRUE},
    {"sender no", "@sales\\.", NULL, NULL, NULL, 0, FALSE},
    {"bcc recipient", NULL, "@bcc\\.example$", NULL, NULL, 0, TRUE},
    {"recipient no", NULL, "@nowhere$", NULL, NULL, 0, FALSE},
    {"client", NULL, NULL, "^192\\.0\\.2\\.", NULL, 0, TRUE},
    {"client no", NULL, NULL, "^10\\.", NULL, 0, FALSE},
    {"header unfolded", NULL, NULL, NULL, "^Subject: Quarterly report$", 0,
     TRUE},
    {"header 8-bit", NULL, NULL, NULL, "^X-Latin: caf", 0, TRUE},
    {"header no", NULL, NULL, NULL, "^X-Missing:", 0, FALSE},
    {"size at least", NULL, NULL, NULL, NULL, 1000, TRUE},
    {"size too small", NULL, NULL, NULL, NULL, 1001, FALSE},
    {"all of them", "alice", "bob", "192", "Subject", 10, TRUE},
    {"one fails", "alice", "bob", "10\\.", "Subject", 10, FALSE},
};

static void
test_match_table(void)
{
	g_autoptr(AmEnvelope) env = envelope();
	g_autoptr(GPtrArray) hdrs = headers();
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		const RuleCase *c = &cases[i];
		AmRule rule = {
		    .name = (char *)c->name,
		    .match_sender = re(c->sender_re),
		    .match_recipient = re(c->recipient_re),
		    .match_client = re(c->client_re),
		    .match_header = re(c->header_re),
		    .min_size = c->min_size,
		};

		g_autoptr(GError) error = NULL;
		gboolean matched = !c->expect;

		g_test_message("case: %s", c->name);
		g_assert_true(
		    am_rule_matches(&rule, env, hdrs, 1000, &matched, &error));
		g_assert_no_error(error);
		g_assert_cmpint(matched, ==, c->expect);
		rule_clear(&rule);
	}
}

/* First match wins, unless match = all. */
static void
test_select(gconstpointer data)
{
	gboolean all = GPOINTER_TO_INT(data);
	g_autoptr(AmEnvelope) env = envelope();
	AmRule r1 = {.name = (char *)"no", .match_sender = re("^nobody@")};
	AmRule r2 = {.name = (char *)"finance", .match_sender = re("finance")};
	AmRule r3 = {.name = (char *)"everything"};
	AmConfig config = {.match_all = all};
	g_autoptr(GPtrArray) got = NULL;
	g_autoptr(GError) error = NULL;

	config.rules = g_ptr_array_new();
	g_ptr_array_add(config.rules, &r1);
	g_ptr_array_add(config.rules, &r2);
	g_ptr_array_add(config.rules, &r3);
	got = am_rules_select(&config, env, NULL, 10, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->len, ==, all ? 2 : 1);
	g_assert_true(got->pdata[0] == &r2);
	if (all)
		g_assert_true(got->pdata[1] == &r3);
	g_ptr_array_unref(config.rules);
	rule_clear(&r1);
	rule_clear(&r2);
}

/*
 * A pattern PCRE gives up on ("(a+)+$" on a long run of 'a' not at the
 * end) is an error naming the rule and the criterion, for each
 * criterion, never a quiet miss that would skip the copy.
 */
static void
test_match_limit(void)
{
	g_autofree char *run = g_strnfill(40, 'a');
	g_autofree char *long_addr = g_strconcat(run, "!@x.example", NULL);
	g_autofree char *hvalue = g_strconcat(" ", run, "!", NULL);
	AmHeader header = {(char *)"Subject", hvalue};
	g_autoptr(GPtrArray) hdrs = g_ptr_array_new();
	g_autoptr(AmEnvelope) env = am_envelope_new();
	static const char *const what[] = {"match_sender", "match_recipient",
	                                   "match_client", "match_header"};
	gsize i;

	env->sender = g_strdup(long_addr);
	env->client_addr = g_strconcat(run, "!", NULL);
	g_ptr_array_add(env->recipients, g_strdup(long_addr));
	g_ptr_array_add(hdrs, &header);
	for (i = 0; i < G_N_ELEMENTS(what); i++) {
		AmRule rule = {.name = (char *)"evil"};
		AmRule plain = {.name = (char *)"plain"};
		AmConfig config = {.match_all = FALSE};
		GRegex **slot[] = {&rule.match_sender, &rule.match_recipient,
		                   &rule.match_client, &rule.match_header};
		g_autoptr(GError) error = NULL;
		g_autoptr(GPtrArray) got = NULL;
		gboolean matched = TRUE;

		*slot[i] = re("(a+)+$");
		g_assert_false(
		    am_rule_matches(&rule, env, hdrs, 10, &matched, &error));
		g_assert_error(error, AM_RULES_ERROR, AM_RULES_ERROR_MATCH);
		g_assert_nonnull(strstr(error->message, "rule evil"));
		g_assert_nonnull(strstr(error->message, what[i]));
		g_clear_error(&error);

		/* The selection stops there: no later rule stands in. */
		config.rules = g_ptr_array_new();
		g_ptr_array_add(config.rules, &rule);
		g_ptr_array_add(config.rules, &plain);
		got = am_rules_select(&config, env, hdrs, 10, &error);
		g_assert_null(got);
		g_assert_error(error, AM_RULES_ERROR, AM_RULES_ERROR_MATCH);
		g_ptr_array_unref(config.rules);
		rule_clear(&rule);
	}
}

/* Seconds for one am_rules_select, the best of three. */
static double
select_seconds(const AmConfig *config, const AmEnvelope *env,
               const GPtrArray *hdrs)
{
	double best = G_MAXDOUBLE;
	int i;

	for (i = 0; i < 3; i++) {
		g_autoptr(GError) error = NULL;
		gint64 t0 = g_get_monotonic_time();
		g_autoptr(GPtrArray) got =
		    am_rules_select(config, env, hdrs, 10, &error);

		g_assert_no_error(error);
		g_assert_cmpuint(got->len, ==, 0);
		best = MIN(best, (g_get_monotonic_time() - t0) / 1e6);
	}
	return best;
}

/*
 * Headers are unfolded once per message, not once per rule: 100 header
 * rules over 2 MB of folded headers cost far less than 100 times one
 * rule (a ratio, so the speed of the machine does not matter; before,
 * it was about 100).
 */
static void
test_unfold_once(void)
{
	g_autoptr(AmEnvelope) env = envelope();
	g_autoptr(GPtrArray) hdrs = g_ptr_array_new();
	g_autoptr(GPtrArray) values = g_ptr_array_new_with_free_func(g_free);
	AmHeader h[10];
	AmRule rules[100];
	AmConfig one = {.match_all = TRUE};
	AmConfig many = {.match_all = TRUE};
	/* Raw: PCRE's own UTF-8 check of each subject, linear in its
	 * length, would hide the cost measured here, which is ours. */
	g_autoptr(GRegex) raw = g_regex_new("^X-Never:", G_REGEX_RAW, 0, NULL);
	double t1, t100;
	guint i;

	for (i = 0; i < G_N_ELEMENTS(h); i++) {
		GString *v = g_string_new(NULL);

		while (v->len < 200000)
			g_string_append(v, " word word word word\n");
		g_string_append(v, " end");
		h[i].name = (char *)"X-Big";
		h[i].value = g_string_free(v, FALSE);
		g_ptr_array_add(values, h[i].value);
		g_ptr_array_add(hdrs, &h[i]);
	}
	one.rules = g_ptr_array_new();
	many.rules = g_ptr_array_new();
	for (i = 0; i < G_N_ELEMENTS(rules); i++) {
		rules[i] = (AmRule){.name = (char *)"r", .match_header = raw};
		g_ptr_array_add(many.rules, &rules[i]);
	}
	g_ptr_array_add(one.rules, &rules[0]);

	t1 = select_seconds(&one, env, hdrs);
	t100 = select_seconds(&many, env, hdrs);
	g_test_message("1 rule: %.4f s, 100 rules: %.4f s", t1, t100);
	g_assert_cmpfloat(t100, <, 10 * t1 + 0.01);

	g_ptr_array_unref(one.rules);
	g_ptr_array_unref(many.rules);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/rules/match", test_match_table);
	g_test_add_func("/plugin/rules/match-limit", test_match_limit);
	g_test_add_func("/plugin/rules/unfold-once", test_unfold_once);
	g_test_add_data_func("/plugin/rules/select/first",
	                     GINT_TO_POINTER(FALSE), test_select);
	g_test_add_data_func("/plugin/rules/select/all", GINT_TO_POINTER(TRUE),
	                     test_select);
	return g_test_run();
}
