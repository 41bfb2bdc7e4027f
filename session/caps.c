/*
 * caps.c -- the capability list a client of the proxy sees.
 *
 * DESCRIPTION
 *	The backend's own list, minus what the proxy cannot honour end to end
 *	(client STARTTLS, the backend's AUTH= mechanisms and SASL-IR,
 *	LOGINDISABLED, LOGIN-REFERRALS, COMPRESS=*), plus before login the
 *	mechanisms the proxy itself implements (AUTH=PLAIN AUTH=LOGIN SASL-IR),
 *	plus XIMAPPROXY. When the backend refuses plaintext logins
 *	(LOGINDISABLED) and the proxy has no TLS to it, LOGINDISABLED is shown
 *	and no mechanism is offered; likewise before the client's own TLS under
 *	login_requires_tls. STARTTLS is the proxy's own: offered only when a
 *	listen_tls_cert_file is configured and the client is not yet on TLS.
 *	Pure string work; owns nothing.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "capability.h"
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

bool session_starttls_available(const Session *s) {
        return !s->tls_active && s->cfg.listen_tls_cert_file;
}

bool session_login_allowed(const Session *s) {
        return s->tls_active || !s->cfg.login_requires_tls;
}

void caps_prelogin(const Session *s, char *out, size_t outsize) {
        unsigned flags = CAPS_PRELOGIN;
        if (session_starttls_available(s))
                flags |= CAPS_STARTTLS;
        if (!session_login_allowed(s))
                flags |= CAPS_LOGINDISABLED;
        caps_filter(s->prelogin_caps, flags, out, outsize);
}

void caps_filter(const char *backend_caps, unsigned flags, char *out, size_t outsize) {
        bool prelogin = flags & CAPS_PRELOGIN;
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
        const char *ours = " XIMAPPROXY";
        if (prelogin) {
                bool disabled = (flags & CAPS_LOGINDISABLED) ||
                                capability_list_contains(backend_caps ? backend_caps : "", "LOGINDISABLED");
                if (flags & CAPS_STARTTLS)
                        ours = disabled ? " STARTTLS LOGINDISABLED XIMAPPROXY"
                                        : " STARTTLS AUTH=PLAIN AUTH=LOGIN SASL-IR XIMAPPROXY";
                else
                        ours = disabled ? " LOGINDISABLED XIMAPPROXY" : " AUTH=PLAIN AUTH=LOGIN SASL-IR XIMAPPROXY";
        }
        size_t ol = strlen(ours);
        if (o == 0) {
                ours++;
                ol--;
        }
        if (o + ol < outsize)
                memcpy(out + o, ours, ol + 1);
}
