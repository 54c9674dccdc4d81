/*
 * test-rules.c - rule matching, one table row per case
 */
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

	g_ptr_array_add(h, &subject);
	g_ptr_array_add(h, &latin);
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

		g_test_message("case: %s", c->name);
		g_assert_cmpint(am_rule_matches(&rule, env, hdrs, 1000), ==,
		                c->expect);
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

	config.rules = g_ptr_array_new();
	g_ptr_array_add(config.rules, &r1);
	g_ptr_array_add(config.rules, &r2);
	g_ptr_array_add(config.rules, &r3);
	got = am_rules_select(&config, env, NULL, 10);
	g_assert_cmpuint(got->len, ==, all ? 2 : 1);
	g_assert_true(got->pdata[0] == &r2);
	if (all)
		g_assert_true(got->pdata[1] == &r3);
	g_ptr_array_unref(config.rules);
	rule_clear(&r1);
	rule_clear(&r2);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/rules/match", test_match_table);
	g_test_add_data_func("/plugin/rules/select/first",
	                     GINT_TO_POINTER(FALSE), test_select);
	g_test_add_data_func("/plugin/rules/select/all", GINT_TO_POINTER(TRUE),
	                     test_select);
	return g_test_run();
}
