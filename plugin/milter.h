/*
 * milter.h - the libmilter callbacks and the state they share
 */
#ifndef AM_MILTER_H
#define AM_MILTER_H

#include <glib.h>

#include "archive-id.h"
#include "capture.h"
#include "conf.h"

G_BEGIN_DECLS

/*
 * AmContext: the configuration and key one message is handled with.
 * Reference-counted so that a reload can swap it while messages that
 * started under the old one finish with it.
 */
struct AmSpool;
struct AmRunner;
struct AmPool;

typedef struct {
	gint ref;
	AmConfig *config;
	AmArchiveKey *key;
	struct AmPool *pool;     /* owned: connections to the relays */
	struct AmSpool *spool;   /* borrowed; NULL: no spool (tests) */
	struct AmRunner *runner; /* borrowed; NULL: no workers (tests,
				  * --spool-* commands) */
} AmContext;

/* am_context_new: takes ownership of both, makes a pool; spool and
 * runner are set by the caller.  (transfer full) */
AmContext *am_context_new(AmConfig *config, AmArchiveKey *key);
AmContext *am_context_ref(AmContext *ctx);
void am_context_unref(AmContext *ctx);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmContext, am_context_unref)

/* am_milter_set_context: the context new messages use (a ref is taken;
 * NULL drops the current one). */
void am_milter_set_context(AmContext *ctx);

/* am_milter_get_context: a ref on the current context, or NULL.
 * (transfer full) */
AmContext *am_milter_get_context(void);

#define AM_MILTER_ERROR (am_milter_error_quark())
GQuark am_milter_error_quark(void);

/* am_milter_register: smfi_register() with our callbacks. */
gboolean am_milter_register(GError **error);

/* What to tell the MTA about the original message. */
typedef enum {
	AM_VERDICT_ACCEPT,   /* continue: every copy sent or spooled */
	AM_VERDICT_TEMPFAIL, /* 4xx: a copy could not be made safe */
	AM_VERDICT_REJECT,   /* 5xx: a rule says so */
} AmVerdictAction;

/*
 * AmVerdict: the end-of-message decision for the original, combined
 * over every rule that made a copy: reject beats tempfail beats accept;
 * the reply is that of the first rule with the winning action; headers
 * accumulate; quarantine when any rule asks.  Every string owned.
 */
struct AmVerdictCopies;

typedef struct {
	AmVerdictAction action;
	char *rcode;        /* "451", "550"; NULL for accept */
	char *xcode;        /* "4.3.0", "5.1.1"; NULL for accept */
	char *text;         /* reply text, raw (cb_eom escapes it); NULL
			     * for accept */
	GPtrArray *headers; /* char *: X-Archive-Status values to add,
			     * one per copy whose rule has +header */
	char *quarantine;   /* smfi_quarantine reason; NULL: none */
	GPtrArray *ids;     /* char *: X-Archive-Id of every copy that
			     * was sent or is in the spool, when the
			     * original was accepted (empty otherwise);
			     * filled by am_milter_settle().  Whether the
			     * MTA then keeps the original is not visible
			     * to a milter; see milter.c */
	struct AmVerdictCopies *copies; /* private: the copies until
					 * am_milter_settle() */
} AmVerdict;

void am_verdict_free(AmVerdict *v);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(AmVerdict, am_verdict_free)

/*
 * am_milter_archive: the end-of-message work, apart from libmilter so
 * tests can drive it: recognise a returning copy, select rules, build
 * each copy and send it (delivery = sync) or spool it (delivery =
 * spool), apply each rule's policy to the outcome, and decide.  A
 * verdict that needs quarantine becomes a tempfail when
 * @can_quarantine is FALSE (the MTA did not grant SMFIF_QUARANTINE).
 * The copies are not settled yet: spooled ones wait in the spool, not
 * handed to the runner, until am_milter_settle(), which the caller
 * must call once the MTA was told (and before am_verdict_free).
 * (transfer full)
 */
AmVerdict *am_milter_archive(AmContext *ctx, const AmEnvelope *env,
                             AmCapture *cap, gboolean can_quarantine);

/*
 * am_verdict_no_quarantine: @v asked for quarantine but the original
 * cannot be held (@why, for the log): an accepting verdict with
 * quarantine becomes 451 4.3.0 "archive-milter: cannot quarantine
 * message", without headers, so that am_milter_settle() withdraws its
 * copies.  Anything else is left alone.  Logs at error level.
 */
void am_verdict_no_quarantine(AmVerdict *v, const char *why);

/*
 * am_milter_settle: the MTA was given @v as it now stands.  Accepted:
 * queued copies go to @ctx's runner (when it has one) and v->ids
 * names every copy made.  Not accepted: copies spooled for it are
 * withdrawn, copies a relay already took are logged.  Then the
 * decision line.  Once only; a verdict without copies (no rule, a
 * returning copy) is left as it is.
 */
void am_milter_settle(AmContext *ctx, AmVerdict *v);

/*
 * am_milter_reply_text: @prefix followed by @reason made safe for
 * smfi_setreply(): sanitized as am_log_sanitize() does (controls, line
 * separators, bidi and format characters, invalid UTF-8 become '?'),
 * cut to 200 octets, '%' doubled.  Exposed for tests.  (transfer full)
 */
char *am_milter_reply_text(const char *prefix, const char *reason);

G_END_DECLS

#endif /* AM_MILTER_H */
