/*
 * client.c - the SMTP session: connect, greeting, EHLO or HELO, RSET,
 * QUIT, and the one function every command goes through
 *
 * Policy: a reply we cannot trust the stream after (a timeout, a
 * malformed reply, a 421, a closed socket) closes the connection at
 * once, so a late answer can never be taken for the reply to the next
 * command; the next call connects again.  Refusals leave it open.
 *
 * Session start is greeting, EHLO, then STARTTLS as the TLS level asks
 * (tls.c) with EHLO again, then AUTH when credentials are set (auth.c).
 * A TLS or AUTH failure closes the connection: keeping it would let the
 * next call send mail over a session that is not what the caller set.
 *
 * Known limits:
 * XXX: at SMTP_TLS_MAY a server that answers STARTTLS with anything
 * but 220 gets the session in clear text, as Postfix's "may" does (no
 * byte was exchanged under TLS, so the session is still well defined);
 * a failed handshake, though, is an error, never a silent fallback.
 */
#include <string.h>

#include "smtp-private.h"

/* RFC 5321 section 4.5.3.2 */
#define DEFAULT_CONNECT_MS (5 * 60 * 1000)  /* initial 220 */
#define DEFAULT_COMMAND_MS (5 * 60 * 1000)  /* MAIL, RCPT, ... */
#define DEFAULT_DATA_MS    (3 * 60 * 1000)  /* each data block */
#define DEFAULT_FINAL_MS   (10 * 60 * 1000) /* reply to "." */

/* QUIT is a courtesy: a server that stalls on it must not hold up
 * smtp_client_free() for the full command limit. */
#define QUIT_MS 5000

struct SmtpClient {
	char *host;
	guint16 port;
	char *helo_name;
	SmtpTimeouts timeouts; /* as set; zero fields: defaults */
	gint64 deadline;       /* hard limit, monotonic us; 0: none */
	SmtpTlsLevel tls_level;
	char *ca_file;
	char *auth_user;
	char *auth_password; /* wiped before it is freed */
	gboolean auth_plaintext;

	SmtpConn *conn;  /* NULL when not connected */
	char *peer;      /* "host[addr]:port", or NULL before any */
	gboolean esmtp;  /* EHLO accepted */
	GHashTable *ext; /* upper-case keyword -> parameters */
};

SmtpClient *
smtp_client_new(const char *host, guint16 port)
{
	SmtpClient *client;

	g_return_val_if_fail(host != NULL, NULL);
	client = g_new0(SmtpClient, 1);
	client->host = g_strdup(host);
	client->port = port;
	client->ext =
	    g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
	return client;
}

void
smtp_client_free(SmtpClient *client)
{
	if (client == NULL)
		return;
	smtp_client_quit(client);
	g_free(client->host);
	g_free(client->helo_name);
	g_free(client->ca_file);
	g_free(client->auth_user);
	smtp_password_free(client->auth_password);
	g_free(client->peer);
	g_hash_table_unref(client->ext);
	g_free(client);
}

void
smtp_client_set_helo_name(SmtpClient *client, const char *name)
{
	g_free(client->helo_name);
	client->helo_name = g_strdup(name);
}

void
smtp_client_set_timeouts(SmtpClient *client, const SmtpTimeouts *t)
{
	client->timeouts = *t;
}

void
smtp_client_set_deadline(SmtpClient *client, gint64 deadline_us)
{
	client->deadline = MAX(deadline_us, 0);
	if (client->conn != NULL)
		smtp_conn_set_deadline(client->conn, client->deadline);
}

void
smtp_client_set_tls(SmtpClient *client, SmtpTlsLevel level, const char *ca_file)
{
	client->tls_level = level;
	g_free(client->ca_file);
	client->ca_file = g_strdup(ca_file);
}

void
smtp_client_set_auth(SmtpClient *client, const char *user, const char *password,
                     gboolean allow_plaintext)
{
	g_free(client->auth_user);
	smtp_password_free(client->auth_password);
	client->auth_user = g_strdup(user);
	client->auth_password = g_strdup(password);
	client->auth_plaintext = allow_plaintext;
}

void
smtp_client_get_timeouts(const SmtpClient *client, SmtpTimeouts *t)
{
	const SmtpTimeouts *s = &client->timeouts;

	t->connect_ms = s->connect_ms ? s->connect_ms : DEFAULT_CONNECT_MS;
	t->command_ms = s->command_ms ? s->command_ms : DEFAULT_COMMAND_MS;
	t->data_ms = s->data_ms ? s->data_ms : DEFAULT_DATA_MS;
	t->final_ms = s->final_ms ? s->final_ms : DEFAULT_FINAL_MS;
}

gboolean
smtp_client_is_connected(const SmtpClient *client)
{
	return client->conn != NULL;
}

const char *
smtp_client_get_peer(const SmtpClient *client)
{
	return client->peer != NULL ? client->peer : "none";
}

gboolean
smtp_client_is_tls(const SmtpClient *client)
{
	return client->conn != NULL && !smtp_conn_is_plain(client->conn);
}

gboolean
smtp_client_is_esmtp(const SmtpClient *client)
{
	return client->conn != NULL && client->esmtp;
}

gboolean
smtp_client_has_extension(const SmtpClient *client, const char *keyword,
                          const char **param)
{
	g_autofree char *up = NULL;
	const char *value;

	if (param != NULL)
		*param = NULL;
	if (!smtp_client_is_esmtp(client) || keyword == NULL)
		return FALSE;
	up = g_ascii_strup(keyword, -1);
	value = g_hash_table_lookup(client->ext, up);
	if (value == NULL)
		return FALSE;
	if (param != NULL)
		*param = value;
	return TRUE;
}

void
smtp_client_drop(SmtpClient *client)
{
	g_clear_pointer(&client->conn, smtp_conn_free);
	client->esmtp = FALSE;
	g_hash_table_remove_all(client->ext);
}

gboolean
smtp_is_safe_arg(const char *s)
{
	for (; *s != '\0'; s++) {
		if ((guchar)*s < 0x20 || *s == 0x7f)
			return FALSE;
	}
	return TRUE;
}

/* ------------------------------------------------------------------ */
/* Commands                                                             */
/* ------------------------------------------------------------------ */

/* Read one reply; I/O errors and 421 close the connection. */
static gboolean
read_reply(SmtpClient *client, guint timeout_ms, const char *stage,
           SmtpReply *reply, GError **error)
{
	if (!smtp_conn_read_reply(client->conn, timeout_ms, stage, reply,
	                          error)) {
		smtp_client_drop(client);
		return FALSE;
	}

	/* RFC 5321 section 3.8: 421 means the server is closing the
	 * channel, whatever command it answers. */
	if (reply->code == 421) {
		smtp_set_error(error, SMTP_ERROR_DISCONNECTED, stage, reply,
		               "server closing connection at %s", stage);
		smtp_reply_clear(reply);
		smtp_client_drop(client);
		return FALSE;
	}
	return TRUE;
}

/*
 * Before we speak, the server has nothing to say.  Bytes waiting here
 * are a broken server or replies sent ahead for commands not yet sent:
 * a "250 queued" slipped in behind the 354 would otherwise be read as
 * the answer to the end of data, and a message never stored would
 * count as sent.  The stream is out of step for good: close it.
 */
static gboolean
check_quiet(SmtpClient *client, const char *stage, GError **error)
{
	if (!smtp_conn_has_pending(client->conn))
		return TRUE;
	smtp_set_error(error, SMTP_ERROR_PROTOCOL, stage, NULL,
	               "unexpected data from %s before %s",
	               smtp_client_get_peer(client), stage);
	smtp_client_drop(client);
	return FALSE;
}

static gboolean
require_conn(SmtpClient *client, const char *stage, GError **error)
{
	if (client->conn != NULL)
		return TRUE;
	smtp_set_error(error, SMTP_ERROR_DISCONNECTED, stage, NULL,
	               "not connected");
	return FALSE;
}

/* Every write to the server: connected, quiet, then @data within
 * @timeout_ms.  A failed write leaves the stream unusable: close. */
static gboolean
write_out(SmtpClient *client, const char *stage, const void *data, gsize len,
          guint timeout_ms, GError **error)
{
	if (!require_conn(client, stage, error) ||
	    !check_quiet(client, stage, error))
		return FALSE;
	if (smtp_conn_write(client->conn, data, len, timeout_ms, stage, error))
		return TRUE;
	smtp_client_drop(client);
	return FALSE;
}

/* Send @line with CRLF and read its reply; @secret: wipe the copy. */
static gboolean
command(SmtpClient *client, const char *stage, const char *line,
        gboolean secret, SmtpReply *reply, GError **error)
{
	char *wire;
	gsize len;
	SmtpTimeouts t;
	gboolean ok;

	smtp_client_get_timeouts(client, &t);
	wire = g_strconcat(line, "\r\n", NULL);
	len = strlen(wire);
	ok = write_out(client, stage, wire, len, t.command_ms, error);
	if (secret)
		explicit_bzero(wire, len);
	g_free(wire);
	if (!ok)
		return FALSE;
	return read_reply(client, t.command_ms, stage, reply, error);
}

gboolean
smtp_client_command(SmtpClient *client, const char *stage, const char *line,
                    SmtpReply *reply, GError **error)
{
	return command(client, stage, line, FALSE, reply, error);
}

gboolean
smtp_client_command_secret(SmtpClient *client, const char *stage,
                           const char *line, SmtpReply *reply, GError **error)
{
	return command(client, stage, line, TRUE, reply, error);
}

gboolean
smtp_client_write_data(SmtpClient *client, const void *data, gsize len,
                       GError **error)
{
	SmtpTimeouts t;

	smtp_client_get_timeouts(client, &t);
	return write_out(client, "message", data, len, t.data_ms, error);
}

gboolean
smtp_client_read_final(SmtpClient *client, SmtpReply *reply, GError **error)
{
	SmtpTimeouts t;

	smtp_client_get_timeouts(client, &t);
	return read_reply(client, t.final_ms, "end-of-data", reply, error);
}

/* ------------------------------------------------------------------ */
/* Session start                                                        */
/* ------------------------------------------------------------------ */

static const char *
helo_name(SmtpClient *client)
{
	const char *name;

	if (client->helo_name != NULL)
		return client->helo_name;

	/* RFC 5321 section 4.1.4 wants a domain; a bare host name is
	 * refused by strict servers, so fall back to the usual name. */
	name = g_get_host_name();
	if (strchr(name, '.') == NULL)
		name = "localhost.localdomain";
	client->helo_name = g_strdup(name);
	return client->helo_name;
}

/* Old servers (Exchange, Postfix's broken_sasl_auth_clients) also
 * write "AUTH=PLAIN LOGIN"; its mechanisms join those of "AUTH". */
static void
add_auth_mechs(SmtpClient *client, const char *mechs)
{
	const char *old = g_hash_table_lookup(client->ext, "AUTH");
	char *all;

	if (old != NULL && *old != '\0')
		all = g_strconcat(old, " ", mechs, NULL);
	else
		all = g_strdup(mechs);
	g_hash_table_replace(client->ext, g_strdup("AUTH"), all);
}

/* Keep the extensions of an EHLO reply; its first line is the
 * server's name. */
static void
parse_ehlo(SmtpClient *client, const SmtpReply *reply)
{
	g_auto(GStrv) lines = g_strsplit(reply->text, "\n", -1);

	g_hash_table_remove_all(client->ext);
	for (guint i = 1; lines[i] != NULL; i++) {
		char *line = g_strstrip(lines[i]);
		char *sp = strchr(line, ' ');
		char *key;

		if (*line == '\0')
			continue;
		if (g_ascii_strncasecmp(line, "AUTH=", 5) == 0) {
			g_strdelimit(line, "=", ' ');
			add_auth_mechs(client, g_strchug(line + 5));
			continue;
		}
		key = g_ascii_strup(line, sp ? sp - line : -1);
		if (strcmp(key, "AUTH") == 0) {
			add_auth_mechs(client, sp ? g_strchug(sp + 1) : "");
			g_free(key);
			continue;
		}
		g_hash_table_replace(client->ext, key,
		                     g_strdup(sp ? g_strchug(sp + 1) : ""));
	}
}

/* A reply the session cannot go on after (greeting, HELO, STARTTLS,
 * RSET refused): raise @code with it, then QUIT and close, so the next
 * call starts over on a fresh connection. */
static gboolean
refuse_and_quit(SmtpClient *client, SmtpErrorCode code, const char *stage,
                SmtpReply *reply, const char *what, GError **error)
{
	smtp_set_error(error, code, stage, reply, "%s", what);
	smtp_reply_clear(reply);
	smtp_client_quit(client);
	return FALSE;
}

/* EHLO, then HELO when EHLO is refused (RFC 5321 section 4.1.4). */
static gboolean
say_hello(SmtpClient *client, GError **error)
{
	g_autofree char *ehlo = NULL, *helo = NULL;
	SmtpReply reply = {0};

	ehlo = g_strconcat("EHLO ", helo_name(client), NULL);
	if (!smtp_client_command(client, "ehlo", ehlo, &reply, error))
		return FALSE;
	if (reply.code / 100 == 2) {
		client->esmtp = TRUE;
		parse_ehlo(client, &reply);
		smtp_reply_clear(&reply);
		return TRUE;
	}
	smtp_reply_clear(&reply);

	helo = g_strconcat("HELO ", helo_name(client), NULL);
	if (!smtp_client_command(client, "helo", helo, &reply, error))
		return FALSE;

	/* The server will not talk to us under this name; keeping the
	 * connection would only repeat the refusal. */
	if (reply.code / 100 != 2)
		return refuse_and_quit(client, SMTP_ERROR_HELO, "helo", &reply,
		                       "EHLO and HELO refused", error);
	client->esmtp = FALSE;
	smtp_reply_clear(&reply);
	return TRUE;
}

/* Refuse what this version cannot do before any byte is sent. */
static gboolean
check_settings(SmtpClient *client, GError **error)
{
	const char *name = helo_name(client);

	if (*name == '\0' || !smtp_is_safe_arg(name) || strchr(name, ' ')) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "bad HELO name");
		return FALSE;
	}
	if (client->auth_user != NULL && client->auth_password == NULL) {
		smtp_set_error(error, SMTP_ERROR_INPUT, "input", NULL,
		               "AUTH user set without a password");
		return FALSE;
	}
	return TRUE;
}

static const char *
tls_level_name(SmtpTlsLevel level)
{
	switch (level) {
	case SMTP_TLS_NONE:
		return "none";
	case SMTP_TLS_MAY:
		return "may";
	case SMTP_TLS_ENCRYPT:
		return "encrypt";
	default:
		return "verify";
	}
}

/* The STARTTLS exchange itself (RFC 3207); the caller has checked the
 * server offers it. */
static gboolean
starttls(SmtpClient *client, GError **error)
{
	SmtpReply reply = {0};
	SmtpTimeouts t;

	if (!smtp_client_command(client, "starttls", "STARTTLS", &reply, error))
		return FALSE;
	if (reply.code != 220 && client->tls_level == SMTP_TLS_MAY) {
		smtp_reply_clear(&reply);
		return TRUE;
	}
	if (reply.code != 220) {
		g_autofree char *what = g_strdup_printf(
		    "STARTTLS refused by %s", smtp_client_get_peer(client));

		return refuse_and_quit(client, SMTP_ERROR_TLS, "starttls",
		                       &reply, what, error);
	}
	smtp_reply_clear(&reply);

	smtp_client_get_timeouts(client, &t);
	if (!smtp_tls_start(client->conn, client->tls_level, client->host,
	                    client->ca_file, t.command_ms, error)) {
		/* Mid-handshake there is no way back to SMTP: no QUIT. */
		smtp_client_drop(client);
		return FALSE;
	}

	/* RFC 3207 section 4.2: forget what the server said in clear
	 * text, it may have been forged; ask again under TLS. */
	client->esmtp = FALSE;
	g_hash_table_remove_all(client->ext);
	return say_hello(client, error);
}

/* Step 4 of connect: STARTTLS as the level asks. */
static gboolean
maybe_starttls(SmtpClient *client, GError **error)
{
	if (client->tls_level == SMTP_TLS_NONE)
		return TRUE;
	if (smtp_client_has_extension(client, "STARTTLS", NULL))
		return starttls(client, error);
	if (client->tls_level == SMTP_TLS_MAY)
		return TRUE;
	smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
	               "%s does not offer STARTTLS, which TLS level %s "
	               "requires",
	               smtp_client_get_peer(client),
	               tls_level_name(client->tls_level));
	smtp_client_quit(client);
	return FALSE;
}

/* Step 5 of connect: AUTH when credentials are set. */
static gboolean
maybe_auth(SmtpClient *client, GError **error)
{
	if (client->auth_user == NULL)
		return TRUE;
	if (smtp_auth_run(client, client->auth_user, client->auth_password,
	                  client->auth_plaintext, error))
		return TRUE;

	/* Unauthenticated, the session is not the one the caller set
	 * up; the next call must start over. */
	smtp_client_quit(client);
	return FALSE;
}

gboolean
smtp_client_connect(SmtpClient *client, GError **error)
{
	SmtpReply reply = {0};
	SmtpTimeouts t;

	if (client->conn != NULL)
		return TRUE;
	if (!check_settings(client, error))
		return FALSE;
	smtp_client_get_timeouts(client, &t);

	/* Step 1: the TCP connection. */
	client->conn = smtp_conn_open(client->host, client->port, t.connect_ms,
	                              client->deadline, &client->peer, error);
	if (client->conn == NULL)
		return FALSE;

	/* Step 2: the greeting, under the connect limit. */
	if (!read_reply(client, t.connect_ms, "greeting", &reply, error))
		return FALSE;
	/* RFC 5321 section 3.1: a 554 greeting means no service here;
	 * QUIT and go, as the RFC asks. */
	if (reply.code != 220)
		return refuse_and_quit(client, SMTP_ERROR_CONNECT, "greeting",
		                       &reply, "server refused the session",
		                       error);
	smtp_reply_clear(&reply);

	/* Step 3: EHLO or HELO. */
	if (!say_hello(client, error))
		return FALSE;

	/* Steps 4 and 5: TLS, then credentials, which need it. */
	return maybe_starttls(client, error) && maybe_auth(client, error);
}

gboolean
smtp_client_rset(SmtpClient *client, GError **error)
{
	SmtpReply reply = {0};

	if (!smtp_client_command(client, "rset", "RSET", &reply, error))
		return FALSE;
	/* A server that refuses RSET is in a state we cannot know;
	 * starting over is the only safe next step. */
	if (reply.code / 100 != 2)
		return refuse_and_quit(client, SMTP_ERROR_PROTOCOL, "rset",
		                       &reply, "RSET refused", error);
	smtp_reply_clear(&reply);
	return TRUE;
}

void
smtp_client_quit(SmtpClient *client)
{
	SmtpReply reply = {0};

	if (client->conn == NULL)
		return;
	if (smtp_conn_write(client->conn, "QUIT\r\n", 6, QUIT_MS, "quit",
	                    NULL) &&
	    smtp_conn_read_reply(client->conn, QUIT_MS, "quit", &reply, NULL))
		smtp_reply_clear(&reply);
	smtp_client_drop(client);
}

/* ------------------------------------------------------------------ */
/* Pipelining (RFC 2920): writing and reading apart                     */
/* ------------------------------------------------------------------ */

gboolean
smtp_client_write_commands(SmtpClient *client, const char *stage,
                           const void *data, gsize len, GError **error)
{
	SmtpTimeouts t;

	smtp_client_get_timeouts(client, &t);
	return write_out(client, stage, data, len, t.command_ms, error);
}

gboolean
smtp_client_read_reply(SmtpClient *client, const char *stage, SmtpReply *reply,
                       GError **error)
{
	SmtpTimeouts t;

	if (!require_conn(client, stage, error))
		return FALSE;
	smtp_client_get_timeouts(client, &t);
	return read_reply(client, t.command_ms, stage, reply, error);
}
