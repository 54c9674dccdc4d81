/*
 * spool.h - the durable spool of archive copies
 *
 * A copy that is not confirmed by its relay lives here until it is.
 * Layout under the spool directory (created by am_spool_open; it and
 * each subdirectory must be a real directory, not a symbolic link,
 * owned by the process's effective uid, mode 0700):
 *
 *   tmp/ID     being written; never read; removed at the daemon's
 *              start; also the files of confirmed copies, kept
 *              (".recycled.N") to be written again for new copies
 *   queue/ID   waiting for (re)delivery by a worker
 *   hold/ID    refused for good or too old: kept for an administrator
 *   state/ID   retry state of a copy (attempts, next attempt, last
 *              error, addresses still due); small, rewritten by rename,
 *              never fsynced: losing it only resets the backoff and may
 *              send a copy again, which its X-Archive-Id lets an
 *              archive recognise
 *   lock       flock()ed by the daemon; only the daemon that holds it
 *              clears tmp/ (and, at its start, the state of copies
 *              that are gone); the --spool-* commands never take it
 *
 * ID is the copy's X-Archive-Id, which is also in the file, so that the
 * id stays the same on every retry and after a restart.  An id is
 * refused (NOT_FOUND) unless it is a plain file name: no '/', no
 * leading '.', no space or control character, at most 200 octets.  A
 * spool file starts with a versioned text envelope, then a blank line,
 * then the copy exactly as it will be sent (journal headers and the
 * original).  The envelope records the copy's length and SHA-256: a
 * file whose copy is not that long is damaged (FORMAT: never sent,
 * left where it is, counted as damaged by --spool-list), and one whose
 * digest differs is refused by am_spool_message() (FORMAT), which the
 * runner answers by holding it.  Every file is opened relative to the
 * directory descriptors taken at open, never through a symbolic link.
 *
 * A file reaches queue/ or hold/ only by rename after an fdatasync of
 * the file; the directory is fsynced after the rename (one fsync may
 * serve the renames of many threads: it is always one that began after
 * this rename was done).  am_spool_put() returns only when both are done,
 * so a caller that answers the MTA after it returns never answers for
 * a copy that a crash could lose.
 *
 * Safe to use from many threads of one process, and from a second
 * process (archive-milter --spool-list / --spool-retry) at the same time
 * as the daemon: every change of state is one rename.
 */
#ifndef AM_SPOOL_H
#define AM_SPOOL_H

#include <glib.h>

#include "smtpclient.h"

G_BEGIN_DECLS

#define AM_SPOOL_ERROR (am_spool_error_quark())
GQuark am_spool_error_quark(void);

typedef enum {
	AM_SPOOL_ERROR_IO,        /* a system call failed: errno's text */
	AM_SPOOL_ERROR_FULL,      /* below spool_min_free, or ENOSPC/EDQUOT */
	AM_SPOOL_ERROR_FORMAT,    /* a spool file that cannot be parsed */
	AM_SPOOL_ERROR_NOT_FOUND, /* no copy with that id */
} AmSpoolError;

/* Spool file format version written; older or newer are FORMAT errors.
 * Version 1 (unreleased until now) requires the size and sha256 keys. */
#define AM_SPOOL_VERSION 1

typedef enum {
	AM_SPOOL_QUEUED, /* queue/ */
	AM_SPOOL_HELD,   /* hold/ */
} AmSpoolState;

/*
 * AmSpoolEntry: the envelope and retry state of one spooled copy.
 * Every string is owned; free with am_spool_entry_free().
 */
typedef struct {
	char *id;       /* X-Archive-Id; also the file name */
	char *queue_id; /* the original's queue id; NULL: unknown */
	char *rule;     /* [rule:NAME] that made the copy */
	char *relay;    /* [relay:NAME] to send it through */
	char *from;     /* copy's envelope sender; "" for <> */
	char **to;      /* NULL-terminated: addresses still due */
	gboolean smtputf8;
	gboolean eightbit;
	gint64 created;      /* unix seconds, when first spooled */
	guint attempts;      /* delivery attempts so far */
	gint64 next_attempt; /* unix seconds; 0: now */
	char *last_error;    /* last failure's reply or reason; NULL */
	gint64 released;     /* unix seconds of the last release from
			      * hold/; 0: never.  spool_max_age counts
			      * from the later of this and created */
	AmSpoolState state;
	guint64 size;            /* octets of the copy (read only) */
	char *sha256;            /* hex SHA-256 of the copy (read only) */
	gint64 created_override; /* 0, or a corrected created time kept
				  * in state/ID (the envelope is never
				  * rewritten); applied to created */
} AmSpoolEntry;

void am_spool_entry_free(AmSpoolEntry *entry);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmSpoolEntry, am_spool_entry_free)

/* am_spool_entry_copy: a deep copy of @entry.  (transfer full) */
AmSpoolEntry *am_spool_entry_copy(const AmSpoolEntry *entry);

typedef struct AmSpool AmSpool;

/* am_spool_id_is_valid: whether @id can name a copy (see above). */
gboolean am_spool_id_is_valid(const char *id);

typedef enum {
	AM_SPOOL_OPEN_DAEMON = 0,       /* take the lock; clean up */
	AM_SPOOL_OPEN_COMMAND = 1 << 0, /* no lock, delete nothing */
} AmSpoolOpenFlags;

/*
 * am_spool_open_full: use @dir as the spool, creating it and its
 * subdirectories (0700) when missing.  Fails (IO, the message naming
 * the path and what is wrong) when one cannot be created, is a
 * symbolic link or not a directory, is owned by another uid than the
 * process's effective one, or is open to group or others.  A daemon
 * (AM_SPOOL_OPEN_DAEMON) takes the lock and, when it gets it, removes
 * the leftovers of a crash; a command (AM_SPOOL_OPEN_COMMAND) does
 * neither.  @min_free: octets that must stay free on its file system
 * for am_spool_put() to write.  (transfer full)
 */
AmSpool *am_spool_open_full(const char *dir, guint64 min_free,
                            AmSpoolOpenFlags flags, GError **error);

/* am_spool_open: am_spool_open_full() as the daemon. */
AmSpool *am_spool_open(const char *dir, guint64 min_free, GError **error);
void am_spool_close(AmSpool *spool);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmSpool, am_spool_close)

/* The directory, as given. (transfer none) */
const char *am_spool_get_dir(const AmSpool *spool);

/*
 * am_spool_is_exclusive: whether @spool was opened as the daemon and
 * no other daemon had it open (a lock file, DIR/lock, says so).  Only
 * then were leftovers removed.  The daemon warns when it is not: two
 * daemons on one spool would send copies twice.  Always FALSE for a
 * command.
 */
gboolean am_spool_is_exclusive(const AmSpool *spool);

/*
 * am_spool_put: write @entry and the raw bytes of @msg (its segments
 * as they are, not SMTP-encoded) durably into queue/ or hold/ as
 * @state says.  FULL when the free space is below the floor or the
 * disk filled while writing; FORMAT when a field of @entry holds a
 * control character (CR, LF...) or a rule, relay or address is
 * missing; IO otherwise.  On failure nothing is left behind.  The
 * retry fields of @entry (attempts, next_attempt, last_error), when
 * set, are written to state/ID too, which takes that name only after
 * the copy is in place: a copy held at once keeps its reason, and no
 * crash leaves a state without its copy.  @entry's size and sha256
 * are ignored: they are those of @msg.
 */
gboolean am_spool_put(AmSpool *spool, const AmSpoolEntry *entry,
                      SmtpMessage *msg, AmSpoolState state, GError **error);

/*
 * am_spool_list: every copy in @state, oldest first, as AmSpoolEntry *
 * with its state/ file applied (transfer full).  A file that cannot be
 * parsed is logged and skipped, never deleted.
 */
GPtrArray *am_spool_list(AmSpool *spool, AmSpoolState state, GError **error);

/* am_spool_list_full: am_spool_list(), and in *@damaged (when not NULL)
 * the number of files that could not be parsed.  A copy confirmed or
 * moved while the list is made is not counted: it is gone, not damaged
 * (its file may even be written again for another copy meanwhile). */
GPtrArray *am_spool_list_full(AmSpool *spool, AmSpoolState state,
                              guint *damaged, GError **error);

/*
 * am_spool_list_ids: the file names in queue/ or hold/ as @state says,
 * in no order, without reading them (char *, transfer full): what the
 * runner scans every few seconds, whatever the backlog.
 */
GPtrArray *am_spool_list_ids(AmSpool *spool, AmSpoolState state,
                             GError **error);

/* am_spool_get: the copy @id, wherever it is.  NOT_FOUND if none. */
AmSpoolEntry *am_spool_get(AmSpool *spool, const char *id, GError **error);

/*
 * am_spool_message: the copy's message, as a message that streams from
 * the spool file (kept open by it), after checking its SHA-256 against
 * the envelope (one read of the file): FORMAT when it differs.
 * (transfer full)
 */
SmtpMessage *am_spool_message(AmSpool *spool, const AmSpoolEntry *entry,
                              GError **error);

/* am_spool_update: persist @entry's retry state (attempts,
 * next_attempt, released, created_override, last_error, to) in
 * state/ID. */
gboolean am_spool_update(AmSpool *spool, const AmSpoolEntry *entry,
                         GError **error);

/* am_spool_remove: the copy was confirmed (or withdrawn): delete it,
 * from queue/ or hold/, and its state.  An id already gone is no
 * error: a second process may have removed it. */
gboolean am_spool_remove(AmSpool *spool, const char *id, GError **error);

/* am_spool_remove_full: am_spool_remove(), and when @state is FALSE
 * the caller knows the copy has no state/ file (it never failed and
 * was never updated): one unlink fewer.  A state there after all is
 * only an orphan, removed at the daemon's next start. */
gboolean am_spool_remove_full(AmSpool *spool, const char *id, gboolean state,
                              GError **error);

/* am_spool_remove_sent: am_spool_remove_full() of a copy the caller
 * has just had confirmed and is the only one in this process to read:
 * the daemon that owns the spool may keep its file (small ones, a
 * bounded number) in tmp/ to write it again for a new copy instead of
 * unlinking it.  A reader in another process that had it open sees it
 * gone (NOT_FOUND), never damaged. */
gboolean am_spool_remove_sent(AmSpool *spool, const char *id, gboolean state,
                              GError **error);

/* am_spool_hold: move a queued copy to hold/, recording @reason. */
gboolean am_spool_hold(AmSpool *spool, const char *id, const char *reason,
                       GError **error);

/*
 * am_spool_release: move held copy @id (or every one, when @id is
 * "all") back to queue/ with its retry state reset so that it is tried
 * at once.  @count receives how many moved.  NOT_FOUND for an unknown id.
 */
gboolean am_spool_release(AmSpool *spool, const char *id, guint *count,
                          GError **error);

/*
 * For tests only: call @hook (fd of the subdirectory, its index: 0 tmp,
 * 1 queue, 2 hold, 3 state; @data) instead of fsync() for the fsync of
 * a directory after a rename; it returns as fsync() does (errno set on
 * -1).  NULL restores fsync().  Set it before any thread uses @spool.
 */
typedef int (*AmSpoolFsyncHook)(int fd, int sub, gpointer data);
void am_spool_set_fsync_hook(AmSpool *spool, AmSpoolFsyncHook hook,
                             gpointer data);

G_END_DECLS

#endif /* AM_SPOOL_H */
