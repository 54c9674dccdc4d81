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
	AM_VERDICT_ACCEPT,   /* continue: the copies are done */
	AM_VERDICT_TEMPFAIL, /* 451: a copy failed under tempfail */
} AmVerdict;

/*
 * am_milter_archive: the end-of-message work, apart from libmilter so
 * tests can drive it: recognise a returning copy, select rules, build,
 * send and log each copy, decide.  @reason receives (transfer full) the
 * text for a tempfail reply, NULL otherwise.
 */
AmVerdict am_milter_archive(AmContext *ctx, const AmEnvelope *env,
                            AmCapture *cap, char **reason);

G_END_DECLS

#endif /* AM_MILTER_H */
