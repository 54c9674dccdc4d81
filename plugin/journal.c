/*
 * journal.c - build the journal copy
 *
 * The envelope goes into prepended headers rather than an envelope
 * report with the message attached: the original stays byte-identical
 * below them, so the archive can compare and hash it, and a reader sees
 * the message as its recipients did.
 *
 * Known limits: one X-Envelope-To line per recipient, never folded; a
 * message to many thousands of recipients gets as many lines.  An
 * address longer than the 998-octet line limit of RFC 5322 would make a
 * line too long; MTAs refuse such addresses long before (RFC 5321
 * section 4.5.3.1 caps a path at 256 octets).
 */
#include "journal.h"

static gboolean
append_address_header(GString *out, const char *name, const char *addr,
                      GError **error)
{
	const char *p;

	/* A CR or LF here would let the sender write our headers. */
	for (p = addr; *p != '\0'; p++) {
		if (g_ascii_iscntrl(*p)) {
			g_set_error(error, AM_CAPTURE_ERROR,
			            AM_CAPTURE_ERROR_INPUT,
			            "control character in an address");
			return FALSE;
		}
	}
	g_string_append_printf(out, "%s: <%s>\r\n", name, addr);
	return TRUE;
}

GBytes *
am_journal_prefix(const AmEnvelope *env, const char *archive_id, GError **error)
{
	g_autoptr(GString) out = g_string_new(NULL);
	guint i;

	if (!append_address_header(out, "X-Envelope-From",
	                           env->sender ? env->sender : "", error))
		return NULL;
	for (i = 0; i < env->recipients->len; i++)
		if (!append_address_header(out, "X-Envelope-To",
		                           env->recipients->pdata[i], error))
			return NULL;
	g_string_append_printf(out, "X-Archive-Id: %s\r\n", archive_id);
	return g_string_free_to_bytes(g_steal_pointer(&out));
}

SmtpMessage *
am_journal_build(const AmEnvelope *env, const char *archive_id, AmCapture *cap,
                 GError **error)
{
	g_autoptr(GBytes) prefix = am_journal_prefix(env, archive_id, error);
	g_autoptr(SmtpMessage) msg = NULL;

	if (prefix == NULL)
		return NULL;

	/* Bytes, not text: the original may be any 8-bit mess. */
	msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	smtp_message_append_bytes(msg, prefix);
	if (!am_capture_append_to(cap, msg, error))
		return NULL;
	return g_steal_pointer(&msg);
}
