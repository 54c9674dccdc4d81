/*
 * runner.h - the worker threads that deliver spooled copies
 *
 * The runner owns a queue of copy ids that are due, fed by
 * am_runner_kick() when the milter spools a copy, and by a scan of the
 * spool's queue/ at start (every copy left by an earlier run is picked
 * up again) and then every few seconds (copies released by
 * `--spool-retry` from another process, retries that came due).
 *
 * A worker sends a copy through the relay named in the copy, under the
 * rule named in the copy, together with the other copies due then for
 * that relay (up to 16 copies and 4 MiB, one pipelined batch with
 * am_deliver_batch()); each copy is checked, logged and settled as if
 * it had gone alone.  A copy just spooled waits a few milliseconds for
 * others to join it (am_runner_set_linger_ms).  A rule or relay no
 * longer in the configuration moves the copy to hold/.  The outcome
 * goes through the rule's policy (am_rule_action): a retry
 * (tempfail or spool) sets the next attempt with exponential backoff
 * between spool_retry_min and spool_retry_max; accept, or a copy older
 * than spool_max_age (counted from its creation or its last release)
 * whose attempt failed, moves it to hold/ with an error-level line
 * "ID: held (REASON)"; so does a copy past spool_max_age that was tried
 * before, without another attempt (a copy never tried gets one).  A
 * confirmed copy is removed.  Each attempt logs one delivery line per
 * address with the original's queue id.  Addresses that a relay took
 * are dropped from the copy's state, so a retry goes only to those
 * still due.
 *
 * Times read from the spool are bounded: a next attempt beyond now +
 * spool_retry_max, and a created or released time in the future, are
 * taken as now (a warning, and the state saved).  A damaged copy is
 * never sent: one whose file cannot be parsed or has not the length
 * its envelope records is left in queue/ with an error-level line (and
 * not looked at again until the next start); one whose SHA-256
 * differs is held with an error-level line.
 */
#ifndef AM_RUNNER_H
#define AM_RUNNER_H

#include <glib.h>

#include "milter.h"
#include "spool.h"

G_BEGIN_DECLS

typedef struct AmRunner AmRunner;

/*
 * am_runner_start: start @workers threads delivering from @spool with
 * the context current at each attempt (am_milter_set_context): its
 * configuration (rules, relays, spool_retry_*, spool_max_age) and its
 * pool.  With no context set, copies wait.  @spool is borrowed and must
 * outlive the runner.  Does not fail today; @error is for later
 * (threads that cannot start abort in GLib).  (transfer full)
 */
AmRunner *am_runner_start(AmSpool *spool, guint workers, GError **error);

/* am_runner_start_full: the same, scanning queue/ every @scan_ms
 * milliseconds instead of every 5 s (tests). */
AmRunner *am_runner_start_full(AmSpool *spool, guint workers, guint scan_ms,
                               GError **error);

/* am_runner_kick: copy @id was just queued: deliver it soon. */
void am_runner_kick(AmRunner *runner, const char *id);

/*
 * am_runner_kick_copy: copy @entry was just queued (am_spool_put
 * returned) with the very message @msg that was written: deliver it
 * soon, and for its first attempt from memory, without reading back,
 * parsing and hashing the file that holds the same octets.  Takes
 * both (transfer full).  The runner holds at most its memory cap
 * (am_runner_set_memory_max) of such messages at once; a copy beyond
 * it is freed at once and read from its file, as am_runner_kick()
 * would.  The file stays the truth: a retry, a restart, a scan all
 * read it.  @entry must be a copy of what am_spool_put() wrote, with
 * no retry state (attempts 0, no next attempt).
 */
void am_runner_kick_copy(AmRunner *runner, AmSpoolEntry *entry,
                         SmtpMessage *msg);

/* The default cap on octets of messages held by am_runner_kick_copy. */
#define AM_RUNNER_MEMORY_MAX (16 * 1024 * 1024)

/* am_runner_set_memory_max: the cap in octets (0: never from memory). */
void am_runner_set_memory_max(AmRunner *runner, guint64 octets);

/*
 * am_runner_set_linger_ms: how long a copy handed over by
 * am_runner_kick_copy() waits for others to join its batch (default
 * 5 ms; 0: none).  For tests.
 */
void am_runner_set_linger_ms(AmRunner *runner, guint ms);

/* What the runner did so far, for tests and the bench. */
typedef struct {
	guint64 from_memory; /* attempts made with a message in memory */
	guint64 from_disk;   /* looks at a copy in its file */
	guint64 over_cap;    /* kick_copy messages freed at once (cap) */
} AmRunnerStats;

void am_runner_get_stats(AmRunner *runner, AmRunnerStats *stats);

/*
 * am_runner_stop_within: stop taking copies, and wait at most @grace_ms
 * (< 0: without limit) for the copies being sent to end (each is
 * bounded only by its relay's time limits, which can be minutes).
 * TRUE: every thread ended, and the runner is freed.  FALSE: *@busy
 * (when not NULL) workers are still sending; the runner stays valid
 * and stopping, and the caller either exits the process (those copies
 * stay in the spool, as after a crash, and go again at the next start)
 * or calls am_runner_stop() to wait for them.  Copies not yet sent
 * stay in the spool for the next start.
 */
gboolean am_runner_stop_within(AmRunner *runner, gint64 grace_ms, guint *busy);

/* am_runner_stop_within() without a time limit. */
void am_runner_stop(AmRunner *runner);

G_END_DECLS

#endif /* AM_RUNNER_H */
