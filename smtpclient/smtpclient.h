/*
 * smtpclient.h - public API of libsmtpclient
 *
 * A synchronous SMTP client whose core call, smtp_client_sendmail(), has
 * the contract of Python's smtplib.SMTP.sendmail: it returns normally
 * when at least one recipient was accepted, with the map of refused
 * recipients, and fails with one GError code per outcome otherwise.
 *
 * One SmtpClient is one connection, used by one thread at a time.  It
 * can be reused for many messages: after a refusal it sends RSET so
 * the next call starts clean; after a lost connection, a time-out or a
 * malformed reply it closes, and the next call connects again.
 *
 * Unlike the reference, the library never sends bytes as given: in both
 * message kinds every lone CR and lone LF becomes CRLF, lines starting
 * with "." are doubled, and the data ends with CRLF before the final
 * ".".  A lone CR or LF on the wire is how SMTP smuggling works.
 *
 * STARTTLS (levels as Postfix names them) and AUTH PLAIN/LOGIN are
 * part of smtp_client_connect(); see smtp_client_set_tls() and
 * smtp_client_set_auth().
 *
 * With PIPELINING advertised (RFC 2920), MAIL, every RCPT and DATA go
 * out in one write and the replies are matched back in order; with
 * smtp_client_send_batch() they also ride behind the previous message's
 * end marker.
 */
#ifndef SMTPCLIENT_H
#define SMTPCLIENT_H

#include <glib.h>

G_BEGIN_DECLS

/* ------------------------------------------------------------------ */
/* Errors                                                               */
/* ------------------------------------------------------------------ */

#define SMTP_ERROR (smtp_error_quark())

/*
 * SmtpErrorCode: one code per outcome.  Every error raised by this
 * library is in the SMTP_ERROR domain and carries an SmtpReply (see
 * smtp_error_get_reply()); code 0 there means no reply was involved.
 */
typedef enum {
	SMTP_ERROR_RECIPIENTS_REFUSED, /* every RCPT refused */
	SMTP_ERROR_SENDER_REFUSED,     /* MAIL FROM refused */
	SMTP_ERROR_DATA,               /* DATA or the final "." refused */
	SMTP_ERROR_HELO,               /* both EHLO and HELO refused */
	SMTP_ERROR_NOT_SUPPORTED,      /* SMTPUTF8 asked, not advertised */
	SMTP_ERROR_CONNECT,            /* no connection could be made */
	SMTP_ERROR_TIMEOUT,            /* a stage's time limit ran out */
	SMTP_ERROR_DISCONNECTED,       /* 421, or the peer closed */
	SMTP_ERROR_TLS,                /* STARTTLS or the handshake */
	SMTP_ERROR_AUTH,               /* authentication failed */
	SMTP_ERROR_PROTOCOL,           /* malformed or unexpected reply */
	SMTP_ERROR_INPUT,              /* bad caller input, nothing sent */
	SMTP_ERROR_IO,                 /* a local write failed (errno kept,
	                                * see smtp_error_get_errno()) */
} SmtpErrorCode;

GQuark smtp_error_quark(void);

/*
 * SmtpReply: one server reply.  All strings are owned by the struct.
 */
typedef struct {
	int code;       /* 3-digit reply code; 0: no reply */
	char *enhanced; /* "X.Y.Z" (RFC 3463) or NULL; kept only
	                 * when well formed (1 to 3 digits after
	                 * each dot) and X is the code's class */
	char *text;     /* text after code and enhanced code; lines
				 * of a multi-line reply joined by "\n";
				 * never NULL ("" when the server sent none) */
} SmtpReply;

/*
 * SmtpRefusal: one refused recipient.  Owned by the array holding it.
 */
typedef struct {
	char *recipient; /* the address as the caller gave it */
	SmtpReply reply; /* the server's answer to its RCPT */
} SmtpRefusal;

/*
 * smtp_error_get_reply: the server reply behind @error, or NULL when
 * @error is not in SMTP_ERROR.  (transfer none): valid as long as
 * @error.  reply->code is 0 for errors no reply caused (CONNECT,
 * TIMEOUT, INPUT, a closed socket).
 */
const SmtpReply *smtp_error_get_reply(const GError *error);

/*
 * smtp_error_get_refused: for SMTP_ERROR_RECIPIENTS_REFUSED, the array
 * of SmtpRefusal, one per recipient, in the order given; for a later
 * error of a transaction in which some recipients were refused (DATA or
 * the end of data refused, the connection lost after RCPT), those
 * refusals, each with its own RCPT reply; otherwise NULL.
 * (transfer none).
 */
const GPtrArray *smtp_error_get_refused(const GError *error);

/*
 * smtp_error_get_stage: the SMTP stage the error happened in, as a
 * static string ("connect", "greeting", "ehlo", "helo", "starttls",
 * "auth", "mail", "rcpt", "data", "message", "end-of-data", "rset",
 * "quit", "input", "write"), or NULL for errors outside SMTP_ERROR.
 */
const char *smtp_error_get_stage(const GError *error);

/*
 * smtp_error_get_errno: for SMTP_ERROR_IO, the errno value of the
 * failed system call (e.g. ENOSPC or EDQUOT for a full disk), so a
 * caller can tell "disk full" from other failures without parsing the
 * message; 0 for every other error and outside SMTP_ERROR.
 */
int smtp_error_get_errno(const GError *error);

/*
 * smtp_error_get_dropped_options: options the caller asked for that the
 * server does not advertise and that were therefore not sent (transfer
 * none, array of char *, may be empty); NULL outside SMTP_ERROR.
 */
const GPtrArray *smtp_error_get_dropped_options(const GError *error);

/*
 * smtp_error_is_temporary: TRUE when retrying later may succeed: a 4xx
 * reply, CONNECT (except a 5xx greeting such as 554, which is
 * permanent), TIMEOUT, DISCONNECTED (a 421 at any stage, even inside a
 * multi-line reply), IO (a full disk may be freed), PROTOCOL (a garbled
 * reply or replies out of step: the session went wrong, not the
 * message; RFC 5321 clients retry), and a step refused with a 1xx to
 * 3xx reply (250 to DATA: out of step too); for RECIPIENTS_REFUSED,
 * TRUE when any refusal was not 5xx.  FALSE for 5xx, INPUT, TLS, AUTH
 * (without a reply or with a 5xx) and NOT_SUPPORTED.  This is the one
 * answer: the milter and smtp-send both go by it.
 */
gboolean smtp_error_is_temporary(const GError *error);

/* smtp_reply_clear: free the strings of @reply and zero it. */
void smtp_reply_clear(SmtpReply *reply);

/* smtp_refusal_free: free one SmtpRefusal (GDestroyNotify-compatible). */
void smtp_refusal_free(gpointer refusal);

/* ------------------------------------------------------------------ */
/* Messages                                                             */
/* ------------------------------------------------------------------ */

/*
 * SmtpMessageKind: the two input kinds of the reference.
 * TEXT must be ASCII, or UTF-8 when SMTPUTF8 or BODY=8BITMIME is in the
 * MAIL options; anything else is SMTP_ERROR_INPUT before MAIL is sent.
 * BYTES is not checked.  Both are encoded the same way on the wire.
 */
typedef enum {
	SMTP_MESSAGE_BYTES,
	SMTP_MESSAGE_TEXT,
} SmtpMessageKind;

/*
 * SmtpMessage: a message as a chain of segments, each either bytes in
 * memory or a range of a file descriptor.  Segments are read in order
 * and streamed, so memory does not grow with the size of file parts.
 * A message can be sent more than once (files are read with pread()).
 * Opaque; create with smtp_message_new(), free with smtp_message_free().
 */
typedef struct SmtpMessage SmtpMessage;

SmtpMessage *smtp_message_new(SmtpMessageKind kind);
void smtp_message_free(SmtpMessage *msg);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(SmtpMessage, smtp_message_free)

/* Append @bytes (a reference is taken; the caller keeps its own). */
void smtp_message_append_bytes(SmtpMessage *msg, GBytes *bytes);

/* Append a copy of @len bytes at @data. */
void smtp_message_append_data(SmtpMessage *msg, const void *data, gsize len);

/*
 * Append @len bytes of @fd starting at @offset; @len -1 means up to the
 * end of the file as fstat() sees it now.  @fd is dup()ed: the caller
 * keeps and closes its own.  Fails (SMTP_ERROR_INPUT) when @fd cannot
 * be dup()ed or stat()ed.
 *
 * A range given with @len -1 stays "the whole rest of the file": every
 * later read of the message (the SIZE count, the text check, the send,
 * smtp_message_write_raw) first fstat()s @fd and fails with
 * SMTP_ERROR_INPUT (stage "message") if the file's size is no longer
 * the one seen here, and after the range's last block reads one octet
 * past its end, failing the same way if there is one.  A file that grew
 * or shrank is thus never sent cut: sendmail closes the connection
 * without the end marker.  With @len >= 0 only the range matters; the
 * file may grow behind it.  (A -1 range that is empty now is kept too,
 * for the same check.)
 */
gboolean smtp_message_append_fd(SmtpMessage *msg, int fd, goffset offset,
                                gint64 len, GError **error);

/* The message size in octets before encoding. */
guint64 smtp_message_get_size(const SmtpMessage *msg);

/*
 * smtp_message_write_raw: write the segments of @msg to @fd in order,
 * exactly as they are: NOT encoded for SMTP (no CRLF normalisation, no
 * dot-stuffing, no end marker).  For keeping a message on disk, e.g. in
 * a spool, to be sent later from that file.  Short writes and EINTR are
 * handled; @fd stays open and owned by the caller, its file offset moves
 * by the octets written (write(), not pwrite(), so pipes work too).
 * Nothing is synced: fsync() is the caller's.  @msg is unchanged and
 * can still be sent or written again.
 * Returns: TRUE when every octet was written.  FALSE with @error set
 * otherwise, after which an unknown part may have been written:
 * - SMTP_ERROR_INPUT (stage "message") when a file segment cannot be
 *   read or has become shorter than it was when appended, or longer
 *   when it was appended "to the end" (@len -1);
 * - SMTP_ERROR_IO (stage "write") when write() fails; the message has
 *   strerror()'s text, and smtp_error_get_errno() gives errno's value
 *   (ENOSPC, EDQUOT, EIO, ...).  A write() that returns 0 counts as
 *   ENOSPC.
 */
gboolean smtp_message_write_raw(SmtpMessage *msg, int fd, GError **error);

/*
 * smtp_message_write_raw_sum: smtp_message_write_raw(), and every octet
 * written is also fed to @sum, from the same buffer, in order: a digest
 * of what was written without reading it back.  On failure @sum holds
 * an unknown prefix.
 */
gboolean smtp_message_write_raw_sum(SmtpMessage *msg, int fd, GChecksum *sum,
                                    GError **error);

/* ------------------------------------------------------------------ */
/* The client                                                           */
/* ------------------------------------------------------------------ */

/* TLS levels, named as Postfix names them (smtp_tls_security_level). */
typedef enum {
	SMTP_TLS_NONE,    /* never STARTTLS */
	SMTP_TLS_MAY,     /* STARTTLS when offered, no verification */
	SMTP_TLS_ENCRYPT, /* STARTTLS required, no verification */
	SMTP_TLS_VERIFY,  /* required; chain and host name checked */
} SmtpTlsLevel;

/*
 * SmtpTimeouts: per-stage limits in milliseconds (RFC 5321 section
 * 4.5.3.2 gives the classic values: 5 min for commands, 3 min per data
 * block, 10 min for the final reply).  0 means "use the default".
 */
typedef struct {
	guint connect_ms; /* TCP connect and the 220 greeting */
	guint command_ms; /* each command's reply, each write */
	guint data_ms;    /* each block of message data written */
	guint final_ms;   /* the reply to the final "." */
} SmtpTimeouts;

typedef struct SmtpClient SmtpClient;

/*
 * smtp_client_new: a client for @host (name or address literal, no
 * brackets) and @port.  No connection is made yet.  (transfer full):
 * free with smtp_client_free(), which sends QUIT if connected.
 */
SmtpClient *smtp_client_new(const char *host, guint16 port);
void smtp_client_free(SmtpClient *client);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(SmtpClient, smtp_client_free)

/* The name sent with EHLO/HELO; default: the host name, or
 * "localhost.localdomain" when it has no dot.  Copied. */
void smtp_client_set_helo_name(SmtpClient *client, const char *name);

/* Per-stage time limits; zero fields keep the RFC 5321 defaults. */
void smtp_client_set_timeouts(SmtpClient *client, const SmtpTimeouts *t);

/*
 * smtp_client_set_deadline: a hard overall limit, in microseconds of
 * g_get_monotonic_time() (e.g. g_get_monotonic_time() + 120 *
 * G_USEC_PER_SEC); 0 (or less) removes it.  Every wait after this call
 * (connect, greeting, each reply, each write, the TLS handshake, QUIT,
 * also on an open connection) ends at the stage's own limit or at the
 * deadline, whichever comes first, so a server that answers each
 * command just inside its limit cannot hold the caller much past it.
 * When the deadline ends a wait, or has passed before a command would
 * be sent, the error is SMTP_ERROR_TIMEOUT (also in stage "connect",
 * where a stage limit gives CONNECT); its stage is where it ran out and
 * its message says "overall deadline ran out in STAGE ...".  As with
 * every time-out the connection is then closed, and QUIT is skipped
 * once the deadline has passed (smtp_client_free does not wait).
 * The deadline stays until changed: a caller that reuses the client
 * for another message sets a new one (or 0) first.  Name resolution
 * (getaddrinfo) is not limited by it.
 */
void smtp_client_set_deadline(SmtpClient *client, gint64 deadline_us);

/*
 * TLS level and CA file (NULL: system store), used from the next
 * connect.  Copied.  At MAY a server that does not offer STARTTLS (or
 * refuses it) gets clear text; at ENCRYPT and VERIFY that is
 * SMTP_ERROR_TLS before MAIL.  Only VERIFY checks the chain (against
 * @ca_file) and the host name given to smtp_client_new() (a name
 * against DNS entries, an address literal against IP entries).  At any
 * level a failed handshake is SMTP_ERROR_TLS, never a fallback to clear
 * text; so is anything the server sends between its 220 to STARTTLS
 * and the handshake.  After STARTTLS, EHLO is sent again and only its
 * answer counts.  TLS 1.2 at least; SNI for names.  A TLS error is
 * temporary only when the server answered STARTTLS with 4xx.
 */
void smtp_client_set_tls(SmtpClient *client, SmtpTlsLevel level,
                         const char *ca_file);

/*
 * AUTH credentials (copied; the password is wiped when replaced or on
 * free and never appears in an error or a log), used from the next
 * connect, after STARTTLS.  PLAIN is preferred, then LOGIN; "AUTH="
 * advertisements are understood.  Without TLS the credentials are sent
 * only when @allow_plaintext is TRUE.  SMTP_ERROR_AUTH, before any
 * credential is sent, when they would go unencrypted, when the server
 * offers no AUTH or no known mechanism; with the server's reply when it
 * refuses them (535: permanent, 454: temporary).  Any of these closes
 * the connection.
 */
void smtp_client_set_auth(SmtpClient *client, const char *user,
                          const char *password, gboolean allow_plaintext);

/*
 * smtp_client_connect: connect, read the greeting and say EHLO (or HELO
 * when EHLO is refused).  Does nothing when already connected.
 * Then STARTTLS and AUTH as set.
 * Errors: CONNECT, TIMEOUT, DISCONNECTED, HELO, PROTOCOL, TLS, AUTH.
 */
gboolean smtp_client_connect(SmtpClient *client, GError **error);

/* TRUE while the connection is open. */
gboolean smtp_client_is_connected(const SmtpClient *client);

/*
 * smtp_client_get_peer: "host[address]:port" of the connection, or of
 * the last attempt; "none" before any.  (transfer none): valid until
 * the next connect or free.  Used for "relay=" in log lines.
 */
const char *smtp_client_get_peer(const SmtpClient *client);

/*
 * smtp_client_has_extension: whether the server advertised @keyword in
 * its EHLO reply (case-insensitive); FALSE after HELO.  @param, if not
 * NULL, receives the parameters (transfer none) or "".
 */
gboolean smtp_client_has_extension(const SmtpClient *client,
                                   const char *keyword, const char **param);

/*
 * smtp_client_rset: send RSET.  Used between messages and after errors
 * (sendmail already does).  Errors: DISCONNECTED, TIMEOUT, PROTOCOL.
 */
gboolean smtp_client_rset(SmtpClient *client, GError **error);

/* smtp_client_quit: send QUIT and close; never fails. */
void smtp_client_quit(SmtpClient *client);

/*
 * SmtpRecipient: one recipient with its own RCPT options (NULL-
 * terminated, may be NULL), for the lower-level smtp_client_send().
 */
typedef struct {
	const char *address;
	const char *const *options;
} SmtpRecipient;

/*
 * SmtpResult: what a successful send returns.  (transfer full): free
 * with smtp_result_free().
 */
typedef struct {
	GPtrArray *refused;         /* SmtpRefusal *, in recipient order; empty
				 * when every recipient was accepted */
	GPtrArray *dropped_options; /* char *: options not advertised by
				 * the server and therefore not sent */
	SmtpReply reply;            /* the server's answer to the final "." */
} SmtpResult;

void smtp_result_free(SmtpResult *result);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(SmtpResult, smtp_result_free)

/*
 * smtp_client_sendmail: send @msg from @from to every address of
 * @recipients (NULL-terminated, at least one), with @mail_options on
 * MAIL and @rcpt_options on every RCPT (either NULL-terminated or NULL).
 * Connects first when not connected.  Addresses are given bare, without
 * angle brackets; "" as @from is the null sender <>.
 *
 * SIZE= is added when advertised, with the size the message takes on
 * the wire (line ends made CRLF, leading dots doubled), so it is never
 * less than what is sent; counting it reads the message once more
 * before MAIL.  A file segment that changes after it was counted, or
 * shrinks, or (appended with @len -1) grows, is caught before the end
 * marker goes out: the connection is closed without it and the error is
 * INPUT (stage "message") naming the file.  Other options are sent only when
 * their keyword is advertised (BODY= needs 8BITMIME, SMTPUTF8 needs
 * SMTPUTF8, RET/ENVID/NOTIFY/ORCPT need DSN); SMTPUTF8 unadvertised is
 * SMTP_ERROR_NOT_SUPPORTED before MAIL, others are dropped and listed in
 * the result.  After HELO no option is sent at all.
 *
 * Returns: (transfer full) the result when at least one recipient was
 * accepted and the message taken; NULL with @error set otherwise.
 * Errors: every SmtpErrorCode.  INPUT (a CR, LF or NUL in an address or
 * option, a non-ASCII address without SMTPUTF8, text that is not ASCII)
 * is raised before anything is sent.  After a refusal (SENDER_REFUSED,
 * RECIPIENTS_REFUSED, DATA) the connection stays open and has been
 * RSET; after INPUT and NOT_SUPPORTED it stays open untouched, since no
 * transaction was begun.  After CONNECT, DISCONNECTED, TIMEOUT, PROTOCOL
 * and HELO the reply stream cannot be trusted: the connection is closed
 * and the next call connects again.  A connect time-out is CONNECT
 * (stage "connect"): to the caller the relay is simply unreachable.
 * A reply of a class its command cannot have (1xx or 3xx to MAIL, RCPT
 * or the end of data; 1xx or 2xx to DATA) is no refusal but the stream
 * out of step: PROTOCOL "replies out of step" (temporary), at the stage
 * of that command, with that reply, and no refused recipients; the
 * connection is closed without RSET.
 */
SmtpResult *smtp_client_sendmail(SmtpClient *client, const char *from,
                                 const char *const *recipients,
                                 SmtpMessage *msg,
                                 const char *const *mail_options,
                                 const char *const *rcpt_options,
                                 GError **error);

/*
 * smtp_client_send: the same with options per recipient (@rcpts,
 * @n_rcpts >= 1), as forwarding with ORCPT= needs.
 */
SmtpResult *smtp_client_send(SmtpClient *client, const char *from,
                             const char *const *mail_options,
                             const SmtpRecipient *rcpts, gsize n_rcpts,
                             SmtpMessage *msg, GError **error);

/*
 * SmtpJob: one message for smtp_client_send_batch().  The caller fills
 * the first five fields (as for smtp_client_send(); they must stay
 * valid during the call); the call fills exactly one of the last two.
 */
typedef struct {
	const char *from;
	const char *const *mail_options; /* NULL-terminated, or NULL */
	const SmtpRecipient *rcpts;
	gsize n_rcpts;
	SmtpMessage *msg;
	SmtpResult *result; /* out: (transfer full) when sent, else NULL */
	GError *error;      /* out: (transfer full) when not, else NULL */
} SmtpJob;

/*
 * smtp_client_send_batch: send @n_jobs messages over @client, in order.
 * Each job ends exactly as smtp_client_send() of its fields, called
 * for each job in turn, would have ended: its own result or its own
 * error (code, reply, stage, refused recipients, dropped options), and
 * a failure of one job never shows in another's outcome.  A job that
 * fails does not stop the next; a lost connection is made again for
 * the next job, as smtp_client_send() would.
 *
 * The difference is speed: when the server advertises PIPELINING, the
 * next job's MAIL, RCPTs and DATA go out in the same write as the
 * current message's end marker (RFC 2920 section 3.1), so a message
 * costs one round trip instead of two.  That is done only when the next
 * job passes its input checks on the current connection and has at
 * most 99 recipients; otherwise it starts on its own, as it would
 * alone.  Its commands are then already on their way when the current
 * message's end is answered: if that answer is a refusal, no RSET
 * follows (none is needed, RFC 5321 section 4.1.1.4: the end of data
 * closes the transaction), and if the connection is lost there, the
 * next job is started again from scratch on a new connection; the
 * server cannot have delivered it, as its data never went out.
 *
 * Two outcomes differ from sending alone, both caused by what the
 * look-ahead wrote.  When the server answers the end marker and then
 * closes (a relay that takes one message per connection), the next
 * job's commands get no reply at all, not even a 421: that job, none
 * of whose data went out, is started again once on a new connection
 * (alone, on the old connection, it would fail DISCONNECTED at "mail").
 * A timeout, a 421 or any reply to its commands is not retried.  And
 * when the server sends one reply too many after the end marker, the
 * next job's replies come shifted: the first whose class does not fit
 * its command makes it PROTOCOL "replies out of step" (see
 * smtp_client_sendmail), the connection is dropped without RSET, and
 * the job after it starts on a new connection (alone, the stray reply
 * is found before MAIL, also PROTOCOL).  While
 * the server takes in the current message, the next one is encoded,
 * when it is all in memory and at most 64 KiB (one more encoded
 * message held, at most 128 KiB): that work is then off the path from
 * the 354 to the data.  A message with file parts is read in its turn.
 *
 * Every job's result and error fields are overwritten; free each with
 * smtp_result_free() and g_error_free().
 */
void smtp_client_send_batch(SmtpClient *client, SmtpJob *jobs, gsize n_jobs);

/*
 * SmtpJobDone: called by smtp_client_send_batch_full() as soon as job
 * @index of @jobs has its outcome (its result or error set; both stay
 * the caller's), before anything of the jobs after it is read or
 * written, except the next job's commands when they went out behind
 * this job's end marker.  The caller may act on the outcome at once
 * (log it, forget the message), and may set the client's deadline for
 * the next job (smtp_client_set_deadline).  Returns TRUE to go on with
 * the batch, FALSE to end it there.
 */
typedef gboolean (*SmtpJobDone)(SmtpJob *jobs, gsize index, gpointer data);

/*
 * smtp_client_send_batch_full: smtp_client_send_batch() with @done
 * (NULL: none) called after each job.  When @done ends the batch, the
 * jobs after @index are not sent: both their result and their error
 * stay NULL (the only case where a job gets neither), and when the next
 * job's commands were already on their way, the connection is dropped
 * without QUIT so that the server delivers nothing of it.
 */
void smtp_client_send_batch_full(SmtpClient *client, SmtpJob *jobs,
                                 gsize n_jobs, SmtpJobDone done, gpointer data);

/* ------------------------------------------------------------------ */
/* Helpers shared by the library's users                                */
/* ------------------------------------------------------------------ */

/*
 * smtp_host_is_loopback: whether @host (a name or an address literal
 * without brackets) is this machine: "localhost", 127.0.0.0/8 or ::1.
 * No name is resolved.
 */
gboolean smtp_host_is_loopback(const char *host);

/*
 * smtp_tls_default_for_host: the level for @host when none was chosen:
 * SMTP_TLS_NONE on loopback (the traffic never leaves the machine),
 * SMTP_TLS_VERIFY anywhere else.  archive-milter's configuration and
 * smtp-send both take their default from here.
 */
SmtpTlsLevel smtp_tls_default_for_host(const char *host);

/* smtp_tls_level_name: "none", "may", "encrypt", "verify" (static);
 * "unknown" for anything else. */
const char *smtp_tls_level_name(SmtpTlsLevel level);

/* smtp_tls_level_from_name: the level named @name (exactly those four
 * words, lower case); FALSE, *@level untouched, for anything else. */
gboolean smtp_tls_level_from_name(const char *name, SmtpTlsLevel *level);

/*
 * smtp_password_file_read: the first line of @path (without LF or
 * CRLF), for smtp_client_set_auth().  The file must be a regular file
 * that neither its group nor others may read, and the line must be
 * 1 to 1024 octets without NUL.
 * Returns: (transfer full) the password; free it with
 * smtp_password_free(), which wipes it.  NULL with @error in
 * G_FILE_ERROR otherwise; the message gives the reason (and the mode
 * when that is the problem) but neither @path nor any byte of the file,
 * so callers prefix the path themselves.
 */
char *smtp_password_file_read(const char *path, GError **error);

/**
 * smtp_ca_file_check: whether @path can be opened for reading and is a
 * regular file, so that a wrong CA file shows when it is configured
 * and not as a failed handshake at the first connection.
 * Returns: TRUE if so.  FALSE with @error in G_FILE_ERROR otherwise:
 * the code from errno when open() or fstat() fails, else
 * G_FILE_ERROR_INVAL; the message is only the reason (the strerror()
 * text, or "not a regular file"), without @path, so callers prefix the
 * path and the setting themselves.
 */
gboolean smtp_ca_file_check(const char *path, GError **error);

/* smtp_password_free: wipe and free a password, or any string that
 * held a secret; NULL is ignored. */
void smtp_password_free(char *password);

G_END_DECLS

#endif /* SMTPCLIENT_H */
