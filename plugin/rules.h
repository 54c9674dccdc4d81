/*
 * rules.h - which rules want a copy of a message
 */
#ifndef AM_RULES_H
#define AM_RULES_H

#include <glib.h>

#include "capture.h"
#include "conf.h"

G_BEGIN_DECLS

#define AM_RULES_ERROR (am_rules_error_quark())
GQuark am_rules_error_quark(void);

typedef enum {
	/* A regular expression could not be matched to the end (PCRE's
	 * backtracking or depth limit on a long subject): neither a match
	 * nor a miss can be told, so the message must be tempfailed. */
	AM_RULES_ERROR_MATCH,
} AmRulesError;

/*
 * am_rule_matches: whether every criterion @rule sets holds for the
 * message: sender, any recipient, client address, any header (as
 * "Name: value", unfolded), size at least min_size.  A rule with no
 * criterion matches all mail.  @headers: AmHeader *, may be NULL.
 * Returns FALSE with @error (MATCH, naming the rule and the criterion)
 * when a regular expression failed; else TRUE, the answer in @matched.
 */
gboolean am_rule_matches(const AmRule *rule, const AmEnvelope *env,
                         const GPtrArray *headers, guint64 size,
                         gboolean *matched, GError **error);

/*
 * am_rules_select: the rules of @config that match, in file order: the
 * first only, or all of them with match = all.  Each header is unfolded
 * once for all rules.  (transfer container): the AmRule * belong to
 * @config; free with g_ptr_array_unref().  NULL with @error (MATCH)
 * when a rule cannot be decided: the caller must not accept the
 * message without its copies, so it tempfails it.
 */
GPtrArray *am_rules_select(const AmConfig *config, const AmEnvelope *env,
                           const GPtrArray *headers, guint64 size,
                           GError **error);

G_END_DECLS

#endif /* AM_RULES_H */
