/*
 * rules.h - which rules want a copy of a message
 */
#ifndef AM_RULES_H
#define AM_RULES_H

#include <glib.h>

#include "capture.h"
#include "conf.h"

G_BEGIN_DECLS

/*
 * am_rule_matches: whether every criterion @rule sets holds for the
 * message: sender, any recipient, client address, any header (as
 * "Name: value", unfolded), size at least min_size.  A rule with no
 * criterion matches all mail.  @headers: AmHeader *, may be NULL.
 */
gboolean am_rule_matches(const AmRule *rule, const AmEnvelope *env,
                         const GPtrArray *headers, guint64 size);

/*
 * am_rules_select: the rules of @config that match, in file order: the
 * first only, or all of them with match = all.  (transfer container):
 * the AmRule * belong to @config; free with g_ptr_array_unref().
 */
GPtrArray *am_rules_select(const AmConfig *config, const AmEnvelope *env,
                           const GPtrArray *headers, guint64 size);

G_END_DECLS

#endif /* AM_RULES_H */
