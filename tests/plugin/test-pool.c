/*
 * test-pool.c - connections kept between copies (AmPool), seen from the
 * fake SMTP server: how many connections it accepted, and which
 * commands it got on them
 */
#include <string.h>

#include "deliver.h"
#include "fakesmtp.h"

typedef struct {
	FakeSmtp *fake;
	AmRelay relay;
} Fixture;

static void
fixture_start(Fixture *f, const char *script)
{
	g_autoptr(GError) error = NULL;

	f->fake = fake_smtp_new(script, &error);
	g_assert_no_error(error);
	f->relay.name = (char *)"test";
	f->relay.host = (char *)"127.0.0.1";
	f->relay.timeouts = (SmtpTimeouts){2000, 2000, 2000, 2000};
	f->relay.port = fake_smtp_start(f->fake, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
}

static AmDelivery *
send_copy(AmPool *pool, const AmRelay *relay, const char *to0)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	const char *to[] = {to0 ? to0 : "journal@archive.example", NULL};
	AmCopyRequest req = {
	    .relay = relay,
	    .from = "",
	    .to = to,
	    .msg = msg,
	};

	smtp_message_append_data(msg, "Subject: t\r\n\r\nbody\r\n", 20);
	return am_deliver(pool, &req);
}

/* How many command lines the server got that start with @verb. */
static guint
count_commands(FakeSmtp *fake, const char *verb)
{
	g_autoptr(GPtrArray) cmds = fake_smtp_get_commands(fake);
	guint i, n = 0;

	for (i = 0; i < cmds->len; i++) {
		if (g_ascii_strncasecmp(cmds->pdata[i], verb, strlen(verb)) ==
		    0)
			n++;
	}
	return n;
}

/* Wait up to @ms for the server to have seen @n commands @verb. */
static gboolean
wait_commands(FakeSmtp *fake, const char *verb, guint n, guint ms)
{
	gint64 end = g_get_monotonic_time() + (gint64)ms * 1000;

	while (count_commands(fake, verb) < n) {
		if (g_get_monotonic_time() > end)
			return FALSE;
		g_usleep(10000);
	}
	return TRUE;
}

static void
assert_sent(AmDelivery *d)
{
	g_assert_nonnull(d);
	g_assert_cmpint(d->outcome, ==, AM_OUTCOME_SENT);
	g_assert_cmpint(d->status, ==, AM_STATUS_SENT);
	am_delivery_free(d);
}

/* Three copies, one connection, three transactions; a connection used
 * moments ago goes without RSET, one idle longer than check_after is
 * checked with RSET first; freeing the pool says QUIT. */
static void
test_reuse(void)
{
	Fixture f = {0};
	AmPool *pool = am_pool_new(4, 10000);

	fixture_start(&f, NULL);
	assert_sent(send_copy(pool, &f.relay, NULL));
	assert_sent(send_copy(pool, &f.relay, NULL));
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 3);
	g_assert_cmpuint(count_commands(f.fake, "EHLO"), ==, 1);
	g_assert_cmpuint(count_commands(f.fake, "RSET"), ==, 0);
	am_pool_set_check_after(pool, 50);
	g_usleep(100000);
	assert_sent(send_copy(pool, &f.relay, NULL));
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_assert_cmpuint(count_commands(f.fake, "RSET"), ==, 1);
	am_pool_set_check_after(pool, 0);
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_assert_cmpuint(count_commands(f.fake, "RSET"), ==, 2);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	g_assert_cmpuint(count_commands(f.fake, "QUIT"), ==, 0);
	am_pool_free(pool);
	g_assert_true(wait_commands(f.fake, "QUIT", 1, 2000));
	fake_smtp_free(f.fake);
}

/* Without a pool every copy has its own connection, closed after. */
static void
test_no_pool(void)
{
	Fixture f = {0};

	fixture_start(&f, NULL);
	assert_sent(send_copy(NULL, &f.relay, NULL));
	assert_sent(send_copy(NULL, &f.relay, NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	g_assert_true(wait_commands(f.fake, "QUIT", 2, 2000));
	fake_smtp_free(f.fake);
}

/* A refused copy leaves a clean connection (the library's RSET), which
 * the next copy uses. */
static void
test_reuse_after_refusal(void)
{
	Fixture f = {0};
	AmPool *pool = am_pool_new(4, 10000);
	AmDelivery *d;

	fixture_start(&f, "on RCPT /refused/ reply 550 5.1.1 no");
	d = send_copy(pool, &f.relay, "refused@archive.example");
	g_assert_cmpint(d->outcome, ==, AM_OUTCOME_ALL_REFUSED);
	am_delivery_free(d);
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 1);
	am_pool_free(pool);
	fake_smtp_free(f.fake);
}

/* A connection the library closed (time-out) is not kept. */
static void
test_no_reuse_after_timeout(void)
{
	Fixture f = {0};
	AmPool *pool = am_pool_new(4, 10000);
	AmDelivery *d;

	fixture_start(&f, "on RCPT /slow/ stall");
	f.relay.timeouts.command_ms = 300;
	d = send_copy(pool, &f.relay, "slow@archive.example");
	g_assert_cmpint(d->outcome, ==, AM_OUTCOME_TIMEOUT);
	am_delivery_free(d);
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	g_assert_cmpuint(count_commands(f.fake, "RSET"), ==, 0);
	am_pool_free(pool);
	fake_smtp_free(f.fake);
}

/*
 * Idle longer than idle_ms: the janitor says QUIT, unasked, even though
 * the copy's deadline (copy_deadline) has passed by then.
 */
static void
test_idle_close(void)
{
	Fixture f = {0};
	AmPool *pool = am_pool_new(4, 600);

	fixture_start(&f, NULL);
	f.relay.copy_deadline_ms = 300;
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_assert_cmpuint(count_commands(f.fake, "QUIT"), ==, 0);
	g_assert_true(wait_commands(f.fake, "QUIT", 1, 3000));
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	g_assert_cmpuint(count_commands(f.fake, "RSET"), ==, 0);
	am_pool_free(pool);
	fake_smtp_free(f.fake);
}

/*
 * The relay closes a pooled connection while it is idle (here: the
 * server restarts on the same port, or answers with 421 or an unasked
 * 421 before MAIL): the copy goes over a new connection, and is sent,
 * whether the connection was checked with RSET (idle longer than
 * check_after: "rset-" cases) or went without, dying at MAIL.
 */
static void
test_dead_replaced(gconstpointer data)
{
	const char *how = data;
	gboolean rset = g_str_has_prefix(how, "rset-");
	g_autoptr(GError) error = NULL;
	Fixture f = {0};
	AmPool *pool = am_pool_new(4, 10000);
	const char *script = NULL;

	if (rset)
		how += strlen("rset-");
	if (strcmp(how, "421") == 0)
		script = rset ? "on RSET#1 reply 421 4.4.2 idle too long"
		              : "on MAIL#2 reply 421 4.4.2 idle too long";
	else if (strcmp(how, "unasked") == 0)
		/* The 421 rides behind the first message's 250. */
		script = "on DOT#1 raw 250 2.0.0 ok\\r\\n421 4.4.2 bye\\r\\n";
	fixture_start(&f, script);
	if (rset)
		am_pool_set_check_after(pool, 0);
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_usleep(50000);
	if (strcmp(how, "restart") == 0) {
		fake_smtp_stop(f.fake);
		g_assert_cmpuint(fake_smtp_start_port(f.fake, "127.0.0.1",
		                                      f.relay.port, NULL,
		                                      &error),
		                 ==, f.relay.port);
	}
	assert_sent(send_copy(pool, &f.relay, NULL));
	/* A raw 250 is not recorded as a message (on each connection's
	 * first DOT): there the new connection shows in its EHLO. */
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==,
	                 strcmp(how, "unasked") == 0 ? 0 : 2);
	g_assert_cmpuint(count_commands(f.fake, "EHLO"), ==, 2);
	/* The MAIL that met the 421 counts; a closed or unasked-for
	 * connection never got one. */
	g_assert_cmpuint(count_commands(f.fake, "MAIL"), ==,
	                 (!rset && strcmp(how, "421") == 0) ? 3 : 2);
	/* A RSET reaches the server only on a live connection. */
	g_assert_cmpuint(count_commands(f.fake, "RSET"), ==,
	                 (rset && strcmp(how, "421") == 0) ? 1 : 0);
	am_pool_free(pool);
	fake_smtp_free(f.fake);
}

/*
 * A batch whose pooled connection went without RSET and turns out dead
 * (the relay restarted while it was idle) at the first copy's
 * envelope: the first copy goes again, once, and every copy of the
 * batch is sent, over one new connection.
 */
static void
test_dead_batch(void)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(GPtrArray) d = NULL;
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	const char *to[] = {"journal@archive.example", NULL};
	AmPool *pool = am_pool_new(4, 10000);
	AmCopyRequest reqs[3];
	Fixture f = {0};

	fixture_start(&f, "ehlo-keywords PIPELINING 8BITMIME SIZE 1000000");
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_usleep(50000);
	fake_smtp_stop(f.fake);
	g_assert_cmpuint(fake_smtp_start_port(f.fake, "127.0.0.1", f.relay.port,
	                                      NULL, &error),
	                 ==, f.relay.port);
	smtp_message_append_data(msg, "Subject: t\r\n\r\nbody\r\n", 20);
	for (guint i = 0; i < 3; i++)
		reqs[i] = (AmCopyRequest){
		    .relay = &f.relay, .from = "", .to = to, .msg = msg};
	d = am_deliver_batch(pool, reqs, 3);
	for (guint i = 0; i < 3; i++) {
		const AmDelivery *x = d->pdata[i];

		g_assert_cmpint(x->status, ==, AM_STATUS_SENT);
		g_assert_null(x->reason);
	}
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 4);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	g_assert_cmpuint(count_commands(f.fake, "EHLO"), ==, 2);
	g_assert_cmpuint(count_commands(f.fake, "RSET"), ==, 0);
	am_pool_free(pool);
	fake_smtp_free(f.fake);
}

/*
 * Any change in what shapes the session (port, TLS level, credentials,
 * HELO name) means another connection: a copy never goes over a
 * session made under an old configuration.
 */
static void
test_keyed_on_settings(void)
{
	Fixture f = {0};
	AmPool *pool = am_pool_new(8, 10000);
	AmRelay pw1, pw2, may, helo;

	fixture_start(&f, "ehlo-keywords 8BITMIME AUTH PLAIN\n"
	                  "on AUTH reply 235 2.7.0 ok\n");
	pw1 = f.relay;
	pw1.auth_user = (char *)"u@example.org";
	pw1.auth_password = (char *)"first";
	pw1.auth_plaintext = TRUE;
	pw2 = pw1;
	pw2.auth_password = (char *)"second";
	may = f.relay;
	may.tls = SMTP_TLS_MAY;
	helo = f.relay;
	helo.helo_name = (char *)"other.example";

	assert_sent(send_copy(pool, &f.relay, NULL));
	assert_sent(send_copy(pool, &pw1, NULL));
	assert_sent(send_copy(pool, &pw2, NULL));
	assert_sent(send_copy(pool, &may, NULL));
	assert_sent(send_copy(pool, &helo, NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 5);
	g_assert_cmpuint(count_commands(f.fake, "AUTH"), ==, 2);

	/* Each of them again: its own connection is still there. */
	assert_sent(send_copy(pool, &helo, NULL));
	assert_sent(send_copy(pool, &pw2, NULL));
	assert_sent(send_copy(pool, &f.relay, NULL));
	assert_sent(send_copy(pool, &pw1, NULL));
	assert_sent(send_copy(pool, &may, NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 5);
	g_assert_cmpuint(count_commands(f.fake, "AUTH"), ==, 2);
	am_pool_free(pool);
	fake_smtp_free(f.fake);
}

typedef struct {
	AmPool *pool;
	const AmRelay *relay;
	AmDelivery *d;
} Job;

static gpointer
job_run(gpointer data)
{
	Job *job = data;

	job->d = send_copy(job->pool, job->relay, NULL);
	return NULL;
}

/* Two copies at once need two connections; with max_idle 1, one goes
 * back to the pool and the other is closed at once. */
static void
test_max_idle(void)
{
	Fixture f = {0};
	AmPool *pool = am_pool_new(1, 10000);
	Job jobs[2];
	GThread *threads[2];
	guint i;

	fixture_start(&f, "on DOT delay 300 250 2.0.0 ok");
	for (i = 0; i < 2; i++) {
		jobs[i] = (Job){pool, &f.relay, NULL};
		threads[i] = g_thread_new("job", job_run, &jobs[i]);
	}
	for (i = 0; i < 2; i++) {
		g_thread_join(threads[i]);
		assert_sent(jobs[i].d);
	}
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	g_assert_true(wait_commands(f.fake, "QUIT", 1, 2000));
	g_usleep(100000);
	g_assert_cmpuint(count_commands(f.fake, "QUIT"), ==, 1);
	assert_sent(send_copy(pool, &f.relay, NULL));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	am_pool_free(pool);
	g_assert_true(wait_commands(f.fake, "QUIT", 2, 2000));
	fake_smtp_free(f.fake);
}

static gpointer
job_run_many(gpointer data)
{
	Job *job = data;
	guint i;

	for (i = 0; i < 10; i++) {
		AmDelivery *d = send_copy(job->pool, job->relay, NULL);

		if (d->outcome != AM_OUTCOME_SENT) {
			job->d = d;
			return NULL;
		}
		am_delivery_free(d);
		g_usleep(g_random_int_range(0, 20000));
	}
	return NULL;
}

/*
 * Eight threads, ten copies each, through one pool whose janitor closes
 * connections after 10 ms idle: every copy sent exactly once, and every
 * connection closed with QUIT in the end (none leaked).
 */
static void
test_concurrent(void)
{
	Fixture f = {0};
	AmPool *pool = am_pool_new(4, 10);
	Job jobs[8];
	GThread *threads[8];
	guint i;

	fixture_start(&f, NULL);
	for (i = 0; i < G_N_ELEMENTS(jobs); i++) {
		jobs[i] = (Job){pool, &f.relay, NULL};
		threads[i] = g_thread_new("job", job_run_many, &jobs[i]);
	}
	for (i = 0; i < G_N_ELEMENTS(jobs); i++) {
		g_thread_join(threads[i]);
		if (jobs[i].d != NULL)
			g_test_message("thread %u: %s", i, jobs[i].d->reason);
		g_assert_null(jobs[i].d);
	}
	am_pool_free(pool);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 80);
	g_test_message("%u connections", fake_smtp_get_connections(f.fake));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), <=, 80);
	g_assert_true(wait_commands(f.fake, "QUIT",
	                            fake_smtp_get_connections(f.fake), 3000));
	fake_smtp_free(f.fake);
}

/*
 * A relay that never answers QUIT, six connections idle in the pool:
 * stopping (am_pool_free) closes them all within the pool's short bound
 * (about 1 s together), not the library's QUIT limit one after another.
 * "janitor": the janitor has begun closing them when the stop comes,
 * and its closing is bounded the same way.
 */
static void
test_free_stalled_quit(gconstpointer data)
{
	gboolean janitor = g_strcmp0(data, "janitor") == 0;
	Fixture f = {0};
	AmPool *pool = am_pool_new(8, janitor ? 300 : 60000);
	Job jobs[6];
	GThread *threads[6];
	gint64 start;
	double took;
	guint i;

	fixture_start(&f, "on DOT delay 300 250 2.0.0 ok\non QUIT stall");
	for (i = 0; i < G_N_ELEMENTS(jobs); i++) {
		jobs[i] = (Job){pool, &f.relay, NULL};
		threads[i] = g_thread_new("job", job_run, &jobs[i]);
	}
	for (i = 0; i < G_N_ELEMENTS(jobs); i++) {
		g_thread_join(threads[i]);
		assert_sent(jobs[i].d); /* frees it */
	}
	g_test_message("%u connections", fake_smtp_get_connections(f.fake));
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), >=, 2);
	if (janitor)
		g_assert_true(wait_commands(f.fake, "QUIT", 1, 3000));
	start = g_get_monotonic_time();
	am_pool_free(pool);
	took = (g_get_monotonic_time() - start) / (double)G_USEC_PER_SEC;
	g_test_message("am_pool_free took %.3f s", took);
	g_assert_cmpfloat(took, <, 2.5);
	fake_smtp_free(f.fake);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/pool/reuse", test_reuse);
	g_test_add_func("/plugin/pool/no-pool", test_no_pool);
	g_test_add_func("/plugin/pool/reuse-after-refusal",
	                test_reuse_after_refusal);
	g_test_add_func("/plugin/pool/no-reuse-after-timeout",
	                test_no_reuse_after_timeout);
	g_test_add_func("/plugin/pool/idle-close", test_idle_close);
	g_test_add_data_func("/plugin/pool/dead/restart", "restart",
	                     test_dead_replaced);
	g_test_add_data_func("/plugin/pool/dead/421", "421",
	                     test_dead_replaced);
	g_test_add_data_func("/plugin/pool/dead/unasked", "unasked",
	                     test_dead_replaced);
	g_test_add_data_func("/plugin/pool/dead/rset-restart", "rset-restart",
	                     test_dead_replaced);
	g_test_add_data_func("/plugin/pool/dead/rset-421", "rset-421",
	                     test_dead_replaced);
	g_test_add_func("/plugin/pool/dead/batch", test_dead_batch);
	g_test_add_func("/plugin/pool/keyed-on-settings",
	                test_keyed_on_settings);
	g_test_add_func("/plugin/pool/max-idle", test_max_idle);
	g_test_add_func("/plugin/pool/concurrent", test_concurrent);
	g_test_add_data_func("/plugin/pool/free-stalled-quit", "free",
	                     test_free_stalled_quit);
	g_test_add_data_func("/plugin/pool/janitor-stalled-quit", "janitor",
	                     test_free_stalled_quit);
	return g_test_run();
}
