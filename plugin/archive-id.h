/*
 * archive-id.h - X-Archive-Id values only this milter can make
 *
 * An id is a random nonce and a truncated HMAC-SHA256 of it under a
 * secret key kept in a file, so that a copy coming back through the
 * MTA can be told from a message that merely carries the header.
 */
#ifndef AM_ARCHIVE_ID_H
#define AM_ARCHIVE_ID_H

#include <glib.h>

G_BEGIN_DECLS

#define AM_ARCHIVE_KEY_ERROR (am_archive_key_error_quark())
GQuark am_archive_key_error_quark(void);

typedef enum {
	AM_ARCHIVE_KEY_ERROR_IO,      /* cannot read or create the file */
	AM_ARCHIVE_KEY_ERROR_BAD,     /* too short or long, not a regular
				       * file, or open to others */
	AM_ARCHIVE_KEY_ERROR_MISSING, /* am_archive_key_check(): no file
				       * (the daemon would create it) */
} AmArchiveKeyError;

/* Octets of secret in a key file we create; the least and the most we
 * accept (a larger file is a wrong path, never read whole). */
#define AM_ARCHIVE_KEY_SIZE 32
#define AM_ARCHIVE_KEY_MIN  16
#define AM_ARCHIVE_KEY_MAX  1024

typedef struct AmArchiveKey AmArchiveKey;

/*
 * am_archive_key_load: read the secret from @path, creating the file
 * (mode 0600, AM_ARCHIVE_KEY_SIZE random octets) when it does not
 * exist.  Fails (BAD, naming @path and the limit) when the file is
 * shorter than AM_ARCHIVE_KEY_MIN or longer than AM_ARCHIVE_KEY_MAX
 * octets, not a regular file, or readable by group or others; at most
 * AM_ARCHIVE_KEY_MAX + 1 octets are ever read.
 * (transfer full): am_archive_key_free().
 */
AmArchiveKey *am_archive_key_load(const char *path, GError **error);

/*
 * am_archive_key_check: whether the existing key file at @path would
 * load, judged exactly as am_archive_key_load() judges it, but creating
 * nothing (--check).  MISSING when there is no file.  Each message
 * starts with @path and names one cause: not a regular file (and what
 * it is), a mode open to group or others, too short, too long, or
 * cannot be opened or read (with the system's reason).
 */
gboolean am_archive_key_check(const char *path, GError **error);

/* am_archive_key_new: a key from @len octets at @data (tests). */
AmArchiveKey *am_archive_key_new(const guint8 *data, gsize len);

/* Frees and wipes the secret. */
void am_archive_key_free(AmArchiveKey *key);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmArchiveKey, am_archive_key_free)

/*
 * am_archive_id_new: a fresh id, "am1.NONCE.MAC" in lower-case hex
 * (NONCE 16 octets, MAC the first 16 octets of HMAC-SHA256).
 * (transfer full)
 */
char *am_archive_id_new(const AmArchiveKey *key);

/*
 * am_archive_id_verify: whether @value (a header value; surrounding
 * white space is ignored) is an id made with @key.
 * Constant time in the MAC comparison.  Never fails: anything malformed
 * is simply not ours.
 */
gboolean am_archive_id_verify(const AmArchiveKey *key, const char *value);

G_END_DECLS

#endif /* AM_ARCHIVE_ID_H */
