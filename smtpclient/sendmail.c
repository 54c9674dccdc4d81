/*
 * sendmail.c - one mail transaction: checks, options, MAIL, RCPT, DATA
 *
 * The order follows smtplib's sendmail(), which this library mirrors:
 * everything that can be judged without the server (addresses,
 * options, the charset of a TEXT message) is judged before the first
 * byte, so an INPUT error never leaves half a transaction behind.
 * What needs the server's EHLO answer (which options it supports) is
 * judged after connecting but before MAIL.  A refusal inside the
 * transaction is followed by RSET so the connection can carry the
 * next message.
 *
 * With PIPELINING advertised (RFC 2920), MAIL, the RCPTs and DATA go
 * out in one write and the replies are matched back in order; without
 * it, one command at a time.  The replies are judged by the same code
 * either way, so the outcome only depends on what the server answered.
 *
 * Every call is a batch of jobs (smtp_client_send is a batch of one).
 * In a batch, the next job's commands are written behind the current
 * message's end marker, when the server pipelines: a job then costs one
 * round trip, not two.  The look-ahead is only an optimisation: when
 * anything about it fails, the job starts afresh in its turn, so its
 * outcome is what it would have been alone.  Two exceptions, both the
 * look-ahead's doing: a job whose commands met a connection the server
 * closed after the previous 250 starts over once on a new one
 * (lost_ahead), and a reply too many before them shows as replies out
 * of step (in_step), PROTOCOL, where alone it is found before MAIL.
 *
 * Known limits:
 * XXX: more than PIPELINE_GROUP commands go out in several writes, each
 * after the replies to the one before: the client reads no reply while
 * it writes, so an unbounded group could fill both ends' buffers.
 * XXX: a file segment that changes between the SIZE count and the send
 * is caught only when its encoded size changes, it shrinks, or (a
 * segment to the end of its file) it grows; a change
 * that keeps the size (an edit in place) goes out as it is read.  A
 * checksum would need a third read of the file.
 * XXX: BODY=BINARYMIME needs BDAT (CHUNKING), which this client does
 * not speak, so it is refused as INPUT rather than sent with DATA.
 */
#include <string.h>

#include "smtp-private.h"

/* What the caller's input asks of the server, found by check_input. */
typedef struct {
	gboolean smtputf8; /* SMTPUTF8 among the MAIL options */
	gboolean eightbit; /* BODY=8BITMIME among them */
} InputNeeds;

/* ------------------------------------------------------------------ */
/* Checks before anything is sent                                       */
/* ------------------------------------------------------------------ */

/* The keyword of "KEY=value" or "KEY", upper-cased. (transfer full) */
static char *
option_keyword(const char *opt)
{
	const char *eq = strchr(opt, '=');

	return g_ascii_strup(opt, eq ? eq - opt : -1);
}

/* RFC 5321 section 4.1.2: esmtp-keyword and esmtp-value; values may
 * be UTF-8 (RFC 6531), never a space, "=" or a control. */
static gboolean
option_is_valid(const char *opt)
{
	const char *p = opt;

	if (!g_ascii_isalnum(*p))
		return FALSE;
	while (g_ascii_isalnum(*p) || *p == '-')
		p++;
	if (*p == '\0')
		return TRUE;
	if (*p++ != '=' || *p == '\0')
		return FALSE;
	for (; *p != '\0'; p++) {
		if ((guchar)*p <= ' ' || *p == '=' || *p == 0x7f)
			return FALSE;
	}
	return TRUE;
}

static gboolean
check_options(const char *const *opts, GError **error)
{
	for (guint i = 0; opts != NULL && opts[i] != NULL; i++) {
		if (!option_is_valid(opts[i])) {
			smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
			               "bad ESMTP option");
			return FALSE;
		}
	}
	return TRUE;
}

/* Look at the MAIL options for what changes the other checks. */
static gboolean
scan_mail_options(const char *const *opts, InputNeeds *needs, GError **error)
{
	for (guint i = 0; opts != NULL && opts[i] != NULL; i++) {
		g_autofree char *key = option_keyword(opts[i]);
		const char *value = strchr(opts[i], '=');

		if (strcmp(key, "SMTPUTF8") == 0 && value == NULL)
			needs->smtputf8 = TRUE;
		if (strcmp(key, "BODY") != 0)
			continue;
		if (value == NULL) {
			smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
			               "BODY without a value");
			return FALSE;
		}
		if (g_ascii_strcasecmp(value + 1, "8BITMIME") == 0) {
			needs->eightbit = TRUE;
		} else if (g_ascii_strcasecmp(value + 1, "7BIT") != 0) {
			smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
			               "BODY=%s is not supported", value + 1);
			return FALSE;
		}
	}
	return TRUE;
}

/*
 * Whether the spaces in @addr are all inside a quoted local part
 * (RFC 5321 section 4.1.2: Quoted-string, with backslash pairs).  A
 * space anywhere else ends the path for the server: "a b@c" would be
 * read as <a> followed by junk, or refused in a way that looks like the
 * relay's fault.  A quote left open is refused too.
 */
static gboolean
spaces_quoted(const char *addr)
{
	const char *p = addr;

	if (*p == '"') {
		for (p++; *p != '\0' && *p != '"'; p++) {
			if (*p == '\\' && p[1] != '\0')
				p++;
		}
		if (*p != '"')
			return FALSE;
		p++;
	}
	return strchr(p, ' ') == NULL;
}

/* An address goes between angle brackets: no control (CR, LF end the
 * command), no bracket (it would end the path and let the rest pass as
 * parameters), no space outside a quoted local part, ASCII unless
 * SMTPUTF8 is asked for (RFC 6531). */
static gboolean
check_address(const char *addr, const InputNeeds *needs, GError **error)
{
	if (addr == NULL || !smtp_is_safe_arg(addr) ||
	    strpbrk(addr, "<>") != NULL) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "bad character in address");
		return FALSE;
	}
	if (!spaces_quoted(addr)) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "space in address <%s> outside a quoted local "
		               "part (write \"a b\"@domain)",
		               g_utf8_validate(addr, -1, NULL) ? addr : "?");
		return FALSE;
	}
	if (g_str_is_ascii(addr))
		return TRUE;
	if (!needs->smtputf8) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "non-ASCII address <%s> needs SMTPUTF8",
		               g_utf8_validate(addr, -1, NULL) ? addr : "?");
		return FALSE;
	}
	if (!g_utf8_validate(addr, -1, NULL)) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "address is not valid UTF-8");
		return FALSE;
	}
	return TRUE;
}

static gboolean
check_input(const char *from, const char *const *mail_options,
            const SmtpRecipient *rcpts, gsize n_rcpts, SmtpMessage *msg,
            InputNeeds *needs, GError **error)
{
	if (msg == NULL || rcpts == NULL || n_rcpts == 0) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "no message or no recipient");
		return FALSE;
	}
	if (!check_options(mail_options, error) ||
	    !scan_mail_options(mail_options, needs, error) ||
	    !check_address(from, needs, error))
		return FALSE;
	for (gsize i = 0; i < n_rcpts; i++) {
		if (!check_address(rcpts[i].address, needs, error) ||
		    !check_options(rcpts[i].options, error))
			return FALSE;
	}
	return smtp_message_check_text(msg, needs->smtputf8 || needs->eightbit,
	                               error);
}

/* ------------------------------------------------------------------ */
/* Options the server supports                                          */
/* ------------------------------------------------------------------ */

/* The EHLO keyword that must be advertised before @key may be sent. */
static const char *
required_extension(const char *key)
{
	static const struct {
		const char *option, *extension;
	} table[] = {
	    {"BODY", "8BITMIME"}, /* RFC 6152 */
	    {"RET", "DSN"},       /* RFC 3461 */
	    {"ENVID", "DSN"},     {"NOTIFY", "DSN"}, {"ORCPT", "DSN"},
	};

	for (guint i = 0; i < G_N_ELEMENTS(table); i++) {
		if (strcmp(key, table[i].option) == 0)
			return table[i].extension;
	}
	return key;
}

static void
add_dropped(GPtrArray *dropped, const char *opt)
{
	for (guint i = 0; i < dropped->len; i++) {
		if (strcmp(g_ptr_array_index(dropped, i), opt) == 0)
			return;
	}
	g_ptr_array_add(dropped, g_strdup(opt));
}

/*
 * Append to @line the options of @opts the server supports; list the
 * others in @dropped.  SIZE is ours to compute: a caller's is dropped.
 * An unsupported SMTPUTF8 on MAIL (@is_mail) is NOT_SUPPORTED (RFC
 * 6531 section 3.4: the message must not go out without it).
 */
static gboolean
add_options(SmtpClient *client, GString *line, const char *const *opts,
            gboolean is_mail, GPtrArray *dropped, GError **error)
{
	for (guint i = 0; opts != NULL && opts[i] != NULL; i++) {
		g_autofree char *key = option_keyword(opts[i]);
		const char *ext = required_extension(key);

		if (strcmp(key, "SIZE") != 0 &&
		    smtp_client_has_extension(client, ext, NULL)) {
			g_string_append_printf(line, " %s", opts[i]);
			continue;
		}
		if (is_mail && strcmp(key, "SMTPUTF8") == 0) {
			smtp_set_error(error, SMTP_ERROR_NOT_SUPPORTED, "mail",
			               NULL,
			               "server does not support SMTPUTF8");
			return FALSE;
		}
		add_dropped(dropped, opts[i]);
	}
	return TRUE;
}

/* ------------------------------------------------------------------ */
/* The transaction                                                      */
/* ------------------------------------------------------------------ */

/* After a refusal inside a transaction: RSET, so the connection is
 * clean for the next message.  A failed RSET closes it (see
 * smtp_client_rset), which is just as clean. */
static void
reset_after_error(SmtpClient *client)
{
	if (smtp_client_is_connected(client))
		smtp_client_rset(client, NULL);
}

/*
 * The envelope: the command lines of MAIL, each RCPT and DATA, built
 * before any is sent, and what the replies said.  Both ways of sending
 * (one at a time, pipelined) fill it through the same judges below, so
 * a refusal means the same whichever way it came.
 */
typedef struct {
	SmtpClient *client;
	const SmtpRecipient *rcpts;
	gsize n_rcpts;
	guint64 wire_size; /* SIZE= announced; G_MAXUINT64: none */
	gboolean sent;     /* its first group went out behind the end
	                     * marker of the message before it */
	guint n_replies;   /* replies read to its commands so far */
	gboolean misstep;  /* a reply of a class its command cannot
	                     * have (see in_step): @step_reply */
	const char *step_stage;
	SmtpReply step_reply;
	GPtrArray *lines;   /* char *: MAIL, RCPT..., DATA; no CRLF */
	GPtrArray *refused; /* SmtpRefusal *, in recipient order; given
	                     * to the error when all are refused */
} Envelope;

static void
envelope_clear(Envelope *env)
{
	g_clear_pointer(&env->lines, g_ptr_array_unref);
	g_clear_pointer(&env->refused, g_ptr_array_unref);
	smtp_reply_clear(&env->step_reply);
}
G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(Envelope, envelope_clear)

/* One job on its way: its envelope and the options it could not send. */
typedef struct {
	SmtpJob *job;
	Envelope env;
	GPtrArray *dropped; /* char * */
	GByteArray *data;   /* the message encoded ahead, end marker
	                     * included (see encode_ahead), or NULL */
	guint64 encoded;    /* the octets of @data before the marker */
} Work;

static void
work_clear(Work *w)
{
	envelope_clear(&w->env);
	g_clear_pointer(&w->dropped, g_ptr_array_unref);
	if (w->data != NULL)
		g_byte_array_unref(w->data);
	memset(w, 0, sizeof(*w));
}

/* The stage of command @i of @env: 0 is MAIL, the last is DATA. */
static const char *
stage_of(const Envelope *env, guint i)
{
	if (i == 0)
		return "mail";
	return i + 1 == env->lines->len ? "data" : "rcpt";
}

static gboolean
build_mail(Envelope *env, const char *from, const char *const *mail_options,
           SmtpMessage *msg, GPtrArray *dropped, GError **error)
{
	g_autoptr(GString) line = g_string_new(NULL);

	g_string_printf(line, "MAIL FROM:<%s>", from);

	/* RFC 1870: SIZE is what goes out after the 354, line ends made
	 * CRLF; the raw size would be short by one octet per lone LF and
	 * let a server's limit be passed.  Counting reads the message
	 * once more, before anything is sent. */
	if (smtp_client_has_extension(env->client, "SIZE", NULL)) {
		if (!smtp_message_get_wire_size(msg, &env->wire_size, error))
			return FALSE;
		g_string_append_printf(line, " SIZE=%" G_GUINT64_FORMAT,
		                       env->wire_size);
	}
	if (!add_options(env->client, line, mail_options, TRUE, dropped, error))
		return FALSE;
	g_ptr_array_add(env->lines,
	                g_string_free(g_steal_pointer(&line), FALSE));
	return TRUE;
}

/* Every command line, so the options are judged (and NOT_SUPPORTED
 * raised) before the first byte of the transaction goes out. */
static gboolean
build_commands(Envelope *env, const char *from, const char *const *mail_options,
               SmtpMessage *msg, GPtrArray *dropped, GError **error)
{
	if (!build_mail(env, from, mail_options, msg, dropped, error))
		return FALSE;
	for (gsize i = 0; i < env->n_rcpts; i++) {
		GString *line = g_string_new(NULL);

		g_string_printf(line, "RCPT TO:<%s>", env->rcpts[i].address);
		add_options(env->client, line, env->rcpts[i].options, FALSE,
		            dropped, NULL);
		g_ptr_array_add(env->lines, g_string_free(line, FALSE));
	}
	g_ptr_array_add(env->lines, g_strdup("DATA"));
	return TRUE;
}

/* ---- the judges, shared by both ways of sending ------------------ */

/*
 * Whether @reply can answer a command whose success is class @ok: that
 * class, or a refusal (4xx, 5xx).  Anything else (a 2xx or 1xx to DATA,
 * a 3xx or 1xx to MAIL or RCPT) is no answer of the server's to this
 * command: after pipelined commands it is a reply to another one (an
 * extra reply to the end of data before them, say), and every reply
 * after it is shifted too.  Taken as a refusal it would be pinned on
 * the wrong command, and a later "250" could pass for our end of data.
 */
static gboolean
in_step(const SmtpReply *reply, int ok)
{
	int class = reply->code / 100;

	return class == ok || class == 4 || class == 5;
}

/* A reply out of step (see in_step): PROTOCOL, and the connection
 * closed without RSET, whose reply could not be told from the others
 * either.  The error is temporary (smtp_error_is_temporary). */
static void
set_out_of_step(SmtpClient *client, const char *stage, const SmtpReply *reply,
                GError **error)
{
	smtp_set_error(error, SMTP_ERROR_PROTOCOL, stage, reply,
	               "replies out of step: %d in stage %s", reply->code,
	               stage);
	smtp_client_drop(client);
}

static gboolean
judge_mail(const SmtpReply *reply, GError **error)
{
	if (reply->code / 100 == 2)
		return TRUE;
	smtp_set_error(error, SMTP_ERROR_SENDER_REFUSED, "mail", reply,
	               "sender refused");
	return FALSE;
}

/* The reply to RCPT for recipient @i: a refusal is kept, not an error
 * yet.  Takes @reply. */
static void
note_rcpt(Envelope *env, gsize i, SmtpReply *reply)
{
	SmtpRefusal *r;

	if (reply->code / 100 == 2) {
		smtp_reply_clear(reply);
		return;
	}
	if (!in_step(reply, 2)) {
		/* The first one found is the one reported */
		if (!env->misstep) {
			env->misstep = TRUE;
			env->step_stage = "rcpt";
			env->step_reply = *reply;
			memset(reply, 0, sizeof(*reply));
		}
		smtp_reply_clear(reply);
		return;
	}
	r = g_new0(SmtpRefusal, 1);
	r->recipient = g_strdup(env->rcpts[i].address);
	r->reply = *reply;
	memset(reply, 0, sizeof(*reply));
	g_ptr_array_add(env->refused, r);
}

/* All refused is RECIPIENTS_REFUSED, which takes the refused map. */
static gboolean
judge_rcpts(Envelope *env, GError **error)
{
	const SmtpRefusal *last;

	if (env->refused->len < env->n_rcpts)
		return TRUE;
	last = g_ptr_array_index(env->refused, env->refused->len - 1);
	smtp_set_error(error, SMTP_ERROR_RECIPIENTS_REFUSED, "rcpt",
	               &last->reply, "all recipients refused");
	if (error != NULL)
		smtp_error_take_refused(*error, g_steal_pointer(&env->refused));
	return FALSE;
}

/* DATA wants 354 (RFC 5321 section 4.3.2). */
static gboolean
judge_data(const SmtpReply *reply, GError **error)
{
	if (reply->code / 100 == 3)
		return TRUE;
	smtp_set_error(error, SMTP_ERROR_DATA, "data", reply, "DATA refused");
	return FALSE;
}

/* ---- one command at a time ---------------------------------------- */

static gboolean
command(Envelope *env, guint i, SmtpReply *reply, GError **error)
{
	return smtp_client_command(env->client, stage_of(env, i),
	                           g_ptr_array_index(env->lines, i), reply,
	                           error);
}

/* Without PIPELINING each command waits for the previous reply, and a
 * refusal stops the transaction before the next command. */
static gboolean
one_at_a_time(Envelope *env, GError **error)
{
	guint last = env->lines->len - 1;
	SmtpReply reply = {0};
	gboolean ok;

	if (!command(env, 0, &reply, error))
		return FALSE;
	if (!in_step(&reply, 2)) {
		set_out_of_step(env->client, "mail", &reply, error);
		smtp_reply_clear(&reply);
		return FALSE;
	}
	ok = judge_mail(&reply, error);
	smtp_reply_clear(&reply);
	for (guint i = 1; ok && i < last; i++) {
		if (!command(env, i, &reply, error))
			return FALSE;
		note_rcpt(env, i - 1, &reply);
		if (env->misstep) {
			g_ptr_array_set_size(env->refused, 0);
			set_out_of_step(env->client, env->step_stage,
			                &env->step_reply, error);
			return FALSE;
		}
	}
	ok = ok && judge_rcpts(env, error);
	if (ok) {
		if (!command(env, last, &reply, error))
			return FALSE;
		if (!in_step(&reply, 3)) {
			set_out_of_step(env->client, "data", &reply, error);
			smtp_reply_clear(&reply);
			return FALSE;
		}
		ok = judge_data(&reply, error);
		smtp_reply_clear(&reply);
	}
	if (!ok)
		reset_after_error(env->client);
	return ok;
}

/* ---- pipelined (RFC 2920) ----------------------------------------- */

/*
 * Commands per write.  Normally MAIL, the RCPTs and DATA go out in one
 * write, but while we write, the server answers and nobody reads the
 * answers: once they fill the socket buffers of both ends, the server
 * stops reading and each side waits for the other until the time
 * limit.  A hundred one-line replies (at most 512 octets each, RFC 5321
 * section 4.5.3.1.5) fit in the 128 KiB a Linux socket starts with.
 */
#define PIPELINE_GROUP 100

/* Append commands [@from, @to) of @env, each with its CRLF. */
static void
append_group(GByteArray *out, const Envelope *env, guint from, guint to)
{
	for (guint i = from; i < to; i++) {
		const char *line = g_ptr_array_index(env->lines, i);

		g_byte_array_append(out, (const guint8 *)line, strlen(line));
		g_byte_array_append(out, (const guint8 *)"\r\n", 2);
	}
}

/* Commands [@from, @to) of @env in one write. */
static gboolean
send_batch(Envelope *env, guint from, guint to, GError **error)
{
	g_autoptr(GByteArray) batch = g_byte_array_new();

	append_group(batch, env, from, to);
	return smtp_client_write_commands(env->client, stage_of(env, from),
	                                  batch->data, batch->len, error);
}

/* The replies to commands [@from, @to), in order: MAIL's into @mail,
 * each RCPT's to its recipient, DATA's into @data. */
static gboolean
read_replies(Envelope *env, guint from, guint to, SmtpReply *mail,
             SmtpReply *data, GError **error)
{
	for (guint i = from; i < to; i++) {
		SmtpReply reply = {0};

		if (!smtp_client_read_reply(env->client, stage_of(env, i),
		                            &reply, error))
			return FALSE;
		env->n_replies++;
		if (i == 0)
			*mail = reply;
		else if (i + 1 == env->lines->len)
			*data = reply;
		else
			note_rcpt(env, i - 1, &reply);
	}
	return TRUE;
}

/* RFC 2920 section 3.1: a server may answer DATA with 354 even though
 * no recipient was accepted; the client then ends the data at once with
 * a lone "." and must not send the message.  Its reply (most likely a
 * 554) changes nothing: RSET follows.  A failure has closed the
 * connection, which ends the transaction just as well. */
static void
end_empty_data(SmtpClient *client)
{
	SmtpReply reply = {0};

	if (smtp_client_write_data(client, ".\r\n", 3, NULL) &&
	    smtp_client_read_final(client, &reply, NULL))
		smtp_reply_clear(&reply);
}

/* Every command goes out before its reply is read, group by group. */
static gboolean
exchange(Envelope *env, SmtpReply *mail, SmtpReply *data, GError **error)
{
	guint n = env->lines->len;

	for (guint from = 0; from < n; from += PIPELINE_GROUP) {
		guint to = MIN(n, from + PIPELINE_GROUP);

		/* A refused sender makes the later groups moot. */
		if (from > 0 && mail->code / 100 != 2)
			break;
		if (!(from == 0 && env->sent) &&
		    !send_batch(env, from, to, error))
			return FALSE;
		if (!read_replies(env, from, to, mail, data, error))
			return FALSE;
	}
	return TRUE;
}

/* Whether every reply read fits its command (see in_step); if not,
 * the error is raised and the connection dropped.  An unread reply
 * (code 0: DATA after a refused MAIL in a later group) is no misstep. */
static gboolean
replies_in_step(Envelope *env, const SmtpReply *mail, const SmtpReply *data,
                GError **error)
{
	/* Once out of step, no refusal can be pinned on its recipient */
	if ((mail->code != 0 && !in_step(mail, 2)) || env->misstep ||
	    (data->code != 0 && !in_step(data, 3)))
		g_ptr_array_set_size(env->refused, 0);
	if (mail->code != 0 && !in_step(mail, 2)) {
		set_out_of_step(env->client, "mail", mail, error);
		return FALSE;
	}
	if (env->misstep) {
		set_out_of_step(env->client, env->step_stage, &env->step_reply,
		                error);
		return FALSE;
	}
	if (data->code != 0 && !in_step(data, 3)) {
		set_out_of_step(env->client, "data", data, error);
		return FALSE;
	}
	return TRUE;
}

/* Every reply is read before any is judged, so after a refusal the
 * stream is in step for RSET; replies out of step drop it instead. */
static gboolean
pipelined(Envelope *env, GError **error)
{
	SmtpReply mail = {0}, data = {0};
	gboolean ok;

	ok = exchange(env, &mail, &data, error) &&
	     replies_in_step(env, &mail, &data, error);
	if (ok) {
		ok = judge_mail(&mail, error) && judge_rcpts(env, error) &&
		     judge_data(&data, error);
		if (!ok && data.code == 354)
			end_empty_data(env->client);
		if (!ok)
			reset_after_error(env->client);
	}
	smtp_reply_clear(&mail);
	smtp_reply_clear(&data);
	return ok;
}

typedef struct {
	SmtpClient *client; /* NULL: keep it all in @out (encode_ahead) */
	SmtpEncoder enc;
	GByteArray *out; /* encoded, not yet written */
	guint64 encoded; /* octets the encoder gave so far */
} DataWriter;

static gboolean
write_block(const guint8 *data, gsize len, gpointer user_data, GError **error)
{
	DataWriter *w = user_data;
	guint old = w->out->len;

	smtp_encoder_feed(&w->enc, data, len, w->out);
	w->encoded += w->out->len - old;
	if (w->client == NULL || w->out->len < SMTP_MESSAGE_BLOCK)
		return TRUE;
	if (!smtp_client_write_data(w->client, w->out->data, w->out->len,
	                            error))
		return FALSE;
	g_byte_array_set_size(w->out, 0);
	return TRUE;
}

/* The message came out at a size other than the one counted for SIZE=:
 * a file segment changed between the count and the send.  What went
 * out is not what was meant; the caller learns which file. */
static void
set_changed_error(SmtpMessage *msg, guint64 counted, guint64 sent,
                  GError **error)
{
	g_autofree char *files = smtp_message_describe_files(msg);

	smtp_set_error(
	    error, SMTP_ERROR_INPUT, "message", NULL,
	    "message file %s changed while being sent: %" G_GUINT64_FORMAT
	    " octets announced, %" G_GUINT64_FORMAT " read",
	    files != NULL ? files : "(none)", counted, sent);
}

/*
 * Encode the message of @w whole, end marker included, into w->data,
 * while the server is still busy with the message before it: after the
 * write that ends that one, the reply to it takes the server a round
 * trip, and encoding now takes the work off the path from the 354 to
 * our next write.  Only for a message all in memory, which cannot
 * change meanwhile (a file is read in its turn, so that a change is
 * caught), and of at most one block, so that it costs no more memory
 * than sending it does.
 */
static void
encode_ahead(Work *w)
{
	SmtpMessage *msg = w->job->msg;
	guint64 size = smtp_message_get_size(msg);
	DataWriter dw = {.client = NULL};

	if (w->data != NULL || size > SMTP_MESSAGE_BLOCK ||
	    !smtp_message_in_memory(msg))
		return;
	dw.out = g_byte_array_sized_new(2 * size + 8);
	smtp_encoder_init(&dw.enc);

	/* Memory segments cannot fail to be read */
	if (!smtp_message_foreach_block(msg, write_block, &dw, NULL)) {
		g_byte_array_unref(dw.out);
		return;
	}
	w->encoded = dw.encoded + smtp_encoder_finish_count(&dw.enc);
	smtp_encoder_finish(&dw.enc, dw.out);
	w->data = dw.out;
}

/*
 * The message of @w, encoded (or as encode_ahead left it), then the end
 * marker and its reply.  Any failure before the end marker drops the
 * connection without it: half a message is on the wire and DATA cannot
 * be taken back, and a "." after a truncated or changed message would
 * have it delivered as if whole.
 *
 * @next, when not NULL, is the next message's work, its envelope built:
 * its commands go out in the same write as the end marker (RFC 2920
 * section 3.1 lets message data open a group), and next->env.sent says
 * whether they did.  Its replies then follow the reply to the end
 * marker, so no RSET may come between: none is needed either, as the
 * end of data closes the transaction whatever its reply (RFC 5321
 * section 4.1.1.4).  While the server takes in this message, the next
 * one is encoded.
 */
static gboolean
send_data(SmtpClient *client, Work *w, Work *next, SmtpReply *final,
          GError **error)
{
	g_autoptr(GByteArray) out = g_steal_pointer(&w->data);
	SmtpMessage *msg = w->job->msg;
	guint64 wire_size = w->env.wire_size;
	guint64 total = w->encoded;

	/* Step 1: the message, encoded, unless it was ahead of time */
	if (out == NULL) {
		DataWriter dw = {.client = client};

		out = g_byte_array_sized_new(2 * SMTP_MESSAGE_BLOCK + 8);
		dw.out = out;
		smtp_encoder_init(&dw.enc);
		if (!smtp_message_foreach_block(msg, write_block, &dw, error)) {
			smtp_client_drop(client);
			return FALSE;
		}
		total = dw.encoded + smtp_encoder_finish_count(&dw.enc);
		smtp_encoder_finish(&dw.enc, out);
	}
	if (wire_size != G_MAXUINT64 && total != wire_size) {
		set_changed_error(msg, wire_size, total, error);
		smtp_client_drop(client);
		return FALSE;
	}

	/* Step 2: its end, with the next envelope behind */
	if (next != NULL)
		append_group(out, &next->env, 0, next->env.lines->len);
	if (!smtp_client_write_data(client, out->data, out->len, error))
		return FALSE;
	if (next != NULL) {
		next->env.sent = TRUE;
		encode_ahead(next);
	}

	/* A silent server or a closed socket here is never a success:
	 * the message may or may not have been taken. */
	if (!smtp_client_read_final(client, final, error))
		return FALSE;
	if (final->code / 100 == 2)
		return TRUE;
	if (!in_step(final, 2)) {
		set_out_of_step(client, "end-of-data", final, error);
		smtp_reply_clear(final);
		return FALSE;
	}
	smtp_set_error(error, SMTP_ERROR_DATA, "end-of-data", final,
	               "message refused");
	smtp_reply_clear(final);
	if (next == NULL)
		reset_after_error(client);
	return FALSE;
}

/* RFC 2920 is an ESMTP extension: after HELO nothing is advertised. */
static gboolean
can_pipeline(SmtpClient *client)
{
	return smtp_client_has_extension(client, "PIPELINING", NULL);
}

/* ------------------------------------------------------------------ */
/* Jobs: one message each, one after the other                          */
/* ------------------------------------------------------------------ */

/*
 * Everything before the first command of @job: the input checks (so
 * INPUT never leaves half a transaction behind), a connection when
 * @connect says so, and the command lines, which the server's EHLO
 * answer decides (SIZE, options, NOT_SUPPORTED).
 */
static gboolean
work_start(Work *w, SmtpClient *client, SmtpJob *job, gboolean connect,
           GError **error)
{
	InputNeeds needs = {0};

	w->job = job;
	w->env = (Envelope){.client = client,
	                    .rcpts = job->rcpts,
	                    .n_rcpts = job->n_rcpts,
	                    .wire_size = G_MAXUINT64};
	w->env.lines = g_ptr_array_new_with_free_func(g_free);
	w->env.refused = g_ptr_array_new_with_free_func(smtp_refusal_free);
	w->dropped = g_ptr_array_new_with_free_func(g_free);
	if (!check_input(job->from, job->mail_options, job->rcpts, job->n_rcpts,
	                 job->msg, &needs, error))
		return FALSE;
	if (connect && !smtp_client_connect(client, error))
		return FALSE;
	return build_commands(&w->env, job->from, job->mail_options, job->msg,
	                      w->dropped, error);
}

/* Hand the outcome to the job; dropped options go with an error too,
 * so a failure can be explained completely.  Clears @w. */
static void
work_end(Work *w, SmtpResult *result, GError *error)
{
	if (result != NULL) {
		result->refused = g_steal_pointer(&w->env.refused);
		result->dropped_options = g_steal_pointer(&w->dropped);
		w->job->result = result;
	} else {
		g_assert(error != NULL);
		if (error->domain == SMTP_ERROR)
			smtp_error_set_dropped(error, w->dropped);
		/* Recipients refused at RCPT before a later failure (DATA,
		 * end of data, a lost connection) keep their own replies;
		 * after a refused MAIL their 503s mean nothing. */
		if (error->domain == SMTP_ERROR &&
		    error->code != SMTP_ERROR_SENDER_REFUSED &&
		    w->env.refused != NULL && w->env.refused->len > 0 &&
		    smtp_error_get_refused(error) == NULL)
			smtp_error_take_refused(
			    error, g_steal_pointer(&w->env.refused));
		w->job->error = error;
	}
	work_clear(w);
}

/*
 * Prepare @next_job in @ahead so its commands can follow the current
 * message's end marker: only with PIPELINING, only when its checks pass
 * on this connection and its commands fit one group.  Any failure here
 * is forgotten: the job is then started afresh in its turn, and its
 * error, if any, raised there, as if it had never been looked at.
 */
static Work *
look_ahead(SmtpClient *client, SmtpJob *next_job, Work *ahead)
{
	if (next_job == NULL || !can_pipeline(client))
		return NULL;
	if (work_start(ahead, client, next_job, FALSE, NULL) &&
	    ahead->env.lines->len <= PIPELINE_GROUP)
		return ahead;
	work_clear(ahead);
	return NULL;
}

/* The envelope of @w (already written when w->env.sent), then its
 * message, with the next job's commands behind the end marker. */
static SmtpResult *
transaction(SmtpClient *client, Work *w, SmtpJob *next_job, Work *ahead,
            GError **error)
{
	g_autoptr(SmtpResult) result = NULL;
	gboolean ok;

	/* Step 1: the envelope and DATA, pipelined when the server says
	 * it can take that; refusals are judged the same either way. */
	if (can_pipeline(client))
		ok = pipelined(&w->env, error);
	else
		ok = one_at_a_time(&w->env, error);
	if (!ok)
		return NULL;

	/* Step 2: the message and the reply to its end. */
	result = g_new0(SmtpResult, 1);
	if (!send_data(client, w, look_ahead(client, next_job, ahead),
	               &result->reply, error))
		return NULL;
	return g_steal_pointer(&result);
}

/*
 * Whether @w, whose commands went out behind the end marker of the
 * message before it, failed only because the server had closed the
 * connection after answering that end marker: not one reply to its
 * commands came, and the peer closed without even a 421.  Nothing of
 * its message was sent, and nothing of it was refused: a relay that
 * closes after every message (some do, to bound a session) would
 * otherwise fail every second message of a batch.  Such a job starts
 * over on a new connection, once.  A timeout is not retried (the
 * server may be busy with it), nor a 421 or any other reply, which
 * is the server's answer to this very job.
 */
static gboolean
lost_ahead(const Work *w, gboolean was_ahead, const GError *error)
{
	return was_ahead && w->env.n_replies == 0 && error != NULL &&
	       g_error_matches(error, SMTP_ERROR, SMTP_ERROR_DISCONNECTED) &&
	       smtp_error_get_reply(error)->code == 0;
}

/* Tell the caller job @i is over (smtp_client_send_batch_full); FALSE
 * when it ends the batch, after dropping a connection that carries the
 * next job's commands (@ahead), whose message must not follow them. */
static gboolean
job_done(SmtpClient *client, SmtpJob *jobs, gsize i, Work *ahead,
         SmtpJobDone done, gpointer data)
{
	if (done == NULL || done(jobs, i, data))
		return TRUE;
	if (ahead->env.sent && smtp_client_is_connected(client))
		smtp_client_drop(client);
	return FALSE;
}

void
smtp_client_send_batch(SmtpClient *client, SmtpJob *jobs, gsize n_jobs)
{
	smtp_client_send_batch_full(client, jobs, n_jobs, NULL, NULL);
}

void
smtp_client_send_batch_full(SmtpClient *client, SmtpJob *jobs, gsize n_jobs,
                            SmtpJobDone done, gpointer data)
{
	Work cur = {0}, ahead = {0};

	g_return_if_fail(client != NULL && (jobs != NULL || n_jobs == 0));
	for (gsize i = 0; i < n_jobs; i++) {
		jobs[i].result = NULL;
		jobs[i].error = NULL;
	}
	for (gsize i = 0; i < n_jobs; i++) {
		SmtpJob *next = i + 1 < n_jobs ? &jobs[i + 1] : NULL;
		GError *error = NULL;
		SmtpResult *result = NULL;
		gboolean was_ahead = FALSE;
		gboolean started = TRUE;

		/* Step 1: this job's commands went out behind the last end
		 * marker, or it starts here; a connection lost since means
		 * they are gone with it, and it starts over. */
		if (ahead.env.sent && smtp_client_is_connected(client)) {
			cur = ahead;
			memset(&ahead, 0, sizeof(ahead));
			was_ahead = TRUE;
		} else {
			work_clear(&ahead);
			started =
			    work_start(&cur, client, &jobs[i], TRUE, &error);
		}

		/* Step 2: the transaction, the next job looked ahead. */
		if (started)
			result =
			    transaction(client, &cur, next, &ahead, &error);

		/* Step 3: its commands lost with a connection the server
		 * closed after the message before: once more, afresh. */
		if (started && result == NULL &&
		    lost_ahead(&cur, was_ahead, error)) {
			g_clear_error(&error);
			work_clear(&cur);
			work_clear(&ahead);
			if (work_start(&cur, client, &jobs[i], TRUE, &error))
				result = transaction(client, &cur, next, &ahead,
				                     &error);
		}
		work_end(&cur, result, error);
		if (!job_done(client, jobs, i, &ahead, done, data))
			break;
	}
	work_clear(&ahead);
}

SmtpResult *
smtp_client_send(SmtpClient *client, const char *from,
                 const char *const *mail_options, const SmtpRecipient *rcpts,
                 gsize n_rcpts, SmtpMessage *msg, GError **error)
{
	SmtpJob job = {from, mail_options, rcpts, n_rcpts, msg, NULL, NULL};

	g_return_val_if_fail(client != NULL, NULL);
	smtp_client_send_batch(client, &job, 1);
	if (job.error != NULL)
		g_propagate_error(error, job.error);
	return job.result;
}

SmtpResult *
smtp_client_sendmail(SmtpClient *client, const char *from,
                     const char *const *recipients, SmtpMessage *msg,
                     const char *const *mail_options,
                     const char *const *rcpt_options, GError **error)
{
	g_autofree SmtpRecipient *rcpts = NULL;
	gsize n = recipients != NULL ? g_strv_length((char **)recipients) : 0;

	rcpts = g_new0(SmtpRecipient, MAX(n, 1));
	for (gsize i = 0; i < n; i++) {
		rcpts[i].address = recipients[i];
		rcpts[i].options = rcpt_options;
	}
	return smtp_client_send(client, from, mail_options, rcpts, n, msg,
	                        error);
}

void
smtp_result_free(SmtpResult *result)
{
	if (result == NULL)
		return;
	g_clear_pointer(&result->refused, g_ptr_array_unref);
	g_clear_pointer(&result->dropped_options, g_ptr_array_unref);
	smtp_reply_clear(&result->reply);
	g_free(result);
}
