/*
 * test-common.c - the fixture the sendmail and pipelining tests share
 * (see test-common.h)
 */
#include "test-common.h"

void
fixture_start(Fixture *f, const char *script, const SmtpTimeouts *t)
{
	g_autoptr(GError) error = NULL;

	f->fake = fake_smtp_new(script, &error);
	g_assert_no_error(error);
	f->port = fake_smtp_start(f->fake, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(f->port, !=, 0);
	f->client = smtp_client_new("127.0.0.1", f->port);
	smtp_client_set_helo_name(f->client, "client.example");
	smtp_client_set_timeouts(f->client, t);
}

void
fixture_tear_down(Fixture *f, gconstpointer data)
{
	(void)data;
	smtp_client_free(f->client);
	fake_smtp_free(f->fake);
}

guint
count_commands(Fixture *f, const char *prefix)
{
	g_autoptr(GPtrArray) cmds = fake_smtp_get_commands(f->fake);
	guint n = 0;

	for (guint i = 0; i < cmds->len; i++) {
		if (g_str_has_prefix(g_ptr_array_index(cmds, i), prefix))
			n++;
	}
	return n;
}

void
add_plain_case(GPtrArray *cases, const char *prefix, const char *path,
               const char *script, FixtureFunc set_up, FixtureFunc func)
{
	CaseHead *head = g_new0(CaseHead, 1);
	g_autofree char *full = g_strconcat(prefix, path, NULL);

	head->name = path;
	head->script = script;
	g_ptr_array_add(cases, head);
	g_test_add(full, Fixture, head, set_up, func, fixture_tear_down);
}
