/*
 * fakesmtp.h - the scripted fake SMTP server of the tests
 *
 * A small SMTP server on 127.0.0.1 (or ::1) whose every reply can be
 * scripted, used in-process by the GTest suites (it runs in its own
 * thread) and as the standalone `fake-smtpd` by end-to-end tests that
 * need a relay with faults.  With no script it behaves as a plain,
 * accepting ESMTP server.  It records every byte it receives, and every
 * message (envelope and the DATA payload, still dot-stuffed exactly as
 * received, plus the un-stuffed content), so tests can assert on wire
 * bytes.
 *
 * Script language (one directive per line, '#' starts a comment):
 *
 *   greeting REPLY          the greeting; "greeting none" never greets
 *   ehlo-keywords K1 K2...  EHLO extension lines (default: 8BITMIME
 *                           SIZE 10485760 SMTPUTF8 DSN ENHANCEDSTATUSCODES)
 *   on VERB[#N] [/REGEX/] ACTION
 *                           for the Nth (1-based, counted per connection;
 *                           omitted: every) command VERB (EHLO, HELO,
 *                           MAIL, RCPT, DATA, RSET, NOOP, QUIT, STARTTLS,
 *                           AUTH, or DOT for the end of message data)
 *                           whose argument matches REGEX (optional)
 *   ACTION is one of:
 *     reply REPLY           send REPLY (see below)
 *     close                 close the connection without a reply
 *     stall                 never answer (hold the connection open
 *                           until the client closes or the server stops)
 *     delay MS REPLY        wait MS milliseconds, then reply
 *     raw TEXT              send TEXT as is (C escapes \r \n \\ \xHH)
 *     close-in-data         (DATA only) answer 354, then close after
 *                           the first chunk of message data arrives
 *
 * REPLY is "CODE TEXT"; a multi-line reply joins its lines with "|":
 * "250-first|250 last".  Lines are sent with CRLF.
 *
 * Thread safety: the getters lock; call them from the test thread.
 */
#ifndef FAKESMTP_H
#define FAKESMTP_H

#include <glib.h>

G_BEGIN_DECLS

typedef struct FakeSmtp FakeSmtp;

/* One message as received. (transfer none) from fake_smtp_get_message */
typedef struct {
	char *mail_from;	/* argument of MAIL as sent, e.g.
				 * "FROM:<a@b> SIZE=12" */
	GPtrArray *rcpt_to;	/* char *: arguments of accepted RCPTs */
	GBytes *wire;		/* DATA payload as received, up to and
				 * including the final CRLF.CRLF */
	GBytes *content;	/* the message: un-dot-stuffed, without the
				 * final "." line */
} FakeSmtpMessage;

/*
 * fake_smtp_new: parse @script (NULL or "" for a plain server).
 * Returns: (transfer full) or NULL with @error naming the bad line.
 */
FakeSmtp *fake_smtp_new(const char *script, GError **error);

/*
 * fake_smtp_start: listen on @address ("127.0.0.1" or "::1") on a free
 * port chosen by the kernel; each connection is served in a thread of
 * its own, so a stalled connection does not hold up the next.  @store_dir, if not NULL, receives each message as a file
 * "N.eml" (content) and "N.env" (MAIL and RCPT lines).
 * Returns: the port, or 0 with @error set.
 */
guint16 fake_smtp_start(FakeSmtp *fake, const char *address,
			const char *store_dir, GError **error);

/* fake_smtp_stop: stop listening, close connections, join the thread. */
void fake_smtp_stop(FakeSmtp *fake);

/* fake_smtp_free: stop if running and free. */
void fake_smtp_free(FakeSmtp *fake);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(FakeSmtp, fake_smtp_free)

/* Every byte received so far, all connections. (transfer full) */
GBytes *fake_smtp_get_received(FakeSmtp *fake);

/* Every command line received, without CRLF, all connections.
 * (transfer full): free with g_ptr_array_unref. */
GPtrArray *fake_smtp_get_commands(FakeSmtp *fake);

/* Number of connections accepted and of complete messages. */
guint fake_smtp_get_connections(FakeSmtp *fake);
guint fake_smtp_get_message_count(FakeSmtp *fake);

/* The @i-th message (0-based) or NULL. (transfer none): valid until
 * fake_smtp_free. */
const FakeSmtpMessage *fake_smtp_get_message(FakeSmtp *fake, guint i);

/*
 * fake_smtp_wait_messages: wait up to @timeout_ms until at least @n
 * messages have been received; TRUE if they have.
 */
gboolean fake_smtp_wait_messages(FakeSmtp *fake, guint n, guint timeout_ms);

G_END_DECLS

#endif /* FAKESMTP_H */
