/*
 * deliver.h - send one copy to its relay and classify what happened
 */
#ifndef AM_DELIVER_H
#define AM_DELIVER_H

#include <glib.h>

#include "conf.h"
#include "log.h"
#include "smtpclient.h"

G_BEGIN_DECLS

/* AmRcptOutcome: what became of one archive address.  Strings owned. */
typedef struct {
	char *address; /* archive address, bare */
	AmStatus status;
	char *dsn;   /* "X.Y.Z" */
	char *reply; /* relay reply, or our reason when none */
} AmRcptOutcome;

/* AmDelivery: the outcome of one copy.  (transfer full) from am_deliver */
typedef struct {
	AmStatus status;    /* SENT only when every address was taken;
				 * else the worst: DEFERRED before BOUNCED,
				 * since a retry might still save it */
	char *relay;        /* "host[ip]:port", or "none" when no
				 * connection was made */
	double delay;       /* seconds spent, connect to final reply */
	GPtrArray *rcpts;   /* AmRcptOutcome *, archive_to order */
	char *reason;       /* first failure's reply, for the MTA's
				 * reply to the client; NULL when sent */
	AmOutcome outcome;  /* for the policy table, as conf.h defines */
	gboolean temporary; /* a retry may succeed: a 4xx or a
				 * temporary library error; FALSE when
				 * sent */
	SmtpReply reply;    /* the reply that decided the outcome, for
				 * a reject; code 0 when none */
} AmDelivery;

void am_delivery_free(AmDelivery *d);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmDelivery, am_delivery_free)

/*
 * am_delivery_log: one delivery line per archive address of @d, with
 * the original's @queue_id (NULL: NOQUEUE), as the milter and the
 * spool's workers both log a copy.
 */
void am_delivery_log(const AmDelivery *d, const char *queue_id);

/*
 * AmCopyRequest: one copy to send.  Everything borrowed.
 */
typedef struct {
	const AmRelay *relay;
	const char *from;      /* "" for <> */
	const char *const *to; /* NULL-terminated */
	SmtpMessage *msg;
	gboolean smtputf8; /* the original had SMTPUTF8 */
	gboolean eightbit; /* the original had BODY=8BITMIME */
	gint64 deadline;   /* g_get_monotonic_time() by which the copy must
			    * be done, whatever is left of its own
			    * copy_deadline: the message's, shared by all
			    * its synchronous copies (am_milter_archive);
			    * 0: none */
} AmCopyRequest;

/*
 * AmPool: open connections to relays, kept for reuse between copies as
 * Postfix's connection cache does: at most @max_idle idle connections
 * per relay, RSET before a message on one idle longer than
 * check_after (see am_pool_set_check_after), closed after @idle_ms
 * unused or when the relay's configuration changed.  Thread-safe; a
 * connection is used by one copy at a time.  @max_idle 0: no
 * connection is kept.  A janitor thread (every signal blocked) closes
 * idle connections.
 * (transfer full)
 */
typedef struct AmPool AmPool;
AmPool *am_pool_new(guint max_idle, guint idle_ms);
/* Closes every idle connection: QUIT, all of them within about 1 s
 * together (a stalled relay cannot hold up a stop); the rest without. */
void am_pool_free(AmPool *pool);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmPool, am_pool_free)

/*
 * am_pool_set_check_after: a connection idle longer than @ms must
 * answer RSET before it carries a copy; one idle for less goes
 * without, and is replaced if it turns out dead before the message
 * (see am_deliver).  0: always RSET.
 */
#define AM_POOL_CHECK_AFTER_MS 1000
void am_pool_set_check_after(AmPool *pool, guint ms);

/*
 * am_deliver: send @req over a connection to its relay, from @pool when
 * one is idle there (NULL: a new connection, closed after), else a new
 * one; a pooled connection that turns out dead (at RSET, or at MAIL,
 * RCPT or DATA when it went without RSET) is replaced once before the
 * copy counts as failed.
 * The relay's TLS level, CA file, credentials and stage limits apply;
 * its copy_deadline_ms (0: none) is a hard limit on the whole copy
 * (smtp_client_set_deadline), after which it is a TIMEOUT, and so is
 * @req->deadline: the earlier of the two applies.  A copy that starts
 * with no time left is a TIMEOUT at once, with no connection made.
 * Never fails: every error becomes a status per address.  A batch of
 * one (am_deliver_batch).
 */
AmDelivery *am_deliver(AmPool *pool, const AmCopyRequest *req);

/*
 * am_deliver_batch: send the @n copies of @reqs (@n >= 1), all to the
 * same relay (the same AmRelay), over one connection as am_deliver()
 * takes it, in order, each copy's envelope behind the previous one's
 * end marker when the relay offers PIPELINING
 * (smtp_client_send_batch_full): a round trip less per copy.  Each
 * copy's outcome is what am_deliver() would give for it alone:
 * status, addresses, reply, relay; its delay is its own (from the end
 * of the copy before), and so is its deadline (the relay's
 * copy_deadline_ms and its request's, counted from there).  One
 * difference comes from sharing: a first connection that cannot be
 * made fails every copy with the same error, without trying again for
 * each.  A pooled connection found dead at the first copy's envelope
 * is replaced once, as am_deliver() does (that copy then goes after
 * the others); a connection lost later is made again for the next
 * copy by the library.
 * Returns: (transfer full) AmDelivery * in the order of @reqs; free
 * with g_ptr_array_unref().  Never fails for good input; NULL only on
 * misuse (@n 0, relays that differ).
 */
GPtrArray *am_deliver_batch(AmPool *pool, const AmCopyRequest *reqs, guint n);

/*
 * AmCopyDone: called by am_deliver_batch_full() with copy @index's
 * outcome @d (transfer none: the array returned at the end owns it) as
 * soon as it is known, so that the caller can log it and act on it
 * before the copies after it are answered.  Returns TRUE to go on,
 * FALSE to send none of the copies not started yet.
 */
typedef gboolean (*AmCopyDone)(guint index, const AmDelivery *d, gpointer data);

/*
 * am_deliver_batch_full: am_deliver_batch() with @done (NULL: none)
 * called once per copy that has an outcome, in the order of @reqs, but
 * for a first copy sent again on a new connection (see above), which
 * comes last.  When @done ends the batch, the copies after it are not
 * sent (nor the first copy's second try): their entries in the array
 * returned are NULL.
 */
GPtrArray *am_deliver_batch_full(AmPool *pool, const AmCopyRequest *reqs,
                                 guint n, AmCopyDone done, gpointer data);

/*
 * am_delivery_from_result: classify a finished send (@result, or NULL
 * and @error) for the addresses @to.  Exposed for tests.
 */
AmDelivery *am_delivery_from_result(const char *const *to, const char *relay,
                                    double delay, const SmtpResult *result,
                                    const GError *error);

G_END_DECLS

#endif /* AM_DELIVER_H */
