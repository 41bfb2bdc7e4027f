/*
 * test-tls-policy.c -- backend TLS decisions (common/tls-policy.c).
 */
#include <criterion/criterion.h>
#include <errno.h>

#include "tls-policy.h"

#define PLAIN_CAPS "IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE AUTH=PLAIN"
#define TLS_CAPS "IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE STARTTLS AUTH=PLAIN"
#define DISABLED_CAPS "IMAP4rev1 SASL-IR ID ENABLE IDLE STARTTLS LOGINDISABLED"
#define DISABLED_NO_TLS "IMAP4rev1 ID LOGINDISABLED"

Test(tls_policy, none_logs_in_plain_unless_logindisabled) {
        cr_expect_eq(tls_policy_next(SERVER_TLS_NONE, false, PLAIN_CAPS), TLS_STEP_LOGIN);
        cr_expect_eq(tls_policy_next(SERVER_TLS_NONE, false, TLS_CAPS), TLS_STEP_LOGIN);
        cr_expect_eq(tls_policy_next(SERVER_TLS_NONE, false, DISABLED_CAPS), TLS_STEP_STARTTLS);
        cr_expect_eq(tls_policy_next(SERVER_TLS_NONE, false, "imap4rev1 starttls logindisabled"), TLS_STEP_STARTTLS);
        cr_expect_eq(tls_policy_next(SERVER_TLS_NONE, false, DISABLED_NO_TLS), TLS_STEP_REFUSE_LOGINDISABLED);
}

Test(tls_policy, starttls_required_never_logs_in_plain) {
        cr_expect_eq(tls_policy_next(SERVER_TLS_STARTTLS, false, TLS_CAPS), TLS_STEP_STARTTLS);
        cr_expect_eq(tls_policy_next(SERVER_TLS_STARTTLS, false, DISABLED_CAPS), TLS_STEP_STARTTLS);
        cr_expect_eq(tls_policy_next(SERVER_TLS_STARTTLS, false, PLAIN_CAPS), TLS_STEP_REFUSE_NO_STARTTLS);
        cr_expect_eq(tls_policy_next(SERVER_TLS_STARTTLS, false, ""), TLS_STEP_REFUSE_NO_STARTTLS);
        /* a word that merely contains STARTTLS is not STARTTLS */
        cr_expect_eq(tls_policy_next(SERVER_TLS_STARTTLS, false, "IMAP4rev1 XSTARTTLS STARTTLSX"),
                     TLS_STEP_REFUSE_NO_STARTTLS);
}

Test(tls_policy, implicit_without_tls_is_refused) {
        cr_expect_eq(tls_policy_next(SERVER_TLS_IMPLICIT, false, TLS_CAPS), TLS_STEP_REFUSE_NO_STARTTLS);
        cr_expect_eq(tls_policy_next(SERVER_TLS_IMPLICIT, true, PLAIN_CAPS), TLS_STEP_LOGIN);
}

Test(tls_policy, under_tls) {
        for (int m = 0; m < _SERVER_TLS_MAX; m++) {
                cr_expect_eq(tls_policy_next((ServerTls) m, true, TLS_CAPS), TLS_STEP_LOGIN);
                /* after STARTTLS a server that still says LOGINDISABLED cannot be logged in to */
                cr_expect_eq(tls_policy_next((ServerTls) m, true, DISABLED_CAPS), TLS_STEP_REFUSE_LOGINDISABLED);
        }
}

Test(tls_policy, priority_strings) {
        char buf[128];

        cr_assert_eq(tls_priority_build(NULL, false, false, false, buf, sizeof(buf)), 0);
        cr_expect_str_eq(buf, "NORMAL");
        cr_assert_eq(tls_priority_build("", true, false, false, buf, sizeof(buf)), 0);
        cr_expect_str_eq(buf, "NORMAL:-VERS-TLS1.0");
        cr_assert_eq(tls_priority_build("SECURE256", true, true, true, buf, sizeof(buf)), 0);
        cr_expect_str_eq(buf, "SECURE256:-VERS-TLS1.0:-VERS-TLS1.1:-VERS-TLS1.2");
        cr_assert_eq(tls_priority_build("NORMAL:-VERS-ALL:+VERS-TLS1.3", false, true, false, buf, sizeof(buf)), 0);
        cr_expect_str_eq(buf, "NORMAL:-VERS-ALL:+VERS-TLS1.3:-VERS-TLS1.0:-VERS-TLS1.1");
        /* GnuTLS turns TLS 1.3 off when 1.2 is off and 1.1 on: tls_no_tlsv1.2 alone
         * must not leave TLS 1.0/1.1 only */
        cr_assert_eq(tls_priority_build(NULL, false, false, true, buf, sizeof(buf)), 0);
        cr_expect_str_eq(buf, "NORMAL:-VERS-TLS1.0:-VERS-TLS1.1:-VERS-TLS1.2");
        cr_assert_eq(tls_priority_build(NULL, false, true, false, buf, sizeof(buf)), 0);
        cr_expect_str_eq(buf, "NORMAL:-VERS-TLS1.0:-VERS-TLS1.1");
        cr_expect_eq(tls_priority_build("NORMAL", true, true, true, buf, 20), -ENOBUFS);
}
