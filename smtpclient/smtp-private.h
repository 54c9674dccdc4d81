/*
 * smtp-private.h - internals shared by the modules of libsmtpclient
 *
 * Not installed.  The tests include it to reach the reply parser, the
 * message encoder and the UTF-8 checker directly; nothing else should.
 *
 * Modules: error.c (the extended GError), reply.c (the reply parser),
 * io.c (the socket, its poll() timeouts and the transport hook a TLS
 * layer will fill), message.c (segments and the wire encoder),
 * client.c (session: greeting, EHLO/HELO, RSET, QUIT), sendmail.c
 * (the transaction).
 */
#ifndef SMTP_PRIVATE_H
#define SMTP_PRIVATE_H

#include <sys/types.h>

#include "smtpclient.h"

G_BEGIN_DECLS

/* ------------------------------------------------------------------ */
/* error.c                                                              */
/* ------------------------------------------------------------------ */

/*
 * smtp_set_error: raise @code in @stage (a static string) with a copy
 * of @reply (NULL: no reply).  The message is formatted from @fmt; when
 * a reply is given its code and text are appended to it.
 */
void smtp_set_error(GError **error, SmtpErrorCode code, const char *stage,
                    const SmtpReply *reply, const char *fmt, ...)
    G_GNUC_PRINTF(5, 6);

/* Give @refused (SmtpRefusal *) to @error, which must be in SMTP_ERROR. */
void smtp_error_take_refused(GError *error, GPtrArray *refused);

/* Change the stage @error names (parser errors are raised without
 * knowing which command the reply answered). */
void smtp_error_set_stage(GError *error, const char *stage);

/* Keep @errnum in @error (SMTP_ERROR_IO) for smtp_error_get_errno(). */
void smtp_error_set_errno(GError *error, int errnum);

/* Copy @dropped (char *) into @error, which must be in SMTP_ERROR. */
void smtp_error_set_dropped(GError *error, const GPtrArray *dropped);

/* Deep copy of @src into @dest (which is overwritten, not cleared). */
void smtp_reply_copy(const SmtpReply *src, SmtpReply *dest);

/* ------------------------------------------------------------------ */
/* reply.c                                                              */
/* ------------------------------------------------------------------ */

/* Limits of the reply parser; beyond them the reply is PROTOCOL. */
#define SMTP_REPLY_MAX_LINE  4096 /* octets per line, without EOL */
#define SMTP_REPLY_MAX_LINES 100  /* lines per reply */

typedef enum {
	SMTP_PARSE_MORE,  /* the reply is not complete yet */
	SMTP_PARSE_DONE,  /* one reply parsed, see _take() */
	SMTP_PARSE_ERROR, /* malformed; the parser is now useless */
} SmtpParseStatus;

typedef struct SmtpReplyParser SmtpReplyParser;

SmtpReplyParser *smtp_reply_parser_new(void);
void smtp_reply_parser_free(SmtpReplyParser *parser);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(SmtpReplyParser, smtp_reply_parser_free)

/*
 * smtp_reply_parser_feed: consume bytes of @data until one reply is
 * complete or @len is used up; *@consumed says how many were taken
 * (bytes after a complete reply are left for the next one).
 * On SMTP_PARSE_ERROR @error is set (SMTP_ERROR_PROTOCOL).
 */
SmtpParseStatus smtp_reply_parser_feed(SmtpReplyParser *parser,
                                       const char *data, gsize len,
                                       gsize *consumed, GError **error);

/* Move the completed reply into @reply and reset for the next one. */
void smtp_reply_parser_take(SmtpReplyParser *parser, SmtpReply *reply);

/* ------------------------------------------------------------------ */
/* io.c                                                                 */
/* ------------------------------------------------------------------ */

typedef struct SmtpConn SmtpConn;

/*
 * SmtpTransport: how bytes move over a connection.  The plain one uses
 * recv()/send(); a TLS layer provides its own.  recv and send return
 * the byte count, 0 for end of stream (recv only), or -1 with errno;
 * on EAGAIN they set *@want to the poll() events to wait for (a TLS
 * read can need the socket writable).  pending says, without blocking,
 * whether application data from the server waits, buffered in the
 * transport or still on the socket.
 */
typedef struct {
	ssize_t (*recv)(SmtpConn *conn, void *buf, gsize len, short *want);
	ssize_t (*send)(SmtpConn *conn, const void *buf, gsize len,
	                short *want);
	gboolean (*pending)(SmtpConn *conn);
	void (*close)(SmtpConn *conn); /* before the fd is closed */
} SmtpTransport;

/*
 * smtp_conn_open: resolve @host, try each address with a non-blocking
 * connect limited to @timeout_ms each.  *@peer receives
 * "host[address]:port" of the last address tried (transfer full),
 * also on failure when any address was tried.
 * Errors: SMTP_ERROR_CONNECT (stage "connect"), also when the limit ran
 * out: the caller needs "unreachable", whatever the reason.  But when
 * @hard_deadline (monotonic us, 0: none; kept as the connection's hard
 * deadline) ran out first, SMTP_ERROR_TIMEOUT: the caller's overall
 * limit, not the relay, ended the attempt.
 */
SmtpConn *smtp_conn_open(const char *host, guint16 port, guint timeout_ms,
                         gint64 hard_deadline, char **peer, GError **error);
void smtp_conn_free(SmtpConn *conn);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(SmtpConn, smtp_conn_free)

int smtp_conn_get_fd(const SmtpConn *conn);

/* The hard deadline of @conn (monotonic us, 0: none): no wait on it
 * goes past it, whatever the stage's limit. */
void smtp_conn_set_deadline(SmtpConn *conn, gint64 deadline);

/* The end of a wait of @timeout_ms starting now, cut to the hard
 * deadline; *@is_hard is TRUE when the hard deadline is the end. */
gint64 smtp_conn_deadline(const SmtpConn *conn, guint timeout_ms,
                          gboolean *is_hard);

/* SMTP_ERROR_TIMEOUT in @stage saying that the overall deadline ran out
 * (@doing: "while sending", "waiting for the reply", ...). */
void smtp_set_deadline_error(GError **error, const char *stage,
                             const char *doing);

/*
 * smtp_conn_write: write all @len bytes within @timeout_ms (and the
 * hard deadline, which, once passed, fails it before a byte is sent).
 * Errors: SMTP_ERROR_TIMEOUT, SMTP_ERROR_DISCONNECTED, both in @stage.
 */
gboolean smtp_conn_write(SmtpConn *conn, const void *data, gsize len,
                         guint timeout_ms, const char *stage, GError **error);

/*
 * smtp_conn_read_reply: read one whole reply within @timeout_ms and
 * the hard deadline.
 * Bytes after it stay buffered.  Errors: TIMEOUT, DISCONNECTED (end of
 * stream or a reset), PROTOCOL; all in @stage.  After an error the
 * connection must be closed: its reply stream is out of step.
 */
gboolean smtp_conn_read_reply(SmtpConn *conn, guint timeout_ms,
                              const char *stage, SmtpReply *reply,
                              GError **error);

/* TRUE when bytes the server sent wait unread: in our buffer, in the
 * transport's, or on the socket.  Before we speak there must be none:
 * such bytes are replies sent ahead of their commands, or injected
 * before a STARTTLS handshake. */
gboolean smtp_conn_has_pending(SmtpConn *conn);

/* ------------------------------------------------------------------ */
/* message.c                                                            */
/* ------------------------------------------------------------------ */

#define SMTP_MESSAGE_BLOCK (64 * 1024) /* octets read per pread() */

/*
 * SmtpEncoder: turns message bytes into DATA wire bytes: every CRLF,
 * lone CR and lone LF becomes CRLF, a "." opening a line is doubled.
 * It keeps its state between calls, so input can be cut anywhere.
 */
typedef struct {
	gboolean line_start; /* next byte opens a line */
	gboolean pending_cr; /* last byte was a CR, its LF unknown */
} SmtpEncoder;

void smtp_encoder_init(SmtpEncoder *enc);

/* Append the encoding of @len bytes at @data to @out. */
void smtp_encoder_feed(SmtpEncoder *enc, const guint8 *data, gsize len,
                       GByteArray *out);

/* Append the end of the data: CRLF when a line is open, then ".CRLF". */
void smtp_encoder_finish(SmtpEncoder *enc, GByteArray *out);

/* What smtp_encoder_feed would append, counted, not written; the state
 * moves on the same way. */
gsize smtp_encoder_count(SmtpEncoder *enc, const guint8 *data, gsize len);

/* The octets smtp_encoder_finish would add before ".CRLF": 0 or 2. */
guint smtp_encoder_finish_count(const SmtpEncoder *enc);

/* An encoder that only counts, for smtp_message_get_wire_size() and
 * for checking while sending that the message did not change. */
typedef struct {
	SmtpEncoder enc;
	guint64 octets; /* counted so far */
} SmtpWireCount;

/*
 * smtp_message_get_wire_size: into *@size, the octets the message takes
 * on the wire between the 354 and the end marker: every line end made
 * CRLF, leading dots doubled, the closing CRLF, but not the final
 * ".CRLF".  RFC 1870's SIZE leaves the doubled dots out; counting them
 * makes what we announce an upper bound of what we send, never less.
 * Reads every segment once (files with pread()).
 * Errors: SMTP_ERROR_INPUT (stage "message") as in foreach_block.
 */
gboolean smtp_message_get_wire_size(const SmtpMessage *msg, guint64 *size,
                                    GError **error);

/*
 * SmtpUtf8Check: a UTF-8 validator that keeps its state across calls.
 * RFC 3629 rules: no overlong forms, no surrogates, nothing past
 * U+10FFFF.  NUL is accepted (message bytes are carried by length).
 */
typedef struct {
	guint need;          /* continuation bytes still expected */
	guint8 lo, hi;       /* allowed range of the next one */
	gboolean ascii_only; /* every byte so far < 0x80 */
	gboolean bad;        /* an invalid sequence was seen */
} SmtpUtf8Check;

void smtp_utf8_check_init(SmtpUtf8Check *check);
void smtp_utf8_check_feed(SmtpUtf8Check *check, const guint8 *data, gsize len);
/* TRUE when everything fed is valid UTF-8 and no sequence is cut. */
gboolean smtp_utf8_check_finish(SmtpUtf8Check *check);

/* Called for each block of the message, in order. */
typedef gboolean (*SmtpBlockFunc)(const guint8 *data, gsize len,
                                  gpointer user_data, GError **error);

/*
 * smtp_message_foreach_block: call @func for each block of @msg, at
 * most SMTP_MESSAGE_BLOCK octets each; file ranges are read with
 * pread().  Errors: @func's, or SMTP_ERROR_INPUT (stage "message")
 * when a file cannot be read or is shorter than announced.
 */
gboolean smtp_message_foreach_block(const SmtpMessage *msg, SmtpBlockFunc func,
                                    gpointer user_data, GError **error);

SmtpMessageKind smtp_message_get_kind(const SmtpMessage *msg);

/* The paths of the file segments of @msg, ", "-separated, or NULL when
 * it has none.  (transfer full) */
char *smtp_message_describe_files(const SmtpMessage *msg);

/* Whether @msg is all in memory: no file segment, nothing that can
 * change between two reads. */
gboolean smtp_message_in_memory(const SmtpMessage *msg);

/*
 * smtp_message_check_text: for TEXT messages, check the charset:
 * ASCII, or UTF-8 when @utf8_ok.  BYTES always pass.
 * Errors: SMTP_ERROR_INPUT (stage "input").
 */
gboolean smtp_message_check_text(const SmtpMessage *msg, gboolean utf8_ok,
                                 GError **error);

/* ------------------------------------------------------------------ */
/* client.c                                                             */
/* ------------------------------------------------------------------ */

/* Effective per-stage limits of @client, defaults filled in. */
void smtp_client_get_timeouts(const SmtpClient *client, SmtpTimeouts *t);

/* FALSE after HELO: no ESMTP options may be sent. */
gboolean smtp_client_is_esmtp(const SmtpClient *client);

/*
 * smtp_client_command: send @line (no CRLF; checked for CR, LF, NUL by
 * the caller) and read its reply within the command limit.  A 421
 * closes the connection and is SMTP_ERROR_DISCONNECTED; so are I/O
 * errors, which also close.  Any other reply, even a refusal, is
 * returned with TRUE for the caller to judge.
 */
gboolean smtp_client_command(SmtpClient *client, const char *stage,
                             const char *line, SmtpReply *reply,
                             GError **error);

/* Write raw bytes (message data) within the data limit; closes the
 * connection on failure. */
gboolean smtp_client_write_data(SmtpClient *client, const void *data, gsize len,
                                GError **error);

/* Read the reply to the final "." within the final limit; closes on
 * an I/O error and on 421, like smtp_client_command. */
gboolean smtp_client_read_final(SmtpClient *client, SmtpReply *reply,
                                GError **error);

/* Close without QUIT (after a broken exchange). */
void smtp_client_drop(SmtpClient *client);

/* TRUE when @s holds no CR, LF or other C0 control and no DEL: no
 * command argument needs one, and CR or LF would end the command.  (A
 * NUL cannot be inside a C string; it would cut the argument short,
 * which callers that know a length check themselves.) */
gboolean smtp_is_safe_arg(const char *s);

/* ------------------------------------------------------------------ */
/* io.c: the hooks of the TLS layer                                     */
/* ------------------------------------------------------------------ */

/* Replace how bytes move over @conn; @data is for the transport's own
 * functions (smtp_conn_get_transport_data) and is released by its
 * close function, which smtp_conn_free() calls. */
void smtp_conn_set_transport(SmtpConn *conn, const SmtpTransport *transport,
                             gpointer data);
gpointer smtp_conn_get_transport_data(const SmtpConn *conn);

/* TRUE while @conn still uses plain recv()/send() (no TLS). */
gboolean smtp_conn_is_plain(const SmtpConn *conn);

/* Wait for @events on the socket until @deadline (monotonic, in
 * microseconds); FALSE when it passed. */
gboolean smtp_conn_wait(SmtpConn *conn, short events, gint64 deadline);

/* ------------------------------------------------------------------ */
/* tls.c                                                                */
/* ------------------------------------------------------------------ */

/*
 * smtp_tls_start: after the server's 220 to STARTTLS, make sure it sent
 * nothing more (response injection: such bytes would otherwise be read
 * as replies to later commands), run the handshake within @timeout_ms
 * and switch @conn to TLS.  @level decides verification: only
 * SMTP_TLS_VERIFY checks the chain (against @ca_file, or the system
 * store when NULL) and @host (a name, or an address literal).
 * Errors: SMTP_ERROR_TLS with a readable reason, SMTP_ERROR_TIMEOUT;
 * stage "starttls".  After an error the connection must be dropped.
 */
gboolean smtp_tls_start(SmtpConn *conn, SmtpTlsLevel level, const char *host,
                        const char *ca_file, guint timeout_ms, GError **error);

/* ------------------------------------------------------------------ */
/* auth.c and client.c: AUTH                                            */
/* ------------------------------------------------------------------ */

/*
 * smtp_auth_run: AUTH PLAIN (preferred) or LOGIN with @user and
 * @password, after EHLO.  Refuses before any credential is sent when
 * the connection is not TLS and @allow_plaintext is FALSE, or when the
 * server offers no AUTH or no mechanism we know.
 * Errors: SMTP_ERROR_AUTH (stage "auth", with the server's reply when
 * one refused), and those of smtp_client_command.  The password is never
 * part of an error message.
 */
gboolean smtp_auth_run(SmtpClient *client, const char *user,
                       const char *password, gboolean allow_plaintext,
                       GError **error);

/* TRUE when the connection of @client runs over TLS. */
gboolean smtp_client_is_tls(const SmtpClient *client);

/* smtp_client_command for a line that carries a secret: the copy made
 * for the wire is wiped before it is freed. */
gboolean smtp_client_command_secret(SmtpClient *client, const char *stage,
                                    const char *line, SmtpReply *reply,
                                    GError **error);

/* ------------------------------------------------------------------ */
/* client.c: pipelining (RFC 2920)                                      */
/* ------------------------------------------------------------------ */

/*
 * smtp_client_write_commands: write @len bytes of complete command
 * lines (each ending in CRLF, checked by the caller) within the command
 * limit, without reading any reply; the replies are then read one by
 * one with smtp_client_read_reply.  An I/O error closes the connection.
 * Errors: DISCONNECTED, TIMEOUT, in @stage.
 */
gboolean smtp_client_write_commands(SmtpClient *client, const char *stage,
                                    const void *data, gsize len,
                                    GError **error);

/*
 * smtp_client_read_reply: read the next reply within the command limit;
 * like smtp_client_command, a 421 or an I/O error closes the connection
 * and is an error in @stage, any other reply is returned for the caller
 * to judge.
 */
gboolean smtp_client_read_reply(SmtpClient *client, const char *stage,
                                SmtpReply *reply, GError **error);

G_END_DECLS

#endif /* SMTP_PRIVATE_H */
