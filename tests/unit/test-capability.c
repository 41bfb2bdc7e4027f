/* test-capability.c -- capability_list_contains(). */
#include <criterion/criterion.h>

#include "capability.h"

Test(capability, whole_words_case_insensitive) {
        const char *caps = "IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN  UNSELECT";
        cr_expect(capability_list_contains(caps, "IMAP4rev1"));
        cr_expect(capability_list_contains(caps, "literal+"));
        cr_expect(capability_list_contains(caps, "UNSELECT"));      /* last, after two spaces */
        cr_expect(capability_list_contains(caps, "auth=plain"));
        cr_expect(!capability_list_contains(caps, "LITERAL"));     /* a prefix is not a word */
        cr_expect(!capability_list_contains(caps, "AUTH="));
        cr_expect(!capability_list_contains(caps, "SASL"));
        cr_expect(!capability_list_contains(caps, "UNSELECTX"));
        cr_expect(!capability_list_contains("", "IMAP4rev1"));
        cr_expect(!capability_list_contains("   ", "IMAP4rev1"));
}
