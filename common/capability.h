/*
 * capability.h -- IMAP capability lists (space-separated words).
 */
#pragma once

#include <stdbool.h>

/* Whether the list holds word, compared case-insensitively as a whole word. */
bool capability_list_contains(const char *caps, const char *word);
