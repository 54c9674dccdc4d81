/*
 * spool.c - the durable spool of archive copies
 *
 * Every change of state is one rename() inside the spool directory, so
 * that the daemon and an administrator's `archive-milter --spool-*`
 * process can work on it at the same time without a lock, and a crash
 * leaves each copy in exactly one place.
 *
 * The spool directory and its four subdirectories are opened once, at
 * am_spool_open(), without following a symbolic link, and checked on
 * the open descriptor (a directory, ours, 0700).  Every later file
 * operation is relative to those descriptors (openat, renameat,
 * unlinkat) and never follows a link: whoever swaps a path in the spool
 * for a link afterwards cannot send a read, a write or an unlink
 * outside it.
 *
 * A spool file is a text envelope, a blank line, then the copy's raw
 * octets:
 *
 *   archive-milter-spool 1
 *   id: am1.0123...
 *   queue_id: 3F2A81C0DE        (absent when unknown)
 *   rule: NAME
 *   relay: NAME
 *   from: ADDRESS               (empty for the null sender)
 *   to: ADDRESS                 (one line per archive address)
 *   flags: smtputf8 8bitmime    (either, both or none)
 *   created: UNIX-SECONDS
 *   size: OCTETS                (of the copy after the blank line)
 *   sha256: 64 HEX DIGITS       (of those octets)
 *
 * A file whose copy is not `size` octets long is damaged (a torn file
 * system, a careless copy): it is never read as a copy.  The digest is
 * checked as the copy is opened for delivery (am_spool_message); it
 * costs one read of the file, as much as sending it.
 *
 * A value holding a control character (CR and LF above all, which
 * would start a forged line) is refused, not escaped: none of them
 * comes from a well-formed envelope or configuration.  The retry state
 * lives beside it in state/ID, written to a temporary name and renamed,
 * never fsynced (see spool.h).  Its last_error is sanitized, since it
 * holds the relay's words.
 *
 * A lock file (DIR/lock, flock) tells whether another daemon has the
 * spool open: only the daemon that gets it removes leftovers in tmp/.
 * The --spool-* commands never take it and never delete anything, so
 * that a daemon starting beside them is not told of a second daemon.
 *
 * The copy's digest is computed as it is written, from the buffers
 * that are written, so the file is never read back.  The fsync of the
 * directory after a rename is shared (group commit, see DirSync): puts
 * running at once wait for one fsync that began after their renames.
 *
 * A confirmed copy's file is not unlinked but kept in tmp/ (when small)
 * and written again for a new copy (see recycle()): no inode is freed
 * and allocated per copy.
 *
 * Known limits: XXX: still one fdatasync of each file, and one fsync of
 * queue/ per group of concurrent puts.  XXX: a put of an id already in
 * queue/ replaces that file; ids are unique per copy, so only a
 * caller's bug can do it.  XXX: recycled files hold up to 16 MiB in tmp/,
 * counted as used against spool_min_free.  XXX: the envelope is
 * written before the copy and its digest patched in after (three
 * writes, not one writev), since the digest is known only once the
 * copy is written.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "log.h"
#include "spool.h"

#define SPOOL_MAGIC      "archive-milter-spool"
#define RECYCLED_PREFIX  ".recycled." /* in tmp/, see recycle() */
#define STATE_MAGIC      "archive-milter-state"
#define STATE_VERSION    1
#define SPOOL_HEADER_MAX (64 * 1024) /* octets of envelope we read */
#define STATE_MAX        (64 * 1024) /* octets of a state file we read */
#define SPOOL_ID_MAX     200         /* octets of an id */
#define SPOOL_ERROR_MAX  1000        /* octets of last_error kept */
#define SHA256_HEX_LEN   64
#define READ_CHUNK       (64 * 1024)
/* A temporary state name younger than this may be a --spool-retry's
 * that is being written: the daemon leaves it at start. */
#define STATE_TMP_GRACE_S 60

/*
 * Group commit of a directory's fsync.  Rounds of fsync are numbered
 * and run one at a time.  A put whose rename is done takes as its
 * round the next one to start (started + 1): a round that is running
 * may have begun before the rename, so it may not cover it; the next
 * one begins after it, so it does.  Whoever finds no round running
 * starts one; everyone waits until its round is done.  One fsync thus
 * covers every rename done before it began, however many threads made
 * them.
 */
typedef struct {
	GMutex lock;
	GCond done_cond;
	guint64 started;  /* rounds begun */
	guint64 done;     /* rounds finished; always started or one less */
	gboolean busy;    /* a round runs now */
	guint64 failed;   /* the last round whose fsync failed; 0: none */
	int failed_errno; /* its errno */
} DirSync;

struct AmSpool {
	char *dir;        /* as given */
	char *sub[4];     /* tmp, queue, hold, state: full paths, for
			   * messages only */
	int dir_fd;       /* the spool directory */
	int sub_fd[4];    /* its subdirectories; every file operation is
			   * relative to one of them */
	guint64 min_free; /* octets */
	int lock_fd;      /* DIR/lock, flocked when we own the spool */
	gboolean owner;   /* we hold the lock: no other daemon has it */
	DirSync sync[4];  /* group commit, per subdirectory */
	AmSpoolFsyncHook fsync_hook; /* tests: instead of fsync(); NULL */
	gpointer fsync_hook_data;
	GMutex recycle_lock;
	GPtrArray *recycled; /* names in tmp/ of files to write again */
	guint recycle_seq;   /* for their names */
};

enum { SUB_TMP, SUB_QUEUE, SUB_HOLD, SUB_STATE };
static const char *const sub_names[] = {"tmp", "queue", "hold", "state"};

G_DEFINE_QUARK(am - spool - error - quark, am_spool_error)

void
am_spool_entry_free(AmSpoolEntry *entry)
{
	if (entry == NULL)
		return;
	g_free(entry->id);
	g_free(entry->queue_id);
	g_free(entry->rule);
	g_free(entry->relay);
	g_free(entry->from);
	g_strfreev(entry->to);
	g_free(entry->last_error);
	g_free(entry->sha256);
	g_free(entry);
}

AmSpoolEntry *
am_spool_entry_copy(const AmSpoolEntry *entry)
{
	AmSpoolEntry *e = g_new(AmSpoolEntry, 1);

	*e = *entry;
	e->id = g_strdup(entry->id);
	e->queue_id = g_strdup(entry->queue_id);
	e->rule = g_strdup(entry->rule);
	e->relay = g_strdup(entry->relay);
	e->from = g_strdup(entry->from);
	e->to = g_strdupv(entry->to);
	e->last_error = g_strdup(entry->last_error);
	e->sha256 = g_strdup(entry->sha256);
	return e;
}

/* ------------------------------------------------------------------ */
/* Errors and small helpers                                             */
/* ------------------------------------------------------------------ */

/* A disk that filled is FULL, whatever call noticed it. */
static void
set_errno_error(GError **error, int err, const char *what, const char *path)
{
	AmSpoolError code = AM_SPOOL_ERROR_IO;

	if (err == ENOSPC || err == EDQUOT)
		code = AM_SPOOL_ERROR_FULL;
	g_set_error(error, AM_SPOOL_ERROR, code, "%s %s: %s", what, path,
	            g_strerror(err));
}

/* An id becomes a file name: nothing that could leave the directory
 * or hide in it, and nothing that could break an envelope line. */
gboolean
am_spool_id_is_valid(const char *id)
{
	const char *p;

	if (id == NULL || id[0] == '\0' || id[0] == '.' ||
	    strlen(id) > SPOOL_ID_MAX)
		return FALSE;
	for (p = id; *p != '\0'; p++)
		if (*p == '/' || g_ascii_iscntrl(*p) || *p == ' ')
			return FALSE;
	return TRUE;
}

static gboolean
check_id(const char *id, GError **error)
{
	g_autofree char *clean = NULL;

	if (am_spool_id_is_valid(id))
		return TRUE;
	clean = am_log_sanitize(id, SPOOL_ID_MAX);
	g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND,
	            "not a spool id: \"%s\"", clean);
	return FALSE;
}

static gboolean
has_control(const char *s)
{
	for (; *s != '\0'; s++)
		if (g_ascii_iscntrl(*s))
			return TRUE;
	return FALSE;
}

/* The full path of @name in @sub, for messages. */
static char *
path_of(const AmSpool *spool, int sub, const char *name)
{
	return g_build_filename(spool->sub[sub], name, NULL);
}

static int
sub_of_state(AmSpoolState state)
{
	return state == AM_SPOOL_HELD ? SUB_HOLD : SUB_QUEUE;
}

static gint64
now_s(void)
{
	return g_get_real_time() / G_USEC_PER_SEC;
}

void
am_spool_set_fsync_hook(AmSpool *spool, AmSpoolFsyncHook hook, gpointer data)
{
	spool->fsync_hook = hook;
	spool->fsync_hook_data = data;
}

/*
 * Make every rename done into @sub before this call durable: wait for
 * (or run) the first fsync of @sub that begins after now; see DirSync.
 * A round that fails fails every caller that waited for it, and, to be
 * safe, every one whose round came before the last failure (a later
 * fsync's success says nothing sure about what an earlier one lost).
 */
static gboolean
fsync_sub(AmSpool *spool, int sub, GError **error)
{
	DirSync *ds = &spool->sync[sub];
	gboolean failed;
	guint64 mine;
	int err;

	g_mutex_lock(&ds->lock);
	mine = ds->started + 1;
	while (ds->done < mine) {
		guint64 round;
		int rc;

		if (ds->busy) {
			g_cond_wait(&ds->done_cond, &ds->lock);
			continue;
		}
		/* No round runs, so started == done < mine: this one is
		 * round mine, begun after our rename. */
		round = ++ds->started;
		ds->busy = TRUE;
		g_mutex_unlock(&ds->lock);
		if (spool->fsync_hook != NULL)
			rc = spool->fsync_hook(spool->sub_fd[sub], sub,
			                       spool->fsync_hook_data);
		else
			rc = fsync(spool->sub_fd[sub]);
		err = errno;
		g_mutex_lock(&ds->lock);
		if (rc != 0) {
			ds->failed = round;
			ds->failed_errno = err;
		}
		ds->done = round;
		ds->busy = FALSE;
		g_cond_broadcast(&ds->done_cond);
	}
	failed = ds->failed >= mine;
	err = ds->failed_errno;
	g_mutex_unlock(&ds->lock);
	if (!failed)
		return TRUE;
	set_errno_error(error, err, "cannot fsync", spool->sub[sub]);
	return FALSE;
}

/* Whether @name is an entry of @sub (of any kind; links not followed). */
static gboolean
exists_in(const AmSpool *spool, int sub, const char *name)
{
	struct stat st;

	return fstatat(spool->sub_fd[sub], name, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

static gboolean
write_all(int fd, const void *data, gsize len, const char *path, GError **error)
{
	const char *p = data;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			/* A write of 0 octets to a file means no room. */
			set_errno_error(error, n < 0 ? errno : ENOSPC,
			                "cannot write", path);
			return FALSE;
		}
		p += n;
		len -= n;
	}
	return TRUE;
}

/* One pread() of @fd at @offset, again after EINTR: the octets read (0
 * at the end of the file), or -1 with @error set naming @path. */
static ssize_t
read_at(int fd, void *buf, gsize len, goffset offset, const char *path,
        GError **error)
{
	ssize_t n;

	do
		n = pread(fd, buf, len, offset);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		set_errno_error(error, errno, "cannot read", path);
	return n;
}

/*
 * The SHA-256 of @len octets of @fd from @offset, as lowercase hex,
 * read in chunks.  *@got: how many octets there were (fewer than @len
 * when the file is shorter).  NULL with @error on a read error.
 */
static char *
digest_of(int fd, goffset offset, guint64 len, guint64 *got, const char *path,
          GError **error)
{
	g_autoptr(GChecksum) sum = g_checksum_new(G_CHECKSUM_SHA256);
	g_autofree guint8 *buf = g_malloc(READ_CHUNK);
	guint64 done = 0;

	while (done < len) {
		gsize want = MIN((guint64)READ_CHUNK, len - done);
		ssize_t n = read_at(fd, buf, want, offset + done, path, error);

		if (n < 0)
			return NULL;
		if (n == 0)
			break;
		g_checksum_update(sum, buf, n);
		done += n;
	}
	*got = done;
	return g_strdup(g_checksum_get_string(sum));
}

/* ------------------------------------------------------------------ */
/* Opening                                                              */
/* ------------------------------------------------------------------ */

/*
 * Open @name in @parent_fd (a path relative to the working directory
 * when AT_FDCWD) as a directory of ours, closed to group and others,
 * without following a symbolic link; create it (0700) first when
 * @create and it is missing.  The checks are made on the open
 * descriptor, so that what was checked is what is used.  @path: for
 * messages.  -1 with @error otherwise.
 */
static int
open_private_dir(int parent_fd, const char *name, const char *path,
                 gboolean create, GError **error)
{
	struct stat st;
	int fd;

	if (create && mkdirat(parent_fd, name, 0700) != 0 && errno != EEXIST) {
		set_errno_error(error, errno, "cannot create spool directory",
		                path);
		return -1;
	}
	fd = openat(parent_fd, name,
	            O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		int err = errno;

		if (fstatat(parent_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
		    S_ISLNK(st.st_mode))
			g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
			            "spool directory %s: is a symbolic link; "
			            "it must be a real directory",
			            path);
		else if (err == ENOTDIR)
			g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
			            "spool directory %s: not a directory",
			            path);
		else
			set_errno_error(error, err,
			                "cannot open spool directory", path);
		return -1;
	}
	if (fstat(fd, &st) != 0) {
		set_errno_error(error, errno, "cannot stat spool directory",
		                path);
		close(fd);
		return -1;
	}
	/* Whoever owns a directory can rename its entries and put their
	 * own in their place: it must be the user we run as. */
	if (st.st_uid != geteuid()) {
		g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
		            "spool directory %s: owned by uid %lu, not by "
		            "the user this process runs as (uid %lu)",
		            path, (unsigned long)st.st_uid,
		            (unsigned long)geteuid());
		close(fd);
		return -1;
	}
	if ((st.st_mode & 0077) != 0) {
		g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
		            "spool directory %s: mode %04o is open to group "
		            "or others; it must be 0700",
		            path, (unsigned)(st.st_mode & 07777));
		close(fd);
		return -1;
	}
	return fd;
}

/* A fresh stream on @sub (its own offset: the held descriptor is
 * shared by every thread).  NULL with @error. */
static DIR *
open_sub_stream(const AmSpool *spool, int sub, GError **error)
{
	int fd =
	    openat(spool->sub_fd[sub], ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d;

	if (fd < 0) {
		set_errno_error(error, errno, "cannot read", spool->sub[sub]);
		return NULL;
	}
	if ((d = fdopendir(fd)) == NULL) {
		set_errno_error(error, errno, "cannot read", spool->sub[sub]);
		close(fd);
	}
	return d;
}

static gboolean
is_dot_entry(const char *name)
{
	return strcmp(name, ".") == 0 || strcmp(name, "..") == 0;
}

/*
 * At the daemon's start, with the lock held: remove what a crash left
 * in tmp/ (never complete copies: those are renamed out), the
 * temporary names of state/, and the state of copies that are gone (a
 * crash between the removal of a copy and of its state).  unlinkat()
 * removes a name, never what a link points to.
 */
static void
remove_leftovers(AmSpool *spool)
{
	int subs[] = {SUB_TMP, SUB_STATE};
	gint64 now = now_s();

	for (guint i = 0; i < G_N_ELEMENTS(subs); i++) {
		int sub = subs[i];
		DIR *d = open_sub_stream(spool, sub, NULL);
		struct dirent *de;

		while (d != NULL && (de = readdir(d)) != NULL) {
			const char *name = de->d_name;
			g_autofree char *p = NULL;
			struct stat st;

			if (is_dot_entry(name))
				continue;
			if (sub == SUB_STATE && name[0] == '.') {
				/* A --spool-retry may be writing it. */
				if (fstatat(spool->sub_fd[sub], name, &st,
				            AT_SYMLINK_NOFOLLOW) != 0 ||
				    st.st_mtime > now - STATE_TMP_GRACE_S)
					continue;
			} else if (sub == SUB_STATE) {
				/* Looked for twice in queue/: a copy
				 * being released from hold/ meanwhile
				 * is seen in one of the three looks. */
				if (exists_in(spool, SUB_QUEUE, name) ||
				    exists_in(spool, SUB_HOLD, name) ||
				    exists_in(spool, SUB_QUEUE, name))
					continue;
			}
			p = path_of(spool, sub, name);
			/* A recycled file (see recycle()) is no news. */
			if (unlinkat(spool->sub_fd[sub], name, 0) == 0 &&
			    !g_str_has_prefix(name, RECYCLED_PREFIX))
				am_log_info("spool: removed leftover %s", p);
		}
		if (d != NULL)
			closedir(d);
	}
}

AmSpool *
am_spool_open_full(const char *dir, guint64 min_free, AmSpoolOpenFlags flags,
                   GError **error)
{
	g_autoptr(AmSpool) spool = g_new0(AmSpool, 1);
	g_autofree char *name = NULL;
	gsize len;

	g_return_val_if_fail(dir != NULL, NULL);
	/* "spool/" would follow a link named spool despite O_NOFOLLOW. */
	name = g_strdup(dir);
	len = strlen(name);
	while (len > 1 && name[len - 1] == '/')
		name[--len] = '\0';
	spool->dir = g_strdup(dir);
	spool->min_free = min_free;
	g_mutex_init(&spool->recycle_lock);
	spool->recycled = g_ptr_array_new_with_free_func(g_free);
	spool->lock_fd = -1;
	spool->dir_fd = -1;
	for (guint i = 0; i < G_N_ELEMENTS(spool->sub_fd); i++) {
		spool->sub_fd[i] = -1;
		g_mutex_init(&spool->sync[i].lock);
		g_cond_init(&spool->sync[i].done_cond);
	}
	spool->dir_fd = open_private_dir(AT_FDCWD, name, dir, TRUE, error);
	if (spool->dir_fd < 0)
		return NULL;
	for (guint i = 0; i < G_N_ELEMENTS(sub_names); i++) {
		spool->sub[i] = g_build_filename(dir, sub_names[i], NULL);
		spool->sub_fd[i] = open_private_dir(spool->dir_fd, sub_names[i],
		                                    spool->sub[i], TRUE, error);
		if (spool->sub_fd[i] < 0)
			return NULL;
	}

	/* A command only reads and renames; it leaves the lock to a
	 * daemon, which would otherwise believe another daemon runs. */
	if ((flags & AM_SPOOL_OPEN_COMMAND) != 0)
		return g_steal_pointer(&spool);

	/* The first daemon to open the spool owns tmp/.  Read-only:
	 * flock() needs no more, and a descriptor open for writing would
	 * keep the file system from being remounted read-only (an
	 * administrator's way to stop a filling disk). */
	spool->lock_fd = openat(
	    spool->dir_fd, "lock",
	    O_RDONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
	if (spool->lock_fd < 0) {
		/* Without the lock we only leave tmp/ alone. */
		g_autofree char *lock = g_build_filename(dir, "lock", NULL);

		am_log_warning("spool: cannot open %s: %s", lock,
		               g_strerror(errno));
	}
	spool->owner = spool->lock_fd >= 0 &&
	               flock(spool->lock_fd, LOCK_EX | LOCK_NB) == 0;
	if (spool->owner)
		remove_leftovers(spool);
	return g_steal_pointer(&spool);
}

AmSpool *
am_spool_open(const char *dir, guint64 min_free, GError **error)
{
	return am_spool_open_full(dir, min_free, AM_SPOOL_OPEN_DAEMON, error);
}

void
am_spool_close(AmSpool *spool)
{
	if (spool == NULL)
		return;
	if (spool->lock_fd >= 0)
		close(spool->lock_fd);
	for (guint i = 0; i < G_N_ELEMENTS(spool->sub); i++) {
		if (spool->sub_fd[i] >= 0)
			close(spool->sub_fd[i]);
		g_free(spool->sub[i]);
		g_mutex_clear(&spool->sync[i].lock);
		g_cond_clear(&spool->sync[i].done_cond);
	}
	if (spool->dir_fd >= 0)
		close(spool->dir_fd);
	g_mutex_clear(&spool->recycle_lock);
	g_ptr_array_unref(spool->recycled);
	g_free(spool->dir);
	g_free(spool);
}

const char *
am_spool_get_dir(const AmSpool *spool)
{
	return spool->dir;
}

gboolean
am_spool_is_exclusive(const AmSpool *spool)
{
	return spool->owner;
}

/* ------------------------------------------------------------------ */
/* Writing a copy                                                       */
/* ------------------------------------------------------------------ */

static gboolean
add_field(GString *out, const char *key, const char *value, GError **error)
{
	if (has_control(value)) {
		g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT,
		            "%s holds a control character; not spooled", key);
		return FALSE;
	}
	g_string_append_printf(out, "%s: %s\n", key, value);
	return TRUE;
}

/*
 * The envelope, up to and including the blank line, for a copy of
 * @size octets.  Its digest is not known yet: *@digest_at receives
 * where the 64 placeholder digits are, to be overwritten once the copy
 * is written.
 */
static GString *
format_envelope(const AmSpoolEntry *e, guint64 size, gsize *digest_at,
                GError **error)
{
	g_autoptr(GString) out = g_string_new(NULL);
	gboolean ok = TRUE;

	if (e->to == NULL || e->to[0] == NULL || e->rule == NULL ||
	    e->relay == NULL) {
		g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT,
		            "%s: a copy needs a rule, a relay and an address",
		            e->id);
		return NULL;
	}
	g_string_append_printf(out, "%s %d\n", SPOOL_MAGIC, AM_SPOOL_VERSION);
	ok = add_field(out, "id", e->id, error);
	if (ok && e->queue_id != NULL)
		ok = add_field(out, "queue_id", e->queue_id, error);
	ok = ok && add_field(out, "rule", e->rule, error);
	ok = ok && add_field(out, "relay", e->relay, error);
	ok = ok && add_field(out, "from", e->from ? e->from : "", error);
	for (guint i = 0; ok && e->to[i] != NULL; i++)
		ok = add_field(out, "to", e->to[i], error);
	if (!ok)
		return NULL;
	g_string_append_printf(out,
	                       "flags:%s%s\ncreated: %" G_GINT64_FORMAT
	                       "\nsize: %" G_GUINT64_FORMAT "\nsha256: ",
	                       e->smtputf8 ? " smtputf8" : "",
	                       e->eightbit ? " 8bitmime" : "", e->created,
	                       size);
	*digest_at = out->len;
	for (guint i = 0; i < SHA256_HEX_LEN; i++)
		g_string_append_c(out, '0');
	g_string_append(out, "\n\n");
	return g_steal_pointer(&out);
}

/* Refuse early when the copy would take the free space below the
 * floor, so that the MTA gets a tempfail while the disk still has room
 * for everything else. */
static gboolean
check_free_space(const AmSpool *spool, guint64 size, GError **error)
{
	struct statvfs sv;
	guint64 avail;

	if (spool->min_free == 0)
		return TRUE;
	if (fstatvfs(spool->sub_fd[SUB_TMP], &sv) != 0) {
		set_errno_error(error, errno, "cannot statvfs",
		                spool->sub[SUB_TMP]);
		return FALSE;
	}
	avail = (guint64)sv.f_bavail * sv.f_frsize;
	if (avail >= size && avail - size >= spool->min_free)
		return TRUE;
	g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FULL,
	            "spool %s: %" G_GUINT64_FORMAT " octets free, a copy "
	            "of %" G_GUINT64_FORMAT " would leave less than "
	            "spool_min_free (%" G_GUINT64_FORMAT ")",
	            spool->dir, avail, size, spool->min_free);
	return FALSE;
}

/* The raw octets of @msg, hashed into @sum as they are written, a
 * full disk told apart from other errors. */
static gboolean
write_raw(SmtpMessage *msg, int fd, GChecksum *sum, const char *path,
          GError **error)
{
	g_autoptr(GError) local = NULL;
	int err;

	if (smtp_message_write_raw_sum(msg, fd, sum, &local))
		return TRUE;
	err = smtp_error_get_errno(local);
	if (g_error_matches(local, SMTP_ERROR, SMTP_ERROR_IO) && err != 0) {
		set_errno_error(error, err, "cannot write", path);
		return FALSE;
	}
	g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
	            "cannot write the copy to %s: %s", path, local->message);
	return FALSE;
}

/* The copy just written after the envelope, whose digest @sum holds
 * (made from the very buffers that were written): the digest put in
 * its place in the envelope.  Its length needs no fstat(): the library
 * returns TRUE only when it wrote every octet of the message, whose
 * size the envelope already says (file segments of fixed length). */
static gboolean
seal(int fd, gsize digest_at, GChecksum *sum, const char *path, GError **error)
{
	const char *digest = g_checksum_get_string(sum);
	ssize_t n;

	do
		n = pwrite(fd, digest, SHA256_HEX_LEN, digest_at);
	while (n < 0 && errno == EINTR);
	if (n != SHA256_HEX_LEN) {
		set_errno_error(error, n < 0 ? errno : ENOSPC, "cannot write",
		                path);
		return FALSE;
	}
	return TRUE;
}

/*
 * A file of tmp/ to write a copy into, its name in *@name: a recycled
 * one (a confirmed copy's file, see recycle()), else a new one named
 * @id.  Recycling spares the file system an inode allocation and a free
 * per copy; ext4 without a journal skips every inode freed in the last
 * seconds when it allocates one, which grows with the rate of copies
 * and was the largest cost of a put.  A recycled file is not emptied
 * here but written over, then cut to its new length (write_file):
 * emptying it would free its blocks only for the copy to allocate them
 * again, and on a file system mounted with discard (as here) each free
 * waits for the device, which made this open take 0.7 ms a put.  -1
 * with @error.
 */
static int
open_tmp(AmSpool *spool, const char *id, char **name, GError **error)
{
	g_autofree char *path = NULL;
	int fd;

	for (;;) {
		char *old = NULL;

		g_mutex_lock(&spool->recycle_lock);
		if (spool->recycled->len > 0)
			old = g_ptr_array_steal_index_fast(
			    spool->recycled, spool->recycled->len - 1);
		g_mutex_unlock(&spool->recycle_lock);
		if (old == NULL)
			break;
		/* Non-blocking: only our files are in tmp/, but a FIFO
		 * put there must not hang a put. */
		fd = openat(spool->sub_fd[SUB_TMP], old,
		            O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
		if (fd >= 0) {
			*name = old;
			return fd;
		}
		/* Gone or unusable: forget it, take another. */
		unlinkat(spool->sub_fd[SUB_TMP], old, 0);
		g_free(old);
	}
	fd = openat(spool->sub_fd[SUB_TMP], id,
	            O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd >= 0) {
		*name = g_strdup(id);
		return fd;
	}
	path = path_of(spool, SUB_TMP, id);
	set_errno_error(error, errno, "cannot create", path);
	return -1;
}

/*
 * The file of confirmed copy @id in queue/ becomes a recycled file of
 * tmp/ (renamed, not unlinked) for open_tmp(), while there are fewer
 * than RECYCLE_MAX and it is at most RECYCLE_SIZE_MAX octets (so that
 * they hold at most 16 MiB of disk): FALSE when it was not (no room,
 * too big, not ours to recycle: only the daemon that owns tmp/ does;
 * errno 0), or on an error with errno set (ENOENT: no such copy in
 * queue/).
 */
#define RECYCLE_MAX      256
#define RECYCLE_SIZE_MAX (64 * 1024)

static gboolean
recycle(AmSpool *spool, const char *id)
{
	struct stat st;
	char *name;

	if (!spool->owner) {
		errno = 0;
		return FALSE;
	}
	if (fstatat(spool->sub_fd[SUB_QUEUE], id, &st, AT_SYMLINK_NOFOLLOW) !=
	    0)
		return FALSE;
	/* A second link (an administrator's copy) would be overwritten. */
	if (!S_ISREG(st.st_mode) || st.st_nlink != 1 ||
	    st.st_size > RECYCLE_SIZE_MAX) {
		errno = 0;
		return FALSE;
	}
	g_mutex_lock(&spool->recycle_lock);
	if (spool->recycled->len >= RECYCLE_MAX) {
		g_mutex_unlock(&spool->recycle_lock);
		errno = 0;
		return FALSE;
	}
	name = g_strdup_printf(RECYCLED_PREFIX "%u", spool->recycle_seq++);
	g_mutex_unlock(&spool->recycle_lock);
	if (renameat(spool->sub_fd[SUB_QUEUE], id, spool->sub_fd[SUB_TMP],
	             name) != 0) {
		g_free(name);
		return FALSE;
	}
	g_mutex_lock(&spool->recycle_lock);
	g_ptr_array_add(spool->recycled, name);
	g_mutex_unlock(&spool->recycle_lock);
	return TRUE;
}

/* A recycled file is written over, not emptied first (see open_tmp()):
 * what is left of its old copy beyond @len is cut off. */
static gboolean
cut(int fd, guint64 len, const char *path, GError **error)
{
	struct stat st;

	if (fstat(fd, &st) != 0) {
		set_errno_error(error, errno, "cannot stat", path);
		return FALSE;
	}
	if ((guint64)st.st_size <= len)
		return TRUE;
	if (ftruncate(fd, (off_t)len) != 0) {
		set_errno_error(error, errno, "cannot truncate", path);
		return FALSE;
	}
	return TRUE;
}

/* Write @head and @msg to tmp/ (a name of open_tmp()'s, in *@name),
 * seal, sync and close it.  fdatasync(), not fsync(): it writes what
 * reading the data back needs (its blocks and size), not the times; a
 * recycled file written over at its old size then costs the data
 * blocks alone. */
static gboolean
write_file(AmSpool *spool, const char *id, char **name, const GString *head,
           gsize digest_at, SmtpMessage *msg, GError **error)
{
	g_autofree char *path = NULL;
	g_autoptr(GChecksum) sum = g_checksum_new(G_CHECKSUM_SHA256);
	int fd = open_tmp(spool, id, name, error);
	gboolean ok;

	if (fd < 0)
		return FALSE;
	path = path_of(spool, SUB_TMP, *name);
	ok = write_all(fd, head->str, head->len, path, error) &&
	     write_raw(msg, fd, sum, path, error) &&
	     seal(fd, digest_at, sum, path, error) &&
	     cut(fd, head->len + smtp_message_get_size(msg), path, error);
	if (ok && fdatasync(fd) != 0) {
		set_errno_error(error, errno, "cannot fdatasync", path);
		ok = FALSE;
	}
	/* NFS and some quotas report a full disk only at close. */
	if (close(fd) != 0 && ok) {
		set_errno_error(error, errno, "cannot close", path);
		ok = FALSE;
	}
	return ok;
}

static char *write_state_tmp(AmSpool *spool, const AmSpoolEntry *entry,
                             GError **error);
static gboolean rename_state(AmSpool *spool, const char *tmp, const char *id,
                             GError **error);

gboolean
am_spool_put(AmSpool *spool, const AmSpoolEntry *entry, SmtpMessage *msg,
             AmSpoolState state, GError **error)
{
	g_autoptr(GString) head = NULL;
	g_autofree char *state_tmp = NULL;
	g_autofree char *dest = NULL;
	g_autofree char *tmp = NULL;
	g_autoptr(GError) local = NULL;
	int sub = sub_of_state(state);
	guint64 size;
	gsize digest_at = 0;

	g_return_val_if_fail(spool != NULL && entry != NULL && msg != NULL,
	                     FALSE);
	if (!check_id(entry->id, error))
		return FALSE;
	size = smtp_message_get_size(msg);
	if ((head = format_envelope(entry, size, &digest_at, error)) == NULL)
		return FALSE;
	if (!check_free_space(spool, head->len + size, error))
		return FALSE;

	/* Step 1: the retry state, when the caller has any (a copy held
	 * at once carries its reason), under a temporary name: it takes
	 * its own name only once the copy is in place, so that a crash
	 * never leaves the state of a copy that does not exist. */
	if ((entry->attempts > 0 || entry->last_error != NULL ||
	     entry->next_attempt != 0) &&
	    (state_tmp = write_state_tmp(spool, entry, error)) == NULL)
		return FALSE;

	/* Step 2: the file, complete and on disk, under a name nobody
	 * reads. */
	dest = path_of(spool, sub, entry->id);
	if (!write_file(spool, entry->id, &tmp, head, digest_at, msg, error)) {
		if (tmp != NULL)
			unlinkat(spool->sub_fd[SUB_TMP], tmp, 0);
		goto fail;
	}

	/* Step 3: into place, and the directory entry on disk too; only
	 * then may the caller answer the MTA for this copy. */
	if (renameat(spool->sub_fd[SUB_TMP], tmp, spool->sub_fd[sub],
	             entry->id) != 0) {
		set_errno_error(error, errno, "cannot rename into", dest);
		unlinkat(spool->sub_fd[SUB_TMP], tmp, 0);
		goto fail;
	}
	if (!fsync_sub(spool, sub, error)) {
		/* The caller will tempfail the original: a copy left
		 * here would be a second one after the client retries. */
		unlinkat(spool->sub_fd[sub], entry->id, 0);
		goto fail;
	}

	/* Step 4: the state beside it.  The copy is safe already: a
	 * state that cannot take its name only costs the backoff. */
	if (state_tmp != NULL &&
	    !rename_state(spool, state_tmp, entry->id, &local))
		am_log_warning("spool: %s: retry state lost: %s", entry->id,
		               local->message);
	return TRUE;

fail:
	if (state_tmp != NULL)
		unlinkat(spool->sub_fd[SUB_STATE], state_tmp, 0);
	return FALSE;
}

/* ------------------------------------------------------------------ */
/* Reading the envelope                                                 */
/* ------------------------------------------------------------------ */

static gboolean
format_error(GError **error, const char *path, const char *why)
{
	g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT,
	            "spool file %s: %s", path, why);
	return FALSE;
}

/*
 * Decimal digits only, up to G_MAXINT64, parsed by hand.  Not
 * g_ascii_strtoll() with an errno check: GLib 2.74 fetches its C locale
 * on the first call through g_once, and threads that meet there come
 * back with errno = EAGAIN from the futex although the number is good,
 * so the daemon's first concurrent reads parked sound copies as damaged
 * ("bad created time").  g_ascii_string_to_signed() checks errno too.
 */
static gboolean
parse_int64(const char *s, gint64 *out)
{
	gint64 v = 0;

	if (*s == '\0')
		return FALSE;
	for (; *s != '\0'; s++) {
		int d;

		if (!g_ascii_isdigit(*s))
			return FALSE;
		d = *s - '0';
		if (v > (G_MAXINT64 - d) / 10)
			return FALSE;
		v = v * 10 + d;
	}
	*out = v;
	return TRUE;
}

static gboolean
parse_flags(const char *value, AmSpoolEntry *e)
{
	g_auto(GStrv) words = g_strsplit(value, " ", -1);

	for (guint i = 0; words[i] != NULL; i++) {
		if (strcmp(words[i], "smtputf8") == 0)
			e->smtputf8 = TRUE;
		else if (strcmp(words[i], "8bitmime") == 0)
			e->eightbit = TRUE;
		else if (words[i][0] != '\0')
			return FALSE;
	}
	return TRUE;
}

static gboolean
is_sha256_hex(const char *s)
{
	if (strlen(s) != SHA256_HEX_LEN)
		return FALSE;
	for (; *s != '\0'; s++)
		if (!g_ascii_isdigit(*s) && !(*s >= 'a' && *s <= 'f'))
			return FALSE;
	return TRUE;
}

/* What parse_field() saw besides the entry's own fields. */
typedef struct {
	gboolean created;
	gboolean size;
} Seen;

/* One "key: value" line of the envelope into @e. */
static gboolean
parse_field(char *line, AmSpoolEntry *e, GPtrArray *to, Seen *seen,
            const char *path, GError **error)
{
	char *colon = strchr(line, ':');
	char *key = line, *value;
	char **slot = NULL;

	if (colon == NULL)
		return format_error(error, path, "a line without ':'");
	*colon = '\0';
	value = colon[1] == ' ' ? colon + 2 : colon + 1;
	if (strcmp(key, "to") == 0) {
		g_ptr_array_add(to, g_strdup(value));
		return TRUE;
	}
	if (strcmp(key, "flags") == 0)
		return parse_flags(value, e) ||
		       format_error(error, path, "unknown flag");
	if (strcmp(key, "created") == 0) {
		seen->created = TRUE;
		return parse_int64(value, &e->created) ||
		       format_error(error, path, "bad created time");
	}
	if (strcmp(key, "size") == 0) {
		gint64 v;

		seen->size = TRUE;
		if (!parse_int64(value, &v))
			return format_error(error, path, "bad size");
		e->size = v;
		return TRUE;
	}
	if (strcmp(key, "sha256") == 0 && !is_sha256_hex(value))
		return format_error(error, path, "bad sha256");
	if (strcmp(key, "id") == 0)
		slot = &e->id;
	else if (strcmp(key, "queue_id") == 0)
		slot = &e->queue_id;
	else if (strcmp(key, "rule") == 0)
		slot = &e->rule;
	else if (strcmp(key, "relay") == 0)
		slot = &e->relay;
	else if (strcmp(key, "from") == 0)
		slot = &e->from;
	else if (strcmp(key, "sha256") == 0)
		slot = &e->sha256;
	if (slot == NULL) {
		g_autofree char *clean = am_log_sanitize(key, 40);
		g_autofree char *why =
		    g_strdup_printf("unknown key \"%s\"", clean);

		return format_error(error, path, why);
	}
	if (*slot != NULL)
		return format_error(error, path, "a key given twice");
	*slot = g_strdup(value);
	return TRUE;
}

/* The version line; a file from an older or newer release is left
 * alone for that release (or an administrator) to deal with.  Its
 * text is sanitized: a damaged file must not write on a terminal. */
static gboolean
parse_magic(const char *line, const char *magic, int version, const char *path,
            GError **error)
{
	gsize n = strlen(magic);
	g_autofree char *want = g_strdup_printf("%d", version);
	g_autofree char *clean = NULL;
	g_autofree char *why = NULL;

	if (strncmp(line, magic, n) != 0 || line[n] != ' ')
		return format_error(error, path, "not a spool file");
	if (strcmp(line + n + 1, want) == 0)
		return TRUE;
	clean = am_log_sanitize(line + n + 1, 20);
	why =
	    g_strdup_printf("format version \"%s\" is not %d", clean, version);
	return format_error(error, path, why);
}

/* Read up to the blank line; @body_offset: where the copy starts. */
static char *
read_envelope(int fd, const char *path, goffset *body_offset, GError **error)
{
	g_autofree char *buf = g_malloc(SPOOL_HEADER_MAX + 1);
	gsize have = 0;
	char *end;

	while (have < SPOOL_HEADER_MAX) {
		ssize_t n = read_at(fd, buf + have, SPOOL_HEADER_MAX - have,
		                    have, path, error);

		if (n < 0)
			return NULL;
		if (n == 0)
			break;
		have += n;
		buf[have] = '\0';
		if (memmem(buf, have, "\n\n", 2) != NULL)
			break;
	}
	buf[have] = '\0';
	end = memmem(buf, have, "\n\n", 2);
	if (end == NULL) {
		format_error(error, path, "no end of envelope");
		return NULL;
	}
	*end = '\0';
	if (strlen(buf) != (gsize)(end - buf)) {
		format_error(error, path, "a NUL in the envelope");
		return NULL;
	}
	*body_offset = end - buf + 2;
	return g_steal_pointer(&buf);
}

static gboolean
check_envelope(const AmSpoolEntry *e, const Seen *seen, GPtrArray *to,
               const char *name, const char *path, GError **error)
{
	if (e->id == NULL || e->rule == NULL || e->relay == NULL ||
	    e->from == NULL || !seen->created || !seen->size ||
	    e->sha256 == NULL || to->len == 0)
		return format_error(error, path, "a required key is missing");
	if (strcmp(e->id, name) != 0)
		return format_error(error, path, "id is not the file name");
	return TRUE;
}

/* Parse the envelope of the open spool file @fd named @name; its copy
 * must have the length the envelope gives. */
static AmSpoolEntry *
parse_envelope(int fd, const char *name, const char *path, goffset *body_offset,
               GError **error)
{
	g_autoptr(AmSpoolEntry) e = g_new0(AmSpoolEntry, 1);
	g_autoptr(GPtrArray) to = g_ptr_array_new_with_free_func(g_free);
	g_autofree char *buf = NULL;
	g_auto(GStrv) lines = NULL;
	Seen seen = {FALSE, FALSE};
	struct stat st;
	guint64 have;

	if (fstat(fd, &st) != 0) {
		set_errno_error(error, errno, "cannot stat", path);
		return NULL;
	}
	if (!S_ISREG(st.st_mode)) {
		format_error(error, path, "not a regular file");
		return NULL;
	}
	if ((buf = read_envelope(fd, path, body_offset, error)) == NULL)
		return NULL;
	lines = g_strsplit(buf, "\n", -1);
	if (!parse_magic(lines[0], SPOOL_MAGIC, AM_SPOOL_VERSION, path, error))
		return NULL;
	for (guint i = 1; lines[i] != NULL; i++)
		if (!parse_field(lines[i], e, to, &seen, path, error))
			return NULL;
	if (!check_envelope(e, &seen, to, name, path, error))
		return NULL;
	have = st.st_size > *body_offset ? st.st_size - *body_offset : 0;
	if (have != e->size) {
		g_autofree char *why = g_strdup_printf(
		    "damaged: the copy is %" G_GUINT64_FORMAT " octets, "
		    "its envelope says %" G_GUINT64_FORMAT,
		    have, e->size);

		format_error(error, path, why);
		return NULL;
	}
	g_ptr_array_add(to, NULL);
	e->to = (char **)g_ptr_array_free(g_steal_pointer(&to), FALSE);
	return g_steal_pointer(&e);
}

/* ------------------------------------------------------------------ */
/* The retry state                                                      */
/* ------------------------------------------------------------------ */

/*
 * Create a file of a new name ".@id.RANDOM" in state/ and return that
 * name, with its descriptor in *@fd_out.  Made here rather than with
 * mkstemp() so that it is relative to the held descriptor.
 */
static char *
create_state_tmp(AmSpool *spool, const char *id, int *fd_out, GError **error)
{
	for (guint i = 0; i < 100; i++) {
		char *name = g_strdup_printf(".%s.%08x", id, g_random_int());
		int fd = openat(
		    spool->sub_fd[SUB_STATE], name,
		    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);

		if (fd >= 0) {
			*fd_out = fd;
			return name;
		}
		g_free(name);
		if (errno != EEXIST)
			break;
	}
	set_errno_error(error, errno, "cannot create a file in",
	                spool->sub[SUB_STATE]);
	return NULL;
}

/* The state of @entry, written under a temporary name in state/ that
 * is returned; rename_state() gives it its name. */
static char *
write_state_tmp(AmSpool *spool, const AmSpoolEntry *entry, GError **error)
{
	g_autoptr(GString) out = g_string_new(NULL);
	g_autofree char *name = NULL;
	g_autofree char *path = NULL;
	int fd = -1;
	gboolean ok;

	g_string_append_printf(out,
	                       "%s %d\nattempts: %u\nnext_attempt: "
	                       "%" G_GINT64_FORMAT "\nreleased: "
	                       "%" G_GINT64_FORMAT "\n",
	                       STATE_MAGIC, STATE_VERSION, entry->attempts,
	                       entry->next_attempt, entry->released);
	if (entry->created_override != 0)
		g_string_append_printf(out, "created: %" G_GINT64_FORMAT "\n",
		                       entry->created_override);
	if (entry->last_error != NULL) {
		g_autofree char *clean =
		    am_log_sanitize(entry->last_error, SPOOL_ERROR_MAX);

		g_string_append_printf(out, "last_error: %s\n", clean);
	}
	for (guint i = 0; entry->to != NULL && entry->to[i] != NULL; i++)
		if (!add_field(out, "to", entry->to[i], error))
			return NULL;

	/* A private temporary name: the daemon and a --spool-retry may
	 * write the same state at once; the last rename wins whole. */
	if ((name = create_state_tmp(spool, entry->id, &fd, error)) == NULL)
		return NULL;
	path = path_of(spool, SUB_STATE, name);
	ok = write_all(fd, out->str, out->len, path, error);
	if (close(fd) != 0 && ok) {
		set_errno_error(error, errno, "cannot close", path);
		ok = FALSE;
	}
	if (!ok) {
		unlinkat(spool->sub_fd[SUB_STATE], name, 0);
		return NULL;
	}
	return g_steal_pointer(&name);
}

static gboolean
rename_state(AmSpool *spool, const char *tmp, const char *id, GError **error)
{
	if (renameat(spool->sub_fd[SUB_STATE], tmp, spool->sub_fd[SUB_STATE],
	             id) == 0)
		return TRUE;
	{
		g_autofree char *dest = path_of(spool, SUB_STATE, id);

		set_errno_error(error, errno, "cannot rename into", dest);
	}
	unlinkat(spool->sub_fd[SUB_STATE], tmp, 0);
	return FALSE;
}

static gboolean
write_state(AmSpool *spool, const AmSpoolEntry *entry, GError **error)
{
	g_autofree char *tmp = write_state_tmp(spool, entry, error);

	return tmp != NULL && rename_state(spool, tmp, entry->id, error);
}

static gboolean
apply_state_line(char *line, AmSpoolEntry *e, GPtrArray *to)
{
	char *colon = strchr(line, ':');
	char *value;
	gint64 v;

	if (colon == NULL)
		return FALSE;
	*colon = '\0';
	value = colon[1] == ' ' ? colon + 2 : colon + 1;
	if (strcmp(line, "to") == 0) {
		g_ptr_array_add(to, g_strdup(value));
		return TRUE;
	}
	if (strcmp(line, "last_error") == 0) {
		g_free(e->last_error);
		e->last_error = g_strdup(value);
		return TRUE;
	}
	if (!parse_int64(value, &v))
		return FALSE;
	if (strcmp(line, "attempts") == 0 && v <= G_MAXUINT)
		e->attempts = v;
	else if (strcmp(line, "next_attempt") == 0)
		e->next_attempt = v;
	else if (strcmp(line, "released") == 0)
		e->released = v;
	else if (strcmp(line, "created") == 0)
		e->created_override = v;
	else
		return FALSE;
	return TRUE;
}

/*
 * The state's recipients may only narrow the envelope's (those a
 * partial delivery left): the state file is neither synced nor digested,
 * so a torn, mixed-up or planted one must never send a copy to an
 * address the envelope does not name.  Rewrites @to in place to the
 * envelope's spelling of the addresses it keeps; FALSE when none is
 * left, which is a state we never write: damaged.
 */
static gboolean
narrow_to(const AmSpoolEntry *e, GPtrArray *to, const char *path)
{
	g_autoptr(GPtrArray) kept = g_ptr_array_new_with_free_func(g_free);

	for (guint i = 0; i < to->len; i++) {
		const char *addr = g_ptr_array_index(to, i);
		const char *match = NULL;
		gboolean dup = FALSE;

		for (guint j = 0; e->to != NULL && e->to[j] != NULL; j++)
			if (g_ascii_strcasecmp(e->to[j], addr) == 0) {
				match = e->to[j];
				break;
			}
		if (match == NULL) {
			g_autofree char *clean = am_log_sanitize(addr, 100);

			am_log_warning("spool: state file %s: recipient "
			               "<%s> is not in the envelope; ignored",
			               path, clean);
			continue;
		}
		for (guint k = 0; k < kept->len && !dup; k++)
			dup = strcmp(g_ptr_array_index(kept, k), match) == 0;
		if (!dup)
			g_ptr_array_add(kept, g_strdup(match));
	}
	if (kept->len == 0) {
		am_log_warning("spool: state file %s: no recipient of the "
		               "envelope; the state is damaged and ignored",
		               path);
		return FALSE;
	}
	g_ptr_array_set_size(to, 0);
	for (guint k = 0; k < kept->len; k++)
		g_ptr_array_add(to, g_strdup(g_ptr_array_index(kept, k)));
	return TRUE;
}

/* The text of state/@id, at most STATE_MAX octets, never through a
 * link; NULL when there is none (or it cannot be read: logged). */
static char *
read_state_text(AmSpool *spool, const char *id)
{
	g_autofree char *path = path_of(spool, SUB_STATE, id);
	g_autofree char *text = g_malloc(STATE_MAX + 1);
	int fd = openat(spool->sub_fd[SUB_STATE], id,
	                O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	gsize have = 0;
	struct stat st;

	if (fd < 0) {
		if (errno != ENOENT)
			am_log_warning("spool: cannot open %s: %s", path,
			               g_strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		am_log_warning("spool: %s: not a regular file; ignored", path);
		close(fd);
		return NULL;
	}
	while (have < STATE_MAX) {
		ssize_t n = read(fd, text + have, STATE_MAX - have);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		have += n;
	}
	close(fd);
	text[have] = '\0';
	if (strlen(text) != have) {
		am_log_warning("spool: %s: a NUL in the state; ignored", path);
		return NULL;
	}
	return g_steal_pointer(&text);
}

/* Apply state/ID to @e.  A state file that is missing starts afresh;
 * one that is damaged is logged and ignored: it only costs a retry. */
static void
load_state(AmSpool *spool, AmSpoolEntry *e)
{
	g_autofree char *path = path_of(spool, SUB_STATE, e->id);
	g_autofree char *text = read_state_text(spool, e->id);
	g_autoptr(GPtrArray) to = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GError) error = NULL;
	AmSpoolEntry fresh = {0};
	g_auto(GStrv) lines = NULL;
	gboolean ok;

	if (text == NULL)
		return;
	lines = g_strsplit(text, "\n", -1);
	ok = parse_magic(lines[0], STATE_MAGIC, STATE_VERSION, path, &error);
	for (guint i = 1; ok && lines[i] != NULL; i++)
		ok = lines[i][0] == '\0' ||
		     apply_state_line(lines[i], &fresh, to);
	if (!ok)
		am_log_warning("spool: state file %s: cannot parse; ignored",
		               path);
	else if (to->len > 0)
		ok = narrow_to(e, to, path);
	if (!ok) {
		g_free(fresh.last_error);
		return;
	}
	e->attempts = fresh.attempts;
	e->next_attempt = fresh.next_attempt;
	e->released = fresh.released;
	/* The envelope is never rewritten: a created time that had to
	 * be corrected lives here. */
	e->created_override = fresh.created_override;
	if (fresh.created_override != 0)
		e->created = fresh.created_override;
	g_free(e->last_error);
	e->last_error = fresh.last_error;
	/* No "to:" line at all: every recipient is still owed. */
	if (to->len > 0) {
		g_ptr_array_add(to, NULL);
		g_strfreev(e->to);
		e->to = (char **)g_ptr_array_free(g_steal_pointer(&to), FALSE);
	}
}

/* ------------------------------------------------------------------ */
/* Looking up copies                                                    */
/* ------------------------------------------------------------------ */

/*
 * Whether @sub/@name still names the file open on @fd.  The daemon that
 * owns the spool recycles a confirmed copy's file (recycle()): renamed
 * into tmp/ and written again for another copy.  A reader that opened
 * it before (a worker's scan, or --spool-list in another process) may
 * have read the other copy's octets, or a half-written file; once the
 * name is seen to no longer be this file, whatever was read is moot:
 * the copy is gone (confirmed, or moved to hold/ meanwhile).  A name
 * never comes back to a file that left it (ids are unique), so a
 * check after the read that finds the same inode proves the read was
 * of this copy.  Anything else than ENOENT: cannot tell; trust it.
 */
static gboolean
still_named(const AmSpool *spool, int sub, const char *name, int fd)
{
	struct stat open_st, name_st;

	if (fstat(fd, &open_st) != 0)
		return TRUE;
	if (fstatat(spool->sub_fd[sub], name, &name_st, AT_SYMLINK_NOFOLLOW) !=
	    0)
		return errno != ENOENT;
	return open_st.st_ino == name_st.st_ino &&
	       open_st.st_dev == name_st.st_dev;
}

static void
set_gone_error(GError **error, const char *name)
{
	g_clear_error(error);
	g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND,
	            "no copy %s (gone while read)", name);
}

/* Open and parse @name in @state; NOT_FOUND when it is not there (or
 * left while it was read).  A symbolic link in its place is never
 * followed: a FORMAT error. */
static AmSpoolEntry *
read_entry(AmSpool *spool, AmSpoolState state, const char *name, int *fd_out,
           goffset *body_offset, GError **error)
{
	int sub = sub_of_state(state);
	g_autofree char *path = path_of(spool, sub, name);
	int fd = openat(spool->sub_fd[sub], name,
	                O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	AmSpoolEntry *e;
	goffset offset = 0;

	if (fd < 0) {
		if (errno == ENOENT)
			g_set_error(error, AM_SPOOL_ERROR,
			            AM_SPOOL_ERROR_NOT_FOUND, "no copy %s",
			            name);
		else if (errno == ELOOP)
			format_error(error, path,
			             "a symbolic link; not "
			             "followed");
		else
			set_errno_error(error, errno, "cannot open", path);
		return NULL;
	}
	e = parse_envelope(fd, name, path, &offset, error);
	if (!still_named(spool, sub, name, fd)) {
		am_spool_entry_free(g_steal_pointer(&e));
		set_gone_error(error, name);
	}
	if (e != NULL) {
		e->state = state;
		load_state(spool, e);
	}
	if (e != NULL && fd_out != NULL)
		*fd_out = fd;
	else
		close(fd);
	if (body_offset != NULL)
		*body_offset = offset;
	return e;
}

static gint
compare_entries(gconstpointer a, gconstpointer b)
{
	const AmSpoolEntry *x = *(AmSpoolEntry *const *)a;
	const AmSpoolEntry *y = *(AmSpoolEntry *const *)b;

	if (x->created != y->created)
		return x->created < y->created ? -1 : 1;
	return strcmp(x->id, y->id);
}

GPtrArray *
am_spool_list_ids(AmSpool *spool, AmSpoolState state, GError **error)
{
	GPtrArray *ids;
	DIR *d = open_sub_stream(spool, sub_of_state(state), error);
	struct dirent *de;

	if (d == NULL)
		return NULL;
	ids = g_ptr_array_new_with_free_func(g_free);
	while ((de = readdir(d)) != NULL)
		if (am_spool_id_is_valid(de->d_name))
			g_ptr_array_add(ids, g_strdup(de->d_name));
	closedir(d);
	return ids;
}

GPtrArray *
am_spool_list(AmSpool *spool, AmSpoolState state, GError **error)
{
	return am_spool_list_full(spool, state, NULL, error);
}

GPtrArray *
am_spool_list_full(AmSpool *spool, AmSpoolState state, guint *damaged,
                   GError **error)
{
	g_autoptr(GPtrArray) ids = am_spool_list_ids(spool, state, error);
	GPtrArray *out;

	if (damaged != NULL)
		*damaged = 0;
	if (ids == NULL)
		return NULL;
	out =
	    g_ptr_array_new_with_free_func((GDestroyNotify)am_spool_entry_free);
	for (guint i = 0; i < ids->len; i++) {
		g_autoptr(GError) local = NULL;
		AmSpoolEntry *e =
		    read_entry(spool, state, ids->pdata[i], NULL, NULL, &local);

		if (e != NULL)
			g_ptr_array_add(out, e);
		else if (!g_error_matches(local, AM_SPOOL_ERROR,
		                          AM_SPOOL_ERROR_NOT_FOUND)) {
			am_log_warning("spool: %s; skipped", local->message);
			if (damaged != NULL)
				(*damaged)++;
		}
	}
	g_ptr_array_sort(out, compare_entries);
	return out;
}

AmSpoolEntry *
am_spool_get(AmSpool *spool, const char *id, GError **error)
{
	AmSpoolState states[] = {AM_SPOOL_QUEUED, AM_SPOOL_HELD};

	if (!check_id(id, error))
		return NULL;
	/* A copy moving from queue/ to hold/ between the two looks is
	 * found by the second one. */
	for (guint i = 0; i < G_N_ELEMENTS(states); i++) {
		GError *local = NULL;
		AmSpoolEntry *e =
		    read_entry(spool, states[i], id, NULL, NULL, &local);

		if (e != NULL)
			return e;
		if (!g_error_matches(local, AM_SPOOL_ERROR,
		                     AM_SPOOL_ERROR_NOT_FOUND)) {
			g_propagate_error(error, local);
			return NULL;
		}
		g_error_free(local);
	}
	g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND,
	            "no copy %s in %s", id, spool->dir);
	return NULL;
}

SmtpMessage *
am_spool_message(AmSpool *spool, const AmSpoolEntry *entry, GError **error)
{
	g_autoptr(AmSpoolEntry) e = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(GError) local = NULL;
	g_autofree char *path = NULL;
	g_autofree char *digest = NULL;
	goffset offset = 0;
	guint64 got = 0;
	int fd = -1;
	gboolean ok;

	if (!check_id(entry->id, error))
		return NULL;
	e = read_entry(spool, entry->state, entry->id, &fd, &offset, error);
	if (e == NULL)
		return NULL;

	/* The copy must be the one that was written, octet for octet:
	 * a damaged copy confirmed by a relay would be lost unseen. */
	path = path_of(spool, sub_of_state(entry->state), entry->id);
	digest = digest_of(fd, offset, e->size, &got, path, error);
	if (digest == NULL) {
		close(fd);
		return NULL;
	}
	if (got != e->size || strcmp(digest, e->sha256) != 0) {
		g_autofree char *why = g_strdup_printf(
		    "damaged: the copy's SHA-256 is %s, its envelope says %s",
		    digest, e->sha256);

		/* Recycled while hashed: gone, not damaged. */
		if (!still_named(spool, sub_of_state(entry->state), entry->id,
		                 fd))
			set_gone_error(error, entry->id);
		else
			format_error(error, path, why);
		close(fd);
		return NULL;
	}

	/* The envelope's flags decide how the library checks the text;
	 * the octets go as written, and no more than were written. */
	msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	ok = smtp_message_append_fd(msg, fd, offset, e->size, &local);
	close(fd);
	if (!ok) {
		g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
		            "copy %s: %s", entry->id, local->message);
		return NULL;
	}
	return g_steal_pointer(&msg);
}

/* ------------------------------------------------------------------ */
/* Changes of state                                                     */
/* ------------------------------------------------------------------ */

gboolean
am_spool_update(AmSpool *spool, const AmSpoolEntry *entry, GError **error)
{
	if (!check_id(entry->id, error))
		return FALSE;
	return write_state(spool, entry, error);
}

/*
 * Remove copy @id and (when @state) its state.  @reuse: the caller has
 * just had the copy confirmed, so nobody in this process reads its file
 * (one job per copy in the runner), and the file may be recycled.  A
 * copy withdrawn by the milter is unlinked: a worker might be sending
 * it from its descriptor, and an unlinked file keeps its octets.
 */
static gboolean
remove_copy(AmSpool *spool, const char *id, gboolean state, gboolean reuse,
            GError **error)
{
	int subs[] = {SUB_QUEUE, SUB_HOLD};

	if (!check_id(id, error))
		return FALSE;

	/* The copy first: a state file alone is harmless (removed at the
	 * next start), a copy that lost its state would be sent again to
	 * every address.  A copy withdrawn by the milter may have been
	 * held at once. */
	for (guint i = 0; i < G_N_ELEMENTS(subs); i++) {
		if (reuse && subs[i] == SUB_QUEUE && recycle(spool, id))
			break;
		if (reuse && subs[i] == SUB_QUEUE && errno == ENOENT)
			continue;
		if (unlinkat(spool->sub_fd[subs[i]], id, 0) == 0)
			break;
		if (errno != ENOENT) {
			g_autofree char *path = path_of(spool, subs[i], id);

			set_errno_error(error, errno, "cannot remove", path);
			return FALSE;
		}
	}
	if (state && unlinkat(spool->sub_fd[SUB_STATE], id, 0) != 0 &&
	    errno != ENOENT) {
		g_autofree char *state = path_of(spool, SUB_STATE, id);

		am_log_warning("spool: cannot remove %s: %s", state,
		               g_strerror(errno));
	}
	return TRUE;
}

gboolean
am_spool_remove(AmSpool *spool, const char *id, GError **error)
{
	return remove_copy(spool, id, TRUE, FALSE, error);
}

gboolean
am_spool_remove_full(AmSpool *spool, const char *id, gboolean state,
                     GError **error)
{
	return remove_copy(spool, id, state, FALSE, error);
}

gboolean
am_spool_remove_sent(AmSpool *spool, const char *id, gboolean state,
                     GError **error)
{
	return remove_copy(spool, id, state, TRUE, error);
}

/* rename() of @id from @from to @to, and the target directory synced:
 * an administrator's decision should survive a crash. */
static gboolean
move(AmSpool *spool, const char *id, int from, int to, GError **error)
{
	if (renameat(spool->sub_fd[from], id, spool->sub_fd[to], id) != 0) {
		g_autofree char *src = path_of(spool, from, id);

		if (errno == ENOENT)
			g_set_error(error, AM_SPOOL_ERROR,
			            AM_SPOOL_ERROR_NOT_FOUND,
			            "no copy %s in %s", id, spool->sub[from]);
		else
			set_errno_error(error, errno, "cannot rename", src);
		return FALSE;
	}
	return fsync_sub(spool, to, error);
}

gboolean
am_spool_hold(AmSpool *spool, const char *id, const char *reason,
              GError **error)
{
	g_autoptr(AmSpoolEntry) e = NULL;

	if (!check_id(id, error))
		return FALSE;
	e = read_entry(spool, AM_SPOOL_QUEUED, id, NULL, NULL, error);
	if (e == NULL)
		return FALSE;
	g_free(e->last_error);
	e->last_error = g_strdup(reason);
	e->next_attempt = 0;
	if (!write_state(spool, e, error))
		return FALSE;
	return move(spool, id, SUB_QUEUE, SUB_HOLD, error);
}

/* One held copy back to queue/, due now, its max age counted anew. */
static gboolean
release_one(AmSpool *spool, const char *id, GError **error)
{
	g_autoptr(AmSpoolEntry) e = NULL;

	e = read_entry(spool, AM_SPOOL_HELD, id, NULL, NULL, error);
	if (e == NULL)
		return FALSE;
	e->attempts = 0;
	e->next_attempt = 0;
	e->released = now_s();
	if (!write_state(spool, e, error))
		return FALSE;
	return move(spool, id, SUB_HOLD, SUB_QUEUE, error);
}

gboolean
am_spool_release(AmSpool *spool, const char *id, guint *count, GError **error)
{
	g_autoptr(GPtrArray) ids = NULL;
	guint moved = 0;

	if (count != NULL)
		*count = 0;
	if (g_strcmp0(id, "all") != 0) {
		if (!check_id(id, error) || !release_one(spool, id, error))
			return FALSE;
		if (count != NULL)
			*count = 1;
		return TRUE;
	}
	if ((ids = am_spool_list_ids(spool, AM_SPOOL_HELD, error)) == NULL)
		return FALSE;
	for (guint i = 0; i < ids->len; i++) {
		g_autoptr(GError) local = NULL;

		if (release_one(spool, ids->pdata[i], &local)) {
			moved++;
			continue;
		}
		/* Released by someone else meanwhile: not an error. */
		if (g_error_matches(local, AM_SPOOL_ERROR,
		                    AM_SPOOL_ERROR_NOT_FOUND))
			continue;
		/* A damaged file stays held; the rest still go. */
		if (g_error_matches(local, AM_SPOOL_ERROR,
		                    AM_SPOOL_ERROR_FORMAT)) {
			am_log_warning("spool: %s; left in hold",
			               local->message);
			continue;
		}
		if (count != NULL)
			*count = moved;
		g_propagate_error(error, g_steal_pointer(&local));
		return FALSE;
	}
	if (count != NULL)
		*count = moved;
	return TRUE;
}
