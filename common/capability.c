/*
 * capability.c -- looking words up in an IMAP capability list.
 *
 * SYNOPSIS
 *	bool capability_list_contains(const char *caps, const char *word);
 * DESCRIPTION
 *	Used by the broker (LITERAL+, SASL-IR, LOGINDISABLED before it logs in)
 *	and the session (UNSELECT, LOGINDISABLED). Pure; owns nothing.
 */
#include <string.h>
#include <strings.h>

#include "capability.h"

bool capability_list_contains(const char *caps, const char *word) {
        size_t wl = strlen(word);
        for (const char *p = caps; *p;) {
                while (*p == ' ')
                        p++;
                const char *e = p;
                while (*e && *e != ' ')
                        e++;
                if ((size_t) (e - p) == wl && strncasecmp(p, word, wl) == 0)
                        return true;
                p = e;
        }
        return false;
}
