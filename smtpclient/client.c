/*
 * client.c - the SMTP session: connect, greeting, EHLO or HELO, RSET,
 * QUIT, and the one function every command goes through
 *
 * Policy: a reply we cannot trust the stream after (a timeout, a
 * malformed reply, a 421, a closed socket) closes the connection at
 * once, so a late answer can never be taken for the reply to the next
 * command; the next call connects again.  Refusals leave it open.
 *
 * Known limits:
 * XXX: STARTTLS and AUTH come with issue 3; until then a TLS level
 * other than SMTP_TLS_NONE, or credentials, make connect fail with
 * SMTP_ERROR_TLS or SMTP_ERROR_AUTH before any connection is made, so
 * nothing is ever sent in the clear that the caller wanted protected.
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

static void
wipe_free(char *secret)
{
	if (secret == NULL)
		return;
	explicit_bzero(secret, strlen(secret));
	g_free(secret);
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
	wipe_free(client->auth_password);
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
	wipe_free(client->auth_password);
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

gboolean
smtp_client_command(SmtpClient *client, const char *stage, const char *line,
                    SmtpReply *reply, GError **error)
{
	g_autofree char *wire = NULL;
	SmtpTimeouts t;

	if (client->conn == NULL) {
		smtp_set_error(error, SMTP_ERROR_DISCONNECTED, stage, NULL,
		               "not connected");
		return FALSE;
	}
	smtp_client_get_timeouts(client, &t);
	wire = g_strconcat(line, "\r\n", NULL);
	if (!smtp_conn_write(client->conn, wire, strlen(wire), t.command_ms,
	                     stage, error)) {
		smtp_client_drop(client);
		return FALSE;
	}
	return read_reply(client, t.command_ms, stage, reply, error);
}

gboolean
smtp_client_write_data(SmtpClient *client, const void *data, gsize len,
                       GError **error)
{
	SmtpTimeouts t;

	smtp_client_get_timeouts(client, &t);
	if (!smtp_conn_write(client->conn, data, len, t.data_ms, "message",
	                     error)) {
		smtp_client_drop(client);
		return FALSE;
	}
	return TRUE;
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
		key = g_ascii_strup(line, sp ? sp - line : -1);
		g_hash_table_replace(client->ext, key,
		                     g_strdup(sp ? g_strchug(sp + 1) : ""));
	}
}

/* EHLO, then HELO when EHLO is refused (RFC 5321 section 4.1.4). */
static gboolean
say_hello(SmtpClient *client, GError **error)
{
	g_autofree char *ehlo = NULL, *helo = NULL;
	SmtpReply reply = {0};
	gboolean ok;

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
	ok = reply.code / 100 == 2;
	if (!ok) {
		/* The server will not talk to us under this name; keeping
		 * the connection would only repeat the refusal. */
		smtp_set_error(error, SMTP_ERROR_HELO, "helo", &reply,
		               "EHLO and HELO refused");
		smtp_client_quit(client);
	}
	client->esmtp = FALSE;
	smtp_reply_clear(&reply);
	return ok;
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
	if (client->tls_level != SMTP_TLS_NONE) {
		smtp_set_error(error, SMTP_ERROR_TLS, "starttls", NULL,
		               "STARTTLS is not implemented yet");
		return FALSE;
	}
	if (client->auth_user != NULL) {
		smtp_set_error(error, SMTP_ERROR_AUTH, "auth", NULL,
		               "AUTH is not implemented yet");
		return FALSE;
	}
	return TRUE;
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
	                              &client->peer, error);
	if (client->conn == NULL)
		return FALSE;

	/* Step 2: the greeting, under the connect limit. */
	if (!read_reply(client, t.connect_ms, "greeting", &reply, error))
		return FALSE;
	if (reply.code != 220) {
		/* RFC 5321 section 3.1: a 554 greeting means no service
		 * here; QUIT and go, as the RFC asks. */
		smtp_set_error(error, SMTP_ERROR_CONNECT, "greeting", &reply,
		               "server refused the session");
		smtp_reply_clear(&reply);
		smtp_client_quit(client);
		return FALSE;
	}
	smtp_reply_clear(&reply);

	/* Step 3: EHLO or HELO. */
	return say_hello(client, error);
}

gboolean
smtp_client_rset(SmtpClient *client, GError **error)
{
	SmtpReply reply = {0};

	if (!smtp_client_command(client, "rset", "RSET", &reply, error))
		return FALSE;
	if (reply.code / 100 != 2) {
		/* A server that refuses RSET is in a state we cannot
		 * know; starting over is the only safe next step. */
		smtp_set_error(error, SMTP_ERROR_PROTOCOL, "rset", &reply,
		               "RSET refused");
		smtp_reply_clear(&reply);
		smtp_client_quit(client);
		return FALSE;
	}
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
