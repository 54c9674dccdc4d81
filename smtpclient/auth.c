/*
 * auth.c - AUTH PLAIN and LOGIN (RFC 4954, RFC 4616, and LOGIN as
 * Microsoft and Postfix's Cyrus setups speak it)
 *
 * Policy: credentials leave only over TLS unless the caller allowed
 * plain text; PLAIN is preferred (one round trip, and it is the one
 * RFC 4616 defines), LOGIN is the fallback for servers that offer only
 * it.  Every refusal is decided before the first credential byte is
 * written.  Each buffer that held the password, in clear or in base64,
 * is wiped before it is freed, and no error text ever contains what we
 * sent: only what the server answered.
 *
 * Known limits:
 * XXX: no CRAM-MD5, SCRAM or XOAUTH2; over TLS PLAIN protects the
 * password as well as they do, and they need more state than an
 * archive relay's credentials justify.
 * XXX: no authorization identity (the empty authzid of RFC 4616): a
 * relay account acts only as itself.
 */
#include <string.h>

#include "smtp-private.h"

typedef enum {
	MECH_NONE,
	MECH_PLAIN,
	MECH_LOGIN,
} Mech;

/* PLAIN when offered, else LOGIN; @offered is the AUTH parameter list
 * of the EHLO reply. */
static Mech
choose_mech(const char *offered)
{
	g_auto(GStrv) words = g_strsplit_set(offered, " \t", -1);
	gboolean plain = FALSE, login = FALSE;

	for (guint i = 0; words[i] != NULL; i++) {
		if (g_ascii_strcasecmp(words[i], "PLAIN") == 0)
			plain = TRUE;
		else if (g_ascii_strcasecmp(words[i], "LOGIN") == 0)
			login = TRUE;
	}
	return plain ? MECH_PLAIN : login ? MECH_LOGIN : MECH_NONE;
}

/* Send "@prefix base64(@data)" as a secret command. */
static gboolean
send_b64(SmtpClient *client, const char *prefix, const void *data, gsize len,
         SmtpReply *reply, GError **error)
{
	char *b64 = g_base64_encode(data, len);
	char *line = g_strconcat(prefix, b64, NULL);
	gboolean ok;

	smtp_password_free(b64);
	ok = smtp_client_command_secret(client, "auth", line, reply, error);
	smtp_password_free(line);
	return ok;
}

/* RFC 4616: authzid NUL authcid NUL passwd, as an initial response
 * (RFC 4954 section 4), so one round trip suffices. */
static gboolean
auth_plain(SmtpClient *client, const char *user, const char *password,
           SmtpReply *reply, GError **error)
{
	gsize ulen = strlen(user), plen = strlen(password);
	gsize len = ulen + plen + 2;
	guint8 *raw = g_malloc(len);
	gboolean ok;

	raw[0] = '\0';
	memcpy(raw + 1, user, ulen);
	raw[1 + ulen] = '\0';
	memcpy(raw + 2 + ulen, password, plen);
	ok = send_b64(client, "AUTH PLAIN ", raw, len, reply, error);
	explicit_bzero(raw, len);
	g_free(raw);
	return ok;
}

/* LOGIN: the server asks for the user name, then the password, each
 * with a 334; any other answer ends the exchange for the caller to
 * judge. */
static gboolean
auth_login(SmtpClient *client, const char *user, const char *password,
           SmtpReply *reply, GError **error)
{
	if (!smtp_client_command(client, "auth", "AUTH LOGIN", reply, error))
		return FALSE;
	if (reply->code != 334)
		return TRUE;
	smtp_reply_clear(reply);
	if (!send_b64(client, "", user, strlen(user), reply, error))
		return FALSE;
	if (reply->code != 334)
		return TRUE;
	smtp_reply_clear(reply);
	return send_b64(client, "", password, strlen(password), reply, error);
}

/* Refuse before anything is sent: no TLS, no AUTH, no mechanism. */
static Mech
check_auth(SmtpClient *client, gboolean allow_plaintext, GError **error)
{
	const char *offered = NULL;
	Mech mech;

	if (!allow_plaintext && !smtp_client_is_tls(client)) {
		smtp_set_error(error, SMTP_ERROR_AUTH, "auth", NULL,
		               "credentials are set but the connection to "
		               "%s is not encrypted; not sending them",
		               smtp_client_get_peer(client));
		return MECH_NONE;
	}
	if (!smtp_client_has_extension(client, "AUTH", &offered)) {
		smtp_set_error(error, SMTP_ERROR_AUTH, "auth", NULL,
		               "credentials are set but %s does not offer "
		               "AUTH",
		               smtp_client_get_peer(client));
		return MECH_NONE;
	}
	mech = choose_mech(offered);
	if (mech == MECH_NONE) {
		g_autofree char *safe = g_strescape(offered, NULL);

		smtp_set_error(error, SMTP_ERROR_AUTH, "auth", NULL,
		               "%s offers no AUTH mechanism we support "
		               "(PLAIN, LOGIN); it offers: %s",
		               smtp_client_get_peer(client), safe);
	}
	return mech;
}

gboolean
smtp_auth_run(SmtpClient *client, const char *user, const char *password,
              gboolean allow_plaintext, GError **error)
{
	SmtpReply reply = {0};
	const char *name;
	Mech mech;
	gboolean ok;

	/* Step 1: every refusal of ours comes before any credential. */
	mech = check_auth(client, allow_plaintext, error);
	if (mech == MECH_NONE)
		return FALSE;

	/* Step 2: the exchange; I/O errors have closed the connection. */
	name = mech == MECH_PLAIN ? "PLAIN" : "LOGIN";
	if (mech == MECH_PLAIN)
		ok = auth_plain(client, user, password, &reply, error);
	else
		ok = auth_login(client, user, password, &reply, error);
	if (!ok)
		return FALSE;
	if (reply.code == 235) {
		smtp_reply_clear(&reply);
		return TRUE;
	}

	/* Step 3: a server that still asks (334) is cancelled with "*"
	 * (RFC 4954 section 4); the refusal reported is its own. */
	if (reply.code == 334) {
		SmtpReply cancel = {0};

		smtp_set_error(error, SMTP_ERROR_AUTH, "auth", &reply,
		               "AUTH %s: server asked for more than user "
		               "name and password",
		               name);
		if (smtp_client_command(client, "auth", "*", &cancel, NULL))
			smtp_reply_clear(&cancel);
		smtp_reply_clear(&reply);
		return FALSE;
	}
	smtp_set_error(error, SMTP_ERROR_AUTH, "auth", &reply,
	               "AUTH %s refused", name);
	smtp_reply_clear(&reply);
	return FALSE;
}
