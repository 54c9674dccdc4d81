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
 *                           AUTH, DOT for the end of message data, or
 *                           OTHER for any line of no known verb, such
 *                           as an AUTH continuation, whose REGEX is
 *                           matched against the whole line)
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
 * Details of the language:
 * - '#' opens a comment only as the first character of a line (a reply
 *   text may contain '#'); blank lines are ignored; trailing white space
 *   is dropped (write \x20 in raw text to send one).
 * - "on RCPT #2" (with a space) is read as "on RCPT#2", and
 *   "delay MS reply REPLY" as "delay MS REPLY".
 * - The first rule that matches wins; a command no rule matches gets the
 *   default reply of a plain accepting server (Postfix's wording: EHLO
 *   lists the keywords, MAIL 250, RCPT 250 or 503 without MAIL, DATA 354
 *   or 503 without MAIL/RCPT, DOT "250 2.0.0 Ok: queued as FAKEn",
 *   RSET and NOOP 250, QUIT 221, STARTTLS and AUTH 502, anything else
 *   500, a command line over 64 KiB 500).  A new MAIL, RSET, EHLO and
 *   HELO start a new transaction.
 * - The argument is what follows the verb and one space, e.g.
 *   "FROM:<a@b> SIZE=12"; for DOT the REGEX is matched against the
 *   un-dot-stuffed message.  Regexes are PCRE, case-sensitive unless
 *   written with (?i), and "\/" stands for a slash.
 * - A scripted reply (or raw text) acts by its code as a real server
 *   would: a 2xx MAIL starts the transaction, a 2xx RCPT adds an
 *   accepted recipient, a 354 to DATA starts message data, a 2xx DOT
 *   records the message; any other DOT reply (or close, stall) records
 *   nothing.  After a reply to QUIT, or any 421 (also as greeting), the
 *   server closes the connection (RFC 5321 section 3.8).
 * - stall keeps reading (and recording in fake_smtp_get_received) but
 *   processes no more commands on that connection.
 * - ehlo-keywords: each word is one EHLO line, except that a number
 *   joins the keyword before it ("SIZE 1000"), and so do the mechanisms
 *   after AUTH up to the next well-known keyword ("AUTH PLAIN LOGIN");
 *   shell quotes group anything else.  With no
 *   words, EHLO answers a single "250 fakesmtp".  A later ehlo-keywords
 *   or greeting directive replaces an earlier one.
 * - Message data ends only at CRLF.CRLF; a bare LF never ends a line
 *   there, so a client that lets one through is caught.  Command lines
 *   end at LF, with or without CR.
 *
 * Thread safety: the getters lock; call them from the test thread.
 */
#ifndef FAKESMTP_H
#define FAKESMTP_H

#include <glib.h>

G_BEGIN_DECLS

typedef struct FakeSmtp FakeSmtp;

/* Errors of fake_smtp_new (SCRIPT) and fake_smtp_start (LISTEN). */
#define FAKE_SMTP_ERROR (fake_smtp_error_quark())
GQuark fake_smtp_error_quark(void);

typedef enum {
	FAKE_SMTP_ERROR_SCRIPT, /* a bad script line; the message names it */
	FAKE_SMTP_ERROR_LISTEN, /* bad address, port in use, no store dir */
} FakeSmtpError;

/* One message as received. (transfer none) from fake_smtp_get_message */
typedef struct {
	char *mail_from;    /* argument of MAIL as sent, e.g.
				 * "FROM:<a@b> SIZE=12" */
	GPtrArray *rcpt_to; /* char *: arguments of accepted RCPTs */
	GBytes *wire;       /* DATA payload as received, up to and
				 * including the final CRLF.CRLF */
	GBytes *content;    /* the message: un-dot-stuffed, without the
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
 * its own, so a stalled connection does not hold up the next.
 * @store_dir, if not NULL, must exist and receives each message as a
 * file "N.eml" (content) and "N.env" (MAIL and RCPT lines), N counting
 * from 1 (see fake_smtp_start_port).
 * Returns: the port, or 0 with @error set.
 */
guint16 fake_smtp_start(FakeSmtp *fake, const char *address,
                        const char *store_dir, GError **error);

/*
 * fake_smtp_start_port: as fake_smtp_start, on a fixed @port (0: chosen
 * by the kernel), for fake-smtpd --port.  SO_REUSEADDR is set.
 * Store files: N.env is written before N.eml, each to a temporary name
 * then renamed, so a watcher that sees N.eml finds both complete.
 * N.env holds "MAIL <argument>" and one "RCPT <argument>" per accepted
 * recipient, each line ending in LF.  A message that cannot be stored
 * gets "451 4.3.0" (unless the script replies to DOT) and is not
 * recorded.  Only messages whose DOT was answered 2xx are recorded or
 * stored.
 * Returns: the port, or 0 with @error set.
 */
guint16 fake_smtp_start_port(FakeSmtp *fake, const char *address, guint16 port,
                             const char *store_dir, GError **error);

/* fake_smtp_stop: stop listening, close connections, join the threads;
 * returns promptly even while a connection stalls or delays.  What was
 * recorded stays readable; the server may be started again. */
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
