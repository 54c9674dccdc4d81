/*
 * journal.c - build the journal copy
 *
 * The envelope goes into prepended headers rather than an envelope
 * report with the message attached: the original stays byte-identical
 * below them, so the archive can compare and hash it, and a reader sees
 * the message as its recipients did.
 *
 * An address cannot be folded, so a line that would pass the 998-octet
 * limit of RFC 5322 section 2.1.1 is refused (INPUT), never cut nor
 * encoded into a form the archive would have to know: a cut address
 * names someone else, and an encoded one is lost on any archive that
 * does not decode it.  The envelope (capture.c) already refuses such
 * addresses when the MTA hands them over, so only a recipient that a
 * caller adds by hand can get here; RFC 5321 section 4.5.3.1 caps a
 * path at 256 octets anyway.
 *
 * Known limits: one X-Envelope-To line per recipient, never folded; a
 * message to many thousands of recipients gets as many lines.
 */
#include <string.h>

#include "journal.h"

/* RFC 5322 section 2.1.1: at most 998 octets before the CRLF. */
#define LINE_MAX_OCTETS 998

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

	/* NAME ": <" ADDR ">" */
	if (strlen(name) + 4 + strlen(addr) > LINE_MAX_OCTETS) {
		g_set_error(error, AM_CAPTURE_ERROR, AM_CAPTURE_ERROR_INPUT,
		            "%s address of %zu octets does not fit in a "
		            "header line of %d octets",
		            name, strlen(addr), LINE_MAX_OCTETS);
		return FALSE;
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
