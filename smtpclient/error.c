/*
 * error.c - the SMTP_ERROR domain and what each error carries
 *
 * Every error of the library is an extended GError (GLib 2.68+): next
 * to the message it keeps the server's reply, the stage, the refused
 * recipients and the dropped options, so callers can log the relay's
 * words and decide between retry and bounce without parsing messages.
 * The extra data survives g_error_copy() and is freed with the error.
 */
#include <stdarg.h>

#include "smtp-private.h"

typedef struct {
	SmtpReply reply;    /* code 0 when no reply caused the error */
	const char *stage;  /* static string, never NULL once set */
	GPtrArray *refused; /* SmtpRefusal *, or NULL */
	GPtrArray *dropped; /* char *, never NULL */
	int errnum;         /* errno behind SMTP_ERROR_IO, else 0 */
} SmtpErrorPrivate;

static void
smtp_error_private_init(SmtpErrorPrivate *priv)
{
	priv->reply.text = g_strdup("");
	priv->stage = "input";
	priv->dropped = g_ptr_array_new_with_free_func(g_free);
}

static GPtrArray *
copy_refused(const GPtrArray *src)
{
	GPtrArray *dest;

	dest = g_ptr_array_new_full(src->len, smtp_refusal_free);
	for (guint i = 0; i < src->len; i++) {
		const SmtpRefusal *r = g_ptr_array_index(src, i);
		SmtpRefusal *copy = g_new0(SmtpRefusal, 1);

		copy->recipient = g_strdup(r->recipient);
		smtp_reply_copy(&r->reply, &copy->reply);
		g_ptr_array_add(dest, copy);
	}
	return dest;
}

static void
smtp_error_private_copy(const SmtpErrorPrivate *src, SmtpErrorPrivate *dest)
{
	/* dest was initialised: drop what init put there first. */
	smtp_reply_clear(&dest->reply);
	smtp_reply_copy(&src->reply, &dest->reply);
	dest->stage = src->stage;
	dest->errnum = src->errnum;
	if (src->refused != NULL)
		dest->refused = copy_refused(src->refused);
	for (guint i = 0; i < src->dropped->len; i++)
		g_ptr_array_add(dest->dropped,
		                g_strdup(g_ptr_array_index(src->dropped, i)));
}

static void
smtp_error_private_clear(SmtpErrorPrivate *priv)
{
	smtp_reply_clear(&priv->reply);
	g_clear_pointer(&priv->refused, g_ptr_array_unref);
	g_clear_pointer(&priv->dropped, g_ptr_array_unref);
}

G_DEFINE_EXTENDED_ERROR(SmtpError, smtp_error)

void
smtp_reply_copy(const SmtpReply *src, SmtpReply *dest)
{
	dest->code = src->code;
	dest->enhanced = g_strdup(src->enhanced);
	dest->text = g_strdup(src->text != NULL ? src->text : "");
}

void
smtp_reply_clear(SmtpReply *reply)
{
	if (reply == NULL)
		return;
	g_clear_pointer(&reply->enhanced, g_free);
	g_clear_pointer(&reply->text, g_free);
	reply->code = 0;
}

void
smtp_refusal_free(gpointer refusal)
{
	SmtpRefusal *r = refusal;

	if (r == NULL)
		return;
	g_free(r->recipient);
	smtp_reply_clear(&r->reply);
	g_free(r);
}

void
smtp_set_error(GError **error, SmtpErrorCode code, const char *stage,
               const SmtpReply *reply, const char *fmt, ...)
{
	g_autofree char *msg = NULL;
	SmtpErrorPrivate *priv;
	va_list ap;

	if (error == NULL)
		return;
	va_start(ap, fmt);
	msg = g_strdup_vprintf(fmt, ap);
	va_end(ap);

	/* The reply goes into the message too: callers that only log
	 * error->message still show what the relay said. */
	if (reply != NULL && reply->code != 0) {
		g_set_error(error, SMTP_ERROR, code, "%s: %d%s%s%s%s", msg,
		            reply->code, reply->enhanced ? " " : "",
		            reply->enhanced ? reply->enhanced : "",
		            reply->text[0] ? " " : "", reply->text);
	} else {
		g_set_error_literal(error, SMTP_ERROR, code, msg);
	}
	if (*error == NULL || (*error)->domain != SMTP_ERROR)
		return;
	priv = smtp_error_get_private(*error);
	priv->stage = stage;
	if (reply != NULL) {
		smtp_reply_clear(&priv->reply);
		smtp_reply_copy(reply, &priv->reply);
	}
}

void
smtp_error_take_refused(GError *error, GPtrArray *refused)
{
	SmtpErrorPrivate *priv = smtp_error_get_private(error);

	g_clear_pointer(&priv->refused, g_ptr_array_unref);
	priv->refused = refused;
}

void
smtp_error_set_stage(GError *error, const char *stage)
{
	smtp_error_get_private(error)->stage = stage;
}

void
smtp_error_set_dropped(GError *error, const GPtrArray *dropped)
{
	SmtpErrorPrivate *priv = smtp_error_get_private(error);

	g_ptr_array_set_size(priv->dropped, 0);
	for (guint i = 0; dropped != NULL && i < dropped->len; i++)
		g_ptr_array_add(priv->dropped,
		                g_strdup(g_ptr_array_index(dropped, i)));
}

static SmtpErrorPrivate *
get_priv(const GError *error)
{
	if (error == NULL || error->domain != SMTP_ERROR)
		return NULL;
	return smtp_error_get_private(error);
}

const SmtpReply *
smtp_error_get_reply(const GError *error)
{
	SmtpErrorPrivate *priv = get_priv(error);

	return priv != NULL ? &priv->reply : NULL;
}

const GPtrArray *
smtp_error_get_refused(const GError *error)
{
	SmtpErrorPrivate *priv = get_priv(error);

	/* Set for RECIPIENTS_REFUSED, and for a later error of a
	 * transaction in which some recipients were refused. */
	return priv != NULL ? priv->refused : NULL;
}

const char *
smtp_error_get_stage(const GError *error)
{
	SmtpErrorPrivate *priv = get_priv(error);

	return priv != NULL ? priv->stage : NULL;
}

void
smtp_error_set_errno(GError *error, int errnum)
{
	smtp_error_get_private(error)->errnum = errnum;
}

int
smtp_error_get_errno(const GError *error)
{
	SmtpErrorPrivate *priv = get_priv(error);

	if (priv == NULL || error->code != SMTP_ERROR_IO)
		return 0;
	return priv->errnum;
}

const GPtrArray *
smtp_error_get_dropped_options(const GError *error)
{
	SmtpErrorPrivate *priv = get_priv(error);

	return priv != NULL ? priv->dropped : NULL;
}

/*
 * Whether a reply that refused a step calls for a later try: a 4xx.  A
 * reply of a class its command cannot have (a 250 to DATA, a 354 to
 * RCPT) is raised as PROTOCOL by sendmail.c (in_step), never kept as a
 * refusal; should one reach here all the same, it is the server out of
 * step, as temporary as PROTOCOL.  No reply (code 0) is not temporary.
 */
static gboolean
reply_is_temporary(const SmtpReply *reply)
{
	return reply->code > 0 && reply->code / 100 != 5;
}

gboolean
smtp_error_is_temporary(const GError *error)
{
	SmtpErrorPrivate *priv = get_priv(error);

	if (priv == NULL)
		return FALSE;
	switch ((SmtpErrorCode)error->code) {
	case SMTP_ERROR_CONNECT:
		/* Unreachable is temporary; a 554 greeting (RFC 5321
		 * section 3.1: "no SMTP service here") is the server's
		 * lasting answer. */
		return priv->reply.code / 100 != 5;
	case SMTP_ERROR_TIMEOUT:
	case SMTP_ERROR_DISCONNECTED:
	case SMTP_ERROR_IO:
		return TRUE;
	case SMTP_ERROR_PROTOCOL:
		/* A garbled reply, or replies out of step with our
		 * commands: this session went wrong (a broken relay, a
		 * middlebox, a restart), which says nothing lasting about
		 * the message.  RFC 5321 clients, Postfix's smtp(8) among
		 * them, try again later. */
		return TRUE;
	case SMTP_ERROR_INPUT:
	case SMTP_ERROR_NOT_SUPPORTED:
		return FALSE;
	case SMTP_ERROR_RECIPIENTS_REFUSED:
		for (guint i = 0; priv->refused && i < priv->refused->len;
		     i++) {
			const SmtpRefusal *r =
			    g_ptr_array_index(priv->refused, i);

			if (reply_is_temporary(&r->reply))
				return TRUE;
		}
		return FALSE;
	default:
		/* SENDER_REFUSED, DATA, HELO, TLS, AUTH: the reply decides;
		 * a TLS or AUTH failure without a reply is our side's or
		 * the peer's setup, which waiting does not fix. */
		return reply_is_temporary(&priv->reply);
	}
}
