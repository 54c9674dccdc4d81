/*
 * deliver.c - delivery of one copy, its outcome, and the relay pool
 *
 * Status per address follows Postfix: "sent", "deferred" for anything a
 * retry may fix (4xx, no connection, time-out, lost connection),
 * "bounced" for a permanent refusal.  The dsn is the relay's enhanced
 * code, else one derived from the reply class, else from the failure.
 *
 * The outcome of the copy as a whole (AmOutcome, for the policy table)
 * is classified from the library's result or error exactly as conf.h
 * documents it; "temporary" is smtp_error_is_temporary() for an error
 * (a protocol error and a reply out of step are temporary there), and
 * for a result with refused addresses whether any refusal was 4xx.
 * The reply that decided the outcome is kept for a reject.  Where the
 * library calls an error temporary although the relay's reply was 5xx
 * (a 554 greeting is SMTP_ERROR_CONNECT), the library's word stands:
 * the relay refused service, and retrying it later is the safe side.
 *
 * Each SmtpClient gets the relay's TLS level, CA file, credentials and
 * stage time limits as the configuration resolved them.
 *
 * The pool keeps connections open between copies, as Postfix's
 * connection cache does: at most max_idle idle ones per relay, keyed on
 * everything that shapes a session (host, port, TLS level, CA file,
 * user, a digest of the password, plaintext permission, HELO name), so
 * a changed configuration never reuses a session set up under the old
 * one.  A connection taken from the pool after more than check_after
 * idle is checked with RSET first (what Postfix's smtp_rset_timeout is
 * for): a relay that closed it while idle shows there, and the copy
 * goes over a new connection instead, once.  One used moments ago goes
 * without RSET, saving a round trip per copy under load; if it turns
 * out dead at MAIL, RCPT or DATA (closed, 421, a reply unasked), before
 * any octet of the message went out, the copy goes over a new
 * connection the same way.  After a refusal the library has already
 * sent RSET; a connection the library closed (time-out, lost
 * connection, protocol error) is not returned.  A janitor thread
 * closes (QUIT) connections idle longer than idle_ms.  Idle
 * connections are closed in batches, each batch within POOL_QUIT_MS
 * together (pool_close_all), so that a relay that stalls on QUIT holds
 * up neither the janitor nor a stop.
 *
 * copy_deadline bounds a whole copy, because the MTA is waiting: Postfix
 * gives a milter 300 s (milter_content_timeout) before it gives up on
 * it.  It is the library's hard deadline (smtp_client_set_deadline) on
 * every wait of the copy, from the RSET of a pooled connection or the
 * connect to the final reply, so a relay that answers each command just
 * inside its stage limit still cannot hold a copy past it; the copy is
 * then a time-out.  A caller may give an earlier deadline (the
 * message's, which all synchronous copies of one message share, see
 * milter.c); the earlier one applies, and a copy left with no time is a
 * time-out at once.  A connection closed at the end of a copy without a
 * pool says QUIT under the same deadline; one kept in the pool has it
 * removed, so that the janitor's QUIT is not cut.
 *
 * am_deliver_batch sends several copies for one relay over one
 * connection, each envelope behind the previous end marker when the
 * relay pipelines (smtp_client_send_batch_full); am_deliver is a batch
 * of one, so a copy ends the same way alone or in a batch.  As each
 * copy ends, the next one's deadline is set from that moment, and its
 * delay counts from there.  Only a failed first connect is shared: it
 * fails every copy of the batch alike.
 *
 * Known limits: XXX: name resolution (getaddrinfo) is outside the
 * deadline, as the library documents; a relay configured by a name
 * whose resolver hangs can hold a copy past it.  `archive-milter
 * --check` warns when the stage limits add up past Postfix's 300 s.
 */
#include <pthread.h>
#include <signal.h>
#include <string.h>

#include "deliver.h"

static void
rcpt_outcome_free(gpointer data)
{
	AmRcptOutcome *o = data;

	g_free(o->address);
	g_free(o->dsn);
	g_free(o->reply);
	g_free(o);
}

void
am_delivery_log(const AmDelivery *d, const char *queue_id)
{
	for (guint i = 0; i < d->rcpts->len; i++) {
		const AmRcptOutcome *o = d->rcpts->pdata[i];
		AmLogDelivery line = {
		    .queue_id = queue_id,
		    .address = o->address,
		    .relay = d->relay,
		    .delay = d->delay,
		    .dsn = o->dsn,
		    .status = o->status,
		    .reply = o->reply,
		};

		am_log_delivery(&line);
	}
}

void
am_delivery_free(AmDelivery *d)
{
	if (d == NULL)
		return;
	g_free(d->relay);
	g_ptr_array_unref(d->rcpts);
	g_free(d->reason);
	smtp_reply_clear(&d->reply);
	g_free(d);
}

/* "CODE X.Y.Z text" on one line; multi-line text joined by spaces. */
static char *
reply_format(const SmtpReply *reply)
{
	GString *out = g_string_new(NULL);
	const char *p;

	g_string_append_printf(out, "%03d", reply->code);
	if (reply->enhanced != NULL)
		g_string_append_printf(out, " %s", reply->enhanced);
	if (reply->text != NULL && *reply->text != '\0') {
		g_string_append_c(out, ' ');
		for (p = reply->text; *p != '\0'; p++)
			g_string_append_c(out, *p == '\n' ? ' ' : *p);
	}
	return g_string_free(out, FALSE);
}

/* The library keeps an enhanced code only when it is well formed and
 * of the reply's class, so it can go into the log as it is. */
static char *
reply_dsn(const SmtpReply *reply)
{
	if (reply->enhanced != NULL)
		return g_strdup(reply->enhanced);
	return g_strdup_printf("%d.0.0", reply->code / 100);
}

static AmStatus
reply_status(const SmtpReply *reply)
{
	if (reply->code >= 200 && reply->code < 300)
		return AM_STATUS_SENT;
	if (reply->code >= 400 && reply->code < 500)
		return AM_STATUS_DEFERRED;
	return AM_STATUS_BOUNCED;
}

static AmRcptOutcome *
outcome_new(const char *address, AmStatus status, char *dsn, char *reply)
{
	AmRcptOutcome *o = g_new0(AmRcptOutcome, 1);

	o->address = g_strdup(address);
	o->status = status;
	o->dsn = dsn;
	o->reply = reply;
	return o;
}

/* The outcome of a recipient the relay answered on its own. */
static AmRcptOutcome *
outcome_from_reply(const char *address, const SmtpReply *reply,
                   const char *stage)
{
	g_autofree char *text = reply_format(reply);
	char *full = stage ? g_strdup_printf("%s (in reply to %s)", text, stage)
	                   : g_steal_pointer(&text);

	return outcome_new(address, reply_status(reply), reply_dsn(reply),
	                   full);
}

/*
 * A protocol error (a garbage or NUL reply, a code out of range, a code
 * changing inside a reply, more replies than commands) or a reply out
 * of step (250 to DATA): nothing lasting about the copy, only that
 * this session went wrong (a broken relay, a middlebox, a bad
 * restart).  The library calls both temporary, as Postfix's smtp(8)
 * defers on them; here they also pick the outcome.
 */
static gboolean
out_of_step(const GError *error)
{
	const SmtpReply *reply;

	if (error == NULL || error->domain != SMTP_ERROR)
		return FALSE;
	if (error->code == SMTP_ERROR_PROTOCOL)
		return TRUE;
	/* A command "refused" with a 1xx to 3xx reply (250 to DATA) was
	 * not refused: the relay answered out of step. */
	reply = smtp_error_get_reply(error);
	return reply != NULL && reply->code > 0 && reply->code < 400;
}

/* Whether a retry may succeed: the library's word, the one smtp-send
 * goes by too. */
static gboolean
error_is_temporary(const GError *error)
{
	return smtp_error_is_temporary(error);
}

/* The dsn of an error that came without a reply (RFC 3463). */
static const char *
error_dsn(const GError *error, gboolean temporary)
{
	if (out_of_step(error))
		return "4.5.0"; /* other or undefined protocol status */
	switch (error->code) {
	case SMTP_ERROR_CONNECT:
		return "4.4.1"; /* no answer from host */
	case SMTP_ERROR_TIMEOUT:
	case SMTP_ERROR_DISCONNECTED:
		return "4.4.2"; /* bad connection */
	case SMTP_ERROR_NOT_SUPPORTED:
		return "5.6.7"; /* RFC 6531: SMTPUTF8 required */
	case SMTP_ERROR_TLS:
		return temporary ? "4.7.5" : "5.7.5";
	case SMTP_ERROR_AUTH:
		/* security policy: e.g. no AUTH offered, or not over TLS */
		return temporary ? "4.7.0" : "5.7.0";
	default:
		return temporary ? "4.0.0" : "5.0.0";
	}
}

/* One outcome for every address, from an error that hit them all. */
static AmRcptOutcome *
outcome_from_error(const char *address, const GError *error)
{
	const SmtpReply *reply = smtp_error_get_reply(error);
	gboolean temporary = error_is_temporary(error);
	AmStatus status = temporary ? AM_STATUS_DEFERRED : AM_STATUS_BOUNCED;

	/* A reply out of step (a 5xx to the wrong command, a code changing
	 * inside a reply) is no answer to the copy: the error says what
	 * went wrong, with a 4.X.X dsn. */
	if (reply != NULL && reply->code >= 400 && reply->code < 600 &&
	    !out_of_step(error)) {
		AmRcptOutcome *o = outcome_from_reply(
		    address, reply, smtp_error_get_stage(error));

		/* The library knows better than the class (e.g. 421). */
		o->status = status;
		return o;
	}
	return outcome_new(address, status,
	                   g_strdup(error_dsn(error, temporary)),
	                   g_strdup(error->message));
}

static const SmtpRefusal *
find_refusal(const GPtrArray *refused, const char *address)
{
	guint i;

	for (i = 0; refused != NULL && i < refused->len; i++) {
		const SmtpRefusal *r = refused->pdata[i];

		if (strcmp(r->recipient, address) == 0)
			return r;
	}
	return NULL;
}

static AmRcptOutcome *
outcome_for(const char *address, const SmtpResult *result, const GError *error)
{
	const GPtrArray *refused =
	    result ? result->refused : smtp_error_get_refused(error);
	const SmtpRefusal *r = find_refusal(refused, address);

	if (r != NULL)
		return outcome_from_reply(address, &r->reply, "rcpt");
	if (result != NULL)
		return outcome_from_reply(address, &result->reply, NULL);
	return outcome_from_error(address, error);
}

/* Worst first: deferred outranks bounced, since a retry may fix it. */
static void
delivery_summarize(AmDelivery *d)
{
	guint i;

	d->status = AM_STATUS_SENT;
	for (i = 0; i < d->rcpts->len; i++) {
		AmRcptOutcome *o = d->rcpts->pdata[i];

		if (o->status == AM_STATUS_SENT)
			continue;
		if (d->reason == NULL)
			d->reason = g_strdup(o->reply);
		if (d->status != AM_STATUS_DEFERRED)
			d->status = o->status;
	}
}

static void
reply_copy(SmtpReply *dst, const SmtpReply *src)
{
	dst->code = src->code;
	dst->enhanced = g_strdup(src->enhanced);
	dst->text = g_strdup(src->text ? src->text : "");
}

/* The outcome of an error, as conf.h defines AmOutcome. */
static AmOutcome
error_outcome(const GError *error)
{
	if (error->domain != SMTP_ERROR)
		return AM_OUTCOME_DATA_ERROR; /* not the relay's doing */
	if (out_of_step(error))
		return AM_OUTCOME_UNREACHABLE; /* as PROTOCOL below */
	switch ((SmtpErrorCode)error->code) {
	case SMTP_ERROR_RECIPIENTS_REFUSED:
		return AM_OUTCOME_ALL_REFUSED;
	case SMTP_ERROR_SENDER_REFUSED:
		return AM_OUTCOME_SENDER_REFUSED;
	case SMTP_ERROR_DATA:
	case SMTP_ERROR_NOT_SUPPORTED:
	case SMTP_ERROR_INPUT:
		/* The relay cannot take this copy (SMTPUTF8), or we could
		 * not read it: a problem of the message, not the relay. */
		return AM_OUTCOME_DATA_ERROR;
	case SMTP_ERROR_TIMEOUT:
		return AM_OUTCOME_TIMEOUT;
	case SMTP_ERROR_TLS:
		return AM_OUTCOME_TLS_ERROR;
	case SMTP_ERROR_CONNECT:
	case SMTP_ERROR_DISCONNECTED:
	case SMTP_ERROR_HELO:
	case SMTP_ERROR_AUTH:
	case SMTP_ERROR_PROTOCOL:
	default:
		return AM_OUTCOME_UNREACHABLE;
	}
}

/*
 * The refusal that speaks for the copy: the first one of the class the
 * copy's "temporary" names, so that a reject quotes a 5xx when there is
 * one and a tempfail a 4xx.
 */
static const SmtpRefusal *
deciding_refusal(const GPtrArray *refused, gboolean temporary)
{
	guint i;

	for (i = 0; refused != NULL && i < refused->len; i++) {
		const SmtpRefusal *r = refused->pdata[i];

		if ((r->reply.code / 100 == 4) == temporary)
			return r;
	}
	return refused != NULL && refused->len > 0 ? refused->pdata[0] : NULL;
}

static gboolean
any_temporary(const GPtrArray *refused)
{
	guint i;

	for (i = 0; refused != NULL && i < refused->len; i++) {
		const SmtpRefusal *r = refused->pdata[i];

		if (r->reply.code / 100 == 4)
			return TRUE;
	}
	return FALSE;
}

/* Outcome, temporary and the deciding reply of a finished send. */
static void
delivery_classify(AmDelivery *d, const SmtpResult *result, const GError *error)
{
	const SmtpRefusal *r;
	const SmtpReply *reply;

	if (result != NULL && result->refused->len == 0) {
		d->outcome = AM_OUTCOME_SENT;
		d->temporary = FALSE;
		reply_copy(&d->reply, &result->reply);
		return;
	}
	if (result != NULL) {
		d->outcome = AM_OUTCOME_SOME_REFUSED;
		d->temporary = any_temporary(result->refused);
		r = deciding_refusal(result->refused, d->temporary);
		reply_copy(&d->reply, &r->reply);
		return;
	}
	d->outcome = error_outcome(error);
	d->temporary = error_is_temporary(error);
	/* Only when every recipient was refused does a refusal decide; a
	 * later error (DATA, end of data) speaks for the copy itself. */
	r = g_error_matches(error, SMTP_ERROR, SMTP_ERROR_RECIPIENTS_REFUSED)
	        ? deciding_refusal(smtp_error_get_refused(error), d->temporary)
	        : NULL;
	reply = r != NULL ? &r->reply : smtp_error_get_reply(error);
	if (reply != NULL && reply->code != 0)
		reply_copy(&d->reply, reply);
}

AmDelivery *
am_delivery_from_result(const char *const *to, const char *relay, double delay,
                        const SmtpResult *result, const GError *error)
{
	AmDelivery *d = g_new0(AmDelivery, 1);

	d->relay = g_strdup(relay ? relay : "none");
	d->delay = delay;
	d->rcpts = g_ptr_array_new_with_free_func(rcpt_outcome_free);
	if (result == NULL && error == NULL) {
		/* Misuse: count it as a failure, never as sent. */
		g_critical("am_delivery_from_result: no result, no error");
		d->status = AM_STATUS_DEFERRED;
		d->outcome = AM_OUTCOME_DATA_ERROR;
		d->temporary = TRUE;
		d->reason = g_strdup("internal error: no result");
		return d;
	}
	for (; *to != NULL; to++)
		g_ptr_array_add(d->rcpts, outcome_for(*to, result, error));
	delivery_summarize(d);
	delivery_classify(d, result, error);
	return d;
}

/* ------------------------------------------------------------------ */
/* Time limits                                                          */
/* ------------------------------------------------------------------ */

/* The relay's stage limits, and the copy's deadline (copy_deadline_ms
 * or the message's, see am_deliver) as the library's hard limit on
 * every wait (0: none). */
static void
client_set_limits(SmtpClient *client, const AmRelay *relay, gint64 deadline)
{
	smtp_client_set_timeouts(client, &relay->timeouts);
	smtp_client_set_deadline(client, deadline);
}

/* The earlier of the relay's copy_deadline counted from @start and the
 * caller's @req_deadline; 0 when neither is set. */
static gint64
copy_deadline(const AmRelay *relay, gint64 start, gint64 req_deadline)
{
	gint64 own = relay->copy_deadline_ms > 0
	                 ? start + (gint64)relay->copy_deadline_ms * 1000
	                 : 0;

	if (req_deadline <= 0)
		return own;
	return own > 0 ? MIN(own, req_deadline) : req_deadline;
}

/* ------------------------------------------------------------------ */
/* The pool                                                             */
/* ------------------------------------------------------------------ */

typedef struct {
	SmtpClient *client;
	char *key;
	gint64 idle_since;  /* monotonic, microseconds */
	gboolean unchecked; /* taken from the pool without RSET */
} PoolConn;

struct AmPool {
	GMutex lock;
	GCond wake;       /* janitor: a connection came back, or stop */
	GHashTable *idle; /* key -> GQueue of PoolConn *, newest at head */
	guint max_idle;   /* per key */
	gint64 idle_us;   /* idle time before the janitor closes one */
	gint64 check_us;  /* idle longer than this: RSET before use */
	gboolean stopping;
	GThread *janitor;
};

static void
pool_conn_close(PoolConn *pc)
{
	if (pc == NULL)
		return;
	smtp_client_free(pc->client); /* QUIT when still connected */
	g_free(pc->key);
	g_free(pc);
}

/*
 * Close idle connections (PoolConn *) and free @conns, all of them
 * within POOL_QUIT_MS together: QUIT is a courtesy, and a stalled relay
 * must not hold up the janitor, nor the daemon's stop (am_pool_free),
 * for the library's own QUIT limit per connection.  Once the common
 * deadline has passed, the rest are closed without QUIT.
 */
#define POOL_QUIT_MS 1000

static void
pool_close_all_by(GPtrArray *conns, gint64 deadline)
{
	guint i;

	for (i = 0; i < conns->len; i++) {
		PoolConn *pc = conns->pdata[i];

		smtp_client_set_deadline(pc->client, deadline);
		pool_conn_close(pc);
	}
	g_ptr_array_unref(conns);
}

static void
pool_close_all(GPtrArray *conns)
{
	pool_close_all_by(conns,
	                  g_get_monotonic_time() + (gint64)POOL_QUIT_MS * 1000);
}

/*
 * Everything that shapes a session, as one string.  The password is in
 * only as a digest, so the key can sit in memory without the secret.
 */
static char *
pool_key(const AmRelay *relay)
{
	g_autofree char *pw = NULL;

	if (relay->auth_password != NULL)
		pw = g_compute_checksum_for_string(G_CHECKSUM_SHA256,
		                                   relay->auth_password, -1);
	return g_strdup_printf("%s\n%u\n%d\n%s\n%s\n%s\n%d\n%s", relay->host,
	                       relay->port, (int)relay->tls,
	                       relay->ca_file ? relay->ca_file : "",
	                       relay->auth_user ? relay->auth_user : "",
	                       pw ? pw : "", relay->auth_plaintext ? 1 : 0,
	                       relay->helo_name ? relay->helo_name : "");
}

/* Under the lock: move every connection idle too long to @out. */
static void
pool_collect_expired(AmPool *pool, gint64 now, GPtrArray *out,
                     gint64 *next_expiry)
{
	GHashTableIter iter;
	gpointer value;

	*next_expiry = G_MAXINT64;
	g_hash_table_iter_init(&iter, pool->idle);
	while (g_hash_table_iter_next(&iter, NULL, &value)) {
		GQueue *q = value;
		PoolConn *pc;

		/* Oldest at the tail. */
		while ((pc = g_queue_peek_tail(q)) != NULL &&
		       pc->idle_since + pool->idle_us <= now)
			g_ptr_array_add(out, g_queue_pop_tail(q));
		if (pc != NULL)
			*next_expiry =
			    MIN(*next_expiry, pc->idle_since + pool->idle_us);
		if (g_queue_is_empty(q))
			g_hash_table_iter_remove(&iter);
	}
}

/* The janitor: QUIT outside the lock, since it waits on the relay. */
static gpointer
pool_janitor(gpointer data)
{
	AmPool *pool = data;

	g_mutex_lock(&pool->lock);
	while (!pool->stopping) {
		GPtrArray *expired = g_ptr_array_new();
		gint64 next;

		pool_collect_expired(pool, g_get_monotonic_time(), expired,
		                     &next);
		if (expired->len > 0) {
			g_mutex_unlock(&pool->lock);
			am_log_debug("pool: closing %u idle connection(s)",
			             expired->len);
			pool_close_all(expired);
			g_mutex_lock(&pool->lock);
			continue;
		}
		g_ptr_array_unref(expired);
		if (next == G_MAXINT64)
			g_cond_wait(&pool->wake, &pool->lock);
		else
			g_cond_wait_until(&pool->wake, &pool->lock, next);
	}
	g_mutex_unlock(&pool->lock);
	return NULL;
}

static void
pool_queue_free(gpointer data)
{
	g_queue_free_full(data, (GDestroyNotify)pool_conn_close);
}

/*
 * libmilter takes SIGTERM, SIGHUP and SIGINT with sigwait() in a thread
 * of its own, having blocked them in the thread that calls smfi_main();
 * a thread of ours started before that would inherit an open mask and
 * receive SIGTERM itself, which kills the process.  So ours start with
 * every signal blocked, whenever they start.
 */
static GThread *
thread_new_without_signals(const char *name, GThreadFunc func, gpointer data)
{
	sigset_t all, old;
	GThread *thread;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	thread = g_thread_new(name, func, data);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return thread;
}

AmPool *
am_pool_new(guint max_idle, guint idle_ms)
{
	AmPool *pool = g_new0(AmPool, 1);

	g_mutex_init(&pool->lock);
	g_cond_init(&pool->wake);
	pool->idle = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
	                                   pool_queue_free);
	pool->max_idle = max_idle;
	pool->idle_us = (gint64)MAX(idle_ms, 1) * 1000;
	pool->check_us = (gint64)AM_POOL_CHECK_AFTER_MS * 1000;
	if (max_idle > 0)
		pool->janitor = thread_new_without_signals("am-pool-janitor",
		                                           pool_janitor, pool);
	return pool;
}

void
am_pool_free(AmPool *pool)
{
	GPtrArray *idle;
	GHashTableIter iter;
	gpointer value;
	PoolConn *pc;
	gint64 deadline;

	if (pool == NULL)
		return;
	/* Every idle connection taken now, to be closed within one short
	 * bound counted from now; the janitor's batch, if it is closing
	 * one, has a bound as short, so the two overlap. */
	idle = g_ptr_array_new();
	g_mutex_lock(&pool->lock);
	pool->stopping = TRUE;
	g_cond_signal(&pool->wake);
	g_hash_table_iter_init(&iter, pool->idle);
	while (g_hash_table_iter_next(&iter, NULL, &value))
		while ((pc = g_queue_pop_head(value)) != NULL)
			g_ptr_array_add(idle, pc);
	g_mutex_unlock(&pool->lock);
	deadline = g_get_monotonic_time() + (gint64)POOL_QUIT_MS * 1000;
	if (pool->janitor != NULL)
		g_thread_join(pool->janitor);
	if (idle->len > 0)
		am_log_debug("pool: closing %u idle connection(s)", idle->len);
	pool_close_all_by(idle, deadline);
	g_hash_table_destroy(pool->idle);
	g_cond_clear(&pool->wake);
	g_mutex_clear(&pool->lock);
	g_free(pool);
}

void
am_pool_set_check_after(AmPool *pool, guint ms)
{
	g_mutex_lock(&pool->lock);
	pool->check_us = (gint64)ms * 1000;
	g_mutex_unlock(&pool->lock);
}

/* The newest idle connection for @key, or NULL; expired ones are left
 * to the janitor, which may not have run yet: skip those. */
static PoolConn *
pool_take(AmPool *pool, const char *key)
{
	gint64 now = g_get_monotonic_time();
	GPtrArray *stale;
	PoolConn *pc = NULL;
	GQueue *q;

	if (pool == NULL || pool->max_idle == 0)
		return NULL;
	stale = g_ptr_array_new();
	g_mutex_lock(&pool->lock);
	q = g_hash_table_lookup(pool->idle, key);
	while (q != NULL && (pc = g_queue_pop_head(q)) != NULL &&
	       pc->idle_since + pool->idle_us <= now) {
		g_ptr_array_add(stale, pc);
		pc = NULL;
	}
	if (q != NULL && g_queue_is_empty(q))
		g_hash_table_remove(pool->idle, key);
	if (pc != NULL)
		pc->unchecked = pc->idle_since + pool->check_us > now;
	g_mutex_unlock(&pool->lock);
	pool_close_all(stale);
	return pc;
}

/* Keep @pc for the next copy, or close it when the pool is full or the
 * library closed it. */
static void
pool_give(AmPool *pool, PoolConn *pc)
{
	GQueue *q;

	if (pool == NULL || pool->max_idle == 0 ||
	    !smtp_client_is_connected(pc->client)) {
		pool_conn_close(pc);
		return;
	}
	g_mutex_lock(&pool->lock);
	q = g_hash_table_lookup(pool->idle, pc->key);
	if (q == NULL) {
		q = g_queue_new();
		g_hash_table_insert(pool->idle, g_strdup(pc->key), q);
	}
	if (q->length < pool->max_idle) {
		/* The copy's deadline must not cut the janitor's QUIT. */
		smtp_client_set_deadline(pc->client, 0);
		pc->idle_since = g_get_monotonic_time();
		g_queue_push_head(q, pc);
		pc = NULL;
		g_cond_signal(&pool->wake);
	}
	g_mutex_unlock(&pool->lock);
	pool_conn_close(pc); /* full: NULL when kept */
}

/* ------------------------------------------------------------------ */
/* One copy                                                             */
/* ------------------------------------------------------------------ */

/* No TCP connection means "relay=none", as Postfix logs it. */
static const char *
relay_name(SmtpClient *client, const GError *error)
{
	const char *stage = error ? smtp_error_get_stage(error) : NULL;

	if (error != NULL && g_strcmp0(stage, "connect") == 0)
		return "none";
	/* Our own deadline error has no stage: was there a session? */
	if (error != NULL && stage == NULL && !smtp_client_is_connected(client))
		return "none";
	return smtp_client_get_peer(client);
}

static SmtpClient *
client_new(const AmRelay *relay)
{
	SmtpClient *client = smtp_client_new(relay->host, relay->port);

	if (relay->helo_name != NULL)
		smtp_client_set_helo_name(client, relay->helo_name);
	smtp_client_set_tls(client, relay->tls, relay->ca_file);
	if (relay->auth_user != NULL)
		smtp_client_set_auth(client, relay->auth_user,
		                     relay->auth_password,
		                     relay->auth_plaintext);
	return client;
}

/* A new connection to @relay; on failure @error says so, and the
 * result stays for the peer's name. */
static PoolConn *
connection_new(const AmRelay *relay, gint64 deadline, GError **error)
{
	PoolConn *pc = g_new0(PoolConn, 1);

	pc->client = client_new(relay);
	pc->key = pool_key(relay);
	client_set_limits(pc->client, relay, deadline);
	smtp_client_connect(pc->client, error);
	return pc;
}

/*
 * A connection ready for MAIL: a pooled one, else a new one.  One idle
 * for less than the pool's check_after goes as it is (unchecked: see
 * stale_unchecked); an older one must answer RSET first.  A pooled
 * connection that fails RSET (the relay closed it while idle, or said
 * 421) is closed and replaced, once: that failure is the pool's, not
 * the relay's, and costs the copy nothing.
 */
static PoolConn *
connection_get(AmPool *pool, const AmRelay *relay, gint64 deadline,
               GError **error)
{
	g_autofree char *key = pool_key(relay);
	g_autoptr(GError) stale = NULL;
	PoolConn *pc = NULL;

	/* No time left: a new client fails at once with the library's
	 * TIMEOUT ("before connecting"), and a good idle connection is not
	 * spent on a RSET that cannot be answered in time. */
	if (deadline <= 0 || g_get_monotonic_time() < deadline)
		pc = pool_take(pool, key);

	if (pc != NULL) {
		client_set_limits(pc->client, relay, deadline);
		if (pc->unchecked || smtp_client_rset(pc->client, &stale))
			return pc;
		am_log_debug("pool: %s: idle connection unusable (%s); "
		             "connecting again",
		             relay->name, stale->message);
		pool_conn_close(pc);
	}
	return connection_new(relay, deadline, error);
}

/*
 * Whether @error, from a transaction on a pooled connection that went
 * without RSET, says only that the connection had died while idle:
 * the relay closed it or said 421 (DISCONNECTED), or left a reply
 * unasked (PROTOCOL: the library saw bytes waiting before it spoke),
 * at MAIL, RCPT or DATA, before any octet of the message went out.
 * Nothing can have been delivered then, so the copy goes over a new
 * connection, once, as a failed RSET would have sent it.
 */
static gboolean
stale_unchecked(const PoolConn *pc, const GError *error)
{
	const char *stage;

	if (!pc->unchecked || error == NULL || error->domain != SMTP_ERROR ||
	    (error->code != SMTP_ERROR_DISCONNECTED &&
	     error->code != SMTP_ERROR_PROTOCOL))
		return FALSE;
	stage = smtp_error_get_stage(error);
	return g_strcmp0(stage, "mail") == 0 || g_strcmp0(stage, "rcpt") == 0 ||
	       g_strcmp0(stage, "data") == 0;
}

static void
warn_dropped(const AmRelay *relay, const GPtrArray *dropped)
{
	guint i;

	for (i = 0; dropped != NULL && i < dropped->len; i++)
		am_log_warning("relay %s does not advertise %s; copy sent "
		               "without it",
		               relay->name, (const char *)dropped->pdata[i]);
}

/* The library's jobs for a batch, the arrays they point into, and
 * when each ended. */
typedef struct {
	const AmCopyRequest *reqs;
	PoolConn *pc; /* while it is sent */
	SmtpJob *jobs;
	const char **options; /* 3 per job: up to 2 and NULL */
	SmtpRecipient *rcpts; /* every job's, one after the other */
	gint64 *ended;        /* monotonic µs */
	gint64 start;         /* when the batch began */
	gint64 retried;       /* µs the first copy's second try took */
	GError *conn_error;   /* no connection could be made */
	GPtrArray *out;       /* AmDelivery * per copy, NULL until known */
	AmCopyDone done;      /* the caller's, or NULL */
	gpointer done_data;
	gboolean first_again; /* the first copy goes again (stale_unchecked) */
	gboolean stopped;     /* @done ended the batch */
	guint n;
} Batch;

static void
batch_init(Batch *b, const AmCopyRequest *reqs, guint n)
{
	guint total = 0, at = 0;

	for (guint i = 0; i < n; i++)
		total += g_strv_length((char **)reqs[i].to);
	b->reqs = reqs;
	b->pc = NULL;
	b->start = g_get_monotonic_time();
	b->retried = 0;
	b->conn_error = NULL;
	b->out = g_ptr_array_new_full(n, (GDestroyNotify)am_delivery_free);
	g_ptr_array_set_size(b->out, n);
	b->done = NULL;
	b->done_data = NULL;
	b->first_again = b->stopped = FALSE;
	b->n = n;
	b->ended = g_new0(gint64, n);
	b->jobs = g_new0(SmtpJob, n);
	b->options = g_new0(const char *, 3 * n);
	b->rcpts = g_new0(SmtpRecipient, MAX(total, 1));
	for (guint i = 0; i < n; i++) {
		const char **options = &b->options[3 * i];
		guint n_to = g_strv_length((char **)reqs[i].to);
		guint k = 0;

		/* The copy keeps the original's needs; the library drops
		 * BODY when unadvertised and refuses an unadvertised
		 * SMTPUTF8. */
		if (reqs[i].smtputf8)
			options[k++] = "SMTPUTF8";
		if (reqs[i].eightbit)
			options[k++] = "BODY=8BITMIME";
		b->jobs[i] = (SmtpJob){.from = reqs[i].from,
		                       .mail_options = options,
		                       .rcpts = &b->rcpts[at],
		                       .n_rcpts = n_to,
		                       .msg = reqs[i].msg};
		for (k = 0; k < n_to; k++)
			b->rcpts[at++].address = reqs[i].to[k];
	}
}

static void
batch_clear(Batch *b)
{
	for (guint i = 0; i < b->n; i++) {
		smtp_result_free(b->jobs[i].result);
		g_clear_error(&b->jobs[i].error);
	}
	g_clear_error(&b->conn_error);
	g_clear_pointer(&b->out, g_ptr_array_unref);
	g_free(b->jobs);
	g_free(b->ended);
	g_free(b->options);
	g_free(b->rcpts);
}

/* Copy @i's outcome, told to the caller's @done; FALSE when it ends
 * the batch. */
static gboolean
batch_report(Batch *b, guint i)
{
	const AmRelay *relay = b->reqs[i].relay;
	const GError *e =
	    b->conn_error != NULL ? b->conn_error : b->jobs[i].error;
	const SmtpResult *res =
	    b->conn_error != NULL ? NULL : b->jobs[i].result;
	gint64 began =
	    i == 0 || b->conn_error != NULL ? b->start : b->ended[i - 1];
	double delay = (b->ended[i] - began + (i == 0 ? b->retried : 0)) /
	               (double)G_USEC_PER_SEC;
	AmDelivery *d;

	warn_dropped(relay, res != NULL ? res->dropped_options
	                                : smtp_error_get_dropped_options(e));
	d = am_delivery_from_result(b->reqs[i].to, relay_name(b->pc->client, e),
	                            delay, res, e);
	b->out->pdata[i] = d;
	if (b->done == NULL || b->done(i, d, b->done_data))
		return TRUE;
	b->stopped = TRUE;
	return FALSE;
}

/* A copy of the batch has its outcome: when, for its delay; the
 * caller told at once (but for a first copy that goes again on a new
 * connection, see stale_unchecked); and the next copy's deadline,
 * counted from now as if it went alone. */
static gboolean
batch_job_done(SmtpJob *jobs, gsize index, gpointer data)
{
	Batch *b = data;
	gint64 now = g_get_monotonic_time();

	b->ended[index] = now;
	if (index == 0 && stale_unchecked(b->pc, jobs[0].error))
		b->first_again = TRUE;
	else if (!batch_report(b, index))
		return FALSE;
	if (index + 1 < b->n)
		smtp_client_set_deadline(
		    b->pc->client, copy_deadline(b->reqs[index + 1].relay, now,
		                                 b->reqs[index + 1].deadline));
	return TRUE;
}

/* The first copy of @b again, alone, on the client's next connection;
 * the µs it took, which count in its delay too. */
static gint64
batch_retry_first(Batch *b)
{
	gint64 now = g_get_monotonic_time();

	g_clear_error(&b->jobs[0].error);
	smtp_client_set_deadline(
	    b->pc->client,
	    copy_deadline(b->reqs[0].relay, now, b->reqs[0].deadline));
	smtp_client_send_batch_full(b->pc->client, b->jobs, 1, NULL, NULL);
	return g_get_monotonic_time() - now;
}

GPtrArray *
am_deliver_batch(AmPool *pool, const AmCopyRequest *reqs, guint n)
{
	return am_deliver_batch_full(pool, reqs, n, NULL, NULL);
}

GPtrArray *
am_deliver_batch_full(AmPool *pool, const AmCopyRequest *reqs, guint n,
                      AmCopyDone done, gpointer data)
{
	const AmRelay *relay;
	GPtrArray *out;
	Batch b;

	g_return_val_if_fail(reqs != NULL && n > 0, NULL);
	relay = reqs[0].relay;
	for (guint i = 1; i < n; i++)
		g_return_val_if_fail(reqs[i].relay == relay, NULL);

	/* Step 1: a connection.  One that cannot be made fails every copy
	 * alike: trying again at once for each would only wait as long
	 * again for the same answer. */
	batch_init(&b, reqs, n);
	b.done = done;
	b.done_data = data;
	b.pc = connection_get(pool, relay,
	                      copy_deadline(relay, b.start, reqs[0].deadline),
	                      &b.conn_error);
	if (b.conn_error != NULL) {
		for (guint i = 0; i < n; i++) {
			b.ended[i] = g_get_monotonic_time();
			if (!batch_report(&b, i))
				break;
		}
		goto out;
	}

	/* Step 2: the copies, each one's envelope behind the previous
	 * one's end marker when the relay pipelines, each reported as it
	 * ends (batch_job_done); a lost connection is made again for the
	 * next copy by the library.  Each copy has its own deadline, from
	 * the end of the one before. */
	smtp_client_send_batch_full(b.pc->client, b.jobs, n, batch_job_done,
	                            &b);

	/* Step 3: a pooled connection that went without RSET and turned
	 * out dead at the first copy's envelope (see stale_unchecked) cost
	 * that copy nothing: it goes again, once, on a new connection,
	 * unless the caller has stopped the batch. */
	if (b.first_again && !b.stopped) {
		am_log_debug("pool: %s: idle connection unusable (%s); "
		             "connecting again",
		             relay->name, b.jobs[0].error->message);
		b.retried = batch_retry_first(&b);
		batch_report(&b, 0);
	}

out:
	/* The connection back to the pool when the library kept it open
	 * (after a refusal it has sent RSET). */
	out = g_steal_pointer(&b.out);
	pool_give(pool, b.pc);
	batch_clear(&b);
	return out;
}

AmDelivery *
am_deliver(AmPool *pool, const AmCopyRequest *req)
{
	g_autoptr(GPtrArray) d = am_deliver_batch(pool, req, 1);

	return g_ptr_array_steal_index(d, 0);
}
