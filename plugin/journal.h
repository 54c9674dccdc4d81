/*
 * journal.h - the journal copy of a message
 *
 * The copy is the original message, unchanged, preceded by headers that
 * record its envelope, so that the archive knows who really received
 * it (BCC recipients included) and can drop duplicates by id.
 *
 * How an archive reads the envelope: it is the lines from the top of
 * the copy down to and including the first X-Archive-Id line, nothing
 * else.  The original below is the sender's and may carry its own
 * X-Envelope-From, X-Envelope-To or X-Archive-Id lines (anyone can
 * write them, and the MTA passes them on): those are not the envelope.
 */
#ifndef AM_JOURNAL_H
#define AM_JOURNAL_H

#include <glib.h>

#include "capture.h"
#include "smtpclient.h"

G_BEGIN_DECLS

/*
 * am_journal_prefix: the headers put in front of the original:
 *   X-Envelope-From: <SENDER>
 *   X-Envelope-To: <RCPT>        (one per envelope recipient)
 *   X-Archive-Id: ID
 * each ending in CRLF.  NULL with @error (AM_CAPTURE_ERROR_INPUT) when
 * an address holds a control character, or would make its line longer
 * than 998 octets (RFC 5322 section 2.1.1; an address cannot be
 * folded).  (transfer full)
 */
GBytes *am_journal_prefix(const AmEnvelope *env, const char *archive_id,
                          GError **error);

/*
 * am_journal_build: the copy as a message of two segments, the prefix
 * and the captured bytes (memory by reference, or the temporary file),
 * so no large body is copied.  (transfer full)
 */
SmtpMessage *am_journal_build(const AmEnvelope *env, const char *archive_id,
                              AmCapture *cap, GError **error);

G_END_DECLS

#endif /* AM_JOURNAL_H */
