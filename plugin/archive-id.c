/*
 * archive-id.c - make and check X-Archive-Id values
 *
 * The MAC covers the nonce with a version label, so ids cannot be
 * forged without the key, and a changed nonce, MAC or version fails.
 * Truncating HMAC-SHA256 to 128 bits leaves a forgery chance of 2^-128
 * per try, more than enough for a loop detector.
 *
 * Known limits: a valid id is replayable: anyone who saw an archived
 * copy can put its id on a new message.  The milter therefore skips a
 * message for its id only when every envelope recipient is an archive
 * address too (see milter.c), which is all a replay can then achieve.
 * XXX: changing the key file makes copies still in flight look foreign;
 * they get archived a second time, which the archive can drop by id.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "archive-id.h"

G_DEFINE_QUARK(am - archive - key - error - quark, am_archive_key_error)

#define ID_PREFIX  "am1."
#define NONCE_SIZE 16
#define MAC_SIZE   16
#define ID_LEN     (sizeof(ID_PREFIX) - 1 + NONCE_SIZE * 2 + 1 + MAC_SIZE * 2)

struct AmArchiveKey {
	guint8 *data;
	gsize len;
};

AmArchiveKey *
am_archive_key_new(const guint8 *data, gsize len)
{
	AmArchiveKey *key = g_new0(AmArchiveKey, 1);

	key->data = g_memdup2(data, len);
	key->len = len;
	return key;
}

void
am_archive_key_free(AmArchiveKey *key)
{
	if (key == NULL)
		return;
	explicit_bzero(key->data, key->len);
	g_free(key->data);
	g_free(key);
}

static gboolean
random_bytes(guint8 *buf, gsize len, GError **error)
{
	if (getentropy(buf, len) == 0)
		return TRUE;
	g_set_error(error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_IO,
	            "no random numbers: %s", g_strerror(errno));
	return FALSE;
}

/*
 * The default key lives in /var/lib/archive-milter, which a fresh
 * machine does not have: make the last directory of @path (0700, it
 * holds a secret), but never a whole tree, so that a typo in the
 * configured path fails loudly instead of creating one.
 */
static gboolean
key_dir_create(const char *path, GError **error)
{
	g_autofree char *dir = g_path_get_dirname(path);

	if (mkdir(dir, 0700) == 0 || errno == EEXIST)
		return TRUE;
	g_set_error(error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_IO,
	            "%s: cannot create directory %s for the key: %s", path, dir,
	            g_strerror(errno));
	return FALSE;
}

/* Create @path exclusively, so two starting daemons cannot race. */
static gboolean
key_create(const char *path, GError **error)
{
	guint8 secret[AM_ARCHIVE_KEY_SIZE];
	int fd;
	ssize_t n;

	if (!random_bytes(secret, sizeof(secret), error))
		return FALSE;
	if (!key_dir_create(path, error))
		return FALSE;
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0 && errno == EEXIST)
		return TRUE;
	if (fd < 0) {
		g_set_error(error, AM_ARCHIVE_KEY_ERROR,
		            AM_ARCHIVE_KEY_ERROR_IO, "%s: cannot create: %s",
		            path, g_strerror(errno));
		return FALSE;
	}
	n = write(fd, secret, sizeof(secret));
	explicit_bzero(secret, sizeof(secret));
	if (n != (ssize_t)sizeof(secret) || fsync(fd) != 0) {
		g_set_error(
		    error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_IO,
		    "%s: cannot write: %s", path,
		    n >= 0 && n < (ssize_t)sizeof(secret) ? "short write"
		                                          : g_strerror(errno));
		close(fd);
		unlink(path);
		return FALSE;
	}
	close(fd);
	return TRUE;
}

/*
 * Read at most AM_ARCHIVE_KEY_MAX + 1 octets of @fd into @buf: one more
 * than a key may hold tells a file that is too long, whatever its
 * st_size says, without reading a large file whole.
 */
static gboolean
key_read(int fd, const char *path, guint8 *buf, gsize *len, GError **error)
{
	*len = 0;
	while (*len < AM_ARCHIVE_KEY_MAX + 1) {
		ssize_t n = read(fd, buf + *len, AM_ARCHIVE_KEY_MAX + 1 - *len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			g_set_error(error, AM_ARCHIVE_KEY_ERROR,
			            AM_ARCHIVE_KEY_ERROR_IO,
			            "%s: cannot read: %s", path,
			            g_strerror(errno));
			return FALSE;
		}
		if (n == 0)
			break;
		*len += n;
	}
	return TRUE;
}

/* What a path is when it is no regular file, for the message. */
static const char *
file_type_name(mode_t mode)
{
	if (S_ISDIR(mode))
		return "a directory";
	if (S_ISCHR(mode))
		return "a character device";
	if (S_ISBLK(mode))
		return "a block device";
	if (S_ISFIFO(mode))
		return "a named pipe";
	if (S_ISSOCK(mode))
		return "a socket";
	return "not a regular file";
}

/*
 * The opened file itself is checked (fstat), not the path, so that a
 * file swapped in between check and read cannot slip through.  Each
 * cause has its own message, with what to do about it.
 */
static gboolean
key_file_ok(int fd, const char *path, GError **error)
{
	struct stat st;

	if (fstat(fd, &st) != 0) {
		g_set_error(error, AM_ARCHIVE_KEY_ERROR,
		            AM_ARCHIVE_KEY_ERROR_IO, "%s: cannot stat: %s",
		            path, g_strerror(errno));
		return FALSE;
	}
	if (!S_ISREG(st.st_mode)) {
		g_set_error(error, AM_ARCHIVE_KEY_ERROR,
		            AM_ARCHIVE_KEY_ERROR_BAD,
		            "%s: is %s; the key must be a regular file", path,
		            file_type_name(st.st_mode));
		return FALSE;
	}

	/* A secret others can read is no secret: refuse it loudly. */
	if ((st.st_mode & 0077) != 0) {
		g_set_error(
		    error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_BAD,
		    "%s: mode %04o is open to group or others; the key "
		    "must be readable by its owner only (chmod 0600 %s)",
		    path, (unsigned)(st.st_mode & 07777), path);
		return FALSE;
	}
	if (st.st_size > AM_ARCHIVE_KEY_MAX) {
		g_set_error(error, AM_ARCHIVE_KEY_ERROR,
		            AM_ARCHIVE_KEY_ERROR_BAD,
		            "%s: too long: a key holds at most %d octets, the "
		            "file has %lld (is it the right file?)",
		            path, AM_ARCHIVE_KEY_MAX, (long long)st.st_size);
		return FALSE;
	}
	return TRUE;
}

/*
 * Open, check and read an existing key file; both the daemon (after
 * creating a missing one) and --check come through here, so that they
 * judge a file alike.  A missing file is AM_ARCHIVE_KEY_ERROR_MISSING.
 */
static AmArchiveKey *
key_file_read(const char *path, GError **error)
{
	guint8 buf[AM_ARCHIVE_KEY_MAX + 1];
	gsize len = 0;
	AmArchiveKey *key = NULL;
	int fd;

	/* O_NONBLOCK: a named pipe in its place must not hang the start. */
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		int e = errno;

		g_set_error(error, AM_ARCHIVE_KEY_ERROR,
		            e == ENOENT ? AM_ARCHIVE_KEY_ERROR_MISSING
		                        : AM_ARCHIVE_KEY_ERROR_IO,
		            "%s: cannot open%s: %s", path,
		            e == EACCES ? " (unreadable for this user)" : "",
		            g_strerror(e));
		return NULL;
	}
	if (!key_file_ok(fd, path, error) ||
	    !key_read(fd, path, buf, &len, error))
		goto out;

	/* The file may have grown since fstat(): the read decides. */
	if (len > AM_ARCHIVE_KEY_MAX)
		g_set_error(error, AM_ARCHIVE_KEY_ERROR,
		            AM_ARCHIVE_KEY_ERROR_BAD,
		            "%s: too long: a key holds at most %d octets, the "
		            "file has more (is it the right file?)",
		            path, AM_ARCHIVE_KEY_MAX);
	else if (len < AM_ARCHIVE_KEY_MIN)
		g_set_error(
		    error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_BAD,
		    "%s: too short: a key needs at least %d octets, the "
		    "file has %zu (delete it and a new one is made at "
		    "the next start)",
		    path, AM_ARCHIVE_KEY_MIN, len);
	else
		key = am_archive_key_new(buf, len);
out:
	explicit_bzero(buf, sizeof(buf));
	close(fd);
	return key;
}

AmArchiveKey *
am_archive_key_load(const char *path, GError **error)
{
	if (!key_create(path, error))
		return NULL;
	return key_file_read(path, error);
}

gboolean
am_archive_key_check(const char *path, GError **error)
{
	AmArchiveKey *key = key_file_read(path, error);

	am_archive_key_free(key);
	return key != NULL;
}

static void
hex_append(GString *out, const guint8 *data, gsize len)
{
	gsize i;

	for (i = 0; i < len; i++)
		g_string_append_printf(out, "%02x", data[i]);
}

/* The MAC of @nonce_hex, as lower-case hex of MAC_SIZE octets. */
static void
mac_hex(const AmArchiveKey *key, const char *nonce_hex, char *out)
{
	g_autoptr(GHmac) hmac =
	    g_hmac_new(G_CHECKSUM_SHA256, key->data, key->len);
	guint8 digest[32];
	gsize len = sizeof(digest);
	gsize i;

	g_hmac_update(hmac, (const guchar *)ID_PREFIX, strlen(ID_PREFIX));
	g_hmac_update(hmac, (const guchar *)nonce_hex, NONCE_SIZE * 2);
	g_hmac_get_digest(hmac, digest, &len);
	for (i = 0; i < MAC_SIZE; i++)
		g_snprintf(out + i * 2, 3, "%02x", digest[i]);
}

char *
am_archive_id_new(const AmArchiveKey *key)
{
	guint8 nonce[NONCE_SIZE];
	char mac[MAC_SIZE * 2 + 1];
	GString *id = g_string_new(ID_PREFIX);
	gsize i;

	/* getentropy() cannot fail for 16 octets on Linux >= 3.17;
	 * GRand keeps us going should it ever. */
	if (getentropy(nonce, sizeof(nonce)) != 0)
		for (i = 0; i < sizeof(nonce); i++)
			nonce[i] = g_random_int_range(0, 256);
	hex_append(id, nonce, sizeof(nonce));
	mac_hex(key, id->str + strlen(ID_PREFIX), mac);
	g_string_append_c(id, '.');
	g_string_append(id, mac);
	return g_string_free(id, FALSE);
}

static gboolean
is_lower_hex(const char *s, gsize len)
{
	gsize i;

	for (i = 0; i < len; i++)
		if (!g_ascii_isxdigit(s[i]) || g_ascii_isupper(s[i]))
			return FALSE;
	return TRUE;
}

gboolean
am_archive_id_verify(const AmArchiveKey *key, const char *value)
{
	g_autofree char *id = NULL;
	const char *nonce, *mac;
	char expect[MAC_SIZE * 2 + 1];
	guint8 diff = 0;
	gsize i;

	if (key == NULL || value == NULL)
		return FALSE;
	id = g_strstrip(g_strdup(value));

	/* Strict shape first: prefix, hex nonce, dot, hex MAC, nothing else */
	if (strlen(id) != ID_LEN || !g_str_has_prefix(id, ID_PREFIX))
		return FALSE;
	nonce = id + strlen(ID_PREFIX);
	mac = nonce + NONCE_SIZE * 2 + 1;
	if (mac[-1] != '.' || !is_lower_hex(nonce, NONCE_SIZE * 2) ||
	    !is_lower_hex(mac, MAC_SIZE * 2))
		return FALSE;

	mac_hex(key, nonce, expect);
	for (i = 0; i < MAC_SIZE * 2; i++)
		diff |= (guint8)(expect[i] ^ mac[i]);
	return diff == 0;
}
