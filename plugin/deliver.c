/*
 * deliver.c - synchronous delivery of one copy
 *
 * One SmtpClient per copy, closed with QUIT when done: simple, and at
 * archive volumes the connect costs less than the Postfix round trip
 * around it.  Status follows Postfix: "sent", "deferred" for anything a
 * retry may fix (4xx, no connection, time-out, lost connection),
 * "bounced" for a permanent refusal.  The dsn is the relay's enhanced
 * code, else one derived from the reply class, else from the failure.
 *
 * Each SmtpClient gets the relay's TLS level, CA file, credentials and
 * stage time limits as the configuration resolved them.
 *
 * copy_deadline bounds a whole copy, because the MTA is waiting: Postfix
 * gives a milter 300 s (milter_content_timeout) before it gives up on
 * it.  The library is synchronous and has only per-stage limits, so the
 * deadline is enforced from outside, at the two points we control:
 * before the connection (connect, greeting, EHLO, STARTTLS, AUTH) and
 * before the transaction (MAIL to the final reply), every stage limit
 * is cut to the time left; a deadline used up by the connection ends
 * the copy as a time-out without starting the transaction.
 *
 * Known limits: XXX: inside smtp_client_sendmail() each stage may use
 * all of the time left when the transaction began, so a relay that
 * answers every command just inside its limit can stretch a copy to a
 * few times the deadline; an exact bound needs a deadline inside the
 * library (a smtp_client_set_deadline(), say).  The QUIT sent when the
 * client is freed has the library's own 5 s limit, outside the
 * deadline.  `archive-milter --check` warns when the stage limits add up
 * past Postfix's 300 s.
 * XXX: no connection reuse or pool per relay yet (DESIGN.md section 2,
 * step 4); each copy pays a TCP connect and EHLO.  A permanent refusal
 * of the copy also fails the original under on_failure = tempfail,
 * until the policy table of issue 4 can say otherwise.
 */
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
am_delivery_free(AmDelivery *d)
{
	if (d == NULL)
		return;
	g_free(d->relay);
	g_ptr_array_unref(d->rcpts);
	g_free(d->reason);
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

/* The dsn of an error that came without a reply (RFC 3463). */
static const char *
error_dsn(const GError *error, gboolean temporary)
{
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
	gboolean temporary = smtp_error_is_temporary(error);
	AmStatus status = temporary ? AM_STATUS_DEFERRED : AM_STATUS_BOUNCED;

	if (reply != NULL && reply->code >= 400 && reply->code < 600) {
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

AmDelivery *
am_delivery_from_result(const char *const *to, const char *relay, double delay,
                        const SmtpResult *result, const GError *error)
{
	AmDelivery *d = g_new0(AmDelivery, 1);

	g_return_val_if_fail(result != NULL || error != NULL, d);
	d->relay = g_strdup(relay ? relay : "none");
	d->delay = delay;
	d->rcpts = g_ptr_array_new_with_free_func(rcpt_outcome_free);
	for (; *to != NULL; to++)
		g_ptr_array_add(d->rcpts, outcome_for(*to, result, error));
	delivery_summarize(d);
	return d;
}

/* No TCP connection means "relay=none", as Postfix logs it. */
static const char *
relay_name(SmtpClient *client, const GError *error)
{
	const char *stage = error ? smtp_error_get_stage(error) : NULL;

	if (error != NULL && g_strcmp0(stage, "connect") == 0)
		return "none";
	return smtp_client_get_peer(client);
}

SmtpTimeouts
am_deliver_clamp_timeouts(const SmtpTimeouts *t, gint64 remaining_ms)
{
	SmtpTimeouts out = *t;
	guint *fields[] = {&out.connect_ms, &out.command_ms, &out.data_ms,
	                   &out.final_ms};
	guint cap;
	guint i;

	/* 0 would mean the library's default of minutes: never pass it. */
	cap = (guint)CLAMP(remaining_ms, 1, (gint64)G_MAXUINT);
	for (i = 0; i < G_N_ELEMENTS(fields); i++) {
		if (*fields[i] == 0 || *fields[i] > cap)
			*fields[i] = cap;
	}
	return out;
}

/* Milliseconds left before @deadline (monotonic, in microseconds). */
static gint64
remaining_ms(gint64 deadline)
{
	return (deadline - g_get_monotonic_time()) / 1000;
}

static void
client_set_timeouts(SmtpClient *client, const AmRelay *relay, gint64 deadline)
{
	SmtpTimeouts t = relay->timeouts;

	if (relay->copy_deadline_ms > 0)
		t = am_deliver_clamp_timeouts(&t, remaining_ms(deadline));
	smtp_client_set_timeouts(client, &t);
}

static void
client_configure(SmtpClient *client, const AmRelay *relay, gint64 deadline)
{
	client_set_timeouts(client, relay, deadline);
	if (relay->helo_name != NULL)
		smtp_client_set_helo_name(client, relay->helo_name);
	smtp_client_set_tls(client, relay->tls, relay->ca_file);
	if (relay->auth_user != NULL)
		smtp_client_set_auth(client, relay->auth_user,
		                     relay->auth_password,
		                     relay->auth_plaintext);
}

/*
 * Connect under the deadline; then, with the stage limits cut to what
 * is left, check that there is time for the transaction at all.
 */
static gboolean
connect_in_time(SmtpClient *client, const AmRelay *relay, gint64 deadline,
                GError **error)
{
	if (!smtp_client_connect(client, error))
		return FALSE;
	if (relay->copy_deadline_ms == 0)
		return TRUE;
	if (remaining_ms(deadline) <= 0) {
		g_set_error(error, SMTP_ERROR, SMTP_ERROR_TIMEOUT,
		            "copy_deadline of %.3g s used up before MAIL",
		            relay->copy_deadline_ms / 1000.0);
		return FALSE;
	}
	client_set_timeouts(client, relay, deadline);
	return TRUE;
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

AmDelivery *
am_deliver(AmPool *pool, const AmCopyRequest *req)
{
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpResult) result = NULL;
	g_autoptr(GError) error = NULL;
	const char *options[3];
	gint64 start = g_get_monotonic_time();
	gint64 deadline = start + (gint64)req->relay->copy_deadline_ms * 1000;
	double delay;
	int n = 0;

	(void)pool; /* XXX: the pool is issue 4's, not written yet */
	/* The copy keeps the original's needs; the library drops BODY
	 * when unadvertised and refuses an unadvertised SMTPUTF8. */
	if (req->smtputf8)
		options[n++] = "SMTPUTF8";
	if (req->eightbit)
		options[n++] = "BODY=8BITMIME";
	options[n] = NULL;

	client = smtp_client_new(req->relay->host, req->relay->port);
	client_configure(client, req->relay, deadline);
	if (connect_in_time(client, req->relay, deadline, &error))
		result = smtp_client_sendmail(client, req->from, req->to,
		                              req->msg, options, NULL, &error);
	delay = (g_get_monotonic_time() - start) / (double)G_USEC_PER_SEC;
	warn_dropped(req->relay, result
	                             ? result->dropped_options
	                             : smtp_error_get_dropped_options(error));
	return am_delivery_from_result(req->to, relay_name(client, error),
	                               delay, result, error);
}
