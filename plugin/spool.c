/*
 * spool.c - the durable spool of archive copies
 *
 * Every change of state is one rename() inside the spool directory, so
 * that the daemon and an administrator's `archive-milter --spool-*`
 * process can work on it at the same time without a lock, and a crash
 * leaves each copy in exactly one place.
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
 *
 * A value holding a control character (CR and LF above all, which
 * would start a forged line) is refused, not escaped: none of them
 * comes from a well-formed envelope or configuration.  The retry state
 * lives beside it in state/ID, written to a temporary name and renamed,
 * never fsynced (see spool.h).  Its last_error is sanitized, since it
 * holds the relay's words.
 *
 * A lock file (DIR/lock, flock) tells whether another process has the
 * spool open: only the process that gets it removes leftovers in tmp/,
 * so that `--spool-list` never deletes a file the daemon is writing.
 *
 * Known limits: XXX: one fsync of the file and one of its directory per
 * put, no group commit: a burst of copies costs two disk flushes each
 * (see the report of issue 4 for the measured cost).  XXX: a put of an
 * id already in queue/ replaces that file; ids are unique per copy, so
 * only a caller's bug can do it.
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
#define STATE_MAGIC      "archive-milter-state"
#define SPOOL_HEADER_MAX (64 * 1024) /* octets of envelope we read */
#define SPOOL_ID_MAX     200         /* octets of an id */
#define SPOOL_ERROR_MAX  1000        /* octets of last_error kept */

struct AmSpool {
	char *dir;        /* as given */
	char *sub[4];     /* tmp, queue, hold, state: full paths */
	guint64 min_free; /* octets */
	int lock_fd;      /* DIR/lock, flocked when we own the spool */
	gboolean owner;   /* we hold the lock: no other process has it */
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
	g_free(entry);
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
static gboolean
id_is_valid(const char *id)
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
	if (id_is_valid(id))
		return TRUE;
	g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND,
	            "not a spool id: \"%s\"", id != NULL ? id : "");
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

static gboolean
fsync_dir(const char *dir, GError **error)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int err;

	if (fd < 0) {
		set_errno_error(error, errno, "cannot open", dir);
		return FALSE;
	}
	if (fsync(fd) != 0) {
		err = errno;
		close(fd);
		set_errno_error(error, err, "cannot fsync", dir);
		return FALSE;
	}
	close(fd);
	return TRUE;
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

/* ------------------------------------------------------------------ */
/* Opening                                                              */
/* ------------------------------------------------------------------ */

/* @path must be a directory of ours, closed to group and others. */
static gboolean
make_private_dir(const char *path, GError **error)
{
	struct stat st;

	if (mkdir(path, 0700) != 0 && errno != EEXIST) {
		set_errno_error(error, errno, "cannot create spool directory",
		                path);
		return FALSE;
	}
	if (stat(path, &st) != 0) {
		set_errno_error(error, errno, "cannot stat spool directory",
		                path);
		return FALSE;
	}
	if (!S_ISDIR(st.st_mode)) {
		g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
		            "spool directory %s: not a directory", path);
		return FALSE;
	}
	if ((st.st_mode & 0077) != 0) {
		g_set_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO,
		            "spool directory %s: mode %04o is open to group "
		            "or others; it must be 0700",
		            path, (unsigned)(st.st_mode & 07777));
		return FALSE;
	}
	return TRUE;
}

/* Remove what a crash left in tmp/ (never complete copies: those are
 * renamed out) and the temporary names of state/. */
static void
remove_leftovers(AmSpool *spool)
{
	int subs[] = {SUB_TMP, SUB_STATE};

	for (guint i = 0; i < G_N_ELEMENTS(subs); i++) {
		g_autoptr(GDir) d = g_dir_open(spool->sub[subs[i]], 0, NULL);
		const char *name;

		while (d != NULL && (name = g_dir_read_name(d)) != NULL) {
			g_autofree char *p = NULL;

			if (subs[i] == SUB_STATE && name[0] != '.')
				continue;
			p = path_of(spool, subs[i], name);
			if (unlink(p) == 0)
				am_log_info("spool: removed leftover %s", p);
		}
	}
}

AmSpool *
am_spool_open(const char *dir, guint64 min_free, GError **error)
{
	g_autoptr(AmSpool) spool = g_new0(AmSpool, 1);
	g_autofree char *lock = NULL;

	g_return_val_if_fail(dir != NULL, NULL);
	spool->dir = g_strdup(dir);
	spool->min_free = min_free;
	spool->lock_fd = -1;
	if (!make_private_dir(dir, error))
		return NULL;
	for (guint i = 0; i < G_N_ELEMENTS(sub_names); i++) {
		spool->sub[i] = g_build_filename(dir, sub_names[i], NULL);
		if (!make_private_dir(spool->sub[i], error))
			return NULL;
	}

	/* The first process to open the spool owns tmp/; a second one
	 * (the --spool-* commands beside the daemon) only reads and
	 * renames. */
	lock = g_build_filename(dir, "lock", NULL);
	/* Read-only: flock() needs no more, and a descriptor open for
	 * writing would keep the file system from being remounted
	 * read-only (an administrator's way to stop a filling disk). */
	spool->lock_fd = open(lock, O_RDONLY | O_CREAT | O_CLOEXEC, 0600);
	if (spool->lock_fd < 0)
		/* A spool that cannot take a lock can still be listed;
		 * without the lock we only leave tmp/ alone. */
		am_log_warning("spool: cannot open %s: %s", lock,
		               g_strerror(errno));
	spool->owner = spool->lock_fd >= 0 &&
	               flock(spool->lock_fd, LOCK_EX | LOCK_NB) == 0;
	if (spool->owner)
		remove_leftovers(spool);
	return g_steal_pointer(&spool);
}

void
am_spool_close(AmSpool *spool)
{
	if (spool == NULL)
		return;
	if (spool->lock_fd >= 0)
		close(spool->lock_fd);
	for (guint i = 0; i < G_N_ELEMENTS(spool->sub); i++)
		g_free(spool->sub[i]);
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

/* The envelope, up to and including the blank line. */
static GString *
format_envelope(const AmSpoolEntry *e, GError **error)
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
	                       "flags:%s%s\ncreated: %" G_GINT64_FORMAT "\n\n",
	                       e->smtputf8 ? " smtputf8" : "",
	                       e->eightbit ? " 8bitmime" : "", e->created);
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
	if (statvfs(spool->sub[SUB_TMP], &sv) != 0) {
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

/* The raw octets of @msg, a full disk told apart from other errors. */
static gboolean
write_raw(SmtpMessage *msg, int fd, const char *path, GError **error)
{
	g_autoptr(GError) local = NULL;
	int err;

	if (smtp_message_write_raw(msg, fd, &local))
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

/* Write @head and @msg to @path (new), fsync and close it. */
static gboolean
write_file(const char *path, const GString *head, SmtpMessage *msg,
           GError **error)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	gboolean ok;

	if (fd < 0) {
		set_errno_error(error, errno, "cannot create", path);
		return FALSE;
	}
	ok = write_all(fd, head->str, head->len, path, error) &&
	     write_raw(msg, fd, path, error);
	if (ok && fsync(fd) != 0) {
		set_errno_error(error, errno, "cannot fsync", path);
		ok = FALSE;
	}
	/* NFS and some quotas report a full disk only at close. */
	if (close(fd) != 0 && ok) {
		set_errno_error(error, errno, "cannot close", path);
		ok = FALSE;
	}
	return ok;
}

static gboolean write_state(AmSpool *spool, const AmSpoolEntry *entry,
                            GError **error);

gboolean
am_spool_put(AmSpool *spool, const AmSpoolEntry *entry, SmtpMessage *msg,
             AmSpoolState state, GError **error)
{
	g_autoptr(GString) head = NULL;
	g_autofree char *tmp = NULL;
	g_autofree char *dest = NULL;
	int sub = sub_of_state(state);

	g_return_val_if_fail(spool != NULL && entry != NULL && msg != NULL,
	                     FALSE);
	if (!check_id(entry->id, error))
		return FALSE;
	if ((head = format_envelope(entry, error)) == NULL)
		return FALSE;
	if (!check_free_space(spool, head->len + smtp_message_get_size(msg),
	                      error))
		return FALSE;

	/* Step 1: the retry state first, when the caller has any (a copy
	 * held at once carries its reason): a state file without its copy
	 * is ignored, a copy without its state only starts afresh. */
	tmp = path_of(spool, SUB_TMP, entry->id);
	dest = path_of(spool, sub, entry->id);
	if ((entry->attempts > 0 || entry->last_error != NULL ||
	     entry->next_attempt != 0) &&
	    !write_state(spool, entry, error))
		return FALSE;

	/* Step 2: the file, complete and on disk, under a name nobody
	 * reads. */
	if (!write_file(tmp, head, msg, error)) {
		unlink(tmp);
		goto fail;
	}

	/* Step 3: into place, and the directory entry on disk too; only
	 * then may the caller answer the MTA for this copy. */
	if (rename(tmp, dest) != 0) {
		set_errno_error(error, errno, "cannot rename into", dest);
		unlink(tmp);
		goto fail;
	}
	if (!fsync_dir(spool->sub[sub], error)) {
		/* The caller will tempfail the original: a copy left
		 * here would be a second one after the client retries. */
		unlink(dest);
		goto fail;
	}
	return TRUE;

fail : {
	g_autofree char *st = path_of(spool, SUB_STATE, entry->id);

	unlink(st);
}
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

static gboolean
parse_int64(const char *s, gint64 *out)
{
	char *end;
	gint64 v;

	if (!g_ascii_isdigit(s[0]))
		return FALSE;
	errno = 0;
	v = g_ascii_strtoll(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < 0)
		return FALSE;
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

/* One "key: value" line of the envelope into @e. */
static gboolean
parse_field(char *line, AmSpoolEntry *e, GPtrArray *to, gboolean *created,
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
		*created = TRUE;
		return parse_int64(value, &e->created) ||
		       format_error(error, path, "bad created time");
	}
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
	if (slot == NULL) {
		g_autofree char *why =
		    g_strdup_printf("unknown key \"%.40s\"", key);

		return format_error(error, path, why);
	}
	if (*slot != NULL)
		return format_error(error, path, "a key given twice");
	*slot = g_strdup(value);
	return TRUE;
}

/* The version line; a file from an older or newer release is left
 * alone for that release (or an administrator) to deal with. */
static gboolean
parse_magic(const char *line, const char *magic, const char *path,
            GError **error)
{
	gsize n = strlen(magic);
	g_autofree char *why = NULL;

	if (strncmp(line, magic, n) != 0 || line[n] != ' ')
		return format_error(error, path, "not a spool file");
	if (strtol(line + n + 1, NULL, 10) == AM_SPOOL_VERSION &&
	    strcmp(line + n + 1, G_STRINGIFY(AM_SPOOL_VERSION)) == 0)
		return TRUE;
	why = g_strdup_printf("format version \"%.20s\" is not %d",
	                      line + n + 1, AM_SPOOL_VERSION);
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
		ssize_t n =
		    pread(fd, buf + have, SPOOL_HEADER_MAX - have, have);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			set_errno_error(error, errno, "cannot read", path);
			return NULL;
		}
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
check_envelope(const AmSpoolEntry *e, gboolean created, GPtrArray *to,
               const char *name, const char *path, GError **error)
{
	if (e->id == NULL || e->rule == NULL || e->relay == NULL ||
	    e->from == NULL || !created || to->len == 0)
		return format_error(error, path, "a required key is missing");
	if (strcmp(e->id, name) != 0)
		return format_error(error, path, "id is not the file name");
	return TRUE;
}

/* Parse the envelope of the open spool file @fd named @name. */
static AmSpoolEntry *
parse_envelope(int fd, const char *name, const char *path, goffset *body_offset,
               GError **error)
{
	g_autoptr(AmSpoolEntry) e = g_new0(AmSpoolEntry, 1);
	g_autoptr(GPtrArray) to = g_ptr_array_new_with_free_func(g_free);
	g_autofree char *buf = NULL;
	g_auto(GStrv) lines = NULL;
	gboolean created = FALSE;
	struct stat st;

	if ((buf = read_envelope(fd, path, body_offset, error)) == NULL)
		return NULL;
	lines = g_strsplit(buf, "\n", -1);
	if (!parse_magic(lines[0], SPOOL_MAGIC, path, error))
		return NULL;
	for (guint i = 1; lines[i] != NULL; i++)
		if (!parse_field(lines[i], e, to, &created, path, error))
			return NULL;
	if (!check_envelope(e, created, to, name, path, error))
		return NULL;
	g_ptr_array_add(to, NULL);
	e->to = (char **)g_ptr_array_free(g_steal_pointer(&to), FALSE);
	if (fstat(fd, &st) != 0) {
		set_errno_error(error, errno, "cannot stat", path);
		return NULL;
	}
	e->size = st.st_size > *body_offset ? st.st_size - *body_offset : 0;
	return g_steal_pointer(&e);
}

/* ------------------------------------------------------------------ */
/* The retry state                                                      */
/* ------------------------------------------------------------------ */

static gboolean
write_state(AmSpool *spool, const AmSpoolEntry *entry, GError **error)
{
	g_autoptr(GString) out = g_string_new(NULL);
	g_autofree char *dest = path_of(spool, SUB_STATE, entry->id);
	g_autofree char *tmpl = NULL;
	int fd;
	gboolean ok;

	g_string_append_printf(out,
	                       "%s %d\nattempts: %u\nnext_attempt: "
	                       "%" G_GINT64_FORMAT "\nreleased: "
	                       "%" G_GINT64_FORMAT "\n",
	                       STATE_MAGIC, AM_SPOOL_VERSION, entry->attempts,
	                       entry->next_attempt, entry->released);
	if (entry->last_error != NULL) {
		g_autofree char *clean =
		    am_log_sanitize(entry->last_error, SPOOL_ERROR_MAX);

		g_string_append_printf(out, "last_error: %s\n", clean);
	}
	for (guint i = 0; entry->to != NULL && entry->to[i] != NULL; i++)
		if (!add_field(out, "to", entry->to[i], error))
			return FALSE;

	/* A private temporary name: the daemon and a --spool-retry may
	 * write the same state at once; the last rename wins whole. */
	tmpl =
	    g_strdup_printf("%s/.%s.XXXXXX", spool->sub[SUB_STATE], entry->id);
	fd = g_mkstemp_full(tmpl, O_WRONLY | O_CLOEXEC, 0600);
	if (fd < 0) {
		set_errno_error(error, errno, "cannot create", tmpl);
		return FALSE;
	}
	ok = write_all(fd, out->str, out->len, tmpl, error);
	if (close(fd) != 0 && ok) {
		set_errno_error(error, errno, "cannot close", tmpl);
		ok = FALSE;
	}
	if (ok && rename(tmpl, dest) != 0) {
		set_errno_error(error, errno, "cannot rename into", dest);
		ok = FALSE;
	}
	if (!ok)
		unlink(tmpl);
	return ok;
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
	else
		return FALSE;
	return TRUE;
}

/* Apply state/ID to @e.  A state file that is missing starts afresh;
 * one that is damaged is logged and ignored: it only costs a retry. */
static void
load_state(AmSpool *spool, AmSpoolEntry *e)
{
	g_autofree char *path = path_of(spool, SUB_STATE, e->id);
	g_autofree char *text = NULL;
	g_autoptr(GPtrArray) to = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GError) error = NULL;
	AmSpoolEntry fresh = {0};
	g_auto(GStrv) lines = NULL;
	gboolean ok;

	if (!g_file_get_contents(path, &text, NULL, &error)) {
		if (!g_error_matches(error, G_FILE_ERROR, G_FILE_ERROR_NOENT))
			am_log_warning("spool: %s", error->message);
		return;
	}
	lines = g_strsplit(text, "\n", -1);
	ok = parse_magic(lines[0], STATE_MAGIC, path, &error);
	for (guint i = 1; ok && lines[i] != NULL; i++)
		ok = lines[i][0] == '\0' ||
		     apply_state_line(lines[i], &fresh, to);
	if (!ok) {
		am_log_warning("spool: state file %s: cannot parse; ignored",
		               path);
		g_free(fresh.last_error);
		return;
	}
	e->attempts = fresh.attempts;
	e->next_attempt = fresh.next_attempt;
	e->released = fresh.released;
	g_free(e->last_error);
	e->last_error = fresh.last_error;
	/* No address left would be a state we never write: keep the
	 * envelope's rather than lose the copy. */
	if (to->len > 0) {
		g_ptr_array_add(to, NULL);
		g_strfreev(e->to);
		e->to = (char **)g_ptr_array_free(g_steal_pointer(&to), FALSE);
	}
}

/* ------------------------------------------------------------------ */
/* Looking up copies                                                    */
/* ------------------------------------------------------------------ */

/* Open and parse @name in @state; NOT_FOUND when it is not there. */
static AmSpoolEntry *
read_entry(AmSpool *spool, AmSpoolState state, const char *name, int *fd_out,
           goffset *body_offset, GError **error)
{
	g_autofree char *path = path_of(spool, sub_of_state(state), name);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	AmSpoolEntry *e;
	goffset offset = 0;

	if (fd < 0) {
		if (errno == ENOENT)
			g_set_error(error, AM_SPOOL_ERROR,
			            AM_SPOOL_ERROR_NOT_FOUND, "no copy %s",
			            name);
		else
			set_errno_error(error, errno, "cannot open", path);
		return NULL;
	}
	e = parse_envelope(fd, name, path, &offset, error);
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
	const char *dir = spool->sub[sub_of_state(state)];
	GPtrArray *ids = g_ptr_array_new_with_free_func(g_free);
	DIR *d = opendir(dir);
	struct dirent *de;

	if (d == NULL) {
		set_errno_error(error, errno, "cannot read", dir);
		g_ptr_array_unref(ids);
		return NULL;
	}
	while ((de = readdir(d)) != NULL)
		if (id_is_valid(de->d_name))
			g_ptr_array_add(ids, g_strdup(de->d_name));
	closedir(d);
	return ids;
}

GPtrArray *
am_spool_list(AmSpool *spool, AmSpoolState state, GError **error)
{
	g_autoptr(GPtrArray) ids = am_spool_list_ids(spool, state, error);
	GPtrArray *out;

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
		                          AM_SPOOL_ERROR_NOT_FOUND))
			am_log_warning("spool: %s; skipped", local->message);
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
	goffset offset = 0;
	int fd = -1;
	gboolean ok;

	if (!check_id(entry->id, error))
		return NULL;
	e = read_entry(spool, entry->state, entry->id, &fd, &offset, error);
	if (e == NULL)
		return NULL;

	/* The envelope's flags decide how the library checks the text;
	 * the octets go as written. */
	msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	ok = smtp_message_append_fd(msg, fd, offset, -1, &local);
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

gboolean
am_spool_remove(AmSpool *spool, const char *id, GError **error)
{
	int subs[] = {SUB_QUEUE, SUB_HOLD};
	g_autofree char *state = NULL;

	if (!check_id(id, error))
		return FALSE;

	/* The copy first: a state file alone is harmless, a copy that
	 * lost its state would be sent again to every address.  A copy
	 * withdrawn by the milter may have been held at once. */
	for (guint i = 0; i < G_N_ELEMENTS(subs); i++) {
		g_autofree char *path = path_of(spool, subs[i], id);

		if (unlink(path) == 0)
			break;
		if (errno != ENOENT) {
			set_errno_error(error, errno, "cannot remove", path);
			return FALSE;
		}
	}
	state = path_of(spool, SUB_STATE, id);
	if (unlink(state) != 0 && errno != ENOENT)
		am_log_warning("spool: cannot remove %s: %s", state,
		               g_strerror(errno));
	return TRUE;
}

/* rename() of @id from @from to @to, and the target directory synced:
 * an administrator's decision should survive a crash. */
static gboolean
move(AmSpool *spool, const char *id, int from, int to, GError **error)
{
	g_autofree char *src = path_of(spool, from, id);
	g_autofree char *dest = path_of(spool, to, id);

	if (rename(src, dest) != 0) {
		if (errno == ENOENT)
			g_set_error(error, AM_SPOOL_ERROR,
			            AM_SPOOL_ERROR_NOT_FOUND,
			            "no copy %s in %s", id, spool->sub[from]);
		else
			set_errno_error(error, errno, "cannot rename", src);
		return FALSE;
	}
	return fsync_dir(spool->sub[to], error);
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
	e->released = g_get_real_time() / G_USEC_PER_SEC;
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
