/*
 * milter.c - the libmilter callbacks: the daemon's spine
 *
 * libmilter runs one thread per SMTP connection and calls us in SMTP
 * order; the state of a connection lives in its private data (AmSession)
 * and that of a message is reset at MAIL, at abort and after EOM.  All
 * archive work happens at end of message, when the envelope and the
 * whole message are known: copies go out synchronously there, so the
 * original is accepted only after the relay took every copy (or the
 * rule says to accept anyway).
 *
 * Bad input from the MTA is never an assertion: it tempfails the
 * message with a 451 that says why.
 *
 * Known limits: XXX: no spool yet (issue 4): a copy that fails is
 * either tempfailed with the original or lost, as on_failure says.  A
 * recipient that a later milter removes is still in the journal.
 * Memory allocation failures abort the process (GLib's g_malloc); the
 * MTA then applies milter_default_action, which should be tempfail.
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
	char *client_addr;      /* from xxfi_connect, or {client_addr} */
	char *client_name;
	AmContext *ctx;  /* the current message's, or NULL */
	AmEnvelope *env; /* the current message's, or NULL */
	AmCapture *cap;
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

static void
log_delivery(const AmEnvelope *env, const AmDelivery *d)
{
	guint i;

	for (i = 0; i < d->rcpts->len; i++) {
		const AmRcptOutcome *o = d->rcpts->pdata[i];
		AmLogDelivery line = {
		    .queue_id = env->queue_id,
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

/* Build, send and log one copy; FALSE (and @reason) when it failed. */
static gboolean
copy_one(AmContext *ctx, const AmRule *rule, const AmEnvelope *env,
         AmCapture *cap, char **reason)
{
	g_autofree char *id = am_archive_id_new(ctx->key);
	g_autoptr(GError) error = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(AmDelivery) d = NULL;
	AmCopyRequest req;

	msg = am_journal_build(env, id, cap, &error);
	if (msg == NULL) {
		am_log_error("%s: rule %s: cannot build copy: %s",
		             env->queue_id ? env->queue_id : "NOQUEUE",
		             rule->name, error->message);
		*reason = g_strdup(error->message);
		return FALSE;
	}
	am_log_debug("milter: %s: rule %s: X-Archive-Id %s",
	             env->queue_id ? env->queue_id : "NOQUEUE", rule->name, id);

	req = (AmCopyRequest){
	    .relay = rule->relay,
	    .from = rule->archive_from ? rule->archive_from : "",
	    .to = (const char *const *)rule->archive_to,
	    .msg = msg,
	    .smtputf8 = env->smtputf8,
	    .eightbit = env->eightbit,
	};
	d = am_deliver(ctx->pool, &req);
	log_delivery(env, d);
	if (d->status == AM_STATUS_SENT)
		return TRUE;
	*reason = g_strdup(d->reason);
	return FALSE;
}

AmVerdict
am_milter_archive(AmContext *ctx, const AmEnvelope *env, AmCapture *cap,
                  char **reason)
{
	const GPtrArray *headers = am_capture_get_headers(cap);
	g_autoptr(GPtrArray) rules = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *detail = NULL;
	const char *own;
	gboolean tempfail = FALSE;
	guint i, failed = 0;

	*reason = NULL;

	/* Step 1: our own copy, back through the MTA: never copy again. */
	own = returning_copy_id(ctx, env, headers);
	if (own != NULL) {
		g_autofree char *id = g_strstrip(g_strdup(own));
		g_autofree char *why = g_strdup_printf(
		    "returning archive copy, X-Archive-Id=%s", id);

		am_log_decision(env->queue_id, "accept", 0, 0, why);
		return AM_VERDICT_ACCEPT;
	}

	/* Step 2: which rules want a copy; undecidable: no accept. */
	rules = am_rules_select(ctx->config, env, headers,
	                        am_capture_get_size(cap), &error);
	if (rules == NULL) {
		am_log_decision(env->queue_id, "tempfail", 0, 0,
		                error->message);
		*reason = g_strdup("archive rules could not be applied");
		return AM_VERDICT_TEMPFAIL;
	}
	if (rules->len == 0) {
		am_log_decision(env->queue_id, "accept", 0, 0,
		                "no rule matched");
		return AM_VERDICT_ACCEPT;
	}

	/* Step 3: one copy per rule; each failure applies its rule. */
	for (i = 0; i < rules->len; i++) {
		const AmRule *rule = rules->pdata[i];
		g_autofree char *why = NULL;

		if (copy_one(ctx, rule, env, cap, &why))
			continue;
		failed++;
		if (!(rule->on_failure & AM_ACTION_ACCEPT) && !tempfail) {
			tempfail = TRUE;
			*reason = g_steal_pointer(&why);
		}
	}

	/* Step 4: one line says what the MTA was told. */
	if (tempfail)
		detail = g_strdup_printf("archive copy failed: %s", *reason);
	else if (failed > 0)
		detail = g_strdup("archive copy failed, on_failure=accept");
	else
		detail = g_strdup("all copies sent");
	am_log_decision(env->queue_id, tempfail ? "tempfail" : "accept",
	                rules->len, failed, detail);
	return tempfail ? AM_VERDICT_TEMPFAIL : AM_VERDICT_ACCEPT;
}

/* ------------------------------------------------------------------ */
/* Sessions                                                             */
/* ------------------------------------------------------------------ */

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
}

static void
session_free(AmSession *s)
{
	session_reset_message(s);
	g_free(s->client_addr);
	g_free(s->client_name);
	g_free(s);
}

/* libmilter needs '%' doubled; CR and LF would make the call fail. */
static char *
reply_text(const char *prefix, const char *reason)
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

static sfsistat
reply_tempfail(SMFICTX *mctx, const char *prefix, const char *reason)
{
	g_autofree char *text = reply_text(prefix, reason);

	if (smfi_setreply(mctx, (char *)"451", (char *)"4.3.0", text) !=
	    MI_SUCCESS)
		am_log_warning("cannot set the reply text");
	return SMFIS_TEMPFAIL;
}

/* Bad input or a local failure: log, tempfail and forget the message. */
static sfsistat
session_tempfail(SMFICTX *mctx, AmSession *s, const char *reason)
{
	am_log_decision(s && s->env ? s->env->queue_id : NULL, "tempfail", 0, 0,
	                reason);
	if (s != NULL)
		session_reset_message(s);
	return reply_tempfail(mctx, "archive-milter: ", reason);
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

/* ------------------------------------------------------------------ */
/* Callbacks                                                            */
/* ------------------------------------------------------------------ */

static sfsistat
cb_negotiate(SMFICTX *mctx, unsigned long f0, unsigned long f1,
             unsigned long f2, unsigned long f3, unsigned long *pf0,
             unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
	AmSession *s = session_get(mctx);
	const unsigned long skip =
	    SMFIP_NOHELO | SMFIP_NOUNKNOWN | SMFIP_NODATA;

	(void)f2;
	(void)f3;
	if (s == NULL)
		return SMFIS_REJECT;

	/* Values with their own leading space keep headers byte-exact. */
	*pf0 = 0;
	*pf1 = (f1 & SMFIP_HDR_LEADSPC) | (f1 & skip);
	*pf2 = 0;
	*pf3 = 0;
	s->leading_space = (f1 & SMFIP_HDR_LEADSPC) != 0;
	if (!s->leading_space)
		am_log_debug("milter: MTA offers no SMFIP_HDR_LEADSPC; one "
		             "space after each colon is assumed");

	/* Asking replaces the MTA's default list for that stage. */
	if (f0 & SMFIF_SETSYMLIST) {
		smfi_setsymlist(mctx, SMFIM_CONNECT,
		                (char *)"{client_addr} {client_name} j _");
		smfi_setsymlist(mctx, SMFIM_ENVFROM,
		                (char *)"i {auth_authen} {auth_type} "
		                        "{mail_addr}");
		smfi_setsymlist(mctx, SMFIM_ENVRCPT, (char *)"i {rcpt_addr}");
		smfi_setsymlist(mctx, SMFIM_EOH, (char *)"i");
		smfi_setsymlist(mctx, SMFIM_EOM, (char *)"i {msg_id}");
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
	return SMFIS_CONTINUE;
}

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
		return session_tempfail(mctx, s, "milter not configured");

	/* Step 2: the envelope so far. */
	s->env = am_envelope_new();
	s->env->client_addr = g_strdup(s->client_addr);
	s->env->client_name = g_strdup(s->client_name);
	auth = smfi_getsymval(mctx, (char *)"{auth_authen}");
	if (auth != NULL && *auth != '\0')
		s->env->auth_user = am_log_sanitize(auth, 256);
	session_update_queue_id(mctx, s);
	if (!am_envelope_set_sender(s->env, argv, &error))
		return session_tempfail(mctx, s, error->message);

	/* Step 3: an empty capture. */
	s->cap = am_capture_new(s->ctx->config->capture_memory_max, NULL,
	                        s->leading_space);
	return SMFIS_CONTINUE;
}

static sfsistat
cb_envrcpt(SMFICTX *mctx, char **argv)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(GError) error = NULL;

	if (s == NULL || s->env == NULL)
		return session_tempfail(mctx, s, "RCPT before MAIL");
	session_update_queue_id(mctx, s);

	/* A 4xx here refuses this recipient only: keep the message. */
	if (!am_envelope_add_recipient(s->env, argv, &error)) {
		am_log_warning("%s: recipient refused: %s",
		               s->env->queue_id ? s->env->queue_id : "NOQUEUE",
		               error->message);
		return reply_tempfail(mctx, "archive-milter: ", error->message);
	}
	return SMFIS_CONTINUE;
}

static sfsistat
cb_header(SMFICTX *mctx, char *name, char *value)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(GError) error = NULL;

	if (s == NULL || s->cap == NULL)
		return session_tempfail(mctx, s, "header before MAIL");
	if (!am_capture_add_header(s->cap, name, value, &error))
		return session_tempfail(mctx, s, error->message);
	return SMFIS_CONTINUE;
}

static sfsistat
cb_eoh(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(GError) error = NULL;

	if (s == NULL || s->cap == NULL)
		return session_tempfail(mctx, s, "headers before MAIL");
	session_update_queue_id(mctx, s);
	if (!am_capture_end_headers(s->cap, &error))
		return session_tempfail(mctx, s, error->message);
	return SMFIS_CONTINUE;
}

static sfsistat
cb_body(SMFICTX *mctx, unsigned char *data, size_t len)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autoptr(GError) error = NULL;

	if (s == NULL || s->cap == NULL)
		return session_tempfail(mctx, s, "body before MAIL");
	if (!am_capture_add_body(s->cap, data, len, &error))
		return session_tempfail(mctx, s, error->message);
	return SMFIS_CONTINUE;
}

static sfsistat
cb_eom(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);
	g_autofree char *reason = NULL;
	AmVerdict verdict;

	if (s == NULL || s->cap == NULL || s->env == NULL)
		return session_tempfail(mctx, s, "message before MAIL");
	session_update_queue_id(mctx, s);
	if (s->env->recipients->len == 0)
		return session_tempfail(mctx, s, "message without RCPT");

	verdict = am_milter_archive(s->ctx, s->env, s->cap, &reason);
	session_reset_message(s);
	if (verdict == AM_VERDICT_TEMPFAIL)
		return reply_tempfail(mctx, "archive copy failed: ", reason);
	return SMFIS_CONTINUE;
}

static sfsistat
cb_abort(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);

	if (s != NULL)
		session_reset_message(s);
	return SMFIS_CONTINUE;
}

static sfsistat
cb_close(SMFICTX *mctx)
{
	AmSession *s = smfi_getpriv(mctx);

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
	    .xxfi_flags = 0,
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
