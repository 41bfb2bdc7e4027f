/*
 * message-ids.h -- journald MESSAGE_ID= of every event an administrator may
 * want to find, count or alert on; doc/imapproxy.catalog explains each one
 * (journalctl -x). Generated once with systemd-id128 new; never change an id
 * (it is an interface: saved searches and alerts use it), add new ones.
 * tests/docs/check-docs checks that this header and the catalog agree.
 */
#pragma once

#define IMAPPROXY_MSGID_BROKER_STARTED     "bec69af14df44548976a24f0d6d1b8ab"
#define IMAPPROXY_MSGID_BROKER_STOPPING    "9682f43ed062461eacc5468f718337e2"
#define IMAPPROXY_MSGID_LOGIN_NEW          "092854265f434831ad72282d75d293c4" /* cache miss */
#define IMAPPROXY_MSGID_LOGIN_CACHED       "4b3f310bc8b344dcafc35141c9e9f797" /* cache hit */
#define IMAPPROXY_MSGID_LOGIN_FAILED       "5dcd3a4429244b849ea49e9bbf5154fa"
#define IMAPPROXY_MSGID_CACHE_EXPIRED      "d0db3bedb4c74d7493479e9a8e4a7257"
#define IMAPPROXY_MSGID_BACKEND_DEAD       "61c2ddaf18de4e73b71ed075a32ba334"
#define IMAPPROXY_MSGID_BACKEND_UNREACHABLE "b7e00322811346628fc99a2e36b84071"
#define IMAPPROXY_MSGID_CONFIG_RELOADED    "ad20c2902702498caa660eb2f88d83c8"
#define IMAPPROXY_MSGID_CONFIG_REJECTED    "41b990bd995d49aeb1d689f83d95eacc"
