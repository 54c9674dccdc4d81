/*
 * test-batch.c - smtp_client_send_batch(): several messages, the next
 * one's commands behind the previous end marker (RFC 2920 section 3.1),
 * and every job's outcome exactly what sending it alone gives
 *
 * Each failure case runs the same three jobs twice against the same
 * script on fresh fake servers: once as a batch, once job by job with
 * smtp_client_send().  Both must end the same for every job (code,
 * stage, reply, refusals), and as the case expects, so a failure is
 * never pinned on the wrong message.  That the commands really ride
 * behind the end marker is seen in the client's own writes: the binary
 * is linked with send() wrapped (-Wl,--wrap=send).
 */
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "test-common.h"

#define PIPE_KEYWORDS "ehlo-keywords PIPELINING 8BITMIME SIZE 1000000\n"

/* ------------------------------------------------------------------ */
/* The client's writes                                                  */
/* ------------------------------------------------------------------ */

ssize_t __real_send(int fd, const void *buf, size_t len, int flags);
ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags);

static GMutex writes_lock;
static GPtrArray *writes; /* GBytes: every send() of the client */
static gboolean recording;

ssize_t
__wrap_send(int fd, const void *buf, size_t len, int flags)
{
	ssize_t n = __real_send(fd, buf, len, flags);

	g_mutex_lock(&writes_lock);
	if (n > 0 && recording)
		g_ptr_array_add(writes, g_bytes_new(buf, n));
	g_mutex_unlock(&writes_lock);
	return n;
}

/* How many writes contain @needle, and whether any holds both. */
static guint
writes_with(const char *needle, const char *and_also)
{
	guint n = 0;

	g_mutex_lock(&writes_lock);
	for (guint i = 0; i < writes->len; i++) {
		gsize len;
		const char *p = g_bytes_get_data(writes->pdata[i], &len);

		if (g_strstr_len(p, len, needle) == NULL)
			continue;
		if (and_also == NULL || g_strstr_len(p, len, and_also) != NULL)
			n++;
	}
	g_mutex_unlock(&writes_lock);
	return n;
}

/* Start recording afresh (@on), or stop and keep what was recorded. */
static void
writes_reset(gboolean on)
{
	g_mutex_lock(&writes_lock);
	if (on)
		g_ptr_array_set_size(writes, 0);
	recording = on;
	g_mutex_unlock(&writes_lock);
}

/* ------------------------------------------------------------------ */
/* Jobs                                                                 */
/* ------------------------------------------------------------------ */

/* Three jobs: from first@/second@/third@ to a1@/a2@/a3@, bodies
 * "one", "two", "three", so that scripts can pick any of them. */
static const char *const froms[] = {"first@example.org", "second@example.org",
                                    "third@example.org"};
static const char *const bodies[] = {"one\r\n", "two\r\n", "three\r\n"};
static const SmtpRecipient rcpts[] = {
    {"a1@x.example", NULL}, {"a2@x.example", NULL}, {"a3@x.example", NULL}};

static void
jobs_init(SmtpJob *jobs, guint n)
{
	for (guint i = 0; i < n; i++) {
		jobs[i] =
		    (SmtpJob){froms[i], NULL, &rcpts[i], 1, NULL, NULL, NULL};
		jobs[i].msg = smtp_message_new(SMTP_MESSAGE_BYTES);
		smtp_message_append_data(jobs[i].msg, bodies[i],
		                         strlen(bodies[i]));
	}
}

static void
jobs_clear(SmtpJob *jobs, guint n)
{
	for (guint i = 0; i < n; i++) {
		smtp_message_free(jobs[i].msg);
		smtp_result_free(jobs[i].result);
		g_clear_error(&jobs[i].error);
	}
}

/* The outcome of one job, comparable. */
typedef struct {
	int code; /* SmtpErrorCode, or -1: sent */
	const char *stage;
	int reply; /* final reply when sent, the error's otherwise */
	guint refused;
} Outcome;

static Outcome
outcome_of(const SmtpJob *job)
{
	Outcome o = {-1, NULL, 0, 0};

	g_assert_true((job->result == NULL) != (job->error == NULL));
	if (job->result != NULL) {
		o.reply = job->result->reply.code;
		o.refused = job->result->refused->len;
		return o;
	}
	o.code = job->error->code;
	o.stage = smtp_error_get_stage(job->error);
	o.reply = smtp_error_get_reply(job->error)->code;
	if (smtp_error_get_refused(job->error) != NULL)
		o.refused = smtp_error_get_refused(job->error)->len;
	return o;
}

static void
assert_same(const Outcome *a, const Outcome *b)
{
	g_assert_cmpint(a->code, ==, b->code);
	g_assert_cmpstr(a->stage, ==, b->stage);
	g_assert_cmpint(a->reply, ==, b->reply);
	g_assert_cmpuint(a->refused, ==, b->refused);
}

static const SmtpTimeouts limits = {5000, 2000, 5000, 500};

/* Run @jobs against a fresh server for @script, as a batch or one by
 * one; *@msgs and *@conns: what the server saw. */
static void
run_jobs(const char *script, SmtpJob *jobs, guint n, gboolean batch,
         guint *msgs, guint *conns, guint *rsets)
{
	Fixture f;

	fixture_start(&f, script, &limits);
	if (batch) {
		smtp_client_send_batch(f.client, jobs, n);
	} else {
		for (guint i = 0; i < n; i++)
			jobs[i].result = smtp_client_send(
			    f.client, jobs[i].from, jobs[i].mail_options,
			    jobs[i].rcpts, jobs[i].n_rcpts, jobs[i].msg,
			    &jobs[i].error);
	}
	smtp_client_quit(f.client);
	*msgs = fake_smtp_get_message_count(f.fake);
	*conns = fake_smtp_get_connections(f.fake);
	*rsets = count_commands(&f, "RSET");
	fixture_tear_down(&f, NULL);
}

/* ------------------------------------------------------------------ */
/* Every message sent                                                   */
/* ------------------------------------------------------------------ */

static void
test_all_sent(void)
{
	Fixture f;
	SmtpJob jobs[3];

	jobs_init(jobs, 3);
	fixture_start(&f, PIPE_KEYWORDS, &limits);
	g_assert_true(smtp_client_connect(f.client, NULL));
	writes_reset(TRUE);
	smtp_client_send_batch(f.client, jobs, 3);
	writes_reset(FALSE);
	for (guint i = 0; i < 3; i++) {
		const FakeSmtpMessage *m;

		g_assert_no_error(jobs[i].error);
		g_assert_cmpint(jobs[i].result->reply.code, ==, 250);
		g_assert_true(fake_smtp_wait_messages(f.fake, i + 1, 2000));
		m = fake_smtp_get_message(f.fake, i);
		g_assert_true(g_str_has_prefix(m->mail_from + 6, froms[i]));
		g_assert_cmpmem(g_bytes_get_data(m->content, NULL),
		                g_bytes_get_size(m->content), bodies[i],
		                strlen(bodies[i]));
	}
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	g_assert_cmpuint(count_commands(&f, "RSET"), ==, 0);
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, 3);
}

/* The writes: each next MAIL rides behind the previous end marker,
 * none behind the last; the first envelope goes out on its own. */
static void
test_writes(void)
{
	Fixture f;
	SmtpJob jobs[3];

	jobs_init(jobs, 3);
	fixture_start(&f, PIPE_KEYWORDS, &limits);
	g_assert_true(smtp_client_connect(f.client, NULL));
	writes_reset(TRUE);
	smtp_client_send_batch(f.client, jobs, 3);
	writes_reset(FALSE);
	jobs_clear(jobs, 3);

	/* One write per job plus the first envelope. */
	g_assert_cmpuint(writes_with("MAIL FROM:<first@", NULL), ==, 1);
	g_assert_cmpuint(
	    writes_with("one\r\n.\r\nMAIL FROM:<second@example.org> SIZE=5\r\n"
	                "RCPT TO:<a2@x.example>\r\nDATA\r\n",
	                NULL),
	    ==, 1);
	g_assert_cmpuint(writes_with("two\r\n.\r\nMAIL FROM:<third@", NULL), ==,
	                 1);
	g_assert_cmpuint(writes_with("three\r\n.\r\n", "MAIL"), ==, 0);
	g_assert_cmpuint(writes_with("three\r\n.\r\n", NULL), ==, 1);
	fixture_tear_down(&f, NULL);
}

/* Without PIPELINING, one command at a time, no look-ahead. */
static void
test_no_pipelining(void)
{
	Fixture f;
	SmtpJob jobs[3];

	jobs_init(jobs, 3);
	fixture_start(&f, "ehlo-keywords 8BITMIME SIZE 1000000\n", &limits);
	writes_reset(TRUE);
	smtp_client_send_batch(f.client, jobs, 3);
	writes_reset(FALSE);
	for (guint i = 0; i < 3; i++)
		g_assert_nonnull(jobs[i].result);
	g_assert_cmpuint(writes_with(".\r\n", "MAIL"), ==, 0);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 3);
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, 3);
}

/* A job with more recipients than one group holds starts on its own. */
static void
test_many_recipients(void)
{
	Fixture f;
	SmtpJob jobs[3];
	SmtpRecipient many[150];
	g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);

	for (guint i = 0; i < G_N_ELEMENTS(many); i++) {
		g_ptr_array_add(names, g_strdup_printf("r%u@x.example", i));
		many[i] = (SmtpRecipient){names->pdata[i], NULL};
	}
	jobs_init(jobs, 3);
	jobs[1].rcpts = many;
	jobs[1].n_rcpts = G_N_ELEMENTS(many);
	fixture_start(&f, PIPE_KEYWORDS, &limits);
	writes_reset(TRUE);
	smtp_client_send_batch(f.client, jobs, 3);
	writes_reset(FALSE);
	for (guint i = 0; i < 3; i++)
		g_assert_nonnull(jobs[i].result);
	g_assert_cmpuint(writes_with("one\r\n.\r\n", "MAIL"), ==, 0);
	g_assert_cmpuint(writes_with("two\r\n.\r\nMAIL FROM:<third@", NULL), ==,
	                 1);
	g_assert_cmpuint(fake_smtp_get_message(f.fake, 1)->rcpt_to->len, ==,
	                 150);
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, 3);
}

static void
test_empty(void)
{
	Fixture f;

	fixture_start(&f, PIPE_KEYWORDS, &limits);
	smtp_client_send_batch(f.client, NULL, 0);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 0);
	fixture_tear_down(&f, NULL);
}

/* ------------------------------------------------------------------ */
/* Failures: each pinned on its own job, as when sent one by one        */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *name;
	const char *script; /* after PIPE_KEYWORDS */
	int codes[3];       /* per job; -1: sent */
	const char *stages[3];
	guint messages; /* the server recorded */
	guint connections;
	int rsets; /* in the batch run; -1: do not check */
} FailCase;

static const FailCase fail_cases[] = {
    {"rcpt-refused-2nd",
     "on RCPT /a2@/ reply 550 5.1.1 no such user",
     {-1, SMTP_ERROR_RECIPIENTS_REFUSED, -1},
     {NULL, "rcpt", NULL},
     2,
     1,
     1},
    {"sender-refused-2nd",
     "on MAIL /second@/ reply 553 5.7.1 not you",
     {-1, SMTP_ERROR_SENDER_REFUSED, -1},
     {NULL, "mail", NULL},
     2,
     1,
     1},
    {"data-refused-2nd",
     "on DATA #2 reply 554 5.5.1 no data",
     {-1, SMTP_ERROR_DATA, -1},
     {NULL, "data", NULL},
     2,
     1,
     1},
    /* The next job's commands are on their way: no RSET between. */
    {"dot-refused-1st",
     "on DOT /one/ reply 554 5.6.0 rejected",
     {SMTP_ERROR_DATA, -1, -1},
     {"end-of-data", NULL, NULL},
     2,
     1,
     0},
    {"dot-refused-last",
     "on DOT /three/ reply 554 5.6.0 rejected",
     {-1, -1, SMTP_ERROR_DATA},
     {NULL, NULL, "end-of-data"},
     2,
     1,
     1},
    /* The connection dies with the next job's commands on it: that
     * job starts over on a new connection. */
    {"dot-421-1st",
     "on DOT /one/ reply 421 4.3.2 bye",
     {SMTP_ERROR_DISCONNECTED, -1, -1},
     {"end-of-data", NULL, NULL},
     2,
     2,
     -1},
    {"dot-close-1st",
     "on DOT /one/ close",
     {SMTP_ERROR_DISCONNECTED, -1, -1},
     {"end-of-data", NULL, NULL},
     2,
     2,
     -1},
    {"dot-stall-1st",
     "on DOT /one/ stall",
     {SMTP_ERROR_TIMEOUT, -1, -1},
     {"end-of-data", NULL, NULL},
     2,
     2,
     -1},
    /* The first job was answered before the connection died on the
     * second's MAIL: it stays sent. */
    {"mail-421-2nd",
     "on MAIL /second@/ reply 421 4.3.2 bye",
     {-1, SMTP_ERROR_DISCONNECTED, -1},
     {NULL, "mail", NULL},
     2,
     2,
     -1},
    {"rcpt-close-2nd",
     "on RCPT /a2@/ close",
     {-1, SMTP_ERROR_DISCONNECTED, -1},
     {NULL, "rcpt", NULL},
     2,
     2,
     -1},
};

static void
test_fail_case(gconstpointer data)
{
	const FailCase *c = data;
	g_autofree char *script = g_strconcat(PIPE_KEYWORDS, c->script, NULL);
	SmtpJob batch[3], alone[3];
	guint msgs, conns, rsets, msgs2, conns2, rsets2;

	jobs_init(batch, 3);
	jobs_init(alone, 3);
	run_jobs(script, batch, 3, TRUE, &msgs, &conns, &rsets);
	run_jobs(script, alone, 3, FALSE, &msgs2, &conns2, &rsets2);
	for (guint i = 0; i < 3; i++) {
		Outcome a = outcome_of(&batch[i]), b = outcome_of(&alone[i]);

		g_test_message("job %u: batch %d/%s, alone %d/%s", i, a.code,
		               a.stage, b.code, b.stage);
		assert_same(&a, &b);
		g_assert_cmpint(a.code, ==, c->codes[i]);
		g_assert_cmpstr(a.stage, ==, c->stages[i]);
	}
	g_assert_cmpuint(msgs, ==, c->messages);
	g_assert_cmpuint(msgs2, ==, c->messages);
	g_assert_cmpuint(conns, ==, c->connections);
	g_assert_cmpuint(conns2, ==, c->connections);
	if (c->rsets >= 0)
		g_assert_cmpuint(rsets, ==, (guint)c->rsets);
	jobs_clear(batch, 3);
	jobs_clear(alone, 3);
}

/*
 * One reply too many after the first end of data (break3 finding 4):
 * the second job's commands went out behind that end marker, so its
 * replies come shifted by one and its DATA gets a 250.  That is the
 * stream out of step: PROTOCOL (temporary) at stage "data", never a
 * refusal with code 250, and the connection is dropped without RSET;
 * the third job goes on a new connection and is sent.
 */
static void
test_extra_reply(void)
{
	Fixture f;
	SmtpJob jobs[3];

	jobs_init(jobs, 3);
	fixture_start(
	    &f,
	    PIPE_KEYWORDS
	    "on DOT /one/ raw 250 2.0.0 ok\\r\\n250 2.1.5 extra\\r\\n",
	    &limits);
	smtp_client_send_batch(f.client, jobs, 3);
	g_assert_nonnull(jobs[0].result);
	g_assert_error(jobs[1].error, SMTP_ERROR, SMTP_ERROR_PROTOCOL);
	g_assert_cmpstr(smtp_error_get_stage(jobs[1].error), ==, "data");
	g_assert_cmpint(smtp_error_get_reply(jobs[1].error)->code, ==, 250);
	g_assert_nonnull(strstr(jobs[1].error->message, "out of step"));
	g_assert_true(smtp_error_is_temporary(jobs[1].error));
	g_assert_null(smtp_error_get_refused(jobs[1].error));
	g_assert_nonnull(jobs[2].result);
	g_assert_cmpint(jobs[2].result->reply.code, ==, 250);
	smtp_client_quit(f.client);
	g_assert_cmpuint(count_commands(&f, "RSET"), ==, 0);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 2);
	g_assert_true(fake_smtp_wait_messages(f.fake, 2, 2000));
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 2);
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, 3);
}

/*
 * A relay that closes after every message (noted in the break3
 * report): each next job's commands, written behind the end marker,
 * meet a closed connection and get no reply at all.  Nothing of that
 * job was sent, so it starts over once on a new connection: every job
 * is sent, one connection each.  ("on MAIL#2 close": the fake counts
 * per connection, so it closes as the second MAIL of each arrives,
 * which the client cannot tell from a close after the 250.)
 */
static void
test_close_after_each(void)
{
	Fixture f;
	SmtpJob jobs[3];

	jobs_init(jobs, 3);
	fixture_start(&f, PIPE_KEYWORDS "on MAIL#2 close", &limits);
	smtp_client_send_batch(f.client, jobs, 3);
	for (guint i = 0; i < 3; i++) {
		g_assert_no_error(jobs[i].error);
		g_assert_nonnull(jobs[i].result);
	}
	smtp_client_quit(f.client);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 3);
	g_assert_true(fake_smtp_wait_messages(f.fake, 3, 2000));
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 3);
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, 3);
}

/* The start over happens once: a job whose MAIL is met by a close on
 * the new connection too fails DISCONNECTED at "mail" (two MAILs of it
 * seen), and a 421 (a reply: the server's word on this job) is not
 * retried at all (see the fail case mail-421-2nd). */
static void
test_close_retried_once(void)
{
	Fixture f;
	SmtpJob jobs[3];

	jobs_init(jobs, 3);
	fixture_start(&f, PIPE_KEYWORDS "on MAIL /second@/ close", &limits);
	smtp_client_send_batch(f.client, jobs, 3);
	g_assert_nonnull(jobs[0].result);
	g_assert_error(jobs[1].error, SMTP_ERROR, SMTP_ERROR_DISCONNECTED);
	g_assert_cmpstr(smtp_error_get_stage(jobs[1].error), ==, "mail");
	g_assert_nonnull(jobs[2].result);
	smtp_client_quit(f.client);
	g_assert_cmpuint(count_commands(&f, "MAIL FROM:<second@"), ==, 2);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 3);
	g_assert_true(fake_smtp_wait_messages(f.fake, 2, 2000));
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, 3);
}

/* Errors found before sending: only that job, nothing of it sent. */
static void
test_input_errors(void)
{
	static const SmtpRecipient spaced = {"a b@x.example", NULL};
	static const char *const utf8[] = {"SMTPUTF8", NULL};
	Fixture f;
	SmtpJob jobs[3];
	g_autofree char *all = NULL;
	g_autoptr(GBytes) received = NULL;

	jobs_init(jobs, 3);
	jobs[1].rcpts = &spaced;
	jobs[2].mail_options = utf8; /* not advertised below */
	fixture_start(&f, PIPE_KEYWORDS, &limits);
	smtp_client_send_batch(f.client, jobs, 3);
	g_assert_nonnull(jobs[0].result);
	g_assert_error(jobs[1].error, SMTP_ERROR, SMTP_ERROR_INPUT);
	g_assert_error(jobs[2].error, SMTP_ERROR, SMTP_ERROR_NOT_SUPPORTED);
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 1);
	received = fake_smtp_get_received(f.fake);
	all = g_strndup(g_bytes_get_data(received, NULL),
	                g_bytes_get_size(received));
	g_assert_null(strstr(all, "second@"));
	g_assert_null(strstr(all, "third@"));
	g_assert_cmpuint(count_commands(&f, "RSET"), ==, 0);
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, 3);
}

/*
 * Messages after the first of a batch are encoded while the server
 * takes in the one before (small ones in memory only).  Whatever was
 * encoded ahead or in line, each must reach the server exactly as it
 * would alone: lone CR and LF made CRLF, leading dots doubled, a last
 * line without CRLF ended; a job whose envelope is refused drops what
 * was encoded for it, and the one after it is still right.
 */
static void
test_encoded_ahead(void)
{
	static const char *const raw[] = {
	    "first\r\n",
	    ".dot\nlone lf\rlone cr\r\n..two\n. end",
	    NULL, /* large: over one block, encoded in line */
	    "refused at RCPT\n.\n",
	    "\rfile\n.x",
	    "last\n"};
	static const char *const wire[] = {
	    "first\r\n.\r\n",
	    "..dot\r\nlone lf\r\nlone cr\r\n...two\r\n.. end\r\n.\r\n",
	    NULL,
	    NULL,
	    "\r\nfile\r\n..x\r\n.\r\n",
	    "last\r\n.\r\n"};
	const guint n = G_N_ELEMENTS(raw);
	SmtpRecipient to[G_N_ELEMENTS(raw)];
	SmtpJob jobs[G_N_ELEMENTS(raw)];
	g_autoptr(GString) big = g_string_new(NULL);
	g_autoptr(GString) big_wire = g_string_new(NULL);
	g_autofree char *path = NULL;
	Fixture f;
	int fd;

	/* The large one: lines with leading dots, over 64 KiB */
	while (big->len < 100 * 1024) {
		g_string_append(big, ".line\n");
		g_string_append(big_wire, "..line\r\n");
	}
	g_string_append(big_wire, ".\r\n");

	/* The fifth from a file, which is never read ahead */
	fd = g_file_open_tmp("batch-ahead-XXXXXX", &path, NULL);
	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(write(fd, raw[4], strlen(raw[4])), ==, strlen(raw[4]));
	for (guint i = 0; i < n; i++) {
		to[i] = (SmtpRecipient){i == 3 ? "no@x.example" : "a@x.example",
		                        NULL};
		jobs[i] = (SmtpJob){"s@example.org",
		                    NULL,
		                    &to[i],
		                    1,
		                    smtp_message_new(SMTP_MESSAGE_BYTES),
		                    NULL,
		                    NULL};
		if (i == 2)
			smtp_message_append_data(jobs[i].msg, big->str,
			                         big->len);
		else if (i == 4)
			g_assert_true(smtp_message_append_fd(jobs[i].msg, fd, 0,
			                                     -1, NULL));
		else
			smtp_message_append_data(jobs[i].msg, raw[i],
			                         strlen(raw[i]));
	}
	close(fd);

	fixture_start(&f,
	              PIPE_KEYWORDS "on RCPT /no@/ reply 550 5.1.1 unknown\n",
	              &limits);
	smtp_client_send_batch(f.client, jobs, n);
	for (guint i = 0, m = 0; i < n; i++) {
		const FakeSmtpMessage *got;
		const char *want = i == 2 ? big_wire->str : wire[i];

		if (i == 3) {
			g_assert_error(jobs[i].error, SMTP_ERROR,
			               SMTP_ERROR_RECIPIENTS_REFUSED);
			continue;
		}
		g_assert_no_error(jobs[i].error);
		g_assert_true(fake_smtp_wait_messages(f.fake, m + 1, 2000));
		got = fake_smtp_get_message(f.fake, m++);
		g_assert_cmpmem(g_bytes_get_data(got->wire, NULL),
		                g_bytes_get_size(got->wire), want,
		                strlen(want));
	}
	g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, n - 1);
	g_assert_cmpuint(fake_smtp_get_connections(f.fake), ==, 1);
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, n);
	g_unlink(path);
}

/* What the per-job callback saw, and when to end the batch. */
typedef struct {
	Fixture *f;
	guint calls;
	gsize order[3];       /* the index of each call */
	gboolean had_outcome; /* every call found result xor error set */
	guint stored[3];      /* messages the server had at each call */
	gsize stop_after;     /* end the batch after this job; 3: never */
} Done;

static gboolean
on_done(SmtpJob *jobs, gsize index, gpointer data)
{
	Done *d = data;

	if ((jobs[index].result == NULL) == (jobs[index].error == NULL))
		d->had_outcome = FALSE;
	d->order[d->calls] = index;
	d->stored[d->calls] = fake_smtp_get_message_count(d->f->fake);
	d->calls++;
	return index != d->stop_after;
}

/*
 * smtp_client_send_batch_full: the callback runs once per job, in
 * order, with the job's outcome set, before the next job is answered
 * (a job's 250 is in, the next message not yet); a refused job is
 * reported like a sent one.
 */
static void
test_done_each(void)
{
	Fixture f;
	SmtpJob jobs[3];
	Done d = {.f = &f, .had_outcome = TRUE, .stop_after = 3};

	jobs_init(jobs, 3);
	fixture_start(&f, PIPE_KEYWORDS "on MAIL /second@/ reply 550 no",
	              &limits);
	smtp_client_send_batch_full(f.client, jobs, 3, on_done, &d);
	g_assert_cmpuint(d.calls, ==, 3);
	g_assert_true(d.had_outcome);
	for (guint i = 0; i < 3; i++)
		g_assert_cmpuint(d.order[i], ==, i);
	g_assert_nonnull(jobs[0].result);
	g_assert_error(jobs[1].error, SMTP_ERROR, SMTP_ERROR_SENDER_REFUSED);
	g_assert_nonnull(jobs[2].result);
	g_assert_cmpuint(d.stored[0], ==, 1);
	g_assert_cmpuint(d.stored[1], ==, 1);
	g_assert_cmpuint(d.stored[2], ==, 2);
	smtp_client_quit(f.client);
	fixture_tear_down(&f, NULL);
	jobs_clear(jobs, 3);
}

/*
 * A callback that ends the batch after the first job: the others get
 * neither result nor error, and since the second job's commands went
 * out behind the first end marker, the connection is dropped and the
 * server stores nothing of it.  Without PIPELINING nothing of the
 * second went out, and the connection stays for the next use.
 */
static void
test_done_stops(void)
{
	for (guint pipe = 0; pipe < 2; pipe++) {
		Fixture f;
		SmtpJob jobs[3];
		Done d = {.f = &f, .had_outcome = TRUE, .stop_after = 0};

		jobs_init(jobs, 3);
		fixture_start(&f,
		              pipe ? PIPE_KEYWORDS
		                   : "ehlo-keywords 8BITMIME SIZE 1000000\n",
		              &limits);
		smtp_client_send_batch_full(f.client, jobs, 3, on_done, &d);
		g_assert_cmpuint(d.calls, ==, 1);
		g_assert_nonnull(jobs[0].result);
		for (guint i = 1; i < 3; i++) {
			g_assert_null(jobs[i].result);
			g_assert_null(jobs[i].error);
		}
		/* With PIPELINING it went out; the server may not have
		 * read it before the close. */
		g_assert_cmpuint(count_commands(&f, "MAIL FROM:<second@"), <=,
		                 (guint)pipe);
		g_assert_cmpuint(count_commands(&f, "MAIL FROM:<third@"), ==,
		                 0);
		g_assert_true(smtp_client_is_connected(f.client) == !pipe);
		g_assert_true(fake_smtp_wait_messages(f.fake, 1, 2000));
		g_usleep(100000);
		g_assert_cmpuint(fake_smtp_get_message_count(f.fake), ==, 1);
		smtp_client_quit(f.client);
		fixture_tear_down(&f, NULL);
		jobs_clear(jobs, 3);
	}
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	writes = g_ptr_array_new_with_free_func((GDestroyNotify)g_bytes_unref);

	g_test_add_func("/smtpclient/batch/all-sent", test_all_sent);
	g_test_add_func("/smtpclient/batch/writes", test_writes);
	g_test_add_func("/smtpclient/batch/no-pipelining", test_no_pipelining);
	g_test_add_func("/smtpclient/batch/many-recipients",
	                test_many_recipients);
	g_test_add_func("/smtpclient/batch/empty", test_empty);
	g_test_add_func("/smtpclient/batch/encoded-ahead", test_encoded_ahead);
	g_test_add_func("/smtpclient/batch/input-errors", test_input_errors);
	g_test_add_func("/smtpclient/batch/extra-reply", test_extra_reply);
	g_test_add_func("/smtpclient/batch/close-after-each",
	                test_close_after_each);
	g_test_add_func("/smtpclient/batch/close-retried-once",
	                test_close_retried_once);
	g_test_add_func("/smtpclient/batch/done-each", test_done_each);
	g_test_add_func("/smtpclient/batch/done-stops", test_done_stops);
	for (guint i = 0; i < G_N_ELEMENTS(fail_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/smtpclient/batch/fail/%s", fail_cases[i].name);

		g_test_add_data_func(path, &fail_cases[i], test_fail_case);
	}
	return g_test_run();
}
