/*
 * capture.h - one message as the MTA hands it to the milter
 *
 * AmEnvelope holds what the SMTP dialogue said (client, sender with its
 * MAIL parameters, every recipient, queue id).  AmCapture holds the
 * message bytes, rebuilt byte-exact from the milter's header and body
 * events, in memory up to a limit and in an unlinked temporary file
 * beyond it.
 */
#ifndef AM_CAPTURE_H
#define AM_CAPTURE_H

#include <glib.h>

#include "smtpclient.h"

G_BEGIN_DECLS

#define AM_CAPTURE_ERROR (am_capture_error_quark())
GQuark am_capture_error_quark(void);

typedef enum {
	AM_CAPTURE_ERROR_INPUT, /* the MTA sent something unusable */
	AM_CAPTURE_ERROR_IO,    /* the temporary file failed */
} AmCaptureError;

/*
 * AmEnvelope: the envelope of one message.  Every string is owned.
 */
typedef struct {
	char *queue_id;         /* macro "i"; NULL until known */
	char *client_addr;      /* "192.0.2.1", "::1"; NULL: unknown */
	char *client_name;      /* as the MTA resolved it; NULL: unknown */
	char *auth_user;        /* {auth_authen}; NULL: not authenticated */
	char *sender;           /* bare address; "" for the null sender */
	GPtrArray *mail_params; /* char *: ESMTP parameters of MAIL */
	GPtrArray *recipients;  /* char *: bare addresses, RCPT order */
	gboolean smtputf8;      /* MAIL had SMTPUTF8 */
	gboolean eightbit;      /* MAIL had BODY=8BITMIME */
} AmEnvelope;

/* am_envelope_new: an empty envelope. (transfer full) */
AmEnvelope *am_envelope_new(void);
void am_envelope_free(AmEnvelope *env);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmEnvelope, am_envelope_free)

/*
 * Longest envelope address taken, in octets: "X-Envelope-From: <" ADDR
 * ">" then fills the 998-octet line limit of RFC 5322 section 2.1.1
 * exactly, and an address cannot be folded (journal.h).  RFC 5321
 * section 4.5.3.1 allows 256 octets for a whole path.
 */
#define AM_ADDRESS_MAX 979

/*
 * am_address_strip: the bare address of a MAIL or RCPT argument
 * ("<a@b>" -> "a@b", "<>" -> ""), or NULL when @arg is not one address
 * in angle brackets or contains a control character.  (transfer full)
 */
char *am_address_strip(const char *arg);

/*
 * am_envelope_set_sender: record MAIL FROM from libmilter's @argv
 * (address first, then the parameters).  FALSE with @error (INPUT) when
 * the address is unusable or longer than AM_ADDRESS_MAX.
 */
gboolean am_envelope_set_sender(AmEnvelope *env, char **argv, GError **error);

/*
 * am_envelope_add_recipient: record one RCPT TO from @argv.  FALSE with
 * @error (INPUT) as for the sender; the milter then refuses this
 * recipient alone (4xx), never the message.
 */
gboolean am_envelope_add_recipient(AmEnvelope *env, char **argv,
                                   GError **error);

/* AmHeader: one header as the MTA gave it.  Owned by the capture. */
typedef struct {
	char *name;
	char *value; /* with its leading white space (when negotiated)
			 * and each fold as "\n" followed by white space */
} AmHeader;

/*
 * am_header_unfold: "Name: value" with the folds removed and the
 * leading white space of the value dropped, as rules match headers.
 * (transfer full)
 */
char *am_header_unfold(const AmHeader *header);

typedef struct AmCapture AmCapture;

/*
 * am_capture_new: an empty capture that keeps up to @memory_max octets
 * in memory and spills to a temporary file in @tmpdir (NULL: $TMPDIR,
 * else /var/tmp) above that.  @leading_space: header values arrive with
 * their own leading white space (SMFIP_HDR_LEADSPC was negotiated);
 * otherwise the MTA removed one space, which the rebuild puts back.
 * (transfer full)
 */
AmCapture *am_capture_new(gsize memory_max, const char *tmpdir,
                          gboolean leading_space);
void am_capture_free(AmCapture *cap);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmCapture, am_capture_free)

/*
 * The headers are also kept apart, in memory, for the rules and the
 * X-Archive-Id check, whatever memory_max says: so their number and
 * their octets (names and values) are capped.  Tiny headers cost far
 * more memory than their size (about 100 octets each), and the MTA
 * does not cap their number (Postfix: only message_size_limit).  Real
 * mail stays far below both.  XXX: both are constants, not
 * configuration keys; a site that must take more has to rebuild.
 */
#define AM_CAPTURE_HEADERS_MAX       10000
#define AM_CAPTURE_HEADER_OCTETS_MAX (4 * 1024 * 1024)

/*
 * Events in MTA order: each header, the end of headers, body chunks.
 * Each fails with @error (IO) when the temporary file cannot be written,
 * or (INPUT) on a header that cannot be rebuilt (a bad name, a CR or LF
 * that is not a fold) or that passes a limit above; the capture is then
 * unusable and the message should be tempfailed.
 */
gboolean am_capture_add_header(AmCapture *cap, const char *name,
                               const char *value, GError **error);
gboolean am_capture_end_headers(AmCapture *cap, GError **error);
gboolean am_capture_add_body(AmCapture *cap, const guchar *data, gsize len,
                             GError **error);

/* The headers seen, AmHeader *, in order. (transfer none) */
const GPtrArray *am_capture_get_headers(const AmCapture *cap);

/* Octets captured so far (headers, blank line, body). */
guint64 am_capture_get_size(const AmCapture *cap);

/* TRUE once the capture lives in a temporary file. */
gboolean am_capture_is_spilled(const AmCapture *cap);

/*
 * am_capture_append_to: add the captured message to @msg without
 * copying it: the memory buffer by reference, or the temporary file as
 * a file segment.  Ends headers first if the MTA sent no EOH.
 */
gboolean am_capture_append_to(AmCapture *cap, SmtpMessage *msg, GError **error);

/*
 * am_capture_read_all: the whole message as bytes (for tests and small
 * diagnostics; reads the temporary file back).  (transfer full)
 */
GBytes *am_capture_read_all(AmCapture *cap, GError **error);

G_END_DECLS

#endif /* AM_CAPTURE_H */
