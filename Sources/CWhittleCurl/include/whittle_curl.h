// Typed wrappers over libcurl for Swift: curl_easy_setopt and curl_easy_getinfo are variadic, and several
// constants are macros, so Swift cannot call them directly.
#ifndef WHITTLE_CURL_H
#define WHITTLE_CURL_H

#include <curl/curl.h>
#include <stddef.h>

typedef size_t (*wk_curl_data_callback)(char *data, size_t size, size_t count, void *user);

int wk_curl_global_init(void);
CURL *wk_curl_easy_init(void);
void wk_curl_easy_cleanup(CURL *handle);
void wk_curl_easy_reset(CURL *handle);
int wk_curl_perform(CURL *handle);
const char *wk_curl_strerror(int code);

int wk_curl_set_long(CURL *handle, CURLoption option, long value);
int wk_curl_set_offset(CURL *handle, CURLoption option, curl_off_t value);
int wk_curl_set_string(CURL *handle, CURLoption option, const char *value);
int wk_curl_set_pointer(CURL *handle, CURLoption option, void *value);
int wk_curl_set_slist(CURL *handle, CURLoption option, struct curl_slist *list);
/// Copies `length` bytes (libcurl keeps its own copy: CURL_BLOB_COPY).
int wk_curl_set_blob(CURL *handle, CURLoption option, const void *data, size_t length);
int wk_curl_set_write(CURL *handle, wk_curl_data_callback callback, void *user);
int wk_curl_set_read(CURL *handle, wk_curl_data_callback callback, void *user);
int wk_curl_set_header(CURL *handle, wk_curl_data_callback callback, void *user);

long wk_curl_response_code(CURL *handle);
struct curl_slist *wk_curl_slist_append(struct curl_slist *list, const char *value);
void wk_curl_slist_free(struct curl_slist *list);

// Options and codes Swift needs by name (enum values and macros).
enum {
    WK_CURLOPT_URL = CURLOPT_URL,
    WK_CURLOPT_POST = CURLOPT_POST,
    WK_CURLOPT_HTTPGET = CURLOPT_HTTPGET,
    WK_CURLOPT_CUSTOMREQUEST = CURLOPT_CUSTOMREQUEST,
    WK_CURLOPT_POSTFIELDSIZE_LARGE = CURLOPT_POSTFIELDSIZE_LARGE,
    WK_CURLOPT_INFILESIZE_LARGE = CURLOPT_INFILESIZE_LARGE,
    WK_CURLOPT_UPLOAD = CURLOPT_UPLOAD,
    WK_CURLOPT_HTTPHEADER = CURLOPT_HTTPHEADER,
    WK_CURLOPT_CAINFO_BLOB = CURLOPT_CAINFO_BLOB,
    WK_CURLOPT_SSLCERT_BLOB = CURLOPT_SSLCERT_BLOB,
    WK_CURLOPT_SSLKEY_BLOB = CURLOPT_SSLKEY_BLOB,
    WK_CURLOPT_SSLCERTTYPE = CURLOPT_SSLCERTTYPE,
    WK_CURLOPT_SSLKEYTYPE = CURLOPT_SSLKEYTYPE,
    WK_CURLOPT_SSL_VERIFYPEER = CURLOPT_SSL_VERIFYPEER,
    WK_CURLOPT_SSL_VERIFYHOST = CURLOPT_SSL_VERIFYHOST,
    WK_CURLOPT_CONNECTTIMEOUT_MS = CURLOPT_CONNECTTIMEOUT_MS,
    WK_CURLOPT_TIMEOUT_MS = CURLOPT_TIMEOUT_MS,
    WK_CURLOPT_LOW_SPEED_LIMIT = CURLOPT_LOW_SPEED_LIMIT,
    WK_CURLOPT_LOW_SPEED_TIME = CURLOPT_LOW_SPEED_TIME,
    WK_CURLOPT_HTTP_VERSION = CURLOPT_HTTP_VERSION,
    WK_CURLOPT_NOSIGNAL = CURLOPT_NOSIGNAL,
    WK_CURLOPT_RANGE = CURLOPT_RANGE,
    WK_CURLOPT_ERRORBUFFER = CURLOPT_ERRORBUFFER,
    WK_CURLOPT_USERAGENT = CURLOPT_USERAGENT,
    WK_CURL_HTTP_VERSION_1_1 = CURL_HTTP_VERSION_1_1,
    WK_CURL_ERROR_SIZE = CURL_ERROR_SIZE,
    WK_CURL_READFUNC_ABORT = CURL_READFUNC_ABORT,
};

#endif
