/*
 * runner.c - the worker threads that deliver spooled copies
 *
 * One table of jobs (a copy id each) sorted by when it is due, behind
 * one mutex: a worker takes the earliest due job, with the other jobs
 * due now for the same relay (a batch), delivers them without the
 * lock, and puts each back with its next due time or forgets it.  A
 * scanner thread lists queue/ at start and every scan interval and
 * adds the ids it does not know, so that copies of an earlier run,
 * copies released by `--spool-retry` in another process and copies of
 * a kick that was lost are all found; only names are listed, the files
 * are read by the worker that takes the job.
 *
 * The policy of the copy's rule decides after a failure: tempfail or
 * spool mean retry; anything else (accept, and reject for a sync rule
 * whose copy reached the spool: the original was accepted long ago)
 * means hold, since a copy is never dropped.
 *
 * The spool's files hold the truth (next attempt, attempts, addresses
 * still due); the table only says when to look again.  A job whose
 * file has gone (confirmed, held or removed by someone else) is
 * forgotten when a worker finds it gone, or by the next scan.
 *
 * A copy that a scan finds while the daemon runs, and that no kick
 * announced, may belong to a message the milter has not answered yet
 * (another rule is still sending its copy, and the original may yet be
 * refused, which withdraws this copy): it waits AM_RUNNER_SETTLE_S from
 * its creation unless released by an administrator.  Copies there at
 * start are due at once: the run that made them is over.
 *
 * Times read from the spool are bounded before use, since a damaged
 * state file (or one written while the clock was far ahead) could
 * otherwise park a copy for ever or overflow the arithmetic: a
 * next_attempt beyond now + spool_retry_max, and a created or released
 * time in the future, are taken as now, logged, and saved.  Due times
 * in microseconds saturate at PARKED.
 *
 * spool_max_age is checked before an attempt too: a copy past it that
 * was tried before is held without another try, so that a copy that
 * never gets tried still ends in hold/.  A copy never tried gets one
 * attempt, even past its age (a daemon down for longer than
 * spool_max_age), and is held if that fails.
 *
 * A copy the milter just spooled comes with its message in memory
 * (am_runner_kick_copy): its first attempt sends those octets, the
 * ones that were written and fsynced, without opening, parsing and
 * hashing the file again (the file's digest guards against damage on
 * disk, which memory has not suffered).  The job holds them only until
 * its first attempt, and the runner at most memory_max octets of them
 * in all; a copy beyond that, and every later attempt, reads its file.
 * A fresh copy has no state/ file, so confirming it unlinks only the
 * copy (unless bound_times had to write one).
 *
 * A copy whose file is damaged is never sent: a file that cannot be
 * parsed, or whose copy does not have the length its envelope records,
 * is logged at error level and left where it is (parked until the next
 * start; --spool-list counts it as damaged); one whose SHA-256 differs
 * is held, with an error-level line.
 *
 * Copies due together for one relay go as one batch, over one
 * connection (am_deliver_batch): with PIPELINING each copy's envelope
 * rides behind the previous copy's end marker, a round trip less per
 * copy, and the worker wakes once for them all.  A batch holds at most
 * AM_RUNNER_BATCH_MAX copies and AM_RUNNER_BATCH_OCTETS.  Nothing else
 * is shared: each copy is checked first as it would be alone
 * (prepare_file, prepare_fresh: due, age, rule and relay, digest), is
 * left out when it cannot go, and its outcome is logged and acted on
 * by its own rule (finish), so a refusal or a lost connection never
 * counts against another copy.  Which jobs share a relay is known only
 * for a copy kicked with its message or read before: the relay is in
 * the file, which only the worker that takes a job reads.
 *
 * Copies come one at a time from the milter, and a worker is faster
 * than they come, so few would ever wait for one another: a copy just
 * spooled (am_runner_kick_copy) is due AM_RUNNER_LINGER_MS later, and
 * the copies spooled meanwhile leave with it.  Its original was
 * answered already, so those milliseconds cost nobody; under load
 * they save a wake-up and a round trip per copy.  A worker is
 * signalled only when no waiting worker will wake by the job's due
 * time anyway (wake_for), so a lingering copy wakes nobody early.
 *
 * Known limits: XXX: due times follow the wall clock (next_attempt is
 * stored as unix seconds so that it survives a restart); a clock set
 * back delays retries by as much, a clock set forward makes them early.
 * XXX: a file that cannot be parsed is parked until the next start,
 * logged once, and left where it is for an administrator.  XXX: a copy
 * whose relay is not known yet (found by a scan, as every copy is
 * after a restart, or kicked by id only: over the memory cap, or
 * spilled) goes alone the first time; its retries can join batches.
 * XXX: copies form a batch only when they come within one linger (or
 * wait for a busy worker): under light load each copy is still its own
 * transaction, 5 ms later than it could have gone.  XXX: a batch is
 * sent in turn: a relay slow on one copy delays the batch's later
 * ones (bounded by the relay's copy_deadline, once per copy), and a
 * stop waits for the whole batch, so am_runner_stop_within's grace is
 * likelier to run out; those copies go again at the next start (their
 * X-Archive-Id lets the archive drop a duplicate).
 */
#include <pthread.h>
#include <signal.h>
#include <string.h>

#include "deliver.h"
#include "log.h"
#include "runner.h"

#define AM_RUNNER_SCAN_MS 5000 /* default scan interval */
/* The longest sleep, so that a clock change or a stop is seen soon. */
#define AM_RUNNER_WAIT_MS 1000
/* How long a copy found by a scan, not kicked, may belong to a message
 * whose milter has not answered yet: Postfix's default
 * milter_content_timeout, after which Postfix has given up anyway. */
#define AM_RUNNER_SETTLE_S 300
/* A worker's batch: at most this many copies for one relay, and this
 * many octets (its first copy goes whatever its size), so that one
 * worker does not keep a backlog from the others; found among at most
 * this many due jobs, so that the lock is not held over a long scan. */
#define AM_RUNNER_BATCH_MAX    16
#define AM_RUNNER_BATCH_OCTETS (4 * 1024 * 1024)
#define AM_RUNNER_BATCH_LOOK   64
/* How long a copy just spooled waits for others to join its batch: its
 * original was answered already, and under load the next copies come
 * within a few milliseconds. */
#define AM_RUNNER_LINGER_MS 5

typedef struct {
	char *id;
	gint64 due;          /* real time, µs */
	gint64 added;        /* monotonic µs when the job was made */
	GSequenceIter *iter; /* in runner->due; NULL while busy */
	gboolean busy;       /* a worker has it */
	gboolean kicked;     /* kicked while busy: due again at once */
	gboolean settled;    /* kicked, or there before we started: its
			      * original's fate is known */
	AmSpoolEntry *entry; /* kick_copy: for the first attempt; NULL */
	SmtpMessage *msg;    /* kick_copy: its octets, in memory; NULL */
	guint64 msg_size;    /* counted in held */
	char *relay;         /* the copy's relay once known; NULL */
	guint64 size;        /* the copy's octets once known */
} Job;

struct AmRunner {
	AmSpool *spool;   /* borrowed */
	guint scan_ms;    /* scan interval */
	gboolean scanned; /* the first scan is done */
	GMutex lock;      /* guards everything below */
	GCond cond;       /* workers: a job (re)scheduled, or stop */
	GCond scan_cond;  /* the scanner: stop */
	GSequence *due;   /* Job *, by due then id; not busy ones */
	GHashTable *jobs; /* id -> Job * (owned) */
	gboolean stopping;
	GCond gone;    /* am_runner_stop_within: a worker ended */
	guint running; /* workers not yet ended */
	GThread *scanner;
	GPtrArray *workers;  /* GThread * */
	guint64 memory_max;  /* cap on held */
	guint64 held;        /* octets of Job.msg, all jobs */
	gint64 linger_us;    /* kick_copy: due this much later */
	GQueue sleeping;     /* gint64 *: when each waiting worker wakes
			      * (real µs); popped when signalled */
	AmRunnerStats stats; /* under the lock */
};

/* What an attempt decided for its job. */
#define JOB_FORGET (-1)
/* Not before the next start: a damaged file. */
#define PARKED G_MAXINT64

static void
job_free(gpointer data)
{
	Job *job = data;

	g_free(job->id);
	g_free(job->relay);
	am_spool_entry_free(job->entry);
	smtp_message_free(job->msg);
	g_free(job);
}

/* Called with the lock held: the job's message leaves memory (taken
 * by a worker, or dropped); @entry and @msg receive it, or are freed
 * when NULL. */
static void
job_take_copy(AmRunner *r, Job *job, AmSpoolEntry **entry, SmtpMessage **msg)
{
	r->held -= job->msg != NULL ? job->msg_size : 0;
	job->msg_size = 0;
	if (entry != NULL)
		*entry = g_steal_pointer(&job->entry);
	if (msg != NULL)
		*msg = g_steal_pointer(&job->msg);
	g_clear_pointer(&job->entry, am_spool_entry_free);
	g_clear_pointer(&job->msg, smtp_message_free);
}

static gint
job_compare(gconstpointer a, gconstpointer b, gpointer user_data)
{
	const Job *x = a, *y = b;

	(void)user_data;
	if (x->due != y->due)
		return x->due < y->due ? -1 : 1;
	return strcmp(x->id, y->id);
}

/*
 * Make sure a worker looks at the table by @due (lock held): a waiting
 * one that wakes by then anyway will, else one is signalled (and no
 * longer counted on: whichever wakes does what any would).  One worker
 * at most, since the others would only wake to find the job taken; a
 * busy worker looks at the table before it waits again, so no job is
 * missed.
 */
static void
wake_for(AmRunner *r, gint64 due)
{
	for (GList *l = r->sleeping.head; l != NULL; l = l->next)
		if (*(const gint64 *)l->data <= due)
			return;
	g_queue_pop_head(&r->sleeping);
	g_cond_signal(&r->cond);
}

/* Called with the lock held. */
static void
job_schedule(AmRunner *r, Job *job, gint64 due)
{
	if (job->iter != NULL)
		g_sequence_remove(job->iter);
	job->due = due;
	job->iter = g_sequence_insert_sorted(r->due, job, job_compare, NULL);
	wake_for(r, due);
}

/* Called with the lock held. */
static Job *
job_add(AmRunner *r, const char *id, gint64 due)
{
	Job *job = g_new0(Job, 1);

	job->id = g_strdup(id);
	job->added = g_get_monotonic_time();
	g_hash_table_insert(r->jobs, job->id, job);
	job_schedule(r, job, due);
	return job;
}

/* Called with the lock held. */
static void
job_forget(AmRunner *r, Job *job)
{
	if (job->iter != NULL)
		g_sequence_remove(job->iter);
	job_take_copy(r, job, NULL, NULL);
	g_hash_table_remove(r->jobs, job->id);
}

/* ------------------------------------------------------------------ */
/* One attempt                                                          */
/* ------------------------------------------------------------------ */

static gint64
now_s(void)
{
	return g_get_real_time() / G_USEC_PER_SEC;
}

/* Unix seconds @s as a due time in µs, saturated (no overflow). */
static gint64
due_at(gint64 s)
{
	if (s <= 0)
		return 0;
	if (s >= PARKED / G_USEC_PER_SEC)
		return PARKED;
	return s * G_USEC_PER_SEC;
}

/*
 * Bound the times of @e read from the spool; save them when one had to
 * change, so that the correction outlives this attempt (the age counts
 * from a created time that no longer moves).
 */
static void save_state(AmRunner *r, const AmSpoolEntry *e);

static gboolean
bound_times(AmRunner *r, const AmConfig *config, AmSpoolEntry *e, gint64 now)
{
	gint64 max_wait = MAX((gint64)config->spool_retry_max_s,
	                      MAX((gint64)config->spool_retry_min_s, 1));
	gboolean changed = FALSE;

	if (e->next_attempt > now + max_wait) {
		am_log_warning("%s: next attempt %" G_GINT64_FORMAT " is more "
		               "than spool_retry_max from now; tried now",
		               e->id, e->next_attempt);
		e->next_attempt = now;
		changed = TRUE;
	}
	if (e->created > now) {
		am_log_warning("%s: created %" G_GINT64_FORMAT " is in the "
		               "future; its age counts from now",
		               e->id, e->created);
		e->created = now;
		e->created_override = now;
		changed = TRUE;
	}
	if (e->released > now) {
		am_log_warning("%s: released %" G_GINT64_FORMAT " is in the "
		               "future; its age counts from now",
		               e->id, e->released);
		e->released = now;
		changed = TRUE;
	}
	if (changed)
		save_state(r, e);
	return changed;
}

static const AmRule *
find_rule(const AmConfig *config, const char *name)
{
	for (guint i = 0; i < config->rules->len; i++) {
		const AmRule *rule = config->rules->pdata[i];

		if (strcmp(rule->name, name) == 0)
			return rule;
	}
	return NULL;
}

/* Seconds until the retry after @attempts failed attempts. */
static gint64
backoff(const AmConfig *config, guint attempts)
{
	gint64 min = MAX(config->spool_retry_min_s, 1);
	gint64 max = MAX(config->spool_retry_max_s, min);
	guint shift = attempts > 0 ? attempts - 1 : 0;

	if (shift >= 31 || (min << shift) > max)
		return max;
	return min << shift;
}

/* Move the copy to hold/, with the line an administrator looks for. */
static void
hold(AmRunner *r, const AmSpoolEntry *e, const char *reason)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *clean = am_log_sanitize(reason, 512);

	if (!am_spool_hold(r->spool, e->id, reason, &error)) {
		/* Gone meanwhile, or the disk refuses: the copy stays
		 * where it is, and the next scan sees it again. */
		am_log_error("%s: cannot move to hold (%s): %s", e->id, clean,
		             error->message);
		return;
	}
	am_log_error("%s: held (%s)", e->id, clean);
}

/* The addresses not taken this time; all of them if none is known. */
static char **
still_due(const AmSpoolEntry *e, const AmDelivery *d)
{
	g_autoptr(GPtrArray) left = g_ptr_array_new_with_free_func(g_free);

	for (guint i = 0; i < d->rcpts->len; i++) {
		const AmRcptOutcome *o = d->rcpts->pdata[i];

		if (o->status != AM_STATUS_SENT)
			g_ptr_array_add(left, g_strdup(o->address));
	}
	if (left->len == 0)
		return g_strdupv(e->to);
	g_ptr_array_add(left, NULL);
	return (char **)g_ptr_array_free(g_steal_pointer(&left), FALSE);
}

/* Save the copy's retry state. */
static void
save_state(AmRunner *r, const AmSpoolEntry *e)
{
	g_autoptr(GError) error = NULL;

	if (!am_spool_update(r->spool, e, &error))
		/* Only the backoff and the addresses already taken are
		 * lost: the copy itself is safe. */
		am_log_warning("%s: cannot save retry state: %s", e->id,
		               error->message);
}

/* What the rule's policy says after a failure; the next due time. */
static gint64
after_failure(AmRunner *r, const AmContext *ctx, const AmRule *rule,
              AmSpoolEntry *e, const AmDelivery *d)
{
	const AmConfig *config = ctx->config;
	guint action = am_rule_action(rule, d->outcome, d->temporary);
	gint64 age = now_s() - MAX(e->created, e->released);
	g_autofree char *reason = NULL;

	/* Step 1: the attempt, and the addresses still due. */
	if (e->attempts < G_MAXUINT)
		e->attempts++;
	g_free(e->last_error);
	e->last_error = g_strdup(
	    d->reason != NULL ? d->reason : am_outcome_name(d->outcome));
	g_strfreev(e->to);
	e->to = still_due(e, d);

	/* Step 2: hold, when the policy stops or the copy is too old. */
	if ((action & (AM_ACTION_TEMPFAIL | AM_ACTION_SPOOL)) == 0) {
		/* accept: the policy gives up on this copy, but a copy
		 * is never dropped; an administrator decides. */
		reason = g_strdup_printf("%s: %s", am_outcome_name(d->outcome),
		                         e->last_error);
		save_state(r, e);
		hold(r, e, reason);
		return JOB_FORGET;
	}
	if (age >= (gint64)config->spool_max_age_s) {
		reason = g_strdup_printf(
		    "queued %" G_GINT64_FORMAT "s, more than spool_max_age "
		    "%us; last error: %s",
		    age, config->spool_max_age_s, e->last_error);
		save_state(r, e);
		hold(r, e, reason);
		return JOB_FORGET;
	}
	/* Step 3: retry later, longer after each attempt. */
	e->next_attempt = now_s() + backoff(config, e->attempts);
	save_state(r, e);
	return due_at(e->next_attempt);
}

/*
 * One copy of a batch, from the worker's take to its outcome.  A copy
 * that cannot go this time (not due, too old, damaged, its rule gone)
 * gets its next due time in @due at once and is left out of the send.
 */
typedef struct {
	Job *job;           /* busy until the batch is over */
	gboolean settled;   /* job->settled when taken */
	AmSpoolEntry *e;    /* kick_copy's, or read from its file */
	SmtpMessage *msg;   /* kick_copy's, or streaming from its file */
	gboolean fresh;     /* its first attempt, from memory */
	gboolean stateless; /* no state/ file was ever written for it */
	gboolean looked;    /* counts in the stats: a context was set */
	const AmRule *rule; /* the context's, when ready */
	const AmRelay *relay;
	gint64 due; /* the next due time, or JOB_FORGET */
} Copy;

static void
copy_clear(Copy *c)
{
	g_clear_pointer(&c->e, am_spool_entry_free);
	g_clear_pointer(&c->msg, smtp_message_free);
}

/*
 * Whether copy @c can go now through its relay under its rule; if not,
 * c->due says when to look again.  The message is the one in memory,
 * or read from the copy's file as it is sent, once its digest says it
 * is the copy that was written.
 */
static gboolean
prepare_send(AmRunner *r, AmContext *ctx, Copy *c)
{
	AmSpoolEntry *e = c->e;
	g_autoptr(GError) error = NULL;
	g_autofree char *reason = NULL;

	/* Step 1: the configuration may have changed since the copy was
	 * made; without its rule or relay nobody can say where it goes. */
	c->rule = find_rule(ctx->config, e->rule);
	c->relay = am_config_find_relay(ctx->config, e->relay);
	if (c->rule == NULL || c->relay == NULL) {
		reason =
		    g_strdup_printf("%s %s is no longer in the configuration",
		                    c->rule == NULL ? "rule" : "relay",
		                    c->rule == NULL ? e->rule : e->relay);
		hold(r, e, reason);
		c->due = JOB_FORGET;
		return FALSE;
	}

	/* Step 2: the copy, read from its file as it is sent, once its
	 * digest says it is the copy that was written; or the octets that
	 * were written, still in memory. */
	if (c->msg == NULL)
		c->msg = am_spool_message(r->spool, e, &error);
	if (c->msg != NULL)
		return TRUE;
	if (g_error_matches(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND)) {
		c->due = JOB_FORGET;
	} else if (g_error_matches(error, AM_SPOOL_ERROR,
	                           AM_SPOOL_ERROR_FORMAT)) {
		/* Damaged: never sent; an administrator looks. */
		hold(r, e, error->message);
		c->due = JOB_FORGET;
	} else {
		am_log_warning("%s: %s", e->id, error->message);
		c->due = due_at(now_s() +
		                backoff(ctx->config, e->attempts < G_MAXUINT
		                                         ? e->attempts + 1
		                                         : e->attempts));
	}
	return FALSE;
}

/*
 * One look at copy @c in its file: whether it is due and can go now;
 * if not, c->due.
 */
static gboolean
prepare_file(AmRunner *r, AmContext *ctx, Copy *c)
{
	g_autoptr(GError) error = NULL;
	gint64 now = now_s();
	AmSpoolEntry *e;
	gint64 age;

	c->e = e = am_spool_get(r->spool, c->job->id, &error);
	if (e == NULL) {
		c->due = JOB_FORGET;
		if (g_error_matches(error, AM_SPOOL_ERROR,
		                    AM_SPOOL_ERROR_NOT_FOUND))
			return FALSE;
		am_log_error("%s: %s; left in the spool", c->job->id,
		             error->message);
		/* Parked: a damaged file is not read again until the
		 * next start, so the log does not fill with it. */
		if (g_error_matches(error, AM_SPOOL_ERROR,
		                    AM_SPOOL_ERROR_FORMAT))
			c->due = PARKED;
		else
			c->due = due_at(now + backoff(ctx->config, 1));
		return FALSE;
	}
	if (e->state == AM_SPOOL_HELD) {
		c->due = JOB_FORGET;
		return FALSE;
	}
	bound_times(r, ctx->config, e, now);

	/* Too old, and tried before: no more attempts. */
	age = now - MAX(e->created, e->released);
	if (e->attempts > 0 && age >= (gint64)ctx->config->spool_max_age_s) {
		g_autofree char *reason = g_strdup_printf(
		    "queued %" G_GINT64_FORMAT "s, more than spool_max_age "
		    "%us; last error: %s",
		    age, ctx->config->spool_max_age_s,
		    e->last_error != NULL ? e->last_error : "none");

		hold(r, e, reason);
		c->due = JOB_FORGET;
		return FALSE;
	}
	if (e->next_attempt > now) {
		c->due = due_at(e->next_attempt);
		return FALSE;
	}
	if (!c->settled && e->released == 0 &&
	    e->created + AM_RUNNER_SETTLE_S > now) {
		c->due = due_at(e->created + AM_RUNNER_SETTLE_S);
		return FALSE;
	}
	return prepare_send(r, ctx, c);
}

/*
 * The first attempt of a copy just spooled, from memory: nothing to
 * read, and nothing can be in its way (no state, no next attempt,
 * young, kicked).
 */
static gboolean
prepare_fresh(AmRunner *r, AmContext *ctx, Copy *c)
{
	c->stateless = !bound_times(r, ctx->config, c->e, now_s());
	return prepare_send(r, ctx, c);
}

/* Log copy @c's outcome @d and act on it; the next due time. */
static gint64
finish(AmRunner *r, AmContext *ctx, Copy *c, const AmDelivery *d)
{
	g_autoptr(GError) error = NULL;

	am_delivery_log(d, c->e->queue_id);
	if (d->status != AM_STATUS_SENT)
		return after_failure(r, ctx, c->rule, c->e, d);
	if (!am_spool_remove_sent(r->spool, c->e->id, !c->stateless, &error))
		/* It will go again: its X-Archive-Id lets the archive
		 * drop the duplicate. */
		am_log_error("%s: sent, but cannot remove it from the "
		             "spool: %s",
		             c->e->id, error->message);
	return JOB_FORGET;
}

/* What send_group's copies need while their batch is sent. */
typedef struct {
	AmRunner *r;
	AmContext *ctx;
	Copy **group;
} Group;

/*
 * A copy of the batch has its outcome: logged and acted on now (its
 * file removed once the relay took it), not when the whole batch is
 * over, so that a crash meanwhile sends again only the copies not yet
 * confirmed.  A stop ends the batch: copies not started wait in the
 * spool for the next start.
 */
static gboolean
group_copy_done(guint index, const AmDelivery *d, gpointer data)
{
	Group *g = data;
	gboolean stopping;

	g->group[index]->due = finish(g->r, g->ctx, g->group[index], d);
	g_mutex_lock(&g->r->lock);
	stopping = g->r->stopping;
	g_mutex_unlock(&g->r->lock);
	return !stopping;
}

/* Send the @n ready copies of @group, all for one relay, together.  A
 * copy the batch did not send (a stop) is due again at once, no
 * attempt counted. */
static void
send_group(AmRunner *r, AmContext *ctx, Copy **group, guint n)
{
	AmCopyRequest reqs[AM_RUNNER_BATCH_MAX];
	g_autoptr(GPtrArray) d = NULL;
	Group g = {r, ctx, group};

	for (guint i = 0; i < n; i++)
		reqs[i] = (AmCopyRequest){
		    .relay = group[i]->relay,
		    .from = group[i]->e->from,
		    .to = (const char *const *)group[i]->e->to,
		    .msg = group[i]->msg,
		    .smtputf8 = group[i]->e->smtputf8,
		    .eightbit = group[i]->e->eightbit,
		};
	d = am_deliver_batch_full(ctx->pool, reqs, n, group_copy_done, &g);
	for (guint i = 0; i < n; i++)
		if (d->pdata[i] == NULL)
			group[i]->due = g_get_real_time();
}

static void
count_looks(AmRunner *r, const Copy *batch, guint n)
{
	g_mutex_lock(&r->lock);
	for (guint i = 0; i < n; i++) {
		if (!batch[i].looked)
			continue;
		if (batch[i].fresh)
			r->stats.from_memory++;
		else
			r->stats.from_disk++;
	}
	g_mutex_unlock(&r->lock);
}

/*
 * Each copy of @batch looked at as it would be alone, then those that
 * can go sent together, one batch per relay; each copy's next due
 * time in its @due.
 */
static void
run_batch(AmRunner *r, Copy *batch, guint n)
{
	g_autoptr(AmContext) ctx = am_milter_get_context();
	Copy *ready[AM_RUNNER_BATCH_MAX];
	guint n_ready = 0;

	/* Step 1: with no configuration yet, every copy waits (one from
	 * memory is read from its file next time). */
	if (ctx == NULL) {
		for (guint i = 0; i < n; i++)
			batch[i].due =
			    g_get_real_time() + r->scan_ms * (gint64)1000;
		return;
	}

	/* Step 2: the checks of each copy, in memory or in its file. */
	for (guint i = 0; i < n; i++) {
		Copy *c = &batch[i];

		c->looked = TRUE;
		if (c->fresh ? prepare_fresh(r, ctx, c)
		             : prepare_file(r, ctx, c))
			ready[n_ready++] = c;
	}
	count_looks(r, batch, n);

	/* Step 3: the jobs were taken for one relay, but never mix two
	 * in one batch, whatever a file says. */
	while (n_ready > 0) {
		const AmRelay *relay = ready[0]->relay;
		Copy *group[AM_RUNNER_BATCH_MAX];
		guint n_group = 0, n_rest = 0;

		for (guint i = 0; i < n_ready; i++) {
			if (ready[i]->relay == relay)
				group[n_group++] = ready[i];
			else
				ready[n_rest++] = ready[i];
		}
		send_group(r, ctx, group, n_group);
		n_ready = n_rest;
	}
}

/* ------------------------------------------------------------------ */
/* Threads                                                              */
/* ------------------------------------------------------------------ */

/* Job @job into copy @c of a worker's batch (lock held). */
static void
take_job(AmRunner *r, Job *job, Copy *c)
{
	g_sequence_remove(job->iter);
	job->iter = NULL;
	job->busy = TRUE;
	*c = (Copy){.job = job, .settled = job->settled};
	job_take_copy(r, job, &c->e, &c->msg);
	c->fresh = c->msg != NULL;
}

/* The earliest job into @batch if it is due; else sleep until it is
 * (lock held).  The number of copies taken. */
static guint
take_due(AmRunner *r, Copy *batch)
{
	GSequenceIter *first = g_sequence_get_begin_iter(r->due);
	gint64 wait_us = AM_RUNNER_WAIT_MS * (gint64)1000;
	gint64 wake_at;
	Job *job;

	if (!g_sequence_iter_is_end(first)) {
		job = g_sequence_get(first);
		if (job->due <= g_get_real_time()) {
			take_job(r, job, &batch[0]);
			return 1;
		}
		wait_us = MIN(wait_us, job->due - g_get_real_time());
	}
	wait_us = MAX(wait_us, 1);
	wake_at = g_get_real_time() + wait_us;
	g_queue_push_tail(&r->sleeping, &wake_at);
	g_cond_wait_until(&r->cond, &r->lock, g_get_monotonic_time() + wait_us);
	g_queue_remove(&r->sleeping, &wake_at);
	return 0;
}

/*
 * Take into @batch, behind its first job, the other jobs due now for
 * the same relay, up to AM_RUNNER_BATCH_MAX copies and
 * AM_RUNNER_BATCH_OCTETS (lock held), and the copies just spooled that
 * still linger for company.  Only jobs whose relay is known (a copy
 * kicked with its message, or read before) can join; the others go on
 * their own.  The number of copies in @batch.
 */
static guint
take_more(AmRunner *r, Copy *batch)
{
	const Job *first = batch[0].job;
	GSequenceIter *it = g_sequence_get_begin_iter(r->due);
	gint64 now = g_get_real_time();
	guint64 octets = first->size;
	guint n = 1;

	for (guint looked = 0;
	     first->relay != NULL && n < AM_RUNNER_BATCH_MAX &&
	     looked < AM_RUNNER_BATCH_LOOK && !g_sequence_iter_is_end(it);
	     looked++) {
		Job *job = g_sequence_get(it);

		if (job->due > now + r->linger_us)
			break;
		it = g_sequence_iter_next(it);
		if ((job->due > now && job->msg == NULL) ||
		    g_strcmp0(job->relay, first->relay) != 0 ||
		    job->size > AM_RUNNER_BATCH_OCTETS -
		                    MIN(octets, AM_RUNNER_BATCH_OCTETS))
			continue;
		octets += job->size;
		take_job(r, job, &batch[n++]);
	}

	/* A job left (another relay, over the caps) may have counted on
	 * this worker to wake for it: another one will. */
	it = g_sequence_get_begin_iter(r->due);
	if (!g_sequence_iter_is_end(it))
		wake_for(r, ((Job *)g_sequence_get(it))->due);
	return n;
}

/* The batch is over for copy @c: its job is rescheduled, or forgotten
 * (lock held).  Its relay and size are kept for the next batch. */
static void
job_done(AmRunner *r, Copy *c)
{
	Job *job = c->job;
	gint64 due = c->due;

	if (c->e != NULL && job->relay == NULL) {
		job->relay = g_strdup(c->e->relay);
		job->size =
		    c->msg != NULL ? smtp_message_get_size(c->msg) : c->e->size;
	}
	job->busy = FALSE;
	if (job->kicked)
		due = g_get_real_time();
	job->kicked = FALSE;
	if (due == JOB_FORGET)
		job_forget(r, job);
	else
		job_schedule(r, job, due);
}

static gpointer
worker_main(gpointer data)
{
	AmRunner *r = data;
	Copy batch[AM_RUNNER_BATCH_MAX];

	g_mutex_lock(&r->lock);
	while (!r->stopping) {
		guint n = take_due(r, batch);

		if (n == 0)
			continue;
		n = take_more(r, batch);
		g_mutex_unlock(&r->lock);
		run_batch(r, batch, n);
		g_mutex_lock(&r->lock);
		for (guint i = 0; i < n; i++)
			job_done(r, &batch[i]);
		g_mutex_unlock(&r->lock);
		/* Files closed and messages freed outside the lock. */
		for (guint i = 0; i < n; i++)
			copy_clear(&batch[i]);
		g_mutex_lock(&r->lock);
	}
	r->running--;
	g_cond_broadcast(&r->gone);
	g_mutex_unlock(&r->lock);
	return NULL;
}

/* Add the ids of queue/ we do not know; drop idle jobs whose file has
 * gone (made before the listing, so a fresh kick is never dropped). */
static void
scan(AmRunner *r)
{
	gint64 started = g_get_monotonic_time();
	g_autoptr(GError) error = NULL;
	g_autoptr(GPtrArray) ids = NULL;
	g_autoptr(GHashTable) seen = NULL;
	GHashTableIter it;
	gpointer value;

	ids = am_spool_list_ids(r->spool, AM_SPOOL_QUEUED, &error);
	if (ids == NULL) {
		am_log_error("spool scan: %s", error->message);
		return;
	}
	seen = g_hash_table_new(g_str_hash, g_str_equal);
	g_mutex_lock(&r->lock);
	for (guint i = 0; i < ids->len; i++) {
		Job *job;

		g_hash_table_add(seen, ids->pdata[i]);
		if (g_hash_table_contains(r->jobs, ids->pdata[i]))
			continue;
		job = job_add(r, ids->pdata[i], g_get_real_time());
		job->settled = !r->scanned;
	}
	r->scanned = TRUE;
	g_hash_table_iter_init(&it, r->jobs);
	while (g_hash_table_iter_next(&it, NULL, &value)) {
		Job *job = value;

		if (job->busy || job->added >= started ||
		    g_hash_table_contains(seen, job->id))
			continue;
		if (job->iter != NULL)
			g_sequence_remove(job->iter);
		job_take_copy(r, job, NULL, NULL);
		g_hash_table_iter_remove(&it);
	}
	g_mutex_unlock(&r->lock);
}

static gpointer
scanner_main(gpointer data)
{
	AmRunner *r = data;

	/* The first scan was made by am_runner_start_full(). */
	for (;;) {
		gint64 until;

		g_mutex_lock(&r->lock);
		until = g_get_monotonic_time() + r->scan_ms * (gint64)1000;
		while (!r->stopping && g_get_monotonic_time() < until)
			g_cond_wait_until(&r->scan_cond, &r->lock, until);
		if (r->stopping) {
			g_mutex_unlock(&r->lock);
			return NULL;
		}
		g_mutex_unlock(&r->lock);
		scan(r);
	}
}

AmRunner *
am_runner_start_full(AmSpool *spool, guint workers, guint scan_ms,
                     GError **error)
{
	AmRunner *r = g_new0(AmRunner, 1);
	sigset_t all, old;

	(void)error;
	g_return_val_if_fail(spool != NULL, NULL);
	r->spool = spool;
	r->scan_ms = MAX(scan_ms, 10);
	r->memory_max = AM_RUNNER_MEMORY_MAX;
	r->linger_us = AM_RUNNER_LINGER_MS * (gint64)1000;
	g_queue_init(&r->sleeping);
	g_mutex_init(&r->lock);
	g_cond_init(&r->cond);
	g_cond_init(&r->scan_cond);
	g_cond_init(&r->gone);
	r->due = g_sequence_new(NULL);
	r->jobs =
	    g_hash_table_new_full(g_str_hash, g_str_equal, NULL, job_free);
	r->workers = g_ptr_array_new();

	/* libmilter waits for SIGTERM, SIGHUP and SIGINT in a thread of
	 * its own with sigwait(), which works only when every other
	 * thread blocks them: a worker that took SIGTERM would end the
	 * process at once.  Threads inherit the mask they are made with. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	/* The first scan before any thread, and so before the caller can
	 * spool a copy: what it finds was left by an earlier run, whose
	 * originals' fate is known (settled, due at once).  Made by the
	 * scanner thread, it raced with the first puts, and a copy of a
	 * message not yet answered (whose original may still be refused)
	 * could go out at once. */
	scan(r);
	r->running = MAX(workers, 1);
	for (guint i = 0; i < MAX(workers, 1); i++)
		g_ptr_array_add(r->workers,
		                g_thread_new("am-worker", worker_main, r));
	r->scanner = g_thread_new("am-scanner", scanner_main, r);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	am_log_info("spool %s: %u worker(s)", am_spool_get_dir(spool),
	            r->workers->len);
	return r;
}

AmRunner *
am_runner_start(AmSpool *spool, guint workers, GError **error)
{
	return am_runner_start_full(spool, workers, AM_RUNNER_SCAN_MS, error);
}

void
am_runner_kick(AmRunner *runner, const char *id)
{
	Job *job;

	g_return_if_fail(runner != NULL && id != NULL);
	g_mutex_lock(&runner->lock);
	job = g_hash_table_lookup(runner->jobs, id);
	if (job == NULL)
		job = job_add(runner, id, g_get_real_time());
	job->settled = TRUE;
	if (job->busy)
		job->kicked = TRUE;
	else if (job->due > g_get_real_time())
		job_schedule(runner, job, g_get_real_time());
	g_mutex_unlock(&runner->lock);
}

void
am_runner_kick_copy(AmRunner *runner, AmSpoolEntry *entry, SmtpMessage *msg)
{
	guint64 size;
	Job *job;

	g_return_if_fail(runner != NULL && entry != NULL && msg != NULL);
	size = smtp_message_get_size(msg);
	g_mutex_lock(&runner->lock);
	job = g_hash_table_lookup(runner->jobs, entry->id);
	/* A job already known (a scan found the file first) or busy
	 * reads its file; so does a copy beyond the cap. */
	if (job == NULL && size <= runner->memory_max &&
	    runner->held <= runner->memory_max - size) {
		job = job_add(runner, entry->id,
		              g_get_real_time() + runner->linger_us);
		job->settled = TRUE;
		job->relay = g_strdup(entry->relay);
		job->size = size;
		job->entry = g_steal_pointer(&entry);
		job->msg = g_steal_pointer(&msg);
		job->msg_size = size;
		runner->held += size;
	} else if (job == NULL) {
		runner->stats.over_cap++;
	}
	g_mutex_unlock(&runner->lock);
	if (msg == NULL)
		return;
	/* Not taken: an ordinary kick, the copy read from its file. */
	am_runner_kick(runner, entry->id);
	am_spool_entry_free(entry);
	smtp_message_free(msg);
}

void
am_runner_set_memory_max(AmRunner *runner, guint64 octets)
{
	g_mutex_lock(&runner->lock);
	runner->memory_max = octets;
	g_mutex_unlock(&runner->lock);
}

void
am_runner_set_linger_ms(AmRunner *runner, guint ms)
{
	g_mutex_lock(&runner->lock);
	runner->linger_us = (gint64)ms * 1000;
	g_mutex_unlock(&runner->lock);
}

void
am_runner_get_stats(AmRunner *runner, AmRunnerStats *stats)
{
	g_mutex_lock(&runner->lock);
	*stats = runner->stats;
	g_mutex_unlock(&runner->lock);
}

gboolean
am_runner_stop_within(AmRunner *runner, gint64 grace_ms, guint *busy)
{
	gint64 until = g_get_monotonic_time() + MAX(grace_ms, 0) * 1000;
	guint left;

	if (runner == NULL)
		return TRUE;
	g_mutex_lock(&runner->lock);
	runner->stopping = TRUE;
	g_cond_broadcast(&runner->cond);
	g_cond_broadcast(&runner->scan_cond);
	while (runner->running > 0) {
		if (grace_ms < 0)
			g_cond_wait(&runner->gone, &runner->lock);
		else if (!g_cond_wait_until(&runner->gone, &runner->lock,
		                            until))
			break;
	}
	left = runner->running;
	g_mutex_unlock(&runner->lock);
	if (busy != NULL)
		*busy = left;
	if (left > 0)
		return FALSE;

	g_thread_join(runner->scanner);
	for (guint i = 0; i < runner->workers->len; i++)
		g_thread_join(runner->workers->pdata[i]);
	g_ptr_array_unref(runner->workers);
	g_sequence_free(runner->due);
	g_hash_table_unref(runner->jobs);
	g_mutex_clear(&runner->lock);
	g_cond_clear(&runner->cond);
	g_cond_clear(&runner->scan_cond);
	g_cond_clear(&runner->gone);
	g_free(runner);
	return TRUE;
}

void
am_runner_stop(AmRunner *runner)
{
	am_runner_stop_within(runner, -1, NULL);
}
