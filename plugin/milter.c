/*
 * milter.c - the libmilter callbacks: the daemon's spine
 *
 * libmilter runs one thread per SMTP connection and calls us in SMTP
 * order; the state of a connection lives in its private data (AmSession)
 * and that of a message is reset at MAIL, at abort and after EOM.  All
 * archive work happens at end of message, when the envelope and the
 * whole message are known (am_milter_archive), and its result, an
 * AmVerdict, is applied by cb_eom.
 *
 * The policy table, per rule that selected the message; each copy gets
 * its X-Archive-Id once, which is also its spool file name:
 *   delivery = spool   the copy goes into the spool's queue/ (fsynced)
 *                      before we answer; if the spool cannot take it,
 *                      451 4.3.0 "archive spool full" (or "archive
 *                      spool unavailable"; the why, with the spool's
 *                      path and the copy's id, only in the log).
 *   delivery = sync    the copy is sent now; am_rule_action() maps its
 *                      outcome to actions:
 *     accept[+header]  the original is accepted; a copy the relay did
 *                      not confirm goes to hold/ (only the addresses it
 *                      refused), logged at error level per address; if
 *                      hold/ cannot take it, 451 instead.
 *     spool[+quarantine][+header]
 *                      the same into queue/ for the runner, its first
 *                      attempt counted so that the backoff starts from
 *                      it; +quarantine puts the original on Postfix's
 *                      hold queue, reason "archive copy OUTCOME;
 *                      spooled; X-Archive-Id=ID".  An MTA that did not
 *                      grant SMFIF_QUARANTINE at negotiation, or whose
 *                      smfi_quarantine() fails, gets 451 4.3.0
 *                      "archive-milter: cannot quarantine message"
 *                      instead, and the copies are withdrawn as for
 *                      any tempfail.
 *     header           X-Archive-Status on the original: "OUTCOME;
 *                      id=ID" when sent, "OUTCOME; spooled; id=ID" or
 *                      "OUTCOME; held; id=ID" otherwise (OUTCOME as in
 *                      the on_OUTCOME keys: sent, unreachable...).
 *     tempfail         451 4.3.0 "archive copy failed: REPLY".
 *     reject           550 with the copy's dsn made permanent (the
 *                      relay's enhanced code, 4.X.Y becoming 5.X.Y;
 *                      else the class's X.0.0 or the failure's, as in
 *                      the log line), and reject_text or "archive copy
 *                      refused: REPLY".
 *   REPLY is the relay's own reply that decided the outcome; when no
 *   reply did (no connection, a timeout, TLS, our own input), only the
 *   outcome's name (unreachable, timeout...): the client library's
 *   text names the relay's address, files and certificates, which the
 *   sending client has no business reading; the log lines have it.
 * Several rules: reject beats tempfail beats accept, and the client
 * gets the reply of the first rule with the winning action; headers
 * add up; quarantine when any rule asks.  Their synchronous copies are
 * sent one after another, and copy_deadline, counted from the start of
 * the end-of-message work, bounds them all together (Postfix waits for
 * the lot within one milter_content_timeout): each copy ends at the
 * earlier of its relay's copy_deadline and the message's, and a copy
 * left with no time at all is a timeout outcome like any other, under
 * its rule's on_timeout.  When the original is not
 * accepted, copies this message put in the spool are withdrawn (the
 * client sends it again, with new copies), and each copy a relay
 * already took is logged with its X-Archive-Id.  When it is accepted,
 * queued copies are handed to the runner (a delivery = spool copy with
 * its message, sent from memory unless the runner's cap is reached; the
 * file stays the truth for retries and restarts).  That hand-over
 * (am_milter_settle) comes last, after the MTA was told everything
 * that can still fail (smfi_quarantine), so that no spooled copy goes
 * out for an original we end up tempfailing (a sync copy the relay
 * took is out already, and logged as such).  The decision line, written
 * then, names every copy's id, so that it can be matched with the
 * archive, and the action the MTA was really given.
 *
 * Bad input from the MTA is never an assertion.  What reaches our
 * callbacks and cannot be used (an address or header the capture
 * refuses, a header line break that is not a fold) tempfails the
 * message with a 451 that says why; for the sender, a header, the end
 * of headers or a body chunk, at the end of the message, since those
 * events are negotiated without a reply (SMFIP_NR_*, see cb_header).
 * Events out of SMTP order never reach us: libmilter's engine
 * (mi_engine, 8.17) calls xxfi_abort for a transaction in progress and
 * then drops any command it cannot reach from HELO without a word to
 * the MTA (RCPT or a header before MAIL, a header after the body, an
 * end of message without MAIL or without RCPT), so such an MTA waits
 * for its answer until its own timeout.  The "before MAIL" and
 * "without RCPT" checks below are therefore only a guard should
 * libmilter change; Postfix and Sendmail never send such orders.
 *
 * After EOM we cannot tell whether the MTA kept the original: seen with
 * Postfix 3.7 and a second milter that rejects at end of message,
 * Postfix sends SMFIC_ABORT to every milter after every end of message,
 * accepted or not, and libmilter does not call xxfi_abort after
 * xxfi_eom anyway; our milter then sees only the close (or the next
 * MAIL), exactly as for an accepted message.  So "copy confirmed, the
 * original then rejected by another milter" cannot be logged here; the
 * Postfix line "QUEUEID: milter-reject: END-OF-MESSAGE" and our
 * decision line for the same QUEUEID (with each X-Archive-Id) match it
 * up.  A client that disconnects after its final dot does not make a
 * mismatch: Postfix queues the message before it replies.
 *
 * Known limits: XXX: synchronous copies of one message are sent one
 * after another under one copy_deadline, so a relay that stalls for a
 * rule early in the file leaves later rules little or no time: their
 * copies are then timeouts (held, spooled or tempfailed as their
 * on_timeout says) although their own relays are fine.  XXX: a copy
 * confirmed for an original that a later
 * milter or Postfix itself then refuses stays in the archive, and is
 * logged as such only through the queue id, as above.  A recipient
 * that a later milter removes is still in the journal.  Memory
 * allocation failures abort the process (GLib's g_malloc); the MTA then
 * applies milter_default_action, which should be tempfail.
 */
#include <arpa/inet.h>
#include <libmilter/mfapi.h>
#include <netinet/in.h>
#include <string.h>

#include "deliver.h"
#include "journal.h"
#include "log.h"
#include "milter.h"
#include "rules.h"
#include "runner.h"
#include "spool.h"

/* Longest relay text put into our reply to the MTA's client. */
#define REPLY_REASON_MAX 200

/*
 * The relay pool of a context: idle connections per relay, and how
 * long one may stay idle.  Enough for the spool workers and a burst of
 * synchronous copies; short-lived, since each idle connection holds a
 * server process on the relay (Postfix's own cache keeps 2 s).
 */
#define POOL_MAX_IDLE 32
#define POOL_IDLE_MS  5000

typedef struct {
	gboolean leading_space; /* SMFIP_HDR_LEADSPC was negotiated */
	gboolean no_quarantine; /* the MTA did not grant SMFIF_QUARANTINE;
	                         * FALSE when unknown (no negotiation:
	                         * session_get), smfi_quarantine() then
	                         * being the test */
	unsigned long noreply;  /* the SMFIP_NR_* bits we asked for */
	char *client_addr;      /* from xxfi_connect, or {client_addr} */
	char *client_name;
	AmContext *ctx;  /* the current message's, or NULL */
	AmEnvelope *env; /* the current message's, or NULL */
	AmCapture *cap;
	char *failure;       /* why the current message is to be tempfailed
	                * at its end (a header, body or EOH event that
	                * could not be taken), for the log; or NULL */
	char *failure_reply; /* the same for the client (failure_text) */
} AmSession;

G_DEFINE_QUARK(am - milter - error - quark, am_milter_error)

G_LOCK_DEFINE_STATIC(current);
static AmContext *current;

/* ------------------------------------------------------------------ */
/* Context                                                              */
/* ------------------------------------------------------------------ */

AmContext *
am_context_new(AmConfig *config, AmArchiveKey *key)
{
	AmContext *ctx = g_new0(AmContext, 1);

	ctx->ref = 1;
	ctx->config = config;
	ctx->key = key;
	ctx->pool = am_pool_new(POOL_MAX_IDLE, POOL_IDLE_MS);
	return ctx;
}

AmContext *
am_context_ref(AmContext *ctx)
{
	g_atomic_int_inc(&ctx->ref);
	return ctx;
}

void
am_context_unref(AmContext *ctx)
{
	if (ctx == NULL || !g_atomic_int_dec_and_test(&ctx->ref))
		return;
	am_pool_free(ctx->pool);
	am_config_free(ctx->config);
	am_archive_key_free(ctx->key);
	g_free(ctx);
}

void
am_milter_set_context(AmContext *ctx)
{
	AmContext *old;

	G_LOCK(current);
	old = current;
	current = ctx ? am_context_ref(ctx) : NULL;
	G_UNLOCK(current);
	am_context_unref(old);
}

AmContext *
am_milter_get_context(void)
{
	AmContext *ctx;

	G_LOCK(current);
	ctx = current ? am_context_ref(current) : NULL;
	G_UNLOCK(current);
	return ctx;
}

/* ------------------------------------------------------------------ */
/* End of message: the archive work                                     */
/* ------------------------------------------------------------------ */

static gboolean
is_archive_address(const AmConfig *config, const char *addr)
{
	guint i;
	char **to;

	for (i = 0; i < config->rules->len; i++) {
		const AmRule *rule = config->rules->pdata[i];

		for (to = rule->archive_to; to && *to; to++)
			if (g_ascii_strcasecmp(*to, addr) == 0)
				return TRUE;
	}
	return FALSE;
}

/*
 * A returning copy carries an id only we can make AND goes only to
 * archive addresses; an id copied onto other mail (a replay) must not
 * turn archiving off, so that case is archived and logged.
 */
static const char *
returning_copy_id(AmContext *ctx, const AmEnvelope *env,
                  const GPtrArray *headers)
{
	const char *own = NULL;
	guint i;

	for (i = 0; i < headers->len && own == NULL; i++) {
		const AmHeader *h = headers->pdata[i];

		if (g_ascii_strcasecmp(h->name, "X-Archive-Id") == 0 &&
		    am_archive_id_verify(ctx->key, h->value))
			own = h->value;
	}
	if (own == NULL)
		return NULL;
	for (i = 0; i < env->recipients->len; i++) {
		if (!is_archive_address(ctx->config,
		                        env->recipients->pdata[i])) {
			am_log_warning("%s: own X-Archive-Id on a message to "
			               "non-archive recipients; archived "
			               "anyway",
			               env->queue_id ? env->queue_id
			                             : "NOQUEUE");
			return NULL;
		}
	}
	return own;
}

static const char *
qid(const AmEnvelope *env)
{
	return env->queue_id ? env->queue_id : "NOQUEUE";
}

/*
 * What one rule did with its copy, before the rules are combined.
 * @spooled: the copy is in the spool (@state says where), to be
 * withdrawn if the original is not accepted after all.
 */
typedef struct {
	AmVerdictAction action;
	char *rcode, *xcode, *text; /* for tempfail and reject */
	char *header;               /* X-Archive-Status value, or NULL */
	char *quarantine;           /* reason, or NULL */
	char *id;                   /* X-Archive-Id of the copy */
	gboolean sent;   /* the relay holds the copy, for some address */
	gboolean failed; /* not every address confirmed or queued */
	gboolean spooled;
	AmSpoolState state;
	char *detail;        /* for the decision line */
	AmSpoolEntry *entry; /* delivery = spool: what was spooled, and */
	SmtpMessage *msg;    /* its message, for the runner; or NULL */
} RuleResult;

static void
rule_result_clear(RuleResult *r)
{
	g_free(r->rcode);
	g_free(r->xcode);
	g_free(r->text);
	g_free(r->header);
	g_free(r->quarantine);
	g_free(r->id);
	g_free(r->detail);
	am_spool_entry_free(r->entry);
	smtp_message_free(r->msg);
}

static void
result_tempfail(RuleResult *r, const char *text)
{
	r->action = AM_VERDICT_TEMPFAIL;
	r->rcode = g_strdup("451");
	r->xcode = g_strdup("4.3.0");
	r->text = g_strdup(text);
}

/* The 451 text for a copy the spool could not take: the condition
 * only; the error names the spool's path and the copy's id, which are
 * for the log line the caller writes, not for the sending client. */
static char *
spool_failure_text(const GError *error)
{
	if (g_error_matches(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FULL))
		return g_strdup("archive spool full");
	return g_strdup("archive spool unavailable");
}

/*
 * Write the copy @id of @msg into the spool for @to, in @state.  A
 * copy that already failed once (@d) carries that attempt, so the
 * runner's backoff starts from it rather than trying again at once.
 * @kept: NULL, or receives a copy of the envelope written, for the
 * runner (am_runner_kick_copy).
 */
static gboolean
spool_copy(AmContext *ctx, const AmRule *rule, const AmEnvelope *env,
           const char *id, SmtpMessage *msg, const char *const *to,
           AmSpoolState state, const AmDelivery *d, AmSpoolEntry **kept,
           GError **error)
{
	gint64 now = g_get_real_time() / G_USEC_PER_SEC;
	AmSpoolEntry entry = {
	    .id = (char *)id,
	    .queue_id = env->queue_id,
	    .rule = rule->name,
	    .relay = rule->relay->name,
	    .from = rule->archive_from ? rule->archive_from : (char *)"",
	    .to = (char **)to,
	    .smtputf8 = env->smtputf8,
	    .eightbit = env->eightbit,
	    .created = now,
	    .state = state,
	};

	if (ctx->spool == NULL) {
		g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
		            "no spool configured");
		return FALSE;
	}
	if (d != NULL) {
		entry.attempts = 1;
		entry.last_error = d->reason;
		if (state == AM_SPOOL_QUEUED)
			entry.next_attempt =
			    now + MAX(ctx->config->spool_retry_min_s, 1);
	}
	if (!am_spool_put(ctx->spool, &entry, msg, state, error))
		return FALSE;
	if (kept != NULL)
		*kept = am_spool_entry_copy(&entry);
	return TRUE;
}

/* delivery = spool: the copy into queue/, fsynced before we answer. */
static void
rule_spool(AmContext *ctx, const AmRule *rule, const AmEnvelope *env,
           SmtpMessage *msg, RuleResult *r)
{
	g_autoptr(GError) error = NULL;

	if (!spool_copy(ctx, rule, env, r->id, msg,
	                (const char *const *)rule->archive_to, AM_SPOOL_QUEUED,
	                NULL, &r->entry, &error)) {
		g_autofree char *text = spool_failure_text(error);

		am_log_error("%s: rule %s: cannot spool copy %s: %s", qid(env),
		             rule->name, r->id, error->message);
		result_tempfail(r, text);
		r->failed = TRUE;
		r->detail = g_strdup_printf("%s: %s", rule->name, text);
		return;
	}
	r->action = AM_VERDICT_ACCEPT;
	r->spooled = TRUE;
	r->state = AM_SPOOL_QUEUED;
	am_log_info("%s: rule=%s, X-Archive-Id=%s, status=queued", qid(env),
	            rule->name, r->id);
	r->detail = g_strdup_printf("%s: queued, id=%s", rule->name, r->id);
}

/* The enhanced code of a reject: the copy's dsn, made permanent, since
 * a 4xx from the relay that the policy rejects on is final for us. */
static char *
reject_xcode(const AmDelivery *d)
{
	guint i;

	for (i = 0; i < d->rcpts->len; i++) {
		const AmRcptOutcome *o = d->rcpts->pdata[i];

		if (o->status != AM_STATUS_SENT && o->dsn != NULL &&
		    o->dsn[0] != '\0' && o->dsn[1] == '.')
			return g_strdup_printf("5%s", o->dsn + 1);
	}
	return g_strdup("5.0.0");
}

/*
 * What the client reads of a failed copy (transfer full): the relay's
 * reply that decided the outcome, as "CODE X.Y.Z text" on one line,
 * which the policy table quotes on purpose; without one, the outcome's
 * name only.  d->reason is not used: without a reply it is the client
 * library's text ("cannot connect to HOST:PORT: ...", a message file,
 * a certificate), for the delivery log line alone.
 */
static char *
copy_failure_reason(const AmDelivery *d)
{
	GString *out;
	const char *p;

	if (d->reply.code < 400 || d->reply.code > 599)
		return g_strdup(am_outcome_name(d->outcome));
	out = g_string_new(NULL);
	g_string_append_printf(out, "%03d", d->reply.code);
	if (d->reply.enhanced != NULL)
		g_string_append_printf(out, " %s", d->reply.enhanced);
	if (d->reply.text != NULL && *d->reply.text != '\0') {
		g_string_append_c(out, ' ');
		for (p = d->reply.text; *p != '\0'; p++)
			g_string_append_c(out, *p == '\n' ? ' ' : *p);
	}
	return g_string_free(out, FALSE);
}

static void
result_reject(RuleResult *r, const AmRule *rule, const AmDelivery *d)
{
	r->action = AM_VERDICT_REJECT;
	r->rcode = g_strdup("550");
	r->xcode = reject_xcode(d);
	if (rule->reject_text != NULL) {
		r->text = g_strdup(rule->reject_text);
	} else {
		g_autofree char *why = copy_failure_reason(d);

		r->text = g_strdup_printf("archive copy refused: %s", why);
	}
}

/* The addresses a copy still owes: those the relay did not take. */
static GPtrArray *
unconfirmed(const AmDelivery *d)
{
	GPtrArray *to = g_ptr_array_new();
	guint i;

	for (i = 0; i < d->rcpts->len; i++) {
		const AmRcptOutcome *o = d->rcpts->pdata[i];

		if (o->status != AM_STATUS_SENT)
			g_ptr_array_add(to, o->address);
	}
	g_ptr_array_add(to, NULL);
	return to;
}

/* One line per address the spool keeps; hold/ needs a human: error. */
static void
log_kept(const AmEnvelope *env, const AmRule *rule, const AmDelivery *d,
         const char *id, AmSpoolState state)
{
	guint i;

	for (i = 0; i < d->rcpts->len; i++) {
		const AmRcptOutcome *o = d->rcpts->pdata[i];
		g_autofree char *addr = NULL;
		g_autofree char *reply = NULL;

		if (o->status == AM_STATUS_SENT)
			continue;
		addr = am_log_sanitize(o->address, 256);
		reply = am_log_sanitize(o->reply, 256);
		if (state == AM_SPOOL_HELD)
			am_log_error("%s: archive=<%s>, rule=%s, "
			             "X-Archive-Id=%s, status=held (%s)",
			             qid(env), addr, rule->name, id, reply);
		else
			am_log_warning("%s: archive=<%s>, rule=%s, "
			               "X-Archive-Id=%s, status=queued (%s)",
			               qid(env), addr, rule->name, id, reply);
	}
}

/*
 * The accepting actions (accept, spool, each maybe with quarantine and
 * header): a copy the relay did not confirm must be in the spool before
 * the original is accepted, in queue/ for spool, in hold/ for accept;
 * only the addresses the relay did not take.  If the spool cannot take
 * it, the original is tempfailed instead: nothing is lost.
 */
static void
apply_accept(AmContext *ctx, const AmRule *rule, const AmEnvelope *env,
             SmtpMessage *msg, const AmDelivery *d, guint actions,
             RuleResult *r)
{
	const char *outcome = am_outcome_name(d->outcome);
	const char *kept = NULL;

	if (d->outcome != AM_OUTCOME_SENT) {
		g_autoptr(GPtrArray) to = unconfirmed(d);
		g_autoptr(GError) error = NULL;
		AmSpoolState state = (actions & AM_ACTION_SPOOL)
		                         ? AM_SPOOL_QUEUED
		                         : AM_SPOOL_HELD;

		if (!spool_copy(ctx, rule, env, r->id, msg,
		                (const char *const *)to->pdata, state, d, NULL,
		                &error)) {
			g_autofree char *text = spool_failure_text(error);

			am_log_error("%s: rule %s: copy %s not confirmed "
			             "(%s) and cannot be spooled: %s",
			             qid(env), rule->name, r->id, outcome,
			             error->message);
			result_tempfail(r, text);
			return;
		}
		r->spooled = TRUE;
		r->state = state;
		kept = state == AM_SPOOL_QUEUED ? "spooled" : "held";
		log_kept(env, rule, d, r->id, state);
	}

	r->action = AM_VERDICT_ACCEPT;
	if (actions & AM_ACTION_HEADER)
		r->header = kept ? g_strdup_printf("%s; %s; id=%s", outcome,
		                                   kept, r->id)
		                 : g_strdup_printf("%s; id=%s", outcome, r->id);
	if ((actions & AM_ACTION_QUARANTINE) && kept != NULL)
		r->quarantine =
		    g_strdup_printf("archive copy %s; %s; X-Archive-Id=%s",
		                    outcome, kept, r->id);
}

/* delivery = sync: send now, by the message's @deadline (0: none);
 * the rule's policy acts on the outcome. */
static void
rule_sync(AmContext *ctx, const AmRule *rule, const AmEnvelope *env,
          SmtpMessage *msg, gint64 deadline, RuleResult *r)
{
	g_autoptr(AmDelivery) d = NULL;
	g_autofree char *names = NULL;
	AmCopyRequest req = {
	    .relay = rule->relay,
	    .from = rule->archive_from ? rule->archive_from : "",
	    .to = (const char *const *)rule->archive_to,
	    .msg = msg,
	    .smtputf8 = env->smtputf8,
	    .eightbit = env->eightbit,
	    .deadline = deadline,
	};
	guint actions;

	/* Step 1: the copy, one log line per archive address. */
	d = am_deliver(ctx->pool, &req);
	am_delivery_log(d, env->queue_id);
	r->sent = d->outcome == AM_OUTCOME_SENT ||
	          d->outcome == AM_OUTCOME_SOME_REFUSED;
	r->failed = d->outcome != AM_OUTCOME_SENT;

	/* Step 2: the policy. */
	actions = am_rule_action(rule, d->outcome, d->temporary);
	names = am_action_format(actions);
	if (actions & AM_ACTION_REJECT) {
		result_reject(r, rule, d);
	} else if (actions & AM_ACTION_TEMPFAIL) {
		g_autofree char *why = copy_failure_reason(d);
		g_autofree char *text =
		    g_strdup_printf("archive copy failed: %s", why);

		result_tempfail(r, text);
	} else {
		apply_accept(ctx, rule, env, msg, d, actions, r);
	}
	r->detail = g_strdup_printf("%s: %s -> %s%s, id=%s", rule->name,
	                            am_outcome_name(d->outcome), names,
	                            r->action == AM_VERDICT_TEMPFAIL &&
	                                    !(actions & AM_ACTION_TEMPFAIL)
	                                ? " (spool failed: tempfail)"
	                                : "",
	                            r->id);
}

/* Build the copy of @rule and deal with it as the rule says. */
static void
rule_copy(AmContext *ctx, const AmRule *rule, const AmEnvelope *env,
          AmCapture *cap, gint64 deadline, RuleResult *r)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpMessage) msg = NULL;

	/* The id is made once: it is the spool's file name too, and stays
	 * the copy's on every retry. */
	r->id = am_archive_id_new(ctx->key);
	msg = am_journal_build(env, r->id, cap, &error);
	if (msg == NULL) {
		/* Nothing to spool either: only a tempfail keeps it. */
		am_log_error("%s: rule %s: cannot build copy: %s", qid(env),
		             rule->name, error->message);
		result_tempfail(r, "archive copy failed: cannot build copy");
		r->failed = TRUE;
		r->detail = g_strdup_printf("%s: cannot build copy: %s",
		                            rule->name, error->message);
		return;
	}
	am_log_debug("milter: %s: rule %s: X-Archive-Id %s", qid(env),
	             rule->name, r->id);
	if (rule->delivery == AM_DELIVERY_SPOOL) {
		rule_spool(ctx, rule, env, msg, r);
		/* The runner sends these very octets from memory if the
		 * original is accepted; but not a capture that spilled to
		 * its temporary file: the copy would keep that file open
		 * until its first attempt, and copies waiting for a slow
		 * relay would run the daemon out of descriptors.  Such a
		 * copy is read from its spool file instead. */
		if (r->entry != NULL && !am_capture_is_spilled(cap))
			r->msg = g_steal_pointer(&msg);
	} else
		rule_sync(ctx, rule, env, msg, deadline, r);
}

/*
 * The copies of a message between the decision and the hand-over
 * (am_milter_settle): the results of its rules, and what the decision
 * line needs.
 */
struct AmVerdictCopies {
	char *queue_id;      /* sanitized, or NULL: NOQUEUE */
	RuleResult *results; /* one per rule that selected the message */
	guint n, failed;     /* rules; those whose copy failed */
	char *note;          /* why the verdict changed after the rules
	                       * (quarantine), for the decision line; or
	                       * NULL */
};

static void
copies_free(struct AmVerdictCopies *c)
{
	guint i;

	for (i = 0; i < c->n; i++)
		rule_result_clear(&c->results[i]);
	g_free(c->results);
	g_free(c->queue_id);
	g_free(c->note);
	g_free(c);
}

void
am_verdict_free(AmVerdict *v)
{
	if (v == NULL)
		return;
	if (v->copies != NULL) {
		/* A caller's bug: the copies stay where they are (queue/
		 * copies go out with the runner's next scan). */
		am_log_warning("%s: verdict dropped before it was settled",
		               v->copies->queue_id ? v->copies->queue_id
		                                   : "NOQUEUE");
		copies_free(v->copies);
	}
	g_free(v->rcode);
	g_free(v->xcode);
	g_free(v->text);
	g_ptr_array_unref(v->headers);
	g_free(v->quarantine);
	g_ptr_array_unref(v->ids);
	g_free(v);
}

static AmVerdict *
verdict_new(void)
{
	AmVerdict *v = g_new0(AmVerdict, 1);

	v->action = AM_VERDICT_ACCEPT;
	v->headers = g_ptr_array_new_with_free_func(g_free);
	v->ids = g_ptr_array_new_with_free_func(g_free);
	return v;
}

/* Reject beats tempfail beats accept; the first rule's reply of the
 * winning kind is the one the client sees. */
static void
verdict_add(AmVerdict *v, RuleResult *r)
{
	if (r->action > v->action) {
		v->action = r->action;
		g_free(v->rcode);
		g_free(v->xcode);
		g_free(v->text);
		v->rcode = g_steal_pointer(&r->rcode);
		v->xcode = g_steal_pointer(&r->xcode);
		v->text = g_steal_pointer(&r->text);
	}
	if (r->header != NULL)
		g_ptr_array_add(v->headers, g_steal_pointer(&r->header));
	if (r->quarantine != NULL && v->quarantine == NULL)
		v->quarantine = g_steal_pointer(&r->quarantine);
}

void
am_verdict_no_quarantine(AmVerdict *v, const char *why)
{
	const char *queue_id = v->copies ? v->copies->queue_id : NULL;

	if (v->action != AM_VERDICT_ACCEPT || v->quarantine == NULL)
		return;
	am_log_error("%s: cannot quarantine the original (%s): %s; "
	             "tempfail instead",
	             queue_id ? queue_id : "NOQUEUE", v->quarantine, why);
	v->action = AM_VERDICT_TEMPFAIL;
	g_free(v->rcode);
	g_free(v->xcode);
	g_free(v->text);
	v->rcode = g_strdup("451");
	v->xcode = g_strdup("4.3.0");
	v->text = g_strdup("archive-milter: cannot quarantine message");
	g_clear_pointer(&v->quarantine, g_free);
	g_ptr_array_set_size(v->headers, 0);
	if (v->copies != NULL) {
		g_free(v->copies->note);
		v->copies->note =
		    g_strdup_printf("not quarantined (%s): tempfail", why);
	}
}

/*
 * The original is accepted: queued copies go to the runner now.  It is
 * not: copies in the spool are withdrawn (the client will send the
 * message again, and a new copy comes with it), and copies the relay
 * already took are named, so the archive entry can be matched.
 */
static void
verdict_settle(AmContext *ctx, AmVerdict *v, struct AmVerdictCopies *c)
{
	g_autoptr(GError) error = NULL;
	const char *queue_id = c->queue_id ? c->queue_id : "NOQUEUE";
	guint i;

	for (i = 0; i < c->n; i++) {
		RuleResult *r = &c->results[i];

		if (v->action == AM_VERDICT_ACCEPT) {
			if (r->sent || r->spooled)
				g_ptr_array_add(v->ids, g_strdup(r->id));
			if (r->spooled && r->state == AM_SPOOL_QUEUED &&
			    ctx->runner != NULL && r->msg != NULL)
				am_runner_kick_copy(ctx->runner,
				                    g_steal_pointer(&r->entry),
				                    g_steal_pointer(&r->msg));
			else if (r->spooled && r->state == AM_SPOOL_QUEUED &&
			         ctx->runner != NULL)
				am_runner_kick(ctx->runner, r->id);
			continue;
		}
		if (r->spooled && !am_spool_remove(ctx->spool, r->id, &error)) {
			am_log_warning("%s: cannot withdraw spooled copy %s "
			               "of a message not accepted: %s",
			               queue_id, r->id, error->message);
			g_clear_error(&error);
		}
		if (r->sent)
			am_log_warning("%s: original not accepted (%s) but "
			               "its archive copy was sent, "
			               "X-Archive-Id=%s",
			               queue_id,
			               v->action == AM_VERDICT_REJECT
			                   ? "reject"
			                   : "tempfail",
			               r->id);
	}
}

static const char *
verdict_name(AmVerdictAction action)
{
	switch (action) {
	case AM_VERDICT_TEMPFAIL:
		return "tempfail";
	case AM_VERDICT_REJECT:
		return "reject";
	case AM_VERDICT_ACCEPT:
	default:
		return "accept";
	}
}

/* One line says what the MTA was told, and why. */
static void
verdict_log(const AmVerdict *v, const struct AmVerdictCopies *c)
{
	g_autoptr(GString) detail = g_string_new(NULL);
	guint i;

	if (v->action != AM_VERDICT_ACCEPT)
		g_string_append_printf(detail, "%s %s %s; ", v->rcode, v->xcode,
		                       v->text);
	for (i = 0; i < c->n; i++)
		g_string_append_printf(detail, "%s%s", i > 0 ? "; " : "",
		                       c->results[i].detail);
	if (v->quarantine != NULL)
		g_string_append(detail, "; quarantined");
	if (c->note != NULL)
		g_string_append_printf(detail, "; %s", c->note);
	am_log_decision(c->queue_id, verdict_name(v->action), c->n, c->failed,
	                detail->str);
}

void
am_milter_settle(AmContext *ctx, AmVerdict *v)
{
	struct AmVerdictCopies *c = g_steal_pointer(&v->copies);

	/* No rule made a copy: the decision line is written already. */
	if (c == NULL)
		return;
	verdict_settle(ctx, v, c);
	verdict_log(v, c);
	copies_free(c);
}

AmVerdict *
am_milter_archive(AmContext *ctx, const AmEnvelope *env, AmCapture *cap,
                  gboolean can_quarantine)
{
	const GPtrArray *headers = am_capture_get_headers(cap);
	g_autoptr(GPtrArray) rules = NULL;
	g_autoptr(GError) error = NULL;
	AmVerdict *v = verdict_new();
	struct AmVerdictCopies *c;
	const char *own;
	guint i;
	/* copy_deadline bounds all synchronous copies of this message
	 * together, since the MTA waits for all of them in one
	 * milter_content_timeout; counted from here. */
	gint64 deadline = ctx->config->copy_deadline_ms > 0
	                      ? g_get_monotonic_time() +
	                            (gint64)ctx->config->copy_deadline_ms * 1000
	                      : 0;

	/* Step 1: our own copy, back through the MTA: never copy again. */
	own = returning_copy_id(ctx, env, headers);
	if (own != NULL) {
		g_autofree char *id = g_strstrip(g_strdup(own));
		g_autofree char *why = g_strdup_printf(
		    "returning archive copy, X-Archive-Id=%s", id);

		am_log_decision(env->queue_id, "accept", 0, 0, why);
		return v;
	}

	/* Step 2: which rules want a copy; undecidable: no accept. */
	rules = am_rules_select(ctx->config, env, headers,
	                        am_capture_get_size(cap), &error);
	if (rules == NULL) {
		am_log_decision(env->queue_id, "tempfail", 0, 0,
		                error->message);
		v->action = AM_VERDICT_TEMPFAIL;
		v->rcode = g_strdup("451");
		v->xcode = g_strdup("4.3.0");
		v->text = g_strdup("archive rules could not be applied");
		return v;
	}
	if (rules->len == 0) {
		am_log_decision(env->queue_id, "accept", 0, 0,
		                "no rule matched");
		return v;
	}

	/* Step 3: one copy per rule, each under its rule's policy. */
	c = g_new0(struct AmVerdictCopies, 1);
	c->queue_id = g_strdup(env->queue_id);
	c->results = g_new0(RuleResult, rules->len);
	c->n = rules->len;
	v->copies = c;
	for (i = 0; i < rules->len; i++) {
		rule_copy(ctx, rules->pdata[i], env, cap, deadline,
		          &c->results[i]);
		if (c->results[i].failed)
			c->failed++;
		verdict_add(v, &c->results[i]);
	}

	/* Step 4: a rule wants the original on hold and the MTA did not
	 * grant it: accepting it unheld would break the rule, so the
	 * client tries again; am_milter_settle() withdraws the copies. */
	if (!can_quarantine)
		am_verdict_no_quarantine(v, "SMFIF_QUARANTINE not granted "
		                            "by the MTA");
	return v;
}

/* ------------------------------------------------------------------ */
/* Sessions                                                             */
/* ------------------------------------------------------------------ */

/*
 * The session of a connection, made at negotiation.  XXX: after
 * SMFIC_QUIT_NC (another SMTP session on the same milter connection;
 * Postfix 3.7 never sends it, it opens a new connection) libmilter calls
 * xxfi_close, which frees the session, and then xxfi_connect without a
 * new negotiation: the new session does not know the NR flags or
 * SMFIP_HDR_LEADSPC.  Still safe: its callbacks answer continue, which
 * libmilter turns into no reply (logging each as a broken promise), and
 * failures still wait for the end of message; quarantine is tried and
 * its failure tempfails the message (no_quarantine FALSE); but the
 * capture then puts back a space after each colon that the MTA did
 * not remove.
 */
static AmSession *
session_get(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);

	if (s == NULL) {
		s = g_new0(AmSession, 1);
		if (smfi_setpriv(mctx, s) != MI_SUCCESS) {
			g_free(s);
			return NULL;
		}
	}
	return s;
}

static void
session_reset_message(AmSession *s)
{
	am_envelope_free(s->env);
	s->env = NULL;
	am_capture_free(s->cap);
	s->cap = NULL;
	am_context_unref(s->ctx);
	s->ctx = NULL;
	g_free(s->failure);
	s->failure = NULL;
	g_free(s->failure_reply);
	s->failure_reply = NULL;
}

static void
session_free(AmSession *s)
{
	session_reset_message(s);
	g_free(s->client_addr);
	g_free(s->client_name);
	g_free(s);
}

/* libmilter needs '%' doubled; CR and LF would make the call fail, and
 * the relay's text must not carry controls or bidi tricks to the
 * client: am_log_sanitize() keeps the text printable, valid UTF-8. */
char *
am_milter_reply_text(const char *prefix, const char *reason)
{
	g_autofree char *clean = am_log_sanitize(reason, REPLY_REASON_MAX);
	GString *out = g_string_new(prefix);
	const char *p;

	for (p = clean; *p != '\0'; p++) {
		if (*p == '%')
			g_string_append_c(out, '%');
		g_string_append_c(out, *p);
	}
	return g_string_free(out, FALSE);
}

/* Set the reply the MTA gives its client, and return @ret. */
static sfsistat
reply_set(SMFICTX *mctx, const char *rcode, const char *xcode,
          const char *prefix, const char *reason, sfsistat ret)
{
	g_autofree char *text = am_milter_reply_text(prefix, reason);

	if (smfi_setreply(mctx, (char *)rcode, (char *)xcode, text) !=
	    MI_SUCCESS)
		am_log_warning("cannot set the reply text");
	return ret;
}

static sfsistat
reply_tempfail(SMFICTX *mctx, const char *prefix, const char *reason)
{
	return reply_set(mctx, "451", "4.3.0", prefix, reason, SMFIS_TEMPFAIL);
}

/*
 * What the client may read of a failure of ours: input from the MTA
 * that we refuse is named (an address, a header and where it breaks),
 * the client being the one who can fix it; our own trouble only by
 * kind, since its text names a temporary file's directory.  The log
 * line has the whole error.
 */
static const char *
failure_text(const GError *error)
{
	if (g_error_matches(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT))
		return error->message;
	if (g_error_matches(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_IO))
		return "temporary storage failed";
	return "local error";
}

/* Bad input or a local failure: log @reason, tempfail with @text (the
 * client's) and forget the message. */
static sfsistat
session_tempfail_full(SMFICTX *mctx, AmSession *s, const char *reason,
                      const char *text)
{
	am_log_decision(s && s->env ? s->env->queue_id : NULL, "tempfail", 0, 0,
	                reason);
	if (s != NULL)
		session_reset_message(s);
	return reply_tempfail(mctx, "archive-milter: ", text);
}

/* The same, for a fixed @reason fit for the client as it is. */
static sfsistat
session_tempfail(SMFICTX *mctx, AmSession *s, const char *reason)
{
	return session_tempfail_full(mctx, s, reason, reason);
}

static sfsistat
session_tempfail_error(SMFICTX *mctx, AmSession *s, const GError *error)
{
	return session_tempfail_full(mctx, s, error->message,
	                             failure_text(error));
}

/* The queue id is known from the first accepted RCPT on (Postfix). */
static void
session_update_queue_id(SMFICTX *mctx, AmSession *s)
{
	const char *qid = smfi_getsymval(mctx, (char *)"i");

	if (s->env == NULL || qid == NULL || *qid == '\0')
		return;
	if (g_strcmp0(s->env->queue_id, qid) == 0)
		return;
	g_free(s->env->queue_id);
	s->env->queue_id = am_log_sanitize(qid, 64);
}

/* No answer where the NR bit @bit was negotiated, else continue. */
static sfsistat
reply_continue(const AmSession *s, unsigned long bit)
{
	return s != NULL && (s->noreply & bit) != 0 ? SMFIS_NOREPLY
	                                            : SMFIS_CONTINUE;
}

/* ------------------------------------------------------------------ */
/* Callbacks                                                            */
/* ------------------------------------------------------------------ */

/*
 * Events whose callback never answers anything but continue: connect
 * (a session that cannot be kept is refused at MAIL instead, which
 * then has no NR bit: see below), MAIL, each header, the end of
 * headers, each body chunk (their failures wait for the end of
 * message: a MAIL that fails fails the whole message anyway, and
 * Postfix then need not wait for us once more per message).  RCPT
 * keeps its answer: it refuses single recipients.  HELO, DATA
 * and unknown commands are not sent to us at all (SMFIP_NO*); no NR
 * bit for them, since libmilter, should an old MTA send them anyway,
 * would answer for our missing callback with continue and log that as
 * a broken promise.
 */
#define NOREPLY_EVENTS                                                         \
	(SMFIP_NR_CONN | SMFIP_NR_MAIL | SMFIP_NR_HDR | SMFIP_NR_EOH |         \
	 SMFIP_NR_BODY)

static sfsistat
cb_negotiate(SMFICTX *mctx, unsigned long f0, unsigned long f1,
             unsigned long f2, unsigned long f3, unsigned long *pf0,
             unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
	AmSession *s = session_get(mctx);
	/* Events we have no use for.  The end of headers is implied by
	 * the first body chunk or the end of message (the capture ends
	 * its headers itself); not sending it saves a packet per message
	 * (Postfix still sends its macro packet, see below). */
	const unsigned long skip =
	    SMFIP_NOHELO | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_NOEOH;

	(void)f2;
	(void)f3;

	/* The actions we use: X-Archive-Status, the hold queue, and our
	 * own macro lists.  Asking for none (0) makes libmilter refuse
	 * smfi_addheader and smfi_quarantine at end of message. */
	*pf0 = f0 & (SMFIF_ADDHDRS | SMFIF_QUARANTINE | SMFIF_SETSYMLIST);

	/* Values with their own leading space keep headers byte-exact. */
	*pf1 = (f1 & SMFIP_HDR_LEADSPC) | (f1 & skip);
	*pf2 = 0;
	*pf3 = 0;

	/*
	 * No session: SMFIS_REJECT here would make libmilter close the
	 * connection unanswered, and Postfix would then apply
	 * milter_default_action, which accepts mail without a copy when
	 * set to accept (seen with Postfix 3.7: "can't read SMFIC_OPTNEG
	 * reply packet header").  Go on instead, without NR flags: cb_connect
	 * finds no session either and tempfails the whole SMTP session.
	 */
	if (s == NULL) {
		am_log_error("milter: cannot keep session state; the "
		             "session will be tempfailed");
		return SMFIS_CONTINUE;
	}
	s->leading_space = (f1 & SMFIP_HDR_LEADSPC) != 0;
	/* libmilter lets smfi_quarantine() through only if granted; knowing
	 * it now lets the end of message tempfail before any copy leaves
	 * (am_milter_archive). */
	s->no_quarantine = (*pf0 & SMFIF_QUARANTINE) == 0;
	if (s->no_quarantine)
		am_log_debug("milter: MTA grants no SMFIF_QUARANTINE; "
		             "messages whose rule asks for quarantine will "
		             "be tempfailed");
	if (!s->leading_space)
		am_log_debug("milter: MTA offers no SMFIP_HDR_LEADSPC; one "
		             "space after each colon is assumed");

	/* Only the NR bits offered; libmilter drops those the MTA lacks
	 * from its answer and sends our continue for them itself. */
	s->noreply = f1 & NOREPLY_EVENTS;
	*pf1 |= s->noreply;

	/*
	 * Asking replaces the MTA's default list for that stage; only what
	 * the callbacks read with smfi_getsymval().  Postfix 3.7 sends a
	 * macro packet before every event anyway (milter8_event(), before
	 * each header and body chunk too, with the EOH and EOM lists), and
	 * takes an empty list as "the main.cf default" (MILTER_MACRO_EVAL
	 * in milter.c), so a stage that needs nothing keeps a short list.
	 */
	if (f0 & SMFIF_SETSYMLIST) {
		smfi_setsymlist(mctx, SMFIM_CONNECT, (char *)"{client_addr}");
		smfi_setsymlist(mctx, SMFIM_ENVFROM, (char *)"i {auth_authen}");
		smfi_setsymlist(mctx, SMFIM_ENVRCPT, (char *)"i");
		smfi_setsymlist(mctx, SMFIM_EOH, (char *)"i");
		smfi_setsymlist(mctx, SMFIM_EOM, (char *)"i");
	}
	return SMFIS_CONTINUE;
}

static char *
sockaddr_string(const struct sockaddr *sa)
{
	char buf[INET6_ADDRSTRLEN];
	const void *addr;

	if (sa == NULL)
		return NULL;
	if (sa->sa_family == AF_INET)
		addr = &((const struct sockaddr_in *)sa)->sin_addr;
	else if (sa->sa_family == AF_INET6)
		addr = &((const struct sockaddr_in6 *)sa)->sin6_addr;
	else
		return NULL;
	if (inet_ntop(sa->sa_family, addr, buf, sizeof(buf)) == NULL)
		return NULL;
	return g_strdup(buf);
}

static sfsistat
cb_connect(SMFICTX *mctx, char *hostname, _SOCK_ADDR *hostaddr)
{
	AmSession *s = session_get(mctx);
	const char *macro;

	if (s == NULL)
		return session_tempfail(mctx, NULL, "out of memory");
	g_free(s->client_addr);
	g_free(s->client_name);
	s->client_addr = sockaddr_string(hostaddr);
	if (s->client_addr == NULL &&
	    (macro = smfi_getsymval(mctx, (char *)"{client_addr}")) != NULL)
		s->client_addr = am_log_sanitize(macro, 64);
	s->client_name = hostname ? am_log_sanitize(hostname, 256) : NULL;
	return reply_continue(s, SMFIP_NR_CONN);
}

static sfsistat session_defer(AmSession *s, const char *reason,
                              unsigned long bit);
static sfsistat session_defer_error(AmSession *s, const GError *error,
                                    unsigned long bit);

static sfsistat
cb_envfrom(SMFICTX *mctx, char **argv)
{
	AmSession *s = session_get(mctx);
	g_autoptr(GError) error = NULL;
	const char *auth;

	if (s == NULL)
		return session_tempfail(mctx, NULL, "out of memory");
	session_reset_message(s);

	/* Step 1: the configuration this message is handled with. */
	s->ctx = am_milter_get_context();
	if (s->ctx == NULL)
		return session_defer(s, "milter not configured", SMFIP_NR_MAIL);

	/* Step 2: the envelope so far. */
	s->env = am_envelope_new();
	s->env->client_addr = g_strdup(s->client_addr);
	s->env->client_name = g_strdup(s->client_name);
	auth = smfi_getsymval(mctx, (char *)"{auth_authen}");
	if (auth != NULL && *auth != '\0')
		s->env->auth_user = am_log_sanitize(auth, 256);
	session_update_queue_id(mctx, s);
	if (!am_envelope_set_sender(s->env, argv, &error))
		return session_defer_error(s, error, SMFIP_NR_MAIL);

	/* Step 3: an empty capture. */
	s->cap = am_capture_new(s->ctx->config->capture_memory_max, NULL,
	                        s->leading_space);
	return reply_continue(s, SMFIP_NR_MAIL);
}

static sfsistat
cb_envrcpt(SMFICTX *mctx, char **argv)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(GError) error = NULL;

	/* The message is lost already (see session_defer): its end
	 * says so, not each recipient. */
	if (s != NULL && s->failure != NULL)
		return SMFIS_CONTINUE;
	if (s == NULL || s->env == NULL)
		return session_tempfail(mctx, s, "RCPT before MAIL");
	session_update_queue_id(mctx, s);

	/* A 4xx here refuses this recipient only: keep the message. */
	if (!am_envelope_add_recipient(s->env, argv, &error)) {
		am_log_warning("%s: recipient refused: %s",
		               s->env->queue_id ? s->env->queue_id : "NOQUEUE",
		               error->message);
		return reply_tempfail(mctx,
		                      "archive-milter: ", failure_text(error));
	}
	return SMFIS_CONTINUE;
}

/*
 * Header, end-of-header and body events.  With SMFIP_NR_HDR, NR_EOH and
 * NR_BODY negotiated, the MTA sends them without waiting (Postfix 3.7
 * milter8.c: skip_reply), and libmilter 8.17 must be told SMFIS_NOREPLY:
 * its sendreply() logs any other status as a lie and sends nothing, but
 * mi_engine() still takes a TEMPFAIL or REJECT as the end of the
 * message and ignores the rest of it, the end included, so the MTA
 * would wait for the final answer until its timeout.  A failure is
 * therefore kept in the session and answered at end of message (cb_eom),
 * with the same 451 and log line as before; without the NR flags the
 * same path is taken, answering continue meanwhile.  libmilter offers
 * the NR bits to xxfi_negotiate even when the MTA does not
 * (st_optionneg: fake_pflags) and then sends the continue itself, so
 * the deferral is what the MTA sees either way.
 */

/* Remember why this message must be tempfailed at its end (@reason
 * for the log, @text for the client); drop what was captured, since
 * nothing more is needed for it. */
static sfsistat
session_defer_full(AmSession *s, const char *reason, const char *text,
                   unsigned long bit)
{
	if (s != NULL && s->failure == NULL) {
		s->failure = g_strdup(reason);
		s->failure_reply = g_strdup(text);
		am_capture_free(s->cap);
		s->cap = NULL;
	}
	return reply_continue(s, bit);
}

static sfsistat
session_defer(AmSession *s, const char *reason, unsigned long bit)
{
	return session_defer_full(s, reason, reason, bit);
}

static sfsistat
session_defer_error(AmSession *s, const GError *error, unsigned long bit)
{
	return session_defer_full(s, error->message, failure_text(error), bit);
}

static sfsistat
cb_header(SMFICTX *mctx, char *name, char *value)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(GError) error = NULL;

	if (s != NULL && s->failure != NULL)
		return reply_continue(s, SMFIP_NR_HDR);
	if (s == NULL || s->cap == NULL)
		return session_defer(s, "header before MAIL", SMFIP_NR_HDR);
	if (!am_capture_add_header(s->cap, name, value, &error))
		return session_defer_error(s, error, SMFIP_NR_HDR);
	return reply_continue(s, SMFIP_NR_HDR);
}

/* The queue id is read again at end of message, not here. */
static sfsistat
cb_eoh(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(GError) error = NULL;

	if (s != NULL && s->failure != NULL)
		return reply_continue(s, SMFIP_NR_EOH);
	if (s == NULL || s->cap == NULL)
		return session_defer(s, "headers before MAIL", SMFIP_NR_EOH);
	if (!am_capture_end_headers(s->cap, &error))
		return session_defer_error(s, error, SMFIP_NR_EOH);
	return reply_continue(s, SMFIP_NR_EOH);
}

/*
 * XXX: an MTA that sends body data with SMFIC_BODYEOB (neither Postfix,
 * which sends them apart, nor Sendmail does) makes libmilter call this
 * from st_bodyend(), where SMFIS_NOREPLY under NR_BODY stops it from
 * calling xxfi_eom: that MTA would wait for the end-of-message answer
 * until its timeout.
 */
static sfsistat
cb_body(SMFICTX *mctx, unsigned char *data, size_t len)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(GError) error = NULL;

	if (s != NULL && s->failure != NULL)
		return reply_continue(s, SMFIP_NR_BODY);
	if (s == NULL || s->cap == NULL)
		return session_defer(s, "body before MAIL", SMFIP_NR_BODY);
	if (!am_capture_add_body(s->cap, data, len, &error))
		return session_defer_error(s, error, SMFIP_NR_BODY);
	return reply_continue(s, SMFIP_NR_BODY);
}

/*
 * Tell the MTA: quarantine, headers, then the reply.  What can fail
 * and change the answer (the hold queue) comes first, and the copies
 * are handed over only afterwards (am_milter_settle in cb_eom), so a
 * failure here still withdraws them.
 */
static sfsistat
verdict_apply(SMFICTX *mctx, AmSession *s, AmVerdict *v)
{
	guint i;

	/* Step 1: the hold queue; a rule asked for it, so a message that
	 * cannot be held is not let through unheld. */
	if (v->action == AM_VERDICT_ACCEPT && v->quarantine != NULL &&
	    smfi_quarantine(mctx, v->quarantine) != MI_SUCCESS)
		am_verdict_no_quarantine(v, "smfi_quarantine failed");

	/* Step 2: X-Archive-Status on the original, one per copy asking;
	 * with SMFIP_HDR_LEADSPC the value goes in as given. */
	for (i = 0; v->action == AM_VERDICT_ACCEPT && i < v->headers->len;
	     i++) {
		g_autofree char *value =
		    g_strconcat(s->leading_space ? " " : "",
		                (const char *)v->headers->pdata[i], NULL);

		if (smfi_addheader(mctx, (char *)"X-Archive-Status", value) !=
		    MI_SUCCESS)
			am_log_warning("cannot add X-Archive-Status: %s",
			               value);
	}

	/* Step 3: the reply. */
	switch (v->action) {
	case AM_VERDICT_TEMPFAIL:
		return reply_set(mctx, v->rcode, v->xcode, "", v->text,
		                 SMFIS_TEMPFAIL);
	case AM_VERDICT_REJECT:
		return reply_set(mctx, v->rcode, v->xcode, "", v->text,
		                 SMFIS_REJECT);
	case AM_VERDICT_ACCEPT:
	default:
		return SMFIS_CONTINUE;
	}
}

static sfsistat
cb_eom(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(AmVerdict) v = NULL;
	g_autoptr(GError) error = NULL;
	sfsistat ret;

	if (s != NULL && s->failure != NULL) {
		/* session_tempfail() clears the message, these with it. */
		g_autofree char *why = g_steal_pointer(&s->failure);
		g_autofree char *text = g_steal_pointer(&s->failure_reply);

		session_update_queue_id(mctx, s);
		return session_tempfail_full(mctx, s, why, text);
	}
	if (s == NULL || s->cap == NULL || s->env == NULL)
		return session_tempfail(mctx, s, "message before MAIL");
	session_update_queue_id(mctx, s);
	if (s->env->recipients->len == 0)
		return session_tempfail(mctx, s, "message without RCPT");
	/* No EOH event (SMFIP_NOEOH) and no body: the blank line now, so
	 * that the size the rules see is the whole message's. */
	if (!am_capture_end_headers(s->cap, &error))
		return session_tempfail_error(mctx, s, error);

	/* Decide, tell the MTA, and only then hand the copies over. */
	v = am_milter_archive(s->ctx, s->env, s->cap, !s->no_quarantine);
	ret = verdict_apply(mctx, s, v);
	am_milter_settle(s->ctx, v);
	session_reset_message(s);
	return ret;
}

static sfsistat
cb_abort(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);

	am_log_debug("milter: abort");
	if (s != NULL)
		session_reset_message(s);
	return SMFIS_CONTINUE;
}

static sfsistat
cb_close(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);

	am_log_debug("milter: close");
	if (s != NULL) {
		smfi_setpriv(mctx, NULL);
		session_free(s);
	}
	return SMFIS_CONTINUE;
}

gboolean
am_milter_register(GError **error)
{
	struct smfiDesc desc = {
	    .xxfi_name = (char *)"archive-milter",
	    .xxfi_version = SMFI_VERSION,
	    /* X-Archive-Status, and the hold queue for +quarantine. */
	    .xxfi_flags = SMFIF_ADDHDRS | SMFIF_QUARANTINE,
	    .xxfi_connect = cb_connect,
	    .xxfi_envfrom = cb_envfrom,
	    .xxfi_envrcpt = cb_envrcpt,
	    .xxfi_header = cb_header,
	    .xxfi_eoh = cb_eoh,
	    .xxfi_body = cb_body,
	    .xxfi_eom = cb_eom,
	    .xxfi_abort = cb_abort,
	    .xxfi_close = cb_close,
	    .xxfi_negotiate = cb_negotiate,
	};

	if (smfi_register(desc) == MI_SUCCESS)
		return TRUE;
	g_set_error(error, AM_MILTER_ERROR, 0, "smfi_register failed");
	return FALSE;
}
