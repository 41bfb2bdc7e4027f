/*
 * caps.c -- the capability list a client of the proxy sees.
 *
 * DESCRIPTION
 *	The backend's own list, minus what the proxy cannot honour end to end
 *	(client STARTTLS and AUTH= mechanisms it does not terminate yet,
 *	SASL-IR, LOGINDISABLED, LOGIN-REFERRALS, COMPRESS=*), plus XIMAPPROXY.
 *	Pure string work; owns nothing.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "session.h"

static bool cap_removed(const char *w, size_t l, bool prelogin) {
        static const char *const exact[] = { "STARTTLS", "LOGINDISABLED", "SASL-IR", "LOGIN-REFERRALS", "XIMAPPROXY" };
        static const char *const prefix[] = { "AUTH=", "COMPRESS=" };

        for (size_t i = 0; i < sizeof(exact) / sizeof(exact[0]); i++)
                if (strlen(exact[i]) == l && strncasecmp(w, exact[i], l) == 0)
                        return true;
        for (size_t i = 0; i < sizeof(prefix) / sizeof(prefix[0]); i++) {
                size_t pl = strlen(prefix[i]);
                if (l >= pl && strncasecmp(w, prefix[i], pl) == 0)
                        return true;
        }
        (void) prelogin;
        return false;
}

void caps_filter(const char *backend_caps, bool prelogin, char *out, size_t outsize) {
        size_t o = 0;
        const char *p = backend_caps;

        if (!p || !*p)
                p = "IMAP4rev1"; /* backend not known yet: the minimum */
        out[0] = '\0';
        while (*p) {
                while (*p == ' ')
                        p++;
                const char *e = p;
                while (*e && *e != ' ')
                        e++;
                size_t l = (size_t) (e - p);
                if (l > 0 && !cap_removed(p, l, prelogin) && o + l + 1 < outsize) {
                        if (o > 0)
                                out[o++] = ' ';
                        memcpy(out + o, p, l);
                        o += l;
                        out[o] = '\0';
                }
                p = e;
        }
        if (o + sizeof(" XIMAPPROXY") < outsize) {
                memcpy(out + o, o ? " XIMAPPROXY" : "XIMAPPROXY", o ? 12 : 11);
        }
}

bool caps_contains(const char *caps, const char *word) {
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
