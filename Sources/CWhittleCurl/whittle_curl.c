#include "whittle_curl.h"

int wk_curl_global_init(void) { return (int)curl_global_init(CURL_GLOBAL_ALL); }
CURL *wk_curl_easy_init(void) { return curl_easy_init(); }
void wk_curl_easy_cleanup(CURL *handle) { curl_easy_cleanup(handle); }
void wk_curl_easy_reset(CURL *handle) { curl_easy_reset(handle); }
int wk_curl_perform(CURL *handle) { return (int)curl_easy_perform(handle); }
const char *wk_curl_strerror(int code) { return curl_easy_strerror((CURLcode)code); }

int wk_curl_set_long(CURL *handle, CURLoption option, long value) { return (int)curl_easy_setopt(handle, option, value); }
int wk_curl_set_offset(CURL *handle, CURLoption option, curl_off_t value) { return (int)curl_easy_setopt(handle, option, value); }
int wk_curl_set_string(CURL *handle, CURLoption option, const char *value) { return (int)curl_easy_setopt(handle, option, value); }
int wk_curl_set_pointer(CURL *handle, CURLoption option, void *value) { return (int)curl_easy_setopt(handle, option, value); }
int wk_curl_set_slist(CURL *handle, CURLoption option, struct curl_slist *list) { return (int)curl_easy_setopt(handle, option, list); }

int wk_curl_set_blob(CURL *handle, CURLoption option, const void *data, size_t length) {
    struct curl_blob blob;
    blob.data = (void *)data;
    blob.len = length;
    blob.flags = CURL_BLOB_COPY;
    return (int)curl_easy_setopt(handle, option, &blob);
}

int wk_curl_set_write(CURL *handle, wk_curl_data_callback callback, void *user) {
    int code = (int)curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, callback);
    return code ? code : (int)curl_easy_setopt(handle, CURLOPT_WRITEDATA, user);
}

int wk_curl_set_read(CURL *handle, wk_curl_data_callback callback, void *user) {
    int code = (int)curl_easy_setopt(handle, CURLOPT_READFUNCTION, callback);
    return code ? code : (int)curl_easy_setopt(handle, CURLOPT_READDATA, user);
}

int wk_curl_set_header(CURL *handle, wk_curl_data_callback callback, void *user) {
    int code = (int)curl_easy_setopt(handle, CURLOPT_HEADERFUNCTION, callback);
    return code ? code : (int)curl_easy_setopt(handle, CURLOPT_HEADERDATA, user);
}

long wk_curl_response_code(CURL *handle) {
    long code = 0;
    curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &code);
    return code;
}

struct curl_slist *wk_curl_slist_append(struct curl_slist *list, const char *value) { return curl_slist_append(list, value); }
void wk_curl_slist_free(struct curl_slist *list) { curl_slist_free_all(list); }
